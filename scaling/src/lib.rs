//! `gratify-scaling`: how much to admit, what to shed, and how many replicas
//! to run — decided by the delay-cost model of [`gratify_core`].
//!
//! This crate holds the adaptive concurrency limiter (the delay-cost
//! algorithm, and AIMD, Vegas and Gradient2 for comparison), value-based
//! admission with per-class queues served by cost rate ÷ service time, the
//! replica advisor (Erlang C with the costs of delay and of replicas), and the
//! deterministic overload simulator behind its benchmarks.
//!
//! It depends only on `gratify-core` and publishes the load through
//! [`gratify_core::LoadSignal`].
//!
//! - [`limit`]: [`AdaptiveLimitLayer`](limit::AdaptiveLimitLayer), its
//!   algorithms and the value-based admission;
//! - [`advisor`]: how many replicas to run for the traffic and the prices;
//! - `sim` (feature `sim`): the deterministic overload simulator and its
//!   library of scenarios.
//!
//! The queueing maths they use is in [`gratify_core::queueing`].
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod advisor;
pub mod limit;
#[cfg(feature = "sim")]
pub mod sim;

pub use gratify_core::{ClassId, CostModel, LoadSignal};
