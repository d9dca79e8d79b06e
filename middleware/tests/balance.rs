//! The cost-aware balancer: choices by expected completion for the call's
//! class, failures that never look fast, ejection and re-admission, and
//! calls in flight accounted for on every path. Time runs on tokio's paused
//! clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use gratify::CostModel;
use gratify::balance::CallContext;
use gratify::balance::p2c::{BalanceConfig, CostBalance};
use http::{Request, Response, StatusCode};
use tower::discover::ServiceList;
use tower::{Service, ServiceExt};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0 }
refusal_cost = 1.0
[classes.batch]
delay_cost = { shape = "linear", per_second = 0.1 }
refusal_cost = 1.0
"#;

type Hits = Arc<Mutex<HashMap<&'static str, usize>>>;

/// A replica named `name` that takes `ms(class)` and answers `status`.
#[derive(Clone)]
struct Replica {
    name: &'static str,
    hits: Hits,
    ms: fn(&str) -> u64,
    status: StatusCode,
    /// A refusal for load (a limiter's header on the status).
    shed: bool,
}

impl Service<Request<()>> for Replica {
    type Response = Response<&'static str>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<&'static str>, Infallible>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        *self.hits.lock().unwrap().entry(self.name).or_default() += 1;
        let class = req
            .extensions()
            .get::<CallContext>()
            .and_then(CallContext::class)
            .map_or_else(|| "browse".to_owned(), |c| c.to_string());
        let ms = (self.ms)(&class);
        let (name, status, shed) = (self.name, self.status, self.shed);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut r = Response::new(name);
            *r.status_mut() = status;
            if shed {
                r.headers_mut().insert(
                    gratify::refusal::SHED_REASON_HEADER,
                    http::HeaderValue::from_static("queue-full"),
                );
            }
            Ok(r)
        })
    }
}

fn replica(name: &'static str, hits: &Hits, ms: fn(&str) -> u64) -> Replica {
    Replica {
        name,
        hits: Arc::clone(hits),
        ms,
        status: StatusCode::OK,
        shed: false,
    }
}

fn model() -> CostModel {
    CostModel::from_toml(MODEL).unwrap()
}

fn of(class: &str) -> Request<()> {
    let mut r = Request::new(());
    r.extensions_mut()
        .insert(CallContext::new().with_class(class.to_owned()));
    r
}

async fn call<S>(balance: &mut S, req: Request<()>) -> Response<&'static str>
where
    S: Service<Request<()>, Response = Response<&'static str>, Error = gratify::BoxError>,
{
    balance.ready().await.unwrap().call(req).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_classes_of_the_work_in_flight_decide_not_its_count() {
    let hits = Hits::default();
    // "a" serves checkouts in 10 ms and batch jobs in 2 s; "b" in 40 ms
    // and 3 s.
    let replicas = vec![
        replica("a", &hits, |c| if c == "batch" { 2_000 } else { 10 }),
        replica("b", &hits, |c| if c == "batch" { 3_000 } else { 40 }),
    ];
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        1,
    );
    // Two replicas: every call compares both. Learn checkouts and batch
    // jobs on each.
    for _ in 0..20 {
        call(&mut balance, of("checkout")).await;
    }
    for _ in 0..2 {
        call(&mut balance, of("batch")).await;
    }
    {
        let hits = hits.lock().unwrap();
        assert!(hits["a"] >= 2 && hits["b"] >= 2, "{hits:?}");
    }
    // A batch job in flight on "a" (the faster for it), then a checkout in
    // flight on "b" (not behind the batch job).
    hits.lock().unwrap().clear();
    let batch = tokio::spawn(balance.ready().await.unwrap().call(of("batch")));
    tokio::task::yield_now().await;
    let checkout = tokio::spawn(balance.ready().await.unwrap().call(of("checkout")));
    tokio::task::yield_now().await;
    assert_eq!(hits.lock().unwrap().get("a"), Some(&1), "the batch job");
    assert_eq!(hits.lock().unwrap().get("b"), Some(&1), "the checkout");
    // One call in flight on each: a count ties, and a replica's own speed
    // says "a". Two seconds of batch work are ahead there: "b".
    let next = call(&mut balance, of("checkout")).await;
    assert_eq!(*next.body(), "b", "sent behind a batch job");
    batch.await.unwrap().unwrap();
    checkout.await.unwrap().unwrap();
}

fn broken_fleet(hits: &Hits) -> Vec<Replica> {
    let mut broken = replica("broken", hits, |_| 1);
    broken.status = StatusCode::SERVICE_UNAVAILABLE;
    vec![
        replica("ok-1", hits, |_| 20),
        replica("ok-2", hits, |_| 20),
        broken,
    ]
}

