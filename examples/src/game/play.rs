//! Real-time play: a WebSocket session per player and the tick loop.
//!
//! The protocol is on [`Session`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::{SinkExt as _, StreamExt as _};
use gratify::scaling::limit::{Limiter, Outcome};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::store::Bought;
use super::world::{self, Clock};
use super::{Game, World, refuse};

/// The largest message a client may send, bytes.
pub const MAX_MESSAGE: usize = 1024;

/// How long sending one message to a client may take: a client that reads
/// nothing for this long is disconnected (its socket, task and purchases
/// are not held for ever).
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the shop sells, and for how many coins.
pub const ITEMS: [(&str, u64); 3] = [("potion", 10), ("shield", 120), ("skin", 900)];

/// A message from a player.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientMessage {
    /// The player's move in tick `tick`: where it goes.
    Move {
        /// The tick it is for (the last frame's).
        tick: u64,
        /// Increasing from one move to the next.
        seq: u64,
        /// Where to.
        x: f32,
        /// Where to.
        y: f32,
    },
    /// A purchase, at most once per `id` (a retry with the same id after a
    /// lost answer buys nothing more).
    Buy {
        /// The client's id of this purchase (1 to 64 bytes).
        id: String,
        /// One of [`ITEMS`].
        item: String,
    },
}

/// A message to a player.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// The start of a tick.
    Tick {
        /// Its number.
        tick: u64,
        /// The last of the player's moves applied (0 before any).
        ack: u64,
        /// The players in sight, nearest first: id, x, y.
        near: Vec<(u32, f32, f32)>,
    },
    /// A purchase done (now or by an earlier message with its id).
    Bought {
        /// The purchase's id.
        id: String,
        /// What was bought.
        item: String,
        /// The coins left.
        coins: u64,
    },
    /// A purchase not done: nothing was spent.
    Refused {
        /// The purchase's id.
        id: String,
        /// `busy` (try again after `retry_after_ms`), `coins` (not enough)
        /// or `item` (no such item).
        reason: String,
        /// When to try again, if busy.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        retry_after_ms: Option<u64>,
    },
    /// A message the server could not read.
    Error {
        /// What was wrong.
        message: String,
    },
}

