//! Hedged calls: only for classes whose delay cost pays for them, within
//! their share of load, never under overload or for a call that may not be
//! repeated; the loser is cancelled. Time runs on tokio's paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use gratify::CostModel;
use gratify::balance::CallContext;
use gratify::balance::hedge::{HedgeConfig, HedgeLayer};
use http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "prefetch"
[prices]
slot_second = 1.0
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0 }
refusal_cost = 10.0
[classes.prefetch]
delay_cost = { shape = "linear", per_second = 0.001 }
refusal_cost = 0.01
"#;

fn model() -> CostModel {
    CostModel::from_toml(MODEL).unwrap()
}

/// The latency of the `i`-th call: 4% take 500 ms, 6% 50 ms, the rest
/// 10 ms (so the 95th percentile is 50 ms).
fn pattern(i: u32) -> u64 {
    // Scrambled, so that no sampling by call count lines up with it.
    let mut z = u64::from(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    match (z ^ (z >> 31)) % 50 {
        0 | 1 => 500,
        2..=4 => 50,
        _ => 10,
    }
}

/// A server following `latency`, answering `refuse_every`-th calls with a
/// 503, counting calls; `cancelled` counts calls dropped before answering.
#[derive(Clone, Default)]
struct Server {
    calls: Arc<AtomicU32>,
    cancelled: Arc<AtomicU32>,
    refuse_every: u32,
}

/// Counts a call dropped before it answered.
struct Guard(Arc<AtomicU32>, bool);

impl Guard {
    fn answered(mut self) {
        self.1 = true;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Server {
    fn service(
        &self,
        latency: fn(u32) -> u64,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        let me = self.clone();
        service_fn(move |_: Request<()>| {
            let i = me.calls.fetch_add(1, Ordering::SeqCst);
            let guard = Guard(Arc::clone(&me.cancelled), false);
            let refuse = me.refuse_every > 0 && i.is_multiple_of(me.refuse_every);
            async move {
                tokio::time::sleep(Duration::from_millis(latency(i))).await;
                guard.answered();
                let mut r = Response::new(());
                if refuse {
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, Infallible>(r)
            }
        })
    }
}

fn get(class: &str) -> Request<()> {
    let mut r = Request::get("/stock/7").body(()).unwrap();
    r.extensions_mut()
        .insert(CallContext::new().with_class(class.to_owned()));
    r
}

/// Makes `n` calls one after another; their latencies, sorted.
async fn run<S>(client: &S, n: u32, make: impl Fn() -> Request<()>) -> Vec<Duration>
where
    S: Service<Request<()>, Response = Response<()>, Error = gratify::BoxError> + Clone,
{
    let mut took = Vec::new();
    for _ in 0..n {
        let start = tokio::time::Instant::now();
        client.clone().oneshot(make()).await.unwrap();
        took.push(start.elapsed());
    }
    took.sort();
    took
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() * 99 / 100]
}

#[tokio::test(start_paused = true)]
async fn the_tail_of_a_class_worth_it_is_hedged_within_its_share() {
    let server = Server::default();
    let layer = HedgeLayer::new(&model(), HedgeConfig::default()).unwrap();
    let client = layer.clone().layer(server.service(pattern));
    let took = run(&client, 2_000, || get("checkout")).await;
    let plan = layer.plan("checkout").unwrap();
    assert!(plan.worth_it, "{plan:?}");
    // The 95th percentile, to the latency histogram's 1%.
    let delay = plan.delay.as_secs_f64();
    assert!((0.050..=0.0505).contains(&delay), "{plan:?}");
    // Without hedging 4% of calls take 500 ms: the p99 would be 500 ms.
    // Hedged after 50 ms, a slow call is answered by its copy.
    assert!(
        p99(&took) <= Duration::from_millis(70),
        "p99 {:?}",
        p99(&took)
    );
    let sent = server.calls.load(Ordering::SeqCst);
    assert!(
        f64::from(sent) <= 2_000.0 * 1.06,
        "{sent} calls for 2000: hedging added more than its share"
    );
    // Every hedge race has a loser, and each loser was cancelled.
    assert_eq!(server.cancelled.load(Ordering::SeqCst), sent - 2_000);
}

#[tokio::test(start_paused = true)]
async fn a_class_whose_delay_costs_little_is_never_hedged() {
    let server = Server::default();
    let layer = HedgeLayer::new(&model(), HedgeConfig::default()).unwrap();
    let client = layer.clone().layer(server.service(pattern));
    let took = run(&client, 1_000, || get("prefetch")).await;
    let plan = layer.plan("prefetch").unwrap();
    assert!(!plan.worth_it, "{plan:?}");
    assert_eq!(server.calls.load(Ordering::SeqCst), 1_000);
    assert_eq!(p99(&took), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn nothing_is_hedged_while_the_servers_refuse_for_overload() {
    // One call in thirty refused: 3% of calls, above the 1% allowed.
    let server = Server {
        refuse_every: 30,
        ..Server::default()
    };
    let layer = HedgeLayer::new(&model(), HedgeConfig::default()).unwrap();
    let client = layer.clone().layer(server.service(pattern));
    run(&client, 1_000, || get("checkout")).await;
    assert!(layer.plan("checkout").unwrap().worth_it);
    assert_eq!(server.calls.load(Ordering::SeqCst), 1_000, "no hedge sent");
}

#[test]
fn settings_out_of_range_are_refused() {
    let cases: [fn(&mut HedgeConfig); 4] = [
        |c| c.quantile = 1.5,
        |c| c.max_share = -0.1,
        |c| c.window = Duration::from_millis(10),
        |c| c.max_refused_share = f64::NAN,
    ];
    for set in cases {
        let mut c = HedgeConfig::default();
        set(&mut c);
        assert!(HedgeLayer::new(&model(), c).is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn only_safe_methods_are_hedged() {
    let server = Server::default();
    let layer = HedgeLayer::new(&model(), HedgeConfig::default()).unwrap();
    let client = layer.clone().layer(server.service(pattern));
    // Learn the class on GETs (and see that GETs are hedged), then send
    // writes: two copies of a PUT or DELETE may answer differently or land
    // in either order.
    run(&client, 1_000, || get("checkout")).await;
    assert!(layer.plan("checkout").unwrap().worth_it);
    assert!(server.calls.load(Ordering::SeqCst) > 1_000, "GETs hedged");
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let before = server.calls.load(Ordering::SeqCst);
        run(&client, 500, || {
            let mut r = get("checkout");
            *r.method_mut() = method.clone();
            r
        })
        .await;
        assert_eq!(
            server.calls.load(Ordering::SeqCst) - before,
            500,
            "{method}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn in_a_mix_the_cheap_class_is_not_hedged_even_when_replica_time_is_free() {
    // No price on replica time at all: what a copy takes is taken from the
    // checkouts in the mix.
    let model =
        CostModel::from_toml(&MODEL.replace("slot_second = 1.0", "slot_second = 0.0")).unwrap();
    let server = Server::default();
    let layer = HedgeLayer::new(&model, HedgeConfig::default()).unwrap();
    let client = layer.clone().layer(server.service(pattern));
    for i in 0..2_000 {
        let class = if i % 2 == 0 { "checkout" } else { "prefetch" };
        client.clone().oneshot(get(class)).await.unwrap();
    }
    assert!(layer.plan("checkout").unwrap().worth_it);
    assert!(!layer.plan("prefetch").unwrap().worth_it);
}

/// Set just before a call that must hang.
static HANG_NEXT: AtomicBool = AtomicBool::new(false);

/// `pattern`, but the call after [`HANG_NEXT`] is set hangs for an hour.
fn hang_when_told(i: u32) -> u64 {
    if HANG_NEXT.swap(false, Ordering::SeqCst) {
        3_600_000
    } else {
        pattern(i)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hedge_that_wins_cancels_the_call_still_running() {
    let server = Server::default();
    let layer = HedgeLayer::new(&model(), HedgeConfig::default()).unwrap();
    let client = layer.clone().layer(server.service(hang_when_told));
    run(&client, 300, || get("checkout")).await;
    assert!(layer.plan("checkout").unwrap().worth_it);
    // One call in sixteen goes without a copy (the plan's sample): try
    // until a hung call is hedged.
    let mut answered_in = None;
    for _ in 0..16 {
        let cancelled = server.cancelled.load(Ordering::SeqCst);
        HANG_NEXT.store(true, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let call = client.clone().oneshot(get("checkout"));
        if tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .is_ok()
        {
            answered_in = Some(start.elapsed());
            assert_eq!(
                server.cancelled.load(Ordering::SeqCst),
                cancelled + 1,
                "the hung call was cancelled"
            );
            break;
        }
    }
    // Answered by the copy: the 50 ms delay, then the copy's 10 ms.
    let took = answered_in.expect("a hung call was hedged");
    assert!(took <= Duration::from_millis(62), "{took:?}");
}
