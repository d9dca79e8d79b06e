use std::fmt;
use std::time::{Duration, Instant};

/// Buckets per doubling of latency: each bucket spans 2^(1/8) ≈ 9%, so a
/// quantile is within about 4.5% of the truth.
const PER_DOUBLING: usize = 8;
/// From 1 µs to 2^32 µs (about 71 minutes).
const DOUBLINGS: usize = 32;
const BUCKETS: usize = PER_DOUBLING * DOUBLINGS;
/// Weights are renormalised once a new sample would weigh this much
/// (2^64 relative to the landmark): far from overflow, rarely.
const RENORMALISE_AT: f64 = 64.0;

/// Latency quantiles and mean that forget with time, in constant memory.
///
/// Each sample's weight halves every `half_life`, so the estimate follows
/// the service as it is now; a burst long ago, or a single outlier, fades
/// whatever the traffic (no sample needs to arrive for the past to decay).
/// [`weight`](Self::weight) says how much evidence is left: a caller that
/// stops receiving samples (a class that is being refused, say) sees it fall
/// and can stop trusting the estimate.
///
/// The distribution is kept in 256 log-spaced buckets from 1 µs to about 71
/// minutes, 8 per doubling: quantiles are exact to about ±4.5%, and a sample
/// outside the range counts at its edge. The mean is a winsorised mean over
/// the buckets: each latency counts at most `outlier_factor` (default 10)
/// times the current median, so that one 30-second export among
/// 20-millisecond requests — even the very first sample — moves it by a
/// bounded amount; the quantiles still see the outlier as it is.
///
/// Recording is O(1); quantiles are cached when a sample arrives (decay
/// scales every weight alike, so it does not move them).
///
/// # Example
///
/// ```
/// use std::time::{Duration, Instant};
/// use gratify_core::estimate::DecayedLatency;
///
/// let t0 = Instant::now();
/// let mut latency = DecayedLatency::new(Duration::from_secs(10));
/// for i in 0..1_000u64 {
///     latency.record(t0, Duration::from_millis(10 + i % 11)); // 10–20 ms
/// }
/// latency.record(t0, Duration::from_secs(30)); // one export
/// let p50 = latency.quantile(0.5).unwrap();
/// assert!(p50 >= Duration::from_millis(14) && p50 <= Duration::from_millis(16));
/// assert!(latency.mean().unwrap() < Duration::from_millis(16));
/// // Twenty half-lives later almost nothing is left of that evidence.
/// assert!(latency.weight(t0 + Duration::from_secs(200)) < 0.01);
/// ```
#[derive(Clone)]
pub struct DecayedLatency {
    /// Forward-decayed weights: a sample at `t` adds 2^((t − landmark)/h).
    buckets: Box<[f64]>,
    total: f64,
    landmark: Option<Instant>,
    half_life: f64,
    outlier_factor: f64,
    /// Cached quantiles at 0.5, 0.9 and 0.99.
    cached: [Option<Duration>; 3],
    /// Cached winsorised mean, seconds.
    mean: Option<f64>,
}

impl fmt::Debug for DecayedLatency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecayedLatency")
            .field("half_life", &self.half_life)
            .field("p50", &self.cached[0])
            .field("p90", &self.cached[1])
            .field("p99", &self.cached[2])
            .field("mean", &self.mean())
            .finish_non_exhaustive()
    }
}

const CACHED: [f64; 3] = [0.5, 0.9, 0.99];

fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros.is_nan() || micros <= 1.0 {
        return 0;
    }
    let i = (micros.log2() * PER_DOUBLING as f64) as usize;
    i.min(BUCKETS - 1)
}

/// The geometric middle of bucket `i`, in seconds.
fn middle_of(i: usize) -> f64 {
    1e-6 * ((i as f64 + 0.5) / PER_DOUBLING as f64).exp2()
}

/// A [`DecayedLatency`]'s evidence at one moment: `total` samples' worth
/// at `landmark`, halving every `half_life` seconds after it.
///
/// ```
/// use std::time::{Duration, Instant};
/// use gratify_core::estimate::DecayedLatency;
///
/// let t0 = Instant::now();
/// let mut latency = DecayedLatency::new(Duration::from_secs(2));
/// latency.record(t0, Duration::from_millis(10));
/// let evidence = latency.evidence().unwrap();
/// let later = t0 + Duration::from_secs(2);
/// assert_eq!(evidence.weight(later), latency.weight(later));
/// assert!((evidence.weight(later) - 0.5).abs() < 1e-9);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Evidence {
    /// The instant `total` refers to.
    pub landmark: Instant,
    /// The weight at `landmark`, in samples.
    pub total: f64,
    /// Seconds for the weight to halve.
    pub half_life: f64,
}

