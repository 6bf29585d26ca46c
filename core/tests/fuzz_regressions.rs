//! Findings of the fuzz targets (fuzz/, `bash scripts/fuzz.sh`), each as a minimal reproducer
//! written against the machine's public API. A test stays `#[ignore]`d, naming its finding, until
//! core is fixed; then the `ignore` goes and the test guards the fix.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, LOCK_FLAG_VALUE, LockEvent, LockMachine, LockOptions, LockStatus, LossReason, Reply, Transmit,
};

fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    Ok(b.body(body.as_bytes().to_vec()).unwrap())
}

/// Drains the machine's actions: the requests sent and the events.
fn drain(m: &mut LockMachine) -> (Vec<Transmit>, Vec<LockEvent>) {
    let (mut sent, mut events) = (Vec::new(), Vec::new());
    while let Some(action) = m.poll_action() {
        match action {
            Action::Send(t) => sent.push(t),
            Action::Event(e) => events.push(e),
        }
    }
    (sent, events)
}

/// The one request sent, whose path is `path`.
fn only(sent: Vec<Transmit>, path: &str) -> Transmit {
    assert_eq!(sent.len(), 1, "expected one request to {path}, got {sent:?}");
    let t = sent.into_iter().next().unwrap();
    assert_eq!(t.request.uri().path(), path, "{t:?}");
    t
}

