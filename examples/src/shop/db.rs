//! The store's data: SQLite (or PostgreSQL), created and seeded deterministically.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// Products in the seeded catalogue.
pub const PRODUCTS: u32 = 2_000;

const ADJECTIVES: [&str; 12] = [
    "light",
    "classic",
    "trail",
    "urban",
    "merino",
    "waterproof",
    "recycled",
    "wide",
    "slim",
    "thermal",
    "vintage",
    "sport",
];
const NOUNS: [&str; 10] = [
    "runner", "boot", "sandal", "sneaker", "jacket", "sock", "cap", "backpack", "glove", "hoodie",
];
const CATEGORIES: [&str; 5] = ["shoes", "outdoor", "clothing", "accessories", "sale"];

/// A product as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Product {
    /// Its id.
    pub id: u32,
    /// Its name.
    pub name: String,
    /// Its category.
    pub category: String,
    /// Its price in cents.
    pub price_cents: i64,
    /// A description.
    pub description: String,
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Order {
    /// Its id.
    pub id: i64,
    /// Who placed it.
    pub user: String,
    /// Its total in cents.
    pub total_cents: i64,
    /// `placed`.
    pub status: String,
    /// Lines: product id and quantity.
    pub items: Vec<(u32, u32)>,
}

/// The most sessions one account has open: signing in once more closes its
/// oldest.
pub const MAX_SESSIONS: i64 = 16;

/// Why a checkout placed no order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotPlaced {
    /// The cart is empty.
    Empty,
    /// The cart is not what the checkout expected (it changed since).
    Changed,
}

/// Whether a cart's lines (product, quantity, price; by product) are
/// `expected` (product, quantity).
pub(crate) fn same_lines(items: &[(u32, u32, i64)], expected: &[(u32, u32)]) -> bool {
    items.len() == expected.len()
        && items
            .iter()
            .zip(expected)
            .all(|((p, q, _), (ep, eq))| p == ep && q == eq)
}

/// An account: who a session belongs to.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Account {
    /// Its id.
    pub id: i64,
    /// Its e-mail address (lower-case): where its confirmations go, and
    /// whose carts and orders are its own.
    pub email: String,
}

/// What the store's database refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite's.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL's.
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The durable queue's (queueing an e-mail inside a checkout).
    #[cfg(feature = "postgres")]
    #[error("queue: {0}")]
    Queue(#[from] gratify::offload::durable::DurableError),
}

/// The store's results.
pub type DbResult<T> = Result<T, DbError>;

/// The store: SQLite (a pool of connections to one file in WAL mode:
/// readers in parallel, writers one at a time under SQLite's own lock, each
/// waiting up to 5 s for it; the handlers run queries on the blocking
/// pool), or PostgreSQL with the feature `postgres` (what replicas share,
/// and where an order and its e-mail's job commit together).
#[derive(Clone)]
pub struct Db {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Lite(Arc<LitePool>),
    #[cfg(feature = "postgres")]
    Pg(Arc<super::pg::PgStore>),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

/// SQLite connections to one database, handed out one per query or
/// transaction.
struct LitePool {
    conns: Vec<Mutex<Connection>>,
    next: std::sync::atomic::AtomicUsize,
}

impl LitePool {
    /// A free connection if there is one (starting from a different one
    /// each time), else the next in turn when it frees.
    fn get(&self) -> std::sync::MutexGuard<'_, Connection> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..n {
            match self.conns[(start + i) % n].try_lock() {
                Ok(conn) => return conn,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        self.conns[start % n]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Connections a file-backed store opens.
pub const SQLITE_CONNECTIONS: usize = 4;

/// How long a connection waits for another's write to finish.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn lcg(x: u64) -> u64 {
    x.wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407)
}

/// The seeded catalogue, the same on every start and every backend.
pub(crate) fn seed_products() -> Vec<Product> {
    let mut x = 42u64;
    (1..=PRODUCTS)
        .map(|id| {
            x = lcg(x);
            let adjective = ADJECTIVES[(x >> 33) as usize % ADJECTIVES.len()];
            let noun = NOUNS[(x >> 41) as usize % NOUNS.len()];
            let category = CATEGORIES[(x >> 49) as usize % CATEGORIES.len()];
            let price = 500 + (x >> 20) % 20_000;
            let description = format!(
                "The {adjective} {noun}: made to last, sized true, shipped in two days. {}",
                "Free returns within 30 days. ".repeat(1 + (x >> 55) as usize % 6)
            );
            Product {
                id,
                name: format!("{adjective} {noun} {id}"),
                category: category.to_owned(),
                price_cents: price as i64,
                description,
            }
        })
        .collect()
}

/// Runs `$pg` on the PostgreSQL store, or goes on with SQLite.
macro_rules! on_postgres {
    ($self:ident, $pg:ident => $e:expr) => {
        #[cfg(feature = "postgres")]
        if let Inner::Pg($pg) = &$self.inner {
            return $e;
        }
    };
}

impl Db {
    /// This store's identity, made when its database was: order ids are
    /// unique only within one database, so keys that outlive it (a durable
    /// job's) carry this too.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn store_id(&self) -> DbResult<String> {
        on_postgres!(self, pg => Ok(pg.store_id()));
        Ok(self
            .lite()?
            .query_row("SELECT id FROM store LIMIT 1", [], |r| r.get(0))?)
    }

