//! A shared second tier under the in-process cache, with cross-replica
//! invalidation.
//!
//! A service running as N replicas has N in-process (L1) caches. Give each
//! replica's [`HttpCacheLayer`](crate::HttpCacheLayer) the same
//! [`SharedTier`] — Redis, with the `redis` feature's
//! [`RedisTier`](redis::RedisTier) — and:
//!
//! - a miss in L1 asks the tier (with a soft timeout, 5 ms by default) before
//!   the origin; a tier hit fills L1;
//! - a stored response is written to the tier in the background, never
//!   delaying the response, through a bounded queue (a full queue drops the
//!   write: it is a cache);
//! - every invalidation — a purge by key, prefix or tag, purge-all, an unsafe
//!   method, a newer response stored — is published as a short message on
//!   the tier's channel, and every other replica evicts its L1 copy;
//! - prefix, tag and purge-all invalidations also set a *barrier*: an entry
//!   read from the tier that was stored before a barrier covering it is a
//!   miss, so no index of keys by tag is needed;
//! - the channel is at-most-once: when the subscription is re-established a
//!   replica drops its whole L1 (it may have missed invalidations), and L1
//!   lifetimes are the last safety net;
//! - a circuit breaker stops asking the tier after repeated failures or
//!   timeouts, for a backoff, then lets one request try again: nothing fails
//!   because the tier does — requests are served from L1 and the origin.
//!
//! Entries travel in a versioned envelope; one that does not decode (another
//! version, garbage) is a miss. With the `hmac` feature (on with `redis`),
//! [`TierConfig::sign_with`] signs them, and a replica refuses what it cannot
//! verify.
//!
//! [`TierStats`] (from [`CachePurge::tier_stats`](crate::CachePurge::tier_stats))
//! counts hits, misses, errors, skipped reads and dropped writes; with the
//! `metrics` feature they are also counters `gratify_cache_tier_hits_total`,
//! `_misses_total`, `_errors_total`, `_skipped_total`,
//! `_dropped_writes_total`, `_invalidations_total`, `_resubscribed_total`,
//! and a gauge `gratify_cache_tier_breaker_open`.

mod envelope;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gratify_core::BoxError;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::entry::Entry;

pub(crate) use self::envelope::Decoded;

/// A boxed, sendable future, as the methods of [`SharedTier`] return (the
/// one of `gratify-core`).
pub use gratify_core::BoxFuture;

/// What a replica hears on the tier's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierEvent {
    /// A message another replica (or this one) published.
    Message(Bytes),
    /// The subscription was (re-)established: messages may have been lost
    /// while it was down.
    Resubscribed,
}

/// A shared store with a broadcast channel: the small interface the cache
/// needs from Redis (or anything else).
///
/// Every method may fail; the cache treats a failure as a miss (or a lost
/// write) and counts it towards its circuit breaker. Implementations should
/// fail fast rather than wait: the cache also bounds each call by its soft
/// timeout.
pub trait SharedTier: Send + Sync + 'static {
    /// The value under `key`, if any.
    fn get(&self, key: String) -> BoxFuture<Result<Option<Bytes>, BoxError>>;
    /// Stores `value` under `key` for `ttl`.
    fn set(&self, key: String, value: Bytes, ttl: Duration) -> BoxFuture<Result<(), BoxError>>;
    /// Removes `key`.
    fn delete(&self, key: String) -> BoxFuture<Result<(), BoxError>>;
    /// Publishes `message` on `channel` to every subscriber.
    fn publish(&self, channel: String, message: Bytes) -> BoxFuture<Result<(), BoxError>>;
    /// A stream of what is published on `channel`, with a
    /// [`TierEvent::Resubscribed`] each time the subscription is
    /// (re-)established. It ends when the tier is dropped. Called once.
    fn subscribe(&self, channel: String) -> mpsc::Receiver<TierEvent>;
    /// Records in the set `key` that `member` was invalidated at `at_ms`
    /// (wall milliseconds), forgetting members older than `keep`.
    fn add_barrier(
        &self,
        key: String,
        member: String,
        at_ms: u64,
        keep: Duration,
    ) -> BoxFuture<Result<(), BoxError>>;
    /// Every member of the set `key` with its time.
    fn barriers(&self, key: String) -> BoxFuture<Result<Vec<(String, u64)>, BoxError>>;
}

