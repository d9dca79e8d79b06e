//! The overload benchmark: every contender through the same pre-drawn
//! arrivals of each scenario, on tokio's paused clock.
//!
//! ```text
//! cargo bench -p gratify-benches --bench overload                 # full
//! cargo bench -p gratify-benches --bench overload -- --quick      # phases ×0.1
//! cargo bench -p gratify-benches --bench overload -- --scenario my.toml --seed 7
//! cargo bench -p gratify-benches --bench overload -- --quick --only rare-export
//! cargo bench -p gratify-benches --bench overload -- --series     # also CSV series
//! ```
//!
//! Writes `target/gratify-bench/overload.json` (or `$GRATIFY_BENCH_DIR`),
//! prints markdown tables, and draws SVG plots into `docs/img/`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant as WallClock;

use congestion_limiter::limiter::{DefaultLimiter, Limiter as ClLimiter, Outcome as ClOutcome};
use congestion_limiter::limits::{
    Aimd as ClAimd, Gradient as ClGradient, LimitAlgorithm, Vegas as ClVegas,
};
use gratify_core::classify::classify_fn;
use gratify_core::{ClassId, CostModel};
use gratify_scaling::limit::{
    AdaptiveLimitLayer, Admission, Aimd, Algorithm, DelayCostLimit, Fixed, Gradient2, Limiter,
    LimiterConfig, Reason, Vegas, Windowed,
};
use gratify_scaling::sim::{
    self, Arrival, Evaluation, Figures, Job, RunResult, Scenario, SimServer,
};
use http::{Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

/// The overload benchmark: every contender on the scenario library.
#[derive(Debug, clap::Parser)]
#[command(name = "overload")]
struct Args {
    /// Phases ×0.1: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Also write each run's time series.
    #[arg(long)]
    series: bool,
    /// The seed of the arrivals and service times.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A scenario file of your own, instead of the library (repeatable).
    #[arg(long = "scenario")]
    scenarios: Vec<PathBuf>,
    /// Library scenarios to run (repeatable; all when none).
    #[arg(long)]
    only: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn args() -> Args {
    <Args as clap::Parser>::parse()
}

/// The classifier every gratify contender uses: the class is on the job.
fn job_class(r: &Request<Job>) -> ClassId {
    r.body().class
}

fn gratify(
    scenario: &Scenario,
    model: &CostModel,
    workload: &[Arrival],
    algorithm: impl Algorithm,
    config: LimiterConfig,
) -> RunResult {
    let limiter = Limiter::with_algorithm(model, algorithm, config);
    let probe = limiter.clone();
    let after = limiter.clone();
    let result = sim::run(
        scenario,
        model,
        workload,
        |server| {
            AdaptiveLimitLayer::with_limiter(limiter)
                .classify_with(classify_fn(job_class))
                .layer(server)
        },
        move || Some(probe.stats().limit),
    );
    if after.algorithm_name() == "delay-cost" {
        // What the limiter decided, by class and reason.
        let stats = after.stats();
        for (id, name, _) in model.iter() {
            let c = &stats.classes[id.index()];
            let reasons: Vec<String> = Reason::ALL
                .iter()
                .filter(|r| c.shed_for(**r) > 0)
                .map(|r| format!("{} {}", r.as_str(), c.shed_for(*r)))
                .collect();
            eprintln!(
                "{}: delay-cost {name}: admitted {}, shed {} ({})",
                scenario.name,
                c.admitted,
                c.shed_total(),
                reasons.join(", ")
            );
        }
    }
    result
}

fn reject_at_limit() -> LimiterConfig {
    let mut c = LimiterConfig::default();
    c.admission = Admission::RejectAtLimit;
    c
}

fn partitioned(
    scenario: &Scenario,
    model: &CostModel,
    shares: &[(&str, f64)],
) -> Option<LimiterConfig> {
    let mut by_id = vec![0.0; model.len()];
    for (name, share) in shares {
        by_id[model.id(name)?.index()] = *share;
    }
    // Every class of the scenario must be named.
    if scenario.classes.len() != shares.len() {
        return None;
    }
    let mut c = LimiterConfig::default();
    c.admission = Admission::Partitioned(by_id);
    Some(c)
}

/// congestion-limiter behind a small tower adapter: try to acquire a token,
/// refuse with 503 if none, release it with the outcome.
struct ClService<L> {
    limiter: Arc<L>,
    inner: SimServer,
}

impl<L> Clone for ClService<L> {
    fn clone(&self) -> Self {
        Self {
            limiter: Arc::clone(&self.limiter),
            inner: self.inner.clone(),
        }
    }
}

impl<L> Service<Request<Job>> for ClService<L>
where
    L: ClLimiter + Send + Sync + 'static,
{
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Job>) -> Self::Future {
        let limiter = Arc::clone(&self.limiter);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let Some(token) = limiter.try_acquire().await else {
                let mut r = Response::new(());
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return Ok(r);
            };
            let response = inner.call(request).await?;
            let outcome = if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                ClOutcome::Overload
            } else {
                ClOutcome::Success
            };
            limiter.release(token, Some(outcome)).await;
            Ok(response)
        })
    }
}

