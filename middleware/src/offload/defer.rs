//! Deferred work: jobs that run after the response, when resources are cheap.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use gratify_core::{BoxError, ClassId, CostModel, LoadSignal};
use http::Request;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

type JobFn = Arc<dyn Fn() -> gratify_core::BoxFuture<Result<(), BoxError>> + Send + Sync>;

struct Job {
    name: String,
    class: ClassId,
    created: Instant,
    /// Order of arrival, to break ties first-come first-served.
    seq: u64,
    deadline: Option<Instant>,
    attempts: u32,
    not_before: Instant,
    run: JobFn,
}

/// Settings of a [`Defer`] queue.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeferConfig {
    /// The most jobs waiting.
    pub max_queue: usize,
    /// Jobs running at once.
    pub concurrency: usize,
    /// Attempts before a job is a dead letter.
    pub max_attempts: u32,
    /// The ceiling of the first retry's delay; it doubles with each
    /// attempt, and each retry waits between half of it and all of it,
    /// uniformly ("equal jitter": spread out, with a floor).
    pub backoff: Duration,
    /// How often the runner looks again while jobs wait for cheaper CPU.
    pub poll: Duration,
    /// A job with a deadline runs whatever the load once this much time (or
    /// a tenth of its deadline, if larger) is left.
    pub urgent_within: Duration,
    /// How many dead letters' names are kept for reports (the most recent;
    /// all are counted).
    pub dead_letters_kept: usize,
}

impl Default for DeferConfig {
    fn default() -> Self {
        Self {
            max_queue: 10_000,
            concurrency: 2,
            max_attempts: 5,
            backoff: Duration::from_millis(100),
            poll: Duration::from_millis(50),
            urgent_within: Duration::from_secs(1),
            dead_letters_kept: 1000,
        }
    }
}

impl DeferConfig {
    /// Sets the `max_queue` field (at least 1).
    #[must_use]
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = n.max(1);
        self
    }

    /// Sets the `concurrency` field (at least 1).
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Sets the `max_attempts` field (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the `backoff` field.
    #[must_use]
    pub fn backoff(mut self, d: Duration) -> Self {
        self.backoff = d;
        self
    }

    /// Sets the `poll` field (at least 1 ms).
    #[must_use]
    pub fn poll(mut self, d: Duration) -> Self {
        self.poll = d.max(Duration::from_millis(1));
        self
    }

    /// Sets the `urgent_within` field.
    #[must_use]
    pub fn urgent_within(mut self, d: Duration) -> Self {
        self.urgent_within = d;
        self
    }

    /// Sets the `dead_letters_kept` field.
    #[must_use]
    pub fn dead_letters_kept(mut self, n: usize) -> Self {
        self.dead_letters_kept = n;
        self
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeferError {
    /// The queue is full.
    #[error("deferred-work queue full")]
    QueueFull,
    /// The queue is draining or closed.
    #[error("deferred-work queue closed")]
    Closed,
}

/// What [`Defer::drain`] did: every job is accounted for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Jobs that ran to success during the drain.
    pub ran: usize,
    /// Jobs that exhausted their attempts (dead letters), by name: the most
    /// recent [`dead_letters_kept`](DeferConfig::dead_letters_kept), oldest
    /// first.
    pub dead: Vec<String>,
    /// Dead letters over the queue's lifetime, named above or not.
    pub dead_total: u64,
    /// Jobs still queued at the deadline, by name: never started, and
    /// now dropped.
    pub not_run: Vec<String>,
    /// Jobs still running at the deadline, by name: they go on in the
    /// background and may yet finish (or fail) — their outcome is unknown
    /// to this report.
    pub still_running: Vec<String>,
}

/// Counters of a [`Defer`] queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeferStats {
    /// Waiting.
    pub queued: usize,
    /// Running.
    pub running: usize,
    /// Finished successfully.
    pub done: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Dead letters.
    pub dead: u64,
}

