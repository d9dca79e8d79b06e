//! Limit algorithms: how many requests may be in flight.
//!
//! An [`Algorithm`] sees one [`Sample`] per completed request — its latency,
//! how many requests were in flight when it started, and its [`Outcome`] —
//! and answers with the new limit. [`AdaptiveLimit`](crate::limit::AdaptiveLimit)
//! holds one algorithm per limiter, behind the limiter's lock, so an
//! algorithm needs no synchronisation of its own.
//!
//! | algorithm | learns from | source |
//! |---|---|---|
//! | [`DelayCostLimit`] (default) | latency elasticity vs. concurrency, tolerance set by the cost model | gratify |
//! | [`Aimd`] | drops and timeouts | Netflix concurrency-limits `AIMDLimit` |
//! | [`Vegas`] | queue estimate `L·(1 − rtt_min/rtt)` | Netflix `VegasLimit` (TCP Vegas) |
//! | [`Gradient2`] | long-term vs short-term RTT | Netflix `Gradient2Limit` |
//! | [`Fixed`] | nothing | — |
//! | [`Windowed`] | wraps another; one sample per window (mean or percentile) | Netflix `WindowedLimit` |

mod aimd;
pub(crate) mod delay_cost;
mod fixed;
mod gradient2;
mod vegas;
mod windowed;

use std::fmt;

use gratify_core::CostModel;
use std::time::{Duration, Instant};

use gratify_core::ClassId;

pub use self::aimd::Aimd;
pub use self::delay_cost::DelayCostLimit;
pub use self::fixed::Fixed;
pub use self::gradient2::Gradient2;
pub use self::vegas::Vegas;
pub use self::windowed::{Aggregate, Windowed};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A response that was not an error.
    Success,
    /// An error or a server-error response unrelated to load.
    Error,
    /// An answer the request itself caused (HTTP 4xx other than 429): the
    /// service did not do the request's work, so its latency says nothing
    /// of the service.
    ClientError,
    /// The inner service said it was overloaded (HTTP 503 or 429, or a
    /// load-shedding error): a loss signal.
    Overload,
    /// The request timed out: a loss signal.
    Timeout,
    /// The caller went away before the response: no latency was measured.
    Cancelled,
}

impl Outcome {
    /// Whether this outcome says the service is past its capacity
    /// (Netflix's `didDrop`).
    pub fn is_drop(self) -> bool {
        matches!(self, Self::Overload | Self::Timeout)
    }
}

/// One completed request.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// When the request was admitted.
    pub start: Instant,
    /// From admission to the end of the response.
    pub latency: Duration,
    /// Requests in flight when it was admitted, itself included.
    pub in_flight: usize,
    /// How it ended.
    pub outcome: Outcome,
    /// Its class.
    pub class: ClassId,
}

impl Sample {
    /// A sample.
    pub fn new(
        start: Instant,
        latency: Duration,
        in_flight: usize,
        outcome: Outcome,
        class: ClassId,
    ) -> Self {
        Self {
            start,
            latency,
            in_flight,
            outcome,
            class,
        }
    }

    /// When the request ended.
    pub fn end(&self) -> Instant {
        self.start + self.latency
    }
}

/// Learns a concurrency limit from samples.
///
/// The limiter hands an algorithm successes and loss signals only
/// ([`Outcome::Success`], [`Outcome::Overload`], [`Outcome::Timeout`]):
/// cancelled requests (whose latency is cut short), errors and answers the
/// client caused are ignored, as Netflix's limiters ignore them
/// (`onIgnore`).
pub trait Algorithm: fmt::Debug + Send + 'static {
    /// The limit before any sample.
    fn initial_limit(&self) -> usize;

    /// Takes one sample and returns the new limit.
    fn update(&mut self, sample: &Sample) -> usize;

    /// A short name for metrics and reports (`"delay-cost"`, `"aimd"`, ...).
    fn name(&self) -> &'static str;

    /// Takes new costs and prices (same classes) at run time. Algorithms
    /// that do not read the model ignore it.
    fn reload(&mut self, model: &CostModel) {
        let _ = model;
    }
}

impl<A: Algorithm + ?Sized> Algorithm for Box<A> {
    fn reload(&mut self, model: &CostModel) {
        (**self).reload(model);
    }

    fn initial_limit(&self) -> usize {
        (**self).initial_limit()
    }

    fn update(&mut self, sample: &Sample) -> usize {
        (**self).update(sample)
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

/// Rounds a fractional limit to a usable one within `[min, max]`.
pub(crate) fn clamp_limit(limit: f64, min: usize, max: usize) -> usize {
    if limit.is_nan() {
        return min.max(1);
    }
    (limit.round() as usize).clamp(min.max(1), max.max(min.max(1)))
}

/// An exponential moving average with a warm-up: the plain mean of the first
/// `warmup` values, then `x ← x + (v − x)·2/(window + 1)` (Netflix's
/// `ExpAvgMeasurement`).
#[derive(Debug, Clone)]
pub(crate) struct ExpAvg {
    value: f64,
    count: usize,
    window: usize,
    warmup: usize,
}

impl ExpAvg {
    pub(crate) fn new(window: usize, warmup: usize) -> Self {
        Self {
            value: 0.0,
            count: 0,
            window: window.max(1),
            warmup,
        }
    }

    pub(crate) fn add(&mut self, v: f64) -> f64 {
        if self.count < self.warmup {
            self.count += 1;
            self.value += (v - self.value) / self.count as f64;
        } else {
            let factor = 2.0 / (self.window as f64 + 1.0);
            self.value += (v - self.value) * factor;
        }
        self.value
    }

    pub(crate) fn get(&self) -> f64 {
        self.value
    }

    pub(crate) fn set(&mut self, v: f64) {
        self.value = v;
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A sample `latency_ms` long that started with `in_flight` in flight.
    pub(crate) fn sample(
        at: Instant,
        latency_ms: f64,
        in_flight: usize,
        outcome: Outcome,
    ) -> Sample {
        Sample::new(
            at,
            Duration::from_secs_f64(latency_ms / 1e3),
            in_flight,
            outcome,
            ClassId::from_index(0),
        )
    }
}
