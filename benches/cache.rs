//! The response cache's benchmark.
//!
//! ```text
//! cargo bench -p gratify-benches --bench cache              # full
//! cargo bench -p gratify-benches --bench cache -- --quick
//! ```
//!
//! Section "cost-aware": a Zipf(0.9) trace over 100,000 keys whose origin
//! latencies spread from 1 to 200 ms and whose classes cost 53, 4 and 0.13
//! per second of delay (checkout, browse, batch, as in the overload
//! scenario), with a memory budget of 10% of the working set. Plain moka with
//! a byte weigher against the same cache with the value gate. Deterministic:
//! paused clock, seeded trace.
//!
//! Section "stampede": 1,000 concurrent requests for one cold key whose
//! origin takes 100 ms (paused clock): origin calls and p99 latency.
//!
//! Section "hit-path": the cost of a hit of an 8 KB page through the whole
//! layer against the bare handler returning the same bytes (a timing loop on
//! one thread; per-request times). Seven runs of the subject alternate with
//! seven of the bare handler, so a machine's drift moves both alike; the
//! figures are medians: of the runs' means and p99s, and of the pairs'
//! ratios. The bare handler's own row pairs it with itself: its ratio shows
//! how far apart two runs of the same code fall.
//!
//! The stampede and hit-path sections also measure the server-side caches
//! that exist for tower, each over moka with 10,000 entries:
//! `http-cache-tower-server` 0.2 (`ServerCacheLayer` with http-cache's
//! `MokaManager`) and `hitbox` 0.2 (`hitbox-tower` with `hitbox-moka`, keyed
//! by method and path, with its dogpile-preventing
//! `BroadcastConcurrencyManager` at concurrency 1).
//!
//! Section "loopback": the same 8 KB page served by hyper on 127.0.0.1 from
//! a bare handler and through the cache (a hit every time), each loaded by 32
//! keep-alive connections for a few seconds; requests per second, medians
//! of 5 runs of each (3 quick), alternating, and the median of the pairs'
//! ratios.
//!
//! Section names among the arguments (`-- --quick hit-path loopback`) run
//! only those sections; subject names (`gratify`, `hitbox`) only those
//! subjects beside the bare handler.
//!
//! Writes `target/gratify-bench/cache.json` (or `$GRATIFY_BENCH_DIR`) and
//! prints markdown tables.
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gratify_cache::{HttpCacheConfig, HttpCacheLayer};
use gratify_core::{ClassId, CostModel};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
refusal_cost = 2.0
[classes.batch]
delay_cost = { shape = "linear", per_second = 0.1, deadline = "30s" }
refusal_cost = 1.0
"#;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
struct Item {
    size: usize,
    latency: Duration,
    class: usize,
}

struct Trace {
    items: Vec<Item>,
    requests: Vec<u32>,
    working_set: u64,
}

