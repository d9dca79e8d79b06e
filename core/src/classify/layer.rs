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
        // A class a trusted caller propagated stands; otherwise classify.
        let class = match super::propagated_of(&request).and_then(|p| p.class) {
            Some(class) => class,
            None => self.classifier.classify(&request),
        };
        tracing::trace!(class = class.index(), "classified");
        let extensions = request.extensions_mut();
        extensions.insert(class);
        if extensions.get::<super::Arrived>().is_none() {
            extensions.insert(super::Arrived(std::time::Instant::now()));
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Method, Request};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::classify::{RouteClassifier, TrustedHeaderClassifier, class_of};
    use crate::{Class, ClassId, CostModel, DelayCost};

    fn model() -> CostModel {
        let c = |r| Class::new(DelayCost::linear(r).unwrap(), 1.0).unwrap();
        CostModel::builder()
            .class("browse", c(1.0))
            .class("checkout", c(20.0))
            .default_class("browse")
            .build()
            .unwrap()
    }

    async fn class_seen<C>(layer: ClassifyLayer<C>, req: Request<()>) -> Option<ClassId>
    where
        C: Classify<Request<()>> + Send + Sync + 'static,
    {
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|req: Request<()>| async move {
                Ok::<_, Infallible>(class_of(&req))
            }))
            .oneshot(req)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn stores_the_class_and_overwrites_any_earlier_one() {
        let m = model();
        let routes = RouteClassifier::builder(&m)
            .route(Some(Method::POST), "/checkout", "checkout")
            .build()
            .unwrap();
        let layer = ClassifyLayer::new(routes);
        let mut req = Request::get("/checkout").body(()).unwrap();
        // Something upstream put a class in; the server's rules decide.
        req.extensions_mut().insert(m.id("checkout").unwrap());
        assert_eq!(
            class_seen(layer.clone(), req).await,
            Some(m.id("browse").unwrap())
        );
        let req = Request::post("/checkout").body(()).unwrap();
        assert_eq!(class_seen(layer, req).await, m.id("checkout"));
    }

    #[tokio::test]
    async fn a_header_is_ignored_unless_trusted() {
        let m = model();
        let routes = RouteClassifier::builder(&m).build().unwrap();
        let req = || {
            Request::get("/")
                .header("x-class", "checkout")
                .body(())
                .unwrap()
        };
        // Without the opt-in, a client's header changes nothing.
        assert_eq!(
            class_seen(ClassifyLayer::new(routes.clone()), req()).await,
            m.id("browse")
        );
        // With it, the header (from a trusted upstream) decides.
        let trusted = TrustedHeaderClassifier::trusted_upstream(
            http::HeaderName::from_static("x-class"),
            &m,
            routes.clone(),
        );
        let layer = ClassifyLayer::new(trusted);
        assert_eq!(class_seen(layer.clone(), req()).await, m.id("checkout"));
        // Two values are ambiguous: fall back to the rules.
        let twice = Request::get("/")
            .header("x-class", "checkout")
            .header("x-class", "checkout")
            .body(())
            .unwrap();
        assert_eq!(class_seen(layer, twice).await, m.id("browse"));
    }

    #[tokio::test]
    async fn clones_share_the_classifier_and_readiness_passes_through() {
        let m = model();
        let layer = ClassifyLayer::new(m.id("checkout").unwrap());
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(class_of(&req))
        }));
        let clone = svc.clone();
        assert!(Arc::ptr_eq(&svc.classifier, &clone.classifier));
        let got = clone.oneshot(Request::new(())).await.unwrap();
        assert_eq!(got, m.id("checkout"));
    }
}
