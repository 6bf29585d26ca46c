//! The session a lock stands on: create it, renew it every half hold window (TTL/2 by default),
//! notice when it may be gone, destroy it when done.
//!
//! The renew deadline is the safety rule Go's client lacks (hashicorp/consul#18271): Consul frees
//! a session's keys no earlier than TTL after the last renew it saw, and a renew can't be seen
//! before it was sent. So if no renew has been acknowledged for TTL, counted from the *send* time
//! of the last acknowledged one, someone else may be about to hold the key, and the holder must
//! stop, whatever else it hears or doesn't.
//!
//! A session bound to health checks (Consul's default, `serfHealth`) can end sooner: at any
//! moment after that renew, if its node is marked failed, and then only the lock-delay keeps the
//! keys from others. So the deadline counts the *hold window*
//! ([`SessionOptions::hold_window`](crate::machine::SessionOptions::hold_window)), the TTL or the
//! lock-delay, whichever is shorter, and renewals come every half of it.

use std::time::{Duration, Instant};

use crate::api::{ApiError, SessionCreate, SessionDestroy, SessionEntry, SessionId, SessionRenew};
use crate::machine::backoff::{Backoff, Rng};
use crate::machine::classify::{Failure, decode};
use crate::machine::options::hold_window;
use crate::machine::outbox::{Outbox, Pending};
use crate::machine::{Reply, RequestId};

/// Go retries a failed renew every second; so do we, until the deadline.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// Something the session machine reports to the machine that uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The session exists and may be used.
    Ready(SessionId),
    /// The session is gone, or may be: its keys must be taken as lost.
    Lost(SessionLoss),
    /// The session could not be created, for a reason that retrying won't fix.
    CreateFailed(ApiError),
    /// A create failed for a reason that may pass; it is tried again at `next_try`.
    CreateRetry {
        /// What failed.
        cause: String,
        /// When the next create goes out.
        next_try: Instant,
    },
    /// The session was destroyed (or was the caller's, and was let go).
    Stopped,
}

/// Why a session is taken as lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionLoss {
    /// Consul answered a renew with 404: the session expired or was destroyed.
    Invalidated,
    /// No renew was acknowledged within the hold window: the TTL, or the lock-delay when that
    /// is shorter and health checks bind the session
    /// ([`SessionOptions::hold_window`](crate::machine::SessionOptions::hold_window)).
    RenewDeadline {
        /// How long since the last acknowledged renew was sent.
        since_ack: Duration,
    },
}

/// Where a session machine stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStatus {
    /// No session.
    Idle,
    /// Creating one.
    Creating,
    /// A session is in use.
    Active,
    /// Destroying it.
    Destroying,
}

/// The lease on an owned session: what renewal needs to know.
#[derive(Clone, Debug)]
struct Lease {
    ttl: Duration,
    /// The TTL or less: how long after `acked_sent_at` the keys are surely still ours.
    window: Duration,
    /// Send time of the last acknowledged renew (or of the create).
    acked_sent_at: Instant,
    renew: Renew,
}

impl Lease {
    fn new(ttl: Duration, guard: Option<Duration>, acked_sent_at: Instant) -> Lease {
        let window = hold_window(ttl, guard);
        Lease {
            ttl,
            window,
            acked_sent_at,
            renew: Renew::At(acked_sent_at + window / 2),
        }
    }

    fn deadline(&self) -> Instant {
        self.acked_sent_at + self.window
    }
}

#[derive(Clone, Debug)]
enum Renew {
    At(Instant),
    InFlight(Pending),
}

#[derive(Clone, Debug)]
enum State {
    Idle,
    Creating {
        pending: Pending,
        stop_when_created: bool,
    },
    CreatePause {
        until: Instant,
    },
    /// `lease` is `None` for the caller's session, which the machine neither renews nor destroys.
    Active {
        id: SessionId,
        lease: Option<Lease>,
    },
    Destroying {
        pending: Pending,
        teardown: Teardown,
    },
    /// A destroy failed; the next try is due at `until`.
    DestroyPause {
        until: Instant,
        teardown: Teardown,
    },
}

