//! Choosing a replica by the expected completion time of *this* request.
//!
//! [`CostBalance`] is a power-of-two-choices balancer over tower's
//! [`Discover`]: for each call it samples two ready replicas and sends the
//! call to the one expected to finish it sooner — and a call of the most
//! urgent classes (an urgency at least a quarter of the most urgent
//! class's, by the model, when some classes fall below that) weighs every
//! ready replica (sixteen at most), not two: the few calls whose delay costs most go where
//! they are answered soonest, while the rest keep the random draw that
//! spreads load. Ties are drawn at random, so balancers of their own (one
//! per caller process) that see a fleet alike do not all pick one replica;
//! when they all measure one replica clearly faster, they do send it their
//! urgent calls until its answers slow (its estimate rises at once), and a
//! call in flight weighs at least what it has run, so a replica where calls
//! hang stops attracting them. Unlike tower's `p2c`,
//! which picks a replica before it sees the request (in `poll_ready`), the
//! choice is made in `call`, for the request's class:
//!
//! - each replica keeps, per class, a peak-sensitive, time-decayed estimate
//!   of its latency (a slow sample counts at once, a fast one pulls the
//!   estimate down gradually, and with no samples it decays towards zero so
//!   that a replica left alone is tried again — tower's PeakEWMA, with a
//!   half-life for its time constant), and the work it has outstanding, per
//!   class. A call its caller dropped (a timeout, a deadline) counts for
//!   the time it had taken, if that raises the estimate: a replica that
//!   hangs looks slow, not idle;
//! - a call of class `k` on replica `r` is expected to finish after the
//!   work queued ahead of it there and its own service:
//!   `L(r, k) + Σ_j n(r, j) · L(r, j) / c`, where `n(r, j)` is the count
//!   of class-`j` calls in flight on `r`, `c` the replica's assumed
//!   concurrency ([`BalanceConfig::replica_concurrency`]), and a call in
//!   flight counts at least [`BalanceConfig::initial_latency`]. With one
//!   class and `c = 1` this is tower's PeakEWMA load;
//! - a failure (an error, a 5xx other than 501 and 505, a gRPC
//!   `UNAVAILABLE` in the head) or a refusal for load (a limiter's 503 with
//!   `x-gratify-shed`, a 429, gRPC `RESOURCE_EXHAUSTED`) counts as at
//!   least [`BalanceConfig::failure_penalty`] of latency: a replica that
//!   fails fast never looks fast. Refusals for load never eject: a replica
//!   that sheds is busy, not broken;
//! - **outlier ejection**: a replica whose consecutive failures reach
//!   [`Ejection::consecutive_failures`], or whose mean latency for a class
//!   over the last [`Ejection::interval`] stands [`Ejection::latency_factor`]
//!   times above the median of the other replicas' for that class (judged
//!   only on replicas with [`Ejection::min_requests`] successful calls of
//!   the class in the interval, and at least three of them), is left out
//!   of the choice for [`Ejection::base_time`] (doubling each time it is
//!   ejected again before a success, up to [`Ejection::max_time`]), then
//!   re-admitted. Never more than [`Ejection::max_share`] of the replicas
//!   are out. While a replica that is not ejected exists, the balancer
//!   waits for one of them to be ready rather than use an ejected one;
//!   with every replica ejected it uses them all.
//!
//! A call leaves the replica's count when its response head arrives (or
//! the call fails or is dropped); a streamed body is not followed.
//!
//! The class of a call is the [`CallContext`]'s (on the
//! request or the task's, as [`PropagateLayer`](super::PropagateLayer)
//! reads it), looked up by name in the caller's model; a call without one
//! is of the model's default class.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use gratify::balance::p2c::{BalanceConfig, CostBalance};
//! use gratify::{Class, CostModel, DelayCost};
//! use http::{Request, Response};
//! use tower::discover::ServiceList;
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), gratify::BoxError> {
//! let model = CostModel::builder()
//!     .class("checkout", Class::new(DelayCost::linear(20.0)?, 10.0)?)
//!     .default_class("checkout")
//!     .build()?;
//! let replica = |name: &'static str| {
//!     service_fn(move |_: Request<()>| async move {
//!         Ok::<_, Infallible>(Response::new(name))
//!     })
//! };
//! let replicas = ServiceList::new(vec![replica("a"), replica("b"), replica("c")]);
//! let balance = CostBalance::new(replicas, &model, BalanceConfig::default());
//! let answer = balance.oneshot(Request::new(())).await?;
//! assert!(["a", "b", "c"].contains(answer.body()));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use gratify_core::{BoxError, ClassId, CostModel};
use http::{Request, Response};
use tower::discover::{Change, Discover};
use tower::ready_cache::ReadyCache;
use tower_service::Service;

use super::CallContext;
use super::propagate::now;

/// How [`CostBalance`] weighs replicas.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BalanceConfig {
    /// How fast a latency estimate forgets: a sample's weight halves every
    /// `decay` (default 10 s, as tower's PeakEWMA).
    pub decay: Duration,
    /// Calls a replica serves at once before they queue (default 1: every
    /// call in flight delays the next one by its whole service time).
    pub replica_concurrency: f64,
    /// The least latency a failed call counts as (default 1 s).
    pub failure_penalty: Duration,
    /// The latency assumed for a replica and class never measured (default
    /// 10 ms): new replicas get tried, not flooded.
    pub initial_latency: Duration,
    /// When replicas are left out of the choice.
    pub ejection: Ejection,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            replica_concurrency: 1.0,
            failure_penalty: Duration::from_secs(1),
            initial_latency: Duration::from_millis(10),
            ejection: Ejection::default(),
        }
    }
}

