//! One machine for everything that takes and holds something on a Consul session: a lock key
//! ([`LockMachine`](crate::machine::LockMachine)) or a semaphore slot
//! ([`SemaphoreMachine`](crate::machine::SemaphoreMachine)).
//!
//! [`Holder`] owns what every kind of hold shares: the [`Base`] (session, outbox, rng, clock),
//! the phases and their transitions (acquire, hold, release, destroy; finish, fail, lose, give
//! up; retries and their error budget; the session's events), the driving surface (`poll_*`,
//! `handle_*`) and the work an ended attempt leaves behind. A [`Kind`] supplies only what
//! differs: which requests an acquisition sends and what their answers mean, how a hold is
//! watched, how it is given up and destroyed. A new kind of holder (many keys on one session)
//! plugs in as a new `Kind`; a queued lock is the lock kind waiting in line (`queue.rs`), and an
//! election's candidate is the lock itself, with its proclaim (a request of the hold:
//! [`Kind::proclaim`]).

use std::fmt::Debug;
use std::time::{Duration, Instant};

use crate::api::{Blocking, ClientConfig, Consistency, Endpoint, Key, KvCasDelete, QueryReply, SessionId};
use crate::machine::backoff::Backoff;
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::{Base, Failures, Watch, WatchStep};
use crate::machine::options::KindOptions;
use crate::machine::outbox::{Pending, Pendings};
use crate::machine::session::{SessionEvent, SessionLoss, SessionMachine};
use crate::machine::{
    Action, FencingToken, HoldMachine, LockError, LockEvent, LockStatus, LossReason, Misuse, OptionsError,
    Reply, RequestId, read,
};

/// What a kind of holder does in its own phases; [`Holder`] does the rest. Not nameable outside
/// the crate: the kinds are the crate's.
pub trait Kind: Sized + Debug + Send + 'static {
    /// The options a machine of this kind is made with.
    type Options: KindOptions;
    /// A request of the acquisition (sent, or sent again after a pause).
    type Ask: Copy + Debug + PartialEq + Send;
    /// What an acquisition keeps besides what every acquisition keeps.
    type Wait: Clone + Debug + Default + Send;
    /// What a hold keeps besides its token and its watch.
    type Hold: Clone + Debug + Send;
    /// A request of the release.
    type Give: Copy + Debug + Send;
    /// What a release keeps besides what every release keeps.
    type Leave: Clone + Debug + Send;
    /// Work an ended attempt left behind, waited for in the background.
    type Chore: Clone + Debug + Send;
    /// A read of what is held: the key, or the listing of the prefix. Blocking, it is the
    /// acquisition's wait ([`Kind::READ`]) and the hold's watch; plain, it tells a destroy
    /// whether it may delete.
    type Read: Endpoint<Output = QueryReply<Self::Seen>>;
    /// What such a read shows.
    type Seen;
    /// The acquisition's request that is the blocking wait.
    const READ: Self::Ask;

    /// A read of what is held, with `consistency`, blocking on `blocking` if given.
    fn read(h: &Holder<Self>, consistency: Consistency, blocking: Option<Blocking>) -> Self::Read;

    /// The session is ready for an attempt that was waiting for it.
    fn on_ready(h: &mut Holder<Self>, now: Instant);
    /// Sends `ask`.
    fn ask(h: &mut Holder<Self>, now: Instant, ask: Self::Ask);
    /// The answer to `ask`, sent as `sent`.
    fn on_answer(h: &mut Holder<Self>, now: Instant, ask: Self::Ask, sent: Pending, reply: &Reply);
    /// Whether the answer to `ask` may grant the hold: the give-up time waits for it.
    fn deciding(ask: Self::Ask) -> bool;
    /// The acquisition's own requests besides its step.
    fn wait_pendings(_wait: &Self::Wait, _into: &mut Pendings) {}
    /// The acquisition's own timer besides its step's.
    fn wait_timer(_wait: &Self::Wait) -> Option<Instant> {
        None
    }
    /// Fires the acquisition's own due timers.
    fn wait_timeout(_h: &mut Holder<Self>, _now: Instant) {}
    /// A reply to one of the acquisition's own requests: false when `id` is none of them.
    fn on_wait_reply(_h: &mut Holder<Self>, _now: Instant, _id: RequestId, _reply: &Reply) -> bool {
        false
    }

    /// Writes `value` to what is held, checking that it still is (an election's proclaim):
    /// only a lock has a value to proclaim.
    fn proclaim(_h: &mut Holder<Self>, _now: Instant, _value: Vec<u8>) -> Result<(), Misuse> {
        Err(Misuse::NotALock)
    }
    /// The hold's own requests besides its watch's.
    fn hold_pendings(_hold: &Self::Hold, _into: &mut Pendings) {}
    /// A reply to one of the hold's own requests: false when `id` is none of them.
    fn on_hold_reply(_h: &mut Holder<Self>, _now: Instant, _id: RequestId, _reply: &Reply) -> bool {
        false
    }

    /// Why what a watch read shows means the hold is lost, if it does.
    fn loss_in(h: &Holder<Self>, held: &Held<Self>, seen: &Self::Seen) -> Option<LossReason>;

    /// Starts giving up `held` (unlock): the release phase and its first request.
    fn release(h: &mut Holder<Self>, now: Instant, held: Held<Self>);
    /// The answer to the release's `give`.
    fn on_give(h: &mut Holder<Self>, now: Instant, give: Self::Give, reply: &Reply);
    /// The release's pause is over.
    fn release_again(h: &mut Holder<Self>, now: Instant);

    /// What a destroy's read shows: the index at which to delete [`Kind::destroy_key`]
    /// (check-and-set), `None` when there is nothing to delete, or why it may not be.
    fn destroy_verdict(h: &Holder<Self>, seen: &Self::Seen) -> Result<Option<u64>, LockError>;
    /// The key a destroy deletes.
    fn destroy_key(h: &Holder<Self>) -> Key;
    /// What a destroy whose check-and-set delete was refused (someone took it meanwhile) ends
    /// with.
    const IN_USE: LockError;

    /// An acquisition or a hold ended (`ended` is the phase it was): start the work it leaves
    /// behind, if any.
    fn on_end(h: &mut Holder<Self>, now: Instant, ended: &Phase<Self>);
    /// The answer to `chore`: the next chore, if the work goes on.
    fn on_chore(
        h: &mut Holder<Self>,
        now: Instant,
        chore: Self::Chore,
        reply: &Reply,
    ) -> Option<(Self::Chore, Pending)>;
}

