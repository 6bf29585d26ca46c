//! Interop with Go's semaphore: `consul lock -n 2 <prefix> <child>` (the Go client, in the consul
//! binary the test agent runs) and two Rust contenders share one semaphore of 2 slots.
//!
//! Go holds while its child runs (the child waits for a marker file, then exits); every holder
//! appends its start and end (wall-clock nanoseconds) to one shared file, Go's child included, so
//! that the number of holders at any moment can be counted afterwards. Each side must wait for the
//! other: Go for the Rust holders, the Rust contenders for Go.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::Wire;

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consul_lock_core::api::{Key, KvGet, KvList, KvPair, SessionId};
use consul_lock_core::machine::{SEMAPHORE_FLAG_VALUE, SemaphoreState};
use consul_lock_testkit::agent::require_agent;
use consul_lock_tokio::{Client, LockGuard, SemaphoreOptions};

const PREFIX: &str = "tokio/interop-go-semaphore/n2";
const LIMIT: u32 = 2;

impl Wire {
    async fn list(&self) -> Vec<KvPair> {
        let prefix = Key::new(format!("{PREFIX}/")).unwrap();
        self.call(KvList::new(prefix)).await.unwrap().value
    }

    async fn state(&self) -> Option<SemaphoreState> {
        let key = Key::new(format!("{PREFIX}/.lock")).unwrap();
        let pair = self.call(KvGet::new(key)).await.unwrap().value?;
        assert_eq!(pair.flags, SEMAPHORE_FLAG_VALUE, "the .lock Go and Rust share");
        Some(SemaphoreState::decode(&pair.value, 0).unwrap())
    }

    /// The sessions holding contender keys, other than `known`.
    async fn other_contenders(&self, known: &[&SessionId]) -> Vec<SessionId> {
        self.list()
            .await
            .into_iter()
            .filter(|p| !p.key.ends_with("/.lock"))
            .filter_map(|p| {
                assert_eq!(p.flags, SEMAPHORE_FLAG_VALUE, "{p:?}");
                p.session
            })
            .filter(|s| !known.contains(&s))
            .collect()
    }
}

