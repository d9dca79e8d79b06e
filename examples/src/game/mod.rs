//! The game backend: players, a leaderboard, matchmaking, position updates
//! and replay uploads on axum, wrapped in a `gratify::Stack` built from
//! `examples/game/game.toml`.
//!
//! | route | class | what |
//! |---|---|---|
//! | `GET /leaderboard` | leaderboard | the top players; cached, stale-while-revalidate |
//! | `POST /matchmaking` | matchmaking | opponents of the nearest rating; deadline 200 ms |
//! | `PUT /players/{id}/state` | state | a position update; worthless after 50 ms |
//! | `GET /players/{id}/profile` | profile | the player's own profile; cached per player |
//! | `POST /replays` | replay | accepted at once; processed later on the CPU pool |
//! | `GET /replays/{id}` | browse | whether a replay is processed |
//! | `/ops/admin/…` | — | the admin service: dashboard, snapshot, Prometheus |
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use gratify::offload::{CpuPool, Defer, DeferConfig, DrainReport};
use gratify::{CostModel, Stack};
use serde::{Deserialize, Serialize};

/// The example's configuration file.
pub const CONFIG: &str = include_str!("../../game/game.toml");

/// Players in the seeded world.
pub const PLAYERS: u32 = 100_000;

/// Replay statuses kept in memory before the processed ones are forgotten.
const MAX_STATUSES: usize = 1_000_000;

/// The largest replay accepted.
pub const MAX_REPLAY: usize = 1 << 20;

