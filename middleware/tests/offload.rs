//! The CPU pool and the offload layer.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gratify::CostModel;
use gratify::offload::{CpuPool, OffloadError, OffloadLayer, Offloader};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};

fn model() -> CostModel {
    CostModel::from_toml(
        r#"
        default_class = "batch"
        [classes.checkout]
        delay_cost = { shape = "linear", per_second = 20.0, deadline = "30s" }
        refusal_cost = 10.0
        [classes.batch]
        delay_cost = { shape = "linear", per_second = 0.1, deadline = "60s" }
        refusal_cost = 1.0
        "#,
    )
    .unwrap()
}

/// Occupies the pool's only thread until the returned sender is dropped;
/// returns once the blocking job is running.
async fn block(pool: &CpuPool) -> (mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let job = pool.run(f64::MAX, None, move || {
        let _ = started_tx.send(());
        let _ = rx.recv();
    });
    let handle = tokio::spawn(async move {
        let _ = job.await;
    });
    while started_rx.try_recv().is_err() {
        tokio::task::yield_now().await;
        std::thread::yield_now();
    }
    (tx, handle)
}

/// Waits until `n` jobs are queued.
async fn wait_queued(pool: &CpuPool, n: usize) {
    while pool.stats().queued < n {
        tokio::task::yield_now().await;
        std::thread::yield_now();
    }
}

#[tokio::test]
async fn the_most_urgent_work_runs_first() {
    let m = model();
    let pool = CpuPool::new(Some(1), 100);
    let off = Offloader::new(pool.clone(), &m);
    let (gate, blocker) = block(&pool).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut jobs = Vec::new();
    for (i, (name, class)) in [
        ("batch-1", "batch"),
        ("batch-2", "batch"),
        ("checkout", "checkout"),
    ]
    .into_iter()
    .enumerate()
    {
        let order = Arc::clone(&order);
        let off = off.clone();
        let id = m.id(class).unwrap();
        jobs.push(tokio::spawn(async move {
            off.run(id, move || order.lock().unwrap().push(name))
                .await
                .unwrap();
        }));
        wait_queued(&pool, i + 1).await;
    }
    drop(gate);
    blocker.await.unwrap();
    for j in jobs {
        j.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["checkout", "batch-1", "batch-2"]);
}

#[tokio::test]
async fn a_full_queue_refuses_and_panics_do_not_kill_threads() {
    let pool = CpuPool::new(Some(1), 2);
    let (gate, blocker) = block(&pool).await;
    let a = tokio::spawn(pool.run(1.0, None, || 1));
    let b = tokio::spawn(pool.run(1.0, None, || 2));
    wait_queued(&pool, 2).await;
    assert_eq!(
        pool.run(1.0, None, || 3).await,
        Err(OffloadError::QueueFull)
    );
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(a.await.unwrap(), Ok(1));
    assert_eq!(b.await.unwrap(), Ok(2));
    let panicked = pool.run(1.0, None, || -> u32 { panic!("job bug") }).await;
    assert_eq!(panicked, Err(OffloadError::Panicked));
    assert_eq!(
        pool.run(1.0, None, || 4).await,
        Ok(4),
        "the thread lives on"
    );
    let s = pool.stats();
    assert_eq!((s.refused, s.panicked), (1, 1));
}

#[tokio::test]
async fn work_whose_caller_left_is_dropped_unrun() {
    let pool = CpuPool::new(Some(1), 10);
    let (gate, blocker) = block(&pool).await;
    let ran = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&ran);
    let job = pool.run(1.0, None, move || *flag.lock().unwrap() = true);
    drop(job);
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(pool.run(1.0, None, || ()).await, Ok(()));
    assert!(!*ran.lock().unwrap());
    assert_eq!(pool.stats().dropped, 1);
}

