//! The semaphore machine under an arbitrary run (options, operations, replies plausible, hostile,
//! real or arbitrary, transport errors, timeouts, time jumps), with its invariants checked after
//! every step and a wind-down to rest at the end: see `consul_lock_fuzz::semaphore_driver`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    consul_lock_fuzz::semaphore_driver::run(data, 512);
});