/// The settings of a shared tier.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TierConfig {
    /// Prefix of every key and the channel name (`<namespace>:invalidate`).
    pub namespace: String,
    /// How long a request waits for the tier before going to the origin.
    pub soft_timeout: Duration,
    /// Writes (and invalidations) waiting to be sent; more are dropped.
    pub write_queue: usize,
    /// Consecutive failures (errors or timeouts) that open the breaker.
    pub breaker_failures: u32,
    /// How long an open breaker stops asking the tier; doubled on each
    /// failed retry, up to [`breaker_max_backoff`](Self::breaker_max_backoff).
    pub breaker_backoff: Duration,
    /// The longest backoff.
    pub breaker_max_backoff: Duration,
    /// The longest a tier entry is kept, whatever its freshness (Redis TTL).
    pub max_ttl: Duration,
    /// Sign every entry with HMAC-SHA256 under this key and refuse (as a
    /// miss) entries whose signature does not verify: a writer without the
    /// key cannot poison the replicas. All replicas need the same key.
    #[cfg(feature = "hmac")]
    #[cfg_attr(docsrs, doc(cfg(feature = "hmac")))]
    pub hmac_key: Option<Arc<[u8]>>,
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            namespace: "gratify:cache".into(),
            soft_timeout: Duration::from_millis(5),
            write_queue: 1024,
            breaker_failures: 3,
            breaker_backoff: Duration::from_millis(500),
            breaker_max_backoff: Duration::from_secs(10),
            max_ttl: Duration::from_secs(24 * 3600),
            #[cfg(feature = "hmac")]
            hmac_key: None,
        }
    }
}

impl TierConfig {
    /// The default settings under `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            ..Self::default()
        }
    }

    /// Sets the soft timeout of a read.
    #[must_use]
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = timeout;
        self
    }

    /// Signs entries with HMAC-SHA256 under `key` (see
    /// [`hmac_key`](Self::hmac_key)).
    #[cfg(feature = "hmac")]
    #[cfg_attr(docsrs, doc(cfg(feature = "hmac")))]
    #[must_use]
    pub fn sign_with(mut self, key: impl AsRef<[u8]>) -> Self {
        self.hmac_key = Some(Arc::from(key.as_ref()));
        self
    }

    /// Appends the signature, when signing.
    fn seal(&self, envelope: Bytes) -> Bytes {
        #[cfg(feature = "hmac")]
        if let Some(key) = &self.hmac_key {
            use hmac::Mac;
            if let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) {
                mac.update(&envelope);
                let tag = mac.finalize().into_bytes();
                let mut out = bytes::BytesMut::with_capacity(envelope.len() + tag.len());
                out.extend_from_slice(&envelope);
                out.extend_from_slice(&tag);
                return out.freeze();
            }
        }
        envelope
    }

    /// Checks and strips the signature, when signing; `None` if it does not
    /// verify (compared in constant time).
    fn open(&self, value: Bytes) -> Option<Bytes> {
        #[cfg(feature = "hmac")]
        if let Some(key) = &self.hmac_key {
            use hmac::Mac;
            let split = value.len().checked_sub(32)?;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).ok()?;
            mac.update(&value[..split]);
            mac.verify_slice(&value[split..]).ok()?;
            return Some(value.slice(..split));
        }
        Some(value)
    }
}

