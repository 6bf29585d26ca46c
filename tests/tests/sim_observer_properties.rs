//! The observer machine against the simulated Consul, in virtual time, over generated runs of
//! leadership changes (campaigns, proclaims, resigns, crashes, deleted keys) and faults on the
//! observer's link and on the agent (refused connections, 500s, hung replies, a lost cluster
//! leader, an agent restart that loses its state and sends indexes backwards). Properties:
//! - order: what the observer reports (leader, value, no leader) is a subsequence of the states
//!   the key went through, each reported once (no two reports in a row alike);
//! - fencing: a leader's sequence never goes backwards, and strictly increases from one leader
//!   to the next, agent restart included;
//! - blindness: `Resumed` only after `Blind`, never two `Blind`s in a row;
//! - liveness: once the faults heal and the changes stop, the observer shows the key's final
//!   state within a bound (a hung read's deadline, a retry pause, a lookup).
//!
//! `PROPTEST_CASES` sets the number of cases (the default is the testkit's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use consul_lock_core::api::{
    ClientConfig, Endpoint, Key, KvDelete, KvLockTxn, KvProclaimTxn, KvRelease, SessionCreate,
    SessionDestroy, SessionId,
};
use consul_lock_core::machine::{
    Action, LOCK_FLAG_VALUE, Observation, ObserveEvent, ObserveOptions, ObserverMachine, Reply, RequestId,
    TransportError, TransportErrorKind,
};
use consul_lock_testkit::harness::strategies::cases;
use consul_lock_testkit::sim::{QueryId, SimConsul, SimReply};
use proptest::prelude::*;

const KEY: &str = "service/leader/.lock";
const CANDIDATES: usize = 3;

/// A change an operator (standing for the candidates) makes, straight on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// Candidate `c` takes the key if free (creating its session first if it has none).
    Campaign(usize),
    /// Candidate `c` writes a new value, if it holds the key (check-session + lock).
    Proclaim(usize),
    /// Candidate `c` releases the key.
    Resign(usize),
    /// Candidate `c`'s session is destroyed.
    Crash(usize),
    /// The key is deleted.
    DeleteKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum FaultKind {
    Refuse,
    Error500,
    /// Requests reach the server; the replies are lost.
    Hang,
    /// The cluster loses its leader.
    NoLeader,
    /// The agent restarts with its state lost (a dev agent): indexes start again low, sessions
    /// and keys are gone, parked reads are cut.
    Restart,
}

#[derive(Clone, Debug)]
struct Fault {
    kind: FaultKind,
    from: Duration,
    lasting: Duration,
}

impl Fault {
    fn until(&self) -> Duration {
        if self.kind == FaultKind::Restart {
            self.from
        } else {
            self.from + self.lasting
        }
    }

    fn active(&self, t: Duration) -> bool {
        self.kind != FaultKind::Restart && t >= self.from && t < self.from + self.lasting
    }
}

#[derive(Clone, Debug)]
struct Run {
    seed: u64,
    ops: Vec<(Duration, Op)>,
    faults: Vec<Fault>,
}

/// A request on its way to the server.
type Outgoing = (RequestId, http::Request<Vec<u8>>);

/// The key's state as the observer reports it: holder session and value, or nobody.
type State = Option<(String, u64, Vec<u8>)>;

struct World {
    run: Run,
    base: Instant,
    now: Instant,
    sim: SimConsul,
    observer: ObserverMachine,
    options: ObserveOptions,
    config: ClientConfig,
    /// Deliveries to the observer, by time.
    queue: BTreeMap<(Instant, u64), (RequestId, Reply)>,
    /// Requests reaching the server, by time.
    to_server: BTreeMap<(Instant, u64), Outgoing>,
    seq: u64,
    parked: HashMap<QueryId, RequestId>,
    sessions: Vec<Option<SessionId>>,
    values: u64,
    /// Every state the key went through, in order.
    history: Vec<State>,
    events: Vec<(Duration, ObserveEvent)>,
    faults_done: Vec<bool>,
    leader_lost: bool,
}

fn latency() -> Duration {
    Duration::from_millis(2)
}

