//! Queued waiting (`Waiting::Queue`) against the simulated Consul, in virtual time: the line's
//! order, its cost per handoff, and what crashes, cancels and operators do to it. Every run is
//! also checked by the harness at every step (safety, fencing, FIFO among queued contenders,
//! the request budget, cleanup: no queue entry left by a run without faults).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use consul_lock_testkit::harness::{ClientSpec, Fault, FaultKind, Outcome, Scenario, run};

const KEY: &str = "service/leader/.lock";

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `n` contenders starting 100 ms apart, each holding `hold` once (their pause outlasts the run).
fn line(seed: u64, n: usize, hold: Duration, queued: bool) -> Scenario {
    let clients = (0..n)
        .map(|i| {
            let mut c = ClientSpec::new(hold);
            c.start = Duration::from_millis(100 * i as u64);
            c.pause = secs(10_000);
            c.queued = queued;
            c
        })
        .collect();
    Scenario {
        seed,
        clients,
        faults: Vec::new(),
        duration: hold * (n as u32 + 2) + secs(60),
        key: KEY.into(),
    }
}

fn order(outcome: &Outcome) -> Vec<usize> {
    outcome.holds.iter().map(|h| h.client).collect()
}

/// Requests per contender (each holds once), renewals aside (they pay for time spent waiting,
/// not for handoffs): the requests of the run over the crowd.
fn per_contender(outcome: &Outcome, n: usize) -> f64 {
    let sent = outcome
        .trace
        .iter()
        .filter(|l| l.contains(" -> #") && !l.contains("/v1/session/renew/"))
        .count();
    sent as f64 / n as f64
}

#[test]
fn queued_contenders_hold_in_the_order_they_came() {
    let outcome = run(&line(1, 12, secs(2), true));
    outcome.assert_clean();
    assert_eq!(
        order(&outcome),
        (0..12).collect::<Vec<_>>(),
        "{}",
        outcome.trace_tail(40)
    );
    // Waiting on the key instead, the same crowd is served in whatever order the races go.
    let herd = run(&line(1, 12, secs(2), false));
    herd.assert_clean();
    assert_ne!(order(&herd), (0..12).collect::<Vec<_>>());
}

#[test]
fn requests_per_handoff_do_not_grow_with_the_crowd() {
    // Short holds, so that no wait runs out its 15 s round (a list and a read each).
    let hold = Duration::from_millis(250);
    let small = run(&line(2, 10, hold, true));
    let large = run(&line(2, 40, hold, true));
    small.assert_clean();
    large.assert_clean();
    let (s, l) = (per_contender(&small, 10), per_contender(&large, 40));
    // Each contender pays for its own session, entry, list, wait and hold, and wakes once: the
    // same whatever the crowd.
    assert!(l <= s + 0.5, "10 contenders: {s:.1} requests each; 40: {l:.1}");
    let herd = run(&line(2, 40, hold, false));
    herd.assert_clean();
    let h = per_contender(&herd, 40);
    assert!(
        l * 2.0 < h,
        "40 contenders: queued {l:.1} requests each, on the key {h:.1}"
    );
}

#[test]
fn a_waiter_cut_off_until_its_session_dies_is_passed_and_the_line_goes_on() {
    let mut scenario = line(3, 6, secs(4), true);
    // Client 2 waits behind 0 and 1; cut off for 40 s, its session expires (TTL 15 s) and its
    // entry is left without one: client 3 must look past it, to client 1, and go on.
    scenario.faults = vec![Fault {
        kind: FaultKind::Partition { client: 2 },
        from: secs(1),
        lasting: secs(40),
    }];
    let outcome = run(&scenario);
    outcome.assert_clean();
    let holds = order(&outcome);
    assert_eq!(holds.len(), 6, "{holds:?}");
    let pos = |c: usize| holds.iter().position(|&h| h == c).expect("held");
    assert!(pos(3) < pos(4) && pos(4) < pos(5), "{holds:?}");
    // Without 2's entry in the way, 3 holds right after 1 (nobody stalls on the dead entry).
    assert_eq!(pos(3), pos(1) + 1, "{holds:?}\n{}", outcome.trace_tail(60));
}

/// Six queued contenders holding 3 s each, the line deleted by an operator at 4 s.
fn line_deleted(seed: u64) -> Scenario {
    let mut scenario = line(seed, 6, secs(3), true);
    scenario.faults = vec![Fault {
        kind: FaultKind::DeleteQueue,
        from: secs(4),
        lasting: Duration::ZERO,
    }];
    scenario
}

#[test]
fn an_operator_deleting_the_line_delays_no_one_past_a_blocking_read_round() {
    let outcome = run(&line_deleted(4));
    outcome.assert_clean();
    assert_eq!(outcome.holds.len(), 6, "{:?}", order(&outcome));
    // Every waiter takes its entry again, in its old place, within one wait (15 s).
    let mut from: Vec<Duration> = outcome.holds.iter().map(|h| h.from).collect();
    from.sort();
    let longest = from.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    assert!(
        longest <= secs(3) + secs(15) + secs(1),
        "longest gap between holds {longest:?}\n{}",
        outcome.trace_tail(60)
    );
    assert_eq!(order(&outcome), (0..6).collect::<Vec<_>>());
}

