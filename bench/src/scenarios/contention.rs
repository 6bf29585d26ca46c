//! Contention: N contenders start at once and each takes the lock once (acquire, then unlock as
//! soon as the suite hears it is held). Every HTTP request goes through a counting proxy: the
//! requests per handoff are all requests from the first `lock` until every contender is done
//! (plus a second for background session cleanup), divided by N. The gaps between one holder's
//! unlock and the next hold show stalls.
//!
//! Each client also takes the lock once alone on a key of its own, through its own proxy, in the
//! same run (just before each crowd): the requests of one uncontended acquisition, which every
//! contender pays whatever the crowd (its session, its acquire, its release). All requests less
//! N times that, divided by N, is what the waiting itself cost per handoff.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use consul_lock_testkit::agent::{AgentOptions, ConsulAgent};
use consul_lock_testkit::proxy::FaultProxy;
use serde::Serialize;

use super::scale::RAISED_LIMIT;
use super::{Ctx, DEFAULT_TTL, lock};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::protocol::Event;
use crate::stats::{Summary, ms_between};

/// A gap between holders longer than this is a stall.
const STALL: Duration = Duration::from_secs(1);
/// Background work (session destroys) still counted after the last unlock.
const SETTLE: Duration = Duration::from_secs(1);

/// One client's contention figures.
#[derive(Clone, Debug, Serialize)]
pub struct ClientContention {
    /// HTTP requests in all.
    pub requests: u64,
    /// `requests` / contenders.
    pub requests_per_handoff: f64,
    /// From the first `lock` to the last `unlocked`, in milliseconds.
    pub wall_ms: f64,
    /// The gaps between an unlock and the next hold, in milliseconds.
    pub gaps: Option<Summary>,
    /// Gaps longer than a second.
    pub stalls: usize,
    /// The requests by kind (`kind` of [`request_kind`]).
    pub by_kind: BTreeMap<&'static str, u64>,
    /// The requests of one uncontended acquisition by the same client in the same run (lock,
    /// hold, unlock, session cleanup, alone on a key).
    pub uncontended_requests: u64,
    /// Those requests by kind.
    pub uncontended_by_kind: BTreeMap<&'static str, u64>,
    /// What waiting cost per handoff: (`requests` − N × `uncontended_requests`) / N. Negative
    /// would mean a crowd made a contender's own requests cheaper.
    pub waiting_per_handoff: f64,
}

/// What a request to the agent was for, from its method, path and query.
pub fn request_kind(method: &str, target: &str) -> &'static str {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let has = |name: &str| {
        query
            .split('&')
            .any(|p| p == name || p.starts_with(&format!("{name}=")))
    };
    match (method, path) {
        ("PUT", "/v1/session/create") => "session create",
        ("PUT", p) if p.starts_with("/v1/session/renew/") => "session renew",
        ("PUT", p) if p.starts_with("/v1/session/destroy/") => "session destroy",
        ("GET", p) if p.starts_with("/v1/session/info/") => "session info",
        ("PUT", "/v1/txn") => "lock transaction",
        ("PUT", p) if p.starts_with("/v1/kv/") && has("acquire") => "kv acquire",
        ("PUT", p) if p.starts_with("/v1/kv/") && has("release") => "kv release",
        ("GET", p) if p.starts_with("/v1/kv/") && has("index") => "kv blocking read",
        ("GET", p) if p.starts_with("/v1/kv/") => "kv read",
        ("DELETE", p) if p.starts_with("/v1/kv/") => "kv delete",
        _ => "other",
    }
}

/// The contention figures: contender count, then client.
#[derive(Clone, Debug, Serialize)]
pub struct Contention {
    /// By contender count.
    pub sizes: BTreeMap<usize, BTreeMap<ClientKind, ClientContention>>,
}

/// Crowds larger than this run against an agent of their own with Consul's connection limit per
/// client address (200) raised out of the way: every contender is a client of its own, with its
/// own connections, all from 127.0.0.1 (at 200 contenders the agent closed connections, and a
/// release was never confirmed).
const OWN_AGENT_ABOVE: usize = 60;

