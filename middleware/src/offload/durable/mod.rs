//! Durable deferred work: jobs that survive a restart, on Redis Streams
//! (feature `redis`) or in a PostgreSQL table (feature `postgres`).
//!
//! Jobs are serialised with serde under a registered type name; workers in
//! any replica share the work. One interface, [`DurableQueue`] and
//! [`Worker`], over both backends:
//!
//! - **A lease per job.** A worker claims one job at a time, when it can
//!   start it, and holds a lease on it while its handler runs: every third
//!   of the visibility timeout it renews the lease, so a job longer than
//!   the visibility timeout is not taken by another worker while it runs. A
//!   worker that dies stops renewing; after the visibility timeout any
//!   worker reclaims the job (workers look for such jobs every tenth of
//!   it, at most a second apart).
//! - **Finishing needs the lease.** Acknowledging, scheduling a retry or
//!   dead-lettering happen in one atomic step that first checks that this
//!   worker still holds this delivery of the job: a worker that lost its
//!   lease (it stalled past the visibility timeout and another took the
//!   job) cannot ack, retry or dead-letter the other worker's run.
//! - **Waiting on a connection of its own.** Each worker waits for new jobs
//!   on a connection of its own (a blocking read on Redis, `LISTEN` on
//!   PostgreSQL); enqueueing never waits behind a worker.
//! - **Retries.** A failed attempt is retried after a backoff drawn
//!   uniformly between zero and a doubling ceiling (full jitter: failed jobs
//!   do not come back together), due by the backend's clock; after
//!   `max_attempts` failures the job is a dead letter, kept with its last
//!   error.
//! - **Poison jobs.** A job delivered more than `max_deliveries` times
//!   without an answer (a job that kills its worker) is a dead letter,
//!   whichever way it comes back: reclaimed from another worker or picked
//!   up again by its own worker after a restart under a stable name. Jobs
//!   of an unknown type or an undecodable payload go there too, after
//!   `unknown_grace`: nothing is dropped silently.
//!
//! Delivery is at least once: a handler may see a job again after a crash.
//! Each job carries an idempotency key ([`JobContext::key`]) that stays the
//! same across retries. Guard a side effect with
//! [`DurableQueue::claim_effect`]: a completion record written only after
//! the effect succeeded, and a short lease while it is in progress.
//!
//! | what happens | with `claim_effect` |
//! |---|---|
//! | the handler fails before or during the effect | the claim is released; the retry does the effect |
//! | the worker dies before or during the effect | the lease expires; the retry does the effect |
//! | the effect succeeded and `done` was recorded, then the worker dies before the acknowledgement | the redelivery finds the record and skips the effect |
//! | the effect succeeded, then the worker dies before `done` | **the retry does the effect again**: no queue can tell an effect that happened from one that did not once the process is gone. Make the effect idempotent where it happens — pass [`JobContext::key`] as the provider's idempotency key (a payment API's `Idempotency-Key`, an e-mail's `Message-ID`, a unique row in your database) |
//!
//! (Its predecessor, [`DurableQueue::first_time`], marks the key *before*
//! the effect: a failed effect is then never retried. It remains for
//! effects that must never run twice even at the cost of not running.)
//!
//! # Which backend
//!
//! - **PostgreSQL** ([`DurableQueue::postgres`]) when the application's data
//!   is in PostgreSQL: [`DurableQueue::enqueue_in`] queues a job inside the
//!   application's own transaction (the *outbox*), so an order and its
//!   confirmation e-mail commit together or not at all — no job for an
//!   order rolled back, no order without its job. Jobs live in a table
//!   (named after the queue: `shop:mail` is `shop_mail`, with
//!   `shop_mail_dead` and `shop_mail_effects`), created on first connect;
//!   workers claim them with `FOR UPDATE SKIP LOCKED` and wake on
//!   `LISTEN/NOTIFY`. Every lease is timed by the database's clock. The
//!   consumer group setting does not apply.
//! - **Redis** ([`DurableQueue::connect`]) when jobs are queued from
//!   outside one database's transactions, or at rates a table would feel.
//!   Durability is Redis's: run it with the append-only file on
//!   (`appendonly yes`) for queued jobs to survive a Redis restart. On Redis
//!   Cluster, give the stream a hash tag (`{shop}:jobs`) so that its
//!   companion keys (`:delayed`, `:dead`, `:effect:*`) share its slot.
//! - Neither, for work that may be lost with the process: the in-memory
//!   [`Defer`](super::Defer).
//!
//! Consumer names must be unique among live workers (two live workers under
//! one name would take each other's leased jobs); the default is a fresh
//! random name. Give a stable name (the pod's, say) to have a restarted
//! worker pick up its own leased jobs at once rather than after the
//! visibility timeout.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue, Effect};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendConfirmation { order: u64 }
//!
//! impl DurableJob for SendConfirmation {
//!     const NAME: &'static str = "send-confirmation";
//! }
//!
//! # #[cfg(feature = "redis")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379")?;
//! let queue = DurableQueue::connect(client, DurableConfig::new("orders:jobs")).await?;
//! queue.enqueue(&SendConfirmation { order: 42 }).await?;
//!
//! let mut worker = queue.worker();
//! let q = queue.clone();
//! worker.register(move |job: SendConfirmation, ctx| {
//!     let q = q.clone();
//!     async move {
//!         match q.claim_effect(&ctx.key, Duration::from_secs(60)).await? {
//!             Effect::Claimed(claim) => {
//!                 // The provider de-duplicates by the key too.
//!                 println!("mail for order {} (Message-ID {})", job.order, ctx.key);
//!                 claim.done("sent", Duration::from_secs(86_400)).await?;
//!             }
//!             Effect::Done(_) => {}
//!             // Tried again when the other attempt's claim ends.
//!             Effect::InProgress(later) => return Err(later.into()),
//!             _ => {}
//!         }
//!         Ok(())
//!     }
//! });
//! // Work until a shutdown signal; here, a minute.
//! let report = worker.run(tokio::time::sleep(Duration::from_secs(60))).await;
//! println!("{} jobs done", report.done);
//! # Ok(())
//! # }
//! ```
//!
//! The outbox, with PostgreSQL:
//!
//! ```no_run
//! # use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue};
//! # #[derive(serde::Serialize, serde::Deserialize)]
//! # struct SendConfirmation { order: i64 }
//! # impl DurableJob for SendConfirmation { const NAME: &'static str = "send-confirmation"; }
//! # #[cfg(feature = "postgres")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let pool = sqlx::PgPool::connect("postgres://127.0.0.1/shop").await?;
//! let queue = DurableQueue::postgres(pool.clone(), DurableConfig::new("shop:mail")).await?;
//!
//! let mut tx = pool.begin().await?;
//! let order: i64 = sqlx::query_scalar("INSERT INTO orders (total) VALUES (42) RETURNING id")
//!     .fetch_one(&mut *tx)
//!     .await?;
//! queue
//!     .enqueue_in(&mut tx, &SendConfirmation { order }, &format!("confirm-{order}"))
//!     .await?;
//! // The order and its job are both there, or (rolled back) neither.
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gratify_core::BoxError;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "postgres")]
mod on_postgres;
#[cfg(feature = "redis")]
mod on_redis;

