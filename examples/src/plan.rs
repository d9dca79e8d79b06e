//! The capacity planner behind the `plan` command.
//!
//! A plan file is a cost model (the same keys as any gratify model file:
//! `default_class`, `[prices]`, `[classes.*]`) plus the traffic of each
//! class:
//!
//! ```toml
//! [prices]
//! replica_hour = 1.0
//!
//! [classes.orders]
//! delay_cost = { shape = "linear", per_second = 0.1 }
//! refusal_cost = 50.0
//!
//! [traffic.orders]
//! per_day = 10_000          # or per_second = 0.1157
//! mean_service = "1s"
//! ```
//!
//! The planner pools the classes into one M/M/c queue (first come, first
//! served; the mean service time is the arrival-weighted mean) and prices
//! each class's wait with its own curve.
//!
//! With a `[replicas]` table it also asks the replica advisor
//! (`gratify_scaling::advisor`) how many replicas of `slots` concurrent
//! requests each to run — the pooled and per-replica views, the
//! square-root cross-check and a cost table per replica count:
//!
//! ```toml
//! [replicas]
//! slots = 4            # concurrent requests per replica
//! min = 1              # bounds (defaults 1 and 100)
//! max = 100
//! service_scv = 1.0    # squared CV of the service time (1: exponential)
//! ```
//!
//! # Example
//!
//! ```
//! use gratify_examples::plan::{PlanFile, SEED_ECOMMERCE};
//!
//! let file = PlanFile::from_toml(SEED_ECOMMERCE)?;
//! let report = file.report(None)?;
//! assert_eq!(report.optimal.servers, 2);
//! let one = &report.rows[0];
//! assert_eq!(one.servers, 1);
//! assert!((one.prob_wait - 0.116).abs() < 0.001);
//! assert!((one.delay_cost_per_day - 131.0).abs() < 0.5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use gratify::core::queueing::{QueueError, Staffing, StaffingCost};
use gratify::core::{ConfigError, CostModel, CostModelConfig, ModelError, Prices};
use gratify::{Class, ClassId};
use serde::Deserialize;

/// The seed example: 10,000 orders a day, 1 s of work each, 0.1 per second
/// of delay, servers at 1 an hour.
pub const SEED_ECOMMERCE: &str = include_str!("../plan/seed-ecommerce.toml");

const SECONDS_PER_DAY: f64 = 86_400.0;

/// A plan file: a cost model and per-class traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    #[serde(default)]
    default_class: Option<String>,
    #[serde(default)]
    prices: Prices,
    classes: BTreeMap<String, Class>,
    traffic: BTreeMap<String, Traffic>,
    #[serde(default)]
    replicas: Option<ReplicasSpec>,
    #[serde(skip)]
    model: Option<CostModel>,
}

/// How replicas are sized, for the advisor's part of the report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasSpec {
    /// Concurrent requests per replica.
    pub slots: u32,
    /// The fewest replicas.
    #[serde(default = "one")]
    pub min: u32,
    /// The most replicas.
    #[serde(default = "hundred")]
    pub max: u32,
    /// Squared coefficient of variation of the service time.
    #[serde(default = "one_f")]
    pub service_scv: f64,
}

fn one() -> u32 {
    1
}
fn hundred() -> u32 {
    100
}
fn one_f() -> f64 {
    1.0
}

/// The traffic of one class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// Arrivals per second.
    #[serde(default)]
    pub per_second: Option<f64>,
    /// Arrivals per day.
    #[serde(default)]
    pub per_day: Option<f64>,
    /// The mean work per request.
    #[serde(with = "gratify::core::serde_util::duration")]
    pub mean_service: Duration,
}