/// A machine (session TTL 15 s, created at `t0`) holding key `k` with session `s1`.
fn held(t0: Instant) -> LockMachine {
    let mut m = LockMachine::new(ClientConfig::default(), LockOptions::new("k").unwrap()).unwrap();
    m.lock(t0).unwrap();
    let create = only(drain(&mut m).0, "/v1/session/create");
    m.handle_response(t0, create.id, reply(200, &[], r#"{"ID":"s1"}"#));
    let read = only(drain(&mut m).0, "/v1/kv/k");
    m.handle_response(t0, read.id, reply(404, &[("X-Consul-Index", "5")], ""));
    let acquire = only(drain(&mut m).0, "/v1/txn");
    let locked = format!(
        r#"{{"Results":[{{"KV":{{"Key":"k","LockIndex":1,"Flags":{LOCK_FLAG_VALUE},"Value":null,"Session":"s1","CreateIndex":5,"ModifyIndex":6}}}}],"Errors":null}}"#
    );
    m.handle_response(t0, acquire.id, reply(200, &[], &locked));
    let (_monitor, events) = drain(&mut m);
    assert!(matches!(events[..], [LockEvent::Acquired(_)]), "{events:?}");
    m
}

/// F1 (`lock_machine` target; fixed in core): a renew reply whose TTL is shorter than the
/// renew's round trip (here `1ns`; `0s` alike) moved the renew deadline into the past, yet the
/// machine stayed `Held` with its token until the next `handle_timeout` (due at once) reported
/// `Lost(RenewDeadline)`. In between, a caller asking `status()` or `token()` was told it held a
/// lock that, by the machine's own rule, it could no longer hold. Consul never answers a TTL under
/// 10 s, so it took a hostile or broken agent (or a reply handed over after the request's
/// deadline), but the renew deadline is the safety rule, and no reply may suspend it.
#[test]
fn a_renewed_ttl_shorter_than_the_round_trip_does_not_leave_the_lock_held_past_its_deadline() {
    let t0 = Instant::now();
    let mut m = held(t0);

    // The renew goes out at TTL/2 = 7.5 s.
    let t_renew = t0 + Duration::from_millis(7_500);
    m.handle_timeout(t_renew);
    let renew = only(drain(&mut m).0, "/v1/session/renew/s1");

    // Its reply comes 1 s later and says the TTL is 1 ns.
    let now = t_renew + Duration::from_secs(1);
    let entry = r#"[{"ID":"s1","Name":"Consul API Lock","Node":"n","LockDelay":15000000000,"Behavior":"release","TTL":"1ns","CreateIndex":1,"ModifyIndex":1}]"#;
    m.handle_response(now, renew.id, reply(200, &[], entry));
    let (_, events) = drain(&mut m);

    let deadline = m.session().renew_deadline();
    let still_held = m.status() == LockStatus::Held;
    assert!(
        !(still_held && deadline.is_some_and(|d| d <= now)),
        "held at {:?} past the renew deadline (token {:?}, events {events:?})",
        now - deadline.unwrap(),
        m.token()
    );
    if !still_held {
        assert!(
            matches!(events[..], [LockEvent::Lost(LossReason::RenewDeadline { .. })]),
            "{events:?}"
        );
    }
}

/// A renew's success with `ttl` for session `id`.
fn renewed(id: &str, ttl: &str) -> Reply {
    let entry = format!(
        r#"[{{"ID":"{id}","Name":"Consul API Lock","Node":"n","LockDelay":15000000000,"Behavior":"release","TTL":"{ttl}","CreateIndex":1,"ModifyIndex":1}}]"#
    );
    reply(200, &[], &entry)
}

/// F2 (`lock_machine` target's hostile session-info replies; fixed in core): the waiter took the
/// last holder's `LockDelay` from its session info as is, and paused until `freed_at + LockDelay`
/// before acquiring again. An info reply with `LockDelay: 18446744073709551615` (u64::MAX ns, 584
/// years) made it wait for centuries on a free key; nothing but a cancel got it going again.
/// Consul caps lock-delay at 60 s, so nothing longer can be in force: the wait is capped there.
#[test]
fn a_huge_lock_delay_in_the_holders_session_info_does_not_stall_the_waiter() {
    let t0 = Instant::now();
    let mut m = LockMachine::new(ClientConfig::default(), LockOptions::new("k").unwrap()).unwrap();
    m.lock(t0).unwrap();
    let create = only(drain(&mut m).0, "/v1/session/create");
    m.handle_response(t0, create.id, reply(200, &[], r#"{"ID":"s1"}"#));
    let read = only(drain(&mut m).0, "/v1/kv/k");
    let held_by_other = format!(
        r#"[{{"Key":"k","LockIndex":1,"Flags":{LOCK_FLAG_VALUE},"Value":null,"Session":"other","CreateIndex":5,"ModifyIndex":5}}]"#
    );
    m.handle_response(
        t0,
        read.id,
        reply(200, &[("X-Consul-Index", "5")], &held_by_other),
    );

    // The machine blocks on the key, and once the holder has held for a while asks for its
    // session (for its lock-delay).
    let wait = only(drain(&mut m).0, "/v1/kv/k");
    let asked = t0 + Duration::from_millis(100);
    m.handle_timeout(asked);
    let info = only(drain(&mut m).0, "/v1/session/info/other");
    let info_entry = r#"[{"ID":"other","Name":"x","Node":"n","LockDelay":18446744073709551615,"Behavior":"release","TTL":"15s","CreateIndex":4,"ModifyIndex":4}]"#;
    m.handle_response(asked, info.id, reply(200, &[("X-Consul-Index", "5")], info_entry));

    // One second later the key is free; the acquire is refused for the lock-delay.
    let freed = t0 + Duration::from_secs(1);
    let free = format!(
        r#"[{{"Key":"k","LockIndex":1,"Flags":{LOCK_FLAG_VALUE},"Value":null,"CreateIndex":5,"ModifyIndex":6}}]"#
    );
    m.handle_response(freed, wait.id, reply(200, &[("X-Consul-Index", "6")], &free));
    let acquire = only(drain(&mut m).0, "/v1/txn");
    let lock_delay =
        r#"{"Results":null,"Errors":[{"OpIndex":0,"What":"failed to lock key \"k\" due to lock delay"}]}"#;
    m.handle_response(freed, acquire.id, reply(409, &[], lock_delay));
    assert!(drain(&mut m).0.is_empty());

    // Serve the machine for 2 minutes (renewing its session): Consul's longest lock-delay is
    // 60 s, so it must try to acquire again within that.
    let end = freed + Duration::from_secs(120);
    let mut now = freed;
    let mut acquired_again = false;
    while now < end && !acquired_again {
        now = m.poll_timeout().map_or(end, |t| t.min(end)).max(now);
        m.handle_timeout(now);
        for t in drain(&mut m).0 {
            let path = t.request.uri().path().to_owned();
            if path == "/v1/session/renew/s1" {
                m.handle_response(now, t.id, renewed("s1", "15s"));
            } else if path == "/v1/txn" {
                acquired_again = true;
            }
        }
    }
    assert!(
        acquired_again,
        "no acquire in the 2 minutes after the key was freed; next timer in {:?}",
        m.poll_timeout().map(|t| t - now)
    );
}

/// F3 (`lock_machine` target's hostile renew replies; fixed in core): the machine adopted whatever
/// TTL a renew reply carried, e.g. `2562047h` (292 years): it then renewed every 146 years and its
/// renew deadline, the safety rule that bounds how long a holder can be wrong, was 292 years out.
/// Consul accepts TTLs of 10 s to 86400 s only, and a server that raises a TTL stays within that;
/// a larger figure can't be Consul's, and following it switched the deadline off (loss would then
/// be learnt from the monitor read alone).
#[test]
fn a_renewed_ttl_beyond_consuls_range_does_not_push_the_renew_deadline_out_by_centuries() {
    let t0 = Instant::now();
    let mut m = held(t0);
    let t_renew = t0 + Duration::from_millis(7_500);
    m.handle_timeout(t_renew);
    let renew = only(drain(&mut m).0, "/v1/session/renew/s1");
    let now = t_renew + Duration::from_millis(100);
    m.handle_response(now, renew.id, renewed("s1", "2562047h"));
    assert_eq!(m.status(), LockStatus::Held);
    let day = Duration::from_secs(86_400);
    assert!(
        m.session().ttl().is_some_and(|ttl| ttl <= day),
        "renewing by a TTL of {:?}",
        m.session().ttl()
    );
    assert!(
        m.session().renew_deadline().is_some_and(|d| d <= t_renew + day),
        "renew deadline {:?} from now",
        m.session().renew_deadline().map(|d| d - now)
    );
}
