//! The idle cost of one held lock: the HTTP requests a client makes per minute while it holds
//! the lock and nothing else happens (renewals, monitor reads), counted by a proxy, with the
//! contender process's CPU time and resident memory over the same window. The clients run side
//! by side, each behind its own proxy.

use std::collections::BTreeMap;
use std::time::Duration;

use consul_lock_testkit::proxy::FaultProxy;
use serde::Serialize;

use super::{Ctx, DEFAULT_TTL, lock};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::procfs;
use crate::protocol::Event;

/// Acquisition traffic excluded from the count.
const SETTLE: Duration = Duration::from_secs(2);

/// One client's idle figures.
#[derive(Clone, Debug, Serialize)]
pub struct ClientIdle {
    /// Requests counted in the window.
    pub requests: u64,
    /// Scaled to a minute.
    pub requests_per_minute: f64,
    /// The process's CPU use over the window, in percent of one core.
    pub cpu_percent: f64,
    /// The process's resident memory at the end, in KiB.
    pub rss_kib: u64,
}

/// The idle figures.
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    /// The session TTL, in milliseconds (both clients renew at half of it).
    pub ttl_ms: u64,
    /// The window, in milliseconds.
    pub window_ms: u64,
    /// Each client's.
    pub clients: BTreeMap<ClientKind, ClientIdle>,
}

/// Holds one lock per client, side by side, for the window.
pub fn run(ctx: &Ctx<'_>) -> Result<Idle, BenchError> {
    let clients = super::side_by_side(ctx, client)?;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(Idle {
        ttl_ms: ms(DEFAULT_TTL),
        window_ms: ms(ctx.plan.idle_window),
        clients,
    })
}

fn client(ctx: &Ctx<'_>, kind: ClientKind) -> Result<ClientIdle, BenchError> {
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| BenchError::Io { what, source }
    };
    let proxy = FaultProxy::start(ctx.agent.addr()).map_err(io("starting the counting proxy"))?;
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    p.send(&lock(
        1,
        &proxy.addr().to_string(),
        &ctx.key("idle", kind),
        DEFAULT_TTL,
        None,
    ))?;
    p.wait_for("the hold", Duration::from_secs(30), |e| {
        matches!(e, Event::Held { id: 1, .. })
    })?;
    std::thread::sleep(SETTLE);
    let pid = p.pid();
    let (requests0, cpu0) = (
        proxy.counters().requests,
        procfs::cpu_seconds(pid).map_err(io("reading CPU time"))?,
    );
    let window = ctx.plan.idle_window;
    std::thread::sleep(window);
    let requests = proxy.counters().requests - requests0;
    let cpu = procfs::cpu_seconds(pid).map_err(io("reading CPU time"))? - cpu0;
    let rss_kib = procfs::rss_kib(pid).map_err(io("reading memory use"))?;
    if let Ok(Some(Event::Lost { .. })) = p.next(Duration::ZERO) {
        return Err(BenchError::Contender {
            client: kind.name(),
            msg: "lost the lock while idle".to_owned(),
            stderr: String::new(),
        });
    }
    p.quit(Duration::from_secs(30));
    Ok(ClientIdle {
        requests,
        requests_per_minute: requests as f64 * 60.0 / window.as_secs_f64(),
        cpu_percent: cpu / window.as_secs_f64() * 100.0,
        rss_kib,
    })
}
