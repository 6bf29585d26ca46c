//! The semaphore machine driven by hand, with crafted replies and virtual time: one test per
//! scenario of the Go reference client's semaphore tests, one per fix the Go client lacks, the
//! blocking-read hygiene rules, and a property test under random operations and replies. Every
//! step of every test is checked against the invariants in [`SNode`] (the lock's invariants, for
//! a semaphore).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use consul_lock_checker::semaphore::holders_of;
use consul_lock_core::api::{ClientConfig, SessionId};
use consul_lock_core::machine::{
    FencingToken, LOCK_FLAG_VALUE, LockError, LockEvent, LockStatus, LossReason, Misuse, OptionsError, Reply,
    RequestId, SEMAPHORE_FLAG_VALUE, SemaphoreMachine, SemaphoreOptions, SemaphoreState, SessionChoice,
    TransportError, TransportErrorKind,
};
use proptest::prelude::*;
use support::reply::{self, yes};
use support::{Clock, Kind, Kv, Node, Rig, Sent, ms, renew_ok, run, secs};

/// The semaphore's node: the one checker, with the semaphore's rules.
type SNode = Node<SemaphoreMachine>;
/// The semaphore's rig.
type SRig = Rig<SemaphoreMachine>;

// ================================================================================================
// Support: requests, replies, a driven and checked node, a fake Consul with prefixes and CAS
// ================================================================================================

/// The semaphore's prefix.
const PREFIX: &str = "p";
/// Its `.lock`.
const LOCK: &str = "p/.lock";

fn flags() -> String {
    SEMAPHORE_FLAG_VALUE.to_string()
}

/// Go's defaults for a semaphore of `limit` on [`PREFIX`], with a fixed seed.
fn options(limit: u32) -> SemaphoreOptions {
    let mut o = SemaphoreOptions::new(PREFIX, limit).unwrap();
    o.hold.seed = 7;
    o
}

/// Options using the caller's session.
fn existing(session: &str, limit: u32) -> SemaphoreOptions {
    let mut o = options(limit);
    o.hold.session = SessionChoice::Existing(SessionId::new(session).unwrap());
    o
}

fn contend_pattern(session: &str) -> String {
    format!("PUT /v1/kv/p/{session}?acquire={session}&flags={}", flags())
}

fn cas_pattern(cas: u64) -> String {
    format!("PUT /v1/kv/p/.lock?cas={cas}&flags={}", flags())
}

/// The blocking (or first) list while waiting.
const LIST: &str = "GET /v1/kv/p?recurse&!consistent";
/// The consistent list after a granted check-and-set, and the monitor's.
const CONSISTENT: &str = "GET /v1/kv/p?recurse&consistent";

/// The `.lock`'s value for `limit` and `holders`, as Go writes it.
fn state(limit: u32, holders: &[&str]) -> Vec<u8> {
    SemaphoreState {
        limit,
        holders: holders.iter().map(|h| ((*h).to_owned(), true)).collect(),
    }
    .encode()
}

/// A contender key held by `session`.
fn contender(session: &str, modify: u64) -> Kv {
    Kv {
        key: format!("{PREFIX}/{session}"),
        lock_index: 1,
        flags: SEMAPHORE_FLAG_VALUE,
        value: Vec::new(),
        session: Some(session.to_owned()),
        create_index: modify,
        modify_index: modify,
    }
}

/// The `.lock` with `limit` and `holders`, modified at `modify`.
fn lock_kv(limit: u32, holders: &[&str], modify: u64) -> Kv {
    Kv {
        key: LOCK.to_owned(),
        lock_index: 0,
        flags: SEMAPHORE_FLAG_VALUE,
        value: state(limit, holders),
        session: None,
        create_index: 5,
        modify_index: modify,
    }
}

/// A list's reply: 404 when empty, as Consul.
fn listing(index: u64, entries: &[Kv]) -> Reply {
    listing_leader(index, Some(true), entries)
}

fn listing_leader(index: u64, leader: Option<bool>, entries: &[Kv]) -> Reply {
    if entries.is_empty() {
        return reply::raw(404, Some(index), leader, Vec::new());
    }
    let body = serde_json::Value::Array(entries.iter().map(Kv::json).collect()).to_string();
    reply::raw(200, Some(index), leader, body)
}

// ----- the rig: one machine on a clock, every step checked ---------------------------------------

/// A semaphore machine with `options`, checked by the same checker as the lock: its rules are the
/// `consul-lock-checker` crate's `semaphore` module.
fn snode(options: SemaphoreOptions) -> SNode {
    SNode::new(SemaphoreMachine::new(ClientConfig::default(), options).unwrap())
}

impl SRig {
    fn new(options: SemaphoreOptions) -> SRig {
        Rig::with(SemaphoreMachine::new(ClientConfig::default(), options).unwrap())
    }

    /// After `lock()`: creates `session` (unless the options name one), makes the contender key,
    /// finds the semaphore empty, adds us, confirms. The `.lock` is written at 7.
    fn finish_acquire(&mut self, session: &str, limit: u32) -> FencingToken {
        if let Some(create) = self.find("PUT /v1/session/create") {
            self.reply(create.id, reply::created(session));
        }
        self.answer(&contend_pattern(session), yes());
        self.answer(&format!("{LIST}&!index"), listing(6, &[contender(session, 6)]));
        let cas = self.answer(&cas_pattern(0), yes());
        assert_eq!(cas.body, state(limit, &[session]));
        let confirmed = [contender(session, 6), lock_kv(limit, &[session], 7)];
        self.answer(&format!("{CONSISTENT}&!index"), listing(7, &confirmed));
        match &self.events()[..] {
            [LockEvent::Acquired(token)] => {
                assert_eq!(token.session.as_str(), session);
                assert_eq!(token.lock_index, 7);
                token.clone()
            }
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    fn acquire(&mut self, session: &str, limit: u32) -> FencingToken {
        self.lock().unwrap();
        self.finish_acquire(session, limit)
    }

    /// The monitor read in flight.
    fn monitor(&self) -> Sent {
        self.expect(CONSISTENT)
    }

    /// Unlock as Go does, the semaphore holding only us: read the `.lock`, take us out, delete
    /// the contender key, destroy the session.
    fn release(&mut self, session: &str, limit: u32) {
        self.unlock().unwrap();
        self.answer(
            "GET /v1/kv/p/.lock?!recurse",
            reply::kv(8, &lock_kv(limit, &[session], 8)),
        );
        let out = self.answer(&cas_pattern(8), yes());
        assert_eq!(out.body, state(limit, &[]));
        self.answer(&format!("DELETE /v1/kv/p/{session}?!cas"), yes());
        if let SessionChoice::Create(_) = self.m().options().hold.session {
            self.answer(&format!("PUT /v1/session/destroy/{session}"), yes());
        }
        assert_eq!(self.events(), [LockEvent::Released]);
        assert!(self.m().is_quiescent());
    }
}

// ----- a fake Consul -----------------------------------------------------------------------------

/// Just enough of Consul for semaphores: KV entries, prefix lists whose index moves with any
/// write or delete under the prefix, sessions with behavior `delete` or `release`, acquire,
/// check-and-set writes and deletes, and blocking reads held until the index moves or the wait
/// ends. Sessions never expire on their own.
#[derive(Debug)]
struct SFake {
    index: u64,
    kv: BTreeMap<String, Kv>,
    /// Deleted keys and when.
    tombstones: BTreeMap<String, u64>,
    /// Live sessions: whether their behavior is `delete`.
    sessions: BTreeMap<String, bool>,
    next_session: u64,
}

impl SFake {
    fn new() -> SFake {
        SFake {
            index: 10,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 1,
        }
    }

    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn list_index(&self, prefix: &str) -> u64 {
        let entries = self
            .kv
            .values()
            .filter(|e| e.key.starts_with(prefix))
            .map(|e| e.modify_index);
        let deleted = self
            .tombstones
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i);
        entries.chain(deleted).max().unwrap_or(self.index)
    }

    fn key_index(&self, key: &str) -> u64 {
        self.kv
            .get(key)
            .map(|e| e.modify_index)
            .or_else(|| self.tombstones.get(key).copied())
            .unwrap_or(self.index)
    }

    fn write(&mut self, key: &str, flags: u64, value: Vec<u8>, session: Option<String>) {
        let i = self.bump();
        let e = self.kv.entry(key.to_owned()).or_insert_with(|| Kv {
            key: key.to_owned(),
            lock_index: 0,
            flags,
            value: Vec::new(),
            session: None,
            create_index: i,
            modify_index: i,
        });
        if session.is_some() && e.session != session {
            e.lock_index += 1;
        }
        e.flags = flags;
        e.value = value;
        e.session = session;
        e.modify_index = i;
        self.tombstones.remove(key);
    }

    fn delete(&mut self, key: &str) {
        if self.kv.remove(key).is_some() {
            let i = self.bump();
            self.tombstones.insert(key.to_owned(), i);
        }
    }

    /// Adds a live session with behavior `delete`.
    fn add_session(&mut self, id: &str) {
        self.sessions.insert(id.to_owned(), true);
    }

    /// Ends `session` as Consul does: its keys are deleted (or released).
    fn invalidate(&mut self, session: &str) {
        let Some(delete) = self.sessions.remove(session) else {
            return;
        };
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(session))
            .map(|e| e.key.clone())
            .collect();
        for key in held {
            if delete {
                self.delete(&key);
            } else {
                let i = self.bump();
                if let Some(e) = self.kv.get_mut(&key) {
                    e.session = None;
                    e.modify_index = i;
                }
            }
        }
    }

