//! The game backend in process: private profiles stay private, the
//! leaderboard is cached, uploads are processed later, updates are checked.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::time::Duration;

use axum::body::Body;
use gratify_examples::game::{Game, PLAYERS, seeded_rating, token};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    player: Option<u32>,
    body: &'static [u8],
) -> (StatusCode, String, String) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "game.example");
    if let Some(id) = player {
        request = request.header("authorization", format!("Bearer {}", token(id)));
    }
    let r = app
        .clone()
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = r.status();
    let cache = r
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, cache, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_players_private_profile_never_reaches_another_player() {
    let game = Game::new().unwrap();
    let app = game.router();
    // 50 players read their own profiles while others ask for them, all at
    // once and over again: the first read of each is a miss that others
    // would coalesce onto, the rest are hits.
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..4u32 {
        for owner in 0..50u32 {
            for asker in [owner, (owner + 1) % 50, (owner + 17 + round) % 50] {
                let app = app.clone();
                tasks.spawn(async move {
                    let path = format!("/players/{owner}/profile");
                    let (status, cache, body) =
                        call(&app, Method::GET, &path, Some(asker), b"").await;
                    (owner, asker, status, cache, body)
                });
            }
        }
    }
    let mut hits = 0;
    while let Some(done) = tasks.join_next().await {
        let (owner, asker, status, cache, body) = done.unwrap();
        if asker == owner {
            assert_eq!(status, StatusCode::OK, "{body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["id"], owner, "{body}");
            assert_eq!(json["email"], format!("player{owner}@players.example"));
            hits += usize::from(cache.contains("hit"));
        } else {
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "player {asker} got player {owner}'s profile: {cache} {body}"
            );
            assert!(!body.contains("@players.example"), "{body}");
        }
    }
    assert!(hits > 0, "profiles are cached for their owner");
    // Without a credential: nothing, and nothing from the cache.
    let (status, cache, body) = call(&app, Method::GET, "/players/3/profile", None, b"").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{cache} {body}");
    game.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaderboard_is_cached_and_public() {
    let game = Game::new().unwrap();
    let app = game.router();
    let (status, first, body) = call(&app, Method::GET, "/leaderboard", None, b"").await;
    assert_eq!(status, StatusCode::OK);
    assert!(first.contains("stored"), "{first}");
    let top: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(top.as_array().unwrap().len(), 50);
    // The best 50 of everyone, best first.
    let mut all: Vec<(i32, u32)> = (0..PLAYERS).map(|id| (-seeded_rating(id), id)).collect();
    all.sort_unstable();
    for (rank, (rating, id)) in all.iter().take(50).enumerate() {
        assert_eq!(top[rank]["rating"], -rating, "rank {rank}");
        assert_eq!(top[rank]["id"], *id, "rank {rank}");
    }
    // Asked by a player, or by no one: the same cached page.
    let (_, cache, again) = call(&app, Method::GET, "/leaderboard", Some(4), b"").await;
    assert!(cache.contains("hit"), "{cache}");
    assert_eq!(again, body);
    game.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_accepted_at_once_and_processed_later() {
    let game = Game::new().unwrap();
    let app = game.router();
    let (status, _, body) = call(&app, Method::POST, "/replays", Some(9), b"frames...").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = json["replay"].as_u64().unwrap();
    let report = game.drain(Duration::from_secs(10)).await;
    assert!(
        report.dead.is_empty() && report.not_run.is_empty(),
        "{report:?}"
    );
    assert_eq!(game.replays_processed(), 1);
    let path = format!("/replays/{id}");
    let (status, _, body) = call(&app, Method::GET, &path, Some(9), b"").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("processed"), "{body}");
    // Another player cannot see it.
    let (status, _, _) = call(&app, Method::GET, &path, Some(10), b"").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Refused uploads: no credential, no bytes.
    let (status, _, _) = call(&app, Method::POST, "/replays", None, b"x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&app, Method::POST, "/replays", Some(9), b"").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // The plain app processes before it answers.
    let plain = Game::new().unwrap();
    let (status, _, body) = call(
        &plain.plain_router(),
        Method::POST,
        "/replays",
        Some(9),
        b"frames",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(plain.replays_processed(), 1);
    game.shutdown().await;
    plain.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matchmaking_finds_the_nearest_ratings_from_the_index() {
    let game = Game::new().unwrap();
    // Behind gratify (on the CPU pool) and plain (on the async threads):
    // the same answer, the three nearest ratings a scan of every player
    // would find.
    for (app, pooled) in [(game.router(), true), (game.plain_router(), false)] {
        let ran = game.pool().stats().done;
        for me in [0u32, 5, 77_777, PLAYERS - 1] {
            let (status, _, body) = call(&app, Method::POST, "/matchmaking", Some(me), b"").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let found: Vec<u32> = json["opponents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(found.len(), 3);
            assert!(!found.contains(&me));
            let mine = seeded_rating(me);
            let mut got: Vec<i32> = found
                .iter()
                .map(|&o| (seeded_rating(o) - mine).abs())
                .collect();
            got.sort_unstable();
            let mut all: Vec<i32> = (0..PLAYERS)
                .filter(|&o| o != me)
                .map(|o| (seeded_rating(o) - mine).abs())
                .collect();
            all.sort_unstable();
            assert_eq!(got, all[..3], "player {me}");
        }
        let on_pool = game.pool().stats().done - ran;
        assert_eq!(on_pool > 0, pooled, "{on_pool} on the pool");
        let (status, _, _) = call(&app, Method::POST, "/matchmaking", None, b"").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    game.shutdown().await;
}

/// The probes: `/healthz` always answers, `/readyz` answers 200 until the
/// game stops taking traffic and 503 after; neither is cached.
#[tokio::test]
async fn readiness_fails_first_when_the_game_stops_taking_traffic() {
    let game = Game::new().unwrap();
    let app = game.router();
    let probe = |path: &'static str| {
        let app = app.clone();
        async move {
            let r = app
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
            assert!(r.headers().get("cache-status").is_none(), "{path}: exempt");
            r.status()
        }
    };
    assert_eq!(probe("/readyz").await, 200);
    assert_eq!(probe("/healthz").await, 200);
    game.stop_taking_traffic();
    assert_eq!(probe("/readyz").await, 503);
    assert_eq!(probe("/healthz").await, 200);
    let report = game.shutdown().await;
    assert!(report.not_run.is_empty(), "{report:?}");
}
