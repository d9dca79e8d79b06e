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
use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue};
use serde::{Deserialize, Serialize};

mod durable_common;
use durable_common::{Email, Seen, kill_mid_job, wait_for, worker_recording};

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
            .expect("no redis-server on the PATH: apt-get install -y redis-server (bash .ci/run installs what the tests need)");
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
    // job takes 20 ms). Half come back under the same name (a restarted
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
        let worker = worker_recording(&q, &seen, &started, Duration::from_millis(20));
        // A few milliseconds into a job (a job takes 20 ms).
        kill_mid_job(worker, &started, Duration::from_millis(kill % 10)).await;
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
        // No grace: an entry of an unknown type is a dead letter at once.
        .unknown_grace(Duration::ZERO)
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
    // Until the third attempt has failed and had time to be filed (a
    // bound that only ends a test that would hang: no pace asserted).
    let stop = {
        let attempts = Arc::clone(&attempts);
        async move {
            wait_for(
                || attempts.lock().unwrap().len() >= 3,
                Duration::from_secs(30),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let report = worker.run(stop).await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(attempts.iter().all(|a| a.1 == key), "the key is stable");
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
        // A worker that does get to run the job cannot hang the test.
        .job_timeout(Duration::from_secs(2))
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
    // The second was never claimed: a worker claims only what it can start
    // now, so nothing waits in its hands for the next worker.
    assert_eq!(queue.pending().await.unwrap(), 0);
    let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(1));
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(300)))
        .await;
    assert_eq!(report.done, 1);
    assert_eq!(queue.pending().await.unwrap(), 0);
    assert_eq!(*seen.lock().unwrap(), HashMap::from([(1, 1), (2, 1)]));
}

/// A job that runs three times as long as the visibility timeout, with two
/// workers: the lease is renewed while it runs, so nobody takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_visibility_timeout_runs_once() {
    let server = Server::start();
    let config = DurableConfig::new("long")
        .visibility(Duration::from_millis(300))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for i in 0..2 {
        let q = DurableQueue::connect(server.client(), config.clone().consumer(format!("w{i}")))
            .await
            .unwrap();
        let worker = worker_recording(&q, &seen, &started, Duration::from_millis(900));
        workers.push(tokio::spawn(async move {
            worker
                .run(tokio::time::sleep(Duration::from_millis(2000)))
                .await
        }));
    }
    let mut lost = 0;
    for w in workers {
        lost += w.await.unwrap().lost_leases;
    }
    assert_eq!(started.load(Ordering::Relaxed), 1, "started once");
    assert_eq!(*seen.lock().unwrap(), HashMap::from([(1, 1)]));
    assert_eq!(lost, 0);
    assert_eq!(queue.pending().await.unwrap(), 0);
}

