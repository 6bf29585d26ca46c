//! proptest strategies for scenarios: contenders with varied options, and faults of every kind
//! the harness knows, for property tests of a lock or a semaphore (yours or ours).

use std::time::Duration;

use proptest::prelude::*;

use super::{ClientSpec, Fault, FaultKind, Scenario, Target};

/// A contender: TTL 10, 15 or 20 s; lock-delay the server's default, 0, 1 or 2 s; sometimes
/// Go's `MonitorRetries`; a start within 5 s; holds of 0.5 to 20 s; pauses of 0.1 to 3 s between
/// attempts; sometimes try-once with a wait of 1 to 9 s; sometimes a cancel of an attempt not
/// granted within 1 ms to 5 s (at any point of the acquisition, requests in flight included);
/// sometimes an acquire error budget of 3 to 20 s rather than the default minute.
pub fn client_spec() -> impl Strategy<Value = ClientSpec> {
    (
        prop_oneof![Just(10u64), Just(15), Just(20)],
        prop_oneof![Just(None), Just(Some(0u64)), Just(Some(1_000)), Just(Some(2_000))],
        prop_oneof![3 => Just(None), 1 => (0u32..3).prop_map(Some)],
        0u64..5_000,
        500u64..20_000,
        100u64..3_000,
        prop_oneof![4 => Just(None), 1 => (1u64..10).prop_map(Some)],
        // Cancels come at any moment of an acquisition: its first milliseconds (a request in
        // flight) as often as later.
        prop_oneof![6 => Just(None), 1 => (1u64..40).prop_map(Some), 1 => (1u64..5_000).prop_map(Some)],
        prop_oneof![4 => Just(60u64), 1 => 3u64..20],
    )
        .prop_map(
            |(ttl, delay, retries, start, hold, pause, try_once, cancel, budget)| ClientSpec {
                ttl: Duration::from_secs(ttl),
                lock_delay: delay.map(Duration::from_millis),
                monitor_retries: retries,
                start: Duration::from_millis(start),
                hold: Duration::from_millis(hold),
                pause: Duration::from_millis(pause),
                try_once: try_once.map(Duration::from_secs),
                cancel_after: cancel.map(Duration::from_millis),
                error_budget: Duration::from_secs(budget),
                queued: false,
            },
        )
}

/// A lock contender of [`client_spec`] that waits in line (`Waiting::Queue`) half the time: the
/// mixed runs of queued and unqueued contenders.
pub fn mixed_client_spec() -> impl Strategy<Value = ClientSpec> {
    (client_spec(), any::<bool>()).prop_map(|(spec, queued)| ClientSpec { queued, ..spec })
}

/// A fault of any kind against one of `clients` contenders (or all), starting within the first
/// 60 s and lasting 0.1 to 30 s (a pause at most 9 s).
pub fn fault(clients: usize) -> impl Strategy<Value = Fault> {
    fault_within(clients, Duration::from_secs(60))
}

/// [`fault`], starting anywhere within the first `window`.
pub fn fault_within(clients: usize, window: Duration) -> impl Strategy<Value = Fault> {
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    let c = 0..clients;
    let one_client = prop_oneof![
        (c.clone(), 1u64..3_000).prop_map(|(client, ms)| FaultKind::Latency {
            client,
            extra: Duration::from_millis(ms)
        }),
        c.clone().prop_map(|client| FaultKind::Hang { client }),
        c.clone().prop_map(|client| FaultKind::Refuse { client }),
        c.clone().prop_map(|client| FaultKind::Error500 { client }),
        c.clone().prop_map(|client| FaultKind::TooManyRequests { client }),
        c.clone().prop_map(|client| FaultKind::NoBlock { client }),
        c.clone().prop_map(|client| FaultKind::Partition { client }),
        c.clone().prop_map(|client| FaultKind::Pause { client }),
        (c.clone(), 500u64..8_000).prop_map(|(client, ms)| FaultKind::Lag {
            client,
            lag: Duration::from_millis(ms)
        }),
        c.clone().prop_map(|client| FaultKind::Duplicate { client }),
        (c.clone(), 1u64..200).prop_map(|(client, ms)| FaultKind::Reorder {
            client,
            up_to: Duration::from_millis(ms)
        }),
    ];
    let others = prop_oneof![
        c.clone().prop_map(|client| FaultKind::RefuseAcquire { client }),
        c.prop_map(|client| FaultKind::ConnReset { client }),
        Just(FaultKind::LeaderElection),
        Just(FaultKind::AgentRestart),
        Just(FaultKind::DestroyHolderSession),
        Just(FaultKind::DeleteKey),
        Just(FaultKind::OverwriteKey),
        Just(FaultKind::TakeOver),
    ];
    let kind = prop_oneof![10 => one_client, 7 => others];
    (kind, 0u64..window, 100u64..30_000).prop_map(|(kind, from, lasting)| {
        // A pause shorter than the shortest TTL: long enough to outlast a renew deadline, too
        // short for the agent to expire the session, so that a holder that wakes and believes
        // on is a bug rather than the pause itself (which only fencing tokens can answer).
        let lasting = match kind {
            FaultKind::Pause { .. } => lasting.min(9_000),
            _ => lasting,
        };
        Fault {
            kind,
            from: Duration::from_millis(from),
            lasting: Duration::from_millis(lasting),
        }
    })
}

