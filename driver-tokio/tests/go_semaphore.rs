//! The Go client's own semaphore tests (`api/semaphore_test.go`), ported to the tokio driver and
//! run against a real agent: AcquireRelease, ForceInvalidate, DeleteKey, Contend, BadLimit,
//! Destroy, Conflict (both ways), MonitorRetry (through the fault proxy) and OneShot; and a
//! cancel, which Go can't do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::Wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, KvDelete, KvList, KvPair, SessionDestroy, SessionId, SessionInfo};
use consul_lock_core::machine::{
    LOCK_FLAG_VALUE, Misuse, OptionsError, SEMAPHORE_FLAG_VALUE, SemaphoreState,
};
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Outcome, RequestHead};
use consul_lock_tokio::{Client, Error, LockError, LockOptions, LossReason, SemaphoreOptions};

impl Wire {
    /// Every key under `prefix/`.
    async fn list(&self, prefix: &str) -> Vec<KvPair> {
        self.call(KvList::new(Key::new(format!("{prefix}/")).unwrap()))
            .await
            .unwrap()
            .value
    }

    /// The semaphore's `.lock`, decoded.
    async fn state(&self, prefix: &str) -> Option<SemaphoreState> {
        let pair = self.get(&format!("{prefix}/.lock")).await?;
        assert_eq!(pair.flags, SEMAPHORE_FLAG_VALUE);
        Some(SemaphoreState::decode(&pair.value, 0).unwrap())
    }

    async fn session_exists(&self, id: &SessionId) -> bool {
        self.call(SessionInfo::new(id.clone()))
            .await
            .unwrap()
            .value
            .is_some()
    }
}

/// Options for a semaphore under `prefix` with a name for the session, so that leftovers can be
/// told apart.
fn options(prefix: &str, limit: u32) -> SemaphoreOptions {
    let mut options = SemaphoreOptions::new(prefix, limit).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("tokio go semaphore {prefix}");
    }
    options
}

