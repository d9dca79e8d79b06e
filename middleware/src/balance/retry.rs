//! Retries that never amplify an overload.
//!
//! [`RetryLayer`] retries a failed call on a client, within three bounds:
//!
//! - a **retry budget** (Finagle's; tower's [`TpsBudget`]): retries add at
//!   most [`RetryConfig::retry_ratio`] of the calls made over the last
//!   [`RetryConfig::budget_window`], plus [`RetryConfig::min_retries_per_second`]
//!   so a quiet client can still retry. Under an overload, when most calls
//!   fail, retries stay a small share of the load instead of doubling it;
//! - **client-side throttling** (Google SRE's adaptive throttle): over the
//!   last [`RetryConfig::throttle_window`] the client counts its calls and
//!   the ones the servers accepted, and refuses a new call locally, before
//!   it is sent, with probability
//!   `max(0, (calls − K·accepts) / (calls + 1))` ([`Throttled`]), at most
//!   [`RetryConfig::max_throttle`] (as Envoy's admission control caps it):
//!   a server that refuses every call receives a tenth of them, enough to
//!   see it recover within a window or two;
//! - the **deadline**: no retry once the request being served
//!   ([`CallContext`]) has no time left, or when the server asked to be left
//!   alone (`Retry-After`, `grpc-retry-pushback-ms`) for longer than is
//!   left. Otherwise a retry waits out the pushback first.
//!
//! What is retried: a refusal that says the call was never processed (a
//! gratify limiter's `503` with `x-gratify-shed`, a `429`) for any method;
//! other `502`/`503`/`504`, gRPC `RESOURCE_EXHAUSTED` and `UNAVAILABLE`
//! and transport errors only for idempotent methods (`GET`, `HEAD`,
//! `OPTIONS`, `PUT`, `DELETE`, `TRACE`) — a `POST` that may have been
//! processed is never sent twice.
//!
//! Put it above the balancer, so that each attempt is a new choice of
//! replica, and above [`PropagateLayer`](super::PropagateLayer), so that
//! each attempt carries the time then left:
//! `RetryLayer → PropagateLayer → Buffer → CostBalance`.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use gratify::balance::retry::{RetryConfig, RetryLayer};
//! use http::{Request, Response, StatusCode};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), gratify::BoxError> {
//! // A replica that is overloaded the first time it is asked.
//! let calls = Arc::new(AtomicU32::new(0));
//! let seen = Arc::clone(&calls);
//! let flaky = service_fn(move |_: Request<()>| {
//!     let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
//!     async move {
//!         let mut response = Response::new(());
//!         if first {
//!             *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
//!         }
//!         Ok::<_, std::convert::Infallible>(response)
//!     }
//! });
//! let client = RetryLayer::new(RetryConfig::default())?.layer(flaky);
//! let response = client.oneshot(Request::get("/stock/7").body(())?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use gratify_core::BoxError;
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower_layer::Layer;
use tower_service::Service;

use super::CallContext;
use super::tally::Tally;

/// The bounds of [`RetryLayer`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts per call, the first included (default 2: one retry).
    pub max_attempts: u32,
    /// The share of calls retries may add (default 0.1). tower's budget
    /// spends a whole number of deposits per retry, so the ratio is rounded
    /// to `1/n` (0.15 acts as 1/6, anything above 0.5 and up to 1 as 1).
    pub retry_ratio: f32,
    /// Retries allowed per second whatever the ratio (default 10).
    pub min_retries_per_second: u32,
    /// The window the budget counts calls over (default 10 s; 1 s to 60 s).
    pub budget_window: Duration,
    /// The adaptive throttle's `K` (default 2: the client sends up to
    /// twice what the servers accept; 0 turns the throttle off; otherwise
    /// above 1).
    pub throttle_k: f64,
    /// The largest share of calls the throttle refuses (default 0.9).
    pub max_throttle: f64,
    /// The window the throttle counts over (default 2 min).
    pub throttle_window: Duration,
    /// The longest pushback waited before a retry (default 1 s): a server
    /// asking for more gets no retry.
    pub max_pushback: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            retry_ratio: 0.1,
            min_retries_per_second: 10,
            budget_window: Duration::from_secs(10),
            throttle_k: 2.0,
            max_throttle: 0.9,
            throttle_window: Duration::from_secs(120),
            max_pushback: Duration::from_secs(1),
        }
    }
}

