//! `consul-lock demo`: a leader election you can watch fail over.
//!
//! A few contenders, each a tokio task with its own [`Client`], its own session and its own lock
//! handle on one key, run a leader loop: acquire, lead until told to step down or until the lock
//! is lost, pause, contend again. Each contender reaches Consul through a
//! [`FaultProxy`] of its own, so that its network can be
//! cut. The demo then disrupts the leader three ways (crash, step down, partition), prints every
//! change live, and ends with a summary.
//!
//! "No overlap" is checked where it matters, in the contenders' own beliefs: a contender believes
//! it leads from the moment its `acquire` returns a guard until it sees the loss (or decides to
//! step down). Every change of belief goes through one mutex, and a contender that starts to
//! believe while another still does is an overlap.

use std::collections::BTreeSet;
use std::net::ToSocketAddrs as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consul_lock_core::api::{ClientConfig, Key, KvDelete, KvGet, SessionDestroy};
use consul_lock_core::machine::{LockOptions, MIN_HOLD_WINDOW};
use consul_lock_sim::SimServer;
use consul_lock_sim::proxy::{FaultProxy, Mode};
use consul_lock_tokio::{Client, FencingToken, Lock, LossReason};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Failure;
use crate::cli::{DemoArgs, HttpFlags};
use crate::consul::Api;
use crate::flags;
use crate::out;
use crate::run::describe_loss;

/// The session TTL: Consul's minimum, so that a partition is over quickly.
const SESSION_TTL: Duration = Duration::from_secs(10);
/// How long a contender that lost or gave up leadership waits before contending again (so that
/// the next leader is another contender, as when a node really fails).
const REJOIN_AFTER: Duration = Duration::from_secs(3);
/// How long to wait for a failover before calling the demo failed.
const PHASE_TIMEOUT: Duration = Duration::from_secs(45);

/// What the coordinator tells a contender.
#[derive(Debug)]
enum Control {
    StepDown,
    Stop,
}

/// What a contender reports.
#[derive(Debug)]
enum Report {
    Leads {
        who: usize,
        token: FencingToken,
        at: Instant,
    },
    Lost {
        who: usize,
        reason: LossReason,
        at: Instant,
    },
    SteppedDown {
        who: usize,
        at: Instant,
    },
    Trouble {
        who: usize,
        message: String,
    },
}

/// Who believes they lead, and every overlap seen.
#[derive(Debug, Default)]
struct Beliefs {
    leading: BTreeSet<usize>,
    checks: u64,
    overlaps: Vec<String>,
}

impl Beliefs {
    fn begin(board: &Mutex<Beliefs>, who: usize) {
        let mut b = board.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.checks += 1;
        if !b.leading.is_empty() {
            let others: Vec<String> = b.leading.iter().map(|w| name(*w)).collect();
            let text = format!(
                "{} began to lead while {} still did",
                name(who),
                others.join(", ")
            );
            b.overlaps.push(text);
        }
        b.leading.insert(who);
    }

    fn end(board: &Mutex<Beliefs>, who: usize) {
        let mut b = board.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        b.checks += 1;
        b.leading.remove(&who);
    }
}

fn name(who: usize) -> String {
    format!("c{}", who + 1)
}

