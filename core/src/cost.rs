//! Delay-cost curves and request classes.
//!
//! A [`DelayCost`] says what it costs when a response arrives `t` after its
//! request; a [`Class`] adds what it costs to refuse the request instead.
//! Every curve is nondecreasing, finite and has a cost rate (its derivative)
//! at every `t`.
//!
//! Past a curve's deadline the response is worthless: a [`Class`] charges
//! the cost accrued up to the deadline *plus* the refusal cost, so serving late
//! always costs more than refusing early.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify_core::{Class, DelayCost};
//!
//! // 20 per second of delay; worthless after 300 ms; refusing costs 10.
//! let checkout = Class::new(
//!     DelayCost::linear_with_deadline(20.0, Duration::from_millis(300))?,
//!     10.0,
//! )?;
//! assert_eq!(checkout.delay_cost().cost(Duration::from_millis(100)), 2.0);
//! assert_eq!(checkout.delay_cost().rate(Duration::from_millis(100)), 20.0);
//! // A late response costs the delay up to the deadline and the refusal.
//! assert_eq!(checkout.response_cost(Duration::from_millis(400)), 6.0 + 10.0);
//! assert!(checkout.response_cost(Duration::from_secs(1)) > checkout.refusal_cost());
//! # Ok::<(), gratify_core::CostError>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{CostError, non_negative};
use crate::serde_util;

/// A delay-cost curve `c(t)`: the cost of a response that arrives `t` after
/// its request.
///
/// Build one with [`linear`](Self::linear), [`free_until`](Self::free_until),
/// [`linear_with_deadline`](Self::linear_with_deadline),
/// [`piecewise`](Self::piecewise) or [`quadratic`](Self::quadratic); any curve
/// can be given a deadline with [`with_deadline`](Self::with_deadline).
/// Construction validates every parameter, so a `DelayCost` that exists is
/// finite, nondecreasing and non-negative everywhere.
///
/// Past the deadline the curve stays at its value at the deadline and its rate
/// is zero; the lateness itself is priced by [`Class::response_cost`].
///
/// In TOML (see [`CostModel`](crate::CostModel)) a curve is a table with a
/// `shape` key:
///
/// ```toml
/// linear    = { shape = "linear", per_second = 20.0, deadline = "300ms" }
/// deadline  = { shape = "deadline", deadline = "1s" }
/// convex    = { shape = "piecewise", points = [{ at = "100ms", cost = 0.5 }, { at = "1s", cost = 10.0 }] }
/// quadratic = { shape = "quadratic", per_second = 1.0, per_second_squared = 4.0 }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DelayCostSpec", into = "DelayCostSpec")]
pub struct DelayCost {
    shape: Shape,
    deadline: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
enum Shape {
    /// Free until the deadline.
    Free,
    /// `rate · t`.
    Linear { rate: f64 },
    /// Through `(0, 0)` and the given points (seconds, cost), then on with the
    /// last slope. `slopes[i]` is the slope of the segment that ends at point `i`.
    Piecewise {
        points: Arc<[(f64, f64)]>,
        slopes: Arc<[f64]>,
    },
    /// `linear · t + quadratic · t²`.
    Quadratic { linear: f64, quadratic: f64 },
}

impl DelayCost {
    /// A curve that costs `per_second` for every second of delay: `c(t) = a·t`.
    ///
    /// # Errors
    ///
    /// [`CostError::InvalidNumber`] if `per_second` is negative, NaN or infinite.
    pub fn linear(per_second: f64) -> Result<Self, CostError> {
        let rate = non_negative("per_second", per_second)?;
        Ok(Self {
            shape: Shape::Linear { rate },
            deadline: None,
        })
    }

    /// A curve that is free until `deadline`, after which the response is
    /// worthless (its class charges the refusal cost).
    ///
    /// # Errors
    ///
    /// [`CostError::ZeroDeadline`] if `deadline` is zero.
    pub fn free_until(deadline: Duration) -> Result<Self, CostError> {
        Self {
            shape: Shape::Free,
            deadline: None,
        }
        .with_deadline(deadline)
    }

