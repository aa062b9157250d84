//! Exponential backoff with full jitter, capped (contract §6: 2 s).

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The usual one for Redis: 50 ms doubling to 2 s.
    pub fn redis() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(2))
    }

    /// Before the first join: 50 ms doubling to 1 s, so a node is ready
    /// within 2 s of Redis answering (§6 Join) even when Redis came up
    /// just after a failed attempt.
    pub fn boot() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Next delay: uniform in [ceiling/2, ceiling], ceiling = min(cap, base·2ⁿ).
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::redis();
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(50));
        for _ in 0..6 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d <= Duration::from_secs(2) && d >= Duration::from_secs(1),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(50));
    }
}
