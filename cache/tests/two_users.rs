//! Random interleavings of requests by two users and anonymous clients —
//! with and without credentials and cookies, conditional or not, alone or in
//! concurrent bursts — with the clock advancing, entries purged, and an
//! origin that labels personal answers as HTTP says it must (`private`,
//! `no-store`, `Vary`), sometimes starts sessions with `Set-Cookie`,
//! answers `304`s that set cookies or turn a response private, and fails.
//!
//! Whatever the sequence, no client ever receives a body made for another
//! user, nor a cookie set in answer to another client's request.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gratify_cache::{HttpCacheConfig, HttpCacheLayer};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::{Layer, ServiceExt, service_fn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    A,
    B,
    Anon,
}

#[derive(Debug, Clone, Copy)]
enum Cred {
    Cookie,
    Auth,
}

#[derive(Debug, Clone)]
struct Req {
    who: Who,
    cred: Cred,
    path: u8,
    conditional: bool,
    max_stale: bool,
}

#[derive(Debug, Clone)]
enum Op {
    One(Req),
    Burst(Vec<Req>),
    Advance(u16),
    Purge(u8),
}

fn req_strategy() -> impl Strategy<Value = Req> {
    (
        prop_oneof![Just(Who::A), Just(Who::B), Just(Who::Anon)],
        prop_oneof![Just(Cred::Cookie), Just(Cred::Auth)],
        0u8..3,
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(who, cred, path, conditional, max_stale)| Req {
            who,
            cred,
            path,
            conditional,
            max_stale,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => req_strategy().prop_map(Op::One),
        2 => prop::collection::vec(req_strategy(), 2..6).prop_map(Op::Burst),
        3 => (0u16..90).prop_map(Op::Advance),
        1 => (0u8..3).prop_map(Op::Purge),
    ]
}

/// The identity the origin reads from a request.
fn identity(req: &Request<()>) -> String {
    if let Some(auth) = req.headers().get("authorization") {
        return auth
            .to_str()
            .unwrap()
            .trim_start_matches("Bearer ")
            .to_owned();
    }
    if let Some(cookie) = req.headers().get("cookie") {
        let c = cookie.to_str().unwrap();
        if let Some(user) = c.strip_prefix("user=") {
            return user.to_owned();
        }
    }
    "anon".to_owned()
}

/// The origin: `labels` pick, call by call, how it labels its answer.
fn origin_answer(req: &Request<()>, n: usize, label: u8) -> Response<Full<Bytes>> {
    let who = identity(req);
    let path = req.uri().path().to_owned();
    let etag = format!("\"{}-{who}\"", path.trim_start_matches('/'));
    let mut headers: Vec<(&str, String)> = Vec::new();
    let cookie = format!("sid=call{n}");
    let status;
    let body;
    let matches = req
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v.to_str().unwrap().contains(&etag));
    if label % 11 == 10 {
        status = 503;
        body = String::new();
    } else if matches {
        status = 304;
        body = String::new();
        headers.push(("etag", etag));
        match label % 4 {
            0 => headers.push(("set-cookie", cookie)),
            1 => headers.push(("cache-control", "private, max-age=30".to_owned())),
            2 => headers.push(("cache-control", "max-age=30, stale-if-error=60".to_owned())),
            _ => {}
        }
    } else {
        status = 200;
        body = format!("for={who};call={n}");
        if who == "anon" {
            let cc = match label % 6 {
                0 => "public, max-age=20",
                1 => "max-age=5, stale-while-revalidate=60",
                2 => "no-cache",
                3 => "max-age=10, must-revalidate",
                4 => "s-maxage=15, stale-if-error=60",
                _ => "max-age=30, stale-if-error=120",
            };
            headers.push(("cache-control", cc.to_owned()));
            headers.push(("etag", etag));
            if label.is_multiple_of(3) {
                // A session starts: the cookie is this client's alone.
                headers.push(("set-cookie", cookie));
            }
            if label.is_multiple_of(5) {
                headers.push(("vary", "cookie".to_owned()));
            }
        } else {
            // A personal answer, labelled as HTTP says it must be.
            let by_auth = req.headers().contains_key("authorization");
            match (label % 5, by_auth) {
                (0, _) => headers.push(("cache-control", "private, max-age=60".to_owned())),
                (1, _) => headers.push(("cache-control", "no-store".to_owned())),
                (2, true) => {
                    headers.push(("cache-control", "s-maxage=60".to_owned()));
                    headers.push(("vary", "authorization".to_owned()));
                }
                (2, false) | (3, _) => {
                    headers.push(("cache-control", "max-age=60".to_owned()));
                    headers.push(("vary", "cookie, authorization".to_owned()));
                }
                _ => {
                    headers.push(("cache-control", "private, no-cache".to_owned()));
                    headers.push(("etag", etag));
                }
            }
            if label.is_multiple_of(2) {
                headers.push(("set-cookie", cookie));
            }
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(k, v.parse().unwrap());
    }
    r
}

fn request(r: &Req, client: usize, etags: &HashMap<(u8, usize), String>) -> Request<()> {
    let mut b = Request::get(format!("/p{}", r.path))
        .header("host", "shop.example")
        .header("x-client", client.to_string());
    let user = match r.who {
        Who::A => Some("alice"),
        Who::B => Some("bob"),
        Who::Anon => None,
    };
    if let Some(user) = user {
        b = match r.cred {
            Cred::Cookie => b.header("cookie", format!("user={user}")),
            Cred::Auth => b.header("authorization", format!("Bearer {user}")),
        };
    }
    if r.conditional
        && let Some(etag) = etags.get(&(r.path, client % 3))
    {
        b = b.header("if-none-match", etag.as_str());
    }
    if r.max_stale {
        b = b.header("cache-control", "max-stale=600");
    }
    b.body(()).unwrap()
}

fn me(r: &Req) -> &'static str {
    match r.who {
        Who::A => "alice",
        Who::B => "bob",
        Who::Anon => "anon",
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn no_answer_for_one_user_reaches_another(
        labels in prop::collection::vec(any::<u8>(), 1..40),
        ops in prop::collection::vec(op_strategy(), 1..40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            // Which client's request each origin call answered.
            let calls: Arc<Mutex<Vec<String>>> = Arc::default();
            let origin = {
                let calls = Arc::clone(&calls);
                service_fn(move |req: Request<()>| {
                    let n = {
                        let mut c = calls.lock().unwrap();
                        c.push(req.headers()["x-client"].to_str().unwrap().to_owned());
                        c.len() - 1
                    };
                    let response = origin_answer(&req, n, labels[n % labels.len()]);
                    async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, Infallible>(response)
                    }
                })
            };
            let mut config = HttpCacheConfig::default();
            config.fail_safe = Some(Duration::from_secs(30));
            let layer = HttpCacheLayer::new(config);
            let purge = layer.purge();
            let svc = layer.layer(origin);
            let mut etags: HashMap<(u8, usize), String> = HashMap::new();
            let mut client = 0usize;
            for op in ops {
                let batch = match op {
                    Op::Advance(s) => {
                        tokio::time::advance(Duration::from_secs(u64::from(s))).await;
                        continue;
                    }
                    Op::Purge(p) => {
                        purge.purge_key(&format!("http://shop.example/p{p}")).await;
                        continue;
                    }
                    Op::One(r) => vec![r],
                    Op::Burst(rs) => rs,
                };
                let tasks: Vec<_> = batch
                    .into_iter()
                    .map(|r| {
                        client += 1;
                        let request = request(&r, client, &etags);
                        let svc = svc.clone();
                        let id = client;
                        tokio::spawn(async move {
                            let response = svc.oneshot(request).await.unwrap();
                            let (parts, body) = response.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            (r, id, parts, String::from_utf8_lossy(&body).into_owned())
                        })
                    })
                    .collect();
                for t in tasks {
                    let (r, id, parts, body) = t.await.unwrap();
                    // 1. Never a body made for someone else.
                    if let Some(rest) = body.strip_prefix("for=") {
                        let owner = rest.split(';').next().unwrap();
                        assert!(
                            owner == "anon" || owner == me(&r),
                            "{} received a body for {owner}: {r:?} {:?}",
                            me(&r),
                            parts.headers
                        );
                    }
                    // 2. Never a cookie set for another client's request.
                    for cookie in parts.headers.get_all("set-cookie") {
                        let n: usize = cookie
                            .to_str()
                            .unwrap()
                            .trim_start_matches("sid=call")
                            .parse()
                            .unwrap();
                        let asked_by = calls.lock().unwrap()[n].clone();
                        assert_eq!(
                            asked_by,
                            id.to_string(),
                            "client {id} got the cookie set for client {asked_by}'s call {n}"
                        );
                    }
                    if let Some(etag) = parts.headers.get("etag") {
                        etags.insert((r.path, id % 3), etag.to_str().unwrap().to_owned());
                    }
                }
            }
        });
    }
}
