//! Behaviour of `SimConsul`, the simulated Consul, in virtual time: KV semantics and indexes,
//! sessions, TTL expiry, lock-delay, blocking reads, faults, errors, determinism, robustness,
//! and the core's own requests and lock machine run against it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use consul_lock_core::api::{
    ClientConfig, Endpoint, EnqueueOutcome, Key, KvAcquire, KvCasDelete, KvCasPut, KvDelete, KvEnqueueTxn,
    KvGet, KvList, KvLockTxn, KvRelease, LockRefusal, LockTxnOutcome, SessionCreate, SessionDestroy,
    SessionId, SessionInfo, SessionRenew,
};
use consul_lock_core::machine::{
    Action, LOCK_FLAG_VALUE, LockEvent, LockMachine, LockOptions, LossReason, RequestId, TransportError,
    TransportErrorKind,
};
use consul_lock_testkit::sim::{QueryId, SimConfig, SimConsul, SimReply, TtlExpiry};
use proptest::prelude::*;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A simulator with a clock of its own.
struct Sim {
    consul: SimConsul,
    start: Instant,
    now: Instant,
}

type Response = http::Response<Vec<u8>>;

fn request(method: &str, uri: &str, body: &[u8]) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:8500{uri}"))
        .body(body.to_vec())
        .unwrap()
}

impl Sim {
    fn new(seed: u64) -> Sim {
        Sim::with_config(seed, SimConfig::default())
    }

    fn with_config(seed: u64, config: SimConfig) -> Sim {
        let start = Instant::now();
        Sim {
            consul: SimConsul::with_config(seed, start, config),
            start,
            now: start,
        }
    }

    /// Virtual seconds since the start.
    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn sleep(&mut self, d: Duration) -> Vec<(QueryId, Response)> {
        self.now += d;
        self.consul.advance(self.now)
    }

    fn send(&mut self, method: &str, uri: &str, body: &[u8]) -> SimReply {
        self.consul.handle(self.now, &request(method, uri, body))
    }

    /// A request that must be answered at once.
    fn call(&mut self, method: &str, uri: &str, body: &[u8]) -> Response {
        match self.send(method, uri, body) {
            SimReply::Now(r) => r,
            SimReply::Parked(q) => panic!("{method} {uri} parked as {q:?}"),
        }
    }

    fn get(&mut self, uri: &str) -> Response {
        self.call("GET", uri, b"")
    }

    fn put(&mut self, uri: &str, body: &[u8]) -> Response {
        self.call("PUT", uri, body)
    }

    fn park(&mut self, uri: &str) -> QueryId {
        match self.send("GET", uri, b"") {
            SimReply::Parked(q) => q,
            SimReply::Now(r) => panic!("GET {uri} answered at once: {} {}", r.status(), text(&r)),
        }
    }

    /// Creates a session from a JSON body; its ID.
    fn session(&mut self, body: &str) -> String {
        let r = self.put("/v1/session/create", body.as_bytes());
        assert_eq!(r.status(), 200, "{}", text(&r));
        json_of(&r)["ID"].as_str().unwrap().to_owned()
    }

    /// A single-key read's entry (`None` for 404).
    fn entry(&mut self, key: &str) -> Option<Value> {
        let r = self.get(&format!("/v1/kv/{key}"));
        match r.status().as_u16() {
            404 => None,
            200 => Some(json_of(&r)[0].clone()),
            other => panic!("read {key}: {other} {}", text(&r)),
        }
    }
}

fn text(r: &Response) -> String {
    String::from_utf8_lossy(r.body()).into_owned()
}

fn json_of(r: &Response) -> Value {
    serde_json::from_slice(r.body()).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(r)))
}

fn header<'r>(r: &'r Response, name: &str) -> Option<&'r str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

fn index(r: &Response) -> u64 {
    header(r, "X-Consul-Index").unwrap().parse().unwrap()
}

fn is_true(r: &Response) -> bool {
    assert_eq!(r.status(), 200, "{}", text(r));
    match text(r).as_str() {
        "true" => true,
        "false" => false,
        other => panic!("not a bool: {other}"),
    }
}

#[test]
fn kv_put_and_read_back_in_consuls_format() {
    let mut sim = Sim::new(1);
    let missing = sim.get("/v1/kv/a");
    assert_eq!(missing.status(), 404);
    assert!(missing.body().is_empty());
    assert_eq!(
        header(&missing, "X-Consul-Index"),
        Some("1"),
        "an empty table answers 1, never 0"
    );
    assert_eq!(header(&missing, "X-Consul-KnownLeader"), Some("true"));
    assert_eq!(header(&missing, "X-Consul-LastContact"), Some("0"));

    assert!(is_true(&sim.put("/v1/kv/a?flags=42", b"hello")));
    let r = sim.get("/v1/kv/a");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "Content-Type"), Some("application/json"));
    assert_eq!(
        text(&r),
        r#"[{"LockIndex":0,"Key":"a","Flags":42,"Value":"aGVsbG8=","CreateIndex":11,"ModifyIndex":11}]"#
    );
    assert_eq!(index(&r), 11, "a key's index is its ModifyIndex");
    let entry = sim.consul.kv("a").unwrap();
    assert_eq!((entry.flags, entry.value.as_slice()), (42, &b"hello"[..]));

    // An empty value is null; a key path is percent-decoded.
    assert!(is_true(&sim.put("/v1/kv/sp%20ace%2Fx", b"")));
    let e = sim.entry("sp%20ace/x").unwrap();
    assert_eq!(e["Key"], "sp ace/x");
    assert_eq!(e["Value"], Value::Null);
    assert!(sim.consul.kv("sp ace/x").is_some());

    // ?raw gives the bare value.
    let raw = sim.get("/v1/kv/a?raw");
    assert_eq!(raw.body(), b"hello");
    assert_eq!(header(&raw, "Content-Type"), Some("text/plain"));

    // ?pretty and the dev-mode setting indent like Go's MarshalIndent.
    let pretty = sim.get("/v1/kv/a?pretty");
    assert!(text(&pretty).starts_with("[\n    {\n        \"LockIndex\": 0,\n"));
    assert!(text(&pretty).ends_with("}\n]\n"));
}

#[test]
fn indexes_move_like_consuls() {
    let mut sim = Sim::new(2);
    assert_eq!(sim.consul.index(), 10);
    assert!(is_true(&sim.put("/v1/kv/k", b"1")));
    assert_eq!(sim.entry("k").unwrap()["ModifyIndex"], 11);
    // A missing key reports the KV table's index.
    assert_eq!(index(&sim.get("/v1/kv/other")), 11);

    // A failed CAS goes through Raft: it takes an index but changes no table.
    assert!(!is_true(&sim.put("/v1/kv/k?cas=1", b"x")));
    assert_eq!(sim.consul.index(), 12);
    assert_eq!(index(&sim.get("/v1/kv/other")), 11);
    assert!(is_true(&sim.put("/v1/kv/k", b"2")));
    assert_eq!(sim.entry("k").unwrap()["ModifyIndex"], 13);

    // Writing the same thing again takes an index but keeps the ModifyIndex.
    assert!(is_true(&sim.put("/v1/kv/k", b"2")));
    assert_eq!(sim.consul.index(), 14);
    assert_eq!(sim.entry("k").unwrap()["ModifyIndex"], 13);
    assert_eq!(index(&sim.get("/v1/kv/other")), 13);

    // A delete leaves a tombstone: the table index is the delete's, and so is the prefix's.
    assert!(is_true(&sim.put("/v1/kv/p/a", b"1"))); // 15
    assert!(is_true(&sim.put("/v1/kv/p/b", b"1"))); // 16
    assert!(is_true(&sim.call("DELETE", "/v1/kv/p/b", b""))); // 17
    assert_eq!(index(&sim.get("/v1/kv/p/b")), 17);
    let list = sim.get("/v1/kv/p/?recurse");
    assert_eq!(json_of(&list).as_array().unwrap().len(), 1);
    assert_eq!(
        index(&list),
        17,
        "the tombstone keeps the prefix's index from going back"
    );
    // A prefix with neither keys nor tombstones reports the table's index.
    assert_eq!(index(&sim.get("/v1/kv/zzz?recurse")), 17);
    // Deleting a missing key takes an index, changes nothing.
    assert!(is_true(&sim.call("DELETE", "/v1/kv/nothing", b"")));
    assert_eq!(sim.consul.index(), 18);
    assert_eq!(index(&sim.get("/v1/kv/nothing")), 17);
}

