//! Scenarios: the server, the classes and the phases of load, from TOML.

use std::time::Duration;

use gratify_core::serde_util;
use gratify_core::{Class, CostModel, CostModelConfig, DelayCost};
use serde::{Deserialize, Serialize};

use super::rng::Rng;

/// The default scenario: seven phases over 600 simulated seconds (cold
/// start, 2× overload, recovery, a capacity drop, restoration, a 5× burst,
/// and a batch-heavy 1.2× tail).
pub const SEVEN_PHASE: &str = include_str!("../../scenarios/seven-phase.toml");

/// The same with heavy-tailed service times (lognormal σ = 1.5).
pub const SEVEN_PHASE_HEAVY_TAIL: &str =
    include_str!("../../scenarios/seven-phase-heavy-tail.toml");

/// The simulated server: `workers` workers with a first-come-first-served
/// queue behind them; a request that starts with `n` requests in the server
/// takes `base · (1 + slope·(n − 1) + (growth^max(0, n − knee) − 1))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerModel {
    /// Workers at the start.
    pub workers: usize,
    /// Linear slowdown per request in the server.
    #[serde(default = "default_slope")]
    pub slope: f64,
    /// Requests in the server past which the slowdown grows geometrically.
    #[serde(default = "default_knee")]
    pub knee: usize,
    /// The geometric growth factor past the knee.
    #[serde(default = "default_growth")]
    pub growth: f64,
    /// Past this many requests in the server, it answers 503 at once.
    #[serde(default)]
    pub reject_above: Option<usize>,
}

fn default_slope() -> f64 {
    0.02
}
fn default_knee() -> usize {
    24
}
fn default_growth() -> f64 {
    1.15
}

impl ServerModel {
    /// The slowdown factor with `n` requests in the server.
    pub fn slowdown(&self, n: usize) -> f64 {
        let n = n.max(1) as f64;
        let past = (n - self.knee as f64).max(0.0);
        // Capped so that an absurd pile-up stays finite.
        1.0 + self.slope * (n - 1.0) + (libm::pow(self.growth, past.min(200.0)) - 1.0)
    }
}

/// One class of the scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClassSpec {
    /// Its name.
    pub name: String,
    /// Its share of arrivals (normalised over the classes).
    pub share: f64,
    /// Its delay-cost curve.
    pub delay_cost: DelayCost,
    /// What refusing it costs.
    pub refusal_cost: f64,
    /// The median service time (lognormal).
    #[serde(with = "serde_util::duration")]
    pub median_service: Duration,
    /// The σ of the log of the service time.
    #[serde(default = "default_sigma")]
    pub sigma: f64,
}

fn default_sigma() -> f64 {
    0.5
}

/// One phase of load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Phase {
    /// Its name (`P1`, ...).
    pub name: String,
    /// How long it lasts.
    #[serde(with = "serde_util::duration")]
    pub duration: Duration,
    /// Arrivals as a multiple of the full-capacity throughput `μ`.
    pub load: f64,
    /// Workers during the phase (default: the server's).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Class shares during the phase, by name (default: the classes').
    #[serde(default)]
    pub shares: Option<std::collections::BTreeMap<String, f64>>,
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// What it represents.
    #[serde(default)]
    pub description: String,
    /// Price of one worker for one second.
    #[serde(default)]
    pub worker_price: f64,
    /// The server.
    pub server: ServerModel,
    /// The classes.
    pub classes: Vec<ClassSpec>,
    /// The phases, in order.
    pub phases: Vec<Phase>,
}

/// A scenario that cannot be simulated.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ScenarioError(String);

/// One pre-drawn arrival.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// When, from the start.
    pub at: Duration,
    /// Its class, by index in the scenario (and model).
    pub class: usize,
    /// Its service time before slowdown.
    pub base: Duration,
}

