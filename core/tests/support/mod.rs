//! Test support for driving a `LockMachine` by hand: a virtual clock, requests recognised by
//! method, path and query, replies exactly as Consul sends them, the invariants checked after
//! every step, and a tiny fake Consul for scenarios with several lockers.
//!
//! Every call into a machine goes through a [`Node`], which drains `poll_action()`, keeps the
//! requests in flight, records the events, and checks after every step:
//! - nothing is emitted by a quiescent machine (except in answer to an operation);
//! - a spurious or early `handle_timeout` does nothing;
//! - `poll_timeout()` is never before the latest `now`, and a due timer never stays due after
//!   `handle_timeout` (a driver would spin);
//! - at most one renew of the session is in flight, and the machine agrees;
//! - every request's deadline is after `now` (blocking reads: more than `wait + wait/16`), and
//!   no read blocks on index 0;
//! - the events follow the operations' grammar (`Acquired` before `Lost`/`Released`, and so on)
//!   and agree with `status()`; `Acquired` comes only after an acquire answered `true`, in answer
//!   to a read showing the token's session and `LockIndex`;
//! - a held lock is never held past the renew deadline.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use consul_lock_core::api::{ClientConfig, Endpoint, KvGet, KvLockTxn, LockTxnOutcome, SessionId};
use consul_lock_core::machine::{
    Action, FencingToken, LockError, LockEvent, LockMachine, LockOptions, LockStatus, Reply, RequestId,
    SessionChoice, Transmit, TransportError, TransportErrorKind,
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
    o.seed = 7;
    o
}

/// Options using the caller's session `session`.
pub(crate) fn existing(session: &str) -> LockOptions {
    let mut o = options();
    o.session = SessionChoice::Existing(SessionId::new(session).unwrap());
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

/// What a request asks, recognised from its method, path and query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Create,
    Renew(String),
    Destroy(String),
    Info(String),
    Get { key: String, index: Option<u64> },
    Acquire { key: String, session: String },
    Release { key: String, session: String },
    Delete { key: String, cas: u64 },
    Other,
}

/// A request the machine sent.
#[derive(Clone, Debug)]
pub(crate) struct Sent {
    pub(crate) id: RequestId,
    /// When it was sent.
    pub(crate) at: Instant,
    pub(crate) deadline: Instant,
    pub(crate) method: String,
    /// Percent-decoded.
    pub(crate) path: String,
    /// Percent-decoded; `None` for a bare flag such as `consistent`. A lock transaction's
    /// operation is read into it too (`verb`, `key`, `session`, `flags`), so that patterns name
    /// its fields as they would an acquire's query.
    pub(crate) query: Vec<(String, Option<String>)>,
    /// The body; for a lock transaction, the value it writes (base64-decoded from its JSON).
    pub(crate) body: Vec<u8>,
}

