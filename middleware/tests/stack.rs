//! The `Stack`: order, sharing across clones and layered services, axum.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use gratify::cache::HttpCacheConfig;
use gratify::core::classify::RouteClassifier;
use gratify::{CostModel, Stack};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0 }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0 }
refusal_cost = 1.0
"#;

/// An origin of cacheable JSON that counts its calls.
fn origin(
    calls: &Arc<AtomicU64>,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let calls = Arc::clone(calls);
    service_fn(move |_: Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async {
            let mut r = Response::new(Full::new(Bytes::from("{\"id\":7}".repeat(300))));
            r.headers_mut()
                .insert("cache-control", "public, max-age=60".parse().unwrap());
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok(r)
        }
    })
}

fn get(path: &str) -> Request<()> {
    Request::get(path)
        .header("host", "shop.example")
        .header("accept-encoding", "gzip")
        .body(())
        .unwrap()
}

#[tokio::test]
async fn every_piece_off_passes_requests_through() {
    let model = CostModel::from_toml(MODEL).unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let svc = Stack::new(&model).layer(origin(&calls));
    for _ in 0..2 {
        let r = svc.clone().oneshot(get("/p")).await.unwrap();
        assert!(r.headers().get("content-encoding").is_none());
        assert!(r.headers().get("cache-status").is_none());
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 8 * 300);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn routes_classify_before_the_limit_and_responses_are_compressed_then_cached() {
    let model = CostModel::from_toml(MODEL).unwrap();
    let routes = RouteClassifier::builder(&model)
        .route(None, "/checkout", "checkout")
        .build()
        .unwrap();
    let stack = Stack::new(&model)
        .routes(routes)
        .limit()
        .compression()
        .cache(HttpCacheConfig::default());
    let calls = Arc::new(AtomicU64::new(0));
    let svc = stack.layer(origin(&calls));
    let r = svc.clone().oneshot(get("/checkout")).await.unwrap();
    assert!(r.headers().get("content-encoding").is_some());
    let _ = r.into_body().collect().await.unwrap();
    let stats = stack.limiter().unwrap().stats();
    let checkout = model.id("checkout").unwrap().index();
    let browse = model.id("browse").unwrap().index();
    assert_eq!(stats.classes[checkout].admitted, 1);
    assert_eq!(stats.classes[browse].admitted, 0);
    // The second is a hit, stored encoded once: served as stored.
    let r = svc.oneshot(get("/checkout")).await.unwrap();
    assert!(
        r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit")
    );
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain).unwrap();
    assert_eq!(plain, "{\"id\":7}".repeat(300).as_bytes());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_layered_service_and_clone_shares_one_limiter_and_one_cache() {
    let model = CostModel::from_toml(MODEL).unwrap();
    let stack = Stack::new(&model).limit().cache(HttpCacheConfig::default());
    let calls = Arc::new(AtomicU64::new(0));
    // Two "routes" layered separately, as axum does, and a clone of each.
    let a = stack.layer(origin(&calls));
    let b = stack.clone().layer(origin(&calls));
    let first = a.clone().oneshot(get("/p/1")).await.unwrap();
    let second = b.clone().oneshot(get("/p/2")).await.unwrap();
    // Bodies unread: both slots are held, in the one limiter.
    assert_eq!(stack.limiter().unwrap().stats().in_flight, 2);
    drop((first, second));
    assert_eq!(stack.limiter().unwrap().stats().in_flight, 0);
    // What `a` stored, `b` serves: one cache.
    let r = b.oneshot(get("/p/1")).await.unwrap();
    assert!(
        r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let purge = stack.cache_purge().unwrap();
    purge.sync().await;
    assert_eq!(purge.entry_count(), 2);
}

#[tokio::test]
async fn works_as_an_axum_router_layer() {
    use axum::Router;
    use axum::routing::get as route_get;

    let model = CostModel::from_toml(MODEL).unwrap();
    let stack = Stack::new(&model)
        .limit()
        .compression()
        .cache(HttpCacheConfig::default());
    let app: Router = Router::new()
        .route(
            "/products",
            route_get(|| async {
                (
                    [
                        ("cache-control", "public, max-age=60"),
                        ("content-type", "application/json"),
                    ],
                    "{\"id\":7}".repeat(300),
                )
            }),
        )
        .layer(stack.clone());
    for expect_hit in [false, true] {
        let request = Request::get("/products")
            .header("host", "shop.example")
            .header("accept-encoding", "gzip")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = app.clone().oneshot(request).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], "gzip");
        let status = r.headers()["cache-status"].to_str().unwrap().to_owned();
        assert_eq!(status.contains("hit"), expect_hit, "{status}");
        let _ = r.into_body().collect().await.unwrap();
    }
    // The miss held a slot; the hit never reached the limit.
    let stats = stack.limiter().unwrap().stats();
    let sum = |f: fn(&gratify::scaling::limit::ClassStats) -> u64| {
        stats.classes.iter().map(f).sum::<u64>()
    };
    assert_eq!(
        (stats.in_flight, sum(|c| c.completed), sum(|c| c.admitted)),
        (0, 1, 1)
    );
}

