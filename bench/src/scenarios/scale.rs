//! Scale: one process holds many locks at once (one key each, one shared client, as a service
//! electing a leader per shard would): memory per lock, connections to the agent, CPU while
//! idle. Run against an agent whose `http_max_conns_per_client` is raised out of the way, and
//! against one at Consul's default (200), to show where that limit stops each client: every held
//! lock keeps a blocking read open, and an HTTP/1.1 connection carries one request at a time.
//!
//! After the idle window, an operator deletes a few of the held keys, and the time until each
//! holder reports the loss is the monitors' reaction: at once while every monitor read is parked
//! on the agent, later when more locks are held than the client's blocking reads may take
//! connections and the monitors take turns (our clients' connection budget).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use consul_lock_testkit::agent::{AgentOptions, ConsulAgent};
use serde::Serialize;

use super::{Ctx, DEFAULT_TTL};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::operator::Operator;
use crate::procfs;
use crate::protocol::{Command, Event, now_ns};
use crate::stats;

/// The raised connection limit.
pub(crate) const RAISED_LIMIT: u32 = 8192;
/// Consul's default `http_max_conns_per_client`.
const DEFAULT_LIMIT: u32 = 200;
/// Waiting for every lock ends once this long passes with no new hold.
const NO_PROGRESS: Duration = Duration::from_secs(20);
/// After the last hold, before measuring: let the acquisitions' connections settle.
const SETTLE: Duration = Duration::from_secs(2);
/// How many distinct error messages a run keeps.
const ERRORS_KEPT: usize = 3;
/// How many held keys the operator deletes after the window, spread over the locks.
const DELETES: usize = 10;
/// How long the deletes' losses are waited for: longer than any monitor read's deadline (5 min
/// wait + its margin), so that a monitor that never sees its delete shows as unreported.
const REACTION_WAIT: Duration = Duration::from_secs(360);
/// How often connections are counted during the window.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How a run holds its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One `Lock` (one session, one monitor) per key, on one shared client.
    Locks,
    /// Every key on one session: the key set (the tokio contender).
    KeySet,
}

impl Mode {
    /// The mode's name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Locks => "locks",
            Mode::KeySet => "key set",
        }
    }
}

/// One client holding `locks` locks on one agent.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRun {
    /// The client.
    pub client: ClientKind,
    /// One session per lock, or one key set.
    pub mode: Mode,
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
    /// The most established connections counted during the window (once a second).
    pub connections_max: usize,
    /// CPU use over the idle window, in percent of one core.
    pub idle_cpu_percent: f64,
    /// Locks reported lost (from the first hold to the end of the window).
    pub lost: usize,
    /// `error` events.
    pub errors: usize,
    /// The first distinct error messages.
    pub error_samples: Vec<String>,
    /// Held keys the operator deleted after the window.
    pub deletes: usize,
    /// Seconds from each delete to its holder's `lost`, for those reported within the wait.
    pub delete_reaction_s: Vec<f64>,
    /// Requests the client sent per minute over the idle window (the Rust contenders).
    pub idle_requests_per_min: Option<f64>,
    /// A key set: seconds from the operator destroying its session to the last of its keys
    /// reported lost, and how many were.
    pub session_loss_s: Option<f64>,
    /// A key set: the keys reported lost after the session's destroy.
    pub session_keys_lost: usize,
}

/// The scale figures.
#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    /// The idle window, in milliseconds.
    pub window_ms: u64,
    /// Whether the runs against the raised limit were made.
    pub raised: bool,
    /// Every run.
    pub runs: Vec<ScaleRun>,
}

