//! Durable deferred work: gratify's `DurableQueue` against apalis, on the
//! same Redis and the same PostgreSQL.
//!
//! ```text
//! cargo bench -p gratify-benches --bench durable
//! cargo bench -p gratify-benches --bench durable -- --quick          # about a minute
//! cargo bench -p gratify-benches --bench durable -- --backend redis  # one backend
//! ```
//!
//! Redis is a `redis-server` the bench starts on a free port (no
//! persistence, flushed between contenders); PostgreSQL is the server at
//! `$GRATIFY_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! in a database the bench creates for each contender and drops.
//!
//! Each contender runs `--workers` jobs at a time with a no-op handler:
//! gratify as that many `Worker`s; apalis as one worker with
//! `.concurrency(workers).parallelize(tokio::spawn)` (as apalis's README
//! sets one up), twice — `apalis`, woken by its backend's
//! pub/sub when a job is pushed (Redis: `RedisStorageFactory`, RESP3;
//! PostgreSQL: `with_pubsub`, `LISTEN/NOTIFY`), and `apalis-polling`,
//! looking every 100 ms (`poll_with_interval`). Each is measured twice:
//!
//! 1. **drain**: `--jobs` jobs enqueued by 8 concurrent producers, then
//!    the workers start: jobs per second from their start to the last
//!    handler's end, and enqueues per second.
//! 2. **steady**: jobs enqueued at `--rate` a second (evenly spaced) for
//!    `--seconds`, so the workers wait idle between them: the enqueue
//!    call's latency (p50, p99) and enqueue → start, from just before the
//!    enqueue call to the handler's first line (p50, p99, max).
//!
//! Executions are counted per job: a job run twice, or never, is reported.
//! Writes `target/gratify-bench/durable.json` (or `$GRATIFY_BENCH_DIR`).
#![allow(clippy::unwrap_used, missing_docs)]

#[allow(dead_code)]
mod common;

use common::percentile;

use std::future::Future;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// Durable job queues side by side.
#[derive(Debug, clap::Parser)]
#[command(name = "durable")]
struct Args {
    /// Fewer jobs and a shorter steady phase.
    #[arg(long)]
    quick: bool,
    /// Only this backend.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// Jobs at a time, per contender.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Jobs in the drain phase (default 20,000; 5,000 with --quick).
    #[arg(long)]
    jobs: Option<usize>,
    /// Jobs a second in the steady phase.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Length of the steady phase in seconds (default 20; 5 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    Redis,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    Gratify,
    /// apalis woken by the backend's pub/sub when a job is pushed.
    Apalis,
    /// apalis polling every [`POLL`].
    ApalisPolling,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Self::Gratify => "gratify",
            Self::Apalis => "apalis",
            Self::ApalisPolling => "apalis-polling",
        }
    }
}

/// How often `apalis-polling` looks for jobs. Without a polling or
/// pub/sub strategy (its README's first example) an idle apalis worker looks
/// again only at its next heartbeat, 30 s by default.
const POLL: Duration = Duration::from_millis(100);

/// The job both queues carry: its number and when its enqueue began.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchJob {
    id: u64,
    at_ns: u64,
}

impl DurableJob for BenchJob {
    const NAME: &'static str = "bench";
}

/// What the handlers saw during one phase.
struct Recorder {
    epoch: Instant,
    /// Enqueue → start, in ms.
    starts: Mutex<Vec<f64>>,
    runs: Mutex<Vec<u32>>,
    done: AtomicUsize,
    target: usize,
    all_done: Notify,
    last_end: Mutex<Option<Instant>>,
}

impl Recorder {
    fn new(epoch: Instant, jobs: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch,
            starts: Mutex::new(Vec::with_capacity(jobs)),
            runs: Mutex::new(vec![0; jobs]),
            done: AtomicUsize::new(0),
            target: jobs,
            all_done: Notify::new(),
            last_end: Mutex::new(None),
        })
    }

    fn start(&self, job: &BenchJob) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let waited = now.saturating_sub(job.at_ns) as f64 / 1e6;
        self.starts.lock().unwrap().push(waited);
        if let Some(r) = self.runs.lock().unwrap().get_mut(job.id as usize) {
            *r += 1;
        }
    }

    fn end(&self) {
        *self.last_end.lock().unwrap() = Some(Instant::now());
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.target {
            self.all_done.notify_one();
        }
    }

    /// Jobs run more than once, and jobs never run.
    fn runs(&self) -> (usize, usize) {
        let runs = self.runs.lock().unwrap();
        let twice = runs.iter().filter(|&&r| r > 1).count();
        let never = runs.iter().filter(|&&r| r == 0).count();
        (twice, never)
    }
}

type PushFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Push = Arc<dyn Fn(BenchJob) -> PushFuture + Send + Sync>;

/// A contender's queue, running: how to enqueue, and how to stop it.
struct Running {
    push: Push,
    /// Lets the workers begin (they wait for it).
    go: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    fn go(&self) {
        let _ = self.go.send(true);
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Completes once `rx` is true (the signal to stop, or to go).
fn stopped(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Where the contenders keep their jobs.
enum Server {
    Redis { url: String, _child: ChildGuard },
    Postgres { admin: String },
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    fn redis() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self::Redis {
            url: format!("redis://127.0.0.1:{port}/"),
            _child: ChildGuard(child),
        }
    }

    fn postgres() -> Self {
        Self::Postgres {
            admin: std::env::var("GRATIFY_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        }
    }

    /// A clean place for one contender: Redis flushed; a new database.
    async fn fresh(&self, contender: Contender) -> String {
        match self {
            Self::Redis { url, .. } => {
                let client = redis::Client::open(url.as_str()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
                url.clone()
            }
            Self::Postgres { admin } => {
                let name = format!(
                    "gratify_bench_durable_{}",
                    contender.name().replace('-', "_")
                );
                let pool = sqlx::PgPool::connect(admin).await.unwrap();
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&pool)
                    .await
                    .unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
            }
        }
    }

    async fn drop_database(&self, contender: Contender) {
        if let Self::Postgres { admin } = self {
            let name = format!(
                "gratify_bench_durable_{}",
                contender.name().replace('-', "_")
            );
            let pool = sqlx::PgPool::connect(admin).await.unwrap();
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    }
}

/// Starts `contender` on `backend` at `url` with `workers` jobs at a time,
/// its handlers reporting to `rec`.
async fn start(
    contender: Contender,
    backend: BackendKind,
    url: &str,
    workers: usize,
    rec: Arc<Recorder>,
) -> Running {
    let (stop, rx) = watch::channel(false);
    let (go, go_rx) = watch::channel(false);
    match contender {
        Contender::Gratify => {
            let config = DurableConfig::new("bench");
            let queue = match backend {
                BackendKind::Redis => {
                    DurableQueue::connect(redis::Client::open(url).unwrap(), config)
                        .await
                        .unwrap()
                }
                BackendKind::Postgres => {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(8)
                        .connect(url)
                        .await
                        .unwrap();
                    DurableQueue::postgres(pool, config).await.unwrap()
                }
            };
            let mut tasks = Vec::new();
            for _ in 0..workers {
                let mut worker = queue.worker();
                let rec = rec.clone();
                worker.register::<BenchJob, _, _>(move |job, _ctx| {
                    rec.start(&job);
                    let rec = rec.clone();
                    async move {
                        rec.end();
                        Ok(())
                    }
                });
                let until = stopped(&rx);
                let begin = stopped(&go_rx);
                tasks.push(tokio::spawn(async move {
                    begin.await;
                    worker.run(until).await;
                }));
            }
            let push: Push = Arc::new(move |job| {
                let queue = queue.clone();
                Box::pin(async move {
                    queue
                        .enqueue(&job)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            });
            Running {
                push,
                go,
                stop,
                tasks,
            }
        }
        Contender::Apalis | Contender::ApalisPolling => {
            let wake = contender == Contender::Apalis;
            match backend {
                BackendKind::Redis => {
                    apalis_redis_start(url, wake, workers, rec, (go, stop), (&go_rx, &rx)).await
                }
                BackendKind::Postgres => {
                    apalis_postgres_start(url, wake, workers, rec, (go, stop), (&go_rx, &rx)).await
                }
            }
        }
    }
}

async fn apalis_handler(
    job: BenchJob,
    rec: apalis::prelude::Data<Arc<Recorder>>,
) -> Result<(), apalis::prelude::BoxDynError> {
    rec.start(&job);
    rec.end();
    Ok(())
}

/// Runs an apalis worker on `backend` with `workers` jobs at a time (as
/// its README sets one up) from when `rx.0` says go until `rx.1` says stop.
macro_rules! spawn_apalis {
    ($backend:expr, $rec:expr, $workers:expr, $rx:expr) => {{
        let worker = WorkerBuilder::new("apalis-bench")
            .backend($backend)
            .data($rec)
            .concurrency($workers)
            .parallelize(tokio::spawn)
            .build(apalis_handler);
        let begin = stopped($rx.0);
        let until = stopped($rx.1);
        // Driven from a blocking thread of the runtime: the compiler cannot
        // prove the parallelised worker's future `Send` for `tokio::spawn`;
        // its jobs are spawned onto the runtime's workers all the same.
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            handle.block_on(async move {
                begin.await;
                let _ = worker
                    .run_until(async move {
                        until.await;
                        Ok::<(), std::io::Error>(())
                    })
                    .await;
            });
        })
    }};
}

/// What an apalis contender runs: pushes through `storage`, one worker task.
macro_rules! apalis_running {
    ($storage:expr, $go:expr, $stop:expr, $task:expr) => {{
        let storage = $storage;
        let push: Push = Arc::new(move |job| {
            let mut storage = storage.clone();
            Box::pin(async move { storage.push(job).await.map_err(|e| e.to_string()) })
        });
        Running {
            push,
            go: $go,
            stop: $stop,
            tasks: vec![$task],
        }
    }};
}

async fn apalis_redis_start(
    url: &str,
    wake: bool,
    workers: usize,
    rec: Arc<Recorder>,
    (go, stop): (watch::Sender<bool>, watch::Sender<bool>),
    rx: (&watch::Receiver<bool>, &watch::Receiver<bool>),
) -> Running {
    use apalis::prelude::*;
    // A queue name without `:` (the default, the type's path, has `::`,
    // which the factory's channel parsing splits on).
    let config = apalis_redis::Config::default().queue("bench");
    let conn = apalis_redis::connect(url).await.unwrap();
    let storage = apalis_redis::RedisStorage::<BenchJob>::new(conn).with_config(config.clone());
    let task = if wake {
        // Its pub/sub wake-ups arrive as RESP3 pushes.
        let client = apalis_redis::Client::open(format!("{url}?protocol=resp3")).unwrap();
        let mut factory = apalis_redis::factory::RedisStorageFactory::new(client)
            .await
            .unwrap();
        let backend = BackendFactory::<BenchJob>::create_with_config(&mut factory, config).unwrap();
        spawn_apalis!(backend, rec, workers, rx)
    } else {
        spawn_apalis!(storage.clone().poll_with_interval(POLL), rec, workers, rx)
    };
    apalis_running!(storage, go, stop, task)
}

async fn apalis_postgres_start(
    url: &str,
    wake: bool,
    workers: usize,
    rec: Arc<Recorder>,
    (go, stop): (watch::Sender<bool>, watch::Sender<bool>),
    rx: (&watch::Receiver<bool>, &watch::Receiver<bool>),
) -> Running {
    use apalis::prelude::*;
    use apalis_postgres::{PgPool, PostgresStorage};
    let pool = PgPool::connect(url).await.unwrap();
    PostgresStorage::<()>::setup(&pool).await.unwrap();
    let storage = PostgresStorage::<BenchJob>::new(&pool);
    let task = if wake {
        spawn_apalis!(storage.clone().with_pubsub(), rec, workers, rx)
    } else {
        spawn_apalis!(storage.clone().poll_with_interval(POLL), rec, workers, rx)
    };
    apalis_running!(storage, go, stop, task)
}

/// One contender's figures on one backend.
#[derive(Debug, Default, Serialize)]
struct Figures {
    drain_jobs_per_s: f64,
    enqueues_per_s: f64,
    drain_twice: usize,
    drain_never: usize,
    drain_errors: usize,
    steady_jobs: usize,
    enqueue_p50_ms: f64,
    enqueue_p99_ms: f64,
    start_p50_ms: f64,
    start_p99_ms: f64,
    start_max_ms: f64,
    steady_twice: usize,
    steady_never: usize,
    steady_errors: usize,
}

async fn measure(
    server: &Server,
    contender: Contender,
    backend: BackendKind,
    args: &Args,
) -> Figures {
    let jobs = args.jobs.unwrap_or(if args.quick { 5_000 } else { 20_000 });
    let seconds = args.seconds.unwrap_or(if args.quick { 5.0 } else { 20.0 });
    let mut f = Figures::default();
    let epoch = Instant::now();

    // Drain: 8 producers fill the queue as fast as they can, then the
    // workers start.
    {
        let url = server.fresh(contender).await;
        let rec = Recorder::new(epoch, jobs);
        let running = start(contender, backend, &url, args.workers, rec.clone()).await;
        let next = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let began = Instant::now();
        let producers: Vec<_> = (0..8)
            .map(|_| {
                let push = running.push.clone();
                let next = next.clone();
                let errors = errors.clone();
                tokio::spawn(async move {
                    loop {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        if id >= jobs {
                            break;
                        }
                        let at_ns = epoch.elapsed().as_nanos() as u64;
                        if push(BenchJob {
                            id: id as u64,
                            at_ns,
                        })
                        .await
                        .is_err()
                        {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.await.unwrap();
        }
        let enqueued = began.elapsed();
        let expected = jobs - errors.load(Ordering::Relaxed);
        let began = Instant::now();
        running.go();
        let _ = tokio::time::timeout(Duration::from_secs(120), async {
            while rec.done.load(Ordering::SeqCst) < expected {
                tokio::select! {
                    () = rec.all_done.notified() => {}
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
        .await;
        let last = rec.last_end.lock().unwrap().unwrap_or_else(Instant::now);
        f.drain_jobs_per_s = rec.done.load(Ordering::SeqCst) as f64
            / last.saturating_duration_since(began).as_secs_f64();
        f.enqueues_per_s = jobs as f64 / enqueued.as_secs_f64();
        // Give late duplicates a moment to show.
        tokio::time::sleep(Duration::from_millis(500)).await;
        (f.drain_twice, f.drain_never) = rec.runs();
        f.drain_errors = errors.load(Ordering::Relaxed);
        running.stop().await;
        server.drop_database(contender).await;
    }

    // Steady: evenly spaced, workers idle in between.
    {
        let url = server.fresh(contender).await;
        let n = (args.rate * seconds).round() as usize;
        let rec = Recorder::new(epoch, n);
        let running = start(contender, backend, &url, args.workers, rec.clone()).await;
        running.go();
        // Let the workers reach their idle wait.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut enqueue_ms = Vec::with_capacity(n);
        let mut errors = 0;
        let gap = Duration::from_secs_f64(1.0 / args.rate);
        let began = tokio::time::Instant::now();
        for id in 0..n {
            tokio::time::sleep_until(began + gap * id as u32).await;
            let t = Instant::now();
            let at_ns = epoch.elapsed().as_nanos() as u64;
            if (running.push)(BenchJob {
                id: id as u64,
                at_ns,
            })
            .await
            .is_err()
            {
                errors += 1;
            }
            enqueue_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while rec.done.load(Ordering::SeqCst) < n - errors {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        enqueue_ms.sort_by(f64::total_cmp);
        let mut starts = rec.starts.lock().unwrap().clone();
        starts.sort_by(f64::total_cmp);
        f.steady_jobs = n;
        f.enqueue_p50_ms = percentile(&enqueue_ms, 0.5);
        f.enqueue_p99_ms = percentile(&enqueue_ms, 0.99);
        f.start_p50_ms = percentile(&starts, 0.5);
        f.start_p99_ms = percentile(&starts, 0.99);
        f.start_max_ms = starts.last().copied().unwrap_or(f64::NAN);
        (f.steady_twice, f.steady_never) = rec.runs();
        f.steady_errors = errors;
        running.stop().await;
        server.drop_database(contender).await;
    }
    f
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let backends = match args.backend {
        Some(b) => vec![b],
        None => vec![BackendKind::Redis, BackendKind::Postgres],
    };
    let mut results = serde_json::Map::new();
    println!(
        "{:<9} {:<15} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "backend",
        "queue",
        "drain/s",
        "enqueue/s",
        "enq p50",
        "enq p99",
        "start p50",
        "start p99",
        "start max",
        "2×/0×"
    );
    for backend in backends {
        let server = match backend {
            BackendKind::Redis => Server::redis(),
            BackendKind::Postgres => Server::postgres(),
        };
        let name = match backend {
            BackendKind::Redis => "redis",
            BackendKind::Postgres => "postgres",
        };
        let mut per = serde_json::Map::new();
        for contender in [
            Contender::Gratify,
            Contender::Apalis,
            Contender::ApalisPolling,
        ] {
            let f = rt.block_on(measure(&server, contender, backend, &args));
            println!(
                "{:<9} {:<15} {:>10.0} {:>10.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.1}ms {:>3}/{:<3}{}",
                name,
                contender.name(),
                f.drain_jobs_per_s,
                f.enqueues_per_s,
                f.enqueue_p50_ms,
                f.enqueue_p99_ms,
                f.start_p50_ms,
                f.start_p99_ms,
                f.start_max_ms,
                f.drain_twice + f.steady_twice,
                f.drain_never + f.steady_never,
                if f.drain_errors + f.steady_errors > 0 {
                    format!(" ({} enqueue errors)", f.drain_errors + f.steady_errors)
                } else {
                    String::new()
                }
            );
            per.insert(
                contender.name().to_owned(),
                serde_json::to_value(&f).unwrap(),
            );
        }
        results.insert(name.to_owned(), serde_json::Value::Object(per));
    }
    let jobs = args.jobs.unwrap_or(if args.quick { 5_000 } else { 20_000 });
    let seconds = args.seconds.unwrap_or(if args.quick { 5.0 } else { 20.0 });
    common::write(
        "durable",
        &serde_json::json!({
            "commit": common::commit(),
            "quick": args.quick,
            "workers": args.workers,
            "drain_jobs": jobs,
            "steady_rate": args.rate,
            "steady_seconds": seconds,
            "results": results,
        }),
    );
}
