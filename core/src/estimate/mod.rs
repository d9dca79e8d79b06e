//! Online estimators cheap enough for the request path.
//!
//! - [`RateEstimator`]: an exponentially weighted arrival rate;
//! - [`LatencyWindow`]: latency quantiles over a sliding window, in bounded
//!   memory (HdrHistogram);
//! - [`DecayedLatency`]: latency quantiles and a robust mean whose evidence
//!   halves every half-life, in constant memory (what the limiter judges
//!   each class by);
//! - [`MinTracker`]: the minimum of a signal (such as round-trip time) over a
//!   sliding window, in constant memory.
//!
//! They take the current time as an argument (`std::time::Instant`; under
//! tokio use `tokio::time::Instant::now().into_std()`, which follows the
//! paused test clock) and take `&mut self`: a shared one lives behind a
//! short-held lock, or one per worker merged periodically.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//! use gratify_core::estimate::{LatencyWindow, MinTracker, RateEstimator};
//!
//! let start = Instant::now();
//! let mut rate = RateEstimator::new(Duration::from_secs(10), start);
//! let mut latency = LatencyWindow::new(Duration::from_secs(60), 6);
//! let mut min_rtt = MinTracker::new(Duration::from_secs(30));
//! for i in 0..1_000u64 {
//!     let now = start + Duration::from_millis(10 * i); // 100 arrivals a second
//!     let took = Duration::from_millis(5 + i % 10);
//!     rate.record(now);
//!     latency.record(now, took);
//!     min_rtt.record(now, took);
//! }
//! let now = start + Duration::from_secs(10);
//! assert!((rate.rate(now) - 100.0).abs() < 5.0);
//! let p50 = latency.quantile(now, 0.5).unwrap();
//! assert!(p50 >= Duration::from_millis(9) && p50 <= Duration::from_millis(10));
//! assert_eq!(min_rtt.min(), Some(Duration::from_millis(5)));
//! ```

mod decayed;
mod latency;
mod min;
mod rate;

pub use self::decayed::{DecayedLatency, Evidence};
pub use self::latency::LatencyWindow;
pub use self::min::MinTracker;
pub use self::rate::RateEstimator;

#[cfg(test)]
pub(crate) mod test_rng {
    /// A tiny deterministic generator (xorshift64*) for estimator tests.
    pub(crate) struct Rng(pub(crate) u64);

    impl Rng {
        pub(crate) fn next_u64(&mut self) -> u64 {
            let mut x = self.0.max(1);
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in (0, 1].
        pub(crate) fn unit(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
        }

        /// Exponential with the given rate.
        pub(crate) fn exp(&mut self, rate: f64) -> f64 {
            -self.unit().ln() / rate
        }
    }
}
