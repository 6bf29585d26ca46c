//! The observer: who leads on a lock key, and every change of leader, for anyone (a leader, a
//! contender, a bystander). It holds nothing, so it is no [`Kind`](crate::machine::holder::Kind)
//! of holder: it follows the key with the holder's blocking-read [`Watch`] (index rules, pacing
//! against an agent that answers at once, no acting on a server that knows no leader) and asks
//! Consul about each new holder's session once.
//!
//! What it promises, whatever the agent does (errors, restarts that send indexes backwards):
//! - changes come out in the order Consul made them, each once: a new leader, a new value of the
//!   same leader, no leader;
//! - a leader's [`sequence`](Leader::sequence) never goes backwards from one event to the next
//!   and strictly increases from one leader to the next;
//! - reads that fail for [`blind_after`](ObserveOptions::blind_after) are reported
//!   ([`ObserveEvent::Blind`]), and so is seeing again ([`ObserveEvent::Resumed`]); reads go on
//!   (from index 0, as Consul asks after an error) until an answer comes. Only a refusal that
//!   asking again can't fix (ACLs, TLS) ends the observation ([`ObserveEvent::Failed`]).

use std::time::{Duration, Instant};

use crate::api::{
    Blocking, ClientConfig, Consistency, Key, KvGet, KvPair, QueryReply, SessionId, SessionInfo,
};
use crate::machine::backoff::Rng;
use crate::machine::classify::{Failure, decode};
use crate::machine::hold::{Watch, WatchStep};
use crate::machine::options::check_durations;
use crate::machine::outbox::{Outbox, Pending, Pendings};
use crate::machine::{Action, LockError, OptionsError, Reply, RequestId, read};

/// How to observe a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObserveOptions {
    /// The lock key (for `consul lock <prefix>`, `<prefix>/.lock`).
    pub key: Key,
    /// The `wait` of each blocking read (default 60 s, at most Consul's 10 min). A read that
    /// hangs (a partition that drops packets) is given up after it, plus wait/16 and 5 s.
    pub wait: Duration,
    /// The pause before reading again after a failed read (default 1 s).
    pub retry_time: Duration,
    /// How long reads may fail, counted from the last answer, before the observer reports
    /// that it can't see ([`ObserveEvent::Blind`]; default 10 s).
    pub blind_after: Duration,
    /// The deadline of the session lookups (default 10 s).
    pub request_timeout: Duration,
    /// Seeds the jitter of the read pacing (default 0; the drivers draw it from entropy).
    pub seed: u64,
}

impl ObserveOptions {
    /// The default blocking wait of an observer's reads.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
    /// The default pause after a failed read.
    pub const DEFAULT_RETRY_TIME: Duration = Duration::from_secs(1);
    /// The default time reads may fail before [`ObserveEvent::Blind`].
    pub const DEFAULT_BLIND_AFTER: Duration = Duration::from_secs(10);

    /// Options to observe `key`, with the defaults.
    pub fn new(key: &str) -> Result<ObserveOptions, OptionsError> {
        Ok(ObserveOptions {
            key: Key::new(key)?,
            wait: Self::DEFAULT_WAIT,
            retry_time: Self::DEFAULT_RETRY_TIME,
            blind_after: Self::DEFAULT_BLIND_AFTER,
            request_timeout: crate::machine::HoldOptions::DEFAULT_REQUEST_TIMEOUT,
            seed: 0,
        })
    }

    /// Checks the options against what Consul accepts and what the machine needs.
    pub fn validate(&self) -> Result<(), OptionsError> {
        check_durations(
            &[("wait", self.wait)],
            &[
                ("retry_time", self.retry_time),
                ("blind_after", self.blind_after),
                ("request_timeout", self.request_timeout),
            ],
        )
    }
}

/// Who leads: the holder of the key, as an observer saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The lock key.
    pub key: Key,
    /// The holding session.
    pub session: SessionId,
    /// The node of the session (`None` when the lookup failed, or the session was gone by then).
    pub node: Option<String>,
    /// The session's name (`Consul API Lock` for Go's client and `consul lock`, unless set).
    pub session_name: Option<String>,
    /// The key's value: what the leader wrote on acquiring, or proclaimed since.
    pub value: Vec<u8>,
    /// The key's `LockIndex` (what Go's client exposes; it restarts when the key is deleted).
    pub lock_index: u64,
    /// The fencing sequence: the key's `ModifyIndex` when this observer first saw this leader.
    /// It is the leader's own [`FencingToken::sequence`](crate::machine::FencingToken::sequence)
    /// when the observer saw the granting write itself, and larger when the leader had already
    /// proclaimed a new value by the observer's first read. It strictly increases from one
    /// leader to the next; should Consul's indexes go backwards (an agent that lost its state),
    /// it goes on from the last one given rather than go back.
    pub sequence: u64,
    /// When this observer first saw this leader.
    pub since: Instant,
}

/// What the key shows now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A leader.
    Leader(Leader),
    /// Nobody holds the key (absent, or present and free).
    NoLeader {
        /// When this observer first saw it so.
        since: Instant,
    },
}

