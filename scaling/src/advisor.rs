//! [`ScalingAdvisor`]: how many replicas the delay-cost model says to run.
//!
//! Given what the traffic is (arrival rate per class, the mean and squared
//! coefficient of variation of the service time) and what things cost (a
//! replica-hour, each class's delay curve, refusal cost and deadline), the
//! advisor finds the number of replicas `n` that minimises
//!
//! ```text
//! n × replica price  +  Σ_k λ_k · E[cost_k(wait)]
//! ```
//!
//! where a wait past a class's deadline also costs its refusal cost. Each
//! replica runs `slots` requests at once. The wait is modelled two ways and
//! the more pessimistic one is used:
//!
//! - **pooled**: one M/M/(n·slots) queue (a balancer that always finds a free
//!   slot);
//! - **per replica**: n independent M/M/slots queues, each with `λ/n`
//!   (round-robin balancing, queues that cannot help each other);
//!
//! both with the Allen–Cunneen correction for service times that are not
//! exponential: the waiting tail `P(W > t) = C·e^{−θt}` becomes
//! `C·e^{−θt/f}` with `f = (1 + c_s²)/2` for Poisson arrivals. The
//! Borst–Mandelbaum–Reiman square-root rule is computed beside it as a
//! cross-check.
//!
//! A replica asked for now serves only after its **lead time** (scheduling,
//! start-up, readiness; 60 s by default), and traffic can grow meanwhile. So
//! the cost above is an expectation over the rises the traffic has shown
//! over such spans: the advisor keeps decayed weights of the rises it saw a
//! lead time apart, each in units of the larger of the rate then and its
//! usual level (so that a quiet hour's jump from 10 to 50 a second is small
//! against a usual 1,000, and a crowd from 600 to 2,400 is three times it),
//! and sizes for each added to the traffic as it is, with its weight — a
//! surge that would refuse far more than a replica-hour costs keeps its
//! capacity even when it is rare. What overflows a scenario's capacity is
//! refused cheapest class first, and never costs less than the scenario's
//! queue at the edge of stability. With a lead time of zero it sizes for
//! the traffic as it is.
//!
//! Recommendations are stabilised as Kubernetes does it: up at once, down
//! only to the highest raw recommendation of the last `scale_down_window`.
//! With too little data the advisor says so instead of guessing; when
//! measurements stop, it keeps the last good recommendation and says it is
//! stale (KEDA #965).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify_core::CostModel;
//! use gratify_scaling::advisor::{AdvisorConfig, Measurements, Recommendation, ScalingAdvisor};
//! use tokio::time::Instant;
//!
//! let model = CostModel::from_toml(r#"
//!     [prices]
//!     replica_hour = 0.5
//!     [classes.api]
//!     delay_cost = { shape = "linear", per_second = 0.01, deadline = "2s" }
//!     refusal_cost = 0.05
//! "#).unwrap();
//! let advisor = ScalingAdvisor::new(&model, AdvisorConfig::new(4).replicas(1, 50));
//! let now = Instant::now();
//! // 400 requests a second, 50 ms each: 20 busy slots, 5 replicas' worth.
//! advisor.observe(now, Measurements::new(&model).rate("api", 400.0).service(0.05, 1.0).samples(10_000));
//! match advisor.recommend(now) {
//!     Recommendation::Replicas(advice) => {
//!         // Stable needs 6 (20 erlangs over 4 slots); the pooled view says 8, the
//!         // per-replica view (queues that cannot help each other) more: it is used.
//!         assert_eq!(advice.pooled_replicas, 8);
//!         assert!(advice.replicas > advice.pooled_replicas);
//!         assert_eq!(advice.replicas, advice.per_replica_replicas);
//!         // The square-root rule agrees with the pooled view within a replica.
//!         assert!(advice.bmr_replicas.abs_diff(advice.pooled_replicas) <= 1);
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use gratify_core::queueing::Mmc;
use gratify_core::{ClassId, CostModel};
use tokio::time::Instant;

/// The advisor's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdvisorConfig {
    /// Concurrency slots per replica (its concurrency limit).
    pub slots_per_replica: u32,
    /// The fewest replicas to recommend.
    pub min_replicas: u32,
    /// The most replicas to recommend (and to consider).
    pub max_replicas: u32,
    /// How long a lower recommendation must persist before scaling down
    /// (Kubernetes' default stabilisation window is 300 s).
    pub scale_down_window: Duration,
    /// Completed requests a measurement must rest on.
    pub min_samples: u64,
    /// A measurement older than this is stale: the last good recommendation
    /// stands, marked stale.
    pub stale_after: Duration,
    /// How long a replica asked for now takes to serve (scheduling, image
    /// pull, start-up, readiness): the traffic can grow for this long before
    /// more capacity arrives, so replicas are sized for the growth the
    /// traffic has shown over such spans (zero: for the current traffic
    /// alone).
    pub lead_time: Duration,
    /// How long a growth the traffic showed is remembered: its weight
    /// halves every `growth_half_life`.
    pub growth_half_life: Duration,
}

impl AdvisorConfig {
    /// Defaults for replicas of `slots_per_replica` slots: 1 to 100
    /// replicas, a 300 s scale-down window, 100 samples, stale after 120 s,
    /// a lead time of 60 s, growth remembered with a half-life of a day.
    pub fn new(slots_per_replica: u32) -> Self {
        Self {
            slots_per_replica: slots_per_replica.max(1),
            min_replicas: 1,
            max_replicas: 100,
            scale_down_window: Duration::from_secs(300),
            min_samples: 100,
            stale_after: Duration::from_secs(120),
            lead_time: Duration::from_secs(60),
            growth_half_life: Duration::from_secs(24 * 3600),
        }
    }

