//! The game backend: a WebSocket session per player for real-time play, and
//! HTTP for the rest — a leaderboard, matchmaking, profiles and replay
//! uploads — on axum, wrapped in a `gratify::Stack` built from
//! `examples/game/game.toml`.
//!
//! | route | class | what |
//! |---|---|---|
//! | `GET /play` | session | the player's WebSocket session: moves and purchases in, a frame per tick out ([`play`](self::Session)) |
//! | `GET /leaderboard` | leaderboard | the top players, from a maintained index; cached, stale-while-revalidate |
//! | `POST /matchmaking` | matchmaking | opponents of the nearest rating, from the index, on the CPU pool; deadline 200 ms |
//! | `GET /players/{id}/profile` | profile | the player's own profile; cached per player |
//! | `POST /replays` | replay | kept in the database, accepted at once; processed later on the CPU pool |
//! | `GET /replays/{id}` | browse | whether a replay is processed |
//! | `/ops/admin/…` | — | the admin service: dashboard, snapshot, Prometheus |
//!
//! Messages of a session are not requests, so the Stack does not see them:
//! each asks the Stack's limiter for a slot itself, with a deadline (a move
//! waits no later than its tick's end; see [`Session`]).
//!
//! Every route but the leaderboard needs `Authorization: Bearer <token>`
//! ([`token`] gives a seeded player's). A profile answers only its own
//! player, and is cached keyed by the credential (`Vary: Authorization`), so
//! one player's profile is never served to another.
//!
//! ```
//! use gratify_examples::game::{Game, token};
//! use http::Request;
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! let game = Game::new().unwrap();
//! let app = game.router();
//! let mine = Request::get("/players/7/profile")
//!     .header("host", "game.example")
//!     .header("authorization", format!("Bearer {}", token(7)))
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! let res = app.clone().oneshot(mine).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let json: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(json["id"], 7);
//!
//! let theirs = Request::get("/players/7/profile")
//!     .header("host", "game.example")
//!     .header("authorization", format!("Bearer {}", token(8)))
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! assert_eq!(app.oneshot(theirs).await.unwrap().status(), 403);
//! # game.shutdown().await;
//! # }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UriPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gratify::offload::{CpuPool, Defer, DeferConfig, DrainReport, OffloadLayer};
use gratify::{ClassId, CostModel, Stack};
use serde::Serialize;

mod play;
mod store;
mod world;

pub use self::play::{
    ClientMessage, Frames, IDLE, ITEMS, MAX_MESSAGE, PURCHASES_IN_FLIGHT, PlayStats, SEND_TIMEOUT,
    ServerMessage, Session,
};
pub use self::store::{Bought, Store, StoreResult, Stored};
pub use self::world::{MAX_STEP, NEAR, SIDE, SIGHT, TICK};

use self::play::{Counters, Seat};
use self::world::{Clock, Player, Players};

/// The example's configuration file.
pub const CONFIG: &str = include_str!("../../game/game.toml");

/// Players in the seeded world.
pub const PLAYERS: u32 = 100_000;

/// The largest replay accepted.
pub const MAX_REPLAY: usize = 1 << 20;

pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bearer token of seeded player `id` (deterministic, for clients and
/// tests; a real game would issue them at login).
pub fn token(id: u32) -> String {
    format!("p{id}.{:016x}", mix64(u64::from(id) ^ 0x5eed_6a3e))
}

/// A player's rating in the seeded world, before any replay.
pub fn seeded_rating(id: u32) -> i32 {
    1000 + (mix64(u64::from(id)) % 1500) as i32
}

/// A player's coins in the seeded world, before any purchase.
pub fn seeded_coins(id: u32) -> u64 {
    (mix64(u64::from(id)) >> 20) % 10_000
}

/// A player as the profile shows it to that player.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Profile {
    /// The id.
    pub id: u32,
    /// The display name.
    pub name: String,
    /// The e-mail address (private).
    pub email: String,
    /// Coins in the wallet (private).
    pub coins: u64,
    /// The rating.
    pub rating: i32,
    /// Replays processed.
    pub replays: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum ReplayStatus {
    Queued,
    Processed,
}

#[derive(Debug)]
pub(crate) struct World {
    players: RwLock<Players>,
    tokens: HashMap<String, u32>,
    store: Store,
    processed: AtomicU64,
    clock: Clock,
    seats: Mutex<HashMap<u32, Seat>>,
    next_seat: AtomicU64,
    play: Counters,
    /// The tick loop is running (it starts with the first session, on the
    /// runtime that serves it).
    ticking: AtomicBool,
    /// Replays with a processing job queued (until the job is gone: done,
    /// dead or drained).
    in_queue: Mutex<std::collections::HashSet<u64>>,
    /// The sweep is running (it starts with the router behind gratify).
    sweeping: AtomicBool,
    /// The game stopped: the tick loop ends.
    stopped: AtomicBool,
}

impl World {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Players> {
        self.players
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Players> {
        self.players
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a processed replay and applies its result to its player, if
    /// it was not processed before (blocks on the database).
    fn finish_replay(&self, replay: u64, player: u32, delta: i32) -> StoreResult<()> {
        if self.store.finish_replay(replay, delta)? {
            let mut players = self.write();
            players.rate(player, i64::from(delta));
            if let Some(p) = players.get_mut(player) {
                p.replays += 1;
            }
            self.processed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn seats(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Seat>> {
        self.seats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The classes the game asks the limiter for itself.
#[derive(Debug, Clone, Copy)]
struct Classes {
    state: ClassId,
    purchase: ClassId,
    replay_processing: ClassId,
}

/// The game backend: its world, its stack, its CPU pool and its deferred
/// replay processing.
#[derive(Clone, Debug)]
pub struct Game {
    world: Arc<World>,
    stack: Stack,
    pool: CpuPool,
    defer: Defer,
    /// Whether `/readyz` says to send traffic here.
    ready: Arc<AtomicBool>,
    classes: Classes,
    /// Served behind gratify: messages ask the limiter, matchmaking and
    /// replays go to the CPU pool.
    gratify: bool,
}

/// The authenticated player, from `Authorization: Bearer <token>`.
fn player(world: &World, headers: &HeaderMap) -> Option<u32> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    world.tokens.get(token).copied()
}

fn json(status: StatusCode, cache: &'static str, body: &impl Serialize) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

fn refuse(status: StatusCode, text: &'static str) -> Response {
    let mut r = (status, text).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Analyses a replay: a checksum over its frames, many times over (as a
/// real analyser would decode and simulate them), and the match result it
/// implies, from -10 to +10 rating points.
pub fn analyse(replay: &[u8]) -> i32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..400 {
        for b in replay {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    (h % 21) as i32 - 10
}

type Error = Box<dyn std::error::Error + Send + Sync>;

impl Game {
    /// The backend with its seeded world, the stack of [`CONFIG`] and its
    /// database in memory (lost with the process; [`open`](Self::open)
    /// keeps it in a file).
    ///
    /// Call it inside a tokio runtime (its deferred work runs there; the
    /// tick loop starts with the first session, the sweep with
    /// [`router`](Self::router)).
    ///
    /// # Errors
    ///
    /// The configuration is invalid.
    pub fn new() -> Result<Self, Error> {
        Self::with_config(CONFIG)
    }

    /// The backend with the stack of `config`, its database in memory.
    ///
    /// # Errors
    ///
    /// The configuration is invalid.
    pub fn with_config(config: &str) -> Result<Self, Error> {
        Self::start(config, Store::in_memory()?)
    }

    /// The backend with the stack of `config` and its database in the
    /// SQLite file at `path` (created on first use). What a run before
    /// left — processed replays, purchases — is in the world again, and
    /// every replay accepted and not processed is queued again.
    ///
    /// # Errors
    ///
    /// The configuration is invalid, or the database cannot be opened.
    pub fn open(path: &Path, config: &str) -> Result<Self, Error> {
        Self::start(config, Store::open(path)?)
    }

    fn start(config: &str, store: Store) -> Result<Self, Error> {
        let stack = Stack::from_config(config)?;
        let model = stack.model();
        let class = |name: &str| model.id(name).unwrap_or_else(|| model.default_class());
        let classes = Classes {
            state: class("state"),
            purchase: class("purchase"),
            replay_processing: class("replay_processing"),
        };
        let results = store.replay_results()?;
        let spent = store.spent()?;
        let mut players = Players::new(
            (0..PLAYERS)
                .map(|id| Player {
                    name: format!("player{id}"),
                    base: seeded_rating(id),
                    results: 0,
                    rating: seeded_rating(id),
                    coins: seeded_coins(id).saturating_sub(spent.get(&id).copied().unwrap_or(0)),
                    replays: 0,
                    seat: 0,
                    moved: None,
                    x: (mix64(u64::from(id) ^ 0x51de) % 1000) as f32,
                    y: (mix64(u64::from(id) ^ 0x7a11) % 1000) as f32,
                    seq: 0,
                })
                .collect(),
        );
        for (&id, &(sum, count)) in &results {
            players.rate(id, sum);
            if let Some(p) = players.get_mut(id) {
                p.replays = count;
            }
        }
        let queued = store.queued_replays()?;
        let clock = Clock {
            epoch: tokio::time::Instant::now(),
        };
        let world = Arc::new(World {
            players: RwLock::new(players),
            tokens: (0..PLAYERS).map(|id| (token(id), id)).collect(),
            store,
            processed: AtomicU64::new(0),
            clock,
            seats: Mutex::new(HashMap::new()),
            next_seat: AtomicU64::new(1),
            play: Counters::default(),
            stopped: AtomicBool::new(false),
            ticking: AtomicBool::new(false),
            in_queue: Mutex::new(std::collections::HashSet::new()),
            sweeping: AtomicBool::new(false),
        });
        let pool = CpuPool::new(None, 1024);
        let defer = Defer::start(
            &model,
            stack.limiter().map(|l| l.load_signal().clone()),
            DeferConfig::default().max_queue(100_000),
        );
        let game = Self {
            world,
            stack,
            pool,
            defer,
            ready: Arc::new(AtomicBool::new(true)),
            classes,
            gratify: false,
        };
        // What the last run accepted and did not process; and from now on,
        // what could not be queued or whose job gave up.
        for (id, player) in queued {
            if game.queue_replay(id, player) != Queued::Yes {
                tracing::warn!(
                    "the replay queue is full: the rest are queued by the sweep (behind gratify) or at the next start"
                );
                break;
            }
        }
        Ok(game)
    }

    fn downgrade(&self) -> WeakGame {
        WeakGame {
            world: Arc::downgrade(&self.world),
            stack: self.stack.clone(),
            pool: self.pool.clone(),
            defer: self.defer.clone(),
            ready: Arc::clone(&self.ready),
            classes: self.classes,
        }
    }

    /// Where player `id` is.
    pub fn position(&self, id: u32) -> Option<(f32, f32)> {
        self.world.read().get(id).map(|p| (p.x, p.y))
    }

    /// The stack.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// The model.
    pub fn model(&self) -> CostModel {
        self.stack.model()
    }

    /// Replays processed by this process so far.
    pub fn replays_processed(&self) -> u64 {
        self.world.processed.load(Ordering::Relaxed)
    }

    /// The database.
    pub fn store(&self) -> &Store {
        &self.world.store
    }

    /// The player's profile as they see it.
    pub fn profile(&self, id: u32) -> Option<Profile> {
        let players = self.world.read();
        let p = players.get(id)?;
        Some(Profile {
            id,
            email: format!("{}@players.example", p.name),
            name: p.name.clone(),
            coins: p.coins,
            rating: p.rating,
            replays: p.replays,
        })
    }

    /// The app without gratify: the same handlers, nothing around them;
    /// session messages do not ask for slots, matchmaking runs on the async
    /// threads, and replays are processed before the upload is answered
    /// (the load driver's baseline).
    pub fn plain_router(&self) -> Router {
        self.routes(false)
    }

    /// The app wrapped in the stack (session messages admitted by its
    /// limiter, matchmaking on the CPU pool, replays processed later on the
    /// pool), with the admin service at `/ops/admin`.
    pub fn router(&self) -> Router {
        // Replays whose job could not be queued are picked up in this run.
        if !self.world.sweeping.swap(true, Ordering::SeqCst) {
            tokio::spawn(sweep(self.downgrade()));
        }
        let admin = self
            .stack
            .admin()
            .with_pool("cpu", self.pool.clone())
            .with_defer("replays", self.defer.clone());
        self.routes(true)
            .layer(self.stack.clone())
            .nest_service("/ops/admin", admin)
    }

    fn routes(&self, gratify: bool) -> Router {
        let game = Self {
            gratify,
            ..self.clone()
        };
        let (upload, matchmaking) = if gratify {
            let model = self.stack.model();
            (
                post(upload_deferred),
                post(matchmaking).layer(OffloadLayer::new(self.pool.clone(), &model)),
            )
        } else {
            (post(upload_inline), post(matchmaking))
        };
        Router::new()
            .route("/play", get(play::play))
            .route("/leaderboard", get(leaderboard))
            .route("/matchmaking", matchmaking)
            .route("/players/{id}/profile", get(profile))
            .route("/replays", upload)
            .route("/replays/{id}", get(replay_status))
            // Exempt from the stack in game.toml: answered however loaded.
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(game)
    }

    /// Makes `/readyz` answer 503 from now on, so that load balancers stop
    /// sending requests before the server stops accepting them.
    pub fn stop_taking_traffic(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Processes what is deferred and stops taking more (within `deadline`).
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.defer.drain(deadline).await
    }

    /// Stops the tick loop and ends every session (their sockets close),
    /// drains (within 10 s) and stops the pool; returns what the drain
    /// did. Replays not processed by then stay in the database, for the
    /// next start.
    pub async fn shutdown(&self) -> DrainReport {
        self.world.stopped.store(true, Ordering::SeqCst);
        self.world.seats().clear();
        let report = self.drain(Duration::from_secs(10)).await;
        self.pool.shutdown_async(Duration::from_secs(2)).await;
        report
    }

    /// Defers the processing of kept replay `id` (unless a job for it is
    /// queued already): read from the database, analysed and its result
    /// committed on the CPU pool when the load allows. A replay the queue
    /// refuses (full, or closed) stays in the database for the sweep or
    /// the next start.
    fn queue_replay(&self, id: u64, player: u32) -> Queued {
        if !self.in_queues().insert(id) {
            return Queued::Yes;
        }
        // Cleared when the job is gone, however it ends (done, dead letter,
        // drained), so that the sweep may queue it again.
        let listed = Listed {
            world: Arc::downgrade(&self.world),
            id,
        };
        // The job holds the world weakly and nothing of the queue: a queued
        // job keeps neither the world (and its database) nor its own queue
        // alive.
        let world = Arc::downgrade(&self.world);
        let pool = self.pool.clone();
        let job = move || {
            let _listed = &listed;
            let (world, pool) = (world.upgrade(), pool.clone());
            async move {
                let world =
                    world.ok_or_else(|| -> gratify::BoxError { "the game is gone".into() })?;
                pool.run(0.0, None, move || -> StoreResult<()> {
                    // Processed meanwhile (a retry after an ambiguous end):
                    // no data, nothing to do.
                    let Some(data) = world.store.replay_data(id)? else {
                        return Ok(());
                    };
                    world.finish_replay(id, player, analyse(&data))
                })
                .await
                .map_err(|e| -> gratify::BoxError { e.to_string().into() })?
                .map_err(|e| -> gratify::BoxError { e.to_string().into() })
            }
        };
        match self
            .defer
            .spawn(format!("replay-{id}"), self.classes.replay_processing, job)
        {
            Ok(()) => Queued::Yes,
            // Draining or stopped: kept for the next start.
            Err(gratify::offload::DeferError::Closed) => Queued::Closed,
            Err(e) => {
                tracing::debug!(replay = id, error = %e, "cannot queue the replay now");
                Queued::Full
            }
        }
    }

    fn in_queues(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.world
            .in_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The CPU pool (matchmaking behind gratify, replay analysis).
    pub fn pool(&self) -> &CpuPool {
        &self.pool
    }
}

/// Whether a replay's job is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    /// Queued (now, or before).
    Yes,
    /// The queue is full: later.
    Full,
    /// The queue is draining or closed: at the next start.
    Closed,
}

/// A replay with a job in the queue, until the job is dropped.
struct Listed {
    world: std::sync::Weak<World>,
    id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        if let Some(world) = self.world.upgrade() {
            world
                .in_queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

/// How often the sweep looks for replays kept and not queued.
pub const SWEEP: Duration = Duration::from_secs(30);

/// A game that does not keep its world alive: for its background tasks.
struct WeakGame {
    world: std::sync::Weak<World>,
    stack: Stack,
    pool: CpuPool,
    defer: Defer,
    ready: Arc<AtomicBool>,
    classes: Classes,
}

impl WeakGame {
    fn upgrade(&self) -> Option<Game> {
        let world = self.world.upgrade()?;
        Some(Game {
            world,
            stack: self.stack.clone(),
            pool: self.pool.clone(),
            defer: self.defer.clone(),
            ready: Arc::clone(&self.ready),
            classes: self.classes,
            gratify: false,
        })
    }
}

/// Every [`SWEEP`], queues the replays kept and not processed that have no
/// job queued (one that could not be queued, or whose job gave up): an
/// accepted replay is processed in this run, not only after a restart.
/// Stops at the first the queue refuses (it is full: the next sweep goes
/// on); ends with the game.
async fn sweep(game: WeakGame) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(live) = game.upgrade() else {
            return;
        };
        if live.world.stopped.load(Ordering::SeqCst) {
            return;
        }
        let world = Arc::clone(&live.world);
        let Some(Ok(queued)) = blocking(move || world.store.queued_replays()).await else {
            continue;
        };
        let mut left = 0;
        for (n, &(id, player)) in queued.iter().enumerate() {
            match live.queue_replay(id, player) {
                Queued::Yes => {}
                // Drained: nothing more runs in this process.
                Queued::Closed => return,
                Queued::Full => {
                    left = queued.len() - n;
                    break;
                }
            }
        }
        if left > 0 {
            tracing::warn!(
                left,
                "the replay queue is full; the next sweep queues the rest"
            );
        }
    }
}

/// Runs `f` on a blocking thread (the database); `None` if it panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

#[derive(Serialize)]
struct Entry {
    rank: usize,
    id: u32,
    name: String,
    rating: i32,
}

/// The top 50, read from the rating index (kept in order as ratings
/// change, not sorted per read).
async fn leaderboard(State(game): State<Game>) -> Response {
    let top: Vec<Entry> = game
        .world
        .read()
        .top(50)
        .enumerate()
        .map(|(rank, (id, p))| Entry {
            rank: rank + 1,
            id,
            name: p.name.clone(),
            rating: p.rating,
        })
        .collect();
    json(
        StatusCode::OK,
        "public, max-age=2, stale-while-revalidate=30",
        &top,
    )
}

#[derive(Serialize)]
struct Match {
    player: u32,
    opponents: Vec<u32>,
}

/// Three opponents of the nearest rating, from the rating index (behind
/// gratify, on the CPU pool: the index is read under a lock, which an async
/// thread should not wait on).
async fn matchmaking(State(game): State<Game>, headers: HeaderMap) -> Response {
    let Some(me) = player(&game.world, &headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first\n");
    };
    let opponents = game.world.read().nearest(me, 3);
    json(
        StatusCode::OK,
        "no-store",
        &Match {
            player: me,
            opponents,
        },
    )
}

/// The player's own profile. Stored by shared caches only keyed by the
/// credential (`Vary: Authorization`); anyone else gets 403.
async fn profile(
    State(game): State<Game>,
    UriPath(id): UriPath<u32>,
    headers: HeaderMap,
) -> Response {
    match player(&game.world, &headers) {
        None => return refuse(StatusCode::UNAUTHORIZED, "log in first\n"),
        Some(me) if me != id => return refuse(StatusCode::FORBIDDEN, "not your profile\n"),
        Some(_) => {}
    }
    let Some(body) = game.profile(id) else {
        return refuse(StatusCode::NOT_FOUND, "no such player\n");
    };
    let mut r = json(StatusCode::OK, "s-maxage=10, max-age=0", &body);
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("authorization"));
    r
}

/// The uploader, or why the upload is refused.
fn check_upload(
    game: &Game,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<u32, (StatusCode, &'static str)> {
    let Some(me) = player(&game.world, headers) else {
        return Err((StatusCode::UNAUTHORIZED, "log in first\n"));
    };
    if body.is_empty() || body.len() > MAX_REPLAY {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "a replay is 1 byte to 1 MiB\n",
        ));
    }
    Ok(me)
}

/// The header a client names an upload with, so that a retry after a lost
/// answer is the same upload (1 to 64 bytes).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Keeps an uploaded replay in the database: its id, and whether it is new
/// (not a retry of an upload with the same idempotency key).
async fn keep(game: &Game, me: u32, headers: &HeaderMap, body: &Bytes) -> Option<(u64, bool)> {
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .map(str::to_owned);
    let world = game.world.clone();
    let data = body.clone();
    match blocking(move || world.store.add_replay(me, key.as_deref(), &data)).await {
        Some(Ok(kept)) => Some(kept),
        Some(Err(e)) => {
            tracing::warn!(player = me, error = %e, "cannot keep a replay");
            None
        }
        None => None,
    }
}

/// The answer to an upload kept before (a retry): the replay as it is now.
async fn kept_before(game: &Game, id: u64) -> Response {
    let world = game.world.clone();
    let stored = match blocking(move || world.store.replay(id)).await {
        Some(Ok(Some((_, stored)))) => stored,
        // Kept, as the upload just found: not known to be processed.
        _ => Stored::Queued,
    };
    replay_answer(id, stored)
}

/// A replay's state as the API shows it.
fn replay_answer(id: u64, stored: Stored) -> Response {
    let status = match stored {
        Stored::Queued => ReplayStatus::Queued,
        Stored::Processed(_) => ReplayStatus::Processed,
    };
    json(
        StatusCode::OK,
        "no-store",
        &serde_json::json!({ "replay": id, "status": status }),
    )
}

/// The baseline: the replay is analysed before the upload is answered.
async fn upload_inline(State(game): State<Game>, headers: HeaderMap, body: Bytes) -> Response {
    let me = match check_upload(&game, &headers, &body) {
        Ok(me) => me,
        Err((status, text)) => return refuse(status, text),
    };
    let Some((id, new)) = keep(&game, me, &headers, &body).await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try the upload later\n");
    };
    if !new {
        return kept_before(&game, id).await;
    }
    let delta = analyse(&body);
    let worker = game.clone();
    if !matches!(
        blocking(move || worker.world.finish_replay(id, me, delta)).await,
        Some(Ok(()))
    ) {
        // Kept, so accepted: processed at the next start (the baseline has
        // no deferred work), never to be uploaded again.
        return json(
            StatusCode::ACCEPTED,
            "no-store",
            &serde_json::json!({ "replay": id, "status": ReplayStatus::Queued }),
        );
    }
    json(
        StatusCode::CREATED,
        "no-store",
        &serde_json::json!({ "replay": id, "status": ReplayStatus::Processed }),
    )
}

/// With gratify: the upload is kept in the database and accepted at once;
/// the analysis is deferred (run when the load allows) and offloaded (on
/// the CPU pool, off the async threads). A crash before it is done loses
/// nothing: the next start queues it again. With an `Idempotency-Key`
/// header, a retry of an upload is answered with the replay kept before.
async fn upload_deferred(State(game): State<Game>, headers: HeaderMap, body: Bytes) -> Response {
    let me = match check_upload(&game, &headers, &body) {
        Ok(me) => me,
        Err((status, text)) => return refuse(status, text),
    };
    let Some((id, new)) = keep(&game, me, &headers, &body).await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try the upload later\n");
    };
    if !new {
        return kept_before(&game, id).await;
    }
    // Not queued (the queue is full): kept, so the sweep queues it.
    let _ = game.queue_replay(id, me);
    json(
        StatusCode::ACCEPTED,
        "no-store",
        &serde_json::json!({ "replay": id, "status": ReplayStatus::Queued }),
    )
}

async fn replay_status(
    State(game): State<Game>,
    UriPath(id): UriPath<u64>,
    headers: HeaderMap,
) -> Response {
    let Some(me) = player(&game.world, &headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first\n");
    };
    let world = game.world.clone();
    let Some(Ok(found)) = blocking(move || world.store.replay(id)).await else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
    };
    match found {
        Some((owner, stored)) if owner == me => replay_answer(id, stored),
        _ => refuse(StatusCode::NOT_FOUND, "no such replay\n"),
    }
}

/// The game's HTTP traffic: profile reads, the leaderboard, matchmaking and
/// replay uploads (8 KiB each), from players spread over the world (moves
/// and purchases come over the players' sessions: see [`crate::play`]).
pub fn mix() -> crate::drive::Mix {
    use crate::drive::{Call, Kind, Mix};
    fn auth(call: Call, id: u32) -> Call {
        call.header("authorization", format!("Bearer {}", token(id)))
    }
    fn who(x: u64) -> u32 {
        (x % u64::from(PLAYERS)) as u32
    }
    Mix {
        kinds: vec![
            Kind {
                class: "profile".into(),
                weight: 0.30,
                // A few hundred active players read their profile often.
                build: |_, x| {
                    let id = who(x % 300);
                    vec![auth(Call::get(format!("/players/{id}/profile")), id)]
                },
            },
            Kind {
                class: "leaderboard".into(),
                weight: 0.30,
                build: |_, _| vec![Call::get("/leaderboard")],
            },
            Kind {
                class: "matchmaking".into(),
                weight: 0.24,
                build: |_, x| vec![auth(Call::post("/matchmaking"), who(x))],
            },
            Kind {
                class: "replay".into(),
                weight: 0.16,
                build: |n, x| {
                    let body: Vec<u8> = (0..8192u64).map(|i| (mix64(n ^ i) & 0xff) as u8).collect();
                    vec![auth(Call::post("/replays").body(body), who(x))]
                },
            },
        ],
        host: "game.example".into(),
        accounts: None,
        players: Some(crate::play::Players::default()),
    }
}

/// Liveness: the process answers.
async fn healthz() -> Response {
    let mut r = "ok\n".into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Readiness: 200 while the game takes traffic, 503 once it is stopping.
async fn readyz(State(game): State<Game>) -> Response {
    let mut r = if game.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    };
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
