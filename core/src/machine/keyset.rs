//! Many lock keys on one session: [`KeySetMachine`].
//!
//! A session may hold any number of keys, and everything a hold costs besides the keys' own
//! writes belongs to the session: one renewal per TTL/2 and, here, a fixed number of blocking
//! reads whatever the number of keys (see ARCHITECTURE.md, "Many keys on one session"):
//!
//! - the session, by a blocking read of `/v1/session/info/<id>`: its invalidation on the server
//!   (an operator's destroy, a failed health check) is the loss of every key, reported at once
//!   rather than at the next renewal;
//! - the keys, by one blocking `?recurse` read per watched prefix, at most
//!   [`KeySetOptions::max_watches`] of them, covering every key (the keys' parent folders,
//!   merged on their longest common prefixes until few enough are left). A listing shows each
//!   key's session and flags, so a delete, a release by someone else or an overwrite with
//!   other flags is that key's loss alone.
//!
//! Keys are taken by lock transactions of up to [`MAX_TXN_OPS`] operations. Consul runs a
//! transaction all or nothing and names every refused operation; the refused keys are reported
//! as such and the rest go out again in the next batch. A key set never waits for a held key:
//! a key another session holds is reported [`Refusal::Held`], and the caller asks again when it
//! likes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::api::{
    BatchOutcome, BatchVerb, Blocking, ClientConfig, Consistency, Key, KeyError, KvBatchTxn, KvList, KvPair,
    LockRefusal, MAX_TXN_OPS, QueryReply, SessionId, SessionInfo,
};
use crate::machine::backoff::Backoff;
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::{Base, Failures, Watch, WatchStep};
use crate::machine::outbox::{Pending, Pendings};
use crate::machine::session::{SessionEvent, SessionLoss};
use crate::machine::{
    Action, AfterInvalidation, FencingToken, HoldOptions, LOCK_FLAG_VALUE, LockError, LossReason,
    OptionsError, Reply, RequestId, Retry, SessionOptions, read,
};

/// What a [`KeySetMachine`] is made with.
///
/// `hold` carries what every holder has (value, session, monitor and retry settings, request
/// timeout, error budget, seed); its `wait_time` and `try_once` do not apply, since a key set
/// never waits for a held key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySetOptions {
    /// The value written to every key on acquire and on release, the session, and the monitor
    /// and retry settings.
    pub hold: HoldOptions,
    /// The most prefixes watched by blocking reads (default 4): the keys' monitoring costs at
    /// most this many reads in flight, plus one for the session, however many keys are held.
    pub max_watches: usize,
    /// The most keys the set takes (default 100,000).
    pub max_keys: usize,
    /// The most transactions in flight at once (default 4).
    pub max_batches_in_flight: usize,
}

impl KeySetOptions {
    /// The session name, after Go's lock's.
    pub const DEFAULT_SESSION_NAME: &'static str = "Consul API Lock (key set)";
    /// The default of [`KeySetOptions::max_watches`].
    pub const DEFAULT_MAX_WATCHES: usize = 4;
    /// The default of [`KeySetOptions::max_keys`].
    pub const DEFAULT_MAX_KEYS: usize = 100_000;
    /// The default of [`KeySetOptions::max_batches_in_flight`].
    pub const DEFAULT_MAX_BATCHES: usize = 4;

    /// Defaults: a session of Go's TTL (15 s) and lock-delay, the defaults above.
    pub fn new() -> KeySetOptions {
        KeySetOptions {
            hold: HoldOptions::new(SessionOptions {
                name: Self::DEFAULT_SESSION_NAME.to_owned(),
                ..SessionOptions::default()
            }),
            max_watches: Self::DEFAULT_MAX_WATCHES,
            max_keys: Self::DEFAULT_MAX_KEYS,
            max_batches_in_flight: Self::DEFAULT_MAX_BATCHES,
        }
    }

    /// Checks every option.
    pub fn validate(&self) -> Result<(), OptionsError> {
        self.hold.validate(AfterInvalidation::LockDelay)?;
        // Each batch carries the value once per key: a value this large would leave no room
        // for the keys in Consul's 512 KiB transaction body.
        if self.hold.value.len() > MAX_VALUE {
            return Err(OptionsError::ValueTooLarge {
                len: self.hold.value.len(),
            });
        }
        for (name, value) in [
            ("max_watches", self.max_watches),
            ("max_keys", self.max_keys),
            ("max_batches_in_flight", self.max_batches_in_flight),
        ] {
            if value == 0 {
                return Err(OptionsError::Zero { name });
            }
        }
        Ok(())
    }
}

impl Default for KeySetOptions {
    fn default() -> KeySetOptions {
        KeySetOptions::new()
    }
}

/// The largest value a key set writes: a quarter of Consul's transaction body limit, so a batch
/// always has room for at least one key (batches are cut by size as well as by count).
const MAX_VALUE: usize = 64 * 1024;

/// What a batch's body may take (Consul refuses more than 512 KiB).
const MAX_BATCH_BYTES: usize = 384 * 1024;

/// A call the key set can't take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// No keys were given.
    #[error("no keys given")]
    NoKeys,
    /// A key is not a usable key.
    #[error("invalid key {key:?}")]
    Key {
        /// The key as given (truncated).
        key: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// A key was given twice in one call.
    #[error("the key {0:?} is given twice")]
    Duplicate(String),
    /// A key is already in the set (held, or being acquired or released).
    #[error("the key {0:?} is already in the set")]
    AlreadyInSet(String),
    /// The set would hold more keys than [`KeySetOptions::max_keys`].
    #[error("the set would have {count} keys; at most {limit} are allowed (max_keys)")]
    TooMany {
        /// The keys the set would have.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// `release` of a key the set does not hold.
    #[error("the key {0:?} is not held by the set")]
    NotHeld(String),
    /// The set is closing: no key is taken or given up any more.
    #[error("the key set is closing")]
    Closing,
}

/// Why a key was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another session holds it.
    Held,
    /// Its lock-delay is in force (its last holder's session was invalidated lately): ask again
    /// after the lock-delay.
    LockDelay,
    /// It exists with other flags (a plain key, a semaphore's): Go's "Existing key does not
    /// match lock use".
    Conflict {
        /// The flags found.
        flags: u64,
    },
    /// The set was closed before the key was taken.
    Cancelled,
    /// An error that asking again at once won't fix (refusal, permission, agent unavailable
    /// for the error budget, session not created).
    Error(LockError),
}