/// A job type that can be queued durably: serialisable, under a stable
/// name that every replica registers.
pub trait DurableJob: Serialize + DeserializeOwned + Send + 'static {
    /// The registered name; it is stored with each entry.
    const NAME: &'static str;
    /// Its class in the cost model, for a worker that yields to the load
    /// ([`Worker::yield_to_load`]); `None`: the model's default class.
    const CLASS: Option<&'static str> = None;
}

/// Settings of a [`DurableQueue`] and its workers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DurableConfig {
    /// The queue's name. On Redis, the stream's key (the delayed set and
    /// dead-letter stream are `<stream>:delayed` and `<stream>:dead`); on
    /// PostgreSQL, the table's name (other characters than ASCII letters,
    /// digits and `_` become `_`).
    pub stream: String,
    /// The consumer group (Redis only).
    pub group: String,
    /// This worker's consumer name, unique among live workers.
    pub consumer: String,
    /// How long a job may stay leased by a worker that has stopped
    /// renewing its lease before another reclaims it: how fast a dead
    /// worker's job is picked up again. A running job's lease is
    /// renewed every third of it, so it need not exceed the slowest job.
    pub visibility: Duration,
    /// Failed attempts before an entry is a dead letter.
    pub max_attempts: u32,
    /// Deliveries without an acknowledgement before an entry is a dead
    /// letter.
    pub max_deliveries: u32,
    /// The ceiling of the first retry's delay; it doubles with each
    /// attempt, and each retry waits a uniform draw below it (full jitter).
    pub backoff: Duration,
    /// How long a worker waits for new jobs before it looks again (retries
    /// falling due on PostgreSQL are found within it).
    pub block: Duration,
    /// Delayed retries moved back onto the stream at once (Redis).
    pub batch: usize,
    /// The longest a handler may run: past it the job is aborted and the
    /// attempt counts as failed (a handler waiting for ever on a downstream
    /// would otherwise hold its lease, its worker and shutdown for ever).
    pub job_timeout: Duration,
    /// How long an entry of a type this worker has no handler for (or whose
    /// payload it cannot decode) is set aside for another worker — a
    /// replica of a newer version during a rolling deploy — before it is a
    /// dead letter. No attempt is counted meanwhile.
    pub unknown_grace: Duration,
}

impl DurableConfig {
    /// Defaults for `stream`: group `gratify`, a fresh consumer name,
    /// visibility 30 s (renewed every 10 s while a job runs), 5 attempts,
    /// 10 deliveries, backoff up to 1 s doubling, reads blocking 1 s.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            group: "gratify".to_owned(),
            consumer: fresh_name("worker"),
            visibility: Duration::from_secs(30),
            max_attempts: 5,
            max_deliveries: 10,
            backoff: Duration::from_secs(1),
            block: Duration::from_secs(1),
            batch: 16,
            job_timeout: Duration::from_secs(300),
            unknown_grace: Duration::from_secs(900),
        }
    }

    /// The settings with every bound the setters keep (the fields are
    /// public, so a value may bypass them).
    fn sanitised(mut self) -> Self {
        self.visibility = self.visibility.max(Duration::from_millis(1));
        self.block = self
            .block
            .clamp(Duration::from_millis(1), Duration::from_secs(3600));
        self.batch = self.batch.max(1);
        self.max_attempts = self.max_attempts.max(1);
        self.max_deliveries = self.max_deliveries.max(1);
        self.job_timeout = self.job_timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets the longest a handler may run.
    #[must_use]
    pub fn job_timeout(mut self, d: Duration) -> Self {
        self.job_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Sets how long entries of unknown types are set aside before they
    /// are dead letters.
    #[must_use]
    pub fn unknown_grace(mut self, d: Duration) -> Self {
        self.unknown_grace = d;
        self
    }

    /// Sets the consumer group.
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// Sets this worker's consumer name.
    #[must_use]
    pub fn consumer(mut self, consumer: impl Into<String>) -> Self {
        self.consumer = consumer.into();
        self
    }

    /// Sets the visibility timeout (at least 1 ms).
    #[must_use]
    pub fn visibility(mut self, d: Duration) -> Self {
        self.visibility = d.max(Duration::from_millis(1));
        self
    }

    /// Sets the attempts before a dead letter (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the deliveries before a dead letter (at least 1).
    #[must_use]
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Sets the first retry's delay.
    #[must_use]
    pub fn backoff(mut self, d: Duration) -> Self {
        self.backoff = d;
        self
    }

    /// Sets how long a read blocks (at least 1 ms).
    #[must_use]
    pub fn block(mut self, d: Duration) -> Self {
        self.block = d.max(Duration::from_millis(1));
        self
    }

    #[cfg(feature = "redis")]
    fn delayed_key(&self) -> String {
        format!("{}:delayed", self.stream)
    }

    #[cfg(feature = "redis")]
    fn dead_key(&self) -> String {
        format!("{}:dead", self.stream)
    }
}

/// A name unlikely to be repeated: a prefix, the process id and random bits.
fn fresh_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{:016x}",
        std::process::id(),
        super::random_u64()
    )
}

