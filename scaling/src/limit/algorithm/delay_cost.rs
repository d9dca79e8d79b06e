use std::time::{Duration, Instant};

use gratify_core::estimate::MinTracker;
use gratify_core::{Class, CostModel};

use super::{Algorithm, Outcome, Sample, clamp_limit};

/// The cost rate that makes a request of `class` urgent once it has been
/// waiting or running for `t`: its delay-cost rate, plus — for a class with
/// a deadline — its refusal cost spread over the deadline, so that a class
/// whose curve is flat until a deadline is not treated as free to delay.
pub(crate) fn urgency(class: &Class, t: f64) -> f64 {
    class.urgency(t)
}

/// How many samples a class's moving mean latency averages (its weight
/// is 1/`MEAN_SAMPLES`), and how many it must have seen before it can be a
/// baseline.
const MEAN_SAMPLES: u32 = 32;

/// gratify's limit: the concurrency whose extra throughput pays for its
/// delay.
///
/// By Little's law, holding `L` requests in flight costs `c̄·L` per second,
/// where `c̄` is the traffic's mean delay-cost rate (its urgency: the cost
/// rate, plus the refusal cost spread over the deadline for classes that
/// have one); completing `X(L)` requests a second is worth `r̄·X(L)`, where
/// `r̄` is the mean refusal cost each completion avoids (under overload,
/// every request not served is refused). The limit climbs toward the
/// maximum of
///
/// ```text
/// G(L) = r̄·X(L) − c̄·L,    X(L) = L / latency(L)
/// ```
///
/// that is, it grows while one more slot adds at least `c̄/r̄` completions
/// a second: the queueing it tolerates inside the service is set by the
/// costs, not by a tolerance factor. `X(L)` is measured, not modelled: the
/// limit alternates between `L + δ` and `L − δ` in phases long enough for
/// a few dozen completions; each request's latency, relative to its class's
/// baseline (so that the class mix does not masquerade as congestion), is
/// credited to the phase it started in, with the concurrency it saw; `L`
/// moves toward the better side only when the difference is larger than
/// twice its standard error.
///
/// Where it differs from Gradient2 and Vegas, deliberately:
///
/// - the baseline (each class's windowed minimum of its moving mean
///   latency) is kept apart from the limit, so sustained queueing cannot
///   drag it up (the drift of Netflix concurrency-limits PR #134);
/// - loss signals (503/429 from the service, timeouts) cut the limit by 10%
///   at once (Netflix issue #121);
/// - a window of samples whose median latency and mean (without its
///   slowest tenth) both exceed `max_inflation` times the baseline cuts it
///   by 25% at once, which follows a sudden loss of capacity within a few
///   windows; the median keeps heavy-tailed services from tripping it, the
///   mean services whose typical request is slower than their average;
/// - a class's baseline is taken only once its mean averages 32 samples:
///   the mean of a variable service's first few answers can lie far below
///   its true mean;
/// - it does not grow while the limit is not reached (application-limited),
///   and it probes only while it is.
#[derive(Debug)]
pub struct DelayCostLimit {
    model: CostModel,
    limit: f64,
    initial: usize,
    min_limit: usize,
    max_limit: usize,
    max_inflation: f64,
    min_phase: Duration,
    /// Each class's latency: its moving mean and the mean's windowed
    /// minimum (its baseline).
    classes: Vec<ClassLatency>,
    mix: Vec<f64>,
    phase: Phase,
    guard: Guard,
    warm: u64,
    rate: f64,
    /// Consecutive moves in one direction (+ up, − down).
    streak: i32,
}

/// What the algorithm knows of one class's latency.
#[derive(Debug)]
struct ClassLatency {
    /// A plain average over the first `MEAN_SAMPLES` samples, then a moving
    /// mean of weight 1/`MEAN_SAMPLES`.
    mean: f64,
    /// Samples seen.
    n: u32,
    /// The windowed minimum of the moving mean: the baseline latency
    /// ratios are taken against.
    mean_base: MinTracker,
}

