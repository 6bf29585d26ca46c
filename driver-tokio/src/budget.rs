//! The client's connection budget: every request of a [`Client`](crate::Client) goes through a
//! bounded number of concurrent requests (so of HTTP/1.1 connections), part of which only prompt
//! requests may use, so that blocking reads can never starve a session's renewals.
//!
//! Why: each held lock keeps a monitor read parked on the agent, and HTTP/1.1 carries one
//! request per connection. Unbounded, 300 locks on one client opened more connections than
//! Consul's default `limits.http_max_conns_per_client` (200) allows; the agent refused the rest,
//! renewals among them, and every held lock was lost, again and again (BENCHMARKS.md, scale).
//!
//! Blocking reads take turns on their share. A read that starts while others wait for a turn (or
//! while more than half the share is busy) has its `wait` cut to [`TURN`], so that the queue
//! moves; the waiting reads are served earliest deadline first, so a waiting lock's short read
//! goes before monitors that can wait longer; and any read's wait is cut to end before its
//! deadline, so time spent queued here is never taken by the machine for an agent that hangs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use consul_lock_core::api::RequestClass;
use consul_lock_core::machine::QUICK_ANSWER;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// How many requests a [`Client`](crate::Client) may have in flight at once (each one an HTTP/1.1
/// connection to the agent), and how many of them only prompt requests may use.
///
/// Prompt requests (session create, renew and destroy, lock transactions, releases, plain reads)
/// may use all `connections`; blocking reads (a waiting lock's read of the key, a held lock's
/// monitor) at most `connections - reserved`, and queue for a turn beyond that. So a renewal
/// never waits for a blocking read to end, however many locks the client holds.
///
/// The default, 64 connections of which 16 are reserved, stays well under Consul's default
/// `limits.http_max_conns_per_client` (200, counted per client IP address: every process on a
/// host shares it), leaving room for other clients on the same host. Sixteen prompt requests at
/// once is far more than renewals need (1,000 locks renew about 130 times a second, each a
/// millisecond or two on a local agent), and covers a burst such as many locks starting at once.
/// The other 48 carry 48 parked blocking reads: with more locks than that, their monitors take
/// turns (see ARCHITECTURE.md, Drivers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBudget {
    connections: usize,
    reserved: usize,
}

/// A [`ConnectionBudget`] that can't work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "connection budget of {connections} with {reserved} reserved for prompt requests: \
     it needs at least 1 reserved and at least 1 left for blocking reads"
)]
pub struct BudgetError {
    /// The connections asked for.
    pub connections: usize,
    /// The reserve asked for.
    pub reserved: usize,
}

impl ConnectionBudget {
    /// The default number of connections: see the type's documentation.
    pub const DEFAULT_CONNECTIONS: usize = 64;
    /// The default reserve for prompt requests.
    pub const DEFAULT_RESERVED: usize = 16;

    /// `connections` in all, `reserved` of them for prompt requests only. Both parts must be at
    /// least one: without a reserve blocking reads could take every connection, and without room
    /// for blocking reads no lock could wait or be monitored.
    pub fn new(connections: usize, reserved: usize) -> Result<ConnectionBudget, BudgetError> {
        if reserved == 0 || reserved >= connections {
            return Err(BudgetError {
                connections,
                reserved,
            });
        }
        Ok(ConnectionBudget {
            connections,
            reserved,
        })
    }

    /// The requests (connections) in flight at most.
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// The connections only prompt requests may use.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// The connections blocking reads may hold at once.
    pub fn blocking_share(&self) -> usize {
        self.connections - self.reserved
    }
}

impl Default for ConnectionBudget {
    fn default() -> ConnectionBudget {
        ConnectionBudget {
            connections: Self::DEFAULT_CONNECTIONS,
            reserved: Self::DEFAULT_RESERVED,
        }
    }
}

/// The wait a blocking read is cut to when others wait for a turn. Short, so that monitors beyond
/// the blocking share come round often (each turn can see a change that happened meanwhile: the
/// read carries the index it last saw); not shorter than [`QUICK_ANSWER`], below which the
/// machine would take the answer for an agent that answers at once.
pub(crate) const TURN: Duration = Duration::from_secs(2);

/// What a cut read keeps between the end of its wait and its deadline: Consul's jitter is added
/// on top (wait/16), and the network and a busy agent take the rest.
const CUT_MARGIN: Duration = Duration::from_secs(4);

