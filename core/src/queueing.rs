//! Queueing maths: Erlang B and C, the M/M/c queue, Little's law, and
//! cost-optimal staffing.
//!
//! Everything is in seconds and "per second". Erlang B is computed by the
//! numerically stable recursion `B(k) = a·B(k−1) / (k + a·B(k−1))`, and
//! Erlang C from it as `C = c·B / (c − a·(1 − B))`; both stay accurate for
//! thousands of servers and offered loads near `c`. An unstable system
//! (`λ ≥ cμ`) is an explicit [`QueueError::Unstable`], never NaN.
//!
//! # Example: the seed e-commerce site
//!
//! 10,000 orders a day, 1 s of work each, 0.1 per second an order waits:
//!
//! ```
//! use gratify_core::queueing::Mmc;
//!
//! let per_second = 10_000.0 / 86_400.0;
//! let one = Mmc::new(per_second, 1.0, 1)?;
//! assert!((one.prob_wait() - 0.1157).abs() < 1e-3);
//! let daily_cost = 10_000.0 * one.mean_wait() * 0.1;
//! assert!((daily_cost - 130.9).abs() < 0.1);
//!
//! let two = Mmc::new(per_second, 1.0, 2)?;
//! assert!((10_000.0 * two.mean_wait() * 0.1 - 3.36).abs() < 0.01);
//! # Ok::<(), gratify_core::queueing::QueueError>(())
//! ```

use crate::cost::Class;

/// An invalid or unstable queueing question.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// A rate or time is negative, NaN or infinite (or a service time is zero).
    #[error("{what} must be finite and {constraint}, got {value}")]
    InvalidInput {
        /// Which input.
        what: &'static str,
        /// What it must be.
        constraint: &'static str,
        /// The value given.
        value: f64,
    },
    /// Zero servers.
    #[error("at least one server is needed")]
    NoServers,
    /// Arrivals reach or exceed capacity (`λ ≥ cμ`): the queue grows without bound.
    #[error(
        "unstable: offered load {offered_load:.3} erlangs needs more than {servers} servers (utilisation {utilisation:.3})"
    )]
    Unstable {
        /// `λ/μ`, in erlangs.
        offered_load: f64,
        /// The servers.
        servers: u32,
        /// `λ/(cμ)`, at least 1.
        utilisation: f64,
    },
}

fn check(what: &'static str, value: f64, positive: bool) -> Result<f64, QueueError> {
    let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
    if ok {
        Ok(value)
    } else {
        Err(QueueError::InvalidInput {
            what,
            constraint: if positive { "positive" } else { "non-negative" },
            value,
        })
    }
}

/// Erlang B: the probability that an arrival finds all `servers` busy in a
/// loss system (M/M/c/c) offered `offered_load` erlangs.
///
/// # Errors
///
/// [`QueueError::NoServers`], or [`QueueError::InvalidInput`] for a negative,
/// NaN or infinite load.
pub fn erlang_b(servers: u32, offered_load: f64) -> Result<f64, QueueError> {
    if servers == 0 {
        return Err(QueueError::NoServers);
    }
    let a = check("offered load", offered_load, false)?;
    let mut b = 1.0;
    for k in 1..=servers {
        b = a * b / (f64::from(k) + a * b);
    }
    Ok(b)
}

/// Erlang C: the probability that an arrival waits in an M/M/c queue with
/// `servers` servers offered `offered_load` erlangs.
///
/// # Errors
///
/// As [`erlang_b`], and [`QueueError::Unstable`] when `offered_load ≥ servers`.
pub fn erlang_c(servers: u32, offered_load: f64) -> Result<f64, QueueError> {
    let b = erlang_b(servers, offered_load)?;
    erlang_c_from_b(servers, offered_load, b)
}

fn erlang_c_from_b(servers: u32, a: f64, b: f64) -> Result<f64, QueueError> {
    let c = f64::from(servers);
    if a >= c {
        return Err(QueueError::Unstable {
            offered_load: a,
            servers,
            utilisation: a / c,
        });
    }
    Ok((c * b / (c - a * (1.0 - b))).clamp(0.0, 1.0))
}

