//! The daemon's limit on journal lines for new blocking stacks.

use std::time::Instant;

/// A token bucket: `per_minute` lines, in bursts of up to `per_minute`.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    tokens: f64,
    last: Instant,
    pub suppressed: u64,
}

impl RateLimit {
    pub fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            per_minute,
            tokens: per_minute as f64,
            last: now,
            suppressed: 0,
        }
    }

    pub fn set_rate(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
        self.tokens = self.tokens.min(per_minute as f64);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let cap = self.per_minute as f64;
        self.tokens = (self.tokens + dt * cap / 60.0).min(cap);
    }

    /// Whether one more line may be written now; counts it as suppressed
    /// otherwise.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The "N more suppressed" line, once a token is available again.
    pub fn flush(&mut self, now: Instant) -> Option<String> {
        if self.suppressed == 0 {
            return None;
        }
        self.refill(now);
        if self.tokens < 1.0 {
            return None;
        }
        self.tokens -= 1.0;
        let n = std::mem::take(&mut self.suppressed);
        Some(format!(
            "blockwatch: {n} more new blocking stacks suppressed (at most {} logged per minute; see /metrics and /stacks)",
            self.per_minute
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_bucket_limits_and_reports_suppressed() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(10, t0);
        let allowed = (0..25).filter(|_| l.take(t0)).count();
        assert_eq!(allowed, 10);
        assert_eq!(l.suppressed, 15);
        assert_eq!(l.flush(t0), None, "no token yet");
        let line = l.flush(t0 + Duration::from_secs(6)).unwrap();
        assert!(line.contains("15 more"), "{line}");
        assert_eq!(l.suppressed, 0);
        assert!(!l.take(t0 + Duration::from_secs(6)), "the flush used it");
        assert!(l.take(t0 + Duration::from_secs(12)));
        let mut none = RateLimit::new(0, t0);
        assert!(!none.take(t0 + Duration::from_secs(600)));
    }
}
