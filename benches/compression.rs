//! Compression throughput and ratio, gratify against tower-http's
//! `CompressionLayer` at the same codec and level, on deterministic corpora.
//!
//! ```text
//! cargo bench -p gratify-benches --bench compression
//! cargo bench -p gratify-benches --bench compression -- --quick
//! cargo bench -p gratify-benches --bench compression -- --quick overload   # one part
//! ```
//!
//! Three parts (name one or more of `throughput`, `overload`, `cached` after
//! `--` to run only those):
//!
//! 1. **throughput**: each subject runs in process on one thread: a request
//!    through the layer to a handler that returns the corpus, the compressed
//!    body collected. Throughput is input megabytes per second of wall time
//!    (median of 5 runs); ratio is compressed size over input size.
//! 2. **overload**: a server runtime with one worker thread (one core) serves
//!    100 KB JSON to open-loop Poisson arrivals stepped through 20% → 90% →
//!    120% → 20% of the capacity of `tower-http-default` (measured first, in
//!    the same run), for two clients: a browser (`gzip, deflate, br, zstd`)
//!    and a gzip-only client; then the same where requests wait for a pool
//!    of 4 database connections held 4 ms each (its capacity measured first),
//!    not for the CPU (`-- overload database-only` runs only these). Subjects: `tower-http-default` (tower-http's
//!    `CompressionLayer::new()`), `gratify-fixed-gzip-1`, and
//!    `gratify-adaptive` (`CompressionLayer::adaptive` reading the load
//!    signal of an `AdaptiveLimitLayer` in front, which holds slots to the
//!    end of the body and never sheds the one class: its only job here is to
//!    say what a slot costs), and the same with `CpuScarcity::Always` (every
//!    CPU-second priced at a slot-second whenever requests queue). A latency runs from the *intended* send time to
//!    the last byte compressed; CPU is the time spent inside the subject's
//!    polls. `total_cost` prices every response by the model below: delay
//!    cost of latency plus transfer time at 5 MB/s, CPU seconds and bytes
//!    sent.
//! 3. **cached**: a cached, compressed-once body against compressing per
//!    request.
//!
//! Writes `target/gratify-bench/compression.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Rng, percentile};

use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gratify::CostModel;
use gratify::compression::{
    Codec, CompressionConfig, CompressionLayer, CpuScarcity, Level, Levels,
};
use gratify::scaling::limit::{AdaptiveLimitLayer, DelayCostLimit, Limiter, LimiterConfig};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_http::CompressionLevel;

fn api_json(target: usize) -> Bytes {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < target {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        s.push_str(&format!(
            "{{\"id\":{i},\"sku\":\"SKU-{x:06}\",\"name\":\"Product {x}\",\"price\":{}.{:02},\"stock\":{},\"tags\":[\"shoes\",\"sale\"],\"rating\":{}.{}}},",
            x % 500,
            x % 100,
            x % 37,
            x % 5,
            x % 10
        ));
        i += 1;
    }
    s.truncate(target.saturating_sub(1));
    s.push(']');
    Bytes::from(s)
}

fn html_page() -> Bytes {
    let mut s = String::from(
        "<!doctype html><html><head><title>Shop</title><style>body{font-family:sans-serif}</style></head><body><ul>",
    );
    for i in 0..600 {
        s.push_str(&format!(
            "<li class=\"product\"><a href=\"/products/{i}\">Product {i}</a><span class=\"price\">{}.99</span></li>",
            i % 90
        ));
    }
    s.push_str("</ul></body></html>");
    Bytes::from(s)
}

fn corpora() -> Vec<(&'static str, Bytes)> {
    vec![
        ("json-1k", api_json(1024)),
        ("json-10k", api_json(10 * 1024)),
        ("json-100k", api_json(100 * 1024)),
        ("json-1m", api_json(1024 * 1024)),
        ("html", html_page()),
        ("tiny-200b", api_json(200)),
    ]
}

/// An origin answering `body` as JSON after `io` of simulated I/O (none when
/// zero), with `cache_control` if given.
fn origin(
    body: Bytes,
    io: Duration,
    cache_control: Option<&'static str>,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_: Request<()>| {
        let body = body.clone();
        async move {
            if !io.is_zero() {
                tokio::time::sleep(io).await;
            }
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            if let Some(cc) = cache_control {
                r.headers_mut().insert("cache-control", cc.parse().unwrap());
            }
            Ok::<_, Infallible>(r)
        }
    })
}

