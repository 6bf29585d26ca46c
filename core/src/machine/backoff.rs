//! Seeded jitter and capped exponential backoff. Randomness comes from the options' seed, never
//! from a global source, so that a run can be replayed exactly.

use std::time::Duration;

/// SplitMix64: tiny, fast, and good enough to spread retries apart.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration uniformly in `[d/2, d]`: "equal jitter", so retries spread out but never come
    /// sooner than half the intended pause.
    pub(crate) fn jitter(&mut self, d: Duration) -> Duration {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        let extra = if half == 0 {
            0
        } else {
            self.next_u64() % (half + 1)
        };
        Duration::from_nanos(nanos - half + extra)
    }
}

/// Capped exponential backoff with equal jitter.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The pause before the next attempt; each call doubles the next one, up to the cap.
    pub(crate) fn next(&mut self, rng: &mut Rng) -> Duration {
        let factor = 1u32 << self.attempt.min(16);
        self.attempt = self.attempt.saturating_add(1);
        rng.jitter(self.base.saturating_mul(factor).min(self.cap))
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let mut rng = Rng::new(7);
        for _ in 0..1000 {
            let d = rng.jitter(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
        assert_eq!(rng.jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut rng = Rng::new(1);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let pauses: Vec<_> = (0..8).map(|_| b.next(&mut rng)).collect();
        assert!(pauses[0] <= Duration::from_millis(100));
        assert!(pauses[3] >= Duration::from_millis(400));
        assert!(pauses.iter().all(|p| *p <= Duration::from_secs(1)));
        assert_eq!(b.attempt, 8);
        b.reset();
        assert!(b.next(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn same_seed_same_sequence() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
    }
}
