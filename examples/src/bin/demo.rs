//! `demo`: an example backend under overload, plain and wrapped in gratify.
//!
//! ```text
//! cargo run --release -p gratify-examples --bin demo            # the store
//! cargo run --release -p gratify-examples --bin demo -- game    # the game backend
//! cargo run --release -p gratify-examples --bin demo -- shop --multiple 3 --seconds 20
//! ```
//!
//! Serves the app twice on loopback — plain, and behind its `Stack` —,
//! measures what the plain one completes of the traffic mix (closed loop, a
//! few seconds), then sends the same open-loop traffic at a multiple of that
//! to each and prints the per-class report. Writes it as JSON and as an SVG
//! plot to `target/gratify-demo/`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gratify_examples::demo::{Options, Outcome, compare, plot};
use gratify_examples::drive::table;
use gratify_examples::{game, shop};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum App {
    /// The e-commerce store.
    Shop,
    /// The game backend.
    Game,
}

/// An example backend under overload, plain and wrapped in gratify.
#[derive(Debug, Parser)]
#[command(name = "demo", version, about)]
struct Args {
    /// Which example.
    #[arg(value_enum, default_value_t = App::Shop)]
    app: App,
    /// The load, as a multiple of what the plain app completes.
    #[arg(long, default_value_t = 3.0)]
    multiple: f64,
    /// Seconds of traffic per app.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// The seed of the traffic.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where the JSON report and the SVG plot go.
    #[arg(long, default_value = "target/gratify-demo")]
    out: PathBuf,
}

/// Compares `plain` and `wrapped`, or says why it could not.
async fn run(
    plain: axum::Router,
    wrapped: axum::Router,
    mix: &gratify_examples::drive::Mix,
    model: &gratify::CostModel,
    options: Options,
) -> Option<Outcome> {
    match compare(plain, wrapped, mix, model, options, true).await {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("demo: cannot serve on 127.0.0.1: {e}");
            None
        }
    }
}

/// Prints the table and writes `{app}.json` (the outcome and `extra`) and
/// `{app}.svg` to `out`.
fn report(out: &Path, app: &str, name: &str, outcome: &Outcome, extra: serde_json::Value) {
    println!(
        "\nThe {name} at {:.1}× its capacity ({:.0} arrivals/s for {} s), plain and behind gratify:\n",
        outcome.multiple, outcome.rate, outcome.plain.seconds
    );
    println!("{}", table(&outcome.plain, &outcome.gratify));
    for (label, r) in [("plain", &outcome.plain), ("gratify", &outcome.gratify)] {
        for (error, n) in &r.errors {
            println!("{label}: {n} × {error}");
        }
    }
    for (label, r) in [("plain", &outcome.plain), ("gratify", &outcome.gratify)] {
        if let Some(t) = &r.ticks {
            println!("{label}: {}", gratify_examples::play::describe_ticks(t));
        }
    }
    let title = format!(
        "The {name} at {:.1}× its capacity, by class",
        outcome.multiple
    );
    let svg = plot(&title, &outcome.plain, &outcome.gratify);
    let doc = serde_json::json!({ "app": app, "outcome": outcome, "after": extra });
    let _ = std::fs::create_dir_all(out);
    let json = out.join(format!("{app}.json"));
    let picture = out.join(format!("{app}.svg"));
    match serde_json::to_string_pretty(&doc) {
        Ok(text)
            if std::fs::write(&json, &text).is_ok() && std::fs::write(&picture, svg).is_ok() =>
        {
            eprintln!("demo: wrote {} and {}", json.display(), picture.display());
        }
        _ => eprintln!("demo: could not write to {}", out.display()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    gratify_examples::init_logs("warn");
    let args = Args::parse();
    let options = Options {
        multiple: args.multiple,
        seconds: args.seconds,
        seed: args.seed,
        ..Options::default()
    };
    match args.app {
        App::Shop => run_shop(&args.out, options).await,
        App::Game => run_game(&args.out, options).await,
    }
}

async fn run_shop(out: &Path, options: Options) -> ExitCode {
    let (Ok(plain), Ok(wrapped)) = (shop::Shop::in_memory(), shop::Shop::in_memory()) else {
        eprintln!("demo: cannot open the store");
        return ExitCode::FAILURE;
    };
    let model = wrapped.model();
    let routers = (plain.plain_router(), wrapped.router());
    let Some(outcome) = run(routers.0, routers.1, &shop::mix(), &model, options).await else {
        return ExitCode::FAILURE;
    };
    // Every confirmation e-mail leaves before the outbox is counted.
    let drained = wrapped.drain(Duration::from_secs(60)).await;
    let (orders, mails) = wrapped.db().counts().unwrap_or((0, 0));
    let after = serde_json::json!({ "orders": orders, "emails": mails });
    report(out, "shop", "store", &outcome, after);
    println!("gratify: {orders} orders placed, {mails} confirmation e-mails in the outbox.");
    if !(drained.not_run.is_empty() && drained.still_running.is_empty() && drained.dead.is_empty())
    {
        eprintln!("demo: e-mails not sent: {drained:?}");
    }
    plain.shutdown().await;
    wrapped.shutdown().await;
    if orders == mails {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_game(out: &Path, options: Options) -> ExitCode {
    let (Ok(plain), Ok(wrapped)) = (game::Game::new(), game::Game::new()) else {
        eprintln!("demo: cannot start the game backend");
        return ExitCode::FAILURE;
    };
    let model = wrapped.model();
    let routers = (plain.plain_router(), wrapped.router());
    let Some(outcome) = run(routers.0, routers.1, &game::mix(), &model, options).await else {
        return ExitCode::FAILURE;
    };
    let drained = wrapped.drain(Duration::from_secs(60)).await;
    let replays = wrapped.replays_processed();
    let accepted = outcome.gratify.classes.get("replay").map_or(0, |c| c.ok);
    let after = serde_json::json!({ "replays_accepted": accepted, "replays_processed": replays });
    report(out, "game", "game backend", &outcome, after);
    println!("gratify: {accepted} replays accepted, {replays} processed after the run.");
    if !(drained.not_run.is_empty() && drained.still_running.is_empty() && drained.dead.is_empty())
    {
        eprintln!("demo: replays not processed: {drained:?}");
    }
    plain.shutdown().await;
    wrapped.shutdown().await;
    if replays == accepted {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