    /// The `.lock`'s holders.
    fn holders(&self) -> BTreeSet<String> {
        self.kv
            .get(LOCK)
            .and_then(|e| holders_of(&e.value))
            .unwrap_or_default()
    }

    /// The holders whose session still holds a key under the prefix (Go's pruning).
    fn live_holders(&self) -> BTreeSet<String> {
        let live: BTreeSet<&str> = self.kv.values().filter_map(|e| e.session.as_deref()).collect();
        self.holders()
            .into_iter()
            .filter(|h| live.contains(h.as_str()))
            .collect()
    }

    fn list(&self, prefix: &str, leader: Option<bool>) -> Reply {
        let entries: Vec<Kv> = self
            .kv
            .values()
            .filter(|e| e.key.starts_with(prefix))
            .cloned()
            .collect();
        listing_leader(self.list_index(prefix), leader, &entries)
    }

    /// Answers `sent` at once, even a blocking read the fake would hold.
    fn serve_now(&mut self, sent: &Sent, now: Instant) -> Reply {
        if let Some(reply) = self.serve(sent, now) {
            return reply;
        }
        match sent.kind() {
            Kind::List { prefix, .. } => self.list(&prefix, Some(true)),
            Kind::Get { key, .. } => match self.kv.get(&key) {
                Some(e) => reply::kv(self.key_index(&key), e),
                None => reply::missing(self.key_index(&key)),
            },
            _ => unreachable!("only reads are held"),
        }
    }

    /// Answers `sent` at `now`, or holds it (`None`): a blocking read whose index has not moved
    /// and whose wait has not run out.
    fn serve(&mut self, sent: &Sent, now: Instant) -> Option<Reply> {
        Some(match sent.kind() {
            Kind::Create => {
                let body: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
                let id = format!("fake-{}", self.next_session);
                self.next_session += 1;
                self.sessions.insert(id.clone(), body["Behavior"] == "delete");
                reply::created(&id)
            }
            Kind::Renew(id) if self.sessions.contains_key(&id) => reply::renewed(&id),
            Kind::Renew(id) => reply::session_gone(&id),
            Kind::Destroy(id) => {
                self.invalidate(&id);
                yes()
            }
            Kind::List { prefix, index, .. } => {
                let current = self.list_index(&prefix);
                if let (Some(index), Some(wake)) = (index, sent.wake_at()) {
                    if current <= index && now < wake {
                        return None;
                    }
                }
                self.list(&prefix, Some(true))
            }
            Kind::Get { key, .. } => match self.kv.get(&key) {
                Some(e) => reply::kv(self.key_index(&key), e),
                None => reply::missing(self.key_index(&key)),
            },
            Kind::Acquire { key, session } => {
                if !self.sessions.contains_key(&session) {
                    return Some(reply::invalid_session(&session));
                }
                let flags = sent.param("flags").map_or(0, |f| f.parse().unwrap());
                match self.kv.get(&key).and_then(|e| e.session.clone()) {
                    Some(holder) if holder != session => reply::no(),
                    _ => {
                        self.write(&key, flags, sent.body.clone(), Some(session));
                        yes()
                    }
                }
            }
            Kind::CasPut { key, cas } => {
                let current = self.kv.get(&key).map(|e| e.modify_index);
                let ok = match (cas, current) {
                    (0, None) => true,
                    (cas, Some(m)) => cas == m,
                    _ => false,
                };
                if !ok {
                    return Some(reply::no());
                }
                let flags = sent.param("flags").map_or(0, |f| f.parse().unwrap());
                let session = self.kv.get(&key).and_then(|e| e.session.clone());
                self.write(&key, flags, sent.body.clone(), session);
                yes()
            }
            Kind::Remove { key } => {
                if self.kv.contains_key(&key) {
                    self.delete(&key);
                }
                yes()
            }
            Kind::Delete { key, cas } => match self.kv.get(&key) {
                None => yes(),
                Some(e) if e.modify_index == cas => {
                    self.delete(&key);
                    yes()
                }
                Some(_) => reply::no(),
            },
            _ => reply::status(400, "unsupported"),
        })
    }
}

// ================================================================================================
// The Go reference client's scenarios
// ================================================================================================

/// Go's TestAPI_SemaphoreAcquireRelease: acquire (Go's session, keys, flags and JSON on the
/// wire), hold while renewing, release (out of the `.lock`, contender key deleted, session
/// destroyed); release twice is an error.
#[test]
fn go_acquire_release() {
    let mut o = options(2);
    o.hold.value = b"node-1".to_vec();
    let mut r = SRig::new(o);
    assert_eq!(r.unlock(), Err(Misuse::NotHeld));

    r.lock().unwrap();
    assert_eq!(r.m().status(), LockStatus::Acquiring);
    assert_eq!(r.lock(), Err(Misuse::AlreadyHeld));
    let create = r.expect("PUT /v1/session/create");
    let body: serde_json::Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!(body["Name"], "Consul API Semaphore");
    assert_eq!(body["TTL"], "15s");
    assert_eq!(body["Behavior"], "delete");
    r.reply(create.id, reply::created("s1"));

    // The contender key, with the value and the semaphore's flags.
    let contend = r.answer(&contend_pattern("s1"), yes());
    assert_eq!(contend.body, b"node-1");
    // The prefix, listed; the .lock is missing: created with a check-and-set on 0.
    let list = r.answer(&format!("{LIST}&!index&!wait"), listing(6, &[contender("s1", 6)]));
    assert!(!list.has("consistent"));
    let cas = r.answer(&cas_pattern(0), yes());
    assert_eq!(cas.body, br#"{"Limit":2,"Holders":{"s1":true}}"#);
    let confirmed = [contender("s1", 6), lock_kv(2, &["s1"], 7)];
    r.answer(&format!("{CONSISTENT}&!index"), listing(7, &confirmed));
    let token = FencingToken {
        key: consul_lock_core::api::Key::new(LOCK).unwrap(),
        session: SessionId::new("s1").unwrap(),
        lock_index: 7,
        modify_index: 7,
    };
    assert_eq!(r.events(), [LockEvent::Acquired(token.clone())]);
    assert_eq!(r.m().status(), LockStatus::Held);
    assert_eq!(r.m().token(), Some(&token));
    assert_eq!(r.lock(), Err(Misuse::AlreadyHeld));

    // The monitor blocks on the confirm's index.
    let watch = r.expect(&format!("{CONSISTENT}&index=7&wait=300000ms"));
    r.advance(ms(7500));
    r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    r.advance(ms(7500));
    r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    assert!(r.events().is_empty());

    r.unlock().unwrap();
    assert_eq!(r.m().status(), LockStatus::Releasing);
    assert_eq!(r.unlock(), Err(Misuse::NotHeld));
    assert_eq!(r.lock(), Err(Misuse::Busy));
    // Read the .lock (another holder joined meanwhile), take us out with a check-and-set.
    r.answer(
        "GET /v1/kv/p/.lock?!recurse",
        reply::kv(9, &lock_kv(2, &["s1", "s2"], 9)),
    );
    let out = r.answer(&cas_pattern(9), yes());
    assert_eq!(out.body, br#"{"Limit":2,"Holders":{"s2":true}}"#);
    // Then a plain delete of the contender key, as Go's.
    r.answer("DELETE /v1/kv/p/s1?!cas", yes());
    assert!(
        r.events().is_empty(),
        "Released only once the session is destroyed"
    );
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);
    assert!(r.m().is_quiescent());

    // The monitor's answer, arriving now, is ignored.
    r.reply(watch.id, listing(10, &[]));
    assert!(r.events().is_empty());
}

/// Go's TestAPI_SemaphoreForceInvalidate: the session is destroyed; its contender key goes with
/// it (behavior delete), and the holder learns it from the monitor, or from the renewal.
#[test]
fn go_force_invalidate() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.advance(secs(3));
    r.reply(r.monitor().id, listing(9, &[lock_kv(2, &["s1"], 7)]));
    assert_eq!(r.events(), [LockEvent::Lost(LossReason::KeyDeleted)]);
    assert_eq!(r.m().status(), LockStatus::Idle);
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());

    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.advance(ms(7500));
    r.answer("PUT /v1/session/renew/s1", reply::session_gone("s1"));
    assert_eq!(r.events(), [LockEvent::Lost(LossReason::SessionInvalidated)]);
    assert_eq!(r.count("PUT /v1/session/destroy/s1"), 0, "Consul already did");
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_SemaphoreDeleteKey: the semaphore's keys are deleted under the holder; and each
/// other authoritative change to the listing, with its reason.
#[test]
fn go_delete_key() {
    let cases: Vec<(Vec<Kv>, LossReason)> = vec![
        // The whole tree.
        (vec![], LossReason::KeyDeleted),
        // Our contender key alone.
        (vec![lock_kv(2, &["s1"], 9)], LossReason::KeyDeleted),
        // The .lock alone.
        (vec![contender("s1", 6)], LossReason::KeyDeleted),
        // Taken out of the holders.
        (
            vec![contender("s1", 6), lock_kv(2, &["s2"], 9)],
            LossReason::NotHeld,
        ),
        // The contender key released (a release-behavior session was invalidated).
        (
            vec![contender("s1", 6).free(), lock_kv(2, &["s1"], 9)],
            LossReason::NotHeld,
        ),
        // The .lock overwritten by a lock (or a plain write).
        (
            vec![contender("s1", 6), lock_kv(2, &["s1"], 9).flags(LOCK_FLAG_VALUE)],
            LossReason::Conflict {
                flags: LOCK_FLAG_VALUE,
            },
        ),
        // The .lock overwritten with something that is not a semaphore's state.
        (
            vec![contender("s1", 6), lock_kv(2, &["s1"], 9).value(b"[1]")],
            LossReason::NotHeld,
        ),
    ];
    for (entries, reason) in cases {
        let mut r = SRig::new(options(2));
        r.acquire("s1", 2);
        r.advance(secs(1));
        r.reply(r.monitor().id, listing(9, &entries));
        assert_eq!(r.events(), [LockEvent::Lost(reason)]);
        assert_eq!(r.last_event_at(), r.clock.at(secs(1)), "at once");
        r.answer("PUT /v1/session/destroy/s1", yes());
        assert!(r.m().is_quiescent());
    }
}