/// A scratch directory (the shared event file, the marker, Go's output), removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("consul-lock-interop-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn events(&self) -> PathBuf {
        self.dir.join("events")
    }

    fn marker(&self) -> PathBuf {
        self.dir.join("release")
    }

    /// Appends `<who> <what> <wall-clock ns>` to the event file.
    fn record(&self, who: &str, what: &str) {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.events())
            .unwrap();
        file.write_all(format!("{who} {what} {nanos}\n").as_bytes())
            .unwrap();
    }

    fn lines(&self) -> Vec<String> {
        fs::read_to_string(self.events())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `consul lock -n 2` in a process group of its own; on drop the child is told to finish (the
/// marker), and whatever is left of the group is killed, so nothing outlives the test.
struct GoHolder {
    child: Child,
    marker: PathBuf,
}

impl GoHolder {
    fn start(binary: &Path, http_addr: &str, scratch: &Scratch) -> GoHolder {
        // The child: record the start (with what `consul lock` put in its environment), wait for
        // the marker (60 s at most, so that it can't be left behind), record the end.
        let script = scratch.dir.join("child.sh");
        fs::write(
            &script,
            format!(
                r#"events='{events}'
echo "go start $(date +%s%N) held=$CONSUL_LOCK_HELD" >> "$events"
i=0
while [ ! -f '{marker}' ] && [ "$i" -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
echo "go end $(date +%s%N)" >> "$events"
"#,
                events = scratch.events().display(),
                marker = scratch.marker().display(),
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("lock")
            .arg(format!("-http-addr={http_addr}"))
            .arg(format!("-n={LIMIT}"))
            .arg("-verbose")
            .arg(PREFIX)
            .arg(format!("sh {}", script.display()))
            .stdin(Stdio::null())
            .stdout(fs::File::create(scratch.dir.join("go.out")).unwrap())
            .stderr(fs::File::create(scratch.dir.join("go.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        GoHolder {
            child,
            marker: scratch.marker(),
        }
    }

    /// Waits up to `timeout` for `consul lock` to exit.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GoHolder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Let it finish cleanly if it can (the child exits, Go releases), then kill the group.
            let _ = fs::write(&self.marker, b"");
            if self.wait(Duration::from_secs(5)).is_none() {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", self.child.id())])
                    .status();
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Holds of each holder, from the shared file: `(who, start, end)` in nanoseconds.
fn holds(lines: &[String]) -> Vec<(String, u128, u128)> {
    let mut open: Vec<(String, u128)> = Vec::new();
    let mut done = Vec::new();
    for line in lines {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (who, what, at) = (parts[0], parts[1], parts[2].parse::<u128>().unwrap());
        match what {
            "start" => {
                assert!(
                    !open.iter().any(|(w, _)| w == who),
                    "{who} started twice: {lines:#?}"
                );
                open.push((who.to_owned(), at));
            }
            "end" => {
                let i = open
                    .iter()
                    .position(|(w, _)| w == who)
                    .expect("an end after a start");
                let (_, start) = open.remove(i);
                done.push((who.to_owned(), start, at));
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(open.is_empty(), "holds never ended: {open:?}");
    done
}

/// The most holders at any moment (a start and an end at the same instant count as overlapping).
fn most_at_once(holds: &[(String, u128, u128)]) -> usize {
    let mut edges: Vec<(u128, i32)> = holds
        .iter()
        .flat_map(|(_, start, end)| [(*start, 1), (*end, -1)])
        .collect();
    // Starts before ends at equal times: the stricter count.
    edges.sort_by_key(|&(at, delta)| (at, -delta));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    usize::try_from(most).unwrap()
}

fn options(name: &str) -> SemaphoreOptions {
    let mut options = SemaphoreOptions::new(PREFIX, LIMIT).unwrap();
    options.hold.value = name.as_bytes().to_vec();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("tokio interop {name}");
    }
    options
}

async fn release(scratch: &Scratch, who: &str, guard: LockGuard) {
    assert!(guard.is_held(), "{who} lost its slot");
    scratch.record(who, "end");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_rust_share_a_semaphore() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let scratch = Scratch::new();
    let a = client.semaphore(options("rust-a")).unwrap();
    let b = client.semaphore(options("rust-b")).unwrap();
    let timeout = Duration::from_secs(20);

    // Both slots held by Rust.
    let a_guard = a.acquire().await.unwrap();
    scratch.record("rust-a", "start");
    let b_guard = b.acquire().await.unwrap();
    scratch.record("rust-b", "start");
    let (a_session, b_session) = (a_guard.token().session.clone(), b_guard.token().session.clone());

    // Go contends: its contender key shows up, and it waits (no slot is free).
    let mut go = GoHolder::start(agent.binary(), &agent.http_addr(), &scratch);
    let deadline = Instant::now() + timeout;
    let go_session = loop {
        if let Some(s) = wire.other_contenders(&[&a_session, &b_session]).await.pop() {
            break s;
        }
        assert!(go.child.try_wait().unwrap().is_none(), "consul lock exited early");
        assert!(Instant::now() < deadline, "Go's contender key never showed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !scratch.lines().iter().any(|l| l.starts_with("go start")),
        "Go took a slot while two Rust holders held both: {:#?}",
        scratch.lines()
    );
    let state = wire.state().await.unwrap();
    assert_eq!(state.limit, LIMIT);
    assert!(!state.holds(go_session.as_str()));

    // A Rust holder leaves: Go gets the slot (its child starts, with CONSUL_LOCK_HELD=true).
    release(&scratch, "rust-a", a_guard).await;
    let deadline = Instant::now() + timeout;
    while !scratch.lines().iter().any(|l| l.starts_with("go start")) {
        assert!(Instant::now() < deadline, "Go never got the free slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        scratch
            .lines()
            .iter()
            .any(|l| l.starts_with("go start") && l.ends_with("held=true")),
        "{:#?}",
        scratch.lines()
    );
    // Go rewrote the .lock: we read its holders as Go wrote them.
    let state = wire.state().await.unwrap();
    let mut holders: Vec<&str> = state.holders.keys().map(String::as_str).collect();
    holders.sort_unstable();
    let mut want = vec![b_session.as_str(), go_session.as_str()];
    want.sort_unstable();
    assert_eq!(holders, want);

    // Rust A wants a slot again: it must wait for Go or B.
    let waiting = tokio::spawn(async move { a.acquire().await.map(|g| (g, a)) });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "Rust took a slot while Go and Rust B held both"
    );

    // B leaves: A gets the slot.
    release(&scratch, "rust-b", b_guard).await;
    let (a_guard, a) = tokio::time::timeout(timeout, waiting)
        .await
        .expect("Rust A never got the free slot")
        .unwrap()
        .unwrap();
    scratch.record("rust-a", "start");

    // Go's child finishes: Go releases and exits cleanly.
    fs::write(scratch.marker(), b"").unwrap();
    let status = go.wait(timeout).expect("consul lock did not exit");
    assert!(
        status.success(),
        "consul lock: {status}\n{}",
        fs::read_to_string(scratch.dir.join("go.err")).unwrap_or_default()
    );
    // Go took itself out of the .lock and deleted its contender key; A still holds.
    let state = wire.state().await.unwrap();
    assert_eq!(
        state.holders.keys().map(String::as_str).collect::<Vec<_>>(),
        [a_guard.token().session.as_str()]
    );
    assert!(
        wire.other_contenders(&[&a_guard.token().session])
            .await
            .is_empty()
    );
    release(&scratch, "rust-a", a_guard).await;

    // Never more than two holders at once, and everyone held.
    let lines = scratch.lines();
    let holds = holds(&lines);
    assert!(most_at_once(&holds) <= LIMIT as usize, "{lines:#?}");
    let mut who: Vec<&str> = holds.iter().map(|(w, _, _)| w.as_str()).collect();
    who.sort_unstable();
    assert_eq!(who, ["go", "rust-a", "rust-a", "rust-b"], "{lines:#?}");

    // Nothing left but an idle .lock, which destroy deletes.
    a.destroy().await.unwrap();
    assert!(wire.list().await.is_empty());
}