/// What a key set reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySetEvent {
    /// The key is held, with its fencing token.
    Acquired(FencingToken),
    /// The key was not taken.
    Refused {
        /// The key.
        key: Key,
        /// Why.
        reason: Refusal,
    },
    /// The key was held and no longer is (or may no longer be).
    Lost {
        /// The key.
        key: Key,
        /// Why.
        reason: LossReason,
    },
    /// The session is gone, or may be: every key it held is lost (a [`KeySetEvent::Lost`] for
    /// each follows). Keys asked for and not yet taken are taken on a new session.
    SessionLost(LossReason),
    /// The key was given back.
    Released(Key),
    /// The key's release was never confirmed: it is freed when the session ends.
    ReleaseFailed {
        /// The key.
        key: Key,
        /// Why.
        error: LockError,
    },
    /// A request failed while acquiring; it is tried again.
    Retrying(Retry),
    /// `close` finished: every key given back, the session destroyed.
    Closed,
}

impl From<Retry> for KeySetEvent {
    fn from(retry: Retry) -> KeySetEvent {
        KeySetEvent::Retrying(retry)
    }
}

/// Where one key stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    /// Asked for: being checked, queued, or in a batch in flight.
    Acquiring,
    /// Held.
    Held(FencingToken),
    /// Being given back.
    Releasing,
}

#[derive(Clone, Debug)]
enum KeyState {
    /// A survey of its prefix is in flight.
    Surveying,
    /// Waiting for a batch.
    Queued,
    /// In a lock batch in flight.
    Locking,
    Held(FencingToken),
    /// In the release queue or a release batch; `report` is false for a key that was never
    /// reported held (granted after a close, or maybe granted by a batch given up).
    Releasing {
        report: bool,
    },
}

/// The set's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    /// Giving every key back, then stopping the session.
    Closing,
    /// Stopping the session; `Closed` follows.
    Stopping,
    /// Closed: takes nothing more.
    Closed,
}

/// A plain listing of a prefix before its keys are locked: who holds them, with which flags.
#[derive(Clone, Debug)]
struct Survey {
    pending: Pending,
    keys: Vec<Key>,
}

#[derive(Clone, Debug)]
struct Batch {
    pending: Pending,
    verb: BatchVerb,
    keys: Vec<Key>,
}

/// A watched prefix.
#[derive(Clone, Debug)]
struct PrefixWatch {
    prefix: Key,
    watch: Watch,
}

/// Takes, holds and gives back many lock keys on one Consul session, as a pure state machine.
///
/// The surface is the other machines' (`handle_response`, `handle_timeout`, `poll_action`,
/// `poll_timeout`), with per-key calls: [`acquire`](Self::acquire),
/// [`release`](Self::release), [`release_all`](Self::release_all), [`close`](Self::close). Each
/// key asked for ends in [`KeySetEvent::Acquired`] or [`KeySetEvent::Refused`]; a held key
/// ends in [`KeySetEvent::Released`], [`KeySetEvent::ReleaseFailed`] or
/// [`KeySetEvent::Lost`]. The session's loss is the loss of every key it holds.
///
/// Keys carry Go's lock flags ([`LOCK_FLAG_VALUE`]), so that Go's `consul lock` and `api.Lock`
/// see each of them as a held lock and wait; each key's fencing token is its `LockIndex` and the
/// `ModifyIndex` the granting transaction wrote, as a lock's.
#[derive(Debug)]
pub struct KeySetMachine {
    options: KeySetOptions,
    base: Base<KeySetEvent>,
    phase: Phase,
    keys: BTreeMap<Key, KeyState>,
    to_lock: VecDeque<Key>,
    to_release: VecDeque<Key>,
    surveys: Vec<Survey>,
    /// Surveys to send again once the pause is over.
    to_survey: Vec<Vec<Key>>,
    batches: Vec<Batch>,
    /// After a failed batch or survey: nothing is sent before this.
    pause: Option<Instant>,
    backoff: Backoff,
    /// Failed tries of acquisitions in a row, against the error budget.
    failures: Failures,
    /// Since when releases have failed in a row.
    release_failing_since: Option<Instant>,
    /// The session's watch, while it is active.
    session_watch: Option<(SessionId, Watch)>,
    prefixes: Vec<PrefixWatch>,
    /// Keys a listing showed free: a plain read of the session tells whether the session went
    /// (every key lost with it) or only these keys (released by someone else).
    check: Option<Check>,
}

/// A read of the session's info, for keys seen free.
#[derive(Clone, Debug)]
struct Check {
    pending: Pending,
    keys: Vec<Key>,
}

impl KeySetMachine {
    /// A machine for `options` (validated here) and the agent `config` describes.
    pub fn new(config: ClientConfig, options: KeySetOptions) -> Result<KeySetMachine, OptionsError> {
        options.validate()?;
        config.check()?;
        let base = Base::for_hold(config, &options.hold, AfterInvalidation::LockDelay);
        Ok(KeySetMachine {
            options,
            base,
            phase: Phase::Open,
            keys: BTreeMap::new(),
            to_lock: VecDeque::new(),
            to_release: VecDeque::new(),
            surveys: Vec::new(),
            to_survey: Vec::new(),
            batches: Vec::new(),
            pause: None,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
            failures: Failures::default(),
            release_failing_since: None,
            session_watch: None,
            prefixes: Vec::new(),
            check: None,
        })
    }

    // ----- the surface ----------------------------------------------------------------------

