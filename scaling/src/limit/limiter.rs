//! The limiter shared by every clone of an [`AdaptiveLimit`](super::AdaptiveLimit).

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use gratify_core::estimate::{DecayedLatency, Evidence};
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
    /// The waiting queue (or the class's share of it) was full — or, under
    /// a sustained overload that lands on this class, as long as is worth
    /// keeping (16 waiting ahead of it): raising `max_queue` changes
    /// nothing then.
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
///
/// In a configuration file: `"delay-cost"`, `"fifo"`, `"reject-at-limit"`,
/// or `{ partitioned = [0.7, 0.3] }` (shares between 0 and 1 that add up to
/// at most 1, by class index).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    Partitioned(#[serde(deserialize_with = "shares")] Vec<f64>),
}

/// Partition shares: each between 0 and 1, together at most 1.
fn shares<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let shares = <Vec<f64> as serde::Deserialize>::deserialize(d)?;
    if let Some(bad) = shares.iter().find(|s| !(0.0..=1.0).contains(*s)) {
        return Err(serde::de::Error::custom(format!(
            "partitioned: share {bad} must be between 0 and 1"
        )));
    }
    let total: f64 = shares.iter().sum();
    if total > 1.0 + 1e-9 {
        return Err(serde::de::Error::custom(format!(
            "partitioned: the shares add up to {total}, more than the whole limit (1)"
        )));
    }
    Ok(shares)
}

/// A quantile strictly between 0 and 1.
fn quantile<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let q = <f64 as serde::Deserialize>::deserialize(d)?;
    if q > 0.0 && q < 1.0 {
        Ok(q)
    } else {
        Err(serde::de::Error::custom(format!(
            "deadline_quantile {q} must be between 0 and 1"
        )))
    }
}

/// The limiter's settings.
///
/// They read from a configuration file too: every key is optional (the
/// [`Default`] fills the rest), durations are text such as `"300ms"` or a
/// number of seconds, an unknown key is an error. Classes are named by their
/// index in the model — the order of [`CostModel::iter`], alphabetical by
/// name, so adding a class can move the others: a [`Stack`]'s `[limit]`
/// table names them instead. An index the model does not have is ignored
/// with a warning; waits and probe intervals beyond a day count as a day.
///
/// [`Stack`]: https://docs.rs/gratify/latest/gratify/stack/struct.Stack.html
///
/// ```
/// use std::time::Duration;
/// use gratify_scaling::limit::{Admission, LimiterConfig};
///
/// let config: LimiterConfig = serde_json::from_str(
///     r#"{ "admission": "fifo", "max_queue": 64, "max_queue_time": "250ms" }"#,
/// ).unwrap();
/// assert_eq!(config.admission, Admission::Fifo);
/// assert_eq!(config.max_queue_time, Duration::from_millis(250));
/// assert_eq!(config.warmup_samples, LimiterConfig::default().warmup_samples);
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LimiterConfig {
    /// How requests are admitted at the limit.
    pub admission: Admission,
    /// The most requests waiting, over all classes.
    pub max_queue: usize,
    /// The most waiting per class (`None`: only `max_queue`).
    pub max_queue_per_class: Option<usize>,
    /// The longest any request waits (a class with a deadline waits less).
    #[serde(with = "gratify_core::serde_util::duration")]
    pub max_queue_time: Duration,
    /// Samples before the cost rules may shed (cold start).
    pub warmup_samples: u64,
    /// Classes never shed by the cost or deadline rules, each with a cap on
    /// how many of it may wait.
    pub never_shed: Vec<(ClassId, usize)>,
    /// How fast each class's latency estimate forgets: the weight of a
    /// sample halves every `estimate_half_life` (default 2 s).
    #[serde(with = "gratify_core::serde_util::duration")]
    pub estimate_half_life: Duration,
    /// The quantile of a class's own latency that the deadline rule compares
    /// with its deadline (default 0.5: a request is refused for its deadline
    /// only when it would more likely than not be late).
    #[serde(deserialize_with = "quantile")]
    pub deadline_quantile: f64,
    /// While a class is refused on its own latency estimate (for its
    /// deadline or for cost), one of its requests is still served this
    /// often (default 100 ms) — at once with a slot free and nobody waiting,
    /// else queued in its turn — so that its estimate follows the service
    /// and the class returns as soon as it can be served; a probe that
    /// finishes in time outweighs the old evidence.
    #[serde(with = "gratify_core::serde_util::duration")]
    pub probe_interval: Duration,
    /// How refusals' bodies are written: plain text (the default), JSON, or
    /// a function of yours (`"text"` or `"json"` in a file). The status and
    /// headers are the same whichever; see [`gratify_core::refusal`].
    pub refusal_body: gratify_core::refusal::RefusalBody,
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
            refusal_body: gratify_core::refusal::RefusalBody::text(),
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
///
/// No lock is shared by every request. A request that finds room and no
/// queue is admitted with one compare-and-swap; under overload each class's
/// queue has a lock of its own, taken only to join it, leave it or be
/// granted from it; what the admission rules read of the other classes
/// (their queues' lengths and ages, their latency estimates) is published in
/// atomics. Timed completions (all of them below about 2,000 a second, one
/// in N above) teach the algorithm and the estimates under a lock of their
/// own that no request waits for.
#[derive(Clone)]
pub struct Limiter {
    shared: Arc<Shared>,
}

struct Shared {
    fast: Fast,
    /// What timed completions teach: the algorithm and the estimates.
    learn: Mutex<Learn>,
    /// Per class: its queue and what the request path reads of it.
    classes: Box<[ClassShared]>,
    /// Each class's delay-cost curve (swapped by `reload`).
    curves: RwLock<Vec<Curve>>,
    /// The mean service time of the recent mix (seconds, f64 bits): each
    /// class's robust mean weighted by its recent completions; what a slot's
    /// turnover is judged by. 0 until the first sample.
    service: AtomicU64,
    /// Enough samples for the cost rules to shed (cold start is over).
    warm: AtomicBool,
    /// When the load signal was last published (`NEVER`: not yet).
    published: AtomicU64,
    /// When the classes' needs (and `Fast::marginal`) were last estimated
    /// (nanoseconds from `origin`; `NEVER`: not yet).
    demand_at: AtomicU64,
    /// The queues' length it published then.
    published_queued: AtomicUsize,
    /// The instant the atomics' times count from.
    origin: Instant,
    /// Waiters' ids, taken under their class's queue lock so that each
    /// part of a queue (waiters admitted upstream, then first-hand ones) is
    /// in id order.
    next_id: AtomicU64,
    /// Swapped whole by `reload`; class names never change.
    model: gratify_core::SharedModel,
    signal: LoadSignal,
    config: LimiterConfig,
    rng: AtomicU64,
}

/// An instant that is not set, in the atomics that hold times.
const NEVER: u64 = u64::MAX;

/// What the request path reads and writes without a lock: a request that
/// finds room and no queue is admitted with one compare-and-swap, and most
/// completions only decrement a counter.
struct Fast {
    /// Requests holding a slot (the truth; no lock is needed to change it).
    in_flight: AtomicUsize,
    /// The limit (written under the learning lock).
    limit: AtomicUsize,
    /// Places in the queues, taken (before joining) and given back (after
    /// leaving), over all classes.
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
    /// Per class: slots held, kept only under partitioned admission (taken
    /// with a compare-and-swap against the class's share).
    held: Box<[AtomicUsize]>,
    /// Per class: the slots it is expected to need (its demand, rounded up,
    /// and its cushion) — kept free of the classes less dense in value than
    /// it, less what it holds; 0 while the model is not judging yet.
    reserve: Box<[AtomicUsize]>,
    /// Per class: the classes (by bit, the first 64) denser than it, whose
    /// `reserve` it must leave free.
    denser: Box<[AtomicU64]>,
    /// Per class: the overload lands on it — it is the least dense class
    /// still arriving, and the demand of all of them exceeds the limit.
    /// What it queues beyond a few is refused in the end whatever the
    /// order, so its queue is kept short.
    marginal: Box<[AtomicBool]>,
}

impl Fast {
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed).max(1)
    }

    fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Slots held by class `k`.
    fn class_in_flight(&self, k: usize) -> usize {
        let admitted = self.admitted[k].load(Ordering::Relaxed);
        let released = self.released[k].load(Ordering::Relaxed);
        admitted.saturating_sub(released) as usize
    }

    /// The limit as class `k` sees it: the limit less what each denser
    /// class is still expected to need beyond what it holds (a class holding
    /// more than its need frees nothing for another), never below one.
    fn limit_for(&self, k: usize) -> usize {
        let limit = self.limit();
        let mut mask = self.denser[k].load(Ordering::Relaxed);
        let mut unmet = 0usize;
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let need = self.reserve[j].load(Ordering::Relaxed);
            if need > 0 {
                unmet = unmet.saturating_add(need.saturating_sub(self.class_in_flight(j)));
            }
        }
        limit - unmet.min(limit - 1)
    }
}

