//! The properties a run checks beyond safety and fencing: what real deployments hit when a lock
//! is merely slow, chatty or careless rather than unsafe.
//!
//! - **Belief within the lease.** A client believes it holds only while a renewal (or the
//!   create) it *sent* less than a TTL ago has been acknowledged: Consul counts the TTL from
//!   when it got the renewal, so a holder counting from the acknowledgement, renewing too late,
//!   or taking a renewal acknowledged after its lease ran out believes longer than Consul
//!   promises.
//! - **No loss without a cause.** A hold ends in `Lost` only when something in the run can
//!   explain it: an operator's action on it, a fault that cuts the client off (hang,
//!   partition), latency too long for its renewals, or failing answers (500s, refusals, a
//!   leader election) for longer than the renewals or `monitor_retries` bear.
//! - **Prompt loss after an operator's action.** A holder whose key or session an operator
//!   touches reports it within [`REACTION`], by its monitor, not by its TTL.
//! - **A request budget.** In any [`WINDOW`] a client without faults sends at most
//!   [`BUDGET_BASE`] requests plus [`BUDGET_PER_CHANGE`] per change of the agent's index in that
//!   window (and [`BUDGET_LOCK_DELAY`] while the key's lock-delay is in force): waiting, holding
//!   and idle cost little, and a crowd's cost follows the handoffs.
//! - **No needless lock-delay.** A client never destroys its session while that session still
//!   holds a key (which imposes the lock-delay on everyone) unless a fault or an operator
//!   explains it: releases and cancels, at any moment, give the key back first.
//! - **Nothing held without a holder.** A key held by the session of a client whose machine is
//!   idle (it believes nothing, does nothing) is an orphan.
//! - **A refusal is reported when it comes.** A semaphore contender's own key (named by its
//!   session) can be refused only by a lock-delay or an agent gone wrong, never by contention:
//!   the machine reports it (`Retrying`, or the attempt's end) before it sends anything else,
//!   rather than carrying on as though it had the key.
//! - **`Released` is the truth.** When a client reports `Released`, the agent no longer counts
//!   it a holder (the lock's key is not its session's; the `.lock` does not count its slot): a release
//!   that failed is `ReleaseFailed`, never a quiet success.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use consul_lock_core::machine::{LockEvent, LockStatus, Reply, RequestId};

use consul_lock_core::machine::SemaphoreState;

use super::{FaultKind, Harness, Target};

/// How soon a holder must report an operator's action on its hold, unless faulted around it.
pub(super) const REACTION: Duration = Duration::from_millis(1_500);
/// The sliding window of the request budget.
pub(super) const WINDOW: Duration = Duration::from_secs(10);
/// Requests per window that any client may send, whatever happens.
pub(super) const BUDGET_BASE: usize = 10;
/// Further requests per window for each change of the agent's index in it (a handoff wakes
/// every waiter, which reads again and may try).
pub(super) const BUDGET_PER_CHANGE: usize = 4;
/// Further requests per window for each call of the caller's (`lock`, `unlock`, `cancel`): an
/// acquisition's session, read, acquire and monitor; a release and a destroy.
pub(super) const BUDGET_PER_CALL: usize = 6;
/// Further requests per window while faults make requests fail: renewals retried every
/// second, monitor reads every 2 s, acquisitions on a growing backoff.
pub(super) const BUDGET_FAULTED: usize = 30;
/// Further requests per window while the key's lock-delay is (or was just) in force: the
/// reads that watch the key through the backoff's longer pauses (at most one a try, and from
/// a second on the tries are a second or more apart).
pub(super) const BUDGET_LOCK_DELAY: usize = 5;
/// How soon after a clean release a waiting contender holds the lock, unless faulted.
pub(super) const HANDOFF: Duration = Duration::from_millis(1_500);
/// The longest pause between failed tries (the backoff's cap).
pub(super) const RETRY_CAP: Duration = Duration::from_secs(5);

