//! The bounded, cost-ordered CPU pool.

use std::collections::BinaryHeap;
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

/// A unit of work: runs on a pool thread; `cancelled` says whether its
/// caller is gone (then it is dropped without running).
/// Sends a finished job's result to its caller.
type Deliver = Box<dyn FnOnce() + Send>;

struct Job {
    priority: f64,
    seq: u64,
    enqueued: Instant,
    /// Runs the job; returns whether it panicked and how to deliver the
    /// result (after the pool's books are updated).
    work: Box<dyn FnOnce() -> (bool, Deliver) + Send>,
    cancelled: Box<dyn Fn() -> bool + Send>,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// Highest priority first; among equals, the oldest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then(other.seq.cmp(&self.seq))
    }
}

struct Queue {
    heap: BinaryHeap<Job>,
    open: bool,
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
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    done: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    panicked: AtomicU64,
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
    /// Jobs refused (queue full, deadline, shutdown).
    pub refused: u64,
    /// Jobs dropped unrun because their caller left.
    pub dropped: u64,
    /// Jobs that panicked.
    pub panicked: u64,
}

/// A fixed set of threads, separate from the async runtime's, running CPU
/// work by priority: the cost rate of the job's class over its expected run
/// time (the cμ rule, Reinertsen's CD3). Cloning shares the pool.
#[derive(Clone)]
pub struct CpuPool {
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
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

impl CpuPool {
    /// A pool of `threads` threads (at least one) with room for `max_queue`
    /// waiting jobs. When `threads` is `None`, one per available core.
    pub fn new(threads: Option<usize>, max_queue: usize) -> Self {
        let threads = threads
            .unwrap_or_else(|| thread::available_parallelism().map_or(2, usize::from))
            .max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                heap: BinaryHeap::new(),
                open: true,
            }),
            ready: Condvar::new(),
            threads,
            max_queue: max_queue.max(1),
            seq: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            mean_run: AtomicU64::new(0),
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
            shared,
            workers: Arc::new(Mutex::new(workers)),
        }
    }

    /// The pool's figures.
    pub fn stats(&self) -> PoolStats {
        let s = &self.shared.stats;
        PoolStats {
            queued: lock(&self.shared.queue).heap.len(),
            running: self.shared.running.load(Ordering::Relaxed),
            done: s.done.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            panicked: s.panicked.load(Ordering::Relaxed),
        }
    }

    /// The mean run time of a job.
    pub fn mean_run(&self) -> Duration {
        Duration::from_nanos(self.shared.mean_run.load(Ordering::Relaxed))
    }

    /// How long a job of `priority` would wait: the work queued ahead of it
    /// and running, spread over the threads.
    pub fn predicted_wait(&self, priority: f64) -> Duration {
        let q = lock(&self.shared.queue);
        let ahead = q.heap.iter().filter(|j| j.priority >= priority).count();
        let busy = self.shared.running.load(Ordering::Relaxed);
        let waiting = (ahead + busy + 1).saturating_sub(self.shared.threads);
        self.mean_run() * u32::try_from(waiting.div_ceil(self.shared.threads)).unwrap_or(u32::MAX)
    }

    /// Runs `work` on the pool with `priority` (higher first), unless the
    /// queue is full, the predicted wait passes `deadline`, or the pool is
    /// shutting down. If the returned future is dropped before the job
    /// starts, the job is dropped unrun. A panic in `work` is
    /// [`OffloadError::Panicked`]; the thread lives on.
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
        let (tx, rx) = oneshot::channel::<Result<T, OffloadError>>();
        let submitted = self
            .submit(priority, deadline, tx, work)
            .map_err(|(e, _)| e);
        async move {
            submitted?;
            rx.await.unwrap_or(Err(OffloadError::Shutdown))
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
        self.submit(priority, None, tx, work)
            .map_err(|(_, work)| work)?;
        Ok(async move { rx.await.unwrap_or(Err(OffloadError::Shutdown)) })
    }

    /// Queues `work`, or refuses it and hands it back.
    fn submit<T, F>(
        &self,
        priority: f64,
        deadline: Option<Duration>,
        tx: oneshot::Sender<Result<T, OffloadError>>,
        work: F,
    ) -> Result<(), (OffloadError, F)>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let refuse = |e, work| {
            self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            super::count("gratify_offload_refused_total");
            Err((e, work))
        };
        if let Some(d) = deadline
            && self.predicted_wait(priority) > d
        {
            return refuse(OffloadError::Deadline, work);
        }
        let mut q = lock(&self.shared.queue);
        if !q.open {
            drop(q);
            return refuse(OffloadError::Shutdown, work);
        }
        if q.heap.len() >= self.shared.max_queue {
            drop(q);
            return refuse(OffloadError::QueueFull, work);
        }
        let tx = Arc::new(Mutex::new(Some(tx)));
        let closed = Arc::clone(&tx);
        q.heap.push(Job {
            priority: if priority.is_nan() { 0.0 } else { priority },
            seq: self.shared.seq.fetch_add(1, Ordering::Relaxed),
            enqueued: Instant::now(),
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
            cancelled: Box::new(move || {
                closed
                    .lock()
                    .ok()
                    .and_then(|t| t.as_ref().map(oneshot::Sender::is_closed))
                    .unwrap_or(true)
            }),
        });
        #[cfg(feature = "metrics")]
        metrics::gauge!("gratify_offload_queued").set(q.heap.len() as f64);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Stops taking jobs, lets the threads work through the queue until
    /// `deadline`, then drops what is left (their callers get
    /// [`OffloadError::Shutdown`]). Returns how many jobs were dropped.
    pub fn shutdown(&self, deadline: Duration) -> usize {
        lock(&self.shared.queue).open = false;
        self.shared.ready.notify_all();
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            let q = lock(&self.shared.queue);
            if q.heap.is_empty() && self.shared.running.load(Ordering::Relaxed) == 0 {
                break;
            }
            drop(q);
            thread::sleep(Duration::from_millis(1));
        }
        let left = {
            let mut q = lock(&self.shared.queue);
            let n = q.heap.len();
            q.heap.clear();
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
                if let Some(job) = q.heap.pop() {
                    // Counted as running from the moment it leaves the
                    // queue, so a job is always queued or running until
                    // its books are done.
                    shared.running.fetch_add(1, Ordering::Relaxed);
                    #[cfg(feature = "metrics")]
                    metrics::gauge!("gratify_offload_queued").set(q.heap.len() as f64);
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
        if (job.cancelled)() {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            super::count("gratify_offload_dropped_total");
            shared.running.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        #[cfg(feature = "metrics")]
        metrics::histogram!("gratify_offload_wait_seconds")
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
        super::count("gratify_offload_done_total");
        if panicked {
            shared.stats.panicked.fetch_add(1, Ordering::Relaxed);
            super::count("gratify_offload_panicked_total");
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
