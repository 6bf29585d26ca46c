//! Interop with the Go reference client on one real agent: `consul lock <prefix> <cmd>` (which
//! locks `<prefix>/.lock`) and the blocking driver take turns on the same key. Mutual exclusion
//! holds both ways (the Go child's run and our hold never overlap, by timestamps both sides append
//! to one file), neither side sees a flags conflict, and a release on either side hands over to a
//! waiter on the other at once. Handoff times are printed (run with `--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::time::{Duration, Instant};

use consul_lock_blocking::{Client, Lock, LockGuard, LockOptions};
use consul_lock_core::api::{ClientConfig, Key, KvGet, KvList, KvPair};
use consul_lock_core::machine::{LOCK_FLAG_VALUE, Waiting};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::{ConsulAgent, require_agent};
use consul_lock_testkit::golock::{GoLock, PATIENCE, Scratch, assert_exclusive, at, since, stamp};

/// How long a waiter is watched to show that it keeps waiting.
const STILL_WAITING: Duration = Duration::from_millis(800);
/// A handoff slower than this is a failure (it is tens of milliseconds when all is well; the
/// bound leaves room for a machine busy with other builds).
const HANDOFF_LIMIT: Duration = Duration::from_secs(5);

/// The agent's HTTP API.
struct Wire {
    config: ClientConfig,
    http: TestTransport,
}

impl Wire {
    fn get(&self, key: &str) -> Option<KvPair> {
        self.http
            .call(&self.config, &KvGet::new(Key::new(key).unwrap()))
            .expect("the agent answers")
            .unwrap()
            .value
    }
}

fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("blocking interop {key}");
    }
    options
}

/// One test's setup: its prefix, log directory and lock.
struct Setup {
    agent: &'static ConsulAgent,
    wire: Wire,
    prefix: String,
    key: String,
    lock: Lock,
    scratch: Scratch,
}

fn setup(agent: &'static ConsulAgent, name: &str) -> Setup {
    setup_waiting(agent, name, Waiting::Key)
}

fn setup_waiting(agent: &'static ConsulAgent, name: &str, waiting: Waiting) -> Setup {
    let prefix = format!("blocking/interop/{name}/{}", std::process::id());
    let key = format!("{prefix}/.lock");
    let client = Client::new(agent.config().unwrap()).unwrap();
    let mut options = options(&key);
    options.waiting = waiting;
    let lock = client.lock(options).unwrap();
    Setup {
        agent,
        wire: Wire {
            config: agent.config().unwrap(),
            http: TestTransport::new().unwrap(),
        },
        prefix,
        key,
        lock,
        scratch: Scratch::new(name),
    }
}