/// Go's TestAPI_SemaphoreContend: four contenders on a semaphore of two: never more than two
/// hold at once (by their own account and by the `.lock`'s), and every one holds in turn.
#[test]
fn go_contend() {
    let mut clock = Clock::new();
    let mut fake = SFake::new();
    let mut nodes: Vec<SNode> = (0..4u64)
        .map(|i| {
            let mut o = options(2);
            o.hold.seed = i;
            o.hold.value = format!("node-{i}").into_bytes();
            snode(o)
        })
        .collect();
    for n in &mut nodes {
        n.lock(clock.now()).unwrap();
    }
    let mut held_since: Vec<Option<Instant>> = vec![None; 4];
    let mut released = [false; 4];
    let mut most = 0;
    let deadline = clock.now() + secs(300);
    while !released.iter().all(|r| *r) {
        assert!(clock.now() < deadline, "not everyone held within 300 s");
        let until = clock.now() + secs(1);
        run(
            &mut clock,
            &mut nodes,
            until,
            &mut |s, now| fake.serve(s, now),
            &mut |ns| {
                let holding = ns.iter().filter(|n| n.m.status() == LockStatus::Held).count();
                assert!(holding <= 2, "{holding} hold a semaphore of 2");
                most = most.max(holding);
                false
            },
        );
        assert!(
            fake.live_holders().len() <= 2,
            "the .lock lists {:?}",
            fake.holders()
        );
        let now = clock.now();
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.m.status() == LockStatus::Held {
                let since = *held_since[i].get_or_insert(now);
                let token = n.m.token().unwrap().clone();
                assert!(fake.holders().contains(token.session.as_str()));
                assert_eq!(
                    fake.kv[&format!("{PREFIX}/{}", token.session)].value,
                    format!("node-{i}").into_bytes()
                );
                // Hold for 20 s (renewals, the waiters' blocking lists running out), then release.
                if now - since >= secs(20) {
                    n.unlock(now).unwrap();
                }
            }
            if n.m.status() == LockStatus::Idle && held_since[i].is_some() {
                released[i] = true;
            }
        }
    }
    assert_eq!(most, 2, "two hold at once");
    for n in &mut nodes {
        let events = n.take_events();
        assert!(
            matches!(events[..], [LockEvent::Acquired(_), LockEvent::Released]),
            "{events:?}"
        );
    }
    let end = clock.now() + secs(30);
    run(
        &mut clock,
        &mut nodes,
        end,
        &mut |s, now| fake.serve(s, now),
        &mut |ns| ns.iter().all(|n| n.m.is_quiescent()),
    );
    assert!(nodes.iter().all(|n| n.m.is_quiescent()));
    assert!(
        fake.sessions.is_empty(),
        "every session destroyed: {:?}",
        fake.sessions
    );
    assert!(
        fake.holders().is_empty(),
        "everyone took itself out: {:?}",
        fake.holders()
    );
    assert_eq!(
        fake.kv.keys().collect::<Vec<_>>(),
        [LOCK],
        "only the .lock is left"
    );
}

/// Go's TestAPI_SemaphoreBadLimit: a limit of 0 is refused up front; a contender whose limit
/// differs from the `.lock`'s fails, and its session is destroyed.
#[test]
fn go_bad_limit() {
    assert_eq!(SemaphoreOptions::new(PREFIX, 0).err(), Some(OptionsError::Limit));
    let mut o = options(1);
    o.limit = 0;
    assert_eq!(
        SemaphoreMachine::new(ClientConfig::default(), o).err(),
        Some(OptionsError::Limit)
    );

    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s2"));
    r.answer(&contend_pattern("s2"), yes());
    let entries = [contender("s1", 5), contender("s2", 6), lock_kv(1, &["s1"], 7)];
    r.answer(LIST, listing(7, &entries));
    assert_eq!(
        r.events(),
        [LockEvent::Failed(LockError::LimitMismatch { ours: 2, theirs: 1 })]
    );
    assert!(r.last_sent("PUT /v1/kv/p/.lock").is_none(), "never written");
    r.answer("PUT /v1/session/destroy/s2", yes());
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_SemaphoreDestroy: destroy while held, while another holds, while a contender
/// waits, on a free semaphore, twice, after a race, and on a lock's key.
#[test]
fn go_destroy() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    assert_eq!(r.destroy(), Err(Misuse::AlreadyHeld));
    r.release("s1", 2);

    // Another session holds a slot: in use.
    r.destroy().unwrap();
    assert_eq!(r.m().status(), LockStatus::Destroying);
    assert_eq!(r.lock(), Err(Misuse::Busy));
    assert_eq!(r.destroy(), Err(Misuse::Busy));
    let entries = [contender("s2", 8), lock_kv(2, &["s2"], 9)];
    r.answer("GET /v1/kv/p?recurse&!index", listing(9, &entries));
    assert_eq!(r.events(), [LockEvent::Failed(LockError::SemaphoreInUse)]);
    assert!(r.m().is_quiescent());

    // A contender waits (live session, not a holder): in use.
    r.destroy().unwrap();
    let entries = [contender("s3", 8), lock_kv(2, &[], 9)];
    r.answer("GET /v1/kv/p?recurse", listing(9, &entries));
    assert_eq!(r.events(), [LockEvent::Failed(LockError::SemaphoreInUse)]);

    // Holders listed, but dead (their contender keys are gone): deleted with a check-and-set.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/p?recurse", listing(9, &[lock_kv(2, &["gone"], 9)]));
    r.answer("DELETE /v1/kv/p/.lock?cas=9", yes());
    assert_eq!(r.events(), [LockEvent::Destroyed]);

    // Twice: already gone.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/p?recurse", listing(10, &[]));
    assert_eq!(r.events(), [LockEvent::Destroyed]);
    assert_eq!(r.count("DELETE /v1/kv/p/.lock"), 0);

    // Someone joined between the list and the delete.
    r.destroy().unwrap();
    r.answer("GET /v1/kv/p?recurse", listing(11, &[lock_kv(2, &[], 11)]));
    r.answer("DELETE /v1/kv/p/.lock?cas=11", reply::no());
    assert_eq!(r.events(), [LockEvent::Failed(LockError::SemaphoreInUse)]);

    // Not a semaphore.
    r.destroy().unwrap();
    let lock = lock_kv(2, &[], 12).flags(LOCK_FLAG_VALUE);
    r.answer("GET /v1/kv/p?recurse", listing(12, &[lock]));
    assert_eq!(
        r.events(),
        [LockEvent::Failed(LockError::SemaphoreConflict {
            flags: LOCK_FLAG_VALUE
        })]
    );
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_SemaphoreConflict: a lock (or a plain key) on `<prefix>/.lock` is not taken for a
/// semaphore, and the session made for the attempt is destroyed.
#[test]
fn go_conflict() {
    for flags in [LOCK_FLAG_VALUE, 0, 42] {
        let mut r = SRig::new(options(2));
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        r.answer(&contend_pattern("s1"), yes());
        let lock = Kv {
            key: LOCK.to_owned(),
            lock_index: 1,
            flags,
            value: b"held".to_vec(),
            session: Some("locker".to_owned()),
            create_index: 3,
            modify_index: 3,
        };
        r.answer(LIST, listing(7, &[lock, contender("s1", 6)]));
        assert_eq!(
            r.events(),
            [LockEvent::Failed(LockError::SemaphoreConflict { flags })]
        );
        assert!(r.last_sent("PUT /v1/kv/p/.lock").is_none(), "never written");
        r.answer("PUT /v1/session/destroy/s1", yes());
        assert!(r.m().is_quiescent());
    }
}

/// Go's TestAPI_SemaphoreMonitorRetry with `monitor_retries = Some(3)`: failures in a row up to
/// the limit are borne (2 s apart, index reset), one more loses with MonitorFailed.
#[test]
fn go_monitor_retry() {
    let mut o = options(2);
    o.hold.monitor_retries = Some(3);
    let mut r = SRig::new(o);
    r.acquire("s1", 2);
    let held = [contender("s1", 6), lock_kv(2, &["s1"], 7)];

    r.reply(r.monitor().id, reply::no_leader());
    assert!(r.find("GET /v1/kv/p").is_none(), "paused before retrying");
    let failed_at = r.now();
    r.run(secs(2), renew_ok);
    let retry = r.monitor();
    assert_eq!(retry.at, failed_at + secs(2), "Go's monitor retry time");
    assert!(!retry.has("index"), "the index is reset after a failure");
    r.reply(retry.id, reply::refused());
    r.run(secs(2), renew_ok);
    r.reply(r.monitor().id, listing(8, &held));
    assert!(r.events().is_empty());
    r.expect(&format!("{CONSISTENT}&index=8"));

    for _ in 0..3 {
        r.reply(r.monitor().id, reply::status(500, "rpc error making call: EOF"));
        r.run(secs(2), renew_ok);
        assert_eq!(r.m().status(), LockStatus::Held);
    }
    r.reply(r.monitor().id, reply::status(500, "rpc error making call: EOF"));
    let events = r.events();
    let [LockEvent::Lost(LossReason::MonitorFailed { failures, last })] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(*failures, 4);
    assert!(last.contains("500") && last.contains("rpc error"), "{last}");
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// Go's TestAPI_SemaphoreOneShot: try-once gives up between 1x and 2x the wait with its own
/// outcome, leaving nothing behind; once a slot frees, the next try succeeds.
#[test]
fn go_one_shot() {
    let mut o = options(2);
    o.hold.try_once = true;
    o.hold.wait_time = ms(250);
    let mut r = SRig::new(o);
    let mut fake = SFake::new();
    for s in ["a", "b"] {
        fake.add_session(s);
        fake.write(
            &format!("{PREFIX}/{s}"),
            SEMAPHORE_FLAG_VALUE,
            Vec::new(),
            Some(s.to_owned()),
        );
    }
    fake.write(LOCK, SEMAPHORE_FLAG_VALUE, state(2, &["a", "b"]), None);

    let start = r.now();
    r.lock().unwrap();
    assert!(r.run_until(secs(10), |s, now| fake.serve(s, now), |n| n.m.is_quiescent()));
    let waited = r.last_event_at() - start;
    assert_eq!(r.events(), [LockEvent::GaveUp]);
    assert!(waited >= ms(250) && waited <= ms(500), "{waited:?}");
    assert_eq!(r.m().token(), None);
    assert_eq!(fake.holders(), ["a", "b"].map(str::to_owned).into());
    assert!(
        fake.sessions.keys().all(|s| s == "a" || s == "b"),
        "the attempt's session is gone"
    );
    assert!(
        fake.kv.keys().all(|k| k == "p/a" || k == "p/b" || k == LOCK),
        "and its contender key with it: {:?}",
        fake.kv.keys()
    );

    // A holder goes: the next try gets its slot.
    fake.invalidate("a");
    r.lock().unwrap();
    let held = r.run_until(
        secs(10),
        |s, now| fake.serve(s, now),
        |n| n.m.status() == LockStatus::Held,
    );
    assert!(held);
    let token = r.m().token().unwrap().clone();
    assert_eq!(fake.holders(), ["b".to_owned(), token.session.to_string()].into());
}

// ================================================================================================
// The renew deadline (hashicorp/consul#18271)
// ================================================================================================

/// Renewals hang and the monitor read sits parked: Lost comes at the send time of the last
/// acknowledged renew plus the TTL, exactly, and the session is destroyed.
#[test]
fn renew_deadline_when_renewals_hang_and_the_monitor_is_parked() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    let parked = r.monitor();
    r.advance(ms(7500));
    r.answer("PUT /v1/session/renew/s1", reply::renewed("s1"));
    assert_eq!(r.m().session().renew_deadline(), Some(r.clock.at(ms(22_500))));
    r.advance(ms(7500));
    r.expect("PUT /v1/session/renew/s1");
    r.advance_to(r.clock.at(ms(22_499)));
    assert_eq!(r.m().status(), LockStatus::Held);
    r.advance(ms(1));
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(15) })]
    );
    assert_eq!(r.last_event_at(), r.clock.at(ms(22_500)));
    r.expect("PUT /v1/session/destroy/s1");
    r.reply(
        parked.id,
        listing(7, &[contender("s1", 6), lock_kv(2, &["s1"], 7)]),
    );
    assert!(r.events().is_empty());
}

