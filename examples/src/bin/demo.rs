//! `demo`: the e-commerce store under overload, plain and wrapped in gratify.
//!
//! ```text
//! cargo run --release -p gratify-examples --bin demo
//! cargo run --release -p gratify-examples --bin demo -- --multiple 3 --seconds 15
//! ```
//!
//! Starts two copies of the store on loopback — the plain app and the app
//! behind its `Stack` — measures what the plain one can serve of the mix
//! (closed loop, a few seconds), then sends the same open-loop traffic at a
//! multiple of that to each, and prints the per-class report. Writes it as
//! JSON to `target/gratify-demo/report.json`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use clap::Parser;
use gratify_examples::drive::{Load, Report, drive, table};
use gratify_examples::shop::{Shop, mix};
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceExt};

/// The e-commerce store under overload, plain and wrapped in gratify.
#[derive(Debug, Parser)]
#[command(name = "demo", version, about)]
struct Args {
    /// The load, as a multiple of what the plain app can serve.
    #[arg(long, default_value_t = 3.0)]
    multiple: f64,
    /// Seconds of traffic per app.
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// The seed of the traffic.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

async fn serve(app: axum::Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app.into_make_service()).await });
    Ok(addr)
}

/// A client of the server at `addr`, as a tower service of relative requests.
fn client(
    addr: SocketAddr,
) -> impl Service<
    Request<Body>,
    Response = http::Response<hyper::body::Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http::<Body>();
    tower::ServiceBuilder::new()
        .map_request(move |mut r: Request<Body>| {
            if let Ok(uri) = format!("http://{addr}{}", r.uri()).parse() {
                *r.uri_mut() = uri;
            }
            r
        })
        .service(http)
}

/// Arrivals per second the plain app completes, closed loop, 32 at a time.
async fn capacity(addr: SocketAddr, seconds: f64) -> f64 {
    let mix = mix();
    let done = Arc::new(AtomicU64::new(0));
    let until = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let mut workers = Vec::new();
    for w in 0..32u64 {
        let svc = client(addr);
        let mix = mix.clone();
        let done = Arc::clone(&done);
        workers.push(tokio::spawn(async move {
            let mut n = w;
            while tokio::time::Instant::now() < until {
                let kind = &mix.kinds[(n % mix.kinds.len() as u64) as usize];
                for (method, path) in
                    (kind.build)(n * 7919 + 1_000_000, n.wrapping_mul(0x9E37_79B9))
                {
                    let request = Request::builder()
                        .method(method)
                        .uri(path)
                        .header("host", "shop.example")
                        .body(Body::empty());
                    let Ok(request) = request else { continue };
                    if let Ok(r) = svc.clone().oneshot(request).await {
                        let _ = r.into_body().collect().await;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                n += 32;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    done.load(Ordering::Relaxed) as f64 / seconds
}

fn bar(label: &'static str) -> impl Fn(f64) + Sync {
    let shown = std::sync::atomic::AtomicUsize::new(usize::MAX);
    move |f: f64| {
        let filled = (f.clamp(0.0, 1.0) * 30.0) as usize;
        // Redraw only when the bar grows.
        if shown.swap(filled, Ordering::Relaxed) == filled && f < 1.0 {
            return;
        }
        eprint!(
            "\r{label} [{}{}] {:>3.0}%",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            f * 100.0
        );
        let _ = std::io::stderr().flush();
        if f >= 1.0 {
            eprintln!();
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (Ok(plain), Ok(wrapped)) = (Shop::in_memory(), Shop::in_memory()) else {
        eprintln!("demo: cannot open the store");
        return std::process::ExitCode::FAILURE;
    };
    let (Ok(plain_addr), Ok(wrapped_addr)) = (
        serve(plain.plain_router()).await,
        serve(wrapped.router()).await,
    ) else {
        eprintln!("demo: cannot listen on 127.0.0.1");
        return std::process::ExitCode::FAILURE;
    };
    eprintln!(
        "demo: plain app on http://{plain_addr}, gratify on http://{wrapped_addr} (dashboard /ops/admin/)"
    );
    let cap = capacity(plain_addr, 3.0).await;
    let rate = cap * args.multiple;
    eprintln!(
        "demo: the plain app serves about {cap:.0} arrivals/s of the mix; sending {rate:.0}/s ({}×) for {} s to each",
        args.multiple, args.seconds
    );
    let model = wrapped.model();
    let load = Load {
        rate,
        seconds: args.seconds,
        timeout: Duration::from_secs(10),
        seed: args.seed,
        max_in_flight: 4096,
    };
    let mix = mix();
    let a: Report = drive(client(plain_addr), &mix, &model, load, &bar("plain  ")).await;
    let b: Report = drive(client(wrapped_addr), &mix, &model, load, &bar("gratify")).await;
    // Every confirmation e-mail leaves before the figures are read.
    let drained = wrapped.drain(Duration::from_secs(60)).await;
    if !(drained.not_run.is_empty() && drained.still_running.is_empty() && drained.dead.is_empty())
    {
        eprintln!("demo: e-mails not sent: {drained:?}");
    }
    let (orders, mails) = wrapped.db().counts().unwrap_or((0, 0));
    println!(
        "\nThe store at {:.1}× its capacity ({rate:.0} arrivals/s for {} s), plain and behind gratify:\n",
        args.multiple, args.seconds
    );
    println!("{}", table(&a, &b));
    println!("gratify: {orders} orders placed, {mails} confirmation e-mails in the outbox.");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-demo");
    let _ = std::fs::create_dir_all(&dir);
    let doc = serde_json::json!({
        "capacity_per_s": cap, "multiple": args.multiple, "rate": rate,
        "plain": a, "gratify": b, "orders": orders, "emails": mails,
    });
    let path = dir.join("report.json");
    match serde_json::to_string_pretty(&doc) {
        Ok(text) if std::fs::write(&path, &text).is_ok() => {
            eprintln!("demo: wrote {}", path.display());
        }
        _ => eprintln!("demo: could not write {}", path.display()),
    }
    plain.shutdown().await;
    wrapped.shutdown().await;
    std::process::ExitCode::SUCCESS
}
