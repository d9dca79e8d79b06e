//! The simulator is deterministic: the same seed gives the same run.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use gratify_core::classify::classify_fn;
use gratify_scaling::limit::{AdaptiveLimitLayer, Limiter};
use gratify_scaling::sim::{self, Scenario};
use tower_layer::Layer;

fn workload_hash(arrivals: &[sim::Arrival]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in arrivals {
        for x in [
            a.at.as_nanos() as u64,
            a.class as u64,
            a.base.as_nanos() as u64,
        ] {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

fn delay_cost_run(scenario: &Scenario, seed: u64) -> sim::RunResult {
    let model = scenario.model().unwrap();
    let workload = scenario.workload(seed);
    let limiter = Limiter::new(&model);
    let probe = limiter.clone();
    sim::run(
        scenario,
        &model,
        &workload,
        |server| {
            AdaptiveLimitLayer::with_limiter(limiter)
                .classify_with(classify_fn(|r: &http::Request<sim::Job>| r.body().class))
                .layer(server)
        },
        move || Some(probe.stats().limit),
    )
}

#[test]
fn the_workload_is_the_same_on_every_machine() {
    // Drawn with xorshift64* and libm's portable maths: this hash is the
    // same wherever the test runs. It changes only if the scenario file or
    // the generator changes.
    let scenario = Scenario::from_toml(sim::SEVEN_PHASE).unwrap().scaled(0.05);
    let workload = scenario.workload(1);
    assert_eq!(workload.len(), 8_010);
    assert_eq!(workload_hash(&workload), 0x3030_5f8f_2ace_b1eb);
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let scenario = Scenario::from_toml(sim::SEVEN_PHASE).unwrap().scaled(0.05);
    let a = delay_cost_run(&scenario, 1);
    let b = delay_cost_run(&scenario, 1);
    assert_eq!(a.records.len(), scenario.workload(1).len());
    assert_eq!(a.unfinished, 0);
    assert_eq!(a.trace_hash(), b.trace_hash());
    let c = delay_cost_run(&scenario, 2);
    assert_ne!(a.trace_hash(), c.trace_hash());
}

#[test]
fn delay_cost_protects_checkout_in_a_short_overload() {
    let scenario = Scenario::from_toml(sim::SEVEN_PHASE).unwrap().scaled(0.05);
    let result = delay_cost_run(&scenario, 3);
    let e = sim::evaluate(&scenario, &result, None, 1);
    assert!(e.overall["success.checkout"] > 0.98, "{:?}", e.overall);
    assert_eq!(e.overall["cold_start_shed"], 0.0);
    // The cheapest class absorbs the shedding.
    assert!(e.overall["success.batch"] < e.overall["success.browse"]);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_gives_back_its_worker_or_its_place() {
    use std::time::Duration;
    use tower::ServiceExt;

    let text = sim::SEVEN_PHASE.replace("workers = 16", "workers = 1");
    let scenario = Scenario::from_toml(&text).unwrap();
    let server = sim::SimServer::new(scenario.server.clone());
    let job = |ms: u64| {
        http::Request::new(sim::Job {
            class: gratify_core::ClassId::from_index(0),
            base: Duration::from_millis(ms),
            fail: false,
        })
    };
    // One request works, one waits for the only worker; both clients hang up.
    let working = tokio::spawn(server.clone().oneshot(job(10_000)));
    let waiting = tokio::spawn(server.clone().oneshot(job(10_000)));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(server.in_flight(), 2);
    waiting.abort();
    working.abort();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(server.in_flight(), 0, "both gave back what they held");
    // The worker is free: the next request takes its own time, no more.
    let started = tokio::time::Instant::now();
    let res = server.clone().oneshot(job(20)).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(25),
        "{:?}",
        started.elapsed()
    );
}

/// The sequence that once locked the most valuable class out for minutes:
/// heavy tails, capacity dropping to 6 workers, the limit full of cheaper
/// work, checkout refused on a mean it could no longer refresh. Every phase
/// must serve most checkouts.
#[test]
fn no_phase_locks_the_most_valuable_class_out() {
    let scenario = Scenario::from_toml(sim::SEVEN_PHASE_HEAVY_TAIL).unwrap();
    let result = delay_cost_run(&scenario, 1);
    let e = sim::evaluate(&scenario, &result, None, 10);
    for (phase, f) in &e.phases {
        let checkout = f["success.checkout"];
        assert!(checkout > 0.8, "{phase}: checkout success {checkout}");
    }
}

/// A cheap class whose requests have a heavy tail (sigma 2.5) beside a
/// valuable class with a 50 ms deadline: in the overload, the cheap class's
/// long requests once took every slot and the valuable class was refused
/// hundreds of times while cheap work was admitted around it (inversions).
/// Every phase must serve the valuable class, and refusing it while cheap
/// work is admitted must stay rare.
#[test]
fn long_cheap_requests_do_not_crowd_out_the_valuable_class() {
    let scenario = Scenario::from_toml(include_str!("../scenarios/cheap-heavy-tail.toml")).unwrap();
    let result = delay_cost_run(&scenario, 1);
    let e = sim::evaluate(&scenario, &result, None, 10);
    for (phase, f) in &e.phases {
        let checkout = f["success.checkout"];
        assert!(checkout >= 0.95, "{phase}: checkout success {checkout}");
    }
    let inversions = e.overall["inversions"];
    assert!(inversions <= 20.0, "{inversions} inversions");
}

/// One class at twice the capacity: queueing it to the limit of its
/// patience serves no more of it, later. The overload's goodput (answers in
/// time, as a share of capacity) was 0.78 when every request queued for as
/// long as it was worth to itself.
#[test]
fn a_sustained_overload_does_not_queue_what_will_be_late() {
    let scenario = Scenario::from_toml(include_str!("../scenarios/single-class.toml")).unwrap();
    let result = delay_cost_run(&scenario, 1);
    let e = sim::evaluate(&scenario, &result, None, 10);
    let (_, overload) = e.phases.iter().find(|(p, _)| p == "overload").unwrap();
    let goodput = overload["goodput_frac"];
    assert!(goodput >= 0.85, "goodput {goodput}");
}
