//! A call graph under overload: independent limiters in every service
//! against class and deadline carried along the calls.
//!
//! ```text
//! cargo bench -p gratify-benches --bench callgraph
//! cargo bench -p gratify-benches --bench callgraph -- --quick   # under 60 s
//! ```
//!
//! A front service calls service A, then service B; each of them calls a
//! shared dependency D. Every service does its own work on worker slots
//! (front 1 ms on 8, A and B 5 ms on 8, D 10 ms on 4; exponential), behind
//! a `Stack` with a limit. Front requests arrive Poisson at twice what D
//! can serve (each makes two calls to D): checkout 20% (20/s of delay,
//! 500 ms deadline, refusal 10), browse 50% (2/s, 1 s, 1), prefetch 30%
//! (0.1/s, 2 s, 0.1). A client gives up at its class's deadline; a call
//! already made downstream runs on regardless (the callee does not see the
//! caller leave), as across a network. Seeded, on tokio's paused clock.
//!
//! Subjects:
//! - `independent-gradient2`: every service limited by Gradient2 (Netflix's
//!   algorithm, refusing at the limit), nothing carried between them;
//! - `independent-delay-cost`: every service with gratify's limit, nothing
//!   carried: A, B and D see every call as the default class;
//! - `propagated`: the same limits, and every call carries the request's
//!   class and remaining deadline (`PropagateLayer` → `AcceptCallsLayer`).
//!
//! Metrics: `goodput` (front requests answered within their deadline, per
//! second), `wasted` (the share of all work, in every service, spent on
//! requests that did not succeed), per-class success and the total cost.
//!
//! Writes `target/gratify-bench/callgraph.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Rng, percentile};

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gratify::balance::{AcceptCallsLayer, PropagateLayer, Trust};
use gratify::core::classify::RouteClassifier;
use gratify::scaling::limit::{Admission, Gradient2, Limiter, LimiterConfig};
use gratify::{BoxError, CostModel, Stack};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService as BoxCloneService;
use tower::{Layer, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "500ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
refusal_cost = 1.0
[classes.prefetch]
delay_cost = { shape = "linear", per_second = 0.1, deadline = "2s" }
refusal_cost = 0.1
"#;

const CLASSES: [(&str, f64); 3] = [("checkout", 0.2), ("browse", 0.5), ("prefetch", 0.3)];
const SECRET: &str = "the call graph's shared secret";

type Client = BoxCloneService<Request<Full<Bytes>>, Response<()>, BoxError>;

/// Work spent on one front request, in every service (microseconds).
#[derive(Clone)]
struct Ledger(Arc<AtomicU64>);

/// A service's workers.
#[derive(Clone)]
struct Workers {
    slots: Arc<Semaphore>,
    mean: f64,
    rng: Arc<Mutex<Rng>>,
    /// All work done here (microseconds).
    total: Arc<AtomicU64>,
}

/// Counts work on every path: a call dropped mid-work spent it all the same.
struct Spent {
    since: Instant,
    ledger: Option<Ledger>,
    total: Arc<AtomicU64>,
}

impl Drop for Spent {
    fn drop(&mut self) {
        let us = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.total.fetch_add(us, Ordering::Relaxed);
        if let Some(l) = &self.ledger {
            l.0.fetch_add(us, Ordering::Relaxed);
        }
    }
}

impl Workers {
    fn new(slots: usize, mean_ms: f64, seed: u64, total: &Arc<AtomicU64>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            mean: mean_ms / 1e3,
            rng: Arc::new(Mutex::new(Rng(seed))),
            total: Arc::clone(total),
        }
    }

    async fn work(&self, ledger: Option<Ledger>) {
        let _slot = self.slots.acquire().await.unwrap();
        let draw = self.rng.lock().unwrap().next_f64();
        let d = -self.mean * (1.0 - draw).ln();
        let _spent = Spent {
            since: Instant::now(),
            ledger,
            total: Arc::clone(&self.total),
        };
        tokio::time::sleep(Duration::from_secs_f64(d)).await;
    }
}

fn ok() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::new()))
}

