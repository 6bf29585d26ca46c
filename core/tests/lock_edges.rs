//! The edges of a hold, driven by hand through virtual time: an acquire abandoned in flight, a
//! release nobody answers, refusals the machine must not retry, and failures that must be seen.
//! Every step is checked against the invariants in `support`.

#![allow(clippy::unwrap_used)]

mod support;

use consul_lock_core::machine::{LockError, LockEvent, LockStatus};
use support::reply::{self, yes};
use support::{FLAGS, Kind, Rig, entry, existing, options, renew_ok, secs};

fn acquire_pattern(session: &str) -> String {
    format!("PUT /v1/txn?verb=lock&key=k&session={session}&flags={FLAGS}")
}

fn release_pattern(session: &str) -> String {
    format!("PUT /v1/kv/k?release={session}&flags={FLAGS}")
}

fn held_by(session: &str) -> support::Kv {
    entry().held_by(session, 1).modified(6)
}

/// A rig whose lock has its acquire in flight on session `s1`, which the machine created.
fn acquire_in_flight() -> (Rig, support::Sent) {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let acquire = r.expect(&acquire_pattern("s1"));
    (r, acquire)
}

// ----- item 1: an acquire abandoned in flight ---------------------------------------------------

/// Cancelled with the acquire in flight and then granted: the key is released *before* the
/// session is destroyed, so no other contender waits out the session's lock-delay. `Cancelled`
/// is still reported at once.
#[test]
fn a_cancelled_acquire_that_was_granted_is_released_before_the_destroy() {
    let (mut r, acquire) = acquire_in_flight();
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled], "reported at once");
    assert_eq!(r.m().status(), LockStatus::Idle);
    assert!(
        r.last_sent("PUT /v1/session/destroy/s1").is_none(),
        "no destroy while the acquire may hold the key"
    );
    r.reply(acquire.id, reply::locked(&held_by("s1")));
    assert!(r.last_sent("PUT /v1/session/destroy/s1").is_none());
    r.answer(&release_pattern("s1"), yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.events().is_empty(), "nothing more to report: {:?}", r.events());
    assert!(r.m().is_quiescent());
}

