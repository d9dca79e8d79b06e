//! The replica advisor against the Kubernetes HPA on CPU, KEDA's request-rate
//! scaling and Knative's KPA, over a day, a flash crowd and two months of
//! real traffic, in virtual time.
//!
//! ```text
//! cargo bench -p gratify-benches --bench advisor
//! cargo bench -p gratify-benches --bench advisor -- --quick
//! cargo bench -p gratify-benches --bench advisor -- --trace my.txt --trace-step 60 --trace-scale 20
//! ```
//!
//! A deterministic fluid simulation, one step a second (five in quick mode).
//! Replicas run 8 requests at once, 50 ms each (squared CV 1.5); a new replica
//! is ready 60 s after it is asked for and costs from that moment. The
//! service's wait is priced by the per-replica model (round-robin balancing:
//! each ready replica an M/M/8 with its share of the traffic, Allen–Cunneen
//! corrected); when the traffic exceeds what the ready replicas can serve, a
//! backlog grows and everyone waits for it, up to 5 s (a limiter's queue
//! time): what would wait longer is refused at its refusal cost, and a
//! refused checkout counts as a deadline miss. Classes: checkout (5% of
//! requests, 0.05 per second of delay, 2 s deadline, refusal 2.0) and browse
//! (95%, 0.002 per second); a replica costs 0.20 an hour.
//!
//! Policies, every 15 s, within 2 to 100 replicas, with Kubernetes' default
//! scale-up limit (the larger of +100% and +4 pods per period) where the HPA
//! decides:
//!
//! - `fixed-peak`: a fleet sized for the scenario's peak at 70% utilisation;
//! - `hpa-cpu70`: the HPA algorithm on CPU utilisation (busy slots over the
//!   requested replicas, a replica not yet ready counted at 0% as the HPA
//!   assumes on scale-up), target 70%, tolerance 0.1, 300 s scale-down
//!   stabilisation;
//! - `keda-rpsN`: the HPA on requests per second per replica, as KEDA's
//!   Prometheus scaler gives it (the mean rate of the last minute, an
//!   AverageValue target of N, tolerance 0.1, 300 s scale-down
//!   stabilisation), tried at every N of 20 to 150 and reported at the best
//!   for the scenario — tuned in hindsight, which no real deployment can be;
//! - `knative-kpa`: Knative's KPA with its defaults — the mean concurrency of
//!   a 60 s stable and a 6 s panic window against 70% of the container
//!   concurrency (8), panic when the panic window wants twice the ready
//!   pods (then only up, until 60 s without), at most ×1000 up and ÷2 down a
//!   tick, a tick every 2 s (or every step when steps are longer);
//! - `advisor`: `ScalingAdvisor` (its defaults: a 60 s lead time, rises
//!   remembered with a half-life of a day) fed the last 15 s of measured
//!   rates, exported as an external metric with an AverageValue target of 1
//!   through the same HPA mechanics (tolerance 0.1, the same scale-up limit);
//!   its own 300 s scale-down window replaces the HPA's (0 s), as
//!   docs/deployment.md advises.
//!
//! Scenarios: `synthetic-day` (a diurnal sine between 500 and 1,500 requests
//! a second, flash crowds of ×2.5 at 10:00 for 20 min and ×3 at 18:30 for
//! 10 min, a slow ramp of +40% from 20:00 to midnight), `flash-crowd` (three
//! hours at 600 a second with crowds to ×4 at 1:00 for 20 min and ×3 at 2:00
//! for 10), and `nasa-1995` (the NASA-HTTP per-minute trace of July–August
//! 1995 from `../shared/traces`, scaled to a mean of 1,000 requests a second;
//! skipped if absent; the first week in quick mode). `--trace FILE` replays
//! counts per interval instead (one integer per line or separated by spaces;
//! `--trace-step` seconds per count, default 60; `--trace-scale` multiplies
//! the rate, default 1).
//!
//! Metrics: `replica_hours`, `deadline_misses` (checkout requests served
//! past 2 s), `delay_cost`, `replica_cost`, `total_cost`. Writes
//! `target/gratify-bench/advisor.json` and `docs/img/advisor-day.svg`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::VecDeque;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gratify_core::queueing::Mmc;
use gratify_core::{Class, CostModel};
use gratify_scaling::advisor::{AdvisorConfig, Measurements, Recommendation, ScalingAdvisor};
use tokio::time::Instant;

