//! The demo harness: an app served on loopback, plain and wrapped in
//! gratify, the same traffic sent to each, and the report as a table, JSON
//! and an SVG plot.
//!
//! Each server runs on a runtime of its own (so a handler that blocks its
//! threads cannot stall the driver's clock) and is stopped, connections and
//! all, before the next run starts: the second app never inherits the
//! first one's backlog.
//!
//! ```
//! use gratify_examples::demo::plot;
//! use gratify_examples::drive::{ClassReport, Report};
//!
//! let mut plain = Report::default();
//! plain.classes.insert("checkout".into(), ClassReport { sent: 10, ok: 2, success: 0.2, ..Default::default() });
//! let mut wrapped = plain.clone();
//! let c = wrapped.classes.get_mut("checkout").unwrap();
//! (c.ok, c.late, c.success) = (10, 1, 1.0);
//! let svg = plot("at 3×", &plain, &wrapped);
//! assert!(svg.starts_with("<svg") && svg.contains("checkout"));
//! assert!(svg.contains(">20.0%<") && svg.contains(">90.0%<"), "in time: 2 of 10, 9 of 10");
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use gratify::CostModel;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tower::{Service, ServiceExt};

use crate::drive::{Load, Mix, Report, drive};

/// An app served on `127.0.0.1` by a runtime of its own.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Server {
    /// Dropped without [`stop`](Server::stop) (a panic, an early return):
    /// shut down without waiting, which is allowed inside a runtime.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Server {
    /// Serves `app` on a free port with `threads` worker threads.
    ///
    /// # Errors
    ///
    /// No runtime or no port.
    pub fn start(app: Router, threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("demo-server")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        runtime.spawn(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let _ = axum::serve(listener, app.into_make_service()).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot serve"),
            }
        });
        Ok(Self {
            addr,
            runtime: Some(runtime),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and waits (at most
    /// `deadline`) for the work in flight on its blocking threads.
    pub async fn stop(mut self, deadline: Duration) {
        if let Some(runtime) = self.runtime.take() {
            let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(deadline)).await;
        }
    }
}

/// A hyper client of the server at `addr`, as a tower service of requests
/// with relative URIs.
pub fn client(
    addr: SocketAddr,
    connections: usize,
) -> impl Service<
    Request<Body>,
    Response = http::Response<hyper::body::Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future: Send,
> + Clone
+ Send
+ 'static {
    let http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http::<Body>();
    tower::ServiceBuilder::new()
        .map_request(move |mut r: Request<Body>| {
            if let Ok(uri) = format!("http://{addr}{}", r.uri()).parse() {
                *r.uri_mut() = uri;
            }
            r
        })
        .service(http)
}

/// Sends `mix` to the server at `addr` with `load` — its requests, and its
/// game players if it has any, at the same time — and reports both: the
/// players' moves as class `state`, their purchases as `purchase`, and the
/// ticks they saw.
pub async fn drive_at(
    addr: SocketAddr,
    connections: usize,
    mix: &Mix,
    model: &CostModel,
    load: Load,
    bar: &(dyn Fn(f64) + Sync),
) -> Report {
    let svc = client(addr, connections);
    let Some(players) = mix.players else {
        return drive(svc, mix, model, load, bar).await;
    };
    let (mut report, played) = tokio::join!(
        drive(svc, mix, model, load, bar),
        crate::play::play(addr, players, load.seconds, model)
    );
    report.total_cost += played.moves.cost + played.purchases.cost;
    report.classes.insert("state".into(), played.moves);
    report.classes.insert("purchase".into(), played.purchases);
    report.ticks = Some(played.ticks);
    report
}

/// Arrivals of `mix` per second the server at `addr` completes, closed loop
/// with `concurrency` clients, over `seconds` after a second of warm-up.
pub async fn capacity(addr: SocketAddr, mix: &Mix, seconds: f64, concurrency: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc = client(addr, concurrency as usize);
    // Signed in before the clock starts.
    let signed = match crate::drive::sign_in(&svc, mix).await {
        Ok(signed) => signed,
        Err(e) => {
            eprintln!("capacity probe: signing in failed ({e}); its calls go as no one's");
            Arc::default()
        }
    };
    let start = tokio::time::Instant::now();
    let until = start + Duration::from_secs_f64(1.0 + seconds);
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let svc = svc.clone();
        let mix = mix.clone();
        let signed = Arc::clone(&signed);
        let done = Arc::clone(&done);
        let counting = Arc::clone(&counting);
        workers.push(tokio::spawn(async move {
            let mut n = w;
            while tokio::time::Instant::now() < until {
                let pick = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let Some(kind) = mix.pick((pick >> 11) as f64 / (1u64 << 53) as f64) else {
                    return;
                };
                let calls = (kind.build)(n + 1_000_000, pick);
                let lent = calls
                    .iter()
                    .any(|c| c.signed_in)
                    .then(|| signed.lend())
                    .flatten();
                for call in calls {
                    let token = lent.as_ref().map(crate::drive::Lent::token);
                    let Ok(request) = call.request_as(&mix.host, token) else {
                        continue;
                    };
                    if let Ok(r) = svc.clone().oneshot(request).await {
                        let _ = r.into_body().collect().await;
                    }
                }
                if counting.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n += concurrency;
            }
        }));
    }
    tokio::time::sleep_until(start + Duration::from_secs(1)).await;
    counting.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    done.load(Ordering::Relaxed) as f64 / seconds
}

