//! `gratify-scaling`: how much to admit, what to shed, and how many replicas
//! to run — decided by the delay-cost model of [`gratify_core`].
//!
//! This crate will hold the adaptive concurrency limiter (the delay-cost
//! algorithm, and AIMD, Vegas and Gradient2 for comparison), value-based
//! admission with per-class queues served by cost rate ÷ service time, the
//! replica advisor (Erlang C with the costs of delay and of replicas), and the
//! deterministic overload simulator behind its benchmarks.
//!
//! It depends only on `gratify-core` and publishes the load through
//! [`gratify_core::LoadSignal`].
//!
//! Status: the crate is being built; the limiter and the advisor land under
//! their own issues. The queueing maths they use is in
//! [`gratify_core::queueing`] already.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use gratify_core::{ClassId, CostModel, LoadSignal};
