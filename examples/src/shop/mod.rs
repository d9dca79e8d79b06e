//! The e-commerce example: a small store on axum and SQLite, wrapped in a
//! `gratify::Stack` built from `examples/shop/shop.toml`.
//!
//! | route | class | what |
//! |---|---|---|
//! | `GET /products?page=N` | product | a catalogue page, cacheable 30 s |
//! | `GET /products/{id}` | product | a product page, cacheable 60 s |
//! | `GET /search?q=…` | search | products whose name matches, cacheable 10 s |
//! | `POST /accounts` | account | signs up: `{"email", "password"}` (Argon2id-hashed) |
//! | `POST /sessions`, `DELETE /sessions` | account | signs in (a bearer token), signs out |
//! | `GET /recommendations` | recommendations | CPU-heavy scoring on the CPU pool; private |
//! | `POST /cart/{product}` | checkout | adds one to the signed-in user's cart |
//! | `POST /checkout` | checkout | places the order; the confirmation e-mail is deferred |
//! | `GET /orders/{id}` | browse | an order's status, for its owner only (404 for anyone else); never stored |
//! | `GET /healthz`, `GET /readyz` | — | liveness and readiness, never shed |
//! | `/ops/admin/…` | — | the admin service: dashboard, snapshot, Prometheus |
//!
//! ```
//! use gratify_examples::shop::Shop;
//! use http::Request;
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! let shop = Shop::in_memory().unwrap();
//! let app = shop.router();
//! let page = Request::get("/products/7").header("host", "shop.example").body(axum::body::Body::empty()).unwrap();
//! let res = app.oneshot(page).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let json: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(json["id"], 7);
//! # shop.shutdown().await;
//! # }
//! ```

mod accounts;
pub mod db;
#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "grpc")]
mod reserving;

pub use accounts::{MAX_PASSWORD, MIN_PASSWORD, SESSION_LIFETIME};

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gratify::offload::{CpuPool, Defer, DeferConfig, DrainReport, OffloadLayer};
use gratify::scaling::advisor::{AdvisorConfig, LimiterFeed, ScalingAdvisor};
use gratify::{CostModel, Stack};
use serde::Deserialize;

use self::accounts::SignedIn;
use self::db::Db;

/// The example's configuration file.
pub const CONFIG: &str = include_str!("../../shop/shop.toml");

/// The buyers [`mix`] signs up and in before its traffic.
pub const BUYERS: u32 = 128;

/// The sign-up or sign-in (`path`) of buyer `i`: `buyer{i}@shop.example`.
fn credentials(path: &str, i: u32) -> crate::drive::Call {
    crate::drive::Call::post(path)
        .header("content-type", "application/json")
        // The token is read from the answer as it comes.
        .header("accept-encoding", "identity")
        .body(
            serde_json::json!({
                "email": format!("buyer{i}@shop.example"),
                "password": format!("correct horse battery {i}"),
            })
            .to_string(),
        )
}

/// Signs `email` up (unless it has an account) and in with `password`
/// through `app` (the store's router, or a client of a running store):
/// the session's bearer token, for `Authorization: Bearer <token>`.
///
/// # Errors
///
/// The store's answer when it is not an account or a session, in words.
pub async fn session_token<S, B>(app: S, email: &str, password: &str) -> Result<String, String>
where
    S: tower::Service<
            http::Request<axum::body::Body>,
            Response = http::Response<B>,
            Error: std::error::Error,
        > + Clone,
    B: axum::body::HttpBody,
{
    let body = serde_json::json!({ "email": email, "password": password }).to_string();
    let call = |path: &str| {
        crate::drive::Call::post(path)
            .header("content-type", "application/json")
            .header("accept-encoding", "identity")
            .body(body.clone())
    };
    let (status, answer) =
        crate::drive::send_one(app.clone(), "shop.example", call("/accounts")).await?;
    if !(status.is_success() || status == StatusCode::CONFLICT) {
        return Err(format!(
            "sign-up: {status}: {}",
            String::from_utf8_lossy(&answer)
        ));
    }
    let (status, answer) = crate::drive::send_one(app, "shop.example", call("/sessions")).await?;
    serde_json::from_slice::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_owned))
        .filter(|_| status.is_success())
        .ok_or_else(|| format!("sign-in: {status}: {}", String::from_utf8_lossy(&answer)))
}

