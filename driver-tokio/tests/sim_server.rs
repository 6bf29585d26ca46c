//! The tokio driver against the testkit's simulated Consul served over HTTP, with the fault proxy
//! in front: no Consul binary needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_testkit::proxy::FaultProxy;
use consul_lock_testkit::sim::SimServer;
use consul_lock_tokio::{Client, LockOptions, LossReason};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_handoff_and_operator_destroy_on_the_served_simulator() {
    let server = SimServer::start(11).unwrap();
    let client = Client::new(server.config()).unwrap();
    let key = "sim/served/.lock";
    let a = client.lock_key(key).unwrap();
    let b = client.lock(LockOptions::new(key).unwrap()).unwrap();

    let guard = a.acquire().await.unwrap();
    let first = guard.token().clone();
    let waiter = tokio::spawn(async move { b.acquire().await.map(|g| (g, b)) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    guard.release().await.unwrap();
    let (mut second, _b) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(second.token().sequence() > first.sequence());

    // An operator destroys the holder's session: the monitor hears of it at once.
    let session = second.token().session.to_string();
    assert!(server.with_sim(|sim, now| sim.destroy_session(now, &session)));
    let lost = tokio::time::timeout(Duration::from_secs(5), second.lost())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(lost, LossReason::NotHeld | LossReason::SessionInvalidated),
        "{lost:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_500s_while_holding_do_not_lose_the_lock() {
    let server = SimServer::start(12).unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    proxy.set_latency(Duration::from_millis(5));
    let client = Client::new(proxy.config()).unwrap();
    let mut options = LockOptions::new("sim/served/500s/.lock").unwrap();
    options.hold.monitor_retry_time = Duration::from_millis(50);
    let lock = client.lock(options).unwrap();
    let mut guard = lock.acquire().await.unwrap();
    // Wait until the monitor's blocking read is parked, then fail the next reads.
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.fail_next_gets(5);
    // Rewrite the held key (same flags, session kept): the parked monitor read wakes, and its
    // next reads meet the injected 500s.
    server.with_sim(|sim, now| sim.put_key(now, "sim/served/500s/.lock", LOCK_FLAG_VALUE, b"poke"));
    let outcome = tokio::time::timeout(Duration::from_millis(1500), guard.lost()).await;
    assert!(outcome.is_err(), "the lock was lost: {outcome:?}");
    assert_eq!(proxy.counters().injected, 5, "the monitor met every injected 500");
    assert!(guard.is_held());
    guard.release().await.unwrap();
}