/// The head of the line waits on the key, not on its entry: when an operator deletes the line,
/// it sees its own entry gone only when its read's round runs out, and the waiters behind it,
/// woken at once, make theirs again without it. They don't take the key for that round, so the
/// head is not overtaken, whatever the timing (before, 22 seeds in 40 of this scenario
/// overtook it).
#[test]
fn an_operator_deleting_the_line_overtakes_no_one_whatever_the_timing() {
    for seed in 1..=16 {
        let outcome = run(&line_deleted(seed));
        outcome.assert_clean();
        assert_eq!(
            order(&outcome),
            (0..6).collect::<Vec<_>>(),
            "seed {seed}\n{}",
            outcome.trace_tail(80)
        );
    }
}

#[test]
fn a_cancel_at_any_moment_leaves_no_entry() {
    // Cancels from the first milliseconds (the session create, the enqueue, the list in
    // flight) to the wait; the harness finds any entry left once the run settles.
    for (k, cancel) in (1..60).step_by(3).chain([150, 400, 2_000]).enumerate() {
        let mut scenario = line(5 + k as u64, 3, secs(2), true);
        scenario.clients[1].cancel_after = Some(Duration::from_millis(cancel));
        scenario.clients[2].cancel_after = Some(Duration::from_millis(cancel / 2 + 1));
        scenario.clients[2].pause = secs(1);
        let outcome = run(&scenario);
        outcome.assert_clean();
    }
}

#[test]
fn queued_and_unqueued_contenders_mix_safely_and_the_queued_keep_their_order() {
    let mut scenario = line(6, 10, secs(1), true);
    for (i, c) in scenario.clients.iter_mut().enumerate() {
        c.queued = i % 2 == 0;
        c.pause = secs(2);
    }
    let outcome = run(&scenario);
    // Safety and FIFO among the queued are the harness's checks.
    outcome.assert_clean();
    let queued: Vec<usize> = order(&outcome)
        .into_iter()
        .filter(|c| c % 2 == 0)
        .take(5)
        .collect();
    assert_eq!(queued, vec![0, 2, 4, 6, 8]);
}

/// Found by the generated runs: a leader election outlasts a waiter's renew deadline, so it
/// takes a new session and a new entry (keeping its rank), while Consul keeps the old session,
/// and its entry, alive (a new leader gives every session a new TTL). The waiter must not wait
/// behind its own old entry (it deletes it) while an unqueued contender takes the key in turns.
#[test]
fn a_waiter_whose_session_was_replaced_does_not_wait_behind_its_old_entry() {
    let mut unqueued = ClientSpec::new(Duration::from_millis(4472));
    unqueued.ttl = secs(10);
    unqueued.lock_delay = Some(Duration::ZERO);
    unqueued.pause = Duration::from_millis(2223);
    let mut queued = ClientSpec::new(Duration::from_millis(500));
    queued.ttl = secs(20);
    queued.pause = Duration::from_millis(342);
    queued.queued = true;
    let scenario = Scenario {
        seed: 4_260_521_974_469_413_280,
        clients: vec![unqueued, queued],
        faults: vec![Fault {
            kind: FaultKind::LeaderElection,
            from: Duration::from_millis(27_345),
            lasting: Duration::from_millis(19_982),
        }],
        duration: secs(150),
        key: KEY.into(),
    };
    run(&scenario).assert_clean();
}

/// Found by sim_scale (seed 10185948393186139864): a queued contender whose session a 2 s
/// partition cost (a lock-delay of 2 s bounds its hold window) gave up, and its next attempt
/// lined up behind its own old entry, which Consul kept with the old session, while the key was
/// free. Entries of every session the machine lined up with, not only this attempt's, are its
/// own to clear.
#[test]
fn a_waiter_does_not_wait_behind_its_own_entry_from_an_earlier_attempt() {
    let ms = Duration::from_millis;
    let spec = |ttl: u64,
                lock_delay: Option<u64>,
                start: u64,
                hold: u64,
                pause: u64,
                try_once: Option<u64>,
                queued: bool| {
        let mut c = ClientSpec::new(ms(hold));
        c.ttl = secs(ttl);
        c.lock_delay = lock_delay.map(secs);
        c.start = ms(start);
        c.pause = ms(pause);
        c.try_once = try_once.map(secs);
        c.queued = queued;
        c
    };
    let scenario = Scenario {
        seed: 1_126_490_234_838_236_576,
        clients: vec![
            spec(20, Some(2), 131, 8_973, 1_927, Some(6), true),
            spec(10, None, 3_316, 18_392, 2_804, Some(3), false),
            spec(10, Some(2), 1_416, 1_280, 1_686, None, false),
        ],
        faults: vec![
            Fault {
                kind: FaultKind::Refuse { client: 2 },
                from: ms(144_183),
                lasting: ms(2_809),
            },
            Fault {
                kind: FaultKind::Partition { client: 0 },
                from: ms(109_074),
                lasting: ms(1_998),
            },
            Fault {
                kind: FaultKind::Latency {
                    client: 0,
                    extra: ms(999),
                },
                from: ms(39_093),
                lasting: ms(17_957),
            },
        ],
        duration: secs(600),
        key: "service/leader/.lock".into(),
    };
    let outcome: Outcome = run(&scenario);
    outcome.assert_clean();
}
