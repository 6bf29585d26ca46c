//! Leader election in the core: the lock's proclaim (a write that checks the hold) and the
//! observer machine (who leads, every change in order), driven by hand with Consul's replies.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, LockError, LockEvent, LossReason, Misuse, Observation, ObserveEvent, ObserveOptions,
    ObserverMachine, Reply, RequestId, SemaphoreMachine, SemaphoreOptions, Transmit,
};
use support::reply::{self, yes};
use support::{Rig, entry, ms, options, secs};

// ----- proclaim -------------------------------------------------------------------------------

/// The proclaim transaction: `check-session` then `lock` by the holding session, with the value.
fn proclaim_ops(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[test]
fn proclaim_is_a_checked_lock_by_the_holding_session_and_keeps_the_token() {
    let mut r = Rig::new(options());
    assert_eq!(r.node.proclaim(r.now(), b"x".to_vec()), Err(Misuse::NotHeld));
    let token = r.acquire("s1", 3);
    r.node.proclaim(r.now(), b"10.0.0.2:80".to_vec()).unwrap();
    // One at a time: the first one's answer decides.
    assert_eq!(r.node.proclaim(r.now(), b"y".to_vec()), Err(Misuse::Busy));
    let sent = r.expect("PUT /v1/txn");
    let ops = proclaim_ops(&sent.body);
    assert_eq!(ops[0]["KV"]["Verb"], "check-session");
    assert_eq!(ops[0]["KV"]["Session"], "s1");
    assert_eq!(ops[1]["KV"]["Verb"], "lock");
    assert_eq!(ops[1]["KV"]["Session"], "s1");
    assert_eq!(ops[1]["KV"]["Value"], "MTAuMC4wLjI6ODA=");
    // Consul answers both entries; the lock's keeps LockIndex (seen on 1.8.7).
    let check = entry().held_by("s1", 3).modified(6).json();
    let written = entry().held_by("s1", 3).modified(9).json();
    let body = serde_json::json!({ "Results": [{ "KV": check }, { "KV": written }], "Errors": null });
    r.reply(sent.id, reply::raw(200, None, None, body.to_string()));
    assert_eq!(r.events(), vec![LockEvent::Proclaimed { modify_index: 9 }]);
    assert_eq!(r.m().token(), Some(&token), "the fencing token does not change");
    // Free to proclaim again.
    r.node.proclaim(r.now(), b"z".to_vec()).unwrap();
}

#[test]
fn a_proclaim_that_finds_the_key_not_ours_loses_the_lock_at_once() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.node.proclaim(r.now(), b"v".to_vec()).unwrap();
    r.answer(
        "PUT /v1/txn",
        reply::lock_refused(r#"failed session check for key "k", current session "" != "s1""#),
    );
    assert_eq!(
        r.events(),
        vec![
            LockEvent::ProclaimFailed(LockError::NotHeld),
            LockEvent::Lost(LossReason::NotHeld)
        ]
    );
}

#[test]
fn a_proclaim_that_got_no_answer_fails_and_the_hold_goes_on() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.node.proclaim(r.now(), b"v".to_vec()).unwrap();
    r.answer("PUT /v1/txn", reply::no_leader());
    let events = r.events();
    assert!(
        matches!(
            &events[..],
            [LockEvent::ProclaimFailed(LockError::Unavailable(_))]
        ),
        "{events:?}"
    );
    assert!(r.m().token().is_some(), "a transient failure is no loss");
}

#[test]
fn a_hold_that_ends_with_a_proclaim_in_flight_reports_it_failed_before_the_end() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.node.proclaim(r.now(), b"v".to_vec()).unwrap();
    r.unlock().unwrap();
    assert_eq!(r.events(), vec![LockEvent::ProclaimFailed(LockError::NotHeld)]);
    // The proclaim's late answer is nobody's business now.
    let sent = r.expect("PUT /v1/txn");
    r.reply(sent.id, reply::lock_refused("failed session check"));
    assert_eq!(r.events(), vec![]);
    r.answer("PUT /v1/kv/k?release=s1", yes());
}

#[test]
fn a_semaphore_has_nothing_to_proclaim() {
    let options = SemaphoreOptions::new("p", 2).unwrap();
    let mut m = SemaphoreMachine::new(ClientConfig::default(), options).unwrap();
    assert_eq!(m.proclaim(Instant::now(), b"v".to_vec()), Err(Misuse::NotALock));
}

// ----- the observer ------------------------------------------------------------------------

/// An observer driven by hand: what it sent and reported.
struct Watcher {
    m: ObserverMachine,
    now: Instant,
    sent: Vec<Transmit>,
    events: Vec<ObserveEvent>,
}

impl Watcher {
    fn new() -> Watcher {
        Watcher::with(ObserveOptions::new("k").unwrap())
    }

    fn with(options: ObserveOptions) -> Watcher {
        let now = Instant::now();
        let m = ObserverMachine::new(ClientConfig::default(), options, now).unwrap();
        let mut w = Watcher {
            m,
            now,
            sent: Vec::new(),
            events: Vec::new(),
        };
        w.drain();
        w
    }

