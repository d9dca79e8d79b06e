//! Compression throughput and ratio, gratify against tower-http's
//! `CompressionLayer` at the same codec and level, on deterministic corpora.
//!
//! ```text
//! cargo bench -p gratify --bench compression
//! cargo bench -p gratify --bench compression -- --quick
//! ```
//!
//! Each subject runs in process on one thread: a request through the layer
//! to a handler that returns the corpus, the compressed body collected.
//! Throughput is input megabytes per second of wall time (median of 5 runs);
//! ratio is compressed size over input size. Writes
//! `target/gratify-bench/compression.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use gratify::compression::{Codec, CompressionConfig, CompressionLayer, Level, Levels};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_http::CompressionLevel;

fn api_json(target: usize) -> Bytes {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < target {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        s.push_str(&format!(
            "{{\"id\":{i},\"sku\":\"SKU-{x:06}\",\"name\":\"Product {x}\",\"price\":{}.{:02},\"stock\":{},\"tags\":[\"shoes\",\"sale\"],\"rating\":{}.{}}},",
            x % 500,
            x % 100,
            x % 37,
            x % 5,
            x % 10
        ));
        i += 1;
    }
    s.truncate(target.saturating_sub(1));
    s.push(']');
    Bytes::from(s)
}

fn html_page() -> Bytes {
    let mut s = String::from(
        "<!doctype html><html><head><title>Shop</title><style>body{font-family:sans-serif}</style></head><body><ul>",
    );
    for i in 0..600 {
        s.push_str(&format!(
            "<li class=\"product\"><a href=\"/products/{i}\">Product {i}</a><span class=\"price\">{}.99</span></li>",
            i % 90
        ));
    }
    s.push_str("</ul></body></html>");
    Bytes::from(s)
}

fn corpora() -> Vec<(&'static str, Bytes)> {
    vec![
        ("json-1k", api_json(1024)),
        ("json-10k", api_json(10 * 1024)),
        ("json-100k", api_json(100 * 1024)),
        ("json-1m", api_json(1024 * 1024)),
        ("html", html_page()),
        ("tiny-200b", api_json(200)),
    ]
}

fn handler(
    body: Bytes,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |_: Request<()>| {
        let body = body.clone();
        async move {
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    })
}

fn cacheable(
    body: Bytes,
) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_: Request<()>| {
        let body = body.clone();
        async move {
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r.headers_mut()
                .insert("cache-control", "public, max-age=3600".parse().unwrap());
            Ok::<_, Infallible>(r)
        }
    })
}

/// Requests per second through `svc` for a zstd-accepting client.
async fn requests_per_second<S, B>(svc: S, n: usize) -> f64
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let req = || {
        Request::get("/catalogue")
            .header("host", "bench.example")
            .header("accept-encoding", "zstd")
            .body(())
            .unwrap()
    };
    // Warm (fills the cache).
    let _ = svc
        .clone()
        .oneshot(req())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let r = svc.clone().oneshot(req()).await.unwrap();
        std::hint::black_box(r.into_body().collect().await.unwrap().to_bytes().len());
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// (MB/s, ratio) for `n` requests through `svc`.
async fn measure<S, B>(svc: S, accept: &str, input: usize, n: usize) -> (f64, f64)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut runs = Vec::new();
    let mut out_len = 0;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..n {
            let req = Request::get("/")
                .header("accept-encoding", accept)
                .body(())
                .unwrap();
            let r = svc.clone().oneshot(req).await.unwrap();
            out_len = r.into_body().collect().await.unwrap().to_bytes().len();
        }
        runs.push((input * n) as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    runs.sort_by(f64::total_cmp);
    (runs[2], out_len as f64 / input as f64)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings: [(&str, Codec, i32); 5] = [
        ("gzip", Codec::Gzip, 1),
        ("gzip", Codec::Gzip, 6),
        ("br", Codec::Brotli, 4),
        ("zstd", Codec::Zstd, 1),
        ("zstd", Codec::Zstd, 3),
    ];
    let mut results = Vec::new();
    println!(
        "| corpus | codec | level | tower-http MB/s | gratify MB/s | gratify / tower-http | tower-http ratio | gratify ratio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    runtime.block_on(async {
        for (corpus, body) in corpora() {
            // About 4 MB per run (1 MB in quick mode), at least 20 requests.
            let budget = if quick { 1 << 20 } else { 4 << 20 };
            let n = (budget / body.len()).max(20);
            for (name, codec, level) in settings {
                let tower = tower_http::compression::CompressionLayer::new()
                    .quality(CompressionLevel::Precise(level))
                    .layer(handler(body.clone()));
                let mut levels = Levels::default();
                match codec {
                    Codec::Gzip => levels.gzip = level,
                    Codec::Brotli => levels.brotli = level,
                    Codec::Zstd => levels.zstd = level,
                    _ => levels.deflate = level,
                }
                let mut config = CompressionConfig::default();
                config.level = Level::Fixed(levels);
                let ours = CompressionLayer::with_config(config).layer(handler(body.clone()));
                let (t_speed, t_ratio) = measure(tower, name, body.len(), n).await;
                let (g_speed, g_ratio) = measure(ours, name, body.len(), n).await;
                println!(
                    "| {corpus} | {name} | {level} | {t_speed:.1} | {g_speed:.1} | {:.2} | {t_ratio:.3} | {g_ratio:.3} |",
                    g_speed / t_speed
                );
                for (subject, speed, ratio) in [
                    (format!("tower-http-{name}-{level}"), t_speed, t_ratio),
                    (format!("gratify-{name}-{level}"), g_speed, g_ratio),
                ] {
                    results.push(serde_json::json!({
                        "scenario": corpus,
                        "subject": subject,
                        "metrics": { "mb_per_s": speed, "ratio": ratio },
                    }));
                }
            }
        }
    });
    // Cached-compressed against compress-per-request, 100 KB JSON, zstd.
    let body = api_json(100 * 1024);
    let n = if quick { 300 } else { 1500 };
    let (per_request, cached) = runtime.block_on(async {
        let compress = CompressionLayer::new().layer(handler(body.clone()));
        let mut config = gratify::cache::HttpCacheConfig::default();
        config.recoder = Some(std::sync::Arc::new(gratify::compression::Recompress::new()));
        let cache = gratify::cache::HttpCacheLayer::new(config).layer(cacheable(body.clone()));
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..5 {
            a.push(requests_per_second(compress.clone(), n).await);
            b.push(requests_per_second(cache.clone(), n * 10).await);
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        (a[2], b[2])
    });
    println!("\n| subject | requests/s (100 KB JSON, zstd) | speed-up |");
    println!("|---|---:|---:|");
    println!("| compress per request (zstd 3) | {per_request:.0} | 1.00 |");
    println!(
        "| cached, compressed once | {cached:.0} | {:.1} |",
        cached / per_request
    );
    results.push(serde_json::json!({
        "scenario": "cached-compressed",
        "subject": "gratify",
        "metrics": { "per_request_rps": per_request, "cached_rps": cached, "hit_speedup": cached / per_request },
    }));

    let doc = serde_json::json!({ "bench": "compression", "quick": quick, "commit": common::commit(), "results": results });
    common::write("compression", &doc);
}
