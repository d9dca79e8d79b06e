//! Class and deadline propagation between services: trusted callers only,
//! deadlines that shrink along the call, calls that stop at the deadline.
//! Time runs on tokio's paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gratify::balance::propagate::{
    CLASS_HEADER, DEADLINE_HEADER, GRPC_TIMEOUT, TOKEN_HEADER, format_grpc_timeout,
    parse_deadline_ms, parse_grpc_timeout,
};
use gratify::balance::{
    AcceptCallsLayer, CallContext, DeadlineExceeded, PeerAddr, PropagateLayer, Trust,
};
use gratify::core::classify::{Propagated, RouteClassifier, class_of, propagated_of};
use gratify::{BoxError, CostModel, Stack};
use http::{HeaderMap, Request, Response, StatusCode};
use proptest::prelude::*;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "300ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "2s" }
refusal_cost = 1.0
"#;

const SECRET: &str = "sixteen-bytes-or-more shared secret";

fn model() -> CostModel {
    CostModel::from_toml(MODEL).unwrap()
}

/// What a service saw of a request.
#[derive(Debug, Clone, Default)]
struct Seen {
    class: Option<gratify::ClassId>,
    propagated: Option<Propagated>,
    headers: HeaderMap,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A service that records what it saw and answers 200.
fn recorder(
    log: &Log,
) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    let log = Arc::clone(log);
    service_fn(move |req: Request<()>| {
        log.lock().unwrap().push(Seen {
            class: class_of(&req),
            propagated: propagated_of(&req),
            headers: req.headers().clone(),
        });
        async { Ok::<_, Infallible>(Response::new(String::new())) }
    })
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "svc.internal")
}

