//! The world in memory: players, the rating index the leaderboard and the
//! matchmaker read, positions, and the tick clock.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// The length of a tick of the game loop (20 a second).
pub const TICK: Duration = Duration::from_millis(50);

/// The world's side, in position units: positions are in `[0, SIDE]`.
pub const SIDE: f32 = 1000.0;

/// The farthest a player moves in one tick; a longer move is cut short
/// (the server is the authority on positions).
pub const MAX_STEP: f32 = 12.0;

/// The range within which a tick frame lists other players.
pub const SIGHT: f32 = 100.0;

/// Other players a tick frame lists at most (the nearest).
pub const NEAR: usize = 8;

/// A player in memory.
#[derive(Debug, Clone)]
pub(crate) struct Player {
    pub(crate) name: String,
    /// The seeded rating.
    pub(crate) base: i32,
    /// The sum of the results of the player's processed replays.
    pub(crate) results: i64,
    /// `base + results`, within 0 to 5,000.
    pub(crate) rating: i32,
    pub(crate) coins: u64,
    pub(crate) replays: u32,
    pub(crate) x: f32,
    pub(crate) y: f32,
    /// The last move applied in the current session (its sequence
    /// number; 0 when the session opens).
    pub(crate) seq: u64,
    /// The session whose moves count (the latest seated).
    pub(crate) seat: u64,
    /// The tick of the last move applied: one move a tick.
    pub(crate) moved: Option<u64>,
}

/// Every player, and their ratings in order: best first, then by id.
#[derive(Debug)]
pub(crate) struct Players {
    list: Vec<Player>,
    by_rating: BTreeSet<(Reverse<i32>, u32)>,
    /// The tick open for moves.
    pub(crate) tick: u64,
}

impl Players {
    pub(crate) fn new(list: Vec<Player>) -> Self {
        let by_rating = list
            .iter()
            .enumerate()
            .map(|(id, p)| (Reverse(p.rating), id as u32))
            .collect();
        Self {
            list,
            by_rating,
            tick: 0,
        }
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Player> {
        self.list.get(id as usize)
    }

    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut Player> {
        self.list.get_mut(id as usize)
    }

    /// Adds `delta` to `id`'s results: the rating is the seeded one plus
    /// every result, within 0 to 5,000 (the same however the results are
    /// summed: one at a time, or all at once on a restart), and the index
    /// keeps in step.
    pub(crate) fn rate(&mut self, id: u32, delta: i64) {
        let Some(p) = self.list.get_mut(id as usize) else {
            return;
        };
        let old = p.rating;
        p.results = p.results.saturating_add(delta);
        p.rating = (i64::from(p.base) + p.results).clamp(0, 5000) as i32;
        if p.rating != old {
            self.by_rating.remove(&(Reverse(old), id));
            self.by_rating.insert((Reverse(p.rating), id));
        }
    }

    /// The best `n` players, best first (ties by id).
    pub(crate) fn top(&self, n: usize) -> impl Iterator<Item = (u32, &Player)> + '_ {
        self.by_rating
            .iter()
            .take(n)
            .map(|&(_, id)| (id, &self.list[id as usize]))
    }

    /// `n` other players of the nearest rating to `me`'s (among players as
    /// near, any), nearest first — from the index,
    /// looking at `n` players on each side of `me`, not at everyone.
    pub(crate) fn nearest(&self, me: u32, n: usize) -> Vec<u32> {
        let Some(mine) = self.get(me).map(|p| p.rating) else {
            return Vec::new();
        };
        let at = (Reverse(mine), me);
        // Better ratings, nearest first; then worse ones, nearest first.
        let mut better = self.by_rating.range(..at).rev().peekable();
        let mut worse = self
            .by_rating
            .range((std::ops::Bound::Excluded(at), std::ops::Bound::Unbounded))
            .peekable();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let pick_better = match (better.peek(), worse.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((Reverse(b), _)), Some((Reverse(w), _))) => (b - mine) <= (mine - w),
            };
            let next = if pick_better {
                better.next()
            } else {
                worse.next()
            };
            if let Some(&(_, id)) = next {
                out.push(id);
            }
        }
        out
    }
}

/// Tick numbers from the game's start: tick `t` is open for moves from
/// `epoch + t × TICK` to `epoch + (t + 1) × TICK`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    pub(crate) epoch: Instant,
}