impl ClassLatency {
    fn new() -> Self {
        Self {
            mean: 0.0,
            n: 0,
            mean_base: MinTracker::new(Duration::from_secs(30)),
        }
    }

    /// Takes in a sample of `secs`; once the class's estimates average a
    /// full window of samples, returns the baseline its latencies are
    /// judged against, and `None` before: the mean of a variable
    /// service's first few samples can lie far below its true mean, and a
    /// baseline taken from it would read an idle service as congested for
    /// the whole window.
    fn record(&mut self, now: Instant, secs: f64) -> Option<f64> {
        self.n = self.n.saturating_add(1);
        let weight = f64::from(self.n.min(MEAN_SAMPLES));
        self.mean += (secs - self.mean) / weight;
        if self.n < MEAN_SAMPLES {
            return None;
        }
        let base = self
            .mean_base
            .record(now, Duration::from_secs_f64(self.mean));
        Some(base.as_secs_f64())
    }

    /// The class's baseline mean latency, or its mean so far before it has
    /// one (0 before any sample).
    fn base_mean(&self) -> f64 {
        self.mean_base.min().map_or(self.mean, |d| d.as_secs_f64())
    }
}

/// Samples credited to one probe phase.
#[derive(Debug, Default, Clone, Copy)]
struct Acc {
    n: u32,
    ratio_sum: f64,
    ratio_sq: f64,
    in_flight_sum: f64,
}

impl Acc {
    fn add(&mut self, ratio: f64, in_flight: usize) {
        self.n += 1;
        self.ratio_sum += ratio;
        self.ratio_sq += ratio * ratio;
        self.in_flight_sum += in_flight as f64;
    }

    fn count(&self) -> f64 {
        f64::from(self.n.max(1))
    }

    fn mean_ratio(&self) -> f64 {
        self.ratio_sum / self.count()
    }

    /// The standard error of the mean ratio.
    fn ratio_se(&self) -> f64 {
        let n = self.count();
        let mean = self.mean_ratio();
        let var = (self.ratio_sq / n - mean * mean).max(0.0) * n / (n - 1.0).max(1.0);
        (var / n).sqrt()
    }

    fn mean_in_flight(&self) -> f64 {
        self.in_flight_sum / self.count()
    }
}

#[derive(Debug)]
struct Phase {
    /// When the current up/down pair started.
    start: Option<Instant>,
    length: Duration,
    delta: f64,
    up: Acc,
    down: Acc,
}

#[derive(Debug, Default)]
struct Guard {
    start: Option<Instant>,
    ratios: Vec<f64>,
    last_cut: Option<Instant>,
}

impl DelayCostLimit {
    /// The algorithm for `model`'s costs, starting at 20 and bounded to
    /// `[1, 1000]`.
    pub fn new(model: &CostModel) -> Self {
        Self {
            classes: (0..model.len()).map(|_| ClassLatency::new()).collect(),
            mix: vec![0.0; model.len()],
            model: model.clone(),
            limit: 20.0,
            initial: 20,
            min_limit: 1,
            max_limit: 1000,
            max_inflation: 2.0,
            min_phase: Duration::from_millis(100),
            phase: Phase {
                start: None,
                length: Duration::from_millis(100),
                delta: 1.0,
                up: Acc::default(),
                down: Acc::default(),
            },
            guard: Guard::default(),
            warm: 0,
            rate: 0.0,
            streak: 0,
        }
    }

    /// The limit to start from, before any measurement: the cold-start limit.
    #[must_use]
    pub fn initial_limit(mut self, limit: usize) -> Self {
        self.initial = limit.max(1);
        self.limit = self.initial as f64;
        self
    }

    /// The bounds of the limit.
    #[must_use]
    pub fn limits(mut self, min: usize, max: usize) -> Self {
        self.min_limit = min.max(1);
        self.max_limit = max.max(self.min_limit);
        self.limit = self
            .limit
            .clamp(self.min_limit as f64, self.max_limit as f64);
        self
    }

