//! Hedged calls: a second copy of a slow call, when the class's delay cost
//! pays for the extra load.
//!
//! "The Tail at Scale" (Dean and Barroso): send a call; if no answer has
//! come by the time most calls of its kind have been answered (the
//! [`HedgeConfig::quantile`] of the class's recent latencies, 95% by
//! default), send a second copy — through the balancer, so to another
//! replica most of the time — and take whichever answers first (a failed
//! answer does not count while the other may still succeed). The loser is
//! dropped, which cancels it: its slot on the replica is released.
//!
//! [`HedgeLayer`] hedges a class only when the cost model says it is worth
//! it. From the class's recent latencies it estimates, per call, the delay a
//! hedge saves and the extra replica time it spends; the class is hedged
//! when the saving, priced on the class's cost curve, exceeds the extra
//! time priced at what replica time is worth to the calls it is taken
//! from: the model's `slot_second`, or the mean urgency (delay cost per
//! second) of the calls this client makes, if more. A checkout whose tail costs money is hedged; a prefetch or a
//! batch job in a mix of checkouts is not. And never more than that:
//!
//! - hedges are at most [`HedgeConfig::max_share`] of calls (a budget like
//!   the retry budget's, 5% by default);
//! - none while the servers refuse calls for overload (more than
//!   [`HedgeConfig::max_refused_share`] of recent calls): under saturation a
//!   second copy only adds to the queue;
//! - only safe methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`: two copies of
//!   a `PUT` or `DELETE` running at once may answer differently or land in
//!   either order), and only once a class has [`HedgeConfig::min_samples`]
//!   latencies to judge by.
//!
//! The latencies a plan is made from are those of calls that were not
//! hedged: calls of a class not (yet) worth hedging, and one call in
//! sixteen of a hedged class, sent without a copy, so that hedging does not
//! hide the tail it cuts.
//!
//! The inner service must be `Clone` (a `Buffer` around a
//! [`CostBalance`](super::CostBalance), a tonic `Channel`) and the body too.
//!
//! # Example
//!
//! ```
//! use gratify::balance::hedge::{HedgeConfig, HedgeLayer};
//! use gratify::{Class, CostModel, DelayCost};
//! use http::{Request, Response};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), gratify::BoxError> {
//! let model = CostModel::builder()
//!     .class("checkout", Class::new(DelayCost::linear(20.0)?, 10.0)?)
//!     .default_class("checkout")
//!     .build()?;
//! let replicas = service_fn(|_: Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new("stock: 3"))
//! });
//! let client = HedgeLayer::new(&model, HedgeConfig::default())?.layer(replicas);
//! let answer = client.oneshot(Request::get("/stock/7").body(())?).await?;
//! assert_eq!(*answer.body(), "stock: 3");
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use gratify_core::estimate::LatencyWindow;
use gratify_core::{BoxError, CostModel};
use http::{Method, Request, Response, StatusCode};
use tower::retry::budget::{Budget, TpsBudget};
use tower_layer::Layer;
use tower_service::Service;

use super::CallContext;
use super::propagate::now;
use super::tally::Tally;

/// When [`HedgeLayer`] sends a second copy.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HedgeConfig {
    /// The quantile of a class's recent latencies after which a call is
    /// hedged (default 0.95).
    pub quantile: f64,
    /// The largest share of calls hedged (default 0.05).
    pub max_share: f32,
    /// How far back a class's latencies count (default 60 s).
    pub window: Duration,
    /// Latencies a class needs before it is hedged (default 50).
    pub min_samples: u64,
    /// Above this share of recent calls refused for overload, nothing is
    /// hedged (default 0.01).
    pub max_refused_share: f64,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            quantile: 0.95,
            max_share: 0.05,
            window: Duration::from_secs(60),
            min_samples: 50,
            max_refused_share: 0.01,
        }
    }
}

