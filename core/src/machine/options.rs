//! Lock options, with Go's names and defaults, validated once at construction.

use std::time::Duration;

use crate::api::{Key, KeyError, SessionBehavior, SessionCreate, SessionId};

/// The session TTLs Consul accepts.
pub(crate) const SESSION_TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(10)..=Duration::from_secs(86_400);

/// Consul caps lock-delay here, whatever a session asked for.
pub(crate) const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// Consul's lock-delay for a session that asks for none (`structs.DefaultLockDelay`).
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);

/// The shortest [hold window](SessionOptions::hold_window) a machine accepts: below it a holder
/// would renew every few hundred milliseconds and drop its hold at any hiccup of the agent.
pub const MIN_HOLD_WINDOW: Duration = Duration::from_secs(1);

/// What keeps a session's keys from everyone else once Consul invalidates the session early,
/// before its TTL: a failed health check ends a health-bound session at once (the reliability
/// lab saw a frozen or killed client agent's node marked failed 5-6 s after the fault, and its
/// sessions invalidated with it), and a holder cut off from its agent cannot know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterInvalidation {
    /// The keys are locks taken with `acquire` (a lock, a key set): Consul refuses them to
    /// every session for the invalidated session's lock-delay.
    LockDelay,
    /// Nothing: others take the place at once. A semaphore's contenders prune from the `.lock`
    /// every holder whose contender key lost its session, and take its slot; the lock-delay
    /// guards only that contender key, which nobody else wants.
    TakenAtOnce,
}

/// The hold window of a session whose TTL is now `ttl` (the server may raise it), guarded after an
/// early end for `guard` ([`SessionOptions::early_end_guard`]).
pub(crate) fn hold_window(ttl: Duration, guard: Option<Duration>) -> Duration {
    guard.map_or(ttl, |guard| guard.min(ttl))
}

/// The session a lock holds its key with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionChoice {
    /// Create a session, renew it while needed, destroy it when done (Go's default).
    Create(SessionOptions),
    /// Use a session the caller created and keeps alive (Go's `Session` option). The machine
    /// neither renews nor destroys it, and so can't apply the renew deadline: loss is learnt from
    /// the key alone.
    Existing(SessionId),
}

/// How to create the lock's session (Go's `SessionName`, `SessionTTL`, `LockDelay` and
/// `SessionOpts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// The session's name (default `Consul API Lock`, as Go's).
    pub name: String,
    /// Time to live between renewals: 10 s to 86400 s (default 15 s).
    pub ttl: Duration,
    /// How long the key refuses new holders after the session is invalidated: `None` for the
    /// server's default (15 s), up to 60 s. `Some(Duration::ZERO)` is really sent, unlike Go.
    pub lock_delay: Option<Duration>,
    /// What happens to the key when the session is invalidated (default: released).
    pub behavior: SessionBehavior,
    /// The session's node; `None`: the agent's own.
    pub node: Option<String>,
    /// Health checks (Consul's `Checks`); `None`: Consul's default, `serfHealth`, unless
    /// `node_checks` is given. `Some(vec![])` with `node_checks` unset or empty: no checks, the
    /// session ends only by its TTL (or a destroy).
    ///
    /// A check can end the session at any moment, so it shortens how long a holder may trust
    /// a renew ([`SessionOptions::hold_window`]).
    pub checks: Option<Vec<String>>,
    /// Node health checks (Consul's `NodeChecks`).
    pub node_checks: Option<Vec<String>>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            name: LockOptions::DEFAULT_SESSION_NAME.to_owned(),
            ttl: Self::DEFAULT_TTL,
            lock_delay: None,
            behavior: SessionBehavior::Release,
            node: None,
            checks: None,
            node_checks: None,
        }
    }
}

impl SessionOptions {
    /// Go's session TTL.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

    /// A session with no health checks: it ends only when its TTL runs out unrenewed (or is
    /// destroyed), never early because its node was marked failed.
    ///
    /// ```
    /// # use consul_lock_core::machine::SessionOptions;
    /// let session = SessionOptions::default().ttl_only();
    /// assert_eq!(session.checks, Some(vec![]));
    /// assert!(!session.health_bound());
    /// ```
    pub fn ttl_only(mut self) -> SessionOptions {
        self.checks = Some(Vec::new());
        self.node_checks = None;
        self
    }

