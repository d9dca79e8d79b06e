//! Durable deferred work on PostgreSQL. Each test creates a database of
//! its own on the server at `GRATIFY_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it afterwards.
//! Real time: leases are timed by the database's clock.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gratify::BoxError;
use gratify::offload::durable::{DurableConfig, DurableQueue, Effect};

mod durable_common;
use durable_common::{Email, Seen, kill_mid_job, wait_for, worker_recording};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

fn admin_url() -> String {
    std::env::var("GRATIFY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of this test's own, dropped (connections and all) when the
/// test ends, however it ends.
struct Database {
    name: String,
    pool: PgPool,
    url: String,
}

impl Database {
    async fn create(test: &str) -> Self {
        let name = format!("gratify_{test}_{}", std::process::id());
        let admin = PgPool::connect(&admin_url())
            .await
            .expect("no PostgreSQL at GRATIFY_TEST_POSTGRES (default 127.0.0.1:5432, trust auth): apt-get install -y postgresql and start it (bash .ci/run starts the one installed), or set GRATIFY_TEST_POSTGRES");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .unwrap();
        Self { name, pool, url }
    }

    /// A pool of one connection: what the queue's workers must not take
    /// from the application.
    async fn tiny_pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
            .unwrap()
    }

    async fn queue(&self, config: DurableConfig) -> DurableQueue {
        DurableQueue::postgres(self.pool.clone(), config)
            .await
            .unwrap()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: the test's may be gone or busy.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = PgPool::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// The outbox: a job queued inside the application's transaction exists
/// only if the transaction commits. A rolled-back order leaves no job; an
/// open transaction's job is invisible to workers; the commit wakes an
/// idle worker (its own wait is an hour long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_rolled_back_leaves_no_job_and_one_committed_runs_once() {
    let db = Database::create("outbox").await;
    let queue = db
        .queue(DurableConfig::new("shop:mail").block(Duration::from_secs(3600)))
        .await;
    sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let worker = worker_recording(&queue, &seen, &started, Duration::ZERO);
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    // Let it settle into its wait.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Order 1 is rolled back after its job was queued.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (id) VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    queue
        .enqueue_in(&mut tx, &Email { order: 1 }, "confirm-1")
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // Order 2's job is queued (in a spawned task, as a request handler
    // would), and stays invisible until the commit.
    let (pool, q) = (db.pool.clone(), queue.clone());
    let tx = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id) VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        q.enqueue_in(&mut tx, &Email { order: 2 }, "confirm-2")
            .await
            .unwrap();
        tx
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        started.load(Ordering::Relaxed),
        0,
        "a job of an open transaction ran"
    );
    tx.commit().await.unwrap();
    let ran = wait_for(|| !seen.lock().unwrap().is_empty(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    task.abort();
    assert!(ran, "the committed job never ran (no wake-up?)");
    assert_eq!(*seen.lock().unwrap(), HashMap::from([(2, 1)]));
    let orders: Vec<i32> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(orders, [2]);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM shop_mail")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        jobs, 0,
        "the job ran and is gone; the rolled-back one never was"
    );
}

/// Many workers over many jobs, nobody killed: each job runs exactly once
/// (`SKIP LOCKED` hands each row to one worker). The application's pool has
/// one connection: the workers hold none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_run_each_job_exactly_once() {
    let db = Database::create("concurrent").await;
    let config = DurableConfig::new("jobs").block(Duration::from_millis(50));
    let app = db.tiny_pool().await;
    let queue = DurableQueue::postgres(app.clone(), config).await.unwrap();
    let jobs = 200u32;
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(1));
        workers.push(tokio::spawn(async move {
            worker.run(std::future::pending()).await
        }));
    }
    // Enqueued while they work, from two tasks.
    let (a, b) = (queue.clone(), queue.clone());
    let first = tokio::spawn(async move {
        for order in 0..jobs / 2 {
            a.enqueue(&Email { order }).await.unwrap();
        }
    });
    for order in jobs / 2..jobs {
        b.enqueue(&Email { order }).await.unwrap();
    }
    first.await.unwrap();
    let all = wait_for(
        || seen.lock().unwrap().len() == jobs as usize,
        Duration::from_secs(60),
    )
    .await;
    for w in &workers {
        w.abort();
    }
    assert!(all, "only {} of {jobs} ran", seen.lock().unwrap().len());
    assert!(
        seen.lock().unwrap().values().all(|&n| n == 1),
        "a job ran twice"
    );
    assert_eq!(started.load(Ordering::Relaxed), jobs);
    assert_eq!(queue.pending().await.unwrap(), 0);
    // The application's one connection is still there for it.
    let one: i32 = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_scalar("SELECT 1").fetch_one(&app),
    )
    .await
    .expect("the application's pool is not held by the workers")
    .unwrap();
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_is_lost_when_workers_are_killed_mid_job_60_times() {
    let db = Database::create("kills").await;
    let config = DurableConfig::new("kills")
        .max_deliveries(10_000)
        .visibility(Duration::from_millis(150))
        .block(Duration::from_millis(50));
    let queue = db.queue(config.clone()).await;
    let jobs = 40u32;
    for order in 0..jobs {
        queue.enqueue(&Email { order }).await.unwrap();
    }
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    // Half come back under the same name (a restarted pod), half under a
    // fresh one (a replaced pod).
    for kill in 0..60u64 {
        let name = if kill % 2 == 0 {
            "stable-pod".to_owned()
        } else {
            format!("pod-{kill}")
        };
        let q = db.queue(config.clone().consumer(name)).await;
        let worker = worker_recording(&q, &seen, &started, Duration::from_millis(20));
        // A few milliseconds into a job (a job takes 20 ms).
        kill_mid_job(worker, &started, Duration::from_millis(kill % 10)).await;
    }
    let q = db.queue(config.clone().consumer("survivor")).await;
    let worker = worker_recording(&q, &seen, &started, Duration::from_millis(5));
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    let all = wait_for(
        || seen.lock().unwrap().len() == jobs as usize,
        Duration::from_secs(60),
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
    let drained = async {
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
    assert!(drained, "jobs left leased");
    let completed: u32 = seen_now.values().sum();
    let cut_short = started.load(Ordering::Relaxed).saturating_sub(completed);
    assert!(
        cut_short >= 10,
        "the kills rarely landed mid-job: {cut_short}"
    );
    assert_eq!(queue.dead_letters().await.unwrap(), 0);
}

/// A job that runs three times as long as the visibility timeout, with two
/// workers: the lease is renewed while it runs, so nobody takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_the_visibility_timeout_runs_once() {
    let db = Database::create("long").await;
    let config = DurableConfig::new("long")
        .visibility(Duration::from_millis(300))
        .block(Duration::from_millis(20));
    let queue = db.queue(config.clone()).await;
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for i in 0..2 {
        let q = db.queue(config.clone().consumer(format!("w{i}"))).await;
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

/// A worker whose job was taken by another (its lease lost while it
/// stalled) cannot finish it: the job stays with its new holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_cannot_acknowledge() {
    let db = Database::create("lost").await;
    let config = DurableConfig::new("lost")
        .visibility(Duration::from_secs(30))
        .block(Duration::from_millis(20))
        .consumer("slow");
    let queue = db.queue(config).await;
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
    // Another worker takes the job (as a reclaim would after a stall).
    sqlx::query("UPDATE lost SET lease_owner = 'thief', fence = fence + 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = run.await.unwrap();
    assert_eq!((report.done, report.lost_leases), (0, 1), "{report:?}");
    let owner: String = sqlx::query_scalar("SELECT lease_owner FROM lost")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(owner, "thief", "still there, the thief's");
}

/// A job that kills its worker, restarted under the same (stable) name each
/// time: it comes back to that worker at once, and is a dead letter after
/// `max_deliveries`; with fresh names, it comes back by reclaim, and the
/// same holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_its_worker_is_a_dead_letter_after_max_deliveries() {
    let db = Database::create("poison").await;
    for (stream, stable) in [("poison_stable", true), ("poison_fresh", false)] {
        let config = DurableConfig::new(stream)
            .max_deliveries(3)
            .job_timeout(Duration::from_secs(2))
            .visibility(Duration::from_millis(100))
            .block(Duration::from_millis(20));
        let queue = db.queue(config.clone()).await;
        queue.enqueue(&Email { order: 1 }).await.unwrap();
        let seen = Seen::default();
        let started = Arc::new(AtomicU32::new(0));
        for i in 0..5 {
            let name = if stable {
                "pod-1".to_owned()
            } else {
                format!("pod-{i}")
            };
            let restarted = db.queue(config.clone().consumer(name)).await;
            let worker = worker_recording(&restarted, &seen, &started, Duration::from_secs(3600));
            let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
            tokio::time::sleep(Duration::from_millis(250)).await;
            task.abort();
            let _ = task.await;
        }
        assert_eq!(queue.dead_letters().await.unwrap(), 1, "{stream}");
        assert_eq!(queue.pending().await.unwrap(), 0, "{stream}");
        assert_eq!(
            started.load(Ordering::Relaxed),
            3,
            "{stream}: run once per delivery, no more"
        );
        assert!(seen.lock().unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_with_backoff_then_go_to_the_dead_letters() {
    let db = Database::create("failures").await;
    let config = DurableConfig::new("failures")
        .max_attempts(3)
        // No grace: a job of an unknown type is a dead letter at once.
        .unknown_grace(Duration::ZERO)
        .backoff(Duration::from_millis(100))
        .block(Duration::from_millis(20));
    let queue = db.queue(config).await;
    let key = queue.enqueue(&Email { order: 7 }).await.unwrap();
    // A job nobody can handle is a dead letter too, not dropped.
    sqlx::query("INSERT INTO failures (kind, payload, key) VALUES ('unknown', '{}', 'k')")
        .execute(&db.pool)
        .await
        .unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let mut worker = queue.worker();
    let a = Arc::clone(&attempts);
    worker.register(move |_job: Email, ctx| {
        let a = Arc::clone(&a);
        async move {
            a.lock().unwrap().push((ctx.attempt, ctx.key));
            // A NUL, which PostgreSQL's TEXT refuses, is dropped.
            Err::<(), BoxError>("smtp down\0".into())
        }
    });
    let report = worker.run(tokio::time::sleep(Duration::from_secs(2))).await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(attempts.iter().all(|a| a.1 == key), "the key is stable");
    assert_eq!((report.retried, report.dead, report.done), (2, 2, 0));
    assert_eq!(queue.dead_letters().await.unwrap(), 2);
    assert_eq!(queue.pending().await.unwrap(), 0);
    let errors: Vec<String> = sqlx::query_scalar("SELECT error FROM failures_dead")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(errors.iter().any(|e| e == "smtp down"), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("no handler")),
        "{errors:?}"
    );
}

/// Retries back off with full jitter, by the database's clock: twenty
/// failures with a ceiling of an hour are spread over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_that_fail_together_come_back_spread_out() {
    let db = Database::create("jitter").await;
    let config = DurableConfig::new("jitter")
        .backoff(Duration::from_secs(3600))
        .block(Duration::from_millis(20));
    let queue = db.queue(config).await;
    for order in 0..20 {
        queue.enqueue(&Email { order }).await.unwrap();
    }
    let mut worker = queue.worker();
    worker.register(|_job: Email, _ctx| async { Err::<(), BoxError>("down".into()) });
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(1500)))
        .await;
    assert_eq!(report.retried, 20);
    let due: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (run_at - now()))::FLOAT8 FROM jitter WHERE attempt = 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(due.len(), 20);
    assert!(due.iter().all(|t| (-5.0..=3600.0).contains(t)), "{due:?}");
    let spread =
        due.iter().cloned().fold(f64::MIN, f64::max) - due.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 600.0, "spread over {spread} s only");
}

