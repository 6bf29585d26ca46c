//! Interop with the Go reference client on one real agent: `consul lock <prefix> <cmd>` (which
//! locks `<prefix>/.lock`) and this driver take turns on the same key. Mutual exclusion holds both
//! ways (the Go child's run and our hold never overlap, by timestamps both sides append to one
//! file), neither side sees a flags conflict, and a release on either side hands over to a waiter
//! on the other at once. Handoff times are printed (run with `--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;
use common::Wire;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use consul_lock_core::machine::{LOCK_FLAG_VALUE, Waiting};
use consul_lock_testkit::agent::{ConsulAgent, require_agent};
use consul_lock_testkit::golock::{GoLock, PATIENCE, Scratch, assert_exclusive, at, since, stamp};
use consul_lock_tokio::{Client, Lock, LockGuard, LockOptions};

/// How long a waiter is watched to show that it keeps waiting.
const STILL_WAITING: Duration = Duration::from_millis(800);
/// A handoff slower than this is a failure (it is tens of milliseconds when all is well; the
/// bound leaves room for a machine busy with other builds).
const HANDOFF_LIMIT: Duration = Duration::from_secs(5);

fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("tokio interop {key}");
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
    let prefix = format!("tokio/interop/{name}/{}", std::process::id());
    let key = format!("{prefix}/.lock");
    let client = Client::new(agent.config().unwrap()).unwrap();
    let mut options = options(&key);
    options.waiting = waiting;
    let lock = client.lock(options).unwrap();
    Setup {
        agent,
        wire: Wire::new(agent.config().unwrap()),
        prefix,
        key,
        lock,
        scratch: Scratch::new(name),
    }
}

/// Go holds, we wait: our `acquire` keeps waiting (no conflict error) while the Go child runs,
/// and returns right after it exits. Returns our guard and the handoff time (from the Go child's
/// `end` to our `acquire` returning).
async fn go_to_rust(s: &Setup, round: u32) -> (LockGuard, Duration) {
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The Go holder's key: a lock key with the lock flags, held by the Go session.
    let pair = s.wire.get(&s.key).await.expect("the Go lock's key");
    assert_eq!(pair.flags, LOCK_FLAG_VALUE);
    let go_session = pair.session.expect("held by the Go session");
    let go_sequence = pair.modify_index;

    let mut acquire = std::pin::pin!(s.lock.acquire());
    // It waits: neither an error (a conflict) nor a grant while Go holds.
    if let Ok(result) = tokio::time::timeout(STILL_WAITING, acquire.as_mut()).await {
        panic!("acquire returned while the Go lock was held: {result:?}");
    }
    assert_eq!(
        s.wire.get(&s.key).await.unwrap().session.as_ref(),
        Some(&go_session)
    );

    go.release();
    let guard = tokio::time::timeout(PATIENCE, acquire)
        .await
        .expect("acquired after the Go child exited")
        .expect("acquired");
    let started = stamp(&log, &format!("rust-{round}"), "start");
    assert!(guard.is_held());
    assert_ne!(guard.token().session, go_session);
    // A later holder, a later place in the key's history. (Not necessarily a larger LockIndex:
    // `consul lock` deletes the key when it is done, if nobody holds it yet, so LockIndex can
    // restart at 1.)
    assert!(guard.token().sequence() > go_sequence, "fencing order");
    tokio::task::block_in_place(|| go.finish());
    let go_end = at(&log, &go_name, "end").expect("the Go child's end");
    assert!(go_end < started, "we held before the Go child ended");
    let handoff = since(started - go_end);
    assert!(handoff < HANDOFF_LIMIT, "Go -> Rust handoff took {handoff:?}");
    (guard, handoff)
}