/// A monitor that keeps saying "still yours" does not keep a slot whose renewals go unanswered.
#[test]
fn renew_deadline_whatever_the_monitor_says() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    let mut index = 7;
    let lost = r.run_until(
        secs(60),
        |s, now| match s.kind() {
            Kind::List { .. } if now >= s.at + secs(3) => {
                index += 1;
                Some(listing(index, &[contender("s1", 6), lock_kv(2, &["s1"], index)]))
            }
            _ => None,
        },
        |n| n.m.status() != LockStatus::Held,
    );
    assert!(lost);
    assert_eq!(
        r.events(),
        [LockEvent::Lost(LossReason::RenewDeadline { since_ack: secs(15) })]
    );
    assert_eq!(r.t(), secs(15));
}

// ================================================================================================
// Usable again (hashicorp/consul#4935, #4902)
// ================================================================================================

#[test]
fn lock_again_after_a_loss_a_release_and_a_failure() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.reply(
        r.monitor().id,
        listing(9, &[contender("s1", 6), lock_kv(2, &[], 9)]),
    );
    assert_eq!(r.events(), [LockEvent::Lost(LossReason::NotHeld)]);
    // At once, while the old session is still being destroyed.
    r.lock().unwrap();
    r.answer("PUT /v1/session/destroy/s1", yes());
    r.finish_acquire("s2", 2);

    r.release("s2", 2);
    r.acquire("s3", 2);
    r.release("s3", 2);

    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s4"));
    r.answer(&contend_pattern("s4"), reply::status(403, "Permission denied"));
    assert!(matches!(
        r.events()[..],
        [LockEvent::Failed(LockError::PermissionDenied(_))]
    ));
    r.lock().unwrap();
    r.answer("PUT /v1/session/destroy/s4", yes());
    r.finish_acquire("s5", 2);
}

#[test]
fn lock_again_after_a_renew_deadline_loss() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.run(secs(16), |_, _| None);
    assert!(matches!(
        r.events()[..],
        [LockEvent::Lost(LossReason::RenewDeadline { .. })]
    ));
    r.lock().unwrap();
    // The destroy sent at the loss never gets an answer: it times out, then a new session.
    r.run_until(
        secs(30),
        |_, _| None,
        |n| n.find("PUT /v1/session/create").is_some(),
    );
    r.finish_acquire("s2", 2);
}

// ================================================================================================
// Cancel (hashicorp/consul#2992, #5087)
// ================================================================================================

/// Cancel during a blocking list: Cancelled from the cancel call itself, the session destroyed
/// at once (its contender key goes with it), the list's late answer ignored; `lock` works again.
#[test]
fn cancel_acts_at_once_during_a_blocking_list() {
    let mut r = SRig::new(options(1));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    let full = [
        contender("other", 4),
        contender("s1", 6),
        lock_kv(1, &["other"], 5),
    ];
    r.answer(LIST, listing(6, &full));
    let read = r.expect(&format!("{LIST}&index=6&wait=15000ms"));
    r.advance(secs(3));
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    assert_eq!(r.m().status(), LockStatus::Idle);
    let destroy = r.expect("PUT /v1/session/destroy/s1");
    assert_eq!(destroy.at, r.now());
    r.reply(read.id, listing(8, &[contender("s1", 6), lock_kv(1, &[], 8)]));
    assert!(r.last_sent("PUT /v1/kv/p/.lock").is_none());
    r.reply(destroy.id, yes());
    assert!(r.m().is_quiescent());
    r.cancel();
    assert!(r.events().is_empty());

    r.lock().unwrap();
    r.finish_acquire("s2", 1);
}

/// Cancel while the session create is in flight: Cancelled at once; the session is destroyed
/// once the create answers.
#[test]
fn cancel_while_creating_destroys_the_session_once_created() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    let create = r.expect("PUT /v1/session/create");
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.reply(create.id, reply::created("s1"));
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
    assert!(r.last_sent("PUT /v1/kv/p/s1").is_none());
}

/// Cancel while holding releases; while releasing does nothing more; while destroying abandons
/// the destroy at once.
#[test]
fn cancel_while_held_releasing_or_destroying() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.cancel();
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Releasing);
    r.cancel();
    assert_eq!(r.count("GET /v1/kv/p/.lock"), 1);
    r.answer("GET /v1/kv/p/.lock", reply::kv(8, &lock_kv(2, &["s1"], 8)));
    r.answer(&cas_pattern(8), yes());
    r.answer("DELETE /v1/kv/p/s1", yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);

    r.destroy().unwrap();
    let list = r.expect("GET /v1/kv/p?recurse");
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.reply(list.id, listing(9, &[lock_kv(2, &[], 9)]));
    assert_eq!(r.count("DELETE /v1/kv/p/.lock"), 0);
    assert!(r.m().is_quiescent());
}

/// With the caller's session, no session destroy takes the contender key: a cancel deletes it
/// (after the contender acquire in flight, if any, has answered), and a new attempt waits for
/// that delete before making the key again.
#[test]
fn cancel_with_the_callers_session_deletes_the_contender_key() {
    // The contender acquire is in flight at the cancel.
    let mut r = SRig::new(existing("mine", 2));
    r.lock().unwrap();
    assert_eq!(r.count("PUT /v1/session/create"), 0);
    let contend = r.expect(&contend_pattern("mine"));
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    assert!(!r.m().is_quiescent(), "waits to learn whether the key was made");
    assert_eq!(r.count("DELETE /v1/kv/p/mine"), 0, "not before the acquire lands");
    // A new attempt meanwhile waits.
    r.lock().unwrap();
    assert_eq!(r.count("PUT /v1/kv/p/mine"), 1, "only the abandoned one");
    r.reply(contend.id, yes());
    let delete = r.expect("DELETE /v1/kv/p/mine?!cas");
    assert_eq!(r.count("PUT /v1/kv/p/mine"), 0);
    r.reply(delete.id, yes());
    // Now the new attempt makes the key again.
    r.finish_acquire("mine", 2);

    // Waiting for a slot at the cancel: the key is deleted at once. The session is not.
    let mut r = SRig::new(existing("mine", 1));
    r.lock().unwrap();
    r.answer(&contend_pattern("mine"), yes());
    let full = [
        contender("mine", 6),
        contender("other", 4),
        lock_kv(1, &["other"], 5),
    ];
    r.answer(LIST, listing(6, &full));
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.answer("DELETE /v1/kv/p/mine?!cas", yes());
    assert!(r.last_sent("PUT /v1/session/destroy/mine").is_none());
    assert!(r.m().is_quiescent());

    // A refused contender acquire made nothing: nothing to delete.
    let mut r = SRig::new(existing("mine", 1));
    r.lock().unwrap();
    let contend = r.expect(&contend_pattern("mine"));
    r.cancel();
    r.reply(contend.id, reply::no());
    assert!(r.last_sent("DELETE /v1/kv/p/mine").is_none());
    assert!(r.m().is_quiescent());
}

