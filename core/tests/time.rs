//! Time never runs backwards inside a machine: a `now` earlier than one already seen is taken as
//! the latest, so `poll_timeout` is never before it and nothing fires twice.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{Action, HoldOptions, LockMachine, LockOptions};

#[test]
fn an_earlier_now_is_taken_as_the_latest() {
    let t0 = Instant::now();
    let mut m = LockMachine::new(ClientConfig::default(), LockOptions::new("k").unwrap()).unwrap();
    m.lock(t0 + Duration::from_secs(2)).unwrap();
    let Some(Action::Send(create)) = m.poll_action() else {
        panic!("a session create")
    };
    // The driver's clock goes back 2 s: the deadline was set from the later time, and the
    // machine's timer is never before the latest `now` it was given.
    assert_eq!(
        create.deadline,
        t0 + Duration::from_secs(2) + HoldOptions::DEFAULT_REQUEST_TIMEOUT
    );
    m.handle_timeout(t0);
    assert!(m.poll_action().is_none(), "an early timeout is a no-op");
    assert!(m.poll_timeout().unwrap() >= t0 + Duration::from_secs(2));
}