fn handler(
    body: Bytes,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    origin(body, Duration::ZERO, None)
}

/// The I/O-bound handler: each request holds one of `pool`'s database
/// connections for `hold` before it answers; the database, not the CPU, is
/// what requests wait for.
fn db_pool_handler(
    body: Bytes,
    pool: std::sync::Arc<tokio::sync::Semaphore>,
    hold: Duration,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_: Request<()>| {
        let (body, pool) = (body.clone(), pool.clone());
        async move {
            let connection = pool.acquire_owned().await.unwrap();
            tokio::time::sleep(hold).await;
            drop(connection);
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    })
}

/// The database of the I/O-bound run: 4 connections, each request holding
/// one for 4 ms (nominally 1,000 requests a second; measured by
/// `db_capacity`).
const DB_CONNECTIONS: usize = 4;
const DB_HOLD: Duration = Duration::from_millis(4);

/// Requests per second the database pool serves (the handler alone, without
/// compression, 64 callers at once on the one-thread server for a second):
/// tokio's millisecond timer makes each hold a little longer than asked.
fn db_capacity() -> f64 {
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let body = api_json(100 * 1024);
    let pool = std::sync::Arc::new(tokio::sync::Semaphore::new(DB_CONNECTIONS));
    let svc = db_pool_handler(body, pool, DB_HOLD);
    server.block_on(async move {
        let start = Instant::now();
        let until = start + Duration::from_secs(1);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let callers: Vec<_> = (0..64)
            .map(|_| {
                let (svc, done) = (svc.clone(), done.clone());
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let r = svc.clone().oneshot(Request::new(())).await.unwrap();
                        std::hint::black_box(r);
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        // The last requests end after `until`: divide by the time taken.
        done.load(std::sync::atomic::Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
    })
}

/// Requests per second through `svc` for a zstd-accepting client.
async fn requests_per_second<S, B>(svc: S, n: usize) -> f64
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let req = || {
        Request::get("/catalogue")
            .header("host", "bench.example")
            .header("accept-encoding", "zstd")
            .body(())
            .unwrap()
    };
    // Warm (fills the cache).
    let _ = svc
        .clone()
        .oneshot(req())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let r = svc.clone().oneshot(req()).await.unwrap();
        std::hint::black_box(r.into_body().collect().await.unwrap().to_bytes().len());
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// (MB/s, ratio) for `n` requests through `svc`.
async fn measure<S, B>(svc: S, accept: &str, input: usize, n: usize) -> (f64, f64)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut runs = Vec::new();
    let mut out_len = 0;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..n {
            let req = Request::get("/")
                .header("accept-encoding", accept)
                .body(())
                .unwrap();
            let r = svc.clone().oneshot(req).await.unwrap();
            out_len = r.into_body().collect().await.unwrap().to_bytes().len();
        }
        runs.push((input * n) as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    runs.sort_by(f64::total_cmp);
    (runs[2], out_len as f64 / input as f64)
}

/// The model of the overload run, in plausible money: a second of delay on
/// an API response costs 0.001, a core-second 1.1e-5 (about 0.04 an hour),
/// a byte sent 9e-11 (0.09 a GB of egress); a refusal 0.01.
fn overload_model() -> CostModel {
    CostModel::from_toml(
        r#"
        default_class = "api"
        [prices]
        cpu_second = 1.1e-5
        byte_sent = 9e-11
        [classes.api]
        delay_cost = { shape = "linear", per_second = 0.001 }
        refusal_cost = 0.01
        "#,
    )
    .unwrap()
}

/// The assumed client bandwidth (bytes/s) for the transfer part of the cost.
const BANDWIDTH: f64 = 5e6;

/// One response of the overload run.
struct Sent {
    phase: usize,
    intended: Instant,
    finished: Instant,
    bytes: usize,
    cpu: Duration,
    ok: bool,
    encoding: Option<String>,
}

/// One request through `svc`, timing only the polls of the subject (on a
/// one-thread server that is the CPU the request used).
async fn timed_call<S, B>(svc: S, accept: &'static str) -> (bool, usize, Duration, Option<String>)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
{
    let mut cpu = Duration::ZERO;
    let request = Request::get("/catalogue")
        .header("host", "bench.example")
        .header("accept-encoding", accept)
        .body(())
        .unwrap();
    let mut call = pin!(svc.oneshot(request));
    let response = poll_fn(|cx| {
        let t = Instant::now();
        let r = call.as_mut().poll(cx);
        cpu += t.elapsed();
        r
    })
    .await;
    let Ok(response) = response;
    let ok = response.status().is_success();
    let encoding = response
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = pin!(response.into_body());
    let mut bytes = 0;
    loop {
        let frame = poll_fn(|cx| {
            let t = Instant::now();
            let r = body.as_mut().poll_frame(cx);
            cpu += t.elapsed();
            r
        })
        .await;
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    bytes += data.len();
                }
            }
            Some(Err(_)) => return (false, bytes, cpu, encoding),
            None => break,
        }
    }
    (ok, bytes, cpu, encoding)
}

/// Requests per second one core serves back to back through `svc` (median
/// of 5 runs): the server's capacity.
fn capacity<S, B>(svc: S, accept: &'static str, n: usize) -> f64
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: Body<Data = Bytes>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            runtime.block_on(async {
                for _ in 0..n {
                    std::hint::black_box(timed_call(svc.clone(), accept).await);
                }
            });
            n as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

/// The overload phases, as fractions of capacity.
const PHASES: [(&str, f64); 4] = [
    ("20pct", 0.2),
    ("90pct", 0.9),
    ("120pct", 1.2),
    ("20pct-after", 0.2),
];

/// Runs the stepped load against the service `make` builds (inside the
/// one-thread server runtime).
fn stepped<S, B>(
    make: impl FnOnce() -> S,
    accept: &'static str,
    rate: f64,
    phase_secs: f64,
    seed: u64,
) -> Vec<Sent>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
{
    let mut rng = Rng(seed);
    let mut arrivals = Vec::new();
    for (phase, (_, fraction)) in PHASES.iter().enumerate() {
        let begin = phase as f64 * phase_secs;
        let mut t = begin;
        loop {
            t += -(1.0 - rng.next_f64()).ln() / (rate * fraction);
            if t >= begin + phase_secs {
                break;
            }
            arrivals.push((phase, t));
        }
    }
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let svc = {
        let _guard = server.enter();
        make()
    };
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now() + Duration::from_millis(50);
    // Time for the backlog of the 120% phase to drain.
    let cutoff = start + Duration::from_secs_f64(phase_secs * PHASES.len() as f64 + 60.0);
    let total = arrivals.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sent = driver.block_on(async {
        for (phase, at) in arrivals {
            let intended = start + Duration::from_secs_f64(at);
            tokio::time::sleep_until(intended.into()).await;
            let svc = svc.clone();
            let tx = tx.clone();
            server.spawn(async move {
                let (ok, bytes, cpu, encoding) = timed_call(svc, accept).await;
                let _ = tx.send(Sent {
                    phase,
                    intended,
                    finished: Instant::now(),
                    bytes,
                    cpu,
                    ok,
                    encoding,
                });
            });
        }
        drop(tx);
        let mut got = Vec::with_capacity(total);
        while got.len() < total {
            match tokio::time::timeout_at(cutoff.into(), rx.recv()).await {
                Ok(Some(s)) => got.push(s),
                _ => break,
            }
        }
        got
    });
    server.shutdown_timeout(Duration::from_secs(1));
    assert_eq!(
        sent.len(),
        total,
        "unfinished requests 60 s after the last send"
    );
    sent
}

/// The metrics of one subject's overload run.
fn overload_metrics(
    sent: &[Sent],
    model: &CostModel,
) -> serde_json::Map<String, serde_json::Value> {
    let class = model.class(model.default_class());
    let prices = model.prices();
    let latency = |s: &Sent| (s.finished - s.intended).as_secs_f64();
    let p99 = |filter: &dyn Fn(&Sent) -> bool| {
        let mut v: Vec<f64> = sent.iter().filter(|s| filter(s)).map(latency).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.99) * 1e3
    };
    let mut m = serde_json::Map::new();
    m.insert("p99_ms".into(), p99(&|_| true).into());
    for (i, (name, _)) in PHASES.iter().enumerate() {
        m.insert(format!("p99_ms.{name}"), p99(&|s| s.phase == i).into());
    }
    let bytes: usize = sent.iter().map(|s| s.bytes).sum();
    let cpu: f64 = sent.iter().map(|s| s.cpu.as_secs_f64()).sum();
    let refused = sent.iter().filter(|s| !s.ok).count();
    let cost: f64 = sent
        .iter()
        .map(|s| {
            if s.ok {
                class.response_cost(Duration::from_secs_f64(
                    latency(s) + s.bytes as f64 / BANDWIDTH,
                ))
            } else {
                class.refusal_cost()
            }
        })
        .sum::<f64>()
        + prices.cpu_second * cpu
        + prices.byte_sent * bytes as f64;
    m.insert("bytes_out".into(), bytes.into());
    m.insert("cpu_s".into(), cpu.into());
    m.insert("total_cost".into(), cost.into());
    m.insert("requests".into(), sent.len().into());
    m.insert("refused".into(), refused.into());
    // The codings of the answers (a refusal is not an identity answer).
    let answered: Vec<&Sent> = sent.iter().filter(|s| s.ok).collect();
    let mut codings: Vec<(String, usize)> = Vec::new();
    for s in &answered {
        let name = s.encoding.clone().unwrap_or_else(|| "identity".into());
        match codings.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => codings.push((name, 1)),
        }
    }
    for (name, count) in codings {
        m.insert(
            format!("share.{name}"),
            (count as f64 / answered.len().max(1) as f64).into(),
        );
    }
    let at_120: Vec<&Sent> = answered.iter().copied().filter(|s| s.phase == 2).collect();
    let mut codings: Vec<(String, usize)> = Vec::new();
    for s in &at_120 {
        let name = s.encoding.clone().unwrap_or_else(|| "identity".into());
        match codings.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => codings.push((name, 1)),
        }
    }
    for (name, count) in codings {
        m.insert(
            format!("share_120pct.{name}"),
            (count as f64 / at_120.len().max(1) as f64).into(),
        );
    }
    m
}

