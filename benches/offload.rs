//! Offloading: does CPU-heavy work stall the reactor, and who waits when the
//! pool is overloaded?
//!
//! ```text
//! cargo bench -p gratify-benches --bench offload
//! cargo bench -p gratify-benches --bench offload -- --quick   # under 60 s
//! ```
//!
//! Three scenarios, all in process on real time (the quantity measured is
//! how threads share the machine's cores, which a paused clock cannot show):
//!
//! 1. **light-heavy**: a server runtime with one worker thread (the
//!    reactor) takes `/light` requests (~10 µs of CPU) at 1000/s while
//!    `/heavy` requests (5–50 ms of CPU, uniform; Poisson arrivals) offer
//!    50%, 90% and 120% of one core. Variants: `inline` (the heavy work in
//!    the handler), `spawn-blocking`, `spawn-blocking-semaphore` (one
//!    permit, the pool's size) and `gratify-offload` (`OffloadLayer` over a
//!    one-thread `CpuPool`, queue 64, class deadline 1 s). The driver is
//!    open loop on its own thread; a latency runs from the *intended* send
//!    time (no coordinated omission). Requests unfinished 3 s after the
//!    last send count at that censored latency.
//!    **compression hand-off**: the same harness with `/heavy` a 1 MB JSON
//!    response gzipped at level 6, compressed on the reactor
//!    (`compress-inline`) or with `CompressionConfig::offload` set to the
//!    one-thread pool (`compress-offload`), at 50% and 90% of a core.
//! 2. **cd3**: a one-thread pool at 120% load, half `checkout` jobs (1 ms,
//!    10/s of delay) and half `report` jobs (4 ms, 0.1/s); the mean wait of
//!    checkout under `Offloader` (cost rate ÷ run time) over its mean wait
//!    when the same pool runs everything first come, first served.
//! 3. **deferral**: a checkout handler whose confirmation e-mail (20 ms of
//!    I/O, 1 ms of CPU) is awaited inline or handed to `Defer`; checkout
//!    latency at 100/s, and the drain report of the deferred e-mails.
//!
//! Writes `target/gratify-bench/offload.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Rng, percentile};

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gratify::CostModel;
use gratify::compression::{CompressionConfig, CompressionLayer, Level, Levels};
use gratify::offload::{CpuPool, Defer, DeferConfig, OffloadLayer, Offloader};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{Semaphore, mpsc};
use tower::{Layer, ServiceExt, service_fn};

/// Set at the end of a run so that abandoned CPU work stops promptly.
static STOP: AtomicBool = AtomicBool::new(false);

/// Spins `iters` rounds of a cheap mixing function.
fn burn(iters: u64) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ iters;
    for i in 0..iters {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x ^= x >> 33;
        if i % 8192 == 0 && STOP.load(Ordering::Relaxed) {
            break;
        }
    }
    black_box(x)
}

