//! The HTTP cache against a scripted origin, on tokio's paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gratify_cache::{CachePurge, HttpCacheConfig, HttpCacheLayer};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};

/// What the cache answers with.
type Body = gratify_cache::body::CacheBody<gratify_cache::body::FillBody<Full<Bytes>>>;

/// What the origin answers: a function of the request and how many calls
/// came before.
type Script = Arc<dyn Fn(&Request<()>, usize) -> Response<Full<Bytes>> + Send + Sync>;

#[derive(Clone, Default)]
struct Origin {
    seen: Arc<Mutex<Vec<(Method, String, HeaderMap)>>>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last_headers(&self) -> HeaderMap {
        self.seen.lock().unwrap().last().unwrap().2.clone()
    }

    fn service(
        &self,
        delay: Duration,
        script: Script,
    ) -> impl Service<
        Request<()>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future: Send,
    >
    + Clone
    + Send
    + 'static
    + use<> {
        let seen = Arc::clone(&self.seen);
        service_fn(move |req: Request<()>| {
            let n = {
                let mut s = seen.lock().unwrap();
                s.push((
                    req.method().clone(),
                    req.uri().to_string(),
                    req.headers().clone(),
                ));
                s.len() - 1
            };
            let response = script(&req, n);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(response)
            }
        })
    }
}