/// A lock transaction's one operation, as query-like pairs, and the value it writes.
fn txn_fields(body: &[u8]) -> (Vec<(String, Option<String>)>, Vec<u8>) {
    use base64::Engine as _;
    let ops: serde_json::Value = serde_json::from_slice(body).unwrap();
    let op = &ops[0]["KV"];
    let field = |name: &str| match &op[name] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let fields = ["Verb", "Key", "Session", "Flags"]
        .iter()
        .map(|name| (name.to_lowercase(), Some(field(name))))
        .collect();
    let value = base64::engine::general_purpose::STANDARD
        .decode(op["Value"].as_str().unwrap_or(""))
        .unwrap();
    (fields, value)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| char::from(*c).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap());
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Sent {
    pub(crate) fn new(t: Transmit, at: Instant) -> Sent {
        let uri = t.request.uri();
        let query = uri
            .query()
            .map(|q| {
                q.split('&')
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => (percent_decode(k), Some(percent_decode(v))),
                        None => (percent_decode(kv), None),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let path = percent_decode(uri.path());
        let (query, body) = if path == "/v1/txn" {
            let (mut fields, value) = txn_fields(t.request.body());
            fields.extend(query);
            (fields, value)
        } else {
            (query, t.request.body().clone())
        };
        Sent {
            id: t.id,
            at,
            deadline: t.deadline,
            method: t.request.method().to_string(),
            path,
            query,
            body,
        }
    }

    /// A parameter's value (`Some("")` for a bare flag).
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    pub(crate) fn index(&self) -> Option<u64> {
        self.param("index").map(|v| v.parse().unwrap())
    }

    /// The `wait` of a blocking read.
    pub(crate) fn wait(&self) -> Option<Duration> {
        let w = self.param("wait")?;
        Some(match w.strip_suffix("ms") {
            Some(n) => Duration::from_millis(n.parse().unwrap()),
            None => consul_lock_core::duration::parse(w).unwrap(),
        })
    }

    /// When a blocking read's wait runs out (when Consul answers it unchanged).
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.index()?;
        Some(self.at + self.wait()?)
    }

    /// `METHOD /path?query`, as written in the patterns.
    pub(crate) fn describe(&self) -> String {
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        format!("{} {}{}", self.method, self.path, query)
    }

    /// Whether the request matches `pattern`: `METHOD /path` then optionally `?` and `&`-separated
    /// conditions on the query: `name=value`, `name=*` (any value), `name` (present), `!name`
    /// (absent). Parameters not named are not checked.
    pub(crate) fn is(&self, pattern: &str) -> bool {
        let (method, rest) = pattern.split_once(' ').unwrap();
        let (path, conditions) = rest.split_once('?').unwrap_or((rest, ""));
        if method != self.method || path != self.path {
            return false;
        }
        conditions.split('&').filter(|c| !c.is_empty()).all(|c| {
            if let Some(name) = c.strip_prefix('!') {
                !self.has(name)
            } else if let Some((name, value)) = c.split_once('=') {
                match self.param(name) {
                    Some(v) => value == "*" || v == value,
                    None => false,
                }
            } else {
                self.has(c)
            }
        })
    }

    pub(crate) fn kind(&self) -> Kind {
        let p = self.path.as_str();
        let m = self.method.as_str();
        let param = |name: &str| self.param(name).map(str::to_owned);
        if let Some(key) = p.strip_prefix("/v1/kv/") {
            let key = key.to_owned();
            return match m {
                "GET" => Kind::Get {
                    key,
                    index: self.index(),
                },
                "PUT" => match param("release") {
                    Some(session) => Kind::Release { key, session },
                    None => Kind::Other,
                },
                "DELETE" => match param("cas").and_then(|c| c.parse().ok()) {
                    Some(cas) => Kind::Delete { key, cas },
                    None => Kind::Other,
                },
                _ => Kind::Other,
            };
        }
        match (m, p) {
            ("PUT", "/v1/session/create") => Kind::Create,
            ("PUT", "/v1/txn") => match (param("verb").as_deref(), param("key"), param("session")) {
                (Some("lock"), Some(key), Some(session)) => Kind::Acquire { key, session },
                _ => Kind::Other,
            },
            _ => {
                if let (Some(id), "PUT") = (p.strip_prefix("/v1/session/renew/"), m) {
                    Kind::Renew(id.to_owned())
                } else if let (Some(id), "PUT") = (p.strip_prefix("/v1/session/destroy/"), m) {
                    Kind::Destroy(id.to_owned())
                } else if let (Some(id), "GET") = (p.strip_prefix("/v1/session/info/"), m) {
                    Kind::Info(id.to_owned())
                } else {
                    Kind::Other
                }
            }
        }
    }
}

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

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    Idle,
    Acquiring,
    Held(FencingToken),
    Releasing,
    Destroying,
}

