//! What the limiter learns, and what it must not: sequences in time that
//! fooled a limiter judging every class by one global inflation factor —
//! a slow outlier of a cheap class, a class refused until restart, bursts of
//! fast failures, cancelled requests. All on tokio's paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gratify_core::{ClassId, CostModel};
use gratify_scaling::limit::{
    AdaptiveLimitLayer, Algorithm, Fixed, Limiter, LimiterConfig, Outcome, Reason,
    SHED_REASON_HEADER, Sample,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{Layer, Service, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.tight]
delay_cost = { shape = "linear", per_second = 50.0, deadline = "50ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 0.5, deadline = "60s" }
refusal_cost = 1.0
"#;

fn model() -> CostModel {
    CostModel::from_toml(MODEL).unwrap()
}

fn config(f: impl FnOnce(&mut LimiterConfig)) -> LimiterConfig {
    let mut c = LimiterConfig::default();
    c.warmup_samples = 10;
    f(&mut c);
    c
}

/// A request of `class` whose body is "ms[:status]": how long the origin
/// takes and what it answers.
fn req(class: ClassId, body: &str) -> Request<String> {
    let mut r = Request::new(body.to_owned());
    r.extensions_mut().insert(class);
    r
}

/// The origin: sleeps the body's milliseconds (plus `extra`, shared, so a
/// test can slow the whole service down) and answers the body's status.
fn origin(
    extra: Arc<AtomicU64>,
) -> impl Service<Request<String>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |r: Request<String>| {
        let extra = Arc::clone(&extra);
        async move {
            let (ms, status) = r.body().split_once(':').unwrap_or((r.body(), "200"));
            let ms = ms.parse::<u64>().unwrap_or(0) + extra.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut res = Response::new(Full::new(Bytes::new()));
            *res.status_mut() = status.parse().unwrap_or(StatusCode::OK);
            Ok::<_, Infallible>(res)
        }
    })
}

/// A fixed limit that records every sample it is taught.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Outcome>>>);

impl Algorithm for Recorder {
    fn initial_limit(&self) -> usize {
        16
    }
    fn update(&mut self, sample: &Sample) -> usize {
        self.0.lock().unwrap().push(sample.outcome);
        16
    }
    fn name(&self) -> &'static str {
        "recorder"
    }
}

async fn send<S>(svc: &S, class: ClassId, body: &str) -> Response<Bytes>
where
    S: Service<
            Request<String>,
            Response = Response<gratify_scaling::limit::body::LimitBody<Full<Bytes>>>,
            Error = Infallible,
        > + Clone,
{
    let res = svc.clone().oneshot(req(class, body)).await.unwrap();
    let (parts, body) = res.into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test(start_paused = true)]
