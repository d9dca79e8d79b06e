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