/// Go holds, we wait: our `acquire` keeps waiting (no conflict error) while the Go child runs,
/// and returns right after it exits. Returns our guard and the handoff time (from the Go child's
/// `end` to our `acquire` returning).
fn go_to_rust(s: &Setup, round: u32) -> (LockGuard, Duration) {
    let log = s.scratch.log();
    let go_name = format!("go-{round}");
    let mut go = GoLock::spawn(s.agent, &s.scratch, &s.prefix, &go_name, true);
    let deadline = Instant::now() + PATIENCE;
    while at(&log, &go_name, "start").is_none() {
        assert!(go.running(), "consul lock exited early\n{}", go.output());
        assert!(
            Instant::now() < deadline,
            "the Go child never started\n{}",
            go.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The Go holder's key: a lock key with the lock flags, held by the Go session.
    let pair = s.wire.get(&s.key).expect("the Go lock's key");
    assert_eq!(pair.flags, LOCK_FLAG_VALUE);
    let go_session = pair.session.expect("held by the Go session");
    let go_sequence = pair.modify_index;

    let (lock, who) = (s.lock.clone(), format!("rust-{round}"));
    let acquire = std::thread::spawn(move || {
        let guard = lock.acquire_with(Some(PATIENCE), None);
        let started = stamp(&log, &who, "start");
        (guard, started)
    });
    // It waits: neither an error (a conflict) nor a grant while Go holds.
    std::thread::sleep(STILL_WAITING);
    assert!(
        !acquire.is_finished(),
        "acquire returned while the Go lock was held"
    );
    assert_eq!(s.wire.get(&s.key).unwrap().session.as_ref(), Some(&go_session));

    go.release();
    let (guard, started) = acquire.join().unwrap();
    let guard = guard.expect("acquired after the Go child exited");
    assert!(guard.is_held());
    assert_ne!(guard.token().session, go_session);
    // A later holder, a later place in the key's history. (Not necessarily a larger LockIndex:
    // `consul lock` deletes the key when it is done, if nobody holds it yet, so LockIndex can
    // restart at 1.)
    assert!(guard.token().sequence() > go_sequence, "fencing order");
    go.finish();
    let log = s.scratch.log();
    let go_end = at(&log, &go_name, "end").expect("the Go child's end");
    assert!(go_end < started, "we held before the Go child ended");
    let handoff = since(started - go_end);
    assert!(handoff < HANDOFF_LIMIT, "Go -> Rust handoff took {handoff:?}");
    (guard, handoff)
}

/// We hold, Go waits: `consul lock` tries, and its child does not run until we release; then it
/// runs at once. Returns the handoff time (from just before our release to the Go child's start).
fn rust_to_go(s: &Setup, round: u32, guard: LockGuard) -> Duration {
    let log = s.scratch.log();
    let go_name = format!("go-{round}b");
    let mut go = GoLock::spawn(s.agent, &s.scratch, &s.prefix, &go_name, false);
    go.wait_attempting();
    // Watch our hold meanwhile: a waiting Go client does not disturb it.
    assert_eq!(guard.wait_lost(STILL_WAITING).unwrap(), None);
    assert!(
        go.running(),
        "consul lock ended while we held the lock\n{}",
        go.output()
    );
    assert!(
        at(&log, &go_name, "start").is_none(),
        "the Go child ran while we held the lock"
    );
    assert_eq!(
        s.wire.get(&s.key).unwrap().session.as_ref(),
        Some(&guard.token().session)
    );

    let ended = stamp(&log, &format!("rust-{round}"), "end");
    guard.release().unwrap();
    go.finish();
    let go_start = at(&log, &go_name, "start").expect("the Go child ran");
    assert!(go_start > ended);
    let handoff = since(go_start - ended);
    assert!(handoff < HANDOFF_LIMIT, "Rust -> Go handoff took {handoff:?}");
    handoff
}

#[test]
fn go_holds_rust_waits() {
    let Some(agent) = require_agent() else { return };
    let s = setup(agent, "go-holds");
    let (guard, handoff) = go_to_rust(&s, 1);
    eprintln!("blocking: Go -> Rust handoff {handoff:?}");
    stamp(&s.scratch.log(), "rust-1", "end");
    guard.release().unwrap();
    assert_exclusive(&s.scratch.log());
}

#[test]
fn rust_holds_go_waits() {
    let Some(agent) = require_agent() else { return };
    let s = setup(agent, "rust-holds");
    let guard = s.lock.acquire().unwrap();
    stamp(&s.scratch.log(), "rust-1", "start");
    let handoff = rust_to_go(&s, 1, guard);
    eprintln!("blocking: Rust -> Go handoff {handoff:?}");
    assert_exclusive(&s.scratch.log());
    // The lock is free again (Go's cleanup deletes the key), and ours to take.
    let guard = s.lock.acquire_with(Some(PATIENCE), None).unwrap();
    guard.release().unwrap();
}

#[test]
fn alternate() {
    let Some(agent) = require_agent() else { return };
    alternate_with(&setup(agent, "alternate"));
}

/// A queued lock waits in its line while Go's `consul lock` holds the same key, and Go's waits
/// on the key while we hold: the same exclusion and handoffs as unqueued, and no entry left.
#[test]
fn alternate_queued() {
    let Some(agent) = require_agent() else { return };
    let s = setup_waiting(agent, "alternate-queued", Waiting::Queue);
    alternate_with(&s);
    let queue = KvList::new(Key::new(format!("{}/.queue/", s.key)).unwrap());
    let left = s
        .wire
        .http
        .call(&s.wire.config, &queue)
        .expect("the agent answers")
        .unwrap();
    assert!(left.value.is_empty(), "queue entries left: {:?}", left.value);
}

fn alternate_with(s: &Setup) {
    let (mut to_rust, mut to_go, mut lock_indexes) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = 0;
    for round in 1..=3 {
        let (guard, handoff) = go_to_rust(s, round);
        assert!(guard.token().sequence() > last);
        last = guard.token().sequence();
        lock_indexes.push(guard.token().lock_index);
        to_rust.push(handoff);
        to_go.push(rust_to_go(s, round, guard));
    }
    assert_exclusive(&s.scratch.log());
    eprintln!(
        "blocking: Go -> Rust handoffs {to_rust:?}; Rust -> Go handoffs {to_go:?}; our LockIndexes {lock_indexes:?}"
    );
}