async fn a_slow_outlier_in_a_cheap_class_never_refuses_a_tight_class_with_free_slots() {
    let m = model();
    let (tight, browse) = (m.id("tight").unwrap(), m.id("browse").unwrap());
    let l = Limiter::with_algorithm(&m, Fixed::new(16), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::default()));
    for _ in 0..50 {
        assert_eq!(send(&svc, tight, "10").await.status(), StatusCode::OK);
        assert_eq!(send(&svc, browse, "20").await.status(), StatusCode::OK);
    }
    // One export of 30 s in the cheap class, then tight requests while it
    // runs and after it has ended: one slot of sixteen is busy at most.
    let export = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, browse, "30000").await.status() }
    });
    for round in 0..2 {
        for i in 0..300 {
            let res = send(&svc, tight, "10").await;
            assert_eq!(res.status(), StatusCode::OK, "round {round}, request {i}");
            if i % 10 == 0 {
                assert_eq!(send(&svc, browse, "20").await.status(), StatusCode::OK);
            }
        }
        if round == 0 {
            assert!(!export.is_finished());
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }
    assert_eq!(export.await.unwrap(), StatusCode::OK);
    assert_eq!(l.stats().classes[tight.index()].shed_total(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_class_refused_for_its_deadline_returns_when_the_service_recovers() {
    let m = model();
    let tight = m.id("tight").unwrap();
    let extra = Arc::new(AtomicU64::new(0));
    let l = Limiter::with_algorithm(&m, Fixed::new(16), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::clone(&extra)));
    for _ in 0..100 {
        assert_eq!(send(&svc, tight, "10").await.status(), StatusCode::OK);
    }
    // The service slows past the class's deadline: the class is refused
    // for it (a one-class service: no other class's samples arrive), a
    // request every 10 ms.
    extra.store(200, Ordering::SeqCst);
    let statuses = |n: usize| {
        let svc = svc.clone();
        async move {
            let mut calls = Vec::new();
            for _ in 0..n {
                let svc = svc.clone();
                calls.push(tokio::spawn(async move { send(&svc, tight, "10").await }));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut out = Vec::new();
            for c in calls {
                out.push(c.await.unwrap());
            }
            out
        }
    };
    let slow = statuses(300).await;
    let refused = slow
        .iter()
        .filter(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
        .filter(|r| r.headers()[SHED_REASON_HEADER] == "deadline")
        .count();
    assert!(
        refused > 100,
        "refused {refused} of 300 for their deadline at 210 ms against 50 ms"
    );
    // It recovers. Within a second the class is served again, and stays
    // served.
    extra.store(0, Ordering::SeqCst);
    let after = statuses(300).await;
    let late_refusals = after[100..]
        .iter()
        .filter(|r| r.status() != StatusCode::OK)
        .count();
    assert_eq!(
        late_refusals, 0,
        "every request after the first second is served"
    );
}

#[tokio::test(start_paused = true)]
async fn a_class_nobody_asks_for_forgets_its_refusal() {
    let m = model();
    let tight = m.id("tight").unwrap();
    let extra = Arc::new(AtomicU64::new(200));
    let l = Limiter::with_algorithm(
        &m,
        Fixed::new(16),
        // No probes in this sequence: only time heals.
        config(|c| c.probe_interval = Duration::from_secs(3600)),
    );
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::clone(&extra)));
    for _ in 0..60 {
        send(&svc, tight, "10").await;
    }
    let res = send(&svc, tight, "10").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    extra.store(0, Ordering::SeqCst);
    // Minutes without a sample: the old evidence has faded; the class is
    // admitted again.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(send(&svc, tight, "10").await.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn fast_failures_and_client_errors_teach_nothing() {
    let m = model();
    let browse = m.id("browse").unwrap();
    let recorder = Recorder::default();
    let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::default()));
    for _ in 0..50 {
        send(&svc, browse, "20").await;
    }
    let before = l.stats().classes[browse.index()].latency_quantile;
    // A burst of 1 ms failures and 404s, ten times the successes.
    for i in 0..500 {
        let status = if i % 2 == 0 { "500" } else { "404" };
        send(&svc, browse, &format!("1:{status}")).await;
    }
    let after = l.stats().classes[browse.index()].latency_quantile;
    assert!(
        (after / before - 1.0).abs() < 0.01,
        "median {before} s before, {after} s after"
    );
    let taught = recorder.0.lock().unwrap().clone();
    assert_eq!(taught.len(), 50);
    assert!(taught.iter().all(|o| *o == Outcome::Success));
}