/// A [`HedgeConfig`] out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hedging setting: {0}")]
pub struct HedgeConfigError(&'static str);

/// What a class's latencies say about hedging it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HedgePlan {
    /// When a call of the class is hedged.
    pub delay: Duration,
    /// Whether the delay saved is worth the replica time spent, by the
    /// model's prices.
    pub worth_it: bool,
    /// The expected delay a hedge saves per call, seconds.
    pub saving: f64,
    /// The expected extra replica time per call, seconds.
    pub extra: f64,
}

#[derive(Debug)]
struct ClassStats {
    latencies: LatencyWindow,
    plan: Option<HedgePlan>,
    since_plan: u32,
}

#[derive(Debug)]
struct Shared {
    config: HedgeConfig,
    by_name: std::collections::HashMap<String, usize>,
    default: usize,
    /// Per class: the delay cost per second at the start.
    urgency: Vec<f64>,
    /// Per class: its cost curve (what a hedge saves is read off it).
    curves: Vec<gratify_core::Class>,
    /// Calls, for choosing the unhedged sample.
    counter: std::sync::atomic::AtomicU64,
    slot_price: f64,
    /// Per class: calls seen (for the mix a hedge takes replica time from).
    seen: Vec<std::sync::atomic::AtomicU64>,
    classes: Vec<Mutex<ClassStats>>,
    budget: TpsBudget,
    /// Calls, marked when refused for overload, over the window.
    refusals: Tally,
}

impl Shared {
    fn overloaded(&self) -> bool {
        let (calls, refused) = self.refusals.totals();
        calls > 0 && refused as f64 > self.config.max_refused_share * calls as f64
    }

    fn count(&self, refused: bool) {
        self.refusals.record(refused);
    }

    /// Records a latency of class `k` and, every so often, plans again.
    fn record(&self, k: usize, latency: Duration) {
        let Some(stats) = self.classes.get(k) else {
            return;
        };
        let mut s = stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = now();
        s.latencies.record(at, latency);
        s.since_plan += 1;
        if s.since_plan >= 32 || s.plan.is_none() {
            s.since_plan = 0;
            s.plan = self.plan(k, &mut s.latencies, at);
        }
    }

    /// The hedging plan of class `k` from its latencies.
    fn plan(
        &self,
        k: usize,
        latencies: &mut LatencyWindow,
        at: std::time::Instant,
    ) -> Option<HedgePlan> {
        if latencies.count(at) < self.config.min_samples {
            return None;
        }
        let delay = latencies.quantile(at, self.config.quantile)?;
        // The latency distribution at twenty evenly spaced quantiles; a
        // first call and its hedge drawn from it independently.
        const N: usize = 20;
        let points: Vec<f64> = (0..N)
            .filter_map(|i| latencies.quantile(at, (i as f64 + 0.5) / N as f64))
            .map(|d| d.as_secs_f64())
            .collect();
        let d = delay.as_secs_f64();
        let curve = self.curves.get(k)?;
        let cost = |t: f64| curve.delay_cost().cost_secs(t);
        let (mut saving, mut saved_cost, mut extra) = (0.0, 0.0, 0.0);
        for &first in &points {
            if first <= d {
                continue;
            }
            for &second in &points {
                // The hedge answers at d + second; the first at `first`.
                let hedged = d + second;
                if hedged < first {
                    saving += first - hedged;
                    // Read off the class's curve: a curve flat at first and
                    // steep in the tail prices the tail, not the start.
                    saved_cost += cost(first) - cost(hedged);
                }
                // The hedge holds a replica until one of them answers.
                extra += second.min(first - d);
            }
        }
        let pairs = (points.len() * points.len()).max(1) as f64;
        saving /= pairs;
        saved_cost /= pairs;
        extra /= pairs;
        Some(HedgePlan {
            delay,
            worth_it: saving > 0.0 && saved_cost > self.replica_second() * extra,
            saving,
            extra,
        })
    }

    /// What a second of replica time taken by a copy is worth to the other
    /// calls: the model's `slot_second`, or — when more — the mean urgency
    /// of the calls this client makes (of every class, the copy's own
    /// included: its replica time is taken from all of them).
    fn replica_second(&self) -> f64 {
        let (mut n, mut weighted) = (0.0, 0.0);
        for (count, urgency) in self.seen.iter().zip(&self.urgency) {
            let c = count.load(std::sync::atomic::Ordering::Relaxed) as f64;
            n += c;
            weighted += c * urgency;
        }
        let mix = if n > 0.0 { weighted / n } else { 0.0 };
        self.slot_price.max(mix)
    }

