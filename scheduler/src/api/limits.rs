//! Request rate limits: one token bucket per caller (tenant, or the
//! admin), refilled at `rate` per second up to `burst`. A caller past its
//! budget gets `RESOURCE_EXHAUSTED` saying when to retry. Agents are not
//! limited (their heartbeats ride one stream per node).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Token buckets by caller.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    /// `rate` requests per second sustained, `burst` at once; rate 0 turns
    /// limiting off.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes one request from `caller`'s bucket at `now`; Err(wait) when it
    /// is empty: the time until the next token.
    pub fn allow(&mut self, caller: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        if self.buckets.len() > 100_000 {
            // Forget idle callers (full buckets) rather than grow forever.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self
            .buckets
            .entry(caller.to_string())
            .or_insert((self.burst, now));
        let refilled = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(Duration::from_secs_f64((1.0 - refilled) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let mut l = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.allow("a", t0).is_ok());
        }
        let wait = l.allow("a", t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(l.allow("b", t0).is_ok(), "buckets are per caller");
        // 100 ms later one token is back, not more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.allow("a", t1).is_ok());
        assert!(l.allow("a", t1).is_err());
        // Long idle refills to the burst only.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.allow("a", t2).is_ok());
        }
        assert!(l.allow("a", t2).is_err());
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let mut l = RateLimiter::new(0, 0);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert!(l.allow("a", now).is_ok());
        }
    }
}
