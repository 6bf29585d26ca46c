//! The reliability lab (`consul-lock-bench lab`): a real Consul cluster (three servers and a
//! client agent per contender node, [`consul_lock_testkit::cluster`]) inside the process's own
//! network namespace, contenders of every client under test on every node taking one lock per
//! client in turn and writing to a fenced resource while they believe they hold it, and a schedule
//! of faults; then the checker's verdict ([`consul_lock_checker::lab`]) per fault kind, the
//! clients side by side. See `RELIABILITY.md` for the method and the figures.
//!
//! The command must run as root inside a network namespace of its own (`unshare --net`; best as
//! the first process of a PID namespace too, so that nothing it starts can outlive it:
//! `unshare --net --pid --fork --kill-child consul-lock-bench lab ...`). Every loop is bounded:
//! the schedule ends after its duration, each wait has a deadline.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use consul_lock_checker::lab::{self as verdict, Belief, FaultWindow, Record, Report, Row};
use consul_lock_testkit::cluster::{Cluster, ClusterError, ClusterOptions};
use serde::Serialize;

use crate::error::BenchError;
use crate::host::{ClientKind, Contenders, Launcher};
use crate::protocol::{Command, Event, now_ns};

/// A fault the lab injects, healed after [`LabPlan::fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum FaultKind {
    /// The leader cut off from every other agent, both ways: it keeps answering what it can
    /// until its leader lease runs out, the others elect a new leader.
    IsolateLeader,
    /// The leader's packets to everyone dropped, theirs to it delivered (one-way).
    LeaderOneWay,
    /// The leader and one client agent (a holder's) on the minority side of a split.
    SplitLeaderMinority,
    /// One follower and one client agent (a holder's) on the minority side; the leader keeps
    /// the majority.
    SplitFollowerMinority,
    /// A holder's client agent cut off from every server (answers "No cluster leader" at once).
    CutClient,
    /// The leader frozen (`SIGSTOP`), then thawed.
    PauseLeader,
    /// The leader killed (`SIGKILL`), then restarted with its data.
    KillLeader,
    /// A holder's client agent frozen, then thawed.
    PauseClient,
    /// A holder's client agent killed, then restarted.
    KillClient,
    /// The leader leaves gracefully (`consul leave`): a forced election; it comes back at the heal.
    Election,
}

impl FaultKind {
    /// Every kind, in schedule order.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::IsolateLeader,
        FaultKind::CutClient,
        FaultKind::PauseClient,
        FaultKind::KillLeader,
        FaultKind::LeaderOneWay,
        FaultKind::SplitLeaderMinority,
        FaultKind::SplitFollowerMinority,
        FaultKind::PauseLeader,
        FaultKind::KillClient,
        FaultKind::Election,
    ];

    /// The short schedule CI runs: the faults the issue names as the ones that hurt locks.
    pub const SHORT: [FaultKind; 4] = [
        FaultKind::IsolateLeader,
        FaultKind::CutClient,
        FaultKind::PauseClient,
        FaultKind::KillLeader,
    ];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::IsolateLeader => "isolate-leader",
            FaultKind::LeaderOneWay => "leader-one-way",
            FaultKind::SplitLeaderMinority => "split-leader-minority",
            FaultKind::SplitFollowerMinority => "split-follower-minority",
            FaultKind::CutClient => "cut-client",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::PauseClient => "pause-client",
            FaultKind::KillClient => "kill-client",
            FaultKind::Election => "election",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What the lab runs.
#[derive(Clone, Debug, Serialize)]
pub struct LabPlan {
    /// How long faults are injected for (the schedule repeats its kinds until then).
    pub duration: Duration,
    /// How long each fault lasts.
    pub fault: Duration,
    /// Quiet time after each heal (also the grace in which a loss still counts against it).
    pub settle: Duration,
    /// The fault kinds, in turn.
    pub kinds: Vec<FaultKind>,
    /// The clients under test; each takes a lock of its own.
    pub clients: Vec<ClientKind>,
    /// Consul servers.
    pub servers: usize,
    /// Client agents, each with one contender of every client.
    pub nodes: usize,
    /// The session TTL.
    pub ttl: Duration,
    /// The session lock-delay.
    pub lock_delay: Duration,
    /// How long a holder keeps the lock before releasing it, outside faults (so that the lock
    /// changes hands without faults too); during a fault holders keep it.
    pub hold: Duration,
    /// How often a holder writes to the fenced resource.
    pub write_every: Duration,
}

