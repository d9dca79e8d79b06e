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
//!
//! Then, with a standing queue: 64 client tasks on a two-thread tokio
//! runtime share one service limited to 8 requests at a time (each request
//! yields once to the scheduler before answering, so 56 are always waiting),
//! and the bench counts admissions per second through `AdaptiveLimit`
//! (delay-cost admission, a fixed limit of 8) and through tower's
//! `Buffer` + `ConcurrencyLimit(8)` (median of 5 runs).
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

/// The standing-queue run: `CLIENTS` tasks on a two-thread runtime share
/// one service limited to `LIMIT` at a time.
mod standing {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use gratify_core::CostModel;
    use gratify_scaling::limit::{AdaptiveLimitLayer, Fixed, Limiter, LimiterConfig};
    use http::{Request, Response};
    use tower::buffer::Buffer;
    use tower::limit::ConcurrencyLimit;
    use tower::{Layer, Service, ServiceExt, service_fn};

    pub(crate) const CLIENTS: usize = 64;
    pub(crate) const LIMIT: usize = 8;

    /// Holds its slot across one pass of the scheduler.
    fn inner()
    -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static {
        service_fn(|_: Request<()>| async {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(Response::new(()))
        })
    }

    /// (admitted per second, refused per second) over `run`.
    async fn drive<S>(svc: S, run: Duration) -> (f64, f64)
    where
        S: Service<Request<()>, Response = Response<()>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Debug,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let counting = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (mut svc, stop, ok, refused, counting) = (
                svc.clone(),
                stop.clone(),
                ok.clone(),
                refused.clone(),
                counting.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let response = svc.ready().await.unwrap().call(Request::new(())).await;
                    let counted = counting.load(Ordering::Relaxed);
                    match response {
                        Ok(r) if r.status().is_success() => {
                            if counted {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            if counted {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }));
        }
        // A warm-up, then the measured run.
        tokio::time::sleep(Duration::from_millis(200)).await;
        counting.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(run).await;
        counting.store(false, Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        (
            ok.load(Ordering::Relaxed) as f64 / secs,
            refused.load(Ordering::Relaxed) as f64 / secs,
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// tower's `Buffer` in front of `ConcurrencyLimit(LIMIT)`.
    pub(crate) fn tower(run: Duration) -> (f64, f64) {
        runtime().block_on(async {
            let svc = Buffer::new(ConcurrencyLimit::new(inner(), LIMIT), 1024);
            drive(svc, run).await
        })
    }

    /// `AdaptiveLimit`, delay-cost admission over a fixed limit of `LIMIT`.
    pub(crate) fn delay_cost(run: Duration) -> (f64, f64) {
        runtime().block_on(async {
            let model = CostModel::from_toml(super::MODEL).unwrap();
            let limiter =
                Limiter::with_algorithm(&model, Fixed::new(LIMIT), LimiterConfig::default());
            let svc = AdaptiveLimitLayer::with_limiter(limiter).layer(inner());
            let svc = svc.map_response(|r| r.map(|_| ()));
            drive(svc, run).await
        })
    }
}

fn main() {
    // Criterion reads the command line (`configure_from_args`) and ignores
    // what it does not know; these flags are read beside it, by hand, as a
    // parser of our own would refuse criterion's.
    let quick = std::env::args().any(|a| a == "--quick");
    let only_table = std::env::args().any(|a| a == "--table-only");
    // Only the standing-queue run.
    let standing_only = std::env::args().any(|a| a == "--standing-only");
    if !only_table && !standing_only {
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
    for threads in if standing_only { &[][..] } else { &[1, 2][..] } {
        let threads = *threads;
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
    let run = Duration::from_millis(if quick { 1000 } else { 3000 });
    println!(
        "\n| subject (standing queue: {} clients, limit {}, 2 threads) | admissions/s | refusals/s | vs tower Buffer + ConcurrencyLimit |",
        standing::CLIENTS,
        standing::LIMIT
    );
    println!("|---|---:|---:|---:|");
    let pair = |f: &dyn Fn(Duration) -> (f64, f64)| {
        let mut v: Vec<(f64, f64)> = (0..5).map(|_| f(run)).collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        eprintln!(
            "runs (admissions/s): {:?}",
            v.iter().map(|x| x.0.round()).collect::<Vec<_>>()
        );
        v[v.len() / 2]
    };
    let tower = pair(&standing::tower);
    let ours = pair(&standing::delay_cost);
    for (subject, (ok, refused)) in [
        ("tower-buffer-concurrency-limit", tower),
        ("delay-cost", ours),
    ] {
        println!(
            "| {subject} | {ok:.0} | {refused:.0} | {:.2} |",
            ok / tower.0
        );
        results.push(serde_json::json!({
            "scenario": "standing-queue-2-thread",
            "subject": subject,
            "metrics": { "admissions_per_sec": ok, "refusals_per_sec": refused, "ratio_vs_tower": ok / tower.0 },
        }));
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