/// Counters of a shared tier, for tests, dashboards and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierStats {
    /// Reads answered by the tier with a usable entry.
    pub hits: u64,
    /// Reads the tier answered with nothing usable (absent, undecodable, or
    /// behind a barrier).
    pub misses: u64,
    /// Reads and writes that failed or timed out.
    pub errors: u64,
    /// Reads not attempted because the breaker was open.
    pub skipped: u64,
    /// Writes dropped because the queue was full.
    pub dropped_writes: u64,
    /// Invalidations received from other replicas and applied to L1.
    pub invalidations: u64,
    /// Times the subscription was re-established (and L1 dropped).
    pub resubscribed: u64,
    /// Whether the breaker is open now.
    pub breaker_open: bool,
    /// Whether the tier is trusted: subscribed, with the barriers others set
    /// loaded. Until then reads skip it (they count as `skipped`).
    pub ready: bool,
}

/// What an invalidation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    Key(String),
    Prefix(String),
    Tag(String),
    All,
}

impl Scope {
    /// `<sender> <wall ms> <k|p|t|a> [<text>]`
    fn message(&self, sender: u64, at_ms: u64) -> Bytes {
        let (op, text) = match self {
            Self::Key(k) => ("k", k.as_str()),
            Self::Prefix(p) => ("p", p.as_str()),
            Self::Tag(t) => ("t", t.as_str()),
            Self::All => ("a", ""),
        };
        Bytes::from(format!("{sender:016x} {at_ms} {op} {text}"))
    }

    /// Its name in the barrier set (`None` for a key: keys are deleted).
    fn member(&self) -> Option<String> {
        match self {
            Self::Key(_) => None,
            Self::Prefix(p) => Some(format!("p:{p}")),
            Self::Tag(t) => Some(format!("t:{t}")),
            Self::All => Some("a".into()),
        }
    }

    fn of_member(member: &str) -> Option<Self> {
        if member == "a" {
            return Some(Self::All);
        }
        let (kind, text) = member.split_once(':')?;
        match kind {
            "p" => Some(Self::Prefix(text.to_owned())),
            "t" => Some(Self::Tag(text.to_owned())),
            _ => None,
        }
    }

    fn parse(message: &[u8]) -> Option<(u64, u64, Self)> {
        let text = std::str::from_utf8(message).ok()?;
        let mut parts = text.splitn(4, ' ');
        let sender = u64::from_str_radix(parts.next()?, 16).ok()?;
        let at_ms = parts.next()?.parse().ok()?;
        let op = parts.next()?;
        let rest = parts.next().unwrap_or("").to_owned();
        let scope = match op {
            "k" if !rest.is_empty() => Self::Key(rest),
            "p" if !rest.is_empty() => Self::Prefix(rest),
            "t" if !rest.is_empty() => Self::Tag(rest),
            "a" => Self::All,
            _ => return None,
        };
        Some((sender, at_ms, scope))
    }
}

/// Prefix, tag and purge-all barriers (wall ms): a tier entry stored at or
/// before a barrier that covers it is stale.
///
/// Bounded: a barrier older than the tier's longest entry life (`keep_ms`,
/// [`TierConfig::max_ttl`]) and [`LINGER_MS`] covers no entry that can still
/// exist and is forgotten; past [`MAX_BARRIERS`] prefixes and tags (a purge
/// loop over made-up prefixes), the older half fold into the purge-all
/// barrier at the newest of them — more misses, never a stale entry.
#[derive(Debug, Default)]
struct Barriers {
    all: u64,
    prefixes: Vec<(String, u64)>,
    tags: HashMap<String, u64>,
    /// How long a barrier matters (ms); 0: for ever.
    keep_ms: u64,
}

/// The most prefix and tag barriers kept apart.
const MAX_BARRIERS: usize = 4096;

/// The clock skew between replicas the tier tolerates (ms).
const SKEW_MS: u64 = 60_000;

/// How much longer than the longest entry life a barrier is kept (ms): the
/// skew, and the time a queued write may take to reach the tier, whose
/// entry then lives its full life from there.
const LINGER_MS: u64 = SKEW_MS + 10 * 60_000;