/// What an acquisition does next.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step<A> {
    /// Waiting for the session.
    AwaitSession,
    /// Waiting for an ended attempt's chore before sending `then`.
    AwaitCleanup {
        /// The request to send once the chore is done.
        then: A,
    },
    /// Waiting for the answer to a request.
    Sent(A, Pending),
    /// The answer to the last request is being handled: its handler sets the next step. (So
    /// that an ending decided while handling it never takes that request for one in flight.)
    Answered,
    /// Waiting until `until`, then sending `then`.
    Pause {
        /// The pause's end.
        until: Instant,
        /// The request to send then.
        then: A,
    },
}

/// An acquisition under way.
#[derive(Clone, Debug)]
pub struct Acquiring<K: Kind> {
    pub(crate) step: Step<K::Ask>,
    /// The index of the next blocking read.
    pub(crate) index: u64,
    pub(crate) give_up_at: Option<Instant>,
    pub(crate) backoff: Backoff,
    pub(crate) failures: Failures,
    pub(crate) wait: K::Wait,
}

/// A hold.
#[derive(Clone, Debug)]
pub struct Held<K: Kind> {
    pub(crate) token: FencingToken,
    pub(crate) watch: Watch,
    pub(crate) hold: K::Hold,
}

/// What a release does next.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReleaseStep<G> {
    /// Waiting for the answer to a request.
    Sent(G, Pending),
    /// Waiting until the next try.
    Pause(Instant),
    /// Stopping the session; then the release is reported.
    Session,
}

/// A release under way.
#[derive(Clone, Debug)]
pub struct Releasing<K: Kind> {
    pub(crate) step: ReleaseStep<K::Give>,
    pub(crate) attempts: u32,
    /// No try starts after this.
    pub(crate) give_up_at: Instant,
    pub(crate) backoff: Backoff,
    pub(crate) leave: K::Leave,
    /// What the release ended with, when it was not confirmed: reported once the session is
    /// stopped.
    pub(crate) failed: Option<LockError>,
}

/// The holder's phases; each holds exactly what it needs.
#[derive(Clone, Debug)]
pub enum Phase<K: Kind> {
    /// Not holding, not trying.
    Idle,
    /// Acquiring.
    Acquiring(Acquiring<K>),
    /// Holding.
    Held(Held<K>),
    /// Giving up a hold.
    Releasing(Releasing<K>),
    /// Destroying, waiting for the answer to a request.
    Destroying(Raze, Pending),
}

/// A destroy's requests.
#[derive(Clone, Copy, Debug)]
pub enum Raze {
    /// Reading what is held (may it be deleted?).
    Read,
    /// Deleting the key, check-and-set on the index read.
    Delete,
}