/// A progress bar on standard error, redrawn as it grows.
pub fn progress_bar(label: impl Into<String>) -> impl Fn(f64) + Sync {
    let label = label.into();
    let shown = AtomicUsize::new(usize::MAX);
    move |f: f64| {
        let filled = (f.clamp(0.0, 1.0) * 30.0) as usize;
        if shown.swap(filled, Ordering::Relaxed) == filled && f < 1.0 {
            return;
        }
        eprint!(
            "\r{label} [{}{}] {:>3.0}%",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            f * 100.0
        );
        let _ = std::io::stderr().flush();
        if f >= 1.0 {
            eprintln!();
        }
    }
}

/// How a comparison runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The load, as a multiple of the plain app's measured capacity.
    pub multiple: f64,
    /// Seconds of traffic per app.
    pub seconds: f64,
    /// Seconds of the capacity probe.
    pub probe_seconds: f64,
    /// The seed of the traffic.
    pub seed: u64,
    /// Worker threads of each server.
    pub server_threads: usize,
    /// Connections the driver may hold open (arrivals past it wait, and the
    /// wait counts in their latency).
    pub connections: usize,
    /// How long an arrival may take before it counts as failed.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            multiple: 3.0,
            seconds: 15.0,
            probe_seconds: 3.0,
            seed: 7,
            server_threads: 2,
            connections: 4096,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the capacity probe measured of the plain app, for sizing a
/// contender (a concurrency limit, say).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Probe {
    /// Arrivals per second it completes with 32 clients.
    pub capacity_per_s: f64,
    /// Seconds an arrival takes with one client (no queueing).
    pub service_s: f64,
}

impl Probe {
    /// The concurrency at the knee of the throughput curve (Little's law:
    /// capacity × service time, rounded up, at least 1) — what a concurrency
    /// limit sized from this probe admits.
    pub fn knee(&self) -> usize {
        let n = (self.capacity_per_s * self.service_s).ceil();
        if n.is_finite() && n >= 1.0 {
            n as usize
        } else {
            1
        }
    }
}

/// A contender besides the plain app and gratify: its name, what it is,
/// and how it is built around the plain app from the probe.
pub struct Contender {
    /// Its name in the report (`tower`).
    pub name: String,
    /// Builds it from the probe: the router and a description of its set-up.
    pub build: Box<dyn FnOnce(&Probe) -> (Router, serde_json::Value) + Send>,
}

impl std::fmt::Debug for Contender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contender")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a comparison measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Arrivals per second the plain app completed in the probe.
    pub capacity_per_s: f64,
    /// The probe.
    pub probe: Probe,
    /// The multiple of it sent.
    pub multiple: f64,
    /// Arrivals per second sent to each app.
    pub rate: f64,
    /// The plain app's report.
    pub plain: Report,
    /// The other contenders' reports, with their set-up, in the order run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<Other>,
    /// The wrapped app's report.
    pub gratify: Report,
}

/// A contender's report.
#[derive(Debug, Clone, Serialize)]
pub struct Other {
    /// Its name.
    pub name: String,
    /// How it was set up.
    pub setup: serde_json::Value,
    /// What it did.
    pub report: Report,
}

impl Outcome {
    /// Every app's report in the order run: plain, the others, gratify.
    pub fn all(&self) -> Vec<(&str, &Report)> {
        std::iter::once(("plain", &self.plain))
            .chain(self.others.iter().map(|o| (o.name.as_str(), &o.report)))
            .chain(std::iter::once(("gratify", &self.gratify)))
            .collect()
    }
}

/// Probes the plain app's capacity, then sends the same open-loop traffic
/// at `options.multiple` of it to the plain app and then to the wrapped one,
/// each served on its own runtime and stopped after its run.
///
/// # Errors
///
/// A server cannot start, or the plain app completes nothing in the probe.
pub async fn compare(
    plain: Router,
    wrapped: Router,
    mix: &Mix,
    model: &CostModel,
    options: Options,
    progress: bool,
) -> std::io::Result<Outcome> {
    compare_with(plain, Vec::new(), wrapped, mix, model, options, progress).await
}

