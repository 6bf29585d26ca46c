//! Queued waiting (`Waiting::Queue`) through the tokio driver, against a real agent: waiters
//! take the lock in the order they lined up, and a waiter that gives up (its acquire future
//! dropped) leaves the line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::Wire;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consul_lock_core::machine::Waiting;
use consul_lock_testkit::agent::require_agent;
use consul_lock_tokio::{Client, LockGuard, LockOptions};

const PATIENCE: Duration = Duration::from_secs(30);

fn options(key: &str, name: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    options.waiting = Waiting::Queue;
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("tokio queue {name}");
    }
    options
}

/// Waits until the line under `key` has `n` live entries.
async fn line_of(wire: &Wire, key: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entries = wire.entries_under(&format!("{key}/.queue/")).await.unwrap();
        if entries.iter().filter(|p| p.session.is_some()).count() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the line never had {n} entries: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The line under `key` is empty: every waiter left it, none left an entry behind.
async fn no_line(wire: &Wire, key: &str) {
    line_of(wire, key, 0).await;
    let left = wire.entries_under(&format!("{key}/.queue/")).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// A key for `test`, held by a first queued lock: the wire, the client, the key and the hold.
async fn held(test: &str) -> Option<(Wire, Client, String, LockGuard)> {
    let agent = require_agent()?;
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let key = format!("tokio/queue/{test}/{}", std::process::id());
    let first = client.lock(options(&key, "first")).unwrap();
    let held = first.acquire().await.unwrap();
    Some((wire, client, key, held))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_take_the_lock_in_the_order_they_lined_up() {
    let Some((wire, client, key, held)) = held("fifo").await else {
        return;
    };
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..4 {
        let lock = client.lock(options(&key, &format!("w{i}"))).unwrap();
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let guard = lock.acquire().await.unwrap();
            order.lock().unwrap().push(i);
            guard.release().await.unwrap();
        }));
        line_of(&wire, &key, i + 1).await;
    }
    held.release().await.unwrap();
    for w in waiters {
        tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    no_line(&wire, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_leaves_the_line_and_the_next_goes_on() {
    let Some((wire, client, key, held)) = held("give-up").await else {
        return;
    };
    let quitter = client.lock(options(&key, "quitter")).unwrap();
    let quitting = tokio::spawn(async move { quitter.acquire().await.map(|_| ()) });
    line_of(&wire, &key, 1).await;
    let patient = client.lock(options(&key, "patient")).unwrap();
    let waiting = tokio::spawn(async move {
        let guard = patient.acquire().await.unwrap();
        guard.release().await.unwrap();
    });
    line_of(&wire, &key, 2).await;
    // The first in line gives up: its entry goes, and the one behind it is next.
    quitting.abort();
    line_of(&wire, &key, 1).await;
    held.release().await.unwrap();
    tokio::time::timeout(PATIENCE, waiting).await.unwrap().unwrap();
    no_line(&wire, &key).await;
}