    /// `c(t) = a·t` until `deadline`; worthless after it.
    ///
    /// # Errors
    ///
    /// As [`linear`](Self::linear) and [`free_until`](Self::free_until).
    pub fn linear_with_deadline(per_second: f64, deadline: Duration) -> Result<Self, CostError> {
        Self::linear(per_second)?.with_deadline(deadline)
    }

    /// A convex piecewise-linear curve through `(0, 0)` and `points`
    /// (time, cost), continued past the last point with the last slope.
    ///
    /// # Errors
    ///
    /// [`CostError::NoPoints`], [`CostError::TimesNotIncreasing`] (times must
    /// be above zero and strictly increasing), [`CostError::InvalidNumber`],
    /// [`CostError::CostDecreases`], or [`CostError::NotConvex`] when a segment
    /// is shallower than the one before it.
    pub fn piecewise(points: &[(Duration, f64)]) -> Result<Self, CostError> {
        if points.is_empty() {
            return Err(CostError::NoPoints);
        }
        let mut pts = Vec::with_capacity(points.len());
        let mut slopes = Vec::with_capacity(points.len());
        let (mut prev_t, mut prev_c, mut prev_slope) = (0.0_f64, 0.0_f64, 0.0_f64);
        for (index, &(at, cost)) in points.iter().enumerate() {
            let t = at.as_secs_f64();
            if t <= prev_t {
                return Err(CostError::TimesNotIncreasing { index, at });
            }
            let cost = non_negative("point cost", cost)?;
            if cost < prev_c {
                return Err(CostError::CostDecreases { index, cost });
            }
            let slope = (cost - prev_c) / (t - prev_t);
            if !slope.is_finite() {
                return Err(CostError::InvalidNumber {
                    what: "slope between points",
                    value: slope,
                });
            }
            if index > 0 && slope < prev_slope {
                return Err(CostError::NotConvex {
                    index: index - 1,
                    before: prev_slope,
                    after: slope,
                });
            }
            pts.push((t, cost));
            slopes.push(slope);
            (prev_t, prev_c, prev_slope) = (t, cost, slope);
        }
        Ok(Self {
            shape: Shape::Piecewise {
                points: pts.into(),
                slopes: slopes.into(),
            },
            deadline: None,
        })
    }

    /// A convex quadratic curve `c(t) = a·t + b·t²`.
    ///
    /// # Errors
    ///
    /// [`CostError::InvalidNumber`] if either coefficient is negative, NaN or infinite.
    pub fn quadratic(per_second: f64, per_second_squared: f64) -> Result<Self, CostError> {
        Ok(Self {
            shape: Shape::Quadratic {
                linear: non_negative("per_second", per_second)?,
                quadratic: non_negative("per_second_squared", per_second_squared)?,
            },
            deadline: None,
        })
    }

    /// Returns this curve with a deadline: past it the response is worthless.
    ///
    /// # Errors
    ///
    /// [`CostError::ZeroDeadline`] if `deadline` is zero.
    pub fn with_deadline(mut self, deadline: Duration) -> Result<Self, CostError> {
        if deadline.is_zero() {
            return Err(CostError::ZeroDeadline);
        }
        self.deadline = Some(deadline);
        Ok(self)
    }

    /// The deadline, if the curve has one.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// Whether a response `t` after its request is past the deadline.
    pub fn is_late(&self, t: Duration) -> bool {
        self.deadline.is_some_and(|d| t > d)
    }

    /// The cost of a response that arrives `t` after its request; past the
    /// deadline, the cost at the deadline.
    pub fn cost(&self, t: Duration) -> f64 {
        self.cost_secs(t.as_secs_f64())
    }

    /// [`cost`](Self::cost) with `t` in seconds (negative `t` counts as zero).
    pub fn cost_secs(&self, t: f64) -> f64 {
        let t = self.clamp(t);
        match &self.shape {
            Shape::Free => 0.0,
            Shape::Linear { rate } => rate * t,
            Shape::Quadratic { linear, quadratic } => linear * t + quadratic * t * t,
            Shape::Piecewise { points, slopes } => {
                let i = points.partition_point(|&(pt, _)| pt < t);
                let (t0, c0) = if i == 0 { (0.0, 0.0) } else { points[i - 1] };
                let slope = slopes[i.min(slopes.len() - 1)];
                c0 + slope * (t - t0)
            }
        }
    }

