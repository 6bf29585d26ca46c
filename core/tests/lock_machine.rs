//! The lock machine driven by hand, with crafted replies and virtual time: one test per scenario
//! of the Go reference client's own tests, one per fix the Go client lacks, and the blocking-read
//! hygiene rules. Every step of every test is checked against the invariants in `support`.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, SessionId};
use consul_lock_core::machine::{
    FencingToken, LockError, LockEvent, LockStatus, LossReason, Misuse, Reply, RequestId,
    SEMAPHORE_FLAG_VALUE,
};
use support::reply::{self, yes};
use support::{FLAGS, Fake, KEY, Kind, Node, Rig, Sent, entry, existing, ms, options, renew_ok, secs};

/// The lock transaction of `session` (its fields read as parameters: see `Sent::query`).
fn acquire_pattern(session: &str) -> String {
    format!("PUT /v1/txn?verb=lock&key=k&session={session}&flags={FLAGS}")
}

fn release_pattern(session: &str) -> String {
    format!("PUT /v1/kv/k?release={session}&flags={FLAGS}")
}

/// What happens after `lock()` on a free key: create `session` (if one is being created), read,
/// acquire, confirm.
fn finish_acquire(r: &mut Rig, session: &str, lock_index: u64) -> FencingToken {
    if let Some(create) = r.find("PUT /v1/session/create") {
        r.reply(create.id, reply::created(session));
    }
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let held = entry().held_by(session, lock_index);
    r.answer(
        &acquire_pattern(session),
        reply::locked(&held.clone().modified(6)),
    );
    match &r.outcomes()[..] {
        [LockEvent::Acquired(token)] => token.clone(),
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// The monitor read in flight.
fn monitor(r: &Rig) -> Sent {
    r.expect("GET /v1/kv/k?consistent")
}

fn held_by(session: &str) -> support::Kv {
    entry().held_by(session, 1)
}

// ================================================================================================
// The Go reference client's scenarios
// ================================================================================================

/// Go's TestAPI_LockLockUnlock: lock, hold (renewing), unlock; unlock twice is an error.
#[test]
fn go_lock_unlock() {
    let mut o = options();
    o.hold.value = b"node-1".to_vec();
    let mut r = Rig::new(o);
    assert_eq!(r.unlock(), Err(Misuse::NotHeld));

    r.lock().unwrap();
    assert_eq!(r.m().status(), LockStatus::Acquiring);
    assert_eq!(r.lock(), Err(Misuse::AlreadyHeld));
    let create = r.expect("PUT /v1/session/create");
    let body: serde_json::Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!(body["Name"], "Consul API Lock");
    assert_eq!(body["TTL"], "15s");
    assert_eq!(body["Behavior"], "release");
    assert!(body.get("LockDelay").is_none(), "the server's default lock-delay");
    r.reply(create.id, reply::created("s1"));

    let read = r.answer("GET /v1/kv/k?!index&!wait", reply::missing(5));
    assert!(!read.has("consistent"));
    let held = held_by("s1").value(b"node-1");
    let acquire = r.answer(&acquire_pattern("s1"), reply::locked(&held.clone().modified(6)));
    assert_eq!(acquire.value(), b"node-1");
    let token = FencingToken {
        key: Key::new(KEY).unwrap(),
        session: SessionId::new("s1").unwrap(),
        lock_index: 1,
        modify_index: 6,
    };
    assert_eq!(r.events(), [LockEvent::Acquired(token.clone())]);
    assert_eq!(r.m().status(), LockStatus::Held);
    assert_eq!(r.m().token(), Some(&token));
    assert_eq!(r.lock(), Err(Misuse::AlreadyHeld));

    // The monitor blocks on the confirm's index, without a wait of its own choosing.
    let watch = r.expect("GET /v1/kv/k?consistent&index=6&wait=300000ms");

    // Renewals every TTL/2, counted from the create's send time.
    r.advance(ms(7499));
    assert_eq!(r.count("PUT /v1/session/renew/s1"), 0);
    r.advance(ms(1));
    r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    r.advance(secs(7));
    assert_eq!(r.count("PUT /v1/session/renew/s1"), 0);
    r.advance(ms(500));
    r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    assert!(r.events().is_empty());

    r.unlock().unwrap();
    let release = r.expect(&release_pattern("s1"));
    assert_eq!(release.body, b"node-1", "the value is written on release too");
    assert_eq!(r.m().status(), LockStatus::Releasing);
    assert_eq!(r.unlock(), Err(Misuse::NotHeld));
    assert_eq!(r.lock(), Err(Misuse::Busy));
    r.reply(release.id, yes());
    assert!(
        r.events().is_empty(),
        "Released only once the session is destroyed"
    );
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);
    assert!(r.m().is_quiescent());

    // The monitor's answer, arriving now, is ignored.
    r.reply(watch.id, reply::missing(7));
    assert!(r.events().is_empty());
    r.advance(secs(60));
    assert!(r.node.inflight.is_empty());
    assert_eq!(
        r.last_sent("PUT /v1/session/renew/s1").unwrap().at,
        r.clock.at(secs(15))
    );
}

/// Go's TestAPI_LockForceInvalidate, as the monitor sees it: the session is destroyed, the key
/// is released, the holder learns it from the monitor read.
#[test]
fn go_force_invalidate_seen_by_the_monitor() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.advance(secs(3));
    r.reply(monitor(&r).id, reply::kv(7, &entry().free().modified(7)));
    assert_eq!(r.events(), [LockEvent::Lost(LossReason::NotHeld)]);
    assert_eq!(r.m().status(), LockStatus::Idle);
    assert_eq!(r.m().token(), None);
    // The session is cleaned up.
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_LockForceInvalidate, as the renewal sees it: renew answers 404, lost at once.
#[test]
fn go_force_invalidate_seen_by_the_renewal() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.advance(ms(7500));
    r.answer("PUT /v1/session/renew/s1", reply::session_gone("s1"));
    assert_eq!(r.events(), [LockEvent::Lost(LossReason::SessionInvalidated)]);
    assert_eq!(r.node.events.last().unwrap().0, r.now(), "at once");
    // Nothing to destroy: Consul already did.
    assert_eq!(r.count("PUT /v1/session/destroy/s1"), 0);
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_LockDeleteKey: the key is deleted under the holder.
#[test]
fn go_delete_key() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.advance(secs(1));
    r.reply(monitor(&r).id, reply::missing(7));
    assert_eq!(r.events(), [LockEvent::Lost(LossReason::KeyDeleted)]);
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_LockContend: three contenders all get the lock, in turn, never two at once, with
/// growing `LockIndex`es.
#[test]
fn go_contend() {
    let mut clock = support::Clock::new();
    let mut fake = Fake::new();
    let mut nodes: Vec<Node> = (0..3u64)
        .map(|i| {
            let mut o = options();
            o.hold.seed = i;
            o.hold.value = format!("node-{i}").into_bytes();
            support::node(o)
        })
        .collect();
    for n in &mut nodes {
        n.lock(clock.now()).unwrap();
    }
    let mut order = Vec::new();
    let mut last_index = 0;
    for _ in 0..3 {
        let until = clock.now() + secs(60);
        let got = support::run(
            &mut clock,
            &mut nodes,
            until,
            &mut |s, now| fake.serve(s, now),
            &mut |ns| ns.iter().any(|n| n.m.status() == LockStatus::Held),
        );
        assert!(got, "someone gets the lock");
        let i = nodes
            .iter()
            .position(|n| n.m.status() == LockStatus::Held)
            .unwrap();
        assert!(!order.contains(&i), "node {i} got it twice");
        order.push(i);
        let token = nodes[i].m.token().unwrap().clone();
        assert!(token.lock_index > last_index, "LockIndex grows with each holder");
        last_index = token.lock_index;
        assert_eq!(fake.holder(KEY), Some(token.session.as_str()));
        assert_eq!(fake.kv[KEY].value, format!("node-{i}").into_bytes());

        // Held for 40 s (renewals, waiters' blocking reads running out): nobody else gets it.
        let until = clock.now() + secs(40);
        let changed = support::run(
            &mut clock,
            &mut nodes,
            until,
            &mut |s, now| fake.serve(s, now),
            &mut |ns| ns.iter().filter(|n| n.m.status() == LockStatus::Held).count() != 1,
        );
        assert!(!changed, "exactly one holder while held");
        assert_eq!(nodes[i].m.token(), Some(&token));

        nodes[i].unlock(clock.now()).unwrap();
        let until = clock.now() + secs(5);
        support::run(
            &mut clock,
            &mut nodes,
            until,
            &mut |s, now| fake.serve(s, now),
            &mut |ns| ns[i].m.status() == LockStatus::Idle,
        );
        assert_eq!(nodes[i].m.status(), LockStatus::Idle);
    }
    order.sort_unstable();
    assert_eq!(order, [0, 1, 2]);
    for n in &mut nodes {
        let events = n.take_events();
        assert!(
            matches!(events[..], [LockEvent::Acquired(_), LockEvent::Released]),
            "{events:?}"
        );
        assert!(n.m.is_quiescent());
    }
    // In turn: each Acquired after the previous Released.
    let mut timeline: Vec<_> = nodes.iter().flat_map(|n| n.events.iter().cloned()).collect();
    timeline.sort_by_key(|(t, _)| *t);
    let kinds: Vec<bool> = timeline
        .iter()
        .map(|(_, e)| matches!(e, LockEvent::Acquired(_)))
        .collect();
    assert_eq!(kinds, [true, false, true, false, true, false]);
    assert!(
        fake.sessions.is_empty(),
        "every session destroyed: {:?}",
        fake.sessions
    );
    assert_eq!(fake.holder(KEY), None);
}

/// Go's TestAPI_LockDestroy: destroy while held, while another holds it, on a free key, twice.
#[test]
fn go_destroy() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    assert_eq!(r.destroy(), Err(Misuse::AlreadyHeld));
    r.unlock().unwrap();
    r.answer(&release_pattern("s1"), yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);

    // Another session holds it: in use.
    r.destroy().unwrap();
    assert_eq!(r.m().status(), LockStatus::Destroying);
    assert_eq!(r.lock(), Err(Misuse::Busy));
    assert_eq!(r.destroy(), Err(Misuse::Busy));
    r.answer("GET /v1/kv/k?!index", reply::kv(8, &held_by("other")));
    assert_eq!(r.events(), [LockEvent::Failed(LockError::InUse)]);
    assert!(r.m().is_quiescent());

    // Free: deleted with a check-and-set on its ModifyIndex.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::kv(9, &entry().free().modified(9)));
    r.answer("DELETE /v1/kv/k?cas=9", yes());
    assert_eq!(r.events(), [LockEvent::Destroyed]);

    // Twice: already gone.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(10));
    assert_eq!(r.events(), [LockEvent::Destroyed]);
    assert_eq!(r.count("DELETE /v1/kv/k"), 0);

    // Someone took it between the read and the delete.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::kv(11, &entry().free().modified(11)));
    r.answer("DELETE /v1/kv/k?cas=11", reply::no());
    assert_eq!(r.events(), [LockEvent::Failed(LockError::InUse)]);

    // Not a lock key.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/k", reply::kv(12, &entry().flags(0).modified(12)));
    assert_eq!(r.events(), [LockEvent::Failed(LockError::Conflict { flags: 0 })]);
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_LockConflict: a key with other flags (a semaphore's, or a plain key with 0) is
/// not taken, and the session made for the attempt is destroyed.
#[test]
fn go_conflict() {
    for flags in [SEMAPHORE_FLAG_VALUE, 0, 42] {
        let mut r = Rig::new(options());
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        let plain = entry().flags(flags).value(b"x");
        r.answer("GET /v1/kv/k?!index", reply::kv(7, &plain));
        assert_eq!(r.events(), [LockEvent::Failed(LockError::Conflict { flags })]);
        assert_eq!(r.count("PUT /v1/kv/k"), 0, "never acquired");
        assert!(r.last_sent("PUT /v1/kv/k").is_none());
        r.answer("PUT /v1/session/destroy/s1", yes());
        assert!(r.m().is_quiescent());
    }
}

/// Go's TestAPI_LockReclaimLock: a lock on a session that already holds the key takes it back,
/// with the same LockIndex; the caller's session is neither created, renewed nor destroyed.
#[test]
fn go_reclaim_lock() {
    let mut r = Rig::new(existing("mine"));
    r.lock().unwrap();
    assert_eq!(r.count("PUT /v1/session/create"), 0);
    let already = entry().held_by("mine", 3).modified(9);
    r.answer("GET /v1/kv/k?!index", reply::kv(9, &already));
    r.answer(
        &acquire_pattern("mine"),
        reply::locked(&already.clone().modified(9)),
    );
    let events = r.events();
    let [LockEvent::Acquired(token)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!((token.session.as_str(), token.lock_index), ("mine", 3));
    assert_eq!(
        r.m().session().renew_deadline(),
        None,
        "the caller renews its session"
    );

    r.advance(secs(60));
    assert_eq!(r.count("PUT /v1/session/renew/mine"), 0);
    r.unlock().unwrap();
    r.answer(&release_pattern("mine"), yes());
    assert_eq!(r.events(), [LockEvent::Released]);
    assert!(r.last_sent("PUT /v1/session/destroy/mine").is_none());
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_LockMonitorRetry with `monitor_retries = Some(3)`: failures in a row up to the
/// limit are borne (2 s apart, index reset), one more loses with MonitorFailed.
#[test]
fn go_monitor_retry() {
    let mut o = options();
    o.hold.monitor_retries = Some(3);
    let mut r = Rig::new(o);
    r.acquire("s1", 1);
    let held = held_by("s1");

    // Two failures, then an answer: survived.
    r.reply(monitor(&r).id, reply::no_leader());
    assert!(r.find("GET /v1/kv/k").is_none(), "paused before retrying");
    let failed_at = r.now();
    r.run(secs(2), renew_ok);
    let retry = monitor(&r);
    assert_eq!(retry.at, failed_at + secs(2), "Go's monitor retry time");
    assert!(!retry.has("index"), "the index is reset after a failure");
    r.reply(retry.id, reply::refused());
    r.run(secs(2), renew_ok);
    r.reply(monitor(&r).id, reply::kv(8, &held));
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Held);
    r.expect("GET /v1/kv/k?consistent&index=8");

    // Three in a row are still borne; the fourth is one too many.
    for _ in 0..3 {
        r.reply(monitor(&r).id, reply::status(500, "rpc error making call: EOF"));
        r.run(secs(2), renew_ok);
        assert_eq!(r.m().status(), LockStatus::Held);
    }
    r.reply(monitor(&r).id, reply::status(500, "rpc error making call: EOF"));
    let events = r.events();
    let [LockEvent::Lost(LossReason::MonitorFailed { failures, last })] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(*failures, 4);
    assert!(last.contains("500") && last.contains("rpc error"), "{last}");
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_LockOneShot: try-once gives up between 1x and 2x the wait, with its own outcome;
/// once the holder is gone it succeeds.
#[test]
fn go_one_shot() {
    let mut o = options();
    o.hold.try_once = true;
    o.hold.wait_time = ms(250);
    let mut r = Rig::new(o);
    let mut fake = Fake::new();
    fake.add_session("other", secs(15));
    fake.hold(KEY, "other");

    let start = r.now();
    r.lock().unwrap();
    let done = r.run_until(secs(10), |s, now| fake.serve(s, now), |n| n.m.is_quiescent());
    assert!(done);
    let gave_up_at = r.node.events.last().unwrap().0;
    assert_eq!(r.events(), [LockEvent::GaveUp]);
    let waited = gave_up_at - start;
    assert!(waited >= ms(250) && waited <= ms(500), "{waited:?}");
    assert_eq!(r.m().token(), None);
    assert!(r.m().is_quiescent(), "the attempt's session is destroyed");
    assert!(fake.sessions.keys().all(|s| s == "other"));
    assert_eq!(r.count("PUT /v1/txn?verb=lock"), 0);

    // The holder lets go (an explicit release: no lock-delay); the next try succeeds.
    let e = fake.kv.get_mut(KEY).unwrap();
    e.session = None;
    fake.index += 1;
    e.modify_index = fake.index;
    r.lock().unwrap();
    let held = r.run_until(
        secs(10),
        |s, now| fake.serve(s, now),
        |n| n.m.status() == LockStatus::Held,
    );
    assert!(held);
    let events = r.events();
    let [LockEvent::Acquired(token)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(token.lock_index, 2);
    assert_eq!(fake.holder(KEY), Some(token.session.as_str()));
}

// ================================================================================================
// The renew deadline (hashicorp/consul#18271)
// ================================================================================================

/// Renewals hang and the monitor read sits parked: Lost comes at the send time of the last
/// acknowledged renew plus the TTL, exactly, and the session is destroyed.
#[test]
fn renew_deadline_when_renewals_hang_and_the_monitor_is_parked() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    let parked = monitor(&r);
    r.advance(ms(7500));
    let acked = r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    assert_eq!(acked.at, r.clock.at(ms(7500)));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(22_500))));

    // The renew at 15 s never gets an answer.
    r.advance(ms(7500));
    let hanging = r.expect("PUT /v1/session/renew/s1");
    assert!(
        hanging.deadline <= r.clock.at(ms(22_500)),
        "a renew can't outlive the deadline"
    );
    r.advance_to(r.clock.at(ms(22_499)));
    assert_eq!(r.m().status(), LockStatus::Held);
    assert!(r.events().is_empty());
    r.advance(ms(1));
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(15) })]
    );
    assert_eq!(r.node.events.last().unwrap().0, r.clock.at(ms(22_500)));
    // Destroyed, so that Consul frees the key as soon as it hears from us.
    r.expect("PUT /v1/session/destroy/s1");
    // The parked monitor read, answered now, changes nothing.
    r.reply(parked.id, reply::kv(6, &held_by("s1")));
    assert!(r.events().is_empty());
}

