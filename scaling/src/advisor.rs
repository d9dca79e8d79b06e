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
}

impl AdvisorConfig {
    /// Defaults for replicas of `slots_per_replica` slots: 1 to 100
    /// replicas, a 300 s scale-down window, 100 samples, stale after 120 s.
    pub fn new(slots_per_replica: u32) -> Self {
        Self {
            slots_per_replica: slots_per_replica.max(1),
            min_replicas: 1,
            max_replicas: 100,
            scale_down_window: Duration::from_secs(300),
            min_samples: 100,
            stale_after: Duration::from_secs(120),
        }
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

    /// Busy slots the traffic needs on average (erlangs).
    pub fn offered_load(&self) -> f64 {
        self.arrival_rate() * self.mean_service
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
        let mut s = self.lock();
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
        let (min, max) = (self.config.min_replicas, self.config.max_replicas);
        let a = m.offered_load();
        let slots = f64::from(self.config.slots_per_replica);
        // The fewest replicas whose pooled queue is stable.
        let stable = ((a / slots).floor() as u32 + 1).clamp(min, max);
        let argmin = |f: &dyn Fn(&CostRow) -> f64| -> u32 {
            let mut best = (f64::INFINITY, max);
            for n in stable..=max {
                let c = f(&self.cost(&m, n));
                if c < best.0 {
                    best = (c, n);
                }
                // Delay cost falls and flattens as replicas are added while
                // their cost grows linearly: a few counts past the best
                // without a new best, the optimum is found.
                if n >= best.1.saturating_add(4) && c > best.0 {
                    break;
                }
            }
            best.1
        };
        let raw = argmin(&CostRow::total);
        let pooled_replicas = argmin(&|r: &CostRow| r.replica_cost + r.pooled_delay_cost);
        let per_replica_replicas = argmin(&|r: &CostRow| r.replica_cost + r.per_replica_delay_cost);
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
            metrics::gauge!("gratify_recommended_replicas").set(f64::from(replicas));
            metrics::gauge!("gratify_advisor_replica_cost").set(advice.cost.replica_cost);
            metrics::gauge!("gratify_advisor_delay_cost").set(
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
                advisor.observe(now, m);
            }
        }
        self.last = Some((now, arrived, completed));
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