fn respond(status: u16, body: &str, headers: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

fn get(path: &str) -> Request<()> {
    Request::get(path)
        .header("host", "shop.example")
        .body(())
        .unwrap()
}

fn with(mut r: Request<()>, headers: &[(&str, &str)]) -> Request<()> {
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

struct Harness<S> {
    svc: S,
    origin: Origin,
    purge: CachePurge,
}

fn harness(
    config: HttpCacheConfig,
    delay: Duration,
    script: impl Fn(&Request<()>, usize) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> Harness<
    impl Service<Request<()>, Response = Response<Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static,
> {
    let origin = Origin::default();
    let layer = HttpCacheLayer::new(config);
    let purge = layer.purge();
    let svc = layer.layer(origin.service(delay, Arc::new(script)));
    Harness { svc, origin, purge }
}

async fn send<S>(svc: &S, req: Request<()>) -> (StatusCode, HeaderMap, String)
where
    S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone,
{
    let r = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn status(h: &HeaderMap) -> &str {
    h.get("cache-status").unwrap().to_str().unwrap()
}

const FRESH_60: (&str, &str) = ("cache-control", "public, max-age=60");

/// A cache name that cannot be a token is written as a string: the field
/// stays a list its readers can parse.
#[tokio::test(start_paused = true)]
async fn a_cache_name_with_a_space_is_written_as_a_string() {
    let mut config = HttpCacheConfig::default();
    config.name = "edge cache".into();
    let h = harness(config, Duration::ZERO, |_, n| {
        respond(200, &format!("v{n}"), &[FRESH_60])
    });
    let _ = send(&h.svc, get("/p")).await;
    let (_, hd, _) = send(&h.svc, get("/p")).await;
    assert_eq!(status(&hd), "\"edge cache\"; hit; ttl=60");
    let parsed = gratify_cache::cache_status::CacheStatus::from_headers(&hd).unwrap();
    assert!(parsed.cache("edge cache").unwrap().hit());
}

#[tokio::test(start_paused = true)]
async fn hits_carry_age_and_expire() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |_, n| {
        respond(200, &format!("v{n}"), &[FRESH_60])
    });
    let (_, hd, body) = send(&h.svc, get("/p")).await;
    assert_eq!(
        (body.as_str(), status(&hd)),
        ("v0", "gratify; fwd=uri-miss; stored")
    );
    // The origin sent no `Age`; the miss passes on none.
    assert!(!hd.contains_key("age"));
    tokio::time::advance(Duration::from_secs(10)).await;
    let (_, hd, body) = send(&h.svc, get("/p")).await;
    assert_eq!(body, "v0");
    assert_eq!(hd["age"], "10");
    assert_eq!(status(&hd), "gratify; hit; ttl=50");
    // Hits within the same second send the same fields; a later one its
    // own (the values a hit keeps for the next never go stale), and each
    // field once.
    let (_, hd, _) = send(&h.svc, get("/p")).await;
    assert_eq!(
        (&hd["age"], status(&hd)),
        (&"10".parse().unwrap(), "gratify; hit; ttl=50")
    );
    tokio::time::advance(Duration::from_millis(1500)).await;
    let (_, hd, _) = send(&h.svc, get("/p")).await;
    assert_eq!(hd.get_all("age").iter().count(), 1);
    assert_eq!(hd.get_all("cache-status").iter().count(), 1);
    assert_eq!(
        (&hd["age"], status(&hd)),
        (&"11".parse().unwrap(), "gratify; hit; ttl=49")
    );
    tokio::time::advance(Duration::from_millis(49_500)).await;
    let (_, hd, body) = send(&h.svc, get("/p")).await;
    assert_eq!(body, "v1", "{:?}", status(&hd));
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_entries_are_revalidated_with_their_validators() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |req, n| {
        if n > 0
            && req
                .headers()
                .get("if-none-match")
                .is_some_and(|v| v == "\"v1\"")
        {
            respond(
                304,
                "",
                &[("cache-control", "max-age=30"), ("etag", "\"v1\"")],
            )
        } else {
            respond(
                200,
                "body",
                &[("cache-control", "max-age=5"), ("etag", "\"v1\"")],
            )
        }
    });
    send(&h.svc, get("/r")).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    let (st, hd, body) = send(&h.svc, get("/r")).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "body"));
    assert!(status(&hd).contains("fwd-status=304"), "{}", status(&hd));
    assert_eq!(h.origin.last_headers()["if-none-match"], "\"v1\"");
    // The 304 refreshed it: fresh for 30 s more, no origin call.
    tokio::time::advance(Duration::from_secs(20)).await;
    let (_, hd, _) = send(&h.svc, get("/r")).await;
    assert!(status(&hd).starts_with("gratify; hit"));
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn head_is_served_from_get_and_conditionals_get_304() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |_, _| {
        respond(200, "page", &[FRESH_60, ("etag", "W/\"e1\"")])
    });
    send(&h.svc, get("/h")).await;
    let head = Request::head("/h")
        .header("host", "shop.example")
        .body(())
        .unwrap();
    let (st, hd, body) = send(&h.svc, head).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, ""));
    assert!(status(&hd).starts_with("gratify; hit"));
    let (st, _, body) = send(&h.svc, with(get("/h"), &[("if-none-match", "\"e1\"")])).await;
    assert_eq!((st, body.as_str()), (StatusCode::NOT_MODIFIED, ""));
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn vary_keeps_variants_apart() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |req, _| {
        let enc = req
            .headers()
            .get("accept-encoding")
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        respond(200, &enc, &[FRESH_60, ("vary", "Accept-Encoding")])
    });
    let (_, _, a) = send(&h.svc, with(get("/v"), &[("accept-encoding", "gzip")])).await;
    let (_, _, b) = send(&h.svc, with(get("/v"), &[("accept-encoding", "br")])).await;
    let (_, hd, c) = send(&h.svc, with(get("/v"), &[("accept-encoding", " GZIP")])).await;
    assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("gzip", "br", "gzip"));
    assert!(status(&hd).starts_with("gratify; hit"));
    let (_, hd, d) = send(&h.svc, get("/v")).await;
    assert_eq!(d, "none");
    assert!(status(&hd).contains("vary-miss"));
    assert_eq!(h.origin.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn what_must_not_be_stored_is_not() {
    let cases: Vec<(Vec<(&str, &str)>, u16, Vec<(&str, &str)>)> = vec![
        (
            vec![("authorization", "Bearer a")],
            200,
            vec![("cache-control", "max-age=60")],
        ),
        (vec![], 200, vec![("cache-control", "private, max-age=60")]),
        (
            vec![],
            200,
            vec![FRESH_60, ("set-cookie", "session=victim")],
        ),
        (vec![("cookie", "session=a")], 200, vec![FRESH_60]),
        (vec![], 200, vec![FRESH_60, ("vary", "*")]),
        (vec![], 404, vec![FRESH_60]),
        (vec![], 500, vec![FRESH_60]),
        (vec![], 200, vec![("cache-control", "no-store, max-age=60")]),
        (vec![("cache-control", "no-store")], 200, vec![FRESH_60]),
        (vec![], 200, vec![]),
    ];
    for (req_headers, code, resp_headers) in cases {
        let resp: Vec<(String, String)> = resp_headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let h = harness(HttpCacheConfig::default(), Duration::ZERO, move |_, n| {
            let pairs: Vec<(&str, &str)> =
                resp.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            respond(code, &format!("v{n}"), &pairs)
        });
        send(&h.svc, with(get("/x"), &req_headers)).await;
        let (_, hd, body) = send(&h.svc, with(get("/x"), &req_headers)).await;
        assert_eq!(
            body,
            "v1",
            "stored for {req_headers:?} {code} {resp_headers:?}: {}",
            status(&hd)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn authorization_is_stored_only_when_the_response_allows_it() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |_, n| {
        respond(200, &format!("v{n}"), &[FRESH_60])
    });
    send(&h.svc, with(get("/a"), &[("authorization", "Bearer x")])).await;
    let (_, _, body) = send(&h.svc, with(get("/a"), &[("authorization", "Bearer y")])).await;
    assert_eq!(body, "v0", "public, max-age: shared caching allowed");
}

#[tokio::test(start_paused = true)]
async fn poisoned_requests_never_reach_clean_clients() {
    for header in [
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-scheme",
        "x-forwarded-port",
        "x-original-url",
        "x-rewrite-url",
        "x-host",
        "forwarded",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ] {
        // A careless origin reflects the header into a cacheable page.
        let h = harness(HttpCacheConfig::default(), Duration::ZERO, move |req, _| {
            let reflected = req.headers().get(header).map_or("clean".to_owned(), |v| {
                format!("poisoned:{}", v.to_str().unwrap())
            });
            respond(200, &reflected, &[FRESH_60])
        });
        let (_, _, poisoned) = send(&h.svc, with(get("/"), &[(header, "evil.example")])).await;
        assert!(poisoned.starts_with("poisoned"));
        let (_, _, clean) = send(&h.svc, get("/")).await;
        assert_eq!(clean, "clean", "{header} poisoned the cache");
    }
}

#[tokio::test(start_paused = true)]
async fn host_is_in_the_key() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |req, _| {
        let host = req
            .headers()
            .get("host")
            .map_or("none", |h| h.to_str().unwrap());
        respond(200, host, &[FRESH_60])
    });
    let a = Request::get("/")
        .header("host", "a.example")
        .body(())
        .unwrap();
    let b = Request::get("/")
        .header("host", "b.example")
        .body(())
        .unwrap();
    assert_eq!(send(&h.svc, a).await.2, "a.example");
    assert_eq!(send(&h.svc, b).await.2, "b.example");
    // No Host at all: not cached.
    let none = Request::get("/").body(()).unwrap();
    let (_, hd, body) = send(&h.svc, none).await;
    assert_eq!(
        (body.as_str(), status(&hd)),
        ("none", "gratify; fwd=bypass")
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_origin_call() {
    let h = harness(
        HttpCacheConfig::default(),
        Duration::from_millis(100),
        |_, n| respond(200, &format!("v{n}"), &[FRESH_60]),
    );
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let svc = h.svc.clone();
            tokio::spawn(async move { send(&svc, get("/cold")).await })
        })
        .collect();
    for t in tasks {
        let (st, _, body) = t.await.unwrap();
        assert_eq!((st, body.as_str()), (StatusCode::OK, "v0"));
    }
    assert_eq!(h.origin.calls(), 1);
    assert!(start.elapsed() <= Duration::from_millis(110));
}

