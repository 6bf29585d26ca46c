//! The lock's rules: it sends session requests, reads of its key, lock transactions, releases and
//! check-and-set deletes of its key (queued, also lists of its key, and reads, enqueues and
//! deletes of entries of its line); `Acquired` comes only on the reply to a lock transaction of
//! the current attempt granted to the session it was sent with, and carries that entry's session,
//! `LockIndex` and `ModifyIndex`; while held, it neither releases its key nor destroys its
//! session.

use consul_lock_core::api::{Endpoint, KvLockTxn, LockTxnOutcome};
use consul_lock_core::machine::{
    FencingToken, LOCK_FLAG_VALUE, LockMachine, QUEUE_FLAG_VALUE, Reply, SessionChoice, SessionMachine,
    Waiting,
};

use crate::request::{Kind, Sent};
use crate::{Cause, Holder};

/// What a reply says: the session a lock transaction was granted to (its entry shows the session
/// it was sent with), and the entry it answered with, whoever's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    granted: Option<String>,
    entry: Option<Entry>,
}

/// What the checks need of the entry a lock transaction answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    session: Option<String>,
    lock_index: u64,
    modify_index: u64,
    flags: u64,
}

/// What the current attempt witnessed.
#[derive(Clone, Debug, Default)]
pub struct Witness {
    /// Sessions a lock transaction was granted to, since the last `lock`.
    granted: Vec<String>,
    /// Whether the reply being handled answers a request of the current attempt still in flight.
    live: bool,
}

impl Holder for LockMachine {
    type Facts = Facts;
    type Witness = Witness;

    fn session(&self) -> &SessionMachine {
        LockMachine::session(self)
    }

    fn try_once(&self) -> bool {
        self.options().hold.try_once
    }

    fn token_key(&self) -> String {
        self.options().key.as_str().to_owned()
    }

    fn facts(&self, sent: &Sent, reply: &Reply) -> Facts {
        let (mut granted, mut entry) = (None, None);
        // A queued lock's enqueue is a lock transaction too, on its entry: not the lock's.
        let of_the_key = |key: &str| key == self.options().key.as_str();
        if let (Ok(resp), Kind::LockTxn { session, key, .. }) = (reply, sent.kind())
            && of_the_key(&key)
        {
            // Read with core's decoder: its own expectations are the decode_replies target's.
            if let Ok(LockTxnOutcome::Locked(pair)) = KvLockTxn::decode(resp) {
                let holder = pair.session.map(|s| s.to_string());
                if holder.as_deref() == Some(session.as_str()) {
                    granted = Some(session);
                }
                entry = Some(Entry {
                    session: holder,
                    lock_index: pair.lock_index,
                    modify_index: pair.modify_index,
                    flags: pair.flags,
                });
            }
        }
        Facts { granted, entry }
    }

