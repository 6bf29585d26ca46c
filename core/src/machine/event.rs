//! What a holder reports and how: the fencing token, the events, why a hold ended, the errors.

use std::time::{Duration, Instant};

use crate::api::{ApiError, Key, SessionId};

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

/// A call the machine can't take in the state it is in: misuse of the API, returned by the call
/// itself and never reported as an event (an outcome is a [`LockError`] in an event).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Misuse {
    /// `lock` (or `destroy`) while holding, or `lock` while acquiring: one hold at a time.
    #[error("already held, or being acquired: one hold at a time per handle")]
    AlreadyHeld,
    /// `unlock` without holding.
    #[error("not held: there is nothing to release")]
    NotHeld,
    /// `lock` or `destroy` while a release or a destroy is under way; `proclaim` while a
    /// proclaim is in flight.
    #[error("another operation is under way: wait for its event, or cancel it")]
    Busy,
    /// `proclaim` on a semaphore: only a lock's key carries a leader's value.
    #[error("only a lock can proclaim: a semaphore slot carries no leader's value")]
    NotALock,
}

/// Why an attempt (acquire, release, destroy) ended without what it was for: the reason
/// carried by [`LockEvent::Failed`] and [`LockEvent::ReleaseFailed`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// The key exists with other flags: a plain key or a semaphore's.
    #[error("Existing key does not match lock use (flags {flags:#x}); pick another key")]
    Conflict {
        /// The flags found.
        flags: u64,
    },
    /// `destroy` found the key held.
    #[error("Lock in use")]
    InUse,
    /// A semaphore's `.lock` exists with other flags (a lock's key, or a plain key): Go's
    /// `ErrSemaphoreConflict`.
    #[error("Existing key does not match semaphore use (flags {flags:#x}); pick another prefix")]
    SemaphoreConflict {
        /// The flags found.
        flags: u64,
    },
    /// `destroy` found a semaphore still used (a live holder, or a contender waiting): Go's
    /// `ErrSemaphoreInUse`.
    #[error("Semaphore in use")]
    SemaphoreInUse,
    /// The session could not be created.
    #[error("could not create the lock's session: {0}")]
    Session(ApiError),
    /// Consul refused a request in a way retrying won't fix (a bad request, a refusal the
    /// machine does not know).
    #[error("Consul refused the request: {0}")]
    Refused(ApiError),
    /// The TLS handshake with the agent failed in a way that retrying can't fix (the agent's
    /// certificate is not trusted or does not name the host, a client certificate is missing or
    /// refused, or the address does not speak TLS): [`ApiError::TlsRefused`].
    #[error("{0}")]
    Tls(ApiError),
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
    /// A proclaim found the key no longer held by this session (the hold is lost), or the hold
    /// ended before Consul answered it.
    #[error("not held: the key is no longer this session's, or the hold ended before the write was answered")]
    NotHeld,
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
        } else if matches!(e, ApiError::TlsRefused { .. }) {
            LockError::Tls(e)
        } else {
            LockError::Refused(e)
        }
    }

    /// The error for a session Consul would not create: a permission refusal, or another.
    pub(crate) fn session(e: ApiError) -> LockError {
        match LockError::refused(e) {
            LockError::Refused(e) => LockError::Session(e),
            other => other,
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
    /// A proclaim wrote its value: the key's new `ModifyIndex` (the fencing token is unchanged).
    Proclaimed {
        /// The key's `ModifyIndex` after the write.
        modify_index: u64,
    },
    /// A proclaim did not write its value, or may not have ([`LockError::Unavailable`]: asking
    /// again is harmless). The hold goes on unless a [`LockEvent::Lost`] follows.
    ProclaimFailed(LockError),
}

impl From<Retry> for LockEvent {
    fn from(retry: Retry) -> LockEvent {
        LockEvent::Retrying(retry)
    }
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
