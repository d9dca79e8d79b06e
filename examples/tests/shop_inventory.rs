//! The store's checkout reserving its lines from the gRPC inventory across
//! three replicas (sharing one stock), through gratify's balancer: stock is
//! taken once per placed order and given back for an order not placed —
//! out of stock, a cart that changed, an inventory that cannot answer, a
//! client that hangs up in the middle (not when a call's answer is lost:
//! see the store's `reserving` module). Calls are held in flight by a gate
//! the test opens; nothing waits on the clock to decide a result.
#![cfg(feature = "grpc")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use gratify_examples::inventory::{self, InventoryClient, Replica, Stock};
use gratify_examples::shop::{Shop, session_token};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// Three replicas sharing `stock`, each call first awaiting a permit of
/// `gate` (counted in `entered`).
struct Inventory {
    urls: Vec<String>,
    stop: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<Result<(), gratify::BoxError>>>,
    gate: Arc<Semaphore>,
    entered: Arc<AtomicUsize>,
}

impl Inventory {
    async fn start(stock: &Stock, open: bool) -> Self {
        let model = inventory::model();
        let gate = Arc::new(Semaphore::new(if open {
            Semaphore::MAX_PERMITS
        } else {
            0
        }));
        let entered = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let mut urls = Vec::new();
        let mut servers = Vec::new();
        for name in ["a", "b", "c"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            urls.push(format!("http://{}", listener.local_addr().unwrap()));
            let (gate, entered) = (Arc::clone(&gate), Arc::clone(&entered));
            let work: inventory::Work = Arc::new(move || {
                let (gate, entered) = (Arc::clone(&gate), Arc::clone(&entered));
                Box::pin(async move {
                    entered.fetch_add(1, Ordering::SeqCst);
                    drop(gate.acquire().await.unwrap());
                })
            });
            let replica = Replica::new(name, stock.clone()).work(work);
            let mut stopped = stopped.clone();
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            servers.push(tokio::spawn(
                inventory::serve(listener, replica, &model, shutdown).unwrap(),
            ));
        }
        Self {
            urls,
            stop,
            servers,
            gate,
            entered,
        }
    }

    /// Stops the replicas and waits until they have.
    async fn stop(&mut self) {
        self.stop.send_replace(true);
        for server in self.servers.drain(..) {
            server.await.unwrap().unwrap();
        }
    }

    fn open(&self) {
        self.gate
            .add_permits(Semaphore::MAX_PERMITS - self.gate.available_permits());
    }

    fn shop(&self) -> Shop {
        let client = InventoryClient::connect(&self.urls, &inventory::model()).unwrap();
        Shop::in_memory().unwrap().with_inventory(client)
    }
}

async fn post(
    app: &axum::Router,
    path: &str,
    token: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let request = Request::post(path)
        .header("host", "shop.example")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let r = app.clone().oneshot(request).await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

async fn buyer(app: &axum::Router, name: &str) -> String {
    session_token(
        app.clone(),
        &format!("{name}@shop.example"),
        "correct horse battery",
    )
    .await
    .unwrap()
}

/// Waits (a bound for liveness, not a measure of speed) until `done`.
async fn eventually(mut done: impl FnMut() -> bool) {
    for _ in 0..3_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_reserves_its_lines_across_the_replicas() {
    let stock = Stock::with([("sku-3", 5), ("sku-4", 1)]);
    let mut inventory = Inventory::start(&stock, true).await;
    let shop = inventory.shop();
    let app = shop.router();
    let ann = buyer(&app, "ann").await;
    for path in ["/cart/3", "/cart/3", "/cart/4"] {
        assert_eq!(post(&app, path, &ann).await.0, StatusCode::OK);
    }
    let (status, _, body) = post(&app, "/checkout", &ann).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let order: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(order["items"], serde_json::json!([[3, 2], [4, 1]]));
    assert_eq!((stock.left("sku-3"), stock.left("sku-4")), (3, 0));
    assert_eq!(
        inventory.entered.load(Ordering::SeqCst),
        2,
        "one reservation per line"
    );
    shop.shutdown().await;
    inventory.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_out_of_stock_gives_back_what_was_reserved() {
    let stock = Stock::with([("sku-3", 5), ("sku-4", 0)]);
    let mut inventory = Inventory::start(&stock, true).await;
    let shop = inventory.shop();
    let app = shop.router();
    let bob = buyer(&app, "bob").await;
    for path in ["/cart/3", "/cart/4"] {
        assert_eq!(post(&app, path, &bob).await.0, StatusCode::OK);
    }
    let (status, headers, body) = post(&app, "/checkout", &bob).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("out-of-stock"), "{body}");
    assert_eq!(headers["x-out-of-stock"], "4");
    // sku-3 was reserved, then given back (after the answer); nothing
    // placed; the cart kept.
    eventually(|| stock.left("sku-3") == 5).await;
    assert_eq!(shop.db().counts().unwrap().0, 0);
    assert_eq!(
        shop.db().cart("bob@shop.example").unwrap(),
        vec![(3, 1), (4, 1)]
    );
    shop.shutdown().await;
    inventory.stop().await;
}

/// The cart changes while its lines are being reserved: the order is not
/// placed from a cart whose new line no one reserved; the stock comes back,
/// and checking out again reserves and places both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_that_changed_while_reserving_is_not_placed() {
    let stock = Stock::with([("sku-3", 5), ("sku-5", 5)]);
    let mut inventory = Inventory::start(&stock, false).await;
    let shop = inventory.shop();
    let app = shop.router();
    let cy = buyer(&app, "cy").await;
    assert_eq!(post(&app, "/cart/3", &cy).await.0, StatusCode::OK);
    let checkout = tokio::spawn({
        let (app, cy) = (app.clone(), cy.clone());
        async move { post(&app, "/checkout", &cy).await }
    });
    eventually(|| inventory.entered.load(Ordering::SeqCst) == 1).await;
    // Held at the inventory: the cart gains a line meanwhile.
    assert_eq!(post(&app, "/cart/5", &cy).await.0, StatusCode::OK);
    inventory.open();
    let (status, _, body) = checkout.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("cart-changed"), "{body}");
    eventually(|| stock.left("sku-3") == 5).await;
    assert_eq!(shop.db().counts().unwrap().0, 0);
    let (status, _, body) = post(&app, "/checkout", &cy).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!((stock.left("sku-3"), stock.left("sku-5")), (4, 4));
    shop.shutdown().await;
    inventory.stop().await;
}

