//! Counts over a sliding window of one-second buckets, shared by the retry
//! throttle and the hedge's overload gate.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Events, and how many of them were marked, over the last `window`
/// (whole seconds, 1 to 3,600), on tokio's clock.
#[derive(Debug)]
pub(crate) struct Tally(Mutex<Buckets>);

#[derive(Debug)]
struct Buckets {
    /// (events, marked) per second, oldest first.
    counts: Vec<(u64, u64)>,
    /// The second the last bucket counts.
    second: u64,
    origin: Instant,
}

impl Tally {
    pub(crate) fn new(window: Duration) -> Self {
        let n = usize::try_from(window.as_secs().clamp(1, 3600)).unwrap_or(60);
        Self(Mutex::new(Buckets {
            counts: vec![(0, 0); n],
            second: 0,
            origin: Instant::now(),
        }))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Buckets) -> R) -> R {
        let mut b = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now().saturating_duration_since(b.origin).as_secs();
        if now > b.second {
            let shift = usize::try_from(now - b.second).unwrap_or(usize::MAX);
            let n = b.counts.len();
            if shift >= n {
                b.counts.iter_mut().for_each(|c| *c = (0, 0));
            } else {
                b.counts.rotate_left(shift);
                b.counts[n - shift..].iter_mut().for_each(|c| *c = (0, 0));
            }
            b.second = now;
        }
        f(&mut b)
    }

    /// Counts one event, marked or not.
    pub(crate) fn record(&self, marked: bool) {
        self.with(|b| {
            if let Some(last) = b.counts.last_mut() {
                last.0 += 1;
                last.1 += u64::from(marked);
            }
        });
    }

    /// (events, marked) over the window.
    pub(crate) fn totals(&self) -> (u64, u64) {
        self.with(|b| {
            b.counts
                .iter()
                .fold((0, 0), |(e, m), (be, bm)| (e + be, m + bm))
        })
    }
}
