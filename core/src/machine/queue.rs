//! A queued lock's wait ([`Waiting::Queue`](crate::machine::Waiting::Queue)): contenders line up
//! under the lock key, each watching only the entry just ahead of it, so that a handoff wakes
//! one waiter instead of all of them. The head of the line acquires the key as an unqueued lock
//! does (`lock.rs`), so the key's session alone keeps the lock safe: the line only orders who
//! tries.
//!
//! The protocol (see ARCHITECTURE.md, "Queued waiting", for the argument):
//! 1. **Enqueue and line up**: one transaction ([`KvEnqueueTxn`]) that locks our entry
//!    `<key>/.queue/<session>` (flags [`QUEUE_FLAG_VALUE`]) and then reads the lock key's whole
//!    tree (`get-tree`), which shows the key and the line as of the transaction's index. The
//!    entry's `CreateIndex` is our place (our *rank*); an entry made again in the same attempt
//!    (an operator deleted it, or our session was replaced) carries that rank as its value, so
//!    it keeps its place. Entries are ordered by (rank, `CreateIndex`, key); an entry counts
//!    only while a session holds it (a session invalidated under the default behavior
//!    `release` leaves its entry behind, without a session: dead). Blocking reads go on from
//!    the highest `ModifyIndex` in the answer (a write transaction's answer has no
//!    `X-Consul-Index`; a first entry's own index is the transaction's).
//! 2. **Line up again**: a plain recursive list of the lock key, whenever the entry ahead goes
//!    or a wait runs out, and after an entry made again (waiters ranked ahead may be making
//!    theirs again too, after the transaction's tree was read).
//! 3. **Wait**: with a live entry ahead of ours, a blocking read of that entry alone, from the
//!    list's index; when it changes or goes, list again (one request) to find the next one
//!    ahead. At the head, wait on the key itself as an unqueued lock does, from the list's
//!    index (the list showed the key at that index, so the read blocks only while it is
//!    unchanged). A wait that runs out without news lists again, so an entry of ours that an
//!    operator deleted is made again within one blocking-read round. A waiter that finds its
//!    entry gone when the entry ahead went (the line deleted) does not take the key for one
//!    round ([`Holder::settle`]): the head, parked on the key, has not seen yet that its own
//!    entry is gone.
//! 4. **Acquire**: a transaction that deletes our entry and locks the key: refused, the delete
//!    is rolled back and we keep our place.
//! 5. **Leave**: an attempt that ends without the lock (cancel, give-up, failure) deletes its
//!    entry before its session is let go; the first live waiter behind a dead entry deletes it
//!    (check-and-set), so a crashed waiter's entry does not stay for ever.

use std::time::Instant;

use crate::api::{
    Consistency, EnqueueOutcome, Key, KvCasDelete, KvDelete, KvEnqueueTxn, KvGet, KvList, KvLockTxn, KvPair,
    LockRefusal, SessionId,
};
use crate::machine::classify::{Failure, decode};
use crate::machine::lock::{Ask, Chore, LockKind};
use crate::machine::outbox::Pending;
use crate::machine::{Holder, LOCK_FLAG_VALUE, LockError, QUEUE_FLAG_VALUE, Reply, Waiting};

/// Beyond a blocking read's round, for the head of a disturbed line to list and take its
/// entry again (two requests; see [`Holder::settle`]).
const SETTLE_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a queued contender stands in line.
#[derive(Clone, Debug, Default)]
pub(crate) struct Place {
    /// Our rank: the `CreateIndex` of our first entry in this attempt.
    rank: Option<u64>,
    /// The live entry just ahead of ours, as last listed; `None` at the head.
    ahead: Option<Ahead>,
    /// The delete of a dead entry just ahead (or of one of ours), in flight.
    pub(crate) sweep: Option<Pending>,
    /// The session our entry was last taken with.
    session: Option<SessionId>,
    /// Sessions this machine lined up with before, in this attempt or an earlier one (declared
    /// lost, replaced): their entries are ours, not waiters ahead, even while Consul still keeps
    /// those sessions (a session declared lost by its renew deadline can outlive it on the server
    /// for up to a TTL more).
    former: Vec<SessionId>,
    /// The list in flight was sent because the entry ahead went or changed (not because a wait
    /// ran out).
    woken: bool,
    /// Until when we do not take the key, though at the head: see [`Holder::settle`].
    settle_until: Option<Instant>,
}

/// The entry just ahead: what a read of it must still show for it to be waited on.
#[derive(Clone, Debug)]
struct Ahead {
    key: Key,
    modify_index: u64,
}

