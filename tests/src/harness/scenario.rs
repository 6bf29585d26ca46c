//! Scenarios: who contends, with which options, and what goes wrong when. A scenario is plain
//! data, so proptest can generate and shrink it and a failure prints as something readable.

use std::time::Duration;

/// One contender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSpec {
    /// Session TTL (10 s or more).
    pub ttl: Duration,
    /// Session lock-delay: `None` for the server's default (15 s).
    pub lock_delay: Option<Duration>,
    /// Go's `MonitorRetries`; `None` for the machine's default.
    pub monitor_retries: Option<u32>,
    /// When it first calls `lock`, from the start.
    pub start: Duration,
    /// How long it holds before unlocking (then it locks again after `pause`).
    pub hold: Duration,
    /// How long it waits between an ending (unlock, loss, give-up) and the next `lock`.
    pub pause: Duration,
    /// Try-once with this wait time.
    pub try_once: Option<Duration>,
    /// Cancel an attempt not granted within this long (a caller's timeout, a dropped future),
    /// whatever is in flight at that moment.
    pub cancel_after: Option<Duration>,
    /// How long failed tries may go on before an attempt ends (`acquire_error_budget`).
    pub error_budget: Duration,
    /// Waits in line ([`Waiting::Queue`](consul_lock_core::machine::Waiting::Queue)) rather
    /// than on the key (locks only).
    pub queued: bool,
}

impl ClientSpec {
    /// A contender with Go's defaults that holds for `hold` at a time.
    pub fn new(hold: Duration) -> ClientSpec {
        ClientSpec {
            ttl: Duration::from_secs(15),
            lock_delay: None,
            monitor_retries: None,
            start: Duration::ZERO,
            hold,
            pause: Duration::from_secs(1),
            try_once: None,
            cancel_after: None,
            error_budget: Duration::from_secs(60),
            queued: false,
        }
    }
}

/// What goes wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Extra one-way latency for one client's traffic.
    Latency {
        /// Which client.
        client: usize,
        /// Added each way.
        extra: Duration,
    },
    /// One client's requests get no answer (a hung connection): they reach the server but the
    /// replies are lost.
    Hang {
        /// Which client.
        client: usize,
    },
    /// One client's connections are refused.
    Refuse {
        /// Which client.
        client: usize,
    },
    /// One client's requests are answered 500 by something in the way.
    Error500 {
        /// Which client.
        client: usize,
    },
    /// A partition between one client and the server: nothing gets through either way.
    Partition {
        /// Which client.
        client: usize,
    },
    /// The servers lose their leader: every request answers 500 "No cluster leader".
    LeaderElection,
    /// One client's process stops (a GC pause, SIGSTOP, a starved runtime): its machine is not
    /// called at all, so its timers go unserved and the replies that come meanwhile reach it
    /// only when it resumes, late, before its timers.
    Pause {
        /// Which client.
        client: usize,
    },
    /// One client's driver runs late (a busy event loop): its timers are served, and the replies
    /// that reach it handed over, `lag` after they are due.
    Lag {
        /// Which client.
        client: usize,
        /// How late.
        lag: Duration,
    },
    /// Every connection of one client is reset at once (an agent or a middlebox dropping them):
    /// its requests in flight, blocking reads included, fail. Instantaneous.
    ConnReset {
        /// Which client.
        client: usize,
    },
    /// The agent restarts with nothing (a dev agent, or a server restored from an old snapshot):
    /// sessions, keys and lock-delays are gone, indexes start again low (backwards), and every
    /// connection is reset. Instantaneous.
    AgentRestart,
    /// The agent answers one client's KV acquires (`?acquire=`) with `false` without applying
    /// them, as for a key under a lock-delay.
    RefuseAcquire {
        /// Which client.
        client: usize,
    },
    /// Every reply to one client comes twice (a retrying intermediary).
    Duplicate {
        /// Which client.
        client: usize,
    },
    /// One client's messages each take a random extra latency up to `up_to`, so that replies
    /// overtake each other.
    Reorder {
        /// Which client.
        client: usize,
        /// The most added each way.
        up_to: Duration,
    },
    /// One client's requests are answered 429 (Consul's rate limit).
    TooManyRequests {
        /// Which client.
        client: usize,
    },
    /// One client's blocking reads are answered at once with the current state, as by a proxy
    /// or cache that drops `index` and `wait`: a machine that reads again at once spins.
    NoBlock {
        /// Which client.
        client: usize,
    },
    /// An operator destroys the session of whoever holds the key (at the window's start). For a
    /// semaphore: the session of one of the holders the `.lock` lists (drawn from the seed).
    DestroyHolderSession,
    /// An operator deletes the lock key (at the window's start). For a semaphore: the contender
    /// key of one of the holders the `.lock` lists (drawn from the seed).
    DeleteKey,
    /// An operator overwrites the lock key with a plain value (at the window's start), and
    /// deletes it at the window's end. For a semaphore: its `.lock`.
    OverwriteKey,
    /// An operator hands the lock key, if there is one, to a session of its own in one
    /// transaction (a `delete` and a `lock` of the same flags and value, at the window's start),
    /// so that the key never shows free: its holder learns it lost only by reading who holds
    /// it. The operator's session (no TTL, no lock-delay) is destroyed at the window's end, freeing the key. Lock only: a semaphore's slots are not
    /// keys to take.
    TakeOver,
    /// An operator deletes every entry of a queued lock's line (`<key>/.queue/`), at the
    /// window's start: no hold is touched, so safety owes it nothing, and the line must mend
    /// itself (each waiter takes its entry again within a blocking-read round).
    DeleteQueue,
}

