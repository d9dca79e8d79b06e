use std::time::{Duration, Instant};

use super::{Algorithm, Outcome, Sample};

/// How a window's latencies become one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Aggregate {
    /// The mean latency.
    Mean,
    /// A percentile in `(0, 1]`, such as 0.9.
    Percentile(f64),
}

/// Feeds another algorithm one aggregated sample per window — a port of
/// Netflix concurrency-limits' `WindowedLimit`.
///
/// A window closes once it is at least `min_window` long and holds
/// `min_samples` samples, or after `max_window` whatever it holds. The
/// aggregated sample has the window's mean or percentile latency, the
/// largest in-flight count seen, and `Overload` if any request in the window
/// was dropped. Cancelled requests carry no latency and are not counted.
///
/// Defaults are Netflix's: windows of 1 s, at least 10 samples, the mean.
#[derive(Debug, Clone)]
pub struct Windowed<A> {
    inner: A,
    min_window: Duration,
    max_window: Duration,
    min_samples: usize,
    aggregate: Aggregate,
    window_start: Option<Instant>,
    latencies: Vec<Duration>,
    max_in_flight: usize,
    dropped: bool,
    limit: usize,
}

impl<A: Algorithm> Windowed<A> {
    /// Wraps `inner` with Netflix's defaults.
    pub fn new(inner: A) -> Self {
        let limit = inner.initial_limit();
        Self {
            inner,
            min_window: Duration::from_secs(1),
            max_window: Duration::from_secs(1),
            min_samples: 10,
            aggregate: Aggregate::Mean,
            window_start: None,
            latencies: Vec::new(),
            max_in_flight: 0,
            dropped: false,
            limit,
        }
    }

    /// Window length bounds.
    #[must_use]
    pub fn window(mut self, min: Duration, max: Duration) -> Self {
        self.min_window = min;
        self.max_window = max.max(min);
        self
    }

    /// Samples a window needs before `max_window`.
    #[must_use]
    pub fn min_samples(mut self, n: usize) -> Self {
        self.min_samples = n.max(1);
        self
    }

    /// How a window's latencies are aggregated.
    #[must_use]
    pub fn aggregate(mut self, aggregate: Aggregate) -> Self {
        self.aggregate = aggregate;
        self
    }

    fn aggregate_latency(&mut self) -> Duration {
        match self.aggregate {
            Aggregate::Mean => {
                let total: Duration = self.latencies.iter().sum();
                total / self.latencies.len().max(1) as u32
            }
            Aggregate::Percentile(p) => {
                let p = if p.is_finite() {
                    p.clamp(0.0, 1.0)
                } else {
                    0.5
                };
                self.latencies.sort_unstable();
                let i = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
                self.latencies[i.min(self.latencies.len() - 1)]
            }
        }
    }
}

impl<A: Algorithm> Algorithm for Windowed<A> {
    fn initial_limit(&self) -> usize {
        self.inner.initial_limit()
    }

    fn update(&mut self, s: &Sample) -> usize {
        if s.outcome == Outcome::Cancelled {
            return self.limit;
        }
        let end = s.end();
        let start = *self.window_start.get_or_insert(end);
        self.max_in_flight = self.max_in_flight.max(s.in_flight);
        self.dropped |= s.outcome.is_drop();
        if !s.outcome.is_drop() {
            self.latencies.push(s.latency);
        }
        let age = end.saturating_duration_since(start);
        let full = age >= self.min_window && self.latencies.len() >= self.min_samples;
        if !(full || age >= self.max_window) {
            return self.limit;
        }
        if !self.latencies.is_empty() || self.dropped {
            let latency = if self.latencies.is_empty() {
                s.latency
            } else {
                self.aggregate_latency()
            };
            let outcome = if self.dropped {
                Outcome::Overload
            } else {
                Outcome::Success
            };
            let agg = Sample::new(start, latency, self.max_in_flight, outcome, s.class);
            self.limit = self.inner.update(&agg);
        }
        self.window_start = None;
        self.latencies.clear();
        self.max_in_flight = 0;
        self.dropped = false;
        self.limit
    }

    fn name(&self) -> &'static str {
        match self.inner.name() {
            "gradient2" => "windowed-gradient2",
            "vegas" => "windowed-vegas",
            "aimd" => "windowed-aimd",
            _ => "windowed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::algorithm::testing::sample;

    #[derive(Debug, Default)]
    struct Record(Vec<Sample>);
    impl Algorithm for Record {
        fn initial_limit(&self) -> usize {
            7
        }
        fn update(&mut self, s: &Sample) -> usize {
            self.0.push(*s);
            self.0.len()
        }
        fn name(&self) -> &'static str {
            "record"
        }
    }

    #[test]
    fn one_sample_per_window() {
        let t0 = Instant::now();
        let mut w = Windowed::new(Record::default())
            .window(Duration::from_millis(100), Duration::from_millis(100))
            .min_samples(3)
            .aggregate(Aggregate::Percentile(0.5));
        for (i, ms) in [10.0, 30.0, 20.0, 40.0].iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64 * 50);
            w.update(&sample(at, *ms, i + 1, Outcome::Success));
        }
        // The window closed at the sample ending ≥ 100 ms after the first.
        assert_eq!(w.inner.0.len(), 1);
        let agg = w.inner.0[0];
        assert_eq!(agg.latency, Duration::from_millis(20));
        assert_eq!(agg.in_flight, 3);
        assert_eq!(agg.outcome, Outcome::Success);
    }

    #[test]
    fn a_drop_marks_the_window() {
        let t0 = Instant::now();
        let mut w = Windowed::new(Record::default())
            .window(Duration::ZERO, Duration::from_millis(10))
            .min_samples(2);
        w.update(&sample(t0, 5.0, 1, Outcome::Success));
        w.update(&sample(t0, 5.0, 1, Outcome::Overload));
        w.update(&sample(t0, 5.0, 1, Outcome::Success));
        assert_eq!(w.inner.0[0].outcome, Outcome::Overload);
    }
}