    /// Opens (creating and seeding on first use) the store at `path`.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn open(path: &Path) -> DbResult<Self> {
        let first = Connection::open(path)?;
        first.busy_timeout(BUSY_TIMEOUT)?;
        let mut db = Self::with(first)?;
        // The file exists and is in WAL mode now: the rest of the pool —
        // unless it is no file (`:memory:`, an empty path: each connection
        // would open a database of its own) or not in WAL mode (a writer
        // would block every reader).
        let shared_file = match &db.inner {
            Inner::Lite(pool) => pool
                .get()
                .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
                .is_ok_and(|mode| mode.eq_ignore_ascii_case("wal")),
            #[cfg(feature = "postgres")]
            Inner::Pg(_) => false,
        };
        if shared_file
            && let Inner::Lite(pool) = &mut db.inner
            && let Some(pool) = Arc::get_mut(pool)
        {
            for _ in 1..SQLITE_CONNECTIONS {
                let conn = Connection::open(path)?;
                conn.busy_timeout(BUSY_TIMEOUT)?;
                conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
                pool.conns.push(Mutex::new(conn));
            }
        }
        Ok(db)
    }

    /// An in-memory store, seeded (one connection: an in-memory database is
    /// private to its connection).
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn in_memory() -> DbResult<Self> {
        Self::with(Connection::open_in_memory()?)
    }

    /// The store in PostgreSQL on `pool` (tables created and seeded on first
    /// use, one replica at a time). With `queue`, a checkout queues its
    /// confirmation e-mail in the order's own transaction. Its methods block
    /// on the current runtime: call them off the async threads.
    ///
    /// # Errors
    ///
    /// PostgreSQL's.
    #[cfg(feature = "postgres")]
    pub async fn postgres(
        pool: sqlx::PgPool,
        queue: Option<gratify::offload::durable::DurableQueue>,
    ) -> DbResult<Self> {
        Ok(Self {
            inner: Inner::Pg(Arc::new(super::pg::PgStore::open(pool, queue).await?)),
        })
    }

    /// Whether a checkout queues its confirmation e-mail itself, in its
    /// own transaction (PostgreSQL with a queue).
    pub fn queues_confirmations(&self) -> bool {
        on_postgres!(self, pg => pg.queues_confirmations());
        false
    }

    fn with(conn: Connection) -> DbResult<Self> {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS products (
                 id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
                 price_cents INTEGER NOT NULL, description TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS carts (
                 user TEXT NOT NULL, product_id INTEGER NOT NULL, qty INTEGER NOT NULL,
                 PRIMARY KEY (user, product_id));
             CREATE TABLE IF NOT EXISTS orders (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL,
                 total_cents INTEGER NOT NULL, status TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS order_items (
                 order_id INTEGER NOT NULL, product_id INTEGER NOT NULL, qty INTEGER NOT NULL);
             -- The mailer's sink: one row per order, so a repeated send is a no-op.
             CREATE TABLE IF NOT EXISTS outbox (
                 order_id INTEGER PRIMARY KEY, email TEXT NOT NULL, attempts INTEGER NOT NULL);
             -- This store's identity: order ids repeat across database files.
             CREATE TABLE IF NOT EXISTS store (id TEXT NOT NULL);
             -- Accounts, with their passwords' Argon2id hashes (PHC strings).
             CREATE TABLE IF NOT EXISTS accounts (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL UNIQUE,
                 password TEXT NOT NULL);
             -- Open sessions, by their token's SHA-256 (hex), until `expires`
             -- (Unix seconds).
             CREATE TABLE IF NOT EXISTS sessions (
                 token TEXT PRIMARY KEY, account INTEGER NOT NULL, expires INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS sessions_account ON sessions (account);
             CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);",
        )?;
        let has_id: u32 = conn.query_row("SELECT COUNT(*) FROM store", [], |r| r.get(0))?;
        if has_id == 0 {
            conn.execute("INSERT INTO store (id) VALUES (?1)", [fresh_store_id()])?;
        }
        let seeded: u32 = conn.query_row("SELECT COUNT(*) FROM products", [], |r| r.get(0))?;
        if seeded == 0 {
            let tx = conn.unchecked_transaction()?;
            {
                let mut insert = tx.prepare(
                    "INSERT INTO products (id, name, category, price_cents, description) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for p in seed_products() {
                    insert.execute(params![
                        p.id,
                        p.name,
                        p.category,
                        p.price_cents,
                        p.description
                    ])?;
                }
            }
            tx.commit()?;
        }
        Ok(Self {
            inner: Inner::Lite(Arc::new(LitePool {
                conns: vec![Mutex::new(conn)],
                next: std::sync::atomic::AtomicUsize::new(0),
            })),
        })
    }

    /// A SQLite connection of the pool (PostgreSQL stores have answered
    /// before any caller gets here).
    fn lite(&self) -> DbResult<std::sync::MutexGuard<'_, Connection>> {
        match &self.inner {
            Inner::Lite(pool) => Ok(pool.get()),
            #[cfg(feature = "postgres")]
            Inner::Pg(_) => Err(DbError::Sqlite(rusqlite::Error::InvalidQuery)),
        }
    }

    fn product_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Product> {
        Ok(Product {
            id: r.get(0)?,
            name: r.get(1)?,
            category: r.get(2)?,
            price_cents: r.get(3)?,
            description: r.get(4)?,
        })
    }

    /// A page of the catalogue (50 a page, from 1).
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn catalogue(&self, page: u32) -> DbResult<Vec<Product>> {
        on_postgres!(self, pg => pg.catalogue(page));
        let conn = self.lite()?;
        let mut q = conn.prepare_cached(
            "SELECT id, name, category, price_cents, description FROM products ORDER BY id LIMIT 50 OFFSET ?1",
        )?;
        let offset = i64::from(page.max(1) - 1) * 50;
        Ok(q.query_map([offset], Self::product_of)?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// One product.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn product(&self, id: u32) -> DbResult<Option<Product>> {
        on_postgres!(self, pg => pg.product(id));
        let conn = self.lite()?;
        Ok(conn
            .prepare_cached(
                "SELECT id, name, category, price_cents, description FROM products WHERE id = ?1",
            )?
            .query_row([id], Self::product_of)
            .optional()?)
    }

    /// Products whose name contains `text` (at most 20).
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn search(&self, text: &str) -> DbResult<Vec<Product>> {
        on_postgres!(self, pg => pg.search(text));
        let conn = self.lite()?;
        let pattern = format!("%{}%", text.replace(['%', '_'], ""));
        let mut q = conn.prepare_cached(
            "SELECT id, name, category, price_cents, description FROM products WHERE name LIKE ?1 ORDER BY id LIMIT 20",
        )?;
        Ok(q.query_map([pattern], Self::product_of)?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Every product's id, category and price, for scoring.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn features(&self) -> DbResult<Vec<(u32, String, i64)>> {
        on_postgres!(self, pg => Ok(pg.features()));
        let conn = self.lite()?;
        let mut q = conn.prepare_cached("SELECT id, category, price_cents FROM products")?;
        Ok(q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Adds `qty` of `product` to `user`'s cart; `false` if there is no such
    /// product.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn add_to_cart(&self, user: &str, product: u32, qty: u32) -> DbResult<bool> {
        on_postgres!(self, pg => pg.add_to_cart(user, product, qty));
        let conn = self.lite()?;
        let exists: Option<u32> = conn
            .query_row("SELECT id FROM products WHERE id = ?1", [product], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_none() {
            return Ok(false);
        }
        conn.execute(
            "INSERT INTO carts (user, product_id, qty) VALUES (?1, ?2, ?3)
             ON CONFLICT (user, product_id) DO UPDATE SET qty = qty + excluded.qty",
            params![user, product, qty],
        )?;
        Ok(true)
    }

    /// Turns `user`'s cart into an order (in one transaction; on
    /// PostgreSQL with a queue, its confirmation e-mail's job too); `None`
    /// for an empty cart.
    ///
    /// # Errors
    ///
    /// The database's (nothing is placed then).
    pub fn checkout(&self, user: &str) -> DbResult<Option<Order>> {
        Ok(self.checkout_of(user, None)?.ok())
    }

    /// [`checkout`](Self::checkout), placing the order only if the cart
    /// holds exactly `expected` (product and quantity, by product) when the
    /// transaction reads it — the lines an inventory reserved; otherwise
    /// nothing changes.
    ///
    /// # Errors
    ///
    /// The database's (nothing is placed then).
    pub fn checkout_of(
        &self,
        user: &str,
        expected: Option<&[(u32, u32)]>,
    ) -> DbResult<Result<Order, NotPlaced>> {
        on_postgres!(self, pg => pg.checkout(user, expected));
        let mut conn = self.lite()?;
        // The write lock from the start: a read that later wants to write
        // could otherwise find another writer's commit in between and fail.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let items: Vec<(u32, u32, i64)> = {
            let mut q = tx.prepare(
                "SELECT c.product_id, c.qty, p.price_cents FROM carts c JOIN products p ON p.id = c.product_id
                 WHERE c.user = ?1 ORDER BY c.product_id",
            )?;
            q.query_map([user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        if items.is_empty() {
            return Ok(Err(NotPlaced::Empty));
        }
        if expected.is_some_and(|e| !same_lines(&items, e)) {
            return Ok(Err(NotPlaced::Changed));
        }
        let total: i64 = items.iter().map(|(_, q, p)| i64::from(*q) * p).sum();
        tx.execute(
            "INSERT INTO orders (user, total_cents, status) VALUES (?1, ?2, 'placed')",
            params![user, total],
        )?;
        let id = tx.last_insert_rowid();
        for (product, qty, _) in &items {
            tx.execute(
                "INSERT INTO order_items (order_id, product_id, qty) VALUES (?1, ?2, ?3)",
                params![id, product, qty],
            )?;
        }
        tx.execute("DELETE FROM carts WHERE user = ?1", [user])?;
        tx.commit()?;
        Ok(Ok(Order {
            id,
            user: user.to_owned(),
            total_cents: total,
            status: "placed".into(),
            items: items.iter().map(|(p, q, _)| (*p, *q)).collect(),
        }))
    }

    /// The lines of `user`'s cart: product and quantity, by product.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn cart(&self, user: &str) -> DbResult<Vec<(u32, u32)>> {
        on_postgres!(self, pg => pg.cart(user));
        let conn = self.lite()?;
        // As a checkout reads it: lines of products that exist.
        let mut q = conn.prepare_cached(
            "SELECT c.product_id, c.qty FROM carts c JOIN products p ON p.id = c.product_id
             WHERE c.user = ?1 ORDER BY c.product_id",
        )?;
        Ok(q.query_map([user], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// An order by id, if `owner` (its user) placed it: none otherwise,
    /// found by one query either way.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn order(&self, id: i64, owner: &str) -> DbResult<Option<Order>> {
        on_postgres!(self, pg => pg.order(id, owner));
        let conn = self.lite()?;
        let head: Option<(String, i64, String)> = conn
            .query_row(
                "SELECT user, total_cents, status FROM orders WHERE id = ?1 AND user = ?2",
                params![id, owner],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((user, total_cents, status)) = head else {
            return Ok(None);
        };
        let mut q = conn.prepare_cached(
            "SELECT product_id, qty FROM order_items WHERE order_id = ?1 ORDER BY product_id",
        )?;
        let items = q
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(Order {
            id,
            user,
            total_cents,
            status,
            items,
        }))
    }

    /// Records the confirmation e-mail of `order` in the outbox, once: a
    /// repeated send (a retry after a crash) only counts an attempt.
    /// Returns whether this call sent it.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn send_confirmation(&self, order: i64, email: &str) -> DbResult<bool> {
        on_postgres!(self, pg => pg.send_confirmation(order, email));
        let conn = self.lite()?;
        let inserted = conn.execute(
            "INSERT INTO outbox (order_id, email, attempts) VALUES (?1, ?2, 1)
             ON CONFLICT (order_id) DO UPDATE SET attempts = attempts + 1",
            params![order, email],
        )?;
        let attempts: i64 = conn.query_row(
            "SELECT attempts FROM outbox WHERE order_id = ?1",
            [order],
            |r| r.get(0),
        )?;
        Ok(inserted == 1 && attempts == 1)
    }

    /// Orders without a confirmation in the outbox (id and user): after a
    /// crash, the e-mails still to send.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn unconfirmed(&self) -> DbResult<Vec<(i64, String)>> {
        on_postgres!(self, pg => pg.unconfirmed());
        let conn = self.lite()?;
        let mut q = conn.prepare(
            "SELECT o.id, o.user FROM orders o LEFT JOIN outbox m ON m.order_id = o.id
             WHERE m.order_id IS NULL ORDER BY o.id",
        )?;
        Ok(q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Opens an account for `email` (lower-case) with a password hash;
    /// `None` if the address has one already.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn create_account(&self, email: &str, password: &str) -> DbResult<Option<Account>> {
        on_postgres!(self, pg => pg.create_account(email, password));
        let conn = self.lite()?;
        let inserted = conn.execute(
            "INSERT INTO accounts (email, password) VALUES (?1, ?2) ON CONFLICT (email) DO NOTHING",
            params![email, password],
        )?;
        Ok((inserted == 1).then(|| Account {
            id: conn.last_insert_rowid(),
            email: email.to_owned(),
        }))
    }

    /// The account of `email` and its password hash, if it has one.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn credentials(&self, email: &str) -> DbResult<Option<(Account, String)>> {
        on_postgres!(self, pg => pg.credentials(email));
        let conn = self.lite()?;
        Ok(conn
            .query_row(
                "SELECT id, email, password FROM accounts WHERE email = ?1",
                [email],
                |r| {
                    Ok((
                        Account {
                            id: r.get(0)?,
                            email: r.get(1)?,
                        },
                        r.get(2)?,
                    ))
                },
            )
            .optional()?)
    }

    /// Opens a session of `account` under a token's hash until `expires`
    /// (Unix seconds). Sessions that have expired by `now` are removed, and
    /// the account's oldest beyond [`MAX_SESSIONS`] - 1 are closed.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn open_session(&self, token: &str, account: i64, now: i64, expires: i64) -> DbResult<()> {
        on_postgres!(self, pg => pg.open_session(token, account, now, expires));
        let mut conn = self.lite()?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // A hundred at a time: a sign-in after a quiet spell does not hold
        // the write lock to sweep every session that expired meanwhile.
        tx.execute(
            "DELETE FROM sessions WHERE token IN (
                 SELECT token FROM sessions WHERE expires <= ?1 LIMIT 100)",
            [now],
        )?;
        tx.execute(
            "DELETE FROM sessions WHERE account = ?1 AND token NOT IN (
                 SELECT token FROM sessions WHERE account = ?1 ORDER BY expires DESC LIMIT ?2)",
            params![account, MAX_SESSIONS - 1],
        )?;
        tx.execute(
            "INSERT INTO sessions (token, account, expires) VALUES (?1, ?2, ?3)",
            params![token, account, expires],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The account whose session a token's hash opens at `now` (Unix
    /// seconds): none for an unknown, closed or expired one.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn session(&self, token: &str, now: i64) -> DbResult<Option<Account>> {
        on_postgres!(self, pg => pg.session(token, now));
        let conn = self.lite()?;
        let mut q = conn.prepare_cached(
            "SELECT a.id, a.email FROM sessions s JOIN accounts a ON a.id = s.account
             WHERE s.token = ?1 AND s.expires > ?2",
        )?;
        Ok(q.query_row(params![token, now], |r| {
            Ok(Account {
                id: r.get(0)?,
                email: r.get(1)?,
            })
        })
        .optional()?)
    }

    /// Closes the session of a token's hash; whether it was open.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn close_session(&self, token: &str) -> DbResult<bool> {
        on_postgres!(self, pg => pg.close_session(token));
        let conn = self.lite()?;
        Ok(conn.execute("DELETE FROM sessions WHERE token = ?1", [token])? == 1)
    }

    /// Orders placed, and confirmation e-mails in the outbox.
    ///
    /// # Errors
    ///
    /// The database's.
    pub fn counts(&self) -> DbResult<(i64, i64)> {
        on_postgres!(self, pg => pg.counts());
        let conn = self.lite()?;
        let orders = conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?;
        let mails = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
        Ok((orders, mails))
    }
}

/// A store identity unlikely to repeat: the time and random bits.
pub(crate) fn fresh_store_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session opens its account until it expires or is closed, and an
    /// account keeps at most [`MAX_SESSIONS`] open (its oldest closed
    /// first). The same sequence runs on PostgreSQL in
    /// `tests/shop_postgres.rs`.
    #[test]
    fn sessions_expire_close_and_are_capped() {
        let db = Db::in_memory().unwrap();
        let ann = db
            .create_account("ann@shop.example", "hash")
            .unwrap()
            .unwrap();
        assert_eq!(
            db.create_account("ann@shop.example", "other").unwrap(),
            None
        );
        assert_eq!(
            db.credentials("ann@shop.example").unwrap().unwrap().1,
            "hash"
        );
        db.open_session("t0", ann.id, 1_000, 1_060).unwrap();
        assert_eq!(db.session("t0", 1_059).unwrap(), Some(ann.clone()));
        assert_eq!(db.session("t0", 1_060).unwrap(), None, "expired");
        assert_eq!(db.session("other", 1_000).unwrap(), None);
        assert!(db.close_session("t0").unwrap());
        assert_eq!(db.session("t0", 1_000).unwrap(), None, "closed");
        assert!(!db.close_session("t0").unwrap());
        for i in 0..MAX_SESSIONS + 4 {
            db.open_session(&format!("s{i}"), ann.id, 2_000, 3_000 + i)
                .unwrap();
        }
        let open = (0..MAX_SESSIONS + 4)
            .filter(|i| db.session(&format!("s{i}"), 2_500).unwrap().is_some())
            .collect::<Vec<_>>();
        assert_eq!(open, (4..MAX_SESSIONS + 4).collect::<Vec<_>>());
    }

    #[test]
    fn a_store_keeps_its_id_and_another_store_has_another() {
        let dir = std::env::temp_dir().join(format!("gratify-store-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.db");
        let first = Db::open(&path).unwrap().store_id().unwrap();
        assert_eq!(Db::open(&path).unwrap().store_id().unwrap(), first);
        let other = Db::open(&dir.join("b.db")).unwrap().store_id().unwrap();
        assert_ne!(other, first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Many threads adding to carts and checking out at once on one file:
    /// every checkout is placed with its own cart's total, none fails for a
    /// busy database, and readers go on meanwhile.
    #[test]
    fn concurrent_checkouts_on_the_pool_all_land() {
        let dir = std::env::temp_dir().join(format!("gratify-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shop.db");
        let _ = std::fs::remove_file(&path);
        let db = Db::open(&path).unwrap();
        match &db.inner {
            Inner::Lite(pool) => assert_eq!(pool.conns.len(), SQLITE_CONNECTIONS),
            #[cfg(feature = "postgres")]
            Inner::Pg(_) => unreachable!(),
        }
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let db = db.clone();
                std::thread::spawn(move || {
                    let mut placed = Vec::new();
                    for i in 0..25u32 {
                        let user = format!("user-{t}-{i}");
                        assert!(db.add_to_cart(&user, 1 + (t * 25 + i) % 100, 2).unwrap());
                        assert!(!db.catalogue(1).unwrap().is_empty());
                        let order = db.checkout(&user).unwrap().unwrap();
                        placed.push((user, order));
                    }
                    placed
                })
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        for thread in threads {
            for (user, order) in thread.join().unwrap() {
                let price = db.product(order.items[0].0).unwrap().unwrap().price_cents;
                assert_eq!(order.total_cents, 2 * price, "{user}");
                assert!(ids.insert(order.id), "one order id each");
                assert!(
                    db.checkout(&user).unwrap().is_none(),
                    "the cart is empty after"
                );
            }
        }
        assert_eq!(ids.len(), 200);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `:memory:` names no file: the store keeps one connection, whose
    /// database has the tables.
    #[test]
    fn an_in_memory_path_keeps_one_connection() {
        let db = Db::open(Path::new(":memory:")).unwrap();
        match &db.inner {
            Inner::Lite(pool) => assert_eq!(pool.conns.len(), 1),
            #[cfg(feature = "postgres")]
            Inner::Pg(_) => unreachable!(),
        }
        for _ in 0..8 {
            assert_eq!(db.catalogue(1).unwrap().len(), 50);
        }
    }

    #[test]
    fn seeded_the_same_every_time() {
        let a = Db::in_memory().unwrap();
        let b = Db::in_memory().unwrap();
        assert_eq!(a.product(7).unwrap(), b.product(7).unwrap());
        assert_eq!(a.catalogue(1).unwrap().len(), 50);
        assert!(!a.search("runner").unwrap().is_empty());
    }

    #[test]
    fn a_checkout_empties_the_cart_and_the_email_is_sent_once() {
        let db = Db::in_memory().unwrap();
        assert!(db.add_to_cart("ann", 3, 2).unwrap());
        assert!(db.add_to_cart("ann", 9, 1).unwrap());
        assert!(!db.add_to_cart("ann", 999_999, 1).unwrap());
        let order = db.checkout("ann").unwrap().unwrap();
        assert_eq!(order.items, vec![(3, 2), (9, 1)]);
        assert_eq!(db.checkout("ann").unwrap(), None, "the cart is empty");
        assert_eq!(db.order(order.id, &order.user).unwrap().unwrap(), order);
        assert_eq!(db.order(order.id, "someone@else.example").unwrap(), None);
        assert!(db.send_confirmation(order.id, "ann@example.com").unwrap());
        assert!(!db.send_confirmation(order.id, "ann@example.com").unwrap());
        assert_eq!(db.counts().unwrap(), (1, 1));
        assert!(db.unconfirmed().unwrap().is_empty());
        assert!(db.add_to_cart("bob", 4, 1).unwrap());
        let second = db.checkout("bob").unwrap().unwrap();
        assert_eq!(
            db.unconfirmed().unwrap(),
            vec![(second.id, "bob".to_owned())]
        );
    }
}