const _: () = assert!(TURN.as_millis() >= QUICK_ANSWER.as_millis());

/// The budget at work: a semaphore for every request, and the turns of blocking reads.
#[derive(Debug)]
pub(crate) struct Gate {
    budget: ConnectionBudget,
    all: Arc<Semaphore>,
    turns: Arc<Turns>,
}

/// What a request holds while it is in flight: dropped (answered, timed out, cancelled, or its
/// task gone), it gives its place back.
#[derive(Debug)]
pub(crate) struct Pass {
    _all: OwnedSemaphorePermit,
    _turn: Option<TurnPermit>,
    /// The wait a blocking read should go out with, when shorter than its own.
    pub(crate) cut_wait: Option<Duration>,
}

impl Gate {
    pub(crate) fn new(budget: ConnectionBudget) -> Gate {
        Gate {
            budget,
            all: Arc::new(Semaphore::new(budget.connections)),
            turns: Arc::new(Turns {
                share: budget.blocking_share(),
                state: Mutex::new(TurnState {
                    free: budget.blocking_share(),
                    next: 0,
                    waiting: BinaryHeap::new(),
                }),
            }),
        }
    }

    pub(crate) fn budget(&self) -> ConnectionBudget {
        self.budget
    }

    /// The requests in flight within the budget now (those waiting for room not counted).
    pub(crate) fn in_flight(&self) -> usize {
        self.budget.connections - self.all.available_permits()
    }

    /// Waits for room for a request of `class` due by `deadline`. `None` only if the gate was
    /// closed, which never happens while a client exists.
    pub(crate) async fn enter(&self, class: RequestClass, deadline: Instant) -> Option<Pass> {
        let (turn, wait) = match class {
            RequestClass::BlockingRead { wait } => {
                let (turn, contended) = self.turns.take(deadline).await?;
                (Some(turn), Some((wait, contended)))
            }
            _ => (None, None),
        };
        let all = self.all.clone().acquire_owned().await.ok()?;
        let cut_wait = wait.and_then(|(wait, contended)| cut(wait, contended, deadline, Instant::now()));
        Some(Pass {
            _all: all,
            _turn: turn,
            cut_wait,
        })
    }
}

/// The wait a blocking read of `wait` starting at `now` goes out with, if it must be shorter:
/// [`TURN`] when contended, and in any case short enough to be answered before its deadline.
fn cut(wait: Duration, contended: bool, deadline: Instant, now: Instant) -> Option<Duration> {
    let mut target = wait;
    if contended {
        target = target.min(TURN);
    }
    // Consul may hold a read for wait + wait/16.
    let fits = deadline.saturating_duration_since(now).saturating_sub(CUT_MARGIN) * 16 / 17;
    target = target.min(fits).max(Duration::from_millis(1));
    (target < wait).then_some(target)
}

/// The blocking reads' share: a count of free turns and the reads waiting for one, earliest
/// deadline first (then in order of arrival).
#[derive(Debug)]
struct Turns {
    share: usize,
    state: Mutex<TurnState>,
}

#[derive(Debug)]
struct TurnState {
    free: usize,
    next: u64,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    deadline: Instant,
    seq: u64,
    grant: oneshot::Sender<TurnPermit>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Waiter) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Waiter) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    fn cmp(&self, other: &Waiter) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

/// One blocking read's turn; dropped, it goes to the next waiting read (or back to the pool).
#[derive(Debug)]
pub(crate) struct TurnPermit {
    turns: Option<Arc<Turns>>,
}

impl Drop for TurnPermit {
    fn drop(&mut self) {
        if let Some(turns) = self.turns.take() {
            turns.give_back();
        }
    }
}

