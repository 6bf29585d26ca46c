//! The sans-IO core on its own: a pure, deterministic driver that runs a
//! [`LockMachine`] through full lock cycles in virtual time, answering every request at once
//! from replies recorded beforehand, so that what is timed is the machine.
//!
//! # The cycle
//!
//! One cycle, on one reused machine (a lock is reusable after an unlock, and a long-running
//! service locks the same key again and again):
//!
//! 1. `lock(now)`; the machine asks for a session: the create is answered;
//! 2. it reads the key (free: it was released by the last cycle) and acquires it with a lock
//!    transaction, whose answer carries the entry (the fencing token): [`LockEvent::Acquired`]
//!    comes out; the machine starts its monitor, a blocking read that Consul holds for `monitor_wait` (5 min)
//!    when nothing changes;
//! 3. `renewals` times: virtual time jumps to the machine's next timer (`poll_timeout()`, the
//!    renew, every TTL/2 = 7.5 s), `handle_timeout(now)` sends the renew, and its reply is handed
//!    back. When the monitor read's wait runs out first, it is answered, unchanged, at that
//!    instant (as Consul does), and the machine sends the next one;
//! 4. `unlock(now)`; the release and the session destroy are answered, [`LockEvent::Released`]
//!    comes out, the machine is quiescent. The monitor read still out is dropped, as a driver
//!    drops the request of an idle machine.
//!
//! # Events
//!
//! An **event** is one call that feeds the machine an input: `lock`, `unlock`,
//! `handle_response` and `handle_timeout`, each counted once per call. What only reads or drains
//! the machine (`poll_action`, `poll_timeout`, `status`, `is_quiescent`) is not an event, though
//! its cost is in the time measured (a driver calls them after every input). With the default
//! [`DEFAULT_RENEWALS`] = 8, a cycle is 23 events: `lock`, 3 replies to acquire, 8 × (a timeout
//! and a renew reply), `unlock`, 2 replies to release.
//!
//! # The replies
//!
//! [`CycleRig::new`] first runs two cycles against the test kit's `SimConsul` (a sans-IO Consul
//! 1.8 checked against a real 1.8.7 agent: same status codes, `X-Consul-Index`,
//! `X-Consul-KnownLeader` and `X-Consul-LastContact` headers, compact JSON bodies as a
//! non-`-dev` agent writes them) and keeps the last reply of each [`RequestKind`] — the second
//! cycle's, the steady state in which the key exists, free. The measured cycles answer each
//! request by its kind with a clone of that reply, cloned ahead of time ([`CycleRig::restock`])
//! so that neither JSON building nor cloning is in the time measured; decoding the reply bytes
//! is the machine's own work and stays in.
//!
//! # Time
//!
//! Virtual: the caller passes one `Instant` (taken once, with `Instant::now()`), and the rig
//! only ever adds durations to it. The core never reads a clock; this crate reads the real one
//! only to time batches ([`CycleRig::timed_cycles`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, LockEvent, LockMachine, LockOptions, LockStatus, Misuse, OptionsError, Reply, RequestId, Transmit,
};
use consul_lock_testkit::sim::{QueryId, SimConsul, SimReply};

use crate::alloc_count::{self, AllocCounts};

/// Renewals per full cycle by default: 8 renewals, every 7.5 s, hold the lock for a minute.
pub const DEFAULT_RENEWALS: u32 = 8;

/// The lock key.
const KEY: &str = "service/leader";
/// The lock's value, written on acquire and release (so that decoding a pair includes base64).
const VALUE: &[u8] = b"node-1";
/// The machine's seed (only backoff jitter uses it, and no cycle backs off).
const SEED: u64 = 7;
/// The simulated Consul's seed (session IDs, blocking-read jitter).
const SIM_SEED: u64 = 11;

/// Steps allowed to one pump of replies: a cycle needs a handful; more is a machine that keeps
/// asking, which must not hang a benchmark.
const PUMP_STEPS: usize = 64;
/// Monitor reads answered before one renew at most: one per 5 min against a renew every 7.5 s.
const WATCH_WAKES_PER_RENEW: usize = 4;
/// Steps allowed to the recording of the replies (two cycles, one holding for 5 min).
const RECORD_STEPS: usize = 10_000;
/// Cycles per batch in [`CycleRig::timed_cycles`]: the replies for a batch are cloned before
/// the batch is timed, and a batch's clones should stay small (≈ 0.5 MB at 8 renewals).
const BATCH: u64 = 64;
/// Renewals per batch in [`CycleRig::timed_renew_cycles`].
const RENEW_BATCH: u64 = 1024;
/// Untimed cycles before [`measure`] times anything: caches, queue capacities, stock.
const WARMUP_CYCLES: u64 = 256;
/// Renewals whose allocations [`measure`] counts (after a few untimed ones).
const ALLOC_RENEWALS: u64 = 1_000;

