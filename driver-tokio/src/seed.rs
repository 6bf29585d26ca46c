//! Seeds for the machines' retry jitter, from entropy: the one place either driver makes them
//! (the blocking driver goes through [`Client`](crate::Client)).
//!
//! The core seeds its jitter from [`LockOptions::seed`](consul_lock_core::machine::LockOptions)
//! so that a run can be replayed; a driver's timing is real and can't be replayed anyway, and
//! processes sharing a seed would retry in lockstep after a shared failure (the very thing the
//! jitter is there to prevent). So the driver overrides the option with a seed of its own.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A seed no other machine of this process (or, with overwhelming likelihood, of any other)
/// gets: the standard library's per-process random hash keys, hashed with a process-wide
/// counter, the process id and the time.
pub(crate) fn fresh() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use consul_lock_core::api::ClientConfig;
    use consul_lock_core::machine::{LockOptions, SemaphoreOptions};

    #[test]
    fn fresh_seeds_differ() {
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|_| fresh()).collect();
        assert_eq!(seeds.len(), 1000);
    }

    #[test]
    fn the_machines_get_fresh_seeds_whatever_the_option_says() {
        let client = crate::Client::new(ClientConfig::http("127.0.0.1:1").expect("config")).expect("client");
        let options = LockOptions::new("a").expect("options");
        let a = client.lock_machine(options.clone()).expect("machine");
        let b = client.lock_machine(options.clone()).expect("machine");
        assert_ne!(a.options().hold.seed, b.options().hold.seed);
        assert_ne!(a.options().hold.seed, options.hold.seed);
        let options = SemaphoreOptions::new("a", 2).expect("options");
        let a = client.semaphore_machine(options.clone()).expect("machine");
        let b = client.semaphore_machine(options).expect("machine");
        assert_ne!(a.options().hold.seed, b.options().hold.seed);
    }
}
