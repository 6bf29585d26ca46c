//! What the tokio driver offers, the thread driver offers too: `Client::call` and `Lock::close`,
//! on a real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_blocking::{Client, Error};
use consul_lock_core::api::{Key, KvGet};
use consul_lock_testkit::agent::require_agent;

#[test]
fn call_reads_what_a_lock_holds_and_close_ends_the_lock() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = "blocking/parity/close";
    let lock = client.lock_key(key).unwrap();
    let guard = lock.acquire().unwrap();
    let read = |client: &Client| {
        client
            .call(&KvGet::new(Key::new(key).unwrap()), Duration::from_secs(5))
            .unwrap()
            .value
            .expect("the key exists")
    };
    let held = read(&client);
    assert_eq!(
        held.session.as_ref(),
        Some(&guard.token().session),
        "call sees the hold"
    );

    // A guard still alive: close releases its hold and destroys the session before returning.
    lock.close();
    assert_eq!(read(&client).session, None, "released by close");
    assert!(!guard.is_held());
    assert!(
        matches!(lock.acquire(), Err(Error::DriverStopped)),
        "a closed lock takes no more calls"
    );
    drop(guard);
}
