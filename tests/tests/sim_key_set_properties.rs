//! Many keys on one session ([`KeySetMachine`]) over generated scenarios, in virtual time against
//! the simulated Consul: up to 300 keys under up to 4 folders, a Go-style lock contender
//! ([`LockMachine`]) taking turns on one of them, an operator deleting or overwriting keys or
//! destroying the set's session, releases of some keys, and a window in which the set's requests
//! fail (500s) or hang (applied, answers lost). At every step:
//!
//! - **safety**: the set and the contender never both believe they hold a key, but after an
//!   operator's action on it (or on the set's session) until the set reports the loss;
//! - **outcomes**: each key asked for ends exactly once in `Acquired` or `Refused`;
//! - **fencing**: each key's tokens (the set's and the contender's) strictly increase;
//! - **prompt loss**: an operator's delete or overwrite of a held key is reported for that key
//!   within 1.5 s, the session's destroy for every key, unless the fault window is near;
//! - **no loss without a cause**: every loss follows an operator's action or the fault window;
//! - **O(1) monitoring**: the set's blocking reads in flight never exceed its watches plus the
//!   session's, and, idle, its requests per minute stay under a bound that does not depend on the
//!   number of keys;
//! - **cleanup**: after `close` (with no fault near), nothing is held by the set's sessions and
//!   none of them is left.
//!
//! `PROPTEST_CASES` sets the number of cases (a third of the lock's default: each case runs up
//! to 300 keys).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, KeySetEvent, KeySetMachine, KeySetOptions, LockEvent, LockMachine, LockOptions, LockStatus,
    Reply, RequestId,
};
use consul_lock_testkit::harness::strategies::{cases, shrink_iters};
use consul_lock_testkit::sim::{QueryId, SimConsul, SimReply};
use proptest::prelude::*;

const TTL: Duration = Duration::from_secs(10);
/// Replies take 1 to 15 ms (drawn per reply from the seed), so that answers overtake each
/// other: a listing sent before a batch may be answered after it.
const MAX_LATENCY_MS: u64 = 15;
const PROMPT: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, Debug)]
enum Operator {
    Delete(usize),
    Overwrite(usize),
    DestroySession,
}

#[derive(Clone, Copy, Debug)]
enum FaultKind {
    /// The set's requests answer 500 without reaching the agent.
    Errors,
    /// The set's requests reach the agent; the answers are lost.
    Hang,
}

#[derive(Clone, Debug)]
struct Scenario {
    seed: u64,
    keys: usize,
    folders: usize,
    /// The key the contender takes turns on.
    contended: usize,
    /// When the contender first locks (the set asks at 500 ms: close to it, the contender may
    /// take its key between the set's survey and its batch, which is then partly refused).
    contender_start: Duration,
    operator: Vec<(Duration, Operator)>,
    fault: Option<(FaultKind, Duration, Duration)>,
    /// Released some keys at this time: every `release_every`-th.
    release: Option<(Duration, usize)>,
    duration: Duration,
}

impl Scenario {
    fn key(&self, i: usize) -> String {
        format!("jobs/f{}/k{i:04}", i % self.folders)
    }

    fn fault_near(&self, from: Duration, until: Duration) -> bool {
        self.fault
            .is_some_and(|(_, at, lasting)| at <= until && from <= at + lasting + TTL)
    }
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        1usize..300,
        1usize..=4,
        proptest::collection::vec(
            (
                5_000u64..70_000,
                prop_oneof![
                    (0usize..300).prop_map(Operator::Delete),
                    (0usize..300).prop_map(Operator::Overwrite),
                    Just(Operator::DestroySession),
                ],
            ),
            0..=3,
        ),
        prop_oneof![
            2 => Just(None),
            1 => (prop_oneof![Just(FaultKind::Errors), Just(FaultKind::Hang)], 3_000u64..60_000, 100u64..20_000)
                .prop_map(|(k, at, lasting)| Some((k, Duration::from_millis(at), Duration::from_millis(lasting)))),
        ],
        prop_oneof![Just(None), (10_000u64..60_000, 2usize..5).prop_map(|(at, every)| Some((Duration::from_millis(at), every)))],
        0usize..300,
        prop_oneof![Just(700u64), 490u64..505],
    )
        .prop_map(|(seed, keys, folders, operator, fault, release, contended, start)| Scenario {
            seed,
            keys,
            folders,
            contended: contended % keys,
            contender_start: Duration::from_millis(start),
            operator: operator
                .into_iter()
                .map(|(at, op)| {
                    let op = match op {
                        Operator::Delete(i) => Operator::Delete(i % keys),
                        Operator::Overwrite(i) => Operator::Overwrite(i % keys),
                        other => other,
                    };
                    (Duration::from_millis(at), op)
                })
                .collect(),
            fault,
            release,
            duration: Duration::from_secs(150),
        })
}