impl Barriers {
    fn new(keep: Duration) -> Self {
        Self {
            keep_ms: u64::try_from(keep.as_millis()).unwrap_or(u64::MAX),
            ..Self::default()
        }
    }

    /// Raises the barrier of `scope` to `at_ms`, at wall time `now_ms`.
    fn raise(&mut self, scope: &Scope, at_ms: u64, now_ms: u64) {
        // A barrier from a clock ahead of ours counts from our now plus the
        // skew the tier tolerates (entries dated later are refused anyway),
        // so that one fast clock cannot make every new entry stale.
        let at_ms = at_ms.min(now_ms.saturating_add(SKEW_MS));
        match scope {
            // A key's purge deletes its entry; it leaves no barrier.
            Scope::Key(_) => return,
            Scope::All => {
                self.all = self.all.max(at_ms);
                return;
            }
            Scope::Tag(t) => {
                let b = self.tags.entry(t.clone()).or_default();
                *b = (*b).max(at_ms);
            }
            Scope::Prefix(p) => match self.prefixes.iter_mut().find(|(q, _)| q == p) {
                Some((_, b)) => *b = (*b).max(at_ms),
                None => self.prefixes.push((p.clone(), at_ms)),
            },
        }
        if self.keep_ms > 0 {
            let cutoff = now_ms.saturating_sub(self.keep_ms.saturating_add(LINGER_MS));
            self.prefixes.retain(|(_, b)| *b >= cutoff);
            self.tags.retain(|_, b| *b >= cutoff);
        }
        if self.prefixes.len() + self.tags.len() > MAX_BARRIERS {
            // The older half folds into the purge-all barrier at the newest
            // of them: everything they covered stays covered.
            let mut times: Vec<u64> = self
                .prefixes
                .iter()
                .map(|(_, b)| *b)
                .chain(self.tags.values().copied())
                .collect();
            times.sort_unstable();
            let fold_to = times[times.len() / 2];
            self.all = self.all.max(fold_to);
            self.prefixes.retain(|(_, b)| *b > fold_to);
            self.tags.retain(|_, b| *b > fold_to);
            tracing::warn!(
                kept = self.prefixes.len() + self.tags.len(),
                "more than {MAX_BARRIERS} prefix and tag purges within the tier's entry life: the older half now purge everything stored before them"
            );
        }
    }

    fn covers(&self, key: &str, tags: &[String], stored_ms: u64) -> bool {
        stored_ms <= self.all
            || self
                .prefixes
                .iter()
                .any(|(p, b)| stored_ms <= *b && key.starts_with(p.as_str()))
            || tags
                .iter()
                .any(|t| self.tags.get(t).is_some_and(|b| stored_ms <= *b))
    }
}

enum Write {
    Set(String, Bytes, Duration),
    Delete(String),
    Publish(Bytes),
    Barrier(String, u64),
}

/// Stops asking a failing tier for a while.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    /// Until when it is open (ms since `epoch`), 0 when closed.
    open_until: AtomicU64,
    /// The current backoff (ms).
    backoff: AtomicU64,
    /// A trial request is in flight while half-open.
    trial: AtomicBool,
}

/// The tier as the store uses it: breaker, timeouts, write queue, barriers.
pub(crate) struct Tier {
    backend: Arc<dyn SharedTier>,
    config: TierConfig,
    id: u64,
    epoch: Instant,
    breaker: Breaker,
    barriers: Mutex<Barriers>,
    writes: Mutex<Option<mpsc::Sender<Write>>>,
    started: AtomicBool,
    /// Whether the barriers set by others have been loaded since the last
    /// (re-)subscription: until then the tier's entries are not trusted.
    loaded: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    skipped: AtomicU64,
    dropped_writes: AtomicU64,
    invalidations: AtomicU64,
    resubscribed: AtomicU64,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tier")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Counts one event on `counter` and, with the `metrics` feature, on the
/// `metrics` counter `name`.
fn count(counter: &AtomicU64, #[allow(unused_variables)] name: &'static str) {
    counter.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "metrics")]
    metrics::counter!(name).increment(1);
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn wall_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// What the store does when another replica invalidates something.
pub(crate) trait Evict: Send + Sync + 'static {
    fn evict(&self, scope: &Scope) -> BoxFuture<()>;
}

