//! The Go client's own semaphore tests (`api/semaphore_test.go`), a shorter set ported to the
//! blocking driver and run against a real agent: AcquireRelease, Contend and BadLimit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use consul_lock_blocking::{Client, Error, LockError, Misuse, SemaphoreOptions};
use consul_lock_core::api::{
    ApiError, ClientConfig, Endpoint, Key, KvGet, KvList, KvPair, SessionId, SessionInfo,
};
use consul_lock_core::machine::{OptionsError, SEMAPHORE_FLAG_VALUE, SemaphoreState};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;

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

    /// The keys under `prefix/`, sorted.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let list = KvList::new(Key::new(format!("{prefix}/")).unwrap());
        let mut keys: Vec<String> = self
            .call(&list)
            .unwrap()
            .value
            .into_iter()
            .map(|p| p.key)
            .collect();
        keys.sort();
        keys
    }

    /// The semaphore's `.lock`, decoded.
    fn state(&self, prefix: &str) -> Option<SemaphoreState> {
        let pair = self.get(&format!("{prefix}/.lock"))?;
        assert_eq!(pair.flags, SEMAPHORE_FLAG_VALUE);
        Some(SemaphoreState::decode(&pair.value, 0).unwrap())
    }

    fn session_exists(&self, id: &SessionId) -> bool {
        self.call(&SessionInfo::new(id.clone())).unwrap().value.is_some()
    }
}

/// Options for a semaphore under `prefix` with a name for the session, so that leftovers can be
/// told apart.
fn options(prefix: &str, limit: u32) -> SemaphoreOptions {
    let mut options = SemaphoreOptions::new(prefix, limit).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("blocking go semaphore {prefix}");
    }
    options
}

#[test]
fn acquire_release() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "blocking/go-semaphore/acquire-release";
    let mut opts = options(prefix, 2);
    opts.hold.value = b"held".to_vec();
    let semaphore = client.semaphore(opts).unwrap();

    let guard = semaphore.acquire().unwrap();
    assert!(guard.is_held());
    let session = guard.token().session.clone();
    assert_eq!(guard.token().key.as_str(), format!("{prefix}/.lock"));
    assert_eq!(guard.wait_lost(Duration::from_millis(100)).unwrap(), None);
    // Acquiring again while held is an error (Go: ErrSemaphoreHeld).
    assert!(matches!(
        semaphore.acquire(),
        Err(Error::Misuse(Misuse::AlreadyHeld))
    ));
    let contender = wire.get(&format!("{prefix}/{session}")).unwrap();
    assert_eq!(contender.session.as_ref(), Some(&session));
    assert_eq!(
        (contender.flags, contender.value.as_slice()),
        (SEMAPHORE_FLAG_VALUE, &b"held"[..])
    );
    let state = wire.state(prefix).unwrap();
    assert_eq!(state.limit, 2);
    assert_eq!(state.holders.keys().collect::<Vec<_>>(), [session.as_str()]);

    guard.release().unwrap();
    assert!(wire.state(prefix).unwrap().holders.is_empty());
    assert!(wire.get(&format!("{prefix}/{session}")).is_none());
    assert!(!wire.session_exists(&session));

    // Usable again, with a new session.
    let guard = semaphore.acquire().unwrap();
    assert_ne!(guard.token().session, session);
    guard.release().unwrap();
    semaphore.destroy().unwrap();
    assert!(wire.keys(prefix).is_empty());
}

#[test]
fn contend() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "blocking/go-semaphore/contend";
    let holders = Arc::new(AtomicU32::new(0));
    let mut threads = Vec::new();
    for i in 0..4 {
        let semaphore = client.semaphore(options(prefix, 2)).unwrap();
        let holders = holders.clone();
        threads.push(std::thread::spawn(move || {
            let guard = semaphore
                .acquire_with(Some(Duration::from_secs(30)), None)
                .unwrap();
            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(now <= 2, "contender {i}: {now} holders at once, limit 2");
            assert_eq!(guard.wait_lost(Duration::from_millis(300)).unwrap(), None);
            holders.fetch_sub(1, Ordering::SeqCst);
            guard.release().unwrap();
            i
        }));
    }
    let mut done: Vec<i32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2, 3], "every contender held a slot");
    assert!(wire.state(prefix).unwrap().holders.is_empty());
    assert_eq!(wire.keys(prefix), [format!("{prefix}/.lock")]);
}

#[test]
fn bad_limit() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let prefix = "blocking/go-semaphore/bad-limit";
    assert!(matches!(
        client.semaphore_prefix(prefix, 0),
        Err(Error::Options(OptionsError::Limit))
    ));

    let semaphore = client.semaphore(options(prefix, 1)).unwrap();
    let guard = semaphore.acquire().unwrap();
    let other = client.semaphore(options(prefix, 2)).unwrap();
    match other.acquire_with(Some(Duration::from_secs(10)), None) {
        Err(Error::Lock(e @ LockError::LimitMismatch { ours: 2, theirs: 1 })) => {
            assert_eq!(e.to_string(), "semaphore limit conflict (lock: 1, local: 2)");
        }
        other => panic!("{other:?}"),
    }
    // The failed contender leaves nothing behind.
    let mut want = vec![
        format!("{prefix}/.lock"),
        format!("{prefix}/{}", guard.token().session),
    ];
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while wire.keys(prefix) != want {
        assert!(Instant::now() < deadline, "{:?}", wire.keys(prefix));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(wire.state(prefix).unwrap().limit, 1);
    guard.release().unwrap();
}
