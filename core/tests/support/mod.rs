//! Test support for driving a machine (a `LockMachine`; the semaphore's tests use it too) by
//! hand: a virtual clock, replies exactly as Consul sends them, a rig of one machine on a clock, a
//! runner for several, and a tiny fake Consul for scenarios with several lockers.
//!
//! Every call into a machine goes through a [`Node`]: the `consul-lock-checker` crate's `Checker`,
//! which drains `poll_action()`, keeps the requests in flight, records the events, and checks the
//! invariants after every step (listed in that crate's documentation; the fuzz targets check the
//! same ones). Requests are the checker's `Sent`, found by the patterns of `Sent::is`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use consul_lock_checker::Holder;
use consul_lock_core::api::{ClientConfig, SessionId};
use consul_lock_core::machine::{
    FencingToken, LockEvent, LockMachine, LockOptions, Misuse, Reply, RequestId, SessionChoice,
    TransportError, TransportErrorKind,
};

/// The lock key used throughout.
pub(crate) const KEY: &str = "k";
/// `LOCK_FLAG_VALUE` as it appears in a query.
pub(crate) const FLAGS: &str = "3304740253564472344";

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(crate) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Go's defaults for a lock on [`KEY`], with a fixed seed.
pub(crate) fn options() -> LockOptions {
    let mut o = LockOptions::new(KEY).unwrap();
    o.hold.seed = 7;
    o
}

/// Options using the caller's session `session`.
pub(crate) fn existing(session: &str) -> LockOptions {
    let mut o = options();
    o.hold.session = SessionChoice::Existing(SessionId::new(session).unwrap());
    o
}

// ----- time ------------------------------------------------------------------------------------

/// Virtual time: a base instant and an offset that only moves forward.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    base: Instant,
    now: Instant,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        let base = Instant::now();
        Clock { base, now: base }
    }

    pub(crate) fn now(&self) -> Instant {
        self.now
    }

    /// The instant `offset` after the base.
    pub(crate) fn at(&self, offset: Duration) -> Instant {
        self.base + offset
    }

    /// The offset of `t` from the base.
    pub(crate) fn offset(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.base)
    }

    /// The current offset.
    pub(crate) fn elapsed(&self) -> Duration {
        self.offset(self.now)
    }

    pub(crate) fn set(&mut self, t: Instant) {
        assert!(t >= self.now, "the clock can't go backwards");
        self.now = t;
    }
}

// ----- requests --------------------------------------------------------------------------------

// What a request asks (`Kind`) and a request as sent (`Sent`, with the patterns the tests find
// requests by) are the checker's.
pub(crate) use consul_lock_checker::{Kind, Sent};

// ----- replies -----------------------------------------------------------------------------------

/// A KV entry, to be sent as Consul does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Kv {
    pub(crate) key: String,
    pub(crate) lock_index: u64,
    pub(crate) flags: u64,
    pub(crate) value: Vec<u8>,
    pub(crate) session: Option<String>,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

/// The lock key, free, with the lock's flags, created at 5 and modified at 6.
pub(crate) fn entry() -> Kv {
    Kv {
        key: KEY.to_owned(),
        lock_index: 0,
        flags: consul_lock_core::machine::LOCK_FLAG_VALUE,
        value: Vec::new(),
        session: None,
        create_index: 5,
        modify_index: 6,
    }
}

impl Kv {
    pub(crate) fn held_by(mut self, session: &str, lock_index: u64) -> Kv {
        self.session = Some(session.to_owned());
        self.lock_index = lock_index;
        self
    }

    pub(crate) fn free(mut self) -> Kv {
        self.session = None;
        self
    }

    pub(crate) fn flags(mut self, flags: u64) -> Kv {
        self.flags = flags;
        self
    }

    pub(crate) fn modified(mut self, index: u64) -> Kv {
        self.modify_index = index;
        self
    }

    pub(crate) fn value(mut self, value: &[u8]) -> Kv {
        self.value = value.to_vec();
        self
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        use base64::Engine as _;
        let mut o = serde_json::json!({
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": if self.value.is_empty() {
                serde_json::Value::Null
            } else {
                base64::engine::general_purpose::STANDARD.encode(&self.value).into()
            },
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        });
        if let (Some(s), Some(map)) = (&self.session, o.as_object_mut()) {
            map.insert("Session".to_owned(), s.clone().into());
        }
        o
    }
}

