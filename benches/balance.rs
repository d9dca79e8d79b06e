//! Choosing replicas, hedging and retrying, side by side on a simulated
//! fleet.
//!
//! ```text
//! cargo bench -p gratify-benches --bench balance
//! cargo bench -p gratify-benches --bench balance -- --quick   # under 60 s
//! ```
//!
//! Eight replicas, each serving four calls at a time and queueing up to 32
//! more (beyond that it refuses at once with a limiter's 503): one is five
//! times slower, one stalls for 200 ms every 10 s, one fails 20% of its
//! calls in 1 ms. Three classes: checkout (10 ms, 20/s of delay, 300 ms
//! deadline), browse (20 ms, 2/s, 1 s) and batch (200 ms, 0.1/s, 10 s), 30%
//! / 60% / 10% of calls, exponential service times. Open-loop Poisson
//! arrivals; a caller gives up at its class's deadline (the call is
//! dropped). Every run is on tokio's paused clock with a fixed seed.
//!
//! Cost of a call: its class's delay cost at its latency, or its refusal
//! cost when it failed or missed its deadline; plus 0.05 per second of
//! replica time spent on it (copies and abandoned work included).
//!
//! Scenarios:
//! - `fleet-70`: 70% of the fleet's capacity. Subjects: `round-robin`,
//!   `p2c-peak-ewma` and `p2c-least-outstanding` (tower's balancer),
//!   `gratify` (no ejection), `gratify-eject`, `gratify-eject-hedge`.
//! - `fleet-120`: 120% of capacity (replicas refuse): the same subjects;
//!   hedging must add nothing here.
//! - `retry-200`: 200% of capacity with every call retried up to three
//!   times: `retry-unbounded` (no budget, no throttle) against
//!   `retry-budget` (gratify's `RetryLayer` defaults), both over
//!   `gratify-eject`.
//!
//! Writes `target/gratify-bench/balance.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Rng, percentile};

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use gratify::balance::CallContext;
use gratify::balance::hedge::{HedgeConfig, HedgeLayer};
use gratify::balance::p2c::{BalanceConfig, CostBalance};
use gratify::balance::retry::{RetryConfig, RetryLayer};
use gratify::{BoxError, CostModel};
use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwma, PendingRequests};
use tower::{Layer, Service};

const MODEL: &str = r#"
default_class = "browse"
[prices]
slot_second = 0.05
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
refusal_cost = 1.0
[classes.batch]
delay_cost = { shape = "linear", per_second = 0.1, deadline = "10s" }
refusal_cost = 0.5
"#;

const CLASSES: [(&str, f64, f64); 3] = [
    // name, mean service (s), share of calls
    ("checkout", 0.010, 0.3),
    ("browse", 0.020, 0.6),
    ("batch", 0.200, 0.1),
];
const REPLICAS: usize = 8;
const SLOTS: usize = 4;
const QUEUE: usize = 32;
const SLOT_PRICE: f64 = 0.05;

/// One simulated replica. Clones share it.
#[derive(Clone)]
struct Replica {
    inner: Arc<ReplicaInner>,
}

struct ReplicaInner {
    slots: Semaphore,
    waiting: AtomicU64,
    slowdown: f64,
    pauses: bool,
    fail_share: f64,
    rng: Mutex<Rng>,
    /// Replica time spent, in microseconds (abandoned work included).
    busy_us: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    /// This replica's calls, and how many it answered 503.
    own: AtomicU64,
    failed: AtomicU64,
}

impl Replica {
    fn new(i: usize, seed: u64, busy_us: &Arc<AtomicU64>, calls: &Arc<AtomicU64>) -> Self {
        Self {
            inner: Arc::new(ReplicaInner {
                slots: Semaphore::new(SLOTS),
                waiting: AtomicU64::new(0),
                slowdown: if i == 0 { 5.0 } else { 1.0 },
                pauses: i == 1,
                fail_share: if i == 2 { 0.2 } else { 0.0 },
                rng: Mutex::new(Rng(seed ^ (i as u64).wrapping_mul(0x9E37_79B9))),
                busy_us: Arc::clone(busy_us),
                calls: Arc::clone(calls),
                own: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }),
        }
    }
}

fn class_of(req: &Request<()>) -> usize {
    let name = req
        .extensions()
        .get::<CallContext>()
        .and_then(CallContext::class);
    CLASSES
        .iter()
        .position(|(n, _, _)| Some(*n) == name.as_deref())
        .unwrap_or(1)
}

/// One call waiting in a replica's queue.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts replica time on every path, abandoned work included.
struct Busy {
    since: Option<Instant>,
    total: Arc<AtomicU64>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(since) = self.since {
            let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.total.fetch_add(us, Ordering::Relaxed);
        }
    }
}

