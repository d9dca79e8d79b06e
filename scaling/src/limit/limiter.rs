//! The limiter shared by every clone of an [`AdaptiveLimit`](super::AdaptiveLimit).

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gratify_core::estimate::DecayedLatency;
use gratify_core::slot::SlotHold;
use gratify_core::{Class, ClassId, CostModel, LoadSignal, LoadSnapshot};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::algorithm::delay_cost::urgency;
use super::algorithm::{Algorithm, DelayCostLimit, Outcome, Sample};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Serving it would cost more than refusing it: its expected delay cost
    /// plus the delay it imposes on others exceeds its refusal cost.
    Cost,
    /// It could not finish before its class's deadline.
    Deadline,
    /// The waiting queue (or the class's share of it) was full.
    QueueFull,
    /// It waited as long as it was worth waiting and was not admitted.
    QueueTimeout,
    /// A more valuable request took its place in a full queue.
    Displaced,
    /// The limit was reached and the policy does not queue.
    AtLimit,
    /// The limit was reached and its class had used its share
    /// ([`Admission::Partitioned`]).
    Partition,
}

impl Reason {
    /// Every reason, in a fixed order.
    pub const ALL: [Self; 7] = [
        Self::Cost,
        Self::Deadline,
        Self::QueueFull,
        Self::QueueTimeout,
        Self::Displaced,
        Self::AtLimit,
        Self::Partition,
    ];

    /// A short machine-readable name (`"cost"`, `"deadline"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cost => "cost",
            Self::Deadline => "deadline",
            Self::QueueFull => "queue-full",
            Self::QueueTimeout => "queue-timeout",
            Self::Displaced => "displaced",
            Self::AtLimit => "at-limit",
            Self::Partition => "partition",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How requests are admitted once the limit is reached.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Admission {
    /// gratify's value-based admission (the default): per-class queues
    /// served by cost rate ÷ expected service time (the cμ rule); a request
    /// is refused at once when it cannot finish before its deadline or when
    /// serving it would cost more than refusing it; in a full queue the least
    /// valuable waiter is displaced, never a more valuable one.
    DelayCost,
    /// One first-come-first-served queue, refusing when it is full or a
    /// request has waited `max_queue_time`.
    Fifo,
    /// Refuse at once at the limit (Netflix's `SimpleLimiter`).
    RejectAtLimit,
    /// Netflix's partitioned limiter: each class, by [`ClassId`] index, is
    /// guaranteed its share of the limit; at the limit, a class over its
    /// share is refused at once.
    Partitioned(Vec<f64>),
}

/// The limiter's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LimiterConfig {
    /// How requests are admitted at the limit.
    pub admission: Admission,
    /// The most requests waiting, over all classes.
    pub max_queue: usize,
    /// The most waiting per class (`None`: only `max_queue`).
    pub max_queue_per_class: Option<usize>,
    /// The longest any request waits (a class with a deadline waits less).
    pub max_queue_time: Duration,
    /// Samples before the cost rules may shed (cold start).
    pub warmup_samples: u64,
    /// Classes never shed by the cost or deadline rules, each with a cap on
    /// how many of it may wait.
    pub never_shed: Vec<(ClassId, usize)>,
    /// How fast each class's latency estimate forgets: the weight of a
    /// sample halves every `estimate_half_life` (default 2 s).
    pub estimate_half_life: Duration,
    /// The quantile of a class's own latency that the deadline rule compares
    /// with its deadline (default 0.5: a request is refused for its deadline
    /// only when it would more likely than not be late).
    pub deadline_quantile: f64,
    /// While a class is refused on its own latency estimate (for its
    /// deadline or for cost), one of its requests is still served this
    /// often (default 100 ms) — at once with a slot free and nobody waiting,
    /// else queued in its turn — so that its estimate follows the service
    /// and the class returns as soon as it can be served; a probe that
    /// finishes in time outweighs the old evidence.
    pub probe_interval: Duration,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            admission: Admission::DelayCost,
            max_queue: 1024,
            max_queue_per_class: None,
            max_queue_time: Duration::from_secs(5),
            warmup_samples: 50,
            never_shed: Vec::new(),
            estimate_half_life: Duration::from_secs(2),
            deadline_quantile: 0.5,
            probe_interval: Duration::from_millis(100),
        }
    }
}

/// A snapshot of a limiter, for reports, tests and dashboards.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LimiterStats {
    /// The concurrency limit.
    pub limit: usize,
    /// Requests holding a slot.
    pub in_flight: usize,
    /// Requests waiting for one.
    pub queued: usize,
    /// Mean latency (exponentially weighted), seconds.
    pub latency: f64,
    /// The squared coefficient of variation of latency (its variance over its
    /// squared mean, both exponentially weighted; 1 before any sample), as
    /// the replica advisor's Allen–Cunneen correction needs.
    pub latency_scv: f64,
    /// The shadow price of a slot (model currency per request).
    pub shadow_price: f64,
    /// One completion in this many is timed and taught to the algorithm
    /// (1 until completions pass about 2,000 a second).
    pub timed_one_in: u64,
    /// Per class, by [`ClassId`] index.
    pub classes: Vec<ClassStats>,
}