/// What an observer reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObserveEvent {
    /// A new leader: another session holds the key, or the same session took it again after
    /// letting it go (a new `LockIndex`).
    Leader(Leader),
    /// The leader wrote a new value (a proclaim): the same leader, its new value.
    Value(Leader),
    /// Nobody leads.
    NoLeader {
        /// When this observer first saw it so.
        since: Instant,
    },
    /// Reads have failed since `since` (the last answer): the observer can't see who leads.
    Blind {
        /// The last answer's time.
        since: Instant,
        /// How long it has not seen, when reported.
        unseen_for: Duration,
        /// The last failure.
        last: String,
    },
    /// An answer came again after [`ObserveEvent::Blind`]; the changes it shows follow.
    Resumed {
        /// How long the observer did not see.
        unseen_for: Duration,
    },
    /// Consul refused the reads in a way asking again can't fix (ACLs, TLS): the observation
    /// is over.
    Failed(LockError),
}

/// A new holder whose session is being looked up.
#[derive(Clone, Debug)]
struct Lookup {
    pair: KvPair,
    pending: Pending,
}

/// A run of failed reads.
#[derive(Clone, Debug)]
struct Failing {
    /// The last answer's time (or the start).
    since: Instant,
    reported: bool,
}

/// Follows who holds a lock key, as a pure state machine with the surface of the others:
/// `handle_response`, `handle_timeout`, `poll_action`, `poll_timeout`; [`ObserveEvent`]s come
/// out of `poll_action`.
///
/// ```
/// use consul_lock_core::api::ClientConfig;
/// use consul_lock_core::machine::{Action, ObserveOptions, ObserverMachine};
/// use std::time::Instant;
///
/// let options = ObserveOptions::new("service/leader").unwrap();
/// let mut observer = ObserverMachine::new(ClientConfig::default(), options, Instant::now()).unwrap();
/// let Some(Action::Send(read)) = observer.poll_action() else { panic!() };
/// assert_eq!(read.request.uri().path(), "/v1/kv/service/leader");
/// ```
#[derive(Debug)]
pub struct ObserverMachine {
    options: ObserveOptions,
    out: Outbox<ObserveEvent>,
    rng: Rng,
    last_now: Option<Instant>,
    watch: Watch,
    lookup: Option<Lookup>,
    current: Option<Observation>,
    /// The largest sequence given so far.
    last_sequence: u64,
    /// Since when reads have answered nothing usable: set by the first failure after an answer.
    failing: Option<Failing>,
    last_answer: Instant,
    failed: bool,
}

impl ObserverMachine {
    /// An observer of `options.key` (the options are validated here), reading at once.
    pub fn new(
        config: ClientConfig,
        options: ObserveOptions,
        now: Instant,
    ) -> Result<ObserverMachine, OptionsError> {
        options.validate()?;
        config.check()?;
        let mut machine = ObserverMachine {
            rng: Rng::new(options.seed),
            options,
            out: Outbox::new(config),
            last_now: Some(now),
            watch: Watch::new(0, now),
            lookup: None,
            current: None,
            last_sequence: 0,
            failing: None,
            last_answer: now,
            failed: false,
        };
        machine.read_if_due(now);
        Ok(machine)
    }

    /// What the key showed at the last answer: `None` before the first one.
    pub fn current(&self) -> Option<&Observation> {
        self.current.as_ref()
    }

    /// The leader, as of the last answer.
    pub fn leader(&self) -> Option<&Leader> {
        match &self.current {
            Some(Observation::Leader(l)) => Some(l),
            _ => None,
        }
    }

    /// The options the machine was made with.
    pub fn options(&self) -> &ObserveOptions {
        &self.options
    }

    /// Whether the observation ended ([`ObserveEvent::Failed`]).
    pub fn is_over(&self) -> bool {
        self.failed
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action<ObserveEvent>> {
        self.out.pop()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next; never earlier than the
    /// latest `now`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pause = if self.lookup.is_none() && !self.failed {
            self.watch.timer()
        } else {
            None
        };
        read::next_timeout(pause, &self.pendings(), self.last_now)
    }

