//! The semaphore: take one of `limit` slots under a prefix, hold it while watching it, give it up.
//!
//! The algorithm and the keys are Go's `api.Semaphore` (and so `consul lock -n N`'s), so that Go
//! and Rust contenders share one semaphore:
//!
//! - each contender holds `<prefix>/<session>` (acquired with its session, flags
//!   [`SEMAPHORE_FLAG_VALUE`], the contender's value as body);
//! - `<prefix>/.lock` (flags [`SEMAPHORE_FLAG_VALUE`]) holds `{"Limit": n, "Holders":
//!   {"<session>": true}}`; a holder whose session holds no key under the prefix any more is dead
//!   and pruned by whoever next writes the `.lock`;
//! - a contender lists the prefix, and if fewer than `Limit` live holders remain, adds itself to
//!   the `.lock` with a check-and-set on its `ModifyIndex` (0 when it does not exist yet); else it
//!   waits for the prefix to change (a blocking list).
//!
//! It runs on the same [`SessionMachine`] as the lock, with the same fixes: the renew deadline,
//! reuse after any ending, cancellation in the call, try-once as its own outcome, transient
//! monitor errors that don't lose a renewed slot, and blocking-read hygiene. See
//! ARCHITECTURE.md.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{
    ApiError, Blocking, Consistency, Key, KvAcquire, KvCasDelete, KvCasPut, KvDelete, KvGet, KvList, KvPair,
    QueryReply, SessionId,
};
use crate::machine::backoff::Backoff;
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::{Base, Failures, Phases, Watch, WatchStep, holding_surface};
use crate::machine::outbox::{Pending, Pendings};
use crate::machine::read::next_index;
use crate::machine::session::{SessionEvent, SessionLoss, SessionMachine};
use crate::machine::{
    FencingToken, LockError, LockEvent, LockStatus, LossReason, OptionsError, Reply, RequestId,
    SEMAPHORE_FLAG_VALUE, SemaphoreOptions, SessionChoice,
};

/// How many times `unlock` tries to take our session out of the `.lock` before it settles for
/// deleting our contender key (which is enough for the others to prune us).
const RELEASE_ATTEMPTS: u32 = 5;

/// The state a semaphore keeps in `<prefix>/.lock`, read and written as Go's `api.Semaphore`
/// does: `{"Limit":2,"Holders":{"<session>":true}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SemaphoreState {
    /// How many may hold at once.
    pub limit: u32,
    /// The holders' sessions. Go keeps a map to `true`, and any entry counts as a holder,
    /// whatever its value; entries are written back as they were read.
    pub holders: BTreeMap<String, bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireState<'a> {
    limit: u32,
    holders: &'a BTreeMap<String, bool>,
}

impl SemaphoreState {
    /// No holders yet.
    pub fn empty(limit: u32) -> SemaphoreState {
        SemaphoreState {
            limit,
            holders: BTreeMap::new(),
        }
    }

    /// Reads a `.lock` value as Go's `json.Unmarshal` would: an empty value is a fresh semaphore
    /// of `limit` (Consul answers `null` for it, and Go takes that as no lock yet); field names
    /// match case-insensitively; a missing or `null` field is zero.
    pub fn decode(value: &[u8], limit: u32) -> Result<SemaphoreState, String> {
        use serde_json::Value;
        if value.is_empty() {
            return Ok(SemaphoreState::empty(limit));
        }
        let json: Value = serde_json::from_slice(value).map_err(|e| format!("invalid JSON: {e}"))?;
        let fields = match json {
            Value::Null => return Ok(SemaphoreState::empty(0)),
            Value::Object(fields) => fields,
            other => return Err(format!("expected an object, got {}", kind(&other))),
        };
        let field = |name: &str| {
            fields.get(name).or_else(|| {
                fields
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v)
            })
        };
        let limit = match field("Limit") {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("Limit {n} is not a slot count"))?,
            Some(other) => return Err(format!("Limit is {}, not a number", kind(other))),
        };
        let holders = match field("Holders") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(h)) => h
                .iter()
                .map(|(session, v)| match v {
                    Value::Bool(b) => Ok((session.clone(), *b)),
                    Value::Null => Ok((session.clone(), false)),
                    other => Err(format!(
                        "the holder {session:?} is {}, not a boolean",
                        kind(other)
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("Holders is {}, not an object", kind(other))),
        };
        Ok(SemaphoreState { limit, holders })
    }

    /// The value to write, byte for byte as Go's `json.Marshal` writes it.
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireState {
            limit: self.limit,
            holders: &self.holders,
        };
        match serde_json::to_vec(&wire) {
            Ok(bytes) => bytes,
            // A struct of a number and a map of strings to booleans always serializes.
            Err(e) => unreachable!("consul-lock bug: {e}"),
        }
    }

    /// Whether `session` is listed as a holder.
    pub fn holds(&self, session: &str) -> bool {
        self.holders.contains_key(session)
    }

    /// Go's `pruneDeadHolders`: drops the holders whose session holds none of `pairs` (the
    /// listing of the prefix). A contender's key goes when its session ends (behavior `delete`)
    /// or loses its session (`release`), so a holder without a held key is gone.
    pub fn prune(&mut self, pairs: &[KvPair]) {
        let alive: BTreeSet<&str> = pairs
            .iter()
            .filter_map(|p| p.session.as_ref())
            .map(SessionId::as_str)
            .collect();
        self.holders.retain(|holder, _| alive.contains(holder.as_str()));
    }
}

fn kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn find<'a>(pairs: &'a [KvPair], key: &Key) -> Option<&'a KvPair> {
    pairs.iter().find(|p| p.key == key.as_str())
}