const SLOTS: u32 = 8;
const SERVICE: f64 = 0.05;
const SCV: f64 = 1.5;
const CHECKOUT_SHARE: f64 = 0.05;
const READY_AFTER: f64 = 60.0;
const PERIOD: f64 = 15.0;
const MIN: u32 = 2;
const MAX: u32 = 100;
/// The longest anyone waits in an overload (a limiter's queue time).
const MAX_WAIT: f64 = 5.0;

const MODEL: &str = r#"
default_class = "browse"
[prices]
replica_hour = 0.20
[classes.checkout]
delay_cost = { shape = "linear", per_second = 0.05, deadline = "2s" }
refusal_cost = 2.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 0.002 }
refusal_cost = 0.01
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Policy {
    FixedPeak,
    HpaCpu70,
    /// The HPA on requests per second per replica (KEDA's Prometheus
    /// scaler, AverageValue): the target in requests per second.
    HpaRps(u32),
    /// Knative's KPA, its documented defaults.
    Kpa,
    Advisor,
}

impl Policy {
    fn name(self) -> String {
        match self {
            Self::FixedPeak => "fixed-peak".into(),
            Self::HpaCpu70 => "hpa-cpu70".into(),
            Self::HpaRps(target) => format!("keda-rps{target}"),
            Self::Kpa => "knative-kpa".into(),
            Self::Advisor => "advisor".into(),
        }
    }
}

/// The targets the requests-per-second HPA is tried at, per replica (a
/// replica serves 160 a second at most); the best in hindsight is reported.
const RPS_TARGETS: [u32; 14] = [20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150];

/// Knative's KPA defaults (`config-autoscaler`): a 60 s stable window, a
/// panic window of 10% of it, panic at 200% of the ready pods' capacity,
/// 70% of the container concurrency as target, at most ×1000 up and ÷2 down
/// a tick, a tick every 2 s.
const KPA_STABLE: f64 = 60.0;
const KPA_PANIC: f64 = 6.0;
const KPA_PANIC_THRESHOLD: f64 = 2.0;
const KPA_TARGET_FRACTION: f64 = 0.7;
const KPA_MAX_UP: f64 = 1000.0;
const KPA_MAX_DOWN: f64 = 2.0;
const KPA_TICK: f64 = 2.0;

/// Requests per second at second `t`.
struct Trace {
    /// Rate per step of `step` seconds.
    rates: Vec<f64>,
    step: f64,
}

impl Trace {
    fn at(&self, t: f64) -> f64 {
        let i = (t / self.step) as usize;
        self.rates.get(i).copied().unwrap_or(0.0)
    }

    fn duration(&self) -> f64 {
        self.rates.len() as f64 * self.step
    }

    fn peak(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }
}

fn synthetic_day() -> Trace {
    let day = 86_400.0;
    let rates = (0..86_400)
        .map(|t| {
            let t = f64::from(t);
            let h = t / 3600.0;
            let mut r =
                1000.0 * (1.0 + 0.5 * (2.0 * std::f64::consts::PI * (t / day - 0.25)).sin());
            // Flash crowds: a 30 s rise, a plateau, a 5 min fall.
            let crowd = |start: f64, minutes: f64, factor: f64| {
                let s = start * 3600.0;
                let e = s + minutes * 60.0;
                if t < s || t > e + 300.0 {
                    1.0
                } else if t < s + 30.0 {
                    1.0 + (factor - 1.0) * (t - s) / 30.0
                } else if t <= e {
                    factor
                } else {
                    factor - (factor - 1.0) * (t - e) / 300.0
                }
            };
            r *= crowd(10.0, 20.0, 2.5) * crowd(18.5, 10.0, 3.0);
            if h >= 20.0 {
                r *= 1.0 + 0.4 * (h - 20.0) / 4.0;
            }
            r
        })
        .collect();
    Trace { rates, step: 1.0 }
}