impl Expect {
    fn status(&self) -> LockStatus {
        match self {
            Expect::Idle => LockStatus::Idle,
            Expect::Acquiring => LockStatus::Acquiring,
            Expect::Held(_) => LockStatus::Held,
            Expect::Releasing => LockStatus::Releasing,
            Expect::Destroying => LockStatus::Destroying,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Cause {
    Lock,
    Unlock,
    Destroy,
    Cancel(Expect),
    /// A reply: the session an acquire was granted to, and what a KV read showed.
    Reply {
        granted: Option<String>,
        pair: Option<(Option<String>, u64)>,
    },
    Timeout,
}

/// What a reply says, read before it is handed over (responses can't be cloned).
fn reply_facts(sent: Option<&Sent>, reply: &Reply) -> Cause {
    let (mut granted, mut pair) = (None, None);
    if let (Some(sent), Ok(resp)) = (sent, reply) {
        match sent.kind() {
            // The lock transaction answers with the entry: a grant and a read in one.
            Kind::Acquire { session, .. } => {
                if let Ok(LockTxnOutcome::Locked(p)) = KvLockTxn::decode(resp) {
                    let holder = p.session.map(|s| s.to_string());
                    if holder.as_deref() == Some(session.as_str()) {
                        granted = Some(session);
                    }
                    pair = Some((holder, p.lock_index));
                }
            }
            Kind::Get { .. } => {
                if let Ok(q) = KvGet::decode(resp) {
                    pair = q.value.map(|p| (p.session.map(|s| s.to_string()), p.lock_index));
                }
            }
            _ => {}
        }
    }
    Cause::Reply { granted, pair }
}

/// One lock machine, with what its driver knows: the requests in flight, every request sent, the
/// events, and the state the events imply.
pub(crate) struct Node {
    pub(crate) m: LockMachine,
    /// Sent, not answered, deadline not passed.
    pub(crate) inflight: BTreeMap<RequestId, Sent>,
    /// Every request sent, in order.
    pub(crate) log: Vec<Sent>,
    /// Every event, with when it came.
    pub(crate) events: Vec<(Instant, LockEvent)>,
    seen: usize,
    expect: Expect,
    quiescent: bool,
    /// Sessions an acquire was granted to, since the last `lock`.
    granted: Vec<String>,
    /// Checks after every step (off only to look at a broken machine).
    pub(crate) checks: bool,
}

impl Node {
    pub(crate) fn new(options: LockOptions) -> Node {
        let m = LockMachine::new(ClientConfig::default(), options).unwrap();
        assert!(m.is_quiescent(), "a new machine is quiescent");
        assert_eq!(m.poll_timeout(), None);
        Node {
            m,
            inflight: BTreeMap::new(),
            log: Vec::new(),
            events: Vec::new(),
            seen: 0,
            expect: Expect::Idle,
            quiescent: true,
            granted: Vec::new(),
            checks: true,
        }
    }

    // ----- operations ----------------------------------------------------------------------

    pub(crate) fn lock(&mut self, now: Instant) -> Result<(), LockError> {
        let r = self.m.lock(now);
        match (&r, &self.expect) {
            (Ok(()), Expect::Idle) => {
                self.expect = Expect::Acquiring;
                self.granted.clear();
            }
            (Err(LockError::AlreadyHeld), Expect::Acquiring | Expect::Held(_)) => {}
            (Err(LockError::Busy), Expect::Releasing | Expect::Destroying) => {}
            (r, e) => panic!("lock() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Lock);
        self.settle(now);
        r
    }

    pub(crate) fn unlock(&mut self, now: Instant) -> Result<(), LockError> {
        let r = self.m.unlock(now);
        match (&r, &self.expect) {
            (Ok(()), Expect::Held(_)) => self.expect = Expect::Releasing,
            (Err(LockError::NotHeld), e) if !matches!(e, Expect::Held(_)) => {}
            (r, e) => panic!("unlock() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Unlock);
        self.settle(now);
        r
    }

    pub(crate) fn destroy(&mut self, now: Instant) -> Result<(), LockError> {
        let r = self.m.destroy(now);
        match (&r, &self.expect) {
            (Ok(()), Expect::Idle) => self.expect = Expect::Destroying,
            (Err(LockError::AlreadyHeld), Expect::Held(_)) => {}
            (Err(LockError::Busy), Expect::Acquiring | Expect::Releasing | Expect::Destroying) => {}
            (r, e) => panic!("destroy() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Destroy);
        self.settle(now);
        r
    }

    pub(crate) fn cancel(&mut self, now: Instant) {
        let before = self.expect.clone();
        self.m.cancel(now);
        if let Expect::Held(_) = before {
            self.expect = Expect::Releasing;
        }
        self.after(now, &Cause::Cancel(before));
        self.settle(now);
    }

    // ----- replies and time ----------------------------------------------------------------

    /// Hands the machine the reply to request `id` (in flight or not: late replies too).
    pub(crate) fn deliver(&mut self, now: Instant, id: RequestId, reply: Reply) {
        let sent = self
            .inflight
            .remove(&id)
            .or_else(|| self.log.iter().find(|s| s.id == id).cloned());
        let cause = reply_facts(sent.as_ref(), &reply);
        self.m.handle_response(now, id, reply);
        self.after(now, &cause);
        self.settle(now);
    }

    /// Calls `handle_timeout(now)`, as a driver does when `poll_timeout()` is due; the requests
    /// whose deadline passed are taken as abandoned (the machine times them out itself).
    pub(crate) fn tick(&mut self, now: Instant) {
        self.prune(now);
        self.m.handle_timeout(now);
        self.after(now, &Cause::Timeout);
        self.settle(now);
    }

    /// Moves from `from` to `to`, calling `handle_timeout` at every instant the machine asks for,
    /// and once early (half-way) before each of them, which must do nothing.
    pub(crate) fn advance(&mut self, from: Instant, to: Instant) {
        let mut now = from;
        while let Some(t) = self.m.poll_timeout().filter(|t| *t <= to) {
            if t > now {
                let mid = now + (t - now) / 2;
                if mid > now && self.checks {
                    self.early(mid);
                }
                now = t;
            }
            self.tick(now);
        }
        self.prune(to);
    }

    /// A `handle_timeout` before anything is due: must do nothing.
    pub(crate) fn early(&mut self, at: Instant) {
        if let Some(t) = self.m.poll_timeout() {
            assert!(t > at, "not early");
        }
        self.m.handle_timeout(at);
        if let Some(action) = self.m.poll_action() {
            panic!("an early handle_timeout acted: {action:?}");
        }
    }

    /// Calls `handle_timeout(now)` while the machine says something is due.
    fn settle(&mut self, now: Instant) {
        for _ in 0..100 {
            match self.m.poll_timeout() {
                Some(t) if t <= now => {
                    self.prune(now);
                    self.m.handle_timeout(now);
                    self.after(now, &Cause::Timeout);
                }
                _ => {
                    self.prune(now);
                    if self.checks {
                        // A spurious call at the same instant.
                        self.m.handle_timeout(now);
                        if let Some(action) = self.m.poll_action() {
                            panic!("a spurious handle_timeout acted: {action:?}");
                        }
                    }
                    return;
                }
            }
        }
        panic!(
            "poll_timeout() stays due at {now:?} however often handle_timeout(now) is called: a \
             driver would spin (status {:?}, in flight {:?})",
            self.m.status(),
            self.inflight.values().map(Sent::describe).collect::<Vec<_>>()
        );
    }

    fn prune(&mut self, now: Instant) {
        self.inflight.retain(|_, s| s.deadline > now);
    }

    // ----- looking -------------------------------------------------------------------------

    /// The events since the last call.
    pub(crate) fn take_events(&mut self) -> Vec<LockEvent> {
        let new = self.events[self.seen..].iter().map(|(_, e)| e.clone()).collect();
        self.seen = self.events.len();
        new
    }

    /// The most recent request in flight matching `pattern`, if any.
    pub(crate) fn find(&self, pattern: &str) -> Option<Sent> {
        self.inflight.values().rev().find(|s| s.is(pattern)).cloned()
    }

    /// The most recent request in flight matching `pattern`.
    pub(crate) fn expect(&self, pattern: &str) -> Sent {
        match self.find(pattern) {
            Some(s) => s,
            None => panic!(
                "no request in flight matches {pattern:?}; in flight: {:#?}",
                self.describe()
            ),
        }
    }

    /// How many requests in flight match `pattern`.
    pub(crate) fn count(&self, pattern: &str) -> usize {
        self.inflight.values().filter(|s| s.is(pattern)).count()
    }

    /// The requests in flight, described.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.inflight.values().map(Sent::describe).collect()
    }

    // ----- the checks ----------------------------------------------------------------------

    /// Drains the actions of one step and checks the invariants; returns how many there were.
    fn after(&mut self, now: Instant, cause: &Cause) -> usize {
        let mut actions = 0;
        let mut events = Vec::new();
        let mut sent = Vec::new();
        while let Some(action) = self.m.poll_action() {
            actions += 1;
            match action {
                Action::Send(t) => {
                    let s = Sent::new(t, now);
                    if self.checks {
                        check_send(&s, now);
                    }
                    sent.push(s.kind());
                    self.inflight.insert(s.id, s.clone());
                    self.log.push(s);
                }
                Action::Event(e) => events.push(e),
            }
        }
        if !self.checks {
            self.events.extend(events.into_iter().map(|e| (now, e)));
            return actions;
        }
        if self.quiescent && matches!(cause, Cause::Reply { .. } | Cause::Timeout) {
            assert_eq!(actions, 0, "a quiescent machine acted ({cause:?})");
        }
        if let Cause::Cancel(Expect::Idle) = cause {
            assert_eq!(actions, 0, "cancel() on an idle machine acted");
        }
        if let Cause::Cancel(Expect::Acquiring | Expect::Destroying) = cause {
            assert!(
                events.contains(&LockEvent::Cancelled),
                "cancel() must report Cancelled at once, got {events:?}"
            );
        }
        self.note_granted(cause);
        for e in events {
            self.on_event(&e, cause);
            self.events.push((now, e));
        }
        if let Expect::Held(token) = &self.expect {
            // Never let go of a held key behind the user's back.
            let session = token.session.to_string();
            for kind in &sent {
                let pulls = match kind {
                    Kind::Release { session: s, .. } | Kind::Destroy(s) => *s == session,
                    _ => false,
                };
                assert!(!pulls, "{kind:?} sent while holding the lock with {session}");
            }
        }
        self.check_state(now);
        self.quiescent = self.m.is_quiescent();
        actions
    }

    fn on_event(&mut self, e: &LockEvent, cause: &Cause) {
        let next = match (e, &self.expect) {
            (LockEvent::Acquired(token), Expect::Acquiring) => {
                assert_eq!(token.key.as_str(), self.m.options().key.as_str());
                let session = token.session.to_string();
                assert!(
                    self.granted.contains(&session),
                    "Acquired({token:?}) but no acquire for that session was answered true"
                );
                match cause {
                    Cause::Reply { pair, .. } => assert_eq!(
                        pair,
                        &Some((Some(session), token.lock_index)),
                        "Acquired must carry the session and LockIndex of the entry it follows"
                    ),
                    other => panic!("Acquired on {other:?}, not on a reply with the entry"),
                }
                Expect::Held(token.clone())
            }
            (LockEvent::Retrying(_), Expect::Acquiring) => Expect::Acquiring,
            (LockEvent::GaveUp, Expect::Acquiring) => {
                assert!(self.m.options().lock_try_once, "GaveUp without try-once");
                Expect::Idle
            }
            (LockEvent::Cancelled, Expect::Acquiring | Expect::Destroying) => {
                assert!(matches!(cause, Cause::Cancel(_)), "Cancelled outside cancel()");
                Expect::Idle
            }
            (LockEvent::Failed(_), Expect::Acquiring | Expect::Destroying)
            | (LockEvent::Lost(_), Expect::Held(_))
            | (LockEvent::Released | LockEvent::ReleaseFailed(_), Expect::Releasing)
            | (LockEvent::Destroyed, Expect::Destroying) => Expect::Idle,
            (e, state) => panic!("event {e:?} while {state:?}"),
        };
        self.expect = next;
    }

    fn check_state(&mut self, now: Instant) {
        let m = &self.m;
        assert_eq!(
            m.status(),
            self.expect.status(),
            "status() disagrees with the events"
        );
        if let Some(t) = m.poll_timeout() {
            assert!(t >= now, "poll_timeout() is before the latest now");
        }
        if m.is_quiescent() {
            assert_eq!(m.poll_timeout(), None, "quiescent, yet wants a timeout");
            assert_eq!(m.in_flight(), 0, "quiescent, yet waits for requests");
            assert_eq!(self.expect, Expect::Idle);
        }
        if let Some(id) = m.session().id() {
            let renews = self
                .inflight
                .values()
                .filter(|s| s.kind() == Kind::Renew(id.to_string()))
                .count();
            assert!(renews <= 1, "{renews} renews of {id} in flight");
            assert_eq!(
                renews == 1,
                m.session().renew_in_flight(),
                "renew_in_flight() disagrees with the requests in flight"
            );
        }
        if let Expect::Held(token) = &self.expect {
            assert_eq!(m.token(), Some(token));
            assert_eq!(m.session().id(), Some(&token.session), "held on another session");
            if let Some(deadline) = m.session().renew_deadline() {
                assert!(now < deadline, "still held at or past the renew deadline");
            }
        } else {
            assert_eq!(m.token(), None);
        }
    }

    /// Records a granted acquire.
    fn note_granted(&mut self, cause: &Cause) {
        if let Cause::Reply { granted: Some(s), .. } = cause {
            if !self.granted.contains(s) {
                self.granted.push(s.clone());
            }
        }
    }
}

/// Checks a request as it is sent.
fn check_send(s: &Sent, now: Instant) {
    assert_ne!(s.kind(), Kind::Other, "unrecognised request {}", s.describe());
    assert!(s.deadline > now, "{} has a deadline not after now", s.describe());
    assert_ne!(s.param("index"), Some("0"), "{} blocks on index 0", s.describe());
    if s.has("index") {
        let wait = s
            .wait()
            .unwrap_or_else(|| panic!("{} has an index and no wait", s.describe()));
        assert!(wait <= secs(600), "{} waits over Consul's 10 min", s.describe());
        assert!(
            s.deadline > now + wait + wait / 16,
            "{}: a blocking read's deadline must cover wait + wait/16 + a margin",
            s.describe()
        );
    }
}

// ----- a single machine on a clock ----------------------------------------------------------------

/// One machine and a clock: the hand-driven test rig.
pub(crate) struct Rig {
    pub(crate) clock: Clock,
    pub(crate) node: Node,
}

impl Rig {
    pub(crate) fn new(options: LockOptions) -> Rig {
        Rig {
            clock: Clock::new(),
            node: Node::new(options),
        }
    }

    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Time since the start.
    pub(crate) fn t(&self) -> Duration {
        self.clock.elapsed()
    }

    pub(crate) fn m(&self) -> &LockMachine {
        &self.node.m
    }

    pub(crate) fn lock(&mut self) -> Result<(), LockError> {
        self.node.lock(self.clock.now())
    }

    pub(crate) fn unlock(&mut self) -> Result<(), LockError> {
        self.node.unlock(self.clock.now())
    }

    pub(crate) fn destroy(&mut self) -> Result<(), LockError> {
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
        mut stop: impl FnMut(&Node) -> bool,
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

/// Runs `nodes` on `clock` until `until`: at every instant, every request in flight is offered to
/// `serve` (which answers or holds it) until none is answered; then time moves to the next timer
/// of any node or the end of a held blocking read's wait. Returns whether `stop` held.
pub(crate) fn run(
    clock: &mut Clock,
    nodes: &mut [Node],
    until: Instant,
    serve: &mut dyn FnMut(&Sent, Instant) -> Option<Reply>,
    stop: &mut dyn FnMut(&[Node]) -> bool,
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
            Kind::Acquire { key, session } => {
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
                e.value = sent.body.clone();
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
            Kind::Other => reply::status(400, "unsupported"),
        })
    }
}
