//! The headline behaviours of the examples, in process: each backend served
//! on loopback, plain and behind its stack, at three times what the plain
//! app completes.
//!
//! These runs take real time (the servers do real work): a few seconds of
//! probe and of traffic per app, and what they assert depends on the machine
//! not being busy with anything else. So they are not part of the test
//! command; run them on a quiet machine with
//!
//! ```text
//! cargo test --release -p gratify-examples --test overload -- --ignored
//! ```
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::sync::Mutex;
use std::time::Duration;

use gratify::CostModel;
use gratify_examples::demo::{Options, Outcome, compare};
use gratify_examples::drive::{Mix, table};
use gratify_examples::{game, shop};

/// One overload run at a time: two at once would share the cores and skew
/// each other's capacity.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `test` alone, on a runtime of two threads.
fn alone(test: impl Future<Output = ()>) {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

/// The plain and the wrapped app at three times the plain one's capacity,
/// and the report as a table.
async fn overload(
    plain: axum::Router,
    wrapped: axum::Router,
    mix: &Mix,
    model: &CostModel,
) -> (Outcome, String) {
    let options = Options {
        multiple: 3.0,
        seconds: 6.0,
        probe_seconds: 2.0,
        ..Options::default()
    };
    let outcome = compare(plain, wrapped, mix, model, options, false)
        .await
        .unwrap();
    let report = table(&outcome.plain, &outcome.gratify);
    eprintln!("{} arrivals/s:\n{report}", outcome.rate);
    (outcome, report)
}

#[test]
#[ignore = "real-time load: cargo test --release -p gratify-examples --test overload -- --ignored"]
fn checkout_survives_three_times_overload_while_recommendations_absorb_the_shedding() {
    alone(async {
        let plain = shop::Shop::in_memory().unwrap();
        let wrapped = shop::Shop::in_memory().unwrap();
        let model = wrapped.model();
        let (outcome, report) =
            overload(plain.plain_router(), wrapped.router(), &shop::mix(), &model).await;
        let (p, g) = (&outcome.plain, &outcome.gratify);
        let checkout = &g.classes["checkout"];
        assert!(checkout.success >= 0.99, "{report}");
        assert_eq!(checkout.shed, 0, "checkout is never shed: {report}");
        // The plain app, at the same load, fails a good part of them.
        assert!(p.classes["checkout"].success < 0.9, "{report}");
        // Recommendations take most of the refusals.
        let shed: u64 = g.classes.values().map(|c| c.shed).sum();
        let recommendations = g.classes["recommendations"].shed;
        assert!(
            recommendations > 0 && recommendations as f64 >= 0.8 * shed as f64,
            "{report}"
        );
        assert!(g.total_cost < p.total_cost, "{report}");
        // Every placed order has its confirmation, once.
        let drained = wrapped.drain(Duration::from_secs(60)).await;
        assert!(
            drained.dead.is_empty() && drained.not_run.is_empty(),
            "{drained:?}"
        );
        let (orders, mails) = wrapped.db().counts().unwrap();
        assert!(orders >= checkout.ok as i64, "{orders} orders");
        assert_eq!(orders, mails);
        plain.shutdown().await;
        wrapped.shutdown().await;
    });
}

#[test]
#[ignore = "real-time load: cargo test --release -p gratify-examples --test overload -- --ignored"]
fn the_game_keeps_its_deadlines_at_three_times_overload() {
    alone(async {
        let plain = game::Game::new().unwrap();
        let wrapped = game::Game::new().unwrap();
        let model = wrapped.model();
        let (outcome, report) =
            overload(plain.plain_router(), wrapped.router(), &game::mix(), &model).await;
        let (p, g) = (&outcome.plain, &outcome.gratify);
        // The players' moves made in their tick, and matchmaking answered
        // in time, at least twice as often as by the plain backend and at
        // least half the time. (The demo keeps over 99% of the moves in
        // their tick. Run in a release build: in a debug build the 200
        // players' own clients and the sessions' JSON take the cores, and
        // hardly a frame keeps its 50 ms.)
        let on_time = |c: &gratify_examples::drive::ClassReport| {
            (c.ok - c.late) as f64 / c.sent.max(1) as f64
        };
        for class in ["state", "matchmaking"] {
            let (mine, plain) = (on_time(&g.classes[class]), on_time(&p.classes[class]));
            assert!(mine >= 0.5, "{class}: {report}");
            assert!(plain * 2.0 <= mine, "{class}: {report}");
        }
        // The leaderboard comes from the cache.
        assert!(g.classes["leaderboard"].cache_hit_ratio > 0.9, "{report}");
        assert!(g.total_cost < p.total_cost, "{report}");
        // Every accepted upload is processed, later.
        let drained = wrapped.drain(Duration::from_secs(60)).await;
        assert!(
            drained.dead.is_empty() && drained.not_run.is_empty(),
            "{drained:?}"
        );
        assert_eq!(wrapped.replays_processed(), g.classes["replay"].ok);
        plain.shutdown().await;
        wrapped.shutdown().await;
    });
}
