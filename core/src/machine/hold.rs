//! What the holding machines (lock, semaphore) share: the [`Base`] every one of them stands on
//! (session, outbox, seeded randomness, a clock that never runs backwards), the [`Phases`] trait
//! whose provided methods drive any of them (timeouts, replies, the renew deadline on every
//! input), and the [`Watch`] that keeps a hold monitored.

use std::time::{Duration, Instant};

use crate::api::{ClientConfig, QueryReply};
use crate::machine::backoff::{Backoff, Rng};
use crate::machine::classify::Failure;
use crate::machine::outbox::{Outbox, Pending, Pendings};
use crate::machine::session::{SessionEvent, SessionMachine};
use crate::machine::{
    Action, LockError, LockEvent, LossReason, Reply, RequestId, Retry, SessionChoice, read,
};

/// The half of a holding machine that is not about its phases.
#[derive(Debug)]
pub(crate) struct Base {
    pub(crate) session: SessionMachine,
    pub(crate) out: Outbox<LockEvent>,
    pub(crate) rng: Rng,
    last_now: Option<Instant>,
    request_timeout: Duration,
}

impl Base {
    /// The base for a machine with these options: `namespace` overrides the config's.
    pub(crate) fn new(
        mut config: ClientConfig,
        namespace: Option<&String>,
        session: &SessionChoice,
        request_timeout: Duration,
        seed: u64,
    ) -> Base {
        if let Some(ns) = namespace {
            config.namespace = Some(ns.clone());
        }
        let source = match session {
            SessionChoice::Create(s) => Ok(s.to_request()),
            SessionChoice::Existing(id) => Err(id.clone()),
        };
        Base {
            session: SessionMachine::new(source, request_timeout),
            out: Outbox::new(config),
            rng: Rng::new(seed),
            last_now: None,
            request_timeout,
        }
    }

    /// Records `now`, never letting time run backwards inside the machine.
    pub(crate) fn observe(&mut self, now: Instant) -> Instant {
        read::observe(&mut self.last_now, now)
    }

    /// Sends `endpoint` with a deadline fit for it (see [`read::send`]).
    pub(crate) fn send(
        &mut self,
        now: Instant,
        endpoint: &impl crate::api::Endpoint,
        wait: Option<Duration>,
    ) -> Pending {
        read::send(&mut self.out, now, endpoint, wait, self.request_timeout)
    }

    /// Stops the session (destroying one the machine made).
    pub(crate) fn stop_session(&mut self, now: Instant) -> Vec<SessionEvent> {
        self.session.stop(now, &mut self.out)
    }

    /// Gets a session going.
    pub(crate) fn start_session(&mut self, now: Instant) -> Vec<SessionEvent> {
        self.session.start(now, &mut self.out, &mut self.rng)
    }

    /// Drops a session Consul no longer knows and starts a new one (not for a caller's session).
    pub(crate) fn forget_session(&mut self, now: Instant) -> Vec<SessionEvent> {
        self.session.forget(now, &mut self.out, &mut self.rng)
    }
}

/// The phases of a holding machine, and the driving every such machine shares.
///
/// A machine implements the required methods, which are about its own phases; the provided
/// methods are the whole of `handle_timeout`, `handle_response`, `poll_timeout` and
/// `is_quiescent`, so that the rules they carry (requests past their deadline time out, the renew
/// deadline is checked on every input, late replies are ignored) are written once.
pub(crate) trait Phases {
    fn base(&self) -> &Base;
    fn base_mut(&mut self) -> &mut Base;
    /// The phase's outstanding requests (not the session's).
    fn phase_pendings(&self, into: &mut Pendings);
    /// The phase's next timer.
    fn phase_timer(&self) -> Option<Instant>;
    /// Fires the phase's due timers.
    fn phase_timeout(&mut self, now: Instant);
    /// A reply to a request of the phase's (or one it no longer waits for).
    fn phase_response(&mut self, now: Instant, id: RequestId, reply: Reply);
    /// What the session machine reports.
    fn on_session_events(&mut self, now: Instant, events: Vec<SessionEvent>);
    /// Idle, with no cleanup of the phase's own outstanding.
    fn phase_idle(&self) -> bool;

    fn pendings(&self) -> Pendings {
        let mut all = Pendings::default();
        all.extend(self.base().session.pending());
        self.phase_pendings(&mut all);
        all
    }

    fn drive_poll_timeout(&self) -> Option<Instant> {
        let timers = [self.base().session.poll_timeout(), self.phase_timer()];
        let pendings = self.pendings();
        let deadlines = pendings.iter().map(|p| p.deadline);
        let earliest = timers.into_iter().flatten().chain(deadlines).min()?;
        Some(match self.base().last_now {
            Some(last) => earliest.max(last),
            None => earliest,
        })
    }

    fn drive_timeout(&mut self, now: Instant) {
        let now = self.base_mut().observe(now);
        for pending in self.pendings().iter() {
            if now >= pending.deadline {
                self.drive_response(now, pending.id, read::deadline_passed());
            }
        }
        let base = self.base_mut();
        let events = base.session.handle_timeout(now, &mut base.out, &mut base.rng);
        self.on_session_events(now, events);
        self.phase_timeout(now);
    }