impl LabPlan {
    /// The short schedule CI runs: the four [`FaultKind::SHORT`] faults once each (about 3
    /// minutes of faults).
    pub fn short(clients: Vec<ClientKind>) -> LabPlan {
        LabPlan {
            duration: Duration::from_secs(150),
            kinds: FaultKind::SHORT.to_vec(),
            ..LabPlan::long(clients, Duration::from_secs(30 * 60))
        }
    }

    /// Every fault kind in turn for `duration`.
    pub fn long(clients: Vec<ClientKind>, duration: Duration) -> LabPlan {
        LabPlan {
            duration,
            // Longer than twice the TTL, so that a session the servers stop hearing from is
            // invalidated during the fault.
            fault: Duration::from_secs(25),
            settle: Duration::from_secs(15),
            kinds: FaultKind::ALL.to_vec(),
            clients,
            servers: 3,
            nodes: 3,
            ttl: Duration::from_secs(10),
            // Not below the TTL: Consul invalidates a session as soon as its node's serfHealth
            // check fails (seconds after a client agent stops answering), and from then only the
            // lock-delay keeps a new holder out, so a holder's belief up to a TTL after its last
            // renew is safe only while the lock-delay is at least the TTL (RELIABILITY.md).
            lock_delay: Duration::from_secs(10),
            hold: Duration::from_secs(4),
            write_every: Duration::from_millis(200),
        }
    }
}

/// The run's outcome, as written to JSON.
#[derive(Debug, Serialize)]
pub struct LabResults {
    /// The plan.
    pub plan: LabPlan,
    /// The faults injected, in order.
    pub faults: Vec<FaultRecord>,
    /// Per client, per fault kind (and "no fault", "all"): the checker's figures.
    pub rows: Vec<LabRow>,
    /// Error events the contenders reported (failed acquires and releases under faults).
    pub contender_errors: Vec<(String, usize)>,
    /// The log the verdict was drawn from: every belief and write (written next to the JSON by
    /// [`write()`], one line each).
    #[serde(skip)]
    pub records: Vec<Record>,
}

/// One fault as injected.
#[derive(Debug, Serialize)]
pub struct FaultRecord {
    /// Its kind's name.
    pub kind: &'static str,
    /// Which agent it hit.
    pub target: String,
    /// When it was injected and healed (ns of the machine's clock).
    pub start_ns: u64,
    /// When it was healed.
    pub heal_ns: u64,
}

/// The checker's [`Row`] for one client and fault kind, in JSON form.
#[derive(Debug, Serialize)]
pub struct LabRow {
    /// The client.
    pub client: String,
    /// The fault kind, [`verdict::NO_FAULT`], or `all`.
    pub fault: String,
    /// Faults of this kind.
    pub faults: usize,
    /// Grants.
    pub grants: usize,
    /// Overlapping belief intervals.
    pub overlaps: usize,
    /// Their total, in milliseconds.
    pub overlap_ms: u64,
    /// Writes.
    pub writes: usize,
    /// Writes the fenced register refused.
    pub stale_refused: usize,
    /// Writes the register took although a higher sequence had been granted.
    pub stale_accepted: usize,
    /// Grants not above every earlier grant.
    pub seq_regressions: usize,
    /// Grants whose sequence the client could not tell.
    pub seq_unknown: usize,
    /// Median time from a heal to a holder, ms.
    pub to_holder_p50_ms: Option<u64>,
    /// Longest time from a heal to a holder, ms.
    pub to_holder_max_ms: Option<u64>,
    /// Heals after which nobody held before the next fault.
    pub no_holder_after_heal: usize,
    /// Losses.
    pub losses: usize,
    /// Losses outside every fault window.
    pub unexplained_losses: usize,
}

impl LabRow {
    fn new(client: &str, fault: &str, row: &Row) -> LabRow {
        let mut times = row.time_to_holder_ns.clone();
        times.sort_unstable();
        LabRow {
            client: client.to_owned(),
            fault: fault.to_owned(),
            faults: row.faults,
            grants: row.grants,
            overlaps: row.overlaps,
            overlap_ms: row.overlap_ns / 1_000_000,
            writes: row.writes,
            stale_refused: row.stale_refused,
            stale_accepted: row.stale_accepted,
            seq_regressions: row.seq_regressions,
            seq_unknown: row.seq_unknown,
            to_holder_p50_ms: times.get(times.len() / 2).map(|ns| ns / 1_000_000),
            to_holder_max_ms: times.last().map(|ns| ns / 1_000_000),
            no_holder_after_heal: row.no_holder_after_heal,
            losses: row.losses,
            unexplained_losses: row.unexplained_losses,
        }
    }
}

