//! The admin service: a JSON snapshot and Prometheus text of a live stack.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::time::Duration;

use gratify::Stack;
use gratify::offload::{CpuPool, Defer, DeferConfig};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

const FILE: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0 }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0 }
refusal_cost = 1.0
[[routes]]
path = "/checkout"
class = "checkout"
[limit]
[compression]
codecs = ["gzip"]
[cache]
"#;

async fn get<S>(svc: &S, path: &str) -> (StatusCode, String)
where
    S: tower::Service<
            Request<axum::body::Body>,
            Response = Response<axum::body::Body>,
            Error = Infallible,
        > + Clone,
{
    let request = Request::get(path)
        .header("host", "shop.example")
        .header("accept-encoding", "gzip")
        .body(axum::body::Body::empty())
        .unwrap();
    let r = svc.clone().oneshot(request).await.unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Every sample line of `text` is `name{labels} value` after its `TYPE`
/// line, and every metric is one of the vocabulary's, with its kind and
/// only labels it defines.
fn in_the_vocabulary(text: &str) {
    use gratify::telemetry::{self, MetricKind};
    let mut typed = std::collections::HashMap::new();
    let mut series_seen = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            let metric = telemetry::find(name).unwrap_or_else(|| panic!("{name} is not defined"));
            assert_eq!(metric.kind.as_str(), kind, "{name}");
            assert!(
                typed.insert(name.to_owned(), metric).is_none(),
                "{name} typed twice"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(series_seen.insert(series.to_owned()), "{series} twice");
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let (metric, extra) = match typed.get(name) {
            Some(m) => {
                // A histogram is only its _bucket, _sum and _count series.
                assert_ne!(m.kind, MetricKind::Histogram, "{line}");
                (*m, None)
            }
            None => {
                // A histogram's series.
                let (base, suffix) = name.rsplit_once('_').unwrap();
                let m = typed.get(base).unwrap_or_else(|| panic!("{line}: no TYPE"));
                assert_eq!(m.kind, MetricKind::Histogram, "{line}");
                assert!(["bucket", "sum", "count"].contains(&suffix), "{line}");
                (*m, (suffix == "bucket").then_some("le"))
            }
        };
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let key = pair.split('=').next().unwrap();
            assert!(
                metric.labels.contains(&key) || extra == Some(key),
                "{line}: label {key} is not one of {:?}",
                metric.labels
            );
        }
    }
}