fn trace(keys: usize, requests: usize, seed: u64) -> Trace {
    let mut rng = Rng(seed.max(1));
    let items: Vec<Item> = (0..keys)
        .map(|_| {
            // Lognormal sizes around 8 KB; latencies log-uniform in 1-200 ms.
            let z =
                (-2.0 * rng.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * rng.unit()).cos();
            let size = (8192.0 * z.exp()).clamp(200.0, 200_000.0) as usize;
            let latency = Duration::from_secs_f64(0.001 * 200f64.powf(rng.unit()));
            let u = rng.unit();
            let class = if u < 0.1 {
                0
            } else if u < 0.5 {
                1
            } else {
                2
            };
            Item {
                size,
                latency,
                class,
            }
        })
        .collect();
    // Zipf(0.9) popularity over a random permutation of the keys.
    let mut cdf = Vec::with_capacity(keys);
    let mut total = 0.0;
    for rank in 1..=keys {
        total += (rank as f64).powf(-0.9);
        cdf.push(total);
    }
    let mut perm: Vec<u32> = (0..keys as u32).collect();
    for i in (1..keys).rev() {
        perm.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let requests = (0..requests)
        .map(|_| {
            let u = rng.unit() * total;
            perm[cdf.partition_point(|c| *c < u).min(keys - 1)]
        })
        .collect();
    let working_set = items.iter().map(|i| i.size as u64 + 600).sum();
    Trace {
        items,
        requests,
        working_set,
    }
}

struct Outcome {
    saved: f64,
    hits: u64,
    hit_bytes: u64,
    bytes: u64,
}

fn run(trace: &Trace, cost_aware: bool) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let model = CostModel::from_toml(MODEL).unwrap();
    let ids: Vec<ClassId> = ["checkout", "browse", "batch"]
        .iter()
        .map(|n| model.id(n).unwrap())
        .collect();
    let urgency: Vec<f64> = ids.iter().map(|id| model.class(*id).urgency(0.0)).collect();
    runtime.block_on(async {
        let zeros = Bytes::from(vec![b'x'; 200_000]);
        let items = Arc::new(trace.items.clone());
        let origin = {
            let items = Arc::clone(&items);
            service_fn(move |req: Request<()>| {
                let i: usize = req.uri().path()[1..].parse().unwrap();
                let item = items[i];
                let body = zeros.slice(..item.size);
                async move {
                    tokio::time::sleep(item.latency).await;
                    let mut r = Response::new(Full::new(body));
                    r.headers_mut()
                        .insert("cache-control", "public, max-age=86400".parse().unwrap());
                    Ok::<_, Infallible>(r)
                }
            })
        };
        let mut config = HttpCacheConfig::default();
        config.max_bytes = trace.working_set / 10;
        config.max_entry_bytes = 256 * 1024;
        config.cost_aware = cost_aware;
        let layer = HttpCacheLayer::with_model(config, &model);
        let svc = layer.layer(origin);
        let mut out = Outcome {
            saved: 0.0,
            hits: 0,
            hit_bytes: 0,
            bytes: 0,
        };
        for &k in &trace.requests {
            let item = trace.items[k as usize];
            let mut req = Request::get(format!("/{k}"))
                .header("host", "bench.example")
                .body(())
                .unwrap();
            req.extensions_mut().insert(ids[item.class]);
            let r = svc.clone().oneshot(req).await.unwrap();
            let hit = r.headers()["cache-status"]
                .to_str()
                .unwrap()
                .starts_with("gratify; hit");
            let _ = r.into_body().collect().await.unwrap();
            out.bytes += item.size as u64;
            if hit {
                out.hits += 1;
                out.hit_bytes += item.size as u64;
                out.saved += item.latency.as_secs_f64() * urgency[item.class];
            }
        }
        out
    })
}

/// A response of `body` that shared caches may keep for `max_age` seconds.
fn cacheable(body: Bytes, max_age: u32) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        "cache-control",
        format!("public, max-age={max_age}").parse().unwrap(),
    );
    r
}

/// The subjects of the hit-path and stampede sections: each wraps `origin`
/// in a cache of 10,000 entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    Bare,
    Gratify,
    HttpCacheTowerServer,
    Hitbox,
}

impl Subject {
    const ALL: [Self; 4] = [
        Self::Bare,
        Self::Gratify,
        Self::HttpCacheTowerServer,
        Self::Hitbox,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Gratify => "gratify",
            Self::HttpCacheTowerServer => "http-cache-tower-server",
            Self::Hitbox => "hitbox",
        }
    }
}

/// Per-request timings of `n` hits through `svc` (nanoseconds).
async fn timings<S, B>(svc: &S, n: usize) -> Vec<f64>
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let req = || {
        Request::get("http://bench.example/page")
            .header("host", "bench.example")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // Warm the entry, and let a cache that stores from a spawned task do so.
    let r = svc.clone().oneshot(req()).await.unwrap();
    let _ = r.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let r = svc.clone().oneshot(req()).await.unwrap();
        std::hint::black_box(r.into_body().collect().await.unwrap());
        out.push(t.elapsed().as_nanos() as f64);
    }
    out
}

/// Per-hit figures of a subject measured in runs alternating with the bare
/// handler's, so that a machine's drift moves both alike.
#[derive(Clone, Copy, Debug)]
struct HitPath {
    /// Median over the runs of the subject's mean nanoseconds per hit.
    ns: f64,
    /// Median over the runs of its 99th percentile.
    p99: f64,
    /// Median over the runs of the bare handler's mean.
    bare_ns: f64,
    /// Median over the pairs of runs of subject mean / bare mean.
    ratio: f64,
}