/// A plan file that cannot be planned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The file is not valid TOML of the expected shape, or not a valid model.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The traffic section is wrong.
    #[error("{key}: {message}")]
    Traffic {
        /// The key at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The queueing question has no answer (for instance a range of servers
    /// that cannot carry the load).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// One row of the report: a server count and what it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Row {
    /// Servers.
    pub servers: u32,
    /// Utilisation, `λ/(cμ)`.
    pub utilisation: f64,
    /// Probability of waiting (Erlang C).
    pub prob_wait: f64,
    /// Mean wait in the queue, seconds.
    pub mean_wait: f64,
    /// Expected delay cost per day.
    pub delay_cost_per_day: f64,
    /// Server cost per day.
    pub server_cost_per_day: f64,
}

impl Row {
    /// Delay plus server cost per day.
    pub fn total_per_day(&self) -> f64 {
        self.delay_cost_per_day + self.server_cost_per_day
    }

    fn from_cost(cost: &StaffingCost) -> Self {
        Self {
            servers: cost.servers,
            utilisation: cost.queue.utilisation(),
            prob_wait: cost.queue.prob_wait(),
            mean_wait: cost.queue.mean_wait(),
            delay_cost_per_day: cost.delay_cost_per_second * SECONDS_PER_DAY,
            server_cost_per_day: cost.server_cost_per_second * SECONDS_PER_DAY,
        }
    }
}

/// The planner's answer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// Total arrivals per second.
    pub arrival_rate: f64,
    /// Arrival-weighted mean service time, seconds.
    pub mean_service: f64,
    /// Offered load, erlangs.
    pub offered_load: f64,
    /// Price of a server per hour.
    pub server_price_per_hour: f64,
    /// The rows, by server count.
    pub rows: Vec<Row>,
    /// The cost-optimal row.
    pub optimal: Row,
    /// The square-root staffing cross-check.
    pub sqrt_staffing: u32,
    /// The replica advisor's answer, with a `[replicas]` table.
    pub replicas: Option<gratify::scaling::advisor::Advice>,
}

impl PlanFile {
    /// Parses and validates a plan file.
    ///
    /// # Errors
    ///
    /// A [`PlanError`] naming the key at fault.
    pub fn from_toml(text: &str) -> Result<Self, PlanError> {
        let mut file: Self = toml::from_str(text).map_err(ConfigError::from)?;
        let mut config = CostModelConfig::default();
        config.default_class.clone_from(&file.default_class);
        config.prices = file.prices;
        config.classes.clone_from(&file.classes);
        let model = CostModel::from_config(config).map_err(ConfigError::from)?;
        for (name, t) in &file.traffic {
            let key = format!("traffic.{name}");
            model
                .resolve(&key, name)
                .map_err(|e: ModelError| PlanError::Config(e.into()))?;
            let bad = |message: String| PlanError::Traffic {
                key: key.clone(),
                message,
            };
            match (t.per_second, t.per_day) {
                (Some(_), Some(_)) => {
                    return Err(bad("give per_second or per_day, not both".into()));
                }
                (None, None) => return Err(bad("give per_second or per_day".into())),
                (Some(r), None) | (None, Some(r)) if !(r.is_finite() && r >= 0.0) => {
                    return Err(bad(format!(
                        "arrivals must be finite and non-negative, got {r}"
                    )));
                }
                _ => {}
            }
            if t.mean_service.is_zero() {
                return Err(PlanError::Traffic {
                    key: format!("{key}.mean_service"),
                    message: "must be above zero".into(),
                });
            }
        }
        if let Some(r) = &file.replicas {
            if r.slots == 0 {
                return Err(PlanError::Traffic {
                    key: "replicas.slots".into(),
                    message: "must be at least 1".into(),
                });
            }
            if !(r.service_scv.is_finite() && r.service_scv >= 0.0) {
                return Err(PlanError::Traffic {
                    key: "replicas.service_scv".into(),
                    message: "must be finite and non-negative".into(),
                });
            }
        }
        if file.traffic.is_empty() {
            return Err(PlanError::Traffic {
                key: "traffic".into(),
                message:
                    "no traffic: add [traffic.<class>] with per_second or per_day and mean_service"
                        .into(),
            });
        }
        file.model = Some(model);
        Ok(file)
    }