/// Takes, holds and gives up something on a Consul session, as a pure state machine: see
/// [`LockMachine`](crate::machine::LockMachine) and
/// [`SemaphoreMachine`](crate::machine::SemaphoreMachine).
#[derive(Debug)]
pub struct Holder<K: Kind> {
    pub(crate) options: K::Options,
    pub(crate) kind: K,
    pub(crate) base: Base,
    pub(crate) phase: Phase<K>,
    /// An ended attempt's work, settled before the session is let go.
    pub(crate) chore: Option<(K::Chore, Pending)>,
}

// ----- the surface --------------------------------------------------------------------------

impl<K: Kind> Holder<K> {
    /// A machine for `options` (validated here) and the agent `config` describes; `kind`
    /// makes the kind's part from the options.
    pub(crate) fn build(
        config: ClientConfig,
        options: K::Options,
        kind: impl FnOnce(&K::Options) -> K,
    ) -> Result<Holder<K>, OptionsError> {
        options.check()?;
        config.check()?;
        let base = Base::for_hold(
            config,
            options.hold(),
            <K::Options as KindOptions>::AFTER_INVALIDATION,
        );
        Ok(Holder {
            kind: kind(&options),
            options,
            base,
            phase: Phase::Idle,
            chore: None,
        })
    }

    /// Where the machine stands.
    pub fn status(&self) -> LockStatus {
        match &self.phase {
            Phase::Idle => LockStatus::Idle,
            Phase::Acquiring(_) => LockStatus::Acquiring,
            Phase::Held(_) => LockStatus::Held,
            Phase::Releasing(_) => LockStatus::Releasing,
            Phase::Destroying(..) => LockStatus::Destroying,
        }
    }

    /// The fencing token, while held.
    pub fn token(&self) -> Option<&FencingToken> {
        match &self.phase {
            Phase::Held(h) => Some(&h.token),
            _ => None,
        }
    }

    /// The session machine the hold stands on.
    pub fn session(&self) -> &SessionMachine {
        &self.base.session
    }

    /// The options the machine was made with.
    pub fn options(&self) -> &K::Options {
        &self.options
    }

    /// Starts acquiring. Usable again after a loss, a release, a give-up, a failure or a cancel.
    pub fn lock(&mut self, now: Instant) -> Result<(), Misuse> {
        self.base.observe(now);
        match self.phase {
            Phase::Idle => {}
            Phase::Acquiring(_) | Phase::Held(_) => return Err(Misuse::AlreadyHeld),
            Phase::Releasing(_) | Phase::Destroying(..) => return Err(Misuse::Busy),
        }
        self.phase = Phase::Acquiring(Acquiring {
            step: Step::AwaitSession,
            index: 0,
            give_up_at: {
                let hold = self.options.hold();
                hold.try_once.then(|| now + hold.wait_time)
            },
            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
            failures: Failures::default(),
            wait: K::Wait::default(),
        });
        let events = self.base.start_session(now);
        self.on_session(now, events);
        Ok(())
    }

