//! What the machine targets share: the run's grammar ([`Op`], [`Spec`], [`Millis`]), the replies
//! every machine's session gets ([`SessionAgent`]), and a [`Driver`] that runs any holding machine
//! ([`Machine`]: a lock, a semaphore) against an agent [`Model`] and checks the invariants common
//! to them after every step (they are those of core/tests/support, which the fuzz crate can't
//! import):
//! - no panic;
//! - a quiescent machine emits nothing in answer to a reply or a timeout (only to an operation);
//! - a spurious or early `handle_timeout` does nothing, and a due timer does not stay due;
//! - `poll_timeout()` is never before the latest `now`;
//! - at most one renew of the session in flight, and `renew_in_flight()` agrees;
//! - every request's deadline is after `now` (a blocking read's after `now + wait + wait/16`), no
//!   read blocks on index 0, no wait exceeds Consul's 10 minutes;
//! - the events follow the operations' grammar and agree with `status()`; `Acquired` only where
//!   the model says it may come, and before any `Lost`/`Released`;
//! - while held: `token()` is the token, the session is the token's, the renew deadline has not
//!   passed, and nothing that gives the hold up goes out (the model says what does);
//! - the TTL in force stays within Consul's 10 s to 24 h; while acquiring, something always comes
//!   due within 2 minutes;
//! - at the end, a cancel against an agent that answers everything brings the machine to rest
//!   within 120 s.
//!
//! What is particular to a machine (its requests, the plausible replies to them, when `Acquired`
//! may come) is its [`Model`]: `lock_driver` and `semaphore_driver`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use consul_lock_core::machine::{
    Action, FencingToken, LockError, LockEvent, LockMachine, LockStatus, Reply, RequestId, SemaphoreMachine,
    SessionMachine, TransportError, TransportErrorKind,
};

use crate::arb_reply::{self, KNOWN_SESSIONS, TTLS};
use crate::request::{Kind, Sent};

/// The caller's session, when the options use one.
pub const EXISTING: &str = "mine";

/// The surface of a holding machine the driver uses (the inherent API that `LockMachine` and
/// `SemaphoreMachine` share; core's `HoldMachine` trait lacks the queries).
pub trait Machine {
    /// `lock(now)`.
    fn lock(&mut self, now: Instant) -> Result<(), LockError>;
    /// `unlock(now)`.
    fn unlock(&mut self, now: Instant) -> Result<(), LockError>;
    /// `cancel(now)`.
    fn cancel(&mut self, now: Instant);
    /// `destroy(now)`.
    fn destroy(&mut self, now: Instant) -> Result<(), LockError>;
    /// `handle_response(now, id, reply)`.
    fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply);
    /// `handle_timeout(now)`.
    fn handle_timeout(&mut self, now: Instant);
    /// `poll_action()`.
    fn poll_action(&mut self) -> Option<Action<LockEvent>>;
    /// `poll_timeout()`.
    fn poll_timeout(&self) -> Option<Instant>;
    /// `status()`.
    fn status(&self) -> LockStatus;
    /// `token()`.
    fn token(&self) -> Option<&FencingToken>;
    /// `session()`.
    fn session(&self) -> &SessionMachine;
    /// `is_quiescent()`.
    fn is_quiescent(&self) -> bool;
    /// `in_flight()`.
    fn in_flight(&self) -> usize;
    /// Whether the options give up after one wait.
    fn try_once(&self) -> bool;
}

macro_rules! machine {
    ($t:ty, $try_once:ident) => {
        impl Machine for $t {
            fn lock(&mut self, now: Instant) -> Result<(), LockError> {
                <$t>::lock(self, now)
            }
            fn unlock(&mut self, now: Instant) -> Result<(), LockError> {
                <$t>::unlock(self, now)
            }
            fn cancel(&mut self, now: Instant) {
                <$t>::cancel(self, now)
            }
            fn destroy(&mut self, now: Instant) -> Result<(), LockError> {
                <$t>::destroy(self, now)
            }
            fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
                <$t>::handle_response(self, now, id, reply)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$t>::handle_timeout(self, now)
            }
            fn poll_action(&mut self) -> Option<Action<LockEvent>> {
                <$t>::poll_action(self)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$t>::poll_timeout(self)
            }
            fn status(&self) -> LockStatus {
                <$t>::status(self)
            }
            fn token(&self) -> Option<&FencingToken> {
                <$t>::token(self)
            }
            fn session(&self) -> &SessionMachine {
                <$t>::session(self)
            }
            fn is_quiescent(&self) -> bool {
                <$t>::is_quiescent(self)
            }
            fn in_flight(&self) -> usize {
                <$t>::in_flight(self)
            }
            fn try_once(&self) -> bool {
                self.options().$try_once
            }
        }
    };
}

machine!(LockMachine, lock_try_once);
machine!(SemaphoreMachine, try_once);

