//! Contention: N contenders start at once and each takes the lock once (acquire, then unlock as
//! soon as the suite hears it is held). Every HTTP request goes through a counting proxy: the
//! requests per handoff are all requests from the first `lock` until every contender is done
//! (plus a second for background session cleanup), divided by N. The gaps between one holder's
//! unlock and the next hold show stalls.

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
            clients.insert(kind, client(ctx, agent, kind, n)?);
        }
        sizes.insert(n, clients);
    }
    Ok(Contention { sizes })
}

fn client(
    ctx: &Ctx<'_>,
    agent: SocketAddr,
    kind: ClientKind,
    n: usize,
) -> Result<ClientContention, BenchError> {
    let proxy = FaultProxy::start(agent).map_err(|source| BenchError::Io {
        what: "starting the counting proxy".to_owned(),
        source,
    })?;
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    let (addr, key) = (
        proxy.addr().to_string(),
        format!("{}-{n}", ctx.key("contention", kind)),
    );
    let before = proxy.requests().len();
    let started = crate::protocol::now_ns();
    for id in 1..=n as u64 {
        p.send(&lock(id, &addr, &key, DEFAULT_TTL, None))?;
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
    Ok(ClientContention {
        requests,
        requests_per_handoff: requests as f64 / n as f64,
        wall_ms: ms_between(started, last),
        stalls: gaps.iter().filter(|&&g| g > STALL.as_secs_f64() * 1e3).count(),
        gaps: Summary::of(&gaps),
        by_kind,
    })
}
