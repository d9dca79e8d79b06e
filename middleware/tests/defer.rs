//! Deferred work: runs when CPU is cheap or the deadline nears, retries,
//! dead letters, and a drain that accounts for every job. Paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gratify::offload::{Defer, DeferConfig, DeferError};
use gratify::{BoxError, CostModel, LoadSignal, LoadSnapshot};

fn model() -> CostModel {
    CostModel::from_toml(
        r#"
        default_class = "email"
        [classes.email]
        delay_cost = { shape = "linear", per_second = 0.01, deadline = "60s" }
        refusal_cost = 1.0
        [classes.invoice]
        delay_cost = { shape = "linear", per_second = 5.0, deadline = "1h" }
        refusal_cost = 10.0
        "#,
    )
    .unwrap()
}

type Log = Arc<Mutex<Vec<String>>>;

fn job(
    log: &Log,
    name: &'static str,
) -> impl Fn() -> std::future::Ready<Result<(), BoxError>> + Send + Sync + 'static {
    let log = Arc::clone(log);
    move || {
        log.lock().unwrap().push(name.to_owned());
        std::future::ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn under_load_cheap_jobs_wait_and_run_when_idle_or_near_their_deadline() {
    let m = model();
    let signal = LoadSignal::new();
    // Busy: a slot-second costs 10 (shadow price 0.1 over 10 ms).
    signal.publish(
        LoadSnapshot::new(1.5, Duration::from_millis(50), 0.1)
            .with_latency(Duration::from_millis(10)),
    );
    let defer = Defer::start(&m, Some(signal.clone()), DeferConfig::default());
    let log = Log::default();
    defer
        .spawn("email", m.id("email").unwrap(), job(&log, "email"))
        .unwrap();
    defer
        .spawn("invoice", m.id("invoice").unwrap(), job(&log, "invoice"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The invoice (urgency 5 + 10/3600) still waits at a price of 10; so does the e-mail.
    assert!(log.lock().unwrap().is_empty());
    // Load falls to a price of 2: the invoice's delay now costs more than the CPU.
    signal.publish(
        LoadSnapshot::new(0.9, Duration::ZERO, 0.02).with_latency(Duration::from_millis(10)),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*log.lock().unwrap(), ["invoice"]);
    // The e-mail (0.01/s + 1/60) waits until its 60 s deadline nears.
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(log.lock().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(*log.lock().unwrap(), ["invoice", "email"]);
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_backoff_then_dead_lettered() {
    let m = model();
    let config = DeferConfig::default()
        .max_attempts(3)
        .backoff(Duration::from_secs(1));
    let defer = Defer::start(&m, None, config);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a = Arc::clone(&attempts);
    defer
        .spawn("flaky", m.default_class(), move || {
            a.lock().unwrap().push(tokio::time::Instant::now());
            std::future::ready(Err::<(), BoxError>("smtp down".into()))
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let times = attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 3);
    // Each wait is drawn between half its doubling ceiling and all of it
    // (1 s, then 2 s), and noticed within a poll (50 ms).
    let poll = Duration::from_millis(50);
    let (first, second) = (times[1] - times[0], times[2] - times[1]);
    assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1) + poll);
    assert!(second >= Duration::from_secs(1) && second <= Duration::from_secs(2) + poll);
    let stats = defer.stats();
    assert_eq!((stats.retries, stats.dead), (2, 1));
    let report = defer.drain(Duration::from_secs(1)).await;
    assert_eq!(report.dead, ["flaky"]);
}

/// Jobs that fail together come back spread over their backoff, not
/// together (a downstream that just failed them all is not hit again by
/// all of them at once).
#[tokio::test(start_paused = true)]
async fn retries_that_fail_together_come_back_spread_out() {
    let m = model();
    let config = DeferConfig::default()
        .max_attempts(2)
        .concurrency(32)
        .backoff(Duration::from_secs(10));
    let defer = Defer::start(&m, None, config);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let start = tokio::time::Instant::now();
    for i in 0..20 {
        let a = Arc::clone(&attempts);
        defer
            .spawn(format!("job-{i}"), m.default_class(), move || {
                a.lock().unwrap().push(tokio::time::Instant::now());
                std::future::ready(Err::<(), BoxError>("downstream down".into()))
            })
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(11)).await;
    let times = attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 40, "every job ran twice");
    let mut retries: Vec<Duration> = times
        .iter()
        .map(|t| *t - start)
        .filter(|d| *d > Duration::from_millis(1))
        .collect();
    retries.sort();
    retries.dedup();
    // Twenty draws over 5–10 s, noticed at 50 ms polls: all alike only if
    // the waits were not drawn (without jitter they were one instant).
    assert!(retries.len() >= 10, "{retries:?}");
    assert!(
        retries
            .iter()
            .all(|d| *d >= Duration::from_secs(5) && *d <= Duration::from_millis(10_050)),
        "{retries:?}"
    );
    let _ = defer.drain(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn drain_accounts_for_every_job_and_the_queue_is_bounded() {
    let m = model();
    let config = DeferConfig::default().max_queue(3).concurrency(1);
    let signal = LoadSignal::new();
    signal.publish(
        LoadSnapshot::new(2.0, Duration::ZERO, 100.0).with_latency(Duration::from_millis(10)),
    );
    let defer = Defer::start(&m, Some(signal), config);
    let log = Log::default();
    let slow = |name: &'static str| {
        let log = Arc::clone(&log);
        move || {
            let log = Arc::clone(&log);
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                log.lock().unwrap().push(name.to_owned());
                Ok::<(), BoxError>(())
            }
        }
    };
    defer.spawn("a", m.default_class(), slow("a")).unwrap();
    defer.spawn("b", m.default_class(), slow("b")).unwrap();
    defer.spawn("c", m.default_class(), slow("c")).unwrap();
    assert_eq!(
        defer.spawn("d", m.default_class(), slow("d")),
        Err(DeferError::QueueFull)
    );
    // Draining runs them whatever the load; one at a time, 3 s each: within
    // 4 s "a" finishes, "b" is running (3 s to 6 s), "c" never started.
    let report = defer.drain(Duration::from_secs(4)).await;
    assert_eq!(report.ran, 1);
    assert_eq!(report.still_running, ["b"]);
    assert_eq!(report.not_run, ["c"]);
    assert_eq!(*log.lock().unwrap(), ["a"]);
    assert_eq!(
        defer.spawn("e", m.default_class(), slow("e")),
        Err(DeferError::Closed)
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_job_is_a_failed_attempt_and_frees_its_slot() {
    let m = model();
    let config = DeferConfig::default()
        .max_attempts(2)
        .concurrency(1)
        .backoff(Duration::from_millis(10));
    let defer = Defer::start(&m, None, config);
    defer
        .spawn("boom", m.default_class(), || async {
            panic!("job bug");
        })
        .unwrap();
    let log = Log::default();
    let l = Arc::clone(&log);
    defer
        .spawn("after", m.default_class(), move || {
            let l = Arc::clone(&l);
            async move {
                l.lock().unwrap().push("after".to_owned());
                Ok::<(), BoxError>(())
            }
        })
        .unwrap();
    let report = defer.drain(Duration::from_secs(5)).await;
    assert_eq!(report.dead, ["boom"]);
    assert!(report.not_run.is_empty(), "{report:?}");
    assert_eq!(*log.lock().unwrap(), ["after"]);
    let stats = defer.stats();
    assert_eq!((stats.running, stats.queued, stats.retries), (0, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn the_layer_hands_every_request_the_same_queue() {
    use gratify::core::classify::class_of;
    use gratify::offload::DeferLayer;
    use tower::{Layer, ServiceExt, service_fn};

    let m = model();
    let defer = Defer::start(&m, None, DeferConfig::default());
    let model_for_handler = m.clone();
    let service =
        DeferLayer::new(defer.clone()).layer(service_fn(move |request: http::Request<()>| {
            let m = model_for_handler.clone();
            async move {
                let queue = request
                    .extensions()
                    .get::<Defer>()
                    .cloned()
                    .ok_or("no Defer in extensions")?;
                let class = class_of(&request).unwrap_or(m.default_class());
                queue.spawn("receipt", class, || async { Ok(()) })?;
                Ok::<_, BoxError>(http::Response::new(()))
            }
        }));
    service.oneshot(http::Request::new(())).await.unwrap();
    let report = defer.drain(Duration::from_secs(1)).await;
    assert_eq!(report.ran, 1, "the job went into the shared queue");
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_factory_panics_is_a_failed_attempt_and_drain_does_not_wait_for_it() {
    let m = model();
    let config = DeferConfig::default()
        .max_attempts(2)
        .concurrency(1)
        .backoff(Duration::from_millis(10));
    let defer = Defer::start(&m, None, config);
    // Panics while making its future, before any future exists.
    defer
        .spawn(
            "bad-factory",
            m.default_class(),
            || -> std::future::Ready<Result<(), BoxError>> { panic!("factory bug") },
        )
        .unwrap();
    let started = tokio::time::Instant::now();
    let report = defer.drain(Duration::from_secs(60)).await;
    assert_eq!(report.dead, ["bad-factory"]);
    assert!(report.still_running.is_empty(), "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drained in {:?}, not at its deadline",
        started.elapsed()
    );
    assert_eq!(defer.stats().running, 0);
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_counted_all_and_named_within_a_bound() {
    let m = model();
    let config = DeferConfig::default()
        .max_attempts(1)
        .concurrency(1)
        .dead_letters_kept(3);
    let defer = Defer::start(&m, None, config);
    for i in 0..10 {
        defer
            .spawn(format!("job-{i}"), m.default_class(), || async {
                Err::<(), BoxError>("always fails".into())
            })
            .unwrap();
    }
    let report = defer.drain(Duration::from_secs(5)).await;
    assert_eq!(report.dead_total, 10);
    assert_eq!(report.dead, ["job-7", "job-8", "job-9"]);
    assert_eq!(defer.stats().dead, 10);
}

#[tokio::test(start_paused = true)]
async fn retries_wait_their_backoff_without_blocking_other_jobs() {
    let m = model();
    let config = DeferConfig::default()
        .max_attempts(3)
        .concurrency(1)
        .backoff(Duration::from_secs(10));
    let defer = Defer::start(&m, None, config);
    let log = Log::default();
    let tries = Arc::new(Mutex::new(0));
    let t = Arc::clone(&tries);
    defer
        .spawn("flaky", m.default_class(), move || {
            let t = Arc::clone(&t);
            async move {
                *t.lock().unwrap() += 1;
                Err::<(), BoxError>("down".into())
            }
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*tries.lock().unwrap(), 1);
    // While the retry waits out its 5–10 s, new work runs at once.
    defer
        .spawn("next", m.default_class(), job(&log, "next"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*log.lock().unwrap(), ["next"]);
    assert_eq!(*tries.lock().unwrap(), 1);
    // By 10.2 s the first retry ran (it waits at most 10 s), the second
    // not (it waits at least 10 s more).
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(*tries.lock().unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_job_of_a_class_the_model_does_not_know_blocks_no_other() {
    let m = model();
    // Busy: only jobs near their deadline run.
    let signal = LoadSignal::new();
    signal.publish(
        LoadSnapshot::new(1.5, Duration::from_millis(50), 0.1)
            .with_latency(Duration::from_millis(10)),
    );
    let defer = Defer::start(&m, Some(signal), DeferConfig::default());
    let log = Log::default();
    // An id from another model: treated as the default class (e-mail,
    // 60 s deadline), not as a class with no deadline that never runs.
    defer
        .spawn(
            "stray",
            gratify::ClassId::from_index(40),
            job(&log, "stray"),
        )
        .unwrap();
    defer
        .spawn("email", m.id("email").unwrap(), job(&log, "email"))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(*log.lock().unwrap(), ["stray", "email"]);
}