    /// The same plan with every class's traffic scaled so that the total is
    /// `per_second` (the classes keep their shares).
    #[must_use]
    pub fn at_total_rate(&self, per_second: f64) -> Self {
        let mut out = self.clone();
        let total: f64 = self
            .traffic
            .values()
            .map(|t| {
                t.per_second
                    .or(t.per_day.map(|d| d / SECONDS_PER_DAY))
                    .unwrap_or(0.0)
            })
            .sum();
        let factor = if total > 0.0 {
            per_second.max(0.0) / total
        } else {
            0.0
        };
        for t in out.traffic.values_mut() {
            let rate = t
                .per_second
                .or(t.per_day.map(|d| d / SECONDS_PER_DAY))
                .unwrap_or(0.0);
            t.per_second = Some(rate * factor);
            t.per_day = None;
        }
        out
    }

    /// The cost model of the file.
    pub fn model(&self) -> Option<&CostModel> {
        self.model.as_ref()
    }

    fn staffing(&self) -> Result<Staffing, PlanError> {
        let model = self.model.as_ref().ok_or_else(|| PlanError::Traffic {
            key: "traffic".into(),
            message: "plan file not validated".into(),
        })?;
        let rates: Vec<(ClassId, f64, f64)> = self
            .traffic
            .iter()
            .filter_map(|(name, t)| {
                let rate = t.per_second.or(t.per_day.map(|d| d / SECONDS_PER_DAY))?;
                Some((model.id(name)?, rate, t.mean_service.as_secs_f64()))
            })
            .collect();
        let total: f64 = rates.iter().map(|r| r.1).sum();
        let mean_service = if total > 0.0 {
            rates.iter().map(|r| r.1 * r.2).sum::<f64>() / total
        } else {
            rates.iter().map(|r| r.2).sum::<f64>() / rates.len().max(1) as f64
        };
        let mut staffing = Staffing::new(mean_service, model.prices().replica_hour)?;
        for (id, rate, _) in rates {
            staffing = staffing.class(rate, model.class(id).clone())?;
        }
        Ok(staffing)
    }

    /// Plans: the rows for `servers` (an inclusive range; by default a range
    /// around the optimum) and the optimum.
    ///
    /// # Errors
    ///
    /// [`PlanError::Queue`] if the load cannot be carried.
    pub fn report(&self, servers: Option<(u32, u32)>) -> Result<Report, PlanError> {
        let staffing = self.staffing()?;
        let optimal = staffing.optimal()?;
        let min = staffing.min_stable_servers();
        let (from, to) = servers.unwrap_or_else(|| {
            let from = optimal.servers.saturating_sub(5).max(min);
            (from, optimal.servers.saturating_add(4).max(from + 5))
        });
        let rows = (from.max(1)..=to.min(from.saturating_add(999)))
            .filter_map(|c| staffing.evaluate(c).ok())
            .map(|c| Row::from_cost(&c))
            .collect();
        let replicas = self.advise(&staffing);
        let model = self.model.as_ref().map_or(0.0, |m| m.prices().replica_hour);
        Ok(Report {
            arrival_rate: staffing.arrival_rate(),
            mean_service: staffing.offered_load() / staffing.arrival_rate().max(f64::MIN_POSITIVE),
            offered_load: staffing.offered_load(),
            server_price_per_hour: model,
            rows,
            optimal: Row::from_cost(&optimal),
            sqrt_staffing: staffing.sqrt_staffing_estimate(),
            replicas,
        })
    }

