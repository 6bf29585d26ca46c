//! The parts of a holder that are not about its phases: the [`Base`] it stands on (session,
//! outbox, seeded randomness, a clock that never runs backwards), the [`Failures`] of an
//! acquisition, and the [`Watch`] that keeps a hold monitored.

use std::time::{Duration, Instant};

use crate::api::{ClientConfig, QueryReply};
use crate::machine::backoff::{Backoff, Rng};
use crate::machine::classify::Failure;
use crate::machine::outbox::{Outbox, Pending};
use crate::machine::session::{SessionEvent, SessionMachine};
use crate::machine::{AfterInvalidation, LockError, LockEvent, LossReason, Retry, SessionChoice, read};

/// The half of a holding machine that is not about its phases. `E` is what the machine reports
/// (a lock's [`LockEvent`], a key set's [`KeySetEvent`](crate::machine::KeySetEvent)).
#[derive(Debug)]
pub(crate) struct Base<E = LockEvent> {
    pub(crate) session: SessionMachine,
    pub(crate) out: Outbox<E>,
    pub(crate) rng: Rng,
    last_now: Option<Instant>,
    request_timeout: Duration,
}

impl<E> Base<E> {
    /// The base for a machine with these options: `namespace` overrides the config's.
    pub(crate) fn new(
        mut config: ClientConfig,
        namespace: Option<&String>,
        session: &SessionChoice,
        after: AfterInvalidation,
        request_timeout: Duration,
        seed: u64,
    ) -> Base<E> {
        if let Some(ns) = namespace {
            config.namespace = Some(ns.clone());
        }
        let source = match session {
            SessionChoice::Create(s) => Ok(s.to_request()),
            SessionChoice::Existing(id) => Err(id.clone()),
        };
        // The caller's session is neither renewed nor given a deadline.
        let guard = match session {
            SessionChoice::Create(s) => s.early_end_guard(after),
            SessionChoice::Existing(_) => None,
        };
        Base {
            session: SessionMachine::new(source, guard, request_timeout),
            out: Outbox::new(config),
            rng: Rng::new(seed),
            last_now: None,
            request_timeout,
        }
    }

    /// The base for a machine holding with `hold`'s session, namespace, request timeout and
    /// seed, whose keys are kept from others after an early end of the session as `after` says.
    pub(crate) fn for_hold(
        config: ClientConfig,
        hold: &crate::machine::HoldOptions,
        after: AfterInvalidation,
    ) -> Base<E> {
        Base::new(
            config,
            hold.namespace.as_ref(),
            &hold.session,
            after,
            hold.request_timeout,
            hold.seed,
        )
    }

    /// The latest `now` the machine was given.
    pub(crate) fn last_now(&self) -> Option<Instant> {
        self.last_now
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
    pub(crate) fn failed<E: From<Retry>>(
        &mut self,
        now: Instant,
        cause: &str,
        next_try: Instant,
        budget: Option<Duration>,
        out: &mut Outbox<E>,
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
        out.event(E::from(Retry {
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
        let quick = read::quick(now.saturating_duration_since(sent.sent_at), wait);
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
