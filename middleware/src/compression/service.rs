use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use gratify_core::classify::class_of;
use gratify_core::encoding::{Accepted, compressible};
use gratify_core::{CostModel, LoadSignal};
use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, HeaderValue, VARY,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{CompressionBody, Offload};
use super::encoder::Encoder;
use super::{Calibration, Choice, Codec, CompressionConfig, Level, adaptive, slot};

struct Shared {
    config: CompressionConfig,
    /// Swapped whole by `reload`.
    model: Option<gratify_core::SharedModel>,
    signal: Option<LoadSignal>,
    calibration: Arc<Calibration>,
    cpu: super::CpuGauge,
}

/// Compresses responses; see the [module docs](super). Cloning shares the
/// settings and the learned calibration.
#[derive(Clone)]
pub struct CompressionLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CompressionLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressionLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Default for CompressionLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CompressionLayer {
    /// Every codec this build has, at fixed default levels.
    pub fn new() -> Self {
        Self::with_config(CompressionConfig::default())
    }

    /// The given settings, without a cost model (adaptive levels then price
    /// CPU and bytes at zero and only weigh latency).
    pub fn with_config(config: CompressionConfig) -> Self {
        Self::build(config, None, None)
    }

    /// Adaptive levels priced by `model` (CPU and byte prices, class cost
    /// rates) and the load on `signal`.
    pub fn adaptive(model: &CostModel, signal: LoadSignal) -> Self {
        let config = CompressionConfig {
            level: Level::Adaptive,
            ..CompressionConfig::default()
        };
        Self::build(config, Some(model.clone()), Some(signal))
    }

    /// Like [`adaptive`](Self::adaptive), with other settings.
    pub fn adaptive_with_config(
        config: CompressionConfig,
        model: &CostModel,
        signal: LoadSignal,
    ) -> Self {
        Self::build(config, Some(model.clone()), Some(signal))
    }

    fn build(
        config: CompressionConfig,
        model: Option<CostModel>,
        signal: Option<LoadSignal>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                model: model.map(gratify_core::SharedModel::new),
                signal,
                calibration: Arc::new(Calibration::new()),
                cpu: super::CpuGauge::default(),
            }),
        }
    }

    /// Disables a codec (available whatever the features).
    #[must_use]
    pub fn no(self, codec: Codec) -> Self {
        let mut config = self.shared.config.clone();
        config.codecs.retain(|c| *c != codec);
        Self::build(config, self.shared.model(), self.shared.signal.clone())
    }

    /// The learned figures, shared (for a recoder that counts in them).
    pub(crate) fn calibration(&self) -> Arc<Calibration> {
        Arc::clone(&self.shared.calibration)
    }

    /// What this layer (and every clone and service it made) has compressed,
    /// and what it has learned of each codec and level.
    pub fn stats(&self) -> super::CompressionStats {
        self.shared.calibration.stats()
    }

    /// Takes new costs and prices (same classes) at run time; responses
    /// started before keep the old ones. A layer without a model ignores it.
    ///
    /// # Errors
    ///
    /// The new model has other classes or another default class.
    pub fn reload(&self, model: &CostModel) -> Result<(), gratify_core::ModelError> {
        match &self.shared.model {
            Some(current) => current.reload(model),
            None => Ok(()),
        }
    }
}

impl Shared {
    /// The current model (a cheap clone).
    fn model(&self) -> Option<CostModel> {
        self.model.as_ref().map(gratify_core::SharedModel::get)
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = Compression<S>;

    fn layer(&self, inner: S) -> Compression<S> {
        Compression {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of [`CompressionLayer`].
#[derive(Clone)]
pub struct Compression<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Compression<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compression").finish_non_exhaustive()
    }
}

impl<S> Compression<S> {
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

/// What the request decided before the response: the acceptable codecs (best
/// tier first), whether identity is fine, the delay-cost rate of the class.
struct Plan {
    ranked: Vec<Codec>,
    identity_ok: bool,
    head: bool,
    delay_rate: f64,
}

impl<S, B, RB> Service<Request<B>> for Compression<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Body,
{
    type Response = Response<CompressionBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let accepted = Accepted::parse(request.headers());
        let offered: Vec<&'static str> =
            self.shared.config.codecs.iter().map(|c| c.name()).collect();
        let all = accepted.ranked(&offered);
        // The client's most preferred q-value tier.
        let top = all.first().map(|c| accepted.q(c));
        let ranked = all
            .into_iter()
            .filter(|c| Some(accepted.q(c)) == top)
            .filter_map(Codec::from_name)
            .collect();
        let delay_rate = match &self.shared.model() {
            Some(model) => {
                let id = class_of(&request).unwrap_or_else(|| model.default_class());
                model.get(id).map_or(0.0, |c| c.urgency(0.0))
            }
            None => 0.0,
        };
        let plan = Plan {
            ranked,
            identity_ok: accepted.identity_ok(),
            head: request.method() == Method::HEAD,
            delay_rate,
        };
        ResponseFuture {
            inner: self.inner.call(request),
            plan: Some(plan),
            shared: Arc::clone(&self.shared),
        }
    }
}

pin_project! {
    /// Future for the [`Compression`] service.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        plan: Option<Plan>,
        shared: Arc<Shared>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body,
{
    type Output = Result<Response<CompressionBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let Some(plan) = this.plan.take() else {
            return Poll::Ready(Ok(response.map(CompressionBody::identity)));
        };
        Poll::Ready(Ok(compress(this.shared, &plan, response)))
    }
}

fn no_transform(headers: &HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    })
}

