//! Loss detection under a partition: the holder's connections to the agent go silent (a black
//! hole: nothing answers, nothing is refused) while a second contender, not partitioned, waits.
//! How long until the holder's client says the lock is lost, when the other contender holds, and
//! for how long both believed they held it (the overlap). The clients run side by side, each with
//! its own key and its own fault proxy, so the scenario takes one window, not three.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use consul_lock_testkit::proxy::{FaultProxy, Mode};
use serde::Serialize;

use super::{Ctx, lock};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::protocol::{Event, now_ns};
use crate::stats::ms_between;

/// The session TTL: Consul's smallest, so that the window is as short as it can be.
const TTL: Duration = Duration::from_secs(10);

/// One client's partition figures, in milliseconds from the cut.
#[derive(Clone, Debug, Serialize)]
pub struct ClientPartition {
    /// When the partitioned holder's client reported the lock lost (`None`: not within the
    /// window).
    pub lost_ms: Option<f64>,
    /// When the other contender held the lock (`None`: not within the window).
    pub next_holder_ms: Option<f64>,
    /// How long both believed they held the lock, up to the end of the window.
    pub overlap_ms: f64,
    /// Whether the overlap was still going on when the window closed (so it was longer).
    pub overlap_open: bool,
}

/// The partition figures.
#[derive(Clone, Debug, Serialize)]
pub struct Partition {
    /// The session TTL, in milliseconds.
    pub ttl_ms: u64,
    /// The sessions' lock-delay in milliseconds (`None`: Consul's default, 15 s).
    pub lock_delay_ms: Option<u64>,
    /// How long the suite watched after the cut, in milliseconds.
    pub window_ms: u64,
    /// Each client's.
    pub clients: BTreeMap<ClientKind, ClientPartition>,
}

/// Partitions every client at once and watches for the window.
pub fn run(ctx: &Ctx<'_>) -> Result<Partition, BenchError> {
    let results = super::side_by_side(ctx, client)?;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(Partition {
        ttl_ms: ms(TTL),
        lock_delay_ms: ctx.plan.partition_lock_delay.map(ms),
        window_ms: ms(ctx.plan.partition_window),
        clients: results,
    })
}

fn client(ctx: &Ctx<'_>, kind: ClientKind) -> Result<ClientPartition, BenchError> {
    let proxy = FaultProxy::start(ctx.agent.addr()).map_err(|source| BenchError::Io {
        what: "starting the partition's proxy".to_owned(),
        source,
    })?;
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    let key = ctx.key("partition", kind);
    let delay = ctx.plan.partition_lock_delay;
    p.send(&lock(1, &proxy.addr().to_string(), &key, TTL, delay))?;
    p.wait_for("the hold", Duration::from_secs(30), |e| {
        matches!(e, Event::Held { id: 1, .. })
    })?;
    p.send(&lock(2, &ctx.addr(), &key, TTL, delay))?;
    std::thread::sleep(Duration::from_secs(1));
    let cut = now_ns();
    proxy.set_mode(Mode::BlackHole);
    let window = ctx.plan.partition_window;
    let end = Instant::now() + window;
    let (mut lost, mut next) = (None, None);
    while lost.is_none() || next.is_none() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match p.next(left)? {
            Some(Event::Lost { id: 1, t_ns }) => lost = Some(ms_between(cut, t_ns)),
            Some(Event::Held { id: 2, t_ns, .. }) => next = Some(ms_between(cut, t_ns)),
            _ => {}
        }
    }
    let window_ms = window.as_secs_f64() * 1e3;
    let (overlap_ms, overlap_open) = match (lost, next) {
        (Some(lost), Some(next)) => ((lost - next).max(0.0), false),
        (None, Some(next)) => (window_ms - next, true),
        (_, None) => (0.0, false),
    };
    // The partitioned holder's unlock may hang for ever (Go's client has no request timeout).
    p.quit(Duration::from_secs(3));
    Ok(ClientPartition {
        lost_ms: lost,
        next_holder_ms: next,
        overlap_ms,
        overlap_open,
    })
}