/// What went wrong talking to the backend or encoding a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// Redis refused or the connection failed.
    #[cfg(feature = "redis")]
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// PostgreSQL refused or the connection failed.
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The job could not be serialised.
    #[error("encoding a job: {0}")]
    Encode(#[from] serde_json::Error),
    /// The settings cannot be used with this backend.
    #[error("durable queue settings: {0}")]
    Config(String),
    /// Asked of a backend that cannot do it (enqueueing inside a database
    /// transaction on a Redis queue).
    #[error("not supported by the {0} backend")]
    Unsupported(&'static str),
}

impl DurableError {
    /// Whether the same step may succeed if tried again shortly: a lost
    /// connection, a timeout, a server starting or failing over, a
    /// serialization conflict — not a refusal that would repeat.
    fn is_transient(&self) -> bool {
        match self {
            #[cfg(feature = "redis")]
            Self::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.code(),
                        Some("LOADING" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN")
                    )
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::Protocol(_)
                | sqlx::Error::Tls(_) => true,
                // Connection exceptions (08…), shutdowns and start-ups
                // (57P01–57P03), serialization failures and deadlocks.
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01"
                }),
                _ => false,
            },
            _ => false,
        }
    }
}

/// What a handler is told about the job it runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobContext {
    /// The idempotency key, the same on every attempt and delivery.
    pub key: String,
    /// This attempt, from 1.
    pub attempt: u32,
    /// The job's id in the backend (a stream entry id, a row id).
    pub entry: String,
}

/// A handle to enqueue jobs and make workers. Cloning shares the
/// connection (never used for waiting: each worker waits on its own).
#[derive(Clone)]
pub struct DurableQueue {
    backend: Backend,
    config: Arc<DurableConfig>,
}

#[derive(Clone)]
enum Backend {
    #[cfg(feature = "redis")]
    Redis(on_redis::RedisQueue),
    #[cfg(feature = "postgres")]
    Postgres(on_postgres::PgQueue),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            #[cfg(feature = "redis")]
            Self::Redis(_) => "redis",
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => "postgres",
        }
    }
}

impl fmt::Debug for DurableQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableQueue")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What [`DurableQueue::claim_effect`] found.
#[derive(Debug)]
#[non_exhaustive]
// One per claim, handled at once: not worth an allocation to shrink.
#[allow(clippy::large_enum_variant)]
pub enum Effect {
    /// Nobody has done it and nobody is doing it: it is yours to do until
    /// the lease ends.
    Claimed(EffectClaim),
    /// It was done; the result recorded with it.
    Done(String),
    /// Another attempt holds a claim that has not expired; return the
    /// [`RetryLater`] it carries as the handler's error, and the job is
    /// tried again when the claim ends, without counting an attempt.
    InProgress(RetryLater),
}

/// A handler's error that asks for the job to be tried again after a
/// while without counting a failed attempt (an effect another attempt is
/// still doing, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("to be retried in {0:?}")]
pub struct RetryLater(pub Duration);

impl RetryLater {
    /// The `RetryLater` in `error` or anywhere in its chain of sources
    /// (wrapped by an application's own error type, say).
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(later) = e.downcast_ref::<Self>() {
                return Some(*later);
            }
            current = e.source();
        }
        None
    }
}

/// A claim on a side effect: record it [`done`](Self::done) after the
/// effect succeeded, or [`release`](Self::release) it when the effect
/// failed (so that a retry does it). Dropped without either, the claim
/// lasts until its lease ends.
#[derive(Debug)]
pub struct EffectClaim {
    queue: DurableQueue,
    key: String,
    token: String,
}

impl EffectClaim {
    /// Records the effect done with `result` (kept for `keep`): later
    /// attempts get [`Effect::Done`]. Also recorded, and `true`, if the
    /// claim had expired meanwhile and nobody has claimed or recorded it
    /// since; `false` if another attempt has (it may have done the effect
    /// too: the provider's idempotency key is what prevents a double).
    ///
    /// # Errors
    ///
    /// When the backend refuses (the effect is done but not recorded: a
    /// retry will do it again).
    pub async fn done(self, result: &str, keep: Duration) -> Result<bool, DurableError> {
        let config = &self.queue.config;
        match &self.queue.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => {
                q.effect_done(config, &self.key, &self.token, result, keep)
                    .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => {
                let _ = config;
                q.effect_done(&self.key, &self.token, result, keep).await
            }
        }
    }