impl ServerMessage {
    fn text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What real-time play did, counted since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PlayStats {
    /// Sessions open now.
    pub sessions: u64,
    /// Moves received.
    pub moves: u64,
    /// Moves applied in their tick.
    pub applied: u64,
    /// Moves dropped because their tick had closed (or was not open yet)
    /// before they could be applied.
    pub late: u64,
    /// Moves dropped as not the session's next: a second move in one
    /// tick, a sequence number not above the last, or a move of a session
    /// whose seat another connection took.
    pub dropped: u64,
    /// Moves refused a slot by the limiter.
    pub refused: u64,
    /// Tick frames sent to players.
    pub frames: u64,
    /// Tick frames replaced by the next before their client took them
    /// (counted without a lock: within one either way of a race between a
    /// frame sent and one taken).
    pub frames_dropped: u64,
    /// Purchases done (retries of a done purchase not counted).
    pub purchases: u64,
    /// Purchases refused a slot by the limiter.
    pub purchases_refused: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    moves: AtomicU64,
    applied: AtomicU64,
    late: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    frames: AtomicU64,
    frames_dropped: AtomicU64,
    purchases: AtomicU64,
    purchases_refused: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why a move did not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotCounted {
    Late,
    Dropped,
}

/// A connected player's seat: where the tick loop puts its frame.
#[derive(Debug)]
pub(crate) struct Seat {
    number: u64,
    frames: FrameSlot,
}

/// The newest tick frame for one session: a frame not sent before the
/// next one comes is replaced (a frame a tick old is worthless), never
/// queued behind it.
#[derive(Debug)]
struct FrameSlot {
    tx: tokio::sync::watch::Sender<Option<Arc<str>>>,
    /// A frame is in the slot that the session has not taken yet.
    unread: Arc<std::sync::atomic::AtomicBool>,
}

/// A session's tick frames, newest only.
#[derive(Debug)]
pub struct Frames {
    rx: tokio::sync::watch::Receiver<Option<Arc<str>>>,
    unread: Arc<std::sync::atomic::AtomicBool>,
}

impl Frames {
    /// The next frame (the newest, if several came since the last); `None`
    /// once the session lost its seat (seated elsewhere, the game stopped).
    pub async fn next(&mut self) -> Option<String> {
        loop {
            self.rx.changed().await.ok()?;
            self.unread.store(false, Ordering::Relaxed);
            if let Some(frame) = self.rx.borrow_and_update().clone() {
                return Some(frame.to_string());
            }
        }
    }
}

/// A player's session: what the WebSocket handler (or a test) feeds the
/// player's messages to. Dropping it gives up the seat.
///
/// The server runs a tick every 50 ms ([`TICK`](super::TICK)). At the start of tick `t`
/// it sends each connected player a frame: the tick's number, the last of
/// the player's moves it applied (`ack`) and the players in sight. The
/// player answers with its move for tick `t`; a move applied before `t`
/// closes shows in the next frame's `ack`. A move for a tick already
/// closed is worthless (the next one supersedes it): it is dropped, not
/// applied late.
///
/// Behind gratify, each message asks the Stack's limiter for a slot
/// ([`Limiter::admit_by`](gratify::scaling::limit::Limiter::admit_by)) with
/// the same accounting as an HTTP request: a move of class `state` waits no
/// later than its tick's end, a purchase of class `purchase` as long as its
/// class's delay cost makes waiting worth it — a late purchase still counts.
///
/// ```text
/// → {"type":"move","tick":812,"seq":77,"x":310.5,"y":92.0}
/// → {"type":"buy","id":"c1-17","item":"potion"}
/// ← {"type":"tick","tick":813,"ack":77,"near":[[1204,318.0,95.5]]}
/// ← {"type":"bought","id":"c1-17","item":"potion","coins":4630}
/// ← {"type":"refused","id":"c1-18","reason":"busy","retry_after_ms":250}
/// ```
///
/// # Example
///
/// ```
/// use gratify_examples::game::{Game, ServerMessage};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let game = Game::new().unwrap();
/// let (session, mut frames) = game.join(7);
/// let first: ServerMessage = serde_json::from_str(&frames.next().await.unwrap()).unwrap();
/// let ServerMessage::Tick { tick, ack: 0, .. } = first else { panic!("{first:?}") };
/// // The move for this tick: the next frame acknowledges it.
/// let step = format!(r#"{{"type":"move","tick":{tick},"seq":1,"x":5,"y":5}}"#);
/// assert_eq!(session.handle(&step).await, None);
/// let next: ServerMessage = serde_json::from_str(&frames.next().await.unwrap()).unwrap();
/// assert!(matches!(next, ServerMessage::Tick { ack: 1, .. }), "{next:?}");
/// # game.shutdown().await;
/// # }
/// ```
#[derive(Debug)]
pub struct Session {
    game: Game,
    player: u32,
    seat: u64,
    /// Messages ask the Stack's limiter for a slot (behind gratify).
    admitted: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut seats = self.game.world.seats();
        if seats
            .get(&self.player)
            .is_some_and(|s| s.number == self.seat)
        {
            seats.remove(&self.player);
        }
    }
}

impl Game {
    /// Seats `player` (the one authenticated) as the server behind gratify
    /// does: the session, whose messages ask the Stack's limiter for a slot,
    /// and its tick frames. A player seated again (a second connection)
    /// takes the seat: the earlier session's frames end and its moves no
    /// longer count. Once the game is stopping, the frames end at once.
    pub fn join(&self, player: u32) -> (Session, Frames) {
        self.seat(player, true)
    }

