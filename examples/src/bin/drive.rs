//! `drive`: the load driver against a server that is already running.
//!
//! ```text
//! cargo run --release -p gratify-examples --bin shop &
//! cargo run --release -p gratify-examples --bin drive -- --addr 127.0.0.1:8080 --multiple 2
//! cargo run --release -p gratify-examples --bin drive -- --addr 127.0.0.1:8081 --mix game --rate 500
//! ```
//!
//! Sends a seeded, open-loop traffic mix (the store's or the game's) at a
//! rate, or at a multiple of the capacity it first measures (closed loop),
//! and prints the per-class report, priced by the example's cost model. With
//! `--json FILE` it writes the report there too. `demo` does the same for
//! the plain and the wrapped app side by side; this is for one server you
//! started yourself — the example, or your own app serving the same routes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gratify_examples::demo::{capacity, drive_at, progress_bar};
use gratify_examples::drive::{Load, table_of};
use gratify_examples::{game, shop};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MixName {
    /// The store's traffic.
    Shop,
    /// The game's traffic.
    Game,
}

/// The load driver against a running server.
#[derive(Debug, Parser)]
#[command(name = "drive", version, about)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Which traffic.
    #[arg(long, value_enum, default_value_t = MixName::Shop)]
    mix: MixName,
    /// Arrivals per second (else `--multiple` of the measured capacity).
    #[arg(long)]
    rate: Option<f64>,
    /// The load as a multiple of the capacity measured first.
    #[arg(long, default_value_t = 1.0)]
    multiple: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// The seed of the traffic.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Connections the driver may hold open.
    #[arg(long, default_value_t = 4096)]
    connections: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (mix, config) = match args.mix {
        MixName::Shop => (shop::mix(), shop::CONFIG),
        MixName::Game => (game::mix(), game::CONFIG),
    };
    let model = match gratify::Stack::from_config(config) {
        Ok(stack) => stack.model(),
        Err(e) => {
            eprintln!("drive: the example's config: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !(args.seconds > 0.0 && args.multiple > 0.0 && args.rate.is_none_or(|r| r > 0.0)) {
        eprintln!("drive: --seconds, --multiple and --rate must be above zero");
        return ExitCode::FAILURE;
    }
    let rate = match args.rate {
        Some(rate) => rate,
        None => {
            let cap = capacity(args.addr, &mix, 3.0, 32).await;
            if cap <= 0.0 {
                eprintln!("drive: {} completed nothing; is it running?", args.addr);
                return ExitCode::FAILURE;
            }
            eprintln!("drive: {} completes about {cap:.0} arrivals/s", args.addr);
            cap * args.multiple
        }
    };
    eprintln!(
        "drive: {rate:.0} arrivals/s for {} s to {}",
        args.seconds, args.addr
    );
    let load = Load {
        rate,
        seconds: args.seconds,
        timeout: Duration::from_secs(10),
        seed: args.seed,
        max_in_flight: args.connections,
    };
    let report = drive_at(
        args.addr,
        args.connections,
        &mix,
        &model,
        load,
        &progress_bar("drive"),
    )
    .await;
    println!("{}", table_of(&[(&args.addr.to_string(), &report)]));
    for (error, n) in &report.errors {
        println!("{n} × {error}");
    }
    if let Some(path) = &args.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(path, text));
        if let Err(e) = written {
            eprintln!("drive: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
