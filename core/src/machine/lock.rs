//! The lock: wait for the key, acquire it, hold it while watching it, give it up. What is the
//! lock's own; the rest is the [`Holder`]'s.
//!
//! The algorithm is Go's `api.Lock` (see ARCHITECTURE.md), with the fixes its users asked for:
//! a renew deadline, reuse after a loss, cancellation at any moment, lock-delay-aware retries,
//! try-once as its own outcome, and transient errors that don't lose a healthy lock.

use std::time::{Duration, Instant};

use crate::api::{
    ApiError, Blocking, Consistency, KvDequeueLockTxn, KvGet, KvLockTxn, KvPair, KvProclaimTxn, KvRelease,
    LockRefusal, LockTxnOutcome, QueryReply, SessionId, SessionInfo,
};
use crate::machine::backoff::Backoff;
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::Watch;
use crate::machine::holder::{Held, Holder, Kind, Phase, ReleaseStep, Releasing, Step};
use crate::machine::outbox::{Pending, Pendings};
use crate::machine::queue::Place;
use crate::machine::{
    FencingToken, LOCK_FLAG_VALUE, LockError, LockEvent, LockOptions, LossReason, Misuse, OptionsError,
    Reply, RequestId,
};

/// Margin past the holder's lock-delay before acquiring again, for clock granularity.
const LOCK_DELAY_MARGIN: Duration = Duration::from_millis(15);
/// The shortest pause of a lock-delay of unknown end spent watching the key rather than blind.
const DELAY_WATCH_FROM: Duration = Duration::from_secs(1);

/// How long a holder must have been seen holding before the waiter asks for its session's
/// lock-delay. Every waiter asks about every new holder, so under contention, where holds last
/// milliseconds, asking at once cost each handoff one request per waiter (a fifth of all the
/// requests of 50 contenders, in the contention benchmark); a holder whose session is invalidated
/// sooner than this is waited out by backoff instead.
const HOLDER_INFO_AFTER: Duration = Duration::from_millis(100);

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
pub type LockMachine = Holder<LockKind>;

/// The lock's part of a [`LockMachine`]: beyond its options, what outlives an attempt.
#[derive(Debug, Default)]
pub struct LockKind {
    /// Queued: the last few sessions this machine lined up with. An entry of one of them is
    /// ours, left by an earlier attempt (its session declared lost, or its teardown given up
    /// for a new attempt, while Consul still keeps it): never a waiter to wait behind.
    pub(crate) lined_up_with: Vec<SessionId>,
}

/// How many of its sessions a queued lock remembers (see [`LockKind`]): each was let go, so
/// Consul ends it within two TTLs; a handful covers the sessions any run can replace meanwhile.
const REMEMBERED_SESSIONS: usize = 8;

impl LockKind {
    /// Remembers `session` as one this machine lined up with; answers the others.
    pub(crate) fn lined_up(&mut self, session: &SessionId) -> Vec<SessionId> {
        if !self.lined_up_with.contains(session) {
            self.lined_up_with.push(session.clone());
            if self.lined_up_with.len() > REMEMBERED_SESSIONS {
                self.lined_up_with.remove(0);
            }
        }
        self.lined_up_with
            .iter()
            .filter(|s| *s != session)
            .cloned()
            .collect()
    }
}

/// The lock's requests while acquiring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// A (blocking) read of the key.
    Read,
    /// The lock transaction.
    Acquire,
    /// The re-read after a refused acquire: contention, or lock-delay?
    Recheck,
    /// A lock-delay of unknown end is in force: a blocking read of the key until `until` (the
    /// backoff's next try), so that a contender taking the key meanwhile, or letting it go, is
    /// seen at once rather than after a blind pause.
    DelayWatch {
        /// When to try again if the key does not change.
        until: Instant,
    },
    /// Queued: taking our entry in the line.
    Enqueue,
    /// Queued: the list of the key and its line.
    Line,
    /// Queued: a blocking read of the entry just ahead.
    Ahead,
}

/// What a waiting lock knows of the key's current holder.
#[derive(Clone, Debug, Default)]
pub struct Wait {
    incumbent: Option<Incumbent>,
    /// Queued: our place in line.
    pub(crate) place: Place,
}

