//! The Go client's own lock tests (`api/lock_test.go`), ported to the blocking driver and run
//! against a real agent: LockUnlock, ForceInvalidate, DeleteKey, Contend, Destroy, Conflict,
//! ReclaimLock, MonitorRetry (through the fault proxy) and OneShot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consul_lock_blocking::{Client, Error, HoldEnd, LockError, LockOptions, LossReason, Misuse};
use consul_lock_core::api::{
    ApiError, ClientConfig, Endpoint, Key, KvCasDelete, KvCasPut, KvGet, KvPair, SessionCreate,
    SessionDestroy,
};
use consul_lock_core::machine::{LOCK_FLAG_VALUE, SEMAPHORE_FLAG_VALUE, SessionChoice};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Outcome, RequestHead};

/// The agent's HTTP API.
struct Wire {
    config: ClientConfig,
    http: TestTransport,
}

impl Wire {
    fn new(config: ClientConfig) -> Wire {
        Wire {
            config,
            http: TestTransport::new().unwrap(),
        }
    }

    fn call<E: Endpoint>(&self, endpoint: &E) -> Result<E::Output, ApiError> {
        self.http.call(&self.config, endpoint).expect("the agent answers")
    }

    fn get(&self, key: &str) -> Option<KvPair> {
        self.call(&KvGet::new(Key::new(key).unwrap())).unwrap().value
    }
}

/// Options for `key` with a name for the session, so that leftovers can be told apart.
fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("blocking go {key}");
    }
    options
}

#[test]
fn lock_unlock() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/lock-unlock/.lock";
    let mut opts = options(key);
    opts.hold.value = b"held".to_vec();
    let lock = client.lock(opts).unwrap();

    let guard = lock.acquire().unwrap();
    assert!(guard.is_held());
    assert_eq!(guard.token().key.as_str(), key);
    assert!(guard.token().lock_index > 0);
    assert_eq!(guard.wait_lost(Duration::from_millis(100)).unwrap(), None);
    // Acquiring again while held is an error (Go: ErrLockHeld).
    assert!(matches!(lock.acquire(), Err(Error::Misuse(Misuse::AlreadyHeld))));
    let pair = wire.get(key).unwrap();
    assert_eq!(pair.session.as_ref(), Some(&guard.token().session));
    assert_eq!(
        (pair.flags, pair.lock_index),
        (LOCK_FLAG_VALUE, guard.token().lock_index)
    );
    assert_eq!(pair.value, b"held");

    let first = guard.token().clone();
    guard.release().unwrap();
    assert_eq!(wire.get(key).unwrap().session, None, "released");

    // Usable again; a new session, so a new fencing token.
    let guard = lock.acquire().unwrap();
    assert!(guard.token().lock_index > first.lock_index);
    assert_ne!(guard.token().session, first.session);
    guard.release().unwrap();
}

#[test]
fn force_invalidate() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/force-invalidate/.lock";
    let mut opts = options(key);
    // So that taking it again after the loss need not wait out the default 15 s lock-delay.
    let session = opts.hold.session_options_mut().unwrap();
    session.lock_delay = Some(Duration::ZERO);
    session.checks = Some(Vec::new());
    let lock = client.lock(opts).unwrap();
    let guard = lock.acquire().unwrap();
    // A watch on another thread sees the same loss.
    let mut watch = guard.watch();
    assert_eq!(watch.wait(Some(Duration::from_millis(50))).unwrap(), None);
    let watcher = std::thread::spawn(move || watch.wait(None));

    let destroyed_at = Instant::now();
    assert!(
        wire.call(&SessionDestroy {
            id: guard.token().session.clone()
        })
        .unwrap()
    );
    let reason = guard.wait_lost(Duration::from_secs(5)).unwrap().expect("lost");
    assert_eq!(
        watcher.join().unwrap().unwrap(),
        Some(HoldEnd::Lost(reason.clone()))
    );
    let noticed = destroyed_at.elapsed();
    assert!(
        matches!(reason, LossReason::SessionInvalidated | LossReason::NotHeld),
        "{reason:?}"
    );
    assert!(!guard.is_held());
    assert!(noticed < Duration::from_secs(2), "{noticed:?}");

    // The lock is usable after a loss (Go's #4935, #4902).
    drop(guard);
    let guard = lock.acquire_with(Some(Duration::from_secs(10)), None).unwrap();
    guard.release().unwrap();
}