/// Failing renewals are retried every second; none succeeds: Lost at ack send time + TTL.
#[test]
fn renew_deadline_when_renewals_fail() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    let mut sends = Vec::new();
    let mut n = 0;
    r.run(secs(30), |s, _| match s.kind() {
        Kind::Renew(_) => {
            sends.push(s.at);
            n += 1;
            Some(if n % 2 == 0 {
                reply::no_leader()
            } else {
                reply::refused()
            })
        }
        _ => None,
    });
    let events = r.events();
    assert_eq!(
        events,
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(15) })]
    );
    // Acknowledged: the create, sent at 0.
    assert_eq!(r.node.events.last().unwrap().0, r.clock.at(secs(15)));
    let offsets: Vec<Duration> = sends.iter().map(|t| r.clock.offset(*t)).collect();
    let expected: Vec<Duration> = (0..8).map(|i| ms(7500) + secs(i)).collect();
    assert_eq!(offsets, expected, "first at TTL/2, then every second");
}

/// The deadline counts from the send time of the acknowledged renew, not from its answer.
#[test]
fn renew_deadline_counts_from_the_send_time() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.advance(ms(7500));
    let renew = r.expect("PUT /v1/session/renew/s1");
    r.advance(ms(6500)); // a slow answer, at 14 s
    r.reply(renew.id, reply::renewed("s1"));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(22_500))));
    r.run(secs(20), |_, _| None);
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(15) })]
    );
    assert_eq!(r.node.events.last().unwrap().0, r.clock.at(ms(22_500)));
}

