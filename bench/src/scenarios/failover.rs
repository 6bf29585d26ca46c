//! Failover: the holder's session is invalidated (destroyed, as when its node fails or an
//! operator ends it) while a waiter is parked; how long until the waiter holds. The session's
//! lock-delay keeps the key from anyone for that long, so the target is lock-delay + 100 ms.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::handoff::stamp;
use super::{Ctx, DEFAULT_TTL, PARK, lock};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::protocol::{Event, now_ns};
use crate::stats::{Summary, ms_between};

/// The failover figures of one client, in milliseconds from the session's destruction.
#[derive(Clone, Debug, Serialize)]
pub struct ClientFailover {
    /// Until the waiter held the lock.
    pub next_holder: Option<Summary>,
    /// Until the old holder's client reported the lock lost.
    pub lost: Option<Summary>,
    /// Every `next_holder` sample.
    pub next_holder_samples_ms: Vec<f64>,
    /// Every `lost` sample.
    pub lost_samples_ms: Vec<f64>,
}

/// The failover figures.
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    /// The sessions' lock-delay, in milliseconds.
    pub lock_delay_ms: u64,
    /// Each client's.
    pub clients: BTreeMap<ClientKind, ClientFailover>,
}

/// Measures each client.
pub fn run(ctx: &Ctx<'_>) -> Result<Failover, BenchError> {
    let mut clients = BTreeMap::new();
    for &kind in ctx.clients {
        clients.insert(kind, client(ctx, kind)?);
    }
    Ok(Failover {
        lock_delay_ms: u64::try_from(ctx.plan.failover_lock_delay.as_millis()).unwrap_or(u64::MAX),
        clients,
    })
}

fn client(ctx: &Ctx<'_>, kind: ClientKind) -> Result<ClientFailover, BenchError> {
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    let (addr, key) = (ctx.addr(), ctx.key("failover", kind));
    let delay = Some(ctx.plan.failover_lock_delay);
    let (mut next, mut lost) = (Vec::new(), Vec::new());
    for round in 0..ctx.plan.failover_rounds as u64 {
        // Fresh ids each round: the invalidated holder stays behind until the process quits.
        let (holder, waiter) = (2 * round + 1, 2 * round + 2);
        p.send(&lock(holder, &addr, &key, DEFAULT_TTL, delay))?;
        let held = p.wait_for(
            "the hold",
            Duration::from_secs(60),
            |e| matches!(e, Event::Held { id, .. } if *id == holder),
        )?;
        let session = session_of(held)?;
        p.send(&lock(waiter, &addr, &key, DEFAULT_TTL, delay))?;
        std::thread::sleep(PARK);
        let cut = now_ns();
        ctx.operator.destroy_session(&session)?;
        next.push(ms_between(
            cut,
            stamp(&mut p, "the failover", waiter, |e| {
                matches!(e, Event::Held { .. })
            })?,
        ));
        lost.push(ms_between(
            cut,
            stamp(&mut p, "the loss", holder, |e| matches!(e, Event::Lost { .. }))?,
        ));
        p.unlock(waiter)?;
        stamp(&mut p, "the unlock", waiter, |e| {
            matches!(e, Event::Unlocked { .. })
        })?;
    }
    p.quit(Duration::from_secs(30));
    Ok(ClientFailover {
        next_holder: Summary::of(&next),
        lost: Summary::of(&lost),
        next_holder_samples_ms: next,
        lost_samples_ms: lost,
    })
}

/// The session of a `held` event.
pub(crate) fn session_of(held: Event) -> Result<String, BenchError> {
    match held {
        Event::Held { session, .. } => Ok(session),
        other => Err(BenchError::Request {
            what: "waiting for a hold",
            msg: format!("got {other:?}"),
        }),
    }
}