#[tokio::test(start_paused = true)]
async fn cancelled_requests_reach_no_algorithm() {
    let m = model();
    let browse = m.id("browse").unwrap();
    let recorder = Recorder::default();
    let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::default()));
    for _ in 0..20 {
        // The client gives up after 5 ms of a 100 ms request.
        let call = svc.clone().oneshot(req(browse, "100"));
        assert!(
            tokio::time::timeout(Duration::from_millis(5), call)
                .await
                .is_err()
        );
    }
    assert_eq!(l.stats().in_flight, 0);
    assert!(recorder.0.lock().unwrap().is_empty());
    assert_eq!(l.stats().classes[browse.index()].latency_quantile, 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_body_nobody_polls_is_a_completion_not_a_cancellation() {
    let m = model();
    let browse = m.id("browse").unwrap();
    let recorder = Recorder::default();
    let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone())
        .hold_until_body_end(true)
        .layer(origin(Arc::default()));
    // A 204 (or 304): the server sends no body and never polls it.
    let res = svc.clone().oneshot(req(browse, "20:204")).await.unwrap();
    assert_eq!(l.stats().in_flight, 1, "held until the body is done with");
    drop(res);
    assert_eq!(l.stats().in_flight, 0);
    assert_eq!(*recorder.0.lock().unwrap(), vec![Outcome::Success]);
    // A body dropped unread (the client left before it was sent) is a
    // cancellation: it teaches nothing.
    let res = svc.oneshot(req(browse, "20:200")).await.unwrap();
    drop(res);
    assert_eq!(l.stats().in_flight, 0);
    assert_eq!(recorder.0.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn slow_failures_count_against_a_class_and_gateway_timeouts_are_loss_signals() {
    let m = model();
    let browse = m.id("browse").unwrap();
    let recorder = Recorder::default();
    let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::default()));
    for _ in 0..20 {
        send(&svc, browse, "20").await;
    }
    let before = l.stats().classes[browse.index()].latency_quantile;
    // Failures that take ten times as long as the class's successes: the
    // service could not serve them, and the class's latency says so.
    for _ in 0..40 {
        send(&svc, browse, "200:500").await;
    }
    let after = l.stats().classes[browse.index()].latency_quantile;
    assert!(after > 5.0 * before, "median {before} s, then {after} s");
    // A 504 is a timeout further in: a loss signal for the algorithm.
    send(&svc, browse, "20:504").await;
    let taught = recorder.0.lock().unwrap().clone();
    assert_eq!(taught.last(), Some(&Outcome::Timeout));
    assert!(
        !taught.contains(&Outcome::Error),
        "errors reach no algorithm"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_relaxes_a_deadline_ends_its_refusals_at_once() {
    let m = model();
    let tight = m.id("tight").unwrap();
    let l = Limiter::with_algorithm(&m, Fixed::new(16), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::default()));
    for _ in 0..50 {
        send(&svc, tight, "80").await;
    }
    let res = send(&svc, tight, "80").await;
    assert_eq!(res.headers()[SHED_REASON_HEADER], Reason::Deadline.as_str());
    let relaxed = CostModel::from_toml(&MODEL.replace("\"50ms\"", "\"5s\"")).unwrap();
    l.reload(&relaxed).unwrap();
    for _ in 0..20 {
        assert_eq!(send(&svc, tight, "80").await.status(), StatusCode::OK);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Whatever the heavy tail of the cheap class (lognormal σ up to 3,
    /// with rare exports), a tight class whose own requests take 10 ms is
    /// never refused while slots are free.
    #[test]
    fn no_heavy_tail_elsewhere_refuses_a_class_that_fits(
        sigma in 1.0f64..3.0,
        seed in 1u64..u64::MAX,
        exports in 0usize..4,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let shed = runtime.block_on(async move {
            let m = model();
            let (tight, browse) = (m.id("tight").unwrap(), m.id("browse").unwrap());
            let l = Limiter::with_algorithm(&m, Fixed::new(64), config(|_| {}));
            let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Arc::default()));
            let mut x = seed;
            let mut normal = move || {
                let mut unit = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
                };
                (-2.0 * unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * unit()).cos()
            };
            let mut background = Vec::new();
            for i in 0..400 {
                // A cheap request in the background, heavy-tailed (at most
                // about 16 at once: far from the limit of 64).
                let ms = (20.0 * (sigma * normal()).exp()).min(20_000.0) as u64;
                let ms = if i % 100 == 50 && exports > i / 100 { 30_000 } else { ms };
                let s = svc.clone();
                background.push(tokio::spawn(async move { send(&s, browse, &ms.to_string()).await.status() }));
                let res = send(&svc, tight, "10").await;
                assert_eq!(res.status(), StatusCode::OK);
                background.retain(|t| !t.is_finished());
                if background.len() > 16 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            l.stats().classes[tight.index()].shed_total()
        });
        prop_assert_eq!(shed, 0);
    }
}

/// A gRPC error comes back as HTTP 200 with `grpc-status` in the head
/// ("trailers-only"): read by its HTTP status alone, an UNAVAILABLE would
/// teach the limit that the service is fast and healthy. Only a gRPC
/// call's answer is read so; an HTTP answer carrying such a header is not.
#[tokio::test(start_paused = true)]
async fn a_grpc_status_in_the_head_is_what_the_limit_learns() {
    let m = model();
    let browse = m.id("browse").unwrap();
    let recorder = Recorder::default();
    let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
    let answer = |grpc_status: &'static str| {
        service_fn(move |_: Request<String>| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut res = Response::new(Full::new(Bytes::new()));
            res.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(grpc_status));
            Ok::<_, Infallible>(res)
        })
    };
    let grpc_call = || {
        let mut r = req(browse, "");
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        r
    };
    // (An error, INTERNAL here, teaches the limit nothing: not a success.)
    for (status, expected) in [
        ("14", Some(Outcome::Overload)),
        ("4", Some(Outcome::Timeout)),
        ("13", None),
        ("0", Some(Outcome::Success)),
    ] {
        let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(answer(status));
        let res = svc.clone().oneshot(grpc_call()).await.unwrap();
        res.into_body().collect().await.unwrap();
        let taught = recorder.0.lock().unwrap().pop();
        assert_eq!(taught, expected, "grpc-status {status}");
    }
    // Not a gRPC call: the HTTP status decides.
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(answer("14"));
    let res = svc.clone().oneshot(req(browse, "")).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(recorder.0.lock().unwrap().pop(), Some(Outcome::Success));
    assert_eq!(l.stats().in_flight, 0);
}