    fn drive_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        let now = self.base_mut().observe(now);
        // The renew deadline holds whatever the input: a reply that comes after it (the driver
        // had not called `handle_timeout` yet) finds the loss declared first, and a renew reply
        // whose TTL puts the deadline behind us (fuzz finding F1) is caught right after.
        self.check_renew_deadline(now);
        let base = self.base_mut();
        match base
            .session
            .handle_response(now, id, &reply, &mut base.out, &mut base.rng)
        {
            Some(events) => self.on_session_events(now, events),
            None => self.phase_response(now, id, reply),
        }
        self.check_renew_deadline(now);
    }

    fn check_renew_deadline(&mut self, now: Instant) {
        let base = self.base_mut();
        let events = base.session.check_deadline(now, &mut base.out);
        self.on_session_events(now, events);
    }

    fn drive_quiescent(&self) -> bool {
        let base = self.base();
        self.phase_idle()
            && base.session.pending().is_none()
            && base.session.poll_timeout().is_none()
            && base.out.is_empty()
    }

    fn drive_poll_action(&mut self) -> Option<Action<LockEvent>> {
        self.base_mut().out.pop()
    }
}

/// An acquisition's failures in a row. Each is reported ([`LockEvent::Retrying`]), so that an
/// agent that is down, hangs or answers errors is never a silent wait; once they have gone on
/// for the error budget, the attempt ends ([`LockError::AgentUnavailable`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Failures {
    since: Option<Instant>,
    attempts: u32,
}

impl Failures {
    /// A usable answer came: the run of failures is over.
    pub(crate) fn progressed(&mut self) {
        *self = Failures::default();
    }

    /// Records a failure whose next try is at `next_try`: reported, or the error that ends the
    /// attempt when the failures have lasted `budget`.
    pub(crate) fn failed(
        &mut self,
        now: Instant,
        cause: &str,
        next_try: Instant,
        budget: Option<Duration>,
        out: &mut Outbox<LockEvent>,
    ) -> Result<(), LockError> {
        let since = *self.since.get_or_insert(now);
        self.attempts = self.attempts.saturating_add(1);
        let failing_for = now.saturating_duration_since(since);
        if budget.is_some_and(|budget| failing_for >= budget) {
            return Err(LockError::AgentUnavailable {
                attempts: self.attempts,
                failing_for,
                last: cause.to_owned(),
            });
        }
        tracing::warn!(%cause, attempt = self.attempts, next_try = ?next_try.saturating_duration_since(now), "acquire: retrying");
        out.event(LockEvent::Retrying(Retry {
            cause: cause.to_owned(),
            attempt: self.attempts,
            failing_since: since,
            next_try,
        }));
        Ok(())
    }
}

/// How a held key (or slot) is watched: blocking reads on its index, paced against an agent
/// that answers at once, with failures counted against `monitor_retries`.
#[derive(Clone, Debug)]
pub(crate) struct Watch {
    pub(crate) index: u64,
    pub(crate) step: WatchStep,
    failures: u32,
    pace: Backoff,
}

/// The monitor's next move.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WatchStep {
    Read(Pending),
    Pause(Instant),
}