/// Adds `Vary: Accept-Encoding` unless it (or `*`) is already there.
fn add_vary(headers: &mut HeaderMap) {
    let present = headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|f| {
                let f = f.trim();
                f == "*" || f.eq_ignore_ascii_case("accept-encoding")
            })
        })
    });
    if !present {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

fn compress<RB: Body>(
    shared: &Shared,
    plan: &Plan,
    mut response: Response<RB>,
) -> Response<CompressionBody<RB>> {
    let headers = response.headers();
    let status = response.status();
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let size = response.body().size_hint().exact();
    let skip = plan.head
        || plan.ranked.is_empty()
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || headers.contains_key(CONTENT_ENCODING)
        || headers.contains_key(CONTENT_RANGE)
        || no_transform(headers)
        || !compressible(content_type)
        || size.is_some_and(|n| n < shared.config.min_size);
    if skip {
        // A varying choice still varies, even when this answer is identity.
        if !plan.ranked.is_empty() && !plan.head {
            add_vary(response.headers_mut());
        }
        return response.map(CompressionBody::identity);
    }
    let event_stream = content_type
        .trim()
        .to_ascii_lowercase()
        .starts_with("text/event-stream");
    let choice = match shared.config.level {
        Level::Fixed(levels) => plan.ranked.first().map(|codec| {
            let level = levels.of(*codec);
            Choice {
                codec: *codec,
                level,
                slot: slot(*codec, level),
            }
        }),
        Level::Adaptive => {
            let snapshot = shared.signal.as_ref().map(LoadSignal::snapshot);
            let prices = shared.model().map(|m| *m.prices());
            // A slot-second's price reaches the CPU as far as the CPU is
            // what requests wait for.
            let slot = snapshot.map_or(0.0, |s| s.slot_second_price());
            let scarcity = match shared.config.cpu_scarcity {
                _ if slot <= 0.0 => 0.0,
                super::CpuScarcity::Always => 1.0,
                super::CpuScarcity::Runtime => shared.cpu.scarcity(),
            };
            let cpu_price = prices.map_or(0.0, |p| p.cpu_second) + slot * scarcity;
            let byte_price = prices.map_or(0.0, |p| p.byte_sent);
            adaptive(
                &plan.ranked,
                plan.identity_ok,
                size.unwrap_or(shared.config.assumed_size) as f64,
                &shared.calibration,
                cpu_price,
                byte_price,
                plan.delay_rate,
                shared.config.client_bandwidth,
            )
        }
    };
    add_vary(response.headers_mut());
    let Some(choice) = choice else {
        return response.map(CompressionBody::identity);
    };
    let Some(encoder) = Encoder::new(choice.codec, choice.level) else {
        return response.map(CompressionBody::identity);
    };
    tracing::trace!(
        codec = choice.codec.name(),
        level = choice.level,
        "compressing"
    );
    let span = tracing::Span::current();
    span.record("codec", choice.codec.name());
    span.record("level", choice.level);
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_ENCODING,
        HeaderValue::from_static(choice.codec.name()),
    );
    headers.remove(CONTENT_LENGTH);
    headers.remove(ACCEPT_RANGES);
    if let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok())
        && !etag.starts_with("W/")
        && let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}"))
    {
        headers.insert(ETAG, weak);
    }
    let calibration = Arc::clone(&shared.calibration);
    let offload = shared.config.offload.as_ref().map(|pool| {
        let speed = calibration.get(choice.slot).0.max(1.0);
        let expected = size.unwrap_or(shared.config.assumed_size) as f64 / speed;
        Offload {
            pool: pool.clone(),
            above: shared.config.offload_above,
            speed,
            // Cost rate over expected time, as for every pool job (a small
            // positive rate for classes free to delay).
            priority: plan.delay_rate.max(1e-3) / expected.max(1e-6),
        }
    });
    response.map(|body| {
        CompressionBody::compressed(body, encoder, event_stream, calibration, choice, offload)
    })
}