/// The store's traffic: product and catalogue pages (popular ones far more
/// often), searches, recommendations and checkouts (a cart line, then the
/// checkout) of signed-in buyers ([`BUYERS`] of them, one arrival at a time
/// each while one is free).
pub fn mix() -> crate::drive::Mix {
    use crate::drive::{Accounts, Call, Kind, Mix};
    const WORDS: [&str; 8] = [
        "runner", "boot", "trail", "merino", "sock", "jacket", "slim", "cap",
    ];
    Mix {
        kinds: vec![
            Kind {
                class: "product".into(),
                weight: 0.45,
                // Skewed popularity: squaring a uniform draw favours low ids.
                build: |_, x| {
                    let u = (x % 10_000) as f64 / 10_000.0;
                    let id = 1 + (u * u * f64::from(db::PRODUCTS - 1)) as u32;
                    vec![Call::get(format!("/products/{id}"))]
                },
            },
            Kind {
                class: "product".into(),
                weight: 0.10,
                build: |_, x| vec![Call::get(format!("/products?page={}", 1 + x % 5))],
            },
            Kind {
                class: "search".into(),
                weight: 0.15,
                build: |_, x| vec![Call::get(format!("/search?q={}", WORDS[(x % 8) as usize]))],
            },
            Kind {
                class: "recommendations".into(),
                weight: 0.20,
                build: |_, _| vec![Call::get("/recommendations").signed_in()],
            },
            Kind {
                class: "checkout".into(),
                weight: 0.10,
                build: |_, x| {
                    vec![
                        Call::post(format!("/cart/{}", 1 + x % u64::from(db::PRODUCTS)))
                            .signed_in(),
                        Call::post("/checkout").signed_in(),
                    ]
                },
            },
        ],
        host: "shop.example".into(),
        players: None,
        accounts: Some(Accounts {
            count: BUYERS,
            sign_up: |i| credentials("/accounts", i),
            sign_in: |i| credentials("/sessions", i),
        }),
    }
}

/// The store: its data, its stack, its CPU pool and its deferred work.
///
/// The confirmation e-mail of an order goes to the deferred queue in the
/// same step that places the order, and the outbox records each order's
/// e-mail once however often it is sent. Two ways to never lose one:
///
/// - in process (the default), the orders table is the record: after a
///   crash, [`resend_unconfirmed`](Self::resend_unconfirmed) queues every
///   order without its e-mail again;
/// - with the durable backend (feature `redis`, `Shop::open_durable`), the
///   e-mail is a job on a Redis Stream that any replica's `Shop::run_mailer`
///   sends, retried, across restarts;
/// - on PostgreSQL (feature `postgres`, `Shop::open_postgres`), the store's
///   data and the e-mail's job are in one database, and a checkout commits
///   the order and its job together: neither exists without the other.
#[derive(Clone, Debug)]
pub struct Shop {
    db: Db,
    stack: Stack,
    pool: CpuPool,
    defer: Defer,
    #[cfg(any(feature = "redis", feature = "postgres"))]
    durable: Option<gratify::offload::durable::DurableQueue>,
    /// Whether `/readyz` says to send traffic here.
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Replicas the delay-cost model recommends, exported by the admin
    /// service as `gratify_recommended_replicas`.
    advisor: std::sync::Arc<ScalingAdvisor>,
    /// The capacity of a pod this replica emulates, if any.
    pod: Option<Pod>,
    /// How long a session stays open.
    session_lifetime: Duration,
    /// The inventory a checkout reserves its lines from, over gRPC.
    #[cfg(feature = "grpc")]
    inventory: Option<crate::inventory::InventoryClient>,
    /// Checkouts' reservation steps and releases that outlive their
    /// request: a shutdown waits for them.
    #[cfg(feature = "grpc")]
    background: tokio_util::task::TaskTracker,
    /// Password hashes at once: one per core (each is tens of milliseconds
    /// of a core and 19 MiB); more sign-ins wait their turn, and no flood
    /// of them takes the blocking pool from the store's queries.
    hashing: std::sync::Arc<tokio::sync::Semaphore>,
}