#[tokio::test]
async fn a_live_stack_shows_in_the_snapshot_and_in_prometheus_text() {
    use axum::Router;
    use axum::routing::get as route;

    let stack = Stack::from_config(FILE).unwrap();
    let pool = CpuPool::new(Some(1), 8);
    let model = stack.model();
    let defer = Defer::start(&model, None, DeferConfig::default());
    let admin = stack
        .admin()
        .with_pool("cpu", CpuPool::new(Some(1), 8))
        // The same name again replaces the first: one series per name.
        .with_pool("cpu", pool.clone())
        .with_defer("mail", defer.clone());
    let app: Router = Router::new()
        .route(
            "/checkout",
            route(|| async {
                (
                    [
                        ("cache-control", "no-store"),
                        ("content-type", "application/json"),
                    ],
                    "{\"order\":1}".repeat(200),
                )
            }),
        )
        .route(
            "/products",
            route(|| async {
                (
                    [
                        ("cache-control", "public, max-age=60"),
                        ("content-type", "application/json"),
                    ],
                    "{\"id\":7}".repeat(300),
                )
            }),
        )
        .layer(stack.clone())
        // The admin service mounted under a prefix, outside the stack.
        .nest_service("/ops/admin", admin.clone());
    for path in ["/checkout", "/checkout", "/products", "/products"] {
        assert_eq!(get(&app, path).await.0, StatusCode::OK);
    }
    pool.run(1.0, None, || ()).await.unwrap();
    defer
        .spawn("welcome", model.default_class(), || async { Ok(()) })
        .unwrap();
    let _ = defer.drain(Duration::from_secs(5)).await;
    // moka counts entries as its maintenance runs.
    stack.cache_purge().unwrap().sync().await;

    let (status, json) = get(&app, "/ops/admin/snapshot.json").await;
    assert_eq!(status, StatusCode::OK);
    let snap: serde_json::Value = serde_json::from_str(&json).unwrap();
    let classes = snap["limit"]["classes"].as_array().unwrap();
    let by_name = |n: &str| classes.iter().find(|c| c["name"] == n).unwrap().clone();
    assert_eq!(by_name("checkout")["completed"], 2);
    // The second /products was a cache hit: it never asked for a slot.
    assert_eq!(by_name("browse")["completed"], 1);
    assert_eq!(by_name("browse")["admitted"], 1);
    assert_eq!(snap["limit"]["in_flight"], 0);
    assert!(snap["cache"]["entries"].as_u64().unwrap() >= 1);
    assert!(snap["compression"]["responses"].as_u64().unwrap() >= 2);
    assert!(snap["compression"]["ratio"].as_f64().unwrap() < 0.5);
    assert_eq!(snap["offload"][0]["name"], "cpu");
    assert_eq!(snap["offload"][0]["done"], 1);
    assert_eq!(snap["defer"][0]["done"], 1);
    assert_eq!(snap["model"]["default_class"], "browse");

    let (status, text) = get(&app, "/ops/admin/metrics").await;
    assert_eq!(status, StatusCode::OK);
    in_the_vocabulary(&text);
    assert!(
        text.contains("gratify_offload_done_total{name=\"cpu\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("gratify_defer_done_total{name=\"mail\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("gratify_defer_pending{name=\"mail\"} 0"),
        "{text}"
    );
    // The CPU compression took, as a histogram's sum and count.
    assert!(
        text.contains("gratify_compression_cpu_seconds_count "),
        "{text}"
    );
    assert!(
        text.contains("gratify_limit_admitted_total{class=\"checkout\"} 2"),
        "{text}"
    );
    assert!(text.contains("gratify_limit_shed_total{class=\"browse\",reason=\"cost\"} 0"));
    assert!(
        text.contains("gratify_refused_total{by=\"limit\",class=\"browse\",reason=\"cost\"} 0")
    );
    assert!(text.contains("gratify_offload_queued{name=\"cpu\"} 0"));
    // The cache's requests, by result, as in the snapshot (and with the
    // metrics facade's name).
    let hits = snap["cache"]["requests"]["hit"].as_u64().unwrap();
    assert!(hits >= 1);
    assert!(
        text.contains(&format!(
            "gratify_cache_requests_total{{result=\"hit\"}} {hits}"
        )),
        "{text}"
    );

    assert_eq!(
        get(&app, "/ops/admin/nothing").await.0,
        StatusCode::NOT_FOUND
    );
    let post = Request::post("/ops/admin/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let r = app.clone().oneshot(post).await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    pool.shutdown(Duration::from_secs(1));
}

#[tokio::test]
async fn the_advisor_is_exported_for_keda_and_the_hpa() {
    use gratify::scaling::advisor::{AdvisorConfig, Measurements, ScalingAdvisor};
    use std::sync::Arc;

    let stack = Stack::from_config(FILE).unwrap();
    let model = stack.model();
    let advisor = Arc::new(ScalingAdvisor::new(
        &model,
        AdvisorConfig::new(4).replicas(2, 40),
    ));
    let admin = stack.admin().with_advisor(Arc::clone(&advisor));
    // Before any measurement: said, not guessed; no replicas metric.
    assert_eq!(admin.snapshot()["advisor"]["state"], "insufficient-data");
    assert!(!admin.prometheus().contains("gratify_recommended_replicas "));
    advisor.observe(
        tokio::time::Instant::now(),
        Measurements::new(&model)
            .rate("browse", 300.0)
            .rate("checkout", 20.0)
            .service(0.05, 1.5)
            .samples(5000),
    );
    let snap = admin.snapshot();
    assert_eq!(snap["advisor"]["state"], "fresh");
    let replicas = snap["advisor"]["replicas"].as_u64().unwrap();
    assert!((4..=40).contains(&replicas), "{snap}");
    let text = admin.prometheus();
    in_the_vocabulary(&text);
    assert!(
        text.contains(&format!("gratify_recommended_replicas {replicas}")),
        "{text}"
    );
}