#[test]
fn acquire_release_and_lock_index() {
    let mut sim = Sim::new(3);
    let s1 = sim.session(r#"{"Name":"one","TTL":"30s"}"#);
    let s2 = sim.session(r#"{"Name":"two","TTL":"30s"}"#);

    assert!(is_true(
        &sim.put(&format!("/v1/kv/l?acquire={s1}&flags=7"), b"v1")
    ));
    let e = sim.entry("l").unwrap();
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Session"].as_str()),
        (Some(1), Some(s1.as_str()))
    );
    assert_eq!(e["Flags"], 7);

    // Contention: refused, nothing written.
    assert!(!is_true(&sim.put(&format!("/v1/kv/l?acquire={s2}"), b"v2")));
    assert_eq!(sim.entry("l").unwrap()["Value"], "djE=");

    // Re-acquire by the holder: value and flags written, LockIndex kept.
    assert!(is_true(&sim.put(&format!("/v1/kv/l?acquire={s1}"), b"v3")));
    let e = sim.entry("l").unwrap();
    assert_eq!((e["LockIndex"].as_u64(), e["Flags"].as_u64()), (Some(1), Some(0)));

    // Release by another session, or of a missing key: false.
    assert!(!is_true(&sim.put(&format!("/v1/kv/l?release={s2}"), b"")));
    assert!(!is_true(&sim.put(&format!("/v1/kv/none?release={s1}"), b"")));
    // Release by the holder writes the value and flags.
    assert!(is_true(
        &sim.put(&format!("/v1/kv/l?release={s1}&flags=9"), b"v5")
    ));
    let e = sim.entry("l").unwrap();
    assert_eq!(e.get("Session"), None, "no Session field once released");
    assert_eq!(
        (e["Flags"].as_u64(), e["Value"].as_str()),
        (Some(9), Some("djU="))
    );
    assert!(!is_true(&sim.put(&format!("/v1/kv/l?release={s1}"), b"")));

    // A new session: LockIndex + 1, and no lock-delay after an explicit release.
    assert!(is_true(&sim.put(&format!("/v1/kv/l?acquire={s2}"), b"")));
    assert_eq!(sim.entry("l").unwrap()["LockIndex"], 2);

    // A plain PUT keeps the holder but resets LockIndex to 0 (as Consul 1.8 does).
    assert!(is_true(&sim.put("/v1/kv/l", b"plain")));
    let e = sim.entry("l").unwrap();
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Session"].as_str()),
        (Some(0), Some(s2.as_str()))
    );
    let entry = sim.consul.kv("l").unwrap();
    assert_eq!(entry.session.as_deref(), Some(s2.as_str()));

    // Bad sessions.
    let r = sim.put("/v1/kv/l2?acquire=11111111-2222-3333-4444-555555555555", b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (
            500,
            r#"invalid session "11111111-2222-3333-4444-555555555555""#.to_owned()
        )
    );
    let r = sim.put("/v1/kv/l2?acquire=garbage", b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (
            500,
            "failed session lookup: index error: UUID must be 36 characters".to_owned()
        )
    );
    let r = sim.put("/v1/kv/l2?acquire=", b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (500, "missing session".to_owned())
    );
    let r = sim.put("/v1/kv/l2?release=", b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (500, "missing session".to_owned())
    );
    let r = sim.put(&format!("/v1/kv/l2?acquire={s1}&release={s1}"), b"");
    assert_eq!(r.status(), 400);
    assert_eq!(text(&r), format!("Conflicting flags: acquire={s1}&release={s1}"));

    // An upper-case spelling of the ID names the same session, but is stored as written.
    let upper = s1.to_uppercase();
    assert!(is_true(&sim.put(&format!("/v1/kv/u?acquire={upper}"), b"")));
    assert!(!is_true(&sim.put(&format!("/v1/kv/u?release={s1}"), b"")));
    assert!(sim.consul.destroy_session(sim.now, &upper));
    assert_eq!(sim.entry("u").unwrap().get("Session"), None);
}

/// A `PUT /v1/txn` body of one KV operation.
fn txn_op(verb: &str, key: &str, session: &str, flags: u64, value: &str) -> String {
    format!(
        r#"{{"KV":{{"Verb":"{verb}","Key":"{key}","Value":"{value}","Flags":{flags},"Session":"{session}"}}}}"#
    )
}

impl Sim {
    /// `PUT /v1/txn` with these operations: the status and the JSON reply.
    fn txn(&mut self, ops: &[String]) -> (u16, Value) {
        let r = self.put("/v1/txn", format!("[{}]", ops.join(",")).as_bytes());
        (r.status().as_u16(), json_of(&r))
    }

