//! `Client::shutdown`: every lock and semaphore the client made ends, its key or slot freed and
//! its session destroyed before it returns, guards alive or not; an agent that can't be reached
//! gets a typed "not finished" within the timeout. Real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Wire;
use consul_lock_core::api::{SessionId, SessionInfo};
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Mode};
use consul_lock_tokio::{Client, Error, HoldEnd, ShutdownError};

async fn session_alive(wire: &Wire, session: &SessionId) -> bool {
    wire.call(SessionInfo::new(session.clone()))
        .await
        .expect("a session read")
        .value
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_frees_a_held_lock_and_a_semaphore_slot_whose_guards_are_alive() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let wire = Wire::new(config.clone());
    let client = Client::new(config).unwrap();
    let key = "tokio/shutdown/held/.lock";
    let prefix = "tokio/shutdown/slots";
    let lock = client.lock_key(key).unwrap();
    let semaphore = client.semaphore_prefix(prefix, 2).unwrap();
    let guard = lock.acquire().await.unwrap();
    let slot = semaphore.acquire().await.unwrap();
    // A lock whose handle is gone already: its cleanup is in the background, waited for too.
    let dropped = client.lock_key("tokio/shutdown/dropped/.lock").unwrap();
    let dropped_guard = dropped.acquire().await.unwrap();
    let dropped_session = dropped_guard.token().session.clone();
    drop(dropped_guard);
    drop(dropped);
    let mut watch = guard.watch();

    // A clone shares the registry: shutting it down ends what the original made.
    client.clone().shutdown(Duration::from_secs(30)).await.unwrap();

    // Checked at once, with no waiting: shutdown returned only after the cleanup was done.
    assert_eq!(
        wire.get(key).await.and_then(|pair| pair.session),
        None,
        "the lock key is free"
    );
    assert!(
        !session_alive(&wire, &guard.token().session).await,
        "the lock's session is gone"
    );
    let contender = format!("{prefix}/{}", slot.token().session.as_str());
    assert_eq!(
        wire.get(&contender).await,
        None,
        "the slot's contender key is gone"
    );
    assert!(
        !session_alive(&wire, &slot.token().session).await,
        "the slot's session is gone"
    );
    assert!(
        !session_alive(&wire, &dropped_session).await,
        "the dropped lock's session is gone"
    );
    assert_eq!(
        wire.get("tokio/shutdown/dropped/.lock")
            .await
            .and_then(|pair| pair.session),
        None
    );

    // The guards learn that their hold ended; dropping one and releasing the other is harmless.
    assert!(!guard.is_held());
    assert_eq!(watch.ended().await.unwrap(), HoldEnd::Released);
    drop(guard);
    assert!(matches!(slot.release().await, Ok(()) | Err(Error::DriverStopped)));
    assert!(matches!(lock.acquire().await, Err(Error::DriverStopped)));
    // Nothing left: a second shutdown has nothing to wait for.
    client.shutdown(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_agent_unreachable_reports_what_did_not_finish() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let key = "tokio/shutdown/unreachable/.lock";
    let lock = client.lock_key(key).unwrap();
    let guard = lock.acquire().await.unwrap();
    // The agent's port closes: the release can't go out.
    proxy.set_mode(Mode::Refuse);

    // Not a timed assertion: a bound on a hang, far above the shutdown's own timeout.
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        client.shutdown(Duration::from_millis(500)),
    )
    .await
    .expect("shutdown returns by its timeout");
    match answer {
        Err(ShutdownError::Unfinished { unfinished }) => assert_eq!(unfinished, vec![key.to_owned()]),
        other => panic!("expected Unfinished, got {other:?}"),
    }

    // The agent comes back: the lock, still cleaning up in the background, finishes, and a
    // second shutdown waits for it.
    proxy.set_mode(Mode::Pass);
    client.shutdown(Duration::from_secs(60)).await.unwrap();
    let wire = Wire::new(agent.config().unwrap());
    assert_eq!(wire.get(key).await.and_then(|pair| pair.session), None);
    assert!(!session_alive(&wire, &guard.token().session).await);
}