    /// The cost rate `c'(t)` per second of further delay at `t` (the right
    /// derivative at a kink); zero past the deadline.
    pub fn rate(&self, t: Duration) -> f64 {
        self.rate_secs(t.as_secs_f64())
    }

    /// [`rate`](Self::rate) with `t` in seconds (negative `t` counts as zero).
    pub fn rate_secs(&self, t: f64) -> f64 {
        let t = t.max(0.0);
        if self.deadline.is_some_and(|d| t >= d.as_secs_f64()) {
            return 0.0;
        }
        match &self.shape {
            Shape::Free => 0.0,
            Shape::Linear { rate } => *rate,
            Shape::Quadratic { linear, quadratic } => linear + 2.0 * quadratic * t,
            Shape::Piecewise { points, slopes } => {
                let i = points.partition_point(|&(pt, _)| pt <= t);
                slopes[i.min(slopes.len() - 1)]
            }
        }
    }

    /// The expected cost `E c(W)` of a wait `W` whose tail is
    /// `P(W > t) = p · e^(−θ t)` — the wait of an M/M/c queue, where `p` is
    /// the probability of waiting and `θ = cμ − λ`. Counts the curve up to
    /// its deadline only; see [`Class::expected_cost_exponential`] for the
    /// lateness.
    ///
    /// Returns 0 when `p ≤ 0`; `θ` must be positive and finite for a
    /// meaningful answer, otherwise the result is `f64::INFINITY` if any cost
    /// can accrue.
    pub fn expected_cost_exponential(&self, p: f64, theta: f64) -> f64 {
        if p.is_nan() || p <= 0.0 {
            return 0.0;
        }
        let p = p.min(1.0);
        let end = self.deadline.map_or(f64::INFINITY, |d| d.as_secs_f64());
        if !(theta.is_finite() && theta > 0.0) {
            // The wait never ends: the whole curve up to the deadline accrues.
            let accrued = match self.deadline {
                Some(d) => self.cost(d),
                None if self.cost_secs(1.0) > 0.0 || self.rate_secs(1.0) > 0.0 => f64::INFINITY,
                None => 0.0,
            };
            return p * accrued;
        }
        // E c(W) = ∫ c'(t) P(W > t) dt over [0, end].
        let tail = |t: f64| {
            if t.is_infinite() {
                0.0
            } else {
                (-theta * t).exp()
            }
        };
        let integral = match &self.shape {
            Shape::Free => 0.0,
            Shape::Linear { rate } => rate * (1.0 - tail(end)) / theta,
            Shape::Quadratic { linear, quadratic } => {
                // ∫ e^{-θt} = (1 - e^{-θX})/θ ; ∫ t e^{-θt} = (1 - e^{-θX}(1 + θX))/θ²
                let e = tail(end);
                let first = (1.0 - e) / theta;
                let second = if end.is_infinite() {
                    1.0 / (theta * theta)
                } else {
                    (1.0 - e * (1.0 + theta * end)) / (theta * theta)
                };
                linear * first + 2.0 * quadratic * second
            }
            Shape::Piecewise { points, slopes } => {
                let mut sum = 0.0;
                let mut start = 0.0;
                for (i, &slope) in slopes.iter().enumerate() {
                    let stop = if i + 1 == slopes.len() {
                        end
                    } else {
                        points[i].0.min(end)
                    };
                    if stop > start {
                        sum += slope * (tail(start) - tail(stop)) / theta;
                    }
                    start = points[i].0;
                    if start >= end {
                        break;
                    }
                }
                sum
            }
        };
        p * integral
    }

    fn clamp(&self, t: f64) -> f64 {
        let t = if t.is_nan() { 0.0 } else { t.max(0.0) };
        match self.deadline {
            Some(d) => t.min(d.as_secs_f64()),
            None => t,
        }
    }
}

/// A request class's economics: its delay-cost curve and the cost of
/// refusing it.
///
/// See the [module docs](crate::cost) for an example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    delay_cost: DelayCost,
    #[serde(deserialize_with = "serde_util::non_negative_f64")]
    refusal_cost: f64,
}

