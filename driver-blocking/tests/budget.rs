//! The blocking client's connection budget ([`Client::with_budget`]) on a real agent: more locks
//! held than its blocking share, on no more connections than the budget, their monitors taking
//! turns and still seeing an operator's delete.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Duration;

use consul_lock_blocking::{Client, ConnectionBudget, LossReason};
use consul_lock_core::api::{Key, KvDelete};
use consul_lock_testkit::agent::require_new_agent;
use consul_lock_testkit::procfs;

#[test]
fn a_budgeted_client_holds_more_locks_than_its_blocking_share_within_the_budget() {
    let Some(agent) = require_new_agent() else { return };
    let budget = ConnectionBudget::new(3, 1).unwrap();
    let client = Client::with_budget(agent.config().unwrap(), budget).unwrap();
    assert_eq!(client.budget(), budget);
    let locks: Vec<_> = (0..5)
        .map(|i| client.lock_key(&format!("blocking/budget/{i}")).unwrap())
        .collect();
    let guards: Vec<_> = locks.iter().map(|lock| lock.acquire().unwrap()).collect();
    // Five monitors on a share of two: they take turns.
    std::thread::sleep(Duration::from_secs(3));
    let connections = procfs::connections_to(std::process::id(), agent.addr().port()).unwrap();
    assert!(connections <= 3, "{connections} connections, budget 3");
    client
        .call(
            &KvDelete {
                key: Key::new("blocking/budget/3").unwrap(),
            },
            Duration::from_secs(10),
        )
        .unwrap();
    // A hang guard, not a timing assertion: the delete is seen on that lock's next turn.
    let reason = guards[3].wait_lost(Duration::from_secs(120)).unwrap();
    assert_eq!(reason, Some(LossReason::KeyDeleted));
    for (i, guard) in guards.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert!(guard.is_held(), "lock {i} still held");
    }
    drop(guards);
    client.shutdown(Duration::from_secs(30)).unwrap();
}
