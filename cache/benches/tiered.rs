//! Three replicas sharing one Redis: what the shared tier saves, costs, and
//! how fast an invalidation travels.
//!
//! ```text
//! cargo bench -p gratify-cache --bench tiered
//! cargo bench -p gratify-cache --bench tiered -- --quick
//! ```
//!
//! Starts its own `redis-server` on a free port (reported as skipped if
//! there is none). Three replicas — `HttpCacheLayer`s over one origin that
//! answers 8 KB pages after 2 ms — run in one process, each driven by its
//! own task through a share of one Zipf(0.9) trace; each replica's L1 holds
//! a quarter of the working set. Sections:
//!
//! - **trace**: subjects `l1-only` and `l1+l2`: origin calls
//!   (`origin_call_ratio` = l1+l2 ÷ l1-only), p50 and p99 latency;
//! - **tier-hit**: a page stored by one replica, fetched by another from
//!   the tier: its latency against the origin's;
//! - **propagation**: a purge on one replica until another has evicted its
//!   copy (200 purges; p50, p99);
//! - **redis-down**: the trace again with Redis killed after the replicas
//!   started (`p99_ms_redis_down` against `l1-only`).
//!
//! Writes `target/gratify-bench/tiered.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gratify_cache::tier::TierConfig;
use gratify_cache::tier::redis::RedisTier;
use gratify_cache::{CachePurge, HttpCacheConfig, HttpCacheLayer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};

const PAGE: usize = 8 * 1024;
const ORIGIN: Duration = Duration::from_millis(2);

struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self {
            port,
            child: Some(child),
        })
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// `n` key indices drawn from Zipf(0.9) over `keys` keys.
fn zipf_trace(keys: usize, n: usize, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=keys).map(|k| 1.0 / (k as f64).powf(0.9)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(keys);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let u = rng.unit();
            cdf.partition_point(|c| *c < u).min(keys - 1)
        })
        .collect()
}

fn origin(
    calls: Arc<AtomicU64>,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let page = Bytes::from(vec![b'x'; PAGE]);
    service_fn(move |_: Request<()>| {
        calls.fetch_add(1, Ordering::Relaxed);
        let page = page.clone();
        async move {
            tokio::time::sleep(ORIGIN).await;
            let mut r = Response::new(Full::new(page));
            r.headers_mut()
                .insert("cache-control", "public, max-age=600".parse().unwrap());
            Ok(r)
        }
    })
}

type Replica = (
    gratify_cache::HttpCache<
        tower::util::BoxCloneSyncService<Request<()>, Response<Full<Bytes>>, Infallible>,
    >,
    CachePurge,
);

fn replica(url: Option<&str>, namespace: &str, l1_bytes: u64, calls: &Arc<AtomicU64>) -> Replica {
    let mut config = HttpCacheConfig::default();
    config.max_bytes = l1_bytes;
    let mut layer = HttpCacheLayer::new(config);
    if let Some(url) = url {
        layer = layer.with_tier(RedisTier::open(url).unwrap(), TierConfig::new(namespace));
    }
    let purge = layer.purge();
    let svc = layer.layer(tower::util::BoxCloneSyncService::new(origin(Arc::clone(
        calls,
    ))));
    (svc, purge)
}