    /// Asks for `keys`: each ends in [`KeySetEvent::Acquired`] or [`KeySetEvent::Refused`].
    /// The whole call is refused (nothing asked for) if any key is invalid, given twice, already
    /// in the set, or the set would grow past `max_keys`.
    pub fn acquire<S: AsRef<str>>(&mut self, now: Instant, keys: &[S]) -> Result<(), KeySetError> {
        let now = self.base.observe(now);
        self.may_take(keys.len())?;
        let count = self.keys.len().saturating_add(keys.len());
        if count > self.options.max_keys {
            return Err(KeySetError::TooMany {
                count,
                limit: self.options.max_keys,
            });
        }
        let mut fresh = Vec::with_capacity(keys.len());
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        for key in keys {
            let valid = parse_key(key.as_ref())?;
            if self.keys.contains_key(&valid) {
                return Err(KeySetError::AlreadyInSet(valid.as_str().to_owned()));
            }
            if !seen.insert(valid.clone()) {
                return Err(KeySetError::Duplicate(valid.as_str().to_owned()));
            }
            fresh.push(valid);
        }
        for key in &fresh {
            self.keys.insert(key.clone(), KeyState::Surveying);
        }
        // One plain listing per prefix of the new keys tells which are free, ours, held by
        // another session, or not locks at all, before anything is written.
        let groups = group(&fresh, &prefixes_for(fresh.iter(), self.options.max_watches));
        for (prefix, keys) in groups {
            self.survey(now, prefix, keys);
        }
        self.rewatch(now);
        let events = self.base.start_session(now);
        self.on_session(now, events);
        self.pump(now);
        Ok(())
    }

    fn survey(&mut self, now: Instant, prefix: Key, keys: Vec<Key>) {
        let read = KvList {
            prefix,
            consistency: Consistency::Consistent,
            blocking: None,
        };
        let pending = self.base.send(now, &read, None);
        self.surveys.push(Survey { pending, keys });
    }

    /// Gives back `keys`, each held: each ends in [`KeySetEvent::Released`] (or
    /// [`KeySetEvent::ReleaseFailed`], or [`KeySetEvent::Lost`] when it turns out lost
    /// meanwhile). The whole call is refused if a key is not held.
    pub fn release<S: AsRef<str>>(&mut self, now: Instant, keys: &[S]) -> Result<(), KeySetError> {
        let now = self.base.observe(now);
        self.may_take(keys.len())?;
        let mut valid = Vec::with_capacity(keys.len());
        for key in keys {
            let k = parse_key(key.as_ref())?;
            if !matches!(self.keys.get(&k), Some(KeyState::Held(_))) {
                return Err(KeySetError::NotHeld(k.as_str().to_owned()));
            }
            valid.push(k);
        }
        for key in valid {
            self.give_back(key, true);
        }
        self.pump(now);
        Ok(())
    }

