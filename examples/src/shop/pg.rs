//! The store's data in PostgreSQL (feature `postgres`): what replicas can
//! share, and where an order and its confirmation e-mail's job commit in
//! one transaction.

use std::sync::Arc;

use gratify::offload::durable::DurableQueue;
use sqlx::{PgPool, Row};

use super::db::{Account, DbError, NotPlaced, Order, Product, seed_products};

/// The store on PostgreSQL. Its methods are blocking (they wait on the
/// runtime they were opened on): call them off the async threads, as the
/// handlers do for SQLite.
#[derive(Clone)]
pub(crate) struct PgStore {
    pool: PgPool,
    rt: tokio::runtime::Handle,
    /// Every product's id, category and price: the catalogue is fixed once
    /// seeded, and the recommender reads it on its CPU thread.
    features: Arc<Vec<(u32, String, i64)>>,
    store_id: String,
    /// Where confirmation e-mails are queued, in the checkout's transaction.
    queue: Option<DurableQueue>,
}

const SCHEMA: [&str; 10] = [
    "CREATE TABLE IF NOT EXISTS products (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
        price_cents BIGINT NOT NULL, description TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS carts (
        customer TEXT NOT NULL, product_id INTEGER NOT NULL, qty INTEGER NOT NULL,
        PRIMARY KEY (customer, product_id))",
    "CREATE TABLE IF NOT EXISTS orders (
        id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL,
        total_cents BIGINT NOT NULL, status TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS order_items (
        order_id BIGINT NOT NULL, product_id INTEGER NOT NULL, qty INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS outbox (
        order_id BIGINT PRIMARY KEY, email TEXT NOT NULL, attempts INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS store (id TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS accounts (
        id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL UNIQUE, password TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sessions (
        token TEXT PRIMARY KEY, account BIGINT NOT NULL, expires BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sessions_account ON sessions (account)",
    "CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires)",
];

/// A cart or order line's product and quantity (columns 0 and 1).
fn line_of(r: &sqlx::postgres::PgRow) -> Result<(u32, u32), sqlx::Error> {
    Ok((
        u32::try_from(r.try_get::<i32, _>(0)?).unwrap_or(0),
        u32::try_from(r.try_get::<i32, _>(1)?).unwrap_or(0),
    ))
}

impl PgStore {
    /// Creates (one replica at a time) and seeds the store on `pool`.
    pub(crate) async fn open(pool: PgPool, queue: Option<DurableQueue>) -> Result<Self, DbError> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7436119)")
            .execute(&mut *tx)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        let has_id: i64 = sqlx::query_scalar("SELECT count(*) FROM store")
            .fetch_one(&mut *tx)
            .await?;
        if has_id == 0 {
            sqlx::query("INSERT INTO store (id) VALUES ($1)")
                .bind(super::db::fresh_store_id())
                .execute(&mut *tx)
                .await?;
        }
        let seeded: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
            .fetch_one(&mut *tx)
            .await?;
        if seeded == 0 {
            let rows = seed_products();
            let ids: Vec<i32> = rows.iter().map(|p| p.id as i32).collect();
            let names: Vec<&str> = rows.iter().map(|p| p.name.as_str()).collect();
            let categories: Vec<&str> = rows.iter().map(|p| p.category.as_str()).collect();
            let prices: Vec<i64> = rows.iter().map(|p| p.price_cents).collect();
            let descriptions: Vec<&str> = rows.iter().map(|p| p.description.as_str()).collect();
            sqlx::query(
                "INSERT INTO products (id, name, category, price_cents, description)
                 SELECT * FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::int8[], $5::text[])",
            )
            .bind(&ids)
            .bind(&names)
            .bind(&categories)
            .bind(&prices)
            .bind(&descriptions)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let store_id: String = sqlx::query_scalar("SELECT id FROM store LIMIT 1")
            .fetch_one(&pool)
            .await?;
        let features = sqlx::query("SELECT id, category, price_cents FROM products ORDER BY id")
            .fetch_all(&pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    u32::try_from(r.try_get::<i32, _>(0)?).unwrap_or(0),
                    r.try_get(1)?,
                    r.try_get(2)?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Self {
            pool,
            rt: tokio::runtime::Handle::current(),
            features: Arc::new(features),
            store_id,
            queue,
        })
    }

    fn block<T>(&self, f: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        self.rt.block_on(f)
    }

    pub(crate) fn store_id(&self) -> String {
        self.store_id.clone()
    }

    /// Whether a checkout queues its confirmation itself.
    pub(crate) fn queues_confirmations(&self) -> bool {
        self.queue.is_some()
    }

    fn product_of(r: &sqlx::postgres::PgRow) -> Result<Product, sqlx::Error> {
        Ok(Product {
            id: u32::try_from(r.try_get::<i32, _>(0)?).unwrap_or(0),
            name: r.try_get(1)?,
            category: r.try_get(2)?,
            price_cents: r.try_get(3)?,
            description: r.try_get(4)?,
        })
    }

    pub(crate) fn catalogue(&self, page: u32) -> Result<Vec<Product>, DbError> {
        self.block(async {
            let offset = i64::from(page.max(1) - 1) * 50;
            let rows = sqlx::query(
                "SELECT id, name, category, price_cents, description FROM products ORDER BY id LIMIT 50 OFFSET $1",
            )
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .iter()
                .map(Self::product_of)
                .collect::<Result<_, _>>()?)
        })
    }

    pub(crate) fn product(&self, id: u32) -> Result<Option<Product>, DbError> {
        self.block(async {
            let row = sqlx::query(
                "SELECT id, name, category, price_cents, description FROM products WHERE id = $1",
            )
            .bind(i32::try_from(id).unwrap_or(-1))
            .fetch_optional(&self.pool)
            .await?;
            Ok(row.as_ref().map(Self::product_of).transpose()?)
        })
    }

    pub(crate) fn search(&self, text: &str) -> Result<Vec<Product>, DbError> {
        let pattern = format!("%{}%", text.replace(['%', '_', '\\', '\0'], ""));
        self.block(async {
            let rows = sqlx::query(
                "SELECT id, name, category, price_cents, description FROM products WHERE name LIKE $1 ORDER BY id LIMIT 20",
            )
            .bind(&pattern)
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .iter()
                .map(Self::product_of)
                .collect::<Result<_, _>>()?)
        })
    }

    pub(crate) fn features(&self) -> Vec<(u32, String, i64)> {
        self.features.as_ref().clone()
    }

    pub(crate) fn add_to_cart(&self, user: &str, product: u32, qty: u32) -> Result<bool, DbError> {
        self.block(async {
            let added = sqlx::query(
                "INSERT INTO carts (customer, product_id, qty)
                 SELECT $1, id, $3 FROM products WHERE id = $2
                 ON CONFLICT (customer, product_id) DO UPDATE SET qty = carts.qty + EXCLUDED.qty",
            )
            .bind(user)
            .bind(i32::try_from(product).unwrap_or(-1))
            .bind(i32::try_from(qty).unwrap_or(i32::MAX))
            .execute(&self.pool)
            .await?;
            Ok(added.rows_affected() == 1)
        })
    }

    /// Turns `user`'s cart into an order and, with a queue, queues its
    /// confirmation e-mail — all in one transaction: both or neither.
    pub(crate) fn checkout(
        &self,
        user: &str,
        expected: Option<&[(u32, u32)]>,
    ) -> Result<Result<Order, NotPlaced>, DbError> {
        self.block(async {
            let mut tx = self.pool.begin().await?;
            let mut items: Vec<(u32, u32, i64)> = sqlx::query(
                "DELETE FROM carts c USING products p
                 WHERE c.customer = $1 AND p.id = c.product_id
                 RETURNING c.product_id, c.qty, p.price_cents",
            )
            .bind(user)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                let (product, qty) = line_of(r)?;
                Ok((product, qty, r.try_get(2)?))
            })
            .collect::<Result<_, sqlx::Error>>()?;
            if items.is_empty() {
                return Ok(Err(NotPlaced::Empty));
            }
            items.sort_unstable();
            // Dropping the transaction rolls the cart's deletion back.
            if expected.is_some_and(|e| !super::db::same_lines(&items, e)) {
                return Ok(Err(NotPlaced::Changed));
            }
            let total: i64 = items.iter().map(|(_, q, p)| i64::from(*q) * p).sum();
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO orders (customer, total_cents, status) VALUES ($1, $2, 'placed') RETURNING id",
            )
            .bind(user)
            .bind(total)
            .fetch_one(&mut *tx)
            .await?;
            for (product, qty, _) in &items {
                sqlx::query("INSERT INTO order_items (order_id, product_id, qty) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(i32::try_from(*product).unwrap_or(-1))
                    .bind(i32::try_from(*qty).unwrap_or(i32::MAX))
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(queue) = &self.queue {
                let job = super::SendConfirmation {
                    order: id,
                    // The order's user is its account's address.
                    email: user.to_owned(),
                };
                let key = format!("confirm-{}-{id}", self.store_id);
                queue.enqueue_in(&mut tx, &job, &key).await?;
            }
            tx.commit().await?;
            Ok(Ok(Order {
                id,
                user: user.to_owned(),
                total_cents: total,
                status: "placed".into(),
                items: items.iter().map(|(p, q, _)| (*p, *q)).collect(),
            }))
        })
    }

    pub(crate) fn cart(&self, user: &str) -> Result<Vec<(u32, u32)>, DbError> {
        self.block(async {
            // As a checkout reads it: lines of products that exist.
            sqlx::query(
                "SELECT c.product_id, c.qty FROM carts c JOIN products p ON p.id = c.product_id
                 WHERE c.customer = $1 ORDER BY c.product_id",
            )
            .bind(user)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(line_of)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
        })
    }

    pub(crate) fn order(&self, id: i64, owner: &str) -> Result<Option<Order>, DbError> {
        self.block(async {
            let Some(head) = sqlx::query(
                "SELECT customer, total_cents, status FROM orders WHERE id = $1 AND customer = $2",
            )
            .bind(id)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?
            else {
                return Ok(None);
            };
            let items = sqlx::query(
                "SELECT product_id, qty FROM order_items WHERE order_id = $1 ORDER BY product_id",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(line_of)
            .collect::<Result<_, sqlx::Error>>()?;
            Ok(Some(Order {
                id,
                user: head.try_get(0)?,
                total_cents: head.try_get(1)?,
                status: head.try_get(2)?,
                items,
            }))
        })
    }

    pub(crate) fn send_confirmation(&self, order: i64, email: &str) -> Result<bool, DbError> {
        self.block(async {
            let attempts: i32 = sqlx::query_scalar(
                "INSERT INTO outbox (order_id, email, attempts) VALUES ($1, $2, 1)
                 ON CONFLICT (order_id) DO UPDATE SET attempts = outbox.attempts + 1
                 RETURNING attempts",
            )
            .bind(order)
            .bind(email)
            .fetch_one(&self.pool)
            .await?;
            Ok(attempts == 1)
        })
    }

    pub(crate) fn unconfirmed(&self) -> Result<Vec<(i64, String)>, DbError> {
        self.block(async {
            let rows = sqlx::query(
                "SELECT o.id, o.customer FROM orders o LEFT JOIN outbox m ON m.order_id = o.id
                 WHERE m.order_id IS NULL ORDER BY o.id",
            )
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, sqlx::Error>>()?)
        })
    }

    pub(crate) fn create_account(
        &self,
        email: &str,
        password: &str,
    ) -> Result<Option<Account>, DbError> {
        self.block(async {
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO accounts (email, password) VALUES ($1, $2)
                 ON CONFLICT (email) DO NOTHING RETURNING id",
            )
            .bind(email)
            .bind(password)
            .fetch_optional(&self.pool)
            .await?;
            Ok(id.map(|id| Account {
                id,
                email: email.to_owned(),
            }))
        })
    }

    pub(crate) fn credentials(&self, email: &str) -> Result<Option<(Account, String)>, DbError> {
        self.block(async {
            let row = sqlx::query("SELECT id, email, password FROM accounts WHERE email = $1")
                .bind(email)
                .fetch_optional(&self.pool)
                .await?;
            row.map(|r| {
                Ok((
                    Account {
                        id: r.try_get(0)?,
                        email: r.try_get(1)?,
                    },
                    r.try_get(2)?,
                ))
            })
            .transpose()
        })
    }

    pub(crate) fn open_session(
        &self,
        token: &str,
        account: i64,
        now: i64,
        expires: i64,
    ) -> Result<(), DbError> {
        self.block(async {
            let mut tx = self.pool.begin().await?;
            // A hundred at a time (see the SQLite store).
            sqlx::query(
                "DELETE FROM sessions WHERE token IN (
                     SELECT token FROM sessions WHERE expires <= $1 LIMIT 100)",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "DELETE FROM sessions WHERE account = $1 AND token NOT IN (
                     SELECT token FROM sessions WHERE account = $1 ORDER BY expires DESC LIMIT $2)",
            )
            .bind(account)
            .bind(super::db::MAX_SESSIONS - 1)
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO sessions (token, account, expires) VALUES ($1, $2, $3)")
                .bind(token)
                .bind(account)
                .bind(expires)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub(crate) fn session(&self, token: &str, now: i64) -> Result<Option<Account>, DbError> {
        self.block(async {
            let row = sqlx::query(
                "SELECT a.id, a.email FROM sessions s JOIN accounts a ON a.id = s.account
                 WHERE s.token = $1 AND s.expires > $2",
            )
            .bind(token)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| {
                Ok(Account {
                    id: r.try_get(0)?,
                    email: r.try_get(1)?,
                })
            })
            .transpose()
        })
    }

    pub(crate) fn close_session(&self, token: &str) -> Result<bool, DbError> {
        self.block(async {
            let done = sqlx::query("DELETE FROM sessions WHERE token = $1")
                .bind(token)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    pub(crate) fn counts(&self) -> Result<(i64, i64), DbError> {
        self.block(async {
            let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
                .fetch_one(&self.pool)
                .await?;
            let mails: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&self.pool)
                .await?;
            Ok((orders, mails))
        })
    }
}