    /// Whether health checks bind the session, so that Consul may end it before its TTL: with
    /// neither `checks` nor `node_checks` given, Consul binds it to `serfHealth` (measured on
    /// 1.8.7: `{"Checks": []}` makes a session with no checks, `{}` one with `serfHealth`).
    pub fn health_bound(&self) -> bool {
        let given = |checks: &Option<Vec<String>>| checks.as_ref().is_some_and(|c| !c.is_empty());
        match (&self.checks, &self.node_checks) {
            (None, None) => true,
            _ => given(&self.checks) || given(&self.node_checks),
        }
    }

    /// How long after the send time of its last acknowledged renew a holder may still take the
    /// session's keys as its own: the renew deadline. Consul ends an unrenewed session no
    /// earlier than a TTL after the last renew it saw, so that bounds it; a health-bound session
    /// can end at any moment after that renew, and then only what `after` says keeps others out:
    /// the lock-delay (this session's, or Consul's default 15 s), or nothing.
    ///
    /// ```
    /// # use consul_lock_core::machine::{AfterInvalidation, SessionOptions};
    /// # use std::time::Duration;
    /// let mut session = SessionOptions::default(); // TTL 15 s, lock-delay 15 s, serfHealth
    /// assert_eq!(session.hold_window(AfterInvalidation::LockDelay), Duration::from_secs(15));
    /// session.lock_delay = Some(Duration::from_secs(5));
    /// assert_eq!(session.hold_window(AfterInvalidation::LockDelay), Duration::from_secs(5));
    /// assert_eq!(session.hold_window(AfterInvalidation::TakenAtOnce), Duration::ZERO);
    /// let session = session.ttl_only();
    /// assert_eq!(session.hold_window(AfterInvalidation::TakenAtOnce), Duration::from_secs(15));
    /// ```
    pub fn hold_window(&self, after: AfterInvalidation) -> Duration {
        hold_window(self.ttl, self.early_end_guard(after))
    }

    /// How long the keys stay nobody else's after a failed check ends the session early (the
    /// lock-delay, or zero when nothing keeps them); `None` when no check binds the session, so
    /// only its TTL ends it.
    pub(crate) fn early_end_guard(&self, after: AfterInvalidation) -> Option<Duration> {
        self.health_bound().then(|| match after {
            AfterInvalidation::LockDelay => self.lock_delay.unwrap_or(DEFAULT_LOCK_DELAY),
            AfterInvalidation::TakenAtOnce => Duration::ZERO,
        })
    }

    /// The create request these options describe.
    pub fn to_request(&self) -> SessionCreate {
        SessionCreate {
            name: Some(self.name.clone()),
            ttl: Some(self.ttl),
            lock_delay: self.lock_delay,
            behavior: self.behavior,
            node: self.node.clone(),
            checks: self.checks.clone(),
            node_checks: self.node_checks.clone(),
        }
    }

    pub(crate) fn validate(&self, after: AfterInvalidation) -> Result<(), OptionsError> {
        if !SESSION_TTL_RANGE.contains(&self.ttl) {
            return Err(OptionsError::SessionTtl { ttl: self.ttl });
        }
        if let Some(delay) = self.lock_delay {
            if delay > MAX_LOCK_DELAY {
                return Err(OptionsError::LockDelay { delay });
            }
        }
        let window = self.hold_window(after);
        if window < MIN_HOLD_WINDOW {
            return Err(match after {
                AfterInvalidation::LockDelay => OptionsError::LockDelayBelowHoldWindow { window },
                AfterInvalidation::TakenAtOnce => OptionsError::HealthBoundSemaphore,
            });
        }
        Ok(())
    }
}

