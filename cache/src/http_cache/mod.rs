//! The HTTP cache, in two halves that share one store.
//!
//! [`CacheLookup`] answers from memory what it can — fresh hits, permitted
//! stale answers — holds concurrent requests for a key that is being filled
//! until the fill ends, and marks every other request with what it found.
//! [`CacheFill`] sends the marked requests to the origin (conditionally, to
//! revalidate what the lookup found stale) and stores what may be stored.
//! [`HttpCache`] is the two, back to back; `gratify::Stack` puts its limit
//! and compression between them, so that what memory answers never waits for
//! a slot and every origin call — refreshes included — holds one.
//!
//! The rules live in one place each: what may be stored in
//! [`policy`](crate::policy) and [`fill`]; whether a stored response may
//! answer a request in [`Entry::reuse`](crate::entry::Entry); how a `304`
//! updates it in [`Entry::freshened`](crate::entry::Entry); coalescing in
//! [`flight`]; invalidation by unsafe methods in [`invalidate`]; how a stored
//! response is represented to a client in [`represent`].

mod fill;
mod flight;
mod invalidate;
mod lookup;
mod represent;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use tower_layer::Layer;

use crate::key::{CacheKey, KeyPart};
use crate::policy::Rules;
use crate::store::Store;
use crate::tier::{Scope, SharedTier, Tier, TierConfig, TierStats};

pub use self::fill::{CacheFill, CacheFillLayer};
pub use self::lookup::{CacheLookup, CacheLookupLayer, LookupFuture};

/// The two halves back to back: the whole cache around a service.
pub type HttpCache<S> = CacheLookup<CacheFill<S>>;

/// The longest any of the cache's own timers runs.
const HOUR: Duration = Duration::from_secs(3600);

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Headers through which clients ask a server to treat a request as another
/// method; a request carrying one is never served from or stored in the cache.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The settings of an [`HttpCacheLayer`].
#[derive(Clone)]
#[non_exhaustive]
pub struct HttpCacheConfig {
    /// The memory budget, in bytes (bodies, headers and bookkeeping).
    pub max_bytes: u64,
    /// Responses larger than this stream through unstored.
    pub max_entry_bytes: usize,
    /// What may be stored where no route says otherwise.
    pub rules: Rules,
    /// Per path prefix, what may be stored (the longest prefix wins).
    pub routes: Vec<(String, Rules)>,
    /// How long a request waits for another request's fill of the same key
    /// before going to the origin itself.
    pub coalesce_wait: Duration,
    /// How long an uncacheable answer is remembered, so that requests for it
    /// go straight to the origin instead of queueing behind one another.
    pub hit_for_miss: Duration,
    /// Serve a stale response for up to this long past its freshness when
    /// the origin fails (a fail-safe, as FusionCache's), unless the response
    /// forbids it.
    pub fail_safe: Option<Duration>,
    /// The scheme of requests whose URI has none.
    pub scheme: String,
    /// Sort query parameters by name in keys.
    pub sort_query: bool,
    /// The response header whose space-separated values tag an entry for
    /// [`CachePurge::purge_tag`].
    pub tag_header: Option<HeaderName>,
    /// At most this many variants (`Vary`) per key.
    pub max_variants: usize,
    /// The name this cache uses in `Cache-Status`.
    pub name: String,
    /// Weigh entries by value: once memory is nearly full, admit a response
    /// only if its frequency × delay cost saved per hit ÷ bytes is at least
    /// that of what the cache has been evicting (see [`HttpCacheLayer::with_model`]).
    pub cost_aware: bool,
    /// Do not store responses whose hit saves less than this (origin latency
    /// in seconds × the class's cost rate): cheaper to recompute than to keep.
    pub min_saved_per_hit: f64,
    /// Refresh a hot entry in the background once this fraction of its
    /// freshness has passed (one refresh, coalesced), so that popular
    /// entries never go stale under load. `None` turns it off.
    pub eager_refresh: Option<f64>,
    /// How many times requests that waited for a fill that failed (an
    /// origin error: a connection error, 500, 502, 503 or 504) elect a new
    /// one among themselves, after a random pause. When every one fails,
    /// the waiting requests are answered `503` with `Retry-After: 1` (or
    /// stale, where `stale-if-error` or the fail-safe allows) rather than
    /// all sent to a failing origin at once.
    pub coalesce_retries: u32,
    /// Send the [`tag_header`](Self::tag_header) on to clients. Off by
    /// default: tags describe the origin's invalidation scheme, not the
    /// response.
    pub expose_tags: bool,
    /// Store compressible bodies encoded once (by this recoder, off the
    /// async threads) and serve each client the coding it accepts — a hit
    /// never compresses. `gratify::compression::Recompress` is one.
    pub recoder: Option<Arc<dyn gratify_core::encoding::Recoder>>,
}