impl Clock {
    /// The tick `at` falls in.
    pub(crate) fn tick_at(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        (since.as_nanos() / TICK.as_nanos()) as u64
    }

    /// When tick `t` closes: a move for it must be applied before (a tick
    /// past the clock's range closes at the end of time).
    pub(crate) fn end_of(&self, t: u64) -> Instant {
        let nanos = (TICK.as_nanos() as u64).saturating_mul(t.saturating_add(1));
        self.epoch
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or_else(|| self.epoch + Duration::from_secs(86_400 * 365 * 100))
    }
}

/// Where a move from `(x0, y0)` towards `(x, y)` ends: at most
/// [`MAX_STEP`] away, inside the world, and short of the first wall on the
/// way (the map's walls are the unit cells [`wall`] says).
pub(crate) fn step(x0: f32, y0: f32, x: f32, y: f32) -> (f32, f32) {
    let (mut dx, mut dy) = (x - x0, y - y0);
    let len = (dx * dx + dy * dy).sqrt();
    if !len.is_finite() {
        return (x0, y0);
    }
    if len > MAX_STEP {
        (dx, dy) = (dx * MAX_STEP / len, dy * MAX_STEP / len);
    }
    // Walk the segment in quarter units; stop before a wall.
    let steps = ((len.min(MAX_STEP)) * 4.0).ceil().max(1.0) as u32;
    let (mut px, mut py) = (x0, y0);
    for i in 1..=steps {
        let f = i as f32 / steps as f32;
        let (qx, qy) = (
            (x0 + dx * f).clamp(0.0, SIDE),
            (y0 + dy * f).clamp(0.0, SIDE),
        );
        if wall(qx, qy) {
            break;
        }
        (px, py) = (qx, qy);
    }
    (px, py)
}

/// Whether the unit cell at `(x, y)` is a wall: one cell in 61, scattered.
pub(crate) fn wall(x: f32, y: f32) -> bool {
    let (cx, cy) = (x as u64, y as u64);
    let h = super::mix64(cx.wrapping_mul(1_000_003) ^ cy);
    h.is_multiple_of(61)
}

