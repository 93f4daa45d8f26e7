//! Per-key rate limits: a token bucket for each API key, in memory (a restart refills them,
//! which errs on the caller's side). A key over its limit is answered 429 with `Retry-After`,
//! before its request does anything.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::api::RateLimit;

/// The daemon's limit for keys without one of their own: generous, so that a busy client
/// (the SDK suites, a CI fleet behind one key) never meets it; it is there to stop a runaway
/// loop or a stolen key from monopolising the daemon.
pub const DEFAULT: RateLimit = RateLimit {
    per_s: 200,
    burst: 1000,
};

/// Buckets above this many are pruned of the full ones (a full bucket is the same as none).
const PRUNE_ABOVE: usize = 4096;

pub struct Limiter {
    /// `None`: no limit for keys without their own (`moat serve --rate-limit 0`).
    default: Option<RateLimit>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Default for Limiter {
    fn default() -> Limiter {
        Limiter::new(Some(DEFAULT))
    }
}

impl Limiter {
    pub fn new(default: Option<RateLimit>) -> Limiter {
        Limiter {
            default,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limit of keys without their own.
    pub fn default_limit(&self) -> Option<RateLimit> {
        self.default
    }

    /// Takes a token from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &str, own: Option<RateLimit>) -> Result<(), Duration> {
        let Some(limit) = own.or(self.default) else {
            return Ok(());
        };
        self.take_at(key, limit, Instant::now())
    }

    fn take_at(&self, key: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let (rate, burst) = (f64::from(limit.per_s), f64::from(limit.burst));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        // A lowered burst applies at once: the bucket never holds more than it.
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = Limiter::new(None);
        let lim = RateLimit {
            per_s: 10,
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take_at("k", lim, t0).unwrap();
        }
        let wait = l.take_at("k", lim, t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        // Another key has a bucket of its own.
        l.take_at("other", lim, t0).unwrap();
        // A refused request took nothing: after 100 ms there is exactly one token.
        let t1 = t0 + Duration::from_millis(100);
        l.take_at("k", lim, t1).unwrap();
        assert!(l.take_at("k", lim, t1).is_err());
        // Idle for long, the bucket refills to its burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            l.take_at("k", lim, t2).unwrap();
        }
        assert!(l.take_at("k", lim, t2).is_err());
    }

    #[test]
    fn no_default_means_no_limit_for_keys_without_their_own() {
        let l = Limiter::new(None);
        for _ in 0..10_000 {
            l.take("k", None).unwrap();
        }
        let own = RateLimit { per_s: 1, burst: 1 };
        l.take("k", Some(own)).unwrap();
        assert!(l.take("k", Some(own)).is_err());
    }
}
