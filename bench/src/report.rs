//! The results: one JSON document with every sample, and a table for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::core_cycle::CoreFigures;
use crate::host::ClientKind;
use crate::scenarios::Plan;
use crate::scenarios::contention::Contention;
use crate::scenarios::failover::Failover;
use crate::scenarios::handoff::Handoff;
use crate::scenarios::idle::Idle;
use crate::scenarios::partition::Partition;
use crate::scenarios::scale::{self, Scale};
use crate::stats::Summary;

/// The machine the figures were measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// The CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Logical CPUs available to the suite.
    pub cpus: usize,
    /// The kernel release.
    pub kernel: String,
    /// `consul version`'s first line.
    pub consul: String,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    /// The plan (sizes) of the run.
    pub plan: Plan,
    /// Where it ran.
    pub machine: Machine,
    /// When it started, in seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// The clients measured.
    pub clients: Vec<ClientKind>,
    /// Handoff latency.
    pub handoff: Option<Handoff>,
    /// Failover after invalidation.
    pub failover: Option<Failover>,
    /// Loss detection under a partition.
    pub partition: Option<Partition>,
    /// Many contenders.
    pub contention: Option<Contention>,
    /// One held lock at rest.
    pub idle: Option<Idle>,
    /// Many locks in one process.
    pub scale: Option<Scale>,
    /// The sans-IO core alone.
    pub core: Option<CoreFigures>,
}

