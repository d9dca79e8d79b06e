//! Figures of a run: cost, goodput, success, latency, inversions,
//! convergence.

use std::collections::BTreeMap;
use std::time::Duration;

use gratify_core::Class;
use hdrhistogram::Histogram;

use super::run::{Fate, Record, RunResult};
use super::scenario::Scenario;

/// Figures by name (`total_cost`, `success.checkout`, ...), as the benchmark
/// JSON writes them.
pub type Figures = BTreeMap<String, f64>;

/// The figures of one run: over the whole scenario and per phase.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Evaluation {
    /// Over the whole run.
    pub overall: Figures,
    /// Per phase, by name.
    pub phases: Vec<(String, Figures)>,
    /// Good completions (served within deadline) per second of completion time.
    pub goodput_per_second: Vec<f64>,
}

/// Whether a served request met its deadline.
fn on_time(class: &Class, latency: Duration) -> bool {
    !class.delay_cost().is_late(latency)
}

/// The cost of one request: its delay cost if served in time; the delay
/// cost to the deadline plus the refusal cost if served late; the refusal
/// cost if refused.
pub fn request_cost(class: &Class, record: &Record) -> f64 {
    match record.fate {
        Fate::Served => class.response_cost(record.latency),
        Fate::Refused
        | Fate::ServerRejected
        | Fate::Failed
        | Fate::Abandoned
        | Fate::ServerFailed => class.refusal_cost(),
    }
}

struct Acc {
    failed: u64,
    abandoned: Vec<u64>,
    server_failed: Vec<u64>,
    arrivals: Vec<u64>,
    good: Vec<u64>,
    refused: Vec<u64>,
    late: Vec<u64>,
    cost: f64,
    latency: Vec<Histogram<u64>>,
}

impl Acc {
    fn new(classes: usize) -> Self {
        Self {
            failed: 0,
            abandoned: vec![0; classes],
            server_failed: vec![0; classes],
            arrivals: vec![0; classes],
            good: vec![0; classes],
            refused: vec![0; classes],
            late: vec![0; classes],
            cost: 0.0,
            latency: (0..classes)
                .map(|_| Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds"))
                .collect(),
        }
    }

    fn add(&mut self, class: &Class, r: &Record) {
        let k = r.class;
        self.arrivals[k] += 1;
        self.cost += request_cost(class, r);
        match r.fate {
            Fate::Served => {
                let micros = u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX);
                self.latency[k].saturating_record(micros.clamp(1, 3_600_000_000));
                if on_time(class, r.latency) {
                    self.good[k] += 1;
                } else {
                    self.late[k] += 1;
                }
            }
            Fate::Failed => {
                self.failed += 1;
                self.refused[k] += 1;
            }
            Fate::Refused | Fate::ServerRejected => self.refused[k] += 1,
            Fate::Abandoned => self.abandoned[k] += 1,
            Fate::ServerFailed => self.server_failed[k] += 1,
        }
    }

    fn figures(
        &self,
        scenario: &Scenario,
        seconds: f64,
        capacity: f64,
        worker_cost: f64,
    ) -> Figures {
        let mut f = Figures::new();
        let good: u64 = self.good.iter().sum();
        f.insert("total_cost".into(), self.cost + worker_cost);
        f.insert(
            "goodput_frac".into(),
            good as f64 / seconds.max(1e-9) / capacity.max(1e-9),
        );
        f.insert("requests".into(), self.arrivals.iter().sum::<u64>() as f64);
        f.insert("shed".into(), self.refused.iter().sum::<u64>() as f64);
        f.insert("late".into(), self.late.iter().sum::<u64>() as f64);
        f.insert("failed".into(), self.failed as f64);
        f.insert(
            "abandoned".into(),
            self.abandoned.iter().sum::<u64>() as f64,
        );
        f.insert(
            "server_failed".into(),
            self.server_failed.iter().sum::<u64>() as f64,
        );
        for (k, c) in scenario.classes.iter().enumerate() {
            let n = self.arrivals[k].max(1) as f64;
            let name = &c.name;
            if self.arrivals[k] > 0 {
                // Of the requests the server could serve: its own fast
                // failures are not a limiter's doing.
                let servable = (self.arrivals[k] - self.server_failed[k]).max(1) as f64;
                f.insert(format!("success.{name}"), self.good[k] as f64 / servable);
                f.insert(format!("shed_frac.{name}"), self.refused[k] as f64 / n);
            }
            let h = &self.latency[k];
            if !h.is_empty() {
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
                f.insert(format!("p50_ms.{name}"), ms(0.5));
                f.insert(format!("p99_ms.{name}"), ms(0.99));
                f.insert(format!("p999_ms.{name}"), ms(0.999));
            }
        }
        f
    }
}

