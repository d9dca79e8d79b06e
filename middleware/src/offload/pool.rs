//! The bounded, cost-ordered CPU pool.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Why a job did not run to completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// The queue was full.
    #[error("offload queue full")]
    QueueFull,
    /// The predicted wait would pass the job's deadline.
    #[error("offload wait would pass the deadline")]
    Deadline,
    /// The pool is shutting down (or shut down before the job ran).
    #[error("offload pool shut down")]
    Shutdown,
    /// The job panicked; the worker thread survived.
    #[error("offloaded job panicked")]
    Panicked,
}

/// Sends a finished job's result to its caller.
type Deliver = Box<dyn FnOnce() + Send>;

/// A job's place in the queue: higher first. `rank` is the log2 of its
/// priority less its enqueue time in doublings (see [`CpuPool::aging`]), so
/// that comparing ranks compares priorities as they have grown by now —
/// a fixed key, and the queue an ordered map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    rank: Rank,
    /// The older first among equals.
    seq: std::cmp::Reverse<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Rank(f64);

impl PartialEq for Rank {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}
impl Eq for Rank {}
impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Rank {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

struct Job {
    enqueued: Instant,
    /// The last moment it can start and still finish by its deadline (its
    /// deadline less its expected run time): past this it is not started.
    deadline: Option<Instant>,
    /// Runs the job; returns whether it panicked and how to deliver the
    /// result (after the pool's books are updated).
    work: Box<dyn FnOnce() -> (bool, Deliver) + Send>,
    /// Answers its caller with an error instead (displaced, expired).
    refuse: Box<dyn FnOnce(OffloadError) + Send>,
    cancelled: Box<dyn Fn() -> bool + Send>,
}

struct Queue {
    jobs: BTreeMap<Key, Job>,
    open: bool,
    /// What this pool last added to the facade's queued gauge.
    #[cfg(feature = "metrics")]
    published: f64,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    threads: usize,
    max_queue: usize,
    seq: AtomicU64,
    running: AtomicUsize,
    /// EWMA of job run time, nanoseconds.
    mean_run: AtomicU64,
    /// Seconds over which a waiting job's priority doubles (f64 bits).
    aging: AtomicU64,
    /// Where enqueue times are counted from.
    origin: Instant,
    stats: Stats,
}

impl Shared {
    fn key(&self, priority: f64, at: Instant, seq: u64) -> Key {
        // Priorities beyond 2^±64 of each other age as if they were that far
        // apart (so a job of priority 0 is not left for a thousand aging
        // periods, nor one of infinite priority ahead of everything for
        // ever).
        let log = if priority.is_nan() || priority <= 0.0 {
            -64.0
        } else {
            priority.log2().clamp(-64.0, 64.0)
        };
        let aging = f64::from_bits(self.aging.load(Ordering::Relaxed));
        let since = at.saturating_duration_since(self.origin).as_secs_f64();
        Key {
            rank: Rank(log - since / aging),
            seq: std::cmp::Reverse(seq),
        }
    }

    /// The wait of a job with `key`: the jobs ahead of it and those running,
    /// spread over the threads. Counts at most `cap` jobs ahead (enough to
    /// know a deadline is out of reach).
    fn wait_for(&self, q: &Queue, key: Key, cap: usize) -> Duration {
        let ahead = q.jobs.range(key..).take(cap).count();
        let busy = self.running.load(Ordering::Relaxed);
        let waiting = (ahead + busy + 1).saturating_sub(self.threads);
        Duration::from_nanos(self.mean_run.load(Ordering::Relaxed))
            * u32::try_from(waiting.div_ceil(self.threads)).unwrap_or(u32::MAX)
    }
}

#[derive(Default)]
struct Stats {
    done: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    panicked: AtomicU64,
    displaced: AtomicU64,
    expired: AtomicU64,
}

/// A snapshot of a pool's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs running.
    pub running: usize,
    /// Jobs completed (panics included).
    pub done: u64,
    /// Jobs refused (queue full, deadline, shutdown, displaced, expired).
    pub refused: u64,
    /// Jobs taken out unrun because their caller left.
    pub dropped: u64,
    /// Jobs that panicked.
    pub panicked: u64,
    /// Queued jobs that made room in a full queue for a more valuable one
    /// (counted in `refused` too).
    pub displaced: u64,
    /// Queued jobs whose deadline passed before they could start (counted
    /// in `refused` too).
    pub expired: u64,
}