/// A dead worker's job is reclaimed while many more jobs are in flight than
/// one scan of the pending entries covers (`XAUTOCLAIM` looks at ten a
/// call): a scan that only ever went on from where it stopped would chase
/// the newer entries past the dead one for as long as they keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_job_is_reclaimed_while_many_others_are_in_flight() {
    let server = Server::start();
    // Long enough for the crowd below to be in full flow before the dead
    // worker's lease expires.
    let config = DurableConfig::new("crowded")
        .visibility(Duration::from_millis(1500))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    // Order 0 is taken by a worker that dies holding it (under a name of
    // its own: no worker below reads it as its own pending entry).
    queue.enqueue(&Email { order: 0 }).await.unwrap();
    let doomed_queue = DurableQueue::connect(server.client(), config.clone().consumer("doomed"))
        .await
        .unwrap();
    let doomed = worker_recording(&doomed_queue, &seen, &started, Duration::from_secs(60));
    kill_mid_job(doomed, &started, Duration::from_millis(10)).await;
    // Forty workers busy with 100 ms jobs, kept fed for 4 s.
    let feeding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let producer = {
        let queue = queue.clone();
        let feeding = Arc::clone(&feeding);
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(4);
            let mut order = 1;
            while Instant::now() < until {
                for _ in 0..5 {
                    queue.enqueue(&Email { order }).await.unwrap();
                    order += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            feeding.store(false, Ordering::SeqCst);
        })
    };
    let reclaimed_while_fed = Arc::new(Mutex::new(None));
    let mut workers = Vec::new();
    for _ in 0..40 {
        let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(100));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        workers.push((
            stop_tx,
            tokio::spawn(async move {
                worker
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await
            }),
        ));
    }
    let watcher = {
        let seen = Arc::clone(&seen);
        let feeding = Arc::clone(&feeding);
        let at = Arc::clone(&reclaimed_while_fed);
        tokio::spawn(async move {
            loop {
                if seen.lock().unwrap().contains_key(&0) {
                    *at.lock().unwrap() = Some(feeding.load(Ordering::SeqCst));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    producer.await.unwrap();
    assert!(
        wait_for(|| watcher.is_finished(), Duration::from_secs(10)).await,
        "order 0 never ran again"
    );
    for (stop, task) in workers {
        let _ = stop.send(());
        task.await.unwrap();
    }
    assert_eq!(
        *reclaimed_while_fed.lock().unwrap(),
        Some(true),
        "the dead worker's job waited until new jobs stopped coming"
    );
    assert_eq!(seen.lock().unwrap().get(&0), Some(&1));
}

/// A worker whose entry was taken by another (its lease lost while it
/// stalled) cannot acknowledge it: the entry stays with its new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_cannot_acknowledge() {
    let server = Server::start();
    let config = DurableConfig::new("lost")
        .visibility(Duration::from_secs(30))
        .block(Duration::from_millis(20))
        .consumer("slow");
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(600));
    let run = tokio::spawn(async move {
        worker
            .run(tokio::time::sleep(Duration::from_millis(1200)))
            .await
    });
    assert!(
        wait_for(
            || started.load(Ordering::Relaxed) == 1,
            Duration::from_secs(5)
        )
        .await
    );
    // Another consumer takes the entry (as XAUTOCLAIM would after a stall).
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pending: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg("lost")
        .arg("gratify")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = pending.ids[0].id.clone();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg("lost")
        .arg("gratify")
        .arg("thief")
        .arg(0)
        .arg(&id)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let report = run.await.unwrap();
    assert_eq!((report.done, report.lost_leases), (0, 1), "{report:?}");
    // Still pending, now the thief's: not acknowledged, not deleted.
    assert_eq!(queue.pending().await.unwrap(), 1);
    let owner: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg("lost")
        .arg("gratify")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owner.ids[0].consumer, "thief");
}

/// A job that kills its worker, restarted under the same (stable) name each
/// time: it comes back from the worker's own pending list, and is a dead
/// letter after `max_deliveries`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_a_dead_letter_with_a_stable_consumer_name_too() {
    let server = Server::start();
    let config = DurableConfig::new("poison-stable")
        .max_deliveries(3)
        .job_timeout(Duration::from_secs(2))
        .consumer("pod-1")
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    for _ in 0..5 {
        // A restarted process: a new handle, its first worker under the
        // stable name.
        let restarted = DurableQueue::connect(server.client(), config.clone())
            .await
            .unwrap();
        let worker = worker_recording(&restarted, &seen, &started, Duration::from_secs(3600));
        let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        task.abort();
        let _ = task.await;
    }
    assert_eq!(queue.dead_letters().await.unwrap(), 1);
    assert_eq!(queue.pending().await.unwrap(), 0);
    assert_eq!(
        started.load(Ordering::Relaxed),
        3,
        "run once per delivery, no more"
    );
}

/// Enqueueing never waits behind a worker's blocking read: with workers
/// idle in reads that block for ten seconds, an enqueue answers long
/// before one read would end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_never_waits_behind_an_idle_workers_blocking_read() {
    let server = Server::start();
    let config = DurableConfig::new("idle").block(Duration::from_secs(10));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let worker = worker_recording(&queue, &seen, &started, Duration::ZERO);
        workers.push(tokio::spawn(async move {
            worker.run(std::future::pending()).await
        }));
    }
    // Let them settle into their blocking reads.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for order in 0..5 {
        let enqueued =
            tokio::time::timeout(Duration::from_secs(5), queue.enqueue(&Email { order })).await;
        assert!(
            enqueued.is_ok(),
            "enqueue {order} waited behind a blocking read"
        );
    }
    assert!(wait_for(|| seen.lock().unwrap().len() == 5, Duration::from_secs(15)).await);
    for w in workers {
        w.abort();
    }
}

