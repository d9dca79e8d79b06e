//! Durable deferred work against a real `redis-server` started here on a
//! free port (so it can be killed and restarted). Real time: Redis counts
//! idle time itself.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gratify::BoxError;
use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue, Worker};
use serde::{Deserialize, Serialize};

/// A `redis-server` of our own, with an append-only file so that a restart
/// keeps the data.
struct Server {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("gratify-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Serialize, Deserialize)]
struct Email {
    order: u32,
}

impl DurableJob for Email {
    const NAME: &'static str = "email";
}

/// How many times each order's e-mail ran to completion.
type Seen = Arc<Mutex<HashMap<u32, u32>>>;

/// A worker whose handler counts its starts in `started` and its
/// completions per order in `seen`.
fn worker_recording(
    queue: &DurableQueue,
    seen: &Seen,
    started: &Arc<AtomicU32>,
    work: Duration,
) -> Worker {
    let mut worker = queue.worker();
    let seen = Arc::clone(seen);
    let started = Arc::clone(started);
    worker.register(move |job: Email, _ctx| {
        let seen = Arc::clone(&seen);
        let started = Arc::clone(&started);
        async move {
            started.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(work).await;
            *seen.lock().unwrap().entry(job.order).or_default() += 1;
            Ok(())
        }
    });
    worker
}

async fn wait_for(mut done: impl FnMut() -> bool, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_is_lost_when_workers_are_killed_mid_job_100_times() {
    let server = Server::start();
    // Killed this often, a job would otherwise be taken for one that kills
    // its worker (see the poison test below).
    let config = DurableConfig::new("kills")
        .max_deliveries(10_000)
        .visibility(Duration::from_millis(150))
        .block(Duration::from_millis(50));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    let jobs = 60u32;
    for order in 0..jobs {
        queue.enqueue(&Email { order }).await.unwrap();
    }
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    // Kill a worker 100 times, each a few milliseconds into its work (a
    // job takes 5 ms). Half come back under the same name (a restarted
    // pod), half under a fresh one (a replaced pod).
    for kill in 0..100u64 {
        let name = if kill % 2 == 0 {
            "stable-pod".to_owned()
        } else {
            format!("pod-{kill}")
        };
        let q = DurableQueue::connect(server.client(), config.clone().consumer(name))
            .await
            .unwrap();
        let worker = worker_recording(&q, &seen, &started, Duration::from_millis(5));
        let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
        tokio::time::sleep(Duration::from_millis(1 + kill % 9)).await;
        task.abort();
        let _ = task.await;
    }
    // Then a worker that is left alone finishes what is left, reclaiming
    // the entries of the dead consumers after the visibility timeout.
    let q = DurableQueue::connect(server.client(), config.clone().consumer("survivor"))
        .await
        .unwrap();
    let worker = worker_recording(&q, &seen, &started, Duration::from_millis(5));
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    let all = wait_for(
        || seen.lock().unwrap().len() == jobs as usize,
        Duration::from_secs(30),
    )
    .await;
    let seen_now = seen.lock().unwrap().clone();
    assert!(
        all,
        "lost jobs: only {} of {jobs} ran; {} dead letters, {} pending",
        seen_now.len(),
        queue.dead_letters().await.unwrap(),
        queue.pending().await.unwrap()
    );
    let pending = async {
        for _ in 0..100 {
            if queue.pending().await.unwrap() == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
    .await;
    task.abort();
    assert!(pending, "entries left unacknowledged");
    let duplicates: u32 = seen_now.values().map(|n| n - 1).sum();
    let completed: u32 = seen_now.values().sum();
    let cut_short = started.load(Ordering::Relaxed).saturating_sub(completed);
    println!(
        "100 kills: {jobs} jobs all ran; {duplicates} ran more than once; {cut_short} runs cut short"
    );
    assert!(
        cut_short >= 30,
        "the kills rarely landed mid-job: {cut_short}"
    );
    assert_eq!(queue.dead_letters().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_carry_on_when_redis_restarts() {
    let mut server = Server::start();
    let config = DurableConfig::new("restarts")
        .visibility(Duration::from_millis(500))
        .block(Duration::from_millis(50));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    let jobs = 40u32;
    for order in 0..jobs {
        queue.enqueue(&Email { order }).await.unwrap();
    }
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(20));
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    assert!(wait_for(|| seen.lock().unwrap().len() >= 5, Duration::from_secs(10)).await);
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.spawn();
    let all = wait_for(
        || seen.lock().unwrap().len() == jobs as usize,
        Duration::from_secs(30),
    )
    .await;
    task.abort();
    assert!(
        all,
        "after the restart only {} of {jobs} ran",
        seen.lock().unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_backoff_then_go_to_the_dead_letter_stream() {
    let server = Server::start();
    let config = DurableConfig::new("failures")
        .max_attempts(3)
        .backoff(Duration::from_millis(100))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    let key = queue.enqueue(&Email { order: 7 }).await.unwrap();
    // An entry nobody can handle is a dead letter too, not dropped.
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("failures")
        .arg("*")
        .arg("type")
        .arg("unknown")
        .arg("payload")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .unwrap();

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let mut worker = queue.worker();
    let a = Arc::clone(&attempts);
    worker.register(move |_job: Email, ctx| {
        let a = Arc::clone(&a);
        async move {
            a.lock()
                .unwrap()
                .push((ctx.attempt, ctx.key, Instant::now()));
            Err::<(), BoxError>("smtp down".into())
        }
    });
    let stop = tokio::time::sleep(Duration::from_secs(2));
    let report = worker.run(stop).await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(attempts.iter().all(|a| a.1 == key), "the key is stable");
    assert!(attempts[1].2 - attempts[0].2 >= Duration::from_millis(100));
    assert!(
        attempts[2].2 - attempts[1].2 >= Duration::from_millis(200),
        "backoff doubles"
    );
    assert_eq!((report.retried, report.dead, report.done), (2, 2, 0));
    assert_eq!(queue.dead_letters().await.unwrap(), 2);
    assert_eq!(queue.pending().await.unwrap(), 0);
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("failures:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let errors: Vec<String> = dead
        .ids
        .iter()
        .map(|e| e.get::<String>("error").unwrap())
        .collect();
    assert!(errors.iter().any(|e| e == "smtp down"), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("no handler")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_its_worker_is_a_dead_letter_after_max_deliveries() {
    let server = Server::start();
    let config = DurableConfig::new("poison")
        .max_deliveries(2)
        .visibility(Duration::from_millis(50))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    // Each worker takes the job and dies in it (the job never finishes).
    for i in 0..2 {
        let q = DurableQueue::connect(server.client(), config.clone().consumer(format!("w{i}")))
            .await
            .unwrap();
        let worker = worker_recording(&q, &seen, &started, Duration::from_secs(3600));
        let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        task.abort();
        let _ = task.await;
    }
    let q = DurableQueue::connect(server.client(), config.consumer("judge"))
        .await
        .unwrap();
    let worker = worker_recording(&q, &seen, &started, Duration::from_secs(3600));
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(600)))
        .await;
    assert_eq!(report.dead, 1, "{report:?}");
    assert_eq!(queue.dead_letters().await.unwrap(), 1);
    assert_eq!(queue.pending().await.unwrap(), 0);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_time_is_true_once_per_key() {
    let server = Server::start();
    let queue = DurableQueue::connect(server.client(), DurableConfig::new("once"))
        .await
        .unwrap();
    let ttl = Duration::from_secs(60);
    assert!(queue.first_time("order-1", ttl).await.unwrap());
    assert!(!queue.first_time("order-1", ttl).await.unwrap());
    assert!(queue.first_time("order-2", ttl).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_job_in_progress_and_acknowledges_it() {
    let server = Server::start();
    let config = DurableConfig::new("shutdown").block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    queue.enqueue(&Email { order: 2 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(1000));
    // Shutdown arrives while the first job runs.
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(250)))
        .await;
    assert_eq!(report.done, 1);
    assert_eq!(*seen.lock().unwrap(), HashMap::from([(1, 1)]));
    assert_eq!(
        started.load(Ordering::Relaxed),
        1,
        "the second never started"
    );
    // The second was fetched in the same batch: it waits, pending, for the
    // next worker.
    assert_eq!(queue.pending().await.unwrap(), 1);
    let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(1));
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(300)))
        .await;
    assert_eq!(report.done, 1);
    assert_eq!(queue.pending().await.unwrap(), 0);
    assert_eq!(*seen.lock().unwrap(), HashMap::from([(1, 1), (2, 1)]));
}