/// Replies as Consul sends them.
pub(crate) mod reply {
    use super::*;

    /// Any reply: status, `X-Consul-Index` and `X-Consul-KnownLeader` when given, a body.
    pub(crate) fn raw(
        status: u16,
        index: Option<u64>,
        leader: Option<bool>,
        body: impl Into<Vec<u8>>,
    ) -> Reply {
        let mut b = http::Response::builder().status(status);
        if let Some(i) = index {
            b = b.header("X-Consul-Index", i.to_string());
        }
        if let Some(l) = leader {
            b = b
                .header("X-Consul-KnownLeader", if l { "true" } else { "false" })
                .header("X-Consul-LastContact", "0");
        }
        let body = body.into();
        let json = body
            .first()
            .is_some_and(|c| matches!(c, b'[' | b'{' | b't' | b'f' | b'n'));
        if json && status == 200 {
            b = b.header("Content-Type", "application/json");
        }
        Ok(b.body(body).unwrap())
    }

    /// A KV read of a present key (the index is the reply's `X-Consul-Index`).
    pub(crate) fn kv(index: u64, e: &Kv) -> Reply {
        kv_leader(index, Some(true), e)
    }

    pub(crate) fn kv_leader(index: u64, leader: Option<bool>, e: &Kv) -> Reply {
        let body = serde_json::Value::Array(vec![e.json()]).to_string();
        raw(200, Some(index), leader, body)
    }

    /// A KV read of a missing key: 404, headers set, empty body.
    pub(crate) fn missing(index: u64) -> Reply {
        raw(404, Some(index), Some(true), Vec::new())
    }

    pub(crate) fn missing_leader(index: u64, leader: Option<bool>) -> Reply {
        raw(404, Some(index), leader, Vec::new())
    }

    pub(crate) fn created(id: &str) -> Reply {
        raw(200, None, None, serde_json::json!({ "ID": id }).to_string())
    }

    fn session_json(id: &str, ttl: &str, lock_delay: Duration) -> serde_json::Value {
        serde_json::json!({
            "ID": id,
            "Name": "Consul API Lock",
            "Node": "n",
            "LockDelay": u64::try_from(lock_delay.as_nanos()).unwrap(),
            "Behavior": "release",
            "TTL": ttl,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        })
    }

    /// A renew's success, TTL 15 s.
    pub(crate) fn renewed(id: &str) -> Reply {
        renewed_ttl(id, "15s")
    }

    pub(crate) fn renewed_ttl(id: &str, ttl: &str) -> Reply {
        let body = serde_json::Value::Array(vec![session_json(id, ttl, secs(15))]).to_string();
        raw(200, None, None, body)
    }

    /// A renew of a session Consul no longer knows.
    pub(crate) fn session_gone(id: &str) -> Reply {
        raw(404, None, None, format!("Session id '{id}' not found"))
    }

    /// `GET /v1/session/info/<id>` of a live session.
    pub(crate) fn info(id: &str, lock_delay: Duration, index: u64) -> Reply {
        let body = serde_json::Value::Array(vec![session_json(id, "15s", lock_delay)]).to_string();
        raw(200, Some(index), Some(true), body)
    }

    /// `GET /v1/session/info/<id>` of an unknown session.
    pub(crate) fn info_none(index: u64) -> Reply {
        raw(200, Some(index), Some(true), "null")
    }

    pub(crate) fn yes() -> Reply {
        raw(200, None, None, "true")
    }

    pub(crate) fn no() -> Reply {
        raw(200, None, None, "false")
    }

    /// A lock transaction's success: the entry as written (Consul leaves the value out).
    pub(crate) fn locked(e: &Kv) -> Reply {
        let mut entry = e.json();
        entry["Value"] = serde_json::Value::Null;
        let body = serde_json::json!({ "Results": [{ "KV": entry }], "Errors": null });
        raw(200, None, None, body.to_string())
    }

    /// An enqueue transaction's success: the entry as written (value left out), then the tree
    /// read after it (values kept), as Consul 1.8.7 answers a `lock` then a `get-tree`.
    pub(crate) fn lined(e: &Kv, tree: &[Kv]) -> Reply {
        let mut entry = e.json();
        entry["Value"] = serde_json::Value::Null;
        let mut results = vec![serde_json::json!({ "KV": entry })];
        results.extend(tree.iter().map(|p| serde_json::json!({ "KV": p.json() })));
        let body = serde_json::json!({ "Results": results, "Errors": null });
        raw(200, None, None, body.to_string())
    }

