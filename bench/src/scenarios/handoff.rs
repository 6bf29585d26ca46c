//! Handoff: the holder unlocks while a waiter is parked in its blocking read; how long until the
//! waiter holds. Measured from just before the holder's unlock call to the waiter's acquire
//! returning, both stamped inside the client's process. The protocol floor is the same exchange
//! made by hand (release, the blocking read returns, acquire), once with a KV acquire (the
//! exchange of Go's lock) and once with a lock transaction (ours).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::{Ctx, DEFAULT_TTL, PARK, lock};
use crate::error::BenchError;
use crate::host::{ClientKind, Contenders};
use crate::operator::FloorAcquire;
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
    /// The protocol floor with a KV acquire (Go's lock's exchange).
    pub floor: Latencies,
    /// The protocol floor with a lock transaction (ours).
    pub floor_txn: Latencies,
    /// Each client's.
    pub clients: BTreeMap<ClientKind, Latencies>,
    /// Each client's p50 over today's tokio client's, block by block (the plan's
    /// `handoff_repeats`); none without the tokio client.
    pub vs_tokio: BTreeMap<ClientKind, Ratios>,
}

/// One client's p50 over another's, in each block of consecutive rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    /// The ratio in each block, in the order measured.
    pub per_repeat: Vec<f64>,
    /// Their distribution: the median says which is faster, the spread how much noise moves it.
    pub summary: Option<Summary>,
}

impl Ratios {
    /// The ratios of `samples`' block p50s to `base`'s, for `repeats` blocks of consecutive
    /// rounds (a last, shorter block takes what is left).
    pub fn of(samples: &[f64], base: &[f64], repeats: usize) -> Ratios {
        let size = samples.len().min(base.len()).div_ceil(repeats.max(1)).max(1);
        let per_repeat: Vec<f64> = samples
            .chunks(size)
            .zip(base.chunks(size))
            .filter_map(|(s, b)| {
                let (s, b) = (Summary::of(s)?.p50, Summary::of(b)?.p50);
                (b > 0.0).then(|| s / b)
            })
            .collect();
        Ratios {
            summary: Summary::of(&per_repeat),
            per_repeat,
        }
    }
}

/// Measures the floors and every client round by round, interleaved (the order rotating each
/// round), so that a noisy moment of this shared machine falls on every series alike rather than
/// on whichever ran then. Block by block, each client's p50 is set against tokio's (its
/// [`Ratios`]): "no worse" needs the ratio's spread, not one median against another.
pub fn run(ctx: &Ctx<'_>) -> Result<Handoff, BenchError> {
    let rounds = ctx.plan.handoff_rounds;
    let key = format!("bench/{}/handoff/floor", ctx.run_tag);
    let mut floors = [
        ctx.operator.floor(&key, FloorAcquire::Kv)?,
        ctx.operator.floor(&format!("{key}-txn"), FloorAcquire::Txn)?,
    ];
    let mut pairs = ctx
        .clients
        .iter()
        .map(|&kind| Pair::start(ctx, kind))
        .collect::<Result<Vec<_>, _>>()?;
    let series = floors.len() + pairs.len();
    let mut samples = vec![Vec::with_capacity(rounds); series];
    for round in 0..rounds {
        for turn in 0..series {
            let i = (round + turn) % series;
            samples[i].push(match i.checked_sub(floors.len()) {
                None => floors[i].round(PARK)?,
                Some(c) => pairs[c].round()?,
            });
        }
    }
    for floor in floors {
        floor.finish()?;
    }
    let mut samples = samples.into_iter();
    let mut next = || Latencies::new(samples.next().unwrap_or_default());
    let (floor, floor_txn) = (next(), next());
    let mut clients = BTreeMap::new();
    for pair in pairs {
        clients.insert(pair.p.kind(), next());
        pair.finish()?;
    }
    let vs_tokio = clients
        .get(&ClientKind::Tokio)
        .map(|base| {
            clients
                .iter()
                .filter(|(kind, _)| **kind != ClientKind::Tokio)
                .map(|(kind, l)| {
                    let ratios = Ratios::of(&l.samples_ms, &base.samples_ms, ctx.plan.handoff_repeats);
                    (*kind, ratios)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Handoff {
        floor,
        floor_txn,
        clients,
        vs_tokio,
    })
}

/// Two contenders of one client's process passing the lock back and forth.
struct Pair {
    p: Contenders,
    addr: String,
    key: String,
    holder: u64,
    waiter: u64,
}

impl Pair {
    fn start(ctx: &Ctx<'_>, kind: ClientKind) -> Result<Pair, BenchError> {
        let mut pair = Pair {
            p: Contenders::spawn(kind, ctx.launcher)?,
            addr: ctx.addr(),
            key: ctx.key("handoff", kind),
            holder: 1,
            waiter: 2,
        };
        pair.p
            .send(&lock(pair.holder, &pair.addr, &pair.key, DEFAULT_TTL, None))?;
        let holder = pair.holder;
        pair.p.wait_for(
            "the first hold",
            STEP_TIMEOUT,
            |e| matches!(e, Event::Held { id, .. } if *id == holder),
        )?;
        Ok(pair)
    }

    /// One handoff: the waiter asks, parks, the holder unlocks; the time from just before the
    /// unlock call to the waiter's acquire returning, in milliseconds.
    fn round(&mut self) -> Result<f64, BenchError> {
        let (holder, waiter) = (self.holder, self.waiter);
        self.p
            .send(&lock(waiter, &self.addr, &self.key, DEFAULT_TTL, None))?;
        std::thread::sleep(PARK);
        self.p.unlock(holder)?;
        let from = stamp(&mut self.p, "unlocking", holder, |e| {
            matches!(e, Event::Unlocking { .. })
        })?;
        let to = stamp(&mut self.p, "the handoff", waiter, |e| {
            matches!(e, Event::Held { .. })
        })?;
        stamp(&mut self.p, "unlocked", holder, |e| {
            matches!(e, Event::Unlocked { .. })
        })?;
        std::mem::swap(&mut self.holder, &mut self.waiter);
        Ok(ms_between(from, to))
    }

    fn finish(mut self) -> Result<(), BenchError> {
        let holder = self.holder;
        self.p.unlock(holder)?;
        stamp(&mut self.p, "the last unlock", holder, |e| {
            matches!(e, Event::Unlocked { .. })
        })?;
        self.p.quit(STEP_TIMEOUT);
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_taken_block_by_block() {
        let base = [1.0, 1.0, 2.0, 4.0, 4.0];
        let client = [2.0, 2.0, 2.0, 2.0, 2.0];
        let r = Ratios::of(&client, &base, 2);
        // Blocks of 3 then 2: p50 2/1, then 2/4.
        assert_eq!(r.per_repeat, [2.0, 0.5]);
        assert_eq!(r.summary.map(|s| (s.min, s.max)), Some((0.5, 2.0)));
        assert!(Ratios::of(&[], &base, 3).summary.is_none());
        assert_eq!(Ratios::of(&client, &[0.0; 5], 1).per_repeat, Vec::<f64>::new());
    }
}