impl LabResults {
    /// The rows of `report`, per fault kind then client, with an `all` row per client last.
    fn rows(report: &Report, plan: &LabPlan) -> Vec<LabRow> {
        let mut kinds: Vec<String> = plan.kinds.iter().map(|k| k.name().to_owned()).collect();
        kinds.sort();
        kinds.dedup();
        kinds.push(verdict::NO_FAULT.to_owned());
        let mut rows = Vec::new();
        for kind in &kinds {
            for client in &plan.clients {
                let key = (client.name().to_owned(), kind.clone());
                if let Some(row) = report.rows.get(&key) {
                    rows.push(LabRow::new(client.name(), kind, row));
                }
            }
        }
        for client in &plan.clients {
            rows.push(LabRow::new(client.name(), "all", &report.total(client.name())));
        }
        rows
    }

    /// The table: one line per fault kind and client, the clients of a kind side by side.
    pub fn table(&self) -> String {
        let ms = |v: Option<u64>| v.map_or("-".to_owned(), |ms| format!("{:.1}", ms as f64 / 1000.0));
        let mut out = String::from(
            "| fault | n | client | grants | overlaps (ms) | stale writes accepted | refused | seq regressions | \
             new holder after heal p50 / max (s) | no holder | losses (unexplained) |\n\
             |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} / {} | {} | {} ({}) |\n",
                r.fault,
                r.faults,
                r.client,
                r.grants,
                r.overlaps,
                r.overlap_ms,
                r.stale_accepted,
                r.stale_refused,
                r.seq_regressions,
                ms(r.to_holder_p50_ms),
                ms(r.to_holder_max_ms),
                r.no_holder_after_heal,
                r.losses,
                r.unexplained_losses,
            ));
        }
        out
    }

    /// The `all` row of `client`.
    pub fn total(&self, client: ClientKind) -> Option<&LabRow> {
        self.rows
            .iter()
            .find(|r| r.client == client.name() && r.fault == "all")
    }
}

/// Where a contender stands, as the lab drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// A `lock` is out.
    Waiting,
    /// Held since then.
    Held(Instant),
    /// An `unlock` is out (or the loss was reported and the Rust contender is releasing).
    Releasing,
    /// The last attempt failed; the next `lock` goes out then (a Go user's `Lock` returns at
    /// once on a refused connection, and would not be called again in a tight loop).
    Retry(Instant),
}

/// The pause before asking again after a failed attempt.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// One contender process: one client, on one node.
struct Seat {
    kind: ClientKind,
    node: usize,
    process: Contenders,
    id: u64,
    stage: Stage,
    /// When `stage` last changed (for the lab's account of a client with no holder).
    since: Instant,
    /// The session of the seat's last grant.
    session: Option<String>,
}

impl Seat {
    fn enter(&mut self, stage: Stage) {
        self.stage = stage;
        self.since = Instant::now();
    }
}

/// The running lab: cluster, contenders, log.
struct Lab<'a> {
    plan: &'a LabPlan,
    cluster: Cluster,
    seats: Vec<Seat>,
    next_id: u64,
    records: Vec<Record>,
    errors: Vec<(String, usize)>,
    progress: &'a mut dyn Write,
    /// A fault is in force: holders keep the lock (a holder that let go on its own schedule
    /// would dodge the fault instead of having to notice it).
    faulted: bool,
}

fn cluster_err(e: ClusterError) -> BenchError {
    BenchError::Request {
        what: "the lab's cluster",
        msg: e.to_string(),
    }
}

