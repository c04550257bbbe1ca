//! A token bucket per tenant: `rate_per_s` tokens a second, at most `burst` saved. Pure: the
//! caller passes the time.

/// One bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn new(rate_per_s: u32, burst: u32, now_ms: u64) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate_per_s: f64::from(rate_per_s), burst, tokens: burst, last_ms: now_ms }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now_ms: u64) -> bool {
        let elapsed_s = now_ms.saturating_sub(self.last_ms) as f64 / 1_000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed_s * self.rate_per_s).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_steady_rate_and_time_going_backwards_gives_nothing() {
        let mut bucket = TokenBucket::new(10, 5, 0);
        assert_eq!((0..8).filter(|_| bucket.take(0)).count(), 5, "the burst");
        assert!(!bucket.take(50), "half a token is not a token");
        assert!(bucket.take(100));
        assert!(!bucket.take(100));
        assert!(!bucket.take(10), "a clock that steps back refills nothing");
        assert_eq!((0..100).filter(|_| bucket.take(10_000)).count(), 5, "refill caps at the burst");
    }
}
