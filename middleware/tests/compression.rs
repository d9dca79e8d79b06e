//! Compression: round trips for every codec, negotiation, skips, headers,
//! trailers, and the adaptive level under load.
#![cfg(all(
    feature = "compression-gzip",
    feature = "compression-deflate",
    feature = "compression-br",
    feature = "compression-zstd"
))]
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use gratify::compression::{
    Codec, CompressionConfig, CompressionLayer, CpuScarcity, Level, Levels,
};
use gratify::{CostModel, LoadSignal, LoadSnapshot};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};

fn json(n: usize) -> Bytes {
    let mut s = String::from("[");
    for i in 0..n {
        s.push_str(&format!(
            "{{\"id\":{i},\"name\":\"product {i}\",\"price\":{}.99,\"tags\":[\"a\",\"b\"]}},",
            i % 97
        ));
    }
    s.push(']');
    Bytes::from(s)
}

/// A body of chunks that returns `Pending` before each one, and optional
/// trailers.
struct Chunks {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    pending: bool,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !self.pending {
            self.pending = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pending = false;
        if !self.chunks.is_empty() {
            let c = self.chunks.remove(0);
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

fn decode(codec: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match codec {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "deflate" => {
            flate2::read::ZlibDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(data).unwrap(),
        other => panic!("unknown coding {other}"),
    }
    out
}

async fn fetch<B>(
    layer: CompressionLayer,
    accept: &str,
    make: impl Fn() -> Response<B> + Clone + Send + 'static,
) -> (StatusCode, HeaderMap, Bytes, Option<HeaderMap>)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<gratify::BoxError>,
{
    let svc = layer.layer(service_fn(move |_: Request<()>| {
        let make = make.clone();
        async move { Ok::<_, Infallible>(make()) }
    }));
    let req = Request::get("/")
        .header("accept-encoding", accept)
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (parts.status, parts.headers, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn every_codec_round_trips_both_body_shapes() {
    let data = json(2000);
    for codec in ["gzip", "deflate", "br", "zstd"] {
        // One buffer.
        let d = data.clone();
        let (_, h, body, _) = fetch(CompressionLayer::new(), codec, move || {
            Response::new(Full::new(d.clone()))
        })
        .await;
        assert_eq!(h["content-encoding"], codec);
        assert!(
            body.len() < data.len() / 4,
            "{codec}: {} of {}",
            body.len(),
            data.len()
        );
        assert_eq!(decode(codec, &body), data);

        // A stream of chunks with Pending between them, and trailers.
        let d = data.clone();
        let (_, h, body, trailers) = fetch(CompressionLayer::new(), codec, move || {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", "abc".parse().unwrap());
            Response::new(Chunks {
                chunks: d.chunks(1000).map(Bytes::copy_from_slice).collect(),
                trailers: Some(t),
                pending: false,
            })
        })
        .await;
        assert_eq!(h["content-encoding"], codec);
        assert_eq!(decode(codec, &body), data, "{codec} streamed");
        assert_eq!(trailers.unwrap()["x-checksum"], "abc");
    }
}

#[tokio::test]
async fn negotiation() {
    let data = json(200);
    let d = move || Response::new(Full::new(data.clone()));
    let enc = |h: &HeaderMap| {
        h.get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        enc(&fetch(CompressionLayer::new(), "gzip, br, zstd", d.clone())
            .await
            .1)
        .as_deref(),
        Some("zstd")
    );
    assert_eq!(
        enc(
            &fetch(CompressionLayer::new(), "gzip;q=1, zstd;q=0.5", d.clone())
                .await
                .1
        )
        .as_deref(),
        Some("gzip")
    );
    assert_eq!(
        enc(&fetch(CompressionLayer::new(), "x-gzip", d.clone()).await.1).as_deref(),
        Some("gzip")
    );
    assert_eq!(
        enc(&fetch(CompressionLayer::new(), "*", d.clone()).await.1).as_deref(),
        Some("zstd")
    );
    assert_eq!(
        enc(
            &fetch(CompressionLayer::new().no(Codec::Zstd), "*", d.clone())
                .await
                .1
        )
        .as_deref(),
        Some("br")
    );
    // Nothing acceptable: identity, readable.
    let (st, h, body, _) =
        fetch(CompressionLayer::new(), "compress, identity;q=0", d.clone()).await;
    assert_eq!((st, enc(&h)), (StatusCode::OK, None));
    assert_eq!(body.len(), json(200).len());
    // Garbage: identity, never a panic.
    assert_eq!(
        enc(&fetch(CompressionLayer::new(), "gzip;q=7, ;;;, br;q=-1", d)
            .await
            .1),
        None
    );
}

#[tokio::test]
async fn headers_are_fixed_up() {
    let data = json(200);
    let (_, h, _, _) = fetch(CompressionLayer::new(), "gzip", move || {
        let mut r = Response::new(Full::new(data.clone()));
        r.headers_mut()
            .insert("content-length", "9999".parse().unwrap());
        r.headers_mut()
            .insert("accept-ranges", "bytes".parse().unwrap());
        r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
        r.headers_mut()
            .insert("vary", "Accept-Encoding".parse().unwrap());
        r
    })
    .await;
    assert!(!h.contains_key("content-length") && !h.contains_key("accept-ranges"));
    assert_eq!(h["etag"], "W/\"v1\"");
    assert_eq!(h.get_all("vary").iter().count(), 1, "{h:?}");
}

#[tokio::test]
async fn what_is_left_alone() {
    let big = json(200);
    type Case = (&'static str, &'static str, u16);
    let cases: [Case; 7] = [
        ("content-type", "image/png", 200),
        ("content-encoding", "gzip", 200),
        ("content-range", "bytes 0-9/100", 206),
        ("cache-control", "no-transform", 200),
        ("content-type", "application/grpc", 200),
        ("content-type", "font/woff2", 200),
        ("x-none", "", 304),
    ];
    for (name, value, status) in cases {
        let d = big.clone();
        let (_, h, _, _) = fetch(CompressionLayer::new(), "gzip", move || {
            let mut r = Response::new(Full::new(d.clone()));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            if !value.is_empty() {
                r.headers_mut().insert(name, value.parse().unwrap());
            }
            r
        })
        .await;
        let encoding = h
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        let expected = (name == "content-encoding").then(|| "gzip".to_owned());
        assert_eq!(encoding, expected, "{name}: {value}");
    }
    // Small bodies stay as they are; SVG is compressed.
    let (_, h, _, _) = fetch(CompressionLayer::new(), "gzip", || {
        Response::new(Full::new(Bytes::from_static(b"{\"tiny\":true}")))
    })
    .await;
    assert!(!h.contains_key("content-encoding"));
    let svg = big.clone();
    let (_, h, _, _) = fetch(CompressionLayer::new(), "gzip", move || {
        let mut r = Response::new(Full::new(svg.clone()));
        r.headers_mut()
            .insert("content-type", "image/svg+xml".parse().unwrap());
        r
    })
    .await;
    assert_eq!(h["content-encoding"], "gzip");
}

#[tokio::test]
async fn server_sent_events_are_flushed_per_event() {
    // Each event, once compressed, must be decodable on its own prefix:
    // the encoder flushes after every chunk.
    let events: Vec<Bytes> = (0..3)
        .map(|i| Bytes::from(format!("data: {}\n\n", "x".repeat(2000 + i))))
        .collect();
    let svc = CompressionLayer::new().layer(service_fn(move |_: Request<()>| {
        let events = events.clone();
        async move {
            let mut r = Response::new(Chunks {
                chunks: events,
                trailers: None,
                pending: false,
            });
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    }));
    let req = Request::get("/")
        .header("accept-encoding", "gzip")
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The first frame alone decodes to the whole first event.
    let mut out = Vec::new();
    let mut dec = flate2::read::GzDecoder::new(&first[..]);
    let _ = dec.read_to_end(&mut out);
    assert!(
        out.starts_with(b"data: ") && out.len() >= 2000,
        "{}",
        out.len()
    );
}

fn adaptive_model() -> CostModel {
    CostModel::from_toml(
        r#"
        default_class = "browse"
        [prices]
        cpu_second = 0.001
        byte_sent = 0.00000001
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 0.01 }
        refusal_cost = 1.0
        "#,
    )
    .unwrap()
}

/// Requests queueing at the limiter: a slot-second costs 100 (shadow price
/// 1 per 10 ms).
fn saturated() -> LoadSnapshot {
    LoadSnapshot::new(1.5, Duration::from_millis(200), 1.0).with_latency(Duration::from_millis(10))
}

fn adaptive_layer(signal: &LoadSignal, scarcity: CpuScarcity) -> CompressionLayer {
    let mut config = CompressionConfig::default();
    config.level = Level::Adaptive;
    config.cpu_scarcity = scarcity;
    CompressionLayer::adaptive_with_config(config, &adaptive_model(), signal.clone())
}

#[tokio::test]
async fn adaptive_compresses_harder_when_idle_and_lighter_under_load() {
    let signal = LoadSignal::new();
    // Requests wait for the CPU.
    let layer = adaptive_layer(&signal, CpuScarcity::Always);
    let data = json(3000);
    let d = data.clone();
    let (_, idle, idle_body, _) = fetch(layer.clone(), "gzip, br, zstd", move || {
        Response::new(Full::new(d.clone()))
    })
    .await;
    signal.publish(saturated());
    let d = data.clone();
    let (_, busy, busy_body, _) = fetch(layer, "gzip, br, zstd", move || {
        Response::new(Full::new(d.clone()))
    })
    .await;
    assert!(idle.contains_key("content-encoding"));
    // Under load it compresses less (or not at all) than when idle.
    assert!(
        busy_body.len() > idle_body.len(),
        "busy {} vs idle {}",
        busy_body.len(),
        idle_body.len()
    );
    let _ = busy;
    let _ = (
        Level::Adaptive,
        Levels::default(),
        CompressionConfig::default(),
    );
}

#[tokio::test]
async fn a_queue_for_something_other_than_the_cpu_does_not_lighten_the_level() {
    // The runtime's workers are idle (this test's own thread does nothing
    // else): requests queue at the limiter for something other than the
    // CPU, so saving CPU would only send more bytes.
    let signal = LoadSignal::new();
    let layer = adaptive_layer(&signal, CpuScarcity::Runtime);
    let data = json(3000);
    let d = data.clone();
    let (_, idle, idle_body, _) = fetch(layer.clone(), "gzip, br, zstd", move || {
        Response::new(Full::new(d.clone()))
    })
    .await;
    signal.publish(saturated());
    // Three looks at the runtime, each after a full window of it idle.
    for _ in 0..3 {
        let d = data.clone();
        let (_, queued, queued_body, _) = fetch(layer.clone(), "gzip, br, zstd", move || {
            Response::new(Full::new(d.clone()))
        })
        .await;
        assert_eq!(queued["content-encoding"], idle["content-encoding"]);
        assert_eq!(
            queued_body.len(),
            idle_body.len(),
            "the same level as when idle"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

#[test]
fn a_queue_for_the_cpu_lightens_the_level() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // One worker thread kept busy by a task that never sleeps in the
    // runtime: the requests below wait for the CPU.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hog = {
        let stop = stop.clone();
        rt.spawn(async move {
            // Short polls: tokio publishes a worker's busy time every 61
            // of them, many times in each window.
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
                tokio::task::yield_now().await;
            }
        })
    };
    let signal = LoadSignal::new();
    let layer = adaptive_layer(&signal, CpuScarcity::Runtime);
    let data = json(3000);
    let (idle_body, busy_body) = rt.block_on(async {
        let d = data.clone();
        let (_, _, idle_body, _) = fetch(layer.clone(), "gzip, br, zstd", move || {
            Response::new(Full::new(d.clone()))
        })
        .await;
        signal.publish(saturated());
        // The first look at the runtime starts the gauge; the next, a
        // window later, measures the worker busy all along.
        let mut busy_body = Bytes::new();
        for _ in 0..3 {
            let d = data.clone();
            busy_body = fetch(layer.clone(), "gzip, br, zstd", move || {
                Response::new(Full::new(d.clone()))
            })
            .await
            .2;
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        (idle_body, busy_body)
    });
    stop.store(true, Ordering::Relaxed);
    rt.block_on(hog).unwrap();
    assert!(
        busy_body.len() > idle_body.len(),
        "busy {} vs idle {}",
        busy_body.len(),
        idle_body.len()
    );
}

#[tokio::test]
async fn cached_bodies_are_compressed_once_and_served_in_each_coding() {
    use gratify::cache::{HttpCacheConfig, HttpCacheLayer};
    use gratify::compression::Recompress;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let data = json(3000);
    let calls = Arc::new(AtomicUsize::new(0));
    let origin = {
        let data = data.clone();
        let calls = Arc::clone(&calls);
        service_fn(move |_: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let data = data.clone();
            async move {
                let mut r = Response::new(Full::new(data));
                r.headers_mut()
                    .insert("cache-control", "public, max-age=60".parse().unwrap());
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                Ok::<_, Infallible>(r)
            }
        })
    };
    let mut config = HttpCacheConfig::default();
    config.recoder = Some(Arc::new(Recompress::new()));
    // Compression outside the cache, as the Stack orders them: it must not
    // compress again what the cache serves encoded.
    let svc = CompressionLayer::new().layer(HttpCacheLayer::new(config).layer(origin));
    let get = |accept: &str| {
        let mut b = Request::get("/catalogue").header("host", "shop.example");
        if !accept.is_empty() {
            b = b.header("accept-encoding", accept);
        }
        b.body(()).unwrap()
    };
    for accept in ["zstd", "gzip", "br", "deflate", ""] {
        let res = svc.clone().oneshot(get(accept)).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let coding = parts
            .headers
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        match accept {
            "" => {
                assert_eq!(coding, None);
                assert_eq!(bytes, data);
            }
            c => {
                assert_eq!(coding.as_deref(), Some(c));
                assert_eq!(decode(c, &bytes), data, "{c}");
                assert_eq!(
                    parts.headers["content-length"],
                    bytes.len().to_string().as_str()
                );
            }
        }
        assert!(parts.headers.get_all("vary").iter().count() == 1);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one origin call for every coding"
    );
}

#[tokio::test]
async fn large_slow_chunks_go_to_the_offload_pool_and_small_ones_never() {
    use gratify::offload::CpuPool;

    let pool = CpuPool::new(Some(1), 8);
    let mut config = CompressionConfig::default();
    let mut levels = Levels::default();
    levels.gzip = 9;
    config.level = Level::Fixed(levels);
    config.offload = Some(pool.clone());
    config.offload_above = Duration::ZERO;
    let layer = CompressionLayer::with_config(config);

    // Large chunks (about 60 KiB each), streamed with Pending between them:
    // each goes to the pool, and the result decodes to the input.
    let big = json(4000);
    let d = big.clone();
    let (_, h, body, trailers) = fetch(layer.clone(), "gzip", move || {
        let mut t = HeaderMap::new();
        t.insert("x-checksum", "abc".parse().unwrap());
        Response::new(Chunks {
            chunks: d.chunks(60 * 1024).map(Bytes::copy_from_slice).collect(),
            trailers: Some(t),
            pending: false,
        })
    })
    .await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &body), big);
    assert_eq!(trailers.unwrap()["x-checksum"], "abc");
    let chunks = big.len().div_ceil(60 * 1024) as u64;
    let large_chunks = big
        .chunks(60 * 1024)
        .filter(|c| c.len() >= 32 * 1024)
        .count() as u64;
    assert!(chunks >= 3);
    assert_eq!(
        pool.stats().done,
        large_chunks,
        "one pool job per large chunk"
    );

    // A small body is compressed in place.
    let small = json(100);
    let d = small.clone();
    let (_, h, body, _) = fetch(layer.clone(), "gzip", move || {
        Response::new(Full::new(d.clone()))
    })
    .await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &body), small);
    assert_eq!(pool.stats().done, large_chunks, "no job for a small body");

    // A pool that refuses (shut down): compressed in place, still correct.
    pool.shutdown(Duration::from_secs(1));
    let d = big.clone();
    let (_, _, body, _) = fetch(layer, "gzip", move || Response::new(Full::new(d.clone()))).await;
    assert_eq!(decode("gzip", &body), big);
    assert!(pool.stats().refused >= 1);
}

#[tokio::test]
async fn a_body_dropped_while_its_chunk_waits_on_the_pool_leaves_no_job_behind() {
    use gratify::offload::CpuPool;

    let pool = CpuPool::new(Some(1), 8);
    let mut config = CompressionConfig::default();
    config.offload = Some(pool.clone());
    config.offload_above = Duration::ZERO;
    let svc = CompressionLayer::with_config(config).layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(json(4000))))
    }));
    // Occupy the pool's one thread so the chunk has to wait in the queue.
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let busy = tokio::spawn(pool.run(1.0, None, move || hold.recv_timeout(Duration::from_secs(5))));
    while pool.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    let request = Request::get("/")
        .header("accept-encoding", "gzip")
        .body(())
        .unwrap();
    let mut body = svc.oneshot(request).await.unwrap().into_body();
    // One poll hands the chunk to the pool and waits.
    let first = futures_poll_once(&mut body).await;
    assert!(first.is_none(), "the chunk is waiting on the pool");
    assert_eq!(pool.stats().queued, 1);
    // The client goes away.
    drop(body);
    release.send(()).unwrap();
    busy.await.unwrap().unwrap().unwrap();
    pool.shutdown(Duration::from_secs(1));
    let stats = pool.stats();
    assert_eq!(stats.dropped, 1, "{stats:?}");
    assert_eq!((stats.queued, stats.running), (0, 0));
}

/// Polls `body` for one frame once: `None` when it is pending.
async fn futures_poll_once<B: Body + Unpin>(
    body: &mut B,
) -> Option<Option<Result<Frame<B::Data>, B::Error>>> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(frame) => Some(frame),
            Poll::Pending => None,
        })
    })
    .await
}