/// Who sent a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Who {
    Set,
    Contender,
}

struct World {
    s: Scenario,
    start: Instant,
    now: Instant,
    sim: SimConsul,
    set: KeySetMachine,
    contender: LockMachine,
    /// The contender's next `lock` or `unlock`.
    contender_next: Option<(Instant, bool)>,
    deliveries: BTreeMap<(Instant, u64), (Who, RequestId, Reply)>,
    seq: u64,
    parked: HashMap<QueryId, (Who, RequestId, bool)>,
    /// Per key: the set's outcome count.
    outcomes: HashMap<String, u32>,
    /// Per key: the last token sequence granted to anyone.
    last_sequence: HashMap<String, u64>,
    /// Keys whose hold an operator acted on, until the set reports the loss: with when.
    excused: HashMap<String, Instant>,
    /// Operator actions owed a prompt loss report: key (or all, for the session) and when.
    owed: Vec<(Option<String>, Instant)>,
    /// The set's sessions, ever.
    sessions: BTreeSet<String>,
    /// The set's requests, with when.
    sent: Vec<Instant>,
    closed: bool,
    /// Keys the set took.
    acquired: usize,
    /// Losses the set reported.
    losses: usize,
    violations: Vec<String>,
}

impl World {
    fn new(s: Scenario) -> World {
        let start = Instant::now();
        let config = ClientConfig::http("127.0.0.1:8500").unwrap();
        let mut options = KeySetOptions::new();
        let session = options.hold.session_options_mut().unwrap();
        session.ttl = TTL;
        session.lock_delay = Some(Duration::ZERO);
        session.checks = Some(Vec::new());
        options.hold.seed = s.seed;
        let set = KeySetMachine::new(config.clone(), options).unwrap();
        let mut lock = LockOptions::new(&s.key(s.contended)).unwrap();
        let session = lock.hold.session_options_mut().unwrap();
        session.ttl = TTL;
        session.lock_delay = Some(Duration::ZERO);
        session.checks = Some(Vec::new());
        lock.hold.seed = s.seed ^ 1;
        let contender = LockMachine::new(config, lock).unwrap();
        World {
            sim: SimConsul::new(s.seed, start),
            start,
            now: start,
            set,
            contender,
            contender_next: Some((start + s.contender_start, true)),
            deliveries: BTreeMap::new(),
            seq: 0,
            parked: HashMap::new(),
            outcomes: HashMap::new(),
            last_sequence: HashMap::new(),
            excused: HashMap::new(),
            owed: Vec::new(),
            sessions: BTreeSet::new(),
            sent: Vec::new(),
            closed: false,
            acquired: 0,
            losses: 0,
            violations: Vec::new(),
            s,
        }
    }

    fn t(&self) -> Duration {
        self.now - self.start
    }

    fn fault_now(&self) -> Option<FaultKind> {
        let t = self.t();
        self.s
            .fault
            .filter(|(_, at, lasting)| *at <= t && t < *at + *lasting)
            .map(|(k, _, _)| k)
    }

    fn violation(&mut self, what: String) {
        let at = self.t();
        self.violations.push(format!("{at:?}: {what}"));
    }

