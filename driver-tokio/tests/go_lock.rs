//! The Go client's own lock tests (`api/lock_test.go`), ported to the tokio driver and run against
//! a real agent: LockUnlock, ForceInvalidate, DeleteKey, Contend, Destroy, Conflict, ReclaimLock,
//! MonitorRetry (through the fault proxy) and OneShot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::Wire;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, KvCasDelete, KvCasPut, SessionCreate, SessionDestroy};
use consul_lock_core::machine::{LOCK_FLAG_VALUE, Misuse, SEMAPHORE_FLAG_VALUE, SessionChoice};
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Outcome, RequestHead};
use consul_lock_tokio::{Client, Error, LockError, LockOptions, LossReason};

/// Options for `key` with a name for the session, so that leftovers can be told apart.
fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("tokio go {key}");
    }
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_unlock() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/lock-unlock/.lock";
    let mut opts = options(key);
    opts.hold.value = b"held".to_vec();
    let lock = client.lock(opts).unwrap();

    let guard = lock.acquire().await.unwrap();
    assert!(guard.is_held());
    assert_eq!(guard.token().key.as_str(), key);
    assert!(guard.token().lock_index > 0);
    // Acquiring again while held is an error (Go: ErrLockHeld).
    assert!(matches!(
        lock.acquire().await,
        Err(Error::Misuse(Misuse::AlreadyHeld))
    ));
    let pair = wire.get(key).await.unwrap();
    assert_eq!(pair.session.as_ref(), Some(&guard.token().session));
    assert_eq!(
        (pair.flags, pair.lock_index),
        (LOCK_FLAG_VALUE, guard.token().lock_index)
    );
    assert_eq!(pair.value, b"held");

    let first = guard.token().clone();
    guard.release().await.unwrap();
    let pair = wire.get(key).await.unwrap();
    assert_eq!(pair.session, None, "released");

    // Usable again; a new session, so a new fencing token.
    let guard = lock.acquire().await.unwrap();
    assert!(guard.token().lock_index > first.lock_index);
    assert_ne!(guard.token().session, first.session);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_invalidate() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/force-invalidate/.lock";
    let mut opts = options(key);
    // So that taking it again after the loss need not wait out the default 15 s lock-delay.
    let session = opts.hold.session_options_mut().unwrap();
    session.lock_delay = Some(Duration::ZERO);
    session.checks = Some(Vec::new());
    let lock = client.lock(opts).unwrap();
    let mut guard = lock.acquire().await.unwrap();

    let destroyed_at = Instant::now();
    assert!(
        wire.call(SessionDestroy {
            id: guard.token().session.clone()
        })
        .await
        .unwrap()
    );
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .unwrap()
        .unwrap();
    let noticed = destroyed_at.elapsed();
    assert!(
        matches!(reason, LossReason::SessionInvalidated | LossReason::NotHeld),
        "{reason:?}"
    );
    assert!(!guard.is_held());
    assert!(noticed < Duration::from_secs(2), "{noticed:?}");

    // The lock is usable after a loss (Go's #4935, #4902).
    drop(guard);
    let guard = tokio::time::timeout(Duration::from_secs(10), lock.acquire())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_key() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/delete-key/.lock";
    let lock = client.lock(options(key)).unwrap();
    let mut guard = lock.acquire().await.unwrap();

    let pair = wire.get(key).await.unwrap();
    let delete = KvCasDelete {
        key: Key::new(key).unwrap(),
        cas: pair.modify_index,
    };
    assert!(wire.call(delete).await.unwrap());
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, LossReason::KeyDeleted);
    assert!(!guard.is_held());
    // Releasing a lost lock is fine: nothing left to release.
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contend() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/contend/.lock";
    let holders = Arc::new(AtomicU32::new(0));
    let last_token = Arc::new(Mutex::new(0u64));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let lock = client.lock(options(key)).unwrap();
        let (holders, last_token) = (holders.clone(), last_token.clone());
        tasks.push(tokio::spawn(async move {
            let guard = lock.acquire().await.unwrap();
            assert_eq!(
                holders.fetch_add(1, Ordering::SeqCst),
                0,
                "contender {i}: two holders at once"
            );
            {
                let mut last = last_token.lock().unwrap();
                assert!(
                    guard.token().lock_index > *last,
                    "fencing tokens must increase: {} after {}",
                    guard.token().lock_index,
                    *last
                );
                *last = guard.token().lock_index;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(guard.is_held());
            holders.fetch_sub(1, Ordering::SeqCst);
            guard.release().await.unwrap();
            i
        }));
    }
    let mut done = Vec::new();
    for task in tasks {
        done.push(
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2], "every contender held the lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/destroy/.lock";
    let lock = client.lock(options(key)).unwrap();
    let other = client.lock(options(key)).unwrap();

    let guard = lock.acquire().await.unwrap();
    // Held by this lock: an error (Go: ErrLockHeld).
    assert!(matches!(
        lock.destroy().await,
        Err(Error::Misuse(Misuse::AlreadyHeld))
    ));
    // Held by another: in use.
    assert!(matches!(
        other.destroy().await,
        Err(Error::Lock(LockError::InUse))
    ));
    guard.release().await.unwrap();
    assert!(wire.get(key).await.is_some());

    // Free: deleted; twice: still fine.
    lock.destroy().await.unwrap();
    assert!(wire.get(key).await.is_none());
    lock.destroy().await.unwrap();
    other.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/conflict/.lock";
    let semaphore_key = KvCasPut {
        key: Key::new(key).unwrap(),
        cas: 0,
        flags: SEMAPHORE_FLAG_VALUE,
        value: b"{\"Limit\":2,\"Holders\":{}}".to_vec(),
    };
    assert!(wire.call(semaphore_key).await.unwrap());
    let lock = client.lock(options(key)).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), lock.acquire())
        .await
        .unwrap();
    assert!(
        matches!(
            result,
            Err(Error::Lock(LockError::Conflict {
                flags: SEMAPHORE_FLAG_VALUE
            }))
        ),
        "{result:?}"
    );
    // Destroy refuses too, and leaves the key alone.
    assert!(matches!(
        lock.destroy().await,
        Err(Error::Lock(LockError::Conflict {
            flags: SEMAPHORE_FLAG_VALUE
        }))
    ));
    assert_eq!(wire.get(key).await.unwrap().flags, SEMAPHORE_FLAG_VALUE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_lock() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/reclaim/.lock";
    // A session of the caller's, without a TTL: nobody needs to renew it.
    let session = wire
        .call(SessionCreate {
            name: Some("tokio go reclaim".into()),
            ..SessionCreate::default()
        })
        .await
        .unwrap();
    let with_session = || {
        let mut opts = LockOptions::new(key).unwrap();
        opts.hold.session = SessionChoice::Existing(session.clone());
        opts
    };
    let first = client.lock(with_session()).unwrap();
    let mut held = first.acquire().await.unwrap();
    assert_eq!(held.token().session, session);

    // A second lock on the same session takes the key over: same holder, same LockIndex.
    let second = client.lock(with_session()).unwrap();
    let reclaimed = tokio::time::timeout(Duration::from_secs(10), second.acquire())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reclaimed.token(), held.token());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(held.is_held() && reclaimed.is_held());

    // Releasing one releases the key for both: the other learns it is no longer held.
    let mut reclaimed_watch = reclaimed.watch();
    reclaimed.release().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), held.lost())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, LossReason::NotHeld);
    assert!(!reclaimed_watch.is_held());
    // The released hold never reports a loss.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), reclaimed_watch.lost())
            .await
            .is_err()
    );
    // The caller's session is left alone.
    assert!(wire.call(SessionDestroy { id: session }).await.unwrap());
}

