//! The sans-IO core alone, under criterion: a `LockMachine` driven through full lock cycles
//! (acquire, hold with renewals, release) and through renew cycles of a held lock, in virtual
//! time, against replies recorded from the simulated Consul (see
//! `consul_lock_bench::core_cycle`). Throughput is in events (calls feeding the machine an
//! input), so criterion's `elem/s` is events per second.
//!
//! Also prints, once, the heap allocations of one renew cycle, counted by installing
//! `CountingAlloc` as the global allocator.
//!
//! `cargo bench -p consul-lock-bench --bench core_machine` measures;
//! `cargo bench -p consul-lock-bench --bench core_machine -- --test` runs each bench once (CI).

use std::time::Instant;

use consul_lock_bench::alloc_count::CountingAlloc;
use consul_lock_bench::core_cycle::{self, CycleRig, DEFAULT_RENEWALS};
use criterion::{Criterion, Throughput};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Renew cycles whose allocations are counted for the printed figure.
const ALLOC_RENEWALS: u64 = 1_000;

/// Full cycles: lock, acquire, [`DEFAULT_RENEWALS`] renewals, unlock, release.
fn full_cycle(c: &mut Criterion) {
    let mut rig = CycleRig::new(Instant::now(), DEFAULT_RENEWALS).expect("the rig records its replies");
    let events = rig.run_cycle().expect("a full cycle").events;
    let mut group = c.benchmark_group("core_machine");
    group.throughput(Throughput::Elements(events));
    group.bench_function("full_cycle", |b| {
        b.iter_custom(|cycles| rig.timed_cycles(cycles).expect("full cycles").elapsed);
    });
    group.finish();
}

/// Renew cycles of a held lock: the renew timer, the renew request, its reply (2 events; a
/// monitor read answered every 40 renewals adds one more, which the throughput leaves out).
fn renew_cycle(c: &mut Criterion) {
    let mut rig = CycleRig::new(Instant::now(), DEFAULT_RENEWALS).expect("the rig records its replies");
    rig.timed_renew_cycles(1).expect("a held lock renewing");
    let mut group = c.benchmark_group("core_machine");
    group.throughput(Throughput::Elements(2));
    group.bench_function("renew_cycle", |b| {
        b.iter_custom(|renewals| rig.timed_renew_cycles(renewals).expect("renew cycles").elapsed);
    });
    group.finish();
}

/// Prints the allocations of one renew cycle, in total and by step.
fn print_renew_allocations() {
    let counted = core_cycle::renew_allocations(Instant::now(), ALLOC_RENEWALS).expect("renew cycles");
    let Some(a) = counted else {
        println!("core_machine: allocations not counted (CountingAlloc is not the global allocator)");
        return;
    };
    let per = |counts: consul_lock_bench::alloc_count::AllocCounts| {
        format!(
            "{:.1} allocations, {:.1} reallocs, {:.0} bytes",
            a.per_renew(counts.allocations),
            a.per_renew(counts.reallocs),
            a.per_renew(counts.bytes)
        )
    };
    println!(
        "core_machine: per renew cycle (mean of {} renewals): {}",
        a.renewals,
        per(a.total())
    );
    println!("  poll_timeout:                 {}", per(a.timer));
    println!("  handle_timeout + poll_action: {}", per(a.send));
    println!("  handle_response (renew):      {}", per(a.reply));
}

// Written out rather than with `criterion_group!`/`criterion_main!`, whose generated `pub fn`
// carries no doc and would trip the crate's `missing_docs` lint; this is what they expand to.
fn main() {
    print_renew_allocations();
    let mut criterion = Criterion::default().configure_from_args();
    full_cycle(&mut criterion);
    renew_cycle(&mut criterion);
    criterion.final_summary();
}