impl Service<Request<()>> for Replica {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        let k = class_of(&req);
        Box::pin(async move {
            inner.calls.fetch_add(1, Ordering::Relaxed);
            inner.own.fetch_add(1, Ordering::Relaxed);
            let (fail, draw) = {
                let mut rng = inner.rng.lock().unwrap();
                (rng.next_f64() < inner.fail_share, rng.next_f64())
            };
            if fail {
                inner.failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                let mut r = Response::new(());
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return Ok(r);
            }
            if inner.waiting.load(Ordering::Relaxed) >= QUEUE as u64 {
                // A limiter's refusal: never processed.
                let mut r = Response::new(());
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r.headers_mut().insert(
                    gratify::refusal::SHED_REASON_HEADER,
                    "queue-full".parse().unwrap(),
                );
                return Ok(r);
            }
            // Counted while waiting for a slot, on every path (a caller that
            // gives up drops this future mid-wait).
            let waiting = Waiting::enter(&inner.waiting);
            let permit = inner.slots.acquire().await;
            drop(waiting);
            let _permit = permit.unwrap();
            let _busy = Busy {
                since: Some(Instant::now()),
                total: Arc::clone(&inner.busy_us),
            };
            let mean = CLASSES[k].1 * inner.slowdown;
            let mut d = -mean * (1.0 - draw).ln();
            if inner.pauses {
                // Stalled for 200 ms at every 10 s mark the call spans.
                let now = SIM_START
                    .lock()
                    .unwrap()
                    .map_or(0.0, |s| s.elapsed().as_secs_f64());
                let first = (now / 10.0).ceil();
                let mut end = now + d;
                let mut mark = first * 10.0;
                while mark <= end {
                    end += 0.2;
                    d += 0.2;
                    mark += 10.0;
                }
                // A call arriving inside a stall waits for its end.
                let into = now % 10.0;
                if now >= 10.0 && into < 0.2 {
                    d += 0.2 - into;
                }
            }
            tokio::time::sleep(Duration::from_secs_f64(d)).await;
            Ok(Response::new(()))
        })
    }
}

/// When the simulation started (for the stalls).
static SIM_START: Mutex<Option<Instant>> = Mutex::new(None);

/// Tower's round robin is not a balancer it ships; this is the simplest.
struct RoundRobin {
    replicas: Vec<Replica>,
    next: usize,
}

impl Service<Request<()>> for RoundRobin {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let i = self.next % self.replicas.len();
        self.next = self.next.wrapping_add(1);
        self.replicas[i].call(req)
    }
}

/// tower's balancer with a seeded random stream (its default seeds from
/// the process), so that runs repeat.
struct Seeded(Rng);

impl tower::util::rng::Rng for Seeded {
    fn next_u64(&mut self) -> u64 {
        (self.0.next_f64() * (1u64 << 53) as f64) as u64
    }
}

/// What a run measured.
#[derive(Default)]
struct Outcome {
    latencies: Vec<Vec<f64>>,
    ok: Vec<u64>,
    offered: Vec<u64>,
    cost: f64,
    /// Failures: the caller's deadline, an error, a refusal or failure.
    timeouts: u64,
    errors: u64,
    refused: u64,
}

