//! The inventory over gRPC: tonic's server behind gratify, tonic's client
//! through gratify's balancer, on real sockets. No test here waits on the
//! clock: a call is held in flight by a gate the test opens.
#![cfg(feature = "grpc")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use gratify::balance::propagate::{DEADLINE_HEADER, TOKEN_HEADER};
use gratify::balance::{CallContext, Trust};
use gratify::core::classify::RouteClassifier;
use gratify::scaling::limit::{Admission, Fixed, Limiter, LimiterConfig};
use gratify::{CostModel, Stack};
use gratify_examples::inventory::{self, InventoryClient, PEER_TOKEN, RESERVE, Replica, Stock};
use tokio::sync::{Semaphore, watch};
use tonic::Code;

struct Fleet {
    urls: Vec<String>,
    stop: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<Result<(), gratify::BoxError>>>,
}

impl Fleet {
    /// One replica per `(replica, stack)`, each on a port of its own,
    /// trusting holders of the peer token.
    async fn start(model: &CostModel, replicas: Vec<(Replica, Stack)>) -> Self {
        let trusting = replicas
            .into_iter()
            .map(|(r, s)| (r, s, Trust::token(PEER_TOKEN).unwrap()))
            .collect();
        Self::start_trusting(model, trusting).await
    }

    /// One replica per `(replica, stack, trust)`, each on a port of its own.
    async fn start_trusting(model: &CostModel, replicas: Vec<(Replica, Stack, Trust)>) -> Self {
        let (stop, stopped) = watch::channel(false);
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        for (replica, stack, trust) in replicas {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.push(format!("http://{}", listener.local_addr().unwrap()));
            let mut stopped = stopped.clone();
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let server =
                inventory::serve_trusting(listener, replica, model, stack, trust, shutdown);
            servers.push(tokio::spawn(server));
        }
        Self {
            urls,
            stop,
            servers,
        }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        for s in self.servers {
            s.await.unwrap().unwrap();
        }
    }
}

