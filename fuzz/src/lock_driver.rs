//! Drives a `LockMachine` with an arbitrary run: options, then operations, replies (plausible
//! and hostile, real captured ones, arbitrary bytes), transport errors, timeouts and time jumps.
//! After every step the invariants below are checked (they are those of core/tests/support, which
//! the fuzz crate can't import):
//! - no panic;
//! - a quiescent machine emits nothing in answer to a reply or a timeout (only to an operation);
//! - a spurious or early `handle_timeout` does nothing, and a due timer does not stay due;
//! - `poll_timeout()` is never before the latest `now`;
//! - at most one renew of the session in flight, and `renew_in_flight()` agrees;
//! - every request's deadline is after `now` (a blocking read's after `now + wait + wait/16`), no
//!   read blocks on index 0, no wait exceeds Consul's 10 minutes;
//! - the events follow the operations' grammar and agree with `status()`: `Acquired` (with the
//!   key, a session and the `LockIndex` of the read it follows) only after an acquire for that
//!   session was answered `true`, and before any `Lost`/`Released`;
//! - while held: `token()` is the token, the session is the token's, the renew deadline has not
//!   passed, and no release or destroy of the session goes out;
//! - at the end, a cancel against an agent that answers everything brings the machine to rest
//!   within 120 s.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use consul_lock_core::api::{ClientConfig, Endpoint, KvGet, SessionId};
use consul_lock_core::machine::{
    Action, FencingToken, LOCK_FLAG_VALUE, LockError, LockEvent, LockMachine, LockOptions, LockStatus, Reply,
    RequestId, SEMAPHORE_FLAG_VALUE, SessionChoice, TransportError, TransportErrorKind,
};

use crate::arb_reply::{self, KNOWN_SESSIONS, TTLS};
use crate::request::{Kind, Sent};

/// The lock key.
pub const KEY: &str = "fuzz/lock";
/// The caller's session, when the options use one.
pub const EXISTING: &str = "mine";

/// The options: the parts a run varies.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Use the caller's session [`EXISTING`] rather than create one.
    pub existing: bool,
    /// Go's `LockTryOnce`.
    pub try_once: bool,
    /// Go's `MonitorRetries` (`None`: bear failures while renewals succeed).
    pub monitor_retries: Option<u8>,
    /// Session TTL, 10..=60 s.
    pub ttl_secs: u8,
    /// Lock wait time, 1..=30 s.
    pub wait_secs: u8,
    /// Lock-delay asked for the session, 0..=60 s.
    pub lock_delay_secs: Option<u8>,
    /// The jitter seed.
    pub seed: u64,
    /// The value written.
    pub value: Vec<u8>,
}

impl<'a> Arbitrary<'a> for Setup {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Setup> {
        Ok(Setup {
            existing: u.arbitrary()?,
            try_once: u.arbitrary()?,
            monitor_retries: if u.arbitrary()? {
                Some(u.int_in_range(0..=4)?)
            } else {
                None
            },
            ttl_secs: u.int_in_range(10..=60)?,
            wait_secs: u.int_in_range(1..=30)?,
            lock_delay_secs: if u.arbitrary()? {
                Some(u.int_in_range(0..=60)?)
            } else {
                None
            },
            seed: u.arbitrary()?,
            value: {
                let len = u.int_in_range(0..=16)?;
                u.bytes(len)?.to_vec()
            },
        })
    }
}