/// A healthy monitor does not keep a lock whose renewals go unanswered.
#[test]
fn renew_deadline_whatever_the_monitor_says() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    let mut index = 6;
    let lost = r.run_until(
        secs(60),
        |s, now| match s.kind() {
            // The monitor answers "still yours" every 3 s.
            Kind::Get { .. } if now >= s.at + secs(3) => {
                index += 1;
                Some(reply::kv(index, &held_by("s1").modified(index)))
            }
            _ => None,
        },
        |n| n.m.status() != LockStatus::Held,
    );
    assert!(lost);
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(15) })]
    );
    assert_eq!(r.t(), secs(15));
}

/// The TTL the server returns on renew is the one the deadline and the period follow.
#[test]
fn renewal_follows_the_servers_ttl() {
    let mut o = options();
    // A lock-delay above the raised TTL, so that the TTL is what bounds the hold window.
    o.hold.session_options_mut().unwrap().lock_delay = Some(secs(60));
    let mut r = Rig::new(o);
    r.acquire("s1", 1);
    r.advance(ms(7500));
    r.answer("PUT /v1/session/renew/s1", reply::renewed_ttl("s1", "30s"));
    assert_eq!(r.m().session().ttl(), Some(secs(30)));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(37_500))));
    r.advance_to(r.clock.at(ms(22_499)));
    assert_eq!(r.count("PUT /v1/session/renew/s1"), 0);
    r.advance(ms(1));
    r.expect("PUT /v1/session/renew/s1");
}

#[test]
fn a_health_bound_session_is_trusted_only_for_its_lock_delay() {
    // The reliability lab's finding: a failed node check ends a session at once, long before
    // its TTL, and from then on only the lock-delay keeps the key from the next holder. So with
    // a lock-delay of 4 s and a TTL of 15 s, a renew vouches for 4 s, and renewals come every 2 s.
    let mut o = options();
    o.hold.session_options_mut().unwrap().lock_delay = Some(secs(4));
    let mut r = Rig::new(o);
    r.acquire("s1", 1);
    assert_eq!(r.m().session().hold_window(), Some(secs(4)));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(4_000))));
    r.advance_to(r.clock.at(ms(1_999)));
    assert_eq!(r.count("PUT /v1/session/renew/s1"), 0);
    r.advance(ms(1));
    r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(6_000))));
    // The next renew, at 4 s, hangs: the hold ends 4 s after the last acknowledged one was
    // sent, not a TTL after.
    r.advance(ms(2_000));
    let _hanging = r.expect("PUT /v1/session/renew/s1");
    r.advance_to(r.clock.at(ms(5_999)));
    assert_eq!(r.m().status(), LockStatus::Held);
    r.advance(ms(1));
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(4) })]
    );
}