/// A destroy under way: which session, until when it is worth retrying, and what the user was
/// told.
#[derive(Clone, Debug)]
struct Teardown {
    id: SessionId,
    /// Past this instant the server should have invalidated the session on its own (2×TTL after
    /// the last renew that could still arrive), so retrying is left off. Consul's TTL clocks live
    /// on the leader and restart at each election, so under repeated elections the session can
    /// last longer (ARCHITECTURE.md, Known limits).
    retry_until: Instant,
    /// `Stopped` was reported already (after the first failed attempt): the user's unlock or
    /// cancel does not wait for the retries.
    reported: bool,
    /// Create a new session once this one is gone.
    restart: bool,
}

/// Keeps one Consul session alive for the machines that hold keys with it.
///
/// A lock uses a session rather than owning the idea of one: Consul lets one session hold many
/// keys, so the session's life (create, renew, deadline, destroy) is its own machine.
#[derive(Clone, Debug)]
pub struct SessionMachine {
    /// `Err` holds the caller's session.
    source: Result<SessionCreate, SessionId>,
    /// How long the keys stay ours after a failed check ends the session early; `None`: no
    /// check binds it, only the TTL ends it (`SessionOptions::early_end_guard`).
    guard: Option<Duration>,
    request_timeout: Duration,
    state: State,
    backoff: Backoff,
}

impl SessionMachine {
    pub(crate) fn new(
        source: Result<SessionCreate, SessionId>,
        guard: Option<Duration>,
        request_timeout: Duration,
    ) -> SessionMachine {
        SessionMachine {
            source,
            guard,
            request_timeout,
            state: State::Idle,
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
        }
    }

    /// Where the machine stands.
    pub fn status(&self) -> SessionStatus {
        match &self.state {
            State::Idle => SessionStatus::Idle,
            State::Creating { .. } | State::CreatePause { .. } => SessionStatus::Creating,
            State::Active { .. } => SessionStatus::Active,
            State::Destroying { .. } | State::DestroyPause { .. } => SessionStatus::Destroying,
        }
    }

    /// Whether the session is the caller's (neither renewed nor destroyed by the machine).
    pub(crate) fn is_callers(&self) -> bool {
        self.source.is_err()
    }

    /// The session in use, if any.
    pub fn id(&self) -> Option<&SessionId> {
        match &self.state {
            State::Active { id, .. } => Some(id),
            _ => None,
        }
    }