/// What the waiter knows of the current holder's session, to time a retry to its lock-delay.
#[derive(Clone, Debug)]
struct Incumbent {
    session: SessionId,
    lock_delay: Option<Duration>,
    /// When to ask for the session's info; `None` once asked.
    info_at: Option<Instant>,
    info: Option<Pending>,
    /// When the key was first seen free after this holder.
    freed_at: Option<Instant>,
}

impl Wait {
    /// The key shows `session` holding it: a new holder is asked about once it has held for
    /// [`HOLDER_INFO_AFTER`].
    pub(crate) fn see_holder(&mut self, session: SessionId, now: Instant) {
        if self.incumbent.as_ref().is_some_and(|h| h.session == session) {
            return;
        }
        self.incumbent = Some(Incumbent {
            session,
            lock_delay: None,
            info_at: Some(now + HOLDER_INFO_AFTER),
            info: None,
            freed_at: None,
        });
    }
}

/// The lock's release request: the KV release, tried again after failures that may pass (a
/// release nobody answered leaves the key held until the session ends, and a destroy then
/// imposes the lock-delay on everyone else).
#[derive(Clone, Copy, Debug)]
pub enum Give {
    /// `?release=` with the holding session.
    Release,
}

/// An acquire abandoned in flight by a cancel or a give-up. It may have been granted, so the key
/// is released before the session is let go: destroying a session that holds the key would make
/// every other contender wait out its lock-delay.
#[derive(Clone, Debug)]
pub enum Chore {
    /// Waiting for the abandoned acquire's answer (sent with `session`).
    Acquire {
        /// The session the acquire was sent with.
        session: SessionId,
    },
    /// Releasing what it may have been granted.
    Release {
        /// Queued: the session whose entry to delete next (the grant, unconfirmed, may not
        /// have deleted it).
        leave: Option<SessionId>,
    },
    /// Queued: waiting for the answer to an abandoned enqueue (sent with `session`), whose
    /// entry is then deleted.
    Enqueue {
        /// The session the entry was taken with.
        session: SessionId,
    },
    /// Queued: deleting the entry of an attempt that ended without the lock.
    Leave,
}

/// A proclaim in flight: a new value written to the key while it is held (see
/// [`Holder::proclaim`]).
#[derive(Clone, Debug)]
pub struct Proclaim {
    pending: Pending,
}

impl Holder<LockKind> {
    /// A machine for `options`, sending requests for the agent `config` describes. The options
    /// are validated here.
    pub fn new(config: crate::api::ClientConfig, options: LockOptions) -> Result<LockMachine, OptionsError> {
        Holder::build(config, options, |_| LockKind::default())
    }

    fn is_ours(&self, pair: &KvPair) -> bool {
        pair.session
            .as_ref()
            .is_some_and(|s| Some(s) == self.base.session.id())
    }

    /// Sends the KV release of the lock key for `session`, writing the lock's value.
    fn send_release(&mut self, now: Instant, session: SessionId) -> Pending {
        let release = KvRelease {
            key: self.options.key.clone(),
            session,
            flags: LOCK_FLAG_VALUE,
            value: self.options.hold.value.clone(),
        };
        self.base.send(now, &release, None)
    }

    // ----- acquiring -----------------------------------------------------------------------

    pub(crate) fn acquire(&mut self, now: Instant) {
        let Some(session) = self.base.session.id().cloned() else {
            if let Some(a) = self.acquiring() {
                a.step = Step::AwaitSession;
            }
            return;
        };
        if self.queued() && self.settling(now) {
            return;
        }
        let entry = self.dequeue_entry(&session);
        let acquire = KvLockTxn {
            key: self.options.key.clone(),
            session,
            flags: LOCK_FLAG_VALUE,
            value: self.options.hold.value.clone(),
        };
        match entry {
            // Queued: leave the line in the same write, so a refusal keeps our place.
            Some(entry) => {
                let txn = KvDequeueLockTxn { lock: acquire, entry };
                self.send_ask(now, Ask::Acquire, &txn, None);
            }
            None => self.send_ask(now, Ask::Acquire, &acquire, None),
        }
    }

