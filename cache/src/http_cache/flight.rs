//! Coalescing: at most one fill (or revalidation, or refresh) of a key at a
//! time; requests that arrive while it runs wait for its outcome instead of
//! going to the origin themselves.
//!
//! The right to fill a key is a [`Ticket`]. Whoever holds it ends the fill
//! with an [`Outcome`]; a ticket dropped without one — the request was shed
//! by a limit, its client left before it reached the origin, a task panicked
//! — ends it as [`Outcome::Abandoned`], so nobody waits for a fill that will
//! not come.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::Shared;
use crate::entry::Entry;
use crate::key::CacheKey;

/// How a fill ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Still running.
    Pending,
    /// A response anyone may be served: here it is (stored, unless the
    /// value gate turned it away or an invalidation overtook it).
    Filled(Arc<Entry>),
    /// The response may not be stored (for anyone): go to the origin alone.
    Uncacheable,
    /// The origin failed (an error, 500, 502, 503, 504).
    Failed,
    /// The fill never happened or was given up.
    Abandoned,
}

/// A fill in progress, as the map of fills holds it.
pub(crate) struct Flight {
    id: u64,
    rx: watch::Receiver<Outcome>,
}

/// The right, and the duty, to fill a key. See the [module docs](self).
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    key: CacheKey,
    id: u64,
    tx: watch::Sender<Outcome>,
    outcome: Outcome,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("key", &self.key)
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl Ticket {
    /// Ends the fill with `outcome`.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Leave the map first: a request woken by the outcome that looks for
        // a fill must not find this one.
        {
            let mut inflight = self
                .shared
                .inflight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if inflight.get(&self.key).is_some_and(|f| f.id == self.id) {
                inflight.remove(&self.key);
            }
        }
        let outcome = match std::mem::replace(&mut self.outcome, Outcome::Abandoned) {
            Outcome::Pending => Outcome::Abandoned,
            o => o,
        };
        match outcome {
            Outcome::Failed => {
                let failed = self.shared.failures.get(&self.key).unwrap_or(0);
                self.shared.failures.insert(self.key.clone(), failed + 1);
            }
            Outcome::Filled(_) | Outcome::Uncacheable => {
                self.shared.failures.invalidate(&self.key);
            }
            Outcome::Pending | Outcome::Abandoned => {}
        }
        let _ = self.tx.send(outcome);
    }
}

/// Ends the fill `ticket` holds, if it holds one.
pub(crate) fn finish(ticket: &mut Option<Ticket>, outcome: Outcome) {
    if let Some(t) = ticket.take() {
        t.finish(outcome);
    }
}

/// A request's part in the fill of its key.
pub(crate) enum Role {
    /// It fills the key.
    Leader(Ticket),
    /// Another request fills it: wait for the outcome.
    Follower(watch::Receiver<Outcome>),
}

/// Joins the fill of `key` in progress, or starts one.
pub(crate) fn elect(shared: &Arc<Shared>, key: &CacheKey) -> Role {
    let mut inflight = shared
        .inflight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(flight) = inflight.get(key) {
        return Role::Follower(flight.rx.clone());
    }
    Role::Leader(start(shared, key, &mut inflight))
}

/// Starts a fill of `key` unless one is in progress (for background
/// refreshes, which nobody waits for).
pub(crate) fn try_lead(shared: &Arc<Shared>, key: &CacheKey) -> Option<Ticket> {
    let mut inflight = shared
        .inflight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if inflight.contains_key(key) {
        return None;
    }
    Some(start(shared, key, &mut inflight))
}

fn start(
    shared: &Arc<Shared>,
    key: &CacheKey,
    inflight: &mut std::collections::HashMap<CacheKey, Flight>,
) -> Ticket {
    let id = shared.next_flight.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = watch::channel(Outcome::Pending);
    inflight.insert(key.clone(), Flight { id, rx });
    Ticket {
        shared: Arc::clone(shared),
        key: key.clone(),
        id,
        tx,
        outcome: Outcome::Pending,
    }
}

/// How many fills of `key` failed in a row lately (within the coalescing
/// wait): shared by every request waiting for the key, so that a crowd, not
/// each of its members, gets a bounded number of new tries.
pub(crate) fn failures(shared: &Shared, key: &CacheKey) -> u32 {
    shared.failures.get(key).unwrap_or(0)
}

/// Waits until `deadline` at most for a fill to end; `None` if it did not.
pub(crate) async fn wait(
    mut rx: watch::Receiver<Outcome>,
    deadline: tokio::time::Instant,
) -> Option<Outcome> {
    let ended = rx.wait_for(|o| !matches!(o, Outcome::Pending));
    match tokio::time::timeout_at(deadline, ended).await {
        Ok(Ok(outcome)) => Some(outcome.clone()),
        // The sender always says how it ended before it goes; a closed
        // channel that says nothing was abandoned.
        Ok(Err(_)) => Some(Outcome::Abandoned),
        Err(_) => None,
    }
}

/// A random pause before the `attempt`-th new election after failed fills:
/// uniform in `[0, 25 ms × 2^attempt)`, at most `cap` — so the requests a
/// failure releases do not return to the origin all at once.
pub(crate) fn jitter(attempt: u32, cap: Duration) -> Duration {
    let ceiling = Duration::from_millis(25)
        .saturating_mul(1 << attempt.min(10))
        .min(cap);
    ceiling.mul_f64(fastrand::f64())
}