    fn seat(&self, player: u32, admitted: bool) -> (Session, Frames) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let unread = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let number = self.world.next_seat.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            game: self.clone(),
            player,
            seat: number,
            admitted,
        };
        let frames = Frames {
            rx,
            unread: Arc::clone(&unread),
        };
        if self.world.stopped.load(Ordering::SeqCst) {
            // No seat: `tx` dropped, the frames end.
            return (session, frames);
        }
        // The tick loop runs on the runtime that serves the first session.
        if !self.world.ticking.swap(true, Ordering::SeqCst) {
            tokio::spawn(tick_loop(Arc::downgrade(&self.world), self.world.clock));
        }
        // The seat and the player's record change together (seats, then
        // players: the order every path takes them in), so two connections
        // at once cannot leave one seated and the other's moves counting.
        // A new session counts its moves from 1; the tick of the last move
        // stays, so a reconnect does not buy a second move in one tick.
        let mut seats = self.world.seats();
        // Checked again under the seats' lock, which a shutdown clears
        // after it sets `stopped`: no seat can be added after the clear.
        if self.world.stopped.load(Ordering::SeqCst) {
            return (session, frames);
        }
        if let Some(p) = self.world.write().get_mut(player) {
            (p.seq, p.seat) = (0, number);
        }
        seats.insert(
            player,
            Seat {
                number,
                frames: FrameSlot { tx, unread },
            },
        );
        drop(seats);
        (session, frames)
    }

    /// What real-time play did so far.
    pub fn play_stats(&self) -> PlayStats {
        let c = &self.world.play;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PlayStats {
            sessions: self.world.seats().len() as u64,
            moves: n(&c.moves),
            applied: n(&c.applied),
            late: n(&c.late),
            dropped: n(&c.dropped),
            refused: n(&c.refused),
            frames: n(&c.frames),
            frames_dropped: n(&c.frames_dropped),
            purchases: n(&c.purchases),
            purchases_refused: n(&c.purchases_refused),
        }
    }
}

/// The message in `text`, or the error to answer.
fn parse(text: &str) -> Result<ClientMessage, String> {
    serde_json::from_str::<ClientMessage>(text).map_err(|e| {
        ServerMessage::Error {
            message: format!("expected a move or a buy: {e}"),
        }
        .text()
    })
}

impl Session {
    /// The player.
    pub fn player(&self) -> u32 {
        self.player
    }

    /// Handles one message from the player; the answer to send back, if
    /// any (a move has none: the next frame's `ack` says if it counted).
    pub async fn handle(&self, text: &str) -> Option<String> {
        match parse(text) {
            Ok(ClientMessage::Move { tick, seq, x, y }) => {
                self.move_to(tick, seq, x, y).await;
                None
            }
            Ok(ClientMessage::Buy { id, item }) => Some(self.buy(id, item).await.text()),
            Err(answer) => Some(answer),
        }
    }

    /// The limiter messages ask, behind gratify with a limit.
    fn limiter(&self) -> Option<&Limiter> {
        self.admitted.then(|| self.game.stack.limiter()).flatten()
    }

    /// Why a move for `tick` cannot count now, if it cannot: its tick is
    /// not the open one (`late`), or it is not this session's next move
    /// (`dropped`: the seat is another session's, the player moved this
    /// tick already, or its sequence number is not above the last).
    fn verdict(
        &self,
        players: &world::Players,
        tick: u64,
        seq: u64,
        end: Instant,
    ) -> Option<NotCounted> {
        if players.tick != tick || Instant::now() >= end {
            return Some(NotCounted::Late);
        }
        match players.get(self.player) {
            Some(p) if p.seat == self.seat && p.moved != Some(tick) && seq > p.seq => None,
            _ => Some(NotCounted::Dropped),
        }
    }

