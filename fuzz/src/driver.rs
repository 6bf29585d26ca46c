//! What the machine targets share: the run's grammar ([`Op`], [`Spec`], [`Millis`]), the replies
//! every machine's session gets ([`SessionAgent`]), and a [`Driver`] that runs any holding machine
//! (a lock, a semaphore) against an agent [`Model`], through the one invariant checker the core's
//! tests use too (`consul_lock_checker::Checker`: its documentation lists the invariants, and its
//! `lock` and `semaphore` modules what is particular to each machine). Beyond them, the driver
//! checks that nothing panics, and that at the end a cancel against an agent that answers
//! everything brings the machine to rest within 120 s.
//!
//! What is particular to a machine's agent (the plausible replies to its requests, a healthy
//! agent's) is its [`Model`]: `lock_driver` and `semaphore_driver`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use consul_lock_checker::{Checker, Holder};
use consul_lock_core::machine::{
    HoldMachine as _, LockEvent, LockStatus, Reply, RequestId, TransportError, TransportErrorKind,
};

use crate::arb_reply::{self, KNOWN_SESSIONS, TTLS};
use crate::request::{Kind, Sent};

/// The caller's session, when the options use one.
pub const EXISTING: &str = "mine";

/// What is particular to one machine's agent: a hostile agent's plausible replies to its
/// requests, and a healthy agent's.
pub trait Model {
    /// The machine (its invariants: its `consul_lock_checker::Holder` impl).
    type M: Holder;
    /// A well-formed reply of the request's kind with hostile content.
    fn plausible(&mut self, m: &Self::M, sent: &Sent, p: &Plausible) -> Reply;
    /// The reply a healthy, idle Consul would give (to wind down).
    fn benign(&mut self, sent: &Sent) -> Reply;
}

/// A time step, 0..=120 s, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Millis(pub u32);

impl<'a> Arbitrary<'a> for Millis {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Millis> {
        // Mostly short steps, sometimes long ones.
        let max = match u.int_in_range(0..=3u8)? {
            0 => 50,
            1 => 2_000,
            2 => 20_000,
            _ => 120_000,
        };
        Ok(Millis(u.int_in_range(0..=max)?))
    }
}

/// A well-formed reply of the request's kind, its content chosen by these numbers.
#[derive(Arbitrary, Clone, Debug)]
pub struct Plausible {
    /// The main choice.
    pub a: u8,
    /// The index choice.
    pub b: u8,
    /// The entry's choice.
    pub c: u8,
    /// A number for indexes, lock-delays and the like (and, for the semaphore, more choices).
    pub n: u64,
}

/// How to answer one request.
#[derive(Clone, Debug)]
pub enum Spec {
    /// A well-formed reply with hostile content (see [`Plausible`]).
    Plausible(Plausible),
    /// A reply captured from a real Consul (another session's, mostly).
    Real(u8),
    /// An arbitrary reply: any status, headers and body, or Consul's shapes with any values.
    Arbitrary(Box<arb_reply::Reply>),
    /// No reply: a transport error of this kind.
    Transport(u8),
}

impl<'a> Arbitrary<'a> for Spec {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Spec> {
        // Weighted, so that runs reach a held lock often: mostly plausible replies.
        Ok(match u.int_in_range(0..=11u8)? {
            0..=7 => Spec::Plausible(u.arbitrary()?),
            8 => Spec::Real(u.arbitrary()?),
            9 | 10 => Spec::Arbitrary(u.arbitrary()?),
            _ => Spec::Transport(u.arbitrary()?),
        })
    }
}

