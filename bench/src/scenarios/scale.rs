//! Scale: one process holds many locks at once (one key each, one shared client, as a service
//! electing a leader per shard would): memory per lock, connections to the agent, CPU while
//! idle. Run against an agent whose `http_max_conns_per_client` is raised out of the way, and
//! against one at Consul's default (200), to show where that limit stops each client: every held
//! lock keeps a blocking read open, and an HTTP/1.1 connection carries one request at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use consul_lock_testkit::agent::{AgentOptions, ConsulAgent};
use serde::Serialize;

use super::{Ctx, DEFAULT_TTL};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::procfs;
use crate::protocol::{Command, Event, now_ns};

/// The raised connection limit.
const RAISED_LIMIT: u32 = 8192;
/// Consul's default `http_max_conns_per_client`.
const DEFAULT_LIMIT: u32 = 200;
/// Waiting for every lock ends once this long passes with no new hold.
const NO_PROGRESS: Duration = Duration::from_secs(20);
/// After the last hold, before measuring: let the acquisitions' connections settle.
const SETTLE: Duration = Duration::from_secs(2);
/// How many distinct error messages a run keeps.
const ERRORS_KEPT: usize = 3;

/// One client holding `locks` locks on one agent.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRun {
    /// The client.
    pub client: ClientKind,
    /// The agent's `http_max_conns_per_client`.
    pub conn_limit: u32,
    /// Locks asked for.
    pub locks: usize,
    /// Locks held at the end of the window.
    pub held: usize,
    /// Seconds from the first `lock` to the last hold.
    pub seconds_to_hold: f64,
    /// Resident memory before the first lock, in KiB.
    pub rss_before_kib: u64,
    /// Resident memory with the locks held, in KiB.
    pub rss_held_kib: u64,
    /// (held − before) / held, in KiB.
    pub kib_per_lock: Option<f64>,
    /// Established TCP connections from the process to the agent, with the locks held.
    pub connections: usize,
    /// CPU use over the idle window, in percent of one core.
    pub idle_cpu_percent: f64,
    /// Locks reported lost (from the first hold to the end of the window).
    pub lost: usize,
    /// `error` events.
    pub errors: usize,
    /// The first distinct error messages.
    pub error_samples: Vec<String>,
}

/// The scale figures.
#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    /// The idle window, in milliseconds.
    pub window_ms: u64,
    /// Every run.
    pub runs: Vec<ScaleRun>,
}

/// Every size against an agent with the limit raised; the largest size against one at the
/// default limit as well.
pub fn run(ctx: &Ctx<'_>) -> Result<Scale, BenchError> {
    let raised = ConsulAgent::start_with(
        AgentOptions::default().hcl(format!("limits {{ http_max_conns_per_client = {RAISED_LIMIT} }}")),
    )?;
    let mut runs = Vec::new();
    for &n in &ctx.plan.scale_sizes {
        for &kind in ctx.clients {
            runs.push(client(ctx, &raised, RAISED_LIMIT, kind, n)?);
        }
    }
    drop(raised);
    if let Some(&largest) = ctx.plan.scale_sizes.iter().max() {
        for &kind in ctx.clients {
            runs.push(client(ctx, ctx.agent, DEFAULT_LIMIT, kind, largest)?);
        }
    }
    Ok(Scale {
        window_ms: u64::try_from(ctx.plan.scale_window.as_millis()).unwrap_or(u64::MAX),
        runs,
    })
}

fn client(
    ctx: &Ctx<'_>,
    agent: &ConsulAgent,
    limit: u32,
    kind: ClientKind,
    n: usize,
) -> Result<ScaleRun, BenchError> {
    let io = |what: &'static str| {
        move |source| BenchError::Io {
            what: what.to_owned(),
            source,
        }
    };
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    let pid = p.pid();
    let rss_before_kib = procfs::rss_kib(pid).map_err(io("reading memory use"))?;
    let addr = agent.addr().to_string();
    let started = now_ns();
    for id in 0..n as u64 {
        p.send(&Command::Lock {
            id,
            addr: addr.clone(),
            key: format!("{}-{limit}-{n}/{id}", ctx.key("scale", kind)),
            ttl_ms: u64::try_from(DEFAULT_TTL.as_millis()).unwrap_or(u64::MAX),
            lock_delay_ms: None,
            shared_client: true,
        })?;
    }
    let mut tally = Tally::new(started);
    let mut quiet_since = Instant::now();
    while tally.held.len() < n && quiet_since.elapsed() < NO_PROGRESS {
        if let Some(event) = p.next(Duration::from_millis(200))? {
            if matches!(event, Event::Held { .. }) {
                quiet_since = Instant::now();
            }
            tally.observe(event);
        }
    }
    let seconds_to_hold = (tally.last_hold.saturating_sub(started)) as f64 / 1e9;
    std::thread::sleep(SETTLE);
    let rss_held_kib = procfs::rss_kib(pid).map_err(io("reading memory use"))?;
    let connections = procfs::connections_to(pid, agent.addr().port()).map_err(io("counting connections"))?;
    let cpu0 = procfs::cpu_seconds(pid).map_err(io("reading CPU time"))?;
    let window_end = Instant::now() + ctx.plan.scale_window;
    while let Some(left) = window_end
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        if let Some(event) = p.next(left)? {
            tally.observe(event);
        }
    }
    let idle_cpu_percent = (procfs::cpu_seconds(pid).map_err(io("reading CPU time"))? - cpu0)
        / ctx.plan.scale_window.as_secs_f64()
        * 100.0;
    p.quit(Duration::from_secs(60));
    let held = tally.held.len();
    let kib_per_lock = (held > 0).then(|| (rss_held_kib as f64 - rss_before_kib as f64) / held as f64);
    Ok(ScaleRun {
        client: kind,
        conn_limit: limit,
        locks: n,
        held,
        seconds_to_hold,
        rss_before_kib,
        rss_held_kib,
        kib_per_lock,
        connections,
        idle_cpu_percent,
        lost: tally.lost,
        errors: tally.errors,
        error_samples: tally.error_samples,
    })
}

/// What the events of one run added up to.
struct Tally {
    held: BTreeSet<u64>,
    last_hold: u64,
    lost: usize,
    errors: usize,
    error_samples: Vec<String>,
}

impl Tally {
    fn new(started: u64) -> Tally {
        Tally {
            held: BTreeSet::new(),
            last_hold: started,
            lost: 0,
            errors: 0,
            error_samples: Vec::new(),
        }
    }

    fn observe(&mut self, event: Event) {
        match event {
            Event::Held { id, t_ns, .. } => {
                self.held.insert(id);
                self.last_hold = self.last_hold.max(t_ns);
            }
            Event::Lost { id, .. } => {
                self.held.remove(&id);
                self.lost += 1;
            }
            Event::Error { msg, .. } => {
                self.errors += 1;
                if self.error_samples.len() < ERRORS_KEPT && !self.error_samples.contains(&msg) {
                    self.error_samples.push(msg);
                }
            }
            _ => {}
        }
    }
}

/// Runs grouped by client, for the table.
pub fn by_client(scale: &Scale) -> BTreeMap<ClientKind, Vec<&ScaleRun>> {
    let mut map: BTreeMap<ClientKind, Vec<&ScaleRun>> = BTreeMap::new();
    for run in &scale.runs {
        map.entry(run.client).or_default().push(run);
    }
    map
}