    /// Gives up a hold, then destroys the session if the machine made it. Ends with
    /// [`LockEvent::Released`], or [`LockEvent::ReleaseFailed`] when Consul never confirmed it.
    pub fn unlock(&mut self, now: Instant) -> Result<(), Misuse> {
        self.base.observe(now);
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Held(held) => {
                K::release(self, now, held);
                Ok(())
            }
            phase => {
                self.phase = phase;
                Err(Misuse::NotHeld)
            }
        }
    }

    /// Stops whatever is under way, at once: an acquisition ends with [`LockEvent::Cancelled`]
    /// (its session is destroyed in the background, after anything an acquire in flight may
    /// have been granted is given back), a hold is released, a destroy is abandoned. A no-op
    /// when idle or already releasing.
    pub fn cancel(&mut self, now: Instant) {
        self.base.observe(now);
        match &self.phase {
            Phase::Idle | Phase::Releasing(_) => {}
            Phase::Acquiring(_) => self.finish(now, LockEvent::Cancelled),
            Phase::Held(_) => {
                // Held, so unlock can't fail.
                let _ = self.unlock(now);
            }
            Phase::Destroying(..) => self.end_destroy(now, LockEvent::Cancelled),
        }
    }

    /// Leading, writes `value` to the key, in a write that checks the hold is still ours (a
    /// transaction: `check-session`, then `lock` by the holding session, which keeps the key's
    /// `LockIndex`): an election's proclaim. Ends with [`LockEvent::Proclaimed`], or
    /// [`LockEvent::ProclaimFailed`]; a key Consul shows not ours any more is also
    /// [`LockEvent::Lost`] at once. The fencing token does not change.
    ///
    /// [`Misuse::NotHeld`] when not holding, [`Misuse::Busy`] while a proclaim is in flight,
    /// [`Misuse::NotALock`] for a semaphore.
    pub fn proclaim(&mut self, now: Instant, value: Vec<u8>) -> Result<(), Misuse> {
        self.base.observe(now);
        K::proclaim(self, now, value)
    }

    /// Deletes the key(s), if nobody holds them (Go's `Destroy`). Ends with
    /// [`LockEvent::Destroyed`] or [`LockEvent::Failed`] ([`LockError::InUse`],
    /// [`LockError::Conflict`]).
    pub fn destroy(&mut self, now: Instant) -> Result<(), Misuse> {
        self.base.observe(now);
        match self.phase {
            Phase::Idle => {
                let read = K::read(self, Consistency::Default, None);
                self.send_raze(now, Raze::Read, &read);
                Ok(())
            }
            Phase::Held(_) => Err(Misuse::AlreadyHeld),
            _ => Err(Misuse::Busy),
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action<LockEvent>> {
        self.base.out.pop()
    }

    /// The next instant at which [`handle_timeout`](Self::handle_timeout) must be called, if
    /// any. Never earlier than the latest `now` the machine was given.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timers = [self.base.session.poll_timeout(), self.phase_timer()];
        read::next_timeout(
            timers.into_iter().flatten(),
            &self.pendings(),
            self.base.last_now(),
        )
    }

    /// Handles the passage of time: timers that are due fire, requests past their deadline are
    /// taken as timed out. Calling it early, or twice, does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.base.observe(now);
        for id in read::overdue(&self.pendings(), now) {
            self.handle_response(now, id, read::deadline_passed());
        }
        let base = &mut self.base;
        let events = base.session.handle_timeout(now, &mut base.out, &mut base.rng);
        self.on_session(now, events);
        self.phase_timeout(now);
    }

    /// Handles the reply to request `id` (or the transport's failure to get one). A reply to a
    /// request the machine no longer waits for is ignored.
    pub fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        let now = self.base.observe(now);
        // The renew deadline holds whatever the input: a reply that comes after it (the driver
        // had not called `handle_timeout` yet) finds the loss declared first, and a renew reply
        // whose TTL puts the deadline behind us (fuzz finding F1) is caught right after.
        self.check_renew_deadline(now);
        let base = &mut self.base;
        match base
            .session
            .handle_response(now, id, &reply, &mut base.out, &mut base.rng)
        {
            Some(events) => self.on_session(now, events),
            None => self.phase_response(now, id, &reply),
        }
        self.check_renew_deadline(now);
    }

    /// Whether the machine has nothing left to do: idle, no request outstanding, nothing
    /// queued. A driver may stop driving it then.
    pub fn is_quiescent(&self) -> bool {
        matches!(self.phase, Phase::Idle)
            && self.chore.is_none()
            && self.base.session.pending().is_none()
            && self.base.session.poll_timeout().is_none()
            && self.base.out.is_empty()
    }

    /// The number of requests the machine is waiting on.
    pub fn in_flight(&self) -> usize {
        self.pendings().len()
    }
}

impl<K: Kind> HoldMachine for Holder<K> {
    fn lock(&mut self, now: Instant) -> Result<(), Misuse> {
        Holder::lock(self, now)
    }
    fn unlock(&mut self, now: Instant) -> Result<(), Misuse> {
        Holder::unlock(self, now)
    }
    fn cancel(&mut self, now: Instant) {
        Holder::cancel(self, now);
    }
    fn destroy(&mut self, now: Instant) -> Result<(), Misuse> {
        Holder::destroy(self, now)
    }
    fn proclaim(&mut self, now: Instant, value: Vec<u8>) -> Result<(), Misuse> {
        Holder::proclaim(self, now, value)
    }
    fn status(&self) -> LockStatus {
        Holder::status(self)
    }
    fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        Holder::handle_response(self, now, id, reply);
    }
    fn handle_timeout(&mut self, now: Instant) {
        Holder::handle_timeout(self, now);
    }
    fn poll_action(&mut self) -> Option<Action<LockEvent>> {
        Holder::poll_action(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Holder::poll_timeout(self)
    }
    fn is_quiescent(&self) -> bool {
        Holder::is_quiescent(self)
    }
    fn session_id(&self) -> Option<&SessionId> {
        self.base.session.id()
    }
    fn token(&self) -> Option<&FencingToken> {
        Holder::token(self)
    }
    fn in_flight(&self) -> usize {
        Holder::in_flight(self)
    }
}

