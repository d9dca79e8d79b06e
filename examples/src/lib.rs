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
//! - `game`: the game backend — a WebSocket session per player with a tick
//!   loop (moves and purchases, each admitted by the Stack's limiter), and
//!   HTTP for the leaderboard, matchmaking, profiles and replay uploads,
//!   behind a `gratify::Stack` from `examples/game/game.toml` (see
//!   [`game`]).
//!
//! - `demo`: either backend under overload, plain and wrapped, driven by
//!   [`drive`] (and, for the game, its WebSocket players, [`play`]) and
//!   reported by [`demo`]; `drive`: the same driver against a server
//!   already running.
//!
//! - `fleet` (features `redis`, `postgres`): the store as an autoscaled
//!   fleet behind HAProxy on PostgreSQL and Redis, under a compressed day,
//!   once per scaling policy (see [`fleet`]).
//!
//! - `inventory` (feature `grpc`): the store's inventory as a gRPC service
//!   on tonic behind gratify, called across three replicas through
//!   gratify's balancer (see `inventory`).

pub mod demo;
pub mod drive;
pub mod fleet;
#[cfg(feature = "grpc")]
pub mod inventory;

/// Sends the process's logs to stderr, at the levels `RUST_LOG` asks
/// (`default` — `info` or `warn`, say — when it is unset or a level in it
/// does not parse): what the binaries call first. `RUST_LOG` is a level, or
/// a comma-separated list of `target=level` and a level for the rest
/// (`gratify=debug,warn`); a word alone that is no level is a target (at
/// every level), as it always was.
pub fn init_logs(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let asked = std::env::var("RUST_LOG").ok();
    let filter = log_filter(asked.as_deref(), default);
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .try_init();
}

/// The levels of [`init_logs`]: `asked` (`RUST_LOG`) if it parses, else
/// `default`, else `info`. `Targets`, not `EnvFilter`: the same
/// `target=level` lists without the span-field matching that needs a regex
/// engine in every build.
fn log_filter(asked: Option<&str>, default: &str) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let fallback = || {
        default
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO))
    };
    // Empty directives (a trailing or doubled comma) say nothing; parsed,
    // they would set the rest to errors only.
    let asked = asked.map(|a| {
        a.split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    });
    match asked.as_deref().map(str::parse::<Targets>) {
        Some(Ok(targets)) => targets,
        Some(Err(error)) => {
            eprintln!("RUST_LOG not understood ({error}); logging at {default}");
            fallback()
        }
        None => fallback(),
    }
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

    /// Resolves when a server should stop accepting connections: once the
    /// signal has come, `stop_taking_traffic` fails readiness, then
    /// `grace_secs` pass (not a number or negative: none; at most an hour)
    /// so that load balancers stop sending first — or a second signal ends
    /// the grace at once.
    pub async fn then_grace(self, grace_secs: f64, stop_taking_traffic: impl FnOnce()) {
        let grace = std::time::Duration::try_from_secs_f64(grace_secs)
            .unwrap_or_default()
            .min(std::time::Duration::from_secs(3600));
        self.wait().await;
        stop_taking_traffic();
        tokio::select! {
            () = tokio::time::sleep(grace) => {}
            () = shutdown_signal() => {}
        }
    }
}
pub mod game;
pub mod plan;
pub mod play;
pub mod proxy;
pub mod shop;

/// The guide's getting-started code compiles and runs.
#[cfg(doctest)]
#[doc = include_str!("../../docs/getting-started.md")]
struct GettingStartedDoctests;

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_filter;

    #[test]
    fn rust_log_lists_levels_by_target_and_a_bad_one_falls_back() {
        let f = log_filter(Some("gratify=debug,warn"), "info");
        assert!(f.would_enable("gratify::cache", &Level::DEBUG));
        assert!(!f.would_enable("hyper", &Level::INFO));
        assert!(f.would_enable("hyper", &Level::WARN));
        // Unset: the binary's default.
        let f = log_filter(None, "warn");
        assert!(!f.would_enable("shop", &Level::INFO));
        assert!(f.would_enable("shop", &Level::WARN));
        // A trailing comma changes nothing.
        let f = log_filter(Some("gratify=debug,warn,"), "info");
        assert!(f.would_enable("hyper", &Level::WARN));
        // Not understood: the default, not silence and not everything.
        let f = log_filter(Some("gratify=loud"), "info");
        assert!(f.would_enable("shop", &Level::INFO));
        assert!(!f.would_enable("shop", &Level::DEBUG));
    }
}
