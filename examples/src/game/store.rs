//! What the game must not lose: uploaded replays (until processed, and
//! their results) and purchases, in SQLite.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

/// The store's result.
pub type StoreResult<T> = Result<T, rusqlite::Error>;

/// A replay's state in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Accepted, not processed yet.
    Queued,
    /// Processed, with the rating points it gave its player.
    Processed(i32),
}

/// What a purchase did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bought {
    /// Bought now; the coins left.
    Now(u64),
    /// This request id was bought before (a retry), this item: nothing
    /// more is spent.
    Already(String),
    /// Not enough coins; nothing is spent.
    TooPoor,
}

/// The game's SQLite database: one connection, as SQLite has one writer at
/// a time and every statement here writes or is as short as a write. Its
/// methods block: call them off the async threads.
///
/// The seeded world is rebuilt on every start; what happened to it since is
/// here. A player's rating is the seeded one plus the results of their
/// processed replays, and their coins the seeded ones less what they spent,
/// so a restart — or a crash — finds them where they were.
///
/// An upload is committed before it is answered `202 Accepted`, and its
/// result is committed in the same statement that marks it processed: a
/// replay is processed exactly once, even if the process dies between the
/// analysis and the commit (it is analysed again on the next start, and its
/// result counts once). The file is in WAL mode with `synchronous = NORMAL`:
/// a killed process loses nothing committed; a power cut may lose the last
/// commits.
///
/// One process owns the file: the database is opened in SQLite's exclusive
/// locking mode, and a second process opening it fails ("database is
/// locked") rather than spending coins the first one also spends.
pub struct Store {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating on first use) the database at `path`.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        // Another process holding the file: fail soon, not after a while.
        conn.busy_timeout(std::time::Duration::from_millis(500))?;
        Self::with(conn)
    }

    /// A database in memory: lost with the process (for tests and demos
    /// that do not need it to outlive them).
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn in_memory() -> StoreResult<Self> {
        Self::with(Connection::open_in_memory()?)
    }

    fn with(conn: Connection) -> StoreResult<Self> {
        conn.execute_batch(
            "PRAGMA locking_mode = EXCLUSIVE;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS replays (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 player INTEGER NOT NULL,
                 key TEXT,
                 data BLOB,
                 delta INTEGER);
             CREATE INDEX IF NOT EXISTS replays_queued ON replays (id) WHERE delta IS NULL;
             CREATE UNIQUE INDEX IF NOT EXISTS replays_key ON replays (player, key)
                 WHERE key IS NOT NULL;
             CREATE TABLE IF NOT EXISTS purchases (
                 player INTEGER NOT NULL,
                 request TEXT NOT NULL,
                 item TEXT NOT NULL,
                 price INTEGER NOT NULL,
                 PRIMARY KEY (player, request));",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps an uploaded replay until it is processed: its id, and `true`
    /// if it is new. With `key` (the client's idempotency key), an upload
    /// the player made before with the same key is that replay (`false`):
    /// a retry after a lost answer is not a second replay.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn add_replay(
        &self,
        player: u32,
        key: Option<&str>,
        data: &[u8],
    ) -> StoreResult<(u64, bool)> {
        let conn = self.conn();
        if let Some(key) = key {
            let known: Option<i64> = conn
                .query_row(
                    "SELECT id FROM replays WHERE player = ?1 AND key = ?2",
                    params![player, key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = known {
                return Ok((id as u64, false));
            }
        }
        conn.execute(
            "INSERT INTO replays (player, key, data) VALUES (?1, ?2, ?3)",
            params![player, key, data],
        )?;
        Ok((conn.last_insert_rowid() as u64, true))
    }

    /// The data of a replay not processed yet (`None` once processed).
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn replay_data(&self, id: u64) -> StoreResult<Option<Vec<u8>>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        Ok(self
            .conn()
            .query_row(
                "SELECT data FROM replays WHERE id = ?1 AND delta IS NULL",
                [id],
                |r| r.get::<_, Option<Vec<u8>>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Records a replay's result and forgets its data, if it was still
    /// queued: `true` then, `false` if it was already processed (or is
    /// unknown), so that its result counts once.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn finish_replay(&self, id: u64, delta: i32) -> StoreResult<bool> {
        let changed = self.conn().execute(
            "UPDATE replays SET delta = ?2, data = NULL WHERE id = ?1 AND delta IS NULL",
            params![id as i64, delta],
        )?;
        Ok(changed == 1)
    }

    /// A replay's owner and state, if it exists.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn replay(&self, id: u64) -> StoreResult<Option<(u32, Stored)>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        self.conn()
            .query_row(
                "SELECT player, delta FROM replays WHERE id = ?1",
                [id],
                |r| {
                    let delta: Option<i32> = r.get(1)?;
                    Ok((r.get(0)?, delta.map_or(Stored::Queued, Stored::Processed)))
                },
            )
            .optional()
    }

    /// Every replay accepted and not processed yet, oldest first (ids and
    /// players; the data stays on disk until processed): the work a start
    /// takes up again.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn queued_replays(&self) -> StoreResult<Vec<(u64, u32)>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, player FROM replays WHERE delta IS NULL ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
        rows.collect()
    }

    /// Per player, the rating points of their processed replays and how
    /// many there were.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn replay_results(&self) -> StoreResult<HashMap<u32, (i64, u32)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT player, SUM(delta), COUNT(*) FROM replays WHERE delta IS NOT NULL GROUP BY player",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?;
        rows.collect()
    }

    /// Per player, the coins spent.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn spent(&self) -> StoreResult<HashMap<u32, u64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT player, SUM(price) FROM purchases GROUP BY player")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        rows.collect()
    }

    /// Buys `item` at `price` for `player` under the client's `request` id,
    /// once: `coins` reads the player's coins and `pay` takes the price
    /// from them, both while the purchase holds the database, so that two
    /// purchases cannot spend the same coins. A request id already bought
    /// spends nothing ([`Bought::Already`]).
    ///
    /// # Errors
    ///
    /// SQLite's (nothing is spent).
    pub fn buy(
        &self,
        player: u32,
        request: &str,
        item: &str,
        price: u64,
        coins: impl FnOnce() -> u64,
        pay: impl FnOnce(u64),
    ) -> StoreResult<Bought> {
        let conn = self.conn();
        let known: Option<String> = conn
            .query_row(
                "SELECT item FROM purchases WHERE player = ?1 AND request = ?2",
                params![player, request],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(item) = known {
            return Ok(Bought::Already(item));
        }
        let have = coins();
        if have < price {
            return Ok(Bought::TooPoor);
        }
        conn.execute(
            "INSERT INTO purchases (player, request, item, price) VALUES (?1, ?2, ?3, ?4)",
            params![player, request, item, price as i64],
        )?;
        // Committed: now the coins in memory follow.
        pay(price);
        Ok(Bought::Now(have - price))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_counts_once_and_a_purchase_is_paid_once() {
        let store = Store::in_memory().unwrap();
        let (id, new) = store.add_replay(3, Some("k1"), b"frames").unwrap();
        assert!(new);
        // The same key again (a retry): the same replay.
        assert_eq!(
            store.add_replay(3, Some("k1"), b"frames").unwrap(),
            (id, false)
        );
        // Another player's key, or no key: another replay.
        let (other, new) = store.add_replay(4, Some("k1"), b"x").unwrap();
        assert!(new && other != id);
        let (third, new) = store.add_replay(3, None, b"y").unwrap();
        assert!(new && third != id);
        assert_eq!(store.replay(id).unwrap(), Some((3, Stored::Queued)));
        assert_eq!(
            store.replay_data(id).unwrap().as_deref(),
            Some(&b"frames"[..])
        );
        assert_eq!(
            store.queued_replays().unwrap(),
            vec![(id, 3), (other, 4), (third, 3)]
        );
        assert!(store.finish_replay(id, 7).unwrap());
        // Processed again (a restart between the analysis and the commit
        // of another process): counted once.
        assert!(!store.finish_replay(id, 7).unwrap());
        assert_eq!(store.replay_results().unwrap()[&3], (7, 1));
        assert_eq!(
            store.queued_replays().unwrap(),
            vec![(other, 4), (third, 3)]
        );
        assert_eq!(store.replay_data(id).unwrap(), None, "processed: no data");
        assert_eq!(store.replay(third + 1).unwrap(), None);
        assert_eq!(store.replay(u64::MAX).unwrap(), None);

        let mut coins = 100;
        let mut buy = |request: &str, price| {
            let have = coins;
            let mut paid = 0;
            let r = store
                .buy(1, request, "sword", price, || have, |p| paid = p)
                .unwrap();
            coins -= paid;
            r
        };
        assert_eq!(buy("a", 60), Bought::Now(40));
        assert_eq!(buy("a", 60), Bought::Already("sword".into()));
        assert_eq!(buy("b", 60), Bought::TooPoor);
        assert_eq!(coins, 40);
        assert_eq!(store.spent().unwrap()[&1], 60);
    }

    #[test]
    fn one_process_owns_the_file() {
        let path = std::env::temp_dir().join(format!(
            "gratify-store-lock-{}-{}.db",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let first = Store::open(&path).unwrap();
        first.add_replay(1, None, b"x").unwrap();
        assert!(Store::open(&path).is_err(), "a second owner was let in");
        drop(first);
        let again = Store::open(&path).unwrap();
        assert_eq!(again.queued_replays().unwrap().len(), 1);
        drop(again);
        for end in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{end}", path.display()));
        }
    }
}