/// An entry's place in line: rank (its value, when a re-made entry carries its first
/// `CreateIndex`, else its own `CreateIndex`), then `CreateIndex`, then key.
fn order(pair: &KvPair) -> (u64, u64, &str) {
    let claimed = std::str::from_utf8(&pair.value)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        // A rank is an earlier CreateIndex of the same waiter: never a later one.
        .filter(|rank| *rank < pair.create_index);
    (claimed.unwrap_or(pair.create_index), pair.create_index, &pair.key)
}

impl Holder<LockKind> {
    pub(crate) fn queued(&self) -> bool {
        self.options.waiting == Waiting::Queue
    }

    /// Our entry's key, for the session in use.
    fn entry(&self, session: &SessionId) -> Result<Key, LockError> {
        self.options.queue_entry(session).map_err(|e| {
            LockError::Refused(crate::api::ApiError::Malformed {
                what: "a session ID as a queue entry's key",
                problem: e.to_string(),
            })
        })
    }

    /// Takes (or takes again) our entry in the line.
    pub(crate) fn enqueue(&mut self, now: Instant) {
        let Some(session) = self.base.session.id().cloned() else {
            if let Some(a) = self.acquiring() {
                a.step = crate::machine::holder::Step::AwaitSession;
            }
            return;
        };
        let key = match self.entry(&session) {
            Ok(key) => key,
            Err(e) => return self.fail(now, e),
        };
        // Entries of the sessions this machine lined up with before, in this attempt or an
        // earlier one, are ours: an earlier attempt's session declared lost can outlive it on
        // the server, entry and all (found by sim_scale: a waiter sat behind its own old entry).
        let former = self.kind.lined_up(&session);
        let Some(a) = self.acquiring() else { return };
        let place = &mut a.wait.place;
        place.session = Some(session.clone());
        place.former = former;
        let rank = place.rank;
        let txn = KvEnqueueTxn {
            lock: KvLockTxn {
                key,
                session,
                flags: QUEUE_FLAG_VALUE,
                value: rank.map(|r| r.to_string().into_bytes()).unwrap_or_default(),
            },
            tree: self.options.key.clone(),
        };
        self.send_ask(now, Ask::Enqueue, &txn, None);
    }

    pub(crate) fn on_enqueued(&mut self, now: Instant, reply: &Reply) {
        match decode::<KvEnqueueTxn>(reply) {
            Ok(EnqueueOutcome::Lined(line)) => {
                let Some(a) = self.acquiring() else { return };
                a.failures.progressed();
                let again = a.wait.place.rank.is_some();
                let rank = *a.wait.place.rank.get_or_insert(line.entry.create_index);
                tracing::debug!(entry = %line.entry.key, rank, again, "in line");
                if again {
                    // Taken again: the line was disturbed (an operator deleted entries, or our
                    // session was replaced), and waiters ranked ahead of us may be making theirs
                    // again just now, after this tree was read. A list a round trip later sees
                    // them, as every waiter woken by the same deletion has re-made its entry by
                    // then; waiting on this tree could let us overtake them.
                    return self.line(now);
                }
                // A first entry: every entry ranked ahead of it is in the tree, read in the same
                // transaction (a waiter arriving later gets a later CreateIndex, so it queues
                // behind): no list needed to line up.
                let index = line.index();
                self.lined(now, line.tree, index);
            }
            // Our entry's key held by another session, or under a lock-delay: only an
            // operator's doing. Try again, paced and counted, so that it can't loop unseen.
            Ok(EnqueueOutcome::Refused(LockRefusal::Held | LockRefusal::LockDelay)) => self.retry(
                now,
                Ask::Enqueue,
                "the queue entry's key is held by another session",
            ),
            Ok(EnqueueOutcome::Refused(refusal)) => self.on_refused_txn(now, Ok(refusal), Ask::Enqueue),
            Err(failure) => self.on_refused_txn(now, Err(failure), Ask::Enqueue),
        }
    }

    /// Lists the key and its line.
    pub(crate) fn line(&mut self, now: Instant) {
        let list = KvList::new(self.options.key.clone());
        self.send_ask(now, Ask::Line, &list, None);
    }

    pub(crate) fn on_line(&mut self, now: Instant, reply: &Reply) {
        let read = match decode::<KvList>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Line, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        self.lined(now, read.value, read.meta.index);
    }