/// Hits through `svc` against the bare handler `bare`: 7 pairs of runs,
/// each of at most `n` requests (fewer for a slow subject, about 0.3 s a
/// run), the bare run and the subject's run alternating.
fn hit_path_of<S, B, T, C>(bare: T, svc: S, n: usize) -> HitPath
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
    T: tower::Service<Request<Full<Bytes>>, Response = Response<C>> + Clone,
    T::Error: std::fmt::Debug,
    C: http_body::Body,
    C::Error: std::fmt::Debug,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let probe = runtime.block_on(timings(&svc, 200));
    let per = probe.iter().sum::<f64>() / probe.len() as f64;
    let n = n.min((0.3e9 / per.max(1.0)) as usize).max(200);
    let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
    let (mut means, mut p99s, mut bares, mut ratios) = (vec![], vec![], vec![], vec![]);
    for _ in 0..7 {
        let b = mean(&runtime.block_on(timings(&bare, n)));
        let mut t = runtime.block_on(timings(&svc, n));
        let m = mean(&t);
        t.sort_by(f64::total_cmp);
        p99s.push(t[t.len() * 99 / 100]);
        means.push(m);
        bares.push(b);
        ratios.push(m / b);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    HitPath {
        ns: median(means),
        p99: median(p99s),
        bare_ns: median(bares),
        ratio: median(ratios),
    }
}

/// An origin answering `body`, cacheable, after `delay`, counting its calls.
fn origin<ReqB>(
    body: Bytes,
    delay: Duration,
    calls: Arc<std::sync::atomic::AtomicU64>,
) -> impl tower::Service<
    Request<ReqB>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(move |_: Request<ReqB>| {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = body.clone();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok::<_, Infallible>(cacheable(body, 3600))
        }
    })
}

/// Runs `f` with `subject` wrapped around an origin of `body` and `delay`.
/// Returns `None` for a subject that is not a cache where one is needed.
macro_rules! with_subject {
    ($subject:expr, $body:expr, $delay:expr, $calls:expr, |$svc:ident| $run:expr) => {
        match $subject {
            Subject::Bare => {
                let $svc = origin::<Full<Bytes>>($body, $delay, $calls);
                $run
            }
            Subject::Gratify => {
                let $svc =
                    HttpCacheLayer::new(HttpCacheConfig::default())
                        .layer(origin::<Full<Bytes>>($body, $delay, $calls));
                $run
            }
            Subject::HttpCacheTowerServer => {
                let manager = http_cache::MokaManager::new(moka::future::Cache::new(10_000));
                let $svc = http_cache_tower_server::ServerCacheLayer::new(manager).layer(origin::<
                    Full<Bytes>,
                >(
                    $body, $delay, $calls,
                ));
                $run
            }
            Subject::Hitbox => {
                use hitbox_http::extractors::path::PathExtractor as _;
                let config = hitbox::Config::builder()
                    .request_predicate(hitbox_http::predicates::NeutralRequestPredicate::new())
                    .response_predicate(hitbox_http::predicates::NeutralResponsePredicate::new())
                    .extractor(hitbox_http::extractors::Method::new().path("/{page}"))
                    .policy(
                        hitbox::policy::PolicyConfig::builder()
                            .ttl(Duration::from_secs(3600))
                            .concurrency(hitbox::policy::ConcurrencyLimit::new(1).unwrap())
                            .build(),
                    )
                    .build();
                let layer = hitbox_tower::Cache::builder()
                    .backend(
                        hitbox_moka::MokaBackend::builder()
                            .max_entries(10_000)
                            .build(),
                    )
                    .config(config)
                    .concurrency_manager(hitbox::concurrency::BroadcastConcurrencyManager::new())
                    .build();
                let $svc = layer.layer(origin($body, $delay, $calls));
                $run
            }
        }
    };
}

/// 1,000 concurrent requests for one cold key whose origin takes 100 ms
/// (paused clock): origin calls and p99 latency (ms).
fn stampede(subject: Subject) -> (u64, f64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let body = Bytes::from_static(b"hot product page");
    let p99 = runtime.block_on(async {
        with_subject!(
            subject,
            body,
            Duration::from_millis(100),
            Arc::clone(&calls),
            |svc| stampede_on(svc).await
        )
    });
    (calls.load(std::sync::atomic::Ordering::SeqCst), p99)
}

