//! `PUT /v1/txn` with one KV `lock` operation: an acquire that answers with the entry it wrote.
//!
//! A plain acquire (`PUT /v1/kv/<key>?acquire=`) answers `true` or `false` and nothing else, so
//! a lock that wants its fencing token (the key's `LockIndex` and `ModifyIndex` at the acquire)
//! must read the key once more: a third round trip on every handoff, which Go's lock, returning
//! without a token, does not pay. The transaction endpoint runs the same lock operation on the
//! server (the same session checks, the same lock-delay) and answers with the entry, indices
//! included, in the same round trip; and when it refuses, it says why (held by another session,
//! lock-delay, invalid session), which a plain acquire's `false` does not.

use base64::Engine as _;
use http::Method;
use serde::{Deserialize, Serialize};

use crate::api::kv::WireKvPair;
use crate::api::reply::{check_len, json_body, status_error, truncate};
use crate::api::request::Target;
use crate::api::{ApiError, ClientConfig, Endpoint, Key, KvPair, SessionId};

/// `PUT /v1/txn` `[{"KV": {"Verb": "lock", ...}}]`: take `key` for `session`, writing `value`
/// and `flags`, and learn the entry as written.
///
/// ```
/// # use consul_lock_core::api::{ClientConfig, Endpoint, Key, KvLockTxn, SessionId};
/// let lock = KvLockTxn {
///     key: Key::new("service/leader/.lock").unwrap(),
///     session: SessionId::new("adf4238a-882b-9ddc-4a9d-5b6758e4159e").unwrap(),
///     flags: 0x2ddc_cbc0_58a5_0c18,
///     value: b"host-1".to_vec(),
/// };
/// let request = lock.encode(&ClientConfig::http("127.0.0.1:8500").unwrap());
/// assert_eq!(request.uri(), "http://127.0.0.1:8500/v1/txn");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLockTxn {
    /// The key.
    pub key: Key,
    /// The acquiring session.
    pub session: SessionId,
    /// The flags to store.
    pub flags: u64,
    /// The value to store.
    pub value: Vec<u8>,
}

/// What a lock transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockTxnOutcome {
    /// The session holds the key: the entry as written (its value left out, as Consul does). A
    /// session taking a key it already holds gets the entry unchanged (no new `LockIndex`).
    Locked(KvPair),
    /// Consul refused the lock (409 Conflict), for this reason.
    Refused(LockRefusal),
}

/// Why Consul refused a lock transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockRefusal {
    /// Another session holds the key.
    Held,
    /// The key's lock-delay is in force: its last holder's session was invalidated lately.
    LockDelay,
    /// The session is unknown (expired or destroyed).
    InvalidSession,
    /// A proclaim's `check-session` failed: the key is gone, or held by another session or by
    /// none ([`KvProclaimTxn`]); or an `unlock` of a batch found the key not held by the
    /// session ([`KvBatchTxn`]).
    NotHeld,
    /// The token may not write the key (ACLs): Consul answers the transaction `409` with
    /// `What: "Permission denied"` where a plain acquire would answer `403`.
    PermissionDenied,
    /// Another reason, as Consul worded it.
    Other(String),
}

#[derive(Serialize)]
struct WireOp<'a> {
    #[serde(rename = "KV")]
    kv: WireKvOp<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireKvOp<'a> {
    verb: &'static str,
    key: &'a str,
    value: String,
    flags: u64,
    session: &'a str,
    /// Enterprise: a transaction's operations name their namespace and partition themselves
    /// (the `ns` and `partition` parameters, which every other request carries, are sent too).
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireResponse {
    #[serde(default)]
    results: Option<Vec<WireResult>>,
    #[serde(default)]
    errors: Option<Vec<WireError>>,
}

