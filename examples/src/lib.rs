//! Runnable gratify examples.
//!
//! - `plan`: the capacity planner — reads a cost model and traffic figures
//!   and prints, per server count, utilisation, probability of waiting, mean
//!   wait and the costs, marking the cost-optimal count (see [`plan`]).
//!
//! The e-commerce and game backends, with their load driver, are built here
//! too as they land.

pub mod plan;
