//! Moving CPU work off the async threads: a bounded CPU pool ordered by the
//! cost of delay.
//!
//! [`OffloadLayer`] runs the inner service's future on a [`CpuPool`] — its
//! own threads, separate from the runtime's workers — so a CPU-heavy handler
//! cannot stall I/O for everyone else. The queue is ordered by the cμ rule
//! (Reinertsen's CD3): the urgency of the request's class over the expected
//! run time of its route (its template — axum's `MatchedPath` with the
//! `axum` feature — or else its class; never the raw path), learned as
//! requests finish; a waiting job's priority doubles every second, so no
//! class starves. It is bounded; a full queue gives a less valuable job's
//! place to a more valuable one. A request spends one deadline budget across
//! every queue: from its arrival (stamped by `ClassifyLayer`), it is refused
//! (503 with `Retry-After`) when its wait and run time in the pool would pass
//! its class's deadline, and answered at its deadline if it is still queued
//! then — it never starts late. A request whose client has gone leaves the
//! queue at once; a panic becomes a 500 and the thread lives on;
//! [`CpuPool::shutdown`] drains the queue within a deadline.
//! The inner future runs with the caller's tokio runtime entered, so it may
//! still use timers and I/O.
//!
//! [`Offloader`] is the same pool for use inside handlers: a bounded,
//! prioritised, cancellable replacement for `spawn_blocking`.
//!
//! [`Defer`] queues work to run after the response — delayed gratification,
//! literally: a job runs while CPU is cheaper than the cost of delaying its
//! class, or when its deadline nears; it is retried with backoff, and
//! [`Defer::drain`] accounts for every job at shutdown.
//!
//! # Example
//!
//! ```
//! use gratify::offload::{CpuPool, Offloader};
//! use gratify::CostModel;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = CostModel::from_toml(r#"
//!     [classes.recommendations]
//!     delay_cost = { shape = "linear", per_second = 0.5, deadline = "2s" }
//!     refusal_cost = 0.1
//! "#)?;
//! let offloader = Offloader::new(CpuPool::new(Some(2), 256), &model);
//! let class = model.default_class();
//! let score = offloader.run(class, || (1..=1000u64).map(|x| x * x).sum::<u64>()).await?;
//! assert_eq!(score, 333_833_500);
//! # Ok(())
//! # }
//! ```

mod defer;
#[cfg(any(feature = "redis", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "redis", feature = "postgres"))))]
pub mod durable;
mod pool;
mod service;

pub use self::defer::{
    Defer, DeferConfig, DeferError, DeferLayer, DeferService, DeferStats, DrainReport,
};
pub use self::pool::{CpuPool, OffloadError, PoolStats};

/// The ceiling of the wait before retrying a job whose attempt number
/// `attempt` (from 1) failed: `first`, doubling with each attempt, at most
/// an hour. The wait itself is drawn below it with [`jitter`] (durable
/// jobs: anywhere below, "full jitter"; deferred jobs: between half and
/// all of it), so jobs that failed together do not come back together. (A
/// crate like `backon` retries a future in a loop; these retries are
/// entries scheduled in a queue, and the schedule is this one line.)
fn retry_delay(first: std::time::Duration, attempt: u32) -> std::time::Duration {
    first
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(std::time::Duration::from_secs(3600))
}

/// Random bits, differently seeded per call (std's hasher keys and the
/// time): for names and jitter, not for secrets.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A uniform draw in `[0, 1)` for backoff jitter (not for secrets).
fn jitter() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Counts one event through the `metrics` facade (feature `metrics`).
#[inline]
fn count(name: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(name).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = name;
}
pub use self::service::{Offload, OffloadBody, OffloadLayer, Offloader};

/// The service of [`OffloadLayer`], by its former name.
#[deprecated(
    since = "0.1.0",
    note = "renamed `Offload`, as tower names its services"
)]
pub type OffloadService<S> = Offload<S>;