/// A client that hangs up while its lines are being reserved: the checkout
/// finishes without it — the order placed with its e-mail, the stock taken
/// once — rather than stock taken for an order that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_reservation_leaves_no_stock_taken_for_nothing() {
    let stock = Stock::with([("sku-3", 5)]);
    let mut inventory = Inventory::start(&stock, false).await;
    let shop = inventory.shop();
    let app = shop.router();
    let dee = buyer(&app, "dee").await;
    assert_eq!(post(&app, "/cart/3", &dee).await.0, StatusCode::OK);
    let checkout = tokio::spawn({
        let (app, dee) = (app.clone(), dee.clone());
        async move { post(&app, "/checkout", &dee).await }
    });
    eventually(|| inventory.entered.load(Ordering::SeqCst) == 1).await;
    checkout.abort();
    assert!(checkout.await.unwrap_err().is_cancelled());
    inventory.open();
    // (The stock is untouched until the gate opens: only the order tells
    // that the checkout went on.)
    eventually(|| shop.db().counts().unwrap().0 == 1).await;
    let drained = shop.drain(Duration::from_secs(10)).await;
    assert!(drained.dead.is_empty(), "{drained:?}");
    let (orders, mails) = shop.db().counts().unwrap();
    assert_eq!((orders, mails), (1, 1));
    assert_eq!(stock.left("sku-3"), 4, "taken once, for the order placed");
    shop.shutdown().await;
    inventory.stop().await;
}

/// No inventory to ask: no order, nothing taken, the cart kept, and the
/// client told to try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_inventory_to_ask_no_order_is_placed() {
    let stock = Stock::with([("sku-3", 5)]);
    let mut inventory = Inventory::start(&stock, true).await;
    // Ports nothing listens on any more.
    inventory.stop().await;
    let shop = inventory.shop();
    let app = shop.router();
    let eve = buyer(&app, "eve").await;
    assert_eq!(post(&app, "/cart/3", &eve).await.0, StatusCode::OK);
    let (status, _, body) = post(&app, "/checkout", &eve).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("inventory-unavailable"), "{body}");
    assert_eq!(stock.left("sku-3"), 5);
    assert_eq!(shop.db().counts().unwrap().0, 0);
    assert_eq!(shop.db().cart("eve@shop.example").unwrap(), vec![(3, 1)]);
    shop.shutdown().await;
}

/// A shutdown waits for a checkout still reserving (its client gone): the
/// order it places is drained with its e-mail, rather than cut off by the
/// process ending halfway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_a_checkout_still_reserving() {
    let stock = Stock::with([("sku-3", 5)]);
    let mut inventory = Inventory::start(&stock, false).await;
    let shop = inventory.shop();
    let app = shop.router();
    let fay = buyer(&app, "fay").await;
    assert_eq!(post(&app, "/cart/3", &fay).await.0, StatusCode::OK);
    let checkout = tokio::spawn({
        let (app, fay) = (app.clone(), fay.clone());
        async move { post(&app, "/checkout", &fay).await }
    });
    eventually(|| inventory.entered.load(Ordering::SeqCst) == 1).await;
    checkout.abort();
    let shutting = tokio::spawn({
        let shop = shop.clone();
        async move { shop.shutdown().await }
    });
    // Held at the inventory: the shutdown waits (however slow the machine,
    // it cannot have finished without the reservation's answer).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!shutting.is_finished(), "shut down with a checkout halfway");
    inventory.open();
    let report = shutting.await.unwrap();
    assert!(
        report.dead.is_empty() && report.not_run.is_empty(),
        "{report:?}"
    );
    assert_eq!(shop.db().counts().unwrap(), (1, 1));
    assert_eq!(stock.left("sku-3"), 4);
    inventory.stop().await;
}
