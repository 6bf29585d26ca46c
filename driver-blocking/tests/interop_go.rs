//! Interop with the Go reference client on one real agent: `consul lock <prefix> <cmd>` (which
//! locks `<prefix>/.lock`) and the blocking driver take turns on the same key. Mutual exclusion
//! holds both ways (the Go child's run and our hold never overlap, by timestamps both sides append
//! to one file), neither side sees a flags conflict, and a release on either side hands over to a
//! waiter on the other at once. Handoff times are printed (run with `--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consul_lock_blocking::{Client, Lock, LockGuard, LockOptions};
use consul_lock_core::api::{ClientConfig, Key, KvGet, KvPair};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::{ConsulAgent, require_agent};

/// How long anything in these tests may take before it counts as stuck.
const PATIENCE: Duration = Duration::from_secs(30);
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

/// A directory of this test's own, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "consul-lock-interop-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    /// The file both sides append `<who> start|end <unix nanos>` lines to.
    fn log(&self) -> PathBuf {
        self.dir.join("holds.log")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Appends `<who> <event> <now>` to the shared log, as the Go side's child does with `date`.
fn stamp(log: &Path, who: &str, event: &str) -> u128 {
    let now = unix_nanos();
    let mut file = OpenOptions::new().create(true).append(true).open(log).unwrap();
    writeln!(file, "{who} {event} {now}").unwrap();
    now
}

/// One line of the shared log.
#[derive(Clone, Debug)]
struct Entry {
    who: String,
    event: String,
    at: u128,
}

fn entries(log: &Path) -> Vec<Entry> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut entries: Vec<Entry> = text
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "log line {line:?}");
            Entry {
                who: parts[0].to_owned(),
                event: parts[1].to_owned(),
                at: parts[2].parse().unwrap(),
            }
        })
        .collect();
    entries.sort_by_key(|e| e.at);
    entries
}

fn at(log: &Path, who: &str, event: &str) -> Option<u128> {
    entries(log)
        .iter()
        .find(|e| e.who == who && e.event == event)
        .map(|e| e.at)
}

/// In time order, every `start` is followed by the same holder's `end` before anyone else starts.
fn assert_exclusive(log: &Path) {
    let entries = entries(log);
    let mut holder: Option<&Entry> = None;
    for entry in &entries {
        match (entry.event.as_str(), holder) {
            ("start", None) => holder = Some(entry),
            ("end", Some(h)) if h.who == entry.who => holder = None,
            _ => panic!("holds overlap at {entry:?} (holder {holder:?}); whole log: {entries:#?}"),
        }
    }
    assert!(holder.is_none(), "a hold never ended: {entries:#?}");
}

fn since(nanos: u128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).unwrap())
}

/// A running `consul lock <prefix> <child>`. Dropping it ends the child and the command (marker,
/// then `SIGTERM`, then `SIGKILL` to its process group), so a failed test leaves nothing running.
struct GoLock {
    name: String,
    child: Child,
    marker: PathBuf,
    out: PathBuf,
    err: PathBuf,
    status: Option<ExitStatus>,
}

impl GoLock {
    /// Starts `consul lock -verbose -name=<name> -http-addr=<agent> <prefix> <script>`. The child
    /// stamps `<name> start`, then with `hold` waits for [`GoLock::release`] (at most 60 s), and
    /// stamps `<name> end`.
    fn spawn(agent: &ConsulAgent, scratch: &Scratch, prefix: &str, name: &str, hold: bool) -> GoLock {
        let log = scratch.log();
        let marker = scratch.dir.join(format!("{name}.release"));
        let wait = if hold {
            format!(
                "i=0; while [ ! -e '{}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done; ",
                marker.display()
            )
        } else {
            String::new()
        };
        let script = format!(
            "echo \"{name} start $(date +%s%N)\" >> '{log}'; {wait}echo \"{name} end $(date +%s%N)\" >> '{log}'",
            log = log.display()
        );
        let out = scratch.dir.join(format!("{name}.out"));
        let err = scratch.dir.join(format!("{name}.err"));
        let mut command = Command::new(agent.binary());
        command
            .arg("lock")
            .arg("-verbose")
            .arg(format!("-name={name}"))
            .arg(format!("-http-addr={}", agent.http_addr()))
            .arg(prefix)
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .env("SHELL", "/bin/sh")
            .process_group(0);
        for (var, _) in std::env::vars().filter(|(var, _)| var.starts_with("CONSUL_")) {
            command.env_remove(var);
        }
        let child = command.spawn().unwrap();
        GoLock {
            name: name.to_owned(),
            child,
            marker,
            out,
            err,
            status: None,
        }
    }