async fn failures_in<S>(balance: &mut S, calls: usize) -> usize
where
    S: Service<Request<()>, Response = Response<&'static str>, Error = gratify::BoxError>,
{
    let mut failures = 0;
    for _ in 0..calls {
        if call(balance, of("browse")).await.status().is_server_error() {
            failures += 1;
        }
    }
    failures
}

#[tokio::test(start_paused = true)]
async fn a_replica_failing_fast_never_looks_fast() {
    let hits = Hits::default();
    let mut balance = CostBalance::with_seed(
        ServiceList::new(broken_fleet(&hits)),
        &model(),
        BalanceConfig::default(),
        3,
    );
    // Least-latency would send it most calls (1 ms answers); each failure
    // counts as a second here.
    let failures = failures_in(&mut balance, 200).await;
    assert!(failures <= 2, "{failures} failures of 200");
}

#[tokio::test(start_paused = true)]
async fn a_replica_failing_in_a_row_is_ejected_then_readmitted() {
    let hits = Hits::default();
    // Failures counted at their own (tiny) latency: only ejection keeps
    // calls from the broken replica.
    let mut config = BalanceConfig::default();
    config.failure_penalty = Duration::ZERO;
    let base = config.ejection.base_time;
    let mut balance =
        CostBalance::with_seed(ServiceList::new(broken_fleet(&hits)), &model(), config, 3);
    // 200 calls of ~20 ms: four seconds, well inside the ejection.
    let failures = failures_in(&mut balance, 200).await;
    assert_eq!(failures, 5, "ejected at the fifth failure in a row");
    assert_eq!(balance.ejected(), 1);
    // Once the ejection is over it is tried again (and, failing on, ejected
    // for twice as long).
    tokio::time::sleep(base).await;
    assert_eq!(balance.ejected(), 0);
    let again = failures_in(&mut balance, 50).await;
    assert_eq!(again, 5, "re-admitted, then out again");
    tokio::time::sleep(base).await;
    assert_eq!(balance.ejected(), 1, "the second ejection lasts longer");
    tokio::time::sleep(base).await;
    assert_eq!(balance.ejected(), 0);
}

#[tokio::test(start_paused = true)]
async fn no_more_than_the_allowed_share_is_ever_ejected() {
    let hits = Hits::default();
    let mut replicas = Vec::new();
    for name in ["x", "y"] {
        let mut r = replica(name, &hits, |_| 1);
        r.status = StatusCode::INTERNAL_SERVER_ERROR;
        replicas.push(r);
    }
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        5,
    );
    for _ in 0..100 {
        call(&mut balance, of("browse")).await;
    }
    // Both fail; half may be out: the other keeps taking calls.
    assert_eq!(balance.ejected(), 1);
    let hits = hits.lock().unwrap();
    assert!(hits["x"] >= 5 && hits["y"] >= 5, "{hits:?}");
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_or_failed_releases_its_place() {
    let hits = Hits::default();
    let replicas = vec![
        replica("a", &hits, |_| 1_000),
        replica("b", &hits, |_| 1_000),
    ];
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        2,
    );
    let a = balance.ready().await.unwrap().call(of("checkout"));
    let b = balance.ready().await.unwrap().call(of("checkout"));
    assert_eq!(balance.in_flight(), 2);
    drop(a);
    assert_eq!(balance.in_flight(), 1, "a dropped call leaves");
    let b = tokio::spawn(b);
    tokio::time::sleep(Duration::from_millis(10)).await;
    b.abort();
    let _ = b.await;
    assert_eq!(balance.in_flight(), 0, "an aborted call leaves");
    call(&mut balance, of("checkout")).await;
    assert_eq!(balance.in_flight(), 0, "a finished call leaves");
}

/// Makes `total` calls of `class`, `concurrency` at a time.
async fn concurrently<D>(
    balance: &mut CostBalance<D, Request<()>>,
    total: usize,
    concurrency: usize,
    class: &str,
) where
    D: tower::discover::Discover<Service = Replica> + Unpin,
    D::Key: std::hash::Hash + Clone,
    D::Error: Into<gratify::BoxError>,
{
    let mut running: JoinSet<Result<Response<&'static str>, gratify::BoxError>> = JoinSet::new();
    for _ in 0..total {
        while running.len() >= concurrency {
            running.join_next().await.unwrap().unwrap().unwrap();
        }
        let call = balance.ready().await.unwrap().call(of(class));
        running.spawn(call);
    }
    while let Some(done) = running.join_next().await {
        done.unwrap().unwrap();
    }
}

fn no_latency_rule() -> BalanceConfig {
    let mut config = BalanceConfig::default();
    config.ejection.latency_factor = 0.0;
    config
}