#[derive(Deserialize)]
struct WireResult {
    #[serde(rename = "KV", default)]
    kv: Option<WireKvPair>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireError {
    /// Only a batch reads it; kept raw so that a garbled one fails only there (a lock
    /// transaction's answer does not depend on it). Missing: 0.
    #[serde(default)]
    op_index: serde_json::Value,
    #[serde(default)]
    what: String,
}

impl KvLockTxn {
    /// The transaction's `lock` operation.
    fn op<'a>(&'a self, config: &'a ClientConfig, verb: &'static str) -> WireOp<'a> {
        WireOp {
            kv: WireKvOp {
                verb,
                key: self.key.as_str(),
                value: base64::engine::general_purpose::STANDARD.encode(&self.value),
                flags: self.flags,
                session: self.session.as_str(),
                namespace: config.namespace.as_deref(),
                partition: config.partition.as_deref(),
            },
        }
    }
}

impl Endpoint for KvLockTxn {
    /// The entry, or why the lock was refused.
    type Output = LockTxnOutcome;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        let ops = [self.op(config, "lock")];
        // Serializing strings and integers cannot fail.
        let body = serde_json::to_vec(&ops).unwrap_or_default();
        Target::new(Method::PUT, "txn", "").build(config, body)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<LockTxnOutcome, ApiError> {
        decode_outcome("a lock transaction", response)
    }
}

/// `PUT /v1/txn` `[check-session, lock]`: an election's proclaim. Writes `value` to a key the
/// session holds, and only while it holds it.
///
/// Neither a plain `?acquire=` nor a lone `lock` operation will do: by the same session they
/// take the key again if it was lost meanwhile (released by someone, its holder's session gone
/// and the key free), so a leader that lost could proclaim itself back without knowing. A
/// `set` after the `check-session` keeps the session but resets the key's `LockIndex` to 0
/// (seen on Consul 1.8.7), which would read to observers as another hold; a `lock` by the
/// holding session keeps `LockIndex` and `CreateIndex` and writes the value. The check fails
/// the whole transaction, with "failed session check", when the session no longer holds the
/// key ([`LockRefusal::NotHeld`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvProclaimTxn(pub KvLockTxn);

impl Endpoint for KvProclaimTxn {
    /// The entry as written, or why the write was refused.
    type Output = LockTxnOutcome;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        let mut check = self.0.op(config, "check-session");
        check.kv.value = String::new();
        check.kv.flags = 0;
        let ops = [check, self.0.op(config, "lock")];
        let body = serde_json::to_vec(&ops).unwrap_or_default();
        Target::new(Method::PUT, "txn", "").build(config, body)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<LockTxnOutcome, ApiError> {
        decode_outcome("a proclaim transaction", response)
    }
}

/// `PUT /v1/txn` `[delete entry, lock]`: a queued lock's acquire, which takes the lock key and
/// leaves the queue in one write. The delete comes first so that the lock's entry is the last
/// result (Consul answers nothing for a delete); a refused lock rolls the delete back, so a
/// waiter refused keeps its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvDequeueLockTxn {
    /// The lock operation.
    pub lock: KvLockTxn,
    /// The waiter's queue entry, deleted when the lock is granted.
    pub entry: Key,
}

impl Endpoint for KvDequeueLockTxn {
    /// The lock's entry as written, or why the lock was refused.
    type Output = LockTxnOutcome;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        let mut delete = self.lock.op(config, "delete");
        delete.kv.key = self.entry.as_str();
        delete.kv.value = String::new();
        delete.kv.flags = 0;
        delete.kv.session = "";
        let ops = [delete, self.lock.op(config, "lock")];
        let body = serde_json::to_vec(&ops).unwrap_or_default();
        Target::new(Method::PUT, "txn", "").build(config, body)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<LockTxnOutcome, ApiError> {
        decode_outcome("a queued lock transaction", response)
    }
}