    /// A lock transaction refused with Consul's words `what`.
    pub(crate) fn lock_refused(what: &str) -> Reply {
        txn_refused(what)
    }

    fn txn_refused(what: &str) -> Reply {
        let body = serde_json::json!({ "Results": null, "Errors": [{ "OpIndex": 0, "What": what }] });
        raw(409, None, None, body.to_string())
    }

    /// A lock transaction refused: another session holds the key.
    pub(crate) fn lock_held() -> Reply {
        txn_refused(&format!("failed to lock key \"{KEY}\", lock is already held"))
    }

    /// A lock transaction refused: the key's lock-delay is in force.
    pub(crate) fn lock_delayed() -> Reply {
        txn_refused(&format!("failed to lock key \"{KEY}\" due to lock delay"))
    }

    /// A lock transaction refused: Consul does not know the session.
    pub(crate) fn lock_invalid_session(id: &str) -> Reply {
        txn_refused(&format!("invalid session \"{id}\""))
    }

    /// Consul's answer to an acquire or release with a session it does not know.
    pub(crate) fn invalid_session(id: &str) -> Reply {
        raw(500, None, None, format!("invalid session \"{id}\""))
    }

    pub(crate) fn no_leader() -> Reply {
        raw(500, None, None, "No cluster leader")
    }

    pub(crate) fn status(status: u16, body: &str) -> Reply {
        raw(status, None, None, body.to_owned())
    }

    pub(crate) fn refused() -> Reply {
        Err(TransportError::new(TransportErrorKind::Connect, "refused"))
    }

    pub(crate) fn reset() -> Reply {
        Err(TransportError::new(TransportErrorKind::Io, "connection reset"))
    }

    pub(crate) fn timed_out() -> Reply {
        Err(TransportError::new(TransportErrorKind::Timeout, "deadline"))
    }
}

/// A responder for [`Rig::run`] that renews every session and holds everything else.
pub(crate) fn renew_ok(sent: &Sent, _now: Instant) -> Option<Reply> {
    match sent.kind() {
        Kind::Renew(id) => Some(reply::renewed(&id)),
        _ => None,
    }
}

// ----- the node: one machine, driven and checked -------------------------------------------------

/// One machine with what its driver knows, every step checked against the invariants (the
/// checker's, shared with the semaphore's tests and the fuzz targets).
pub(crate) type Node<M = LockMachine> = consul_lock_checker::Checker<M>;

// ----- a single machine on a clock ----------------------------------------------------------------

/// A lock machine with `options`, checked.
pub(crate) fn node(options: LockOptions) -> Node {
    Node::new(LockMachine::new(ClientConfig::default(), options).unwrap())
}

/// One machine and a clock: the hand-driven test rig (of a lock, or of a semaphore).
pub(crate) struct Rig<M: Holder = LockMachine> {
    pub(crate) clock: Clock,
    pub(crate) node: Node<M>,
}

impl Rig {
    pub(crate) fn new(options: LockOptions) -> Rig {
        Rig {
            clock: Clock::new(),
            node: node(options),
        }
    }

    /// Locks with session `session` (created, unless the options name one) on a free key, and
    /// gives the token.
    pub(crate) fn acquire(&mut self, session: &str, lock_index: u64) -> FencingToken {
        self.lock().unwrap();
        if let Some(create) = self.find("PUT /v1/session/create") {
            self.reply(create.id, reply::created(session));
        }
        self.answer("GET /v1/kv/k?!index", reply::missing(5));
        let held = entry().held_by(session, lock_index).modified(6);
        self.answer(
            &format!("PUT /v1/txn?verb=lock&key=k&session={session}&flags={FLAGS}"),
            reply::locked(&held),
        );
        match &self.events()[..] {
            [LockEvent::Acquired(token)] => {
                assert_eq!(token.session.as_str(), session);
                assert_eq!(token.lock_index, lock_index);
                token.clone()
            }
            other => panic!("expected Acquired, got {other:?}"),
        }
    }
}