struct State {
    /// Jobs ready to run, per class, oldest first: within a class the oldest
    /// job is the most urgent and the nearest its deadline, so picking looks
    /// at one job per class, not at every job.
    ready: Vec<BTreeMap<(Instant, u64), Job>>,
    /// Jobs waiting out a retry's backoff, by when they may run again.
    backoff: BTreeMap<(Instant, u64), Job>,
    /// Running, by sequence number.
    running: HashMap<u64, String>,
    open: bool,
    draining: bool,
    /// The most recent dead letters' names.
    dead: VecDeque<String>,
    dead_total: u64,
    next_seq: u64,
    /// What this queue last added to the facade's pending gauge.
    #[cfg(feature = "metrics")]
    published: f64,
}

impl State {
    fn queued(&self) -> usize {
        self.ready.iter().map(BTreeMap::len).sum::<usize>() + self.backoff.len()
    }

    /// Brings the facade's `gratify_defer_pending` up to date with this
    /// queue's jobs waiting or running: by the change since its last
    /// report, so the gauge is the sum over every queue of the process.
    fn publish_pending(&mut self) {
        #[cfg(feature = "metrics")]
        {
            let now = (self.queued() + self.running.len()) as f64;
            metrics::gauge!(gratify_core::telemetry::DEFER_PENDING.name)
                .increment(now - self.published);
            self.published = now;
        }
    }

    fn push_ready(&mut self, job: Job) {
        let k = job.class.index().min(self.ready.len().saturating_sub(1));
        if let Some(q) = self.ready.get_mut(k) {
            q.insert((job.created, job.seq), job);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    model: CostModel,
    signal: Option<LoadSignal>,
    config: DeferConfig,
    done: AtomicU64,
    retries: AtomicU64,
}

/// A handle to queue work that runs after the response, when the CPU is
/// cheap: a job of class `k` runs while the price of a second of a slot on
/// the [`LoadSignal`] is below `k`'s cost rate, or when its deadline is
/// close — under load jobs wait, idle they run. Bounded, retried with
/// backoff, and drained on shutdown with every job accounted for. Cloning
/// shares the queue. Put it in app state, or in request extensions with
/// [`DeferLayer`].
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::time::Duration;
/// use gratify::offload::{Defer, DeferConfig};
/// use gratify::CostModel;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let model = CostModel::from_toml(r#"
///     [classes.email]
///     delay_cost = { shape = "linear", per_second = 0.01, deadline = "10m" }
///     refusal_cost = 1.0
/// "#)?;
/// let defer = Defer::start(&model, None, DeferConfig::default());
/// let sent = Arc::new(AtomicUsize::new(0));
/// let counter = Arc::clone(&sent);
/// defer.spawn("confirmation e-mail #1", model.default_class(), move || {
///     let counter = Arc::clone(&counter);
///     async move {
///         counter.fetch_add(1, Ordering::SeqCst);
///         Ok(())
///     }
/// })?;
/// let report = defer.drain(Duration::from_secs(5)).await;
/// assert_eq!((report.ran, sent.load(Ordering::SeqCst)), (1, 1));
/// assert!(report.not_run.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Defer {
    shared: Arc<Shared>,
}

impl fmt::Debug for Defer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Defer")
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Defer {
    /// A queue for `model`'s classes, reading the load from `signal` (none:
    /// always cheap), with its runner started on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn start(model: &CostModel, signal: Option<LoadSignal>, config: DeferConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ready: (0..model.len().max(1)).map(|_| BTreeMap::new()).collect(),
                backoff: BTreeMap::new(),
                running: HashMap::new(),
                open: true,
                draining: false,
                dead: VecDeque::new(),
                dead_total: 0,
                next_seq: 0,
                #[cfg(feature = "metrics")]
                published: 0.0,
            }),
            wake: Notify::new(),
            model: model.clone(),
            signal,
            config,
            done: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        });
        tokio::spawn(runner(Arc::clone(&shared)));
        Self { shared }
    }

    /// Queues a job of `class`, named for reports (an order number, say).
    /// `job` makes the future to run; it is called again for a retry.
    ///
    /// # Errors
    ///
    /// [`DeferError::QueueFull`] or [`DeferError::Closed`].
    pub fn spawn<F, Fut>(
        &self,
        name: impl Into<String>,
        class: ClassId,
        job: F,
    ) -> Result<(), DeferError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let now = Instant::now();
        // A class the model does not know is its default class, for its
        // deadline, its urgency and its place alike.
        let class = if self.shared.model.get(class).is_some() {
            class
        } else {
            self.shared.model.default_class()
        };
        let deadline = self
            .shared
            .model
            .get(class)
            .and_then(gratify_core::Class::deadline)
            .and_then(|d| now.checked_add(d));
        let run: JobFn = Arc::new(move || Box::pin(job()));
        {
            let mut s = lock(&self.shared.state);
            if !s.open {
                return Err(DeferError::Closed);
            }
            if s.queued() >= self.shared.config.max_queue {
                return Err(DeferError::QueueFull);
            }
            let seq = s.next_seq;
            s.next_seq += 1;
            s.push_ready(Job {
                name: name.into(),
                class,
                created: now,
                seq,
                deadline,
                attempts: 0,
                not_before: now,
                run,
            });
            s.publish_pending();
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The queue's counters.
    pub fn stats(&self) -> DeferStats {
        let s = lock(&self.shared.state);
        DeferStats {
            queued: s.queued(),
            running: s.running.len(),
            done: self.shared.done.load(Ordering::Relaxed),
            retries: self.shared.retries.load(Ordering::Relaxed),
            dead: s.dead_total,
        }
    }

    /// Stops taking jobs, runs everything queued whatever the load until
    /// `deadline`, and reports what ran, what died and what did not run.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        let done_before = self.shared.done.load(Ordering::Relaxed);
        {
            let mut s = lock(&self.shared.state);
            s.open = false;
            s.draining = true;
        }
        self.shared.wake.notify_one();
        let until = Instant::now() + deadline;
        loop {
            {
                let s = lock(&self.shared.state);
                if s.queued() == 0 && s.running.is_empty() {
                    break;
                }
            }
            if Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5).min(deadline)).await;
        }
        let mut s = lock(&self.shared.state);
        let mut left: Vec<Job> = s
            .ready
            .iter_mut()
            .flat_map(std::mem::take)
            .map(|(_, j)| j)
            .collect();
        left.extend(std::mem::take(&mut s.backoff).into_values());
        left.sort_by_key(|j| j.seq);
        let not_run: Vec<String> = left.into_iter().map(|j| j.name).collect();
        let mut running: Vec<(u64, String)> =
            s.running.iter().map(|(k, v)| (*k, v.clone())).collect();
        running.sort_unstable();
        let still_running: Vec<String> = running.into_iter().map(|(_, n)| n).collect();
        // Counts, and a bounded list of names: a full queue must not write
        // ten thousand names into one log line.
        let some = |names: &[String]| {
            let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
            let more = names.len().saturating_sub(shown.len());
            if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        if !not_run.is_empty() {
            tracing::warn!(
                count = not_run.len(),
                jobs = %some(&not_run),
                "deferred jobs not run before the drain deadline"
            );
        }
        if !still_running.is_empty() {
            tracing::warn!(
                count = still_running.len(),
                jobs = %some(&still_running),
                "deferred jobs still running at the drain deadline"
            );
        }
        DrainReport {
            ran: (self.shared.done.load(Ordering::Relaxed) - done_before) as usize,
            dead: s.dead.iter().cloned().collect(),
            dead_total: s.dead_total,
            not_run,
            still_running,
        }
    }
}