impl Default for HttpCacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            rules: Rules::default(),
            routes: Vec::new(),
            coalesce_wait: Duration::from_secs(5),
            hit_for_miss: Duration::from_secs(10),
            fail_safe: None,
            scheme: "http".into(),
            sort_query: false,
            tag_header: Some(HeaderName::from_static("surrogate-key")),
            max_variants: 8,
            name: "gratify".into(),
            cost_aware: true,
            min_saved_per_hit: 0.0,
            eager_refresh: Some(0.9),
            coalesce_retries: 2,
            expose_tags: false,
            recoder: None,
        }
    }
}

impl std::fmt::Debug for HttpCacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCacheConfig")
            .field("max_bytes", &self.max_bytes)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("rules", &self.rules)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    store: Store,
    config: HttpCacheConfig,
    /// Swapped whole by `reload`.
    model: Option<gratify_core::SharedModel>,
    key_part: Option<Box<dyn KeyPart>>,
    /// Fills in progress, by key.
    inflight: Mutex<HashMap<CacheKey, flight::Flight>>,
    /// Numbers fills, so a finished one removes only itself.
    next_flight: AtomicU64,
    /// Fills that failed in a row lately, by key.
    failures: moka::sync::Cache<CacheKey, u32>,
    /// Keys whose responses were recently found uncacheable.
    hit_for_miss: moka::sync::Cache<CacheKey, ()>,
    /// Requests answered: hit, stale, miss, bypass.
    requests: [AtomicU64; 4],
}

impl Shared {
    fn rules(&self, path: &str) -> Rules {
        self.config
            .routes
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(self.config.rules, |(_, r)| *r)
    }

    /// The epoch a fill starting now records: it stores only if no
    /// invalidation of its key comes after.
    fn epoch(&self) -> u64 {
        self.store.epochs().now()
    }

    /// Removes `key` (here, in the tier, on every replica); fills already
    /// under way for it will not store what they got.
    async fn invalidate(&self, key: &CacheKey) {
        self.store.remove(key).await;
    }

    /// Removes what `scope` covers; fills already under way do not store.
    fn invalidate_scope(&self, scope: Scope) {
        self.store.remove_scope(scope);
    }

    /// Whether `key` was invalidated after `since` — here or on another
    /// replica: what a fill that started then got is not to be stored or
    /// shared.
    fn overtaken(&self, key: &CacheKey, since: u64) -> bool {
        self.store.epochs().overtaken(key, since)
    }

    /// Stores a filled `entry` (for a fill that started at `since`) and says
    /// how the fill ended for those waiting: `true` if the store kept it.
    async fn fill(
        &self,
        key: &CacheKey,
        entry: &Arc<crate::entry::Entry>,
        since: u64,
    ) -> (bool, flight::Outcome) {
        if self.overtaken(key, since) {
            return (false, flight::Outcome::Uncacheable);
        }
        let kept = self.store.insert(key.clone(), Arc::clone(entry)).await;
        if self.overtaken(key, since) {
            // An invalidation came between the check and the insert.
            self.store.remove(key).await;
            return (false, flight::Outcome::Uncacheable);
        }
        if kept {
            self.hit_for_miss.invalidate(key);
        }
        // Turned away by the value gate or not, those waiting may have it.
        (kept, flight::Outcome::Filled(Arc::clone(entry)))
    }