    /// Gives back every held key.
    pub fn release_all(&mut self, now: Instant) {
        let now = self.base.observe(now);
        let held: Vec<Key> = self
            .keys
            .iter()
            .filter(|(_, s)| matches!(s, KeyState::Held(_)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in held {
            self.give_back(key, true);
        }
        self.pump(now);
    }

    /// Ends the set: keys asked for and not yet sent are refused ([`Refusal::Cancelled`]),
    /// held keys given back, and once nothing is held the session is destroyed; then
    /// [`KeySetEvent::Closed`]. A later `acquire` is refused.
    pub fn close(&mut self, now: Instant) {
        let now = self.base.observe(now);
        if self.phase != Phase::Open {
            return;
        }
        self.phase = Phase::Closing;
        let surveyed = std::mem::take(&mut self.surveys).into_iter().map(|s| s.keys);
        for keys in surveyed
            .chain(std::mem::take(&mut self.to_survey))
            .collect::<Vec<_>>()
        {
            for key in keys {
                self.refuse(key, Refusal::Cancelled);
            }
        }
        for key in std::mem::take(&mut self.to_lock) {
            self.refuse(key, Refusal::Cancelled);
        }
        self.release_all(now);
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action<KeySetEvent>> {
        self.base.out.pop()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next; never earlier than the last
    /// `now`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The keys' watches wait for the session (see `watch_reads`): their timers with it.
        let prefixes = self.prefixes.iter().filter(|_| self.session_watch.is_some());
        let watches = self
            .session_watch
            .iter()
            .map(|(_, w)| w)
            .chain(prefixes.map(|p| &p.watch))
            .filter_map(Watch::timer);
        let timers = self
            .base
            .session
            .poll_timeout()
            .into_iter()
            .chain(self.pause.filter(|_| self.has_work()))
            .chain(watches);
        read::next_timeout(timers, &self.pendings(), self.base.last_now())
    }

    /// Handles the passage of time: due timers fire, requests past their deadline time out.
    /// Calling it early, or twice, does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.base.observe(now);
        for id in read::overdue(&self.pendings(), now) {
            self.on_reply(now, id, &read::deadline_passed());
        }
        let base = &mut self.base;
        let events = base.session.handle_timeout(now, &mut base.out, &mut base.rng);
        self.on_session(now, events);
        if self.pause.is_some_and(|until| now >= until) {
            self.pause = None;
        }
        self.watch_reads(now);
        self.pump(now);
    }

    /// Handles the reply to request `id`; a reply nobody waits for is ignored.
    pub fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        let now = self.base.observe(now);
        self.on_reply(now, id, &reply);
    }

    /// The fencing token of `key`, while held.
    pub fn token(&self, key: &str) -> Option<&FencingToken> {
        let key = Key::new(key).ok()?;
        match self.keys.get(&key) {
            Some(KeyState::Held(token)) => Some(token),
            _ => None,
        }
    }

    /// Where `key` stands, if it is in the set.
    pub fn key_status(&self, key: &str) -> Option<KeyStatus> {
        let key = Key::new(key).ok()?;
        self.keys.get(&key).map(|state| match state {
            KeyState::Surveying | KeyState::Queued | KeyState::Locking => KeyStatus::Acquiring,
            KeyState::Held(token) => KeyStatus::Held(token.clone()),
            KeyState::Releasing { .. } => KeyStatus::Releasing,
        })
    }

    /// The fencing tokens of every held key, in key order.
    pub fn tokens(&self) -> impl Iterator<Item = &FencingToken> {
        self.keys.values().filter_map(|s| match s {
            KeyState::Held(token) => Some(token),
            _ => None,
        })
    }

    /// Whether [`close`](Self::close) has finished ([`KeySetEvent::Closed`] was reported).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// How many keys are held.
    pub fn held(&self) -> usize {
        self.keys
            .values()
            .filter(|s| matches!(s, KeyState::Held(_)))
            .count()
    }

    /// How many keys are in the set (held, or being acquired or released).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The prefixes watched by blocking reads.
    pub fn watched_prefixes(&self) -> Vec<&Key> {
        self.prefixes.iter().map(|p| &p.prefix).collect()
    }

    /// The session in use, if any.
    pub fn session_id(&self) -> Option<&SessionId> {
        self.base.session.id()
    }

    /// The number of requests the machine waits on.
    pub fn in_flight(&self) -> usize {
        self.pendings().len()
    }

    /// Whether the machine has nothing left to do: no key, no session, no request, no action.
    pub fn is_quiescent(&self) -> bool {
        self.keys.is_empty()
            && self.pendings().len() == 0
            && self.base.out.is_empty()
            && self.base.session.status() == crate::machine::SessionStatus::Idle
    }

    // ----- inside -----------------------------------------------------------------------------

    /// Whether a call naming `keys` keys may be taken at all.
    fn may_take(&self, keys: usize) -> Result<(), KeySetError> {
        if self.phase != Phase::Open {
            return Err(KeySetError::Closing);
        }
        if keys == 0 {
            return Err(KeySetError::NoKeys);
        }
        Ok(())
    }

    fn has_work(&self) -> bool {
        !self.to_lock.is_empty() || !self.to_release.is_empty() || !self.to_survey.is_empty()
    }

    fn pendings(&self) -> Pendings {
        let mut all = Pendings::default();
        all.extend(self.base.session.pending());
        all.extend(self.surveys.iter().map(|s| s.pending));
        all.extend(self.batches.iter().map(|b| b.pending));
        all.extend(self.session_watch.iter().filter_map(|(_, w)| w.pending()));
        all.extend(self.prefixes.iter().filter_map(|p| p.watch.pending()));
        all.extend(self.check.as_ref().map(|c| c.pending));
        all
    }

    fn on_reply(&mut self, now: Instant, id: RequestId, reply: &Reply) {
        // The renew deadline holds whatever the input (as a holder's).
        let base = &mut self.base;
        let events = base.session.check_deadline(now, &mut base.out);
        self.on_session(now, events);
        let base = &mut self.base;
        if let Some(events) = base
            .session
            .handle_response(now, id, reply, &mut base.out, &mut base.rng)
        {
            self.on_session(now, events);
        } else if let Some(i) = self.surveys.iter().position(|s| s.pending.is(id)) {
            let survey = self.surveys.swap_remove(i);
            self.on_survey(now, survey, reply);
        } else if let Some(i) = self.batches.iter().position(|b| b.pending.is(id)) {
            let batch = self.batches.swap_remove(i);
            self.on_batch(now, batch, reply);
        } else if self
            .session_watch
            .as_ref()
            .and_then(|(_, w)| w.pending())
            .is_some_and(|p| p.is(id))
        {
            self.on_session_watch(now, reply);
        } else if let Some(i) = self
            .prefixes
            .iter()
            .position(|p| p.watch.pending().is_some_and(|p| p.is(id)))
        {
            self.on_prefix_watch(now, i, reply);
        } else if self.check.as_ref().is_some_and(|c| c.pending.is(id)) {
            self.on_check(now, reply);
        } else {
            tracing::trace!(%id, "reply to a request nobody waits for");
        }
        self.pump(now);
    }

    fn on_session(&mut self, now: Instant, events: Vec<SessionEvent>) {
        for event in events {
            match event {
                SessionEvent::Ready(id) => {
                    tracing::debug!(session = %id, "key set: session ready");
                    self.failures.progressed();
                    self.session_watch = Some((id, Watch::new(0, now)));
                    self.watch_reads(now);
                }
                SessionEvent::Lost(loss) => {
                    let reason = match loss {
                        SessionLoss::Invalidated => LossReason::SessionInvalidated,
                        SessionLoss::RenewDeadline { since_ack } => LossReason::RenewDeadline { since_ack },
                    };
                    self.session_lost(now, reason, false);
                }
                SessionEvent::CreateFailed(e) => {
                    self.refuse_waiting(Refusal::Error(LockError::session(e)));
                }
                SessionEvent::CreateRetry { cause, next_try } => {
                    let budget = self.options.hold.acquire_error_budget;
                    if let Err(e) = self
                        .failures
                        .failed(now, &cause, next_try, budget, &mut self.base.out)
                    {
                        self.refuse_waiting(Refusal::Error(e));
                        let events = self.base.stop_session(now);
                        self.on_session(now, events);
                    }
                }
                SessionEvent::Stopped => {
                    if self.phase == Phase::Stopping {
                        self.phase = Phase::Closed;
                        self.base.out.event(KeySetEvent::Closed);
                    }
                }
            }
        }
    }

    /// The session is gone (or may be): every key it held is lost; keys not yet sent are taken
    /// on a new session. `forget` drops a session the server no longer knows.
    fn session_lost(&mut self, now: Instant, reason: LossReason, forget: bool) {
        tracing::warn!(?reason, held = self.held(), "key set: session lost");
        self.base.out.event(KeySetEvent::SessionLost(reason.clone()));
        self.session_watch = None;
        self.check = None;
        // Batches in flight were sent with the lost session: what they did went with it.
        let batches = std::mem::take(&mut self.batches);
        let keys: Vec<(Key, KeyState)> = std::mem::take(&mut self.keys).into_iter().collect();
        for (key, state) in keys {
            match state {
                KeyState::Held(_) | KeyState::Releasing { report: true } => {
                    self.base.out.event(KeySetEvent::Lost {
                        key,
                        reason: reason.clone(),
                    });
                }
                KeyState::Releasing { report: false } => {}
                KeyState::Locking => {
                    if self.phase == Phase::Open {
                        self.keys.insert(key.clone(), KeyState::Queued);
                        self.to_lock.push_back(key);
                    } else {
                        self.base.out.event(KeySetEvent::Refused {
                            key,
                            reason: Refusal::Cancelled,
                        });
                    }
                }
                other @ (KeyState::Surveying | KeyState::Queued) => {
                    self.keys.insert(key, other);
                }
            }
        }
        drop(batches);
        self.to_release.clear();
        self.rewatch(now);
        if self.phase != Phase::Open {
            self.maybe_stop(now);
            return;
        }
        if !self.keys.is_empty() || forget {
            let events = if forget {
                self.base.forget_session(now)
            } else {
                self.base.start_session(now)
            };
            self.on_session(now, events);
        }
    }

    /// Refuses every key waiting for the session.
    fn refuse_waiting(&mut self, reason: Refusal) {
        self.to_lock.clear();
        let waiting: Vec<Key> = self
            .keys
            .iter()
            .filter(|(_, s)| matches!(s, KeyState::Queued | KeyState::Surveying))
            .map(|(k, _)| k.clone())
            .collect();
        self.surveys.clear();
        for key in waiting {
            self.refuse(key, reason.clone());
        }
    }

    fn refuse(&mut self, key: Key, reason: Refusal) {
        tracing::debug!(%key, ?reason, "key set: refused");
        self.keys.remove(&key);
        self.base.out.event(KeySetEvent::Refused { key, reason });
    }

    fn lose(&mut self, key: Key, reason: LossReason) {
        tracing::warn!(%key, ?reason, "key set: key lost");
        self.keys.remove(&key);
        self.base.out.event(KeySetEvent::Lost { key, reason });
    }

    fn give_back(&mut self, key: Key, report: bool) {
        self.keys.insert(key.clone(), KeyState::Releasing { report });
        self.to_release.push_back(key);
    }

    fn on_survey(&mut self, now: Instant, survey: Survey, reply: &Reply) {
        if self.phase != Phase::Open {
            return;
        }
        let listing = match Watch::trust(decode::<KvList>(reply)) {
            Ok(listing) => listing,
            Err(Failure::Fatal(e)) => {
                for key in survey.keys {
                    self.refuse(key, Refusal::Error(LockError::refused(e.clone())));
                }
                return;
            }
            Err(Failure::Transient(why)) => {
                match self.acquire_failed(now, &why) {
                    // Asked again after the pause.
                    Ok(()) => self.to_survey.push(survey.keys),
                    Err(e) => {
                        for key in survey.keys {
                            self.refuse(key, Refusal::Error(e.clone()));
                        }
                    }
                }
                return;
            }
        };
        self.failures.progressed();
        let found: HashMap<&str, &KvPair> = listing.value.iter().map(|p| (p.key.as_str(), p)).collect();
        let ours = self.base.session.id().cloned();
        for key in survey.keys {
            if !matches!(self.keys.get(&key), Some(KeyState::Surveying)) {
                continue;
            }
            match found.get(key.as_str()) {
                Some(pair) if pair.flags != LOCK_FLAG_VALUE => {
                    let flags = pair.flags;
                    self.refuse(key, Refusal::Conflict { flags });
                }
                Some(pair) if pair.session.is_some() && pair.session != ours => {
                    self.refuse(key, Refusal::Held);
                }
                _ => {
                    self.keys.insert(key.clone(), KeyState::Queued);
                    self.to_lock.push_back(key);
                }
            }
        }
    }

    /// Counts a failed try of an acquisition (reported as [`KeySetEvent::Retrying`]): a pause
    /// before the next, or the error that ends it once the failures have lasted the error
    /// budget.
    fn acquire_failed(&mut self, now: Instant, why: &str) -> Result<(), LockError> {
        let next_try = now + self.backoff.next(&mut self.base.rng);
        let budget = self.options.hold.acquire_error_budget;
        self.failures
            .failed(now, why, next_try, budget, &mut self.base.out)?;
        self.pause = Some(next_try);
        Ok(())
    }

    /// Sends what can go: releases first (they free keys for others), then locks, each in
    /// batches of at most [`MAX_TXN_OPS`] keys, at most `max_batches_in_flight` at once.
    fn pump(&mut self, now: Instant) {
        if self.pause.is_some_and(|until| now < until) {
            return;
        }
        self.pause = None;
        if self.phase == Phase::Open {
            for keys in std::mem::take(&mut self.to_survey) {
                let prefix = common_prefix_key(&keys);
                self.survey(now, prefix, keys);
            }
        }
        let Some(session) = self.base.session.id().cloned() else {
            self.maybe_stop(now);
            return;
        };
        while self.batches.len() < self.options.max_batches_in_flight {
            let (verb, queue) = if !self.to_release.is_empty() {
                (BatchVerb::Unlock, &mut self.to_release)
            } else if !self.to_lock.is_empty() && self.phase == Phase::Open {
                (BatchVerb::Lock, &mut self.to_lock)
            } else {
                break;
            };
            let per_key = self.options.hold.value.len().div_ceil(3) * 4 + 160;
            let mut keys = Vec::new();
            let mut bytes = 0;
            while let Some(key) = queue.front() {
                let size = per_key + 3 * key.as_str().len();
                if keys.len() == MAX_TXN_OPS || (!keys.is_empty() && bytes + size > MAX_BATCH_BYTES) {
                    break;
                }
                bytes += size;
                if let Some(key) = queue.pop_front() {
                    keys.push(key);
                }
            }
            if verb == BatchVerb::Lock {
                for key in &keys {
                    self.keys.insert(key.clone(), KeyState::Locking);
                }
            }
            let txn = KvBatchTxn {
                verb,
                keys,
                session: session.clone(),
                flags: LOCK_FLAG_VALUE,
                value: self.options.hold.value.clone(),
            };
            let pending = self.base.send(now, &txn, None);
            self.batches.push(Batch {
                pending,
                verb,
                keys: txn.keys,
            });
        }
        self.maybe_stop(now);
    }

    /// Closing, once nothing is held or in flight: stop the session.
    fn maybe_stop(&mut self, now: Instant) {
        if self.phase != Phase::Closing || !self.keys.is_empty() || !self.batches.is_empty() {
            return;
        }
        self.phase = Phase::Stopping;
        self.session_watch = None;
        self.prefixes.clear();
        let events = self.base.stop_session(now);
        self.on_session(now, events);
    }

    fn on_batch(&mut self, now: Instant, batch: Batch, reply: &Reply) {
        match decode::<KvBatchTxn>(reply) {
            Ok(BatchOutcome::Done(pairs)) => self.on_batch_done(batch, pairs),
            Ok(BatchOutcome::Refused(refused)) => self.on_batch_refused(now, batch, refused),
            Err(Failure::Transient(why)) => self.on_batch_failed(now, batch, &why),
            Err(Failure::Fatal(e)) if e.is_invalid_session() => {
                self.requeue(batch, false);
                self.session_lost(now, LossReason::SessionInvalidated, true);
            }
            Err(Failure::Fatal(e)) => {
                let error = LockError::refused(e);
                for key in batch.keys {
                    match batch.verb {
                        BatchVerb::Lock => self.refuse(key, Refusal::Error(error.clone())),
                        BatchVerb::Unlock => self.release_failed(key, error.clone()),
                    }
                }
            }
        }
    }

    fn on_batch_done(&mut self, batch: Batch, pairs: Vec<KvPair>) {
        self.failures.progressed();
        self.backoff.reset();
        match batch.verb {
            BatchVerb::Lock => {
                let session = self.base.session.id().cloned();
                let entries: HashMap<&str, &KvPair> = pairs.iter().map(|p| (p.key.as_str(), p)).collect();
                for key in batch.keys {
                    let entry = entries.get(key.as_str());
                    match (entry, &session) {
                        (Some(pair), Some(session)) if pair.session.as_ref() == Some(session) => {
                            let token = FencingToken {
                                key: key.clone(),
                                session: session.clone(),
                                lock_index: pair.lock_index,
                                modify_index: pair.modify_index,
                            };
                            if self.phase == Phase::Open {
                                self.keys.insert(key, KeyState::Held(token.clone()));
                                self.base.out.event(KeySetEvent::Acquired(token));
                            } else {
                                // Granted after a close: never reported held, given back.
                                self.base.out.event(KeySetEvent::Refused {
                                    key: key.clone(),
                                    reason: Refusal::Cancelled,
                                });
                                self.give_back(key, false);
                            }
                        }
                        _ => self.refuse(
                            key,
                            Refusal::Error(LockError::Unavailable(
                                "the lock transaction answered without the key held by the session"
                                    .to_owned(),
                            )),
                        ),
                    }
                }
            }
            BatchVerb::Unlock => {
                self.release_failing_since = None;
                for key in batch.keys {
                    self.released(key);
                }
            }
        }
    }

    fn released(&mut self, key: Key) {
        if let Some(KeyState::Releasing { report }) = self.keys.remove(&key) {
            if report {
                self.base.out.event(KeySetEvent::Released(key));
            }
        }
    }

    fn release_failed(&mut self, key: Key, error: LockError) {
        if let Some(KeyState::Releasing { report }) = self.keys.remove(&key) {
            tracing::warn!(%key, %error, "key set: release not confirmed");
            if report {
                self.base.out.event(KeySetEvent::ReleaseFailed { key, error });
            }
        }
    }

    /// A refused batch wrote nothing: the refused keys are answered, the rest go out again.
    fn on_batch_refused(&mut self, now: Instant, batch: Batch, refused: Vec<(usize, LockRefusal)>) {
        let named: HashMap<usize, LockRefusal> = refused
            .into_iter()
            .filter(|(i, _)| *i < batch.keys.len())
            .collect();
        if named.is_empty() {
            // A refusal that names none of our operations can't be narrowed down: sending the
            // same batch again would be refused again.
            let error =
                LockError::Unavailable("a transaction refused without naming an operation".to_owned());
            for key in batch.keys {
                match batch.verb {
                    BatchVerb::Lock => self.refuse(key, Refusal::Error(error.clone())),
                    BatchVerb::Unlock => self.release_failed(key, error.clone()),
                }
            }
            return;
        }
        if named.values().any(|r| *r == LockRefusal::InvalidSession) {
            self.requeue(batch, false);
            self.session_lost(now, LossReason::SessionInvalidated, true);
            return;
        }
        let mut rest = Vec::new();
        for (i, key) in batch.keys.into_iter().enumerate() {
            match (named.get(&i), batch.verb) {
                (None, _) => rest.push(key),
                (Some(refusal), BatchVerb::Lock) => {
                    let reason = match refusal {
                        LockRefusal::Held => Refusal::Held,
                        LockRefusal::LockDelay => Refusal::LockDelay,
                        LockRefusal::PermissionDenied => {
                            Refusal::Error(LockError::PermissionDenied(crate::api::ApiError::Status {
                                status: 409,
                                body: "Permission denied".to_owned(),
                            }))
                        }
                        other => Refusal::Error(LockError::Refused(crate::api::ApiError::Status {
                            status: 409,
                            body: format!("{other:?}"),
                        })),
                    };
                    self.refuse(key, reason);
                }
                // Not held by the session any more: lost before it could be given back.
                (Some(LockRefusal::NotHeld), BatchVerb::Unlock) => {
                    if let Some(KeyState::Releasing { report }) = self.keys.remove(&key) {
                        if report {
                            tracing::warn!(%key, "key set: found lost on release");
                            self.base.out.event(KeySetEvent::Lost {
                                key,
                                reason: LossReason::NotHeld,
                            });
                        }
                    }
                }
                (Some(other), BatchVerb::Unlock) => {
                    let error = LockError::Refused(crate::api::ApiError::Status {
                        status: 409,
                        body: format!("{other:?}"),
                    });
                    self.release_failed(key, error);
                }
            }
        }
        // The rest were rolled back, not refused: at the front, in order, so they go out next.
        self.requeue(
            Batch {
                pending: batch.pending,
                verb: batch.verb,
                keys: rest,
            },
            false,
        );
    }

    fn on_batch_failed(&mut self, now: Instant, batch: Batch, why: &str) {
        match batch.verb {
            BatchVerb::Lock => match self.acquire_failed(now, why) {
                // A lock may have landed: sending the same batch again is safe (a session
                // locking a key it holds gets the entry unchanged).
                Ok(()) => self.requeue(batch, true),
                // Out of budget: the keys are refused, and given back silently in case the
                // lost answer had granted them.
                Err(error) => {
                    for key in batch.keys {
                        self.base.out.event(KeySetEvent::Refused {
                            key: key.clone(),
                            reason: Refusal::Error(error.clone()),
                        });
                        self.give_back(key, false);
                    }
                }
            },
            BatchVerb::Unlock => {
                let since = *self.release_failing_since.get_or_insert(now);
                let ttl = self.base.session.ttl().unwrap_or(Duration::from_secs(15));
                if now.saturating_duration_since(since) >= ttl {
                    let error = LockError::ReleaseUnconfirmed {
                        attempts: 0,
                        last: why.to_owned(),
                    };
                    for key in batch.keys {
                        self.release_failed(key, error.clone());
                    }
                } else {
                    tracing::warn!(%why, "key set: release failed; retrying");
                    self.pause = Some(now + self.backoff.next(&mut self.base.rng));
                    for key in batch.keys.into_iter().rev() {
                        self.to_release.push_front(key);
                    }
                }
            }
        }
    }

    /// Puts a lock batch's keys back at the front of the queue (an unlock batch's into the
    /// release queue). Closing, a lock batch's keys are refused instead, and given back
    /// silently when the batch `maybe_granted` them.
    fn requeue(&mut self, batch: Batch, maybe_granted: bool) {
        for key in batch.keys.into_iter().rev() {
            match batch.verb {
                BatchVerb::Lock if self.phase == Phase::Open => {
                    self.keys.insert(key.clone(), KeyState::Queued);
                    self.to_lock.push_front(key);
                }
                BatchVerb::Lock => {
                    self.refuse(key.clone(), Refusal::Cancelled);
                    if maybe_granted {
                        self.give_back(key, false);
                    }
                }
                BatchVerb::Unlock => self.to_release.push_front(key),
            }
        }
    }

    // ----- monitoring -------------------------------------------------------------------------

    /// Watches the prefixes that cover every key in the set (a watch already under way on a
    /// prefix that stays is kept).
    fn rewatch(&mut self, now: Instant) {
        let wanted = prefixes_for(self.keys.keys(), self.options.max_watches);
        let mut old = std::mem::take(&mut self.prefixes);
        for prefix in wanted {
            match old.iter().position(|p| p.prefix == prefix) {
                Some(i) => self.prefixes.push(old.swap_remove(i)),
                None => self.prefixes.push(PrefixWatch {
                    prefix,
                    watch: Watch::new(0, now),
                }),
            }
        }
        self.watch_reads(now);
    }

    /// Sends the watch reads that are due.
    fn watch_reads(&mut self, now: Instant) {
        let wait = self.options.hold.monitor_wait;
        if let Some((id, watch)) = self.session_watch.as_ref().filter(|(_, w)| w.due(now)) {
            let read = SessionInfo {
                id: id.clone(),
                consistency: Consistency::Consistent,
                blocking: Some(Blocking {
                    index: watch.index,
                    wait,
                }),
            };
            let blocking = (watch.index > 0).then_some(wait);
            let pending = self.base.send(now, &read, blocking);
            if let Some((_, watch)) = &mut self.session_watch {
                watch.step = WatchStep::Read(pending);
            }
        }
        // The keys' watches start once the session exists: until then nothing is held.
        if self.session_watch.is_none() {
            return;
        }
        for i in 0..self.prefixes.len() {
            let p = &self.prefixes[i];
            if !p.watch.due(now) {
                continue;
            }
            let read = KvList {
                prefix: p.prefix.clone(),
                consistency: Consistency::Consistent,
                blocking: Some(Blocking {
                    index: p.watch.index,
                    wait,
                }),
            };
            let blocking = (p.watch.index > 0).then_some(wait);
            let pending = self.base.send(now, &read, blocking);
            self.prefixes[i].watch.step = WatchStep::Read(pending);
        }
    }

    fn on_session_watch(&mut self, now: Instant, reply: &Reply) {
        let Some((id, watch)) = &mut self.session_watch else {
            return;
        };
        let Some(sent) = watch.pending() else {
            return;
        };
        match Watch::trust(decode::<SessionInfo>(reply)) {
            Ok(QueryReply { value: Some(_), meta }) => {
                let wait = self.options.hold.monitor_wait;
                if watch.still_held(now, sent, meta.index, wait, &mut self.base.rng) {
                    watch.step = WatchStep::Pause(now);
                }
            }
            Ok(QueryReply { value: None, .. }) => {
                tracing::warn!(session = %id, "key set: the session is gone on the server");
                self.session_lost(now, LossReason::SessionInvalidated, true);
                return;
            }
            Err(failure) => {
                // The session's loss is also found by its renewals: a failing watch is retried
                // for as long as they succeed.
                let retry = self.options.hold.monitor_retry_time;
                let _ = watch.failed(now, failure, None, retry);
            }
        }
        self.watch_reads(now);
    }

    fn on_prefix_watch(&mut self, now: Instant, i: usize, reply: &Reply) {
        let Some(sent) = self.prefixes[i].watch.pending() else {
            return;
        };
        let listing = match Watch::trust(decode::<KvList>(reply)) {
            Ok(listing) => listing,
            Err(failure) => {
                let retries = self.options.hold.monitor_retries;
                let retry = self.options.hold.monitor_retry_time;
                if let Err(reason) = self.prefixes[i].watch.failed(now, failure, retries, retry) {
                    let prefix = self.prefixes[i].prefix.clone();
                    self.prefixes[i].watch.step = WatchStep::Pause(now + retry);
                    for key in self.held_under(&prefix) {
                        self.lose(key, reason.clone());
                    }
                }
                self.watch_reads(now);
                return;
            }
        };
        let wait = self.options.hold.monitor_wait;
        let index = listing.meta.index;
        let prefix = self.prefixes[i].prefix.clone();
        let p = &mut self.prefixes[i];
        if p.watch.still_held(now, sent, index, wait, &mut self.base.rng) {
            p.watch.step = WatchStep::Pause(now);
        }
        let found: HashMap<&str, &KvPair> = listing.value.iter().map(|p| (p.key.as_str(), p)).collect();
        let mut lost = Vec::new();
        let mut free = Vec::new();
        for (key, state) in self.keys.range(prefix.clone()..) {
            if !key.as_str().starts_with(prefix.as_str()) {
                break;
            }
            let KeyState::Held(token) = state else {
                continue;
            };
            // A listing older than the grant can't speak for the hold.
            if index < token.modify_index {
                continue;
            }
            let reason = match found.get(key.as_str()) {
                None => Some(LossReason::KeyDeleted),
                Some(pair) => match &pair.session {
                    None => {
                        free.push(key.clone());
                        None
                    }
                    Some(s) if *s != token.session => Some(LossReason::TakenBy(s.clone())),
                    Some(_) if pair.flags != LOCK_FLAG_VALUE => {
                        Some(LossReason::Conflict { flags: pair.flags })
                    }
                    Some(_) => None,
                },
            };
            if let Some(reason) = reason {
                lost.push((key.clone(), reason));
            }
        }
        for (key, reason) in lost {
            self.lose(key, reason);
        }
        if !free.is_empty() {
            self.check_session(now, free);
        }
        self.watch_reads(now);
    }

    /// Keys held by the session were seen free: that is what the session's invalidation looks
    /// like to a listing (Consul releases its keys), and the listing often answers before the
    /// session's watch. One plain read of the session tells the two apart, so that the loss is
    /// reported with its cause.
    fn check_session(&mut self, now: Instant, keys: Vec<Key>) {
        if let Some(check) = &mut self.check {
            check.keys.extend(keys);
            return;
        }
        let Some(id) = self.base.session.id().cloned() else {
            return;
        };
        let read = SessionInfo {
            id,
            consistency: Consistency::Consistent,
            blocking: None,
        };
        let pending = self.base.send(now, &read, None);
        self.check = Some(Check { pending, keys });
    }

    fn on_check(&mut self, now: Instant, reply: &Reply) {
        let Some(check) = self.check.take() else {
            return;
        };
        if let Ok(QueryReply { value: None, .. }) = Watch::trust(decode::<SessionInfo>(reply)) {
            tracing::warn!("key set: the session is gone on the server");
            self.session_lost(now, LossReason::SessionInvalidated, true);
            return;
        }
        // The session lives (or can't be read now): these keys were released by someone else,
        // and are lost either way.
        for key in check.keys {
            if matches!(self.keys.get(&key), Some(KeyState::Held(_))) {
                self.lose(key, LossReason::NotHeld);
            }
        }
    }

    /// The held keys under `prefix`.
    fn held_under(&self, prefix: &Key) -> Vec<Key> {
        self.keys
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.as_str().starts_with(prefix.as_str()))
            .filter(|(_, s)| matches!(s, KeyState::Held(_)))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// `key` as a key, or the call's error naming it.
fn parse_key(key: &str) -> Result<Key, KeySetError> {
    Key::new(key).map_err(|source| KeySetError::Key {
        key: crate::api::reply::truncate(key, 200),
        source,
    })
}

/// The prefixes that cover `keys` with at most `max` blocking reads (when the keys share enough
/// of a prefix): each key's parent folder (the key itself for a key without `/`), those under
/// another dropped, then the two neighbours (in sorted order) with the longest common prefix
/// merged into it, until `max` are left. Neighbours in sorted order share the longest common
/// prefixes, so each merge widens a watch as little as it can.
pub(crate) fn prefixes_for<'a>(keys: impl Iterator<Item = &'a Key>, max: usize) -> Vec<Key> {
    let mut folders: Vec<String> = keys
        .map(|k| {
            let s = k.as_str();
            match s.rfind('/') {
                Some(i) => s[..=i].to_owned(),
                None => s.to_owned(),
            }
        })
        .collect();
    folders.sort();
    folders.dedup();
    let mut prefixes = covering(folders);
    while prefixes.len() > max.max(1) {
        let best = prefixes
            .windows(2)
            .enumerate()
            .map(|(i, w)| (i, common_len(&w[0], &w[1])))
            .filter(|(_, len)| *len > 0)
            .max_by_key(|(_, len)| *len);
        let Some((i, len)) = best else {
            break;
        };
        let merged = prefixes[i][..len].to_owned();
        prefixes.splice(i..i + 2, [merged]);
        prefixes = covering(prefixes);
    }
    prefixes
        .into_iter()
        .filter_map(|p| valid_prefix(&p))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Drops every prefix that another (earlier in sorted order) covers.
fn covering(sorted: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(sorted.len());
    for p in sorted {
        if out.last().is_some_and(|last| p.starts_with(last.as_str())) {
            continue;
        }
        out.push(p);
    }
    out
}

/// The length in bytes of the common prefix of `a` and `b`, on a character boundary.
fn common_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .take_while(|((_, x), y)| x == y)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8())
}

