//! Runnable gratify examples.
//!
//! - `plan`: the capacity planner — reads a cost model and traffic figures
//!   and prints, per server count, utilisation, probability of waiting, mean
//!   wait and the costs, marking the cost-optimal count (see [`plan`]).
//!
//! - `caching-proxy`: gratify's HTTP cache in front of any HTTP/1.1 origin
//!   (see [`proxy`]).
//!
//! - `shop`: the e-commerce example — a store on axum and SQLite behind a
//!   `gratify::Stack` from `examples/shop/shop.toml` (see [`shop`]).
//!
//! - `game`: the game backend — players, leaderboard, matchmaking, position
//!   updates and replay uploads behind a `gratify::Stack` from
//!   `examples/game/game.toml` (see [`game`]).
//!
//! - `demo`: either backend under overload, plain and wrapped, driven by
//!   [`drive`] and reported by [`demo`]; `drive`: the same driver against a
//!   server already running.

pub mod demo;
pub mod drive;
pub mod game;
pub mod plan;
pub mod proxy;
pub mod shop;

/// The guide's getting-started code compiles and runs.
#[cfg(doctest)]
#[doc = include_str!("../../docs/getting-started.md")]
struct GettingStartedDoctests;
