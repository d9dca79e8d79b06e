//! Request classification: which class a request belongs to.
//!
//! Classification is server-side: by route and method ([`RouteClassifier`]),
//! by any rule in code ([`classify_fn`]), or — only for a trusted upstream
//! that strips the header from client traffic — by a header
//! ([`TrustedHeaderClassifier`]). A client can never pick its own class
//! unless the application says the header is trusted.
//!
//! [`ClassifyLayer`] runs a classifier once, near the top of the stack, and
//! stores the [`ClassId`] in the request's extensions, where every later
//! layer reads it with [`class_of`].
//!
//! # Example
//!
//! ```
//! use gratify_core::classify::{class_of, ClassifyLayer, RouteClassifier};
//! use gratify_core::{Class, CostModel, DelayCost};
//! use http::{Method, Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let model = CostModel::builder()
//!     .class("checkout", Class::new(DelayCost::linear(20.0)?, 10.0)?)
//!     .class("browse", Class::new(DelayCost::linear(2.0)?, 2.0)?)
//!     .default_class("browse")
//!     .build()?;
//! let routes = RouteClassifier::builder(&model)
//!     .route(Some(Method::POST), "/checkout", "checkout")
//!     .build()?;
//!
//! let checkout = model.id("checkout").unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(ClassifyLayer::new(routes))
//!     .service(service_fn(|req: Request<()>| async move {
//!         // Every layer below sees the class.
//!         let class = class_of(&req).expect("classified");
//!         Ok::<_, std::convert::Infallible>(Response::new(class))
//!     }));
//!
//! let req = Request::post("/checkout").body(())?;
//! assert_eq!(*svc.clone().oneshot(req).await?.body(), checkout);
//! let req = Request::get("/products/7").body(())?;
//! assert_eq!(*svc.oneshot(req).await?.body(), model.default_class());
//! # Ok(())
//! # }
//! ```

mod header;
mod layer;
mod route;

use std::fmt;

pub use self::header::TrustedHeaderClassifier;
pub use self::layer::{ClassifyLayer, SetClass};
pub use self::route::{RouteClassifier, RouteClassifierBuilder, RouteError, RouteRule};

use crate::ClassId;

/// Decides the class of a request.
///
/// Implemented by [`RouteClassifier`], [`TrustedHeaderClassifier`],
/// [`ClassifyFn`] and by a [`ClassId`] itself (every request in one class).
pub trait Classify<Req: ?Sized> {
    /// The class of `request`.
    fn classify(&self, request: &Req) -> ClassId;

    /// The [`SlotHold`](crate::slot::SlotHold) a layer in front put on
    /// `request`, if any: a limiter keeps the request's slot until every
    /// clone of it is dropped. `None` unless a classifier says otherwise.
    fn slot_hold(&self, request: &Req) -> Option<crate::slot::SlotHold> {
        let _ = request;
        None
    }

    /// What a trusted caller said about `request` — the deadline it must
    /// answer by, and that the caller admitted it upstream — if anything.
    /// `None` unless a classifier says otherwise.
    fn propagated(&self, request: &Req) -> Option<Propagated> {
        let _ = request;
        None
    }

    /// Whether `request` is a gRPC call, whose refusals must be gRPC
    /// statuses rather than HTTP error pages. `false` unless a classifier
    /// says otherwise (every classifier of `http::Request`s reads the
    /// `Content-Type`).
    fn grpc(&self, request: &Req) -> bool {
        let _ = request;
        false
    }
}

impl<Req: ?Sized> Classify<Req> for ClassId {
    fn classify(&self, _: &Req) -> ClassId {
        *self
    }
}

impl<Req: ?Sized, C: Classify<Req> + ?Sized> Classify<Req> for std::sync::Arc<C> {
    fn classify(&self, request: &Req) -> ClassId {
        (**self).classify(request)
    }

    fn slot_hold(&self, request: &Req) -> Option<crate::slot::SlotHold> {
        (**self).slot_hold(request)
    }

    fn propagated(&self, request: &Req) -> Option<Propagated> {
        (**self).propagated(request)
    }

    fn grpc(&self, request: &Req) -> bool {
        (**self).grpc(request)
    }
}

/// A classifier from a closure; see [`classify_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyFn<F> {
    f: F,
}

/// Classifies with a closure `Fn(&Req) -> ClassId`.
///
/// ```
/// use gratify_core::classify::{classify_fn, Classify};
/// use gratify_core::ClassId;
///
/// let tenant_class = classify_fn(|req: &http::Request<()>| {
///     // e.g. a tenant resolved by an authentication layer earlier on.
///     if req.extensions().get::<&'static str>() == Some(&"premium") {
///         ClassId::from_index(0)
///     } else {
///         ClassId::from_index(1)
///     }
/// });
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert("premium");
/// assert_eq!(tenant_class.classify(&req), ClassId::from_index(0));
/// ```
pub fn classify_fn<F>(f: F) -> ClassifyFn<F> {
    ClassifyFn { f }
}