/// Retries back off with full jitter: jobs that fail together do not come
/// back together. Twenty failures with a ceiling of an hour are spread over
/// it, every one of them within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_that_fail_together_come_back_spread_out() {
    let server = Server::start();
    let config = DurableConfig::new("jitter")
        .backoff(Duration::from_secs(3600))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    for order in 0..20 {
        queue.enqueue(&Email { order }).await.unwrap();
    }
    let mut worker = queue.worker();
    worker.register(|_job: Email, _ctx| async { Err::<(), BoxError>("down".into()) });
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(1500)))
        .await;
    assert_eq!(report.retried, 20);
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let due: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg("jitter:delayed")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(due.len(), 20);
    let times: Vec<f64> = due.iter().map(|(_, t)| t - before).collect();
    assert!(
        times.iter().all(|t| (0.0..=3_700_000.0).contains(t)),
        "{times:?}"
    );
    let spread = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 600_000.0, "spread over {spread} ms only");
}

/// The idempotency pattern keeps at-least-once: a send that fails after the
/// effect was claimed is retried (the claim is released), a send recorded
/// done is not repeated when the attempt then fails, and a claim left by a
/// dead worker expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_effects_are_retried_after_failures_and_done_once() {
    use gratify::offload::durable::Effect;
    let server = Server::start();
    let config = DurableConfig::new("effects")
        .backoff(Duration::from_millis(20))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    durable_common::effects_are_retried_after_failures_and_done_once(&queue).await;
    // A claim whose holder died expires with its lease.
    match queue
        .claim_effect("orphan", Duration::from_secs(3))
        .await
        .unwrap()
    {
        Effect::Claimed(claim) => drop(claim),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        queue
            .claim_effect("orphan", Duration::from_secs(1))
            .await
            .unwrap(),
        Effect::InProgress(_)
    ));
    // A generous lease, so that the check above never races it; then
    // past it.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(matches!(
        queue
            .claim_effect("orphan", Duration::from_secs(1))
            .await
            .unwrap(),
        Effect::Claimed(_)
    ));
}