    /// Latency over baseline past which the limit is cut at once, when a
    /// window's median and its mean (without its slowest tenth) both pass
    /// it (default 2).
    #[must_use]
    pub fn max_inflation(mut self, ratio: f64) -> Self {
        if ratio.is_finite() {
            self.max_inflation = ratio.max(1.1);
        }
        self
    }

    /// The shortest probe phase (default 100 ms; a phase also lasts at least
    /// two mean latencies and long enough for about 40 completions).
    #[must_use]
    pub fn min_phase(mut self, length: Duration) -> Self {
        self.min_phase = length;
        self
    }

    /// The current base limit (the probes run at ± δ around it).
    pub fn base_limit(&self) -> f64 {
        self.limit
    }

    fn bounded(&self, limit: f64) -> usize {
        clamp_limit(limit, self.min_limit, self.max_limit)
    }

    /// The limit in force for requests starting at `now`.
    fn current(&self, now: Instant) -> usize {
        match self.phase.start {
            Some(start) if self.warm >= 20 => {
                let t = now.saturating_duration_since(start);
                if t < self.phase.length {
                    self.bounded(self.limit + self.phase.delta)
                } else {
                    self.bounded(self.limit - self.phase.delta)
                }
            }
            _ => self.bounded(self.limit),
        }
    }

    /// `c̄`, `r̄` and the mean baseline latency over the recent mix.
    fn costs(&self) -> (f64, f64, f64) {
        let total: f64 = self.mix.iter().sum();
        if total <= 0.0 {
            return (0.0, 1.0, 1.0);
        }
        let (mut c, mut r, mut b) = (0.0, 0.0, 0.0);
        for (k, ((_, _, class), w)) in self.model.iter().zip(&self.mix).enumerate() {
            let base = self.classes[k].base_mean();
            c += w * urgency(class, base);
            r += w * class.refusal_cost();
            b += w * base;
        }
        (c / total, (r / total).max(1e-12), (b / total).max(1e-9))
    }

    fn cut(&mut self, factor: f64, now: Instant) {
        // At most one cut per phase length, so one burst of bad samples is
        // one signal.
        if self
            .guard
            .last_cut
            .is_some_and(|t| now.saturating_duration_since(t) < self.phase.length)
        {
            return;
        }
        self.guard.last_cut = Some(now);
        self.streak = 0;
        self.limit = (self.limit * factor).max(self.min_limit as f64);
        // Restart probing from the new limit.
        self.phase.start = None;
    }

    /// Judges the probes so far; returns whether their evidence is spent
    /// (a move was made, or it is stale) rather than worth adding to.
    fn evaluate_pair(&mut self) -> bool {
        let (up, down) = (self.phase.up, self.phase.down);
        if up.n < 8 || down.n < 8 {
            return false;
        }
        let l_up = self.bounded(self.limit + self.phase.delta) as f64;
        let l_down = self.bounded(self.limit - self.phase.delta) as f64;
        // Application-limited: the limit was not reached, nothing to learn.
        if up.mean_in_flight() < 0.8 * l_up || down.mean_in_flight() < 0.8 * l_down {
            return true;
        }
        let (c, r, b) = self.costs();
        // G = r̄·n/(ρ̄·b̄) − c̄·n, and its standard error through ρ̄.
        let value = |acc: &Acc| {
            let n = acc.mean_in_flight();
            let rho = acc.mean_ratio().max(1e-9);
            let g = r * n / (rho * b) - c * n;
            let se = r * n / (rho * rho * b) * acc.ratio_se();
            (g, se)
        };
        let ((g_up, se_up), (g_down, se_down)) = (value(&up), value(&down));
        let threshold = 2.0 * (se_up * se_up + se_down * se_down).sqrt();
        // Moves in one direction grow (1, 2, 4, 8 × δ), so a large change
        // of capacity is followed in a few pairs; a reversal starts over.
        let step = |streak: i32| self.phase.delta * f64::from(1 << streak.unsigned_abs().min(3));
        if g_up - g_down > threshold {
            self.streak = self.streak.max(0) + 1;
            self.limit += step(self.streak - 1);
        } else if g_down - g_up > threshold {
            self.streak = self.streak.min(0) - 1;
            self.limit -= step(self.streak + 1);
        } else {
            self.streak = 0;
            // Not significant yet: keep the evidence for the next pair, up
            // to about 320 samples a side.
            return up.n >= 320;
        }
        self.limit = self
            .limit
            .clamp(self.min_limit as f64, self.max_limit as f64);
        true
    }

