//! The game's players for the load driver: each holds a WebSocket session
//! at `/play`, answers every tick frame with a move for that tick, and now
//! and then buys something.
//!
//! A move is *in time* when the frame of the next tick acknowledges it: the
//! server applied it before its tick closed. Per tick, the report gives the
//! share of the players' moves that made it; per frame, how late it reached
//! its player against the tick's schedule.
//!
//! ```
//! use gratify_examples::play::{TickTally, summarise_ticks};
//!
//! // Two ticks of four players each: every move made the first, half the
//! // second.
//! let ticks = [(10, TickTally { sent: 4, in_time: 4 }), (11, TickTally { sent: 4, in_time: 2 })];
//! let report = summarise_ticks(ticks.into_iter().collect(), vec![0.001, 0.030], 4);
//! assert_eq!(report.ticks, 2);
//! assert_eq!(report.in_time_min, 0.5);
//! assert_eq!(report.ticks_all_in_time, 1);
//! assert_eq!(report.frames_late, 1, "one frame over 25 ms late");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use gratify::CostModel;
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::drive::ClassReport;
use crate::game::{ServerMessage, TICK, seeded_coins, token};

/// A frame this much later than its tick's schedule counts as late.
pub const FRAME_LATE: Duration = Duration::from_millis(25);

/// Who plays, alongside the HTTP traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Players {
    /// Players connected at once.
    pub count: u32,
    /// Purchases per player per minute (at random times).
    pub buys_per_minute: f64,
}

impl Default for Players {
    fn default() -> Self {
        Self {
            count: 200,
            buys_per_minute: 6.0,
        }
    }
}

/// Moves and in-time moves of one tick, all players together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TickTally {
    /// Moves sent for the tick.
    pub sent: u64,
    /// Of those, acknowledged by the next tick's frame.
    pub in_time: u64,
}

/// How the ticks went for the players.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TickReport {
    /// Ticks with moves (those where at least half the players moved).
    pub ticks: u64,
    /// The median, over those ticks, of the share of moves in time.
    pub in_time_p50: f64,
    /// The 10th percentile of it (a bad tick).
    pub in_time_p10: f64,
    /// Its lowest.
    pub in_time_min: f64,
    /// Ticks in which every move made it.
    pub ticks_all_in_time: u64,
    /// Frames received.
    pub frames: u64,
    /// Frames more than [`FRAME_LATE`] behind their tick's schedule.
    pub frames_late: u64,
    /// Median lateness of a frame, ms.
    pub frame_late_p50_ms: f64,
    /// 99th percentile of it, ms.
    pub frame_late_p99_ms: f64,
    /// Players that could not connect.
    pub not_connected: u64,
}

/// The players' report: moves (class `state`), purchases (class
/// `purchase`), and the ticks.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PlayReport {
    /// Moves: one per tick of each player's time in the run (`sent`),
    /// `ok` in time; the rest failed — dropped, late, refused, or never
    /// sent because no frame came.
    pub moves: ClassReport,
    /// Purchases: `ok` bought, `shed` refused as busy, the rest failed.
    pub purchases: ClassReport,
    /// The ticks.
    pub ticks: TickReport,
}

