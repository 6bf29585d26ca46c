//! What a request a machine sent asks, recognised from its method, path and query, and for the
//! lock transaction from its JSON body; and the patterns the hand-driven tests find requests by.

use std::time::{Duration, Instant};

use consul_lock_core::api::RequestClass;
use consul_lock_core::machine::{RequestId, Transmit};

/// A request's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `PUT /v1/session/create`
    Create,
    /// `PUT /v1/session/renew/<id>`
    Renew(String),
    /// `PUT /v1/session/destroy/<id>`
    Destroy(String),
    /// `GET /v1/session/info/<id>`
    Info(String),
    /// `GET /v1/kv/<prefix>?recurse`: a list of a prefix (the semaphore's reads).
    List {
        /// The prefix.
        prefix: String,
        /// The blocking index, if any.
        index: Option<u64>,
        /// Whether `consistent` is set.
        consistent: bool,
    },
    /// `GET /v1/kv/<key>`
    Get {
        /// The key.
        key: String,
        /// The blocking index, if any.
        index: Option<u64>,
    },
    /// `PUT /v1/kv/<key>?acquire=<session>` (the semaphore's contender key; the lock acquires
    /// with [`Kind::LockTxn`]).
    Acquire {
        /// The key.
        key: String,
        /// The acquiring session.
        session: String,
    },
    /// `PUT /v1/txn` with one KV `lock` operation: the lock's acquire (core's `KvLockTxn`); or
    /// a `lock` then a `get-tree`: a queued lock's enqueue (its entry's key, core's
    /// `KvEnqueueTxn`); or a `delete` then a `lock`: a queued lock's acquire (core's
    /// `KvDequeueLockTxn`).
    LockTxn {
        /// The key.
        key: String,
        /// The acquiring session.
        session: String,
        /// The flags it writes.
        flags: u64,
        /// The value it writes (base64-decoded).
        value: Vec<u8>,
        /// The key the transaction deletes first (a queued acquire's own entry), if any.
        leaves: Option<String>,
        /// The prefix the transaction reads after the lock (`get-tree`: a queued lock's
        /// enqueue, core's `KvEnqueueTxn`), if any.
        tree: Option<String>,
    },
    /// `PUT /v1/txn` with a KV `check-session` then a `lock` of the same key by the same
    /// session: a lock's proclaim (core's `KvProclaimTxn`).
    ProclaimTxn {
        /// The key.
        key: String,
        /// The holding session.
        session: String,
        /// The value it writes (base64-decoded).
        value: Vec<u8>,
    },
    /// `PUT /v1/kv/<key>?release=<session>`
    Release {
        /// The key.
        key: String,
        /// The releasing session.
        session: String,
    },
    /// `PUT /v1/kv/<key>?cas=<index>` (the semaphore's `.lock`).
    CasPut {
        /// The key.
        key: String,
        /// The expected ModifyIndex.
        cas: u64,
    },
    /// `DELETE /v1/kv/<key>?cas=<index>`
    Delete {
        /// The key.
        key: String,
        /// The expected ModifyIndex.
        cas: u64,
    },
    /// `DELETE /v1/kv/<key>`, unconditional (the semaphore's contender key).
    Remove {
        /// The key.
        key: String,
    },
    /// Anything else.
    Other,
}

