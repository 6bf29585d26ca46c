//! Keeps `SimConsul` honest: scripted request sequences run against the simulator and against a
//! real Consul agent, comparing what a client can observe.
//!
//! Compared, step by step: the status; `Content-Type`, `Allow`, `X-Consul-KnownLeader` and
//! `X-Consul-LastContact`; whether JSON ends with a newline (the agent runs in `-dev` mode, so it
//! indents, and so is the simulator told to); the body, as JSON or text, after normalising:
//!
//! - session IDs become `<S0>`, `<S1>`… in the order the script created them (`<S0U>` for the
//!   upper-case spelling); the node name becomes `<node>`; session lists keep only the script's
//!   own sessions, sorted;
//! - indexes are compared by order, not value: every `CreateIndex`/`ModifyIndex` and the
//!   `X-Consul-Index` of a KV read that found something (all tied to the script's own writes)
//!   becomes its rank among those values (`#0`, `#1`…); any other `X-Consul-Index` (a missing key,
//!   the session table) becomes its place among them: `=#n` when it is one of them, `>#n` when it
//!   lies between `#n` and the next one, `<#0` below all;
//! - the detail of a JSON syntax error (Go's and serde's wording differ) becomes `<syntax>`.
//!
//! A step may also start a request in the background (a blocking read that a later step's
//! write is to wake) and collect its reply later; the reply is compared where it is collected,
//! together with whether it came within [`EARLY`] of its start (wall time for the agent, virtual
//! time for the simulator): a read woken by a write, rather than one that ran out its wait.
//!
//! Scripts run one at a time (the agent is shared; a script's sessions are destroyed when it
//! ends) under unique key prefixes, so that the agent's tables only move with the script.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::harness::strategies::{Shape, mixed_lock_scenario, semaphore_scenario};
use consul_lock_testkit::harness::{Arrival, Scenario, Target, run_recorded};
use consul_lock_testkit::sim::{QueryId, SimConfig, SimConsul, SimReply, TtlExpiry};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::Value;

/// Go's `LockFlagValue`.
const LOCK_FLAGS: &str = "3304740253564472344";
/// A well-formed session ID nobody has.
const UNKNOWN: &str = "11111111-2222-3333-4444-555555555555";
/// A background request answered sooner than this after its start was woken early: scripts
/// sleep less before waking one, and give the reads they don't wake a longer wait.
const EARLY: Duration = Duration::from_millis(900);

/// One step of a script. Templates: `{P}` the script's key prefix, `{S0}`… the sessions it
/// created (`{S0U}` upper-cased), `{MI}` the `ModifyIndex` of the last KV entry read or written
/// by a transaction, `{MI-1}` one less, `{I}` the last `X-Consul-Index`.
#[derive(Clone, Debug)]
enum Step {
    Request {
        method: &'static str,
        path: String,
        body: String,
    },
    /// Starts a request in the background (one at a time).
    Start {
        method: &'static str,
        path: String,
    },
    /// Waits for the background request's reply.
    Join,
    Sleep(Duration),
    /// A request a machine sent in a harness run ([`replay_script`]), as client `client`: `{IDX}`
    /// is the `X-Consul-Index` this client last got for this path, `{CAS}` the `ModifyIndex` it
    /// last saw of this key (the values its machine would have sent in this run).
    Replay {
        client: usize,
        method: &'static str,
        path: String,
        body: String,
    },
}

fn req(method: &'static str, path: &str, body: &str) -> Step {
    Step::Request {
        method,
        path: path.to_owned(),
        body: body.to_owned(),
    }
}

fn get(path: &str) -> Step {
    req("GET", path, "")
}

fn put(path: &str, body: &str) -> Step {
    req("PUT", path, body)
}

fn del(path: &str) -> Step {
    req("DELETE", path, "")
}

fn create(body: &str) -> Step {
    put("/v1/session/create", body)
}

fn sleep_ms(ms: u64) -> Step {
    Step::Sleep(Duration::from_millis(ms))
}

/// Starts a `GET` in the background.
fn start_get(path: &str) -> Step {
    Step::Start {
        method: "GET",
        path: path.to_owned(),
    }
}

/// `PUT /v1/txn`: a body of the given operations.
fn txn(ops: &[String]) -> Step {
    put("/v1/txn", &format!("[{}]", ops.join(",")))
}

/// A KV `lock` operation (`value` base64).
fn lock_op(key: &str, session: &str, flags: u64, value: &str) -> String {
    format!(
        r#"{{"KV":{{"Verb":"lock","Key":"{key}","Value":"{value}","Flags":{flags},"Session":"{session}"}}}}"#
    )
}

/// A KV `unlock` operation (`value` base64).
fn unlock_op(key: &str, session: &str, flags: u64, value: &str) -> String {
    format!(
        r#"{{"KV":{{"Verb":"unlock","Key":"{key}","Value":"{value}","Flags":{flags},"Session":"{session}"}}}}"#
    )
}

/// `PUT /v1/txn` with one `lock`.
fn txn_lock(key: &str, session: &str, flags: u64, value: &str) -> Step {
    txn(&[lock_op(key, session, flags, value)])
}

type Response = http::Response<Vec<u8>>;

/// Where a script runs.
trait Side {
    fn exchange(&mut self, request: http::Request<Vec<u8>>) -> Response;
    /// Sends `request` without waiting for the reply.
    fn start(&mut self, request: http::Request<Vec<u8>>);
    /// The reply to the request [`Side::start`] sent, and how long after its start it came.
    fn join(&mut self) -> (Response, Duration);
    fn sleep(&mut self, d: Duration);
    /// Its clock: wall time on the agent, virtual time on the simulator.
    fn now(&self) -> Instant;
}

struct Real {
    transport: TestTransport,
    base: String,
    background: Option<std::thread::JoinHandle<(Response, Duration)>>,
}

impl Real {
    fn on(agent: &consul_lock_testkit::ConsulAgent) -> Real {
        Real {
            transport: TestTransport::new().unwrap(),
            base: agent.base_url(),
            background: None,
        }
    }
}

impl Simulated {
    /// A simulator set up as the agent of these tests is: indented JSON (`-dev`), and sessions
    /// expiring at exactly 2×TTL (Consul 1.8.7's timer).
    fn like_the_agent() -> Simulated {
        let config = SimConfig {
            pretty_json: true,
            ttl_expiry: TtlExpiry::TwiceTtl,
            ..SimConfig::default()
        };
        Simulated {
            consul: SimConsul::with_config(0x5eed, Instant::now(), config),
            now: Instant::now(),
            background: None,
            answered: BTreeMap::new(),
        }
    }
}

impl Side for Real {
    fn exchange(&mut self, request: http::Request<Vec<u8>>) -> Response {
        self.transport.exchange(request).expect("the agent answers")
    }

    fn start(&mut self, request: http::Request<Vec<u8>>) {
        let transport = TestTransport::new().unwrap();
        let started = Instant::now();
        let handle = std::thread::spawn(move || {
            let response = transport.exchange(request).expect("the agent answers");
            (response, started.elapsed())
        });
        assert!(
            self.background.replace(handle).is_none(),
            "one background request at a time"
        );
    }