/// One step of a run.
#[derive(Clone, Debug)]
pub enum Op {
    /// `lock(now)`.
    Lock,
    /// `unlock(now)`.
    Unlock,
    /// `cancel(now)`.
    Cancel,
    /// `destroy(now)`.
    Destroy,
    /// Answer a request in flight (picked modulo their number).
    Reply(u8, Spec),
    /// Answer any request ever sent: late, duplicate, abandoned.
    Late(u16, Spec),
    /// A `handle_timeout(now)` whether due or not.
    Timeout,
    /// Move time, calling `handle_timeout` whenever the machine asks (and once early before each).
    Advance(Millis),
    /// Move time with one `handle_timeout` at the end: a late driver.
    Jump(Millis),
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Op> {
        // Weighted as the proptest's operations: mostly replies and time.
        Ok(match u.int_in_range(0..=28u8)? {
            0..=2 => Op::Lock,
            3 => Op::Unlock,
            4 => Op::Cancel,
            5 => Op::Destroy,
            6..=19 => Op::Reply(u.arbitrary()?, u.arbitrary()?),
            20 | 21 => Op::Late(u.arbitrary()?, u.arbitrary()?),
            22 => Op::Timeout,
            23..=27 => Op::Advance(u.arbitrary()?),
            _ => Op::Jump(u.arbitrary()?),
        })
    }
}

/// A reply with `status`, `headers` (dropped when `http` refuses them) and `body`.
pub fn response(status: u16, headers: &[(&str, String)], body: impl Into<Vec<u8>>) -> Reply {
    let mut r = http::Response::new(body.into());
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    Ok(r)
}

/// A session entry's JSON.
pub fn session_json(id: &str, ttl: &str, lock_delay_nanos: u64) -> String {
    format!(
        "{{\"ID\":{},\"Name\":\"Consul API Lock\",\"Node\":\"n\",\"LockDelay\":{lock_delay_nanos},\
         \"Behavior\":\"release\",\"TTL\":{},\"NodeChecks\":[\"serfHealth\"],\"ServiceChecks\":null,\
         \"CreateIndex\":1,\"ModifyIndex\":1}}",
        arb_reply::json_string(id),
        arb_reply::json_string(ttl)
    )
}

/// The reply to a KV write (`true`, `false`, a 500), chosen by `a`.
pub fn write_reply(a: u8) -> Reply {
    match a % 6 {
        0 => response(200, &[], "false"),
        1 => response(500, &[], "rpc error making call: EOF"),
        _ => response(200, &[], "true\n"),
    }
}

/// The metadata headers of a read on `sent_index`, hostile as `b` and `n` choose: stale,
/// halved (backwards), missing, zero, `u64::MAX`, garbled indexes, `KnownLeader: false`.
pub fn read_headers(sent_index: u64, b: u8, n: u64) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    match b % 8 {
        0 => headers.push(("X-Consul-Index", sent_index.to_string())),
        1 => headers.push(("X-Consul-Index", (sent_index / 2).to_string())),
        2 => {}
        3 => headers.push(("X-Consul-Index", "0".to_owned())),
        4 => headers.push(("X-Consul-Index", u64::MAX.to_string())),
        5 => headers.push(("X-Consul-Index", sent_index.wrapping_add(1).to_string())),
        6 => headers.push(("X-Consul-Index", sent_index.saturating_add(n % 1000).to_string())),
        _ => headers.push(("X-Consul-Index", "abc".to_owned())),
    }
    match (b / 8) % 4 {
        0 | 1 => headers.push(("X-Consul-KnownLeader", "true".to_owned())),
        2 => {}
        _ => headers.push(("X-Consul-KnownLeader", "false".to_owned())),
    }
    if (b / 32).is_multiple_of(2) {
        headers.push(("X-Consul-LastContact", (n % 10_000).to_string()));
    }
    headers
}

/// The plausible replies to a plain KV acquire (`?acquire=`, the semaphore's contender key; the
/// lock acquires by transaction): refused, `invalid session` (for `ours`), no leader, denied,
/// granted.
pub fn acquire_reply(a: u8, ours: &str) -> Reply {
    match a % 8 {
        0 | 1 => response(200, &[], "false"),
        2 => response(500, &[], format!("invalid session \"{ours}\"")),
        3 => response(500, &[], "No cluster leader"),
        4 => response(403, &[], "Permission denied"),
        _ => response(200, &[], "true"),
    }
}

