//! The demo with a third contender: the store (or the game backend) at a
//! multiple of its capacity, plain, behind what a competent team deploys
//! without gratify (`tower`), and behind gratify — the same traffic to each.
//!
//! ```sh
//! cargo bench -p gratify-benches --bench demo -- shop     # or: game
//! cargo bench -p gratify-benches --bench demo -- shop --seconds 20 --seed 7 --multiple 3
//! ```
//!
//! The `tower` contender is the plain app behind, outermost first:
//! axum's `HandleErrorLayer` (a shed request is a 503, a timeout a 504),
//! tower-http's `CompressionLayer` (its defaults), http-cache-tower-server's
//! `ServerCacheLayer` on moka keyed by method, path and query (its
//! `QueryKeyer`; otherwise its documented defaults: the responses'
//! `Cache-Control`, `Vary`, `Authorization` respected), tower's `LoadShed`,
//! a `GlobalConcurrencyLimit` (one limit for every route) sized from the
//! demo's own capacity probe — capacity × the time an arrival takes alone,
//! the knee of the throughput curve by Little's law — and a `Timeout` of
//! the longest deadline among the app's classes (a single timeout any
//! shorter would cut off requests some class still values). Peers stay in
//! this crate, out of what users and the tests build.
//!
//! It prints the table by class, writes `target/gratify-demo/<app>-vs-tower.json`
//! and `.svg`, and with `--docs` the picture to `docs/img/demo-<app>-vs-tower.svg`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use clap::{Parser, ValueEnum};
use gratify::CostModel;
use gratify_examples::demo::{Contender, Options, Probe, compare_with, plot_all};
use gratify_examples::drive::table_of;
use gratify_examples::{game, shop};
use http::StatusCode;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum App {
    Shop,
    Game,
}

#[derive(Debug, Parser)]
#[command(
    name = "demo",
    about = "plain, tower and gratify under the same overload"
)]
struct Args {
    #[arg(value_enum, default_value_t = App::Shop)]
    app: App,
    #[arg(long, default_value_t = 3.0)]
    multiple: f64,
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also write the picture under docs/img.
    #[arg(long)]
    docs: bool,
    /// The tower contender's concurrency limit, instead of the knee the
    /// probe gives (to see how the comparison moves with the limit).
    #[arg(long)]
    tower_limit: Option<usize>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The longest deadline among the model's classes (5 s if none has one).
fn longest_deadline(model: &CostModel) -> Duration {
    model
        .iter()
        .filter_map(|(_, _, class)| class.deadline())
        .max()
        .unwrap_or(Duration::from_secs(5))
}

/// The plain app behind tower's and tower-http's layers and a cache for
/// tower, sized from the probe.
fn tower(plain: Router, model: &CostModel, fixed_limit: Option<usize>) -> Contender {
    let timeout = longest_deadline(model);
    Contender {
        name: "tower".to_owned(),
        build: Box::new(move |probe: &Probe| {
            let limit = fixed_limit.unwrap_or_else(|| probe.knee()).max(1);
            let cache = http_cache_tower_server::ServerCacheLayer::with_keyer(
                http_cache::MokaManager::new(moka::future::Cache::new(10_000)),
                http_cache_tower_server::QueryKeyer,
            );
            let layers = ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|error: BoxError| async move {
                    if error.is::<tower::load_shed::error::Overloaded>() {
                        (StatusCode::SERVICE_UNAVAILABLE, "overloaded\n".to_owned())
                    } else if error.is::<tower::timeout::error::Elapsed>() {
                        (StatusCode::GATEWAY_TIMEOUT, "timed out\n".to_owned())
                    } else {
                        (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
                    }
                }))
                .layer(tower_http::compression::CompressionLayer::new())
                .layer(cache)
                // http-cache-tower-server calls a clone of its inner service
                // that was never made ready, which `LoadShed` answers as
                // overloaded every time; this makes each call's clone ready
                // first (what axum does for its routes).
                .layer(tower::layer::layer_fn(|inner| ReadyEachCall { inner }))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(limit))
                .timeout(timeout);
            let setup = serde_json::json!({
                "layers": [
                    "HandleErrorLayer (503 shed, 504 timeout)",
                    "tower_http::compression::CompressionLayer (defaults)",
                    "http_cache_tower_server::ServerCacheLayer (moka, QueryKeyer, defaults)",
                    "each call's clone made ready (the cache calls its inner service unready)",
                    "LoadShed",
                    "GlobalConcurrencyLimit",
                    "Timeout",
                ],
                "concurrency_limit": limit,
                "timeout_ms": timeout.as_millis() as u64,
                "probe": probe,
            });
            (plain.layer(layers), setup)
        }),
    }
}

