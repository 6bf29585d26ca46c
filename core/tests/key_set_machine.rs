//! The key set machine driven by hand against a small fake of Consul's KV store, sessions and
//! transaction endpoint (all or nothing, every refused operation named, as Consul 1.8.7), in
//! virtual time: acquiring many keys in batches, partly refused batches, releases, an
//! operator's delete or overwrite of one key, the session's invalidation, failing and unanswered
//! requests, and bad input.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use consul_lock_core::api::{ClientConfig, KeyError, MAX_TXN_OPS, SessionId};
use consul_lock_core::machine::{
    Action, KeySetError, KeySetEvent, KeySetMachine, KeySetOptions, KeyStatus, LOCK_FLAG_VALUE, LockError,
    LossReason, OptionsError, Refusal, Reply, SessionChoice, Transmit, TransportError, TransportErrorKind,
};

#[derive(Clone, Debug)]
struct Entry {
    flags: u64,
    session: Option<String>,
    lock_index: u64,
    create_index: u64,
    modify_index: u64,
}

/// A fake Consul: KV entries, live sessions, lock-delays, one index for everything.
#[derive(Default)]
struct Store {
    index: u64,
    kv: BTreeMap<String, Entry>,
    sessions: Vec<String>,
    next_session: u32,
    lock_delay: BTreeMap<String, ()>,
    /// The index of the last delete (a tombstone's, which a listing's index counts).
    deleted_index: u64,
    /// The index of the last change to sessions.
    session_index: u64,
    /// Every transaction's operation count, in order.
    txn_sizes: Vec<usize>,
}

fn reply(status: u16, index: Option<u64>, body: impl Into<Vec<u8>>) -> Reply {
    let mut b = http::Response::builder().status(status);
    if let Some(i) = index {
        b = b
            .header("X-Consul-Index", i.to_string())
            .header("X-Consul-KnownLeader", "true");
    }
    Ok(b.body(body.into()).unwrap())
}