fn congestion_limiter<A>(
    scenario: &Scenario,
    model: &CostModel,
    workload: &[Arrival],
    algo: A,
) -> RunResult
where
    A: LimitAlgorithm + Send + Sync + std::fmt::Debug + 'static,
{
    let limiter = Arc::new(DefaultLimiter::new(algo));
    let probe = Arc::clone(&limiter);
    sim::run(
        scenario,
        model,
        workload,
        |server| ClService {
            limiter,
            inner: server,
        },
        move || Some(probe.state().limit()),
    )
}

/// Netflix defaults but a minimum limit of 1: the defaults' minimum of 20
/// is above this server's knee (16), which would make the comparison moot.
fn netflix_min_one() -> (Aimd, Vegas, Gradient2) {
    (
        Aimd::new().limits(1, 200),
        Vegas::new(),
        Gradient2::new().limits(1, 200),
    )
}

struct Subject {
    name: String,
    result: Option<RunResult>,
    note: String,
}

fn run_all(scenario: &Scenario, workload: &[Arrival], quick: bool) -> (Vec<Subject>, usize) {
    let model = scenario.model().unwrap();
    let mut subjects = Vec::new();
    let mut add = |name: &str, result: Option<RunResult>, note: String| {
        subjects.push(Subject {
            name: name.to_owned(),
            result,
            note,
        });
    };
    let started = WallClock::now();
    add(
        "none",
        Some(sim::run(scenario, &model, workload, |s| s, || None)),
        String::new(),
    );
    for n in [8, 16, 32] {
        add(
            &format!("static-{n}"),
            Some(gratify(
                scenario,
                &model,
                workload,
                Fixed::new(n),
                reject_at_limit(),
            )),
            String::new(),
        );
    }

    // The best static limit in hindsight.
    let sweep: Vec<usize> = if quick {
        vec![8, 12, 14, 16, 18, 20, 24, 32]
    } else {
        (4..=40).step_by(2).collect()
    };
    let mut best: Option<(f64, usize, RunResult)> = None;
    for &n in &sweep {
        let r = gratify(scenario, &model, workload, Fixed::new(n), reject_at_limit());
        let cost = sim::evaluate(scenario, &r, None, 10).overall["total_cost"];
        if best.as_ref().is_none_or(|(c, ..)| cost < *c) {
            best = Some((cost, n, r));
        }
    }
    let (_, oracle_limit, oracle) = best.unwrap();
    add(
        "static-oracle",
        Some(oracle),
        format!("limit {oracle_limit} (swept {sweep:?})"),
    );

    // ...combined with the best static partitioning.
    let partitions: [[(&str, f64); 3]; 4] = [
        [("checkout", 0.6), ("browse", 0.3), ("batch", 0.1)],
        [("checkout", 0.3), ("browse", 0.5), ("batch", 0.2)],
        [("checkout", 0.2), ("browse", 0.6), ("batch", 0.2)],
        [("checkout", 0.4), ("browse", 0.4), ("batch", 0.2)],
    ];
    let mut best: Option<(f64, String, RunResult)> = None;
    for shares in &partitions {
        let Some(config) = partitioned(scenario, &model, shares) else {
            continue;
        };
        for n in [
            oracle_limit.saturating_sub(2).max(1),
            oracle_limit,
            oracle_limit + 2,
        ] {
            let r = gratify(scenario, &model, workload, Fixed::new(n), config.clone());
            let cost = sim::evaluate(scenario, &r, None, 10).overall["total_cost"];
            if best.as_ref().is_none_or(|(c, ..)| cost < *c) {
                best = Some((cost, format!("limit {n}, shares {shares:?}"), r));
            }
        }
    }
    match best {
        Some((_, note, r)) => add("static-partitioned-oracle", Some(r), note),
        None => add(
            "static-partitioned-oracle",
            None,
            "skipped: needs classes checkout, browse, batch".into(),
        ),
    }

    let (aimd, vegas, gradient2) = netflix_min_one();
    add(
        "aimd",
        Some(gratify(scenario, &model, workload, aimd, reject_at_limit())),
        String::new(),
    );
    add(
        "vegas",
        Some(gratify(
            scenario,
            &model,
            workload,
            vegas,
            reject_at_limit(),
        )),
        String::new(),
    );
    add(
        "gradient2",
        Some(gratify(
            scenario,
            &model,
            workload,
            gradient2.clone(),
            reject_at_limit(),
        )),
        String::new(),
    );
    add(
        "windowed-gradient2",
        Some(gratify(
            scenario,
            &model,
            workload,
            Windowed::new(gradient2.clone()),
            reject_at_limit(),
        )),
        "1 s windows, mean".into(),
    );
    match partitioned(
        scenario,
        &model,
        &[("checkout", 0.6), ("browse", 0.3), ("batch", 0.1)],
    ) {
        Some(config) => add(
            "partitioned-gradient2",
            Some(gratify(scenario, &model, workload, gradient2, config)),
            "checkout 0.6 / browse 0.3 / batch 0.1".into(),
        ),
        None => add(
            "partitioned-gradient2",
            None,
            "skipped: needs classes checkout, browse, batch".into(),
        ),
    }
    add(
        "cl-aimd",
        Some(congestion_limiter(
            scenario,
            &model,
            workload,
            ClAimd::new_with_initial_limit(20),
        )),
        "congestion-limiter 0.1 defaults".into(),
    );
    add(
        "cl-vegas",
        Some(congestion_limiter(
            scenario,
            &model,
            workload,
            ClVegas::new_with_initial_limit(20),
        )),
        "congestion-limiter 0.1 defaults".into(),
    );
    add(
        "cl-gradient",
        Some(congestion_limiter(
            scenario,
            &model,
            workload,
            ClGradient::new_with_initial_limit(20),
        )),
        "congestion-limiter 0.1 defaults".into(),
    );
    add(
        "delay-cost",
        Some(gratify(
            scenario,
            &model,
            workload,
            DelayCostLimit::new(&model),
            LimiterConfig::default(),
        )),
        "gratify defaults".into(),
    );
    eprintln!(
        "{}: {} contenders in {:.1} s of wall time",
        scenario.name,
        subjects.len(),
        started.elapsed().as_secs_f64()
    );
    (subjects, oracle_limit)
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn json_number(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn fmt(f: &Figures, key: &str, digits: usize) -> String {
    f.get(key)
        .map_or_else(|| "–".into(), |v| format!("{v:.digits$}"))
}

/// One line of the summary: delay-cost beside the best adaptive contender
/// (not a static or oracle limit) of the scenario.
fn summary_row(
    scenario: &Scenario,
    evaluations: &[(String, Option<Evaluation>, String)],
) -> String {
    let adaptive = |n: &str| n != "delay-cost" && n != "none" && !n.starts_with("static-");
    let best = evaluations
        .iter()
        .filter(|(n, _, _)| adaptive(n))
        .filter_map(|(n, e, _)| Some((n.as_str(), e.as_ref()?.overall["total_cost"])))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    let Some(ours) = evaluations
        .iter()
        .find(|(n, _, _)| n == "delay-cost")
        .and_then(|(_, e, _)| e.as_ref())
    else {
        return format!("| {} | – |", scenario.name);
    };
    let f = &ours.overall;
    let cost = f["total_cost"];
    let worst = scenario
        .classes
        .iter()
        .filter_map(|c| Some((c.name.as_str(), *f.get(&format!("success.{}", c.name))?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or_else(|| "–".into(), |(n, s)| format!("{n} {s:.3}"));
    // After the first change of load or capacity: the step a reader asks
    // about (Breakwater's figure).
    let settle = ours
        .phases
        .get(1)
        .and_then(|(_, f)| f.get("settle_ms").copied())
        .map_or_else(|| "–".into(), |ms| format!("{ms:.0}"));
    let (best_name, best_cost) = best.unwrap_or(("–", f64::NAN));
    format!(
        "| {} | {cost:.0} | {best_name} | {best_cost:.0} | {:.2} | {} | {worst} | {} | {settle} |",
        scenario.name,
        cost / best_cost,
        fmt(f, "inversions", 0),
        fmt(f, "convergence_s", 0),
    )
}

fn print_tables(scenario: &Scenario, evaluations: &[(String, Option<Evaluation>, String)]) {
    let classes: Vec<&str> = scenario.classes.iter().map(|c| c.name.as_str()).collect();
    let best_other = evaluations
        .iter()
        .filter(|(n, e, _)| n != "delay-cost" && !n.starts_with("static-") && e.is_some())
        .filter_map(|(_, e, _)| e.as_ref().map(|e| e.overall["total_cost"]))
        .fold(f64::INFINITY, f64::min);
    println!("\n### {} — whole run\n", scenario.name);
    let mut header = String::from("| subject | total cost | vs best adaptive | goodput | ");
    for c in &classes {
        header += &format!("success {c} | p99 {c} (ms) | ");
    }
    header += "inversions | cold-start sheds | convergence (s) | limit cv |";
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches('|').count() - 1));
    for (name, e, note) in evaluations {
        let Some(e) = e else {
            println!("| {name} | {note} |");
            continue;
        };
        let f = &e.overall;
        let mut row = format!(
            "| {name} | {:.0} | {:.2} | {} | ",
            f["total_cost"],
            f["total_cost"] / best_other,
            fmt(f, "goodput_frac", 3)
        );
        for c in &classes {
            row += &format!(
                "{} | {} | ",
                fmt(f, &format!("success.{c}"), 3),
                fmt(f, &format!("p99_ms.{c}"), 0)
            );
        }
        row += &format!(
            "{} | {} | {} | {} |",
            fmt(f, "inversions", 0),
            fmt(f, "cold_start_shed", 0),
            fmt(f, "convergence_s", 0),
            fmt(f, "limit_cv", 2)
        );
        println!("{row}");
    }
    for (name, e, _) in evaluations {
        if name != "delay-cost" {
            continue;
        }
        let Some(e) = e else { continue };
        println!("\n### {} — delay-cost per phase\n", scenario.name);
        let mut header = String::from("| phase | total cost | goodput | ");
        for c in &classes {
            header += &format!("success {c} | p99 {c} (ms) | ");
        }
        header += "inversions | convergence (s) | limit (mean) |";
        println!("{header}");
        println!("|{}", "---|".repeat(header.matches('|').count() - 1));
        for (phase, f) in &e.phases {
            let mut row = format!(
                "| {phase} | {:.0} | {} | ",
                f["total_cost"],
                fmt(f, "goodput_frac", 3)
            );
            for c in &classes {
                row += &format!(
                    "{} | {} | ",
                    fmt(f, &format!("success.{c}"), 3),
                    fmt(f, &format!("p99_ms.{c}"), 0)
                );
            }
            row += &format!(
                "{} | {} | {} |",
                fmt(f, "inversions", 0),
                fmt(f, "convergence_s", 0),
                fmt(f, "limit_mean", 1)
            );
            println!("{row}");
        }
    }
}

mod plots {
    use super::*;
    use plotters::prelude::*;

    const COLOURS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];

    type Res = Result<(), Box<dyn std::error::Error>>;

    pub(super) fn limits(path: &Path, subjects: &[Subject], end: f64) -> Res {
        let shown: Vec<&Subject> = subjects.iter().filter(|s| s.result.is_some()).collect();
        let cols = 3;
        let rows = shown.len().div_ceil(cols);
        let root = SVGBackend::new(path, (1200, 260 * rows as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, s) in root.split_evenly((rows, cols)).iter().zip(&shown) {
            let r = s.result.as_ref().unwrap();
            let ymax = r
                .series
                .iter()
                .map(|p| p.in_flight.max(p.limit.unwrap_or(0)))
                .max()
                .unwrap_or(1)
                .clamp(10, 80) as f64;
            let mut chart = ChartBuilder::on(area)
                .caption(&s.name, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(40)
                .build_cartesian_2d(0f64..end, 0f64..ymax * 1.05)?;
            chart
                .configure_mesh()
                .x_desc("time (s)")
                .y_desc("requests")
                .light_line_style(WHITE)
                .draw()?;
            chart
                .draw_series(LineSeries::new(
                    r.series
                        .iter()
                        .map(|p| (p.at.as_secs_f64(), p.in_flight as f64)),
                    COLOURS[1].stroke_width(1),
                ))?
                .label("in flight (server)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], COLOURS[1]));
            if r.series.iter().any(|p| p.limit.is_some()) {
                chart
                    .draw_series(LineSeries::new(
                        r.series
                            .iter()
                            .step_by(5)
                            .filter_map(|p| Some((p.at.as_secs_f64(), p.limit? as f64))),
                        COLOURS[0].stroke_width(2),
                    ))?
                    .label("limit")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], COLOURS[0]));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    pub(super) fn costs(path: &Path, rows: &[(String, f64)]) -> Res {
        let root = SVGBackend::new(path, (1000, 40 + 32 * rows.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let max = rows.iter().map(|r| r.1).fold(0.0, f64::max) * 1.1;
        let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "total cost per contender (lower is better)",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(190)
            .build_cartesian_2d(0f64..max.max(1.0), (0..rows.len()).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(rows.len())
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    names.get(*i).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .y_label_style(("sans-serif", 13))
            .x_desc("total cost over the run (model currency)")
            .draw()?;
        chart.draw_series(rows.iter().enumerate().map(|(i, (name, v))| {
            let colour = if name == "delay-cost" {
                COLOURS[2]
            } else {
                COLOURS[0]
            };
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*v, SegmentValue::Exact(i + 1)),
                ],
                colour.filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            bar
        }))?;
        root.present()?;
        Ok(())
    }

    pub(super) fn success(
        path: &Path,
        scenario: &Scenario,
        evaluations: &[(String, Option<Evaluation>, String)],
    ) -> Res {
        let shown = [
            "delay-cost",
            "static-oracle",
            "gradient2",
            "partitioned-gradient2",
            "aimd",
            "cl-gradient",
            "none",
        ];
        let classes: Vec<&str> = scenario.classes.iter().map(|c| c.name.as_str()).collect();
        let root = SVGBackend::new(path, (1200, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let phases: Vec<String> = scenario.phases.iter().map(|p| p.name.clone()).collect();
        for (area, class) in root.split_evenly((1, classes.len())).iter().zip(&classes) {
            let mut chart = ChartBuilder::on(area)
                .caption(format!("success: {class}"), ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(40)
                .build_cartesian_2d(-0.2f64..(phases.len() as f64 - 0.8), 0f64..1.05)?;
            chart
                .configure_mesh()
                .x_labels(phases.len())
                .x_label_formatter(&|x| phases.get(x.round() as usize).cloned().unwrap_or_default())
                .y_desc("served within deadline (fraction)")
                .draw()?;
            for (i, name) in shown.iter().enumerate() {
                let Some((_, Some(e), _)) = evaluations.iter().find(|(n, ..)| n == name) else {
                    continue;
                };
                let key = format!("success.{class}");
                let colour = COLOURS[i % COLOURS.len()];
                chart
                    .draw_series(LineSeries::new(
                        e.phases
                            .iter()
                            .enumerate()
                            .filter_map(|(p, (_, f))| Some((p as f64, *f.get(&key)?))),
                        colour.stroke_width(if *name == "delay-cost" { 3 } else { 1 }),
                    ))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], colour));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerLeft)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

fn main() {
    let args = args();
    // congestion-limiter's Gradient can panic inside its moving average;
    // the simulator records those requests as failed. Keep the log readable.
    std::panic::set_hook(Box::new(|info| {
        static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SEEN.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("overload: a contender panicked (counted as failed requests): {info}");
        }
    }));
    let mut texts: Vec<(String, String)> = Vec::new();
    if args.scenarios.is_empty() {
        for (name, text) in sim::LIBRARY {
            if args.only.is_empty() || args.only.iter().any(|o| o == name) {
                texts.push((name.into(), text.into()));
            }
        }
    }
    for path in &args.scenarios {
        match std::fs::read_to_string(path) {
            Ok(t) => texts.push((path.display().to_string(), t)),
            Err(e) => {
                eprintln!("overload: cannot read {}: {e}", path.display());
                std::process::exit(2);
            }
        }
    }
    let out_dir = std::env::var_os("GRATIFY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-bench"));
    let img_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img");
    let _ = std::fs::create_dir_all(&out_dir);

    let mut results = Vec::new();
    let mut summary = Vec::new();
    for (source, text) in &texts {
        let scenario = match Scenario::from_toml(text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("overload: {source}: {e}");
                std::process::exit(2);
            }
        };
        let scenario = if args.quick {
            scenario.scaled(0.1)
        } else {
            scenario
        };
        let hold = if args.quick { 2 } else { 10 };
        let workload = scenario.workload(args.seed);
        eprintln!(
            "{}: {} arrivals over {:.0} s (seed {})",
            scenario.name,
            workload.len(),
            scenario.duration().as_secs_f64(),
            args.seed
        );
        let (subjects, _) = run_all(&scenario, &workload, args.quick);
        let reference = subjects
            .iter()
            .find(|s| s.name == "static-oracle")
            .and_then(|s| s.result.as_ref())
            .map(|r| sim::evaluate(&scenario, r, None, hold).goodput_per_second);
        let evaluations: Vec<(String, Option<Evaluation>, String)> = subjects
            .iter()
            .map(|s| {
                let e = s
                    .result
                    .as_ref()
                    .map(|r| sim::evaluate(&scenario, r, reference.as_deref(), hold));
                (s.name.clone(), e, s.note.clone())
            })
            .collect();
        if let Some(r) = subjects
            .iter()
            .find(|s| s.name == "delay-cost")
            .and_then(|s| s.result.as_ref())
        {
            eprintln!(
                "{}: delay-cost trace hash {:016x}",
                scenario.name,
                r.trace_hash()
            );
        }
        print_tables(&scenario, &evaluations);
        summary.push(summary_row(&scenario, &evaluations));
        if args.series {
            // The limit and in-flight series of every subject, as CSV.
            for s in &subjects {
                let Some(r) = &s.result else { continue };
                let mut csv = String::from("t_s,limit,in_flight\n");
                for p in &r.series {
                    let limit = p.limit.map_or(String::new(), |l| l.to_string());
                    csv += &format!("{:.1},{limit},{}\n", p.at.as_secs_f64(), p.in_flight);
                }
                let file =
                    out_dir.join(format!("overload-series-{}-{}.csv", scenario.name, s.name));
                let _ = std::fs::write(file, csv);
            }
        }

        // The scenario key: `full`/`P1`… for the first, prefixed for the others.
        let prefix = if scenario.name == "seven-phase" {
            String::new()
        } else {
            format!("{}:", scenario.name)
        };
        for (name, e, note) in &evaluations {
            let Some(e) = e else {
                results.push(serde_json::json!({
                    "scenario": format!("{prefix}full"), "subject": name, "skipped": note, "metrics": {}
                }));
                continue;
            };
            let metrics = |f: &Figures| {
                f.iter()
                    .map(|(k, v)| (k.clone(), json_number(*v)))
                    .collect::<serde_json::Map<_, _>>()
            };
            results.push(serde_json::json!({
                "scenario": format!("{prefix}full"), "subject": name, "note": note, "metrics": metrics(&e.overall)
            }));
            for (phase, f) in &e.phases {
                results.push(serde_json::json!({
                    "scenario": format!("{prefix}{phase}"), "subject": name, "metrics": metrics(f)
                }));
            }
        }

        if scenario.name == "seven-phase" && !args.quick {
            let _ = std::fs::create_dir_all(&img_dir);
            let end = scenario.duration().as_secs_f64();
            let outcomes = [
                plots::limits(&img_dir.join("overload-limits.svg"), &subjects, end),
                plots::costs(
                    &img_dir.join("overload-cost.svg"),
                    &evaluations
                        .iter()
                        .filter_map(|(n, e, _)| {
                            Some((n.clone(), e.as_ref()?.overall["total_cost"]))
                        })
                        .collect::<Vec<_>>(),
                ),
                plots::success(
                    &img_dir.join("overload-success.svg"),
                    &scenario,
                    &evaluations,
                ),
            ];
            for o in outcomes {
                if let Err(e) = o {
                    eprintln!("overload: plot failed: {e}");
                }
            }
        }
    }

    println!("\n### Every scenario — delay-cost against the best adaptive contender\n");
    println!(
        "| scenario | delay-cost cost | best adaptive | its cost | ratio | inversions | worst class success | convergence (s) | settle after the first step (ms, most valuable class) |"
    );
    println!("|---|---:|---|---:|---:|---:|---|---:|---:|");
    for row in &summary {
        println!("{row}");
    }

    let doc = serde_json::json!({
        "bench": "overload",
        "quick": args.quick,
        "commit": commit(),
        "seed": args.seed,
        "results": results,
    });
    let path = out_dir.join("overload.json");
    match std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()) {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("overload: cannot write {}: {e}", path.display()),
    }
}
