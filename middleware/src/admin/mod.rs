//! [`Admin`]: a tower service that shows what a [`Stack`](crate::Stack) is
//! doing, as a JSON snapshot and as Prometheus text.
//!
//! Mount it at any path; it answers by the last segment of the path:
//!
//! | path ends with | answer |
//! |---|---|
//! | `/snapshot.json` | the [snapshot](Admin::snapshot) as JSON |
//! | `/metrics` | the same figures in the Prometheus text exposition format (0.0.4) |
//! | `/` or `/dashboard` | the live dashboard: one self-contained page (no CDN, no build step) polling `snapshot.json` every second, charting the last five minutes |
//! | anything else | 404 |
//!
//! It reads the pieces' own counters, so it needs no metrics recorder; with
//! the `metrics` feature the same figures (and more) also go to whatever
//! recorder is installed (see `docs/observability.md`).
//!
//! ```
//! use gratify::{CostModel, Stack};
//! use http::Request;
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let model = CostModel::from_toml(r#"
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0 }
//!     refusal_cost = 1.0
//! "#).unwrap();
//! let stack = Stack::new(&model).limit();
//! let admin = stack.admin();
//! let res = admin.clone().oneshot(Request::get("/admin/metrics").body(()).unwrap()).await.unwrap();
//! let text = String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
//! assert!(text.contains("gratify_limit_in_flight 0"));
//! assert_eq!(admin.snapshot()["limit"]["classes"][0]["name"], "browse");
//! # }
//! ```

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gratify_cache::CachePurge;
use gratify_core::telemetry::{self as T, Metric, MetricKind};
use gratify_core::{ClassId, CostModel};
use gratify_scaling::advisor::{Recommendation, ScalingAdvisor};
use gratify_scaling::limit::{Limiter, Reason};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tower_service::Service;

use crate::compression::CompressionLayer;
use crate::offload::{CpuPool, Defer};

/// The dashboard page, embedded.
const DASHBOARD: &str = include_str!("dashboard.html");

const REASONS: [Reason; 7] = [
    Reason::Cost,
    Reason::Deadline,
    Reason::QueueFull,
    Reason::QueueTimeout,
    Reason::Displaced,
    Reason::AtLimit,
    Reason::Partition,
];

/// What the admin service reads; cheap to clone (every field is a handle).
#[derive(Clone)]
pub struct Admin {
    model: std::sync::Arc<dyn Fn() -> CostModel + Send + Sync>,
    limiter: Option<Limiter>,
    cache: Option<CachePurge>,
    compression: Option<CompressionLayer>,
    pools: Vec<(String, CpuPool)>,
    defers: Vec<(String, Defer)>,
    advisor: Option<std::sync::Arc<ScalingAdvisor>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("limiter", &self.limiter.is_some())
            .field("cache", &self.cache.is_some())
            .field("compression", &self.compression.is_some())
            .field("pools", &self.pools.len())
            .field("defers", &self.defers.len())
            .finish()
    }
}

impl Admin {
    pub(crate) fn new(
        model: impl Fn() -> CostModel + Send + Sync + 'static,
        limiter: Option<Limiter>,
        cache: Option<CachePurge>,
        compression: Option<CompressionLayer>,
    ) -> Self {
        Self {
            model: std::sync::Arc::new(model),
            limiter,
            cache,
            compression,
            pools: Vec::new(),
            defers: Vec::new(),
            advisor: None,
        }
    }

    /// Also reports `advisor`'s recommendation (`advisor` in the snapshot,
    /// `gratify_recommended_replicas` in the Prometheus text — the metric a
    /// KEDA or HPA external-metric scaler reads; see docs/deployment.md).
    #[must_use]
    pub fn with_advisor(mut self, advisor: std::sync::Arc<ScalingAdvisor>) -> Self {
        self.advisor = Some(advisor);
        self
    }

    /// Also reports the CPU pool `pool` under `name` (in place of one
    /// added before under the same name).
    #[must_use]
    pub fn with_pool(mut self, name: impl Into<String>, pool: CpuPool) -> Self {
        let name = name.into();
        self.pools.retain(|(n, _)| *n != name);
        self.pools.push((name, pool));
        self
    }

