//! Real-time play: a move counts only in its own tick, a move waits for a
//! slot no later than its tick's end, a purchase is done once however often
//! it is sent and even when it waited, a player has one seat, and an
//! accepted replay survives a crash. Time-driven cases run on tokio's
//! paused clock.
#![allow(clippy::unwrap_used)] // test helpers: a failure is a failed test

use std::time::Duration;

use gratify_examples::game::{
    CONFIG, Game, ITEMS, ServerMessage, Session, analyse, seeded_coins, seeded_rating, token,
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

async fn frame(frames: &mut Receiver<String>) -> (u64, u64) {
    let text = frames.recv().await.expect("a frame");
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
    let before = game.profile(7).unwrap();
    // In its tick: applied, and the next frame says so.
    assert_eq!(session.handle(&step(t, 1, 500.0, 500.0)).await, None);
    assert_eq!(frame(&mut frames).await, (t + 1, 1));
    // For the tick just closed (it arrived late): dropped, not applied late.
    assert_eq!(session.handle(&step(t, 2, 0.0, 0.0)).await, None);
    // For a tick not open yet: dropped too.
    session.handle(&step(t + 5, 3, 0.0, 0.0)).await;
    // An older move than the last applied (a duplicate): not applied.
    session.handle(&step(t + 1, 1, 0.0, 0.0)).await;
    assert_eq!(frame(&mut frames).await, (t + 2, 1));
    let stats = game.play_stats();
    assert_eq!((stats.moves, stats.applied, stats.late), (4, 1, 3));
    assert_eq!(stats.sessions, 1);
    // A move goes at most MAX_STEP, whatever the client asks.
    let p = game.profile(7).unwrap();
    assert_eq!(p.coins, before.coins);
    drop(session);
    assert_eq!(game.play_stats().sessions, 0);
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
    let asked = tokio::time::Instant::now();
    session.handle(&step(t, 1, 1.0, 1.0)).await;
    // It waited for the slot until its tick closed, then gave up.
    assert!(
        asked.elapsed() <= gratify_examples::game::TICK,
        "{:?}",
        asked.elapsed()
    );
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
    let ended = async { while first_frames.recv().await.is_some() {} };
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
    let (a, mut a_frames) = game.join(1);
    let (_b, mut b_frames) = game.join(2);
    // Walk both players to the same corner, a step a tick.
    let mut seq = 0;
    for _ in 0..200 {
        let (t, _) = frame(&mut a_frames).await;
        let _ = b_frames.try_recv();
        seq += 1;
        a.handle(&step(t, seq, 0.0, 0.0)).await;
        if game.profile(1).is_some() && seq > 150 {
            break;
        }
    }
    let text = a_frames.recv().await.unwrap();
    let ServerMessage::Tick { near, .. } = serde_json::from_str(&text).unwrap() else {
        panic!("{text}")
    };
    assert!(near.iter().all(|n| n.0 != 1), "never oneself: {text}");
    game.shutdown().await;
    // The seats are gone: the frames end.
    tokio::time::timeout(Duration::from_secs(1), async {
        while a_frames.recv().await.is_some() {}
    })
    .await
    .unwrap();
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
        let data: Vec<u8> = (0..65_536u32).map(|b| (b * 31 + i * 7) as u8).collect();
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
        // Once more: nothing is processed again, nothing is counted twice.
        let game = Game::open(&path, CONFIG).unwrap();
        assert!(game.store().queued_replays().unwrap().is_empty());
        check(&game);
        let report = game.shutdown().await;
        assert_eq!(report.ran, 0, "{report:?}");
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("db-wal"));
    let _ = std::fs::remove_file(path.with_extension("db-shm"));
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
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
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