/// What became of our contender key.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Contender {
    /// Held by our session.
    Ours,
    /// Not there.
    Missing,
    /// There, held by no session.
    Released,
    /// Held by another session.
    Other(SessionId),
}

impl Contender {
    fn of(pair: Option<&KvPair>, session: &SessionId) -> Contender {
        match pair.map(|p| &p.session) {
            None => Contender::Missing,
            Some(None) => Contender::Released,
            Some(Some(s)) if s == session => Contender::Ours,
            Some(Some(s)) => Contender::Other(s.clone()),
        }
    }
}

/// A listing of the prefix, as one contender sees it.
#[derive(Clone, Debug)]
struct View {
    /// The `.lock`'s `ModifyIndex`, 0 when it does not exist (a check-and-set on 0 creates it).
    modify_index: u64,
    /// The `.lock`'s state, dead holders pruned.
    state: SemaphoreState,
    contender: Contender,
}

/// What to do once a pause ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Contend,
    Read,
    Confirm,
}

#[derive(Clone, Debug)]
enum Step {
    AwaitSession,
    /// The caller's session: the contender key of an abandoned attempt is being deleted; making
    /// it again before that delete lands could lose it.
    AwaitCleanup,
    /// Acquiring our contender key.
    Contend(Pending),
    /// A (blocking) list of the prefix.
    Read(Pending),
    /// The check-and-set adding us to the `.lock`.
    Cas(Pending),
    /// The consistent list after a granted check-and-set (or finding us a holder already).
    Confirm(Pending),
    Pause {
        until: Instant,
        then: Then,
    },
}

#[derive(Clone, Debug)]
struct Acquiring {
    step: Step,
    index: u64,
    give_up_at: Option<Instant>,
    backoff: Backoff,
    /// Check-and-set refusals since the last list that showed the semaphore full: the first is
    /// contention and is retried at once, the next ones are paced.
    conflicts: u32,
    /// Whether this attempt sent a contender acquire (so the key may exist).
    contended: bool,
    failures: Failures,
}

#[derive(Clone, Debug)]
struct Held {
    token: FencingToken,
    contender: Key,
    watch: Watch,
}

#[derive(Clone, Debug)]
enum ReleaseStep {
    /// Reading the `.lock`.
    Read(Pending),
    /// Taking our session out of it.
    Cas(Pending),
    Pause(Instant),
    /// Deleting our contender key.
    Delete(Pending),
    /// Stopping the session.
    Session,
}

#[derive(Clone, Debug)]
struct Releasing {
    session: SessionId,
    contender: Key,
    step: ReleaseStep,
    attempts: u32,
    /// After this, stop trying to take us out of the `.lock`.
    give_up_at: Instant,
    backoff: Backoff,
    /// Our slot is no longer counted: we are out of the `.lock`'s holders (or never were in
    /// it). Else only the contender key's delete frees it, since the others prune a holder
    /// whose contender key is gone.
    left: bool,
    /// The last failure of a step that would have freed the slot.
    last_failure: Option<String>,
    /// What the release ended with, reported once the session is stopped.
    failed: Option<LockError>,
}

#[derive(Clone, Debug)]
enum Destroying {
    List(Pending),
    Delete(Pending),
}

#[derive(Clone, Debug)]
enum Phase {
    Idle,
    Acquiring(Acquiring),
    Held(Held),
    Releasing(Releasing),
    Destroying(Destroying),
}

/// A Consul semaphore slot (Go's `api.Semaphore`) as a pure state machine, with the surface and
/// the events of [`LockMachine`](crate::machine::LockMachine).
///
/// A semaphore has no `LockIndex`: the [`FencingToken`] of a slot names `<prefix>/.lock` and
/// carries, as both `lock_index` and `modify_index`, the `.lock`'s `ModifyIndex` read (with a
/// consistent list) right after our check-and-set added us. It orders grants: a grant confirmed
/// before another contender's check-and-set carries a smaller index than that contender's. Two
/// slots granted close together may carry the same index; their sessions tell them apart.
///
/// ```
/// use consul_lock_core::api::ClientConfig;
/// use consul_lock_core::machine::{Action, SemaphoreMachine, SemaphoreOptions};
/// use std::time::Instant;
///
/// let options = SemaphoreOptions::new("service/workers", 3).unwrap();
/// let mut semaphore = SemaphoreMachine::new(ClientConfig::default(), options).unwrap();
/// semaphore.lock(Instant::now()).unwrap();
/// let Some(Action::Send(transmit)) = semaphore.poll_action() else { panic!() };
/// assert_eq!(transmit.request.uri().path(), "/v1/session/create");
/// ```
#[derive(Debug)]
pub struct SemaphoreMachine {
    options: SemaphoreOptions,
    lock_key: Key,
    base: Base,
    phase: Phase,
    /// The caller's session: a contender acquire abandoned in flight. If it made the key, the key
    /// must go, since no session destroy will take it.
    stray: Option<Pending>,
    /// The caller's session: the delete of the contender key of an abandoned attempt or a lost
    /// slot, so that the others prune us.
    cleanup: Option<Pending>,
}

impl SemaphoreMachine {
    /// A machine for `options`, sending requests for the agent `config` describes. The options
    /// are validated here.
    pub fn new(
        config: crate::api::ClientConfig,
        options: SemaphoreOptions,
    ) -> Result<SemaphoreMachine, OptionsError> {
        options.validate()?;
        config.check()?;
        let base = Base::new(
            config,
            options.namespace.as_ref(),
            &options.session,
            options.request_timeout,
            options.seed,
        );
        Ok(SemaphoreMachine {
            base,
            lock_key: options.lock_key(),
            options,
            phase: Phase::Idle,
            stray: None,
            cleanup: None,
        })
    }