/// A request the machine sent.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Its id.
    pub id: RequestId,
    /// When it was sent.
    pub at: Instant,
    /// Its deadline.
    pub deadline: Instant,
    /// The method.
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// The query, percent-decoded; `None` for a bare flag. A lock transaction's operation is read
    /// into it too (`verb`, `key`, `session`, `flags`), so that patterns name its fields as they
    /// would a query's.
    pub query: Vec<(String, Option<String>)>,
    /// The body, as sent.
    pub body: Vec<u8>,
    /// Whether the machine says the agent may hold it (a blocking read).
    pub class: RequestClass,
    /// What it asks (worked out once).
    kind: Kind,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| char::from(*c).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
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
    /// Reads a transmit sent at `at`.
    pub fn new(t: &Transmit, at: Instant) -> Sent {
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
        let mut sent = Sent {
            id: t.id,
            at,
            deadline: t.deadline,
            method: t.request.method().to_string(),
            path: percent_decode(uri.path()),
            query,
            body: t.request.body().clone(),
            class: t.class,
            kind: Kind::Other,
        };
        sent.kind = sent.recognise();
        if let Kind::LockTxn {
            key,
            session,
            flags,
            leaves,
            tree,
            ..
        } = &sent.kind
        {
            let fields = [
                ("verb", "lock".to_owned()),
                ("key", key.clone()),
                ("session", session.clone()),
                ("flags", flags.to_string()),
            ];
            let mut query: Vec<_> = fields.into_iter().map(|(k, v)| (k.to_owned(), Some(v))).collect();
            query.extend(leaves.iter().map(|l| ("leaves".to_owned(), Some(l.clone()))));
            query.extend(tree.iter().map(|t| ("tree".to_owned(), Some(t.clone()))));
            query.append(&mut sent.query);
            sent.query = query;
        }
        sent
    }

    /// The value the request writes: a lock transaction's (base64-decoded from its JSON), or the
    /// body.
    pub fn value(&self) -> &[u8] {
        match &self.kind {
            Kind::LockTxn { value, .. } | Kind::ProclaimTxn { value, .. } => value,
            _ => &self.body,
        }
    }

    /// Whether the query has parameter `name`.
    pub fn has(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    /// When a blocking read's wait runs out (when Consul answers it unchanged).
    pub fn wake_at(&self) -> Option<Instant> {
        self.index()?;
        Some(self.at + self.wait()?)
    }

    /// Whether the request matches `pattern`: `METHOD /path` then optionally `?` and
    /// `&`-separated conditions on the query: `name=value`, `name=*` (any value), `name`
    /// (present), `!name` (absent). Parameters not named are not checked.
    pub fn is(&self, pattern: &str) -> bool {
        let (method, rest) = pattern.split_once(' ').unwrap_or((pattern, ""));
        let (path, conditions) = rest.split_once('?').unwrap_or((rest, ""));
        if method != self.method || path != self.path {
            return false;
        }
        conditions.split('&').filter(|c| !c.is_empty()).all(|c| {
            if let Some(name) = c.strip_prefix('!') {
                !self.has(name)
            } else if let Some((name, value)) = c.split_once('=') {
                self.param(name).is_some_and(|v| value == "*" || v == value)
            } else {
                self.has(c)
            }
        })
    }

    /// A parameter's value (`Some("")` for a bare flag).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// The blocking index (`None` if absent; `Some(u64::MAX)`... never: a bad one panics the
    /// harness, since the machine must send a number).
    pub fn index(&self) -> Option<u64> {
        self.param("index").map(|v| match v.parse() {
            Ok(n) => n,
            Err(_) => panic!("{}: index {v:?} is not a number", self.describe()),
        })
    }

    /// The `wait` of a blocking read.
    pub fn wait(&self) -> Option<Duration> {
        let w = self.param("wait")?;
        Some(match w.strip_suffix("ms").map(str::parse::<u64>) {
            Some(Ok(n)) => Duration::from_millis(n),
            _ => match consul_lock_core::duration::parse(w) {
                Ok(d) => d,
                Err(e) => panic!("{}: wait {w:?}: {e}", self.describe()),
            },
        })
    }

    /// `METHOD /path?query`.
    pub fn describe(&self) -> String {
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        let sep = if query.is_empty() { "" } else { "?" };
        format!("{} {}{}{}", self.method, self.path, sep, query.join("&"))
    }

    /// What the request asks.
    pub fn kind(&self) -> Kind {
        self.kind.clone()
    }

    /// Whether it is a renew of session `id`.
    pub fn renews(&self, id: &str) -> bool {
        matches!(&self.kind, Kind::Renew(s) if s == id)
    }

    fn recognise(&self) -> Kind {
        let p = self.path.as_str();
        let m = self.method.as_str();
        let param = |name: &str| self.param(name).map(str::to_owned);
        if let Some(key) = p.strip_prefix("/v1/kv/") {
            let key = key.to_owned();
            let cas = param("cas").map(|c| c.parse::<u64>());
            return match m {
                "GET" if self.param("recurse").is_some() => Kind::List {
                    prefix: key,
                    index: self.index(),
                    consistent: self.param("consistent").is_some(),
                },
                "GET" => Kind::Get {
                    key,
                    index: self.index(),
                },
                "PUT" => match (param("acquire"), param("release"), cas) {
                    (Some(session), None, None) => Kind::Acquire { key, session },
                    (None, Some(session), None) => Kind::Release { key, session },
                    (None, None, Some(Ok(cas))) => Kind::CasPut { key, cas },
                    _ => Kind::Other,
                },
                "DELETE" => match cas {
                    Some(Ok(cas)) => Kind::Delete { key, cas },
                    None => Kind::Remove { key },
                    Some(Err(_)) => Kind::Other,
                },
                _ => Kind::Other,
            };
        }
        if (m, p) == ("PUT", "/v1/session/create") {
            Kind::Create
        } else if (m, p) == ("PUT", "/v1/txn") {
            lock_txn(&self.body)
                .or_else(|| proclaim_txn(&self.body))
                .or_else(|| dequeue_txn(&self.body))
                .or_else(|| enqueue_txn(&self.body))
                .unwrap_or(Kind::Other)
        } else if let (Some(id), "PUT") = (p.strip_prefix("/v1/session/renew/"), m) {
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

/// A transaction body holding exactly one KV `lock` operation with every field the lock writes,
/// as its [`Kind::LockTxn`]; `None` for anything else (another verb, several operations, a field
/// missing or of the wrong type, a value that is not base64), which the checks then refuse as an
/// unrecognised request: the machine must send exactly what Consul's `lock` verb takes.
fn lock_txn(body: &[u8]) -> Option<Kind> {
    let ops: serde_json::Value = serde_json::from_slice(body).ok()?;
    let [op] = ops.as_array()?.as_slice() else {
        return None;
    };
    lock_op(op)
}

/// A transaction body of a `check-session` and a `lock` of the same key by the same session,
/// as its [`Kind::ProclaimTxn`].
fn proclaim_txn(body: &[u8]) -> Option<Kind> {
    let (check, lock) = two_ops(body)?;
    let text = |name: &str| check.get(name)?.as_str().map(str::to_owned);
    let Some(Kind::LockTxn {
        key, session, value, ..
    }) = lock_op(&lock)
    else {
        return None;
    };
    let same = text("Verb")? == "check-session" && text("Key")? == key && text("Session")? == session;
    same.then_some(Kind::ProclaimTxn { key, session, value })
}

/// A transaction body of a KV `delete` then a `lock`, as a [`Kind::LockTxn`] that `leaves` the
/// deleted key.
fn dequeue_txn(body: &[u8]) -> Option<Kind> {
    let (delete, lock) = two_ops(body)?;
    if delete.get("Verb")?.as_str()? != "delete" {
        return None;
    }
    let entry = delete.get("Key")?.as_str()?.to_owned();
    lock_op_with(&lock, Some(entry), None)
}

/// A transaction body of a `lock` then a KV `get-tree` (nothing else in it), as a
/// [`Kind::LockTxn`] that reads the `tree`.
fn enqueue_txn(body: &[u8]) -> Option<Kind> {
    let ops: serde_json::Value = serde_json::from_slice(body).ok()?;
    let [lock, read] = ops.as_array()?.as_slice() else {
        return None;
    };
    let read = read
        .as_object()
        .filter(|o| o.len() == 1)?
        .get("KV")?
        .as_object()?;
    if read.get("Verb")?.as_str()? != "get-tree" {
        return None;
    }
    let prefix = read.get("Key")?.as_str()?.to_owned();
    lock_op_with(lock, None, Some(prefix))
}

/// [`lock_op`], in a transaction that also deletes `leaves` first or reads `tree` after.
fn lock_op_with(op: &serde_json::Value, leaves: Option<String>, tree: Option<String>) -> Option<Kind> {
    let mut kind = lock_op(op)?;
    if let Kind::LockTxn {
        leaves: l, tree: t, ..
    } = &mut kind
    {
        (*l, *t) = (leaves, tree);
    }
    Some(kind)
}

/// A transaction body of exactly two operations: the first's KV operation (an object of that
/// one field), and the second as it is.
fn two_ops(body: &[u8]) -> Option<(serde_json::Map<String, serde_json::Value>, serde_json::Value)> {
    let ops: serde_json::Value = serde_json::from_slice(body).ok()?;
    let [first, second] = ops.as_array()?.as_slice() else {
        return None;
    };
    let first = first
        .as_object()
        .filter(|o| o.len() == 1)?
        .get("KV")?
        .as_object()?
        .clone();
    Some((first, second.clone()))
}

/// One KV `lock` operation with every field the lock writes.
fn lock_op(op: &serde_json::Value) -> Option<Kind> {
    use base64::Engine as _;
    let kv = op.as_object().filter(|o| o.len() == 1)?.get("KV")?.as_object()?;
    let text = |name: &str| kv.get(name)?.as_str().map(str::to_owned);
    if text("Verb")? != "lock" {
        return None;
    }
    let value = base64::engine::general_purpose::STANDARD
        .decode(text("Value")?)
        .ok()?;
    Some(Kind::LockTxn {
        key: text("Key")?,
        session: text("Session")?,
        flags: kv.get("Flags")?.as_u64()?,
        value,
        leaves: None,
        tree: None,
    })
}