/// With the slot held until the body ends (as the `Stack` holds it), a
/// trailers-only answer's empty body is dropped unread by hyper and tonic
/// (it says it has ended): that is its end, not a cancellation, and its
/// gRPC status still teaches the limit.
#[tokio::test(start_paused = true)]
async fn an_ended_body_dropped_unread_still_teaches_its_status() {
    let m = model();
    let browse = m.id("browse").unwrap();
    let recorder = Recorder::default();
    let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone())
        .hold_until_body_end(true)
        .layer(service_fn(|_: Request<String>| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut res = Response::new(Full::new(Bytes::new()));
            res.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("14"));
            Ok::<_, Infallible>(res)
        }));
    let mut call = req(browse, "");
    call.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let res = svc.oneshot(call).await.unwrap();
    assert!(http_body::Body::is_end_stream(res.body()));
    drop(res);
    assert_eq!(recorder.0.lock().unwrap().pop(), Some(Outcome::Overload));
    assert_eq!(l.stats().in_flight, 0);
}

/// A gRPC call of `class`.
fn grpc_call(class: ClassId) -> Request<String> {
    let mut call = req(class, "");
    call.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    call
}

/// `l` in front of a service answering `head` (after 5 ms) with one gRPC
/// message and then trailers with `grpc-status: code`, held to the body's
/// end; the body never says it has ended (`WithTrailers` does not).
fn trailed(
    l: &Limiter,
    head: StatusCode,
    code: &'static str,
) -> impl Service<
    Request<String>,
    Response = Response<
        gratify_scaling::limit::body::LimitBody<
            http_body_util::combinators::BoxBody<Bytes, Infallible>,
        >,
    >,
    Error = Infallible,
> {
    AdaptiveLimitLayer::with_limiter(l.clone())
        .hold_until_body_end(true)
        .layer(service_fn(move |_: Request<String>| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static(code));
            let body = Full::new(Bytes::from_static(b"\0\0\0\0\x02hi"))
                .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) })
                .boxed();
            let mut res = Response::new(body);
            *res.status_mut() = head;
            Ok::<_, Infallible>(res)
        }))
}

/// A gRPC answer that streamed its message and then said, in its trailers,
/// that it failed (`UNAVAILABLE`) teaches the limit a failure for load, not
/// the head's HTTP 200 — held to the body's end, as the Stack holds it. The
/// same trailers on an answer to a call that is not gRPC teach nothing of
/// the kind (a plain HTTP answer's status is its head's), and `OK` in the
/// trailers is a success.
#[tokio::test(start_paused = true)]
async fn a_grpc_status_in_the_trailers_is_the_outcome() {
    let m = model();
    let browse = m.id("browse").unwrap();
    for (grpc, code, expected) in [
        (true, "14", Outcome::Overload),
        (true, "4", Outcome::Timeout),
        (true, "0", Outcome::Success),
        (false, "14", Outcome::Success),
    ] {
        let recorder = Recorder::default();
        let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
        let call = if grpc {
            grpc_call(browse)
        } else {
            req(browse, "")
        };
        let res = trailed(&l, StatusCode::OK, code)
            .oneshot(call)
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // Not yet: the answer's end decides.
        assert!(recorder.0.lock().unwrap().is_empty(), "{grpc} {code}");
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], code);
        assert_eq!(
            recorder.0.lock().unwrap().pop(),
            Some(expected),
            "grpc {grpc}, status {code}"
        );
        assert_eq!(l.stats().in_flight, 0);
    }
}

/// A gRPC answer dropped right after its trailers (as hyper drops one,
/// unpolled, once the trailers are sent) ends there with the trailers'
/// status — even from a body that never says it has ended — and a head
/// that already decided (a proxy's 503 on a gRPC call) is not overruled by
/// trailers that say `OK`.
#[tokio::test(start_paused = true)]
async fn trailers_end_the_answer_and_do_not_overrule_a_decided_head() {
    use http_body::Body as _;
    let m = model();
    let browse = m.id("browse").unwrap();
    for (head, code, expected) in [
        (StatusCode::OK, "14", Outcome::Overload),
        (StatusCode::SERVICE_UNAVAILABLE, "0", Outcome::Overload),
    ] {
        let recorder = Recorder::default();
        let l = Limiter::with_algorithm(&m, recorder.clone(), config(|_| {}));
        let res = trailed(&l, head, code)
            .oneshot(grpc_call(browse))
            .await
            .unwrap();
        let mut body = Box::pin(res.into_body());
        let mut trailers_seen = false;
        while !trailers_seen {
            let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
                .await
                .unwrap()
                .unwrap();
            trailers_seen = frame.is_trailers();
        }
        assert!(!body.is_end_stream(), "the body never says it has ended");
        // Dropped after the trailers, without the final poll.
        drop(body);
        assert_eq!(
            recorder.0.lock().unwrap().pop(),
            Some(expected),
            "{head} {code}"
        );
        assert_eq!(l.stats().in_flight, 0);
    }
}
