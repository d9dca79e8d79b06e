use std::collections::HashMap;

use http::{HeaderName, Request};

use super::Classify;
use crate::{ClassId, CostModel};

/// Classifies by a request header whose value names a class — **only for
/// headers set by a trusted upstream**.
///
/// A client must never be able to raise its own priority. Use this only when
/// every request passes through a proxy or gateway that removes the header
/// from client traffic and sets it itself (for example an API gateway that
/// resolves the tenant's plan). Requests without the header, or whose header
/// names no class of the model, fall back to `fallback`.
///
/// # Example
///
/// ```
/// use gratify_core::classify::{Classify, TrustedHeaderClassifier};
/// use gratify_core::{Class, CostModel, DelayCost};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let c = |rate| Class::new(DelayCost::linear(rate).unwrap(), 1.0).unwrap();
/// let model = CostModel::builder()
///     .class("free", c(1.0))
///     .class("premium", c(10.0))
///     .default_class("free")
///     .build()?;
/// // Our gateway strips `x-gateway-class` from clients and sets it from the tenant's plan.
/// let by_gateway = TrustedHeaderClassifier::trusted_upstream(
///     http::HeaderName::from_static("x-gateway-class"),
///     &model,
///     model.default_class(),
/// );
/// let req = http::Request::get("/").header("x-gateway-class", "premium").body(())?;
/// assert_eq!(by_gateway.classify(&req), model.id("premium").unwrap());
/// let req = http::Request::get("/").header("x-gateway-class", "gold").body(())?;
/// assert_eq!(by_gateway.classify(&req), model.id("free").unwrap());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct TrustedHeaderClassifier<C> {
    header: HeaderName,
    classes: HashMap<Box<[u8]>, ClassId>,
    fallback: C,
}

impl<C> TrustedHeaderClassifier<C> {
    /// Classifies by `header`, whose value is a class name of `model`, and by
    /// `fallback` otherwise.
    ///
    /// The name says what the caller promises: the header comes from a
    /// trusted upstream that strips it from client requests.
    pub fn trusted_upstream(header: HeaderName, model: &CostModel, fallback: C) -> Self {
        let classes = model
            .iter()
            .map(|(id, name, _)| (name.as_bytes().into(), id))
            .collect();
        Self {
            header,
            classes,
            fallback,
        }
    }

    /// The header read.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }
}

impl<B, C: Classify<Request<B>>> Classify<Request<B>> for TrustedHeaderClassifier<C> {
    fn classify(&self, request: &Request<B>) -> ClassId {
        let mut values = request.headers().get_all(&self.header).iter();
        // Exactly one value, naming a class; anything else is ignored.
        match (values.next(), values.next()) {
            (Some(value), None) => match self.classes.get(value.as_bytes()) {
                Some(id) => *id,
                None => self.fallback.classify(request),
            },
            _ => self.fallback.classify(request),
        }
    }

    fn slot_hold(&self, request: &Request<B>) -> Option<crate::slot::SlotHold> {
        super::slot_hold_of(request)
    }

    fn propagated(&self, request: &Request<B>) -> Option<super::Propagated> {
        super::propagated_of(request)
    }

    fn grpc(&self, request: &Request<B>) -> bool {
        crate::refusal::is_grpc(request.headers())
    }
}
