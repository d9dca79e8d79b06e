use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use gratify_core::classify::{Classify, FromExtensions};
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::limiter::{Acquire, Limiter};
use super::mode::{Http, Mode};

/// Bounds the requests in flight to a learned limit and admits by the cost
/// model. See the [module docs](crate::limit).
///
/// Every clone shares one [`Limiter`]: axum clones services per connection,
/// and a per-clone limit would silently not hold.
///
/// # Readiness
///
/// `poll_ready` forwards the inner service's readiness. A request that must
/// wait for a slot keeps the inner service it was made ready with (a clone
/// takes its place in this service), so requests waiting in the limiter's
/// queue hold whatever the inner service reserves for readiness.
#[derive(Debug)]
pub struct AdaptiveLimit<S, C = FromExtensions, M = Http> {
    inner: S,
    limiter: Limiter,
    classify: Arc<C>,
    hold_body: bool,
    _mode: PhantomData<fn() -> M>,
}

impl<S: Clone, C, M> Clone for AdaptiveLimit<S, C, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            classify: Arc::clone(&self.classify),
            hold_body: self.hold_body,
            _mode: PhantomData,
        }
    }
}

impl<S, C, M> AdaptiveLimit<S, C, M> {
    /// The shared limiter.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

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

impl<S, C, M, Req> Service<Req> for AdaptiveLimit<S, C, M>
where
    S: Service<Req> + Clone,
    C: Classify<Req>,
    M: Mode<S::Response, S::Error>,
{
    type Response = M::Response;
    type Error = M::Error;
    type Future = ResponseFuture<S, Req, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(M::error(e))),
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        // Recorded on the request's span, if it declares the fields (as
        // `gratify::Stack`'s does); not even looked up when no subscriber
        // was ever set.
        let span = tracing::dispatcher::has_been_set().then(tracing::Span::current);
        let record = |field: &str, value: &str| {
            if let Some(span) = &span {
                span.record(field, value);
            }
        };
        let class = self.classify.classify(&request);
        let propagated = self.classify.propagated(&request);
        let grpc = self.classify.grpc(&request);
        match self.limiter.acquire_propagated(class, propagated) {
            Acquire::Admitted(permit) => {
                record("admission", "admitted");
                let permit = permit.held_by(self.classify.slot_hold(&request));
                let future = self.inner.call(request);
                ResponseFuture::called(future, permit, self.hold_body).grpc(grpc)
            }
            Acquire::Queued(ticket) => {
                record("admission", "queued");
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let hold = self.classify.slot_hold(&request);
                ResponseFuture::waiting(ticket, ready, request, hold, self.hold_body).grpc(grpc)
            }
            Acquire::Refused(refusal) => {
                record("admission", "shed");
                record("shed_reason", refusal.reason().as_str());
                ResponseFuture::refused(refusal).grpc(grpc)
            }
        }
    }
}

/// Applies [`AdaptiveLimit`] to services. Cloning the layer, or the services
/// it makes, shares one limiter.
#[derive(Debug)]
pub struct AdaptiveLimitLayer<C = FromExtensions, M = Http> {
    limiter: Limiter,
    classify: Arc<C>,
    hold_body: bool,
    _mode: PhantomData<fn() -> M>,
}

impl<C, M> Clone for AdaptiveLimitLayer<C, M> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            classify: Arc::clone(&self.classify),
            hold_body: self.hold_body,
            _mode: PhantomData,
        }
    }
}

impl AdaptiveLimitLayer {
    /// A layer with the default limiter for `model`: the
    /// [`DelayCostLimit`](super::DelayCostLimit) algorithm and
    /// [`Admission::DelayCost`](super::Admission::DelayCost), classifying by
    /// the class a [`ClassifyLayer`](gratify_core::classify::ClassifyLayer)
    /// stored (or the model's default class).
    pub fn new(model: &gratify_core::CostModel) -> Self {
        Self::with_limiter(Limiter::new(model))
    }

    /// A layer around an existing limiter (shared with its other users).
    pub fn with_limiter(limiter: Limiter) -> Self {
        let default = limiter.model().default_class();
        Self {
            limiter,
            classify: Arc::new(FromExtensions::new(default)),
            hold_body: false,
            _mode: PhantomData,
        }
    }
}

impl<C, M> AdaptiveLimitLayer<C, M> {
    /// The shared limiter.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Classifies requests with `classify` instead of reading the class from
    /// request extensions (for services that are not HTTP).
    pub fn classify_with<C2>(self, classify: C2) -> AdaptiveLimitLayer<C2, M> {
        AdaptiveLimitLayer {
            limiter: self.limiter,
            classify: Arc::new(classify),
            hold_body: self.hold_body,
            _mode: PhantomData,
        }
    }

    /// Refuses with an [`Overloaded`](super::error::Overloaded) error instead
    /// of an HTTP 503 (the service's error type becomes `BoxError`).
    pub fn error_on_refusal(self) -> AdaptiveLimitLayer<C, super::ErrorOnRefusal> {
        AdaptiveLimitLayer {
            limiter: self.limiter,
            classify: self.classify,
            hold_body: self.hold_body,
            _mode: PhantomData,
        }
    }

    /// Holds each slot until the response body ends (or fails, or is
    /// dropped), not only until the response head is ready: the limit then
    /// counts streaming responses whole. Off by default.
    #[must_use]
    pub fn hold_until_body_end(mut self, hold: bool) -> Self {
        self.hold_body = hold;
        self
    }
}

impl<S, C, M> Layer<S> for AdaptiveLimitLayer<C, M> {
    type Service = AdaptiveLimit<S, C, M>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveLimit {
            inner,
            limiter: self.limiter.clone(),
            classify: Arc::clone(&self.classify),
            hold_body: self.hold_body,
            _mode: PhantomData,
        }
    }
}