/// A [`RetryConfig`] out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry setting: {0}")]
pub struct RetryConfigError(&'static str);

/// A call refused by the client itself: the servers have been refusing
/// most calls lately (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("call throttled by the client: the servers are refusing most calls")]
pub struct Throttled(());

/// The adaptive throttle: calls and accepts over a sliding window.
#[derive(Debug)]
struct Throttle {
    k: f64,
    cap: f64,
    /// Calls, marked when the servers accepted them.
    tally: Tally,
}

impl Throttle {
    fn new(k: f64, cap: f64, window: Duration) -> Self {
        Self {
            k,
            cap,
            tally: Tally::new(window),
        }
    }

    /// The probability of refusing the next call locally.
    fn reject_probability(&self) -> f64 {
        if self.k <= 0.0 {
            return 0.0;
        }
        let (calls, accepts) = self.tally.totals();
        let (calls, accepts) = (calls as f64, accepts as f64);
        ((calls - self.k * accepts) / (calls + 1.0)).clamp(0.0, self.cap)
    }

    fn record(&self, accepted: bool) {
        self.tally.record(accepted);
    }
}

#[derive(Debug)]
struct Shared {
    config: RetryConfig,
    budget: TpsBudget,
    throttle: Throttle,
    rng: Mutex<fastrand::Rng>,
}

/// Retries failed calls within a budget, a throttle and the deadline. See
/// the [module docs](self). Clones of the layer, and the services it
/// makes, share one budget and one throttle.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// A layer with `config`.
    ///
    /// # Errors
    ///
    /// A window outside 1 s to 60 s, a ratio outside 0 to 10, no attempt at
    /// all, a `K` that is neither 0 nor above 1, a throttle cap outside 0 to
    /// 1, or a pushback beyond an hour.
    pub fn new(config: RetryConfig) -> Result<Self, RetryConfigError> {
        Self::with_seed(config, fastrand::u64(..))
    }

    /// [`new`](Self::new), with the throttle's coin seeded (reproducible
    /// runs).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn with_seed(config: RetryConfig, seed: u64) -> Result<Self, RetryConfigError> {
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&config.budget_window) {
            return Err(RetryConfigError("budget_window must be 1 s to 60 s"));
        }
        if !(0.0..=10.0).contains(&config.retry_ratio) {
            return Err(RetryConfigError("retry_ratio must be 0 to 10"));
        }
        if config.max_attempts == 0 {
            return Err(RetryConfigError("max_attempts must be at least 1"));
        }
        // Calls refused locally count as calls: with K at 1 or below the
        // throttle would refuse nine in ten calls to a healthy server.
        if !(config.throttle_k == 0.0 || (config.throttle_k.is_finite() && config.throttle_k > 1.0))
        {
            return Err(RetryConfigError(
                "throttle_k must be 0 (off) or a number above 1",
            ));
        }
        if config.max_pushback > Duration::from_secs(3600) {
            return Err(RetryConfigError("max_pushback must be at most an hour"));
        }
        if !(0.0..=1.0).contains(&config.max_throttle) {
            return Err(RetryConfigError("max_throttle must be 0 to 1"));
        }
        if config.min_retries_per_second >= i32::MAX as u32 {
            return Err(RetryConfigError("min_retries_per_second is too large"));
        }
        let budget = TpsBudget::new(
            config.budget_window,
            config.min_retries_per_second,
            config.retry_ratio,
        );
        let throttle = Throttle::new(
            config.throttle_k,
            config.max_throttle,
            config.throttle_window,
        );
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                budget,
                throttle,
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            }),
        })
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of [`RetryLayer`]. Its error is a [`BoxError`]: the inner
/// service's, or [`Throttled`].
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What an attempt's outcome allows.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Done: return it.
    Final,
    /// A retry would be safe, after this pushback.
    Retry(Duration),
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The pushback a response asks for: `grpc-retry-pushback-ms`, or
/// `Retry-After` in seconds. `Some(MAX)` for a pushback that says never.
fn pushback<B>(response: &Response<B>) -> Option<Duration> {
    let headers = response.headers();
    if let Some(v) = headers.get("grpc-retry-pushback-ms") {
        // A negative or malformed value means "do not retry".
        return Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map_or(Duration::MAX, Duration::from_millis),
        );
    }
    // A date (or anything but seconds) asks for a wait this client does not
    // work out: read as "not soon".
    headers.get(http::header::RETRY_AFTER).map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(Duration::MAX, Duration::from_secs)
    })
}