/// The tick report in a sentence, for a terminal.
pub fn describe_ticks(t: &TickReport) -> String {
    let pct = |x: f64| {
        if x.is_finite() {
            format!("{:.1}%", x * 100.0)
        } else {
            "–".to_owned()
        }
    };
    format!(
        "{} ticks with moves; moves in time per tick: median {}, 10th percentile {}, lowest {}; \
         {} ticks with every move in time; {} of {} frames over {} ms late (p50 {:.1} ms, p99 {:.1} ms); \
         {} players could not connect",
        t.ticks,
        pct(t.in_time_p50),
        pct(t.in_time_p10),
        pct(t.in_time_min),
        t.ticks_all_in_time,
        t.frames_late,
        t.frames,
        FRAME_LATE.as_millis(),
        t.frame_late_p50_ms,
        t.frame_late_p99_ms,
        t.not_connected
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The tick report from each tick's tally and each frame's lateness
/// (seconds), counting only ticks where at least half of `players` moved.
pub fn summarise_ticks(
    ticks: BTreeMap<u64, TickTally>,
    mut lateness: Vec<f64>,
    players: u32,
) -> TickReport {
    let full = u64::from(players).div_ceil(2).max(1);
    let mut shares: Vec<f64> = ticks
        .values()
        .filter(|t| t.sent >= full)
        .map(|t| t.in_time as f64 / t.sent as f64)
        .collect();
    shares.sort_by(f64::total_cmp);
    lateness.sort_by(f64::total_cmp);
    let late = FRAME_LATE.as_secs_f64();
    TickReport {
        ticks: shares.len() as u64,
        in_time_p50: percentile(&shares, 0.5),
        in_time_p10: percentile(&shares, 0.1),
        in_time_min: shares.first().copied().unwrap_or(f64::NAN),
        ticks_all_in_time: shares.iter().filter(|s| **s >= 1.0).count() as u64,
        frames: lateness.len() as u64,
        frames_late: lateness.iter().filter(|l| **l > late).count() as u64,
        frame_late_p50_ms: percentile(&lateness, 0.5) * 1e3,
        frame_late_p99_ms: percentile(&lateness, 0.99) * 1e3,
        not_connected: 0,
    }
}

/// What every player's task adds to.
#[derive(Default)]
struct Shared {
    ticks: BTreeMap<u64, TickTally>,
    lateness: Vec<f64>,
    move_latency: Vec<f64>,
    moves_sent: u64,
    /// Ticks the players were in the run for: a move each, if the server
    /// let them.
    turns: u64,
    moves_in_time: u64,
    buys: Vec<(BuyEnd, f64)>,
    buys_sent: u64,
    not_connected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BuyEnd {
    Bought,
    Busy,
    Failed,
}

/// The seeded players who play: rich enough to buy a potion a second
/// for the whole run.
fn who(count: u32) -> Vec<u32> {
    (1000..crate::game::PLAYERS)
        .filter(|&id| seeded_coins(id) >= 2000)
        .take(count as usize)
        .collect()
}

/// Plays `players` against the game at `addr` for `seconds`, then closes
/// the sessions; the report, priced by `model`.
pub async fn play(
    addr: SocketAddr,
    players: Players,
    seconds: f64,
    model: &CostModel,
) -> PlayReport {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let end = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    // Purchase ids unique to this run: a server that kept the last run's
    // purchases must not answer these as retries.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in who(players.count).into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let buy_rate = players.buys_per_minute / 60.0;
        // Connections spread over the first second.
        let start = Instant::now()
            + Duration::from_millis(i as u64 * 1000 / u64::from(players.count.max(1)));
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            let turns = end.saturating_duration_since(start).as_nanos() / TICK.as_nanos();
            shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .turns += turns as u64;
            player(addr, id, end, buy_rate, run, &shared).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let s = std::mem::take(
        &mut *shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    report(s, players.count, model)
}

fn report(s: Shared, players: u32, model: &CostModel) -> PlayReport {
    let class = |name: &str| model.id(name).map(|id| model.class(id).clone());
    // Moves: in time or worth nothing (the class's deadline is the tick).
    let mut latency = s.move_latency;
    latency.sort_by(f64::total_cmp);
    let refusal = class("state").map_or(0.0, |c| c.refusal_cost());
    // Every tick of every player's time counts: a tick without a frame (a
    // server too busy to send it, a player it would not let in) is a move
    // that could not be made.
    let sent = s.turns.max(s.moves_sent);
    let failed = sent.saturating_sub(s.moves_in_time);
    let moves = ClassReport {
        sent,
        ok: s.moves_in_time,
        failed,
        errors: failed,
        success: s.moves_in_time as f64 / sent.max(1) as f64,
        p50_ms: percentile(&latency, 0.5) * 1e3,
        p99_ms: percentile(&latency, 0.99) * 1e3,
        cost: failed as f64 * refusal,
        ..ClassReport::default()
    };
    let purchase = class("purchase");
    let mut bought: Vec<f64> = s
        .buys
        .iter()
        .filter(|(end, _)| *end == BuyEnd::Bought)
        .map(|(_, t)| *t)
        .collect();
    bought.sort_by(f64::total_cmp);
    let busy = s
        .buys
        .iter()
        .filter(|(end, _)| *end == BuyEnd::Busy)
        .count() as u64;
    let failed = s.buys_sent - bought.len() as u64 - busy;
    let late = purchase.as_ref().map_or(0, |c| {
        bought
            .iter()
            .filter(|t| c.delay_cost().is_late(Duration::from_secs_f64(**t)))
            .count() as u64
    });
    let cost = purchase.as_ref().map_or(0.0, |c| {
        let refusal = c.refusal_cost();
        bought
            .iter()
            .map(|t| c.response_cost(Duration::from_secs_f64(*t)))
            .sum::<f64>()
            + (busy + failed) as f64 * refusal
    });
    let purchases = ClassReport {
        sent: s.buys_sent,
        ok: bought.len() as u64,
        late,
        shed: busy,
        failed,
        timed_out: failed,
        success: bought.len() as f64 / s.buys_sent.max(1) as f64,
        p50_ms: percentile(&bought, 0.5) * 1e3,
        p99_ms: percentile(&bought, 0.99) * 1e3,
        cost,
        ..ClassReport::default()
    };
    let mut ticks = summarise_ticks(s.ticks, s.lateness, players);
    ticks.not_connected = s.not_connected;
    PlayReport {
        moves,
        purchases,
        ticks,
    }
}

/// One player's session until `end`.
async fn player(
    addr: SocketAddr,
    id: u32,
    end: Instant,
    buy_rate: f64,
    run: u64,
    shared: &Mutex<Shared>,
) {
    let lock = || {
        shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let url = format!("ws://{addr}/play");
    let Ok(mut request) = url.as_str().into_client_request() else {
        return;
    };
    if let Ok(value) = format!("Bearer {}", token(id)).parse() {
        request.headers_mut().insert("authorization", value);
    }
    // Purchases on the player's own clock from its start (about
    // `buy_rate` a second, at random), none in the last seconds, which
    // could not be answered before the end.
    let start = Instant::now();
    let last_buy = end.checked_sub(Duration::from_secs(3)).unwrap_or(end);
    let mut rng = crate::game::mix64(u64::from(id) ^ 0xfeed);
    let mut next = move || {
        rng = crate::game::mix64(rng);
        rng
    };
    let draw = |rng: &mut dyn FnMut() -> u64| {
        // Exponential gaps: a Poisson stream of purchases.
        let u = ((rng() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        Duration::from_secs_f64((-u.ln() / buy_rate.max(1e-9)).min(3600.0))
    };
    let mut buy_at = start + draw(&mut next);
    let connect = tokio::time::timeout_at(end, tokio_tungstenite::connect_async(request)).await;
    let ws = match connect {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    };
    // The purchases due while the player had no session (all of them, if
    // it never had one) are sales lost.
    let no_session_until = if ws.is_some() {
        Instant::now()
    } else {
        last_buy
    };
    let mut lost = 0u64;
    while buy_at < last_buy && buy_at <= no_session_until {
        lost += 1;
        buy_at += draw(&mut next);
    }
    {
        let mut s = lock();
        s.buys_sent += lost;
        s.buys.extend((0..lost).map(|_| (BuyEnd::Failed, 0.0)));
        s.not_connected += u64::from(ws.is_none());
    }
    let Some(ws) = ws else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (mut x, mut y) = (500.0f32, 500.0f32);
    let mut seq = 0u64;
    // The move awaiting its verdict: its tick, sequence number, when sent.
    let mut pending: Option<(u64, u64, Instant)> = None;
    // Arrival minus schedule of each frame; the smallest is the offset.
    let mut frames: Vec<(u64, Instant)> = Vec::new();
    let mut buys: HashMap<String, Instant> = HashMap::new();
    let mut buy_n = 0u64;
    let mut local = Shared::default();
    loop {
        // Until the run is over, or the server closes or fails.
        let message = tokio::select! {
            message = tokio::time::timeout_at(end, stream.next()) => message,
            () = tokio::time::sleep_until(buy_at), if buy_at < last_buy => {
                buy_at += draw(&mut next);
                buy_n += 1;
                let order = format!("{run}-{id}-{buy_n}");
                let buy = format!(r#"{{"type":"buy","id":"{order}","item":"potion"}}"#);
                if sink.send(Message::text(buy)).await.is_err() {
                    break;
                }
                local.buys_sent += 1;
                buys.insert(order, Instant::now());
                continue;
            }
        };
        let Ok(Some(Ok(message))) = message else {
            break;
        };
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(message) = serde_json::from_str::<ServerMessage>(&text) else {
            continue;
        };
        let now = Instant::now();
        match message {
            ServerMessage::Tick { tick, ack, .. } => {
                frames.push((tick, now));
                if let Some((t, s, sent)) = pending.take() {
                    // The first frame after a move shows it applied, or it
                    // was not in time (a new session counts from 1, so an
                    // `ack` is this session's).
                    let in_time = ack == s;
                    let tally = local.ticks.entry(t).or_default();
                    tally.sent += 1;
                    local.moves_sent += 1;
                    if in_time {
                        tally.in_time += 1;
                        local.moves_in_time += 1;
                        local
                            .move_latency
                            .push(now.duration_since(sent).as_secs_f64());
                    }
                }
                // A random walk, a step a tick.
                x = (x + (next() % 21) as f32 - 10.0).clamp(0.0, 1000.0);
                y = (y + (next() % 21) as f32 - 10.0).clamp(0.0, 1000.0);
                seq += 1;
                let step =
                    format!(r#"{{"type":"move","tick":{tick},"seq":{seq},"x":{x},"y":{y}}}"#);
                if sink.send(Message::text(step)).await.is_err() {
                    break;
                }
                pending = Some((tick, seq, now));
            }
            ServerMessage::Bought { id, .. } => {
                if let Some(sent) = buys.remove(&id) {
                    local
                        .buys
                        .push((BuyEnd::Bought, now.duration_since(sent).as_secs_f64()));
                }
            }
            ServerMessage::Refused { id, .. } => {
                if let Some(sent) = buys.remove(&id) {
                    local
                        .buys
                        .push((BuyEnd::Busy, now.duration_since(sent).as_secs_f64()));
                }
            }
            ServerMessage::Error { .. } => {}
        }
    }
    let _ = sink.close().await;
    // A move sent in the last tick has no verdict: not counted. Purchases
    // unanswered failed.
    for (_, sent) in buys {
        local.buys.push((
            BuyEnd::Failed,
            end.saturating_duration_since(sent).as_secs_f64(),
        ));
    }
    // A frame's arrival against its tick's schedule: the earliest frame
    // sets the schedule (the server's clock is not the player's).
    if let Some(&(_, first)) = frames.first() {
        let raw: Vec<f64> = frames
            .iter()
            .map(|(t, at)| at.duration_since(first).as_secs_f64() - *t as f64 * TICK.as_secs_f64())
            .collect();
        let offset = raw.iter().copied().fold(f64::INFINITY, f64::min);
        local.lateness = raw.iter().map(|r| r - offset).collect();
    }
    let mut s = lock();
    for (t, tally) in local.ticks {
        let e = s.ticks.entry(t).or_default();
        e.sent += tally.sent;
        e.in_time += tally.in_time;
    }
    s.lateness.extend(local.lateness);
    s.move_latency.extend(local.move_latency);
    s.moves_sent += local.moves_sent;
    s.moves_in_time += local.moves_in_time;
    s.buys.extend(local.buys);
    s.buys_sent += local.buys_sent;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_tick_owed_counts_and_unanswered_purchases_fail() {
        let model = gratify::Stack::from_config(crate::game::CONFIG)
            .unwrap()
            .model();
        let mut s = Shared {
            turns: 100,
            moves_sent: 80,
            moves_in_time: 70,
            buys_sent: 5,
            ..Shared::default()
        };
        s.buys = vec![
            (BuyEnd::Bought, 0.010),
            (BuyEnd::Bought, 0.020),
            (BuyEnd::Bought, 3.0),
            (BuyEnd::Busy, 0.001),
            (BuyEnd::Failed, 0.0),
        ];
        let r = report(s, 10, &model);
        // Ticks without a move sent (no frame came) are moves not made.
        assert_eq!((r.moves.sent, r.moves.ok, r.moves.failed), (100, 70, 30));
        let refusal = model.class(model.id("state").unwrap()).refusal_cost();
        assert!((r.moves.cost - 30.0 * refusal).abs() < 1e-9);
        let p = &r.purchases;
        assert_eq!((p.sent, p.ok, p.shed, p.failed), (5, 3, 1, 1));
        assert_eq!(p.late, 1, "3 s is past the purchase's 2 s deadline");
        let class = model.class(model.id("purchase").unwrap());
        let want = [0.010, 0.020, 3.0]
            .iter()
            .map(|t| class.response_cost(Duration::from_secs_f64(*t)))
            .sum::<f64>()
            + 2.0 * class.refusal_cost();
        assert!((p.cost - want).abs() < 1e-9, "{} {want}", p.cost);
    }
}
