//! The deterministic overload simulator (feature `sim`).
//!
//! A [`Scenario`] — a server model, classes with their costs, deadlines and
//! service-time distributions, and phases of load and capacity — is read
//! from TOML; its arrivals are drawn once from a seed
//! ([`Scenario::workload`]) so that every contender sees the same requests;
//! [`run`] drives them, open-loop, through any tower service stack wrapped
//! around the scenario's [`SimServer`], on a current-thread tokio runtime
//! with a paused clock. The same seed gives the same figures on any
//! machine. [`evaluate`] turns a run into the benchmark's figures.
//!
//! The `overload` benchmark (`cargo bench -p gratify-benches --bench
//! overload` in the repository) runs every contender through the
//! scenarios; with `--scenario FILE` it runs yours.
//!
//! # Example
//!
//! ```
//! use gratify_scaling::limit::{AdaptiveLimitLayer, Limiter};
//! use gratify_scaling::sim::{self, Scenario};
//! use gratify_core::classify::classify_fn;
//! use tower_layer::Layer;
//!
//! let scenario = Scenario::from_toml(sim::SEVEN_PHASE).unwrap().scaled(0.02);
//! let model = scenario.model().unwrap();
//! let workload = scenario.workload(1);
//! let limiter = Limiter::new(&model);
//! let probe = limiter.clone();
//! let result = sim::run(&scenario, &model, &workload, |server| {
//!     AdaptiveLimitLayer::with_limiter(limiter)
//!         .classify_with(classify_fn(|r: &http::Request<sim::Job>| r.body().class))
//!         .layer(server)
//! }, move || Some(probe.stats().limit));
//! assert_eq!(result.records.len(), workload.len());
//! let figures = sim::evaluate(&scenario, &result, None, 10);
//! assert!(figures.overall["goodput_frac"] > 0.5);
//! ```

mod evaluate;
mod rng;
mod run;
mod scenario;
mod server;

pub use self::evaluate::{Evaluation, Figures, convergence, evaluate, request_cost};
pub use self::rng::Rng;
pub use self::run::{Fate, Point, Record, RunResult, run};
pub use self::scenario::{
    Arrival, ClassSpec, LIBRARY, Phase, SEVEN_PHASE, SEVEN_PHASE_HEAVY_TAIL, Scenario,
    ScenarioError, ServerModel,
};
pub use self::server::{AdmittedAt, Job, SERVER_HEADER, SimServer};
