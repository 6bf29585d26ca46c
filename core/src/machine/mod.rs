//! The sans-IO state machines: [`SessionMachine`] keeps a Consul session alive, [`LockMachine`]
//! takes, holds and gives up one lock key on such a session (and, leading, proclaims new
//! values), [`KeySetMachine`] holds many lock keys on one session, [`ObserverMachine`] follows
//! who holds a lock key.
//!
//! Every machine has the same surface, after quinn-proto and str0m: operations and replies go in
//! with the current time (`handle_response(now, id, reply)`, `handle_timeout(now)`), and what the
//! machine wants done comes out of `poll_action()` (send this request before that deadline, or an
//! event for the user) and `poll_timeout()` (when to call `handle_timeout` next). The machines
//! never read a clock, never do IO and never block; the same inputs give the same outputs.

mod backoff;
mod classify;
mod event;
mod hold;
mod holder;
mod keyset;
mod lock;
mod observe;
mod options;
mod outbox;
mod queue;
mod read;
mod semaphore;
mod session;

pub use event::{FencingToken, LockError, LockEvent, LockStatus, LossReason, Misuse, Retry};
pub use holder::Holder;
pub use keyset::{KeySetError, KeySetEvent, KeySetMachine, KeySetOptions, KeyStatus, Refusal};
pub use lock::LockMachine;
pub use observe::{Leader, Observation, ObserveEvent, ObserveOptions, ObserverMachine};
pub use options::{
    AfterInvalidation, DEFAULT_LOCK_DELAY, HoldOptions, LockOptions, MIN_HOLD_WINDOW, OptionsError,
    SemaphoreOptions, SessionChoice, SessionOptions, Waiting,
};
pub use outbox::{Action, Reply, RequestId, Transmit, TransportError, TransportErrorKind};
pub use read::QUICK_ANSWER;
pub use semaphore::{SemaphoreMachine, SemaphoreState};
pub use session::{SessionEvent, SessionMachine, SessionStatus};

/// The `Flags` value that marks a key as a lock, shared with Go's `api.Lock` so that Go and Rust
/// lockers recognise each other's keys.
pub const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;

/// The `Flags` value that marks a key as part of a semaphore (Go's `api.Semaphore`).
pub const SEMAPHORE_FLAG_VALUE: u64 = 0xe0f6_9a2b_aa41_4de0;

/// The `Flags` value that marks a queued lock's entry (`<key>/.queue/<session>`, see
/// [`Waiting::Queue`]): keys under the queue with other flags are not waiters.
pub const QUEUE_FLAG_VALUE: u64 = 0x7175_6575_645f_6c6b;

/// The surface shared by the machines that take and hold something on a session (a lock, a
/// semaphore slot), so that one driver loop can run any of them.
///
/// Every method is the inherent method of the same name; see [`LockMachine`] for the contract.
pub trait HoldMachine: Send + 'static {
    /// Starts acquiring.
    fn lock(&mut self, now: std::time::Instant) -> Result<(), Misuse>;
    /// Gives up what is held.
    fn unlock(&mut self, now: std::time::Instant) -> Result<(), Misuse>;
    /// Stops whatever is under way, at once.
    fn cancel(&mut self, now: std::time::Instant);
    /// Deletes the key(s), if nobody holds them.
    fn destroy(&mut self, now: std::time::Instant) -> Result<(), Misuse>;
    /// Leading, writes a new value to the key (a lock's; see [`LockMachine::proclaim`](Holder::proclaim)).
    fn proclaim(&mut self, _now: std::time::Instant, _value: Vec<u8>) -> Result<(), Misuse> {
        Err(Misuse::NotALock)
    }
    /// Where the machine stands.
    fn status(&self) -> LockStatus;
    /// Handles the reply to request `id`.
    fn handle_response(&mut self, now: std::time::Instant, id: RequestId, reply: Reply);
    /// Handles the passage of time.
    fn handle_timeout(&mut self, now: std::time::Instant);
    /// The next thing to do, if any.
    fn poll_action(&mut self) -> Option<Action<LockEvent>>;
    /// When `handle_timeout` is due next.
    fn poll_timeout(&self) -> Option<std::time::Instant>;
    /// Whether the machine has nothing left to do.
    fn is_quiescent(&self) -> bool;
    /// The session in use, if any: what a driver must destroy if it can no longer drive the
    /// machine.
    fn session_id(&self) -> Option<&crate::api::SessionId>;
    /// The fencing token, while held.
    fn token(&self) -> Option<&FencingToken>;
    /// The number of requests the machine is waiting on.
    fn in_flight(&self) -> usize;
}