    /// Gives the claim up: the effect was not done, and a retry may do it.
    ///
    /// # Errors
    ///
    /// When the backend refuses (the claim then lasts until its lease ends).
    pub async fn release(self) -> Result<(), DurableError> {
        let config = &self.queue.config;
        match &self.queue.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.effect_release(config, &self.key, &self.token).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => {
                let _ = config;
                q.effect_release(&self.key, &self.token).await
            }
        }
    }
}

/// When a worker next looks for work other than new jobs — due retries,
/// leases that expired. A look costs a round trip, so not before every job:
/// at most `every` after a look that found nothing, at once after one that
/// found some (there may be more).
#[derive(Debug)]
struct Lookout {
    every: Duration,
    next: Option<tokio::time::Instant>,
}

impl Lookout {
    fn new(every: Duration) -> Self {
        Self { every, next: None }
    }

    /// Whether to look now.
    fn due(&self) -> bool {
        self.next.is_none_or(|n| tokio::time::Instant::now() >= n)
    }

    /// Records a look and whether it found (or may have left) some.
    fn looked(&mut self, found: bool) {
        self.next = (!found).then(|| tokio::time::Instant::now() + self.every);
    }

    /// How often to look for leases that expired: a tenth of the
    /// visibility timeout, at most a second — about as long as a dead
    /// worker's job waits beyond its lease.
    fn for_leases(config: &DurableConfig) -> Self {
        Self::new((config.visibility / 10).min(Duration::from_secs(1)))
    }
}

/// What a backend found claiming an effect.
enum Claimed {
    Yes,
    Done(String),
    InProgress(Duration),
}

/// One delivery of a job to a worker, under a lease.
struct Delivery {
    /// The job's id in the backend.
    id: String,
    kind: String,
    payload: String,
    key: String,
    attempt: u32,
    /// Deliveries that ended without an answer, this one included.
    deliveries: usize,
    /// Since it was first queued, by the backend's clock.
    age: Duration,
    /// Deleted from the backend while leased: nothing to run or keep.
    gone: bool,
    /// What fences this delivery's lease off from any other.
    lease: Lease,
}

#[derive(Clone, Copy)]
enum Lease {
    #[cfg(feature = "redis")]
    Redis {
        /// This entry's delivery count when it was claimed.
        delivered: usize,
        /// When the job was first queued (ms, Redis's clock).
        enqueued: u64,
        /// Deliveries without an answer on the entries before this one.
        crashed_before: usize,
    },
    #[cfg(feature = "postgres")]
    Postgres { id: i64, fence: i32 },
}

/// How a delivery is finished.
enum Finish<'a> {
    Ack,
    Retry {
        attempt: u32,
        error: &'a str,
        delay: Duration,
    },
    Dead {
        attempt: u32,
        error: &'a str,
    },
}