    /// Sets the lead time of a new replica (and with zero, sizes for the
    /// current traffic alone).
    #[must_use]
    pub fn lead_time(mut self, lead_time: Duration) -> Self {
        self.lead_time = lead_time;
        self
    }

    /// Sets how long a growth of the traffic is remembered (its half-life).
    #[must_use]
    pub fn growth_half_life(mut self, half_life: Duration) -> Self {
        self.growth_half_life = half_life;
        self
    }

    /// Sets the bounds (the smaller is taken as the minimum).
    #[must_use]
    pub fn replicas(mut self, min: u32, max: u32) -> Self {
        self.min_replicas = min.min(max).max(1);
        self.max_replicas = max.max(min).max(1);
        self
    }

    /// Sets the scale-down window.
    #[must_use]
    pub fn scale_down_window(mut self, window: Duration) -> Self {
        self.scale_down_window = window;
        self
    }
}

/// What the traffic is, over some recent interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurements {
    names: Vec<String>,
    /// Arrivals per second, by class index.
    rates: Vec<f64>,
    /// Mean service time (seconds) of one request holding one slot.
    mean_service: f64,
    /// Squared coefficient of variation of the service time (1 for
    /// exponential).
    scv: f64,
    /// Completed requests the figures rest on.
    samples: u64,
}

impl Measurements {
    /// No traffic yet, for `model`'s classes.
    pub fn new(model: &CostModel) -> Self {
        Self {
            names: model.iter().map(|(_, n, _)| n.to_owned()).collect(),
            rates: vec![0.0; model.len()],
            mean_service: 0.0,
            scv: 1.0,
            samples: 0,
        }
    }

    /// Sets the arrival rate (per second) of the class called `name`;
    /// unknown names are ignored.
    #[must_use]
    pub fn rate(mut self, name: &str, per_second: f64) -> Self {
        if let Some(k) = self.names.iter().position(|n| n == name) {
            self.rates[k] = clean(per_second);
        }
        self
    }

    /// Sets the arrival rate (per second) of `class`.
    #[must_use]
    pub fn rate_of(mut self, class: ClassId, per_second: f64) -> Self {
        if let Some(r) = self.rates.get_mut(class.index()) {
            *r = clean(per_second);
        }
        self
    }

    /// Sets the mean service time (seconds) and its squared coefficient of
    /// variation (1 for exponential service; measured, it is the variance
    /// over the squared mean).
    #[must_use]
    pub fn service(mut self, mean_seconds: f64, scv: f64) -> Self {
        self.mean_service = clean(mean_seconds);
        self.scv = if scv.is_finite() && scv >= 0.0 {
            scv
        } else {
            1.0
        };
        self
    }

    /// Sets how many completed requests the figures rest on.
    #[must_use]
    pub fn samples(mut self, n: u64) -> Self {
        self.samples = n;
        self
    }

    /// Total arrivals per second.
    pub fn arrival_rate(&self) -> f64 {
        self.rates.iter().sum()
    }

    /// Arrivals per second, by class name.
    pub fn rates(&self) -> impl Iterator<Item = (&str, f64)> {
        self.names
            .iter()
            .map(String::as_str)
            .zip(self.rates.iter().copied())
    }

    /// The mean service time (seconds).
    pub fn mean_service(&self) -> f64 {
        self.mean_service
    }

    /// The service time's squared coefficient of variation.
    pub fn service_scv(&self) -> f64 {
        self.scv
    }

    /// Completed requests the figures rest on.
    pub fn sample_count(&self) -> u64 {
        self.samples
    }

    /// The traffic of a fleet from what each of its replicas measured:
    /// rates summed class by class (by name; a class `model` does not have
    /// is left out), the service time's mean and squared coefficient of
    /// variation combined from each replica's first two moments, weighted
    /// by its samples; the samples summed.
    ///
    /// ```
    /// use gratify_core::CostModel;
    /// use gratify_scaling::advisor::Measurements;
    ///
    /// let model = CostModel::from_toml(r#"
    ///     [classes.api]
    ///     delay_cost = { shape = "linear", per_second = 0.01 }
    ///     refusal_cost = 0.05
    /// "#).unwrap();
    /// let a = Measurements::new(&model).rate("api", 100.0).service(0.05, 1.0).samples(1000);
    /// let b = Measurements::new(&model).rate("api", 300.0).service(0.05, 1.0).samples(3000);
    /// let fleet = Measurements::combine(&model, [&a, &b]);
    /// assert_eq!(fleet.arrival_rate(), 400.0);
    /// assert_eq!(fleet.sample_count(), 4000);
    /// assert!((fleet.mean_service() - 0.05).abs() < 1e-12);
    /// ```
    pub fn combine<'a>(model: &CostModel, parts: impl IntoIterator<Item = &'a Self>) -> Self {
        let mut fleet = Self::new(model);
        let (mut weight, mut first, mut second) = (0.0, 0.0, 0.0);
        for part in parts {
            for (name, rate) in part.rates() {
                if let Some(k) = fleet.names.iter().position(|n| n == name) {
                    fleet.rates[k] = clean(fleet.rates[k] + rate);
                }
            }
            fleet.samples = fleet.samples.saturating_add(part.samples);
            if part.samples > 0 && part.mean_service > 0.0 {
                let w = part.samples as f64;
                let m = part.mean_service;
                weight += w;
                first += w * m;
                second += w * (part.scv + 1.0) * m * m;
            }
        }
        if weight > 0.0 {
            let mean = first / weight;
            let scv = (second / weight) / (mean * mean) - 1.0;
            fleet = fleet.service(mean, scv.max(0.0));
        }
        fleet
    }

    /// Busy slots the traffic needs on average (erlangs).
    pub fn offered_load(&self) -> f64 {
        self.arrival_rate() * self.mean_service
    }
}