    fn join(&mut self) -> (Response, Duration) {
        self.background
            .take()
            .expect("a background request")
            .join()
            .expect("the background request")
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

struct Simulated {
    consul: SimConsul,
    now: Instant,
    /// The background request: answered, or parked; and when it started.
    background: Option<(Result<Response, QueryId>, Instant)>,
    /// Parked reads answered while waiting for another.
    answered: BTreeMap<QueryId, Response>,
}

impl Simulated {
    /// Moves time on until `query` is answered.
    fn wait_for(&mut self, query: QueryId) -> Response {
        loop {
            for (q, r) in self.consul.advance(self.now) {
                self.answered.insert(q, r);
            }
            if let Some(r) = self.answered.remove(&query) {
                return r;
            }
            let next = self.consul.poll_timeout().expect("a parked read has a deadline");
            self.now = self.now.max(next);
        }
    }
}

impl Side for Simulated {
    fn exchange(&mut self, request: http::Request<Vec<u8>>) -> Response {
        match self.consul.handle(self.now, &request) {
            SimReply::Now(r) => r,
            SimReply::Parked(query) => self.wait_for(query),
        }
    }

    fn start(&mut self, request: http::Request<Vec<u8>>) {
        let started = match self.consul.handle(self.now, &request) {
            SimReply::Now(r) => Ok(r),
            SimReply::Parked(query) => Err(query),
        };
        assert!(
            self.background.replace((started, self.now)).is_none(),
            "one background request at a time"
        );
    }

    fn join(&mut self) -> (Response, Duration) {
        let (started, at) = self.background.take().expect("a background request");
        let response = match started {
            Ok(r) => r,
            Err(query) => self.wait_for(query),
        };
        (response, self.now - at)
    }

    fn sleep(&mut self, d: Duration) {
        self.now += d;
        self.consul.advance(self.now);
    }

    fn now(&self) -> Instant {
        self.now
    }
}

/// What one step gave, before normalisation.
#[derive(Debug)]
struct Raw {
    method: &'static str,
    path: String,
    status: u16,
    headers: BTreeMap<&'static str, String>,
    body: Vec<u8>,
    /// For a background request: whether it was answered within [`EARLY`].
    early: Option<bool>,
}

/// What a run gave: the replies and the sessions created.
struct Run {
    raws: Vec<Raw>,
    sessions: Vec<String>,
}

fn expand(template: &str, prefix: &str, sessions: &[String], mi: u64, index: u64) -> String {
    let mut out = template
        .replace("{P}", prefix)
        .replace("{MI-1}", &mi.saturating_sub(1).to_string())
        .replace("{MI}", &mi.to_string())
        .replace("{I}", &index.to_string());
    for (i, id) in sessions.iter().enumerate().rev() {
        out = out
            .replace(&format!("{{S{i}U}}"), &id.to_uppercase())
            .replace(&format!("{{S{i}}}"), id);
    }
    out
}

fn run(side: &mut dyn Side, base: &str, prefix: &str, steps: &[Step]) -> Run {
    let mut sessions: Vec<String> = Vec::new();
    let (mut mi, mut index) = (0, 0);
    let mut raws = Vec::new();
    let mut background: Option<(&'static str, String)> = None;
    // Replayed clients' views: the last index per (client, path), ModifyIndex per (client, key).
    let mut seen_index: BTreeMap<(usize, String), u64> = BTreeMap::new();
    let mut seen_modify: BTreeMap<(usize, String), u64> = BTreeMap::new();
    let mut replayed: Vec<(usize, String)> = Vec::new();
    for step in steps {
        let resolved;
        let step = match step {
            Step::Replay {
                client,
                method,
                path,
                body,
            } => {
                let bare = path.split('?').next().unwrap_or_default().to_owned();
                let key = expand(
                    bare.strip_prefix("/v1/kv/").unwrap_or_default(),
                    prefix,
                    &sessions,
                    0,
                    0,
                );
                let resolved_path = path
                    .replace(
                        "{IDX}",
                        &seen_index.get(&(*client, bare.clone())).unwrap_or(&0).to_string(),
                    )
                    .replace(
                        "{CAS}",
                        &seen_modify.get(&(*client, key)).unwrap_or(&0).to_string(),
                    );
                replayed.push((*client, bare));
                resolved = req(method, &resolved_path, body);
                &resolved
            }
            other => other,
        };
        let build = |method: &str, path: &str, body: &str| {
            let uri = expand(path, prefix, &sessions, mi, index);
            http::Request::builder()
                .method(method)
                .uri(format!("{base}{uri}"))
                .body(expand(body, prefix, &sessions, mi, index).into_bytes())
                .unwrap_or_else(|e| panic!("{method} {uri}: {e}"))
        };
        let (method, path, response, early) = match step {
            Step::Sleep(d) => {
                side.sleep(*d);
                continue;
            }
            Step::Start { method, path } => {
                side.start(build(method, path, ""));
                background = Some((*method, path.clone()));
                continue;
            }
            Step::Join => {
                let (method, path) = background.take().expect("a started request");
                let (response, took) = side.join();
                (method, path, response, Some(took < EARLY))
            }
            Step::Request { method, path, body } => (
                *method,
                path.clone(),
                side.exchange(build(method, path, body)),
                None,
            ),
            Step::Replay { .. } => unreachable!("resolved above"),
        };
        let json: Option<Value> = serde_json::from_slice(response.body()).ok();
        if let Some((client, bare)) = replayed.pop() {
            let got = response
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok()?.parse().ok());
            if let (Some(got), "GET") = (got, method) {
                seen_index.insert((client, bare), got);
            }
            let mut entries: Vec<&Value> = Vec::new();
            if let Some(list) = json.as_ref().and_then(Value::as_array) {
                entries.extend(list);
            }
            if let Some(results) = json.as_ref().and_then(|v| v.get("Results")?.as_array()) {
                entries.extend(results.iter().filter_map(|r| r.get("KV")));
            }
            for e in entries {
                if let (Some(k), Some(m)) = (e.get("Key").and_then(Value::as_str), e["ModifyIndex"].as_u64())
                {
                    seen_modify.insert((client, k.to_owned()), m);
                }
            }
        }
        if response.status() == 200 && path.starts_with("/v1/session/create") {
            if let Some(id) = json.as_ref().and_then(|v| v["ID"].as_str()) {
                sessions.push(id.to_owned());
            }
        }
        if let Some(first) = json.as_ref().and_then(|v| v.as_array()?.first()) {
            if first.get("Key").is_some() {
                mi = first["ModifyIndex"].as_u64().unwrap_or(mi);
            }
        }
        if let Some(written) = json.as_ref().and_then(|v| v.get("Results")?.get(0)?.get("KV")) {
            mi = written["ModifyIndex"].as_u64().unwrap_or(mi);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("?").to_owned())
        };
        if let Some(i) = header("X-Consul-Index").and_then(|v| v.parse().ok()) {
            index = i;
        }
        let mut headers = BTreeMap::new();
        for name in [
            "Content-Type",
            "Allow",
            "X-Consul-Index",
            "X-Consul-KnownLeader",
            "X-Consul-LastContact",
        ] {
            if let Some(v) = header(name) {
                headers.insert(name, v);
            }
        }
        raws.push(Raw {
            method,
            path: path.clone(),
            status: response.status().as_u16(),
            headers,
            body: response.body().clone(),
            early,
        });
    }
    // Leave nothing behind that could move the agent's tables during the next script.
    for id in &sessions {
        let request = http::Request::builder()
            .method("PUT")
            .uri(format!("{base}/v1/session/destroy/{id}"))
            .body(Vec::new())
            .unwrap();
        side.exchange(request);
    }
    Run { raws, sessions }
}

/// Whether the `X-Consul-Index` of this reply is tied to the script's own writes.
fn exact_index(raw: &Raw) -> bool {
    raw.method == "GET" && raw.path.starts_with("/v1/kv/") && raw.status == 200
}

fn collect_indexes(v: &Value, out: &mut Vec<u64>, ours: &dyn Fn(&Value) -> bool) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect_indexes(i, out, ours)),
        Value::Object(map) => {
            if ours(v) {
                for name in ["CreateIndex", "ModifyIndex"] {
                    if let Some(n) = map.get(name).and_then(Value::as_u64) {
                        out.push(n);
                    }
                }
            }
            map.values().for_each(|i| collect_indexes(i, out, ours));
        }
        _ => {}
    }
}

