//! The store's inventory as a gRPC service on tonic behind gratify, and the
//! store's checkout calling three replicas of it through gratify's
//! balancer.
//!
//! ```text
//! cargo run -p gratify-examples --features grpc --bin inventory
//! cargo run -p gratify-examples --features grpc --bin inventory -- serve --listen 127.0.0.1:50051 --name a
//! ```
//!
//! Without a subcommand it starts three replicas on local ports, sharing
//! one stock (as replicas share a database), and calls them as the store
//! does: checkout reservations, and "in stock?" reservations of class
//! `browse` for product pages, some while one replica is slow. It prints
//! which replica answered how many calls and what was refused, and how.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gratify::BoxError;
use gratify::balance::CallContext;
use gratify_examples::inventory::{self, InventoryClient, Replica, Stock};

#[derive(Parser)]
#[command(about = "The store's inventory over gRPC, behind gratify, called through its balancer")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one replica until Ctrl-C (its stock: an item for each of the
    /// store's products, `sku-1` … `sku-2000`, 1,000 each — its own: replicas
    /// started this way share no stock, and a release may reach another
    /// replica than its reservation, so point a store at one of them).
    Serve {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: String,
        /// The replica's name, in its answers.
        #[arg(long, default_value = "a")]
        name: String,
    },
}

fn stock() -> Stock {
    let skus: Vec<String> = (1..=gratify_examples::shop::db::PRODUCTS)
        .map(|i| format!("sku-{i}"))
        .collect();
    Stock::with(skus.iter().map(|s| (s.as_str(), 1_000)))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    gratify_examples::init_logs("warn");
    let args = Args::parse();
    let model = inventory::model();
    if let Some(Command::Serve { listen, name }) = args.command {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("inventory replica {name} on {}", listener.local_addr()?);
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        return inventory::serve(listener, Replica::new(&name, stock()), &model, shutdown)?.await;
    }

    // Three replicas; replica c answers 40 ms late, the others at once.
    let shared = stock();
    let mut urls = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        let mut replica = Replica::new(name, shared.clone());
        if name == "c" {
            replica = replica.work(Arc::new(|| {
                Box::pin(tokio::time::sleep(Duration::from_millis(40)))
            }));
        }
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        servers.push(tokio::spawn(inventory::serve(
            listener, replica, &model, shutdown,
        )?));
    }
    println!("three inventory replicas: {}", urls.join(", "));

    let client = InventoryClient::connect(&urls, &model)?;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..600u32 {
        let client = client.clone();
        let class = if i % 3 == 0 { "checkout" } else { "browse" };
        calls.spawn(async move {
            let mut request = tonic::Request::new(inventory::ReserveRequest {
                sku: format!("sku-{}", 1 + i % 9),
                quantity: 1,
            });
            // What the store's handler would hand on: the class and the
            // deadline of the request it is serving.
            let context = CallContext::new()
                .with_class(class)
                .with_deadline(std::time::Instant::now() + Duration::from_millis(300));
            request.extensions_mut().insert(context);
            (class, client.reserve_request(request).await)
        });
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    let mut refused: BTreeMap<(String, String), u32> = BTreeMap::new();
    while let Some(done) = calls.join_next().await {
        let (class, result) = done?;
        match result {
            Ok(reply) => {
                *answered
                    .entry(format!("replica {}", reply.replica))
                    .or_default() += 1;
            }
            Err(status) => {
                *refused
                    .entry((class.to_owned(), format!("{:?}", status.code())))
                    .or_default() += 1;
            }
        }
    }
    println!("answered: {answered:?}");
    println!("refused (class, gRPC status): {refused:?}");
    println!("sku-1 left: {}", shared.left("sku-1"));
    stop.send_replace(true);
    for s in servers {
        s.await??;
    }
    Ok(())
}