#[tokio::test]
async fn shutdown_drains_then_refuses() {
    let pool = CpuPool::new(Some(2), 10);
    let jobs: Vec<_> = (0..5)
        .map(|i| tokio::spawn(pool.run(1.0, None, move || i)))
        .collect();
    let left = tokio::task::spawn_blocking({
        let pool = pool.clone();
        move || pool.shutdown(Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert_eq!(left, 0);
    for (i, j) in jobs.into_iter().enumerate() {
        assert_eq!(j.await.unwrap(), Ok(i));
    }
    assert_eq!(pool.run(1.0, None, || 9).await, Err(OffloadError::Shutdown));
}

#[tokio::test]
async fn the_layer_runs_handlers_on_the_pool_with_the_runtime_at_hand() {
    let m = model();
    let pool = CpuPool::new(Some(1), 1);
    let layer = OffloadLayer::new(pool.clone(), &m);
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        // A timer inside the offloaded future still works.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if req.uri().path() == "/panic" {
            panic!("handler bug");
        }
        let name = std::thread::current().name().unwrap_or("").to_owned();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
    }));
    let r = svc
        .clone()
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"gratify-cpu-"), "{body:?}");
    let r = svc
        .clone()
        .oneshot(Request::get("/panic").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // Queue of one: with the thread busy and one waiting, the next is refused.
    let (gate, blocker) = block(&pool).await;
    let waiting = tokio::spawn(svc.clone().oneshot(Request::get("/").body(()).unwrap()));
    wait_queued(&pool, 1).await;
    let refused = svc
        .clone()
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    // Shaped as the limiter's refusals are.
    assert_eq!(refused.headers()["x-gratify-shed"], "offload-queue-full");
    assert_eq!(refused.headers()["cache-control"], "no-store");
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn an_abandoned_job_leaves_the_queue_when_its_caller_does() {
    let pool = CpuPool::new(Some(1), 1);
    let (gate, blocker) = block(&pool).await;
    let ran = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&ran);
    let cheap = tokio::spawn(pool.run(0.001, None, move || *flag.lock().unwrap() = true));
    wait_queued(&pool, 1).await;
    // The caller hangs up while the only thread is busy.
    cheap.abort();
    let _ = cheap.await;
    assert_eq!(pool.stats().queued, 0, "out of the queue at once");
    // The one queue slot is free for the next job, however urgent.
    let urgent = tokio::spawn(pool.run(1000.0, None, || "urgent"));
    wait_queued(&pool, 1).await;
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(urgent.await.unwrap(), Ok("urgent"));
    assert!(!*ran.lock().unwrap());
    assert_eq!(pool.stats().dropped, 1);
}

#[tokio::test]
async fn a_full_queue_displaces_its_cheapest_job_never_a_more_valuable_one() {
    let pool = CpuPool::new(Some(1), 2);
    let (gate, blocker) = block(&pool).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let job = |name: &'static str, priority: f64| {
        let order = Arc::clone(&order);
        tokio::spawn(pool.run(priority, None, move || order.lock().unwrap().push(name)))
    };
    let cheap_1 = job("cheap-1", 1.0);
    wait_queued(&pool, 1).await;
    let cheap_2 = job("cheap-2", 1.0);
    wait_queued(&pool, 2).await;
    // Full: an urgent job takes the place of the cheapest (the newer of the
    // two equals)...
    let urgent = job("urgent", 100.0);
    assert_eq!(cheap_2.await.unwrap(), Err(OffloadError::QueueFull));
    // ...and a cheap arrival displaces nothing.
    assert_eq!(
        pool.run(0.5, None, || ()).await,
        Err(OffloadError::QueueFull)
    );
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(urgent.await.unwrap(), Ok(()));
    assert_eq!(cheap_1.await.unwrap(), Ok(()));
    assert_eq!(*order.lock().unwrap(), ["urgent", "cheap-1"]);
    let s = pool.stats();
    assert_eq!((s.displaced, s.refused), (1, 2));
}

#[tokio::test]
async fn a_job_still_queued_at_its_deadline_is_answered_then_and_never_runs() {
    let pool = CpuPool::new(Some(1), 10);
    let (gate, blocker) = block(&pool).await;
    let ran = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&ran);
    // The only thread stays busy: the answer cannot come from a thread
    // reaching the job, only from its deadline.
    let answer = pool
        .run(1.0, Some(Duration::from_millis(30)), move || {
            *flag.lock().unwrap() = true;
        })
        .await;
    assert_eq!(answer, Err(OffloadError::Deadline));
    assert_eq!(pool.stats().queued, 0);
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(pool.run(1.0, None, || ()).await, Ok(()));
    assert!(!*ran.lock().unwrap(), "never started late");
    assert_eq!(pool.stats().expired, 1);
}