impl DurableQueue {
    /// A queue on Redis Streams: connects (reconnecting by itself later)
    /// and creates the stream and consumer group if they do not exist.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached or refuses.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn connect(
        client: redis::Client,
        config: DurableConfig,
    ) -> Result<Self, DurableError> {
        let config = config.sanitised();
        let backend = Backend::Redis(on_redis::RedisQueue::connect(client, &config).await?);
        Ok(Self {
            backend,
            config: Arc::new(config),
        })
    }

    /// A queue in PostgreSQL, where `pool` (the application's) connects:
    /// creates its tables if they do not exist (replicas starting together
    /// take turns), in the schema the pool's connections resolve names in.
    /// The queue makes connections of its own with the pool's options — up
    /// to 8 for claims, renewals and enqueues, plus one per worker to
    /// listen — so it never takes one of the application's or waits behind
    /// it (settings the pool applies after connecting are not applied to
    /// them; the schema is named explicitly). Claims expect the default
    /// READ COMMITTED isolation; under a stricter default they conflict and
    /// are retried (logged at connect). Stop the workers before the
    /// database goes away for good: a job whose finish cannot reach it is
    /// run again.
    ///
    /// # Errors
    ///
    /// When the queue's name cannot be a table's, or PostgreSQL cannot be
    /// reached or refuses.
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn postgres(pool: sqlx::PgPool, config: DurableConfig) -> Result<Self, DurableError> {
        let config = config.sanitised();
        let backend = Backend::Postgres(on_postgres::PgQueue::connect(&pool, &config).await?);
        Ok(Self {
            backend,
            config: Arc::new(config),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DurableConfig {
        &self.config
    }

    /// Queues `job`; returns its idempotency key.
    ///
    /// # Errors
    ///
    /// When the job cannot be serialised or the backend refuses.
    pub async fn enqueue<J: DurableJob>(&self, job: &J) -> Result<String, DurableError> {
        self.enqueue_with_key(job, &fresh_name(J::NAME)).await
    }

    /// Queues `job` under an idempotency key of the caller's choosing (an
    /// order's `confirm-42`): a second copy of the same job — re-queued after
    /// a restart, or queued again because an enqueue timed out after the
    /// backend had taken it — shares its key, so
    /// [`claim_effect`](Self::claim_effect) does its effect once. Returns
    /// the key.
    ///
    /// # Errors
    ///
    /// When the job cannot be serialised or the backend refuses.
    pub async fn enqueue_with_key<J: DurableJob>(
        &self,
        job: &J,
        key: &str,
    ) -> Result<String, DurableError> {
        let payload = serde_json::to_string(job)?;
        match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.enqueue(&self.config, J::NAME, &payload, key).await?,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => q.enqueue(J::NAME, &payload, key).await?,
        }
        Ok(key.to_owned())
    }

    /// Queues `job` under `key` inside the application's own open
    /// transaction (or on any connection of its): the job exists when the
    /// transaction commits, and never if it rolls back — the outbox. Workers
    /// are woken at the commit. Returns the job's id.
    ///
    /// # Errors
    ///
    /// When the job cannot be serialised, PostgreSQL refuses (the
    /// transaction is then aborted, as after any failed statement), or the
    /// queue is not on PostgreSQL ([`DurableError::Unsupported`]).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn enqueue_in<J: DurableJob>(
        &self,
        conn: &mut sqlx::PgConnection,
        job: &J,
        key: &str,
    ) -> Result<String, DurableError> {
        let payload = serde_json::to_string(job)?;
        match &self.backend {
            Backend::Postgres(q) => Ok(q
                .enqueue_on(conn, J::NAME, &payload, key)
                .await?
                .to_string()),
            #[cfg(feature = "redis")]
            Backend::Redis(_) => Err(DurableError::Unsupported("redis")),
        }
    }

    /// `true` the first time `key` is seen within `ttl`. It marks the key
    /// before the effect: if the effect then fails, a retry finds the mark
    /// and skips it — at most once, not at least once. Prefer
    /// [`claim_effect`](Self::claim_effect).
    ///
    /// # Errors
    ///
    /// When the backend refuses.
    pub async fn first_time(&self, key: &str, ttl: Duration) -> Result<bool, DurableError> {
        match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.first_time(&self.config, key, ttl).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => q.first_time(key, ttl).await,
        }
    }

    /// Claims the side effect named `key` (use [`JobContext::key`]) for
    /// `lease`: [`Effect::Claimed`] if nobody has done it and nobody is doing
    /// it — do it, then [`EffectClaim::done`]; [`Effect::Done`] with the
    /// recorded result if it was done; [`Effect::InProgress`] if another
    /// attempt holds a claim that has not expired (return its
    /// [`RetryLater`]: the job is tried again when the claim ends, and no
    /// attempt is counted). See the [module docs](self) for the failure
    /// cases.
    ///
    /// # Errors
    ///
    /// When the backend refuses.
    pub async fn claim_effect(&self, key: &str, lease: Duration) -> Result<Effect, DurableError> {
        let token = fresh_name("claim");
        let claimed = match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.claim_effect(&self.config, key, &token, lease).await?,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => q.claim_effect(key, &token, lease).await?,
        };
        Ok(match claimed {
            Claimed::Yes => Effect::Claimed(EffectClaim {
                queue: self.clone(),
                key: key.to_owned(),
                token,
            }),
            Claimed::Done(result) => Effect::Done(result),
            Claimed::InProgress(left) => Effect::InProgress(RetryLater(left)),
        })
    }

    /// Dead letters kept.
    ///
    /// # Errors
    ///
    /// When the backend refuses.
    pub async fn dead_letters(&self) -> Result<usize, DurableError> {
        match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.dead_letters(&self.config).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => q.dead_letters().await,
        }
    }

    /// Jobs delivered to a worker and not yet finished.
    ///
    /// # Errors
    ///
    /// When the backend refuses.
    pub async fn pending(&self) -> Result<usize, DurableError> {
        match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.pending(&self.config).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => q.pending().await,
        }
    }

    /// Renews `consumer`'s lease on a delivery: whether it still held it.
    async fn renew(&self, consumer: &str, delivery: &Delivery) -> Result<bool, DurableError> {
        match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => q.renew(&self.config, consumer, delivery).await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => q.renew(&self.config, consumer, delivery).await,
        }
    }

    /// A worker reading this queue. Every live worker in this process gets
    /// a name of its own: the configured consumer name if no live worker
    /// has it, else `<name>-1`, `<name>-2`, … (the lowest free), given back
    /// when the worker is dropped — so a worker made again after another
    /// stopped reads under the same name, with its leased jobs.
    pub fn worker(&self) -> Worker {
        // Where the backend keeps leases: names are unique there.
        let slot = match &self.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(_) => format!(
                "redis\0{}\0{}\0{}",
                self.config.stream, self.config.group, self.config.consumer
            ),
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => format!("postgres\0{}\0{}", q.table(), self.config.consumer),
        };
        let n = {
            let mut in_use = names_in_use()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let taken = in_use.entry(slot.clone()).or_default();
            let n = (0..).find(|n| !taken.contains(n)).unwrap_or(0);
            taken.insert(n);
            n
        };
        let consumer = if n == 0 {
            self.config.consumer.clone()
        } else {
            format!("{}-{n}", self.config.consumer)
        };
        Worker {
            queue: self.clone(),
            name_slot: (slot, n),
            consumer,
            handlers: HashMap::new(),
            classes: Vec::new(),
            load: None,
            stats: Arc::new(Counters::default()),
        }
    }
}

type HandlerFuture = gratify_core::BoxFuture<Result<(), BoxError>>;
type Handler = Arc<dyn Fn(&str, JobContext) -> Result<HandlerFuture, BoxError> + Send + Sync>;

#[derive(Debug, Default)]
struct Counters {
    done: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    reclaimed: AtomicU64,
    backend_errors: AtomicU64,
    lost_leases: AtomicU64,
}