/// Outlier ejection: which replicas are left out, and for how long.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Ejection {
    /// Failures in a row that eject a replica (default 5; 0 turns this
    /// rule off).
    pub consecutive_failures: u32,
    /// How many times the median latency of the other replicas a
    /// replica's own must exceed to be ejected (default 3; 0 turns this
    /// rule off). Judged with at least three replicas measured.
    pub latency_factor: f64,
    /// The first ejection's length (default 10 s); each ejection of the
    /// same replica in a row doubles it.
    pub base_time: Duration,
    /// The longest ejection (default 5 min).
    pub max_time: Duration,
    /// How often the latency rule is judged over every replica, on the
    /// calls of the interval (default 10 s; at least 10 ms).
    pub interval: Duration,
    /// Successful calls of a class a replica must have served in the
    /// interval to be judged by the latency rule for it (default 5).
    pub min_requests: u32,
    /// The largest share of replicas ejected at once (default 0.5).
    pub max_share: f64,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            latency_factor: 3.0,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
            interval: Duration::from_secs(10),
            min_requests: 5,
            max_share: 0.5,
        }
    }
}

/// What a balancer knows of one replica (shared with its calls in flight).
#[derive(Debug)]
struct Replica {
    state: Mutex<ReplicaState>,
}

#[derive(Debug)]
struct ReplicaState {
    /// Per class: the latency estimate (seconds) and when it was last
    /// updated; `None` before the first sample.
    latency: Vec<Option<(f64, Instant)>>,
    /// Per class: calls in flight.
    in_flight: Vec<u32>,
    /// Per class: the sum of the in-flight calls' start times (seconds
    /// since `epoch`), for their mean age: a call in flight weighs at least
    /// as long as it has already run.
    started: Vec<f64>,
    /// What `started` counts from.
    epoch: Instant,
    /// Per class: the successful calls' latencies (sum, count) since the
    /// latency rule last judged.
    window: Vec<(f64, u32)>,
    consecutive_failures: u32,
    /// Ejected until this instant.
    ejected_until: Option<Instant>,
    /// Ejections in a row (reset by a success after re-admission).
    ejections: u32,
}

/// The share of its weight an estimate keeps after `elapsed`: one half per
/// `decay`.
fn keep(elapsed: Duration, decay: Duration) -> f64 {
    let half = decay.as_secs_f64().max(1e-9);
    (-elapsed.as_secs_f64() / half * std::f64::consts::LN_2).exp()
}

