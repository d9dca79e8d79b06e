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
//!    reserved (409 `cart-changed` otherwise), in one transaction with its
//!    confirmation e-mail's hand-off;
//! 4. an order not placed gives its reservations back.
//!
//! The steps run in a task of their own, so a client that hangs up in the
//! middle leaves either the order placed or the stock given back, never
//! stock taken for nothing. A release goes out without the checkout's
//! deadline (it must happen even after that has passed) and is tried
//! again a few times; the inventory classes it as a checkout's.
//!
//! What this example leaves to a production inventory: a reservation whose
//! answer is lost (the replica took the stock, the reply never came) is
//! neither counted nor given back — reservations keyed by order, so that a
//! retry is harmless and an unconfirmed one expires, close that gap.

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
    let steps = async move {
        match context {
            Some(context) => context.scope(steps(shop, user, inventory)).await,
            None => steps(shop, user, inventory).await,
        }
    };
    // On a task of its own: the handler's future may be dropped (the client
    // hung up); the steps still finish and give back what they took.
    match tokio::spawn(steps).await {
        Ok(response) => response,
        Err(e) => internal(e),
    }
}

async fn steps(shop: Shop, user: String, inventory: InventoryClient) -> Response {
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
                give_back(&inventory, reserved).await;
                return out_of_stock(product);
            }
            Err(status) => {
                tracing::warn!(product, %status, "an inventory reservation failed");
                give_back(&inventory, reserved).await;
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
            mailer.hand_off(db, order.id, user)?;
        }
        Ok(placed)
    })
    .await;
    match placed {
        Ok(Ok(order)) => json(StatusCode::CREATED, "no-store", &order),
        Ok(Err(not_placed)) => {
            give_back(&inventory, reserved).await;
            match not_placed {
                NotPlaced::Empty => error(StatusCode::CONFLICT, "empty-cart", "the cart is empty"),
                NotPlaced::Changed => error(
                    StatusCode::CONFLICT,
                    "cart-changed",
                    "the cart changed while checking out; check out again",
                ),
            }
        }
        Err(r) => {
            give_back(&inventory, reserved).await;
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

/// Gives back what a checkout reserved, outside its deadline (a release is
/// owed even when the checkout has run out of time), trying each line again
/// up to five times, 100 ms more between tries.
async fn give_back(inventory: &InventoryClient, reserved: Vec<(u32, u32)>) {
    if reserved.is_empty() {
        return;
    }
    let inventory = inventory.clone();
    // Outside the checkout's context: no deadline, and the inventory's
    // route classes it as a checkout's.
    let release = async move {
        for (product, quantity) in reserved {
            let mut tries = 0u64;
            loop {
                match inventory.release(&sku(product), quantity).await {
                    Ok(_) => break,
                    Err(status) if tries < 4 => {
                        tries += 1;
                        tracing::debug!(product, %status, "a release failed; trying again");
                        tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                    }
                    Err(status) => {
                        tracing::error!(product, quantity, %status, "stock reserved and not given back");
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::spawn(release).await;
}