fn query(t: &Transmit) -> BTreeMap<String, String> {
    t.request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

impl Store {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn entry_json(key: &str, e: &Entry) -> serde_json::Value {
        let mut o = serde_json::json!({
            "Key": key, "Flags": e.flags, "LockIndex": e.lock_index,
            "CreateIndex": e.create_index, "ModifyIndex": e.modify_index, "Value": null,
        });
        if let Some(s) = &e.session {
            o["Session"] = s.clone().into();
        }
        o
    }

    /// The index a blocking read on `path` would wait on.
    fn read_index(&self, path: &str) -> u64 {
        if let Some(prefix) = path.strip_prefix("/v1/kv/") {
            let prefix = percent(prefix);
            self.kv
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, e)| e.modify_index)
                .max()
                .unwrap_or(1)
                .max(self.deleted_index)
        } else {
            self.session_index
        }
    }

    /// Answers `t`, or `None` for a blocking read with nothing new.
    fn serve(&mut self, t: &Transmit) -> Option<Reply> {
        let path = t.request.uri().path().to_owned();
        let q = query(t);
        let method = t.request.method().as_str().to_owned();
        if let Some(index) = q.get("index").and_then(|i| i.parse::<u64>().ok()) {
            if self.read_index(&path) <= index {
                return None;
            }
        }
        Some(match (method.as_str(), path.as_str()) {
            ("PUT", "/v1/session/create") => {
                self.next_session += 1;
                let id = format!("s{}", self.next_session);
                self.sessions.push(id.clone());
                self.session_index = self.bump();
                reply(200, None, serde_json::json!({ "ID": id }).to_string())
            }
            ("PUT", p) if p.starts_with("/v1/session/renew/") => {
                let id = &p["/v1/session/renew/".len()..];
                if self.sessions.iter().any(|s| s == id) {
                    let body = serde_json::json!([{ "ID": id, "TTL": "15s", "Behavior": "release" }]);
                    reply(200, None, body.to_string())
                } else {
                    reply(404, None, "not found")
                }
            }
            ("PUT", p) if p.starts_with("/v1/session/destroy/") => {
                let id = p["/v1/session/destroy/".len()..].to_owned();
                self.invalidate(&id);
                reply(200, None, "true")
            }
            ("GET", p) if p.starts_with("/v1/session/info/") => {
                let id = &p["/v1/session/info/".len()..];
                let index = Some(self.session_index.max(1));
                if self.sessions.iter().any(|s| s == id) {
                    let body = serde_json::json!([{ "ID": id, "TTL": "15s", "Behavior": "release" }]);
                    reply(200, index, body.to_string())
                } else {
                    reply(200, index, "null")
                }
            }
            ("GET", p) if p.starts_with("/v1/kv/") => {
                let prefix = percent(&p["/v1/kv/".len()..]);
                let index = Some(self.read_index(p));
                let found: Vec<serde_json::Value> = self
                    .kv
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, e)| Store::entry_json(k, e))
                    .collect();
                if found.is_empty() {
                    reply(404, index, Vec::new())
                } else {
                    reply(200, index, serde_json::Value::Array(found).to_string())
                }
            }
            ("PUT", "/v1/txn") => self.txn(t),
            other => panic!("unexpected request {other:?}"),
        })
    }

    fn txn(&mut self, t: &Transmit) -> Reply {
        let ops: Vec<serde_json::Value> = serde_json::from_slice(t.request.body()).unwrap();
        self.txn_sizes.push(ops.len());
        if ops.len() > MAX_TXN_OPS {
            return reply(413, None, "too many operations");
        }
        let mut errors = Vec::new();
        let before = self.kv.clone();
        let index = self.index + 1;
        let mut results = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let kv = &op["KV"];
            let key = kv["Key"].as_str().unwrap().to_owned();
            let session = kv["Session"].as_str().unwrap().to_owned();
            let flags = kv["Flags"].as_u64().unwrap();
            assert!(
                base64::engine::general_purpose::STANDARD
                    .decode(kv["Value"].as_str().unwrap())
                    .is_ok()
            );
            if !self.sessions.contains(&session) {
                errors.push((i, format!("invalid session \"{session}\"")));
                continue;
            }
            match kv["Verb"].as_str().unwrap() {
                "lock" => {
                    if self.lock_delay.contains_key(&key) {
                        errors.push((i, format!("failed to lock key \"{key}\" due to lock delay")));
                        continue;
                    }
                    let e = self.kv.entry(key.clone()).or_insert(Entry {
                        flags,
                        session: None,
                        lock_index: 0,
                        create_index: index,
                        modify_index: index,
                    });
                    match &e.session {
                        Some(s) if *s == session => {}
                        Some(_) => {
                            errors.push((i, format!("failed to lock key \"{key}\", lock is already held")));
                            continue;
                        }
                        None => {
                            e.session = Some(session);
                            e.lock_index += 1;
                            e.flags = flags;
                            e.modify_index = index;
                        }
                    }
                    results.push(serde_json::json!({ "KV": Store::entry_json(&key, e) }));
                }
                "unlock" => match self.kv.get_mut(&key) {
                    Some(e) if e.session.as_deref() == Some(session.as_str()) => {
                        e.session = None;
                        e.flags = flags;
                        e.modify_index = index;
                        results.push(serde_json::json!({ "KV": Store::entry_json(&key, e) }));
                    }
                    _ => errors.push((
                        i,
                        format!(
                            "failed to unlock key \"{key}\", lock isn't held, or is held by another session"
                        ),
                    )),
                },
                verb => panic!("verb {verb}"),
            }
        }
        if !errors.is_empty() {
            self.kv = before;
            let errors: Vec<serde_json::Value> = errors
                .into_iter()
                .map(|(i, what)| serde_json::json!({ "OpIndex": i, "What": what }))
                .collect();
            return reply(
                409,
                None,
                serde_json::json!({ "Results": null, "Errors": errors }).to_string(),
            );
        }
        self.bump();
        reply(
            200,
            None,
            serde_json::json!({ "Results": results, "Errors": null }).to_string(),
        )
    }

    /// The session is gone (destroyed, or expired): its keys are released.
    fn invalidate(&mut self, id: &str) {
        self.sessions.retain(|s| s != id);
        let index = self.bump();
        self.session_index = index;
        for e in self.kv.values_mut() {
            if e.session.as_deref() == Some(id) {
                e.session = None;
                e.modify_index = index;
            }
        }
    }

    /// An operator deletes `key`.
    fn delete(&mut self, key: &str) {
        self.kv.remove(key);
        self.deleted_index = self.bump();
    }

    /// An operator writes `key` with `flags`, keeping its session (as Consul's plain PUT does).
    fn overwrite(&mut self, key: &str, flags: u64) {
        let index = self.bump();
        let e = self.kv.get_mut(key).unwrap();
        e.flags = flags;
        e.modify_index = index;
    }

    /// A plain key written by someone else.
    fn put(&mut self, key: &str, flags: u64, session: Option<&str>) {
        let index = self.bump();
        self.kv.insert(
            key.to_owned(),
            Entry {
                flags,
                session: session.map(str::to_owned),
                lock_index: u64::from(session.is_some()),
                create_index: index,
                modify_index: index,
            },
        );
    }
}