/// Whether the servers accepted the call (for the throttle): anything but
/// an overload refusal.
fn accepted<B, E>(outcome: &Result<Response<B>, E>) -> bool {
    match outcome {
        Err(_) => false,
        Ok(r) => {
            !matches!(
                r.status(),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) && !matches!(grpc_status(r), Some(8 | 14))
        }
    }
}

fn grpc_status<B>(response: &Response<B>) -> Option<u32> {
    gratify_core::refusal::grpc_status(response.headers())
}

fn verdict<B, E>(method: &Method, outcome: &Result<Response<B>, E>) -> Verdict {
    let idempotent = idempotent(method);
    let Ok(response) = outcome else {
        return if idempotent {
            Verdict::Retry(Duration::ZERO)
        } else {
            Verdict::Final
        };
    };
    // Only a limiter's own refusal (its 503 and header together) or a 429
    // says the call was never processed. gRPC RESOURCE_EXHAUSTED may be an
    // application's quota hit after partial work: idempotent calls only.
    let never_processed = (response.status() == StatusCode::SERVICE_UNAVAILABLE
        && response
            .headers()
            .contains_key(gratify_scaling::limit::SHED_REASON_HEADER))
        || response.status() == StatusCode::TOO_MANY_REQUESTS;
    // Refused because the caller's deadline leaves no time: a retry is
    // refused the same way (or sent to a caller who has gone).
    let out_of_time = response
        .headers()
        .get(gratify_scaling::limit::SHED_REASON_HEADER)
        .is_some_and(|r| r.as_bytes() == b"deadline")
        || grpc_status(response) == Some(4);
    if out_of_time {
        return Verdict::Final;
    }
    let maybe_processed = matches!(
        response.status(),
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    ) || matches!(grpc_status(response), Some(8 | 14));
    if never_processed || (maybe_processed && idempotent) {
        Verdict::Retry(pushback(response).unwrap_or(Duration::ZERO))
    } else {
        Verdict::Final
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
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
        // The caller's context travels on the request itself: retries are
        // sent from inside this future, where the task's may not be set.
        CallContext::attach(&mut request);
        // The client refuses the call itself while the servers refuse most.
        let p = shared.throttle.reject_probability();
        if p > 0.0
            && shared
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .f64()
                < p
        {
            // Counted as a call the servers did not accept: the throttle
            // eases only as accepted calls come back.
            shared.throttle.record(false);
            return Box::pin(async { Err(Throttled(()).into()) });
        }
        shared.budget.deposit();
        // Attached above: the request's context is the call's.
        let deadline = request
            .extensions()
            .get::<CallContext>()
            .and_then(CallContext::deadline);
        let method = request.method().clone();
        // The first attempt uses the service made ready; later ones a clone.
        let spare = (shared.config.max_attempts > 1).then(|| request.clone());
        let first = self.inner.call(request);
        let mut service = self.inner.clone();
        Box::pin(async move {
            let mut outcome: Result<Response<RB>, BoxError> = first.await.map_err(Into::into);
            let mut attempts = 1;
            let mut spare = spare;
            loop {
                // A call that never left (its deadline had passed) says
                // nothing of the servers.
                let local = outcome
                    .as_ref()
                    .err()
                    .is_some_and(|e| e.is::<super::DeadlineExceeded>());
                if !local {
                    shared.throttle.record(accepted(&outcome));
                }
                let Verdict::Retry(wait) = verdict(&method, &outcome) else {
                    break;
                };
                let Some(request) = spare.take() else {
                    break;
                };
                if attempts >= shared.config.max_attempts || wait > shared.config.max_pushback {
                    break;
                }
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now().into_std()));
                if left.is_some_and(|left| left <= wait) {
                    break;
                }
                if !shared.budget.withdraw() {
                    break;
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                if attempts + 1 < shared.config.max_attempts {
                    spare = Some(request.clone());
                }
                attempts += 1;
                let ready: Result<(), BoxError> = std::future::poll_fn(|cx| service.poll_ready(cx))
                    .await
                    .map_err(Into::into);
                outcome = match ready {
                    Ok(()) => service.call(request).await.map_err(Into::into),
                    Err(e) => Err(e),
                };
            }
            outcome
        })
    }
}