    fn class_of<B>(&self, request: &Request<B>) -> usize {
        CallContext::of(request.extensions())
            .and_then(|c| c.with_class_name(|name| self.by_name.get(name?).copied()))
            .unwrap_or(self.default)
    }
}

/// Hedges slow calls of the classes whose delay cost pays for it. See the
/// [module docs](self). Clones of the layer, and the services it makes,
/// share what they learn and one budget.
#[derive(Clone, Debug)]
pub struct HedgeLayer {
    shared: Arc<Shared>,
}

impl HedgeLayer {
    /// Hedges calls of the classes of the caller's `model`.
    ///
    /// # Errors
    ///
    /// A quantile outside 0 to 1, a share outside 0 to 1, or a window
    /// shorter than a second.
    pub fn new(model: &CostModel, config: HedgeConfig) -> Result<Self, HedgeConfigError> {
        if !(0.0..=1.0).contains(&config.quantile) {
            return Err(HedgeConfigError("quantile must be 0 to 1"));
        }
        if !(0.0..=1.0).contains(&config.max_share) {
            return Err(HedgeConfigError("max_share must be 0 to 1"));
        }
        if config.window < Duration::from_secs(1) {
            return Err(HedgeConfigError("window must be at least 1 s"));
        }
        if config.max_refused_share.is_nan() {
            return Err(HedgeConfigError("max_refused_share must be a number"));
        }
        let classes = (0..model.len())
            .map(|_| {
                Mutex::new(ClassStats {
                    latencies: LatencyWindow::new(config.window, 6),
                    plan: None,
                    since_plan: 0,
                })
            })
            .collect();
        Ok(Self {
            shared: Arc::new(Shared {
                by_name: model
                    .iter()
                    .map(|(id, name, _)| (name.to_owned(), id.index()))
                    .collect(),
                default: model.default_class().index(),
                urgency: model.iter().map(|(_, _, c)| c.urgency(0.0)).collect(),
                curves: model.iter().map(|(_, _, c)| c.clone()).collect(),
                counter: std::sync::atomic::AtomicU64::new(0),
                slot_price: model.prices().slot_second,
                seen: (0..model.len())
                    .map(|_| std::sync::atomic::AtomicU64::new(0))
                    .collect(),
                classes,
                // No floor: hedges only ever come out of calls made.
                budget: TpsBudget::new(Duration::from_secs(10), 0, config.max_share),
                refusals: Tally::new(config.window),
                config,
            }),
        })
    }