impl Measurements {
    /// The same traffic `factor` times as fast.
    fn scaled(&self, factor: f64) -> Self {
        let mut m = self.clone();
        for r in &mut m.rates {
            *r *= factor;
        }
        m
    }
}

/// The growth of the traffic over a lead time, as the advisor has seen it:
/// decayed weights of growth ratios in bins, each bin standing for its upper
/// edge (a decline or no growth stands for 1). A growth is measured against
/// the larger of the rate then and the usual level (the rate's mean,
/// weighted as the growth is), so that a quiet hour's relative jumps —
/// ten requests a second to fifty — do not read as surges at the peak.
#[derive(Debug, Default)]
struct Growth {
    /// Weight per bin of [`GROWTH_EDGES`], plus one for beyond the last.
    weights: [f64; GROWTH_EDGES.len() + 1],
    /// When the weights were last decayed.
    at: Option<Instant>,
    /// The usual level of the total arrival rate, when it was updated, and
    /// how many observations it rests on.
    level: Option<(Instant, f64, u32)>,
    /// Observations a lead time apart: when, and the reference a growth
    /// from then is measured against.
    rates: VecDeque<(Instant, f64, f64)>,
}

/// Upper edges of the growth bins (ratios of the arrival rate a lead time
/// apart); a ratio beyond the last counts as [`GROWTH_BEYOND`].
const GROWTH_EDGES: [f64; 15] = [
    1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0,
];
const GROWTH_BEYOND: f64 = 10.0;

impl Growth {
    /// Records the total arrival rate at `now`; with one observed a lead
    /// time earlier (the latest at or before), the ratio joins the bins.
    fn observe(&mut self, now: Instant, rate: f64, config: &AdvisorConfig) {
        let lead = config.lead_time;
        if lead.is_zero() || !rate.is_finite() || rate < 0.0 {
            return;
        }
        if self.level.is_some_and(|(at, _, _)| now < at) {
            // Out of order: nothing to learn from it.
            return;
        }
        let half_life = config.growth_half_life.as_secs_f64().max(1.0);
        let (level, n) = match self.level {
            None => (rate, 1),
            Some((at, level, n)) => {
                // A running mean at first (so that the first observation —
                // a burst, say — is not the level for a day), then weighted
                // by age.
                let decay =
                    0.5_f64.powf(now.saturating_duration_since(at).as_secs_f64() / half_life);
                let keep = decay.min(f64::from(n) / f64::from(n + 1));
                (level * keep + rate * (1.0 - keep), n.saturating_add(1))
            }
        };
        self.level = Some((now, level, n));
        // Judged before this observation joins: the growth from a lead
        // time ago to now.
        self.record(now, rate, lead, half_life);
        self.rates.push_back((now, rate, rate.max(level)));
    }

    /// The usual level of the rate (zero before any observation).
    fn level(&self) -> f64 {
        self.level.map_or(0.0, |(_, l, _)| l)
    }

    fn record(&mut self, now: Instant, rate: f64, lead: Duration, half_life: f64) {
        // Keep one observation at or before a lead time ago.
        while self.rates.len() > 1
            && self
                .rates
                .get(1)
                .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) >= lead)
        {
            self.rates.pop_front();
        }
        let Some(&(then, before, reference)) = self.rates.front() else {
            return;
        };
        let span = now.saturating_duration_since(then);
        // Too old a baseline (measurements stopped) says nothing about a
        // lead time's growth.
        if span < lead || span > lead.saturating_mul(2) || reference <= 0.0 {
            return;
        }
        if let Some(at) = self.at {
            let decay = 0.5_f64.powf(now.saturating_duration_since(at).as_secs_f64() / half_life);
            for w in &mut self.weights {
                *w *= decay;
            }
        }
        self.at = Some(now);
        // A weight that has faded to nothing is dropped (it would keep its
        // surge's range of replicas in every scan).
        let total: f64 = self.weights.iter().sum();
        for w in &mut self.weights {
            if *w < total * 1e-9 {
                *w = 0.0;
            }
        }
        // The rise, in units of the larger of the rate then and the usual
        // level: a quiet hour's jump from 10 to 50 a second is small against
        // a usual 1,000; a crowd from 600 to 2,400 is three times it.
        let ratio = 1.0 + (rate - before) / reference;
        let bin = GROWTH_EDGES
            .iter()
            .position(|edge| ratio <= *edge)
            .unwrap_or(GROWTH_EDGES.len());
        self.weights[bin] += 1.0;
    }

    /// (growth factor, probability) of the bins that have weight; no
    /// growth alone when nothing was seen.
    fn scenarios(&self) -> Vec<(f64, f64)> {
        let total: f64 = self.weights.iter().sum();
        if total <= 0.0 {
            return vec![(1.0, 1.0)];
        }
        self.weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w > 0.0)
            .map(|(i, w)| {
                (
                    GROWTH_EDGES.get(i).copied().unwrap_or(GROWTH_BEYOND),
                    w / total,
                )
            })
            .collect()
    }
}

fn clean(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// The cost of running `replicas` replicas, per second.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct CostRow {
    /// Replicas.
    pub replicas: u32,
    /// What they cost.
    pub replica_cost: f64,
    /// Expected delay cost (lateness included) in the pooled view; infinite
    /// when unstable.
    pub pooled_delay_cost: f64,
    /// The same in the per-replica view.
    pub per_replica_delay_cost: f64,
}