/// A pod's capacity, emulated: `slots` requests at a time, each holding its
/// slot for `work` (waited, not computed) on top of the real work. On one
/// machine, replicas of an emulated pod add capacity as replicas on their
/// own machines do, so that scaling decisions show (the fleet example).
#[derive(Debug, Clone)]
struct Pod {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    work: Duration,
}

/// Holds a pod slot for the request's emulated and real work (not for the
/// probes, which a pod answers however busy).
async fn in_pod(
    State(pod): State<Pod>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if matches!(request.uri().path(), "/healthz" | "/readyz") {
        return next.run(request).await;
    }
    let Ok(_slot) = pod.slots.acquire().await else {
        return next.run(request).await;
    };
    tokio::time::sleep(pod.work).await;
    next.run(request).await
}

/// Concurrent requests one replica of the store serves at its knee: what
/// the advisor sizes replicas in. Measure yours (docs/deployment.md).
pub const SLOTS_PER_REPLICA: u32 = 32;

/// The durable job of a confirmation e-mail.
#[cfg(any(feature = "redis", feature = "postgres"))]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SendConfirmation {
    /// The order.
    pub order: i64,
    /// Where to send it.
    pub email: String,
}

#[cfg(any(feature = "redis", feature = "postgres"))]
impl gratify::offload::durable::DurableJob for SendConfirmation {
    const NAME: &'static str = "shop.send-confirmation";
}

#[derive(Deserialize)]
struct PageQuery {
    page: Option<u32>,
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
}

fn json(status: StatusCode, cache: &'static str, body: &impl serde::Serialize) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

/// An error in the one shape the store's handlers and routes answer with:
/// `{"error": {"code": "<stable, for programs>", "message": "<for people>"}}`,
/// never cached. A request the Stack refuses under load, before any
/// handler, gets the same shape (`refusal_body = "json"` in shop.toml: code
/// `overloaded`, with `x-gratify-shed` and `Retry-After`).
fn error(status: StatusCode, code: &'static str, message: &str) -> Response {
    json(
        status,
        "no-store",
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}

/// A path parameter, or — when the path does not hold one of its type —
/// the store's error shape (400 `bad-path`) instead of axum's plain text.
struct Param<T>(T);

impl<S, T> axum::extract::FromRequestParts<S> for Param<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match UrlPath::<T>::from_request_parts(parts, state).await {
            Ok(UrlPath(value)) => Ok(Self(value)),
            // A route that does not fit its handler is the store's fault.
            Err(e) if e.status().is_server_error() => Err(internal(e.body_text())),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, "bad-path", &e.body_text())),
        }
    }
}

/// A query string, or — when it does not hold the handler's parameters —
/// the store's error shape (400 `bad-query`).
struct QueryParam<T>(T);

impl<S, T> axum::extract::FromRequestParts<S> for QueryParam<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, "bad-query", &e.body_text())),
        }
    }
}

/// A method a route does not serve.
async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this page does not take that method",
    )
}

/// Any path the store does not serve.
async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not-found", "no such page")
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "store error");
    // What went wrong stays in the log: the client learns only that it did.
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the store could not answer",
    )
}

/// Sends the confirmation of `order` (records it in the outbox, once) on
/// the blocking pool.
async fn send(db: Db, order: i64, email: String) -> Result<(), gratify::BoxError> {
    tokio::task::spawn_blocking(move || db.send_confirmation(order, &email)).await??;
    Ok(())
}

/// Runs a store query on the blocking pool.
async fn query<T: Send + 'static>(
    db: &Db,
    f: impl FnOnce(&Db) -> db::DbResult<T> + Send + 'static,
) -> Result<T, Response> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || f(&db)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
}

