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

/// The scenario library, by name: shapes production traffic really has, each
/// in its own file under `scaling/scenarios/` (the header of each says what
/// it represents and what a limiter must get right).
pub const LIBRARY: [(&str, &str); 12] = [
    ("seven-phase", SEVEN_PHASE),
    ("heavy-tail", SEVEN_PHASE_HEAVY_TAIL),
    (
        "cheap-heavy-tail",
        include_str!("../../scenarios/cheap-heavy-tail.toml"),
    ),
    (
        "rare-export",
        include_str!("../../scenarios/rare-export.toml"),
    ),
    (
        "fast-failures",
        include_str!("../../scenarios/fast-failures.toml"),
    ),
    (
        "impatient-clients",
        include_str!("../../scenarios/impatient-clients.toml"),
    ),
    (
        "single-class",
        include_str!("../../scenarios/single-class.toml"),
    ),
    (
        "idle-class-returns",
        include_str!("../../scenarios/idle-class-returns.toml"),
    ),
    (
        "cheapest-spike-12x",
        include_str!("../../scenarios/cheapest-spike-12x.toml"),
    ),
    (
        "breakwater-step",
        include_str!("../../scenarios/breakwater-step.toml"),
    ),
    (
        "capacity-halved",
        include_str!("../../scenarios/capacity-halved.toml"),
    ),
    (
        "service-drift",
        include_str!("../../scenarios/service-drift.toml"),
    ),
];

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
    /// The share of the class's requests that are rare long ones inside it
    /// (an export, a long poll): same class and costs, another service time.
    #[serde(default)]
    pub tail_share: f64,
    /// Their median service time (lognormal, σ 0.25).
    #[serde(default, with = "serde_util::duration")]
    pub tail_service: Duration,
    /// Its clients give up after this long (the request is cancelled; to
    /// them it is as good as refused).
    #[serde(default, with = "serde_util::opt_duration")]
    pub give_up: Option<Duration>,
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
    /// The share of a class's requests that fail fast during the phase (the
    /// server answers 500 after 1 ms without taking a worker), by name.
    #[serde(default)]
    pub failures: Option<std::collections::BTreeMap<String, f64>>,
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
    /// Service times grow by this fraction per minute from the start
    /// (0.01: 1% a minute, linearly); capacity figures are at the start.
    #[serde(default)]
    pub drift_per_minute: f64,
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
    /// The server fails it fast (a 500 after 1 ms).
    pub fail: bool,
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
            if !(c.tail_share.is_finite() && (0.0..=1.0).contains(&c.tail_share)) {
                return bad(format!("classes[{i}].tail_share: between 0 and 1"));
            }
            if c.tail_share > 0.0 && c.tail_service.is_zero() {
                return bad(format!(
                    "classes[{i}].tail_service: above zero with a tail_share"
                ));
            }
            if c.give_up.is_some_and(|g| g.is_zero()) {
                return bad(format!("classes[{i}].give_up: above zero"));
            }
        }
        if !(self.drift_per_minute.is_finite() && (-0.5..=10.0).contains(&self.drift_per_minute)) {
            return bad("drift_per_minute: between -0.5 and 10".into());
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
            if let Some(failures) = &p.failures {
                for (name, f) in failures {
                    if !self.classes.iter().any(|c| &c.name == name) {
                        return bad(format!("phases[{i}].failures: unknown class {name:?}"));
                    }
                    if !(f.is_finite() && (0.0..=1.0).contains(f)) {
                        return bad(format!("phases[{i}].failures.{name}: between 0 and 1"));
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
    /// lognormal service times (a class's tail share drawn from its tail),
    /// drift applied, fast failures marked. The same seed gives the same
    /// arrivals.
    pub fn workload(&self, seed: u64) -> Vec<Arrival> {
        let mut rng = Rng::new(seed);
        let mu = self.capacity(self.server.workers);
        let extra_draws = self.classes.iter().any(|c| c.tail_share > 0.0)
            || self.phases.iter().any(|p| p.failures.is_some());
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
                    // A scenario with tails or failures draws two more
                    // numbers per arrival, always (adding a tail to one class
                    // reshuffles no other); one without draws none, so its
                    // arrivals are as they always were.
                    let z = rng.normal();
                    let (tail_u, fail_u) = if extra_draws {
                        (rng.uniform(), rng.uniform())
                    } else {
                        (1.0, 1.0)
                    };
                    let base = if tail_u < c.tail_share {
                        c.tail_service.as_secs_f64() * libm::exp(0.25 * z)
                    } else {
                        c.median_service.as_secs_f64() * libm::exp(c.sigma * z)
                    };
                    let drift = (1.0 + self.drift_per_minute * t / 60.0).max(0.01);
                    let fail = phase
                        .failures
                        .as_ref()
                        .and_then(|f| f.get(&c.name))
                        .is_some_and(|f| fail_u < *f);
                    out.push(Arrival {
                        at: Duration::from_secs_f64(t),
                        class,
                        base: Duration::from_secs_f64((base * drift).min(3600.0)),
                        fail,
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
    fn the_library_parses_and_its_names_match_its_files() {
        for (name, text) in LIBRARY {
            let s = Scenario::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(s.name, name);
            assert!(!s.description.is_empty(), "{name}");
        }
    }

    #[test]
    fn tails_failures_and_drift_shape_the_workload() {
        let text = LIBRARY.iter().find(|(n, _)| *n == "rare-export").unwrap().1;
        let s = Scenario::from_toml(text).unwrap();
        let a = s.workload(3);
        let browse = s.classes.iter().position(|c| c.name == "browse").unwrap();
        let n = a.iter().filter(|x| x.class == browse).count() as f64;
        let long = a
            .iter()
            .filter(|x| x.class == browse && x.base > Duration::from_secs(10))
            .count() as f64;
        assert!((long / n - 0.001).abs() < 0.0006, "{long} of {n}");

        let text = LIBRARY
            .iter()
            .find(|(n, _)| *n == "fast-failures")
            .unwrap()
            .1;
        let s = Scenario::from_toml(text).unwrap();
        let a = s.workload(3);
        let failing =
            |x: &&Arrival| x.at >= Duration::from_secs(60) && x.at < Duration::from_secs(80);
        let in_window = a.iter().filter(failing).count() as f64;
        let failed = a.iter().filter(failing).filter(|x| x.fail).count() as f64;
        assert!(
            (failed / in_window - 0.3).abs() < 0.03,
            "{failed} of {in_window}"
        );
        assert!(
            a.iter()
                .filter(|x| x.at < Duration::from_secs(60))
                .all(|x| !x.fail)
        );

        let text = LIBRARY
            .iter()
            .find(|(n, _)| *n == "service-drift")
            .unwrap()
            .1;
        let s = Scenario::from_toml(text).unwrap();
        let a = s.workload(3);
        let mean = |from: u64, to: u64| {
            let v: Vec<f64> = a
                .iter()
                .filter(|x| x.at >= Duration::from_secs(from) && x.at < Duration::from_secs(to))
                .map(|x| x.base.as_secs_f64())
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        // 1% a minute: 14 minutes in, about 14% slower than at the start.
        let growth = mean(840, 900) / mean(0, 60);
        assert!((growth - 1.14).abs() < 0.04, "{growth}");
    }

    #[test]
    fn bad_extensions_are_refused() {
        let base = LIBRARY.iter().find(|(n, _)| *n == "rare-export").unwrap().1;
        assert!(
            Scenario::from_toml(&base.replace("tail_share = 0.001", "tail_share = 2.0")).is_err()
        );
        assert!(Scenario::from_toml(&base.replace("tail_service = \"30s\"", "")).is_err());
        let base = LIBRARY
            .iter()
            .find(|(n, _)| *n == "fast-failures")
            .unwrap()
            .1;
        assert!(Scenario::from_toml(&base.replacen("checkout = 0.3", "nobody = 0.3", 1)).is_err());
        assert!(
            Scenario::from_toml(&base.replacen("checkout = 0.3", "checkout = 1.5", 1)).is_err()
        );
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