/// A worker that dies in the middle of an effect leaves its claim; the
/// redeliveries that find it in progress wait for it to end without using
/// up their attempts, and the effect is done once the claim has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_a_dead_worker_costs_no_attempts() {
    use gratify::offload::durable::Effect;
    let server = Server::start();
    let config = DurableConfig::new("orphaned")
        .max_attempts(2)
        .visibility(Duration::from_millis(200))
        .backoff(Duration::from_millis(10))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let sent = Arc::new(AtomicU32::new(0));
    let make = |q: DurableQueue, hang: bool, sent: Arc<AtomicU32>| {
        let mut worker = q.worker();
        let queue = q;
        worker.register(move |_job: Email, ctx| {
            let (queue, sent) = (queue.clone(), Arc::clone(&sent));
            async move {
                match queue
                    .claim_effect(&ctx.key, Duration::from_millis(1500))
                    .await?
                {
                    Effect::Claimed(claim) => {
                        if hang {
                            // Dies here: the claim stays until its lease ends.
                            std::future::pending::<()>().await;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        claim.done("sent", Duration::from_secs(60)).await?;
                        Ok(())
                    }
                    Effect::Done(_) => Ok(()),
                    Effect::InProgress(later) => Err(later.into()),
                    _ => Err("unexpected".into()),
                }
            }
        });
        worker
    };
    let dying = make(queue.clone(), true, Arc::clone(&sent));
    let task = tokio::spawn(async move { dying.run(std::future::pending()).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    task.abort();
    let _ = task.await;
    // Two attempts at most, and the claim lasts 1.5 s: without waiting
    // for it, the job would be a dead letter long before it expires.
    let q = DurableQueue::connect(server.client(), config.consumer("next"))
        .await
        .unwrap();
    let worker = make(q, false, Arc::clone(&sent));
    let report = worker.run(tokio::time::sleep(Duration::from_secs(4))).await;
    assert_eq!((report.done, report.dead), (1, 0), "{report:?}");
    assert_eq!(sent.load(Ordering::Relaxed), 1);
}

/// A handler that never returns is aborted after the job timeout: a failed
/// attempt, then a dead letter; the worker and its shutdown go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs_is_aborted_and_its_worker_goes_on() {
    let server = Server::start();
    let config = DurableConfig::new("hang")
        .max_attempts(1)
        .job_timeout(Duration::from_millis(200))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    queue.enqueue(&Email { order: 2 }).await.unwrap();
    let done = Arc::new(AtomicU32::new(0));
    let mut worker = queue.worker();
    let d = Arc::clone(&done);
    worker.register(move |job: Email, _ctx| {
        let d = Arc::clone(&d);
        async move {
            if job.order == 1 {
                std::future::pending::<()>().await;
            }
            d.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(1500)))
        .await;
    assert_eq!((report.dead, report.done), (1, 1), "{report:?}");
    assert_eq!(done.load(Ordering::Relaxed), 1);
    assert_eq!(queue.dead_letters().await.unwrap(), 1);
}

/// A handler that panics before its future exists (in its synchronous
/// part) is a failed attempt: the worker survives and runs the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_the_handlers_future_is_a_failed_attempt() {
    let server = Server::start();
    let config = DurableConfig::new("sync-panic")
        .max_attempts(1)
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    queue.enqueue(&Email { order: 2 }).await.unwrap();
    let done = Arc::new(AtomicU32::new(0));
    let mut worker = queue.worker();
    let d = Arc::clone(&done);
    worker.register(move |job: Email, _ctx| {
        assert!(job.order != 1, "a bug in the handler's first line");
        let d = Arc::clone(&d);
        async move {
            d.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    });
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(800)))
        .await;
    assert_eq!((report.dead, report.done), (1, 1), "{report:?}");
    assert_eq!(done.load(Ordering::Relaxed), 1);
}