/// One class: its queue behind its own lock, and copies of what others read
/// of it (the queue's length and the ages of its ends, the class's learned
/// latency) in atomics.
struct ClassShared {
    /// Its name (a reload never changes the classes).
    name: Box<str>,
    queue: Mutex<VecDeque<Waiter>>,
    /// The queue's length (written under its lock).
    len: AtomicUsize,
    /// How many of its waiters were admitted upstream (the queue's first
    /// part; written under its lock).
    upstream_len: AtomicUsize,
    /// When the first and the last waiter joined (nanoseconds from
    /// `origin`; meaningful while `len > 0`).
    head_at: AtomicU64,
    tail_at: AtomicU64,
    /// Its mean latency, seconds (f64 bits; 0 until the first sample).
    latency: AtomicU64,
    /// Its latency at the deadline rule's quantile, seconds (f64 bits; NaN
    /// before any sample).
    quantile: AtomicU64,
    /// Its estimate's evidence: the total (f64 bits) at the landmark
    /// (nanoseconds from `origin`, `NEVER` before any sample).
    evidence_total: AtomicU64,
    evidence_landmark: AtomicU64,
    /// When the next probe may pass while the class is refused on its own
    /// estimate (nanoseconds from `origin`; `NEVER`: at once).
    probe_at: AtomicU64,
    never_shed: Option<usize>,
    share: Option<f64>,
    /// Refused so far, by reason.
    shed: [AtomicU64; 7],
    /// Of its `deadline` refusals, those that waited in the queue until a
    /// propagated caller's time ran out: they size the class's reserve
    /// cushion as `queue-timeout` refusals do.
    waited_out: AtomicU64,
}

impl ClassShared {
    fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// Updates the atomic copies of the queue's shape (under its lock).
    fn mirror(&self, queue: &VecDeque<Waiter>, origin: Instant) {
        if let (Some(head), Some(tail)) = (queue.front(), queue.back()) {
            // Waiters admitted upstream go ahead of the class's others, so
            // the oldest may sit on either side of that
            // boundary; the tail is the waiter a displacement refuses.
            let fresh = queue.partition_point(|w| w.upstream);
            let mut oldest = head.enqueued;
            if fresh > 0 && fresh < queue.len() {
                oldest = oldest.min(queue[fresh].enqueued);
            }
            self.head_at
                .store(nanos_since(origin, oldest), Ordering::Relaxed);
            self.tail_at
                .store(nanos_since(origin, tail.enqueued), Ordering::Relaxed);
        }
        self.len.store(queue.len(), Ordering::SeqCst);
        self.upstream_len
            .store(queue.partition_point(|w| w.upstream), Ordering::Relaxed);
    }
}

/// Where the waiter `id` is in `queue`: each of its two parts (waiters
/// admitted upstream, then first-hand ones) is in id order, the whole is
/// not.
fn position(queue: &VecDeque<Waiter>, id: u64) -> Option<usize> {
    let fresh = queue.partition_point(|w| w.upstream);
    let search = |from: usize, to: usize| -> Option<usize> {
        let (mut lo, mut hi) = (from, to);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match queue[mid].id.cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    };
    search(0, fresh).or_else(|| search(fresh, queue.len()))
}

fn nanos_since(origin: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(NEVER - 1)
}

fn at_nanos(origin: Instant, nanos: u64) -> Instant {
    origin + Duration::from_nanos(nanos)
}

fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store_f64(a: &AtomicU64, x: f64) {
    a.store(x.to_bits(), Ordering::Relaxed);
}

/// What timed completions teach, under the learning lock.
struct Learn {
    algorithm: Box<dyn Algorithm>,
    /// Per class: its own recent latencies (nothing another class does
    /// moves them, and they fade when the class is not served).
    estimates: Vec<DecayedLatency>,
    /// EWMA latency, seconds (0 until the first sample).
    latency: f64,
    /// EWMA of the squared latency, for its variability.
    latency_sq: f64,
    samples: u64,
    /// Completions (estimated) since `rate_since`, to size `sample_every`.
    rate_count: u64,
    rate_since: Option<Instant>,
    /// Per class: arrivals (waiting, admitted or refused) counted at `demand_since`,
    /// and the arrival rate (per second, time-decayed).
    arrivals: Vec<u64>,
    arrival_rate: Vec<f64>,
    demand_since: Option<Instant>,
    /// Per class: its queue timeouts counted at `demand_since`, and the
    /// slots kept for it beyond its mean demand (grown while it times out
    /// in the queue, fading while it does not).
    timeouts: Vec<u64>,
    cushion: Vec<f64>,
    /// The classes' order by density must be recomputed now (a reload).
    reorder: bool,
}

struct Waiter {
    id: u64,
    enqueued: Instant,
    /// Admitted upstream by a trusted caller: queued ahead of its class's
    /// first-hand requests (these waiters are a prefix of the queue).
    upstream: bool,
    tx: oneshot::Sender<Result<(), Reason>>,
}

/// The outcome of asking for a slot.
pub(crate) enum Acquire {
    Admitted(Permit),
    Queued(Ticket),
    Refused(Refusal),
}

/// A refusal, with what a client should be told.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub(crate) reason: Reason,
    pub(crate) retry_after: Duration,
    /// How the limiter's refusals are written.
    pub(crate) body: gratify_core::refusal::RefusalBody,
    /// Written as a gRPC status (the request was gRPC).
    pub(crate) grpc: bool,
}

/// Two refusals are equal when they say the same (reason and retry time).
impl PartialEq for Refusal {
    fn eq(&self, other: &Self) -> bool {
        self.reason == other.reason && self.retry_after == other.retry_after
    }
}

impl Eq for Refusal {}

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
            .field("algorithm", &self.algorithm_name())
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

/// What the admission rules read, without a lock: the limiter's atomics
/// and the classes' curves, at one instant.
struct View<'a> {
    shared: &'a Shared,
    curves: &'a [Curve],
    now: Instant,
}

impl View<'_> {
    fn service(&self) -> f64 {
        load_f64(&self.shared.service)
    }

    fn class(&self, k: usize) -> &ClassShared {
        &self.shared.classes[k]
    }

    /// The class's mean latency (0 before any sample).
    fn latency(&self, k: usize) -> f64 {
        load_f64(&self.class(k).latency)
    }

    /// The class's evidence left now, in samples.
    fn weight(&self, k: usize) -> f64 {
        let c = self.class(k);
        let landmark = c.evidence_landmark.load(Ordering::Relaxed);
        if landmark == NEVER {
            return 0.0;
        }
        Evidence::new(
            at_nanos(self.shared.origin, landmark).into_std(),
            load_f64(&c.evidence_total),
            half_life_secs(&self.shared.config),
        )
        .weight(self.now.into_std())
    }

    /// The class's own latency at the deadline quantile, while its estimate
    /// holds enough recent evidence to judge by (seconds).
    fn judged_latency(&self, k: usize) -> Option<f64> {
        if self.weight(k) < MIN_EVIDENCE {
            return None;
        }
        let q = load_f64(&self.class(k).quantile);
        (!q.is_nan()).then_some(q)
    }

    /// The class's expected service time: its own recent mean (outliers
    /// bounded), or the mix's before it has been seen.
    fn expected_latency(&self, k: usize) -> f64 {
        // Its own figure while its evidence is recent: a class that has not
        // been served for a while falls back to the mix (its old figure may
        // describe a service that has since recovered).
        let service = self.service();
        match self.latency(k) {
            l if l > 0.0 && self.weight(k) >= MIN_EVIDENCE => l,
            l if service <= 0.0 && l > 0.0 => l,
            _ => service,
        }
    }

    /// The cμ index of class `k` for a request that has waited `age`
    /// seconds: its urgency when it would complete, per second of service.
    fn index(&self, k: usize, age: f64) -> f64 {
        let s = self.expected_latency(k).max(1e-6);
        urgency(&self.curves[k], age + s) / s
    }

    /// How long the first (`head`) or last waiter of class `k` has waited,
    /// seconds.
    fn age(&self, k: usize, head: bool) -> f64 {
        let c = self.class(k);
        let at = if head { &c.head_at } else { &c.tail_at };
        let at = at_nanos(self.shared.origin, at.load(Ordering::Relaxed));
        self.now.saturating_duration_since(at).as_secs_f64()
    }
}

/// A class's delay-cost curve, and the longest a response of it is worth
/// waiting for.
struct Curve {
    class: Class,
    /// The latest response time (seconds from arrival) whose cost is still
    /// at most the refusal cost (the cost is nondecreasing in time);
    /// negative when even an immediate response costs more.
    worth_until: f64,
}

impl std::ops::Deref for Curve {
    type Target = Class;

    fn deref(&self) -> &Class {
        &self.class
    }
}

