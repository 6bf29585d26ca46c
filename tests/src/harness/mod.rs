//! Virtual-time runs of several [`LockMachine`]s or [`SemaphoreMachine`]s (as
//! [`HoldMachine`]s) against one [`SimConsul`], with a seeded, fault-injecting network in between
//! (after quinn-proto's `Pair` and str0m's sans-IO network emulator). One virtual clock jumps to
//! the next thing that happens; nothing sleeps.
//!
//! [`run`] plays a [`Scenario`] of lock contenders, [`run_target`] one of lock or semaphore
//! contenders ([`Target`]), and both return an [`Outcome`]: every request, reply and event with
//! its virtual time (the trace, and its hash: the same scenario gives the same hash), every hold,
//! and every violation of the properties checked along the way:
//! - safety: never more holders at once in their own view than the limit (one for a lock),
//!   except after an operator action on a holder (deleted its key, destroyed its session,
//!   overwrote the key; for a semaphore slot, also one between the write that granted it and its
//!   `Acquired`), and then only until that holder hears of it (measured, and bounded by the
//!   holder's TTL);
//! - fencing: for a lock, successive holders' tokens strictly increase; for a semaphore, a slot
//!   granted before another contender's attempt sent its first check-and-set carries a smaller
//!   token than that contender's next slot (the `.lock`'s `ModifyIndex` orders grants);
//! - machine invariants: `poll_timeout` never before `now`, every request's deadline after
//!   `now`, at most one renew outstanding per client, `Acquired` before `Lost`/`Released`,
//!   nothing emitted by a quiescent machine;
//! - cleanup: once everyone stops, every machine settles with nothing in flight, no session
//!   outlives its TTL window, and (semaphore) no contender key is left under the prefix.
//!
//! Liveness is measured ([`Outcome::first_acquire_after`]) for the caller to bound.

mod checks;
mod scenario;
pub mod strategies;
mod verdict;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, AfterInvalidation, FencingToken, HoldMachine, HoldOptions, LockEvent, LockMachine, LockOptions,
    LockStatus, LossReason, MIN_HOLD_WINDOW, Reply, RequestId, SemaphoreMachine, SemaphoreOptions,
    SemaphoreState, SessionChoice, TransportError, TransportErrorKind, Waiting,
};
pub use scenario::{ClientSpec, Fault, FaultKind, Scenario, Target};
pub use verdict::{check_liveness, liveness_bound, most_at_once, verdict};

use crate::sim::{QueryId, SimConsul, SimReply};

/// One hold: from `Acquired` to its end, in virtual time from the start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Which client.
    pub client: usize,
    /// Its fencing token.
    pub token: FencingToken,
    /// When `Acquired` came.
    pub from: Duration,
    /// When `Lost` or `Released` came (`None`: held at the end, a violation of cleanup).
    pub until: Option<Duration>,
    /// The loss reason, if it ended in a loss.
    pub lost: Option<LossReason>,
}

/// What a run gives back.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Every request, reply, event and fault with its virtual time, one per line.
    pub trace: Vec<String>,
    /// FNV-1a of the trace: equal for equal scenarios.
    pub trace_hash: u64,
    /// Every hold, in order of acquisition.
    pub holds: Vec<Hold>,
    /// Property violations; empty when all held.
    pub violations: Vec<String>,
    /// The longest overlap of two holders after an operator action (zero when none).
    pub max_operator_overlap: Duration,
    /// Virtual time when the run ended.
    pub ended: Duration,
    /// Requests sent, by all clients.
    pub requests: usize,
}

impl Outcome {
    /// When the first hold that was under way at or began after `t` began (`t` itself when a
    /// hold spans it): the measure of liveness after the last fault heals.
    pub fn first_acquire_after(&self, t: Duration) -> Option<Duration> {
        self.holds
            .iter()
            .filter_map(|h| match h.until {
                Some(until) if until <= t => None,
                _ => Some(h.from.max(t)),
            })
            .min()
    }

    /// Panics, with the violations and the end of the trace, unless every property held.
    pub fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "violations: {:#?}\n--- trace tail ---\n{}",
            self.violations,
            self.trace_tail(80)
        );
    }

    /// The last `n` trace lines, for a failure message.
    pub fn trace_tail(&self, n: usize) -> String {
        let start = self.trace.len().saturating_sub(n);
        self.trace[start..].join("\n")
    }
}

/// Plays `scenario` to its end, with lock contenders.
pub fn run(scenario: &Scenario) -> Outcome {
    run_target(scenario, Target::Lock)
}

/// Plays `scenario` to its end, with contenders for `target`.
pub fn run_target(scenario: &Scenario, target: Target) -> Outcome {
    let mut h = Harness::new(scenario, target);
    h.play();
    h.finish()
}

/// A request as it reached the simulated agent, for replaying elsewhere (the differential
/// tests replay what the machines themselves sent against a real agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// Which client sent it.
    pub client: usize,
    /// The method.
    pub method: String,
    /// The path and query, as sent.
    pub uri: String,
    /// The body.
    pub body: Vec<u8>,
    /// For a session create the agent answered: the session's ID.
    pub created: Option<String>,
}

/// [`run_target`], also giving every request that reached the agent, in the order it did.
pub fn run_recorded(scenario: &Scenario, target: Target) -> (Outcome, Vec<Arrival>) {
    let mut h = Harness::new(scenario, target);
    h.arrivals = Some(Vec::new());
    h.play();
    let arrivals = h.arrivals.take().unwrap_or_default();
    (h.finish(), arrivals)
}

/// What undoes an operator's action at the end of its window.
#[derive(Debug)]
enum Undo {
    /// Delete the key an operator overwrote.
    DeleteKey,
    /// Destroy the operator's session that took the key over.
    DestroySession(String),
}

