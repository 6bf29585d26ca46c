//! An agent that refuses every connection, seen from threads: each failed try shows through
//! `Lock::retries()`, and the acquisition ends with a typed error once its error budget is spent.
//! Real agent behind the test kit's proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_blocking::{Client, Error, LockError, LockOptions};
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::proxy::{FaultProxy, Mode};

#[test]
fn an_unreachable_agent_is_reported_and_ends_the_acquire_after_the_budget() {
    let Some(agent) = require_agent() else { return };
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    proxy.set_mode(Mode::Refuse);
    let client = Client::new(proxy.config()).unwrap();
    let mut options = LockOptions::new("blocking/retries/unreachable").unwrap();
    options.hold.acquire_error_budget = Some(Duration::from_secs(2));
    let lock = client.lock(options).unwrap();
    let mut retries = lock.retries();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while let Ok(Some(retry)) = retries.wait_next(None) {
            seen.push(retry);
        }
        seen
    });
    match lock.acquire() {
        Err(Error::Lock(LockError::AgentUnavailable { attempts, last, .. })) => {
            assert!(attempts >= 2, "{attempts}");
            assert!(last.contains("session create"), "{last}");
        }
        other => panic!("expected AgentUnavailable, got {other:?}"),
    }
    assert!(
        lock.retries().latest().is_some(),
        "the last failed try is still shown"
    );
    // Ending the client ends the lock's task, and with it the watcher's wait.
    client.shutdown(Duration::from_secs(5)).unwrap();
    drop(lock);
    let seen = watcher.join().unwrap();
    assert!(!seen.is_empty(), "every failure is seen");
    assert!(
        seen.windows(2).all(|w| w[1].attempt == w[0].attempt + 1),
        "in order: {seen:?}"
    );
}