/// What is particular to one machine: the requests it may send, a hostile agent's plausible
/// replies to them, a healthy agent's, and when `Acquired` may come.
pub trait Model {
    /// The machine.
    type M: Machine;
    /// What a reply says that the checks need, read before it is handed over.
    type Facts: Clone + Debug;
    /// Checks a request as it is sent (beyond [`check_send`]): a kind the machine sends, with
    /// the right key, flags and body.
    fn check_send(&mut self, m: &Self::M, s: &Sent);
    /// A well-formed reply of the request's kind with hostile content.
    fn plausible(&mut self, m: &Self::M, sent: &Sent, p: &Plausible) -> Reply;
    /// The reply a healthy, idle Consul would give (to wind down).
    fn benign(&mut self, sent: &Sent) -> Reply;
    /// What `reply` to `sent` says.
    fn facts(&self, m: &Self::M, sent: &Sent, reply: &Reply) -> Self::Facts;
    /// A new attempt (`lock()` accepted): forget what the last one witnessed.
    fn on_lock(&mut self);
    /// A reply's facts. `live`: the reply answers a request of the current attempt still in
    /// flight (not a late or duplicate one).
    fn witness(&mut self, facts: &Self::Facts, live: bool);
    /// Checks an `Acquired(token)` the machine emitted in answer to `cause`.
    fn check_acquired(&self, m: &Self::M, token: &FencingToken, cause: &Cause<Self::Facts>);
    /// Whether `s`, sent while holding with `token`, gives the hold up.
    fn gives_up(&self, token: &FencingToken, s: &Sent) -> bool;
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

/// The state the events so far imply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Nothing under way.
    Idle,
    /// `lock()` accepted, no outcome yet.
    Acquiring,
    /// `Acquired` with this token.
    Held(FencingToken),
    /// `unlock()` (or `cancel()` while held) accepted.
    Releasing,
    /// `destroy()` accepted.
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

/// What a step was.
#[derive(Clone, Debug)]
pub enum Cause<F> {
    /// `lock()`.
    Lock,
    /// `unlock()`.
    Unlock,
    /// `destroy()`.
    Destroy,
    /// `cancel()`, in that state.
    Cancel(Expect),
    /// A reply, and what it said (`None`: to a request never sent).
    Reply(Option<F>),
    /// `handle_timeout()`.
    Timeout,
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

/// One machine under test, with what its driver knows.
pub struct Driver<T: Model> {
    m: T::M,
    /// The agent's model.
    pub model: T,
    base: Instant,
    now: Instant,
    inflight: BTreeMap<RequestId, Sent>,
    log: Vec<Sent>,
    expect: Expect,
    quiescent: bool,
    /// The last request sent before the current attempt's `lock()`.
    attempt_after: Option<RequestId>,
    /// The last session create sent: the session in use came from it, and only renews sent after
    /// it are of that session (a hostile agent may hand out the same ID twice).
    last_create: Option<RequestId>,
    /// Events seen, for the report.
    pub events: Vec<LockEvent>,
}

impl<T: Model> Driver<T> {
    /// A driver for machine `m`, answered by `model`.
    pub fn new(m: T::M, model: T) -> Driver<T> {
        assert!(m.is_quiescent(), "a new machine is quiescent");
        assert_eq!(m.poll_timeout(), None, "a new machine wants no timeout");
        let now = Instant::now();
        Driver {
            m,
            model,
            base: now,
            now,
            inflight: BTreeMap::new(),
            log: Vec::new(),
            expect: Expect::Idle,
            quiescent: true,
            attempt_after: None,
            last_create: None,
            events: Vec::new(),
        }
    }

    /// The machine.
    pub fn machine(&self) -> &T::M {
        &self.m
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
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
                        self.attempt_after = self.log.last().map(|s| s.id);
                        self.model.on_lock();
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
            Spec::Plausible(p) => self.model.plausible(&self.m, sent, p),
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
        let now = self.now;
        let live = self.inflight.contains_key(&id) && Some(id) > self.attempt_after;
        let sent = self
            .inflight
            .remove(&id)
            .or_else(|| self.log.iter().find(|s| s.id == id).cloned());
        let facts = sent.as_ref().map(|s| self.model.facts(&self.m, s, &reply));
        if let Some(f) = &facts {
            self.model.witness(f, live);
        }
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
        self.after(now, &Cause::Reply(facts));
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
    fn after(&mut self, now: Instant, cause: &Cause<T::Facts>) {
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
                    self.model.check_send(&self.m, &s);
                    if s.kind() == Kind::Create {
                        self.last_create = Some(s.id);
                    }
                    self.inflight.insert(s.id, s.clone());
                    self.log.push(s.clone());
                    sent.push(s);
                }
                Action::Event(e) => {
                    if tracing() {
                        eprintln!("    [{:>10.3?}] event {e:?}", now - self.base);
                    }
                    events.push(e);
                }
            }
        }
        if self.quiescent && matches!(cause, Cause::Reply(_) | Cause::Timeout) {
            let sent: Vec<Kind> = sent.iter().map(Sent::kind).collect();
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
        for e in events {
            self.on_event(&e, cause);
            self.events.push(e);
        }
        if let Expect::Held(token) = &self.expect {
            for s in &sent {
                assert!(
                    !self.model.gives_up(token, s),
                    "{} sent while holding with {}",
                    s.describe(),
                    token.session
                );
            }
        }
        self.check_state(now);
        self.quiescent = self.m.is_quiescent();
    }

    fn on_event(&mut self, e: &LockEvent, cause: &Cause<T::Facts>) {
        let next = match (e, &self.expect) {
            (LockEvent::Acquired(token), Expect::Acquiring) => {
                if let Some(deadline) = self.m.session().renew_deadline() {
                    assert!(self.now < deadline, "Acquired at or past the renew deadline");
                }
                self.model.check_acquired(&self.m, token, cause);
                Expect::Held(token.clone())
            }
            (LockEvent::Retrying(_), Expect::Acquiring) => Expect::Acquiring,
            (LockEvent::GaveUp, Expect::Acquiring) => {
                assert!(self.m.try_once(), "GaveUp without try-once");
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
                    let reply = self.model.benign(&sent);
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

/// Checks a request as it is sent, whatever the machine.
pub fn check_send(s: &Sent, now: Instant) {
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

/// Runs the operations of `u` (up to `max_ops`) on `driver`, then winds it down.
pub fn run_ops<T: Model>(driver: &mut Driver<T>, u: &mut Unstructured<'_>, max_ops: usize) {
    for _ in 0..max_ops {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(u) else {
            break;
        };
        driver.step(&op);
    }
    driver.wind_down();
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
