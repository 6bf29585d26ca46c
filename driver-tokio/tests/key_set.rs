//! Many keys on one session ([`KeySet`]) against a real agent: every key is a lock to Go's
//! `consul lock` (which waits while we hold it and takes it once we release it), keys held by
//! others are refused one by one, an operator's delete loses that key alone, the session's
//! destroy loses them all, and closing leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::Wire;

use std::time::{Duration, Instant};

use consul_lock_core::api::{Key, KvDelete, SessionDestroy};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::golock::{GoLock, PATIENCE, Scratch, at};
use consul_lock_tokio::{Client, Error, KeyLoss, KeySet, KeySetError, KeySetOptions, LossReason, Refusal};

/// How long Go's waiter is watched to show that it keeps waiting.
const STILL_WAITING: Duration = Duration::from_millis(800);

fn base(name: &str) -> String {
    format!("tokio/keyset/{name}/{}", std::process::id())
}

/// `n` lock keys as `consul lock <base>/<i>` names them (`<base>/<i>/.lock`).
fn lock_keys(base: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{base}/{i}/.lock")).collect()
}

fn key_set(client: &Client, name: &str) -> KeySet {
    let mut options = KeySetOptions::new();
    let session = options.hold.session_options_mut().unwrap();
    session.name = format!("tokio keyset {name}");
    // So that a key lost with its session can be taken again at once.
    session.lock_delay = Some(Duration::ZERO);
    // No health checks: with no lock-delay, a session a node check could end holds nothing.
    session.checks = Some(Vec::new());
    client.key_set_with(options).unwrap()
}

async fn next_loss(set: &KeySet) -> KeyLoss {
    tokio::time::timeout(PATIENCE, set.next_loss())
        .await
        .expect("a loss reported")
        .expect("the set is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_a_lock_go_waits_for_until_we_release_it() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let set = key_set(&client, "go");
    let base = base("go");
    let keys = lock_keys(&base, 200);
    let got = set.acquire(&keys).await.unwrap();
    assert!(got.refused.is_empty(), "{:?}", got.refused);
    assert_eq!(got.held.len(), 200);
    let session = got.held[0].session.clone();
    for (token, key) in got.held.iter().zip(&keys) {
        assert_eq!(token.key.as_str(), key);
        let pair = wire.get(key).await.unwrap();
        assert_eq!(
            pair.session.as_ref(),
            Some(&session),
            "{key}: one session holds every key"
        );
        assert_eq!(pair.flags, LOCK_FLAG_VALUE, "{key}: Go's lock flags");
        assert_eq!(
            (pair.lock_index, pair.modify_index),
            (token.lock_index, token.modify_index)
        );
    }

    // Go's `consul lock` on one of our keys waits while we hold it...
    let scratch = Scratch::new("tokio-keyset-go");
    let mut go = GoLock::spawn(agent, &scratch, &format!("{base}/7"), "go", false);
    go.wait_attempting();
    tokio::time::sleep(STILL_WAITING).await;
    assert!(
        at(&scratch.log(), "go", "start").is_none(),
        "Go ran its child while we held the key\n{}",
        go.output()
    );
    assert!(go.running(), "{}", go.output());
    // ... and takes it once we release that key alone.
    set.release(&[&keys[7]]).await.unwrap();
    go.finish();
    assert_eq!(set.held().await.unwrap().len(), 199);
    let pair = wire.get(&keys[8]).await.unwrap();
    assert_eq!(
        pair.session.as_ref(),
        Some(&session),
        "the other keys are still ours"
    );

    set.close().await;
    for key in &keys {
        let pair = wire.get(key).await;
        assert!(pair.is_none_or(|p| p.session.is_none()), "{key} left held");
    }
    assert!(matches!(
        set.acquire(&[&keys[0]]).await,
        Err(Error::DriverStopped)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_go_holds_is_refused_and_the_others_are_taken() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let set = key_set(&client, "partial");
    let base = base("partial");
    let keys = lock_keys(&base, 100);
    let scratch = Scratch::new("tokio-keyset-partial");
    let go = GoLock::spawn(agent, &scratch, &format!("{base}/42"), "go", true);
    let deadline = Instant::now() + PATIENCE;
    while at(&scratch.log(), "go", "start").is_none() {
        assert!(Instant::now() < deadline, "Go never held\n{}", go.output());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = set.acquire(&keys).await.unwrap();
    assert_eq!(got.held.len(), 99);
    assert_eq!(
        got.refused,
        [(Key::new(keys[42].as_str()).unwrap(), Refusal::Held)]
    );
    go.release();
    set.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_delete_loses_one_key_and_the_sessions_destroy_all() {
    let Some(agent) = require_agent() else { return };
    let wire = Wire::new(agent.config().unwrap());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let set = key_set(&client, "loss");
    let keys = lock_keys(&base("loss"), 300);
    let got = set.acquire(&keys).await.unwrap();
    assert_eq!(got.held.len(), 300);

    wire.call(KvDelete {
        key: Key::new(keys[3].as_str()).unwrap(),
    })
    .await
    .unwrap();
    let loss = next_loss(&set).await;
    assert_eq!(
        (loss.key.as_str(), loss.reason),
        (keys[3].as_str(), LossReason::KeyDeleted)
    );
    assert_eq!(set.held().await.unwrap().len(), 299);

    wire.call(SessionDestroy {
        id: got.held[0].session.clone(),
    })
    .await
    .unwrap();
    let mut lost = Vec::new();
    for _ in 0..299 {
        let loss = next_loss(&set).await;
        assert_eq!(loss.reason, LossReason::SessionInvalidated);
        lost.push(loss.key.as_str().to_owned());
    }
    lost.sort();
    let mut expected: Vec<String> = keys.iter().filter(|k| **k != keys[3]).cloned().collect();
    expected.sort();
    assert_eq!(lost, expected);
    assert!(set.held().await.unwrap().is_empty());

    // The set goes on, on a new session.
    let again = set.acquire(&keys[..5]).await.unwrap();
    assert_eq!(again.held.len(), 5);
    assert_ne!(again.held[0].session, got.held[0].session);
    // `Client::shutdown` closes it: the keys are given back and the task ends in time.
    client.shutdown(Duration::from_secs(10)).await.unwrap();
    for key in &keys[..5] {
        assert!(
            wire.get(key).await.is_none_or(|p| p.session.is_none()),
            "{key} left held"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_is_sent() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let set = key_set(&client, "input");
    let before = client.requests_sent();
    assert!(matches!(
        set.acquire(&["a", "a"]).await,
        Err(Error::KeySet(KeySetError::Duplicate(_)))
    ));
    assert!(matches!(
        set.acquire(&["ok", "a//b"]).await,
        Err(Error::KeySet(KeySetError::Key { .. }))
    ));
    assert!(matches!(
        set.release(&["never/held"]).await,
        Err(Error::KeySet(KeySetError::NotHeld(_)))
    ));
    assert_eq!(client.requests_sent(), before, "nothing was sent");
    set.close().await;
}