#[derive(Debug)]
enum Delivery {
    ToServer {
        client: usize,
        id: RequestId,
        request: http::Request<Vec<u8>>,
    },
    ToClient {
        client: usize,
        id: RequestId,
        reply: Reply,
        /// Already held back for a lagging driver (or a duplicate): handed over as it is.
        late: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Lock,
    Unlock,
    /// The caller gives up on an attempt (its future dropped).
    Cancel,
}

struct Client {
    spec: ClientSpec,
    machine: Box<dyn HoldMachine>,
    /// How long after a renew is sent the client may trust its hold (the TTL, or a shorter
    /// lock-delay of a health-bound session): its renewals come every half of it.
    hold_window: Duration,
    /// Index into `holds` of the current hold.
    holding: Option<usize>,
    /// Semaphore: when the current attempt sent its first check-and-set of the `.lock`.
    first_cas: Option<Duration>,
    /// Lock: when the current attempt last sent an acquire of the key (the grant it reports
    /// happened between then and the report).
    acquire_sent: Option<Duration>,
    /// `unlock` was called and `Released` has not come yet.
    releasing: bool,
    next_op: Option<(Instant, Op)>,
    /// Requests sent and not yet answered, with their path and deadline.
    outstanding: BTreeMap<RequestId, (String, Instant)>,
    /// When it last called `lock`.
    attempt_from: Duration,
    /// What [`checks`] follows of it.
    checks: checks::ClientChecks,
    /// Queued: the current attempt's place in line (its entry's rank), once the agent shows it.
    rank: Option<u64>,
    /// The agent's index when the current attempt began: older entries are an earlier one's.
    attempt_index: u64,
}

/// An operator action: when, and on whose hold.
#[derive(Clone, Debug)]
struct OperatorAction {
    at: Duration,
    /// The session whose hold it acts on; `None`: every hold (the lock's key, the `.lock`).
    session: Option<String>,
}

impl OperatorAction {
    fn touches(&self, hold: &Hold) -> bool {
        self.session
            .as_ref()
            .is_none_or(|s| s == hold.token.session.as_str())
    }
}

struct Harness<'s> {
    scenario: &'s Scenario,
    target: Target,
    /// The semaphore's `.lock` (semaphore runs).
    lock_key: String,
    base: Instant,
    now: Instant,
    sim: SimConsul,
    rng: u64,
    seq: u64,
    clients: Vec<Client>,
    queue: BTreeMap<(Instant, u64), Delivery>,
    parked: HashMap<QueryId, (usize, RequestId)>,
    trace: Vec<String>,
    holds: Vec<Hold>,
    violations: Vec<String>,
    max_operator_overlap: Duration,
    /// The operator's actions.
    operator_actions: Vec<OperatorAction>,
    /// For each hold (as `holds`), the holds that were over the limit with it when it began
    /// (excused by an operator action): its overlap with them is measured when they end.
    culprits: Vec<Vec<usize>>,
    /// For each hold (as `holds`), since when an operator action on it excuses it: its start for
    /// a lock; for a semaphore, its attempt's first check-and-set (an action between the write
    /// that granted the slot and the `Acquired` event acts on the slot).
    exposed: Vec<Duration>,
    last_token: Option<FencingToken>,
    stopped: bool,
    /// What reached the agent, when recording ([`run_recorded`]).
    arrivals: Option<Vec<Arrival>>,
    requests: usize,
    leader: bool,
    /// Operator actions to undo at these offsets.
    restores: Vec<(Duration, Undo)>,
    done_faults: Vec<bool>,
    /// When the agent's index moved (recent ones), for the request budget.
    index_changes: VecDeque<Duration>,
    last_index: u64,
    /// Agent restarts so far (each seeds the new agent apart).
    restarts: u64,
    /// When the lock's key was last freed, until someone holds it again.
    freed_at: Option<Duration>,
    /// The session holding the lock's key, as the agent last said.
    key_session: Option<String>,
    /// When the agent last restarted with nothing (tokens compare only within an epoch).
    epoch: Duration,
}

const MAX_STEPS: usize = 2_000_000;

/// The options every semaphore client of `scenario` shares.
fn semaphore_options(scenario: &Scenario, limit: u32) -> SemaphoreOptions {
    SemaphoreOptions::new(&scenario.key, limit).unwrap_or_else(|e| panic!("scenario prefix: {e}"))
}

/// Client `i`'s machine, with its spec's options, and its session's hold window (how long
/// after a renew is sent it may trust its hold: the renew deadline it must keep).
fn machine(scenario: &Scenario, target: Target, i: usize, seed: u64) -> (Box<dyn HoldMachine>, Duration) {
    let spec = &scenario.clients[i];
    let config = ClientConfig::default();
    let tune = |hold: &mut HoldOptions| {
        hold.seed = seed;
        hold.value = format!("client-{i}").into_bytes();
        hold.monitor_retries = spec.monitor_retries;
        hold.acquire_error_budget = Some(spec.error_budget);
        if let Some(wait) = spec.try_once {
            hold.try_once = true;
            hold.wait_time = wait;
        }
        if let Some(s) = hold.session_options_mut() {
            s.ttl = spec.ttl;
            s.lock_delay = spec.lock_delay;
            s.name = format!("client-{i}");
            // A health-bound session needs a lock-delay to hold by; without one, the TTL alone.
            if spec.lock_delay.is_some_and(|d| d < MIN_HOLD_WINDOW) {
                *s = s.clone().ttl_only();
            }
        }
    };
    let window = |hold: &HoldOptions, after: AfterInvalidation| match &hold.session {
        SessionChoice::Create(s) => s.hold_window(after),
        SessionChoice::Existing(_) => spec.ttl,
    };
    match target {
        Target::Lock => {
            let mut options = LockOptions::new(&scenario.key).unwrap_or_else(|e| panic!("scenario key: {e}"));
            tune(&mut options.hold);
            if spec.queued {
                options.waiting = Waiting::Queue;
            }
            let window = window(&options.hold, AfterInvalidation::LockDelay);
            let machine =
                LockMachine::new(config, options).unwrap_or_else(|e| panic!("client {i} options: {e}"));
            (Box::new(machine), window)
        }
        Target::Semaphore { limit } => {
            let mut options = semaphore_options(scenario, limit);
            tune(&mut options.hold);
            let window = window(&options.hold, AfterInvalidation::TakenAtOnce);
            let machine =
                SemaphoreMachine::new(config, options).unwrap_or_else(|e| panic!("client {i} options: {e}"));
            (Box::new(machine), window)
        }
    }
}