/// Per-class figures of a [`LimiterStats`].
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct ClassStats {
    /// Holding a slot.
    pub in_flight: usize,
    /// Waiting.
    pub queued: usize,
    /// Admitted so far.
    pub admitted: u64,
    /// Released its slot: completed, failed or cancelled.
    pub completed: u64,
    /// Refused so far, by [`Reason`] (indexed as [`Reason::ALL`]).
    pub shed: [u64; 7],
    /// Mean latency of the class (time-decayed, outliers bounded), seconds.
    pub latency: f64,
    /// The class's latency at the deadline rule's quantile (time-decayed),
    /// seconds; 0 before any sample.
    pub latency_quantile: f64,
}

impl ClassStats {
    /// Refused so far, all reasons.
    pub fn shed_total(&self) -> u64 {
        self.shed.iter().sum()
    }

    /// Refused for `reason`.
    pub fn shed_for(&self, reason: Reason) -> u64 {
        self.shed[reason.index()]
    }
}

/// The limiter: a concurrency limit learned by an [`Algorithm`], and
/// admission by the cost model. Cloning shares it.
#[derive(Clone)]
pub struct Limiter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    fast: Fast,
    /// Swapped whole by `reload`; class names never change.
    model: gratify_core::SharedModel,
    signal: LoadSignal,
    config: LimiterConfig,
    rng: AtomicU64,
}

/// What the request path reads and writes without the lock: a request that
/// finds room and no queue is admitted with one compare-and-swap, and most
/// completions only decrement a counter.
struct Fast {
    /// Requests holding a slot (the truth; the lock is not needed to change it).
    in_flight: AtomicUsize,
    /// The limit (written under the lock).
    limit: AtomicUsize,
    /// A copy of the queue length (written under the lock).
    queued: AtomicUsize,
    /// One completion in this many is timed and taught to the algorithm
    /// (1 below a couple of thousand completions a second).
    sample_every: AtomicU64,
    /// Per class: would be refused for its deadline even at once.
    hopeless: Box<[AtomicBool]>,
    /// Per class: admitted so far.
    admitted: Box<[AtomicU64]>,
    /// Per class: slots released so far (completions, cancellations).
    released: Box<[AtomicU64]>,
}

impl Fast {
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed).max(1)
    }

    /// Slots held by class `k`.
    fn class_in_flight(&self, k: usize) -> usize {
        let admitted = self.admitted[k].load(Ordering::Relaxed);
        let released = self.released[k].load(Ordering::Relaxed);
        admitted.saturating_sub(released) as usize
    }
}

struct State {
    algorithm: Box<dyn Algorithm>,
    queued: usize,
    classes: Vec<ClassState>,
    next_id: u64,
    /// EWMA latency, seconds (0 until the first sample).
    latency: f64,
    /// EWMA of the squared latency, for its variability.
    latency_sq: f64,
    /// The mean service time of the recent mix (each class's robust mean,
    /// weighted by its recent completions), seconds: what a slot's turnover
    /// is judged by. 0 until the first sample.
    service: f64,
    samples: u64,
    /// When the load signal was last published.
    published: Option<Instant>,
    /// Completions (estimated) since `rate_since`, to size `sample_every`.
    rate_count: u64,
    rate_since: Option<Instant>,
}

struct ClassState {
    class: Class,
    queue: VecDeque<Waiter>,
    /// The class's own recent latencies: nothing another class does moves
    /// them, and they fade when the class is not served.
    estimate: DecayedLatency,
    /// Its mean latency, seconds (0 until the first sample).
    latency: f64,
    /// When the next probe may pass while the class is refused for its
    /// deadline.
    probe_at: Option<Instant>,
    never_shed: Option<usize>,
    share: Option<f64>,
    stats: ClassStats,
}

struct Waiter {
    id: u64,
    enqueued: Instant,
    tx: oneshot::Sender<Result<(), Reason>>,
}

/// The outcome of asking for a slot.
pub(crate) enum Acquire {
    Admitted(Permit),
    Queued(Ticket),
    Refused(Refusal),
}

/// A refusal, with what a client should be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub(crate) reason: Reason,
    pub(crate) retry_after: Duration,
}

impl Refusal {
    /// Why the request was refused.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// When the client might try again (the estimated drain time, jittered,
    /// in whole seconds).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("algorithm", &self.lock().algorithm.name())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn ewma(old: f64, new: f64, weight: f64) -> f64 {
    if old <= 0.0 {
        new
    } else {
        old + (new - old) * weight
    }
}

impl Limiter {
    /// A limiter with the default [`DelayCostLimit`] algorithm.
    pub fn new(model: &CostModel) -> Self {
        Self::with_algorithm(model, DelayCostLimit::new(model), LimiterConfig::default())
    }

