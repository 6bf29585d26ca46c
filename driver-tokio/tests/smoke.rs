//! Smoke test of the tokio driver against a real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use consul_lock_testkit::agent::require_agent;
use consul_lock_tokio::{Client, Error, Misuse};

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
        Err(Error::Misuse(Misuse::AlreadyHeld))
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

fn sessions_named(agent: &consul_lock_testkit::ConsulAgent, name: &str) -> usize {
    let http = consul_lock_testkit::TestTransport::new().unwrap();
    let request = http::Request::get(format!("{}/v1/session/list", agent.base_url()))
        .body(Vec::new())
        .unwrap();
    let reply = http.exchange(request).unwrap();
    let sessions: Vec<serde_json::Value> = serde_json::from_slice(reply.body()).unwrap();
    sessions.iter().filter(|s| s["Name"] == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_until_the_cancelled_attempts_session_is_gone() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/smoke/close/.lock";
    let holder = client.lock_key(key).unwrap();
    let held = holder.acquire().await.unwrap();

    let mut options = consul_lock_tokio::LockOptions::new(key).unwrap();
    if let Some(s) = options.hold.session_options_mut() {
        s.name = "close-test waiter".into();
    }
    // Behind a slow link, so that the background destroy is still on its way when we look.
    let proxy = consul_lock_testkit::proxy::FaultProxy::start(agent.addr()).unwrap();
    proxy.set_latency(Duration::from_millis(300));
    let slow = Client::new(proxy.config()).unwrap();
    let waiter = slow.lock(options).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), waiter.acquire())
            .await
            .is_err()
    );
    let before = tokio::task::spawn_blocking(move || sessions_named(agent, "close-test waiter"))
        .await
        .unwrap();
    assert_eq!(
        before, 1,
        "the cancelled waiter's session is still there, its destroy on the way"
    );
    tokio::time::timeout(Duration::from_secs(5), waiter.close())
        .await
        .unwrap();
    let after = tokio::task::spawn_blocking(move || sessions_named(agent, "close-test waiter"))
        .await
        .unwrap();
    assert_eq!(after, 0, "close returned before the session was destroyed");
    held.release().await.unwrap();
    holder.close().await;
}