fn mix64(mut z: u64) -> u64 {
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

#[derive(Debug, Clone)]
struct Player {
    name: String,
    rating: i32,
    coins: u64,
    replays: u32,
    x: f32,
    y: f32,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum ReplayStatus {
    Queued,
    Processed,
}

#[derive(Debug)]
struct World {
    players: RwLock<Vec<Player>>,
    tokens: HashMap<String, u32>,
    replays: Mutex<HashMap<u64, (u32, ReplayStatus)>>,
    next_replay: AtomicU64,
    processed: AtomicU64,
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
    ready: Arc<std::sync::atomic::AtomicBool>,
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
fn analyse(replay: &[u8]) -> i32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..400 {
        for b in replay {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    (h % 21) as i32 - 10
}

impl Game {
    /// The backend with its seeded world and the stack of [`CONFIG`].
    ///
    /// # Errors
    ///
    /// The configuration is invalid.
    pub fn new() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::with_config(CONFIG)
    }

    /// The backend with the stack of `config`.
    ///
    /// # Errors
    ///
    /// The configuration is invalid.
    pub fn with_config(config: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let stack = Stack::from_config(config)?;
        let model = stack.model();
        let players = (0..PLAYERS)
            .map(|id| {
                let r = mix64(u64::from(id));
                Player {
                    name: format!("player{id}"),
                    rating: 1000 + (r % 1500) as i32,
                    coins: (r >> 20) % 10_000,
                    replays: 0,
                    x: 0.0,
                    y: 0.0,
                    seq: 0,
                }
            })
            .collect();
        let tokens = (0..PLAYERS).map(|id| (token(id), id)).collect();
        let world = Arc::new(World {
            players: RwLock::new(players),
            tokens,
            replays: Mutex::new(HashMap::new()),
            next_replay: AtomicU64::new(1),
            processed: AtomicU64::new(0),
        });
        let pool = CpuPool::new(None, 1024);
        let defer = Defer::start(
            &model,
            stack.limiter().map(|l| l.load_signal().clone()),
            DeferConfig::default().max_queue(100_000),
        );
        Ok(Self {
            world,
            stack,
            pool,
            defer,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        })
    }

    /// The stack.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// The model.
    pub fn model(&self) -> CostModel {
        self.stack.model()
    }

    /// Replays processed so far.
    pub fn replays_processed(&self) -> u64 {
        self.world.processed.load(Ordering::Relaxed)
    }

    /// The app without gratify: the same handlers, nothing around them, and
    /// replays processed inline before the upload is answered (the load
    /// driver's baseline).
    pub fn plain_router(&self) -> Router {
        self.routes(false)
    }

    /// The app wrapped in the stack (replays processed later, on the CPU
    /// pool), with the admin service at `/ops/admin`.
    pub fn router(&self) -> Router {
        let admin = self
            .stack
            .admin()
            .with_pool("cpu", self.pool.clone())
            .with_defer("replays", self.defer.clone());
        self.routes(true)
            .layer(self.stack.clone())
            .nest_service("/ops/admin", admin)
    }

    fn routes(&self, deferred: bool) -> Router {
        let upload = if deferred {
            post(upload_deferred)
        } else {
            post(upload_inline)
        };
        Router::new()
            .route("/leaderboard", get(leaderboard))
            .route("/matchmaking", post(matchmaking))
            .route("/players/{id}/state", put(update_state))
            .route("/players/{id}/profile", get(profile))
            .route("/replays", upload)
            .route("/replays/{id}", get(replay_status))
            // Exempt from the stack in game.toml: answered however loaded.
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self.clone())
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

    /// Drains (within 10 s) and stops the pool; returns what the drain did.
    pub async fn shutdown(&self) -> DrainReport {
        let report = self.drain(Duration::from_secs(10)).await;
        self.pool.shutdown_async(Duration::from_secs(2)).await;
        report
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Player>> {
        self.world
            .players
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Player>> {
        self.world
            .players
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a processed replay to its player.
    fn finish_replay(&self, replay: u64, player: u32, delta: i32) {
        if let Some(p) = self.write().get_mut(player as usize) {
            p.rating = (p.rating + delta).clamp(0, 5000);
            p.replays += 1;
        }
        let mut replays = self
            .world
            .replays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = replays.get_mut(&replay)
            && r.1 == ReplayStatus::Queued
        {
            r.1 = ReplayStatus::Processed;
            self.world.processed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn new_replay(&self, player: u32) -> u64 {
        let id = self.world.next_replay.fetch_add(1, Ordering::Relaxed);
        let mut replays = self
            .world
            .replays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The statuses live in memory: past a bound, forget the processed
        // ones (their results are in the players' ratings).
        if replays.len() >= MAX_STATUSES {
            replays.retain(|_, (_, status)| *status == ReplayStatus::Queued);
        }
        replays.insert(id, (player, ReplayStatus::Queued));
        id
    }
}

#[derive(Serialize)]
struct Entry {
    rank: usize,
    id: u32,
    name: String,
    rating: i32,
}

/// The top 50: a sort of every player's rating, as a real leaderboard query
/// would scan a table — the expensive read the cache saves.
async fn leaderboard(State(game): State<Game>) -> Response {
    let top: Vec<Entry> = {
        let players = game.read();
        let mut order: Vec<(i32, u32)> = players
            .iter()
            .enumerate()
            .map(|(id, p)| (-p.rating, id as u32))
            .collect();
        order.sort_unstable();
        order
            .iter()
            .take(50)
            .enumerate()
            .map(|(rank, (_, id))| Entry {
                rank: rank + 1,
                id: *id,
                name: players[*id as usize].name.clone(),
                rating: players[*id as usize].rating,
            })
            .collect()
    };
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

/// Three opponents of the nearest rating among the players near the
/// caller's in the world.
async fn matchmaking(State(game): State<Game>, headers: HeaderMap) -> Response {
    let Some(me) = player(&game.world, &headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first\n");
    };
    let opponents = {
        let players = game.read();
        let Some(mine) = players.get(me as usize).map(|p| p.rating) else {
            return refuse(StatusCode::NOT_FOUND, "no such player\n");
        };
        let mut candidates: Vec<(i32, u32)> = players
            .iter()
            .enumerate()
            .filter(|(id, _)| *id as u32 != me)
            .map(|(id, p)| ((p.rating - mine).abs(), id as u32))
            .collect();
        if candidates.len() > 3 {
            candidates.select_nth_unstable(3);
        }
        let mut best: Vec<(i32, u32)> = candidates.into_iter().take(3).collect();
        best.sort_unstable();
        best.into_iter().map(|(_, id)| id).collect()
    };
    json(
        StatusCode::OK,
        "no-store",
        &Match {
            player: me,
            opponents,
        },
    )
}

#[derive(Deserialize)]
struct StateUpdate {
    x: f32,
    y: f32,
    seq: u64,
}

/// A position update; an older one than the last applied is ignored.
async fn update_state(
    State(game): State<Game>,
    Path(id): Path<u32>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if player(&game.world, &headers) != Some(id) {
        return refuse(StatusCode::FORBIDDEN, "not your player\n");
    }
    let Ok(update) = serde_json::from_slice::<StateUpdate>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "expected {x, y, seq}\n");
    };
    if !(update.x.is_finite() && update.y.is_finite()) {
        return refuse(StatusCode::BAD_REQUEST, "x and y must be finite\n");
    }
    if let Some(p) = game.write().get_mut(id as usize)
        && update.seq > p.seq
    {
        (p.x, p.y, p.seq) = (update.x, update.y, update.seq);
    }
    refuse(StatusCode::NO_CONTENT, "")
}

/// The player's own profile. Stored by shared caches only keyed by the
/// credential (`Vary: Authorization`); anyone else gets 403.
async fn profile(State(game): State<Game>, Path(id): Path<u32>, headers: HeaderMap) -> Response {
    match player(&game.world, &headers) {
        None => return refuse(StatusCode::UNAUTHORIZED, "log in first\n"),
        Some(me) if me != id => return refuse(StatusCode::FORBIDDEN, "not your profile\n"),
        Some(_) => {}
    }
    let Some(p) = game.read().get(id as usize).cloned() else {
        return refuse(StatusCode::NOT_FOUND, "no such player\n");
    };
    let body = Profile {
        id,
        email: format!("{}@players.example", p.name),
        name: p.name,
        coins: p.coins,
        rating: p.rating,
        replays: p.replays,
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

/// The baseline: the replay is analysed before the upload is answered.
async fn upload_inline(State(game): State<Game>, headers: HeaderMap, body: Bytes) -> Response {
    let me = match check_upload(&game, &headers, &body) {
        Ok(me) => me,
        Err((status, text)) => return refuse(status, text),
    };
    let id = game.new_replay(me);
    let delta = analyse(&body);
    game.finish_replay(id, me, delta);
    json(
        StatusCode::CREATED,
        "no-store",
        &serde_json::json!({ "replay": id, "status": ReplayStatus::Processed }),
    )
}

/// With gratify: the upload is accepted at once; the analysis is deferred
/// (run when the load allows) and offloaded (on the CPU pool, off the
/// async threads).
async fn upload_deferred(State(game): State<Game>, headers: HeaderMap, body: Bytes) -> Response {
    let me = match check_upload(&game, &headers, &body) {
        Ok(me) => me,
        Err((status, text)) => return refuse(status, text),
    };
    let id = game.new_replay(me);
    let model = game.model();
    let class = model
        .id("replay_processing")
        .unwrap_or_else(|| model.default_class());
    let worker = game.clone();
    let job = move || {
        let game = worker.clone();
        let body = body.clone();
        async move {
            let delta = game
                .pool
                .run(0.0, None, move || analyse(&body))
                .await
                .map_err(|e| -> gratify::BoxError { e.to_string().into() })?;
            game.finish_replay(id, me, delta);
            Ok(())
        }
    };
    if let Err(e) = game.defer.spawn(format!("replay-{id}"), class, job) {
        tracing::warn!(replay = id, error = %e, "cannot queue the replay");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "try the upload later\n");
    }
    json(
        StatusCode::ACCEPTED,
        "no-store",
        &serde_json::json!({ "replay": id, "status": ReplayStatus::Queued }),
    )
}

async fn replay_status(
    State(game): State<Game>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    let Some(me) = player(&game.world, &headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first\n");
    };
    let found = game
        .world
        .replays
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .copied();
    match found {
        Some((owner, status)) if owner == me => json(
            StatusCode::OK,
            "no-store",
            &serde_json::json!({ "replay": id, "status": status }),
        ),
        _ => refuse(StatusCode::NOT_FOUND, "no such replay\n"),
    }
}

/// The game's traffic: position updates most, then profile reads, the
/// leaderboard, matchmaking and replay uploads (8 KiB each), from players
/// spread over the world.
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
                class: "state".into(),
                weight: 0.50,
                build: |n, x| {
                    let id = who(x);
                    let body = format!(
                        r#"{{"x":{},"y":{},"seq":{}}}"#,
                        (x >> 20) % 1000,
                        (x >> 40) % 1000,
                        n + 1
                    );
                    vec![auth(
                        Call::new(http::Method::PUT, format!("/players/{id}/state"))
                            .header("content-type", "application/json")
                            .body(body),
                        id,
                    )]
                },
            },
            Kind {
                class: "profile".into(),
                weight: 0.15,
                // A few hundred active players read their profile often.
                build: |_, x| {
                    let id = who(x % 300);
                    vec![auth(Call::get(format!("/players/{id}/profile")), id)]
                },
            },
            Kind {
                class: "leaderboard".into(),
                weight: 0.15,
                build: |_, _| vec![Call::get("/leaderboard")],
            },
            Kind {
                class: "matchmaking".into(),
                weight: 0.12,
                build: |_, x| vec![auth(Call::post("/matchmaking"), who(x))],
            },
            Kind {
                class: "replay".into(),
                weight: 0.08,
                build: |n, x| {
                    let body: Vec<u8> = (0..8192u64).map(|i| (mix64(n ^ i) & 0xff) as u8).collect();
                    vec![auth(Call::post("/replays").body(body), who(x))]
                },
            },
        ],
        host: "game.example".into(),
        accounts: None,
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
