//! Heap allocation counting: a [`GlobalAlloc`] that forwards to [`System`] and counts what it is
//! asked for, so that a benchmark can say how many allocations a piece of code makes.
//!
//! A binary opts in by installing it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: consul_lock_bench::alloc_count::CountingAlloc = consul_lock_bench::alloc_count::CountingAlloc;
//! ```
//!
//! The counters are process-wide and relaxed: a figure is exact only while no other thread
//! allocates, which is how the core benchmark uses them (one thread, snapshots around the code
//! measured). Without the allocator installed the counters never move; [`installed`] tells the
//! two cases apart, so that a figure is reported as unknown rather than as zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Calls to `alloc` and `alloc_zeroed`: fresh blocks.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Calls to `realloc`: a block grown or shrunk (possibly moved).
static REALLOCS: AtomicU64 = AtomicU64::new(0);
/// Bytes asked for: the size of each fresh block plus the new size of each realloc.
static BYTES: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting allocations, reallocations and bytes asked for.
///
/// Deallocations are not counted: the figure of interest is how often the allocator is asked for
/// memory (each ask costs a trip through `malloc`), not what is live.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountingAlloc;

impl CountingAlloc {
    /// Counts one fresh block of `size` bytes.
    fn count_alloc(size: usize) {
        // Relaxed: the counters order nothing else, and a snapshot taken on the allocating
        // thread sees that thread's own increments.
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

#[allow(unsafe_code)]
// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract, and returns `System`'s result unchanged; the caller's obligations (a
// non-zero layout, a pointer from this allocator with its layout) pass through as they are, since
// every block this allocator hands out is a `System` block. The bookkeeping is atomic adds on
// statics: it never allocates (no recursion into the allocator) and never unwinds.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        CountingAlloc::count_alloc(layout.size());
        // SAFETY: the caller's guarantees for `alloc` are `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        CountingAlloc::count_alloc(layout.size());
        // SAFETY: the caller's guarantees for `alloc_zeroed` are `System::alloc_zeroed`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`; the
        // caller's guarantees on `new_size` are `System::realloc`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The counters at one moment; subtract two with [`AllocCounts::since`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocCounts {
    /// Fresh blocks (`alloc`, `alloc_zeroed`).
    pub allocations: u64,
    /// Reallocations (`realloc`), counted apart: a `Vec` or `String` growing in place is cheaper
    /// than a fresh block, and it says where a missing `with_capacity` is.
    pub reallocs: u64,
    /// Bytes asked for: each fresh block's size plus each realloc's new size.
    pub bytes: u64,
}

impl AllocCounts {
    /// What was counted between `earlier` and `self`.
    pub fn since(self, earlier: AllocCounts) -> AllocCounts {
        // Wrapping: the counters are monotonic u64s, so a wrap would take centuries; wrapping
        // keeps the subtraction total rather than panicking in a debug build.
        AllocCounts {
            allocations: self.allocations.wrapping_sub(earlier.allocations),
            reallocs: self.reallocs.wrapping_sub(earlier.reallocs),
            bytes: self.bytes.wrapping_sub(earlier.bytes),
        }
    }

    /// The sum of two counts (of separate windows).
    pub fn plus(self, other: AllocCounts) -> AllocCounts {
        AllocCounts {
            allocations: self.allocations.wrapping_add(other.allocations),
            reallocs: self.reallocs.wrapping_add(other.reallocs),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// The counters now. All zero, for good, when [`CountingAlloc`] is not the global allocator.
pub fn snapshot() -> AllocCounts {
    AllocCounts {
        allocations: ALLOCATIONS.load(Ordering::Relaxed),
        reallocs: REALLOCS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    }
}

/// Whether [`CountingAlloc`] is the process's global allocator, so that the counters mean
/// something.
///
/// Found out once, by allocating a box and seeing whether the counter moves (the global allocator
/// is fixed at link time, so the answer never changes); later calls read the cached answer.
pub fn installed() -> bool {
    const UNKNOWN: u8 = 0;
    const NO: u8 = 1;
    const YES: u8 = 2;
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
    match STATE.load(Ordering::Relaxed) {
        NO => false,
        YES => true,
        _ => {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            // `black_box` keeps the compiler from eliding the allocation, which it may do for a
            // box that is never looked at.
            drop(std::hint::black_box(Box::new(0u64)));
            // Only this allocator moves the counter, so any movement (even another thread's)
            // proves it installed.
            let yes = ALLOCATIONS.load(Ordering::Relaxed) != before;
            STATE.store(if yes { YES } else { NO }, Ordering::Relaxed);
            yes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_installed_in_the_test_binary() {
        // The library's test binary runs on `System`: the counters stay at zero.
        assert!(!installed());
        assert_eq!(snapshot(), AllocCounts::default());
    }

    #[test]
    fn counts_subtract_and_add() {
        let a = AllocCounts {
            allocations: 5,
            reallocs: 2,
            bytes: 100,
        };
        let b = AllocCounts {
            allocations: 8,
            reallocs: 3,
            bytes: 164,
        };
        let d = b.since(a);
        assert_eq!(
            d,
            AllocCounts {
                allocations: 3,
                reallocs: 1,
                bytes: 64
            }
        );
        assert_eq!(a.plus(d), b);
    }
}
