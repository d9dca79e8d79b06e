//! Durable deferred work on a Redis Stream (feature `redis`).
//!
//! Jobs are serialised with serde under a registered type name into a Redis
//! Stream read by a consumer group: workers in any replica share the work.
//! An entry is acknowledged only after its handler succeeds, so a worker
//! that dies mid-job leaves it pending; on restart a worker first reads its
//! own pending entries, and any worker reclaims (`XAUTOCLAIM`) the entries
//! of a consumer silent for longer than the visibility timeout. A failed
//! attempt is retried after a doubling backoff (through a sorted set of
//! delayed entries, moved back atomically when due); after `max_attempts`
//! failures, or `max_deliveries` deliveries without an acknowledgement (a
//! job that kills its worker), the entry goes to a dead-letter stream with
//! its last error. Entries of an unknown type or an undecodable payload go
//! there too: nothing is dropped silently.
//!
//! Delivery is at least once: a handler may see a job again after a crash.
//! Each job carries an idempotency key ([`JobContext::key`]) that stays the
//! same across retries, and [`DurableQueue::first_time`] de-duplicates side
//! effects with `SET NX` and a time to live.
//!
//! Durability is Redis's: run it with the append-only file on
//! (`appendonly yes`) for queued jobs to survive a Redis restart.
//! On Redis Cluster, give the stream a hash tag (`{shop}:jobs`) so that its
//! companion keys (`:delayed`, `:dead`, `:once:*`) share its slot.
//!
//! Consumer names must be unique among live workers (two live workers under
//! one name would read each other's pending entries); the default is a
//! fresh random name. Give a stable name (the pod's, say) to have a
//! restarted worker pick up its own pending entries at once rather than
//! after the visibility timeout.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use gratify::offload::durable::{DurableConfig, DurableJob, DurableQueue};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendConfirmation { order: u64 }
//!
//! impl DurableJob for SendConfirmation {
//!     const NAME: &'static str = "send-confirmation";
//! }
//!
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
//!         if q.first_time(&ctx.key, Duration::from_secs(86_400)).await? {
//!             println!("mail for order {}", job.order);
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

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gratify_core::BoxError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisError, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A job type that can be queued durably: serialisable, under a stable
/// name that every replica registers.
pub trait DurableJob: Serialize + DeserializeOwned + Send + 'static {
    /// The registered name; it is stored with each entry.
    const NAME: &'static str;
}

/// Settings of a [`DurableQueue`] and its workers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DurableConfig {
    /// The stream's key; the delayed set and dead-letter stream are
    /// `<stream>:delayed` and `<stream>:dead`.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// This worker's consumer name, unique among live workers.
    pub consumer: String,
    /// How long an entry may stay unacknowledged by a silent consumer
    /// before another reclaims it. Longer than the slowest job.
    pub visibility: Duration,
    /// Failed attempts before an entry is a dead letter.
    pub max_attempts: u32,
    /// Deliveries without an acknowledgement before an entry is a dead
    /// letter.
    pub max_deliveries: u32,
    /// The first retry's delay; it doubles with each attempt.
    pub backoff: Duration,
    /// How long a read waits for new entries.
    pub block: Duration,
    /// Entries read at once.
    pub batch: usize,
}

impl DurableConfig {
    /// Defaults for `stream`: group `gratify`, a fresh consumer name,
    /// visibility 30 s, 5 attempts, 10 deliveries, backoff 1 s, reads
    /// blocking 1 s for up to 16 entries.
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
        }
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

    fn delayed_key(&self) -> String {
        format!("{}:delayed", self.stream)
    }

    fn dead_key(&self) -> String {
        format!("{}:dead", self.stream)
    }
}

/// A name unlikely to be repeated: a prefix, the process id and random bits.
fn fresh_name(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{prefix}-{}-{:016x}", std::process::id(), h.finish())
}

/// What went wrong talking to Redis or encoding a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// Redis refused or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// The job could not be serialised.
    #[error("encoding a job: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What a handler is told about the job it runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobContext {
    /// The idempotency key, the same on every attempt and delivery.
    pub key: String,
    /// This attempt, from 1.
    pub attempt: u32,
    /// The stream entry id.
    pub entry: String,
}

