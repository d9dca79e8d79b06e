//! `async fn(Request) -> Result<Response, Error>`, with a price on delay.
//!
//! `gratify` is the crate applications add: tower middleware that decides
//! what to admit, cache, compress and move off the request path by
//! minimising one **delay-cost model** — each request class has a cost per
//! second of delay and a cost of refusal; CPU, bytes, memory and replicas
//! have prices.
//!
//! It re-exports the crates it composes:
//!
//! - [`core`] (`gratify-core`): the cost model, classification, queueing
//!   maths, estimators and the load signal;
//! - [`cache`] (`gratify-cache`): response caching;
//! - [`scaling`] (`gratify-scaling`): adaptive limits, admission and replica
//!   advice.
//!
//! Its own layers:
//!
//! - [`compression`] (features `compression-gzip`, `-deflate`, `-br`,
//!   `-zstd`, `-full`) compresses responses at a level chosen by the cost of
//!   CPU now;
//! - [`offload`]: a bounded CPU pool ordered by the cost of delay, deferred
//!   work that runs when resources are cheap, and (feature `redis`) durable
//!   deferred work;
//! - [`stack`]: one configuration file and one layer that wire
//!   classification, caching, admission, compression and offloading to one
//!   model;
//! - [`admin`]: what a `Stack` is doing, as JSON, Prometheus text and a live
//!   dashboard.
//!
//! # Example
//!
//! ```
//! use gratify::core::classify::{class_of, ClassifyLayer, RouteClassifier};
//! use gratify::CostModel;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let model = CostModel::from_toml(r#"
//!     default_class = "browse"
//!     [classes.checkout]
//!     delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
//!     refusal_cost = 10.0
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0 }
//!     refusal_cost = 2.0
//! "#)?;
//! let routes = RouteClassifier::builder(&model)
//!     .route(Some(http::Method::POST), "/checkout", "checkout")
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(ClassifyLayer::new(routes))
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(class_of(&req))
//!     }));
//! let req = http::Request::post("/checkout").body(())?;
//! assert_eq!(svc.oneshot(req).await?, model.id("checkout"));
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
pub mod balance;
pub mod compression;
#[cfg(feature = "redis")]
pub mod fleet;
pub mod offload;
pub mod stack;

pub use gratify_cache as cache;
pub use gratify_core as core;
pub use gratify_scaling as scaling;

pub use self::admin::Admin;
pub use self::stack::{Stack, StackService};
pub use gratify_core::refusal;
pub use gratify_core::telemetry;
pub use gratify_core::{
    BoxError, BoxFuture, Class, ClassId, CostModel, DelayCost, LoadSignal, LoadSnapshot, Prices,
};

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