impl Setup {
    /// The lock options.
    pub fn options(&self) -> LockOptions {
        let mut o = match LockOptions::new(KEY) {
            Ok(o) => o,
            Err(e) => panic!("fuzz harness bug: {e}"),
        };
        if self.existing {
            o.session = SessionChoice::Existing(SessionId::new(EXISTING).unwrap_or_else(|e| panic!("{e}")));
        } else if let Some(s) = o.session_options_mut() {
            s.ttl = Duration::from_secs(u64::from(self.ttl_secs));
            s.lock_delay = self.lock_delay_secs.map(|d| Duration::from_secs(u64::from(d)));
        }
        o.lock_try_once = self.try_once;
        o.monitor_retries = self.monitor_retries.map(u32::from);
        o.lock_wait_time = Duration::from_secs(u64::from(self.wait_secs));
        o.seed = self.seed;
        o.value = self.value.clone();
        o
    }
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
    /// A number for indexes, lock-delays and the like.
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

/// What a reply says, read before it is handed over.
fn reply_facts(sent: Option<&Sent>, reply: &Reply) -> Cause {
    let (mut granted, mut pair) = (None, None);
    if let (Some(sent), Ok(resp)) = (sent, reply) {
        match sent.kind() {
            Kind::Acquire { session, .. }
                if resp.status().is_success()
                    && std::str::from_utf8(resp.body()).map(str::trim) == Ok("true") =>
            {
                granted = Some(session);
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

fn response(status: u16, headers: &[(&str, String)], body: impl Into<Vec<u8>>) -> Reply {
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

fn kv_json(session: Option<&str>, flags: u64, lock_index: u64, modify_index: u64) -> String {
    let session = session.map_or(String::new(), |s| {
        format!(",\"Session\":{}", arb_reply::json_string(s))
    });
    format!(
        "{{\"LockIndex\":{lock_index},\"Key\":\"{KEY}\",\"Flags\":{flags},\"Value\":null{session},\
         \"CreateIndex\":1,\"ModifyIndex\":{modify_index}}}"
    )
}

fn session_json(id: &str, ttl: &str, lock_delay_nanos: u64) -> String {
    format!(
        "{{\"ID\":{},\"Name\":\"Consul API Lock\",\"Node\":\"n\",\"LockDelay\":{lock_delay_nanos},\
         \"Behavior\":\"release\",\"TTL\":{},\"NodeChecks\":[\"serfHealth\"],\"ServiceChecks\":null,\
         \"CreateIndex\":1,\"ModifyIndex\":1}}",
        arb_reply::json_string(id),
        arb_reply::json_string(ttl)
    )
}

/// Whether to print each step (`FUZZ_TRACE=1`), to read a failing run.
fn tracing() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

/// One machine under test, with what its driver knows.
pub struct Driver {
    m: LockMachine,
    base: Instant,
    now: Instant,
    inflight: BTreeMap<RequestId, Sent>,
    log: Vec<Sent>,
    expect: Expect,
    quiescent: bool,
    /// Sessions an acquire was granted to, since the last `lock`.
    granted: Vec<String>,
    /// Sessions created so far (for fresh IDs).
    created: u64,
    /// The last session create sent: the session in use came from it, and only renews sent after
    /// it are of that session (a hostile agent may hand out the same ID twice).
    last_create: Option<RequestId>,
    /// The last `LockIndex` a plausible read showed (to make it go down).
    last_lock_index: u64,
    /// Events seen, for the report.
    pub events: Vec<LockEvent>,
}

impl Driver {
    /// A driver for a machine with `setup`'s options.
    pub fn new(setup: &Setup) -> Driver {
        let m = match LockMachine::new(ClientConfig::default(), setup.options()) {
            Ok(m) => m,
            Err(e) => panic!("fuzz harness bug: invalid options: {e}"),
        };
        assert!(m.is_quiescent(), "a new machine is quiescent");
        assert_eq!(m.poll_timeout(), None, "a new machine wants no timeout");
        let now = Instant::now();
        Driver {
            m,
            base: now,
            now,
            inflight: BTreeMap::new(),
            log: Vec::new(),
            expect: Expect::Idle,
            quiescent: true,
            granted: Vec::new(),
            created: 0,
            last_create: None,
            last_lock_index: 0,
            events: Vec::new(),
        }
    }

    /// The machine.
    pub fn machine(&self) -> &LockMachine {
        &self.m
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    fn ours(&self) -> String {
        self.m
            .session()
            .id()
            .map_or_else(|| EXISTING.to_owned(), |s| s.to_string())
    }

    /// Runs one step.
    pub fn step(&mut self, op: &Op) {
        let now = self.now;
        if tracing() {
            eprintln!("[{:>10.3?}] {op:?}", self.elapsed());
        }
        match op {
            Op::Lock => {
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
            }
            Op::Unlock => {
                let r = self.m.unlock(now);
                match (&r, &self.expect) {
                    (Ok(()), Expect::Held(_)) => self.expect = Expect::Releasing,
                    (Err(LockError::NotHeld), e) if !matches!(e, Expect::Held(_)) => {}
                    (r, e) => panic!("unlock() answered {r:?} while {e:?}"),
                }
                self.after(now, &Cause::Unlock);
                self.settle(now);
            }
            Op::Cancel => self.cancel(),
            Op::Destroy => {
                let r = self.m.destroy(now);
                match (&r, &self.expect) {
                    (Ok(()), Expect::Idle) => self.expect = Expect::Destroying,
                    (Err(LockError::AlreadyHeld), Expect::Held(_)) => {}
                    (Err(LockError::Busy), Expect::Acquiring | Expect::Releasing | Expect::Destroying) => {}
                    (r, e) => panic!("destroy() answered {r:?} while {e:?}"),
                }
                self.after(now, &Cause::Destroy);
                self.settle(now);
            }
            Op::Reply(pick, spec) => {
                let n = self.inflight.len();
                if n == 0 {
                    return;
                }
                let Some(sent) = self.inflight.values().nth(usize::from(*pick) % n).cloned() else {
                    return;
                };
                let reply = self.reply(&sent, spec);
                self.deliver(sent.id, reply);
            }
            Op::Late(pick, spec) => {
                let n = self.log.len();
                if n == 0 {
                    return;
                }
                let sent = self.log[usize::from(*pick) % n].clone();
                let reply = self.reply(&sent, spec);
                self.deliver(sent.id, reply);
            }
            Op::Timeout => self.tick(now),
            Op::Advance(Millis(ms)) => {
                let to = now + Duration::from_millis(u64::from(*ms));
                self.advance(to);
            }
            Op::Jump(Millis(ms)) => {
                let to = now + Duration::from_millis(u64::from(*ms));
                self.now = to;
                self.tick(to);
            }
        }
    }

    fn cancel(&mut self) {
        let now = self.now;
        let before = self.expect.clone();
        self.m.cancel(now);
        if let Expect::Held(_) = before {
            self.expect = Expect::Releasing;
        }
        self.after(now, &Cause::Cancel(before));
        self.settle(now);
    }

    /// The reply `spec` describes to `sent`.
    fn reply(&mut self, sent: &Sent, spec: &Spec) -> Reply {
        match spec {
            Spec::Plausible(p) => self.plausible(sent, p),
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

    fn plausible(&mut self, sent: &Sent, p: &Plausible) -> Reply {
        let (a, b, c, n) = (usize::from(p.a), usize::from(p.b), usize::from(p.c), p.n);
        let known = KNOWN_SESSIONS[n as usize % KNOWN_SESSIONS.len()];
        let meta = |index: u64| {
            vec![
                ("X-Consul-Index", index.to_string()),
                ("X-Consul-KnownLeader", "true".to_owned()),
                ("X-Consul-LastContact", "0".to_owned()),
            ]
        };
        match sent.kind() {
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
            Kind::Destroy(_) | Kind::Release { .. } | Kind::Delete { .. } => match a % 6 {
                0 => response(200, &[], "false"),
                1 => response(500, &[], "rpc error making call: EOF"),
                _ => response(200, &[], "true\n"),
            },
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
            Kind::Acquire { .. } => match a % 8 {
                0 | 1 => response(200, &[], "false"),
                2 => response(500, &[], format!("invalid session \"{}\"", self.ours())),
                3 => response(500, &[], "No cluster leader"),
                4 => response(403, &[], "Permission denied"),
                _ => response(200, &[], "true"),
            },
            Kind::Get { index, .. } => {
                let sent_index = index.unwrap_or(0);
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
                if (b / 32) % 2 == 0 {
                    headers.push(("X-Consul-LastContact", (n % 10_000).to_string()));
                }
                if a % 10 == 0 {
                    return response(404, &headers, "");
                }
                let ours = self.ours();
                let session = match c % 8 {
                    0 => None,
                    1..=4 => Some(ours.as_str()),
                    5 => Some("other"),
                    6 => Some(known),
                    _ => Some(""),
                };
                let flags = match (c / 8) % 8 {
                    0 => 0,
                    1 => SEMAPHORE_FLAG_VALUE,
                    2 => n,
                    _ => LOCK_FLAG_VALUE,
                };
                let lock_index = match (c / 64) % 4 {
                    0 => n,
                    1 => self.last_lock_index.saturating_sub(1),
                    2 => 0,
                    _ => self.last_lock_index.saturating_add(1 + n % 2),
                };
                self.last_lock_index = lock_index;
                let pair = kv_json(session, flags, lock_index, n % 100);
                let body = match a % 16 {
                    1 => format!("[{pair},{pair}]"),
                    2 => "[]".to_owned(),
                    3 => "null".to_owned(),
                    _ => format!("[{pair}]"),
                };
                response(200, &headers, body)
            }
            Kind::Other => response(400, &[], "?"),
        }
    }

    /// A reply a healthy, idle Consul would give (used to wind down).
    fn benign(&mut self, sent: &Sent) -> Reply {
        match sent.kind() {
            Kind::Create => {
                self.created += 1;
                response(200, &[], format!("{{\"ID\":\"g-{}\"}}", self.created))
            }
            Kind::Renew(id) => response(
                200,
                &[],
                format!("[{}]", session_json(&id, "15s", 15_000_000_000)),
            ),
            Kind::Destroy(_) | Kind::Release { .. } | Kind::Delete { .. } => response(200, &[], "true"),
            Kind::Info(_) => response(200, &[("X-Consul-Index", "1".to_owned())], "[]"),
            Kind::Acquire { .. } => response(200, &[], "false"),
            Kind::Get { index, .. } => response(
                404,
                &[("X-Consul-Index", index.unwrap_or(0).saturating_add(1).to_string())],
                "",
            ),
            Kind::Other => response(400, &[], "?"),
        }
    }

    /// Hands the machine the reply to request `id`.
    fn deliver(&mut self, id: RequestId, reply: Reply) {
        let now = self.now;
        let sent = self
            .inflight
            .remove(&id)
            .or_else(|| self.log.iter().find(|s| s.id == id).cloned());
        let cause = reply_facts(sent.as_ref(), &reply);
        if tracing() {
            let what = sent.as_ref().map_or_else(|| "?".to_owned(), Sent::describe);
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
        self.m.handle_response(now, id, reply);
        self.after(now, &cause);
        self.settle(now);
    }

    /// `handle_timeout(now)`, as a driver whose timer fired.
    fn tick(&mut self, now: Instant) {
        self.prune(now);
        self.m.handle_timeout(now);
        self.after(now, &Cause::Timeout);
        self.settle(now);
    }

    /// Moves time to `to`, calling `handle_timeout` at every instant the machine asks for, and
    /// once early (half-way) before each, which must do nothing.
    fn advance(&mut self, to: Instant) {
        let mut ticks = 0u32;
        while let Some(t) = self.m.poll_timeout().filter(|t| *t <= to) {
            ticks += 1;
            assert!(
                ticks < 20_000,
                "over 20000 timers in {:?}: the machine spins (status {:?})",
                to - self.now,
                self.m.status()
            );
            if t > self.now {
                let mid = self.now + (t - self.now) / 2;
                if mid > self.now {
                    self.early(mid);
                }
                self.now = t;
            }
            self.tick(self.now);
        }
        self.now = to;
        self.prune(to);
    }

    /// A `handle_timeout` before anything is due: must do nothing.
    fn early(&mut self, at: Instant) {
        if let Some(t) = self.m.poll_timeout() {
            assert!(t > at, "not early");
        }
        self.m.handle_timeout(at);
        if let Some(action) = self.m.poll_action() {
            panic!("an early handle_timeout acted: {action:?}");
        }
    }

    /// Calls `handle_timeout(now)` while the machine says something is due, then once more, which
    /// must do nothing.
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
                    self.m.handle_timeout(now);
                    if let Some(action) = self.m.poll_action() {
                        panic!("a spurious handle_timeout acted: {action:?}");
                    }
                    return;
                }
            }
        }
        panic!(
            "poll_timeout() stays due however often handle_timeout(now) is called: a driver would \
             spin (status {:?}, in flight {:?})",
            self.m.status(),
            self.inflight.values().map(Sent::describe).collect::<Vec<_>>()
        );
    }

    fn prune(&mut self, now: Instant) {
        self.inflight.retain(|_, s| s.deadline > now);
    }

    /// Drains the actions of one step and checks the invariants.
    fn after(&mut self, now: Instant, cause: &Cause) {
        let mut actions = 0;
        let mut events = Vec::new();
        let mut sent = Vec::new();
        while let Some(action) = self.m.poll_action() {
            actions += 1;
            match action {
                Action::Send(t) => {
                    let s = Sent::new(&t, now);
                    if tracing() {
                        eprintln!(
                            "    [{:>10.3?}] send {} {} (deadline +{:?})",
                            now - self.base,
                            s.id,
                            s.describe(),
                            s.deadline - now
                        );
                    }
                    check_send(&s, now);
                    sent.push(s.kind());
                    if s.kind() == Kind::Create {
                        self.last_create = Some(s.id);
                    }
                    self.inflight.insert(s.id, s.clone());
                    self.log.push(s);
                }
                Action::Event(e) => {
                    if tracing() {
                        eprintln!("    [{:>10.3?}] event {e:?}", now - self.base);
                    }
                    events.push(e);
                }
            }
        }
        if self.quiescent && matches!(cause, Cause::Reply { .. } | Cause::Timeout) {
            assert_eq!(
                actions, 0,
                "a quiescent machine acted ({cause:?}): {sent:?} {events:?}"
            );
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
        if let Cause::Reply { granted: Some(s), .. } = cause
            && !self.granted.contains(s)
        {
            self.granted.push(s.clone());
        }
        for e in events {
            self.on_event(&e, cause);
            self.events.push(e);
        }
        if let Expect::Held(token) = &self.expect {
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
    }

    fn on_event(&mut self, e: &LockEvent, cause: &Cause) {
        let next = match (e, &self.expect) {
            (LockEvent::Acquired(token), Expect::Acquiring) => {
                assert_eq!(token.key.as_str(), KEY, "Acquired names another key");
                let session = token.session.to_string();
                assert!(
                    self.granted.contains(&session),
                    "Acquired({token:?}) but no acquire for that session was answered true (granted: {:?})",
                    self.granted
                );
                if let Some(deadline) = self.m.session().renew_deadline() {
                    assert!(self.now < deadline, "Acquired at or past the renew deadline");
                }
                match cause {
                    Cause::Reply { pair, .. } => assert_eq!(
                        pair,
                        &Some((Some(session), token.lock_index)),
                        "Acquired must carry the session and LockIndex of the read it follows"
                    ),
                    other => panic!("Acquired on {other:?}, not on a read's reply"),
                }
                Expect::Held(token.clone())
            }
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
            | (LockEvent::Released, Expect::Releasing)
            | (LockEvent::Destroyed, Expect::Destroying) => Expect::Idle,
            (e, state) => panic!("event {e:?} while {state:?}"),
        };
        self.expect = next;
    }

    fn check_state(&self, now: Instant) {
        let m = &self.m;
        assert_eq!(
            m.status(),
            self.expect.status(),
            "status() disagrees with the events"
        );
        if let Some(t) = m.poll_timeout() {
            assert!(t >= now, "poll_timeout() is {:?} before the latest now", now - t);
        }
        if m.is_quiescent() {
            assert_eq!(m.poll_timeout(), None, "quiescent, yet wants a timeout");
            assert_eq!(m.in_flight(), 0, "quiescent, yet waits for requests");
            assert_eq!(self.expect, Expect::Idle, "quiescent, yet not idle");
        }
        if let Some(id) = m.session().id() {
            let renews = self
                .inflight
                .values()
                .filter(|s| s.renews(id.as_str()) && Some(s.id) > self.last_create)
                .count();
            assert!(renews <= 1, "{renews} renews of {id} in flight");
            assert_eq!(
                renews == 1,
                m.session().renew_in_flight(),
                "renew_in_flight() disagrees with the requests in flight ({renews})"
            );
        }
        if let Some(ttl) = m.session().ttl() {
            // Whatever a renew reply says (fuzz finding F3).
            assert!(
                (Duration::from_secs(10)..=Duration::from_secs(86_400)).contains(&ttl),
                "renewing by a TTL of {ttl:?}, outside Consul's 10 s to 24 h"
            );
        }
        if self.expect == Expect::Acquiring {
            // Something always comes due within 2 minutes: a read's wait (at most 30 s here plus
            // slack), a request's timeout, a backoff, a lock-delay (at most Consul's 60 s, whatever
            // a session info says: fuzz finding F2).
            let t = m.poll_timeout();
            assert!(
                t.is_some_and(|t| t <= now + Duration::from_secs(120)),
                "acquiring, yet nothing due within 2 minutes: {:?}",
                t.map(|t| t - now)
            );
        }
        if let Expect::Held(token) = &self.expect {
            assert_eq!(m.token(), Some(token), "token() is not the Acquired token");
            assert_eq!(m.session().id(), Some(&token.session), "held on another session");
            // After every call, not only once the due timers are served (fuzz finding F1).
            if let Some(deadline) = m.session().renew_deadline() {
                assert!(now < deadline, "still held at or past the renew deadline");
            }
        } else {
            assert_eq!(m.token(), None, "a token while not held");
        }
    }

    /// Cancels, then answers everything as a healthy Consul would: the machine must come to rest
    /// within 120 s.
    pub fn wind_down(&mut self) {
        self.cancel();
        let until = self.now + Duration::from_secs(120);
        while !self.m.is_quiescent() && self.now < until {
            let ids: Vec<RequestId> = self.inflight.keys().copied().collect();
            for id in ids {
                if let Some(sent) = self.inflight.get(&id).cloned() {
                    let reply = self.benign(&sent);
                    self.deliver(id, reply);
                }
            }
            if self.m.is_quiescent() {
                break;
            }
            let next = self
                .m
                .poll_timeout()
                .filter(|t| *t <= until)
                .unwrap_or(until)
                .max(self.now + Duration::from_millis(1));
            self.advance(next.min(until));
        }
        assert!(
            self.m.is_quiescent(),
            "not at rest 120 s after cancel against a healthy agent: status {:?}, in flight {:?}",
            self.m.status(),
            self.inflight.values().map(Sent::describe).collect::<Vec<_>>()
        );
        assert_eq!(self.m.status(), LockStatus::Idle);
    }
}

/// Checks a request as it is sent.
fn check_send(s: &Sent, now: Instant) {
    assert_ne!(s.kind(), Kind::Other, "unrecognised request {}", s.describe());
    assert!(s.deadline > now, "{} has a deadline not after now", s.describe());
    assert_ne!(s.param("index"), Some("0"), "{} blocks on index 0", s.describe());
    if s.param("index").is_some() {
        let wait = s
            .wait()
            .unwrap_or_else(|| panic!("{} has an index and no wait", s.describe()));
        assert!(
            wait <= Duration::from_secs(600),
            "{} waits over Consul's 10 min",
            s.describe()
        );
        assert!(
            s.deadline > now + wait + wait / 16,
            "{}: a blocking read's deadline must cover wait + wait/16 + a margin",
            s.describe()
        );
    }
}

/// Runs a whole input: the setup, up to `max_ops` operations, the wind-down.
pub fn run(data: &[u8], max_ops: usize) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let mut driver = Driver::new(&setup);
    for _ in 0..max_ops {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        driver.step(&op);
    }
    driver.wind_down();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64, for random inputs without a fuzzer.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
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

    #[test]
    fn random_runs_keep_the_invariants() {
        let seeds = std::env::var("FUZZ_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300u64);
        for seed in 0..seeds {
            let data = bytes(seed, 2048);
            if std::panic::catch_unwind(|| run(&data, 400)).is_err() {
                panic!("seed {seed} fails");
            }
        }
    }

    /// Writes seeds for the `lock_machine` target: the first random inputs (SplitMix64 bytes,
    /// deterministic) whose runs end in each outcome. `cargo test --lib -- --ignored write_seeds`.
    #[test]
    #[ignore = "writes fuzz/seeds/lock_machine"]
    fn write_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/lock_machine");
        std::fs::create_dir_all(&dir).unwrap();
        type Outcome = (&'static str, fn(&[LockEvent]) -> bool);
        let outcomes: [Outcome; 7] = [
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
        for (name, wanted) in outcomes {
            let mut found = 0;
            for seed in 0..20_000u64 {
                let data = bytes(seed, 1024);
                let mut u = Unstructured::new(&data);
                let setup = Setup::arbitrary(&mut u).unwrap();
                let mut d = Driver::new(&setup);
                while !u.is_empty() {
                    let Ok(op) = Op::arbitrary(&mut u) else { break };
                    d.step(&op);
                }
                if wanted(&d.events) {
                    d.wind_down();
                    std::fs::write(dir.join(format!("{name}-{found}")), &data).unwrap();
                    found += 1;
                    if found == 3 {
                        break;
                    }
                }
            }
            assert!(found > 0, "no input found for {name}");
        }
    }

    /// Replays one seed of `random_runs_keep_the_invariants`: `FUZZ_SEED=n FUZZ_TRACE=1`.
    #[test]
    #[ignore = "replays FUZZ_SEED"]
    fn replay_seed() {
        let seed = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        run(&bytes(seed, 2048), 400);
    }

    #[test]
    fn a_plausible_agent_gets_the_lock_held() {
        // Lock, then answer everything plausibly with the "all is well" choices.
        let setup = Setup {
            existing: false,
            try_once: false,
            monitor_retries: None,
            ttl_secs: 15,
            wait_secs: 15,
            lock_delay_secs: None,
            seed: 1,
            value: Vec::new(),
        };
        let mut d = Driver::new(&setup);
        d.step(&Op::Lock);
        let well = Plausible {
            a: 7,
            b: 5,
            c: 8 * 3 + 64 * 3 + 1,
            n: 3,
        };
        for _ in 0..6 {
            d.step(&Op::Reply(0, Spec::Plausible(well.clone())));
        }
        assert!(
            d.events.iter().any(|e| matches!(e, LockEvent::Acquired(_))),
            "{:?}",
            d.events
        );
        d.step(&Op::Advance(Millis(60_000)));
        d.wind_down();
    }
}
/// What the inputs of a corpus reach: `FUZZ_CORPUS=fuzz/corpus/lock_machine cargo test --release
/// --lib -- --ignored corpus_outcomes --nocapture`.
#[cfg(test)]
mod corpus {
    use super::*;

    #[test]
    #[ignore = "reads FUZZ_CORPUS"]
    fn corpus_outcomes() {
        let dir = std::env::var("FUZZ_CORPUS").unwrap_or_else(|_| "corpus/lock_machine".to_owned());
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            inputs += 1;
            let mut u = Unstructured::new(&data);
            let Ok(setup) = Setup::arbitrary(&mut u) else {
                continue;
            };
            let mut d = Driver::new(&setup);
            for _ in 0..512 {
                if u.is_empty() {
                    break;
                }
                let Ok(op) = Op::arbitrary(&mut u) else { break };
                d.step(&op);
            }
            let mut seen: Vec<String> = d
                .events
                .iter()
                .map(|e| {
                    // The variant and the reason's or error's variant: `Lost(TakenBy`.
                    let s = format!("{e:?}");
                    let name: String = s
                        .chars()
                        .take_while(|c| c.is_ascii_alphabetic() || *c == '(')
                        .collect();
                    let parts: Vec<&str> = name.split('(').filter(|p| !p.is_empty()).take(2).collect();
                    parts.join("(")
                })
                .collect();
            seen.sort();
            seen.dedup();
            for s in seen {
                *counts.entry(s).or_default() += 1;
            }
            d.wind_down();
        }
        eprintln!("{inputs} inputs in {dir}; inputs whose run saw each event:");
        for (k, v) in counts {
            eprintln!("  {v:>6}  {k}");
        }
    }
}