/// A stable M/M/c queue: Poisson arrivals, exponential service, `c` servers,
/// first come first served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mmc {
    arrival_rate: f64,
    service_rate: f64,
    servers: u32,
    prob_wait: f64,
}

impl Mmc {
    /// The queue with `arrival_rate` per second, `mean_service` seconds of
    /// work per request, and `servers` servers.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidInput`] (the service time must be positive),
    /// [`QueueError::NoServers`], or [`QueueError::Unstable`].
    pub fn new(arrival_rate: f64, mean_service: f64, servers: u32) -> Result<Self, QueueError> {
        let arrival_rate = check("arrival rate", arrival_rate, false)?;
        let mean_service = check("mean service time", mean_service, true)?;
        let a = arrival_rate * mean_service;
        let prob_wait = erlang_c(servers, a)?;
        Ok(Self {
            arrival_rate,
            service_rate: 1.0 / mean_service,
            servers,
            prob_wait,
        })
    }

    fn from_parts(arrival_rate: f64, service_rate: f64, servers: u32, prob_wait: f64) -> Self {
        Self {
            arrival_rate,
            service_rate,
            servers,
            prob_wait,
        }
    }

    /// Arrivals per second (`λ`).
    pub fn arrival_rate(&self) -> f64 {
        self.arrival_rate
    }

    /// Completions per second per server (`μ`).
    pub fn service_rate(&self) -> f64 {
        self.service_rate
    }

    /// The number of servers (`c`).
    pub fn servers(&self) -> u32 {
        self.servers
    }

    /// The offered load `a = λ/μ`, in erlangs.
    pub fn offered_load(&self) -> f64 {
        self.arrival_rate / self.service_rate
    }

    /// Utilisation `ρ = λ/(cμ)`, below 1.
    pub fn utilisation(&self) -> f64 {
        self.offered_load() / f64::from(self.servers)
    }

    /// The probability that an arrival waits (Erlang C).
    pub fn prob_wait(&self) -> f64 {
        self.prob_wait
    }

    /// The rate `θ = cμ − λ` of the exponential tail of the wait.
    pub fn tail_rate(&self) -> f64 {
        f64::from(self.servers) * self.service_rate - self.arrival_rate
    }

    /// The mean wait in the queue, `W_q = C / (cμ − λ)`, in seconds.
    pub fn mean_wait(&self) -> f64 {
        self.prob_wait / self.tail_rate()
    }

    /// The mean time in the system, `W_q + 1/μ`, in seconds.
    pub fn mean_response_time(&self) -> f64 {
        self.mean_wait() + 1.0 / self.service_rate
    }

    /// The mean number waiting, `L_q = λ·W_q` (Little's law).
    pub fn mean_queue_length(&self) -> f64 {
        self.arrival_rate * self.mean_wait()
    }

    /// The mean number in the system, `L = λ·W`.
    pub fn mean_in_system(&self) -> f64 {
        self.arrival_rate * self.mean_response_time()
    }

    /// `P(W > t) = C · e^(−(cμ − λ)·t)` for a wait of `t` seconds.
    pub fn wait_tail(&self, t: f64) -> f64 {
        if t.is_nan() || t < 0.0 {
            return 1.0;
        }
        self.prob_wait * (-self.tail_rate() * t).exp()
    }

    /// The `q`-quantile of the wait, in seconds (`q` clamped to `[0, 1)`).
    pub fn wait_quantile(&self, q: f64) -> f64 {
        let q = if q.is_nan() {
            0.0
        } else {
            q.clamp(0.0, 1.0 - 1e-15)
        };
        if 1.0 - self.prob_wait >= q {
            0.0
        } else {
            (self.prob_wait / (1.0 - q)).ln() / self.tail_rate()
        }
    }

    /// The expected cost per request of the wait for a class, lateness
    /// included (see [`Class::expected_cost_exponential`]).
    pub fn expected_wait_cost(&self, class: &Class) -> f64 {
        class.expected_cost_exponential(self.prob_wait, self.tail_rate())
    }
}

/// Little's law, `L = λ·W`, solved for each of its terms.
pub mod little {
    /// Items in the system, `L = λ·W`.
    pub fn items(arrival_rate: f64, time_in_system: f64) -> f64 {
        arrival_rate * time_in_system
    }