/// Percent-decoding of what the machine sends in paths (keys here are plain ASCII).
fn percent(s: &str) -> String {
    s.replace("%2F", "/")
}

/// The machine, the fake, virtual time and the requests outstanding.
struct Rig {
    m: KeySetMachine,
    store: Store,
    now: Instant,
    outstanding: Vec<Transmit>,
    events: Vec<KeySetEvent>,
    /// Requests whose path starts with the first are answered with the second, once, instead of
    /// by the store.
    faults: Vec<(String, Reply)>,
    /// Requests matching this are never answered (left to their deadline).
    hang: Option<String>,
}

impl Rig {
    fn new(options: KeySetOptions) -> Rig {
        let config = ClientConfig::http("127.0.0.1:8500").unwrap();
        Rig {
            m: KeySetMachine::new(config, options).unwrap(),
            store: Store {
                index: 10,
                ..Store::default()
            },
            now: Instant::now(),
            outstanding: Vec::new(),
            events: Vec::new(),
            faults: Vec::new(),
            hang: None,
        }
    }

    fn default() -> Rig {
        Rig::new(KeySetOptions::new())
    }

    fn drain(&mut self) {
        while let Some(action) = self.m.poll_action() {
            match action {
                Action::Send(t) => self.outstanding.push(t),
                Action::Event(e) => self.events.push(e),
            }
        }
    }

    /// Answers whatever can be answered, until nothing changes; returns how many requests went
    /// out meanwhile.
    fn settle(&mut self) -> usize {
        let mut sent = 0;
        loop {
            self.drain();
            let mut progressed = false;
            let outstanding = std::mem::take(&mut self.outstanding);
            sent += outstanding.len();
            for t in outstanding {
                let path = t.request.uri().path().to_owned();
                if self.hang.as_ref().is_some_and(|h| path.starts_with(h.as_str())) {
                    self.outstanding.push(t);
                    continue;
                }
                let fault = self.faults.iter().position(|(p, _)| path.starts_with(p.as_str()));
                let answer = match fault {
                    Some(i) => Some(self.faults.remove(i).1),
                    None => self.store.serve(&t),
                };
                match answer {
                    Some(r) => {
                        self.m.handle_response(self.now, t.id, r);
                        progressed = true;
                    }
                    None => self.outstanding.push(t),
                }
            }
            // Requests held by the store were counted as sent; only new ones count again.
            sent -= self.outstanding.len();
            if !progressed {
                self.drain();
                sent += self.outstanding.len();
                // Held blocking reads are still outstanding: count each once.
                sent -= self.outstanding.len();
                return sent;
            }
        }
    }

