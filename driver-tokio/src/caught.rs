//! A machine whose every call is caught: a panic in it (a bug) must not kill the lock's task
//! silently, leaving every handle to report a shut-down runtime and the session alive on the agent
//! until its TTL. The task sees [`Caught::panicked`], tells every waiter why, destroys the
//! session the machine last had, and ends.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use consul_lock_core::api::SessionId;
use consul_lock_core::machine::{
    Action, FencingToken, HoldMachine, LockEvent, LockStatus, Misuse, Reply, RequestId,
};

/// `M`, inert after its first panic.
pub(crate) struct Caught<M> {
    machine: M,
    /// The panic's message, once one happened: the machine is never called again.
    panicked: Option<String>,
    /// The session the machine had after its last call that returned.
    session: Option<SessionId>,
}

impl<M: HoldMachine> Caught<M> {
    pub(crate) fn new(machine: M) -> Caught<M> {
        Caught {
            machine,
            panicked: None,
            session: None,
        }
    }

    /// Why the machine panicked, if it did.
    pub(crate) fn panicked(&self) -> Option<&str> {
        self.panicked.as_deref()
    }

    /// The session to destroy once the machine can't be driven any more.
    pub(crate) fn orphaned_session(&mut self) -> Option<SessionId> {
        self.session.take()
    }

    /// Runs `f` on the machine unless it panicked before; a panic now is recorded.
    fn call<T>(&mut self, otherwise: T, f: impl FnOnce(&mut M) -> T) -> T {
        if self.panicked.is_some() {
            return otherwise;
        }
        // The machine is never touched again after a panic, so a state it left half-changed
        // can't be observed: asserting unwind safety is sound.
        match catch_unwind(AssertUnwindSafe(|| f(&mut self.machine))) {
            Ok(value) => {
                if self.session.as_ref() != self.machine.session_id() {
                    self.session = self.machine.session_id().cloned();
                }
                value
            }
            Err(payload) => {
                let why = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                tracing::error!(%why, "the lock's machine panicked; ending the lock");
                self.panicked = Some(why);
                otherwise
            }
        }
    }

    fn look<T>(&self, otherwise: T, f: impl FnOnce(&M) -> T) -> T {
        if self.panicked.is_some() {
            return otherwise;
        }
        // Queries don't change the machine; a panic in one is a panic all the same.
        catch_unwind(AssertUnwindSafe(|| f(&self.machine))).unwrap_or(otherwise)
    }
}

impl<M: HoldMachine> HoldMachine for Caught<M> {
    fn lock(&mut self, now: Instant) -> Result<(), Misuse> {
        self.call(Err(Misuse::Busy), |m| m.lock(now))
    }
    fn unlock(&mut self, now: Instant) -> Result<(), Misuse> {
        self.call(Err(Misuse::NotHeld), |m| m.unlock(now))
    }
    fn cancel(&mut self, now: Instant) {
        self.call((), |m| m.cancel(now));
    }
    fn destroy(&mut self, now: Instant) -> Result<(), Misuse> {
        self.call(Err(Misuse::Busy), |m| m.destroy(now))
    }
    fn proclaim(&mut self, now: Instant, value: Vec<u8>) -> Result<(), Misuse> {
        self.call(Err(Misuse::NotHeld), |m| m.proclaim(now, value))
    }
    fn status(&self) -> LockStatus {
        self.look(LockStatus::Idle, HoldMachine::status)
    }
    fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        self.call((), |m| m.handle_response(now, id, reply));
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.call((), |m| m.handle_timeout(now));
    }
    fn poll_action(&mut self) -> Option<Action<LockEvent>> {
        self.call(None, HoldMachine::poll_action)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.look(None, HoldMachine::poll_timeout)
    }
    fn is_quiescent(&self) -> bool {
        self.look(true, HoldMachine::is_quiescent)
    }
    fn session_id(&self) -> Option<&SessionId> {
        self.session.as_ref()
    }
    fn token(&self) -> Option<&FencingToken> {
        if self.panicked.is_some() {
            return None;
        }
        catch_unwind(AssertUnwindSafe(|| self.machine.token())).unwrap_or(None)
    }
    fn in_flight(&self) -> usize {
        self.look(0, HoldMachine::in_flight)
    }
}
