//! The Go reference client as a contender, for interop tests: `consul lock <prefix> <child>`
//! (the consul binary's own command, Go's `api.Lock`) run as a process whose child stamps
//! `start`/`end` lines into a log shared with the Rust side, so a test can check that holds never
//! overlap and measure handoffs both ways. Dropping a [`GoLock`] ends the command and its child,
//! so a failed test leaves nothing running.
//!
//! ```no_run
//! # use consul_lock_testkit::golock::{GoLock, Scratch, assert_exclusive, stamp};
//! # let agent = consul_lock_testkit::agent::require_agent().unwrap();
//! let scratch = Scratch::new("example");
//! let mut go = GoLock::spawn(agent, &scratch, "service/x", "go", true); // holds until released
//! go.wait_attempting();
//! go.release();
//! go.finish();
//! stamp(&scratch.log(), "rust", "start");
//! stamp(&scratch.log(), "rust", "end");
//! assert_exclusive(&scratch.log());
//! ```

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::ConsulAgent;

/// How long anything may take before it counts as stuck.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A directory of the test's own, removed on drop, holding the shared log.
pub struct Scratch {
    /// The directory.
    pub dir: PathBuf,
}

impl Scratch {
    /// A fresh directory named after `name`, the process and a counter.
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "consul-lock-interop-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("test scratch I/O");
        Scratch { dir }
    }

    /// The file both sides append `<who> start|end <unix nanos>` lines to.
    pub fn log(&self) -> PathBuf {
        self.dir.join("holds.log")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Now, in nanoseconds since the Unix epoch (the unit of the shared log).
pub fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("test scratch I/O")
        .as_nanos()
}

/// Appends `<who> <event> <now>` to the shared log, as the Go side's child does with `date`.
pub fn stamp(log: &Path, who: &str, event: &str) -> u128 {
    let now = unix_nanos();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("test scratch I/O");
    writeln!(file, "{who} {event} {now}").expect("test scratch I/O");
    now
}

/// One line of the shared log.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Who wrote it.
    pub who: String,
    /// `start` or `end`.
    pub event: String,
    /// When, in Unix nanoseconds.
    pub at: u128,
}

/// The shared log's lines, in time order.
pub fn entries(log: &Path) -> Vec<Entry> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut entries: Vec<Entry> = text
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "log line {line:?}");
            Entry {
                who: parts[0].to_owned(),
                event: parts[1].to_owned(),
                at: parts[2].parse().expect("test scratch I/O"),
            }
        })
        .collect();
    entries.sort_by_key(|e| e.at);
    entries
}

/// When `who` logged `event` first, if it did.
pub fn at(log: &Path, who: &str, event: &str) -> Option<u128> {
    entries(log)
        .iter()
        .find(|e| e.who == who && e.event == event)
        .map(|e| e.at)
}

/// In time order, every `start` is followed by the same holder's `end` before anyone else starts.
pub fn assert_exclusive(log: &Path) {
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

/// A span of nanoseconds as a `Duration`.
pub fn since(nanos: u128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).expect("test scratch I/O"))
}

/// A running `consul lock <prefix> <child>`. Dropping it ends the child and the command (marker,
/// then `SIGTERM`, then `SIGKILL` to its process group), so a failed test leaves nothing running.
pub struct GoLock {
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
    pub fn spawn(agent: &ConsulAgent, scratch: &Scratch, prefix: &str, name: &str, hold: bool) -> GoLock {
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
            .stdout(fs::File::create(&out).expect("test scratch I/O"))
            .stderr(fs::File::create(&err).expect("test scratch I/O"))
            .env("SHELL", "/bin/sh")
            .process_group(0);
        for (var, _) in std::env::vars().filter(|(var, _)| var.starts_with("CONSUL_")) {
            command.env_remove(var);
        }
        let child = command.spawn().expect("starting consul lock");
        GoLock {
            name: name.to_owned(),
            child,
            marker,
            out,
            err,
            status: None,
        }
    }

    /// The process id of the `consul lock` command.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file whose creation lets a holding child finish.
    pub fn marker(&self) -> &Path {
        &self.marker
    }

    /// Lets a holding child finish.
    pub fn release(&self) {
        fs::write(&self.marker, b"").expect("test scratch I/O");
    }

    /// Whether the command still runs.
    pub fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waiting for consul lock");
        }
        self.status.is_none()
    }

    /// What the command printed.
    pub fn output(&self) -> String {
        format!(
            "stdout: {}\nstderr: {}",
            fs::read_to_string(&self.out).unwrap_or_default().trim(),
            fs::read_to_string(&self.err).unwrap_or_default().trim()
        )
    }

    /// Waits until `consul lock` says it is trying to take the lock (its `-verbose` output).
    pub fn wait_attempting(&mut self) {
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
    pub fn finish(&mut self) {
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
        let status = self.status.expect("test scratch I/O");
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

    /// Waits up to `limit` for the command to end; whether it did.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        !self.running()
    }

    /// Sends `signal` (e.g. `TERM`) to the command, or with `group` to its process group.
    pub fn signal(&self, signal: &str, group: bool) {
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
