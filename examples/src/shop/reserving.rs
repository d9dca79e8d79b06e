//! A checkout that reserves its lines from the inventory service (gRPC,
//! through gratify's balancer) before it places the order.
//!
//! The order of events, and what each failure leaves:
//!
//! 1. the cart's lines are read;
//! 2. each line is reserved (`sku-{product}`), with the checkout's class
//!    and remaining deadline: a line out of stock, or an inventory that
//!    cannot answer, gives back what was reserved and answers 409
//!    `out-of-stock` or 503 `inventory-unavailable`;
//! 3. the order is placed only if the cart still holds exactly the lines
//!    reserved (409 `cart-changed` otherwise), then its confirmation e-mail
//!    is handed off (a failure there is logged: the order stands, and the
//!    e-mail is queued again at the next start);
//! 4. an order not placed gives its reservations back, in the background
//!    (the client is answered at once).
//!
//! The steps run in a task of their own, tracked so that a shutdown waits
//! for them, so a client that hangs up in the middle leaves the order
//! placed or the stock given back. A release goes out without the
//! checkout's deadline (it must happen even after that has passed), each
//! line at once, each try bounded to 10 s (longer than a replica's queue
//! holds a call); the inventory ranks a release above every other call and
//! never sheds it for cost or deadline (its class `release`). A release is
//! tried again only when it certainly did nothing (refused for load by the
//! replica's limit): one that timed out or lost its connection may have
//! been applied, and a second would make stock.
//!
//! What this example leaves to a production inventory: a reservation or a
//! release whose answer is lost — the deadline passed, or the connection
//! broke after the replica acted — is neither counted nor repeated, so
//! stock can stay taken. Reservations keyed by order (a retry harmless, an
//! unconfirmed one expiring) close that gap.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use gratify::balance::CallContext;

use super::db::NotPlaced;
use super::{Shop, error, internal, json};
use crate::inventory::InventoryClient;

/// The inventory's item of a product.
pub(crate) fn sku(product: u32) -> String {
    format!("sku-{product}")
}

/// Places `user`'s order, its lines reserved from `inventory` first.
pub(crate) async fn checkout(shop: Shop, user: String, inventory: InventoryClient) -> Response {
    let context = CallContext::current();
    let background = shop.background.clone();
    let steps = async move {
        match context {
            Some(context) => context.scope(steps(shop, user, inventory)).await,
            None => steps(shop, user, inventory).await,
        }
    };
    // On a task of its own: the handler's future may be dropped (the client
    // hung up); the steps still finish and give back what they took.
    match background.spawn(steps).await {
        Ok(response) => response,
        Err(e) => internal(e),
    }
}

async fn steps(shop: Shop, user: String, inventory: InventoryClient) -> Response {
    let give_back = |reserved: Vec<(u32, u32)>| give_back(&shop, &inventory, reserved);
    let lines = {
        let user = user.clone();
        match super::query(&shop.db, move |db| db.cart(&user)).await {
            Ok(lines) => lines,
            Err(r) => return r,
        }
    };
    if lines.is_empty() {
        return error(StatusCode::CONFLICT, "empty-cart", "the cart is empty");
    }
    let mut reserved: Vec<(u32, u32)> = Vec::with_capacity(lines.len());
    for &(product, quantity) in &lines {
        match inventory.reserve(&sku(product), quantity).await {
            Ok(reply) if reply.reserved => reserved.push((product, quantity)),
            Ok(_) => {
                give_back(reserved);
                return out_of_stock(product);
            }
            Err(status) => {
                tracing::warn!(product, %status, "an inventory reservation failed");
                give_back(reserved);
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "inventory-unavailable",
                    "the stock could not be checked; try again",
                );
            }
        }
    }
    let mailer = shop.clone();
    let expected = lines.clone();
    let placed = super::query(&shop.db, move |db| {
        let placed = db.checkout_of(&user, Some(&expected))?;
        if let Ok(order) = &placed {
            // Committed: whatever happens to the e-mail's hand-off, the
            // order stands and keeps its stock.
            mailer.hand_off_placed(db, order.id, user);
        }
        Ok(placed)
    })
    .await;
    match placed {
        Ok(Ok(order)) => json(StatusCode::CREATED, "no-store", &order),
        Ok(Err(not_placed)) => {
            give_back(reserved);
            match not_placed {
                NotPlaced::Empty => error(StatusCode::CONFLICT, "empty-cart", "the cart is empty"),
                NotPlaced::Changed => error(
                    StatusCode::CONFLICT,
                    "cart-changed",
                    "the cart changed while checking out; check out again",
                ),
            }
        }
        // The database failed before a commit (an error after one is not
        // returned): nothing was placed.
        Err(r) => {
            give_back(reserved);
            r
        }
    }
}

fn out_of_stock(product: u32) -> Response {
    let mut r = error(
        StatusCode::CONFLICT,
        "out-of-stock",
        "a product in the cart is out of stock",
    );
    // Which one, for the client to show.
    if let Ok(v) = http::HeaderValue::from_str(&product.to_string()) {
        r.headers_mut().insert("x-out-of-stock", v);
    }
    r
}

/// Gives back what a checkout reserved, in the background (tracked for
/// shutdown), outside its deadline (a release is owed even when the
/// checkout has run out of time): every line at once, each try bounded to
/// 10 s, tried again (five times at most, 100 ms more between tries)
/// only when it certainly did nothing.
fn give_back(shop: &Shop, inventory: &InventoryClient, reserved: Vec<(u32, u32)>) {
    if reserved.is_empty() {
        return;
    }
    let mut releases = tokio::task::JoinSet::new();
    for (product, quantity) in reserved {
        let inventory = inventory.clone();
        releases.spawn(async move { release(&inventory, product, quantity).await });
    }
    // `JoinSet` tasks start without the checkout's task-local context.
    shop.background
        .spawn(async move { while releases.join_next().await.is_some() {} });
}

async fn release(inventory: &InventoryClient, product: u32, quantity: u32) {
    for tries in 1..=5u64 {
        // Longer than a replica's queue may hold it (5 s): a release still
        // waiting there is not given up as if it might have been applied.
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            inventory.release(&sku(product), quantity),
        )
        .await;
        let status = match outcome {
            Ok(Ok(_)) => return,
            Ok(Err(status)) => status,
            Err(_) => {
                tracing::error!(
                    product,
                    quantity,
                    "a release timed out: it may or may not have been applied"
                );
                return;
            }
        };
        // Refused for load by the replica's limit: nothing was done.
        // (`UNAVAILABLE` is not enough: tonic reports a connection reset
        // after the replica acted the same way.)
        let nothing_done = status.code() == tonic::Code::ResourceExhausted;
        if !nothing_done || tries == 5 {
            tracing::error!(product, quantity, %status, "stock reserved and not given back");
            return;
        }
        tracing::debug!(product, %status, "a release was refused; trying again");
        tokio::time::sleep(Duration::from_millis(100 * tries)).await;
    }
}