    fn advise(&self, staffing: &Staffing) -> Option<gratify::scaling::advisor::Advice> {
        use gratify::scaling::advisor::{
            AdvisorConfig, Measurements, Recommendation, ScalingAdvisor,
        };
        let spec = self.replicas.as_ref()?;
        let model = self.model.as_ref()?;
        let config = AdvisorConfig::new(spec.slots).replicas(spec.min, spec.max);
        let advisor = ScalingAdvisor::new(model, config);
        let mut m = Measurements::new(model)
            .service(
                staffing.offered_load() / staffing.arrival_rate().max(f64::MIN_POSITIVE),
                spec.service_scv,
            )
            .samples(u64::MAX);
        for (name, t) in &self.traffic {
            let rate = t
                .per_second
                .or(t.per_day.map(|d| d / SECONDS_PER_DAY))
                .unwrap_or(0.0);
            m = m.rate(name, rate);
        }
        let now = tokio::time::Instant::now();
        advisor.observe(now, m);
        match advisor.recommend(now) {
            Recommendation::Replicas(advice) => Some(advice),
            _ => None,
        }
    }
}

fn format_wait(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 1e-3 {
        format!("{:.2} ms", seconds * 1e3)
    } else if seconds >= 1e-6 {
        format!("{:.2} µs", seconds * 1e6)
    } else {
        format!("{seconds:.1e} s")
    }
}

fn format_prob(p: f64) -> String {
    if p == 0.0 || p >= 1e-4 {
        format!("{p:.4}")
    } else {
        format!("{p:.2e}")
    }
}

