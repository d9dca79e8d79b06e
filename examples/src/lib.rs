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

/// Sends the process's logs to stderr, at the level `RUST_LOG` asks
/// (`default` when unset, `info` or `warn`, say): what the binaries call
/// first.
pub fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves when the process is asked to stop: Ctrl-C, or (on Unix) the
/// SIGTERM a container orchestrator sends before it kills a pod.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // No handler could be installed: only Ctrl-C stops it.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// A [`shutdown_signal`] that many tasks can wait for: the first to see
/// the signal tells every clone.
#[derive(Debug, Clone)]
pub struct Stopping(tokio::sync::watch::Receiver<bool>);

impl Stopping {
    /// Starts listening for the signal.
    pub fn listen() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        Self(rx)
    }

    /// Resolves once the signal has come.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
pub mod game;
pub mod plan;
pub mod proxy;
pub mod shop;

/// The guide's getting-started code compiles and runs.
#[cfg(doctest)]
#[doc = include_str!("../../docs/getting-started.md")]
struct GettingStartedDoctests;
