//! The LockMachine against a real agent, through the testkit's thread driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use consul_lock_core::api::{ClientConfig, Endpoint, Key, KvGet};
use consul_lock_core::machine::{LOCK_FLAG_VALUE, LockEvent, LockMachine, LockOptions, LockStatus};
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::{TestTransport, ThreadDriver};

fn machine(config: &ClientConfig, key: &str, value: &str) -> LockMachine {
    let mut options = LockOptions::new(key).unwrap();
    options.hold.value = value.as_bytes().to_vec();
    LockMachine::new(config.clone(), options).unwrap()
}

fn sessions(config: &ClientConfig, http: &TestTransport) -> Vec<serde_json::Value> {
    let request = http::Request::get(format!("{}/v1/session/list", config.base_url()))
        .body(Vec::new())
        .unwrap();
    let reply = http.exchange(request).unwrap();
    serde_json::from_slice::<Vec<serde_json::Value>>(reply.body()).unwrap()
}

fn sessions_named(config: &ClientConfig, http: &TestTransport, name: &str) -> usize {
    sessions(config, http)
        .iter()
        .filter(|s| s["Name"] == name)
        .count()
}

#[test]
fn lock_handoff_and_release_on_a_real_agent() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let http = TestTransport::new().unwrap();
    let key = "real/handoff/.lock";
    let mut a = machine(&config, key, "a");
    let mut b = machine(&config, key, "b");
    let mut da = ThreadDriver::new(http.clone());
    let mut db = ThreadDriver::new(http.clone());

    a.lock(Instant::now()).unwrap();
    let Some(LockEvent::Acquired(ta)) = da.run_until(&mut a, Duration::from_secs(20), |_| true) else {
        panic!("a: no lock: {:?}", da.events)
    };
    let pair = http
        .call(&config, &KvGet::new(Key::new(key).unwrap()))
        .unwrap()
        .unwrap()
        .value
        .unwrap();
    assert_eq!(pair.flags, LOCK_FLAG_VALUE);
    assert_eq!(pair.session.as_ref(), Some(&ta.session));
    assert_eq!(pair.lock_index, ta.lock_index);
    assert_eq!(pair.value, b"a");

    // b waits: nothing within a second.
    b.lock(Instant::now()).unwrap();
    assert_eq!(db.run_until(&mut b, Duration::from_secs(1), |_| true), None);
    assert_eq!(b.status(), LockStatus::Acquiring);

    // a releases; b, parked in its blocking read, takes over.
    let released_at = Instant::now();
    a.unlock(Instant::now()).unwrap();
    assert!(da.settle(&mut a, Duration::from_secs(10)));
    assert!(matches!(da.events.last(), Some((_, LockEvent::Released))));
    let Some(LockEvent::Acquired(tb)) = db.run_until(&mut b, Duration::from_secs(20), |_| true) else {
        panic!("b: no lock: {:?}", db.events)
    };
    let handoff = released_at.elapsed();
    assert!(
        tb.lock_index > ta.lock_index,
        "fencing tokens increase: {ta:?} then {tb:?}"
    );
    assert!(handoff < Duration::from_secs(5), "handoff took {handoff:?}");

    b.unlock(Instant::now()).unwrap();
    assert!(db.settle(&mut b, Duration::from_secs(10)));
    assert_eq!(
        sessions_named(&config, &http, "Consul API Lock"),
        0,
        "{:?}",
        sessions(&config, &http)
    );
    let pair = http
        .call(&config, &KvGet::new(Key::new(key).unwrap()))
        .unwrap()
        .unwrap()
        .value
        .unwrap();
    assert_eq!(pair.session, None);
    assert_eq!(pair.value, b"b", "the release writes the value");
}

#[test]
fn cancel_while_waiting_leaves_no_session() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let http = TestTransport::new().unwrap();
    let key = "real/cancel/.lock";
    let mut holder = machine(&config, key, "holder");
    let mut dh = ThreadDriver::new(http.clone());
    holder.lock(Instant::now()).unwrap();
    assert!(matches!(
        dh.run_until(&mut holder, Duration::from_secs(20), |_| true),
        Some(LockEvent::Acquired(_))
    ));

    let mut waiter = LockMachine::new(config.clone(), {
        let mut o = LockOptions::new(key).unwrap();
        if let Some(s) = o.hold.session_options_mut() {
            s.name = "cancel-test waiter".into();
        }
        o
    })
    .unwrap();
    let mut dw = ThreadDriver::new(http.clone());
    waiter.lock(Instant::now()).unwrap();
    assert_eq!(
        dw.run_until(&mut waiter, Duration::from_millis(500), |_| true),
        None
    );
    assert_eq!(sessions_named(&config, &http, "cancel-test waiter"), 1);
    let cancelled_at = Instant::now();
    waiter.cancel(Instant::now());
    assert!(matches!(
        waiter.poll_action(),
        Some(consul_lock_core::machine::Action::Event(LockEvent::Cancelled))
    ));
    assert!(cancelled_at.elapsed() < Duration::from_millis(5));
    assert!(dw.settle(&mut waiter, Duration::from_secs(10)));
    assert_eq!(sessions_named(&config, &http, "cancel-test waiter"), 0);

    holder.unlock(Instant::now()).unwrap();
    assert!(dh.settle(&mut holder, Duration::from_secs(10)));
}

#[test]
fn conflict_with_a_plain_key() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let http = TestTransport::new().unwrap();
    let key = Key::new("real/conflict/plain").unwrap();
    let put = consul_lock_core::api::KvCasPut {
        key: key.clone(),
        cas: 0,
        flags: 0,
        value: b"not a lock".to_vec(),
    };
    let request = put.encode(&config);
    assert!(consul_lock_core::api::KvCasPut::decode(&http.exchange(request).unwrap()).unwrap());
    let mut m = machine(&config, key.as_str(), "x");
    let mut d = ThreadDriver::new(http.clone());
    m.lock(Instant::now()).unwrap();
    let event = d.run_until(&mut m, Duration::from_secs(20), |_| true);
    assert!(
        matches!(
            event,
            Some(LockEvent::Failed(
                consul_lock_core::machine::LockError::Conflict { flags: 0 }
            ))
        ),
        "{event:?}"
    );
    assert!(d.settle(&mut m, Duration::from_secs(10)));
}