    /// A limiter with the given algorithm and settings.
    pub fn with_algorithm(
        model: &CostModel,
        algorithm: impl Algorithm,
        config: LimiterConfig,
    ) -> Self {
        let limit = algorithm.initial_limit().max(1);
        let n = model.len();
        let classes = model
            .iter()
            .map(|(id, _, class)| ClassState {
                class: class.clone(),
                queue: VecDeque::new(),
                estimate: DecayedLatency::new(config.estimate_half_life),
                latency: 0.0,
                probe_at: None,
                never_shed: config
                    .never_shed
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map(|(_, cap)| *cap),
                share: match &config.admission {
                    Admission::Partitioned(shares) => shares.get(id.index()).copied(),
                    _ => None,
                },
                stats: ClassStats::default(),
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    algorithm: Box::new(algorithm),
                    queued: 0,
                    classes,
                    next_id: 0,
                    latency: 0.0,
                    latency_sq: 0.0,
                    service: 0.0,
                    samples: 0,
                    published: None,
                    rate_count: 0,
                    rate_since: None,
                }),
                fast: Fast {
                    in_flight: AtomicUsize::new(0),
                    limit: AtomicUsize::new(limit),
                    queued: AtomicUsize::new(0),
                    sample_every: AtomicU64::new(1),
                    hopeless: (0..n).map(|_| AtomicBool::new(false)).collect(),
                    admitted: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    released: (0..n).map(|_| AtomicU64::new(0)).collect(),
                },
                model: gratify_core::SharedModel::new(model.clone()),
                signal: LoadSignal::new(),
                config,
                rng: AtomicU64::new(0x2545_F491_4F6C_DD1D),
            }),
        }
    }

    /// The load signal this limiter publishes (clone it for other layers).
    pub fn load_signal(&self) -> &LoadSignal {
        &self.shared.signal
    }

    /// Publishes to `signal` instead of the limiter's own (to share one
    /// signal across a stack). Call before use.
    #[must_use]
    pub fn publishing_to(self, signal: LoadSignal) -> Self {
        match Arc::try_unwrap(self.shared) {
            Ok(mut shared) => {
                shared.signal = signal;
                Self {
                    shared: Arc::new(shared),
                }
            }
            Err(shared) => Self { shared },
        }
    }

    /// The cost model (the latest, after a [`reload`](Self::reload)).
    pub fn model(&self) -> CostModel {
        self.shared.model.get()
    }

    /// Takes new costs and prices at run time, without dropping a request:
    /// under the limiter's lock, every class's curve and the algorithm's
    /// model are swapped together; requests decided before see the old
    /// costs, requests after the new.
    ///
    /// # Errors
    ///
    /// The new model has other classes or another default class (see
    /// [`CostModel::check_reload`]); nothing changes then.
    pub fn reload(&self, model: &CostModel) -> Result<(), gratify_core::ModelError> {
        self.model().check_reload(model)?;
        let mut state = self.lock();
        for (c, (_, _, class)) in state.classes.iter_mut().zip(model.iter()) {
            c.class = class.clone();
            // Refusals for the old deadline end; the latencies learned
            // stay (they are the service's, not the model's).
            c.probe_at = None;
        }
        state.algorithm.reload(model);
        self.tune(&mut state, Instant::now());
        self.shared.model.reload(model)
    }

    /// The name of the algorithm.
    pub fn algorithm_name(&self) -> &'static str {
        self.lock().algorithm.name()
    }

    /// A snapshot of the limiter's figures.
    pub fn stats(&self) -> LimiterStats {
        let state = self.lock();
        let fast = &self.shared.fast;
        LimiterStats {
            limit: fast.limit(),
            in_flight: fast.in_flight(),
            queued: state.queued,
            latency: state.latency,
            latency_scv: if state.latency > 0.0 {
                ((state.latency_sq - state.latency * state.latency)
                    / (state.latency * state.latency))
                    .max(0.0)
            } else {
                1.0
            },
            shadow_price: shadow_price(fast, &state),
            timed_one_in: fast.sample_every.load(Ordering::Relaxed),
            classes: state
                .classes
                .iter()
                .enumerate()
                .map(|(k, c)| ClassStats {
                    in_flight: fast.class_in_flight(k),
                    queued: c.queue.len(),
                    admitted: fast.admitted[k].load(Ordering::Relaxed),
                    completed: fast.released[k].load(Ordering::Relaxed),
                    shed: c.stats.shed,
                    latency: c.latency,
                    latency_quantile: c
                        .estimate
                        .quantile(self.shared.config.deadline_quantile)
                        .map_or(0.0, |d| d.as_secs_f64()),
                })
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements; a panic elsewhere
        // while it was held cannot leave it half-updated, so recover.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks for a slot for a request of `class`.
    pub(crate) fn acquire(&self, class: ClassId) -> Acquire {
        let fast = &self.shared.fast;
        let k = class.index().min(fast.hopeless.len() - 1);
        let class = ClassId::from_index(k as u16);
        // The fast path: room, nobody waiting, nothing to judge.
        if !matches!(self.shared.config.admission, Admission::Partitioned(_))
            && fast.queued.load(Ordering::SeqCst) == 0
            && !fast.hopeless[k].load(Ordering::Relaxed)
            && let Some(in_flight) = try_take(fast, k)
        {
            let start = sampled(fast.sample_every.load(Ordering::Relaxed)).then(Instant::now);
            return Acquire::Admitted(Permit::new(self.clone(), class, start, in_flight));
        }

        let now = Instant::now();
        let mut state = self.lock();
        let config = &self.shared.config;
        let room = fast.in_flight() < fast.limit();
        let mut decision = decide(config, fast, &state, k, now, room);
        let mut taken = None;
        let partitioned = matches!(config.admission, Admission::Partitioned(_));
        if let Decision::Admit = decision
            && (!partitioned || over_share(fast, &state.classes[k], k, fast.limit()))
        {
            // The fast path may have taken the last slot meanwhile: then
            // there is no room, whatever `room` said (and a partition over
            // its share has no claim past the limit).
            taken = try_take(fast, k);
            if taken.is_none() {
                decision = decide(config, fast, &state, k, now, false);
                if partitioned && matches!(decision, Decision::Admit) {
                    decision = Decision::Refuse(Reason::Partition);
                }
            }
        }
        let mut probe = false;
        if let Decision::Refuse(Reason::Deadline | Reason::Cost) = decision
            && matches!(config.admission, Admission::DelayCost)
            && state.classes[k].never_shed.is_none()
            && state.classes[k].probe_at.is_none_or(|t| now >= t)
        {
            // Refused on what its own latency estimate says: now and then a
            // request is served anyway — at once with a slot free and
            // nobody waiting, else from the queue in its turn — so that the
            // estimate follows the service and the class comes back when it
            // can be served.
            state.classes[k].probe_at = Some(
                now.checked_add(config.probe_interval)
                    .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400)),
            );
            probe = true;
            if state.queued == 0
                && let Some(in_flight) = try_take(fast, k)
            {
                taken = Some(in_flight);
                decision = Decision::Admit;
            } else {
                let cap = state.classes[k]
                    .class
                    .deadline()
                    .map_or(config.max_queue_time, |d| d.min(config.max_queue_time));
                decision = Decision::Queue {
                    max_wait: cap,
                    displace: None,
                };
            }
        }
        let result = match decision {
            Decision::Admit => {
                // Only a partition within its share admits past the limit.
                let in_flight = taken.unwrap_or_else(|| force_take(fast, k));
                let mut permit = Permit::new(self.clone(), class, Some(now), in_flight);
                permit.probe = probe;
                Acquire::Admitted(permit)
            }
            Decision::Queue { max_wait, displace } => {
                if let Some(j) = displace
                    && let Some(w) = state.classes[j].queue.pop_back()
                {
                    set_queued(fast, &mut state, -1);
                    state.classes[j].stats.shed[Reason::Displaced.index()] += 1;
                    let _ = w.tx.send(Err(Reason::Displaced));
                    self.on_shed(j, Reason::Displaced);
                }
                let (tx, rx) = oneshot::channel();
                let id = state.next_id;
                state.next_id += 1;
                state.classes[k].queue.push_back(Waiter {
                    id,
                    enqueued: now,
                    tx,
                });
                set_queued(fast, &mut state, 1);
                // A slot freed by a completion that saw no queue: take it now.
                grant(&self.shared.config, fast, &mut state, now);
                Acquire::Queued(Ticket {
                    limiter: self.clone(),
                    class,
                    id,
                    rx,
                    deadline: now + max_wait,
                    done: false,
                    probe,
                })
            }
            Decision::Refuse(reason) => {
                state.classes[k].stats.shed[reason.index()] += 1;
                let refusal = self.refusal(&state, reason);
                self.on_shed(k, reason);
                Acquire::Refused(refusal)
            }
        };
        // Queueing and refusals change what the signal says at once.
        let urgent = !matches!(result, Acquire::Admitted(_));
        self.publish(&mut state, now, urgent);
        result
    }

    fn refusal(&self, state: &State, reason: Reason) -> Refusal {
        // The backlog's drain time, with up to 50% jitter so that refused
        // clients do not all return at once; at least a second, as
        // Retry-After counts whole seconds.
        let limit = self.shared.fast.limit() as f64;
        let drain = (state.queued as f64 + 1.0) * state.service / limit + state.service;
        let x = self
            .shared
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let jitter = 1.0 + ((x >> 11) as f64 / (1u64 << 53) as f64) * 0.5;
        let secs = (drain * jitter).ceil().clamp(1.0, 3600.0);
        Refusal {
            reason,
            retry_after: Duration::from_secs(secs as u64),
        }
    }

    fn on_shed(&self, k: usize, reason: Reason) {
        let model = self.model();
        let name = model.name(ClassId::from_index(k as u16));
        tracing::debug!(class = name, reason = reason.as_str(), "request shed");
        #[cfg(feature = "metrics")]
        metrics::counter!("gratify_limit_shed_total", "class" => name.to_owned(), "reason" => reason.as_str())
            .increment(1);
    }

    /// Releases a slot; a timed completion (`sample`) also teaches the
    /// algorithm and the estimators.
    fn release(&self, class: ClassId, sample: Option<Sample>, now: Option<Instant>, probe: bool) {
        let fast = &self.shared.fast;
        let k = class.index().min(fast.hopeless.len() - 1);
        fast.released[k].fetch_add(1, Ordering::Relaxed);
        fast.in_flight.fetch_sub(1, Ordering::SeqCst);
        let Some(now) = now else {
            // Untimed: the lock is needed only to hand the slot to a waiter.
            if fast.queued.load(Ordering::SeqCst) > 0 {
                let mut state = self.lock();
                let now = Instant::now();
                grant(&self.shared.config, fast, &mut state, now);
                self.publish(&mut state, now, true);
            }
            return;
        };
        let mut state = self.lock();
        if let Some(sample) = sample {
            let median = state.classes[k].estimate.quantile(0.5);
            if teaches_latency(sample.outcome, sample.latency, median) {
                let secs = sample.latency.as_secs_f64();
                let c = &mut state.classes[k];
                // A probe of a class refused for its deadline that finishes
                // in time: the old evidence is out of date.
                if probe && c.class.deadline().is_some_and(|d| sample.latency <= d) {
                    c.estimate.discount(0.25);
                }
                c.estimate.record(now.into_std(), sample.latency);
                c.latency = c.estimate.mean().map_or(0.0, |d| d.as_secs_f64());
                state.latency = ewma(state.latency, secs, 0.02);
                state.latency_sq = ewma(state.latency_sq, secs * secs, 0.02);
                state.samples += 1;
            }
            // Cancellations, errors and answers the client caused say
            // nothing of the service's capacity (Netflix's `onIgnore`).
            if teaches_limit(sample.outcome) {
                let limit = state.algorithm.update(&sample).max(1);
                fast.limit.store(limit, Ordering::Relaxed);
            }
            self.tune(&mut state, now);
        }
        let queued = state.queued;
        grant(&self.shared.config, fast, &mut state, now);
        let urgent = queued != state.queued;
        self.publish(&mut state, now, urgent);
    }

    /// Updates what the fast path relies on: which classes are past hope,
    /// and how many completions to time.
    fn tune(&self, state: &mut State, now: Instant) {
        let fast = &self.shared.fast;
        let every = fast.sample_every.load(Ordering::Relaxed);
        state.rate_count += every;
        let since = *state.rate_since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= Duration::from_millis(100) {
            // Aim at about 2,000 timed completions a second.
            let rate = state.rate_count as f64 / elapsed.as_secs_f64();
            let every = (rate / 2000.0).clamp(1.0, 1024.0) as u64;
            fast.sample_every
                .store(every.next_power_of_two().max(1), Ordering::Relaxed);
            state.rate_count = 0;
            state.rate_since = Some(now);
        }
        let config = &self.shared.config;
        let judge = matches!(config.admission, Admission::DelayCost)
            && state.samples >= config.warmup_samples;
        let (mut weighted, mut weights) = (0.0, 0.0);
        for (k, c) in state.classes.iter_mut().enumerate() {
            let w = c.estimate.weight(now.into_std());
            weighted += w * c.latency;
            weights += w;
            let late = own_latency_late(config, c, now);
            fast.hopeless[k].store(judge && late, Ordering::Relaxed);
        }
        if weights > 0.0 {
            state.service = weighted / weights;
        }
    }

    /// Takes a queued request out of the queue (it gave up or timed out).
    /// Returns `false` if it had been granted or displaced meanwhile.
    fn withdraw(&self, class: ClassId, id: u64) -> bool {
        let mut state = self.lock();
        let k = class.index().min(state.classes.len() - 1);
        let queue = &mut state.classes[k].queue;
        match queue.iter().position(|w| w.id == id) {
            Some(i) => {
                queue.remove(i);
                set_queued(&self.shared.fast, &mut state, -1);
                // A waiter leaving can unblock a partition or a smaller queue.
                let now = Instant::now();
                grant(&self.shared.config, &self.shared.fast, &mut state, now);
                self.publish(&mut state, now, true);
                true
            }
            None => false,
        }
    }

    fn count_shed(&self, class: ClassId, reason: Reason) {
        let mut state = self.lock();
        let k = class.index().min(state.classes.len() - 1);
        state.classes[k].stats.shed[reason.index()] += 1;
        drop(state);
        self.on_shed(k, reason);
    }

    /// Publishes the load signal: at most every millisecond, or at once when
    /// `urgent` (the queue changed) — readers do not need every request.
    fn publish(&self, state: &mut State, now: Instant, urgent: bool) {
        if !urgent
            && state
                .published
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(1))
        {
            return;
        }
        state.published = Some(now);
        let fast = &self.shared.fast;
        let in_flight = fast.in_flight();
        let limit = fast.limit() as f64;
        let utilisation = (in_flight + state.queued) as f64 / limit;
        let delay = state.queued as f64 * state.service / limit;
        let price = shadow_price(fast, state);
        self.shared.signal.publish(
            LoadSnapshot::new(
                utilisation,
                Duration::from_secs_f64(delay.clamp(0.0, 1e9)),
                price,
            )
            .with_latency(Duration::from_secs_f64(state.service.clamp(0.0, 1e9))),
        );
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!("gratify_limit").set(limit);
            metrics::gauge!("gratify_limit_in_flight").set(in_flight as f64);
            metrics::gauge!("gratify_limit_queued").set(state.queued as f64);
            metrics::gauge!("gratify_limit_shadow_price").set(price);
            let model = self.model();
            for (k, c) in state.classes.iter().enumerate() {
                let name = model.name(ClassId::from_index(k as u16)).to_owned();
                metrics::gauge!("gratify_limit_queued_class", "class" => name.clone())
                    .set(c.queue.len() as f64);
                // What delay costs per second right now: every request of the
                // class in flight or waiting, at its cost rate.
                let in_flight = fast.admitted[k]
                    .load(Ordering::Relaxed)
                    .saturating_sub(fast.released[k].load(Ordering::Relaxed));
                metrics::gauge!("gratify_cost_rate", "class" => name)
                    .set((in_flight as f64 + c.queue.len() as f64) * urgency(&c.class, c.latency));
            }
        }
    }
}