#[test]
fn a_session_without_checks_is_trusted_for_its_ttl_whatever_its_lock_delay() {
    let mut o = options();
    let session = o.hold.session_options_mut().unwrap();
    session.lock_delay = Some(Duration::ZERO);
    session.checks = Some(Vec::new());
    let mut r = Rig::new(o);
    r.acquire("s1", 1);
    assert_eq!(r.m().session().hold_window(), Some(secs(15)));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(15_000))));
    r.advance_to(r.clock.at(ms(7_499)));
    assert_eq!(r.count("PUT /v1/session/renew/s1"), 0);
    r.advance(ms(1));
    r.expect("PUT /v1/session/renew/s1");
}

// ================================================================================================
// Usable again (hashicorp/consul#4935, #4902)
// ================================================================================================

#[test]
fn lock_again_after_a_loss_and_after_an_unlock() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.reply(monitor(&r).id, reply::kv(7, &held_by("intruder")));
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::TakenBy(
            SessionId::new("intruder").unwrap()
        ))]
    );
    // At once, while the old session is still being destroyed.
    r.lock().unwrap();
    r.answer("PUT /v1/session/destroy/s1", yes());
    let token = finish_acquire(&mut r, "s2", 2);
    assert_eq!(token.session.as_str(), "s2");

    r.unlock().unwrap();
    r.answer(&release_pattern("s2"), yes());
    r.answer("PUT /v1/session/destroy/s2", yes());
    assert_eq!(r.events(), [LockEvent::Released]);
    r.lock().unwrap();
    let token = finish_acquire(&mut r, "s3", 3);
    assert_eq!(token.lock_index, 3);
}

#[test]
fn lock_again_after_a_renew_deadline_loss() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.run(secs(16), |_, _| None);
    assert!(matches!(
        r.events()[..],
        [LockEvent::Lost(LossReason::RenewDeadline { .. })]
    ));
    r.lock().unwrap();
    // The destroy sent at the loss never gets an answer: it times out, then a new session.
    r.run_until(
        secs(30),
        |_, _| None,
        |n| n.find("PUT /v1/session/create").is_some(),
    );
    finish_acquire(&mut r, "s2", 2);
}

#[test]
fn lock_again_after_a_failure() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k", reply::status(403, "Permission denied"));
    let events = r.events();
    assert!(
        matches!(&events[..], [LockEvent::Failed(LockError::PermissionDenied(e))] if e.status() == Some(403)),
        "{events:?}"
    );
    r.lock().unwrap();
    r.answer("PUT /v1/session/destroy/s1", yes());
    finish_acquire(&mut r, "s2", 1);
}

// ================================================================================================
// Cancel (hashicorp/consul#2992, #5087)
// ================================================================================================

/// Cancel during a blocking read: Cancelled from the cancel call itself, the session destroyed
/// at once, the read's late answer ignored; `lock` works again.
#[test]
fn cancel_acts_at_once_during_a_blocking_read() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::kv(10, &held_by("other")));
    let read = r.expect("GET /v1/kv/k?index=10&wait=15000ms");
    r.advance(secs(3));
    r.cancel(); // the support checks Cancelled comes out of this very call
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    assert_eq!(r.m().status(), LockStatus::Idle);
    let destroy = r.expect("PUT /v1/session/destroy/s1");
    assert_eq!(destroy.at, r.now());
    r.reply(read.id, reply::kv(11, &entry().free().modified(11)));
    assert_eq!(r.count("PUT /v1/txn?verb=lock"), 0);
    r.reply(destroy.id, yes());
    assert!(r.m().is_quiescent());
    r.cancel();
    assert!(r.events().is_empty());

    r.lock().unwrap();
    finish_acquire(&mut r, "s2", 1);
}

/// Cancel while the session create is in flight: Cancelled at once; the session is destroyed
/// once the create answers.
#[test]
fn cancel_while_creating_destroys_the_session_once_created() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    let create = r.expect("PUT /v1/session/create");
    r.advance(ms(300));
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    assert!(!r.m().is_quiescent(), "the create is still out");
    r.advance(ms(300));
    r.reply(create.id, reply::created("s1"));
    r.expect("PUT /v1/session/destroy/s1");
    assert!(r.find("GET /v1/kv/k").is_none());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
    assert!(r.events().is_empty());

    // A create that fails after the cancel leaves nothing to destroy.
    r.lock().unwrap();
    let create = r.expect("PUT /v1/session/create");
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.reply(create.id, reply::no_leader());
    assert!(r.m().is_quiescent());
}

/// Cancel while holding unlocks (and ends with Released); while releasing it does nothing more;
/// while destroying it abandons the destroy at once.
#[test]
fn cancel_while_held_releasing_or_destroying() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.cancel();
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Releasing);
    r.cancel();
    assert_eq!(r.count("PUT /v1/kv/k?release=s1"), 1);
    r.answer(&release_pattern("s1"), yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);

    r.destroy().unwrap();
    let read = r.expect("GET /v1/kv/k");
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.reply(read.id, reply::kv(9, &entry().modified(9)));
    assert_eq!(r.count("DELETE /v1/kv/k"), 0);
    assert!(r.m().is_quiescent());
}

/// With the caller's session, an acquire abandoned by cancel may have been granted: if so, the
/// key is released (no session destroy will do it).
#[test]
fn cancel_with_the_callers_session_releases_a_granted_acquire() {
    let mut r = Rig::new(existing("mine"));
    r.lock().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let acquire = r.expect(&acquire_pattern("mine"));
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    assert!(
        !r.m().is_quiescent(),
        "waits to learn whether the acquire was granted"
    );
    r.reply(acquire.id, reply::locked(&held_by("mine")));
    r.expect(&release_pattern("mine"));
    assert!(r.events().is_empty());

    // Refused: nothing to release.
    let mut r = Rig::new(existing("mine"));
    r.lock().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let acquire = r.expect(&acquire_pattern("mine"));
    r.cancel();
    r.reply(acquire.id, reply::lock_held());
    assert!(r.last_sent("PUT /v1/kv/k?release=mine").is_none());
    assert!(r.m().is_quiescent());
}

// ================================================================================================
// Lock-delay-aware retries (hashicorp/consul#1006)
// ================================================================================================

/// The waiter learns the holder's lock-delay (2 s) from its session info; when the holder's
/// session is invalidated and the acquire is refused on a free key, it retries at freed_at + 2 s
/// (plus a small margin), not 5 s later.
#[test]
fn retry_when_the_holders_lock_delay_ends() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(
        "GET /v1/kv/k?!index",
        reply::kv(10, &held_by("holder").modified(10)),
    );
    r.advance(ms(100)); // the holder has held for a while: now its lock-delay is asked for
    let info = r.expect("GET /v1/session/info/holder");
    let read = r.expect("GET /v1/kv/k?index=10&wait=15000ms");
    r.reply(info.id, reply::info("holder", secs(2), 10));
    r.run(secs(4), renew_ok);

    // The holder's session is invalidated: the key is freed, under lock-delay.
    let freed_at = r.now();
    r.reply(read.id, reply::kv(11, &entry().free().modified(11)));
    // The lock transaction says it is the lock-delay: no read is needed to tell.
    r.answer(&acquire_pattern("s1"), reply::lock_delayed());
    assert_eq!(r.count("GET /v1/kv/k?!index"), 0);
    assert_eq!(r.count("PUT /v1/txn?verb=lock"), 0);
    let found = r.run_until(secs(10), renew_ok, |n| {
        n.find("PUT /v1/txn?verb=lock&session=s1").is_some()
    });
    assert!(found);
    let retry = r.expect(&acquire_pattern("s1"));
    let after = retry.at - freed_at;
    assert!(after >= secs(2) && after <= secs(2) + ms(100), "{after:?}");
    r.reply(retry.id, reply::locked(&held_by("s1").modified(12)));
    assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
}