/// The agent's side of the session requests (create, renew, destroy, info), shared by the models.
#[derive(Clone, Debug, Default)]
pub struct SessionAgent {
    /// Sessions created so far (for fresh IDs `g-<n>`).
    pub created: u64,
}

impl SessionAgent {
    /// A plausible, hostile reply to a session request; `None` for any other request.
    pub fn plausible(&mut self, sent: &Sent, p: &Plausible) -> Option<Reply> {
        let (a, b, n) = (usize::from(p.a), usize::from(p.b), p.n);
        let known = KNOWN_SESSIONS[n as usize % KNOWN_SESSIONS.len()];
        let meta = |index: u64| {
            vec![
                ("X-Consul-Index", index.to_string()),
                ("X-Consul-KnownLeader", "true".to_owned()),
                ("X-Consul-LastContact", "0".to_owned()),
            ]
        };
        Some(match sent.kind() {
            Kind::Create => match a % 8 {
                0 => response(200, &[], format!("{{\"ID\":\"{known}\"}}")),
                1 => response(200, &[], "{\"ID\":\" not an id\"}"),
                2 => response(
                    500,
                    &[],
                    "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]",
                ),
                3 => response(500, &[], "No cluster leader"),
                _ => {
                    self.created += 1;
                    response(200, &[], format!("{{\"ID\":\"g-{}\"}}", self.created))
                }
            },
            Kind::Renew(id) => match a % 10 {
                0 => response(404, &[], format!("Session id '{id}' not found")),
                1 => response(500, &[], "No cluster leader"),
                2 => response(200, &[], "[]"),
                3 => {
                    let ttl = TTLS[b % TTLS.len()].0;
                    response(200, &[], format!("[{}]", session_json(&id, ttl, n)))
                }
                4 => response(200, &[], format!("[{}]", session_json(known, "15s", n))),
                5 => {
                    let ttl = consul_lock_core::duration::format(Duration::from_nanos(n));
                    response(200, &[], format!("[{}]", session_json(&id, &ttl, n)))
                }
                6 => response(200, &[], format!("[{}]", session_json(&id, "2562047h", n))),
                _ => response(
                    200,
                    &[],
                    format!("[{}]", session_json(&id, "15s", 15_000_000_000)),
                ),
            },
            Kind::Destroy(_) => write_reply(p.a),
            Kind::Info(id) => match a % 5 {
                0 => response(200, &meta(n % 64), "[]"),
                1 => response(200, &meta(n % 64), "null"),
                2 => response(200, &meta(n % 64), format!("[{}]", session_json(&id, "15s", n))),
                _ => response(
                    200,
                    &meta(n % 64),
                    format!("[{}]", session_json(&id, "15s", (n % 61) * 1_000_000_000)),
                ),
            },
            _ => return None,
        })
    }

    /// A healthy agent's reply to a session request; `None` for any other request.
    pub fn benign(&mut self, sent: &Sent) -> Option<Reply> {
        Some(match sent.kind() {
            Kind::Create => {
                self.created += 1;
                response(200, &[], format!("{{\"ID\":\"g-{}\"}}", self.created))
            }
            Kind::Renew(id) => response(
                200,
                &[],
                format!("[{}]", session_json(&id, "15s", 15_000_000_000)),
            ),
            Kind::Destroy(_) => response(200, &[], "true"),
            Kind::Info(_) => response(200, &[("X-Consul-Index", "1".to_owned())], "[]"),
            _ => return None,
        })
    }
}

/// Whether to print each step (`FUZZ_TRACE=1`), to read a failing run.
pub fn tracing() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// One machine under test, driven through the checker, answered by the agent's model.
pub struct Driver<T: Model> {
    checker: Checker<T::M>,
    /// The agent's model.
    pub model: T,
    base: Instant,
    now: Instant,
}

impl<T: Model> Driver<T> {
    /// A driver for machine `m`, answered by `model`.
    pub fn new(m: T::M, model: T) -> Driver<T> {
        let now = Instant::now();
        Driver {
            checker: Checker::new(m),
            model,
            base: now,
            now,
        }
    }