impl Tier {
    pub(crate) fn new(backend: Arc<dyn SharedTier>, config: TierConfig) -> Self {
        // A replica id that differs between processes and between tiers.
        let id = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            h.write_u32(std::process::id());
            h.finish()
        };
        let barriers = Mutex::new(Barriers::new(config.max_ttl));
        Self {
            backend,
            config,
            id,
            epoch: Instant::now(),
            breaker: Breaker::default(),
            barriers,
            writes: Mutex::new(None),
            started: AtomicBool::new(false),
            loaded: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            dropped_writes: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            resubscribed: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> TierStats {
        TierStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            dropped_writes: self.dropped_writes.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            resubscribed: self.resubscribed.load(Ordering::Relaxed),
            breaker_open: self.breaker.open_until.load(Ordering::Relaxed) > 0,
            ready: self.loaded.load(Ordering::Acquire),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}:e:{key}", self.config.namespace)
    }

    fn channel(&self) -> String {
        format!("{}:invalidate", self.config.namespace)
    }

    fn barrier_set(&self) -> String {
        format!("{}:barriers", self.config.namespace)
    }

    /// Loads the barriers others set (after a (re-)subscription), retrying
    /// until the tier answers; then trusts the tier's entries again.
    async fn load_barriers(&self) {
        let mut wait = Duration::from_millis(50);
        loop {
            let call = self.backend.barriers(self.barrier_set());
            if let Ok(Ok(members)) = tokio::time::timeout(Duration::from_secs(1), call).await {
                if let Ok(mut b) = self.barriers.lock() {
                    for (member, at_ms) in members {
                        if let Some(scope) = Scope::of_member(&member) {
                            b.raise(&scope, at_ms, wall_ms());
                        }
                    }
                }
                self.loaded.store(true, Ordering::Release);
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    pub(crate) fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Starts the writer and the listener (once, from inside a runtime).
    pub(crate) fn start(self: &Arc<Self>, evict: Arc<dyn Evict>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            // Not in a runtime yet: try again on the next use.
            self.started.store(false, Ordering::Release);
            return;
        }
        let (tx, mut rx) = mpsc::channel::<Write>(self.config.write_queue.max(1));
        if let Ok(mut w) = self.writes.lock() {
            *w = Some(tx);
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(write) = rx.recv().await {
                let Some(tier) = weak.upgrade() else { break };
                let call = match write {
                    Write::Set(k, v, ttl) => tier.backend.set(k, v, ttl),
                    Write::Delete(k) => tier.backend.delete(k),
                    Write::Publish(m) => tier.backend.publish(tier.channel(), m),
                    Write::Barrier(member, at) => tier.backend.add_barrier(
                        tier.barrier_set(),
                        member,
                        at,
                        tier.config.max_ttl,
                    ),
                };
                // Writes get a longer bound than reads: they delay no one.
                let bound = tier.config.soft_timeout.max(Duration::from_millis(500));
                match tokio::time::timeout(bound, call).await {
                    Ok(Ok(())) => tier.succeeded(),
                    _ => {
                        count(
                            &tier.errors,
                            gratify_core::telemetry::CACHE_TIER_ERRORS_TOTAL.name,
                        );
                        tier.failed();
                    }
                }
            }
        });
        let mut events = self.backend.subscribe(self.channel());
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let Some(tier) = weak.upgrade() else { break };
                match event {
                    TierEvent::Resubscribed => {
                        count(
                            &tier.resubscribed,
                            gratify_core::telemetry::CACHE_TIER_RESUBSCRIBED_TOTAL.name,
                        );
                        // Invalidations may have been missed: drop L1, and
                        // do not trust the tier until the barriers are in.
                        tier.loaded.store(false, Ordering::Release);
                        evict.evict(&Scope::All).await;
                        tier.load_barriers().await;
                    }
                    TierEvent::Message(m) => {
                        let Some((sender, at_ms, scope)) = Scope::parse(&m) else {
                            continue;
                        };
                        if let Ok(mut b) = tier.barriers.lock() {
                            b.raise(&scope, at_ms, wall_ms());
                        }
                        if sender != tier.id {
                            evict.evict(&scope).await;
                            count(
                                &tier.invalidations,
                                gratify_core::telemetry::CACHE_TIER_INVALIDATIONS_TOTAL.name,
                            );
                        }
                    }
                }
            }
        });
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a call may go to the tier now.
    fn allowed(&self) -> bool {
        let until = self.breaker.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now_ms() < until {
            return false;
        }
        // Half-open: one trial at a time.
        !self.breaker.trial.swap(true, Ordering::AcqRel)
    }

    fn succeeded(&self) {
        self.breaker.failures.store(0, Ordering::Relaxed);
        if self.breaker.open_until.swap(0, Ordering::AcqRel) > 0 {
            tracing::info!("the shared cache tier answers again");
            #[cfg(feature = "metrics")]
            metrics::gauge!(gratify_core::telemetry::CACHE_TIER_BREAKER_OPEN.name).set(0.0);
        }
        self.breaker.backoff.store(0, Ordering::Relaxed);
        self.breaker.trial.store(false, Ordering::Release);
    }

    fn failed(&self) {
        let failures = self.breaker.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let open = self.breaker.open_until.load(Ordering::Acquire) > 0;
        if open || failures >= self.config.breaker_failures.max(1) {
            let base = u64::try_from(self.config.breaker_backoff.as_millis()).unwrap_or(500);
            let max = u64::try_from(self.config.breaker_max_backoff.as_millis()).unwrap_or(10_000);
            let last = self.breaker.backoff.load(Ordering::Relaxed);
            let backoff = if last == 0 { base } else { (last * 2).min(max) }.max(1);
            self.breaker.backoff.store(backoff, Ordering::Relaxed);
            self.breaker
                .open_until
                .store(self.now_ms() + backoff, Ordering::Release);
            self.breaker.trial.store(false, Ordering::Release);
            #[cfg(feature = "metrics")]
            metrics::gauge!(gratify_core::telemetry::CACHE_TIER_BREAKER_OPEN.name).set(1.0);
            if !open {
                tracing::warn!(
                    backoff_ms = backoff,
                    "the shared cache tier is failing: not asking it for a while"
                );
            }
        }
    }

    /// Reads `key` from the tier: `None` on absence, failure, timeout, an
    /// open breaker, an undecodable value, or a barrier covering it.
    pub(crate) async fn get(&self, key: &str) -> Option<Decoded> {
        if !self.loaded.load(Ordering::Acquire) || !self.allowed() {
            count(
                &self.skipped,
                gratify_core::telemetry::CACHE_TIER_SKIPPED_TOTAL.name,
            );
            return None;
        }
        let call = self.backend.get(self.key(key));
        let value = match tokio::time::timeout(self.config.soft_timeout, call).await {
            Ok(Ok(value)) => {
                self.succeeded();
                value
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "shared cache tier read failed");
                count(
                    &self.errors,
                    gratify_core::telemetry::CACHE_TIER_ERRORS_TOTAL.name,
                );
                self.failed();
                return None;
            }
            Err(_) => {
                count(
                    &self.errors,
                    gratify_core::telemetry::CACHE_TIER_ERRORS_TOTAL.name,
                );
                self.failed();
                return None;
            }
        };
        let decoded = value
            .and_then(|v| self.config.open(v))
            .and_then(|v| envelope::decode(v, Instant::now(), SystemTime::now()))
            .filter(|d| {
                self.barriers
                    .lock()
                    .map(|b| !b.covers(key, &d.entry.tags, d.stored_ms))
                    .unwrap_or(false)
            });
        match decoded {
            Some(d) => {
                count(
                    &self.hits,
                    gratify_core::telemetry::CACHE_TIER_HITS_TOTAL.name,
                );
                Some(d)
            }
            None => {
                count(
                    &self.misses,
                    gratify_core::telemetry::CACHE_TIER_MISSES_TOTAL.name,
                );
                None
            }
        }
    }

    fn enqueue(&self, write: Write) {
        let sent = self
            .writes
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|tx| tx.try_send(write).is_ok()));
        if sent != Some(true) {
            count(
                &self.dropped_writes,
                gratify_core::telemetry::CACHE_TIER_DROPPED_WRITES_TOTAL.name,
            );
        }
    }

    /// Writes `entry` in the background and tells the other replicas that
    /// `key` has a newer version.
    pub(crate) fn put(&self, key: &str, entry: &Entry) {
        let now = Instant::now();
        let age = entry.age(now);
        let ttl = (entry.lifetime + entry.keep_stale)
            .saturating_sub(age)
            .min(self.config.max_ttl);
        if ttl.is_zero() {
            return;
        }
        let stored = envelope::stored_wall_ms(entry, now, SystemTime::now());
        let value = self.config.seal(envelope::encode(entry, stored));
        self.enqueue(Write::Set(self.key(key), value, ttl));
        self.enqueue(Write::Publish(
            Scope::Key(key.to_owned()).message(self.id, wall_ms()),
        ));
    }

    /// Invalidates `scope` everywhere: the tier's copy of a key, a barrier
    /// for the rest, and a message to every replica.
    pub(crate) fn invalidate(&self, scope: Scope) {
        let at = wall_ms();
        if let Ok(mut b) = self.barriers.lock() {
            b.raise(&scope, at, at);
        }
        match scope.member() {
            Some(member) => self.enqueue(Write::Barrier(member, at)),
            None => {
                if let Scope::Key(k) = &scope {
                    self.enqueue(Write::Delete(self.key(k)));
                }
            }
        }
        self.enqueue(Write::Publish(scope.message(self.id, at)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever purges arrive, an entry a barrier covered is covered
        /// still — by its own barrier or a purge-all one — as long as the
        /// tier can hold it (stored within `max_ttl`); and the barriers
        /// kept apart stay bounded.
        #[test]
        fn bounded_barriers_never_let_a_purged_entry_back(
            purges in proptest::collection::vec((0u8..3, 0u32..6000, 0u64..1_000), 1..300),
            probes in proptest::collection::vec((0u32..6000, 0u64..1_000), 1..50),
        ) {
            let keep = Duration::from_millis(10_000);
            let mut bounded = Barriers::new(keep);
            let mut exact: Vec<(Scope, u64)> = Vec::new();
            let mut now = 1_000_000u64;
            for (kind, n, step) in purges {
                now += step;
                let scope = match kind {
                    0 => Scope::Prefix(format!("http://a/{n}/")),
                    1 => Scope::Tag(format!("t{n}")),
                    _ => Scope::Key(format!("http://a/{n}/x")),
                };
                bounded.raise(&scope, now, now);
                exact.push((scope, now));
            }
            prop_assert!(bounded.prefixes.len() + bounded.tags.len() <= MAX_BARRIERS);
            for (n, back) in probes {
                let key = format!("http://a/{n}/x");
                let tags = vec![format!("t{n}")];
                // Stored at a time the tier can still hold it.
                let stored = now.saturating_sub(back);
                let covered = exact.iter().any(|(scope, at)| {
                    stored <= *at
                        && match scope {
                            Scope::Prefix(p) => key.starts_with(p.as_str()),
                            Scope::Tag(t) => tags.contains(t),
                            _ => false,
                        }
                });
                if covered {
                    prop_assert!(bounded.covers(&key, &tags, stored), "{key} stored at {stored}");
                }
            }
        }
    }

    #[test]
    fn old_barriers_are_forgotten_and_a_flood_folds_its_older_half() {
        let keep = 10_000;
        let mut b = Barriers::new(Duration::from_millis(keep));
        let t0 = 1_000_000;
        b.raise(&Scope::Prefix("http://a/old/".into()), t0, t0);
        let later = t0 + keep + LINGER_MS + 1;
        b.raise(&Scope::Prefix("http://a/new/".into()), later, later);
        assert_eq!(
            b.prefixes.len(),
            1,
            "gone once no entry it covered can exist"
        );
        assert!(b.covers("http://a/new/x", &[], later - 1));
        // Kept while an entry it covers may still live (a late write).
        b.raise(&Scope::Tag("t".into()), later + 1, later + keep + LINGER_MS);
        assert_eq!(b.prefixes.len(), 1);
        for i in 0..=MAX_BARRIERS {
            let at = later + 10 + i as u64;
            b.raise(&Scope::Prefix(format!("http://a/{i}/")), at, at);
        }
        // Past the bound the older half folded into purge-all: what they
        // covered stays covered; the newer half stays apart.
        assert!(b.all > 0);
        assert!(b.prefixes.len() + b.tags.len() <= MAX_BARRIERS / 2 + 2);
        assert!(
            b.covers("http://a/7/x", &[], later + 17),
            "folded, still covered"
        );
        let newest = format!("http://a/{MAX_BARRIERS}/x");
        assert!(b.covers(&newest, &[], later + 10 + MAX_BARRIERS as u64));
        assert!(!b.covers(&newest, &[], later + 11 + MAX_BARRIERS as u64));
    }

    #[test]
    fn a_clock_ahead_cannot_blind_the_tier() {
        let mut b = Barriers::new(Duration::from_secs(3600));
        let now = 1_000_000_000;
        // A purge-all stamped a day ahead counts from now plus the skew.
        b.raise(&Scope::All, now + 86_400_000, now);
        assert_eq!(b.all, now + SKEW_MS);
        assert!(!b.covers("http://a/x", &[], now + SKEW_MS + 1));
    }

    #[test]
    fn messages_round_trip() {
        for scope in [
            Scope::Key("http://shop.example/p/7".into()),
            Scope::Prefix("http://shop.example/p/".into()),
            Scope::Tag("product 7".into()),
            Scope::All,
        ] {
            let m = scope.message(42, 1_700_000_000_000);
            assert_eq!(
                Scope::parse(&m),
                Some((42, 1_700_000_000_000, scope.clone()))
            );
            if let Some(member) = scope.member() {
                assert_eq!(Scope::of_member(&member), Some(scope));
            }
        }
        assert_eq!(Scope::parse(b"zz 1 k x"), None);
        assert_eq!(Scope::parse(b"01 1 k "), None);
        assert_eq!(Scope::parse(b"01 1 q x"), None);
    }

    #[cfg(feature = "hmac")]
    #[test]
    fn a_signed_entry_opens_only_under_its_key() {
        let signer = TierConfig::default().sign_with(b"k1");
        let other = TierConfig::default().sign_with(b"k2");
        let plain = TierConfig::default();
        let envelope = Bytes::from_static(b"GRT\x01 pretend envelope");
        let sealed = signer.seal(envelope.clone());
        assert_eq!(sealed.len(), envelope.len() + 32);
        assert_eq!(signer.open(sealed.clone()), Some(envelope.clone()));
        assert_eq!(other.open(sealed.clone()), None, "another key");
        assert_eq!(signer.open(envelope.clone()), None, "unsigned");
        assert_eq!(signer.open(Bytes::from_static(b"short")), None);
        let mut tampered = sealed.to_vec();
        tampered[5] ^= 1;
        assert_eq!(signer.open(Bytes::from(tampered)), None, "tampered");
        // Without a key nothing is added or checked.
        assert_eq!(plain.seal(envelope.clone()), envelope);
    }

    proptest! {
        #[test]
        fn any_message_parses_or_is_ignored(m in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Scope::parse(&m);
        }
    }
}
