//! Error types.

use std::fmt;
use std::time::Duration;

pub use super::limiter::Reason;

/// A request was refused by an
/// [`AdaptiveLimit`](crate::limit::AdaptiveLimit) in error mode (for
/// non-HTTP services). Downcast a [`BoxError`](gratify_core::BoxError) to it
/// with `err.is::<Overloaded>()`, as tower's `load_shed::error::Overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    reason: Reason,
    retry_after: Duration,
}

impl Overloaded {
    pub(crate) const fn new(reason: Reason, retry_after: Duration) -> Self {
        Self {
            reason,
            retry_after,
        }
    }

    /// Why the request was refused.
    pub const fn reason(&self) -> Reason {
        self.reason
    }

    /// When a client might try again: the estimated drain time, jittered.
    pub const fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service overloaded: request shed ({})", self.reason)
    }
}

impl std::error::Error for Overloaded {}