    /// Time in the system, `W = L/λ` (zero when `λ` is zero).
    pub fn time_in_system(items: f64, arrival_rate: f64) -> f64 {
        if arrival_rate > 0.0 {
            items / arrival_rate
        } else {
            0.0
        }
    }

    /// Arrival rate, `λ = L/W` (zero when `W` is zero).
    pub fn arrival_rate(items: f64, time_in_system: f64) -> f64 {
        if time_in_system > 0.0 {
            items / time_in_system
        } else {
            0.0
        }
    }
}

/// The standard normal distribution function `Φ(x)`.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// The standard normal density `φ(x)`.
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The Halfin–Whitt approximation of the probability of waiting with
/// `c = a + β·√a` servers: `α(β) = 1 / (1 + β·Φ(β)/φ(β))`.
pub fn halfin_whitt_prob_wait(beta: f64) -> f64 {
    if beta.is_nan() || beta <= 0.0 {
        return 1.0;
    }
    // For large β, Φ/φ overflows gracefully to ∞ and α to 0.
    1.0 / (1.0 + beta * normal_cdf(beta) / normal_pdf(beta))
}

/// Square-root staffing: the smallest stable server count of at least
/// `a + β·√a`.
pub fn sqrt_staffing(offered_load: f64, beta: f64) -> u32 {
    let a = if offered_load.is_finite() {
        offered_load.max(0.0)
    } else {
        0.0
    };
    let beta = if beta.is_finite() { beta.max(0.0) } else { 0.0 };
    let stable = a.floor() + 1.0;
    let c = (a + beta * a.sqrt()).ceil().max(stable);
    if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

/// The cost-optimal safety factor `β*` of Borst, Mandelbaum and Reiman
/// (2004) for a linear waiting cost: it minimises `β + r·α(β)/β`, where `r`
/// is the cost of one second of waiting divided by the price of one server
/// for one second. Staff `c = a + β*·√a`.
pub fn bmr_beta(wait_cost_per_second: f64, server_price_per_second: f64) -> f64 {
    if !(wait_cost_per_second.is_finite() && wait_cost_per_second > 0.0) {
        return 0.0;
    }
    if !(server_price_per_second.is_finite() && server_price_per_second > 0.0) {
        return 10.0;
    }
    let r = wait_cost_per_second / server_price_per_second;
    let f = |b: f64| b + r * halfin_whitt_prob_wait(b) / b;
    // f is unimodal on (0, ∞): golden-section search on a generous bracket.
    let (mut lo, mut hi) = (1e-6_f64, 10.0_f64.max(2.0 * r.ln().max(1.0).sqrt() + 4.0));
    let g = (5.0_f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (hi - g * (hi - lo), lo + g * (hi - lo));
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..200 {
        if f1 < f2 {
            hi = x2;
            (x2, f2) = (x1, f1);
            x1 = hi - g * (hi - lo);
            f1 = f(x1);
        } else {
            lo = x1;
            (x1, f1) = (x2, f2);
            x2 = lo + g * (hi - lo);
            f2 = f(x2);
        }
    }
    (lo + hi) / 2.0
}

/// The cost of running a given number of servers.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct StaffingCost {
    /// The servers.
    pub servers: u32,
    /// The queue they make.
    pub queue: Mmc,
    /// Expected delay cost per second, summed over the classes.
    pub delay_cost_per_second: f64,
    /// Server cost per second.
    pub server_cost_per_second: f64,
}

impl StaffingCost {
    /// Delay plus server cost per second.
    pub fn total_per_second(&self) -> f64 {
        self.delay_cost_per_second + self.server_cost_per_second
    }
}

/// Finds the number of servers that minimises server cost plus the expected
/// delay cost of a class mix, under an M/M/c model of the pooled traffic
/// (first come first served, the classes sharing one mean service time).
///
/// The delay cost of a request is its class's cost curve applied to its
/// *wait* in the queue (the service time itself is unavoidable); waits past a
/// class's deadline also cost its refusal cost.
///
/// # Example
///
/// ```
/// use gratify_core::queueing::Staffing;
/// use gratify_core::{Class, DelayCost};
///
/// let orders = Class::new(DelayCost::linear(0.1)?, 0.0)?;
/// let plan = Staffing::new(1.0, 1.0)? // 1 s per order; a server costs 1 an hour
///     .class(10_000.0 / 86_400.0, orders)?
///     .optimal()?;
/// assert_eq!(plan.servers, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Staffing {
    mean_service: f64,
    server_price_per_second: f64,
    classes: Vec<(f64, Class)>,
    max_servers: u32,
}

