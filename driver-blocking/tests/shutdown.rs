//! Ending a blocking client cleanly: `Client::shutdown`, and the drop of its last handle, free
//! the keys and destroy the sessions before they return. Real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_blocking::{Client, Error, HoldEnd, ShutdownError};
use consul_lock_core::api::{ClientConfig, Key, KvGet, KvPair, SessionId, SessionInfo};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Mode};

/// The agent's KV entry at `key`, read directly.
fn kv(config: &ClientConfig, key: &str) -> Option<KvPair> {
    let read = KvGet::new(Key::new(key).unwrap());
    TestTransport::new()
        .unwrap()
        .call(config, &read)
        .unwrap()
        .unwrap()
        .value
}

/// Whether the agent still knows `session`.
fn session_alive(config: &ClientConfig, session: &SessionId) -> bool {
    let read = SessionInfo::new(session.clone());
    TestTransport::new()
        .unwrap()
        .call(config, &read)
        .unwrap()
        .unwrap()
        .value
        .is_some()
}

#[test]
fn shutdown_frees_a_held_lock_and_a_semaphore_slot_whose_guards_are_alive() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let client = Client::new(config.clone()).unwrap();
    let key = "blocking/shutdown/held/.lock";
    let prefix = "blocking/shutdown/slots";
    let lock = client.lock_key(key).unwrap();
    let semaphore = client.semaphore_prefix(prefix, 2).unwrap();
    let guard = lock.acquire().unwrap();
    let slot = semaphore.acquire().unwrap();
    let mut watch = guard.watch();

    client.shutdown(Duration::from_secs(30)).unwrap();

    // Checked at once, with no waiting: shutdown returned only after the cleanup was done.
    assert_eq!(
        kv(&config, key).and_then(|pair| pair.session),
        None,
        "the lock key is free"
    );
    assert!(
        !session_alive(&config, &guard.token().session),
        "the lock's session is gone"
    );
    let contender = format!("{prefix}/{}", slot.token().session.as_str());
    assert_eq!(kv(&config, &contender), None, "the slot's contender key is gone");
    assert!(
        !session_alive(&config, &slot.token().session),
        "the slot's session is gone"
    );

    assert_eq!(watch.wait(None).unwrap(), Some(HoldEnd::Released));
    assert!(!guard.is_held());
    drop(guard);
    assert!(matches!(slot.release(), Ok(()) | Err(Error::DriverStopped)));
    assert!(matches!(lock.acquire(), Err(Error::DriverStopped)));
}

#[test]
fn dropping_the_last_handle_releases_before_it_returns() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let key = "blocking/shutdown/dropped/.lock";
    let client = Client::new(config.clone()).unwrap();
    let lock = client.lock_key(key).unwrap();
    let guard = lock.acquire().unwrap();
    let session = guard.token().session.clone();
    // As at the end of `main`: the guard, then the lock, then the client go.
    drop(guard);
    drop(lock);
    drop(client);
    assert_eq!(
        kv(&config, key).and_then(|pair| pair.session),
        None,
        "the lock key is free"
    );
    assert!(!session_alive(&config, &session), "the lock's session is gone");
}

#[test]
fn shutdown_with_the_agent_unreachable_reports_what_did_not_finish() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let key = "blocking/shutdown/unreachable/.lock";
    let lock = client.lock_key(key).unwrap();
    let _guard = lock.acquire().unwrap();
    // The agent's port closes: the release can't go out.
    proxy.set_mode(Mode::Refuse);
    match client.shutdown(Duration::from_millis(500)) {
        Err(ShutdownError::Unfinished { unfinished }) => assert_eq!(unfinished, vec![key.to_owned()]),
        other => panic!("expected Unfinished, got {other:?}"),
    }
    proxy.set_mode(Mode::Pass);
    client.shutdown(Duration::from_secs(60)).unwrap();
    assert_eq!(
        kv(&agent.config().unwrap(), key).and_then(|pair| pair.session),
        None
    );
}