/// The size of a generated scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// How long contenders contend.
    pub duration: Duration,
    /// Faults start within this much of the start.
    pub fault_window: Duration,
    /// The most faults in one scenario.
    pub max_faults: usize,
}

impl Shape {
    /// The quick properties': 150 s, up to 3 faults within the first minute.
    pub const QUICK: Shape = Shape {
        duration: Duration::from_secs(150),
        fault_window: Duration::from_secs(60),
        max_faults: 3,
    };
    /// The scale run's: 600 s, up to 12 faults anywhere in the first 540 s.
    pub const LONG: Shape = Shape {
        duration: Duration::from_secs(600),
        fault_window: Duration::from_secs(540),
        max_faults: 12,
    };
}

/// Lock scenarios on `key`: 2 to 4 contenders of [`client_spec`], faults of [`fault_within`].
pub fn lock_scenario(key: &str, shape: Shape) -> impl Strategy<Value = Scenario> + use<> {
    lock_scenario_of(key, shape, false)
}

/// Lock scenarios of queued and unqueued contenders on one key ([`mixed_client_spec`]; the
/// unqueued wait on the key as Go's client does), with the faults of [`lock_scenario`] plus an
/// operator deleting the line ([`queue_fault_within`]).
pub fn mixed_lock_scenario(key: &str, shape: Shape) -> impl Strategy<Value = Scenario> + use<> {
    lock_scenario_of(key, shape, true)
}

fn lock_scenario_of(key: &str, shape: Shape, mixed: bool) -> BoxedStrategy<Scenario> {
    let key = key.to_owned();
    (2usize..=4)
        .prop_flat_map(move |n| {
            let (spec, fault) = if mixed {
                (
                    mixed_client_spec().boxed(),
                    queue_fault_within(n, shape.fault_window).boxed(),
                )
            } else {
                (client_spec().boxed(), fault_within(n, shape.fault_window).boxed())
            };
            (
                any::<u64>(),
                proptest::collection::vec(spec, n),
                proptest::collection::vec(fault, 0..=shape.max_faults),
            )
        })
        .prop_map(move |(seed, clients, faults)| Scenario {
            seed,
            clients,
            faults,
            duration: shape.duration,
            key: key.clone(),
        })
        .boxed()
}

/// Semaphore scenarios under `prefix`: 2 to 5 contenders, a limit of 1 to 3.
pub fn semaphore_scenario(prefix: &str, shape: Shape) -> impl Strategy<Value = (Scenario, Target)> + use<> {
    let prefix = prefix.to_owned();
    (2usize..=5, 1u32..=3)
        .prop_flat_map(move |(n, limit)| {
            (
                any::<u64>(),
                proptest::collection::vec(client_spec(), n),
                proptest::collection::vec(fault_within(n, shape.fault_window), 0..=shape.max_faults),
                Just(limit),
            )
        })
        .prop_map(move |(seed, clients, faults, limit)| {
            let scenario = Scenario {
                seed,
                clients,
                faults,
                duration: shape.duration,
                key: prefix.clone(),
            };
            (scenario, Target::Semaphore { limit })
        })
}

/// A fault of [`fault`], or (one time in eight) an operator deleting a queued lock's whole
/// line within the first 60 s.
pub fn queue_fault(clients: usize) -> impl Strategy<Value = Fault> {
    queue_fault_within(clients, Duration::from_secs(60))
}

/// [`queue_fault`], starting anywhere within the first `window`.
pub fn queue_fault_within(clients: usize, window: Duration) -> impl Strategy<Value = Fault> {
    let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    let delete_line = (0u64..millis).prop_map(|from| Fault {
        kind: FaultKind::DeleteQueue,
        from: Duration::from_millis(from),
        lasting: Duration::ZERO,
    });
    prop_oneof![7 => fault_within(clients, window), 1 => delete_line]
}

/// How many cases a property runs: `PROPTEST_CASES` if set, 300 by default (the CI run), and
/// 20,000 for a soak when `CONSUL_LOCK_SOAK` is set.
pub fn cases() -> u32 {
    if std::env::var_os("CONSUL_LOCK_SOAK").is_some() {
        return 20_000;
    }
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// How many shrinking steps a failing property takes: `PROPTEST_MAX_SHRINK_ITERS` if set (the
/// mutation runs set 0: they need the verdict, not the smallest case), 2,000 by default.
pub fn shrink_iters() -> u32 {
    std::env::var("PROPTEST_MAX_SHRINK_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}