/// Rounds of [`burn`] per microsecond on this machine.
fn calibrate() -> f64 {
    let mut best = 0.0f64;
    for _ in 0..5 {
        let n = 2_000_000;
        let t = Instant::now();
        burn(n);
        best = best.max(n as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    best
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Inline,
    SpawnBlocking,
    SpawnBlockingSemaphore,
    GratifyOffload,
    /// Heavy = a 1 MB JSON response gzipped (level 6) on the reactor.
    CompressInline,
    /// The same, with `CompressionConfig::offload` set to the pool.
    CompressOffload,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::SpawnBlocking => "spawn-blocking",
            Self::SpawnBlockingSemaphore => "spawn-blocking-semaphore",
            Self::GratifyOffload => "gratify-offload",
            Self::CompressInline => "compress-inline",
            Self::CompressOffload => "compress-offload",
        }
    }

    fn compresses(self) -> bool {
        matches!(self, Self::CompressInline | Self::CompressOffload)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Light,
    Heavy,
}

struct Outcome {
    kind: Kind,
    intended: Instant,
    finished: Instant,
    ok: bool,
}

struct LightHeavy {
    light_p99_ms: f64,
    light_p999_ms: f64,
    heavy_throughput: f64,
    heavy_refused: u64,
    light_unfinished: usize,
}

fn heavy_model() -> CostModel {
    CostModel::from_toml(
        r#"
        default_class = "heavy"
        [classes.heavy]
        delay_cost = { shape = "linear", per_second = 1.0, deadline = "1s" }
        refusal_cost = 1.0
        "#,
    )
    .unwrap()
}

/// A 1 MB JSON list, deterministic.
fn big_json() -> Bytes {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < 1 << 20 {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        s.push_str(&format!(
            "{{\"id\":{i},\"sku\":\"SKU-{x:06}\",\"price\":{}.{:02},\"stock\":{}}},",
            x % 500,
            x % 100,
            x % 37
        ));
        i += 1;
    }
    s.push(']');
    Bytes::from(s)
}

/// gzip 6 over `body`, compressing on `pool` when given.
fn compressor(
    body: Bytes,
    pool: Option<CpuPool>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<gratify::compression::CompressionBody<Full<Bytes>>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send {
    let mut config = CompressionConfig::default();
    let mut levels = Levels::default();
    levels.gzip = 6;
    config.level = Level::Fixed(levels);
    config.offload = pool;
    CompressionLayer::with_config(config).layer(service_fn(move |_: Request<()>| {
        let body = body.clone();
        async move {
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    }))
}

/// Milliseconds to gzip `body` once (median of 5).
fn compress_ms(body: &Bytes) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            runtime.block_on(async {
                let request = Request::get("/")
                    .header("accept-encoding", "gzip")
                    .body(())
                    .unwrap();
                let response = compressor(body.clone(), None)
                    .oneshot(request)
                    .await
                    .unwrap();
                response.into_body().collect().await.unwrap();
            });
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

fn light_heavy(variant: Variant, load: f64, secs: f64, per_us: f64, seed: u64) -> LightHeavy {
    STOP.store(false, Ordering::SeqCst);
    let body = big_json();
    // Events: light every millisecond, heavy Poisson at `load` cores.
    let mean_heavy_ms = if variant.compresses() {
        compress_ms(&body)
    } else {
        27.5
    };
    let heavy_rate = load / (mean_heavy_ms / 1000.0);
    let mut rng = Rng(seed);
    let mut events: Vec<(f64, Kind, u64)> = (0..(secs * 1000.0) as u64)
        .map(|i| (i as f64 / 1000.0, Kind::Light, (10.0 * per_us) as u64))
        .collect();
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.next_f64()).ln() / heavy_rate;
        if t >= secs {
            break;
        }
        let ms = 5.0 + 45.0 * rng.next_f64();
        events.push((t, Kind::Heavy, (ms * 1000.0 * per_us) as u64));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));

    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pool = CpuPool::new(Some(1), 64);
    let offload = {
        let _guard = server.enter();
        OffloadLayer::new(pool.clone(), &heavy_model()).layer(service_fn(
            |request: Request<u64>| async move {
                burn(*request.body());
                Ok::<_, Infallible>(Response::new(()))
            },
        ))
    };
    let compress = {
        let _guard = server.enter();
        compressor(
            body,
            (variant == Variant::CompressOffload).then(|| pool.clone()),
        )
    };
    let semaphore = Arc::new(Semaphore::new(1));
    let refused = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();

    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let cutoff = end + Duration::from_secs(3);
    let total = events.len();
    let outcomes = driver.block_on(async {
        for (at, kind, iters) in events {
            let intended = start + Duration::from_secs_f64(at);
            tokio::time::sleep_until(intended.into()).await;
            let tx = tx.clone();
            let offload = offload.clone();
            let compress = compress.clone();
            let semaphore = Arc::clone(&semaphore);
            let refused = Arc::clone(&refused);
            server.spawn(async move {
                let ok = match (kind, variant) {
                    (Kind::Heavy, Variant::CompressInline | Variant::CompressOffload) => {
                        let request = Request::get("/")
                            .header("accept-encoding", "gzip")
                            .body(())
                            .unwrap();
                        let response = compress.oneshot(request).await.unwrap();
                        response.into_body().collect().await.is_ok()
                    }
                    (Kind::Light, _) | (Kind::Heavy, Variant::Inline) => {
                        burn(iters);
                        true
                    }
                    (Kind::Heavy, Variant::SpawnBlocking) => {
                        tokio::task::spawn_blocking(move || burn(iters))
                            .await
                            .is_ok()
                    }
                    (Kind::Heavy, Variant::SpawnBlockingSemaphore) => {
                        let _permit = semaphore.acquire_owned().await.unwrap();
                        tokio::task::spawn_blocking(move || burn(iters))
                            .await
                            .is_ok()
                    }
                    (Kind::Heavy, Variant::GratifyOffload) => {
                        let response = offload.oneshot(Request::new(iters)).await.unwrap();
                        let ok = response.status().is_success();
                        if !ok {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        ok
                    }
                };
                let _ = tx.send(Outcome {
                    kind,
                    intended,
                    finished: Instant::now(),
                    ok,
                });
            });
        }
        drop(tx);
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            match tokio::time::timeout_at(cutoff.into(), rx.recv()).await {
                Ok(Some(o)) => got.push(o),
                _ => break,
            }
        }
        got
    });
    STOP.store(true, Ordering::SeqCst);
    server.shutdown_timeout(Duration::from_secs(2));
    pool.shutdown(Duration::from_secs(1));

    let mut light: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.kind == Kind::Light)
        .map(|o| (o.finished - o.intended).as_secs_f64() * 1e3)
        .collect();
    let light_total = (secs * 1000.0) as usize;
    let light_unfinished = light_total.saturating_sub(light.len());
    // Censored: an unfinished request waited at least until the cutoff.
    let censored_ms = (cutoff - end).as_secs_f64() * 1e3;
    light.extend(std::iter::repeat_n(censored_ms, light_unfinished));
    light.sort_by(f64::total_cmp);
    let heavy_done = outcomes
        .iter()
        .filter(|o| o.kind == Kind::Heavy && o.ok && o.finished <= end)
        .count();
    LightHeavy {
        light_p99_ms: percentile(&light, 0.99),
        light_p999_ms: percentile(&light, 0.999),
        heavy_throughput: heavy_done as f64 / secs,
        heavy_refused: refused.load(Ordering::Relaxed),
        light_unfinished,
    }
}

