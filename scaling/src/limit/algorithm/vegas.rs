use std::time::Duration;

use super::{Algorithm, Sample, clamp_limit};

/// Delay-based limit after TCP Vegas — a port of Netflix concurrency-limits'
/// `VegasLimit`.
///
/// It estimates the queue at the service as `L·(1 − rtt_noload/rtt)` and
/// grows the limit while the queue is below `alpha = 3·log10(L)`, shrinks it
/// above `beta = 6·log10(L)`, and jumps by `beta` when the queue is below
/// `log10(L)` — as Netflix's `Log10RootFunction`, a whole number:
/// `max(1, ⌊log10 L⌋)`. `rtt_noload` is the lowest latency seen, re-probed every
/// `probe_multiplier × L` samples (with jitter) so it can follow a slower
/// service.
///
/// Defaults are Netflix's: initial limit 20, maximum 1000, smoothing 1.0,
/// probe multiplier 30.
#[derive(Debug, Clone)]
pub struct Vegas {
    limit: f64,
    initial: usize,
    max_limit: usize,
    smoothing: f64,
    rtt_noload: Option<Duration>,
    probe_multiplier: usize,
    probe_count: usize,
    probe_jitter: f64,
    rng: u64,
}

impl Default for Vegas {
    fn default() -> Self {
        let mut v = Self {
            limit: 20.0,
            initial: 20,
            max_limit: 1000,
            smoothing: 1.0,
            rtt_noload: None,
            probe_multiplier: 30,
            probe_count: 0,
            probe_jitter: 0.5,
            rng: 0x9E37_79B9_7F4A_7C15,
        };
        v.probe_jitter = v.next_jitter();
        v
    }
}

/// Netflix's `Log10RootFunction` of the limit as an integer: `max(1,
/// (int) log10(n))` — whole numbers, so the thresholds step at 10, 100 and
/// 1,000 as theirs do.
fn log10_root(limit: f64) -> f64 {
    let n = limit.max(0.0) as u64;
    if n < 10 {
        1.0
    } else {
        (n as f64).log10().floor().max(1.0)
    }
}

impl Vegas {
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

    /// The maximum limit.
    #[must_use]
    pub fn max_limit(mut self, max: usize) -> Self {
        self.max_limit = max.max(1);
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

    /// Samples between probes of the no-load latency, per unit of limit.
    #[must_use]
    pub fn probe_multiplier(mut self, multiplier: usize) -> Self {
        self.probe_multiplier = multiplier.max(1);
        self
    }

    fn next_jitter(&mut self) -> f64 {
        // xorshift: probe jitter in [0.5, 1), as Netflix's ThreadLocalRandom.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        0.5 + (x >> 11) as f64 / (1u64 << 53) as f64 * 0.5
    }

    fn should_probe(&self) -> bool {
        self.probe_jitter * self.probe_multiplier as f64 * self.limit <= self.probe_count as f64
    }
}

impl Algorithm for Vegas {
    fn initial_limit(&self) -> usize {
        self.initial
    }

    fn update(&mut self, s: &Sample) -> usize {
        let current = clamp_limit(self.limit, 1, self.max_limit);
        self.probe_count += 1;
        if self.should_probe() {
            self.probe_jitter = self.next_jitter();
            self.probe_count = 0;
            self.rtt_noload = Some(s.latency);
            return current;
        }
        let rtt = s.latency.max(Duration::from_nanos(1));
        let noload = match self.rtt_noload {
            Some(n) if rtt >= n => n,
            _ => {
                self.rtt_noload = Some(rtt);
                return current;
            }
        };
        let queue = (self.limit * (1.0 - noload.as_secs_f64() / rtt.as_secs_f64())).ceil();
        let l = self.limit;
        let log = log10_root(l);
        let new = if s.outcome.is_drop() {
            l - log
        } else if (s.in_flight as f64) * 2.0 < l {
            return current;
        } else {
            let (alpha, beta, threshold) = (3.0 * log, 6.0 * log, log);
            if queue <= threshold {
                l + beta
            } else if queue < alpha {
                l + log
            } else if queue > beta {
                l - log
            } else {
                return current;
            }
        };
        let new = new.clamp(1.0, self.max_limit as f64);
        self.limit = (1.0 - self.smoothing) * self.limit + self.smoothing * new;
        clamp_limit(self.limit, 1, self.max_limit)
    }

    fn name(&self) -> &'static str {
        "vegas"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::limit::algorithm::Outcome;
    use crate::limit::algorithm::testing::sample;

    #[test]
    fn log10_is_netflixs_whole_number() {
        // Log10RootFunction: max(1, (int) Math.log10(n)), of the limit as an
        // int.
        for (limit, expected) in [
            (0.0, 1.0),
            (1.0, 1.0),
            (9.9, 1.0),
            (50.0, 1.0),
            (99.9, 1.0),
            (100.0, 2.0),
            (999.0, 2.0),
            (1000.0, 3.0),
            (12_345.0, 4.0),
        ] {
            assert_eq!(log10_root(limit), expected, "limit {limit}");
        }
        // At 50, Netflix grows by 6·1 below the threshold, not by 6·log10(50).
        let now = Instant::now();
        let mut v = Vegas::new().initial_limit(50).probe_multiplier(1000);
        v.update(&sample(now, 10.0, 50, Outcome::Success));
        assert_eq!(v.update(&sample(now, 10.0, 50, Outcome::Success)), 56);
    }

    #[test]
    fn grows_without_queueing_and_shrinks_with_it() {
        let now = Instant::now();
        let mut v = Vegas::new().initial_limit(20).probe_multiplier(1000);
        v.update(&sample(now, 10.0, 20, Outcome::Success)); // sets rtt_noload
        let grown = v.update(&sample(now, 10.0, 20, Outcome::Success));
        assert!(grown > 20, "no queue: grows by beta, got {grown}");
        // Latency doubled: queue ≈ L/2, far above beta: shrink.
        let mut last = grown;
        for _ in 0..5 {
            last = v.update(&sample(now, 20.0, last, Outcome::Success));
        }
        assert!(last < grown, "{last} < {grown}");
        let dropped = v.update(&sample(now, 10.0, last, Outcome::Overload));
        assert!(dropped < last);
    }
}