    /// Lets a holding child finish.
    fn release(&self) {
        fs::write(&self.marker, b"").unwrap();
    }

    fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status.is_none()
    }

    fn output(&self) -> String {
        format!(
            "stdout: {}\nstderr: {}",
            fs::read_to_string(&self.out).unwrap_or_default().trim(),
            fs::read_to_string(&self.err).unwrap_or_default().trim()
        )
    }

    /// Waits until `consul lock` says it is trying to take the lock (its `-verbose` output).
    fn wait_attempting(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        while !fs::read_to_string(&self.out)
            .unwrap_or_default()
            .contains("Attempting lock acquisition")
        {
            assert!(
                self.running(),
                "{}: consul lock exited early\n{}",
                self.name,
                self.output()
            );
            assert!(
                Instant::now() < deadline,
                "{}: no lock attempt\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `consul lock` to end and checks that it succeeded: no conflict, no failure.
    fn finish(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "{}: consul lock did not end\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = self.status.unwrap();
        let output = self.output();
        assert!(
            status.success(),
            "{}: consul lock failed: {status}\n{output}",
            self.name
        );
        assert!(
            !output.contains("does not match lock use"),
            "{}: {output}",
            self.name
        );
        assert!(
            output.contains("Child terminated, releasing lock"),
            "{}: {output}",
            self.name
        );
    }

    fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        !self.running()
    }

    fn signal(&self, signal: &str, group: bool) {
        let target = if group {
            format!("-{}", self.child.id())
        } else {
            self.child.id().to_string()
        };
        let _ = Command::new("kill")
            .args(["-s", signal, "--", &target])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for GoLock {
    fn drop(&mut self) {
        // Let a holding child end by itself, then ask `consul lock` to stop (it passes the signal
        // on and releases, but while it waits for the lock it only notices between two blocking
        // reads: Go's consul#2992), then kill its process group.
        let _ = fs::write(&self.marker, b"");
        if self.exited_within(Duration::from_secs(1)) {
            return;
        }
        self.signal("TERM", false);
        if self.exited_within(Duration::from_secs(1)) {
            return;
        }
        self.signal("KILL", true);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.session_options_mut() {
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
    let prefix = format!("blocking/interop/{name}/{}", std::process::id());
    let key = format!("{prefix}/.lock");
    let client = Client::new(agent.config().unwrap()).unwrap();
    let lock = client.lock(options(&key)).unwrap();
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
    let s = setup(agent, "alternate");
    let (mut to_rust, mut to_go, mut lock_indexes) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = 0;
    for round in 1..=3 {
        let (guard, handoff) = go_to_rust(&s, round);
        assert!(guard.token().sequence() > last);
        last = guard.token().sequence();
        lock_indexes.push(guard.token().lock_index);
        to_rust.push(handoff);
        to_go.push(rust_to_go(&s, round, guard));
    }
    assert_exclusive(&s.scratch.log());
    eprintln!(
        "blocking: Go -> Rust handoffs {to_rust:?}; Rust -> Go handoffs {to_go:?}; our LockIndexes {lock_indexes:?}"
    );
}
