//! The invariants of a holding machine (core's `LockMachine`, `SemaphoreMachine`: anything that
//! is a [`HoldMachine`]), checked after every step by one [`Checker`] that the core's hand-driven
//! tests and the fuzz targets both drive the machines through.
//!
//! A [`Checker`] drains `poll_action()` after every call, keeps the requests in flight, records
//! the events, and checks:
//! - nothing is emitted by a quiescent machine in answer to a reply or a timeout (only to an
//!   operation); `cancel()` of an idle machine does nothing, and of an acquiring or destroying one
//!   reports `Cancelled` at once;
//! - a spurious or early `handle_timeout` does nothing, and a due timer never stays due after
//!   `handle_timeout` (a driver would spin);
//! - `poll_timeout()` is never before the latest `now`; a quiescent machine wants no timeout,
//!   waits for no request and is idle;
//! - at most one renew of the session in flight, and `renew_in_flight()` agrees;
//! - every request is one the machine sends ([`Holder::check_send`]), with a deadline after `now`
//!   (a blocking read's after `now + wait + wait/16`); no read blocks on index 0, no wait exceeds
//!   Consul's 10 minutes;
//! - the events follow the operations' grammar and agree with `status()`; `Acquired` comes only
//!   when the replies of this attempt allow it ([`Holder::check_acquired`]), never at or past the
//!   renew deadline; `GaveUp` only with try-once; `Cancelled` only from `cancel()`;
//! - while held: `token()` is the token, the session is the token's, the renew deadline has not
//!   passed, and nothing that gives the hold up goes out ([`Holder::gives_up`]);
//! - the TTL in force stays within Consul's 10 s to 24 h; while acquiring, something always comes
//!   due within 2 minutes ([`Checker::due_within`]).
//!
//! What differs between a lock and a semaphore (the requests, when `Acquired` may come, what gives
//! the hold up, the try-once option, the key names) is its [`Holder`] impl: [`lock`] and
//! [`semaphore`].
//!
//! An observer holds nothing: what its reports keep is [`observe::check_reports`].
//!
//! The reliability lab's log of beliefs and fenced writes on a real, faulted cluster is checked by
//! [`lab::check`].
//!
//! It is a crate of its own, depending only on the core, so that the core's integration tests (as
//! a dev-dependency: they link the same core library this crate does) and the fuzz crate (by
//! path) use the one copy.

pub mod lab;
pub mod lock;
pub mod observe;
pub mod request;
pub mod semaphore;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use consul_lock_core::api::RequestClass;
use consul_lock_core::machine::{
    Action, FencingToken, HoldMachine, LockEvent, LockStatus, Misuse, Reply, RequestId, SessionMachine,
};

pub use request::{Kind, Sent};