impl World {
    fn new(run: Run) -> World {
        let base = Instant::now();
        let mut options = ObserveOptions::new(KEY).unwrap();
        options.wait = Duration::from_secs(15);
        options.seed = run.seed;
        let config = ClientConfig::default();
        let observer = ObserverMachine::new(config.clone(), options.clone(), base).unwrap();
        let faults_done = vec![false; run.faults.len()];
        World {
            sim: SimConsul::new(run.seed, base),
            run,
            base,
            now: base,
            observer,
            options,
            config,
            queue: BTreeMap::new(),
            to_server: BTreeMap::new(),
            seq: 0,
            parked: HashMap::new(),
            sessions: vec![None; CANDIDATES],
            values: 0,
            history: vec![None],
            events: Vec::new(),
            faults_done,
            leader_lost: false,
        }
    }

    fn t(&self) -> Duration {
        self.now - self.base
    }

    fn fault_now(&self) -> Option<FaultKind> {
        let t = self.t();
        self.run
            .faults
            .iter()
            .find(|f| f.active(t) && f.kind != FaultKind::NoLeader)
            .map(|f| f.kind.clone())
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The observer's actions: requests onto the wire (or failed by a fault), events recorded.
    fn drain(&mut self) {
        while let Some(action) = self.observer.poll_action() {
            match action {
                Action::Event(e) => {
                    let t = self.t();
                    self.events.push((t, e));
                }
                Action::Send(transmit) => {
                    let seq = self.next_seq();
                    let at = self.now + latency();
                    match self.fault_now() {
                        Some(FaultKind::Refuse) => {
                            let reply = Err(TransportError::new(TransportErrorKind::Connect, "refused"));
                            self.queue.insert((at, seq), (transmit.id, reply));
                        }
                        Some(FaultKind::Error500) => {
                            let reply = http::Response::builder()
                                .status(500)
                                .body(b"injected".to_vec())
                                .unwrap();
                            self.queue.insert((at, seq), (transmit.id, Ok(reply)));
                        }
                        _ => {
                            self.to_server.insert((at, seq), (transmit.id, transmit.request));
                        }
                    }
                }
            }
        }
    }

    /// A reply from the server to the observer (lost while the link hangs).
    fn reply_to_observer(&mut self, id: RequestId, reply: Reply) {
        if self.fault_now() == Some(FaultKind::Hang) {
            return;
        }
        let seq = self.next_seq();
        self.queue.insert((self.now + latency(), seq), (id, reply));
    }

    /// An operator's request, answered at once (or refused without a leader).
    fn call<E: Endpoint>(&mut self, endpoint: &E) -> Option<E::Output> {
        let request = endpoint.encode(&self.config);
        match self.sim.handle(self.now, &request) {
            SimReply::Now(response) => E::decode(&response).ok(),
            SimReply::Parked(_) => None,
        }
    }

    fn key_state(&self) -> State {
        self.sim
            .kv(KEY)
            .and_then(|e| e.session.clone().map(|s| (s, e.lock_index, e.value.clone())))
    }

    fn record(&mut self) {
        let state = self.key_state();
        if self.history.last() != Some(&state) {
            self.history.push(state);
        }
    }

    fn session(&mut self, c: usize) -> Option<SessionId> {
        if let Some(s) = &self.sessions[c] {
            if self.sim.session(s.as_str()).is_some() {
                return Some(s.clone());
            }
        }
        let create = SessionCreate {
            name: Some(format!("cand-{c}")),
            lock_delay: Some(Duration::ZERO),
            ..SessionCreate::default()
        };
        let id = self.call(&create)?;
        self.sessions[c] = Some(id.clone());
        Some(id)
    }

    fn apply(&mut self, op: &Op) {
        let key = Key::new(KEY).unwrap();
        self.values += 1;
        let value = format!("v{}", self.values).into_bytes();
        match *op {
            Op::Campaign(c) => {
                if let Some(session) = self.session(c) {
                    let _ = self.call(&KvLockTxn {
                        key,
                        session,
                        flags: LOCK_FLAG_VALUE,
                        value,
                    });
                }
            }
            Op::Proclaim(c) | Op::Resign(c) => {
                // Only a candidate with a session can write as one.
                if let Some(session) = self.sessions[c].clone() {
                    let write = KvLockTxn {
                        key,
                        session,
                        flags: LOCK_FLAG_VALUE,
                        value,
                    };
                    if matches!(op, Op::Proclaim(_)) {
                        let _ = self.call(&KvProclaimTxn(write));
                    } else {
                        let KvLockTxn {
                            key,
                            session,
                            flags,
                            value,
                        } = write;
                        let _ = self.call(&KvRelease {
                            key,
                            session,
                            flags,
                            value,
                        });
                    }
                }
            }
            Op::Crash(c) => {
                if let Some(id) = self.sessions[c].take() {
                    let _ = self.call(&SessionDestroy { id });
                }
            }
            Op::DeleteKey => {
                let _ = self.call(&KvDelete { key });
            }
        }
        self.record();
    }

    fn route_woken(&mut self, woken: Vec<(QueryId, http::Response<Vec<u8>>)>) {
        for (query, response) in woken {
            if let Some(id) = self.parked.remove(&query) {
                self.reply_to_observer(id, Ok(response));
            }
        }
    }

    fn step(&mut self) {
        let t = self.t();
        for i in 0..self.run.faults.len() {
            let fault = self.run.faults[i].clone();
            if !self.faults_done[i] && t >= fault.from {
                self.faults_done[i] = true;
                if fault.kind == FaultKind::Restart {
                    // Connections are cut: parked reads fail.
                    for (_, id) in std::mem::take(&mut self.parked) {
                        let reply = Err(TransportError::new(TransportErrorKind::Io, "connection reset"));
                        self.reply_to_observer(id, reply);
                    }
                    self.sim = SimConsul::new(self.run.seed.wrapping_add(1), self.now);
                    self.sessions = vec![None; CANDIDATES];
                    self.record();
                }
            }
        }
        let no_leader = self
            .run
            .faults
            .iter()
            .any(|f| f.kind == FaultKind::NoLeader && f.active(t));
        if no_leader != self.leader_lost {
            self.leader_lost = no_leader;
            self.sim.set_leader(self.now, !no_leader);
        }
        let due: Vec<Op> = self
            .run
            .ops
            .iter()
            .filter(|(at, _)| *at == t)
            .map(|(_, op)| op.clone())
            .collect();
        for op in due {
            self.apply(&op);
        }
        let woken = self.sim.advance(self.now);
        self.route_woken(woken);
        while let Some(entry) = self.to_server.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (id, request) = entry.remove();
            match self.sim.handle(self.now, &request) {
                SimReply::Now(response) => self.reply_to_observer(id, Ok(response)),
                SimReply::Parked(query) => {
                    self.parked.insert(query, id);
                }
            }
        }
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (id, reply) = entry.remove();
            self.observer.handle_response(self.now, id, reply);
            self.drain();
        }
        if self.observer.poll_timeout().is_some_and(|at| at <= self.now) {
            self.observer.handle_timeout(self.now);
        }
        self.drain();
        if let Some(at) = self.observer.poll_timeout() {
            assert!(at >= self.now, "poll_timeout before now");
        }
    }

    fn next_time(&self, end: Instant) -> Option<Instant> {
        let mut times: Vec<Instant> = Vec::new();
        times.extend(self.queue.keys().next().map(|(t, _)| *t));
        times.extend(self.to_server.keys().next().map(|(t, _)| *t));
        times.extend(self.sim.poll_timeout());
        times.extend(self.observer.poll_timeout());
        for (at, _) in &self.run.ops {
            times.push(self.base + *at);
        }
        for f in &self.run.faults {
            times.push(self.base + f.from);
            times.push(self.base + f.from + f.lasting);
        }
        times.into_iter().filter(|t| *t > self.now && *t <= end).min()
    }

    fn play_until(&mut self, end: Instant) {
        self.step();
        let mut steps = 0;
        while let Some(t) = self.next_time(end) {
            steps += 1;
            assert!(steps < 500_000, "no progress");
            self.now = t;
            self.step();
        }
        self.now = end;
        self.step();
    }
}

