//! `gratify-core`: the delay-cost model that every gratify layer decides by.
//!
//! Delay has a price. Each request class carries a cost of delay — a curve
//! `c(t)` of how late its response is — and a cost of being refused; CPU,
//! bytes, cache memory and replicas have prices too. Every gratify layer
//! (admission and concurrency limits, caching, compression, offloading,
//! replica advice) takes its decision by minimising the same total cost.
//! This crate holds what they share:
//!
//! - [`cost`]: delay-cost curves ([`DelayCost`]) and classes ([`Class`]);
//! - [`model`]: the [`CostModel`] — named classes, a default class and
//!   resource [`Prices`] — built in code or read from TOML;
//! - [`classify`]: which class a request belongs to, and the
//!   [`ClassifyLayer`](classify::ClassifyLayer) that records it;
//! - [`queueing`]: Erlang B/C, the M/M/c queue, cost-optimal staffing;
//! - [`estimate`]: online rate, latency-quantile and min-RTT estimators;
//! - [`signal`]: the lock-free [`LoadSignal`] the limiter publishes and the
//!   other layers read;
//! - [`encoding`]: `Accept-Encoding` negotiation and the [`Recoder`](encoding::Recoder)
//!   interface between the cache and compression;
//! - [`slot`]: holding a concurrency slot until a response's body ends;
//! - [`telemetry`]: the one vocabulary of metric names, kinds and labels;
//! - [`refusal`]: the one shape of a refusal, and how its body is written;
//! - [`body`]: body helpers; [`error`]: the error types;
//!   [`serde_util`]: serde helpers for configuration.
//!
//! The other crates build on it: `gratify-scaling` (limits, admission,
//! replica advice), `gratify-cache` (response caching) and `gratify` (the
//! layers users add, and the stack that composes them).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify_core::{CostModel, queueing::Staffing};
//!
//! let model = CostModel::from_toml(r#"
//!     default_class = "browse"
//!     [prices]
//!     replica_hour = 1.0
//!     [classes.checkout]
//!     delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
//!     refusal_cost = 10.0
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0, deadline = "2s" }
//!     refusal_cost = 1.0
//! "#)?;
//!
//! // A late checkout costs more than refusing it at once.
//! let checkout = model.class(model.id("checkout").unwrap());
//! assert!(checkout.response_cost(Duration::from_millis(400)) > checkout.refusal_cost());
//!
//! // How many servers minimise server cost plus waiting cost for 40 req/s
//! // of 50 ms each, mostly browsing?
//! let plan = Staffing::new(0.05, model.prices().replica_hour)?
//!     .class(4.0, checkout.clone())?
//!     .class(36.0, model.class(model.id("browse").unwrap()).clone())?
//!     .optimal()?;
//! assert!(plan.servers >= 3 && plan.queue.utilisation() < 1.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod classify;
pub mod cost;
pub mod encoding;
pub mod error;
pub mod estimate;
pub mod model;
pub mod queueing;
pub mod refusal;
pub mod serde_util;
pub mod signal;
pub mod slot;
pub mod telemetry;

pub use self::cost::{Class, DelayCost};
pub use self::error::{BoxError, BoxFuture, ConfigError, CostError, ModelError};
pub use self::model::{ClassId, CostModel, CostModelBuilder, CostModelConfig, Prices, SharedModel};
pub use self::serde_util::parse_duration;
pub use self::signal::{LoadSignal, LoadSnapshot};