    fn start_pair(&mut self, now: Instant, mean_latency: f64, fresh: bool) {
        self.phase.start = Some(now);
        if fresh {
            self.phase.up = Acc::default();
            self.phase.down = Acc::default();
        }
        self.phase.delta = (self.limit / 8.0).max((self.limit / 4.0).min(2.0)).max(1.0);
        let for_samples = if self.rate > 0.0 {
            40.0 / self.rate
        } else {
            0.0
        };
        let secs = (2.0 * mean_latency).max(for_samples).min(5.0);
        self.phase.length = self.min_phase.max(Duration::from_secs_f64(secs));
    }
}

impl Algorithm for DelayCostLimit {
    fn initial_limit(&self) -> usize {
        self.initial
    }

    fn update(&mut self, s: &Sample) -> usize {
        let now = s.end();
        if s.outcome == Outcome::Cancelled {
            return self.current(now);
        }
        let k = s.class.index().min(self.mix.len().saturating_sub(1));
        // The recent class mix, decayed per sample.
        for w in &mut self.mix {
            *w *= 0.999;
        }
        if let Some(w) = self.mix.get_mut(k) {
            *w += 1.0;
        }
        if s.outcome.is_drop() {
            self.cut(0.9, now);
            return self.current(now);
        }
        let latency = s.latency.max(Duration::from_micros(1));
        let Some(class) = self.classes.get_mut(k) else {
            return self.current(now);
        };
        // The baseline is the windowed minimum of the class's moving mean
        // latency, not of single samples: a single fast request says little
        // about a service with variable work.
        let secs = latency.as_secs_f64();
        let baseline = class.record(now, secs);
        let mean_latency = class.mean;
        self.warm += 1;
        // Before its baseline exists, a class's samples say nothing of
        // congestion: they count toward the cold start only.
        let ratio = baseline.map(|base| secs / base.max(1e-9));

        // The guard: the inflation of a window of samples, by its median
        // and its mean.
        if let Some(ratio) = ratio {
            let g = &mut self.guard;
            let g_start = *g.start.get_or_insert(now);
            g.ratios.push(ratio);
            let window = now.saturating_duration_since(g_start);
            if window >= self.phase.length && g.ratios.len() >= 20 {
                let elapsed = window.as_secs_f64().max(1e-6);
                self.rate = g.ratios.len() as f64 / elapsed;
                g.ratios.sort_unstable_by(f64::total_cmp);
                let median = g.ratios[g.ratios.len() / 2];
                // The mean of all but the slowest tenth: a rare slow request
                // cannot lift it.
                let kept = &g.ratios[..g.ratios.len() * 9 / 10];
                let mean = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
                g.ratios.clear();
                g.start = None;
                // Congestion slows every request: both figures rise. A
                // heavy tail raises neither (the median ignores it, the
                // mean drops the slowest tenth); a service whose typical
                // request is slower than its average (fast hits beside
                // slower misses) has a median above its mean baseline when
                // idle, but not its mean.
                if median > self.max_inflation && mean > self.max_inflation {
                    self.cut(0.75, now);
                    return self.current(now);
                }
            }
        }

        if self.warm < 20 {
            // Cold start: below the limit nothing to learn; at it, grow
            // gently until the first probes can judge.
            if s.in_flight as f64 >= self.limit {
                self.limit = (self.limit + 1.0).min(self.max_limit as f64);
            }
            return self.current(now);
        }

        // Probing in pairs: [start, start + len) at L + δ, then L − δ.
        let Some(start) = self.phase.start else {
            self.start_pair(now, mean_latency, true);
            return self.current(now);
        };
        let len = self.phase.length;
        if let Some(ratio) = ratio
            && s.start >= start
        {
            let since = s.start.saturating_duration_since(start);
            if since < len {
                self.phase.up.add(ratio, s.in_flight);
            } else if since < 2 * len {
                self.phase.down.add(ratio, s.in_flight);
            }
        }
        // A pair is judged one phase after it ends, when its requests are
        // (mostly) back.
        if now.saturating_duration_since(start) >= 3 * len {
            let spent = self.evaluate_pair();
            self.start_pair(now, mean_latency, spent);
        }
        self.current(now)
    }