/// A request, as the rig recognises it from its method, path and query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `PUT /v1/session/create`.
    Create,
    /// `GET /v1/kv/<key>`, neither blocking nor consistent: the acquisition's first read.
    Read,
    /// `PUT /v1/txn` with one KV `lock` operation: the acquire.
    Acquire,
    /// `GET /v1/kv/<key>?consistent&index=..&wait=..`: the monitor's blocking read.
    Watch,
    /// `PUT /v1/session/renew/<id>`.
    Renew,
    /// `PUT /v1/kv/<key>?release=<session>`.
    Release,
    /// `PUT /v1/session/destroy/<id>`.
    Destroy,
}

impl RequestKind {
    /// Every kind, in the order of [`RequestKind::slot`].
    const ALL: [RequestKind; KINDS] = [
        RequestKind::Create,
        RequestKind::Read,
        RequestKind::Acquire,
        RequestKind::Watch,
        RequestKind::Renew,
        RequestKind::Release,
        RequestKind::Destroy,
    ];

    /// The kind's place in per-kind arrays.
    fn slot(self) -> usize {
        self as usize
    }

    /// How many replies of this kind a cycle of `renewals` renewals takes (for the stock).
    fn per_cycle(self, renewals: u64) -> u64 {
        match self {
            RequestKind::Renew => renewals,
            // One monitor read wakes per 40 renewals (5 min / 7.5 s); one spare.
            RequestKind::Watch => renewals / 40 + 1,
            _ => 1,
        }
    }

    /// Recognises `transmit`'s request (see [`classify`](Self::classify)).
    fn of(transmit: &Transmit, key_path: &str) -> Option<RequestKind> {
        let request = &transmit.request;
        let uri = request.uri();
        RequestKind::classify(request.method().as_str(), uri.path(), uri.query(), key_path)
    }

    /// Recognises a request to the lock's key (`key_path` = `/v1/kv/<key>`); `None` for
    /// anything the rig does not answer.
    fn classify(method: &str, path: &str, query: Option<&str>, key_path: &str) -> Option<RequestKind> {
        let query = query.unwrap_or("");
        let has = |name: &str| {
            query
                .split('&')
                .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name)
        };
        match method {
            "PUT" if path == "/v1/session/create" => Some(RequestKind::Create),
            "PUT" if path.starts_with("/v1/session/renew/") => Some(RequestKind::Renew),
            "PUT" if path.starts_with("/v1/session/destroy/") => Some(RequestKind::Destroy),
            "PUT" if path == "/v1/txn" => Some(RequestKind::Acquire),
            "PUT" if path == key_path && has("release") => Some(RequestKind::Release),
            "GET" if path == key_path => match (has("consistent"), has("index")) {
                (false, false) => Some(RequestKind::Read),
                (true, true) => Some(RequestKind::Watch),
                // A blocking read while acquiring (the key is held by someone else), or a
                // consistent read that isn't the monitor's: neither happens here.
                _ => None,
            },
            _ => None,
        }
    }
}

/// The number of [`RequestKind`]s.
const KINDS: usize = 7;

/// Why the rig could not run the machine the way a cycle goes. Never expected: each one means
/// the machine (or the simulated Consul) behaves differently from what the benchmark assumes,
/// and the figures would not be what they claim.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    /// The lock options were refused.
    #[error("invalid lock options: {0}")]
    Options(#[from] OptionsError),
    /// An operation was refused.
    #[error("the machine refused {op}: {source}")]
    Refused {
        /// `lock` or `unlock`.
        op: &'static str,
        /// The machine's answer.
        #[source]
        source: Misuse,
    },
    /// The machine sent a request the rig has no reply for.
    #[error("the machine sent a request the rig does not answer: {method} {uri}")]
    UnexpectedRequest {
        /// The request's method.
        method: String,
        /// The request's URI.
        uri: String,
    },
    /// The machine reported an event a cycle does not have.
    #[error("unexpected lock event {stage}: {event}")]
    UnexpectedEvent {
        /// Where in the cycle.
        stage: &'static str,
        /// The event, debug-formatted.
        event: String,
    },
    /// The machine is not where the cycle expects it.
    #[error("the machine is not where a cycle expects it {stage}: {what}")]
    Stalled {
        /// Where in the cycle.
        stage: &'static str,
        /// What was expected.
        what: &'static str,
    },
    /// The machine kept asking past the step budget.
    #[error("no end after {steps} steps {stage}")]
    Runaway {
        /// Where in the cycle.
        stage: &'static str,
        /// The steps taken.
        steps: usize,
    },
    /// The replies could not be recorded from the simulated Consul.
    #[error("recording replies from the simulated Consul: {0}")]
    Recording(String),
}

