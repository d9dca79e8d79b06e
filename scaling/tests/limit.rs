//! The adaptive limit as a tower layer: slots on every path, clone
//! semantics, admission by cost, refusals. All timing runs on tokio's paused
//! clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gratify_core::classify::ClassifyLayer;
use gratify_core::{ClassId, CostModel};
use gratify_scaling::limit::error::Overloaded;
use gratify_scaling::limit::{
    AdaptiveLimitLayer, Admission, Aimd, Fixed, Limiter, LimiterConfig, Reason, SHED_REASON_HEADER,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
refusal_cost = 2.0
[classes.batch]
delay_cost = { shape = "linear", per_second = 0.1, deadline = "30s" }
refusal_cost = 1.0
"#;

fn model() -> CostModel {
    CostModel::from_toml(MODEL).unwrap()
}

fn class(m: &CostModel, name: &str) -> ClassId {
    m.id(name).unwrap()
}

fn limiter(m: &CostModel, limit: usize, config: LimiterConfig) -> Limiter {
    Limiter::with_algorithm(m, Fixed::new(limit), config)
}

fn config(f: impl FnOnce(&mut LimiterConfig)) -> LimiterConfig {
    let mut c = LimiterConfig::default();
    f(&mut c);
    c
}

/// A request of `class`, as a ClassifyLayer would have left it.
fn req(class: ClassId, body: &str) -> Request<String> {
    let mut r = Request::new(body.to_owned());
    r.extensions_mut().insert(class);
    r
}

type Log = Arc<Mutex<Vec<String>>>;

/// An origin that sleeps `ms` from the body ("name:ms") and logs the name
/// when it starts.
fn origin(
    log: Log,
) -> impl Service<Request<String>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |r: Request<String>| {
        let log = log.clone();
        async move {
            let (name, ms) = r.body().split_once(':').unwrap_or((r.body(), "0"));
            log.lock().unwrap().push(name.to_owned());
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name.to_owned()))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_response_releases_its_slot() {
    let m = model();
    let l = limiter(&m, 2, LimiterConfig::default());
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let res = svc.oneshot(req(class(&m, "browse"), "a:10")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let s = l.stats();
    assert_eq!((s.in_flight, s.queued), (0, 0));
    assert_eq!(s.classes[class(&m, "browse").index()].completed, 1);
}

#[tokio::test(start_paused = true)]
async fn an_error_releases_its_slot() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let svc =
        AdaptiveLimitLayer::with_limiter(l.clone()).layer(service_fn(|_: Request<String>| async {
            Err::<Response<Full<Bytes>>, _>("boom")
        }));
    assert!(
        svc.clone()
            .oneshot(req(class(&m, "browse"), ""))
            .await
            .is_err()
    );
    assert_eq!(l.stats().in_flight, 0);
    // The slot is free for the next request.
    assert!(svc.oneshot(req(class(&m, "browse"), "")).await.is_err());
    assert_eq!(l.stats().classes[class(&m, "browse").index()].completed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_future_releases_its_slot() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let svc =
        AdaptiveLimitLayer::with_limiter(l.clone()).layer(service_fn(|_: Request<String>| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            panic!("handler bug");
            #[allow(unreachable_code)]
            Ok::<Response<Full<Bytes>>, Infallible>(Response::new(Full::default()))
        }));
    let task = tokio::spawn(svc.oneshot(req(class(&m, "browse"), "")));
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(l.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_releases_the_slot_or_the_queue_place() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let browse = class(&m, "browse");
    let running = tokio::spawn(svc.clone().oneshot(req(browse, "a:1000")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let queued = tokio::spawn(svc.clone().oneshot(req(browse, "b:10")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((l.stats().in_flight, l.stats().queued), (1, 1));
    // The client of the queued request goes away: it leaves the queue.
    queued.abort();
    let _ = queued.await;
    assert_eq!((l.stats().in_flight, l.stats().queued), (1, 0));
    // The client of the running one goes away: the slot is released.
    running.abort();
    let _ = running.await;
    assert_eq!((l.stats().in_flight, l.stats().queued), (0, 0));
    let res = svc.oneshot(req(browse, "c:1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_ready_clone_that_is_never_called_holds_nothing() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let mut svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let mut clone = svc.clone();
    clone.ready().await.unwrap();
    drop(clone);
    svc.ready().await.unwrap();
    let res = svc.call(req(class(&m, "browse"), "a:1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(l.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_limit() {
    let m = model();
    let layer = AdaptiveLimitLayer::with_limiter(limiter(
        &m,
        1,
        config(|c| c.admission = Admission::RejectAtLimit),
    ));
    // Two "connections", as axum makes them.
    let a = layer.layer(origin(Log::default()));
    let b = a.clone();
    let browse = class(&m, "browse");
    let first = tokio::spawn(a.oneshot(req(browse, "a:100")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = b.oneshot(req(browse, "b:1")).await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.headers()[SHED_REASON_HEADER], "at-limit");
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(layer.limiter().stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_refuses_and_empties_the_queue() {
    let m = model();
    let l = limiter(
        &m,
        1,
        config(|c| c.max_queue_time = Duration::from_millis(50)),
    );
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let batch = class(&m, "batch");
    let running = tokio::spawn(svc.clone().oneshot(req(batch, "a:1000")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let res = svc.clone().oneshot(req(batch, "b:1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[SHED_REASON_HEADER], "queue-timeout");
    assert!(res.headers().contains_key(http::header::RETRY_AFTER));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("queue-timeout"));
    assert_eq!(l.stats().queued, 0);
    assert_eq!(
        l.stats().classes[batch.index()].shed_for(Reason::QueueTimeout),
        1
    );
    running.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_most_urgent_class_is_served_first() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    let mut tasks = Vec::new();
    for (name, body) in [
        ("browse", "first:50"),
        ("batch", "batch:5"),
        ("browse", "browse:5"),
        ("checkout", "checkout:5"),
    ] {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(req(class(&m, name), body)),
        ));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    // Queued behind "first": checkout (20/s over 10 ms) before browse before batch.
    assert_eq!(
        *log.lock().unwrap(),
        ["first", "checkout", "browse", "batch"].map(String::from)
    );
}

/// Runs `n` quick requests of `class` so the estimators are warm.
async fn warm_up<S>(svc: &S, class: ClassId, n: usize)
where
    S: Service<
            Request<String>,
            Response = Response<gratify_scaling::limit::body::LimitBody<Full<Bytes>>>,
            Error = Infallible,
        > + Clone,
{
    for _ in 0..n {
        let res = svc.clone().oneshot(req(class, "warm:20")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_meet_its_deadline_is_refused_at_once() {
    let m = model();
    let l = limiter(&m, 1, config(|c| c.warmup_samples = 10));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let checkout = class(&m, "checkout");
    warm_up(&svc, checkout, 10).await;
    // Twenty checkouts of ~20 ms each fill the queue well past 300 ms.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(svc.clone().oneshot(req(checkout, "c:20"))));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let before = tokio::time::Instant::now();
    let res = svc.clone().oneshot(req(checkout, "late:20")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[SHED_REASON_HEADER], "deadline");
    assert_eq!(before.elapsed(), Duration::ZERO, "refused without waiting");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(l.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn cold_start_sheds_nothing_by_cost() {
    let m = model();
    let l = limiter(&m, 1, config(|c| c.warmup_samples = 1000));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let checkout = class(&m, "checkout");
    let mut tasks = Vec::new();
    for _ in 0..30 {
        tasks.push(tokio::spawn(svc.clone().oneshot(req(checkout, "c:5"))));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(l.stats().classes[checkout.index()].shed_total(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_displaces_the_least_valuable_never_the_more() {
    let m = model();
    let l = limiter(&m, 1, config(|c| c.max_queue = 2));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let (batch, checkout) = (class(&m, "batch"), class(&m, "checkout"));
    let running = tokio::spawn(svc.clone().oneshot(req(batch, "run:50")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let b1 = tokio::spawn(svc.clone().oneshot(req(batch, "b1:1")));
    let b2 = tokio::spawn(svc.clone().oneshot(req(batch, "b2:1")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(l.stats().queued, 2);
    // A checkout arrives at a full queue: the newest batch request goes.
    let c = tokio::spawn(svc.clone().oneshot(req(checkout, "c:1")));
    let displaced = b2.await.unwrap().unwrap();
    assert_eq!(displaced.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(displaced.headers()[SHED_REASON_HEADER], "displaced");
    // A batch request arriving at the full queue is refused; it displaces no one.
    let b3 = svc.clone().oneshot(req(batch, "b3:1")).await.unwrap();
    assert_eq!(b3.headers()[SHED_REASON_HEADER], "queue-full");
    assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(b1.await.unwrap().unwrap().status(), StatusCode::OK);
    running.await.unwrap().unwrap();
    let s = l.stats();
    assert_eq!(s.classes[checkout.index()].shed_total(), 0);
    assert_eq!((s.in_flight, s.queued), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn holding_until_the_body_ends() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let svc = AdaptiveLimitLayer::with_limiter(l.clone())
        .hold_until_body_end(true)
        .layer(origin(Log::default()));
    let browse = class(&m, "browse");
    let res = svc.clone().oneshot(req(browse, "a:1")).await.unwrap();
    assert_eq!(l.stats().in_flight, 1, "the body has not been read");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"a");
    assert_eq!(l.stats().in_flight, 0);
    // A body dropped unread releases the slot too.
    let res = svc.oneshot(req(browse, "b:1")).await.unwrap();
    assert_eq!(l.stats().in_flight, 1);
    drop(res);
    assert_eq!(l.stats().in_flight, 0);
}

/// A body that yields what is sent on a channel, and ends when it closes.
struct Streamed(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_held_slot_lasts_until_the_last_frame_and_is_timed_as_a_completion() {
    let m = model();
    let l = limiter(&m, 4, LimiterConfig::default());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let svc = AdaptiveLimitLayer::with_limiter(l.clone())
        .hold_until_body_end(true)
        .layer(service_fn(move |_: Request<String>| {
            let rx = rx.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(Response::new(Streamed(rx))) }
        }));
    let browse = class(&m, "browse");
    let mut body = svc.oneshot(req(browse, "")).await.unwrap().into_body();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    assert_eq!(l.stats().in_flight, 1, "one frame read, the body goes on");
    tokio::time::sleep(Duration::from_millis(40)).await;
    drop(tx);
    assert!(body.frame().await.is_none());
    let s = l.stats();
    assert_eq!(s.in_flight, 0);
    // Timed as a completion of 40 ms (a cancellation teaches no latency).
    let latency = s.classes[browse.index()].latency;
    assert!((0.039..0.041).contains(&latency), "{latency}");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_says_it_has_ended_releases_without_another_poll() {
    // hyper stops polling a body once `is_end_stream` is true: the slot must
    // be released, as a completion, at that last frame.
    let m = model();
    let l = limiter(&m, 4, LimiterConfig::default());
    let svc = AdaptiveLimitLayer::with_limiter(l.clone())
        .hold_until_body_end(true)
        .layer(origin(Log::default()));
    let browse = class(&m, "browse");
    let mut body = svc.oneshot(req(browse, "a:25")).await.unwrap().into_body();
    assert_eq!(l.stats().in_flight, 1);
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(&frame.into_data().unwrap()[..], b"a");
    assert!(http_body::Body::is_end_stream(&body));
    let s = l.stats();
    assert_eq!(s.in_flight, 0, "released at the last frame");
    let latency = s.classes[browse.index()].latency;
    assert!((0.024..0.026).contains(&latency), "{latency}");
    drop(body);
    assert_eq!(l.stats().classes[browse.index()].latency, latency);
}

#[tokio::test(start_paused = true)]
async fn inner_503s_are_a_loss_signal() {
    let m = model();
    let aimd = Aimd::new().limits(1, 100).initial_limit(50);
    let l = Limiter::with_algorithm(&m, aimd, LimiterConfig::default());
    let svc =
        AdaptiveLimitLayer::with_limiter(l.clone()).layer(service_fn(|_: Request<String>| async {
            let mut r = Response::new(Full::<Bytes>::default());
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, Infallible>(r)
        }));
    svc.oneshot(req(class(&m, "browse"), "")).await.unwrap();
    assert_eq!(l.stats().limit, 45, "50 × 0.9 after one overload response");
}

#[tokio::test(start_paused = true)]
async fn error_mode_refuses_with_a_downcastable_error() {
    let m = model();
    let l = limiter(&m, 1, config(|c| c.admission = Admission::RejectAtLimit));
    let batch = class(&m, "batch");
    let svc = AdaptiveLimitLayer::with_limiter(l.clone())
        .classify_with(batch)
        .error_on_refusal()
        .layer(service_fn(|ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(ms)
        }));
    let running = tokio::spawn(svc.clone().oneshot(100));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let err = svc.clone().oneshot(1).await.unwrap_err();
    let overloaded = err.downcast_ref::<Overloaded>().unwrap();
    assert_eq!(overloaded.reason(), Reason::AtLimit);
    assert!(overloaded.retry_after() >= Duration::from_secs(1));
    assert_eq!(running.await.unwrap().unwrap(), 100);
    assert_eq!(svc.oneshot(2).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn classes_come_from_the_classify_layer() {
    let m = model();
    let l = limiter(&m, 4, LimiterConfig::default());
    let routes = gratify_core::classify::RouteClassifier::builder(&m)
        .route(Some(http::Method::POST), "/checkout", "checkout")
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(ClassifyLayer::new(routes))
        .layer(AdaptiveLimitLayer::with_limiter(l.clone()))
        .service(origin(Log::default()));
    let r = Request::post("/checkout").body("x:1".to_owned()).unwrap();
    svc.clone().oneshot(r).await.unwrap();
    let r = Request::get("/").body("y:1".to_owned()).unwrap();
    svc.oneshot(r).await.unwrap();
    let s = l.stats();
    assert_eq!(s.classes[class(&m, "checkout").index()].completed, 1);
    assert_eq!(s.classes[class(&m, "browse").index()].completed, 1);
}

#[tokio::test(start_paused = true)]
async fn the_load_signal_reports_queueing() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let signal = l.load_signal().clone();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let browse = class(&m, "browse");
    warm_up(&svc, browse, 3).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(tokio::spawn(svc.clone().oneshot(req(browse, "x:20"))));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let s = signal.snapshot();
    assert!(s.utilisation >= 4.0, "{s:?}");
    assert!(
        s.queue_delay > Duration::ZERO && s.shadow_price > 0.0,
        "{s:?}"
    );
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(signal.snapshot().shadow_price, 0.0);
}

#[tokio::test(start_paused = true)]
async fn works_under_axum_router_layer() {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::{get, post};

    let m = model();
    let routes = gratify_core::classify::RouteClassifier::builder(&m)
        .route(Some(http::Method::POST), "/checkout", "checkout")
        .build()
        .unwrap();
    let limit = AdaptiveLimitLayer::with_limiter(limiter(
        &m,
        1,
        config(|c| c.admission = Admission::RejectAtLimit),
    ));
    let limiter = limit.limiter().clone();
    // axum applies layers bottom to top: classify runs first.
    let app: Router = Router::new()
        .route(
            "/checkout",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                "ordered"
            }),
        )
        .route("/", get(|| async { "home" }))
        .layer(limit)
        .layer(ClassifyLayer::new(routes));

    let slow = tokio::spawn(
        app.clone()
            .oneshot(Request::post("/checkout").body(Body::empty()).unwrap()),
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Another connection's request finds the one slot taken: a 503, not an error.
    let refused = app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key(http::header::RETRY_AFTER));
    let ok = slow.await.unwrap().unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let body = ok.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ordered");
    let s = limiter.stats();
    assert_eq!(s.classes[class(&m, "checkout").index()].completed, 1);
    assert_eq!(s.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn at_high_rates_only_a_sample_of_completions_is_timed() {
    let m = model();
    let l = limiter(&m, 100, LimiterConfig::default());
    let mut svc =
        AdaptiveLimitLayer::with_limiter(l.clone()).layer(service_fn(|_: Request<String>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())))
        }));
    let browse = class(&m, "browse");
    assert_eq!(l.stats().timed_one_in, 1);
    // 1,000 requests every 10 ms of (paused) time: 100,000 a second.
    for _ in 0..50 {
        for _ in 0..1000 {
            svc.ready().await.unwrap();
            svc.call(req(browse, "")).await.unwrap();
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let s = l.stats();
    assert_eq!(s.in_flight, 0);
    assert_eq!(s.classes[browse.index()].admitted, 50_000);
    assert_eq!(s.classes[browse.index()].completed, 50_000);
    // Far more than 2,000 completions a second: most go untimed.
    assert!(s.timed_one_in >= 32, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn never_shed_classes_wait_up_to_their_cap() {
    let m = model();
    let checkout = class(&m, "checkout");
    let l = limiter(
        &m,
        1,
        config(|c| {
            c.warmup_samples = 5;
            c.never_shed = vec![(checkout, 3)];
        }),
    );
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    warm_up(&svc, checkout, 5).await;
    // A long request holds the only slot: 500 ms, past checkout's 300 ms deadline.
    let running = tokio::spawn(svc.clone().oneshot(req(checkout, "long:500")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Protected: not refused for the deadline, they wait — three of them.
    let waiting: Vec<_> = (0..3)
        .map(|i| tokio::spawn(svc.clone().oneshot(req(checkout, &format!("w{i}:1")))))
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(l.stats().queued, 3);
    // The cap: a fourth is refused because the queue is full, not for the deadline.
    let fourth = svc.clone().oneshot(req(checkout, "x:1")).await.unwrap();
    assert_eq!(fourth.headers()[SHED_REASON_HEADER], "queue-full");
    running.await.unwrap().unwrap();
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let s = &l.stats().classes[checkout.index()];
    assert_eq!(s.shed_for(Reason::Deadline), 0);
    assert_eq!(s.shed_for(Reason::QueueFull), 1);
}

mod with_tower_test {
    use super::*;
    use tokio_test::{assert_pending, assert_ready_ok};
    use tower_test::mock;

    #[tokio::test(start_paused = true)]
    async fn readiness_passes_through_and_slots_follow_responses() {
        let m = model();
        let l = limiter(&m, 1, config(|c| c.admission = Admission::RejectAtLimit));
        let (mut svc, mut handle) = mock::spawn_layer::<Request<String>, Response<Full<Bytes>>, _>(
            AdaptiveLimitLayer::with_limiter(l.clone()),
        );
        // The inner service is not ready: neither is the limit.
        handle.allow(0);
        assert_pending!(svc.poll_ready());
        handle.allow(2);
        assert!(svc.is_woken());
        assert_ready_ok!(svc.poll_ready());
        let first = svc.call(req(class(&m, "browse"), "a"));
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(request.body(), "a");
        assert_eq!(l.stats().in_flight, 1);
        // The one slot is taken: the next request is refused, without
        // reaching the inner service.
        assert_ready_ok!(svc.poll_ready());
        let refused = svc.call(req(class(&m, "browse"), "b")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        send.send_response(Response::new(Full::default()));
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        assert_eq!(l.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_from_the_mock_releases_the_slot() {
        let m = model();
        let l = limiter(&m, 1, LimiterConfig::default());
        let (mut svc, mut handle) = mock::spawn_layer::<Request<String>, Response<Full<Bytes>>, _>(
            AdaptiveLimitLayer::with_limiter(l.clone()),
        );
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(req(class(&m, "browse"), "a"));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error("boom");
        assert!(fut.await.is_err());
        assert_eq!(l.stats().in_flight, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_slot_hold_keeps_the_slot_until_the_detached_work_ends() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    // Work that outlives the request took a clone of its hold.
    let hold = gratify_core::slot::SlotHold::new();
    let mut r = req(class(&m, "batch"), "a:1");
    r.extensions_mut().insert(hold.clone());
    let response = svc.clone().oneshot(r).await.unwrap();
    let _ = response.into_body().collect().await.unwrap();
    assert_eq!(
        l.stats().in_flight,
        1,
        "the request is done, its work is not"
    );
    // A second request waits for that slot.
    let waiting = tokio::spawn(svc.clone().oneshot(req(class(&m, "batch"), "b:1")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(l.stats().queued, 1);
    drop(hold);
    assert_eq!(waiting.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(l.stats().in_flight, 0);
    // Without a hold, or with a hold nobody else keeps, nothing changes.
    let mut r = req(class(&m, "batch"), "c:1");
    r.extensions_mut()
        .insert(gratify_core::slot::SlotHold::new());
    let response = svc.oneshot(r).await.unwrap();
    let _ = response.into_body().collect().await.unwrap();
    assert_eq!(l.stats().in_flight, 0);
}

/// Work that is not a request: a WebSocket message, a queue consumer's job.
mod direct {
    use super::*;
    use gratify_scaling::limit::Outcome;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn admit_holds_a_slot_until_completed_or_dropped() {
        let m = model();
        let l = limiter(&m, 2, LimiterConfig::default());
        let browse = class(&m, "browse");
        let a = l.admit(browse).await.unwrap();
        let b = l.admit(browse).await.unwrap();
        assert_eq!(a.class(), browse);
        assert_eq!(l.stats().in_flight, 2);
        a.complete(Outcome::Success);
        drop(b);
        let s = l.stats();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.classes[browse.index()].admitted, 2);
        assert_eq!(s.classes[browse.index()].completed, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_admission_is_granted_when_a_slot_frees_and_leaves_the_queue_when_dropped() {
        let m = model();
        let l = limiter(&m, 1, LimiterConfig::default());
        let batch = class(&m, "batch");
        let held = l.admit(batch).await.unwrap();
        // Two wait; the first gives up (its future is dropped).
        let gives_up = tokio::spawn({
            let l = l.clone();
            async move { l.admit(batch).await.map(drop) }
        });
        let waits = tokio::spawn({
            let l = l.clone();
            async move { l.admit(batch).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(l.stats().queued, 2);
        gives_up.abort();
        let _ = gives_up.await;
        assert_eq!(l.stats().queued, 1, "the one that gave up left the queue");
        held.complete(Outcome::Success);
        let permit = waits.await.unwrap().unwrap();
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (1, 0));
        drop(permit);
        assert_eq!(l.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn admit_by_refuses_at_its_own_deadline_and_at_once_when_it_has_passed() {
        let m = model();
        let l = limiter(&m, 1, LimiterConfig::default());
        let batch = class(&m, "batch");
        let held = l.admit(batch).await.unwrap();
        // The class would wait up to 5 s; this message is worth 20 ms.
        let start = Instant::now();
        let late = l
            .admit_by(batch, start + Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(late.reason(), Reason::QueueTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(l.stats().queued, 0);
        // Already too late: refused without asking for a slot.
        let past = l.admit_by(batch, Instant::now()).await.unwrap_err();
        assert_eq!(past.reason(), Reason::Deadline);
        // The limiter decided the first, not the second.
        let s = l.stats();
        assert_eq!(s.classes[batch.index()].shed_for(Reason::QueueTimeout), 1);
        assert_eq!(s.classes[batch.index()].shed_for(Reason::Deadline), 0);
        held.complete(Outcome::Success);
        assert_eq!(l.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn work_still_queued_when_its_deadline_and_a_free_slot_come_together_is_refused() {
        let m = model();
        let l = limiter(&m, 1, LimiterConfig::default());
        let batch = class(&m, "batch");
        let held = l.admit(batch).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(20);
        // The slot frees at the very moment the waiter's deadline passes
        // (here the waiter's timer runs first; a grant that wins the race
        // on a busy runtime is given back the same way): the work is
        // refused and the slot is free.
        let freed = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            held.complete(Outcome::Success);
        });
        let late = l.admit_by(batch, deadline).await.unwrap_err();
        freed.await.unwrap();
        assert_eq!(late.reason(), Reason::QueueTimeout);
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    /// Trunk reservation: a cheap class whose requests hold a slot for
    /// seconds must not take every slot, or a valuable class with short
    /// requests arrives to find none and waits out its deadline behind work
    /// worth a tenth of it. The valuable class's expected demand stays free;
    /// the cheap class keeps the rest.
    #[tokio::test(start_paused = true)]
    async fn long_cheap_work_leaves_the_slots_a_valuable_class_needs() {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let m = model();
        let l = limiter(&m, 4, LimiterConfig::default());
        let (checkout, batch) = (class(&m, "checkout"), class(&m, "batch"));
        let late_or_refused = Arc::new(AtomicU64::new(0));
        let checkouts = Arc::new(AtomicU64::new(0));
        let batch_done = Arc::new(AtomicU64::new(0));
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let start = Instant::now();
        let judged_from = start + Duration::from_secs(10);
        let mut tasks = Vec::new();
        for i in 0..2_000u32 {
            tick.tick().await;
            // A checkout every 20 ms, 15 ms of work, 300 ms deadline.
            if i % 2 == 0 {
                let (l, bad, n) = (l.clone(), late_or_refused.clone(), checkouts.clone());
                tasks.push(tokio::spawn(async move {
                    let arrived = Instant::now();
                    let result = l.admit(checkout).await;
                    let judged = arrived >= judged_from;
                    if judged {
                        n.fetch_add(1, Relaxed);
                    }
                    match result {
                        Ok(permit) => {
                            if judged && arrived.elapsed() > Duration::from_millis(100) {
                                bad.fetch_add(1, Relaxed);
                            }
                            tokio::time::sleep(Duration::from_millis(15)).await;
                            permit.complete(Outcome::Success);
                        }
                        Err(_) if judged => {
                            bad.fetch_add(1, Relaxed);
                        }
                        Err(_) => {}
                    }
                }));
            }
            // Batch every 10 ms, 3 s of work each: alone it would fill
            // every slot for good.
            let (l, done) = (l.clone(), batch_done.clone());
            tasks.push(tokio::spawn(async move {
                if let Ok(permit) = l.admit(batch).await {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    permit.complete(Outcome::Success);
                    if Instant::now() >= judged_from {
                        done.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (bad, n) = (late_or_refused.load(Relaxed), checkouts.load(Relaxed));
        assert!(n >= 400, "{n} checkouts judged");
        assert!(
            bad * 100 <= n,
            "{bad} of {n} checkouts refused or kept waiting over 100 ms"
        );
        // The cheap class still runs on the slots not kept: three slots,
        // 3 s each, over the last 10 s or more.
        let done = batch_done.load(Relaxed);
        assert!(done >= 8, "only {done} batch jobs finished");
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    /// Under a sustained overload that lands on the cheapest class, its
    /// queue stays short: what waits beyond a few would be refused in the
    /// end anyway, after adding its wait to everything served of it. The
    /// excess is refused at once as `queue-full`; a denser class is not
    /// held to that.
    #[tokio::test(start_paused = true)]
    async fn sustained_overload_keeps_the_cheapest_class_queue_short() {
        let m = model();
        let l = limiter(&m, 2, config(|c| c.warmup_samples = 0));
        let (checkout, batch) = (class(&m, "checkout"), class(&m, "batch"));
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut tasks = Vec::new();
        let mut longest = 0;
        for i in 0..3_000u32 {
            tick.tick().await;
            // Batch at 1,000 a second, 10 ms each: five times what two
            // slots serve.
            let l2 = l.clone();
            tasks.push(tokio::spawn(async move {
                if let Ok(p) = l2.admit(batch).await {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    p.complete(Outcome::Success);
                }
            }));
            if i % 50 == 0 {
                let l2 = l.clone();
                tasks.push(tokio::spawn(async move {
                    if let Ok(p) = l2.admit(checkout).await {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        p.complete(Outcome::Success);
                    }
                }));
            }
            // Judged over the last half second: the demand is learned
            // over the first (a second's time constant), and what queued
            // before that drains at the rate the slots serve it.
            if i >= 2_500 {
                longest = longest.max(l.stats().queued);
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = l.stats();
        assert!(longest <= 20, "the queue reached {longest}");
        assert!(s.classes[batch.index()].shed_for(Reason::QueueFull) > 1_000);
        assert_eq!(s.classes[checkout.index()].shed_for(Reason::QueueFull), 0);
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }
}

/// `LimiterConfig` from a configuration file: every key optional, durations
/// as text, classes by index, bad values refused with the key's reason.
#[test]
fn a_limiter_config_reads_from_a_file_and_refuses_nonsense() {
    use gratify_scaling::limit::{Admission, LimiterConfig};
    let config: LimiterConfig = serde_json::from_str(
        r#"{
            "admission": { "partitioned": [0.7, 0.3] },
            "max_queue_per_class": 16,
            "estimate_half_life": "1.5s",
            "probe_interval": 0.25,
            "never_shed": [[1, 8]],
            "deadline_quantile": 0.9
        }"#,
    )
    .unwrap();
    assert_eq!(config.admission, Admission::Partitioned(vec![0.7, 0.3]));
    assert_eq!(config.max_queue_per_class, Some(16));
    assert_eq!(config.estimate_half_life, Duration::from_millis(1500));
    assert_eq!(config.probe_interval, Duration::from_millis(250));
    assert_eq!(config.never_shed, vec![(ClassId::from_index(1), 8)]);
    assert_eq!(config.deadline_quantile, 0.9);
    // What was not given is the default.
    let defaults = LimiterConfig::default();
    assert_eq!(config.max_queue, defaults.max_queue);
    assert_eq!(config.max_queue_time, defaults.max_queue_time);

    for (text, says) in [
        (r#"{ "deadline_quantile": 1.0 }"#, "between 0 and 1"),
        (
            r#"{ "admission": { "partitioned": [0.5, -0.1] } }"#,
            "between 0 and 1",
        ),
        (
            r#"{ "admission": { "partitioned": [1e300] } }"#,
            "between 0 and 1",
        ),
        (
            r#"{ "admission": { "partitioned": [0.7, 0.7] } }"#,
            "more than the whole",
        ),
        (r#"{ "admission": "lifo" }"#, "unknown variant"),
        (r#"{ "max_queue_time": "soon" }"#, "invalid duration"),
        (r#"{ "max_queue_lenght": 3 }"#, "unknown field"),
    ] {
        let error = serde_json::from_str::<LimiterConfig>(text).unwrap_err();
        assert!(error.to_string().contains(says), "{text}: {error}");
    }
}

/// A wait with no practical bound (any duration a file can spell) is a day:
/// a request that queues under it is admitted when a slot frees, on either
/// admission, and nothing overflows.
#[tokio::test(start_paused = true)]
async fn a_wait_too_long_to_represent_queues_without_overflow() {
    use gratify_scaling::limit::{Admission, LimiterConfig};
    let model = CostModel::from_toml(
        r#"
        [classes.page]
        delay_cost = { shape = "linear", per_second = 1.0 }
        refusal_cost = 1000.0
        "#,
    )
    .unwrap();
    for admission in [Admission::Fifo, Admission::DelayCost] {
        let mut config: LimiterConfig = serde_json::from_str(&format!(
            r#"{{ "max_queue_time": {}, "probe_interval": {} }}"#,
            u64::MAX,
            u64::MAX
        ))
        .unwrap();
        config.admission = admission.clone();
        let limiter = Limiter::with_algorithm(&model, Fixed::new(1), config);
        let page = model.id("page").unwrap();
        let first = limiter.admit(page).await.unwrap();
        let waiter = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.admit(page).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(limiter.stats().queued, 1, "{admission:?}: still waiting");
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()), "{admission:?}");
    }
}

/// A request of `class` that a trusted caller propagated, due `left` from
/// now (on the paused clock).
fn propagated(class: ClassId, body: &str, left: Option<Duration>) -> Request<String> {
    let mut r = req(class, body);
    let now = tokio::time::Instant::now().into_std();
    r.extensions_mut()
        .insert(gratify_core::classify::Propagated::new(
            Some(class),
            left.map(|l| now + l),
        ));
    r
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_propagated_deadline_has_passed_never_reaches_the_service() {
    let m = model();
    let l = limiter(&m, 4, LimiterConfig::default());
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    let batch = class(&m, "batch");
    let res = svc
        .clone()
        .oneshot(propagated(batch, "late:1", Some(Duration::ZERO)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[SHED_REASON_HEADER], "deadline");
    assert!(log.lock().unwrap().is_empty(), "the service never ran");
    assert_eq!(l.stats().in_flight, 0);
    // The same call with time to spare is served.
    let res = svc
        .oneshot(propagated(batch, "fine:1", Some(Duration::from_secs(1))))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_cannot_finish_in_the_time_its_caller_has_left_is_refused_at_once() {
    let m = model();
    let l = limiter(&m, 4, config(|c| c.warmup_samples = 10));
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    // Batch (its own deadline 30 s) takes ~20 ms here.
    let batch = class(&m, "batch");
    warm_up(&svc, batch, 20).await;
    log.lock().unwrap().clear();
    let before = tokio::time::Instant::now();
    let res = svc
        .clone()
        .oneshot(propagated(
            batch,
            "hopeless:20",
            Some(Duration::from_millis(5)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[SHED_REASON_HEADER], "deadline");
    assert_eq!(before.elapsed(), Duration::ZERO, "refused without waiting");
    assert!(log.lock().unwrap().is_empty(), "the service never ran");
    // With 200 ms left it fits: served.
    let res = svc
        .oneshot(propagated(
            batch,
            "fits:20",
            Some(Duration::from_millis(200)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(*log.lock().unwrap(), ["fits"].map(String::from));
}

#[tokio::test(start_paused = true)]
async fn calls_admitted_upstream_queue_ahead_of_first_hand_requests_of_their_class() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    let browse = class(&m, "browse");
    let mut tasks = Vec::new();
    for r in [
        req(browse, "first:50"),
        req(browse, "a:5"),
        req(browse, "b:5"),
        propagated(browse, "up1:5", None),
        req(browse, "c:5"),
        propagated(browse, "up2:5", Some(Duration::from_secs(1))),
    ] {
        tasks.push(tokio::spawn(svc.clone().oneshot(r)));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    // Upstream calls in their order of arrival, then first-hand ones in theirs.
    assert_eq!(
        *log.lock().unwrap(),
        ["first", "up1", "up2", "a", "b", "c"].map(String::from)
    );
    assert_eq!(l.stats().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_waits_no_longer_than_its_caller_has_left() {
    let m = model();
    let l = limiter(&m, 1, LimiterConfig::default());
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    let batch = class(&m, "batch");
    let running = tokio::spawn(svc.clone().oneshot(req(batch, "long:1000")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let before = tokio::time::Instant::now();
    // Batch may wait seconds on its own; the caller has 100 ms.
    let res = svc
        .clone()
        .oneshot(propagated(
            batch,
            "late:1",
            Some(Duration::from_millis(100)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The caller's time ran out, not the service's patience: refused for
    // its deadline (no invitation to retry).
    assert_eq!(res.headers()[SHED_REASON_HEADER], "deadline");
    assert_eq!(
        l.stats().classes[batch.index()].shed_for(Reason::Deadline),
        1
    );
    assert_eq!(before.elapsed(), Duration::from_millis(100));
    assert_eq!(l.stats().queued, 0);
    running.await.unwrap().unwrap();
    assert_eq!(*log.lock().unwrap(), ["long"].map(String::from));
}

#[tokio::test(start_paused = true)]
async fn waiters_leave_a_queue_that_mixes_upstream_and_first_hand_requests() {
    let m = model();
    let l = limiter(
        &m,
        1,
        config(|c| c.max_queue_time = Duration::from_millis(50)),
    );
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    let batch = class(&m, "batch");
    let running = tokio::spawn(svc.clone().oneshot(req(batch, "long:200")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    // First hand, then a cancelled first-hand one, then upstream ones
    // (queued ahead of both, and with later ids).
    let first = tokio::spawn(svc.clone().oneshot(req(batch, "a:1")));
    let cancelled = tokio::spawn(svc.clone().oneshot(req(batch, "gone:1")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let up = tokio::spawn(svc.clone().oneshot(propagated(batch, "up:1", None)));
    let up2 = tokio::spawn(svc.clone().oneshot(propagated(batch, "up2:1", None)));
    let up_late = tokio::spawn(svc.clone().oneshot(propagated(
        batch,
        "up-late:1",
        Some(Duration::from_millis(20)),
    )));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(l.stats().queued, 5);
    cancelled.abort();
    let _ = cancelled.await;
    assert_eq!(l.stats().queued, 4, "the cancelled waiter left the queue");
    // The upstream call with 20 ms left leaves the queue at its deadline.
    let res = up_late.await.unwrap().unwrap();
    assert_eq!(res.headers()[SHED_REASON_HEADER], "deadline");
    assert_eq!(l.stats().queued, 3);
    // The first-hand one (behind the upstream one, with a smaller id)
    // times out at 50 ms; the other upstream calls wait on.
    let res = first.await.unwrap().unwrap();
    assert_eq!(res.headers()[SHED_REASON_HEADER], "queue-timeout");
    assert_eq!(l.stats().queued, 2);
    assert_eq!(
        l.stats().classes[batch.index()].shed_for(Reason::QueueTimeout),
        1
    );
    // Upstream calls wait as long as their class may: 50 ms here too.
    for up in [up, up2] {
        let res = up.await.unwrap().unwrap();
        assert_eq!(res.headers()[SHED_REASON_HEADER], "queue-timeout");
    }
    running.await.unwrap().unwrap();
    assert_eq!(l.stats().queued, 0);
    assert_eq!(l.stats().in_flight, 0);
    assert_eq!(*log.lock().unwrap(), ["long"].map(String::from));
}

/// A gRPC call of `class`, as a ClassifyLayer would have left it.
fn grpc(class: ClassId, body: &str) -> Request<String> {
    let mut r = req(class, body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/grpc+proto".parse().unwrap(),
    );
    r
}

#[tokio::test(start_paused = true)]
async fn a_grpc_call_is_refused_with_a_grpc_status_never_an_http_error_page() {
    let m = model();
    let l = limiter(
        &m,
        1,
        config(|c| c.max_queue_time = Duration::from_millis(50)),
    );
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(Log::default()));
    let batch = class(&m, "batch");
    let running = tokio::spawn(svc.clone().oneshot(req(batch, "a:1000")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Queued, then timed out: RESOURCE_EXHAUSTED with the pushback.
    let res = svc.clone().oneshot(grpc(batch, "b:1")).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "trailers-only, as gRPC has it"
    );
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], "8");
    let pushback: u64 = res.headers()["grpc-retry-pushback-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback >= 1000, "{pushback}");
    assert_eq!(res.headers()[SHED_REASON_HEADER], "queue-timeout");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "no HTTP error page inside a gRPC exchange");
    // Refused at once for a caller's deadline already gone: DEADLINE_EXCEEDED.
    let mut late = grpc(batch, "late:1");
    late.extensions_mut()
        .insert(gratify_core::classify::Propagated::new(
            Some(batch),
            Some(tokio::time::Instant::now().into_std()),
        ));
    let res = svc.clone().oneshot(late).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "4");
    assert!(!res.headers().contains_key("grpc-retry-pushback-ms"));
    // Queued until the caller's time ran out: DEADLINE_EXCEEDED too, not
    // RESOURCE_EXHAUSTED (whose pushback would invite a retry of a call
    // nobody waits for).
    let mut waits = grpc(batch, "waits:1");
    waits
        .extensions_mut()
        .insert(gratify_core::classify::Propagated::new(
            Some(batch),
            Some((tokio::time::Instant::now() + Duration::from_millis(20)).into_std()),
        ));
    let before = tokio::time::Instant::now();
    let res = svc.clone().oneshot(waits).await.unwrap();
    assert_eq!(before.elapsed(), Duration::from_millis(20));
    assert_eq!(res.headers()["grpc-status"], "4");
    assert!(!res.headers().contains_key("grpc-retry-pushback-ms"));
    // The same refusal of a plain HTTP request is still a 503.
    let res = svc.clone().oneshot(req(batch, "c:1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!res.headers().contains_key("grpc-status"));
    running.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_call_admitted_upstream_is_judged_by_its_place_ahead_of_the_first_hand_queue() {
    let m = model();
    let l = limiter(&m, 1, config(|c| c.warmup_samples = 10));
    let log = Log::default();
    let svc = AdaptiveLimitLayer::with_limiter(l.clone()).layer(origin(log.clone()));
    let checkout = class(&m, "checkout");
    warm_up(&svc, checkout, 10).await;
    // Twenty first-hand checkouts of ~20 ms: a new one would wait past its
    // 300 ms deadline, and is refused at once.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(svc.clone().oneshot(req(checkout, "c:20"))));
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let res = svc.clone().oneshot(req(checkout, "late:20")).await.unwrap();
    assert_eq!(res.headers()[SHED_REASON_HEADER], "deadline");
    // A checkout another service already admitted goes ahead of them: it
    // is judged by that place, queued, and served next.
    let res = svc
        .clone()
        .oneshot(propagated(
            checkout,
            "upstream:20",
            Some(Duration::from_millis(300)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let log = log.lock().unwrap();
    let at = log.iter().position(|n| n == "upstream").unwrap();
    assert!(at <= 11 + 1, "served after {at} others: {log:?}");
}