impl Lab<'_> {
    fn key(kind: ClientKind) -> String {
        format!("lab/{}", kind.name())
    }

    fn lock(&mut self, seat: usize) -> Result<(), BenchError> {
        self.next_id += 1;
        let id = self.next_id;
        let addr = self.cluster.agents()[self.cluster.clients()[self.seats[seat].node]].http_addr();
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let seat = &mut self.seats[seat];
        seat.id = id;
        seat.enter(Stage::Waiting);
        seat.process.send(&Command::Lock {
            id,
            addr,
            key: Lab::key(seat.kind),
            ttl_ms: millis(self.plan.ttl),
            lock_delay_ms: Some(millis(self.plan.lock_delay)),
            shared_client: false,
            queued: false,
            write_ms: Some(millis(self.plan.write_every)),
        })
    }

    fn record(&mut self, seat: usize, t_ns: u64, belief: Belief) {
        let seat = &self.seats[seat];
        self.records.push(Record {
            group: seat.kind.name().to_owned(),
            contender: seat.id,
            t_ns,
            belief,
        });
    }

    /// Reads every event that has arrived, logs beliefs and writes, and moves the lock around:
    /// a holder releases after `hold`, a contender whose turn ended asks again.
    fn pump(&mut self) -> Result<(), BenchError> {
        for s in 0..self.seats.len() {
            while let Some(event) = self.seats[s].process.next(Duration::ZERO)? {
                let current = event.id() == Some(self.seats[s].id);
                match event {
                    Event::Held {
                        t_ns, seq, session, ..
                    } if current => {
                        self.record(s, t_ns, Belief::Held { seq });
                        self.seats[s].enter(Stage::Held(Instant::now()));
                        self.seats[s].session = Some(session);
                    }
                    Event::Write { t_ns, seq, .. } if current => self.record(s, t_ns, Belief::Write { seq }),
                    Event::Lost { t_ns, .. } if current => {
                        self.record(s, t_ns, Belief::Lost);
                        if self.seats[s].kind == ClientKind::Go {
                            // Go's contender forgets a lost lock; ask again at once.
                            self.lock(s)?;
                        } else {
                            // Ours keep the lost guard until told to release it.
                            self.seats[s].enter(Stage::Releasing);
                            let id = self.seats[s].id;
                            self.seats[s].process.unlock(id)?;
                        }
                    }
                    Event::Unlocking { t_ns, .. } if current => self.record(s, t_ns, Belief::Released),
                    Event::Unlocked { .. } if current => self.lock(s)?,
                    Event::Error { msg, .. } => {
                        let name = self.seats[s].kind.name();
                        match self.errors.iter_mut().find(|(n, _)| n == name) {
                            Some((_, count)) => *count += 1,
                            None => self.errors.push((name.to_owned(), 1)),
                        }
                        let _ = writeln!(self.progress, "lab: {name} contender: {msg}");
                        // A failed acquire ends that attempt; Go's failed release ends its turn
                        // without `unlocked` (ours report `unlocked` first).
                        let stage = self.seats[s].stage;
                        let go_release = stage == Stage::Releasing && self.seats[s].kind == ClientKind::Go;
                        if current && (stage == Stage::Waiting || go_release) {
                            self.seats[s].enter(Stage::Retry(Instant::now() + RETRY_PAUSE));
                        }
                    }
                    _ => {}
                }
            }
            if let Stage::Retry(at) = self.seats[s].stage
                && Instant::now() >= at
            {
                self.lock(s)?;
            }
            if let Stage::Held(since) = self.seats[s].stage
                && since.elapsed() >= self.plan.hold
                && !self.faulted
            {
                self.seats[s].enter(Stage::Releasing);
                let id = self.seats[s].id;
                self.seats[s].process.unlock(id)?;
            }
        }
        Ok(())
    }

    /// Writes, for every client none of whose contenders holds, where each contender stands
    /// and who holds the key as a client agent sees it: what to look at when a client stops
    /// taking the lock.
    fn account_for_no_holder(&mut self) {
        let mut kinds: Vec<ClientKind> = self.seats.iter().map(|s| s.kind).collect();
        kinds.dedup();
        for kind in kinds {
            let seats: Vec<&Seat> = self.seats.iter().filter(|s| s.kind == kind).collect();
            if seats.iter().any(|s| matches!(s.stage, Stage::Held(_))) {
                continue;
            }
            let stands: Vec<String> = seats
                .iter()
                .map(|s| {
                    let name = &self.cluster.agents()[self.cluster.clients()[s.node]].name;
                    format!(
                        "{name} #{} {:?} for {}s",
                        s.id,
                        s.stage,
                        s.since.elapsed().as_secs()
                    )
                })
                .collect();
            let path = format!("/v1/kv/{}", Lab::key(kind));
            let key = self
                .cluster
                .clients()
                .into_iter()
                .find_map(|c| self.cluster.get(c, &path))
                .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|v| v.get(0).and_then(|e| e.get("Session")).cloned());
            let holder = match key.as_ref().and_then(|s| s.as_str()) {
                None => "free (or unreadable)".to_owned(),
                Some(session) => {
                    let whose = seats
                        .iter()
                        .find(|s| s.session.as_deref() == Some(session))
                        .map_or("no contender's current grant".to_owned(), |s| {
                            format!("#{}'s grant", s.id)
                        });
                    format!("held by session {session} ({whose})")
                }
            };
            let _ = writeln!(
                self.progress,
                "lab: no {} holder: {}; key {holder}",
                kind.name(),
                stands.join(", ")
            );
        }
    }

    fn pump_for(&mut self, span: Duration) -> Result<(), BenchError> {
        let until = Instant::now() + span;
        while Instant::now() < until {
            self.pump()?;
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Pumps until the cluster has a leader every client agent sees, up to 2 minutes.
    fn settle(&mut self) -> Result<usize, BenchError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.cluster.wait_ready(Duration::ZERO) {
                Ok(leader) => return Ok(leader),
                Err(e) if Instant::now() > deadline => return Err(cluster_err(e)),
                Err(_) => self.pump_for(Duration::from_millis(500))?,
            }
        }
    }

    /// The node (client agent index into `clients()`) where `kind` holds now, else `fallback`.
    fn holder_node(&self, kind: ClientKind, fallback: usize) -> usize {
        self.seats
            .iter()
            .find(|s| s.kind == kind && matches!(s.stage, Stage::Held(_)))
            .map_or(fallback, |s| s.node)
    }

    /// Injects `fault` (round `round`), returning the agent hit, how to heal it, and when the
    /// fault began: after the wait for a settled cluster, before the fault is applied (a
    /// leader's graceful `leave` takes seconds, and what it does to the locks meanwhile is the
    /// fault's).
    fn inject(&mut self, fault: FaultKind, round: usize) -> Result<(usize, Heal, u64), BenchError> {
        let leader = self.settle()?;
        let servers = self.cluster.servers();
        let clients = self.cluster.clients();
        // Client faults hit the holder of each client under test in turn.
        let kind = self.plan.clients[round % self.plan.clients.len()];
        let node = clients[self.holder_node(kind, round % clients.len())];
        let follower = *servers.iter().find(|&&s| s != leader).unwrap_or(&leader);
        let count = self.cluster.agents().len();
        let others = |keep: &[usize]| -> Vec<usize> { (0..count).filter(|i| !keep.contains(i)).collect() };
        let c = &mut self.cluster;
        let start_ns = now_ns();
        let done = match fault {
            FaultKind::IsolateLeader => c.isolate(leader).map(|()| (leader, Heal::Network)),
            FaultKind::LeaderOneWay => c
                .block(&[leader], &others(&[leader]))
                .map(|()| (leader, Heal::Network)),
            FaultKind::SplitLeaderMinority => {
                let side = [leader, node];
                c.partition(&side, &others(&side))
                    .map(|()| (leader, Heal::Network))
            }
            FaultKind::SplitFollowerMinority => {
                let side = [follower, node];
                c.partition(&side, &others(&side))
                    .map(|()| (follower, Heal::Network))
            }
            FaultKind::CutClient => c.partition(&[node], &servers).map(|()| (node, Heal::Network)),
            FaultKind::PauseLeader => c.pause(leader).map(|()| (leader, Heal::Resume)),
            FaultKind::PauseClient => c.pause(node).map(|()| (node, Heal::Resume)),
            FaultKind::KillLeader => c.kill(leader).map(|()| (leader, Heal::Restart)),
            FaultKind::KillClient => c.kill(node).map(|()| (node, Heal::Restart)),
            FaultKind::Election => c.leave(leader).map(|()| (leader, Heal::Restart)),
        };
        done.map(|(target, heal)| (target, heal, start_ns))
            .map_err(cluster_err)
    }

    fn heal(&mut self, target: usize, heal: Heal) -> Result<(), BenchError> {
        match heal {
            Heal::Network => self.cluster.heal(),
            Heal::Resume => self.cluster.resume(target),
            Heal::Restart => self.cluster.restart(target),
        }
        .map_err(cluster_err)
    }
}