/// A refused acquire on a key that is free again but has moved since the read (another contender
/// took it and let go in between: a short hold) is a race lost, not a lock-delay: acquire again
/// at once. Waiting out the last holder's 15 s lock-delay here stalled every waiter of a busy key
/// (found by the contention benchmark).
#[test]
fn a_race_lost_to_a_short_hold_retries_at_once() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(
        "GET /v1/kv/k?!index",
        reply::kv(10, &held_by("holder").modified(10)),
    );
    r.advance(ms(100)); // the holder has held for a while: now its lock-delay is asked for
    let info = r.expect("GET /v1/session/info/holder");
    let read = r.expect("GET /v1/kv/k?index=10&wait=15000ms");
    r.reply(info.id, reply::info("holder", secs(15), 10));
    r.run(secs(1), renew_ok);

    // Released at 11; another contender takes it (12) before our acquire lands, and lets go (13).
    r.reply(read.id, reply::kv(11, &entry().free().modified(11)));
    r.answer(&acquire_pattern("s1"), reply::lock_held());
    let refused_at = r.now();
    r.answer("GET /v1/kv/k?!index", reply::kv(13, &entry().free().modified(13)));
    let retry = r.expect(&acquire_pattern("s1"));
    assert_eq!(
        retry.at, refused_at,
        "acquired again at once, not after the lock-delay"
    );
    r.reply(retry.id, reply::locked(&held_by("s1").modified(14)));
    assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
}

/// Holders seen for less than 100 ms cost the waiter no session-info request: under contention,
/// with holds of milliseconds, asking about every new holder at once was a fifth of all requests.
#[test]
fn short_holds_are_not_asked_about() {
    let mut r = Rig::new(options());
    let start = r.now();
    let asked = |r: &Rig| -> Vec<String> {
        r.sent_since(start)
            .iter()
            .filter(|s| s.path.starts_with("/v1/session/info/"))
            .map(|s| s.path.clone())
            .collect()
    };
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::kv(10, &held_by("h1").modified(10)));
    r.advance(ms(60));
    // h1 lets go, h2 takes it before our acquire: 60 ms each, never asked about.
    r.answer(
        "GET /v1/kv/k?index=10",
        reply::kv(11, &entry().free().modified(11)),
    );
    r.answer(&acquire_pattern("s1"), reply::lock_held());
    r.answer("GET /v1/kv/k?!index", reply::kv(12, &held_by("h2").modified(12)));
    r.advance(ms(60));
    assert!(asked(&r).is_empty(), "{:?}", asked(&r));
    // h2 holds on: asked about once, 100 ms after it was first seen (at 60 ms).
    r.advance(ms(40));
    let info = r.expect("GET /v1/session/info/h2");
    assert_eq!(info.at, r.clock.at(ms(160)));
    r.advance(ms(500));
    assert_eq!(asked(&r), ["/v1/session/info/h2"]);
}

/// Without the holder's lock-delay, refused acquires on a free key back off: jittered, doubling
/// from 250 ms, capped at 5 s; each pause is a blocking read of the key for that long (nothing
/// changes here, so each runs out its wait).
#[test]
fn retry_with_capped_jittered_backoff_when_the_delay_is_unknown() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(
        "GET /v1/kv/k?!index",
        reply::kv(10, &held_by("holder").modified(10)),
    );
    r.advance(ms(100));
    r.answer("GET /v1/session/info/holder", reply::refused());
    r.answer(
        "GET /v1/kv/k?index=10",
        reply::kv(11, &entry().free().modified(11)),
    );
    let mut pauses = Vec::new();
    for i in 0..9 {
        // Consul names the lock-delay; or it refuses for the key's being held, and the key,
        // read again, is free and unchanged: a lock-delay all the same.
        if i % 2 == 0 {
            r.answer(&acquire_pattern("s1"), reply::lock_delayed());
        } else {
            r.answer(
                &acquire_pattern("s1"),
                reply::lock_refused("lock is already held"),
            );
            r.answer("GET /v1/kv/k?!index", reply::kv(11, &entry().free().modified(11)));
        }
        let since = r.now();
        let found = r.run_until(secs(10), unchanged_when_waited_out, |n| {
            n.find("PUT /v1/txn?verb=lock&session=s1").is_some()
        });
        assert!(found);
        pauses.push(r.now() - since);
    }
    for (i, pause) in pauses.iter().enumerate() {
        let cap = (ms(250) * 2u32.pow(u32::try_from(i).unwrap())).min(secs(5));
        assert!(
            *pause >= cap / 2 && *pause <= cap,
            "pause {i}: {pause:?} (cap {cap:?})"
        );
    }
}

/// Renews every session; answers a blocking read of the key, when its wait runs out, with the
/// free key unchanged at index 11.
fn unchanged_when_waited_out(sent: &Sent, now: Instant) -> Option<Reply> {
    let waited_out = sent.path == "/v1/kv/k" && sent.wait().is_some_and(|w| now >= sent.at + w);
    if waited_out {
        return Some(reply::kv(11, &entry().free().modified(11)));
    }
    renew_ok(sent, now)
}

/// A lock-delay of unknown end is waited out watching the key: a contender who takes the key
/// meanwhile is seen at once and waited for, and its release wakes us, instead of a blind pause
/// that misses both (found by the scale run: a release 4 s before the pause's end went unseen).
#[test]
fn a_lock_delay_of_unknown_end_is_waited_out_on_the_key() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::kv(11, &entry().free().modified(11)));
    for _ in 0..4 {
        r.answer(&acquire_pattern("s1"), reply::lock_delayed());
        r.run_until(secs(10), unchanged_when_waited_out, |n| {
            n.find("PUT /v1/txn?verb=lock&session=s1").is_some()
        });
    }
    // The fifth refusal: the backoff is at seconds now, and the key is watched meanwhile.
    r.answer(&acquire_pattern("s1"), reply::lock_delayed());
    r.advance(ms(300));
    // Another contender takes the key: seen at once, and waited for on its new index.
    r.answer(
        "GET /v1/kv/k?index=11",
        reply::kv(12, &held_by("other").modified(12)),
    );
    r.advance(ms(300));
    // It lets go: the waiter tries at once, not at the end of its backoff.
    r.answer(
        "GET /v1/kv/k?index=12",
        reply::kv(13, &entry().free().modified(13)),
    );
    let at = r.now();
    assert!(
        r.find("PUT /v1/txn?verb=lock&session=s1").is_some(),
        "no acquire at once after the release"
    );
    r.answer(&acquire_pattern("s1"), reply::locked(&held_by("s1").modified(14)));
    assert!(r.now() == at);
    assert!(
        matches!(r.events().last(), Some(LockEvent::Acquired(_))),
        "{:?}",
        r.events()
    );
}

