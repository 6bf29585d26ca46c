//! The client's connection budget on a real agent at Consul's default limits
//! (`http_max_conns_per_client = 200`): many locks on one client all held with none lost, the
//! connections within the budget, renewals going on while blocking reads take turns, an
//! operator's delete still seen, and every place in the budget given back by requests dropped
//! mid-flight.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, KvDelete};
use consul_lock_testkit::agent::{ConsulAgent, require_new_agent};
use consul_lock_testkit::procfs;
use consul_lock_tokio::{Client, ClientConfig, ConnectionBudget, LockGuard, LockOptions, LossReason};

/// The shortest session TTL Consul accepts: two of them pass in the hold window.
const TTL: Duration = Duration::from_secs(10);

fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    options.hold.session_options_mut().unwrap().ttl = TTL;
    options
}

/// Holds `n` locks on `client` (all acquired at once), then watches them for two TTLs and a
/// bit, sampling the process's connections to the agent; answers the guards and the most
/// connections seen. Fails the test if any lock is lost meanwhile, with the reasons.
async fn hold_many(agent: &ConsulAgent, client: &Client, prefix: &str, n: usize) -> (Vec<LockGuard>, usize) {
    let locks: Vec<_> = (0..n)
        .map(|i| client.lock(options(&format!("{prefix}/{i}"))).unwrap())
        .collect();
    let guards = futures_util::future::join_all(locks.iter().map(|lock| lock.acquire())).await;
    let guards: Vec<LockGuard> = guards
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every lock acquired");
    // The locks' tasks outlive their handles while a guard lives.
    drop(locks);
    let port = agent.addr().port();
    let mut most = 0;
    let budget = client.budget().connections();
    let window_end = Instant::now() + 2 * TTL + Duration::from_secs(1);
    while Instant::now() < window_end {
        most = most.max(procfs::connections_to(std::process::id(), port).unwrap());
        let in_flight = client.requests_in_flight();
        assert!(
            in_flight <= budget,
            "{in_flight} requests in flight, budget {budget}"
        );
        let lost: Vec<(usize, LossReason)> = guards
            .iter()
            .enumerate()
            .filter_map(|(i, g)| match g.watch().end() {
                Some(consul_lock_tokio::HoldEnd::Lost(reason)) => Some((i, reason)),
                _ => None,
            })
            .collect();
        assert!(
            lost.is_empty(),
            "{} of {n} locks lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(3)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(guards.iter().all(LockGuard::is_held));
    (guards, most)
}

/// 300 locks on one client held at once used to lose every lock in waves at the agent's default
/// limits (renewals found no connection past the parked monitor reads). Within the default
/// budget all are held for two TTLs, none lost, on no more connections than the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_locks_on_one_client_at_the_default_limits_are_all_held_and_none_is_lost() {
    let Some(agent) = require_new_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let (guards, most) = hold_many(&agent, &client, "budget/many", 300).await;
    // Requests in flight never exceed the budget (checked in `hold_many`); connections may, by
    // the spares hyper opens when a request starts just as another's connection is on its way
    // back to the pool (pooled, at most one budget's worth idle): see ARCHITECTURE.md, Drivers.
    let budget = client.budget().connections();
    eprintln!("at most {most} connections (budget {budget})");
    assert!(most <= 2 * budget, "{most} connections, budget {budget}");
    drop(guards);
    let started = Instant::now();
    client.shutdown(Duration::from_secs(60)).await.unwrap();
    eprintln!("shutdown took {:?}", started.elapsed());
}

/// With a budget of 4 (2 for blocking reads), 8 held locks' monitors take turns on 2
/// connections: the renewals, on the reserve, keep every lock alive for two TTLs; no more than
/// 4 requests are ever in flight; and an operator deleting the held keys is still reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_blocking_share_full_renewals_go_on_and_deleted_keys_are_still_reported() {
    let Some(agent) = require_new_agent() else { return };
    let budget = ConnectionBudget::new(4, 2).unwrap();
    let client = Client::with_budget(agent.config().unwrap(), budget).unwrap();
    let (mut guards, most) = hold_many(&agent, &client, "budget/turns", 8).await;
    eprintln!("at most {most} connections (budget 4)");
    assert!(most <= 2 * 4, "{most} connections, budget 4");
    // An operator deletes every key. At most two monitors are parked on the agent when that
    // happens; the others see the delete on their next turn (their reads carry the index they
    // last saw, so a change made between turns is not missed).
    let started = Instant::now();
    for i in 0..guards.len() {
        let key = Key::new(format!("budget/turns/{i}")).unwrap();
        client
            .call(&KvDelete { key }, Duration::from_secs(10))
            .await
            .unwrap();
    }
    for (i, guard) in guards.iter_mut().enumerate() {
        // A hang guard, not a timing assertion.
        let reason = tokio::time::timeout(Duration::from_secs(120), guard.lost())
            .await
            .unwrap_or_else(|_| panic!("the delete of key {i} is reported"))
            .unwrap();
        assert_eq!(reason, LossReason::KeyDeleted, "lock {i}");
    }
    eprintln!("every delete reported after {:?}", started.elapsed());
    drop(guards);
    client.shutdown(Duration::from_secs(30)).await.unwrap();
}

/// Requests dropped mid-flight (here: the runtime running the locks goes away while their
/// session creates hang and more wait for room) give their places in the budget back.
#[test]
fn requests_dropped_mid_flight_give_their_places_back() {
    // An agent that takes connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = ClientConfig::http(&listener.local_addr().unwrap().to_string()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _entered = runtime.enter();
        Client::with_budget(config, ConnectionBudget::new(3, 1).unwrap()).unwrap()
    };
    let acquiring = client.clone();
    runtime.block_on(async move {
        let locks: Vec<_> = (0..10)
            .map(|i| acquiring.lock(options(&format!("budget/dropped/{i}"))).unwrap())
            .collect();
        let pending: Vec<_> = locks
            .into_iter()
            .map(|lock| tokio::spawn(async move { lock.acquire().await.map(drop) }))
            .collect();
        // The three places fill up with hanging session creates; seven more wait for room.
        while acquiring.requests_in_flight() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Mid-flight: the acquire futures are dropped (and with the runtime, the locks' tasks).
        for task in pending {
            task.abort();
        }
    });
    assert_eq!(client.requests_in_flight(), 3);
    drop(runtime);
    assert_eq!(client.requests_in_flight(), 0);
    drop(listener);
}