    fn send(&mut self, who: Who, id: RequestId, request: &http::Request<Vec<u8>>) {
        let fault = if who == Who::Set { self.fault_now() } else { None };
        if who == Who::Set {
            self.sent.push(self.now);
        }
        if let Some(FaultKind::Errors) = fault {
            let reply = http::Response::builder()
                .status(500)
                .body(b"No cluster leader".to_vec())
                .unwrap();
            self.deliver(who, id, Ok(reply));
            return;
        }
        let hang = matches!(fault, Some(FaultKind::Hang));
        match self.sim.handle(self.now, request) {
            SimReply::Now(reply) if !hang => self.deliver(who, id, Ok(reply)),
            SimReply::Now(_) => {}
            SimReply::Parked(q) => {
                self.parked.insert(q, (who, id, hang));
            }
        }
    }

    fn deliver(&mut self, who: Who, id: RequestId, reply: Reply) {
        self.seq += 1;
        // SplitMix64 of the seed and the reply's number: the same run for the same seed.
        let mut z = (self.s.seed ^ self.seq).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let latency = Duration::from_millis(1 + (z ^ (z >> 31)) % MAX_LATENCY_MS);
        self.deliveries
            .insert((self.now + latency, self.seq), (who, id, reply));
    }

    /// Sends what the machines ask for and takes in their events.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            while let Some(action) = self.set.poll_action() {
                any = true;
                match action {
                    Action::Send(t) => self.send(Who::Set, t.id, &t.request),
                    Action::Event(e) => self.on_set_event(e),
                }
            }
            while let Some(action) = self.contender.poll_action() {
                any = true;
                match action {
                    Action::Send(t) => self.send(Who::Contender, t.id, &t.request),
                    Action::Event(e) => self.on_contender_event(e),
                }
            }
            if !any {
                break;
            }
        }
        if let Some(id) = self.set.session_id() {
            self.sessions.insert(id.as_str().to_owned());
        }
    }

    fn grant(&mut self, key: &str, sequence: u64, who: &str) {
        let last = self.last_sequence.insert(key.to_owned(), sequence);
        if last.is_some_and(|l| l >= sequence) {
            self.violation(format!("fencing: {who} got {key} at {sequence}, after {last:?}"));
        }
    }

    fn on_set_event(&mut self, e: KeySetEvent) {
        match &e {
            KeySetEvent::Acquired(token) => {
                let key = token.key.as_str().to_owned();
                *self.outcomes.entry(key.clone()).or_default() += 1;
                self.acquired += 1;
                self.grant(&key, token.sequence(), "the set");
            }
            KeySetEvent::Refused { key, .. } => {
                *self.outcomes.entry(key.as_str().to_owned()).or_default() += 1;
            }
            KeySetEvent::Lost { key, reason } => {
                self.losses += 1;
                let key = key.as_str().to_owned();
                let excused = self.excused.remove(&key).is_some();
                let t = self.t();
                if !excused && !self.s.fault_near(t.saturating_sub(TTL * 2), t) {
                    self.violation(format!("{key} lost without a cause: {reason:?}"));
                }
                self.owed.retain(|(k, _)| k.as_deref() != Some(key.as_str()));
            }
            KeySetEvent::SessionLost(_) => {
                self.owed.retain(|(k, _)| k.is_some());
            }
            KeySetEvent::Closed => self.closed = true,
            _ => {}
        }
    }

    fn on_contender_event(&mut self, e: LockEvent) {
        let now = self.now;
        match e {
            LockEvent::Acquired(token) => {
                self.grant(token.key.as_str(), token.sequence(), "the contender");
                self.contender_next = Some((now + Duration::from_secs(1), false));
            }
            LockEvent::Released
            | LockEvent::ReleaseFailed(_)
            | LockEvent::Lost(_)
            | LockEvent::Failed(_)
            | LockEvent::GaveUp
            | LockEvent::Cancelled => {
                self.contender_next = Some((now + Duration::from_secs(1), true));
            }
            _ => {}
        }
    }

    fn operator(&mut self, op: Operator) {
        let now = self.now;
        match op {
            Operator::Delete(i) | Operator::Overwrite(i) => {
                let key = self.s.key(i);
                let held = self.set.token(&key).is_some();
                match op {
                    Operator::Delete(_) => {
                        self.sim.delete_key(now, &key);
                    }
                    _ => self.sim.put_key(now, &key, 0, b"operator"),
                }
                if held {
                    self.excused.insert(key.clone(), now);
                    self.owed.push((Some(key), now));
                }
            }
            Operator::DestroySession => {
                if let Some(id) = self.set.session_id().map(|s| s.as_str().to_owned()) {
                    if self.set.held() > 0 {
                        for token in self.set.tokens() {
                            self.excused.insert(token.key.as_str().to_owned(), now);
                        }
                        self.owed.push((None, now));
                    }
                    self.sim.destroy_session(now, &id);
                }
            }
        }
    }

    fn check(&mut self) {
        if self.contender.status() == LockStatus::Held {
            let key = self.s.key(self.s.contended);
            if self.set.token(&key).is_some() && !self.excused.contains_key(&key) {
                self.violation(format!("safety: the set and the contender both hold {key}"));
            }
        }
        for (key, n) in &self.outcomes {
            if *n > 1 {
                let what = format!("{key} had {n} outcomes");
                self.violations.push(what);
            }
        }
        let now = self.now;
        let late: Vec<_> = self
            .owed
            .iter()
            .filter(|(_, at)| now > *at + PROMPT)
            .cloned()
            .collect();
        for (key, at) in late {
            let t = at - self.start;
            if !self.s.fault_near(t.saturating_sub(TTL), t + PROMPT) {
                self.violation(format!(
                    "no prompt loss report for {key:?} after the operator at {t:?}"
                ));
            }
            self.owed.retain(|(k, a)| !(*k == key && *a == at));
        }
        // The set's monitoring: its session, its prefixes and a session check at most.
        let watches = self.set.watched_prefixes().len();
        if watches > KeySetOptions::DEFAULT_MAX_WATCHES {
            self.violation(format!("{watches} prefixes watched"));
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let scripted = self
            .s
            .operator
            .iter()
            .map(|(at, _)| self.start + *at)
            .chain(self.s.release.map(|(at, _)| self.start + at))
            .chain(self.s.fault.map(|(_, at, lasting)| self.start + at + lasting))
            .chain([
                self.start + Duration::from_millis(500),
                self.start + self.s.duration - Duration::from_secs(20),
            ])
            .filter(|t| *t > self.now);
        [
            self.set.poll_timeout(),
            self.contender.poll_timeout(),
            self.sim.poll_timeout(),
            self.deliveries.keys().next().map(|(t, _)| *t),
            self.contender_next.map(|(t, _)| t),
        ]
        .into_iter()
        .flatten()
        .chain(scripted)
        .filter(|t| *t >= self.now)
        .min()
    }

    fn run(mut self) -> World {
        let end = self.start + self.s.duration;
        let keys: Vec<String> = (0..self.s.keys).map(|i| self.s.key(i)).collect();
        let close_at = end - Duration::from_secs(20);
        let mut asked = false;
        let mut released = false;
        let mut done_ops = 0;
        let mut steps = 0u32;
        loop {
            steps += 1;
            assert!(steps < 2_000_000, "the run does not end");
            let Some(next) = self.next_time() else { break };
            if next >= end {
                break;
            }
            self.now = next.max(self.now);
            let t = self.t();
            // The agent's answers to parked reads.
            for (q, reply) in self.sim.advance(self.now) {
                if let Some((who, id, hang)) = self.parked.remove(&q) {
                    if !hang {
                        self.deliver(who, id, Ok(reply));
                    }
                }
            }
            while let Some(entry) = self.deliveries.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (who, id, reply) = entry.remove();
                match who {
                    Who::Set => self.set.handle_response(self.now, id, reply),
                    Who::Contender => self.contender.handle_response(self.now, id, reply),
                }
                self.drain();
            }
            self.set.handle_timeout(self.now);
            self.contender.handle_timeout(self.now);
            if !asked && t >= Duration::from_millis(500) {
                asked = true;
                self.set.acquire(self.now, &keys).unwrap();
            }
            while done_ops < self.s.operator.len() && self.start + self.s.operator[done_ops].0 <= self.now {
                let op = self.s.operator[done_ops].1;
                self.drain();
                self.operator(op);
                done_ops += 1;
            }
            if let Some((at, every)) = self.s.release {
                if !released && self.start + at <= self.now {
                    released = true;
                    let some: Vec<String> = self
                        .set
                        .tokens()
                        .map(|t| t.key.as_str().to_owned())
                        .step_by(every)
                        .collect();
                    if !some.is_empty() {
                        self.set.release(self.now, &some).unwrap();
                    }
                }
            }
            if let Some((at, lock)) = self.contender_next {
                if at <= self.now {
                    self.contender_next = None;
                    if lock {
                        let _ = self.contender.lock(self.now);
                    } else {
                        let _ = self.contender.unlock(self.now);
                    }
                }
            }
            if self.now >= close_at && !self.closed {
                self.set.close(self.now);
            }
            self.drain();
            self.check();
        }
        // Every key asked for ended once (asked at 0.5 s: long done).
        for key in &keys {
            if self.outcomes.get(key).copied().unwrap_or(0) != 1 {
                let n = self.outcomes.get(key);
                self.violations.push(format!("{key}: {n:?} outcomes"));
            }
        }
        self.check_budget(&keys);
        let quiet_close = !self
            .s
            .fault_near(self.s.duration - Duration::from_secs(40), self.s.duration);
        if quiet_close {
            if !self.closed {
                self.violations.push("close did not finish".to_owned());
            }
            for e in self.sim.kv_entries() {
                if e.session.as_ref().is_some_and(|s| self.sessions.contains(s)) {
                    self.violations.push(format!("{} still held after close", e.key));
                }
            }
            for s in self.sim.sessions() {
                if self.sessions.contains(&s.id) {
                    self.violations.push(format!("session {} left after close", s.id));
                }
            }
        }
        self
    }

    /// Idle, the set's requests per minute do not grow with its keys: renewals (one per TTL/2)
    /// and a read per change of the agent's state (the contender's turns), whatever the keys.
    fn check_budget(&mut self, _keys: &[String]) {
        let last_event = self
            .s
            .operator
            .iter()
            .map(|(at, _)| *at)
            .chain(self.s.release.map(|(at, _)| at))
            .chain(self.s.fault.map(|(_, at, lasting)| at + lasting))
            .max()
            .unwrap_or_default();
        let from = (last_event + TTL).max(Duration::from_secs(20));
        let until = self.s.duration - Duration::from_secs(20);
        if until < from + Duration::from_secs(30) {
            return;
        }
        let window = until - from;
        let sent = self
            .sent
            .iter()
            .filter(|t| **t - self.start >= from && **t - self.start < until)
            .count();
        // Per second: renewals (1 / 5 s), and for each contender turn (a session created and
        // destroyed, the key locked and released: one change a second at most) the session
        // watch and one prefix watch wake, each a read.
        let bound = 10 + 4 * window.as_secs() as usize;
        if sent > bound {
            self.violations.push(format!(
                "{sent} requests in {window:?} idle, bound {bound} (whatever the keys)"
            ));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases().div_ceil(3), max_shrink_iters: shrink_iters(), ..ProptestConfig::default() })]

    #[test]
    fn key_set_safety_outcomes_prompt_loss_and_cleanup(s in scenario()) {
        let world = World::new(s).run();
        prop_assert!(world.violations.is_empty(), "violations: {:#?}", world.violations);
    }
}

/// The same scenario with 10 keys and with 300: the set's requests while idle are the same
/// count, since monitoring does not depend on the number of keys.
#[test]
fn idle_requests_do_not_grow_with_the_keys() {
    let counts: Vec<usize> = [10, 299]
        .into_iter()
        .map(|keys| {
            let s = Scenario {
                seed: 3,
                keys,
                folders: 2,
                contended: 0,
                contender_start: Duration::from_millis(700),
                operator: Vec::new(),
                fault: None,
                release: None,
                duration: Duration::from_secs(150),
            };
            let w = World::new(s).run();
            assert!(w.violations.is_empty(), "{:#?}", w.violations);
            // Every key but the contender's (when the contender had it first).
            assert!(w.acquired >= keys - 1, "{} of {keys} taken", w.acquired);
            assert!(w.closed);
            let (from, until) = (Duration::from_secs(30), Duration::from_secs(120));
            w.sent
                .iter()
                .filter(|t| **t - w.start >= from && **t - w.start < until)
                .count()
        })
        .collect();
    assert_eq!(counts[0], counts[1], "idle requests for 10 and 299 keys");
}
