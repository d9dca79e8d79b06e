use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gratify_core::classify::{arrived_of, class_of, propagated_of};
use gratify_core::refusal::{RefusalBody, Refused};
use gratify_core::{BoxError, ClassId, CostModel};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::pool::{CpuPool, OffloadError, block_on};

/// Run times kept for at most this many routes (and classes); the least
/// recently updated goes first.
const MAX_KEYS: usize = 1024;

/// A learned run time refuses work by itself (a job that could not finish
/// in what is left of its budget) only while it is this fresh: a route
/// whose first run was slow (a cold cache) is not refused for ever on that
/// one figure.
const FRESH: Duration = Duration::from_secs(10);

/// Learned run times: per route template or class, bounded, evicting.
#[derive(Debug, Default)]
struct RunTimes {
    /// Seconds (EWMA), when each was last updated (a counter, for
    /// eviction) and at what time.
    keys: HashMap<String, (f64, u64, Option<Instant>)>,
    clock: u64,
}

impl RunTimes {
    fn get(&self, key: &str) -> Option<f64> {
        self.keys.get(key).map(|(t, ..)| *t)
    }

    /// The run time, if it was learned within [`FRESH`].
    fn fresh(&self, key: &str, now: Instant) -> Option<f64> {
        self.keys
            .get(key)
            .filter(|(.., at)| at.is_some_and(|at| now.saturating_duration_since(at) < FRESH))
            .map(|(t, ..)| *t)
    }

    fn learn(&mut self, key: &str, took: f64) {
        self.clock += 1;
        let clock = self.clock;
        let now = Some(Instant::now());
        if let Some((t, at, when)) = self.keys.get_mut(key) {
            *t += (took - *t) * 0.1;
            *at = clock;
            *when = now;
            return;
        }
        if self.keys.len() >= MAX_KEYS {
            // Rare with templates for keys (a route table is small); a scan
            // then is cheaper than keeping an order on every update.
            if let Some(oldest) = self
                .keys
                .iter()
                .min_by_key(|(_, (_, at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                self.keys.remove(&oldest);
            }
        }
        self.keys.insert(key.to_owned(), (took, clock, now));
    }
}

/// What a request's run time is learned under: its route template (axum's
/// `MatchedPath`, with the `axum` feature), else its class — never the raw
/// path, which clients choose (`/users/{id}` is one route, not a million).
fn route_key<B>(request: &Request<B>, class: ClassId) -> String {
    #[cfg(feature = "axum")]
    if let Some(path) = request.extensions().get::<axum::extract::MatchedPath>() {
        return format!("route:{}", path.as_str());
    }
    #[cfg(not(feature = "axum"))]
    let _ = request;
    format!("class:{}", class.index())
}

/// Runs closures on a [`CpuPool`] by the cost of delaying their class.
/// Cloning shares the pool.
#[derive(Clone)]
pub struct Offloader {
    pool: CpuPool,
    model: CostModel,
    /// Expected run time per route template or class.
    expected: Arc<Mutex<RunTimes>>,
    /// How [`Offload`]'s refusals are written.
    refusal_body: RefusalBody,
}

impl fmt::Debug for Offloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offloader")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Offloader {
    /// An offloader over `pool`, prioritising by `model`'s classes.
    pub fn new(pool: CpuPool, model: &CostModel) -> Self {
        Self {
            pool,
            model: model.clone(),
            expected: Arc::new(Mutex::new(RunTimes::default())),
            refusal_body: RefusalBody::text(),
        }
    }

    /// Writes the bodies of [`Offload`]'s refusals with `body` (plain text
    /// by default; use the same as the limit's, so that every refusal looks
    /// alike).
    #[must_use]
    pub fn refusal_body(mut self, body: RefusalBody) -> Self {
        self.refusal_body = body;
        self
    }

    /// The pool.
    pub fn pool(&self) -> &CpuPool {
        &self.pool
    }

    fn expected(&self, key: &str) -> f64 {
        self.expected
            .lock()
            .ok()
            .and_then(|m| m.get(key))
            .unwrap_or_else(|| self.pool.mean_run().as_secs_f64())
            .max(1e-6)
    }

    fn learn(&self, key: &str, took: Duration) {
        if let Ok(mut m) = self.expected.lock() {
            m.learn(key, took.as_secs_f64());
        }
    }

    /// The priority (urgency ÷ expected run time), expected run time and
    /// deadline of a job of `class` keyed `key` that arrived at `arrived`.
    fn plan(
        &self,
        class: ClassId,
        key: &str,
        arrived: Option<Instant>,
        due: Option<Instant>,
    ) -> (f64, Duration, Option<Instant>) {
        let class = self
            .model
            .get(class)
            .unwrap_or_else(|| self.model.class(self.model.default_class()));
        let run = self.expected(key);
        let now = Instant::now();
        let own = class
            .deadline()
            .and_then(|d| arrived.unwrap_or(now).checked_add(d));
        // A trusted caller's deadline (propagated) bounds it too.
        let deadline = match (own, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Only a fresh run time may refuse a job on its own.
        let fresh = self
            .expected
            .lock()
            .ok()
            .and_then(|m| m.fresh(key, now))
            .unwrap_or(0.0);
        (
            class.urgency(run) / run,
            Duration::try_from_secs_f64(fresh).unwrap_or(Duration::MAX),
            deadline,
        )
    }

    /// Runs `work` for a request of `class` on the pool.
    ///
    /// # Errors
    ///
    /// [`OffloadError`] when refused or when `work` panics.
    pub async fn run<T, F>(&self, class: ClassId, work: F) -> Result<T, OffloadError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.run_keyed(class, format!("class:{}", class.index()), None, None, work)
            .await
    }

    async fn run_keyed<T, F>(
        &self,
        class: ClassId,
        key: String,
        arrived: Option<Instant>,
        due: Option<Instant>,
        work: F,
    ) -> Result<T, OffloadError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (priority, expected, deadline) = self.plan(class, &key, arrived, due);
        // Learn the run time alone, not the wait in the queue.
        let timed = move || {
            let started = Instant::now();
            let out = work();
            (out, started.elapsed())
        };
        let (out, took) = self
            .pool
            .run_until(priority, deadline, expected, timed)
            .await?;
        self.learn(&key, took);
        Ok(out)
    }

