//! The edges of a hold on a real agent: an acquire cancelled with its lock transaction in flight,
//! a release that gets no answer, a token that may read the key but not write it, and an agent
//! that does not answer at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::time::Duration;

use consul_lock_core::api::{ClientConfig, KvGet, Token};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::{require_acl_agent, require_agent};
use consul_lock_testkit::proxy::{FaultProxy, Mode};
use consul_lock_tokio::{Client, Error, LockError, LockOptions};

fn transport() -> &'static TestTransport {
    static HTTP: OnceLock<TestTransport> = OnceLock::new();
    HTTP.get_or_init(|| TestTransport::new().unwrap())
}

/// One raw request to the agent (never through a proxy), with `token` if given: status and body.
async fn raw(
    config: &ClientConfig,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let url = format!("{}{path}", config.base_url());
    let (method, body, token) = (method.to_owned(), body.to_owned(), token.map(str::to_owned));
    tokio::task::spawn_blocking(move || {
        let mut request = http::Request::builder().method(method.as_str()).uri(url);
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        let reply = transport()
            .exchange(request.body(body.into_bytes()).unwrap())
            .unwrap();
        (
            reply.status().as_u16(),
            String::from_utf8_lossy(reply.body()).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Whether a fresh session may take `key` right now: a lock transaction made by hand, answered
/// 200 when granted and 409 `… due to lock delay` while a destroyed holder's lock-delay is in
/// force. The session is destroyed afterwards (releasing the key first).
async fn a_fresh_session_may_lock(config: &ClientConfig, key: &str) -> Result<(), String> {
    let (_, created) = raw(config, "PUT", "/v1/session/create", r#"{"TTL":"10s"}"#, None).await;
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let txn = serde_json::json!([{ "KV": { "Verb": "lock", "Key": key, "Session": id, "Value": "" } }]);
    let (status, body) = raw(config, "PUT", "/v1/txn", &txn.to_string(), None).await;
    raw(config, "PUT", &format!("/v1/kv/{key}?release={id}"), "", None).await;
    raw(config, "PUT", &format!("/v1/session/destroy/{id}"), "", None).await;
    if status == 200 {
        Ok(())
    } else {
        Err(format!("{status} {body}"))
    }
}

/// The key's `LockIndex` (how many times a session locked it) and whether a session holds it.
async fn lock_state(client: &Client, key: &str) -> (u64, bool) {
    let read = client
        .call(
            &KvGet::new(consul_lock_core::api::Key::new(key).unwrap()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let pair = read.value.expect("the key exists");
    (pair.lock_index, pair.session.is_some())
}

fn named(key: &str, name: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    options.hold.session_options_mut().unwrap().name = name.to_owned();
    options
}

/// Item 1: an acquire dropped while its lock transaction is in flight, and granted after the
/// drop, is released before its session is destroyed: nobody else waits out the lock-delay.
/// (Before, the session was destroyed with the key held: 15 s for everyone else.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_with_its_transaction_in_flight_imposes_no_lock_delay() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let key = "tokio/edges/dropped-in-flight";
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    // Every request waits a second in the proxy before it goes on (and is logged as it goes).
    // The transaction is sent as soon as the first read of the key is answered, so once that
    // read is logged, the transaction is on its way for the next second: drop the future then.
    proxy.set_latency(Duration::from_secs(1));
    let client = Client::new(proxy.config()).unwrap();
    let lock = client.lock(named(key, "tokio edges dropped-in-flight")).unwrap();
    let path = format!("/v1/kv/{key}");
    let is_read =
        |s: &consul_lock_testkit::proxy::SeenRequest| s.head.method == "GET" && s.head.path() == path;
    let is_txn = |s: &consul_lock_testkit::proxy::SeenRequest| s.head.path() == "/v1/txn";
    {
        let acquire = lock.acquire();
        tokio::pin!(acquire);
        tokio::select! {
            biased;
            _ = &mut acquire => panic!("acquired before the read went through"),
            () = async {
                while proxy.count(is_read) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            } => {}
        }
        assert_eq!(
            proxy.count(is_txn),
            0,
            "the transaction has not reached the agent yet"
        );
        // Dropped here, with the transaction in the proxy's hands.
    }
    lock.close().await;
    let direct = Client::new(config.clone()).unwrap();
    let (lock_index, held) = lock_state(&direct, key).await;
    assert_eq!(
        lock_index, 1,
        "the dropped acquire was granted (else this test proves nothing)"
    );
    assert!(!held, "released");
    a_fresh_session_may_lock(&config, key)
        .await
        .expect("no lock-delay in force after the cleanup");
}

/// Item 3: a release answered with errors is tried again, so the key is freed by the release
/// (no lock-delay) and `release()` succeeds; a release never confirmed is an error, not `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_fails_is_retried_and_one_never_confirmed_is_an_error() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let is_release = |head: &consul_lock_testkit::proxy::RequestHead| {
        head.method == "PUT" && head.target.contains("release=")
    };

    let key = "tokio/edges/release-retried";
    let lock = client.lock(named(key, "tokio edges release-retried")).unwrap();
    let guard = lock.acquire().await.unwrap();
    proxy.fail_requests(is_release, 2);
    guard.release().await.expect("confirmed on the third try");
    assert_eq!(proxy.armed_faults(), 0, "both failures were met");
    a_fresh_session_may_lock(&config, key)
        .await
        .expect("freed by the release, not by a destroy");

    let key = "tokio/edges/release-never-confirmed";
    let mut options = named(key, "tokio edges release-never-confirmed");
    options.hold.session_options_mut().unwrap().ttl = Duration::from_secs(10);
    let lock = client.lock(options).unwrap();
    let guard = lock.acquire().await.unwrap();
    proxy.fail_requests(is_release, u64::MAX);
    match guard.release().await {
        Err(Error::Lock(LockError::ReleaseUnconfirmed { attempts, last })) => {
            assert!(attempts >= 2, "{attempts}");
            assert!(last.contains("500"), "{last}");
        }
        other => panic!("expected ReleaseUnconfirmed, got {other:?}"),
    }
    proxy.clear_faults();
    lock.close().await;
}

/// Item 4: a token that may read the key but not write it gets a typed permission error at once,
/// rather than a retry every few seconds for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_can_read_but_not_write_the_key_fails_at_once() {
    let Some(agent) = require_acl_agent() else { return };
    let config = agent.config().unwrap();
    let policy =
        serde_json::json!({ "Name": "read-only-keys", "Rules": r#"key_prefix "" { policy = "read" }"# });
    let (status, body) = raw(
        &config,
        "PUT",
        "/v1/acl/policy",
        &policy.to_string(),
        Some("root"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = serde_json::json!({ "Policies": [{ "Name": "read-only-keys" }] });
    let (status, body) = raw(&config, "PUT", "/v1/acl/token", &token.to_string(), Some("root")).await;
    assert_eq!(status, 200, "{body}");
    let secret = serde_json::from_str::<serde_json::Value>(&body).unwrap()["SecretID"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut reader = config.clone();
    reader.token = Some(Token::new(secret).unwrap());
    let client = Client::new(reader).unwrap();
    let lock = client.lock_key("acl/edges/read-only").unwrap();
    let mut retries = lock.retries();
    let acquired = tokio::time::timeout(Duration::from_secs(30), lock.acquire())
        .await
        .expect("an answer, not a wait");
    assert!(
        matches!(acquired, Err(Error::Lock(LockError::PermissionDenied(_)))),
        "{acquired:?}"
    );
    assert_eq!(retries.latest(), None, "no retry before the refusal");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), retries.next())
            .await
            .is_err(),
        "nothing retried"
    );
    lock.close().await;
}

/// Item 5: an agent that refuses every connection: each failed try is seen through the retry
/// watch, and the acquisition fails with a typed error once its error budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_is_reported_and_ends_the_acquire_after_the_budget() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    proxy.set_mode(Mode::Refuse);
    let client = Client::new(proxy.config()).unwrap();
    let mut options = LockOptions::new("tokio/edges/unreachable").unwrap();
    options.hold.acquire_error_budget = Some(Duration::from_secs(2));
    let lock = client.lock(options).unwrap();
    let mut retries = lock.retries();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(retry) = retries.next().await {
            seen.push(retry);
        }
        seen
    });
    match lock.acquire().await {
        Err(Error::Lock(LockError::AgentUnavailable {
            attempts,
            failing_for,
            last,
        })) => {
            assert!(attempts >= 2, "{attempts}");
            assert!(failing_for >= Duration::from_secs(2), "{failing_for:?}");
            assert!(last.contains("session create"), "{last}");
        }
        other => panic!("expected AgentUnavailable, got {other:?}"),
    }
    lock.close().await;
    let seen = watcher.await.unwrap();
    assert!(!seen.is_empty(), "every failure is seen");
    assert!(
        seen.windows(2).all(|w| w[1].attempt == w[0].attempt + 1),
        "in order: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|r| r.cause.contains("connect") || r.cause.contains("connection"))
    );
}

/// A guard dropped (its release goes out in the background) and the lock acquired again at once
/// on the same handle: the acquire waits for that release and then takes the lock, rather than
/// fail with `Busy` for a release the caller never saw. Each round drops the guard and acquires
/// in the same breath, which before answered `Misuse(Busy)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_right_after_a_dropped_guard_waits_for_its_release() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let lock = client
        .lock(named("tokio/edges/reacquire", "tokio edges reacquire"))
        .unwrap();
    let mut sequences = Vec::new();
    for _ in 0..5 {
        let guard = lock.acquire().await.unwrap();
        sequences.push(guard.token().sequence());
        drop(guard);
    }
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "a new hold each time: {sequences:?}"
    );
    lock.close().await;
}