/// The marginal delay cost one more admitted request imposes on the others:
/// it holds a slot for about the mean latency, delaying every waiting request
/// by `latency / limit`, each at its cost rate.
fn shadow_price(fast: &Fast, state: &State) -> f64 {
    if state.queued == 0 {
        return 0.0;
    }
    let per_slot = state.service / fast.limit() as f64;
    let rates: f64 = state
        .classes
        .iter()
        .map(|c| c.queue.len() as f64 * urgency(&c.class, c.latency))
        .sum();
    per_slot * rates
}

enum Decision {
    Admit,
    Queue {
        max_wait: Duration,
        displace: Option<usize>,
    },
    Refuse(Reason),
}

/// Evidence (in recent samples) a class's estimate needs before its
/// deadline is judged by it.
const MIN_EVIDENCE: f64 = 3.0;

/// Which samples' latencies describe the class's service: successes and
/// timeouts, and failures at least as slow as the class's median (a slow
/// failure is a request the service could not serve in time; a fast one
/// must not drag the estimate down). An overload answer or a cancelled
/// request would drag it down or cut it short.
fn teaches_latency(outcome: Outcome, latency: Duration, median: Option<Duration>) -> bool {
    match outcome {
        Outcome::Success | Outcome::Timeout => true,
        Outcome::Error => median.is_none_or(|m| latency >= m),
        _ => false,
    }
}