#[tokio::test(start_paused = true)]
async fn the_fill_survives_its_client_leaving() {
    let h = harness(
        HttpCacheConfig::default(),
        Duration::from_millis(100),
        |_, n| respond(200, &format!("v{n}"), &[FRESH_60]),
    );
    let leader = tokio::spawn({
        let svc = h.svc.clone();
        async move { send(&svc, get("/d")).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, hd, body) = send(&h.svc, get("/d")).await;
    assert_eq!(body, "v0");
    assert!(status(&hd).starts_with("gratify; hit"));
    assert_eq!(h.origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn uncacheable_answers_do_not_serialise_requests() {
    let h = harness(
        HttpCacheConfig::default(),
        Duration::from_millis(100),
        |_, n| respond(200, &format!("v{n}"), &[("cache-control", "no-store")]),
    );
    send(&h.svc, get("/u")).await;
    // Hit-for-miss: ten concurrent requests go to the origin in parallel.
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let svc = h.svc.clone();
            tokio::spawn(async move { send(&svc, get("/u")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(h.origin.calls(), 11);
    assert!(
        start.elapsed() <= Duration::from_millis(110),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn purges() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |req, n| {
        let tag = if req.uri().path().starts_with("/products") {
            "products"
        } else {
            "other"
        };
        respond(200, &format!("v{n}"), &[FRESH_60, ("surrogate-key", tag)])
    });
    for p in ["/products/1", "/products/2", "/about", "/help"] {
        send(&h.svc, get(p)).await;
    }
    let hit = |h: &HeaderMap| status(h).starts_with("gratify; hit");
    h.purge.purge_key("http://shop.example/products/1").await;
    assert!(!hit(&send(&h.svc, get("/products/1")).await.1));
    assert!(hit(&send(&h.svc, get("/products/2")).await.1));
    h.purge.purge_tag("products");
    h.purge.sync().await;
    assert!(!hit(&send(&h.svc, get("/products/2")).await.1));
    h.purge.purge_prefix("http://shop.example/ab");
    h.purge.sync().await;
    assert!(!hit(&send(&h.svc, get("/about")).await.1));
    assert!(hit(&send(&h.svc, get("/help")).await.1));
    h.purge.purge_all();
    h.purge.sync().await;
    assert!(!hit(&send(&h.svc, get("/help")).await.1));
}

#[tokio::test(start_paused = true)]
async fn unsafe_methods_invalidate_their_targets() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |req, n| {
        if req.method() == Method::POST {
            respond(201, "", &[("location", "/orders/9")])
        } else {
            respond(200, &format!("v{n}"), &[FRESH_60])
        }
    });
    send(&h.svc, get("/orders")).await;
    send(&h.svc, get("/orders/9")).await;
    let post = Request::post("/orders")
        .header("host", "shop.example")
        .body(())
        .unwrap();
    let (st, hd, _) = send(&h.svc, post).await;
    assert_eq!(st, StatusCode::CREATED);
    // The cache had no answer to give a POST, and says nothing.
    assert!(hd.get("cache-status").is_none(), "{hd:?}");
    assert!(status(&send(&h.svc, get("/orders")).await.1).contains("miss"));
    assert!(status(&send(&h.svc, get("/orders/9")).await.1).contains("miss"));
}

#[tokio::test(start_paused = true)]
async fn large_bodies_stream_through_unstored() {
    let mut config = HttpCacheConfig::default();
    config.max_entry_bytes = 1000;
    let big = "x".repeat(5000);
    let h = harness(config, Duration::ZERO, move |_, _| {
        respond(200, &big, &[FRESH_60])
    });
    let (_, _, body) = send(&h.svc, get("/big")).await;
    assert_eq!(body.len(), 5000);
    let (_, hd, body) = send(&h.svc, get("/big")).await;
    assert_eq!(body.len(), 5000);
    assert!(status(&hd).contains("miss"));
    assert_eq!(h.origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn request_directives() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |_, n| {
        respond(200, &format!("v{n}"), &[FRESH_60])
    });
    let (st, _, _) = send(
        &h.svc,
        with(get("/q"), &[("cache-control", "only-if-cached")]),
    )
    .await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    send(&h.svc, get("/q")).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    let (_, _, body) = send(&h.svc, with(get("/q"), &[("cache-control", "max-age=10")])).await;
    assert_eq!(body, "v1", "older than the client accepts");
    let (_, _, body) = send(&h.svc, with(get("/q"), &[("cache-control", "no-cache")])).await;
    assert_eq!(body, "v2");
}

#[tokio::test(start_paused = true)]
async fn must_revalidate_fails_closed_and_stale_if_error_serves_stale() {
    let h = harness(HttpCacheConfig::default(), Duration::ZERO, |req, n| {
        let path = req.uri().path().to_owned();
        if n >= 2 {
            return respond(503, "down", &[]);
        }
        let cc = if path == "/strict" {
            "max-age=5, must-revalidate"
        } else {
            "max-age=5, stale-if-error=60"
        };
        respond(
            200,
            &format!("{path}:{n}"),
            &[("cache-control", cc), ("etag", "\"t\"")],
        )
    });
    send(&h.svc, get("/strict")).await;
    send(&h.svc, get("/lenient")).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    // Never the stale copy: the origin's own failure is passed on (a
    // connection error would be a 504).
    let (st, _, body) = send(&h.svc, get("/strict")).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "down")
    );
    let (st, hd, body) = send(&h.svc, get("/lenient")).await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "/lenient:1"));
    assert!(status(&hd).contains("stale-if-error"));
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_refreshes_once_in_the_background() {
    let h = harness(
        HttpCacheConfig::default(),
        Duration::from_millis(50),
        |_, n| {
            respond(
                200,
                &format!("v{n}"),
                &[("cache-control", "max-age=5, stale-while-revalidate=60")],
            )
        },
    );
    send(&h.svc, get("/s")).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let svc = h.svc.clone();
            tokio::spawn(async move { send(&svc, get("/s")).await })
        })
        .collect();
    for t in tasks {
        let (_, hd, body) = t.await.unwrap();
        assert_eq!(body, "v0");
        assert!(status(&hd).contains("fwd=stale"));
    }
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "served stale without waiting"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.origin.calls(), 2, "exactly one background refresh");
    let (_, _, body) = send(&h.svc, get("/s")).await;
    assert_eq!(body, "v1");
}