/// Three hours: 600 requests a second, then a flash crowd to ×4 in 30 s
/// at 1:00 for 20 minutes (falling over 5), and one to ×3 at 2:00 for 10.
fn flash_crowd() -> Trace {
    let rates = (0..3 * 3600)
        .map(|t| {
            let t = f64::from(t);
            let crowd = |start: f64, factor: f64, plateau: f64| {
                let (rise, fall) = (30.0, 300.0);
                let x = t - start;
                if x < 0.0 {
                    0.0
                } else if x < rise {
                    (factor - 1.0) * x / rise
                } else if x < rise + plateau {
                    factor - 1.0
                } else if x < rise + plateau + fall {
                    (factor - 1.0) * (1.0 - (x - rise - plateau) / fall)
                } else {
                    0.0
                }
            };
            600.0 * (1.0 + crowd(3600.0, 4.0, 1200.0) + crowd(7200.0, 3.0, 600.0))
        })
        .collect();
    Trace { rates, step: 1.0 }
}

fn parse_counts(text: &str, step: f64, scale: f64) -> Trace {
    let rates = text
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .map(|c| c.max(0.0) / step * scale)
        .collect();
    Trace { rates, step }
}

/// The NASA per-minute trace, scaled to a mean of 1,000 requests a second.
fn nasa(quick: bool) -> Option<Trace> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/traces/nasa-1995-per-minute.txt.gz");
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .ok()?;
    let mut trace = parse_counts(&text, 60.0, 1.0);
    if quick {
        trace.rates.truncate(7 * 24 * 60);
    }
    let mean = trace.rates.iter().sum::<f64>() / trace.rates.len().max(1) as f64;
    let scale = 1000.0 / mean.max(1e-9);
    for r in &mut trace.rates {
        *r *= scale;
    }
    Some(trace)
}

#[derive(Default, Clone, Debug)]
struct Outcome {
    replica_hours: f64,
    deadline_misses: f64,
    delay_cost: f64,
    replica_cost: f64,
    /// (hour, requested replicas) every 5 minutes, for the plot.
    series: Vec<(f64, f64)>,
}

/// Delay cost per second and deadline misses per second of `lambda` over
/// `ready` replicas, with `backlog` requests already waiting (updated).
fn serve(
    checkout: &Class,
    browse: &Class,
    lambda: f64,
    ready: u32,
    backlog: &mut f64,
    dt: f64,
) -> (f64, f64) {
    let capacity = f64::from(ready * SLOTS) / SERVICE;
    let rates = [
        (checkout, lambda * CHECKOUT_SHARE),
        (browse, lambda * (1.0 - CHECKOUT_SHARE)),
    ];
    if ready > 0
        && *backlog <= 0.0
        && let Ok(q) = Mmc::new(lambda / f64::from(ready), SERVICE, SLOTS)
    {
        let ac = (1.0 + SCV) / 2.0;
        let (p, theta) = (q.prob_wait(), q.tail_rate() / ac);
        let cost: f64 = rates
            .iter()
            .map(|(c, r)| r * c.expected_cost_exponential(p, theta))
            .sum();
        let misses = rates[0].1 * p * (-theta * 2.0).exp();
        return (cost, misses);
    }
    // Overloaded: a backlog grows (or drains) and every arrival waits for
    // it — at most MAX_WAIT, as a limiter's queue time bounds it; what would
    // wait longer is refused at its class's refusal cost.
    *backlog = (*backlog + (lambda - capacity) * dt).max(0.0);
    let limit = capacity * MAX_WAIT;
    let refused = (*backlog - limit).max(0.0);
    *backlog -= refused;
    let wait = if capacity > 0.0 {
        *backlog / capacity
    } else {
        MAX_WAIT
    };
    let t = Duration::from_secs_f64(wait);
    let served = (lambda - refused / dt).max(0.0) / lambda.max(1e-12);
    let cost: f64 = rates
        .iter()
        .map(|(c, r)| r * served * c.response_cost(t) + r * (1.0 - served) * c.refusal_cost())
        .sum();
    let late = if wait > 2.0 { served } else { 0.0 };
    let misses = rates[0].1 * (late + (1.0 - served));
    (cost, misses)
}

/// Asks for `target` pods at `t`: new ones are ready `READY_AFTER` later;
/// on scale-down the pods not yet ready go first, then the others.
fn resize(pods: &mut Vec<f64>, target: u32, t: f64) {
    let current = pods.len() as u32;
    if target > current {
        pods.extend(std::iter::repeat_n(
            t + READY_AFTER,
            (target - current) as usize,
        ));
    } else if target < current {
        pods.sort_by(f64::total_cmp);
        pods.truncate(target as usize);
    }
}

