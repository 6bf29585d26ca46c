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
    ApiError, Blocking, Consistency, Key, KvAcquire, KvCasPut, KvDelete, KvGet, KvList, KvPair, SessionId,
};
use crate::machine::backoff::Backoff;
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::Watch;
use crate::machine::holder::{Acquiring, Held, Holder, Kind, Phase, ReleaseStep, Releasing, Step};
use crate::machine::outbox::Pending;
use crate::machine::{
    FencingToken, LockError, LockEvent, LossReason, OptionsError, Reply, SEMAPHORE_FLAG_VALUE,
    SemaphoreOptions, SessionChoice,
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
pub type SemaphoreMachine = Holder<SemaphoreKind>;

/// The semaphore's part of a [`SemaphoreMachine`]: the key of its `.lock`.
#[derive(Debug)]
pub struct SemaphoreKind {
    lock_key: Key,
}

/// The semaphore's requests while acquiring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Acquiring our contender key.
    Contend,
    /// A (blocking) list of the prefix.
    Read,
    /// The check-and-set adding us to the `.lock`.
    Cas,
    /// The consistent list after a granted check-and-set (or finding us a holder already).
    Confirm,
}

/// What a waiting contender keeps.
#[derive(Clone, Debug, Default)]
pub struct Wait {
    /// Check-and-set refusals since the last list that showed the semaphore full: the first is
    /// contention and is retried at once, the next ones are paced.
    conflicts: u32,
    /// Whether this attempt sent a contender acquire (so the key may exist).
    contended: bool,
}

/// The semaphore's release requests.
#[derive(Clone, Copy, Debug)]
pub enum Give {
    /// Reading the `.lock`.
    Read,
    /// Taking our session out of it.
    Cas,
    /// Deleting our contender key.
    Delete,
}

/// What a release keeps.
#[derive(Clone, Debug)]
pub struct Leave {
    session: SessionId,
    contender: Key,
    /// Our slot is no longer counted: we are out of the `.lock`'s holders (or never were in
    /// it). Else only the contender key's delete frees it, since the others prune a holder
    /// whose contender key is gone.
    left: bool,
    /// The last failure of a step that would have freed the slot.
    last_failure: Option<String>,
}

/// With the caller's session, whose life goes on after an attempt: what the attempt leaves.
#[derive(Clone, Debug)]
pub enum Chore {
    /// A contender acquire abandoned in flight: if it made the key, the key must go, since no
    /// session destroy will take it.
    Contend,
    /// The delete of the contender key of an abandoned attempt or a lost slot, so that the
    /// others prune us.
    Delete,
}

impl Holder<SemaphoreKind> {
    /// A machine for `options`, sending requests for the agent `config` describes. The options
    /// are validated here.
    pub fn new(
        config: crate::api::ClientConfig,
        options: SemaphoreOptions,
    ) -> Result<SemaphoreMachine, OptionsError> {
        Holder::build(config, options, |options: &SemaphoreOptions| SemaphoreKind {
            lock_key: options.lock_key(),
        })
    }

    /// The session in use and its contender key.
    fn contender(&self) -> Option<(SessionId, Key)> {
        let session = self.base.session.id()?.clone();
        let key = self.options.contender_key(&session).ok()?;
        Some((session, key))
    }

