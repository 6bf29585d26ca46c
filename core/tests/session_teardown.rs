//! A session destroy that fails is retried in the background until the session must have expired
//! on the server, without holding up the user's unlock or cancel, and without holding up a new
//! attempt (found by the driver tests: a cancel behind a refusing proxy left its session, and a
//! key it may hold, until the TTL ran out twice).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, LOCK_FLAG_VALUE, LockEvent, LockMachine, LockOptions, Reply, Transmit,
};

fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    Ok(b.body(body.as_bytes().to_vec()).unwrap())
}

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

fn take(sent: &mut Vec<Transmit>, path: &str) -> Transmit {
    let i = sent
        .iter()
        .position(|t| t.request.uri().path() == path)
        .unwrap_or_else(|| panic!("no request to {path} in {sent:?}"));
    sent.remove(i)
}

/// A machine holding key `k` with session `s1` (TTL 15 s), at `t0`.
fn held(t0: Instant) -> LockMachine {
    let mut m = LockMachine::new(ClientConfig::default(), LockOptions::new("k").unwrap()).unwrap();
    m.lock(t0).unwrap();
    let (mut sent, _) = drain(&mut m);
    let create = take(&mut sent, "/v1/session/create");
    m.handle_response(t0, create.id, reply(200, &[], r#"{"ID":"s1"}"#));
    let (mut sent, _) = drain(&mut m);
    let read = take(&mut sent, "/v1/kv/k");
    m.handle_response(t0, read.id, reply(404, &[("X-Consul-Index", "5")], ""));
    let (mut sent, _) = drain(&mut m);
    let acquire = take(&mut sent, "/v1/txn");
    let locked = format!(
        r#"{{"Results":[{{"KV":{{"Key":"k","LockIndex":1,"Flags":{LOCK_FLAG_VALUE},"Value":null,"Session":"s1","CreateIndex":5,"ModifyIndex":6}}}}],"Errors":null}}"#
    );
    m.handle_response(t0, acquire.id, reply(200, &[], &locked));
    let (_, events) = drain(&mut m);
    assert!(matches!(events[..], [LockEvent::Acquired(_)]), "{events:?}");
    m
}

/// Unlocks at `t`: the release succeeds; gives the destroy request.
fn unlock(m: &mut LockMachine, t: Instant) -> Transmit {
    m.unlock(t).unwrap();
    let (mut sent, _) = drain(m);
    let release = take(&mut sent, "/v1/kv/k");
    m.handle_response(t, release.id, reply(200, &[], "true"));
    let (mut sent, events) = drain(m);
    assert!(events.is_empty(), "{events:?}");
    take(&mut sent, "/v1/session/destroy/s1")
}

#[test]
fn a_failed_destroy_is_retried_without_holding_up_the_unlock() {
    let t0 = Instant::now();
    let mut m = held(t0);
    let destroy = unlock(&mut m, t0);
    m.handle_response(t0, destroy.id, reply(500, &[], "rpc error: timeout"));
    let (sent, events) = drain(&mut m);
    assert_eq!(events, [LockEvent::Released], "the unlock finishes at once");
    assert!(sent.is_empty());
    assert!(!m.is_quiescent(), "the destroy is still to be done");
    let retry_at = m.poll_timeout().unwrap();
    assert!(
        retry_at > t0 && retry_at <= t0 + Duration::from_secs(5),
        "{:?}",
        retry_at - t0
    );

    m.handle_timeout(retry_at);
    let (mut sent, events) = drain(&mut m);
    assert!(events.is_empty(), "Released is not repeated: {events:?}");
    let again = take(&mut sent, "/v1/session/destroy/s1");
    m.handle_response(retry_at, again.id, reply(200, &[], "true"));
    assert_eq!(drain(&mut m).1, []);
    assert!(m.is_quiescent());
}

#[test]
fn destroy_retries_stop_once_the_session_must_have_expired() {
    let t0 = Instant::now();
    let mut m = held(t0);
    let mut destroy = unlock(&mut m, t0);
    let mut now = t0;
    let mut attempts = 1;
    loop {
        m.handle_response(
            now,
            destroy.id,
            Err(consul_lock_core::machine::TransportError::new(
                consul_lock_core::machine::TransportErrorKind::Connect,
                "connection refused",
            )),
        );
        let _ = drain(&mut m);
        let Some(next) = m.poll_timeout() else { break };
        now = next;
        m.handle_timeout(now);
        let (mut sent, _) = drain(&mut m);
        destroy = take(&mut sent, "/v1/session/destroy/s1");
        attempts += 1;
        assert!(attempts < 100, "retries must stop");
    }
    assert!(m.is_quiescent());
    // request timeout (10 s) + 2 × TTL (15 s): by then the server dropped the session itself.
    let gave_up_after = now - t0;
    assert!(gave_up_after <= Duration::from_secs(40), "{gave_up_after:?}");
    assert!(gave_up_after >= Duration::from_secs(30), "{gave_up_after:?}");
    assert!(
        (5..=20).contains(&attempts),
        "{attempts} attempts: backoff, not a storm"
    );
}

#[test]
fn a_new_attempt_does_not_wait_for_the_old_sessions_teardown() {
    let t0 = Instant::now();
    let mut m = held(t0);
    let destroy = unlock(&mut m, t0);
    m.handle_response(t0, destroy.id, reply(503, &[], "unavailable"));
    assert_eq!(drain(&mut m).1, [LockEvent::Released]);
    m.lock(t0).unwrap();
    let (mut sent, _) = drain(&mut m);
    take(&mut sent, "/v1/session/create");
}