    fn drain(&mut self) {
        while let Some(action) = self.m.poll_action() {
            match action {
                Action::Send(t) => self.sent.push(t),
                Action::Event(e) => self.events.push(e),
            }
        }
        if let Some(t) = self.m.poll_timeout() {
            assert!(t >= self.now, "poll_timeout before now");
        }
    }

    /// The one request in flight (the last sent), as `path?query`.
    fn last(&self) -> (RequestId, String) {
        let t = self.sent.last().unwrap();
        let uri = t.request.uri();
        (t.id, format!("{}?{}", uri.path(), uri.query().unwrap_or("")))
    }

    fn reply(&mut self, reply: Reply) {
        let (id, _) = self.last();
        self.m.handle_response(self.now, id, reply);
        self.drain();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.m.handle_timeout(self.now);
        self.drain();
    }

    fn take(&mut self) -> Vec<ObserveEvent> {
        std::mem::take(&mut self.events)
    }

    /// Answers the pending session lookup of `id` with node `n`.
    fn info(&mut self, id: &str) {
        let (_, path) = self.last();
        assert!(path.starts_with(&format!("/v1/session/info/{id}")), "{path}");
        self.reply(reply::info(id, secs(15), 3));
    }
}

#[test]
fn reports_a_leader_with_its_session_then_its_values_then_no_leader_each_once() {
    let mut w = Watcher::new();
    let (_, first) = w.last();
    assert!(
        first.starts_with("/v1/kv/k?") && first.contains("consistent"),
        "{first}"
    );
    assert!(
        !first.contains("index="),
        "the first read is a plain one: {first}"
    );
    w.reply(reply::kv(6, &entry().held_by("s1", 1).value(b"a").modified(6)));
    assert!(
        w.take().is_empty(),
        "nothing before the holder's session is known"
    );
    w.info("s1");
    let [ObserveEvent::Leader(leader)] = &w.take()[..] else {
        panic!("{:?}", w.events)
    };
    assert_eq!(leader.session.as_str(), "s1");
    assert_eq!(leader.node.as_deref(), Some("n"));
    assert_eq!(leader.session_name.as_deref(), Some("Consul API Lock"));
    assert_eq!(
        (leader.value.as_slice(), leader.lock_index, leader.sequence),
        (&b"a"[..], 1, 6)
    );
    assert_eq!(w.m.leader(), Some(leader));
    let since = leader.since;
    // The next read blocks on the index.
    let (_, next) = w.last();
    assert!(next.contains("index=6"), "{next}");
    // A proclaim: the same leader, a new value; no lookup.
    w.advance(secs(1));
    w.reply(reply::kv(7, &entry().held_by("s1", 1).value(b"b").modified(7)));
    let [ObserveEvent::Value(l)] = &w.take()[..] else {
        panic!("{:?}", w.events)
    };
    assert_eq!((l.value.as_slice(), l.sequence, l.since), (&b"b"[..], 6, since));
    // The index moved, the key did not change: nothing to say.
    w.advance(secs(1));
    w.reply(reply::kv(8, &entry().held_by("s1", 1).value(b"b").modified(7)));
    assert!(w.take().is_empty());
    w.reply(reply::kv(9, &entry().free().modified(9)));
    assert!(matches!(&w.take()[..], [ObserveEvent::NoLeader { .. }]));
    assert!(matches!(w.m.current(), Some(Observation::NoLeader { .. })));
    w.advance(secs(1));
    w.reply(reply::missing(10));
    assert!(w.take().is_empty(), "free, then gone: still no leader");
}

#[test]
fn no_read_goes_out_while_a_new_holder_is_looked_up() {
    let mut w = Watcher::new();
    w.reply(reply::kv(6, &entry().held_by("s1", 1).modified(6)));
    let sent = w.sent.len();
    w.advance(secs(5));
    assert_eq!(
        w.sent.len(),
        sent,
        "a read went out before the lookup was answered"
    );
    assert_eq!(w.m.in_flight(), 1);
    // A lookup that fails still reports the leader, without its session's details.
    w.reply(reply::status(500, "rpc error"));
    let [ObserveEvent::Leader(l)] = &w.take()[..] else {
        panic!("{:?}", w.events)
    };
    assert_eq!((l.node.clone(), l.session_name.clone()), (None, None));
    assert!(w.last().1.contains("index=6"));
}