fn simulate(policy: Policy, trace: &Trace, model: &CostModel, dt: f64) -> Outcome {
    let checkout = model.class(model.id("checkout").unwrap()).clone();
    let browse = model.class(model.id("browse").unwrap()).clone();
    let price = model.prices().replica_hour / 3600.0;
    let peak_replicas =
        ((trace.peak() * SERVICE / (f64::from(SLOTS) * 0.7)).ceil() as u32).clamp(MIN, MAX);
    // Pods: the time each becomes ready.
    let mut pods: Vec<f64> = match policy {
        Policy::FixedPeak => vec![0.0; peak_replicas as usize],
        _ => vec![
            0.0;
            MIN.max(((trace.at(0.0) * SERVICE / (f64::from(SLOTS) * 0.7)).ceil()) as u32)
                as usize
        ],
    };
    let advisor = ScalingAdvisor::new(model, AdvisorConfig::new(SLOTS).replicas(MIN, MAX));
    let hpa_window = match policy {
        Policy::HpaCpu70 | Policy::HpaRps(_) => 300.0,
        _ => 0.0,
    };
    let mut recommendations: VecDeque<(f64, u32)> = VecDeque::new();
    let mut backlog = 0.0;
    let mut window_arrivals = 0.0;
    // (time, arrival rate, requests in flight) of the last minute, for the
    // request-rate HPA (a one-minute PromQL rate) and the KPA's windows.
    let mut history: VecDeque<(f64, f64, f64)> = VecDeque::new();
    let mut next_tick = KPA_TICK;
    let mut panic_since: Option<f64> = None;
    let mut panic_pods = 0_u32;
    let mut out = Outcome::default();
    let start = Instant::now();
    let steps = (trace.duration() / dt) as usize;
    let mut next_scale = PERIOD;
    for i in 0..steps {
        let t = i as f64 * dt;
        let lambda = trace.at(t);
        let ready = pods.iter().filter(|r| **r <= t).count() as u32;
        let (cost, misses) = serve(&checkout, &browse, lambda, ready, &mut backlog, dt);
        out.delay_cost += cost * dt;
        out.deadline_misses += misses * dt;
        out.replica_cost += pods.len() as f64 * price * dt;
        out.replica_hours += pods.len() as f64 * dt / 3600.0;
        window_arrivals += lambda * dt;
        // In flight: busy slots, and the backlog when overloaded.
        let in_flight = if backlog > 0.0 {
            f64::from(ready * SLOTS) + backlog
        } else {
            (lambda * SERVICE).min(f64::from(ready * SLOTS))
        };
        history.push_back((t, lambda, in_flight));
        while history.front().is_some_and(|(at, _, _)| t - at >= 60.0) {
            history.pop_front();
        }
        if i % ((300.0 / dt) as usize).max(1) == 0 {
            out.series.push((t / 3600.0, pods.len() as f64));
        }
        if policy == Policy::Kpa {
            if t + dt >= next_tick {
                next_tick += KPA_TICK.max(dt);
                let mean = |window: f64| {
                    let (sum, n) = history
                        .iter()
                        .filter(|(at, _, _)| t - at < window.max(dt))
                        .fold((0.0, 0.0), |(s, n), (_, _, c)| (s + c, n + 1.0));
                    if n > 0.0 { sum / n } else { 0.0 }
                };
                let target = f64::from(SLOTS) * KPA_TARGET_FRACTION;
                let ready = f64::from(ready.max(1));
                let max_up = (KPA_MAX_UP * ready).ceil();
                let max_down = (ready / KPA_MAX_DOWN).floor();
                let stable = (mean(KPA_STABLE) / target).ceil().clamp(max_down, max_up) as u32;
                let panic = (mean(KPA_PANIC) / target).ceil().clamp(max_down, max_up) as u32;
                let over = f64::from(panic) / ready >= KPA_PANIC_THRESHOLD;
                if over {
                    panic_since = Some(t);
                } else if panic_since.is_some_and(|since| t - since >= KPA_STABLE) {
                    panic_since = None;
                    panic_pods = 0;
                }
                let mut desired = stable;
                if panic_since.is_some() {
                    // In panic it only scales up.
                    desired = desired.max(panic).max(panic_pods);
                    panic_pods = desired;
                }
                resize(&mut pods, desired.clamp(MIN, MAX), t);
            }
            continue;
        }
        if policy == Policy::FixedPeak || t + dt < next_scale {
            continue;
        }
        next_scale += PERIOD;
        let current = pods.len() as u32;
        let desired = match policy {
            Policy::HpaCpu70 => {
                // Mean CPU over the requested pods, a pod not yet ready
                // counted at 0% (what the HPA assumes when scaling up); a
                // ready pod is busy in proportion to its busy slots, 100% at
                // most.
                let busy_slots = if backlog > 0.0 {
                    f64::from(ready * SLOTS)
                } else {
                    (lambda * SERVICE).min(f64::from(ready * SLOTS))
                };
                let usage = busy_slots / f64::from(current.max(1) * SLOTS);
                let ratio = usage / 0.7;
                if (ratio - 1.0).abs() <= 0.1 {
                    current
                } else {
                    (f64::from(current) * ratio).ceil() as u32
                }
            }
            Policy::Advisor => {
                let rate = window_arrivals / PERIOD;
                let now = start + Duration::from_secs_f64(t);
                advisor.observe(
                    now,
                    Measurements::new(model)
                        .rate("checkout", rate * CHECKOUT_SHARE)
                        .rate("browse", rate * (1.0 - CHECKOUT_SHARE))
                        .service(SERVICE, SCV)
                        .samples((rate * PERIOD) as u64),
                );
                let rec = match advisor.recommend(now) {
                    Recommendation::Replicas(a) | Recommendation::Stale(a) => a.replicas,
                    _ => current,
                };
                let ratio = f64::from(rec) / f64::from(current.max(1));
                if (ratio - 1.0).abs() <= 0.1 {
                    current
                } else {
                    rec
                }
            }
            Policy::HpaRps(target) => {
                // The mean arrival rate of the last minute over the
                // requested replicas, against the target per replica.
                let rate =
                    history.iter().map(|(_, l, _)| l).sum::<f64>() / history.len().max(1) as f64;
                let ratio = rate / (f64::from(current.max(1)) * f64::from(target));
                if (ratio - 1.0).abs() <= 0.1 {
                    current
                } else {
                    (rate / f64::from(target)).ceil() as u32
                }
            }
            Policy::FixedPeak | Policy::Kpa => current,
        };
        window_arrivals = 0.0;
        // Scale-down stabilisation: the highest recommendation in the window.
        recommendations.push_back((t, desired));
        while recommendations
            .front()
            .is_some_and(|(at, _)| t - at > hpa_window)
        {
            recommendations.pop_front();
        }
        let stabilised = recommendations
            .iter()
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(desired);
        let target = if stabilised > current {
            // Scale-up limit: +100% or +4 pods per period, the larger.
            stabilised.min((current * 2).max(current + 4))
        } else {
            stabilised
        }
        .clamp(MIN, MAX);
        resize(&mut pods, target, t);
    }
    out
}