/// A session ID's placeholder, if it is one of the script's.
fn placeholder(s: &str, sessions: &[String]) -> Option<String> {
    sessions.iter().enumerate().find_map(|(i, id)| {
        if s == id {
            Some(format!("<S{i}>"))
        } else if s == id.to_uppercase() {
            Some(format!("<S{i}U>"))
        } else {
            None
        }
    })
}

/// `text` with the script's session IDs replaced by their placeholders.
fn replace_ids(text: &str, sessions: &[String]) -> String {
    let mut text = text.to_owned();
    for (i, id) in sessions.iter().enumerate() {
        text = text.replace(&id.to_uppercase(), &format!("<S{i}U>"));
        text = text.replace(id, &format!("<S{i}>"));
    }
    text
}

fn normalize_json(v: &Value, sessions: &[String], ranks: &BTreeMap<u64, usize>) -> Value {
    match v {
        Value::String(s) => {
            Value::String(placeholder(s, sessions).unwrap_or_else(|| replace_ids(s, sessions)))
        }
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(|i| normalize_json(i, sessions, ranks)).collect();
            // Session lists: the script's own sessions only, in placeholder order.
            if items.iter().all(|i| i.get("Behavior").is_some()) && !items.is_empty() {
                items.retain(|i| i["ID"].as_str().is_some_and(|id| id.starts_with("<S")));
                items.sort_by(|a, b| a["ID"].as_str().cmp(&b["ID"].as_str()));
            }
            // KV listings come in key order, and keys named by sessions sort by their random
            // IDs: in placeholder order instead.
            if items.iter().all(|i| i.get("Key").is_some()) {
                items.sort_by(|a, b| a["Key"].as_str().cmp(&b["Key"].as_str()));
            }
            // So does a queued lock's enqueue's `get-tree`, after the entry it wrote (its first
            // result). (A batch's results, in the order of its keys, sort alike on both sides.)
            if items.len() > 2 && items.iter().all(|i| i.get("KV").is_some()) {
                items[1..].sort_by(|a, b| a["KV"]["Key"].as_str().cmp(&b["KV"]["Key"].as_str()));
            }
            Value::Array(items)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("Node", _) => Value::String("<node>".to_owned()),
                        ("CreateIndex" | "ModifyIndex", Value::Number(n)) => Value::String(format!(
                            "#{}",
                            n.as_u64().and_then(|n| ranks.get(&n)).unwrap_or(&999)
                        )),
                        // A semaphore's `.lock` names sessions inside its base64 value.
                        ("Value", Value::String(b64)) => match base64_text(b64) {
                            Some(text) if sessions.iter().any(|id| text.contains(id.as_str())) => {
                                Value::String(format!("base64 of {}", replace_ids(&text, sessions)))
                            }
                            _ => v.clone(),
                        },
                        _ => normalize_json(v, sessions, ranks),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Standard base64 (padded) decoded to UTF-8 text, if it is that.
fn base64_text(b64: &str) -> Option<String> {
    String::from_utf8(consul_lock_testkit::sim::base64_decode(b64.as_bytes()).ok()?).ok()
}

/// The observable, normalised.
#[derive(Debug, PartialEq)]
struct Observed {
    status: u16,
    headers: BTreeMap<&'static str, String>,
    body: String,
    early: Option<bool>,
}

fn normalize(run: &Run) -> Vec<Observed> {
    let sessions = &run.sessions;
    let ours = |v: &Value| match v.get("ID").and_then(Value::as_str) {
        Some(id) => placeholder(id, sessions).is_some(),
        None => true,
    };
    let mut exact = Vec::new();
    for raw in &run.raws {
        if let Ok(v) = serde_json::from_slice::<Value>(&raw.body) {
            collect_indexes(&v, &mut exact, &ours);
        }
        if exact_index(raw) {
            if let Some(i) = raw.headers.get("X-Consul-Index").and_then(|v| v.parse().ok()) {
                exact.push(i);
            }
        }
    }
    exact.sort_unstable();
    exact.dedup();
    let ranks: BTreeMap<u64, usize> = exact.iter().enumerate().map(|(rank, i)| (*i, rank)).collect();
    run.raws
        .iter()
        .map(|raw| {
            let mut headers = raw.headers.clone();
            if let Some(i) = headers.get("X-Consul-Index").and_then(|v| v.parse::<u64>().ok()) {
                let normalized = if exact_index(raw) {
                    format!("#{}", ranks[&i])
                } else {
                    match (ranks.get(&i), exact.iter().rposition(|e| *e < i)) {
                        (Some(rank), _) => format!("=#{rank}"),
                        (None, Some(below)) => format!(">#{below}"),
                        (None, None) => "<#0".to_owned(),
                    }
                };
                headers.insert("X-Consul-Index", normalized);
            }
            let body = match serde_json::from_slice::<Value>(&raw.body) {
                Ok(v) => format!(
                    "{}{}",
                    normalize_json(&v, sessions, &ranks),
                    if raw.body.ends_with(b"\n") {
                        " (newline)"
                    } else {
                        ""
                    }
                ),
                Err(_) => {
                    let mut text = replace_ids(&String::from_utf8_lossy(&raw.body), sessions);
                    for what in ["Request decode failed: ", "Failed to parse body: "] {
                        if let Some(detail) = text.strip_prefix(what) {
                            if !detail.starts_with("json: cannot unmarshal")
                                && !detail.starts_with("time: ")
                                && !detail.starts_with("illegal base64")
                            {
                                text = format!("{what}<syntax>");
                            }
                        }
                    }
                    text
                }
            };
            Observed {
                status: raw.status,
                headers,
                body,
                early: raw.early,
            }
        })
        .collect()
}

/// With `SIM_DIFF_DUMP` set: what the agent answered, raw and normalised.
#[allow(clippy::print_stderr)]
fn dump(name: &str, run: &Run, observed: &[Observed]) {
    for (raw, obs) in run.raws.iter().zip(observed) {
        eprintln!(
            "{name}: {} {} -> {} {:?}\n    raw: {}\n    normalised: {obs:?}",
            raw.method,
            raw.path,
            raw.status,
            raw.headers,
            String::from_utf8_lossy(&raw.body).replace('\n', " ")
        );
    }
}

/// One script at a time: the agent's tables must move only with the running script.
static SERIAL: Mutex<()> = Mutex::new(());

fn differential(name: &str, steps: Vec<Step>) {
    let Some(agent) = require_agent() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let prefix = format!("diff/{name}-{}", std::process::id());

    let mut real = Real::on(agent);
    let base = real.base.clone();
    let real_run = run(&mut real, &base, &prefix, &steps);

    let mut sim = Simulated::like_the_agent();
    let sim_run = run(&mut sim, "http://sim.invalid", &prefix, &steps);

    let (real_obs, sim_obs) = (normalize(&real_run), normalize(&sim_run));
    if std::env::var_os("SIM_DIFF_DUMP").is_some() {
        dump(name, &real_run, &real_obs);
    }
    assert_eq!(real_obs.len(), sim_obs.len());
    let mismatches: Vec<String> = real_obs
        .iter()
        .zip(&sim_obs)
        .zip(&real_run.raws)
        .enumerate()
        .filter(|(_, ((r, s), _))| r != s)
        .map(|(i, ((r, s), raw))| {
            format!(
                "step {i}: {} {}\n  real: {r:?}\n  sim:  {s:?}\n  real raw body: {}",
                raw.method,
                raw.path,
                String::from_utf8_lossy(&raw.body)
            )
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "script {name}: the simulator and the agent disagree:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn acquire_and_read_back() {
    differential(
        "acquire_read_back",
        vec![
            create(r#"{"Name":"diff","TTL":"15s"}"#),
            put(
                &format!("/v1/kv/{{P}}/lock?acquire={{S0}}&flags={LOCK_FLAGS}"),
                "holder",
            ),
            get("/v1/kv/{P}/lock"),
            get("/v1/kv/{P}/lock?consistent"),
            get("/v1/kv/{P}/lock?stale"),
            get("/v1/session/info/{S0}"),
            put("/v1/session/renew/{S0}", ""),
            put(
                &format!("/v1/kv/{{P}}/lock?release={{S0}}&flags={LOCK_FLAGS}"),
                "",
            ),
            get("/v1/kv/{P}/lock"),
            put("/v1/session/destroy/{S0}", ""),
            get("/v1/session/info/{S0}"),
        ],
    );
}

#[test]
fn contention() {
    differential(
        "contention",
        vec![
            create(r#"{"TTL":"15s"}"#),
            create(r#"{"TTL":"15s"}"#),
            put("/v1/kv/{P}/lock?acquire={S0}", "zero"),
            put("/v1/kv/{P}/lock?acquire={S1}", "one"),
            get("/v1/kv/{P}/lock"),
            put("/v1/kv/{P}/lock?release={S1}", ""),
            put("/v1/kv/{P}/lock?release={S0}", ""),
            put("/v1/kv/{P}/lock?acquire={S1}", "one"),
            get("/v1/kv/{P}/lock"),
            put("/v1/kv/{P}/lock?acquire={S0}", "zero"),
            get("/v1/kv/{P}/lock"),
        ],
    );
}

#[test]
fn release_semantics() {
    differential(
        "release",
        vec![
            create("{}"),
            create("{}"),
            put("/v1/kv/{P}/missing?release={S0}", ""),
            get("/v1/kv/{P}/missing"),
            put("/v1/kv/{P}/plain", "p"),
            put("/v1/kv/{P}/plain?release={S0}", ""),
            put("/v1/kv/{P}/k?acquire={S0}&flags=1", "a"),
            put("/v1/kv/{P}/k?release={S1}", "x"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?release={S0}&flags=2", "b"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?release={S0}", "c"),
            put("/v1/kv/{P}/k?release=", ""),
            put("/v1/kv/{P}/k?release=garbage", ""),
            put(&format!("/v1/kv/{{P}}/k?release={UNKNOWN}"), ""),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn lock_index_progression() {
    differential(
        "lock_index",
        vec![
            create("{}"),
            create("{}"),
            put("/v1/kv/{P}/k?acquire={S0}", "v1"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S0}", "v2"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S0}", "v2"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?release={S0}", ""),
            put("/v1/kv/{P}/k?acquire={S0}", ""),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?flags=9", "plain while held"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S1}", ""),
            put("/v1/kv/{P}/k?release={S0}", ""),
            put("/v1/kv/{P}/k?acquire={S1}", ""),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?cas={MI}", "cas while held"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S1}", "again"),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn cas_put_and_delete() {
    differential(
        "cas",
        vec![
            put("/v1/kv/{P}/c?cas=0", "a"),
            put("/v1/kv/{P}/c?cas=0", "b"),
            get("/v1/kv/{P}/c"),
            put("/v1/kv/{P}/c?cas={MI-1}", "stale"),
            put("/v1/kv/{P}/c?cas={MI}&flags=5", "c"),
            get("/v1/kv/{P}/c"),
            put("/v1/kv/{P}/missing?cas=7", "x"),
            get("/v1/kv/{P}/missing"),
            del("/v1/kv/{P}/c?cas=1"),
            del("/v1/kv/{P}/c?cas=0"),
            del("/v1/kv/{P}/c?cas={MI}"),
            get("/v1/kv/{P}/c"),
            del("/v1/kv/{P}/never?cas=99"),
            put("/v1/kv/{P}/c?cas=abc", ""),
            del("/v1/kv/{P}/c?cas=1&recurse"),
            put("/v1/kv/{P}/same", "x"),
            get("/v1/kv/{P}/same"),
            put("/v1/kv/{P}/same", "x"),
            get("/v1/kv/{P}/same"),
            del("/v1/kv/{P}/same"),
            del("/v1/kv/{P}/same"),
            get("/v1/kv/{P}/same"),
        ],
    );
}

#[test]
fn missing_key_404() {
    differential(
        "missing",
        vec![
            get("/v1/kv/{P}/nope"),
            get("/v1/kv/{P}/nope?raw"),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/?keys"),
            put("/v1/kv/{P}/a", "1"),
            get("/v1/kv/{P}/nope"),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/a?raw"),
            del("/v1/kv/{P}/a"),
            get("/v1/kv/{P}/a"),
            get("/v1/kv/{P}/?recurse"),
        ],
    );
}

#[test]
fn renew_after_destroy_404() {
    differential(
        "renew_destroyed",
        vec![
            create(r#"{"TTL":"20s"}"#),
            put("/v1/session/renew/{S0}", ""),
            put("/v1/session/destroy/{S0}", ""),
            put("/v1/session/renew/{S0}", ""),
            put("/v1/session/destroy/{S0}", ""),
            get("/v1/session/info/{S0}"),
            put("/v1/session/renew/garbage", ""),
            put("/v1/session/renew/", ""),
            put(&format!("/v1/session/renew/{UNKNOWN}"), ""),
        ],
    );
}

#[test]
fn acquire_with_unknown_session_500() {
    differential(
        "unknown_session",
        vec![
            put(&format!("/v1/kv/{{P}}/k?acquire={UNKNOWN}"), ""),
            put("/v1/kv/{P}/k?acquire=garbage", ""),
            put("/v1/kv/{P}/k?acquire=", ""),
            put("/v1/kv/{P}/k?acquire=g1111111-2222-3333-4444-555555555555", ""),
            create("{}"),
            put("/v1/session/destroy/{S0}", ""),
            put("/v1/kv/{P}/k?acquire={S0}", ""),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn lock_delay_after_destroy() {
    differential(
        "lock_delay",
        vec![
            create(r#"{"TTL":"60s","LockDelay":"1s"}"#),
            create(r#"{"TTL":"60s"}"#),
            put("/v1/kv/{P}/k?acquire={S0}", "zero"),
            put("/v1/session/destroy/{S0}", ""),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S1}", "one"),
            put(&format!("/v1/kv/{{P}}/k?acquire={UNKNOWN}"), ""),
            put("/v1/kv/{P}/k?acquire=garbage", ""),
            put("/v1/kv/{P}/k?flags=1", "plain writes are not delayed"),
            get("/v1/kv/{P}/k"),
            sleep_ms(1500),
            put("/v1/kv/{P}/k?acquire={S1}", "one"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?release={S1}", ""),
            create(r#"{"LockDelay":"1s"}"#),
            put("/v1/kv/{P}/k?acquire={S2}", "two: no delay after a release"),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn session_info_of_unknown_ids() {
    differential(
        "session_info",
        vec![
            get(&format!("/v1/session/info/{UNKNOWN}")),
            get("/v1/session/info/garbage"),
            get("/v1/session/info/g1111111-2222-3333-4444-555555555555"),
            get("/v1/session/info/111111112-222-3333-4444-555555555555"),
            get("/v1/session/info/"),
            put(&format!("/v1/session/destroy/{UNKNOWN}"), ""),
            put("/v1/session/destroy/garbage", ""),
            get("/v1/session/list?stale&consistent"),
            create(r#"{"Name":"listed"}"#),
            get("/v1/session/info/{S0U}"),
            get("/v1/session/list"),
        ],
    );
}

#[test]
fn flags_round_trip() {
    differential(
        "flags",
        vec![
            put("/v1/kv/{P}/f?flags=42", "v"),
            get("/v1/kv/{P}/f"),
            put("/v1/kv/{P}/f?flags=18446744073709551615", "max"),
            get("/v1/kv/{P}/f"),
            put("/v1/kv/{P}/f?flags=18446744073709551616", ""),
            put("/v1/kv/{P}/f?flags=abc", ""),
            put("/v1/kv/{P}/f?flags=", ""),
            put("/v1/kv/{P}/f?flags=%2B5", ""),
            create("{}"),
            put(
                &format!("/v1/kv/{{P}}/f?acquire={{S0}}&flags={LOCK_FLAGS}"),
                "locked",
            ),
            get("/v1/kv/{P}/f"),
            put("/v1/kv/{P}/f?release={S0}", ""),
            get("/v1/kv/{P}/f"),
            put("/v1/kv/{P}/f", "no flags"),
            get("/v1/kv/{P}/f"),
        ],
    );
}

#[test]
fn recurse_list() {
    differential(
        "recurse",
        vec![
            put("/v1/kv/{P}/a", "1"),
            put("/v1/kv/{P}/b/c", "2"),
            put("/v1/kv/{P}/b/d", "3"),
            put("/v1/kv/{P}x", "sibling"),
            get("/v1/kv/{P}?recurse"),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/?keys"),
            get("/v1/kv/{P}/?keys&separator=/"),
            get("/v1/kv/{P}?keys&separator=/"),
            del("/v1/kv/{P}/b/c"),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/b/?recurse"),
            del("/v1/kv/{P}/b/?recurse"),
            get("/v1/kv/{P}/b/?recurse"),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/a?recurse=false"),
        ],
    );
}

#[test]
fn namespaces_and_query_errors() {
    differential(
        "ns",
        vec![
            get("/v1/kv/{P}/k?ns=x"),
            put("/v1/kv/{P}/k?ns=x", ""),
            del("/v1/kv/{P}/k?ns=x"),
            put("/v1/session/create?ns=x", "{}"),
            get("/v1/session/list?ns=x"),
            get("/v1/kv/{P}/k?ns="),
            get("/v1/kv/{P}/k?partition=x"),
            get("/v1/kv/{P}/k?ns=x&dc=dc2"),
            get("/v1/kv/{P}/k?dc=dc2"),
            put("/v1/kv/{P}/k?dc=dc2", ""),
            put("/v1/session/create?dc=dc2", "{}"),
            get(&format!("/v1/session/info/{UNKNOWN}?dc=dc2")),
            get("/v1/kv/{P}/k?dc=dc1"),
            get("/v1/kv/{P}/k?stale&consistent"),
            get("/v1/kv/{P}/k?cached&consistent"),
            get("/v1/kv/{P}/k?wait=5"),
            get("/v1/kv/{P}/k?index=x"),
            get("/v1/kv/{P}/k?max_stale=x"),
            put("/v1/kv/{P}/k?wait=x", ""),
            put(&format!("/v1/kv/{{P}}/k?cas=1&acquire={UNKNOWN}"), ""),
            req("POST", "/v1/kv/{P}/k", ""),
            req("OPTIONS", "/v1/kv/{P}/k", ""),
            get("/v1/session/create"),
            get("/v1/kv/"),
            put("/v1/kv/", ""),
            get("/v1/kv/{P}/k?x=%zz"),
            get("/v1/no/such/endpoint"),
        ],
    );
}

#[test]
fn session_create_validation() {
    differential(
        "session_validation",
        vec![
            create(r#"{"TTL":"5s"}"#),
            create(r#"{"TTL":"86401s"}"#),
            create(r#"{"TTL":"abc"}"#),
            create(r#"{"TTL":" 15s"}"#),
            create(r#"{"TTL":"-10s"}"#),
            create(r#"{"Behavior":"bogus"}"#),
            create(r#"{"Behavior":"Delete"}"#),
            create(r#"{"Checks":["nope"]}"#),
            create(r#"{"Node":"elsewhere"}"#),
            create(r#"{"Node":""}"#),
            create(r#"{"TTL":15}"#),
            create(r#"{"Name":5}"#),
            create(r#"{"LockDelay":"abc"}"#),
            create("[]"),
            create("garbage"),
            create(r#"{"TTL":"0s"}"#),
            get("/v1/session/info/{S0}"),
        ],
    );
}

#[test]
fn session_create_formats() {
    differential(
        "session_formats",
        vec![
            create(r#"{"Name":"a","TTL":"15000ms","LockDelay":15}"#),
            get("/v1/session/info/{S0}"),
            create(r#"{"LockDelay":"0s","Behavior":"delete","Checks":[]}"#),
            get("/v1/session/info/{S1}"),
            create(r#"{"lockdelay":"500ns","ttl":"1m","NodeChecks":null}"#),
            get("/v1/session/info/{S2}"),
            create(r#"{"Checks":["serfHealth","serfHealth"]}"#),
            get("/v1/session/info/{S3}"),
            create(r#"{"LockDelay":1.5,"NodeChecks":[]}"#),
            get("/v1/session/info/{S4}"),
            create(r#"{"LockDelay":-1}"#),
            get("/v1/session/info/{S5}"),
            create(r#"{"LockDelay":true,"Name":"a\u2028<>&\u00e9"}"#),
            get("/v1/session/info/{S6}"),
            create(""),
            get("/v1/session/info/{S7}"),
            create("null"),
            create(r#"{"TTL":"10s"} trailing"#),
            get("/v1/session/info/{S9}"),
            get("/v1/session/list"),
            put("/v1/session/renew/{S0}", ""),
        ],
    );
}

#[test]
fn blocking_reads() {
    differential(
        "blocking",
        vec![
            put("/v1/kv/{P}/k", "1"),
            get("/v1/kv/{P}/k"),
            get("/v1/kv/{P}/k?index={I}&wait=1s"),
            get("/v1/kv/{P}/k?index=1&wait=10s"),
            get("/v1/kv/{P}/k?index=0&wait=10s"),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/?recurse&index={I}&wait=500ms"),
            create("{}"),
            get("/v1/session/info/{S0}"),
            get("/v1/session/info/{S0}?index={I}&wait=500ms"),
        ],
    );
}

#[test]
fn delete_behavior() {
    differential(
        "delete_behavior",
        vec![
            create(r#"{"Behavior":"delete","LockDelay":"0s"}"#),
            put("/v1/kv/{P}/a?acquire={S0}", "a"),
            put("/v1/kv/{P}/b?acquire={S0}", "b"),
            put("/v1/kv/{P}/c", "c"),
            get("/v1/kv/{P}/?recurse"),
            put("/v1/session/destroy/{S0}", ""),
            get("/v1/kv/{P}/?recurse"),
            get("/v1/kv/{P}/a"),
            create("{}"),
            put("/v1/kv/{P}/a?acquire={S1}", "again"),
            get("/v1/kv/{P}/a"),
        ],
    );
}

#[test]
fn uuid_spellings() {
    differential(
        "uuid_spelling",
        vec![
            create(r#"{"LockDelay":"0s"}"#),
            put("/v1/kv/{P}/k?acquire={S0U}", "upper"),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S0}", "lower"),
            put("/v1/kv/{P}/k?release={S0}", ""),
            get("/v1/session/info/{S0U}"),
            put("/v1/session/renew/{S0U}", ""),
            put("/v1/session/destroy/{S0U}", ""),
            get("/v1/kv/{P}/k"),
            get("/v1/session/info/{S0}"),
        ],
    );
}

/// `aGk=` ("hi") and `Ynll` ("bye"), as base64.
const HI: &str = "aGk=";
const BYE: &str = "Ynll";

#[test]
fn txn_lock_fresh_key_and_relock() {
    differential(
        "txn_relock",
        vec![
            create(r#"{"TTL":"15s"}"#),
            txn_lock("{P}/k", "{S0}", 1, HI),
            get("/v1/kv/{P}/k"),
            // The holder again, same value and flags: nothing changes, not even the ModifyIndex.
            txn_lock("{P}/k", "{S0}", 1, HI),
            get("/v1/kv/{P}/k"),
            // The holder with another value and flags: written, LockIndex kept.
            txn_lock("{P}/k", "{S0}", 2, BYE),
            get("/v1/kv/{P}/k"),
            txn_lock("{P}/k", "{S0}", 0, ""),
            get("/v1/kv/{P}/k"),
            // A key written without a session, then locked: LockIndex from 0 to 1.
            put("/v1/kv/{P}/plain?flags=7", "plain"),
            txn_lock("{P}/plain", "{S0}", 7, HI),
            get("/v1/kv/{P}/plain"),
            txn_lock("{P}/f", "{S0}", LOCK_FLAGS.parse().unwrap(), BYE),
            get("/v1/kv/{P}/f"),
            // The UUID in upper case is the same session but not the same holder.
            txn_lock("{P}/k", "{S0U}", 0, ""),
            txn_lock("{P}/u", "{S0U}", 0, ""),
            get("/v1/kv/{P}/u"),
            txn_lock("{P}/u", "{S0}", 0, ""),
        ],
    );
}

#[test]
fn txn_lock_contention_and_kv_release() {
    differential(
        "txn_contention",
        vec![
            create(r#"{"TTL":"15s"}"#),
            create(r#"{"TTL":"15s"}"#),
            txn_lock("{P}/k", "{S0}", 1, HI),
            txn_lock("{P}/k", "{S1}", 1, BYE),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?acquire={S1}", ""),
            put("/v1/kv/{P}/k?release={S1}", ""),
            put("/v1/kv/{P}/k?release={S0}&flags=3", "released"),
            get("/v1/kv/{P}/k"),
            txn_lock("{P}/k", "{S1}", 4, BYE),
            get("/v1/kv/{P}/k"),
            txn_lock("{P}/k", "{S0}", 1, HI),
            put("/v1/kv/{P}/k?acquire={S0}", ""),
            // An unlock in a transaction, then a lock by the other.
            txn(&[unlock_op("{P}/k", "{S0}", 0, "")]),
            txn(&[unlock_op("{P}/k", "{S1}", 5, HI)]),
            get("/v1/kv/{P}/k"),
            txn(&[unlock_op("{P}/k", "{S1}", 0, "")]),
            txn(&[unlock_op("{P}/missing", "{S1}", 0, "")]),
            txn(&[unlock_op("{P}/k", "", 0, "")]),
            txn_lock("{P}/k", "{S0}", 6, ""),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn txn_lock_delay_after_destroy() {
    differential(
        "txn_lock_delay",
        vec![
            create(r#"{"TTL":"60s","LockDelay":"1s"}"#),
            create(r#"{"TTL":"60s"}"#),
            txn_lock("{P}/k", "{S0}", 1, HI),
            put("/v1/session/destroy/{S0}", ""),
            get("/v1/kv/{P}/k"),
            txn_lock("{P}/k", "{S1}", 1, BYE),
            // The lock-delay is checked first, whatever the session.
            txn_lock("{P}/k", UNKNOWN, 1, BYE),
            txn_lock("{P}/k", "garbage", 1, BYE),
            txn_lock("{P}/k", "", 1, BYE),
            // Every operation is pre-checked: all the refusals are reported.
            txn(&[lock_op("", "{S1}", 0, ""), lock_op("{P}/k", "{S1}", 0, "")]),
            txn(&[
                lock_op("{P}/other", "{S1}", 0, ""),
                lock_op("{P}/k", "{S1}", 0, ""),
            ]),
            get("/v1/kv/{P}/other"),
            // An unlock is not delayed.
            txn(&[unlock_op("{P}/k", "{S1}", 0, "")]),
            put("/v1/kv/{P}/k?acquire={S1}", "kv acquire"),
            sleep_ms(1500),
            txn_lock("{P}/k", "{S1}", 2, BYE),
            get("/v1/kv/{P}/k"),
            put("/v1/kv/{P}/k?release={S1}", ""),
            create(r#"{"LockDelay":"1s"}"#),
            txn_lock("{P}/k", "{S2}", 3, HI),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn txn_lock_with_invalid_sessions() {
    differential(
        "txn_invalid_session",
        vec![
            txn_lock("{P}/k", UNKNOWN, 0, ""),
            txn_lock("{P}/k", "garbage", 0, ""),
            txn_lock("{P}/k", "g1111111-2222-3333-4444-555555555555", 0, ""),
            txn_lock("{P}/k", "", 0, ""),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":"{P}/k"}}]"#),
            get("/v1/kv/{P}/k"),
            create("{}"),
            put("/v1/session/destroy/{S0}", ""),
            txn_lock("{P}/k", "{S0}", 0, ""),
            get("/v1/kv/{P}/k"),
            create("{}"),
            txn_lock("{P}/k", "{S1}", 0, HI),
            txn_lock("{P}/k", UNKNOWN, 0, ""),
            get("/v1/kv/{P}/k"),
        ],
    );
}

#[test]
fn txn_several_operations_all_or_nothing() {
    differential(
        "txn_several",
        vec![
            create(r#"{"LockDelay":"0s"}"#),
            create(r#"{"LockDelay":"0s"}"#),
            txn(&[lock_op("{P}/a", "{S0}", 1, HI), lock_op("{P}/b", "{S0}", 2, BYE)]),
            get("/v1/kv/{P}/?recurse"),
            // The second fails: the first is undone.
            txn(&[lock_op("{P}/c", "{S1}", 0, ""), lock_op("{P}/a", "{S1}", 0, "")]),
            get("/v1/kv/{P}/c"),
            get("/v1/kv/{P}/?recurse"),
            // Each operation sees the earlier ones' writes; every error is reported.
            txn(&[lock_op("{P}/d", "{S0}", 0, ""), lock_op("{P}/d", "{S1}", 0, "")]),
            txn(&[
                lock_op("{P}/d", "garbage", 0, ""),
                lock_op("{P}/d", UNKNOWN, 0, ""),
            ]),
            txn(&[
                lock_op("{P}/e", "{S0}", 4, HI),
                unlock_op("{P}/e", "{S0}", 6, BYE),
            ]),
            get("/v1/kv/{P}/e"),
            // An unknown verb among writes fails in Raft.
            txn(&[
                lock_op("{P}/f", "{S0}", 0, ""),
                r#"{"KV":{"Verb":"bogus","Key":"{P}/f"}}"#.to_owned(),
            ]),
            get("/v1/kv/{P}/f"),
            // Operations without KV are dropped: OpIndex counts the others.
            txn(&[
                "{}".to_owned(),
                r#"{"KV":null}"#.to_owned(),
                lock_op("{P}/a", "{S1}", 0, ""),
            ]),
        ],
    );
}

#[test]
fn txn_body_and_request_errors() {
    let too_many: Vec<String> = (0..65)
        .map(|i| lock_op(&format!("{{P}}/m{i}"), UNKNOWN, 0, ""))
        .collect();
    differential(
        "txn_errors",
        vec![
            put("/v1/txn", "[]"),
            put("/v1/txn", "null"),
            put("/v1/txn", "[{}]"),
            put("/v1/txn", ""),
            put("/v1/txn", "garbage"),
            put("/v1/txn", "[{"),
            put("/v1/txn", "{}"),
            put("/v1/txn", r#"["x"]"#),
            put("/v1/txn", r#"[{"KV":"x"}]"#),
            put("/v1/txn", r#"[{"Node":5}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":"bogus","Key":"{P}/a"}}]"#),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"bogus","Key":"{P}/a"}},{"KV":{"Verb":"","Key":"{P}/b"}}]"#,
            ),
            put("/v1/txn", r#"[{"KV":{"Verb":"bogus"}}]"#),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Value":"!!"}}]"#,
            ),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Value":"aGk"}}]"#,
            ),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Value":"aGk=x"}}]"#,
            ),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Value":"aG="}}]"#,
            ),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Value":1}}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Flags":"1"}}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Flags":-1}}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Flags":1.5}}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":5}}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":5}}]"#),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Session":true}}]"#,
            ),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":"{P}/a","Index":"x"}}]"#),
            put("/v1/txn", r#"[{"KV":{"Verb":"lock","Key":""}}]"#),
            txn(&too_many),
            req("GET", "/v1/txn", ""),
            req("POST", "/v1/txn", "[]"),
            req("OPTIONS", "/v1/txn", ""),
            put("/v1/txn/", "[]"),
            put("/v1/txn?stale&consistent", "[]"),
            put("/v1/txn?wait=x", "[]"),
            put("/v1/txn?index=x", "[]"),
            put("/v1/txn?stale", "[]"),
            put("/v1/txn?dc=dc2", "[]"),
            put("/v1/txn?dc=dc2", "garbage"),
            put("/v1/txn?ns=x", "[]"),
            // A write reads only `dc` from the query.
            put(
                "/v1/txn?stale&consistent&wait=x",
                &format!("[{}]", lock_op("{P}/a", UNKNOWN, 0, "")),
            ),
            put(
                "/v1/txn?dc=dc2",
                &format!("[{}]", lock_op("{P}/a", UNKNOWN, 0, "")),
            ),
            // Go's decoder: names in any case, trailing data ignored, null values ignored.
            create("{}"),
            put(
                "/v1/txn",
                r#"[{"kv":{"verb":"lock","key":"{P}/lc","session":"{S0}","flags":3,"value":"aGk="}}] trailing"#,
            ),
            put(
                "/v1/txn",
                r#"[{"KV":{"Verb":"lock","Key":"{P}/n","Session":"{S0}","Flags":null,"Value":null}}]"#,
            ),
            get("/v1/kv/{P}/?recurse"),
        ],
    );
}

#[test]
fn txn_lock_wakes_a_blocking_read() {
    differential(
        "txn_wakes",
        vec![
            create(r#"{"LockDelay":"0s"}"#),
            put("/v1/kv/{P}/k", "v"),
            get("/v1/kv/{P}/k"),
            start_get("/v1/kv/{P}/k?index={I}&wait=10s"),
            sleep_ms(300),
            txn_lock("{P}/k", "{S0}", 1, HI),
            Step::Join,
            // A refused lock does not wake it: it returns at the end of its wait.
            create(r#"{"LockDelay":"0s"}"#),
            start_get("/v1/kv/{P}/k?index={I}&wait=1s"),
            sleep_ms(300),
            txn_lock("{P}/k", "{S1}", 2, BYE),
            Step::Join,
            // A re-lock that changes nothing does not either.
            start_get("/v1/kv/{P}/k?index={I}&wait=1s"),
            sleep_ms(300),
            txn_lock("{P}/k", "{S0}", 1, HI),
            Step::Join,
            // A missing key's read, woken when a lock creates it.
            get("/v1/kv/{P}/new"),
            start_get("/v1/kv/{P}/?recurse&index={I}&wait=10s"),
            sleep_ms(300),
            txn_lock("{P}/new", "{S1}", 0, ""),
            Step::Join,
            // An unlock in a transaction wakes the holder's watch too.
            get("/v1/kv/{P}/k"),
            start_get("/v1/kv/{P}/k?index={I}&wait=10s"),
            sleep_ms(300),
            txn(&[unlock_op("{P}/k", "{S0}", 0, "")]),
            Step::Join,
        ],
    );
}

// ================================================================================================
// The machines' own request sequences
// ================================================================================================

/// The key prefix of the recorded runs, replaced by the script's `{P}`.
const RECORDED: &str = "recorded-prefix";
/// The wait of every replayed blocking read. Replayed one request at a time, a read that a
/// later request would have woken runs out its wait instead; both sides see the same sequence,
/// so they must still agree (long waits and wake-ups are the scripts' business above).
const REPLAY_WAIT: &str = "100ms";

/// What the machines sent in a harness run, as a script of [`Step::Replay`]s: the run's prefix
/// and sessions become `{P}` and `{S0}`…, a blocking read's index `{IDX}` and its wait
/// [`REPLAY_WAIT`], a check-and-set's index `{CAS}`.
fn replay_script(arrivals: &[Arrival]) -> Vec<Step> {
    let sessions: Vec<&str> = arrivals.iter().filter_map(|a| a.created.as_deref()).collect();
    let template = |text: &str| {
        let mut text = text.replace(RECORDED, "{P}");
        for (i, id) in sessions.iter().enumerate() {
            text = text.replace(id, &format!("{{S{i}}}"));
        }
        text
    };
    arrivals
        .iter()
        .map(|a| {
            let uri = template(&a.uri);
            let (path, query) = uri.split_once('?').unwrap_or((&uri, ""));
            let params: Vec<String> = query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some(("index", _)) => "index={IDX}".to_owned(),
                    Some(("wait", _)) => format!("wait={REPLAY_WAIT}"),
                    Some(("cas", n)) if n != "0" => "cas={CAS}".to_owned(),
                    _ => p.to_owned(),
                })
                .collect();
            let path = if params.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", params.join("&"))
            };
            let method = match a.method.as_str() {
                "GET" => "GET",
                "PUT" => "PUT",
                "DELETE" => "DELETE",
                other => panic!("a machine sent {other}"),
            };
            Step::Replay {
                client: a.client,
                method,
                path,
                body: template(&String::from_utf8_lossy(&a.body)),
            }
        })
        .collect()
}

/// Generated scenarios without faults, of `seconds`, with lock-delays of 0 or the default 15 s
/// only: a replay runs in wall time on the agent and in virtual time on the simulator, so a
/// lock-delay of a second or two could end on one side and not on the other.
fn recorded_scenarios(target: &str, seconds: u64, how_many: usize) -> Vec<(Scenario, Target)> {
    let shape = Shape {
        duration: Duration::from_secs(seconds),
        fault_window: Duration::from_secs(1),
        max_faults: 0,
    };
    let mut runner = TestRunner::deterministic();
    let strategy = match target {
        "lock" => mixed_lock_scenario(&format!("{RECORDED}/.lock"), shape)
            .prop_map(|s| (s, Target::Lock))
            .boxed(),
        _ => semaphore_scenario(RECORDED, shape).boxed(),
    };
    (0..how_many)
        .map(|_| {
            let (mut scenario, target) = strategy.new_tree(&mut runner).unwrap().current();
            for c in &mut scenario.clients {
                c.lock_delay = c.lock_delay.filter(|d| d.is_zero());
            }
            (scenario, target)
        })
        .collect()
}

fn replay_recorded(kind: &str) {
    for (n, (scenario, target)) in recorded_scenarios(kind, 20, 3).into_iter().enumerate() {
        let (outcome, arrivals) = run_recorded(&scenario, target);
        outcome.assert_clean();
        assert!(
            arrivals
                .iter()
                .any(|a| a.uri.contains("acquire=") || a.uri == "/v1/txn"),
            "the recorded run contended: {scenario:?}"
        );
        differential(&format!("recorded_{kind}_{n}"), replay_script(&arrivals));
    }
}

/// What lock machines sent in generated harness runs (contention, queued and not, try-once,
/// cancels), replayed
/// against the agent and the simulator: they answer alike.
#[test]
fn recorded_lock_runs() {
    replay_recorded("lock");
}

/// The same for semaphore machines (contender keys, the `.lock`'s check-and-set, prefix reads).
#[test]
fn recorded_semaphore_runs() {
    replay_recorded("semaphore");
}

// ================================================================================================
// Timing: session invalidation and lock-delay
// ================================================================================================

/// How often the timing probes look.
const PROBE: Duration = Duration::from_millis(100);

fn request(method: &str, uri: &str, body: &str) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method(method)
        .uri(uri)
        .body(body.as_bytes().to_vec())
        .unwrap()
}

fn created_id(response: &Response) -> String {
    let v: Value = serde_json::from_slice(response.body()).unwrap();
    v["ID"].as_str().unwrap().to_owned()
}

/// On `side`: how long after its create a TTL session that is never renewed is gone, and how
/// long after a holder's destroy its key's lock-delay refuses another session; probed every
/// [`PROBE`] (wall time on the agent, virtual time on the simulator).
fn invalidation_and_lock_delay(
    side: &mut dyn Side,
    base: &str,
    prefix: &str,
    ttl: u64,
    delay: u64,
) -> (Duration, Duration) {
    let body = format!(r#"{{"TTL":"{ttl}s","LockDelay":"{delay}s"}}"#);
    // Its TTL counts from its create, a little before `start`: that only makes the measure of
    // its invalidation shorter, never longer.
    let holder = created_id(&side.exchange(request("PUT", &format!("{base}/v1/session/create"), &body)));
    let other = created_id(&side.exchange(request(
        "PUT",
        &format!("{base}/v1/session/create"),
        r#"{"TTL":"60s"}"#,
    )));
    let key = format!("{base}/v1/kv/{prefix}/timing");
    let took = side.exchange(request("PUT", &format!("{key}?acquire={holder}"), "x"));
    assert_eq!(took.body().trim_ascii(), b"true");
    // Lock-delay: the holder's session destroyed while it holds the key.
    let dying = created_id(&side.exchange(request("PUT", &format!("{base}/v1/session/create"), &body)));
    let key2 = format!("{base}/v1/kv/{prefix}/delayed");
    side.exchange(request("PUT", &format!("{key2}?acquire={dying}"), "x"));
    side.exchange(request("PUT", &format!("{base}/v1/session/destroy/{dying}"), ""));
    let start = side.now();
    let mut waited = Duration::ZERO;
    let mut lock_delay = None;
    let mut invalidated = None;
    let renew_other = format!("{base}/v1/session/renew/{other}");
    while invalidated.is_none() || lock_delay.is_none() {
        assert!(
            waited < Duration::from_secs(4 * ttl + 4 * delay),
            "neither came in time"
        );
        side.sleep(PROBE);
        waited = side.now() - start;
        side.exchange(request("PUT", &renew_other, ""));
        if lock_delay.is_none() {
            let r = side.exchange(request("PUT", &format!("{key2}?acquire={other}"), "y"));
            if r.body().trim_ascii() == b"true" {
                lock_delay = Some(waited);
            }
        }
        if invalidated.is_none() {
            let r = side.exchange(request("GET", &format!("{base}/v1/session/info/{holder}"), ""));
            let gone = serde_json::from_slice::<Value>(r.body())
                .map(|v| v.as_array().is_none_or(Vec::is_empty))
                .unwrap_or(false);
            if gone {
                invalidated = Some(waited);
            }
        }
    }
    side.exchange(request("PUT", &format!("{base}/v1/session/destroy/{other}"), ""));
    (invalidated.unwrap(), lock_delay.unwrap())
}

/// A 10 s session that is never renewed goes between TTL and 2×TTL (Consul 1.8.7: at 2×TTL, and
/// so does the simulator set up as the differential tests set it up), and a 2 s lock-delay
/// refuses other sessions for 2 s: on the agent, in wall time, and on the simulator, in virtual
/// time, measured the same way. The bounds' slack above is the probe's period plus the agent's
/// own timer and the machine's scheduling; below there is none: a session gone before its TTL,
/// or a key free before its lock-delay ends, breaks what a lock relies on.
#[test]
#[allow(clippy::print_stdout)] // the figures, for `--nocapture`
fn session_invalidation_and_lock_delay_timing_agree() {
    let Some(agent) = consul_lock_testkit::agent::require_new_agent() else {
        return;
    };
    let (ttl, delay) = (10, 2);
    let mut real = Real::on(&agent);
    let base = real.base.clone();
    let (real_ttl, real_delay) = invalidation_and_lock_delay(&mut real, &base, "timing", ttl, delay);
    let mut sim = Simulated::like_the_agent();
    let (sim_ttl, sim_delay) =
        invalidation_and_lock_delay(&mut sim, "http://sim.invalid", "timing", ttl, delay);
    let (ttl, delay) = (Duration::from_secs(ttl), Duration::from_secs(delay));
    let slack = Duration::from_secs(2);
    for (side, invalidated, delayed) in [("agent", real_ttl, real_delay), ("simulator", sim_ttl, sim_delay)] {
        assert!(
            invalidated >= ttl && invalidated <= 2 * ttl + slack,
            "{side}: a {ttl:?} session went after {invalidated:?}"
        );
        assert!(
            delayed >= delay && delayed <= delay + slack,
            "{side}: a {delay:?} lock-delay ended after {delayed:?}"
        );
    }
    // Consul 1.8.7 expires at 2×TTL; the simulator as configured does too.
    let gap = real_ttl.abs_diff(sim_ttl);
    assert!(
        gap <= slack,
        "invalidation: the agent after {real_ttl:?}, the simulator after {sim_ttl:?}"
    );
    println!(
        "invalidation of a {ttl:?} session: agent {real_ttl:?}, simulator {sim_ttl:?}; {delay:?} lock-delay: agent {real_delay:?}, simulator {sim_delay:?}"
    );
}
