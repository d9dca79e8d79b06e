//! The Redis Streams backend: a stream read by a consumer group, a sorted
//! set of delayed retries, a dead-letter stream, effect records as keys.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, RedisError, Value};

use super::{Claimed, Counters, Delivery, DurableConfig, DurableError, Finish, Lease, Lookout};

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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The queue's side: enqueueing, effects, counts, lease renewals — on one
/// shared connection that never carries a blocking command.
#[derive(Clone)]
pub(super) struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
}

impl RedisQueue {
    pub(super) async fn connect(
        client: redis::Client,
        config: &DurableConfig,
    ) -> Result<Self, DurableError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
        let queue = Self { client, conn };
        queue.ensure_group(config).await?;
        Ok(queue)
    }

    async fn ensure_group(&self, config: &DurableConfig) -> Result<(), DurableError> {
        let mut conn = self.conn.clone();
        let created: Result<(), RedisError> = conn
            .xgroup_create_mkstream(&config.stream, &config.group, "0")
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn enqueue(
        &self,
        config: &DurableConfig,
        kind: &str,
        payload: &str,
        key: &str,
    ) -> Result<(), DurableError> {
        let mut conn = self.conn.clone();
        let _: String = conn
            .xadd(
                &config.stream,
                "*",
                &[
                    ("type", kind),
                    ("payload", payload),
                    ("key", key),
                    ("attempt", "1"),
                    ("error", ""),
                ],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn first_time(
        &self,
        config: &DurableConfig,
        key: &str,
        ttl: Duration,
    ) -> Result<bool, DurableError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{}:once:{key}", config.stream))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1))
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    fn effect_key(config: &DurableConfig, key: &str) -> String {
        format!("{}:effect:{key}", config.stream)
    }

    pub(super) async fn claim_effect(
        &self,
        config: &DurableConfig,
        key: &str,
        token: &str,
        lease: Duration,
    ) -> Result<Claimed, DurableError> {
        let mut conn = self.conn.clone();
        let reply: (i64, String) = redis::Script::new(CLAIM_EFFECT)
            .key(Self::effect_key(config, key))
            .arg(token)
            .arg(millis(lease).max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply.0 {
            1 => Claimed::Yes,
            2 => Claimed::Done(reply.1),
            _ => Claimed::InProgress(Duration::from_millis(
                reply.1.parse::<u64>().unwrap_or(1000).max(1),
            )),
        })
    }

    pub(super) async fn effect_done(
        &self,
        config: &DurableConfig,
        key: &str,
        token: &str,
        result: &str,
        keep: Duration,
    ) -> Result<bool, DurableError> {
        let mut conn = self.conn.clone();
        let recorded: i64 = redis::Script::new(EFFECT_DONE)
            .key(Self::effect_key(config, key))
            .arg(token)
            .arg(result)
            .arg(millis(keep).max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(recorded == 1)
    }

    pub(super) async fn effect_release(
        &self,
        config: &DurableConfig,
        key: &str,
        token: &str,
    ) -> Result<(), DurableError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::Script::new(EFFECT_RELEASE)
            .key(Self::effect_key(config, key))
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    pub(super) async fn dead_letters(&self, config: &DurableConfig) -> Result<usize, DurableError> {
        let mut conn = self.conn.clone();
        Ok(conn.xlen(config.dead_key()).await?)
    }

    pub(super) async fn pending(&self, config: &DurableConfig) -> Result<usize, DurableError> {
        let mut conn = self.conn.clone();
        let reply: Value = redis::cmd("XPENDING")
            .arg(&config.stream)
            .arg(&config.group)
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

    /// Renews `consumer`'s lease on a delivery (on the shared connection: a
    /// renewal never waits behind the worker's own blocking read): whether
    /// it still held it.
    pub(super) async fn renew(
        &self,
        config: &DurableConfig,
        consumer: &str,
        delivery: &Delivery,
    ) -> Result<bool, DurableError> {
        // Refutable when both backends are built.
        #[allow(irrefutable_let_patterns)]
        let Lease::Redis { delivered, .. } = delivery.lease else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let renewed: i64 = redis::Script::new(RENEW)
            .key(&config.stream)
            .arg(&config.group)
            .arg(consumer)
            .arg(&delivery.id)
            .arg(delivered)
            .invoke_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }
}

/// A worker's side: blocking reads on a connection of its own, where it
/// left off reading.
pub(super) struct RedisWorker {
    queue: RedisQueue,
    conn: ConnectionManager,
    /// Whether its own pending entries (after a restart or a reconnect)
    /// may remain.
    own_pending: bool,
    /// Where the scan for entries of silent consumers goes on.
    cursor: String,
    /// When to move due retries back onto the stream next.
    promote: Lookout,
    /// When to look for entries of silent consumers next.
    reclaim: Lookout,
    /// When that scan next starts again from the oldest entry.
    rescan: Lookout,
}

/// How often a busy worker moves due retries back onto the stream (one
/// about to wait for new entries does so first).
const PROMOTE_EVERY: Duration = Duration::from_millis(50);

impl RedisWorker {
    pub(super) async fn connect(
        queue: &RedisQueue,
        config: &DurableConfig,
    ) -> Result<Self, DurableError> {
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.block.saturating_add(Duration::from_secs(2))))
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(queue.client.clone(), manager_config).await?;
        Ok(Self {
            queue: queue.clone(),
            conn,
            own_pending: true,
            cursor: String::from("0-0"),
            promote: Lookout::new(PROMOTE_EVERY),
            reclaim: Lookout::for_leases(config),
            rescan: Lookout::for_leases(config),
        })
    }

    /// After an error: read its own pending entries again, and make the
    /// group again if Redis lost it (a restart without persistence, a
    /// failover).
    pub(super) async fn recover(&mut self, config: &DurableConfig, error: &DurableError) {
        self.own_pending = true;
        if let DurableError::Redis(r) = error
            && r.code() == Some("NOGROUP")
        {
            let _ = self.queue.ensure_group(config).await;
        }
    }

    /// Promotes due retries and fetches one entry: its own pending entries
    /// while there are any, then one reclaimed from a silent consumer, then
    /// (unless `held_back`) a new one, blocking up to `block`.
    pub(super) async fn fetch(
        &mut self,
        config: &DurableConfig,
        consumer: &str,
        stats: &Counters,
        held_back: impl Fn() -> bool,
    ) -> Result<Option<Delivery>, DurableError> {
        let mut promoted = false;
        if self.promote.due() {
            self.promote_due_retries(config).await?;
            promoted = true;
        }
        if self.own_pending {
            let Some(entry) = self.read(config, consumer, "0", None).await? else {
                self.own_pending = false;
                return Ok(None);
            };
            // Re-read after a restart: it may be a job that kills its
            // worker, so it counts its deliveries too.
            let delivered = self.deliveries(config, &entry.id).await?.unwrap_or(1);
            return Ok(Some(delivery(entry, delivered)));
        }
        // A dead worker's job is picked up whatever the load (it was taken
        // on already).
        if self.reclaim.due()
            && let Some((entry, delivered)) = {
                if self.rescan.due() {
                    // Now and then the scan starts again from the oldest
                    // pending entry: one that only ever went on could chase
                    // newer entries past a dead one for as long as more
                    // arrive.
                    self.cursor = String::from("0-0");
                    self.rescan.looked(false);
                }
                self.reclaim(config, consumer).await?
            }
        {
            stats
                .reclaimed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            super::super::count(gratify_core::telemetry::DURABLE_RECLAIMED_TOTAL.name);
            return Ok(Some(delivery(entry, delivered)));
        }
        if held_back() {
            // Under load: no new work; look again shortly.
            tokio::time::sleep(config.block.min(Duration::from_millis(200))).await;
            return Ok(None);
        }
        if !promoted {
            // Before waiting for new entries, retries that fell due since
            // the last promotion go back onto the stream: `block` bounds
            // how late a due retry is noticed.
            if let Some(entry) = self.read(config, consumer, ">", None).await? {
                return Ok(Some(delivery(entry, 1)));
            }
            self.promote_due_retries(config).await?;
        }
        Ok(self
            .read(config, consumer, ">", Some(config.block))
            .await?
            .map(|entry| delivery(entry, 1)))
    }

    /// Moves retries that fell due back onto the stream.
    async fn promote_due_retries(&mut self, config: &DurableConfig) -> Result<(), DurableError> {
        let moved: u64 = redis::Script::new(PROMOTE)
            .key(config.delayed_key())
            .key(&config.stream)
            .arg(0)
            .arg(config.batch)
            .invoke_async(&mut self.conn)
            .await?;
        // A full batch: more may be due.
        self.promote
            .looked(usize::try_from(moved).unwrap_or(usize::MAX) >= config.batch);
        Ok(())
    }

    async fn read(
        &mut self,
        config: &DurableConfig,
        consumer: &str,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Option<StreamId>, DurableError> {
        // One at a time: a worker claims what it can start now.
        let mut options = StreamReadOptions::default()
            .group(&config.group, consumer)
            .count(1);
        if let Some(block) = block {
            options = options.block(usize::try_from(block.as_millis()).unwrap_or(usize::MAX));
        }
        let reply: Option<StreamReadReply> = self
            .conn
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
        &mut self,
        config: &DurableConfig,
        consumer: &str,
    ) -> Result<Option<(StreamId, usize)>, DurableError> {
        let reply: redis::streams::StreamAutoClaimReply = self
            .conn
            .xautoclaim_options(
                &config.stream,
                &config.group,
                consumer,
                millis(config.visibility),
                self.cursor.as_str(),
                StreamAutoClaimOptions::default().count(1),
            )
            .await?;
        self.cursor = reply.next_stream_id;
        // Found one, or the scan of the pending entries is not over: look
        // again at once.
        self.reclaim
            .looked(!reply.claimed.is_empty() || self.cursor != "0-0");
        if !reply.deleted_ids.is_empty() {
            tracing::warn!(
                entries = reply.deleted_ids.len(),
                "durable worker: pending entries deleted from the stream were dropped from the group"
            );
        }
        let Some(entry) = reply.claimed.into_iter().next() else {
            return Ok(None);
        };
        let delivered = self.deliveries(config, &entry.id).await?.unwrap_or(1);
        Ok(Some((entry, delivered)))
    }

    /// How many times an entry pending for the group was delivered.
    async fn deliveries(
        &mut self,
        config: &DurableConfig,
        id: &str,
    ) -> Result<Option<usize>, DurableError> {
        let pending: redis::streams::StreamPendingCountReply = self
            .conn
            .xpending_count(&config.stream, &config.group, id, id, 1)
            .await?;
        Ok(pending.ids.first().map(|p| p.times_delivered))
    }

    /// Finishes a delivery as asked, if `consumer` still holds it: 1, 0
    /// when another consumer or delivery holds it, 2 when it is pending for
    /// nobody. Safe to repeat.
    pub(super) async fn finish(
        &mut self,
        config: &DurableConfig,
        consumer: &str,
        delivery: &Delivery,
        finish: &Finish<'_>,
    ) -> Result<i64, DurableError> {
        // Refutable when both backends are built.
        #[allow(irrefutable_let_patterns)]
        let Lease::Redis {
            delivered,
            enqueued,
            crashed_before,
        } = delivery.lease
        else {
            return Ok(0);
        };
        let script = redis::Script::new(FINISH);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&config.stream)
            .key(config.delayed_key())
            .key(config.dead_key())
            .arg(&config.group)
            .arg(consumer)
            .arg(&delivery.id)
            .arg(delivered);
        // The deliveries of this entry before the one that answers ended
        // without an answer: carried with the job into its next entry.
        let crashed = crashed_before + delivered.saturating_sub(1);
        match finish {
            Finish::Ack => {
                invocation.arg("ack");
            }
            Finish::Retry {
                attempt,
                error,
                delay,
            } => {
                let member = serde_json::json!({
                    "type": delivery.kind, "payload": delivery.payload, "key": delivery.key,
                    "attempt": attempt, "error": error, "enqueued": enqueued,
                    "crashed": crashed,
                })
                .to_string();
                invocation.arg("retry").arg(member).arg(millis(*delay));
            }
            Finish::Dead { attempt, error } => {
                invocation
                    .arg("dead")
                    .arg(&delivery.kind)
                    .arg(&delivery.payload)
                    .arg(&delivery.key)
                    .arg(attempt.to_string())
                    .arg(*error);
            }
        }
        Ok(invocation.invoke_async::<i64>(&mut self.conn).await?)
    }
}

/// A stream entry as a delivery.
fn delivery(entry: StreamId, delivered: usize) -> Delivery {
    let field = |name: &str| -> String {
        match entry.map.get(name) {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        }
    };
    // Times by Redis's clock: entry ids carry it. When the job was first
    // queued (its first entry's id, carried through retries), and about now
    // (this entry's id: added when it became due).
    let id_ms = entry
        .id
        .split('-')
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(0);
    let enqueued: u64 = field("enqueued").parse().unwrap_or(id_ms);
    // Deliveries that ended without an answer, on this entry and on the
    // entries that carried the job before it (a job set aside is queued
    // again under a new entry): a job that kills its worker is caught
    // however it comes back.
    let crashed_before: usize = field("crashed").parse().unwrap_or(0);
    Delivery {
        kind: field("type"),
        payload: field("payload"),
        key: field("key"),
        attempt: field("attempt").parse().unwrap_or(1).max(1),
        deliveries: crashed_before + delivered,
        age: Duration::from_millis(id_ms.saturating_sub(enqueued)),
        // Deleted from the stream while pending (trimmed).
        gone: entry.map.is_empty(),
        lease: Lease::Redis {
            delivered,
            enqueued,
            crashed_before,
        },
        id: entry.id,
    }
}
