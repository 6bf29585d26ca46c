//! proptest strategies for scenarios: contenders with varied options, and faults of every kind
//! the harness knows, for property tests of a lock or a semaphore (yours or ours).

use std::time::Duration;

use proptest::prelude::*;

use super::{ClientSpec, Fault, FaultKind};

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
    ];
    let kind = prop_oneof![10 => one_client, 7 => others];
    (kind, 0u64..60_000, 100u64..30_000).prop_map(|(kind, from, lasting)| {
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

/// A fault of [`fault`], or (one time in eight) an operator deleting a queued lock's whole
/// line within the first 60 s.
pub fn queue_fault(clients: usize) -> impl Strategy<Value = Fault> {
    let delete_line = (0u64..60_000).prop_map(|from| Fault {
        kind: FaultKind::DeleteQueue,
        from: Duration::from_millis(from),
        lasting: Duration::ZERO,
    });
    prop_oneof![7 => fault(clients), 1 => delete_line]
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