impl CostRow {
    /// Replica cost plus the more pessimistic delay cost.
    pub fn total(&self) -> f64 {
        self.replica_cost + self.pooled_delay_cost.max(self.per_replica_delay_cost)
    }
}

/// A recommendation and why.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Advice {
    /// Replicas to run (stabilised, within the bounds).
    pub replicas: u32,
    /// The cost-optimal count before stabilisation.
    pub raw: u32,
    /// The optimum of the pooled view alone.
    pub pooled_replicas: u32,
    /// The optimum of the per-replica view alone.
    pub per_replica_replicas: u32,
    /// The Borst–Mandelbaum–Reiman square-root rule (cross-check).
    pub bmr_replicas: u32,
    /// Busy slots the traffic needs (erlangs).
    pub offered_load: f64,
    /// The cost per second at `raw` replicas.
    pub cost: CostRow,
    /// Costs around the optimum (from the fewest stable replicas, up to ten
    /// rows), for reports.
    pub table: Vec<CostRow>,
}

/// What the advisor can say now.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Recommendation {
    /// A recommendation from fresh measurements.
    Replicas(Advice),
    /// The last good recommendation: measurements stopped or turned too thin.
    Stale(Advice),
    /// Not enough data yet to recommend anything.
    InsufficientData,
}

