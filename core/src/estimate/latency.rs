use std::fmt;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latency quantiles over a sliding window, in bounded memory.
///
/// The window is split into `slots` sub-windows, each an HdrHistogram of
/// microseconds from 1 µs to one hour with two significant digits (about 1%
/// relative error, a few kilobytes each). Recording is O(1); a quantile merges
/// the live slots, O(slots × buckets), so read it periodically rather than per
/// request. Samples older than the window fall out one slot at a time.
pub struct LatencyWindow {
    slots: Vec<Histogram<u64>>,
    slot_len: Duration,
    current: usize,
    current_start: Option<Instant>,
    merged: Histogram<u64>,
}

const MAX_MICROS: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 2).expect("constant bounds that hdrhistogram accepts")
}

impl LatencyWindow {
    /// A window of length `window`, in `slots` steps (at least 1, at most 60).
    pub fn new(window: Duration, slots: usize) -> Self {
        let slots = slots.clamp(1, 60);
        let slot_len = (window / slots as u32).max(Duration::from_millis(1));
        Self {
            slots: (0..slots).map(|_| histogram()).collect(),
            slot_len,
            current: 0,
            current_start: None,
            merged: histogram(),
        }
    }

    /// Records a latency observed at `now`.
    pub fn record(&mut self, now: Instant, latency: Duration) {
        self.advance(now);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.slots[self.current].saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) of the latencies in the window ending at
    /// `now`, or `None` if it holds none.
    pub fn quantile(&mut self, now: Instant, q: f64) -> Option<Duration> {
        self.merge(now);
        if self.merged.is_empty() {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        Some(Duration::from_micros(self.merged.value_at_quantile(q)))
    }

    /// The number of latencies in the window ending at `now`.
    pub fn count(&mut self, now: Instant) -> u64 {
        self.advance(now);
        self.slots.iter().map(Histogram::len).sum()
    }

    /// The mean latency in the window ending at `now`.
    pub fn mean(&mut self, now: Instant) -> Option<Duration> {
        self.merge(now);
        (!self.merged.is_empty()).then(|| Duration::from_secs_f64(self.merged.mean() / 1e6))
    }

    /// Forgets every sample.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(Histogram::reset);
        self.current_start = None;
    }

    fn merge(&mut self, now: Instant) {
        self.advance(now);
        self.merged.reset();
        for slot in &self.slots {
            // Same bounds everywhere: adding cannot fail.
            let _ = self.merged.add(slot);
        }
    }

    fn advance(&mut self, now: Instant) {
        let Some(start) = self.current_start else {
            self.current_start = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < self.slot_len {
            return;
        }
        let steps = (elapsed.as_nanos() / self.slot_len.as_nanos()) as usize;
        if steps >= self.slots.len() {
            self.slots.iter_mut().for_each(Histogram::reset);
            self.current_start = Some(now);
            return;
        }
        for _ in 0..steps {
            self.current = (self.current + 1) % self.slots.len();
            self.slots[self.current].reset();
        }
        self.current_start = Some(start + self.slot_len * steps as u32);
    }
}

impl fmt::Debug for LatencyWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyWindow")
            .field("slots", &self.slots.len())
            .field("slot_len", &self.slot_len)
            .field(
                "samples",
                &self.slots.iter().map(Histogram::len).sum::<u64>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::test_rng::Rng;

    #[test]
    fn quantiles_of_an_exponential_stream() {
        let start = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(60), 6);
        let mut rng = Rng(11);
        for i in 0..50_000u64 {
            // Mean 20 ms: p50 = 20·ln 2 ms, p99 = 20·ln 100 ms.
            let ms = rng.exp(1.0 / 20.0);
            w.record(
                start + Duration::from_micros(i * 1000),
                Duration::from_secs_f64(ms / 1e3),
            );
        }
        let now = start + Duration::from_secs(50);
        let p50 = w.quantile(now, 0.5).unwrap().as_secs_f64() * 1e3;
        let p99 = w.quantile(now, 0.99).unwrap().as_secs_f64() * 1e3;
        assert!((p50 / (20.0 * 2f64.ln()) - 1.0).abs() < 0.05, "{p50}");
        assert!((p99 / (20.0 * 100f64.ln()) - 1.0).abs() < 0.05, "{p99}");
    }

    #[test]
    fn old_samples_leave_the_window() {
        let start = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10), 5);
        for i in 0..100u64 {
            w.record(
                start + Duration::from_millis(i * 10),
                Duration::from_millis(500),
            );
        }
        for i in 0..100u64 {
            w.record(
                start + Duration::from_secs(5) + Duration::from_millis(i * 10),
                Duration::from_millis(5),
            );
        }
        let now = start + Duration::from_secs(7);
        assert_eq!(w.count(now), 200);
        // 12 s later the first second has gone; 16 s later everything has.
        let later = start + Duration::from_secs(12);
        assert_eq!(w.count(later), 100);
        let p99 = w.quantile(later, 0.99).unwrap();
        assert!(p99 < Duration::from_millis(6), "{p99:?}");
        assert_eq!(w.quantile(start + Duration::from_secs(40), 0.5), None);
    }

    #[test]
    fn memory_is_bounded_and_extremes_saturate() {
        let start = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(1), 2);
        w.record(start, Duration::ZERO);
        w.record(start, Duration::from_secs(100_000));
        assert_eq!(w.count(start), 2);
        let max = w.quantile(start, 1.0).unwrap();
        assert!(
            max >= Duration::from_secs(3500) && max <= Duration::from_secs(3700),
            "{max:?}"
        );
    }
}
