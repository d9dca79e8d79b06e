//! Retries within a budget, a client-side throttle and the deadline; never
//! a second send of a call that may have been processed. Time runs on
//! tokio's paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use gratify::BoxError;
use gratify::balance::CallContext;
use gratify::balance::retry::{RetryConfig, RetryLayer, Throttled};
use http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt, service_fn};

/// A server that answers `status` (with `headers`) while `down`, 200
/// otherwise, and counts its calls.
#[derive(Clone)]
struct Server {
    calls: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
    status: StatusCode,
    headers: &'static [(&'static str, &'static str)],
}

impl Server {
    fn new(status: StatusCode, headers: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            calls: Arc::default(),
            down: Arc::new(AtomicBool::new(true)),
            status,
            headers,
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let me = self.clone();
        service_fn(move |_: Request<()>| {
            me.calls.fetch_add(1, Ordering::SeqCst);
            let mut r = Response::new(());
            if me.down.load(Ordering::SeqCst) {
                *r.status_mut() = me.status;
                for (k, v) in me.headers {
                    r.headers_mut().insert(*k, v.parse().unwrap());
                }
            }
            async move { Ok::<_, Infallible>(r) }
        })
    }
}

const SHED: &[(&str, &str)] = &[(gratify::refusal::SHED_REASON_HEADER, "cost")];
const DEADLINE: &[(&str, &str)] = &[(gratify::refusal::SHED_REASON_HEADER, "deadline")];

fn request(method: Method) -> Request<()> {
    Request::builder()
        .method(method)
        .uri("/stock/7")
        .body(())
        .unwrap()
}

fn no_throttle() -> RetryConfig {
    let mut c = RetryConfig::default();
    c.throttle_k = 0.0;
    c
}

#[tokio::test(start_paused = true)]
async fn a_call_that_may_have_been_processed_is_never_sent_twice() {
    for (status, headers, method, expected) in [
        // A 502 to a POST: the server may have acted on it.
        (StatusCode::BAD_GATEWAY, &[][..], Method::POST, 1),
        // The same to a GET: safe to repeat.
        (StatusCode::BAD_GATEWAY, &[][..], Method::GET, 2),
        // A limiter's refusal says it was never processed: even a POST.
        (StatusCode::SERVICE_UNAVAILABLE, SHED, Method::POST, 2),
        (StatusCode::TOO_MANY_REQUESTS, &[][..], Method::POST, 2),
        // A 500 is the server's answer, not a refusal.
        (StatusCode::INTERNAL_SERVER_ERROR, &[][..], Method::GET, 1),
        // gRPC RESOURCE_EXHAUSTED may be a quota hit after partial work,
        // UNAVAILABLE maybe processed: idempotent calls only.
        (StatusCode::OK, &[("grpc-status", "8")][..], Method::POST, 1),
        (StatusCode::OK, &[("grpc-status", "8")][..], Method::GET, 2),
        // A shed header passed on with a success is no refusal.
        (StatusCode::OK, SHED, Method::POST, 1),
        // Refused because the caller's time is up: a retry would be too.
        (StatusCode::SERVICE_UNAVAILABLE, DEADLINE, Method::GET, 1),
        (StatusCode::OK, &[("grpc-status", "4")][..], Method::GET, 1),
        (
            StatusCode::OK,
            &[("grpc-status", "14")][..],
            Method::POST,
            1,
        ),
    ] {
        let server = Server::new(status, headers);
        let client = RetryLayer::new(no_throttle())
            .unwrap()
            .layer(server.service());
        client.oneshot(request(method.clone())).await.unwrap();
        assert_eq!(server.calls(), expected, "{status} {headers:?} {method}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_transport_error_is_retried_only_for_idempotent_methods() {
    for (method, expected) in [(Method::GET, 2), (Method::PUT, 2), (Method::POST, 1)] {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let failing = service_fn(move |_: Request<()>| {
            let first = c.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err::<Response<()>, BoxError>("connection reset".into())
                } else {
                    Ok(Response::new(()))
                }
            }
        });
        let client = RetryLayer::new(no_throttle()).unwrap().layer(failing);
        let out = client.oneshot(request(method.clone())).await;
        assert_eq!(calls.load(Ordering::SeqCst), expected, "{method}");
        assert_eq!(out.is_ok(), expected == 2, "{method}");
    }
}

/// Sends `n` calls at `per_second` through `client`; the calls that failed.
async fn offer<S>(client: &S, n: u32, per_second: u32) -> u32
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
{
    let mut failed = 0;
    for _ in 0..n {
        match client.clone().oneshot(request(Method::GET)).await {
            Ok(r) if r.status().is_success() => {}
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_secs(1) / per_second).await;
    }
    failed
}

#[tokio::test(start_paused = true)]
async fn under_an_overload_retries_stay_within_the_budget() {
    // Every call refused for 20 s at 100 calls a second.
    let mut config = no_throttle();
    config.max_attempts = 3;
    config.min_retries_per_second = 0;
    let server = Server::new(StatusCode::SERVICE_UNAVAILABLE, SHED);
    let client = RetryLayer::new(config.clone())
        .unwrap()
        .layer(server.service());
    offer(&client, 2_000, 100).await;
    let with_budget = f64::from(server.calls()) / 2_000.0;
    // Without a budget (a ratio of 10: a retry for every call), the same
    // overload gets three sends of every call.
    config.retry_ratio = 10.0;
    let server = Server::new(StatusCode::SERVICE_UNAVAILABLE, SHED);
    let client = RetryLayer::new(config).unwrap().layer(server.service());
    offer(&client, 2_000, 100).await;
    let without = f64::from(server.calls()) / 2_000.0;
    assert!(with_budget <= 1.11, "retries added {with_budget}x");
    assert!(without >= 2.9, "without a budget: {without}x");
}

