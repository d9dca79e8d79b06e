//! The limiter under real contention: many tasks on a multi-threaded
//! runtime join, leave and are granted from the class queues at once, with
//! callers that give up at random moments. Whatever the interleaving, no
//! request runs without a slot, the limit is never overshot, every slot and
//! queue place is given back, and nobody waits forever.
//!
//! The clock is the real one (a paused clock needs one thread); nothing here
//! asserts a speed — the only bound on time is a generous guard against a
//! waiter that is never woken.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gratify_core::{ClassId, CostModel};
use gratify_scaling::limit::{
    AdaptiveLimitLayer, Admission, Fixed, Limiter, LimiterConfig, Reason,
};
use http::{Request, Response};
use proptest::prelude::*;
use tower::{Layer, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0 }
refusal_cost = 10000.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0 }
refusal_cost = 1000.0
[classes.batch]
delay_cost = { shape = "linear", per_second = 0.1 }
refusal_cost = 100.0
"#;

/// What one caller does.
#[derive(Debug, Clone)]
struct Call {
    class: u16,
    /// Times the inner service yields before answering.
    work: u8,
    /// The caller gives up after this many of its own yields (`None`: it
    /// waits for the answer).
    gives_up_after: Option<u8>,
}

fn call() -> impl Strategy<Value = Call> {
    (0u16..3, 0u8..6, prop::option::weighted(0.3, 0u8..8)).prop_map(
        |(class, work, gives_up_after)| Call {
            class,
            work,
            gives_up_after,
        },
    )
}

async fn yields(n: u8) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

/// What a run saw.
struct Seen {
    limiter: Limiter,
    /// The most requests inside the inner service at once.
    most_inside: usize,
    /// The longest any class's queue was seen, by a task that read the
    /// limiter's figures all along.
    longest_class_queue: usize,
}

/// Runs `calls` on their own tasks at once through one limiter.
fn run(
    limit: usize,
    admission: Admission,
    max_queue: usize,
    per_class: Option<usize>,
    calls: Vec<Call>,
) -> Seen {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let model = CostModel::from_toml(MODEL).unwrap();
        let mut config = LimiterConfig::default();
        config.admission = admission;
        config.max_queue = max_queue;
        config.max_queue_per_class = per_class;
        config.warmup_samples = 0;
        // Long enough that a waiter refused for its wait was never woken.
        config.max_queue_time = Duration::from_secs(30);
        let limiter = Limiter::with_algorithm(&model, Fixed::new(limit), config);
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let inner = {
            let (inside, most) = (inside.clone(), most.clone());
            service_fn(move |r: Request<u8>| {
                let (inside, most) = (inside.clone(), most.clone());
                async move {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Leaves the count even if the caller drops this future.
                    struct Out(Arc<AtomicUsize>);
                    impl Drop for Out {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _out = Out(inside);
                    yields(*r.body()).await;
                    Ok::<_, Infallible>(Response::new(()))
                }
            })
        };
        let svc = AdaptiveLimitLayer::with_limiter(limiter.clone()).layer(inner);
        let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let watcher = {
            let (limiter, watching) = (limiter.clone(), watching.clone());
            tokio::spawn(async move {
                let mut longest = 0;
                while watching.load(Ordering::SeqCst) {
                    let s = limiter.stats();
                    longest = s.classes.iter().map(|c| c.queued).fold(longest, usize::max);
                    tokio::task::yield_now().await;
                }
                longest
            })
        };
        let mut tasks = Vec::new();
        for c in calls {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = Request::new(c.work);
                r.extensions_mut().insert(ClassId::from_index(c.class));
                let answer = svc.oneshot(r);
                match c.gives_up_after {
                    Some(n) => {
                        tokio::select! {
                            a = answer => { a.unwrap(); }
                            () = yields(n) => {}
                        }
                    }
                    None => {
                        answer.await.unwrap();
                    }
                }
            }));
        }
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        // Liveness only: a waiter nobody wakes is refused at its queue
        // timeout, long before this.
        tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("every caller got an answer or gave up");
        watching.store(false, Ordering::SeqCst);
        Seen {
            limiter,
            most_inside: most.load(Ordering::SeqCst),
            longest_class_queue: watcher.await.unwrap(),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn slots_and_queue_places_are_never_lost_or_overshot(
        limit in 1usize..6,
        policy in 0..3,
        max_queue in prop::sample::select(vec![2usize, 8, 1024]),
        per_class in prop::option::of(1usize..4),
        calls in prop::collection::vec(call(), 50..300),
    ) {
        let shares = vec![0.5, 0.3, 0.2];
        let admission = match policy {
            0 => Admission::DelayCost,
            1 => Admission::Fifo,
            _ => Admission::Partitioned(shares.clone()),
        };
        // Partitioned admission lets a class within its share past the
        // limit, never further.
        let bound = match admission {
            Admission::Partitioned(_) => {
                limit
                    + shares
                        .iter()
                        .map(|s| ((s * limit as f64).floor() as usize).max(1))
                        .sum::<usize>()
            }
            _ => limit,
        };
        let n = calls.len() as u64;
        let seen = run(limit, admission, max_queue, per_class, calls);
        let most = seen.most_inside;
        prop_assert!(most <= bound, "{most} inside at once against a bound of {bound}");
        if let Some(cap) = per_class {
            prop_assert!(
                seen.longest_class_queue <= cap,
                "a class queue of {} against a cap of {cap}",
                seen.longest_class_queue
            );
        }
        prop_assert!(seen.longest_class_queue <= max_queue);
        let s = seen.limiter.stats();
        prop_assert_eq!(s.in_flight, 0, "{:?}", s);
        prop_assert_eq!(s.queued, 0, "{:?}", s);
        let mut answered = 0;
        for c in &s.classes {
            prop_assert_eq!(c.queued, 0, "{:?}", s);
            prop_assert_eq!(c.in_flight, 0, "{:?}", s);
            prop_assert_eq!(c.admitted, c.completed, "{:?}", s);
            // Nobody waited out the queue timeout: a waiter is woken when
            // a slot frees, however the threads interleave.
            prop_assert_eq!(c.shed_for(Reason::QueueTimeout), 0, "{:?}", s);
            answered += c.admitted + c.shed_total();
        }
        // Every request was admitted or refused — except those whose caller
        // left while queued (neither).
        prop_assert!(answered <= n, "{answered} decisions for {n} requests");
    }
}