    /// The cost rate of a second of delay for a request of `class` that
    /// took `latency` at the origin (1 without a model).
    fn cost_rate(&self, class: Option<gratify_core::ClassId>, latency: Duration) -> f64 {
        match &self.model.as_ref().map(gratify_core::SharedModel::get) {
            Some(model) => {
                let id = class.unwrap_or_else(|| model.default_class());
                model
                    .get(id)
                    .map_or(1.0, |c| c.urgency(latency.as_secs_f64()))
            }
            None => 1.0,
        }
    }

    fn status(&self, detail: &str) -> HeaderValue {
        self.status_with(detail, None)
    }

    /// `Cache-Status` with `detail` and, for a stored response, its `ttl`;
    /// counts the request by result.
    fn status_with(&self, detail: &str, ttl: Option<i64>) -> HeaderValue {
        self.count(detail);
        self.status_text(detail, ttl)
    }

    /// Counts a request by its result, as its `Cache-Status` `detail` says.
    fn count(&self, detail: &str) {
        // Recorded on the request's span if it declares `cache` (as
        // `gratify::Stack`'s does).
        if tracing::dispatcher::has_been_set() {
            tracing::Span::current().record("cache", detail);
        }
        let (result, slot) = if detail.starts_with("hit") {
            ("hit", 0)
        } else if detail.contains("fwd=stale") {
            ("stale", 1)
        } else if detail.contains("fwd=bypass") {
            ("bypass", 3)
        } else {
            ("miss", 2)
        };
        self.requests[slot].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(gratify_core::telemetry::CACHE_REQUESTS_TOTAL.name, "result" => result)
            .increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = result;
    }

    /// The `Cache-Status` value itself, built in one buffer.
    fn status_text(&self, detail: &str, ttl: Option<i64>) -> HeaderValue {
        use std::fmt::Write as _;
        let mut text = String::with_capacity(self.config.name.len() + detail.len() + 16);
        // A name that cannot be a token is written as a string.
        crate::cache_status::push_name(&mut text, &self.config.name);
        text.push_str("; ");
        text.push_str(detail);
        if let Some(ttl) = ttl {
            let _ = write!(text, "; ttl={ttl}");
        }
        HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static("gratify"))
    }
}

/// Requests an [`HttpCacheLayer`] answered, by result (`Cache-Status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheRequests {
    /// Served fresh from the cache.
    pub hit: u64,
    /// Served stale (while revalidating, on error, or by the fail-safe).
    pub stale: u64,
    /// Forwarded to the origin (a miss, a revalidation).
    pub miss: u64,
    /// A GET or HEAD passed through without the cache (`no-store`, an
    /// upgrade, no host, …). Other methods are not counted.
    pub bypass: u64,
}

/// A handle to purge what an [`HttpCacheLayer`] stored; cheap to clone.
#[derive(Clone)]
pub struct CachePurge {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CachePurge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachePurge").finish_non_exhaustive()
    }
}

impl CachePurge {
    /// Removes the entry for a key such as `http://example.com/products/7`.
    pub async fn purge_key(&self, key: &str) {
        self.shared.invalidate(&CacheKey::from_text(key)).await;
    }

    /// Removes every entry whose key starts with `prefix` (on every replica,
    /// with a shared tier).
    pub fn purge_prefix(&self, prefix: &str) {
        self.shared
            .invalidate_scope(Scope::Prefix(prefix.to_owned()));
    }

    /// Removes every entry tagged `tag` (by the tag header; on every
    /// replica, with a shared tier).
    pub fn purge_tag(&self, tag: &str) {
        self.shared.invalidate_scope(Scope::Tag(tag.to_owned()));
    }

    /// Removes everything (on every replica, with a shared tier).
    pub fn purge_all(&self) {
        self.shared.invalidate_scope(Scope::All);
    }

    /// The shared tier's counters, if the cache has one.
    pub fn tier_stats(&self) -> Option<TierStats> {
        self.shared.store.tier().map(|t| t.stats())
    }

    /// Bytes held (moka's weighted size; may lag behind by pending work).
    pub fn weighted_size(&self) -> u64 {
        self.shared.store.weighted_size()
    }

    /// Requests answered so far, by result.
    pub fn requests(&self) -> CacheRequests {
        let n = |i: usize| self.shared.requests[i].load(Ordering::Relaxed);
        CacheRequests {
            hit: n(0),
            stale: n(1),
            miss: n(2),
            bypass: n(3),
        }
    }