/// What requests wait for in an overload run.
#[derive(Clone, Copy, PartialEq)]
enum Bottleneck {
    /// The one core: the handler's 1 ms of I/O overlaps, compression does not.
    Cpu,
    /// A pool of `DB_CONNECTIONS` database connections.
    Database,
}

/// The handler of a run: what it waits for, fresh for each subject.
fn bottleneck_handler(
    bottleneck: Bottleneck,
    body: Bytes,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let (pool, hold) = match bottleneck {
        // The 1 ms database read of the CPU-bound run never waits for a
        // connection.
        Bottleneck::Cpu => (1 << 20, Duration::from_millis(1)),
        Bottleneck::Database => (DB_CONNECTIONS, DB_HOLD),
    };
    db_pool_handler(
        body,
        std::sync::Arc::new(tokio::sync::Semaphore::new(pool)),
        hold,
    )
}

/// The overload part: one table row per scenario (client and bottleneck)
/// and subject.
fn overload(quick: bool, results: &mut Vec<serde_json::Value>) {
    let body = api_json(100 * 1024);
    let model = overload_model();
    let phase_secs = if quick { 1.25 } else { 8.0 };
    println!(
        "\n| scenario | subject | p99 ms | p99 ms at 120% | bytes out | bytes / tower-http | p99 / tower-http | CPU s | total cost | refused | codings | codings at 120% |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    let only_database = <Args as clap::Parser>::parse()
        .parts
        .iter()
        .any(|a| a == "database-only");
    for bottleneck in [Bottleneck::Cpu, Bottleneck::Database] {
        if only_database && bottleneck == Bottleneck::Cpu {
            continue;
        }
        for (client, accept) in [
            ("browser", "gzip, deflate, br, zstd"),
            ("gzip-only", "gzip"),
        ] {
            overload_scenario(
                bottleneck, client, accept, &body, &model, quick, phase_secs, results,
            );
        }
    }
}

/// One scenario of the overload part.
#[allow(clippy::too_many_arguments)]
fn overload_scenario(
    bottleneck: Bottleneck,
    client: &str,
    accept: &'static str,
    body: &Bytes,
    model: &CostModel,
    quick: bool,
    phase_secs: f64,
    results: &mut Vec<serde_json::Value>,
) {
    let handler_of = || bottleneck_handler(bottleneck, body.clone());
    let (scenario, rate) = match bottleneck {
        Bottleneck::Cpu => {
            // Capacity: the handler without its I/O wait, back to back.
            let rate = capacity(
                tower_http::compression::CompressionLayer::new().layer(handler(body.clone())),
                accept,
                if quick { 200 } else { 600 },
            );
            (format!("{client}, cpu-bound"), rate)
        }
        Bottleneck::Database => (format!("{client}, database-bound"), db_capacity()),
    };
    eprintln!("{scenario}: capacity {rate:.0} requests/s");
    let mut rows: Vec<(&str, serde_json::Map<String, serde_json::Value>)> = Vec::new();
    let seed = 7;
    let sent = stepped(
        || tower_http::compression::CompressionLayer::new().layer(handler_of()),
        accept,
        rate,
        phase_secs,
        seed,
    );
    rows.push(("tower-http-default", overload_metrics(&sent, model)));
    let sent = stepped(
        || {
            let mut levels = Levels::default();
            levels.gzip = 1;
            let mut config = CompressionConfig::default();
            config.codecs = vec![Codec::Gzip];
            config.level = Level::Fixed(levels);
            CompressionLayer::with_config(config).layer(handler_of())
        },
        accept,
        rate,
        phase_secs,
        seed,
    );
    rows.push(("gratify-fixed-gzip-1", overload_metrics(&sent, model)));
    for (subject, scarcity) in [
        ("gratify-adaptive", CpuScarcity::Runtime),
        ("gratify-adaptive-cpu-always-scarce", CpuScarcity::Always),
    ] {
        let sent = stepped(
            || {
                let class = model.default_class();
                let mut config = LimiterConfig::default();
                config.never_shed = vec![(class, 4096)];
                config.max_queue = 4096;
                config.max_queue_time = Duration::from_secs(60);
                let limiter = Limiter::with_algorithm(model, DelayCostLimit::new(model), config);
                let signal = limiter.load_signal().clone();
                let mut compression = CompressionConfig::default();
                compression.level = Level::Adaptive;
                compression.cpu_scarcity = scarcity;
                tower::ServiceBuilder::new()
                    .layer(AdaptiveLimitLayer::with_limiter(limiter).hold_until_body_end(true))
                    .layer(CompressionLayer::adaptive_with_config(
                        compression,
                        model,
                        signal,
                    ))
                    .service(handler_of())
            },
            accept,
            rate,
            phase_secs,
            seed,
        );
        rows.push((subject, overload_metrics(&sent, model)));
    }
    let base_p99 = rows[0].1["p99_ms"].as_f64().unwrap();
    let base_bytes = rows[0].1["bytes_out"].as_f64().unwrap();
    for (subject, mut metrics) in rows {
        let p99 = metrics["p99_ms"].as_f64().unwrap();
        let bytes = metrics["bytes_out"].as_f64().unwrap();
        metrics.insert("p99_vs_tower_http_default".into(), (p99 / base_p99).into());
        metrics.insert(
            "bytes_vs_tower_http_default".into(),
            (bytes / base_bytes).into(),
        );
        metrics.insert("capacity_rps".into(), rate.into());
        let codings = |prefix: &str| {
            metrics
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(prefix)
                        .map(|c| format!("{c} {:.0}%", v.as_f64().unwrap_or(0.0) * 100.0))
                })
                .collect::<Vec<String>>()
                .join(", ")
        };
        println!(
            "| {scenario} | {subject} | {p99:.1} | {:.1} | {bytes:.0} | {:.2} | {:.2} | {:.2} | {:.4} | {} | {} | {} |",
            metrics["p99_ms.120pct"].as_f64().unwrap(),
            bytes / base_bytes,
            p99 / base_p99,
            metrics["cpu_s"].as_f64().unwrap(),
            metrics["total_cost"].as_f64().unwrap(),
            metrics["refused"],
            codings("share."),
            codings("share_120pct."),
        );
        results.push(serde_json::json!({
            "scenario": format!("overload-{}", scenario.replace(", ", "-")),
            "subject": subject,
            "metrics": metrics,
        }));
    }
}