    /// The hedging plan of the class named `class`, once it has enough
    /// latencies to judge by.
    pub fn plan(&self, class: &str) -> Option<HedgePlan> {
        let k = *self.shared.by_name.get(class)?;
        self.shared.classes[k]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .plan
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Hedge<S> {
        Hedge {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of [`HedgeLayer`]. Its error is a [`BoxError`].
#[derive(Clone, Debug)]
pub struct Hedge<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Safe methods only: two copies of a `PUT` or `DELETE` run at once on two
/// replicas can answer differently (a `404` for a delete that succeeded)
/// or land in either order.
fn safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Whichever of two attempts answers first — unless it failed: a copy that
/// fails fast must not beat a call about to succeed. Both failed: the
/// first's answer. The other is dropped with the caller's future,
/// cancelled.
async fn race<RB>(
    mut first: Pin<&mut impl Future<Output = Result<Response<RB>, BoxError>>>,
    mut second: Pin<&mut impl Future<Output = Result<Response<RB>, BoxError>>>,
) -> Result<Response<RB>, BoxError> {
    let mut failed: [Option<Result<Response<RB>, BoxError>>; 2] = [None, None];
    std::future::poll_fn(|cx| {
        if failed[0].is_none()
            && let Poll::Ready(out) = first.as_mut().poll(cx)
        {
            if !unanswered(&out) {
                return Poll::Ready(out);
            }
            failed[0] = Some(out);
        }
        if failed[1].is_none()
            && let Poll::Ready(out) = second.as_mut().poll(cx)
        {
            if !unanswered(&out) {
                return Poll::Ready(out);
            }
            failed[1] = Some(out);
        }
        match (failed[0].take(), failed[1].take()) {
            (Some(a), Some(_)) => Poll::Ready(a),
            (a, b) => {
                failed = [a, b];
                Poll::Pending
            }
        }
    })
    .await
}

/// Whether an attempt failed: an error, a 5xx, a 429, or gRPC
/// `RESOURCE_EXHAUSTED` / `UNAVAILABLE` in the head.
fn unanswered<B>(outcome: &Result<Response<B>, BoxError>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(r) => r.status().is_server_error() || refused(outcome),
    }
}

/// Whether the servers refused (for the overload gate): an error — a
/// timeout or a connection refused are what overload looks like from here
/// too — a 503, a 429, or gRPC `RESOURCE_EXHAUSTED` / `UNAVAILABLE`.
fn refused<B>(outcome: &Result<Response<B>, BoxError>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(r) => {
            matches!(
                r.status(),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) || matches!(
                gratify_core::refusal::grpc_status(r.headers()),
                Some(8 | 14)
            )
        }
    }
}

impl<S, B, RB> Service<Request<B>> for Hedge<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Clone + Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        // The caller's context travels on the request itself: the copy is
        // sent from inside this future, where the task's may not be set.
        CallContext::attach(&mut request);
        let k = shared.class_of(&request);
        if let Some(seen) = shared.seen.get(k) {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        shared.budget.deposit();
        let plan = if safe(request.method()) {
            shared.classes[k]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .plan
        } else {
            None
        };
        // One call in sixteen of a class worth hedging goes without a copy:
        // the plan learns from calls hedging did not shorten.
        let sample = plan.is_some_and(|p| p.worth_it)
            && shared
                .counter
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(16);
        let hedge = plan.filter(|p| p.worth_it && !sample);
        // Learn from this call unless a copy may shorten it.
        let learn = hedge.is_none();
        let copy = hedge.map(|_| request.clone());
        let started = tokio::time::Instant::now();
        let first = self.inner.call(request);
        let mut service = self.inner.clone();
        Box::pin(async move {
            let mut first = pin!(async move { first.await.map_err(Into::into) });
            let outcome: Result<Response<RB>, BoxError> = match (hedge, copy) {
                (Some(plan), Some(copy)) => {
                    let sleep = tokio::time::sleep(plan.delay);
                    let mut sleep = pin!(sleep);
                    let early = std::future::poll_fn(|cx| {
                        if let Poll::Ready(out) = first.as_mut().poll(cx) {
                            return Poll::Ready(Some(out));
                        }
                        sleep.as_mut().poll(cx).map(|()| None)
                    })
                    .await;
                    match early {
                        Some(out) => out,
                        None if !shared.overloaded() && shared.budget.withdraw() => {
                            // A slot for the copy (the balancer chooses
                            // again) — while the first call may still answer.
                            let ready = std::future::poll_fn(|cx| {
                                if let Poll::Ready(out) = first.as_mut().poll(cx) {
                                    return Poll::Ready(Err(out));
                                }
                                service.poll_ready(cx).map(|r| Ok(r.map_err(Into::into)))
                            })
                            .await;
                            match ready {
                                Err(answered) => answered,
                                Ok(Err(_)) => first.await,
                                Ok(Ok(())) => {
                                    let second = service.call(copy);
                                    let mut second =
                                        pin!(async move { second.await.map_err(Into::into) });
                                    race(first.as_mut(), second.as_mut()).await
                                }
                            }
                        }
                        None => first.await,
                    }
                }
                _ => first.await,
            };
            shared.count(refused(&outcome));
            if learn && outcome.is_ok() {
                shared.record(k, started.elapsed());
            }
            outcome
        })
    }
}