impl Replica {
    fn new(classes: usize) -> Self {
        Self {
            state: Mutex::new(ReplicaState {
                latency: vec![None; classes],
                in_flight: vec![0; classes],
                started: vec![0.0; classes],
                epoch: now(),
                window: vec![(0.0, 0); classes],
                consecutive_failures: 0,
                ejected_until: None,
                ejections: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplicaState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ReplicaState {
    /// The latency of class `k` (seconds), if measured, decayed towards
    /// zero since its last sample — as tower's PeakEWMA does, so that a
    /// replica left alone for looking slow is tried again.
    fn latency(&self, k: usize, at: Instant, decay: Duration) -> Option<f64> {
        let (value, last) = self.latency.get(k).copied().flatten()?;
        Some(value * keep(at.saturating_duration_since(last), decay))
    }

    /// The replica's latency over every class measured: the mean of the
    /// classes' (decayed) estimates.
    fn overall(&self, at: Instant, decay: Duration) -> Option<f64> {
        let measured: Vec<f64> = (0..self.latency.len())
            .filter_map(|k| self.latency(k, at, decay))
            .collect();
        (!measured.is_empty()).then(|| measured.iter().sum::<f64>() / measured.len() as f64)
    }

    /// The work in flight ahead of a new call (seconds, before dividing by
    /// the replica's concurrency): each call at its class's estimate — and
    /// at least what it has run (the class's calls' mean age), so that a
    /// replica whose estimate has decayed, or that was never measured,
    /// stops looking idle while its calls hang there.
    fn ahead(&self, at: Instant, config: &BalanceConfig) -> f64 {
        let initial = config.initial_latency.as_secs_f64();
        let since_epoch = at.saturating_duration_since(self.epoch).as_secs_f64();
        self.in_flight
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(j, n)| {
                let l = self
                    .latency(j, at, config.decay)
                    .or_else(|| self.overall(at, config.decay))
                    .unwrap_or(initial)
                    .max(initial);
                let age = since_epoch - self.started[j] / f64::from(*n);
                f64::from(*n) * l.max(age)
            })
            .sum()
    }

    /// Records a sample of class `k`: one above the estimate replaces it at
    /// once (the peak), one below pulls it down by the weight of the time
    /// since the last sample.
    fn record(&mut self, k: usize, sample: f64, at: Instant, decay: Duration) {
        let Some(slot) = self.latency.get_mut(k) else {
            return;
        };
        *slot = Some(match *slot {
            None => (sample, at),
            Some((old, last)) => {
                let w = keep(at.saturating_duration_since(last), decay);
                let old = old * w;
                if sample >= old {
                    (sample, at)
                } else {
                    (old * w + sample * (1.0 - w), at)
                }
            }
        });
    }

    /// Raises the estimate of class `k` to `lower_bound` if it is below:
    /// what a call dropped after `lower_bound` teaches.
    fn raise(&mut self, k: usize, lower_bound: f64, at: Instant, decay: Duration) {
        if self.latency(k, at, decay).is_none_or(|l| l < lower_bound)
            && let Some(slot) = self.latency.get_mut(k)
        {
            *slot = Some((lower_bound, at));
        }
    }

    fn is_ejected(&self, at: Instant) -> bool {
        self.ejected_until.is_some_and(|t| at < t)
    }
}

/// A power-of-two-choices balancer that sends each call to the replica
/// expected to finish it sooner, for its class (weighing every replica for
/// the most urgent classes). See the [module docs](self).
pub struct CostBalance<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    discover: D,
    services: ReadyCache<D::Key, D::Service, Req>,
    replicas: HashMap<D::Key, Arc<Replica>>,
    /// Every replica's state, for the outlier rule (rebuilt when the set
    /// changes).
    peers: Arc<[Arc<Replica>]>,
    classes: Arc<ClassNames>,
    config: Arc<BalanceConfig>,
    rng: fastrand::Rng,
    /// When the latency rule is next judged.
    next_sweep: Option<Instant>,
    /// Held while deciding an ejection, so that the share out holds.
    ejecting: Arc<Mutex<()>>,
    /// Discovery has ended: it is not polled again.
    discovered_all: bool,
}

/// Replaces settings that would make the arithmetic meaningless by their
/// defaults (with a warning).
fn sanitize(config: &mut BalanceConfig) {
    let defaults = BalanceConfig::default();
    if !(config.replica_concurrency.is_finite() && config.replica_concurrency > 0.0) {
        tracing::warn!(
            value = config.replica_concurrency,
            "replica_concurrency must be positive; 1 used"
        );
        config.replica_concurrency = defaults.replica_concurrency;
    }
    let e = &mut config.ejection;
    if !(e.latency_factor.is_finite() && e.latency_factor >= 0.0) {
        tracing::warn!(
            value = e.latency_factor,
            "latency_factor must be 0 or more; 3 used"
        );
        e.latency_factor = defaults.ejection.latency_factor;
    }
    if e.max_share.is_nan() {
        e.max_share = defaults.ejection.max_share;
    }
    e.interval = e
        .interval
        .clamp(Duration::from_millis(10), Duration::from_secs(86_400));
    if config.decay.is_zero() {
        config.decay = defaults.decay;
    }
}

/// A class whose urgency is at least this share of the most urgent class's
/// weighs every ready replica for each call.
const SCAN_SHARE: f64 = 0.25;

/// The most replicas such a call weighs (a window of the ready ones from a
/// random start, in a larger fleet).
const MAX_SCAN: usize = 16;

/// The caller's classes by name, and its default.
#[derive(Debug)]
struct ClassNames {
    by_name: HashMap<String, ClassId>,
    default: ClassId,
    len: usize,
    /// By class index: whether its calls weigh every ready replica rather
    /// than two drawn at random (the most urgent classes).
    scan: Vec<bool>,
}

impl<D, Req> fmt::Debug for CostBalance<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostBalance")
            .field("replicas", &self.services.len())
            .field("ready", &self.services.ready_len())
            .finish_non_exhaustive()
    }
}

impl<D, Req> CostBalance<D, Req>
where
    D: Discover,
    D::Key: Hash,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    /// Balances over the replicas `discover` reports, for the classes of
    /// the caller's `model`.
    pub fn new(discover: D, model: &CostModel, config: BalanceConfig) -> Self {
        Self::with_seed(discover, model, config, fastrand::u64(..))
    }