/// What one cycle (or part of one) fed the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CycleStats {
    /// Events: calls feeding the machine an input (see the [module docs](self)).
    pub events: u64,
    /// Renew replies handed back.
    pub renewals: u64,
}

impl CycleStats {
    fn add(&mut self, other: CycleStats) {
        self.events += other.events;
        self.renewals += other.renewals;
    }
}

/// One renew cycle: the allocations of each of its steps (all zero when
/// [`CountingAlloc`](crate::alloc_count::CountingAlloc) is not installed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenewStats {
    /// Events, including a monitor read answered before the renew (rarely).
    pub events: u64,
    /// `poll_timeout()`, the driver asking when to wake.
    pub timer: AllocCounts,
    /// `handle_timeout(now)` and the `poll_action()` that takes the renew request.
    pub send: AllocCounts,
    /// `handle_response(now, id, reply)` with the renew's reply, and the `poll_action()` that
    /// finds nothing more.
    pub reply: AllocCounts,
}

impl RenewStats {
    /// The renew part's allocations: timer, send and reply (not a monitor read answered first).
    pub fn allocs(&self) -> AllocCounts {
        self.timer.plus(self.send).plus(self.reply)
    }
}

/// A batch of cycles, timed with the real clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timed {
    /// Wall time spent in the machine (and the rig's routing), excluding the cloning of replies
    /// between batches.
    pub elapsed: Duration,
    /// Cycles run (renew cycles, for [`CycleRig::timed_renew_cycles`]).
    pub cycles: u64,
    /// What the cycles fed the machine.
    pub stats: CycleStats,
}

/// Allocations of the renew part of a held lock, summed over `renewals` renew cycles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenewAllocations {
    /// Renew cycles counted.
    pub renewals: u64,
    /// Sum of [`RenewStats::timer`].
    pub timer: AllocCounts,
    /// Sum of [`RenewStats::send`].
    pub send: AllocCounts,
    /// Sum of [`RenewStats::reply`].
    pub reply: AllocCounts,
}

impl RenewAllocations {
    /// All three steps together.
    pub fn total(&self) -> AllocCounts {
        self.timer.plus(self.send).plus(self.reply)
    }

    /// `count` per renew cycle.
    pub fn per_renew(&self, count: u64) -> f64 {
        count as f64 / self.renewals.max(1) as f64
    }
}

/// The core's figures, as the suite reports them.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct CoreFigures {
    /// Events per second of wall time, over full cycles on one thread.
    pub events_per_sec: f64,
    /// Nanoseconds per event (the inverse).
    pub ns_per_event: f64,
    /// Events per full cycle.
    pub events_per_cycle: f64,
    /// Renewals per full cycle.
    pub renewals_per_cycle: u32,
    /// Full cycles timed.
    pub cycles: u64,
    /// Fresh heap allocations per renew cycle (`None`: `CountingAlloc` is not the global
    /// allocator, so they could not be counted).
    pub allocs_per_renew_cycle: Option<f64>,
    /// Reallocations per renew cycle, counted apart from the fresh allocations.
    pub reallocs_per_renew_cycle: Option<f64>,
    /// Bytes asked of the allocator per renew cycle (fresh blocks' sizes and reallocs' new
    /// sizes).
    pub bytes_per_renew_cycle: Option<f64>,
}

/// Drives one [`LockMachine`] through cycles against recorded replies. See the
/// [module docs](self).
#[derive(Debug)]
pub struct CycleRig {
    machine: LockMachine,
    /// Virtual time: only moves forward, by the machine's timers and the monitor's wait.
    now: Instant,
    renewals: u32,
    /// The monitor read's `wait`: when Consul answers it unchanged.
    monitor_wait: Duration,
    /// `/v1/kv/<key>`, to recognise requests to the key.
    key_path: String,
    /// One reply per kind, recorded from the simulated Consul.
    templates: [Reply; KINDS],
    /// Clones of the templates, made before a batch is timed.
    stock: [Vec<Reply>; KINDS],
    /// Requests answered at once, in the order sent.
    ready: VecDeque<(RequestId, RequestKind)>,
    /// The monitor read, answered unchanged when its wait runs out.
    watch: Option<(RequestId, Instant)>,
    acquired: bool,
    released: bool,
}