impl Evidence {
    /// Evidence of `total` samples at `landmark`, halving every `half_life`
    /// seconds (at least a millisecond).
    pub fn new(landmark: Instant, total: f64, half_life: f64) -> Self {
        Self {
            landmark,
            total,
            half_life: if half_life.is_nan() {
                1e-3
            } else {
                half_life.clamp(1e-3, 1e15)
            },
        }
    }

    /// The weight left at `now`: each sample counts 1 when it arrives and
    /// half as much every half-life after.
    pub fn weight(&self, now: Instant) -> f64 {
        if self.total <= 0.0 {
            return 0.0;
        }
        let exponent = now.saturating_duration_since(self.landmark).as_secs_f64() / self.half_life;
        self.total * (-exponent).exp2()
    }
}

impl DecayedLatency {
    /// An empty estimator whose evidence halves every `half_life` (at least
    /// a millisecond).
    pub fn new(half_life: Duration) -> Self {
        Self {
            buckets: vec![0.0; BUCKETS].into_boxed_slice(),
            total: 0.0,
            landmark: None,
            half_life: half_life.as_secs_f64().clamp(1e-3, 1e15),
            outlier_factor: 10.0,
            cached: [None; 3],
            mean: None,
        }
    }

    /// How many medians one sample may count for in the mean (default 10;
    /// at least 1; infinity for the plain mean).
    #[must_use]
    pub fn outlier_factor(mut self, factor: f64) -> Self {
        if !factor.is_nan() {
            self.outlier_factor = factor.max(1.0);
        }
        self
    }

    /// The half-life of the evidence.
    pub fn half_life(&self) -> Duration {
        Duration::try_from_secs_f64(self.half_life).unwrap_or(Duration::MAX)
    }

    /// log2 of the weight a sample at `now` gets relative to the landmark.
    fn exponent(&self, now: Instant) -> f64 {
        match self.landmark {
            Some(l) => now.saturating_duration_since(l).as_secs_f64() / self.half_life,
            None => 0.0,
        }
    }

    /// Records a latency observed at `now`. Samples must come in roughly
    /// increasing time; one from before the landmark counts as at it.
    pub fn record(&mut self, now: Instant, latency: Duration) {
        let landmark = *self.landmark.get_or_insert(now);
        let mut e = self.exponent(now);
        if e >= RENORMALISE_AT {
            // Move the landmark to now: every weight shrinks by 2^e (the
            // old evidence is then ~2^-64 of a new sample, or gone).
            let scale = (-e).exp2();
            for b in self.buckets.iter_mut() {
                *b *= scale;
            }
            self.total *= scale;
            self.landmark = Some(now.max(landmark));
            e = 0.0;
        }
        let w = e.exp2();
        self.buckets[bucket_of(latency)] += w;
        self.total += w;
        self.refresh();
    }

