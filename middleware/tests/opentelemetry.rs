//! The OpenTelemetry setup of docs/observability.md: the admin service's
//! samples as observable instruments of an OpenTelemetry meter, read here by
//! an in-memory exporter.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;

use gratify::Stack;
use gratify::admin::{Admin, SampleValue};
use gratify::telemetry::{self, MetricKind};
use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use tower::{ServiceExt, service_fn};

/// The guide's code: every counter and gauge of gratify's vocabulary as an
/// observable instrument of `meter`, read from `admin` at each collection.
/// (Histograms reach OpenTelemetry through the `metrics` facade.)
fn observe_gratify(meter: &Meter, admin: &Admin) {
    for metric in telemetry::ALL {
        let admin = admin.clone();
        let values = move || {
            admin
                .samples()
                .into_iter()
                .filter(|s| s.metric.name == metric.name)
                .filter_map(|s| match s.value {
                    SampleValue::Number(v) => Some((v, s.labels)),
                    _ => None,
                })
                .map(|(v, labels)| {
                    let attributes: Vec<KeyValue> = labels
                        .into_iter()
                        .map(|(k, v)| KeyValue::new(k, v))
                        .collect();
                    (v, attributes)
                })
                .collect::<Vec<_>>()
        };
        match metric.kind {
            MetricKind::Counter => {
                meter
                    .f64_observable_counter(metric.name)
                    .with_description(metric.help)
                    .with_callback(move |o| values().iter().for_each(|(v, a)| o.observe(*v, a)))
                    .build();
            }
            MetricKind::Gauge => {
                meter
                    .f64_observable_gauge(metric.name)
                    .with_description(metric.help)
                    .with_callback(move |o| values().iter().for_each(|(v, a)| o.observe(*v, a)))
                    .build();
            }
            _ => {}
        }
    }
}

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
"#;

#[tokio::test]
async fn the_admin_figures_reach_an_opentelemetry_exporter() {
    let stack = Stack::from_config(FILE).unwrap();
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    observe_gratify(&provider.meter("gratify"), &stack.admin());

    let app = tower::Layer::layer(
        &stack,
        service_fn(|_req: Request<String>| async {
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        }),
    );
    for path in ["/checkout", "/checkout", "/products"] {
        let request = Request::get(path).body(String::new()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
    }
    provider.force_flush().unwrap();

    let exported = exporter.get_finished_metrics().unwrap();
    let mut admitted = Vec::new();
    let mut limit = None;
    for resource in &exported {
        for scope in resource.scope_metrics() {
            for metric in scope.metrics() {
                // Every metric exported is one of the vocabulary.
                let defined = telemetry::find(metric.name()).unwrap();
                match (metric.data(), defined.kind) {
                    (AggregatedMetrics::F64(MetricData::Sum(sum)), MetricKind::Counter) => {
                        assert!(sum.is_monotonic(), "{}", metric.name());
                        if metric.name() == telemetry::LIMIT_ADMITTED_TOTAL.name {
                            for point in sum.data_points() {
                                let class = point
                                    .attributes()
                                    .find(|kv| kv.key.as_str() == "class")
                                    .map(|kv| kv.value.to_string())
                                    .unwrap();
                                admitted.push((class, point.value()));
                            }
                        }
                    }
                    (AggregatedMetrics::F64(MetricData::Gauge(gauge)), MetricKind::Gauge) => {
                        if metric.name() == telemetry::LIMIT.name {
                            limit = gauge.data_points().next().map(|p| p.value());
                        }
                    }
                    (data, kind) => {
                        panic!("{} exported as {data:?}, defined {kind:?}", metric.name())
                    }
                }
            }
        }
    }
    admitted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        admitted,
        [("browse".to_owned(), 1.0), ("checkout".to_owned(), 2.0)]
    );
    assert!(limit.unwrap() >= 1.0);
    provider.shutdown().unwrap();
}