impl Shared {
    /// Whether `job` may run now: the CPU is cheaper than its delay, its
    /// deadline is close, or the queue is draining.
    fn due(&self, job: &Job, now: Instant, draining: bool) -> bool {
        if now < job.not_before {
            return false;
        }
        if draining {
            return true;
        }
        if let Some(deadline) = job.deadline {
            let window = deadline.saturating_duration_since(job.created) / 10;
            if deadline.saturating_duration_since(now) <= window.max(self.config.urgent_within) {
                return true;
            }
        }
        let price = self
            .signal
            .as_ref()
            .map_or(0.0, |s| s.snapshot().slot_second_price());
        let age = now.saturating_duration_since(job.created).as_secs_f64();
        let urgency = self.model.get(job.class).map_or(0.0, |c| c.urgency(age));
        price <= urgency
    }
}

async fn runner(shared: Arc<Shared>) {
    let running = Arc::new(tokio::sync::Semaphore::new(
        shared.config.concurrency.max(1),
    ));
    loop {
        // A slot first, so a picked job is always either queued or running.
        let Ok(permit) = Arc::clone(&running).acquire_owned().await else {
            return;
        };
        let now = Instant::now();
        let next = {
            let mut s = lock(&shared.state);
            // Every handle gone and nothing left: the runner ends.
            if Arc::strong_count(&shared) == 1 && s.queued() == 0 && s.running.is_empty() {
                return;
            }
            // Retries whose backoff is over are ready again.
            while let Some(entry) = s.backoff.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let job = entry.remove();
                s.push_ready(job);
            }
            let draining = s.draining;
            // The most urgent due job first: each class's oldest.
            let urgency = |j: &Job| {
                shared.model.get(j.class).map_or(0.0, |c| {
                    c.urgency(now.saturating_duration_since(j.created).as_secs_f64())
                })
            };
            let pick = s
                .ready
                .iter()
                .enumerate()
                .filter_map(|(k, q)| {
                    let (_, head) = q.first_key_value()?;
                    shared
                        .due(head, now, draining)
                        .then(|| (k, urgency(head), head.seq))
                })
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.2.cmp(&a.2)))
                .map(|(k, ..)| k);
            let job = pick.and_then(|k| s.ready[k].pop_first()).map(|(_, j)| j);
            if let Some(job) = &job {
                s.running.insert(job.seq, job.name.clone());
            }
            s.publish_pending();
            job
        };
        let Some(mut job) = next else {
            drop(permit);
            // Nothing due: wait for a new job or look again shortly.
            let _ = tokio::time::timeout(shared.config.poll, shared.wake.notified()).await;
            continue;
        };
        let shared2 = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            job.attempts += 1;
            // Its own task — the factory called inside it too — so a job
            // that panics, making its future or running it, is a failed
            // attempt and its slot and running entry are still released.
            let run = Arc::clone(&job.run);
            let outcome = match tokio::spawn(async move { run().await }).await {
                Ok(outcome) => outcome,
                Err(e) => Err(format!("deferred job panicked: {e}").into()),
            };
            let mut s = lock(&shared2.state);
            s.running.remove(&job.seq);
            match outcome {
                Ok(()) => {
                    shared2.done.fetch_add(1, Ordering::Relaxed);
                    super::count(gratify_core::telemetry::DEFER_DONE_TOTAL.name);
                }
                Err(e) if job.attempts < shared2.config.max_attempts => {
                    shared2.retries.fetch_add(1, Ordering::Relaxed);
                    super::count(gratify_core::telemetry::DEFER_RETRIES_TOTAL.name);
                    tracing::debug!(job = %job.name, attempt = job.attempts, error = %e, "deferred job failed; will retry");
                    job.not_before = Instant::now()
                        + super::retry_delay(shared2.config.backoff, job.attempts)
                            .mul_f64(0.5 + 0.5 * super::jitter());
                    s.backoff.insert((job.not_before, job.seq), job);
                }
                Err(e) => {
                    tracing::warn!(job = %job.name, attempts = job.attempts, error = %e, "deferred job is a dead letter");
                    s.dead_total += 1;
                    s.dead.push_back(job.name);
                    while s.dead.len() > shared2.config.dead_letters_kept {
                        s.dead.pop_front();
                    }
                    super::count(gratify_core::telemetry::DEFER_DEAD_TOTAL.name);
                }
            }
            s.publish_pending();
            drop(s);
            shared2.wake.notify_one();
        });
    }
}

/// Puts a [`Defer`] handle into every request's extensions.
#[derive(Debug, Clone)]
pub struct DeferLayer {
    defer: Defer,
}

impl DeferLayer {
    /// A layer handing out `defer`.
    pub fn new(defer: Defer) -> Self {
        Self { defer }
    }
}

impl<S> Layer<S> for DeferLayer {
    type Service = DeferService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeferService {
            inner,
            defer: self.defer.clone(),
        }
    }
}

/// The service of [`DeferLayer`]. (Named for its layer, as `Offload` is:
/// the name `Defer` is the queue's, the handle handlers defer work with.)
#[derive(Debug, Clone)]
pub struct DeferService<S> {
    inner: S,
    defer: Defer,
}

impl<S> DeferService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for DeferService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        request.extensions_mut().insert(self.defer.clone());
        self.inner.call(request)
    }
}