impl FaultKind {
    /// Whether the fault fails or cuts off `client`'s requests while it lasts.
    pub fn touches(&self, client: usize) -> bool {
        match self {
            FaultKind::Latency { client: c, .. }
            | FaultKind::Hang { client: c }
            | FaultKind::Refuse { client: c }
            | FaultKind::Error500 { client: c }
            | FaultKind::Partition { client: c }
            | FaultKind::Pause { client: c }
            | FaultKind::Lag { client: c, .. }
            | FaultKind::ConnReset { client: c }
            | FaultKind::RefuseAcquire { client: c }
            | FaultKind::Duplicate { client: c }
            | FaultKind::Reorder { client: c, .. }
            | FaultKind::TooManyRequests { client: c }
            | FaultKind::NoBlock { client: c } => *c == client,
            FaultKind::LeaderElection | FaultKind::AgentRestart => true,
            FaultKind::DestroyHolderSession
            | FaultKind::DeleteKey
            | FaultKind::OverwriteKey
            | FaultKind::TakeOver
            | FaultKind::DeleteQueue => false,
        }
    }

    /// Whether the fault happens at one instant (an operator's action, a reset, a restart)
    /// rather than lasting a window. An overwrite and a take-over are undone at the window's
    /// end, so they last.
    pub fn is_instant(&self) -> bool {
        matches!(
            self,
            FaultKind::DestroyHolderSession
                | FaultKind::DeleteKey
                | FaultKind::ConnReset { .. }
                | FaultKind::AgentRestart
                | FaultKind::DeleteQueue
        )
    }

    /// Whether the fault is an operator's action (authoritative, on the key or a session)
    /// rather than a condition of the network, the agent or a client.
    pub fn is_operator(&self) -> bool {
        matches!(
            self,
            FaultKind::DestroyHolderSession
                | FaultKind::DeleteKey
                | FaultKind::OverwriteKey
                | FaultKind::TakeOver
        )
    }
}

/// A fault over a window of virtual time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// What goes wrong.
    pub kind: FaultKind,
    /// When it starts, from the start.
    pub from: Duration,
    /// How long it lasts (ignored for instant faults: see [`FaultKind::is_instant`]).
    pub lasting: Duration,
}

impl Fault {
    /// When it heals.
    pub fn until(&self) -> Duration {
        if self.kind.is_instant() {
            self.from
        } else {
            self.from + self.lasting
        }
    }

    /// Whether it applies to `client` at `t`.
    pub(crate) fn active(&self, t: Duration) -> bool {
        !self.kind.is_instant() && t >= self.from && t < self.from + self.lasting
    }
}

/// What the clients of a run contend for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// A lock on [`Scenario::key`] ([`LockMachine`](consul_lock_core::machine::LockMachine)s):
    /// at most one holder.
    #[default]
    Lock,
    /// A semaphore under the prefix [`Scenario::key`]
    /// ([`SemaphoreMachine`](consul_lock_core::machine::SemaphoreMachine)s): at most `limit`
    /// holders.
    Semaphore {
        /// The slots; every client uses this limit.
        limit: u32,
    },
}

impl Target {
    /// How many may hold at once.
    pub fn limit(self) -> u32 {
        match self {
            Target::Lock => 1,
            Target::Semaphore { limit } => limit,
        }
    }
}

/// A whole run: a seed, the contenders, the faults, and how long to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Seeds the simulator, the network and the machines.
    pub seed: u64,
    /// The contenders.
    pub clients: Vec<ClientSpec>,
    /// The faults.
    pub faults: Vec<Fault>,
    /// How long contenders keep contending; then everyone stops and the run winds down.
    pub duration: Duration,
    /// The lock key ([`Target::Lock`]), or the semaphore's prefix ([`Target::Semaphore`]).
    pub key: String,
}

impl Scenario {
    /// When the last fault heals (zero without faults).
    pub fn last_heal(&self) -> Duration {
        self.faults
            .iter()
            .map(Fault::until)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}
