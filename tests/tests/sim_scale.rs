//! The generated properties at scale: at least a million simulated seconds of faulted contention
//! per run (`CONSUL_LOCK_SIM_SECONDS`, default 1,000,000), locks and semaphores mixed, in
//! scenarios of ten minutes with up to twelve faults anywhere in them ([`Shape::LONG`]), spread
//! over one worker thread per core, each judged by the same [`verdict`] as the quick properties.
//!
//! The soak is the same test with a larger budget:
//! `CONSUL_LOCK_SIM_SECONDS=100000000 cargo test --release -p consul-lock-testkit --test sim_scale -- --nocapture`.
//! A failure prints the minimal scenario and the seed that replays the run
//! (`PROPTEST_RNG_SEED`, with the same budget and thread count).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use consul_lock_testkit::harness::strategies::{
    Shape, mixed_lock_scenario, semaphore_scenario, shrink_iters,
};
use consul_lock_testkit::harness::{Target, run_target, verdict};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Simulated seconds per run unless `CONSUL_LOCK_SIM_SECONDS` says otherwise.
const DEFAULT_BUDGET: u64 = 1_000_000;

fn budget() -> u64 {
    match std::env::var("CONSUL_LOCK_SIM_SECONDS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("CONSUL_LOCK_SIM_SECONDS={v:?} is not a number of seconds")),
        Err(_) => DEFAULT_BUDGET,
    }
}

/// The run's seed: `PROPTEST_RNG_SEED` to replay one, else fresh each run.
fn seed() -> u64 {
    match std::env::var("PROPTEST_RNG_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("PROPTEST_RNG_SEED={v:?} is not a number")),
        Err(_) => RandomState::new().hash_one(Instant::now()),
    }
}

/// A lock (queued and unqueued contenders mixed) or a semaphore scenario, three to one (a semaphore run costs about three times a
/// lock run's time per simulated second).
fn scenario() -> impl Strategy<Value = (consul_lock_testkit::harness::Scenario, Target)> {
    prop_oneof![
        3 => mixed_lock_scenario("service/leader/.lock", Shape::LONG).prop_map(|s| (s, Target::Lock)),
        1 => semaphore_scenario("service/workers", Shape::LONG),
    ]
}

/// One worker: `cases` scenarios from its own seed; the minimal failure, if any.
fn worker(seed: u64, cases: u32) -> Result<(), String> {
    let config = Config {
        cases,
        max_shrink_iters: shrink_iters(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    runner
        .run(&scenario(), |(scenario, target)| {
            let outcome = run_target(&scenario, target);
            verdict(&scenario, target, &outcome).map_err(TestCaseError::fail)
        })
        .map_err(|e| e.to_string())
}

#[test]
#[allow(clippy::print_stdout)] // the figures, for `--nocapture`
fn a_million_simulated_seconds_of_faulted_contention_hold_every_property() {
    let (budget, seed) = (budget(), seed());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let per_case = Shape::LONG.duration.as_secs();
    let total_cases = budget.div_ceil(per_case);
    let per_thread = u32::try_from(total_cases.div_ceil(threads as u64)).unwrap_or(u32::MAX);
    let started = Instant::now();
    let results: Vec<(u64, Result<(), String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads as u64)
            .map(|k| {
                let seed = seed.wrapping_add(k);
                scope.spawn(move || (seed, worker(seed, per_thread)))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let took = started.elapsed();
    let simulated = u64::from(per_thread) * threads as u64 * per_case;
    println!(
        "{simulated} simulated seconds in {} cases on {threads} threads in {took:.1?} ({:.0} simulated s per s)",
        u64::from(per_thread) * threads as u64,
        simulated as f64 / took.as_secs_f64().max(Duration::from_millis(1).as_secs_f64())
    );
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(worker_seed, r)| r.err().map(|e| format!("worker seed {worker_seed}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "run seed {seed} (replay: PROPTEST_RNG_SEED={seed} CONSUL_LOCK_SIM_SECONDS={budget}, {threads} threads)\n{}",
        failures.join("\n\n")
    );
    assert!(
        simulated >= budget,
        "ran {simulated} of {budget} simulated seconds"
    );
}