    /// Moves time on by `d`, firing timers (and settling after each).
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next = self.m.poll_timeout().filter(|t| *t <= until);
            match next {
                Some(t) => {
                    self.now = t.max(self.now);
                    self.m.handle_timeout(self.now);
                    self.settle();
                }
                None => break,
            }
            if self.now >= until {
                break;
            }
        }
        self.now = until;
        self.m.handle_timeout(self.now);
        self.settle();
    }

    fn acquire(&mut self, keys: &[String]) {
        self.m.acquire(self.now, keys).unwrap();
        self.settle();
    }

    fn take_events(&mut self) -> Vec<KeySetEvent> {
        std::mem::take(&mut self.events)
    }

    /// The blocking reads outstanding (what monitoring costs in connections).
    fn parked_reads(&self) -> usize {
        self.outstanding
            .iter()
            .filter(|t| query(t).contains_key("index"))
            .count()
    }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:05}")).collect()
}

/// What `pick` finds in each event that has it.
fn pick<T>(events: &[KeySetEvent], pick: impl Fn(&KeySetEvent) -> Option<T>) -> Vec<T> {
    events.iter().filter_map(pick).collect()
}

fn acquired(events: &[KeySetEvent]) -> Vec<String> {
    pick(events, |e| match e {
        KeySetEvent::Acquired(t) => Some(t.key.as_str().to_owned()),
        _ => None,
    })
}

fn released(events: &[KeySetEvent]) -> Vec<String> {
    pick(events, |e| match e {
        KeySetEvent::Released(k) => Some(k.as_str().to_owned()),
        _ => None,
    })
}

fn refused(events: &[KeySetEvent]) -> Vec<(String, Refusal)> {
    pick(events, |e| match e {
        KeySetEvent::Refused { key, reason } => Some((key.as_str().to_owned(), reason.clone())),
        _ => None,
    })
}

fn lost(events: &[KeySetEvent]) -> Vec<(String, LossReason)> {
    pick(events, |e| match e {
        KeySetEvent::Lost { key, reason } => Some((key.as_str().to_owned(), reason.clone())),
        _ => None,
    })
}

#[test]
fn many_keys_are_taken_in_batches_of_at_most_64_with_lock_flags_and_tokens() {
    let mut r = Rig::default();
    let wanted = keys("jobs/", 1000);
    r.acquire(&wanted);
    let events = r.take_events();
    let mut got = acquired(&events);
    got.sort();
    assert_eq!(got, wanted);
    assert_eq!(r.m.held(), 1000);
    assert!(
        r.store.txn_sizes.iter().all(|n| *n <= MAX_TXN_OPS),
        "{:?}",
        r.store.txn_sizes
    );
    assert_eq!(r.store.txn_sizes.len(), 1000usize.div_ceil(MAX_TXN_OPS));
    for key in &wanted {
        let e = &r.store.kv[key];
        assert_eq!(e.flags, LOCK_FLAG_VALUE, "{key}: Go's lock flags");
        assert_eq!(e.session.as_deref(), Some("s1"));
        let token = r.m.token(key).unwrap();
        assert_eq!(
            (token.lock_index, token.modify_index),
            (e.lock_index, e.modify_index)
        );
    }
}

#[test]
fn monitoring_costs_the_same_reads_for_ten_keys_as_for_ten_thousand() {
    let mut parked = Vec::new();
    for n in [10, 10_000] {
        let mut r = Rig::default();
        let mut wanted = keys("a/x/", n / 2);
        wanted.extend(keys("b/y/", n / 2));
        r.acquire(&wanted);
        assert_eq!(r.m.held(), n);
        assert!(r.m.watched_prefixes().len() <= KeySetOptions::DEFAULT_MAX_WATCHES);
        parked.push(r.parked_reads());
        // Idle: nothing but renewals for a minute (a reply with news would re-send a read).
        let before = r.store.txn_sizes.len();
        r.advance(Duration::from_secs(60));
        assert_eq!(r.store.txn_sizes.len(), before);
        assert_eq!(r.m.held(), n);
    }
    // The session's info and one read per prefix (a/x/ and b/y/), whatever the number of keys.
    assert_eq!(parked, [3, 3]);
}