    async fn move_to(&self, tick: u64, seq: u64, x: f32, y: f32) {
        let world = &self.game.world;
        bump(&world.play.moves);
        let end = world.clock.end_of(tick);
        let count = |why: Option<NotCounted>| {
            bump(match why {
                None => &world.play.applied,
                Some(NotCounted::Late) => &world.play.late,
                Some(NotCounted::Dropped) => &world.play.dropped,
            });
        };
        // Checked before asking for a slot: a move that cannot count takes
        // none (one move a tick per player asks the limiter).
        if let Some(why) = self.verdict(&world.read(), tick, seq, end) {
            return count(Some(why));
        }
        // Behind gratify, a slot, waiting no later than the tick's end.
        let permit = match self.limiter() {
            Some(limiter) => match limiter.admit_by(self.game.classes.state, end).await {
                Ok(permit) => Some(permit),
                Err(_) => {
                    bump(&world.play.refused);
                    return;
                }
            },
            None => None,
        };
        let why = {
            let mut players = world.write();
            let why = self.verdict(&players, tick, seq, end);
            if why.is_none()
                && let Some(p) = players.get_mut(self.player)
            {
                (p.x, p.y) = world::step(p.x, p.y, x, y);
                p.seq = seq;
                p.moved = Some(tick);
            }
            why
        };
        count(why);
        if let Some(permit) = permit {
            permit.complete(Outcome::Success);
        }
    }

    async fn buy(&self, id: String, item: String) -> ServerMessage {
        let refused = |id: String, reason: &str, retry: Option<u64>| ServerMessage::Refused {
            id,
            reason: reason.to_owned(),
            retry_after_ms: retry,
        };
        if id.is_empty() || id.len() > 64 {
            return ServerMessage::Error {
                message: "a purchase's id is 1 to 64 bytes".into(),
            };
        }
        let Some(&(item_name, price)) = ITEMS.iter().find(|(name, _)| *name == item) else {
            return refused(id, "item", None);
        };
        let class = self.game.classes.purchase;
        let permit = match self.limiter() {
            Some(limiter) => match limiter.admit(class).await {
                Ok(permit) => Some(permit),
                Err(refusal) => {
                    bump(&self.game.world.play.purchases_refused);
                    let ms = refusal.retry_after().as_millis();
                    return refused(id, "busy", Some(u64::try_from(ms).unwrap_or(u64::MAX)));
                }
            },
            None => None,
        };
        // The database off the async threads; the purchase completes even
        // if the player goes away meanwhile (its answer is then lost, and a
        // retry with the same id gets it without paying again).
        let world = self.game.world.clone();
        let player = self.player;
        let request = id.clone();
        let done = tokio::task::spawn_blocking(move || {
            let coins = || world.read().get(player).map_or(0, |p| p.coins);
            let pay = |price: u64| {
                if let Some(p) = world.write().get_mut(player) {
                    p.coins = p.coins.saturating_sub(price);
                }
            };
            let bought = world
                .store
                .buy(player, &request, item_name, price, coins, pay);
            (bought, world.read().get(player).map_or(0, |p| p.coins))
        })
        .await;
        let outcome = match &done {
            Ok((Ok(_), _)) => Outcome::Success,
            _ => Outcome::Error,
        };
        if let Some(permit) = permit {
            permit.complete(outcome);
        }
        match done {
            Ok((Ok(Bought::Now(coins)), _)) => {
                bump(&self.game.world.play.purchases);
                ServerMessage::Bought {
                    id,
                    item: item_name.to_owned(),
                    coins,
                }
            }
            Ok((Ok(Bought::Already(item)), coins)) => ServerMessage::Bought { id, item, coins },
            Ok((Ok(Bought::TooPoor), _)) => refused(id, "coins", None),
            Ok((Err(e), _)) => {
                tracing::warn!(player, error = %e, "a purchase failed");
                refused(id, "busy", Some(1000))
            }
            Err(e) => {
                tracing::warn!(player, error = %e, "a purchase failed");
                refused(id, "busy", Some(1000))
            }
        }
    }
}