/// During a rolling deploy a job of a type this worker does not know yet is
/// set aside, not dead-lettered; a worker that knows it runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_job_type_waits_for_a_worker_that_knows_it() {
    #[derive(Serialize, Deserialize)]
    struct Refund {
        order: u32,
    }
    impl DurableJob for Refund {
        const NAME: &'static str = "refund";
    }
    let server = Server::start();
    let config = DurableConfig::new("deploy")
        .unknown_grace(Duration::from_secs(60))
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    queue.enqueue(&Refund { order: 9 }).await.unwrap();
    // The old version knows only e-mails.
    let old = queue.worker();
    let report = old
        .run(tokio::time::sleep(Duration::from_millis(500)))
        .await;
    assert_eq!(report.dead, 0, "{report:?}");
    assert_eq!(queue.dead_letters().await.unwrap(), 0);
    // The new version knows refunds.
    let q = DurableQueue::connect(server.client(), config.consumer("v2"))
        .await
        .unwrap();
    let refunded = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&refunded);
    let mut new = q.worker();
    new.register(move |job: Refund, _ctx| {
        let r = Arc::clone(&r);
        async move {
            r.fetch_add(job.order, Ordering::Relaxed);
            Ok(())
        }
    });
    let report = new.run(tokio::time::sleep(Duration::from_secs(10))).await;
    assert_eq!(report.done, 1, "{report:?}");
    assert_eq!(refunded.load(Ordering::Relaxed), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_of_a_queue_reads_under_its_own_name() {
    let server = Server::start();
    let queue = DurableQueue::connect(
        server.client(),
        DurableConfig::new("names").consumer("pod-7"),
    )
    .await
    .unwrap();
    let mut workers: Vec<_> = (0..3).map(|_| queue.worker()).collect();
    let names: Vec<&str> = workers.iter().map(|w| w.consumer()).collect();
    assert_eq!(names, ["pod-7", "pod-7-1", "pod-7-2"]);
    // A worker made again after one stopped gets its name back, with its
    // pending entries.
    drop(workers.remove(1));
    assert_eq!(queue.worker().consumer(), "pod-7-1");
}

/// A worker that yields to the load takes no new job while a slot costs
/// more than delaying its jobs' class, and takes them as the load falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_yields_to_the_load_waits_for_it_to_fall() {
    use gratify::{CostModel, LoadSignal, LoadSnapshot};
    let model = CostModel::from_toml(
        r#"
        [classes.email]
        delay_cost = { shape = "linear", per_second = 0.01, deadline = "60s" }
        refusal_cost = 1.0
        "#,
    )
    .unwrap();
    let server = Server::start();
    let config = DurableConfig::new("yield").block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config)
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let signal = LoadSignal::new();
    // Busy: a slot-second costs 10, far above the e-mail's 0.027 a second.
    signal.publish(
        LoadSnapshot::new(1.5, Duration::from_millis(50), 0.1)
            .with_latency(Duration::from_millis(10)),
    );
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let worker = worker_recording(&queue, &seen, &started, Duration::ZERO)
        .yield_to_load(&model, signal.clone());
    // The worker runs until the job has run (at most 30 s: a bound that
    // only ends a test that would hang).
    let stop = {
        let seen = seen.clone();
        async move {
            wait_for(|| seen.lock().unwrap().len() == 1, Duration::from_secs(30)).await;
        }
    };
    let task = tokio::spawn(async move { worker.run(stop).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(started.load(Ordering::Relaxed), 0, "held back under load");
    assert_eq!(queue.pending().await.unwrap(), 0, "not even claimed");
    // Idle: it runs.
    signal.publish(
        LoadSnapshot::new(0.2, Duration::ZERO, 0.0).with_latency(Duration::from_millis(10)),
    );
    assert!(wait_for(|| seen.lock().unwrap().len() == 1, Duration::from_secs(30)).await);
    let report = task.await.unwrap();
    assert_eq!(report.done, 1);
}

/// A job that kills its worker inside a claimed effect, every time: the
/// redeliveries that find the claim set it aside, and each re-queue starts
/// a new entry with a fresh delivery count. Its unanswered deliveries are
/// carried along, so it still ends as a dead letter after
/// `max_deliveries` instead of cycling for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_dies_inside_its_effect_every_time_is_still_a_dead_letter() {
    use gratify::offload::durable::Effect;
    let server = Server::start();
    let config = DurableConfig::new("dies-inside")
        .max_deliveries(3)
        .visibility(Duration::from_millis(100))
        .consumer("w")
        .block(Duration::from_millis(20));
    let queue = DurableQueue::connect(server.client(), config.clone())
        .await
        .unwrap();
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let claims = Arc::new(AtomicU32::new(0));
    for _ in 0..16 {
        if queue.dead_letters().await.unwrap() == 1 {
            break;
        }
        // A restarted process.
        let q = DurableQueue::connect(server.client(), config.clone())
            .await
            .unwrap();
        let mut worker = q.worker();
        let (queue2, claims2) = (q.clone(), Arc::clone(&claims));
        worker.register(move |_job: Email, ctx| {
            let (queue, claims) = (queue2.clone(), Arc::clone(&claims2));
            async move {
                match queue
                    .claim_effect(&ctx.key, Duration::from_millis(300))
                    .await?
                {
                    Effect::Claimed(_claim) => {
                        claims.fetch_add(1, Ordering::Relaxed);
                        // The worker dies in the middle of the effect.
                        std::future::pending::<()>().await;
                        Ok(())
                    }
                    Effect::InProgress(later) => Err(later.into()),
                    _ => Ok(()),
                }
            }
        });
        let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
        tokio::time::sleep(Duration::from_millis(250)).await;
        task.abort();
        let _ = task.await;
    }
    assert_eq!(
        queue.dead_letters().await.unwrap(),
        1,
        "a dead letter at last"
    );
    assert!(
        claims.load(Ordering::Relaxed) <= 3,
        "the effect was started {} times",
        claims.load(Ordering::Relaxed)
    );
}