impl<M: Holder> Rig<M> {
    /// A rig on a new clock for machine `m`.
    pub(crate) fn with(m: M) -> Rig<M> {
        Rig {
            clock: Clock::new(),
            node: Node::new(m),
        }
    }

    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Time since the start.
    pub(crate) fn t(&self) -> Duration {
        self.clock.elapsed()
    }

    pub(crate) fn m(&self) -> &M {
        &self.node.m
    }

    pub(crate) fn lock(&mut self) -> Result<(), Misuse> {
        self.node.lock(self.clock.now())
    }

    pub(crate) fn unlock(&mut self) -> Result<(), Misuse> {
        self.node.unlock(self.clock.now())
    }

    pub(crate) fn destroy(&mut self) -> Result<(), Misuse> {
        self.node.destroy(self.clock.now())
    }

    pub(crate) fn cancel(&mut self) {
        self.node.cancel(self.clock.now())
    }

    pub(crate) fn reply(&mut self, id: RequestId, reply: Reply) {
        self.node.deliver(self.clock.now(), id, reply);
    }

    /// Answers the most recent request in flight matching `pattern`; gives it back.
    pub(crate) fn answer(&mut self, pattern: &str, reply: Reply) -> Sent {
        let sent = self.node.expect(pattern);
        self.reply(sent.id, reply);
        sent
    }

    pub(crate) fn expect(&self, pattern: &str) -> Sent {
        self.node.expect(pattern)
    }

    pub(crate) fn find(&self, pattern: &str) -> Option<Sent> {
        self.node.find(pattern)
    }

    pub(crate) fn count(&self, pattern: &str) -> usize {
        self.node.count(pattern)
    }

    pub(crate) fn events(&mut self) -> Vec<LockEvent> {
        self.node.take_events()
    }

    /// The events since the last call, without the reports of retries ([`LockEvent::Retrying`]).
    pub(crate) fn outcomes(&mut self) -> Vec<LockEvent> {
        let mut events = self.events();
        events.retain(|e| !matches!(e, LockEvent::Retrying(_)));
        events
    }

    /// When the last event came.
    pub(crate) fn last_event_at(&self) -> Instant {
        self.node.events.last().unwrap().0
    }

    /// The requests sent at or after `t`.
    pub(crate) fn sent_since(&self, t: Instant) -> Vec<Sent> {
        self.node.log.iter().filter(|s| s.at >= t).cloned().collect()
    }

    /// The latest request matching `pattern`, in flight or not.
    pub(crate) fn last_sent(&self, pattern: &str) -> Option<Sent> {
        self.node.log.iter().rev().find(|s| s.is(pattern)).cloned()
    }

    pub(crate) fn advance(&mut self, d: Duration) {
        let to = self.clock.now() + d;
        self.advance_to(to);
    }

    pub(crate) fn advance_to(&mut self, to: Instant) {
        self.node.advance(self.clock.now(), to);
        self.clock.set(to);
    }

    /// Runs for `d`, offering every request in flight to `serve` at every step.
    pub(crate) fn run(&mut self, d: Duration, mut serve: impl FnMut(&Sent, Instant) -> Option<Reply>) {
        let until = self.clock.now() + d;
        run(
            &mut self.clock,
            std::slice::from_mut(&mut self.node),
            until,
            &mut serve,
            &mut |_| false,
        );
    }

    /// Runs until `stop` holds (true) or `d` has passed (false).
    pub(crate) fn run_until(
        &mut self,
        d: Duration,
        mut serve: impl FnMut(&Sent, Instant) -> Option<Reply>,
        mut stop: impl FnMut(&Node<M>) -> bool,
    ) -> bool {
        let until = self.clock.now() + d;
        run(
            &mut self.clock,
            std::slice::from_mut(&mut self.node),
            until,
            &mut serve,
            &mut |nodes| stop(&nodes[0]),
        )
    }
}

