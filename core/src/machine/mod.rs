//! The sans-IO state machines: [`SessionMachine`] keeps a Consul session alive, [`LockMachine`]
//! takes, holds and gives up one lock key on such a session.
//!
//! Every machine has the same surface, after quinn-proto and str0m: operations and replies go in
//! with the current time (`handle_response(now, id, reply)`, `handle_timeout(now)`), and what the
//! machine wants done comes out of `poll_action()` (send this request before that deadline, or an
//! event for the user) and `poll_timeout()` (when to call `handle_timeout` next). The machines
//! never read a clock, never do IO and never block; the same inputs give the same outputs.

mod backoff;
mod classify;
mod lock;
mod options;
mod outbox;
mod session;

pub use lock::{FencingToken, LockError, LockEvent, LockMachine, LockStatus, LossReason};
pub use options::{LockOptions, OptionsError, SessionChoice, SessionOptions};
pub use outbox::{Action, Reply, RequestId, Transmit, TransportError, TransportErrorKind};
pub use session::{SessionEvent, SessionMachine, SessionStatus};

/// The `Flags` value that marks a key as a lock, shared with Go's `api.Lock` so that Go and Rust
/// lockers recognise each other's keys.
pub const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;

/// The `Flags` value that marks a key as part of a semaphore (Go's `api.Semaphore`).
pub const SEMAPHORE_FLAG_VALUE: u64 = 0xe0f6_9a2b_aa41_4de0;
