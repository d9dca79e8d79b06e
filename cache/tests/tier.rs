//! The shared Redis tier against a real `redis-server` started here on a free
//! port (so it can be killed and restarted). Real time: Redis keeps its own.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gratify_cache::tier::TierConfig;
use gratify_cache::tier::redis::RedisTier;
use gratify_cache::{CachePurge, HttpCacheConfig, HttpCacheLayer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};

/// A `redis-server` of our own, without persistence.
struct Server {
    port: u16,
    child: Option<Child>,
}

impl Server {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self { port, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("no redis-server on the PATH: apt-get install -y redis-server (bash .ci/run installs what the tests need)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sets `key` to `value` directly.
    fn set_raw(&self, key: &str, value: &[u8]) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(&mut conn)
            .unwrap();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Keys under `namespace`, asked directly.
    fn keys(&self, namespace: &str) -> usize {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query(&mut conn)
            .unwrap();
        keys.len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An origin that counts its calls and answers the path, cacheable for a
/// minute and tagged `catalogue`.
fn origin(
    calls: Arc<AtomicU64>,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |r: Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let path = r.uri().path().to_owned();
        async move {
            let mut res = Response::new(Full::new(Bytes::from(format!("page {path}"))));
            res.headers_mut()
                .insert("cache-control", "public, max-age=60".parse().unwrap());
            res.headers_mut()
                .insert("surrogate-key", "catalogue".parse().unwrap());
            Ok(res)
        }
    })
}

/// The tier settings of the tests: a soft timeout of 2 s, so that a slow
/// answer from Redis on a loaded machine never opens the breaker (and
/// skips a write a test waits for). The stalled-Redis test sets its own.
fn tier(namespace: &str) -> TierConfig {
    TierConfig::new(namespace).soft_timeout(Duration::from_secs(2))
}

/// One replica: a cache over `origin`, on the tier at `url`.
fn replica(
    url: &str,
    config: TierConfig,
    calls: &Arc<AtomicU64>,
) -> (
    impl Service<
        Request<()>,
        Response = Response<impl http_body::Body<Data = Bytes, Error: std::fmt::Debug>>,
        Error: std::fmt::Debug,
        Future: Send,
    > + Clone
    + Send
    + 'static,
    CachePurge,
) {
    let tier = RedisTier::open(url).unwrap();
    let layer = HttpCacheLayer::new(HttpCacheConfig::default()).with_tier(tier, config);
    let purge = layer.purge();
    (layer.layer(origin(Arc::clone(calls))), purge)
}

async fn get<S, B>(svc: &S, path: &str) -> (String, String)
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let request = Request::get(path)
        .header("host", "shop.example")
        .body(())
        .unwrap();
    let response = svc.clone().oneshot(request).await.unwrap();
    let status = response
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (String::from_utf8(body.to_vec()).unwrap(), status)
}

/// Waits until every replica's tier is subscribed and has its barriers.
async fn ready(replicas: &[&CachePurge]) {
    let all = || {
        replicas
            .iter()
            .all(|p| p.tier_stats().is_some_and(|s| s.ready))
    };
    assert!(
        wait_for(all, Duration::from_secs(30)).await,
        "tiers not ready"
    );
}

/// Whether, within `limit`, a page fetched by `a` becomes a tier hit on `b`
/// (fresh paths under `prefix`, tried every 100 ms).
async fn tier_used_again<S, B>(
    a: &S,
    b: &S,
    b_purge: &CachePurge,
    prefix: &str,
    limit: Duration,
) -> bool
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let until = Instant::now() + limit;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let path = format!("/{prefix}/{n}");
        let _ = get(a, &path).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = b_purge.tier_stats().unwrap().hits;
        let _ = get(b, &path).await;
        if b_purge.tier_stats().unwrap().hits > before {
            return true;
        }
    }
    false
}

