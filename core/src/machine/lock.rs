//! The lock: wait for the key, acquire it, hold it while watching it, give it up.
//!
//! The algorithm is Go's `api.Lock` (see ARCHITECTURE.md), with the fixes its users asked for:
//! a renew deadline, reuse after a loss, cancellation at any moment, lock-delay-aware retries,
//! try-once as its own outcome, and transient errors that don't lose a healthy lock.

use std::time::{Duration, Instant};

use crate::api::{
    ApiError, Blocking, Consistency, Key, KvCasDelete, KvGet, KvLockTxn, KvPair, KvRelease, LockRefusal,
    LockTxnOutcome, QueryReply, SessionId, SessionInfo,
};
use crate::machine::backoff::{Backoff, Rng};
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::{Base, Failures, Phases, Watch, WatchStep, holding_surface};
use crate::machine::outbox::{Pending, Pendings};
use crate::machine::read;
use crate::machine::session::{SessionEvent, SessionLoss, SessionMachine};
use crate::machine::{LOCK_FLAG_VALUE, LockOptions, OptionsError, Reply, RequestId, SessionChoice};

/// Margin past the holder's lock-delay before acquiring again, for clock granularity.
const LOCK_DELAY_MARGIN: Duration = Duration::from_millis(15);

/// How long a holder must have been seen holding before the waiter asks for its session's
/// lock-delay. Every waiter asks about every new holder, so under contention, where holds last
/// milliseconds, asking at once cost each handoff one request per waiter (a fifth of all the
/// requests of 50 contenders, in the contention benchmark); a holder whose session is invalidated
/// sooner than this is waited out by backoff instead.
const HOLDER_INFO_AFTER: Duration = Duration::from_millis(100);

/// Proof of holding the lock: the key, the session, and where this hold stands in the key's
/// history.
///
/// Consul's `LockIndex` grows by one each time a new session acquires the key, but starts again
/// when the key is deleted or overwritten by a plain write, so it can repeat. `modify_index` is
/// the key's `ModifyIndex` as the acquire left it: the Raft index of the write that granted the
/// hold (the lock transaction answers with the entry it wrote), so it strictly increases from
/// one holder to the next whatever happens to the key. [`sequence`](Self::sequence) gives it: pass it with writes made
/// on the lock's behalf, and refuse writes that carry a smaller one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FencingToken {
    /// The lock key.
    pub key: Key,
    /// The holding session.
    pub session: SessionId,
    /// The key's `LockIndex` when acquired (what Go's client and `consul lock` expose).
    pub lock_index: u64,
    /// The key's `ModifyIndex` as the acquire wrote it.
    pub modify_index: u64,
}

impl FencingToken {
    /// The hold's place in the key's history: compare these to order holders of one key.
    ///
    /// ```
    /// # use consul_lock_core::api::{Key, SessionId};
    /// # use consul_lock_core::machine::FencingToken;
    /// let token = |lock_index, modify_index| FencingToken {
    ///     key: Key::new("k").unwrap(),
    ///     session: SessionId::new("s").unwrap(),
    ///     lock_index,
    ///     modify_index,
    /// };
    /// // After the key was deleted and written again, LockIndex restarts; the order holds.
    /// assert!(token(1, 40).sequence() > token(7, 25).sequence());
    /// ```
    pub fn sequence(&self) -> u64 {
        self.modify_index
    }
}

/// Why a held lock was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// Consul invalidated the session (renew answered 404): expired, or destroyed by someone.
    SessionInvalidated,
    /// No renew was acknowledged within the TTL: the holder can't know that it still holds.
    RenewDeadline {
        /// Time since the last acknowledged renew was sent.
        since_ack: Duration,
    },
    /// The key was deleted.
    KeyDeleted,
    /// Another session holds the key.
    TakenBy(SessionId),
    /// The key is no longer held by this session (released by someone else, or the session
    /// was invalidated).
    NotHeld,
    /// The key was overwritten with other flags.
    Conflict {
        /// The flags found.
        flags: u64,
    },
    /// Monitor reads failed more often in a row than `monitor_retries` allows, or were refused.
    MonitorFailed {
        /// How many failed in a row.
        failures: u32,
        /// The last failure.
        last: String,
    },
}

/// An operation the machine can't do, or an attempt that ended without the lock.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// `lock` while already holding or acquiring.
    #[error("Lock already held (or being acquired)")]
    AlreadyHeld,
    /// `unlock` without holding.
    #[error("Lock not held")]
    NotHeld,
    /// `destroy` or `lock` while another operation is under way.
    #[error("another operation is under way: wait for its event, or cancel it")]
    Busy,
    /// The key exists with other flags: a plain key or a semaphore's.
    #[error("Existing key does not match lock use (flags {flags:#x}); pick another key")]
    Conflict {
        /// The flags found.
        flags: u64,
    },
    /// `destroy` found the key held.
    #[error("Lock in use")]
    InUse,
    /// The session could not be created.
    #[error("could not create the lock's session: {0}")]
    Session(ApiError),
    /// Consul refused a request in a way retrying won't fix (a bad request, a refusal the
    /// machine does not know).
    #[error("Consul refused the request: {0}")]
    Refused(ApiError),
    /// The token may not do what the lock needs (ACLs): reading the key, writing it
    /// (`key_prefix "…" { policy = "write" }`), or creating a session (`session_prefix`).
    #[error("permission denied by Consul's ACLs (check the token's key and session rules): {0}")]
    PermissionDenied(ApiError),
    /// Every try to reach a usable answer failed for longer than the acquisition's error budget
    /// (`acquire_error_budget`): the agent is down, hangs, or answers errors.
    #[error(
        "the Consul agent gave no usable answer for {failing_for:?} ({attempts} tries in a row); \
         giving up (acquire_error_budget). The last failure: {last}"
    )]
    AgentUnavailable {
        /// Failed tries in a row.
        attempts: u32,
        /// How long they went on.
        failing_for: Duration,
        /// The last failure.
        last: String,
    },
    /// The release of a held lock was never confirmed by Consul. The session was destroyed
    /// after it (if the machine made it), which frees the key after the session's lock-delay;
    /// a caller's session keeps the key until it ends.
    #[error(
        "the release was not confirmed after {attempts} tries ({last}); the key is freed when its session ends"
    )]
    ReleaseUnconfirmed {
        /// Release tries made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// `destroy` could not reach a verdict.
    #[error("could not destroy the lock: {0}")]
    Unavailable(String),
    /// A semaphore's `.lock` names another limit than ours: every contender must agree on it.
    #[error("semaphore limit conflict (lock: {theirs}, local: {ours})")]
    LimitMismatch {
        /// Our limit.
        ours: u32,
        /// The limit the semaphore's `.lock` holds.
        theirs: u32,
    },
    /// A semaphore's `.lock` (with the semaphore's flags) holds something that is not a
    /// semaphore's state.
    #[error("the semaphore's .lock is not a semaphore's state: {0}")]
    BadSemaphore(String),
}