    /// [`new`](Self::new) with the random choice seeded (for reproducible
    /// tests and simulations).
    pub fn with_seed(discover: D, model: &CostModel, mut config: BalanceConfig, seed: u64) -> Self {
        sanitize(&mut config);
        let by_name = model
            .iter()
            .map(|(id, name, _)| (name.to_owned(), id))
            .collect();
        let urgency: Vec<f64> = model.iter().map(|(_, _, c)| c.urgency(0.0)).collect();
        let most = urgency.iter().copied().fold(0.0_f64, f64::max);
        let mut scan: Vec<bool> = urgency
            .iter()
            .map(|u| most > 0.0 && *u >= most * SCAN_SHARE)
            .collect();
        // Only a few classes stand out: when every class would weigh every
        // replica (one class, or all alike), all keep the random draw,
        // which keeps callers with views of their own from herding.
        if scan.iter().all(|s| *s) {
            scan.fill(false);
        }
        Self {
            discover,
            services: ReadyCache::default(),
            replicas: HashMap::new(),
            peers: Arc::new([]),
            classes: Arc::new(ClassNames {
                by_name,
                default: model.default_class(),
                len: model.len(),
                scan,
            }),
            config: Arc::new(config),
            rng: fastrand::Rng::with_seed(seed),
            next_sweep: None,
            ejecting: Arc::new(Mutex::new(())),
            discovered_all: false,
        }
    }

