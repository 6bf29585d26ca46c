//! The transaction endpoint (`PUT /v1/txn`) for KV `lock`, `unlock`, `check-session` and
//! `delete` operations, in the order Consul 1.8's HTTP handler (`convertOps`), RPC endpoints (`Txn.Apply`, `Txn.Read` and their
//! `preCheck`) and state store (`txnDispatch`, `txnKVS`) check things. The state changes are the
//! KV endpoint's own (`kvs_lock`, `kvs_unlock`).
//!
//! What a real Consul 1.8.7 agent does, and so this module:
//!
//! - a body over 512 KiB (`txn_max_req_len`) answers 413 (connection closed); a body Go's JSON
//!   decoder refuses answers 400 `Failed to parse body: ...`; more than 64 operations answer 413;
//!   a `null` operation makes Consul's handler panic, which closes the connection without a
//!   reply (here: a 500 with `Connection: close`, as no reply at all cannot be expressed);
//! - operations without `KV` are dropped (`OpIndex` counts the others);
//! - without a write verb (`lock`, `unlock`, `set`, ...), the transaction is a read: query options
//!   are parsed (`stale`, `consistent`, `wait`, `index`), the reply carries `Index`,
//!   `LastContact`, `KnownLeader`, `ConsistencyLevel` and the `X-Consul-KnownLeader` and
//!   `X-Consul-LastContact` headers; an unknown verb is refused there;
//! - with one, it is a write: only `dc` is read from the query; the pre-checks (a missing key:
//!   `Must provide key`; a `lock` on a key under lock-delay: `failed to lock key "k" due to lock
//!   delay`) run for every operation before Raft and take no index; then the transaction takes a
//!   Raft index and runs every operation in order, each seeing the earlier ones' writes; any
//!   error (`missing session`, `failed session lookup: ...`, `invalid session "id"`, `failed to
//!   lock key "k", lock is already held`, `failed to unlock key "k", lock isn't held, or is held
//!   by another session`, `unknown KV verb "v"`) rolls every write back, and all errors are
//!   reported (409, `Results` null);
//! - a success answers each operation's entry as written, `Value` blanked (null); a `get-tree`
//!   answers every entry under its prefix as the earlier operations left them, values kept.
//!
//! Not modelled (a 500 naming what is missing): the other KV verbs (`set`, `cas`, `get`, ...),
//! a `get-tree` in a transaction that does not write,
//! and Node, Service and Check operations. Go's JSON quirks are followed for the fields of a KV
//! operation (case-insensitive names, `null` ignored, base64 values, its type-error wording), but
//! the first of several type errors is found in field-name order rather than document order, and
//! a number too large for `u64` is quoted as `serde_json` prints it.

use serde_json::Value;

use crate::SimConsul;
use crate::json::{self, Json};
use crate::kv::entry_json;
use crate::wire::{self, Query, Reply};

/// Consul's `txn_max_req_len` default.
const MAX_TXN_LEN: usize = 512 * 1024;
/// Consul's `maxTxnOps`.
const MAX_TXN_OPS: usize = 64;
/// The KV verbs that write (Consul's `isWrite`).
const WRITE_VERBS: [&str; 7] = [
    "set",
    "delete",
    "delete-cas",
    "delete-tree",
    "cas",
    "lock",
    "unlock",
];
/// The KV verbs that read.
const READ_VERBS: [&str; 5] = [
    "get",
    "get-tree",
    "check-index",
    "check-session",
    "check-not-exists",
];

/// One KV operation (`api.KVTxnOp`), as decoded.
#[derive(Clone, Debug, Default)]
struct KvOp {
    verb: String,
    key: String,
    value: Vec<u8>,
    flags: u64,
    session: String,
}

/// One element of the body (`api.TxnOp`).
#[derive(Debug)]
enum Op {
    /// `null`: Consul's `convertOps` dereferences it and panics.
    Null,
    /// Neither `KV` nor another operation: `convertOps` drops it.
    Empty,
    /// A KV operation.
    Kv(KvOp),
    /// A Node, Service or Check operation (not modelled).
    Other(&'static str),
}

/// A failed operation: its index among the kept operations, and Consul's words.
type TxnError = (usize, String);

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn field_error(what: &str, field: &str, go_type: &str) -> String {
    format!("json: cannot unmarshal {what} into Go struct field {field} of type {go_type}")
}

fn kv_string(v: &Value, field: &str, go_type: &str, into: &mut String) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) => {
            into.clone_from(s);
            Ok(())
        }
        other => Err(field_error(kind(other), &format!("KVTxnOp.KV.{field}"), go_type)),
    }
}