    // ----- queries -------------------------------------------------------------------------

    /// Where the semaphore stands.
    pub fn status(&self) -> LockStatus {
        match &self.phase {
            Phase::Idle => LockStatus::Idle,
            Phase::Acquiring(_) => LockStatus::Acquiring,
            Phase::Held(_) => LockStatus::Held,
            Phase::Releasing(_) => LockStatus::Releasing,
            Phase::Destroying(_) => LockStatus::Destroying,
        }
    }

    /// The slot's token, while held.
    pub fn token(&self) -> Option<&FencingToken> {
        match &self.phase {
            Phase::Held(h) => Some(&h.token),
            _ => None,
        }
    }

    /// The session machine the semaphore stands on.
    pub fn session(&self) -> &SessionMachine {
        &self.base.session
    }

    /// The options the machine was made with.
    pub fn options(&self) -> &SemaphoreOptions {
        &self.options
    }

    // ----- operations ----------------------------------------------------------------------

    /// Starts acquiring a slot. Usable again after a loss, a release, a give-up or a cancel.
    pub fn lock(&mut self, now: Instant) -> Result<(), LockError> {
        self.base.observe(now);
        match self.phase {
            Phase::Idle => {}
            Phase::Acquiring(_) | Phase::Held(_) => return Err(LockError::AlreadyHeld),
            Phase::Releasing(_) | Phase::Destroying(_) => return Err(LockError::Busy),
        }
        let give_up_at = self.options.try_once.then(|| now + self.options.wait_time);
        self.phase = Phase::Acquiring(Acquiring {
            step: Step::AwaitSession,
            index: 0,
            give_up_at,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
            conflicts: 0,
            contended: false,
            failures: Failures::default(),
        });
        let events = self.base.start_session(now);
        self.on_session_events(now, events);
        Ok(())
    }

    /// Gives up a held slot: takes our session out of the `.lock`, deletes our contender key,
    /// then destroys the session if the machine made it. Ends with [`LockEvent::Released`].
    pub fn unlock(&mut self, now: Instant) -> Result<(), LockError> {
        self.base.observe(now);
        let Phase::Held(held) = &self.phase else {
            return Err(LockError::NotHeld);
        };
        self.phase = Phase::Releasing(Releasing {
            session: held.token.session.clone(),
            contender: held.contender.clone(),
            step: ReleaseStep::Session,
            attempts: 0,
            give_up_at: now + self.options.request_timeout,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
            left: false,
            last_failure: None,
            failed: None,
        });
        self.release_read(now);
        Ok(())
    }

    /// Stops whatever is under way, at once: an acquisition ends with [`LockEvent::Cancelled`]
    /// (its session is destroyed in the background, taking the contender key with it), a held
    /// slot is released, a destroy is abandoned. A no-op when idle or already releasing.
    pub fn cancel(&mut self, now: Instant) {
        self.base.observe(now);
        match &self.phase {
            Phase::Idle | Phase::Releasing(_) => {}
            Phase::Acquiring(_) => self.finish(now, LockEvent::Cancelled),
            // Held, so unlock can't fail.
            Phase::Held(_) => {
                let _ = self.unlock(now);
            }
            Phase::Destroying(_) => {
                self.phase = Phase::Idle;
                self.base.out.event(LockEvent::Cancelled);
            }
        }
    }

    /// Deletes the `.lock`, if no live contender remains (Go's `Destroy`). Ends with
    /// [`LockEvent::Destroyed`] or [`LockEvent::Failed`] ([`LockError::InUse`],
    /// [`LockError::Conflict`]).
    pub fn destroy(&mut self, now: Instant) -> Result<(), LockError> {
        self.base.observe(now);
        match self.phase {
            Phase::Idle => {}
            Phase::Held(_) => return Err(LockError::AlreadyHeld),
            _ => return Err(LockError::Busy),
        }
        let pending = self
            .base
            .send(now, &KvList::new(self.options.prefix.clone()), None);
        self.phase = Phase::Destroying(Destroying::List(pending));
        Ok(())
    }

    // ----- driving ---------------------------------------------------------------------------

    // ----- plumbing --------------------------------------------------------------------------

    fn ignore(&self, id: RequestId) {
        tracing::trace!(%id, "ignoring a reply to a request no longer awaited");
    }

    /// Whether the step's reply may grant us a slot: the give-up time waits for it.
    fn deciding(step: &Step) -> bool {
        matches!(step, Step::Cas(_) | Step::Confirm(_))
    }

    fn acquiring(&mut self) -> Option<&mut Acquiring> {
        match &mut self.phase {
            Phase::Acquiring(a) => Some(a),
            _ => None,
        }
    }

    fn held(&mut self) -> Option<&mut Held> {
        match &mut self.phase {
            Phase::Held(h) => Some(h),
            _ => None,
        }
    }

    fn releasing(&mut self) -> Option<&mut Releasing> {
        match &mut self.phase {
            Phase::Releasing(r) => Some(r),
            _ => None,
        }
    }

    /// The session in use and its contender key.
    fn contender(&self) -> Option<(SessionId, Key)> {
        let session = self.base.session.id()?.clone();
        let key = self.options.contender_key(&session).ok()?;
        Some((session, key))
    }