/// The idempotency pattern keeps at-least-once: a send that fails after the
/// effect was claimed is retried (the claim is released), a send recorded
/// done is not repeated when the attempt then fails, and a claim left by a
/// dead worker expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_effects_are_retried_after_failures_and_done_once() {
    let db = Database::create("effects").await;
    let config = DurableConfig::new("effects")
        .backoff(Duration::from_millis(20))
        .block(Duration::from_millis(20));
    let queue = db.queue(config).await;
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
    match queue
        .claim_effect("orphan", Duration::from_secs(1))
        .await
        .unwrap()
    {
        Effect::InProgress(later) => assert!(later.0 <= Duration::from_secs(3), "{later:?}"),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(matches!(
        queue
            .claim_effect("orphan", Duration::from_secs(1))
            .await
            .unwrap(),
        Effect::Claimed(_)
    ));
    // A record of a done effect is not taken by a late, expired claim.
    let Effect::Claimed(late) = queue
        .claim_effect("late", Duration::from_millis(200))
        .await
        .unwrap()
    else {
        panic!("free")
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Effect::Claimed(second) = queue
        .claim_effect("late", Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("expired")
    };
    assert!(
        second
            .done("second", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(!late.done("late", Duration::from_secs(60)).await.unwrap());
    assert!(matches!(
        queue.claim_effect("late", Duration::from_secs(1)).await.unwrap(),
        Effect::Done(r) if r == "second"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_job_in_progress_and_claims_no_other() {
    let db = Database::create("shutdown").await;
    let queue = db
        .queue(DurableConfig::new("shutdown").block(Duration::from_millis(20)))
        .await;
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    queue.enqueue(&Email { order: 2 }).await.unwrap();
    let seen = Seen::default();
    let started = Arc::new(AtomicU32::new(0));
    let worker = worker_recording(&queue, &seen, &started, Duration::from_millis(1000));
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
    assert_eq!(queue.pending().await.unwrap(), 0);
}

/// Replicas starting together create the tables once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_create_the_tables_once() {
    let db = Database::create("together").await;
    let mut starting = Vec::new();
    for _ in 0..8 {
        let pool = db.pool.clone();
        starting.push(tokio::spawn(async move {
            DurableQueue::postgres(pool, DurableConfig::new("together")).await
        }));
    }
    for s in starting {
        s.await.unwrap().unwrap();
    }
    let queue = db.queue(DurableConfig::new("together")).await;
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    assert!(
        queue
            .first_time("a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        !queue
            .first_time("a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    // A name that cannot be a table's is refused with a clear error.
    let long = "x".repeat(60);
    let refused = DurableQueue::postgres(db.pool.clone(), DurableConfig::new(long)).await;
    assert!(
        refused.unwrap_err().to_string().contains("table name"),
        "refused"
    );
}