/// The monitor's reads: consistent GETs of the key. Renewals (PUTs) and everything else pass.
fn monitor_read(key: &'static str) -> impl Fn(&RequestHead) -> bool + Send + Sync + 'static {
    move |head: &RequestHead| {
        head.method == "GET" && head.path() == format!("/v1/kv/{key}") && head.has_param("consistent")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_retry() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let key = "tokio/go/monitor-retry/.lock";
    let mut opts = options(key);
    opts.hold.monitor_retries = Some(3);
    opts.hold.monitor_retry_time = Duration::from_millis(100);
    let lock = client.lock(opts).unwrap();
    let mut guard = lock.acquire().await.unwrap();
    let session = guard.token().session.clone();
    let (wire, session) = (&wire, &session);
    // Let the monitor's first blocking read go out before arming anything.
    let blocking_monitor_reads = || {
        proxy.count(|s| {
            monitor_read(key)(&s.head) && s.head.has_param("index") && s.outcome == Outcome::Forwarded
        })
    };
    while blocking_monitor_reads() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Poke the key (a plain write keeps the holder) so that the monitor's blocking read returns
    // and it reads again, into the faults. The value differs each time: Consul skips writes that
    // change nothing, without moving the index.
    let poke = |n: u32| async move {
        let pair = wire.get(key).await.unwrap();
        let write = KvCasPut {
            key: Key::new(key).unwrap(),
            cas: pair.modify_index,
            flags: LOCK_FLAG_VALUE,
            value: format!("poke {n}").into_bytes(),
        };
        assert!(wire.call(write).await.unwrap());
        assert_eq!(wire.get(key).await.unwrap().session.as_ref(), Some(session));
    };

    // Two failures: within the three retries allowed; the lock survives.
    proxy.fail_requests(monitor_read(key), 2);
    poke(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.armed_faults(), 0, "both faults were hit");
    assert!(guard.is_held());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), guard.lost())
            .await
            .is_err()
    );

    // Ten: more than the retries allow; the lock is lost.
    proxy.fail_requests(monitor_read(key), 10);
    poke(2).await;
    let reason = tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(reason, LossReason::MonitorFailed { failures: 4, .. }),
        "{reason:?}"
    );
    proxy.clear_faults();
    // Only monitor reads were failed, never a renewal.
    let injected = proxy.count(|s| s.outcome == Outcome::Injected);
    assert_eq!(injected, 6);
    assert_eq!(
        proxy.count(|s| s.outcome == Outcome::Injected && s.head.path().starts_with("/v1/session/")),
        0
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "tokio/go/one-shot/.lock";
    let holder = client.lock(options(key)).unwrap();
    let guard = holder.acquire().await.unwrap();

    let wait = Duration::from_secs(1);
    let mut opts = options(key);
    opts.hold.try_once = true;
    opts.hold.wait_time = wait;
    let contender = client.lock(opts).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), contender.acquire())
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(matches!(result, Err(Error::GaveUp)), "{result:?}");
    assert!(waited >= wait && waited < 2 * wait, "gave up after {waited:?}");

    guard.release().await.unwrap();
    let started = Instant::now();
    let won = tokio::time::timeout(Duration::from_secs(10), contender.acquire())
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < wait, "{:?}", started.elapsed());
    won.release().await.unwrap();
}