/// What every kind of hold is tuned by, whatever it holds: the value it writes, its session,
/// how long it waits, how it watches what it holds and how it bears failures. Go's `LockOptions`
/// and `SemaphoreOptions` less their key, with Go's defaults.
///
/// A [`LockOptions`] and a [`SemaphoreOptions`] each carry one, as `hold`, beside what names
/// what they hold.
///
/// ```
/// # use consul_lock_core::machine::{HoldOptions, LockOptions};
/// # use std::time::Duration;
/// let mut options = LockOptions::new("service/leader").unwrap();
/// options.hold.value = b"node-1".to_vec();
/// options.hold.try_once = true;
/// assert_eq!(options.hold.wait_time, HoldOptions::DEFAULT_WAIT_TIME);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldOptions {
    /// Written to the key on acquire (and, for a lock, on release).
    pub value: Vec<u8>,
    /// Create a session, or use the caller's.
    pub session: SessionChoice,
    /// The `wait` of each blocking read while waiting to acquire (default 15 s, at most Consul's
    /// 10 min): Go's `LockWaitTime` and `SemaphoreWaitTime`. With `try_once`, the whole time to
    /// wait.
    pub wait_time: Duration,
    /// Give up once `wait_time` has passed without acquiring: a distinct outcome
    /// ([`LockEvent::GaveUp`](crate::machine::LockEvent::GaveUp)), never mistaken for success.
    /// Go's `LockTryOnce` and `SemaphoreTryOnce`.
    pub try_once: bool,
    /// How many consecutive failed monitor reads to bear before declaring the hold lost.
    /// `None` (the default) bears them for as long as the session's renewals succeed, since the
    /// renew deadline already bounds how long a holder can be wrong; `Some(n)` is Go's
    /// `MonitorRetries`.
    pub monitor_retries: Option<u32>,
    /// The pause before retrying a failed monitor read (default 2 s, as Go's).
    pub monitor_retry_time: Duration,
    /// The `wait` of each monitor read (default 5 min, Consul's default).
    pub monitor_wait: Duration,
    /// The deadline of every request that is not a blocking read (default 10 s). Renewals get at
    /// most what is left before the renew deadline.
    pub request_timeout: Duration,
    /// The Consul namespace (Enterprise), overriding the client config's.
    pub namespace: Option<String>,
    /// How long failed tries may go on in a row while acquiring before the attempt ends with
    /// [`LockError::AgentUnavailable`](crate::machine::LockError::AgentUnavailable) (default
    /// 60 s; `None`: retry for ever). Every failed try is reported as it happens
    /// ([`LockEvent::Retrying`](crate::machine::LockEvent::Retrying)); any usable answer starts
    /// the count again. The budget is checked when a try fails, so the attempt ends at the first
    /// failure past it.
    pub acquire_error_budget: Option<Duration>,
    /// Seeds the jitter of retries, so that a run can be replayed (default 0).
    ///
    /// An embedder driving the machine itself must vary the seed per process and per machine
    /// (from entropy): machines sharing a seed retry on the same jitter sequence, so processes
    /// that fail together (an agent restart, a leader election) would retry in lockstep. The
    /// crate's drivers do this themselves and override this option.
    pub seed: u64,
}

impl HoldOptions {
    /// Go's lock and semaphore wait time.
    pub const DEFAULT_WAIT_TIME: Duration = Duration::from_secs(15);
    /// Go's monitor retry time.
    pub const DEFAULT_MONITOR_RETRY_TIME: Duration = Duration::from_secs(2);
    /// Consul's default (and the largest useful) blocking wait for monitor reads.
    pub const DEFAULT_MONITOR_WAIT: Duration = Duration::from_secs(300);
    /// The default deadline of requests that do not block.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// The default error budget of an acquisition: a minute of failures in a row.
    pub const DEFAULT_ACQUIRE_ERROR_BUDGET: Duration = Duration::from_secs(60);
    /// Consul caps a blocking read's wait at 10 minutes.
    pub const MAX_WAIT: Duration = Duration::from_secs(600);

    /// Go's defaults, creating a session with `session`.
    pub fn new(session: SessionOptions) -> HoldOptions {
        HoldOptions {
            value: Vec::new(),
            session: SessionChoice::Create(session),
            wait_time: Self::DEFAULT_WAIT_TIME,
            try_once: false,
            monitor_retries: None,
            monitor_retry_time: Self::DEFAULT_MONITOR_RETRY_TIME,
            monitor_wait: Self::DEFAULT_MONITOR_WAIT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            namespace: None,
            acquire_error_budget: Some(Self::DEFAULT_ACQUIRE_ERROR_BUDGET),
            seed: 0,
        }
    }

    /// The session options, when the hold creates its session.
    pub fn session_options_mut(&mut self) -> Option<&mut SessionOptions> {
        match &mut self.session {
            SessionChoice::Create(o) => Some(o),
            SessionChoice::Existing(_) => None,
        }
    }

