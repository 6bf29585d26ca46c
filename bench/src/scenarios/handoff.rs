//! Handoff: the holder unlocks while a waiter is parked in its blocking read; how long until the
//! waiter holds. Measured from just before the holder's unlock call to the waiter's acquire
//! returning, both stamped inside the client's process. The protocol floor is the same exchange
//! made by hand (release, the blocking read returns, acquire).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::{Ctx, DEFAULT_TTL, PARK, lock};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::protocol::Event;
use crate::stats::{Summary, ms_between};

/// How long one step may take before the suite calls it a failure.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Handoff latencies in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latencies {
    /// Their distribution.
    pub summary: Option<Summary>,
    /// Every sample, in the order measured.
    pub samples_ms: Vec<f64>,
}

impl Latencies {
    fn new(samples_ms: Vec<f64>) -> Latencies {
        Latencies {
            summary: Summary::of(&samples_ms),
            samples_ms,
        }
    }
}

/// The handoff figures.
#[derive(Clone, Debug, Serialize)]
pub struct Handoff {
    /// The protocol floor.
    pub floor: Latencies,
    /// Each client's.
    pub clients: BTreeMap<ClientKind, Latencies>,
}

/// Measures the floor, then each client.
pub fn run(ctx: &Ctx<'_>) -> Result<Handoff, BenchError> {
    let rounds = ctx.plan.handoff_rounds;
    let floor = ctx
        .operator
        .handoff_floor(&format!("bench/{}/handoff/floor", ctx.run_tag), rounds, PARK)?;
    let mut clients = BTreeMap::new();
    for &kind in ctx.clients {
        clients.insert(kind, Latencies::new(client(ctx, kind, rounds)?));
    }
    Ok(Handoff {
        floor: Latencies::new(floor),
        clients,
    })
}

/// Two contenders of one process pass the lock back and forth `rounds` times.
fn client(ctx: &Ctx<'_>, kind: ClientKind, rounds: usize) -> Result<Vec<f64>, BenchError> {
    let mut p = Contenders::spawn(kind, ctx.launcher)?;
    let (addr, key) = (ctx.addr(), ctx.key("handoff", kind));
    let (mut holder, mut waiter) = (1, 2);
    p.send(&lock(holder, &addr, &key, DEFAULT_TTL, None))?;
    p.wait_for(
        "the first hold",
        STEP_TIMEOUT,
        |e| matches!(e, Event::Held { id, .. } if *id == holder),
    )?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        p.send(&lock(waiter, &addr, &key, DEFAULT_TTL, None))?;
        std::thread::sleep(PARK);
        p.unlock(holder)?;
        let from = stamp(&mut p, "unlocking", holder, |e| {
            matches!(e, Event::Unlocking { .. })
        })?;
        let to = stamp(&mut p, "the handoff", waiter, |e| matches!(e, Event::Held { .. }))?;
        stamp(&mut p, "unlocked", holder, |e| {
            matches!(e, Event::Unlocked { .. })
        })?;
        samples.push(ms_between(from, to));
        std::mem::swap(&mut holder, &mut waiter);
    }
    p.unlock(holder)?;
    stamp(&mut p, "the last unlock", holder, |e| {
        matches!(e, Event::Unlocked { .. })
    })?;
    p.quit(STEP_TIMEOUT);
    Ok(samples)
}

/// Waits for contender `id`'s event of the kind `is` accepts and returns its time.
pub(crate) fn stamp(
    p: &mut Contenders,
    what: &str,
    id: u64,
    is: impl Fn(&Event) -> bool,
) -> Result<u64, BenchError> {
    let event = p.wait_for(what, STEP_TIMEOUT, |e| e.id() == Some(id) && is(e))?;
    Ok(event.t_ns().unwrap_or(0))
}