/// Runs `nodes` on `clock` until `until`: at every instant, every request in flight is offered to
/// `serve` (which answers or holds it) until none is answered; then time moves to the next timer
/// of any node or the end of a held blocking read's wait. Returns whether `stop` held.
pub(crate) fn run<M: Holder>(
    clock: &mut Clock,
    nodes: &mut [Node<M>],
    until: Instant,
    serve: &mut dyn FnMut(&Sent, Instant) -> Option<Reply>,
    stop: &mut dyn FnMut(&[Node<M>]) -> bool,
) -> bool {
    let mut rounds = 0;
    loop {
        if stop(nodes) {
            return true;
        }
        let now = clock.now();
        let mut answered = false;
        for node in nodes.iter_mut() {
            let waiting: Vec<Sent> = node.inflight.values().cloned().collect();
            for sent in waiting {
                if !node.inflight.contains_key(&sent.id) {
                    continue;
                }
                if let Some(reply) = serve(&sent, now) {
                    node.deliver(now, sent.id, reply);
                    answered = true;
                }
            }
        }
        if answered {
            rounds += 1;
            assert!(
                rounds < 1000,
                "the machines keep sending requests at {:?} without time passing",
                clock.elapsed()
            );
            continue;
        }
        rounds = 0;
        let timer = nodes.iter().filter_map(|n| n.m.poll_timeout()).min();
        let wake = nodes
            .iter()
            .flat_map(|n| n.inflight.values())
            .filter_map(Sent::wake_at)
            .filter(|t| *t > now)
            .min();
        let next = [timer, wake].into_iter().flatten().min().map(|t| t.max(now));
        match next {
            Some(t) if t <= until => {
                for node in nodes.iter_mut() {
                    node.advance(now, t);
                }
                clock.set(t);
            }
            _ => {
                for node in nodes.iter_mut() {
                    node.advance(now, until);
                }
                clock.set(until);
                return stop(nodes);
            }
        }
    }
}

// ----- a tiny fake Consul ----------------------------------------------------------------------

/// Just enough of Consul for scenarios: KV entries, sessions with lock-delay, acquire, release,
/// CAS delete, and blocking reads that are held until the key's index moves or the wait ends.
/// Sessions never expire on their own.
#[derive(Debug)]
pub(crate) struct Fake {
    pub(crate) index: u64,
    pub(crate) kv: BTreeMap<String, Kv>,
    /// Live sessions and their lock-delay.
    pub(crate) sessions: BTreeMap<String, Duration>,
    /// Keys refusing acquires until then (lock-delay).
    pub(crate) delay_until: BTreeMap<String, Instant>,
    next_session: u64,
}

impl Default for Fake {
    fn default() -> Self {
        Fake::new()
    }
}

impl Fake {
    pub(crate) fn new() -> Fake {
        Fake {
            index: 10,
            kv: BTreeMap::new(),
            sessions: BTreeMap::new(),
            delay_until: BTreeMap::new(),
            next_session: 1,
        }
    }

    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// The `X-Consul-Index` of a read of `key`: its `ModifyIndex`, or the store's index.
    pub(crate) fn key_index(&self, key: &str) -> u64 {
        self.kv.get(key).map_or(self.index, |e| e.modify_index)
    }

    pub(crate) fn add_session(&mut self, id: &str, lock_delay: Duration) {
        self.sessions.insert(id.to_owned(), lock_delay);
    }

    /// Writes `key` as held by the live session `session`.
    pub(crate) fn hold(&mut self, key: &str, session: &str) {
        let i = self.bump();
        let lock_index = self.kv.get(key).map_or(0, |e| e.lock_index) + 1;
        self.kv.insert(
            key.to_owned(),
            Kv {
                key: key.to_owned(),
                lock_index,
                flags: consul_lock_core::machine::LOCK_FLAG_VALUE,
                value: Vec::new(),
                session: Some(session.to_owned()),
                create_index: i,
                modify_index: i,
            },
        );
    }

    /// A plain write of `key` with `flags`, no session.
    pub(crate) fn put(&mut self, key: &str, flags: u64) {
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
        e.flags = flags;
        e.modify_index = i;
    }

    pub(crate) fn delete(&mut self, key: &str) {
        if self.kv.remove(key).is_some() {
            self.bump();
        }
    }