/// [`compare`] with other contenders, each built from the probe and run
/// between the plain app and the wrapped one.
///
/// # Errors
///
/// A server cannot start, or the plain app completes nothing in the probe.
pub async fn compare_with(
    plain: Router,
    others: Vec<Contender>,
    wrapped: Router,
    mix: &Mix,
    model: &CostModel,
    options: Options,
    progress: bool,
) -> std::io::Result<Outcome> {
    let server = Server::start(plain, options.server_threads)?;
    let capacity_per_s = capacity(server.addr(), mix, options.probe_seconds, 32).await;
    if capacity_per_s <= 0.0 {
        return Err(std::io::Error::other(
            "the plain app completed nothing in the capacity probe",
        ));
    }
    // One client, no queueing: the time an arrival takes on its own (only
    // when someone sizes a contender from it).
    let service_s = if others.is_empty() {
        f64::NAN
    } else {
        1.0 / capacity(server.addr(), mix, options.probe_seconds.min(2.0), 1)
            .await
            .max(1e-9)
    };
    let probe = Probe {
        capacity_per_s,
        service_s,
    };
    let rate = capacity_per_s * options.multiple;
    if progress {
        eprintln!(
            "demo: the plain app completes about {capacity_per_s:.0} arrivals/s of the mix; sending {rate:.0}/s ({}×) for {} s to each",
            options.multiple, options.seconds
        );
    }
    let load = Load {
        rate,
        seconds: options.seconds,
        timeout: options.timeout,
        seed: options.seed,
        max_in_flight: options.connections,
    };
    let quiet = |_: f64| {};
    let bar_plain = progress_bar("plain  ");
    let bar_gratify = progress_bar("gratify");
    let (p, g): (&(dyn Fn(f64) + Sync), &(dyn Fn(f64) + Sync)) = if progress {
        (&bar_plain, &bar_gratify)
    } else {
        (&quiet, &quiet)
    };
    // Drives the app on `server`, then stops it with everything in flight.
    async fn drive_on(
        server: Server,
        mix: &Mix,
        model: &CostModel,
        load: Load,
        connections: usize,
        bar: &(dyn Fn(f64) + Sync),
    ) -> Report {
        let report = drive_at(server.addr(), connections, mix, model, load, bar).await;
        server.stop(Duration::from_secs(10)).await;
        report
    }
    let plain_report = drive_on(server, mix, model, load, options.connections, p).await;
    let mut reports = Vec::new();
    for other in others {
        let (router, setup) = (other.build)(&probe);
        if progress {
            eprintln!("demo: {}: {setup}", other.name);
        }
        let server = Server::start(router, options.server_threads)?;
        let bar = progress_bar(format!("{:<7}", other.name));
        let bar: &(dyn Fn(f64) + Sync) = if progress { &bar } else { &quiet };
        let report = drive_on(server, mix, model, load, options.connections, bar).await;
        reports.push(Other {
            name: other.name,
            setup,
            report,
        });
    }
    let server = Server::start(wrapped, options.server_threads)?;
    if progress {
        eprintln!(
            "demo: gratify's dashboard: http://{}/ops/admin/",
            server.addr()
        );
    }
    let gratify_report = drive_on(server, mix, model, load, options.connections, g).await;
    Ok(Outcome {
        capacity_per_s,
        probe,
        multiple: options.multiple,
        rate,
        plain: plain_report,
        others: reports,
        gratify: gratify_report,
    })
}

/// The report as an SVG picture: per class, the share answered in time and
/// the p99 latency of the plain app beside the wrapped one's.
pub fn plot(title: &str, plain: &Report, gratify: &Report) -> String {
    plot_all(title, &[("plain", plain), ("gratify", gratify)])
}

/// Colours of the apps in a plot: the plain app grey, gratify blue, others
/// in turn.
fn colour(name: &str, i: usize) -> &'static str {
    match name {
        "plain" => "#b0b0b0",
        "gratify" => "#2a7de1",
        _ => ["#e1942a", "#3aa655", "#a03ad0"][i % 3],
    }
}

