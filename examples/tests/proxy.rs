//! The caching proxy against a real origin on loopback.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use gratify::cache::HttpCacheConfig;
use gratify_examples::proxy;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

async fn origin(calls: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let calls = Arc::clone(&calls);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from(format!(
                            "{} #{n} host={}",
                            req.uri().path(),
                            req.headers()["host"].to_str().unwrap()
                        ))));
                        if req.uri().path() != "/private" {
                            r.headers_mut()
                                .insert("cache-control", "public, max-age=60".parse().unwrap());
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn caches_in_front_of_a_real_origin() {
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = origin(Arc::clone(&calls)).await;
    let upstream_addr = upstream.to_string();
    let listener = proxy::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = proxy::parse_upstream(&format!("http://{upstream}")).unwrap();
    tokio::spawn(proxy::serve(listener, upstream, HttpCacheConfig::default()));

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let get = |path: &str| {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .unwrap();
        let client = client.clone();
        async move {
            let r = client.request(req).await.unwrap();
            let status = r.headers()["cache-status"].to_str().unwrap().to_owned();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (s1, b1) = get("/catalogue").await;
    let (s2, b2) = get("/catalogue").await;
    // Stored (at once, or as the body streamed through).
    assert!(s1.contains("uri-miss"), "{s1}");
    assert!(s2.starts_with("gratify; hit"), "{s2}");
    assert_eq!(b1, b2);
    // The origin sees its own authority, not the proxy's.
    assert!(b1.ends_with(&format!("host={upstream_addr}")), "{b1}");
    let (_, _) = get("/private").await;
    let (s4, _) = get("/private").await;
    assert!(!s4.contains("hit"), "{s4}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// An origin that closes a kept-alive connection when a second request
/// arrives on it, without answering — the race a proxy loses when it reuses
/// a connection the origin is closing.
async fn closing_origin() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = 0;
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if answered == 1 {
                            return; // closes the connection, unanswered
                        }
                        answered += 1;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncache-control: no-store\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_idempotent_request_on_a_connection_the_origin_closed_is_sent_again() {
    let upstream = closing_origin().await;
    let listener = proxy::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = proxy::parse_upstream(&format!("http://{upstream}")).unwrap();
    tokio::spawn(proxy::serve(listener, upstream, HttpCacheConfig::default()));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for path in ["/a", "/b", "/c"] {
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .unwrap();
        let r = client.request(req).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok", "{path}");
    }
}

#[test]
fn upstreams_must_be_absolute_http() {
    assert!(proxy::parse_upstream("http://127.0.0.1:8080").is_ok());
    assert!(proxy::parse_upstream("127.0.0.1:8080").is_err());
    assert!(proxy::parse_upstream("https://example.com").is_err());
    assert!(proxy::parse_upstream("/relative").is_err());
}

/// On a stop, the proxy takes no new connection and lets the request it is
/// serving finish: the client gets its whole answer, and the stop reports
/// one connection open and none cut.
#[tokio::test]
async fn a_stop_lets_the_request_in_flight_finish_and_takes_no_new_one() {
    // An origin that answers only when told to.
    let release = Arc::new(tokio::sync::Notify::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let entered = Arc::new(tokio::sync::Notify::new());
    {
        let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
                        async move {
                            entered.notify_one();
                            release.notified().await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("slow"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    let listener = proxy::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = proxy::parse_upstream(&format!("http://{origin_addr}")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(proxy::serve_until(
        listener,
        upstream,
        HttpCacheConfig::default(),
        proxy::ProxyOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://{addr}/slow").parse().unwrap())
                .await
                .unwrap();
            let status = r.status();
            (status, r.into_body().collect().await.unwrap().to_bytes())
        }
    });
    entered.notified().await;
    stop_tx.send(()).unwrap();
    // The stop has begun: a new connection is refused.
    let mut refused = false;
    for _ in 0..2000 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(refused, "the listener is closed once the stop begins");
    release.notify_one();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.as_ref(), b"slow");
    let stopped = serving.await.unwrap().unwrap();
    assert_eq!(stopped, proxy::Stopped { open: 1, cut: 0 });
}
