//! Runs a [`LockMachine`] against a real agent on plain threads: each request on a thread of its
//! own, replies back through a channel. The smallest honest driver, for tests and examples; the
//! real drivers live in their own crates.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use consul_lock_core::machine::{
    Action, LockEvent, LockMachine, Reply, RequestId, TransportError, TransportErrorKind,
};

use crate::TestTransport;

/// Drives one machine, recording the events it emits.
#[derive(Debug)]
pub struct ThreadDriver {
    transport: TestTransport,
    replies_tx: mpsc::Sender<(RequestId, Reply)>,
    replies_rx: mpsc::Receiver<(RequestId, Reply)>,
    /// Every event the machine emitted, with when.
    pub events: Vec<(Instant, LockEvent)>,
}

impl ThreadDriver {
    /// A driver sending through `transport`.
    pub fn new(transport: TestTransport) -> ThreadDriver {
        let (replies_tx, replies_rx) = mpsc::channel();
        ThreadDriver {
            transport,
            replies_tx,
            replies_rx,
            events: Vec::new(),
        }
    }

    /// Sends what the machine asks for and records its events; returns the events of this call.
    fn drain(&mut self, machine: &mut LockMachine) -> Vec<LockEvent> {
        let mut fresh = Vec::new();
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Event(event) => {
                    tracing::debug!(?event, "event");
                    self.events.push((Instant::now(), event.clone()));
                    fresh.push(event);
                }
                Action::Send(transmit) => {
                    let transport = self.transport.clone();
                    let tx = self.replies_tx.clone();
                    std::thread::spawn(move || {
                        let budget = transmit.deadline.saturating_duration_since(Instant::now());
                        let reply = transport.exchange_with_timeout(transmit.request, budget);
                        // The driver may be gone; then nobody wants the reply.
                        let _ = tx.send((transmit.id, reply));
                    });
                }
            }
        }
        fresh
    }

    /// Drives `machine` until an event satisfies `stop` (returning it) or `limit` passes
    /// (returning `None`).
    pub fn run_until(
        &mut self,
        machine: &mut LockMachine,
        limit: Duration,
        mut stop: impl FnMut(&LockEvent) -> bool,
    ) -> Option<LockEvent> {
        let give_up = Instant::now() + limit;
        loop {
            if let Some(event) = self.drain(machine).into_iter().find(|e| stop(e)) {
                return Some(event);
            }
            let now = Instant::now();
            if now >= give_up {
                return None;
            }
            let until = machine.poll_timeout().map_or(give_up, |t| t.min(give_up));
            match self.replies_rx.recv_timeout(until.saturating_duration_since(now)) {
                Ok((id, reply)) => machine.handle_response(Instant::now(), id, reply),
                Err(mpsc::RecvTimeoutError::Timeout) => machine.handle_timeout(Instant::now()),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Drives `machine` until it has nothing left to do (or `limit` passes); true if it settled.
    pub fn settle(&mut self, machine: &mut LockMachine, limit: Duration) -> bool {
        let give_up = Instant::now() + limit;
        loop {
            self.drain(machine);
            if machine.is_quiescent() {
                return true;
            }
            let now = Instant::now();
            if now >= give_up {
                return false;
            }
            let until = machine.poll_timeout().map_or(give_up, |t| t.min(give_up));
            match self.replies_rx.recv_timeout(until.saturating_duration_since(now)) {
                Ok((id, reply)) => machine.handle_response(Instant::now(), id, reply),
                Err(mpsc::RecvTimeoutError::Timeout) => machine.handle_timeout(Instant::now()),
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }
}

impl TestTransport {
    /// [`exchange`](TestTransport::exchange) with a per-request timeout.
    pub fn exchange_with_timeout(&self, request: http::Request<Vec<u8>>, timeout: Duration) -> Reply {
        if timeout.is_zero() {
            return Err(TransportError::new(
                TransportErrorKind::Timeout,
                "deadline already passed",
            ));
        }
        self.exchange_timeout(request, Some(timeout))
    }
}
