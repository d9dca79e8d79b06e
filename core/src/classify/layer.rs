use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use super::Classify;

/// Classifies every request and stores its [`ClassId`](crate::ClassId) in the
/// request's extensions.
///
/// Put it above every other gratify layer; they read the class with
/// [`class_of`](super::class_of). Any `ClassId` already in the extensions is
/// overwritten: the server decides. Cloning the layer or its services shares
/// the classifier. See the [module docs](crate::classify) for an example.
#[derive(Debug)]
pub struct ClassifyLayer<C> {
    classifier: Arc<C>,
}

impl<C> Clone for ClassifyLayer<C> {
    fn clone(&self) -> Self {
        Self {
            classifier: Arc::clone(&self.classifier),
        }
    }
}

impl<C> ClassifyLayer<C> {
    /// A layer classifying with `classifier`.
    pub fn new(classifier: C) -> Self {
        Self {
            classifier: Arc::new(classifier),
        }
    }

    /// The classifier.
    pub fn classifier(&self) -> &C {
        &self.classifier
    }
}

impl<S, C> Layer<S> for ClassifyLayer<C> {
    type Service = SetClass<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        SetClass {
            inner,
            classifier: Arc::clone(&self.classifier),
        }
    }
}

/// The service of [`ClassifyLayer`].
#[derive(Debug)]
pub struct SetClass<S, C> {
    inner: S,
    classifier: Arc<C>,
}

impl<S: Clone, C> Clone for SetClass<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            classifier: Arc::clone(&self.classifier),
        }
    }
}

impl<S, C> SetClass<S, C> {
    /// Wraps `inner`, classifying with `classifier`.
    pub fn new(inner: S, classifier: C) -> Self {
        Self {
            inner,
            classifier: Arc::new(classifier),
        }
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

impl<S, C, B> Service<Request<B>> for SetClass<S, C>
where
    S: Service<Request<B>>,
    C: Classify<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let class = self.classifier.classify(&request);
        tracing::trace!(class = class.index(), "classified");
        request.extensions_mut().insert(class);
        self.inner.call(request)
    }
}