    /// Checks every option against what Consul accepts and what the machine needs, for a hold
    /// whose keys are kept from others after an early end of its session as `after` says.
    pub fn validate(&self, after: AfterInvalidation) -> Result<(), OptionsError> {
        if let SessionChoice::Create(session) = &self.session {
            session.validate(after)?;
        }
        check_durations(
            &[("wait_time", self.wait_time), ("monitor_wait", self.monitor_wait)],
            &[
                ("monitor_retry_time", self.monitor_retry_time),
                ("request_timeout", self.request_timeout),
            ],
        )?;
        if self.value.len() > 512 * 1024 {
            return Err(OptionsError::ValueTooLarge {
                len: self.value.len(),
            });
        }
        check_namespace(self.namespace.as_ref())
    }
}

/// Everything a [`LockMachine`](crate::machine::LockMachine) needs to know about its lock.
///
/// ```
/// # use consul_lock_core::machine::LockOptions;
/// # use std::time::Duration;
/// let mut options = LockOptions::new("service/leader").unwrap();
/// options.hold.value = b"node-1".to_vec();
/// options.hold.try_once = true;
/// options.hold.seed = 7;
/// assert_eq!(options.hold.wait_time, Duration::from_secs(15));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// The lock key.
    pub key: Key,
    /// How the lock is held (its value is written on acquire and on release).
    pub hold: HoldOptions,
    /// How a contender waits while someone else holds the key (default: on the key, as Go).
    pub waiting: Waiting,
}

/// How a lock's contender waits while the key is held by someone else.
///
/// ```
/// # use consul_lock_core::api::SessionId;
/// # use consul_lock_core::machine::{LockOptions, Waiting};
/// let mut options = LockOptions::new("service/leader").unwrap();
/// assert_eq!(options.waiting, Waiting::Key);
/// options.waiting = Waiting::Queue;
/// let session = SessionId::new("adf4238a-882b-9ddc-4a9d-5b6758e4159e").unwrap();
/// assert_eq!(
///     options.queue_entry(&session).unwrap().as_str(),
///     "service/leader/.queue/adf4238a-882b-9ddc-4a9d-5b6758e4159e"
/// );
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Waiting {
    /// Every contender watches the lock key, as Go's `api.Lock` does: each change of the key
    /// wakes them all, and the quickest wins.
    #[default]
    Key,
    /// Contenders wait in line, in the order Consul registered them, each watching only the one
    /// ahead of it, so a handoff wakes one waiter (etcd's `concurrency.Mutex`, ZooKeeper's lock
    /// recipe). Each waiter holds an entry `<key>/.queue/<session>` with its session; the head
    /// acquires the key as [`Waiting::Key`] does, so contenders outside the line (Go's client,
    /// `consul lock`) stay safe with it and can only overtake. See ARCHITECTURE.md.
    Queue,
}

impl LockOptions {
    /// The prefix of a queued lock's entries: `<key>/.queue/`.
    pub fn queue_prefix(&self) -> String {
        format!("{}/{}/", self.key.as_str().trim_end_matches('/'), QUEUE_SEGMENT)
    }

    /// A queued lock's entry for the waiter `session` (or any name under the prefix): valid for
    /// every valid key and session ID (see [`Key::MAX_ENCODED_LEN`]).
    pub fn queue_entry(&self, session: &SessionId) -> Result<Key, KeyError> {
        self.queue_entry_named(session.as_str())
    }

    pub(crate) fn queue_entry_named(&self, name: &str) -> Result<Key, KeyError> {
        self.key.child(QUEUE_SEGMENT)?.child(name)
    }
}

/// The segment under a queued lock's key that its entries live in. A dot segment, like Go's
/// `.lock`, so that it names no ordinary child; and under the lock's own key, so that it meets
/// no Go lock key (`<prefix>/.lock` is the key; its queue is `<prefix>/.lock/.queue/`) and no
/// semaphore prefix that is not already the lock key's own.
const QUEUE_SEGMENT: &str = ".queue";

impl LockOptions {
    /// Go's session name for locks.
    pub const DEFAULT_SESSION_NAME: &'static str = "Consul API Lock";

    /// Options for a lock on `key` with Go's defaults.
    pub fn new(key: &str) -> Result<LockOptions, OptionsError> {
        Ok(LockOptions {
            key: Key::new(key)?,
            hold: HoldOptions::new(SessionOptions::default()),
            waiting: Waiting::Key,
        })
    }