impl Turns {
    /// A turn, and whether the read takes it under contention (it waited, or more than half the
    /// share is busy).
    async fn take(self: &Arc<Self>, deadline: Instant) -> Option<(TurnPermit, bool)> {
        let granted = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            // Waiting reads exist only while no turn is free: `give_back` hands a turn to a
            // waiting read before it counts one free.
            if state.free > 0 {
                state.free -= 1;
                let busy = self.share - state.free;
                let permit = TurnPermit {
                    turns: Some(self.clone()),
                };
                return Some((permit, busy * 2 > self.share));
            }
            let (grant, granted) = oneshot::channel();
            let seq = state.next;
            state.next += 1;
            state.waiting.push(Reverse(Waiter { deadline, seq, grant }));
            granted
        };
        // Dropped while waiting (the request was cancelled), the waiter stays queued until its
        // turn comes; the turn then goes to the next one (see `give_back`). A turn already handed
        // over goes back when the channel holding it is dropped.
        let permit = granted.await.ok()?;
        Some((permit, true))
    }

    fn give_back(self: &Arc<Self>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Reverse(waiter)) = state.waiting.pop() {
            let permit = TurnPermit {
                turns: Some(self.clone()),
            };
            match waiter.grant.send(permit) {
                Ok(()) => return,
                // That read is gone; disarmed, so that dropping the permit here (under the lock)
                // does not give the turn back a second time.
                Err(mut unused) => {
                    unused.turns = None;
                }
            }
        }
        state.free += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    fn blocking(secs: u64) -> RequestClass {
        RequestClass::BlockingRead {
            wait: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_budget_needs_a_reserve_and_room_for_blocking_reads() {
        assert!(ConnectionBudget::new(64, 16).is_ok());
        assert_eq!(ConnectionBudget::new(4, 0).unwrap_err().reserved, 0);
        assert!(ConnectionBudget::new(4, 4).is_err());
        assert!(ConnectionBudget::new(0, 0).is_err());
        assert_eq!(ConnectionBudget::default().blocking_share(), 48);
    }

    #[test]
    fn a_read_keeps_its_wait_uncontended_and_is_cut_to_a_turn_or_its_deadline() {
        let now = Instant::now();
        let wait = Duration::from_secs(300);
        // A monitor's deadline: wait + wait/16 + 5 s.
        let deadline = now + wait + wait / 16 + Duration::from_secs(5);
        assert_eq!(cut(wait, false, deadline, now), None);
        assert_eq!(cut(wait, true, deadline, now), Some(TURN));
        // Queued until 10 s before its deadline: cut to end before it, whatever the contention.
        let late = deadline - Duration::from_secs(10);
        let cut_late = cut(wait, false, deadline, late).unwrap();
        assert!(
            cut_late + cut_late / 16 + CUT_MARGIN <= Duration::from_secs(10),
            "{cut_late:?}"
        );
    }

    #[tokio::test]
    async fn prompt_requests_keep_their_reserve_while_blocking_reads_queue() {
        let gate = Gate::new(ConnectionBudget::new(3, 1).unwrap());
        let far = Instant::now() + Duration::from_secs(600);
        let a = gate.enter(blocking(300), far).await.unwrap();
        let b = gate.enter(blocking(300), far).await.unwrap();
        // The share (2) is full: the third blocking read waits...
        let third = gate.enter(blocking(300), far);
        tokio::pin!(third);
        assert!(third.as_mut().now_or_never().is_none());
        // ...and a prompt request gets the reserved connection at once.
        let prompt = gate.enter(RequestClass::Prompt, far).await.unwrap();
        assert_eq!(prompt.cut_wait, None);
        drop(a);
        let c = third.await.unwrap();
        // It waited for its turn, so its wait is cut.
        assert_eq!(c.cut_wait, Some(TURN));
        drop((b, c, prompt));
        assert_eq!(gate.all.available_permits(), 3);
    }

    #[tokio::test]
    async fn waiting_reads_go_earliest_deadline_first_and_cancelled_ones_give_their_turn_on() {
        let gate = Gate::new(ConnectionBudget::new(2, 1).unwrap());
        let now = Instant::now();
        let held = gate
            .enter(blocking(300), now + Duration::from_secs(600))
            .await
            .unwrap();
        let late = gate.enter(blocking(300), now + Duration::from_secs(300));
        let early = gate.enter(blocking(15), now + Duration::from_secs(20));
        let mut cancelled = Box::pin(gate.enter(blocking(15), now + Duration::from_secs(10)));
        tokio::pin!(late, early);
        assert!(late.as_mut().now_or_never().is_none());
        assert!(early.as_mut().now_or_never().is_none());
        assert!(cancelled.as_mut().now_or_never().is_none());
        // The earliest deadline gave up waiting: its turn passes to the next.
        drop(cancelled);
        drop(held);
        let first = early.await.unwrap();
        assert!(late.as_mut().now_or_never().is_none());
        drop(first);
        let second = late.await.unwrap();
        drop(second);
        assert_eq!(gate.turns.state.lock().unwrap().free, 1);
    }
}