    /// The instant by which a renew must be acknowledged, for a session the machine renews: the
    /// send time of the last acknowledged renew plus the [hold window](Self::hold_window).
    pub fn renew_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Active {
                lease: Some(lease), ..
            } => Some(lease.deadline()),
            _ => None,
        }
    }

    /// How long after a renew is sent the session's keys stay its holder's for certain, for a
    /// session the machine renews: the TTL in force, or the lock-delay when that is shorter and
    /// health checks bind the session. Renewals go every half of it.
    pub fn hold_window(&self) -> Option<Duration> {
        match &self.state {
            State::Active {
                lease: Some(lease), ..
            } => Some(lease.window),
            _ => None,
        }
    }

    /// The TTL in force (the server may raise it), for a session the machine renews.
    pub fn ttl(&self) -> Option<Duration> {
        match &self.state {
            State::Active {
                lease: Some(lease), ..
            } => Some(lease.ttl),
            _ => None,
        }
    }

    /// Whether a renew is outstanding.
    pub fn renew_in_flight(&self) -> bool {
        matches!(
            &self.state,
            State::Active {
                lease: Some(Lease {
                    renew: Renew::InFlight(_),
                    ..
                }),
                ..
            }
        )
    }

    /// Gets a session going: creates one, or takes up the caller's.
    pub(crate) fn start<E>(&mut self, now: Instant, out: &mut Outbox<E>, rng: &mut Rng) -> Vec<SessionEvent> {
        match &mut self.state {
            State::Idle => self.create(now, out, rng),
            State::Destroying { teardown, .. } => {
                teardown.restart = true;
                Vec::new()
            }
            // The old session's teardown keeps failing: leave it to expire on the server, and
            // don't make the new attempt wait for that.
            State::DestroyPause { .. } => {
                self.state = State::Idle;
                self.create(now, out, rng)
            }
            State::Creating {
                stop_when_created, ..
            } => {
                *stop_when_created = false;
                Vec::new()
            }
            State::CreatePause { .. } => Vec::new(),
            State::Active { id, .. } => vec![SessionEvent::Ready(id.clone())],
        }
    }

    fn create<E>(&mut self, now: Instant, out: &mut Outbox<E>, _rng: &mut Rng) -> Vec<SessionEvent> {
        match &self.source {
            Err(id) => {
                self.state = State::Active {
                    id: id.clone(),
                    lease: None,
                };
                vec![SessionEvent::Ready(id.clone())]
            }
            Ok(request) => {
                let deadline = now + self.request_timeout;
                let id = out.send(request, deadline);
                self.state = State::Creating {
                    pending: Pending {
                        id,
                        sent_at: now,
                        deadline,
                    },
                    stop_when_created: false,
                };
                Vec::new()
            }
        }
    }

    /// Ends the session: destroys an owned one, lets go of the caller's.
    /// Reports [`SessionEvent::Stopped`] at once when there is nothing to destroy, so a caller
    /// waiting for it never waits in vain.
    pub(crate) fn stop<E>(&mut self, now: Instant, out: &mut Outbox<E>) -> Vec<SessionEvent> {
        match &mut self.state {
            State::Idle => vec![SessionEvent::Stopped],
            State::Creating {
                stop_when_created, ..
            } => {
                *stop_when_created = true;
                Vec::new()
            }
            State::CreatePause { .. } => {
                self.state = State::Idle;
                vec![SessionEvent::Stopped]
            }
            State::Destroying { teardown, .. } => {
                teardown.restart = false;
                if teardown.reported {
                    vec![SessionEvent::Stopped]
                } else {
                    Vec::new()
                }
            }
            State::DestroyPause { teardown, .. } => {
                teardown.restart = false;
                vec![SessionEvent::Stopped]
            }
            State::Active { id, lease } => {
                let Some(lease) = lease else {
                    self.state = State::Idle;
                    return vec![SessionEvent::Stopped];
                };
                let (id, ttl) = (id.clone(), lease.ttl);
                self.destroy(now, id, ttl, out);
                Vec::new()
            }
        }
    }

    /// The TTL asked for at creation (Go's default when none).
    fn asked_ttl(&self) -> Duration {
        match &self.source {
            Ok(request) => request.ttl.unwrap_or(Duration::from_secs(15)),
            Err(_) => Duration::from_secs(15),
        }
    }

    /// Destroys session `id` (of time to live `ttl`), retrying on failure until it must be gone.
    fn destroy<E>(&mut self, now: Instant, id: SessionId, ttl: Duration, out: &mut Outbox<E>) {
        let teardown = Teardown {
            id,
            retry_until: now + self.request_timeout + 2 * ttl,
            reported: false,
            restart: false,
        };
        self.send_destroy(now, teardown, out);
    }

    fn send_destroy<E>(&mut self, now: Instant, teardown: Teardown, out: &mut Outbox<E>) {
        let deadline = now + self.request_timeout;
        let req = out.send(
            &SessionDestroy {
                id: teardown.id.clone(),
            },
            deadline,
        );
        self.state = State::Destroying {
            pending: Pending {
                id: req,
                sent_at: now,
                deadline,
            },
            teardown,
        };
    }

    /// Consul said (e.g. in an acquire's 500) that it no longer knows the session: drop it and
    /// start again.
    pub(crate) fn forget<E>(
        &mut self,
        now: Instant,
        out: &mut Outbox<E>,
        rng: &mut Rng,
    ) -> Vec<SessionEvent> {
        if self.source.is_err() {
            return Vec::new();
        }
        self.state = State::Idle;
        self.create(now, out, rng)
    }

    /// The requests this machine waits for.
    pub(crate) fn pending(&self) -> Option<Pending> {
        match &self.state {
            State::Creating { pending, .. } | State::Destroying { pending, .. } => Some(*pending),
            State::Active {
                lease:
                    Some(Lease {
                        renew: Renew::InFlight(pending),
                        ..
                    }),
                ..
            } => Some(*pending),
            _ => None,
        }
    }

    /// The next instant the machine needs `handle_timeout`.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Idle => None,
            State::Creating { pending, .. } | State::Destroying { pending, .. } => Some(pending.deadline),
            State::DestroyPause { until, .. } => Some(*until),
            State::CreatePause { until } => Some(*until),
            State::Active { lease: None, .. } => None,
            State::Active {
                lease: Some(lease), ..
            } => Some(match &lease.renew {
                Renew::At(at) => (*at).min(lease.deadline()),
                Renew::InFlight(p) => p.deadline.min(lease.deadline()),
            }),
        }
    }

    /// Timers: send a due renew, give up on the deadline, retry a paused create. Requests past
    /// their deadline are handled by the caller, as transport timeouts.
    pub(crate) fn handle_timeout<E>(
        &mut self,
        now: Instant,
        out: &mut Outbox<E>,
        rng: &mut Rng,
    ) -> Vec<SessionEvent> {
        match &mut self.state {
            State::CreatePause { until } if now >= *until => self.create(now, out, rng),
            State::DestroyPause { until, teardown } if now >= *until => {
                let teardown = teardown.clone();
                self.send_destroy(now, teardown, out);
                Vec::new()
            }
            State::Active {
                id,
                lease: Some(lease),
            } => {
                if now >= lease.deadline() {
                    return self.check_deadline(now, out);
                }
                if let Renew::At(at) = lease.renew {
                    if now >= at {
                        let deadline = (now + self.request_timeout).min(lease.deadline());
                        let req = out.send(&SessionRenew { id: id.clone() }, deadline);
                        lease.renew = Renew::InFlight(Pending {
                            id: req,
                            sent_at: now,
                            deadline,
                        });
                    }
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The renew deadline, applied to every input (timeouts and replies alike), so that no reply
    /// can leave the session counted alive past it: declares the loss and destroys the session
    /// (the server may still think it alive, in a partition: the destroy frees its keys as soon
    /// as the server hears from us again).
    pub(crate) fn check_deadline<E>(&mut self, now: Instant, out: &mut Outbox<E>) -> Vec<SessionEvent> {
        let State::Active {
            id,
            lease: Some(lease),
        } = &self.state
        else {
            return Vec::new();
        };
        if now < lease.deadline() {
            return Vec::new();
        }
        let since_ack = now.saturating_duration_since(lease.acked_sent_at);
        tracing::warn!(session = %id, ?since_ack, "no renew acknowledged within the TTL");
        let (id, ttl) = (id.clone(), lease.ttl);
        self.destroy(now, id, ttl, out);
        vec![SessionEvent::Lost(SessionLoss::RenewDeadline { since_ack })]
    }

    /// A reply to one of this machine's requests; `None` when `id` is not one of them.
    pub(crate) fn handle_response<E>(
        &mut self,
        now: Instant,
        id: RequestId,
        reply: &Reply,
        out: &mut Outbox<E>,
        rng: &mut Rng,
    ) -> Option<Vec<SessionEvent>> {
        let pending = self.pending().filter(|p| p.is(id))?;
        let events = match &mut self.state {
            State::Creating {
                stop_when_created, ..
            } => {
                let stop = *stop_when_created;
                match decode::<SessionCreate>(reply) {
                    Ok(session) => {
                        self.backoff.reset();
                        tracing::debug!(%session, "session created");
                        if stop {
                            let ttl = self.asked_ttl();
                            self.destroy(now, session, ttl, out);
                            return Some(Vec::new());
                        }
                        let ttl = match &self.source {
                            Ok(request) => request.ttl,
                            Err(_) => None,
                        };
                        let lease = ttl.map(|ttl| Lease::new(ttl, self.guard, pending.sent_at));
                        self.state = State::Active {
                            id: session.clone(),
                            lease,
                        };
                        vec![SessionEvent::Ready(session)]
                    }
                    Err(_) if stop => {
                        self.state = State::Idle;
                        vec![SessionEvent::Stopped]
                    }
                    Err(Failure::Transient(why)) => {
                        let pause = self.backoff.next(rng);
                        tracing::debug!(%why, ?pause, "session create failed; retrying");
                        self.state = State::CreatePause { until: now + pause };
                        vec![SessionEvent::CreateRetry {
                            cause: format!("session create: {why}"),
                            next_try: now + pause,
                        }]
                    }
                    Err(Failure::Fatal(e)) => {
                        tracing::warn!(error = %e, "session create refused");
                        self.state = State::Idle;
                        vec![SessionEvent::CreateFailed(e)]
                    }
                }
            }
            State::Destroying { teardown, .. } => {
                let mut teardown = teardown.clone();
                let mut events = Vec::new();
                if !teardown.reported {
                    teardown.reported = true;
                    events.push(SessionEvent::Stopped);
                }
                match decode::<SessionDestroy>(reply) {
                    Err(Failure::Transient(why)) if now < teardown.retry_until && !teardown.restart => {
                        // A key the session holds stays held until the destroy lands or the
                        // session expires: keep trying, in the background.
                        let pause = self.backoff.next(rng);
                        tracing::warn!(%why, ?pause, session = %teardown.id, "session destroy failed; retrying");
                        self.state = State::DestroyPause {
                            until: (now + pause).min(teardown.retry_until),
                            teardown,
                        };
                        return Some(events);
                    }
                    Err(why) => {
                        // Nobody renews it any more, so Consul ends it within 2×TTL regardless.
                        tracing::warn!(?why, session = %teardown.id, "session destroy failed; it will expire on its own");
                    }
                    Ok(_) => {}
                }
                self.backoff.reset();
                self.state = State::Idle;
                if teardown.restart {
                    events.extend(self.create(now, out, rng));
                }
                events
            }
            State::Active {
                id,
                lease: Some(lease),
            } => match decode::<SessionRenew>(reply) {
                Ok(Some(entry)) => {
                    *lease = Lease::new(renewed_ttl(&entry, lease.ttl), self.guard, pending.sent_at);
                    Vec::new()
                }
                Ok(None) => {
                    tracing::warn!(session = %id, "session invalidated (renew answered 404)");
                    self.state = State::Idle;
                    vec![SessionEvent::Lost(SessionLoss::Invalidated)]
                }
                Err(why) => {
                    let retry_at = (now + RENEW_RETRY).min(lease.deadline());
                    tracing::warn!(session = %id, ?why, "renew failed; retrying");
                    lease.renew = Renew::At(retry_at);
                    Vec::new()
                }
            },
            State::Idle
            | State::CreatePause { .. }
            | State::DestroyPause { .. }
            | State::Active { lease: None, .. } => Vec::new(),
        };
        Some(events)
    }
}

/// The TTL to renew by: the server's, which it may raise under load. It is the server that
/// invalidates the session, so its figure is the one the deadline must follow, as long as it is
/// one Consul could mean: a figure outside Consul's range would switch the renew deadline off
/// (fuzz finding F3), so the TTL in force is kept then.
fn renewed_ttl(entry: &SessionEntry, in_force: Duration) -> Duration {
    entry
        .ttl
        .filter(|ttl| crate::machine::options::SESSION_TTL_RANGE.contains(ttl))
        .unwrap_or(in_force)
}