/// Which outcomes reach the limit algorithm: successes and the loss signals.
fn teaches_limit(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Success | Outcome::Overload | Outcome::Timeout
    )
}

/// The class's own latency at the deadline quantile, while its estimate
/// holds enough recent evidence to judge by (seconds).
fn judged_latency(config: &LimiterConfig, c: &ClassState, now: Instant) -> Option<f64> {
    if c.estimate.weight(now.into_std()) < MIN_EVIDENCE {
        return None;
    }
    c.estimate
        .quantile(config.deadline_quantile)
        .map(|d| d.as_secs_f64())
}

/// Whether the class's own latency, as recently measured, misses its
/// deadline (even with no wait for a slot).
fn own_latency_late(config: &LimiterConfig, c: &ClassState, now: Instant) -> bool {
    c.never_shed.is_none()
        && c.class
            .deadline()
            .is_some_and(|d| judged_latency(config, c, now).is_some_and(|s| s > d.as_secs_f64()))
}

/// The class's expected service time: its own recent mean (outliers
/// bounded), or the mix's before it has been seen.
fn expected_latency(state: &State, k: usize, now: Instant) -> f64 {
    let c = &state.classes[k];
    // Its own figure while its evidence is recent: a class that has not
    // been served for a while falls back to the mix (its old figure may
    // describe a service that has since recovered).
    match c.latency {
        l if l > 0.0 && c.estimate.weight(now.into_std()) >= MIN_EVIDENCE => l,
        l if state.service <= 0.0 && l > 0.0 => l,
        _ => state.service,
    }
}