/// A reservation of one `sku-1` sent to `url` by a plain tonic client (no
/// gratify on this side), with `metadata` set by hand.
async fn plain_reserve(
    url: &str,
    metadata: &[(&'static str, &str)],
) -> Result<inventory::ReserveReply, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut request = tonic::Request::new(inventory::ReserveRequest {
        sku: "sku-1".into(),
        quantity: 1,
    });
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    grpc.ready().await.unwrap();
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(RESERVE),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A limit of one slot, refusing at the limit; the limiter's handle for
/// its statistics.
fn one_slot(model: &CostModel) -> (Stack, Limiter) {
    let mut config = LimiterConfig::default();
    config.admission = Admission::RejectAtLimit;
    let limiter = Limiter::with_algorithm(model, Fixed::new(1), config);
    let routes = RouteClassifier::builder(model)
        .route(None, RESERVE, "checkout")
        .build()
        .unwrap();
    let stack = Stack::new(model).routes(routes).limit_with(limiter.clone());
    (stack, limiter)
}

/// Work that waits for a permit of `gate` (and gives it back), counting
/// the calls that reached the replica.
fn gated(gate: &Arc<Semaphore>, entered: &Arc<AtomicUsize>) -> inventory::Work {
    let (gate, entered) = (Arc::clone(gate), Arc::clone(entered));
    Arc::new(move || {
        let (gate, entered) = (Arc::clone(&gate), Arc::clone(&entered));
        Box::pin(async move {
            entered.fetch_add(1, Ordering::SeqCst);
            drop(gate.acquire().await.unwrap());
        })
    })
}

#[tokio::test]
async fn calls_through_the_balancer_reach_every_replica_and_take_stock_once_each() {
    let model = inventory::model();
    let stock = Stock::with([("sku-1", 1_000)]);
    let replicas = ["a", "b", "c"]
        .map(|n| {
            (
                Replica::new(n, stock.clone()),
                inventory::stack(&model).unwrap(),
            )
        })
        .into();
    let fleet = Fleet::start(&model, replicas).await;
    let client = InventoryClient::connect(&fleet.urls, &model).unwrap();
    let mut by_replica: BTreeMap<String, u32> = BTreeMap::new();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let client = client.clone();
        calls.spawn(async move {
            let mut replies = Vec::new();
            for _ in 0..15 {
                replies.push(client.reserve("sku-1", 2).await.unwrap());
            }
            replies
        });
    }
    while let Some(replies) = calls.join_next().await {
        for r in replies.unwrap() {
            assert!(r.reserved);
            *by_replica.entry(r.replica).or_default() += 1;
        }
    }
    assert_eq!(by_replica.values().sum::<u32>(), 150);
    assert!(
        by_replica.len() >= 2,
        "the balancer sent everything to one replica: {by_replica:?}"
    );
    assert_eq!(stock.left("sku-1"), 1_000 - 300);
    // Not enough left: nothing is taken.
    let r = client.reserve("sku-1", 701).await.unwrap();
    assert!(!r.reserved);
    assert_eq!((r.left, stock.left("sku-1")), (700, 700));
    fleet.stop().await;
}

/// A call the limit refuses is answered as gRPC says — a status a tonic
/// client reads, with the pushback — and never reaches the replica.
#[tokio::test]
async fn a_refused_call_is_resource_exhausted_with_pushback_and_never_served() {
    let model = inventory::model();
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let replica = Replica::new("a", Stock::with([("sku-1", 10)])).work(gated(&gate, &entered));
    let (stack, limiter) = one_slot(&model);
    let fleet = Fleet::start(&model, vec![(replica, stack)]).await;
    let client = InventoryClient::connect(&fleet.urls, &model).unwrap();

    let held = tokio::spawn({
        let client = client.clone();
        async move { client.reserve("sku-1", 1).await }
    });
    while entered.load(Ordering::SeqCst) == 0 {
        assert!(
            !held.is_finished(),
            "the first call ended without reaching the replica"
        );
        tokio::task::yield_now().await;
    }
    let refused = client.reserve("sku-1", 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let pushback = refused
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a refusal for load says when to come back");
    assert!(pushback.to_str().unwrap().parse::<u64>().unwrap() >= 1_000);
    assert_eq!(
        entered.load(Ordering::SeqCst),
        1,
        "the refused call was served"
    );

    gate.add_permits(1);
    let served = held.await.unwrap().unwrap();
    assert!(served.reserved);
    // The call was classified by its gRPC method: a checkout.
    let checkout = model.id("checkout").unwrap().index();
    let stats = limiter.stats();
    assert_eq!(stats.classes[checkout].admitted, 1);
    assert_eq!(stats.classes[checkout].shed_total(), 1);
    assert_eq!((stats.in_flight, stats.queued), (0, 0));
    fleet.stop().await;
}

/// The class of the request being served travels with the call: a
/// reservation made for a product page is admitted as `browse`, not as the
/// method's `checkout`.
#[tokio::test]
async fn the_callers_class_travels_with_the_call() {
    let model = inventory::model();
    let (stack, limiter) = one_slot(&model);
    let replica = Replica::new("a", Stock::with([("sku-1", 10)]));
    let fleet = Fleet::start(&model, vec![(replica, stack)]).await;
    let client = InventoryClient::connect(&fleet.urls, &model).unwrap();
    let mut request = tonic::Request::new(inventory::ReserveRequest {
        sku: "sku-1".into(),
        quantity: 1,
    });
    request
        .extensions_mut()
        .insert(CallContext::new().with_class("browse"));
    assert!(client.reserve_request(request).await.unwrap().reserved);
    let browse = model.id("browse").unwrap().index();
    let checkout = model.id("checkout").unwrap().index();
    let stats = limiter.stats();
    assert_eq!(stats.classes[browse].admitted, 1);
    assert_eq!(stats.classes[checkout].admitted, 0);
    fleet.stop().await;
}

/// A call whose caller has no time left is refused at once, with
/// `DEADLINE_EXCEEDED`: by the client when it knows (it is never sent), by
/// the replica when a trusted caller says so (it is never served).
#[tokio::test]
async fn a_call_with_no_time_left_is_refused_before_any_work() {
    let model = inventory::model();
    let gate = Arc::new(Semaphore::new(1_000));
    let entered = Arc::new(AtomicUsize::new(0));
    let replica = Replica::new("a", Stock::with([("sku-1", 10)])).work(gated(&gate, &entered));
    let fleet = Fleet::start(&model, vec![(replica, inventory::stack(&model).unwrap())]).await;

    // The client side: the request being served is already past its
    // deadline. The client points at a port nobody listens on: only a call
    // refused before it is sent can be DEADLINE_EXCEEDED (a call sent would
    // fail UNAVAILABLE).
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let client = InventoryClient::connect(&[nobody], &model).unwrap();
    let mut request = tonic::Request::new(inventory::ReserveRequest {
        sku: "sku-1".into(),
        quantity: 1,
    });
    let past = std::time::Instant::now()
        .checked_sub(std::time::Duration::from_millis(1))
        .unwrap();
    request
        .extensions_mut()
        .insert(CallContext::new().with_deadline(past));
    let status = client.reserve_request(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The server side: a trusted peer's call with no milliseconds left,
    // sent by a plain tonic client (no gratify on this side).
    // The header names `PropagateLayer` writes.
    assert_eq!(
        (TOKEN_HEADER.as_str(), DEADLINE_HEADER.as_str()),
        ("gratify-peer-token", "gratify-deadline")
    );
    let metadata = [
        ("gratify-peer-token", PEER_TOKEN),
        ("gratify-deadline", "0"),
    ];
    let status = plain_reserve(&fleet.urls[0], &metadata).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        entered.load(Ordering::SeqCst),
        0,
        "a call with no time left was served"
    );
    fleet.stop().await;
}

/// A class header from a caller the replica does not trust is ignored (the
/// call is classified by its method); from a trusted network it is taken —
/// tonic's server records the peer's address its own way, and the example
/// copies it where the trust rule reads it.
#[tokio::test]
async fn a_class_from_an_untrusted_caller_is_ignored_and_a_trusted_networks_is_taken() {
    let model = inventory::model();
    let (browse, checkout) = (
        model.id("browse").unwrap().index(),
        model.id("checkout").unwrap().index(),
    );
    let mut limiters = Vec::new();
    let mut replicas = Vec::new();
    for trust in [
        Trust::token(PEER_TOKEN).unwrap(),
        Trust::networks(["127.0.0.0/8"]).unwrap(),
    ] {
        let (stack, limiter) = one_slot(&model);
        limiters.push(limiter);
        replicas.push((
            Replica::new("a", Stock::with([("sku-1", 10)])),
            stack,
            trust,
        ));
    }
    let fleet = Fleet::start_trusting(&model, replicas).await;
    for url in &fleet.urls {
        // A plain tonic client, no token: it says the call is a browse.
        let reply = plain_reserve(url, &[("gratify-class", "browse")]).await;
        assert!(reply.unwrap().reserved);
    }
    let token_only = limiters[0].stats();
    assert_eq!(
        (
            token_only.classes[checkout].admitted,
            token_only.classes[browse].admitted
        ),
        (1, 0),
        "an untrusted caller's class was taken"
    );
    let network = limiters[1].stats();
    assert_eq!(
        (
            network.classes[checkout].admitted,
            network.classes[browse].admitted
        ),
        (0, 1),
        "a trusted network's class was ignored"
    );
    fleet.stop().await;
}