/// Priority inversions: refusals of a request while a request of a class
/// with a lower refusal cost was admitted to the server within 50 ms of the
/// refusal, counted once per refused request.
fn inversions(records: &[&Record], refusal: &[f64]) -> u64 {
    const WINDOW: Duration = Duration::from_millis(50);
    let mut admitted: Vec<Vec<Duration>> = vec![Vec::new(); refusal.len()];
    for r in records {
        if let Some(a) = r.admitted {
            admitted[r.class].push(a);
        }
    }
    for a in &mut admitted {
        a.sort_unstable();
    }
    let near = |times: &[Duration], t: Duration| {
        let from = t.saturating_sub(WINDOW);
        let i = times.partition_point(|x| *x < from);
        times.get(i).is_some_and(|x| *x <= t + WINDOW)
    };
    records
        .iter()
        .filter(|r| matches!(r.fate, Fate::Refused | Fate::ServerRejected))
        .filter(|r| {
            let t = r.arrival + r.latency;
            (0..refusal.len()).any(|l| refusal[l] < refusal[r.class] && near(&admitted[l], t))
        })
        .count() as u64
}

/// Milliseconds from a phase's start until it has settled for the most
/// valuable class (`class`, the highest refusal cost): the end of the
/// last 50 ms window in the phase's first half whose served requests' p90
/// latency exceeded 1.2 × the p90 of the phase's second half (its steady
/// state); 0 if none did. Windows with fewer than 5 served requests are not
/// judged, and one slow request cannot make a window (the p90 of five is
/// its second slowest). `None` with fewer than 20 served requests in the
/// second half.
fn settle_ms(records: &[&Record], class: usize, start: Duration, length: Duration) -> Option<f64> {
    const WINDOW: Duration = Duration::from_millis(50);
    let p90 = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[(v.len() * 9 / 10).min(v.len() - 1)]
    };
    let half = start + length / 2;
    let mut steady: Vec<Duration> = records
        .iter()
        .filter(|r| r.class == class && r.fate == Fate::Served && r.arrival >= half)
        .map(|r| r.latency)
        .collect();
    if steady.len() < 20 {
        return None;
    }
    let bound = p90(&mut steady).mul_f64(1.2);
    let mut windows: BTreeMap<u64, Vec<Duration>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.class == class && r.fate == Fate::Served)
        .filter(|r| r.arrival >= start && r.arrival < half)
    {
        let w = (r.arrival - start).as_nanos() / WINDOW.as_nanos();
        windows
            .entry(u64::try_from(w).unwrap_or(u64::MAX))
            .or_default()
            .push(r.latency);
    }
    let last = windows
        .into_iter()
        .filter(|(_, v)| v.len() >= 5)
        .filter_map(|(w, mut v)| (p90(&mut v) > bound).then_some(w))
        .max();
    Some(last.map_or(0.0, |w| (w + 1) as f64 * WINDOW.as_secs_f64() * 1e3))
}

/// Seconds from `from` until goodput stays at least 90% of the reference
/// for `hold` seconds (3-second moving averages); `None` if it never does.
pub fn convergence(goodput: &[f64], reference: &[f64], from: usize, hold: usize) -> Option<usize> {
    let smooth = |v: &[f64], i: usize| {
        let lo = i.saturating_sub(1);
        let hi = (i + 2).min(v.len());
        v[lo..hi].iter().sum::<f64>() / (hi - lo).max(1) as f64
    };
    let n = goodput.len().min(reference.len());
    let ok = |i: usize| smooth(goodput, i) >= 0.9 * smooth(reference, i);
    (from..n).find_map(|start| {
        let end = (start + hold).min(n);
        (end > start && (start..end).all(ok)).then(|| start - from)
    })
}