async fn ready(replicas: &[Replica]) {
    let until = Instant::now() + Duration::from_secs(10);
    while !replicas
        .iter()
        .all(|(_, p)| p.tier_stats().is_none_or(|s| s.ready))
    {
        assert!(Instant::now() < until, "tiers not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn fetch(svc: &Replica, key: usize) -> Duration {
    let request = Request::get(format!("/page/{key}"))
        .header("host", "shop.example")
        .body(())
        .unwrap();
    let started = Instant::now();
    let response = svc.0.clone().oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), PAGE);
    started.elapsed()
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Runs the trace, request `i` on replica `i % 3`, the three concurrently.
/// Returns every latency (ms).
async fn run_trace(replicas: &[Replica], trace: &[usize]) -> Vec<f64> {
    let mut tasks = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        let replica = replica.clone();
        let keys: Vec<usize> = trace.iter().skip(r).step_by(3).copied().collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                out.push(fetch(&replica, key).await.as_secs_f64() * 1e3);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (keys, requests) = if quick {
        (2_000, 15_000)
    } else {
        (5_000, 60_000)
    };
    let l1_bytes = (keys * (PAGE + 512)) as u64 / 4;
    let trace = zipf_trace(keys, requests, 42);
    let mut results = Vec::new();
    let Some(mut server) = Server::start() else {
        eprintln!("tiered: no redis-server on the PATH; skipped");
        results.push(serde_json::json!({
            "scenario": "trace", "subject": "l1+l2", "skipped": "no redis-server", "metrics": {},
        }));
        write(quick, &results);
        return;
    };
    let url = server.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Trace, without and with the tier.
        let mut rows = Vec::new();
        for (subject, tiered) in [("l1-only", false), ("l1+l2", true)] {
            let calls = Arc::new(AtomicU64::new(0));
            let namespace = format!("bench:{subject}");
            let replicas: Vec<Replica> = (0..3)
                .map(|_| replica(tiered.then_some(url.as_str()), &namespace, l1_bytes, &calls))
                .collect();
            ready(&replicas).await;
            let started = Instant::now();
            let mut lat = run_trace(&replicas, &trace).await;
            let secs = started.elapsed().as_secs_f64();
            let p50 = quantile(&mut lat, 0.5);
            let p99 = quantile(&mut lat, 0.99);
            let tier_hits: u64 = replicas
                .iter()
                .filter_map(|(_, p)| p.tier_stats())
                .map(|s| s.hits)
                .sum();

            rows.push((subject, calls.load(Ordering::Relaxed), p50, p99, tier_hits, secs));
        }
        let base_calls = rows[0].1 as f64;
        let base_p99 = rows[0].3;
        println!(
            "\n| subject | origin calls | origin_call_ratio | tier hits | p50 ms | p99 ms | wall s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (subject, calls, p50, p99, tier_hits, secs) in &rows {
            let ratio = *calls as f64 / base_calls;
            println!(
                "| {subject} | {calls} | {ratio:.3} | {tier_hits} | {p50:.3} | {p99:.3} | {secs:.1} |"
            );
            results.push(serde_json::json!({
                "scenario": "trace",
                "subject": subject,
                "metrics": {
                    "origin_calls": calls, "origin_call_ratio": ratio, "tier_hits": tier_hits,
                    "p50_ms": p50, "p99_ms": p99,
                },
            }));
        }

        // A tier hit against the origin.
        let calls = Arc::new(AtomicU64::new(0));
        let a = replica(Some(&url), "bench:hit", l1_bytes, &calls);
        let b = replica(Some(&url), "bench:hit", l1_bytes, &calls);
        ready(&[a.clone(), b.clone()]).await;
        let n = if quick { 300 } else { 1000 };
        let mut origin_ms = Vec::new();
        for k in 0..n {
            origin_ms.push(fetch(&a, k).await.as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = b.1.tier_stats().unwrap().hits;
        let mut hit_ms = Vec::new();
        for k in 0..n {
            hit_ms.push(fetch(&b, k).await.as_secs_f64() * 1e3);
        }
        let hits = b.1.tier_stats().unwrap().hits - before;
        let (o50, o99) = (quantile(&mut origin_ms, 0.5), quantile(&mut origin_ms, 0.99));
        let (h50, h99) = (quantile(&mut hit_ms, 0.5), quantile(&mut hit_ms, 0.99));
        println!("\n| path | p50 ms | p99 ms |");
        println!("|---|---:|---:|");
        println!("| origin (miss, {} ms handler) | {o50:.3} | {o99:.3} |", ORIGIN.as_millis());
        println!("| tier hit ({hits} of {n}) | {h50:.3} | {h99:.3} |");
        results.push(serde_json::json!({
            "scenario": "tier-hit",
            "subject": "l1+l2",
            "metrics": {
                "origin_p50_ms": o50, "origin_p99_ms": o99,
                "tier_hit_p50_ms": h50, "tier_hit_p99_ms": h99, "tier_hits": hits,
            },
        }));

        // Propagation of a purge.
        let mut took = Vec::new();
        let purges = 200.min(n);
        for k in 0..purges {
            // B holds page k (fetched above); A purges it.
            let seen = b.1.tier_stats().unwrap().invalidations;
            let started = Instant::now();
            a.1.purge_key(&format!("http://shop.example/page/{k}")).await;
            let until = started + Duration::from_secs(2);
            while b.1.tier_stats().unwrap().invalidations == seen && Instant::now() < until {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            took.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let (g50, g99) = (quantile(&mut took, 0.5), quantile(&mut took, 0.99));
        println!("\n| invalidation propagation ({purges} purges) | p50 ms | p99 ms |");
        println!("|---|---:|---:|");
        println!("| purge on A → evicted on B | {g50:.3} | {g99:.3} |");
        results.push(serde_json::json!({
            "scenario": "propagation",
            "subject": "l1+l2",
            "metrics": { "p50_ms": g50, "p99_ms": g99, "purges": purges },
        }));

        // The trace with Redis killed after the replicas started.
        let calls = Arc::new(AtomicU64::new(0));
        let replicas: Vec<Replica> = (0..3)
            .map(|_| replica(Some(&url), "bench:down", l1_bytes, &calls))
            .collect();
        ready(&replicas).await;
        server.kill();
        let mut lat = run_trace(&replicas, &trace).await;
        let p99 = quantile(&mut lat, 0.99);
        let skipped: u64 = replicas
            .iter()
            .filter_map(|(_, p)| p.tier_stats())
            .map(|s| s.skipped)
            .sum();
        println!("\n| subject | p99 ms, Redis down | vs l1-only p99 | origin calls | reads skipped by the breaker |");
        println!("|---|---:|---:|---:|---:|");
        println!(
            "| l1+l2 | {p99:.3} | {:.2} | {} | {skipped} |",
            p99 / base_p99,
            calls.load(Ordering::Relaxed)
        );
        results.push(serde_json::json!({
            "scenario": "redis-down",
            "subject": "l1+l2",
            "metrics": {
                "p99_ms_redis_down": p99, "p99_vs_l1_only": p99 / base_p99,
                "origin_calls": calls.load(Ordering::Relaxed), "skipped": skipped,
            },
        }));
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    write(quick, &results);
}

fn write(quick: bool, results: &[serde_json::Value]) {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let doc = serde_json::json!({ "bench": "tiered", "quick": quick, "commit": commit, "results": results });
    let dir = std::env::var_os("GRATIFY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-bench"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("tiered.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}