    /// Handles the passage of time: requests past their deadline time out, a pause that is
    /// over sends the next read. Calling it early, or twice, does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = read::observe(&mut self.last_now, now);
        for id in read::overdue(&self.pendings(), now) {
            self.handle_response(now, id, read::deadline_passed());
        }
        self.read_if_due(now);
    }

    /// Handles the reply to request `id`. A reply to a request the machine no longer waits for
    /// is ignored.
    pub fn handle_response(&mut self, now: Instant, id: RequestId, reply: Reply) {
        let now = read::observe(&mut self.last_now, now);
        if let Some(sent) = self.watch.pending().filter(|p| p.is(id)) {
            self.on_read(now, sent, &reply);
        } else if self.lookup.as_ref().is_some_and(|l| l.pending.is(id)) {
            self.on_lookup(now, &reply);
        } else {
            tracing::trace!(%id, "observer: ignoring a reply no longer awaited");
        }
        self.read_if_due(now);
    }

    /// The number of requests the machine is waiting on.
    pub fn in_flight(&self) -> usize {
        self.pendings().len()
    }

    fn pendings(&self) -> Pendings {
        let mut all = Pendings::default();
        all.extend(self.watch.pending());
        all.extend(self.lookup.as_ref().map(|l| l.pending));
        all
    }

    /// Sends the next read when its pause is over, unless a holder's lookup is out: changes
    /// are reported in order, so the next read waits for it.
    fn read_if_due(&mut self, now: Instant) {
        if self.failed || self.lookup.is_some() || !self.watch.due(now) {
            return;
        }
        let (index, wait) = (self.watch.index, self.options.wait);
        let get = KvGet {
            key: self.options.key.clone(),
            consistency: Consistency::Consistent,
            blocking: Some(Blocking { index, wait }),
        };
        let timeout = self.options.request_timeout;
        let pending = read::send(&mut self.out, now, &get, (index > 0).then_some(wait), timeout);
        self.watch.step = WatchStep::Read(pending);
    }

    fn on_read(&mut self, now: Instant, sent: Pending, reply: &Reply) {
        let read = match Watch::trust(decode::<KvGet>(reply)) {
            Ok(read) => read,
            Err(Failure::Fatal(e)) => {
                self.failed = true;
                self.watch.step = WatchStep::Pause(now);
                tracing::warn!(error = %e, key = %self.options.key, "observer: reads refused; stopping");
                self.out.event(ObserveEvent::Failed(LockError::refused(e)));
                return;
            }
            Err(Failure::Transient(why)) => return self.on_failure(now, why),
        };
        if let Some(failing) = self.failing.take() {
            if failing.reported {
                let unseen_for = now.saturating_duration_since(failing.since);
                tracing::info!(?unseen_for, key = %self.options.key, "observer: seeing again");
                self.out.event(ObserveEvent::Resumed { unseen_for });
            }
        }
        self.last_answer = now;
        if self
            .watch
            .still_held(now, sent, read.meta.index, self.options.wait, &mut self.rng)
        {
            // Read again at once, once what this answer shows is reported.
            self.watch.step = WatchStep::Pause(now);
        }
        self.take(now, read.value);
    }

    /// What a read showed: a change to report, a holder to look up, or nothing new.
    fn take(&mut self, now: Instant, pair: Option<KvPair>) {
        let Some(pair) = pair.filter(|p| p.session.is_some()) else {
            if !matches!(self.current, Some(Observation::NoLeader { .. })) {
                self.current = Some(Observation::NoLeader { since: now });
                self.out.event(ObserveEvent::NoLeader { since: now });
            }
            return;
        };
        if let Some(Observation::Leader(leader)) = &mut self.current {
            if pair.session.as_ref() == Some(&leader.session) && pair.lock_index == leader.lock_index {
                if pair.value != leader.value {
                    leader.value = pair.value;
                    self.out.event(ObserveEvent::Value(leader.clone()));
                }
                return;
            }
        }
        let Some(session) = pair.session.clone() else {
            return;
        };
        let pending = read::send(
            &mut self.out,
            now,
            &SessionInfo::new(session),
            None,
            self.options.request_timeout,
        );
        self.lookup = Some(Lookup { pair, pending });
    }

    /// The new holder's session, looked up: report the leader, whatever the lookup gave.
    fn on_lookup(&mut self, now: Instant, reply: &Reply) {
        let Some(Lookup { pair, .. }) = self.lookup.take() else {
            return;
        };
        let entry = match decode::<SessionInfo>(reply) {
            Ok(QueryReply { value, .. }) => value,
            Err(failure) => {
                // The leader is real whatever its session's details: report it without them.
                tracing::debug!(?failure, "observer: the holder's session lookup failed");
                None
            }
        };
        let Some(session) = pair.session else { return };
        let sequence = pair.modify_index.max(self.last_sequence.saturating_add(1));
        self.last_sequence = sequence;
        let leader = Leader {
            key: self.options.key.clone(),
            session,
            node: entry.as_ref().map(|e| e.node.clone()),
            session_name: entry.map(|e| e.name),
            value: pair.value,
            lock_index: pair.lock_index,
            sequence,
            since: now,
        };
        tracing::info!(key = %leader.key, session = %leader.session, sequence, "observer: new leader");
        self.current = Some(Observation::Leader(leader.clone()));
        self.out.event(ObserveEvent::Leader(leader));
    }

    fn on_failure(&mut self, now: Instant, why: String) {
        // No retry limit: an observer reads until it sees again.
        let _ = self.watch.failed(
            now,
            Failure::Transient(why.clone()),
            None,
            self.options.retry_time,
        );
        let since = self.last_answer;
        let failing = self.failing.get_or_insert(Failing {
            since,
            reported: false,
        });
        let unseen_for = now.saturating_duration_since(failing.since);
        if !failing.reported && unseen_for >= self.options.blind_after {
            failing.reported = true;
            tracing::warn!(?unseen_for, last = %why, "observer: can't see who leads");
            self.out.event(ObserveEvent::Blind {
                since: failing.since,
                unseen_for,
                last: why,
            });
        }
    }
}