// ----- what the kinds call ------------------------------------------------------------------

impl<K: Kind> Holder<K> {
    pub(crate) fn ignore(&self, id: RequestId) {
        tracing::trace!(%id, "ignoring a reply to a request no longer awaited");
    }

    pub(crate) fn acquiring(&mut self) -> Option<&mut Acquiring<K>> {
        match &mut self.phase {
            Phase::Acquiring(a) => Some(a),
            _ => None,
        }
    }

    pub(crate) fn held(&mut self) -> Option<&mut Held<K>> {
        match &mut self.phase {
            Phase::Held(h) => Some(h),
            _ => None,
        }
    }

    pub(crate) fn releasing(&mut self) -> Option<&mut Releasing<K>> {
        match &mut self.phase {
            Phase::Releasing(r) => Some(r),
            _ => None,
        }
    }

    /// Sends `endpoint` as the acquisition's `ask`.
    pub(crate) fn send_ask(
        &mut self,
        now: Instant,
        ask: K::Ask,
        endpoint: &impl Endpoint,
        wait: Option<Duration>,
    ) {
        let pending = self.base.send(now, endpoint, wait);
        if let Some(a) = self.acquiring() {
            a.step = Step::Sent(ask, pending);
        }
    }

    /// Sends `endpoint` as the release's `give`.
    pub(crate) fn send_give(&mut self, now: Instant, give: K::Give, endpoint: &impl Endpoint) {
        let pending = self.base.send(now, endpoint, None);
        if let Some(r) = self.releasing() {
            r.step = ReleaseStep::Sent(give, pending);
        }
    }

    /// Sends `endpoint` as the destroy's `raze`.
    fn send_raze(&mut self, now: Instant, raze: Raze, endpoint: &impl Endpoint) {
        let pending = self.base.send(now, endpoint, None);
        self.phase = Phase::Destroying(raze, pending);
    }

    /// Sends the hold's next monitor read: a blocking read from the watch's index.
    pub(crate) fn monitor(&mut self, now: Instant) {
        let wait = self.options.hold().monitor_wait;
        let Some(index) = self.held().map(|h| h.watch.index) else {
            return;
        };
        let read = K::read(self, Consistency::Consistent, Some(Blocking { index, wait }));
        let pending = self.base.send(now, &read, (index > 0).then_some(wait));
        if let Some(h) = self.held() {
            h.watch.step = WatchStep::Read(pending);
        }
    }

    /// A monitor read's answer: the loss it shows, or the next read.
    fn on_monitor(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        // A reply from a server that knows no leader may come from stale state: not an answer
        // to act on.
        let read = match Watch::trust(decode::<K::Read>(reply)) {
            Ok(read) => read,
            Err(failure) => return self.on_monitor_failure(now, failure),
        };
        let Phase::Held(held) = &self.phase else { return };
        if let Some(reason) = K::loss_in(self, held, &read.value) {
            return self.lose(now, reason);
        }
        self.still_held(now, sent, read.meta.index);
    }

    /// The acquisition's next wait: a blocking read on the last index, or a plain read on index 0.
    pub(crate) fn read(&mut self, now: Instant) {
        let Some(blocking) = self.next_read(now) else {
            return;
        };
        let read = K::read(self, Consistency::Default, Some(blocking));
        let wait = (blocking.index > 0).then_some(blocking.wait);
        self.send_ask(now, K::READ, &read, wait);
    }

    /// A blocking read came back at once without progress: don't let an agent that does that
    /// make the acquisition spin.
    pub(crate) fn retry_spinning(&mut self, now: Instant) {
        self.retry(now, K::READ, "a blocking read returned at once without progress");
    }

    /// The blocking part of the acquisition's next read: its index and a wait that no read
    /// outlasts the give-up time with. `None` (having given up) when that time has come.
    pub(crate) fn next_read(&mut self, now: Instant) -> Option<Blocking> {
        let wait_time = self.options.hold().wait_time;
        let a = self.acquiring()?;
        if a.give_up_at.is_some_and(|at| now >= at) {
            self.give_up(now);
            return None;
        }
        let wait = a
            .give_up_at
            .map_or(wait_time, |at| at.saturating_duration_since(now).min(wait_time))
            .max(Duration::from_millis(1));
        Some(Blocking { index: a.index, wait })
    }

