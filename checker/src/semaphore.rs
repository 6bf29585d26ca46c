//! The semaphore's rules:
//! - only the requests a semaphore sends go out: lists of the prefix, reads of the `.lock`, our
//!   contender key acquired with the semaphore's flags and our value, the `.lock` written by
//!   check-and-set with the semaphore's flags and a readable value (when it lists us: with our
//!   limit and at most `limit` holders), our contender key deleted, the `.lock` deleted by
//!   check-and-set;
//! - `Acquired` comes only on the reply to the consistent, non-blocking list that follows a grant
//!   (core's `on_confirm`), which shows the `.lock` with the semaphore's flags and our limit
//!   listing our session, and our contender key held by our session; the token names the `.lock`
//!   and carries its ModifyIndex from that list; and in the same attempt, a check-and-set of the
//!   `.lock` listing our session was answered `true`, or a wait list showed our session a holder
//!   already (the `.lock` with our limit listing us, our contender key ours: core's `on_read`);
//!   both counted only for replies to requests still in flight (not late or duplicate ones);
//! - while held, nothing that gives the slot up goes out: no destroy of the session, no delete
//!   of our contender key or of the `.lock`, no `.lock` written without us.

use std::collections::{BTreeMap, BTreeSet};

use consul_lock_core::api::{Endpoint, KvGet, KvList, KvPair};
use consul_lock_core::machine::{
    FencingToken, Reply, SEMAPHORE_FLAG_VALUE, SemaphoreMachine, SemaphoreState, SessionMachine,
};

use crate::request::{Kind, Sent};
use crate::{Cause, Holder};

/// The `.lock` as a listing showed it.
#[derive(Clone, Debug)]
pub struct LockSeen {
    flags: u64,
    modify_index: u64,
    /// Decoded as the machine decodes it, with our limit for an empty value.
    state: Result<SemaphoreState, String>,
}

/// What a listing of the prefix showed.
#[derive(Clone, Debug)]
pub struct Listed {
    /// `consistent` was asked (the confirm after a grant, the monitor).
    consistent: bool,
    /// It was a blocking read (`index` set).
    blocking: bool,
    lock: Option<LockSeen>,
    /// Every key of the listing and the session holding it (the first entry of a key).
    keys: BTreeMap<String, Option<String>>,
    /// The prefix listed.
    prefix: String,
}

impl Listed {
    /// Whether the `.lock` (with the semaphore's flags and `limit`) lists `session`.
    fn lists(&self, session: &str, limit: u32) -> bool {
        self.lock.as_ref().is_some_and(|l| {
            l.flags == SEMAPHORE_FLAG_VALUE
                && l.state
                    .as_ref()
                    .is_ok_and(|s| s.limit == limit && s.holds(session))
        })
    }

    /// Whether `<prefix>/<session>` is held by `session`.
    fn contends(&self, session: &str) -> bool {
        self.keys.get(&format!("{}/{session}", self.prefix)) == Some(&Some(session.to_owned()))
    }
}

/// What a reply says.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// A check-and-set of the `.lock` answered `true`: the holders it wrote.
    cas_granted: Option<BTreeSet<String>>,
    /// A listing of the prefix.
    listed: Option<Listed>,
}

/// What the current attempt witnessed, and the contender keys of every attempt.
#[derive(Clone, Debug, Default)]
pub struct Witness {
    /// Since the last `lock()`, from replies to requests still in flight: sessions a granted
    /// check-and-set listed, and sessions a wait list showed holders.
    granted: BTreeSet<String>,
    shown: BTreeSet<String>,
    /// Every contender key the machine acquired (the only keys it may delete).
    contended: BTreeSet<String>,
}

/// The holders a `.lock` value lists, if it reads.
pub fn holders_of(value: &[u8]) -> Option<BTreeSet<String>> {
    SemaphoreState::decode(value, 0)
        .ok()
        .map(|s| s.holders.into_keys().collect())
}

fn prefix(m: &SemaphoreMachine) -> String {
    m.options().prefix.as_str().to_owned()
}

fn dot_lock(m: &SemaphoreMachine) -> String {
    format!("{}/.lock", prefix(m))
}

fn ours(m: &SemaphoreMachine) -> Option<String> {
    m.session().id().map(|s| s.to_string())
}

impl Holder for SemaphoreMachine {
    type Facts = Facts;
    type Witness = Witness;

    fn session(&self) -> &SessionMachine {
        SemaphoreMachine::session(self)
    }

    fn try_once(&self) -> bool {
        self.options().hold.try_once
    }

    fn token_key(&self) -> String {
        dot_lock(self)
    }

    fn facts(&self, sent: &Sent, reply: &Reply) -> Facts {
        let mut facts = Facts::default();
        let Ok(resp) = reply else { return facts };
        let lock_key = dot_lock(self);
        match sent.kind() {
            Kind::CasPut { key, .. }
                if key == lock_key && resp.status().is_success() && resp.body().trim_ascii() == b"true" =>
            {
                facts.cas_granted = holders_of(&sent.body);
            }
            Kind::List {
                index, consistent, ..
            } => {
                if let Ok(q) = KvList::decode(resp) {
                    let pairs: &[KvPair] = &q.value;
                    let lock = pairs.iter().find(|p| p.key == lock_key).map(|p| LockSeen {
                        flags: p.flags,
                        modify_index: p.modify_index,
                        state: SemaphoreState::decode(&p.value, self.options().limit),
                    });
                    let mut keys = BTreeMap::new();
                    for p in pairs {
                        keys.entry(p.key.clone())
                            .or_insert_with(|| p.session.as_ref().map(|s| s.to_string()));
                    }
                    facts.listed = Some(Listed {
                        consistent,
                        blocking: index.is_some(),
                        lock,
                        keys,
                        prefix: prefix(self),
                    });
                }
            }
            Kind::Get { .. } => {
                // The release's read: nothing the checks need (decoded to exercise the decoder).
                let _ = KvGet::decode(resp);
            }
            _ => {}
        }
        facts
    }