    /// Runs `work` with the class a `ClassifyLayer` put on `request`,
    /// within what is left of its deadline (counted from its arrival), its
    /// run time learned under its route template.
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run).
    pub async fn run_for<B, T, F>(&self, request: &Request<B>, work: F) -> Result<T, OffloadError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let class = class_of(request).unwrap_or_else(|| self.model.default_class());
        let key = route_key(request, class);
        let due = propagated_of(request).and_then(|p| p.deadline);
        self.run_keyed(class, key, arrived_of(request), due, work)
            .await
    }
}

/// Runs a service's request futures on a [`CpuPool`]; see the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct OffloadLayer {
    offloader: Offloader,
}

impl OffloadLayer {
    /// Offloads to `pool`, prioritising by `model`.
    pub fn new(pool: CpuPool, model: &CostModel) -> Self {
        Self {
            offloader: Offloader::new(pool, model),
        }
    }

    /// Writes the bodies of refusals with `body`; see
    /// [`Offloader::refusal_body`].
    #[must_use]
    pub fn refusal_body(mut self, body: RefusalBody) -> Self {
        self.offloader = self.offloader.refusal_body(body);
        self
    }

    /// The offloader (the same pool), for handlers.
    pub fn offloader(&self) -> &Offloader {
        &self.offloader
    }
}

impl<S> Layer<S> for OffloadLayer {
    type Service = Offload<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Offload {
            inner,
            offloader: self.offloader.clone(),
        }
    }
}

/// The service of [`OffloadLayer`].
#[derive(Clone, Debug)]
pub struct Offload<S> {
    inner: S,
    offloader: Offloader,
}

impl<S> Offload<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pin_project! {
    /// The inner body, or the short text of a refusal or failure.
    pub struct OffloadBody<B> {
        #[pin]
        inner: Option<B>,
        text: Option<Bytes>,
    }
}

impl<B> OffloadBody<B> {
    fn inner(body: B) -> Self {
        Self {
            inner: Some(body),
            text: None,
        }
    }

    fn text(text: Bytes) -> Self {
        Self {
            inner: None,
            text: Some(text),
        }
    }
}