/// What a worker did, returned by [`Worker::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Jobs that succeeded and were acknowledged.
    pub done: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Jobs made dead letters.
    pub dead: u64,
    /// Jobs reclaimed from workers that stopped renewing their lease.
    pub reclaimed: u64,
    /// Errors of the backend survived (the worker waits and goes on).
    pub backend_errors: u64,
    /// Jobs this worker ran but could not finish because its lease had
    /// passed to another worker (which runs the job again).
    pub lost_leases: u64,
}

/// Runs registered handlers on the queue's jobs; see the
/// [module docs](self).
pub struct Worker {
    queue: DurableQueue,
    /// Its consumer name, its own among live workers.
    consumer: String,
    /// Where its name is held in this process's registry.
    name_slot: (String, u64),
    handlers: HashMap<&'static str, Handler>,
    /// The classes of the registered job types.
    classes: Vec<Option<&'static str>>,
    /// The model and signal it yields to, if any.
    load: Option<(gratify_core::CostModel, gratify_core::LoadSignal)>,
    stats: Arc<Counters>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("consumer", &self.consumer)
            .field("jobs", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The consumer names live workers of this process hold, by stream, group
/// and configured name: the indexes in use.
fn names_in_use() -> &'static std::sync::Mutex<HashMap<String, std::collections::BTreeSet<u64>>> {
    static NAMES: std::sync::OnceLock<
        std::sync::Mutex<HashMap<String, std::collections::BTreeSet<u64>>>,
    > = std::sync::OnceLock::new();
    NAMES.get_or_init(Default::default)
}

impl Drop for Worker {
    fn drop(&mut self) {
        let mut in_use = names_in_use()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(taken) = in_use.get_mut(&self.name_slot.0) {
            taken.remove(&self.name_slot.1);
            if taken.is_empty() {
                in_use.remove(&self.name_slot.0);
            }
        }
    }
}

/// A handler's task, aborted if the worker is dropped mid-job (a worker
/// cancelled like a crashed one: the entry stays pending for redelivery, and
/// no handler runs on unsupervised).
struct AbortOnDrop(tokio::task::JoinHandle<Run>);

impl AbortOnDrop {
    async fn join(&mut self) -> Result<Run, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a handler's task ended.
enum Run {
    Done,
    Failed(String),
    Later(Duration),
    Undecodable(String),
}

enum Outcome {
    Done,
    Failed(String),
    /// Tried again after the delay, the attempt not counted.
    Later(Duration, String),
    Dead(String),
    /// Deleted from the stream while pending: acknowledged, nothing else.
    Gone,
    /// Another worker holds it now: this worker finishes nothing.
    Lost,
}

impl Worker {
    /// Handles jobs of type `J` with `handler`.
    pub fn register<J, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        J: DurableJob,
        F: Fn(J, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.classes.push(J::CLASS);
        self.handlers.insert(
            J::NAME,
            Arc::new(move |payload: &str, ctx: JobContext| {
                let job: J = serde_json::from_str(payload)?;
                let fut: HandlerFuture = Box::pin(handler(job, ctx));
                Ok(fut)
            }),
        );
        self
    }

    /// Its consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Takes no new job while a second of a slot on `signal` costs more
    /// than delaying the most urgent class it handles (its job types'
    /// [`DurableJob::CLASS`] in `model`), as [`Defer`](super::Defer) does:
    /// under load the work waits in the queue; as the load falls it runs. Jobs
    /// already taken on (its own leased jobs after a restart, a dead
    /// worker's) are not held back. Under load that never falls, queued jobs wait —
    /// deadlines included: give a class that must not wait a cost rate
    /// above what a slot ever costs.
    #[must_use]
    pub fn yield_to_load(
        mut self,
        model: &gratify_core::CostModel,
        signal: gratify_core::LoadSignal,
    ) -> Self {
        self.load = Some((model.clone(), signal));
        self
    }

    /// Whether the load says to take no new job now.
    fn held_back(&self) -> bool {
        let Some((model, signal)) = &self.load else {
            return false;
        };
        if self.classes.is_empty() {
            return false;
        }
        let price = signal.snapshot().slot_second_price();
        let urgency = self
            .classes
            .iter()
            .map(|name| {
                let id = name
                    .and_then(|n| model.id(n))
                    .unwrap_or_else(|| model.default_class());
                model.class(id).urgency(0.0)
            })
            .fold(0.0, f64::max);
        price > urgency
    }

    /// The figures so far.
    pub fn report(&self) -> WorkerReport {
        let c = &self.stats;
        WorkerReport {
            done: c.done.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            reclaimed: c.reclaimed.load(Ordering::Relaxed),
            backend_errors: c.backend_errors.load(Ordering::Relaxed),
            lost_leases: c.lost_leases.load(Ordering::Relaxed),
        }
    }