#[test]
fn a_partly_refused_batch_names_the_refused_keys_and_sends_the_rest_again() {
    let mut r = Rig::default();
    let wanted = keys("p/", 5);
    // Taken by another session after the survey, before the batch: the batch is refused for
    // p/00001 (held) and p/00003 (lock-delay), and rolled back for the others.
    r.m.acquire(r.now, &wanted).unwrap();
    r.drain();
    let survey = r.outstanding.remove(0);
    assert!(survey.request.uri().query().unwrap().contains("recurse"));
    let answer = r.store.serve(&survey).unwrap();
    r.m.handle_response(r.now, survey.id, answer);
    r.store.sessions.push("other".to_owned());
    r.store.put("p/00001", LOCK_FLAG_VALUE, Some("other"));
    r.store.lock_delay.insert("p/00003".to_owned(), ());
    r.settle();
    let events = r.take_events();
    let mut got = acquired(&events);
    got.sort();
    assert_eq!(got, ["p/00000", "p/00002", "p/00004"]);
    let refusals = refused(&events);
    assert!(
        refusals.contains(&("p/00001".to_owned(), Refusal::Held)),
        "{refusals:?}"
    );
    assert!(
        refusals.contains(&("p/00003".to_owned(), Refusal::LockDelay)),
        "{refusals:?}"
    );
    // One refused batch of five, then the three others alone.
    assert_eq!(r.store.txn_sizes, [5, 3]);
    assert_eq!(r.m.key_status("p/00001"), None);
}

#[test]
fn the_survey_refuses_keys_held_by_others_and_keys_that_are_not_locks_without_writing() {
    let mut r = Rig::default();
    r.store.sessions.push("other".to_owned());
    r.store.put("q/held", LOCK_FLAG_VALUE, Some("other"));
    r.store.put("q/plain", 0, None);
    r.acquire(&["q/held".to_owned(), "q/plain".to_owned(), "q/free".to_owned()]);
    let events = r.take_events();
    assert_eq!(acquired(&events), ["q/free"]);
    let refusals = refused(&events);
    assert!(refusals.contains(&("q/held".to_owned(), Refusal::Held)));
    assert!(refusals.contains(&("q/plain".to_owned(), Refusal::Conflict { flags: 0 })));
    assert_eq!(r.store.txn_sizes, [1]);
    assert_eq!(r.store.kv["q/plain"].flags, 0, "a plain key is never overwritten");
}

#[test]
fn some_keys_are_released_then_all() {
    let mut r = Rig::default();
    let wanted = keys("r/", 100);
    r.acquire(&wanted);
    r.take_events();
    r.m.release(r.now, &wanted[..10]).unwrap();
    r.settle();
    let events = r.take_events();
    let released = released(&events);
    assert_eq!(released, wanted[..10]);
    assert_eq!(r.m.held(), 90);
    assert!(r.store.kv[&wanted[0]].session.is_none());
    assert_eq!(r.store.kv[&wanted[10]].session.as_deref(), Some("s1"));
    r.m.release_all(r.now);
    r.settle();
    assert_eq!(r.m.held(), 0);
    assert!(r.store.kv.values().all(|e| e.session.is_none()));
    // The session lives on until close.
    assert_eq!(r.m.session_id().map(SessionId::as_str), Some("s1"));
    r.m.close(r.now);
    r.settle();
    assert!(r.take_events().contains(&KeySetEvent::Closed));
    assert!(r.store.sessions.is_empty());
    assert!(r.m.is_quiescent());
    assert_eq!(r.m.acquire(r.now, &["r/again"]), Err(KeySetError::Closing));
}