/// Refused: there is nothing to release, and the session goes at once.
#[test]
fn a_cancelled_acquire_that_was_refused_destroys_the_session_at_once() {
    let (mut r, acquire) = acquire_in_flight();
    r.cancel();
    r.reply(acquire.id, reply::lock_held());
    assert!(r.last_sent(&release_pattern("s1")).is_none());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// Unanswered (the request times out): it may have been granted, so the key is released all
/// the same (a release by a session that does not hold the key changes nothing).
#[test]
fn a_cancelled_acquire_that_is_never_answered_is_released_before_the_destroy() {
    let (mut r, _acquire) = acquire_in_flight();
    r.cancel();
    assert!(r.run_until(secs(30), renew_ok, |n| n.find(&release_pattern("s1")).is_some()));
    assert!(r.last_sent("PUT /v1/session/destroy/s1").is_none());
    r.answer(&release_pattern("s1"), reply::timed_out());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// A new attempt made while the abandoned acquire is out takes the same session, and the old
/// grant is its own: no release pulls the key from under it, and the session stays.
#[test]
fn a_new_attempt_keeps_the_session_of_an_abandoned_acquire() {
    let (mut r, stray) = acquire_in_flight();
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.lock().unwrap();
    assert!(
        r.find("PUT /v1/session/create").is_none(),
        "the session is still ours"
    );
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    r.reply(stray.id, reply::locked(&held_by("s1")));
    r.answer(&acquire_pattern("s1"), reply::locked(&held_by("s1")));
    assert!(matches!(r.events()[..], [LockEvent::Acquired(_)]));
    assert!(r.last_sent(&release_pattern("s1")).is_none());
    assert!(r.last_sent("PUT /v1/session/destroy/s1").is_none());
    assert_eq!(r.m().status(), LockStatus::Held);
}

/// The caller's session is never destroyed; a granted stray is released all the same.
#[test]
fn with_the_callers_session_a_granted_stray_is_released_and_nothing_destroyed() {
    let mut r = Rig::new(existing("mine"));
    r.lock().unwrap();
    r.answer("GET /v1/kv/k?!index", reply::missing(5));
    let acquire = r.expect(&acquire_pattern("mine"));
    r.cancel();
    r.reply(acquire.id, reply::locked(&held_by("mine")));
    r.answer(&release_pattern("mine"), yes());
    assert!(r.m().is_quiescent());
    assert_eq!(r.count("PUT /v1/session/destroy"), 0);
}

// ----- item 3: a release nobody answers ----------------------------------------------------------

/// A release that fails in a way that may pass is tried again; confirmed, the unlock ends with
/// `Released` as usual.
#[test]
fn an_unanswered_release_is_tried_again() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.unlock().unwrap();
    r.answer(&release_pattern("s1"), reply::reset());
    for failure in [reply::no_leader(), reply::timed_out()] {
        let again = r.run_until(secs(5), renew_ok, |n| n.find(&release_pattern("s1")).is_some());
        assert!(again, "tried again");
        r.answer(&release_pattern("s1"), failure);
    }
    assert!(r.run_until(secs(5), renew_ok, |n| n.find(&release_pattern("s1")).is_some()));
    assert!(
        r.last_sent("PUT /v1/session/destroy/s1").is_none(),
        "no destroy before the release"
    );
    r.answer(&release_pattern("s1"), yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert_eq!(r.events(), [LockEvent::Released]);
    assert!(r.m().is_quiescent());
}

/// A release never confirmed within the session's TTL is reported as such, not as `Released`;
/// the session is destroyed after the last try.
#[test]
fn a_release_never_confirmed_is_an_error() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.unlock().unwrap();
    let unlocked = r.now();
    let mut releases = 0;
    r.run(secs(40), |s, now| match s.kind() {
        Kind::Destroy(_) => Some(yes()),
        _ if s.is(&release_pattern("s1")) => {
            releases += 1;
            Some(reply::reset())
        }
        _ => renew_ok(s, now),
    });
    let events = r.events();
    match &events[..] {
        [LockEvent::ReleaseFailed(LockError::ReleaseUnconfirmed { attempts, last })] => {
            assert_eq!(*attempts, releases, "every try counted");
            assert!(last.contains("reset"), "{last}");
        }
        other => panic!("expected ReleaseFailed, got {other:?}"),
    }
    let destroy = r.last_sent("PUT /v1/session/destroy/s1").unwrap();
    let tried_for = destroy.at.saturating_duration_since(unlocked);
    assert!(
        tried_for >= secs(15),
        "tried for the session's TTL, not {tried_for:?}"
    );
    assert!(r.m().is_quiescent());
    // Usable again.
    r.lock().unwrap();
}

/// A release Consul refuses for good (no write permission) ends the unlock at once with that
/// error.
#[test]
fn a_refused_release_is_an_error_at_once() {
    let mut r = Rig::new(options());
    r.acquire("s1", 1);
    r.unlock().unwrap();
    r.answer(&release_pattern("s1"), reply::status(403, "Permission denied"));
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(
        matches!(
            &r.events()[..],
            [LockEvent::ReleaseFailed(LockError::PermissionDenied(_))]
        ),
        "a typed permission error"
    );
}

// ----- item 4: refusals that retrying can't fix ---------------------------------------------------

/// A token that may read the key but not write it: Consul refuses the lock transaction with
/// `Permission denied`. That is a typed, fatal error at once, not a lock-delay to wait out.
#[test]
fn a_permission_refusal_of_the_lock_transaction_is_fatal() {
    let (mut r, _) = acquire_in_flight();
    r.answer(&acquire_pattern("s1"), reply::lock_refused("Permission denied"));
    assert!(
        matches!(
            &r.events()[..],
            [LockEvent::Failed(LockError::PermissionDenied(_))]
        ),
        "fatal, typed"
    );
    assert_eq!(r.m().status(), LockStatus::Idle);
    assert_eq!(r.count("GET /v1/kv/k"), 0, "no recheck");
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// A refusal this machine does not know ends the attempt with Consul's words, rather than
/// becoming a retry loop the caller never sees.
#[test]
fn an_unknown_refusal_of_the_lock_transaction_is_fatal() {
    let (mut r, _) = acquire_in_flight();
    r.answer(
        &acquire_pattern("s1"),
        reply::lock_refused("a reason of a later Consul"),
    );
    match &r.events()[..] {
        [LockEvent::Failed(LockError::Refused(e))] => {
            assert!(e.to_string().contains("a reason of a later Consul"), "{e}");
        }
        other => panic!("expected Failed(Refused), got {other:?}"),
    }
}

/// A session create the token may not make is a permission error too.
#[test]
fn a_session_create_refused_for_permission_is_a_permission_error() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::status(403, "Permission denied"));
    assert!(matches!(
        &r.events()[..],
        [LockEvent::Failed(LockError::PermissionDenied(_))]
    ));
}

// ----- item 5: failures the caller sees, and an error budget --------------------------------------