/// The other players within [`SIGHT`] of each of `online`, nearest first,
/// at most [`NEAR`]: a grid of `SIGHT`-sized cells, so each player looks at
/// its own cell and the eight around it.
pub(crate) fn neighbours(online: &[(u32, f32, f32)]) -> Vec<Vec<(u32, f32, f32)>> {
    let cell = |x: f32, y: f32| ((x / SIGHT) as i32, (y / SIGHT) as i32);
    let mut grid: HashMap<(i32, i32), Vec<usize>> = HashMap::new();
    for (i, &(_, x, y)) in online.iter().enumerate() {
        grid.entry(cell(x, y)).or_default().push(i);
    }
    online
        .iter()
        .enumerate()
        .map(|(i, &(_, x, y))| {
            let (cx, cy) = cell(x, y);
            let mut seen: Vec<(f32, usize)> = Vec::new();
            for gx in cx - 1..=cx + 1 {
                for gy in cy - 1..=cy + 1 {
                    for &j in grid.get(&(gx, gy)).map_or(&[][..], Vec::as_slice) {
                        if j == i {
                            continue;
                        }
                        let (_, ox, oy) = online[j];
                        let d = (ox - x).powi(2) + (oy - y).powi(2);
                        if d <= SIGHT * SIGHT {
                            seen.push((d, j));
                        }
                    }
                }
            }
            seen.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            seen.iter().take(NEAR).map(|&(_, j)| online[j]).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(ratings: &[i32]) -> Players {
        Players::new(
            ratings
                .iter()
                .map(|&rating| Player {
                    name: String::new(),
                    base: rating,
                    results: 0,
                    rating,
                    coins: 0,
                    replays: 0,
                    x: 0.0,
                    y: 0.0,
                    seq: 0,
                    seat: 0,
                    moved: None,
                })
                .collect(),
        )
    }

    /// The rating distances of the `n` nearest, by a scan of everyone.
    fn scan_nearest(p: &Players, me: u32, n: usize) -> Vec<i32> {
        let mine = p.list[me as usize].rating;
        let mut all: Vec<i32> = p
            .list
            .iter()
            .enumerate()
            .filter(|(id, _)| *id as u32 != me)
            .map(|(_, q)| (q.rating - mine).abs())
            .collect();
        all.sort_unstable();
        all.truncate(n);
        all
    }

    #[test]
    fn the_index_answers_as_a_scan_would_after_any_changes() {
        // Seeded draws: ratings with many ties, then rating changes.
        let mut x = 17u64;
        let mut next = || {
            x = super::super::mix64(x);
            x
        };
        for _ in 0..50 {
            let n = 1 + (next() % 60) as usize;
            let ratings: Vec<i32> = (0..n).map(|_| 1000 + (next() % 20) as i32 * 5).collect();
            let mut p = world(&ratings);
            for _ in 0..(next() % 40) {
                let id = (next() % n as u64) as u32;
                let delta = (next() % 41) as i64 - 20;
                p.rate(id, delta);
            }
            for me in 0..n as u32 {
                let mine = p.list[me as usize].rating;
                for k in [1, 3, 7] {
                    let found = p.nearest(me, k);
                    let mut ids = found.clone();
                    ids.sort_unstable();
                    ids.dedup();
                    assert!(ids.len() == found.len() && !ids.contains(&me), "{found:?}");
                    let distances: Vec<i32> = found
                        .iter()
                        .map(|&id| (p.list[id as usize].rating - mine).abs())
                        .collect();
                    assert_eq!(distances, scan_nearest(&p, me, k), "me {me}, k {k}");
                }
            }
            let mut order: Vec<(Reverse<i32>, u32)> = p
                .list
                .iter()
                .enumerate()
                .map(|(id, q)| (Reverse(q.rating), id as u32))
                .collect();
            order.sort_unstable();
            let top: Vec<u32> = p.top(10).map(|(id, _)| id).collect();
            let want: Vec<u32> = order.iter().take(10).map(|&(_, id)| id).collect();
            assert_eq!(top, want);
        }
    }

    #[test]
    fn a_move_is_cut_short_kept_inside_and_stopped_by_walls() {
        let (x, y) = step(500.0, 500.0, 900.0, 500.0);
        assert!((x - 500.0) <= MAX_STEP + 1e-3 && y == 500.0, "{x} {y}");
        let (x, y) = step(1.0, 1.0, -50.0, -50.0);
        assert!(
            (0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y),
            "{x} {y}"
        );
        assert_eq!(step(5.0, 5.0, f32::NAN, 1.0), (5.0, 5.0));
        // Find a wall and walk into it: the move stops short of it.
        let wall_x = (0..1000).find(|&cx| wall(cx as f32 + 0.5, 300.5)).unwrap() as f32;
        let start = (wall_x - 5.0).max(0.0);
        if !(start as u32..wall_x as u32).any(|c| wall(c as f32 + 0.5, 300.5)) {
            let (x, _) = step(start + 0.5, 300.5, wall_x + 6.0, 300.5);
            assert!(x < wall_x, "stopped at {x}, wall at {wall_x}");
        }
    }

    #[test]
    fn neighbours_are_the_nearest_in_sight_and_never_oneself() {
        let online = vec![
            (1, 10.0, 10.0),
            (2, 20.0, 10.0),
            (3, 115.0, 10.0),
            (4, 900.0, 900.0),
        ];
        let near = neighbours(&online);
        assert_eq!(near[0].iter().map(|n| n.0).collect::<Vec<_>>(), vec![2]);
        assert_eq!(near[1].iter().map(|n| n.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!(near[3].is_empty());
        let crowd: Vec<(u32, f32, f32)> = (0..30).map(|i| (i, 50.0 + i as f32, 50.0)).collect();
        let near = neighbours(&crowd);
        assert_eq!(near[0].len(), NEAR);
        assert_eq!(near[0][0].0, 1);
        assert!(
            near.iter()
                .enumerate()
                .all(|(i, n)| n.iter().all(|o| o.0 != i as u32))
        );
    }

    #[test]
    fn ticks_close_on_their_boundaries() {
        let epoch = Instant::now();
        let c = Clock { epoch };
        assert_eq!(c.tick_at(epoch), 0);
        assert_eq!(c.tick_at(epoch + TICK - Duration::from_nanos(1)), 0);
        assert_eq!(c.tick_at(c.end_of(0)), 1);
        assert_eq!(c.end_of(4), epoch + TICK * 5);
        assert!(c.end_of(u64::MAX) > c.end_of(1 << 30), "no overflow");
    }
}