/// [`plot`] for any number of apps, in the order given.
pub fn plot_all(title: &str, apps: &[(&str, &Report)]) -> String {
    // Written by hand rather than with plotters (which the benchmarks
    // use): two panels of labelled bars are a few dozen lines of SVG, and
    // the examples — what a reader builds first — stay without a plotting
    // stack and its dependencies.
    use std::fmt::Write as _;
    let classes: Vec<&String> = {
        let mut c: Vec<&String> = apps.iter().flat_map(|(_, r)| r.classes.keys()).collect();
        c.sort();
        c.dedup();
        c
    };
    let n = apps.len().max(1) as f64;
    let (width, panel_h, top, left) = (760.0_f64, 220.0_f64, 70.0_f64, 70.0_f64);
    let height = top + 2.0 * (panel_h + 60.0) + 30.0;
    let plot_w = width - left - 30.0;
    let group = plot_w / classes.len().max(1) as f64;
    let bar = (group * 0.64 / n).min(60.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
"##,
        width / 2.0,
        escape(title),
    );
    let legend_w = 120.0;
    let legend_x = width / 2.0 - legend_w * n / 2.0;
    for (i, (name, _)) in apps.iter().enumerate() {
        let x = legend_x + i as f64 * legend_w;
        let label = match *name {
            "plain" => "plain app".to_owned(),
            "gratify" => "behind gratify".to_owned(),
            other => format!("behind {other}"),
        };
        let _ = writeln!(
            svg,
            r##"<rect x="{x:.1}" y="34" width="12" height="12" fill="{}"/><text x="{:.1}" y="45">{}</text>"##,
            colour(name, i),
            x + 16.0,
            escape(&label)
        );
    }
    let max_p99 = apps
        .iter()
        .flat_map(|(_, r)| r.classes.values())
        .map(|c| c.p99_ms)
        .fold(1.0_f64, f64::max);
    let panels: [(
        &str,
        Box<dyn Fn(&crate::drive::ClassReport) -> f64>,
        f64,
        String,
    ); 2] = [
        (
            "answered in time (success before the class's deadline)",
            Box::new(|c| c.ok.saturating_sub(c.late) as f64 / c.sent.max(1) as f64),
            1.0,
            "100%".to_owned(),
        ),
        (
            "p99 latency of the successes",
            Box::new(|c| c.p99_ms),
            max_p99,
            format!("{max_p99:.0} ms"),
        ),
    ];
    for (i, (name, value, max, max_label)) in panels.iter().enumerate() {
        let y0 = top + 20.0 + i as f64 * (panel_h + 60.0);
        let base = y0 + panel_h;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-weight="bold">{name}</text>
<line x1="{left}" y1="{base}" x2="{}" y2="{base}" stroke="black"/>
<line x1="{left}" y1="{y0}" x2="{left}" y2="{base}" stroke="black"/>
<text x="{}" y="{}" text-anchor="end">{max_label}</text><text x="{}" y="{base}" text-anchor="end">0</text>
<line x1="{left}" y1="{y0}" x2="{}" y2="{y0}" stroke="#dddddd"/>
"##,
            left - 60.0,
            y0 - 20.0,
            left + plot_w,
            left - 4.0,
            y0 + 4.0,
            left - 4.0,
            left + plot_w,
        );
        for (k, class) in classes.iter().enumerate() {
            let gx = left + k as f64 * group + group / 2.0;
            let first = gx - (bar + 4.0) * n / 2.0 + 2.0;
            for (j, (app, report)) in apps.iter().enumerate() {
                let Some(c) = report.classes.get(*class) else {
                    continue;
                };
                let v = value(c);
                let h = if *max > 0.0 {
                    (v / max).clamp(0.0, 1.0) * panel_h
                } else {
                    0.0
                };
                let x = first + j as f64 * (bar + 4.0);
                let label = if i == 0 {
                    format!("{:.1}%", v * 100.0)
                } else {
                    format!("{v:.0}")
                };
                let _ = writeln!(
                    svg,
                    r##"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{label}</text>"##,
                    base - h,
                    colour(app, j),
                    x + bar / 2.0,
                    base - h - 3.0,
                );
            }
            let _ = writeln!(
                svg,
                r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                base + 16.0,
                escape(class)
            );
        }
    }
    let costs: Vec<String> = apps
        .iter()
        .map(|(name, r)| format!("{} {:.0}", escape(name), r.total_cost))
        .collect();
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" font-size="11">total cost by the model: {}</text>
</svg>
"##,
        width / 2.0,
        height - 10.0,
        costs.join(", ")
    );
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::Probe;

    #[test]
    fn the_knee_is_capacity_times_service_time_rounded_up_and_never_zero() {
        let knee = |capacity_per_s, service_s| {
            Probe {
                capacity_per_s,
                service_s,
            }
            .knee()
        };
        assert_eq!(knee(900.0, 0.0023), 3);
        assert_eq!(knee(1000.0, 0.002), 2);
        assert_eq!(knee(10.0, 0.001), 1);
        assert_eq!(knee(0.0, 1.0), 1);
        assert_eq!(knee(f64::NAN, 1.0), 1);
        assert_eq!(knee(f64::INFINITY, 1.0), 1);
    }
}