    fn check_send(&self, w: &mut Witness, s: &Sent) {
        let flags = SEMAPHORE_FLAG_VALUE.to_string();
        let options = self.options();
        let (prefix, lock_key) = (prefix(self), dot_lock(self));
        match s.kind() {
            Kind::Create | Kind::Renew(_) | Kind::Destroy(_) => {}
            Kind::List { prefix: p, .. } => assert_eq!(p, prefix, "{}", s.describe()),
            Kind::Get { key, index } => {
                assert_eq!(
                    (key.as_str(), index),
                    (lock_key.as_str(), None),
                    "{}",
                    s.describe()
                );
            }
            Kind::Acquire { key, session } => {
                // (The session may be gone by the end of the step: sent, then given up.)
                assert_eq!(key, format!("{prefix}/{session}"), "{}", s.describe());
                w.contended.insert(key);
                assert_eq!(s.param("flags"), Some(flags.as_str()), "{}", s.describe());
                assert_eq!(s.body, options.hold.value, "{}: not our value", s.describe());
            }
            Kind::CasPut { key, .. } => {
                assert_eq!(key, lock_key, "{}", s.describe());
                assert_eq!(s.param("flags"), Some(flags.as_str()), "{}", s.describe());
                let written = match SemaphoreState::decode(&s.body, 0) {
                    Ok(w) => w,
                    Err(e) => panic!("{} writes an unreadable .lock: {e}", s.describe()),
                };
                if written.holds(&ours(self).unwrap_or_default()) {
                    // Adding us: with our limit, within it. (Taking us out rewrites the rest as
                    // it was.)
                    assert_eq!(written.limit, options.limit, "a .lock written with another limit");
                    assert!(
                        written.holders.len() <= options.limit as usize,
                        "over the limit: {written:?}"
                    );
                }
            }
            Kind::Remove { key } => {
                assert!(
                    w.contended.contains(&key),
                    "{} deletes a key it never contended with",
                    s.describe()
                );
            }
            Kind::Delete { key, .. } => assert_eq!(key, lock_key, "{}", s.describe()),
            _ => panic!("a semaphore sent {}", s.describe()),
        }
    }

    fn on_lock(w: &mut Witness) {
        w.granted.clear();
        w.shown.clear();
    }

    fn witness(&self, w: &mut Witness, facts: &Facts, live: bool) {
        if !live {
            return;
        }
        if let Some(holders) = &facts.cas_granted {
            w.granted.extend(holders.iter().cloned());
        }
        if let Some(l) = facts.listed.as_ref().filter(|l| !l.consistent)
            && let Some(Ok(state)) = l.lock.as_ref().map(|l| &l.state)
        {
            for holder in state.holders.keys() {
                if l.lists(holder, self.options().limit) && l.contends(holder) {
                    w.shown.insert(holder.clone());
                }
            }
        }
    }

    fn check_acquired(&self, w: &Witness, token: &FencingToken, cause: &Cause<Facts>) {
        let session = token.session.as_str();
        assert_eq!(
            self.session().id(),
            Some(&token.session),
            "Acquired on another session"
        );
        assert!(
            w.granted.contains(session) || w.shown.contains(session),
            "Acquired({token:?}) without a check-and-set listing us answered true, or a wait list \
             showing us a holder, in this attempt (granted {:?}, shown {:?})",
            w.granted,
            w.shown
        );
        let Cause::Reply(Some(Facts { listed: Some(l), .. })) = cause else {
            panic!("Acquired on {cause:?}, not on a listing");
        };
        assert!(
            l.consistent && !l.blocking,
            "Acquired on a list that is not the consistent confirm: {l:?}"
        );
        assert!(
            l.lists(session, self.options().limit),
            "Acquired on a list whose .lock does not list us with our limit: {l:?}"
        );
        assert!(
            l.contends(session),
            "Acquired on a list where our contender key is not ours: {l:?}"
        );
        let index = l.lock.as_ref().map(|l| l.modify_index);
        assert_eq!(
            (Some(token.lock_index), Some(token.modify_index)),
            (index, index),
            "the token carries the .lock's ModifyIndex"
        );
    }

    fn gives_up(&self, token: &FencingToken, s: &Sent) -> bool {
        let session = token.session.as_str();
        let contender = format!("{}/{session}", prefix(self));
        match s.kind() {
            Kind::Destroy(id) => id == session,
            Kind::Remove { key } => key == contender || key == dot_lock(self),
            Kind::Delete { .. } | Kind::Release { .. } => true,
            Kind::CasPut { .. } => !holders_of(&s.body).is_some_and(|h| h.contains(session)),
            _ => false,
        }
    }
}