fn plot(
    path: &Path,
    day: &Trace,
    outcomes: &[(Policy, Outcome)],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = outcomes
        .iter()
        .flat_map(|(_, o)| o.series.iter().map(|(_, r)| *r))
        .fold(10.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("Replicas over the synthetic day", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..24f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("hour of the day")
        .y_desc("replicas (requested)")
        .draw()?;
    // What the traffic needs at 70% utilisation, for reference.
    let need: Vec<(f64, f64)> = (0..288)
        .map(|i| {
            let t = f64::from(i) * 300.0;
            (t / 3600.0, day.at(t) * SERVICE / (f64::from(SLOTS) * 0.7))
        })
        .collect();
    chart
        .draw_series(LineSeries::new(need, BLACK.mix(0.35)))?
        .label("traffic ÷ (8 slots × 70%)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.mix(0.35)));
    let colours = [
        RGBColor(120, 120, 120),
        RGBColor(209, 36, 47),
        RGBColor(225, 148, 42),
        RGBColor(58, 166, 85),
        RGBColor(31, 111, 235),
    ];
    for ((policy, o), colour) in outcomes.iter().zip(colours) {
        chart
            .draw_series(LineSeries::new(o.series.clone(), colour.stroke_width(2)))?
            .label(policy.name())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The replica advisor against the HPA, KEDA and Knative.
#[derive(Debug, clap::Parser)]
#[command(name = "advisor")]
struct Args {
    /// 5 s steps and the first week of NASA-1995.
    #[arg(long)]
    quick: bool,
    /// Replay counts per interval from this file instead of the scenarios.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Seconds per count of `--trace`.
    #[arg(long, default_value_t = 60.0)]
    trace_step: f64,
    /// Multiplies the rate of `--trace`.
    #[arg(long, default_value_t = 1.0)]
    trace_scale: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let quick = args.quick;
    let dt: f64 = if quick { 5.0 } else { 1.0 };
    let model = CostModel::from_toml(MODEL).unwrap();
    let mut scenarios: Vec<(String, Option<Trace>, f64)> = Vec::new();
    if let Some(file) = &args.trace {
        let (step, scale) = (args.trace_step, args.trace_scale);
        let file = file.display().to_string();
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            eprintln!("advisor: cannot read {file}: {e}");
            std::process::exit(2)
        });
        scenarios.push((
            format!("trace:{file}"),
            Some(parse_counts(&text, step, scale)),
            dt.max(1.0),
        ));
    } else {
        scenarios.push(("synthetic-day".into(), Some(synthetic_day()), dt));
        scenarios.push(("flash-crowd".into(), Some(flash_crowd()), dt));
        // A per-minute trace: 15 s steps are enough.
        scenarios.push(("nasa-1995".into(), nasa(quick), 15.0));
    }
    let mut results = Vec::new();
    println!(
        "| scenario | policy | replica-hours | deadline misses | delay cost | replica cost | total cost | vs best peer |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let total = |o: &Outcome| o.delay_cost + o.replica_cost;
    for (name, trace, step) in &scenarios {
        let Some(trace) = trace else {
            println!("| {name} | (skipped: ../shared/traces not found) | | | | | | |");
            results.push(serde_json::json!({ "scenario": name, "subject": "advisor", "skipped": "trace not found", "metrics": {} }));
            continue;
        };
        // The request-rate HPA at its best target for this trace, in
        // hindsight.
        let rps = RPS_TARGETS
            .into_iter()
            .map(|target| {
                let p = Policy::HpaRps(target);
                (p, simulate(p, trace, &model, *step))
            })
            .min_by(|a, b| total(&a.1).total_cmp(&total(&b.1)))
            .unwrap();
        let mut outcomes: Vec<(Policy, Outcome)> = vec![
            (
                Policy::FixedPeak,
                simulate(Policy::FixedPeak, trace, &model, *step),
            ),
            (
                Policy::HpaCpu70,
                simulate(Policy::HpaCpu70, trace, &model, *step),
            ),
            rps,
            (Policy::Kpa, simulate(Policy::Kpa, trace, &model, *step)),
        ];
        outcomes.push((
            Policy::Advisor,
            simulate(Policy::Advisor, trace, &model, *step),
        ));
        let best_peer = outcomes
            .iter()
            .filter(|(p, _)| *p != Policy::Advisor)
            .map(|(_, o)| total(o))
            .fold(f64::INFINITY, f64::min);
        for (policy, o) in &outcomes {
            println!(
                "| {name} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | {:.3} |",
                policy.name(),
                o.replica_hours,
                o.deadline_misses,
                o.delay_cost,
                o.replica_cost,
                total(o),
                total(o) / best_peer
            );
            results.push(serde_json::json!({
                "scenario": name,
                "subject": policy.name(),
                "metrics": {
                    "replica_hours": o.replica_hours,
                    "deadline_misses": o.deadline_misses,
                    "delay_cost": o.delay_cost,
                    "replica_cost": o.replica_cost,
                    "total_cost": total(o),
                    "total_vs_best_peer": total(o) / best_peer,
                },
            }));
        }
        if name == "synthetic-day" {
            let img = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/img/advisor-day.svg");
            if let Err(e) = plot(&img, trace, &outcomes) {
                eprintln!("advisor: plot: {e}");
            }
        }
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let doc = serde_json::json!({ "bench": "advisor", "quick": quick, "commit": commit, "results": results });
    let dir = std::env::var_os("GRATIFY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gratify-bench"));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("advisor.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    eprintln!("wrote {}", path.display());
}