/// `PUT /v1/txn` `[lock entry, get-tree key]`: a queued lock's enqueue, which takes the
/// waiter's entry and reads the lock key with its whole line in the same round trip.
///
/// The tree is read inside the transaction, after the lock, so it shows our entry (its
/// `CreateIndex` is our rank), the lock key and every other entry as of the transaction's own
/// Raft index. A write transaction's answer carries no `X-Consul-Index` (seen on Consul
/// 1.8.7); [`Line::index`] gives the index a blocking read may start from instead.
///
/// The tree is everything under `tree` as a prefix (as a recursive list is): keys that only
/// start with the same characters come too, for the caller to leave out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEnqueueTxn {
    /// The entry's lock operation.
    pub lock: KvLockTxn,
    /// The prefix read after it (the lock key).
    pub tree: Key,
}

/// What an enqueue transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// The entry is ours, and the line as it stood right after.
    Lined(Line),
    /// Consul refused the entry's lock (409 Conflict), for this reason; nothing was read.
    Refused(LockRefusal),
}

/// A queue entry as written and the tree read after it, at one index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The entry as written (its value left out, as Consul does).
    pub entry: KvPair,
    /// Every entry under the tree's prefix, values included, in key order.
    pub tree: Vec<KvPair>,
}

impl Line {
    /// The index a blocking read of anything in the tree may start from: the highest
    /// `ModifyIndex` shown. Every change after the transaction has a higher index, so no change
    /// is missed; a fresh entry's `ModifyIndex` is the transaction's own, so this is exact for
    /// a first enqueue. (A lock that changed nothing keeps its `ModifyIndex`, and the
    /// transaction's index is then unknown: a read may answer once early, never late.)
    pub fn index(&self) -> u64 {
        self.tree
            .iter()
            .map(|p| p.modify_index)
            .chain([self.entry.modify_index])
            .max()
            .unwrap_or(0)
    }
}

impl Endpoint for KvEnqueueTxn {
    /// The entry and the tree, or why the entry was refused.
    type Output = EnqueueOutcome;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        let mut read = self.lock.op(config, "get-tree");
        read.kv.key = self.tree.as_str();
        read.kv.value = String::new();
        read.kv.flags = 0;
        read.kv.session = "";
        let ops = [self.lock.op(config, "lock"), read];
        let body = serde_json::to_vec(&ops).unwrap_or_default();
        Target::new(Method::PUT, "txn", "").build(config, body)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<EnqueueOutcome, ApiError> {
        const WHAT: &str = "an enqueue transaction";
        match read_answer(WHAT, response)? {
            Answer::Refused(errors) => {
                let first = errors.into_iter().next().map(|e| e.what).unwrap_or_default();
                Ok(EnqueueOutcome::Refused(refusal(&first)))
            }
            Answer::Done(results) => {
                let mut pairs = results.into_iter().map(|result| {
                    result
                        .kv
                        .ok_or_else(|| malformed(WHAT, "a result without its entry"))?
                        .into_pair(WHAT)
                });
                let entry = pairs
                    .next()
                    .ok_or_else(|| malformed(WHAT, "a success reply without the entry"))??;
                let tree = pairs.collect::<Result<Vec<_>, _>>()?;
                // The tree is read after the lock, so it holds the entry just written.
                if !tree.iter().any(|p| p.key == entry.key) {
                    return Err(malformed(WHAT, "a tree without the entry just written"));
                }
                Ok(EnqueueOutcome::Lined(Line { entry, tree }))
            }
        }
    }
}

/// The most operations Consul takes in one transaction (`maxTxnOps`, checked on Consul 1.8.7:
/// one more answers 413).
pub const MAX_TXN_OPS: usize = 64;

/// What every operation of a [`KvBatchTxn`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchVerb {
    /// `lock`: take the key for the session (as [`KvLockTxn`]).
    Lock,
    /// `unlock`: give the key up, writing the value and flags (as a `?release=`). Refused for a
    /// key the session does not hold.
    Unlock,
}