impl LockError {
    /// The error for a refusal Consul gave: a permission refusal, or another.
    pub(crate) fn refused(e: ApiError) -> LockError {
        if e.is_permission_denied() {
            LockError::PermissionDenied(e)
        } else {
            LockError::Refused(e)
        }
    }

    /// The error for a session Consul would not create: a permission refusal, or another.
    pub(crate) fn session(e: ApiError) -> LockError {
        if e.is_permission_denied() {
            LockError::PermissionDenied(e)
        } else {
            LockError::Session(e)
        }
    }
}

/// A failed try while acquiring, with the next one scheduled: reported for every failure, so
/// that an agent that is down or answers errors is never a silent wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// What failed.
    pub cause: String,
    /// Failed tries in a row, this one included.
    pub attempt: u32,
    /// Since when every try has failed (the error budget counts from here).
    pub failing_since: Instant,
    /// When the next try goes out.
    pub next_try: Instant,
}

/// What the lock reports to its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockEvent {
    /// The lock is held.
    Acquired(FencingToken),
    /// The lock was held and no longer is (or may no longer be).
    Lost(LossReason),
    /// `unlock` finished: the key is released and an owned session destroyed.
    Released,
    /// `unlock` finished without Consul confirming the release
    /// ([`LockError::ReleaseUnconfirmed`], [`LockError::PermissionDenied`]): the machine is idle,
    /// and an owned session was destroyed after the last try.
    ReleaseFailed(LockError),
    /// A try failed while acquiring; the next is scheduled. The acquisition goes on.
    Retrying(Retry),
    /// Try-once: the wait ended without the lock. Not a success, and not an error.
    GaveUp,
    /// `cancel` took effect during acquisition.
    Cancelled,
    /// The acquisition (or `destroy`) ended with an error.
    Failed(LockError),
    /// `destroy` deleted the key (or found it absent).
    Destroyed,
}

/// Where the lock stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockStatus {
    /// Not locking; `lock` or `destroy` may be called.
    Idle,
    /// Waiting for the key.
    Acquiring,
    /// Holding the key.
    Held,
    /// Giving it up.
    Releasing,
    /// Deleting the key.
    Destroying,
}

/// What to do once a pause ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Read,
    Acquire,
}

#[derive(Clone, Debug)]
enum Step {
    AwaitSession,
    /// A (blocking) read of the key.
    Read(Pending),
    Acquire(Pending),
    /// The re-read after a refused acquire: contention, or lock-delay?
    Recheck(Pending),
    Pause {
        until: Instant,
        then: Then,
    },
}

/// What the waiter knows of the current holder's session, to time a retry to its lock-delay.
#[derive(Clone, Debug)]
struct Holder {
    session: SessionId,
    lock_delay: Option<Duration>,
    /// When to ask for the session's info; `None` once asked.
    info_at: Option<Instant>,
    info: Option<Pending>,
    /// When the key was first seen free after this holder.
    freed_at: Option<Instant>,
}

impl Acquiring {
    /// The key shows `session` holding it: a new holder is asked about once it has held for
    /// [`HOLDER_INFO_AFTER`].
    fn see_holder(&mut self, session: SessionId, now: Instant) {
        if self.holder.as_ref().is_some_and(|h| h.session == session) {
            return;
        }
        self.holder = Some(Holder {
            session,
            lock_delay: None,
            info_at: Some(now + HOLDER_INFO_AFTER),
            info: None,
            freed_at: None,
        });
    }
}

#[derive(Clone, Debug)]
struct Acquiring {
    step: Step,
    index: u64,
    give_up_at: Option<Instant>,
    backoff: Backoff,
    holder: Option<Holder>,
    failures: Failures,
}

#[derive(Clone, Debug)]
struct Held {
    token: FencingToken,
    watch: Watch,
}

#[derive(Clone, Debug)]
enum Releasing {
    Release(Release),
    /// The session is being stopped; then `Released`, or `ReleaseFailed` with this error.
    Session(Option<LockError>),
}

/// The KV release of a held key, tried again after failures that may pass: a release nobody
/// answered leaves the key held until the session ends, and a destroy then imposes the
/// lock-delay on everyone else.
#[derive(Clone, Debug)]
struct Release {
    session: SessionId,
    step: ReleaseStep,
    attempts: u32,
    /// No try starts after this: the session is stopped and the release reported unconfirmed.
    give_up_at: Instant,
    backoff: Backoff,
}

#[derive(Clone, Copy, Debug)]
enum ReleaseStep {
    Sent(Pending),
    Pause(Instant),
}