/// The cμ index of class `k` for a request that has waited `age` seconds:
/// its urgency when it would complete, per second of service.
fn index(state: &State, k: usize, age: f64, now: Instant) -> f64 {
    let s = expected_latency(state, k, now).max(1e-6);
    urgency(&state.classes[k].class, age + s) / s
}

/// What to do with a request of class `k`; `room`: whether a slot is free
/// under the limit.
fn decide(
    config: &LimiterConfig,
    fast: &Fast,
    state: &State,
    k: usize,
    now: Instant,
    room: bool,
) -> Decision {
    let c = &state.classes[k];
    let limit = fast.limit();
    match &config.admission {
        Admission::RejectAtLimit => {
            return if room {
                Decision::Admit
            } else {
                Decision::Refuse(Reason::AtLimit)
            };
        }
        Admission::Partitioned(_) => {
            let over = over_share(fast, c, k, limit);
            return if room || !over {
                Decision::Admit
            } else {
                Decision::Refuse(Reason::Partition)
            };
        }
        Admission::Fifo => {
            if room && state.queued == 0 {
                return Decision::Admit;
            }
            if state.queued >= config.max_queue {
                return Decision::Refuse(Reason::QueueFull);
            }
            return Decision::Queue {
                max_wait: config.max_queue_time,
                displace: None,
            };
        }
        Admission::DelayCost => {}
    }

    let warm = state.samples >= config.warmup_samples;
    let protected = c.never_shed.is_some();
    let judge = warm && !protected;
    // Its mean service time, for costs; the quantile its deadline is judged
    // by (none without enough recent evidence: then only the wait counts).
    let s_k = expected_latency(state, k, now);
    let s_deadline = judged_latency(config, c, now).unwrap_or(0.0);
    let class = &c.class;
    let late_at = |t: f64| class.deadline().is_some_and(|d| t > d.as_secs_f64());

    if room && state.queued == 0 {
        if judge && late_at(s_deadline) {
            return Decision::Refuse(Reason::Deadline);
        }
        return Decision::Admit;
    }

    // At the limit: where would it stand in the queue?
    let mine = index(state, k, 0.0, now);
    let mut ahead = c.queue.len();
    let mut behind_rate = 0.0;
    let mut lowest: Option<(usize, f64)> = None;
    for (j, other) in state.classes.iter().enumerate() {
        let Some(tail) = other.queue.back() else {
            continue;
        };
        let tail_index = index(
            state,
            j,
            now.saturating_duration_since(tail.enqueued).as_secs_f64(),
            now,
        );
        if other.never_shed.is_none() && lowest.is_none_or(|(_, x)| tail_index < x) {
            lowest = Some((j, tail_index));
        }
        if j == k {
            continue;
        }
        let head = other.queue.front().map_or(now, |w| w.enqueued);
        let head_index = index(
            state,
            j,
            now.saturating_duration_since(head).as_secs_f64(),
            now,
        );
        if head_index >= mine {
            ahead += other.queue.len();
        } else {
            behind_rate += other.queue.len() as f64 * urgency(&other.class, other.latency);
        }
    }
    let per_slot = state.service / limit as f64;
    let wait = (ahead as f64 + 1.0) * per_slot;

    if judge {
        if late_at(wait + s_deadline) {
            return Decision::Refuse(Reason::Deadline);
        }
        let externality = s_k / limit as f64 * behind_rate;
        let t = Duration::from_secs_f64((wait + s_k).min(1e9));
        if class.response_cost(t) + externality > class.refusal_cost() {
            return Decision::Refuse(Reason::Cost);
        }
    }

    // Room in the queue?
    if let Some(cap) = c.never_shed.or(config.max_queue_per_class)
        && c.queue.len() >= cap
    {
        return Decision::Refuse(Reason::QueueFull);
    }
    let mut displace = None;
    if state.queued >= config.max_queue {
        match lowest {
            Some((j, x)) if x < mine => displace = Some(j),
            _ => return Decision::Refuse(Reason::QueueFull),
        }
    }

    // How long is it worth waiting? Until the deadline (less the service
    // time) or until the response would cost more than a refusal.
    let mut max_wait = config.max_queue_time.as_secs_f64();
    if judge {
        if let Some(d) = class.deadline() {
            max_wait = max_wait.min(d.as_secs_f64() - s_deadline);
        }
        max_wait = max_wait.min(worth_waiting(class, s_k, max_wait));
    }
    if max_wait <= 0.0 {
        return Decision::Refuse(Reason::Deadline);
    }
    Decision::Queue {
        max_wait: Duration::from_secs_f64(max_wait),
        displace,
    }
}

