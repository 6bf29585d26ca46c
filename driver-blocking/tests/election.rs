//! Leader election with the blocking driver on a real agent: the observer (an iterator) sees a
//! campaign, a proclaim, a resign, Go's `consul lock` leading, and a crash, in order; `leader()`
//! answers at each step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_blocking::{Client, LockOptions, LossReason, ObserveEvent, Observer};
use consul_lock_core::api::SessionDestroy;
use consul_lock_testkit::agent::require_agent;
use consul_lock_testkit::golock::{GoLock, PATIENCE, Scratch};

fn next(observer: &mut Observer) -> ObserveEvent {
    observer
        .recv_timeout(Some(PATIENCE))
        .unwrap()
        .expect("a change within the test's patience")
}

fn leader_named(event: ObserveEvent, name: &str, value: &[u8]) -> u64 {
    match event {
        ObserveEvent::Leader(l) => {
            assert_eq!(l.session_name.as_deref(), Some(name), "{l:?}");
            assert_eq!(l.value, value, "{l:?}");
            l.sequence
        }
        other => panic!("expected {name} to lead, saw {other:?}"),
    }
}

#[test]
fn the_blocking_observer_follows_campaigns_proclaims_resigns_go_and_a_crash() {
    let Some(agent) = require_agent() else { return };
    let prefix = format!("blocking/election/{}", std::process::id());
    let key = format!("{prefix}/.lock");
    let client = Client::new(agent.config().unwrap()).unwrap();
    let mut observer = client.observe(&key).unwrap();
    assert!(matches!(next(&mut observer), ObserveEvent::NoLeader { .. }));

    let mut options = LockOptions::new(&key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = "blocking-a".to_owned();
        session.lock_delay = Some(Duration::ZERO);
        // No health checks: with no lock-delay, a session a node check could end holds nothing.
        session.checks = Some(Vec::new());
    }
    let election = client.election_with(options).unwrap();
    let leading = election.campaign("a-1").unwrap();
    let first = leader_named(next(&mut observer), "blocking-a", b"a-1");
    assert_eq!(first, leading.token().sequence());
    assert_eq!(
        election.leader().unwrap().and_then(|l| l.session_name).as_deref(),
        Some("blocking-a")
    );
    leading.proclaim("a-2").unwrap();
    match next(&mut observer) {
        ObserveEvent::Value(l) => assert_eq!((l.value.as_slice(), l.sequence), (&b"a-2"[..], first)),
        other => panic!("expected the proclaimed value, saw {other:?}"),
    }
    leading.resign().unwrap();
    assert!(matches!(next(&mut observer), ObserveEvent::NoLeader { .. }));

    let scratch = Scratch::new("blocking-election");
    let mut go = GoLock::spawn(agent, &scratch, &prefix, "go-blocking", true);
    let go_sequence = leader_named(next(&mut observer), "go-blocking", b"");
    assert!(go_sequence > first);
    go.release();
    go.finish();
    assert!(matches!(next(&mut observer), ObserveEvent::NoLeader { .. }));

    // A crash: the leader's session is destroyed; leading ends with a reason.
    let crashing = election.campaign("c-1").unwrap();
    let c_sequence = leader_named(next(&mut observer), "blocking-a", b"c-1");
    assert!(c_sequence > go_sequence);
    client
        .call(
            &SessionDestroy {
                id: crashing.token().session.clone(),
            },
            Duration::from_secs(10),
        )
        .unwrap();
    let reason = crashing.wait_lost(PATIENCE).unwrap().expect("lost");
    assert!(
        matches!(reason, LossReason::NotHeld | LossReason::SessionInvalidated),
        "{reason:?}"
    );
    assert!(matches!(next(&mut observer), ObserveEvent::NoLeader { .. }));
    assert_eq!(client.leader(&key).unwrap(), None);
    client.shutdown(Duration::from_secs(10)).unwrap();
}