    fn check_send(&self, _w: &mut Witness, s: &Sent) {
        let options = self.options();
        let queued = options.waiting == Waiting::Queue;
        let lock = matches!(
            s.kind(),
            Kind::Create
                | Kind::Renew(_)
                | Kind::Destroy(_)
                | Kind::Info(_)
                | Kind::Get { .. }
                | Kind::LockTxn { .. }
                | Kind::ProclaimTxn { .. }
                | Kind::Release { .. }
                | Kind::Delete { .. }
        ) || (queued && matches!(s.kind(), Kind::List { .. } | Kind::Remove { .. }));
        // (A plain `?acquire=` is no longer one: the lock acquires by transaction only.)
        assert!(lock, "a lock sent {}", s.describe());
        let line = options.queue_prefix();
        let in_line = |key: &str| queued && key.strip_prefix(&line).is_some_and(|n| !n.is_empty());
        let entry_of = |session: &str| format!("{line}{session}");
        match s.kind() {
            Kind::LockTxn {
                key,
                session,
                flags,
                value,
                leaves,
                tree,
            } => {
                let what = || format!("{} {}", s.describe(), String::from_utf8_lossy(&s.body));
                // (The session may be gone by the end of the step: sent, then given up.)
                assert!(!session.is_empty(), "{}: no session", what());
                if let SessionChoice::Existing(id) = &options.hold.session {
                    assert_eq!(session, id.as_str(), "{}: not the caller's session", what());
                }
                if in_line(&key) {
                    // An enqueue: our own entry, with the queue's flags.
                    assert_eq!(key, entry_of(&session), "{}: not our entry", what());
                    assert_eq!(flags, QUEUE_FLAG_VALUE, "{}: not the queue's flags", what());
                    assert!(leaves.is_none(), "{}", what());
                    assert_eq!(
                        tree.as_deref(),
                        Some(options.key.as_str()),
                        "{}: an enqueue reads the key's tree",
                        what()
                    );
                    return;
                }
                assert!(tree.is_none(), "{}: an acquire reads nothing", what());
                assert_eq!(key, options.key.as_str(), "{}", what());
                assert_eq!(flags, LOCK_FLAG_VALUE, "{}: not the lock's flags", what());
                assert_eq!(value, options.hold.value, "{}: not our value", what());
                match leaves {
                    Some(entry) => assert!(
                        queued && entry == entry_of(&session),
                        "{}: leaves another entry",
                        what()
                    ),
                    None => assert!(!queued, "{}: a queued acquire must leave the line", what()),
                }
            }
            Kind::List { prefix, .. } => assert_eq!(prefix, options.key.as_str(), "{}", s.describe()),
            Kind::Remove { key } => assert!(in_line(&key), "{}: not an entry", s.describe()),
            Kind::Get { key, .. } | Kind::Delete { key, .. } if in_line(&key) => {}
            Kind::Get { key, .. }
            | Kind::Release { key, .. }
            | Kind::Delete { key, .. }
            | Kind::ProclaimTxn { key, .. } => {
                assert_eq!(key, options.key.as_str(), "{}: another key", s.describe());
            }
            _ => {}
        }
    }

    fn on_lock(w: &mut Witness) {
        w.granted.clear();
    }

    fn witness(&self, w: &mut Witness, facts: &Facts, live: bool) {
        w.live = live;
        if let Some(s) = &facts.granted
            && !w.granted.contains(s)
        {
            w.granted.push(s.clone());
        }
    }

    fn check_acquired(&self, w: &Witness, token: &FencingToken, cause: &Cause<Facts>) {
        let session = token.session.to_string();
        assert!(
            w.granted.contains(&session),
            "Acquired({token:?}) but no lock transaction for that session was granted (granted: {:?})",
            w.granted
        );
        // The grant is the entry: Acquired comes on the lock transaction's own reply, granted to
        // the session it was sent with, and the token is that entry's.
        match cause {
            Cause::Reply(Some(Facts {
                granted: Some(g),
                entry: Some(e),
            })) => {
                assert_eq!(g, &session, "Acquired({token:?}) on a grant to {g}");
                assert_eq!(
                    (&e.session, e.lock_index, e.modify_index),
                    (&Some(session), token.lock_index, token.modify_index),
                    "Acquired must carry the session, LockIndex and ModifyIndex of the entry it follows"
                );
                assert_eq!(
                    e.flags, LOCK_FLAG_VALUE,
                    "Acquired on an entry with foreign flags {}",
                    e.flags
                );
                // A late or duplicate grant (an abandoned attempt's) is not this attempt's.
                assert!(w.live, "Acquired({token:?}) on a late or duplicate reply");
            }
            other => panic!("Acquired on {other:?}, not on a lock transaction's grant"),
        }
    }

    fn gives_up(&self, token: &FencingToken, s: &Sent) -> bool {
        let session = token.session.as_str();
        match s.kind() {
            Kind::Release { session: s, .. } | Kind::Destroy(s) => s == session,
            _ => false,
        }
    }
}
