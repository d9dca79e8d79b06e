//! Durable deferred work on a Redis Stream (feature `redis`).
//!
//! Jobs are serialised with serde under a registered type name into a Redis
//! Stream read by a consumer group: workers in any replica share the work.
//!
//! - **A lease per job.** A worker claims one entry at a time, when it can
//!   start it, and holds a lease on it while its handler runs: every third
//!   of the visibility timeout it renews the claim (the entry's idle time
//!   goes back to zero), so a job longer than the visibility timeout is not
//!   taken by another worker while it runs. A worker that dies stops
//!   renewing; after the visibility timeout any worker reclaims the entry
//!   (`XAUTOCLAIM`).
//! - **Finishing needs the lease.** Acknowledging, scheduling a retry or
//!   dead-lettering happen in one script that first checks that this worker
//!   still owns the entry: a worker that lost its lease (it stalled past the
//!   visibility timeout and another took the job) cannot ack, retry or
//!   dead-letter the other worker's run.
//! - **Blocking reads on their own connection.** Each worker reads on a
//!   connection of its own; enqueueing never waits behind a worker's
//!   blocking read.
//! - **Retries.** A failed attempt is retried after a backoff drawn
//!   uniformly between zero and a doubling ceiling (full jitter: failed jobs
//!   do not come back together), through a sorted set of delayed entries
//!   moved back atomically when due; after `max_attempts` failures the entry
//!   goes to a dead-letter stream with its last error.
//! - **Poison jobs.** An entry delivered more than `max_deliveries` times
//!   without an acknowledgement (a job that kills its worker) is a dead
//!   letter, whichever way it comes back: reclaimed from another worker or
//!   re-read from the worker's own pending list after a restart under a
//!   stable name. Entries of an unknown type or an undecodable payload go
//!   there too: nothing is dropped silently.
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
    /// Its class in the cost model, for a worker that yields to the load
    /// ([`Worker::yield_to_load`]); `None`: the model's default class.
    const CLASS: Option<&'static str> = None;
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
    /// How long an entry may stay unacknowledged by a consumer that has
    /// stopped renewing its lease before another reclaims it: how fast a
    /// dead worker's job is picked up again. A running job's lease is
    /// renewed every third of it, so it need not exceed the slowest job.
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
    /// Delayed retries moved back onto the stream at once.
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

    fn delayed_key(&self) -> String {
        format!("{}:delayed", self.stream)
    }

    fn dead_key(&self) -> String {
        format!("{}:dead", self.stream)
    }
}

/// A name unlikely to be repeated: a prefix, the process id and random bits.
fn fresh_name(prefix: &str) -> String {
    format!("{prefix}-{}-{:016x}", std::process::id(), random_u64())
}

/// Random bits, differently seeded per call (std's hasher keys and the
/// time): for names and jitter, not for secrets.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
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
/// connection (never used for a blocking command: each worker reads on its
/// own).
#[derive(Clone)]
pub struct DurableQueue {
    client: redis::Client,
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

/// Renews this consumer's claim on an entry if it still holds this
/// delivery of it (the owner and the delivery count it claimed it with —
/// `XCLAIM … JUSTID` does not count a delivery, so the count fences off an
/// earlier delivery of the same entry): 1, or 0 when the lease was lost.
/// KEYS: stream; ARGV: group, consumer, id, delivery count.
const RENEW: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] or tonumber(p[1][4]) ~= tonumber(ARGV[4]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
";

/// Finishes an entry if this consumer still holds this delivery of it:
/// schedules a retry or dead-letters as asked, then acknowledges and
/// deletes it; 1, or 0 when another consumer or delivery holds it, or 2 when
/// it is pending for nobody (finished already) — nothing is done then. A retry is
/// due after its delay by Redis's clock, not a worker's. KEYS: stream,
/// delayed set, dead stream; ARGV: group, consumer, id, delivery count,
/// action (`ack`, `retry`, `dead`), then for a retry its member and delay
/// (ms), for a dead letter type, payload, key, attempt and error.
const FINISH: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return 2 end
if p[1][2] ~= ARGV[2] or tonumber(p[1][4]) ~= tonumber(ARGV[4]) then return 0 end
if ARGV[5] == 'retry' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[6])
elseif ARGV[5] == 'dead' then
  redis.call('XADD', KEYS[3], '*', 'type', ARGV[6], 'payload', ARGV[7], 'key', ARGV[8],
    'attempt', ARGV[9], 'error', ARGV[10], 'entry', ARGV[3])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