    /// Works until `shutdown` completes: jobs leased under its own name
    /// before it started first, then reclaimed and new ones, one at a time.
    /// A job in progress when `shutdown` completes is finished and
    /// acknowledged (or, past `job_timeout`, aborted as a failed attempt);
    /// nothing else is claimed. Errors of the backend are logged and
    /// survived: the worker waits and reconnects (on Redis, it recreates the
    /// consumer group if Redis lost it).
    ///
    /// Dropping the returned future instead is a crash: the job in
    /// progress is aborted and stays leased until its lease expires.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> WorkerReport {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut pause = Duration::from_millis(50);
        // Waiting on a connection of this worker's own.
        let mut conn = loop {
            let connected = tokio::select! {
                biased;
                () = &mut shutdown => return self.report(),
                c = WorkerConn::connect(&self.queue) => c,
            };
            match connected {
                Ok(c) => break c,
                Err(e) => {
                    self.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "durable worker: cannot connect; retrying");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => return self.report(),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        pause = Duration::from_millis(50);
        loop {
            let fetched = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = conn.fetch(self) => r,
            };
            let result = match fetched {
                Ok(Some(delivery)) => self.handle(&mut conn, delivery).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => pause = Duration::from_millis(50),
                Err(e) => {
                    self.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                    super::count(gratify_core::telemetry::DURABLE_BACKEND_ERRORS_TOTAL.name);
                    tracing::warn!(error = %e, "durable worker: backend error; retrying");
                    conn.recover(&self.queue.config, &e).await;
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
            // Stop between jobs once asked; a completed shutdown future is
            // never polled again.
            let stopping = tokio::select! {
                biased;
                () = &mut shutdown => true,
                () = std::future::ready(()) => false,
            };
            if stopping {
                break;
            }
        }
        self.report()
    }

    /// Runs the handler of one delivery under its lease, then finishes it.
    async fn handle(&self, conn: &mut WorkerConn, delivery: Delivery) -> Result<(), DurableError> {
        let config = &self.queue.config;
        let kind = delivery.kind.as_str();
        let key = delivery.key.as_str();
        let attempt = delivery.attempt;
        let max_deliveries = usize::try_from(config.max_deliveries).unwrap_or(usize::MAX);
        // Set aside without counting an attempt — for a while only: past
        // `unknown_grace` since it was first queued, it counts.
        let set_aside = |delay: Duration, why: String, unknown: bool| {
            if delivery.age < config.unknown_grace {
                Outcome::Later(
                    delay.clamp(Duration::from_millis(50), Duration::from_secs(3600)),
                    why,
                )
            } else if unknown {
                Outcome::Dead(why)
            } else {
                Outcome::Failed(why)
            }
        };
        let outcome = if delivery.gone {
            Outcome::Gone
        } else if delivery.deliveries > max_deliveries {
            Outcome::Dead(format!(
                "delivered {} times without an answer",
                delivery.deliveries
            ))
        } else if let Some(handler) = self.handlers.get(kind) {
            let ctx = JobContext {
                key: key.to_owned(),
                attempt,
                entry: delivery.id.clone(),
            };
            let handler = Arc::clone(handler);
            let body = delivery.payload.clone();
            // Its own task — decoding and the handler's first, synchronous
            // part included — so a panic anywhere in it is a failed attempt,
            // not the worker's end. The lease is renewed while it runs, up to
            // `job_timeout`.
            let mut job = AbortOnDrop(tokio::spawn(async move {
                let fut = match handler(&body, ctx) {
                    Ok(fut) => fut,
                    Err(e) => return Run::Undecodable(format!("undecodable payload: {e}")),
                };
                match fut.await {
                    Ok(()) => Run::Done,
                    Err(e) => match RetryLater::find(e.as_ref()) {
                        Some(later) => Run::Later(later.0),
                        None => Run::Failed(e.to_string()),
                    },
                }
            }));
            let renewing = self.renew_while(&delivery);
            let joined = tokio::select! {
                biased;
                joined = job.join() => Some(Ok(joined)),
                () = renewing => Some(Err(())),
                () = tokio::time::sleep(config.job_timeout) => None,
            };
            match joined {
                Some(Ok(Ok(Run::Done))) => Outcome::Done,
                Some(Ok(Ok(Run::Failed(e)))) => Outcome::Failed(e),
                Some(Ok(Ok(Run::Later(d)))) => {
                    set_aside(d, "asked to be tried later".into(), false)
                }
                Some(Ok(Ok(Run::Undecodable(e)))) => set_aside(
                    (config.unknown_grace / 10).min(Duration::from_secs(30)),
                    e,
                    true,
                ),
                Some(Ok(Err(e))) => Outcome::Failed(format!("handler panicked: {e}")),
                Some(Err(())) => {
                    // Another worker holds the job now and runs it: stop
                    // this run rather than do the work twice at once.
                    drop(job);
                    Outcome::Lost
                }
                None => {
                    // Dropping the handle aborts the task (a handler blocked
                    // in synchronous code cannot be stopped by anyone: it
                    // runs on, and is logged).
                    drop(job);
                    tracing::error!(job = %kind, key = %key, timeout = ?config.job_timeout, "durable job timed out and was aborted");
                    Outcome::Failed(format!(
                        "aborted after the job timeout of {:?}",
                        config.job_timeout
                    ))
                }
            }
        } else {
            set_aside(
                (config.unknown_grace / 10).min(Duration::from_secs(30)),
                format!("no handler registered for job type {kind:?}"),
                true,
            )
        };
        let outcome = match outcome {
            Outcome::Failed(error) if attempt >= config.max_attempts => Outcome::Dead(error),
            other => other,
        };
        if let Outcome::Lost = outcome {
            self.stats.lost_leases.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::DURABLE_LOST_LEASES_TOTAL.name);
            tracing::warn!(job = %kind, key = %key, entry = %delivery.id, "durable job's lease was lost while it ran; its new holder runs it");
            return Ok(());
        }
        let (finish, counter) = match &outcome {
            Outcome::Done | Outcome::Gone | Outcome::Lost => (
                Finish::Ack,
                matches!(outcome, Outcome::Done).then_some((
                    gratify_core::telemetry::DURABLE_DONE_TOTAL.name,
                    &self.stats.done,
                )),
            ),
            Outcome::Failed(error) => {
                tracing::debug!(job = %kind, key = %key, attempt, error = %error, "durable job failed; will retry");
                // Full jitter: anywhere up to the doubling ceiling.
                let ceiling = super::retry_delay(config.backoff, attempt);
                (
                    Finish::Retry {
                        attempt: attempt + 1,
                        error,
                        delay: ceiling.mul_f64(super::jitter()),
                    },
                    Some((
                        gratify_core::telemetry::DURABLE_RETRIED_TOTAL.name,
                        &self.stats.retried,
                    )),
                )
            }
            Outcome::Later(delay, why) => {
                tracing::debug!(job = %kind, key = %key, attempt, reason = %why, "durable job set aside");
                (
                    Finish::Retry {
                        attempt,
                        error: why,
                        delay: *delay,
                    },
                    None,
                )
            }
            Outcome::Dead(error) => {
                tracing::warn!(job = %kind, key = %key, attempt, error = %error, "durable job is a dead letter");
                (
                    Finish::Dead { attempt, error },
                    Some((
                        gratify_core::telemetry::DURABLE_DEAD_TOTAL.name,
                        &self.stats.dead,
                    )),
                )
            }
        };
        // Finishing is safe to repeat: a reply lost on the way, or a backend
        // restarting, is retried for as long as the lease may hold and half a
        // minute more (a handler that succeeded is not run again for a blip;
        // past its lease, the fenced step still finishes it if nobody took
        // it meanwhile). Other errors are tried three times. A repeat that
        // finds the job held by nobody means an earlier try did it; one that
        // finds another holder means the lease was lost.
        let mut tries = 0u32;
        let started = tokio::time::Instant::now();
        let finished = loop {
            tries += 1;
            match conn.finish(self, &delivery, &finish).await {
                Ok(1) => break true,
                Ok(2) if tries > 1 => break true,
                Ok(_) => break false,
                Err(e)
                    if tries < 3
                        || (e.is_transient()
                            && started.elapsed() < config.visibility + Duration::from_secs(30)) =>
                {
                    tracing::debug!(error = %e, "durable worker: finishing failed; trying again");
                    let pause = Duration::from_millis(100).saturating_mul(1 << tries.min(4));
                    tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
                }
                Err(e) => return Err(e),
            }
        };
        if finished {
            if let Some((name, counter)) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
                super::count(name);
            }
        } else {
            // Another worker holds the job now and runs it again.
            self.stats.lost_leases.fetch_add(1, Ordering::Relaxed);
            super::count(gratify_core::telemetry::DURABLE_LOST_LEASES_TOTAL.name);
            tracing::warn!(job = %kind, key = %key, entry = %delivery.id, "durable job's lease was lost before it finished; its new holder runs it again");
        }
        Ok(())
    }