/// `value` as a ratio to Go's, e.g. `0.82x Go`.
fn vs_go(value: Option<f64>, go: Option<f64>) -> String {
    match (value, go) {
        (Some(v), Some(g)) if g > 0.0 => format!("{:.2}x Go", v / g),
        _ => String::new(),
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn latency(summary: Option<Summary>) -> String {
    summary.map_or_else(
        || "-".to_owned(),
        |s| format!("{:.2} / {:.2}  [{:.2}-{:.2}]", s.p50, s.p90, s.min, s.max),
    )
}

impl Results {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let _ = writeln!(
            t,
            "consul-lock-bench, {} plan: {} ({} CPUs), Linux {}, {}",
            self.plan.name, m.cpu, m.cpus, m.kernel, m.consul
        );
        if let Some(h) = &self.handoff {
            let go = h
                .clients
                .get(&ClientKind::Go)
                .and_then(|l| l.summary)
                .map(|s| s.p50);
            let floor = h.floor_txn.summary.map(|s| s.p50);
            let _ = writeln!(
                t,
                "\n1. Handoff, ms: p50 / p90 [min-max], {} rounds",
                self.plan.handoff_rounds
            );
            let _ = writeln!(
                t,
                "   {:<9} {}   (release; read returns; KV acquire: Go's exchange)",
                "floor kv",
                latency(h.floor.summary)
            );
            let _ = writeln!(
                t,
                "   {:<9} {}   (release; read returns; lock transaction: ours)",
                "floor txn",
                latency(h.floor_txn.summary)
            );
            for (kind, l) in &h.clients {
                let p50 = l.summary.map(|s| s.p50);
                let to_floor = match (p50, floor) {
                    (Some(v), Some(f)) if f > 0.0 => format!("{:.2}x floor txn", v / f),
                    _ => String::new(),
                };
                let to_tokio = match h.vs_tokio.get(kind).and_then(|r| r.summary) {
                    Some(r) => format!(
                        "   p50/tokio's {:.2}x [{:.2}-{:.2}] over {} blocks",
                        r.p50, r.min, r.max, r.n
                    ),
                    None => String::new(),
                };
                let _ = writeln!(
                    t,
                    "   {:<9} {:<34} {:<12} {}{}",
                    kind.name(),
                    latency(l.summary),
                    vs_go(p50, go),
                    to_floor,
                    to_tokio
                );
            }
        }
        if let Some(f) = &self.failover {
            let go = f
                .clients
                .get(&ClientKind::Go)
                .and_then(|c| c.next_holder)
                .map(|s| s.p50);
            let _ = writeln!(
                t,
                "\n2. Failover after invalidation, lock-delay {} ms: ms to the next holder p50 [min-max]; to Lost p50",
                f.lock_delay_ms
            );
            for (kind, c) in &f.clients {
                let next = c.next_holder;
                let _ = writeln!(
                    t,
                    "   {:<9} {:>8} [{}-{}]   lost {:>7}   {}",
                    kind.name(),
                    ms(next.map(|s| s.p50)),
                    ms(next.map(|s| s.min)),
                    ms(next.map(|s| s.max)),
                    ms(c.lost.map(|s| s.p50)),
                    vs_go(next.map(|s| s.p50), go)
                );
            }
        }
        if let Some(p) = &self.partition {
            let delay = p
                .lock_delay_ms
                .map_or_else(|| "default (15 s)".to_owned(), |d| format!("{d} ms"));
            let _ = writeln!(
                t,
                "\n3. Partition (black hole), TTL {} ms, lock-delay {delay}, watched {} ms: ms after the cut",
                p.ttl_ms, p.window_ms
            );
            for (kind, c) in &p.clients {
                let lost = c
                    .lost_ms
                    .map_or_else(|| format!("none in {} ms", p.window_ms), |v| format!("{v:.0}"));
                let open = if c.overlap_open {
                    "+ (still both at the end)"
                } else {
                    ""
                };
                let _ = writeln!(
                    t,
                    "   {:<9} Lost {:<16} next holder {:<8} overlap {:.0}{open}",
                    kind.name(),
                    lost,
                    ms(c.next_holder_ms),
                    c.overlap_ms
                );
            }
        }
        if let Some(c) = &self.contention {
            let _ = writeln!(
                t,
                "\n4. Contention, each contender takes the lock once: requests per handoff, wall ms, gap p50/max ms, stalls > 1 s"
            );
            for (n, clients) in &c.sizes {
                let go = clients.get(&ClientKind::Go).map(|g| g.requests_per_handoff);
                for (kind, r) in clients {
                    let _ = writeln!(
                        t,
                        "   {:>3} {:<9} {:>6.1} req/handoff {:<12} wall {:>7.0}   gaps {} / {}   stalls {}",
                        n,
                        kind.name(),
                        r.requests_per_handoff,
                        vs_go(Some(r.requests_per_handoff), go),
                        r.wall_ms,
                        ms(r.gaps.map(|g| g.p50)),
                        ms(r.gaps.map(|g| g.max)),
                        r.stalls
                    );
                    let kinds: Vec<String> = r
                        .by_kind
                        .iter()
                        .map(|(kind, count)| format!("{kind} {:.1}", *count as f64 / *n as f64))
                        .collect();
                    let _ = writeln!(t, "             per handoff: {}", kinds.join(", "));
                    let _ = writeln!(
                        t,
                        "             waiting per handoff {:.1} (less {} requests of one uncontended acquisition each)",
                        r.waiting_per_handoff, r.uncontended_requests
                    );
                }
            }
        }
        if let Some(i) = &self.idle {
            let _ = writeln!(
                t,
                "\n5. Idle cost of one held lock (TTL {} ms), over {} ms",
                i.ttl_ms, i.window_ms
            );
            for (kind, c) in &i.clients {
                let _ = writeln!(
                    t,
                    "   {:<9} {:>5.1} requests/min   CPU {:.2}%   RSS {} KiB",
                    kind.name(),
                    c.requests_per_minute,
                    c.cpu_percent,
                    c.rss_kib
                );
            }
        }
        if let Some(c) = &self.core {
            let _ = writeln!(
                t,
                "\n6. The core alone (one thread, virtual time, {} full cycles of {:.0} events with {} renewals)",
                c.cycles, c.events_per_cycle, c.renewals_per_cycle
            );
            let _ = writeln!(
                t,
                "   {:.2} M events/s ({:.0} ns/event)",
                c.events_per_sec / 1e6,
                c.ns_per_event
            );
            match (
                c.allocs_per_renew_cycle,
                c.reallocs_per_renew_cycle,
                c.bytes_per_renew_cycle,
            ) {
                (Some(a), Some(r), Some(b)) => {
                    let _ = writeln!(
                        t,
                        "   per renew cycle: {a:.1} allocations + {r:.1} reallocations, {b:.0} bytes"
                    );
                }
                _ => {
                    let _ = writeln!(t, "   allocations not counted");
                }
            }
        }
        if let Some(s) = &self.scale {
            let _ = writeln!(
                t,
                "\n7. Scale, locks held by one process (one shared client), idle window {} ms",
                s.window_ms
            );
            for (kind, runs) in scale::by_client(s) {
                for r in runs {
                    let per_lock = r
                        .kib_per_lock
                        .map_or_else(|| "-".to_owned(), |k| format!("{k:.1}"));
                    let reaction = r
                        .reaction()
                        .map_or_else(|| "-".to_owned(), |s| format!("{:.3}/{:.3} s", s.p50, s.max));
                    let requests = r
                        .idle_requests_per_min
                        .map_or_else(|| "-".to_owned(), |q| format!("{q:.0}"));
                    let session = r.session_loss_s.map_or_else(String::new, |s| {
                        format!(
                            "  session destroyed: {} keys lost in {s:.3} s",
                            r.session_keys_lost
                        )
                    });
                    let _ = writeln!(
                        t,
                        "   {:<9} {:<7} limit {:>5} {:>5} asked {:>5} held in {:>5.1} s  {:>6} KiB/lock  {:>5} conns (max {:>5})  idle CPU {:>5.1}%  idle req/min {:>5}  lost {} errors {}  deletes {} reported {} p50/max {}{session}",
                        kind.name(),
                        r.mode.name(),
                        r.conn_limit,
                        r.locks,
                        r.held,
                        r.seconds_to_hold,
                        per_lock,
                        r.connections,
                        r.connections_max,
                        r.idle_cpu_percent,
                        requests,
                        r.lost,
                        r.errors,
                        r.deletes,
                        r.delete_reaction_s.len(),
                        reaction,
                    );
                    for e in &r.error_samples {
                        let _ = writeln!(t, "             error: {e}");
                    }
                }
            }
        }
        t
    }
}

/// The handoff latencies as an SVG chart: for each client and both floors, the share of handoffs
/// (y) done within x milliseconds (an empirical CDF: a curve further left is faster, a steeper
/// one steadier).
pub fn handoff_svg(h: &Handoff) -> String {
    const W: f64 = 720.0;
    const H: f64 = 400.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 150.0;
    const TOP: f64 = 20.0;
    const BOTTOM: f64 = 44.0;
    const COLOURS: [&str; 5] = ["#999999", "#555555", "#d62728", "#1f77b4", "#2ca02c"];
    let mut series: Vec<(String, &[f64])> = vec![
        ("floor (kv)".to_owned(), &h.floor.samples_ms),
        ("floor (txn)".to_owned(), &h.floor_txn.samples_ms),
    ];
    for (kind, l) in &h.clients {
        series.push((kind.name().to_owned(), &l.samples_ms));
    }
    // The x axis ends past the slowest series' 90th percentile, so that one outlier does not
    // squash the curves.
    let x_max = series
        .iter()
        .filter_map(|(_, s)| Summary::of(s).map(|s| s.p90))
        .fold(0.0_f64, f64::max)
        * 1.5;
    let x_max = if x_max > 0.0 { x_max } else { 1.0 };
    let x = |ms: f64| LEFT + (ms.min(x_max) / x_max) * (W - LEFT - RIGHT);
    let y = |share: f64| TOP + (1.0 - share) * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    // Axes, with a tick per fifth of the range.
    let (x0, x1, y0, y1) = (x(0.0), x(x_max), y(0.0), y(1.0));
    let _ = writeln!(
        svg,
        r#"<path d="M{x0},{y1} V{y0} H{x1}" stroke="black" fill="none"/>"#
    );
    for i in 0..=5 {
        let ms = x_max * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{ms:.1}</text>"#,
            x(ms),
            y0 + 16.0
        );
    }
    for share in [0.0, 0.5, 0.9, 1.0] {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{share}</text><path d="M{x0},{:.1} H{x1}" stroke="#eeeeee"/>"##,
            x0 - 6.0,
            y(share) + 4.0,
            y(share)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">handoff latency, ms (share of handoffs done within)</text>"#,
        (x0 + x1) / 2.0,
        H - 8.0
    );
    for (i, (name, samples)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        let mut path = format!("M{:.1},{:.1}", x(0.0), y(0.0));
        for (k, ms) in sorted.iter().enumerate() {
            // A step: up at each sample.
            let _ = write!(path, " H{:.1} V{:.1}", x(*ms), y((k + 1) as f64 / n));
        }
        let _ = writeln!(
            svg,
            r#"<path d="{path} H{x1:.1}" stroke="{colour}" stroke-width="2" fill="none"/>"#
        );
        let ly = TOP + 18.0 * i as f64 + 10.0;
        let _ = writeln!(
            svg,
            r#"<path d="M{:.1},{ly:.1} h20" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            W - RIGHT + 16.0,
            W - RIGHT + 42.0,
            ly + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