fn kv_uint(v: &Value, field: &str, into: &mut u64) -> Result<(), String> {
    let field = format!("KVTxnOp.KV.{field}");
    match v {
        Value::Null => Ok(()),
        Value::Number(n) => match n.as_u64() {
            Some(n) => {
                *into = n;
                Ok(())
            }
            None => Err(field_error(&format!("number {n}"), &field, "uint64")),
        },
        other => Err(field_error(kind(other), &field, "uint64")),
    }
}

/// `api.KVTxnOp`'s fields, matched case-insensitively as Go does.
fn decode_kv(map: &serde_json::Map<String, Value>) -> Result<KvOp, String> {
    let mut op = KvOp::default();
    for (name, v) in map {
        match name.to_ascii_lowercase().as_str() {
            "verb" => kv_string(v, "Verb", "api.KVOp", &mut op.verb)?,
            "key" => kv_string(v, "Key", "string", &mut op.key)?,
            "session" => kv_string(v, "Session", "string", &mut op.session)?,
            "namespace" => kv_string(v, "Namespace", "string", &mut String::new())?,
            "flags" => kv_uint(v, "Flags", &mut op.flags)?,
            "index" => kv_uint(v, "Index", &mut 0)?,
            "value" => match v {
                Value::Null => op.value = Vec::new(),
                Value::String(s) => {
                    op.value = json::base64_decode(s.as_bytes())
                        .map_err(|at| format!("illegal base64 data at input byte {at}"))?;
                }
                other => return Err(field_error(kind(other), "KVTxnOp.KV.Value", "[]uint8")),
            },
            _ => {}
        }
    }
    Ok(op)
}

/// One `api.TxnOp`.
fn decode_op(v: &Value) -> Result<Op, String> {
    let map = match v {
        Value::Null => return Ok(Op::Null),
        Value::Object(map) => map,
        other => {
            return Err(format!(
                "json: cannot unmarshal {} into Go value of type api.TxnOp",
                kind(other)
            ));
        }
    };
    let mut kv = None;
    let mut other = None;
    for (name, v) in map {
        let (field, go_type) = match name.to_ascii_lowercase().as_str() {
            "kv" => ("KV", "api.KVTxnOp"),
            "node" => ("Node", "api.NodeTxnOp"),
            "service" => ("Service", "api.ServiceTxnOp"),
            "check" => ("Check", "api.CheckTxnOp"),
            _ => continue,
        };
        match v {
            Value::Null => {}
            Value::Object(inner) if field == "KV" => kv = Some(decode_kv(inner)?),
            Value::Object(_) => other = Some(field),
            v => return Err(field_error(kind(v), &format!("TxnOp.{field}"), go_type)),
        }
    }
    // `convertOps` looks at `KV` first.
    Ok(match (kv, other) {
        (Some(kv), _) => Op::Kv(kv),
        (None, Some(field)) => Op::Other(field),
        (None, None) => Op::Empty,
    })
}

/// The body as Go's `json.Decoder` reads it into `api.TxnOps` (one value; what follows is left
/// unread). `Err`: the text after `Failed to parse body: `.
fn decode_ops(body: &[u8]) -> Result<Vec<Op>, String> {
    let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<Value>();
    let value = match stream.next() {
        None => return Err("EOF".to_owned()),
        Some(Err(e)) => return Err(e.to_string()),
        Some(Ok(v)) => v,
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items.iter().map(decode_op).collect(),
        other => Err(format!(
            "json: cannot unmarshal {} into Go value of type api.TxnOps",
            kind(&other)
        )),
    }
}

fn errors_json(errors: &[TxnError]) -> Json {
    Json::Arr(
        errors
            .iter()
            .map(|(i, what)| {
                Json::Obj(vec![
                    ("OpIndex", Json::U64(u64::try_from(*i).unwrap_or(u64::MAX))),
                    ("What", Json::str(what.clone())),
                ])
            })
            .collect(),
    )
}

