//! Faults against a real agent with the blocking driver: a partition between holder and agent,
//! cancellation at any moment, and the time a handoff takes. Prints its measurements.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use consul_lock_blocking::{Client, Error, Lock, LockGuard, LockOptions, LossReason, StopHandle};
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Mode, Outcome, SeenRequest};

/// How many sessions named `name` the agent at `addr` knows (asked directly, never through a
/// proxy; plain HTTP/1.0, so that the body ends with the connection and no HTTP client is needed).
fn sessions_named(addr: SocketAddr, name: &str) -> usize {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!("GET /v1/session/list HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&reply[..split]);
    assert!(
        head.lines().next().is_some_and(|status| status.contains(" 200 ")),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    let sessions: Vec<serde_json::Value> = serde_json::from_slice(&reply[split + 4..]).unwrap();
    sessions.iter().filter(|s| s["Name"] == name).count()
}

/// Waits up to `within` for no session named `name` to be left; how long that took.
fn no_session_left(agent: SocketAddr, name: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let left = sessions_named(agent, name);
        if left == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{left} session(s) named {name:?} left after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_session(agent: SocketAddr, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions_named(agent, name) == 0 {
        assert!(Instant::now() < deadline, "no session named {name:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn named(key: &str, name: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    options.hold.session_options_mut().unwrap().name = name.to_owned();
    options
}

fn is_session_write(s: &SeenRequest) -> bool {
    s.outcome == Outcome::Forwarded
        && s.head.method == "PUT"
        && (s.head.path() == "/v1/session/create" || s.head.path().starts_with("/v1/session/renew/"))
}

/// An acquire blocked on a thread of its own, stoppable with a stop handle.
struct Attempt {
    stop: StopHandle,
    thread: JoinHandle<(Result<LockGuard, Error>, Instant)>,
}

impl Attempt {
    fn start(lock: &Lock) -> Attempt {
        let stop = Lock::stop_handle();
        let thread = {
            let (lock, stop) = (lock.clone(), stop.clone());
            std::thread::spawn(move || {
                let result = lock.acquire_with(None, Some(&stop));
                (result, Instant::now())
            })
        };
        Attempt { stop, thread }
    }

    /// Stops the attempt; how long the acquire took to return.
    fn stop(self) -> Duration {
        let asked = Instant::now();
        self.stop.stop();
        let (result, returned) = self.thread.join().unwrap();
        assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
        returned.duration_since(asked)
    }
}

/// The holder talks to the agent through a proxy that turns into a black hole; a second client
/// talks to the agent directly. The holder must learn of its loss (renew deadline) within a TTL
/// of the partition, and before the second client can hold the key.
#[test]
fn partition_holder_knows_before_anyone_else_holds() {
    let Some(agent) = require_agent() else { return };
    let ttl = Duration::from_secs(10);
    let key = "blocking/faults/partition/.lock";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let holder_client = Client::new(proxy.config()).unwrap();
    let mut options = named(key, "blocking faults partition holder");
    let session = options.hold.session_options_mut().unwrap();
    session.ttl = ttl;
    session.lock_delay = Some(Duration::ZERO);
    session.checks = Some(Vec::new());
    let holder = holder_client.lock(options).unwrap();
    let guard = holder.acquire().unwrap();

    // Cut just after the first renew was acknowledged (TTL/2 after the create), so that a renew
    // is what the deadline counts from.
    let deadline = Instant::now() + ttl;
    while proxy.count(|s| is_session_write(s) && s.head.path().starts_with("/v1/session/renew/")) == 0 {
        assert!(Instant::now() < deadline, "no renew within the TTL");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    proxy.set_mode(Mode::BlackHole);
    let partitioned = Instant::now();
    let last_ack = proxy
        .requests()
        .into_iter()
        .filter(|s| is_session_write(s) && s.at < partitioned)
        .map(|s| s.at)
        .max()
        .unwrap();

    let other_client = Client::new(agent.config().unwrap()).unwrap();
    let other = other_client
        .lock(named(key, "blocking faults partition other"))
        .unwrap();
    let (tx, second) = mpsc::channel();
    let contender = std::thread::spawn(move || {
        let guard = other.acquire_with(Some(Duration::from_secs(40)), None).unwrap();
        tx.send(Instant::now()).unwrap();
        guard
    });

    let reason = guard
        .wait_lost(ttl + Duration::from_secs(5))
        .unwrap()
        .expect("the holder must learn of the loss within the TTL");
    let lost_at = Instant::now();
    let LossReason::RenewDeadline { since_ack } = reason else {
        panic!("lost for another reason: {reason:?}")
    };
    assert!(!guard.is_held());
    let acquired_at = second
        .recv_timeout(Duration::from_secs(40))
        .expect("the agent frees the key within 2×TTL");

    let detection = lost_at.duration_since(partitioned);
    let expected = (last_ack + ttl).saturating_duration_since(partitioned);
    let taken = acquired_at.duration_since(partitioned);
    eprintln!(
        "blocking partition (TTL {ttl:?}, lock-delay 0): loss detected {detection:?} after the cut \
         (since_ack {since_ack:?}; last acked renew + TTL = cut + {expected:?}); \
         second client acquired {taken:?} after the cut; lead {:?}",
        acquired_at.duration_since(lost_at)
    );
    assert!(
        detection <= ttl,
        "detected {detection:?} after the partition: more than the TTL"
    );
    assert!(
        since_ack >= ttl && since_ack < ttl + Duration::from_millis(500),
        "{since_ack:?}"
    );
    assert!(
        lost_at < acquired_at,
        "someone else held the key before the holder knew"
    );

    proxy.set_mode(Mode::Pass);
    contender.join().unwrap().release().unwrap();
    drop(guard);
}

/// (a) Stopped while the session create hangs in a black hole: returns at once, leaves no
/// session, and the lock works again afterwards.
#[test]
fn cancel_while_creating_the_session() {
    let Some(agent) = require_agent() else { return };
    let addr = agent.addr();
    let name = "blocking faults cancel-create";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    proxy.set_mode(Mode::BlackHole);
    let client = Client::new(proxy.config()).unwrap();
    let mut options = named("blocking/faults/cancel-create/.lock", name);
    options.hold.request_timeout = Duration::from_secs(2);
    let lock = client.lock(options).unwrap();
    let attempt = Attempt::start(&lock);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(proxy.count(|s| s.head.path() == "/v1/session/create"), 1);

    let latency = attempt.stop();
    eprintln!("blocking cancel while creating the session: returned in {latency:?}");
    assert!(latency < Duration::from_millis(50), "{latency:?}");

    proxy.set_mode(Mode::Pass);
    // The lost create times out after the request timeout; nothing may appear meanwhile.
    let settle = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < settle {
        assert_eq!(sessions_named(addr, name), 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let guard = lock.acquire_with(Some(Duration::from_secs(10)), None).unwrap();
    assert_eq!(sessions_named(addr, name), 1);
    guard.release().unwrap();
    assert_eq!(sessions_named(addr, name), 0);
}

/// (b) Stopped while parked in a blocking read on a held key.
#[test]
fn cancel_while_parked_in_a_blocking_read() {
    let Some(agent) = require_agent() else { return };
    let addr = agent.addr();
    let key = "blocking/faults/cancel-parked/.lock";
    let name = "blocking faults cancel-parked waiter";
    let client = Client::new(agent.config().unwrap()).unwrap();
    let holder = client
        .lock(named(key, "blocking faults cancel-parked holder"))
        .unwrap();
    let held = holder.acquire().unwrap();

    let lock = client.lock(named(key, name)).unwrap();
    let attempt = Attempt::start(&lock);
    wait_for_session(addr, name);
    std::thread::sleep(Duration::from_millis(300));
    let latency = attempt.stop();
    let cleanup = no_session_left(addr, name, Duration::from_secs(5));
    eprintln!("blocking cancel while parked: returned in {latency:?}; session gone {cleanup:?} later");
    assert!(latency < Duration::from_millis(50), "{latency:?}");

    held.release().unwrap();
    let guard = lock.acquire_with(Some(Duration::from_secs(10)), None).unwrap();
    guard.release().unwrap();
}

/// (c) Stopped while retrying against a proxy that refuses connections.
#[test]
fn cancel_while_retrying() {
    let Some(agent) = require_agent() else { return };
    let addr = agent.addr();
    let name = "blocking faults cancel-retrying";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    proxy.set_mode(Mode::Refuse);
    let client = Client::new(proxy.config()).unwrap();
    let lock = client
        .lock(named("blocking/faults/cancel-retrying/.lock", name))
        .unwrap();
    let attempt = Attempt::start(&lock);
    std::thread::sleep(Duration::from_secs(1));
    let refused = proxy.counters().refused;
    assert!(refused >= 2, "retried: {refused} connections refused");

    let latency = attempt.stop();
    eprintln!("blocking cancel while retrying ({refused} connections refused): returned in {latency:?}");
    assert!(latency < Duration::from_millis(50), "{latency:?}");

    proxy.set_mode(Mode::Pass);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sessions_named(addr, name), 0);
    let guard = lock.acquire_with(Some(Duration::from_secs(10)), None).unwrap();
    guard.release().unwrap();
    assert_eq!(sessions_named(addr, name), 0);
}

/// An acquire's own timeout is a cancellation too: it returns on time and leaves no session.
#[test]
fn timeout_while_parked_leaves_no_session() {
    let Some(agent) = require_agent() else { return };
    let addr = agent.addr();
    let key = "blocking/faults/timeout-parked/.lock";
    let name = "blocking faults timeout-parked waiter";
    let client = Client::new(agent.config().unwrap()).unwrap();
    let holder = client
        .lock(named(key, "blocking faults timeout-parked holder"))
        .unwrap();
    let held = holder.acquire().unwrap();
    let lock = client.lock(named(key, name)).unwrap();
    let started = Instant::now();
    let result = lock.acquire_with(Some(Duration::from_millis(700)), None);
    let waited = started.elapsed();
    assert!(matches!(result, Err(Error::GaveUp)), "{result:?}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(1),
        "{waited:?}"
    );
    no_session_left(addr, name, Duration::from_secs(5));
    held.release().unwrap();
}

/// Holder releases, parked waiter acquires: how long does the key stay unheld?
#[test]
fn handoff_time() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/faults/handoff/.lock";
    let mut holder = client.lock(named(key, "blocking faults handoff")).unwrap();
    let mut waiter = client.lock(named(key, "blocking faults handoff")).unwrap();
    let mut guard = holder.acquire().unwrap();
    let mut times = Vec::new();
    let mut last_token = guard.token().lock_index;
    for _ in 0..10 {
        let thread = {
            let waiter = waiter.clone();
            std::thread::spawn(move || {
                let guard = waiter.acquire_with(Some(Duration::from_secs(10)), None).unwrap();
                (Instant::now(), guard)
            })
        };
        // Parked in its blocking read by now.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!thread.is_finished());
        let released = Instant::now();
        guard.release().unwrap();
        let (acquired, next) = thread.join().unwrap();
        times.push(acquired.duration_since(released));
        assert!(next.token().lock_index > last_token);
        last_token = next.token().lock_index;
        guard = next;
        std::mem::swap(&mut holder, &mut waiter);
    }
    guard.release().unwrap();
    times.sort_unstable();
    let p50 = times[times.len() / 2];
    eprintln!(
        "blocking handoff over {} handoffs: p50 {p50:?}, min {:?}, max {:?}",
        times.len(),
        times[0],
        times[times.len() - 1]
    );
    assert!(p50 < Duration::from_secs(1), "{times:?}");
}