impl Watch {
    /// A watch starting from `index`, reading at `now`.
    pub(crate) fn new(index: u64, now: Instant) -> Watch {
        Watch {
            index,
            step: WatchStep::Pause(now),
            failures: 0,
            pace: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }

    pub(crate) fn pending(&self) -> Option<Pending> {
        match self.step {
            WatchStep::Read(p) => Some(p),
            WatchStep::Pause(_) => None,
        }
    }

    pub(crate) fn timer(&self) -> Option<Instant> {
        match self.step {
            WatchStep::Pause(until) => Some(until),
            WatchStep::Read(_) => None,
        }
    }

    /// Whether the pause is over and the next read is due.
    pub(crate) fn due(&self, now: Instant) -> bool {
        matches!(self.step, WatchStep::Pause(until) if now >= until)
    }

    /// A reply from a server that knows no leader may come from stale state: not an answer to
    /// act on.
    pub(crate) fn trust<T>(read: Result<QueryReply<T>, Failure>) -> Result<QueryReply<T>, Failure> {
        match read {
            Ok(read) if read.meta.known_leader == Some(false) => Err(Failure::Transient(
                "the answering server knows no leader".to_owned(),
            )),
            other => other,
        }
    }

    /// Takes in a read that still shows the hold; true when the next read may go at once,
    /// false when it must wait (the agent answered at once without progress).
    pub(crate) fn still_held(
        &mut self,
        now: Instant,
        sent: Pending,
        got: u64,
        wait: Duration,
        rng: &mut Rng,
    ) -> bool {
        self.failures = 0;
        let (index, moved) = read::next_index(self.index, got);
        let quick = now.saturating_duration_since(sent.sent_at) < wait / 2;
        let blocked = self.index > 0;
        // No progress, at once: index 0 included (a reply without X-Consul-Index).
        let spinning = !moved && quick;
        self.index = index;
        if spinning {
            self.step = WatchStep::Pause(now + self.pace.next(rng));
            return false;
        }
        if blocked {
            self.pace.reset();
        }
        true
    }

    /// Takes in a failed read: a pause before the next (from index 0), or the loss when
    /// `retries` are exhausted or the failure is fatal.
    pub(crate) fn failed(
        &mut self,
        now: Instant,
        failure: Failure,
        retries: Option<u32>,
        retry_time: Duration,
    ) -> Result<(), LossReason> {
        self.failures = self.failures.saturating_add(1);
        let failures = self.failures;
        let last = match failure {
            Failure::Transient(why) => why,
            Failure::Fatal(e) => {
                return Err(LossReason::MonitorFailed {
                    failures,
                    last: e.to_string(),
                });
            }
        };
        if retries.is_some_and(|n| failures > n) {
            return Err(LossReason::MonitorFailed { failures, last });
        }
        tracing::warn!(%last, failures, "monitor read failed; retrying");
        self.index = 0;
        self.step = WatchStep::Pause(now + retry_time);
        Ok(())
    }
}

/// The driving surface every holding machine offers, written once: the inherent methods a driver
/// calls (`poll_action`, `poll_timeout`, `handle_timeout`, `handle_response`, `is_quiescent`,
/// `in_flight`) on top of [`Phases`], and the [`HoldMachine`](crate::machine::HoldMachine) impl.
macro_rules! holding_surface {
    ($machine:ident) => {
        impl $machine {
            /// The next thing to do, if any.
            pub fn poll_action(&mut self) -> Option<$crate::machine::Action<$crate::machine::LockEvent>> {
                $crate::machine::hold::Phases::drive_poll_action(self)
            }

            /// The next instant at which [`handle_timeout`](Self::handle_timeout) must be called,
            /// if any. Never earlier than the latest `now` the machine was given.
            pub fn poll_timeout(&self) -> Option<std::time::Instant> {
                $crate::machine::hold::Phases::drive_poll_timeout(self)
            }

            /// Handles the passage of time: timers that are due fire, requests past their
            /// deadline are taken as timed out. Calling it early, or twice, does nothing.
            pub fn handle_timeout(&mut self, now: std::time::Instant) {
                $crate::machine::hold::Phases::drive_timeout(self, now);
            }

            /// Handles the reply to request `id` (or the transport's failure to get one). A reply
            /// to a request the machine no longer waits for is ignored.
            pub fn handle_response(
                &mut self,
                now: std::time::Instant,
                id: $crate::machine::RequestId,
                reply: $crate::machine::Reply,
            ) {
                $crate::machine::hold::Phases::drive_response(self, now, id, reply);
            }

            /// Whether the machine has nothing left to do: idle, no request outstanding, nothing
            /// queued. A driver may stop driving it then.
            pub fn is_quiescent(&self) -> bool {
                $crate::machine::hold::Phases::drive_quiescent(self)
            }

            /// The number of requests the machine is waiting on.
            pub fn in_flight(&self) -> usize {
                $crate::machine::hold::Phases::pendings(self).len()
            }
        }

        impl $crate::machine::HoldMachine for $machine {
            fn lock(&mut self, now: std::time::Instant) -> Result<(), $crate::machine::LockError> {
                $machine::lock(self, now)
            }
            fn unlock(&mut self, now: std::time::Instant) -> Result<(), $crate::machine::LockError> {
                $machine::unlock(self, now)
            }
            fn cancel(&mut self, now: std::time::Instant) {
                $machine::cancel(self, now);
            }
            fn destroy(&mut self, now: std::time::Instant) -> Result<(), $crate::machine::LockError> {
                $machine::destroy(self, now)
            }
            fn status(&self) -> $crate::machine::LockStatus {
                $machine::status(self)
            }
            fn handle_response(
                &mut self,
                now: std::time::Instant,
                id: $crate::machine::RequestId,
                reply: $crate::machine::Reply,
            ) {
                $machine::handle_response(self, now, id, reply);
            }
            fn handle_timeout(&mut self, now: std::time::Instant) {
                $machine::handle_timeout(self, now);
            }
            fn poll_action(&mut self) -> Option<$crate::machine::Action<$crate::machine::LockEvent>> {
                $machine::poll_action(self)
            }
            fn poll_timeout(&self) -> Option<std::time::Instant> {
                $machine::poll_timeout(self)
            }
            fn is_quiescent(&self) -> bool {
                $machine::is_quiescent(self)
            }
            fn session_id(&self) -> Option<&$crate::api::SessionId> {
                $machine::session(self).id()
            }
            fn token(&self) -> Option<&$crate::machine::FencingToken> {
                $machine::token(self)
            }
            fn in_flight(&self) -> usize {
                $machine::in_flight(self)
            }
        }
    };
}
pub(crate) use holding_surface;