#[test]
fn delete_key() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/delete-key/.lock";
    let lock = client.lock(options(key)).unwrap();
    let guard = lock.acquire().unwrap();

    let pair = wire.get(key).unwrap();
    let delete = KvCasDelete {
        key: Key::new(key).unwrap(),
        cas: pair.modify_index,
    };
    assert!(wire.call(&delete).unwrap());
    // The loss arrives on the channel too.
    let reason = guard.lost().recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(reason, LossReason::KeyDeleted);
    assert!(!guard.is_held());
    // Releasing a lost lock is fine: nothing left to release.
    guard.release().unwrap();
}

#[test]
fn contend() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/contend/.lock";
    let holders = Arc::new(AtomicU32::new(0));
    let last_token = Arc::new(Mutex::new(0u64));
    let mut threads = Vec::new();
    for i in 0..3 {
        let lock = client.lock(options(key)).unwrap();
        let (holders, last_token) = (holders.clone(), last_token.clone());
        threads.push(std::thread::spawn(move || {
            let guard = lock.acquire_with(Some(Duration::from_secs(30)), None).unwrap();
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
            assert_eq!(guard.wait_lost(Duration::from_millis(200)).unwrap(), None);
            holders.fetch_sub(1, Ordering::SeqCst);
            guard.release().unwrap();
            i
        }));
    }
    let mut done: Vec<i32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2], "every contender held the lock");
}

#[test]
fn destroy() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/destroy/.lock";
    let lock = client.lock(options(key)).unwrap();
    let other = client.lock(options(key)).unwrap();

    let guard = lock.acquire().unwrap();
    // Held by this lock: an error (Go: ErrLockHeld).
    assert!(matches!(lock.destroy(), Err(Error::Misuse(Misuse::AlreadyHeld))));
    // Held by another: in use.
    assert!(matches!(other.destroy(), Err(Error::Lock(LockError::InUse))));
    guard.release().unwrap();
    assert!(wire.get(key).is_some());

    // Free: deleted; twice: still fine.
    lock.destroy().unwrap();
    assert!(wire.get(key).is_none());
    lock.destroy().unwrap();
    other.destroy().unwrap();
}

#[test]
fn conflict() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/conflict/.lock";
    let semaphore_key = KvCasPut {
        key: Key::new(key).unwrap(),
        cas: 0,
        flags: SEMAPHORE_FLAG_VALUE,
        value: b"{\"Limit\":2,\"Holders\":{}}".to_vec(),
    };
    assert!(wire.call(&semaphore_key).unwrap());
    let lock = client.lock(options(key)).unwrap();
    let result = lock.acquire_with(Some(Duration::from_secs(10)), None);
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
        lock.destroy(),
        Err(Error::Lock(LockError::Conflict {
            flags: SEMAPHORE_FLAG_VALUE
        }))
    ));
    assert_eq!(wire.get(key).unwrap().flags, SEMAPHORE_FLAG_VALUE);
}

