//! What the holding machines (lock, semaphore) share about their requests: each request's
//! deadline, the index of blocking reads, and a `now` that never runs backwards.

use std::time::{Duration, Instant};

use crate::api::Endpoint;
use crate::machine::outbox::{Outbox, Pending, Pendings};
use crate::machine::{Reply, RequestId, TransportError, TransportErrorKind};

/// Slack added to a blocking read's deadline beyond `wait + wait/16`, for the network and a busy
/// server.
pub(crate) const READ_MARGIN: Duration = Duration::from_secs(5);

/// A blocking read answered without news sooner than this (or than half its wait, if that is
/// shorter) came back "at once": an agent doing that must not make a machine spin, so the next
/// read waits (and, while acquiring, the try counts as failed). Answered later, it is an ordinary
/// answer: so a driver may shorten a blocking read's wait to no less than this without the
/// machine taking it for a misbehaving agent, whatever time the read spent in the driver's queue.
pub const QUICK_ANSWER: Duration = Duration::from_secs(1);

/// Whether a blocking read of `wait` answered `elapsed` after it was sent came back at once
/// (see [`QUICK_ANSWER`]).
pub(crate) fn quick(elapsed: Duration, wait: Duration) -> bool {
    elapsed < (wait / 2).min(QUICK_ANSWER)
}

/// Sends `endpoint` with a deadline fit for it: a blocking read (`wait` given) gets its wait plus
/// Consul's jitter (wait/16) plus [`READ_MARGIN`]; anything else `request_timeout`.
pub(crate) fn send<E>(
    out: &mut Outbox<E>,
    now: Instant,
    endpoint: &impl Endpoint,
    wait: Option<Duration>,
    request_timeout: Duration,
) -> Pending {
    let budget = match wait {
        Some(w) => w + w / 16 + READ_MARGIN,
        None => request_timeout,
    };
    let deadline = now + budget;
    let id = out.send(endpoint, deadline);
    Pending {
        id,
        sent_at: now,
        deadline,
    }
}

/// Takes in a read's index: reset when it went backwards (a server restored from a snapshot or
/// another server answering), and tells whether it moved.
pub(crate) fn next_index(sent: u64, got: u64) -> (u64, bool) {
    if got < sent { (0, false) } else { (got, got > sent) }
}

/// Records `now` in `last_now`, never letting time run backwards inside a machine: a `now`
/// earlier than the latest one seen is taken as the latest.
pub(crate) fn observe(last_now: &mut Option<Instant>, now: Instant) -> Instant {
    let now = match *last_now {
        Some(last) if last > now => last,
        _ => now,
    };
    *last_now = Some(now);
    now
}

/// When a machine needs `handle_timeout` next: the earliest of its `timers` and its requests'
/// deadlines, never earlier than the latest `now` it was given (`last_now`).
pub(crate) fn next_timeout(
    timers: impl IntoIterator<Item = Instant>,
    pendings: &Pendings,
    last_now: Option<Instant>,
) -> Option<Instant> {
    let earliest = timers
        .into_iter()
        .chain(pendings.iter().map(|p| p.deadline))
        .min()?;
    Some(last_now.map_or(earliest, |last| earliest.max(last)))
}

/// The requests of `pendings` whose deadline has passed at `now`: the machine answers each
/// with [`deadline_passed`].
pub(crate) fn overdue(pendings: &Pendings, now: Instant) -> Vec<RequestId> {
    pendings
        .iter()
        .filter(|p| now >= p.deadline)
        .map(|p| p.id)
        .collect()
}

/// What a machine tells itself about a request past its deadline that the driver never
/// answered.
pub(crate) fn deadline_passed() -> Reply {
    Err(TransportError::new(
        TransportErrorKind::Timeout,
        "no reply by the request's deadline",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_move_forward_or_reset() {
        assert_eq!(next_index(5, 7), (7, true));
        assert_eq!(next_index(5, 5), (5, false));
        assert_eq!(next_index(5, 3), (0, false));
        assert_eq!(next_index(0, 0), (0, false));
    }

    #[test]
    fn an_answer_is_quick_below_a_second_or_half_the_wait() {
        let s = Duration::from_secs;
        assert!(quick(Duration::from_millis(999), s(300)));
        assert!(!quick(s(1), s(300)));
        assert!(!quick(s(2), s(15)));
        assert!(quick(Duration::from_millis(49), Duration::from_millis(100)));
        assert!(!quick(Duration::from_millis(50), Duration::from_millis(100)));
    }
}