impl Staffing {
    /// A problem with `mean_service` seconds of work per request and servers
    /// costing `server_price_per_hour` each.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidInput`] for a non-positive service time or a
    /// negative price.
    pub fn new(mean_service: f64, server_price_per_hour: f64) -> Result<Self, QueueError> {
        Ok(Self {
            mean_service: check("mean service time", mean_service, true)?,
            server_price_per_second: check("server price", server_price_per_hour, false)? / 3600.0,
            classes: Vec::new(),
            max_servers: 1_000_000,
        })
    }

    /// Adds a class arriving at `arrival_rate` per second.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidInput`] for a negative, NaN or infinite rate.
    pub fn class(mut self, arrival_rate: f64, class: Class) -> Result<Self, QueueError> {
        let rate = check("arrival rate", arrival_rate, false)?;
        self.classes.push((rate, class));
        Ok(self)
    }

    /// The most servers [`optimal`](Self::optimal) considers (default one
    /// million); it matters only when servers are free.
    #[must_use]
    pub fn max_servers(mut self, max: u32) -> Self {
        self.max_servers = max.max(1);
        self
    }

    /// Total arrivals per second.
    pub fn arrival_rate(&self) -> f64 {
        self.classes.iter().map(|(r, _)| r).sum()
    }

    /// The offered load in erlangs.
    pub fn offered_load(&self) -> f64 {
        self.arrival_rate() * self.mean_service
    }

    /// The smallest stable number of servers.
    pub fn min_stable_servers(&self) -> u32 {
        sqrt_staffing(self.offered_load(), 0.0)
    }

    /// The cost of `servers` servers.
    ///
    /// # Errors
    ///
    /// [`QueueError::NoServers`] or [`QueueError::Unstable`].
    pub fn evaluate(&self, servers: u32) -> Result<StaffingCost, QueueError> {
        let b = erlang_b(servers, self.offered_load())?;
        self.cost_from_b(servers, b)
    }

    fn cost_from_b(&self, servers: u32, b: f64) -> Result<StaffingCost, QueueError> {
        let lambda = self.arrival_rate();
        let a = lambda * self.mean_service;
        let c = erlang_c_from_b(servers, a, b)?;
        let queue = Mmc::from_parts(lambda, 1.0 / self.mean_service, servers, c);
        let delay_cost_per_second = self
            .classes
            .iter()
            .map(|(rate, class)| rate * queue.expected_wait_cost(class))
            .sum();
        Ok(StaffingCost {
            servers,
            queue,
            delay_cost_per_second,
            server_cost_per_second: f64::from(servers) * self.server_price_per_second,
        })
    }

    /// The cost-minimising number of servers (the smallest, on a tie).
    ///
    /// Searches upward from the smallest stable count and stops once the
    /// delay cost left is below the price of one more server, which no
    /// further server can beat; Erlang B is carried along the way, so the
    /// search costs `O(c*)`.
    ///
    /// # Errors
    ///
    /// [`QueueError::Unstable`] if even [`max_servers`](Self::max_servers)
    /// cannot carry the load.
    pub fn optimal(&self) -> Result<StaffingCost, QueueError> {
        let a = self.offered_load();
        let start = self.min_stable_servers();
        if start > self.max_servers {
            return Err(QueueError::Unstable {
                offered_load: a,
                servers: self.max_servers,
                utilisation: a / f64::from(self.max_servers),
            });
        }
        let mut b = erlang_b(start, a)?;
        let mut best = self.cost_from_b(start, b)?;
        let mut servers = start;
        let mut current = best;
        while current.delay_cost_per_second > self.server_price_per_second
            && servers < self.max_servers
        {
            servers += 1;
            b = a * b / (f64::from(servers) + a * b);
            current = self.cost_from_b(servers, b)?;
            if current.total_per_second() < best.total_per_second() {
                best = current;
            }
            if current.delay_cost_per_second <= 0.0 {
                break;
            }
        }
        Ok(best)
    }

