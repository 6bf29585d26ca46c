//! Smoke test of the tokio driver against a real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use consul_lock_testkit::agent::require_agent;
use consul_lock_tokio::{Client, Error, LockError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release_and_handoff() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let a = client.lock_key("tokio/smoke/.lock").unwrap();
    let b = client.lock_key("tokio/smoke/.lock").unwrap();
    let guard = a.acquire().await.unwrap();
    assert!(guard.is_held());
    assert!(matches!(
        a.acquire().await,
        Err(Error::Lock(LockError::AlreadyHeld))
    ));
    let waiter = tokio::spawn(async move { b.acquire().await.map(|g| (g, b)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    let first = guard.token().clone();
    guard.release().await.unwrap();
    let (g2, _b) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(g2.token().lock_index > first.lock_index);
    drop(g2);
    // Dropped guard releases in the background; a can take it again.
    let g3 = tokio::time::timeout(Duration::from_secs(10), a.acquire())
        .await
        .unwrap()
        .unwrap();
    g3.release().await.unwrap();
}