/// Runs every size for every client.
pub fn run(ctx: &Ctx<'_>) -> Result<Contention, BenchError> {
    let raised = if ctx.plan.contention_sizes.iter().any(|&n| n > OWN_AGENT_ABOVE) {
        let limits = format!("limits {{ http_max_conns_per_client = {RAISED_LIMIT} }}");
        Some(ConsulAgent::start_with(AgentOptions::default().hcl(limits))?)
    } else {
        None
    };
    let mut sizes = BTreeMap::new();
    for &n in &ctx.plan.contention_sizes {
        let agent = match &raised {
            Some(raised) if n > OWN_AGENT_ABOVE => raised.addr(),
            _ => ctx.agent.addr(),
        };
        let mut clients = BTreeMap::new();
        for &kind in ctx.clients {
            let alone = count(
                ctx,
                agent,
                kind,
                1,
                &format!("{}-{n}-alone", ctx.key("contention", kind)),
            )?;
            let crowd = count(
                ctx,
                agent,
                kind,
                n,
                &format!("{}-{n}", ctx.key("contention", kind)),
            )?;
            clients.insert(kind, ClientContention::of(crowd, alone, n));
        }
        sizes.insert(n, clients);
    }
    Ok(Contention { sizes })
}

/// One run of `n` contenders of `kind` on `key`, each taking the lock once, as counted.
struct Counted {
    requests: u64,
    by_kind: BTreeMap<&'static str, u64>,
    wall_ms: f64,
    gaps: Vec<f64>,
}

impl ClientContention {
    /// The figures of `crowd` (`n` contenders), against `alone` (one).
    fn of(crowd: Counted, alone: Counted, n: usize) -> ClientContention {
        let n_f = n as f64;
        ClientContention {
            requests: crowd.requests,
            requests_per_handoff: crowd.requests as f64 / n_f,
            wall_ms: crowd.wall_ms,
            stalls: crowd
                .gaps
                .iter()
                .filter(|&&g| g > STALL.as_secs_f64() * 1e3)
                .count(),
            gaps: Summary::of(&crowd.gaps),
            by_kind: crowd.by_kind,
            waiting_per_handoff: (crowd.requests as f64 - n_f * alone.requests as f64) / n_f,
            uncontended_requests: alone.requests,
            uncontended_by_kind: alone.by_kind,
        }
    }
}

fn count(
    ctx: &Ctx<'_>,
    agent: SocketAddr,
    kind: ClientKind,
    n: usize,
    key: &str,
) -> Result<Counted, BenchError> {
    let proxy = FaultProxy::start(agent).map_err(|source| BenchError::Io {
        what: "starting the counting proxy".to_owned(),
        source,
    })?;
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    let addr = proxy.addr().to_string();
    let before = proxy.requests().len();
    let started = crate::protocol::now_ns();
    for id in 1..=n as u64 {
        p.send(&lock(id, &addr, key, DEFAULT_TTL, None))?;
    }
    let (mut holds, mut unlocks, mut done) = (Vec::new(), Vec::new(), 0);
    let mut last = started;
    // Go's waiters may sit out a 5 s retry more than once: be generous.
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_secs(2) * n as u32;
    while done < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = p.next(left)? else {
            return Err(BenchError::Timeout {
                client: kind.name(),
                what: format!("{n} contenders each holding once ({done} done)"),
                waited: Duration::from_secs(60),
                stderr: String::new(),
            });
        };
        match event {
            Event::Held { id, t_ns, .. } => {
                holds.push(t_ns);
                p.unlock(id)?;
            }
            Event::Unlocking { t_ns, .. } => unlocks.push(t_ns),
            Event::Unlocked { t_ns, .. } => {
                done += 1;
                last = last.max(t_ns);
            }
            Event::Error { msg, .. } => {
                return Err(BenchError::Contender {
                    client: kind.name(),
                    msg,
                    stderr: String::new(),
                });
            }
            _ => {}
        }
    }
    std::thread::sleep(SETTLE);
    let seen = proxy.requests();
    let mut by_kind = BTreeMap::new();
    for request in &seen[before.min(seen.len())..] {
        *by_kind
            .entry(request_kind(&request.head.method, &request.head.target))
            .or_insert(0) += 1;
    }
    let requests = by_kind.values().sum::<u64>();
    p.quit(Duration::from_secs(30));
    holds.sort_unstable();
    unlocks.sort_unstable();
    // The lock is exclusive, so the i-th unlock comes before the (i+1)-th hold.
    let gaps: Vec<f64> = unlocks
        .iter()
        .zip(holds.iter().skip(1))
        .map(|(&u, &h)| ms_between(u, h))
        .collect();
    Ok(Counted {
        requests,
        by_kind,
        wall_ms: ms_between(started, last),
        gaps,
    })
}
