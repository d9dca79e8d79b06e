//! End to end: a server with a `Stack` and its admin service under load; the
//! dashboard opened in headless Chromium renders its charts with live,
//! changing values. A screenshot is saved as `target/gratify-dashboard.png`.
//!
//! Needs `chromium` (Debian's package). Without it the test fails with the
//! command that installs it — unless `GRATIFY_SKIP_BROWSER=1` says to skip
//! it, which it then reports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use gratify::Stack;
use gratify::offload::CpuPool;
use http::Request;
use tower::ServiceExt;

const FILE: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0 }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0 }
refusal_cost = 1.0
[[routes]]
path = "/checkout"
class = "checkout"
[limit]
[compression]
[cache]
"#;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

/// Runs headless Chromium on `url` with `args`, at most 60 s; its stdout.
fn headless(chromium: &Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1280,1000",
            "--virtual-time-budget=6000",
        ])
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

/// The value of `attr` on the first element carrying it.
fn attr(dom: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("{attr}=\""))? + attr.len() + 2;
    Some(dom[at..].split('"').next()?.to_owned())
}

/// The `points` of the polyline of `series` in `chart`.
fn points(dom: &str, chart: &str, series: &str) -> Vec<(f64, f64)> {
    let Some(at) = dom.find(&format!("data-chart=\"{chart}\"")) else {
        return Vec::new();
    };
    let svg = &dom[at..dom[at..].find("</svg>").map_or(dom.len(), |e| at + e)];
    let Some(p) = svg.find(&format!("data-series=\"{series}\"")) else {
        return Vec::new();
    };
    let Some(pts) = attr(&svg[p..], "points") else {
        return Vec::new();
    };
    pts.split_whitespace()
        .filter_map(|xy| {
            let (x, y) = xy.split_once(',')?;
            Some((x.parse().ok()?, y.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_dashboard_renders_live_charts_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var("GRATIFY_SKIP_BROWSER").as_deref() == Ok("1"),
            "no chromium on the PATH: install it (apt-get install -y chromium chromium-driver), \
             or set GRATIFY_SKIP_BROWSER=1 to skip this test"
        );
        eprintln!("GRATIFY_SKIP_BROWSER=1: the dashboard test is skipped");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stack = Stack::from_config(FILE).unwrap();
    let pool = CpuPool::new(Some(1), 64);
    let admin = stack.admin().with_pool("cpu", pool.clone());
    let app: Router = Router::new()
        .route(
            "/checkout",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(3)).await;
                (
                    [
                        ("cache-control", "no-store"),
                        ("content-type", "application/json"),
                    ],
                    "{\"order\":1}".repeat(300),
                )
            }),
        )
        .route(
            "/products",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                (
                    [
                        ("cache-control", "public, max-age=1"),
                        ("content-type", "application/json"),
                    ],
                    "{\"id\":7}".repeat(400),
                )
            }),
        )
        .layer(stack)
        .nest_service("/ops/admin", admin);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = app.clone();
    runtime.spawn(async move { axum::serve(listener, served.into_make_service()).await });
    // Load, in process through the same app: a steady mix of checkouts and
    // product pages, and a CPU job now and then.
    let load = runtime.spawn(async move {
        let mut i = 0u64;
        loop {
            let path = if i.is_multiple_of(3) {
                "/checkout"
            } else {
                "/products"
            };
            let request = Request::get(path)
                .header("host", "shop.example")
                .header("accept-encoding", "gzip")
                .body(axum::body::Body::empty())
                .unwrap();
            let Ok(response) = app.clone().oneshot(request).await;
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            if i.is_multiple_of(10) {
                drop(tokio::spawn(pool.run(1.0, None, || {
                    std::thread::sleep(Duration::from_millis(5));
                })));
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let url = format!("http://127.0.0.1:{port}/ops/admin/");
    let first = headless(&chromium, &url, &["--dump-dom"]);
    std::thread::sleep(Duration::from_secs(1));
    let second = headless(&chromium, &url, &["--dump-dom"]);
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    let shot = target.join("gratify-dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &chromium,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    load.abort();

    for dom in [&first, &second] {
        let samples: u32 = attr(dom, "data-samples").unwrap().parse().unwrap();
        assert!(samples >= 3, "only {samples} snapshots polled");
        for (chart, series) in [
            ("limit", "limit"),
            ("limit", "in flight"),
            ("cost", "checkout"),
            ("cost", "browse"),
            ("shed", "browse"),
        ] {
            let p = points(dom, chart, series);
            assert!(p.len() >= 2, "{chart}/{series}: {p:?}");
        }
        assert!(dom.contains("data-chart=\"cache\""));
        assert!(
            !dom.contains("class=\"stale\""),
            "the page could not read the snapshot"
        );
    }
    // Live: the second page saw more requests admitted than the first.
    let admitted = |dom: &str| -> u64 { attr(dom, "data-admitted").unwrap().parse().unwrap() };
    assert!(
        admitted(&second) > admitted(&first),
        "{} then {}",
        admitted(&first),
        admitted(&second)
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