impl Curve {
    fn new(class: &Class) -> Self {
        let r = class.refusal_cost();
        let cost = |t: f64| class.response_cost(Duration::from_secs_f64(t.clamp(0.0, 1e9)));
        let worth_until = if cost(0.0) > r {
            -1.0
        } else if cost(1e9) <= r {
            f64::INFINITY
        } else {
            // Bisection over [0, 1e9] seconds, to well under a nanosecond
            // for any wait that matters.
            let (mut lo, mut hi) = (0.0, 1e9);
            for _ in 0..100 {
                let mid = (lo + hi) / 2.0;
                if cost(mid) <= r {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        Self {
            class: class.clone(),
            worth_until,
        }
    }

    /// The longest wait `w ≤ cap` with `response_cost(w + s) ≤
    /// refusal_cost`, for a request whose service takes `s` seconds.
    fn worth_waiting(&self, s: f64, cap: f64) -> f64 {
        if cap <= 0.0 {
            return cap;
        }
        (self.worth_until - s).clamp(0.0, cap)
    }
}

/// The half-life of every class's estimate, seconds, as the estimator
/// holds it.
fn half_life_secs(config: &LimiterConfig) -> f64 {
    config.estimate_half_life.as_secs_f64().clamp(1e-3, 1e15)
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
        mut config: LimiterConfig,
    ) -> Self {
        // A wait or probe interval beyond a day is no limit at all; capping
        // it keeps every deadline computed from it representable.
        const DAY: Duration = Duration::from_secs(86_400);
        config.max_queue_time = config.max_queue_time.min(DAY);
        config.probe_interval = config.probe_interval.min(DAY);
        for (id, _) in &config.never_shed {
            if id.index() >= model.len() {
                tracing::warn!(class = %id, classes = model.len(), "never_shed names no class of the model; ignored");
            }
        }
        if let Admission::Partitioned(shares) = &config.admission
            && shares.len() != model.len()
        {
            tracing::warn!(
                shares = shares.len(),
                classes = model.len(),
                "partitioned admission has a share per class by index; missing shares are 0, extra ones ignored"
            );
        }
        let limit = algorithm.initial_limit().max(1);
        let n = model.len();
        let classes = model
            .iter()
            .map(|(id, name, _)| ClassShared {
                name: name.into(),
                queue: Mutex::new(VecDeque::new()),
                len: AtomicUsize::new(0),
                upstream_len: AtomicUsize::new(0),
                waited_out: AtomicU64::new(0),
                head_at: AtomicU64::new(0),
                tail_at: AtomicU64::new(0),
                latency: AtomicU64::new(0f64.to_bits()),
                quantile: AtomicU64::new(f64::NAN.to_bits()),
                evidence_total: AtomicU64::new(0f64.to_bits()),
                evidence_landmark: AtomicU64::new(NEVER),
                probe_at: AtomicU64::new(NEVER),
                never_shed: config
                    .never_shed
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map(|(_, cap)| *cap),
                share: match &config.admission {
                    Admission::Partitioned(shares) => shares.get(id.index()).copied(),
                    _ => None,
                },
                shed: Default::default(),
            })
            .collect();
        let curves = model
            .iter()
            .map(|(_, _, class)| Curve::new(class))
            .collect();
        let estimates = (0..n)
            .map(|_| DecayedLatency::new(config.estimate_half_life))
            .collect();
        Self {
            shared: Arc::new(Shared {
                fast: Fast {
                    in_flight: AtomicUsize::new(0),
                    limit: AtomicUsize::new(limit),
                    queued: AtomicUsize::new(0),
                    sample_every: AtomicU64::new(1),
                    hopeless: (0..n).map(|_| AtomicBool::new(false)).collect(),
                    admitted: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    released: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    held: (0..n).map(|_| AtomicUsize::new(0)).collect(),
                    reserve: (0..n).map(|_| AtomicUsize::new(0)).collect(),
                    denser: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    marginal: (0..n).map(|_| AtomicBool::new(false)).collect(),
                },
                learn: Mutex::new(Learn {
                    algorithm: Box::new(algorithm),
                    estimates,
                    latency: 0.0,
                    latency_sq: 0.0,
                    samples: 0,
                    rate_count: 0,
                    rate_since: None,
                    arrivals: vec![0; n],
                    arrival_rate: vec![0.0; n],
                    demand_since: None,
                    timeouts: vec![0; n],
                    cushion: vec![0.0; n],
                    reorder: false,
                }),
                classes,
                curves: RwLock::new(curves),
                service: AtomicU64::new(0f64.to_bits()),
                warm: AtomicBool::new(config.warmup_samples == 0),
                published: AtomicU64::new(NEVER),
                demand_at: AtomicU64::new(NEVER),
                published_queued: AtomicUsize::new(0),
                origin: Instant::now(),
                next_id: AtomicU64::new(0),
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
    /// every class's curve and the algorithm's model are swapped together;
    /// requests decided before see the old costs, requests after the new.
    ///
    /// # Errors
    ///
    /// The new model has other classes or another default class (see
    /// [`CostModel::check_reload`]); nothing changes then.
    pub fn reload(&self, model: &CostModel) -> Result<(), gratify_core::ModelError> {
        self.model().check_reload(model)?;
        let mut learn = self.learn();
        {
            let mut curves = self.curves_mut();
            for (curve, (_, _, class)) in curves.iter_mut().zip(model.iter()) {
                *curve = Curve::new(class);
            }
        }
        for c in self.shared.classes.iter() {
            // Refusals for the old deadline end; the latencies learned
            // stay (they are the service's, not the model's).
            c.probe_at.store(NEVER, Ordering::Relaxed);
        }
        learn.algorithm.reload(model);
        // The classes' order by density follows the new costs at once, and
        // waiters the new order lets in are granted.
        learn.reorder = true;
        let now = Instant::now();
        self.tune(&mut learn, now);
        drop(learn);
        let result = self.shared.model.reload(model);
        self.grant_now(now);
        result
    }

    /// The name of the algorithm.
    pub fn algorithm_name(&self) -> &'static str {
        self.learn().algorithm.name()
    }

    /// A snapshot of the limiter's figures.
    pub fn stats(&self) -> LimiterStats {
        let (latency, latency_sq) = {
            let learn = self.learn();
            (learn.latency, learn.latency_sq)
        };
        let curves = self.curves();
        let view = self.view(&curves, Instant::now());
        let fast = &self.shared.fast;
        LimiterStats {
            limit: fast.limit(),
            in_flight: fast.in_flight(),
            queued: fast.queued(),
            latency,
            latency_scv: if latency > 0.0 {
                ((latency_sq - latency * latency) / (latency * latency)).max(0.0)
            } else {
                1.0
            },
            shadow_price: shadow_price(&view),
            timed_one_in: fast.sample_every.load(Ordering::Relaxed),
            classes: self
                .shared
                .classes
                .iter()
                .enumerate()
                .map(|(k, c)| ClassStats {
                    in_flight: fast.class_in_flight(k),
                    queued: c.len(),
                    admitted: fast.admitted[k].load(Ordering::Relaxed),
                    completed: fast.released[k].load(Ordering::Relaxed),
                    shed: std::array::from_fn(|r| c.shed[r].load(Ordering::Relaxed)),
                    latency: view.latency(k),
                    latency_quantile: {
                        let q = load_f64(&c.quantile);
                        if q.is_nan() { 0.0 } else { q }
                    },
                })
                .collect(),
        }
    }

    // The locks guard data that is consistent between statements; a panic
    // elsewhere while one was held cannot leave it half-updated, so recover.

    fn learn(&self) -> MutexGuard<'_, Learn> {
        self.shared
            .learn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn curves(&self) -> RwLockReadGuard<'_, Vec<Curve>> {
        self.shared
            .curves
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn curves_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Curve>> {
        self.shared
            .curves
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn queue(&self, k: usize) -> MutexGuard<'_, VecDeque<Waiter>> {
        self.shared.classes[k]
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn view<'a>(&'a self, curves: &'a [Curve], now: Instant) -> View<'a> {
        View {
            shared: &self.shared,
            curves,
            now,
        }
    }

    /// Asks for a slot for a request of `class`.
    pub(crate) fn acquire(&self, class: ClassId) -> Acquire {
        self.acquire_first_hand(class, false)
    }

    /// Asks for a slot for a request of `class` that a trusted caller may
    /// have propagated: refused at once when its deadline has passed or
    /// its class's measured latency (at the deadline rule's quantile) says
    /// it cannot finish before it; queued ahead of the class's first-hand
    /// requests, and for no longer than it can still finish in time.
    pub(crate) fn acquire_propagated(
        &self,
        class: ClassId,
        propagated: Option<gratify_core::classify::Propagated>,
    ) -> Acquire {
        let Some(propagated) = propagated else {
            return self.acquire_first_hand(class, false);
        };
        let k = class.index().min(self.shared.fast.hopeless.len() - 1);
        let config = &self.shared.config;
        // The latest instant the request may still start.
        let mut start_by = None;
        if let Some(deadline) = propagated.deadline {
            let now = Instant::now();
            let deadline = Instant::from_std(deadline);
            if deadline <= now {
                // The caller has gone: refused without asking the limiter,
                // so not counted as shed (as `admit_by`).
                return Acquire::Refused(self.refusal(Reason::Deadline));
            }
            // A class that must never be shed waits its turn; the other
            // admission modes judge no latencies.
            let judge = self.shared.classes[k].never_shed.is_none()
                && matches!(config.admission, Admission::DelayCost);
            let service = if judge {
                let curves = self.curves();
                self.view(&curves, now).judged_latency(k)
            } else {
                None
            };
            let service = service
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map_or(Duration::ZERO, |s| {
                    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
                });
            let latest = deadline.checked_sub(service).filter(|t| *t > now);
            let Some(latest) = latest else {
                return Acquire::Refused(self.refuse(k, Reason::Deadline));
            };
            start_by = Some(latest);
        }
        // Only the cost rule orders by value: the plain modes stay first come,
        // first served.
        let upstream = matches!(config.admission, Admission::DelayCost);
        match self.acquire_first_hand(class, upstream) {
            Acquire::Queued(mut ticket) => {
                // The caller's time, when it runs out first: a slot granted
                // after it goes back, and the call is refused for its
                // deadline (gRPC `DEADLINE_EXCEEDED`), not as though the
                // service were overloaded (which invites a retry).
                if let Some(latest) = start_by
                    && latest <= ticket.deadline
                {
                    ticket.deadline = latest;
                    ticket.hard = true;
                    ticket.late = Reason::Deadline;
                }
                Acquire::Queued(ticket)
            }
            other => other,
        }
    }

    /// [`acquire`](Self::acquire); `upstream`: a trusted caller admitted the
    /// request already.
    fn acquire_first_hand(&self, class: ClassId, upstream: bool) -> Acquire {
        let fast = &self.shared.fast;
        let k = class.index().min(fast.hopeless.len() - 1);
        let class = ClassId::from_index(k as u16);
        // The fast path: room, nobody waiting, nothing to judge.
        if !matches!(self.shared.config.admission, Admission::Partitioned(_))
            && fast.queued() == 0
            && !fast.hopeless[k].load(Ordering::Relaxed)
            && let Some(in_flight) = try_take(fast, k)
        {
            let start = sampled(fast.sample_every.load(Ordering::Relaxed)).then(Instant::now);
            return Acquire::Admitted(Permit::new(self.clone(), class, start, in_flight));
        }

        let now = Instant::now();
        let config = &self.shared.config;
        if let Admission::Partitioned(_) = config.admission {
            let result = match take_partitioned(fast, &self.shared.classes[k], k) {
                Some(in_flight) => {
                    Acquire::Admitted(Permit::new(self.clone(), class, Some(now), in_flight))
                }
                None => Acquire::Refused(self.refuse(k, Reason::Partition)),
            };
            self.publish(now);
            return result;
        }
        let curves = self.curves();
        let view = self.view(&curves, now);
        let room = fast.in_flight() < fast.limit_for(k);
        let mut decision = decide(config, fast, &view, k, room, upstream);
        let mut taken = None;
        let c = &self.shared.classes[k];
        if let Decision::Admit = decision {
            // Another request may have taken the last slot meanwhile: then
            // there is no room, whatever `room` said.
            taken = try_take(fast, k);
            if taken.is_none() {
                decision = decide(config, fast, &view, k, false, upstream);
            }
        }
        let mut probe = false;
        if let Decision::Refuse(Reason::Deadline | Reason::Cost) = decision
            && matches!(config.admission, Admission::DelayCost)
            && c.never_shed.is_none()
            && self.claim_probe(c, now)
        {
            // Refused on what its own latency estimate says: now and then a
            // request is served anyway — at once with a slot free and
            // nobody waiting, else from the queue in its turn — so that the
            // estimate follows the service and the class comes back when it
            // can be served.
            probe = true;
            if fast.queued() == 0
                && let Some(in_flight) = try_take(fast, k)
            {
                taken = Some(in_flight);
                decision = Decision::Admit;
            } else {
                let cap = curves[k]
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
                let Some(in_flight) = taken else {
                    // `decide(room: false)` never admits: unreachable, and
                    // refused rather than admitted without a slot.
                    drop(curves);
                    return Acquire::Refused(self.refuse(k, Reason::AtLimit));
                };
                let mut permit = Permit::new(self.clone(), class, Some(now), in_flight);
                permit.probe = probe;
                Acquire::Admitted(permit)
            }
            Decision::Queue { max_wait, displace } => {
                match self.enqueue(&view, k, now, displace, probe, upstream) {
                    Ok((id, rx)) => Acquire::Queued(Ticket {
                        limiter: self.clone(),
                        class,
                        id,
                        rx,
                        deadline: now + max_wait,
                        hard: false,
                        late: Reason::QueueTimeout,
                        done: false,
                        probe,
                    }),
                    Err(reason) => Acquire::Refused(self.refuse(k, reason)),
                }
            }
            Decision::Refuse(reason) => Acquire::Refused(self.refuse(k, reason)),
        };
        // Not held into `publish`, which reads the curves again (a second
        // read of a lock a writer waits for would deadlock).
        drop(curves);
        self.publish(now);
        result
    }

    /// Asks for a slot for work of `class` that is not a tower request — a
    /// WebSocket message, a queue consumer's job, a step of a game loop —
    /// with the same admission, accounting, metrics and load signal as the
    /// [`AdaptiveLimit`](super::AdaptiveLimit) layer: admitted at once,
    /// refused at once, or queued in its class's turn for as long as
    /// waiting is worth it.
    ///
    /// The [`Permit`] holds the slot: [`complete`](Permit::complete) it with
    /// the work's outcome (its latency then teaches the limiter), or drop it
    /// (a cancellation, which teaches nothing). Dropping this future while
    /// it waits leaves the queue.
    ///
    /// # Errors
    ///
    /// The [`Refusal`] when the work is refused, at once or after waiting.
    ///
    /// # Example
    ///
    /// ```
    /// use gratify_core::CostModel;
    /// use gratify_scaling::limit::{Fixed, Limiter, LimiterConfig, Outcome, Reason};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let model = CostModel::from_toml(r#"
    ///     default_class = "move"
    ///     [classes.move]
    ///     delay_cost = { shape = "linear", per_second = 10.0, deadline = "50ms" }
    ///     refusal_cost = 0.5
    /// "#).unwrap();
    /// let moves = model.default_class();
    /// let limiter = Limiter::with_algorithm(&model, Fixed::new(1), LimiterConfig::default());
    ///
    /// let permit = limiter.admit(moves).await.unwrap();
    /// assert_eq!(limiter.stats().in_flight, 1);
    /// // The one slot is held: the next message waits in its turn, and is
    /// // refused once it could no longer make its deadline.
    /// let late = limiter.admit(moves).await.unwrap_err();
    /// assert_eq!(late.reason(), Reason::QueueTimeout);
    /// permit.complete(Outcome::Success);
    /// assert_eq!(limiter.stats().in_flight, 0);
    /// # }
    /// ```
    pub async fn admit(&self, class: ClassId) -> Result<Permit, Refusal> {
        self.admit_until(class, None).await
    }

    /// [`admit`](Self::admit), waiting no later than `deadline` (a tick's
    /// end, a message's expiry), or the class's own longest wait if that is
    /// sooner: work still queued then is refused (`queue-timeout`), and so
    /// is work granted a slot only after it (the slot goes straight back).
    /// Work whose deadline has already passed is refused at once
    /// (`deadline`) without asking the limiter — not counted as shed, as
    /// the limiter did not decide it. The limiter does not know the
    /// deadline while the work waits: it queues it as any of its class.
    ///
    /// # Errors
    ///
    /// The [`Refusal`] when the work is refused.
    pub async fn admit_by(&self, class: ClassId, deadline: Instant) -> Result<Permit, Refusal> {
        self.admit_until(class, Some(deadline)).await
    }

    async fn admit_until(
        &self,
        class: ClassId,
        deadline: Option<Instant>,
    ) -> Result<Permit, Refusal> {
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(self.refusal(Reason::Deadline));
        }
        let mut ticket = match self.acquire(class) {
            Acquire::Admitted(permit) => return Ok(permit),
            Acquire::Refused(refusal) => return Err(refusal),
            Acquire::Queued(ticket) => ticket,
        };
        let until = deadline.map_or(ticket.deadline(), |d| d.min(ticket.deadline()));
        let mut sleep = std::pin::pin!(tokio::time::sleep_until(until));
        // A dropped wait drops the ticket, which leaves the queue (or gives
        // back a slot granted meanwhile).
        let outcome = std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(outcome) = ticket.poll(cx) {
                return std::task::Poll::Ready(outcome);
            }
            match sleep.as_mut().poll(cx) {
                std::task::Poll::Ready(()) => std::task::Poll::Ready(ticket.time_out()),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
        .await;
        match outcome {
            // Granted, but only once the caller's deadline had passed (the
            // grant raced the timer): the slot goes back at once.
            TicketOutcome::Admitted(permit) if deadline.is_some_and(|d| Instant::now() >= d) => {
                drop(permit);
                self.count_shed(class, Reason::QueueTimeout);
                Err(self.refusal(Reason::QueueTimeout))
            }
            TicketOutcome::Admitted(permit) => Ok(permit),
            TicketOutcome::Refused(refusal) => Err(refusal),
        }
    }

    /// Lets one probe of a refused class pass per `probe_interval`.
    fn claim_probe(&self, c: &ClassShared, now: Instant) -> bool {
        let origin = self.shared.origin;
        let now_n = nanos_since(origin, now);
        let next = now
            .checked_add(self.shared.config.probe_interval)
            .map_or(NEVER - 1, |t| nanos_since(origin, t));
        let at = c.probe_at.load(Ordering::Relaxed);
        (at == NEVER || now_n >= at)
            && c.probe_at
                .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Counts a refusal and says what the client should be told.
    fn refuse(&self, k: usize, reason: Reason) -> Refusal {
        self.shared.classes[k].shed[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.on_shed(k, reason);
        self.refusal(reason)
    }

    /// Joins class `k`'s queue (displacing the last waiter of class
    /// `displace` first, if given): the waiter's id and its receiver.
    #[allow(clippy::type_complexity)]
    fn enqueue(
        &self,
        view: &View<'_>,
        k: usize,
        now: Instant,
        displace: Option<usize>,
        probe: bool,
        upstream: bool,
    ) -> Result<(u64, oneshot::Receiver<Result<(), Reason>>), Reason> {
        let fast = &self.shared.fast;
        let config = &self.shared.config;
        let c = &self.shared.classes[k];
        // A probe is let in past the caps: one per interval.
        let cap = if probe {
            None
        } else {
            c.never_shed.or(config.max_queue_per_class)
        };
        // A place in the queues: the displaced waiter's, handed over, or a
        // new one within `max_queue`.
        if !displace.is_some_and(|j| self.displace_last(j)) {
            let before = fast.queued.fetch_add(1, Ordering::SeqCst);
            if !probe && before >= config.max_queue {
                fast.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(Reason::QueueFull);
            }
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut queue = self.queue(k);
            // The class's own cap, judged again where no other request of
            // the class can join meanwhile.
            if cap.is_some_and(|cap| queue.len() >= cap) {
                drop(queue);
                fast.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(Reason::QueueFull);
            }
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            let waiter = Waiter {
                id,
                enqueued: now,
                upstream,
                tx,
            };
            if upstream {
                let at = queue.partition_point(|w| w.upstream);
                queue.insert(at, waiter);
            } else {
                queue.push_back(waiter);
            }
            c.mirror(&queue, self.shared.origin);
            id
        };
        // A slot freed by a completion that saw no waiter yet: take it now.
        self.grant(view);
        Ok((id, rx))
    }

    /// Refuses the last waiter of class `j` to make room for a more valuable
    /// request, which takes its place in the queues (the count of places is
    /// left as it is); whether there was one.
    fn displace_last(&self, j: usize) -> bool {
        let c = &self.shared.classes[j];
        {
            let mut queue = self.queue(j);
            let Some(waiter) = queue.pop_back() else {
                return false;
            };
            c.mirror(&queue, self.shared.origin);
            // Told under the lock, so that a waiter that leaves at the same
            // moment either finds itself still queued or finds the answer.
            let _ = waiter.tx.send(Err(Reason::Displaced));
        }
        c.shed[Reason::Displaced.index()].fetch_add(1, Ordering::Relaxed);
        self.on_shed(j, Reason::Displaced);
        true
    }

    fn refusal(&self, reason: Reason) -> Refusal {
        // The backlog's drain time, with up to 50% jitter so that refused
        // clients do not all return at once; at least a second, as
        // Retry-After counts whole seconds.
        let limit = self.shared.fast.limit() as f64;
        let service = load_f64(&self.shared.service);
        let drain = (self.shared.fast.queued() as f64 + 1.0) * service / limit + service;
        let x = self
            .shared
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let jitter = 1.0 + ((x >> 11) as f64 / (1u64 << 53) as f64) * 0.5;
        let secs = (drain * jitter).ceil().clamp(1.0, 3600.0);
        Refusal {
            reason,
            retry_after: Duration::from_secs(secs as u64),
            body: self.shared.config.refusal_body.clone(),
            grpc: false,
        }
    }

    fn on_shed(&self, k: usize, reason: Reason) {
        let name = &*self.shared.classes[k].name;
        tracing::debug!(class = name, reason = reason.as_str(), "request shed");
        #[cfg(feature = "metrics")]
        {
            metrics::counter!(gratify_core::telemetry::LIMIT_SHED_TOTAL.name, "class" => name.to_owned(), "reason" => reason.as_str())
                .increment(1);
            // Every refusal, whoever refused, in one counter.
            metrics::counter!(
                gratify_core::telemetry::REFUSED_TOTAL.name,
                "by" => "limit",
                "class" => name.to_owned(),
                "reason" => reason.as_str()
            )
            .increment(1);
        }
    }

    /// Releases a slot; a timed completion (`sample`) also teaches the
    /// algorithm and the estimators.
    fn release(&self, class: ClassId, sample: Option<Sample>, now: Option<Instant>, probe: bool) {
        let fast = &self.shared.fast;
        let k = class.index().min(fast.hopeless.len() - 1);
        fast.released[k].fetch_add(1, Ordering::Relaxed);
        if let Admission::Partitioned(_) = self.shared.config.admission {
            fast.held[k].fetch_sub(1, Ordering::SeqCst);
        }
        fast.in_flight.fetch_sub(1, Ordering::SeqCst);
        let (Some(sample), Some(now)) = (sample, now) else {
            // Untimed: only a waiter may need the slot.
            if fast.queued() > 0 {
                let now = Instant::now();
                self.grant_now(now);
                self.publish(now);
            }
            return;
        };
        {
            let mut learn = self.learn();
            let median = learn.estimates[k].quantile(0.5);
            if teaches_latency(sample.outcome, sample.latency, median) {
                let secs = sample.latency.as_secs_f64();
                let deadline = self.curves()[k].deadline();
                let estimate = &mut learn.estimates[k];
                // A probe of a class refused for its deadline that finishes
                // in time: the old evidence is out of date.
                if probe && deadline.is_some_and(|d| sample.latency <= d) {
                    estimate.discount(0.25);
                }
                estimate.record(now.into_std(), sample.latency);
                self.mirror_estimate(k, estimate);
                learn.latency = ewma(learn.latency, secs, 0.02);
                learn.latency_sq = ewma(learn.latency_sq, secs * secs, 0.02);
                learn.samples += 1;
                if learn.samples >= self.shared.config.warmup_samples {
                    self.shared.warm.store(true, Ordering::Relaxed);
                }
            }
            // Cancellations, errors and answers the client caused say
            // nothing of the service's capacity (Netflix's `onIgnore`).
            if teaches_limit(sample.outcome) {
                let limit = learn.algorithm.update(&sample).max(1);
                fast.limit.store(limit, Ordering::Relaxed);
            }
            self.tune(&mut learn, now);
        }
        if fast.queued() > 0 {
            self.grant_now(now);
        }
        self.publish(now);
    }

    /// Copies class `k`'s estimate into the atomics the request path reads.
    fn mirror_estimate(&self, k: usize, estimate: &DecayedLatency) {
        let c = &self.shared.classes[k];
        store_f64(&c.latency, estimate.mean().map_or(0.0, |d| d.as_secs_f64()));
        store_f64(
            &c.quantile,
            estimate
                .quantile(self.shared.config.deadline_quantile)
                .map_or(f64::NAN, |d| d.as_secs_f64()),
        );
        match estimate.evidence() {
            Some(e) => {
                store_f64(&c.evidence_total, e.total);
                let landmark = Instant::from_std(e.landmark);
                c.evidence_landmark
                    .store(nanos_since(self.shared.origin, landmark), Ordering::Relaxed);
            }
            None => c.evidence_landmark.store(NEVER, Ordering::Relaxed),
        }
    }

    /// Updates what the request path relies on: which classes are past
    /// hope, the mix's service time, and how many completions to time.
    fn tune(&self, learn: &mut Learn, now: Instant) {
        let fast = &self.shared.fast;
        let every = fast.sample_every.load(Ordering::Relaxed);
        learn.rate_count += every;
        let since = *learn.rate_since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= Duration::from_millis(100) {
            // Aim at about 2,000 timed completions a second.
            let rate = learn.rate_count as f64 / elapsed.as_secs_f64();
            let every = (rate / 2000.0).clamp(1.0, 1024.0) as u64;
            fast.sample_every
                .store(every.next_power_of_two().max(1), Ordering::Relaxed);
            learn.rate_count = 0;
            learn.rate_since = Some(now);
        }
        let config = &self.shared.config;
        let judge = matches!(config.admission, Admission::DelayCost)
            && learn.samples >= config.warmup_samples;
        let curves = self.curves();
        let view = self.view(&curves, now);
        let (mut weighted, mut weights) = (0.0, 0.0);
        for k in 0..self.shared.classes.len() {
            let w = view.weight(k);
            weighted += w * view.latency(k);
            weights += w;
            let late = self.shared.classes[k].never_shed.is_none()
                && curves[k]
                    .deadline()
                    .is_some_and(|d| view.judged_latency(k).is_some_and(|s| s > d.as_secs_f64()));
            fast.hopeless[k].store(judge && late, Ordering::Relaxed);
        }
        if weights > 0.0 {
            store_f64(&self.shared.service, weighted / weights);
        }
        self.reserve_for_denser(learn, &view, judge, now);
    }

    /// Keeps slots free for the classes denser in value (the cμ index: cost
    /// rate per second of service) than each class, so that a cheap class
    /// with long requests cannot take the slots that a valuable class with
    /// short ones arrives to find (trunk reservation): their expected demand
    /// in slots (arrival rate × latency, rounded up), and a cushion that
    /// grows by a slot for each of their requests that waits out its time
    /// in the queue and fades while none does — so the reserve costs the
    /// cheap classes nothing where the valuable ones were never kept
    /// waiting. A class that is past hope for its deadline is not reserved
    /// for, and no class is ever left with less than one slot. Also marks
    /// the class a sustained overload lands on (`Fast::marginal`).
    fn reserve_for_denser(&self, learn: &mut Learn, view: &View<'_>, judge: bool, now: Instant) {
        let fast = &self.shared.fast;
        let n = self.shared.classes.len();
        let since = *learn.demand_since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        if elapsed >= 0.1 {
            learn.demand_since = Some(now);
            self.update_demand(learn, elapsed);
        } else if !std::mem::take(&mut learn.reorder) {
            return;
        }
        let density: Vec<f64> = (0..n).map(|k| view.index(k, 0.0)).collect();
        let counted = |j: usize| judge && !fast.hopeless[j].load(Ordering::Relaxed);
        // Demand in slots: arrival rate × latency (its own while it has
        // any, so a rare class is not sized by the mix).
        let demand: Vec<f64> = (0..n)
            .map(|j| {
                if !counted(j) {
                    return 0.0;
                }
                let latency = match view.latency(j) {
                    l if l > 0.0 => l,
                    _ => view.service(),
                };
                learn.arrival_rate[j] * latency
            })
            .collect();
        // Whether the overload is sustained is a matter of demand alone:
        // cushions (grown by queue timeouts, which the short queue itself
        // causes) would keep the flag up after the demand has gone.
        let swamped = demand.iter().sum::<f64>() > fast.limit() as f64;
        // Classes still arriving (one request in ten seconds or more) that
        // are not past hope.
        let active =
            |j: usize| learn.arrival_rate[j] >= 0.1 && !fast.hopeless[j].load(Ordering::Relaxed);
        // The one class the overload lands on: the least dense of those
        // still arriving (the first of a tie). Waiting for its own queue to
        // time out first (to tell a passing overload from a lasting one)
        // cost more than it saved in the simulator's scenarios.
        let least = (0..n)
            .filter(|&j| active(j))
            .min_by(|&a, &b| density[a].total_cmp(&density[b]).then(a.cmp(&b)));
        for k in 0..n {
            fast.marginal[k].store(judge && swamped && least == Some(k), Ordering::Relaxed);
            // What is kept for it: its demand and its cushion; below a
            // twentieth of a slot, none.
            let need = if counted(k) {
                demand[k] + learn.cushion[k]
            } else {
                0.0
            };
            let reserve = if need >= MIN_RESERVE {
                need.ceil().min(1e6) as usize
            } else {
                0
            };
            fast.reserve[k].store(reserve, Ordering::Relaxed);
            let mut mask = 0u64;
            for j in 0..n.min(64) {
                if j != k && density[j] > density[k] {
                    mask |= 1 << j;
                }
            }
            fast.denser[k].store(mask, Ordering::Relaxed);
        }
        self.shared
            .demand_at
            .store(nanos_since(self.shared.origin, now), Ordering::Relaxed);
    }

    /// Each class's arrival rate (waiting, admitted or refused, per second,
    /// time-decayed) and cushion, over the last `elapsed` seconds.
    fn update_demand(&self, learn: &mut Learn, elapsed: f64) {
        let fast = &self.shared.fast;
        let keep = (-elapsed / DEMAND_WINDOW_SECS).exp();
        for (k, c) in self.shared.classes.iter().enumerate() {
            // Each request counts once: while it waits, then as admitted or
            // refused (a queue hides no demand).
            let arrived = fast.admitted[k].load(Ordering::Relaxed)
                + c.shed
                    .iter()
                    .map(|s| s.load(Ordering::Relaxed))
                    .sum::<u64>()
                + c.len() as u64;
            let delta = arrived.saturating_sub(learn.arrivals[k]);
            learn.arrivals[k] = arrived;
            learn.arrival_rate[k] =
                learn.arrival_rate[k] * keep + delta as f64 / elapsed * (1.0 - keep);
            let timeouts = c.shed[Reason::QueueTimeout.index()].load(Ordering::Relaxed)
                + c.waited_out.load(Ordering::Relaxed);
            // A slot more for each request that waited out its time in the
            // queue; the cushion fades over `CUSHION_FADE_SECS` without one,
            // and is gone below half a slot.
            learn.cushion[k] = if timeouts > learn.timeouts[k] {
                let step = (timeouts - learn.timeouts[k]) as f64;
                (learn.cushion[k] + step).min(fast.limit() as f64 / 2.0)
            } else {
                let faded = learn.cushion[k] * (-elapsed / CUSHION_FADE_SECS).exp();
                if faded < 0.5 { 0.0 } else { faded }
            };
            learn.timeouts[k] = timeouts;
        }
    }

    /// Takes a queued request out of its queue (it gave up or timed out).
    /// Returns `false` if it had been granted or displaced meanwhile.
    fn withdraw(&self, class: ClassId, id: u64) -> bool {
        let k = class.index().min(self.shared.classes.len() - 1);
        {
            let mut queue = self.queue(k);
            let Some(i) = position(&queue, id) else {
                return false;
            };
            queue.remove(i);
            self.shared.classes[k].mirror(&queue, self.shared.origin);
        }
        self.shared.fast.queued.fetch_sub(1, Ordering::SeqCst);
        let now = Instant::now();
        self.grant_now(now);
        self.publish(now);
        true
    }

    fn count_shed(&self, class: ClassId, reason: Reason) {
        let k = class.index().min(self.shared.classes.len() - 1);
        self.shared.classes[k].shed[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.on_shed(k, reason);
    }

    /// [`count_shed`](Self::count_shed) for a waiter whose wait ran out:
    /// `reason` is `queue-timeout`, or `deadline` when the time was a
    /// propagated caller's (counted for the reserve's cushion all the same).
    fn count_waited_out(&self, class: ClassId, reason: Reason) {
        if reason == Reason::Deadline {
            let k = class.index().min(self.shared.classes.len() - 1);
            self.shared.classes[k]
                .waited_out
                .fetch_add(1, Ordering::Relaxed);
        }
        self.count_shed(class, reason);
    }

    /// [`grant`](Self::grant) with a view of its own.
    fn grant_now(&self, now: Instant) {
        let curves = self.curves();
        self.grant(&self.view(&curves, now));
    }

    /// Grants slots to waiters while there is room, the most urgent first.
    fn grant(&self, view: &View<'_>) {
        let fast = &self.shared.fast;
        let delay_cost = matches!(self.shared.config.admission, Admission::DelayCost);
        // A queue found empty was emptied by another thread since its length
        // was read; a few of those and this thread leaves the rest to it.
        let mut misses = 0;
        // Classes whose head could not take a free slot (it is kept for a
        // denser class): the next most urgent may.
        let mut held_back = 0u64;
        loop {
            if fast.queued() == 0 || fast.in_flight() >= fast.limit() {
                break;
            }
            let classes = self
                .shared
                .classes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j >= 64 || held_back & (1 << j) == 0);
            let best = if delay_cost {
                classes
                    .filter(|(_, c)| c.len() > 0)
                    .map(|(j, c)| {
                        let age = view.age(j, true);
                        (j, view.index(j, age), c.head_at.load(Ordering::Relaxed))
                    })
                    // Highest index; the longest waiting on a tie.
                    .max_by(|a, b| a.1.total_cmp(&b.1).then(b.2.cmp(&a.2)))
                    .map(|(j, ..)| j)
            } else {
                classes
                    .filter(|(_, c)| c.len() > 0)
                    .min_by_key(|(_, c)| c.head_at.load(Ordering::Relaxed))
                    .map(|(j, _)| j)
            };
            let Some(j) = best else {
                break;
            };
            let c = &self.shared.classes[j];
            let mut queue = self.queue(j);
            let Some(waiter) = queue.pop_front() else {
                misses += 1;
                if misses > 8 {
                    break;
                }
                continue;
            };
            // Take the slot before telling the waiter.
            if try_take(fast, j).is_none() {
                queue.push_front(waiter);
                if j >= 64 || fast.in_flight() >= fast.limit() {
                    break;
                }
                held_back |= 1 << j;
                continue;
            }
            c.mirror(&queue, self.shared.origin);
            // Told under the queue's lock: a waiter leaving at the same
            // moment either finds itself queued or finds the slot, which it
            // then gives back.
            let sent = waiter.tx.send(Ok(()));
            drop(queue);
            fast.queued.fetch_sub(1, Ordering::SeqCst);
            if sent.is_err() {
                // Its caller is gone: the slot goes to the next waiter.
                fast.admitted[j].fetch_sub(1, Ordering::Relaxed);
                fast.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Publishes the load signal: at once when the queues' length has
    /// doubled or halved since the last figures (or become empty or not),
    /// else at most every millisecond — readers do not need every request.
    fn publish(&self, now: Instant) {
        let shared = &self.shared;
        let now_n = nanos_since(shared.origin, now);
        let last = shared.published.load(Ordering::Relaxed);
        let urgent = magnitude(shared.fast.queued())
            != magnitude(shared.published_queued.load(Ordering::Relaxed));
        if !urgent && last != NEVER && now_n.saturating_sub(last) < 1_000_000 {
            return;
        }
        // One publisher per moment; an urgent one publishes anyway.
        if shared
            .published
            .compare_exchange(last, now_n, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
            && !urgent
        {
            return;
        }
        // Two threads may publish at once, the later with older figures:
        // each looks again after writing and writes again if the queues'
        // length moved meanwhile, so the last figures written are recent.
        for _ in 0..4 {
            let queued = self.publish_once(now);
            if magnitude(shared.fast.queued()) == magnitude(queued) {
                break;
            }
        }
    }

    /// Writes the load signal's figures; the queues' length it used.
    fn publish_once(&self, now: Instant) -> usize {
        let shared = &self.shared;
        let curves = self.curves();
        let view = self.view(&curves, now);
        let fast = &shared.fast;
        let in_flight = fast.in_flight();
        let queued = fast.queued();
        shared.published_queued.store(queued, Ordering::Relaxed);
        let limit = fast.limit() as f64;
        let service = view.service();
        let utilisation = (in_flight + queued) as f64 / limit;
        let delay = queued as f64 * service / limit;
        let price = shadow_price(&view);
        shared.signal.publish(
            LoadSnapshot::new(
                utilisation,
                Duration::from_secs_f64(delay.clamp(0.0, 1e9)),
                price,
            )
            .with_latency(Duration::from_secs_f64(service.clamp(0.0, 1e9))),
        );
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!(gratify_core::telemetry::LIMIT.name).set(limit);
            metrics::gauge!(gratify_core::telemetry::LIMIT_IN_FLIGHT.name).set(in_flight as f64);
            metrics::gauge!(gratify_core::telemetry::LIMIT_QUEUED.name).set(queued as f64);
            metrics::gauge!(gratify_core::telemetry::LIMIT_SHADOW_PRICE.name).set(price);
            for (k, c) in shared.classes.iter().enumerate() {
                let name = c.name.to_string();
                metrics::gauge!(gratify_core::telemetry::LIMIT_QUEUED_CLASS.name, "class" => name.clone())
                    .set(c.len() as f64);
                // What delay costs per second right now: every request of the
                // class in flight or waiting, at its cost rate.
                let in_flight = fast.class_in_flight(k);
                metrics::gauge!(gratify_core::telemetry::LIMIT_IN_FLIGHT_CLASS.name, "class" => name.clone())
                    .set(in_flight as f64);
                metrics::counter!(gratify_core::telemetry::LIMIT_ADMITTED_TOTAL.name, "class" => name.clone())
                    .absolute(fast.admitted[k].load(Ordering::Relaxed));
                metrics::gauge!(gratify_core::telemetry::COST_RATE.name, "class" => name).set(
                    (in_flight as f64 + c.len() as f64) * urgency(&curves[k], view.latency(k)),
                );
            }
        }
        queued
    }
}

/// The order of magnitude of a queue length (its bit length): the load
/// signal is published at once when it changes.
fn magnitude(n: usize) -> u32 {
    usize::BITS - n.leading_zeros()
}

/// The marginal delay cost one more admitted request imposes on the others:
/// it holds a slot for about the mean latency, delaying every waiting request
/// by `latency / limit`, each at its cost rate.
fn shadow_price(view: &View<'_>) -> f64 {
    let fast = &view.shared.fast;
    if fast.queued() == 0 {
        return 0.0;
    }
    let per_slot = view.service() / fast.limit() as f64;
    let rates: f64 = (0..view.shared.classes.len())
        .map(|k| view.class(k).len() as f64 * urgency(&view.curves[k], view.latency(k)))
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

/// The time constant of the arrival rates that size the reserves, seconds.
const DEMAND_WINDOW_SECS: f64 = 1.0;

/// The time constant over which a class's reserve cushion fades while none
/// of its requests times out in the queue, seconds.
const CUSHION_FADE_SECS: f64 = 10.0;

/// The least expected need, in slots, for which a class keeps a slot.
const MIN_RESERVE: f64 = 0.05;

/// How many requests may be queued ahead of one of the class that a
/// sustained overload lands on (the least dense class with arrivals, when
/// all of their needs exceed the limit): enough to hand every freed slot
/// over at once.
const MARGINAL_QUEUE: usize = 16;

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

/// What to do with a request of class `k`; `room`: whether a slot is free
/// under the limit.
/// `upstream`: the request was admitted upstream by a trusted caller, and
/// would queue ahead of its class's first-hand requests — judged by that
/// place, not the back of the queue.
fn decide(
    config: &LimiterConfig,
    fast: &Fast,
    view: &View<'_>,
    k: usize,
    room: bool,
    upstream: bool,
) -> Decision {
    let c = view.class(k);
    let limit = fast.limit();
    let queued = fast.queued();
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
            if room && queued == 0 {
                return Decision::Admit;
            }
            if queued >= config.max_queue {
                return Decision::Refuse(Reason::QueueFull);
            }
            return Decision::Queue {
                max_wait: config.max_queue_time,
                displace: None,
            };
        }
        Admission::DelayCost => {}
    }

    let warm = view.shared.warm.load(Ordering::Relaxed);
    let protected = c.never_shed.is_some();
    let judge = warm && !protected;
    // Its mean service time, for costs; the quantile its deadline is judged
    // by (none without enough recent evidence: then only the wait counts).
    let s_k = view.expected_latency(k);
    let s_deadline = view.judged_latency(k).unwrap_or(0.0);
    let class = &view.curves[k];
    let late_at = |t: f64| class.deadline().is_some_and(|d| t > d.as_secs_f64());

    // Where would it stand in the queue?
    let mine = view.index(k, 0.0);
    let own_len = c.len();
    // Where it would stand among its own class.
    let mut ahead = if upstream {
        c.upstream_len.load(Ordering::Relaxed).min(own_len)
    } else {
        own_len
    };
    let mut behind_rate = 0.0;
    let class_refusal = class.refusal_cost();
    let mut cheaper_waiting = false;
    let mut lowest: Option<(usize, f64)> = None;
    for j in 0..view.shared.classes.len() {
        let other = view.class(j);
        let len = if j == k { own_len } else { other.len() };
        if len == 0 {
            continue;
        }
        let tail_index = view.index(j, view.age(j, false));
        if other.never_shed.is_none() && lowest.is_none_or(|(_, x)| tail_index < x) {
            lowest = Some((j, tail_index));
        }
        if j == k {
            continue;
        }
        let head_index = view.index(j, view.age(j, true));
        if head_index >= mine {
            ahead += len;
        } else {
            cheaper_waiting = true;
            // The delay it would add to those behind it counts only for
            // classes at least as costly to refuse: refusing it to spare a
            // less valuable class a wait would refuse the more valuable
            // request while admitting the less valuable one.
            if view.curves[j].refusal_cost() >= class_refusal {
                behind_rate += len as f64 * urgency(&view.curves[j], view.latency(j));
            }
        }
    }
    // Room for it, and nobody waiting who would go first (waiters of
    // cheaper classes may be held back by the slots kept for it).
    if room && ahead == 0 {
        if judge && late_at(s_deadline) {
            return Decision::Refuse(Reason::Deadline);
        }
        return Decision::Admit;
    }

    let per_slot = view.service() / limit as f64;
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
        && own_len >= cap
    {
        return Decision::Refuse(Reason::QueueFull);
    }
    let mut displace = None;
    if queued >= config.max_queue {
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
        max_wait = max_wait.min(class.worth_waiting(s_k, max_wait));
    }
    // Sustained overload lands on this class: a queue longer than a few
    // requests only adds delay to what is served of it (the rest is refused
    // in the end, whatever the order).
    // Only on fresh evidence (the flag is set from timed completions, which
    // stop when the service does), and never while a cheaper class waits.
    let fresh = || {
        let at = view.shared.demand_at.load(Ordering::Relaxed);
        at != NEVER
            && view
                .now
                .saturating_duration_since(at_nanos(view.shared.origin, at))
                <= Duration::from_secs(1)
    };
    if judge
        && fast.marginal[k].load(Ordering::Relaxed)
        && !cheaper_waiting
        && per_slot > 0.0
        && fresh()
    {
        if ahead >= MARGINAL_QUEUE {
            return Decision::Refuse(Reason::QueueFull);
        }
        max_wait = max_wait.min(MARGINAL_QUEUE as f64 * per_slot);
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
fn over_share(fast: &Fast, c: &ClassShared, k: usize, limit: usize) -> bool {
    fast.held[k].load(Ordering::SeqCst) >= share_cap(c, limit)
}

/// The slots class `k` is guaranteed under partitioned admission.
fn share_cap(c: &ClassShared, limit: usize) -> usize {
    let share = c.share.unwrap_or(0.0);
    (share * limit as f64).floor().max(1.0) as usize
}

/// A slot under partitioned admission: within the class's share whatever
/// the limit (the share is claimed with a compare-and-swap, so concurrent
/// requests cannot all pass one check), else only under the limit. Returns
/// the new in-flight count.
fn take_partitioned(fast: &Fast, c: &ClassShared, k: usize) -> Option<usize> {
    let cap = share_cap(c, fast.limit());
    let mut held = fast.held[k].load(Ordering::SeqCst);
    while held < cap {
        match fast.held[k].compare_exchange_weak(held, held + 1, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return Some(force_take(fast, k)),
            Err(now) => held = now,
        }
    }
    let in_flight = try_take(fast, k)?;
    fast.held[k].fetch_add(1, Ordering::SeqCst);
    Some(in_flight)
}

/// Takes a slot for class `k` if one is free under the limit; returns the
/// new in-flight count.
fn try_take(fast: &Fast, k: usize) -> Option<usize> {
    let limit = fast.limit_for(k);
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

    /// The class the slot was admitted for.
    pub fn class(&self) -> ClassId {
        self.class
    }

    /// Releases the slot with the request's outcome (its latency then
    /// teaches the limiter; a permit only dropped teaches it nothing).
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
    /// The deadline is a caller's: a slot granted after it goes back.
    hard: bool,
    /// Why it is refused when its deadline passes while it waits.
    late: Reason,
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
        let fast = &self.limiter.shared.fast;
        let in_flight = fast.in_flight();
        // Timed as requests admitted at once are (a probe always: it is
        // what the class's estimate waits for).
        let timed = self.probe || sampled(fast.sample_every.load(Ordering::Relaxed));
        let mut permit = Permit::new(
            self.limiter.clone(),
            self.class,
            timed.then(Instant::now),
            in_flight,
        );
        permit.probe = self.probe;
        TicketOutcome::Admitted(permit)
    }

    fn refused(&mut self, reason: Reason) -> TicketOutcome {
        self.done = true;
        TicketOutcome::Refused(self.limiter.refusal(reason))
    }

    /// `outcome`, unless it is a slot granted only once a caller's deadline
    /// had passed (the grant raced the timer): that slot goes straight back
    /// and the request is refused as a wait that ran out (`queue-timeout`,
    /// or `deadline` when the deadline was a propagated caller's).
    pub(crate) fn settle(&self, outcome: TicketOutcome) -> TicketOutcome {
        match outcome {
            TicketOutcome::Admitted(permit) if self.hard && Instant::now() >= self.deadline => {
                drop(permit);
                self.limiter.count_waited_out(self.class, self.late);
                TicketOutcome::Refused(self.limiter.refusal(self.late))
            }
            other => other,
        }
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
            self.limiter.count_waited_out(self.class, self.late);
            return self.refused(self.late);
        }
        match self.rx.try_recv() {
            Ok(Ok(())) => self.admitted(),
            Ok(Err(reason)) => self.refused(reason),
            Err(_) => self.refused(self.late),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::limit::Fixed;

    const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
refusal_cost = 2.0
[classes.batch]
delay_cost = { shape = "linear", per_second = 0.1, deadline = "30s" }
refusal_cost = 1.0
"#;

    fn setup(limit: usize) -> (Limiter, [ClassId; 3]) {
        let m = CostModel::from_toml(MODEL).unwrap();
        let ids = ["checkout", "browse", "batch"].map(|n| m.id(n).unwrap());
        let l = Limiter::with_algorithm(&m, Fixed::new(limit), LimiterConfig::default());
        (l, ids)
    }

    fn keep(l: &Limiter, class: ClassId, need: usize, denser: &[ClassId]) {
        let fast = &l.shared.fast;
        fast.reserve[class.index()].store(need, Ordering::Relaxed);
        let mask = denser.iter().fold(0u64, |m, c| m | 1 << c.index());
        fast.denser[class.index()].store(mask, Ordering::Relaxed);
    }

    /// Slots a denser class holds beyond its own need are not counted
    /// against another denser class's: browse holding five slots (needing
    /// one) leaves checkout's three kept from batch.
    #[test]
    fn a_denser_class_holding_more_than_its_need_frees_nothing_for_another() {
        let (l, [checkout, browse, batch]) = setup(10);
        keep(&l, checkout, 3, &[]);
        keep(&l, browse, 1, &[checkout]);
        keep(&l, batch, 0, &[checkout, browse]);
        let fast = &l.shared.fast;
        for _ in 0..5 {
            try_take(fast, browse.index()).unwrap();
        }
        for _ in 0..2 {
            try_take(fast, batch.index()).unwrap();
        }
        assert_eq!(fast.limit_for(browse.index()), 7);
        assert_eq!(fast.limit_for(batch.index()), 7);
        assert!(
            try_take(fast, batch.index()).is_none(),
            "batch took a slot kept for checkout"
        );
        assert_eq!(fast.in_flight(), 7);
        // Checkout itself sees the whole limit.
        assert_eq!(fast.limit_for(checkout.index()), 10);
    }

    /// A waiter whose slot is kept for another class does not stop the
    /// grant: the next waiter that may take the free slot gets it.
    #[tokio::test(start_paused = true)]
    async fn a_held_back_head_does_not_block_the_next_waiter() {
        let (l, [checkout, _, batch]) = setup(2);
        let a = l.admit(checkout).await.unwrap();
        let b = l.admit(checkout).await.unwrap();
        // Checkout must leave two slots for batch (a reversed order, as a
        // stale one after a reload or an aged cheap waiter can make it).
        keep(&l, batch, 2, &[]);
        keep(&l, checkout, 0, &[batch]);
        let waiting_checkout = tokio::spawn({
            let l = l.clone();
            async move { l.admit(checkout).await.map(drop) }
        });
        let waiting_batch = tokio::spawn({
            let l = l.clone();
            async move { l.admit(batch).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(l.stats().queued, 2);
        drop(a);
        let granted = waiting_batch.await.unwrap().unwrap();
        assert_eq!(granted.class(), batch);
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (2, 1));
        drop((b, granted));
        waiting_checkout.await.unwrap().unwrap();
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    /// Cheap waiters held back by the slots kept for checkout do not put a
    /// checkout that finds its slot free through the queue's judgement.
    #[tokio::test(start_paused = true)]
    async fn a_free_kept_slot_admits_at_once_past_cheaper_waiters() {
        let (l, [checkout, _, batch]) = setup(3);
        keep(&l, checkout, 2, &[]);
        keep(&l, batch, 0, &[checkout]);
        let running = l.admit(batch).await.unwrap();
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.admit(batch).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(l.stats().queued, 1, "batch waits: the other slots are kept");
        let c = l.shared.fast.admitted[checkout.index()].load(Ordering::Relaxed);
        match l.acquire(checkout) {
            Acquire::Admitted(p) => drop(p),
            Acquire::Queued(_) => panic!("queued behind cheaper work"),
            Acquire::Refused(r) => panic!("refused: {r:?}"),
        }
        assert_eq!(
            l.shared.fast.admitted[checkout.index()].load(Ordering::Relaxed),
            c + 1
        );
        drop(running);
        waiting.await.unwrap().unwrap();
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    /// The short queue of a sustained overload holds only while the flag
    /// is fresh: it is set from timed completions, which stop when the
    /// service does, and a burst after a quiet spell must queue as usual.
    #[tokio::test(start_paused = true)]
    async fn a_stale_overload_flag_keeps_no_queue_short() {
        let m = CostModel::from_toml(MODEL).unwrap();
        let batch = m.id("batch").unwrap();
        let config = LimiterConfig {
            warmup_samples: 0,
            ..LimiterConfig::default()
        };
        let l = Limiter::with_algorithm(&m, Fixed::new(1), config);
        for _ in 0..3 {
            let p = l.admit(batch).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            p.complete(Outcome::Success);
        }
        let held = l.admit(batch).await.unwrap();
        let shared = &l.shared;
        shared.fast.marginal[batch.index()].store(true, Ordering::Relaxed);
        let now = Instant::now();
        shared
            .demand_at
            .store(nanos_since(shared.origin, now), Ordering::Relaxed);
        let mut tickets = Vec::new();
        for _ in 0..MARGINAL_QUEUE {
            match l.acquire(batch) {
                Acquire::Queued(t) => tickets.push(t),
                _ => panic!("the first {MARGINAL_QUEUE} wait"),
            }
        }
        match l.acquire(batch) {
            Acquire::Refused(r) => assert_eq!(r.reason(), Reason::QueueFull),
            _ => panic!("the queue of a sustained overload is kept short"),
        }
        // Two quiet seconds later, nothing has refreshed the flag.
        tokio::time::advance(Duration::from_secs(2)).await;
        match l.acquire(batch) {
            Acquire::Queued(t) => tickets.push(t),
            _ => panic!("a stale flag refused a request that can wait"),
        }
        drop(tickets);
        drop(held);
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    /// The delay a request would add to the requests queued behind it is
    /// not a reason to refuse it when they are less valuable: refusing vip
    /// to spare a hundred bulk requests a second's wait would refuse the
    /// more valuable request while admitting the less valuable ones.
    #[tokio::test(start_paused = true)]
    async fn a_valuable_request_is_not_refused_to_spare_cheaper_waiters_a_wait() {
        let m = CostModel::from_toml(
            r#"
default_class = "bulk"
[classes.vip]
delay_cost = { shape = "linear", per_second = 1.0 }
refusal_cost = 10.0
[classes.bulk]
delay_cost = { shape = "linear", per_second = 0.5 }
refusal_cost = 8.0
"#,
        )
        .unwrap();
        let (vip, bulk) = (m.id("vip").unwrap(), m.id("bulk").unwrap());
        let config = LimiterConfig {
            warmup_samples: 0,
            // Bulk waits whatever its wait costs (the cost rules never shed it).
            never_shed: vec![(bulk, 200)],
            ..LimiterConfig::default()
        };
        let l = Limiter::with_algorithm(&m, Fixed::new(1), config);
        // Both classes take a second of service.
        for class in [vip, bulk, vip, bulk, vip, bulk] {
            let p = l.admit(class).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            p.complete(Outcome::Success);
        }
        let held = l.admit(bulk).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..100 {
            match l.acquire(bulk) {
                Acquire::Queued(t) => waiting.push(t),
                _ => panic!("bulk waits"),
            }
        }
        // Vip goes first: each waits a few seconds, costs a few units
        // against a refusal of 10, and delays the hundred bulk waiters by a
        // second each (50 at their rate) — every one of whom is still
        // served. (More than one: a refusal may be turned into a probe.)
        for _ in 0..3 {
            match l.acquire(vip) {
                Acquire::Queued(t) => waiting.push(t),
                Acquire::Admitted(_) => panic!("no slot is free"),
                Acquire::Refused(r) => {
                    panic!("vip refused ({r:?}) while cheaper bulk waits to be served")
                }
            }
        }
        assert_eq!(l.stats().classes[vip.index()].shed_total(), 0);
        drop(waiting);
        drop(held);
        let s = l.stats();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    /// A reload that makes a cheap class the valuable one reorders the
    /// classes at once, not at the next timed completion.
    #[test]
    fn a_reload_reorders_the_classes_at_once() {
        let (l, [checkout, _, batch]) = setup(4);
        let bit = |c: ClassId| 1u64 << c.index();
        l.reload(&l.model()).unwrap();
        let fast = &l.shared.fast;
        assert_ne!(
            fast.denser[batch.index()].load(Ordering::Relaxed) & bit(checkout),
            0
        );
        let swapped = MODEL
            .replace(
                "per_second = 20.0, deadline = \"300ms\"",
                "per_second = 0.01, deadline = \"60s\"",
            )
            .replace(
                "per_second = 0.1, deadline = \"30s\"",
                "per_second = 50.0, deadline = \"100ms\"",
            );
        l.reload(&CostModel::from_toml(&swapped).unwrap()).unwrap();
        assert_ne!(
            fast.denser[checkout.index()].load(Ordering::Relaxed) & bit(batch),
            0
        );
        assert_eq!(fast.denser[batch.index()].load(Ordering::Relaxed), 0);
    }
}
