//! `plan`: capacity planning with the delay-cost model.
//!
//! Reads a plan file (a cost model plus per-class traffic) and prints, for a
//! range of server counts, utilisation, the probability of waiting, the mean
//! wait, delay cost per day, server cost per day and the total, marking the
//! cost-optimal count.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gratify_examples::plan::PlanFile;

/// Capacity planning with the delay-cost model.
#[derive(Debug, Parser)]
#[command(name = "plan", version, about)]
struct Args {
    /// The plan file: a cost model and `[traffic.<class>]` sections.
    #[arg(default_value = "examples/plan/seed-ecommerce.toml")]
    file: PathBuf,
    /// The first server count to list (default: around the optimum).
    #[arg(long)]
    from: Option<u32>,
    /// The last server count to list.
    #[arg(long)]
    to: Option<u32>,
    /// A traffic trace: request counts per interval, one integer per line
    /// or separated by spaces. The plan is then made for its mean, 95th
    /// percentile and peak rates, the classes keeping the file's shares.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Seconds per count of the trace.
    #[arg(long, default_value_t = 60.0)]
    trace_step: f64,
    /// Multiplies the trace's rate.
    #[arg(long, default_value_t = 1.0)]
    trace_scale: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("plan: cannot read {}: {e}", args.file.display());
            return ExitCode::FAILURE;
        }
    };
    let file = match PlanFile::from_toml(&text) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("plan: {}: {e}", args.file.display());
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.trace {
        return plan_trace(&file, &args.file, path, args.trace_step, args.trace_scale);
    }
    let range = match (args.from, args.to) {
        (None, None) => None,
        (from, to) => {
            let from = from.unwrap_or(1);
            Some((from, to.unwrap_or(from.saturating_add(9)).max(from)))
        }
    };
    match file.report(range) {
        Ok(report) => {
            println!("gratify plan: {}\n", args.file.display());
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plan: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Plans for a trace's mean, 95th-percentile and peak rates.
fn plan_trace(
    file: &PlanFile,
    plan: &std::path::Path,
    path: &std::path::Path,
    step: f64,
    scale: f64,
) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("plan: cannot read {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if !(step.is_finite() && step > 0.0 && scale.is_finite() && scale >= 0.0) {
        eprintln!("plan: --trace-step must be above 0 and --trace-scale at least 0");
        return ExitCode::FAILURE;
    }
    let mut rates: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .map(|c| c.max(0.0) / step * scale)
        .collect();
    if rates.is_empty() {
        eprintln!("plan: {}: no counts in the trace", path.display());
        return ExitCode::FAILURE;
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    rates.sort_by(f64::total_cmp);
    let at = |q: f64| rates[((rates.len() - 1) as f64 * q).round() as usize];
    println!(
        "gratify plan: {} over the trace {} ({} intervals of {step} s, ×{scale})\n",
        plan.display(),
        path.display(),
        rates.len()
    );
    println!("| rate | requests/s | servers (M/M/c) | total/day | replicas (advisor) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, rate) in [("mean", mean), ("p95", at(0.95)), ("peak", at(1.0))] {
        match file.at_total_rate(rate).report(None) {
            Ok(r) => println!(
                "| {name} | {rate:.2} | {} | {:.2} | {} |",
                r.optimal.servers,
                r.optimal.total_per_day(),
                r.replicas
                    .as_ref()
                    .map_or("–".to_owned(), |a| a.replicas.to_string()),
            ),
            Err(e) => println!("| {name} | {rate:.2} | {e} | | |"),
        }
    }
    ExitCode::SUCCESS
}