impl<Req: ?Sized, F: Fn(&Req) -> ClassId> Classify<Req> for ClassifyFn<F> {
    fn classify(&self, request: &Req) -> ClassId {
        (self.f)(request)
    }
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn").finish_non_exhaustive()
    }
}

/// The [`SlotHold`](crate::slot::SlotHold) a layer in front put on an HTTP
/// request: every classifier of HTTP requests reports it to the limiter.
pub fn slot_hold_of<B>(request: &http::Request<B>) -> Option<crate::slot::SlotHold> {
    request.extensions().get::<crate::slot::SlotHold>().cloned()
}

/// When a request arrived, as the first gratify layer saw it:
/// [`ClassifyLayer`] stamps it unless an earlier layer did. Every queue the
/// request passes afterwards — the limiter's, the CPU pool's — spends from
/// one budget: its class's deadline, counted from this instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrived(pub std::time::Instant);

/// When the request arrived ([`Arrived`]), if a layer stamped it.
pub fn arrived_of<B>(request: &http::Request<B>) -> Option<std::time::Instant> {
    request.extensions().get::<Arrived>().map(|a| a.0)
}

/// What a trusted caller propagated with a request: the class the request
/// had where it was first admitted, and the instant by which the caller
/// needs the answer.
///
/// Only a layer that has checked the caller is trusted puts it on a request
/// (the `gratify` crate's `balance::AcceptCalls`); a client can never set it
/// from a header. With it:
/// - [`ClassifyLayer`] (and the `gratify` `Stack`) classify the request as
///   `class` instead of running their classifier;
/// - the limiter refuses at once a request whose `deadline` has passed or
///   that its class's measured latency says cannot finish before it, bounds
///   its wait in the queue by it, and queues it ahead of the requests of
///   its class that arrived here first hand (consistent shedding: work
///   another service already spent effort on is preferred over new work of
///   the same value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Propagated {
    /// The request's class in this service's model, when the caller named a
    /// class the model has.
    pub class: Option<ClassId>,
    /// When the caller gives up on the request.
    pub deadline: Option<std::time::Instant>,
}

impl Propagated {
    /// What a trusted caller said: the request's class here, if it named
    /// one of this service's classes, and when it gives up, if it does.
    pub const fn new(class: Option<ClassId>, deadline: Option<std::time::Instant>) -> Self {
        Self { class, deadline }
    }
}

/// What a trusted caller propagated with a request ([`Propagated`]), if a
/// layer that checked the caller stored it.
pub fn propagated_of<B>(request: &http::Request<B>) -> Option<Propagated> {
    request.extensions().get::<Propagated>().copied()
}

/// The class that [`ClassifyLayer`] stored in the request's extensions.
pub fn class_of<B>(request: &http::Request<B>) -> Option<ClassId> {
    request.extensions().get::<ClassId>().copied()
}

/// Reads the class that [`ClassifyLayer`] stored in the request's
/// extensions, or a default class — what every gratify layer uses unless
/// told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromExtensions {
    default: ClassId,
}

impl FromExtensions {
    /// Falls back to `default` for a request that was not classified.
    pub const fn new(default: ClassId) -> Self {
        Self { default }
    }
}

impl<B> Classify<http::Request<B>> for FromExtensions {
    fn classify(&self, request: &http::Request<B>) -> ClassId {
        class_of(request).unwrap_or(self.default)
    }

    fn slot_hold(&self, request: &http::Request<B>) -> Option<crate::slot::SlotHold> {
        slot_hold_of(request)
    }

    fn propagated(&self, request: &http::Request<B>) -> Option<Propagated> {
        propagated_of(request)
    }

    fn grpc(&self, request: &http::Request<B>) -> bool {
        crate::refusal::is_grpc(request.headers())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_http_classifier_reports_a_slot_hold() {
        let model = crate::CostModel::builder()
            .class(
                "browse",
                crate::Class::new(crate::DelayCost::linear(1.0).unwrap(), 1.0).unwrap(),
            )
            .build()
            .unwrap();
        let mut request = http::Request::get("/p").body(()).unwrap();
        let routes = RouteClassifier::builder(&model).build().unwrap();
        let header = TrustedHeaderClassifier::trusted_upstream(
            http::HeaderName::from_static("x-class"),
            &model,
            FromExtensions::new(model.default_class()),
        );
        let extensions = FromExtensions::new(model.default_class());
        assert!(routes.slot_hold(&request).is_none());
        assert!(header.slot_hold(&request).is_none());
        request
            .extensions_mut()
            .insert(crate::slot::SlotHold::new());
        assert!(routes.slot_hold(&request).is_some());
        assert!(header.slot_hold(&request).is_some());
        assert!(extensions.slot_hold(&request).is_some());
        assert!(std::sync::Arc::new(routes).slot_hold(&request).is_some());
    }
}