    /// The `What` of each error of a refused transaction.
    fn txn_refused(&mut self, ops: &[String]) -> Vec<(u64, String)> {
        let (status, body) = self.txn(ops);
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["Results"], Value::Null);
        body["Errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["OpIndex"].as_u64().unwrap(),
                    e["What"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

#[test]
fn txn_lock_is_an_acquire_that_answers_the_entry() {
    let mut sim = Sim::new(30);
    let s1 = sim.session(r#"{"LockDelay":"2s"}"#);
    let s2 = sim.session("{}");

    // A missing key: created, the entry answered with its value blanked; no index header.
    let r = sim.put(
        "/v1/txn",
        format!("[{}]", txn_op("lock", "l", &s1, 7, "aGk=")).as_bytes(),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "X-Consul-Index"), None);
    assert_eq!(header(&r, "Content-Type"), Some("application/json"));
    let at = sim.consul.index();
    assert_eq!(
        json_of(&r),
        json!({"Results": [{"KV": {"LockIndex": 1, "Key": "l", "Flags": 7, "Value": null,
            "Session": s1, "CreateIndex": at, "ModifyIndex": at}}], "Errors": null})
    );
    let e = sim.entry("l").unwrap();
    assert_eq!(
        (e["Value"].as_str(), e["Flags"].as_u64()),
        (Some("aGk="), Some(7))
    );

    // Re-lock by the holder, unchanged: a Raft index taken, the entry not re-indexed.
    let (status, body) = sim.txn(&[txn_op("lock", "l", &s1, 7, "aGk=")]);
    assert_eq!(
        (status, &body["Results"][0]["KV"]["ModifyIndex"]),
        (200, &json!(at))
    );
    assert_eq!(sim.consul.index(), at + 1);
    // With another value and flags: written, LockIndex kept.
    let (_, body) = sim.txn(&[txn_op("lock", "l", &s1, 8, "Ynll")]);
    assert_eq!(body["Results"][0]["KV"]["ModifyIndex"], at + 2);
    assert_eq!(body["Results"][0]["KV"]["LockIndex"], 1);
    assert_eq!(sim.consul.kv("l").unwrap().value, b"bye");

    // Held by another: refused through Raft (an index taken), nothing written.
    let before = sim.consul.kv("l").cloned();
    assert_eq!(
        sim.txn_refused(&[txn_op("lock", "l", &s2, 0, "")]),
        [(0, r#"failed to lock key "l", lock is already held"#.to_owned())]
    );
    assert_eq!(sim.consul.index(), at + 3);
    assert_eq!(sim.consul.kv("l").cloned(), before);
    // Bad sessions, in the KV endpoint's words.
    for (session, what) in [
        (
            "11111111-2222-3333-4444-555555555555",
            r#"invalid session "11111111-2222-3333-4444-555555555555""#,
        ),
        (
            "garbage",
            "failed session lookup: index error: UUID must be 36 characters",
        ),
        ("", "missing session"),
    ] {
        assert_eq!(
            sim.txn_refused(&[txn_op("lock", "free", session, 0, "")]),
            [(0, what.to_owned())]
        );
    }
    assert!(sim.consul.kv("free").is_none());

    // Lock-delay after the holder's session is destroyed: checked before Raft and before the
    // session, so it takes no index.
    assert!(sim.consul.destroy_session(sim.now, &s1));
    let index = sim.consul.index();
    for session in [s2.as_str(), "garbage", ""] {
        assert_eq!(
            sim.txn_refused(&[txn_op("lock", "l", session, 0, "")]),
            [(0, r#"failed to lock key "l" due to lock delay"#.to_owned())]
        );
    }
    assert_eq!(sim.consul.index(), index);
    sim.sleep(2 * SECOND);
    let (status, body) = sim.txn(&[txn_op("lock", "l", &s2, 0, "")]);
    assert_eq!((status, &body["Results"][0]["KV"]["LockIndex"]), (200, &json!(2)));

    // Unlock in a transaction: the KV endpoint's release.
    assert_eq!(
        sim.txn_refused(&[txn_op("unlock", "l", &s1, 0, "")]),
        [(
            0,
            r#"failed to unlock key "l", lock isn't held, or is held by another session"#.to_owned()
        )]
    );
    let (status, body) = sim.txn(&[txn_op("unlock", "l", &s2, 3, "eA==")]);
    assert_eq!(status, 200);
    assert_eq!(body["Results"][0]["KV"].get("Session"), None);
    assert_eq!(sim.consul.kv("l").unwrap().value, b"x");
}

/// A proclaim (`check-session` then `lock` by the same session), as Consul 1.8.7 answers it:
/// the holder's write keeps LockIndex and the session; anyone else's, or one on a free or
/// missing key, is refused by the check and writes nothing.
#[test]
fn txn_check_session_guards_a_write_as_consuls() {
    let mut sim = Sim::new(31);
    let s1 = sim.session("{}");
    let s2 = sim.session("{}");
    let proclaim = |s: &str, value: &str| {
        [
            txn_op("check-session", "p", s, 0, ""),
            txn_op("lock", "p", s, 7, value),
        ]
    };
    assert_eq!(
        sim.txn_refused(&proclaim(&s1, "aGk=")),
        vec![(0, r#"failed to check session, key "p" doesn't exist"#.to_owned())]
    );
    assert_eq!(sim.entry("p"), None, "a refused check writes nothing");
    let (status, _) = sim.txn(&[txn_op("lock", "p", &s1, 7, "aGk=")]);
    assert_eq!(status, 200);
    let (status, body) = sim.txn(&proclaim(&s1, "aG8="));
    assert_eq!(status, 200, "{body}");
    let entry = sim.entry("p").unwrap();
    assert_eq!(
        (entry["LockIndex"].as_u64(), entry["Value"].as_str()),
        (Some(1), Some("aG8="))
    );
    assert_eq!(entry["Session"].as_str(), Some(s1.as_str()));
    assert_eq!(body["Results"][1]["KV"]["LockIndex"], 1);
    assert_eq!(
        sim.txn_refused(&proclaim(&s2, "eA==")),
        vec![
            (
                0,
                format!(r#"failed session check for key "p", current session "{s1}" != "{s2}""#)
            ),
            // Consul goes on through the operations and reports every failure.
            (1, r#"failed to lock key "p", lock is already held"#.to_owned()),
        ]
    );
    assert!(is_true(&sim.put(&format!("/v1/kv/p?release={s1}"), b"")));
    assert_eq!(
        sim.txn_refused(&proclaim(&s1, "eA==")),
        vec![(
            0,
            format!(r#"failed session check for key "p", current session "" != "{s1}""#)
        )]
    );
    assert_eq!(
        sim.entry("p").unwrap()["Session"],
        Value::Null,
        "the check kept the key free"
    );
}

#[test]
fn txn_is_all_or_nothing_and_wakes_watchers() {
    let mut sim = Sim::new(31);
    let s1 = sim.session(r#"{"LockDelay":"0s"}"#);
    let s2 = sim.session(r#"{"LockDelay":"0s"}"#);
    assert!(is_true(&sim.put("/v1/kv/gone", b"")));
    assert!(is_true(&sim.call("DELETE", "/v1/kv/gone", b"")));
    assert!(is_true(&sim.put(&format!("/v1/kv/held?acquire={s2}"), b"")));
    let table = index(&sim.get("/v1/kv/missing"));

    // The second operation fails: the first (re-creating a deleted key) is undone, tombstone
    // and table index included. Every error is reported.
    let index_before = sim.consul.index();
    assert_eq!(
        sim.txn_refused(&[
            txn_op("lock", "gone", &s1, 0, ""),
            txn_op("lock", "held", &s1, 0, ""),
            txn_op("bogus", "x", &s1, 0, ""),
        ]),
        [
            (1, r#"failed to lock key "held", lock is already held"#.to_owned()),
            (2, r#"unknown KV verb "bogus""#.to_owned()),
        ]
    );
    assert_eq!(sim.consul.index(), index_before + 1);
    assert!(sim.consul.kv("gone").is_none());
    assert_eq!(index(&sim.get("/v1/kv/gone")), table);
    assert_eq!(index(&sim.get("/v1/kv/?recurse")), table);

    // Pre-checks run for every operation, before Raft.
    assert_eq!(
        sim.txn_refused(&[txn_op("lock", "", &s1, 0, ""), txn_op("unlock", "", &s1, 0, "")]),
        [
            (0, "Must provide key".to_owned()),
            (1, "Must provide key".to_owned())
        ]
    );
    assert_eq!(sim.consul.index(), index_before + 1);

    // A blocking read on a missing key is woken by a lock creating it, not by a refused one.
    let q = sim.park(&format!("/v1/kv/new?index={table}&wait=1m"));
    sim.txn_refused(&[txn_op("lock", "new", "garbage", 0, "")]);
    assert!(sim.consul.advance(sim.now).is_empty());
    let (status, body) = sim.txn(&[
        txn_op("lock", "new", &s1, 0, ""),
        txn_op("lock", "gone", &s1, 0, ""),
    ]);
    assert_eq!(status, 200);
    assert_eq!(body["Results"].as_array().unwrap().len(), 2);
    let woken = sim.consul.advance(sim.now);
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].0, q);
    assert_eq!(json_of(&woken[0].1)[0]["Session"], s1.as_str());
}

/// `delete` then `lock` (a queued lock's acquire), as a 1.8.7 agent answered it: the delete
/// answers no result; a refused lock undoes the delete.
#[test]
fn txn_delete_answers_nothing_and_is_undone_with_the_transaction() {
    let mut sim = Sim::new(32);
    let s1 = sim.session(r#"{"LockDelay":"0s"}"#);
    let s2 = sim.session(r#"{"LockDelay":"0s"}"#);
    assert!(is_true(
        &sim.put(&format!("/v1/kv/k/.queue/{s1}?acquire={s1}"), b"")
    ));
    assert!(is_true(
        &sim.put(&format!("/v1/kv/k/.queue/{s2}?acquire={s2}"), b"")
    ));
    let entry = |s: &str| format!("k/.queue/{s}");
    let (status, body) = sim.txn(&[
        txn_op("delete", &entry(&s1), "", 0, ""),
        txn_op("lock", "k", &s1, 7, ""),
    ]);
    assert_eq!(status, 200, "{body}");
    let results = body["Results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{body}");
    assert_eq!(results[0]["KV"]["Key"], "k");
    assert!(sim.consul.kv(&entry(&s1)).is_none());
    // Refused: the entry stays.
    assert_eq!(
        sim.txn_refused(&[
            txn_op("delete", &entry(&s2), "", 0, ""),
            txn_op("lock", "k", &s2, 7, "")
        ]),
        [(1, r#"failed to lock key "k", lock is already held"#.to_owned())]
    );
    assert!(sim.consul.kv(&entry(&s2)).is_some());
    // Deleting a key that is not there is no error.
    let (status, _) = sim.txn(&[txn_op("delete", "nothing", "", 0, "")]);
    assert_eq!(status, 200);
}

#[test]
fn txn_reads_errors_and_faults() {
    let mut sim = Sim::new(32);
    // No write: a read, with the read's metadata.
    for body in ["[]", "null", "[{}]", r#"[{"KV":null}]"#] {
        let r = sim.put("/v1/txn", body.as_bytes());
        assert_eq!(r.status(), 200, "{body}");
        assert_eq!(header(&r, "X-Consul-KnownLeader"), Some("true"));
        assert_eq!(
            json_of(&r),
            json!({"Results": [], "Errors": null, "Index": 0, "LastContact": 0,
                "KnownLeader": true, "ConsistencyLevel": ""})
        );
    }
    let r = sim.put("/v1/txn", br#"[{"KV":{"Verb":"bogus","Key":"k"}}]"#);
    assert_eq!(r.status(), 409);
    assert_eq!(json_of(&r)["Errors"][0]["What"], r#"unknown KV verb "bogus""#);

    let plain = |r: &Response| (r.status().as_u16(), text(r));
    let s = sim.session("{}");
    for (body, status, what) in [
        ("", 400, "Failed to parse body: EOF".to_owned()),
        ("{}", 400, "Failed to parse body: json: cannot unmarshal object into Go value of type api.TxnOps".to_owned()),
        (
            r#"[{"KV":{"Verb":"lock","Key":"k","Value":"aGk=x"}}]"#,
            400,
            "Failed to parse body: illegal base64 data at input byte 4".to_owned(),
        ),
        (
            r#"[{"KV":{"Verb":"lock","Key":"k","Flags":-1}}]"#,
            400,
            "Failed to parse body: json: cannot unmarshal number -1 into Go struct field KVTxnOp.KV.Flags of type uint64"
                .to_owned(),
        ),
        (
            &format!("[{}]", vec![txn_op("lock", "k", &s, 0, ""); 65].join(",")),
            413,
            "Transaction contains too many operations (65 > 64)".to_owned(),
        ),
        (
            &format!("[{}]", txn_op("set", "k", "", 0, "")),
            500,
            r#"SimConsul does not model the KV verb "set" in transactions (only lock, unlock, check-session, delete and get-tree)"#
                .to_owned(),
        ),
        (
            r#"[{"KV":{"Verb":"get-tree","Key":"k"}}]"#,
            500,
            "SimConsul models get-tree only in a transaction that writes".to_owned(),
        ),
        (r#"[{"Node":{}}]"#, 500, "SimConsul does not model Node operations in transactions".to_owned()),
    ] {
        assert_eq!(plain(&sim.put("/v1/txn", body.as_bytes())), (status, what), "{body}");
    }
    // A null operation: Consul's handler panics and drops the connection.
    let r = sim.put("/v1/txn", b"[null]");
    assert_eq!(
        (r.status().as_u16(), header(&r, "Connection")),
        (500, Some("close"))
    );
    let big = vec![b' '; 512 * 1024 + 1];
    let r = sim.put("/v1/txn", &big);
    assert_eq!(
        (r.status().as_u16(), header(&r, "Connection")),
        (413, Some("close"))
    );

    // Without a leader: a write is refused, a stale read is served.
    sim.consul.set_leader(sim.now, false);
    sim.sleep(3 * SECOND);
    let lock = format!("[{}]", txn_op("lock", "k", &s, 0, ""));
    assert_eq!(
        plain(&sim.put("/v1/txn?stale", lock.as_bytes())),
        (500, "No cluster leader".to_owned())
    );
    assert_eq!(
        plain(&sim.put("/v1/txn", b"[]")),
        (500, "No cluster leader".to_owned())
    );
    let r = sim.put("/v1/txn?stale", b"[]");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "X-Consul-KnownLeader"), Some("false"));
    assert_eq!(header(&r, "X-Consul-LastContact"), Some("3000"));
    assert_eq!(json_of(&r)["KnownLeader"], false);
    assert_eq!(json_of(&r)["LastContact"], 3_000_000_000_u64);
}

#[test]
fn cas_writes_and_deletes() {
    let mut sim = Sim::new(4);
    assert!(is_true(&sim.put("/v1/kv/c?cas=0", b"a")));
    assert!(!is_true(&sim.put("/v1/kv/c?cas=0", b"b")), "cas=0 only creates");
    let mi = sim.entry("c").unwrap()["ModifyIndex"].as_u64().unwrap();
    assert!(!is_true(&sim.put(&format!("/v1/kv/c?cas={}", mi - 1), b"b")));
    assert!(!is_true(&sim.put("/v1/kv/missing?cas=5", b"b")));
    assert!(is_true(&sim.put(&format!("/v1/kv/c?cas={mi}&flags=3"), b"b")));
    let e = sim.entry("c").unwrap();
    assert_eq!(
        (e["Value"].as_str(), e["Flags"].as_u64()),
        (Some("Yg=="), Some(3))
    );
    let mi = e["ModifyIndex"].as_u64().unwrap();

    assert!(!is_true(&sim.call("DELETE", "/v1/kv/c?cas=1", b"")));
    assert!(!is_true(&sim.call("DELETE", "/v1/kv/c?cas=0", b"")));
    assert!(is_true(&sim.call("DELETE", &format!("/v1/kv/c?cas={mi}"), b"")));
    assert!(sim.entry("c").is_none());
    assert!(
        is_true(&sim.call("DELETE", "/v1/kv/c?cas=12345", b"")),
        "a missing key: true"
    );

    let r = sim.put("/v1/kv/c?cas=x", b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (
            500,
            r#"strconv.ParseUint: parsing "x": invalid syntax"#.to_owned()
        )
    );
    let r = sim.call("DELETE", "/v1/kv/c?cas=1&recurse", b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (400, "Conflicting flags: cas=1&recurse=".to_owned())
    );

    // Recursive delete.
    for k in ["t/a", "t/b/c", "tt"] {
        assert!(is_true(&sim.put(&format!("/v1/kv/{k}"), b"x")));
    }
    assert!(is_true(&sim.call("DELETE", "/v1/kv/t/?recurse", b"")));
    assert!(sim.consul.kv("t/a").is_none() && sim.consul.kv("t/b/c").is_none());
    assert!(sim.consul.kv("tt").is_some());
}

#[test]
fn lists_and_keys() {
    let mut sim = Sim::new(5);
    for k in ["r/a", "r/b/c", "r/b/d", "rr"] {
        assert!(is_true(&sim.put(&format!("/v1/kv/{k}"), k.as_bytes())));
    }
    let keys = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e.get("Key").unwrap_or(e).as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        keys(json_of(&sim.get("/v1/kv/r?recurse"))),
        ["r/a", "r/b/c", "r/b/d", "rr"]
    );
    assert_eq!(
        keys(json_of(&sim.get("/v1/kv/r/?recurse"))),
        ["r/a", "r/b/c", "r/b/d"]
    );
    assert_eq!(
        keys(json_of(&sim.get("/v1/kv/r/?keys"))),
        ["r/a", "r/b/c", "r/b/d"]
    );
    assert_eq!(keys(json_of(&sim.get("/v1/kv/r?keys&separator=/"))), ["r/", "rr"]);
    assert_eq!(
        keys(json_of(&sim.get("/v1/kv/r/?keys&separator=/"))),
        ["r/a", "r/b/"]
    );
    assert_eq!(keys(json_of(&sim.get("/v1/kv/?recurse"))).len(), 4);
    assert_eq!(sim.get("/v1/kv/none/?recurse").status(), 404);
    assert_eq!(sim.get("/v1/kv/none/?keys").status(), 404);
    // `recurse` counts by presence, whatever its value.
    assert_eq!(keys(json_of(&sim.get("/v1/kv/r/a?recurse=false"))), ["r/a"]);
}

#[test]
fn sessions_create_renew_destroy_info_list() {
    let mut sim = Sim::new(6);
    let id = sim.session(r#"{"Name":"web","TTL":"15s","LockDelay":"1s","Behavior":"delete"}"#);
    assert_eq!(id.len(), 36);
    let info = sim.get(&format!("/v1/session/info/{id}"));
    assert_eq!(index(&info), 11);
    assert_eq!(
        text(&info),
        format!(
            r#"[{{"ID":"{id}","Name":"web","Node":"sim-node","LockDelay":1000000000,"Behavior":"delete","TTL":"15s","NodeChecks":["serfHealth"],"ServiceChecks":null,"CreateIndex":11,"ModifyIndex":11}}]"#
        )
    );
    // Renew answers the entry, without metadata headers.
    let renew = sim.put(&format!("/v1/session/renew/{id}"), b"");
    assert_eq!(json_of(&renew), json_of(&info));
    assert_eq!(header(&renew, "X-Consul-Index"), None);

    // Defaults, and Consul's decoding quirks.
    let d = sim.session("");
    let e = &json_of(&sim.get(&format!("/v1/session/info/{d}")))[0];
    assert_eq!(
        (e["LockDelay"].as_i64(), e["Behavior"].as_str(), e["TTL"].as_str()),
        (Some(15_000_000_000), Some("release"), Some(""))
    );
    for (body, lock_delay, ttl, node_checks) in [
        (
            r#"{"LockDelay":15,"TTL":"15000ms"}"#,
            json!(15_000_000_000_i64),
            "15000ms",
            json!(["serfHealth"]),
        ),
        (r#"{"LockDelay":"0s","Checks":[]}"#, json!(0), "", json!([])),
        (
            r#"{"lockdelay":"500ns","ttl":"0s","NodeChecks":null}"#,
            json!(500_000_000_000_i64),
            "0s",
            Value::Null,
        ),
    ] {
        let s = sim.session(body);
        let e = &json_of(&sim.get(&format!("/v1/session/info/{s}")))[0];
        assert_eq!(
            (&e["LockDelay"], e["TTL"].as_str().unwrap(), &e["NodeChecks"]),
            (&lock_delay, ttl, &node_checks),
            "{body}"
        );
    }
    assert!(sim.consul.session(&d).unwrap().ttl_duration.is_none());

    let list = json_of(&sim.get("/v1/session/list"));
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ID"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!((ids.len(), &ids), (5, &sorted), "listed in ID order");

    // Destroy: true, known or not; then gone.
    assert!(is_true(&sim.put(&format!("/v1/session/destroy/{id}"), b"")));
    assert!(is_true(&sim.put(&format!("/v1/session/destroy/{id}"), b"")));
    assert_eq!(text(&sim.get(&format!("/v1/session/info/{id}"))), "[]");
    let r = sim.put(&format!("/v1/session/renew/{id}"), b"");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (404, format!("Session id '{id}' not found"))
    );

    // Errors, with Consul's texts.
    let cases = [
        (
            r#"{"TTL":"5s"}"#,
            500,
            "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]",
        ),
        (
            r#"{"TTL":"86401s"}"#,
            500,
            "Invalid Session TTL '86401000000000', must be between [10s=24h0m0s]",
        ),
        (
            r#"{"TTL":"abc"}"#,
            500,
            r#"Session TTL 'abc' invalid: time: invalid duration "abc""#,
        ),
        (r#"{"Behavior":"bogus"}"#, 500, "Invalid Behavior setting 'bogus'"),
        (r#"{"Checks":["nope"]}"#, 500, "Missing check 'nope' registration"),
        (r#"{"Node":"elsewhere"}"#, 500, "Missing node registration"),
        (r#"{"Node":""}"#, 500, "Must provide Node"),
        (
            r#"{"TTL":15}"#,
            400,
            "Request decode failed: json: cannot unmarshal number into Go struct field .TTL of type string",
        ),
        (
            r#"{"LockDelay":"x"}"#,
            400,
            r#"Request decode failed: time: invalid duration "x""#,
        ),
    ];
    for (body, status, message) in cases {
        let r = sim.put("/v1/session/create", body.as_bytes());
        assert_eq!(
            (r.status().as_u16(), text(&r).as_str()),
            (status, message),
            "{body}"
        );
    }
    let r = sim.put("/v1/session/create", b"garbage");
    assert_eq!(r.status(), 400);
    assert!(text(&r).starts_with("Request decode failed: "));

    let r = sim.get("/v1/session/info/garbage");
    assert_eq!(
        (r.status().as_u16(), text(&r)),
        (
            500,
            "failed session lookup: index error: UUID must be 36 characters".to_owned()
        )
    );
    assert_eq!(
        (header(&r, "X-Consul-Index"), header(&r, "X-Consul-KnownLeader")),
        (Some("1"), Some("false"))
    );
    assert_eq!(sim.put("/v1/session/renew/garbage", b"").status(), 500);
    assert_eq!(sim.put("/v1/session/destroy/garbage", b"").status(), 500);
    assert_eq!(text(&sim.put("/v1/session/renew/", b"")), "Missing session");
}

#[test]
fn ttl_expiry_releases_keys_and_starts_lock_delay() {
    // Several seeds: the expiry point is drawn in [TTL, 2×TTL].
    let mut seen = Vec::new();
    for seed in 0..20 {
        let mut sim = Sim::new(seed);
        let s = sim.session(r#"{"TTL":"10s","LockDelay":"2s"}"#);
        let other = sim.session(r#"{"TTL":"86400s"}"#);
        assert!(is_true(&sim.put(&format!("/v1/kv/k?acquire={s}"), b"")));
        let expires = sim.consul.session(&s).unwrap().expires_at.unwrap();
        let after = expires - sim.start;
        assert!((10 * SECOND..=20 * SECOND).contains(&after), "{after:?}");
        seen.push(after);
        assert_eq!(sim.consul.poll_timeout(), Some(expires));

        // Just before: still there. At the expiry: gone, key released, lock-delay from then.
        sim.now = expires - Duration::from_millis(1);
        sim.consul.advance(sim.now);
        assert!(sim.consul.session(&s).is_some());
        sim.sleep(Duration::from_millis(1));
        assert!(sim.consul.session(&s).is_none());
        assert_eq!(sim.entry("k").unwrap().get("Session"), None);
        assert_eq!(sim.consul.lock_delay_until("k"), Some(expires + 2 * SECOND));
        let index_before = sim.consul.index();
        assert!(!is_true(&sim.put(&format!("/v1/kv/k?acquire={other}"), b"")));
        assert_eq!(
            sim.consul.index(),
            index_before,
            "a lock-delay refusal takes no Raft index"
        );
        sim.sleep(2 * SECOND - Duration::from_millis(1));
        assert!(!is_true(&sim.put(&format!("/v1/kv/k?acquire={other}"), b"")));
        sim.sleep(Duration::from_millis(1));
        assert!(is_true(&sim.put(&format!("/v1/kv/k?acquire={other}"), b"")));
        assert_eq!(sim.entry("k").unwrap()["LockIndex"], 2);
    }
    seen.sort_unstable();
    seen.dedup();
    assert!(seen.len() > 10, "the seed spreads expiries: {seen:?}");

    // Renewing restarts the clock; Consul 1.8.7's exact 2×TTL is available.
    let mut sim = Sim::with_config(
        1,
        SimConfig {
            ttl_expiry: TtlExpiry::TwiceTtl,
            ..SimConfig::default()
        },
    );
    let s = sim.session(r#"{"TTL":"10s"}"#);
    sim.sleep(15 * SECOND);
    assert_eq!(sim.put(&format!("/v1/session/renew/{s}"), b"").status(), 200);
    sim.sleep(19 * SECOND);
    assert!(sim.consul.session(&s).is_some());
    sim.sleep(SECOND);
    assert!(sim.consul.session(&s).is_none());
    assert_eq!(sim.elapsed(), 35 * SECOND);
    assert_eq!(sim.put(&format!("/v1/session/renew/{s}"), b"").status(), 404);
}

#[test]
fn delete_behavior_deletes_keys_and_lock_delay_is_capped() {
    let mut sim = Sim::new(8);
    let s = sim.session(r#"{"Behavior":"delete","LockDelay":"2h"}"#);
    let other = sim.session("{}");
    assert!(is_true(&sim.put(&format!("/v1/kv/d?acquire={s}"), b"")));
    assert!(is_true(&sim.put(&format!("/v1/session/destroy/{s}"), b"")));
    assert!(sim.entry("d").is_none());
    assert_eq!(
        sim.consul.lock_delay_until("d"),
        Some(sim.now + Duration::from_secs(60))
    );
    assert!(!is_true(&sim.put(&format!("/v1/kv/d?acquire={other}"), b"")));
    sim.sleep(Duration::from_secs(60));
    assert!(is_true(&sim.put(&format!("/v1/kv/d?acquire={other}"), b"")));
    assert_eq!(sim.entry("d").unwrap()["LockIndex"], 1, "a new key");
}

#[test]
fn blocking_reads_park_and_wake() {
    let mut sim = Sim::new(9);
    assert!(is_true(&sim.put("/v1/kv/a", b"1")));
    assert!(is_true(&sim.put("/v1/kv/b", b"1")));
    let ia = index(&sim.get("/v1/kv/a"));

    // Index 0 never blocks; an index already passed answers at once.
    assert!(matches!(
        sim.send("GET", "/v1/kv/a?index=0&wait=1s", b""),
        SimReply::Now(_)
    ));
    assert!(matches!(
        sim.send("GET", "/v1/kv/a?index=1&wait=1s", b""),
        SimReply::Now(_)
    ));

    // A write to another key does not wake a read of an existing key; a write to it does.
    let q = sim.park(&format!("/v1/kv/a?index={ia}&wait=1m"));
    let iz = index(&sim.get("/v1/kv/zz"));
    let missing = sim.park(&format!("/v1/kv/zz?index={iz}&wait=1m"));
    assert_eq!(sim.consul.parked_queries(), 2);
    assert!(is_true(&sim.put("/v1/kv/b", b"2")));
    let woken = sim.sleep(Duration::ZERO);
    assert_eq!(woken.len(), 1, "a missing key's read wakes on any KV write");
    assert_eq!(woken[0].0, missing);
    assert_eq!(woken[0].1.status(), 404);
    sim.sleep(SECOND);
    assert!(is_true(&sim.put("/v1/kv/a", b"2")));
    let woken = sim.consul.advance(sim.now);
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].0, q);
    assert_eq!(json_of(&woken[0].1)[0]["Value"], "Mg==");
    assert!(index(&woken[0].1) > ia);
    assert!(
        sim.consul.advance(sim.now).is_empty(),
        "an answer is collected once"
    );

    // Without a change the read ends after wait plus up to wait/16.
    let ia = index(&sim.get("/v1/kv/a"));
    let q = sim.park(&format!("/v1/kv/a?index={ia}&wait=16s"));
    let deadline = sim.consul.poll_timeout().unwrap();
    let waited = deadline - sim.now;
    assert!((16 * SECOND..17 * SECOND).contains(&waited), "{waited:?}");
    assert!(sim.sleep(waited - Duration::from_nanos(1)).is_empty());
    let woken = sim.sleep(Duration::from_nanos(1));
    assert_eq!((woken.len(), woken[0].0), (1, q));
    assert_eq!(index(&woken[0].1), ia, "a return does not mean a change");

    // Default wait 5 min, longest 10 min (plus jitter).
    for (wait, low) in [("", 300), ("&wait=1h", 600), ("&wait=0s", 300)] {
        sim.park(&format!("/v1/kv/a?index={ia}{wait}"));
        let waited = sim.consul.poll_timeout().unwrap() - sim.now;
        assert!(
            (low * SECOND..=low * SECOND * 17 / 16).contains(&waited),
            "{wait}: {waited:?}"
        );
        let woken = sim.sleep(waited);
        assert_eq!(woken.len(), 1);
    }

    // Recursive reads wake on their prefix only (once it has keys: an empty prefix reports the
    // table's index, as in Consul); abandon drops a read.
    assert!(is_true(&sim.put("/v1/kv/p/a", b"")));
    let ip = index(&sim.get("/v1/kv/p/?recurse"));
    let q = sim.park(&format!("/v1/kv/p/?recurse&index={ip}&wait=1m"));
    let dropped = sim.park(&format!("/v1/kv/p/?recurse&index={ip}&wait=1m"));
    assert!(is_true(&sim.put("/v1/kv/q", b"")));
    assert!(sim.sleep(Duration::ZERO).is_empty());
    sim.consul.abandon(dropped);
    assert!(is_true(&sim.put("/v1/kv/p/x", b"")));
    let woken = sim.sleep(Duration::ZERO);
    assert_eq!(woken.iter().map(|(q, _)| *q).collect::<Vec<_>>(), [q]);
    assert_eq!(sim.consul.parked_queries(), 0);

    // Session reads block on the session table.
    let is = index(&sim.get("/v1/session/list"));
    let q = sim.park(&format!("/v1/session/list?index={is}"));
    let s = sim.session("{}");
    let woken = sim.sleep(Duration::ZERO);
    assert_eq!(woken[0].0, q);
    assert_eq!(json_of(&woken[0].1)[0]["ID"], s.as_str());
}

#[test]
fn an_expiry_wakes_the_holders_watchers() {
    let mut sim = Sim::new(10);
    let s = sim.session(r#"{"TTL":"10s","LockDelay":"0s"}"#);
    assert!(is_true(&sim.put(&format!("/v1/kv/k?acquire={s}"), b"")));
    let i = index(&sim.get("/v1/kv/k"));
    let q = sim.park(&format!("/v1/kv/k?consistent&index={i}"));
    let woken = sim.sleep(20 * SECOND);
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].0, q);
    assert_eq!(json_of(&woken[0].1)[0].get("Session"), None);
    assert_eq!(sim.consul.lock_delay_until("k"), None, "LockDelay 0s: none");
}

#[test]
fn leader_loss_refuses_forwarded_requests_and_stops_timers() {
    let mut sim = Sim::new(11);
    let s = sim.session(r#"{"TTL":"10s"}"#);
    assert!(is_true(&sim.put(&format!("/v1/kv/k?acquire={s}"), b"")));
    sim.consul.set_leader(sim.now, false);
    for (method, uri) in [
        ("GET", "/v1/kv/k".to_owned()),
        ("GET", "/v1/kv/k?consistent".to_owned()),
        ("PUT", "/v1/kv/k".to_owned()),
        ("DELETE", "/v1/kv/k".to_owned()),
        ("PUT", format!("/v1/session/renew/{s}")),
        ("PUT", "/v1/session/create".to_owned()),
        ("PUT", format!("/v1/session/destroy/{s}")),
    ] {
        let r = sim.call(method, &uri, b"");
        assert_eq!(
            (r.status().as_u16(), text(&r)),
            (500, "No cluster leader".to_owned()),
            "{method} {uri}"
        );
    }
    let r = sim.get("/v1/session/info/11111111-2222-3333-4444-555555555555");
    assert_eq!(
        (r.status().as_u16(), header(&r, "X-Consul-KnownLeader")),
        (500, Some("false"))
    );
    assert_eq!(text(&sim.get("/v1/status/leader")), r#""""#);

    // Stale reads are served, saying there is no leader and how long since contact.
    sim.sleep(60 * SECOND);
    let r = sim.get("/v1/kv/k?stale");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "X-Consul-KnownLeader"), Some("false"));
    assert_eq!(header(&r, "X-Consul-LastContact"), Some("60000"));
    assert!(sim.consul.session(&s).is_some(), "no leader, no session timers");
    assert_eq!(sim.consul.poll_timeout(), None);

    // A new leader restarts every TTL in full.
    sim.consul.set_leader(sim.now, true);
    let expires = sim.consul.session(&s).unwrap().expires_at.unwrap();
    assert!((10 * SECOND..=20 * SECOND).contains(&(expires - sim.now)));
    assert_eq!(sim.get("/v1/kv/k").status(), 200);
    assert_eq!(text(&sim.get("/v1/status/leader")), r#""127.0.0.1:8300""#);
}

#[test]
fn operator_actions() {
    let mut sim = Sim::new(12);
    let s = sim.session(r#"{"LockDelay":"3s"}"#);
    assert!(is_true(&sim.put(&format!("/v1/kv/k?acquire={s}&flags=5"), b"v")));
    let i = index(&sim.get("/v1/kv/k"));
    let q = sim.park(&format!("/v1/kv/k?index={i}"));

    sim.consul.put_key(sim.now, "k", 6, b"w");
    let woken = sim.consul.advance(sim.now);
    assert_eq!(woken[0].0, q);
    let e = json_of(&woken[0].1)[0].clone();
    assert_eq!(
        (
            e["Flags"].as_u64(),
            e["LockIndex"].as_u64(),
            e["Session"].as_str()
        ),
        (Some(6), Some(0), Some(s.as_str()))
    );

    assert!(sim.consul.destroy_session(sim.now, &s));
    assert!(!sim.consul.destroy_session(sim.now, &s));
    assert_eq!(sim.entry("k").unwrap().get("Session"), None);
    assert_eq!(sim.consul.lock_delay_until("k"), Some(sim.now + 3 * SECOND));

    assert!(sim.consul.delete_key(sim.now, "k"));
    assert!(!sim.consul.delete_key(sim.now, "k"));
    assert!(sim.entry("k").is_none());
}

#[test]
fn http_errors_like_consuls() {
    let mut sim = Sim::new(13);
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("GET", "/v1/kv/a?dc=dc2", 500, "No path to datacenter"),
        ("PUT", "/v1/kv/a?dc=dc2", 500, "No path to datacenter"),
        (
            "GET",
            "/v1/kv/a?ns=x",
            400,
            r#"Bad request: Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature"#,
        ),
        (
            "PUT",
            "/v1/session/create?ns=x&dc=dc2",
            400,
            r#"Bad request: Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature"#,
        ),
        (
            "GET",
            "/v1/kv/a?stale&consistent",
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
        ("GET", "/v1/kv/a?wait=5", 400, "Invalid wait time"),
        ("GET", "/v1/kv/a?index=-1", 400, "Invalid index"),
        (
            "GET",
            "/v1/kv/a?max_stale=x",
            400,
            r#"Invalid max_stale value "x""#,
        ),
        ("PUT", "/v1/kv/", 400, "Missing key name"),
        ("GET", "/v1/kv/", 400, "Missing key name"),
        (
            "PUT",
            "/v1/kv/a?flags=18446744073709551616",
            500,
            r#"strconv.ParseUint: parsing "18446744073709551616": value out of range"#,
        ),
        ("POST", "/v1/kv/a", 405, "method POST not allowed"),
        ("GET", "/v1/session/create", 405, "method GET not allowed"),
        ("GET", "/v1/kv/a?x=%zz", 500, ""),
        ("GET", "/v1/nothing", 404, ""),
        ("GET", "/v1/kv/a%zz", 400, "400 Bad Request"),
    ];
    for (method, uri, status, body) in cases {
        let r = sim.call(method, uri, b"");
        assert_eq!(
            (r.status().as_u16(), text(&r).as_str()),
            (status, body),
            "{method} {uri}"
        );
    }
    assert_eq!(
        sim.get("/v1/kv/a?dc=dc1&ns=").status(),
        404,
        "dc1 and an empty ns are fine"
    );
    assert_eq!(
        sim.get("/v1/kv/a?partition=x").status(),
        404,
        "partition is ignored"
    );

    let r = sim.call("OPTIONS", "/v1/kv/a", b"");
    assert_eq!(
        (r.status().as_u16(), header(&r, "Allow")),
        (200, Some("OPTIONS,GET,PUT,DELETE"))
    );
    let r = sim.get("/v1/kv/a/../b?x=1");
    assert_eq!(
        (r.status().as_u16(), header(&r, "Location")),
        (301, Some("/v1/kv/b?x=1"))
    );
    assert_eq!(text(&r), "<a href=\"/v1/kv/b?x=1\">Moved Permanently</a>.\n\n");
    let r = sim.put("/v1/kv/a//b", b"");
    assert_eq!(
        (r.status().as_u16(), header(&r, "Location"), r.body().len()),
        (301, Some("/v1/kv/a/b"), 0)
    );
    assert_eq!(header(&sim.get("/v1/kv"), "Location"), Some("/v1/kv/"));

    let big = vec![b'x'; 512 * 1024 + 1];
    let r = sim.put("/v1/kv/big", &big);
    assert_eq!(r.status(), 413);
    assert!(text(&r).starts_with("Request body(524289 bytes) too large, max size: 524288 bytes."));
    assert!(is_true(&sim.put("/v1/kv/big", &big[1..])));
}

/// Runs a fixed mixed script; every reply (status, headers, body) and every woken read.
fn transcript(seed: u64) -> Vec<String> {
    let mut sim = Sim::new(seed);
    let mut out = Vec::new();
    let mut record = |label: &str, r: &Response| {
        let mut headers: Vec<String> = r
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
            .collect();
        headers.sort();
        out.push(format!("{label} {} {headers:?} {}", r.status(), text(r)));
    };
    let s1 = sim.session(r#"{"TTL":"10s","LockDelay":"1s"}"#);
    let s2 = sim.session(r#"{"TTL":"10s"}"#);
    let q = sim.park("/v1/kv/k?index=5&wait=30s");
    let r = sim.put(&format!("/v1/kv/k?acquire={s1}"), b"a");
    record("acquire", &r);
    for (id, r) in sim.sleep(Duration::ZERO) {
        record(&format!("woken {id:?}"), &r);
    }
    let _ = q;
    let i = index(&sim.get("/v1/kv/k"));
    let _ = sim.park(&format!("/v1/kv/k?index={i}&wait=30s"));
    let _ = sim.park(&format!("/v1/session/list?index={i}&wait=3m"));
    for step in 0..40 {
        if step % 3 == 0 {
            let r = sim.put(&format!("/v1/session/renew/{s2}"), b"");
            record("renew", &r);
        }
        let r = sim.put(&format!("/v1/kv/k?acquire={s2}"), b"b");
        record("contend", &r);
        for (id, r) in sim.sleep(Duration::from_millis(700)) {
            record(&format!("woken {id:?}"), &r);
        }
    }
    let r = sim.get("/v1/session/list");
    record("list", &r);
    out
}

#[test]
fn same_seed_same_inputs_same_bytes() {
    let a = transcript(42);
    assert_eq!(a, transcript(42));
    assert!(a.iter().any(|l| l.starts_with("woken")), "{a:#?}");
    assert_ne!(a, transcript(43), "another seed draws other IDs and times");
}

/// The core's encoders against the simulator, decoded by the core: the requests a client sends.
#[test]
fn the_cores_requests_work_against_the_simulator() {
    let mut sim = Sim::new(14);
    let config = ClientConfig::default();
    let call = |sim: &mut Sim, request: http::Request<Vec<u8>>| match sim.consul.handle(sim.now, &request) {
        SimReply::Now(r) => r,
        SimReply::Parked(_) => panic!("parked"),
    };
    let created = call(
        &mut sim,
        SessionCreate {
            name: Some("core".into()),
            ttl: Some(Duration::from_secs(10)),
            lock_delay: Some(Duration::ZERO),
            ..SessionCreate::default()
        }
        .encode(&config),
    );
    let id: SessionId = SessionCreate::decode(&created).unwrap();
    let key = Key::new("core/lock").unwrap();
    let acquire = KvAcquire {
        key: key.clone(),
        session: id.clone(),
        flags: LOCK_FLAG_VALUE,
        value: b"me".to_vec(),
    };
    assert!(KvAcquire::decode(&call(&mut sim, acquire.encode(&config))).unwrap());
    let relock = KvLockTxn {
        key: key.clone(),
        session: id.clone(),
        flags: LOCK_FLAG_VALUE,
        value: b"me".to_vec(),
    };
    let LockTxnOutcome::Locked(locked) = KvLockTxn::decode(&call(&mut sim, relock.encode(&config))).unwrap()
    else {
        panic!("the holder's lock refused")
    };
    assert_eq!(
        (
            locked.lock_index,
            locked.flags,
            locked.session.as_ref(),
            locked.value.len()
        ),
        (1, LOCK_FLAG_VALUE, Some(&id), 0)
    );
    let unknown = KvLockTxn {
        session: SessionId::new("11111111-2222-3333-4444-555555555555").unwrap(),
        ..relock
    };
    assert_eq!(
        KvLockTxn::decode(&call(&mut sim, unknown.encode(&config))).unwrap(),
        LockTxnOutcome::Refused(LockRefusal::InvalidSession)
    );
    let read = KvGet::decode(&call(&mut sim, KvGet::new(key.clone()).encode(&config))).unwrap();
    let pair = read.value.unwrap();
    assert_eq!(
        (pair.lock_index, pair.flags, pair.session.as_ref()),
        (1, LOCK_FLAG_VALUE, Some(&id))
    );
    assert_eq!(read.meta.index, pair.modify_index);
    assert_eq!(read.meta.known_leader, Some(true));
    let list = KvList::decode(&call(
        &mut sim,
        KvList::new(Key::new("core/").unwrap()).encode(&config),
    ))
    .unwrap();
    assert_eq!(list.value.len(), 1);
    // A queued lock's enqueue: the entry, then the tree read after it, at the transaction's index
    // (Consul 1.8.7's answer: the lock's entry without its value, the tree with values).
    let enqueue = KvEnqueueTxn {
        lock: KvLockTxn {
            key: Key::new("core/lock/.queue/x").unwrap(),
            session: id.clone(),
            flags: 7,
            value: Vec::new(),
        },
        tree: key.clone(),
    };
    let EnqueueOutcome::Lined(line) = KvEnqueueTxn::decode(&call(&mut sim, enqueue.encode(&config))).unwrap()
    else {
        panic!("the enqueue refused")
    };
    assert_eq!(
        line.tree.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
        ["core/lock", "core/lock/.queue/x"]
    );
    assert_eq!(line.tree[0].value, b"me", "the tree keeps values");
    assert_eq!(
        line.index(),
        line.entry.create_index,
        "a new entry: the transaction's index"
    );
    assert_eq!(line.entry.session.as_ref(), Some(&id));
    assert!(
        KvDelete::decode(&call(
            &mut sim,
            KvDelete {
                key: Key::new("core/lock/.queue/x").unwrap()
            }
            .encode(&config)
        ))
        .unwrap()
    );
    let renewed =
        SessionRenew::decode(&call(&mut sim, SessionRenew { id: id.clone() }.encode(&config))).unwrap();
    assert_eq!(renewed.unwrap().ttl, Some(Duration::from_secs(10)));
    let info = SessionInfo::decode(&call(&mut sim, SessionInfo::new(id.clone()).encode(&config))).unwrap();
    assert_eq!(info.value.unwrap().lock_delay, Duration::ZERO);
    let release = KvRelease {
        key: key.clone(),
        session: id.clone(),
        flags: LOCK_FLAG_VALUE,
        value: Vec::new(),
    };
    assert!(KvRelease::decode(&call(&mut sim, release.encode(&config))).unwrap());
    let cas = KvCasPut {
        key: key.clone(),
        cas: pair.modify_index,
        flags: 0,
        value: Vec::new(),
    };
    assert!(
        !KvCasPut::decode(&call(&mut sim, cas.encode(&config))).unwrap(),
        "stale CAS"
    );
    let now_index = KvGet::decode(&call(&mut sim, KvGet::new(key.clone()).encode(&config)))
        .unwrap()
        .value
        .unwrap()
        .modify_index;
    let delete = KvCasDelete {
        key: key.clone(),
        cas: now_index,
    };
    assert!(KvCasDelete::decode(&call(&mut sim, delete.encode(&config))).unwrap());
    assert!(
        SessionDestroy::decode(&call(&mut sim, SessionDestroy { id: id.clone() }.encode(&config))).unwrap()
    );
    assert_eq!(
        SessionRenew::decode(&call(&mut sim, SessionRenew { id }.encode(&config))).unwrap(),
        None
    );
    let missing = KvGet::decode(&call(&mut sim, KvGet::new(key).encode(&config))).unwrap();
    assert_eq!(missing.value, None);
}

/// A driver for lock machines in virtual time: requests go to the simulator, blocking reads
/// park there, and time jumps to the next thing that happens.
struct VirtualDriver {
    sim: Sim,
    /// Parked reads: which machine and request they answer, and the request's deadline.
    parked: BTreeMap<QueryId, (usize, RequestId, Instant)>,
    events: Vec<(Duration, usize, LockEvent)>,
    /// A machine whose agent is frozen: its requests never reach the server and are never
    /// answered, and time out at their deadlines.
    frozen: Option<usize>,
    /// The requests of the frozen machine, with their deadlines.
    hung: Vec<(usize, RequestId, Instant)>,
}

impl VirtualDriver {
    fn new(sim: Sim) -> VirtualDriver {
        VirtualDriver {
            sim,
            parked: BTreeMap::new(),
            events: Vec::new(),
            frozen: None,
            hung: Vec::new(),
        }
    }

    fn pump(&mut self, machines: &mut [LockMachine]) {
        loop {
            let mut progressed = false;
            for (m, machine) in machines.iter_mut().enumerate() {
                while let Some(action) = machine.poll_action() {
                    progressed = true;
                    match action {
                        Action::Event(event) => self.events.push((self.sim.elapsed(), m, event)),
                        Action::Send(transmit) if self.frozen == Some(m) => {
                            self.hung.push((m, transmit.id, transmit.deadline));
                        }
                        Action::Send(transmit) => {
                            match self.sim.consul.handle(self.sim.now, &transmit.request) {
                                SimReply::Now(r) => machine.handle_response(self.sim.now, transmit.id, Ok(r)),
                                SimReply::Parked(q) => {
                                    self.parked.insert(q, (m, transmit.id, transmit.deadline));
                                }
                            }
                        }
                    }
                }
            }
            for (q, r) in self.sim.consul.advance(self.sim.now) {
                match self.parked.remove(&q) {
                    // A frozen agent sends no answer, not even to a read parked before.
                    Some((m, id, deadline)) if self.frozen == Some(m) => self.hung.push((m, id, deadline)),
                    Some((m, id, _)) => {
                        machines[m].handle_response(self.sim.now, id, Ok(r));
                        progressed = true;
                    }
                    None => {}
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Runs until `until` (virtual time since the start).
    fn run(&mut self, machines: &mut [LockMachine], until: Duration) {
        let end = self.sim.start + until;
        loop {
            self.pump(machines);
            let next = machines
                .iter()
                .filter_map(LockMachine::poll_timeout)
                .chain(self.sim.consul.poll_timeout())
                .chain(self.parked.values().map(|(_, _, deadline)| *deadline))
                .chain(self.hung.iter().map(|(_, _, deadline)| *deadline))
                .min()
                .map_or(end, |t| t.min(end))
                .max(self.sim.now);
            self.sim.now = next;
            // Requests past their deadline: the driver gives up on them.
            let late: Vec<QueryId> = self
                .parked
                .iter()
                .filter(|(_, p)| p.2 <= next)
                .map(|(q, _)| *q)
                .collect();
            for q in late {
                if let Some((m, id, _)) = self.parked.remove(&q) {
                    self.sim.consul.abandon(q);
                    let error = TransportError::new(TransportErrorKind::Timeout, "virtual deadline");
                    machines[m].handle_response(next, id, Err(error));
                }
            }
            let (late, hung): (Vec<_>, Vec<_>) = self.hung.drain(..).partition(|h| h.2 <= next);
            self.hung = hung;
            for (m, id, _) in late {
                let error =
                    TransportError::new(TransportErrorKind::Timeout, "virtual deadline (agent frozen)");
                machines[m].handle_response(next, id, Err(error));
            }
            self.pump(machines);
            for machine in machines.iter_mut() {
                if machine.poll_timeout().is_some_and(|t| t <= next) {
                    machine.handle_timeout(next);
                }
            }
            if next >= end {
                self.pump(machines);
                return;
            }
        }
    }
}

/// Two lock machines on the simulator: the first holds for ten virtual minutes, then `fault`
/// (given the simulator and the holder's session) ends its session; the holder must learn of the
/// loss, and the other contender take over, but not before the lock-delay (15 s) is over.
fn the_holder_learns_and_the_other_takes_over_after(fault: impl FnOnce(&mut Sim, &str)) {
    let mut driver = VirtualDriver::new(Sim::new(15));
    let config = ClientConfig::default();
    let options = LockOptions::new("svc/leader").unwrap();
    let mut machines = vec![
        LockMachine::new(config.clone(), options.clone()).unwrap(),
        LockMachine::new(config, options).unwrap(),
    ];
    let start = driver.sim.now;
    machines[0].lock(start).unwrap();
    driver.run(&mut machines, Duration::from_secs(1));
    machines[1].lock(driver.sim.now).unwrap();
    // Ten virtual minutes of holding: renewals keep the session alive.
    driver.run(&mut machines, Duration::from_secs(600));
    let acquired: Vec<usize> = driver
        .events
        .iter()
        .filter(|(_, _, e)| matches!(e, LockEvent::Acquired(_)))
        .map(|(_, m, _)| *m)
        .collect();
    assert_eq!(acquired, [0], "{:#?}", driver.events);
    let holder = driver
        .sim
        .consul
        .kv("svc/leader")
        .unwrap()
        .session
        .clone()
        .unwrap();

    let destroyed_at = driver.sim.elapsed();
    fault(&mut driver.sim, &holder);
    driver.run(&mut machines, destroyed_at + Duration::from_secs(120));
    let lost = driver
        .events
        .iter()
        .find(|(_, m, e)| *m == 0 && matches!(e, LockEvent::Lost(_)))
        .unwrap_or_else(|| panic!("no loss: {:#?}", driver.events));
    assert!(
        matches!(
            lost.2,
            LockEvent::Lost(LossReason::NotHeld | LossReason::SessionInvalidated)
        ),
        "{lost:?}"
    );
    let (taken_at, _, event) = driver
        .events
        .iter()
        .find(|(_, m, e)| *m == 1 && matches!(e, LockEvent::Acquired(_)))
        .unwrap_or_else(|| panic!("no takeover: {:#?}", driver.events));
    let LockEvent::Acquired(token) = event else {
        unreachable!()
    };
    assert_eq!(token.lock_index, 2);
    assert!(
        *taken_at >= destroyed_at + Duration::from_secs(15),
        "lock-delay respected: {taken_at:?}"
    );
}

#[test]
fn lock_machines_run_against_the_simulator_in_virtual_time() {
    // An operator destroys the holder's session.
    the_holder_learns_and_the_other_takes_over_after(|sim, holder| {
        assert!(sim.consul.destroy_session(sim.now, holder));
    });
}

/// Found by the reliability lab (bench/src/lab.rs, kill-client): a client agent that dies takes
/// its node's `serfHealth` check down, and Consul invalidates every session bound to it at once,
/// long before the TTL. The simulator does the same; the machines must treat it as any loss.
#[test]
fn a_failed_node_invalidates_its_sessions_and_the_lock_moves_after_the_lock_delay() {
    the_holder_learns_and_the_other_takes_over_after(|sim, holder| {
        assert!(sim.consul.fail_node(sim.now) >= 1);
        assert!(sim.consul.session(holder).is_none());
        // The simulator is one node for every contender; in the cluster the next holder is on a
        // healthy node, so the failure passes here for it to make its session.
        sim.consul.recover_node(sim.now);
    });
}

/// The reliability lab's finding (RELIABILITY.md, lock-delay 0 and 5 s): the holder's client
/// agent freezes right after a renew, so the holder hears nothing more; the servers mark the
/// node failed `detect` later and invalidate its sessions at once, and the next holder (on a
/// healthy node: here a session without checks, which the one-node simulator's failure spares)
/// takes the key when the lock-delay runs out. The holder must have stopped believing by then:
/// its renew deadline is the lock-delay, not the TTL (which would have let it believe 5 s
/// after the next holder's grant).
#[test]
fn a_frozen_holders_node_failing_ends_its_belief_before_the_next_holder_is_granted() {
    let ttl = Duration::from_secs(10);
    let lock_delay = Duration::from_secs(5);
    for detect in [
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::from_secs(3),
        Duration::from_secs(6),
    ] {
        let mut driver = VirtualDriver::new(Sim::new(16));
        let config = ClientConfig::default();
        let mut holder = LockOptions::new("svc/leader").unwrap();
        let session = holder.hold.session_options_mut().unwrap();
        session.ttl = ttl;
        session.lock_delay = Some(lock_delay);
        let mut next = holder.clone();
        let session = next.hold.session_options_mut().unwrap();
        *session = session.clone().ttl_only();
        let mut machines = vec![
            LockMachine::new(config.clone(), holder).unwrap(),
            LockMachine::new(config, next).unwrap(),
        ];
        machines[0].lock(driver.sim.now).unwrap();
        driver.run(&mut machines, Duration::from_secs(1));
        machines[1].lock(driver.sim.now).unwrap();
        // Hold a while, then freeze the holder's agent just after a renew is acknowledged (the
        // worst moment: the most belief left).
        driver.run(&mut machines, Duration::from_secs(60));
        let acked =
            machines[0].session().renew_deadline().unwrap() - machines[0].session().hold_window().unwrap();
        driver.run(&mut machines, acked - driver.sim.start + Duration::from_millis(1));
        driver.frozen = Some(0);
        let frozen_at = driver.sim.elapsed();
        driver.run(&mut machines, frozen_at + detect);
        assert_eq!(
            driver.sim.consul.fail_node(driver.sim.now),
            1,
            "the holder's session, bound to serfHealth"
        );
        driver.run(&mut machines, frozen_at + Duration::from_secs(60));

        let when = |m: usize, what: fn(&LockEvent) -> bool| {
            driver
                .events
                .iter()
                .find(|(t, who, e)| *who == m && *t >= frozen_at && what(e))
                .map(|(t, ..)| *t)
                .unwrap_or_else(|| panic!("detect {detect:?}: machine {m}: {:#?}", driver.events))
        };
        let lost = when(0, |e| {
            matches!(e, LockEvent::Lost(LossReason::RenewDeadline { .. }))
        });
        let granted = when(1, |e| matches!(e, LockEvent::Acquired(_)));
        assert!(
            lost <= granted,
            "detect {detect:?}: the holder believed until {lost:?}, the next holder was granted at {granted:?}"
        );
        assert!(
            granted >= frozen_at + detect + lock_delay,
            "detect {detect:?}: lock-delay kept"
        );
    }
}

#[test]
fn a_failed_node_spares_sessions_not_bound_to_serf_health() {
    let mut sim = Sim::new(21);
    let bound = sim.session(r#"{"TTL":"15s","LockDelay":"2s"}"#);
    let ttl_only = sim.session(r#"{"TTL":"15s","LockDelay":"2s","NodeChecks":[]}"#);
    assert!(is_true(&sim.put(&format!("/v1/kv/a?acquire={bound}"), b"x")));
    assert!(is_true(&sim.put(&format!("/v1/kv/b?acquire={ttl_only}"), b"y")));
    assert_eq!(sim.consul.fail_node(sim.now), 1);
    assert_eq!(sim.entry("a").unwrap().get("Session"), None);
    assert_eq!(sim.consul.lock_delay_until("a"), Some(sim.now + 2 * SECOND));
    assert_eq!(
        sim.entry("b").unwrap()["Session"].as_str(),
        Some(ttl_only.as_str())
    );
    assert!(sim.consul.session(&ttl_only).is_some());

    // Until the node recovers, no session can be bound to its health; a TTL-only one can.
    let refused = sim.put("/v1/session/create", br#"{"TTL":"15s"}"#);
    assert_eq!(
        (refused.status().as_u16(), text(&refused).as_str()),
        (500, "Check 'serfHealth' is in critical state")
    );
    sim.session(r#"{"TTL":"15s","NodeChecks":[]}"#);
    sim.consul.recover_node(sim.now);
    sim.session(r#"{"TTL":"15s"}"#);
    assert_eq!(sim.consul.fail_node(sim.now), 1);
}

fn method_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("PUT".to_owned()),
        Just("DELETE".to_owned()),
        Just("POST".to_owned()),
        Just("OPTIONS".to_owned()),
        Just("HEAD".to_owned()),
        "[A-Z]{1,8}",
    ]
}

fn path_strategy() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("v1".to_owned()),
        Just("kv".to_owned()),
        Just("session".to_owned()),
        Just("create".to_owned()),
        Just("renew".to_owned()),
        Just("destroy".to_owned()),
        Just("info".to_owned()),
        Just("list".to_owned()),
        Just("txn".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just(String::new()),
        Just("11111111-2222-3333-4444-555555555555".to_owned()),
        Just("SESSION".to_owned()),
        "[a-zA-Z0-9%._~-]{0,12}",
        "(%[0-9a-fA-F]{2}){1,4}",
    ];
    prop::collection::vec(segment, 0..6).prop_map(|segments| {
        let mut path = String::from("/v1/");
        let mut rest = segments.join("/");
        if rest.starts_with("v1/") {
            rest = rest[3..].to_owned();
        }
        path.push_str(&rest);
        path
    })
}

/// Percent-encodes what a URI can't hold, keeping `%` (so that bad escapes get through).
fn uri_safe(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~%=/:,;+".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn query_strategy() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("index"),
        Just("wait"),
        Just("recurse"),
        Just("keys"),
        Just("separator"),
        Just("raw"),
        Just("acquire"),
        Just("release"),
        Just("cas"),
        Just("flags"),
        Just("dc"),
        Just("ns"),
        Just("stale"),
        Just("consistent"),
        Just("cached"),
        Just("max_stale"),
        Just("pretty"),
    ];
    let value = prop_oneof![
        Just(String::new()),
        Just("0".to_owned()),
        Just("1".to_owned()),
        Just("15s".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("11111111-2222-3333-4444-555555555555".to_owned()),
        Just("SESSION".to_owned()),
        "[ -~]{0,10}",
    ];
    prop::collection::vec((name, prop::option::of(value)), 0..5).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(n, v)| match v {
                None => n.to_owned(),
                Some(v) => format!("{n}={}", uri_safe(&v)),
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        Just(br#"{"TTL":"10s","LockDelay":"1s","Behavior":"delete"}"#.to_vec()),
        Just(br#"{"LockDelay":1e300,"Checks":[],"NodeChecks":[1],"ServiceChecks":[{"ID":5}]}"#.to_vec()),
        Just(br#"[{"TTL":null}]"#.to_vec()),
        Just(br#"[{"KV":{"Verb":"lock","Key":"k","Session":"SESSION","Flags":1,"Value":"aGk="}}]"#.to_vec()),
        Just(
            br#"[{"KV":{"Verb":"unlock","Key":"k","Session":"SESSION"}},{"KV":{"Verb":"x"}},{},null]"#
                .to_vec()
        ),
        "\\[\\{\"KV\":\\{\"[A-Za-z]{1,8}\":[ -~]{0,12}\\}\\}\\]".prop_map(String::into_bytes),
        "\\{\"[A-Za-z]{1,10}\":[ -~]{0,12}\\}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever it is sent, in whatever order, the simulator answers (or parks) without
    /// panicking, and time can always move on.
    #[test]
    fn never_panics_on_garbage(
        seed in any::<u64>(),
        requests in prop::collection::vec(
            (method_strategy(), path_strategy(), query_strategy(), body_strategy(), 0u64..40_000),
            1..12,
        ),
    ) {
        let mut sim = Sim::new(seed);
        let s = sim.session(r#"{"TTL":"10s"}"#);
        let mut skipped = 0;
        let total = requests.len();
        for (method, path, query, body, millis) in requests {
            let uri = if query.is_empty() { path } else { format!("{path}?{query}") };
            let uri = uri.replace("SESSION", &s);
            let body = match String::from_utf8(body) {
                Ok(text) => text.replace("SESSION", &s).into_bytes(),
                Err(e) => e.into_bytes(),
            };
            let Ok(request) = http::Request::builder()
                .method(method.as_str())
                .uri(format!("http://127.0.0.1:8500{uri}"))
                .body(body)
            else {
                skipped += 1;
                continue;
            };
            match sim.consul.handle(sim.now, &request) {
                SimReply::Now(r) => prop_assert!(r.status().as_u16() >= 200),
                SimReply::Parked(_) => prop_assert!(sim.consul.poll_timeout().is_some()),
            }
            for (_, r) in sim.sleep(Duration::from_millis(millis)) {
                prop_assert!(r.status().as_u16() >= 200);
            }
        }
        sim.sleep(Duration::from_secs(3600));
        prop_assert_eq!(sim.consul.parked_queries(), 0);
        prop_assert!(skipped < total, "every request was an invalid URI");
    }
}