    /// The machine.
    pub fn machine(&self) -> &T::M {
        &self.checker.m
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<LockEvent> {
        self.checker.events.iter().map(|(_, e)| e.clone()).collect()
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// Runs one step.
    pub fn step(&mut self, op: &Op) {
        let now = self.now;
        let (sent, events) = (self.checker.log.len(), self.checker.events.len());
        if tracing() {
            eprintln!("[{:>10.3?}] {op:?}", self.elapsed());
        }
        match op {
            Op::Lock => {
                let _ = self.checker.lock(now);
            }
            Op::Unlock => {
                let _ = self.checker.unlock(now);
            }
            Op::Cancel => self.checker.cancel(now),
            Op::Destroy => {
                let _ = self.checker.destroy(now);
            }
            Op::Reply(pick, spec) => {
                let n = self.checker.inflight.len();
                if n == 0 {
                    return;
                }
                let Some(sent) = self
                    .checker
                    .inflight
                    .values()
                    .nth(usize::from(*pick) % n)
                    .cloned()
                else {
                    return;
                };
                let reply = self.reply(&sent, spec);
                self.deliver(sent.id, reply);
            }
            Op::Late(pick, spec) => {
                let n = self.checker.log.len();
                if n == 0 {
                    return;
                }
                let sent = self.checker.log[usize::from(*pick) % n].clone();
                let reply = self.reply(&sent, spec);
                self.deliver(sent.id, reply);
            }
            Op::Timeout => self.checker.tick(now),
            Op::Advance(Millis(ms)) => {
                let to = now + Duration::from_millis(u64::from(*ms));
                self.advance(to);
            }
            Op::Jump(Millis(ms)) => {
                let to = now + Duration::from_millis(u64::from(*ms));
                self.now = to;
                self.checker.tick(to);
            }
        }
        self.trace_since(sent, events);
    }

    /// With `FUZZ_TRACE`, prints the requests and events since the log held `sent` and the
    /// events `events`.
    fn trace_since(&self, sent: usize, events: usize) {
        if !tracing() {
            return;
        }
        for s in &self.checker.log[sent..] {
            eprintln!(
                "    [{:>10.3?}] send {} {} (deadline +{:?})",
                s.at - self.base,
                s.id,
                s.describe(),
                s.deadline - s.at
            );
        }
        for (at, e) in &self.checker.events[events..] {
            eprintln!("    [{:>10.3?}] event {e:?}", *at - self.base);
        }
    }

    /// The reply `spec` describes to `sent`.
    fn reply(&mut self, sent: &Sent, spec: &Spec) -> Reply {
        match spec {
            Spec::Plausible(p) => self.model.plausible(&self.checker.m, sent, p),
            Spec::Real(i) => Ok(crate::seeds::real_reply(usize::from(*i))),
            Spec::Arbitrary(r) => Ok(r.build().0),
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

    /// Hands the machine the reply to request `id`.
    fn deliver(&mut self, id: RequestId, reply: Reply) {
        if tracing() {
            let what = self
                .checker
                .log
                .iter()
                .find(|s| s.id == id)
                .map_or_else(|| "?".to_owned(), Sent::describe);
            match &reply {
                Ok(r) => eprintln!(
                    "    reply {id} {what}: {} {:?} {:?}",
                    r.status(),
                    r.headers(),
                    String::from_utf8_lossy(r.body())
                ),
                Err(e) => eprintln!("    reply {id} {what}: {e}"),
            }
        }
        self.checker.deliver(self.now, id, reply);
    }

    /// Moves time to `to`, calling `handle_timeout` at every instant the machine asks for, and
    /// once early (half-way) before each, which must do nothing.
    fn advance(&mut self, to: Instant) {
        self.checker.advance(self.now, to);
        self.now = to;
    }

    /// Cancels, then answers everything as a healthy Consul would: the machine must come to rest
    /// within 120 s.
    pub fn wind_down(&mut self) {
        let (sent, events) = (self.checker.log.len(), self.checker.events.len());
        self.checker.cancel(self.now);
        let until = self.now + Duration::from_secs(120);
        while !self.checker.m.is_quiescent() && self.now < until {
            let ids: Vec<RequestId> = self.checker.inflight.keys().copied().collect();
            for id in ids {
                if let Some(sent) = self.checker.inflight.get(&id).cloned() {
                    let reply = self.model.benign(&sent);
                    self.deliver(id, reply);
                }
            }
            if self.checker.m.is_quiescent() {
                break;
            }
            let next = self
                .checker
                .m
                .poll_timeout()
                .filter(|t| *t <= until)
                .unwrap_or(until)
                .max(self.now + Duration::from_millis(1));
            self.advance(next.min(until));
        }
        self.trace_since(sent, events);
        assert!(
            self.checker.m.is_quiescent(),
            "not at rest 120 s after cancel against a healthy agent: status {:?}, in flight {:?}",
            self.checker.m.status(),
            self.checker.describe()
        );
        assert_eq!(self.checker.m.status(), LockStatus::Idle);
    }
}

/// One machine's fuzz target: what a run varies of its options, and the driver they make.
pub trait Target {
    /// The options a run varies, read first from the input.
    type Setup: for<'a> Arbitrary<'a>;
    /// The machine's agent.
    type Model: Model;
    /// The target's name, its seeds' and corpus' folder (`lock_machine`).
    const NAME: &'static str;
    /// A driver for a machine with `setup`'s options.
    fn driver(setup: &Self::Setup) -> Driver<Self::Model>;
}

/// Runs a whole input: the setup, up to `max_ops` operations, the wind-down.
pub fn run<T: Target>(data: &[u8], max_ops: usize) {
    let _ = events_of::<T>(data, max_ops);
}

/// Runs a whole input as [`run`] does, and returns the events of its operations (before the
/// wind-down); `None` when the input has no setup.
pub fn events_of<T: Target>(data: &[u8], max_ops: usize) -> Option<Vec<LockEvent>> {
    let mut u = Unstructured::new(data);
    let setup = T::Setup::arbitrary(&mut u).ok()?;
    let mut driver = T::driver(&setup);
    for _ in 0..max_ops {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        driver.step(&op);
    }
    let events = driver.events();
    driver.wind_down();
    Some(events)
}

/// SplitMix64 bytes, for random inputs without a fuzzer (the harness's tests, the seeds).
pub fn splitmix_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// An event's variant and its reason's or error's variant: `Lost(TakenBy`.
pub fn event_name(e: &LockEvent) -> String {
    let s = format!("{e:?}");
    let name: String = s
        .chars()
        .take_while(|c| c.is_ascii_alphabetic() || *c == '(')
        .collect();
    let parts: Vec<&str> = name.split('(').filter(|p| !p.is_empty()).take(2).collect();
    parts.join("(")
}

/// The seed outcomes both machines' seeds are chosen by: a name and whether a run's events
/// reach it.
pub type Outcome = (&'static str, fn(&[LockEvent]) -> bool);

/// Acquired-then-released, acquired-then-lost, acquired twice, destroyed, gave up, failed,
/// cancelled.
pub const OUTCOMES: [Outcome; 7] = [
    ("acquired-released", |e| {
        e.iter().any(|e| matches!(e, LockEvent::Acquired(_)))
            && e.iter().any(|e| matches!(e, LockEvent::Released))
    }),
    ("acquired-lost", |e| {
        e.iter().any(|e| matches!(e, LockEvent::Acquired(_)))
            && e.iter().any(|e| matches!(e, LockEvent::Lost(_)))
    }),
    ("acquired-twice", |e| {
        e.iter().filter(|e| matches!(e, LockEvent::Acquired(_))).count() >= 2
    }),
    ("destroyed", |e| {
        e.iter().any(|e| matches!(e, LockEvent::Destroyed))
    }),
    ("gave-up", |e| e.iter().any(|e| matches!(e, LockEvent::GaveUp))),
    ("failed", |e| e.iter().any(|e| matches!(e, LockEvent::Failed(_)))),
    ("cancelled", |e| {
        e.iter().any(|e| matches!(e, LockEvent::Cancelled))
    }),
];

/// Writes seeds into `dir`: for each of [`OUTCOMES`], the first (up to 3) SplitMix64 inputs of
/// `len` bytes, seeds `0..tries`, whose run (by `events`: the events of the whole input's
/// operations, after which it is wound down) reaches it. Returns the outcomes none reached.
pub fn write_seeds(
    dir: &std::path::Path,
    len: usize,
    tries: u64,
    events: impl Fn(&[u8]) -> Vec<LockEvent>,
) -> Vec<&'static str> {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut missing = Vec::new();
    for (name, wanted) in OUTCOMES {
        let mut found = 0;
        for seed in 0..tries {
            let data = splitmix_bytes(seed, len);
            if wanted(&events(&data)) {
                std::fs::write(dir.join(format!("{name}-{found}")), &data)
                    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                found += 1;
                if found == 3 {
                    break;
                }
            }
        }
        if found == 0 {
            missing.push(name);
        }
    }
    missing
}

/// Prints, for the inputs in `dir`, how many see each event (by [`event_name`]); `events` runs
/// one input and returns its events (`None`: no setup).
pub fn corpus_outcomes(dir: &str, events: impl Fn(&[u8]) -> Option<Vec<LockEvent>>) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut inputs = 0;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{dir}: {e}")).path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        inputs += 1;
        let Some(events) = events(&data) else { continue };
        let mut seen: Vec<String> = events.iter().map(event_name).collect();
        seen.sort();
        seen.dedup();
        for s in seen {
            *counts.entry(s).or_default() += 1;
        }
    }
    eprintln!("{inputs} inputs in {dir}; inputs whose run saw each event:");
    for (k, v) in counts {
        eprintln!("  {v:>6}  {k}");
    }
}

/// What each target's tests run, written once: random inputs without a fuzzer, replays, seeds
/// and a corpus' outcomes.
#[cfg(test)]
pub(crate) mod target_tests {
    use super::{Target, corpus_outcomes, events_of, run, splitmix_bytes, write_seeds};

    fn env<N: std::str::FromStr>(name: &str, default: N) -> N {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    /// `FUZZ_SEEDS` (default 300) random inputs of 2 KiB keep the invariants.
    pub(crate) fn random_runs<T: Target>() {
        for seed in 0..env("FUZZ_SEEDS", 300u64) {
            let data = splitmix_bytes(seed, 2048);
            if std::panic::catch_unwind(|| run::<T>(&data, 400)).is_err() {
                panic!("seed {seed} fails");
            }
        }
    }

    /// Replays the random input `FUZZ_SEED`.
    pub(crate) fn replay_seed<T: Target>() {
        run::<T>(&splitmix_bytes(env("FUZZ_SEED", 0), 2048), 400);
    }

    /// Replays the file `FUZZ_INPUT` (a crash, a corpus input).
    pub(crate) fn replay_input<T: Target>() {
        let path = std::env::var("FUZZ_INPUT").unwrap_or_default();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        run::<T>(&data, 512);
    }

    /// Writes the target's seeds, inputs of `len` bytes (see [`write_seeds`]).
    pub(crate) fn seeds<T: Target>(len: usize) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(T::NAME);
        let missing = write_seeds(&dir, len, 20_000, |data| {
            events_of::<T>(data, 512).unwrap_or_default()
        });
        assert!(missing.is_empty(), "no input found for {missing:?}");
    }

    /// Prints what the inputs of `FUZZ_CORPUS` (default `corpus/<target>`) reach.
    pub(crate) fn corpus<T: Target>() {
        let dir = std::env::var("FUZZ_CORPUS").unwrap_or_else(|_| format!("corpus/{}", T::NAME));
        corpus_outcomes(&dir, |data| events_of::<T>(data, 512));
    }
}