impl Class {
    /// A class with the given delay-cost curve and refusal cost.
    ///
    /// # Errors
    ///
    /// [`CostError::InvalidNumber`] if `refusal_cost` is negative, NaN or infinite.
    pub fn new(delay_cost: DelayCost, refusal_cost: f64) -> Result<Self, CostError> {
        Ok(Self {
            delay_cost,
            refusal_cost: non_negative("refusal_cost", refusal_cost)?,
        })
    }

    /// The delay-cost curve.
    pub fn delay_cost(&self) -> &DelayCost {
        &self.delay_cost
    }

    /// The cost of refusing a request of this class.
    pub fn refusal_cost(&self) -> f64 {
        self.refusal_cost
    }

    /// The deadline of the class, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.delay_cost.deadline()
    }

    /// The cost of a response delivered `t` after its request: the curve up to
    /// the deadline, plus the refusal cost if it is late. Never less than the
    /// cost of refusing at once when late.
    pub fn response_cost(&self, t: Duration) -> f64 {
        let late = if self.delay_cost.is_late(t) {
            self.refusal_cost
        } else {
            0.0
        };
        self.delay_cost.cost(t) + late
    }

    /// How urgent a request of this class is after `t` seconds: its cost
    /// rate, plus — for a class with a deadline — its refusal cost spread
    /// over the deadline, so a class whose curve is flat until its deadline
    /// is not treated as free to delay. Queue order, limits and cache value
    /// all weigh delay by it.
    pub fn urgency(&self, t: f64) -> f64 {
        let rate = self.delay_cost.rate_secs(t);
        match self.deadline() {
            Some(d) => rate + self.refusal_cost / d.as_secs_f64().max(1e-6),
            None => rate,
        }
    }

    /// The expected [`response_cost`](Self::response_cost) of a wait with tail
    /// `P(W > t) = p · e^(−θ t)`, lateness included.
    pub fn expected_cost_exponential(&self, p: f64, theta: f64) -> f64 {
        let curve = self.delay_cost.expected_cost_exponential(p, theta);
        let late = match self.deadline() {
            Some(d) if p > 0.0 => {
                let p_late = if theta.is_finite() && theta > 0.0 {
                    p.min(1.0) * (-theta * d.as_secs_f64()).exp()
                } else {
                    p.min(1.0)
                };
                p_late * self.refusal_cost
            }
            _ => 0.0,
        };
        curve + late
    }
}

/// The serialised shape of a [`DelayCost`], tagged by `shape`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "kebab-case", deny_unknown_fields)]
enum DelayCostSpec {
    Linear {
        per_second: f64,
        #[serde(
            default,
            with = "serde_util::opt_duration",
            skip_serializing_if = "Option::is_none"
        )]
        deadline: Option<Duration>,
    },
    Deadline {
        #[serde(with = "serde_util::duration")]
        deadline: Duration,
    },
    Piecewise {
        points: Vec<PointSpec>,
        #[serde(
            default,
            with = "serde_util::opt_duration",
            skip_serializing_if = "Option::is_none"
        )]
        deadline: Option<Duration>,
    },
    Quadratic {
        #[serde(default)]
        per_second: f64,
        per_second_squared: f64,
        #[serde(
            default,
            with = "serde_util::opt_duration",
            skip_serializing_if = "Option::is_none"
        )]
        deadline: Option<Duration>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointSpec {
    #[serde(with = "serde_util::duration")]
    at: Duration,
    cost: f64,
}

impl TryFrom<DelayCostSpec> for DelayCost {
    type Error = CostError;

    fn try_from(spec: DelayCostSpec) -> Result<Self, CostError> {
        let (curve, deadline) = match spec {
            DelayCostSpec::Linear {
                per_second,
                deadline,
            } => (Self::linear(per_second)?, deadline),
            DelayCostSpec::Deadline { deadline } => return Self::free_until(deadline),
            DelayCostSpec::Piecewise { points, deadline } => {
                let points: Vec<_> = points.iter().map(|p| (p.at, p.cost)).collect();
                (Self::piecewise(&points)?, deadline)
            }
            DelayCostSpec::Quadratic {
                per_second,
                per_second_squared,
                deadline,
            } => (Self::quadratic(per_second, per_second_squared)?, deadline),
        };
        match deadline {
            Some(d) => curve.with_deadline(d),
            None => Ok(curve),
        }
    }
}