/// `prefix` as a key, shortened until it is one (a cut such as `a/.` is not a valid key).
fn valid_prefix(prefix: &str) -> Option<Key> {
    let mut p = prefix;
    while !p.is_empty() {
        if let Ok(key) = Key::new(p) {
            return Some(key);
        }
        let mut end = p.len() - 1;
        while !p.is_char_boundary(end) {
            end -= 1;
        }
        p = &p[..end];
    }
    None
}

/// The common prefix of a survey's keys, for asking again.
fn common_prefix_key(keys: &[Key]) -> Key {
    prefixes_for(keys.iter(), 1)
        .into_iter()
        .next()
        .unwrap_or_else(|| keys[0].clone())
}

/// Each key with the first of `prefixes` that covers it.
fn group(keys: &[Key], prefixes: &[Key]) -> Vec<(Key, Vec<Key>)> {
    let mut groups: Vec<(Key, Vec<Key>)> = prefixes.iter().map(|p| (p.clone(), Vec::new())).collect();
    for key in keys {
        match groups
            .iter_mut()
            .find(|(p, _)| key.as_str().starts_with(p.as_str()))
        {
            Some((_, members)) => members.push(key.clone()),
            // Keys that share no valid prefix are listed each on its own.
            None => groups.push((key.clone(), vec![key.clone()])),
        }
    }
    groups.retain(|(_, members)| !members.is_empty());
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> Vec<Key> {
        list.iter().map(|k| Key::new(*k).expect("key")).collect()
    }

    fn strs(prefixes: &[Key]) -> Vec<&str> {
        prefixes.iter().map(Key::as_str).collect()
    }

    #[test]
    fn prefixes_are_parent_folders_merged_down_to_the_limit() {
        let k = keys(&["jobs/a/1", "jobs/a/2", "jobs/b/1", "tenants/x", "tenants/y"]);
        assert_eq!(
            strs(&prefixes_for(k.iter(), 8)),
            ["jobs/a/", "jobs/b/", "tenants/"]
        );
        assert_eq!(strs(&prefixes_for(k.iter(), 2)), ["jobs/", "tenants/"]);
        // No common character: as few as can be.
        assert_eq!(strs(&prefixes_for(k.iter(), 1)), ["jobs/", "tenants/"]);
        let many: Vec<Key> = (0..10_000)
            .map(|i| Key::new(format!("shard/{i}")).expect("key"))
            .collect();
        assert_eq!(strs(&prefixes_for(many.iter(), 4)), ["shard/"]);
    }

    #[test]
    fn a_cut_that_is_not_a_key_is_shortened() {
        let k = keys(&["a/.x/1", "a/.y/1"]);
        assert_eq!(strs(&prefixes_for(k.iter(), 1)), ["a/"]);
    }
}