    /// Takes in the index of a read of the acquisition sent as `sent`; what it says of the
    /// agent's pace. Any read that made progress ends a run of failures.
    pub(crate) fn take_index(&mut self, now: Instant, sent: Pending, got: u64) -> Pace {
        let wait_time = self.options.hold().wait_time;
        let Some(a) = self.acquiring() else {
            return Pace::default();
        };
        let (index, moved) = read::next_index(a.index, got);
        let quick = read::quick(now.saturating_duration_since(sent.sent_at), wait_time);
        // A read on index 0 answers at once by design; only a blocking one says anything about
        // the agent's pace.
        let blocked = a.index > 0;
        // No progress, at once: index 0 included (a reply without X-Consul-Index).
        let spinning = !moved && quick;
        a.index = index;
        if !spinning {
            a.failures.progressed();
        }
        Pace {
            blocked,
            spinning,
            moved,
        }
    }

    /// The hold's monitor read showed it still held: read again, now or after a pause.
    fn still_held(&mut self, now: Instant, sent: Pending, got: u64) {
        let wait = self.options.hold().monitor_wait;
        let Phase::Held(h) = &mut self.phase else { return };
        if h.watch.still_held(now, sent, got, wait, &mut self.base.rng) {
            self.monitor(now);
        }
    }

    /// A monitor read failed: a pause before the next, or the loss.
    fn on_monitor_failure(&mut self, now: Instant, failure: Failure) {
        let hold = self.options.hold();
        let (retries, retry_time) = (hold.monitor_retries, hold.monitor_retry_time);
        let Some(h) = self.held() else { return };
        if let Err(reason) = h.watch.failed(now, failure, retries, retry_time) {
            self.lose(now, reason);
        }
    }

    /// Pauses the acquisition with backoff, then sends `then`: the pause's end, if acquiring.
    /// Not a failure (contention, a lock-delay): see [`retry`](Self::retry). A wait that follows
    /// a pause reads afresh, from index 0.
    pub(crate) fn pause(&mut self, now: Instant, then: K::Ask) -> Option<Instant> {
        let a = match &mut self.phase {
            Phase::Acquiring(a) => Some(a),
            _ => None,
        }?;
        let until = now + a.backoff.next(&mut self.base.rng);
        if then == K::READ {
            a.index = 0;
        }
        a.step = Step::Pause { until, then };
        Some(until)
    }

    /// Pauses after a failed try, then sends `then`: reported, or the end of the attempt once
    /// failures have lasted the error budget.
    pub(crate) fn retry(&mut self, now: Instant, then: K::Ask, why: &str) {
        if let Some(until) = self.pause(now, then) {
            self.record_failure(now, why, until);
        }
    }

    /// Records a failed try whose next is at `next_try` (see [`Failures`]).
    pub(crate) fn record_failure(&mut self, now: Instant, why: &str, next_try: Instant) {
        let budget = self.options.hold().acquire_error_budget;
        let Phase::Acquiring(a) = &mut self.phase else {
            return;
        };
        if let Err(e) = a.failures.failed(now, why, next_try, budget, &mut self.base.out) {
            self.fail(now, e);
        }
    }

    /// Ends an acquisition or a hold: report `event`, go idle, and stop the session (once the
    /// work the ending leaves behind is done).
    pub(crate) fn finish(&mut self, now: Instant, event: LockEvent) {
        let ended = std::mem::replace(&mut self.phase, Phase::Idle);
        K::on_end(self, now, &ended);
        self.base.out.event(event);
        if self.chore.is_none() {
            self.stop_session(now);
        }
    }

    pub(crate) fn give_up(&mut self, now: Instant) {
        tracing::debug!("try-once: nothing within the wait time");
        self.finish(now, LockEvent::GaveUp);
    }

    pub(crate) fn fail(&mut self, now: Instant, error: LockError) {
        tracing::warn!(%error, "attempt failed");
        self.finish(now, LockEvent::Failed(error));
    }

    pub(crate) fn lose(&mut self, now: Instant, reason: LossReason) {
        tracing::warn!(?reason, "hold lost");
        self.finish(now, LockEvent::Lost(reason));
    }

    /// The release is over (confirmed, or `failed`): stop the session, then report.
    pub(crate) fn released(&mut self, now: Instant, failed: Option<LockError>) {
        if let Some(e) = &failed {
            tracing::warn!(error = %e, "the release was not confirmed; stopping the session");
        }
        if let Some(r) = self.releasing() {
            r.step = ReleaseStep::Session;
            r.failed = failed;
        }
        // If the session ended while the release was out (invalidated), `stop` reports it
        // stopped at once.
        self.stop_session(now);
    }