    /// Deletes the contender key of the caller's session.
    fn clean_up(&mut self, now: Instant) -> Option<(Chore, Pending)> {
        let SessionChoice::Existing(session) = &self.options.hold.session else {
            return None;
        };
        let key = self.options.contender_key(session).ok()?;
        tracing::debug!(%key, "deleting the contender key of an abandoned attempt");
        Some((Chore::Delete, self.base.send(now, &KvDelete { key }, None)))
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
            value: self.options.hold.value.clone(),
        };
        self.send_ask(now, Ask::Contend, &acquire, None);
        if let Some(a) = self.acquiring() {
            a.wait.contended = true;
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
            Ok(false) => self.retry(now, Ask::Contend, "the contender key was refused"),
            Err(Failure::Fatal(e)) if e.is_invalid_session() => self.session_gone(now, e),
            Err(Failure::Fatal(e)) => self.fail(now, LockError::refused(e)),
            Err(Failure::Transient(why)) => self.retry(now, Ask::Contend, &why),
        }
    }

    /// What a listing says: `.lock` with other flags is a conflict; its state is decoded (empty
    /// when missing) and its dead holders pruned.
    fn view(&self, pairs: &[KvPair], session: &SessionId, contender: &Key) -> Result<View, LockError> {
        let limit = self.options.limit;
        let lock = find(pairs, &self.kind.lock_key);
        let mut state = match lock {
            None => SemaphoreState::empty(limit),
            Some(p) if p.flags != SEMAPHORE_FLAG_VALUE => {
                return Err(LockError::SemaphoreConflict { flags: p.flags });
            }
            Some(p) => SemaphoreState::decode(&p.value, limit).map_err(LockError::BadSemaphore)?,
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
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Read, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let Some((session, contender)) = self.contender() else {
            return self.retry(now, Ask::Contend, "no session to contend with");
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
        let pace = self.take_index(now, sent, list.meta.index);
        if view.contender != Contender::Ours {
            // Our contender key went (an operator): without it the others would prune us at
            // once. Make it again, paced.
            return self.retry(now, Ask::Contend, "our contender key is gone");
        }
        if view.state.holds(session.as_str()) {
            // Already a holder (an abandoned attempt's check-and-set landed): the slot is ours.
            return self.confirm(now);
        }
        let Some(a) = self.acquiring() else { return };
        let full = view.state.holders.len() >= usize::try_from(limit).unwrap_or(usize::MAX);
        if full {
            a.wait.conflicts = 0;
            if pace.spinning {
                return self.retry_spinning(now);
            }
            if pace.blocked {
                a.backoff.reset();
            }
            return self.read(now);
        }
        if pace.blocked && pace.spinning {
            // Back at once on an index that showed the semaphore full: an agent that says so
            // must not make us spin through check-and-sets.
            return self.retry_spinning(now);
        }
        let mut state = view.state;
        state.holders.insert(session.as_str().to_owned(), true);
        let put = KvCasPut {
            key: self.kind.lock_key.clone(),
            cas: view.modify_index,
            flags: SEMAPHORE_FLAG_VALUE,
            value: state.encode(),
        };
        self.send_ask(now, Ask::Cas, &put, None);
    }

    fn on_cas(&mut self, now: Instant, reply: &Reply) {
        match decode::<KvCasPut>(reply) {
            Ok(true) => {
                if let Some(a) = self.acquiring() {
                    a.wait.conflicts = 0;
                    a.failures.progressed();
                }
                self.confirm(now);
            }
            Ok(false) => {
                let Some(a) = self.acquiring() else { return };
                a.wait.conflicts = a.wait.conflicts.saturating_add(1);
                if a.wait.conflicts == 1 {
                    // Another contender wrote first: look again at once.
                    a.index = 0;
                    self.read(now);
                } else {
                    // Contention, not a failure of the agent's: paced, not reported.
                    tracing::debug!("check-and-set refused again; pausing");
                    self.pause(now, Ask::Read);
                }
            }
            // It may have been applied: the next list tells (we would be a holder).
            Err(Failure::Transient(why)) => self.retry(now, Ask::Read, &why),
            Err(Failure::Fatal(e)) => self.fail(now, LockError::refused(e)),
        }
    }

    fn confirm(&mut self, now: Instant) {
        let list = SemaphoreKind::read(self, Consistency::Consistent, None);
        self.send_ask(now, Ask::Confirm, &list, None);
    }

    fn on_confirm(&mut self, now: Instant, reply: &Reply) {
        let list = match decode::<KvList>(reply) {
            Ok(list) => list,
            // We may hold a slot: find out before anything else.
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Confirm, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let Some((session, contender)) = self.contender() else {
            return self.retry(now, Ask::Contend, "no session to contend with");
        };
        let lock = find(&list.value, &self.kind.lock_key).map(|p| p.modify_index);
        let granted = match (self.view(&list.value, &session, &contender), lock) {
            (Ok(view), Some(lock)) => {
                let ok = view.state.limit == self.options.limit
                    && view.contender == Contender::Ours
                    && view.state.holds(session.as_str());
                ok.then_some(lock)
            }
            _ => None,
        };
        let Some(modify_index) = granted else {
            // Lost between the write and this read, or never written: look again, after a
            // pause, so that an agent that grants and then denies can't make us spin.
            return self.retry(now, Ask::Read, "the granted slot does not show our session");
        };
        let token = FencingToken {
            key: self.kind.lock_key.clone(),
            session,
            lock_index: modify_index,
            modify_index,
        };
        tracing::info!(key = %token.key, index = modify_index, "semaphore slot acquired");
        self.base.out.event(LockEvent::Acquired(token.clone()));
        self.phase = Phase::Held(Held {
            token,
            watch: Watch::new(list.meta.index, now),
            hold: contender,
        });
        self.monitor(now);
    }

    // ----- holding -------------------------------------------------------------------------

    /// Why a listing says the slot is no longer ours, if it does.
    fn loss_in_listing(&self, pairs: &[KvPair], held: &Held<SemaphoreKind>) -> Option<LossReason> {
        let session = &held.token.session;
        let lock = find(pairs, &self.kind.lock_key);
        if let Some(p) = lock.filter(|p| p.flags != SEMAPHORE_FLAG_VALUE) {
            return Some(LossReason::Conflict { flags: p.flags });
        }
        match Contender::of(find(pairs, &held.hold), session) {
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

    // ----- releasing -----------------------------------------------------------------------

    fn release_read(&mut self, now: Instant) {
        let get = KvGet::new(self.kind.lock_key.clone());
        self.send_give(now, Give::Read, &get);
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
        let lock_key = self.kind.lock_key.clone();
        let Some(r) = self.releasing() else { return };
        let session = r.leave.session.as_str().to_owned();
        // Nothing of ours to take out: gone, not a semaphore's, or unreadable (the contender
        // key's delete is enough for the others to prune us).
        let Some((pair, mut state)) = pair
            .filter(|p| p.flags == SEMAPHORE_FLAG_VALUE)
            .and_then(|p| Some((SemaphoreState::decode(&p.value, limit).ok()?, p)))
            .map(|(state, p)| (p, state))
        else {
            r.leave.left = true;
            return self.release_delete(now);
        };
        if state.holders.remove(&session).is_none() {
            r.leave.left = true;
            return self.release_delete(now);
        }
        let put = KvCasPut {
            key: lock_key,
            cas: pair.modify_index,
            flags: SEMAPHORE_FLAG_VALUE,
            value: state.encode(),
        };
        self.send_give(now, Give::Cas, &put);
    }

    fn on_release_cas(&mut self, now: Instant, reply: &Reply) {
        match decode::<KvCasPut>(reply) {
            Ok(true) => {
                if let Some(r) = self.releasing() {
                    r.leave.left = true;
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
        let Phase::Releasing(r) = &mut self.phase else {
            return;
        };
        r.attempts = r.attempts.saturating_add(1);
        r.leave.last_failure = Some(why.to_owned());
        if r.attempts >= RELEASE_ATTEMPTS || now >= r.give_up_at {
            tracing::warn!(%why, "could not take our session out of the .lock; deleting our contender key");
            return self.release_delete(now);
        }
        if conflict && r.attempts == 1 {
            return self.release_read(now);
        }
        let pause = r.backoff.next(&mut self.base.rng);
        tracing::debug!(%why, ?pause, "leaving the .lock: retrying");
        r.step = ReleaseStep::Pause(now + pause);
    }

    fn release_delete(&mut self, now: Instant) {
        let Some(r) = self.releasing() else { return };
        let delete = KvDelete {
            key: r.leave.contender.clone(),
        };
        self.send_give(now, Give::Delete, &delete);
    }

    fn on_release_delete(&mut self, now: Instant, reply: &Reply) {
        let deleted = decode::<KvDelete>(reply);
        if let Err(why) = &deleted {
            // An owned session's destroy deletes it anyway (behavior `delete`).
            tracing::warn!(?why, "could not delete our contender key");
        }
        let Some(r) = self.releasing() else { return };
        let failed = match (deleted, r.leave.left) {
            (Err(why), false) => {
                // Neither out of the holders nor rid of the contender key: the slot stays
                // counted until the session's destroy lands or it expires.
                let why = match why {
                    Failure::Transient(why) => why,
                    Failure::Fatal(e) => e.to_string(),
                };
                let last = match r.leave.last_failure.take() {
                    Some(earlier) => format!("{earlier}; then the contender key's delete: {why}"),
                    None => why,
                };
                Some(LockError::ReleaseUnconfirmed {
                    attempts: r.attempts.saturating_add(1),
                    last,
                })
            }
            _ => None,
        };
        self.released(now, failed);
    }

    // ----- destroying ----------------------------------------------------------------------

    /// Whether the `.lock` may be deleted: not when a live contender remains, holding or
    /// waiting.
    fn destroy_verdict_in(&self, pairs: &[KvPair]) -> Result<Option<u64>, LockError> {
        let Some(lock) = find(pairs, &self.kind.lock_key) else {
            return Ok(None);
        };
        if lock.flags != SEMAPHORE_FLAG_VALUE {
            return Err(LockError::SemaphoreConflict { flags: lock.flags });
        }
        let mut state =
            SemaphoreState::decode(&lock.value, self.options.limit).map_err(LockError::BadSemaphore)?;
        state.prune(pairs);
        let children = format!("{}/", self.options.prefix.as_str().trim_end_matches('/'));
        let contending = pairs
            .iter()
            .any(|p| p.key != lock.key && p.key.starts_with(&children) && p.session.is_some());
        if !state.holders.is_empty() || contending {
            return Err(LockError::SemaphoreInUse);
        }
        Ok(Some(lock.modify_index))
    }
}

impl Kind for SemaphoreKind {
    type Options = SemaphoreOptions;
    type Ask = Ask;
    type Wait = Wait;
    type Hold = Key;
    type Give = Give;
    type Leave = Leave;
    type Chore = Chore;
    type Read = KvList;
    type Seen = Vec<KvPair>;
    const READ: Ask = Ask::Read;
    const IN_USE: LockError = LockError::SemaphoreInUse;

    fn read(h: &SemaphoreMachine, consistency: Consistency, blocking: Option<Blocking>) -> KvList {
        KvList {
            prefix: h.options.prefix.clone(),
            consistency,
            blocking,
        }
    }

    fn on_ready(h: &mut SemaphoreMachine, now: Instant) {
        // The caller's session: the contender key of an abandoned attempt may be going away;
        // making it again before that lands could lose it.
        if h.chore.is_some() {
            if let Some(a) = h.acquiring() {
                a.step = Step::AwaitCleanup { then: Ask::Contend };
            }
            return;
        }
        h.contend(now);
    }

    fn ask(h: &mut SemaphoreMachine, now: Instant, ask: Ask) {
        match ask {
            Ask::Contend => h.contend(now),
            Ask::Read => h.read(now),
            // A check-and-set is never sent again as it was (the `.lock` may have moved): it
            // follows a fresh list.
            Ask::Cas => h.read(now),
            Ask::Confirm => h.confirm(now),
        }
    }

    fn on_answer(h: &mut SemaphoreMachine, now: Instant, ask: Ask, sent: Pending, reply: &Reply) {
        match ask {
            Ask::Contend => h.on_contend(now, reply),
            Ask::Read => h.on_read(now, sent, reply),
            Ask::Cas => h.on_cas(now, reply),
            Ask::Confirm => h.on_confirm(now, reply),
        }
    }

    fn deciding(ask: Ask) -> bool {
        matches!(ask, Ask::Cas | Ask::Confirm)
    }

    fn loss_in(h: &SemaphoreMachine, held: &Held<SemaphoreKind>, seen: &Vec<KvPair>) -> Option<LossReason> {
        h.loss_in_listing(seen, held)
    }

    fn release(h: &mut SemaphoreMachine, now: Instant, held: Held<SemaphoreKind>) {
        h.phase = Phase::Releasing(Releasing {
            step: ReleaseStep::Session,
            attempts: 0,
            give_up_at: now + h.options.hold.request_timeout,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
            leave: Leave {
                session: held.token.session,
                contender: held.hold,
                left: false,
                last_failure: None,
            },
            failed: None,
        });
        h.release_read(now);
    }

    fn on_give(h: &mut SemaphoreMachine, now: Instant, give: Give, reply: &Reply) {
        match give {
            Give::Read => h.on_release_read(now, reply),
            Give::Cas => h.on_release_cas(now, reply),
            Give::Delete => h.on_release_delete(now, reply),
        }
    }

    fn release_again(h: &mut SemaphoreMachine, now: Instant) {
        h.release_read(now);
    }

    fn destroy_verdict(h: &SemaphoreMachine, seen: &Vec<KvPair>) -> Result<Option<u64>, LockError> {
        h.destroy_verdict_in(seen)
    }

    fn destroy_key(h: &SemaphoreMachine) -> Key {
        h.kind.lock_key.clone()
    }

    fn on_end(h: &mut SemaphoreMachine, now: Instant, ended: &Phase<SemaphoreKind>) {
        // The caller's session lives on, and with it our contender key: delete it, so that the
        // others prune us (after the acquire that may be making it, if in flight).
        if !h.base.session.is_callers() {
            return;
        }
        let chore = match ended {
            Phase::Acquiring(Acquiring {
                step: Step::Sent(Ask::Contend, pending),
                ..
            }) => Some((Chore::Contend, *pending)),
            Phase::Acquiring(Acquiring {
                wait: Wait { contended: true, .. },
                ..
            })
            | Phase::Held(_) => h.clean_up(now),
            _ => None,
        };
        if chore.is_some() {
            h.chore = chore;
        }
    }

    fn on_chore(
        h: &mut SemaphoreMachine,
        now: Instant,
        chore: Chore,
        reply: &Reply,
    ) -> Option<(Chore, Pending)> {
        match chore {
            // Refused: no key was made. Anything else may have made it.
            Chore::Contend if !matches!(decode::<KvAcquire>(reply), Ok(false)) => h.clean_up(now),
            Chore::Contend => None,
            Chore::Delete => {
                if let Err(why) = decode::<KvDelete>(reply) {
                    tracing::warn!(?why, "could not delete the contender key of an abandoned attempt");
                }
                None
            }
        }
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
