//! Real-time play: a move counts only in its own tick, a move waits for a
//! slot no later than its tick's end, a purchase is done once however often
//! it is sent and even when it waited, a player has one seat, and an
//! accepted replay survives a crash. Time-driven cases run on tokio's
//! paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::time::Duration;

use gratify_examples::game::{
    CONFIG, Frames, Game, ITEMS, MAX_STEP, PLAYERS, SIGHT, ServerMessage, Session, analyse,
    seeded_coins, seeded_rating, token,
};
use tokio::sync::mpsc::Receiver;

/// The game with a limit of one slot, so a test can hold it.
fn one_slot() -> Game {
    let config = CONFIG.replace(
        "[limit]\nmax_queue = 4096",
        "[limit]\nalgorithm = \"fixed\"\nfixed_limit = 1\nmax_queue = 4096",
    );
    assert_ne!(config, CONFIG, "the limit section moved");
    Game::with_config(&config).unwrap()
}

async fn frame(frames: &mut Frames) -> (u64, u64) {
    let text = frames.next().await.expect("a frame");
    match serde_json::from_str(&text).unwrap() {
        ServerMessage::Tick { tick, ack, .. } => (tick, ack),
        other => panic!("not a tick: {other:?}"),
    }
}

fn step(tick: u64, seq: u64, x: f32, y: f32) -> String {
    format!(r#"{{"type":"move","tick":{tick},"seq":{seq},"x":{x},"y":{y}}}"#)
}

fn buy(id: &str, item: &str) -> String {
    format!(r#"{{"type":"buy","id":"{id}","item":"{item}"}}"#)
}

async fn answer(session: &Session, text: &str) -> ServerMessage {
    serde_json::from_str(&session.handle(text).await.expect("an answer")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_move_counts_only_in_its_own_tick() {
    let game = Game::new().unwrap();
    let (session, mut frames) = game.join(7);
    let (t, ack) = frame(&mut frames).await;
    assert_eq!(ack, 0);
    let (x0, y0) = game.position(7).unwrap();
    // In its tick: applied, and the next frame says so. A move goes at
    // most MAX_STEP, whatever the client asks.
    assert_eq!(session.handle(&step(t, 1, x0 + 500.0, y0)).await, None);
    // A second move in the same tick: dropped (one move a tick).
    session.handle(&step(t, 2, x0 + 500.0, y0)).await;
    assert_eq!(frame(&mut frames).await, (t + 1, 1));
    let (x1, y1) = game.position(7).unwrap();
    let moved = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
    assert!(moved <= MAX_STEP + 1e-3, "moved {moved}");
    // For the tick just closed (it arrived late): dropped, not applied late.
    assert_eq!(session.handle(&step(t, 3, 0.0, 0.0)).await, None);
    // For a tick not open yet: dropped too.
    session.handle(&step(t + 5, 4, 0.0, 0.0)).await;
    // An older move than the last applied (a duplicate): not applied.
    session.handle(&step(t + 1, 1, 0.0, 0.0)).await;
    assert_eq!(frame(&mut frames).await, (t + 2, 1));
    assert_eq!(game.position(7).unwrap(), (x1, y1));
    let stats = game.play_stats();
    assert_eq!(
        (stats.moves, stats.applied, stats.late, stats.dropped),
        (5, 1, 2, 2),
        "{stats:?}"
    );
    assert_eq!(stats.sessions, 1);
    // A move 30 ms into its tick still counts.
    tokio::time::advance(Duration::from_millis(30)).await;
    session.handle(&step(t + 2, 5, x1, y1 + 1.0)).await;
    assert_eq!(frame(&mut frames).await, (t + 3, 5));
    drop(session);
    assert_eq!(game.play_stats().sessions, 0);
    // Connected again: the new session counts its moves from 1, and its
    // frames acknowledge them (not the last session's).
    let (session, mut frames) = game.join(7);
    let (t, ack) = frame(&mut frames).await;
    assert_eq!(ack, 0, "a new session starts with no move");
    session.handle(&step(t, 1, x1, y1)).await;
    assert_eq!(frame(&mut frames).await, (t + 1, 1));
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_move_waits_for_a_slot_no_later_than_its_tick() {
    let game = one_slot();
    let limiter = game.stack().limiter().unwrap().clone();
    let browse = game.model().id("browse").unwrap();
    let held = limiter.admit(browse).await.unwrap();
    let (session, mut frames) = game.join(11);
    let (t, _) = frame(&mut frames).await;
    // Sent 30 ms into its tick: it waits for the slot until the tick
    // closes (20 ms), not as long as its class would (50 ms), then gives up.
    tokio::time::advance(Duration::from_millis(30)).await;
    let asked = tokio::time::Instant::now();
    session.handle(&step(t, 1, 1.0, 1.0)).await;
    assert_eq!(asked.elapsed(), Duration::from_millis(20));
    let stats = game.play_stats();
    assert_eq!((stats.applied, stats.refused), (0, 1), "{stats:?}");
    assert_eq!(
        limiter.stats().in_flight,
        1,
        "the refused move holds no slot"
    );
    // The next frame has no ack for it; with the slot free, the next move
    // counts.
    let (t, ack) = frame(&mut frames).await;
    assert_eq!(ack, 0);
    held.complete(gratify::scaling::limit::Outcome::Success);
    session.handle(&step(t, 2, 1.0, 1.0)).await;
    assert_eq!(frame(&mut frames).await, (t + 1, 2));
    assert_eq!(limiter.stats().in_flight, 0, "the move's slot is released");
    // A move whose session goes away while it waits leaves the queue.
    let held = limiter.admit(browse).await.unwrap();
    let (t, _) = frame(&mut frames).await;
    let waiting = tokio::time::timeout(
        Duration::from_millis(5),
        session.handle(&step(t, 3, 2.0, 2.0)),
    )
    .await;
    assert!(waiting.is_err(), "it waits for the slot");
    assert_eq!(limiter.stats().queued, 0, "abandoned, it left the queue");
    held.complete(gratify::scaling::limit::Outcome::Success);
    assert_eq!(limiter.stats().in_flight, 0);
    game.shutdown().await;
}

/// A player with enough coins for one skin and not two.
fn one_skin_rich() -> u32 {
    let skin = ITEMS.iter().find(|i| i.0 == "skin").unwrap().1;
    (0..1000)
        .find(|&id| (skin..2 * skin).contains(&seeded_coins(id)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_purchase_that_waited_is_done_once_however_often_it_is_sent() {
    let game = one_slot();
    let limiter = game.stack().limiter().unwrap().clone();
    let browse = game.model().id("browse").unwrap();
    let me = one_skin_rich();
    let coins = seeded_coins(me);
    let (session, _frames) = game.join(me);
    // The one slot is busy for 300 ms: the purchase waits and is then done
    // (a late purchase is still worth doing).
    let held = limiter.admit(browse).await.unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.complete(gratify::scaling::limit::Outcome::Success);
    });
    let first = answer(&session, &buy("order-1", "potion")).await;
    release.await.unwrap();
    let ServerMessage::Bought { coins: left, .. } = first else {
        panic!("{first:?}")
    };
    assert_eq!(left, coins - 10);
    // Sent again (the answer was lost): bought, not paid again.
    let again = answer(&session, &buy("order-1", "potion")).await;
    assert!(
        matches!(again, ServerMessage::Bought { coins, .. } if coins == left),
        "{again:?}"
    );
    // Sent again naming another item: still the purchase made, nothing
    // more bought or paid.
    let other_item = answer(&session, &buy("order-1", "shield")).await;
    assert!(
        matches!(&other_item, ServerMessage::Bought { item, coins, .. } if item == "potion" && *coins == left),
        "{other_item:?}"
    );
    assert_eq!(game.profile(me).unwrap().coins, left);
    assert_eq!(game.play_stats().purchases, 1);
    // Two sessions of the player buy a skin each at once, with coins for
    // one: exactly one is done.
    let (other, _frames2) = game.join(me);
    let (skin_a, skin_b) = (buy("skin-a", "skin"), buy("skin-b", "skin"));
    let (a, b) = tokio::join!(answer(&session, &skin_a), answer(&other, &skin_b));
    let bought = [&a, &b]
        .iter()
        .filter(|m| matches!(m, ServerMessage::Bought { .. }))
        .count();
    assert_eq!(bought, 1, "{a:?} {b:?}");
    assert!(
        [&a, &b]
            .iter()
            .any(|m| matches!(m, ServerMessage::Refused { reason, .. } if reason == "coins")),
        "{a:?} {b:?}"
    );
    assert_eq!(game.profile(me).unwrap().coins, left - 900);
    assert_eq!(game.store().spent().unwrap()[&me], 910);
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_purchase_refused_a_slot_spends_nothing_and_says_when_to_retry() {
    let game = one_slot();
    let limiter = game.stack().limiter().unwrap().clone();
    let held = limiter
        .admit(game.model().id("browse").unwrap())
        .await
        .unwrap();
    let (session, _frames) = game.join(3);
    let refused = answer(&session, &buy("x", "shield")).await;
    match refused {
        ServerMessage::Refused {
            reason,
            retry_after_ms,
            ..
        } => {
            assert_eq!(reason, "busy");
            assert!(retry_after_ms.unwrap() > 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(game.profile(3).unwrap().coins, seeded_coins(3));
    assert_eq!(game.play_stats().purchases_refused, 1);
    assert!(game.store().spent().unwrap().is_empty());
    drop(held);
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bad_messages_are_answered_and_the_session_goes_on() {
    let game = Game::new().unwrap();
    let (session, mut frames) = game.join(5);
    for bad in [
        "",
        "{",
        "null",
        r#"{"type":"teleport"}"#,
        r#"{"type":"move","tick":1,"seq":1,"x":1,"y":1,"speed":99}"#,
        r#"{"type":"move","tick":-1,"seq":1,"x":1,"y":1}"#,
        r#"{"type":"buy","id":"","item":"potion"}"#,
    ] {
        let reply = answer(&session, bad).await;
        assert!(
            matches!(reply, ServerMessage::Error { .. }),
            "{bad}: {reply:?}"
        );
    }
    let long = "x".repeat(65);
    assert!(matches!(
        answer(&session, &buy(&long, "potion")).await,
        ServerMessage::Error { .. }
    ));
    let reply = answer(&session, &buy("a", "castle")).await;
    assert!(
        matches!(&reply, ServerMessage::Refused { reason, .. } if reason == "item"),
        "{reply:?}"
    );
    assert!(game.store().spent().unwrap().is_empty());
    // Still playing.
    let (t, _) = frame(&mut frames).await;
    session.handle(&step(t, 1, 3.0, 3.0)).await;
    assert_eq!(frame(&mut frames).await.1, 1);
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_player_has_one_seat() {
    let game = Game::new().unwrap();
    let (first, mut first_frames) = game.join(9);
    frame(&mut first_frames).await;
    let (second, mut second_frames) = game.join(9);
    // The first connection's frames end; the second's go on.
    let ended = async { while first_frames.next().await.is_some() {} };
    tokio::time::timeout(Duration::from_secs(1), ended)
        .await
        .unwrap();
    frame(&mut second_frames).await;
    // The first session ending does not take the second's seat.
    drop(first);
    assert_eq!(game.play_stats().sessions, 1);
    frame(&mut second_frames).await;
    drop(second);
    assert_eq!(game.play_stats().sessions, 0);
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn frames_list_players_in_sight_and_a_shutdown_ends_sessions() {
    let game = Game::new().unwrap();
    // Two players in sight of each other, and one far from both.
    let (ax, ay) = game.position(1).unwrap();
    let near = (2..PLAYERS)
        .find(|&id| {
            let (x, y) = game.position(id).unwrap();
            (x - ax).powi(2) + (y - ay).powi(2) < (SIGHT * 0.8).powi(2)
        })
        .unwrap();
    let far = (2..PLAYERS)
        .find(|&id| {
            let (x, y) = game.position(id).unwrap();
            (x - ax).powi(2) + (y - ay).powi(2) > (SIGHT * 3.0).powi(2)
        })
        .unwrap();
    let (_a, mut a_frames) = game.join(1);
    let (_b, _b_frames) = game.join(near);
    let (_c, _c_frames) = game.join(far);
    let text = a_frames.next().await.unwrap();
    let ServerMessage::Tick { near: seen, .. } = serde_json::from_str(&text).unwrap() else {
        panic!("{text}")
    };
    let ids: Vec<u32> = seen.iter().map(|n| n.0).collect();
    assert_eq!(ids, vec![near], "{text}");
    game.shutdown().await;
    // The seats are gone: the frames end.
    tokio::time::timeout(Duration::from_secs(1), async {
        while a_frames.next().await.is_some() {}
    })
    .await
    .unwrap();
}

/// Removes a test's database file and its WAL companions.
fn remove_db(path: &std::path::Path) {
    for end in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{end}", path.display()));
    }
}

fn temp_db(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!("gratify-{name}-{}-{nanos}.db", std::process::id()))
}

/// Starts the `game` binary on `db`, uploads `n` replays, and kills it
/// (SIGKILL: no drain, no goodbye) right after the last is accepted; the
/// replays sent.
#[cfg(unix)]
fn upload_then_crash(db: &std::path::Path, n: u32) -> Vec<(u64, u32, Vec<u8>)> {
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_game"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--db")
        .arg(db)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the game binary");
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < until, "the game did not start");
        assert!(child.try_wait().unwrap().is_none(), "the game exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sent = Vec::new();
    for i in 0..n {
        let player = 100 + i % 4;
        // Big enough that processing them all takes a while.
        // The last one big (1 MiB): still being analysed when the game is
        // killed right after accepting it.
        let len = if i + 1 == n { 1 << 20 } else { 65_536 };
        let data: Vec<u8> = (0..len).map(|b: u32| (b * 31 + i * 7) as u8).collect();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "POST /replays HTTP/1.1\r\nhost: game.example\r\nauthorization: Bearer {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            token(player),
            data.len()
        )
        .unwrap();
        s.write_all(&data).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
        let id = answer.split("\"replay\":").nth(1).unwrap();
        let id: u64 = id[..id.find(|c: char| !c.is_ascii_digit()).unwrap()]
            .parse()
            .unwrap();
        sent.push((id, player, data));
    }
    // The crash.
    child.kill().unwrap();
    child.wait().unwrap();
    sent
}

#[cfg(unix)]
#[test]
fn an_accepted_replay_is_processed_once_after_a_crash() {
    let path = temp_db("game-crash");
    let sent = upload_then_crash(&path, 16);
    let left = {
        let store = gratify_examples::game::Store::open(&path).unwrap();
        store.queued_replays().unwrap().len()
    };
    eprintln!(
        "{left} of {} replays were not processed when the game was killed",
        sent.len()
    );
    // (Usually most; the path a start takes for them is asserted on its own
    // in `a_start_queues_again_what_was_kept_and_not_processed`.)
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The next start takes up what was left.
        let game = Game::open(&path, CONFIG).unwrap();
        let report = game.drain(Duration::from_secs(60)).await;
        assert!(
            report.not_run.is_empty() && report.dead.is_empty(),
            "{report:?}"
        );
        let mut expected: std::collections::HashMap<u32, (i64, u32)> = Default::default();
        for (id, player, data) in &sent {
            let delta = analyse(data);
            assert_eq!(
                game.store().replay(*id).unwrap(),
                Some((*player, gratify_examples::game::Stored::Processed(delta))),
                "replay {id}"
            );
            let e = expected.entry(*player).or_default();
            e.0 += i64::from(delta);
            e.1 += 1;
        }
        let check = |game: &Game| {
            for (player, (sum, count)) in &expected {
                let p = game.profile(*player).unwrap();
                let rating = (i64::from(seeded_rating(*player)) + sum).clamp(0, 5000);
                assert_eq!(
                    (i64::from(p.rating), p.replays),
                    (rating, *count),
                    "player {player}"
                );
            }
        };
        check(&game);
        assert_eq!(
            game.replays_processed(),
            left as u64,
            "the rest, processed here"
        );
        game.shutdown().await;
        drop(game);
        // Once more: nothing is processed again, nothing is counted twice.
        let game = Game::open(&path, CONFIG).unwrap();
        assert!(game.store().queued_replays().unwrap().is_empty());
        check(&game);
        let report = game.shutdown().await;
        assert_eq!(report.ran, 0, "{report:?}");
    });
    remove_db(&path);
}

/// A WebSocket through the whole Stack on a real socket: refused without a
/// credential, and with one, tick frames out and a purchase answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_plays_over_a_websocket_through_the_stack() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::{Error, Message};

    let game = Game::new().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = game.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service())
            .await
            .unwrap();
    });
    let url = format!("ws://{addr}/play");
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("without a credential: {other:?}"),
    }
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(21)).parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    // The first message is a tick frame.
    let first = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<ServerMessage>(&text).unwrap(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    };
    assert!(matches!(first, ServerMessage::Tick { .. }), "{first:?}");
    ws.send(Message::text(buy("ws-1", "potion"))).await.unwrap();
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let (mut bought, mut error) = (None, None);
    while bought.is_none() || error.is_none() {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(text) => match serde_json::from_str(&text).unwrap() {
                ServerMessage::Bought { coins, .. } => bought = Some(coins),
                ServerMessage::Error { message } => error = Some(message),
                _ => {}
            },
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
    assert_eq!(bought, Some(seeded_coins(21) - 10));
    // A message past the size limit ends the session (the server closes).
    let huge = format!(
        r#"{{"type":"buy","id":"{}","item":"potion"}}"#,
        "y".repeat(4096)
    );
    let _ = ws.send(Message::text(huge)).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the session did not end");
    let stack = game.stack().limiter().unwrap().stats();
    let session = game.model().id("session").unwrap();
    assert!(
        stack.classes[session.index()].admitted >= 1,
        "the upgrade went through the limit"
    );
    server.abort();
    game.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_purchases_never_spend_the_same_coins() {
    let game = Game::new().unwrap();
    let skin = ITEMS.iter().find(|i| i.0 == "skin").unwrap().1;
    let players: Vec<u32> = (0..PLAYERS)
        .filter(|&id| (skin..2 * skin).contains(&seeded_coins(id)))
        .take(16)
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for &me in &players {
        // Three connections of the player, each buying a skin at once.
        for n in 0..3 {
            let (session, frames) = game.join(me);
            tasks.spawn(async move {
                let answer = answer(&session, &buy(&format!("skin-{n}"), "skin")).await;
                drop(frames);
                (me, answer)
            });
        }
    }
    let mut bought = std::collections::HashMap::<u32, usize>::new();
    while let Some(done) = tasks.join_next().await {
        let (me, answer) = done.unwrap();
        match answer {
            ServerMessage::Bought { .. } => *bought.entry(me).or_default() += 1,
            ServerMessage::Refused { reason, .. } => assert_eq!(reason, "coins"),
            other => panic!("{other:?}"),
        }
    }
    for me in players {
        assert_eq!(bought.get(&me), Some(&1), "player {me}");
        assert_eq!(game.profile(me).unwrap().coins, seeded_coins(me) - skin);
        assert_eq!(game.store().spent().unwrap()[&me], skin);
    }
    game.shutdown().await;
}

async fn upload(
    app: &axum::Router,
    player: u32,
    key: Option<&str>,
    body: &'static [u8],
) -> (u16, u64) {
    use tower::ServiceExt as _;
    let mut request = http::Request::post("/replays")
        .header("host", "game.example")
        .header("authorization", format!("Bearer {}", token(player)));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let r = app
        .clone()
        .oneshot(request.body(axum::body::Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap()
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (status, json["replay"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_upload_is_one_replay() {
    for gratify in [true, false] {
        let game = Game::new().unwrap();
        let app = if gratify {
            game.router()
        } else {
            game.plain_router()
        };
        let (status, first) = upload(&app, 8, Some("match-77"), b"frames").await;
        assert!(status == 202 || status == 201, "{status}");
        // The answer was lost; the client sends it again.
        let (status, again) = upload(&app, 8, Some("match-77"), b"frames").await;
        assert_eq!((status, again), (200, first));
        // Another player's upload with the same key is theirs.
        let (_, other) = upload(&app, 9, Some("match-77"), b"frames").await;
        assert_ne!(other, first);
        game.drain(Duration::from_secs(30)).await;
        assert_eq!(game.profile(8).unwrap().replays, 1, "gratify: {gratify}");
        assert_eq!(game.store().replay_results().unwrap()[&8].1, 1);
        game.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_replay_kept_but_not_queued_is_processed_by_the_sweep() {
    let game = Game::new().unwrap();
    // Behind gratify: the router starts the sweep.
    let _app = game.router();
    // Kept, but its job was never queued (the queue was full) or gave up.
    let (id, _) = game.store().add_replay(6, None, b"more frames").unwrap();
    tokio::time::sleep(gratify_examples::game::SWEEP + Duration::from_secs(1)).await;
    // Queued by the sweep; processed on the pool's own threads, which the
    // paused clock does not wait for: wait in real time (a blocking sleep
    // holds the clock still).
    for _ in 0..6000 {
        if game.profile(6).unwrap().replays == 1 {
            break;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
            .await
            .unwrap();
    }
    assert_eq!(
        game.store().replay(id).unwrap(),
        Some((
            6,
            gratify_examples::game::Stored::Processed(analyse(b"more frames"))
        ))
    );
    assert_eq!(game.profile(6).unwrap().replays, 1);
    game.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_queues_again_what_was_kept_and_not_processed() {
    let path = temp_db("game-start");
    let (id, _) = {
        let store = gratify_examples::game::Store::open(&path).unwrap();
        store.add_replay(31, None, b"left over").unwrap()
    };
    let game = Game::open(&path, CONFIG).unwrap();
    let report = game.drain(Duration::from_secs(60)).await;
    assert_eq!(report.ran, 1, "{report:?}");
    assert_eq!(
        game.store().replay(id).unwrap(),
        Some((
            31,
            gratify_examples::game::Stored::Processed(analyse(b"left over"))
        ))
    );
    assert_eq!(game.profile(31).unwrap().replays, 1);
    game.shutdown().await;
    drop(game);
    remove_db(&path);
}

#[tokio::test(start_paused = true)]
async fn a_session_whose_seat_was_taken_moves_no_more() {
    let game = Game::new().unwrap();
    let (old, _old_frames) = game.join(15);
    let (_new, mut frames) = game.join(15);
    let (t, _) = frame(&mut frames).await;
    let before = game.position(15).unwrap();
    old.handle(&step(t, 1, before.0 + 5.0, before.1)).await;
    assert_eq!(game.position(15).unwrap(), before);
    assert_eq!(game.play_stats().dropped, 1);
    assert_eq!(frame(&mut frames).await, (t + 1, 0));
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn no_seat_once_the_game_stops() {
    let game = Game::new().unwrap();
    game.shutdown().await;
    let (_session, mut frames) = game.join(2);
    assert_eq!(frames.next().await, None);
    assert_eq!(game.play_stats().sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coins_and_ratings_survive_a_restart() {
    let path = temp_db("game-restart");
    let me = 12;
    let id = {
        let game = Game::open(&path, CONFIG).unwrap();
        let (session, _frames) = game.join(me);
        assert!(matches!(
            answer(&session, &buy("r-1", "shield")).await,
            ServerMessage::Bought { .. }
        ));
        drop(session);
        let (_, id) = upload(&game.router(), me, None, b"a replay").await;
        game.drain(Duration::from_secs(30)).await;
        game.shutdown().await;
        id
    };
    let game = Game::open(&path, CONFIG).unwrap();
    let p = game.profile(me).unwrap();
    assert_eq!(p.coins, seeded_coins(me) - 120);
    assert_eq!(p.replays, 1);
    let delta = analyse(b"a replay");
    assert_eq!(
        i64::from(p.rating),
        (i64::from(seeded_rating(me)) + i64::from(delta)).clamp(0, 5000)
    );
    assert_eq!(
        game.store().replay(id).unwrap(),
        Some((me, gratify_examples::game::Stored::Processed(delta)))
    );
    // The purchase id is still known: a retry pays nothing.
    let (session, _frames) = game.join(me);
    let retry = answer(&session, &buy("r-1", "shield")).await;
    assert!(
        matches!(retry, ServerMessage::Bought { coins, .. } if coins == seeded_coins(me) - 120),
        "{retry:?}"
    );
    drop(session);
    game.shutdown().await;
    drop(game);
    remove_db(&path);
}

/// A session served over channels, as `GET /play` serves a WebSocket's
/// halves: what the test sends in, and what the server sends out.
fn served(
    game: &Game,
    player: u32,
) -> (
    tokio::sync::mpsc::Sender<axum::extract::ws::Message>,
    Receiver<axum::extract::ws::Message>,
    tokio::task::JoinHandle<()>,
) {
    use axum::extract::ws::Message;
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Message>(64);
    let incoming = Box::pin(futures_util::stream::unfold(in_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|m| (Ok::<_, std::convert::Infallible>(m), rx))
    }));
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Message>(64);
    let outgoing = Box::pin(futures_util::sink::unfold(
        out_tx,
        |tx, m: Message| async move {
            tx.send(m).await.map_err(|_| ())?;
            Ok::<_, ()>(tx)
        },
    ));
    let game = game.clone();
    let task = tokio::spawn(async move { game.serve_session(player, incoming, outgoing).await });
    (in_tx, out_rx, task)
}

fn decode(m: &axum::extract::ws::Message) -> Option<ServerMessage> {
    match m {
        axum::extract::ws::Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_purchase_waiting_for_its_slot_never_holds_up_the_players_moves() {
    use axum::extract::ws::Message;
    let game = one_slot();
    let limiter = game.stack().limiter().unwrap().clone();
    let me = (4_000..PLAYERS)
        .find(|&id| seeded_coins(id) >= 100)
        .unwrap();
    let (to_server, mut from_server, task) = served(&game, me);
    let Some(ServerMessage::Tick { tick, .. }) = decode(&from_server.recv().await.unwrap()) else {
        panic!("a frame first")
    };
    // The one slot is held: purchases wait for it.
    let held = limiter
        .admit(game.model().id("browse").unwrap())
        .await
        .unwrap();
    for n in 0..6 {
        to_server
            .send(Message::text(buy(&format!("p{n}"), "potion")))
            .await
            .unwrap();
    }
    to_server
        .send(Message::text(step(tick, 1, 1.0, 1.0)))
        .await
        .unwrap();
    // Past the tick: the move was handled while four purchases waited (it
    // asked for a slot and was refused at its tick's end), and the two
    // past the four in flight were refused at once.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let stats = game.play_stats();
    assert_eq!((stats.moves, stats.refused), (1, 1), "{stats:?}");
    assert_eq!(
        limiter.stats().queued,
        4,
        "four purchases wait for the slot"
    );
    let mut busy = 0;
    while let Ok(m) = from_server.try_recv() {
        if let Some(ServerMessage::Refused { reason, .. }) = decode(&m) {
            assert_eq!(reason, "busy");
            busy += 1;
        }
    }
    assert_eq!(busy, 2);
    // The slot frees: the four are bought.
    held.complete(gratify::scaling::limit::Outcome::Success);
    let mut bought = 0;
    while bought < 4 {
        match decode(&from_server.recv().await.unwrap()) {
            Some(ServerMessage::Bought { .. }) => bought += 1,
            Some(ServerMessage::Tick { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(game.profile(me).unwrap().coins, seeded_coins(me) - 40);
    // A shutdown ends the session: the server closes its side.
    game.shutdown().await;
    tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(m) = from_server.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    drop(to_server);
}

#[tokio::test(start_paused = true)]
async fn a_session_that_only_pings_is_closed_when_idle() {
    use axum::extract::ws::Message;
    let game = Game::new().unwrap();
    let (to_server, mut from_server, task) = served(&game, 44);
    // The client reads everything it is sent.
    let reader = tokio::spawn(async move { while from_server.recv().await.is_some() {} });
    // Pings every 10 s keep the connection open but are not play.
    let pinger = tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if to_server
                .send(Message::Ping(Default::default()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let started = tokio::time::Instant::now();
    task.await.unwrap();
    assert_eq!(started.elapsed(), gratify_examples::game::IDLE);
    assert_eq!(game.play_stats().sessions, 0);
    pinger.abort();
    reader.abort();
    game.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_reads_nothing_is_disconnected() {
    use axum::extract::ws::Message;
    let game = Game::new().unwrap();
    let (to_server, in_rx) = tokio::sync::mpsc::channel::<Message>(64);
    let incoming = Box::pin(futures_util::stream::unfold(in_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|m| (Ok::<_, std::convert::Infallible>(m), rx))
    }));
    // A sink that never takes a message (a client whose window is full).
    let stuck = Box::pin(futures_util::sink::unfold((), |(), _m: Message| {
        std::future::pending::<Result<(), ()>>()
    }));
    let task = {
        let game = game.clone();
        tokio::spawn(async move { game.serve_session(45, incoming, stuck).await })
    };
    // It keeps playing; nothing it is sent goes out.
    let mover = tokio::spawn(async move {
        for seq in 1..1000u64 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            let _ = to_server
                .send(Message::text(buy(&format!("b{seq}"), "potion")))
                .await;
        }
    });
    let started = tokio::time::Instant::now();
    task.await.unwrap();
    assert!(
        started.elapsed() <= gratify_examples::game::SEND_TIMEOUT + gratify_examples::game::TICK,
        "{:?}",
        started.elapsed()
    );
    mover.abort();
    // A purchase it started finishes (on the database's thread, in real
    // time, with the clock held still) and then lets the seat go.
    for _ in 0..2000 {
        if game.play_stats().sessions == 0 {
            break;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(5)))
            .await
            .unwrap();
    }
    assert_eq!(game.play_stats().sessions, 0);
    game.shutdown().await;
}

/// The limiter orders what waits by its cost: a move, worthless after its
/// tick, takes a freed slot before a cheap request queued ahead of it.
#[tokio::test(start_paused = true)]
async fn a_move_takes_a_freed_slot_before_cheaper_work_queued_ahead_of_it() {
    let game = one_slot();
    let limiter = game.stack().limiter().unwrap().clone();
    let browse = game.model().id("browse").unwrap();
    let held = limiter.admit(browse).await.unwrap();
    let (session, mut frames) = game.join(17);
    let (t, _) = frame(&mut frames).await;
    // A cheap request queues first.
    let waiting = {
        let limiter = limiter.clone();
        // It keeps the slot it gets: had it come first, the move would find
        // none before its tick closed.
        tokio::spawn(async move { limiter.admit(browse).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(limiter.stats().queued, 1);
    // Then the move; the slot frees 10 ms into the tick.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        held.complete(gratify::scaling::limit::Outcome::Success);
    });
    session.handle(&step(t, 1, 1.0, 1.0)).await;
    release.await.unwrap();
    assert_eq!(
        frame(&mut frames).await,
        (t + 1, 1),
        "the move made its tick"
    );
    assert_eq!(game.play_stats().applied, 1);
    // The cheap request got the slot after it.
    let permit = waiting.await.unwrap().unwrap();
    assert_eq!(permit.class(), browse);
    drop(permit);
    game.shutdown().await;
}

/// A session that falls behind gets the newest frame, not the ones it
/// missed: a frame a tick old is worthless.
#[tokio::test(start_paused = true)]
async fn a_session_behind_gets_the_newest_frame_only() {
    let game = Game::new().unwrap();
    let (_session, mut frames) = game.join(23);
    let (first, _) = frame(&mut frames).await;
    // Five ticks without reading.
    tokio::time::sleep(gratify_examples::game::TICK * 5).await;
    let (now, _) = frame(&mut frames).await;
    // Not the frame after the first: the newest (the tick ending with the
    // sleep may come just before or after it wakes).
    assert!(now >= first + 4, "{first} then {now}");
    let stats = game.play_stats();
    assert!(stats.frames_dropped >= 3, "{stats:?}");
    // And then the very next tick, not an old one.
    assert_eq!(frame(&mut frames).await.0, now + 1);
    game.shutdown().await;
}