/// The bench's arguments (an unknown part is an error).
#[derive(Debug, clap::Parser)]
#[command(name = "compression")]
struct Args {
    /// Shorter runs.
    #[arg(long)]
    quick: bool,
    /// Parts to run (all when none); `database-only` skips the overload
    /// part's CPU-bound mix.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new([
        "throughput", "overload", "cached", "database-only",
    ]))]
    parts: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let quick = args.quick;
    let parts = ["throughput", "overload", "cached"];
    let named: Vec<&str> = parts
        .iter()
        .copied()
        .filter(|p| args.parts.iter().any(|a| a == p))
        .collect();
    let run = |part: &str| named.is_empty() || named.contains(&part);
    let mut results = Vec::new();
    if run("throughput") {
        throughput(quick, &mut results);
    }
    if run("overload") {
        overload(quick, &mut results);
    }
    if run("cached") {
        cached(quick, &mut results);
    }
    let doc = serde_json::json!({ "bench": "compression", "quick": quick, "commit": common::commit(), "results": results });
    common::write("compression", &doc);
}

/// The throughput part: gratify against tower-http at the same settings.
fn throughput(quick: bool, results: &mut Vec<serde_json::Value>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings: [(&str, Codec, i32); 5] = [
        ("gzip", Codec::Gzip, 1),
        ("gzip", Codec::Gzip, 6),
        ("br", Codec::Brotli, 4),
        ("zstd", Codec::Zstd, 1),
        ("zstd", Codec::Zstd, 3),
    ];
    println!(
        "| corpus | codec | level | tower-http MB/s | gratify MB/s | gratify / tower-http | tower-http ratio | gratify ratio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    runtime.block_on(async {
        for (corpus, body) in corpora() {
            // About 4 MB per run (1 MB in quick mode), at least 20 requests.
            let budget = if quick { 1 << 20 } else { 4 << 20 };
            let n = (budget / body.len()).max(20);
            for (name, codec, level) in settings {
                let tower = tower_http::compression::CompressionLayer::new()
                    .quality(CompressionLevel::Precise(level))
                    .layer(handler(body.clone()));
                let mut levels = Levels::default();
                match codec {
                    Codec::Gzip => levels.gzip = level,
                    Codec::Brotli => levels.brotli = level,
                    Codec::Zstd => levels.zstd = level,
                    _ => levels.deflate = level,
                }
                let mut config = CompressionConfig::default();
                config.level = Level::Fixed(levels);
                let ours = CompressionLayer::with_config(config).layer(handler(body.clone()));
                let (t_speed, t_ratio) = measure(tower, name, body.len(), n).await;
                let (g_speed, g_ratio) = measure(ours, name, body.len(), n).await;
                println!(
                    "| {corpus} | {name} | {level} | {t_speed:.1} | {g_speed:.1} | {:.2} | {t_ratio:.3} | {g_ratio:.3} |",
                    g_speed / t_speed
                );
                for (subject, speed, ratio) in [
                    (format!("tower-http-{name}-{level}"), t_speed, t_ratio),
                    (format!("gratify-{name}-{level}"), g_speed, g_ratio),
                ] {
                    results.push(serde_json::json!({
                        "scenario": corpus,
                        "subject": subject,
                        "metrics": { "mb_per_s": speed, "ratio": ratio },
                    }));
                }
            }
        }
    });
}