impl Recommendation {
    /// The advised count, fresh or stale.
    pub fn replicas(&self) -> Option<u32> {
        match self {
            Self::Replicas(a) | Self::Stale(a) => Some(a.replicas),
            Self::InsufficientData => None,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    latest: Option<(Instant, Measurements)>,
    growth: Growth,
    /// Raw recommendations over the scale-down window.
    history: VecDeque<(Instant, u32)>,
    last_good: Option<Advice>,
}

/// Recommends replicas by the delay-cost model; see the
/// [module docs](self). Shareable (`&self` methods).
#[derive(Debug)]
pub struct ScalingAdvisor {
    model: CostModel,
    config: AdvisorConfig,
    state: Mutex<State>,
}

impl ScalingAdvisor {
    /// An advisor for `model`'s classes and prices.
    pub fn new(model: &CostModel, config: AdvisorConfig) -> Self {
        Self {
            model: model.clone(),
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AdvisorConfig {
        &self.config
    }

    /// Takes measurements made at `now`.
    pub fn observe(&self, now: Instant, measurements: Measurements) {
        let mut s = self.lock();
        if measurements.samples >= self.config.min_samples {
            let rate = measurements.arrival_rate();
            s.growth.observe(now, rate, &self.config);
        }
        s.latest = Some((now, measurements));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cost per second of `replicas` replicas for `m`.
    pub fn cost(&self, m: &Measurements, replicas: u32) -> CostRow {
        let slots = self.config.slots_per_replica;
        let replica_cost = f64::from(replicas) * self.model.prices().replica_hour / 3600.0;
        let ac = (1.0 + m.scv) / 2.0;
        let lambda = m.arrival_rate();
        // Expected delay cost per second of all classes through `queue`
        // (infinite when there is no stable queue).
        let delay = |queue: Option<Mmc>| -> f64 {
            let Some(q) = queue else {
                return f64::INFINITY;
            };
            let (p, theta) = (q.prob_wait(), q.tail_rate() / ac.max(1e-9));
            self.model
                .iter()
                .zip(&m.rates)
                .map(|((_, _, class), rate)| rate * class.expected_cost_exponential(p, theta))
                .sum()
        };
        let (pooled, per_replica) = if lambda <= 0.0 || m.mean_service <= 0.0 {
            (0.0, 0.0)
        } else {
            let pooled = Mmc::new(lambda, m.mean_service, replicas.saturating_mul(slots)).ok();
            let one = Mmc::new(lambda / f64::from(replicas.max(1)), m.mean_service, slots).ok();
            (delay(pooled), delay(one))
        };
        CostRow {
            replicas,
            replica_cost,
            pooled_delay_cost: pooled,
            per_replica_delay_cost: per_replica,
        }
    }

    /// The recommendation at `now`.
    pub fn recommend(&self, now: Instant) -> Recommendation {
        let s = self.lock();
        let fresh = s.latest.as_ref().filter(|(at, m)| {
            now.saturating_duration_since(*at) <= self.config.stale_after
                && m.samples >= self.config.min_samples
        });
        let Some((_, m)) = fresh.cloned() else {
            return match &s.last_good {
                Some(a) => Recommendation::Stale(a.clone()),
                None => Recommendation::InsufficientData,
            };
        };
        let growth = s.growth.scenarios();
        let level = s.growth.level();
        // The scan below runs without the lock: observations go on.
        drop(s);
        let (min, max) = (self.config.min_replicas, self.config.max_replicas);
        let a = m.offered_load();
        let slots = f64::from(self.config.slots_per_replica);
        // The fewest replicas whose pooled queue is stable.
        let stable = ((a / slots).floor() as u32 + 1).clamp(min, max);
        // The traffic a lead time from now, by the rises seen before (each
        // in units of the larger of the rate and the usual level, so added
        // to the traffic as it is in the same units): the replicas asked
        // for now are what serves it.
        let now_rate = m.arrival_rate();
        let unit = now_rate.max(level);
        let scenarios: Vec<(f64, Measurements)> = growth
            .into_iter()
            .map(|(g, p)| {
                let factor = if now_rate > 0.0 {
                    1.0 + (g - 1.0).max(0.0) * unit / now_rate
                } else {
                    1.0
                };
                (p, m.scaled(factor))
            })
            .collect();
        // Classes by refusal cost, cheapest first: an overflow refuses the
        // cheapest first, as the limiter does.
        let mut by_refusal: Vec<(usize, f64)> = self
            .model
            .iter()
            .enumerate()
            .map(|(i, (_, _, c))| (i, c.refusal_cost()))
            .collect();
        by_refusal.sort_by(|x, y| x.1.total_cmp(&y.1));
        let overflow = |m: &Measurements, n: u32| -> f64 {
            let capacity = f64::from(n) * slots / m.mean_service.max(1e-9);
            let mut excess = (m.arrival_rate() - capacity).max(0.0);
            let mut cost = 0.0;
            for (i, refusal) in &by_refusal {
                let refused = excess.min(m.rates.get(*i).copied().unwrap_or(0.0));
                cost += refused * refusal;
                excess -= refused;
            }
            cost
        };
        // Each scenario's delay cost where its queue first turns stable: an
        // unstable count never costs less than that (what it would refuse
        // is priced, and so is a queue at the edge of stability), so no
        // scenario looks cheaper with fewer replicas.
        let edge: Vec<[f64; 3]> = scenarios
            .iter()
            .map(|(_, m)| {
                let n = ((m.offered_load() / slots).floor() as u32 + 1).max(1);
                let row = self.cost(m, n);
                [
                    row.pooled_delay_cost.max(row.per_replica_delay_cost),
                    row.pooled_delay_cost,
                    row.per_replica_delay_cost,
                ]
            })
            .collect();
        // The expected cost per second of `n` replicas over the scenarios,
        // in the three views: both queues' pessimist, pooled, per replica.
        let expected = |n: u32| -> [f64; 3] {
            let mut sum = [0.0; 3];
            for ((p, m), edge) in scenarios.iter().zip(&edge) {
                let row = self.cost(m, n);
                let delay = [
                    row.pooled_delay_cost.max(row.per_replica_delay_cost),
                    row.pooled_delay_cost,
                    row.per_replica_delay_cost,
                ];
                for ((total, d), e) in sum.iter_mut().zip(delay).zip(edge) {
                    let d = if d.is_finite() {
                        d
                    } else {
                        overflow(m, n).max(if e.is_finite() { *e } else { 0.0 })
                    };
                    *total += p * (row.replica_cost + d);
                }
            }
            sum
        };
        // Past the count that keeps the largest scenario's queue stable,
        // every scenario's cost only falls and flattens.
        let surge_stable = scenarios
            .iter()
            .map(|(_, m)| (m.offered_load() / slots).floor() as u32 + 1)
            .max()
            .unwrap_or(stable)
            .clamp(stable, max);
        let mut best = [(f64::INFINITY, max); 3];
        for n in stable..=max {
            let costs = expected(n);
            for (b, c) in best.iter_mut().zip(costs) {
                if c < b.0 {
                    *b = (c, n);
                }
            }
            // Delay cost falls and flattens as replicas are added while
            // their cost grows linearly: a few counts past every view's best
            // without a new best (and past every scenario's unstable range),
            // the optimum is found.
            if n > surge_stable
                && best
                    .iter()
                    .zip(costs)
                    .all(|(b, c)| n >= b.1.saturating_add(4) && c > b.0)
            {
                break;
            }
        }
        let [raw, pooled_replicas, per_replica_replicas] = best.map(|(_, n)| n);
        // Square-root staffing with the cost-optimal β of BMR, from the
        // traffic-weighted linear delay rate.
        let lambda = m.arrival_rate();
        let rate = if lambda > 0.0 {
            self.model
                .iter()
                .zip(&m.rates)
                .map(|((_, _, c), r)| r * c.urgency(0.0))
                .sum::<f64>()
                / lambda
        } else {
            0.0
        };
        let server_price = self.model.prices().replica_hour / 3600.0 / slots;
        let beta = gratify_core::queueing::bmr_beta(rate, server_price);
        let bmr_slots = gratify_core::queueing::sqrt_staffing(a, beta);
        let bmr_replicas = (f64::from(bmr_slots) / slots).ceil().max(1.0) as u32;
        // Stabilise: up at once; down to the highest raw count in the window.
        let mut s = self.lock();
        s.history.push_back((now, raw));
        let window = self.config.scale_down_window;
        while s
            .history
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
        {
            s.history.pop_front();
        }
        let replicas = s
            .history
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(raw)
            .clamp(min, max);
        let table = (stable..=max.min(stable + 9))
            .map(|n| self.cost(&m, n))
            .collect();
        let advice = Advice {
            replicas,
            raw,
            pooled_replicas,
            per_replica_replicas,
            bmr_replicas,
            offered_load: a,
            cost: self.cost(&m, raw),
            table,
        };
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!(gratify_core::telemetry::RECOMMENDED_REPLICAS.name)
                .set(f64::from(replicas));
            metrics::gauge!(gratify_core::telemetry::ADVISOR_REPLICA_COST.name)
                .set(advice.cost.replica_cost);
            metrics::gauge!(gratify_core::telemetry::ADVISOR_DELAY_COST.name).set(
                advice
                    .cost
                    .pooled_delay_cost
                    .max(advice.cost.per_replica_delay_cost),
            );
        }
        s.last_good = Some(advice.clone());
        Recommendation::Replicas(advice)
    }
}

/// Turns a [`Limiter`](crate::limit::Limiter)'s counters into
/// [`Measurements`] for an advisor: arrivals per class from what it admitted
/// and shed since the last call, the mean and squared coefficient of
/// variation of the service time from the time requests hold their slots,
/// the samples from what completed.
#[derive(Debug)]
pub struct LimiterFeed {
    model: CostModel,
    scv: Option<f64>,
    last: Option<(Instant, Vec<u64>, u64)>,
}

impl LimiterFeed {
    /// A feed for `model`'s classes, taking the service time's variability
    /// from the limiter.
    pub fn new(model: &CostModel) -> Self {
        Self {
            model: model.clone(),
            scv: None,
            last: None,
        }
    }

    /// Uses `scv` as the service time's squared coefficient of variation
    /// instead of the limiter's estimate.
    #[must_use]
    pub fn assume_scv(mut self, scv: f64) -> Self {
        self.scv = Some(scv);
        self
    }

    /// Reads `limiter` at `now` and, from the second call on, gives the
    /// advisor what happened since the previous one.
    pub fn feed(
        &mut self,
        advisor: &ScalingAdvisor,
        limiter: &crate::limit::Limiter,
        now: Instant,
    ) {
        if let Some(m) = self.measure(limiter, now) {
            advisor.observe(now, m);
        }
    }

    /// Reads `limiter` at `now` and, from the second call on, returns what
    /// happened since the previous one (to combine with other replicas'
    /// before an advisor sees it).
    pub fn measure(
        &mut self,
        limiter: &crate::limit::Limiter,
        now: Instant,
    ) -> Option<Measurements> {
        let mut out = None;
        let stats = limiter.stats();
        let arrived: Vec<u64> = stats
            .classes
            .iter()
            .map(|c| c.admitted + c.shed_total())
            .collect();
        let completed: u64 = stats.classes.iter().map(|c| c.completed).sum();
        if let Some((then, before, done_before)) = &self.last {
            let secs = now.saturating_duration_since(*then).as_secs_f64();
            if secs > 0.0 {
                let mut m = Measurements::new(&self.model)
                    .service(stats.latency, self.scv.unwrap_or(stats.latency_scv))
                    .samples(completed.saturating_sub(*done_before));
                for (k, (a, b)) in arrived.iter().zip(before).enumerate() {
                    m = m.rate_of(
                        ClassId::from_index(k as u16),
                        a.saturating_sub(*b) as f64 / secs,
                    );
                }
                out = Some(m);
            }
        }
        self.last = Some((now, arrived, completed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(replica_hour: f64, per_second: f64) -> CostModel {
        CostModel::from_toml(&format!(
            r#"
            [prices]
            replica_hour = {replica_hour}
            [classes.api]
            delay_cost = {{ shape = "linear", per_second = {per_second} }}
            refusal_cost = 0.0
            "#
        ))
        .unwrap()
    }

    fn advice(r: Recommendation) -> Advice {
        match r {
            Recommendation::Replicas(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_optimum_is_the_cheapest_row_and_grows_with_delay_cost() {
        let m = model(1.0, 0.01);
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(4).replicas(1, 200));
        let traffic = Measurements::new(&m)
            .rate("api", 200.0)
            .service(0.1, 1.0)
            .samples(1000);
        adv.observe(Instant::now(), traffic.clone());
        let a = advice(adv.recommend(Instant::now()));
        // 20 erlangs over 4-slot replicas: at least 6 replicas to be stable.
        assert!(a.raw >= 6, "{a:?}");
        let brute = (6..=40)
            .map(|n| adv.cost(&traffic, n))
            .min_by(|x, y| x.total().total_cmp(&y.total()))
            .unwrap();
        assert_eq!(a.raw, brute.replicas);
        // Delay ten times dearer: more replicas.
        let dear = model(1.0, 0.1);
        let adv2 = ScalingAdvisor::new(&dear, AdvisorConfig::new(4).replicas(1, 200));
        adv2.observe(
            Instant::now(),
            Measurements::new(&dear)
                .rate("api", 200.0)
                .service(0.1, 1.0)
                .samples(1000),
        );
        assert!(advice(adv2.recommend(Instant::now())).raw > a.raw);
    }

    #[tokio::test(start_paused = true)]
    async fn variable_service_times_need_more_and_per_replica_is_the_pessimist() {
        let m = model(1.0, 0.05);
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(2).replicas(1, 200));
        let base = Measurements::new(&m)
            .rate("api", 100.0)
            .service(0.1, 1.0)
            .samples(1000);
        let c1 = adv.cost(&base, 7);
        let c4 = adv.cost(&base.clone().service(0.1, 4.0), 7);
        assert!(
            c4.pooled_delay_cost > c1.pooled_delay_cost * 2.0,
            "{c1:?} {c4:?}"
        );
        assert!(c1.per_replica_delay_cost >= c1.pooled_delay_cost, "{c1:?}");
        adv.observe(Instant::now(), base);
        let a = advice(adv.recommend(Instant::now()));
        assert!(a.raw >= a.pooled_replicas, "{a:?}");
        assert_eq!(a.raw, a.per_replica_replicas, "{a:?}");
        // The square-root rule lands near the optimum.
        assert!(a.bmr_replicas.abs_diff(a.pooled_replicas) <= 2, "{a:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn up_at_once_down_only_after_the_window() {
        let m = model(1.0, 0.05);
        let adv = ScalingAdvisor::new(
            &m,
            AdvisorConfig::new(4)
                .replicas(2, 100)
                .scale_down_window(Duration::from_secs(300)),
        );
        let at = |rate: f64| {
            Measurements::new(&m)
                .rate("api", rate)
                .service(0.1, 1.0)
                .samples(1000)
        };
        adv.observe(Instant::now(), at(100.0));
        let low = advice(adv.recommend(Instant::now())).replicas;
        adv.observe(Instant::now(), at(400.0));
        let high = advice(adv.recommend(Instant::now())).replicas;
        assert!(high > low, "{low} then {high}");
        // Traffic falls back: the count stays up for the window...
        tokio::time::advance(Duration::from_secs(60)).await;
        adv.observe(Instant::now(), at(100.0));
        assert_eq!(advice(adv.recommend(Instant::now())).replicas, high);
        // ... and comes down once the high recommendation has left it.
        tokio::time::advance(Duration::from_secs(300)).await;
        adv.observe(Instant::now(), at(100.0));
        assert_eq!(advice(adv.recommend(Instant::now())).replicas, low);
    }

    /// A model where a refused request costs far more than a replica-hour.
    fn surge_model() -> CostModel {
        CostModel::from_toml(
            r#"
            [prices]
            replica_hour = 0.2
            [classes.api]
            delay_cost = { shape = "linear", per_second = 0.01, deadline = "2s" }
            refusal_cost = 0.1
            "#,
        )
        .unwrap()
    }

    fn traffic(m: &CostModel, rate: f64) -> Measurements {
        Measurements::new(m)
            .rate("api", rate)
            .service(0.05, 1.0)
            .samples(10_000)
    }

    /// Observes `rate` every 15 s for `seconds`, then recommends.
    async fn hold(adv: &ScalingAdvisor, m: &CostModel, rate: f64, seconds: u64) -> Advice {
        for _ in 0..seconds / 15 {
            adv.observe(Instant::now(), traffic(m, rate));
            tokio::time::advance(Duration::from_secs(15)).await;
        }
        adv.observe(Instant::now(), traffic(m, rate));
        advice(adv.recommend(Instant::now()))
    }

    /// Replicas of 8 slots at 50 ms serve 160 requests a second each.
    fn serves(replicas: u32, rate: f64) -> bool {
        f64::from(replicas) * 160.0 >= rate
    }

    #[tokio::test(start_paused = true)]
    async fn a_surge_seen_once_is_provisioned_for_within_a_lead_time_next_time() {
        let m = surge_model();
        for lead in [Duration::ZERO, Duration::from_secs(60)] {
            let adv =
                ScalingAdvisor::new(&m, AdvisorConfig::new(8).replicas(1, 100).lead_time(lead));
            let before = hold(&adv, &m, 400.0, 1800).await.raw;
            // A flash crowd: ×4 within a minute, for ten, then gone.
            hold(&adv, &m, 1600.0, 600).await;
            let after = hold(&adv, &m, 400.0, 1800).await;
            if lead.is_zero() {
                // Sized for the traffic as it is: the surge is forgotten.
                assert_eq!(after.raw, before, "no lead time");
            } else {
                // The next one would come faster than a replica: the
                // capacity for it is kept.
                assert!(!serves(before, 1600.0), "{before}");
                assert!(serves(after.raw, 1600.0), "{before} then {}", after.raw);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_hours_jumps_do_not_read_as_surges_at_the_peak() {
        let m = surge_model();
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(8).replicas(1, 100));
        let fresh = ScalingAdvisor::new(&m, AdvisorConfig::new(8).replicas(1, 100));
        let plain = hold(&fresh, &m, 1000.0, 60).await.raw;
        // A day's usual level, then a night of jumps ten times over (10 to
        // 100 requests a second): small against the usual level.
        hold(&adv, &m, 1000.0, 4 * 3600).await;
        for _ in 0..20 {
            hold(&adv, &m, 10.0, 60).await;
            hold(&adv, &m, 100.0, 60).await;
        }
        // The morning comes as mornings do, over two hours.
        for step in 0..=120 {
            hold(&adv, &m, 100.0 + 900.0 * f64::from(step) / 120.0, 60).await;
        }
        let peak = hold(&adv, &m, 1000.0, 60).await;
        // Ten times over at night would be ten times the fleet at the peak
        // if jumps were taken as ratios; a replica of headroom at most.
        assert!(
            peak.raw <= plain + 1,
            "the night's jumps made the peak {} (not {plain})",
            peak.raw
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_surge_is_forgotten_over_its_half_life_and_a_gap_is_no_surge() {
        let m = surge_model();
        let config = AdvisorConfig::new(8)
            .replicas(1, 100)
            .growth_half_life(Duration::from_secs(600));
        let adv = ScalingAdvisor::new(&m, config.clone());
        let before = hold(&adv, &m, 400.0, 1800).await.raw;
        hold(&adv, &m, 1600.0, 120).await;
        // Ten hours of steady traffic: sixty half-lives.
        let later = hold(&adv, &m, 400.0, 10 * 3600).await;
        assert_eq!(later.raw, before);
        // Measurements stop for ten minutes and resume four times higher:
        // nothing says how fast it grew.
        let gap = ScalingAdvisor::new(&m, config);
        let before = hold(&gap, &m, 400.0, 600).await.raw;
        tokio::time::advance(Duration::from_secs(600)).await;
        hold(&gap, &m, 1600.0, 0).await;
        tokio::time::advance(Duration::from_secs(15)).await;
        let after = hold(&gap, &m, 400.0, 1800).await;
        assert_eq!(after.raw, before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_noisy_day_keeps_no_day_sized_fleet_at_night() {
        let m = surge_model();
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(8).replicas(1, 100));
        let fresh = |rate: f64| {
            let m = &m;
            async move {
                let fresh = ScalingAdvisor::new(m, AdvisorConfig::new(8).replicas(1, 100));
                hold(&fresh, m, rate, 60).await.raw
            }
        };
        // The day's fleet, and what the day's minute-to-minute noise — a
        // rise of a tenth of its level, counted at its bin's top (a fifth) —
        // needs at night.
        let (day, noise) = (fresh(1000.0).await, fresh(10.0 + 200.0).await);
        // A day around 1,000 a second, ±5% from one minute to the next: half
        // its growths are a rise of a tenth of the usual level.
        for i in 0..240 {
            let rate = if i % 2 == 0 { 950.0 } else { 1050.0 };
            hold(&adv, &m, rate, 60).await;
        }
        let at_night = hold(&adv, &m, 10.0, 600).await;
        // Headroom for such a rise at most, never the day's fleet.
        assert!(
            at_night.raw <= noise && at_night.raw * 2 < day,
            "night {} against {noise} for the day's noise and {day} for the day",
            at_night.raw
        );
    }

    #[tokio::test(start_paused = true)]
    async fn growth_is_learned_whatever_the_feed_interval_and_from_a_bursty_start() {
        let m = surge_model();
        // Fed every 90 s, with a lead time of 60 s.
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(8).replicas(1, 100));
        let observe_for = |rate: f64, times: usize| {
            let adv = &adv;
            let m = &m;
            async move {
                for _ in 0..times {
                    adv.observe(Instant::now(), traffic(m, rate));
                    tokio::time::advance(Duration::from_secs(90)).await;
                }
                adv.observe(Instant::now(), traffic(m, rate));
                advice(adv.recommend(Instant::now()))
            }
        };
        // Starting in a burst: the usual level is not that burst.
        observe_for(5000.0, 0).await;
        let before = observe_for(400.0, 40).await.raw;
        assert!(
            adv.lock().growth.level() < 600.0,
            "{}",
            adv.lock().growth.level()
        );
        observe_for(1600.0, 2).await;
        let after = observe_for(400.0, 20).await.raw;
        assert!(
            !serves(before, 1600.0) && serves(after, 1600.0),
            "{before} then {after}"
        );
    }

    #[test]
    fn a_fleet_combines_rates_and_service_moments() {
        let m = model(1.0, 0.01);
        let a = Measurements::new(&m)
            .rate("api", 10.0)
            .service(0.1, 0.0)
            .samples(100);
        let b = Measurements::new(&m)
            .rate("api", 30.0)
            .service(0.3, 0.0)
            .samples(100);
        // A replica with no completions says nothing of the service time.
        let c = Measurements::new(&m)
            .rate("api", 5.0)
            .service(9.0, 9.0)
            .samples(0);
        let fleet = Measurements::combine(&m, [&a, &b, &c]);
        assert!((fleet.arrival_rate() - 45.0).abs() < 1e-12);
        assert_eq!(fleet.sample_count(), 200);
        // Two deterministic service times, 0.1 and 0.3: mean 0.2, second
        // moment 0.05, squared CV 0.05 / 0.04 - 1.
        assert!((fleet.mean_service() - 0.2).abs() < 1e-12);
        assert!((fleet.service_scv() - 0.25).abs() < 1e-9);
        assert_eq!(Measurements::combine(&m, []), Measurements::new(&m));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_feeds_the_advisor() {
        use crate::limit::Limiter;
        let m = model(1.0, 0.05);
        let limiter = Limiter::new(&m);
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(4));
        let mut feed = LimiterFeed::new(&m);
        feed.feed(&adv, &limiter, Instant::now());
        assert_eq!(
            adv.recommend(Instant::now()),
            Recommendation::InsufficientData
        );
        // 200 requests of 10 ms, one after another: 2 s.
        let api = m.id("api").unwrap();
        for _ in 0..200 {
            let crate::limit::limiter::Acquire::Admitted(permit) = limiter.acquire(api) else {
                panic!("refused");
            };
            tokio::time::advance(Duration::from_millis(10)).await;
            permit.complete(crate::limit::Outcome::Success);
        }
        feed.feed(&adv, &limiter, Instant::now());
        let a = advice(adv.recommend(Instant::now()));
        // 100 requests a second of ~10 ms: one erlang; one replica of 4 slots.
        assert!((a.offered_load - 1.0).abs() < 0.2, "{a:?}");
        assert!(a.replicas >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn recommendations_stay_within_the_bounds() {
        let m = model(1.0, 0.05);
        let at = |rate: f64| {
            Measurements::new(&m)
                .rate("api", rate)
                .service(0.1, 1.0)
                .samples(1000)
        };
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(4).replicas(2, 5));
        adv.observe(Instant::now(), at(0.01));
        assert_eq!(advice(adv.recommend(Instant::now())).replicas, 2);
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(4).replicas(2, 5));
        adv.observe(Instant::now(), at(10_000.0));
        assert_eq!(advice(adv.recommend(Instant::now())).replicas, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn no_guess_without_data_and_the_last_good_when_data_stops() {
        let m = model(1.0, 0.05);
        let adv = ScalingAdvisor::new(&m, AdvisorConfig::new(4));
        assert_eq!(
            adv.recommend(Instant::now()),
            Recommendation::InsufficientData
        );
        let thin = Measurements::new(&m)
            .rate("api", 100.0)
            .service(0.1, 1.0)
            .samples(5);
        adv.observe(Instant::now(), thin.clone());
        assert_eq!(
            adv.recommend(Instant::now()),
            Recommendation::InsufficientData
        );
        adv.observe(Instant::now(), thin.samples(1000));
        let good = advice(adv.recommend(Instant::now()));
        // Measurements stop: the last good recommendation, marked stale.
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(
            adv.recommend(Instant::now()),
            Recommendation::Stale(good.clone())
        );
        assert_eq!(
            adv.recommend(Instant::now()).replicas(),
            Some(good.replicas)
        );
    }
}