impl CycleRig {
    /// A rig whose cycles hold the lock for `renewals` renewals, with virtual time starting at
    /// `start`. Records the replies first, from the simulated Consul (two cycles, one of them
    /// holding for one monitor wait).
    pub fn new(start: Instant, renewals: u32) -> Result<CycleRig, CycleError> {
        let options = lock_options()?;
        let key_path = format!("/v1/kv/{KEY}");
        let templates = record(start, &options, &key_path)?;
        let monitor_wait = options.hold.monitor_wait;
        let machine = LockMachine::new(ClientConfig::default(), options)?;
        Ok(CycleRig {
            machine,
            now: start,
            renewals,
            monitor_wait,
            key_path,
            templates,
            stock: Default::default(),
            ready: VecDeque::with_capacity(8),
            watch: None,
            acquired: false,
            released: false,
        })
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Renewals per full cycle.
    pub fn renewals(&self) -> u32 {
        self.renewals
    }

    /// The machine, to look at.
    pub fn machine(&self) -> &LockMachine {
        &self.machine
    }

    /// Clones enough replies for `cycles` full cycles ahead of time, so that the cycles' cost is
    /// the machine's. Cycles run without stock still work: a missing reply is cloned when needed.
    pub fn restock(&mut self, cycles: u64) {
        for kind in RequestKind::ALL {
            self.top_up(kind, kind.per_cycle(u64::from(self.renewals)) * cycles);
        }
    }

    /// Clones enough replies for `renewals` renew cycles ahead of time.
    pub fn restock_renewals(&mut self, renewals: u64) {
        self.top_up(RequestKind::Renew, renewals);
        self.top_up(RequestKind::Watch, RequestKind::Watch.per_cycle(renewals));
    }

    /// One full cycle: lock, acquire, `renewals` renewals, unlock, release. The machine must be
    /// idle (as it is after [`new`](Self::new) and after every cycle).
    pub fn run_cycle(&mut self) -> Result<CycleStats, CycleError> {
        let mut stats = self.acquire()?;
        for _ in 0..self.renewals {
            let renew = self.renew_cycle()?;
            stats.add(CycleStats {
                events: renew.events,
                renewals: 1,
            });
        }
        stats.add(self.release()?);
        Ok(stats)
    }

    /// `lock(now)` on an idle machine, and the replies until [`LockEvent::Acquired`].
    pub fn acquire(&mut self) -> Result<CycleStats, CycleError> {
        const STAGE: &str = "acquiring";
        if !self.machine.is_quiescent() || self.machine.status() != LockStatus::Idle {
            return Err(CycleError::Stalled {
                stage: STAGE,
                what: "an idle, quiescent machine to lock",
            });
        }
        self.acquired = false;
        self.released = false;
        self.machine
            .lock(self.now)
            .map_err(|source| CycleError::Refused { op: "lock", source })?;
        let mut stats = CycleStats {
            events: 1,
            renewals: 0,
        };
        stats.add(self.pump(STAGE)?);
        if !self.acquired || self.machine.status() != LockStatus::Held {
            return Err(CycleError::Stalled {
                stage: STAGE,
                what: "Acquired once the replies are in",
            });
        }
        Ok(stats)
    }

    /// One renew cycle of a held lock: the driver asks `poll_timeout()`, virtual time moves
    /// there, `handle_timeout(now)` sends the renew, its reply is handed back. A monitor read
    /// whose wait ends first is answered first (an event, but outside the allocation figures).
    pub fn renew_cycle(&mut self) -> Result<RenewStats, CycleError> {
        const STAGE: &str = "renewing";
        if self.machine.status() != LockStatus::Held {
            return Err(CycleError::Stalled {
                stage: STAGE,
                what: "a held lock",
            });
        }
        // The replies to hand back come out of stock, outside the windows counted.
        self.top_up(RequestKind::Renew, 1);
        let mut events = 0;
        for _ in 0..WATCH_WAKES_PER_RENEW {
            let before = alloc_count::snapshot();
            let next = self.machine.poll_timeout().ok_or(CycleError::Stalled {
                stage: STAGE,
                what: "a timer while held",
            })?;
            let timed = alloc_count::snapshot();
            if let Some((id, wake)) = self.watch.filter(|(_, wake)| *wake <= next) {
                self.top_up(RequestKind::Watch, 1);
                self.watch = None;
                self.now = self.now.max(wake);
                let reply = self.take(RequestKind::Watch);
                self.machine.handle_response(self.now, id, reply);
                events += 1 + self.pump(STAGE)?.events;
                continue;
            }
            self.now = self.now.max(next);
            self.machine.handle_timeout(self.now);
            events += 1;
            self.drain(STAGE)?;
            let sent = alloc_count::snapshot();
            match self.ready.front() {
                // A timer that was not the renew (none is expected): look again.
                None => continue,
                Some((_, RequestKind::Renew)) if self.ready.len() == 1 => {}
                Some(_) => {
                    return Err(CycleError::Stalled {
                        stage: STAGE,
                        what: "the renew alone after the renew timer",
                    });
                }
            }
            let stats = self.pump(STAGE)?;
            let replied = alloc_count::snapshot();
            if stats.renewals != 1 || self.machine.status() != LockStatus::Held {
                return Err(CycleError::Stalled {
                    stage: STAGE,
                    what: "a held lock after one renew",
                });
            }
            return Ok(RenewStats {
                events: events + stats.events,
                timer: timed.since(before),
                send: sent.since(timed),
                reply: replied.since(sent),
            });
        }
        Err(CycleError::Runaway {
            stage: STAGE,
            steps: WATCH_WAKES_PER_RENEW,
        })
    }

    /// `unlock(now)` on a held lock, and the replies until [`LockEvent::Released`] and a
    /// quiescent machine.
    pub fn release(&mut self) -> Result<CycleStats, CycleError> {
        const STAGE: &str = "releasing";
        self.machine
            .unlock(self.now)
            .map_err(|source| CycleError::Refused { op: "unlock", source })?;
        let mut stats = CycleStats {
            events: 1,
            renewals: 0,
        };
        stats.add(self.pump(STAGE)?);
        // The monitor read is the request of a lock no longer held: a driver drops it.
        self.watch = None;
        if !self.released || !self.machine.is_quiescent() {
            return Err(CycleError::Stalled {
                stage: STAGE,
                what: "Released and a quiescent machine once the replies are in",
            });
        }
        Ok(stats)
    }

    /// Runs `cycles` full cycles, in batches whose replies are cloned before the batch is
    /// timed; the time is the sum of the batches' times.
    pub fn timed_cycles(&mut self, cycles: u64) -> Result<Timed, CycleError> {
        let mut timed = Timed::default();
        while timed.cycles < cycles {
            let batch = (cycles - timed.cycles).min(BATCH);
            self.restock(batch);
            let start = Instant::now();
            for _ in 0..batch {
                timed.stats.add(self.run_cycle()?);
            }
            timed.elapsed += start.elapsed();
            timed.cycles += batch;
        }
        Ok(timed)
    }

    /// Runs `renewals` renew cycles of a held lock (acquiring it first, untimed, if idle), in
    /// batches whose replies are cloned before the batch is timed.
    pub fn timed_renew_cycles(&mut self, renewals: u64) -> Result<Timed, CycleError> {
        if self.machine.status() == LockStatus::Idle {
            self.restock(1);
            self.acquire()?;
        }
        let mut timed = Timed::default();
        while timed.cycles < renewals {
            let batch = (renewals - timed.cycles).min(RENEW_BATCH);
            self.restock_renewals(batch);
            let start = Instant::now();
            for _ in 0..batch {
                timed.stats.events += self.renew_cycle()?.events;
            }
            timed.elapsed += start.elapsed();
            timed.cycles += batch;
            timed.stats.renewals += batch;
        }
        Ok(timed)
    }

    // ----- plumbing ----------------------------------------------------------------------------

    /// Tops the stock of `kind` up to `count` replies.
    fn top_up(&mut self, kind: RequestKind, count: u64) {
        let slot = kind.slot();
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let stock = &mut self.stock[slot];
        if stock.len() < count {
            stock.reserve(count - stock.len());
            while stock.len() < count {
                stock.push(self.templates[slot].clone());
            }
        }
    }

    /// A reply of `kind`: from stock, or a fresh clone when the stock ran out.
    fn take(&mut self, kind: RequestKind) -> Reply {
        let slot = kind.slot();
        self.stock[slot]
            .pop()
            .unwrap_or_else(|| self.templates[slot].clone())
    }

    /// Takes everything the machine has to say: requests are routed (to `ready`, or parked as
    /// the monitor read), events checked.
    fn drain(&mut self, stage: &'static str) -> Result<(), CycleError> {
        // Bounded: a machine queues a few actions per input, never an endless stream.
        for _ in 0..PUMP_STEPS {
            let Some(action) = self.machine.poll_action() else {
                return Ok(());
            };
            match action {
                Action::Send(transmit) => {
                    let kind = RequestKind::of(&transmit, &self.key_path).ok_or_else(|| {
                        CycleError::UnexpectedRequest {
                            method: transmit.request.method().to_string(),
                            uri: transmit.request.uri().to_string(),
                        }
                    })?;
                    if kind == RequestKind::Watch {
                        if self.watch.is_some() {
                            return Err(CycleError::Stalled {
                                stage,
                                what: "one monitor read at a time",
                            });
                        }
                        self.watch = Some((transmit.id, self.now + self.monitor_wait));
                    } else {
                        self.ready.push_back((transmit.id, kind));
                    }
                }
                Action::Event(LockEvent::Acquired(_)) if !self.acquired => self.acquired = true,
                Action::Event(LockEvent::Released) if self.acquired && !self.released => {
                    self.released = true;
                }
                Action::Event(event) => {
                    return Err(CycleError::UnexpectedEvent {
                        stage,
                        event: format!("{event:?}"),
                    });
                }
            }
        }
        Err(CycleError::Runaway {
            stage,
            steps: PUMP_STEPS,
        })
    }

    /// Drains the machine and answers what is ready, until nothing is.
    fn pump(&mut self, stage: &'static str) -> Result<CycleStats, CycleError> {
        let mut stats = CycleStats::default();
        for _ in 0..PUMP_STEPS {
            self.drain(stage)?;
            let Some((id, kind)) = self.ready.pop_front() else {
                return Ok(stats);
            };
            let reply = self.take(kind);
            self.machine.handle_response(self.now, id, reply);
            stats.events += 1;
            if kind == RequestKind::Renew {
                stats.renewals += 1;
            }
        }
        Err(CycleError::Runaway {
            stage,
            steps: PUMP_STEPS,
        })
    }
}

/// The lock the benchmark takes: Go's defaults (session TTL 15 s, lock-delay left to the
/// server, 5 min monitor reads, 10 s request timeout) on [`KEY`], with a value.
fn lock_options() -> Result<LockOptions, OptionsError> {
    let mut options = LockOptions::new(KEY)?;
    options.hold.value = VALUE.to_vec();
    options.hold.seed = SEED;
    Ok(options)
}

/// Records one reply per [`RequestKind`] from the simulated Consul: a short cycle (the key is
/// created), then a cycle on the existing key that holds until the monitor read's wait runs out;
/// the last reply of each kind is kept, so all come from the second cycle.
fn record(start: Instant, options: &LockOptions, key_path: &str) -> Result<[Reply; KINDS], CycleError> {
    let mut recorder = Recorder {
        sim: SimConsul::new(SIM_SEED, start),
        machine: LockMachine::new(ClientConfig::default(), options.clone())?,
        now: start,
        key_path,
        templates: Default::default(),
        ready: VecDeque::new(),
        parked: Vec::new(),
        acquired: false,
        released: false,
        renewed: 0,
        watched: false,
        steps: 0,
    };
    for wait_for_watch in [false, true] {
        recorder.cycle(wait_for_watch)?;
    }
    let mut missing = Vec::new();
    for kind in RequestKind::ALL {
        if recorder.templates[kind.slot()].is_none() {
            missing.push(kind);
        }
    }
    match recorder.templates {
        [Some(a), Some(b), Some(c), Some(d), Some(e), Some(f), Some(g)] => Ok([a, b, c, d, e, f, g]),
        _ => Err(CycleError::Recording(format!(
            "no reply recorded for {missing:?}"
        ))),
    }
}

/// A driver of a machine against `SimConsul`, keeping the replies it hands over.
struct Recorder<'k> {
    sim: SimConsul,
    machine: LockMachine,
    now: Instant,
    key_path: &'k str,
    templates: [Option<Reply>; KINDS],
    ready: VecDeque<(RequestId, RequestKind, Reply)>,
    parked: Vec<(QueryId, RequestId, RequestKind)>,
    acquired: bool,
    released: bool,
    renewed: u32,
    watched: bool,
    steps: usize,
}

