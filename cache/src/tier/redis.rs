//! [`RedisTier`]: the shared tier on Redis, through redis-rs.
//!
//! One multiplexed [`ConnectionManager`] carries the commands and, over
//! RESP3, the invalidation channel. redis-rs was chosen over fred for its
//! failure behaviour where it matters here: the manager connects lazily (a
//! Redis that is down never hangs start-up), gives every connection attempt
//! and every response a timeout, reconnects on its own and re-subscribes
//! after a reconnect, telling us through the push channel — which is when
//! the cache drops its L1. The workspace already uses redis-rs for durable
//! jobs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gratify_core::BoxError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushKind, Value};
use tokio::sync::mpsc;

use super::{BoxFuture, SharedTier, TierEvent};

/// The shared tier on Redis (RESP3, Redis 6 or newer).
///
/// ```no_run
/// use gratify_cache::tier::redis::RedisTier;
/// use gratify_cache::tier::TierConfig;
/// use gratify_cache::{HttpCacheConfig, HttpCacheLayer};
///
/// let tier = RedisTier::open("redis://127.0.0.1:6379").unwrap();
/// let cache = HttpCacheLayer::new(HttpCacheConfig::default())
///     .with_tier(tier, TierConfig::new("shop:cache"));
/// ```
#[derive(Clone)]
pub struct RedisTier {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    manager: OnceLock<Result<ConnectionManager, String>>,
    events: std::sync::Mutex<Option<mpsc::UnboundedReceiver<redis::PushInfo>>>,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier").finish_non_exhaustive()
    }
}

impl RedisTier {
    /// A tier on the Redis at `url` (`redis://host:port/db`). RESP3 is
    /// requested in the URL if it does not say. Nothing connects until the
    /// first use, from inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// The URL does not parse.
    pub fn open(url: &str) -> Result<Self, redis::RedisError> {
        let url = if url.contains("protocol=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&protocol=resp3")
        } else {
            format!("{url}?protocol=resp3")
        };
        let client = redis::Client::open(url)?;
        let (pushes, events) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                manager: OnceLock::new(),
                events: std::sync::Mutex::new(Some(events)),
                pushes,
            }),
        })
    }

    fn manager(&self) -> Result<ConnectionManager, BoxError> {
        let result = self.inner.manager.get_or_init(|| {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(Some(Duration::from_secs(1)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200))
                .set_push_sender(self.inner.pushes.clone())
                .set_automatic_resubscription();
            ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
                .map_err(|e| e.to_string())
        });
        result.clone().map_err(Into::into)
    }
}

impl SharedTier for RedisTier {
    fn get(&self, key: String) -> BoxFuture<Result<Option<Bytes>, BoxError>> {
        let manager = self.manager();
        Box::pin(async move {
            let mut conn = manager?;
            let value: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn set(&self, key: String, value: Bytes, ttl: Duration) -> BoxFuture<Result<(), BoxError>> {
        let manager = self.manager();
        Box::pin(async move {
            let mut conn = manager?;
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let () = redis::cmd("SET")
                .arg(key)
                .arg(&value[..])
                .arg("PX")
                .arg(ms)
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn delete(&self, key: String) -> BoxFuture<Result<(), BoxError>> {
        let manager = self.manager();
        Box::pin(async move {
            let mut conn = manager?;
            let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
            Ok(())
        })
    }

    fn publish(&self, channel: String, message: Bytes) -> BoxFuture<Result<(), BoxError>> {
        let manager = self.manager();
        Box::pin(async move {
            let mut conn = manager?;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(&message[..])
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn add_barrier(
        &self,
        key: String,
        member: String,
        at_ms: u64,
        keep: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        let manager = self.manager();
        Box::pin(async move {
            let mut conn = manager?;
            let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
            let () = redis::pipe()
                .atomic()
                .cmd("ZADD")
                .arg(&key)
                .arg("GT")
                .arg(at_ms)
                .arg(&member)
                .ignore()
                .cmd("ZADD")
                .arg(&key)
                .arg("NX")
                .arg(at_ms)
                .arg(&member)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(at_ms.saturating_sub(keep_ms))
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(keep_ms)
                .ignore()
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn barriers(&self, key: String) -> BoxFuture<Result<Vec<(String, u64)>, BoxError>> {
        let manager = self.manager();
        Box::pin(async move {
            let mut conn = manager?;
            let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            Ok(members
                .into_iter()
                .map(|(m, at)| (m, at.max(0.0) as u64))
                .collect())
        })
    }

    fn subscribe(&self, channel: String) -> mpsc::Receiver<TierEvent> {
        let (tx, rx) = mpsc::channel(1024);
        let pushes = self.inner.events.lock().ok().and_then(|mut e| e.take());
        let Some(mut pushes) = pushes else {
            // Subscribed once already: this receiver stays silent.
            return rx;
        };
        let tier = self.clone();
        tokio::spawn(async move {
            // Subscribe (retrying until Redis answers), then keep the
            // connection exercised so that a dead one is noticed, reconnected
            // and re-subscribed even when no request needs Redis.
            let mut subscribed = false;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    push = pushes.recv() => {
                        let Some(push) = push else { break };
                        let event = match push.kind {
                            PushKind::Subscribe => Some(TierEvent::Resubscribed),
                            PushKind::Message => message_payload(&push.data).map(TierEvent::Message),
                            _ => None,
                        };
                        if let Some(event) = event
                            && tx.send(event).await.is_err()
                        {
                            break;
                        }
                    }
                    _ = tick.tick() => {
                        if tx.is_closed() {
                            break;
                        }
                        let Ok(mut conn) = tier.manager() else { continue };
                        if subscribed {
                            let _: Result<Value, _> =
                                redis::cmd("PING").query_async(&mut conn).await;
                        } else {
                            subscribed = conn.subscribe(&channel).await.is_ok();
                        }
                    }
                }
            }
        });
        rx
    }
}

/// The payload of a pub/sub message push: `[channel, payload]`.
fn message_payload(data: &[Value]) -> Option<Bytes> {
    match data.get(1)? {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}
