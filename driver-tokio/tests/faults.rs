//! Faults against a real agent with the tokio driver: a partition between holder and agent,
//! cancellation at any moment, and the time a handoff takes. Prints its measurements.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Mode, Outcome, SeenRequest};
use consul_lock_tokio::{Client, Error, Lock, LockGuard, LockOptions, LossReason, Misuse};
use tokio::sync::oneshot;

fn transport() -> &'static TestTransport {
    static HTTP: OnceLock<TestTransport> = OnceLock::new();
    HTTP.get_or_init(|| TestTransport::new().unwrap())
}

/// How many sessions named `name` the agent knows (asked directly, never through a proxy).
async fn sessions_named(config: &ClientConfig, name: &str) -> usize {
    let url = format!("{}/v1/session/list", config.base_url());
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let request = http::Request::get(url).body(Vec::new()).unwrap();
        let reply = transport().exchange(request).unwrap();
        let sessions: Vec<serde_json::Value> = serde_json::from_slice(reply.body()).unwrap();
        sessions.iter().filter(|s| s["Name"] == name.as_str()).count()
    })
    .await
    .unwrap()
}

/// Waits up to `within` for no session named `name` to be left; how long that took.
async fn no_session_left(config: &ClientConfig, name: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let left = sessions_named(config, name).await;
        if left == 0 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{left} session(s) named {name:?} left after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// An acquire running in a task, with a way to cancel it (by dropping its future) and get the
/// lock back.
struct Attempt {
    cancel: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<(Option<Result<LockGuard, Error>>, Lock)>,
}

impl Attempt {
    fn start(lock: Lock) -> Attempt {
        let (cancel, cancelled) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = tokio::select! {
                result = lock.acquire() => Some(result),
                _ = cancelled => None,
            };
            (result, lock)
        });
        Attempt { cancel, task }
    }

    /// Cancels the attempt; returns the lock and how long the acquire took to return.
    async fn cancel(self) -> (Lock, Duration) {
        let asked = Instant::now();
        self.cancel.send(()).unwrap();
        let (result, lock) = self.task.await.unwrap();
        let latency = asked.elapsed();
        assert!(result.is_none(), "the attempt ended by itself: {result:?}");
        (lock, latency)
    }
}