    /// Ends an acquisition or a hold: report `event`, go idle, leave nothing behind, and stop
    /// the session.
    fn finish(&mut self, now: Instant, event: LockEvent) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        if let SessionChoice::Existing(_) = self.options.session {
            // The caller's session lives on, and with it our contender key: delete it, so that
            // the others prune us (after the acquire that may be making it, if in flight).
            match phase {
                Phase::Acquiring(Acquiring {
                    step: Step::Contend(p),
                    ..
                }) => self.stray = Some(p),
                Phase::Acquiring(Acquiring { contended: true, .. }) | Phase::Held(_) => self.clean_up(now),
                _ => {}
            }
        }
        self.base.out.event(event);
        let events = self.base.stop_session(now);
        self.on_session_events(now, events);
    }

    /// Deletes the contender key of the caller's session.
    fn clean_up(&mut self, now: Instant) {
        let SessionChoice::Existing(session) = &self.options.session else {
            return;
        };
        let Ok(key) = self.options.contender_key(session) else {
            return;
        };
        tracing::debug!(%key, "deleting the contender key of an abandoned attempt");
        self.cleanup = Some(self.base.send(now, &KvDelete { key }, None));
    }

    /// An attempt waiting for a cleanup goes on once it is done.
    fn resume_after_cleanup(&mut self, now: Instant) {
        if self.stray.is_none()
            && self.cleanup.is_none()
            && self
                .acquiring()
                .is_some_and(|a| matches!(a.step, Step::AwaitCleanup))
        {
            self.contend(now);
        }
    }

    fn give_up(&mut self, now: Instant) {
        tracing::debug!("try-once: no slot within the wait time");
        self.finish(now, LockEvent::GaveUp);
    }

    fn fail(&mut self, now: Instant, error: LockError) {
        tracing::warn!(%error, "semaphore attempt failed");
        self.finish(now, LockEvent::Failed(error));
    }

    fn lose(&mut self, now: Instant, reason: LossReason) {
        tracing::warn!(?reason, "semaphore slot lost");
        self.finish(now, LockEvent::Lost(reason));
    }

    /// Pauses with backoff after a transient failure, then does `then`; reported, or the end of
    /// the attempt once failures have lasted the error budget.
    fn retry(&mut self, now: Instant, then: Then, why: &str) {
        if let Some(until) = self.pause(now, then) {
            self.record_failure(now, why, until);
        }
    }

    /// Pauses with backoff, then does `then`: the pause's end, if acquiring.
    fn pause(&mut self, now: Instant, then: Then) -> Option<Instant> {
        let rng = &mut self.base.rng;
        let a = match &mut self.phase {
            Phase::Acquiring(a) => Some(a),
            _ => None,
        }?;
        let until = now + a.backoff.next(rng);
        if then == Then::Read {
            a.index = 0;
        }
        a.step = Step::Pause { until, then };
        Some(until)
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

    // ----- session -------------------------------------------------------------------------

    fn on_session(&mut self, now: Instant, events: Vec<SessionEvent>) {
        for event in events {
            match (event, &self.phase) {
                (SessionEvent::Ready(_), Phase::Acquiring(a)) if matches!(a.step, Step::AwaitSession) => {
                    if let Some(a) = self.acquiring() {
                        a.index = 0;
                        a.step = Step::AwaitCleanup;
                        a.failures.progressed();
                    }
                    self.resume_after_cleanup(now);
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
                    // Not holding anything yet: a fresh session (and contender key) will do.
                    if let Some(a) = self.acquiring() {
                        a.step = Step::AwaitSession;
                    }
                    let events = self.base.start_session(now);
                    self.on_session_events(now, events);
                }
                (
                    SessionEvent::Stopped,
                    Phase::Releasing(Releasing {
                        step: ReleaseStep::Session,
                        failed,
                        ..
                    }),
                ) => {
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

    /// Acquires our contender key `<prefix>/<session>`.
    fn contend(&mut self, now: Instant) {
        let Some(session) = self.base.session.id().cloned() else {
            if let Some(a) = self.acquiring() {
                a.step = Step::AwaitSession;
            }
            return;
        };
        let key = match self.options.contender_key(&session) {
            Ok(key) => key,
            Err(e) => {
                let e = ApiError::Malformed {
                    what: "a session create",
                    problem: format!("the session {session} can't name a contender key: {e}"),
                };
                return self.fail(now, LockError::Session(e));
            }
        };
        let acquire = KvAcquire {
            key,
            session,
            flags: SEMAPHORE_FLAG_VALUE,
            value: self.options.value.clone(),
        };
        let pending = self.base.send(now, &acquire, None);
        if let Some(a) = self.acquiring() {
            a.step = Step::Contend(pending);
            a.contended = true;
        }
    }

    fn on_contend(&mut self, now: Instant, reply: &Reply) {
        match decode::<KvAcquire>(reply) {
            Ok(true) => {
                if let Some(a) = self.acquiring() {
                    a.index = 0;
                    a.failures.progressed();
                }
                self.read(now);
            }
            // Only a lock-delay on the key can refuse it (its name is our session's): it ends.
            Ok(false) => self.retry(now, Then::Contend, "the contender key was refused"),
            Err(Failure::Fatal(e)) if e.is_invalid_session() => {
                tracing::warn!("contend: the session is gone; creating a new one");
                if let Some(a) = self.acquiring() {
                    a.step = Step::AwaitSession;
                }
                let events = self.base.forget_session(now);
                if events.is_empty() && matches!(self.options.session, SessionChoice::Existing(_)) {
                    return self.fail(now, LockError::refused(e));
                }
                self.on_session_events(now, events);
            }
            Err(Failure::Fatal(e)) => self.fail(now, LockError::refused(e)),
            Err(Failure::Transient(why)) => self.retry(now, Then::Contend, &why),
        }
    }

    /// The next list of the prefix: blocking on the last index, or a plain list on index 0.
    fn read(&mut self, now: Instant) {
        let prefix = self.options.prefix.clone();
        let wait_time = self.options.wait_time;
        let Some(a) = self.acquiring() else { return };
        if a.give_up_at.is_some_and(|at| now >= at) {
            return self.give_up(now);
        }
        // With try-once, no read may outlast the give-up time.
        let wait = a
            .give_up_at
            .map_or(wait_time, |at| at.saturating_duration_since(now).min(wait_time))
            .max(Duration::from_millis(1));
        let blocking = Blocking { index: a.index, wait };
        let list = KvList {
            prefix,
            consistency: Consistency::Default,
            blocking: Some(blocking),
        };
        let wait = (blocking.index > 0).then_some(wait);
        let pending = self.base.send(now, &list, wait);
        if let Some(a) = self.acquiring() {
            a.step = Step::Read(pending);
        }
    }

    /// What a listing says: `.lock` with other flags is a conflict; its state is decoded (empty
    /// when missing) and its dead holders pruned.
    fn view(&self, pairs: &[KvPair], session: &SessionId, contender: &Key) -> Result<View, LockError> {
        let lock = find(pairs, &self.lock_key);
        let mut state = match lock {
            None => SemaphoreState::empty(self.options.limit),
            Some(p) if p.flags != SEMAPHORE_FLAG_VALUE => return Err(LockError::Conflict { flags: p.flags }),
            Some(p) => {
                SemaphoreState::decode(&p.value, self.options.limit).map_err(LockError::BadSemaphore)?
            }
        };
        state.prune(pairs);
        Ok(View {
            modify_index: lock.map_or(0, |p| p.modify_index),
            state,
            contender: Contender::of(find(pairs, contender), session),
        })
    }

    fn on_read(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let list = match decode::<KvList>(reply) {
            Ok(list) => list,
            Err(Failure::Transient(why)) => return self.retry(now, Then::Read, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let Some((session, contender)) = self.contender() else {
            return self.retry(now, Then::Contend, "no session to contend with");
        };
        let view = match self.view(&list.value, &session, &contender) {
            Ok(view) => view,
            Err(e) => return self.fail(now, e),
        };
        let limit = self.options.limit;
        if view.state.limit != limit {
            return self.fail(
                now,
                LockError::LimitMismatch {
                    ours: limit,
                    theirs: view.state.limit,
                },
            );
        }
        let wait_time = self.options.wait_time;
        let Some(a) = self.acquiring() else { return };
        let (index, moved) = next_index(a.index, list.meta.index);
        let quick = now.saturating_duration_since(sent.sent_at) < wait_time / 2;
        // A read on index 0 answers at once by design; only a blocking one says anything about
        // the agent's pace.
        let blocked = a.index > 0;
        // No progress, at once: index 0 included (a reply without X-Consul-Index).
        let spinning = !moved && quick;
        a.index = index;
        if !spinning {
            a.failures.progressed();
        }
        if view.contender != Contender::Ours {
            // Our contender key went (an operator): without it the others would prune us at
            // once. Make it again, paced.
            return self.retry(now, Then::Contend, "our contender key is gone");
        }
        if view.state.holds(session.as_str()) {
            // Already a holder (an abandoned attempt's check-and-set landed): the slot is ours.
            return self.confirm(now);
        }
        let full = view.state.holders.len() >= usize::try_from(limit).unwrap_or(usize::MAX);
        if full {
            a.conflicts = 0;
            if spinning {
                return self.retry(
                    now,
                    Then::Read,
                    "a blocking read returned at once without progress",
                );
            }
            if blocked {
                a.backoff.reset();
            }
            return self.read(now);
        }
        if blocked && spinning {
            // Back at once on an index that showed the semaphore full: don't let an agent that
            // says so make us spin through check-and-sets.
            return self.retry(
                now,
                Then::Read,
                "a blocking read returned at once without progress",
            );
        }
        let mut state = view.state;
        state.holders.insert(session.as_str().to_owned(), true);
        let put = KvCasPut {
            key: self.lock_key.clone(),
            cas: view.modify_index,
            flags: SEMAPHORE_FLAG_VALUE,
            value: state.encode(),
        };
        let pending = self.base.send(now, &put, None);
        if let Some(a) = self.acquiring() {
            a.step = Step::Cas(pending);
        }
    }

    fn on_cas(&mut self, now: Instant, reply: &Reply) {
        match decode::<KvCasPut>(reply) {
            Ok(true) => {
                if let Some(a) = self.acquiring() {
                    a.conflicts = 0;
                    a.failures.progressed();
                }
                self.confirm(now);
            }
            Ok(false) => {
                let Some(a) = self.acquiring() else { return };
                a.conflicts = a.conflicts.saturating_add(1);
                if a.conflicts == 1 {
                    // Another contender wrote first: look again at once.
                    a.index = 0;
                    self.read(now);
                } else {
                    // Contention, not a failure of the agent's: paced, not reported.
                    tracing::debug!("check-and-set refused again; pausing");
                    self.pause(now, Then::Read);
                }
            }
            // It may have been applied: the next list tells (we would be a holder).
            Err(Failure::Transient(why)) => self.retry(now, Then::Read, &why),
            Err(Failure::Fatal(e)) => self.fail(now, LockError::refused(e)),
        }
    }

    fn confirm(&mut self, now: Instant) {
        let list = KvList {
            prefix: self.options.prefix.clone(),
            consistency: Consistency::Consistent,
            blocking: None,
        };
        let pending = self.base.send(now, &list, None);
        if let Some(a) = self.acquiring() {
            a.step = Step::Confirm(pending);
        }
    }

    fn on_confirm(&mut self, now: Instant, reply: &Reply) {
        let list = match decode::<KvList>(reply) {
            Ok(list) => list,
            // We may hold a slot: find out before anything else.
            Err(Failure::Transient(why)) => return self.retry(now, Then::Confirm, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let Some((session, contender)) = self.contender() else {
            return self.retry(now, Then::Contend, "no session to contend with");
        };
        let lock = find(&list.value, &self.lock_key).map(|p| (p.modify_index, p.create_index));
        let granted = match (self.view(&list.value, &session, &contender), lock) {
            (Ok(view), Some(lock)) => {
                let ok = view.state.limit == self.options.limit
                    && view.contender == Contender::Ours
                    && view.state.holds(session.as_str());
                ok.then_some(lock)
            }
            _ => None,
        };
        let Some((modify_index, _create_index)) = granted else {
            // Lost between the write and this read, or never written: look again, after a
            // pause, so that an agent that grants and then denies can't make us spin.
            return self.retry(now, Then::Read, "the granted slot does not show our session");
        };
        let token = FencingToken {
            key: self.lock_key.clone(),
            session,
            lock_index: modify_index,
            modify_index,
        };
        tracing::info!(key = %token.key, index = modify_index, "semaphore slot acquired");
        self.base.out.event(LockEvent::Acquired(token.clone()));
        self.phase = Phase::Held(Held {
            token,
            contender,
            watch: Watch::new(list.meta.index, now),
        });
        self.monitor(now);
    }

    // ----- holding -------------------------------------------------------------------------

    fn monitor(&mut self, now: Instant) {
        let wait = self.options.monitor_wait;
        let prefix = self.options.prefix.clone();
        let Some(h) = self.held() else { return };
        let list = KvList {
            prefix,
            consistency: Consistency::Consistent,
            blocking: Some(Blocking {
                index: h.watch.index,
                wait,
            }),
        };
        let wait = (h.watch.index > 0).then_some(wait);
        let pending = self.base.send(now, &list, wait);
        if let Some(h) = self.held() {
            h.watch.step = WatchStep::Read(pending);
        }
    }

    /// Why a listing says the slot is no longer ours, if it does.
    fn loss_in(&self, pairs: &[KvPair], held: &Held) -> Option<LossReason> {
        let session = &held.token.session;
        let lock = find(pairs, &self.lock_key);
        if let Some(p) = lock.filter(|p| p.flags != SEMAPHORE_FLAG_VALUE) {
            return Some(LossReason::Conflict { flags: p.flags });
        }
        match Contender::of(find(pairs, &held.contender), session) {
            Contender::Ours => {}
            Contender::Missing => return Some(LossReason::KeyDeleted),
            Contender::Released => return Some(LossReason::NotHeld),
            Contender::Other(other) => return Some(LossReason::TakenBy(other)),
        }
        let Some(lock) = lock else {
            return Some(LossReason::KeyDeleted);
        };
        match SemaphoreState::decode(&lock.value, self.options.limit) {
            Ok(state) if state.holds(session.as_str()) => None,
            // Taken out of the holders, or a `.lock` we can't read (Go's monitor gives up too).
            _ => Some(LossReason::NotHeld),
        }
    }

    fn on_monitor(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let list = match Watch::trust(decode::<KvList>(reply)) {
            Ok(list) => list,
            Err(failure) => return self.on_monitor_failure(now, failure),
        };
        let Phase::Held(held) = &self.phase else { return };
        if let Some(reason) = self.loss_in(&list.value, held) {
            return self.lose(now, reason);
        }
        let wait = self.options.monitor_wait;
        let Phase::Held(h) = &mut self.phase else { return };
        if h.watch
            .still_held(now, sent, list.meta.index, wait, &mut self.base.rng)
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

    // ----- releasing -----------------------------------------------------------------------

    fn release_read(&mut self, now: Instant) {
        let pending = self.base.send(now, &KvGet::new(self.lock_key.clone()), None);
        if let Some(r) = self.releasing() {
            r.step = ReleaseStep::Read(pending);
        }
    }

    fn on_release_read(&mut self, now: Instant, reply: &Reply) {
        let pair = match decode::<KvGet>(reply) {
            Ok(read) => read.value,
            Err(Failure::Transient(why)) => return self.release_retry(now, false, &why),
            Err(Failure::Fatal(e)) => {
                tracing::warn!(error = %e, "could not read the semaphore's .lock to leave it");
                return self.release_delete(now);
            }
        };
        let limit = self.options.limit;
        let Some(r) = self.releasing() else { return };
        let session = r.session.as_str().to_owned();
        // Nothing of ours to take out: gone, not a semaphore's, or unreadable (the contender
        // key's delete is enough for the others to prune us).
        let Some((pair, mut state)) = pair
            .filter(|p| p.flags == SEMAPHORE_FLAG_VALUE)
            .and_then(|p| Some((SemaphoreState::decode(&p.value, limit).ok()?, p)))
            .map(|(state, p)| (p, state))
        else {
            r.left = true;
            return self.release_delete(now);
        };
        if state.holders.remove(&session).is_none() {
            r.left = true;
            return self.release_delete(now);
        }
        let put = KvCasPut {
            key: self.lock_key.clone(),
            cas: pair.modify_index,
            flags: SEMAPHORE_FLAG_VALUE,
            value: state.encode(),
        };
        let pending = self.base.send(now, &put, None);
        if let Some(r) = self.releasing() {
            r.step = ReleaseStep::Cas(pending);
        }
    }

    fn on_release_cas(&mut self, now: Instant, reply: &Reply) {
        match decode::<KvCasPut>(reply) {
            Ok(true) => {
                if let Some(r) = self.releasing() {
                    r.left = true;
                }
                self.release_delete(now);
            }
            Ok(false) => self.release_retry(now, true, "the .lock changed under us"),
            Err(Failure::Transient(why)) => self.release_retry(now, false, &why),
            Err(Failure::Fatal(e)) => {
                tracing::warn!(error = %e, "could not take our session out of the .lock");
                self.release_delete(now);
            }
        }
    }

    /// Reads the `.lock` again (at once after a first check-and-set conflict, else after a
    /// pause), or settles for deleting the contender key after enough attempts.
    fn release_retry(&mut self, now: Instant, conflict: bool, why: &str) {
        let rng = &mut self.base.rng;
        let Some(r) = (match &mut self.phase {
            Phase::Releasing(r) => Some(r),
            _ => None,
        }) else {
            return;
        };
        r.attempts = r.attempts.saturating_add(1);
        r.last_failure = Some(why.to_owned());
        if r.attempts >= RELEASE_ATTEMPTS || now >= r.give_up_at {
            tracing::warn!(%why, "could not take our session out of the .lock; deleting our contender key");
            return self.release_delete(now);
        }
        if conflict && r.attempts == 1 {
            return self.release_read(now);
        }
        let pause = r.backoff.next(rng);
        tracing::debug!(%why, ?pause, "leaving the .lock: retrying");
        r.step = ReleaseStep::Pause(now + pause);
    }

    fn release_delete(&mut self, now: Instant) {
        let Some(r) = self.releasing() else { return };
        let delete = KvDelete {
            key: r.contender.clone(),
        };
        let pending = self.base.send(now, &delete, None);
        if let Some(r) = self.releasing() {
            r.step = ReleaseStep::Delete(pending);
        }
    }

    fn on_release_delete(&mut self, now: Instant, reply: &Reply) {
        let deleted = decode::<KvDelete>(reply);
        if let Err(why) = &deleted {
            // An owned session's destroy deletes it anyway (behavior `delete`).
            tracing::warn!(?why, "could not delete our contender key");
        }
        if let Some(r) = self.releasing() {
            r.step = ReleaseStep::Session;
            if let (Err(why), false) = (deleted, r.left) {
                // Neither out of the holders nor rid of the contender key: the slot stays
                // counted until the session's destroy lands or it expires.
                let why = match why {
                    Failure::Transient(why) => why,
                    Failure::Fatal(e) => e.to_string(),
                };
                let last = match r.last_failure.take() {
                    Some(earlier) => format!("{earlier}; then the contender key's delete: {why}"),
                    None => why,
                };
                r.failed = Some(LockError::ReleaseUnconfirmed {
                    attempts: r.attempts.saturating_add(1),
                    last,
                });
            }
        }
        // If the session ended meanwhile (invalidated), `stop` reports it stopped at once.
        let events = self.base.stop_session(now);
        self.on_session_events(now, events);
    }

    // ----- destroying ----------------------------------------------------------------------

    fn on_destroy_list(&mut self, now: Instant, reply: &Reply) {
        let pairs = match decode::<KvList>(reply) {
            Ok(QueryReply { value, .. }) => value,
            Err(Failure::Transient(why)) => {
                return self.end_destroy(LockEvent::Failed(LockError::Unavailable(why)));
            }
            Err(Failure::Fatal(e)) => return self.end_destroy(LockEvent::Failed(LockError::refused(e))),
        };
        let Some(lock) = find(&pairs, &self.lock_key) else {
            return self.end_destroy(LockEvent::Destroyed);
        };
        if lock.flags != SEMAPHORE_FLAG_VALUE {
            let flags = lock.flags;
            return self.end_destroy(LockEvent::Failed(LockError::Conflict { flags }));
        }
        let mut state = match SemaphoreState::decode(&lock.value, self.options.limit) {
            Ok(state) => state,
            Err(e) => return self.end_destroy(LockEvent::Failed(LockError::BadSemaphore(e))),
        };
        state.prune(&pairs);
        // A live holder, or a live contender waiting for a slot: in use.
        let children = format!("{}/", self.options.prefix.as_str().trim_end_matches('/'));
        let contending = pairs
            .iter()
            .any(|p| p.key != lock.key && p.key.starts_with(&children) && p.session.is_some());
        if !state.holders.is_empty() || contending {
            return self.end_destroy(LockEvent::Failed(LockError::InUse));
        }
        let delete = KvCasDelete {
            key: self.lock_key.clone(),
            cas: lock.modify_index,
        };
        let pending = self.base.send(now, &delete, None);
        self.phase = Phase::Destroying(Destroying::Delete(pending));
    }

    fn on_destroy_delete(&mut self, reply: &Reply) {
        let event = match decode::<KvCasDelete>(reply) {
            Ok(true) => LockEvent::Destroyed,
            Ok(false) => LockEvent::Failed(LockError::InUse),
            Err(Failure::Transient(why)) => LockEvent::Failed(LockError::Unavailable(why)),
            Err(Failure::Fatal(e)) => LockEvent::Failed(LockError::refused(e)),
        };
        self.end_destroy(event);
    }

    fn end_destroy(&mut self, event: LockEvent) {
        self.phase = Phase::Idle;
        self.base.out.event(event);
    }
}

holding_surface!(SemaphoreMachine);

impl Phases for SemaphoreMachine {
    fn base(&self) -> &Base {
        &self.base
    }

    fn base_mut(&mut self) -> &mut Base {
        &mut self.base
    }

    fn phase_pendings(&self, all: &mut Pendings) {
        all.extend(self.stray);
        all.extend(self.cleanup);
        match &self.phase {
            Phase::Acquiring(a) => {
                if let Step::Contend(p) | Step::Read(p) | Step::Cas(p) | Step::Confirm(p) = a.step {
                    all.push(p);
                }
            }
            Phase::Held(h) => all.extend(h.watch.pending()),
            Phase::Destroying(Destroying::List(p) | Destroying::Delete(p)) => all.push(*p),
            Phase::Releasing(r) => {
                if let ReleaseStep::Read(p) | ReleaseStep::Cas(p) | ReleaseStep::Delete(p) = r.step {
                    all.push(p);
                }
            }
            Phase::Idle => {}
        }
    }

    fn phase_timer(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Acquiring(a) => {
                let pause = match a.step {
                    Step::Pause { until, .. } => Some(until),
                    _ => None,
                };
                let give_up = a.give_up_at.filter(|_| !Self::deciding(&a.step));
                [pause, give_up].into_iter().flatten().min()
            }
            Phase::Held(h) => h.watch.timer(),
            Phase::Releasing(Releasing {
                step: ReleaseStep::Pause(until),
                ..
            }) => Some(*until),
            _ => None,
        }
    }

    fn phase_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Acquiring(a) => {
                if a.give_up_at.is_some_and(|at| now >= at) && !Self::deciding(&a.step) {
                    self.give_up(now);
                    return;
                }
                if let Step::Pause { until, then } = a.step {
                    if now >= until {
                        match then {
                            Then::Contend => self.contend(now),
                            Then::Read => self.read(now),
                            Then::Confirm => self.confirm(now),
                        }
                    }
                }
            }
            Phase::Held(h) if h.watch.due(now) => self.monitor(now),
            Phase::Releasing(Releasing {
                step: ReleaseStep::Pause(until),
                ..
            }) if now >= *until => self.release_read(now),
            _ => {}
        }
    }

    fn phase_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        if self.stray.is_some_and(|p| p.is(id)) {
            self.stray = None;
            // Refused: no key was made. Anything else may have made it.
            if !matches!(decode::<KvAcquire>(&reply), Ok(false)) {
                self.clean_up(now);
            }
            self.resume_after_cleanup(now);
            return;
        }
        if self.cleanup.is_some_and(|p| p.is(id)) {
            self.cleanup = None;
            if let Err(why) = decode::<KvDelete>(&reply) {
                tracing::warn!(?why, "could not delete the contender key of an abandoned attempt");
            }
            self.resume_after_cleanup(now);
            return;
        }
        match &self.phase {
            Phase::Acquiring(a) => match a.step {
                Step::Contend(p) if p.is(id) => self.on_contend(now, &reply),
                Step::Read(p) if p.is(id) => self.on_read(now, p, &reply),
                Step::Cas(p) if p.is(id) => self.on_cas(now, &reply),
                Step::Confirm(p) if p.is(id) => self.on_confirm(now, &reply),
                _ => self.ignore(id),
            },
            Phase::Held(h) => match h.watch.step {
                WatchStep::Read(p) if p.is(id) => self.on_monitor(now, p, &reply),
                WatchStep::Read(_) | WatchStep::Pause(_) => self.ignore(id),
            },
            Phase::Releasing(r) => match r.step {
                ReleaseStep::Read(p) if p.is(id) => self.on_release_read(now, &reply),
                ReleaseStep::Cas(p) if p.is(id) => self.on_release_cas(now, &reply),
                ReleaseStep::Delete(p) if p.is(id) => self.on_release_delete(now, &reply),
                _ => self.ignore(id),
            },
            Phase::Destroying(Destroying::List(p)) if p.is(id) => self.on_destroy_list(now, &reply),
            Phase::Destroying(Destroying::Delete(p)) if p.is(id) => self.on_destroy_delete(&reply),
            _ => self.ignore(id),
        }
    }

    fn on_session_events(&mut self, now: Instant, events: Vec<SessionEvent>) {
        self.on_session(now, events);
    }

    fn phase_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle) && self.stray.is_none() && self.cleanup.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key: &str, session: Option<&str>) -> KvPair {
        KvPair {
            key: key.to_owned(),
            create_index: 1,
            modify_index: 1,
            lock_index: 0,
            flags: SEMAPHORE_FLAG_VALUE,
            value: Vec::new(),
            session: session.and_then(|s| SessionId::new(s).ok()),
        }
    }

    #[test]
    fn state_is_written_as_go_writes_it() {
        let mut state = SemaphoreState::empty(2);
        assert_eq!(state.encode(), br#"{"Limit":2,"Holders":{}}"#);
        state.holders.insert("b".to_owned(), true);
        state.holders.insert("a".to_owned(), true);
        assert_eq!(state.encode(), br#"{"Limit":2,"Holders":{"a":true,"b":true}}"#);
        assert_eq!(SemaphoreState::decode(&state.encode(), 9), Ok(state));
    }

    #[test]
    fn state_is_read_as_go_reads_it() {
        let read = |s: &str| SemaphoreState::decode(s.as_bytes(), 3);
        assert_eq!(read(""), Ok(SemaphoreState::empty(3)));
        assert_eq!(read("null"), Ok(SemaphoreState::empty(0)));
        assert_eq!(read("{}"), Ok(SemaphoreState::empty(0)));
        let state = read(r#"{"limit":2,"holders":{"a":true,"b":false,"c":null},"Other":1}"#);
        let holders = state
            .as_ref()
            .map(|s| s.holders.keys().cloned().collect::<Vec<_>>());
        assert_eq!(holders, Ok(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]));
        assert_eq!(state.map(|s| (s.limit, s.holds("b"))), Ok((2, true)));
        for bad in [
            "[]",
            "1",
            r#"{"Limit":-1}"#,
            r#"{"Limit":1.5}"#,
            r#"{"Holders":[]}"#,
            "{",
            r#"{"Holders":{"a":1}}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pruning_keeps_holders_whose_session_holds_a_key() {
        let mut state = SemaphoreState::empty(3);
        for s in ["a", "b", "c"] {
            state.holders.insert(s.to_owned(), true);
        }
        state.prune(&[pair("p/a", Some("a")), pair("p/b", None), pair("p/x", Some("c"))]);
        assert_eq!(
            state.holders.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a", "c"]
        );
    }
}
