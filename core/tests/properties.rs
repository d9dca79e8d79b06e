//! Property tests of the model, the queueing maths and the parsers.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::time::Duration;

use gratify_core::classify::{Classify, RouteClassifier};
use gratify_core::queueing::{Mmc, Staffing, erlang_b, erlang_c};
use gratify_core::{Class, CostModel, DelayCost, Prices};
use proptest::prelude::*;

fn linear_class(rate: f64) -> Class {
    Class::new(DelayCost::linear(rate).unwrap(), 1.0).unwrap()
}

/// Any valid curve, with its parameters drawn widely.
fn curve() -> impl Strategy<Value = DelayCost> {
    let deadline = proptest::option::of(1u64..100_000_000);
    prop_oneof![
        (0.0..1e4f64, deadline.clone()).prop_map(|(r, d)| (DelayCost::linear(r).unwrap(), d)),
        (1u64..100_000_000).prop_map(|d| (
            DelayCost::free_until(Duration::from_micros(d)).unwrap(),
            None
        )),
        (0.0..1e3f64, 0.0..1e3f64, deadline.clone())
            .prop_map(|(a, b, d)| (DelayCost::quadratic(a, b).unwrap(), d)),
        (
            proptest::collection::vec((1u64..1_000_000, 0.0..100.0f64), 1..6),
            deadline
        )
            .prop_map(|(steps, d)| {
                // Increasing times and increasing slopes: a convex curve.
                let mut points = Vec::new();
                let (mut t, mut c, mut slope) = (0u64, 0.0, 0.0);
                for (dt, extra_slope) in steps {
                    slope += extra_slope;
                    t += dt;
                    c += slope * dt as f64 / 1e6;
                    points.push((Duration::from_micros(t), c));
                }
                (DelayCost::piecewise(&points).unwrap(), d)
            }),
    ]
    .prop_map(|(curve, deadline)| match deadline {
        Some(d) => curve.with_deadline(Duration::from_micros(d)).unwrap(),
        None => curve,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn erlang_probabilities_are_probabilities(c in 1u32..10_000, frac in 0.0..0.999_999f64) {
        let a = f64::from(c) * frac;
        let b = erlang_b(c, a).unwrap();
        let p = erlang_c(c, a).unwrap();
        prop_assert!((0.0..=1.0).contains(&b), "B = {b}");
        prop_assert!((0.0..=1.0).contains(&p), "C = {p}");
        prop_assert!(p >= b - 1e-12, "waiting is at least as likely as blocking: C={p} B={b}");
    }

    #[test]
    fn waits_are_finite_and_consistent(lambda in 0.0..1e4f64, service in 1e-4..10.0f64, extra in 1u32..50) {
        let needed = (lambda * service).floor() as u32 + extra;
        let q = Mmc::new(lambda, service, needed).unwrap();
        prop_assert!(q.mean_wait().is_finite() && q.mean_wait() >= 0.0);
        prop_assert!(q.utilisation() < 1.0);
        prop_assert!((0.0..=1.0).contains(&q.wait_tail(0.01)));
        prop_assert!(q.wait_quantile(0.99) >= q.wait_quantile(0.9));
    }

    #[test]
    fn optimal_servers_never_fall_as_arrivals_rise(
        lambda in 0.01..500.0f64,
        more in 1.0..3.0f64,
        service in 0.001..2.0f64,
        price in 0.01..1e4f64,
        rate in 0.001..100.0f64,
    ) {
        let at = |l: f64| {
            Staffing::new(service, price).unwrap().class(l, linear_class(rate)).unwrap().optimal().unwrap().servers
        };
        prop_assert!(at(lambda) <= at(lambda * more));
    }

    #[test]
    fn optimal_servers_never_fall_as_delay_cost_rises(
        lambda in 0.01..500.0f64,
        service in 0.001..2.0f64,
        price in 0.01..1e4f64,
        rate in 0.001..100.0f64,
        more in 1.0..10.0f64,
    ) {
        let at = |r: f64| {
            Staffing::new(service, price).unwrap().class(lambda, linear_class(r)).unwrap().optimal().unwrap().servers
        };
        prop_assert!(at(rate) <= at(rate * more));
    }

    #[test]
    fn curves_are_nondecreasing_finite_and_non_negative(c in curve(), t1 in 0.0..200.0f64, dt in 0.0..100.0f64) {
        let (a, b) = (c.cost_secs(t1), c.cost_secs(t1 + dt));
        prop_assert!(a.is_finite() && b.is_finite());
        prop_assert!(a >= 0.0 && b >= a - 1e-9 * (1.0 + a.abs()), "c({t1}) = {a} > c({}) = {b}", t1 + dt);
        prop_assert!(c.rate_secs(t1) >= 0.0 && c.rate_secs(t1).is_finite());
    }

    #[test]
    fn late_never_beats_refusal(c in curve(), refusal in 0.0..1e4f64, t in 0.0..1e3f64) {
        let class = Class::new(c, refusal).unwrap();
        let t = Duration::from_secs_f64(t);
        if class.delay_cost().is_late(t) {
            prop_assert!(class.response_cost(t) >= class.refusal_cost());
        }
    }

    #[test]
    fn models_round_trip_through_toml(
        curves in proptest::collection::vec((curve(), 0.0..1e6f64), 1..5),
        replica_hour in 0.0..100.0f64,
    ) {
        let mut builder = CostModel::builder().prices(Prices::new().replica_hour(replica_hour));
        for (i, (c, r)) in curves.into_iter().enumerate() {
            builder = builder.class(format!("class-{i}"), Class::new(c, r).unwrap());
        }
        let model = builder.default_class("class-0").build().unwrap();
        let text = model.to_toml();
        let again = CostModel::from_toml(&text).unwrap();
        // Durations are written to the nanosecond and numbers exactly, so the
        // costs agree at every point.
        for ((_, _, x), (_, _, y)) in model.iter().zip(again.iter()) {
            for t in [0.0, 0.001, 0.1, 1.0, 10.0, 100.0] {
                let (cx, cy) = (x.delay_cost().cost_secs(t), y.delay_cost().cost_secs(t));
                prop_assert!((cx - cy).abs() <= 1e-9 * (1.0 + cx.abs()), "{text}");
            }
            prop_assert_eq!(x.refusal_cost(), y.refusal_cost());
            prop_assert_eq!(x.deadline(), y.deadline());
        }
        prop_assert_eq!(model.prices(), again.prices());
    }

    #[test]
    fn model_parser_never_panics(text in "\\PC{0,200}") {
        let _ = CostModel::from_toml(&text);
    }

    #[test]
    fn model_parser_never_panics_on_near_misses(
        shape in prop::sample::select(vec!["linear", "deadline", "piecewise", "quadratic", "x", ""]),
        number in prop::sample::select(vec!["1.0", "-1.0", "nan", "inf", "-inf", "0", "1e308", "\"3\"", "[]"]),
        duration in prop::sample::select(vec!["\"1s\"", "\"-1s\"", "\"\"", "0", "-5", "1e30", "\"9999999999999h\"", "\"1.5ms\"", "{}"]),
    ) {
        let text = format!(
            "[classes.a]\ndelay_cost = {{ shape = \"{shape}\", per_second = {number}, per_second_squared = {number}, deadline = {duration}, points = [{{ at = {duration}, cost = {number} }}] }}\nrefusal_cost = {number}\n"
        );
        let _ = CostModel::from_toml(&text);
        let text = format!("[classes.a]\ndelay_cost = {{ shape = \"{shape}\", deadline = {duration} }}\nrefusal_cost = {number}\n");
        let _ = CostModel::from_toml(&text);
    }

    #[test]
    fn route_classifier_never_panics_and_is_deterministic(path in "[/a-z{}*%.]{0,40}", method in "[A-Z]{1,8}") {
        let model = CostModel::builder()
            .class("a", linear_class(1.0))
            .class("b", linear_class(2.0))
            .default_class("a")
            .build()
            .unwrap();
        let routes = RouteClassifier::builder(&model)
            .route(None, "/a/*", "b")
            .route(None, "/a/{x}/b", "a")
            .route(Some(http::Method::POST), "/a/b", "b")
            .build()
            .unwrap();
        let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return Ok(()); };
        let first = routes.classify_path(&method, &path);
        prop_assert_eq!(first, routes.classify_path(&method, &path));
        if let Ok(req) = http::Request::builder().method(method).uri(path.as_str()).body(()) {
            let _ = routes.classify(&req);
        }
    }

    #[test]
    fn route_patterns_never_panic(pattern in "\\PC{0,30}") {
        let model = CostModel::builder().class("a", linear_class(1.0)).build().unwrap();
        let _ = RouteClassifier::builder(&model).route(None, &pattern, "a").build();
    }
}