/// The holder talks to the agent through a proxy that turns into a black hole; a second client
/// talks to the agent directly. The holder must learn of its loss (renew deadline) within a TTL
/// of the partition, and before the second client can hold the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_holder_knows_before_anyone_else_holds() {
    let Some(agent) = require_agent() else { return };
    let ttl = Duration::from_secs(10);
    let key = "tokio/faults/partition/.lock";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let holder_client = Client::new(proxy.config()).unwrap();
    let mut options = named(key, "tokio faults partition holder");
    let session = options.hold.session_options_mut().unwrap();
    session.ttl = ttl;
    session.lock_delay = Some(Duration::ZERO);
    session.checks = Some(Vec::new());
    let holder = holder_client.lock(options).unwrap();
    let mut guard = holder.acquire().await.unwrap();

    // Cut just after the first renew was acknowledged (TTL/2 after the create), so that a renew
    // is what the deadline counts from.
    let deadline = Instant::now() + ttl;
    while proxy.count(|s| is_session_write(s) && s.head.path().starts_with("/v1/session/renew/")) == 0 {
        assert!(Instant::now() < deadline, "no renew within the TTL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
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
        .lock(named(key, "tokio faults partition other"))
        .unwrap();
    let second = tokio::spawn(async move {
        let guard = other.acquire().await.unwrap();
        (Instant::now(), guard, other)
    });

    let reason = tokio::time::timeout(ttl + Duration::from_secs(5), guard.lost())
        .await
        .expect("the holder must learn of the loss within the TTL")
        .unwrap();
    let lost_at = Instant::now();
    let LossReason::RenewDeadline { since_ack } = reason else {
        panic!("lost for another reason: {reason:?}")
    };
    assert!(!guard.is_held());
    let (acquired_at, other_guard, _other) = tokio::time::timeout(Duration::from_secs(40), second)
        .await
        .expect("the agent frees the key within 2×TTL")
        .unwrap();

    let detection = lost_at.duration_since(partitioned);
    let expected = (last_ack + ttl).saturating_duration_since(partitioned);
    let taken = acquired_at.duration_since(partitioned);
    eprintln!(
        "tokio partition (TTL {ttl:?}, lock-delay 0): loss detected {detection:?} after the cut \
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
    other_guard.release().await.unwrap();
    drop(guard);
}

/// (a) Cancelled while the session create hangs in a black hole: returns at once, leaves no
/// session, and the lock works again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_creating_the_session() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let name = "tokio faults cancel-create";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    proxy.set_mode(Mode::BlackHole);
    let client = Client::new(proxy.config()).unwrap();
    let mut options = named("tokio/faults/cancel-create/.lock", name);
    options.hold.request_timeout = Duration::from_secs(2);
    let attempt = Attempt::start(client.lock(options).unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.count(|s| s.head.path() == "/v1/session/create"), 1);

    let (lock, latency) = attempt.cancel().await;
    eprintln!("tokio cancel while creating the session: returned in {latency:?}");
    assert!(latency < Duration::from_millis(50), "{latency:?}");

    proxy.set_mode(Mode::Pass);
    // The lost create times out after the request timeout; nothing may appear meanwhile.
    let settle = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < settle {
        assert_eq!(sessions_named(&config, name).await, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.acquire())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sessions_named(&config, name).await, 1);
    guard.release().await.unwrap();
    assert_eq!(sessions_named(&config, name).await, 0);
}

/// (b) Cancelled while parked in a blocking read on a held key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_parked_in_a_blocking_read() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let key = "tokio/faults/cancel-parked/.lock";
    let name = "tokio faults cancel-parked waiter";
    let client = Client::new(config.clone()).unwrap();
    let holder = client
        .lock(named(key, "tokio faults cancel-parked holder"))
        .unwrap();
    let held = holder.acquire().await.unwrap();

    let attempt = Attempt::start(client.lock(named(key, name)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions_named(&config, name).await == 0 {
        assert!(Instant::now() < deadline, "the waiter made no session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (lock, latency) = attempt.cancel().await;
    let cleanup = no_session_left(&config, name, Duration::from_secs(5)).await;
    eprintln!("tokio cancel while parked: returned in {latency:?}; session gone {cleanup:?} later");
    assert!(latency < Duration::from_millis(50), "{latency:?}");

    held.release().await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.acquire())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
}

/// (c) Cancelled while retrying against a proxy that refuses connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_retrying() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let name = "tokio faults cancel-retrying";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    proxy.set_mode(Mode::Refuse);
    let client = Client::new(proxy.config()).unwrap();
    let attempt = Attempt::start(
        client
            .lock(named("tokio/faults/cancel-retrying/.lock", name))
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = proxy.counters().refused;
    assert!(refused >= 2, "retried: {refused} connections refused");

    let (lock, latency) = attempt.cancel().await;
    eprintln!("tokio cancel while retrying ({refused} connections refused): returned in {latency:?}");
    assert!(latency < Duration::from_millis(50), "{latency:?}");

    proxy.set_mode(Mode::Pass);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sessions_named(&config, name).await, 0);
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.acquire())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
    assert_eq!(sessions_named(&config, name).await, 0);
}

/// (c') Cancelled while retrying reads, after its session was created: the attempt returns at
/// once; the session's destroy is refused too, so the session is left to expire (reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_retrying_reads_with_a_session() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let key = "tokio/faults/cancel-retrying-reads/.lock";
    let name = "tokio faults cancel-retrying-reads waiter";
    let direct = Client::new(config.clone()).unwrap();
    let holder = direct
        .lock(named(key, "tokio faults cancel-retrying-reads holder"))
        .unwrap();
    let held = holder.acquire().await.unwrap();
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let attempt = Attempt::start(client.lock(named(key, name)).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sessions_named(&config, name).await == 0 {
        assert!(Instant::now() < deadline, "the waiter made no session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (_lock, latency) = attempt.cancel().await;
    eprintln!("tokio cancel while retrying reads: returned in {latency:?}");
    assert!(latency < Duration::from_millis(50), "{latency:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(Mode::Pass);
    let destroys = proxy.count(|s| s.head.path().starts_with("/v1/session/destroy/"));
    let left = sessions_named(&config, name).await;
    eprintln!(
        "tokio cancel while retrying reads: {destroys} destroy request(s) reached the proxy; \
         {left} session(s) left (expire within 2×TTL)"
    );
    held.release().await.unwrap();
}

/// Holder releases, parked waiter acquires: how long does the key stay unheld?
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_time() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/faults/handoff/.lock";
    let mut holder = Arc::new(client.lock(named(key, "tokio faults handoff")).unwrap());
    let mut waiter = Arc::new(client.lock(named(key, "tokio faults handoff")).unwrap());
    let mut guard = holder.acquire().await.unwrap();
    let mut times = Vec::new();
    let mut last_token = guard.token().lock_index;
    for _ in 0..10 {
        let task = {
            let waiter = waiter.clone();
            tokio::spawn(async move {
                let guard = waiter.acquire().await.unwrap();
                (Instant::now(), guard)
            })
        };
        // Parked in its blocking read by now.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished());
        let released = Instant::now();
        guard.release().await.unwrap();
        let (acquired, next) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        times.push(acquired.duration_since(released));
        assert!(next.token().lock_index > last_token);
        last_token = next.token().lock_index;
        guard = next;
        std::mem::swap(&mut holder, &mut waiter);
    }
    guard.release().await.unwrap();
    times.sort_unstable();
    let p50 = times[times.len() / 2];
    eprintln!(
        "tokio handoff over {} handoffs: p50 {p50:?}, min {:?}, max {:?}",
        times.len(),
        times[0],
        times[times.len() - 1]
    );
    assert!(p50 < Duration::from_secs(1), "{times:?}");
}

/// Acquire futures dropped at arbitrary points (a few ms in) leave neither a held key nor a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_acquire_future_after_the_grant_releases_the_key() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let key = "tokio/faults/drop-after-grant/.lock";
    let name = "tokio faults drop-after-grant";
    let client = Client::new(config.clone()).unwrap();
    let lock = client.lock(named(key, name)).unwrap();
    // Poll the future once, then drop it whatever happened: the lock must end up free.
    for _ in 0..5 {
        let result = tokio::time::timeout(Duration::from_millis(3), lock.acquire()).await;
        if let Ok(guard) = result {
            guard.unwrap().release().await.unwrap();
        }
    }
    no_session_left(&config, name, Duration::from_secs(5)).await;
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.acquire())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        lock.acquire().await,
        Err(Error::Misuse(Misuse::AlreadyHeld))
    ));
    guard.release().await.unwrap();
}