    /// Renews this worker's lease on a delivery every third of the
    /// visibility timeout (on the queue's shared connection: a renewal
    /// never waits behind this worker's own wait); a failed renewal is tried
    /// again within a tenth of it. Returns when the lease is held by another
    /// worker or delivery.
    async fn renew_while(&self, delivery: &Delivery) {
        let config = &self.queue.config;
        let every = (config.visibility / 3).max(Duration::from_millis(1));
        let soon = (config.visibility / 10).max(Duration::from_millis(1));
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            wait = match self.queue.renew(&self.consumer, delivery).await {
                Ok(true) => every,
                Ok(false) => return,
                Err(e) => {
                    self.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(entry = %delivery.id, error = %e, "durable job's lease could not be renewed");
                    soon
                }
            };
        }
    }
}

/// A worker's own connection, where it waits for jobs.
enum WorkerConn {
    #[cfg(feature = "redis")]
    Redis(on_redis::RedisWorker),
    #[cfg(feature = "postgres")]
    Postgres(on_postgres::PgWorker),
}

impl WorkerConn {
    async fn connect(queue: &DurableQueue) -> Result<Self, DurableError> {
        Ok(match &queue.backend {
            #[cfg(feature = "redis")]
            Backend::Redis(q) => {
                Self::Redis(on_redis::RedisWorker::connect(q, &queue.config).await?)
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(q) => {
                Self::Postgres(on_postgres::PgWorker::connect(q, &queue.config).await?)
            }
        })
    }

    async fn fetch(&mut self, worker: &Worker) -> Result<Option<Delivery>, DurableError> {
        let config = &worker.queue.config;
        let held_back = || worker.held_back();
        match self {
            #[cfg(feature = "redis")]
            Self::Redis(w) => {
                w.fetch(config, &worker.consumer, &worker.stats, held_back)
                    .await
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(w) => {
                w.fetch(config, &worker.consumer, &worker.stats, held_back)
                    .await
            }
        }
    }

    async fn finish(
        &mut self,
        worker: &Worker,
        delivery: &Delivery,
        finish: &Finish<'_>,
    ) -> Result<i64, DurableError> {
        match self {
            #[cfg(feature = "redis")]
            Self::Redis(w) => {
                w.finish(&worker.queue.config, &worker.consumer, delivery, finish)
                    .await
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(w) => w.finish(&worker.consumer, delivery, finish).await,
        }
    }

    async fn recover(&mut self, config: &DurableConfig, error: &DurableError) {
        match self {
            #[cfg(feature = "redis")]
            Self::Redis(w) => w.recover(config, error).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(w) => {
                let _ = (config, error);
                w.recover();
            }
        }
    }
}