    fn on_destroy_read(&mut self, now: Instant, reply: &Reply) {
        let verdict = match decode::<K::Read>(reply) {
            Err(Failure::Transient(why)) => Err(LockError::Unavailable(why)),
            Err(Failure::Fatal(e)) => Err(LockError::refused(e)),
            Ok(read) => K::destroy_verdict(self, &read.value),
        };
        match verdict {
            Ok(None) => self.end_destroy(now, LockEvent::Destroyed),
            Ok(Some(cas)) => {
                let delete = KvCasDelete {
                    key: K::destroy_key(self),
                    cas,
                };
                self.send_raze(now, Raze::Delete, &delete);
            }
            Err(e) => self.end_destroy(now, LockEvent::Failed(e)),
        }
    }

    fn on_destroy_delete(&mut self, now: Instant, reply: &Reply) {
        let event = match decode::<KvCasDelete>(reply) {
            Ok(true) => LockEvent::Destroyed,
            Ok(false) => LockEvent::Failed(K::IN_USE),
            Err(Failure::Transient(why)) => LockEvent::Failed(LockError::Unavailable(why)),
            Err(Failure::Fatal(e)) => LockEvent::Failed(LockError::refused(e)),
        };
        self.end_destroy(now, event);
    }

    fn end_destroy(&mut self, now: Instant, event: LockEvent) {
        self.phase = Phase::Idle;
        self.base.out.event(event);
        // A destroy can start while an ended attempt's chore keeps the session alive; if the
        // chore was done during the destroy, nobody let the session go (fuzz finding: an idle
        // machine renewing a session for ever).
        if self.chore.is_none() {
            self.stop_session(now);
        }
    }

    fn stop_session(&mut self, now: Instant) {
        let events = self.base.stop_session(now);
        self.on_session(now, events);
    }

    /// Consul no longer knows our session (it expired between renewals, or was destroyed): start
    /// a new one, or fail if the session is the caller's.
    pub(crate) fn session_gone(&mut self, now: Instant, e: crate::api::ApiError) {
        tracing::warn!("acquire: the session is gone; creating a new one");
        if let Some(a) = self.acquiring() {
            a.step = Step::AwaitSession;
        }
        let events = self.base.forget_session(now);
        if events.is_empty() && self.base.session.is_callers() {
            return self.fail(now, LockError::refused(e));
        }
        self.on_session(now, events);
    }

    fn on_session(&mut self, now: Instant, events: Vec<SessionEvent>) {
        for event in events {
            match (event, &self.phase) {
                (SessionEvent::Ready(_), Phase::Acquiring(a)) if matches!(a.step, Step::AwaitSession) => {
                    // A new session (the old one was lost or forgotten): look afresh rather than
                    // block on an index the last attempt saw.
                    if let Some(a) = self.acquiring() {
                        a.index = 0;
                        a.failures.progressed();
                    }
                    K::on_ready(self, now);
                }
                (SessionEvent::CreateRetry { cause, next_try }, Phase::Acquiring(_)) => {
                    self.record_failure(now, &cause, next_try);
                }
                (SessionEvent::CreateFailed(e), Phase::Acquiring(_)) => self.fail(now, LockError::session(e)),
                (SessionEvent::Lost(loss), Phase::Held(_)) => {
                    let reason = match loss {
                        SessionLoss::Invalidated => LossReason::SessionInvalidated,
                        SessionLoss::RenewDeadline { since_ack } => LossReason::RenewDeadline { since_ack },
                    };
                    self.lose(now, reason);
                }
                (SessionEvent::Lost(_), Phase::Acquiring(_)) => {
                    // Not holding anything yet: a fresh session will do.
                    if let Some(a) = self.acquiring() {
                        a.step = Step::AwaitSession;
                    }
                    let events = self.base.start_session(now);
                    self.on_session(now, events);
                }
                (
                    SessionEvent::Stopped,
                    Phase::Releasing(Releasing {
                        step: ReleaseStep::Session,
                        failed,
                        ..
                    }),
                ) => {
                    let event = match failed {
                        None => LockEvent::Released,
                        Some(e) => LockEvent::ReleaseFailed(e.clone()),
                    };
                    self.phase = Phase::Idle;
                    self.base.out.event(event);
                }
                _ => {}
            }
        }
    }

    /// A chore is done: an idle machine lets its session go; an attempt waiting for it goes on.
    fn chore_done(&mut self, now: Instant) {
        match &self.phase {
            Phase::Idle => self.stop_session(now),
            Phase::Acquiring(Acquiring {
                step: Step::AwaitCleanup { then },
                ..
            }) => K::ask(self, now, *then),
            _ => {}
        }
    }
}