    fn refresh(&mut self) {
        if self.total <= 0.0 {
            self.cached = [None; 3];
            self.mean = None;
            return;
        }
        let mut targets = CACHED.map(|q| q * self.total);
        let mut found = [None; 3];
        let mut acc = 0.0;
        let mut next = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b;
            while next < targets.len() && acc >= targets[next] {
                found[next] = Some(Duration::from_secs_f64(middle_of(i)));
                next += 1;
            }
            if next == targets.len() {
                break;
            }
        }
        // Rounding can leave the top target a hair above the sum.
        for (f, t) in found.iter_mut().zip(&mut targets) {
            if f.is_none() {
                *t = self.total;
                *f = Some(Duration::from_secs_f64(middle_of(self.highest())));
            }
        }
        self.cached = found;
        let cap = found[0].map_or(f64::INFINITY, |m| self.outlier_factor * m.as_secs_f64());
        let sum: f64 = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0.0)
            .map(|(i, w)| w * middle_of(i).min(cap))
            .sum();
        self.mean = Some(sum / self.total);
    }

    fn highest(&self) -> usize {
        self.buckets.iter().rposition(|b| *b > 0.0).unwrap_or(0)
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) of the recent latencies; `None` before
    /// any sample. 0.5, 0.9 and 0.99 are cached; others scan the buckets.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total <= 0.0 {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        if let Some(i) = CACHED.iter().position(|c| *c == q) {
            return self.cached[i];
        }
        let target = q * self.total;
        let mut acc = 0.0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b;
            if acc >= target && *b > 0.0 {
                return Some(Duration::from_secs_f64(middle_of(i)));
            }
        }
        Some(Duration::from_secs_f64(middle_of(self.highest())))
    }

    /// The expectation of `f(latency in seconds)` over the recent
    /// distribution (each bucket at its middle); `None` before any sample.
    /// O(buckets in use).
    pub fn expect(&self, mut f: impl FnMut(f64) -> f64) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        let sum: f64 = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0.0)
            .map(|(i, w)| w * f(middle_of(i)))
            .sum();
        Some(sum / self.total)
    }

    /// The recent (winsorised) mean latency; `None` before any sample.
    pub fn mean(&self) -> Option<Duration> {
        self.mean
            .map(|m| Duration::try_from_secs_f64(m.max(0.0)).unwrap_or(Duration::MAX))
    }

    /// The evidence left at `now`, in samples: each sample counts 1 when it
    /// arrives and half as much every half-life after.
    pub fn weight(&self, now: Instant) -> f64 {
        self.evidence().map_or(0.0, |e| e.weight(now))
    }

    /// The evidence in a form that can be copied out — for example into
    /// atomics that readers reach without the estimator's lock — and asked
    /// for its [`weight`](Evidence::weight) later, with the same result as
    /// [`weight`](Self::weight) until the next sample. `None` before any
    /// sample.
    pub fn evidence(&self) -> Option<Evidence> {
        let landmark = self.landmark?;
        (self.total > 0.0).then_some(Evidence {
            landmark,
            total: self.total,
            half_life: self.half_life,
        })
    }

    /// Keeps only `factor` (0 to 1) of the evidence so far, as if it were
    /// older: for a caller that learns the service has changed (the next
    /// samples then weigh more against it).
    pub fn discount(&mut self, factor: f64) {
        let factor = if factor.is_nan() {
            1.0
        } else {
            factor.clamp(0.0, 1.0)
        };
        self.buckets.iter_mut().for_each(|b| *b *= factor);
        self.total *= factor;
        if self.total <= 0.0 {
            self.clear();
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = 0.0);
        self.total = 0.0;
        self.landmark = None;
        self.cached = [None; 3];
        self.mean = None;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::estimate::test_rng::Rng;

    #[test]
    fn quantiles_of_a_lognormal_are_within_the_bucket_error() {
        let t0 = Instant::now();
        let mut rng = Rng(7);
        let mut d = DecayedLatency::new(Duration::from_secs(3600));
        let mut all = Vec::new();
        for i in 0..20_000u64 {
            // Box–Muller: lognormal around 20 ms, σ = 1.
            let z =
                (-2.0 * rng.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * rng.unit()).cos();
            let x = 0.02 * z.exp();
            all.push(x);
            d.record(t0 + Duration::from_micros(i), Duration::from_secs_f64(x));
        }
        all.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.99, 0.75] {
            let truth = all[(q * all.len() as f64) as usize];
            let got = d.quantile(q).unwrap().as_secs_f64();
            assert!((got / truth - 1.0).abs() < 0.06, "q{q}: {got} vs {truth}");
        }
    }

    #[test]
    fn old_evidence_fades_and_new_takes_over() {
        let t0 = Instant::now();
        let mut d = DecayedLatency::new(Duration::from_secs(1));
        for _ in 0..1000 {
            d.record(t0, Duration::from_secs(2));
        }
        assert!((d.weight(t0) - 1000.0).abs() < 1e-6);
        assert!((d.weight(t0 + Duration::from_secs(1)) - 500.0).abs() < 1e-6);
        // Ten half-lives later, 20 fast samples outweigh the 1000 slow ones.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..20 {
            d.record(later, Duration::from_millis(10));
        }
        let p50 = d.quantile(0.5).unwrap();
        assert!(p50 < Duration::from_millis(11), "{p50:?}");
    }

    #[test]
    fn weights_renormalise_without_overflow_over_days() {
        let t0 = Instant::now();
        let mut d = DecayedLatency::new(Duration::from_millis(10));
        for i in 0..100_000u64 {
            // 1,000 seconds at 10 ms half-life: 100,000 half-lives.
            d.record(t0 + Duration::from_millis(10 * i), Duration::from_millis(5));
            assert!(d.total.is_finite());
        }
        let p50 = d.quantile(0.5).unwrap();
        assert!(p50 > Duration::from_millis(4) && p50 < Duration::from_millis(6));
        let mean = d.mean().unwrap();
        assert!(mean > Duration::from_millis(4) && mean < Duration::from_millis(6));
    }

    #[test]
    fn a_first_sample_that_is_an_outlier_is_bounded_once_others_arrive() {
        let t0 = Instant::now();
        let mut d = DecayedLatency::new(Duration::from_secs(10));
        d.record(t0, Duration::from_secs(30));
        for _ in 0..20 {
            d.record(t0, Duration::from_millis(20));
        }
        // 30 s counts as ten medians (0.2 s) among 21: the mean is about 29 ms.
        let mean = d.mean().unwrap();
        assert!(mean < Duration::from_millis(35), "{mean:?}");
        let huge = DecayedLatency::new(Duration::MAX);
        assert!(huge.half_life() > Duration::from_secs(1_000_000));
        let mut one = DecayedLatency::new(Duration::from_secs(1));
        one.record(t0, Duration::MAX);
        assert!(one.mean().is_some());
    }

    #[test]
    fn one_outlier_moves_the_mean_a_bounded_amount() {
        let t0 = Instant::now();
        let mut d = DecayedLatency::new(Duration::from_secs(10));
        for _ in 0..100 {
            d.record(t0, Duration::from_millis(20));
        }
        d.record(t0, Duration::from_secs(30));
        // Counted as at most 10 medians (about 0.2 s): mean ≤ 20 ms + 2 ms.
        let mean = d.mean().unwrap();
        assert!(mean < Duration::from_millis(23), "{mean:?}");
        // The quantiles see it where it is.
        assert!(d.quantile(1.0).unwrap() > Duration::from_secs(28));
    }

    #[test]
    fn expectations_weigh_each_bucket() {
        let t0 = Instant::now();
        let mut d = DecayedLatency::new(Duration::from_secs(10));
        assert_eq!(d.expect(|_| 1.0), None);
        for _ in 0..3 {
            d.record(t0, Duration::from_millis(10));
        }
        d.record(t0, Duration::from_secs(1));
        // The share of latencies past 0.5 s, and a mean through the buckets.
        let late = d.expect(|s| f64::from(u8::from(s > 0.5))).unwrap();
        assert!((late - 0.25).abs() < 1e-9);
        let mean = d.expect(|s| s).unwrap();
        assert!((mean / 0.2575 - 1.0).abs() < 0.05, "{mean}");
    }

    #[test]
    fn empty_and_cleared_have_no_estimate() {
        let mut d = DecayedLatency::new(Duration::from_secs(1));
        assert_eq!(d.quantile(0.5), None);
        assert_eq!(d.mean(), None);
        d.record(Instant::now(), Duration::from_millis(3));
        assert!(d.quantile(0.5).is_some());
        d.clear();
        assert_eq!(d.quantile(0.9), None);
        assert_eq!(d.weight(Instant::now()), 0.0);
    }

    proptest! {
        /// Whatever the samples and their times (including zero, huge and
        /// out-of-order ones), the estimates are finite, ordered, within the
        /// range of what was seen (to the bucket error), and weights never
        /// grow with time.
        #[test]
        fn estimates_are_sane_for_any_input(
            samples in proptest::collection::vec((0u64..10_000_000, 0u64..u64::MAX / 4), 1..200),
            half_life_ms in 1u64..100_000,
            q in 0.0f64..=1.0,
        ) {
            let t0 = Instant::now();
            let mut d = DecayedLatency::new(Duration::from_millis(half_life_ms));
            let (mut lo, mut hi) = (f64::MAX, 0.0f64);
            let mut last = t0;
            for (at_ms, nanos) in samples {
                let at = t0 + Duration::from_millis(at_ms);
                let latency = Duration::from_nanos(nanos);
                d.record(at, latency);
                last = last.max(at);
                let s = latency.as_secs_f64().clamp(1e-6, 4.3e3);
                lo = lo.min(s);
                hi = hi.max(s);
            }
            let x = d.quantile(q).unwrap().as_secs_f64();
            prop_assert!(x.is_finite());
            prop_assert!(x >= lo / 1.1 && x <= hi * 1.1, "{} not in [{}, {}]", x, lo, hi);
            let (p50, p90, p99) = (d.quantile(0.5).unwrap(), d.quantile(0.9).unwrap(), d.quantile(0.99).unwrap());
            prop_assert!(p50 <= p90 && p90 <= p99);
            let mean = d.mean().unwrap().as_secs_f64();
            prop_assert!(mean.is_finite() && mean >= 0.0);
            let w1 = d.weight(last);
            let w2 = d.weight(last + Duration::from_secs(1));
            prop_assert!(w1.is_finite() && w2 <= w1);
        }
    }
}