impl<B> Body for OffloadBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(inner) => {
                let frame = ready!(inner.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            None => Poll::Ready(this.text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(b) => b.is_end_stream(),
            None => self.text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(self.text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl<B> fmt::Debug for OffloadBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OffloadBody").finish_non_exhaustive()
    }
}

/// The reason an answer names when the pool refused the job (`None`: it
/// failed, it was not refused).
fn refusal_reason(error: &OffloadError) -> Option<&'static str> {
    match error {
        OffloadError::Panicked => None,
        OffloadError::QueueFull => Some("offload-queue-full"),
        OffloadError::Deadline => Some("offload-deadline"),
        OffloadError::Shutdown => Some("shutting-down"),
    }
}

/// The answer for a job the pool refused or lost, in the one shape of every
/// refusal (see [`gratify_core::refusal`]): 503, `Retry-After`,
/// `Cache-Control: no-store`, `x-gratify-shed` naming the reason, and the
/// body the offloader's [`RefusalBody`] writes — so a client or a dashboard
/// cannot tell who refused by the form of the answer. A job lost to a panic
/// is a 500 with neither `Retry-After` nor a reason.
fn failure<B>(
    body: &RefusalBody,
    error: &OffloadError,
    retry: Duration,
) -> Response<OffloadBody<B>> {
    let refused = match refusal_reason(error) {
        Some(reason) => Refused::shed("offload", reason, retry),
        None => Refused::internal("offload"),
    };
    body.response(&refused, OffloadBody::text)
}

impl<S, B, RB> Service<Request<B>> for Offload<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<OffloadBody<RB>>;
    type Error = S::Error;
    type Future = gratify_core::BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let offloader = self.offloader.clone();
        let class = class_of(&request).unwrap_or_else(|| offloader.model.default_class());
        let key = route_key(&request, class);
        let due = propagated_of(&request).and_then(|p| p.deadline);
        let (priority, expected, deadline) = offloader.plan(class, &key, arrived_of(&request), due);
        let future = self.inner.call(request);
        let runtime = tokio::runtime::Handle::try_current().ok();
        // The handler runs on a pool thread: the calls it makes there carry
        // the request's class and deadline all the same.
        let context = crate::balance::CallContext::current();
        Box::pin(async move {
            let job = offloader
                .pool
                .run_until(priority, deadline, expected, move || {
                    // Timers and I/O inside the handler still reach the runtime.
                    let _guard = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    let started = Instant::now();
                    let out = match context {
                        Some(context) => block_on(context.scope(future)),
                        None => block_on(future),
                    };
                    (out, started.elapsed())
                });
            let outcome = job.await.map(|(out, took)| {
                // The run time alone, not the wait in the queue.
                offloader.learn(&key, took);
                out
            });
            match outcome {
                Ok(Ok(response)) => Ok(response.map(OffloadBody::inner)),
                Ok(Err(e)) => Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "offload refused or failed");
                    #[cfg(feature = "metrics")]
                    if let Some(reason) = refusal_reason(&e) {
                        // Every refusal, whoever refused, in one counter.
                        metrics::counter!(
                            gratify_core::telemetry::REFUSED_TOTAL.name,
                            "by" => "offload",
                            "class" => offloader.model.name(class).to_owned(),
                            "reason" => reason
                        )
                        .increment(1);
                    }
                    let retry = offloader.pool.predicted_wait(priority);
                    Ok(failure(&offloader.refusal_body, &e, retry))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_times_stay_bounded_and_forget_the_least_recent() {
        let mut t = RunTimes::default();
        t.learn("hot", 0.5);
        for i in 0..10 * MAX_KEYS {
            t.learn(&format!("k{i}"), 0.001);
            // A key in use stays.
            t.learn("hot", 0.5);
        }
        assert_eq!(t.keys.len(), MAX_KEYS);
        assert_eq!(t.get("hot"), Some(0.5));
        assert_eq!(t.get("k0"), None);
        assert!(t.get(&format!("k{}", 10 * MAX_KEYS - 1)).is_some());
    }

    #[test]
    fn raw_paths_are_never_keys() {
        let class = ClassId::from_index(3);
        let key = |path: &str| route_key(&Request::get(path).body(()).unwrap(), class);
        assert_eq!(key("/recommendations/alice"), key("/recommendations/bob"));
        assert_eq!(key("/recommendations/alice"), "class:3");
    }

    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn under_axum_the_route_template_is_the_key() {
        use tower::ServiceExt;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/recommendations/{user}",
            axum::routing::get(move |req: Request<axum::body::Body>| {
                let log = Arc::clone(&log);
                async move {
                    log.lock()
                        .unwrap()
                        .push(route_key(&req, ClassId::from_index(0)));
                    ""
                }
            }),
        );
        for user in ["alice", "bob"] {
            let req = Request::get(format!("/recommendations/{user}"))
                .body(axum::body::Body::empty())
                .unwrap();
            app.clone().oneshot(req).await.unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(*seen, ["route:/recommendations/{user}"; 2]);
    }
}
