//! `game`: the game backend, served.
//!
//! ```text
//! cargo run --release -p gratify-examples --bin game -- --listen 127.0.0.1:8081
//! curl -H "authorization: Bearer $(cargo run -q -p gratify-examples --bin game -- --token 7)" \
//!      http://127.0.0.1:8081/players/7/profile
//! ```
//!
//! Players connect a WebSocket to `/play` with the same bearer token.
//!
//! The dashboard is at `/ops/admin/`, Prometheus text at `/ops/admin/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gratify_examples::game::{CONFIG, Game, PLAYERS, token};

/// The game backend behind a gratify Stack.
#[derive(Debug, Parser)]
#[command(name = "game", version, about)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// The SQLite file that keeps uploaded replays until processed, their
    /// results and purchases (created on first start).
    #[arg(long, default_value = "target/game.db")]
    db: PathBuf,
    /// Print the bearer token of this seeded player and exit.
    #[arg(long)]
    token: Option<u32>,
    /// On SIGTERM or Ctrl-C, answer `/readyz` with 503 for this long (in
    /// seconds) before no longer accepting connections, so that load
    /// balancers stop sending traffic first; a second signal ends it.
    #[arg(long, default_value_t = 0.0)]
    readiness_grace: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    gratify_examples::init_logs("info");
    let args = Args::parse();
    if let Some(id) = args.token {
        if id >= PLAYERS {
            eprintln!("game: players are 0 to {}", PLAYERS - 1);
            return ExitCode::FAILURE;
        }
        println!("{}", token(id));
        return ExitCode::SUCCESS;
    }
    // Ctrl-C or SIGTERM from the start (as PID 1 in a container, a signal
    // nobody listens for is ignored).
    let stopping = gratify_examples::Stopping::listen();
    if let Some(dir) = args.db.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let game = match Game::open(&args.db, CONFIG) {
        Ok(game) => game,
        Err(e) => {
            eprintln!("game: {}: {e}", args.db.display());
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("game: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "game: http://{}/leaderboard — dashboard http://{}/ops/admin/",
        args.listen, args.listen
    );
    // Readiness fails first; the server stops accepting after the grace.
    let accepting = {
        let game = game.clone();
        stopping.then_grace(args.readiness_grace, move || game.stop_taking_traffic())
    };
    let served = axum::serve(listener, game.router().into_make_service())
        .with_graceful_shutdown(accepting)
        .await;
    // Every accepted replay is processed before exit, or reported (and
    // processed on the next start).
    let report = game.shutdown().await;
    eprintln!(
        "game: stopped; {} replay(s) processed while draining, {} not run, {} still running, {} dead letter(s)",
        report.ran,
        report.not_run.len(),
        report.still_running.len(),
        report.dead_total
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("game: {e}");
            ExitCode::FAILURE
        }
    }
}