async fn stampede_on<S, B>(svc: S) -> f64
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let req = Request::get("http://bench.example/hot")
                    .header("host", "bench.example")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = svc.oneshot(req).await.unwrap();
                let _ = r.into_body().collect().await.unwrap();
                start.elapsed()
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await.unwrap());
    }
    latencies.sort();
    latencies[latencies.len() * 99 / 100 - 1].as_secs_f64() * 1e3
}

/// The hit-path figures of `subject` serving a hit of an 8 KB page, and
/// the origin calls it made.
fn hit_path(subject: Subject, n: usize) -> (HitPath, u64) {
    let page = Bytes::from(vec![b'x'; 8192]);
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bare = origin::<Full<Bytes>>(
        page.clone(),
        Duration::ZERO,
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let figures = with_subject!(subject, page, Duration::ZERO, Arc::clone(&calls), |svc| {
        hit_path_of(bare, svc, n)
    });
    (figures, calls.load(std::sync::atomic::Ordering::SeqCst))
}

/// Requests per second that `connections` keep-alive clients get from a
/// hyper server running `service`, over `seconds`.
fn loopback<S, B>(service: S, seconds: f64) -> f64
where
    S: tower::Service<
            Request<http_body_util::Empty<Bytes>>,
            Response = Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                // GET bodies are empty; the cache needs a body type it can
                // build for revalidation requests (`Default`).
                let svc = hyper_util::service::TowerToHyperService::new(
                    tower::ServiceBuilder::new()
                        .map_request(
                            empty_body
                                as fn(
                                    Request<hyper::body::Incoming>,
                                )
                                    -> Request<http_body_util::Empty<Bytes>>,
                        )
                        .service(service.clone()),
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
        let clients: Vec<_> = (0..32)
            .map(|_| {
                let done = Arc::clone(&done);
                tokio::spawn(async move {
                    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let (mut send, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    while tokio::time::Instant::now() < stop {
                        let req = Request::get("/page")
                            .header("host", "bench.example")
                            .body(http_body_util::Empty::<Bytes>::new())
                            .unwrap();
                        let r = send.send_request(req).await.unwrap();
                        let _ = r.into_body().collect().await.unwrap();
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        server.abort();
        done.load(std::sync::atomic::Ordering::Relaxed) as f64 / seconds
    })
}

fn empty_body(r: Request<hyper::body::Incoming>) -> Request<http_body_util::Empty<Bytes>> {
    r.map(|_| http_body_util::Empty::new())
}

fn page_handler() -> impl tower::Service<
    Request<http_body_util::Empty<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let page = Bytes::from(vec![b'x'; 8192]);
    service_fn(move |_: Request<http_body_util::Empty<Bytes>>| {
        let page = page.clone();
        async move {
            let mut r = Response::new(Full::new(page));
            r.headers_mut()
                .insert("cache-control", "public, max-age=3600".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    })
}

/// The sections, by the names that select them on the command line.
const SECTIONS: [&str; 4] = ["cost-aware", "stampede", "hit-path", "loopback"];

/// The bench's arguments (a name that is neither a section nor a subject
/// is an error).
#[derive(Debug, clap::Parser)]
#[command(name = "cache")]
struct Args {
    /// A seventh of the trace, 1 s loopback runs.
    #[arg(long)]
    quick: bool,
    /// Sections to run (all when none) and subjects to measure (all when
    /// none; the bare handler always, the others are compared with it).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new([
        "cost-aware", "stampede", "hit-path", "loopback",
        "bare", "gratify", "http-cache-tower-server", "hitbox",
    ]))]
    names: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let quick = args.quick;
    let named: Vec<&String> = args
        .names
        .iter()
        .filter(|a| SECTIONS.contains(&a.as_str()))
        .collect();
    let section = |name: &str| named.is_empty() || named.iter().any(|a| *a == name);
    let chosen: Vec<Subject> = Subject::ALL
        .into_iter()
        .filter(|s| args.names.iter().any(|a| a == s.name()))
        .collect();
    let subject_runs = |s: &Subject| chosen.is_empty() || *s == Subject::Bare || chosen.contains(s);
    let mut results = Vec::new();
    if section("cost-aware") {
        let requests = if quick { 300_000 } else { 2_000_000 };
        let t = trace(100_000, requests, 7);
        let started = std::time::Instant::now();
        let plain = run(&t, false);
        let gated = run(&t, true);
        eprintln!(
            "cost-aware: {} requests over 100,000 keys, budget {} bytes (10% of {}), {:.1} s of wall time",
            requests,
            t.working_set / 10,
            t.working_set,
            started.elapsed().as_secs_f64()
        );
        let n = requests as f64;
        let rows = [("moka", &plain), ("gratify", &gated)];
        println!("\n| subject | delay cost saved | vs moka | hit ratio | byte hit ratio |");
        println!("|---|---:|---:|---:|---:|");
        for (name, o) in rows {
            let ratio = o.saved / plain.saved.max(1e-9);
            println!(
                "| {name} | {:.0} | {ratio:.2} | {:.3} | {:.3} |",
                o.saved,
                o.hits as f64 / n,
                o.hit_bytes as f64 / o.bytes.max(1) as f64
            );
            results.push(serde_json::json!({
                "scenario": "cost-aware",
                "subject": name,
                "metrics": {
                    "delay_saved": o.saved,
                    "delay_saved_ratio": ratio,
                    "hit_ratio": o.hits as f64 / n,
                    "byte_hit_ratio": o.hit_bytes as f64 / o.bytes.max(1) as f64,
                },
            }));
        }
    }

    if section("stampede") {
        println!("\n| subject | origin calls | p99 (ms) |");
        println!("|---|---:|---:|");
        for subject in Subject::ALL.into_iter().skip(1).filter(subject_runs) {
            let (calls, p99) = stampede(subject);
            println!("| {} | {calls} | {p99:.1} |", subject.name());
            results.push(serde_json::json!({
                "scenario": "stampede",
                "subject": subject.name(),
                "metrics": { "origin_calls": calls, "p99_ms": p99 },
            }));
        }
    }

    if section("hit-path") {
        let n = if quick { 20_000 } else { 200_000 };
        println!(
            "\n| subject | ns per request | p99 ns | bare ns (runs between) | vs bare | origin calls |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for subject in Subject::ALL.into_iter().filter(subject_runs) {
            let (h, calls) = hit_path(subject, n);
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {calls} |",
                subject.name(),
                h.ns,
                h.p99,
                h.bare_ns,
                h.ratio
            );
            results.push(serde_json::json!({
                "scenario": "hit-path",
                "subject": subject.name(),
                "metrics": {
                    "ns_per_req": h.ns,
                    "p99_ns": h.p99,
                    "bare_ns_per_req": h.bare_ns,
                    "ratio_vs_bare": h.ratio,
                    "origin_calls": calls,
                },
            }));
        }
    }

    if section("loopback") {
        let seconds = if quick { 1.0 } else { 3.0 };
        // Pairs of runs, bare then cached, so a machine's drift moves both
        // alike; the ratio is the median of the pairs'.
        let pairs = if quick { 3 } else { 5 };
        let (mut bare_runs, mut cached_runs, mut ratios) = (vec![], vec![], vec![]);
        for _ in 0..pairs {
            let bare = loopback(page_handler(), seconds);
            let cached = HttpCacheLayer::new(HttpCacheConfig::default()).layer(page_handler());
            let cached = loopback(cached, seconds);
            bare_runs.push(bare);
            cached_runs.push(cached);
            ratios.push(cached / bare);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (bare_rps, cached_rps, ratio) =
            (median(bare_runs), median(cached_runs), median(ratios));
        println!("\n| subject | requests/s (hyper, loopback) | vs bare |");
        println!("|---|---:|---:|");
        println!("| bare | {bare_rps:.0} | 1.00 |");
        println!("| gratify (hit) | {cached_rps:.0} | {ratio:.2} |");
        results.push(serde_json::json!({
            "scenario": "loopback",
            "subject": "gratify",
            "metrics": { "rps": cached_rps, "bare_rps": bare_rps, "hit_throughput_frac": ratio },
    }));
    }

    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let doc = serde_json::json!({ "bench": "cache", "quick": quick, "commit": commit, "results": results });
    let dir = std::env::var_os("GRATIFY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-bench"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("cache.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}
