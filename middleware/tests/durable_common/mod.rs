//! What the durable-work suites of both backends share: the job, the
//! recording worker, and the sequences that must hold on either.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gratify::BoxError;
use gratify::offload::durable::{DurableJob, DurableQueue, Effect, Worker};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub(crate) struct Email {
    pub(crate) order: u32,
}

impl DurableJob for Email {
    const NAME: &'static str = "email";
}

/// How many times each order's e-mail ran to completion.
pub(crate) type Seen = Arc<Mutex<HashMap<u32, u32>>>;

/// A worker whose handler counts its starts in `started` and its
/// completions per order in `seen`.
pub(crate) fn worker_recording(
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

/// Runs `worker` on a task and kills it `into_job` after it has started a
/// job (a job of `worker_recording` bumps `started`), however slowly this
/// machine starts a worker; after 5 s with no job left to start, kills it
/// then.
pub(crate) async fn kill_mid_job(worker: Worker, started: &AtomicU32, into_job: Duration) {
    let before = started.load(Ordering::SeqCst);
    let task = tokio::spawn(async move { worker.run(std::future::pending()).await });
    let until = Instant::now() + Duration::from_secs(5);
    while started.load(Ordering::SeqCst) == before && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(into_job).await;
    task.abort();
    let _ = task.await;
}

pub(crate) async fn wait_for(mut done: impl FnMut() -> bool, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// The idempotency pattern keeps at-least-once, on `queue` (its backoff and
/// block short): a send that fails after the effect was claimed is retried
/// (the claim is released), and a send recorded done is not repeated when
/// the attempt then fails.
pub(crate) async fn effects_are_retried_after_failures_and_done_once(queue: &DurableQueue) {
    // Order 1: the send fails on the first attempt. Order 2: the send
    // succeeds and is recorded, then the attempt fails anyway.
    queue.enqueue(&Email { order: 1 }).await.unwrap();
    queue.enqueue(&Email { order: 2 }).await.unwrap();
    let sent = Seen::default();
    let attempts = Seen::default();
    let mut worker = queue.worker();
    let (q, s, a) = (queue.clone(), Arc::clone(&sent), Arc::clone(&attempts));
    worker.register(move |job: Email, ctx| {
        let (q, s, a) = (q.clone(), Arc::clone(&s), Arc::clone(&a));
        async move {
            let attempt = {
                let mut a = a.lock().unwrap();
                let n = a.entry(job.order).or_default();
                *n += 1;
                *n
            };
            match q.claim_effect(&ctx.key, Duration::from_secs(60)).await? {
                Effect::Claimed(claim) => {
                    if job.order == 1 && attempt == 1 {
                        claim.release().await?;
                        return Err::<(), BoxError>("smtp down".into());
                    }
                    *s.lock().unwrap().entry(job.order).or_default() += 1;
                    if !claim.done("sent", Duration::from_secs(600)).await? {
                        return Err("the claim was lost".into());
                    }
                    if job.order == 2 && attempt == 1 {
                        return Err("the worker stumbled after sending".into());
                    }
                    Ok(())
                }
                Effect::Done(result) if result == "sent" => Ok(()),
                Effect::InProgress(later) => Err(later.into()),
                _ => Err("an unexpected state".into()),
            }
        }
    });
    let report = worker
        .run(tokio::time::sleep(Duration::from_millis(1500)))
        .await;
    assert_eq!(report.done, 2, "{report:?}");
    assert_eq!(
        *sent.lock().unwrap(),
        HashMap::from([(1, 1), (2, 1)]),
        "each sent once"
    );
    assert_eq!(*attempts.lock().unwrap(), HashMap::from([(1, 2), (2, 2)]));
}