#[test]
fn reclaim_lock() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/reclaim/.lock";
    // A session of the caller's, without a TTL: nobody needs to renew it.
    let session = wire
        .call(&SessionCreate {
            name: Some("blocking go reclaim".into()),
            ..SessionCreate::default()
        })
        .unwrap();
    let with_session = || {
        let mut opts = LockOptions::new(key).unwrap();
        opts.hold.session = SessionChoice::Existing(session.clone());
        opts
    };
    let first = client.lock(with_session()).unwrap();
    let held = first.acquire().unwrap();
    assert_eq!(held.token().session, session);

    // A second lock on the same session takes the key over: same holder, same LockIndex.
    let second = client.lock(with_session()).unwrap();
    let reclaimed = second.acquire_with(Some(Duration::from_secs(10)), None).unwrap();
    assert_eq!(reclaimed.token(), held.token());
    assert_eq!(held.wait_lost(Duration::from_millis(300)).unwrap(), None);
    assert!(reclaimed.is_held());

    // Releasing one releases the key for both: the other learns it is no longer held.
    reclaimed.release().unwrap();
    let reason = held.wait_lost(Duration::from_secs(5)).unwrap().expect("lost");
    assert_eq!(reason, LossReason::NotHeld);
    drop(held);
    // The caller's session is left alone.
    assert!(wire.call(&SessionDestroy { id: session }).unwrap());
}

/// The monitor's reads: consistent GETs of the key. Renewals (PUTs) and everything else pass.
fn monitor_read(key: &'static str) -> impl Fn(&RequestHead) -> bool + Send + Sync + 'static {
    move |head: &RequestHead| {
        head.method == "GET" && head.path() == format!("/v1/kv/{key}") && head.has_param("consistent")
    }
}

#[test]
fn monitor_retry() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let client = Client::new(proxy.config()).unwrap();
    let key = "blocking/go/monitor-retry/.lock";
    let mut opts = options(key);
    opts.hold.monitor_retries = Some(3);
    opts.hold.monitor_retry_time = Duration::from_millis(100);
    let lock = client.lock(opts).unwrap();
    let guard = lock.acquire().unwrap();
    let session = guard.token().session.clone();
    // Let the monitor's first blocking read go out before arming anything.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.count(|s| monitor_read(key)(&s.head) && s.head.has_param("index")) == 0 {
        assert!(Instant::now() < deadline, "no monitor read");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Poke the key (a plain write keeps the holder) so that the monitor's blocking read returns
    // and it reads again, into the faults. The value differs each time: Consul skips writes that
    // change nothing, without moving the index.
    let poke = |n: u32| {
        let pair = wire.get(key).unwrap();
        let write = KvCasPut {
            key: Key::new(key).unwrap(),
            cas: pair.modify_index,
            flags: LOCK_FLAG_VALUE,
            value: format!("poke {n}").into_bytes(),
        };
        assert!(wire.call(&write).unwrap());
        assert_eq!(wire.get(key).unwrap().session.as_ref(), Some(&session));
    };

    // Two failures: within the three retries allowed; the lock survives.
    proxy.fail_requests(monitor_read(key), 2);
    poke(1);
    assert_eq!(guard.wait_lost(Duration::from_millis(1000)).unwrap(), None);
    assert_eq!(proxy.armed_faults(), 0, "both faults were hit");
    assert!(guard.is_held());

    // Ten: more than the retries allow; the lock is lost.
    proxy.fail_requests(monitor_read(key), 10);
    poke(2);
    let reason = guard.wait_lost(Duration::from_secs(3)).unwrap().expect("lost");
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
    guard.release().unwrap();
}

#[test]
fn one_shot() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/go/one-shot/.lock";
    let holder = client.lock(options(key)).unwrap();
    let guard = holder.acquire().unwrap();

    let wait = Duration::from_secs(1);
    let mut opts = options(key);
    opts.hold.try_once = true;
    opts.hold.wait_time = wait;
    let contender = client.lock(opts).unwrap();
    let started = Instant::now();
    let result = contender.acquire();
    let waited = started.elapsed();
    assert!(matches!(result, Err(Error::GaveUp)), "{result:?}");
    assert!(waited >= wait && waited < 2 * wait, "gave up after {waited:?}");

    guard.release().unwrap();
    let started = Instant::now();
    let won = contender.acquire().unwrap();
    assert!(started.elapsed() < wait, "{:?}", started.elapsed());
    won.release().unwrap();
}