/// Whether class `k` holds its share of the limit or more (partitioned
/// admission).
fn over_share(fast: &Fast, c: &ClassState, k: usize, limit: usize) -> bool {
    let share = c.share.unwrap_or(0.0);
    let held = fast.class_in_flight(k) as f64;
    held >= (share * limit as f64).floor().max(1.0)
}

/// The longest wait `w ≤ cap` with `response_cost(w + s) ≤ refusal_cost`
/// (bisection; the cost is nondecreasing in `w`).
fn worth_waiting(class: &Class, s: f64, cap: f64) -> f64 {
    let cost = |w: f64| class.response_cost(Duration::from_secs_f64((w + s).clamp(0.0, 1e9)));
    let r = class.refusal_cost();
    if cap <= 0.0 || cost(cap) <= r {
        return cap;
    }
    if cost(0.0) > r {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0, cap);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if cost(mid) <= r {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Takes a slot for class `k` if one is free under the limit; returns the
/// new in-flight count.
fn try_take(fast: &Fast, k: usize) -> Option<usize> {
    let limit = fast.limit();
    let mut current = fast.in_flight.load(Ordering::Relaxed);
    while current < limit {
        match fast.in_flight.compare_exchange_weak(
            current,
            current + 1,
            Ordering::SeqCst,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                fast.admitted[k].fetch_add(1, Ordering::Relaxed);
                return Some(current + 1);
            }
            Err(now) => current = now,
        }
    }
    None
}

/// Takes a slot whatever the limit: for the policies that admit past it
/// (a partition within its share).
fn force_take(fast: &Fast, k: usize) -> usize {
    fast.admitted[k].fetch_add(1, Ordering::Relaxed);
    fast.in_flight.fetch_add(1, Ordering::SeqCst) + 1
}

/// Changes the queue length and its lock-free copy (under the lock).
fn set_queued(fast: &Fast, state: &mut State, delta: isize) {
    state.queued = state.queued.saturating_add_signed(delta);
    fast.queued.store(state.queued, Ordering::SeqCst);
}

/// Whether to time this completion: one in `every`, drawn per thread.
fn sampled(every: u64) -> bool {
    if every <= 1 {
        return true;
    }
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0x9E37_79B9_7F4A_7C15) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x % every == 0
    })
}