impl From<DelayCost> for DelayCostSpec {
    fn from(curve: DelayCost) -> Self {
        let deadline = curve.deadline;
        match curve.shape {
            Shape::Free => Self::Deadline {
                // A free curve without deadline cannot be built; keep the
                // conversion total anyway.
                deadline: deadline.unwrap_or(Duration::MAX),
            },
            Shape::Linear { rate } => Self::Linear {
                per_second: rate,
                deadline,
            },
            Shape::Quadratic { linear, quadratic } => Self::Quadratic {
                per_second: linear,
                per_second_squared: quadratic,
                deadline,
            },
            Shape::Piecewise { points, .. } => Self::Piecewise {
                points: points
                    .iter()
                    .map(|&(t, cost)| PointSpec {
                        at: Duration::from_secs_f64(t),
                        cost,
                    })
                    .collect(),
                deadline,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn linear_cost_and_rate() {
        let c = DelayCost::linear(2.0).unwrap();
        assert_eq!(c.cost(Duration::from_secs(3)), 6.0);
        assert_eq!(c.rate(Duration::from_secs(3)), 2.0);
        assert_eq!(c.deadline(), None);
        assert!(!c.is_late(Duration::from_secs(1_000_000)));
    }

    #[test]
    fn deadline_curve_is_free_then_late() {
        let c = DelayCost::free_until(MS(200)).unwrap();
        assert_eq!(c.cost(MS(199)), 0.0);
        assert_eq!(c.rate(MS(100)), 0.0);
        assert!(!c.is_late(MS(200)));
        assert!(c.is_late(MS(201)));
        let class = Class::new(c, 3.0).unwrap();
        assert_eq!(class.response_cost(MS(100)), 0.0);
        assert_eq!(class.response_cost(MS(201)), 3.0);
    }

    #[test]
    fn linear_with_deadline_freezes_after_deadline() {
        let c = DelayCost::linear_with_deadline(10.0, MS(500)).unwrap();
        assert!((c.cost(MS(250)) - 2.5).abs() < 1e-12);
        assert_eq!(c.cost(Duration::from_secs(10)), 5.0);
        assert_eq!(c.rate(MS(499)), 10.0);
        assert_eq!(c.rate(MS(500)), 0.0);
        assert_eq!(c.deadline(), Some(MS(500)));
    }

    #[test]
    fn late_response_never_cheaper_than_refusal() {
        let class =
            Class::new(DelayCost::linear_with_deadline(1.0, MS(100)).unwrap(), 5.0).unwrap();
        for ms in [101, 200, 10_000] {
            assert!(class.response_cost(MS(ms)) >= class.refusal_cost());
        }
    }

    #[test]
    fn piecewise_interpolates_and_extends() {
        let c = DelayCost::piecewise(&[(MS(100), 1.0), (MS(300), 5.0)]).unwrap();
        assert!((c.cost(MS(50)) - 0.5).abs() < 1e-12);
        assert!((c.cost(MS(100)) - 1.0).abs() < 1e-12);
        assert!((c.cost(MS(200)) - 3.0).abs() < 1e-12);
        // Past the last point the last slope (20/s) continues.
        assert!((c.cost(MS(400)) - 7.0).abs() < 1e-12);
        assert!((c.rate(MS(50)) - 10.0).abs() < 1e-12);
        assert!(
            (c.rate(MS(100)) - 20.0).abs() < 1e-12,
            "right derivative at the kink"
        );
        assert!((c.rate(MS(1000)) - 20.0).abs() < 1e-12);
    }

    #[test]
    fn quadratic_cost_and_rate() {
        let c = DelayCost::quadratic(1.0, 2.0).unwrap();
        assert!((c.cost(Duration::from_secs(3)) - (3.0 + 18.0)).abs() < 1e-12);
        assert!((c.rate(Duration::from_secs(3)) - 13.0).abs() < 1e-12);
    }

    #[test]
    fn invalid_numbers_are_errors() {
        for bad in [-1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                DelayCost::linear(bad),
                Err(CostError::InvalidNumber { .. })
            ));
            assert!(DelayCost::quadratic(bad, 1.0).is_err());
            assert!(DelayCost::quadratic(1.0, bad).is_err());
            assert!(DelayCost::piecewise(&[(MS(1), bad)]).is_err());
            let ok = DelayCost::linear(1.0).unwrap();
            assert!(matches!(
                Class::new(ok, bad),
                Err(CostError::InvalidNumber {
                    what: "refusal_cost",
                    ..
                })
            ));
        }
    }

    #[test]
    fn zero_deadline_is_an_error() {
        assert_eq!(
            DelayCost::free_until(Duration::ZERO),
            Err(CostError::ZeroDeadline)
        );
        assert_eq!(
            DelayCost::linear_with_deadline(1.0, Duration::ZERO),
            Err(CostError::ZeroDeadline)
        );
    }

    #[test]
    fn piecewise_validation() {
        assert_eq!(DelayCost::piecewise(&[]), Err(CostError::NoPoints));
        assert!(matches!(
            DelayCost::piecewise(&[(Duration::ZERO, 1.0)]),
            Err(CostError::TimesNotIncreasing { index: 0, .. })
        ));
        assert!(matches!(
            DelayCost::piecewise(&[(MS(2), 1.0), (MS(2), 3.0)]),
            Err(CostError::TimesNotIncreasing { index: 1, .. })
        ));
        assert!(matches!(
            DelayCost::piecewise(&[(MS(1), 2.0), (MS(2), 1.0)]),
            Err(CostError::CostDecreases { index: 1, .. })
        ));
        // Slope 10/s then 1/s: concave.
        assert!(matches!(
            DelayCost::piecewise(&[(MS(100), 1.0), (MS(200), 1.1)]),
            Err(CostError::NotConvex { index: 0, .. })
        ));
    }

    #[test]
    fn expected_linear_cost_is_rate_times_mean_wait() {
        // P(W>t) = p e^{-θt}: E W = p/θ.
        let c = DelayCost::linear(0.1).unwrap();
        let (p, theta) = (0.4, 2.0);
        assert!((c.expected_cost_exponential(p, theta) - 0.1 * p / theta).abs() < 1e-12);
    }

    #[test]
    fn expected_cost_matches_numeric_integration() {
        let curves = [
            DelayCost::linear_with_deadline(3.0, MS(700)).unwrap(),
            DelayCost::quadratic(1.0, 4.0).unwrap(),
            DelayCost::quadratic(1.0, 4.0)
                .unwrap()
                .with_deadline(MS(400))
                .unwrap(),
            DelayCost::piecewise(&[(MS(100), 0.2), (MS(300), 1.0), (MS(600), 4.0)]).unwrap(),
            DelayCost::piecewise(&[(MS(100), 0.2), (MS(300), 1.0)])
                .unwrap()
                .with_deadline(MS(200))
                .unwrap(),
        ];
        let (p, theta) = (0.7, 3.0);
        for c in curves {
            // E c(W) = (1-p)·c(0) + ∫ c(t) f(t) dt with density p θ e^{-θt}.
            let dt = 1e-5;
            let mut sum = 0.0;
            let mut t = dt / 2.0;
            while t < 20.0 {
                sum += c.cost_secs(t) * p * theta * (-theta * t).exp() * dt;
                t += dt;
            }
            let closed = c.expected_cost_exponential(p, theta);
            assert!(
                (closed - sum).abs() < 1e-4 * (1.0 + sum),
                "{c:?}: {closed} vs {sum}"
            );
        }
    }

    #[test]
    fn expected_class_cost_counts_lateness() {
        let class =
            Class::new(DelayCost::free_until(Duration::from_secs(1)).unwrap(), 10.0).unwrap();
        let (p, theta) = (0.5, 2.0);
        let expected = 10.0 * p * (-theta * 1.0_f64).exp();
        assert!((class.expected_cost_exponential(p, theta) - expected).abs() < 1e-12);
        assert_eq!(class.expected_cost_exponential(0.0, theta), 0.0);
    }
}