    /// Keys held.
    pub fn entry_count(&self) -> u64 {
        self.shared.store.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, invalidations) now.
    pub async fn sync(&self) {
        self.shared.store.run_pending_tasks().await;
    }
}

/// Caches HTTP responses with shared-cache semantics. See the
/// [crate docs](crate).
#[derive(Clone)]
pub struct HttpCacheLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCacheLayer")
            .field("config", &self.shared.config)
            .field("store", &self.shared.store)
            .finish()
    }
}

impl HttpCacheLayer {
    /// A cache with `config`.
    pub fn new(config: HttpCacheConfig) -> Self {
        Self::build(config, None, None)
    }

    /// A cache whose keys also include `part` (a tenant, a user).
    pub fn with_key_part(config: HttpCacheConfig, part: impl KeyPart) -> Self {
        Self::build(config, Some(Box::new(part)), None)
    }

    /// A cache that values entries by the cost model: a hit on a response of
    /// class `k` saves the origin's latency at class `k`'s urgency (its cost
    /// rate, with its refusal cost spread over its deadline). The class is the
    /// [`ClassId`](gratify_core::ClassId) a `ClassifyLayer` stored in the
    /// request's extensions, or the model's default class.
    pub fn with_model(config: HttpCacheConfig, model: &gratify_core::CostModel) -> Self {
        Self::build(config, None, Some(model.clone()))
    }

    fn build(
        config: HttpCacheConfig,
        key_part: Option<Box<dyn KeyPart>>,
        model: Option<gratify_core::CostModel>,
    ) -> Self {
        let hit_for_miss = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.hit_for_miss.clamp(Duration::from_millis(1), HOUR))
            .build();
        Self {
            shared: Arc::new(Shared {
                store: Store::new(
                    config.max_bytes,
                    config.max_variants,
                    config.cost_aware,
                    config.min_saved_per_hit,
                ),
                key_part,
                model: model.map(gratify_core::SharedModel::new),
                inflight: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(0),
                failures: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(config.coalesce_wait.clamp(Duration::from_millis(1), HOUR))
                    .build(),
                hit_for_miss,
                requests: Default::default(),
                config,
            }),
        }
    }

    /// Puts a shared second tier (Redis) under this cache: see
    /// [`tier`](crate::tier). Every replica given the same tier and namespace
    /// shares entries and invalidations. Call it before the first request;
    /// a second tier is ignored (with a warning).
    #[must_use]
    pub fn with_tier(self, tier: impl SharedTier, config: TierConfig) -> Self {
        if !self
            .shared
            .store
            .set_tier(Tier::new(Arc::new(tier), config))
        {
            tracing::warn!("this cache already has a shared tier; the new one is ignored");
        }
        // Subscribe now when inside a runtime (else at the first request).
        let _ = self.shared.store.tier();
        self
    }

    /// Takes new costs (same classes) at run time: entries stored from now
    /// on are valued by them. A cache without a model ignores it.
    ///
    /// # Errors
    ///
    /// The new model has other classes or another default class.
    pub fn reload(&self, model: &gratify_core::CostModel) -> Result<(), gratify_core::ModelError> {
        match &self.shared.model {
            Some(current) => current.reload(model),
            None => Ok(()),
        }
    }

    /// The purge handle.
    pub fn purge(&self) -> CachePurge {
        CachePurge {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The first half alone: answers what memory can, coalesces, and marks
    /// the rest for [`fill`](Self::fill). Put layers that should only see
    /// requests the cache cannot answer (a limit, compression) between the
    /// two halves; both must come from the same `HttpCacheLayer`.
    pub fn lookup(&self) -> CacheLookupLayer {
        CacheLookupLayer::new(Arc::clone(&self.shared))
    }

    /// The second half alone: goes to the origin for what
    /// [`lookup`](Self::lookup) marked, and stores what may be stored.
    /// Requests the lookup did not mark pass through untouched.
    pub fn fill(&self) -> CacheFillLayer {
        CacheFillLayer::new(Arc::clone(&self.shared))
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;

    fn layer(&self, inner: S) -> HttpCache<S> {
        self.lookup().layer(self.fill().layer(inner))
    }
}
