//! The PostgreSQL backend: a table of jobs claimed with `FOR UPDATE SKIP
//! LOCKED`, leases as columns fenced by a delivery counter, a table of
//! dead letters, a table of effect records, `LISTEN/NOTIFY` wake-ups.
//!
//! Every time is the database's (`now()`): workers' clocks never decide a
//! lease.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Row};

use super::{Claimed, Delivery, DurableConfig, DurableError, Finish, Lease};

/// The tables of one queue, quoted, and its notification channel.
#[derive(Debug)]
struct Names {
    jobs: String,
    dead: String,
    effects: String,
    /// The schema, quoted.
    schema: String,
    /// The table's name unquoted: the notification channel too.
    channel: String,
    /// The advisory lock that serialises creating the tables.
    lock: i64,
}

impl Names {
    /// Names from the queue's name: characters other than ASCII letters,
    /// digits and `_` become `_`, letters lower-case (`shop:mail` is table
    /// `shop_mail`, with `shop_mail_dead` and `shop_mail_effects`), in
    /// `schema`.
    fn of(stream: &str, schema: &str) -> Result<Self, DurableError> {
        let mut base: String = stream
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        if base.starts_with(|c: char| c.is_ascii_digit()) {
            base.insert(0, '_');
        }
        // PostgreSQL keeps 63 bytes of a name; `_effects` is added.
        if base.is_empty() || base.len() > 48 {
            return Err(DurableError::Config(format!(
                "queue name {stream:?} must give a table name of 1 to 48 characters"
            )));
        }
        // FNV-1a of the name: a stable key for the advisory lock.
        // A queue named like another's companion table would share it.
        if base.ends_with("_dead") || base.ends_with("_effects") {
            return Err(DurableError::Config(format!(
                "queue name {stream:?} must not end with _dead or _effects"
            )));
        }
        let lock = base.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let schema = format!("\"{}\"", schema.replace('"', "\"\""));
        Ok(Self {
            jobs: format!("{schema}.\"{base}\""),
            dead: format!("{schema}.\"{base}_dead\""),
            effects: format!("{schema}.\"{base}_effects\""),
            schema,
            lock: i64::from_ne_bytes(lock.to_ne_bytes()),
            channel: base,
        })
    }
}