/// The watch read of a lock-delay answered at once without a change (an agent that does not
/// block) does not make the waiter try again before its backoff's end; pauses under a second
/// are not watched at all (a read would double their cost for little).
#[test]
fn a_lock_delay_watch_answered_at_once_still_waits_its_backoff() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::kv(11, &entry().free().modified(11)));
    r.answer(&acquire_pattern("s1"), reply::lock_delayed());
    assert!(r.find("GET /v1/kv/k?index=11").is_none(), "a short pause watched");
    for _ in 0..4 {
        r.run_until(secs(10), unchanged_when_waited_out, |n| {
            n.find("PUT /v1/txn?verb=lock&session=s1").is_some()
        });
        r.answer(&acquire_pattern("s1"), reply::lock_delayed());
    }
    let refused = r.now();
    r.answer(
        "GET /v1/kv/k?index=11",
        reply::kv(11, &entry().free().modified(11)),
    );
    assert!(r.find("PUT /v1/txn?verb=lock&session=s1").is_none());
    r.run_until(secs(10), renew_ok, |n| {
        n.find("PUT /v1/txn?verb=lock&session=s1").is_some()
    });
    assert!(
        r.now() - refused >= secs(1),
        "tried again {:?} after",
        r.now() - refused
    );
}

// ================================================================================================
// Try-once (vitessio/vitess#8309)
// ================================================================================================

/// Giving up is GaveUp, never Acquired, and nothing that arrives later turns it into one.
#[test]
fn try_once_gives_up_with_its_own_outcome() {
    let mut o = options();
    o.hold.try_once = true;
    o.hold.wait_time = secs(2);
    let mut r = Rig::new(o);
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::kv(10, &held_by("other")));
    let read = r.expect("GET /v1/kv/k?index=10");
    assert_eq!(read.wait(), Some(ms(2000)), "no read outlasts the give-up time");
    r.advance(secs(2));
    assert_eq!(r.events(), [LockEvent::GaveUp]);
    assert_eq!(r.m().status(), LockStatus::Idle);
    r.reply(read.id, reply::kv(11, &entry().free().modified(11)));
    assert_eq!(r.count("PUT /v1/txn?verb=lock"), 0);
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
    assert!(r.events().is_empty());
}

/// An acquire still in flight when the wait ends is waited for (without a busy loop): granted, the
/// lock is ours and reported as such; refused, the attempt gives up.
#[test]
fn try_once_waits_for_an_acquire_in_flight() {
    for granted in [true, false] {
        let mut o = options();
        o.hold.try_once = true;
        o.hold.wait_time = secs(2);
        let mut r = Rig::new(o);
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        r.advance(ms(1900));
        r.answer("GET /v1/kv/k?!index", reply::missing(5));
        let acquire = r.expect(&acquire_pattern("s1"));
        r.advance(secs(1));
        assert_eq!(r.m().status(), LockStatus::Acquiring);
        if granted {
            r.reply(acquire.id, reply::locked(&held_by("s1")));
            assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
        } else {
            r.reply(acquire.id, reply::lock_held());
            assert_eq!(r.events(), [LockEvent::GaveUp]);
        }
    }
}

/// Try-once while the session create hangs: gives up on time, and destroys the session if the
/// create answers afterwards.
#[test]
fn try_once_gives_up_while_creating() {
    let mut o = options();
    o.hold.try_once = true;
    o.hold.wait_time = secs(2);
    let mut r = Rig::new(o);
    r.lock().unwrap();
    let create = r.expect("PUT /v1/session/create");
    r.advance(secs(2));
    assert_eq!(r.events(), [LockEvent::GaveUp]);
    r.reply(create.id, reply::created("s1"));
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

// ================================================================================================
// Transient errors while holding (hashicorp/consul#830, #1162, #5437)
// ================================================================================================

/// With the default `monitor_retries = None`, monitor failures of every transient kind are borne
/// for as long as renewals succeed, and a good answer resumes blocking reads.
#[test]
fn transient_monitor_errors_do_not_lose_a_renewed_lock() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    let faults = || {
        vec![
            reply::no_leader(),
            reply::status(500, "rpc error: EOF"),
            reply::status(502, "Bad Gateway"),
            reply::status(429, "rate limited"),
            reply::refused(),
            reply::reset(),
            reply::timed_out(),
            // A server that knows no leader may answer from stale state, even "key gone".
            reply::kv_leader(7, Some(false), &entry().free()),
            reply::missing_leader(7, Some(false)),
            reply::kv_leader(7, Some(false), &held_by("intruder")),
            reply::raw(200, Some(7), Some(true), "<html>proxy</html>"),
            reply::raw(200, Some(7), Some(true), "[{\"Key\":"),
        ]
    };
    // Sixty seconds of nothing but failures (four TTLs): still held.
    for fault in faults().into_iter().chain(faults()) {
        r.reply(monitor(&r).id, fault);
        assert_eq!(r.m().status(), LockStatus::Held);
        r.run(secs(2), renew_ok);
        assert!(!monitor(&r).has("index"));
    }
    assert!(r.t() >= secs(48));
    assert!(r.events().is_empty());
    r.reply(monitor(&r).id, reply::kv(20, &held_by("s1").modified(20)));
    r.expect("GET /v1/kv/k?consistent&index=20");
    assert_eq!(r.m().status(), LockStatus::Held);
}

/// Failing renewals within the deadline don't lose the lock either.
#[test]
fn transient_renew_errors_within_the_deadline_do_not_lose() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    let mut n = 0;
    r.run(secs(120), |s, _| match s.kind() {
        Kind::Renew(id) => {
            n += 1;
            // Three failures out of four; each success comes within a TTL of the last.
            Some(match n % 4 {
                0 => reply::renewed(&id),
                1 => reply::no_leader(),
                2 => reply::refused(),
                _ => reply::status(503, ""),
            })
        }
        _ => None,
    });
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Held);
}

/// Authoritative answers lose at once, each with its reason.
#[test]
fn authoritative_answers_lose_at_once() {
    let cases: Vec<(fn() -> Reply, LossReason)> = vec![
        (|| reply::missing(7), LossReason::KeyDeleted),
        (|| reply::missing_leader(7, None), LossReason::KeyDeleted),
        (
            || reply::kv(7, &held_by("other").modified(7)),
            LossReason::TakenBy(SessionId::new("other").unwrap()),
        ),
        (|| reply::kv(7, &entry().free().modified(7)), LossReason::NotHeld),
        (
            || reply::kv(7, &held_by("s1").flags(0).modified(7)),
            LossReason::Conflict { flags: 0 },
        ),
    ];
    for (fault, reason) in cases {
        let mut r = Rig::new(options());
        r.acquire("s1", 1);
        r.advance(secs(5));
        r.reply(monitor(&r).id, fault());
        assert_eq!(r.events(), [LockEvent::Lost(reason)]);
        assert_eq!(r.node.events.last().unwrap().0, r.clock.at(secs(5)));
    }

    // A refusal (403) is not retried: MonitorFailed at once.
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.reply(monitor(&r).id, reply::status(403, "Permission denied"));
    let events = r.events();
    assert!(
        matches!(
            &events[..],
            [LockEvent::Lost(LossReason::MonitorFailed { failures: 1, .. })]
        ),
        "{events:?}"
    );
}

/// Consul forgot the session between renewals: the lock transaction's "invalid session" (or a
/// plain acquire's 500 of the same words) makes a new one (with the caller's session, there is
/// nothing to do but fail).
#[test]
fn acquire_with_a_forgotten_session() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    r.answer(&acquire_pattern("s1"), reply::lock_invalid_session("s1"));
    assert!(r.events().is_empty());
    let token = finish_acquire(&mut r, "s2", 1);
    assert_eq!(token.session.as_str(), "s2");

    let mut r = Rig::new(existing("mine"));
    r.lock().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    r.answer(&acquire_pattern("mine"), reply::invalid_session("mine"));
    let events = r.events();
    assert!(
        matches!(events[..], [LockEvent::Failed(LockError::Refused(_))]),
        "{events:?}"
    );
    assert!(r.m().is_quiescent());
}