impl Scenario {
    /// Parses and validates a scenario.
    ///
    /// # Errors
    ///
    /// A message naming what is wrong.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let s: Self = toml::from_str(text).map_err(|e| ScenarioError(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError(m));
        if self.classes.is_empty() {
            return bad("classes: at least one class".into());
        }
        if self.phases.is_empty() {
            return bad("phases: at least one phase".into());
        }
        if self.server.workers == 0 {
            return bad("server.workers: at least one".into());
        }
        let slope_ok = self.server.slope.is_finite() && self.server.slope >= 0.0;
        let growth_ok = self.server.growth.is_finite() && self.server.growth >= 1.0;
        if !(slope_ok && growth_ok) {
            return bad("server: slope must be ≥ 0 and growth ≥ 1".into());
        }
        for (i, c) in self.classes.iter().enumerate() {
            if !(c.share.is_finite() && c.share >= 0.0) {
                return bad(format!("classes[{i}].share: finite and non-negative"));
            }
            if !(c.sigma.is_finite() && (0.0..=4.0).contains(&c.sigma)) {
                return bad(format!("classes[{i}].sigma: between 0 and 4"));
            }
            if c.median_service.is_zero() {
                return bad(format!("classes[{i}].median_service: above zero"));
            }
        }
        if self.classes.iter().map(|c| c.share).sum::<f64>() <= 0.0 {
            return bad("classes: the shares sum to zero".into());
        }
        for (i, p) in self.phases.iter().enumerate() {
            if !(p.load.is_finite() && (0.0..=1000.0).contains(&p.load)) {
                return bad(format!("phases[{i}].load: between 0 and 1000"));
            }
            if p.workers == Some(0) {
                return bad(format!("phases[{i}].workers: at least one"));
            }
            if let Some(shares) = &p.shares {
                for name in shares.keys() {
                    if !self.classes.iter().any(|c| &c.name == name) {
                        return bad(format!("phases[{i}].shares: unknown class {name:?}"));
                    }
                }
            }
        }
        self.model()?;
        Ok(())
    }

    /// The cost model of the scenario's classes (the first is the default).
    ///
    /// # Errors
    ///
    /// When a class is invalid as a model class.
    pub fn model(&self) -> Result<CostModel, ScenarioError> {
        let mut config = CostModelConfig::default();
        config.default_class = Some(self.classes[0].name.clone());
        for c in &self.classes {
            let class = Class::new(c.delay_cost.clone(), c.refusal_cost)
                .map_err(|e| ScenarioError(format!("classes {}: {e}", c.name)))?;
            config.classes.insert(c.name.clone(), class);
        }
        CostModel::from_config(config).map_err(|e| ScenarioError(e.to_string()))
    }

    /// The classes' indexes in the model (which orders them by name).
    pub fn model_ids(&self, model: &CostModel) -> Vec<usize> {
        self.classes
            .iter()
            .map(|c| model.id(&c.name).map_or(0, |id| id.index()))
            .collect()
    }

    /// Shares during `phase`, normalised.
    pub fn shares(&self, phase: &Phase) -> Vec<f64> {
        let mut shares: Vec<f64> = self
            .classes
            .iter()
            .map(|c| {
                phase
                    .shares
                    .as_ref()
                    .and_then(|s| s.get(&c.name).copied())
                    .unwrap_or(c.share)
            })
            .collect();
        if let Some(overrides) = &phase.shares {
            // Classes not named share what is left, in their usual proportion.
            let named: f64 = overrides.values().sum();
            let rest: f64 = self
                .classes
                .iter()
                .filter(|c| !overrides.contains_key(&c.name))
                .map(|c| c.share)
                .sum();
            let left = (1.0 - named).max(0.0);
            for (i, c) in self.classes.iter().enumerate() {
                if !overrides.contains_key(&c.name) && rest > 0.0 {
                    shares[i] = c.share / rest * left;
                }
            }
        }
        let total: f64 = shares.iter().sum();
        shares.iter().map(|s| s / total.max(1e-12)).collect()
    }

    /// The mean service time before slowdown under `shares`.
    pub fn mean_base(&self, shares: &[f64]) -> f64 {
        self.classes
            .iter()
            .zip(shares)
            .map(|(c, s)| s * c.median_service.as_secs_f64() * libm::exp(c.sigma * c.sigma / 2.0))
            .sum()
    }

    /// `μ`: the throughput with `workers` busy and no queue, for the classes'
    /// usual mix — what the phases' `load` multiplies.
    pub fn capacity(&self, workers: usize) -> f64 {
        let shares: Vec<f64> = {
            let total: f64 = self.classes.iter().map(|c| c.share).sum();
            self.classes.iter().map(|c| c.share / total).collect()
        };
        workers as f64 / (self.mean_base(&shares) * self.server.slowdown(workers))
    }

    /// Where each phase starts.
    pub fn phase_starts(&self) -> Vec<Duration> {
        let mut t = Duration::ZERO;
        self.phases
            .iter()
            .map(|p| {
                let start = t;
                t += p.duration;
                start
            })
            .collect()
    }

    /// The whole length.
    pub fn duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// A copy with every phase `factor` times as long (for quick runs).
    #[must_use]
    pub fn scaled(&self, factor: f64) -> Self {
        let mut s = self.clone();
        for p in &mut s.phases {
            p.duration = p.duration.mul_f64(factor.clamp(1e-3, 1e3));
        }
        s
    }

    /// Draws the arrivals: Poisson at each phase's rate, classes by share,
    /// lognormal service times. The same seed gives the same arrivals.
    pub fn workload(&self, seed: u64) -> Vec<Arrival> {
        let mut rng = Rng::new(seed);
        let mu = self.capacity(self.server.workers);
        let mut out = Vec::new();
        let mut start = 0.0;
        for phase in &self.phases {
            let rate = phase.load * mu;
            let end = start + phase.duration.as_secs_f64();
            let shares = self.shares(phase);
            let mut t = start;
            if rate > 0.0 {
                loop {
                    t += rng.exponential(rate);
                    if t >= end {
                        break;
                    }
                    let mut u = rng.uniform();
                    let mut class = shares.len() - 1;
                    for (i, s) in shares.iter().enumerate() {
                        if u < *s {
                            class = i;
                            break;
                        }
                        u -= s;
                    }
                    let c = &self.classes[class];
                    let base = c.median_service.as_secs_f64() * libm::exp(c.sigma * rng.normal());
                    out.push(Arrival {
                        at: Duration::from_secs_f64(t),
                        class,
                        base: Duration::from_secs_f64(base.min(3600.0)),
                    });
                }
            }
            start = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenarios_parse() {
        for text in [SEVEN_PHASE, SEVEN_PHASE_HEAVY_TAIL] {
            let s = Scenario::from_toml(text).unwrap();
            assert_eq!(s.phases.len(), 7);
            assert_eq!(s.duration(), Duration::from_secs(600));
            assert!(s.capacity(16) > 50.0, "{}", s.capacity(16));
        }
    }

    #[test]
    fn the_workload_is_deterministic_and_has_the_right_rates() {
        let s = Scenario::from_toml(SEVEN_PHASE).unwrap();
        let a = s.workload(42);
        assert_eq!(a, s.workload(42));
        assert_ne!(a, s.workload(43));
        let mu = s.capacity(16);
        // P1 runs 60 s at 0.5 μ.
        let p1 = a.iter().filter(|x| x.at < Duration::from_secs(60)).count() as f64;
        assert!(
            (p1 / (30.0 * mu) - 1.0).abs() < 0.05,
            "{p1} vs {}",
            30.0 * mu
        );
        // P7 is 80% batch.
        let p7: Vec<_> = a
            .iter()
            .filter(|x| x.at >= Duration::from_secs(430))
            .collect();
        let batch = s.classes.iter().position(|c| c.name == "batch").unwrap();
        let frac = p7.iter().filter(|x| x.class == batch).count() as f64 / p7.len() as f64;
        assert!((frac - 0.8).abs() < 0.02, "{frac}");
    }

    #[test]
    fn slowdown_matches_the_formula() {
        let s = Scenario::from_toml(SEVEN_PHASE).unwrap();
        assert!((s.server.slowdown(1) - 1.0).abs() < 1e-12);
        assert!((s.server.slowdown(16) - 1.3).abs() < 1e-12);
        assert!((s.server.slowdown(26) - (1.5 + 1.15f64.powi(2) - 1.0)).abs() < 1e-12);
    }

    #[test]
    fn bad_scenarios_are_refused() {
        let bad = SEVEN_PHASE.replace("workers = 16", "workers = 0");
        assert!(Scenario::from_toml(&bad).is_err());
        let bad = SEVEN_PHASE.replace("load = 2.0", "load = -1.0");
        assert!(Scenario::from_toml(&bad).is_err());
        assert!(Scenario::from_toml("name = 1").is_err());
    }
}
