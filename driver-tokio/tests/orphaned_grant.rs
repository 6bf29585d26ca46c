//! A grant that reaches the acquire future's channel, whose future is then dropped without being
//! polled again (a biased `select!` whose other branch was ready, a timeout that fired in the same
//! poll): nobody holds a guard, so the driver must release what it acquired, and the handle must
//! be able to acquire again. Real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use common::Wire;
use consul_lock_core::api::{Key, KvList, SessionId, SessionInfo};
use consul_lock_testkit::agent::require_agent;
use consul_lock_tokio::{Client, Error, Lock, LockGuard, Misuse, Semaphore};
use tokio::sync::Notify;

/// A waker that tells the test when the acquire future's channel got its answer: the only thing
/// the future waits on after its first poll is that channel.
struct Woken(Notify);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
}

/// Polls `lock.acquire()` once by hand, waits until its answer is in the channel, then drops the
/// future without polling it again: the grant is orphaned. Before the drop, `holder` reads the
/// agent: the session the grant holds (the key or slot is held there once the grant was sent).
/// A lock or a semaphore: what these tests acquire on.
trait Acquire {
    fn acquire_boxed(&self) -> Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send + '_>>;
}

impl Acquire for Lock {
    fn acquire_boxed(&self) -> Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send + '_>> {
        Box::pin(self.acquire())
    }
}

impl Acquire for Semaphore {
    fn acquire_boxed(&self) -> Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send + '_>> {
        Box::pin(self.acquire())
    }
}

async fn orphan_a_grant(lock: &impl Acquire, holder: impl AsyncFn() -> SessionId) -> SessionId {
    // On a loaded machine the thread can be preempted between sending the command and looking at
    // the answer, long enough for the whole acquisition: then the first poll already has the
    // guard, and there is nothing to orphan; give it back and try again.
    for _ in 0..20 {
        let woken = Arc::new(Woken(Notify::new()));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut acquire = lock.acquire_boxed();
        if let Poll::Ready(early) = acquire.as_mut().poll(&mut cx) {
            early.expect("a free key").release().await.unwrap();
            continue;
        }
        // Not a timed assertion: a bound on a hang, should the answer never come.
        tokio::time::timeout(Duration::from_secs(30), woken.0.notified())
            .await
            .expect("the acquire's answer within 30 s");
        let session = holder().await;
        drop(acquire);
        return session;
    }
    panic!("the acquisition never stayed pending past its first poll");
}

/// Acquires on `lock`, waiting out `Busy` (the release the driver started is still under way).
async fn acquire_again(lock: &impl Acquire) -> LockGuard {
    for _ in 0..600 {
        match lock.acquire_boxed().await {
            Err(Error::Misuse(Misuse::Busy)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => return other.expect("the handle acquires again after an orphaned grant"),
        }
    }
    panic!("the handle stayed busy for 30 s");
}

/// Waits until `session` is gone from the agent.
async fn wait_session_gone(wire: &Wire, session: &SessionId) {
    for _ in 0..600 {
        let info = wire
            .call(SessionInfo::new(session.clone()))
            .await
            .expect("a session read");
        if info.value.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the orphaned grant's session {session:?} still lives after 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_lock_grant_is_released_and_the_handle_acquires_again() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let wire = Wire::new(config.clone());
    let client = Client::new(config).unwrap();
    let key = "tokio/orphaned-grant/lock/.lock";
    let lock = client.lock_key(key).unwrap();

    let session = orphan_a_grant(&lock, async || {
        wire.get(key)
            .await
            .and_then(|pair| pair.session)
            .expect("the orphaned grant's key is held on the agent")
    })
    .await;

    let guard = acquire_again(&lock).await;
    assert_ne!(
        guard.token().session,
        session,
        "a new acquisition, with a new session"
    );
    wait_session_gone(&wire, &session).await;
    guard.release().await.unwrap();
    assert_eq!(wire.get(key).await.and_then(|pair| pair.session), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_semaphore_grant_is_released_and_the_handle_acquires_again() {
    let Some(agent) = require_agent() else { return };
    let config = agent.config().unwrap();
    let wire = Wire::new(config.clone());
    let client = Client::new(config).unwrap();
    let prefix = "tokio/orphaned-grant/semaphore";
    // One slot: a second handle can only get in if the orphaned slot was given back.
    let semaphore = client.semaphore_prefix(prefix, 1).unwrap();
    let other = client.semaphore_prefix(prefix, 1).unwrap();

    let session = orphan_a_grant(&semaphore, async || {
        let contenders = wire
            .call(KvList::new(Key::new(prefix).unwrap()))
            .await
            .unwrap()
            .value;
        contenders
            .iter()
            .find(|pair| !pair.key.ends_with("/.lock"))
            .and_then(|pair| pair.session.clone())
            .expect("the orphaned slot's contender key, held by its session")
    })
    .await;

    let again = acquire_again(&semaphore).await;
    assert_ne!(
        again.token().session,
        session,
        "a new acquisition, with a new session"
    );
    again.release().await.unwrap();
    wait_session_gone(&wire, &session).await;
    // The one slot is free again for another contender.
    let slot = tokio::time::timeout(Duration::from_secs(30), other.acquire())
        .await
        .expect("the slot is free")
        .unwrap();
    slot.release().await.unwrap();
}