/// An acquire abandoned in flight by a cancel or a give-up. It may have been granted, so the key
/// is released before the session is let go: destroying a session that holds the key would make
/// every other contender wait out its lock-delay.
#[derive(Clone, Debug)]
enum Stray {
    /// Waiting for the abandoned acquire's answer.
    Acquire { pending: Pending, session: SessionId },
    /// Releasing what it may have been granted.
    Release(Pending),
}

impl Stray {
    fn pending(&self) -> Pending {
        match self {
            Stray::Acquire { pending, .. } | Stray::Release(pending) => *pending,
        }
    }
}

#[derive(Clone, Debug)]
enum Destroying {
    Read(Pending),
    Delete(Pending),
}

/// The machine's states; each holds exactly what it needs, so a held lock without a token or a
/// read without a request id can't be expressed.
#[derive(Clone, Debug)]
enum Phase {
    Idle,
    Acquiring(Acquiring),
    Held(Held),
    Releasing(Releasing),
    Destroying(Destroying),
}

/// A Consul lock as a pure state machine.
///
/// ```
/// use consul_lock_core::api::ClientConfig;
/// use consul_lock_core::machine::{Action, LockMachine, LockOptions};
/// use std::time::Instant;
///
/// let options = LockOptions::new("service/leader").unwrap();
/// let mut lock = LockMachine::new(ClientConfig::default(), options).unwrap();
/// let now = Instant::now();
/// lock.lock(now).unwrap();
/// // The first thing to do: create the session.
/// let Some(Action::Send(transmit)) = lock.poll_action() else { panic!() };
/// assert_eq!(transmit.request.uri().path(), "/v1/session/create");
/// // A driver sends it, then calls lock.handle_response(now, transmit.id, reply), sleeps until
/// // lock.poll_timeout() and calls lock.handle_timeout(now), draining poll_action() each time.
/// ```
#[derive(Debug)]
pub struct LockMachine {
    options: LockOptions,
    base: Base,
    phase: Phase,
    /// An acquire abandoned by a cancel or a give-up, settled before the session is let go.
    stray: Option<Stray>,
}

impl LockMachine {
    /// A machine for `options`, sending requests for the agent `config` describes. The options
    /// are validated here.
    pub fn new(config: crate::api::ClientConfig, options: LockOptions) -> Result<LockMachine, OptionsError> {
        options.validate()?;
        config.check()?;
        let base = Base::new(
            config,
            options.namespace.as_ref(),
            &options.session,
            options.request_timeout,
            options.seed,
        );
        Ok(LockMachine {
            base,
            options,
            phase: Phase::Idle,
            stray: None,
        })
    }

    // ----- queries -------------------------------------------------------------------------

    /// Where the lock stands.
    pub fn status(&self) -> LockStatus {
        match &self.phase {
            Phase::Idle => LockStatus::Idle,
            Phase::Acquiring(_) => LockStatus::Acquiring,
            Phase::Held(_) => LockStatus::Held,
            Phase::Releasing(_) => LockStatus::Releasing,
            Phase::Destroying(_) => LockStatus::Destroying,
        }
    }

    /// The fencing token, while held.
    pub fn token(&self) -> Option<&FencingToken> {
        match &self.phase {
            Phase::Held(h) => Some(&h.token),
            _ => None,
        }
    }

    /// The session machine the lock stands on.
    pub fn session(&self) -> &SessionMachine {
        &self.base.session
    }

    /// The options the machine was made with.
    pub fn options(&self) -> &LockOptions {
        &self.options
    }

    // ----- operations ----------------------------------------------------------------------

    /// Starts acquiring the lock. Usable again after a loss, an unlock, a give-up or a cancel.
    pub fn lock(&mut self, now: Instant) -> Result<(), LockError> {
        self.base.observe(now);
        match self.phase {
            Phase::Idle => {}
            Phase::Acquiring(_) | Phase::Held(_) => return Err(LockError::AlreadyHeld),
            Phase::Releasing(_) | Phase::Destroying(_) => return Err(LockError::Busy),
        }
        let give_up_at = self
            .options
            .lock_try_once
            .then(|| now + self.options.lock_wait_time);
        self.phase = Phase::Acquiring(Acquiring {
            step: Step::AwaitSession,
            index: 0,
            give_up_at,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
            holder: None,
            failures: Failures::default(),
        });
        let events = self.base.start_session(now);
        self.on_session_events(now, events);
        Ok(())
    }

    /// Releases a held lock (writing the value), then destroys the session if the machine made
    /// it. Ends with [`LockEvent::Released`].
    pub fn unlock(&mut self, now: Instant) -> Result<(), LockError> {
        self.base.observe(now);
        let Phase::Held(held) = &self.phase else {
            return Err(LockError::NotHeld);
        };
        let session = held.token.session.clone();
        let pending = self.send_release(now, session.clone());
        // Tried for as long as the session lives on its own, at least a request's time.
        let life = self.base.session.ttl().unwrap_or_default();
        self.phase = Phase::Releasing(Releasing::Release(Release {
            session,
            step: ReleaseStep::Sent(pending),
            attempts: 1,
            give_up_at: now + life.max(self.options.request_timeout),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        }));
        Ok(())
    }

