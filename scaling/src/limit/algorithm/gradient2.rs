use super::{Algorithm, ExpAvg, Sample, clamp_limit};

/// Gradient-based limit — a port of Netflix concurrency-limits'
/// `Gradient2Limit`.
///
/// It compares a long-term exponential average of latency with the current
/// one: `gradient = clamp(tolerance · long / short, 0.5, 1)`, then
/// `limit ← limit·gradient + queue_size`, smoothed. When the long average is
/// more than twice the short one it decays by 5% a sample, so it can follow
/// a service that got faster. It does not grow while less than half the
/// limit is in use.
///
/// Defaults are Netflix's: initial limit 20, limits 20 to 200, smoothing
/// 0.2, tolerance 1.5, long window 600 samples (warm-up 10), queue size 4.
///
/// Where gratify differs: nothing here — this is the baseline. Its known
/// weakness is upward drift: the long average follows a slowly growing
/// latency, so the limit keeps creeping up under sustained queueing (Netflix
/// concurrency-limits PR #134); gratify's [`DelayCostLimit`](super::DelayCostLimit)
/// keeps its baseline apart from the limit and guards it.
#[derive(Debug, Clone)]
pub struct Gradient2 {
    limit: f64,
    initial: usize,
    min_limit: usize,
    max_limit: usize,
    smoothing: f64,
    tolerance: f64,
    queue_size: f64,
    long_rtt: ExpAvg,
}

impl Default for Gradient2 {
    fn default() -> Self {
        Self {
            limit: 20.0,
            initial: 20,
            min_limit: 20,
            max_limit: 200,
            smoothing: 0.2,
            tolerance: 1.5,
            queue_size: 4.0,
            long_rtt: ExpAvg::new(600, 10),
        }
    }
}

impl Gradient2 {
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

    /// The bounds of the limit.
    #[must_use]
    pub fn limits(mut self, min: usize, max: usize) -> Self {
        self.min_limit = min.max(1);
        self.max_limit = max.max(self.min_limit);
        self
    }

    /// Latency inflation tolerated before the limit shrinks (at least 1).
    #[must_use]
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        if tolerance.is_finite() {
            self.tolerance = tolerance.max(1.0);
        }
        self
    }

    /// Weight of a new estimate, in `(0, 1]`.
    #[must_use]
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        if smoothing.is_finite() {
            self.smoothing = smoothing.clamp(0.01, 1.0);
        }
        self
    }

    /// Headroom added to the limit each update.
    #[must_use]
    pub fn queue_size(mut self, size: f64) -> Self {
        if size.is_finite() {
            self.queue_size = size.max(0.0);
        }
        self
    }
}

impl Algorithm for Gradient2 {
    fn initial_limit(&self) -> usize {
        self.initial
    }

    fn update(&mut self, s: &Sample) -> usize {
        let short = s.latency.as_secs_f64().max(1e-9);
        let long = self.long_rtt.add(short);
        if long / short > 2.0 {
            self.long_rtt.set(long * 0.95);
        }
        if (s.in_flight as f64) < self.limit / 2.0 {
            return clamp_limit(self.limit, self.min_limit, self.max_limit);
        }
        let gradient = (self.tolerance * self.long_rtt.get() / short).clamp(0.5, 1.0);
        let new = self.limit * gradient + self.queue_size;
        let new = self.limit * (1.0 - self.smoothing) + new * self.smoothing;
        self.limit = new.clamp(self.min_limit as f64, self.max_limit as f64);
        clamp_limit(self.limit, self.min_limit, self.max_limit)
    }

    fn name(&self) -> &'static str {
        "gradient2"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::limit::algorithm::Outcome;
    use crate::limit::algorithm::testing::sample;

    #[test]
    fn grows_at_steady_latency_and_halves_at_most_on_a_spike() {
        let now = Instant::now();
        let mut g = Gradient2::new().limits(1, 1000).initial_limit(20);
        let mut limit = 20;
        for _ in 0..50 {
            limit = g.update(&sample(now, 10.0, limit, Outcome::Success));
        }
        assert!(
            limit > 40,
            "steady latency: grows by the queue size, got {limit}"
        );
        let before = limit;
        let after = g.update(&sample(now, 1000.0, limit, Outcome::Success));
        // gradient ≥ 0.5, smoothing 0.2: at most a 10% cut in one sample.
        assert!(after < before && after as f64 >= before as f64 * 0.89);
    }
}