    /// Ends `session` as Consul does on expiry or destroy: its keys are released and refuse new
    /// holders for its lock-delay.
    pub(crate) fn invalidate(&mut self, session: &str, now: Instant) {
        let Some(delay) = self.sessions.remove(session) else {
            return;
        };
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(session))
            .map(|e| e.key.clone())
            .collect();
        for key in held {
            let i = self.bump();
            if let Some(e) = self.kv.get_mut(&key) {
                e.session = None;
                e.modify_index = i;
            }
            self.delay_until.insert(key, now + delay);
        }
    }

    /// Releases `key` (as its holder's release would), keeping its value and flags.
    pub(crate) fn release(&mut self, key: &str) {
        let i = self.bump();
        if let Some(e) = self.kv.get_mut(key) {
            e.session = None;
            e.modify_index = i;
        }
    }

    /// Answers `sent` at once, even a blocking read the fake would hold.
    pub(crate) fn serve_now(&mut self, sent: &Sent, now: Instant) -> Reply {
        if let Some(reply) = self.serve(sent, now) {
            return reply;
        }
        let key = match sent.kind() {
            Kind::Get { key, .. } => key,
            _ => unreachable!("only reads are held"),
        };
        match self.kv.get(&key) {
            Some(e) => reply::kv(self.key_index(&key), e),
            None => reply::missing(self.key_index(&key)),
        }
    }

    /// The session holding `key`.
    pub(crate) fn holder(&self, key: &str) -> Option<&str> {
        self.kv.get(key).and_then(|e| e.session.as_deref())
    }

    /// Answers `sent` at `now`, or holds it (`None`): a blocking read whose key has not moved
    /// past its index and whose wait has not run out.
    pub(crate) fn serve(&mut self, sent: &Sent, now: Instant) -> Option<Reply> {
        Some(match sent.kind() {
            Kind::Create => {
                let body: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
                let delay = body["LockDelay"]
                    .as_str()
                    .map_or(secs(15), |d| consul_lock_core::duration::parse(d).unwrap());
                let id = format!("fake-{}", self.next_session);
                self.next_session += 1;
                self.sessions.insert(id.clone(), delay);
                reply::created(&id)
            }
            Kind::Renew(id) if self.sessions.contains_key(&id) => reply::renewed(&id),
            Kind::Renew(id) => reply::session_gone(&id),
            Kind::Destroy(id) => {
                self.invalidate(&id, now);
                reply::yes()
            }
            Kind::Info(id) => match self.sessions.get(&id) {
                Some(delay) => reply::info(&id, *delay, self.index),
                None => reply::info_none(self.index),
            },
            Kind::Get { key, index } => {
                let current = self.key_index(&key);
                if let (Some(index), Some(wake)) = (index, sent.wake_at()) {
                    if current <= index && now < wake {
                        return None;
                    }
                }
                match self.kv.get(&key) {
                    Some(e) => reply::kv(current, e),
                    None => reply::missing(current),
                }
            }
            Kind::LockTxn { key, session, .. } => {
                // A lock transaction, as Consul 1.8.7 answers it.
                if !self.sessions.contains_key(&session) {
                    return Some(reply::lock_invalid_session(&session));
                }
                let flags = sent.param("flags").map_or(0, |f| f.parse().unwrap());
                let delayed = self.delay_until.get(&key).is_some_and(|t| now < *t);
                let (holder, lock_index) = match self.kv.get(&key) {
                    Some(e) => (e.session.clone(), e.lock_index),
                    None => (None, 0),
                };
                match holder {
                    // Taking a key it holds writes nothing and answers the entry as it is.
                    Some(h) if h == session => return self.kv.get(&key).map(reply::locked),
                    Some(_) => return Some(reply::lock_held()),
                    None if delayed => return Some(reply::lock_delayed()),
                    None => {}
                }
                let i = self.bump();
                let e = self.kv.entry(key.clone()).or_insert_with(|| Kv {
                    key,
                    lock_index: 0,
                    flags,
                    value: Vec::new(),
                    session: None,
                    create_index: i,
                    modify_index: i,
                });
                e.session = Some(session);
                e.lock_index = lock_index + 1;
                e.flags = flags;
                e.value = sent.value().to_vec();
                e.modify_index = i;
                reply::locked(e)
            }
            Kind::Release { key, session } => {
                if self.holder(&key) != Some(session.as_str()) {
                    return Some(reply::no());
                }
                let flags = sent.param("flags").map_or(0, |f| f.parse().unwrap());
                let i = self.bump();
                if let Some(e) = self.kv.get_mut(&key) {
                    e.session = None;
                    e.flags = flags;
                    e.value = sent.body.clone();
                    e.modify_index = i;
                }
                reply::yes()
            }
            Kind::Delete { key, cas } => match self.kv.get(&key) {
                None => reply::yes(),
                Some(e) if e.modify_index == cas => {
                    self.delete(&key);
                    reply::yes()
                }
                Some(_) => reply::no(),
            },
            _ => reply::status(400, "unsupported"),
        })
    }
}