#[test]
fn a_new_session_or_a_new_term_of_the_same_one_is_a_new_leader() {
    let mut w = Watcher::new();
    w.reply(reply::kv(6, &entry().held_by("s1", 1).modified(6)));
    w.info("s1");
    w.reply(reply::kv(8, &entry().held_by("s2", 2).modified(8)));
    w.info("s2");
    w.reply(reply::kv(12, &entry().held_by("s2", 3).modified(12)));
    w.info("s2");
    let sequences: Vec<(String, u64)> = w
        .take()
        .into_iter()
        .map(|e| match e {
            ObserveEvent::Leader(l) => (l.session.to_string(), l.sequence),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sequences,
        vec![("s1".into(), 6), ("s2".into(), 8), ("s2".into(), 12)]
    );
}

#[test]
fn indexes_that_go_backwards_reset_the_read_but_never_the_sequence() {
    let mut w = Watcher::new();
    w.reply(reply::kv(100, &entry().held_by("s1", 4).modified(100)));
    w.info("s1");
    w.take();
    // The agent restarted with its state lost: low indexes, another holder.
    w.advance(secs(1));
    w.reply(reply::kv(5, &entry().held_by("s9", 1).modified(4)));
    w.info("s9");
    let [ObserveEvent::Leader(l)] = &w.take()[..] else {
        panic!("{:?}", w.events)
    };
    assert_eq!(l.session.as_str(), "s9");
    assert_eq!(l.sequence, 101, "the sequence went backwards");
    let (_, next) = w.last();
    assert!(
        !next.contains("index="),
        "an index that went backwards is reset to 0: {next}"
    );
}

#[test]
fn failing_reads_are_reported_once_past_the_threshold_then_seeing_again() {
    let mut w = Watcher::new();
    w.reply(reply::missing(3));
    assert!(matches!(&w.take()[..], [ObserveEvent::NoLeader { .. }]));
    let seen_at = w.now;
    let mut reads = 0;
    while w.now < seen_at + secs(14) {
        w.advance(secs(1));
        w.reply(reply::refused());
        reads += 1;
    }
    assert!(reads > 10);
    let blind: Vec<_> = w.take();
    let [
        ObserveEvent::Blind {
            since, unseen_for, ..
        },
    ] = &blind[..]
    else {
        panic!("{blind:?}")
    };
    assert_eq!(*since, seen_at);
    assert!(
        *unseen_for >= secs(10) && *unseen_for < secs(12),
        "{unseen_for:?}"
    );
    // After an error the read starts again from index 0.
    assert!(!w.last().1.contains("index="));
    w.advance(secs(1));
    w.reply(reply::kv(20, &entry().held_by("s2", 1).modified(20)));
    w.info("s2");
    let events = w.take();
    assert!(
        matches!(&events[..], [ObserveEvent::Resumed { unseen_for }, ObserveEvent::Leader(_)] if *unseen_for >= secs(14)),
        "{events:?}"
    );
}

#[test]
fn short_failures_are_not_reported() {
    let mut w = Watcher::new();
    w.reply(reply::missing(3));
    w.take();
    w.advance(secs(1));
    w.reply(reply::no_leader());
    w.advance(secs(2));
    w.reply(reply::missing(4));
    assert!(w.take().is_empty());
}

#[test]
fn a_server_that_knows_no_leader_is_not_believed() {
    let mut w = Watcher::new();
    w.reply(reply::missing(3));
    w.take();
    w.reply(reply::kv_leader(
        5,
        Some(false),
        &entry().held_by("s1", 1).modified(5),
    ));
    assert!(w.take().is_empty());
    assert!(matches!(w.m.current(), Some(Observation::NoLeader { .. })));
}

#[test]
fn a_read_nobody_answers_times_out_at_its_deadline_and_is_sent_again() {
    let mut o = ObserveOptions::new("k").unwrap();
    o.wait = secs(15);
    let mut w = Watcher::with(o);
    w.reply(reply::missing(3));
    let sent = w.sent.len();
    let deadline = w.sent.last().unwrap().deadline;
    // wait + wait/16 + 5 s.
    assert_eq!(
        deadline - w.now,
        secs(15) + ms(937) + Duration::from_micros(500) + secs(5)
    );
    w.advance(deadline - w.now);
    assert_eq!(w.sent.len(), sent, "retried at once");
    w.advance(secs(1));
    assert_eq!(w.sent.len(), sent + 1);
    let events = w.take();
    assert!(
        matches!(
            &events[..],
            [ObserveEvent::NoLeader { .. }, ObserveEvent::Blind { .. }]
        ),
        "a read that hung past the threshold is blindness: {events:?}"
    );
}

#[test]
fn a_refusal_that_asking_again_cant_fix_ends_the_observation() {
    let mut w = Watcher::new();
    w.reply(reply::status(403, "Permission denied"));
    let events = w.take();
    assert!(
        matches!(
            &events[..],
            [ObserveEvent::Failed(LockError::PermissionDenied(_))]
        ),
        "{events:?}"
    );
    assert!(w.m.is_over());
    assert_eq!(w.m.poll_timeout(), None);
    let sent = w.sent.len();
    w.advance(secs(60));
    assert_eq!(w.sent.len(), sent);
}

#[test]
fn observer_options_are_checked() {
    let mut o = ObserveOptions::new("k").unwrap();
    o.wait = Duration::ZERO;
    assert!(ObserverMachine::new(ClientConfig::default(), o.clone(), Instant::now()).is_err());
    o.wait = secs(700);
    assert!(ObserverMachine::new(ClientConfig::default(), o.clone(), Instant::now()).is_err());
    o.wait = secs(10);
    o.retry_time = Duration::ZERO;
    assert!(ObserverMachine::new(ClientConfig::default(), o, Instant::now()).is_err());
    assert!(ObserveOptions::new("").is_err());
}