/// Waits up to 5 s for `check` to hold.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_release() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/acquire-release";
    let mut opts = options(prefix, 2);
    opts.hold.value = b"held".to_vec();
    let semaphore = client.semaphore(opts).unwrap();

    let guard = semaphore.acquire().await.unwrap();
    assert!(guard.is_held());
    let session = guard.token().session.clone();
    assert_eq!(guard.token().key.as_str(), format!("{prefix}/.lock"));
    assert!(guard.token().sequence() > 0);
    // Acquiring again while held is an error (Go: ErrSemaphoreHeld).
    assert!(matches!(
        semaphore.acquire().await,
        Err(Error::Misuse(Misuse::AlreadyHeld))
    ));
    // Our contender key, held by our session, with the value; we are listed in the .lock.
    let contender = wire.get(&format!("{prefix}/{session}")).await.unwrap();
    assert_eq!(contender.session.as_ref(), Some(&session));
    assert_eq!(
        (contender.flags, contender.value.as_slice()),
        (SEMAPHORE_FLAG_VALUE, &b"held"[..])
    );
    let state = wire.state(prefix).await.unwrap();
    assert_eq!(state.limit, 2);
    assert_eq!(state.holders.keys().collect::<Vec<_>>(), [session.as_str()]);

    guard.release().await.unwrap();
    // Out of the .lock, contender key deleted, session destroyed.
    assert!(wire.state(prefix).await.unwrap().holders.is_empty());
    assert!(wire.get(&format!("{prefix}/{session}")).await.is_none());
    assert!(!wire.session_exists(&session).await);

    // Usable again, with a new session.
    let guard = semaphore.acquire().await.unwrap();
    assert_ne!(guard.token().session, session);
    guard.release().await.unwrap();
    semaphore.destroy().await.unwrap();
    assert!(wire.list(prefix).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_invalidate() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/force-invalidate";
    let semaphore = client.semaphore(options(prefix, 2)).unwrap();
    let mut guard = semaphore.acquire().await.unwrap();
    let session = guard.token().session.clone();

    let destroyed_at = Instant::now();
    assert!(wire.call(SessionDestroy { id: session.clone() }).await.unwrap());
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .unwrap()
        .unwrap();
    let noticed = destroyed_at.elapsed();
    // Behavior `delete`: the session's end deletes the contender key, which the monitor sees.
    assert!(
        matches!(reason, LossReason::KeyDeleted | LossReason::SessionInvalidated),
        "{reason:?}"
    );
    assert!(!guard.is_held());
    assert!(noticed < Duration::from_secs(2), "{noticed:?}");
    assert!(wire.get(&format!("{prefix}/{session}")).await.is_none());

    // Usable after a loss; the dead holder is pruned by the next holder.
    drop(guard);
    let guard = tokio::time::timeout(Duration::from_secs(10), semaphore.acquire())
        .await
        .unwrap()
        .unwrap();
    let state = wire.state(prefix).await.unwrap();
    assert_eq!(
        state.holders.keys().collect::<Vec<_>>(),
        [guard.token().session.as_str()]
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_key() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/delete-key";
    let semaphore = client.semaphore(options(prefix, 2)).unwrap();
    let mut guard = semaphore.acquire().await.unwrap();
    let session = guard.token().session.clone();

    let contender = Key::new(format!("{prefix}/{session}")).unwrap();
    assert!(wire.call(KvDelete { key: contender }).await.unwrap());
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, LossReason::KeyDeleted);
    assert!(!guard.is_held());
    // Releasing a lost slot is fine: nothing left to release. The session goes (in the
    // background: the loss already ended the hold).
    guard.release().await.unwrap();
    eventually("the lost slot's session goes", || async {
        !wire.session_exists(&session).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contend() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/contend";
    let holders = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let semaphore = client.semaphore(options(prefix, 2)).unwrap();
        let (holders, most) = (holders.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let guard = semaphore.acquire().await.unwrap();
            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(now <= 2, "contender {i}: {now} holders at once, limit 2");
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
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
    assert_eq!(done, [0, 1, 2, 3], "every contender held a slot");
    assert!(most.load(Ordering::SeqCst) >= 1);
    // Everyone left: no holder, no contender key.
    assert!(wire.state(prefix).await.unwrap().holders.is_empty());
    let keys: Vec<String> = wire.list(prefix).await.into_iter().map(|p| p.key).collect();
    assert_eq!(keys, [format!("{prefix}/.lock")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limit() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/bad-limit";
    // A limit must be positive.
    assert!(matches!(
        client.semaphore_prefix(prefix, 0),
        Err(Error::Options(OptionsError::Limit))
    ));

    let semaphore = client.semaphore(options(prefix, 1)).unwrap();
    let guard = semaphore.acquire().await.unwrap();
    let other = client.semaphore(options(prefix, 2)).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), other.acquire())
        .await
        .unwrap();
    match result {
        Err(Error::Lock(e @ LockError::LimitMismatch { ours: 2, theirs: 1 })) => {
            // Go's words.
            assert_eq!(e.to_string(), "semaphore limit conflict (lock: 1, local: 2)");
        }
        other => panic!("{other:?}"),
    }
    // The failed contender leaves nothing behind: only the holder's key and the .lock remain.
    let mine = format!("{prefix}/{}", guard.token().session);
    let lock = format!("{prefix}/.lock");
    eventually("the failed contender's key goes", || async {
        let mut keys: Vec<String> = wire.list(prefix).await.into_iter().map(|p| p.key).collect();
        keys.sort();
        let mut want = vec![lock.clone(), mine.clone()];
        want.sort();
        keys == want
    })
    .await;
    assert_eq!(wire.state(prefix).await.unwrap().limit, 1);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/destroy";
    let semaphore = client.semaphore(options(prefix, 2)).unwrap();
    let other = client.semaphore(options(prefix, 2)).unwrap();

    let guard = semaphore.acquire().await.unwrap();
    let other_guard = other.acquire().await.unwrap();
    // Held by this handle: an error (Go: ErrSemaphoreHeld).
    assert!(matches!(
        semaphore.destroy().await,
        Err(Error::Misuse(Misuse::AlreadyHeld))
    ));
    guard.release().await.unwrap();
    // Still held by the other: in use (Go: ErrSemaphoreInUse).
    assert!(matches!(
        semaphore.destroy().await,
        Err(Error::Lock(LockError::SemaphoreInUse))
    ));
    other_guard.release().await.unwrap();
    assert!(wire.get(&format!("{prefix}/.lock")).await.is_some());

    // Free: deleted; twice: still fine.
    semaphore.destroy().await.unwrap();
    assert!(wire.get(&format!("{prefix}/.lock")).await.is_none());
    assert!(wire.list(prefix).await.is_empty());
    semaphore.destroy().await.unwrap();
    other.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();

    // A lock holds <prefix>/.lock: the semaphore on <prefix> sees a lock there.
    let prefix = "tokio/go-semaphore/conflict-lock-first";
    let mut lock_options = LockOptions::new(&format!("{prefix}/.lock")).unwrap();
    lock_options.hold.session_options_mut().unwrap().name = format!("tokio go semaphore {prefix}");
    let lock = client.lock(lock_options).unwrap();
    let held = lock.acquire().await.unwrap();
    let semaphore = client.semaphore(options(prefix, 2)).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), semaphore.acquire())
        .await
        .unwrap();
    assert!(
        matches!(
            result,
            Err(Error::Lock(LockError::SemaphoreConflict {
                flags: LOCK_FLAG_VALUE
            }))
        ),
        "{result:?}"
    );
    assert!(matches!(
        semaphore.destroy().await,
        Err(Error::Lock(LockError::SemaphoreConflict {
            flags: LOCK_FLAG_VALUE
        }))
    ));
    // The semaphore's contender key goes with its session.
    let lock_key = format!("{prefix}/.lock");
    eventually("the failed contender's key goes", || async {
        wire.list(prefix)
            .await
            .into_iter()
            .map(|p| p.key)
            .collect::<Vec<_>>()
            == [lock_key.clone()]
    })
    .await;
    assert_eq!(wire.get(&lock_key).await.unwrap().flags, LOCK_FLAG_VALUE);
    held.release().await.unwrap();
    lock.destroy().await.unwrap();

    // A semaphore holds a slot under <prefix>: the lock on <prefix>/.lock sees a semaphore there.
    let prefix = "tokio/go-semaphore/conflict-semaphore-first";
    let semaphore = client.semaphore(options(prefix, 2)).unwrap();
    let mut slot = semaphore.acquire().await.unwrap();
    let mut lock_options = LockOptions::new(&format!("{prefix}/.lock")).unwrap();
    lock_options.hold.session_options_mut().unwrap().name = format!("tokio go semaphore {prefix}");
    let lock = client.lock(lock_options).unwrap();
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
    assert!(matches!(
        lock.destroy().await,
        Err(Error::Lock(LockError::Conflict {
            flags: SEMAPHORE_FLAG_VALUE
        }))
    ));
    // The lock touched nothing: the slot is still held.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slot.lost())
            .await
            .is_err()
    );
    assert!(slot.is_held());
    slot.release().await.unwrap();
    semaphore.destroy().await.unwrap();
}