impl<'s> Harness<'s> {
    fn new(scenario: &'s Scenario, target: Target) -> Harness<'s> {
        let base = Instant::now();
        let clients = scenario
            .clients
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let seed = scenario.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let (machine, hold_window) = machine(scenario, target, i, seed);
                Client {
                    spec: spec.clone(),
                    machine,
                    hold_window,
                    holding: None,
                    first_cas: None,
                    acquire_sent: None,
                    releasing: false,
                    next_op: Some((base + spec.start, Op::Lock)),
                    outstanding: BTreeMap::new(),
                    attempt_from: Duration::ZERO,
                    checks: checks::ClientChecks::default(),
                    rank: None,
                    attempt_index: 0,
                }
            })
            .collect();
        let lock_key = match target {
            Target::Lock => scenario.key.clone(),
            Target::Semaphore { limit } => semaphore_options(scenario, limit).lock_key().as_str().to_owned(),
        };
        Harness {
            scenario,
            target,
            lock_key,
            base,
            now: base,
            sim: SimConsul::new(scenario.seed, base),
            rng: scenario.seed ^ 0x5eed,
            seq: 0,
            clients,
            queue: BTreeMap::new(),
            parked: HashMap::new(),
            trace: Vec::new(),
            holds: Vec::new(),
            violations: Vec::new(),
            max_operator_overlap: Duration::ZERO,
            operator_actions: Vec::new(),
            culprits: Vec::new(),
            exposed: Vec::new(),
            last_token: None,
            stopped: false,
            arrivals: None,
            requests: 0,
            leader: true,
            restores: Vec::new(),
            done_faults: vec![false; scenario.faults.len()],
            index_changes: VecDeque::new(),
            last_index: 0,
            restarts: 0,
            freed_at: None,
            key_session: None,
            epoch: Duration::ZERO,
        }
    }

    fn t(&self) -> Duration {
        self.now.duration_since(self.base)
    }

    fn log(&mut self, line: impl AsRef<str>) {
        let t = self.t();
        self.trace
            .push(format!("{:>10.3} {}", t.as_secs_f64(), line.as_ref()));
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 20 {
            let t = self.t();
            self.log(format!("VIOLATION {what}"));
            self.violations.push(format!("at {t:?}: {what}"));
        }
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// One-way latency for `client` now: 0.5 to 5 ms, plus any latency fault.
    fn latency(&mut self, client: usize) -> Duration {
        let base = Duration::from_micros(500 + self.random() % 4_500);
        let t = self.t();
        let extra: Duration = self
            .scenario
            .faults
            .iter()
            .filter(|f| f.active(t))
            .filter_map(|f| match f.kind {
                FaultKind::Latency { client: c, extra } if c == client => Some(extra),
                _ => None,
            })
            .sum();
        let reorder = self
            .scenario
            .faults
            .iter()
            .filter(|f| f.active(t))
            .find_map(|f| match f.kind {
                FaultKind::Reorder { client: c, up_to } if c == client => Some(up_to),
                _ => None,
            });
        let jitter = match reorder {
            Some(up_to) => Duration::from_micros(self.random() % (up_to.as_micros().max(1) as u64)),
            None => Duration::ZERO,
        };
        base + extra + jitter
    }

    fn fault_on(&self, client: usize, at: Duration) -> Option<FaultKind> {
        self.scenario
            .faults
            .iter()
            .filter(|f| f.active(at))
            .find_map(|f| match f.kind {
                FaultKind::Hang { client: c }
                | FaultKind::Refuse { client: c }
                | FaultKind::Error500 { client: c }
                | FaultKind::TooManyRequests { client: c }
                | FaultKind::Partition { client: c }
                    if c == client =>
                {
                    Some(f.kind.clone())
                }
                _ => None,
            })
    }

    /// When client `i`'s pause ends, if it is paused at `at`.
    fn paused_until(&self, client: usize, at: Duration) -> Option<Duration> {
        self.scenario
            .faults
            .iter()
            .filter(|f| f.active(at) && f.kind == FaultKind::Pause { client })
            .map(|f| f.from + f.lasting)
            .max()
    }

    /// How late client `i`'s driver runs at `at` (zero when it keeps up).
    fn lag_of(&self, client: usize, at: Duration) -> Duration {
        self.scenario
            .faults
            .iter()
            .filter(|f| f.active(at))
            .filter_map(|f| match f.kind {
                FaultKind::Lag { client: c, lag } if c == client => Some(lag),
                _ => None,
            })
            .max()
            .unwrap_or_default()
    }

    /// Whether a window fault of a kind `is` is active on `client` at `at`.
    fn active_on(&self, client: usize, at: Duration, is: impl Fn(&FaultKind) -> bool) -> bool {
        self.scenario
            .faults
            .iter()
            .any(|f| f.active(at) && f.kind.touches(client) && is(&f.kind))
    }

    /// Resets client `client`'s connections (every client's, `None`): its parked reads and the
    /// replies on their way to it fail as a reset connection does.
    fn reset_connections(&mut self, client: Option<usize>) {
        let hit = |c: usize| client.is_none_or(|x| x == c);
        let parked: Vec<(QueryId, usize, RequestId)> = self
            .parked
            .iter()
            .filter(|(_, (c, _))| hit(*c))
            .map(|(q, (c, id))| (*q, *c, *id))
            .collect();
        for (query, c, id) in parked {
            self.parked.remove(&query);
            self.sim.abandon(query);
            let reset = Err(TransportError::new(
                TransportErrorKind::Io,
                "connection reset by peer",
            ));
            self.schedule(self.now + Duration::from_millis(1), to_client(c, id, reset));
        }
        for delivery in self.queue.values_mut() {
            if let Delivery::ToClient { client: c, reply, .. } = delivery {
                if hit(*c) {
                    *reply = Err(TransportError::new(
                        TransportErrorKind::Io,
                        "connection reset by peer",
                    ));
                }
            }
        }
    }

    fn schedule(&mut self, at: Instant, delivery: Delivery) {
        self.seq += 1;
        self.queue.insert((at, self.seq), delivery);
    }

    fn contention_end(&self) -> Instant {
        self.base + self.scenario.duration
    }

    fn next_time(&self) -> Option<Instant> {
        // Timers of the machines and the simulator may fall due at `now` again (that is a spin,
        // caught by the step counter); scheduled boundaries are handled once, so only later ones
        // count.
        let mut due: Vec<Instant> = Vec::new();
        due.extend(self.queue.keys().next().map(|(t, _)| *t));
        due.extend(self.sim.poll_timeout());
        let t = self.t();
        due.extend(
            (0..self.clients.len())
                .filter(|i| self.paused_until(*i, t).is_none())
                .filter_map(|i| Some(self.clients[i].machine.poll_timeout()? + self.lag_of(i, t))),
        );
        let due = due.into_iter().filter(|t| *t >= self.now).min();
        let mut candidates: Vec<Instant> = Vec::new();
        candidates.extend(self.clients.iter().filter_map(|c| c.next_op.map(|(t, _)| t)));
        if !self.stopped {
            candidates.push(self.contention_end());
        }
        for (i, f) in self.scenario.faults.iter().enumerate() {
            if !self.done_faults[i] {
                candidates.push(self.base + f.from);
            }
            if !f.kind.is_operator() {
                candidates.push(self.base + f.from + f.lasting);
            }
        }
        candidates.extend(self.restores.iter().map(|(d, _)| self.base + *d));
        let later = candidates.into_iter().filter(|t| *t > self.now).min();
        due.into_iter().chain(later).min()
    }

    fn play(&mut self) {
        let hard_stop = self.contention_end() + Duration::from_secs(600);
        let mut steps = 0usize;
        let mut same_instant = 0usize;
        // What is scheduled at the very start happens before anything else.
        self.step();
        while let Some(t) = self.next_time() {
            if t > hard_stop {
                self.violation("the run did not settle within 600 s after contention ended".into());
                break;
            }
            steps += 1;
            same_instant = if t == self.now { same_instant + 1 } else { 0 };
            if steps > MAX_STEPS || same_instant > 10_000 {
                self.violation(format!(
                    "no progress: {steps} steps, {same_instant} at one instant"
                ));
                break;
            }
            self.now = t;
            self.step();
            if self.stopped && self.settled() {
                break;
            }
        }
    }

    fn settled(&self) -> bool {
        self.queue.is_empty()
            && self
                .clients
                .iter()
                .all(|c| c.machine.is_quiescent() && c.next_op.is_none())
    }

    fn step(&mut self) {
        let now = self.now;
        let t = self.t();
        // Contention ends: everyone stops (cancel also unlocks a held lock).
        if !self.stopped && now >= self.contention_end() {
            self.stopped = true;
            self.log("contention ends: every client cancels");
            for i in 0..self.clients.len() {
                self.clients[i].next_op = None;
                self.clients[i].machine.cancel(now);
                // Cancel while holding is an unlock: the hold ends here, in the user's view.
                self.end_hold(i, None);
            }
        }
        self.apply_faults(t);
        // Client operations.
        for i in 0..self.clients.len() {
            if self.paused_until(i, t).is_some() {
                continue;
            }
            if let Some((at, op)) = self.clients[i].next_op {
                if at <= now && !self.stopped {
                    self.clients[i].next_op = None;
                    self.clients[i].checks.calls.push_back(t);
                    let result = match op {
                        Op::Lock => {
                            self.clients[i].first_cas = None;
                            self.clients[i].acquire_sent = None;
                            self.clients[i].attempt_from = t;
                            self.clients[i].rank = None;
                            self.clients[i].attempt_index = self.sim.index();
                            let result = self.clients[i].machine.lock(now);
                            if let Some(after) = self.clients[i].spec.cancel_after.filter(|_| result.is_ok())
                            {
                                self.clients[i].next_op = Some((now + after, Op::Cancel));
                            }
                            result
                        }
                        Op::Unlock => self.clients[i].machine.unlock(now),
                        Op::Cancel => {
                            self.clients[i].machine.cancel(now);
                            Ok(())
                        }
                    };
                    self.log(format!("client {i} {op:?} -> {result:?}"));
                    if op == Op::Unlock && result.is_ok() {
                        self.end_hold(i, None);
                    }
                }
            }
        }
        let woken = self.sim.advance(now);
        self.route_woken(woken);
        // Deliveries due now.
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let delivery = entry.remove();
            self.deliver(delivery);
        }
        for i in 0..self.clients.len() {
            if self.paused_until(i, t).is_some() {
                continue;
            }
            let lag = self.lag_of(i, t);
            if self.clients[i]
                .machine
                .poll_timeout()
                .is_some_and(|at| at + lag <= now)
            {
                let quiet = self.clients[i].machine.is_quiescent();
                self.clients[i].machine.handle_timeout(now);
                self.drain(i, quiet);
            }
            // Requests past their deadline are no longer outstanding.
            self.clients[i]
                .outstanding
                .retain(|_, (_, deadline)| *deadline > now);
        }
        for i in 0..self.clients.len() {
            if self.paused_until(i, t).is_none() {
                self.drain(i, false);
                self.check_machine(i);
            }
        }
        let index = self.sim.index();
        for _ in self.last_index..index {
            self.index_changes.push_back(t);
        }
        self.last_index = self.last_index.max(index);
        while self
            .index_changes
            .front()
            .is_some_and(|c| *c + 2 * checks::WINDOW < t)
        {
            self.index_changes.pop_front();
        }
        self.follow_line();
        self.checks_each_step();
        self.checks_handoff();
    }

    /// The prefix of the lock's line.
    fn queue_prefix(&self) -> String {
        format!("{}/.queue/", self.scenario.key.trim_end_matches('/'))
    }

    /// The keys of the lock's line, as the agent holds them.
    fn queue_entries(&self) -> Vec<String> {
        let prefix = self.queue_prefix();
        self.sim
            .kv_entries()
            .filter(|e| e.key.starts_with(&prefix))
            .map(|e| e.key.clone())
            .collect()
    }

    /// Notes each queued waiter's place in line as the agent shows it: its entry's rank (the
    /// value of an entry made again, else its `CreateIndex`), as the machines order the line.
    fn follow_line(&mut self) {
        let prefix = self.queue_prefix();
        for c in &mut self.clients {
            if !c.spec.queued || c.machine.status() != LockStatus::Acquiring {
                continue;
            }
            let Some(session) = c.machine.session_id() else {
                continue;
            };
            let Some(entry) = self.sim.kv(&format!("{prefix}{session}")) else {
                continue;
            };
            if entry.create_index <= c.attempt_index || entry.session.as_deref() != Some(session.as_str()) {
                continue;
            }
            let claimed = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|r| *r < entry.create_index);
            let rank = claimed.unwrap_or(entry.create_index);
            c.rank = Some(c.rank.map_or(rank, |r| r.min(rank)));
        }
    }

    /// FIFO: a queued client that acquires overtakes no queued client still waiting that took
    /// its place in line before it, unless a fault touched either, or the agent or the line.
    fn check_fifo(&mut self, i: usize) {
        let Some(mine) = self.clients[i].rank.filter(|_| self.clients[i].spec.queued) else {
            return;
        };
        let excused = |j: usize| {
            self.scenario.faults.iter().any(|f| {
                f.kind.touches(i)
                    || f.kind.touches(j)
                    || f.kind.is_operator()
                    || matches!(f.kind, FaultKind::DeleteQueue | FaultKind::AgentRestart)
            })
        };
        let overtaken: Vec<usize> = (0..self.clients.len())
            .filter(|&j| j != i && self.clients[j].spec.queued)
            .filter(|&j| self.clients[j].machine.status() == LockStatus::Acquiring)
            .filter(|&j| self.clients[j].rank.is_some_and(|r| r < mine))
            .filter(|&j| !excused(j))
            .collect();
        for j in overtaken {
            self.violation(format!(
                "fifo: client {i} acquired ahead of client {j}, earlier in line"
            ));
        }
    }

    fn apply_faults(&mut self, t: Duration) {
        let now = self.now;
        for i in 0..self.scenario.faults.len() {
            let fault = self.scenario.faults[i].clone();
            if !self.done_faults[i] && t >= fault.from {
                self.done_faults[i] = true;
                self.log(format!("fault {:?} for {:?}", fault.kind, fault.lasting));
                let semaphore = matches!(self.target, Target::Semaphore { .. });
                match fault.kind {
                    FaultKind::DestroyHolderSession if semaphore => {
                        if let Some(session) = self.semaphore_holder() {
                            self.log(format!("operator destroys session {session}"));
                            self.sim.destroy_session(now, &session);
                            self.act(t, Some(session));
                        }
                    }
                    FaultKind::DestroyHolderSession => {
                        let holder = self.sim.kv(&self.scenario.key).and_then(|e| e.session.clone());
                        if let Some(session) = holder {
                            self.sim.destroy_session(now, &session);
                            self.act(t, None);
                        }
                    }
                    FaultKind::DeleteKey if semaphore => {
                        if let Some(session) = self.semaphore_holder() {
                            let key = format!("{}/{session}", self.scenario.key.trim_end_matches('/'));
                            self.log(format!("operator deletes {key}"));
                            if self.sim.delete_key(now, &key) {
                                self.act(t, Some(session));
                            }
                        }
                    }
                    FaultKind::DeleteKey if self.sim.delete_key(now, &self.scenario.key) => {
                        self.act(t, None);
                    }
                    FaultKind::ConnReset { client } => {
                        self.log(format!("client {client}'s connections reset"));
                        self.reset_connections(Some(client));
                    }
                    FaultKind::AgentRestart => {
                        self.log("the agent restarts with nothing: sessions, keys and indexes gone");
                        self.reset_connections(None);
                        self.restarts += 1;
                        self.sim =
                            SimConsul::new(self.scenario.seed ^ self.restarts.wrapping_mul(0x5851_f42d), now);
                        self.leader = true;
                        self.last_index = self.sim.index();
                        // Every hold is gone with the agent's state: as an operator's action on
                        // each, until its holder hears. Fencing starts again: the indexes that
                        // make the tokens are gone too (Consul keeps them across a server
                        // restart, in its snapshot; a `-dev` agent does not).
                        self.act(t, None);
                        self.last_token = None;
                        self.epoch = t;
                        // What an attempt wrote before is gone: only its writes to the new
                        // agent can grant it anything.
                        for c in &mut self.clients {
                            c.first_cas = None;
                            c.acquire_sent = None;
                        }
                    }
                    FaultKind::DeleteQueue => {
                        let entries = self.queue_entries();
                        self.log(format!("operator deletes the line: {} entries", entries.len()));
                        for key in entries {
                            self.sim.delete_key(now, &key);
                        }
                    }
                    FaultKind::OverwriteKey => {
                        let key = self.lock_key.clone();
                        self.sim.put_key(now, &key, 0, b"operator");
                        self.act(t, None);
                        self.restores.push((fault.from + fault.lasting, Undo::DeleteKey));
                    }
                    FaultKind::TakeOver if !semaphore => match self.operator_session() {
                        Some(session) => {
                            let key = self.scenario.key.clone();
                            if self.sim.take_over(now, &key, &session) {
                                self.log(format!("operator takes the key over for session {session}"));
                                self.act(t, None);
                            }
                            self.restores
                                .push((fault.from + fault.lasting, Undo::DestroySession(session)));
                        }
                        None => self.log("operator could not create a session"),
                    },
                    _ => {}
                }
            }
        }
        let (due, later) = std::mem::take(&mut self.restores)
            .into_iter()
            .partition::<Vec<_>, _>(|(d, _)| *d <= t);
        self.restores = later;
        for (_, undo) in due {
            match undo {
                Undo::DeleteKey => {
                    self.log("operator deletes the overwritten key");
                    let key = self.lock_key.clone();
                    self.sim.delete_key(now, &key);
                    self.act(t, None);
                }
                // No lock-delay: the key is free at once.
                Undo::DestroySession(session) => {
                    self.log(format!("operator destroys its session {session}"));
                    self.sim.destroy_session(now, &session);
                }
            }
        }
        let electing = self
            .scenario
            .faults
            .iter()
            .any(|f| f.kind == FaultKind::LeaderElection && f.active(t));
        if electing == self.leader {
            self.leader = !electing;
            self.log(format!("leader: {}", self.leader));
            self.sim.set_leader(now, self.leader);
        }
    }

    /// A session of the operator's (no TTL, no lock-delay), as `consul` commands create one;
    /// `None` when the agent refuses (no leader).
    fn operator_session(&mut self) -> Option<String> {
        let request = http::Request::builder()
            .method(http::Method::PUT)
            .uri("/v1/session/create")
            .body(br#"{"Name":"operator","LockDelay":"0s"}"#.to_vec())
            .ok()?;
        let SimReply::Now(reply) = self.sim.handle(self.now, &request) else {
            return None;
        };
        let created: serde_json::Value = serde_json::from_slice(reply.body()).ok()?;
        Some(created.get("ID")?.as_str()?.to_owned())
    }

    fn act(&mut self, at: Duration, session: Option<String>) {
        self.checks_on_operator(at, session.as_deref());
        self.operator_actions.push(OperatorAction { at, session });
    }

    /// A live session the semaphore's `.lock` lists as a holder, drawn from the seed.
    fn semaphore_holder(&mut self) -> Option<String> {
        let Target::Semaphore { limit } = self.target else {
            return None;
        };
        let entry = self.sim.kv(&self.lock_key)?;
        let state = SemaphoreState::decode(&entry.value, limit).ok()?;
        let live: Vec<String> = state
            .holders
            .into_keys()
            .filter(|s| self.sim.session(s).is_some())
            .collect();
        if live.is_empty() {
            return None;
        }
        let pick = usize::try_from(self.random() % live.len() as u64).unwrap_or(0);
        live.into_iter().nth(pick)
    }

    fn route_woken(&mut self, woken: Vec<(QueryId, http::Response<Vec<u8>>)>) {
        for (query, response) in woken {
            if let Some((client, id)) = self.parked.remove(&query) {
                let latency = self.latency(client);
                self.schedule(
                    self.now + latency,
                    Delivery::ToClient {
                        client,
                        id,
                        reply: Ok(response),
                        late: false,
                    },
                );
            }
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        let t = self.t();
        match delivery {
            Delivery::ToServer { client, id, request } => {
                if matches!(self.fault_on(client, t), Some(FaultKind::Partition { .. })) {
                    self.log(format!("client {client} {id} lost on the way (partition)"));
                    return;
                }
                self.checks_on_arrival(client, &request);
                let acquire = request.method() == http::Method::PUT
                    && request
                        .uri()
                        .query()
                        .is_some_and(|q| q.split('&').any(|p| p.starts_with("acquire=")));
                if acquire && self.active_on(client, t, |k| matches!(k, FaultKind::RefuseAcquire { .. })) {
                    self.log(format!("client {client} {id} acquire answered false (refused)"));
                    let latency = self.latency(client);
                    let refused = http::Response::new(b"false".to_vec());
                    self.schedule(self.now + latency, to_client(client, id, Ok(refused)));
                    return;
                }
                let blocking = request.method() == http::Method::GET
                    && request
                        .uri()
                        .query()
                        .is_some_and(|q| q.split('&').any(|p| p.starts_with("index=")));
                let request =
                    if blocking && self.active_on(client, t, |k| matches!(k, FaultKind::NoBlock { .. })) {
                        self.log(format!("client {client} {id} answered without blocking"));
                        unblocked(request)
                    } else {
                        request
                    };
                let handled = self.sim.handle(self.now, &request);
                if let Some(arrivals) = &mut self.arrivals {
                    let created = match &handled {
                        SimReply::Now(r) if request.uri().path() == "/v1/session/create" => {
                            serde_json::from_slice::<serde_json::Value>(r.body())
                                .ok()
                                .and_then(|v| Some(v.get("ID")?.as_str()?.to_owned()))
                        }
                        _ => None,
                    };
                    arrivals.push(Arrival {
                        client,
                        method: request.method().to_string(),
                        uri: request
                            .uri()
                            .path_and_query()
                            .map_or_else(String::new, ToString::to_string),
                        body: request.body().clone(),
                        created,
                    });
                }
                match handled {
                    SimReply::Now(response) => {
                        let latency = self.latency(client);
                        self.schedule(
                            self.now + latency,
                            Delivery::ToClient {
                                client,
                                id,
                                reply: Ok(response),
                                late: false,
                            },
                        );
                    }
                    SimReply::Parked(query) => {
                        self.parked.insert(query, (client, id));
                    }
                }
                let woken = self.sim.advance(self.now);
                self.route_woken(woken);
            }
            Delivery::ToClient {
                client,
                id,
                reply,
                late,
            } => {
                // A paused process reads its replies when it resumes, before its timers.
                if let Some(until) = self.paused_until(client, t) {
                    let late = Delivery::ToClient {
                        client,
                        id,
                        reply,
                        late,
                    };
                    self.schedule(self.base + until, late);
                    return;
                }
                // A lagging driver hands replies over late.
                let lag = self.lag_of(client, t);
                if !late && !lag.is_zero() {
                    let later = Delivery::ToClient {
                        client,
                        id,
                        reply,
                        late: true,
                    };
                    self.schedule(self.now + lag, later);
                    return;
                }
                if !late && self.active_on(client, t, |k| matches!(k, FaultKind::Duplicate { .. })) {
                    let gap = Duration::from_millis(1 + self.random() % 50);
                    let copy = Delivery::ToClient {
                        client,
                        id,
                        reply: copy_reply(&reply),
                        late: true,
                    };
                    self.schedule(self.now + gap, copy);
                }
                if matches!(
                    self.fault_on(client, t),
                    Some(FaultKind::Partition { .. } | FaultKind::Hang { .. })
                ) {
                    self.log(format!("client {client} reply to {id} lost"));
                    return;
                }
                let line = match &reply {
                    Ok(r) => format!(
                        "client {client} <- {id} {} {}",
                        r.status().as_u16(),
                        String::from_utf8_lossy(&r.body()[..r.body().len().min(160)]).replace('\n', " ")
                    ),
                    Err(e) => format!("client {client} <- {id} {e}"),
                };
                self.log(line);
                // Past its deadline the machine has given up on it (a late driver serves the
                // deadline before it hands the reply over).
                let now = self.now;
                let live = self.clients[client]
                    .outstanding
                    .remove(&id)
                    .is_some_and(|(_, deadline)| deadline > now);
                self.checks_on_reply(client, id, &reply, live);
                let quiet = self.clients[client].machine.is_quiescent();
                self.clients[client].machine.handle_response(self.now, id, reply);
                self.drain(client, quiet);
            }
        }
    }

    /// Routes what client `i`'s machine wants; `was_quiescent`: it must want nothing.
    fn drain(&mut self, i: usize, was_quiescent: bool) {
        let now = self.now;
        let t = self.t();
        while let Some(action) = self.clients[i].machine.poll_action() {
            if was_quiescent {
                self.violation(format!("client {i}: a quiescent machine emitted {action:?}"));
            }
            match action {
                Action::Send(transmit) => {
                    self.requests += 1;
                    let path = transmit.request.uri().path().to_owned();
                    self.log(format!(
                        "client {i} -> {} {} {}",
                        transmit.id,
                        transmit.request.method(),
                        transmit.request.uri().path_and_query().map_or("", |p| p.as_str())
                    ));
                    if transmit.deadline <= now {
                        self.violation(format!(
                            "client {i}: request {} with a past deadline",
                            transmit.id
                        ));
                    }
                    let cas = transmit.request.method() == http::Method::PUT
                        && path == format!("/v1/kv/{}", self.lock_key)
                        && transmit
                            .request
                            .uri()
                            .query()
                            .is_some_and(|q| q.split('&').any(|p| p.starts_with("cas=")));
                    if cas
                        && matches!(self.target, Target::Semaphore { .. })
                        && self.clients[i].machine.status() == LockStatus::Acquiring
                        && self.clients[i].first_cas.is_none()
                    {
                        self.clients[i].first_cas = Some(t);
                    }
                    // The lock acquires with a one-operation lock transaction (`KvLockTxn`).
                    let acquire = transmit.request.method() == http::Method::PUT && path == "/v1/txn";
                    if acquire && matches!(self.target, Target::Lock) {
                        self.clients[i].acquire_sent = Some(t);
                    }
                    self.checks_on_send(i, transmit.id, &transmit.request);
                    self.clients[i]
                        .outstanding
                        .insert(transmit.id, (path, transmit.deadline));
                    let latency = self.latency(i);
                    match self.fault_on(i, t) {
                        Some(FaultKind::Refuse { .. }) => self.schedule(
                            now + Duration::from_millis(1),
                            to_client(
                                i,
                                transmit.id,
                                Err(TransportError::new(
                                    TransportErrorKind::Connect,
                                    "connection refused",
                                )),
                            ),
                        ),
                        Some(kind @ (FaultKind::Error500 { .. } | FaultKind::TooManyRequests { .. })) => {
                            let (status, body) = match kind {
                                FaultKind::TooManyRequests { .. } => (429, "rate limit exceeded"),
                                _ => (500, "injected failure"),
                            };
                            let response = http::Response::builder()
                                .status(status)
                                .body(body.as_bytes().to_vec())
                                .unwrap_or_default();
                            self.schedule(
                                now + latency,
                                Delivery::ToClient {
                                    client: i,
                                    id: transmit.id,
                                    reply: Ok(response),
                                    late: false,
                                },
                            );
                        }
                        _ => self.schedule(
                            now + latency,
                            Delivery::ToServer {
                                client: i,
                                id: transmit.id,
                                request: transmit.request,
                            },
                        ),
                    }
                }
                Action::Event(event) => self.on_event(i, event),
            }
        }
        self.checks_after_drain(i);
    }

    fn on_event(&mut self, i: usize, event: LockEvent) {
        let now = self.now;
        let t = self.t();
        match &event {
            // Its instants are the machine's, which a trace must not show: runs of one seed
            // start at different real instants.
            LockEvent::Retrying(retry) => self.log(format!(
                "client {i} EVENT Retrying({:?}, attempt {}, next in {:?})",
                retry.cause,
                retry.attempt,
                retry.next_try.saturating_duration_since(now)
            )),
            event => self.log(format!("client {i} EVENT {event:?}")),
        }
        self.checks_on_event(i, &event);
        let pause = self.clients[i].spec.pause;
        match &event {
            LockEvent::Acquired(token) => {
                let token = token.clone();
                if self.clients[i].holding.is_some() {
                    self.violation(format!("client {i}: Acquired while already holding"));
                }
                // An operator action on this hold between the request that granted it and now
                // (the grant happened before the action, and is reported after it) excuses it:
                // for a semaphore, since the attempt's first check-and-set of the `.lock`; for a
                // lock, since its last acquire was sent (found by the soak: a key deleted while a
                // slow confirming read was in flight).
                let exposed = match self.target {
                    Target::Lock => self.clients[i].acquire_sent.unwrap_or(t),
                    Target::Semaphore { .. } => self.clients[i].first_cas.unwrap_or(t),
                };
                let itself_excused = self.operator_actions.iter().any(|a| {
                    a.at >= exposed && a.session.as_ref().is_none_or(|s| s == token.session.as_str())
                });
                self.check_fencing(i, &token, itself_excused);
                // The others' holds, and those of them an operator action excuses: one on the
                // hold (its key, its session) since it began.
                let others: Vec<(usize, usize)> = self
                    .clients
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .filter_map(|(j, other)| other.holding.map(|h| (j, h)))
                    .collect();
                // (client, hold) pairs.
                type Holders = Vec<(usize, usize)>;
                // A holder paused, or whose driver ran late, during its hold believes on while it
                // cannot hear: that overlap is the stall's, which only the fencing token answers.
                let (excused, unexcused): (Holders, Holders) = others.iter().partition(|(j, h)| {
                    let (hold, since) = (&self.holds[*h], self.exposed[*h]);
                    let paused = self.stalled(*j, hold.from, t);
                    paused
                        || self
                            .operator_actions
                            .iter()
                            .any(|a| a.at >= since && a.touches(hold))
                });
                let limit = usize::try_from(self.target.limit()).unwrap_or(usize::MAX);
                let h = self.holds.len();
                match self.target {
                    Target::Lock if itself_excused => {}
                    Target::Lock => {
                        for (j, _) in unexcused {
                            self.violation(format!("safety: client {i} acquired while client {j} holds"));
                        }
                    }
                    Target::Semaphore { .. } if unexcused.len() + 1 > limit && !itself_excused => {
                        let holders: Vec<usize> = unexcused.iter().map(|(j, _)| *j).collect();
                        self.violation(format!(
                            "safety: client {i} acquired while clients {holders:?} hold (limit {limit})"
                        ));
                    }
                    Target::Semaphore { .. } => {}
                }
                // Over the limit: the excused holders (this one included, if excused) are the
                // culprits, until they hear of it.
                let culprits = if others.len() + 1 > limit {
                    let mut culprits: Vec<usize> = excused.iter().map(|(_, h)| *h).collect();
                    culprits.extend(itself_excused.then_some(h));
                    culprits
                } else {
                    Vec::new()
                };
                self.culprits.push(culprits);
                self.exposed.push(exposed);
                self.check_fifo(i);
                self.holds.push(Hold {
                    client: i,
                    token,
                    from: t,
                    until: None,
                    lost: None,
                });
                self.clients[i].holding = Some(self.holds.len() - 1);
                let hold = self.clients[i].spec.hold;
                self.clients[i].next_op = Some((now + hold, Op::Unlock));
            }
            LockEvent::Lost(reason) => {
                let Some(h) = self.clients[i].holding else {
                    return self.violation(format!("client {i}: Lost without a hold"));
                };
                self.end_hold(i, Some(reason.clone()));
                self.checks_on_loss(i, h);
                self.clients[i].next_op = (!self.stopped).then_some((now + pause, Op::Lock));
            }
            LockEvent::Released | LockEvent::ReleaseFailed(_) => {
                if !self.clients[i].releasing {
                    return self.violation(format!("client {i}: {event:?} without an unlock"));
                }
                self.clients[i].releasing = false;
                self.clients[i].next_op = (!self.stopped).then_some((now + pause, Op::Lock));
            }
            LockEvent::GaveUp | LockEvent::Failed(_) | LockEvent::Cancelled => {
                self.clients[i].next_op = (!self.stopped).then_some((now + pause, Op::Lock));
            }
            LockEvent::Destroyed
            | LockEvent::Retrying(_)
            | LockEvent::Proclaimed { .. }
            | LockEvent::ProclaimFailed(_) => {}
        }
    }

    /// Ends client `i`'s hold now, if it has one: by a loss, or (`None`) by its own unlock.
    fn end_hold(&mut self, i: usize, lost: Option<LossReason>) {
        let Some(h) = self.clients[i].holding.take() else {
            return;
        };
        let t = self.t();
        if lost.is_none() {
            self.clients[i].releasing = true;
        }
        self.holds[h].until = Some(t);
        self.holds[h].lost = lost;
        // The overlap this holder had with later holders that it put over the limit (only
        // possible after an operator action on it, which `on_event` checks when the later holder
        // acquires).
        let from = self.holds[h].from;
        let ttl = self.clients[i].spec.ttl;
        // A hold that was itself over the limit (an operator acted on it before it was reported)
        // counts whole.
        let overlaps: Vec<(usize, Duration)> = self.holds[h..]
            .iter()
            .zip(&self.culprits[h..])
            .enumerate()
            .filter(|(k, (later, culprits))| {
                culprits.contains(&h) && (*k == 0 || (later.client != i && later.from < t))
            })
            .map(|(_, (later, _))| (later.client, t - later.from))
            .collect();
        // A holder that was stalled (paused, its driver late) meanwhile hears only when it
        // wakes: its overlap is the stall's, not bounded by its TTL.
        let stalled = self.stalled(i, from, t);
        for (other, overlap) in overlaps {
            self.max_operator_overlap = self.max_operator_overlap.max(overlap);
            if overlap > ttl && !stalled {
                self.violation(format!(
                    "overlap {overlap:?} of client {i} (held since {from:?}) with client {other} beyond its TTL"
                ));
            }
        }
    }

    /// Fencing, when client `i` acquires with `token`.
    /// `excused`: an operator acted on this hold after it was granted, so its report may come
    /// after a later holder's (for a lock; a semaphore's check is by its own check-and-set).
    fn check_fencing(&mut self, i: usize, token: &FencingToken, excused: bool) {
        match self.target {
            Target::Lock => {
                if let Some(last) = &self.last_token {
                    if token.sequence() <= last.sequence() {
                        if excused {
                            return;
                        }
                        self.violation(format!("fencing: token {token:?} after {last:?}"));
                    }
                }
                self.last_token = Some(token.clone());
            }
            Target::Semaphore { .. } => {
                // Every slot granted before this attempt's first check-and-set was read (by its
                // holder's confirming list) before that write: its token is smaller.
                let Some(cas) = self.clients[i].first_cas else {
                    return self.violation(format!("client {i}: a slot without a check-and-set"));
                };
                let epoch = self.epoch;
                let before = self
                    .holds
                    .iter()
                    .filter(|h| h.from < cas && h.from >= epoch)
                    .max_by_key(|h| h.token.sequence())
                    .map(|h| h.token.clone());
                if let Some(before) = before {
                    if token.sequence() <= before.sequence() {
                        self.violation(format!(
                            "fencing: client {i}'s token {token:?} (first check-and-set at {cas:?}) \
                             after {before:?}"
                        ));
                    }
                }
            }
        }
    }

    fn check_machine(&mut self, i: usize) {
        let now = self.now;
        let m = &self.clients[i].machine;
        // The user's view: held from `Acquired` until `Lost` or the call to `unlock`.
        let machine_held = m.status() == LockStatus::Held;
        let timeout = m.poll_timeout();
        // A lagging driver serves its timers late, by design.
        let lag = self.lag_of(i, self.t());
        if let Some(at) = timeout {
            if at + lag < now {
                let what = format!(
                    "client {i}: poll_timeout {:?} before now",
                    at.duration_since(self.base)
                );
                self.violation(what);
            }
        }
        let renews = self.clients[i]
            .outstanding
            .values()
            .filter(|(path, deadline)| path.starts_with("/v1/session/renew/") && *deadline > now)
            .count();
        if renews > 1 {
            self.violation(format!("client {i}: {renews} renewals outstanding"));
        }
        let held = self.clients[i].holding.is_some();
        if held != machine_held {
            self.violation(format!(
                "client {i}: events say held={held}, machine says {machine_held}"
            ));
        }
    }

    fn finish(mut self) -> Outcome {
        let t = self.t();
        for i in 0..self.clients.len() {
            let c = &self.clients[i];
            if !c.machine.is_quiescent() {
                let what = format!(
                    "cleanup: client {i} not settled ({:?}, {} requests outstanding)",
                    c.machine.status(),
                    c.outstanding.len()
                );
                self.violation(what);
            }
        }
        // No session a machine made outlives its TTL window.
        let max_ttl = self.clients.iter().map(|c| c.spec.ttl).max().unwrap_or_default();
        let later = self.now + 2 * max_ttl + Duration::from_secs(1);
        let _ = self.sim.advance(later);
        let left: Vec<String> = self.sim.sessions().map(|s| s.name.clone()).collect();
        if !left.is_empty() {
            self.violation(format!("cleanup: sessions outlive their TTL window: {left:?}"));
        }
        if self.target == Target::Lock && self.scenario.faults.is_empty() {
            // A queued attempt leaves the line however it ends; only a fault (a client cut off
            // when it left) may leave an entry behind, dead with its session.
            let left = self.queue_entries();
            if !left.is_empty() {
                self.violation(format!("cleanup: queue entries left: {left:?}"));
            }
        }
        if let Target::Semaphore { .. } = self.target {
            // Contender keys go with their sessions (behavior `delete`); only the `.lock` stays.
            let children = format!("{}/", self.scenario.key.trim_end_matches('/'));
            let keys: Vec<String> = self
                .sim
                .kv_entries()
                .filter(|e| e.key.starts_with(&children) && e.key != self.lock_key)
                .map(|e| e.key.clone())
                .collect();
            if !keys.is_empty() {
                self.violation(format!("cleanup: contender keys left: {keys:?}"));
            }
        }
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for line in &self.trace {
            for b in line.bytes().chain(std::iter::once(b'\n')) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        let mut summary = String::new();
        let _ = write!(summary, "{} holds, {} requests", self.holds.len(), self.requests);
        self.log(summary);
        Outcome {
            trace: self.trace,
            trace_hash: hash,
            holds: self.holds,
            violations: self.violations,
            max_operator_overlap: self.max_operator_overlap,
            ended: t,
            requests: self.requests,
        }
    }
}

/// `request` without `index` and `wait`: what an agent that does not block answers.
fn unblocked(request: http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query: Vec<&str> = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("index=") && !p.starts_with("wait="))
        .collect();
    let uri = if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    };
    if let Ok(uri) = uri.parse() {
        parts.uri = uri;
    }
    http::Request::from_parts(parts, body)
}

/// A delivery of `reply` to `client`, on time.
fn to_client(client: usize, id: RequestId, reply: Reply) -> Delivery {
    Delivery::ToClient {
        client,
        id,
        reply,
        late: false,
    }
}

/// A second copy of a reply (`http::Response` is not `Clone`).
fn copy_reply(reply: &Reply) -> Reply {
    match reply {
        Ok(r) => {
            let mut copy = http::Response::new(r.body().clone());
            *copy.status_mut() = r.status();
            *copy.headers_mut() = r.headers().clone();
            Ok(copy)
        }
        Err(e) => Err(e.clone()),
    }
}