/// `GET /play`: a WebSocket session for the player of the bearer token.
pub(crate) async fn play(
    State(game): State<Game>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(me) = super::player(&game.world, &headers) else {
        return refuse(StatusCode::UNAUTHORIZED, "log in first\n");
    };
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| {
            let admitted = game.gratify;
            let (sink, stream) = socket.split();
            async move { game.serve(me, admitted, stream, sink).await }
        })
}

/// Purchases of one session in progress at once; more are refused `busy`.
pub const PURCHASES_IN_FLIGHT: usize = 4;

/// A session that sends no move and no purchase for this long is closed
/// (pings and messages it could not read do not count; a client sends a
/// move a tick while it plays).
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves one WebSocket: moves in order as they come, purchases beside
/// them (a purchase waiting for its slot or the database never holds up
/// the player's moves), answers and tick frames out.
impl Game {
    /// Serves `player`'s session over a stream of incoming messages and a
    /// sink for outgoing ones (a WebSocket's halves, as `GET /play` does,
    /// or another transport's) as the server behind gratify does, until
    /// either side ends, the player is seated elsewhere, or the game stops.
    pub async fn serve_session<St, Si, E>(&self, player: u32, incoming: St, outgoing: Si)
    where
        St: futures_util::Stream<Item = Result<Message, E>> + Unpin,
        Si: futures_util::Sink<Message> + Unpin,
    {
        self.serve(player, true, incoming, outgoing).await;
    }

    async fn serve<St, Si, E>(&self, me: u32, admitted: bool, stream: St, sink: Si)
    where
        St: futures_util::Stream<Item = Result<Message, E>> + Unpin,
        Si: futures_util::Sink<Message> + Unpin,
    {
        serve(self, me, admitted, stream, sink).await;
    }
}