    /// Stops whatever is under way, at once: an acquisition ends with [`LockEvent::Cancelled`]
    /// (its session is destroyed in the background), a held lock is unlocked, a destroy is
    /// abandoned. A no-op when idle or already releasing.
    pub fn cancel(&mut self, now: Instant) {
        self.base.observe(now);
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Idle => {}
            Phase::Acquiring(a) => {
                self.keep_stray(a.step);
                self.finish(now, LockEvent::Cancelled);
            }
            Phase::Held(held) => {
                self.phase = Phase::Held(held);
                // Held, so unlock can't fail.
                let _ = self.unlock(now);
            }
            phase @ Phase::Releasing(_) => self.phase = phase,
            Phase::Destroying(_) => self.base.out.event(LockEvent::Cancelled),
        }
    }

    /// Deletes the lock key, if no one holds it (Go's `Destroy`). Ends with
    /// [`LockEvent::Destroyed`] or [`LockEvent::Failed`] ([`LockError::InUse`],
    /// [`LockError::Conflict`]).
    pub fn destroy(&mut self, now: Instant) -> Result<(), LockError> {
        self.base.observe(now);
        match self.phase {
            Phase::Idle => {}
            Phase::Held(_) => return Err(LockError::AlreadyHeld),
            _ => return Err(LockError::Busy),
        }
        let pending = self.base.send(now, &KvGet::new(self.options.key.clone()), None);
        self.phase = Phase::Destroying(Destroying::Read(pending));
        Ok(())
    }

    // ----- driving ---------------------------------------------------------------------------

    // ----- plumbing --------------------------------------------------------------------------

    fn ignore(&self, id: RequestId) {
        tracing::trace!(%id, "ignoring a reply to a request no longer awaited");
    }

    fn acquiring(&mut self) -> Option<&mut Acquiring> {
        match &mut self.phase {
            Phase::Acquiring(a) => Some(a),
            _ => None,
        }
    }

    /// The acquisition and the machine's rng at once, for the steps that draw a backoff.
    fn acquiring_with_rng(&mut self) -> Option<(&mut Acquiring, &mut Rng)> {
        match &mut self.phase {
            Phase::Acquiring(a) => Some((a, &mut self.base.rng)),
            _ => None,
        }
    }

    fn held(&mut self) -> Option<&mut Held> {
        match &mut self.phase {
            Phase::Held(h) => Some(h),
            _ => None,
        }
    }

    /// Ends an acquisition or a hold: report `event`, go idle, and stop the session (once an
    /// abandoned acquire is settled, if one is out: see [`Stray`]).
    fn finish(&mut self, now: Instant, event: LockEvent) {
        self.phase = Phase::Idle;
        self.base.out.event(event);
        if self.stray.is_some() {
            return;
        }
        let events = self.base.stop_session(now);
        self.on_session_events(now, events);
    }

    /// Sends the KV release of the lock key for `session`, writing the lock's value.
    fn send_release(&mut self, now: Instant, session: SessionId) -> Pending {
        let release = KvRelease {
            key: self.options.key.clone(),
            session,
            flags: LOCK_FLAG_VALUE,
            value: self.options.value.clone(),
        };
        self.base.send(now, &release, None)
    }

    /// An attempt ends with its acquire in flight: keep track of it (see [`Stray`]).
    fn keep_stray(&mut self, step: Step) {
        if let (Step::Acquire(pending), Some(session)) = (step, self.base.session.id()) {
            self.stray = Some(Stray::Acquire {
                pending,
                session: session.clone(),
            });
        }
    }

    fn on_stray(&mut self, now: Instant, stray: Stray, reply: &Reply) {
        match stray {
            Stray::Acquire { session, .. } => {
                // Refused, the key is not ours; granted or unanswered, it may be.
                let refused = matches!(
                    decode::<KvLockTxn>(reply),
                    Ok(LockTxnOutcome::Refused(_)) | Err(Failure::Fatal(_))
                );
                if !refused {
                    if matches!(self.phase, Phase::Acquiring(_) | Phase::Held(_)) {
                        // A new attempt on the same session is under way or holds the key: the
                        // grant is its own now (re-acquiring is harmless and keeps LockIndex).
                        // Releasing would pull the key from under it while it believes it holds it.
                        tracing::debug!("a key granted to an abandoned acquire is kept by the new attempt");
                        return;
                    }
                    tracing::debug!("releasing the key an abandoned acquire may have been granted");
                    let pending = self.send_release(now, session);
                    self.stray = Some(Stray::Release(pending));
                    return;
                }
            }
            Stray::Release(_) => {
                if let Err(why) = decode::<KvRelease>(reply) {
                    // The session's destroy (or its expiry) frees the key anyway.
                    tracing::warn!(?why, "could not release the key of an abandoned acquire");
                }
            }
        }
        if matches!(self.phase, Phase::Idle) {
            // The ending that kept the session for this is now complete.
            let events = self.base.stop_session(now);
            self.on_session_events(now, events);
        }
    }

    fn is_ours(&self, pair: &KvPair) -> bool {
        pair.session
            .as_ref()
            .is_some_and(|s| Some(s) == self.base.session.id())
    }

    fn give_up(&mut self, now: Instant) {
        if let Some(a) = self.acquiring() {
            let step = a.step.clone();
            self.keep_stray(step);
        }
        tracing::debug!("try-once: no lock within the wait time");
        self.finish(now, LockEvent::GaveUp);
    }

    fn fail(&mut self, now: Instant, error: LockError) {
        tracing::warn!(%error, "lock attempt failed");
        self.finish(now, LockEvent::Failed(error));
    }

    fn lose(&mut self, now: Instant, reason: LossReason) {
        tracing::warn!(?reason, "lock lost");
        self.finish(now, LockEvent::Lost(reason));
    }

    // ----- session -------------------------------------------------------------------------

    fn on_session(&mut self, now: Instant, events: Vec<SessionEvent>) {
        for event in events {
            match (event, &self.phase) {
                (SessionEvent::Ready(_), Phase::Acquiring(a)) if matches!(a.step, Step::AwaitSession) => {
                    // A new session (the old one was lost or forgotten): look at the key afresh
                    // rather than block on an index the last attempt saw.
                    if let Some(a) = self.acquiring() {
                        a.index = 0;
                        a.failures.progressed();
                    }
                    self.read(now);
                }
                (SessionEvent::CreateRetry { cause, next_try }, Phase::Acquiring(_)) => {
                    self.record_failure(now, &cause, next_try);
                }
                (SessionEvent::CreateFailed(e), Phase::Acquiring(_)) => self.fail(now, LockError::session(e)),
                (SessionEvent::Lost(loss), Phase::Held(_)) => {
                    let reason = match loss {
                        SessionLoss::Invalidated => LossReason::SessionInvalidated,
                        SessionLoss::RenewDeadline { since_ack } => LossReason::RenewDeadline { since_ack },
                    };
                    self.lose(now, reason);
                }
                (SessionEvent::Lost(_), Phase::Acquiring(_)) => {
                    // Not holding anything yet: a fresh session will do.
                    if let Some(a) = self.acquiring() {
                        a.step = Step::AwaitSession;
                    }
                    let events = self.base.start_session(now);
                    self.on_session_events(now, events);
                }
                (SessionEvent::Stopped, Phase::Releasing(Releasing::Session(failed))) => {
                    let event = match failed {
                        None => LockEvent::Released,
                        Some(e) => LockEvent::ReleaseFailed(e.clone()),
                    };
                    self.phase = Phase::Idle;
                    self.base.out.event(event);
                }
                _ => {}
            }
        }
    }

    // ----- acquiring -----------------------------------------------------------------------

    /// The next read of the key: blocking on the last index, or a plain read on index 0.
    fn read(&mut self, now: Instant) {
        let key = self.options.key.clone();
        let lock_wait = self.options.lock_wait_time;
        let Some(a) = self.acquiring() else { return };
        if a.give_up_at.is_some_and(|at| now >= at) {
            self.give_up(now);
            return;
        }
        // With try-once, no read may outlast the give-up time.
        let wait = a
            .give_up_at
            .map_or(lock_wait, |at| at.saturating_duration_since(now).min(lock_wait))
            .max(Duration::from_millis(1));
        let blocking = Blocking { index: a.index, wait };
        let get = KvGet {
            key,
            consistency: Consistency::Default,
            blocking: Some(blocking),
        };
        let wait = (blocking.index > 0).then_some(wait);
        let pending = self.base.send(now, &get, wait);
        if let Some(a) = self.acquiring() {
            a.step = Step::Read(pending);
        }
    }

    fn acquire(&mut self, now: Instant) {
        let Some(session) = self.base.session.id().cloned() else {
            if let Some(a) = self.acquiring() {
                a.step = Step::AwaitSession;
            }
            return;
        };
        let acquire = KvLockTxn {
            key: self.options.key.clone(),
            session,
            flags: LOCK_FLAG_VALUE,
            value: self.options.value.clone(),
        };
        let pending = self.base.send(now, &acquire, None);
        if let Some(a) = self.acquiring() {
            a.step = Step::Acquire(pending);
        }
    }

    fn recheck(&mut self, now: Instant) {
        let pending = self.base.send(now, &KvGet::new(self.options.key.clone()), None);
        if let Some(a) = self.acquiring() {
            a.step = Step::Recheck(pending);
        }
    }

    /// Pauses with backoff after a transient failure, then does `then`; reported, or the end
    /// of the attempt once failures have lasted the error budget.
    fn retry(&mut self, now: Instant, then: Then, why: &str) {
        let Some((a, rng)) = self.acquiring_with_rng() else {
            return;
        };
        let until = now + a.backoff.next(rng);
        if then == Then::Read {
            a.index = 0;
        }
        a.step = Step::Pause { until, then };
        self.record_failure(now, why, until);
    }

    /// Records a failed try whose next is at `next_try` (see [`Failures`]).
    fn record_failure(&mut self, now: Instant, why: &str, next_try: Instant) {
        let budget = self.options.acquire_error_budget;
        let Phase::Acquiring(a) = &mut self.phase else {
            return;
        };
        if let Err(e) = a.failures.failed(now, why, next_try, budget, &mut self.base.out) {
            self.fail(now, e);
        }
    }

    fn on_read(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let read = match decode::<KvGet>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Then::Read, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let pair = read.value;
        if let Some(pair) = &pair {
            if pair.flags != LOCK_FLAG_VALUE {
                return self.fail(now, LockError::Conflict { flags: pair.flags });
            }
        }
        let ours = pair.as_ref().is_some_and(|p| self.is_ours(p));
        let other = pair.and_then(|p| p.session).filter(|_| !ours);
        let lock_wait = self.options.lock_wait_time;
        let key_session_info = other.clone();
        let Some(a) = self.acquiring() else { return };
        let (index, moved) = read::next_index(a.index, read.meta.index);
        let quick = now.saturating_duration_since(sent.sent_at) < lock_wait / 2;
        // A read on index 0 answers at once by design; only a blocking one says anything about
        // the agent's pace.
        let blocked = a.index > 0;
        // No progress, at once: index 0 included (a reply without X-Consul-Index).
        let spinning = !moved && quick;
        a.index = index;
        if !spinning {
            a.failures.progressed();
        }
        match other {
            None => {
                // Free (or already ours: re-acquiring is harmless and does not bump LockIndex).
                if let Some(h) = &mut a.holder {
                    h.freed_at.get_or_insert(now);
                    // Its session is released or gone: its info can't tell us anything now.
                    h.info_at = None;
                }
                if blocked && spinning {
                    // A blocking read back at once on an index that showed the key held: don't
                    // let an agent that says so make us spin through acquire and recheck.
                    return self.retry(
                        now,
                        Then::Read,
                        "a blocking read returned at once without progress",
                    );
                }
                self.acquire(now);
            }
            Some(holder) => {
                a.see_holder(holder, now);
                drop(key_session_info);
                if spinning {
                    // The agent answered at once without progress: don't let it make us spin.
                    self.retry(
                        now,
                        Then::Read,
                        "a blocking read returned at once without progress",
                    );
                } else {
                    if let Some(a) = self.acquiring().filter(|_| blocked) {
                        a.backoff.reset();
                    }
                    self.read(now);
                }
            }
        }
    }

    fn on_acquire(&mut self, now: Instant, reply: &Reply) {
        let outcome = decode::<KvLockTxn>(reply);
        if let (Ok(_), Some(a)) = (&outcome, self.acquiring()) {
            a.failures.progressed();
        }
        match outcome {
            Ok(LockTxnOutcome::Locked(pair)) => self.on_granted(now, pair),
            // Someone else holds it: read the key to find out whom to wait for.
            Ok(LockTxnOutcome::Refused(LockRefusal::Held)) => self.recheck(now),
            Ok(LockTxnOutcome::Refused(LockRefusal::PermissionDenied)) => self.fail(
                now,
                LockError::PermissionDenied(ApiError::Status {
                    status: 409,
                    body: "Permission denied (the lock transaction needs key write)".to_owned(),
                }),
            ),
            // A refusal this machine does not know can't be waited out knowingly: retrying it
            // would be a loop the caller never sees, so it ends the attempt, in Consul's words.
            Ok(LockTxnOutcome::Refused(LockRefusal::Other(what))) => self.fail(
                now,
                LockError::Refused(ApiError::Status {
                    status: 409,
                    body: what,
                }),
            ),
            // Consul says so outright: no read needed to tell it from contention.
            Ok(LockTxnOutcome::Refused(LockRefusal::LockDelay)) => self.wait_out_lock_delay(now),
            Ok(LockTxnOutcome::Refused(LockRefusal::InvalidSession)) => self.session_gone(
                now,
                ApiError::Status {
                    status: 409,
                    body: "invalid session".to_owned(),
                },
            ),
            Err(Failure::Fatal(e)) if e.is_invalid_session() => self.session_gone(now, e),
            Err(Failure::Fatal(e)) => self.fail(now, LockError::refused(e)),
            Err(Failure::Transient(why)) => self.retry(now, Then::Read, &why),
        }
    }

    /// Consul no longer knows our session (it expired between renewals, or was destroyed): start
    /// a new one, or fail if the session is the caller's.
    fn session_gone(&mut self, now: Instant, e: ApiError) {
        tracing::warn!("acquire: the session is gone; creating a new one");
        if let Some(a) = self.acquiring() {
            a.step = Step::AwaitSession;
        }
        let events = self.base.forget_session(now);
        if events.is_empty() && matches!(self.options.session, SessionChoice::Existing(_)) {
            return self.fail(now, LockError::Refused(e));
        }
        self.on_session_events(now, events);
    }

    fn on_recheck(&mut self, now: Instant, reply: &Reply) {
        let read = match decode::<KvGet>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Then::Read, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        if let Some(pair) = &read.value {
            if pair.flags != LOCK_FLAG_VALUE {
                return self.fail(now, LockError::Conflict { flags: pair.flags });
            }
        }
        let ours = read.value.as_ref().is_some_and(|p| self.is_ours(p));
        let held_by_other = read.value.as_ref().is_some_and(|p| p.session.is_some()) && !ours;
        let Some((a, rng)) = self.acquiring_with_rng() else {
            return;
        };
        if held_by_other {
            // Contention: someone else got it; wait on it.
            if let Some(holder) = read.value.and_then(|p| p.session) {
                a.see_holder(holder, now);
            }
            a.index = read.meta.index;
            return self.read(now);
        }
        a.failures.progressed();
        if ours {
            // Refused, yet ours: the agent contradicts itself. Try again, but not at once.
            let until = now + a.backoff.next(rng);
            let until = a.give_up_at.map_or(until, |at| until.min(at));
            a.step = Step::Pause {
                until,
                then: Then::Acquire,
            };
            return self.record_failure(
                now,
                "the agent refused the lock yet shows our session holding it",
                until,
            );
        }
        if read.meta.index != a.index {
            // Free, but the key moved since the read the acquire went on: another contender took
            // it and let go in between (a short hold), so the refusal was a race lost, not a
            // lock-delay. Go again at once; waiting out the last holder's lock-delay here stalled
            // the waiters of a busy key for 15 s (the contention benchmark). The index moved, so
            // this is progress, not a spin.
            a.index = read.meta.index;
            return self.acquire(now);
        }
        // Free, unchanged, yet refused: the last holder's lock-delay is in force.
        self.wait_out_lock_delay(now);
    }

    /// The key refuses us for its last holder's lock-delay: retry when it ends, if we know it;
    /// otherwise back off.
    fn wait_out_lock_delay(&mut self, now: Instant) {
        let Some((a, rng)) = self.acquiring_with_rng() else {
            return;
        };
        let until = match a
            .holder
            .as_mut()
            .and_then(|h| Some((h.lock_delay.take()?, h.freed_at?)))
        {
            // Consul caps lock-delay at 60 s, whatever the session info says (fuzz finding F2).
            Some((delay, freed_at)) => {
                (freed_at + delay.min(crate::machine::options::MAX_LOCK_DELAY) + LOCK_DELAY_MARGIN).max(now)
            }
            None => now + a.backoff.next(rng),
        };
        tracing::debug!(wait = ?until.saturating_duration_since(now), "lock-delay in force");
        let until = match a.give_up_at {
            Some(at) => until.min(at),
            None => until,
        };
        a.step = Step::Pause {
            until,
            then: Then::Acquire,
        };
    }

    /// The lock transaction wrote the key for us and answered with the entry: held, and the
    /// entry is the fencing token (no read after the acquire, as a plain acquire would need).
    fn on_granted(&mut self, now: Instant, pair: KvPair) {
        match pair.session.clone() {
            Some(session)
                if self.is_ours(&pair)
                    && pair.flags == LOCK_FLAG_VALUE
                    && pair.key == self.options.key.as_str() =>
            {
                let token = FencingToken {
                    key: self.options.key.clone(),
                    session,
                    lock_index: pair.lock_index,
                    modify_index: pair.modify_index,
                };
                tracing::info!(key = %token.key, lock_index = token.lock_index, "lock acquired");
                self.base.out.event(LockEvent::Acquired(token.clone()));
                self.phase = Phase::Held(Held {
                    token,
                    // The monitor's first read blocks until the key changes from this write.
                    watch: Watch::new(pair.modify_index, now),
                });
                self.monitor(now);
            }
            // An agent that grants and shows someone else's entry: wait again, after a pause, so
            // that it can't make us spin.
            _ => self.retry(
                now,
                Then::Read,
                "the lock transaction answered with another entry",
            ),
        }
    }

    // ----- holding -------------------------------------------------------------------------

    fn monitor(&mut self, now: Instant) {
        let wait = self.options.monitor_wait;
        let key = self.options.key.clone();
        let Some(h) = self.held() else { return };
        let get = KvGet {
            key,
            consistency: Consistency::Consistent,
            blocking: Some(Blocking {
                index: h.watch.index,
                wait,
            }),
        };
        let wait = (h.watch.index > 0).then_some(wait);
        let pending = self.base.send(now, &get, wait);
        if let Some(h) = self.held() {
            h.watch.step = WatchStep::Read(pending);
        }
    }

    fn on_monitor(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let read = match Watch::trust(decode::<KvGet>(reply)) {
            Ok(read) => read,
            Err(failure) => return self.on_monitor_failure(now, failure),
        };
        let Some(pair) = read.value else {
            return self.lose(now, LossReason::KeyDeleted);
        };
        if pair.flags != LOCK_FLAG_VALUE {
            return self.lose(now, LossReason::Conflict { flags: pair.flags });
        }
        if !self.is_ours(&pair) {
            return match pair.session {
                Some(other) => self.lose(now, LossReason::TakenBy(other)),
                None => self.lose(now, LossReason::NotHeld),
            };
        }
        let wait = self.options.monitor_wait;
        let Phase::Held(h) = &mut self.phase else { return };
        if h.watch
            .still_held(now, sent, read.meta.index, wait, &mut self.base.rng)
        {
            self.monitor(now);
        }
    }

    fn on_monitor_failure(&mut self, now: Instant, failure: Failure) {
        let (retries, retry_time) = (self.options.monitor_retries, self.options.monitor_retry_time);
        let Some(h) = self.held() else { return };
        if let Err(reason) = h.watch.failed(now, failure, retries, retry_time) {
            self.lose(now, reason);
        }
    }

    // ----- releasing and destroying --------------------------------------------------------

    fn on_release(&mut self, now: Instant, reply: &Reply) {
        let why = match decode::<KvRelease>(reply) {
            // `false`: the session no longer held the key (lost meanwhile): nothing to release.
            Ok(_) => return self.released(now, None),
            Err(Failure::Fatal(e)) => return self.released(now, Some(LockError::refused(e))),
            Err(Failure::Transient(why)) => why,
        };
        let Phase::Releasing(Releasing::Release(r)) = &mut self.phase else {
            return;
        };
        if now >= r.give_up_at {
            let e = LockError::ReleaseUnconfirmed {
                attempts: r.attempts,
                last: why,
            };
            return self.released(now, Some(e));
        }
        let pause = r.backoff.next(&mut self.base.rng);
        tracing::warn!(%why, ?pause, attempt = r.attempts, "release failed; retrying");
        r.step = ReleaseStep::Pause((now + pause).min(r.give_up_at));
    }

    /// The release is over (confirmed, or `failed`): stop the session, then report.
    fn released(&mut self, now: Instant, failed: Option<LockError>) {
        if let Some(e) = &failed {
            tracing::warn!(error = %e, "the release was not confirmed; stopping the session");
        }
        self.phase = Phase::Releasing(Releasing::Session(failed));
        // If the session ended while the release was out (invalidated), `stop` reports it
        // stopped at once.
        let events = self.base.stop_session(now);
        self.on_session_events(now, events);
    }

    fn retry_release(&mut self, now: Instant) {
        let Phase::Releasing(Releasing::Release(r)) = &self.phase else {
            return;
        };
        let session = r.session.clone();
        let pending = self.send_release(now, session);
        if let Phase::Releasing(Releasing::Release(r)) = &mut self.phase {
            r.attempts = r.attempts.saturating_add(1);
            r.step = ReleaseStep::Sent(pending);
        }
    }

    fn on_destroy_read(&mut self, now: Instant, reply: &Reply) {
        let outcome = match decode::<KvGet>(reply) {
            Err(Failure::Transient(why)) => Err(LockError::Unavailable(why)),
            Err(Failure::Fatal(e)) => Err(LockError::Refused(e)),
            Ok(QueryReply { value: None, .. }) => Ok(None),
            Ok(QueryReply {
                value: Some(pair), ..
            }) if pair.flags != LOCK_FLAG_VALUE => Err(LockError::Conflict { flags: pair.flags }),
            Ok(QueryReply {
                value: Some(pair), ..
            }) if pair.session.is_some() => Err(LockError::InUse),
            Ok(QueryReply {
                value: Some(pair), ..
            }) => Ok(Some(pair.modify_index)),
        };
        match outcome {
            Ok(None) => self.end_destroy(LockEvent::Destroyed),
            Ok(Some(cas)) => {
                let delete = KvCasDelete {
                    key: self.options.key.clone(),
                    cas,
                };
                let pending = self.base.send(now, &delete, None);
                self.phase = Phase::Destroying(Destroying::Delete(pending));
            }
            Err(e) => self.end_destroy(LockEvent::Failed(e)),
        }
    }

    fn on_destroy_delete(&mut self, _now: Instant, reply: &Reply) {
        let event = match decode::<KvCasDelete>(reply) {
            Ok(true) => LockEvent::Destroyed,
            Ok(false) => LockEvent::Failed(LockError::InUse),
            Err(Failure::Transient(why)) => LockEvent::Failed(LockError::Unavailable(why)),
            Err(Failure::Fatal(e)) => LockEvent::Failed(LockError::Refused(e)),
        };
        self.end_destroy(event);
    }

    fn end_destroy(&mut self, event: LockEvent) {
        self.phase = Phase::Idle;
        self.base.out.event(event);
    }
}

