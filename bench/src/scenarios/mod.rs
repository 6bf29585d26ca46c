//! The measurements, one module each. Every scenario drives each client under test through the
//! same steps on the same agent, through its contender process.

pub mod contention;
pub mod failover;
pub mod handoff;
pub mod idle;
pub mod partition;
pub mod scale;

use std::collections::BTreeMap;
use std::time::Duration;

use consul_lock_testkit::agent::ConsulAgent;

use crate::error::BenchError;
use crate::host::{ClientKind, Launcher};
use crate::operator::Operator;
use crate::protocol::Command;

/// How big each scenario is: [`Plan::full`] for the figures, [`Plan::smoke`] to prove in a
/// minute or two that the suite still runs (CI).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    /// `full` or `smoke`.
    pub name: &'static str,
    /// Handoffs measured per client, in all.
    pub handoff_rounds: usize,
    /// How many consecutive blocks the handoff rounds are cut into, each giving every client's
    /// p50 and its ratio to today's tokio client: the spread of that ratio across blocks says
    /// how far apart two clients' medians are by noise alone.
    pub handoff_repeats: usize,
    /// Failovers measured per client.
    pub failover_rounds: usize,
    /// The failover's lock-delay.
    pub failover_lock_delay: Duration,
    /// How long the partition is watched after the cut.
    pub partition_window: Duration,
    /// The partitioned sessions' lock-delay; `None`: the server's default (15 s).
    pub partition_lock_delay: Option<Duration>,
    /// Contender counts for the contention scenario.
    pub contention_sizes: Vec<usize>,
    /// How long the idle lock's traffic is counted.
    pub idle_window: Duration,
    /// Lock counts for the scale scenario.
    pub scale_sizes: Vec<usize>,
    /// Keys of the scale scenario's key set run (at Consul's default limits, tokio); `None`:
    /// no key set run.
    pub keyset_size: Option<usize>,
    /// How long the scale scenario watches the held locks idle.
    pub scale_window: Duration,
    /// Whether the scale scenario also runs against an agent with the connection limit raised
    /// (else only at Consul's default limit).
    pub scale_raised: bool,
    /// How long the core benchmark runs.
    pub core_budget: Duration,
}

impl Plan {
    /// The sizes the figures in BENCHMARKS.md come from.
    pub fn full() -> Plan {
        Plan {
            name: "full",
            handoff_rounds: 250,
            handoff_repeats: 5,
            failover_rounds: 5,
            failover_lock_delay: Duration::from_secs(2),
            partition_window: Duration::from_secs(45),
            partition_lock_delay: None,
            contention_sizes: vec![20, 50],
            idle_window: Duration::from_secs(60),
            scale_sizes: vec![100, 1000],
            keyset_size: Some(10_000),
            scale_window: Duration::from_secs(20),
            scale_raised: true,
            core_budget: Duration::from_secs(3),
        }
    }

    /// Every scenario, small: proves the suite runs, measures nothing worth quoting.
    pub fn smoke() -> Plan {
        Plan {
            name: "smoke",
            handoff_rounds: 6,
            handoff_repeats: 2,
            failover_rounds: 1,
            failover_lock_delay: Duration::from_secs(2),
            partition_window: Duration::from_secs(12),
            partition_lock_delay: Some(Duration::ZERO),
            contention_sizes: vec![5],
            idle_window: Duration::from_secs(5),
            scale_sizes: vec![20],
            keyset_size: Some(100),
            scale_window: Duration::from_secs(3),
            scale_raised: true,
            core_budget: Duration::from_millis(300),
        }
    }
}

/// What every scenario needs.
pub struct Ctx<'a> {
    /// The agent every client talks to.
    pub agent: &'a ConsulAgent,
    /// How to start the contenders.
    pub launcher: &'a Launcher,
    /// The sizes.
    pub plan: &'a Plan,
    /// The suite's own requests.
    pub operator: &'a Operator,
    /// The clients under test.
    pub clients: &'a [ClientKind],
    /// Prefixes every key, so that two runs on one agent never meet.
    pub run_tag: String,
}

impl Ctx<'_> {
    /// A key of this run's, for `scenario` and `client`.
    pub fn key(&self, scenario: &str, client: ClientKind) -> String {
        format!("bench/{}/{scenario}/{}", self.run_tag, client.name())
    }

    /// The agent's HTTP address.
    pub fn addr(&self) -> String {
        self.agent.addr().to_string()
    }
}

/// How long a waiter is given to reach its blocking read before the holder lets go: a session
/// create, a read and the start of a blocking read take a few milliseconds on loopback. (More
/// than the 100 ms after which our waiter asks for the holder's lock-delay, which the failover
/// scenario needs it to know.)
pub const PARK: Duration = Duration::from_millis(200);

/// A `lock` command with the given session TTL and lock-delay.
pub fn lock(id: u64, addr: &str, key: &str, ttl: Duration, lock_delay: Option<Duration>) -> Command {
    Command::Lock {
        id,
        addr: addr.to_owned(),
        key: key.to_owned(),
        ttl_ms: millis(ttl),
        lock_delay_ms: lock_delay.map(millis),
        shared_client: false,
        queued: false,
        write_ms: None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The default session TTL of both clients' locks.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// Runs `scenario` for every client at once, each on a thread of its own, for the scenarios
/// whose figures are a wait (a partition, an idle window) rather than a latency that the other
/// clients' work could disturb.
pub fn side_by_side<T: Send>(
    ctx: &Ctx<'_>,
    scenario: impl Fn(&Ctx<'_>, ClientKind) -> Result<T, BenchError> + Sync,
) -> Result<BTreeMap<ClientKind, T>, BenchError> {
    std::thread::scope(|scope| {
        let scenario = &scenario;
        let runs: Vec<_> = ctx
            .clients
            .iter()
            .map(|&kind| (kind, scope.spawn(move || scenario(ctx, kind))))
            .collect();
        runs.into_iter()
            .map(|(kind, run)| {
                let result = run.join().unwrap_or_else(|_| {
                    Err(BenchError::Request {
                        what: "a scenario thread",
                        msg: format!("the {} client's thread panicked", kind.name()),
                    })
                });
                result.map(|r| (kind, r))
            })
            .collect()
    })
}
