//! Adaptive concurrency limits and value-based admission.
//!
//! [`AdaptiveLimitLayer`] bounds the requests in flight to a limit that an
//! [`Algorithm`] learns from latency, and decides *which* requests to admit
//! by the delay-cost model:
//!
//! - below the limit, a request is admitted at once (unless it could not
//!   finish before its class's deadline even so);
//! - at the limit, it waits in its class's queue; the queues are served by
//!   cost rate ÷ expected service time (the cμ rule), the most urgent first;
//! - it is refused at once when it cannot finish before its deadline, or
//!   when its expected delay cost plus the delay it imposes on the requests
//!   behind it that are at least as costly to refuse exceeds its refusal
//!   cost — so the cheapest classes are shed first and no request is shed
//!   to spare a less valuable one a wait;
//! - a full queue displaces its least valuable waiter for a more valuable
//!   arrival, never the reverse;
//! - while the estimators warm up (the first samples), nothing is shed by
//!   cost: cold start sheds nothing that fits in the queue.
//!
//! Refusals are HTTP 503 responses with `Retry-After` (the estimated drain
//! time, jittered) and an `x-gratify-shed` header naming the reason, so an
//! `Infallible` service stays `Infallible` under axum; for other services,
//! [`AdaptiveLimitLayer::error_on_refusal`] makes them an
//! [`Overloaded`](error::Overloaded) error.
//!
//! Every slot is released exactly once on every path: the response, an
//! error, a panic in the inner future, the caller dropping the future, a
//! timeout in the queue, and — with
//! [`hold_until_body_end`](AdaptiveLimitLayer::hold_until_body_end) — the
//! end, failure or drop of the response body. Every clone shares one
//! limiter.
//!
//! The limiter publishes utilisation, queueing delay and the shadow price of
//! a slot on its [`LoadSignal`](gratify_core::LoadSignal).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use gratify_core::classify::{ClassifyLayer, RouteClassifier};
//! use gratify_core::CostModel;
//! use gratify_scaling::limit::AdaptiveLimitLayer;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = CostModel::from_toml(r#"
//!     default_class = "browse"
//!     [classes.checkout]
//!     delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
//!     refusal_cost = 10.0
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
//!     refusal_cost = 2.0
//! "#)?;
//! let routes = RouteClassifier::builder(&model)
//!     .route(Some(http::Method::POST), "/checkout", "checkout")
//!     .build()?;
//! let limit = AdaptiveLimitLayer::new(&model);
//! let limiter = limit.limiter().clone();
//!
//! let app = ServiceBuilder::new()
//!     .layer(ClassifyLayer::new(routes))
//!     .layer(limit)
//!     .service(service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("ok")))
//!     }));
//!
//! let response = app.oneshot(Request::post("/checkout").body(String::new())?).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! let checkout = model.id("checkout").unwrap();
//! assert_eq!(limiter.stats().classes[checkout.index()].completed, 1);
//! assert_eq!(limiter.stats().in_flight, 0);
//! # Ok(())
//! # }
//! ```

pub mod algorithm;
pub mod body;
pub mod error;
pub mod future;
pub(crate) mod limiter;
mod mode;
mod service;

pub use self::algorithm::{
    Aggregate, Aimd, Algorithm, DelayCostLimit, Fixed, Gradient2, Outcome, Sample, Vegas, Windowed,
};
pub use self::limiter::{
    Admission, ClassStats, Limiter, LimiterConfig, LimiterStats, Permit, Reason, Refusal,
};
pub use self::mode::{ErrorOnRefusal, Http, Mode, SHED_REASON_HEADER};
pub use self::service::{AdaptiveLimit, AdaptiveLimitLayer};
