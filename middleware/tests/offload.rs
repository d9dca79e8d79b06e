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
    drop(gate);
    blocker.await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().status(), StatusCode::OK);
}