/// Every size against an agent with the limit raised; the largest size against one at the
/// default limit as well.
pub fn run(ctx: &Ctx<'_>) -> Result<Scale, BenchError> {
    let mut runs = Vec::new();
    if ctx.plan.scale_raised {
        let raised = ConsulAgent::start_with(
            AgentOptions::default().hcl(format!("limits {{ http_max_conns_per_client = {RAISED_LIMIT} }}")),
        )?;
        let operator = Operator::new(raised.config()?)?;
        for &n in &ctx.plan.scale_sizes {
            for &kind in scaled(ctx) {
                runs.push(client(
                    ctx,
                    &raised,
                    &operator,
                    RAISED_LIMIT,
                    kind,
                    Mode::Locks,
                    n,
                )?);
            }
        }
    }
    // One agent at its default limits: the key set, then one lock per key of the Rust clients
    // and Go's, side by side.
    if let Some(n) = ctx.plan.keyset_size {
        if ctx.clients.contains(&ClientKind::Tokio) {
            runs.push(client(
                ctx,
                ctx.agent,
                ctx.operator,
                DEFAULT_LIMIT,
                ClientKind::Tokio,
                Mode::KeySet,
                n,
            )?);
        }
    }
    if let Some(&largest) = ctx.plan.scale_sizes.iter().max() {
        for &kind in scaled(ctx) {
            runs.push(client(
                ctx,
                ctx.agent,
                ctx.operator,
                DEFAULT_LIMIT,
                kind,
                Mode::Locks,
                largest,
            )?);
        }
    }
    Ok(Scale {
        window_ms: u64::try_from(ctx.plan.scale_window.as_millis()).unwrap_or(u64::MAX),
        raised: ctx.plan.scale_raised,
        runs,
    })
}

#[allow(clippy::too_many_arguments)]
fn client(
    ctx: &Ctx<'_>,
    agent: &ConsulAgent,
    operator: &Operator,
    limit: u32,
    kind: ClientKind,
    mode: Mode,
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
    let prefix = format!(
        "{}-{limit}-{n}-{}",
        ctx.key("scale", kind),
        mode.name().replace(' ', "-")
    );
    let key = |id: u64| format!("{prefix}/{id}");
    let ttl_ms = u64::try_from(DEFAULT_TTL.as_millis()).unwrap_or(u64::MAX);
    match mode {
        Mode::KeySet => p.send(&Command::AcquireSet {
            addr: addr.clone(),
            prefix: prefix.clone(),
            n: n as u64,
            ttl_ms,
        })?,
        Mode::Locks => {
            for id in 0..n as u64 {
                p.send(&Command::Lock {
                    id,
                    addr: addr.clone(),
                    key: key(id),
                    ttl_ms,
                    lock_delay_ms: None,
                    shared_client: true,
                    queued: false,
                    write_ms: None,
                })?;
            }
        }
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
    let port = agent.addr().port();
    let count = || procfs::connections_to(pid, port).map_err(io("counting connections"));
    let connections = count()?;
    let mut connections_max = connections;
    let cpu0 = procfs::cpu_seconds(pid).map_err(io("reading CPU time"))?;
    // The tokio contender counts its client's requests (`Client::requests_sent`).
    let rust = kind == ClientKind::Tokio;
    let requests0 = if rust { requests(&mut p, &mut tally)? } else { None };
    let window_end = Instant::now() + ctx.plan.scale_window;
    let mut next_sample = Instant::now() + SAMPLE_EVERY;
    while let Some(left) = window_end
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        if let Some(event) = p.next(left.min(SAMPLE_EVERY))? {
            tally.observe(event);
        }
        if Instant::now() >= next_sample {
            connections_max = connections_max.max(count()?);
            next_sample += SAMPLE_EVERY;
        }
    }
    let idle_cpu_percent = (procfs::cpu_seconds(pid).map_err(io("reading CPU time"))? - cpu0)
        / ctx.plan.scale_window.as_secs_f64()
        * 100.0;
    let requests1 = if rust { requests(&mut p, &mut tally)? } else { None };
    let idle_requests_per_min = requests0
        .zip(requests1)
        .map(|(a, b)| b.saturating_sub(a) as f64 / ctx.plan.scale_window.as_secs_f64() * 60.0);
    let held = tally.held.len();
    let delete_reaction_s = deletes(operator, &mut p, &mut tally, &key)?;
    let (session_loss_s, session_keys_lost) = match (mode, tally.session.clone()) {
        (Mode::KeySet, Some(session)) => session_loss(operator, &mut p, &mut tally, &session)?,
        _ => (None, 0),
    };
    p.quit(Duration::from_secs(60));
    let kib_per_lock = (held > 0).then(|| (rss_held_kib as f64 - rss_before_kib as f64) / held as f64);
    Ok(ScaleRun {
        client: kind,
        mode,
        conn_limit: limit,
        locks: n,
        held,
        seconds_to_hold,
        rss_before_kib,
        rss_held_kib,
        kib_per_lock,
        connections,
        connections_max,
        idle_cpu_percent,
        lost: tally.lost,
        errors: tally.errors,
        error_samples: tally.error_samples,
        deletes: tally.deleted.len(),
        delete_reaction_s,
        idle_requests_per_min,
        session_loss_s,
        session_keys_lost,
    })
}