    /// The Borst–Mandelbaum–Reiman square-root staffing estimate, for a
    /// cross-check of [`optimal`](Self::optimal): `a + β*·√a` with `β*`
    /// from [`bmr_beta`], using the arrival-weighted cost rate of waiting at
    /// zero wait.
    pub fn sqrt_staffing_estimate(&self) -> u32 {
        let lambda = self.arrival_rate();
        let wait_cost = if lambda > 0.0 {
            self.classes
                .iter()
                .map(|(r, c)| r * c.delay_cost().rate_secs(0.0))
                .sum::<f64>()
                / lambda
        } else {
            0.0
        };
        // Per server-second of waiting: cost rate × λ / μ per √a, see bmr_beta.
        let beta = bmr_beta(wait_cost, self.server_price_per_second);
        sqrt_staffing(self.offered_load(), beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DelayCost;

    #[test]
    fn erlang_b_published_values() {
        // B(1, 1) = 1/2 and B(2, 1) = 1/5 by hand; B(10, 5) = 0.018385 from
        // the Erlang B table (e.g. Kleinrock, Queueing Systems vol. 1, and
        // any traffic table: 10 trunks at 5 erlangs block 1.84%).
        assert!((erlang_b(1, 1.0).unwrap() - 0.5).abs() < 1e-12);
        assert!((erlang_b(2, 1.0).unwrap() - 0.2).abs() < 1e-12);
        assert!((erlang_b(10, 5.0).unwrap() - 0.018385).abs() < 1e-5);
    }

    #[test]
    fn erlang_c_published_values() {
        // c = 10 servers at 8 erlangs: P(wait) = 0.4092 (the standard call
        // centre example, e.g. Gans, Koole & Mandelbaum 2003, and the
        // Erlang C tables of Cooper, Introduction to Queueing Theory).
        assert!((erlang_c(10, 8.0).unwrap() - 0.4092).abs() < 1e-4);
        // c = 2 at 1 erlang: C = 1/3 exactly. c = 1: C = ρ.
        assert!((erlang_c(2, 1.0).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((erlang_c(1, 0.3).unwrap() - 0.3).abs() < 1e-12);
        // c = 5 at 4 erlangs: 0.5541 (Cooper's table).
        assert!((erlang_c(5, 4.0).unwrap() - 0.5541).abs() < 1e-4);
    }

    #[test]
    fn large_systems_match_halfin_whitt() {
        // With a = 9,900 and c = 10,000, β = 100/√9900 ≈ 1.005; the
        // Halfin–Whitt limit is accurate to well under a percent here.
        let a = 9_900.0;
        let c = erlang_c(10_000, a).unwrap();
        let hw = halfin_whitt_prob_wait((10_000.0 - a) / a.sqrt());
        assert!((c - hw).abs() / hw < 0.02, "{c} vs {hw}");
        assert!(c > 0.0 && c < 1.0);
    }

    #[test]
    fn loads_near_capacity_stay_finite() {
        for c in [1, 10, 1000, 10_000] {
            let a = f64::from(c) * (1.0 - 1e-9);
            let p = erlang_c(c, a).unwrap();
            assert!(p.is_finite() && p > 0.99 && p <= 1.0, "c={c}: {p}");
            let q = Mmc::new(a, 1.0, c).unwrap();
            assert!(q.mean_wait().is_finite() && q.mean_wait() > 0.0);
        }
    }

    #[test]
    fn unstable_is_explicit() {
        assert!(matches!(erlang_c(4, 4.0), Err(QueueError::Unstable { .. })));
        assert!(matches!(
            Mmc::new(10.0, 1.0, 5),
            Err(QueueError::Unstable { servers: 5, .. })
        ));
        assert_eq!(erlang_b(0, 1.0), Err(QueueError::NoServers));
        assert!(matches!(
            erlang_b(3, f64::NAN),
            Err(QueueError::InvalidInput { .. })
        ));
        assert!(matches!(
            Mmc::new(1.0, 0.0, 3),
            Err(QueueError::InvalidInput { .. })
        ));
        assert!(matches!(
            Mmc::new(-1.0, 1.0, 3),
            Err(QueueError::InvalidInput { .. })
        ));
    }

    #[test]
    fn mmc_quantities() {
        // M/M/1 with ρ = 0.5: Wq = ρ/(μ−λ) = 1 s for μ = 1; L = ρ/(1−ρ) = 1.
        let q = Mmc::new(0.5, 1.0, 1).unwrap();
        assert!((q.utilisation() - 0.5).abs() < 1e-12);
        assert!((q.mean_wait() - 1.0).abs() < 1e-12);
        assert!((q.mean_in_system() - 1.0).abs() < 1e-12);
        assert!((q.mean_queue_length() - 0.5).abs() < 1e-12);
        assert!((q.wait_tail(0.0) - 0.5).abs() < 1e-12);
        assert!((q.wait_tail(2.0) - 0.5 * (-1.0_f64).exp()).abs() < 1e-12);
        // The median wait is 0 (half never wait); the 0.75-quantile solves 0.5e^{-t/2} = 0.25.
        assert_eq!(q.wait_quantile(0.5), 0.0);
        assert!((q.wait_quantile(0.75) - 2.0 * 2.0_f64.ln()).abs() < 1e-12);
        assert!((little::items(2.0, 3.0) - 6.0).abs() < 1e-12);
        assert!((little::time_in_system(6.0, 2.0) - 3.0).abs() < 1e-12);
        assert!((little::arrival_rate(6.0, 3.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn seed_example() {
        let lambda = 10_000.0 / 86_400.0;
        let one = Mmc::new(lambda, 1.0, 1).unwrap();
        assert!((one.prob_wait() - 0.116).abs() < 1e-3);
        assert!((10_000.0 * one.mean_wait() * 0.1 - 131.0).abs() < 0.5);
        let two = Mmc::new(lambda, 1.0, 2).unwrap();
        assert!((10_000.0 * two.mean_wait() * 0.1 - 3.4).abs() < 0.05);
    }

    #[test]
    fn optimal_matches_exhaustive_search() {
        let class = Class::new(DelayCost::linear(0.5).unwrap(), 0.0).unwrap();
        for (lambda, price) in [(3.0, 1.0), (50.0, 10.0), (0.2, 0.01), (400.0, 100.0)] {
            let s = Staffing::new(0.5, price)
                .unwrap()
                .class(lambda, class.clone())
                .unwrap();
            let best = s.optimal().unwrap();
            let start = s.min_stable_servers();
            let brute = (start..start + 200)
                .map(|c| s.evaluate(c).unwrap())
                .min_by(|x, y| x.total_per_second().total_cmp(&y.total_per_second()))
                .unwrap();
            assert_eq!(best.servers, brute.servers, "λ={lambda} price={price}");
        }
    }

    #[test]
    fn sqrt_staffing_is_close_to_optimal() {
        // Borst, Mandelbaum & Reiman: the square-root rule is within a server
        // or two of the exact optimum across regimes.
        let class = Class::new(DelayCost::linear(2.0).unwrap(), 0.0).unwrap();
        for lambda in [10.0, 100.0, 1000.0] {
            let s = Staffing::new(1.0, 3600.0)
                .unwrap()
                .class(lambda, class.clone())
                .unwrap();
            let exact = s.optimal().unwrap().servers;
            let approx = s.sqrt_staffing_estimate();
            assert!(
                exact.abs_diff(approx) <= 2,
                "λ={lambda}: exact {exact}, sqrt {approx}"
            );
        }
    }

    #[test]
    fn halfin_whitt_limits() {
        assert_eq!(halfin_whitt_prob_wait(0.0), 1.0);
        assert!(halfin_whitt_prob_wait(10.0) < 1e-20);
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-15);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
    }

    #[test]
    fn free_servers_stop_at_the_cap() {
        let class = Class::new(DelayCost::linear(1.0).unwrap(), 0.0).unwrap();
        let s = Staffing::new(1.0, 0.0)
            .unwrap()
            .class(5.0, class)
            .unwrap()
            .max_servers(50);
        let best = s.optimal().unwrap();
        assert!(best.servers <= 50 && best.delay_cost_per_second < 1e-6);
    }
}