impl Shop {
    /// The store with its data at `path` (created and seeded on first
    /// start) and the stack of [`CONFIG`].
    ///
    /// # Errors
    ///
    /// The store cannot be opened, or the configuration is invalid.
    pub fn open(path: &Path) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::with(Db::open(path)?, CONFIG)
    }

    /// The store in memory (for tests and the demo).
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub fn in_memory() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::with(Db::in_memory()?, CONFIG)
    }

    /// The store over `db` with the stack of `config`.
    ///
    /// # Errors
    ///
    /// The configuration is invalid.
    pub fn with(db: Db, config: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let stack = Stack::from_config(config)?;
        let model = stack.model();
        let pool = CpuPool::new(None, 256);
        let defer = Defer::start(
            &model,
            stack.limiter().map(|l| l.load_signal().clone()),
            DeferConfig::default().max_queue(100_000),
        );
        Ok(Self {
            db,
            stack,
            pool,
            defer,
            #[cfg(any(feature = "redis", feature = "postgres"))]
            durable: None,
            ready: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            advisor: std::sync::Arc::new(ScalingAdvisor::new(
                &model,
                AdvisorConfig::new(SLOTS_PER_REPLICA),
            )),
            pod: None,
            session_lifetime: SESSION_LIFETIME,
            hashing: accounts::hashing(),
            #[cfg(feature = "grpc")]
            inventory: None,
            #[cfg(feature = "grpc")]
            background: tokio_util::task::TaskTracker::new(),
        })
    }

    /// Checkouts reserve each cart line from `inventory` (item
    /// `sku-{product}`) before the order is placed, through gratify's
    /// balancer, carrying the checkout's class and remaining deadline: a
    /// line out of stock is 409 `out-of-stock`, an inventory that cannot
    /// answer 503 `inventory-unavailable`, and an order not placed after
    /// all gives its reservations back.
    #[cfg(feature = "grpc")]
    #[must_use]
    pub fn with_inventory(mut self, inventory: crate::inventory::InventoryClient) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// Sessions opened from now on stay open for `lifetime` (a day unless
    /// set), in whole seconds: a fraction counts as a second, zero closes
    /// them as they open.
    #[must_use]
    pub fn with_session_lifetime(mut self, lifetime: Duration) -> Self {
        self.session_lifetime = lifetime;
        self
    }

    /// Emulates a pod of `slots` concurrent requests, each holding its slot
    /// for `work` more than its real work, and sizes replicas in `slots`
    /// (the advisor's slots per replica). For running a fleet on one
    /// machine; call it before [`router`](Self::router).
    #[must_use]
    pub fn emulate_pod(mut self, slots: u32, work: Duration) -> Self {
        let slots = slots.max(1);
        self.pod = Some(Pod {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(slots as usize)),
            work,
        });
        self.advisor = std::sync::Arc::new(ScalingAdvisor::new(
            &self.model(),
            AdvisorConfig::new(slots),
        ));
        self
    }

    /// The store at `path` whose confirmation e-mails are jobs on `queue`
    /// (a Redis Stream): they survive a restart of the store, and any
    /// replica's [`run_mailer`](Self::run_mailer) sends them. Orders left
    /// without their e-mail by a crash are queued again.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open), or the queue refuses the orders to resend.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub async fn open_durable(
        path: &Path,
        queue: gratify::offload::durable::DurableQueue,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let mut shop = Self::open(path)?;
        shop.durable = Some(queue);
        shop.resend_unconfirmed().await?;
        Ok(shop)
    }

    /// The store in PostgreSQL at `url` (shared by every replica), whose
    /// confirmation e-mails are durable jobs in the same database: a
    /// checkout queues its e-mail in the order's own transaction (the
    /// outbox), and any replica's [`run_mailer`](Self::run_mailer) sends it.
    ///
    /// # Errors
    ///
    /// PostgreSQL cannot be reached or refuses.
    #[cfg(feature = "postgres")]
    pub async fn open_postgres(
        url: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        use gratify::offload::durable::{DurableConfig, DurableQueue};
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        let queue = DurableQueue::postgres(pool.clone(), DurableConfig::new("shop:mail")).await?;
        let db = Db::postgres(pool, Some(queue.clone())).await?;
        let mut shop = Self::with(db, CONFIG)?;
        shop.durable = Some(queue);
        Ok(shop)
    }

    /// Sends the durable queue's confirmation e-mails until `shutdown`
    /// completes (at once without a durable queue). Run one per replica.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    pub async fn run_mailer(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> gratify::offload::durable::WorkerReport {
        let Some(queue) = &self.durable else {
            return gratify::offload::durable::WorkerReport::default();
        };
        let mut worker = queue.worker();
        let db = self.db.clone();
        let q = queue.clone();
        worker.register(move |job: SendConfirmation, ctx| {
            let (db, q) = (db.clone(), q.clone());
            async move {
                use gratify::offload::durable::Effect;
                // Recorded only once sent; released if the send fails, so
                // the retry sends. (The outbox row is keyed by order too:
                // a send whose record was lost with its worker is counted,
                // not doubled.)
                match q.claim_effect(&ctx.key, Duration::from_secs(60)).await? {
                    Effect::Claimed(claim) => match send(db, job.order, job.email).await {
                        Ok(()) => {
                            claim.done("sent", Duration::from_secs(7 * 86_400)).await?;
                            Ok(())
                        }
                        Err(e) => {
                            claim.release().await?;
                            Err(e)
                        }
                    },
                    Effect::Done(_) => Ok(()),
                    // Being sent by another attempt: tried again when its
                    // claim ends, no attempt counted.
                    Effect::InProgress(later) => Err(later.into()),
                    _ => Err("the confirmation is in an unknown state".into()),
                }
            }
        });
        worker.run(shutdown).await
    }

    /// Queues again the confirmation of every order that has none in the
    /// outbox (after a crash between placing an order and handing its
    /// e-mail off, or with queued e-mails lost with the process). Sending
    /// one twice is harmless: the outbox records it once. Returns how many.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub async fn resend_unconfirmed(
        &self,
    ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let shop = self.clone();
        let resent = tokio::task::spawn_blocking(move || {
            let orders = shop.db.unconfirmed()?;
            for (id, user) in &orders {
                // The order's user is its account's e-mail address.
                shop.hand_off(&shop.db, *id, user.clone())?;
            }
            Ok::<_, db::DbError>(orders.len())
        })
        .await??;
        if resent > 0 {
            tracing::info!(orders = resent, "confirmations queued again");
        }
        Ok(resent)
    }

    /// [`hand_off`](Self::hand_off) for an order already committed: a
    /// failure is logged, not returned — the order stands, and the e-mail
    /// is queued again at the next start (`resend_unconfirmed`), so the
    /// client is not told its placed order failed.
    fn hand_off_placed(&self, db: &Db, order: i64, email: String) {
        if let Err(e) = self.hand_off(db, order, email) {
            tracing::warn!(order, error = %e, "a placed order's e-mail was not handed off; it is sent after the next start");
        }
    }

    /// Hands the confirmation of `order` off: to the durable queue if there
    /// is one, else to the deferred queue; sent inline if the queue refuses.
    /// Runs on a blocking thread (it may wait for Redis).
    fn hand_off(&self, db: &Db, order: i64, email: String) -> db::DbResult<()> {
        if db.queues_confirmations() {
            // Queued by the checkout, in the order's own transaction.
            return Ok(());
        }
        #[cfg(any(feature = "redis", feature = "postgres"))]
        if let Some(queue) = &self.durable {
            let job = SendConfirmation {
                order,
                email: email.clone(),
            };
            let queued = tokio::runtime::Handle::try_current()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    // Keyed by order: a copy queued again after a restart,
                    // or after an enqueue that timed out, is sent once.
                    // The store's id too: order ids repeat across database
                    // files, and the effect records outlive one.
                    let store = db.store_id().map_err(|e| e.to_string())?;
                    rt.block_on(queue.enqueue_with_key(&job, &format!("confirm-{store}-{order}")))
                        .map_err(|e| e.to_string())
                });
            return match queued {
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::warn!(order, error = %e, "the confirmation could not be queued; sending it inline");
                    db.send_confirmation(order, &email).map(|_| ())
                }
            };
        }
        let model = self.model();
        let class = model.id("email").unwrap_or_else(|| model.default_class());
        let mailer = db.clone();
        let mail = email.clone();
        // Deferred, retried, and recorded once in the outbox however often
        // it runs.
        let job = move || send(mailer.clone(), order, mail.clone());
        if let Err(e) = self.defer.spawn(format!("confirm-{order}"), class, job) {
            // The queue is full or closing: send it now rather than lose it.
            tracing::warn!(order, error = %e, "the confirmation could not be deferred; sending it inline");
            db.send_confirmation(order, &email)?;
        }
        Ok(())
    }

    /// The stack.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// The store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The deferred work (confirmation e-mails).
    pub fn defer(&self) -> &Defer {
        &self.defer
    }

    /// The app without gratify: the same handlers, nothing around them (the
    /// load driver's baseline).
    pub fn plain_router(&self) -> Router {
        self.routes(false)
    }

    /// The replica advisor (fed by [`run_advisor`](Self::run_advisor)).
    pub fn advisor(&self) -> &ScalingAdvisor {
        &self.advisor
    }

    /// Feeds the advisor this replica's traffic every `every` until `stop`
    /// completes: what `gratify_recommended_replicas` on the admin service
    /// rests on. For one replica; a fleet shares its measurements with
    /// [`run_fleet_advisor`](Self::run_fleet_advisor).
    pub async fn run_advisor(&self, every: Duration, stop: impl Future<Output = ()>) {
        let Some(limiter) = self.stack.limiter().cloned() else {
            return;
        };
        let mut feed = LimiterFeed::new(&self.model());
        let mut tick = tokio::time::interval(every);
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => feed.feed(&self.advisor, &limiter, tokio::time::Instant::now()),
            }
        }
    }

    /// As [`run_advisor`](Self::run_advisor), for the replica `replica` of
    /// the fleet `fleet` sharing the Redis of `client`: its measurements
    /// are published there and the advisor is fed everyone's, so that every
    /// replica recommends the fleet's count. While Redis cannot be reached
    /// (at start, or later) rounds are skipped — a replica alone would
    /// recommend for its share — and the advisor's last recommendation is
    /// exported as stale. Leaves the fleet when `stop` completes (waiting
    /// at most a second for Redis).
    #[cfg(feature = "redis")]
    pub async fn run_fleet_advisor(
        &self,
        client: redis::Client,
        fleet: &str,
        replica: &str,
        every: Duration,
        stop: impl Future<Output = ()>,
    ) {
        use gratify::fleet::FleetExchange;
        let Some(limiter) = self.stack.limiter().cloned() else {
            return;
        };
        let model = self.model();
        let mut exchange: Option<FleetExchange> = None;
        let mut feed = LimiterFeed::new(&model);
        let mut tick = tokio::time::interval(every);
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {}
            }
            let now = tokio::time::Instant::now();
            let mine = feed.measure(&limiter, now);
            if exchange.is_none() {
                let connect = FleetExchange::connect(client.clone(), fleet, replica, &model);
                match tokio::time::timeout(every / 2, connect).await {
                    Ok(Ok(joined)) => exchange = Some(joined),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "fleet exchange unreachable; round skipped");
                    }
                    Err(_) => tracing::warn!("fleet exchange timed out; round skipped"),
                }
            }
            if let (Some(exchange), Some(mine)) = (&exchange, mine) {
                match tokio::time::timeout(every / 2, exchange.exchange(&mine)).await {
                    Ok(Ok(all)) => self.advisor.observe(now, all),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "fleet exchange failed; round skipped");
                    }
                    Err(_) => tracing::warn!("fleet exchange timed out; round skipped"),
                }
            }
        }
        if let Some(exchange) = exchange {
            let _ = tokio::time::timeout(Duration::from_secs(1), exchange.leave()).await;
        }
    }

    /// Shares the cache with every replica given the same Redis tier and
    /// namespace: entries one replica stored are hits on the others, and a
    /// purge on one reaches all. Call it before [`router`](Self::router).
    #[cfg(feature = "redis")]
    #[must_use]
    pub fn cache_tier(
        mut self,
        tier: gratify::cache::tier::redis::RedisTier,
        namespace: &str,
    ) -> Self {
        self.stack = self
            .stack
            .cache_tier(tier, gratify::cache::tier::TierConfig::new(namespace));
        self
    }

    /// The app wrapped in the stack, with the admin service at `/ops/admin`
    /// and cache purges at `/ops/purge` (both outside the stack; operations
    /// endpoints for the fleet's own network, not the public).
    pub fn router(&self) -> Router {
        let admin = self
            .stack
            .admin()
            .with_pool("cpu", self.pool.clone())
            .with_defer("mail", self.defer.clone())
            .with_advisor(std::sync::Arc::clone(&self.advisor));
        let purge = self.stack.cache_purge();
        let routes = match &self.pod {
            Some(pod) => self
                .routes(true)
                .layer(axum::middleware::from_fn_with_state(pod.clone(), in_pod)),
            None => self.routes(true),
        };
        routes
            .layer(self.stack.clone())
            .nest_service("/ops/admin", admin)
            .route(
                "/ops/purge",
                post(move |scope: QueryParam<PurgeScope>| purge_cache(purge.clone(), scope)),
            )
            .method_not_allowed_fallback(method_not_allowed)
    }

    fn routes(&self, offload: bool) -> Router {
        let model = self.stack.model();
        let recommendations = get(recommend);
        let recommendations = if offload {
            // Its refusals in the store's error shape, as the limit's.
            recommendations.layer(
                OffloadLayer::new(self.pool.clone(), &model)
                    .refusal_body(gratify::refusal::RefusalBody::json()),
            )
        } else {
            recommendations
        };
        // The session is looked up before the work goes to the CPU pool: a
        // pool thread never waits on the database, nor works for no one.
        let recommendations = recommendations.layer(axum::middleware::from_fn_with_state(
            self.clone(),
            accounts::require_session,
        ));
        Router::new()
            .route("/products", get(catalogue))
            .route("/products/{id}", get(product))
            .route("/search", get(search))
            .route(
                "/accounts",
                post(accounts::sign_up)
                    .layer(axum::extract::DefaultBodyLimit::max(accounts::MAX_BODY)),
            )
            .route(
                "/sessions",
                post(accounts::sign_in)
                    .delete(accounts::sign_out)
                    .layer(axum::extract::DefaultBodyLimit::max(accounts::MAX_BODY)),
            )
            .route("/recommendations", recommendations)
            .route("/cart/{product}", post(add_to_cart))
            .route("/checkout", post(checkout))
            .route("/orders/{id}", get(order))
            // Exempt from the stack in shop.toml: answered however loaded.
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(self.clone())
    }

    /// Makes `/readyz` answer 503 from now on, so that load balancers stop
    /// sending requests before the server stops accepting them.
    pub fn stop_taking_traffic(&self) {
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sends what is deferred and stops: every e-mail of a placed order is in
    /// the outbox when it returns (within `deadline`).
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.defer.drain(deadline).await
    }

    /// Drains the deferred work (within 10 s) and stops the pool; returns
    /// what the drain did.
    pub async fn shutdown(&self) -> DrainReport {
        // Checkouts still reserving or giving stock back finish first (10 s
        // at most): their orders' e-mails are then in the drain.
        #[cfg(feature = "grpc")]
        {
            self.background.close();
            if tokio::time::timeout(Duration::from_secs(10), self.background.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    tasks = self.background.len(),
                    "checkout steps still running at shutdown"
                );
            }
        }
        let report = self.drain(Duration::from_secs(10)).await;
        self.pool.shutdown_async(Duration::from_secs(2)).await;
        report
    }

    /// The model.
    pub fn model(&self) -> CostModel {
        self.stack.model()
    }
}