/// With the caller's session, a lost slot deletes the contender key too, so that the others
/// prune us even if our session lives on.
#[test]
fn loss_with_the_callers_session_deletes_the_contender_key() {
    let mut o = existing("mine", 2);
    o.hold.monitor_retries = Some(0);
    let mut r = SRig::new(o);
    r.acquire("mine", 2);
    assert_eq!(
        r.m().session().renew_deadline(),
        None,
        "the caller renews its session"
    );
    r.reply(r.monitor().id, reply::no_leader());
    assert!(matches!(
        r.events()[..],
        [LockEvent::Lost(LossReason::MonitorFailed { .. })]
    ));
    r.answer("DELETE /v1/kv/p/mine?!cas", yes());
    assert!(r.m().is_quiescent());

    // And release leaves the session alone.
    let mut r = SRig::new(existing("mine", 2));
    r.acquire("mine", 2);
    r.release("mine", 2);
    assert!(r.last_sent("PUT /v1/session/destroy/mine").is_none());
}

// ================================================================================================
// Try-once (vitessio/vitess#8309)
// ================================================================================================

/// Giving up is GaveUp, never Acquired, and nothing that arrives later turns it into one.
#[test]
fn try_once_gives_up_with_its_own_outcome() {
    let mut o = options(1);
    o.hold.try_once = true;
    o.hold.wait_time = secs(2);
    let mut r = SRig::new(o);
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    let full = [
        contender("other", 4),
        contender("s1", 6),
        lock_kv(1, &["other"], 5),
    ];
    r.answer(LIST, listing(6, &full));
    let read = r.expect(&format!("{LIST}&index=6"));
    assert!(
        read.wait().unwrap() <= secs(2),
        "no read outlasts the give-up time"
    );
    r.advance(secs(2));
    assert_eq!(r.events(), [LockEvent::GaveUp]);
    r.reply(read.id, listing(8, &[contender("s1", 6), lock_kv(1, &[], 8)]));
    assert!(r.last_sent("PUT /v1/kv/p/.lock").is_none());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
    assert!(r.events().is_empty());
}

/// A check-and-set still in flight when the wait ends is waited for: granted, the slot is ours;
/// refused, the attempt gives up.
#[test]
fn try_once_waits_for_a_check_and_set_in_flight() {
    for granted in [true, false] {
        let mut o = options(2);
        o.hold.try_once = true;
        o.hold.wait_time = secs(2);
        let mut r = SRig::new(o);
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        r.answer(&contend_pattern("s1"), yes());
        r.advance(ms(1900));
        r.answer(LIST, listing(6, &[contender("s1", 6)]));
        let cas = r.expect(&cas_pattern(0));
        r.advance(secs(1));
        assert_eq!(r.m().status(), LockStatus::Acquiring);
        if granted {
            r.reply(cas.id, yes());
            r.answer(
                CONSISTENT,
                listing(7, &[contender("s1", 6), lock_kv(2, &["s1"], 7)]),
            );
            assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
        } else {
            r.reply(cas.id, reply::no());
            assert_eq!(r.events(), [LockEvent::GaveUp]);
        }
    }
}

// ================================================================================================
// Transient errors while holding (hashicorp/consul#830, #1162, #5437)
// ================================================================================================

/// With the default `monitor_retries = None`, monitor failures of every transient kind are borne
/// for as long as renewals succeed.
#[test]
fn transient_monitor_errors_do_not_lose_a_renewed_slot() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    let faults = || {
        vec![
            reply::no_leader(),
            reply::status(502, "Bad Gateway"),
            reply::status(429, "rate limited"),
            reply::refused(),
            reply::reset(),
            reply::timed_out(),
            // A server that knows no leader may answer from stale state, even "all gone".
            listing_leader(9, Some(false), &[]),
            listing_leader(9, Some(false), &[lock_kv(2, &["x"], 9)]),
            reply::raw(200, Some(9), Some(true), "<html>proxy</html>"),
        ]
    };
    for fault in faults().into_iter().chain(faults()) {
        r.reply(r.monitor().id, fault);
        assert_eq!(r.m().status(), LockStatus::Held);
        r.run(secs(2), renew_ok);
        assert!(!r.monitor().has("index"));
    }
    assert!(r.t() >= secs(36));
    assert!(r.events().is_empty());
    r.reply(
        r.monitor().id,
        listing(20, &[contender("s1", 6), lock_kv(2, &["s1"], 7)]),
    );
    r.expect(&format!("{CONSISTENT}&index=20"));

    // A refusal is not retried.
    r.reply(r.monitor().id, reply::status(403, "Permission denied"));
    assert!(matches!(
        r.events()[..],
        [LockEvent::Lost(LossReason::MonitorFailed { failures: 1, .. })]
    ));
}

/// Failing renewals within the deadline don't lose the slot either.
#[test]
fn transient_renew_errors_within_the_deadline_do_not_lose() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    let mut n = 0;
    r.run(secs(120), |s, _| match s.kind() {
        Kind::Renew(id) => {
            n += 1;
            Some(match n % 4 {
                0 => reply::renewed(&id),
                1 => reply::no_leader(),
                2 => reply::refused(),
                _ => reply::status(503, ""),
            })
        }
        _ => None,
    });
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Held);
}

/// Transient failures while acquiring are retried; refusals fail the attempt.
#[test]
fn transient_errors_while_acquiring_are_retried() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), reply::no_leader());
    assert!(r.run_until(secs(1), renew_ok, |n| n.find("PUT /v1/kv/p/s1").is_some()));
    r.answer(&contend_pattern("s1"), yes());
    r.answer(LIST, reply::refused());
    assert!(r.run_until(secs(1), renew_ok, |n| n.find(LIST).is_some()));
    r.answer(LIST, listing(6, &[contender("s1", 6)]));
    // A check-and-set without an answer may have been applied: the next list tells.
    r.answer(&cas_pattern(0), reply::timed_out());
    assert!(r.run_until(secs(2), renew_ok, |n| n.find(LIST).is_some()));
    let applied = [contender("s1", 6), lock_kv(2, &["s1"], 7)];
    r.answer(LIST, listing(7, &applied));
    assert!(
        r.find("PUT /v1/kv/p/.lock").is_none(),
        "already a holder: no second write"
    );
    r.answer(CONSISTENT, reply::status(503, ""));
    assert!(r.run_until(secs(3), renew_ok, |n| n.find(CONSISTENT).is_some()));
    r.answer(CONSISTENT, listing(7, &applied));
    let events = r.events();
    let retries = events
        .iter()
        .filter(|e| matches!(e, LockEvent::Retrying(_)))
        .count();
    assert_eq!(retries, 4, "each failure reported: {events:?}");
    assert!(matches!(events.last(), Some(LockEvent::Acquired(_))));
}

// ================================================================================================
// The semaphore's own rules
// ================================================================================================

/// Holders whose session holds no key under the prefix are pruned, and their slots taken; the
/// others are kept as written (Go keeps any entry of the map).
#[test]
fn dead_holders_are_pruned() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    // "dead" has no key; "live" holds one (not necessarily its contender key, as Go counts it).
    let mut lock = lock_kv(2, &["dead", "live"], 8);
    lock.value = br#"{"Limit":2,"Holders":{"dead":true,"live":false}}"#.to_vec();
    let entries = [contender("s1", 6), lock, contender("x", 7).held_by("live", 1)];
    r.answer(LIST, listing(8, &entries));
    let cas = r.answer(&cas_pattern(8), yes());
    assert_eq!(cas.body, br#"{"Limit":2,"Holders":{"live":false,"s1":true}}"#);
}

/// A check-and-set conflict is contention: list again at once; a second one in a row is paced.
#[test]
fn check_and_set_conflicts() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    r.answer(LIST, listing(6, &[contender("s1", 6)]));
    r.answer(&cas_pattern(0), reply::no());
    // At once, without an index.
    let again = [contender("s1", 6), contender("s2", 7), lock_kv(2, &["s2"], 8)];
    r.answer(&format!("{LIST}&!index"), listing(8, &again));
    r.answer(&cas_pattern(8), reply::no());
    assert!(r.find("GET /v1/kv/p").is_none(), "paced");
    assert!(r.run_until(secs(1), renew_ok, |n| n.find(LIST).is_some()));
    r.answer(LIST, listing(9, &[contender("s1", 6), lock_kv(2, &["s2"], 9)]));
    r.answer(&cas_pattern(9), yes());
    let confirmed = [contender("s1", 6), lock_kv(2, &["s1"], 10)];
    r.answer(CONSISTENT, listing(10, &confirmed));
    let events = r.events();
    let [LockEvent::Acquired(token)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(token.lock_index, 10);
}

