//! Stored responses on moka, bounded by bytes, with variants per key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, StatusCode, Version};
use moka::Expiry;
use moka::future::Cache;
use tokio::time::Instant;

use crate::directives::ResponseDirectives;
use crate::key::CacheKey;
use crate::policy::vary_value;

/// One stored response. Its body is shared: a hit copies no bytes.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When it was stored (or last revalidated).
    pub(crate) stored_at: Instant,
    /// Its age when it was stored.
    pub(crate) initial_age: Duration,
    /// Its freshness lifetime.
    pub(crate) lifetime: Duration,
    pub(crate) directives: ResponseDirectives,
    /// The request's values for the fields the response varies on.
    pub(crate) vary: Vec<(HeaderName, Option<String>)>,
    pub(crate) tags: Vec<String>,
    /// How long the origin took: what a hit saves.
    pub(crate) origin_latency: Duration,
    /// How long past its freshness the cache keeps it (for stale serving).
    pub(crate) keep_stale: Duration,
}

impl Entry {
    /// Its current age.
    pub(crate) fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    /// Whether a request's `Vary` field values match this variant.
    pub(crate) fn matches(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| vary_value(request, name) == *value)
    }

    /// Bytes it holds: body, headers and bookkeeping.
    pub(crate) fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        self.body.len() + headers + 256
    }

    /// How long moka should keep it: freshness plus the stale window.
    fn keep_for(&self, now: Instant) -> Duration {
        (self.lifetime + self.keep_stale).saturating_sub(self.age(now))
    }
}

/// The variants stored under one key.
#[derive(Debug)]
pub(crate) struct Variants {
    pub(crate) entries: Vec<Arc<Entry>>,
    keep_for: Duration,
    weight: u32,
}

impl Variants {
    pub(crate) fn find(&self, request: &HeaderMap) -> Option<&Arc<Entry>> {
        self.entries.iter().find(|e| e.matches(request))
    }
}

struct KeepFor;

impl Expiry<CacheKey, Arc<Variants>> for KeepFor {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<Variants>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &Arc<Variants>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

/// The moka-backed store.
#[derive(Clone)]
pub(crate) struct Store {
    cache: Cache<CacheKey, Arc<Variants>>,
    max_variants: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

impl Store {
    pub(crate) fn new(max_bytes: u64, max_variants: usize) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, v: &Arc<Variants>| {
                v.weight.saturating_add(k.as_str().len() as u32)
            })
            .expire_after(KeepFor)
            .support_invalidation_closures()
            .build();
        Self {
            cache,
            max_variants: max_variants.max(1),
        }
    }

    pub(crate) async fn get(&self, key: &CacheKey) -> Option<Arc<Variants>> {
        self.cache.get(key).await
    }

    /// Stores `entry`, replacing the variant with the same `Vary` values.
    pub(crate) async fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        let now = Instant::now();
        let mut entries: Vec<Arc<Entry>> = match self.cache.get(&key).await {
            Some(v) => v
                .entries
                .iter()
                .filter(|e| e.vary != entry.vary && e.age(now) < e.lifetime + e.keep_stale)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        entries.insert(0, entry);
        entries.truncate(self.max_variants);
        let keep_for = entries
            .iter()
            .map(|e| e.keep_for(now))
            .max()
            .unwrap_or_default();
        let weight = entries
            .iter()
            .map(|e| e.weight())
            .sum::<usize>()
            .min(u32::MAX as usize) as u32;
        self.cache
            .insert(
                key,
                Arc::new(Variants {
                    entries,
                    keep_for,
                    weight,
                }),
            )
            .await;
    }

    pub(crate) async fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key).await;
    }

    pub(crate) fn remove_if(
        &self,
        f: impl Fn(&CacheKey, &Variants) -> bool + Send + Sync + 'static,
    ) {
        // Fails only if closures were not enabled at build time; they are.
        let _ = self.cache.invalidate_entries_if(move |k, v| f(k, v));
    }

    pub(crate) fn remove_all(&self) {
        self.cache.invalidate_all();
    }

    pub(crate) async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}