    /// Checks every option against what Consul accepts and what the machine needs.
    pub fn validate(&self) -> Result<(), OptionsError> {
        // Queued, the caller's session must make a usable entry key.
        if let (Waiting::Queue, SessionChoice::Existing(id)) = (self.waiting, &self.hold.session) {
            self.queue_entry(id)?;
        }
        self.hold.validate(Self::AFTER_INVALIDATION)
    }
}

/// What a holder needs of its options, whatever its kind.
pub trait KindOptions: std::fmt::Debug + Send + 'static {
    /// What keeps this kind's keys from others when its session ends early.
    const AFTER_INVALIDATION: AfterInvalidation;

    /// The options every kind has.
    fn hold(&self) -> &HoldOptions;
    /// Checks every option.
    fn check(&self) -> Result<(), OptionsError>;
}

impl KindOptions for LockOptions {
    const AFTER_INVALIDATION: AfterInvalidation = AfterInvalidation::LockDelay;

    fn hold(&self) -> &HoldOptions {
        &self.hold
    }

    fn check(&self) -> Result<(), OptionsError> {
        self.validate()
    }
}

impl KindOptions for SemaphoreOptions {
    const AFTER_INVALIDATION: AfterInvalidation = AfterInvalidation::TakenAtOnce;

    fn hold(&self) -> &HoldOptions {
        &self.hold
    }

    fn check(&self) -> Result<(), OptionsError> {
        self.validate()
    }
}

/// Checks blocking `waits` (more than 0, at most Consul's 10 minutes) and `pauses` (more than 0,
/// at most an hour), each with its option's name.
pub(crate) fn check_durations(
    waits: &[(&'static str, Duration)],
    pauses: &[(&'static str, Duration)],
) -> Result<(), OptionsError> {
    for &(name, value) in waits {
        if value.is_zero() || value > HoldOptions::MAX_WAIT {
            return Err(OptionsError::Wait { name, value });
        }
    }
    for &(name, value) in pauses {
        if value.is_zero() || value > Duration::from_secs(3600) {
            return Err(OptionsError::Pause { name, value });
        }
    }
    Ok(())
}

/// A namespace that can travel as `ns=`.
pub(crate) fn check_namespace(namespace: Option<&String>) -> Result<(), OptionsError> {
    if namespace.is_some_and(String::is_empty) {
        return Err(OptionsError::EmptyNamespace);
    }
    if let Some(len) = namespace
        .map(String::len)
        .filter(|&len| len > crate::api::ClientConfig::MAX_NAME_LEN)
    {
        return Err(OptionsError::NamespaceTooLong {
            len,
            limit: crate::api::ClientConfig::MAX_NAME_LEN,
        });
    }
    Ok(())
}

/// An option Consul or the machine can't work with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// The key is not usable.
    #[error("invalid lock key: {0}")]
    Key(#[from] KeyError),
    /// Consul accepts session TTLs from 10 s to 86400 s.
    #[error("session TTL {ttl:?} is out of range: Consul accepts 10s to 24h")]
    SessionTtl {
        /// The TTL given.
        ttl: Duration,
    },
    /// Consul caps lock-delay at 60 s.
    #[error("lock delay {delay:?} is too long: Consul accepts at most 60s (0 disables it)")]
    LockDelay {
        /// The delay given.
        delay: Duration,
    },
    /// A blocking wait of zero or over Consul's 10-minute cap.
    #[error("{name} {value:?} is out of range: use more than 0 and at most 10 minutes")]
    Wait {
        /// Which option.
        name: &'static str,
        /// The value given.
        value: Duration,
    },
    /// A pause or timeout of zero (a retry storm) or over an hour.
    #[error("{name} {value:?} is out of range: use more than 0 and at most 1 hour")]
    Pause {
        /// Which option.
        name: &'static str,
        /// The value given.
        value: Duration,
    },
    /// Consul caps values at 512 KiB.
    #[error("the lock value is {len} bytes; Consul accepts at most 512 KiB")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
    },
    /// An empty namespace would be sent as `ns=`.
    #[error("the namespace is empty: leave it unset for the default namespace")]
    EmptyNamespace,
    /// A namespace too long to travel in every request's URI.
    #[error("the namespace is {len} bytes long; at most {limit} bytes are accepted")]
    NamespaceTooLong {
        /// The namespace's length in bytes.
        len: usize,
        /// The most allowed.
        limit: usize,
    },
    /// The client config can't be used (see
    /// [`ClientConfig::check`](crate::api::ClientConfig::check)).
    #[error("invalid client config: {0}")]
    Config(#[from] crate::api::ConfigError),
    /// A count that must be at least 1 (a key set's limits).
    #[error("{name} is 0: it must be at least 1")]
    Zero {
        /// Which option.
        name: &'static str,
    },
    /// A semaphore needs at least one slot.
    #[error("the semaphore limit is 0: a semaphore needs at least one slot")]
    Limit,
    /// A lock's session is bound to health checks, which can end it at any moment, and its
    /// lock-delay is too short to keep the key from others long enough to hold it safely.
    #[error(
        "a session bound to health checks (serfHealth by default) can be ended at any moment by a failed check, \
         after which only its lock-delay keeps the key from others: holding would be safe for {window:?} after each \
         renew, and at least 1s is needed; use a lock-delay of 1s or more, or a session with no checks \
         (SessionOptions::ttl_only)"
    )]
    LockDelayBelowHoldWindow {
        /// How long holding would be safe after each renew.
        window: Duration,
    },
    /// A semaphore's session is bound to health checks: a failed check ends it at any moment,
    /// and the other contenders take the slot at once.
    #[error(
        "a semaphore's session must have no health checks: a failed check can end it at any moment, and the other \
         contenders then take its slot at once (no lock-delay guards a slot); use SessionOptions::semaphore() or \
         SessionOptions::ttl_only"
    )]
    HealthBoundSemaphore,
}