#[test]
fn an_operators_delete_or_overwrite_of_one_key_loses_that_key_only() {
    let mut r = Rig::default();
    let wanted = keys("o/", 300);
    r.acquire(&wanted);
    r.take_events();
    r.store.delete(&wanted[7]);
    r.settle();
    assert_eq!(
        lost(&r.take_events()),
        [(wanted[7].clone(), LossReason::KeyDeleted)]
    );
    r.store.overwrite(&wanted[8], 0);
    r.settle();
    assert_eq!(
        lost(&r.take_events()),
        [(wanted[8].clone(), LossReason::Conflict { flags: 0 })]
    );
    // Released by someone else with our session's id (an operator's `?release=`).
    let index = r.store.bump();
    let e = r.store.kv.get_mut(&wanted[9]).unwrap();
    e.session = None;
    e.modify_index = index;
    r.settle();
    assert_eq!(lost(&r.take_events()), [(wanted[9].clone(), LossReason::NotHeld)]);
    assert_eq!(r.m.held(), 297);
}

#[test]
fn the_sessions_invalidation_loses_every_key() {
    let mut r = Rig::default();
    let wanted = keys("i/", 200);
    r.acquire(&wanted);
    r.take_events();
    // An operator destroys the session: the session watch answers, before any renewal.
    r.store.invalidate("s1");
    r.settle();
    let events = r.take_events();
    assert!(
        matches!(
            events[0],
            KeySetEvent::SessionLost(LossReason::SessionInvalidated)
        ),
        "{events:?}"
    );
    let mut gone: Vec<_> = lost(&events).into_iter().map(|(k, _)| k).collect();
    gone.sort();
    assert_eq!(gone, wanted);
    assert_eq!(r.m.held(), 0);
    // The set goes on, on a new session.
    r.acquire(&["i/again".to_owned()]);
    assert_eq!(acquired(&r.take_events()), ["i/again"]);
    assert_eq!(r.m.session_id().map(SessionId::as_str), Some("s2"));
}

#[test]
fn a_renewal_answered_404_loses_every_key_too() {
    let mut r = Rig::default();
    r.acquire(&keys("n/", 3));
    r.take_events();
    r.hang = Some("/v1/session/info/".to_owned());
    r.faults
        .push(("/v1/session/renew/".to_owned(), reply(404, None, "not found")));
    r.advance(Duration::from_secs(8));
    let events = r.take_events();
    assert!(events.contains(&KeySetEvent::SessionLost(LossReason::SessionInvalidated)));
    assert_eq!(lost(&events).len(), 3);
}

#[test]
fn failing_batches_are_retried_and_reported() {
    let mut r = Rig::default();
    r.faults
        .push(("/v1/txn".to_owned(), reply(500, None, "No cluster leader")));
    r.faults.push((
        "/v1/txn".to_owned(),
        Err(TransportError::new(TransportErrorKind::Io, "reset")),
    ));
    r.acquire(&keys("f/", 10));
    let retrying = |events: &[KeySetEvent]| {
        events
            .iter()
            .filter(|e| matches!(e, KeySetEvent::Retrying(_)))
            .count()
    };
    let events = r.take_events();
    assert_eq!(retrying(&events), 1);
    assert!(acquired(&events).is_empty());
    r.advance(Duration::from_secs(10));
    let events = r.take_events();
    assert_eq!(retrying(&events), 1, "the second failure, after the pause");
    assert_eq!(acquired(&events).len(), 10);
}

#[test]
fn an_unanswered_batch_times_out_at_its_deadline_and_is_sent_again() {
    let mut r = Rig::default();
    r.hang = Some("/v1/txn".to_owned());
    r.acquire(&keys("d/", 2));
    assert!(acquired(&r.take_events()).is_empty());
    r.advance(KeySetOptions::new().hold.request_timeout + Duration::from_millis(1));
    let events = r.take_events();
    let retry = events
        .iter()
        .find_map(|e| match e {
            KeySetEvent::Retrying(retry) => Some(retry.clone()),
            _ => None,
        })
        .unwrap();
    assert!(retry.cause.contains("timed out"), "{retry:?}");
    r.hang = None;
    // The hung request was abandoned; its late reply is not waited for.
    r.outstanding.retain(|t| t.request.uri().path() != "/v1/txn");
    r.advance(Duration::from_secs(6));
    assert_eq!(acquired(&r.take_events()).len(), 2);
}

