//! Sequences in time that break a naive shared cache — store, age,
//! revalidate, serve stale, race, hang up — each asserting the promise that
//! protects users holds. Tokio's paused clock throughout.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gratify_cache::body::{CacheBody, FillBody};
use gratify_cache::policy::Rules;
use gratify_cache::{CachePurge, HttpCacheConfig, HttpCacheLayer};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt, service_fn};

/// An origin's body: whole, or chunks as a test sends them (ending when the
/// test drops its sender).
enum TestBody {
    Full(Option<Bytes>),
    Chan(mpsc::UnboundedReceiver<Bytes>),
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Chan(rx) => rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d)))),
        }
    }
}

type Answer = Response<CacheBody<FillBody<TestBody>>>;

/// What the origin saw: method, URI and headers of every call.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<HeaderMap>>>);

impl Seen {
    fn calls(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn headers(&self, n: usize) -> HeaderMap {
        self.0.lock().unwrap()[n].clone()
    }
}

type Script = dyn Fn(&Request<()>, usize) -> Response<TestBody> + Send + Sync;

struct Harness<S> {
    svc: S,
    seen: Seen,
    purge: CachePurge,
}

fn harness(
    layer: HttpCacheLayer,
    delay: Duration,
    script: impl Fn(&Request<()>, usize) -> Response<TestBody> + Send + Sync + 'static,
) -> Harness<
    impl Service<Request<()>, Response = Answer, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static,
> {
    let seen = Seen::default();
    let script: Arc<Script> = Arc::new(script);
    let log = seen.clone();
    let origin = service_fn(move |req: Request<()>| {
        let n = {
            let mut s = log.0.lock().unwrap();
            s.push(req.headers().clone());
            s.len() - 1
        };
        let response = script(&req, n);
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(response)
        }
    });
    let purge = layer.purge();
    Harness {
        svc: layer.layer(origin),
        seen,
        purge,
    }
}

fn cache() -> HttpCacheLayer {
    HttpCacheLayer::new(HttpCacheConfig::default())
}