    /// Finds our place in `tree` (the lock key and everything under it, as of `index`) and
    /// waits or acquires from there.
    fn lined(&mut self, now: Instant, tree: Vec<KvPair>, index: u64) {
        let Some(session) = self.base.session.id().cloned() else {
            return self.enqueue(now);
        };
        let mine = match self.entry(&session) {
            Ok(key) => key,
            Err(e) => return self.fail(now, e),
        };
        let prefix = self.options.queue_prefix();
        let mut key = None;
        let mut entries = Vec::new();
        for pair in tree {
            if pair.key == self.options.key.as_str() {
                key = Some(pair);
            } else if pair
                .key
                .strip_prefix(&prefix)
                .is_some_and(|name| !name.is_empty() && !name.contains('/'))
                && pair.flags == QUEUE_FLAG_VALUE
            {
                entries.push(pair);
            }
        }
        if let Some(pair) = &key {
            if pair.flags != LOCK_FLAG_VALUE {
                return self.fail(now, LockError::Conflict { flags: pair.flags });
            }
        }
        let woken = self
            .acquiring()
            .is_some_and(|a| std::mem::take(&mut a.wait.place.woken));
        let Some(me) = entries
            .iter()
            .find(|p| p.key == mine.as_str() && p.session.as_ref() == Some(&session))
        else {
            // Gone (an operator deleted it, or the line was): take it again, keeping our rank.
            tracing::debug!(entry = %mine, "our queue entry is gone; taking it again");
            if woken {
                self.settle(now);
            }
            return self.enqueue(now);
        };
        if key.as_ref().is_some_and(|p| p.session.as_ref() == Some(&session)) {
            // Ours already (a grant an ended attempt left to this one): no line to wait in.
            return self.acquire(now);
        }
        let me = order(me);
        let former = self
            .acquiring()
            .map(|a| a.wait.place.former.clone())
            .unwrap_or_default();
        let ours_before = |p: &KvPair| {
            p.session.as_ref().is_some_and(|s| former.contains(s))
                && p.key
                    .strip_prefix(&prefix)
                    .is_some_and(|n| Some(n) == p.session.as_ref().map(SessionId::as_str))
        };
        let ahead = entries
            .iter()
            .filter(|p| p.session.is_some() && !ours_before(p) && order(p) < me)
            .max_by(|a, b| order(a).cmp(&order(b)));
        let floor = ahead.map(order);
        // Our own entries of sessions this attempt had before are ours to clear; so are dead
        // entries between the one ahead and ours: each has one such waiter, so each costs one
        // delete.
        let dead = entries
            .iter()
            .filter(|p| ours_before(p))
            .chain(
                entries
                    .iter()
                    .filter(|p| p.session.is_none() && order(p) < me && floor.is_none_or(|f| order(p) > f)),
            )
            .find_map(|p| Some((self.named(&p.key)?, p.modify_index)));
        let ahead = ahead.and_then(|p| {
            Some(Ahead {
                key: self.named(&p.key)?,
                modify_index: p.modify_index,
            })
        });
        self.sweep(now, dead);
        let Some(a) = self.acquiring() else { return };
        a.failures.progressed();
        a.index = index;
        let at_head = ahead.is_none();
        a.wait.place.ahead = ahead;
        if !at_head {
            return self.wait_ahead(now);
        }
        let other = key
            .filter(|p| p.session.as_ref() != Some(&session))
            .and_then(|p| p.session);
        match other {
            // At the head and the key is free (or ours): take it.
            None => self.acquire(now),
            // At the head, held by someone outside the line or not yet gone: wait on the key.
            Some(holder) => {
                if let Some(a) = self.acquiring() {
                    a.wait.see_holder(holder, now);
                }
                self.read(now);
            }
        }
    }

    /// Our entry was found gone by a list that the entry ahead's going woke: an operator
    /// deleted the line (or part of it) just now. The waiter at the head sat on the key, not on
    /// its entry, so it sees its own entry gone only when its read's round runs out, and until
    /// it has made it again no list shows it: taking the key meanwhile could overtake it. So
    /// we don't, for one round (the wait Consul may stretch by up to 1/16, and a margin for the
    /// head's list and enqueue). The head itself is not held up, nor is anyone when the line is
    /// whole; the line's first handoff after an operator's deletion may be, for at most that
    /// round.
    fn settle(&mut self, now: Instant) {
        let wait = self.options.hold.wait_time;
        let until = now + wait + wait / 16 + SETTLE_MARGIN;
        tracing::debug!(?until, "the line was disturbed: not taking the key for a round");
        if let Some(a) = self.acquiring() {
            a.wait.place.settle_until = Some(until);
        }
    }