    fn recheck(&mut self, now: Instant) {
        let get = LockKind::read(self, Consistency::Default, None);
        self.send_ask(now, Ask::Recheck, &get, None);
    }

    fn on_read(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let read = match decode::<KvGet>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Read, &why),
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
        let pace = self.take_index(now, sent, read.meta.index);
        let queued = self.queued();
        let Some(a) = self.acquiring() else { return };
        match other {
            None => {
                // Free (or already ours: re-acquiring is harmless and does not bump LockIndex).
                if let Some(h) = &mut a.wait.incumbent {
                    h.freed_at.get_or_insert(now);
                    // Its session is released or gone: its info can't tell us anything now.
                    h.info_at = None;
                }
                if pace.blocked && pace.spinning {
                    // Back at once on an index that showed the key held: an agent that says so
                    // must not make us spin through acquire and recheck.
                    return self.retry_spinning(now);
                }
                self.acquire(now);
            }
            Some(holder) => {
                a.wait.see_holder(holder, now);
                if pace.spinning {
                    self.retry_spinning(now);
                } else if !pace.moved && queued {
                    // The head's wait ran out without news: list once a round, which finds our
                    // own entry gone if an operator deleted it.
                    self.line(now);
                } else {
                    if pace.blocked {
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
            // (`NotHeld` is a proclaim's refusal; a lone lock operation does not give it.)
            Ok(LockTxnOutcome::Refused(LockRefusal::Held | LockRefusal::NotHeld)) => self.recheck(now),
            // Consul says so outright: no read needed to tell it from contention.
            Ok(LockTxnOutcome::Refused(LockRefusal::LockDelay)) => self.wait_out_lock_delay(now),
            Ok(LockTxnOutcome::Refused(refusal)) => self.on_refused_txn(now, Ok(refusal), Ask::Read),
            Err(failure) => self.on_refused_txn(now, Err(failure), Ask::Read),
        }
    }

    /// What every lock transaction of an acquisition (the acquire, a queued lock's enqueue)
    /// does with an answer that is neither a grant nor contention: a new session, the end of
    /// the attempt, or a retry of `then` after a failure that may pass.
    pub(crate) fn on_refused_txn(&mut self, now: Instant, outcome: Result<LockRefusal, Failure>, then: Ask) {
        match outcome {
            Ok(LockRefusal::PermissionDenied) => self.fail(
                now,
                LockError::PermissionDenied(ApiError::Status {
                    status: 409,
                    body: "Permission denied (the lock transaction needs key write)".to_owned(),
                }),
            ),
            // A refusal this machine does not know can't be waited out knowingly: retrying it
            // would be a loop the caller never sees, so it ends the attempt, in Consul's words.
            Ok(LockRefusal::Other(what)) => self.fail(
                now,
                LockError::Refused(ApiError::Status {
                    status: 409,
                    body: what,
                }),
            ),
            Ok(LockRefusal::InvalidSession) => self.session_gone(
                now,
                ApiError::Status {
                    status: 409,
                    body: "invalid session".to_owned(),
                },
            ),
            Err(Failure::Fatal(e)) if e.is_invalid_session() => self.session_gone(now, e),
            Err(Failure::Fatal(e)) => self.fail(now, LockError::refused(e)),
            Err(Failure::Transient(why)) => self.retry(now, then, &why),
            // Contention and lock-delay are each caller's own business; here they are a
            // refusal like any other the caller did not expect.
            Ok(refusal @ (LockRefusal::Held | LockRefusal::NotHeld | LockRefusal::LockDelay)) => self.fail(
                now,
                LockError::Refused(ApiError::Status {
                    status: 409,
                    body: format!("{refusal:?}"),
                }),
            ),
        }
    }

    fn on_recheck(&mut self, now: Instant, reply: &Reply) {
        let read = match decode::<KvGet>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Read, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        if let Some(pair) = &read.value {
            if pair.flags != LOCK_FLAG_VALUE {
                return self.fail(now, LockError::Conflict { flags: pair.flags });
            }
        }
        let ours = read.value.as_ref().is_some_and(|p| self.is_ours(p));
        let held_by_other = read.value.as_ref().is_some_and(|p| p.session.is_some()) && !ours;
        let Some(a) = self.acquiring() else { return };
        a.failures.progressed();
        if held_by_other {
            // Contention: someone else got it; wait on it.
            if let Some(holder) = read.value.and_then(|p| p.session) {
                a.wait.see_holder(holder, now);
            }
            a.index = read.meta.index;
            return self.read(now);
        }
        if ours {
            // Refused, yet ours: the agent contradicts itself. Try again, but not at once.
            let give_up_at = a.give_up_at;
            let Some(until) = self.pause(now, Ask::Acquire) else {
                return;
            };
            let until = give_up_at.map_or(until, |at| until.min(at));
            if let Some(a) = self.acquiring() {
                a.step = Step::Pause {
                    until,
                    then: Ask::Acquire,
                };
            }
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
        let known = self.acquiring().and_then(|a| {
            let h = a.wait.incumbent.as_mut()?;
            Some((h.lock_delay.take()?, h.freed_at?))
        });
        let until = match known {
            // Consul caps lock-delay at 60 s, whatever the session info says (fuzz finding F2).
            Some((delay, freed_at)) => {
                (freed_at + delay.min(crate::machine::options::MAX_LOCK_DELAY) + LOCK_DELAY_MARGIN).max(now)
            }
            None => {
                let Some(until) = self.pause(now, Ask::Acquire) else {
                    return;
                };
                let Some(a) = self.acquiring() else { return };
                let until = a.give_up_at.map_or(until, |at| until.min(at));
                let wait = until.saturating_duration_since(now);
                // On index 0 the read would answer at once: then only the pause paces us. A short
                // pause misses little and a read would double the tries' cost; from a second on,
                // a handoff missed would cost more than the read.
                if a.index > 0 && wait >= DELAY_WATCH_FROM {
                    let blocking = Blocking { index: a.index, wait };
                    let read = LockKind::read(self, Consistency::Default, Some(blocking));
                    tracing::debug!(?wait, "lock-delay in force, end unknown: watching the key");
                    return self.send_ask(now, Ask::DelayWatch { until }, &read, Some(wait));
                }
                until
            }
        };
        tracing::debug!(wait = ?until.saturating_duration_since(now), "lock-delay in force");
        let Some(a) = self.acquiring() else { return };
        a.step = Step::Pause {
            until: a.give_up_at.map_or(until, |at| until.min(at)),
            then: Ask::Acquire,
        };
    }

    /// The answer to the read that waits out a lock-delay of unknown end: a change of the key is
    /// news like any read's (someone took it: wait for them; it is free: try); no change means
    /// the delay may be over, so try again, though not before `until` (an agent that answers a
    /// blocking read at once must not make us spin through refusals).
    fn on_delay_watch(&mut self, now: Instant, sent: Pending, reply: &Reply, until: Instant) {
        let read = match decode::<KvGet>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Read, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let Some(a) = self.acquiring() else { return };
        if crate::machine::read::next_index(a.index, read.meta.index).1 {
            return self.on_read(now, sent, reply);
        }
        if now < until {
            a.step = Step::Pause {
                until,
                then: Ask::Acquire,
            };
            return;
        }
        self.acquire(now);
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
                    hold: None,
                });
                self.monitor(now);
            }
            // An agent that grants and shows someone else's entry: wait again, after a pause, so
            // that it can't make us spin.
            _ => self.retry(now, Ask::Read, "the lock transaction answered with another entry"),
        }
    }

    // ----- leading ------------------------------------------------------------------------

    /// The answer to a proclaim: the value is the key's, or why not. A key the check finds not
    /// ours is lost, at once: Consul said so in a consistent write.
    fn on_proclaimed(&mut self, now: Instant, reply: &Reply) {
        if let Some(h) = self.held() {
            h.hold = None;
        }
        match decode::<KvProclaimTxn>(reply) {
            Ok(LockTxnOutcome::Locked(pair)) if self.is_ours(&pair) => {
                tracing::info!(key = %pair.key, modify_index = pair.modify_index, "proclaimed");
                self.base.out.event(LockEvent::Proclaimed {
                    modify_index: pair.modify_index,
                });
            }
            Ok(LockTxnOutcome::Locked(_) | LockTxnOutcome::Refused(LockRefusal::NotHeld)) => {
                self.base.out.event(LockEvent::ProclaimFailed(LockError::NotHeld));
                self.lose(now, LossReason::NotHeld);
            }
            Ok(LockTxnOutcome::Refused(LockRefusal::InvalidSession)) => {
                self.base.out.event(LockEvent::ProclaimFailed(LockError::NotHeld));
                self.lose(now, LossReason::SessionInvalidated);
            }
            Ok(LockTxnOutcome::Refused(LockRefusal::PermissionDenied)) => {
                let e = ApiError::Status {
                    status: 409,
                    body: "Permission denied (a proclaim needs key write)".to_owned(),
                };
                self.base
                    .out
                    .event(LockEvent::ProclaimFailed(LockError::PermissionDenied(e)));
            }
            Ok(LockTxnOutcome::Refused(other)) => {
                let e = ApiError::Status {
                    status: 409,
                    body: format!("{other:?}"),
                };
                self.base
                    .out
                    .event(LockEvent::ProclaimFailed(LockError::Refused(e)));
            }
            Err(Failure::Fatal(e)) => self
                .base
                .out
                .event(LockEvent::ProclaimFailed(LockError::refused(e))),
            // The write may or may not have been made: the caller may proclaim again (the same
            // value twice is harmless), and the monitor tells whether the key is still ours.
            Err(Failure::Transient(why)) => self
                .base
                .out
                .event(LockEvent::ProclaimFailed(LockError::Unavailable(why))),
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
        let Phase::Releasing(r) = &mut self.phase else {
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
}

impl Kind for LockKind {
    type Options = LockOptions;
    type Ask = Ask;
    type Wait = Wait;
    type Hold = Option<Proclaim>;
    type Give = Give;
    type Leave = SessionId;
    type Chore = Chore;
    type Read = KvGet;
    type Seen = Option<KvPair>;
    const READ: Ask = Ask::Read;
    const IN_USE: LockError = LockError::InUse;

    fn read(h: &LockMachine, consistency: Consistency, blocking: Option<Blocking>) -> KvGet {
        KvGet {
            key: h.options.key.clone(),
            consistency,
            blocking,
        }
    }

    fn on_ready(h: &mut LockMachine, now: Instant) {
        if !h.queued() {
            return h.read(now);
        }
        // An ended attempt's entry (the same key, on the caller's session or one still being
        // let go) may be being deleted: taking it before that lands could lose it.
        if h.chore.is_some() {
            if let Some(a) = h.acquiring() {
                a.step = Step::AwaitCleanup { then: Ask::Enqueue };
            }
            return;
        }
        h.enqueue(now);
    }

    fn ask(h: &mut LockMachine, now: Instant, ask: Ask) {
        match ask {
            Ask::Read => h.read(now),
            Ask::Acquire => h.acquire(now),
            Ask::Recheck => h.recheck(now),
            // Only ever sent, never scheduled; after a pause, a read does its work.
            Ask::DelayWatch { .. } => h.read(now),
            Ask::Enqueue => h.enqueue(now),
            Ask::Line => h.line(now),
            // After a pause the entry ahead may be gone: look again.
            Ask::Ahead => h.line(now),
        }
    }

    fn on_answer(h: &mut LockMachine, now: Instant, ask: Ask, sent: Pending, reply: &Reply) {
        match ask {
            Ask::Read => h.on_read(now, sent, reply),
            Ask::Acquire => h.on_acquire(now, reply),
            Ask::Recheck => h.on_recheck(now, reply),
            Ask::DelayWatch { until } => h.on_delay_watch(now, sent, reply, until),
            Ask::Enqueue => h.on_enqueued(now, reply),
            Ask::Line => h.on_line(now, reply),
            Ask::Ahead => h.on_ahead(now, sent, reply),
        }
    }

    fn deciding(ask: Ask) -> bool {
        ask == Ask::Acquire
    }

    fn wait_pendings(wait: &Wait, into: &mut Pendings) {
        into.extend(wait.incumbent.as_ref().and_then(|h| h.info));
        into.extend(wait.place.sweep);
    }

    fn wait_timer(wait: &Wait) -> Option<Instant> {
        wait.incumbent.as_ref().and_then(|h| h.info_at)
    }

    fn wait_timeout(h: &mut LockMachine, now: Instant) {
        let due = h
            .acquiring()
            .and_then(|a| a.wait.incumbent.as_ref())
            .filter(|i| i.info_at.is_some_and(|at| now >= at))
            .map(|i| i.session.clone());
        if let Some(session) = due {
            let info = h.base.send(now, &SessionInfo::new(session), None);
            if let Some(i) = h.acquiring().and_then(|a| a.wait.incumbent.as_mut()) {
                i.info_at = None;
                i.info = Some(info);
            }
        }
    }

    fn on_wait_reply(h: &mut LockMachine, _now: Instant, id: RequestId, reply: &Reply) -> bool {
        if h.acquiring()
            .and_then(|a| a.wait.place.sweep)
            .is_some_and(|p| p.is(id))
        {
            h.on_sweep(reply);
            return true;
        }
        let Some(incumbent) = h
            .acquiring()
            .and_then(|a| a.wait.incumbent.as_mut())
            .filter(|i| i.info.is_some_and(|p| p.is(id)))
        else {
            return false;
        };
        incumbent.info = None;
        if let Ok(QueryReply {
            value: Some(entry), ..
        }) = decode::<SessionInfo>(reply)
        {
            tracing::debug!(holder = %incumbent.session, lock_delay = ?entry.lock_delay, "holder's lock-delay");
            incumbent.lock_delay = Some(entry.lock_delay);
        }
        true
    }

    fn loss_in(h: &LockMachine, _held: &Held<LockKind>, seen: &Option<KvPair>) -> Option<LossReason> {
        let Some(pair) = seen else {
            return Some(LossReason::KeyDeleted);
        };
        if pair.flags != LOCK_FLAG_VALUE {
            return Some(LossReason::Conflict { flags: pair.flags });
        }
        if h.is_ours(pair) {
            return None;
        }
        Some(match &pair.session {
            Some(other) => LossReason::TakenBy(other.clone()),
            None => LossReason::NotHeld,
        })
    }

    fn proclaim(h: &mut LockMachine, now: Instant, value: Vec<u8>) -> Result<(), Misuse> {
        let Phase::Held(held) = &h.phase else {
            return Err(Misuse::NotHeld);
        };
        if held.hold.is_some() {
            return Err(Misuse::Busy);
        }
        let write = KvProclaimTxn(KvLockTxn {
            key: h.options.key.clone(),
            session: held.token.session.clone(),
            flags: LOCK_FLAG_VALUE,
            value,
        });
        let pending = h.base.send(now, &write, None);
        if let Some(held) = h.held() {
            held.hold = Some(Proclaim { pending });
        }
        Ok(())
    }

    fn hold_pendings(hold: &Option<Proclaim>, into: &mut Pendings) {
        into.extend(hold.as_ref().map(|p| p.pending));
    }

    fn on_hold_reply(h: &mut LockMachine, now: Instant, id: RequestId, reply: &Reply) -> bool {
        let ours = matches!(&h.phase, Phase::Held(Held { hold: Some(p), .. }) if p.pending.is(id));
        if ours {
            h.on_proclaimed(now, reply);
        }
        ours
    }

    fn release(h: &mut LockMachine, now: Instant, held: Held<LockKind>) {
        if held.hold.is_some() {
            // Its answer will find no hold to report to: the check it carries keeps it from
            // taking the key back once released, but whether it landed first is unknown.
            h.base.out.event(LockEvent::ProclaimFailed(LockError::NotHeld));
        }
        let session = held.token.session;
        let pending = h.send_release(now, session.clone());
        // Tried for as long as the session lives on its own, at least a request's time.
        let life = h.base.session.ttl().unwrap_or_default();
        h.phase = Phase::Releasing(Releasing {
            step: ReleaseStep::Sent(Give::Release, pending),
            attempts: 1,
            give_up_at: now + life.max(h.options.hold.request_timeout),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            leave: session,
            failed: None,
        });
    }

    fn on_give(h: &mut LockMachine, now: Instant, Give::Release: Give, reply: &Reply) {
        h.on_release(now, reply);
    }

    fn release_again(h: &mut LockMachine, now: Instant) {
        let Some(r) = h.releasing() else { return };
        let session = r.leave.clone();
        let pending = h.send_release(now, session);
        if let Some(r) = h.releasing() {
            r.attempts = r.attempts.saturating_add(1);
            r.step = ReleaseStep::Sent(Give::Release, pending);
        }
    }

    fn destroy_verdict(_h: &LockMachine, seen: &Option<KvPair>) -> Result<Option<u64>, LockError> {
        match seen {
            None => Ok(None),
            Some(pair) if pair.flags != LOCK_FLAG_VALUE => Err(LockError::Conflict { flags: pair.flags }),
            Some(pair) if pair.session.is_some() => Err(LockError::InUse),
            Some(pair) => Ok(Some(pair.modify_index)),
        }
    }

    fn destroy_key(h: &LockMachine) -> crate::api::Key {
        h.options.key.clone()
    }

    fn on_end(h: &mut LockMachine, now: Instant, ended: &Phase<LockKind>) {
        if let Phase::Held(Held { hold: Some(_), .. }) = ended {
            h.base.out.event(LockEvent::ProclaimFailed(LockError::NotHeld));
        }
        let Phase::Acquiring(a) = ended else { return };
        let Some(session) = h.base.session.id().cloned() else {
            return;
        };
        let chore = match a.step {
            Step::Sent(Ask::Acquire, pending) => Some((Chore::Acquire { session }, pending)),
            // An earlier attempt's work is still going (a queued attempt waits for it before
            // taking its entry, so it has none yet): it goes on, and leaves the line itself.
            _ if h.chore.is_some() => None,
            Step::Sent(Ask::Enqueue, pending) if h.queued() => Some((Chore::Enqueue { session }, pending)),
            _ if h.queued() => h.leave(now, &session),
            _ => None,
        };
        if chore.is_some() {
            h.chore = chore;
        }
    }

    fn on_chore(h: &mut LockMachine, now: Instant, chore: Chore, reply: &Reply) -> Option<(Chore, Pending)> {
        match chore {
            Chore::Acquire { session } => {
                // Refused, the key is not ours; granted or unanswered, it may be.
                let outcome = decode::<KvLockTxn>(reply);
                let refused = matches!(outcome, Ok(LockTxnOutcome::Refused(_)) | Err(Failure::Fatal(_)));
                if refused {
                    // Refused, a queued acquire's delete was rolled back: the entry is still
                    // there (a new queued attempt waits for this chore before taking it).
                    return h.leave(now, &session);
                }
                if matches!(h.phase, Phase::Acquiring(_) | Phase::Held(_)) {
                    // A new attempt on the same session is under way or holds the key: the
                    // grant is its own now (re-acquiring is harmless and keeps LockIndex).
                    // Releasing would pull the key from under it while it believes it holds it.
                    tracing::debug!("a key granted to an abandoned acquire is kept by the new attempt");
                    return None;
                }
                tracing::debug!("releasing the key an abandoned acquire may have been granted");
                // Granted, a queued acquire left the line with it; unanswered, maybe not.
                let leave = outcome.is_err().then_some(session.clone());
                Some((Chore::Release { leave }, h.send_release(now, session)))
            }
            Chore::Release { leave } => {
                if let Err(why) = decode::<KvRelease>(reply) {
                    // The session's destroy (or its expiry) frees the key anyway.
                    tracing::warn!(?why, "could not release the key of an abandoned acquire");
                }
                leave.and_then(|session| h.leave(now, &session))
            }
            Chore::Enqueue { session } => h.leave(now, &session),
            Chore::Leave => {
                if let Err(why) = decode::<crate::api::KvDelete>(reply) {
                    // A caller's session keeps a live entry that later waiters queue behind
                    // until the session ends; a session of ours is destroyed next, leaving the
                    // entry dead, for the next waiter to clear.
                    tracing::warn!(?why, "could not delete our queue entry");
                }
                None
            }
        }
    }
}