    /// Replicas known (ready or not).
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether no replica is known.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Calls in flight, over every replica.
    pub fn in_flight(&self) -> usize {
        self.replicas
            .values()
            .map(|r| {
                r.lock()
                    .in_flight
                    .iter()
                    .map(|n| *n as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether the replica under `key` is ejected now (`false` for a key
    /// not known).
    pub fn is_ejected<Q>(&self, key: &Q) -> bool
    where
        D::Key: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let at = now();
        self.replicas
            .get(key)
            .is_some_and(|r| r.lock().is_ejected(at))
    }

    /// Replicas ejected now.
    pub fn ejected(&self) -> usize {
        let at = now();
        self.replicas
            .values()
            .filter(|r| r.lock().is_ejected(at))
            .count()
    }
}

/// The balancer found no replica, or discovery failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// Discovery failed.
    #[error("replica discovery failed: {0}")]
    Discover(#[source] BoxError),
    /// `call` without a ready replica (without `poll_ready` first).
    #[error("called without a ready replica: poll_ready first")]
    NotReady,
    /// Discovery has ended and no replica is left.
    #[error("no replica left to balance over (discovery has ended)")]
    NoReplicas,
}

impl<D, Req, RB> CostBalance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<Req, Response = Response<RB>>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    Req: AsRequest,
{
    fn update_from_discover(&mut self, cx: &mut Context<'_>) -> Result<(), BoxError> {
        let mut changed = false;
        while !self.discovered_all {
            match Pin::new(&mut self.discover).poll_discover(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => self.discovered_all = true,
                Poll::Ready(Some(Err(e))) => return Err(BalanceError::Discover(e.into()).into()),
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    self.services.evict(&key);
                    self.replicas.remove(&key);
                    changed = true;
                }
                Poll::Ready(Some(Ok(Change::Insert(key, svc)))) => {
                    // A key inserted again is the same replica with a new
                    // service: what was learned of it stays.
                    if !self.replicas.contains_key(&key) {
                        self.replicas
                            .insert(key.clone(), Arc::new(Replica::new(self.classes.len)));
                        changed = true;
                    }
                    self.services.push(key, svc);
                }
            }
        }
        if changed {
            self.peers = self.replicas.values().cloned().collect();
        }
        if self.discovered_all && self.services.is_empty() {
            return Err(BalanceError::NoReplicas.into());
        }
        Ok(())
    }

    fn promote_pending(&mut self, cx: &mut Context<'_>) {
        loop {
            match self.services.poll_pending(cx) {
                Poll::Ready(Ok(())) | Poll::Pending => return,
                Poll::Ready(Err(failed)) => {
                    // A replica whose readiness failed is dropped, as tower's
                    // balancer does; discovery may add it back.
                    tracing::debug!(error = %failed.1, "replica failed readiness; removed");
                    self.replicas.remove(&failed.0);
                    self.peers = self.replicas.values().cloned().collect();
                }
            }
        }
    }

    /// The expected completion time (seconds) of a class-`k` call on the
    /// ready replica at `index`.
    fn expected(&self, index: usize, k: usize, at: Instant) -> f64 {
        let Some((key, _)) = self.services.get_ready_index(index) else {
            return f64::INFINITY;
        };
        let Some(replica) = self.replicas.get(key) else {
            return f64::INFINITY;
        };
        let config = &self.config;
        let state = replica.lock();
        let initial = config.initial_latency.as_secs_f64();
        let own = state
            .latency(k, at, config.decay)
            .or_else(|| state.overall(at, config.decay))
            .unwrap_or(initial);
        own + state.ahead(at, config) / config.replica_concurrency.max(1e-9)
    }

    /// Ready replicas that may be chosen: the ones not ejected, or every
    /// ready one when every replica known is ejected.
    fn candidates(&self, at: Instant) -> Vec<usize> {
        let ready = self.services.ready_len();
        let open: Vec<usize> = (0..ready)
            .filter(|&i| {
                self.services
                    .get_ready_index(i)
                    .and_then(|(key, _)| self.replicas.get(key))
                    .is_none_or(|r| !r.lock().is_ejected(at))
            })
            .collect();
        if open.is_empty() && self.replicas.values().all(|r| r.lock().is_ejected(at)) {
            (0..ready).collect()
        } else {
            open
        }
    }

    fn class_of(&self, request: &Req) -> ClassId {
        CallContext::of(request.request_extensions())
            .and_then(|c| c.with_class_name(|name| self.classes.by_name.get(name?).copied()))
            .unwrap_or(self.classes.default)
    }
}

/// Requests the balancer can read a class from: `http::Request`s.
pub trait AsRequest {
    /// The request's extensions.
    fn request_extensions(&self) -> &http::Extensions;
}

impl<B> AsRequest for Request<B> {
    fn request_extensions(&self) -> &http::Extensions {
        self.extensions()
    }
}

impl<D, Req, RB> Service<Req> for CostBalance<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<Req, Response = Response<RB>>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    Req: AsRequest,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = BalanceFuture<<D::Service as Service<Req>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.update_from_discover(cx)?;
        self.promote_pending(cx);
        if !self.candidates(now()).is_empty() {
            Poll::Ready(Ok(()))
        } else if self.discovered_all && self.services.is_empty() {
            Poll::Ready(Err(BalanceError::NoReplicas.into()))
        } else {
            // Woken by a replica becoming ready or by discovery. (An
            // ejection ending does not wake: a replica not ejected is
            // pending, and its readiness will.)
            Poll::Pending
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let at = now();
        match self.next_sweep {
            None => self.next_sweep = at.checked_add(self.config.ejection.interval),
            Some(t) if at >= t => {
                sweep(&self.peers, at, &self.config, &self.ejecting);
                self.next_sweep = at.checked_add(self.config.ejection.interval);
            }
            Some(_) => {}
        }
        let k = self
            .class_of(&request)
            .index()
            .min(self.classes.len.saturating_sub(1));
        let mut candidates = self.candidates(at);
        if candidates.is_empty() {
            // Every open replica was ejected since `poll_ready` (by a call
            // ending on another thread): any ready one will do.
            candidates = (0..self.services.ready_len()).collect();
        }
        let index = match candidates.len() {
            // `call` without `poll_ready`: the caller broke the contract.
            0 => {
                return BalanceFuture {
                    inner: None,
                    tracker: None,
                };
            }
            1 => candidates[0],
            // The most urgent classes weigh every ready replica (up to
            // `MAX_SCAN` of them, from a random start in a larger fleet):
            // the least expected completion, not the lesser of two.
            n if self.classes.scan.get(k).copied().unwrap_or(false) => {
                let d = n.min(MAX_SCAN);
                let start = if n > d { self.rng.usize(..n) } else { 0 };
                // On the stack: an urgent call allocates nothing.
                let mut weighed = [(0usize, f64::INFINITY); MAX_SCAN];
                for (j, slot) in weighed.iter_mut().take(d).enumerate() {
                    let i = candidates[(start + j) % n];
                    *slot = (i, self.expected(i, k, at));
                }
                let weighed = &weighed[..d];
                let best = weighed
                    .iter()
                    .map(|(_, e)| *e)
                    .fold(f64::INFINITY, f64::min);
                // Ties drawn at random: balancers of their own that see a
                // fleet alike (new, or idle) do not all pick its first
                // replica. Exact ties only: in the balance bench a band of
                // 20% around the best sent checkouts to replicas with more
                // work ahead and cost a fifth more under overload.
                let ties = weighed.iter().filter(|(_, e)| *e <= best).count();
                if ties == 0 {
                    candidates[start]
                } else {
                    let pick = self.rng.usize(..ties);
                    weighed
                        .iter()
                        .filter(|(_, e)| *e <= best)
                        .nth(pick)
                        .map_or(candidates[start], |(i, _)| *i)
                }
            }
            n => {
                let a = self.rng.usize(..n);
                let mut b = self.rng.usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                if self.expected(b, k, at) < self.expected(a, k, at) {
                    b
                } else {
                    a
                }
            }
        };
        let replica = self
            .services
            .get_ready_index(index)
            .and_then(|(key, _)| self.replicas.get(key))
            .cloned();
        if let Some(r) = &replica {
            let mut state = r.lock();
            state.in_flight[k] += 1;
            let offset = at.saturating_duration_since(state.epoch).as_secs_f64();
            state.started[k] += offset;
        }
        let future = self.services.call_ready_index(index, request);
        let tracker = replica.map(|replica| Tracker {
            replica,
            class: k,
            started: at,
            config: Arc::clone(&self.config),
            peers: Arc::clone(&self.peers),
            ejecting: Arc::clone(&self.ejecting),
            done: false,
        });
        BalanceFuture {
            inner: Some(future),
            tracker,
        }
    }
}

/// Accounts one call: its time in flight, its outcome.
struct Tracker {
    replica: Arc<Replica>,
    class: usize,
    started: Instant,
    config: Arc<BalanceConfig>,
    /// Every replica, for the share ejected.
    peers: Arc<[Arc<Replica>]>,
    ejecting: Arc<Mutex<()>>,
    done: bool,
}

impl Tracker {
    /// A call its caller's deadline cut short: the caller gone, unless the
    /// call had already run `latency_factor` times what the other replicas
    /// take for its class — then the replica is the slow one, and it counts
    /// as a failure (a replica that hangs is ejected even when every caller
    /// has a deadline).
    fn finish_cut(&mut self) {
        if self.done {
            return;
        }
        let at = now();
        let took = at.saturating_duration_since(self.started).as_secs_f64();
        let config = &self.config;
        let mut others: Vec<f64> = self
            .peers
            .iter()
            .filter(|p| !Arc::ptr_eq(p, &self.replica))
            .filter_map(|p| p.lock().latency(self.class, at, config.decay))
            .collect();
        let factor = config.ejection.latency_factor;
        let slow = factor > 0.0 && !others.is_empty() && {
            others.sort_by(f64::total_cmp);
            took > factor * others[others.len() / 2]
        };
        self.finish(slow.then_some(Answer::Failed));
    }

    fn finish(&mut self, outcome: Option<Answer>) {
        if self.done {
            return;
        }
        self.done = true;
        let at = now();
        let took = at.saturating_duration_since(self.started).as_secs_f64();
        let config = &self.config;
        let mut state = self.replica.lock();
        state.in_flight[self.class] = state.in_flight[self.class].saturating_sub(1);
        let offset = self
            .started
            .saturating_duration_since(state.epoch)
            .as_secs_f64();
        state.started[self.class] = if state.in_flight[self.class] == 0 {
            0.0
        } else {
            (state.started[self.class] - offset).max(0.0)
        };
        // `None`: the caller went away. The call took at least this long:
        // a replica that hangs must not look idle.
        let Some(answer) = outcome else {
            state.raise(self.class, took, at, config.decay);
            return;
        };
        if answer == Answer::Shed {
            // Overloaded, not broken: steer away (a shed counts as slow),
            // but never eject for it — under an overload of the whole fleet
            // ejecting the replicas that shed would halve what is left.
            // Failures in a row go on counting across it.
            // A shed says the replica's queue is full now, not that it is
            // slow: its estimate doubles (from at least `initial_latency`),
            // up to the failure penalty.
            let current = state
                .latency(self.class, at, config.decay)
                .unwrap_or(0.0)
                .max(config.initial_latency.as_secs_f64());
            let sample = (current * 2.0)
                .max(took)
                .min(config.failure_penalty.as_secs_f64().max(took));
            state.record(self.class, sample, at, config.decay);
            return;
        }
        let failed = answer == Answer::Failed;
        let sample = if failed {
            took.max(config.failure_penalty.as_secs_f64())
        } else {
            // The latency rule judges successful calls only (failures have
            // their own rule).
            if let Some(w) = state.window.get_mut(self.class) {
                w.0 += took;
                w.1 = w.1.saturating_add(1);
            }
            took
        };
        state.record(self.class, sample, at, config.decay);
        let ejection = &config.ejection;
        if failed {
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        } else {
            state.consecutive_failures = 0;
            if !state.is_ejected(at) && state.ejected_until.is_some() {
                // Back, and serving: the next ejection starts short again.
                state.ejected_until = None;
                state.ejections = 0;
            }
        }
        let by_failures = ejection.consecutive_failures > 0
            && state.consecutive_failures >= ejection.consecutive_failures;
        drop(state);
        if by_failures {
            eject(&self.replica, &self.peers, at, config, &self.ejecting);
        }
    }
}

/// Ejects `replica` unless it is out already or the share of replicas out
/// would pass the allowed one (decided under `ejecting`, so that two
/// ejections at once cannot both pass).
fn eject(
    replica: &Arc<Replica>,
    peers: &[Arc<Replica>],
    at: Instant,
    config: &BalanceConfig,
    ejecting: &Mutex<()>,
) {
    let ejection = &config.ejection;
    let _deciding = ejecting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = peers
        .iter()
        .filter(|p| !Arc::ptr_eq(p, replica) && p.lock().is_ejected(at))
        .count();
    let allowed = (ejection.max_share.clamp(0.0, 1.0) * peers.len() as f64).floor() as usize;
    let mut state = replica.lock();
    if state.is_ejected(at) || out + 1 > allowed {
        return;
    }
    let doublings = state.ejections.min(16);
    let length = ejection
        .base_time
        .saturating_mul(1 << doublings)
        .min(ejection.max_time);
    state.ejected_until = at.checked_add(length);
    state.ejections = state.ejections.saturating_add(1);
    state.consecutive_failures = 0;
    tracing::debug!(seconds = length.as_secs_f64(), "replica ejected");
}

/// The latency rule, class by class over the interval's successful calls:
/// a replica whose mean is more than `latency_factor` times the median of
/// the others' is ejected. Then the interval starts again.
fn sweep(peers: &[Arc<Replica>], at: Instant, config: &BalanceConfig, ejecting: &Mutex<()>) {
    let windows: Vec<Vec<(f64, u32)>> = peers
        .iter()
        .map(|p| std::mem::take(&mut p.lock().window))
        .collect();
    for (p, w) in peers.iter().zip(&windows) {
        p.lock().window = vec![(0.0, 0); w.len()];
    }
    let factor = config.ejection.latency_factor;
    if factor <= 0.0 {
        return;
    }
    let min = config.ejection.min_requests.max(1);
    let classes = windows.iter().map(Vec::len).max().unwrap_or(0);
    let mut outliers = Vec::new();
    for k in 0..classes {
        // Each judged replica's mean for class k.
        let means: Vec<(usize, f64)> = windows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let (sum, n) = *w.get(k)?;
                (n >= min).then(|| (i, sum / f64::from(n)))
            })
            .collect();
        if means.len() < 3 {
            continue;
        }
        for &(i, own) in &means {
            let mut others: Vec<f64> = means
                .iter()
                .filter(|(j, _)| *j != i)
                .map(|(_, m)| *m)
                .collect();
            others.sort_by(f64::total_cmp);
            let median = others[others.len() / 2];
            if own > factor * median && !outliers.contains(&i) {
                outliers.push(i);
            }
        }
    }
    for i in outliers {
        eject(&peers[i], peers, at, config, ejecting);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.finish(None);
    }
}