/// A fixed set of threads, separate from the async runtime's, running CPU
/// work by priority: the cost rate of the job's class over its expected run
/// time (the cμ rule, Reinertsen's CD3). Cloning shares the pool.
///
/// - **No starvation.** A waiting job's priority doubles every
///   [`aging`](Self::aging) (1 s by default), so a job of priority `p` is
///   ahead of every newly arriving job of priority up to `P` once it has
///   waited `aging × log2(P / p)`: with a cost rate 200 times lower than the
///   most urgent class's, about 7.6 s. Ordering is kept in an ordered map on
///   a fixed key (log priority less age in doublings): O(log n) to queue,
///   start or remove a job.
/// - **Deadlines.** A job with a deadline is refused at once if its
///   predicted wait and run time would pass it; if it is still queued when
///   the deadline comes, it is taken out and its caller answered
///   [`OffloadError::Deadline`] at that moment — it never starts late.
/// - **Abandoned jobs leave at once.** Dropping the future of [`run`](Self::run)
///   takes the job out of the queue then, not when a thread reaches it.
/// - **A full queue displaces its least valuable job** (by priority as it
///   stands now) for a more valuable arrival, never the reverse.
///
/// When the last handle is dropped, the pool takes no more work and its
/// threads end once the queue is empty.
#[derive(Clone)]
pub struct CpuPool {
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Closes the queue when the last handle goes (the threads hold the
    /// shared state themselves, so its own drop would never come).
    _close: Arc<CloseOnDrop>,
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        lock(&self.0.queue).open = false;
        self.0.ready.notify_all();
    }
}

impl fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuPool")
            .field("threads", &self.shared.threads)
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A queued job's ticket: takes the job out if its caller leaves first.
struct Place {
    shared: Arc<Shared>,
    key: Option<Key>,
}

impl Place {
    /// Takes the job out if it has not started; `true` if it had not.
    fn withdraw(&mut self) -> bool {
        let Some(key) = self.key.take() else {
            return false;
        };
        // The job (the caller's closure) is dropped after the lock is
        // released: its drop is the caller's code.
        let removed = lock(&self.shared.queue).jobs.remove(&key);
        let was_queued = removed.is_some();
        drop(removed);
        if was_queued {
            gauge_queued(&self.shared);
        }
        was_queued
    }
}

impl Place {
    /// The job was answered: nothing to take out.
    fn answered(&mut self) {
        self.key = None;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.withdraw() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::OFFLOAD_DROPPED_TOTAL.name);
        }
    }
}

/// Brings the facade's `gratify_offload_queued` up to date with this
/// pool's queue: by the change since its last report, under the queue's
/// lock, so the gauge is the sum over every pool of the process.
fn gauge_queued(shared: &Shared) {
    #[cfg(feature = "metrics")]
    {
        let mut q = lock(&shared.queue);
        let now = q.jobs.len() as f64;
        metrics::gauge!(gratify_core::telemetry::OFFLOAD_QUEUED.name).increment(now - q.published);
        q.published = now;
    }
    #[cfg(not(feature = "metrics"))]
    let _ = shared;
}