#[test]
fn a_batch_failing_past_the_error_budget_refuses_its_keys_and_gives_them_back() {
    let mut options = KeySetOptions::new();
    options.hold.acquire_error_budget = Some(Duration::from_secs(3));
    let mut r = Rig::new(options);
    for _ in 0..20 {
        r.faults
            .push(("/v1/txn".to_owned(), reply(503, None, "unavailable")));
    }
    r.acquire(&keys("b/", 2));
    r.advance(Duration::from_secs(10));
    let events = r.take_events();
    let refusals = refused(&events);
    assert_eq!(refusals.len(), 2);
    assert!(
        refusals
            .iter()
            .all(|(_, why)| matches!(why, Refusal::Error(LockError::AgentUnavailable { .. })))
    );
    // The lost answers may have granted them: they are given back, without a word to the
    // caller, who was told they were refused.
    assert_eq!(r.m.key_status("b/00000"), Some(KeyStatus::Releasing));
    r.faults.clear();
    r.advance(Duration::from_secs(10));
    assert_eq!(r.m.len(), 0);
    assert!(r.take_events().is_empty());
}

#[test]
fn bad_input_is_refused_with_typed_errors_and_nothing_sent() {
    let mut r = Rig::default();
    let none: [&str; 0] = [];
    assert_eq!(r.m.acquire(r.now, &none), Err(KeySetError::NoKeys));
    assert!(matches!(
        r.m.acquire(r.now, &["ok", ""]),
        Err(KeySetError::Key {
            source: KeyError::Empty,
            ..
        })
    ));
    assert!(matches!(
        r.m.acquire(r.now, &["a/../b"]),
        Err(KeySetError::Key {
            source: KeyError::BadSegment { .. },
            ..
        })
    ));
    let long = "x".repeat(40 * 1024);
    assert!(matches!(
        r.m.acquire(r.now, &[long.as_str()]),
        Err(KeySetError::Key {
            source: KeyError::TooLong { .. },
            ..
        })
    ));
    assert_eq!(
        r.m.acquire(r.now, &["a", "/a"]),
        Err(KeySetError::Duplicate("a".to_owned()))
    );
    r.drain();
    assert!(
        r.outstanding.is_empty() && r.m.is_empty(),
        "a refused call asks for nothing"
    );
    r.acquire(&["a".to_owned()]);
    assert_eq!(
        r.m.acquire(r.now, &["b", "a"]),
        Err(KeySetError::AlreadyInSet("a".to_owned()))
    );
    assert_eq!(
        r.m.release(r.now, &["b"]),
        Err(KeySetError::NotHeld("b".to_owned()))
    );
    let err = r.m.acquire(r.now, &["b", ""]).unwrap_err();
    assert!(
        std::error::Error::source(&err).is_some(),
        "the key's error is kept as source()"
    );

    let mut options = KeySetOptions::new();
    options.max_keys = 3;
    let mut small = Rig::new(options);
    assert_eq!(
        small.m.acquire(small.now, &["a", "b", "c", "d"]),
        Err(KeySetError::TooMany { count: 4, limit: 3 })
    );
    let config = ClientConfig::http("127.0.0.1:8500").unwrap();
    let mut zero = KeySetOptions::new();
    zero.max_watches = 0;
    assert_eq!(
        KeySetMachine::new(config.clone(), zero).unwrap_err(),
        OptionsError::Zero { name: "max_watches" }
    );
    let mut big = KeySetOptions::new();
    big.hold.value = vec![0; 100 * 1024];
    assert!(matches!(
        KeySetMachine::new(config, big),
        Err(OptionsError::ValueTooLarge { .. })
    ));
}

#[test]
fn a_listing_older_than_the_grant_does_not_speak_for_the_key() {
    let mut r = Rig::default();
    r.acquire(&["z/a".to_owned()]);
    r.take_events();
    // A watch reply with an index below the grant's that does not show the key.
    let read = r
        .outstanding
        .iter()
        .position(|t| t.request.uri().path().starts_with("/v1/kv/"))
        .unwrap();
    let t = r.outstanding.remove(read);
    r.m.handle_response(r.now, t.id, reply(404, Some(5), Vec::new()));
    r.drain();
    assert!(lost(&r.take_events()).is_empty());
    assert_eq!(r.m.held(), 1);
}