impl SessionOptions {
    /// A semaphore's session: Go's (named `Consul API Semaphore`, TTL 15 s, behavior `delete`,
    /// so that a contender's key goes with its session) but with no health checks, where Go's
    /// has `serfHealth`. Nothing keeps a slot from the other contenders once its holder's
    /// session ends ([`AfterInvalidation::TakenAtOnce`]), so a session a failed check could end
    /// at any moment would leave no time in which holding is safe; with the TTL alone, Consul
    /// ends it no earlier than a TTL after the last renew it saw, which the renew deadline
    /// follows. The cost: a slot whose node dies is freed after the TTL (up to twice it), not
    /// when the node is marked failed.
    pub fn semaphore() -> SessionOptions {
        SessionOptions {
            name: SemaphoreOptions::DEFAULT_SESSION_NAME.to_owned(),
            behavior: SessionBehavior::Delete,
            ..SessionOptions::default()
        }
        .ttl_only()
    }
}

/// Everything a [`SemaphoreMachine`](crate::machine::SemaphoreMachine) needs to know: Go's
/// `SemaphoreOptions`, with the same defaults.
///
/// The semaphore lives under `prefix`: each contender holds `<prefix>/<session>` and the holders
/// are listed in `<prefix>/.lock`, as Go's `api.Semaphore` and `consul lock -n N` do, so that
/// Go and Rust contenders share one semaphore.
///
/// ```
/// # use consul_lock_core::machine::{OptionsError, SemaphoreOptions};
/// # use std::time::Duration;
/// let mut options = SemaphoreOptions::new("service/workers", 3).unwrap();
/// options.hold.value = b"node-1".to_vec();
/// assert_eq!(options.lock_key().as_str(), "service/workers/.lock");
/// assert_eq!(options.hold.wait_time, Duration::from_secs(15));
/// assert_eq!(SemaphoreOptions::new("service/workers", 0).err(), Some(OptionsError::Limit));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SemaphoreOptions {
    /// The prefix the semaphore's keys live under.
    pub prefix: Key,
    /// How many may hold at once (1 or more); every contender must agree on it.
    pub limit: u32,
    /// How a slot is held (the value is written to the contender key; the session defaults to
    /// [`SessionOptions::semaphore`]).
    pub hold: HoldOptions,
}

impl SemaphoreOptions {
    /// Go's session name for semaphores.
    pub const DEFAULT_SESSION_NAME: &'static str = "Consul API Semaphore";
    /// The key under the prefix that lists the holders (Go's `DefaultSemaphoreKey`).
    pub const LOCK_KEY: &'static str = ".lock";

    /// Options for a semaphore of `limit` slots under `prefix`, with Go's defaults.
    pub fn new(prefix: &str, limit: u32) -> Result<SemaphoreOptions, OptionsError> {
        if limit == 0 {
            return Err(OptionsError::Limit);
        }
        Ok(SemaphoreOptions {
            prefix: Key::new(prefix)?,
            limit,
            hold: HoldOptions::new(SessionOptions::semaphore()),
        })
    }