async fn wait_for(mut done: impl FnMut() -> bool, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_on_one_replica_is_a_tier_hit_on_another() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t1"), &calls);
    let (b, b_purge) = replica(&server.url(), tier("t1"), &calls);
    ready(&[&a_purge, &b_purge]).await;
    let (body, status) = get(&a, "/products/7").await;
    assert_eq!(body, "page /products/7");
    assert!(status.contains("stored"), "{status}");
    // The write to Redis happens in the background.
    assert!(wait_for(|| server.keys("t1:e") == 1, Duration::from_secs(30)).await);
    let (body, status) = get(&b, "/products/7").await;
    assert_eq!(body, "page /products/7");
    assert!(status.contains("hit"), "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "B did not call the origin");
    let stats = b_purge.tier_stats().unwrap();
    assert_eq!(stats.hits, 1);
    // And B now holds it in its own L1: the next hit does not ask Redis.
    let _ = get(&b, "/products/7").await;
    assert_eq!(b_purge.tier_stats().unwrap().hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_replica_evicts_on_the_other() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t2"), &calls);
    let (b, b_purge) = replica(&server.url(), tier("t2"), &calls);
    ready(&[&a_purge, &b_purge]).await;
    let _ = get(&a, "/products/7").await;
    assert!(wait_for(|| server.keys("t2:e") == 1, Duration::from_secs(30)).await);
    let _ = get(&b, "/products/7").await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    b_purge.sync().await;
    assert_eq!(b_purge.entry_count(), 1);
    let started = Instant::now();
    a_purge.purge_key("http://shop.example/products/7").await;
    let mut evicted = false;
    // The bound only ends a test that would otherwise hang: how fast it
    // arrives is the tiered bench's to measure.
    while started.elapsed() < Duration::from_secs(30) {
        b_purge.sync().await;
        if b_purge.entry_count() == 0 {
            evicted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(evicted, "B still holds the purged entry");
    let took = started.elapsed();
    assert!(wait_for(|| server.keys("t2:e") == 0, Duration::from_secs(30)).await);
    // The next request on B goes to the origin.
    let (_, status) = get(&b, "/products/7").await;
    assert!(status.contains("fwd=uri-miss"), "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    eprintln!("invalidation reached the other replica in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_reaches_every_replica_and_the_tier() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t3"), &calls);
    let (b, b_purge) = replica(&server.url(), tier("t3"), &calls);
    ready(&[&a_purge, &b_purge]).await;
    let _ = get(&a, "/products/1").await;
    let _ = get(&a, "/products/2").await;
    assert!(wait_for(|| server.keys("t3:e") == 2, Duration::from_secs(30)).await);
    let _ = get(&b, "/products/1").await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    a_purge.purge_tag("catalogue");
    let evicted = wait_for(
        || {
            futures_sync(&b_purge);
            b_purge.entry_count() == 0
        },
        Duration::from_secs(2),
    )
    .await;
    assert!(evicted, "B still holds a purged entry");
    // C starts after the purge and never heard it: it loads the barrier
    // from Redis. The copy of /products/2 in Redis predates it (no index of
    // keys by tag is needed): C goes to the origin.
    let (c, c_purge) = replica(&server.url(), tier("t3"), &calls);
    ready(&[&c_purge]).await;
    let (_, status) = get(&c, "/products/2").await;
    assert!(status.contains("fwd=uri-miss"), "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// Runs moka's pending work without an async context (for `wait_for`).
fn futures_sync(purge: &CachePurge) {
    let purge = purge.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(purge.sync());
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_is_down_at_start_up_delays_nothing() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (a, purge) = replica(&format!("redis://127.0.0.1:{port}"), tier("t4"), &calls);
    for i in 0..50 {
        let (body, _) = get(&a, &format!("/p/{}", i % 5)).await;
        assert_eq!(body, format!("page /p/{}", i % 5));
    }
    // Nothing waited on the tier: it was never ready, its reads were
    // skipped (how fast that is, the tiered bench measures).
    eprintln!(
        "50 requests with the tier down took {:?}",
        started.elapsed()
    );
    // Served from L1 and the origin: five misses, then hits.
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let stats = purge.tier_stats().unwrap();
    assert!(!stats.ready && stats.skipped > 0, "{stats:?}");
    // No read reached the tier: none waited on it.
    assert_eq!((stats.hits, stats.misses), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_10_000_requests_fails_none_and_is_used_again_after_restart() {
    let mut server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t5"), &calls);
    let (b, b_purge) = replica(&server.url(), tier("t5"), &calls);
    ready(&[&a_purge, &b_purge]).await;
    let mut failed = 0;
    for i in 0..10_000u32 {
        if i == 3_000 {
            server.kill();
        }
        if i == 6_000 {
            server.spawn();
        }
        if i % 10 == 0 {
            // About 3 s in all, so that Redis is down for about one.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let svc = if i % 2 == 0 { &a } else { &b };
        // 500 keys, each purged now and then so that misses keep coming.
        let path = format!("/p/{}", i % 500);
        if i % 97 == 0 {
            a_purge
                .purge_key(&format!("http://shop.example{path}"))
                .await;
        }
        let request = Request::get(&path)
            .header("host", "shop.example")
            .body(())
            .unwrap();
        match svc.clone().oneshot(request).await {
            Ok(r) if r.status().is_success() => {
                let body = r.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], format!("page {path}").as_bytes());
            }
            _ => failed += 1,
        }
    }
    assert_eq!(failed, 0);
    let down = b_purge.tier_stats().unwrap();
    assert!(down.errors > 0 || down.skipped > 0, "{down:?}");
    // After the restart the tier is in use again: a miss on A is a tier hit
    // on B. (How soon is the benchmark's to measure; a busy machine only
    // delays it, so the bound here is a generous one.)
    let back = tier_used_again(&a, &b, &b_purge, "fresh", Duration::from_secs(60)).await;
    assert!(back, "the tier was not used again after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_tier_is_a_miss() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t6"), &calls);
    ready(&[&a_purge]).await;
    server.set_raw("t6:e:http://shop.example/products/7", b"not an envelope");
    server.set_raw("t6:e:http://shop.example/products/8", b"GRT\x01\xff\xff");
    for path in ["/products/7", "/products/8"] {
        let (body, status) = get(&a, path).await;
        assert_eq!(body, format!("page {path}"));
        assert!(status.contains("fwd=uri-miss"), "{status}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = a_purge.tier_stats().unwrap();
    assert_eq!((stats.misses, stats.hits), (2, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_requests_at_most_the_soft_timeout_and_is_used_again() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let stalled = || TierConfig::new("t7").soft_timeout(Duration::from_millis(50));
    let (a, a_purge) = replica(&server.url(), stalled(), &calls);
    let (b, b_purge) = replica(&server.url(), stalled(), &calls);
    ready(&[&a_purge, &b_purge]).await;
    server.signal("STOP");
    let mut worst = Duration::ZERO;
    for i in 0..200 {
        let started = Instant::now();
        let (body, _) = get(&a, &format!("/slow/{i}")).await;
        worst = worst.max(started.elapsed());
        assert_eq!(body, format!("page /slow/{i}"));
    }
    let stats = a_purge.tier_stats().unwrap();
    server.signal("CONT");
    // The soft timeout here is 50 ms; three failures open the breaker. A
    // request that waited on the stopped Redis would wait for good: any
    // bound proves it did not (a generous one, for a loaded machine).
    assert!(worst < Duration::from_secs(5), "{worst:?}");
    assert!(stats.breaker_open && stats.skipped > 150, "{stats:?}");
    // Awake again, the breaker lets a trial through and closes.
    let back = tier_used_again(&a, &b, &b_purge, "awake", Duration::from_secs(15)).await;
    assert!(back, "the tier was not used again after SIGCONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_without_the_key_cannot_poison_signing_replicas() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let signed = || tier("t8").sign_with(b"shared secret");
    let (intruder, i_purge) = replica(&server.url(), tier("t8"), &calls);
    let (a, a_purge) = replica(&server.url(), signed(), &calls);
    let (b, b_purge) = replica(&server.url(), signed(), &calls);
    ready(&[&i_purge, &a_purge, &b_purge]).await;
    // An unsigned entry written by a replica without the key is refused.
    let _ = get(&intruder, "/products/1").await;
    assert!(wait_for(|| server.keys("t8:e") == 1, Duration::from_secs(30)).await);
    let (_, status) = get(&a, "/products/1").await;
    assert!(status.contains("fwd=uri-miss"), "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(a_purge.tier_stats().unwrap().misses, 1);
    // A signed one is shared between the replicas that hold the key.
    let _ = get(&a, "/products/2").await;
    assert!(wait_for(|| server.keys("t8:e") == 2, Duration::from_secs(30)).await);
    let (_, status) = get(&b, "/products/2").await;
    assert!(status.contains("hit"), "{status}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_command_after_a_dropped_connection_fails_no_request() {
    // redis-rs #1415: after an idle disconnect the first command fails.
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t9"), &calls);
    let (b, b_purge) = replica(&server.url(), tier("t9"), &calls);
    ready(&[&a_purge, &b_purge]).await;
    let _ = get(&a, "/products/1").await;
    assert!(wait_for(|| server.keys("t9:e") == 1, Duration::from_secs(30)).await);
    // Redis drops every client connection, as an idle timeout or a
    // failover would.
    {
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query(&mut conn);
    }
    // Every request succeeds, whatever the first command after it met.
    for i in 0..20 {
        let (body, _) = get(&b, &format!("/products/{}", 1 + i % 2)).await;
        assert_eq!(body, format!("page /products/{}", 1 + i % 2));
    }
    // And the tier is in use again soon after.
    let back = tier_used_again(&a, &b, &b_purge, "again", Duration::from_secs(30)).await;
    assert!(
        back,
        "the tier was not used again after the connections dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_overtaken_by_another_replicas_invalidation_stores_nothing() {
    let server = Server::start();
    let calls = Arc::new(AtomicU64::new(0));
    let (a, a_purge) = replica(&server.url(), tier("t9"), &calls);
    // Replica B's origin answers only when the test lets it.
    let gate = Arc::new(tokio::sync::Notify::new());
    let b_origin = {
        let gate = Arc::clone(&gate);
        service_fn(move |_: Request<()>| {
            let gate = Arc::clone(&gate);
            async move {
                gate.notified().await;
                let mut res = Response::new(Full::new(Bytes::from("before the change")));
                res.headers_mut()
                    .insert("cache-control", "public, max-age=60".parse().unwrap());
                Ok::<_, Infallible>(res)
            }
        })
    };
    let layer = HttpCacheLayer::new(HttpCacheConfig::default())
        .with_tier(RedisTier::open(&server.url()).unwrap(), tier("t9"));
    let b_purge = layer.purge();
    let b = layer.layer(b_origin);
    ready(&[&a_purge, &b_purge]).await;
    // B starts a fill; while it is at the origin, A changes the page.
    let fill = tokio::spawn({
        let b = b.clone();
        async move { get(&b, "/products/7").await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let put = Request::put("/products/7")
        .header("host", "shop.example")
        .body(())
        .unwrap();
    let _ = a.clone().oneshot(put).await.unwrap();
    // B hears of it; only then does its origin answer.
    let heard = || b_purge.tier_stats().is_some_and(|s| s.invalidations > 0);
    assert!(
        wait_for(heard, Duration::from_secs(10)).await,
        "B never heard"
    );
    gate.notify_one();
    let (body, _) = fill.await.unwrap();
    assert_eq!(body, "before the change", "its own client is answered");
    // What it got predates the change: not kept on B, not written to the tier.
    b_purge.sync().await;
    assert_eq!(b_purge.entry_count(), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.keys("t9:e"), 0);
}