/// One contender's leader loop.
async fn contender(
    who: usize,
    lock: Lock,
    board: Arc<Mutex<Beliefs>>,
    reports: mpsc::UnboundedSender<Report>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    loop {
        let acquired = tokio::select! {
            result = lock.acquire() => result,
            command = control.recv() => match command {
                Some(Control::StepDown) => continue,
                Some(Control::Stop) | None => return,
            },
        };
        let mut guard = match acquired {
            Ok(guard) => guard,
            Err(e) => {
                let _ = reports.send(Report::Trouble {
                    who,
                    message: e.to_string(),
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        Beliefs::begin(&board, who);
        let _ = reports.send(Report::Leads {
            who,
            token: guard.token().clone(),
            at: Instant::now(),
        });
        tokio::select! {
            lost = guard.lost() => {
                Beliefs::end(&board, who);
                let reason = lost.unwrap_or(LossReason::NotHeld);
                let _ = reports.send(Report::Lost { who, reason, at: Instant::now() });
            }
            command = control.recv() => {
                // Stop believing first, then release: never the other way round.
                Beliefs::end(&board, who);
                match command {
                    Some(Control::StepDown) => {
                        // Reported before the release, so that it is printed before the next
                        // leader's acquire (which the release lets happen).
                        let _ = reports.send(Report::SteppedDown { who, at: Instant::now() });
                        let _ = guard.release().await;
                    }
                    Some(Control::Stop) | None => {
                        let _ = tokio::time::timeout(Duration::from_secs(5), guard.release()).await;
                        return;
                    }
                }
            }
        }
        // Out of the race for a while, as a failed node would be; a stop ends the wait.
        tokio::select! {
            () = tokio::time::sleep(REJOIN_AFTER) => {}
            command = control.recv() => match command {
                Some(Control::StepDown) => {}
                Some(Control::Stop) | None => return,
            },
        }
    }
}

/// A leadership change, as the summary lists it.
#[derive(Debug)]
struct Failover {
    kind: &'static str,
    from: usize,
    to: usize,
    /// From the disruption to the new leader's acquire.
    took: Duration,
    /// From the disruption to the old leader knowing it no longer leads.
    noticed: Option<Duration>,
}

/// The coordinator: prints reports as they come and keeps the record.
struct Show {
    json: bool,
    start: Instant,
    reports: mpsc::UnboundedReceiver<Report>,
    leader: Option<(usize, FencingToken)>,
    sequences: Vec<u64>,
    changes: u32,
    lost_at: Vec<(usize, Instant)>,
    troubles: u32,
}

impl Show {
    fn t(&self, at: Instant) -> String {
        format!("[{:>7.3}s]", at.duration_since(self.start).as_secs_f64())
    }

    fn emit(&self, at: Instant, event: &str, fields: Value, text: &str) {
        if self.json {
            out::event(
                event,
                ("t_ms", out::millis(at.duration_since(self.start))),
                &fields,
            );
        } else {
            out::line(&format!("{} {text}", self.t(at)));
        }
    }

    fn note(&self, event: &str, fields: Value, text: &str) {
        self.emit(Instant::now(), event, fields, text);
    }

    /// Prints one report and updates the record.
    fn take(&mut self, report: &Report) {
        match report {
            Report::Leads { who, token, at } => {
                if self.leader.is_some() || !self.sequences.is_empty() {
                    self.changes += 1;
                }
                self.sequences.push(token.sequence());
                self.emit(
                    *at,
                    "leads",
                    json!({
                        "who": name(*who),
                        "session": token.session.as_str(),
                        "lock_index": token.lock_index,
                        "sequence": token.sequence(),
                    }),
                    &format!(
                        "{} leads            LockIndex {}, sequence {}",
                        name(*who),
                        token.lock_index,
                        token.sequence()
                    ),
                );
                self.leader = Some((*who, token.clone()));
            }
            Report::Lost { who, reason, at } => {
                let (code, text) = describe_loss(reason);
                self.emit(
                    *at,
                    "lost",
                    json!({ "who": name(*who), "reason": code, "detail": text }),
                    &format!("{} lost leadership: {text}", name(*who)),
                );
                self.lost_at.push((*who, *at));
                if self.leader.as_ref().is_some_and(|(w, _)| w == who) {
                    self.leader = None;
                }
            }
            Report::SteppedDown { who, at } => {
                self.emit(
                    *at,
                    "stepped_down",
                    json!({ "who": name(*who) }),
                    &format!("{} stepped down (released the lock)", name(*who)),
                );
                self.lost_at.push((*who, *at));
                if self.leader.as_ref().is_some_and(|(w, _)| w == who) {
                    self.leader = None;
                }
            }
            Report::Trouble { who, message } => {
                self.troubles += 1;
                self.note(
                    "trouble",
                    json!({ "who": name(*who), "message": message }),
                    &format!("{}: {message}", name(*who)),
                );
            }
        }
    }

    /// Prints reports until `until`.
    async fn pump(&mut self, until: Instant) {
        loop {
            let report = tokio::select! {
                report = self.reports.recv() => report,
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => return,
            };
            match report {
                Some(report) => self.take(&report),
                None => return,
            }
        }
    }

    /// Prints reports until a contender other than `old` leads; its acquire time.
    async fn new_leader(&mut self, old: Option<usize>) -> Option<(usize, Instant)> {
        let deadline = tokio::time::Instant::now() + PHASE_TIMEOUT;
        loop {
            let report = tokio::select! {
                report = self.reports.recv() => report?,
                () = tokio::time::sleep_until(deadline) => return None,
            };
            self.take(&report);
            if let Report::Leads { who, at, .. } = report {
                if Some(who) != old {
                    return Some((who, at));
                }
            }
        }
    }

    /// When `who` last stopped leading, at or after `since`.
    fn stopped(&self, who: usize, since: Instant) -> Option<Instant> {
        self.lost_at
            .iter()
            .rev()
            .find(|(w, at)| *w == who && *at >= since)
            .map(|(_, at)| *at)
    }
}

/// Runs `consul-lock demo`.
pub(crate) async fn demo(args: DemoArgs) -> Result<u8, Failure> {
    // The Consul: the simulator on loopback, or the agent named.
    let sim;
    let (upstream, where_) = match &args.consul {
        Some(given) => {
            // The address as every other command takes it (CONSUL_HTTP_ADDR's forms), as far as
            // the demo can go: it speaks plain HTTP through its fault proxy.
            let addr = given
                .strip_prefix("http://")
                .unwrap_or(given)
                .trim_end_matches('/');
            if addr.contains("://") {
                return Err(Failure::usage(format!(
                    "--consul {given:?}: the demo reaches the agent over plain HTTP (through its fault \
                     proxy); give host:port or http://host:port"
                )));
            }
            let socket = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| Failure::usage(format!("--consul {addr:?}: not a host:port that resolves")))?;
            (socket, format!("the Consul agent at {socket}"))
        }
        None => {
            sim = SimServer::start(args.seed)
                .map_err(|e| Failure::new(format!("cannot start the simulated Consul: {e}")))?;
            (
                sim.addr(),
                format!("a simulated Consul at {} (the test kit's)", sim.addr()),
            )
        }
    };
    let upstream_flags = HttpFlags {
        http_addr: Some(upstream.to_string()),
        ..HttpFlags::default()
    };
    let mut resolved = flags::resolve_from_process(&upstream_flags)?;
    resolved.addr_source = if args.consul.is_some() {
        "--consul"
    } else {
        "the simulator"
    }
    .to_owned();
    let api = Api::new(&resolved)?;
    let key_text = match &args.consul {
        Some(_) => format!(
            "consul-lock/demo/{}-{}/leader",
            std::process::id(),
            out::unix_ms()
        ),
        None => "consul-lock/demo/leader".to_owned(),
    };
    let key = Key::new(&key_text).map_err(|e| Failure::new(e.to_string()))?;
    api.call(&KvGet::new(key.clone()), Duration::from_secs(10))
        .await
        .map_err(|e| api.failure("checking the agent", &e))?;

    let n = usize::try_from(args.contenders).unwrap_or(4);
    let mut proxies = Vec::with_capacity(n);
    for _ in 0..n {
        proxies.push(
            FaultProxy::start(upstream).map_err(|e| Failure::new(format!("cannot start a proxy: {e}")))?,
        );
    }
    let board = Arc::new(Mutex::new(Beliefs::default()));
    let (report_tx, reports) = mpsc::unbounded_channel();
    let mut controls = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    for (who, proxy) in proxies.iter().enumerate() {
        let config = ClientConfig {
            token: resolved.config.token.clone(),
            ..proxy.config()
        };
        let client = Client::new(config).map_err(|e| Failure::new(e.to_string()))?;
        let mut options = LockOptions::new(key.as_str()).map_err(|e| Failure::new(e.to_string()))?;
        options.hold.seed = who as u64 + 1;
        if let Some(session) = options.hold.session_options_mut() {
            session.name = format!("consul-lock demo {}", name(who));
            session.ttl = SESSION_TTL;
            session.lock_delay = Some(args.lock_delay);
            // Too short a lock-delay to hold by when a failed node check can end the session at
            // any moment: then the session has no checks, and only its TTL ends it.
            if args.lock_delay < MIN_HOLD_WINDOW {
                *session = session.clone().ttl_only();
            }
        }
        let lock = client.lock(options).map_err(|e| Failure::new(e.to_string()))?;
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        controls.push(control_tx);
        tasks.spawn(contender(who, lock, board.clone(), report_tx.clone(), control_rx));
    }
    drop(report_tx);

    let mut show = Show {
        json: args.json,
        start: Instant::now(),
        reports,
        leader: None,
        sequences: Vec::new(),
        changes: 0,
        lost_at: Vec::new(),
        troubles: 0,
    };
    show.note(
        "start",
        json!({
            "contenders": n,
            "consul": where_,
            "key": key.as_str(),
            "session_ttl_ms": out::millis(SESSION_TTL),
            "lock_delay_ms": out::millis(args.lock_delay),
        }),
        &format!(
            "{n} contenders (c1..c{n}) elect a leader on {}, key {}; session TTL {}, lock-delay {}",
            where_,
            key.as_str(),
            out::secs(SESSION_TTL),
            out::secs(args.lock_delay)
        ),
    );

    let mut failovers: Vec<Failover> = Vec::new();
    let mut complete = true;
    let result = 'phases: {
        if show.new_leader(None).await.is_none() {
            break 'phases Err("no contender became leader".to_owned());
        }
        let phases: &[&'static str] = if args.quick {
            &["crash", "step_down"]
        } else {
            &["crash", "step_down", "partition"]
        };
        for &kind in phases {
            show.pump(Instant::now() + args.hold).await;
            let Some((current, token)) = show.leader.clone() else {
                break 'phases Err("the leader vanished between phases".to_owned());
            };
            let leader = current;
            let at = Instant::now();
            match kind {
                "crash" => {
                    show.note(
                        "disrupt",
                        json!({ "kind": kind, "who": name(leader) }),
                        &format!(
                            "== crash: {}'s session is destroyed, as when its node dies; the key stays \
                             closed for the lock-delay ==",
                            name(leader)
                        ),
                    );
                    let destroy = SessionDestroy {
                        id: token.session.clone(),
                    };
                    if let Err(e) = api.call(&destroy, Duration::from_secs(10)).await {
                        break 'phases Err(api.failure("destroying the leader's session", &e).message);
                    }
                }
                "step_down" => {
                    show.note(
                        "disrupt",
                        json!({ "kind": kind, "who": name(leader) }),
                        &format!("== step down: {} releases the lock ==", name(leader)),
                    );
                    let _ = controls[leader].send(Control::StepDown);
                }
                _ => {
                    show.note(
                        "disrupt",
                        json!({ "kind": kind, "who": name(leader) }),
                        &format!(
                            "== partition: {}'s network drops every packet; it can't hear Consul, nor \
                             Consul it ==",
                            name(leader)
                        ),
                    );
                    proxies[leader].set_mode(Mode::BlackHole);
                }
            }
            let Some((next, acquired)) = show.new_leader(Some(leader)).await else {
                break 'phases Err(format!(
                    "no new leader within {} after the {kind}",
                    out::secs(PHASE_TIMEOUT)
                ));
            };
            let noticed = show.stopped(leader, at).map(|t| t.duration_since(at));
            let failover = Failover {
                kind,
                from: leader,
                to: next,
                took: acquired.duration_since(at),
                noticed,
            };
            let explain = match (kind, noticed) {
                ("partition", Some(noticed)) => format!(
                    "; {} knew it had lost the lock {} after the partition, {} before {} took over",
                    name(leader),
                    out::secs(noticed),
                    out::secs(failover.took.saturating_sub(noticed)),
                    name(next)
                ),
                ("partition", None) => format!(
                    "; {} has not noticed yet (it will when no renewal is acknowledged within the TTL)",
                    name(leader)
                ),
                ("crash", _) => format!(" (the lock-delay is {})", out::secs(args.lock_delay)),
                _ => String::new(),
            };
            show.note(
                "failover",
                json!({
                    "kind": kind,
                    "from": name(leader),
                    "to": name(next),
                    "took_ms": out::millis(failover.took),
                    "old_leader_knew_after_ms": noticed.map(out::millis),
                }),
                &format!(
                    "failover {} -> {} took {}{explain}",
                    name(leader),
                    name(next),
                    out::secs(failover.took)
                ),
            );
            failovers.push(failover);
            if kind == "partition" {
                // Let the partitioned contender learn of its loss if it has not yet, then heal.
                let deadline = Instant::now() + SESSION_TTL;
                while show.stopped(leader, at).is_none() && Instant::now() < deadline {
                    show.pump(Instant::now() + Duration::from_millis(100)).await;
                }
                proxies[leader].set_mode(Mode::Pass);
                show.note(
                    "heal",
                    json!({ "who": name(leader) }),
                    &format!("== partition healed: {} can reach Consul again ==", name(leader)),
                );
            }
        }
        show.pump(Instant::now() + args.hold).await;
        Ok(())
    };
    if let Err(problem) = &result {
        complete = false;
        show.note(
            "problem",
            json!({ "message": problem }),
            &format!("demo problem: {problem}"),
        );
    }

    // Stop everyone: leaders release, waiters cancel.
    for control in &controls {
        let _ = control.send(Control::Stop);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    show.pump(Instant::now()).await;
    if args.consul.is_some() {
        let _ = api
            .call(&KvDelete { key: key.clone() }, Duration::from_secs(5))
            .await;
    }

    let beliefs = board.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let increasing = show.sequences.windows(2).all(|w| w[0] < w[1]);
    let ok = complete && beliefs.overlaps.is_empty() && increasing;
    summary(&show, &failovers, &beliefs, increasing, ok, args.lock_delay);
    Ok(if ok { 0 } else { 1 })
}

fn summary(
    show: &Show,
    failovers: &[Failover],
    beliefs: &Beliefs,
    increasing: bool,
    ok: bool,
    lock_delay: Duration,
) {
    let elapsed = show.start.elapsed();
    if show.json {
        let list: Vec<Value> = failovers
            .iter()
            .map(|f| {
                json!({
                    "kind": f.kind,
                    "from": name(f.from),
                    "to": name(f.to),
                    "took_ms": out::millis(f.took),
                    "old_leader_knew_after_ms": f.noticed.map(out::millis),
                })
            })
            .collect();
        out::event(
            "summary",
            ("t_ms", out::millis(elapsed)),
            &json!({
                "leadership_changes": show.changes,
                "failovers": list,
                "overlaps": beliefs.overlaps,
                "belief_checks": beliefs.checks,
                "sequences": show.sequences,
                "sequences_increasing": increasing,
                "troubles": show.troubles,
                "ok": ok,
            }),
        );
        return;
    }
    let mut lines = vec![
        String::new(),
        format!("Summary ({} in all)", out::secs(elapsed)),
        format!("  leadership changes   {}", show.changes),
    ];
    if !failovers.is_empty() {
        lines.push("  failovers".to_owned());
    }
    for f in failovers {
        let (label, how) = match f.kind {
            "crash" => (
                "crash",
                format!("session destroyed; lock-delay {}", out::secs(lock_delay)),
            ),
            "step_down" => ("step down", "released".to_owned()),
            _ => ("partition", "network black-holed".to_owned()),
        };
        let noticed = match (f.kind, f.noticed) {
            ("step_down", _) | (_, None) => String::new(),
            ("partition", Some(n)) => format!(
                "; {} knew after {}, {} before {} took over",
                name(f.from),
                out::secs(n),
                out::secs(f.took.saturating_sub(n)),
                name(f.to)
            ),
            (_, Some(n)) => format!("; {} knew after {}", name(f.from), out::secs(n)),
        };
        lines.push(format!(
            "    {label:<10} {} -> {} in {:<9} ({how}{noticed})",
            name(f.from),
            name(f.to),
            out::secs(f.took)
        ));
    }
    lines.push(format!(
        "  fencing tokens       {} ({})",
        if increasing {
            "strictly increasing"
        } else {
            "NOT increasing"
        },
        show.sequences
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" < ")
    ));
    if beliefs.overlaps.is_empty() {
        lines.push(format!(
            "  overlap              none: at most one contender believed it led at every moment ({} changes of \
             belief checked)",
            beliefs.checks
        ));
    } else {
        for overlap in &beliefs.overlaps {
            lines.push(format!("  OVERLAP              {overlap}"));
        }
    }
    lines.push(format!(
        "  result               {}",
        if ok { "ok" } else { "FAILED" }
    ));
    for line in lines {
        out::line(&line);
    }
}