/// A full semaphore is waited on with blocking lists; a slot that frees is taken.
#[test]
fn a_full_semaphore_is_waited_on() {
    let mut r = SRig::new(options(1));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    let full = [contender("a", 4), contender("s1", 6), lock_kv(1, &["a"], 5)];
    r.answer(LIST, listing(6, &full));
    r.run(secs(15), renew_ok);
    r.answer(&format!("{LIST}&index=6&wait=15000ms"), listing(6, &full));
    // The holder's session ends (its key deleted): its slot is free.
    r.answer(
        &format!("{LIST}&index=6"),
        listing(9, &[contender("s1", 6), lock_kv(1, &["a"], 5)]),
    );
    let cas = r.answer(&cas_pattern(5), yes());
    assert_eq!(cas.body, state(1, &["s1"]));
}

/// Our contender key vanishes while we wait (an operator): it is made again before we add
/// ourselves, since the others would prune us at once without it.
#[test]
fn a_vanished_contender_key_is_made_again() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    r.answer(LIST, listing(6, &[lock_kv(2, &[], 5)]));
    assert!(r.find("PUT /v1/kv/p/.lock").is_none());
    assert!(r.run_until(secs(1), renew_ok, |n| n.find("PUT /v1/kv/p/s1").is_some()));
    r.answer(&contend_pattern("s1"), yes());
    r.answer(LIST, listing(7, &[contender("s1", 7), lock_kv(2, &[], 5)]));
    r.expect(&cas_pattern(5));
}

/// The caller's session already listed as a holder (an earlier attempt's write landed): the slot
/// is ours without a second write.
#[test]
fn reclaim_a_slot_already_held() {
    let mut r = SRig::new(existing("mine", 2));
    r.lock().unwrap();
    r.answer(&contend_pattern("mine"), yes());
    let already = [
        contender("mine", 6),
        lock_kv(2, &["mine", "x"], 8),
        contender("x", 3),
    ];
    r.answer(LIST, listing(8, &already));
    assert!(r.find("PUT /v1/kv/p/.lock").is_none());
    r.answer(CONSISTENT, listing(8, &already));
    let events = r.events();
    let [LockEvent::Acquired(token)] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!((token.session.as_str(), token.lock_index), ("mine", 8));
}

/// The granted write does not show in the confirm (the agent contradicts itself, or an operator
/// was quick): no Acquired; wait again, paced.
#[test]
fn a_grant_that_does_not_show_is_not_acquired() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    r.answer(LIST, listing(6, &[contender("s1", 6)]));
    r.answer(&cas_pattern(0), yes());
    r.answer(CONSISTENT, listing(7, &[contender("s1", 6), lock_kv(2, &[], 7)]));
    assert!(
        matches!(&r.events()[..], [LockEvent::Retrying(_)]),
        "reported as a retry, not acquired"
    );
    assert_eq!(r.m().status(), LockStatus::Acquiring);
    assert!(r.find("GET /v1/kv/p").is_none(), "paced");
}

/// Release: a check-and-set conflict reads again at once; a `.lock` that no longer lists us (or
/// is gone) needs no write; failures in a row settle for deleting the contender key.
#[test]
fn release_edge_cases() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.unlock().unwrap();
    r.answer("GET /v1/kv/p/.lock", reply::kv(8, &lock_kv(2, &["s1"], 8)));
    r.answer(&cas_pattern(8), reply::no());
    r.answer("GET /v1/kv/p/.lock", reply::kv(9, &lock_kv(2, &["s1", "s2"], 9)));
    let out = r.answer(&cas_pattern(9), yes());
    assert_eq!(out.body, state(2, &["s2"]));
    r.answer("DELETE /v1/kv/p/s1", yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);

    for gone in [reply::missing(9), reply::kv(9, &lock_kv(2, &["s2"], 9))] {
        let mut r = SRig::new(options(2));
        r.acquire("s1", 2);
        r.unlock().unwrap();
        r.answer("GET /v1/kv/p/.lock", gone);
        r.answer("DELETE /v1/kv/p/s1", yes());
        r.answer("PUT /v1/session/destroy/s1", yes());
        assert_eq!(r.events(), [LockEvent::Released]);
        assert!(r.last_sent("PUT /v1/kv/p/.lock?cas=9").is_none());
    }

    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.unlock().unwrap();
    let start = r.now();
    let released = r.run_until(
        secs(60),
        |s, _| match s.kind() {
            Kind::Get { .. } => Some(reply::no_leader()),
            Kind::Delete { .. } | Kind::Remove { .. } | Kind::Destroy(_) => Some(yes()),
            Kind::Renew(id) => Some(reply::renewed(&id)),
            _ => None,
        },
        |n| n.m.is_quiescent(),
    );
    assert!(released);
    assert_eq!(r.events(), [LockEvent::Released]);
    assert!(r.last_sent("DELETE /v1/kv/p/s1").is_some());
    assert!(r.now() - start <= secs(11), "{:?}", r.now() - start);
}

/// A release that neither took us out of the `.lock` nor deleted our contender key is reported
/// unconfirmed (the slot stays counted until the session's destroy lands or it expires); one
/// that did either is `Released` even if the other failed.
#[test]
fn a_release_that_freed_nothing_is_reported_unconfirmed() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.unlock().unwrap();
    r.run_until(
        secs(60),
        |s, _| match s.kind() {
            Kind::Get { .. } | Kind::Delete { .. } | Kind::Remove { .. } => Some(reply::no_leader()),
            Kind::Destroy(_) => Some(yes()),
            Kind::Renew(id) => Some(reply::renewed(&id)),
            _ => None,
        },
        |n| n.m.is_quiescent(),
    );
    match &r.events()[..] {
        [LockEvent::ReleaseFailed(LockError::ReleaseUnconfirmed { attempts, last })] => {
            assert!(*attempts >= 2, "{attempts}");
            assert!(last.contains("contender key"), "{last}");
        }
        other => panic!("expected ReleaseFailed, got {other:?}"),
    }

    // Out of the holders, but the contender key's delete failed: the slot is free all the same.
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.unlock().unwrap();
    r.answer("GET /v1/kv/p/.lock", reply::kv(8, &lock_kv(2, &["s1"], 8)));
    r.answer(&cas_pattern(8), yes());
    r.answer("DELETE /v1/kv/p/s1", reply::no_leader());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);
}

/// The session is invalidated while the release is under way: the release still ends.
#[test]
fn release_while_the_session_is_invalidated() {
    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.advance(ms(7500));
    let renew = r.expect("PUT /v1/session/renew/s1");
    r.unlock().unwrap();
    r.reply(renew.id, reply::session_gone("s1"));
    assert!(r.events().is_empty());
    r.answer("GET /v1/kv/p/.lock", reply::kv(8, &lock_kv(2, &["s1"], 8)));
    r.answer(&cas_pattern(8), yes());
    r.answer("DELETE /v1/kv/p/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);
    assert!(r.m().is_quiescent());
}

/// Consul forgot the session: the contender acquire's 500 "invalid session" makes a new one.
#[test]
fn contend_with_a_forgotten_session() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), reply::invalid_session("s1"));
    assert!(r.events().is_empty());
    r.finish_acquire("s2", 2);

    let mut r = SRig::new(existing("mine", 2));
    r.lock().unwrap();
    r.answer(&contend_pattern("mine"), reply::invalid_session("mine"));
    assert!(matches!(
        r.events()[..],
        [LockEvent::Failed(LockError::Refused(_))]
    ));
    r.answer("DELETE /v1/kv/p/mine", yes());
    assert!(r.m().is_quiescent());
}

// ================================================================================================
// Blocking-read hygiene
// ================================================================================================

/// An index that goes backwards is reset: the next list carries no index.
#[test]
fn a_backwards_index_is_reset() {
    let mut r = SRig::new(options(1));
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer(&contend_pattern("s1"), yes());
    let full = |i| [contender("a", 4), contender("s1", 6), lock_kv(1, &["a"], i)];
    r.answer(LIST, listing(100, &full(100)));
    r.run(secs(15), renew_ok);
    r.answer(&format!("{LIST}&index=100"), listing(40, &full(40)));
    assert!(r.run_until(secs(10), renew_ok, |n| n.find(LIST).is_some()));
    let next = r.expect(LIST);
    assert!(!next.has("index") && !next.has("wait"), "{}", next.describe());
    r.reply(next.id, listing(41, &full(41)));
    r.expect(&format!("{LIST}&index=41&wait=15000ms"));

    let mut r = SRig::new(options(2));
    r.acquire("s1", 2);
    r.advance(secs(3));
    let held = [contender("s1", 3), lock_kv(2, &["s1"], 3)];
    r.reply(r.monitor().id, listing(3, &held));
    assert!(r.run_until(secs(10), renew_ok, |n| n.find(CONSISTENT).is_some()));
    let next = r.monitor();
    assert!(!next.has("index"), "{}", next.describe());
    r.reply(next.id, listing(4, &held));
    r.expect(&format!("{CONSISTENT}&index=4"));
}