fn format_money(x: f64) -> String {
    if x == 0.0 || (0.01..1e9).contains(&x.abs()) {
        format!("{x:.2}")
    } else {
        format!("{x:.2e}")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "traffic: {:.0} requests/day ({:.4}/s), mean service {}, offered load {:.4} erlangs",
            self.arrival_rate * SECONDS_PER_DAY,
            self.arrival_rate,
            format_wait(self.mean_service),
            self.offered_load
        );
        let _ = writeln!(
            out,
            "server price: {:.2}/hour ({:.2}/day)\n",
            self.server_price_per_hour,
            self.server_price_per_hour * 24.0
        );
        let _ = writeln!(
            out,
            "| servers | utilisation | P(wait) | mean wait | delay cost/day | server cost/day | total/day |  |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---|");
        for row in &self.rows {
            let mark = if row.servers == self.optimal.servers {
                "← optimal"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| {} | {:.1}% | {} | {} | {} | {} | {} | {} |",
                row.servers,
                row.utilisation * 100.0,
                format_prob(row.prob_wait),
                format_wait(row.mean_wait),
                format_money(row.delay_cost_per_day),
                format_money(row.server_cost_per_day),
                format_money(row.total_per_day()),
                mark
            );
        }
        let _ = writeln!(
            out,
            "\ncost-optimal: {} servers, {}/day in total ({} delay + {} servers)",
            self.optimal.servers,
            format_money(self.optimal.total_per_day()),
            format_money(self.optimal.delay_cost_per_day),
            format_money(self.optimal.server_cost_per_day)
        );
        let _ = write!(
            out,
            "square-root staffing (Borst–Mandelbaum–Reiman) suggests {} servers",
            self.sqrt_staffing
        );
        if let Some(a) = &self.replicas {
            let _ = writeln!(
                out,
                "\n\nreplicas (the advisor): {:.2} busy slots on average\n",
                a.offered_load
            );
            let _ = writeln!(
                out,
                "| replicas | replica cost/day | delay cost/day, pooled | delay cost/day, per replica | total/day |  |"
            );
            let _ = writeln!(out, "|---:|---:|---:|---:|---:|---|");
            for row in &a.table {
                let mark = if row.replicas == a.raw {
                    "← advised"
                } else {
                    ""
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    row.replicas,
                    format_money(row.replica_cost * SECONDS_PER_DAY),
                    format_money(row.pooled_delay_cost * SECONDS_PER_DAY),
                    format_money(row.per_replica_delay_cost * SECONDS_PER_DAY),
                    format_money(row.total() * SECONDS_PER_DAY),
                    mark
                );
            }
            let _ = write!(
                out,
                "\nadvised: {} replicas (pooled view alone: {}, per-replica view alone: {}, square-root rule: {})",
                a.replicas, a.pooled_replicas, a.per_replica_replicas, a.bmr_replicas
            );
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_total_rate_keeps_the_class_shares() {
        let text = format!("{SEED_ECOMMERCE}\n[replicas]\nslots = 1\n");
        let file = PlanFile::from_toml(&text).unwrap();
        let report = file.at_total_rate(0.5).report(None).unwrap();
        assert!((report.arrival_rate - 0.5).abs() < 1e-12);
        assert!(report.optimal.servers >= file.report(None).unwrap().optimal.servers);
    }

    #[test]
    fn a_replicas_table_adds_the_advisors_answer() {
        let text = format!("{SEED_ECOMMERCE}\n[replicas]\nslots = 1\nmin = 1\nmax = 10\n");
        let report = PlanFile::from_toml(&text).unwrap().report(None).unwrap();
        let advice = report.replicas.as_ref().unwrap();
        // One slot per replica: replicas are servers, so the advisor agrees
        // with the pooled M/M/c optimum of the table above.
        assert_eq!(advice.pooled_replicas, report.optimal.servers);
        assert!(advice.replicas >= advice.pooled_replicas);
        let shown = report.to_string();
        assert!(shown.contains("← advised"), "{shown}");
        let e = PlanFile::from_toml(&format!("{SEED_ECOMMERCE}\n[replicas]\nslots = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas.slots"), "{e}");
    }

    #[test]
    fn seed_table() {
        let report = PlanFile::from_toml(SEED_ECOMMERCE)
            .unwrap()
            .report(None)
            .unwrap();
        let row = |c: u32| *report.rows.iter().find(|r| r.servers == c).unwrap();
        assert!((row(1).prob_wait - 0.1157).abs() < 1e-3);
        assert!((row(1).delay_cost_per_day - 130.9).abs() < 0.1);
        assert!((row(2).delay_cost_per_day - 3.36).abs() < 0.01);
        assert_eq!(report.optimal.servers, 2);
        assert!((row(1).server_cost_per_day - 24.0).abs() < 1e-9);
        let text = report.to_string();
        assert!(text.contains("← optimal"), "{text}");
    }

    #[test]
    fn traffic_errors_name_the_key() {
        let base = "[classes.a]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = 1\n";
        let e = PlanFile::from_toml(&format!(
            "{base}[traffic.b]\nper_second = 1\nmean_service = \"1s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("traffic.b"), "{e}");
        let e = PlanFile::from_toml(&format!(
            "{base}[traffic.a]\nper_second = 1\nper_day = 3\nmean_service = \"1s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("traffic.a") && e.contains("not both"), "{e}");
        let e = PlanFile::from_toml(&format!(
            "{base}[traffic.a]\nper_second = 1\nmean_service = \"fast\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("fast") && e.contains("line"), "{e}");
        let e = PlanFile::from_toml(&format!(
            "{base}[traffic.a]\nper_second = -1\nmean_service = \"1s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("traffic.a"), "{e}");
    }

    #[test]
    fn explicit_range_and_unstable_rows_skipped() {
        let file = PlanFile::from_toml(
            "[prices]\nreplica_hour = 1\n[classes.a]\ndelay_cost = { shape = \"linear\", per_second = 1.0 }\nrefusal_cost = 1\n[traffic.a]\nper_second = 3.5\nmean_service = \"1s\"\n",
        )
        .unwrap();
        let report = file.report(Some((1, 8))).unwrap();
        // 1..=3 servers cannot carry 3.5 erlangs: only 4..=8 are listed.
        assert_eq!(report.rows.first().unwrap().servers, 4);
        assert_eq!(report.rows.len(), 5);
    }
}
