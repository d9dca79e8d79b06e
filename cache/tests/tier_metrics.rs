//! The shared tier counts through the `metrics` facade what `TierStats`
//! counts. Its own test binary: it installs the process's global recorder.
#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use gratify_cache::tier::TierConfig;
use gratify_cache::tier::redis::RedisTier;
use gratify_cache::{HttpCacheConfig, HttpCacheLayer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tower::{Layer, ServiceExt, service_fn};

#[derive(Default)]
struct Counts(Mutex<HashMap<String, Arc<AtomicU64>>>);

struct Cell(Arc<AtomicU64>);

impl metrics::CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

struct Shared(Arc<Counts>);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cell = Arc::clone(
            self.0
                .0
                .lock()
                .unwrap()
                .entry(key.name().to_owned())
                .or_default(),
        );
        Counter::from_arc(Arc::new(Cell(cell)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_reads_and_dropped_writes_are_counted() {
    let counts = Arc::new(Counts::default());
    metrics::set_global_recorder(Shared(Arc::clone(&counts))).unwrap();
    let get = |name: &str| {
        counts
            .0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    };
    // Redis is down (nothing listens on the port) and the write queue holds
    // one write: reads are skipped and most writes dropped.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = TierConfig::new("m");
    config.write_queue = 1;
    let layer = HttpCacheLayer::new(HttpCacheConfig::default()).with_tier(
        RedisTier::open(&format!("redis://127.0.0.1:{port}")).unwrap(),
        config,
    );
    let purge = layer.purge();
    let svc = layer.layer(service_fn(|_: Request<()>| async {
        let mut r = Response::new(Full::new(Bytes::from_static(b"page")));
        r.headers_mut()
            .insert("cache-control", "public, max-age=60".parse().unwrap());
        Ok::<_, Infallible>(r)
    }));
    for i in 0..20 {
        let request = Request::get(format!("/p/{i}"))
            .header("host", "shop.example")
            .body(())
            .unwrap();
        let response = svc.clone().oneshot(request).await.unwrap();
        assert!(response.status().is_success());
        let _ = response.into_body().collect().await.unwrap();
    }
    let stats = purge.tier_stats().unwrap();
    assert_eq!(stats.skipped, 20);
    assert!(stats.dropped_writes > 0, "{stats:?}");
    assert_eq!(get("gratify_cache_tier_skipped_total"), stats.skipped);
    assert_eq!(
        get("gratify_cache_tier_dropped_writes_total"),
        stats.dropped_writes
    );
}