impl Recorder<'_> {
    /// One cycle; holds until one renew is answered and, if `wait_for_watch`, the monitor read
    /// is answered unchanged at the end of its wait.
    fn cycle(&mut self, wait_for_watch: bool) -> Result<(), CycleError> {
        (self.acquired, self.released, self.renewed, self.watched) = (false, false, 0, false);
        self.machine
            .lock(self.now)
            .map_err(|source| CycleError::Refused { op: "lock", source })?;
        self.run_until(|r| r.acquired && r.renewed >= 1 && (r.watched || !wait_for_watch))?;
        // Drop the monitor read before the release writes the key: its answer would then be a
        // changed key, not the unchanged one a held lock gets.
        for (query, _, _) in self.parked.drain(..) {
            self.sim.abandon(query);
        }
        self.machine
            .unlock(self.now)
            .map_err(|source| CycleError::Refused { op: "unlock", source })?;
        self.run_until(|r| r.released && r.machine.is_quiescent())
    }

    /// Drives until `done`: routes what the machine says, then hands over one reply if any is
    /// ready, or else moves time to the next timer of the machine or the simulator.
    fn run_until(&mut self, done: impl Fn(&Self) -> bool) -> Result<(), CycleError> {
        loop {
            self.steps += 1;
            if self.steps > RECORD_STEPS {
                return Err(CycleError::Runaway {
                    stage: "recording",
                    steps: RECORD_STEPS,
                });
            }
            self.drain()?;
            if done(self) {
                return Ok(());
            }
            self.advance()?;
        }
    }

    /// Routes the machine's requests to the simulator and takes note of its events.
    fn drain(&mut self) -> Result<(), CycleError> {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Send(transmit) => {
                    let kind = RequestKind::of(&transmit, self.key_path).ok_or_else(|| {
                        let request = &transmit.request;
                        CycleError::Recording(format!(
                            "unexpected request {} {}",
                            request.method(),
                            request.uri()
                        ))
                    })?;
                    match self.sim.handle(self.now, &transmit.request) {
                        SimReply::Now(response) => self.ready.push_back((transmit.id, kind, Ok(response))),
                        SimReply::Parked(query) => self.parked.push((query, transmit.id, kind)),
                    }
                    self.collect();
                }
                Action::Event(LockEvent::Acquired(_)) => self.acquired = true,
                Action::Event(LockEvent::Released) => self.released = true,
                Action::Event(event) => {
                    return Err(CycleError::Recording(format!("unexpected event {event:?}")));
                }
            }
        }
        Ok(())
    }

    /// Hands over the first ready reply (keeping a copy), or moves time to the next timer.
    fn advance(&mut self) -> Result<(), CycleError> {
        if let Some((id, kind, reply)) = self.ready.pop_front() {
            match kind {
                RequestKind::Renew => self.renewed += 1,
                RequestKind::Watch => self.watched = true,
                _ => {}
            }
            self.templates[kind.slot()] = Some(reply.clone());
            self.machine.handle_response(self.now, id, reply);
            return Ok(());
        }
        let next = [self.machine.poll_timeout(), self.sim.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .ok_or_else(|| CycleError::Recording("nothing left to wait for".to_owned()))?;
        self.now = self.now.max(next);
        self.machine.handle_timeout(self.now);
        self.collect();
        Ok(())
    }

    /// Moves the blocking reads the simulator answered to `ready`.
    fn collect(&mut self) {
        for (query, response) in self.sim.advance(self.now) {
            if let Some(at) = self.parked.iter().position(|(q, _, _)| *q == query) {
                let (_, id, kind) = self.parked.swap_remove(at);
                self.ready.push_back((id, kind, Ok(response)));
            }
        }
    }
}

