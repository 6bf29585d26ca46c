//! The verdict of the generated properties on one run, written once for every runner of them
//! (the quick properties of each kind, the scale run): the harness's own checks, at most `limit`
//! holds at once where nothing excuses more, and liveness after the last fault heals.

use std::time::Duration;

use super::{FaultKind, Hold, Outcome, Scenario, Target};

/// The most holds under way at once (a hold ending when another begins counts as overlapping;
/// a hold never ended counts until the end).
pub fn most_at_once(holds: &[Hold]) -> usize {
    let mut edges: Vec<(Duration, i64)> = holds
        .iter()
        .flat_map(|h| [(h.from, 1), (h.until.unwrap_or(Duration::MAX), -1)])
        .collect();
    edges.sort_by_key(|&(at, delta)| (at, -delta));
    let (mut now, mut most) = (0i64, 0i64);
    for (_, delta) in edges {
        now += delta;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

/// How long after the last fault heals a patient contender must hold: two TTLs (the server
/// frees a lost holder's key, or deletes its contender key, within 2×TTL), the lock's lock-delay
/// (a semaphore's contender keys are named by their sessions, so none applies), the retry
/// backoff's cap plus a lock wait, and a hold and a pause.
pub fn liveness_bound(scenario: &Scenario, target: Target) -> Duration {
    let clients = &scenario.clients;
    let ttl = clients.iter().map(|c| c.ttl).max().unwrap_or_default();
    let delay = match target {
        Target::Lock => clients
            .iter()
            .map(|c| c.lock_delay.unwrap_or(Duration::from_secs(15)))
            .max()
            .unwrap_or_default(),
        Target::Semaphore { .. } => Duration::ZERO,
    };
    let pause = clients.iter().map(|c| c.pause + c.hold).max().unwrap_or_default();
    2 * ttl + delay + Duration::from_secs(20) + pause
}

/// Liveness: once the last fault has healed, someone holds within [`liveness_bound`], if the
/// run lasts that long and a contender is patient (callers that all cancel early may never
/// hold).
pub fn check_liveness(scenario: &Scenario, target: Target, outcome: &Outcome) -> Result<(), String> {
    let healed = scenario.last_heal();
    let bound = liveness_bound(scenario, target);
    let patient = scenario.clients.iter().any(|c| c.cancel_after.is_none());
    if !patient || healed + bound > scenario.duration {
        return Ok(());
    }
    let first = outcome.first_acquire_after(healed);
    if first.is_some_and(|t| t <= healed + bound) {
        return Ok(());
    }
    Err(format!(
        "liveness: healed at {healed:?}, first hold after at {first:?}, bound {bound:?}\n{}",
        outcome.trace_tail(60)
    ))
}

/// Everything a generated run must satisfy: no violation of the harness's checks, at most the
/// target's limit holding at once (the harness counts at each grant, excusing holders an
/// operator acted on, stalled or whose agent restarted; the holds must agree where none of that
/// happened), and liveness.
pub fn verdict(scenario: &Scenario, target: Target, outcome: &Outcome) -> Result<(), String> {
    if !outcome.violations.is_empty() {
        return Err(format!(
            "{target:?}: violations: {:#?}\n--- trace tail ---\n{}",
            outcome.violations,
            outcome.trace_tail(80)
        ));
    }
    let excusable = scenario.faults.iter().any(|f| {
        f.kind.is_operator()
            || matches!(
                f.kind,
                FaultKind::Pause { .. } | FaultKind::Lag { .. } | FaultKind::AgentRestart
            )
    });
    let most = most_at_once(&outcome.holds);
    if !excusable && most > target.limit() as usize {
        return Err(format!(
            "{target:?}: {most} holds at once\n{}",
            outcome.trace_tail(80)
        ));
    }
    check_liveness(scenario, target, outcome)
}