/// Evaluates a run of `scenario`. With a `reference` (the hindsight
/// oracle's per-second goodput), convergence after each phase boundary is
/// measured too; `hold` is the number of seconds goodput must stay close.
pub fn evaluate(
    scenario: &Scenario,
    result: &RunResult,
    reference: Option<&[f64]>,
    hold: usize,
) -> Evaluation {
    let Ok(model) = scenario.model() else {
        return Evaluation::default();
    };
    let ids = scenario.model_ids(&model);
    let classes: Vec<Class> = ids
        .iter()
        .map(|&i| {
            model
                .class(gratify_core::ClassId::from_index(i as u16))
                .clone()
        })
        .collect();
    let refusal: Vec<f64> = classes.iter().map(Class::refusal_cost).collect();
    let most_valuable = (0..refusal.len())
        .max_by(|a, b| refusal[*a].total_cmp(&refusal[*b]))
        .unwrap_or(0);
    let starts = scenario.phase_starts();
    let total = scenario.duration();
    let phase_of = |t: Duration| starts.iter().rposition(|s| *s <= t).unwrap_or(0);

    let mut all = Acc::new(classes.len());
    let mut per_phase: Vec<Acc> = scenario
        .phases
        .iter()
        .map(|_| Acc::new(classes.len()))
        .collect();
    let mut by_phase: Vec<Vec<&Record>> = vec![Vec::new(); scenario.phases.len()];
    let seconds = total.as_secs() as usize + 1;
    let mut goodput = vec![0.0; seconds + 120];
    for r in &result.records {
        let class = &classes[r.class];
        all.add(class, r);
        let p = phase_of(r.arrival);
        per_phase[p].add(class, r);
        by_phase[p].push(r);
        if r.fate == Fate::Served && on_time(class, r.latency) {
            let done = (r.arrival + r.latency).as_secs() as usize;
            if let Some(g) = goodput.get_mut(done) {
                *g += 1.0;
            }
        }
    }
    goodput.truncate(seconds);

    let worker_seconds = |p: usize| {
        let workers = scenario.phases[p]
            .workers
            .unwrap_or(scenario.server.workers);
        workers as f64 * scenario.phases[p].duration.as_secs_f64()
    };
    let capacity_of = |p: usize| {
        scenario.capacity(
            scenario.phases[p]
                .workers
                .unwrap_or(scenario.server.workers),
        )
    };

    // The limit over a phase, from the series.
    let limit_stats = |from: Duration, to: Duration| {
        let limits: Vec<f64> = result
            .series
            .iter()
            .filter(|p| p.at >= from && p.at < to)
            .filter_map(|p| p.limit.map(|l| l as f64))
            .collect();
        if limits.is_empty() {
            return None;
        }
        let mean = limits.iter().sum::<f64>() / limits.len() as f64;
        let var = limits.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / limits.len() as f64;
        Some((mean, var.sqrt() / mean.max(1e-9)))
    };

    let mut phases = Vec::new();
    let mut max_convergence: f64 = 0.0;
    for (p, phase) in scenario.phases.iter().enumerate() {
        let seconds = phase.duration.as_secs_f64();
        let mut f = per_phase[p].figures(
            scenario,
            seconds,
            capacity_of(p),
            worker_seconds(p) * scenario.worker_price,
        );
        f.insert(
            "inversions".into(),
            inversions(&by_phase[p], &refusal) as f64,
        );
        if p > 0
            && let Some(ms) = settle_ms(&by_phase[p], most_valuable, starts[p], phase.duration)
        {
            f.insert("settle_ms".into(), ms);
        }
        let end = starts[p] + phase.duration;
        if let Some((mean, cv)) = limit_stats(starts[p] + phase.duration / 2, end) {
            f.insert("limit_mean".into(), mean);
            f.insert("limit_cv".into(), cv);
        }
        if let (Some(reference), true) = (reference, p > 0) {
            let from = starts[p].as_secs() as usize;
            let c = convergence(&goodput, reference, from, hold)
                .map_or((total - starts[p]).as_secs_f64(), |s| s as f64);
            f.insert("convergence_s".into(), c);
            max_convergence = max_convergence.max(c);
        }
        phases.push((phase.name.clone(), f));
    }

    let workers: f64 = (0..scenario.phases.len()).map(worker_seconds).sum();
    let mean_capacity = (0..scenario.phases.len())
        .map(|p| capacity_of(p) * scenario.phases[p].duration.as_secs_f64())
        .sum::<f64>()
        / total.as_secs_f64().max(1e-9);
    let mut overall = all.figures(
        scenario,
        total.as_secs_f64(),
        mean_capacity,
        workers * scenario.worker_price,
    );
    let all_records: Vec<&Record> = result.records.iter().collect();
    overall.insert(
        "inversions".into(),
        inversions(&all_records, &refusal) as f64,
    );
    overall.insert(
        "cold_start_shed".into(),
        per_phase[0].refused.iter().sum::<u64>() as f64,
    );
    overall.insert("unfinished".into(), result.unfinished as f64);
    if reference.is_some() {
        overall.insert("convergence_s".into(), max_convergence);
    }
    if let Some((mean, cv)) = limit_stats(Duration::ZERO, total) {
        overall.insert("limit_mean".into(), mean);
        overall.insert("limit_cv".into(), cv);
    }
    Evaluation {
        overall,
        phases,
        goodput_per_second: goodput,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convergence_finds_the_first_lasting_recovery() {
        let reference = vec![100.0; 40];
        let mut g = vec![100.0; 40];
        for x in &mut g[10..16] {
            *x = 10.0;
        }
        // From 10: bad until 15; the 3 s average recovers at 17.
        assert_eq!(convergence(&g, &reference, 10, 10), Some(7));
        assert_eq!(convergence(&vec![50.0; 40], &reference, 0, 10), None);
    }
}