#[tokio::test(start_paused = true)]
async fn an_untrusted_callers_class_and_deadline_are_removed_and_ignored() {
    let model = model();
    let log = Log::default();
    let stack = Stack::new(&model).limit();
    let svc = ServiceBuilder::new()
        .layer(AcceptCallsLayer::new(&model, Trust::token(SECRET).unwrap()))
        .layer(stack)
        .service(recorder(&log));
    let wrong = "x".repeat(SECRET.len());
    let forged = [
        // No token at all.
        get("/")
            .header(CLASS_HEADER, "checkout")
            .header(DEADLINE_HEADER, "0"),
        // A token of the right length, wrong.
        get("/")
            .header(CLASS_HEADER, "checkout")
            .header(DEADLINE_HEADER, "0")
            .header(TOKEN_HEADER, wrong.as_str()),
        // The right token beside a wrong one: not one clear token.
        get("/")
            .header(CLASS_HEADER, "checkout")
            .header(DEADLINE_HEADER, "0")
            .header(TOKEN_HEADER, SECRET)
            .header(TOKEN_HEADER, wrong.as_str()),
        // A prefix of the token.
        get("/")
            .header(CLASS_HEADER, "checkout")
            .header(TOKEN_HEADER, &SECRET[..SECRET.len() - 1]),
    ];
    for request in forged {
        let res = svc
            .clone()
            .oneshot(request.body(()).unwrap())
            .await
            .unwrap();
        // Served, not refused for the forged deadline of 0 ms.
        assert_eq!(res.status(), StatusCode::OK);
    }
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_eq!(s.class, model.id("browse"), "classified by its own rules");
        assert_eq!(s.propagated, None);
        for name in [&CLASS_HEADER, &DEADLINE_HEADER, &TOKEN_HEADER] {
            assert!(!s.headers.contains_key(name), "{name} reached the service");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_trusted_caller_sets_the_class_and_never_shows_its_token() {
    let model = model();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(AcceptCallsLayer::new(&model, Trust::token(SECRET).unwrap()))
        .layer(Stack::new(&model).limit())
        .service(recorder(&log));
    let req = get("/")
        .header(CLASS_HEADER, "checkout")
        .header(DEADLINE_HEADER, "250")
        .header(TOKEN_HEADER, SECRET)
        .body(())
        .unwrap();
    let sent = tokio::time::Instant::now().into_std();
    assert_eq!(
        svc.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    // A class this service does not have: classified by its own rules, the
    // deadline still stands.
    let req = get("/")
        .header(CLASS_HEADER, "admin")
        .header(DEADLINE_HEADER, "90")
        .header(TOKEN_HEADER, SECRET)
        .body(())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].class, model.id("checkout"));
    assert_eq!(
        seen[0].propagated,
        Some(Propagated::new(
            model.id("checkout"),
            Some(sent + Duration::from_millis(250)),
        ))
    );
    assert_eq!(seen[1].class, model.id("browse"));
    assert_eq!(
        seen[1].propagated.unwrap().deadline,
        Some(sent + Duration::from_millis(90))
    );
    for s in &seen {
        for name in [&CLASS_HEADER, &DEADLINE_HEADER, &TOKEN_HEADER] {
            assert!(!s.headers.contains_key(name), "{name} reached the service");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_trusted_call_whose_deadline_has_passed_never_reaches_the_service() {
    let model = model();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(AcceptCallsLayer::new(&model, Trust::token(SECRET).unwrap()))
        .layer(Stack::new(&model).limit())
        .service(recorder(&log));
    let req = get("/")
        .header(CLASS_HEADER, "checkout")
        .header(DEADLINE_HEADER, "0")
        .header(TOKEN_HEADER, SECRET)
        .body(())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(log.lock().unwrap().is_empty(), "the service never ran");
}

#[tokio::test(start_paused = true)]
async fn an_address_rule_trusts_only_its_networks() {
    let model = model();
    let log = Log::default();
    // The same range written mapped (`::ffff:10.1.0.0/112`) is the same rule.
    let trust = Trust::networks(["::ffff:10.1.0.0/112", "fd00::/8"]).unwrap();
    let svc = ServiceBuilder::new()
        .layer(AcceptCallsLayer::new(&model, trust))
        .service(recorder(&log));
    for peer in [
        "10.1.200.3:4000",
        "[::ffff:10.1.0.9]:4000",
        "[fd12::1]:80",
        "10.2.0.1:4000",
        "[fe80::1]:80",
    ] {
        let mut req = get("/").header(CLASS_HEADER, "checkout").body(()).unwrap();
        req.extensions_mut()
            .insert(PeerAddr(peer.parse::<SocketAddr>().unwrap()));
        svc.clone().oneshot(req).await.unwrap();
    }
    // Without an address nothing is trusted.
    let req = get("/").header(CLASS_HEADER, "checkout").body(()).unwrap();
    svc.oneshot(req).await.unwrap();
    let trusted: Vec<bool> = log
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.propagated.is_some())
        .collect();
    assert_eq!(trusted, [true, true, true, false, false, false]);
}

/// The callee of the call-graph tests: trusts the token, records.
fn callee(
    model: &CostModel,
    log: &Log,
) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    AcceptCallsLayer::new(model, Trust::token(SECRET).unwrap()).layer(recorder(log))
}

#[tokio::test(start_paused = true)]
async fn calls_made_while_serving_carry_the_class_and_what_is_left_of_the_deadline() {
    let model = model();
    let downstream = Log::default();
    let client = PropagateLayer::new()
        .token(SECRET)
        .unwrap()
        .layer(callee(&model, &downstream));
    let routes = RouteClassifier::builder(&model)
        .route(None, "/checkout", "checkout")
        .build()
        .unwrap();
    // The front service: after 100 ms of its own work it calls the callee.
    let front =
        Stack::new(&model)
            .routes(routes)
            .limit()
            .layer(service_fn(move |_: Request<()>| {
                let client = client.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let res = client.oneshot(Request::new(())).await?;
                    Ok::<_, BoxError>(Response::new(res.status().to_string()))
                }
            }));
    // A checkout (300 ms deadline) arrives first hand.
    let first = tokio::time::Instant::now().into_std();
    let res = front
        .clone()
        .oneshot(get("/checkout").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The same service, called by a trusted caller with 150 ms left.
    let front = AcceptCallsLayer::new(&model, Trust::token(SECRET).unwrap()).layer(front);
    let req = get("/other")
        .header(CLASS_HEADER, "checkout")
        .header(DEADLINE_HEADER, "150")
        .header(TOKEN_HEADER, SECRET)
        .body(())
        .unwrap();
    let second = tokio::time::Instant::now().into_std();
    assert_eq!(front.oneshot(req).await.unwrap().status(), StatusCode::OK);

    let seen = downstream.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    // Due when the front's request was: its class's 300 ms from arrival,
    // then the 150 ms its own trusted caller had left (the callee reads the
    // milliseconds left at the call, 100 ms in: 200, then 50).
    for (s, due) in seen.iter().zip([
        first + Duration::from_millis(300),
        second + Duration::from_millis(150),
    ]) {
        let propagated = s.propagated.unwrap();
        assert_eq!(propagated.class, model.id("checkout"));
        assert_eq!(propagated.deadline, Some(due));
        assert!(!s.headers.contains_key(&TOKEN_HEADER));
    }
}

/// A callee that shows the headers it was sent, trusting nobody's layers.
fn raw_callee(
    log: &Log,
) -> impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    recorder(log)
}

#[tokio::test(start_paused = true)]
async fn an_outgoing_call_carries_the_headers_the_callee_reads() {
    let log = Log::default();
    let client = PropagateLayer::new()
        .token(SECRET)
        .unwrap()
        .layer(raw_callee(&log));
    let context = CallContext::new()
        .with_class("checkout")
        .with_deadline(tokio::time::Instant::now().into_std() + Duration::from_millis(1500));
    // A plain HTTP call, and a gRPC one whose own timeout is longer.
    let plain = Request::new(());
    let grpc = Request::post("/inventory.Stock/Reserve")
        .header("content-type", "application/grpc+proto")
        .header(GRPC_TIMEOUT, "10S")
        .body(())
        .unwrap();
    for req in [plain, grpc] {
        context
            .clone()
            .scope(client.clone().oneshot(req))
            .await
            .unwrap();
    }
    // Without a context: the application's own gratify headers are removed.
    let smuggled = Request::get("/")
        .header(CLASS_HEADER, "admin")
        .header(DEADLINE_HEADER, "99999")
        .body(())
        .unwrap();
    client.clone().oneshot(smuggled).await.unwrap();
    // A context on the request itself wins over the task's.
    let mut explicit = Request::new(());
    explicit
        .extensions_mut()
        .insert(CallContext::new().with_class("browse"));
    context.scope(client.oneshot(explicit)).await.unwrap();

    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].headers[&CLASS_HEADER], "checkout");
    assert_eq!(seen[0].headers[&DEADLINE_HEADER], "1500");
    assert_eq!(seen[0].headers[&TOKEN_HEADER], SECRET);
    assert!(
        !seen[0].headers.contains_key(&GRPC_TIMEOUT),
        "not a gRPC call"
    );
    assert_eq!(seen[1].headers[&GRPC_TIMEOUT], "1500000u");
    assert_eq!(seen[1].headers[&DEADLINE_HEADER], "1500");
    assert!(!seen[2].headers.contains_key(&CLASS_HEADER));
    assert!(!seen[2].headers.contains_key(&DEADLINE_HEADER));
    assert_eq!(seen[2].headers[&TOKEN_HEADER], SECRET);
    assert_eq!(seen[3].headers[&CLASS_HEADER], "browse");
    assert!(!seen[3].headers.contains_key(&DEADLINE_HEADER));
}