/// A create refused for good fails the attempt; a transient failure is retried soon.
#[test]
fn session_create_failures() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer(
        "PUT /v1/session/create",
        reply::status(
            500,
            "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]",
        ),
    );
    let events = r.events();
    assert!(
        matches!(events[..], [LockEvent::Failed(LockError::Session(_))]),
        "{events:?}"
    );
    assert!(r.m().is_quiescent());

    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::no_leader());
    assert_eq!(r.count("PUT /v1/session/create"), 0);
    let since = r.now();
    assert!(r.run_until(
        secs(1),
        |_, _| None,
        |n| n.find("PUT /v1/session/create").is_some()
    ));
    assert!(r.now() - since <= ms(250));
    finish_acquire(&mut r, "s1", 1);
}

// ================================================================================================
// Blocking-read hygiene
// ================================================================================================

/// An index that goes backwards is reset: the next read carries no index.
#[test]
fn a_backwards_index_is_reset_while_waiting() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(
        "GET /v1/kv/k?!index",
        reply::kv(100, &held_by("other").modified(100)),
    );
    r.run(secs(15), renew_ok);
    r.answer(
        "GET /v1/kv/k?index=100",
        reply::kv(40, &held_by("other").modified(40)),
    );
    assert!(r.run_until(secs(10), renew_ok, |n| n.find("GET /v1/kv/k").is_some()));
    let next = r.expect("GET /v1/kv/k");
    assert!(!next.has("index") && !next.has("wait"), "{}", next.describe());
    r.reply(next.id, reply::kv(41, &held_by("other").modified(41)));
    r.expect("GET /v1/kv/k?index=41&wait=15000ms");
}

#[test]
fn a_backwards_index_is_reset_while_monitoring() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.advance(secs(3));
    r.reply(monitor(&r).id, reply::kv(3, &held_by("s1").modified(3)));
    assert!(r.run_until(secs(10), renew_ok, |n| n.find("GET /v1/kv/k").is_some()));
    let next = monitor(&r);
    assert!(!next.has("index"), "{}", next.describe());
    r.reply(next.id, reply::kv(4, &held_by("s1").modified(4)));
    r.expect("GET /v1/kv/k?consistent&index=4");
}

/// A reply without `X-Consul-Index` (a proxy, a broken agent) never leads to a read on index 0.
#[test]
fn never_block_on_index_zero() {
    let no_index = |e: &support::Kv| {
        let body = serde_json::Value::Array(vec![e.json()]).to_string();
        reply::raw(200, None, Some(true), body)
    };
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", no_index(&held_by("other")));
    assert!(r.run_until(secs(10), renew_ok, |n| n.find("GET /v1/kv/k").is_some()));
    // (the support refuses any request with index=0)
    assert!(!r.expect("GET /v1/kv/k").has("index"));
    r.answer("GET /v1/kv/k", reply::missing(5));
    r.answer(&acquire_pattern("s1"), reply::locked(&held_by("s1")));
    assert!(matches!(r.outcomes()[..], [LockEvent::Acquired(_)]));
    // The monitor blocks on the entry the lock transaction wrote.
    assert_eq!(monitor(&r).index(), Some(6));
}

/// Every request carries a deadline: blocking reads their wait plus Consul's jitter (wait/16)
/// plus a margin; everything else the request timeout.
#[test]
fn every_request_has_a_fitting_deadline() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    let create = r.expect("PUT /v1/session/create");
    assert_eq!(create.deadline, create.at + secs(10));
    r.reply(create.id, reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::kv(10, &held_by("other")));
    let read = r.expect("GET /v1/kv/k?index=10&wait=15000ms");
    let floor = read.at + secs(15) + ms(937) + Duration::from_micros(500);
    assert!(read.deadline > floor && read.deadline <= floor + secs(10));
    r.advance(ms(100)); // the holder has held for a while: now its lock-delay is asked for
    let info = r.expect("GET /v1/session/info/other");
    assert_eq!(info.deadline, info.at + secs(10));
    r.reply(read.id, reply::missing(11));
    r.answer(&acquire_pattern("s1"), reply::locked(&held_by("s1").modified(12)));
    let watch = r.expect("GET /v1/kv/k?consistent&index=12&wait=300000ms");
    let floor = watch.at + secs(300) + ms(18_750);
    assert!(watch.deadline > floor && watch.deadline <= floor + secs(10));
    r.advance(ms(7500));
    // A renew gets the request timeout, capped by the renew deadline (the create's send + TTL).
    let renew = r.expect("PUT /v1/session/renew/s1");
    assert_eq!(renew.deadline, r.clock.at(secs(15)));
    r.reply(renew.id, reply::renewed("s1"));
    r.advance(ms(7500));
    let renew = r.expect("PUT /v1/session/renew/s1");
    assert_eq!(renew.deadline, r.clock.at(ms(22_500)));
}

/// Counts the requests sent in 10 virtual seconds against an agent that answers at once.
fn requests_in_ten_seconds(r: &mut Rig, mut serve: impl FnMut(&Sent) -> Reply) -> usize {
    let start = r.now();
    r.run(secs(10), |s, _| {
        Some(match s.kind() {
            Kind::Renew(id) => reply::renewed(&id),
            Kind::Info(id) => reply::info(&id, secs(15), 10),
            _ => serve(s),
        })
    });
    r.sent_since(start).len()
}

/// An agent answering blocking reads at once without index progress can't make a waiter spin.
#[test]
fn pacing_while_waiting() {
    type Agent = fn(&Sent) -> Reply;
    let agents: Vec<(&str, Agent)> = vec![
        ("same index", |_| reply::kv(10, &held_by("other").modified(10))),
        ("no index header", |_| {
            let body = serde_json::Value::Array(vec![held_by("other").json()]).to_string();
            reply::raw(200, None, Some(true), body)
        }),
        ("a free key the acquire can't take", |s| match s.kind() {
            Kind::LockTxn { .. } => reply::lock_held(),
            Kind::Get { index: None, .. } => reply::kv(10, &held_by("other").modified(10)),
            _ => reply::kv(10, &entry().free().modified(10)),
        }),
        ("a lock-delay that never ends", |s| match s.kind() {
            Kind::LockTxn { .. } => reply::lock_delayed(),
            _ => reply::kv(10, &entry().free().modified(10)),
        }),
        ("errors", |_| reply::no_leader()),
    ];
    for (name, agent) in agents {
        let mut r = Rig::new(options());
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        let n = requests_in_ten_seconds(&mut r, agent);
        assert!(n <= 30, "{name}: {n} requests in 10 s");
        assert_eq!(r.m().status(), LockStatus::Acquiring);
    }
}

/// Nor a holder's monitor.
#[test]
fn pacing_while_holding() {
    type Agent = fn(&Sent) -> Reply;
    let agents: Vec<(&str, Agent)> = vec![
        ("same index", |_| reply::kv(6, &held_by("s1"))),
        ("no index header", |_| {
            let body = serde_json::Value::Array(vec![held_by("s1").json()]).to_string();
            reply::raw(200, None, Some(true), body)
        }),
        ("no leader", |_| reply::kv_leader(6, Some(false), &held_by("s1"))),
    ];
    for (name, agent) in agents {
        let mut r = Rig::new(options());
        r.acquire("s1", 1);
        let n = requests_in_ten_seconds(&mut r, agent);
        assert!(n <= 30, "{name}: {n} requests in 10 s");
        assert_eq!(r.m().status(), LockStatus::Held);
    }
}

