//! The shared load signal.
//!
//! The limiter publishes, and compression, the cache and the offload pool
//! read, three figures: utilisation, the estimated queueing delay, and the
//! shadow price of a concurrency slot — the marginal delay cost that one more
//! admitted request imposes on the others, in the model's currency per
//! request. A layer that adapts to load reads this signal, never the limiter
//! itself, so the crates stay independent.
//!
//! Reads and writes are lock-free atomics; each figure is read consistently,
//! the three together are a best-effort snapshot.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify_core::{LoadSignal, LoadSnapshot};
//!
//! let signal = LoadSignal::new();
//! let reader = signal.clone(); // e.g. held by the compression layer
//! signal.publish(LoadSnapshot::new(0.9, Duration::from_millis(12), 0.4));
//! let now = reader.snapshot();
//! assert_eq!(now.utilisation, 0.9);
//! assert_eq!(now.queue_delay, Duration::from_millis(12));
//! assert_eq!(now.shadow_price, 0.4);
//! assert!(reader.version() > 0);
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point-in-time reading of the [`LoadSignal`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct LoadSnapshot {
    /// In-flight work over capacity: 0 idle, 1 at the limit, above 1 when
    /// requests queue.
    pub utilisation: f64,
    /// The estimated wait before a newly admitted request starts.
    pub queue_delay: Duration,
    /// The marginal delay cost one more admitted request imposes on the
    /// others (model currency per request).
    pub shadow_price: f64,
    /// The mean time a request holds its slot. With `shadow_price`, the price
    /// of one second of a slot: `shadow_price / latency`.
    pub latency: Duration,
}

impl LoadSnapshot {
    /// A snapshot; negative or non-finite numbers are stored as zero.
    pub fn new(utilisation: f64, queue_delay: Duration, shadow_price: f64) -> Self {
        Self {
            utilisation: sanitise(utilisation),
            queue_delay,
            shadow_price: sanitise(shadow_price),
            latency: Duration::ZERO,
        }
    }

    /// Sets the mean slot-holding time.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// What one second of a slot costs now: the shadow price spread over the
    /// time a request holds its slot (zero when nobody waits).
    pub fn slot_second_price(&self) -> f64 {
        let secs = self.latency.as_secs_f64();
        if secs > 0.0 {
            self.shadow_price / secs
        } else {
            0.0
        }
    }
}

fn sanitise(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// A cloneable, lock-free handle on the load figures one limiter publishes.
///
/// Clones share the figures. See the [module docs](crate::signal).
#[derive(Clone, Default)]
pub struct LoadSignal {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    utilisation: AtomicU64,
    queue_delay_nanos: AtomicU64,
    shadow_price: AtomicU64,
    latency_nanos: AtomicU64,
    version: AtomicU64,
}

impl LoadSignal {
    /// A signal reading zero load.
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes new figures (sanitised as by [`LoadSnapshot::new`]).
    pub fn publish(&self, snapshot: LoadSnapshot) {
        let i = &self.inner;
        i.utilisation
            .store(sanitise(snapshot.utilisation).to_bits(), Ordering::Relaxed);
        let nanos = u64::try_from(snapshot.queue_delay.as_nanos()).unwrap_or(u64::MAX);
        i.queue_delay_nanos.store(nanos, Ordering::Relaxed);
        i.shadow_price
            .store(sanitise(snapshot.shadow_price).to_bits(), Ordering::Relaxed);
        let latency = u64::try_from(snapshot.latency.as_nanos()).unwrap_or(u64::MAX);
        i.latency_nanos.store(latency, Ordering::Relaxed);
        i.version.fetch_add(1, Ordering::Release);
    }

    /// The latest figures.
    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            utilisation: self.utilisation(),
            queue_delay: self.queue_delay(),
            shadow_price: self.shadow_price(),
            latency: Duration::from_nanos(self.inner.latency_nanos.load(Ordering::Relaxed)),
        }
    }

    /// The latest utilisation.
    pub fn utilisation(&self) -> f64 {
        f64::from_bits(self.inner.utilisation.load(Ordering::Relaxed))
    }

    /// The latest estimated queueing delay.
    pub fn queue_delay(&self) -> Duration {
        Duration::from_nanos(self.inner.queue_delay_nanos.load(Ordering::Relaxed))
    }

    /// The latest shadow price of a slot.
    pub fn shadow_price(&self) -> f64 {
        f64::from_bits(self.inner.shadow_price.load(Ordering::Relaxed))
    }

    /// How many times figures were published; a reader can tell whether a
    /// publisher is alive.
    pub fn version(&self) -> u64 {
        self.inner.version.load(Ordering::Acquire)
    }
}

impl fmt::Debug for LoadSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadSignal")
            .field("snapshot", &self.snapshot())
            .field("version", &self.version())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_read_as_zero() {
        let s = LoadSignal::new();
        s.publish(LoadSnapshot {
            utilisation: f64::NAN,
            queue_delay: Duration::MAX,
            shadow_price: -3.0,
            latency: Duration::ZERO,
        });
        let r = s.snapshot();
        assert_eq!(r.utilisation, 0.0);
        assert_eq!(r.shadow_price, 0.0);
        assert_eq!(r.queue_delay, Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn clones_share_and_threads_see_updates() {
        let s = LoadSignal::new();
        let reader = s.clone();
        std::thread::spawn(move || s.publish(LoadSnapshot::new(2.0, Duration::ZERO, 1.5)))
            .join()
            .unwrap();
        assert_eq!(reader.utilisation(), 2.0);
        assert_eq!(reader.shadow_price(), 1.5);
        assert_eq!(reader.version(), 1);
    }
}