/// What a read of the acquisition says about the agent's pace.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Pace {
    /// The read was a blocking one (on an index above 0).
    pub(crate) blocked: bool,
    /// It came back at once without progress.
    pub(crate) spinning: bool,
    /// Its index moved past the one it was sent with (without that, it ran out its wait).
    pub(crate) moved: bool,
}

// ----- driving --------------------------------------------------------------------------------

impl<K: Kind> Holder<K> {
    fn pendings(&self) -> Pendings {
        let mut all = Pendings::default();
        all.extend(self.base.session.pending());
        all.extend(self.chore.as_ref().map(|(_, p)| *p));
        match &self.phase {
            Phase::Acquiring(a) => {
                if let Step::Sent(_, p) = a.step {
                    all.push(p);
                }
                K::wait_pendings(&a.wait, &mut all);
            }
            Phase::Held(h) => {
                all.extend(h.watch.pending());
                K::hold_pendings(&h.hold, &mut all);
            }
            Phase::Releasing(Releasing {
                step: ReleaseStep::Sent(_, p),
                ..
            })
            | Phase::Destroying(_, p) => all.push(*p),
            _ => {}
        }
        all
    }

    fn phase_timer(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Acquiring(a) => {
                let pause = match a.step {
                    Step::Pause { until, .. } => Some(until),
                    _ => None,
                };
                // While a deciding request is in flight its answer decides (see
                // `phase_timeout`): the give-up time is no timer then, or a driver would spin.
                let give_up = a.give_up_at.filter(|_| !Self::deciding(&a.step));
                [pause, give_up, K::wait_timer(&a.wait)]
                    .into_iter()
                    .flatten()
                    .min()
            }
            Phase::Held(h) => h.watch.timer(),
            Phase::Releasing(Releasing {
                step: ReleaseStep::Pause(until),
                ..
            }) => Some(*until),
            _ => None,
        }
    }

    fn deciding(step: &Step<K::Ask>) -> bool {
        matches!(step, Step::Sent(ask, _) if K::deciding(*ask))
    }

    fn phase_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Acquiring(a) => {
                if a.give_up_at.is_some_and(|at| now >= at) && !Self::deciding(&a.step) {
                    // A deciding request in flight may yet give us the hold: its answer checks
                    // the deadline instead.
                    return self.give_up(now);
                }
                K::wait_timeout(self, now);
                if let Some(Acquiring {
                    step: Step::Pause { until, then },
                    ..
                }) = self.acquiring()
                {
                    if now >= *until {
                        let then = *then;
                        K::ask(self, now, then);
                    }
                }
            }
            Phase::Held(h) if h.watch.due(now) => self.monitor(now),
            Phase::Releasing(Releasing {
                step: ReleaseStep::Pause(until),
                ..
            }) if now >= *until => K::release_again(self, now),
            _ => {}
        }
    }

    fn phase_response(&mut self, now: Instant, id: RequestId, reply: &Reply) {
        if let Some((chore, _)) = self.chore.take_if(|(_, p)| p.is(id)) {
            self.chore = K::on_chore(self, now, chore, reply);
            if self.chore.is_none() {
                self.chore_done(now);
            }
            return;
        }
        if matches!(self.phase, Phase::Acquiring(_)) && K::on_wait_reply(self, now, id, reply) {
            return;
        }
        if matches!(self.phase, Phase::Held(_)) && K::on_hold_reply(self, now, id, reply) {
            return;
        }
        match &self.phase {
            Phase::Acquiring(Acquiring {
                step: Step::Sent(ask, sent),
                ..
            }) if sent.is(id) => {
                let (ask, sent) = (*ask, *sent);
                if let Some(a) = self.acquiring() {
                    a.step = Step::Answered;
                }
                K::on_answer(self, now, ask, sent, reply);
            }
            Phase::Held(Held {
                watch:
                    Watch {
                        step: WatchStep::Read(sent),
                        ..
                    },
                ..
            }) if sent.is(id) => {
                let sent = *sent;
                self.on_monitor(now, sent, reply);
            }
            Phase::Releasing(Releasing {
                step: ReleaseStep::Sent(give, sent),
                ..
            }) if sent.is(id) => K::on_give(self, now, *give, reply),
            Phase::Destroying(Raze::Read, sent) if sent.is(id) => self.on_destroy_read(now, reply),
            Phase::Destroying(Raze::Delete, sent) if sent.is(id) => self.on_destroy_delete(now, reply),
            _ => self.ignore(id),
        }
    }

    fn check_renew_deadline(&mut self, now: Instant) {
        let base = &mut self.base;
        let events = base.session.check_deadline(now, &mut base.out);
        self.on_session(now, events);
    }
}