#[tokio::test]
async fn work_that_cannot_finish_in_what_is_left_is_refused_at_once() {
    let pool = CpuPool::new(Some(1), 10);
    let deadline = std::time::Instant::now() + Duration::from_millis(100);
    // A job expected to run a second cannot fit in 100 ms.
    let refused = pool
        .run_until(1.0, Some(deadline), Duration::from_secs(1), || ())
        .await;
    assert_eq!(refused, Err(OffloadError::Deadline));
    assert_eq!(pool.stats().done, 0);
    // Nor can any job whose deadline has already passed.
    let past = std::time::Instant::now();
    assert_eq!(
        pool.run_until(1.0, Some(past), Duration::ZERO, || ()).await,
        Err(OffloadError::Deadline)
    );
    // Both refused at once, neither queued then expired.
    let s = pool.stats();
    assert_eq!((s.refused, s.expired, s.queued), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_urgent_work_does_not_starve_a_cheap_job() {
    // Priority doubles every 10 ms of waiting: a job 1,000 times cheaper
    // overtakes fresh urgent work after about 100 ms.
    let pool = CpuPool::new(Some(1), 1000).aging(Duration::from_millis(10));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (gate, blocker) = block(&pool).await;
    let cheap = {
        let order = Arc::clone(&order);
        tokio::spawn(pool.run(1.0, None, move || order.lock().unwrap().push(usize::MAX)))
    };
    wait_queued(&pool, 1).await;
    // Urgent work is already waiting when the thread frees up: it goes
    // first, and keeps arriving.
    let mut urgent = Vec::new();
    let urgent_job = |i: usize| {
        let order = Arc::clone(&order);
        pool.run(1000.0, None, move || {
            std::thread::sleep(Duration::from_millis(1));
            order.lock().unwrap().push(i);
        })
    };
    for i in 0..5 {
        urgent.push(tokio::spawn(urgent_job(i)));
    }
    wait_queued(&pool, 6).await;
    drop(gate);
    blocker.await.unwrap();
    // A thousand urgent jobs of about a millisecond each, a few always
    // waiting: without aging the cheap job would run last.
    for i in 5..1000 {
        while pool.stats().queued > 4 {
            tokio::task::yield_now().await;
        }
        urgent.push(tokio::spawn(urgent_job(i)));
    }
    cheap.await.unwrap().unwrap();
    for u in urgent {
        u.await.unwrap().unwrap();
    }
    let order = order.lock().unwrap();
    let at = order.iter().position(|x| *x == usize::MAX).unwrap();
    assert!(at > 0, "urgent work waiting ran first");
    assert!(at < 900, "the cheap job ran {at}th of {}", order.len());
}

#[tokio::test]
async fn the_pool_spends_what_is_left_of_the_requests_budget() {
    // Checkout has 30 s from its arrival. A request that arrived 31 s ago
    // (it waited in the limiter's queue, say) has nothing left: refused at
    // once, its handler never run.
    let m = model();
    let pool = CpuPool::new(Some(1), 10);
    let ran = Arc::new(Mutex::new(0));
    let count = Arc::clone(&ran);
    let svc = OffloadLayer::new(pool.clone(), &m).layer(service_fn(move |_: Request<()>| {
        let count = Arc::clone(&count);
        async move {
            *count.lock().unwrap() += 1;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    }));
    let now = std::time::Instant::now();
    // A clock younger than 31 s (a freshly booted machine) cannot say
    // "31 s ago": nothing to test there.
    let Some(long_ago) = now.checked_sub(Duration::from_secs(31)) else {
        return;
    };
    let request = |arrived: std::time::Instant| {
        let mut r = Request::get("/pay").body(()).unwrap();
        r.extensions_mut().insert(m.id("checkout").unwrap());
        r.extensions_mut()
            .insert(gratify::core::classify::Arrived(arrived));
        r
    };
    let late = svc.clone().oneshot(request(long_ago)).await.unwrap();
    assert_eq!(late.status(), StatusCode::SERVICE_UNAVAILABLE);
    let fresh = svc.clone().oneshot(request(now)).await.unwrap();
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_eq!(
        *ran.lock().unwrap(),
        1,
        "the late request's handler never ran"
    );
}

#[tokio::test]
async fn dropping_the_last_handle_still_runs_what_was_queued() {
    let pool = CpuPool::new(Some(2), 10);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let jobs: Vec<_> = (0..4)
        .map(|_| {
            let done = Arc::clone(&done);
            tokio::spawn(pool.run(1.0, None, move || {
                std::thread::sleep(Duration::from_millis(5));
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }))
        })
        .collect();
    drop(pool);
    // Every job queued before the drop still runs.
    for j in jobs {
        assert_eq!(j.await.unwrap(), Ok(()));
    }
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 4);
}

#[tokio::test]
async fn shutdown_async_waits_off_the_runtime() {
    let pool = CpuPool::new(Some(1), 10);
    let job = tokio::spawn(pool.run(1.0, None, || 7));
    assert_eq!(pool.shutdown_async(Duration::from_secs(5)).await, 0);
    assert_eq!(job.await.unwrap(), Ok(7));
    assert_eq!(pool.run(1.0, None, || 8).await, Err(OffloadError::Shutdown));
}

/// Every refusal in one shape: the limit's and the CPU pool's, both with a
/// JSON body, carry the same headers and the same fields, differing only in
/// who refused and why.
#[tokio::test]
async fn refusals_of_the_limit_and_the_pool_have_one_shape_with_a_json_body() {
    use gratify::refusal::RefusalBody;
    let stack = gratify::Stack::from_config(
        r#"
        default_class = "batch"
        [classes.batch]
        delay_cost = { shape = "linear", per_second = 0.1 }
        refusal_cost = 1.0
        [limit]
        algorithm = "fixed"
        fixed_limit = 1
        max_queue = 0
        refusal_body = "json"
        "#,
    )
    .unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let app = stack.layer(service_fn({
        let release = Arc::clone(&release);
        move |_req: Request<Full<Bytes>>| {
            let release = Arc::clone(&release);
            async move {
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        }
    }));
    let holder = tokio::spawn(
        app.clone()
            .oneshot(Request::get("/").body(Full::default()).unwrap()),
    );
    while stack.limiter().unwrap().stats().in_flight < 1 {
        tokio::task::yield_now().await;
    }
    let by_limit = app
        .clone()
        .oneshot(Request::get("/").body(Full::default()).unwrap())
        .await
        .unwrap();

    let pool = CpuPool::new(Some(1), 1);
    let offload = OffloadLayer::new(pool.clone(), &model())
        .refusal_body(RefusalBody::json())
        .layer(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }));
    let (gate, blocker) = block(&pool).await;
    let waiting = tokio::spawn(offload.clone().oneshot(Request::get("/").body(()).unwrap()));
    wait_queued(&pool, 1).await;
    let by_pool = offload
        .clone()
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    let mut seen = Vec::new();
    for (response, by) in [
        (by_limit.map(|b| b.boxed_unsync()), "limit"),
        (by_pool.map(|b| b.boxed_unsync()), "offload"),
    ] {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{by}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "application/json", "{by}");
        assert_eq!(headers["cache-control"], "no-store", "{by}");
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1, "{by}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let e = &v["error"];
        assert_eq!(e["code"], "overloaded", "{by}: {v}");
        assert_eq!(e["by"], by);
        assert_eq!(
            e["reason"],
            headers["x-gratify-shed"].to_str().unwrap(),
            "{by}"
        );
        assert_eq!(e["retry_after"].as_u64(), Some(retry), "{by}");
        let mut names: Vec<String> = headers.keys().map(|k| k.to_string()).collect();
        names.sort();
        let mut fields: Vec<String> = e.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        seen.push((names, fields));
    }
    assert_eq!(
        seen[0], seen[1],
        "the same headers and fields, whoever refused"
    );

    release.notify_one();
    assert_eq!(holder.await.unwrap().unwrap().status(), StatusCode::OK);
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().status(), StatusCode::OK);
}