pin_project_lite::pin_project! {
    /// The future of [`CostBalance`].
    pub struct BalanceFuture<F> {
        #[pin]
        inner: Option<F>,
        tracker: Option<Tracker>,
    }
}

impl<F> fmt::Debug for BalanceFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceFuture").finish_non_exhaustive()
    }
}

/// What an answer says of the replica that gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Served,
    /// It failed: an error, a 5xx but 501 and 505 (the client's doing), or
    /// gRPC `UNAVAILABLE` (14) in the head.
    Failed,
    /// It refused for load: a limiter's 503 (`x-gratify-shed`), a 429, or
    /// gRPC `RESOURCE_EXHAUSTED` (8) in the head.
    Shed,
}

fn answer<B>(response: &Response<B>) -> Answer {
    let status = response.status();
    let grpc = gratify_core::refusal::grpc_status(response.headers());
    if status == http::StatusCode::TOO_MANY_REQUESTS
        || grpc == Some(8)
        || response
            .headers()
            .contains_key(gratify_scaling::limit::SHED_REASON_HEADER)
    {
        Answer::Shed
    } else if (status.is_server_error()
        && status != http::StatusCode::NOT_IMPLEMENTED
        && status != http::StatusCode::HTTP_VERSION_NOT_SUPPORTED)
        || grpc == Some(14)
    {
        Answer::Failed
    } else {
        Answer::Served
    }
}