/// Mean wait (ms) of checkout and report jobs on a one-thread pool at 120%
/// load, by cost (`Some(offloader)`) or first come, first served.
fn cd3(
    offloader: Option<&Offloader>,
    pool: &CpuPool,
    model: &CostModel,
    secs: f64,
    per_us: f64,
    seed: u64,
) -> (f64, f64) {
    let checkout = model.id("checkout").unwrap();
    let report = model.id("report").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mean_ms = 2.5;
    let rate = 1.2 / (mean_ms / 1000.0);
    let mut rng = Rng(seed);
    STOP.store(false, Ordering::SeqCst);
    let start = Instant::now();
    let waits = runtime.block_on(async {
        let mut tasks = Vec::new();
        let mut t = 0.0;
        loop {
            t += -(1.0 - rng.next_f64()).ln() / rate;
            if t >= secs {
                break;
            }
            let is_checkout = rng.next_f64() < 0.5;
            let iters = ((if is_checkout { 1.0 } else { 4.0 }) * 1000.0 * per_us) as u64;
            tokio::time::sleep_until((start + Duration::from_secs_f64(t)).into()).await;
            let submitted = Instant::now();
            let work = move || {
                let began = Instant::now();
                burn(iters);
                began
            };
            let job: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match offloader {
                Some(o) => {
                    let o = o.clone();
                    let class = if is_checkout { checkout } else { report };
                    Box::pin(async move { o.run(class, work).await })
                }
                None => Box::pin(pool.run(0.0, None, work)),
            };
            tasks.push(tokio::spawn(async move {
                let began = job.await.unwrap();
                (is_checkout, (began - submitted).as_secs_f64() * 1e3)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let mean = |want: bool| {
        let w: Vec<f64> = waits
            .iter()
            .filter(|(c, _)| *c == want)
            .map(|(_, w)| *w)
            .collect();
        w.iter().sum::<f64>() / w.len().max(1) as f64
    };
    (mean(true), mean(false))
}

/// Checkout latency (p50, p99 ms) with the e-mail inline or deferred, and
/// (ran, dead, not run) of the deferred e-mails after a drain.
fn deferral(deferred: bool, n: usize, per_us: f64) -> (f64, f64, (usize, usize, usize)) {
    let model = CostModel::from_toml(
        r#"
        default_class = "email"
        [classes.email]
        delay_cost = { shape = "linear", per_second = 0.01, deadline = "10m" }
        refusal_cost = 1.0
        "#,
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    STOP.store(false, Ordering::SeqCst);
    runtime.block_on(async {
        let defer = Defer::start(&model, None, DeferConfig::default().concurrency(8));
        let email_iters = (1000.0 * per_us) as u64;
        let checkout_iters = (200.0 * per_us) as u64;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..n {
            let intended = start + Duration::from_millis(10 * i as u64);
            tokio::time::sleep_until(intended.into()).await;
            let defer = defer.clone();
            let class = model.default_class();
            tasks.push(tokio::spawn(async move {
                burn(checkout_iters);
                let send = move || async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    burn(email_iters);
                    Ok(())
                };
                if deferred {
                    defer.spawn(format!("order-{i}"), class, send).unwrap();
                } else {
                    send().await.unwrap();
                }
                (Instant::now() - intended).as_secs_f64() * 1e3
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.push(t.await.unwrap());
        }
        latencies.sort_by(f64::total_cmp);
        let report = defer.drain(Duration::from_secs(10)).await;
        let ran = usize::try_from(defer.stats().done).unwrap_or(usize::MAX);
        (
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            (
                ran,
                report.dead.len(),
                report.not_run.len() + report.still_running.len(),
            ),
        )
    })
}

/// Runs `variants` (the first is the baseline) at each heavy `load`,
/// printing a table and adding a result per run to `results`.
fn light_heavy_table(
    scenario: &str,
    loads: &[f64],
    variants: &[Variant],
    (secs, per_us, seed): (f64, f64, u64),
    results: &mut Vec<serde_json::Value>,
) {
    println!(
        "| heavy load | variant | light p99 ms | light p99.9 ms | heavy/s done | heavy refused | light unfinished |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &load in loads {
        let mut baseline_p99 = f64::NAN;
        for (i, &variant) in variants.iter().enumerate() {
            let r = light_heavy(variant, load, secs, per_us, seed);
            if i == 0 {
                baseline_p99 = r.light_p99_ms;
            }
            println!(
                "| {:.0}% | {} | {:.2} | {:.2} | {:.1} | {} | {} |",
                load * 100.0,
                variant.name(),
                r.light_p99_ms,
                r.light_p999_ms,
                r.heavy_throughput,
                r.heavy_refused,
                r.light_unfinished
            );
            results.push(serde_json::json!({
                "scenario": format!("{scenario}-{:.0}", load * 100.0),
                "subject": variant.name(),
                "metrics": {
                    "light_p99_ms": r.light_p99_ms,
                    "light_p999_ms": r.light_p999_ms,
                    "heavy_throughput": r.heavy_throughput,
                    "heavy_refused": r.heavy_refused,
                    "light_unfinished": r.light_unfinished,
                    "light_p99_inline_over_this": baseline_p99 / r.light_p99_ms,
                },
            }));
        }
    }
}

/// The bench's arguments.
#[derive(Debug, clap::Parser)]
#[command(name = "offload")]
struct Args {
    /// 2 s runs in place of 10 s.
    #[arg(long)]
    quick: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let quick = <Args as clap::Parser>::parse().quick;
    let secs = if quick { 2.0 } else { 10.0 };
    let per_us = calibrate();
    eprintln!("calibrated: {per_us:.0} rounds/µs");
    let mut results = Vec::new();

    println!("## light-heavy ({secs} s per run, light 1000/s, heavy 5–50 ms)\n");
    light_heavy_table(
        "light-heavy",
        &[0.5, 0.9, 1.2],
        &[
            Variant::Inline,
            Variant::SpawnBlocking,
            Variant::SpawnBlockingSemaphore,
            Variant::GratifyOffload,
        ],
        (secs, per_us, 1),
        &mut results,
    );
    println!("\n## compression hand-off (heavy = 1 MB JSON gzip 6, {secs} s per run)\n");
    light_heavy_table(
        "compress-handoff",
        &[0.5, 0.9],
        &[Variant::CompressInline, Variant::CompressOffload],
        (secs, per_us, 3),
        &mut results,
    );

    let model = CostModel::from_toml(
        r#"
        default_class = "report"
        [classes.checkout]
        delay_cost = { shape = "linear", per_second = 10.0 }
        refusal_cost = 10.0
        [classes.report]
        delay_cost = { shape = "linear", per_second = 0.1 }
        refusal_cost = 1.0
        "#,
    )
    .unwrap();
    let cd3_secs = if quick { 2.0 } else { 5.0 };
    let fifo_pool = CpuPool::new(Some(1), 100_000);
    let (fifo_checkout, fifo_report) = cd3(None, &fifo_pool, &model, cd3_secs, per_us, 2);
    fifo_pool.shutdown(Duration::from_secs(1));
    let pool = CpuPool::new(Some(1), 100_000);
    let offloader = Offloader::new(pool.clone(), &model);
    let (cost_checkout, cost_report) = cd3(Some(&offloader), &pool, &model, cd3_secs, per_us, 2);
    pool.shutdown(Duration::from_secs(1));
    let ratio = cost_checkout / fifo_checkout;
    println!("\n## cd3 (one thread, 120% load, {cd3_secs} s)\n");
    println!("| order | checkout mean wait ms | report mean wait ms |");
    println!("|---|---:|---:|");
    println!("| fifo | {fifo_checkout:.1} | {fifo_report:.1} |");
    println!("| gratify (cost rate ÷ run time) | {cost_checkout:.1} | {cost_report:.1} |");
    println!("\nwait_ratio_vs_fifo (checkout) = {ratio:.3}");
    results.push(serde_json::json!({
        "scenario": "cd3",
        "subject": "gratify-offload",
        "metrics": {
            "checkout_wait_ms": cost_checkout,
            "report_wait_ms": cost_report,
            "fifo_checkout_wait_ms": fifo_checkout,
            "fifo_report_wait_ms": fifo_report,
            "wait_ratio_vs_fifo": ratio,
        },
    }));

    let n = if quick { 300 } else { 1000 };
    println!("\n## deferral ({n} checkouts at 100/s, e-mail 20 ms I/O + 1 ms CPU)\n");
    println!("| e-mail | checkout p50 ms | checkout p99 ms | e-mails ran / dead / not run |");
    println!("|---|---:|---:|---|");
    for deferred in [false, true] {
        let (p50, p99, (ran, dead, not_run)) = deferral(deferred, n, per_us);
        let subject = if deferred { "deferred" } else { "inline" };
        let accounted = if deferred {
            format!("{ran} / {dead} / {not_run}")
        } else {
            "—".to_owned()
        };
        println!("| {subject} | {p50:.2} | {p99:.2} | {accounted} |");
        results.push(serde_json::json!({
            "scenario": "deferral",
            "subject": subject,
            "metrics": { "checkout_p50_ms": p50, "checkout_p99_ms": p99, "ran": ran, "dead": dead, "not_run": not_run },
        }));
    }

    let doc = serde_json::json!({ "bench": "offload", "quick": quick, "commit": common::commit(), "calibration_rounds_per_us": per_us, "results": results });
    common::write("offload", &doc);
}
