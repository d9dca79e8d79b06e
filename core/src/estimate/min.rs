use std::time::{Duration, Instant};

/// The minimum of a signal over a sliding time window, in constant memory.
///
/// Kathleen Nichols' windowed min filter, as TCP BBR uses for its min-RTT:
/// three samples (the best, and the best of the second and last parts of the
/// window) so that when the minimum ages out, a good successor is already
/// known. A minimum older than the window is replaced by the best sample seen
/// since — the "windowed reset" that keeps a stale low RTT from pinning a
/// limiter forever.
#[derive(Debug, Clone)]
pub struct MinTracker {
    window: Duration,
    samples: Option<[(Instant, Duration); 3]>,
}

impl MinTracker {
    /// A tracker over `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: None,
        }
    }

    /// Records `value` observed at `now`; returns the windowed minimum.
    pub fn record(&mut self, now: Instant, value: Duration) -> Duration {
        let new = (now, value);
        let Some(s) = &mut self.samples else {
            self.samples = Some([new; 3]);
            return value;
        };
        if value <= s[0].1 || now.saturating_duration_since(s[2].0) > self.window {
            *s = [new; 3];
            return value;
        }
        if value <= s[1].1 {
            s[1] = new;
            s[2] = new;
        } else if value <= s[2].1 {
            s[2] = new;
        }
        // Age the sub-window estimates.
        let dt = now.saturating_duration_since(s[0].0);
        if dt > self.window {
            s[0] = s[1];
            s[1] = s[2];
            s[2] = new;
            if now.saturating_duration_since(s[0].0) > self.window {
                s[0] = s[1];
                s[1] = s[2];
                s[2] = new;
            }
        } else if s[1].0 == s[0].0 && dt > self.window / 4 {
            s[1] = new;
            s[2] = new;
        } else if s[2].0 == s[1].0 && dt > self.window / 2 {
            s[2] = new;
        }
        s[0].1
    }

    /// The windowed minimum, or `None` before the first sample.
    pub fn min(&self) -> Option<Duration> {
        self.samples.map(|s| s[0].1)
    }

    /// When the current minimum was observed.
    pub fn min_at(&self) -> Option<Instant> {
        self.samples.map(|s| s[0].0)
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        self.samples = None;
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_the_minimum_and_forgets_it() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut m = MinTracker::new(Duration::from_secs(10));
        assert_eq!(m.min(), None);
        m.record(at(0), Duration::from_millis(50));
        m.record(at(100), Duration::from_millis(10));
        m.record(at(200), Duration::from_millis(30));
        assert_eq!(m.min(), Some(Duration::from_millis(10)));
        // The path got slower for good: after the window the old min is gone
        // and a recent one takes over, not an arbitrary late one.
        for s in 1..=25u64 {
            m.record(at(s * 1000), Duration::from_millis(40 + s % 3));
        }
        let min = m.min().unwrap();
        assert!(
            min >= Duration::from_millis(40) && min <= Duration::from_millis(42),
            "{min:?}"
        );
        assert!(m.min_at().unwrap() >= at(15_000));
    }

    #[test]
    fn minimum_is_a_recent_sample_on_a_random_walk() {
        let start = Instant::now();
        let window = Duration::from_secs(5);
        let mut m = MinTracker::new(window);
        let mut rng = crate::estimate::test_rng::Rng(3);
        let mut history = Vec::new();
        for i in 0..5_000u64 {
            let now = start + Duration::from_millis(i * 10);
            let v = Duration::from_micros(1000 + (rng.next_u64() % 5000));
            history.push((now, v));
            let got = m.record(now, v);
            // Never below the true minimum of what is in the window, and
            // always a sample from no older than the window allows.
            let true_min = history
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= window)
                .map(|(_, v)| *v)
                .min()
                .unwrap();
            assert!(got >= true_min);
            assert!(now.duration_since(m.min_at().unwrap()) <= window);
        }
    }
}