#[tokio::test(start_paused = true)]
async fn the_throttle_stops_sending_what_the_servers_refuse_and_eases_when_they_recover() {
    let mut config = RetryConfig::default();
    config.max_attempts = 1;
    config.throttle_window = Duration::from_secs(10);
    let server = Server::new(StatusCode::SERVICE_UNAVAILABLE, SHED);
    let client = RetryLayer::with_seed(config, 9)
        .unwrap()
        .layer(server.service());
    // 10 s of refusals at 100 calls a second: once the window has seen
    // them, nine in ten calls (the cap) stay on the client.
    offer(&client, 1_000, 100).await;
    let before = server.calls();
    assert!(
        before < 250,
        "{before} of 1000 calls sent to a server refusing them all"
    );
    offer(&client, 1_000, 100).await;
    let sent = server.calls() - before;
    assert!(
        sent <= 150,
        "{sent} of 1000 calls sent in the second window"
    );
    // A throttled call fails at once, locally.
    let mut throttled = 0;
    for _ in 0..40 {
        if let Err(e) = client.clone().oneshot(request(Method::GET)).await {
            assert!(e.is::<Throttled>(), "{e}");
            throttled += 1;
        }
    }
    assert!(throttled >= 25, "{throttled} of 40 throttled");
    // The server recovers: within two windows the client sends everything
    // again.
    server.down.store(false, Ordering::SeqCst);
    offer(&client, 2_000, 100).await;
    let failed_late = offer(&client, 500, 100).await;
    assert_eq!(
        failed_late, 0,
        "still throttled after the servers recovered"
    );
}

#[tokio::test(start_paused = true)]
async fn no_retry_once_the_caller_has_no_time_for_it() {
    // Retry-After: 1 (second) with 100 ms left: no retry.
    let server = Server::new(
        StatusCode::SERVICE_UNAVAILABLE,
        &[
            (gratify::refusal::SHED_REASON_HEADER, "cost"),
            ("retry-after", "1"),
        ],
    );
    let client = RetryLayer::new(no_throttle())
        .unwrap()
        .layer(server.service());
    let due = tokio::time::Instant::now().into_std() + Duration::from_millis(100);
    let context = CallContext::new().with_deadline(due);
    context
        .clone()
        .scope(client.oneshot(request(Method::GET)))
        .await
        .unwrap();
    assert_eq!(server.calls(), 1);

    // A gRPC pushback of 50 ms with 100 ms left: waited out, then retried.
    let server = Server::new(
        StatusCode::OK,
        &[("grpc-status", "8"), ("grpc-retry-pushback-ms", "50")],
    );
    let client = RetryLayer::new(no_throttle())
        .unwrap()
        .layer(server.service());
    let start = tokio::time::Instant::now();
    let context = CallContext::new().with_deadline(start.into_std() + Duration::from_millis(100));
    context
        .scope(client.oneshot(request(Method::GET)))
        .await
        .unwrap();
    assert_eq!(server.calls(), 2);
    assert_eq!(start.elapsed(), Duration::from_millis(50));

    // A Retry-After given as a date: a wait this client does not work out,
    // read as "not soon".
    let server = Server::new(
        StatusCode::SERVICE_UNAVAILABLE,
        &[
            (gratify::refusal::SHED_REASON_HEADER, "cost"),
            ("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT"),
        ],
    );
    let client = RetryLayer::new(no_throttle())
        .unwrap()
        .layer(server.service());
    client.oneshot(request(Method::GET)).await.unwrap();
    assert_eq!(server.calls(), 1);

    // A deadline already gone: the call is made (the caller decides that),
    // but never retried.
    let server = Server::new(StatusCode::SERVICE_UNAVAILABLE, SHED);
    let client = RetryLayer::new(no_throttle())
        .unwrap()
        .layer(server.service());
    let context = CallContext::new().with_deadline(tokio::time::Instant::now().into_std());
    context
        .scope(client.oneshot(request(Method::GET)))
        .await
        .unwrap();
    assert_eq!(server.calls(), 1);
}

#[test]
fn settings_out_of_range_are_refused() {
    let cases: [fn(&mut RetryConfig); 10] = [
        |c| c.throttle_k = 0.5,
        |c| c.throttle_k = 1.0,
        |c| c.throttle_k = f64::INFINITY,
        |c| c.max_pushback = Duration::MAX,
        |c| c.max_throttle = 1.5,
        |c| c.budget_window = Duration::from_millis(500),
        |c| c.budget_window = Duration::from_secs(61),
        |c| c.retry_ratio = -0.1,
        |c| c.max_attempts = 0,
        |c| c.throttle_k = f64::NAN,
    ];
    for set in cases {
        let mut c = RetryConfig::default();
        set(&mut c);
        assert!(RetryLayer::new(c).is_err());
    }
    assert!(RetryLayer::new(RetryConfig::default()).is_ok());
}