/// A uniform draw in `[0, 1)` for backoff jitter (not for secrets).
fn jitter() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Claims an effect: `{1, ""}` claimed, `{2, result}` done, `{3, ms}` in
/// progress elsewhere for up to `ms` more. KEYS: the effect's key; ARGV:
/// token, lease (ms).
const CLAIM_EFFECT: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'claim:' .. ARGV[1], 'PX', ARGV[2])
  return {1, ''}
end
if string.sub(v, 1, 5) == 'done:' then return {2, string.sub(v, 6)} end
return {3, tostring(redis.call('PTTL', KEYS[1]))}
";

/// Records an effect done, if the claim is still this one's or has
/// expired with nobody else holding it: 1, else 0 (another attempt holds
/// it, or recorded it). KEYS: the effect's key; ARGV: token, result, how
/// long to keep it (ms).
const EFFECT_DONE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and v ~= 'claim:' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'done:' .. ARGV[2], 'PX', ARGV[3])
return 1
";

/// Releases a claim, if it is still this one's. KEYS: the effect's key;
/// ARGV: token.
const EFFECT_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == 'claim:' .. ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

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
    /// When Redis refuses (the effect is done but not recorded: a retry will
    /// do it again).
    pub async fn done(self, result: &str, keep: Duration) -> Result<bool, DurableError> {
        let mut conn = self.queue.conn.clone();
        let recorded: i64 = redis::Script::new(EFFECT_DONE)
            .key(&self.key)
            .arg(&self.token)
            .arg(result)
            .arg(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(recorded == 1)
    }

    /// Gives the claim up: the effect was not done, and a retry may do it.
    ///
    /// # Errors
    ///
    /// When Redis refuses (the claim then lasts until its lease ends).
    pub async fn release(self) -> Result<(), DurableError> {
        let mut conn = self.queue.conn.clone();
        let _: i64 = redis::Script::new(EFFECT_RELEASE)
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// Moves due delayed entries back onto the stream, atomically, due by
/// Redis's clock. KEYS: delayed set, stream; ARGV: unused, batch.
const PROMOTE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local e = cjson.decode(m)
  redis.call('XADD', KEYS[2], '*', 'type', e.type, 'payload', e.payload, 'key', e.key,
    'attempt', tostring(e.attempt), 'error', e.error, 'enqueued', tostring(e.enqueued or ''),
    'crashed', tostring(e.crashed or 0))
  redis.call('ZREM', KEYS[1], m)
end
return #due
";

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
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
        let queue = Self {
            client,
            conn,
            config: Arc::new(config.sanitised()),
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
        self.enqueue_with_key(job, &fresh_name(J::NAME)).await
    }

    /// Queues `job` under an idempotency key of the caller's choosing (an
    /// order's `confirm-42`): a second copy of the same job — re-queued after
    /// a restart, or queued again because an enqueue timed out after Redis
    /// had taken it — shares its key, so [`claim_effect`](Self::claim_effect)
    /// does its effect once. Returns the key.
    ///
    /// # Errors
    ///
    /// When the job cannot be serialised or Redis refuses.
    pub async fn enqueue_with_key<J: DurableJob>(
        &self,
        job: &J,
        key: &str,
    ) -> Result<String, DurableError> {
        let payload = serde_json::to_string(job)?;
        let key = key.to_owned();
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

    /// `true` the first time `key` is seen within `ttl`. It marks the key
    /// before the effect: if the effect then fails, a retry finds the mark
    /// and skips it — at most once, not at least once. Prefer
    /// [`claim_effect`](Self::claim_effect).
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
    /// When Redis refuses.
    pub async fn claim_effect(&self, key: &str, lease: Duration) -> Result<Effect, DurableError> {
        let token = fresh_name("claim");
        let mut conn = self.conn.clone();
        let reply: (i64, String) = redis::Script::new(CLAIM_EFFECT)
            .key(self.effect_key(key))
            .arg(&token)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply.0 {
            1 => Effect::Claimed(EffectClaim {
                queue: self.clone(),
                key: self.effect_key(key),
                token,
            }),
            2 => Effect::Done(reply.1),
            _ => Effect::InProgress(RetryLater(Duration::from_millis(
                reply.1.parse::<u64>().unwrap_or(1000).max(1),
            ))),
        })
    }

    fn effect_key(&self, key: &str) -> String {
        format!("{}:effect:{key}", self.config.stream)
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

    /// A worker reading this queue. Every live worker in this process gets
    /// a name of its own: the configured consumer name if no live worker
    /// has it, else `<name>-1`, `<name>-2`, … (the lowest free), given back
    /// when the worker is dropped — so a worker made again after another
    /// stopped reads under the same name, with its pending entries.
    pub fn worker(&self) -> Worker {
        let slot = format!(
            "{}\0{}\0{}",
            self.config.stream, self.config.group, self.config.consumer
        );
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

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type Handler = Arc<dyn Fn(&str, JobContext) -> Result<HandlerFuture, BoxError> + Send + Sync>;

#[derive(Debug, Default)]
struct Counters {
    done: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    reclaimed: AtomicU64,
    redis_errors: AtomicU64,
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
    /// Entries moved to the dead-letter stream.
    pub dead: u64,
    /// Entries reclaimed from silent consumers.
    pub reclaimed: u64,
    /// Redis errors survived (the worker waits and goes on).
    pub redis_errors: u64,
    /// Jobs this worker ran but could not finish because its lease had
    /// passed to another worker (which runs the job again).
    pub lost_leases: u64,
}

/// Runs registered handlers on the queue's entries; see the
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
    /// under load the work waits in Redis; as the load falls it runs. Jobs
    /// this worker already holds (its own pending entries after a restart)
    /// are not held back. Under load that never falls, queued jobs wait —
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
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
            lost_leases: c.lost_leases.load(Ordering::Relaxed),
        }
    }

    /// Works until `shutdown` completes: its own pending entries first,
    /// then reclaimed and new ones, one at a time. A job in progress when
    /// `shutdown` completes is finished and acknowledged (or, past
    /// `job_timeout`, aborted as a failed attempt); nothing else is claimed.
    /// Redis errors are logged and survived: the worker waits and
    /// reconnects (and recreates the consumer group if Redis lost it).
    ///
    /// Dropping the returned future instead is a crash: the job in
    /// progress is aborted and stays pending for redelivery.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> WorkerReport {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut own_pending = true;
        let mut cursor = String::from("0-0");
        let mut pause = Duration::from_millis(50);
        // Blocking reads on a connection of this worker's own.
        let mut conn = loop {
            let manager_config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(
                    self.queue
                        .config
                        .block
                        .saturating_add(Duration::from_secs(2)),
                ))
                .set_connection_timeout(Some(Duration::from_secs(2)));
            let connecting =
                ConnectionManager::new_with_config(self.queue.client.clone(), manager_config);
            let connected = tokio::select! {
                biased;
                () = &mut shutdown => return self.report(),
                c = connecting => c,
            };
            match connected {
                Ok(c) => break c,
                Err(e) => {
                    self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
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
                r = self.fetch(&mut conn, &mut own_pending, &mut cursor) => r,
            };
            let result = match fetched {
                Ok(Some(entry)) => self.handle(&mut conn, entry).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => pause = Duration::from_millis(50),
                Err(e) => {
                    self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    super::count("gratify_durable_redis_errors_total");
                    tracing::warn!(error = %e, "durable worker: redis error; retrying");
                    if let DurableError::Redis(r) = &e
                        && r.code() == Some("NOGROUP")
                    {
                        // Redis lost the group (a restart without
                        // persistence, a failover): make it again.
                        let _ = self.queue.ensure_group().await;
                    }
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

    /// Promotes due retries and fetches one entry: its own pending entries
    /// while there are any, then one reclaimed from a silent consumer, then
    /// a new one (blocking up to `block`); with how many times it has been
    /// delivered.
    async fn fetch(
        &self,
        conn: &mut ConnectionManager,
        own_pending: &mut bool,
        cursor: &mut String,
    ) -> Result<Option<(StreamId, usize)>, DurableError> {
        let config = &self.queue.config;
        let _: u64 = redis::Script::new(PROMOTE)
            .key(config.delayed_key())
            .key(&config.stream)
            .arg(0)
            .arg(config.batch)
            .invoke_async(conn)
            .await?;
        if *own_pending {
            let Some(entry) = self.read(conn, "0", None).await? else {
                *own_pending = false;
                return Ok(None);
            };
            // Re-read after a restart: it may be a job that kills its
            // worker, so it counts its deliveries too.
            let delivered = self.deliveries(conn, &entry.id).await?.unwrap_or(1);
            return Ok(Some((entry, delivered)));
        }
        // A dead worker's job is picked up whatever the load (it was taken
        // on already).
        if let Some(claimed) = self.reclaim(conn, cursor).await? {
            return Ok(Some(claimed));
        }
        if self.held_back() {
            // Under load: no new work; look again shortly.
            tokio::time::sleep(config.block.min(Duration::from_millis(200))).await;
            return Ok(None);
        }
        Ok(self
            .read(conn, ">", Some(config.block))
            .await?
            .map(|entry| (entry, 1)))
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Option<StreamId>, DurableError> {
        let config = &self.queue.config;
        // One at a time: a worker claims what it can start now.
        let mut options = StreamReadOptions::default()
            .group(&config.group, &self.consumer)
            .count(1);
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
            .next())
    }

    /// Claims one entry idle past the visibility timeout, with how many
    /// times it was delivered. The scan goes on from where the last one
    /// stopped (`XAUTOCLAIM` looks at a bounded number of pending entries a
    /// call), so an old live entry does not hide a newer dead one.
    async fn reclaim(
        &self,
        conn: &mut ConnectionManager,
        cursor: &mut String,
    ) -> Result<Option<(StreamId, usize)>, DurableError> {
        let config = &self.queue.config;
        let reply: redis::streams::StreamAutoClaimReply = conn
            .xautoclaim_options(
                &config.stream,
                &config.group,
                &self.consumer,
                u64::try_from(config.visibility.as_millis()).unwrap_or(u64::MAX),
                cursor.as_str(),
                StreamAutoClaimOptions::default().count(1),
            )
            .await?;
        *cursor = reply.next_stream_id;
        if !reply.deleted_ids.is_empty() {
            tracing::warn!(
                entries = reply.deleted_ids.len(),
                "durable worker: pending entries deleted from the stream were dropped from the group"
            );
        }
        let Some(entry) = reply.claimed.into_iter().next() else {
            return Ok(None);
        };
        self.stats.reclaimed.fetch_add(1, Ordering::Relaxed);
        super::count("gratify_durable_reclaimed_total");
        let delivered = self.deliveries(conn, &entry.id).await?.unwrap_or(1);
        Ok(Some((entry, delivered)))
    }

    /// How many times an entry pending for the group was delivered.
    async fn deliveries(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
    ) -> Result<Option<usize>, DurableError> {
        let config = &self.queue.config;
        let pending: redis::streams::StreamPendingCountReply = conn
            .xpending_count(&config.stream, &config.group, id, id, 1)
            .await?;
        Ok(pending.ids.first().map(|p| p.times_delivered))
    }

    /// Runs the handler of one entry under its lease, then finishes it.
    async fn handle(
        &self,
        conn: &mut ConnectionManager,
        (entry, delivered): (StreamId, usize),
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
        // Times by Redis's clock: entry ids carry it. When the job was first
        // queued (its first entry's id, carried through retries), and about
        // now (this entry's id: added when it became due).
        let id_ms = entry
            .id
            .split('-')
            .next()
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or(0);
        let enqueued: u64 = field("enqueued").parse().unwrap_or(id_ms);
        let age = Duration::from_millis(id_ms.saturating_sub(enqueued));
        // Deliveries that ended without an answer, on this entry and on the
        // entries that carried the job before it (a job set aside is queued
        // again under a new entry): a job that kills its worker is caught
        // however it comes back.
        let crashed_before: usize = field("crashed").parse().unwrap_or(0);
        let deliveries = crashed_before + delivered;
        let max_deliveries = usize::try_from(config.max_deliveries).unwrap_or(usize::MAX);
        // Set aside without counting an attempt — for a while only: past
        // `unknown_grace` since it was first queued, it counts.
        let set_aside = |delay: Duration, why: String, unknown: bool| {
            if age < config.unknown_grace {
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
        let outcome = if entry.map.is_empty() {
            // Deleted from the stream while pending (trimmed): nothing to
            // run, nothing to keep.
            Outcome::Gone
        } else if deliveries > max_deliveries {
            Outcome::Dead(format!(
                "delivered {deliveries} times without an acknowledgement"
            ))
        } else if let Some(handler) = self.handlers.get(kind.as_str()) {
            let ctx = JobContext {
                key: key.clone(),
                attempt,
                entry: entry.id.clone(),
            };
            let handler = Arc::clone(handler);
            let body = payload.clone();
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
            let renewing = self.renew_while(&entry.id, delivered);
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
                    // Another worker holds the entry now and runs it: stop
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
            super::count("gratify_durable_lost_leases_total");
            tracing::warn!(job = %kind, key = %key, entry = %entry.id, "durable job's lease was lost while it ran; its new holder runs it");
            return Ok(());
        }
        let script = redis::Script::new(FINISH);
        let mut finish = script.prepare_invoke();
        finish
            .key(&config.stream)
            .key(config.delayed_key())
            .key(config.dead_key())
            .arg(&config.group)
            .arg(&self.consumer)
            .arg(&entry.id)
            .arg(delivered);
        // The deliveries of this entry before the one that answers ended
        // without an answer.
        let crashed = crashed_before + delivered.saturating_sub(1);
        let retry_member = |attempt: u32, error: &str| {
            serde_json::json!({
                "type": kind, "payload": payload, "key": key,
                "attempt": attempt, "error": error, "enqueued": enqueued,
                "crashed": crashed,
            })
            .to_string()
        };
        let counter = match &outcome {
            Outcome::Done | Outcome::Gone | Outcome::Lost => {
                finish.arg("ack");
                matches!(outcome, Outcome::Done)
                    .then_some(("gratify_durable_done_total", &self.stats.done))
            }
            Outcome::Failed(error) => {
                tracing::debug!(job = %kind, key = %key, attempt, error = %error, "durable job failed; will retry");
                // Full jitter: anywhere up to the doubling ceiling.
                let ceiling = super::retry_delay(config.backoff, attempt);
                let backoff = ceiling.mul_f64(jitter());
                finish
                    .arg("retry")
                    .arg(retry_member(attempt + 1, error))
                    .arg(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
                Some(("gratify_durable_retried_total", &self.stats.retried))
            }
            Outcome::Later(delay, why) => {
                tracing::debug!(job = %kind, key = %key, attempt, reason = %why, "durable job set aside");
                finish
                    .arg("retry")
                    .arg(retry_member(attempt, why))
                    .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                None
            }
            Outcome::Dead(error) => {
                tracing::warn!(job = %kind, key = %key, attempt, error = %error, "durable job is a dead letter");
                finish
                    .arg("dead")
                    .arg(&kind)
                    .arg(&payload)
                    .arg(&key)
                    .arg(attempt.to_string())
                    .arg(error);
                Some(("gratify_durable_dead_total", &self.stats.dead))
            }
        };
        // The script is safe to repeat: a reply lost on the way is retried
        // (a handler that succeeded is not run again for a blip). A repeat
        // that finds the entry pending for nobody means the first try did
        // it; one that finds another holder means the lease was lost.
        let mut tries = 0;
        let finished = loop {
            tries += 1;
            match finish.invoke_async::<i64>(conn).await {
                Ok(1) => break true,
                Ok(2) if tries > 1 => break true,
                Ok(_) => break false,
                Err(e) if tries < 3 => {
                    tracing::debug!(error = %e, "durable worker: finishing failed; trying again");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if finished {
            if let Some((name, counter)) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
                super::count(name);
            }
        } else {
            // Another worker holds the entry now and runs it again.
            self.stats.lost_leases.fetch_add(1, Ordering::Relaxed);
            super::count("gratify_durable_lost_leases_total");
            tracing::warn!(job = %kind, key = %key, entry = %entry.id, "durable job's lease was lost before it finished; its new holder runs it again");
        }
        Ok(())
    }

    /// Renews this worker's lease on `id` every third of the visibility
    /// timeout (on the queue's shared connection: a renewal never waits
    /// behind this worker's own blocking read); a failed renewal is tried
    /// again within a tenth of it. Returns when the lease is held by another
    /// worker or delivery.
    async fn renew_while(&self, id: &str, delivered: usize) {
        let config = &self.queue.config;
        let every = (config.visibility / 3).max(Duration::from_millis(1));
        let soon = (config.visibility / 10).max(Duration::from_millis(1));
        let mut conn = self.queue.conn.clone();
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            let renewed: Result<i64, RedisError> = redis::Script::new(RENEW)
                .key(&config.stream)
                .arg(&config.group)
                .arg(&self.consumer)
                .arg(id)
                .arg(delivered)
                .invoke_async(&mut conn)
                .await;
            wait = match renewed {
                Ok(1) => every,
                Ok(_) => return,
                Err(e) => {
                    self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(entry = %id, error = %e, "durable job's lease could not be renewed");
                    soon
                }
            };
        }
    }
}