impl SimConsul {
    /// `PUT /v1/txn`.
    pub(super) fn txn_endpoint(
        &mut self,
        request: &http::Request<Vec<u8>>,
        query: &Query,
    ) -> Result<Reply, Reply> {
        let body = request.body();
        if body.len() > MAX_TXN_LEN {
            let mut reply = Reply::text(
                413,
                format!(
                    "Request body({} bytes) too large, max size: {MAX_TXN_LEN} bytes. See \
                     https://www.consul.io/docs/agent/options.html#txn_max_req_len.",
                    body.len()
                ),
            );
            reply.header("Connection", "close");
            return Err(reply);
        }
        let ops = decode_ops(body).map_err(|e| Reply::text(400, format!("Failed to parse body: {e}")))?;
        if ops.len() > MAX_TXN_OPS {
            return Err(Reply::text(
                413,
                format!(
                    "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                    ops.len()
                ),
            ));
        }
        let mut kv_ops = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Null => {
                    let mut reply = Reply::text(
                        500,
                        "SimConsul: a null operation makes Consul's handler panic; it closes the \
                         connection without a reply",
                    );
                    reply.header("Connection", "close");
                    return Err(reply);
                }
                Op::Empty => {}
                Op::Other(field) => {
                    return Err(Reply::text(
                        500,
                        format!("SimConsul does not model {field} operations in transactions"),
                    ));
                }
                Op::Kv(kv) => {
                    let modelled = matches!(
                        kv.verb.as_str(),
                        "lock" | "unlock" | "check-session" | "delete" | "get-tree"
                    );
                    let known =
                        WRITE_VERBS.contains(&kv.verb.as_str()) || READ_VERBS.contains(&kv.verb.as_str());
                    if known && !modelled {
                        return Err(Reply::text(
                            500,
                            format!(
                                "SimConsul does not model the KV verb {} in transactions (only lock, unlock, check-session, delete and get-tree)",
                                wire::go_quote(&kv.verb)
                            ),
                        ));
                    }
                    kv_ops.push(kv);
                }
            }
        }
        if kv_ops.iter().any(|op| WRITE_VERBS.contains(&op.verb.as_str())) {
            self.txn_apply(&kv_ops, query)
        } else if kv_ops.iter().any(|op| op.verb == "get-tree") {
            // A read-only transaction's reads (`Txn.Read`, with its query options) are not
            // modelled: only a `get-tree` after a write (a queued lock's enqueue) is.
            Err(Reply::text(
                500,
                "SimConsul models get-tree only in a transaction that writes",
            ))
        } else {
            self.txn_read(&kv_ops, query)
        }
    }

    /// `Txn.Read`: a transaction without writes (here: only unknown verbs, or none).
    fn txn_read(&self, ops: &[KvOp], query: &Query) -> Result<Reply, Reply> {
        let options = SimConsul::parse_options(query)?;
        self.forward(query, !options.stale)?;
        let mut errors: Vec<TxnError> = ops
            .iter()
            .enumerate()
            .filter(|(_, op)| op.key.is_empty())
            .map(|(i, _)| (i, "Must provide key".to_owned()))
            .collect();
        if errors.is_empty() {
            errors = ops
                .iter()
                .enumerate()
                .map(|(i, op)| (i, format!("unknown KV verb {}", wire::go_quote(&op.verb))))
                .collect();
        }
        let last_contact_ns =
            u64::try_from(self.now.saturating_duration_since(self.leader_lost_at).as_nanos())
                .unwrap_or(u64::MAX);
        let body = Json::Obj(vec![
            (
                "Results",
                if errors.is_empty() {
                    Json::Arr(Vec::new())
                } else {
                    Json::Null
                },
            ),
            (
                "Errors",
                if errors.is_empty() {
                    Json::Null
                } else {
                    errors_json(&errors)
                },
            ),
            ("Index", Json::U64(0)),
            (
                "LastContact",
                Json::U64(if self.leader { 0 } else { last_contact_ns }),
            ),
            ("KnownLeader", Json::Bool(self.leader)),
            ("ConsistencyLevel", Json::str("")),
        ]);
        let mut reply = Reply::json(&body, self.pretty(query));
        if !errors.is_empty() {
            reply.status = 409;
        }
        reply.header("X-Consul-KnownLeader", if self.leader { "true" } else { "false" });
        reply.header("X-Consul-LastContact", self.last_contact_ms().to_string());
        Ok(reply)
    }

    /// `Txn.Apply`: the pre-checks, then every operation under one Raft index, all or nothing.
    fn txn_apply(&mut self, ops: &[KvOp], query: &Query) -> Result<Reply, Reply> {
        self.forward(query, true)?;
        let pretty = self.pretty(query);
        let conflict = |errors: &[TxnError]| {
            let body = Json::Obj(vec![("Results", Json::Null), ("Errors", errors_json(errors))]);
            let mut reply = Reply::json(&body, pretty);
            reply.status = 409;
            reply
        };
        // `kvsPreApply`, before Raft: lock-delay is the leader's wall-clock business.
        let prechecks: Vec<TxnError> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| {
                if op.key.is_empty() {
                    Some((i, "Must provide key".to_owned()))
                } else if op.verb == "lock"
                    && self
                        .lock_delays
                        .get(&op.key)
                        .is_some_and(|until| *until > self.now)
                {
                    Some((
                        i,
                        format!("failed to lock key {} due to lock delay", wire::go_quote(&op.key)),
                    ))
                } else {
                    None
                }
            })
            .collect();
        if !prechecks.is_empty() {
            return Ok(conflict(&prechecks));
        }
        let idx = self.raft();
        // A failed operation writes nothing, so only a transaction of several needs an undo.
        let undo = (ops.len() > 1).then(|| (self.kv.clone(), self.kv_table_index, self.tombstones.clone()));
        let mut results = Vec::with_capacity(ops.len());
        let mut errors: Vec<TxnError> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let quoted = wire::go_quote(&op.key);
            let outcome = match op.verb.as_str() {
                "lock" => self
                    .kvs_lock(idx, &op.key, &op.session, op.flags, op.value.clone())
                    .and_then(|ok| {
                        ok.then_some(())
                            .ok_or_else(|| format!("failed to lock key {quoted}, lock is already held"))
                    }),
                "unlock" => self
                    .kvs_unlock(idx, &op.key, &op.session, op.flags, op.value.clone())
                    .and_then(|ok| {
                        ok.then_some(()).ok_or_else(|| {
                            format!(
                                "failed to unlock key {quoted}, lock isn't held, or is held by another session"
                            )
                        })
                    }),
                // Consul's `kvsCheckSessionTxn`, as an election's proclaim uses it: the write that
                // follows goes through only while the session still holds the key.
                "check-session" => match self.kv.get(&op.key) {
                    None => Err(format!("failed to check session, key {quoted} doesn't exist")),
                    Some(e) if e.session.as_deref().unwrap_or("") != op.session => Err(format!(
                        "failed session check for key {quoted}, current session {} != {}",
                        wire::go_quote(e.session.as_deref().unwrap_or("")),
                        wire::go_quote(&op.session)
                    )),
                    Some(_) => Ok(()),
                },
                // Consul's `kvsDeleteTxn`: a missing key is no error, and a delete answers no
                // result (seen on 1.8.7), which the entry being gone gives below.
                "delete" => {
                    self.kvs_delete(idx, &op.key);
                    Ok(())
                }
                // Consul's `kvsGetTxn` for `KVGetTree`: every entry under the prefix (as a
                // recursive list, values kept), as the earlier operations left them, in key
                // order; none is no error.
                "get-tree" => {
                    results.extend(
                        self.kv
                            .range(op.key.clone()..)
                            .take_while(|(k, _)| k.starts_with(&op.key))
                            .map(|(_, e)| Json::Obj(vec![("KV", entry_json(e))])),
                    );
                    continue;
                }
                verb => Err(format!("unknown KV verb {}", wire::go_quote(verb))),
            };
            match outcome {
                Ok(()) => {
                    if let Some(entry) = self.kv.get(&op.key) {
                        // Consul answers a copy of the entry with its value blanked.
                        let mut written = entry.clone();
                        written.value = Vec::new();
                        results.push(Json::Obj(vec![("KV", entry_json(&written))]));
                    }
                }
                Err(what) => errors.push((i, what)),
            }
        }
        if !errors.is_empty() {
            if let Some((kv, kv_table_index, tombstones)) = undo {
                self.kv = kv;
                self.kv_table_index = kv_table_index;
                self.tombstones = tombstones;
            }
            return Ok(conflict(&errors));
        }
        self.wake_changed();
        let body = Json::Obj(vec![("Results", Json::Arr(results)), ("Errors", Json::Null)]);
        Ok(Reply::json(&body, pretty))
    }
}