holding_surface!(LockMachine);

impl Phases for LockMachine {
    fn base(&self) -> &Base {
        &self.base
    }

    fn base_mut(&mut self) -> &mut Base {
        &mut self.base
    }

    fn phase_pendings(&self, all: &mut Pendings) {
        all.extend(self.stray.as_ref().map(Stray::pending));
        match &self.phase {
            Phase::Acquiring(a) => {
                if let Step::Read(p) | Step::Acquire(p) | Step::Recheck(p) = a.step {
                    all.push(p);
                }
                all.extend(a.holder.as_ref().and_then(|h| h.info));
            }
            Phase::Held(h) => all.extend(h.watch.pending()),
            Phase::Releasing(Releasing::Release(Release {
                step: ReleaseStep::Sent(p),
                ..
            }))
            | Phase::Destroying(Destroying::Read(p) | Destroying::Delete(p)) => all.push(*p),
            _ => {}
        }
    }

    fn phase_timer(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Acquiring(a) => {
                let pause = match a.step {
                    Step::Pause { until, .. } => Some(until),
                    _ => None,
                };
                // While an acquire is in flight its reply decides (see `phase_timeout`): the
                // give-up time is no timer then, or a driver would spin.
                let give_up = a.give_up_at.filter(|_| !matches!(a.step, Step::Acquire(_)));
                let info = a.holder.as_ref().and_then(|h| h.info_at);
                [pause, give_up, info].into_iter().flatten().min()
            }
            Phase::Held(h) => h.watch.timer(),
            Phase::Releasing(Releasing::Release(Release {
                step: ReleaseStep::Pause(until),
                ..
            })) => Some(*until),
            _ => None,
        }
    }

    fn phase_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Acquiring(a) => {
                if a.give_up_at.is_some_and(|at| now >= at) && !matches!(a.step, Step::Acquire(_)) {
                    // An acquire in flight may yet give us the lock: its reply checks the
                    // deadline instead.
                    self.give_up(now);
                    return;
                }
                if let Some(session) = a
                    .holder
                    .as_ref()
                    .filter(|h| h.info_at.is_some_and(|at| now >= at))
                    .map(|h| h.session.clone())
                {
                    let info = self.base.send(now, &SessionInfo::new(session), None);
                    if let Some(h) = self.acquiring().and_then(|a| a.holder.as_mut()) {
                        h.info_at = None;
                        h.info = Some(info);
                    }
                }
                let Phase::Acquiring(a) = &self.phase else { return };
                if let Step::Pause { until, then } = a.step {
                    if now >= until {
                        match then {
                            Then::Read => self.read(now),
                            Then::Acquire => self.acquire(now),
                        }
                    }
                }
            }
            Phase::Held(h) if h.watch.due(now) => self.monitor(now),
            Phase::Releasing(Releasing::Release(Release {
                step: ReleaseStep::Pause(until),
                ..
            })) if now >= *until => self.retry_release(now),
            _ => {}
        }
    }

    fn phase_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        if let Some(stray) = self.stray.take_if(|s| s.pending().is(id)) {
            self.on_stray(now, stray, &reply);
            return;
        }
        if let Phase::Acquiring(a) = &mut self.phase {
            if let Some(holder) = a.holder.as_mut().filter(|h| h.info.is_some_and(|p| p.is(id))) {
                holder.info = None;
                if let Ok(QueryReply {
                    value: Some(entry), ..
                }) = decode::<SessionInfo>(&reply)
                {
                    tracing::debug!(holder = %holder.session, lock_delay = ?entry.lock_delay, "holder's lock-delay");
                    holder.lock_delay = Some(entry.lock_delay);
                }
                return;
            }
        }
        match &self.phase {
            Phase::Acquiring(a) => match a.step {
                Step::Read(p) if p.is(id) => self.on_read(now, p, &reply),
                Step::Acquire(p) if p.is(id) => self.on_acquire(now, &reply),
                Step::Recheck(p) if p.is(id) => self.on_recheck(now, &reply),
                _ => self.ignore(id),
            },
            Phase::Held(h) => match h.watch.step {
                WatchStep::Read(p) if p.is(id) => self.on_monitor(now, p, &reply),
                WatchStep::Read(_) | WatchStep::Pause(_) => self.ignore(id),
            },
            Phase::Releasing(Releasing::Release(Release {
                step: ReleaseStep::Sent(p),
                ..
            })) if p.is(id) => self.on_release(now, &reply),
            Phase::Destroying(Destroying::Read(p)) if p.is(id) => self.on_destroy_read(now, &reply),
            Phase::Destroying(Destroying::Delete(p)) if p.is(id) => self.on_destroy_delete(now, &reply),
            _ => self.ignore(id),
        }
    }

    fn on_session_events(&mut self, now: Instant, events: Vec<SessionEvent>) {
        self.on_session(now, events);
    }

    fn phase_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle) && self.stray.is_none()
    }
}