/// Every failed try while acquiring is reported with its cause, its count and the next try; once
/// failures have lasted the error budget, the attempt ends with a typed error naming the last
/// cause.
#[test]
fn every_failed_try_is_reported_and_the_budget_ends_the_attempt() {
    let mut o = options();
    o.hold.acquire_error_budget = Some(secs(30));
    let mut r = Rig::new(o);
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    let started = r.now();
    r.run(secs(60), |s, now| match s.kind() {
        Kind::Destroy(_) => Some(yes()),
        _ if s.is("GET /v1/kv/k") => Some(reply::no_leader()),
        _ => renew_ok(s, now),
    });
    let events = r.events();
    let (retries, rest): (Vec<_>, Vec<_>) = events.iter().partition(|e| matches!(e, LockEvent::Retrying(_)));
    assert!(retries.len() >= 5, "{retries:?}");
    for (n, e) in retries.iter().enumerate() {
        let LockEvent::Retrying(retry) = e else {
            unreachable!()
        };
        assert_eq!(retry.attempt as usize, n + 1, "counted in a row");
        assert_eq!(retry.failing_since, started);
        assert!(retry.cause.contains("No cluster leader"), "{}", retry.cause);
    }
    match &rest[..] {
        [
            LockEvent::Failed(LockError::AgentUnavailable {
                attempts,
                failing_for,
                last,
            }),
        ] => {
            assert_eq!(*attempts as usize, retries.len() + 1);
            assert!(*failing_for >= secs(30));
            assert!(last.contains("No cluster leader"));
        }
        other => panic!("expected AgentUnavailable, got {other:?}"),
    }
    assert_eq!(r.m().status(), LockStatus::Idle);
}

/// A usable answer ends the run of failures: a flaky agent that answers now and then never
/// exhausts the budget.
#[test]
fn a_usable_answer_starts_the_budget_again() {
    let mut o = options();
    o.hold.acquire_error_budget = Some(secs(5));
    let mut r = Rig::new(o);
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    let mut reads = 0u64;
    r.run(secs(120), |s, now| match s.kind() {
        _ if s.is("GET /v1/kv/k") => {
            reads += 1;
            // Every third read answers: the key is held by someone else, at a new index.
            Some(if reads % 3 == 0 {
                reply::kv(10 + reads, &entry().held_by("other", 1).modified(10 + reads))
            } else {
                reply::no_leader()
            })
        }
        _ => renew_ok(s, now),
    });
    assert_eq!(r.m().status(), LockStatus::Acquiring);
    assert!(r.outcomes().is_empty());
}

/// With no budget, acquisition retries for ever (and still reports every failure).
#[test]
fn no_budget_retries_for_ever() {
    let mut o = options();
    o.hold.acquire_error_budget = None;
    let mut r = Rig::new(o);
    r.lock().unwrap();
    r.run(secs(600), |s, _| match s.kind() {
        _ if s.is("PUT /v1/session/create") => Some(reply::refused()),
        _ => None,
    });
    assert_eq!(r.m().status(), LockStatus::Acquiring);
    let events = r.events();
    assert!(events.len() > 50, "{} retries reported", events.len());
    assert!(
        events
            .iter()
            .all(|e| matches!(e, LockEvent::Retrying(retry) if retry.cause.contains("session create")))
    );
}

/// Failures to create the session count too, and a hanging agent (every request times out) ends
/// the attempt after the budget, at the first failure past it.
#[test]
fn a_hanging_agent_ends_the_attempt_after_the_budget() {
    let mut r = Rig::new(options());
    r.lock().unwrap();
    r.run(secs(120), |_, _| None);
    let events = r.outcomes();
    match &events[..] {
        [
            LockEvent::Failed(LockError::AgentUnavailable {
                failing_for, last, ..
            }),
        ] => {
            assert!(*failing_for >= secs(60), "{failing_for:?}");
            assert!(last.contains("timed out"), "{last}");
        }
        other => panic!("expected AgentUnavailable, got {other:?}"),
    }
    assert_eq!(r.m().status(), LockStatus::Idle);
    assert!(
        r.m().is_quiescent(),
        "nothing left to do once the attempt gave up"
    );
}

/// An abandoned acquire keeps the session alive until its answer; a destroy started meanwhile
/// must let the session go when it ends (fuzz finding: the chore was settled during the destroy,
/// and the idle machine then renewed its session for ever).
#[test]
fn a_destroy_during_a_chore_lets_the_session_go() {
    let (mut r, stray) = acquire_in_flight();
    r.cancel();
    assert_eq!(r.events(), [LockEvent::Cancelled]);
    r.destroy().unwrap();
    r.reply(stray.id, reply::lock_held());
    assert!(
        r.last_sent("PUT /v1/session/destroy/s1").is_none(),
        "the destroy is still under way"
    );
    r.answer("GET /v1/kv/k", reply::missing(9));
    assert_eq!(r.events(), [LockEvent::Destroyed]);
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent(), "nothing left: no session renewed for ever");
}