/// What the checks follow of one client.
#[derive(Debug, Default)]
pub(super) struct ClientChecks {
    /// Until when the client's keys are surely its own, as it can know: the send time of the
    /// last acknowledged renewal (or create), plus its hold window. That is the TTL, or the
    /// lock-delay when shorter: a health-bound session can end at any moment (its node marked
    /// failed), and then only the lock-delay keeps the key from others.
    lease_expiry: Option<Instant>,
    /// Renewals and creates in flight, with their send times (and whether a create).
    session_sends: Vec<(RequestId, Instant, bool)>,
    /// Send times of recent requests (within [`WINDOW`]).
    recent: VecDeque<Duration>,
    /// The operator's action on the current hold that it must report, and when.
    reaction_due: Option<Duration>,
    /// When the caller called `lock`, `unlock` or `cancel` (within [`WINDOW`]).
    pub(super) calls: VecDeque<Duration>,
    /// Semaphore: acquires of the client's own contender key in flight, with their session.
    contends: Vec<(RequestId, String)>,
    /// Semaphore: its own contender key was just refused, and nothing reported yet.
    report_due: bool,
}

impl Harness<'_> {
    /// Whether a fault that fails or cuts off `client`'s requests was active at any time in
    /// `[from, to]`, or an operator acted then.
    pub(super) fn disturbed(&self, client: usize, from: Duration, to: Duration) -> bool {
        self.faulted(client, from, to) || self.operator_actions.iter().any(|a| a.at >= from && a.at <= to)
    }

    /// Whether a window fault touched `client` at any time in `[from, to]`.
    fn faulted(&self, client: usize, from: Duration, to: Duration) -> bool {
        self.faulted_by(client, from, to, |_| true)
    }

    /// Whether a fault of a kind `which` touched `client` at any time in `[from, to]`
    /// (operator actions touch no client: they act on holds).
    pub(super) fn faulted_by(
        &self,
        client: usize,
        from: Duration,
        to: Duration,
        which: impl Fn(&FaultKind) -> bool,
    ) -> bool {
        self.scenario
            .faults
            .iter()
            .any(|f| f.kind.touches(client) && f.from <= to && f.until() >= from && which(&f.kind))
    }

    /// Whether `client` was stalled (paused, or its driver late) at any time in `[from, to]`:
    /// it believes on meanwhile, and only the fencing token answers that.
    pub(super) fn stalled(&self, client: usize, from: Duration, to: Duration) -> bool {
        self.faulted_by(client, from, to, |k| {
            matches!(k, FaultKind::Pause { .. } | FaultKind::Lag { .. })
        })
    }

    /// A request client `i` sends now.
    pub(super) fn checks_on_send(&mut self, i: usize, id: RequestId, request: &http::Request<Vec<u8>>) {
        let (now, t) = (self.now, self.t());
        let path = request.uri().path();
        if std::mem::take(&mut self.clients[i].checks.report_due) {
            self.violation(format!(
                "refusal: client {i} sent {} {path} without reporting that its own contender key was refused",
                request.method()
            ));
        }
        let own_key = (matches!(self.target, Target::Semaphore { .. })
            && request.method() == http::Method::PUT
            && path != format!("/v1/kv/{}", self.lock_key)
            && request
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p.starts_with("acquire="))))
        .then(|| {
            path.strip_prefix("/v1/kv/")?
                .strip_prefix(self.scenario.key.trim_end_matches('/'))?
                .strip_prefix('/')
                .filter(|session| !session.is_empty())
        })
        .flatten();
        if let Some(session) = own_key {
            self.clients[i].checks.contends.push((id, session.to_owned()));
        }
        // A session let go takes its contender key's answer with it: the machine has moved on.
        if let Some(gone) = path.strip_prefix("/v1/session/destroy/") {
            self.clients[i].checks.contends.retain(|(_, s)| s != gone);
        }
        let create = path == "/v1/session/create";
        if create || path.starts_with("/v1/session/renew/") {
            self.clients[i].checks.session_sends.push((id, now, create));
        }
        let recent = &mut self.clients[i].checks.recent;
        recent.push_back(t);
        while recent.front().is_some_and(|s| *s + WINDOW < t) {
            recent.pop_front();
        }
        let sent = recent.len();
        let from = t.saturating_sub(WINDOW);
        let changes = self
            .index_changes
            .iter()
            .rev()
            .take_while(|c| **c >= from)
            .count();
        let calls = &mut self.clients[i].checks.calls;
        while calls.front().is_some_and(|c| *c < from) {
            calls.pop_front();
        }
        let calls = calls.len();
        let faulted = if self.disturbed(i, from.saturating_sub(WINDOW), t) {
            BUDGET_FAULTED
        } else {
            0
        };
        // A waiter under a lock-delay whose end it cannot know tries on a backoff, each try
        // from a second on after a read of the key (so that a handoff meanwhile is seen).
        let delayed = if self
            .sim
            .lock_delay_until(&self.lock_key)
            .is_some_and(|until| until + WINDOW >= now)
        {
            BUDGET_LOCK_DELAY
        } else {
            0
        };
        // A hold window shorter than the TTL renews that much more often.
        let (ttl, window) = (self.clients[i].spec.ttl, self.clients[i].hold_window);
        let renewals = |every: Duration| {
            usize::try_from((2 * WINDOW).as_millis() / every.as_millis().max(1)).unwrap_or(0)
        };
        let quicker = renewals(window).saturating_sub(renewals(ttl));
        let budget =
            BUDGET_BASE + BUDGET_PER_CHANGE * changes + BUDGET_PER_CALL * calls + faulted + delayed + quicker;
        if sent > budget {
            self.clients[i].checks.recent.clear();
            self.violation(format!(
                "request budget: client {i} sent {sent} requests in {WINDOW:?} with {changes} index changes and {calls} calls (budget {budget})"
            ));
        }
    }

    /// Client `i`'s machine has said all it had to say for now: a refusal of its own key still
    /// unreported is a silent retry.
    pub(super) fn checks_after_drain(&mut self, i: usize) {
        if std::mem::take(&mut self.clients[i].checks.report_due) {
            self.violation(format!(
                "refusal: client {i} said nothing of its own contender key's refusal"
            ));
        }
    }

    /// A reply reaches client `i`: a renewal or create acknowledged extends the lease it can
    /// count on, unless the lease had already run out (a late acknowledgement revives nothing).
    ///
    /// `live`: the machine still waits for it (not past its deadline, not a duplicate).
    pub(super) fn checks_on_reply(&mut self, i: usize, id: RequestId, reply: &Reply, live: bool) {
        let now = self.now;
        let window = self.clients[i].hold_window;
        let acquiring = self.clients[i].machine.status() == LockStatus::Acquiring;
        let c = &mut self.clients[i].checks;
        if let Some(k) = c.contends.iter().position(|(r, _)| *r == id) {
            c.contends.swap_remove(k);
            let refused = reply
                .as_ref()
                .is_ok_and(|r| r.status() == 200 && r.body().trim_ascii() == b"false");
            c.report_due = live && acquiring && refused;
        }
        let Some(k) = c.session_sends.iter().position(|(r, ..)| *r == id) else {
            return;
        };
        let (_, sent, create) = c.session_sends.swap_remove(k);
        let ok = reply
            .as_ref()
            .is_ok_and(|r| r.status().is_success() && r.body().as_slice() != b"null");
        if ok && create {
            c.lease_expiry = Some(sent + window);
        } else if ok && c.lease_expiry.is_some_and(|e| now < e) {
            c.lease_expiry = c.lease_expiry.map(|e| e.max(sent + window));
        }
    }

    /// A request of client `i` reaches the agent: a destroy of a session that still holds a key
    /// imposes the lock-delay, which a clean release or cancel never does.
    pub(super) fn checks_on_arrival(&mut self, i: usize, request: &http::Request<Vec<u8>>) {
        self.check_semaphore_write(i, request);
        let path = request.uri().path();
        let Some(session) = path.strip_prefix("/v1/session/destroy/") else {
            return;
        };
        // Only the lock's key is shared: a semaphore's contender keys are its session's own
        // (and go with it), and its `.lock` is held by no session.
        let held = matches!(self.target, Target::Lock)
            && self
                .sim
                .kv(&self.lock_key)
                .is_some_and(|e| e.session.as_deref() == Some(session));
        if !held {
            return;
        }
        let (t, ttl) = (self.t(), self.clients[i].spec.ttl);
        let since = self.clients[i].attempt_from.saturating_sub(2 * ttl);
        if !self.disturbed(i, since, t) {
            self.violation(format!(
                "lock-delay: client {i} destroyed its session while it held the lock, with no fault to explain it"
            ));
        }
    }

    /// Client `i`'s hold `h` ended in a loss: something must explain it.
    pub(super) fn checks_on_loss(&mut self, i: usize, h: usize) {
        let t = self.t();
        let hold = &self.holds[h];
        let spec = &self.clients[i].spec;
        let (ttl, retries) = (spec.ttl, spec.monitor_retries);
        // Renewals come every half hold window (the TTL, or a shorter lock-delay).
        let window = self.clients[i].hold_window;
        let since = hold.from.saturating_sub(ttl);
        let operator = self
            .operator_actions
            .iter()
            .any(|a| a.at >= self.exposed[h] && a.at <= t && a.touches(hold));
        if operator {
            return;
        }
        // Failing answers bear merging: back-to-back windows fail as one.
        let mut failing: Vec<(Duration, Duration)> = Vec::new();
        // The most one-way latency added meanwhile (short of excusing the loss by itself).
        let mut latency = Duration::ZERO;
        for f in &self.scenario.faults {
            // An instant fault (a reset) fails what is in flight: a window of no length.
            let (from, until) = (f.from, f.until());
            if !f.kind.touches(i) || until < since || from > t {
                continue;
            }
            match f.kind {
                // A late driver serves the renewal late and hands its answer over late, and the
                // next renewal is timed from the late one: any lag may cost the lease.
                FaultKind::Hang { .. }
                | FaultKind::Partition { .. }
                | FaultKind::AgentRestart
                | FaultKind::Lag { .. } => {
                    return;
                }
                // The renewal's round trip must fit in the half window between renewals.
                FaultKind::Latency { extra, .. } if 2 * extra + Duration::from_millis(100) >= window / 2 => {
                    return;
                }
                FaultKind::Latency { extra, .. } | FaultKind::Reorder { up_to: extra, .. } => {
                    latency = latency.max(extra);
                }
                // Answers that come, early or twice or in another order, cost no lease.
                FaultKind::RefuseAcquire { .. } | FaultKind::Duplicate { .. } | FaultKind::NoBlock { .. } => {
                }
                _ => failing.push((from, until)),
            }
        }
        failing.sort();
        let round_trips = if failing.is_empty() {
            Duration::ZERO
        } else {
            4 * latency
        };
        let mut longest = Duration::ZERO;
        let mut run: Option<(Duration, Duration)> = None;
        for (from, until) in failing {
            run = match run {
                Some((start, end)) if from <= end + Duration::from_millis(10) => {
                    Some((start, end.max(until)))
                }
                _ => Some((from, until)),
            };
            if let Some((start, end)) = run {
                longest = longest.max(end - start);
            }
        }
        // Renewals retry every second until the deadline, half a window after the last one due; a
        // renewal that fails costs the wait for its answer (a round trip, 4 one-way latencies
        // for both round trips) before the retry's own round trip.
        // `monitor_retries: Some(n)` gives up after n + 1 failed reads, 2 s apart.
        let renewals_bear = longest + Duration::from_millis(1_200) + round_trips < window / 2;
        let monitor_bears =
            retries.is_none_or(|n| longest + Duration::from_millis(100) < Duration::from_secs(2) * n);
        if renewals_bear && monitor_bears {
            let why = format!("{:?}", self.holds[h].lost);
            self.violation(format!(
                "loss without a cause: client {i}'s hold since {:?} ended {why} (longest failing window {longest:?})",
                self.holds[h].from
            ));
        }
    }

    /// An operator acted on the holds `touched` at `at`: each holder must report it soon.
    pub(super) fn checks_on_operator(&mut self, at: Duration, session: Option<&str>) {
        for c in &mut self.clients {
            if let Some(h) = c.holding {
                if session.is_none_or(|s| s == self.holds[h].token.session.as_str()) {
                    c.checks.reaction_due = Some(at + REACTION);
                }
            }
        }
    }

    /// What holds at every step: beliefs within their lease, operator actions reported in time,
    /// no orphaned key.
    pub(super) fn checks_each_step(&mut self) {
        let (now, t) = (self.now, self.t());
        for i in 0..self.clients.len() {
            if self.clients[i].holding.is_none() {
                self.clients[i].checks.reaction_due = None;
                continue;
            }
            // A paused process believes what it believed; it is judged when it wakes.
            if self.paused_until(i, t).is_some() {
                continue;
            }
            // A lagging driver learns of its deadline that much later.
            let lag = self.lag_around(i, t.saturating_sub(2 * WINDOW), t);
            if let Some(expiry) = self.clients[i].checks.lease_expiry.filter(|e| now >= *e + lag) {
                self.violation(format!(
                    "lease: client {i} still believes it holds {:?} after its lease ran out",
                    now - expiry
                ));
                self.clients[i].checks.lease_expiry = None;
            }
            if let Some(due) = self.clients[i].checks.reaction_due.filter(|d| t > *d) {
                self.clients[i].checks.reaction_due = None;
                let acted = due - REACTION;
                // A fault during the hold may have cost the monitor its read (a lost blocking
                // read is only noticed at its deadline, minutes on): the renewals, every half
                // TTL, then find the loss. Operator actions aside: the one reacted to is one.
                let since = self.clients[i].holding.map_or(acted, |h| self.holds[h].from);
                if !self.faulted(i, since.saturating_sub(self.clients[i].spec.ttl), t) {
                    self.violation(format!(
                        "reaction: client {i} still holds {:?} after an operator's action on its hold",
                        t - acted
                    ));
                }
            }
        }
        for i in 0..self.clients.len() {
            let m = &self.clients[i].machine;
            let ttl = self.clients[i].spec.ttl;
            // A session whose destroy could not get through stays until Consul expires it.
            if m.status() != LockStatus::Idle
                || !m.is_quiescent()
                || self.disturbed(i, t.saturating_sub(3 * ttl), t)
            {
                continue;
            }
            let name = format!("client-{i}");
            let orphan = self.sim.kv_entries().find_map(|e| {
                let session = e.session.as_deref()?;
                (self.sim.session(session)?.name == name).then(|| e.key.clone())
            });
            if let Some(key) = orphan {
                self.violation(format!(
                    "orphan: {key} is held by client {i}'s session, and client {i} is idle"
                ));
            }
        }
    }

    /// The longest lag of client `i`'s driver at any time in `[from, to]`.
    fn lag_around(&self, client: usize, from: Duration, to: Duration) -> Duration {
        self.scenario
            .faults
            .iter()
            .filter(|f| f.from <= to && f.from + f.lasting >= from)
            .filter_map(|f| match f.kind {
                FaultKind::Lag { client: c, lag } if c == client => Some(lag),
                _ => None,
            })
            .max()
            .unwrap_or_default()
    }

    /// An event of client `i`'s: retries paced by a growing, capped backoff; a try-once that
    /// waits its time; an error budget that ends the attempt.
    pub(super) fn checks_on_event(&mut self, i: usize, event: &LockEvent) {
        self.clients[i].checks.report_due = false;
        let (now, t) = (self.now, self.t());
        let spec = &self.clients[i].spec;
        match event {
            LockEvent::Retrying(retry) => {
                let pause = retry.next_try.saturating_duration_since(now);
                let failing = now.saturating_duration_since(retry.failing_since);
                let (try_once, budget) = (spec.try_once, spec.error_budget);
                if pause > RETRY_CAP + Duration::from_millis(1) {
                    self.violation(format!("retry: client {i} waits {pause:?} before its next try"));
                } else if retry.attempt >= 8
                    && pause < Duration::from_secs(1)
                    && try_once.is_none()
                    // A session lost during the outage is created again on the session's own
                    // backoff, which starts over (noticed, left: issue 15's note).
                    && !retry.cause.starts_with("session create")
                {
                    self.violation(format!(
                        "retry: client {i}'s try {} comes only {pause:?} after the last: no backoff",
                        retry.attempt
                    ));
                } else if failing > budget + Duration::from_millis(1) {
                    self.violation(format!(
                        "error budget: client {i} retries after {failing:?} of failures (budget {budget:?})"
                    ));
                }
            }
            // A semaphore's slot stands on its contender key (held by our session): without it
            // the others prune the slot away.
            LockEvent::Acquired(token) if matches!(self.target, Target::Semaphore { .. }) => {
                let key = format!(
                    "{}/{}",
                    self.scenario.key.trim_end_matches('/'),
                    token.session.as_str()
                );
                let ours = self
                    .sim
                    .kv(&key)
                    .is_some_and(|e| e.session.as_deref() == Some(token.session.as_str()));
                let since = self.clients[i].attempt_from;
                let excused = self.operator_actions.iter().any(|a| a.at >= since);
                if !ours && !excused {
                    self.violation(format!(
                        "semaphore: client {i} holds a slot without its contender key {key}"
                    ));
                }
            }
            // `Released` says the agent freed what we held: a lock's key no longer ours, a
            // semaphore's slot no longer counted (an operator's action aside).
            LockEvent::Released => {
                let session = self
                    .holds
                    .iter()
                    .rev()
                    .find(|h| h.client == i)
                    .map(|h| h.token.session.as_str().to_owned());
                let still = session.filter(|s| match self.target {
                    Target::Lock => self
                        .sim
                        .kv(&self.lock_key)
                        .is_some_and(|e| e.session.as_deref() == Some(s.as_str())),
                    // A holder is listed in the `.lock` and holds its contender key: the others
                    // prune a slot whose key is gone (a release may settle for deleting the key
                    // when the `.lock` keeps changing), and a key left for the session's end
                    // holds no slot.
                    Target::Semaphore { limit } => {
                        let listed = self
                            .sim
                            .kv(&self.lock_key)
                            .and_then(|e| SemaphoreState::decode(&e.value, limit).ok())
                            .is_some_and(|state| state.holders.contains_key(s.as_str()));
                        let keyed = self
                            .sim
                            .kv(&format!("{}/{s}", self.scenario.key.trim_end_matches('/')))
                            .is_some_and(|e| e.session.as_deref() == Some(s.as_str()));
                        listed && keyed
                    }
                });
                let since = self.clients[i].attempt_from;
                let excused = self.operator_actions.iter().any(|a| a.at >= since);
                if still.is_some() && !excused {
                    self.violation(format!(
                        "release: client {i} reported Released while the agent still counts it a holder"
                    ));
                }
            }
            LockEvent::GaveUp => {
                let waited = t.saturating_sub(self.clients[i].attempt_from);
                if let Some(wait) = spec.try_once.filter(|w| waited + Duration::from_millis(1) < *w) {
                    self.violation(format!(
                        "try-once: client {i} gave up after {waited:?} of its {wait:?}"
                    ));
                }
            }
            _ => {}
        }
    }

    /// Once the lock's key is free with no lock-delay in force (a release, a delete), a
    /// contender that was waiting for it, with no fault near, holds it within [`HANDOFF`] (a
    /// blocking read wakes on the write).
    pub(super) fn checks_handoff(&mut self) {
        let t = self.t();
        if !matches!(self.target, Target::Lock) {
            return;
        }
        // Freed when the agent says so: a waiter may see it before the holder hears that its
        // release went through.
        let holder = self.sim.kv(&self.lock_key).and_then(|e| e.session.clone());
        if self.key_session.is_some() && holder.is_none() {
            self.freed_at = Some(t);
        }
        self.key_session = holder;
        let Some(freed) = self.freed_at else { return };
        if self.stopped || self.holds.iter().any(|h| h.from >= freed) {
            self.freed_at = None;
            return;
        }
        if t <= freed + HANDOFF {
            return;
        }
        self.freed_at = None;
        let delay = self
            .sim
            .lock_delay_until(&self.lock_key)
            .is_some_and(|until| until + HANDOFF >= self.now);
        let waiting = (0..self.clients.len()).find(|&i| {
            let c = &self.clients[i];
            c.machine.status() == LockStatus::Acquiring
                && c.attempt_from + Duration::from_millis(100) < freed
                && c.spec.try_once.is_none_or(|w| c.attempt_from + w > t)
                && c.spec.cancel_after.is_none_or(|a| c.attempt_from + a > t)
                && !self.disturbed(i, freed.saturating_sub(2 * WINDOW), t)
                && !(c.spec.queued && self.line_disturbed(i, freed, t))
        });
        if let (Some(i), false) = (waiting, delay) {
            self.violation(format!(
                "handoff: the lock was released at {freed:?} and client {i}, waiting, does not hold it {:?} later",
                t - freed
            ));
        }
    }

    /// Whether a queued waiter's line may hold it up: another queued client that a fault cut off
    /// keeps its entry, so the line behind it, until its session expires (up to two TTLs); an
    /// operator who deleted the line is noticed within a blocking-read round.
    fn line_disturbed(&self, i: usize, freed: Duration, t: Duration) -> bool {
        let ttl = self.clients.iter().map(|c| c.spec.ttl).max().unwrap_or_default();
        let since = freed.saturating_sub(2 * ttl + 2 * WINDOW);
        let ahead_cut_off = (0..self.clients.len())
            .any(|j| j != i && self.clients[j].spec.queued && self.faulted(j, since, t));
        let wait = Duration::from_secs(15);
        let line_deleted =
            self.scenario.faults.iter().any(|f| {
                f.kind == FaultKind::DeleteQueue && f.from <= t && f.from + wait + 2 * WINDOW >= freed
            });
        ahead_cut_off || line_deleted
    }

    /// A semaphore contender lists itself in the `.lock` only while it holds its contender key
    /// (Go's protocol: the others prune a holder whose key is gone, so a slot without one is
    /// taken from under it).
    fn check_semaphore_write(&mut self, i: usize, request: &http::Request<Vec<u8>>) {
        let Target::Semaphore { limit } = self.target else {
            return;
        };
        if request.method() != http::Method::PUT
            || request.uri().path() != format!("/v1/kv/{}", self.lock_key)
        {
            return;
        }
        let Some(session) = self.clients[i]
            .machine
            .session_id()
            .map(|s| s.as_str().to_owned())
        else {
            return;
        };
        let listed =
            SemaphoreState::decode(request.body(), limit).is_ok_and(|s| s.holders.contains_key(&session));
        let key = format!("{}/{session}", self.scenario.key.trim_end_matches('/'));
        let held = self
            .sim
            .kv(&key)
            .is_some_and(|e| e.session.as_deref() == Some(session.as_str()));
        let t = self.t();
        let since = self.clients[i]
            .attempt_from
            .saturating_sub(2 * self.clients[i].spec.ttl);
        // What can take a correct contender's key away: its session's end (a fault that costs
        // it renewals), an operator, a restart. Not a refused acquire: that one only tempts a
        // contender to write itself in without a key.
        let lost_key = self.operator_actions.iter().any(|a| a.at >= since && a.at <= t)
            || self.faulted_by(i, since, t, |k| {
                !matches!(
                    k,
                    FaultKind::RefuseAcquire { .. } | FaultKind::Duplicate { .. } | FaultKind::Reorder { .. }
                )
            });
        if listed && !held && !lost_key {
            self.violation(format!(
                "semaphore: client {i} lists itself in the .lock without its contender key {key}"
            ));
        }
    }
}