    /// `<prefix>/.lock`, the key that lists the holders.
    pub fn lock_key(&self) -> Key {
        match self.prefix.child(Self::LOCK_KEY) {
            Ok(key) => key,
            // A valid prefix joined with `.lock` is a valid key: `.lock` is no empty or dot
            // segment, and its 6 bytes fit in the room `Key::child` allows beyond any valid key.
            Err(e) => unreachable!("consul-lock bug: {e}"),
        }
    }

    /// `<prefix>/<session>`, the key a contender holds. It may exceed
    /// [`Key::MAX_ENCODED_LEN`] by the encoded `/<session>`, for which requests leave room.
    pub fn contender_key(&self, session: &SessionId) -> Result<Key, KeyError> {
        self.prefix.child(session.as_str())
    }

    /// Checks every option against what Consul accepts and what the machine needs.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.limit == 0 {
            return Err(OptionsError::Limit);
        }
        // The caller's session must make a usable contender key.
        if let SessionChoice::Existing(id) = &self.hold.session {
            self.contender_key(id)?;
        }
        self.hold.validate(Self::AFTER_INVALIDATION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> LockOptions {
        match LockOptions::new("a/b") {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_are_gos_and_valid() {
        let o = options();
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.hold.wait_time, Duration::from_secs(15));
        let SessionChoice::Create(s) = &o.hold.session else {
            panic!("creates a session")
        };
        assert_eq!(
            (s.name.as_str(), s.ttl),
            ("Consul API Lock", Duration::from_secs(15))
        );
    }

    #[test]
    fn bad_options_are_named() {
        let mut o = options();
        if let Some(s) = o.hold.session_options_mut() {
            s.ttl = Duration::from_secs(5);
        }
        let err = o.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("session TTL") && err.contains("10s"), "{err}");

        let mut o = options();
        if let Some(s) = o.hold.session_options_mut() {
            s.lock_delay = Some(Duration::from_secs(61));
        }
        assert!(matches!(o.validate(), Err(OptionsError::LockDelay { .. })));

        let mut o = options();
        o.hold.wait_time = Duration::ZERO;
        assert!(matches!(
            o.validate(),
            Err(OptionsError::Wait {
                name: "wait_time",
                ..
            })
        ));
        o.hold.wait_time = Duration::from_secs(601);
        assert!(matches!(o.validate(), Err(OptionsError::Wait { .. })));

        let mut o = options();
        o.hold.monitor_retry_time = Duration::ZERO;
        assert!(matches!(
            o.validate(),
            Err(OptionsError::Pause {
                name: "monitor_retry_time",
                ..
            })
        ));

        assert!(matches!(
            LockOptions::new(""),
            Err(OptionsError::Key(KeyError::Empty))
        ));
    }

    #[test]
    fn zero_lock_delay_is_kept_on_a_session_without_checks() {
        let mut o = options();
        if let Some(s) = o.hold.session_options_mut() {
            s.lock_delay = Some(Duration::ZERO);
            *s = s.clone().ttl_only();
        }
        assert_eq!(o.validate(), Ok(()));
        let SessionChoice::Create(s) = &o.hold.session else {
            panic!("creates a session")
        };
        assert_eq!(s.to_request().lock_delay, Some(Duration::ZERO));
        assert_eq!(s.to_request().checks, Some(vec![]));
        assert_eq!(s.hold_window(AfterInvalidation::LockDelay), s.ttl);
    }

    #[test]
    fn a_health_bound_lock_needs_a_lock_delay_to_hold_by() {
        // The reliability lab's finding: a failed node's sessions end at once, and then only the
        // lock-delay keeps the key from the next holder.
        for (delay, checks, node_checks) in [
            (Duration::ZERO, None, None),
            (Duration::from_millis(999), None, None),
            (Duration::ZERO, Some(vec!["serfHealth".to_owned()]), None),
            (Duration::ZERO, Some(vec![]), Some(vec!["service:web".to_owned()])),
        ] {
            let mut o = options();
            if let Some(s) = o.hold.session_options_mut() {
                s.lock_delay = Some(delay);
                s.checks = checks.clone();
                s.node_checks = node_checks.clone();
            }
            assert_eq!(
                o.validate(),
                Err(OptionsError::LockDelayBelowHoldWindow { window: delay }),
                "{delay:?} {checks:?} {node_checks:?}"
            );
        }
        let mut o = options();
        if let Some(s) = o.hold.session_options_mut() {
            s.lock_delay = Some(MIN_HOLD_WINDOW);
        }
        assert_eq!(o.validate(), Ok(()));
        let err = OptionsError::LockDelayBelowHoldWindow {
            window: Duration::ZERO,
        }
        .to_string();
        assert!(
            err.contains("lock-delay of 1s or more") && err.contains("ttl_only"),
            "{err}"
        );
    }

    #[test]
    fn the_hold_window_is_the_ttl_or_the_lock_delay_whichever_is_shorter() {
        let mut s = SessionOptions {
            ttl: Duration::from_secs(10),
            ..SessionOptions::default()
        };
        // Consul's default lock-delay (15 s) is longer than this TTL.
        assert_eq!(
            s.hold_window(AfterInvalidation::LockDelay),
            Duration::from_secs(10)
        );
        s.lock_delay = Some(Duration::from_secs(4));
        assert_eq!(
            s.hold_window(AfterInvalidation::LockDelay),
            Duration::from_secs(4)
        );
        assert_eq!(
            hold_window(
                Duration::from_secs(3),
                s.early_end_guard(AfterInvalidation::LockDelay)
            ),
            Duration::from_secs(3)
        );
        // Measured on 1.8.7: `{"NodeChecks": []}` alone makes a session with no checks.
        s.node_checks = Some(vec![]);
        assert!(!s.health_bound());
        assert_eq!(
            s.hold_window(AfterInvalidation::LockDelay),
            Duration::from_secs(10)
        );
        s.checks = Some(vec!["serfHealth".to_owned()]);
        assert!(s.health_bound());
    }

    #[test]
    fn semaphore_defaults_are_gos_and_valid() {
        let o = match SemaphoreOptions::new("a/b", 2) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.hold.wait_time, Duration::from_secs(15));
        assert_eq!(o.lock_key().as_str(), "a/b/.lock");
        let SessionChoice::Create(s) = &o.hold.session else {
            panic!("creates a session")
        };
        assert_eq!(
            (s.name.as_str(), s.ttl, s.behavior),
            (
                "Consul API Semaphore",
                Duration::from_secs(15),
                SessionBehavior::Delete
            )
        );
        // Unlike Go's: no serfHealth, so that only the TTL can end a slot's session.
        assert_eq!(s.to_request().checks, Some(vec![]));
        assert_eq!(s.hold_window(AfterInvalidation::TakenAtOnce), s.ttl);
        let session = SessionId::new("s1").ok();
        let contender = session.and_then(|s| o.contender_key(&s).ok());
        assert_eq!(contender.as_ref().map(Key::as_str), Some("a/b/s1"));
    }

    #[test]
    fn a_health_bound_semaphore_is_refused() {
        let Ok(mut o) = SemaphoreOptions::new("a/b", 2) else {
            panic!("valid")
        };
        if let Some(s) = o.hold.session_options_mut() {
            s.checks = None;
            s.lock_delay = Some(Duration::from_secs(60));
        }
        assert_eq!(o.validate(), Err(OptionsError::HealthBoundSemaphore));
    }

    #[test]
    fn bad_semaphore_options_are_named() {
        assert_eq!(SemaphoreOptions::new("a", 0).err(), Some(OptionsError::Limit));
        assert!(matches!(
            SemaphoreOptions::new("", 1),
            Err(OptionsError::Key(KeyError::Empty))
        ));
        let Ok(mut o) = SemaphoreOptions::new("a/", 1) else {
            panic!("valid")
        };
        assert_eq!(o.lock_key().as_str(), "a/.lock");
        o.limit = 0;
        assert_eq!(o.validate(), Err(OptionsError::Limit));
        o.limit = 1;
        o.hold.wait_time = Duration::ZERO;
        assert!(matches!(
            o.validate(),
            Err(OptionsError::Wait {
                name: "wait_time",
                ..
            })
        ));
        o.hold.wait_time = Duration::from_secs(1);
        if let Some(s) = o.hold.session_options_mut() {
            s.ttl = Duration::from_secs(5);
        }
        assert!(matches!(o.validate(), Err(OptionsError::SessionTtl { .. })));
        // The caller's session must make a usable contender key.
        if let Ok(id) = SessionId::new("..") {
            o.hold.session = SessionChoice::Existing(id);
        }
        assert!(matches!(o.validate(), Err(OptionsError::Key(_))));
    }
}