/// Every request carries a deadline: blocking lists their wait plus Consul's jitter plus a
/// margin; everything else the request timeout.
#[test]
fn every_request_has_a_fitting_deadline() {
    let mut r = SRig::new(options(1));
    r.lock().unwrap();
    let create = r.expect("PUT /v1/session/create");
    assert_eq!(create.deadline, create.at + secs(10));
    r.reply(create.id, reply::created("s1"));
    let contend = r.answer(&contend_pattern("s1"), yes());
    assert_eq!(contend.deadline, contend.at + secs(10));
    let full = [contender("a", 4), contender("s1", 6), lock_kv(1, &["a"], 5)];
    r.answer(LIST, listing(6, &full));
    let read = r.expect(&format!("{LIST}&index=6&wait=15000ms"));
    let floor = read.at + secs(15) + ms(937) + Duration::from_micros(500);
    assert!(read.deadline > floor && read.deadline <= floor + secs(10));
    r.reply(read.id, listing(7, &[contender("s1", 6), lock_kv(1, &[], 7)]));
    r.answer(&cas_pattern(7), yes());
    r.answer(
        CONSISTENT,
        listing(8, &[contender("s1", 6), lock_kv(1, &["s1"], 8)]),
    );
    let watch = r.expect(&format!("{CONSISTENT}&index=8&wait=300000ms"));
    let floor = watch.at + secs(300) + ms(18_750);
    assert!(watch.deadline > floor && watch.deadline <= floor + secs(10));
}

/// Counts the requests sent in 10 virtual seconds against an agent that answers at once.
fn requests_in_ten_seconds(r: &mut SRig, mut serve: impl FnMut(&Sent) -> Reply) -> usize {
    let start = r.now();
    r.run(secs(10), |s, _| {
        Some(match s.kind() {
            Kind::Renew(id) => reply::renewed(&id),
            Kind::Acquire { .. } | Kind::Delete { .. } | Kind::Remove { .. } | Kind::Destroy(_) => yes(),
            _ => serve(s),
        })
    });
    r.sent_since(start).len()
}

/// An agent that answers blocking lists at once without progress, or contradicts itself, can't
/// make a waiter spin.
#[test]
fn pacing_while_waiting() {
    type Agent = fn(&Sent) -> Reply;
    let agents: Vec<(&str, Agent)> = vec![
        ("same index", |_| {
            listing(
                10,
                &[contender("a", 4), contender("s1", 6), lock_kv(1, &["a"], 5)],
            )
        }),
        ("no index header", |_| {
            let entries = [contender("a", 4), contender("s1", 6), lock_kv(1, &["a"], 5)];
            let body = serde_json::Value::Array(entries.iter().map(Kv::json).collect()).to_string();
            reply::raw(200, None, Some(true), body)
        }),
        ("a free slot the check-and-set can't take", |s| match s.kind() {
            Kind::CasPut { .. } => reply::no(),
            _ => listing(10, &[contender("s1", 6), lock_kv(1, &[], 5)]),
        }),
        ("grants, but the confirm never shows us", |s| match s.kind() {
            Kind::CasPut { .. } => yes(),
            _ => listing(10, &[contender("s1", 6), lock_kv(1, &[], 5)]),
        }),
        ("never shows our contender key", |_| {
            listing(10, &[lock_kv(1, &[], 5)])
        }),
        ("errors", |_| reply::no_leader()),
    ];
    for (name, agent) in agents {
        let mut r = SRig::new(options(1));
        r.lock().unwrap();
        r.answer("PUT /v1/session/create", reply::created("s1"));
        let n = requests_in_ten_seconds(&mut r, agent);
        assert!(n <= 30, "{name}: {n} requests in 10 s");
        assert_eq!(r.m().status(), LockStatus::Acquiring, "{name}");
    }
}

/// Nor a holder's monitor.
#[test]
fn pacing_while_holding() {
    type Agent = fn(&Sent) -> Reply;
    let agents: Vec<(&str, Agent)> = vec![
        ("same index", |_| {
            listing(7, &[contender("s1", 6), lock_kv(2, &["s1"], 7)])
        }),
        ("no index header", |_| {
            let entries = [contender("s1", 6), lock_kv(2, &["s1"], 7)];
            let body = serde_json::Value::Array(entries.iter().map(Kv::json).collect()).to_string();
            reply::raw(200, None, Some(true), body)
        }),
        ("no leader", |_| listing_leader(7, Some(false), &[])),
    ];
    for (name, agent) in agents {
        let mut r = SRig::new(options(2));
        r.acquire("s1", 2);
        let n = requests_in_ten_seconds(&mut r, agent);
        assert!(n <= 30, "{name}: {n} requests in 10 s");
        assert_eq!(r.m().status(), LockStatus::Held, "{name}");
    }
}

/// Replies to requests the machine no longer waits for, twice, or never sent, are ignored.
#[test]
fn late_duplicate_and_unknown_replies_are_ignored() {
    let mut r = SRig::new(options(2));
    r.lock().unwrap();
    let create = r.answer("PUT /v1/session/create", reply::created("s1"));
    r.reply(create.id, reply::created("s-again"));
    r.reply(RequestId(999), yes());
    let contend = r.answer(&contend_pattern("s1"), yes());
    r.reply(contend.id, reply::no());
    let list = r.answer(LIST, listing(6, &[contender("s1", 6)]));
    r.reply(list.id, listing(6, &[]));
    let cas = r.answer(&cas_pattern(0), yes());
    r.reply(cas.id, reply::no());
    r.answer(
        CONSISTENT,
        listing(7, &[contender("s1", 6), lock_kv(2, &["s1"], 7)]),
    );
    assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
    r.reply(cas.id, reply::no());
    r.reply(list.id, listing(9, &[]));
    assert!(r.events().is_empty());
    assert_eq!(r.m().status(), LockStatus::Held);
    assert_eq!(r.m().in_flight(), 1, "only the monitor is out");
}

/// The machine is a `HoldMachine`, so the drivers' task runs it unchanged.
#[test]
fn it_is_a_hold_machine() {
    fn drive(m: &mut impl consul_lock_core::machine::HoldMachine, now: Instant) -> usize {
        m.lock(now).unwrap();
        let mut n = 0;
        while m.poll_action().is_some() {
            n += 1;
        }
        n
    }
    let mut m = SemaphoreMachine::new(ClientConfig::default(), options(2)).unwrap();
    assert_eq!(drive(&mut m, Instant::now()), 1, "the session create");
}

// ================================================================================================
// Random operations and replies
// ================================================================================================

/// What the agent answers to one request.
#[derive(Clone, Debug)]
enum Spec {
    Fake,
    Plausible { choice: u8, a: u64 },
    Status { code: u16, body: u8 },
    Garbage { status: u16, body: Vec<u8>, index: u8 },
    Transport(u8),
}

/// A change to the fake Consul behind the machine's back.
#[derive(Clone, Debug)]
enum Mutation {
    DeleteTree,
    DeleteLock,
    /// Another session joins as a holder.
    Join,
    InvalidateOurs,
    LockFlags(u64),
    Limit(u32),
}

#[derive(Clone, Debug)]
enum Op {
    Lock,
    Unlock,
    Cancel,
    Destroy,
    Reply { pick: usize, spec: Spec },
    Late { pick: usize, spec: Spec },
    Advance(u64),
    Jump(u64),
    Mutate(Mutation),
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        12 => Just(Spec::Fake),
        4 => (any::<u8>(), any::<u64>()).prop_map(|(choice, a)| Spec::Plausible { choice, a }),
        1 => (prop::sample::select(vec![200u16, 400, 403, 404, 429, 500, 503]), any::<u8>())
            .prop_map(|(code, body)| Spec::Status { code, body }),
        1 => (
            prop::sample::select(vec![200u16, 404, 500]),
            prop::collection::vec(any::<u8>(), 0..40),
            any::<u8>()
        )
            .prop_map(|(status, body, index)| Spec::Garbage { status, body, index }),
        1 => any::<u8>().prop_map(Spec::Transport),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let millis = prop_oneof![0..50u64, 0..2_000u64, 0..20_000u64, 0..400_000u64];
    prop_oneof![
        3 => Just(Op::Lock),
        1 => Just(Op::Unlock),
        1 => Just(Op::Cancel),
        1 => Just(Op::Destroy),
        20 => (any::<usize>(), spec()).prop_map(|(pick, spec)| Op::Reply { pick, spec }),
        2 => (any::<usize>(), spec()).prop_map(|(pick, spec)| Op::Late { pick, spec }),
        5 => millis.clone().prop_map(Op::Advance),
        1 => millis.prop_map(Op::Jump),
        1 => prop_oneof![
            Just(Mutation::DeleteTree),
            Just(Mutation::DeleteLock),
            Just(Mutation::Join),
            Just(Mutation::InvalidateOurs),
            prop::sample::select(vec![0, LOCK_FLAG_VALUE]).prop_map(Mutation::LockFlags),
            (1..4u32).prop_map(Mutation::Limit),
        ]
        .prop_map(Op::Mutate),
    ]
}

fn semaphore_options() -> impl Strategy<Value = SemaphoreOptions> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0..4u32),
        any::<u64>(),
        1..4u32,
        0..3u8,
    )
        .prop_map(|(own_session, try_once, monitor_retries, seed, limit, wait)| {
            let mut o = if own_session {
                existing("mine", limit)
            } else {
                options(limit)
            };
            o.hold.try_once = try_once;
            o.hold.monitor_retries = monitor_retries;
            o.hold.seed = seed;
            o.hold.wait_time = [ms(250), secs(2), secs(15)][usize::from(wait)];
            o
        })
}

struct World {
    clock: Clock,
    node: SNode,
    fake: SFake,
    sessions: u64,
    joined: u64,
}

fn response(status: u16, index: Option<&str>, body: Vec<u8>) -> Reply {
    let mut b = http::Response::builder().status(status);
    if let Some(i) = index {
        b = b.header("X-Consul-Index", i);
    }
    Ok(b.body(body).unwrap())
}