/// The cached part: cached-compressed against compress-per-request, 100 KB
/// JSON, zstd.
fn cached(quick: bool, results: &mut Vec<serde_json::Value>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = api_json(100 * 1024);
    let n = if quick { 300 } else { 1500 };
    let (per_request, cached) = runtime.block_on(async {
        let compress = CompressionLayer::new().layer(handler(body.clone()));
        let mut config = gratify::cache::HttpCacheConfig::default();
        config.recoder = Some(std::sync::Arc::new(gratify::compression::Recompress::new()));
        let cache = gratify::cache::HttpCacheLayer::new(config).layer(origin(
            body.clone(),
            Duration::ZERO,
            Some("public, max-age=3600"),
        ));
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..5 {
            a.push(requests_per_second(compress.clone(), n).await);
            b.push(requests_per_second(cache.clone(), n * 10).await);
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        (a[2], b[2])
    });
    println!("\n| subject | requests/s (100 KB JSON, zstd) | speed-up |");
    println!("|---|---:|---:|");
    println!("| compress per request (zstd 3) | {per_request:.0} | 1.00 |");
    println!(
        "| cached, compressed once | {cached:.0} | {:.1} |",
        cached / per_request
    );
    results.push(serde_json::json!({
        "scenario": "cached-compressed",
        "subject": "gratify",
        "metrics": { "per_request_rps": per_request, "cached_rps": cached, "hit_speedup": cached / per_request },
    }));
}
