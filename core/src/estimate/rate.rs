use std::time::{Duration, Instant};

/// An exponentially weighted moving estimate of an event rate (events per
/// second) with time constant `tau`.
///
/// Each event adds one to a count that decays as `e^(−Δt/τ)`; the rate is the
/// count divided by `τ·(1 − e^(−t/τ))`, `t` being the time since the
/// estimator started, which removes the start-up bias. Events a long time
/// apart decay correctly: no fixed-size buckets, O(1) time and memory.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    tau: f64,
    count: f64,
    start: Instant,
    last: Instant,
}

impl RateEstimator {
    /// An estimator with time constant `tau` (clamped to at least 1 ms),
    /// started at `now`.
    pub fn new(tau: Duration, now: Instant) -> Self {
        Self {
            tau: tau.as_secs_f64().max(1e-3),
            count: 0.0,
            start: now,
            last: now,
        }
    }

    /// Records one event at `now`.
    pub fn record(&mut self, now: Instant) {
        self.record_n(now, 1.0);
    }

    /// Records `n` events at `now` (non-finite or negative `n` is ignored).
    pub fn record_n(&mut self, now: Instant, n: f64) {
        self.decay_to(now);
        if n.is_finite() && n > 0.0 {
            self.count += n;
        }
    }

    /// The estimated rate, per second, at `now`.
    pub fn rate(&self, now: Instant) -> f64 {
        let since_last = now.saturating_duration_since(self.last).as_secs_f64();
        let count = self.count * (-since_last / self.tau).exp();
        let age = now.saturating_duration_since(self.start).as_secs_f64();
        let window = self.tau * -(-age / self.tau).exp_m1();
        if window > 0.0 { count / window } else { 0.0 }
    }

    /// The time constant.
    pub fn tau(&self) -> Duration {
        Duration::from_secs_f64(self.tau)
    }

    fn decay_to(&mut self, now: Instant) {
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            self.count *= (-dt / self.tau).exp();
            self.last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::test_rng::Rng;

    #[test]
    fn converges_on_poisson_arrivals() {
        for lambda in [0.5, 20.0, 2_000.0] {
            let start = Instant::now();
            let mut rng = Rng(7);
            let mut est = RateEstimator::new(Duration::from_secs(30), start);
            let mut t = 0.0;
            while t < 600.0 {
                t += rng.exp(lambda);
                est.record(start + Duration::from_secs_f64(t));
            }
            let got = est.rate(start + Duration::from_secs_f64(t));
            let tolerance = 4.0 / (lambda * 30.0).sqrt(); // ~4 standard errors
            assert!((got / lambda - 1.0).abs() < tolerance, "λ={lambda}: {got}");
        }
    }

    #[test]
    fn tracks_a_step_and_decays_to_zero() {
        let start = Instant::now();
        let mut est = RateEstimator::new(Duration::from_secs(5), start);
        for i in 0..6_000u64 {
            est.record(start + Duration::from_millis(10 * i)); // 100/s for 60 s
        }
        let end = start + Duration::from_secs(60);
        assert!((est.rate(end) - 100.0).abs() < 2.0);
        // Silence for 10 τ: the estimate falls below 0.01 %.
        assert!(est.rate(end + Duration::from_secs(50)) < 0.01);
    }

    #[test]
    fn early_estimates_are_unbiased() {
        let start = Instant::now();
        let mut est = RateEstimator::new(Duration::from_secs(60), start);
        for i in 0..100u64 {
            est.record(start + Duration::from_millis(10 * i));
        }
        // One second in, with a 60 s time constant, 100 events a second.
        let r = est.rate(start + Duration::from_secs(1));
        assert!((r - 100.0).abs() < 3.0, "{r}");
    }
}