/// What `POST /ops/purge` removes: one `key`
/// (`http://shop.example/products/7`), every key under a `prefix`, or `all`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeScope {
    key: Option<String>,
    prefix: Option<String>,
    all: Option<String>,
}

/// `POST /ops/purge?prefix=http://shop.example/products` (or `key=`, or
/// `all`): removes cached entries on this replica and, with a shared tier,
/// on every replica. 204; 400 without exactly one scope; 404 without a
/// cache.
async fn purge_cache(
    purge: Option<gratify::cache::CachePurge>,
    QueryParam(scope): QueryParam<PurgeScope>,
) -> Response {
    let Some(purge) = purge else {
        return error(
            StatusCode::NOT_FOUND,
            "no-cache",
            "this store caches nothing",
        );
    };
    match (scope.key, scope.prefix, scope.all) {
        (Some(key), None, None) if !key.is_empty() => purge.purge_key(&key).await,
        (None, Some(prefix), None) if !prefix.is_empty() => purge.purge_prefix(&prefix),
        (None, None, Some(all)) if matches!(all.as_str(), "" | "true" | "1") => purge.purge_all(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-query",
                "say what to purge: one of key=, prefix= or all",
            );
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Liveness: the process answers.
async fn healthz() -> Response {
    let mut r = "ok\n".into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Readiness: 200 while the store takes traffic, 503 once it is stopping.
async fn readyz(State(shop): State<Shop>) -> Response {
    let ready = shop.ready.load(std::sync::atomic::Ordering::SeqCst);
    let mut r = if ready {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    };
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn catalogue(State(shop): State<Shop>, QueryParam(q): QueryParam<PageQuery>) -> Response {
    let page = q.page.unwrap_or(1).clamp(1, 1000);
    match query(&shop.db, move |db| db.catalogue(page)).await {
        Ok(products) => json(StatusCode::OK, "public, max-age=30", &products),
        Err(r) => r,
    }
}

async fn product(State(shop): State<Shop>, Param(id): Param<u32>) -> Response {
    match query(&shop.db, move |db| db.product(id)).await {
        Ok(Some(p)) => json(StatusCode::OK, "public, max-age=60", &p),
        Ok(None) => error(StatusCode::NOT_FOUND, "no-such-product", "no such product"),
        Err(r) => r,
    }
}

async fn search(State(shop): State<Shop>, QueryParam(q): QueryParam<SearchQuery>) -> Response {
    let text: String = q.q.unwrap_or_default().chars().take(64).collect();
    match query(&shop.db, move |db| db.search(&text)).await {
        Ok(products) => json(StatusCode::OK, "public, max-age=10", &products),
        Err(r) => r,
    }
}

/// Scores every product for `user`: a deliberately CPU-heavy loop (a few
/// milliseconds), as a real recommender's model would be.
async fn recommend(State(shop): State<Shop>, SignedIn(account): SignedIn) -> Response {
    let user = account.email;
    let features = match shop.db.features() {
        Ok(f) => f,
        Err(e) => return internal(e),
    };
    let seed = user.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut scored: Vec<(u64, u32)> = features
        .iter()
        .map(|(id, category, price)| {
            let mut x = seed ^ u64::from(*id) ^ (*price as u64);
            for b in category.bytes() {
                x ^= u64::from(b);
            }
            for _ in 0..3000 {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                x ^= x >> 29;
            }
            (x, *id)
        })
        .collect();
    scored.sort_unstable();
    let top: Vec<u32> = scored.iter().take(10).map(|(_, id)| *id).collect();
    json(
        StatusCode::OK,
        "private, no-store",
        &serde_json::json!({ "user": user, "products": top }),
    )
}

async fn add_to_cart(
    State(shop): State<Shop>,
    SignedIn(account): SignedIn,
    Param(product): Param<u32>,
) -> Response {
    let user = account.email;
    match query(&shop.db, move |db| db.add_to_cart(&user, product, 1)).await {
        Ok(true) => json(
            StatusCode::OK,
            "no-store",
            &serde_json::json!({ "added": product }),
        ),
        Ok(false) => error(StatusCode::NOT_FOUND, "no-such-product", "no such product"),
        Err(r) => r,
    }
}

async fn checkout(State(shop): State<Shop>, SignedIn(account): SignedIn) -> Response {
    #[cfg(feature = "grpc")]
    if let Some(inventory) = shop.inventory.clone() {
        return reserving::checkout(shop, account.email, inventory).await;
    }
    let user = account.email;
    let mailer = shop.clone();
    // The order and the hand-off of its confirmation e-mail happen together
    // on the blocking pool: a client that gives up (and drops this handler)
    // cannot leave an order without its e-mail.
    let placed = query(&shop.db, move |db| {
        let Some(order) = db.checkout(&user)? else {
            return Ok(None);
        };
        mailer.hand_off_placed(db, order.id, user);
        Ok(Some(order))
    })
    .await;
    match placed {
        Ok(Some(order)) => json(StatusCode::CREATED, "no-store", &order),
        Ok(None) => error(StatusCode::CONFLICT, "empty-cart", "the cart is empty"),
        Err(r) => r,
    }
}

/// An order, for its owner: anyone else gets the 404 of an order that does
/// not exist (whether it does is not theirs to learn).
async fn order(
    State(shop): State<Shop>,
    SignedIn(account): SignedIn,
    Param(id): Param<i64>,
) -> Response {
    let owner = account.email;
    match query(&shop.db, move |db| db.order(id, &owner)).await {
        Ok(Some(o)) => json(StatusCode::OK, "private, no-store", &o),
        Ok(None) => error(StatusCode::NOT_FOUND, "no-such-order", "no such order"),
        Err(r) => r,
    }
}