/// Grants slots to waiters while there is room, the most urgent first.
fn grant(config: &LimiterConfig, fast: &Fast, state: &mut State, now: Instant) {
    while state.queued > 0 && fast.in_flight() < fast.limit() {
        let best = match config.admission {
            Admission::DelayCost => (0..state.classes.len())
                .filter_map(|j| {
                    let head = state.classes[j].queue.front()?;
                    let age = now.saturating_duration_since(head.enqueued).as_secs_f64();
                    Some((j, index(state, j, age, now), head.enqueued))
                })
                // Highest index; the longest waiting on a tie.
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.2.cmp(&a.2)))
                .map(|(j, ..)| j),
            _ => (0..state.classes.len())
                .filter_map(|j| Some((j, state.classes[j].queue.front()?.enqueued)))
                .min_by_key(|(_, t)| *t)
                .map(|(j, _)| j),
        };
        let Some(j) = best else {
            break;
        };
        let Some(waiter) = state.classes[j].queue.pop_front() else {
            break;
        };
        // Take the slot before telling the waiter; a waiter whose caller is
        // gone cannot use it, so it goes back and the next one is tried.
        if try_take(fast, j).is_none() {
            state.classes[j].queue.push_front(waiter);
            break;
        }
        set_queued(fast, state, -1);
        if waiter.tx.send(Ok(())).is_err() {
            fast.admitted[j].fetch_sub(1, Ordering::Relaxed);
            fast.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A slot held by a request; released exactly once, when completed or
/// dropped (a dropped permit reports a cancellation).
pub struct Permit {
    limiter: Limiter,
    class: ClassId,
    /// When it was admitted, if this request is timed.
    start: Option<Instant>,
    in_flight: usize,
    done: bool,
    /// Work that may outlive the request: the slot is kept until it ends.
    hold: Option<SlotHold>,
    /// Admitted as a probe of a class refused for its deadline.
    probe: bool,
}

/// A permit parked in a [`SlotHold`]: completed when the last holder goes.
struct Parked(Option<Permit>, Outcome);

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(permit) = self.0.take() {
            permit.complete(self.1);
        }
    }
}

impl Permit {
    fn new(limiter: Limiter, class: ClassId, start: Option<Instant>, in_flight: usize) -> Self {
        Self {
            limiter,
            class,
            start,
            in_flight,
            done: false,
            hold: None,
            probe: false,
        }
    }

    /// Keeps the slot, after the request is done, until every clone of
    /// `hold` is dropped (see [`SlotHold`]).
    pub(crate) fn held_by(mut self, hold: Option<SlotHold>) -> Self {
        self.hold = hold;
        self
    }

    /// Releases the slot with the request's outcome.
    pub fn complete(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(hold) = self.hold.take()
            && hold.shared()
        {
            // Work goes on under this request's slot: release it when the
            // last holder is done (dropping `hold` here may be that moment).
            let parked = Self {
                limiter: self.limiter.clone(),
                class: self.class,
                start: self.start,
                in_flight: self.in_flight,
                done: false,
                hold: None,
                probe: self.probe,
            };
            hold.park(Box::new(Parked(Some(parked), outcome)));
            return;
        }
        let Some(start) = self.start else {
            self.limiter.release(self.class, None, None, false);
            return;
        };
        let now = Instant::now();
        let sample = Sample::new(
            start.into_std(),
            now.saturating_duration_since(start),
            self.in_flight,
            outcome,
            self.class,
        );
        self.limiter
            .release(self.class, Some(sample), Some(now), self.probe);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("class", &self.class)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// A place in the queue. Dropping it leaves the queue (or returns the slot
/// if it was granted meanwhile).
pub(crate) struct Ticket {
    limiter: Limiter,
    class: ClassId,
    id: u64,
    rx: oneshot::Receiver<Result<(), Reason>>,
    deadline: Instant,
    done: bool,
    /// Queued as a probe of a class refused on its own estimate.
    probe: bool,
}

/// What became of a ticket.
pub(crate) enum TicketOutcome {
    Admitted(Permit),
    Refused(Refusal),
}

impl Ticket {
    /// When the request stops waiting.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    fn admitted(&mut self) -> TicketOutcome {
        self.done = true;
        let in_flight = self.limiter.shared.fast.in_flight();
        let mut permit = Permit::new(
            self.limiter.clone(),
            self.class,
            Some(Instant::now()),
            in_flight,
        );
        permit.probe = self.probe;
        TicketOutcome::Admitted(permit)
    }

    fn refused(&mut self, reason: Reason) -> TicketOutcome {
        self.done = true;
        let state = self.limiter.lock();
        TicketOutcome::Refused(self.limiter.refusal(&state, reason))
    }

    /// Polls for a grant.
    pub(crate) fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<TicketOutcome> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(Ok(()))) => Poll::Ready(self.admitted()),
            Poll::Ready(Ok(Err(reason))) => Poll::Ready(self.refused(reason)),
            // The sender is gone without a word: the limiter dropped the
            // waiter, which it never does; refuse rather than hang.
            Poll::Ready(Err(_)) => Poll::Ready(self.refused(Reason::QueueFull)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The wait is over without a grant: leave the queue, unless a grant
    /// or a displacement arrived meanwhile.
    pub(crate) fn time_out(&mut self) -> TicketOutcome {
        if self.limiter.withdraw(self.class, self.id) {
            self.limiter.count_shed(self.class, Reason::QueueTimeout);
            return self.refused(Reason::QueueTimeout);
        }
        match self.rx.try_recv() {
            Ok(Ok(())) => self.admitted(),
            Ok(Err(reason)) => self.refused(reason),
            Err(_) => self.refused(Reason::QueueTimeout),
        }
    }
}

use std::future::Future as _;

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The caller went away while waiting.
        if !self.limiter.withdraw(self.class, self.id) {
            // Granted meanwhile: give the slot back.
            if let Ok(Ok(())) = self.rx.try_recv() {
                self.limiter.release(self.class, None, None, false);
            }
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("class", &self.class)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