    /// Whether a queued acquire must hold off (see [`settle`](Self::settle)): if so, it waits
    /// until the round's end, then lists again.
    pub(crate) fn settling(&mut self, now: Instant) -> bool {
        let Some(a) = self.acquiring() else { return false };
        let Some(until) = a.wait.place.settle_until.filter(|until| now < *until) else {
            a.wait.place.settle_until = None;
            return false;
        };
        a.step = crate::machine::holder::Step::Pause {
            until: a.give_up_at.map_or(until, |at| until.min(at)),
            then: Ask::Line,
        };
        true
    }

    /// The key of the entry named `key` under our queue prefix.
    fn named(&self, key: &str) -> Option<Key> {
        let name = key.strip_prefix(&self.options.queue_prefix())?;
        self.options.queue_entry_named(name).ok()
    }

    /// Deletes a dead entry (check-and-set, so a waiter that made it again meanwhile keeps it),
    /// unless a delete is already in flight.
    fn sweep(&mut self, now: Instant, dead: Option<(Key, u64)>) {
        let Some((key, cas)) = dead else { return };
        if self.acquiring().is_none_or(|a| a.wait.place.sweep.is_some()) {
            return;
        }
        tracing::debug!(entry = %key, "deleting a dead queue entry");
        let pending = self.base.send(now, &KvCasDelete { key, cas }, None);
        if let Some(a) = self.acquiring() {
            a.wait.place.sweep = Some(pending);
        }
    }

    /// Blocks on the entry just ahead, from the index of the last list.
    fn wait_ahead(&mut self, now: Instant) {
        let Some(key) = self
            .acquiring()
            .and_then(|a| a.wait.place.ahead.as_ref())
            .map(|e| e.key.clone())
        else {
            return self.line(now);
        };
        let Some(blocking) = self.next_read(now) else {
            return;
        };
        let get = KvGet {
            key,
            consistency: Consistency::Default,
            blocking: Some(blocking),
        };
        let wait = (blocking.index > 0).then_some(blocking.wait);
        self.send_ask(now, Ask::Ahead, &get, wait);
    }

    pub(crate) fn on_ahead(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let read = match decode::<KvGet>(reply) {
            Ok(read) => read,
            Err(Failure::Transient(why)) => return self.retry(now, Ask::Line, &why),
            Err(Failure::Fatal(e)) => return self.fail(now, LockError::refused(e)),
        };
        let pace = self.take_index(now, sent, read.meta.index);
        let Some(ahead) = self.acquiring().and_then(|a| a.wait.place.ahead.clone()) else {
            return self.line(now);
        };
        let unchanged = read.value.as_ref().is_some_and(|p| {
            p.session.is_some() && p.flags == QUEUE_FLAG_VALUE && p.modify_index == ahead.modify_index
        });
        if !unchanged {
            // It went (acquired, left, died) or changed: look again for the one ahead.
            if let Some(a) = self.acquiring() {
                a.wait.place.woken = true;
            }
            return self.line(now);
        }
        if pace.spinning {
            return self.retry(
                now,
                Ask::Line,
                "a blocking read returned at once without progress",
            );
        }
        if pace.moved {
            // Another key moved the agent's index: the entry ahead is as it was.
            return self.wait_ahead(now);
        }
        // The wait ran out without news: list once a round, which finds our own entry gone.
        self.line(now);
    }

    /// The key of a queued acquire's entry, when the acquire should leave the line with it.
    pub(crate) fn dequeue_entry(&self, session: &SessionId) -> Option<Key> {
        self.queued().then(|| self.entry(session).ok()).flatten()
    }

    /// The work a queued attempt that ended without the lock leaves: delete its entry.
    pub(crate) fn leave(&mut self, now: Instant, session: &SessionId) -> Option<(Chore, Pending)> {
        let key = self.dequeue_entry(session)?;
        tracing::debug!(entry = %key, "leaving the line");
        Some((Chore::Leave, self.base.send(now, &KvDelete { key }, None)))
    }

    /// The answer to a dead entry's delete.
    pub(crate) fn on_sweep(&mut self, reply: &Reply) {
        if let Err(why) = decode::<KvCasDelete>(reply) {
            tracing::debug!(
                ?why,
                "could not delete a dead queue entry; the next list tries again"
            );
        }
        if let Some(a) = self.acquiring() {
            a.wait.place.sweep = None;
        }
    }
}