    fn reload(&mut self, model: &CostModel) {
        self.model = model.clone();
    }

    fn name(&self) -> &'static str {
        "delay-cost"
    }
}

#[cfg(test)]
mod tests {
    use gratify_core::{ClassId, DelayCost};

    use super::*;

    fn model() -> CostModel {
        CostModel::builder()
            .class(
                "a",
                Class::new(DelayCost::linear(2.0).unwrap(), 2.0).unwrap(),
            )
            .build()
            .unwrap()
    }

    /// A service with `workers` workers of `base` service time, FIFO
    /// behind them, run closed-loop at the limit: the latency a request
    /// starting with `n` in flight sees.
    fn latency(n: usize, workers: usize, base: f64) -> f64 {
        let slowdown = 1.0 + 0.02 * (n as f64 - 1.0);
        if n <= workers {
            base * slowdown
        } else {
            base * slowdown * n as f64 / workers as f64
        }
    }

    /// Drives the algorithm closed-loop: whenever a request completes,
    /// new ones start until the limit is full; each sees the latency of the
    /// concurrency it started with.
    fn run(alg: &mut DelayCostLimit, workers: usize, seconds: f64, t: &mut Instant) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let end = *t + Duration::from_secs_f64(seconds);
        let mut heap: BinaryHeap<Reverse<(Instant, Instant, usize)>> = BinaryHeap::new();
        let mut in_flight = 0;
        let mut limit = alg.current(*t);
        while *t < end {
            while in_flight < limit {
                in_flight += 1;
                let lat = Duration::from_secs_f64(latency(in_flight, workers, 0.02));
                heap.push(Reverse((*t + lat, *t, in_flight)));
            }
            let Some(Reverse((done, start, n))) = heap.pop() else {
                break;
            };
            *t = done;
            in_flight -= 1;
            let s = Sample::new(
                start,
                done - start,
                n,
                Outcome::Success,
                ClassId::from_index(0),
            );
            limit = alg.update(&s);
        }
    }

    #[test]
    fn climbs_to_the_knee_and_follows_a_capacity_drop() {
        let mut t = Instant::now();
        let mut alg = DelayCostLimit::new(&model()).initial_limit(4);
        run(&mut alg, 16, 20.0, &mut t);
        let base = alg.base_limit();
        assert!((13.0..=20.0).contains(&base), "found {base}, knee at 16");
        // Capacity falls to 6 workers.
        run(&mut alg, 6, 10.0, &mut t);
        let base = alg.base_limit();
        assert!((4.0..=8.5).contains(&base), "found {base}, knee at 6");
    }

    /// A service of variable work whose first answer happens to be fast:
    /// the mean of its first few samples is no baseline, or the idle
    /// service reads as congested and the limit is cut to its minimum.
    #[test]
    fn a_fast_first_answer_is_no_baseline() {
        let mut t = Instant::now();
        let mut alg = DelayCostLimit::new(&model()).initial_limit(8);
        alg.update(&Sample::new(
            t,
            Duration::from_micros(200),
            1,
            Outcome::Success,
            ClassId::from_index(0),
        ));
        // Exponential service, 20 ms mean, and a limit of 8 that never
        // queues: nothing here is congestion.
        let lowest = idle(&mut alg, &mut t, 4_000, |u| -0.02 * (1.0 - u).ln());
        assert!(lowest >= 8.0, "an idle service's limit was cut to {lowest}");
    }

    /// Latencies drawn by `draw` from a xorshift stream, one every 3 ms,
    /// with the limit always full (so every probe can judge) but far below
    /// the service's workers: the lowest base limit seen.
    fn idle(alg: &mut DelayCostLimit, t: &mut Instant, n: usize, draw: impl Fn(f64) -> f64) -> f64 {
        let class = ClassId::from_index(0);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lowest = alg.base_limit();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            let lat = Duration::from_secs_f64(draw(u));
            let in_flight = alg.current(*t);
            *t += Duration::from_millis(3);
            alg.update(&Sample::new(*t, lat, in_flight, Outcome::Success, class));
            lowest = lowest.min(alg.base_limit());
        }
        lowest
    }

    /// A service whose typical request is slower than its average (60% at
    /// 20 ms, 40% answered from a cache in 0.5 ms): its median sits above
    /// its mean, and a guard comparing the one with the other reads the
    /// idle service as congested. With a rare slow request beside, the
    /// plain mean of a window that holds one passes the threshold too.
    #[test]
    fn a_median_above_the_mean_is_no_congestion() {
        let mut t = Instant::now();
        let mut alg = DelayCostLimit::new(&model()).initial_limit(8);
        // And one request in a hundred takes 2 s: a window holding one
        // must not read as congested either.
        let lowest = idle(&mut alg, &mut t, 6_000, |u| {
            if u < 0.01 {
                2.0
            } else if u < 0.4 {
                0.0005
            } else {
                0.02
            }
        });
        assert!(lowest >= 8.0, "an idle service's limit was cut to {lowest}");
    }

    /// The guard still follows a sudden loss of capacity: latencies four
    /// times longer cut the limit within a second.
    #[test]
    fn a_sudden_slowdown_still_cuts_the_limit() {
        let mut t = Instant::now();
        let mut alg = DelayCostLimit::new(&model()).initial_limit(16);
        idle(&mut alg, &mut t, 3_000, |u| -0.02 * (1.0 - u).ln());
        let before = alg.base_limit();
        let lowest = idle(&mut alg, &mut t, 300, |u| -0.08 * (1.0 - u).ln());
        assert!(
            lowest <= before * 0.75,
            "{before} -> {lowest}: the slowdown went unseen"
        );
    }

    /// The same service when its misses slow from 20 to 45 ms: the median
    /// and the mean of all but the slowest tenth pass the threshold; the
    /// plain mean (fast hits beside) would hardly reach it.
    #[test]
    fn slower_misses_beside_fast_hits_still_cut_the_limit() {
        let mut t = Instant::now();
        let mut alg = DelayCostLimit::new(&model()).initial_limit(16);
        let hits_and = |miss: f64| move |u: f64| if u < 0.4 { 0.0005 } else { miss };
        idle(&mut alg, &mut t, 3_000, hits_and(0.02));
        let before = alg.base_limit();
        let lowest = idle(&mut alg, &mut t, 600, hits_and(0.045));
        assert!(
            lowest <= before * 0.75,
            "{before} -> {lowest}: the slowdown went unseen"
        );
    }

    #[test]
    fn drops_cut_the_limit() {
        let t = Instant::now();
        let mut alg = DelayCostLimit::new(&model()).initial_limit(40);
        let s = Sample::new(
            t,
            Duration::from_millis(5),
            40,
            Outcome::Overload,
            ClassId::from_index(0),
        );
        assert_eq!(alg.update(&s), 36);
    }
}