/// Drives `svc` with Poisson arrivals at `rate` for `secs`.
async fn drive<S>(mut svc: S, rate: f64, secs: f64, seed: u64, model: &CostModel) -> Outcome
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
    S::Future: Send + 'static,
{
    let classes: Vec<_> = CLASSES
        .iter()
        .map(|(n, _, _)| model.class(model.id(n).unwrap()).clone())
        .collect();
    let results = Arc::new(Mutex::new(Outcome {
        latencies: vec![Vec::new(); CLASSES.len()],
        ok: vec![0; CLASSES.len()],
        offered: vec![0; CLASSES.len()],
        cost: 0.0,
        timeouts: 0,
        errors: 0,
        refused: 0,
    }));
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut t = 0.0;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        t += -(1.0 - rng.next_f64()).ln() / rate;
        if t >= secs {
            break;
        }
        tokio::time::sleep_until(start + Duration::from_secs_f64(t)).await;
        let u = rng.next_f64();
        let mut k = CLASSES.len() - 1;
        let mut acc = 0.0;
        for (i, c) in CLASSES.iter().enumerate() {
            acc += c.2;
            if u < acc {
                k = i;
                break;
            }
        }
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(CallContext::new().with_class(CLASSES[k].0));
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        let call = svc.call(req);
        let class = classes[k].clone();
        let results = Arc::clone(&results);
        let sent = Instant::now();
        tasks.spawn(async move {
            let deadline = class.deadline().unwrap_or(Duration::from_secs(60));
            let out = tokio::time::timeout(deadline, call).await;
            let took = sent.elapsed();
            let mut r = results.lock().unwrap();
            r.offered[k] += 1;
            match out {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    r.ok[k] += 1;
                    r.latencies[k].push(took.as_secs_f64());
                    r.cost += class.delay_cost().cost(took);
                }
                other => {
                    r.cost += class.refusal_cost();
                    match other {
                        Err(_) => r.timeouts += 1,
                        Ok(Err(_)) => r.errors += 1,
                        Ok(Ok(_)) => r.refused += 1,
                    }
                }
            }
        });
        while let Some(done) = tasks.try_join_next() {
            done.unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    Arc::try_unwrap(results)
        .ok()
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

/// The fleet's capacity in calls per second.
fn capacity() -> f64 {
    let mean: f64 = CLASSES.iter().map(|c| c.1 * c.2).sum();
    (0..REPLICAS)
        .map(|i| {
            let slow = if i == 0 { 5.0 } else { 1.0 };
            let up = if i == 2 { 0.8 } else { 1.0 };
            SLOTS as f64 / (mean * slow) / up
        })
        .sum()
}

fn fleet(seed: u64) -> (Vec<Replica>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let busy = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let replicas = (0..REPLICAS)
        .map(|i| Replica::new(i, seed, &busy, &calls))
        .collect();
    (replicas, busy, calls)
}

/// gratify's balancer told what the operator knows: each replica serves
/// `SLOTS` calls at once.
fn configured() -> BalanceConfig {
    let mut c = BalanceConfig::default();
    c.replica_concurrency = SLOTS as f64;
    c
}

fn no_ejection() -> BalanceConfig {
    let mut c = configured();
    c.ejection.consecutive_failures = 0;
    c.ejection.latency_factor = 0.0;
    c
}

/// Runs `subject` on a fresh fleet; its metrics.
async fn run(
    subject: &str,
    load: f64,
    secs: f64,
    seed: u64,
    model: &CostModel,
) -> serde_json::Value {
    *SIM_START.lock().unwrap() = Some(Instant::now());
    let (replicas, busy, calls) = fleet(seed);
    let watch: Vec<Replica> = replicas.clone();
    let rate = load * capacity();
    let outcome = match subject {
        "round-robin" => drive(RoundRobin { replicas, next: 0 }, rate, secs, seed, model).await,
        "p2c-peak-ewma" => {
            // tower's defaults as its docs show them: 30 ms default RTT,
            // 10 s decay.
            let list = replicas.into_iter().map(|r| {
                PeakEwma::new(
                    r,
                    Duration::from_millis(30),
                    Duration::from_secs(10).as_nanos() as f64,
                    CompleteOnResponse::default(),
                )
            });
            drive(
                Balance::from_rng(
                    ServiceList::new(list.collect::<Vec<_>>()),
                    Seeded(Rng(seed)),
                ),
                rate,
                secs,
                seed,
                model,
            )
            .await
        }
        "p2c-least-outstanding" => {
            let list = replicas
                .into_iter()
                .map(|r| PendingRequests::new(r, CompleteOnResponse::default()));
            drive(
                Balance::from_rng(
                    ServiceList::new(list.collect::<Vec<_>>()),
                    Seeded(Rng(seed)),
                ),
                rate,
                secs,
                seed,
                model,
            )
            .await
        }
        "gratify" => {
            let b = CostBalance::with_seed(ServiceList::new(replicas), model, no_ejection(), seed);
            drive(b, rate, secs, seed, model).await
        }
        "gratify-eject" => {
            let b = CostBalance::with_seed(ServiceList::new(replicas), model, configured(), seed);
            drive(b, rate, secs, seed, model).await
        }
        "gratify-eject-buffered" => {
            let b = CostBalance::with_seed(ServiceList::new(replicas), model, configured(), seed);
            drive(Buffer::new(b, 4096), rate, secs, seed, model).await
        }
        "gratify-eject-hedge" | "gratify-eject-hedge0" => {
            let b = CostBalance::with_seed(ServiceList::new(replicas), model, configured(), seed);
            let mut hc = HedgeConfig::default();
            if subject.ends_with('0') {
                hc.max_share = 0.0;
            }
            if std::env::var_os("HEDGE_NO_GATE").is_some() {
                hc.max_refused_share = 1.0;
            }
            let hedge = HedgeLayer::new(model, hc).unwrap();
            let svc = hedge.layer(Buffer::new(b, 4096));
            let outcome = drive(svc, rate, secs, seed, model).await;
            if std::env::var_os("BALANCE_DEBUG").is_some() {
                for class in ["checkout", "browse", "batch"] {
                    eprintln!("{subject}: {class} hedge plan {:?}", hedge.plan(class));
                }
            }
            outcome
        }
        "retry-unbounded" | "retry-budget" => {
            let mut config = RetryConfig::default();
            config.max_attempts = 3;
            if subject == "retry-unbounded" {
                config.retry_ratio = 10.0;
                config.min_retries_per_second = 100_000;
                config.throttle_k = 0.0;
                config.max_pushback = Duration::from_secs(60);
            }
            let b = CostBalance::with_seed(ServiceList::new(replicas), model, configured(), seed);
            let retry = RetryLayer::with_seed(config, seed).unwrap();
            let svc = retry.layer(Buffer::new(b, 4096));
            drive(svc, rate, secs, seed, model).await
        }
        other => panic!("unknown subject {other}"),
    };
    let arrivals: u64 = outcome.offered.iter().sum();
    if std::env::var_os("BALANCE_DEBUG").is_some() {
        let per: Vec<(u64, u64)> = watch
            .iter()
            .map(|r| {
                (
                    r.inner.own.load(Ordering::Relaxed),
                    r.inner.failed.load(Ordering::Relaxed),
                )
            })
            .collect();
        eprintln!("{subject}: calls, failed per replica {per:?}");
    }
    let replica_secs = busy.load(Ordering::Relaxed) as f64 / 1e6;
    let mut metrics = serde_json::Map::new();
    let total_cost = outcome.cost + SLOT_PRICE * replica_secs;
    metrics.insert("total_cost".into(), total_cost.into());
    metrics.insert("arrivals".into(), arrivals.into());
    metrics.insert(
        "load".into(),
        (calls.load(Ordering::Relaxed) as f64 / arrivals.max(1) as f64).into(),
    );
    metrics.insert("replica_seconds".into(), replica_secs.into());
    metrics.insert("failed.deadline".into(), outcome.timeouts.into());
    metrics.insert("failed.error".into(), outcome.errors.into());
    metrics.insert("failed.refused".into(), outcome.refused.into());
    for (k, (name, _, _)) in CLASSES.iter().enumerate() {
        let mut l = outcome.latencies[k].clone();
        l.sort_by(f64::total_cmp);
        let p99 = if l.is_empty() {
            f64::NAN
        } else {
            percentile(&l, 99.0) * 1e3
        };
        metrics.insert(format!("p99_ms.{name}"), p99.into());
        metrics.insert(
            format!("success.{name}"),
            (outcome.ok[k] as f64 / outcome.offered[k].max(1) as f64).into(),
        );
    }
    serde_json::json!({ "subject": subject, "metrics": metrics })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 30.0 } else { 120.0 };
    let seed = 0x5EED_BA1A;
    let model = CostModel::from_toml(MODEL).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let balancers = [
        "round-robin",
        "p2c-peak-ewma",
        "p2c-least-outstanding",
        "gratify",
        "gratify-eject",
        "gratify-eject-buffered",
        "gratify-eject-hedge",
        "gratify-eject-hedge0",
    ];
    let mut results = Vec::new();
    for (scenario, load, subjects) in [
        ("fleet-70", 0.7, &balancers[..]),
        ("fleet-120", 1.2, &balancers[..]),
        ("retry-200", 2.0, &["retry-unbounded", "retry-budget"][..]),
    ] {
        println!(
            "\n### {scenario} ({:.0}% of capacity, {secs} s)\n",
            load * 100.0
        );
        println!(
            "| subject | total cost | load | p99 checkout ms | p99 browse ms | p99 batch ms | checkout ok | browse ok | batch ok | failed: deadline / refused / error |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for subject in subjects {
            let mut r = rt.block_on(run(subject, load, secs, seed, &model));
            let m = r["metrics"].clone();
            let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {subject} | {:.1} | {:.3} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {} / {} / {} |",
                f("total_cost"),
                f("load"),
                f("p99_ms.checkout"),
                f("p99_ms.browse"),
                f("p99_ms.batch"),
                f("success.checkout"),
                f("success.browse"),
                f("success.batch"),
                m["failed.deadline"],
                m["failed.refused"],
                m["failed.error"],
            );
            r["scenario"] = scenario.into();
            results.push(r);
        }
    }
    common::write(
        "balance",
        &serde_json::json!({
            "bench": "balance",
            "quick": quick,
            "commit": common::commit(),
            "results": results,
        }),
    );
}