#[tokio::test(start_paused = true)]
async fn a_call_after_the_deadline_fails_at_once_without_reaching_the_callee() {
    let log = Log::default();
    let client = PropagateLayer::new().layer(raw_callee(&log));
    let context = CallContext::new()
        .with_deadline(tokio::time::Instant::now().into_std() + Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = context
        .scope(client.oneshot(Request::new(())))
        .await
        .unwrap_err();
    assert!(err.is::<DeadlineExceeded>(), "{err}");
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_call_still_running_at_the_deadline_is_dropped_and_fails() {
    let dropped = Arc::new(AtomicBool::new(false));
    struct Guard(Arc<AtomicBool>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let flag = Arc::clone(&dropped);
    let slow = service_fn(move |_: Request<()>| {
        let guard = Guard(Arc::clone(&flag));
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(guard);
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let client = PropagateLayer::new().layer(slow);
    let start = tokio::time::Instant::now();
    let context = CallContext::new().with_deadline(start.into_std() + Duration::from_millis(120));
    let err = context
        .scope(client.oneshot(Request::new(())))
        .await
        .unwrap_err();
    assert!(err.is::<DeadlineExceeded>(), "{err}");
    assert_eq!(start.elapsed(), Duration::from_millis(120));
    assert!(dropped.load(Ordering::SeqCst), "the call was dropped");
}

#[tokio::test(start_paused = true)]
async fn the_stack_sets_the_context_for_its_service_but_a_spawned_task_must_take_it() {
    let model = model();
    let routes = RouteClassifier::builder(&model)
        .route(None, "/checkout", "checkout")
        .build()
        .unwrap();
    let found = Arc::new(Mutex::new(Vec::new()));
    let out = Arc::clone(&found);
    let svc = Stack::new(&model)
        .routes(routes)
        .layer(service_fn(move |_: Request<()>| {
            let out = Arc::clone(&out);
            async move {
                let here = CallContext::current();
                let spawned = tokio::spawn(async { CallContext::current() })
                    .await
                    .unwrap();
                let carried = tokio::spawn(
                    here.clone()
                        .unwrap()
                        .scope(async { CallContext::current() }),
                )
                .await
                .unwrap();
                out.lock().unwrap().push((here, spawned, carried));
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }));
    let start = tokio::time::Instant::now().into_std();
    svc.oneshot(get("/checkout").body(()).unwrap())
        .await
        .unwrap();
    let found = found.lock().unwrap();
    let (here, spawned, carried) = &found[0];
    let here = here.as_ref().expect("set by the stack");
    assert_eq!(here.class().as_deref(), Some("checkout"));
    assert_eq!(here.deadline(), Some(start + Duration::from_millis(300)));
    assert!(
        spawned.is_none(),
        "a task-local does not follow tokio::spawn"
    );
    assert_eq!(
        carried.as_ref().unwrap().class().as_deref(),
        Some("checkout")
    );
    assert!(
        CallContext::current().is_none(),
        "nothing outside the request"
    );
}

#[test]
fn trust_rules_check_their_input() {
    assert!(Trust::token("too short").is_err());
    assert!(Trust::token("sixteen bytes!!\n").is_err());
    assert!(PropagateLayer::new().token("short").is_err());
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "::ffff:10.0.0.0/95",
        "10.0.0/8",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "x",
        "1.2.3.4/08x",
    ] {
        assert!(Trust::networks([bad]).is_err(), "{bad}");
    }
    assert!(Trust::networks(["0.0.0.0/0", "::/0", "127.0.0.1", "::1"]).is_ok());
    let debug = format!("{:?}", Trust::token(SECRET).unwrap());
    assert!(!debug.contains(SECRET), "{debug}");
}

/// Whether `ip` is in `net/prefix`, bit by bit.
fn naive_contains(net: &[u8], prefix: usize, ip: &[u8]) -> bool {
    net.len() == ip.len()
        && (0..prefix).all(|i| (net[i / 8] >> (7 - i % 8)) & 1 == (ip[i / 8] >> (7 - i % 8)) & 1)
}

fn octets(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

proptest! {
    #[test]
    fn grpc_timeouts_round_trip_never_longer_and_within_a_unit(nanos in 0u64..(48 * 3_600 * 1_000_000_000)) {
        let d = Duration::from_nanos(nanos);
        let text = format_grpc_timeout(d);
        let back = parse_grpc_timeout(text.as_bytes()).unwrap();
        let expected = d.min(gratify::balance::propagate::MAX_PROPAGATED_DEADLINE);
        prop_assert!(back <= expected, "{text}: {back:?} > {d:?}");
        // Eight digits, and the next unit is at most 1,000 times coarser:
        // at most one part in 100,000 is lost.
        let lost = expected - back;
        prop_assert!(lost.as_nanos() * 100_000 <= expected.as_nanos(), "{text}: lost {lost:?}");
        prop_assert!(text.len() <= 9);
    }

    #[test]
    fn header_parsers_never_panic_and_accept_only_their_grammar(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
        if let Some(d) = parse_deadline_ms(&bytes) {
            prop_assert!(bytes.iter().all(u8::is_ascii_digit));
            prop_assert!(d <= gratify::balance::propagate::MAX_PROPAGATED_DEADLINE);
        }
        if let Some(d) = parse_grpc_timeout(&bytes) {
            prop_assert!(bytes.len() >= 2 && bytes.len() <= 9);
            prop_assert!(b"HMSmun".contains(bytes.last().unwrap()));
            prop_assert!(d <= gratify::balance::propagate::MAX_PROPAGATED_DEADLINE);
        }
    }

    #[test]
    fn network_rules_never_panic_on_text(text in "\\PC{0,40}") {
        let _ = Trust::networks([text]);
    }

    #[test]
    fn network_rules_contain_exactly_their_prefix(
        v6 in any::<bool>(),
        net in any::<[u8; 16]>(),
        ip in any::<[u8; 16]>(),
        prefix in 0usize..=128,
        shared in 0usize..=128,
    ) {
        let width = if v6 { 16 } else { 4 };
        let prefix = prefix.min(width * 8);
        // Half the time the address shares the network's first bits.
        let mut ip = ip[..width].to_vec();
        let net = &net[..width];
        for i in 0..shared.min(width * 8) {
            let bit = (net[i / 8] >> (7 - i % 8)) & 1;
            ip[i / 8] = (ip[i / 8] & !(1 << (7 - i % 8))) | (bit << (7 - i % 8));
        }
        let to_ip = |b: &[u8]| -> std::net::IpAddr {
            if v6 {
                std::net::IpAddr::from(<[u8; 16]>::try_from(b).unwrap())
            } else {
                std::net::IpAddr::from(<[u8; 4]>::try_from(b).unwrap())
            }
        };
        let (net_ip, peer) = (to_ip(net), to_ip(&ip));
        // IPv4-mapped IPv6 addresses are read as IPv4: keep to plain ones here.
        for a in [peer, net_ip] {
            prop_assume!(!matches!(a, std::net::IpAddr::V6(v) if v.to_ipv4_mapped().is_some()));
        }
        let trust = Trust::networks([format!("{net_ip}/{prefix}")]).unwrap();
        let mut req = Request::new(());
        req.extensions_mut().insert(PeerAddr(SocketAddr::new(peer, 1)));
        let (parts, ()) = req.into_parts();
        prop_assert_eq!(
            trust.trusts(&parts),
            naive_contains(&octets(net_ip), prefix, &octets(peer))
        );
    }
}
