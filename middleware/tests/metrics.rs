//! The offload pool, the deferred-work queue and the stack's layers count
//! what they do through the `metrics` facade. Its own test binary: it
//! installs the process's global recorder (once, for every test here).
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gratify::offload::{CpuPool, Defer, DeferConfig, OffloadError};
use gratify::telemetry::{self, MetricKind};
use gratify::{BoxError, CostModel};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

#[derive(Default)]
struct Counts(Mutex<HashMap<String, Arc<AtomicU64>>>, Mutex<Vec<String>>);

struct Cell(Arc<AtomicU64>);

impl metrics::CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl metrics::GaugeFn for Cell {
    // A gauge counts how often it was set.
    fn increment(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn decrement(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn set(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl metrics::HistogramFn for Cell {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Counts {
    /// Notes `key` registered as `kind` if it is not in the vocabulary:
    /// an unknown name, another kind, a label its definition lacks.
    fn check(&self, key: &Key, kind: MetricKind) {
        let complaint = match telemetry::find(key.name()) {
            None => Some(format!("{} is not defined", key.name())),
            Some(m) if m.kind != kind => Some(format!("{} reported as a {kind:?}", key.name())),
            Some(m) => key
                .labels()
                .find(|l| !m.labels.contains(&l.key()))
                .map(|l| format!("{} carries label {}", key.name(), l.key())),
        };
        if let Some(c) = complaint {
            self.1.lock().unwrap().push(c);
        }
    }

    /// Every metric reported so far is in the vocabulary.
    fn assert_in_the_vocabulary(&self) {
        assert_eq!(*self.1.lock().unwrap(), Vec::<String>::new());
    }

    /// A cell per name and labels (`name{a=1,b=2}`, labels sorted).
    fn cell(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.0.lock().unwrap().entry(name).or_default())
    }
    /// The sum over every label set of `name`.
    fn get(&self, name: &str) -> u64 {
        let prefix = format!("{name}{{");
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }
    /// The count of `name` with exactly these labels (sorted `k=v`, comma
    /// separated).
    fn get_with(&self, name: &str, labels: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&format!("{name}{{{labels}}}"))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

struct Shared(Arc<Counts>);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0.check(key, MetricKind::Counter);
        Counter::from_arc(Arc::new(Cell(self.0.cell(key))))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0.check(key, MetricKind::Gauge);
        Gauge::from_arc(Arc::new(Cell(self.0.cell(key))))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0.check(key, MetricKind::Histogram);
        Histogram::from_arc(Arc::new(Cell(self.0.cell(key))))
    }
}

/// The process's recorder, installed by the first test that asks.
fn counts() -> Arc<Counts> {
    static COUNTS: std::sync::OnceLock<Arc<Counts>> = std::sync::OnceLock::new();
    Arc::clone(COUNTS.get_or_init(|| {
        let counts = Arc::new(Counts::default());
        metrics::set_global_recorder(Shared(Arc::clone(&counts))).unwrap();
        counts
    }))
}

#[tokio::test(start_paused = true)]
async fn pool_and_defer_report_through_the_metrics_facade() {
    let counts = counts();

    let pool = CpuPool::new(Some(1), 1);
    assert_eq!(pool.run(1.0, None, || 2 + 2).await.unwrap(), 4);
    let panicked = pool.run(1.0, None, || -> u32 { panic!("job bug") }).await;
    assert_eq!(panicked.unwrap_err(), OffloadError::Panicked);
    // Fill the one thread and the one queue slot, then one more is refused.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let busy = pool.run(1.0, None, move || rx.recv_timeout(Duration::from_secs(5)));
    let busy = tokio::spawn(busy);
    while pool.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    let queued = tokio::spawn(pool.run(1.0, None, || ()));
    while pool.stats().queued == 0 {
        tokio::task::yield_now().await;
    }
    let refused = pool.run(1.0, None, || ()).await;
    assert_eq!(refused.unwrap_err(), OffloadError::QueueFull);
    tx.send(()).unwrap();
    busy.await.unwrap().unwrap().unwrap();
    queued.await.unwrap().unwrap();
    assert_eq!(counts.get("gratify_offload_done_total"), 4);
    assert_eq!(counts.get("gratify_offload_panicked_total"), 1);
    assert_eq!(counts.get("gratify_offload_refused_total"), 1);
    assert_eq!(counts.get("gratify_offload_wait_seconds"), 4);

    let model = CostModel::from_toml(
        r#"
        [classes.email]
        delay_cost = { shape = "linear", per_second = 0.01 }
        refusal_cost = 1.0
        "#,
    )
    .unwrap();
    let defer = Defer::start(
        &model,
        None,
        DeferConfig::default()
            .max_attempts(2)
            .backoff(Duration::from_millis(1)),
    );
    defer
        .spawn("ok", model.default_class(), || async { Ok(()) })
        .unwrap();
    defer
        .spawn("bad", model.default_class(), || async {
            Err::<(), BoxError>("down".into())
        })
        .unwrap();
    let report = defer.drain(Duration::from_secs(5)).await;
    assert_eq!(report.dead, ["bad"]);
    assert_eq!(counts.get("gratify_defer_done_total"), 1);
    assert_eq!(counts.get("gratify_defer_retries_total"), 1);
    assert_eq!(counts.get("gratify_defer_dead_total"), 1);
    // Queue depths are gauges, set as they change.
    assert!(counts.get("gratify_offload_queued") > 0);
    assert!(counts.get("gratify_defer_pending") > 0);
    every_refusal_is_counted_once_with_who_refused(&counts).await;
    counts.assert_in_the_vocabulary();
}

#[tokio::test]
async fn the_stack_reports_through_the_metrics_facade() {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt, service_fn};

    let counts = counts();
    let stack = gratify::Stack::from_config(
        r#"
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 2.0 }
        refusal_cost = 1.0
        [limit]
        [compression]
        codecs = ["gzip"]
        [cache]
        "#,
    )
    .unwrap();
    let svc = stack.layer(service_fn(|req: Request<()>| async move {
        let mut r = Response::new(Full::new(Bytes::from("{\"id\":7}".repeat(300))));
        // /stored is cached (stored encoded once); /fresh is compressed per request.
        let cc = if req.uri().path() == "/stored" {
            "public, max-age=60"
        } else {
            "no-store"
        };
        r.headers_mut().insert("cache-control", cc.parse().unwrap());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, std::convert::Infallible>(r)
    }));
    for path in ["/stored", "/stored", "/fresh"] {
        let request = Request::get(path)
            .header("host", "shop.example")
            .header("accept-encoding", "gzip")
            .body(())
            .unwrap();
        let r = svc.clone().oneshot(request).await.unwrap();
        let _ = r.into_body().collect().await.unwrap();
    }
    // Requests by result (hit and misses), bytes held, limiter gauges with
    // the cost rate per class, compression bytes, CPU and ratio.
    for name in [
        "gratify_cache_requests_total",
        "gratify_cache_bytes",
        "gratify_cache_entries",
        "gratify_limit",
        "gratify_limit_in_flight",
        "gratify_cost_rate",
        "gratify_compression_bytes_in_total",
        "gratify_compression_bytes_out_total",
        "gratify_compression_cpu_seconds",
        "gratify_compression_ratio",
    ] {
        assert!(counts.get(name) > 0, "{name} was not reported");
    }
    assert!(counts.get("gratify_cache_requests_total") >= 3);
    assert!(
        counts.get("gratify_compression_bytes_out_total")
            < counts.get("gratify_compression_bytes_in_total")
    );
    assert!(counts.get("gratify_compression_responses_total") > 0);
    counts.assert_in_the_vocabulary();
}

/// Every refusal is counted once, with who refused. Called from the one
/// test above, after its exact counts: the counters are the process's.
async fn every_refusal_is_counted_once_with_who_refused(counts: &Counts) {
    use gratify::offload::OffloadLayer;
    use gratify::scaling::limit::{Fixed, Limiter, LimiterConfig};
    use tower::{Layer, ServiceExt};

    let total_before = counts.get("gratify_refused_total");
    let model = CostModel::from_toml(
        r#"
        default_class = "browse"
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 0.01 }
        refusal_cost = 1.0
        "#,
    )
    .unwrap();
    let browse = model.default_class();
    // The limiter: one slot, no queue — the second request is refused.
    let mut config = LimiterConfig::default();
    config.max_queue = 0;
    let limiter = Limiter::with_algorithm(&model, Fixed::new(1), config);
    let held = limiter.admit(browse).await.unwrap();
    assert!(limiter.admit(browse).await.is_err());
    drop(held);
    assert_eq!(
        counts.get_with(
            "gratify_refused_total",
            "by=limit,class=browse,reason=queue-full"
        ),
        1
    );
    // The CPU pool behind an offloaded handler, shut down: it refuses.
    let pool = CpuPool::new(Some(1), 1);
    pool.shutdown_async(Duration::from_secs(1)).await;
    let svc = OffloadLayer::new(pool.clone(), &model).layer(tower::service_fn(
        |_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        },
    ));
    let response = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-gratify-shed"], "shutting-down");
    assert_eq!(
        counts.get_with(
            "gratify_refused_total",
            "by=offload,class=browse,reason=shutting-down"
        ),
        1
    );
    assert_eq!(counts.get("gratify_refused_total") - total_before, 2);
}

/// The stack measures each request as OpenTelemetry's
/// `http.server.request.duration`, with the method, the route template
/// (never the raw path) and the status.
#[tokio::test]
async fn the_stack_records_the_http_server_request_duration() {
    use axum::routing::get;
    use tower::ServiceExt;
    let counts = counts();
    let stack = gratify::Stack::from_config(
        r#"
        default_class = "browse"
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 1.0 }
        refusal_cost = 1.0
        [limit]
        "#,
    )
    .unwrap();
    let app: axum::Router = axum::Router::new()
        .route("/duration-test/{id}", get(|| async { "item" }))
        .layer(stack);
    for id in [1, 2, 3] {
        let request = http::Request::get(format!("/duration-test/{id}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        counts.get_with(
            telemetry::HTTP_SERVER_REQUEST_DURATION.name,
            "gratify.class=browse,http.request.method=GET,http.response.status_code=200,http.route=/duration-test/{id}"
        ),
        3,
        "one sample per request, under the route's template"
    );
    counts.assert_in_the_vocabulary();
}