/// How a fault is undone.
#[derive(Clone, Copy, Debug)]
enum Heal {
    Network,
    Resume,
    Restart,
}

/// Runs the lab: starts the cluster in `dir` (removed afterwards), the contenders, the schedule;
/// returns the verdict. Progress lines go to `progress`.
pub fn run(
    plan: &LabPlan,
    launcher: &Launcher,
    dir: PathBuf,
    progress: &mut dyn Write,
) -> Result<LabResults, BenchError> {
    let cluster = Cluster::start(&ClusterOptions {
        servers: plan.servers,
        clients: plan.nodes,
        dir,
    })
    .map_err(cluster_err)?;
    let _ = writeln!(
        progress,
        "lab: cluster up ({} servers, {} client agents); contenders: {:?}",
        plan.servers,
        plan.nodes,
        plan.clients.iter().map(|c| c.name()).collect::<Vec<_>>()
    );
    let mut seats = Vec::new();
    for &kind in &plan.clients {
        for node in 0..plan.nodes {
            seats.push(Seat {
                kind,
                node,
                process: Contenders::spawn(kind, launcher)?,
                id: 0,
                stage: Stage::Waiting,
                since: Instant::now(),
                session: None,
            });
        }
    }
    let mut lab = Lab {
        plan,
        cluster,
        seats,
        next_id: 0,
        records: Vec::new(),
        errors: Vec::new(),
        progress,
        faulted: false,
    };
    for s in 0..lab.seats.len() {
        lab.lock(s)?;
    }
    // A quiet start: the locks change hands with no fault first.
    lab.pump_for(plan.settle)?;
    let started = Instant::now();
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut round = 0;
    while started.elapsed() < plan.duration {
        lab.account_for_no_holder();
        let kind = plan.kinds[round % plan.kinds.len()];
        let (target, heal, start_ns) = lab.inject(kind, round)?;
        lab.faulted = true;
        let name = lab.cluster.agents()[target].name.clone();
        let _ = writeln!(
            lab.progress,
            "lab: {:>4}s {} on {name}",
            started.elapsed().as_secs(),
            kind.name()
        );
        lab.pump_for(plan.fault)?;
        lab.heal(target, heal)?;
        lab.faulted = false;
        faults.push(FaultRecord {
            kind: kind.name(),
            target: name,
            start_ns,
            heal_ns: now_ns(),
        });
        lab.pump_for(plan.settle)?;
        round += 1;
    }
    lab.settle()?;
    lab.pump_for(plan.settle)?;
    lab.account_for_no_holder();
    let end_ns = now_ns();
    let Lab {
        seats,
        records,
        errors,
        ..
    } = lab;
    for seat in seats {
        seat.process.quit(Duration::from_secs(20));
    }
    let windows: Vec<FaultWindow> = faults
        .iter()
        .map(|f| FaultWindow {
            kind: f.kind.to_owned(),
            start_ns: f.start_ns,
            heal_ns: f.heal_ns,
        })
        .collect();
    let grace = u64::try_from(plan.settle.as_nanos()).unwrap_or(u64::MAX);
    let report = verdict::check(&records, &windows, grace, end_ns);
    Ok(LabResults {
        rows: LabResults::rows(&report, plan),
        plan: plan.clone(),
        faults,
        contender_errors: errors,
        records,
    })
}

/// Writes the results as JSON to `out` (its directory created), and the log of beliefs and writes
/// beside it (`<out>.events.jsonl`: `{"client","contender","t_ns","belief","seq"}` per line).
pub fn write(results: &LabResults, out: &std::path::Path) -> Result<(), BenchError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| BenchError::Io { what, source }
    };
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).map_err(io("creating the results directory"))?;
    }
    let json = serde_json::to_string_pretty(results).map_err(|e| BenchError::Io {
        what: "encoding the lab results".to_owned(),
        source: std::io::Error::other(e),
    })?;
    fs::write(out, json).map_err(io("writing the lab results"))?;
    let mut log = String::new();
    for r in &results.records {
        let (belief, seq) = match r.belief {
            Belief::Held { seq } => ("held", Some(seq)),
            Belief::Write { seq } => ("write", Some(seq)),
            Belief::Lost => ("lost", None),
            Belief::Released => ("released", None),
        };
        let line = serde_json::json!({
            "client": r.group, "contender": r.contender, "t_ns": r.t_ns, "belief": belief, "seq": seq,
        });
        log.push_str(&line.to_string());
        log.push('\n');
    }
    fs::write(out.with_extension("events.jsonl"), log).map_err(io("writing the lab's event log"))
}