/// `PUT /v1/txn` with one `lock` (or `unlock`) operation per key, all for one session: a key
/// set's batch. At most [`MAX_TXN_OPS`] keys (the caller splits; more answer 413).
///
/// Consul runs a transaction all or nothing: one refused operation rolls the others back, and
/// the 409 names every refused operation by its index ([`BatchOutcome::Refused`]), so the
/// caller can tell per key what happened and send the rest again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvBatchTxn {
    /// What each operation does.
    pub verb: BatchVerb,
    /// The keys, one operation each, in this order.
    pub keys: Vec<Key>,
    /// The session taking or giving up the keys.
    pub session: SessionId,
    /// The flags every key gets.
    pub flags: u64,
    /// The value every key gets.
    pub value: Vec<u8>,
}

/// What a batch transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every operation went through: the entries as written, in the order of the keys.
    Done(Vec<KvPair>),
    /// Nothing was written: the refused operations, by their index among the keys, each with
    /// why. The others were rolled back, not refused.
    Refused(Vec<(usize, LockRefusal)>),
}

impl Endpoint for KvBatchTxn {
    /// The entries, or the refused operations.
    type Output = BatchOutcome;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        let verb = match self.verb {
            BatchVerb::Lock => "lock",
            BatchVerb::Unlock => "unlock",
        };
        let value = base64::engine::general_purpose::STANDARD.encode(&self.value);
        let ops: Vec<WireOp<'_>> = self
            .keys
            .iter()
            .map(|key| WireOp {
                kv: WireKvOp {
                    verb,
                    key: key.as_str(),
                    value: value.clone(),
                    flags: self.flags,
                    session: self.session.as_str(),
                    namespace: config.namespace.as_deref(),
                    partition: config.partition.as_deref(),
                },
            })
            .collect();
        let body = serde_json::to_vec(&ops).unwrap_or_default();
        Target::new(Method::PUT, "txn", "").build(config, body)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<BatchOutcome, ApiError> {
        const WHAT: &str = "a batch transaction";
        match read_answer(WHAT, response)? {
            Answer::Refused(errors) => errors
                .into_iter()
                .map(|e| {
                    let index = match &e.op_index {
                        serde_json::Value::Null => Some(0),
                        n => n.as_u64().and_then(|n| usize::try_from(n).ok()),
                    };
                    index
                        .map(|i| (i, refusal(&e.what)))
                        .ok_or_else(|| malformed(WHAT, "an error whose OpIndex is not an operation's index"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(BatchOutcome::Refused),
            Answer::Done(results) => results
                .into_iter()
                .map(|result| {
                    result
                        .kv
                        .ok_or_else(|| malformed(WHAT, "a result without its entry"))?
                        .into_pair(WHAT)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(BatchOutcome::Done),
        }
    }
}

/// What a transaction answered: its results (200), or its errors, at least one (409).
enum Answer {
    Done(Vec<WireResult>),
    Refused(Vec<WireError>),
}

fn malformed(what: &'static str, problem: &str) -> ApiError {
    ApiError::Malformed {
        what,
        problem: problem.to_owned(),
    }
}

/// Reads a transaction's answer: any status but 200 and 409 is that status's error.
fn read_answer(what: &'static str, response: &http::Response<Vec<u8>>) -> Result<Answer, ApiError> {
    check_len(what, response)?;
    let status = response.status();
    if status != http::StatusCode::OK && status != http::StatusCode::CONFLICT {
        return Err(status_error(response));
    }
    let wire: WireResponse = json_body(what, response.body())?;
    if status == http::StatusCode::CONFLICT {
        let errors = wire.errors.unwrap_or_default();
        if errors.is_empty() {
            return Err(malformed(what, "a 409 without an error"));
        }
        return Ok(Answer::Refused(errors));
    }
    wire.results
        .map(Answer::Done)
        .ok_or_else(|| malformed(what, "a success reply without results"))
}

/// Decodes the answer to a transaction whose last operation is a `lock`: its entry, or the
/// first refusal.
fn decode_outcome(
    what: &'static str,
    response: &http::Response<Vec<u8>>,
) -> Result<LockTxnOutcome, ApiError> {
    match read_answer(what, response)? {
        // `read_answer` gives at least one error.
        Answer::Refused(errors) => {
            let first = errors.into_iter().next().map(|e| e.what).unwrap_or_default();
            Ok(LockTxnOutcome::Refused(refusal(&first)))
        }
        Answer::Done(results) => {
            let pair = results
                .into_iter()
                .last()
                .and_then(|result| result.kv)
                .ok_or_else(|| malformed(what, "a success reply without the entry"))?
                .into_pair(what)?;
            Ok(LockTxnOutcome::Locked(pair))
        }
    }
}

/// Consul's wording (`state/txn.go` and `txn_endpoint.go`, the same from 0.7 to 1.x): "failed to
/// lock key \"k\", lock is already held", "failed to lock key \"k\" due to lock delay",
/// "invalid session \"id\"", "Permission denied" (ACLs); a `check-session`'s "failed session check
/// for key \"k\", current session \"\" != \"id\"" and "failed to check session, key \"k\" doesn't
/// exist". Anything else is passed on as it came.
fn refusal(what: &str) -> LockRefusal {
    if what.contains("lock is already held") {
        LockRefusal::Held
    } else if what.contains("lock delay") {
        LockRefusal::LockDelay
    } else if what.contains("failed session check")
        || what.contains("failed to check session")
        || what.contains("lock isn't held")
    {
        LockRefusal::NotHeld
    } else if what.contains("invalid session") {
        LockRefusal::InvalidSession
    } else if what.contains("Permission denied") {
        LockRefusal::PermissionDenied
    } else {
        LockRefusal::Other(truncate(what, 200))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> http::Response<Vec<u8>> {
        http::Response::builder()
            .status(status)
            .body(body.as_bytes().to_vec())
            .expect("a response")
    }

    #[test]
    fn encodes_one_lock_operation() {
        let lock = KvLockTxn {
            key: Key::new("a b/.lock").expect("key"),
            session: SessionId::new("s1").expect("session"),
            flags: 7,
            value: b"hi".to_vec(),
        };
        let request = lock.encode(&ClientConfig::http("127.0.0.1:8500").expect("config"));
        assert_eq!(request.method(), Method::PUT);
        let body: serde_json::Value = serde_json::from_slice(request.body()).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!([{"KV": {"Verb": "lock", "Key": "a b/.lock", "Value": "aGk=", "Flags": 7, "Session": "s1"}}])
        );
    }

    #[test]
    fn the_operation_names_the_namespace_and_partition_of_the_config() {
        let lock = KvLockTxn {
            key: Key::new("k").expect("key"),
            session: SessionId::new("s1").expect("session"),
            flags: 0,
            value: Vec::new(),
        };
        let mut config = ClientConfig::http("127.0.0.1:8500").expect("config");
        config.namespace = Some("team-a".to_owned());
        config.partition = Some("part-1".to_owned());
        let request = lock.encode(&config);
        let body: serde_json::Value = serde_json::from_slice(request.body()).expect("JSON");
        assert_eq!(body[0]["KV"]["Namespace"], "team-a");
        assert_eq!(body[0]["KV"]["Partition"], "part-1");
        let query = request.uri().query().expect("query");
        assert!(
            query.contains("ns=team-a") && query.contains("partition=part-1"),
            "{query}"
        );
        // Without them, the fields are left out (open-source Consul).
        let plain = lock.encode(&ClientConfig::http("127.0.0.1:8500").expect("config"));
        let body: serde_json::Value = serde_json::from_slice(plain.body()).expect("JSON");
        assert!(body[0]["KV"].get("Namespace").is_none() && body[0]["KV"].get("Partition").is_none());
    }

    #[test]
    fn decodes_what_consul_1_8_7_answers() {
        // Replies seen from a real 1.8.7 agent.
        let locked = r#"{"Results":[{"KV":{"LockIndex":2,"Key":"t/d","Flags":1,"Value":null,"Session":"7a8191a5-39dc-755c-5bfe-ab3a9fbce8ae","CreateIndex":26,"ModifyIndex":28}}],"Errors":null}"#;
        let LockTxnOutcome::Locked(pair) = KvLockTxn::decode(&reply(200, locked)).expect("decodes") else {
            panic!("not locked")
        };
        assert_eq!((pair.lock_index, pair.modify_index, pair.flags), (2, 28, 1));
        assert_eq!(
            pair.session.expect("session").as_str(),
            "7a8191a5-39dc-755c-5bfe-ab3a9fbce8ae"
        );
        let refused = |what: &str| {
            let body = format!(
                r#"{{"Results":null,"Errors":[{{"OpIndex":0,"What":{}}}]}}"#,
                serde_json::json!(what)
            );
            KvLockTxn::decode(&reply(409, &body)).expect("decodes")
        };
        assert_eq!(
            refused(r#"failed to lock key "t/k", lock is already held"#),
            LockTxnOutcome::Refused(LockRefusal::Held)
        );
        assert_eq!(
            refused(r#"failed to lock key "t/d" due to lock delay"#),
            LockTxnOutcome::Refused(LockRefusal::LockDelay)
        );
        assert_eq!(
            refused(r#"invalid session "ea8eb461-adaf-a5b3-a1f4-b25c6f8e43e2""#),
            LockTxnOutcome::Refused(LockRefusal::InvalidSession)
        );
        assert_eq!(
            refused("Permission denied"),
            LockTxnOutcome::Refused(LockRefusal::PermissionDenied)
        );
        assert_eq!(
            refused("something new"),
            LockTxnOutcome::Refused(LockRefusal::Other("something new".to_owned()))
        );
    }

    #[test]
    fn a_queued_acquire_deletes_the_entry_then_locks() {
        let txn = KvDequeueLockTxn {
            lock: KvLockTxn {
                key: Key::new("k").expect("key"),
                session: SessionId::new("s1").expect("session"),
                flags: 7,
                value: b"hi".to_vec(),
            },
            entry: Key::new("k/.queue/s1").expect("key"),
        };
        let request = txn.encode(&ClientConfig::http("127.0.0.1:8500").expect("config"));
        let body: serde_json::Value = serde_json::from_slice(request.body()).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!([
                {"KV": {"Verb": "delete", "Key": "k/.queue/s1", "Value": "", "Flags": 0, "Session": ""}},
                {"KV": {"Verb": "lock", "Key": "k", "Value": "aGk=", "Flags": 7, "Session": "s1"}}
            ])
        );
        // Seen from a real 1.8.7 agent: no result for the delete; a refusal names the lock (op 1).
        let locked = r#"{"Results":[{"KV":{"LockIndex":1,"Key":"k","Flags":7,"Value":null,"Session":"s1","CreateIndex":19,"ModifyIndex":19}}],"Errors":null}"#;
        let Ok(LockTxnOutcome::Locked(pair)) = KvDequeueLockTxn::decode(&reply(200, locked)) else {
            panic!("not locked")
        };
        assert_eq!((pair.key.as_str(), pair.modify_index), ("k", 19));
        let refused = r#"{"Results":null,"Errors":[{"OpIndex":1,"What":"failed to lock key \"k\", lock is already held"}]}"#;
        assert_eq!(
            KvDequeueLockTxn::decode(&reply(409, refused)).expect("decodes"),
            LockTxnOutcome::Refused(LockRefusal::Held)
        );
    }

    #[test]
    fn an_enqueue_locks_the_entry_then_reads_the_tree() {
        let txn = KvEnqueueTxn {
            lock: KvLockTxn {
                key: Key::new("q/k/.queue/s1").expect("key"),
                session: SessionId::new("s1").expect("session"),
                flags: 7,
                value: b"12".to_vec(),
            },
            tree: Key::new("q/k").expect("key"),
        };
        let request = txn.encode(&ClientConfig::http("127.0.0.1:8500").expect("config"));
        let body: serde_json::Value = serde_json::from_slice(request.body()).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!([
                {"KV": {"Verb": "lock", "Key": "q/k/.queue/s1", "Value": "MTI=", "Flags": 7, "Session": "s1"}},
                {"KV": {"Verb": "get-tree", "Key": "q/k", "Value": "", "Flags": 0, "Session": ""}}
            ])
        );
        // Seen from a real 1.8.7 agent (no X-Consul-Index): the lock's entry, value left out,
        // then the tree as of the transaction, values kept.
        let s = "3843588f-479a-e0f6-7d99-728fde153d25";
        let mine = format!(
            r#"{{"LockIndex":1,"Key":"q/k/.queue/{s}","Flags":7,"Value":null,"Session":"{s}","CreateIndex":15,"ModifyIndex":15}}"#
        );
        let key = r#"{"LockIndex":0,"Key":"q/k","Flags":0,"Value":"eA==","CreateIndex":14,"ModifyIndex":14}"#;
        let answer =
            format!(r#"{{"Results":[{{"KV":{mine}}},{{"KV":{key}}},{{"KV":{mine}}}],"Errors":null}}"#);
        let Ok(EnqueueOutcome::Lined(line)) = KvEnqueueTxn::decode(&reply(200, &answer)) else {
            panic!("not lined")
        };
        assert_eq!(line.entry.create_index, 15);
        assert_eq!(
            line.tree.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
            ["q/k", &format!("q/k/.queue/{s}")]
        );
        assert_eq!(line.tree[0].value, b"x");
        assert_eq!(line.index(), 15, "the transaction's own index");
        // The tree moved past the entry (our entry re-taken unchanged keeps its old index).
        let later = key.replace("\"ModifyIndex\":14", "\"ModifyIndex\":19");
        let answer =
            format!(r#"{{"Results":[{{"KV":{mine}}},{{"KV":{later}}},{{"KV":{mine}}}],"Errors":null}}"#);
        let Ok(EnqueueOutcome::Lined(line)) = KvEnqueueTxn::decode(&reply(200, &answer)) else {
            panic!("not lined")
        };
        assert_eq!(line.index(), 19);
        // Refused: the entry's lock names op 0; nothing is read.
        let refused = r#"{"Results":null,"Errors":[{"OpIndex":0,"What":"Permission denied"}]}"#;
        assert_eq!(
            KvEnqueueTxn::decode(&reply(409, refused)),
            Ok(EnqueueOutcome::Refused(LockRefusal::PermissionDenied))
        );
        // Not Consul's answer: no results, a tree without the entry, a result without its
        // entry, another status.
        for (status, body) in [
            (200, r#"{"Results":[],"Errors":null}"#.to_owned()),
            (
                200,
                format!(r#"{{"Results":[{{"KV":{mine}}},{{"KV":{key}}}],"Errors":null}}"#),
            ),
            (
                200,
                format!(r#"{{"Results":[{{"KV":{mine}}},{{}}],"Errors":null}}"#),
            ),
            (200, "not json".to_owned()),
        ] {
            assert!(
                matches!(
                    KvEnqueueTxn::decode(&reply(status, &body)),
                    Err(ApiError::Malformed { .. })
                ),
                "{body}"
            );
        }
        assert!(matches!(
            KvEnqueueTxn::decode(&reply(500, "rpc error")),
            Err(ApiError::Status { status: 500, .. })
        ));
    }

    #[test]
    fn a_batch_encodes_one_operation_per_key_and_names_refusals_by_index() {
        let batch = KvBatchTxn {
            verb: BatchVerb::Unlock,
            keys: vec![Key::new("j/a").expect("key"), Key::new("j/b").expect("key")],
            session: SessionId::new("s1").expect("session"),
            flags: 7,
            value: b"hi".to_vec(),
        };
        let request = batch.encode(&ClientConfig::http("127.0.0.1:8500").expect("config"));
        let body: serde_json::Value = serde_json::from_slice(request.body()).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!([
                {"KV": {"Verb": "unlock", "Key": "j/a", "Value": "aGk=", "Flags": 7, "Session": "s1"}},
                {"KV": {"Verb": "unlock", "Key": "j/b", "Value": "aGk=", "Flags": 7, "Session": "s1"}}
            ])
        );
        let refused = r#"{"Results":null,"Errors":[{"OpIndex":1,"What":"failed to lock key \"j/b\", lock is already held"},{"OpIndex":3,"What":"failed to unlock key \"j/d\", lock isn't held, or is held by another session"}]}"#;
        assert_eq!(
            KvBatchTxn::decode(&reply(409, refused)).expect("decodes"),
            BatchOutcome::Refused(vec![(1, LockRefusal::Held), (3, LockRefusal::NotHeld)])
        );
        let done = r#"{"Results":[{"KV":{"LockIndex":1,"Key":"j/a","Flags":7,"Value":null,"Session":"s1","CreateIndex":5,"ModifyIndex":5}},{"KV":{"LockIndex":1,"Key":"j/b","Flags":7,"Value":null,"Session":"s1","CreateIndex":5,"ModifyIndex":5}}],"Errors":null}"#;
        let BatchOutcome::Done(pairs) = KvBatchTxn::decode(&reply(200, done)).expect("decodes") else {
            panic!("not done")
        };
        assert_eq!(
            pairs.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
            ["j/a", "j/b"]
        );
        assert!(matches!(
            KvBatchTxn::decode(&reply(409, r#"{"Errors":[]}"#)),
            Err(ApiError::Malformed { .. })
        ));
    }

    #[test]
    fn other_statuses_and_shapes_are_errors() {
        assert!(matches!(
            KvLockTxn::decode(&reply(403, "Permission denied")),
            Err(ApiError::Status { status: 403, .. })
        ));
        assert!(matches!(
            KvLockTxn::decode(&reply(200, "{}")),
            Err(ApiError::Malformed { .. })
        ));
        assert!(matches!(
            KvLockTxn::decode(&reply(409, "{}")),
            Err(ApiError::Malformed { .. })
        ));
        assert!(matches!(
            KvLockTxn::decode(&reply(200, "not json")),
            Err(ApiError::Malformed { .. })
        ));
    }

    /// A garbled `OpIndex` (found by the fuzzer: a float beside a 200's results) does not spoil
    /// a lock transaction's answer, which never reads it; a batch's refusal that names no
    /// operation's index is malformed; a missing one is the first operation.
    #[test]
    fn an_op_index_counts_only_where_it_is_read() {
        let entry = r#"{"LockIndex":1,"Key":"k","Flags":0,"Value":null,"Session":"s1","CreateIndex":5,"ModifyIndex":5}"#;
        let granted = format!(r#"{{"Results":[{{"KV":{entry}}}],"Errors":[{{"OpIndex":1.5,"What":"x"}}]}}"#);
        assert!(matches!(
            KvLockTxn::decode(&reply(200, &granted)),
            Ok(LockTxnOutcome::Locked(_))
        ));
        for op_index in ["1.5", "-1", "\"0\""] {
            let refused = format!(r#"{{"Errors":[{{"OpIndex":{op_index},"What":"lock is already held"}}]}}"#);
            assert!(
                matches!(
                    KvBatchTxn::decode(&reply(409, &refused)),
                    Err(ApiError::Malformed { .. })
                ),
                "OpIndex {op_index}"
            );
        }
        assert_eq!(
            KvBatchTxn::decode(&reply(
                409,
                r#"{"Errors":[{"What":"failed to lock key \"k\", lock is already held"}]}"#
            )),
            Ok(BatchOutcome::Refused(vec![(0, LockRefusal::Held)]))
        );
    }
}
