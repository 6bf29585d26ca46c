//! Safety, fencing, liveness and cleanup of the lock, over generated scenarios of contenders and
//! faults, in virtual time against the simulated Consul. `PROPTEST_CASES` sets the number of
//! cases (CI: the default below); `CONSUL_LOCK_SOAK=1` runs a long soak instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_testkit::harness::strategies::{
    Shape, cases, lock_scenario, mixed_lock_scenario, shrink_iters,
};
use consul_lock_testkit::harness::{self, ClientSpec, Fault, FaultKind, Outcome, Scenario, Target, run};
use proptest::prelude::*;

const KEY: &str = "service/leader/.lock";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn two_contenders(seed: u64, faults: Vec<Fault>) -> Scenario {
    let mut a = ClientSpec::new(secs(30));
    a.lock_delay = Some(Duration::ZERO);
    a.ttl = secs(10);
    let mut b = ClientSpec::new(secs(5));
    b.start = Duration::from_millis(100);
    b.ttl = secs(10);
    Scenario {
        seed,
        clients: vec![a, b],
        faults,
        duration: secs(120),
        key: KEY.into(),
    }
}

fn check_liveness(scenario: &Scenario, outcome: &Outcome) {
    if let Err(e) = harness::check_liveness(scenario, Target::Lock, outcome) {
        panic!("{e}");
    }
}

#[test]
fn same_seed_same_trace() {
    let scenario = two_contenders(
        7,
        vec![Fault {
            kind: FaultKind::Partition { client: 0 },
            from: secs(5),
            lasting: secs(20),
        }],
    );
    let first = run(&scenario);
    let second = run(&scenario);
    first.assert_clean();
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.trace, second.trace);
    let other = run(&Scenario { seed: 8, ..scenario });
    assert_ne!(first.trace_hash, other.trace_hash);
}

#[test]
fn partitioned_holder_loses_before_anyone_else_acquires() {
    let scenario = two_contenders(
        1,
        vec![Fault {
            kind: FaultKind::Partition { client: 0 },
            from: secs(5),
            lasting: secs(40),
        }],
    );
    let outcome = run(&scenario);
    outcome.assert_clean();
    let lost = outcome
        .holds
        .iter()
        .find(|h| h.client == 0)
        .expect("client 0 held first");
    let lost_at = lost.until.expect("client 0's hold ended");
    assert!(
        lost_at <= secs(5) + secs(10),
        "renew deadline: lost at {lost_at:?}"
    );
    let next = outcome
        .holds
        .iter()
        .find(|h| h.client == 1)
        .expect("client 1 took over");
    assert!(
        next.from > lost_at,
        "client 1 at {:?}, client 0 lost at {lost_at:?}",
        next.from
    );
    check_liveness(&scenario, &outcome);
}

#[test]
fn operator_delete_overlap_is_measured_and_short() {
    let scenario = two_contenders(
        3,
        vec![Fault {
            kind: FaultKind::DeleteKey,
            from: secs(10),
            lasting: Duration::ZERO,
        }],
    );
    let outcome = run(&scenario);
    outcome.assert_clean();
    assert!(
        outcome.max_operator_overlap < Duration::from_millis(50),
        "{:?}",
        outcome.max_operator_overlap
    );
}

#[test]
fn leader_election_does_not_lose_a_renewed_lock() {
    let scenario = two_contenders(
        5,
        vec![Fault {
            kind: FaultKind::LeaderElection,
            from: secs(5),
            lasting: secs(3),
        }],
    );
    let outcome = run(&scenario);
    outcome.assert_clean();
    let first = &outcome.holds[0];
    assert_eq!(first.client, 0);
    assert_eq!(
        first.lost, None,
        "a 3 s election within the TTL must not lose the lock: {first:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: shrink_iters(), ..ProptestConfig::default() })]

    /// Queued waiting: safety with the line deleted by an operator, FIFO among the queued
    /// (the harness's `fifo` check), waiters crashing (paused, cut off, their sessions
    /// destroyed) at any point, no starvation (liveness after the last fault), cleanup.
    #[test]
    fn queued_and_unqueued_contenders_keep_safety_order_and_liveness(scenario in mixed_lock_scenario(KEY, Shape::QUICK)) {
        every_property(&scenario)?;
    }

    #[test]
    fn safety_fencing_liveness_and_cleanup(scenario in lock_scenario(KEY, Shape::QUICK)) {
        every_property(&scenario)?;
    }
}

/// Plays `scenario`: the generated properties' verdict ([`harness::verdict`]).
fn every_property(scenario: &Scenario) -> Result<(), TestCaseError> {
    let outcome = run(scenario);
    harness::verdict(scenario, Target::Lock, &outcome).map_err(TestCaseError::fail)
}