async fn serve<St, Si, E>(game: &Game, me: u32, admitted: bool, mut stream: St, mut sink: Si)
where
    St: futures_util::Stream<Item = Result<Message, E>> + Unpin,
    Si: futures_util::Sink<Message> + Unpin,
{
    let (session, mut frames) = game.seat(me, admitted);
    let session = Arc::new(session);
    let purchases = Arc::new(tokio::sync::Semaphore::new(PURCHASES_IN_FLIGHT));
    let (answers, mut answered) = mpsc::channel::<String>(32);
    // The reader waits for room to answer (the writer drains the queue),
    // but no longer than a send may take: a client that reads nothing
    // ends its session rather than hold it.
    let answer = async |text: String| {
        matches!(
            tokio::time::timeout(SEND_TIMEOUT, answers.send(text)).await,
            Ok(Ok(()))
        )
    };
    let reader = async {
        // Only moves and purchases are activity: pings or garbage do not
        // keep a seat.
        let mut active = Instant::now();
        loop {
            let idle = IDLE.saturating_sub(active.elapsed());
            let Ok(Some(Ok(message))) = tokio::time::timeout(idle, stream.next()).await else {
                break;
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Binary(_) => {
                    let error = ServerMessage::Error {
                        message: "messages are JSON text".into(),
                    };
                    if !answer(error.text()).await {
                        break;
                    }
                    continue;
                }
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            let reply = match parse(text.as_str()) {
                Ok(ClientMessage::Move { tick, seq, x, y }) => {
                    active = Instant::now();
                    session.move_to(tick, seq, x, y).await;
                    None
                }
                Ok(ClientMessage::Buy { id, item }) => {
                    active = Instant::now();
                    match Arc::clone(&purchases).try_acquire_owned() {
                        Ok(slot) => {
                            // It completes even if the player goes away; its
                            // answer is then lost, and a retry with its id
                            // gets it without paying again.
                            let session = Arc::clone(&session);
                            let answers = answers.clone();
                            tokio::spawn(async move {
                                let reply = session.buy(id, item).await.text();
                                drop(slot);
                                let _ =
                                    tokio::time::timeout(SEND_TIMEOUT, answers.send(reply)).await;
                            });
                            None
                        }
                        Err(_) => Some(
                            ServerMessage::Refused {
                                id,
                                reason: "busy".into(),
                                retry_after_ms: Some(1000),
                            }
                            .text(),
                        ),
                    }
                }
                Err(error) => Some(error),
            };
            if let Some(reply) = reply
                && !answer(reply).await
            {
                break;
            }
        }
    };
    let writer = async {
        loop {
            let text = tokio::select! {
                biased;
                Some(answer) = answered.recv() => answer,
                frame = frames.next() => match frame {
                    Some(frame) => frame,
                    // Seated elsewhere, or the game stopped.
                    None => break,
                },
            };
            let sent =
                tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await;
            if !matches!(sent, Ok(Ok(()))) {
                // A client that takes nothing is not sent a goodbye either.
                return;
            }
        }
        let _ = tokio::time::timeout(SEND_TIMEOUT, sink.close()).await;
    };
    tokio::select! {
        () = reader => {},
        () = writer => {},
    }
}

/// The tick loop: at each tick's start, closes the last one and sends every
/// seated player its frame. It ends with the game (it holds no reference
/// that keeps the game alive). A loop woken late (a busy machine) skips
/// the ticks it missed rather than sending them late.
pub(crate) async fn tick_loop(world: Weak<World>, clock: Clock) {
    let mut tick = 0u64;
    loop {
        tokio::time::sleep_until(clock.end_of(tick)).await;
        let Some(world) = world.upgrade() else {
            return;
        };
        if world.stopped.load(Ordering::Relaxed) {
            return;
        }
        tick = send_frames(&world, clock);
    }
}

/// Opens the tick of now (the one after the last opened, at least) and
/// sends its frames; the tick opened.
fn send_frames(world: &Arc<World>, clock: Clock) -> u64 {
    let seated: Vec<(
        u32,
        tokio::sync::watch::Sender<Option<Arc<str>>>,
        Arc<std::sync::atomic::AtomicBool>,
    )> = world
        .seats()
        .iter()
        .map(|(&id, seat)| (id, seat.frames.tx.clone(), Arc::clone(&seat.frames.unread)))
        .collect();
    // Close the last tick and read the positions in one step: a move
    // applied before is in these frames, one applied after is for `tick`.
    let (tick, online, acks) = {
        let mut players = world.write();
        // The time read once the lock is held: a tick that closed while
        // the loop waited for it is not opened.
        let tick = clock.tick_at(Instant::now()).max(players.tick + 1);
        players.tick = tick;
        let mut online = Vec::with_capacity(seated.len());
        let mut acks = Vec::with_capacity(seated.len());
        for (id, ..) in &seated {
            let p = players.get(*id);
            online.push((*id, p.map_or(0.0, |p| p.x), p.map_or(0.0, |p| p.y)));
            acks.push(p.map_or(0, |p| p.seq));
        }
        (tick, online, acks)
    };
    let near = world::neighbours(&online);
    let mut gone = Vec::new();
    for (((id, tx, unread), ack), near) in seated.iter().zip(acks).zip(near) {
        if tx.is_closed() {
            gone.push(*id);
            continue;
        }
        let text: Arc<str> = ServerMessage::Tick { tick, ack, near }.text().into();
        tx.send_replace(Some(text));
        bump(&world.play.frames);
        if unread.swap(true, Ordering::Relaxed) {
            // The last one was never taken: replaced.
            bump(&world.play.frames_dropped);
        }
    }
    if !gone.is_empty() {
        let mut seats = world.seats();
        for id in gone {
            if seats.get(&id).is_some_and(|s| s.frames.tx.is_closed()) {
                seats.remove(&id);
            }
        }
    }
    tick
}