fn respond(status: u16, body: &str, headers: &[(&str, &str)]) -> Response<TestBody> {
    let mut r = Response::new(TestBody::Full(Some(Bytes::from(body.to_owned()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

fn get(path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut r = Request::get(path)
        .header("host", "shop.example")
        .body(())
        .unwrap();
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    r
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .map_or("", |v| v.to_str().unwrap())
    }

    fn hit(&self) -> bool {
        self.cache_status().starts_with("gratify; hit")
    }
}

async fn send<S>(svc: &S, req: Request<()>) -> Got
where
    S: Service<Request<()>, Response = Answer, Error = Infallible> + Clone,
{
    fetch(svc.clone(), req).await
}

async fn fetch<S>(svc: S, req: Request<()>) -> Got
where
    S: Service<Request<()>, Response = Answer, Error = Infallible>,
{
    let r = svc.oneshot(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn advance(secs: u64) {
    tokio::time::advance(Duration::from_secs(secs)).await;
}

fn if_none_match(req: &Request<()>, etag: &str) -> bool {
    req.headers()
        .get("if-none-match")
        .is_some_and(|v| v.to_str().unwrap().contains(etag))
}

// ---------------------------------------------------------------------------
// 1. Revalidation merges (RFC 9111 §4.3.4)
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_304_never_adds_a_cookie_for_others() {
    // Stored without a cookie; revalidated by one client, whose 304 sets a
    // session cookie; later hits must not carry it.
    let h = harness(cache(), Duration::ZERO, |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[
                    ("etag", "\"a\""),
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "session=for-the-revalidating-client"),
                ],
            );
        }
        respond(
            200,
            "page",
            &[("etag", "\"a\""), ("cache-control", "public, max-age=1")],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    let revalidated = send(&h.svc, get("/p", &[])).await;
    assert!(revalidated.cache_status().contains("fwd-status=304"));
    assert_eq!(
        revalidated.headers["set-cookie"],
        "session=for-the-revalidating-client"
    );
    let other = send(&h.svc, get("/p", &[])).await;
    assert!(other.hit(), "{}", other.cache_status());
    assert!(other.headers.get("set-cookie").is_none(), "cookie replayed");
    assert_eq!(other.body, "page");
}

#[tokio::test(start_paused = true)]
async fn a_304_that_makes_the_response_private_drops_it() {
    for update in [
        "private, max-age=60",
        "no-store",
        "public, max-age=60, no-store",
    ] {
        let h = harness(cache(), Duration::ZERO, move |req, n| {
            if n > 0 && if_none_match(req, "\"a\"") {
                return respond(304, "", &[("etag", "\"a\""), ("cache-control", update)]);
            }
            respond(
                200,
                &format!("v{n}"),
                &[("etag", "\"a\""), ("cache-control", "max-age=1")],
            )
        });
        send(&h.svc, get("/p", &[])).await;
        advance(2).await;
        let revalidated = send(&h.svc, get("/p", &[])).await;
        assert_eq!(revalidated.body, "v0", "the one who asked is answered");
        let next = send(&h.svc, get("/p", &[])).await;
        assert!(!next.hit(), "{update}: still served from the cache");
        assert_eq!(h.seen.calls(), 3, "{update}");
    }
}

/// A `Date` and an `Expires` `secs` later, both from the wall clock (the
/// cache ages responses by their `Date`).
fn dated(secs: u64) -> (String, String) {
    let now = std::time::SystemTime::now();
    (
        httpdate::fmt_http_date(now),
        httpdate::fmt_http_date(now + Duration::from_secs(secs)),
    )
}

#[tokio::test(start_paused = true)]
async fn a_304_adding_cache_control_to_an_expires_response_governs() {
    // The stored response has no Cache-Control (freshness from Expires); a
    // 304 that brings one — and a new Expires an hour away — still governs.
    for (update, served_fresh_after) in [
        ("no-store", false),
        ("no-cache, must-revalidate", false),
        ("private", false),
        ("max-age=600", true),
    ] {
        let h = harness(cache(), Duration::ZERO, move |req, n| {
            if n > 0 && if_none_match(req, "\"a\"") {
                let (date, expires) = dated(3600);
                return respond(
                    304,
                    "",
                    &[
                        ("etag", "\"a\""),
                        ("date", &date),
                        ("expires", &expires),
                        ("cache-control", update),
                    ],
                );
            }
            let (date, expires) = dated(10);
            respond(
                200,
                "v",
                &[("etag", "\"a\""), ("date", &date), ("expires", &expires)],
            )
        });
        send(&h.svc, get("/p", &[])).await;
        assert!(send(&h.svc, get("/p", &[])).await.hit(), "{update}: stored");
        advance(12).await;
        let revalidated = send(&h.svc, get("/p", &[])).await;
        assert!(
            revalidated.cache_status().contains("fwd-status=304"),
            "{update}"
        );
        let next = send(&h.svc, get("/p", &[])).await;
        assert_eq!(
            next.hit(),
            served_fresh_after,
            "{update}: {}",
            next.cache_status()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_304_that_brings_cdn_cache_control_governs() {
    let h = harness(cache(), Duration::ZERO, |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[
                    ("etag", "\"a\""),
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "no-cache"),
                ],
            );
        }
        respond(
            200,
            "v",
            &[
                ("etag", "\"a\""),
                ("cache-control", "max-age=1, stale-while-revalidate=600"),
            ],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    // Within stale-while-revalidate: served, refreshed in the background.
    send(&h.svc, get("/p", &[])).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The refresh's 304 said no-cache to this cache: no more hits.
    let next = send(&h.svc, get("/p", &[])).await;
    assert!(!next.hit(), "{}", next.cache_status());
}

#[tokio::test(start_paused = true)]
async fn a_304_that_changes_vary_drops_the_entry() {
    // Stored varying on Accept-Language only; the 304 says it varies on a
    // tenant too. What was recorded no longer says who may have it.
    let h = harness(cache(), Duration::ZERO, |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[
                    ("etag", "\"a\""),
                    ("cache-control", "max-age=600"),
                    ("vary", "accept-language, x-tenant"),
                ],
            );
        }
        respond(
            200,
            "for tenant one",
            &[
                ("etag", "\"a\""),
                ("cache-control", "max-age=1"),
                ("vary", "accept-language"),
            ],
        )
    });
    let tenant = |t: &str| get("/p", &[("accept-language", "en"), ("x-tenant", t)]);
    send(&h.svc, tenant("one")).await;
    advance(2).await;
    send(&h.svc, tenant("one")).await;
    let other = send(&h.svc, tenant("two")).await;
    assert!(!other.hit(), "{}", other.cache_status());
}

#[tokio::test(start_paused = true)]
async fn a_304_to_a_request_with_credentials_changes_nothing_for_others() {
    // Alice's revalidation (she is logged in) gets a 304 that would keep the
    // entry a day, or make it private: neither is for anyone else to see.
    for update in ["max-age=86400", "private, max-age=60"] {
        let h = harness(cache(), Duration::ZERO, move |req, n| {
            if n > 0 && if_none_match(req, "\"a\"") {
                return respond(304, "", &[("etag", "\"a\""), ("cache-control", update)]);
            }
            respond(
                200,
                "public page",
                &[("etag", "\"a\""), ("cache-control", "max-age=10")],
            )
        });
        send(&h.svc, get("/p", &[])).await;
        advance(11).await;
        let alice = send(&h.svc, get("/p", &[("authorization", "Bearer alice")])).await;
        assert_eq!(alice.body, "public page");
        // Everyone else: the stored entry is still there, and still stale.
        let other = send(&h.svc, get("/p", &[])).await;
        assert!(
            other.cache_status().contains("fwd=stale"),
            "{update}: {}",
            other.cache_status()
        );
        assert_eq!(h.seen.calls(), 3, "{update}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_304_restarts_freshness_from_its_own_age() {
    // The 304 arrives already 8 s old (Age: 8) with max-age=10: the entry
    // is fresh for 2 s more, not 10. (No eager refresh: it would renew it.)
    let mut config = HttpCacheConfig::default();
    config.eager_refresh = None;
    let h = harness(HttpCacheLayer::new(config), Duration::ZERO, |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[
                    ("etag", "\"a\""),
                    ("cache-control", "max-age=10"),
                    ("age", "8"),
                ],
            );
        }
        respond(
            200,
            "v",
            &[("etag", "\"a\""), ("cache-control", "max-age=10")],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    advance(11).await;
    send(&h.svc, get("/p", &[])).await;
    advance(1).await;
    let fresh = send(&h.svc, get("/p", &[])).await;
    assert!(fresh.hit(), "{}", fresh.cache_status());
    assert_eq!(fresh.headers["age"], "9");
    advance(2).await;
    let stale = send(&h.svc, get("/p", &[])).await;
    assert!(!stale.hit(), "served past the 304's freshness");
    assert_eq!(h.seen.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_304_for_another_representation_is_not_merged() {
    // The origin's 304 names a different strong validator: the stored body
    // is not the current one. The cache asks again, without conditions.
    let h = harness(cache(), Duration::ZERO, |req, n| match n {
        0 => respond(
            200,
            "old",
            &[("etag", "\"a\""), ("cache-control", "max-age=1")],
        ),
        1 => {
            assert!(if_none_match(req, "\"a\""));
            respond(
                304,
                "",
                &[("etag", "\"b\""), ("cache-control", "max-age=60")],
            )
        }
        _ => {
            assert!(req.headers().get("if-none-match").is_none());
            respond(
                200,
                "new",
                &[("etag", "\"b\""), ("cache-control", "max-age=60")],
            )
        }
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    let got = send(&h.svc, get("/p", &[])).await;
    assert_eq!(got.body, "new");
    let next = send(&h.svc, get("/p", &[])).await;
    assert_eq!((next.body.as_str(), next.hit()), ("new", true));
    assert_eq!(h.seen.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_304_updates_only_what_the_stored_response_has() {
    let h = harness(cache(), Duration::ZERO, |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[
                    ("etag", "\"a\""),
                    ("cache-control", "max-age=60"),
                    ("x-version", "2"),
                    ("x-new", "added"),
                    ("content-length", "1"),
                    ("content-encoding", "gzip"),
                ],
            );
        }
        respond(
            200,
            "stored body",
            &[
                ("etag", "\"a\""),
                ("cache-control", "max-age=1"),
                ("x-version", "1"),
            ],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    send(&h.svc, get("/p", &[])).await;
    let hit = send(&h.svc, get("/p", &[])).await;
    assert!(hit.hit());
    assert_eq!(hit.headers["x-version"], "2");
    assert!(hit.headers.get("x-new").is_none());
    assert!(hit.headers.get("content-encoding").is_none());
    assert_eq!(hit.body, "stored body");
}

// ---------------------------------------------------------------------------
// 2. Stale gates: one predicate for every path that serves stale
// ---------------------------------------------------------------------------

/// Every way a cache may serve a stale response, tried on a response that
/// forbids serving it stale.
#[tokio::test(start_paused = true)]
async fn a_response_that_forbids_stale_is_never_served_stale() {
    for forbid in [
        "no-cache",
        "must-revalidate",
        "proxy-revalidate",
        "s-maxage=1",
    ] {
        let cc =
            format!("public, max-age=1, {forbid}, stale-while-revalidate=600, stale-if-error=600");
        let mut config = HttpCacheConfig::default();
        config.fail_safe = Some(Duration::from_secs(600));
        let h = harness(HttpCacheLayer::new(config), Duration::ZERO, move |_, n| {
            if n == 0 {
                respond(200, "stale", &[("cache-control", &cc), ("etag", "\"a\"")])
            } else {
                respond(503, "down", &[])
            }
        });
        send(&h.svc, get("/p", &[])).await;
        advance(5).await;
        // The request's max-stale, stale-while-revalidate, stale-if-error
        // and the fail-safe: none may serve it.
        for req in [
            get("/p", &[("cache-control", "max-stale=600")]),
            get("/p", &[]),
        ] {
            let got = send(&h.svc, req).await;
            assert_ne!(got.body, "stale", "{forbid}: {}", got.cache_status());
            assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{forbid}");
        }
        // Coalesced: many at once, none served stale.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let svc = h.svc.clone();
                tokio::spawn(async move { send(&svc, get("/p", &[])).await })
            })
            .collect();
        for t in tasks {
            let got = t.await.unwrap();
            assert_ne!(got.body, "stale", "{forbid}: {}", got.cache_status());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_max_age_bounds_the_age_even_with_max_stale() {
    let h = harness(cache(), Duration::ZERO, |_, n| {
        respond(200, &format!("v{n}"), &[("cache-control", "max-age=60")])
    });
    send(&h.svc, get("/p", &[])).await;
    advance(30).await;
    let got = send(
        &h.svc,
        get("/p", &[("cache-control", "max-age=5, max-stale=100")]),
    )
    .await;
    assert_eq!(got.body, "v1", "{}", got.cache_status());
    advance(70).await;
    let got = send(
        &h.svc,
        get("/p", &[("cache-control", "max-age=20, max-stale=100")]),
    )
    .await;
    assert_eq!(got.body, "v2", "a 70 s old answer for max-age=20");
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_entries_without_validators_only_for_real_failures() {
    let h = harness(cache(), Duration::ZERO, |req, n| {
        if n == 0 || n == 1 {
            return respond(
                200,
                "kept",
                &[("cache-control", "max-age=1, stale-if-error=60")],
            );
        }
        let status = req.uri().path().trim_start_matches("/s").parse().unwrap();
        respond(status, "origin says", &[])
    });
    send(&h.svc, get("/s500", &[])).await;
    send(&h.svc, get("/s501", &[])).await;
    advance(2).await;
    for (status, expect_stale) in [(500, true), (501, false)] {
        let got = send(&h.svc, get(&format!("/s{status}"), &[])).await;
        assert_eq!(got.body == "kept", expect_stale, "{status}: {}", got.body);
    }
    for status in [502, 503, 504] {
        // Fresh entries for those, then failures.
        let h = harness(cache(), Duration::ZERO, move |_, n| {
            if n == 0 {
                respond(
                    200,
                    "kept",
                    &[("cache-control", "max-age=1, stale-if-error=60")],
                )
            } else {
                respond(status, "down", &[])
            }
        });
        send(&h.svc, get("/p", &[])).await;
        advance(2).await;
        let got = send(&h.svc, get("/p", &[])).await;
        assert_eq!(got.body, "kept", "{status}");
        assert!(got.cache_status().contains("stale-if-error"));
    }
}

// ---------------------------------------------------------------------------
// 3. Keyed inputs are what the origin saw
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn hop_by_hop_headers_are_neither_sent_nor_keyed() {
    let h = harness(cache(), Duration::ZERO, |req, n| {
        let x = req
            .headers()
            .get("x-flavour")
            .map_or("none", |v| v.to_str().unwrap());
        respond(
            200,
            &format!("{x}:{n}"),
            &[("cache-control", "max-age=60"), ("vary", "x-flavour")],
        )
    });
    // x-flavour is hop-by-hop for this request: the origin never sees it.
    let first = send(
        &h.svc,
        get("/p", &[("connection", "x-flavour"), ("x-flavour", "sweet")]),
    )
    .await;
    assert_eq!(first.body, "none:0");
    assert!(h.seen.headers(0).get("x-flavour").is_none());
    // A request that really says sweet is not served the answer to none.
    let sweet = send(&h.svc, get("/p", &[("x-flavour", "sweet")])).await;
    assert_eq!(sweet.body, "sweet:1");
    // And one that says nothing is served the first answer.
    let none = send(&h.svc, get("/p", &[])).await;
    assert_eq!((none.body.as_str(), none.hit()), ("none:0", true));
}

#[tokio::test(start_paused = true)]
async fn a_uri_authority_that_disagrees_with_host_is_not_cached() {
    let h = harness(cache(), Duration::ZERO, |req, n| {
        let host = req.headers()["host"].to_str().unwrap().to_owned();
        respond(
            200,
            &format!("{host}:{n}"),
            &[("cache-control", "max-age=60")],
        )
    });
    let confused = || {
        Request::get("http://victim.example/p")
            .header("host", "attacker.example")
            .body(())
            .unwrap()
    };
    let a = send(&h.svc, confused()).await;
    let b = send(&h.svc, confused()).await;
    assert!(a.cache_status().contains("bypass") && b.cache_status().contains("bypass"));
    let victim = send(&h.svc, get("http://victim.example/p", &[])).await;
    assert!(!victim.body.starts_with("attacker"), "{}", victim.body);
}

#[tokio::test(start_paused = true)]
async fn unsafe_methods_invalidate_by_parsed_origin_and_full_key() {
    let mut config = HttpCacheConfig::default();
    config.sort_query = true;
    let tenant = |p: &http::request::Parts| {
        p.headers
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let layer = HttpCacheLayer::with_key_part(config, tenant);
    let h = harness(layer, Duration::ZERO, |req, n| {
        if req.method() == http::Method::POST {
            let location = req.headers()["x-location"].to_str().unwrap().to_owned();
            return respond(201, "", &[("location", &location)]);
        }
        respond(200, &format!("v{n}"), &[("cache-control", "max-age=600")])
    });
    let post = |location: &str| {
        Request::post("/items")
            .header("host", "shop.example")
            .header("x-tenant", "t1")
            .header("x-location", location)
            .body(())
            .unwrap()
    };
    let item = || get("/items/1?b=2&a=1", &[("x-tenant", "t1")]);
    send(&h.svc, item()).await;
    assert!(send(&h.svc, item()).await.hit());
    // Another origin that merely starts with ours: not ours to invalidate.
    send(&h.svc, post("http://shop.example.evil/items/1?a=1&b=2")).await;
    assert!(send(&h.svc, item()).await.hit());
    // Ours, spelt differently (case, default port, query order): invalidated.
    send(&h.svc, post("HTTP://Shop.Example:80/items/1?a=1&b=2")).await;
    let after = send(&h.svc, item()).await;
    assert!(!after.hit(), "{}", after.cache_status());
    // A relative reference, resolved against the request.
    assert!(send(&h.svc, item()).await.hit());
    send(&h.svc, post("items/1?a=1&b=2")).await;
    assert!(!send(&h.svc, item()).await.hit());
}

// ---------------------------------------------------------------------------
// 4. Cookies and tags are never replayed
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn set_cookie_is_never_stored_even_where_cookies_are_allowed() {
    let mut rules = Rules::default();
    rules.allow_cookies = true;
    let mut config = HttpCacheConfig::default();
    config.routes.push(("/me".to_owned(), rules));
    let h = harness(HttpCacheLayer::new(config), Duration::ZERO, |_, n| {
        respond(
            200,
            "page",
            &[
                ("cache-control", "max-age=60"),
                ("set-cookie", &format!("sid=call{n}")),
            ],
        )
    });
    let first = send(&h.svc, get("/me", &[])).await;
    assert_eq!(first.headers["set-cookie"], "sid=call0");
    let second = send(&h.svc, get("/me", &[])).await;
    assert!(second.hit());
    assert!(second.headers.get("set-cookie").is_none());
}

#[tokio::test(start_paused = true)]
async fn surrogate_keys_stay_in_the_cache_unless_asked_on_misses_and_hits_alike() {
    for expose in [false, true] {
        let mut config = HttpCacheConfig::default();
        config.expose_tags = expose;
        let h = harness(HttpCacheLayer::new(config), Duration::ZERO, |_, n| {
            respond(
                200,
                &format!("v{n}"),
                &[
                    ("cache-control", "max-age=60"),
                    ("surrogate-key", "product-7 catalogue"),
                ],
            )
        });
        let miss = send(&h.svc, get("/p", &[])).await;
        let hit = send(&h.svc, get("/p", &[])).await;
        // The same headers on every hit: a hit's prepared headers are reused.
        let again = send(&h.svc, get("/p", &[])).await;
        assert!(hit.hit() && again.hit());
        for got in [&miss, &hit, &again] {
            let sent = got.headers.get("surrogate-key");
            if expose {
                assert_eq!(sent.unwrap(), "product-7 catalogue");
            } else {
                assert!(sent.is_none(), "{sent:?}");
            }
        }
        assert_eq!(again.headers.get_all("age").iter().count(), 1);
        assert_eq!(again.headers.get_all("cache-status").iter().count(), 1);
        h.purge.purge_tag("product-7");
        assert_eq!(
            send(&h.svc, get("/p", &[])).await.body,
            "v1",
            "expose {expose}"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Coalescing that holds
// ---------------------------------------------------------------------------

async fn crowd<S>(svc: &S, n: usize, req: impl Fn() -> Request<()>) -> Vec<Got>
where
    S: Service<Request<()>, Response = Answer, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            let req = req();
            tokio::spawn(fetch(svc, req))
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_is_revalidated_once_for_a_crowd() {
    let h = harness(cache(), Duration::from_millis(100), |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[("etag", "\"a\""), ("cache-control", "max-age=60")],
            );
        }
        respond(
            200,
            "body",
            &[("etag", "\"a\""), ("cache-control", "max-age=1")],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    let got = crowd(&h.svc, 50, || get("/p", &[])).await;
    assert!(
        got.iter()
            .all(|g| g.body == "body" && g.status == StatusCode::OK)
    );
    assert_eq!(h.seen.calls(), 2, "one fill, one revalidation");
}

#[tokio::test(start_paused = true)]
async fn the_revalidation_survives_its_client_hanging_up() {
    let h = harness(cache(), Duration::from_millis(100), |req, n| {
        if n > 0 && if_none_match(req, "\"a\"") {
            return respond(
                304,
                "",
                &[("etag", "\"a\""), ("cache-control", "max-age=60")],
            );
        }
        respond(
            200,
            "body",
            &[("etag", "\"a\""), ("cache-control", "max-age=1")],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    let leader = tokio::spawn({
        let svc = h.svc.clone();
        async move { send(&svc, get("/p", &[])).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let followers = tokio::spawn({
        let svc = h.svc.clone();
        async move { crowd(&svc, 20, || get("/p", &[])).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    let got = followers.await.unwrap();
    assert!(got.iter().all(|g| g.body == "body"));
    assert_eq!(h.seen.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn one_request_with_credentials_does_not_switch_coalescing_off() {
    // Personal requests get personal answers (private, with a cookie);
    // anonymous ones a public page.
    let h = harness(cache(), Duration::from_millis(100), |req, n| {
        let personal =
            req.headers().contains_key("cookie") || req.headers().contains_key("authorization");
        if personal {
            return respond(
                200,
                &format!("v{n}"),
                &[
                    ("cache-control", "private, max-age=60"),
                    ("set-cookie", "sid=2"),
                ],
            );
        }
        respond(200, &format!("v{n}"), &[("cache-control", "max-age=60")])
    });
    for personal in [
        get("/p", &[("cookie", "sid=1")]),
        get("/p", &[("authorization", "Bearer u1")]),
        get("/p", &[("cache-control", "no-store")]),
    ] {
        // Served on its own, not stored ...
        assert_eq!(send(&h.svc, personal).await.status, StatusCode::OK);
    }
    assert_eq!(h.seen.calls(), 3);
    // ... and the next crowd of cold requests still makes one call.
    let got = crowd(&h.svc, 50, || get("/p", &[])).await;
    assert!(got.iter().all(|g| g.body == "v3"), "{:?}", got[0].body);
    assert_eq!(h.seen.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_leaders_conditions_and_range_never_reach_a_shared_fill() {
    // The origin honours conditions and ranges, as real ones do.
    let h = harness(cache(), Duration::from_millis(100), |req, _| {
        if if_none_match(req, "\"a\"") {
            return respond(304, "", &[("etag", "\"a\"")]);
        }
        if req.headers().contains_key("range") {
            return respond(206, "bo", &[("content-range", "bytes 0-1/4")]);
        }
        respond(
            200,
            "body",
            &[("etag", "\"a\""), ("cache-control", "max-age=60")],
        )
    });
    for first in [
        get("/c", &[("if-none-match", "\"a\"")]),
        get("/r", &[("range", "bytes=0-1")]),
    ] {
        let path = first.uri().path().to_owned();
        let leader = tokio::spawn({
            let svc = h.svc.clone();
            async move { send(&svc, first).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let others = crowd(&h.svc, 20, || get(&path, &[])).await;
        for g in &others {
            assert_eq!(
                (g.status, g.body.as_str()),
                (StatusCode::OK, "body"),
                "{path}"
            );
        }
        let leader = leader.await.unwrap();
        if path == "/c" {
            assert_eq!(leader.status, StatusCode::NOT_MODIFIED);
        }
    }
    // /c: one shared fill. /r: the range went alone (206), one shared fill.
    assert_eq!(h.seen.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn waiting_for_fills_takes_at_most_the_coalescing_wait_in_all() {
    // Each fill fails just before the wait would end; a naive cache starts
    // the wait again for each new fill.
    let mut config = HttpCacheConfig::default();
    config.coalesce_wait = Duration::from_secs(5);
    config.coalesce_retries = 5;
    let h = harness(
        HttpCacheLayer::new(config),
        Duration::from_millis(4900),
        |_, _| respond(503, "down", &[]),
    );
    let started = tokio::time::Instant::now();
    let got = crowd(&h.svc, 10, || get("/p", &[])).await;
    assert!(
        got.iter()
            .all(|g| g.status == StatusCode::SERVICE_UNAVAILABLE)
    );
    // The leader's own call takes 4.9 s; a waiter that then goes alone
    // takes 4.9 s more — never three rounds of five.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stalls_after_its_client_left_frees_its_key() {
    let senders = Arc::new(Mutex::new(Vec::new()));
    let h = harness(cache(), Duration::ZERO, {
        let senders = Arc::clone(&senders);
        move |_, n| {
            if n > 0 {
                return respond(200, "whole", &[("cache-control", "max-age=60")]);
            }
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            tx.send(Bytes::from_static(b"part")).unwrap();
            senders.lock().unwrap().push(tx);
            let mut r = Response::new(TestBody::Chan(rx));
            r.headers_mut()
                .insert("cache-control", "max-age=60".parse().unwrap());
            r
        }
    });
    // The client reads the first part and leaves; the origin never ends.
    let response = h.svc.clone().oneshot(get("/p", &[])).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Past the coalescing wait, the key is free: a request fills it anew.
    advance(6).await;
    let next = tokio::time::timeout(Duration::from_secs(1), send(&h.svc, get("/p", &[])))
        .await
        .expect("not held behind the stalled fill");
    assert_eq!(next.body, "whole");
    assert_eq!(h.seen.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_during_a_fill_keeps_the_fill_from_storing() {
    let h = harness(cache(), Duration::from_millis(100), |req, n| {
        if req.method() == http::Method::PUT {
            return respond(204, "", &[]);
        }
        respond(200, &format!("v{n}"), &[("cache-control", "max-age=600")])
    });
    let before = tokio::spawn({
        let svc = h.svc.clone();
        async move { send(&svc, get("/p", &[])).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The resource changes while the fill is at the origin.
    let put = Request::put("/p")
        .header("host", "shop.example")
        .body(())
        .unwrap();
    assert_eq!(send(&h.svc, put).await.status, StatusCode::NO_CONTENT);
    assert_eq!(before.await.unwrap().body, "v0");
    // What the fill got predates the change: not served to anyone after.
    let after = send(&h.svc, get("/p", &[])).await;
    assert_eq!(after.body, "v2", "{}", after.cache_status());
}

#[tokio::test(start_paused = true)]
async fn a_failing_origin_sees_a_bounded_number_of_fills_not_the_crowd() {
    let config = HttpCacheConfig::default();
    let retries = config.coalesce_retries as usize;
    let h = harness(
        HttpCacheLayer::new(config),
        Duration::from_millis(50),
        |_, _| respond(503, "down", &[]),
    );
    let got = crowd(&h.svc, 50, || get("/p", &[])).await;
    assert!(
        got.iter()
            .all(|g| g.status == StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(h.seen.calls(), 1 + retries);
}

#[tokio::test(start_paused = true)]
async fn a_crowd_is_served_stale_if_error_when_the_fill_fails() {
    let h = harness(cache(), Duration::from_millis(50), |_, n| {
        if n == 0 {
            respond(
                200,
                "kept",
                &[("cache-control", "max-age=1, stale-if-error=60")],
            )
        } else {
            respond(500, "down", &[])
        }
    });
    send(&h.svc, get("/p", &[])).await;
    advance(2).await;
    let got = crowd(&h.svc, 30, || get("/p", &[])).await;
    assert!(got.iter().all(|g| g.body == "kept"));
    assert_eq!(h.seen.calls(), 2);
}

// ---------------------------------------------------------------------------
// 6. Streaming: a slow or endless body never hangs its client
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_slow_cacheable_body_streams_and_is_stored_when_it_ends() {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let h = harness(cache(), Duration::ZERO, move |_, n| {
        let body = match rx.lock().unwrap().take() {
            Some(rx) => TestBody::Chan(rx),
            None => TestBody::Full(Some(Bytes::from(format!("other{n}")))),
        };
        let mut r = Response::new(body);
        r.headers_mut()
            .insert("cache-control", "max-age=60".parse().unwrap());
        r
    });
    tx.send(Bytes::from_static(b"first ")).unwrap();
    let response = h.svc.clone().oneshot(get("/slow", &[])).await.unwrap();
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(1), body.frame())
        .await
        .expect("the first chunk arrives before the body ends")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first ");
    // A request meanwhile waits for the fill rather than calling the origin.
    let follower = tokio::spawn({
        let svc = h.svc.clone();
        async move { send(&svc, get("/slow", &[])).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(Bytes::from_static(b"second")).unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
    let follower = follower.await.unwrap();
    assert_eq!(
        (follower.body.as_str(), follower.hit()),
        ("first second", true)
    );
    assert_eq!(h.seen.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_endless_body_passes_through_past_the_entry_limit() {
    let mut config = HttpCacheConfig::default();
    config.max_entry_bytes = 1000;
    let senders = Arc::new(Mutex::new(Vec::new()));
    let h = harness(HttpCacheLayer::new(config), Duration::ZERO, {
        let senders = Arc::clone(&senders);
        move |_, _| {
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            senders.lock().unwrap().push(tx);
            let mut r = Response::new(TestBody::Chan(rx));
            r.headers_mut()
                .insert("cache-control", "max-age=60".parse().unwrap());
            r
        }
    });
    let response = h.svc.clone().oneshot(get("/live", &[])).await.unwrap();
    let mut body = response.into_body();
    let tx = senders.lock().unwrap()[0].clone();
    let mut read = 0;
    for _ in 0..30 {
        tx.send(Bytes::from(vec![b'x'; 100])).unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(1), body.frame())
            .await
            .expect("the client reads as the origin sends")
            .unwrap()
            .unwrap();
        read += frame.into_data().unwrap().len();
    }
    assert_eq!(read, 3000);
    // Too large to keep: the next request goes to the origin at once.
    drop(body);
    let _next = tokio::time::timeout(
        Duration::from_secs(1),
        h.svc.clone().oneshot(get("/live", &[])),
    )
    .await
    .expect("not held behind the endless fill")
    .unwrap();
    assert_eq!(h.seen.calls(), 2);
}

// ---------------------------------------------------------------------------
// 7. What a stored response can also answer
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_range_is_cut_from_the_stored_response() {
    let h = harness(cache(), Duration::ZERO, |_, _| {
        respond(
            200,
            "0123456789",
            &[("cache-control", "max-age=60"), ("etag", "\"v\"")],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    for (range, status, body, content_range) in [
        ("bytes=0-1", 206, "01", Some("bytes 0-1/10")),
        ("bytes=7-", 206, "789", Some("bytes 7-9/10")),
        ("bytes=-2", 206, "89", Some("bytes 8-9/10")),
        ("bytes=5-100", 206, "56789", Some("bytes 5-9/10")),
        ("bytes=10-", 416, "", Some("bytes */10")),
        // Several ranges, other units, nonsense: the whole response.
        ("bytes=0-1,3-4", 200, "0123456789", None),
        ("items=0-1", 200, "0123456789", None),
        ("bytes=5-2", 200, "0123456789", None),
    ] {
        let got = send(&h.svc, get("/p", &[("range", range)])).await;
        assert_eq!(
            (got.status.as_u16(), got.body.as_str()),
            (status, body),
            "{range}"
        );
        assert_eq!(
            got.headers
                .get("content-range")
                .map(|v| v.to_str().unwrap()),
            content_range,
            "{range}"
        );
        assert!(got.hit(), "{range}");
    }
    // A body the origin encoded itself is never cut: the whole of it.
    let h2 = harness(cache(), Duration::ZERO, |_, _| {
        respond(
            200,
            "gzip-bytes",
            &[
                ("cache-control", "max-age=60"),
                ("content-encoding", "gzip"),
            ],
        )
    });
    send(&h2.svc, get("/z", &[])).await;
    let got = send(&h2.svc, get("/z", &[("range", "bytes=0-1")])).await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "gzip-bytes")
    );
    assert_eq!(got.headers["content-encoding"], "gzip");
    // If-Range names another version: the whole (current) response.
    let got = send(
        &h.svc,
        get("/p", &[("range", "bytes=0-1"), ("if-range", "\"old\"")]),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let got = send(
        &h.svc,
        get("/p", &[("range", "bytes=0-1"), ("if-range", "\"v\"")]),
    )
    .await;
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h.seen.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn cdn_cache_control_speaks_to_this_cache_alone() {
    // (CDN-Cache-Control, Cache-Control) → stored and reused?
    for (cdn, cc, reused) in [
        ("max-age=600", "no-store", true),
        ("no-store", "max-age=600", false),
        ("private", "max-age=600", false),
        ("max-age=0", "max-age=600", false),
        // Malformed as a dictionary: ignored, Cache-Control applies.
        ("max-age =600", "max-age=600", true),
        ("max-age =600", "no-store", false),
        ("max-age=\"600\"", "no-store", false),
        ("max-age=600, &&&", "no-store", false),
        ("Max-Age=600", "no-store", false),
        // A quoted field list is one member; private keeps it out.
        ("private=\"x-user, set-cookie\"", "max-age=600", false),
        // Not a dictionary, but it says private: obeyed.
        ("private, max-age =5", "max-age=600", false),
        // `?0` is false: nothing is said but the max-age.
        ("public=?0, max-age=600", "no-store", true),
    ] {
        let h = harness(cache(), Duration::ZERO, move |_, n| {
            respond(
                200,
                &format!("v{n}"),
                &[("cdn-cache-control", cdn), ("cache-control", cc)],
            )
        });
        send(&h.svc, get("/p", &[])).await;
        advance(1).await;
        let got = send(&h.svc, get("/p", &[])).await;
        assert_eq!(got.hit(), reused, "{cdn} / {cc}: {}", got.cache_status());
    }
}

#[tokio::test(start_paused = true)]
async fn redirects_with_explicit_freshness_and_must_understand_are_stored() {
    for (status, cc, stored) in [
        (302, "max-age=60", true),
        (307, "max-age=60", true),
        (302, "", false),
        (200, "max-age=60, must-understand, no-store", true),
        (404, "max-age=60, must-understand, no-store", false),
        (500, "max-age=60", false),
    ] {
        let h = harness(cache(), Duration::ZERO, move |_, n| {
            let mut headers = vec![("location", "/elsewhere")];
            if !cc.is_empty() {
                headers.push(("cache-control", cc));
            }
            respond(status, &format!("v{n}"), &headers)
        });
        send(&h.svc, get("/p", &[])).await;
        let got = send(&h.svc, get("/p", &[])).await;
        assert_eq!(got.hit(), stored, "{status} {cc}");
    }
}

#[tokio::test(start_paused = true)]
async fn if_modified_since_is_answered_from_date_without_last_modified() {
    let h = harness(cache(), Duration::ZERO, |_, _| {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        respond(
            200,
            "v",
            &[("cache-control", "max-age=60"), ("date", &date)],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
    let got = send(&h.svc, get("/p", &[("if-modified-since", &later)])).await;
    assert_eq!(got.status, StatusCode::NOT_MODIFIED);
    let earlier = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(3600));
    let got = send(&h.svc, get("/p", &[("if-modified-since", &earlier)])).await;
    assert_eq!(got.status, StatusCode::OK);
}

/// A stand-in coding: "gzip" that keeps every other byte (so it is smaller)
/// and decodes by doubling them back — enough to see which body was sent.
struct Halve;

impl gratify_core::encoding::Recoder for Halve {
    fn codings(&self) -> &[&'static str] {
        &["gzip"]
    }
    fn encode(&self, _: &str, data: &[u8]) -> Result<Bytes, gratify_core::BoxError> {
        Ok(data.iter().step_by(2).copied().collect())
    }
    fn decode(&self, _: &str, data: &[u8]) -> Result<Bytes, gratify_core::BoxError> {
        Ok(data.iter().flat_map(|b| [*b, *b]).collect())
    }
}

#[tokio::test(start_paused = true)]
async fn a_range_on_a_body_stored_encoded_is_answered_whole_without_decoding() {
    let mut config = HttpCacheConfig::default();
    config.recoder = Some(Arc::new(Halve));
    let body = "aabbccdd".repeat(256);
    let h = harness(HttpCacheLayer::new(config), Duration::ZERO, move |_, _| {
        respond(
            200,
            &body,
            &[
                ("cache-control", "max-age=60"),
                ("content-type", "text/plain"),
            ],
        )
    });
    send(&h.svc, get("/p", &[])).await;
    let got = send(
        &h.svc,
        get("/p", &[("range", "bytes=0-1"), ("accept-encoding", "gzip")]),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["content-encoding"], "gzip");
    assert_eq!(got.body.len(), 1024, "the stored encoding, whole");
    assert_eq!(h.seen.calls(), 1);
}

#[test]
fn a_hit_is_answered_in_call_even_off_a_runtime() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // Every hit is past the eager-refresh point: each would start a refresh.
    let mut config = HttpCacheConfig::default();
    config.eager_refresh = Some(0.0);
    let h = rt.block_on(async {
        let h = harness(HttpCacheLayer::new(config), Duration::ZERO, |_, n| {
            respond(200, &format!("v{n}"), &[("cache-control", "max-age=600")])
        });
        send(&h.svc, get("/p", &[])).await;
        h
    });
    // No runtime on this thread: the hit is still answered, ready at once.
    let svc = h.svc.clone();
    let status = std::thread::spawn(move || {
        let mut svc = svc;
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let mut future = std::pin::pin!(svc.call(get("/p", &[])));
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(r)) => r.status(),
            _ => panic!("a hit must be ready at once"),
        }
    })
    .join()
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.seen.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hit_with_keep_alive_is_matched_as_the_origin_would_see_it() {
    // Variant B varies on Accept-Encoding; variant A, stored after it, on
    // Connection — recorded without one, since the origin never sees it.
    let h = harness(cache(), Duration::ZERO, |req, _| {
        if req.headers().contains_key("accept-encoding") {
            respond(
                200,
                "B",
                &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
            )
        } else {
            respond(
                200,
                "A",
                &[("cache-control", "max-age=60"), ("vary", "connection")],
            )
        }
    });
    send(&h.svc, get("/p", &[("accept-encoding", "gzip")])).await;
    send(&h.svc, get("/p", &[])).await;
    // With Connection: keep-alive (stripped before the origin), A fits first.
    let got = send(
        &h.svc,
        get(
            "/p",
            &[("connection", "keep-alive"), ("accept-encoding", "gzip")],
        ),
    )
    .await;
    assert_eq!((got.body.as_str(), got.hit()), ("A", true));
}
