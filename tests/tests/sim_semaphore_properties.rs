//! Safety (never more than `limit` holders at any virtual instant, in their own view), fencing,
//! liveness and cleanup of the semaphore, over generated scenarios of contenders and faults, in
//! virtual time against the simulated Consul. `PROPTEST_CASES` sets the number of cases (CI: the
//! default below); `CONSUL_LOCK_SOAK=1` runs a long soak instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_core::machine::LossReason;
use consul_lock_testkit::harness::strategies::{Shape, cases, semaphore_scenario, shrink_iters};
use consul_lock_testkit::harness::{
    self, ClientSpec, Fault, FaultKind, Hold, Outcome, Scenario, Target, most_at_once, run_target,
};
use proptest::prelude::*;

const PREFIX: &str = "service/workers";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `n` contenders that hold for a while each, with short TTLs.
fn contenders(seed: u64, n: usize, faults: Vec<Fault>) -> Scenario {
    let clients = (0..n)
        .map(|i| {
            let mut c = ClientSpec::new(secs(4 + 3 * i as u64));
            c.ttl = secs(10);
            c.start = Duration::from_millis(100 * i as u64);
            c
        })
        .collect();
    Scenario {
        seed,
        clients,
        faults,
        duration: secs(120),
        key: PREFIX.into(),
    }
}

fn check_liveness(scenario: &Scenario, outcome: &Outcome) {
    let target = Target::Semaphore { limit: 1 };
    if let Err(e) = harness::check_liveness(scenario, target, outcome) {
        panic!("{e}");
    }
}

#[test]
fn same_seed_same_trace() {
    let faults = vec![Fault {
        kind: FaultKind::Partition { client: 0 },
        from: secs(5),
        lasting: secs(20),
    }];
    let scenario = contenders(7, 3, faults);
    let target = Target::Semaphore { limit: 2 };
    let first = run_target(&scenario, target);
    let second = run_target(&scenario, target);
    first.assert_clean();
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.trace, second.trace);
    let other = run_target(&Scenario { seed: 8, ..scenario }, target);
    assert_ne!(first.trace_hash, other.trace_hash);
}

#[test]
fn slots_are_shared_up_to_the_limit_and_everyone_gets_one() {
    for limit in 1..=3 {
        let scenario = contenders(11, 5, Vec::new());
        let outcome = run_target(&scenario, Target::Semaphore { limit });
        outcome.assert_clean();
        let most = most_at_once(&outcome.holds);
        assert_eq!(most, limit as usize, "limit {limit}: {most} at once");
        for client in 0..5 {
            assert!(
                outcome.holds.iter().any(|h| h.client == client),
                "limit {limit}: client {client} never held\n{}",
                outcome.trace_tail(40)
            );
        }
        assert!(
            outcome.holds.iter().all(|h| h.lost.is_none()),
            "no faults, no losses"
        );
        assert!(
            outcome
                .holds
                .iter()
                .all(|h| h.token.key.as_str() == "service/workers/.lock"),
            "tokens name the .lock"
        );
    }
}

#[test]
fn partitioned_holder_loses_before_its_slot_is_reused() {
    // Client 0 holds for 30 s; the others take turns with the other slot.
    let mut scenario = contenders(
        1,
        3,
        vec![Fault {
            kind: FaultKind::Partition { client: 0 },
            from: secs(5),
            lasting: secs(40),
        }],
    );
    scenario.clients[0].hold = secs(30);
    let outcome = run_target(&scenario, Target::Semaphore { limit: 2 });
    outcome.assert_clean();
    let lost = outcome
        .holds
        .iter()
        .find(|h| h.client == 0)
        .expect("client 0 held first");
    let lost_at = lost.until.expect("client 0's hold ended");
    assert!(
        matches!(lost.lost, Some(LossReason::RenewDeadline { .. })),
        "{lost:?}"
    );
    assert!(
        lost_at <= secs(5) + secs(10),
        "renew deadline: lost at {lost_at:?}"
    );
    assert!(most_at_once(&outcome.holds) <= 2);
    check_liveness(&scenario, &outcome);
}

#[test]
fn operator_delete_of_a_contender_key_overlap_is_measured_and_short() {
    for seed in 0..8 {
        let scenario = contenders(
            seed,
            3,
            vec![Fault {
                kind: FaultKind::DeleteKey,
                from: secs(10),
                lasting: Duration::ZERO,
            }],
        );
        let outcome = run_target(&scenario, Target::Semaphore { limit: 2 });
        outcome.assert_clean();
        assert!(
            outcome.max_operator_overlap < Duration::from_millis(50),
            "{:?}",
            outcome.max_operator_overlap
        );
        assert!(
            outcome
                .holds
                .iter()
                .any(|h| h.lost == Some(LossReason::KeyDeleted)),
            "seed {seed}: a holder lost its contender key\n{}",
            outcome.trace_tail(40)
        );
    }
}

#[test]
fn leader_election_does_not_lose_a_renewed_slot() {
    let scenario = contenders(
        5,
        2,
        vec![Fault {
            kind: FaultKind::LeaderElection,
            from: secs(2),
            lasting: secs(3),
        }],
    );
    let outcome = run_target(&scenario, Target::Semaphore { limit: 2 });
    outcome.assert_clean();
    let early: Vec<&Hold> = outcome.holds.iter().filter(|h| h.from < secs(2)).collect();
    assert_eq!(early.len(), 2, "both held before the election");
    for hold in early {
        assert_eq!(
            hold.lost, None,
            "a 3 s election within the TTL must not lose a slot: {hold:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: shrink_iters(), ..ProptestConfig::default() })]

    #[test]
    fn at_most_limit_holders_fencing_liveness_and_cleanup((scenario, target) in semaphore_scenario(PREFIX, Shape::QUICK)) {
        let outcome = run_target(&scenario, target);
        harness::verdict(&scenario, target, &outcome).map_err(TestCaseError::fail)?;
    }
}