/// Runs `schema` under the advisory lock `lock`, in one transaction that
/// waits at most 10 s for a lock (`CREATE INDEX IF NOT EXISTS` locks the
/// table before it looks: it is run only when something is missing).
/// Boxed: the future of generic sqlx executors inside an `async fn` is
/// otherwise not provably `Send` to callers that spawn it.
fn create_tables<'a>(
    pool: &'a PgPool,
    lock: i64,
    schema: &'a str,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'a>> {
    Box::pin(async move {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '10s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(lock)
            .execute(&mut *tx)
            .await?;
        for statement in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        tx.commit().await
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The queue's side: a pool of its own, made with the application pool's
/// connect options — never waiting behind the application for a
/// connection, and never holding one of the application's. Its tables are
/// named in the schema the application's connections resolve names in,
/// so `enqueue_in` on the application's transaction and the workers agree.
#[derive(Clone)]
pub(super) struct PgQueue {
    pool: PgPool,
    options: PgConnectOptions,
    names: std::sync::Arc<Names>,
}

impl PgQueue {
    /// Creates the tables if they do not exist (one replica at a time).
    pub(super) async fn connect(
        app: &PgPool,
        config: &DurableConfig,
    ) -> Result<Self, DurableError> {
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(app)
            .await?;
        let names = Names::of(&config.stream, schema.as_deref().unwrap_or("public"))?;
        let options = app.connect_options().as_ref().clone();
        // A lease must be renewable well within its visibility timeout.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .acquire_timeout(
                (config.visibility / 3).clamp(Duration::from_millis(500), Duration::from_secs(10)),
            )
            .connect_lazy_with(options.clone());
        let Names {
            jobs,
            dead,
            effects,
            channel,
            ..
        } = &names;
        let schema = format!(
            r#"
CREATE TABLE IF NOT EXISTS {jobs} (
  id BIGSERIAL PRIMARY KEY,
  kind TEXT NOT NULL,
  payload TEXT NOT NULL,
  key TEXT NOT NULL,
  attempt INTEGER NOT NULL DEFAULT 1,
  error TEXT NOT NULL DEFAULT '',
  crashed INTEGER NOT NULL DEFAULT 0,
  fence INTEGER NOT NULL DEFAULT 0,
  lease_owner TEXT,
  lease_until TIMESTAMPTZ,
  enqueued_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
  run_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS "{channel}_ready_idx" ON {jobs} (run_at, id) WHERE lease_owner IS NULL;
CREATE INDEX IF NOT EXISTS "{channel}_leased_idx" ON {jobs} (lease_until) WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS {dead} (
  id BIGSERIAL PRIMARY KEY,
  job_id BIGINT NOT NULL,
  kind TEXT NOT NULL,
  payload TEXT NOT NULL,
  key TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  error TEXT NOT NULL,
  enqueued_at TIMESTAMPTZ NOT NULL,
  died_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {effects} (
  key TEXT PRIMARY KEY,
  token TEXT NOT NULL,
  done BOOLEAN NOT NULL,
  result TEXT NOT NULL,
  until TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS "{channel}_effects_until_idx" ON {effects} (until)
"#
        );
        // Everything there already (every start but the first): no DDL,
        // whose locks would queue behind open transactions on the table.
        let relations = [
            jobs.clone(),
            dead.clone(),
            effects.clone(),
            format!("{}.\"{channel}_ready_idx\"", names.schema),
            format!("{}.\"{channel}_leased_idx\"", names.schema),
            format!("{}.\"{channel}_effects_until_idx\"", names.schema),
        ];
        let present: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM unnest($1::text[]) AS r(name) WHERE to_regclass(r.name) IS NOT NULL",
        )
        .bind(&relations[..])
        .fetch_one(&pool)
        .await?;
        if usize::try_from(present).unwrap_or(0) < relations.len() {
            create_tables(&pool, names.lock, &schema).await?;
        }
        // Claims rely on READ COMMITTED's re-check of a row changed under
        // them; under a stricter default they fail with serialization errors
        // (retried, never wrong) under contention.
        let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
            .fetch_one(&pool)
            .await?;
        if isolation != "read committed" {
            tracing::warn!(%isolation, "durable queue: the database's default isolation is not READ COMMITTED; claims will conflict and be retried under contention");
        }
        Ok(Self {
            pool,
            options,
            names: std::sync::Arc::new(names),
        })
    }

    /// The jobs table's name, unquoted.
    pub(super) fn table(&self) -> &str {
        &self.names.channel
    }

    /// Inserts a job and notifies the workers, in one statement on `conn`:
    /// inside the caller's transaction, both happen at its commit or not at
    /// all.
    pub(super) async fn enqueue_on(
        &self,
        conn: &mut PgConnection,
        kind: &str,
        payload: &str,
        key: &str,
    ) -> Result<i64, DurableError> {
        let jobs = &self.names.jobs;
        let row = sqlx::query(&format!(
            "WITH j AS (INSERT INTO {jobs} (kind, payload, key) VALUES ($1, $2, $3) RETURNING id) \
             SELECT id, pg_notify($4, '') FROM j"
        ))
        .bind(kind)
        .bind(payload)
        .bind(key)
        .bind(&self.names.channel)
        .fetch_one(conn)
        .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    pub(super) async fn enqueue(
        &self,
        kind: &str,
        payload: &str,
        key: &str,
    ) -> Result<(), DurableError> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_on(&mut conn, kind, payload, key).await?;
        Ok(())
    }

    /// Claims `key` for `ttl` if it is not held: whether it was free.
    async fn take(
        &self,
        key: &str,
        token: &str,
        done: bool,
        ttl: Duration,
    ) -> Result<bool, DurableError> {
        let effects = &self.names.effects;
        let taken = sqlx::query(&format!(
            "INSERT INTO {effects} AS e (key, token, done, result, until) \
             VALUES ($1, $2, $3, '', now() + make_interval(secs => $4)) \
             ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, done = EXCLUDED.done, \
               result = '', until = EXCLUDED.until \
             WHERE e.until <= now()"
        ))
        .bind(key)
        .bind(token)
        .bind(done)
        .bind(secs(ttl).max(0.001))
        .execute(&self.pool)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    pub(super) async fn first_time(&self, key: &str, ttl: Duration) -> Result<bool, DurableError> {
        self.take(&format!("once:{key}"), "", true, ttl).await
    }

    pub(super) async fn claim_effect(
        &self,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Claimed, DurableError> {
        let key = format!("effect:{key}");
        if self.take(&key, token, false, lease).await? {
            return Ok(Claimed::Yes);
        }
        let effects = &self.names.effects;
        let row = sqlx::query(&format!(
            "SELECT done, result, \
               GREATEST(1, CEIL(EXTRACT(EPOCH FROM (until - now())) * 1000))::BIGINT \
             FROM {effects} WHERE key = $1"
        ))
        .bind(&key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) if row.try_get::<bool, _>(0)? => Claimed::Done(row.try_get(1)?),
            Some(row) => Claimed::InProgress(Duration::from_millis(
                u64::try_from(row.try_get::<i64, _>(2)?).unwrap_or(1),
            )),
            // Gone between the two statements: ask again shortly.
            None => Claimed::InProgress(Duration::from_millis(1)),
        })
    }

    pub(super) async fn effect_done(
        &self,
        key: &str,
        token: &str,
        result: &str,
        keep: Duration,
    ) -> Result<bool, DurableError> {
        let effects = &self.names.effects;
        let recorded = sqlx::query(&format!(
            "INSERT INTO {effects} AS e (key, token, done, result, until) \
             VALUES ($1, $2, TRUE, $3, now() + make_interval(secs => $4)) \
             ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, done = TRUE, \
               result = EXCLUDED.result, until = EXCLUDED.until \
             WHERE (e.token = $2 AND NOT e.done) OR e.until <= now()"
        ))
        .bind(format!("effect:{key}"))
        .bind(token)
        .bind(result)
        .bind(secs(keep).max(0.001))
        .execute(&self.pool)
        .await?;
        Ok(recorded.rows_affected() == 1)
    }

    pub(super) async fn effect_release(&self, key: &str, token: &str) -> Result<(), DurableError> {
        let effects = &self.names.effects;
        sqlx::query(&format!(
            "DELETE FROM {effects} WHERE key = $1 AND token = $2 AND NOT done"
        ))
        .bind(format!("effect:{key}"))
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn dead_letters(&self) -> Result<usize, DurableError> {
        let dead = &self.names.dead;
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {dead}"))
            .fetch_one(&self.pool)
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    pub(super) async fn pending(&self) -> Result<usize, DurableError> {
        let jobs = &self.names.jobs;
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {jobs} WHERE lease_owner IS NOT NULL"
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Extends `consumer`'s lease on a delivery by the visibility timeout:
    /// whether it still held it.
    pub(super) async fn renew(
        &self,
        config: &DurableConfig,
        consumer: &str,
        delivery: &Delivery,
    ) -> Result<bool, DurableError> {
        // Refutable when both backends are built.
        #[allow(irrefutable_let_patterns)]
        let Lease::Postgres { id, fence } = delivery.lease else {
            return Ok(false);
        };
        let jobs = &self.names.jobs;
        let renewed = sqlx::query(&format!(
            "UPDATE {jobs} SET lease_until = now() + make_interval(secs => $4) \
             WHERE id = $1 AND fence = $2 AND lease_owner = $3"
        ))
        .bind(id)
        .bind(fence)
        .bind(consumer)
        .bind(secs(config.visibility))
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Deletes effect records expired for a minute (an expired record
    /// counts as absent already; this only reclaims the space).
    async fn sweep(&self) -> Result<(), DurableError> {
        let effects = &self.names.effects;
        sqlx::query(&format!(
            "DELETE FROM {effects} WHERE until < now() - interval '1 minute'"
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// A worker's side: a connection of its own that listens for new jobs,
/// read all the time by a task of its own (a listener left unread while a
/// job runs would hold up PostgreSQL's notification queue for everyone).
pub(super) struct PgWorker {
    queue: PgQueue,
    /// Woken by each notification (a permit is kept when nobody waits).
    wake: std::sync::Arc<tokio::sync::Notify>,
    listening: tokio::task::JoinHandle<()>,
    /// Whether jobs leased under its name before it started may remain.
    own_pending: bool,
    /// When it last swept expired effect records.
    swept: tokio::time::Instant,
    /// When to look for jobs whose lease expired next.
    reclaim: super::Lookout,
}

impl Drop for PgWorker {
    fn drop(&mut self) {
        self.listening.abort();
    }
}

impl PgWorker {
    pub(super) async fn connect(
        queue: &PgQueue,
        config: &DurableConfig,
    ) -> Result<Self, DurableError> {
        // One connection, outside every pool the application uses.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(queue.options.clone());
        let mut listener = PgListener::connect_with(&own).await?;
        listener.listen(&queue.names.channel).await?;
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let woken = std::sync::Arc::clone(&wake);
        let listening = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => woken.notify_one(),
                    Err(e) => {
                        // Notifications sent meanwhile are lost: look.
                        woken.notify_one();
                        tracing::debug!(error = %e, "durable worker: listening failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(Self {
            queue: queue.clone(),
            wake,
            listening,
            own_pending: true,
            swept: tokio::time::Instant::now(),
            reclaim: super::Lookout::for_leases(config),
        })
    }

    pub(super) fn recover(&mut self) {
        self.own_pending = true;
    }

    /// Claims one job: one leased under its own name before it started
    /// (a restart under a stable name), else one whose lease expired, else
    /// (unless `held_back`) the next one due — waiting up to `block` for a
    /// notification when there is none.
    pub(super) async fn fetch(
        &mut self,
        config: &DurableConfig,
        consumer: &str,
        stats: &super::Counters,
        held_back: impl Fn() -> bool,
    ) -> Result<Option<Delivery>, DurableError> {
        if self.swept.elapsed() > Duration::from_secs(60) {
            self.swept = tokio::time::Instant::now();
            self.queue.sweep().await?;
        }
        if self.own_pending {
            let own = self.claim(config, consumer, "lease_owner = $1").await?;
            if own.is_some() {
                return Ok(own);
            }
            self.own_pending = false;
        }
        // A dead worker's job is picked up whatever the load (it was taken
        // on already).
        let reclaimed = if self.reclaim.due() {
            let reclaimed = self
                .claim(
                    config,
                    consumer,
                    "lease_owner IS NOT NULL AND lease_until < now()",
                )
                .await?;
            self.reclaim.looked(reclaimed.is_some());
            reclaimed
        } else {
            None
        };
        if let Some(reclaimed) = reclaimed {
            stats
                .reclaimed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            super::super::count(gratify_core::telemetry::DURABLE_RECLAIMED_TOTAL.name);
            return Ok(Some(reclaimed));
        }
        if held_back() {
            // Under load: no new work; look again shortly.
            tokio::time::sleep(config.block.min(Duration::from_millis(200))).await;
            return Ok(None);
        }
        if let Some(new) = self
            .claim(config, consumer, "lease_owner IS NULL AND run_at <= now()")
            .await?
        {
            return Ok(Some(new));
        }
        // Nothing due: wait for a new job's notification (a retry falling
        // due, or a notification missed, is found by the next look, at most
        // `block` later). A look that finds nothing is cheap.
        let _ = tokio::time::timeout(config.block, self.wake.notified()).await;
        Ok(None)
    }

    /// Leases the first job that `condition` selects (`$1` is the
    /// consumer), skipping rows other workers are claiming.
    async fn claim(
        &self,
        config: &DurableConfig,
        consumer: &str,
        condition: &str,
    ) -> Result<Option<Delivery>, DurableError> {
        let jobs = &self.queue.names.jobs;
        // A job leased before (its lease expired, or its worker restarted)
        // is a delivery that ended without an answer.
        let row = sqlx::query(&format!(
            "WITH next AS ( \
               SELECT id FROM {jobs} WHERE {condition} \
               ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             UPDATE {jobs} j SET \
               crashed = j.crashed + CASE WHEN j.lease_owner IS NULL THEN 0 ELSE 1 END, \
               fence = j.fence + 1, \
               lease_owner = $1, \
               lease_until = now() + make_interval(secs => $2) \
             FROM next WHERE j.id = next.id \
             RETURNING j.id, j.kind, j.payload, j.key, j.attempt, j.crashed, j.fence, \
               GREATEST(0, EXTRACT(EPOCH FROM (now() - j.enqueued_at)) * 1000)::BIGINT"
        ))
        .bind(consumer)
        .bind(secs(config.visibility))
        .fetch_optional(&self.queue.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let id: i64 = row.try_get(0)?;
        let crashed: i32 = row.try_get(5)?;
        let age_ms: i64 = row.try_get(7)?;
        Ok(Some(Delivery {
            id: id.to_string(),
            kind: row.try_get(1)?,
            payload: row.try_get(2)?,
            key: row.try_get(3)?,
            attempt: u32::try_from(row.try_get::<i32, _>(4)?).unwrap_or(1).max(1),
            deliveries: usize::try_from(crashed).unwrap_or(0) + 1,
            age: Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
            gone: false,
            lease: Lease::Postgres {
                id,
                fence: row.try_get(6)?,
            },
        }))
    }

    /// Finishes a delivery as asked, if `consumer` still holds it: 1, 0
    /// when another worker or delivery holds it, 2 when the job is gone.
    /// Each action is one statement: safe to repeat.
    pub(super) async fn finish(
        &mut self,
        consumer: &str,
        delivery: &Delivery,
        finish: &Finish<'_>,
    ) -> Result<i64, DurableError> {
        // Refutable when both backends are built.
        #[allow(irrefutable_let_patterns)]
        let Lease::Postgres { id, fence } = delivery.lease else {
            return Ok(0);
        };
        let Names { jobs, dead, .. } = &*self.queue.names;
        // TEXT refuses NUL: an error message carrying one is kept without.
        let clean = |e: &str| e.replace('\0', "");
        let held = "id = $1 AND fence = $2 AND lease_owner = $3";
        let done = match finish {
            Finish::Ack => {
                sqlx::query(&format!("DELETE FROM {jobs} WHERE {held}"))
                    .bind(id)
                    .bind(fence)
                    .bind(consumer)
                    .execute(&self.queue.pool)
                    .await?
            }
            Finish::Retry {
                attempt,
                error,
                delay,
            } => {
                sqlx::query(&format!(
                    "UPDATE {jobs} SET attempt = $4, error = $5, \
                       run_at = now() + make_interval(secs => $6), \
                       lease_owner = NULL, lease_until = NULL \
                     WHERE {held}"
                ))
                .bind(id)
                .bind(fence)
                .bind(consumer)
                .bind(i32::try_from(*attempt).unwrap_or(i32::MAX))
                .bind(clean(error))
                .bind(secs(*delay))
                .execute(&self.queue.pool)
                .await?
            }
            Finish::Dead { attempt, error } => {
                sqlx::query(&format!(
                    "WITH d AS (DELETE FROM {jobs} WHERE {held} \
                       RETURNING id, kind, payload, key, enqueued_at) \
                     INSERT INTO {dead} (job_id, kind, payload, key, attempt, error, enqueued_at) \
                     SELECT id, kind, payload, key, $4, $5, enqueued_at FROM d"
                ))
                .bind(id)
                .bind(fence)
                .bind(consumer)
                .bind(i32::try_from(*attempt).unwrap_or(i32::MAX))
                .bind(clean(error))
                .execute(&self.queue.pool)
                .await?
            }
        };
        if done.rows_affected() == 1 {
            return Ok(1);
        }
        let exists: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM {jobs} WHERE id = $1 AND lease_owner IS NOT NULL"
        ))
        .bind(id)
        .fetch_optional(&self.queue.pool)
        .await?;
        Ok(if exists.is_some() { 0 } else { 2 })
    }
}