/// What an observation shows, as a state.
fn shown(o: Option<&Observation>) -> Option<State> {
    match o? {
        Observation::NoLeader { .. } => Some(None),
        Observation::Leader(l) => Some(Some((l.session.to_string(), l.lock_index, l.value.clone()))),
    }
}

fn check(run: Run) -> Result<(), TestCaseError> {
    let last_op = run.ops.iter().map(|(t, _)| *t).max().unwrap_or_default();
    let healed = run.faults.iter().map(Fault::until).max().unwrap_or_default();
    let mut world = World::new(run);
    let o = &world.options;
    // A hung read's deadline, a retry pause, a lookup, and the links' latency.
    let bound = o.wait + o.wait / 16 + Duration::from_secs(5) + o.retry_time + Duration::from_secs(1);
    let settled = last_op.max(healed);
    let end = world.base + settled + bound;
    world.play_until(end);

    // Liveness: the final state, shown by the bound.
    let truth = world.key_state();
    let seen = shown(world.observer.current());
    prop_assert_eq!(
        seen,
        Some(truth.clone()),
        "settled at {:?}, bound {:?}; history {:?}; events {:#?}",
        settled,
        bound,
        world.history,
        world.events
    );

    // Order: the reports keep their rules, and the states they show are a subsequence of the
    // key's states.
    let events: Vec<ObserveEvent> = world.events.iter().map(|(_, e)| e.clone()).collect();
    consul_lock_checker::observe::check_reports(&events).map_err(|e| {
        TestCaseError::fail(format!(
            "{e}; history {:?}; events {:#?}",
            world.history, world.events
        ))
    })?;
    let reported: Vec<State> = events
        .iter()
        .filter_map(|e| match e {
            ObserveEvent::Leader(l) | ObserveEvent::Value(l) => {
                Some(Some((l.session.to_string(), l.lock_index, l.value.clone())))
            }
            ObserveEvent::NoLeader { .. } => Some(None),
            _ => None,
        })
        .collect();
    let mut history = world.history.iter();
    for state in &reported {
        prop_assert!(
            history.any(|h| h == state),
            "{state:?} is not a later state of the key; history {:?}; reported {reported:?}",
            world.history
        );
    }
    Ok(())
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CANDIDATES;
    prop_oneof![
        3 => c.clone().prop_map(Op::Campaign),
        2 => c.clone().prop_map(Op::Proclaim),
        2 => c.clone().prop_map(Op::Resign),
        1 => c.prop_map(Op::Crash),
        1 => Just(Op::DeleteKey),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    let kind = prop_oneof![
        Just(FaultKind::Refuse),
        Just(FaultKind::Error500),
        Just(FaultKind::Hang),
        Just(FaultKind::NoLeader),
        Just(FaultKind::Restart),
    ];
    (kind, 0u64..60_000, 100u64..30_000).prop_map(|(kind, from, lasting)| Fault {
        kind,
        from: Duration::from_millis(from),
        lasting: Duration::from_millis(lasting),
    })
}

fn run() -> impl Strategy<Value = Run> {
    (
        any::<u64>(),
        proptest::collection::vec((0u64..60_000, op()), 1..30),
        proptest::collection::vec(fault(), 0..=3),
    )
        .prop_map(|(seed, ops, faults)| Run {
            seed,
            ops: ops
                .into_iter()
                .map(|(ms, op)| (Duration::from_millis(ms), op))
                .collect(),
            faults,
        })
}

#[test]
fn a_restart_that_sends_indexes_backwards_keeps_the_sequence_going_up() {
    let run = Run {
        seed: 3,
        ops: vec![
            (Duration::from_secs(1), Op::Campaign(0)),
            (Duration::from_secs(3), Op::Proclaim(0)),
            (Duration::from_secs(10), Op::Campaign(1)),
        ],
        faults: vec![Fault {
            kind: FaultKind::Restart,
            from: Duration::from_secs(5),
            lasting: Duration::ZERO,
        }],
    };
    check(run.clone()).unwrap();
    let mut world = World::new(run);
    world.play_until(world.base + Duration::from_secs(60));
    let leaders: Vec<(String, u64)> = world
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ObserveEvent::Leader(l) => Some((l.session_name.clone().unwrap_or_default(), l.sequence)),
            _ => None,
        })
        .collect();
    assert_eq!(leaders.len(), 2, "{:#?}", world.events);
    assert_eq!(leaders[0].0, "cand-0");
    assert_eq!(leaders[1].0, "cand-1");
    assert!(leaders[1].1 > leaders[0].1, "{leaders:?}");
    assert!(
        world
            .events
            .iter()
            .any(|(_, e)| matches!(e, ObserveEvent::Value(_))),
        "the proclaim was seen: {:#?}",
        world.events
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn observers_keep_order_and_fencing_and_see_the_final_leader(run in run()) {
        check(run)?;
    }
}
