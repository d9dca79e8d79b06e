//! `shop`: the e-commerce example, served.
//!
//! ```text
//! cargo run -p gratify-examples --bin shop -- --listen 127.0.0.1:8080 --db target/shop.db
//! cargo run -p gratify-examples --features redis --bin shop -- --redis redis://127.0.0.1:6379
//! cargo run -p gratify-examples --features postgres --bin shop -- --postgres postgres://127.0.0.1/shop
//! ```
//!
//! With `--redis`, confirmation e-mails are jobs on the Redis Stream
//! `shop:mail`: they survive a restart, and every replica sends them. With
//! `--postgres`, the store itself is in PostgreSQL (replicas share it) and
//! a checkout commits the order and its e-mail's job in one transaction.
//!
//! The dashboard is at `/ops/admin/`, Prometheus text at `/ops/admin/metrics`.
//!
//! With `--features grpc` and `--inventory http://127.0.0.1:50051,…`, a
//! checkout reserves each line of its cart from the inventory before it
//! places the order. The replicas named must share their stock (as
//! replicas share a database): one `inventory serve` process has its own.
//!
//! A buyer signs up and in, then buys as the holder of the session's token:
//!
//! ```text
//! curl -d '{"email":"ann@shop.example","password":"correct horse battery"}' localhost:8080/accounts
//! curl -d '{"email":"ann@shop.example","password":"correct horse battery"}' localhost:8080/sessions
//! curl -H "Authorization: Bearer $TOKEN" -X POST localhost:8080/cart/7
//! curl -H "Authorization: Bearer $TOKEN" -X POST localhost:8080/checkout
//! curl -H "Authorization: Bearer $TOKEN" localhost:8080/orders/1
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gratify_examples::shop::Shop;

/// The e-commerce example: a store on SQLite behind a gratify Stack.
#[derive(Debug, Parser)]
#[command(name = "shop", version, about)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The SQLite file (created and seeded on first start).
    #[arg(long, default_value = "target/shop.db")]
    db: PathBuf,
    /// Queue confirmation e-mails on this Redis (durable across restarts),
    /// and share the replica advisor's measurements with the fleet there.
    #[cfg(feature = "redis")]
    #[arg(long, env = "SHOP_REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// Keep the store, and its confirmation e-mails' jobs, in this
    /// PostgreSQL database instead of SQLite.
    #[cfg(feature = "postgres")]
    #[arg(long, env = "SHOP_POSTGRES_URL", hide_env_values = true)]
    postgres: Option<String>,
    /// On SIGTERM or Ctrl-C, answer `/readyz` with 503 for this long (in
    /// seconds) before no longer accepting connections, so that load
    /// balancers stop sending traffic first; a second signal ends it.
    #[arg(long, default_value_t = 0.0)]
    readiness_grace: f64,
    /// This replica's name in the fleet (with `--redis`: replicas share
    /// their measurements, so that each recommends the fleet's count);
    /// defaults to `$POD_NAME`, then `$HOSTNAME`.
    #[cfg(feature = "redis")]
    #[arg(long)]
    replica_name: Option<String>,
    /// The fleet's name: replicas of one fleet share their measurements
    /// (give staging and production different names on one Redis).
    #[cfg(feature = "redis")]
    #[arg(long, env = "SHOP_FLEET", default_value = "shop")]
    fleet: String,
    /// Emulate a pod of this many concurrent requests (with `--pod-work-ms`),
    /// so that replicas on one machine add capacity as pods do; the advisor
    /// then sizes replicas in these slots.
    #[arg(long)]
    pod_slots: Option<u32>,
    /// The emulated work each request holds its pod slot for, ms.
    #[arg(long, default_value_t = 20.0)]
    pod_work_ms: f64,
    /// How often the replica advisor measures and recommends, seconds.
    #[arg(long, default_value_t = 15.0)]
    advise_every: f64,
    /// The inventory's replicas (`http://host:port`, comma-separated; see
    /// the `inventory` binary): a checkout reserves its lines from them,
    /// through gratify's balancer, before it places the order.
    #[cfg(feature = "grpc")]
    #[arg(long, value_delimiter = ',')]
    inventory: Vec<String>,
}

async fn open(args: &Args) -> Result<Shop, Box<dyn std::error::Error + Send + Sync>> {
    #[cfg(feature = "postgres")]
    if let Some(url) = &args.postgres {
        return Shop::open_postgres(url).await;
    }
    #[cfg(feature = "redis")]
    if let Some(url) = &args.redis {
        use gratify::offload::durable::{DurableConfig, DurableQueue};
        let client = redis::Client::open(url.as_str())?;
        let queue = DurableQueue::connect(client, DurableConfig::new("shop:mail")).await?;
        return Shop::open_durable(&args.db, queue).await;
    }
    let shop = Shop::open(&args.db)?;
    shop.resend_unconfirmed().await?;
    Ok(shop)
}