/// Not one of Go's (it can't cancel, consul#2992): dropping the acquire future of a waiting
/// contender cancels it at once, and its contender key and session go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_leaves_nothing_behind() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/cancel";
    let holder = client.semaphore(options(prefix, 1)).unwrap();
    let guard = holder.acquire().await.unwrap();
    let waiter = client.semaphore(options(prefix, 1)).unwrap();
    let cancelled = tokio::time::timeout(Duration::from_millis(500), waiter.acquire()).await;
    assert!(cancelled.is_err(), "the slot is taken: {cancelled:?}");
    let mine = format!("{prefix}/{}", guard.token().session);
    let lock = format!("{prefix}/.lock");
    eventually("the cancelled contender's key goes", || async {
        let mut keys: Vec<String> = wire.list(prefix).await.into_iter().map(|p| p.key).collect();
        keys.sort();
        keys == [lock.clone(), mine.clone()]
    })
    .await;
    let state = wire.state(prefix).await.unwrap();
    assert_eq!(
        state.holders.keys().collect::<Vec<_>>(),
        [guard.token().session.as_str()]
    );
    guard.release().await.unwrap();
    // The cancelled handle works again.
    let guard = tokio::time::timeout(Duration::from_secs(10), waiter.acquire())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
}

/// The monitor's reads: consistent GETs listing the prefix. Renewals (PUTs) and everything else
/// pass.
fn monitor_read(prefix: &'static str) -> impl Fn(&RequestHead) -> bool + Send + Sync + 'static {
    move |head: &RequestHead| {
        head.method == "GET"
            && head.path() == format!("/v1/kv/{prefix}")
            && head.has_param("recurse")
            && head.has_param("consistent")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_retry() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let prefix = "tokio/go-semaphore/monitor-retry";
    let mut opts = options(prefix, 2);
    opts.hold.monitor_retries = Some(3);
    opts.hold.monitor_retry_time = Duration::from_millis(100);
    let semaphore = client.semaphore(opts).unwrap();
    let mut guard = semaphore.acquire().await.unwrap();
    let session = guard.token().session.clone();
    // Let the monitor's first blocking read go out before arming anything.
    let blocking_monitor_reads = || {
        proxy.count(|s| {
            monitor_read(prefix)(&s.head) && s.head.has_param("index") && s.outcome == Outcome::Forwarded
        })
    };
    while blocking_monitor_reads() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Write a plain key under the prefix so that the monitor's blocking list returns and it lists
    // again, into the faults. The value differs each time: Consul skips writes that change
    // nothing, without moving the index.
    let (wire, session) = (&wire, &session);
    let poke = |n: u32| async move {
        let write = consul_lock_core::api::KvCasPut {
            key: Key::new(format!("{prefix}/poke")).unwrap(),
            cas: wire
                .get(&format!("{prefix}/poke"))
                .await
                .map_or(0, |p| p.modify_index),
            flags: 0,
            value: format!("poke {n}").into_bytes(),
        };
        assert!(wire.call(write).await.unwrap());
        let contender = wire.get(&format!("{prefix}/{session}")).await.unwrap();
        assert_eq!(contender.session.as_ref(), Some(session));
    };

    // Two failures: within the three retries allowed; the slot survives.
    proxy.fail_requests(monitor_read(prefix), 2);
    poke(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(proxy.armed_faults(), 0, "both faults were hit");
    assert!(guard.is_held());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), guard.lost())
            .await
            .is_err()
    );

    // Ten: more than the retries allow; the slot is lost.
    proxy.fail_requests(monitor_read(prefix), 10);
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
    assert_eq!(proxy.count(|s| s.outcome == Outcome::Injected), 6);
    assert_eq!(
        proxy.count(|s| s.outcome == Outcome::Injected && s.head.path().starts_with("/v1/session/")),
        0
    );
    guard.release().await.unwrap();
    // A lost slot leaves nothing behind: our session and contender key are gone.
    eventually("the lost slot's session goes", || async {
        !wire.session_exists(session).await
    })
    .await;
    assert!(wire.get(&format!("{prefix}/{session}")).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "tokio/go-semaphore/one-shot";
    let first = client.semaphore(options(prefix, 2)).unwrap();
    let second = client.semaphore(options(prefix, 2)).unwrap();
    let held = first.acquire().await.unwrap();
    let _also_held = second.acquire().await.unwrap();

    let wait = Duration::from_secs(1);
    let mut opts = options(prefix, 2);
    opts.hold.try_once = true;
    opts.hold.wait_time = wait;
    let contender = client.semaphore(opts).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), contender.acquire())
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(matches!(result, Err(Error::GaveUp)), "{result:?}");
    assert!(waited >= wait && waited < 2 * wait, "gave up after {waited:?}");

    held.release().await.unwrap();
    let started = Instant::now();
    let won = tokio::time::timeout(Duration::from_secs(10), contender.acquire())
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < wait, "{:?}", started.elapsed());
    won.release().await.unwrap();
}

/// The hold window's premise, on a real agent: a semaphore's session has no health checks (only
/// its TTL ends it, so nothing takes a slot before the renew deadline), while a lock's has
/// Consul's default, `serfHealth` (and so is trusted for its lock-delay when that is shorter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphores_session_has_no_health_checks_and_a_locks_has_serf_health() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let checks = |id: SessionId| {
        let wire = &wire;
        async move {
            wire.call(SessionInfo::new(id))
                .await
                .unwrap()
                .value
                .unwrap()
                .checks
        }
    };

    let semaphore = client
        .semaphore(options("tokio/go-semaphore/session-checks", 2))
        .unwrap();
    let slot = semaphore.acquire().await.unwrap();
    assert_eq!(checks(slot.token().session.clone()).await, Vec::<String>::new());
    slot.release().await.unwrap();

    let lock = client.lock_key("tokio/go-semaphore/session-checks-lock").unwrap();
    let held = lock.acquire().await.unwrap();
    assert_eq!(checks(held.token().session.clone()).await, ["serfHealth"]);
    held.release().await.unwrap();
    client.shutdown(Duration::from_secs(5)).await.unwrap();
}