    /// Also reports the deferred-work queue `defer` under `name` (in place
    /// of one added before under the same name).
    #[must_use]
    pub fn with_defer(mut self, name: impl Into<String>, defer: Defer) -> Self {
        let name = name.into();
        self.defers.retain(|(n, _)| *n != name);
        self.defers.push((name, defer));
        self
    }

    /// Everything, now, as JSON: `time_ms`; `model` (classes, prices);
    /// `limit` (limit, in flight, queued, latency, shadow price, and per
    /// class: in flight, queued, admitted, completed, shed by reason,
    /// latency, the delay cost accruing per second); `cache` (entries, bytes,
    /// the shared tier's counters); `compression` (responses, bytes in and
    /// out, CPU, the learned speed and ratio per codec and level);
    /// `offload` and `defer` (each pool's and queue's counters). A piece
    /// that is off is `null`.
    pub fn snapshot(&self) -> Value {
        let model = (self.model)();
        let name = |k: usize| model.name(ClassId::from_index(k as u16)).to_owned();
        let limit = self.limiter.as_ref().map(|l| {
            let s = l.stats();
            let classes: Vec<Value> = s
                .classes
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let urgency = model
                        .get(ClassId::from_index(k as u16))
                        .map_or(0.0, |class| class.urgency(c.latency));
                    let shed: serde_json::Map<String, Value> = REASONS
                        .iter()
                        .map(|r| (r.as_str().to_owned(), json!(c.shed_for(*r))))
                        .collect();
                    json!({
                        "name": name(k),
                        "in_flight": c.in_flight,
                        "queued": c.queued,
                        "admitted": c.admitted,
                        "completed": c.completed,
                        "shed": shed,
                        "shed_total": c.shed_total(),
                        "latency_ms": c.latency * 1e3,
                        "cost_rate": (c.in_flight + c.queued) as f64 * urgency,
                    })
                })
                .collect();
            json!({
                "algorithm": l.algorithm_name(),
                "limit": s.limit,
                "in_flight": s.in_flight,
                "queued": s.queued,
                "latency_ms": s.latency * 1e3,
                "shadow_price": s.shadow_price,
                "classes": classes,
            })
        });
        let cache = self.cache.as_ref().map(|c| {
            let tier = c.tier_stats().map(|t| {
                json!({
                    "ready": t.ready, "breaker_open": t.breaker_open, "hits": t.hits,
                    "misses": t.misses, "errors": t.errors, "skipped": t.skipped,
                    "dropped_writes": t.dropped_writes, "invalidations": t.invalidations,
                    "resubscribed": t.resubscribed,
                })
            });
            let r = c.requests();
            json!({
                "entries": c.entry_count(),
                "bytes": c.weighted_size(),
                "requests": { "hit": r.hit, "stale": r.stale, "miss": r.miss, "bypass": r.bypass },
                "tier": tier,
            })
        });
        let compression = self.compression.as_ref().map(|c| {
            let s = c.stats();
            let levels: Vec<Value> = s
                .levels
                .iter()
                .map(|(codec, level, speed, ratio)| {
                    json!({ "codec": codec.name(), "level": level, "mb_per_s": speed / 1e6, "ratio": ratio })
                })
                .collect();
            json!({
                "responses": s.responses,
                "bytes_in": s.bytes_in,
                "bytes_out": s.bytes_out,
                "ratio": if s.bytes_in > 0 { s.bytes_out as f64 / s.bytes_in as f64 } else { 1.0 },
                "cpu_ms": s.cpu.as_secs_f64() * 1e3,
                "levels": levels,
            })
        });
        let offload: Vec<Value> = self
            .pools
            .iter()
            .map(|(n, p)| {
                let s = p.stats();
                json!({
                    "name": n, "queued": s.queued, "running": s.running,
                    "done": s.done, "refused": s.refused, "dropped": s.dropped, "panicked": s.panicked,
                })
            })
            .collect();
        let defer: Vec<Value> = self
            .defers
            .iter()
            .map(|(n, d)| {
                let s = d.stats();
                json!({
                    "name": n, "queued": s.queued, "running": s.running, "done": s.done,
                    "retries": s.retries, "dead": s.dead,
                })
            })
            .collect();
        let advisor = self.advisor.as_ref().map(|a| {
            let (state, advice) = match a.recommend(tokio::time::Instant::now()) {
                Recommendation::Replicas(advice) => ("fresh", Some(advice)),
                Recommendation::Stale(advice) => ("stale", Some(advice)),
                _ => ("insufficient-data", None),
            };
            match advice {
                Some(x) => json!({
                    "state": state,
                    "replicas": x.replicas,
                    "raw": x.raw,
                    "pooled_replicas": x.pooled_replicas,
                    "per_replica_replicas": x.per_replica_replicas,
                    "bmr_replicas": x.bmr_replicas,
                    "offered_load": x.offered_load,
                    "replica_cost_per_s": x.cost.replica_cost,
                    "delay_cost_per_s": x.cost.pooled_delay_cost.max(x.cost.per_replica_delay_cost),
                }),
                None => json!({ "state": state }),
            }
        });
        let prices = model.prices();
        json!({
            "time_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "model": {
                "classes": model.iter().map(|(_, n, _)| n).collect::<Vec<_>>(),
                "default_class": model.name(model.default_class()),
                "prices": {
                    "slot_second": prices.slot_second, "cpu_second": prices.cpu_second,
                    "byte_sent": prices.byte_sent, "cache_byte_hour": prices.cache_byte_hour,
                    "replica_hour": prices.replica_hour,
                },
            },
            "limit": limit,
            "cache": cache,
            "compression": compression,
            "offload": offload,
            "defer": defer,
            "advisor": advisor,
        })
    }

    /// The snapshot in the Prometheus text exposition format: the
    /// [`samples`](Self::samples), each metric with its `HELP` and `TYPE`.
    pub fn prometheus(&self) -> String {
        let mut text = String::new();
        let mut last: Option<&str> = None;
        for sample in self.samples() {
            let metric = sample.metric;
            if last != Some(metric.name) {
                // HELP escapes only backslashes and line feeds.
                let help = metric.help.replace('\\', "\\\\").replace('\n', "\\n");
                let _ = writeln!(text, "# HELP {} {help}", metric.name);
                let _ = writeln!(text, "# TYPE {} {}", metric.name, metric.kind.as_str());
                last = Some(metric.name);
            }
            match sample.value {
                SampleValue::Number(v) => write_sample(&mut text, metric.name, &sample.labels, v),
                SampleValue::Histogram { sum, count } => {
                    let name = metric.name;
                    let mut le = sample.labels.clone();
                    le.push(("le", "+Inf".to_owned()));
                    write_sample(&mut text, &format!("{name}_bucket"), &le, count as f64);
                    write_sample(&mut text, &format!("{name}_sum"), &sample.labels, sum);
                    write_sample(
                        &mut text,
                        &format!("{name}_count"),
                        &sample.labels,
                        count as f64,
                    );
                }
            }
        }
        text
    }

    /// Every figure now, in the names, kinds and labels of
    /// [`gratify_core::telemetry`] — the ones the `metrics` facade reports
    /// too — metric by metric. CPU pools and deferred queues are labelled by
    /// the `name` they were added under; compression is summed over codecs
    /// and levels. What the Prometheus text shows, for an exporter of your
    /// own (an OpenTelemetry meter's observable instruments, say).
    pub fn samples(&self) -> Vec<Sample> {
        let snap = self.snapshot();
        let mut out = Samples::default();
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        if let Some(l) = snap["limit"].as_object() {
            out.one(&T::LIMIT, f(&l["limit"]));
            out.one(&T::LIMIT_IN_FLIGHT, f(&l["in_flight"]));
            out.one(&T::LIMIT_QUEUED, f(&l["queued"]));
            out.one(&T::LIMIT_SHADOW_PRICE, f(&l["shadow_price"]));
            let classes = l["classes"].as_array().cloned().unwrap_or_default();
            let class = |c: &Value| c["name"].as_str().unwrap_or("").to_owned();
            let per = |key: &str| -> Vec<(Labels, f64)> {
                classes
                    .iter()
                    .map(|c| (vec![("class", class(c))], f(&c[key])))
                    .collect()
            };
            out.metric(&T::LIMIT_QUEUED_CLASS, &per("queued"));
            out.metric(&T::LIMIT_IN_FLIGHT_CLASS, &per("in_flight"));
            out.metric(&T::LIMIT_ADMITTED_TOTAL, &per("admitted"));
            out.metric(&T::COST_RATE, &per("cost_rate"));
            let shed: Vec<(Labels, f64)> = classes
                .iter()
                .flat_map(|c| {
                    REASONS.iter().map(move |r| {
                        (
                            vec![("class", class(c)), ("reason", r.as_str().to_owned())],
                            f(&c["shed"][r.as_str()]),
                        )
                    })
                })
                .collect();
            out.metric(&T::LIMIT_SHED_TOTAL, &shed);
            let refused: Vec<(Labels, f64)> = shed
                .iter()
                .map(|(labels, v)| {
                    let mut with_by = vec![("by", "limit".to_owned())];
                    with_by.extend(labels.iter().cloned());
                    (with_by, *v)
                })
                .collect();
            out.metric(&T::REFUSED_TOTAL, &refused);
        }
        if let Some(c) = snap["cache"].as_object() {
            out.one(&T::CACHE_ENTRIES, f(&c["entries"]));
            out.one(&T::CACHE_BYTES, f(&c["bytes"]));
            let requests: Vec<(Labels, f64)> = ["hit", "stale", "miss", "bypass"]
                .iter()
                .map(|r| (vec![("result", (*r).to_owned())], f(&c["requests"][*r])))
                .collect();
            out.metric(&T::CACHE_REQUESTS_TOTAL, &requests);
            if let Some(t) = c["tier"].as_object() {
                for (metric, key) in [
                    (&T::CACHE_TIER_HITS_TOTAL, "hits"),
                    (&T::CACHE_TIER_MISSES_TOTAL, "misses"),
                    (&T::CACHE_TIER_ERRORS_TOTAL, "errors"),
                    (&T::CACHE_TIER_SKIPPED_TOTAL, "skipped"),
                    (&T::CACHE_TIER_DROPPED_WRITES_TOTAL, "dropped_writes"),
                    (&T::CACHE_TIER_INVALIDATIONS_TOTAL, "invalidations"),
                    (&T::CACHE_TIER_RESUBSCRIBED_TOTAL, "resubscribed"),
                ] {
                    out.one(metric, f(&t[key]));
                }
                let open = t["breaker_open"].as_bool().unwrap_or(false);
                out.one(&T::CACHE_TIER_BREAKER_OPEN, if open { 1.0 } else { 0.0 });
            }
        }
        if let Some(c) = snap["compression"].as_object() {
            // Summed over codecs and levels.
            out.one(&T::COMPRESSION_RESPONSES_TOTAL, f(&c["responses"]));
            out.one(&T::COMPRESSION_BYTES_IN_TOTAL, f(&c["bytes_in"]));
            out.one(&T::COMPRESSION_BYTES_OUT_TOTAL, f(&c["bytes_out"]));
            // A histogram of one bucket: its sum and count.
            out.histogram(
                &T::COMPRESSION_CPU_SECONDS,
                f(&c["cpu_ms"]) / 1e3,
                f(&c["responses"]),
            );
        }
        if let Some(a) = snap["advisor"].as_object()
            && let Some(n) = a.get("replicas")
        {
            out.one(&T::RECOMMENDED_REPLICAS, f(n));
            out.one(&T::ADVISOR_REPLICA_COST, f(&a["replica_cost_per_s"]));
            out.one(&T::ADVISOR_DELAY_COST, f(&a["delay_cost_per_s"]));
            out.one(
                &T::ADVISOR_STALE,
                if a["state"] == "stale" { 1.0 } else { 0.0 },
            );
        }
        let named = |key: &str, value: &dyn Fn(&Value) -> f64| -> Vec<(Labels, f64)> {
            snap[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            let name = p["name"].as_str().unwrap_or("").to_owned();
                            (vec![("name", name)], value(p))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        for (metric, key) in [
            (&T::OFFLOAD_QUEUED, "queued"),
            (&T::OFFLOAD_DONE_TOTAL, "done"),
            (&T::OFFLOAD_REFUSED_TOTAL, "refused"),
            (&T::OFFLOAD_DROPPED_TOTAL, "dropped"),
            (&T::OFFLOAD_PANICKED_TOTAL, "panicked"),
        ] {
            out.metric(metric, &named("offload", &|p| f(&p[key])));
        }
        out.metric(
            &T::DEFER_PENDING,
            &named("defer", &|p| f(&p["queued"]) + f(&p["running"])),
        );
        for (metric, key) in [
            (&T::DEFER_DONE_TOTAL, "done"),
            (&T::DEFER_RETRIES_TOTAL, "retries"),
            (&T::DEFER_DEAD_TOTAL, "dead"),
        ] {
            out.metric(metric, &named("defer", &|p| f(&p[key])));
        }
        out.0
    }
}

/// A sample's labels, in order: each one of its metric's.
type Labels = Vec<(&'static str, String)>;

/// One value of one metric, as [`Admin::samples`] reports it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// The metric, from the vocabulary.
    pub metric: &'static Metric,
    /// Its labels (name, value), each one of the metric's.
    pub labels: Vec<(&'static str, String)>,
    /// Its value.
    pub value: SampleValue,
}

/// The value of a [`Sample`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum SampleValue {
    /// A counter's or a gauge's value.
    Number(f64),
    /// A histogram known by the sum and the count of what it observed.
    Histogram {
        /// The sum of the values observed.
        sum: f64,
        /// How many values were observed.
        count: u64,
    },
}

/// The samples gathered so far, metric by metric.
#[derive(Default)]
struct Samples(Vec<Sample>);

impl Samples {
    /// Each sample of `metric`.
    fn metric(&mut self, metric: &'static Metric, samples: &[(Labels, f64)]) {
        for (labels, value) in samples {
            debug_assert!(
                labels.iter().all(|(k, _)| metric.labels.contains(k)),
                "{} carries a label its definition does not have",
                metric.name
            );
            debug_assert_ne!(metric.kind, MetricKind::Histogram);
            self.0.push(Sample {
                metric,
                labels: labels.clone(),
                value: SampleValue::Number(*value),
            });
        }
    }

    /// A metric of one sample without labels.
    fn one(&mut self, metric: &'static Metric, value: f64) {
        self.metric(metric, &[(Vec::new(), value)]);
    }

    /// A histogram known only by its sum and count.
    fn histogram(&mut self, metric: &'static Metric, sum: f64, count: f64) {
        debug_assert_eq!(metric.kind, MetricKind::Histogram);
        self.0.push(Sample {
            metric,
            labels: Vec::new(),
            value: SampleValue::Histogram {
                sum,
                count: count as u64,
            },
        });
    }
}

/// One sample line of the Prometheus text.
fn write_sample(text: &mut String, name: &str, labels: &Labels, value: f64) {
    text.push_str(name);
    if !labels.is_empty() {
        text.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{k}=\"{}\"", escape(v));
        }
        text.push('}');
    }
    let _ = writeln!(text, " {}", fmt_value(value));
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn answer(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl<B> Service<Request<B>> for Admin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut r = answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "GET only\n",
            );
            r.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return ready(Ok(r));
        }
        let path = request.uri().path().trim_end_matches('/');
        let last = path.rsplit('/').next().unwrap_or("");
        let response = match last {
            "snapshot.json" => answer(
                StatusCode::OK,
                "application/json",
                self.snapshot().to_string(),
            ),
            "metrics" => answer(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.prometheus(),
            ),
            "" | "dashboard" => answer(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
            _ => answer(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found\n",
            ),
        };
        ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(fmt_value(f64::INFINITY), "+Inf");
        assert_eq!(fmt_value(1.5), "1.5");
    }
}