/// What differs between holding machines, for the checks: read the replies, check the requests,
/// and say when `Acquired` may come and what gives a hold up.
pub trait Holder: HoldMachine + Sized {
    /// What a reply says that the checks need, read before it is handed over (replies can't be
    /// cloned).
    type Facts: Clone + Debug;
    /// What the current attempt has witnessed (grants, holders shown), and whatever else the
    /// checks keep across steps.
    type Witness: Default + Debug;
    /// The session machine.
    fn session(&self) -> &SessionMachine;
    /// Whether the options give up after one wait.
    fn try_once(&self) -> bool;
    /// The key a token names.
    fn token_key(&self) -> String;
    /// What `reply` to `sent` says.
    fn facts(&self, sent: &Sent, reply: &Reply) -> Self::Facts;
    /// Checks a request as it is sent (beyond [`check_send`]): a kind the machine sends, with
    /// the right key, flags and body.
    fn check_send(&self, w: &mut Self::Witness, s: &Sent);
    /// A new attempt (`lock()` accepted): forget what the last one witnessed.
    fn on_lock(w: &mut Self::Witness);
    /// A reply's facts. `live`: the reply answers a request of the current attempt still in
    /// flight (not a late or duplicate one).
    fn witness(&self, w: &mut Self::Witness, facts: &Self::Facts, live: bool);
    /// Checks an `Acquired(token)` emitted in answer to `cause`.
    fn check_acquired(&self, w: &Self::Witness, token: &FencingToken, cause: &Cause<Self::Facts>);
    /// Whether `s`, sent while holding with `token`, gives the hold up.
    fn gives_up(&self, token: &FencingToken, s: &Sent) -> bool;
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
    /// The status a machine in this state reports.
    pub fn status(&self) -> LockStatus {
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
    /// `proclaim()`.
    Proclaim,
    /// `cancel()`, in that state.
    Cancel(Expect),
    /// A reply, and what it said (`None`: to a request never sent).
    Reply(Option<F>),
    /// `handle_timeout()`.
    Timeout,
}

/// One machine, with what its driver knows: the requests in flight, every request sent, the
/// events, and the state the events imply; every call checked (see the crate's documentation).
pub struct Checker<M: Holder> {
    /// The machine. (Calling it directly bypasses the checks.)
    pub m: M,
    /// Sent, not answered, deadline not passed.
    pub inflight: BTreeMap<RequestId, Sent>,
    /// Every request sent, in order.
    pub log: Vec<Sent>,
    /// Every event, with when it came.
    pub events: Vec<(Instant, LockEvent)>,
    /// Checks after every step (off only to look at a broken machine).
    pub checks: bool,
    /// While acquiring, something must come due within this (`None`: not checked); 2 minutes
    /// unless a test of long waits says otherwise.
    pub due_within: Option<Duration>,
    seen: usize,
    expect: Expect,
    quiescent: bool,
    /// The last request sent before the current attempt's `lock()`.
    attempt_after: Option<RequestId>,
    /// The last session create sent: the session in use came from it, and only renews sent after
    /// it are of that session (a hostile agent may hand out the same ID twice).
    last_create: Option<RequestId>,
    witness: M::Witness,
}

impl<M: Holder> Checker<M> {
    /// Checks machine `m`, new.
    pub fn new(m: M) -> Checker<M> {
        assert!(m.is_quiescent(), "a new machine is quiescent");
        assert_eq!(m.poll_timeout(), None, "a new machine wants no timeout");
        Checker {
            m,
            inflight: BTreeMap::new(),
            log: Vec::new(),
            events: Vec::new(),
            checks: true,
            due_within: Some(Duration::from_secs(120)),
            seen: 0,
            expect: Expect::Idle,
            quiescent: true,
            attempt_after: None,
            last_create: None,
            witness: M::Witness::default(),
        }
    }

    /// The state the events so far imply.
    pub fn expected(&self) -> &Expect {
        &self.expect
    }

    /// What the checks keep of the current attempt.
    pub fn witnessed(&self) -> &M::Witness {
        &self.witness
    }

    // ----- operations ----------------------------------------------------------------------