/// The requests the contender's clients sent so far (events meanwhile are tallied).
fn requests(p: &mut Contenders, tally: &mut Tally) -> Result<Option<u64>, BenchError> {
    p.send(&Command::Stats)?;
    let until = Instant::now() + Duration::from_secs(10);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match p.next(left)? {
            Some(Event::Stats { requests }) => return Ok(Some(requests)),
            Some(event) => tally.observe(event),
            None => break,
        }
    }
    Ok(None)
}

/// The operator destroys the key set's session: the seconds until every key still held is
/// reported lost (or the last reported within [`REACTION_WAIT`]), and how many were.
fn session_loss(
    operator: &Operator,
    p: &mut Contenders,
    tally: &mut Tally,
    session: &str,
) -> Result<(Option<f64>, usize), BenchError> {
    let held: BTreeSet<u64> = tally.held.clone();
    let at = now_ns();
    operator.destroy_session(session)?;
    let until = Instant::now() + REACTION_WAIT;
    let mut last = None;
    let mut lost = 0;
    while lost < held.len() {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        match p.next(left)? {
            Some(Event::Lost { id, t_ns }) if held.contains(&id) => {
                lost += 1;
                last = Some(t_ns.saturating_sub(at) as f64 / 1e9);
            }
            Some(event) => tally.observe(event),
            None => break,
        }
    }
    Ok((last, lost))
}

/// The operator deletes up to [`DELETES`] held keys, spread over the locks, one after the other;
/// the seconds from each delete to its holder's `lost`, for those reported within
/// [`REACTION_WAIT`].
fn deletes(
    operator: &Operator,
    p: &mut Contenders,
    tally: &mut Tally,
    key: &impl Fn(u64) -> String,
) -> Result<Vec<f64>, BenchError> {
    let held: Vec<u64> = tally.held.iter().copied().collect();
    let step = (held.len() / DELETES).max(1);
    for &id in held.iter().step_by(step).take(DELETES) {
        tally.deleted.insert(id, now_ns());
        operator.delete_key(&key(id))?;
    }
    let until = Instant::now() + REACTION_WAIT;
    while tally.reactions.len() < tally.deleted.len() {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        if let Some(event) = p.next(left)? {
            tally.observe(event);
        }
    }
    Ok(tally.reactions.clone())
}

/// What the events of one run added up to.
struct Tally {
    held: BTreeSet<u64>,
    /// The session of the first hold (a key set's only one).
    session: Option<String>,
    last_hold: u64,
    /// Losses other than the operator's deletes.
    lost: usize,
    /// The keys the operator deleted, and when.
    deleted: BTreeMap<u64, u64>,
    /// Seconds from a delete to its `lost`.
    reactions: Vec<f64>,
    errors: usize,
    error_samples: Vec<String>,
}

impl Tally {
    fn new(started: u64) -> Tally {
        Tally {
            held: BTreeSet::new(),
            session: None,
            last_hold: started,
            lost: 0,
            deleted: BTreeMap::new(),
            reactions: Vec::new(),
            errors: 0,
            error_samples: Vec::new(),
        }
    }

    fn observe(&mut self, event: Event) {
        match event {
            Event::Held {
                id, t_ns, session, ..
            } => {
                self.held.insert(id);
                self.session.get_or_insert(session);
                self.last_hold = self.last_hold.max(t_ns);
            }
            Event::Lost { id, t_ns } => {
                self.held.remove(&id);
                match self.deleted.get(&id) {
                    Some(&at) => self.reactions.push(t_ns.saturating_sub(at) as f64 / 1e9),
                    None => self.lost += 1,
                }
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

impl ScaleRun {
    /// The delete-to-`lost` times, in seconds.
    pub fn reaction(&self) -> Option<stats::Summary> {
        stats::Summary::of(&self.delete_reaction_s)
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

/// The clients the scale scenario runs: a queued lock's line matters only under contention, and
/// these locks are each alone on their key.
fn scaled<'c>(ctx: &'c Ctx<'_>) -> impl Iterator<Item = &'c ClientKind> {
    ctx.clients.iter().filter(|k| **k != ClientKind::Queued)
}