impl World {
    fn new(options: SemaphoreOptions) -> World {
        let mut fake = SFake::new();
        fake.add_session("mine");
        World {
            clock: Clock::new(),
            node: snode(options),
            fake,
            sessions: 0,
            joined: 0,
        }
    }

    fn ours(&self) -> String {
        self.node
            .m
            .session()
            .id()
            .map_or_else(|| "mine".to_owned(), |s| s.to_string())
    }

    fn reply(&mut self, sent: &Sent, spec: &Spec, now: Instant) -> Reply {
        match spec {
            Spec::Fake => self.fake.serve_now(sent, now),
            Spec::Plausible { choice, a } => self.plausible(sent, *choice, *a),
            Spec::Status { code, body } => {
                let bodies = [
                    "",
                    "No cluster leader",
                    "invalid session \"x\"",
                    "Permission denied",
                    "true",
                    "false",
                    "[]",
                    "null",
                ];
                reply::status(*code, bodies[usize::from(*body) % bodies.len()])
            }
            Spec::Garbage { status, body, index } => {
                let indexes = [
                    None,
                    Some("abc"),
                    Some("18446744073709551615"),
                    Some("5"),
                    Some("0"),
                ];
                response(
                    *status,
                    indexes[usize::from(*index) % indexes.len()],
                    body.clone(),
                )
            }
            Spec::Transport(k) => {
                let kinds = [
                    TransportErrorKind::Connect,
                    TransportErrorKind::Io,
                    TransportErrorKind::Timeout,
                    TransportErrorKind::TooLarge,
                ];
                Err(TransportError::new(
                    kinds[usize::from(*k) % kinds.len()],
                    "injected",
                ))
            }
        }
    }

    fn plausible(&mut self, sent: &Sent, choice: u8, a: u64) -> Reply {
        let c = usize::from(choice);
        match sent.kind() {
            Kind::Create => {
                self.sessions += 1;
                reply::created(&format!("g-{}", self.sessions))
            }
            Kind::Renew(id) => match c % 6 {
                0 => reply::session_gone(&id),
                1 => reply::renewed_ttl(&id, "30s"),
                _ => reply::renewed(&id),
            },
            Kind::Destroy(_) | Kind::Delete { .. } | Kind::Remove { .. } | Kind::CasPut { .. } => {
                if c % 3 == 0 { reply::no() } else { yes() }
            }
            Kind::Acquire { session, .. } => match c % 5 {
                0 => reply::no(),
                1 => reply::invalid_session(&session),
                2 => reply::no_leader(),
                _ => yes(),
            },
            Kind::Get { .. } => {
                let ours = self.ours();
                match c % 4 {
                    0 => reply::missing(a % 50),
                    1 => reply::kv(a % 50, &lock_kv(2, &[], a % 50)),
                    _ => reply::kv(a % 50, &lock_kv(1 + (a % 3) as u32, &[ours.as_str()], a % 50)),
                }
            }
            Kind::List { index, .. } => {
                let sent_index = index.unwrap_or(0);
                let index = match (c / 8) % 4 {
                    0 => sent_index,
                    1 => sent_index / 2,
                    _ => sent_index + 1 + a % 3,
                };
                let leader = [Some(true), Some(true), None, Some(false)][(c / 32) % 4];
                let ours = self.ours();
                let limit = self.node.m.options().limit;
                let mut entries = Vec::new();
                if c % 2 == 0 {
                    entries.push(contender(&ours, 3));
                }
                match c % 8 {
                    0 | 1 => {}
                    2 | 3 => entries.push(lock_kv(limit, &[ours.as_str()], 1 + a % 20)),
                    4 => entries.push(lock_kv(limit, &["other"], 1 + a % 20)),
                    5 => entries.push(lock_kv(limit + 1, &[], 1 + a % 20)),
                    6 => entries.push(lock_kv(limit, &[ours.as_str()], 1 + a % 20).flags(a % 2)),
                    _ => entries.push(lock_kv(limit, &[], 1 + a % 20).value(b"{\"Limit\":")),
                }
                if a % 3 == 0 {
                    entries.push(contender("other", 2));
                }
                listing_leader(index, leader, &entries)
            }
            _ => reply::status(400, "?"),
        }
    }

    fn step(&mut self, op: &Op) {
        let now = self.clock.now();
        match op {
            Op::Lock => {
                let _ = self.node.lock(now);
            }
            Op::Unlock => {
                let _ = self.node.unlock(now);
            }
            Op::Cancel => self.node.cancel(now),
            Op::Destroy => {
                let _ = self.node.destroy(now);
            }
            Op::Reply { pick, spec } => {
                let n = self.node.inflight.len();
                if n == 0 {
                    return;
                }
                let sent = self.node.inflight.values().nth(pick % n).cloned().unwrap();
                let reply = self.reply(&sent, spec, now);
                self.node.deliver(now, sent.id, reply);
            }
            Op::Late { pick, spec } => {
                let n = self.node.log.len();
                if n == 0 {
                    return;
                }
                let sent = self.node.log[pick % n].clone();
                let reply = self.reply(&sent, spec, now);
                self.node.deliver(now, sent.id, reply);
            }
            Op::Advance(d) => {
                let to = now + Duration::from_millis(*d);
                self.node.advance(now, to);
                self.clock.set(to);
            }
            Op::Jump(d) => {
                let to = now + Duration::from_millis(*d);
                self.clock.set(to);
                self.node.tick(to);
            }
            Op::Mutate(m) => match m {
                Mutation::DeleteTree => {
                    let keys: Vec<String> = self.fake.kv.keys().cloned().collect();
                    for k in keys {
                        self.fake.delete(&k);
                    }
                }
                Mutation::DeleteLock => self.fake.delete(LOCK),
                Mutation::Join => {
                    self.joined += 1;
                    let id = format!("j-{}", self.joined);
                    self.fake.add_session(&id);
                    self.fake.write(
                        &format!("{PREFIX}/{id}"),
                        SEMAPHORE_FLAG_VALUE,
                        Vec::new(),
                        Some(id.clone()),
                    );
                    let mut holders = self.fake.holders();
                    holders.insert(id);
                    let limit = self.node.m.options().limit;
                    let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
                    self.fake
                        .write(LOCK, SEMAPHORE_FLAG_VALUE, state(limit, &holders), None);
                }
                Mutation::InvalidateOurs => {
                    let ours = self.ours();
                    self.fake.invalidate(&ours);
                }
                Mutation::LockFlags(f) => {
                    let value = self
                        .fake
                        .kv
                        .get(LOCK)
                        .map(|e| e.value.clone())
                        .unwrap_or_default();
                    self.fake.write(LOCK, *f, value, None);
                }
                Mutation::Limit(l) => {
                    let holders = self.fake.holders();
                    let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
                    self.fake
                        .write(LOCK, SEMAPHORE_FLAG_VALUE, state(*l, &holders), None);
                }
            },
        }
    }

    /// Cancel (releasing a held slot), then let the fake Consul answer everything: the machine
    /// must come to rest.
    fn wind_down(&mut self) {
        let now = self.clock.now();
        self.node.cancel(now);
        let until = now + secs(120);
        let fake = &mut self.fake;
        let rested = run(
            &mut self.clock,
            std::slice::from_mut(&mut self.node),
            until,
            &mut |s, now| fake.serve(s, now),
            &mut |nodes| nodes[0].m.is_quiescent(),
        );
        assert!(
            rested,
            "not at rest 120 s after cancel: status {:?}, in flight {:?}",
            self.node.m.status(),
            self.node.describe()
        );
        assert_eq!(self.node.m.status(), LockStatus::Idle);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_drives_keep_the_invariants(
        options in semaphore_options(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut world = World::new(options);
        for op in &ops {
            world.step(op);
        }
        world.wind_down();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Several contenders against the fake Consul, with random holding times: never more than
    /// the limit hold at once, and everyone gets a slot.
    #[test]
    fn contenders_never_exceed_the_limit(
        limit in 1..4u32,
        count in 1..6usize,
        seed in any::<u64>(),
        hold in 1..30u64,
    ) {
        let mut clock = Clock::new();
        let mut fake = SFake::new();
        let mut nodes: Vec<SNode> = (0..count)
            .map(|i| {
                let mut o = options(limit);
                o.hold.seed = seed.wrapping_add(i as u64);
                snode(o)
            })
            .collect();
        for n in &mut nodes {
            n.lock(clock.now()).unwrap();
        }
        let mut held_since: Vec<Option<Instant>> = vec![None; count];
        let deadline = clock.now() + secs(600);
        let busy = |nodes: &[SNode]| nodes.iter().any(|n| n.m.status() != LockStatus::Idle);
        while held_since.iter().any(Option::is_none) || busy(&nodes) {
            prop_assert!(clock.now() < deadline, "not everyone held within 600 s");
            let until = clock.now() + secs(1);
            run(&mut clock, &mut nodes, until, &mut |s, now| fake.serve(s, now), &mut |ns| {
                let holding = ns.iter().filter(|n| n.m.status() == LockStatus::Held).count();
                assert!(holding <= limit as usize, "{holding} hold a semaphore of {limit}");
                false
            });
            prop_assert!(fake.live_holders().len() <= limit as usize);
            let now = clock.now();
            for (i, n) in nodes.iter_mut().enumerate() {
                if n.m.status() == LockStatus::Held {
                    let since = *held_since[i].get_or_insert(now);
                    if now - since >= secs(hold) {
                        n.unlock(now).unwrap();
                    }
                }
            }
        }
    }
}