    /// `lock(now)`, checked.
    pub fn lock(&mut self, now: Instant) -> Result<(), Misuse> {
        let r = self.m.lock(now);
        match (&r, &self.expect) {
            (Ok(()), Expect::Idle) => {
                self.expect = Expect::Acquiring;
                self.attempt_after = self.log.last().map(|s| s.id);
                M::on_lock(&mut self.witness);
            }
            (Err(Misuse::AlreadyHeld), Expect::Acquiring | Expect::Held(_)) => {}
            (Err(Misuse::Busy), Expect::Releasing | Expect::Destroying) => {}
            (r, e) => panic!("lock() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Lock);
        self.settle(now);
        r
    }

    /// `unlock(now)`, checked.
    pub fn unlock(&mut self, now: Instant) -> Result<(), Misuse> {
        let r = self.m.unlock(now);
        match (&r, &self.expect) {
            (Ok(()), Expect::Held(_)) => self.expect = Expect::Releasing,
            (Err(Misuse::NotHeld), e) if !matches!(e, Expect::Held(_)) => {}
            (r, e) => panic!("unlock() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Unlock);
        self.settle(now);
        r
    }

    /// `proclaim(now, value)`, checked: taken only while held.
    pub fn proclaim(&mut self, now: Instant, value: Vec<u8>) -> Result<(), Misuse> {
        let r = self.m.proclaim(now, value);
        match (&r, &self.expect) {
            (Ok(()) | Err(Misuse::Busy | Misuse::NotALock), Expect::Held(_)) => {}
            (Err(Misuse::NotHeld | Misuse::NotALock), e) if !matches!(e, Expect::Held(_)) => {}
            (r, e) => panic!("proclaim() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Proclaim);
        self.settle(now);
        r
    }

    /// `destroy(now)`, checked.
    pub fn destroy(&mut self, now: Instant) -> Result<(), Misuse> {
        let r = self.m.destroy(now);
        match (&r, &self.expect) {
            (Ok(()), Expect::Idle) => self.expect = Expect::Destroying,
            (Err(Misuse::AlreadyHeld), Expect::Held(_)) => {}
            (Err(Misuse::Busy), Expect::Acquiring | Expect::Releasing | Expect::Destroying) => {}
            (r, e) => panic!("destroy() answered {r:?} while {e:?}"),
        }
        self.after(now, &Cause::Destroy);
        self.settle(now);
        r
    }

    /// `cancel(now)`, checked.
    pub fn cancel(&mut self, now: Instant) {
        let before = self.expect.clone();
        self.m.cancel(now);
        if let Expect::Held(_) = before {
            self.expect = Expect::Releasing;
        }
        self.after(now, &Cause::Cancel(before));
        self.settle(now);
    }

    // ----- replies and time ----------------------------------------------------------------

    /// Hands the machine the reply to request `id` (in flight or not: late replies too).
    pub fn deliver(&mut self, now: Instant, id: RequestId, reply: Reply) {
        let live = self.inflight.contains_key(&id) && Some(id) > self.attempt_after;
        let sent = self
            .inflight
            .remove(&id)
            .or_else(|| self.log.iter().find(|s| s.id == id).cloned());
        let facts = sent.as_ref().map(|s| self.m.facts(s, &reply));
        if let Some(f) = &facts {
            self.m.witness(&mut self.witness, f, live);
        }
        self.m.handle_response(now, id, reply);
        self.after(now, &Cause::Reply(facts));
        self.settle(now);
    }

    /// Calls `handle_timeout(now)`, as a driver does when `poll_timeout()` is due; the requests
    /// whose deadline passed are taken as abandoned (the machine times them out itself).
    pub fn tick(&mut self, now: Instant) {
        self.prune(now);
        self.m.handle_timeout(now);
        self.after(now, &Cause::Timeout);
        self.settle(now);
    }

    /// Moves from `from` to `to`, calling `handle_timeout` at every instant the machine asks for,
    /// and once early (half-way) before each of them, which must do nothing.
    pub fn advance(&mut self, from: Instant, to: Instant) {
        let mut now = from;
        let mut ticks = 0u32;
        while let Some(t) = self.m.poll_timeout().filter(|t| *t <= to) {
            ticks += 1;
            assert!(
                ticks < 20_000,
                "over 20000 timers in {:?}: the machine spins (status {:?})",
                to - from,
                self.m.status()
            );
            if t > now {
                let mid = now + (t - now) / 2;
                if mid > now && self.checks {
                    self.early(mid);
                }
                now = t;
            }
            self.tick(now);
        }
        self.prune(to);
    }

    /// A `handle_timeout` before anything is due: must do nothing.
    pub fn early(&mut self, at: Instant) {
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
                    if self.checks {
                        // A spurious call at the same instant.
                        self.m.handle_timeout(now);
                        if let Some(action) = self.m.poll_action() {
                            panic!("a spurious handle_timeout acted: {action:?}");
                        }
                    }
                    return;
                }
            }
        }
        panic!(
            "poll_timeout() stays due at {now:?} however often handle_timeout(now) is called: a \
             driver would spin (status {:?}, in flight {:?})",
            self.m.status(),
            self.describe()
        );
    }

    fn prune(&mut self, now: Instant) {
        self.inflight.retain(|_, s| s.deadline > now);
    }

    // ----- looking -------------------------------------------------------------------------

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<LockEvent> {
        let new = self.events[self.seen..].iter().map(|(_, e)| e.clone()).collect();
        self.seen = self.events.len();
        new
    }

    /// The most recent request in flight matching `pattern` (see [`Sent::is`]), if any.
    pub fn find(&self, pattern: &str) -> Option<Sent> {
        self.inflight.values().rev().find(|s| s.is(pattern)).cloned()
    }

    /// The most recent request in flight matching `pattern`; panics if none does.
    pub fn expect(&self, pattern: &str) -> Sent {
        match self.find(pattern) {
            Some(s) => s,
            None => panic!(
                "no request in flight matches {pattern:?}; in flight: {:#?}",
                self.describe()
            ),
        }
    }

    /// How many requests in flight match `pattern`.
    pub fn count(&self, pattern: &str) -> usize {
        self.inflight.values().filter(|s| s.is(pattern)).count()
    }

    /// The requests in flight, described.
    pub fn describe(&self) -> Vec<String> {
        self.inflight.values().map(Sent::describe).collect()
    }

    // ----- the checks ----------------------------------------------------------------------

    /// Drains the actions of one step and checks the invariants.
    fn after(&mut self, now: Instant, cause: &Cause<M::Facts>) {
        let mut actions = 0;
        let mut events = Vec::new();
        let mut sent = Vec::new();
        while let Some(action) = self.m.poll_action() {
            actions += 1;
            match action {
                Action::Send(t) => {
                    let s = Sent::new(&t, now);
                    if self.checks {
                        check_send(&s, now);
                        self.m.check_send(&mut self.witness, &s);
                    }
                    if s.kind() == Kind::Create {
                        self.last_create = Some(s.id);
                    }
                    self.inflight.insert(s.id, s.clone());
                    self.log.push(s.clone());
                    sent.push(s);
                }
                Action::Event(e) => events.push(e),
            }
        }
        if !self.checks {
            self.events.extend(events.into_iter().map(|e| (now, e)));
            return;
        }
        if self.quiescent && matches!(cause, Cause::Reply(_) | Cause::Timeout) {
            let sent: Vec<String> = sent.iter().map(Sent::describe).collect();
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
            self.on_event(now, &e, cause);
            self.events.push((now, e));
        }
        if let Expect::Held(token) = &self.expect {
            // Never let go of a held key behind the user's back.
            for s in &sent {
                assert!(
                    !self.m.gives_up(token, s),
                    "{} sent while holding with {}",
                    s.describe(),
                    token.session
                );
            }
        }
        self.check_state(now);
        self.quiescent = self.m.is_quiescent();
    }

    fn on_event(&mut self, now: Instant, e: &LockEvent, cause: &Cause<M::Facts>) {
        let next = match (e, &self.expect) {
            (LockEvent::Acquired(token), Expect::Acquiring) => {
                assert_eq!(
                    token.key.as_str(),
                    self.m.token_key(),
                    "Acquired names another key"
                );
                if let Some(deadline) = self.m.session().renew_deadline() {
                    assert!(now < deadline, "Acquired at or past the renew deadline");
                }
                self.m.check_acquired(&self.witness, token, cause);
                Expect::Held(token.clone())
            }
            (LockEvent::Retrying(_), Expect::Acquiring) => Expect::Acquiring,
            // A proclaim's outcome comes while held; one the hold's end overtook, as it ends.
            (LockEvent::Proclaimed { .. } | LockEvent::ProclaimFailed(_), Expect::Held(token)) => {
                Expect::Held(token.clone())
            }
            (LockEvent::ProclaimFailed(_), Expect::Releasing) => Expect::Releasing,
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
        let session = m.session();
        assert_eq!(session.id(), m.session_id(), "session_id() is not the session's");
        if let Some(id) = session.id() {
            let renews = self
                .inflight
                .values()
                .filter(|s| s.renews(id.as_str()) && Some(s.id) > self.last_create)
                .count();
            assert!(renews <= 1, "{renews} renews of {id} in flight");
            assert_eq!(
                renews == 1,
                session.renew_in_flight(),
                "renew_in_flight() disagrees with the requests in flight ({renews})"
            );
        }
        if let Some(ttl) = session.ttl() {
            // Whatever a renew reply says (fuzz finding F3).
            assert!(
                (Duration::from_secs(10)..=Duration::from_secs(86_400)).contains(&ttl),
                "renewing by a TTL of {ttl:?}, outside Consul's 10 s to 24 h"
            );
        }
        if let (Expect::Acquiring, Some(within)) = (&self.expect, self.due_within) {
            // Something always comes due: a read's wait, a request's timeout, a backoff, a
            // lock-delay (at most Consul's 60 s, whatever a session info says: fuzz finding F2).
            let t = m.poll_timeout();
            assert!(
                t.is_some_and(|t| t <= now + within),
                "acquiring, yet nothing due within {within:?}: {:?}",
                t.map(|t| t - now)
            );
        }
        if let Expect::Held(token) = &self.expect {
            assert_eq!(m.token(), Some(token), "token() is not the Acquired token");
            assert_eq!(session.id(), Some(&token.session), "held on another session");
            // After every call, not only once the due timers are served (fuzz finding F1).
            if let Some(deadline) = session.renew_deadline() {
                assert!(now < deadline, "still held at or past the renew deadline");
            }
        } else {
            assert_eq!(m.token(), None, "a token while not held");
        }
    }
}

/// Checks a request as it is sent, whatever the machine.
pub fn check_send(s: &Sent, now: Instant) {
    assert_ne!(s.kind(), Kind::Other, "unrecognised request {}", s.describe());
    assert!(s.deadline > now, "{} has a deadline not after now", s.describe());
    assert_ne!(s.param("index"), Some("0"), "{} blocks on index 0", s.describe());
    if s.has("index") {
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
        // A driver budgeting its connections keeps prompt requests apart by this class.
        assert_eq!(
            s.class,
            RequestClass::BlockingRead { wait },
            "{}: a blocking read must say so",
            s.describe()
        );
    } else {
        assert_eq!(
            s.class,
            RequestClass::Prompt,
            "{}: not a blocking read",
            s.describe()
        );
    }
}