#[tokio::test(start_paused = true)]
async fn calls_go_to_the_replicas_expected_to_finish_sooner() {
    let hits = Hits::default();
    let replicas = vec![
        replica("fast-1", &hits, |_| 10),
        replica("fast-2", &hits, |_| 10),
        replica("slow", &hits, |_| 50),
    ];
    // The choice alone (no ejection): 30 calls in flight at a time.
    let mut balance =
        CostBalance::with_seed(ServiceList::new(replicas), &model(), no_latency_rule(), 7);
    concurrently(&mut balance, 3_000, 30, "browse").await;
    let hits = hits.lock().unwrap();
    assert_eq!(hits.values().sum::<usize>(), 3_000);
    // A random pick sends it a third; by expected completion it is worth a
    // call only when the fast ones have five times its queue.
    assert!(hits["slow"] < 300, "{hits:?}");
    assert!(hits["slow"] > 0, "never tried: {hits:?}");
}

#[tokio::test(start_paused = true)]
async fn a_replica_whose_latency_stands_out_is_ejected() {
    let hits = Hits::default();
    let replicas = vec![
        replica("a", &hits, |_| 10),
        replica("b", &hits, |_| 10),
        replica("c", &hits, |_| 12),
        replica("slow", &hits, |_| 100),
    ];
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        11,
    );
    // Enough load that the slow replica still takes calls, for an interval.
    concurrently(&mut balance, 40_000, 40, "browse").await;
    assert!(balance.is_ejected(&3), "the slow one");
    assert_eq!(balance.ejected(), 1, "only the slow one");
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_hangs_is_avoided_not_flooded() {
    let hits = Hits::default();
    let replicas = vec![
        replica("ok-1", &hits, |_| 10),
        replica("ok-2", &hits, |_| 10),
        replica("hangs", &hits, |_| 3_600_000),
    ];
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        4,
    );
    let mut timeouts = 0;
    for _ in 0..300 {
        let call = balance.ready().await.unwrap().call(of("checkout"));
        // The caller gives up after 300 ms (its deadline): the call is
        // dropped and teaches the balancer it took that long.
        if tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err()
        {
            timeouts += 1;
        }
    }
    assert!(
        timeouts <= 3,
        "{timeouts} calls of 300 sent to a replica that never answers"
    );
    assert_eq!(balance.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn quiet_traffic_never_ejects_a_healthy_replica() {
    let hits = Hits::default();
    let replicas = (0..4)
        .map(|_| replica("same", &hits, |_| 50))
        .collect::<Vec<_>>();
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        8,
    );
    // One call every ten seconds for an hour: estimates decay between
    // calls, but the latency rule judges only what an interval measured.
    for _ in 0..360 {
        call(&mut balance, of("browse")).await;
        assert_eq!(balance.ejected(), 0);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_serving_a_slower_class_is_not_an_outlier() {
    let hits = Hits::default();
    // Identical replicas; batch jobs take 200 times a checkout.
    let replicas = (0..4)
        .map(|_| replica("same", &hits, |c| if c == "batch" { 2_000 } else { 10 }))
        .collect::<Vec<_>>();
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        5,
    );
    let mut running: JoinSet<Result<Response<&'static str>, gratify::BoxError>> = JoinSet::new();
    for i in 0..20_000 {
        while running.len() >= 20 {
            running.join_next().await.unwrap().unwrap().unwrap();
        }
        let class = if i % 50 == 0 { "batch" } else { "checkout" };
        running.spawn(balance.ready().await.unwrap().call(of(class)));
        assert_eq!(balance.ejected(), 0, "after {i} calls");
    }
    while let Some(done) = running.join_next().await {
        done.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn replicas_that_shed_for_load_are_avoided_but_never_ejected() {
    let hits = Hits::default();
    let mut replicas = Vec::new();
    for name in ["x", "y", "z"] {
        let mut r = replica(name, &hits, |_| 1);
        r.status = StatusCode::SERVICE_UNAVAILABLE;
        r.shed = true;
        replicas.push(r);
    }
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        6,
    );
    // The whole fleet refusing for load: ejecting any would only shrink it.
    for _ in 0..200 {
        call(&mut balance, of("browse")).await;
    }
    assert_eq!(balance.ejected(), 0);
}

/// A `PropagateLayer` under the balancer (on each replica's client) ends a
/// call whose caller's deadline passes with `DeadlineExceeded`: that is the
/// caller gone, not the replica failing, and calls cut short by their
/// callers' deadlines never eject a healthy replica.
#[tokio::test(start_paused = true)]
async fn calls_cut_short_by_their_callers_deadlines_eject_no_replica() {
    use gratify::balance::{DeadlineExceeded, PropagateLayer};
    use tower::Layer;

    let hits = Hits::default();
    let replicas: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|n| PropagateLayer::new().layer(replica(n, &hits, |_| 100)))
        .collect();
    let mut balance = CostBalance::with_seed(
        ServiceList::new(replicas),
        &model(),
        BalanceConfig::default(),
        7,
    );
    for _ in 0..30 {
        let mut req = Request::new(());
        let deadline = (tokio::time::Instant::now() + Duration::from_millis(10)).into_std();
        req.extensions_mut()
            .insert(CallContext::new().with_deadline(deadline));
        let err = balance.ready().await.unwrap().call(req).await.unwrap_err();
        assert!(err.downcast_ref::<DeadlineExceeded>().is_some(), "{err}");
    }
    assert_eq!(
        balance.ejected(),
        0,
        "healthy replicas ejected for their callers' deadlines"
    );
    assert_eq!(balance.in_flight(), 0);
}

/// …but a replica that hangs is still ejected when every caller has a
/// deadline: a call cut short after running far longer than the other
/// replicas take for its class counts as the replica's failure.
#[tokio::test(start_paused = true)]
async fn a_hanging_replica_is_ejected_even_when_every_caller_has_a_deadline() {
    use gratify::balance::PropagateLayer;
    use tower::Layer;

    let hits = Hits::default();
    let replicas: Vec<_> = [
        replica("a", &hits, |_| 10),
        replica("b", &hits, |_| 10),
        replica("hangs", &hits, |_| 600_000),
    ]
    .into_iter()
    .map(|r| PropagateLayer::new().layer(r))
    .collect();
    // Estimates that fade within a second, so that the balancer tries the
    // replica it has learned to avoid every few seconds (by default every
    // minute or so).
    let mut config = BalanceConfig::default();
    config.decay = Duration::from_secs(1);
    let mut balance = CostBalance::with_seed(ServiceList::new(replicas), &model(), config, 11);
    let mut calls = 0;
    while balance.ejected() == 0 && calls < 20_000 {
        calls += 1;
        let mut req = Request::new(());
        let deadline = (tokio::time::Instant::now() + Duration::from_millis(200)).into_std();
        req.extensions_mut()
            .insert(CallContext::new().with_deadline(deadline));
        let _ = balance.ready().await.unwrap().call(req).await;
    }
    assert_eq!(
        balance.ejected(),
        1,
        "the hanging replica was never ejected ({calls} calls)"
    );
    assert!(balance.is_ejected(&2), "a healthy replica was ejected");
    assert_eq!(balance.in_flight(), 0);
}

/// The most urgent class weighs every ready replica: with batch work in
/// flight on seven replicas of eight, every checkout goes to the eighth,
/// where the better of two drawn at random would find it a quarter of the
/// time. A batch job (not urgent) still draws two.
#[tokio::test(start_paused = true)]
async fn the_most_urgent_class_weighs_every_replica() {
    let hits = Hits::default();
    let names = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    let replicas: Vec<Replica> = names
        .iter()
        .map(|n| replica(n, &hits, |c| if c == "batch" { 60_000 } else { 10 }))
        .collect();
    let mut balance =
        CostBalance::with_seed(ServiceList::new(replicas), &model(), no_latency_rule(), 3);
    // Batch jobs in flight until one replica alone has none.
    let mut batch = Vec::new();
    while hits.lock().unwrap().len() < 7 {
        batch.push(tokio::spawn(
            balance.ready().await.unwrap().call(of("batch")),
        ));
        tokio::task::yield_now().await;
    }
    let busy: Vec<&str> = hits.lock().unwrap().keys().copied().collect();
    assert_eq!(busy.len(), 7, "{busy:?}");
    let idle = names.iter().find(|n| !busy.contains(n)).unwrap();
    for _ in 0..20 {
        let answer = call(&mut balance, of("checkout")).await;
        assert_eq!(answer.body(), idle, "a checkout sent behind a batch job");
    }
    for b in batch {
        b.abort();
    }
}

/// Balancers of their own (one per caller process) that see the same fleet
/// alike do not all send their urgent calls to one replica: near-ties are
/// drawn at random.
#[tokio::test(start_paused = true)]
async fn separate_balancers_do_not_herd_their_urgent_calls() {
    let hits = Hits::default();
    let names = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    let replicas: Vec<Replica> = names
        .iter()
        .map(|n| replica(n, &hits, |_| 60_000))
        .collect();
    let mut calls = Vec::new();
    for seed in 0..8 {
        let mut balance = CostBalance::with_seed(
            ServiceList::new(replicas.clone()),
            &model(),
            no_latency_rule(),
            seed,
        );
        calls.push(tokio::spawn(
            balance.ready().await.unwrap().call(of("checkout")),
        ));
        tokio::task::yield_now().await;
    }
    let used = hits.lock().unwrap().len();
    assert!(
        used >= 3,
        "eight callers' checkouts on {used} replicas: {hits:?}"
    );
    for c in calls {
        c.abort();
    }
}