#[tokio::test(start_paused = true)]
async fn the_store_stays_within_its_budget() {
    let mut config = HttpCacheConfig::default();
    config.max_bytes = 1024 * 1024;
    let h = harness(config, Duration::ZERO, |_, n| {
        respond(200, &"y".repeat(100 + n % 50), &[FRESH_60])
    });
    for i in 0..20_000 {
        send(&h.svc, get(&format!("/k/{i}"))).await;
    }
    h.purge.sync().await;
    let size = h.purge.weighted_size();
    assert!(size <= 1024 * 1024, "{size} bytes held for a 1 MiB budget");
    assert!(h.purge.entry_count() > 1000);
}

#[tokio::test(start_paused = true)]
async fn routes_opt_in_with_their_own_ttl() {
    let mut config = HttpCacheConfig::default();
    let mut rules = gratify_cache::policy::Rules::default();
    rules.default_ttl = Some(Duration::from_secs(30));
    config.routes.push(("/catalogue".into(), rules));
    // The origin sends no freshness information at all.
    let h = harness(config, Duration::ZERO, |_, n| {
        respond(200, &format!("v{n}"), &[])
    });
    send(&h.svc, get("/catalogue/shoes")).await;
    assert_eq!(send(&h.svc, get("/catalogue/shoes")).await.2, "v0");
    // Elsewhere nothing is inferred: not cached.
    send(&h.svc, get("/basket")).await;
    assert_eq!(send(&h.svc, get("/basket")).await.2, "v2");
}