/// Makes a clone of `inner` ready for each call: always ready itself.
#[derive(Clone)]
struct ReadyEachCall<S> {
    inner: S,
}

impl<S, R> tower::Service<R> for ReadyEachCall<S>
where
    S: tower::Service<R> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        use tower::ServiceExt as _;
        Box::pin(self.inner.clone().oneshot(request))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = Options {
        multiple: args.multiple,
        seconds: args.seconds,
        seed: args.seed,
        ..Options::default()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Three instances of the app (plain, behind tower, behind gratify),
        // the same traffic to each, then each stopped.
        macro_rules! three {
            ($new:expr, $mix:expr, $cannot:literal) => {{
                let (Ok(plain), Ok(towered), Ok(wrapped)) = ($new, $new, $new) else {
                    eprintln!($cannot);
                    return ExitCode::FAILURE;
                };
                let model = wrapped.model();
                let others = vec![tower(towered.plain_router(), &model, args.tower_limit)];
                let outcome = compare_with(
                    plain.plain_router(),
                    others,
                    wrapped.router(),
                    &$mix,
                    &model,
                    options,
                    true,
                )
                .await;
                let _ = wrapped.drain(Duration::from_secs(60)).await;
                for app in [&plain, &towered, &wrapped] {
                    app.shutdown().await;
                }
                outcome
            }};
        }
        let (name, title, outcome) = match args.app {
            App::Shop => (
                "shop",
                "store",
                three!(shop::Shop::in_memory(), shop::mix(), "demo: cannot open the store"),
            ),
            App::Game => (
                "game",
                "game backend",
                three!(game::Game::new(), game::mix(), "demo: cannot start the game backend"),
            ),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                eprintln!("demo: {e}");
                return ExitCode::FAILURE;
            }
        };
        let apps = outcome.all();
        println!(
            "\nThe {title} at {:.1}× its capacity ({:.0} arrivals/s for {} s), plain, behind tower and behind gratify:\n",
            outcome.multiple, outcome.rate, outcome.plain.seconds
        );
        println!("{}", table_of(&apps));
        for (label, r) in &apps {
            for (error, n) in &r.errors {
                println!("{label}: {n} × {error}");
            }
        }
        for (label, r) in &apps {
            if let Some(t) = &r.ticks {
                println!("{label}: {}", gratify_examples::play::describe_ticks(t));
            }
        }
        let tower_cost = outcome.others[0].report.total_cost;
        println!(
            "gratify's total cost: {:.3}× tower's ({:.2} against {:.2}); tower's set-up: {}",
            outcome.gratify.total_cost / tower_cost.max(f64::MIN_POSITIVE),
            outcome.gratify.total_cost,
            tower_cost,
            outcome.others[0].setup
        );
        let svg = plot_all(
            &format!("The {title} at {:.1}× its capacity, by class", outcome.multiple),
            &apps,
        );
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-demo");
        let _ = std::fs::create_dir_all(&out);
        let doc = serde_json::json!({
            "app": name,
            "commit": std::process::Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned()),
            "outcome": outcome,
        });
        let suffix = args.tower_limit.map_or_else(String::new, |n| format!("-limit-{n}"));
        let json = out.join(format!("{name}-vs-tower{suffix}.json"));
        let picture = out.join(format!("{name}-vs-tower{suffix}.svg"));
        let written = serde_json::to_string_pretty(&doc)
            .ok()
            .is_some_and(|text| std::fs::write(&json, text).is_ok())
            && std::fs::write(&picture, &svg).is_ok();
        if written {
            eprintln!("demo: wrote {} and {}", json.display(), picture.display());
        } else {
            eprintln!("demo: could not write to {}", out.display());
        }
        if args.docs {
            let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../docs/img/demo-{name}-vs-tower.svg"));
            if std::fs::write(&docs, &svg).is_err() {
                eprintln!("demo: could not write {}", docs.display());
            }
        }
        ExitCode::SUCCESS
    })
}