impl CpuPool {
    /// A pool of `threads` threads (at least one) with room for `max_queue`
    /// waiting jobs. When `threads` is `None`, one per available core.
    pub fn new(threads: Option<usize>, max_queue: usize) -> Self {
        let threads = threads
            .unwrap_or_else(|| thread::available_parallelism().map_or(2, usize::from))
            .max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: BTreeMap::new(),
                #[cfg(feature = "metrics")]
                published: 0.0,
                open: true,
            }),
            ready: Condvar::new(),
            threads,
            max_queue: max_queue.max(1),
            seq: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            mean_run: AtomicU64::new(0),
            aging: AtomicU64::new(1.0f64.to_bits()),
            origin: Instant::now(),
            stats: Stats::default(),
        });
        let workers = (0..threads)
            .map(|i| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("gratify-cpu-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning a pool thread")
            })
            .collect();
        Self {
            _close: Arc::new(CloseOnDrop(Arc::clone(&shared))),
            shared,
            workers: Arc::new(Mutex::new(workers)),
        }
    }

    /// How long a waiting job takes to double its priority (default 1 s; at
    /// least a millisecond). Shorter ages faster: fairer to cheap work, less
    /// strict about cost. Applies to jobs queued from now on.
    #[must_use]
    pub fn aging(self, doubling: Duration) -> Self {
        let secs = doubling.as_secs_f64().max(1e-3);
        self.shared.aging.store(secs.to_bits(), Ordering::Relaxed);
        self
    }

    /// The pool's figures.
    pub fn stats(&self) -> PoolStats {
        let s = &self.shared.stats;
        PoolStats {
            queued: lock(&self.shared.queue).jobs.len(),
            running: self.shared.running.load(Ordering::Relaxed),
            done: s.done.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            panicked: s.panicked.load(Ordering::Relaxed),
            displaced: s.displaced.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
        }
    }

    /// The mean run time of a job.
    pub fn mean_run(&self) -> Duration {
        Duration::from_nanos(self.shared.mean_run.load(Ordering::Relaxed))
    }

    /// How long a job of `priority` queued now would wait: the work queued
    /// ahead of it and running, spread over the threads.
    pub fn predicted_wait(&self, priority: f64) -> Duration {
        let key = self.shared.key(priority, Instant::now(), u64::MAX);
        let q = lock(&self.shared.queue);
        self.shared.wait_for(&q, key, usize::MAX)
    }

    /// Runs `work` on the pool with `priority` (higher first), unless the
    /// queue is full of more valuable work, the predicted wait and run time
    /// pass `deadline` (from now), or the pool is shutting down. If the
    /// returned future is dropped before the job starts, the job is taken out
    /// unrun. A panic in `work` is [`OffloadError::Panicked`]; the thread
    /// lives on.
    pub fn run<T, F>(
        &self,
        priority: f64,
        deadline: Option<Duration>,
        work: F,
    ) -> impl Future<Output = Result<T, OffloadError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let now = Instant::now();
        self.run_until(
            priority,
            deadline.and_then(|d| now.checked_add(d)),
            Duration::ZERO,
            work,
        )
    }

    /// As [`run`](Self::run), with the deadline as an instant (what is left
    /// of a request's budget after the queues before this one) and the
    /// job's own expected run time, which must fit before it too: the job is
    /// refused at once if its predicted wait and run time pass the deadline,
    /// and answered [`OffloadError::Deadline`] when it has not started by
    /// the deadline less its run time. ([`run`](Self::run) counts the wait
    /// alone.) Needs a tokio runtime with timers when there is a deadline.
    pub fn run_until<T, F>(
        &self,
        priority: f64,
        deadline: Option<Instant>,
        expected: Duration,
        work: F,
    ) -> impl Future<Output = Result<T, OffloadError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, OffloadError>>();
        let submitted = self
            .submit(priority, deadline, expected, tx, work)
            .map_err(|(e, _)| e);
        let latest_start = deadline.map(|d| d.checked_sub(expected).unwrap_or(d));
        async move {
            let mut place = submitted?;
            let mut rx = rx;
            let result = match latest_start {
                Some(d) => {
                    match tokio::time::timeout_at(tokio::time::Instant::from_std(d), &mut rx).await
                    {
                        Ok(result) => result,
                        // Not started when it could still have finished: out,
                        // and answered now.
                        Err(_) if place.withdraw() => {
                            place.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                            place.shared.stats.expired.fetch_add(1, Ordering::Relaxed);
                            super::count(gratify_core::telemetry::OFFLOAD_REFUSED_TOTAL.name);
                            return Err(OffloadError::Deadline);
                        }
                        // Running already: it finishes.
                        Err(_) => rx.await,
                    }
                }
                None => rx.await,
            };
            place.answered();
            result.unwrap_or(Err(OffloadError::Shutdown))
        }
    }

    /// As [`run`](Self::run) without a deadline, but a refused `work` is
    /// handed back, so the caller can run it itself.
    pub(crate) fn try_run<T, F>(
        &self,
        priority: f64,
        work: F,
    ) -> Result<impl Future<Output = Result<T, OffloadError>> + Send + 'static, F>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, OffloadError>>();
        let mut place = self
            .submit(priority, None, Duration::ZERO, tx, work)
            .map_err(|(_, work)| work)?;
        Ok(async move {
            let result = rx.await;
            place.answered();
            result.unwrap_or(Err(OffloadError::Shutdown))
        })
    }

    /// Queues `work`, or refuses it and hands it back.
    fn submit<T, F>(
        &self,
        priority: f64,
        deadline: Option<Instant>,
        expected: Duration,
        tx: oneshot::Sender<Result<T, OffloadError>>,
        work: F,
    ) -> Result<Place, (OffloadError, F)>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let shared = &self.shared;
        let refuse = |e, work| {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::OFFLOAD_REFUSED_TOTAL.name);
            Err((e, work))
        };
        let now = Instant::now();
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        let key = shared.key(priority, now, seq);
        let mut q = lock(&shared.queue);
        if !q.open {
            drop(q);
            return refuse(OffloadError::Shutdown, work);
        }
        if let Some(d) = deadline {
            let budget = d.saturating_duration_since(now);
            // Jobs ahead beyond this many are past the budget anyway.
            let per = (self.mean_run() / u32::try_from(shared.threads).unwrap_or(u32::MAX))
                .max(Duration::from_nanos(1));
            let cap = usize::try_from(budget.as_nanos() / per.as_nanos())
                .unwrap_or(usize::MAX)
                .saturating_add(shared.threads + 1);
            if budget.is_zero() || shared.wait_for(&q, key, cap).saturating_add(expected) > budget {
                drop(q);
                return refuse(OffloadError::Deadline, work);
            }
        }
        let mut displaced = None;
        if q.jobs.len() >= shared.max_queue {
            match q.jobs.first_key_value() {
                Some((least, _)) if *least < key => displaced = q.jobs.pop_first(),
                _ => {
                    drop(q);
                    return refuse(OffloadError::QueueFull, work);
                }
            }
        }
        let tx = Arc::new(Mutex::new(Some(tx)));
        let (closed, refused) = (Arc::clone(&tx), Arc::clone(&tx));
        q.jobs.insert(
            key,
            Job {
                enqueued: now,
                deadline: deadline.map(|d| d.checked_sub(expected).unwrap_or(d)),
                work: Box::new(move || {
                    let result =
                        catch_unwind(AssertUnwindSafe(work)).map_err(|_| OffloadError::Panicked);
                    let panicked = result.is_err();
                    let deliver: Deliver = Box::new(move || {
                        if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                            let _ = tx.send(result);
                        }
                    });
                    (panicked, deliver)
                }),
                refuse: Box::new(move |e| {
                    if let Some(tx) = refused.lock().ok().and_then(|mut t| t.take()) {
                        let _ = tx.send(Err(e));
                    }
                }),
                cancelled: Box::new(move || {
                    closed
                        .lock()
                        .ok()
                        .and_then(|t| t.as_ref().map(oneshot::Sender::is_closed))
                        .unwrap_or(true)
                }),
            },
        );
        drop(q);
        if let Some((_, job)) = displaced {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            shared.stats.displaced.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::OFFLOAD_REFUSED_TOTAL.name);
            (job.refuse)(OffloadError::QueueFull);
        }
        gauge_queued(shared);
        shared.ready.notify_one();
        Ok(Place {
            shared: Arc::clone(shared),
            key: Some(key),
        })
    }

    /// [`shutdown`](Self::shutdown) from async code: the waiting happens on
    /// the blocking pool, not on the runtime's threads.
    pub async fn shutdown_async(&self, deadline: Duration) -> usize {
        let pool = self.clone();
        tokio::task::spawn_blocking(move || pool.shutdown(deadline))
            .await
            .unwrap_or(0)
    }

    /// Stops taking jobs, lets the threads work through the queue until
    /// `deadline`, then drops what is left (their callers get
    /// [`OffloadError::Shutdown`]). Returns how many jobs were dropped.
    /// It blocks the calling thread: from async code, use
    /// [`shutdown_async`](Self::shutdown_async).
    pub fn shutdown(&self, deadline: Duration) -> usize {
        lock(&self.shared.queue).open = false;
        self.shared.ready.notify_all();
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            let q = lock(&self.shared.queue);
            if q.jobs.is_empty() && self.shared.running.load(Ordering::Relaxed) == 0 {
                break;
            }
            drop(q);
            thread::sleep(Duration::from_millis(1));
        }
        // Taken out under the lock, dropped after it (the jobs are callers'
        // closures).
        let left = std::mem::take(&mut lock(&self.shared.queue).jobs);
        let left = {
            let n = left.len();
            drop(left);
            n
        };
        self.shared.ready.notify_all();
        let workers = std::mem::take(
            &mut *self
                .workers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in workers {
            // A job still running past the deadline is left to finish on its
            // own thread; joining it would block shutdown.
            if w.is_finished() {
                let _ = w.join();
            }
        }
        left
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some((_, job)) = q.jobs.pop_last() {
                    // Counted as running from the moment it leaves the
                    // queue, so a job is always queued or running until
                    // its books are done.
                    shared.running.fetch_add(1, Ordering::Relaxed);
                    break job;
                }
                if !q.open {
                    return;
                }
                q = shared
                    .ready
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        gauge_queued(shared);
        if (job.cancelled)() {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::OFFLOAD_DROPPED_TOTAL.name);
            shared.running.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        if job.deadline.is_some_and(|d| Instant::now() >= d) {
            // Its caller is being answered at this moment; it never starts
            // late.
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            shared.stats.expired.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::OFFLOAD_REFUSED_TOTAL.name);
            shared.running.fetch_sub(1, Ordering::Relaxed);
            (job.refuse)(OffloadError::Deadline);
            continue;
        }
        #[cfg(feature = "metrics")]
        metrics::histogram!(gratify_core::telemetry::OFFLOAD_WAIT_SECONDS.name)
            .record(job.enqueued.elapsed().as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = job.enqueued;
        let started = Instant::now();
        // The job catches its own panic; this guards the bookkeeping.
        let (panicked, deliver) = catch_unwind(AssertUnwindSafe(job.work))
            .unwrap_or_else(|_| (true, Box::new(|| {}) as Deliver));
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let old = shared.mean_run.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 8 + took / 8
        };
        shared.mean_run.store(new, Ordering::Relaxed);
        shared.stats.done.fetch_add(1, Ordering::Relaxed);
        super::count(gratify_core::telemetry::OFFLOAD_DONE_TOTAL.name);
        if panicked {
            shared.stats.panicked.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::OFFLOAD_PANICKED_TOTAL.name);
        }
        shared.running.fetch_sub(1, Ordering::Relaxed);
        // The caller sees the result only once the books show the job.
        deliver();
    }
}

/// Polls a future to completion on the current (pool) thread, parking
/// between wake-ups. The future may use tokio resources if the caller
/// entered a runtime context.
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    struct ThreadWaker(Thread, AtomicBool);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.1.store(true, Ordering::Release);
            self.0.unpark();
        }
    }
    let waker_state = Arc::new(ThreadWaker(thread::current(), AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&waker_state));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        while !waker_state.1.swap(false, Ordering::Acquire) {
            thread::park();
        }
    }
}