#[tokio::test]
async fn a_stack_from_one_file_classifies_limits_compresses_and_caches() {
    let stack = Stack::from_config(&format!(
        r#"{MODEL}
        [[routes]]
        path = "/checkout"
        class = "checkout"
        [limit]
        [compression]
        codecs = ["gzip"]
        [cache]
        max_bytes = 1048576
        "#
    ))
    .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let svc = stack.layer(origin(&calls));
    for expect_hit in [false, true] {
        let r = svc.clone().oneshot(get("/checkout")).await.unwrap();
        assert_eq!(r.headers()["content-encoding"], "gzip");
        let status = r.headers()["cache-status"].to_str().unwrap().to_owned();
        assert_eq!(status.contains("hit"), expect_hit, "{status}");
        let _ = r.into_body().collect().await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The miss was admitted; the hit never asked for a slot.
    let checkout = stack.model().id("checkout").unwrap().index();
    let stats = &stack.limiter().unwrap().stats().classes[checkout];
    assert_eq!((stats.completed, stats.admitted), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_costs_under_load_without_dropping_a_request() {
    let cheap_cpu = format!("{MODEL}\n[prices]\ncpu_second = 0.001\n");
    let dear_cpu = format!("{MODEL}\n[prices]\ncpu_second = 5.0\n");
    let stack =
        Stack::from_config(&format!("{cheap_cpu}\n[limit]\n[compression]\n[cache]\n")).unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let svc = stack.layer(origin(&calls));
    let load = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..2000 {
                let r = svc
                    .clone()
                    .oneshot(get(&format!("/p/{}", i % 50)))
                    .await
                    .unwrap();
                if r.status().is_success() && r.into_body().collect().await.is_ok() {
                    ok += 1;
                }
            }
            ok
        })
    };
    for i in 0..200 {
        let text = if i % 2 == 0 { &dear_cpu } else { &cheap_cpu };
        stack.reload_config(text).unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(load.await.unwrap(), 2000, "every request answered");
    // The last reload (cheap CPU) is what every piece now holds.
    assert_eq!(stack.model().prices().cpu_second, 0.001);
    assert_eq!(stack.limiter().unwrap().model().prices().cpu_second, 0.001);
    // A model with other classes is refused, and nothing changes.
    let other = CostModel::from_toml(
        "[classes.other]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = 1.0\n",
    )
    .unwrap();
    let e = stack.reload(&other).unwrap_err().to_string();
    assert!(e.contains("restart"), "{e}");
    assert_eq!(stack.model().prices().cpu_second, 0.001);
    assert!(stack.model().id("checkout").is_some());
}

#[tokio::test]
async fn a_builder_call_on_a_clone_shares_nothing_with_the_original() {
    let model = CostModel::from_toml(MODEL).unwrap();
    let plain = Stack::new(&model);
    let limited = plain.clone().limit();
    let calls = Arc::new(AtomicU64::new(0));
    // The plain one is used first; the limited one must still limit.
    let a = plain.layer(origin(&calls));
    let b = limited.layer(origin(&calls));
    let _ = a.oneshot(get("/p")).await.unwrap();
    let r = b.oneshot(get("/p")).await.unwrap();
    let _ = r.into_body().collect().await.unwrap();
    let browse = model.id("browse").unwrap().index();
    assert_eq!(
        limited.limiter().unwrap().stats().classes[browse].admitted,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_cached_answer_is_never_queued_or_shed_for_a_slot() {
    use gratify::scaling::limit::{Fixed, Limiter, LimiterConfig};
    use std::time::Duration;

    let model = CostModel::from_toml(MODEL).unwrap();
    let mut config = LimiterConfig::default();
    config.max_queue_time = Duration::from_millis(50);
    let limiter = Limiter::with_algorithm(&model, Fixed::new(1), config);
    let stack = Stack::new(&model)
        .limit_with(limiter.clone())
        .cache(HttpCacheConfig::default());
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    // "/slow" holds its slot for a second; everything is fresh for 10 s.
    let svc = stack.layer(service_fn(move |r: Request<()>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if r.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut res = Response::new(Full::new(Bytes::from(r.uri().path().to_owned())));
            res.headers_mut()
                .insert("cache-control", "public, max-age=10".parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    }));
    let fetch = |path: &'static str| {
        let svc = svc.clone();
        async move {
            let r = svc.oneshot(get(path)).await.unwrap();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    assert_eq!(fetch("/page").await, (200, Bytes::from("/page")));
    // The one slot is taken.
    let slow = tokio::spawn(fetch("/slow"));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(limiter.stats().in_flight, 1);
    // A miss waits for it and is refused; the cached page is answered.
    assert_eq!(fetch("/other").await.0, 503);
    assert_eq!(fetch("/page").await, (200, Bytes::from("/page")));
    let browse = model.default_class().index();
    let stats = &limiter.stats().classes[browse];
    // /page and /slow were admitted, /other shed; the hit asked nothing.
    assert_eq!((stats.admitted, stats.shed_total()), (2, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "/page once, /slow once");
    slow.await.unwrap();
    // Once stale, the page needs the origin again, so it needs a slot.
    tokio::time::advance(Duration::from_secs(11)).await;
    let slow = tokio::spawn(fetch("/slow"));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(fetch("/page").await.0, 503);
    slow.await.unwrap();
    assert_eq!(limiter.stats().in_flight, 0);
}

/// A stack with one slot and a cache, over an origin that takes `delay`
/// and answers `cache_control`; the limiter and the origin's call count.
fn one_slot(
    delay: std::time::Duration,
    cache_control: &'static str,
) -> (
    impl Service<
        Request<()>,
        Response = Response<impl http_body::Body<Data = Bytes, Error: std::fmt::Debug> + Send>,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    gratify::scaling::limit::Limiter,
    Arc<AtomicU64>,
) {
    use gratify::scaling::limit::{Fixed, Limiter, LimiterConfig};
    let model = CostModel::from_toml(MODEL).unwrap();
    let mut config = LimiterConfig::default();
    config.max_queue_time = std::time::Duration::from_millis(50);
    let limiter = Limiter::with_algorithm(&model, Fixed::new(1), config);
    let stack = Stack::new(&model)
        .limit_with(limiter.clone())
        .cache(HttpCacheConfig::default());
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let svc = stack.layer(service_fn(move |r: Request<()>| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            let body = format!("{}:{n}", r.uri().path());
            let mut res = Response::new(Full::new(Bytes::from(body)));
            res.headers_mut()
                .insert("cache-control", cache_control.parse().unwrap());
            res.headers_mut().insert("etag", "\"v\"".parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    }));
    (svc, limiter, calls)
}

#[tokio::test(start_paused = true)]
async fn a_crowd_on_a_cold_key_waits_for_one_fill_without_holding_slots() {
    use std::time::Duration;
    // One slot, and a queue that refuses after 50 ms: a crowd queued at the
    // limit would be shed. It waits in front of the limit instead.
    let (svc, limiter, calls) = one_slot(Duration::from_secs(1), "public, max-age=60");
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let r = svc.oneshot(get("/hot")).await.unwrap();
                let status = r.status().as_u16();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = limiter.stats();
    assert_eq!(
        (stats.in_flight, stats.queued),
        (1, 0),
        "only the fill holds a slot"
    );
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, Bytes::from("/hot:0")));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let browse = CostModel::from_toml(MODEL).unwrap().id("browse").unwrap();
    let browse = &limiter.stats().classes[browse.index()];
    assert_eq!((browse.admitted, browse.shed_total()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn background_refreshes_take_a_slot_like_any_origin_call() {
    use std::time::Duration;
    let (svc, limiter, calls) = one_slot(
        Duration::from_millis(100),
        "public, max-age=10, stale-while-revalidate=60",
    );
    let fetch = |path: &'static str| {
        let svc = svc.clone();
        async move {
            let r = svc.oneshot(get(path)).await.unwrap();
            let status = r.headers()["cache-status"].to_str().unwrap().to_owned();
            let _ = r.into_body().collect().await.unwrap();
            status
        }
    };
    fetch("/page").await;
    tokio::time::advance(Duration::from_secs(11)).await;
    // Stale within stale-while-revalidate: answered at once from memory,
    // and refreshed once in the background — through the limit.
    let status = fetch("/page").await;
    assert!(status.contains("hit; fwd=stale"), "{status}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(limiter.stats().in_flight, 1, "the refresh holds the slot");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(limiter.stats().in_flight, 0);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let browse = CostModel::from_toml(MODEL).unwrap().id("browse").unwrap();
    let browse = &limiter.stats().classes[browse.index()];
    assert_eq!(browse.admitted, 2, "the miss and the refresh");
    // The refresh stored a fresh copy.
    let status = fetch("/page").await;
    assert!(status.starts_with("gratify; hit;"), "{status}");
}

#[tokio::test(start_paused = true)]
async fn a_fill_that_outlives_its_client_keeps_its_slot() {
    use std::time::Duration;
    let (svc, limiter, calls) = one_slot(Duration::from_secs(1), "public, max-age=60");
    let leader = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(get("/hot")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    // The client is gone; the fill goes on for the others — under the slot.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        limiter.stats().in_flight,
        1,
        "the detached fill holds the slot"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(limiter.stats().in_flight, 0, "released when it ends");
    let r = svc.oneshot(get("/hot")).await.unwrap();
    assert!(
        r.headers()["cache-status"]
            .to_str()
            .unwrap()
            .starts_with("gratify; hit")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// The configuration block of the Stack guide is accepted as it is: a user
/// who pastes it gets a running Stack, not an error.
#[test]
fn the_guides_config_block_is_accepted_as_it_is() {
    let guide = include_str!("../../docs/stack.md");
    let section = guide
        .split("## One config file")
        .nth(1)
        .expect("the guide's config section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a TOML block");
    if let Err(e) = Stack::from_config(block) {
        panic!("the guide's block is refused: {e}");
    }
}

#[tokio::test(start_paused = true)]
async fn exempt_paths_are_answered_at_once_however_full_the_limit_and_never_cached_or_compressed() {
    use gratify::scaling::limit::{Fixed, Limiter, LimiterConfig};
    use std::time::Duration;

    let model = CostModel::from_toml(MODEL).unwrap();
    let mut config = LimiterConfig::default();
    config.max_queue_time = Duration::from_millis(50);
    let limiter = Limiter::with_algorithm(&model, Fixed::new(1), config);
    let stack = Stack::new(&model)
        .limit_with(limiter.clone())
        .compression()
        .cache(HttpCacheConfig::default())
        .exempt(["/healthz", "/readyz"]);
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    // Everything is cacheable and compressible; "/slow" holds the one slot.
    let svc = stack.layer(service_fn(move |r: Request<()>| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if r.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let body = format!("{}:{n}:", r.uri().path()).repeat(200);
            let mut res = Response::new(Full::new(Bytes::from(body)));
            res.headers_mut()
                .insert("cache-control", "public, max-age=60".parse().unwrap());
            res.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    }));
    let fetch = |path: &'static str| {
        let svc = svc.clone();
        async move {
            let r = svc.oneshot(get(path)).await.unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, headers, body)
        }
    };
    let slow = tokio::spawn(fetch("/slow"));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(limiter.stats().in_flight, 1);
    // Anything else waits for the slot and is refused…
    assert_eq!(fetch("/other").await.0, 503);
    // …but the health checks are answered now, by the service itself, each
    // time afresh: no slot, no cache entry, no compression.
    for (i, path) in ["/healthz", "/readyz", "/healthz"].into_iter().enumerate() {
        let (status, headers, body) = fetch(path).await;
        assert_eq!(status, 200, "{path}");
        assert!(headers.get("content-encoding").is_none(), "{headers:?}");
        assert!(headers.get("cache-status").is_none(), "{headers:?}");
        assert!(body.starts_with(format!("{path}:{}:", i + 1).as_bytes()));
    }
    // The query is not part of the path; a path that only starts like an
    // exempt one is not exempt.
    assert_eq!(fetch("/healthz?verbose=1").await.0, 200);
    assert_eq!(fetch("/healthz/deep").await.0, 503);
    // Only reads are exempt: a POST to the same path goes through the stack.
    let post = Request::post("/healthz")
        .header("host", "shop.example")
        .body(())
        .unwrap();
    assert_eq!(svc.clone().oneshot(post).await.unwrap().status(), 503);
    let browse = limiter.stats().classes[model.default_class().index()].clone();
    assert_eq!(browse.admitted, 1, "only /slow took a slot");
    assert_eq!(browse.shed_total(), 3, "/other, /healthz/deep and the POST");
    slow.await.unwrap();
    assert_eq!(limiter.stats().in_flight, 0);
}

#[test]
fn a_file_lists_exempt_paths_and_refuses_what_is_not_a_path() {
    let model = "default_class = \"browse\"\n[classes.browse]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = 1.0\n";
    assert!(Stack::from_config(&format!("exempt = [\"/healthz\"]\n{model}")).is_ok());
    let e = Stack::from_config(&format!("exempt = [\"/ok\", \"healthz\"]\n{model}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exempt[1]") && e.contains("healthz"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn exempt_paths_never_reserve_a_service_twice() {
    use std::time::Duration;
    use tower::limit::ConcurrencyLimit;

    // A service whose readiness reserves its one permit: readying it twice
    // for one request would wait forever.
    let model = CostModel::from_toml(MODEL).unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let svc = Stack::new(&model)
        .exempt(["/healthz"])
        .layer(ConcurrencyLimit::new(origin(&calls), 1));
    for path in ["/products", "/healthz", "/products", "/healthz"] {
        let answer = tokio::time::timeout(Duration::from_secs(60), svc.clone().oneshot(get(path)))
            .await
            .expect("answered, not stuck on readiness");
        assert_eq!(answer.unwrap().status(), 200, "{path}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// Requests admitted in (checkout, browse), from the limiter's stats.
fn admitted_by_class(stack: &Stack) -> (u64, u64) {
    let model = stack.model();
    let stats = stack.limiter().unwrap().stats();
    let of = |name: &str| stats.classes[model.id(name).unwrap().index()].admitted;
    (of("checkout"), of("browse"))
}

// Classifying by the matched template needs the `axum` feature.
#[cfg(feature = "axum")]
#[tokio::test]
async fn routes_declared_next_to_axum_routes_classify_by_the_template_axum_matched() {
    use axum::Router;
    use axum::routing::{get as route_get, post as route_post};

    let stack = Stack::from_config(&format!(
        r#"{MODEL}
        [[routes]]
        path = "/media/{{*rest}}"
        class = "checkout"
        [[routes]]
        path = "/admin/*"
        class = "checkout"
        [limit]
        "#
    ))
    .unwrap();
    let app: Router = Router::new()
        .route(
            stack.route("/orders/{id}", "checkout").unwrap(),
            route_post(|| async { "ordered" }),
        )
        .route(
            stack.route("/files/{name}", "browse").unwrap(),
            route_get(|| async { "a file" }),
        )
        .route("/products/{id}", route_get(|| async { "a product" }))
        // Not declared: its requests are not orders, though the declared
        // `/orders/{id}` would match the path. The class follows the route
        // axum chose.
        .route("/orders/export", route_get(|| async { "a report" }))
        .route("/media/{*path}", route_get(|| async { "a deep file" }))
        .route("/admin/users", route_get(|| async { "the users" }))
        .layer(stack.clone());
    let send = |method: &str, path: &str| {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let app = app.clone();
        async move {
            let r = app.oneshot(request).await.unwrap();
            assert_eq!(r.status(), 200);
            let _ = r.into_body().collect().await.unwrap();
        }
    };
    send("POST", "/orders/42").await;
    assert_eq!(admitted_by_class(&stack), (1, 0));
    send("GET", "/files/readme").await;
    send("GET", "/products/7").await;
    send("GET", "/orders/export").await;
    assert_eq!(admitted_by_class(&stack), (1, 3));
    // The file's route with the template's shape (its parameter named
    // differently); a template no route has: the file's routes match the
    // path.
    send("GET", "/media/a/b").await;
    send("GET", "/admin/users").await;
    assert_eq!(admitted_by_class(&stack), (3, 3));
}

#[test]
fn a_route_declared_in_code_is_checked_like_one_in_the_file() {
    let stack = Stack::from_config(&format!(
        r#"{MODEL}
        [[routes]]
        path = "/checkout"
        class = "checkout"
        "#
    ))
    .unwrap();
    // A misspelt class lists the known ones.
    let err = stack.route("/cart", "chekout").unwrap_err().to_string();
    assert!(
        err.contains("chekout") && err.contains("browse, checkout"),
        "{err}"
    );
    // A malformed template.
    let err = stack
        .route("/cart/{id", "checkout")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/cart/{id"), "{err}");
    // Declared in the file for another class, or twice in code.
    let err = stack.route("/checkout", "browse").unwrap_err().to_string();
    assert!(err.contains("already declared"), "{err}");
    assert_eq!(stack.route("/checkout", "checkout").unwrap(), "/checkout");
    stack.route("/cart/{id}", "checkout").unwrap();
    let err = stack
        .route("/cart/{item}", "browse")
        .unwrap_err()
        .to_string();
    assert!(err.contains("already declared"), "{err}");
    // Once the stack wraps a service, a declaration could not take effect.
    let _svc = stack.layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let err = stack.route("/late", "checkout").unwrap_err().to_string();
    assert!(err.contains("already built"), "{err}");
}

#[tokio::test]
async fn routes_declared_in_code_classify_plain_tower_services_by_path() {
    let stack = Stack::from_config(&format!("{MODEL}\n[limit]\n")).unwrap();
    stack.route("/orders/{id}", "checkout").unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let svc = stack.layer(origin(&calls));
    for path in ["/orders/1", "/orders/1/items", "/"] {
        let r = svc.clone().oneshot(get(path)).await.unwrap();
        let _ = r.into_body().collect().await.unwrap();
    }
    assert_eq!(admitted_by_class(&stack), (1, 2));
}

#[tokio::test]
async fn a_class_set_by_an_earlier_layer_wins_only_when_asked() {
    use gratify::core::ClassId;

    for keep in [false, true] {
        let mut stack = Stack::from_config(&format!(
            "{MODEL}\n[[routes]]\npath = \"/checkout\"\nclass = \"checkout\"\n[limit]\n"
        ))
        .unwrap();
        if keep {
            stack = stack.keep_earlier_class();
        }
        let model = stack.model();
        let checkout = model.id("checkout").unwrap();
        let browse = model.id("browse").unwrap();
        // The application's own layer classifies the requests it can tell
        // apart — paying users, one browsing user — and leaves the rest; a
        // bug of its marks a class this model does not have.
        let own = tower::util::MapRequestLayer::new(move |mut r: Request<()>| {
            let class = if r.headers().contains_key("x-paying") {
                Some(checkout)
            } else if r.headers().contains_key("x-browsing") {
                Some(browse)
            } else if r.headers().contains_key("x-bogus") {
                Some(ClassId::from_index(9))
            } else {
                None
            };
            if let Some(class) = class {
                r.extensions_mut().insert(class);
            }
            r
        });
        let calls = Arc::new(AtomicU64::new(0));
        let svc = own.layer(stack.layer(origin(&calls)));
        let with = |name: &str, path: &str| {
            let mut r = get(path);
            r.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
            r
        };
        for request in [
            with("x-paying", "/products"),
            with("x-paying", "/products"),
            with("x-bogus", "/checkout"),
            with("x-browsing", "/checkout"),
            with("x-none", "/checkout"),
            with("x-none", "/products"),
        ] {
            let r = svc.clone().oneshot(request).await.unwrap();
            let _ = r.into_body().collect().await.unwrap();
        }
        // Kept: both paying users are checkout, the bogus class and the
        // unmarked `/checkout` are classified by route (checkout), the
        // browsing user keeps browse. Not kept: the routes decide all six.
        let expected = if keep { (4, 2) } else { (3, 3) };
        assert_eq!(admitted_by_class(&stack), expected, "keep {keep}");
    }
}

// Classifying by the matched template needs the `axum` feature.
#[cfg(feature = "axum")]
#[tokio::test]
async fn nested_routers_trailing_slashes_and_methods_classify_as_axum_routes_them() {
    use axum::Router;
    use axum::routing::{get as route_get, post as route_post};

    let stack = Stack::from_config(&format!("{MODEL}\n[limit]\n")).unwrap();
    let api = stack.nest("/api").unwrap();
    let v1 = api.nest("/v1").unwrap();
    let orders: Router = Router::new()
        .route(
            v1.route("/orders/{id}", "checkout").unwrap(),
            route_post(|| async { "ordered" }),
        )
        .route(
            v1.route("/", "checkout").unwrap(),
            route_get(|| async { "v1" }),
        );
    let app: Router = Router::new()
        .nest("/api/v1", orders)
        .route(
            stack.route("/cart", "checkout").unwrap(),
            route_get(|| async { "cart" }),
        )
        // Another route to axum: the stack must not take it for `/cart`.
        .route(
            stack.route("/cart/", "browse").unwrap(),
            route_get(|| async { "a page" }),
        )
        .layer(stack.clone());
    let send = |method: &str, path: &str| {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let app = app.clone();
        async move {
            let r = app.oneshot(request).await.unwrap();
            let _ = r.into_body().collect().await.unwrap();
        }
    };
    send("POST", "/api/v1/orders/9").await;
    send("GET", "/api/v1").await;
    assert_eq!(admitted_by_class(&stack), (2, 0));
    send("GET", "/cart/").await;
    assert_eq!(admitted_by_class(&stack), (2, 1));
    send("GET", "/cart").await;
    assert_eq!(admitted_by_class(&stack), (3, 1));
}

#[test]
fn declarations_are_shared_by_every_stack_made_from_one_and_sealed_when_one_is_built() {
    let stack = Stack::from_config(&format!(
        "{MODEL}\n[[routes]]\nmethod = \"POST\"\npath = \"/pay\"\nclass = \"checkout\"\n"
    ))
    .unwrap();
    // A route of the file for one method: the same template for another
    // class, for any method, is a conflict.
    let err = stack.route("/pay", "browse").unwrap_err().to_string();
    assert!(
        err.contains("already declared") && err.contains("POST"),
        "{err}"
    );
    // Not an axum template.
    let err = stack.route("/static/*", "browse").unwrap_err().to_string();
    assert!(err.contains("bare `*`"), "{err}");
    assert!(stack.nest("api").is_err() && stack.nest("/api/").is_err());
    // A stack forked by a builder call sees what is declared on the
    // original afterwards.
    let fork = stack.clone().limit();
    stack.route("/orders/{id}", "checkout").unwrap();
    // Building any of them (here by asking for the admin service) seals
    // the declarations for all.
    let _admin = fork.admin();
    let err = stack.route("/late", "checkout").unwrap_err().to_string();
    assert!(err.contains("already built"), "{err}");
    assert!(fork.route("/late", "checkout").is_err());
}

#[tokio::test]
async fn a_route_declared_on_the_original_classifies_in_a_fork() {
    let stack = Stack::from_config(MODEL).unwrap();
    let fork = stack.clone().limit();
    stack.route("/orders/{id}", "checkout").unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let svc = fork.layer(origin(&calls));
    let r = svc.oneshot(get("/orders/3")).await.unwrap();
    let _ = r.into_body().collect().await.unwrap();
    assert_eq!(admitted_by_class(&fork), (1, 0));
}

/// The service under the stack is reachable as under any tower layer —
/// with every layer on, and with every layer off.
#[test]
fn the_service_under_the_stack_is_reachable() {
    #[derive(Clone, Debug, PartialEq)]
    struct Named(u32);
    let all_on = Stack::from_config(
        r#"
        default_class = "page"
        exempt = ["/healthz"]
        [classes.page]
        delay_cost = { shape = "linear", per_second = 1.0 }
        refusal_cost = 1.0
        [limit]
        [compression]
        [cache]
        "#,
    )
    .unwrap();
    let all_off = Stack::from_config(
        r#"
        default_class = "page"
        [classes.page]
        delay_cost = { shape = "linear", per_second = 1.0 }
        refusal_cost = 1.0
        "#,
    )
    .unwrap();
    for stack in [all_on, all_off] {
        let mut service = stack.layer(Named(7));
        assert_eq!(service.get_ref(), &Named(7));
        service.get_mut().0 = 8;
        assert_eq!(service.get_ref(), &Named(8));
        assert_eq!(service.into_inner(), Named(8));
    }
}

/// A body the cache stores compressed once is compression: the stack's
/// figures (what the dashboard shows) count it, though every later answer
/// comes from the cache encoded and never passes the compression layer.
#[tokio::test]
async fn bodies_compressed_once_for_the_cache_are_counted_as_compression() {
    let stack = Stack::from_config(
        r#"
        default_class = "page"
        [classes.page]
        delay_cost = { shape = "linear", per_second = 1.0 }
        refusal_cost = 1.0
        [compression]
        [cache]
        "#,
    )
    .unwrap();
    let page: String = (0..400)
        .map(|i| format!("{{\"item\":{i},\"name\":\"thing\"}},"))
        .collect();
    let app = stack.layer(service_fn(move |_req: Request<String>| {
        let page = page.clone();
        async move {
            let mut r = Response::new(page);
            r.headers_mut()
                .insert("cache-control", "public, max-age=60".parse().unwrap());
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    }));
    for _ in 0..3 {
        let request = Request::get("/catalogue")
            .header("host", "shop.example")
            .header("accept-encoding", "gzip")
            .body(String::new())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers()["content-encoding"], "gzip");
        let _ = response.into_body().collect().await.unwrap();
    }
    let snapshot = stack.admin().snapshot();
    let compression = &snapshot["compression"];
    let (responses, bytes_in, bytes_out) = (
        compression["responses"].as_u64().unwrap(),
        compression["bytes_in"].as_u64().unwrap(),
        compression["bytes_out"].as_u64().unwrap(),
    );
    assert!(responses >= 1, "{compression}");
    assert!(bytes_out < bytes_in, "{compression}");
}
