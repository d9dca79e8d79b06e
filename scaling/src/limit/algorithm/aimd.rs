use std::time::Duration;

use super::{Algorithm, Sample, clamp_limit};

/// Additive increase, multiplicative decrease on loss — a port of Netflix
/// concurrency-limits' `AIMDLimit`.
///
/// On a drop (an overload response or a timeout) or a latency above
/// `timeout`, the limit is multiplied by `backoff_ratio`; otherwise, when at
/// least half the limit is in use, it grows by one.
///
/// Defaults are Netflix's: initial limit 20, backoff ratio 0.9, timeout 5 s,
/// limits 20 to 200.
#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    initial: usize,
    backoff_ratio: f64,
    timeout: Duration,
    min_limit: usize,
    max_limit: usize,
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            limit: 20.0,
            initial: 20,
            backoff_ratio: 0.9,
            timeout: Duration::from_secs(5),
            min_limit: 20,
            max_limit: 200,
        }
    }
}

impl Aimd {
    /// Netflix's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limit to start from.
    #[must_use]
    pub fn initial_limit(mut self, limit: usize) -> Self {
        self.initial = limit.max(1);
        self.limit = self.initial as f64;
        self
    }

    /// The factor applied on a drop, in `[0.5, 1)`.
    #[must_use]
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        if ratio.is_finite() {
            self.backoff_ratio = ratio.clamp(0.5, 0.999);
        }
        self
    }

    /// Latency counted as a timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bounds of the limit.
    #[must_use]
    pub fn limits(mut self, min: usize, max: usize) -> Self {
        self.min_limit = min.max(1);
        self.max_limit = max.max(self.min_limit);
        self
    }
}

impl Algorithm for Aimd {
    fn initial_limit(&self) -> usize {
        self.initial
    }

    fn update(&mut self, s: &Sample) -> usize {
        if s.outcome.is_drop() || s.latency > self.timeout {
            self.limit *= self.backoff_ratio;
        } else if s.in_flight * 2 >= self.limit as usize {
            self.limit += 1.0;
        }
        self.limit = self
            .limit
            .clamp(self.min_limit as f64, self.max_limit as f64);
        clamp_limit(self.limit, self.min_limit, self.max_limit)
    }

    fn name(&self) -> &'static str {
        "aimd"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::limit::algorithm::Outcome;
    use crate::limit::algorithm::testing::sample;

    #[test]
    fn grows_when_used_and_backs_off_on_drops() {
        let now = Instant::now();
        let mut a = Aimd::new().limits(1, 200).initial_limit(10);
        assert_eq!(a.update(&sample(now, 10.0, 5, Outcome::Success)), 11);
        // Barely used: no growth (application-limited).
        assert_eq!(a.update(&sample(now, 10.0, 1, Outcome::Success)), 11);
        assert_eq!(a.update(&sample(now, 10.0, 11, Outcome::Overload)), 10); // 11 × 0.9 = 9.9
        assert_eq!(a.update(&sample(now, 6_000.0, 11, Outcome::Success)), 9);
    }
}