/// We hold, Go waits: `consul lock` tries, and its child does not run until we release; then it
/// runs at once. Returns the handoff time (from just before our release to the Go child's start).
async fn rust_to_go(s: &Setup, round: u32, guard: LockGuard) -> Duration {
    let log = s.scratch.log();
    let go_name = format!("go-{round}b");
    let mut go = GoLock::spawn(s.agent, &s.scratch, &s.prefix, &go_name, false);
    tokio::task::block_in_place(|| go.wait_attempting());
    tokio::time::sleep(STILL_WAITING).await;
    assert!(
        go.running(),
        "consul lock ended while we held the lock\n{}",
        go.output()
    );
    assert!(
        at(&log, &go_name, "start").is_none(),
        "the Go child ran while we held the lock"
    );
    assert!(guard.is_held(), "a waiting Go client does not disturb our hold");
    assert_eq!(
        s.wire.get(&s.key).await.unwrap().session.as_ref(),
        Some(&guard.token().session)
    );

    let ended = stamp(&log, &format!("rust-{round}"), "end");
    guard.release().await.unwrap();
    tokio::task::block_in_place(|| go.finish());
    let go_start = at(&log, &go_name, "start").expect("the Go child ran");
    assert!(go_start > ended);
    let handoff = since(go_start - ended);
    assert!(handoff < HANDOFF_LIMIT, "Rust -> Go handoff took {handoff:?}");
    handoff
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_holds_rust_waits() {
    let Some(agent) = require_agent() else { return };
    let s = setup(agent, "go-holds");
    let (guard, handoff) = go_to_rust(&s, 1).await;
    eprintln!("tokio: Go -> Rust handoff {handoff:?}");
    stamp(&s.scratch.log(), "rust-1", "end");
    guard.release().await.unwrap();
    assert_exclusive(&s.scratch.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_holds_go_waits() {
    let Some(agent) = require_agent() else { return };
    let s = setup(agent, "rust-holds");
    let guard = s.lock.acquire().await.unwrap();
    stamp(&s.scratch.log(), "rust-1", "start");
    let handoff = rust_to_go(&s, 1, guard).await;
    eprintln!("tokio: Rust -> Go handoff {handoff:?}");
    assert_exclusive(&s.scratch.log());
    // The lock is free again (Go's cleanup deletes the key), and ours to take.
    let guard = tokio::time::timeout(PATIENCE, s.lock.acquire())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternate() {
    let Some(agent) = require_agent() else { return };
    alternate_with(setup(agent, "alternate")).await;
}

/// A queued lock waits in its line while Go's `consul lock` holds the same key, and Go's waits
/// on the key while we hold: the same exclusion and handoffs as unqueued, and no entry left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternate_queued() {
    let Some(agent) = require_agent() else { return };
    let s = setup_waiting(agent, "alternate-queued", Waiting::Queue);
    let queue = format!("{}/.queue/", s.key);
    let wire = Wire::new(agent.config().unwrap());
    alternate_with(s).await;
    assert!(
        wire.entries_under(&queue).await.unwrap().is_empty(),
        "queue entries left"
    );
}

async fn alternate_with(s: Setup) {
    let (mut to_rust, mut to_go, mut lock_indexes) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = 0;
    for round in 1..=3 {
        let (guard, handoff) = go_to_rust(&s, round).await;
        assert!(guard.token().sequence() > last);
        last = guard.token().sequence();
        lock_indexes.push(guard.token().lock_index);
        to_rust.push(handoff);
        to_go.push(rust_to_go(&s, round, guard).await);
    }
    assert_exclusive(&s.scratch.log());
    eprintln!(
        "tokio: Go -> Rust handoffs {to_rust:?}; Rust -> Go handoffs {to_go:?}; our LockIndexes {lock_indexes:?}"
    );
}

/// Whether a process with this id exists.
fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Whether any process's command line mentions `text` (the Go child's script names its marker).
fn process_mentions(text: &str) -> bool {
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    String::from_utf8_lossy(&ps.stdout)
        .lines()
        .any(|line| line.contains(text))
}

/// The guard that ends `consul lock` when a test fails: with a holding child, and while waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_go_process_left_behind() {
    let Some(agent) = require_agent() else { return };
    let s = setup(agent, "leftovers");
    let log = s.scratch.log();

    // A test that fails while the Go child holds the lock.
    let go = GoLock::spawn(s.agent, &s.scratch, &s.prefix, "go-held", true);
    let deadline = Instant::now() + PATIENCE;
    while at(&log, "go-held", "start").is_none() {
        assert!(
            Instant::now() < deadline,
            "the Go child never started\n{}",
            go.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (pid, marker) = (go.pid(), go.marker().display().to_string());
    assert!(process_mentions(&marker), "the Go child is running");
    drop(go);
    assert!(!alive(pid), "consul lock is gone");
    assert!(!process_mentions(&marker), "its child is gone");

    // A test that fails while `consul lock` waits for us.
    let guard = s.lock.acquire().await.unwrap();
    let mut go = GoLock::spawn(s.agent, &s.scratch, &s.prefix, "go-waiting", false);
    tokio::task::block_in_place(|| go.wait_attempting());
    let pid = go.pid();
    tokio::task::spawn_blocking(move || drop(go)).await.unwrap();
    assert!(!alive(pid), "consul lock is gone");
    assert!(at(&log, "go-waiting", "start").is_none(), "its child never ran");
    assert!(guard.is_held());
    guard.release().await.unwrap();
}