/// Counts the allocations of `renewals` renew cycles of a held lock (after a few untimed
/// ones, so that queues have their capacity); `None` when
/// [`CountingAlloc`](crate::alloc_count::CountingAlloc) is not the global allocator.
pub fn renew_allocations(start: Instant, renewals: u64) -> Result<Option<RenewAllocations>, CycleError> {
    if !alloc_count::installed() {
        return Ok(None);
    }
    let mut rig = CycleRig::new(start, DEFAULT_RENEWALS)?;
    rig.restock(1);
    rig.acquire()?;
    for _ in 0..4 {
        rig.renew_cycle()?;
    }
    let mut sum = RenewAllocations::default();
    while sum.renewals < renewals {
        let batch = (renewals - sum.renewals).min(RENEW_BATCH);
        rig.restock_renewals(batch);
        for _ in 0..batch {
            let r = rig.renew_cycle()?;
            sum.timer = sum.timer.plus(r.timer);
            sum.send = sum.send.plus(r.send);
            sum.reply = sum.reply.plus(r.reply);
        }
        sum.renewals += batch;
    }
    Ok(Some(sum))
}

/// The core's figures: full cycles of [`DEFAULT_RENEWALS`] renewals timed for about `budget`
/// of wall time (at least one batch), after an untimed warm-up, on the calling thread; then the
/// allocations of the renew cycle, when they can be counted.
pub fn measure(budget: Duration) -> Result<CoreFigures, CycleError> {
    let start = Instant::now();
    let mut rig = CycleRig::new(start, DEFAULT_RENEWALS)?;
    rig.timed_cycles(WARMUP_CYCLES)?;
    let mut total = Timed::default();
    // Bounded by the budget: every batch takes time.
    loop {
        let batch = rig.timed_cycles(BATCH)?;
        total.elapsed += batch.elapsed;
        total.cycles += batch.cycles;
        total.stats.add(batch.stats);
        if total.elapsed >= budget {
            break;
        }
    }
    let events = total.stats.events as f64;
    let secs = total.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let allocs = renew_allocations(rig.now(), ALLOC_RENEWALS)?;
    Ok(CoreFigures {
        events_per_sec: events / secs,
        ns_per_event: secs * 1e9 / events.max(1.0),
        events_per_cycle: events / total.cycles.max(1) as f64,
        renewals_per_cycle: rig.renewals(),
        cycles: total.cycles,
        allocs_per_renew_cycle: allocs.map(|a| a.per_renew(a.total().allocations)),
        reallocs_per_renew_cycle: allocs.map(|a| a.per_renew(a.total().reallocs)),
        bytes_per_renew_cycle: allocs.map(|a| a.per_renew(a.total().bytes)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rig(renewals: u32) -> CycleRig {
        CycleRig::new(Instant::now(), renewals).expect("the rig records its replies")
    }

    #[test]
    fn a_cycle_is_lock_three_replies_two_events_per_renewal_unlock_two_replies() {
        let mut rig = rig(DEFAULT_RENEWALS);
        for _ in 0..3 {
            let stats = rig.run_cycle().expect("a full cycle");
            assert_eq!(
                stats,
                CycleStats {
                    // lock + (create, read, lock transaction) + unlock + (release, destroy).
                    events: 7 + 2 * u64::from(DEFAULT_RENEWALS),
                    renewals: u64::from(DEFAULT_RENEWALS),
                }
            );
            assert!(rig.machine().is_quiescent());
        }
    }

    #[test]
    fn renewals_come_every_half_ttl() {
        let mut rig = rig(3);
        let start = rig.now();
        rig.run_cycle().expect("a full cycle");
        assert_eq!(rig.now() - start, Duration::from_millis(3 * 7_500));
    }

    #[test]
    fn a_long_hold_answers_the_monitor_read_when_its_wait_ends() {
        // 45 renewals: 337.5 s, past the monitor's 300 s wait, answered once.
        let mut rig = rig(45);
        let stats = rig.run_cycle().expect("a full cycle");
        assert_eq!(stats.renewals, 45);
        assert_eq!(stats.events, 7 + 2 * 45 + 1);
        let again = rig.run_cycle().expect("another");
        assert_eq!(again, stats);
    }

    #[test]
    fn renew_cycles_run_on_a_held_lock() {
        let mut rig = rig(DEFAULT_RENEWALS);
        assert!(matches!(rig.renew_cycle(), Err(CycleError::Stalled { .. })));
        rig.acquire().expect("acquired");
        let timed = rig.timed_renew_cycles(100).expect("renewals");
        assert_eq!(timed.cycles, 100);
        assert_eq!(timed.stats.renewals, 100);
        // 100 × 7.5 s = 750 s: two monitor reads answered along the way.
        assert_eq!(timed.stats.events, 2 * 100 + 2);
        // Not installed in this test binary: nothing counted.
        assert_eq!(
            rig.renew_cycle().expect("a renew").allocs(),
            AllocCounts::default()
        );
        rig.release().expect("released");
    }

    #[test]
    fn requests_are_recognised_by_method_path_and_query() {
        let key = "/v1/kv/service/leader";
        let kind = |m, p, q| RequestKind::classify(m, p, q, key);
        assert_eq!(kind("PUT", "/v1/session/create", None), Some(RequestKind::Create));
        assert_eq!(
            kind("PUT", "/v1/session/renew/abc", None),
            Some(RequestKind::Renew)
        );
        assert_eq!(
            kind("PUT", "/v1/session/destroy/abc", None),
            Some(RequestKind::Destroy)
        );
        assert_eq!(kind("GET", key, None), Some(RequestKind::Read));
        assert_eq!(kind("GET", key, Some("consistent")), None);
        assert_eq!(
            kind("GET", key, Some("consistent&index=12&wait=300000ms")),
            Some(RequestKind::Watch)
        );
        assert_eq!(kind("GET", key, Some("index=12&wait=15000ms")), None);
        assert_eq!(kind("PUT", "/v1/txn", None), Some(RequestKind::Acquire));
        assert_eq!(kind("PUT", key, Some("acquire=s&flags=1")), None);
        assert_eq!(
            kind("PUT", key, Some("flags=1&release=s")),
            Some(RequestKind::Release)
        );
        assert_eq!(kind("PUT", key, Some("cas=3")), None);
        assert_eq!(kind("DELETE", key, None), None);
        assert_eq!(kind("GET", "/v1/kv/other", None), None);
        assert_eq!(kind("GET", "/v1/session/info/abc", None), None);
    }

    #[test]
    fn measure_reports_throughput_and_no_allocation_figures_without_the_allocator() {
        let figures = measure(Duration::from_millis(1)).expect("figures");
        assert!(figures.events_per_sec > 0.0);
        assert!(figures.cycles >= BATCH);
        assert_eq!(figures.events_per_cycle, 23.0);
        assert_eq!(figures.allocs_per_renew_cycle, None);
        assert_eq!(figures.bytes_per_renew_cycle, None);
    }
}
