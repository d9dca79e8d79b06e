//! Per-request overhead of `AdaptiveLimit` (delay-cost) against tower's
//! `ConcurrencyLimit` and the bare service, on one thread and on two
//! threads contending for one limiter.
//!
//! ```text
//! cargo bench -p gratify-benches --bench limiter_overhead
//! cargo bench -p gratify-benches --bench limiter_overhead -- --quick
//! ```
//!
//! Criterion prints its own statistics; the figures in
//! `target/gratify-bench/limiter_overhead.json` come from a plain timing
//! loop run afterwards in the same process (median of 7 repetitions).
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use gratify_core::CostModel;
use gratify_scaling::limit::AdaptiveLimitLayer;
use gratify_scaling::limit::body::LimitBody;
use http::{Request, Response};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, service_fn};

const MODEL: &str = r#"
[classes.api]
delay_cost = { shape = "linear", per_second = 1.0, deadline = "1s" }
refusal_cost = 1.0
"#;

/// Polls a future that completes without waiting (every service here does).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn one<S, B>(svc: &mut S)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = svc.poll_ready(&mut cx) {
            r.unwrap();
            break;
        }
    }
    let response = now(svc.call(Request::new(())));
    black_box(response.is_ok());
}

fn bare() -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))))
}

fn delay_cost()
-> impl Service<Request<()>, Response = Response<LimitBody<()>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let model = CostModel::from_toml(MODEL).unwrap();
    AdaptiveLimitLayer::new(&model).layer(bare())
}

fn tower_limit()
-> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    ConcurrencyLimitLayer::new(1000).layer(bare())
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("limiter_overhead");
    let mut s = bare();
    g.bench_function("bare", |b| b.iter(|| one(&mut s)));
    let mut s = tower_limit();
    g.bench_function("tower-concurrency-limit", |b| b.iter(|| one(&mut s)));
    let mut s = delay_cost();
    g.bench_function("delay-cost", |b| b.iter(|| one(&mut s)));
    g.finish();
}

criterion_group!(group, benches);

/// Nanoseconds per request over `n` requests on `threads` threads sharing
/// clones of one service.
fn per_request<S, B>(make: &dyn Fn() -> S, threads: usize, n: usize) -> f64
where
    S: Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    let svc = make();
    // Warm up as a long-running service would be (the limiter sizes its
    // timing sample from the completion rate over 100 ms windows).
    let mut warm = svc.clone();
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        for _ in 0..1000 {
            one(&mut warm);
        }
    }
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let mut s = svc.clone();
            scope.spawn(move || {
                for _ in 0..n {
                    one(&mut s);
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / (threads * n) as f64
}

fn median<F: FnMut() -> f64>(mut f: F, reps: usize) -> f64 {
    let mut v: Vec<f64> = (0..reps).map(|_| f()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let only_table = std::env::args().any(|a| a == "--table-only");
    if !only_table {
        let mut c = Criterion::default()
            .configure_from_args()
            .measurement_time(Duration::from_secs(if quick { 1 } else { 3 }));
        group_with(&mut c);
        c.final_summary();
    }

    if std::env::var_os("GRATIFY_CRITERION_ONLY").is_some() {
        return;
    }
    let n = if quick { 100_000 } else { 1_000_000 };
    let mut results = Vec::new();
    println!("\n| subject | threads | ns per request | vs tower ConcurrencyLimit |");
    println!("|---|---:|---:|---:|");
    for threads in [1, 2] {
        let tower = median(|| per_request(&tower_limit, threads, n), 7);
        let rows = [
            ("bare", median(|| per_request(&bare, threads, n), 7)),
            ("tower-concurrency-limit", tower),
            (
                "delay-cost",
                median(|| per_request(&delay_cost, threads, n), 7),
            ),
        ];
        for (subject, ns) in rows {
            println!("| {subject} | {threads} | {ns:.1} | {:.2} |", ns / tower);
            results.push(serde_json::json!({
                "scenario": format!("{threads}-thread"),
                "subject": subject,
                "metrics": { "ns_per_req": ns, "ratio_vs_tower": ns / tower },
            }));
        }
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let doc = serde_json::json!({
        "bench": "limiter_overhead", "quick": quick, "commit": commit, "results": results,
    });
    let dir = std::env::var_os("GRATIFY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-bench"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("limiter_overhead.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}

fn group_with(c: &mut Criterion) {
    benches(c);
}
