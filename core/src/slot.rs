//! Work that outlives its request keeps the request's slot.
//!
//! A layer that may carry a request's work past the request's own end — a
//! cache fill that other requests are waiting for, which goes on after its
//! client hangs up — puts a [`SlotHold`] in the request's extensions before
//! the request reaches a limiter, and takes a clone along with the work. A
//! limiter that admits the request then keeps its slot until the request is
//! done *and* every clone of the hold is dropped: detached work never runs
//! without a slot.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use gratify_core::slot::SlotHold;
//!
//! // What a limiter parks: released when dropped.
//! struct Release(Arc<AtomicBool>);
//! impl Drop for Release {
//!     fn drop(&mut self) { self.0.store(true, Ordering::SeqCst); }
//! }
//!
//! let released = Arc::new(AtomicBool::new(false));
//! let hold = SlotHold::new();
//! let work = hold.clone(); // taken along by the detached work
//! // The request ends: its limiter parks the slot, since work goes on.
//! assert!(hold.shared());
//! hold.park(Box::new(Release(Arc::clone(&released))));
//! drop(hold);
//! assert!(!released.load(Ordering::SeqCst));
//! drop(work); // the work ends: the slot is released
//! assert!(released.load(Ordering::SeqCst));
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};

/// A share in a request's slot; see the [module docs](self). Clones share.
#[derive(Clone, Default)]
pub struct SlotHold(Arc<Mutex<Vec<Box<dyn Send>>>>);

impl SlotHold {
    /// A hold nobody has parked anything in.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether another clone is alive: someone else still works under it.
    pub fn shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }

    /// Keeps `release` until the last clone is dropped; dropping it then is
    /// what releases (a limiter parks its permit here).
    pub fn park(&self, release: Box<dyn Send>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(release);
    }
}

impl fmt::Debug for SlotHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotHold")
            .field("holders", &Arc::strong_count(&self.0))
            .finish()
    }
}