mod malformed {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,40}",
            Just("max-age=60, public".to_owned()),
            Just("Sun, 06 Nov 1994 08:49:37 GMT".to_owned()),
            Just("\"etag\"".to_owned()),
            Just("W/\"x\", \"y\"".to_owned()),
            Just("*".to_owned()),
            Just("-1".to_owned()),
            Just("99999999999999999999999".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn odd_headers_never_panic(
            cc in value(), expires in value(), age in value(), vary in value(),
            etag in value(), lm in value(), inm in value(), req_cc in value(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let pairs = [("cache-control", cc), ("expires", expires), ("age", age),
                    ("vary", vary), ("etag", etag), ("last-modified", lm)];
                let h = harness(HttpCacheConfig::default(), Duration::ZERO, move |_, n| {
                    let mut r = respond(200, &format!("v{n}"), &[]);
                    for (k, v) in &pairs {
                        if let Ok(v) = v.parse() {
                            r.headers_mut().append(*k, v);
                        }
                    }
                    r
                });
                for _ in 0..2 {
                    let mut req = get("/m");
                    for (k, v) in [("if-none-match", &inm), ("cache-control", &req_cc), ("accept-encoding", &inm)] {
                        if let Ok(v) = v.parse() {
                            req.headers_mut().append(k, v);
                        }
                    }
                    let (st, hd, _) = send(&h.svc, req).await;
                    assert!(st.is_success() || st == StatusCode::NOT_MODIFIED || st == StatusCode::GATEWAY_TIMEOUT);
                    assert!(hd.contains_key("cache-status"));
                    tokio::time::advance(Duration::from_secs(1)).await;
                }
            });
        }
    }
}

#[tokio::test(start_paused = true)]
async fn hot_entries_are_refreshed_before_they_expire() {
    let h = harness(
        HttpCacheConfig::default(),
        Duration::from_millis(10),
        |_, n| respond(200, &format!("v{n}"), &[("cache-control", "max-age=10")]),
    );
    send(&h.svc, get("/hot")).await;
    tokio::time::advance(Duration::from_secs(9)).await;
    // 90% of its freshness has passed: served fresh, refreshed behind.
    let (_, hd, body) = send(&h.svc, get("/hot")).await;
    assert_eq!(body, "v0");
    assert!(status(&hd).starts_with("gratify; hit"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.origin.calls(), 2);
    // Past the original expiry, the refreshed copy is still fresh.
    tokio::time::advance(Duration::from_secs(3)).await;
    let (_, hd, body) = send(&h.svc, get("/hot")).await;
    assert_eq!(body, "v1");
    assert!(status(&hd).starts_with("gratify; hit"));
}