/// A blocking read whose wait a driver cut to a turn of a couple of seconds (its connections
/// taken in turns, `shorten_wait`) and that came back without news is an ordinary answer, not an
/// agent answering at once: the waiter reads again at once with no failed try reported, and the
/// holder's monitor reads again at once, without a pause.
#[test]
fn a_read_answered_after_a_turn_without_news_is_not_spinning() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(
        "GET /v1/kv/k?!index&!wait",
        reply::kv(10, &held_by("other").modified(10)),
    );
    for _ in 0..3 {
        let read = r.expect("GET /v1/kv/k?index=10&wait=15000ms");
        r.advance(secs(2));
        r.reply(read.id, reply::kv(10, &held_by("other").modified(10)));
        assert!(r.events().is_empty(), "no failed try reported");
    }
    r.expect("GET /v1/kv/k?index=10&wait=15000ms");

    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    for _ in 0..3 {
        let read = r.expect("GET /v1/kv/k?consistent&index=6&wait=300000ms");
        r.advance(secs(2));
        r.reply(read.id, reply::kv(6, &held_by("s1")));
        assert!(r.events().is_empty());
    }
    r.expect("GET /v1/kv/k?consistent&index=6&wait=300000ms");
    assert_eq!(r.m().status(), LockStatus::Held);
}

// ================================================================================================
// The driving contract
// ================================================================================================

/// `handle_timeout` called early, twice, or with a time in the past does nothing, and
/// `poll_timeout` never goes before the latest `now`.
#[test]
fn spurious_early_and_past_timeouts_are_no_ops() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    let next = r.m().poll_timeout().unwrap();
    assert_eq!(next, r.clock.at(ms(7500)), "the first renew");
    let m = &mut r.node.m;
    for t in [r.clock.at(ms(1)), r.clock.at(ms(7499)), r.clock.at(ms(0))] {
        m.handle_timeout(t);
        assert!(m.poll_action().is_none());
        assert!(m.poll_timeout().unwrap() >= r.clock.at(ms(7499)));
    }
    // Time given out of order is taken as the latest seen.
    m.handle_timeout(r.clock.at(ms(7500)));
    assert!(matches!(
        m.poll_action(),
        Some(consul_lock_core::machine::Action::Send(_))
    ));
    m.handle_timeout(r.clock.at(ms(10)));
    assert!(m.poll_action().is_none());
    assert!(m.poll_timeout().unwrap() >= r.clock.at(ms(7500)));
}

/// Replies to requests the machine no longer waits for, twice, or never sent, are ignored.
#[test]
fn late_duplicate_and_unknown_replies_are_ignored() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    let create = r.answer("PUT /v1/session/create", reply::created("s1"));
    r.reply(create.id, reply::created("s-again"));
    r.reply(RequestId(999), yes());
    let read = r.answer("GET /v1/kv/k?!index", reply::missing(5));
    r.reply(read.id, reply::kv(6, &held_by("other")));
    let acquire = r.answer(&acquire_pattern("s1"), reply::locked(&held_by("s1")));
    r.reply(acquire.id, reply::lock_held());
    assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
    assert_eq!(r.m().session().id().map(SessionId::as_str), Some("s1"));
    r.reply(acquire.id, reply::lock_held());
    r.reply(read.id, reply::missing(9));
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Held);
}

/// The session is invalidated (renew 404) while the release is in flight: the unlock still ends,
/// with Released, and the machine comes to rest.
#[test]
fn unlock_while_the_session_is_invalidated() {
    for released in [true, false] {
        let mut r = Rig::new(options());
        r.acquire("s1", 1);
        r.advance(ms(7500));
        let renew = r.expect("PUT /v1/session/renew/s1");
        r.unlock().unwrap();
        let release = r.expect(&release_pattern("s1"));
        r.reply(renew.id, reply::session_gone("s1"));
        assert!(r.events().is_empty());
        r.reply(release.id, if released { yes() } else { reply::no() });
        r.run(secs(30), |s, _| match s.kind() {
            Kind::Destroy(_) => Some(yes()),
            _ => None,
        });
        assert_eq!(r.events(), [LockEvent::Released]);
        assert!(r.m().is_quiescent());
    }
}

/// The renew deadline passes while the release is in flight, and the release is never
/// answered: the unlock still ends, reporting the release unconfirmed rather than done.
#[test]
fn unlock_while_the_renew_deadline_passes() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.advance(ms(14_000));
    r.unlock().unwrap();
    r.run(secs(60), |s, _| match s.kind() {
        Kind::Destroy(_) => Some(yes()),
        _ => None,
    });
    assert!(
        matches!(
            &r.events()[..],
            [LockEvent::ReleaseFailed(LockError::ReleaseUnconfirmed { attempts, .. })] if *attempts >= 2
        ),
        "the release was tried again, then reported unconfirmed"
    );
    assert!(r.m().is_quiescent());
}

/// With the caller's session: an acquire abandoned by cancel is answered only after a new
/// attempt took the key. The old grant must not release the new hold.
#[test]
fn a_stray_grant_does_not_release_a_later_hold() {
    let mut r = Rig::new(existing("mine"));
    r.lock().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let stray = r.expect(&acquire_pattern("mine"));
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.lock().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    r.answer(&acquire_pattern("mine"), reply::locked(&held_by("mine")));
    assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
    r.reply(stray.id, reply::locked(&held_by("mine")));
    assert!(
        r.last_sent("PUT /v1/kv/k?release=mine").is_none(),
        "released the key the new attempt holds"
    );
    assert_eq!(r.m().status(), LockStatus::Held);
    assert_eq!(r.m().in_flight(), 1, "only the monitor is out");
}

/// A lock transaction answered with our session on another key's entry is no hold of this lock
/// (found by the lock_machine fuzz target: the token took that entry's indices).
#[test]
fn a_grant_showing_another_key_is_not_a_hold() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let mut elsewhere = held_by("s1").modified(40);
    elsewhere.key = "elsewhere".to_owned();
    r.answer(&acquire_pattern("s1"), reply::locked(&elsewhere));
    assert!(
        matches!(&r.events()[..], [LockEvent::Retrying(retry)] if retry.cause.contains("another entry")),
        "reported as a retry"
    );
    assert_eq!(r.m().status(), LockStatus::Acquiring);
    assert_eq!(r.m().token(), None);
}

/// Agents that contradict themselves without any blocking read (a caching proxy in front of
/// Consul, say) can't make the waiter spin either.
#[test]
fn pacing_against_contradictory_agents() {
    type Agent = fn(&Sent) -> Reply;
    let agents: Vec<(&str, Agent)> = vec![
        ("grants, but answers with someone else's entry", |s| {
            match s.kind() {
                Kind::LockTxn { .. } => reply::locked(&held_by("other")),
                _ => reply::kv(10, &entry().free().modified(10)),
            }
        }),
        ("refuses, while the key shows us", |s| match s.kind() {
            Kind::LockTxn { .. } => reply::lock_held(),
            Kind::Get { index: None, .. } if !s.has("consistent") => {
                reply::kv(10, &held_by("s1").modified(10))
            }
            _ => reply::kv(10, &held_by("s1").modified(10)),
        }),
    ];
    for (name, agent) in agents {
        let mut r = Rig::new(options());
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        let n = requests_in_ten_seconds(&mut r, agent);
        assert!(n <= 30, "{name}: {n} requests in 10 s");
    }
}
