//! Smoke test of the blocking driver against a real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::{Duration, Instant};

use consul_lock_blocking::{Client, Error, HoldEnd, Lock};
use consul_lock_testkit::agent::require_agent;

#[test]
fn acquire_handoff_stop_and_release() {
    let Some(agent) = require_agent() else { return };
    let client = Client::new(agent.config().unwrap()).unwrap();
    let a = client.lock_key("blocking/smoke/.lock").unwrap();
    let b = client.lock_key("blocking/smoke/.lock").unwrap();
    let guard = a.acquire().unwrap();
    assert!(guard.is_held());
    assert_eq!(guard.wait_lost(Duration::from_millis(100)).unwrap(), None);
    // A watch outlives its guard, and its wait ends with the hold (here, a release).
    let mut released_watch = guard.watch();
    assert!(released_watch.is_held());

    // A waiter stopped from another thread returns at once.
    let stop = Lock::stop_handle();
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stop.stop();
            Instant::now()
        })
    };
    let result = b.acquire_with(None, Some(&stop));
    let returned = Instant::now();
    let stopped = stopper.join().unwrap();
    assert!(matches!(result, Err(Error::Cancelled)));
    assert!(returned.duration_since(stopped) < Duration::from_millis(50));

    // A timeout gives up.
    assert!(matches!(
        b.acquire_with(Some(Duration::from_millis(200)), None),
        Err(Error::GaveUp)
    ));

    let first = guard.token().clone();
    let waiter = std::thread::spawn(move || b.acquire().map(|g| (g, b)));
    std::thread::sleep(Duration::from_millis(200));
    guard.release().unwrap();
    assert_eq!(
        released_watch.wait(Some(Duration::from_secs(5))).unwrap(),
        Some(HoldEnd::Released)
    );
    assert!(!released_watch.is_held());
    let (g2, _b) = waiter.join().unwrap().unwrap();
    assert!(g2.token().lock_index > first.lock_index);
    drop(g2);
    let g3 = a.acquire().unwrap();
    g3.release().unwrap();
}