#[tokio::main]
async fn main() -> ExitCode {
    gratify_examples::init_logs("info");
    let args = Args::parse();
    // Ctrl-C or SIGTERM from the start (as PID 1 in a container, a signal
    // nobody listens for is ignored): stop accepting, finish the requests
    // in flight, then send or report every queued e-mail.
    let stopping = gratify_examples::Stopping::listen();
    if let Some(dir) = args.db.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let shop = match open(&args).await {
        Ok(shop) => shop,
        Err(e) => {
            eprintln!("shop: {}: {e}", args.db.display());
            return ExitCode::FAILURE;
        }
    };
    // With Redis, the cache is shared by the fleet: entries and purges.
    #[cfg(feature = "redis")]
    let shop = match &args.redis {
        Some(url) => match gratify::cache::tier::redis::RedisTier::open(url) {
            Ok(tier) => shop.cache_tier(tier, &format!("{}:cache", args.fleet)),
            Err(e) => {
                eprintln!("shop: redis {url}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => shop,
    };
    if !(args.pod_work_ms.is_finite() && args.pod_work_ms >= 0.0) {
        eprintln!("shop: --pod-work-ms must be a number of milliseconds, 0 or more");
        return ExitCode::FAILURE;
    }
    #[cfg(feature = "grpc")]
    let shop = if args.inventory.is_empty() {
        shop
    } else {
        let model = gratify_examples::inventory::model();
        match gratify_examples::inventory::InventoryClient::connect(&args.inventory, &model) {
            Ok(client) => shop.with_inventory(client),
            Err(e) => {
                eprintln!("shop: --inventory: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let shop = match args.pod_slots {
        Some(slots) => shop.emulate_pod(
            slots,
            std::time::Duration::try_from_secs_f64(args.pod_work_ms / 1e3).unwrap_or_default(),
        ),
        None => shop,
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("shop: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "shop: http://{}/products — dashboard http://{}/ops/admin/",
        args.listen, args.listen
    );
    let app = shop.router();
    // The replica advisor, fed every 15 s (gratify_recommended_replicas).
    #[cfg(feature = "redis")]
    let fleet = match &args.redis {
        Some(url) => redis::Client::open(url.as_str()).ok(),
        None => None,
    };
    #[cfg(feature = "redis")]
    let (fleet_name, replica) = (args.fleet.clone(), replica_name(args.replica_name.clone()));
    let args_every = args.advise_every;
    let advising = {
        let (shop, stopping) = (shop.clone(), stopping.clone().wait());
        tokio::spawn(async move {
            // Between 0.1 s and a day (beyond, the interval's arithmetic
            // would overflow; not a number: the default).
            let every = std::time::Duration::try_from_secs_f64(args_every)
                .unwrap_or(std::time::Duration::from_secs(15))
                .clamp(
                    std::time::Duration::from_millis(100),
                    std::time::Duration::from_secs(86_400),
                );
            #[cfg(feature = "redis")]
            if let Some(client) = fleet {
                return shop
                    .run_fleet_advisor(client, &fleet_name, &replica, every, stopping)
                    .await;
            }
            shop.run_advisor(every, stopping).await;
        })
    };
    #[cfg(any(feature = "redis", feature = "postgres"))]
    let mailer = {
        let shop = shop.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move { shop.run_mailer(stopping.wait()).await })
    };
    // Readiness fails first; the server stops accepting after the grace.
    let accepting = {
        let shop = shop.clone();
        stopping
            .clone()
            .then_grace(args.readiness_grace, move || shop.stop_taking_traffic())
    };
    let served = axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(accepting)
        .await;
    // The mailer finishes the e-mail it is sending; past 10 s it is left
    // (its job stays leased and is sent again by another replica).
    #[cfg(any(feature = "redis", feature = "postgres"))]
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), mailer).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), advising).await;
    let report = shop.shutdown().await;
    eprintln!(
        "shop: stopped; {} deferred job(s) run while draining, {} not run, {} still running, {} dead letter(s)",
        report.ran,
        report.not_run.len(),
        report.still_running.len(),
        report.dead_total
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shop: {e}");
            ExitCode::FAILURE
        }
    }
}

/// This replica's name in the fleet: `name`, else `$POD_NAME`, else
/// `$HOSTNAME`, else one made of the process id.
#[cfg(feature = "redis")]
fn replica_name(name: Option<String>) -> String {
    name.or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("shop-{}", std::process::id()))
}