/// A handle to enqueue jobs and make workers. Cloning shares the
/// connection.
#[derive(Clone)]
pub struct DurableQueue {
    conn: ConnectionManager,
    config: Arc<DurableConfig>,
}

impl fmt::Debug for DurableQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableQueue")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Moves due delayed entries back onto the stream, atomically.
const PROMOTE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local e = cjson.decode(m)
  redis.call('XADD', KEYS[2], '*', 'type', e.type, 'payload', e.payload, 'key', e.key,
    'attempt', tostring(e.attempt), 'error', e.error)
  redis.call('ZREM', KEYS[1], m)
end
return #due
";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl DurableQueue {
    /// Connects (reconnecting by itself later) and creates the stream and
    /// consumer group if they do not exist.
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached or refuses.
    pub async fn connect(
        client: redis::Client,
        config: DurableConfig,
    ) -> Result<Self, DurableError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.block + Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client, manager_config).await?;
        let queue = Self {
            conn,
            config: Arc::new(config),
        };
        queue.ensure_group().await?;
        Ok(queue)
    }

    async fn ensure_group(&self) -> Result<(), DurableError> {
        let mut conn = self.conn.clone();
        let created: Result<(), RedisError> = conn
            .xgroup_create_mkstream(&self.config.stream, &self.config.group, "0")
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &DurableConfig {
        &self.config
    }

    /// Queues `job`; returns its idempotency key.
    ///
    /// # Errors
    ///
    /// When the job cannot be serialised or Redis refuses.
    pub async fn enqueue<J: DurableJob>(&self, job: &J) -> Result<String, DurableError> {
        let payload = serde_json::to_string(job)?;
        let key = fresh_name(J::NAME);
        let mut conn = self.conn.clone();
        let _: String = conn
            .xadd(
                &self.config.stream,
                "*",
                &[
                    ("type", J::NAME),
                    ("payload", payload.as_str()),
                    ("key", key.as_str()),
                    ("attempt", "1"),
                    ("error", ""),
                ],
            )
            .await?;
        Ok(key)
    }

    /// `true` the first time `key` is seen within `ttl`: guard a side
    /// effect with it to make an at-least-once handler effectively once.
    ///
    /// # Errors
    ///
    /// When Redis refuses.
    pub async fn first_time(&self, key: &str, ttl: Duration) -> Result<bool, DurableError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{}:once:{key}", self.config.stream))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    /// Entries in the dead-letter stream.
    ///
    /// # Errors
    ///
    /// When Redis refuses.
    pub async fn dead_letters(&self) -> Result<usize, DurableError> {
        let mut conn = self.conn.clone();
        Ok(conn.xlen(self.config.dead_key()).await?)
    }

    /// Entries delivered to a consumer and not yet acknowledged.
    ///
    /// # Errors
    ///
    /// When Redis refuses.
    pub async fn pending(&self) -> Result<usize, DurableError> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .query_async(&mut conn)
            .await?;
        Ok(match reply {
            Value::Array(items) => match items.first() {
                Some(Value::Int(n)) => usize::try_from(*n).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        })
    }

    /// A worker reading this queue under its configured consumer name.
    pub fn worker(&self) -> Worker {
        Worker {
            queue: self.clone(),
            handlers: HashMap::new(),
            stats: Arc::new(Counters::default()),
        }
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Handler = Arc<dyn Fn(&str, JobContext) -> Result<HandlerFuture, BoxError> + Send + Sync>;

#[derive(Debug, Default)]
struct Counters {
    done: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    reclaimed: AtomicU64,
    redis_errors: AtomicU64,
}

/// What a worker did, returned by [`Worker::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Jobs that succeeded and were acknowledged.
    pub done: u64,
    /// Failed attempts scheduled for a retry.
    pub retried: u64,
    /// Entries moved to the dead-letter stream.
    pub dead: u64,
    /// Entries reclaimed from silent consumers.
    pub reclaimed: u64,
    /// Redis errors survived (the worker waits and goes on).
    pub redis_errors: u64,
}

/// Runs registered handlers on the queue's entries; see the
/// [module docs](self).
pub struct Worker {
    queue: DurableQueue,
    handlers: HashMap<&'static str, Handler>,
    stats: Arc<Counters>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("consumer", &self.queue.config.consumer)
            .field("jobs", &self.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A handler's task, aborted if the worker is dropped mid-job (a worker
/// cancelled like a crashed one: the entry stays pending for redelivery, and
/// no handler runs on unsupervised).
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), BoxError>>);

impl AbortOnDrop {
    async fn join(mut self) -> Result<Result<(), BoxError>, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Outcome {
    Done,
    Failed(String),
    Undecodable(String),
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

    /// The figures so far.
    pub fn report(&self) -> WorkerReport {
        let c = &self.stats;
        WorkerReport {
            done: c.done.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            reclaimed: c.reclaimed.load(Ordering::Relaxed),
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
        }
    }

    /// Works until `shutdown` completes: its own pending entries first,
    /// then reclaimed and new ones. A job in progress when `shutdown`
    /// completes is finished and acknowledged; the rest of the batch in
    /// hand stays pending for this consumer name (read first on the next
    /// start) or for another worker after the visibility timeout. Redis
    /// errors are logged and survived: the worker waits and reconnects.
    ///
    /// Dropping the returned future instead is a crash: the job in
    /// progress is aborted and stays pending for redelivery.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> WorkerReport {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut stopping = false;
        let mut own_pending = true;
        let mut pause = Duration::from_millis(50);
        let mut conn = self.queue.conn.clone();
        'work: while !stopping {
            let fetched = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = self.fetch(&mut conn, &mut own_pending) => r,
            };
            let mut result = fetched.map(|batch| batch.into_iter());
            if let Ok(batch) = &mut result {
                for entry in batch {
                    if let Err(e) = self.handle(&mut conn, entry).await {
                        result = Err(e);
                        break;
                    }
                    // Stop between jobs once asked; a completed shutdown
                    // future is never polled again.
                    stopping = tokio::select! {
                        biased;
                        () = &mut shutdown => true,
                        () = std::future::ready(()) => false,
                    };
                    if stopping {
                        break 'work;
                    }
                }
            }
            match result {
                Ok(_) => pause = Duration::from_millis(50),
                Err(e) => {
                    self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    super::count("gratify_durable_redis_errors_total");
                    tracing::warn!(error = %e, "durable worker: redis error; retrying");
                    // After a reconnect, read our own pending entries again.
                    own_pending = true;
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.report()
    }

    /// Promotes due retries and fetches a batch: own pending entries while
    /// there are any, then entries reclaimed from silent consumers, then
    /// new ones (blocking up to `block`).
    async fn fetch(
        &self,
        conn: &mut ConnectionManager,
        own_pending: &mut bool,
    ) -> Result<Vec<(StreamId, Option<usize>)>, DurableError> {
        let config = &self.queue.config;
        let _: u64 = redis::Script::new(PROMOTE)
            .key(config.delayed_key())
            .key(&config.stream)
            .arg(now_ms())
            .arg(config.batch)
            .invoke_async(conn)
            .await?;
        if *own_pending {
            let entries = self.read(conn, "0", None).await?;
            if entries.is_empty() {
                *own_pending = false;
            }
            return Ok(entries);
        }
        let claimed = self.reclaim(conn).await?;
        if claimed.is_empty() {
            self.read(conn, ">", Some(config.block)).await
        } else {
            Ok(claimed)
        }
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<(StreamId, Option<usize>)>, DurableError> {
        let config = &self.queue.config;
        let mut options = StreamReadOptions::default()
            .group(&config.group, &config.consumer)
            .count(config.batch);
        if let Some(block) = block {
            options = options.block(usize::try_from(block.as_millis()).unwrap_or(usize::MAX));
        }
        let reply: Option<StreamReadReply> = conn
            .xread_options(&[&config.stream], &[from], &options)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|id| (id, None))
            .collect())
    }

    /// Claims entries idle past the visibility timeout, with how many times
    /// each was delivered.
    async fn reclaim(
        &self,
        conn: &mut ConnectionManager,
    ) -> Result<Vec<(StreamId, Option<usize>)>, DurableError> {
        let config = &self.queue.config;
        let reply: redis::streams::StreamAutoClaimReply = conn
            .xautoclaim_options(
                &config.stream,
                &config.group,
                &config.consumer,
                u64::try_from(config.visibility.as_millis()).unwrap_or(u64::MAX),
                "0-0",
                StreamAutoClaimOptions::default().count(config.batch),
            )
            .await?;
        let mut out = Vec::with_capacity(reply.claimed.len());
        for entry in reply.claimed {
            self.stats.reclaimed.fetch_add(1, Ordering::Relaxed);
            super::count("gratify_durable_reclaimed_total");
            let pending: redis::streams::StreamPendingCountReply = conn
                .xpending_count(&config.stream, &config.group, &entry.id, &entry.id, 1)
                .await?;
            let delivered = pending.ids.first().map(|p| p.times_delivered);
            out.push((entry, delivered));
        }
        Ok(out)
    }

    async fn handle(
        &self,
        conn: &mut ConnectionManager,
        (entry, delivered): (StreamId, Option<usize>),
    ) -> Result<(), DurableError> {
        let config = &self.queue.config;
        let field = |name: &str| -> String {
            match entry.map.get(name) {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => String::new(),
            }
        };
        let kind = field("type");
        let payload = field("payload");
        let key = field("key");
        let attempt: u32 = field("attempt").parse().unwrap_or(1).max(1);
        let max_deliveries = usize::try_from(config.max_deliveries).unwrap_or(usize::MAX);
        let outcome = if delivered.is_some_and(|d| d > max_deliveries) {
            Outcome::Undecodable(format!(
                "delivered {} times without an acknowledgement",
                delivered.unwrap_or(0)
            ))
        } else if let Some(handler) = self.handlers.get(kind.as_str()) {
            let ctx = JobContext {
                key: key.clone(),
                attempt,
                entry: entry.id.clone(),
            };
            match handler(&payload, ctx) {
                // Its own task: a panicking handler is a failed attempt.
                Ok(fut) => match AbortOnDrop(tokio::spawn(fut)).join().await {
                    Ok(Ok(())) => Outcome::Done,
                    Ok(Err(e)) => Outcome::Failed(e.to_string()),
                    Err(e) => Outcome::Failed(format!("handler panicked: {e}")),
                },
                Err(e) => Outcome::Undecodable(format!("undecodable payload: {e}")),
            }
        } else {
            Outcome::Undecodable(format!("no handler registered for job type {kind:?}"))
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        match &outcome {
            Outcome::Done => {
                self.stats.done.fetch_add(1, Ordering::Relaxed);
                super::count("gratify_durable_done_total");
            }
            Outcome::Failed(error) if attempt < config.max_attempts => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                super::count("gratify_durable_retried_total");
                tracing::debug!(job = %kind, key = %key, attempt, error = %error, "durable job failed; will retry");
                let backoff = super::retry_delay(config.backoff, attempt);
                let due = now_ms().saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(0));
                let member = serde_json::json!({
                    "type": kind, "payload": payload, "key": key,
                    "attempt": attempt + 1, "error": error,
                })
                .to_string();
                pipe.zadd(config.delayed_key(), member, due).ignore();
            }
            Outcome::Failed(error) | Outcome::Undecodable(error) => {
                self.stats.dead.fetch_add(1, Ordering::Relaxed);
                super::count("gratify_durable_dead_total");
                tracing::warn!(job = %kind, key = %key, attempt, error = %error, "durable job is a dead letter");
                pipe.xadd(
                    config.dead_key(),
                    "*",
                    &[
                        ("type", kind.as_str()),
                        ("payload", payload.as_str()),
                        ("key", key.as_str()),
                        ("attempt", attempt.to_string().as_str()),
                        ("error", error.as_str()),
                        ("entry", entry.id.as_str()),
                    ],
                )
                .ignore();
            }
        }
        pipe.xack(&config.stream, &config.group, &[&entry.id])
            .ignore();
        pipe.xdel(&config.stream, &[&entry.id]).ignore();
        let () = pipe.query_async(conn).await?;
        Ok(())
    }
}