#[test]
fn closing_gives_back_every_key_then_destroys_the_session() {
    let mut r = Rig::default();
    let wanted = keys("c/", 70);
    r.acquire(&wanted);
    r.take_events();
    r.m.close(r.now);
    r.settle();
    let events = r.take_events();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, KeySetEvent::Released(_)))
            .count(),
        70
    );
    assert_eq!(events.last(), Some(&KeySetEvent::Closed));
    assert!(
        r.store.kv.values().all(|e| e.session.is_none()),
        "released before the destroy: no lock-delay"
    );
    assert!(r.store.sessions.is_empty());
}

#[test]
fn a_callers_session_is_used_and_never_destroyed() {
    let mut options = KeySetOptions::new();
    options.hold.session = SessionChoice::Existing(SessionId::new("mine").unwrap());
    let mut r = Rig::new(options);
    r.store.sessions.push("mine".to_owned());
    r.acquire(&["e/1".to_owned(), "e/2".to_owned()]);
    assert_eq!(acquired(&r.take_events()).len(), 2);
    assert_eq!(
        r.m.key_status("e/1").map(|s| matches!(s, KeyStatus::Held(_))),
        Some(true)
    );
    r.m.close(r.now);
    r.settle();
    assert_eq!(r.take_events().last(), Some(&KeySetEvent::Closed));
    assert_eq!(r.store.sessions, ["mine"]);
}

#[test]
fn while_the_session_is_being_created_no_timer_is_due() {
    let mut r = Rig::default();
    r.m.acquire(r.now, &["w/a"]).unwrap();
    r.drain();
    // The survey and the session create are in flight: the next timer is a deadline, not now
    // (a timer due at once, never served, would make a driver spin).
    assert!(r.m.poll_timeout().is_some_and(|t| t > r.now));
}

#[test]
fn a_key_found_not_held_on_release_is_reported_lost_and_the_rest_released() {
    let mut r = Rig::default();
    let wanted = keys("u/", 3);
    r.acquire(&wanted);
    r.take_events();
    // Freed behind the machine's back, and the watch not answered yet: the unlock finds it.
    r.hang = Some("/v1/kv/".to_owned());
    let index = r.store.bump();
    let e = r.store.kv.get_mut(&wanted[1]).unwrap();
    e.session = None;
    e.modify_index = index;
    r.m.release_all(r.now);
    r.settle();
    let events = r.take_events();
    assert_eq!(lost(&events), [(wanted[1].clone(), LossReason::NotHeld)]);
    let released = released(&events);
    assert_eq!(released, [wanted[0].clone(), wanted[2].clone()]);
    // One refused unlock of three, then the two others.
    assert_eq!(r.store.txn_sizes[r.store.txn_sizes.len() - 2..], [3, 2]);
}

#[test]
fn a_close_while_a_batch_is_in_flight_refuses_its_keys_and_gives_back_what_it_granted() {
    let mut r = Rig::default();
    r.hang = Some("/v1/txn".to_owned());
    r.acquire(&keys("x/", 4));
    let batch = r
        .outstanding
        .iter()
        .position(|t| t.request.uri().path() == "/v1/txn")
        .unwrap();
    let batch = r.outstanding.remove(batch);
    r.m.close(r.now);
    // The batch lands after the close: granted, never reported held.
    let answer = r.store.serve(&batch).unwrap();
    r.m.handle_response(r.now, batch.id, answer);
    r.hang = None;
    r.settle();
    let events = r.take_events();
    assert!(acquired(&events).is_empty());
    assert_eq!(refused(&events).len(), 4);
    assert!(refused(&events).iter().all(|(_, why)| *why == Refusal::Cancelled));
    assert_eq!(events.last(), Some(&KeySetEvent::Closed));
    assert!(
        r.store.kv.values().all(|e| e.session.is_none()),
        "given back before the destroy"
    );
}