fn failed() -> Response<Full<Bytes>> {
    let mut r = ok();
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

/// A request for the next hop, carrying the ledger (bookkeeping of the
/// simulation, not of the protocol).
fn next_hop(from: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut r = Request::get("/").body(Full::new(Bytes::new())).unwrap();
    if let Some(l) = from.extensions().get::<Ledger>() {
        r.extensions_mut().insert(l.clone());
    }
    r
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gradient2,
    DelayCost,
    Propagated,
}

/// One service: `handler` behind a `Stack` with a limit (and, propagated,
/// behind `AcceptCallsLayer`); the client its callers use (a call runs on
/// as its own task, as across a network).
fn service<H, F>(kind: Kind, model: &CostModel, routes: RouteClassifier, handler: H) -> Client
where
    H: Fn(Request<Full<Bytes>>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let limiter = match kind {
        Kind::Gradient2 => {
            let mut config = LimiterConfig::default();
            config.admission = Admission::RejectAtLimit;
            Limiter::with_algorithm(model, Gradient2::new().limits(1, 200), config)
        }
        Kind::DelayCost | Kind::Propagated => Limiter::new(model),
    };
    LIMITERS.lock().unwrap().push(limiter.clone());
    let stack = Stack::new(model).routes(routes).limit_with(limiter);
    // The body is read to its end, as a client would: the limit holds each
    // slot until then, and a body dropped unread is a cancellation.
    let served = stack
        .layer(service_fn(handler))
        .map_err(Into::<BoxError>::into)
        .and_then(|r: Response<_>| async move {
            let (parts, body) = r.into_parts();
            http_body_util::BodyExt::collect(body).await?;
            Ok::<_, BoxError>(Response::from_parts(parts, ()))
        });
    let server: Client = if kind == Kind::Propagated {
        BoxCloneService::new(
            AcceptCallsLayer::new(model, Trust::token(SECRET).unwrap()).layer(served),
        )
    } else {
        BoxCloneService::new(served)
    };
    // The network: the callee runs on whatever the caller does.
    let remote = service_fn(move |req: Request<Full<Bytes>>| {
        let server = server.clone();
        async move {
            tokio::spawn(server.oneshot(req))
                .await
                .map_err(BoxError::from)?
        }
    });
    if kind == Kind::Propagated {
        BoxCloneService::new(PropagateLayer::new().token(SECRET).unwrap().layer(remote))
    } else {
        BoxCloneService::new(remote)
    }
}

/// The outcome of one run.
struct Outcome {
    sent: [u64; 3],
    ok: [u64; 3],
    /// The latencies of the requests answered in time, seconds.
    latencies: [Vec<f64>; 3],
    cost: f64,
    work_total: f64,
    work_wasted: f64,
}

async fn run(kind: Kind, rate: f64, secs: f64, seed: u64, model: &CostModel) -> Outcome {
    let total = Arc::new(AtomicU64::new(0));
    let empty = RouteClassifier::builder(model).build().unwrap();
    let d_workers = Workers::new(4, 10.0, seed ^ 1, &total);
    let d = service(
        kind,
        model,
        empty.clone(),
        move |req: Request<Full<Bytes>>| {
            let w = d_workers.clone();
            async move {
                w.work(req.extensions().get::<Ledger>().cloned()).await;
                Ok(ok())
            }
        },
    );
    let middle = |salt: u64| {
        let w = Workers::new(8, 5.0, seed ^ salt, &total);
        let d = d.clone();
        service(
            kind,
            model,
            empty.clone(),
            move |req: Request<Full<Bytes>>| {
                let (w, d) = (w.clone(), d.clone());
                async move {
                    w.work(req.extensions().get::<Ledger>().cloned()).await;
                    Ok(match d.oneshot(next_hop(&req)).await {
                        Ok(r) if r.status() == StatusCode::OK => ok(),
                        _ => failed(),
                    })
                }
            },
        )
    };
    let (a, b) = (middle(2), middle(3));
    let front_workers = Workers::new(8, 1.0, seed ^ 4, &total);
    let mut routes = RouteClassifier::builder(model);
    for (name, _) in CLASSES {
        routes = routes.route(None, &format!("/{name}"), name);
    }
    let front = service(kind, model, routes.build().unwrap(), move |req| {
        let (w, a, b) = (front_workers.clone(), a.clone(), b.clone());
        async move {
            w.work(req.extensions().get::<Ledger>().cloned()).await;
            for next in [a, b] {
                match next.oneshot(next_hop(&req)).await {
                    Ok(r) if r.status() == StatusCode::OK => {}
                    _ => return Ok(failed()),
                }
            }
            Ok(ok())
        }
    });

    let classes: Vec<_> = CLASSES
        .iter()
        .map(|(n, _)| model.class(model.id(n).unwrap()).clone())
        .collect();
    let results = Arc::new(Mutex::new(Outcome {
        sent: [0; 3],
        ok: [0; 3],
        latencies: [Vec::new(), Vec::new(), Vec::new()],
        cost: 0.0,
        work_total: 0.0,
        work_wasted: 0.0,
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
        let mut acc = 0.0;
        let k = CLASSES
            .iter()
            .position(|(_, share)| {
                acc += share;
                u < acc
            })
            .unwrap_or(CLASSES.len() - 1);
        let ledger = Ledger(Arc::new(AtomicU64::new(0)));
        let mut req = Request::get(format!("/{}", CLASSES[k].0))
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut().insert(ledger.clone());
        let class = classes[k].clone();
        let call = front.clone().oneshot(req);
        let results = Arc::clone(&results);
        tasks.spawn(async move {
            let deadline = class.deadline().unwrap();
            let sent = Instant::now();
            let out = tokio::time::timeout(deadline, call).await;
            let took = sent.elapsed();
            let good = matches!(&out, Ok(Ok(r)) if r.status() == StatusCode::OK);
            // Downstream calls may still be working: the ledger is read at
            // the end of the run.
            (k, good, took, class, ledger)
        });
        while let Some(done) = tasks.try_join_next() {
            let (k, good, took, class, ledger) = done.unwrap();
            settle(&results, k, good, took, &class, ledger);
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (k, good, took, class, ledger) = done.unwrap();
        settle(&results, k, good, took, &class, ledger);
    }
    // Let work still running downstream finish, then read the ledgers.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut r = Arc::try_unwrap(results).ok().unwrap().into_inner().unwrap();
    r.work_total = total.load(Ordering::Relaxed) as f64 / 1e6;
    r
}

/// Every service's limiter, in the order built (D, A, B, front), for
/// `CALLGRAPH_DEBUG=1`.
static LIMITERS: Mutex<Vec<Limiter>> = Mutex::new(Vec::new());

/// Pending ledgers of failed requests, read once the run is over.
static FAILED_LEDGERS: Mutex<Vec<Ledger>> = Mutex::new(Vec::new());

fn settle(
    results: &Mutex<Outcome>,
    k: usize,
    good: bool,
    took: Duration,
    class: &gratify::Class,
    ledger: Ledger,
) {
    let mut r = results.lock().unwrap();
    r.sent[k] += 1;
    if good {
        r.ok[k] += 1;
        r.latencies[k].push(took.as_secs_f64());
        r.cost += class.delay_cost().cost(took);
    } else {
        r.cost += class.refusal_cost();
        FAILED_LEDGERS.lock().unwrap().push(ledger);
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 20.0 } else { 60.0 };
    let seed = 0xCA11_64A9;
    let model = CostModel::from_toml(MODEL).unwrap();
    // D serves 4 slots / 10 ms = 400 calls a second; each front request
    // makes two: 200 front requests a second is its capacity.
    let rate = 2.0 * 200.0;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    println!("\n### A call graph at 2x the shared dependency's capacity ({secs} s)\n");
    println!(
        "| subject | goodput /s | wasted work | checkout ok | browse ok | prefetch ok | p99 checkout ms | total cost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut results = Vec::new();
    for (name, kind) in [
        ("independent-gradient2", Kind::Gradient2),
        ("independent-delay-cost", Kind::DelayCost),
        ("propagated", Kind::Propagated),
    ] {
        FAILED_LEDGERS.lock().unwrap().clear();
        LIMITERS.lock().unwrap().clear();
        let mut o = rt.block_on(run(kind, rate, secs, seed, &model));
        if std::env::var_os("CALLGRAPH_DEBUG").is_some() {
            for (who, l) in ["D", "A", "B", "front"]
                .iter()
                .zip(LIMITERS.lock().unwrap().iter())
            {
                let st = l.stats();
                let per: Vec<String> = st
                    .classes
                    .iter()
                    .map(|c| format!("adm {} shed {:?}", c.admitted, c.shed))
                    .collect();
                eprintln!("{name} {who}: limit {} {per:?}", st.limit);
            }
        }
        o.work_wasted = FAILED_LEDGERS
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.0.load(Ordering::Relaxed) as f64 / 1e6)
            .sum();
        let good: u64 = o.ok.iter().sum();
        let goodput = good as f64 / secs;
        let wasted = o.work_wasted / o.work_total.max(1e-9);
        let ok = |k: usize| o.ok[k] as f64 / o.sent[k].max(1) as f64;
        let mut checkout = o.latencies[0].clone();
        checkout.sort_by(f64::total_cmp);
        let p99 = if checkout.is_empty() {
            f64::NAN
        } else {
            percentile(&checkout, 99.0) * 1e3
        };
        println!(
            "| {name} | {goodput:.1} | {wasted:.3} | {:.3} | {:.3} | {:.3} | {p99:.1} | {:.1} |",
            ok(0),
            ok(1),
            ok(2),
            o.cost
        );
        results.push(serde_json::json!({
            "scenario": "callgraph-2x",
            "subject": name,
            "metrics": {
                "goodput": goodput,
                "wasted": wasted,
                "total_cost": o.cost,
                "p99_ms.checkout": p99,
                "success.checkout": ok(0),
                "success.browse": ok(1),
                "success.prefetch": ok(2),
            }
        }));
    }
    common::write(
        "callgraph",
        &serde_json::json!({
            "bench": "callgraph",
            "quick": quick,
            "commit": common::commit(),
            "results": results,
        }),
    );
}