impl<F, RB, E> Future for BalanceFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(BalanceError::NotReady.into()));
        };
        let out = ready!(inner.poll(cx)).map_err(Into::into);
        if let Some(tracker) = this.tracker.as_mut() {
            // A call its caller's deadline cut short (a `PropagateLayer`
            // under the balancer) is judged apart: a caller gone, not a
            // failure, unless the replica was far slower than the others.
            let cut = out
                .as_ref()
                .is_err_and(|e| e.downcast_ref::<super::DeadlineExceeded>().is_some());
            if cut {
                tracker.finish_cut();
            } else {
                tracker.finish(Some(out.as_ref().map_or(Answer::Failed, answer)));
            }
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call in flight weighs at least what it has run: a replica whose
    /// estimate has decayed to almost nothing (or that was never measured)
    /// does not look idle while a call hangs there — an urgent call, which
    /// weighs every replica, would otherwise go to it again and again.
    #[tokio::test(start_paused = true)]
    async fn a_call_in_flight_weighs_at_least_what_it_has_run() {
        let config = BalanceConfig::default();
        let replica = Replica::new(2);
        let start = now();
        {
            let mut s = replica.lock();
            s.record(0, 0.001, start, config.decay);
            s.in_flight[0] = 1;
            let offset = start.saturating_duration_since(s.epoch).as_secs_f64();
            s.started[0] = offset;
        }
        // Fresh: the estimate (at least the initial latency).
        let fresh = replica.lock().ahead(now(), &config);
        assert!(
            (fresh - config.initial_latency.as_secs_f64()).abs() < 1e-9,
            "{fresh}"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let aged = replica.lock().ahead(now(), &config);
        assert!((2.0..2.001).contains(&aged), "{aged}");
        // A second call, just started: the mean age of the two.
        {
            let mut s = replica.lock();
            s.in_flight[0] = 2;
            let offset = now().saturating_duration_since(s.epoch).as_secs_f64();
            s.started[0] += offset;
        }
        let two = replica.lock().ahead(now(), &config);
        assert!(
            (2.0..2.001).contains(&two),
            "two calls of mean age 1 s: {two}"
        );
    }
}
