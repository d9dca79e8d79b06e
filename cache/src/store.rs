//! Stored responses on moka, bounded by bytes, with variants per key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::sync::Cache;
use tokio::time::Instant;

use crate::entry::{Entry, Variants};
use crate::key::CacheKey;
use crate::tier::{BoxFuture, Evict, Scope, Tier};

/// A count-min sketch of recent request frequencies (4 rows of 8-bit
/// counters, halved as a whole every `10 × width` additions), as TinyLFU
/// keeps, so old popularity fades. Lock-free: counters are relaxed atomics,
/// and a lost increment under contention only makes an estimate a little low.
#[derive(Debug)]
struct Sketch {
    rows: [Box<[AtomicU8]>; 4],
    mask: usize,
    additions: AtomicUsize,
}

impl Sketch {
    fn new(width: usize) -> Self {
        let width = width.next_power_of_two().max(64);
        Self {
            rows: std::array::from_fn(|_| (0..width).map(|_| AtomicU8::new(0)).collect()),
            mask: width - 1,
            additions: AtomicUsize::new(0),
        }
    }

    fn slots(&self, key: &str) -> [usize; 4] {
        // Eight bytes at a time, each word folded in with a multiply and a
        // rotate, then mixed: a sketch needs speed, not resistance to chosen
        // keys (a collision only overestimates one key's popularity).
        let bytes = key.as_bytes();
        let mut x: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            x = (x ^ u64::from_le_bytes(w))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(31);
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        x = (x ^ u64::from_le_bytes(tail)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 32;
        let (a, b) = (x as u32 as usize, (x >> 32) as usize);
        std::array::from_fn(|i| a.wrapping_add(i.wrapping_mul(b)) & self.mask)
    }

    fn add(&self, key: &str) {
        for (row, slot) in self.slots(key).into_iter().enumerate() {
            let c = &self.rows[row][slot];
            let v = c.load(Ordering::Relaxed);
            if v < u8::MAX {
                c.store(v + 1, Ordering::Relaxed);
            }
        }
        if self.additions.fetch_add(1, Ordering::Relaxed) + 1 >= 10 * (self.mask + 1) {
            self.additions.store(0, Ordering::Relaxed);
            for row in &self.rows {
                for c in row.iter() {
                    c.store(c.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
                }
            }
        }
    }

    fn estimate(&self, key: &str) -> u32 {
        self.slots(key)
            .into_iter()
            .enumerate()
            .map(|(row, slot)| u32::from(self.rows[row][slot].load(Ordering::Relaxed)))
            .min()
            .unwrap_or(0)
    }
}

/// The value gate: once the store is nearly full, a new entry is admitted
/// only if its value density (frequency × delay cost saved per hit ÷ bytes)
/// is at least that of the entries moka has recently evicted for space —
/// moka's own policy cannot weigh entries by value.
#[derive(Debug)]
struct Gate {
    sketch: Sketch,
    /// Exponentially weighted density of entries evicted for space (f64 bits).
    threshold: AtomicU64,
    min_saved_per_hit: f64,
    enabled: bool,
}

impl Gate {
    fn frequency(&self, key: &CacheKey) -> u32 {
        self.sketch.estimate(key.as_str())
    }

    fn touch(&self, key: &str) {
        self.sketch.add(key);
    }

    fn threshold(&self) -> f64 {
        f64::from_bits(self.threshold.load(Ordering::Relaxed))
    }

    fn evicted(&self, density: f64) {
        let old = self.threshold();
        let new = if old == 0.0 {
            density
        } else {
            old + (density - old) * 0.05
        };
        self.threshold.store(new.to_bits(), Ordering::Relaxed);
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

/// The moka-backed store, over an optional shared tier.
#[derive(Clone)]
pub(crate) struct Store {
    cache: Cache<CacheKey, Arc<Variants>>,
    max_variants: usize,
    max_bytes: u64,
    gate: Arc<Gate>,
    tier: Arc<std::sync::OnceLock<Arc<Tier>>>,
    epochs: Arc<Epochs>,
}

/// Counts invalidations — here or on another replica — so that a fill that
/// started before the last one of its key (or of a purge by prefix, tag or
/// all) does not store what it got.
///
/// Each key's last invalidation is kept in one of a fixed number of slots
/// chosen by the key's hash, raised and never forgotten: two keys that share
/// a slot only make a fill of one skip storing after an invalidation of the
/// other — never the reverse.
#[derive(Debug)]
pub(crate) struct Epochs {
    epoch: AtomicU64,
    slots: Box<[AtomicU64]>,
    /// The epoch of the last purge by prefix, tag or all.
    scope: AtomicU64,
}

/// Slots of [`Epochs`] (512 KiB).
const EPOCH_SLOTS: usize = 1 << 16;

impl Epochs {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            slots: (0..EPOCH_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            scope: AtomicU64::new(0),
        }
    }

    fn slot(&self, key: &CacheKey) -> &AtomicU64 {
        use std::hash::BuildHasher;
        // A fixed hasher: the same key, the same slot, in every call.
        let hasher =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        &self.slots[(hasher.hash_one(key) as usize) & (EPOCH_SLOTS - 1)]
    }

    /// The epoch a fill starting now records.
    pub(crate) fn now(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn key(&self, key: &CacheKey) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.slot(key).fetch_max(epoch, Ordering::AcqRel);
    }

    fn scope(&self) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.scope.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Whether `key` was invalidated after `since`.
    pub(crate) fn overtaken(&self, key: &CacheKey, since: u64) -> bool {
        self.scope.load(Ordering::Acquire) > since || self.slot(key).load(Ordering::Acquire) > since
    }
}

/// Evicts L1 copies when another replica invalidates.
struct L1(Cache<CacheKey, Arc<Variants>>, Arc<Epochs>);

impl L1 {
    /// Evicts what a prefix, tag or purge-all covers (a key needs `await`).
    fn evict_now(&self, scope: &Scope) {
        if !matches!(scope, Scope::Key(_)) {
            self.1.scope();
        }
        // `invalidate_entries_if` fails only if closures were not enabled at
        // build time; they are.
        match scope.clone() {
            Scope::Key(_) => {}
            Scope::Prefix(p) => {
                let _ = self
                    .0
                    .invalidate_entries_if(move |k, _| k.as_str().starts_with(&p));
            }
            Scope::Tag(t) => {
                let _ = self.0.invalidate_entries_if(move |_, v| {
                    v.entries.iter().any(|e| e.tags.contains(&t))
                });
            }
            Scope::All => self.0.invalidate_all(),
        }
    }
}

impl Evict for L1 {
    fn evict(&self, scope: &Scope) -> BoxFuture<()> {
        if let Scope::Key(k) = scope {
            let key = CacheKey::from_text(k);
            self.1.key(&key);
            self.0.invalidate(&key);
            return Box::pin(async {});
        }
        self.evict_now(scope);
        Box::pin(async {})
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .field("tier", &self.tier.get())
            .finish()
    }
}

impl Store {
    pub(crate) fn new(
        max_bytes: u64,
        max_variants: usize,
        cost_aware: bool,
        min_saved_per_hit: f64,
    ) -> Self {
        let gate = Arc::new(Gate {
            // About one counter per 512 bytes of budget, within reason.
            sketch: Sketch::new(((max_bytes / 512) as usize).clamp(1024, 1 << 22)),
            threshold: AtomicU64::new(0),
            min_saved_per_hit,
            enabled: cost_aware,
        });
        let listener_gate = Arc::clone(&gate);
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, v: &Arc<Variants>| {
                v.weight.saturating_add(k.as_str().len() as u32)
            })
            .expire_after(KeepFor)
            .support_invalidation_closures()
            .eviction_listener(move |key: Arc<CacheKey>, value: Arc<Variants>, cause| {
                #[cfg(feature = "metrics")]
                {
                    use moka::notification::RemovalCause;
                    let cause_name = match cause {
                        RemovalCause::Size => "size",
                        RemovalCause::Expired => "expired",
                        RemovalCause::Explicit => "explicit",
                        RemovalCause::Replaced => "replaced",
                    };
                    metrics::counter!(gratify_core::telemetry::CACHE_EVICTIONS_TOTAL.name, "cause" => cause_name)
                        .increment(1);
                }
                if cause == moka::notification::RemovalCause::Size {
                    let frequency = listener_gate.frequency(&key);
                    listener_gate.evicted(value.density(frequency));
                }
            })
            .build();
        Self {
            cache,
            max_variants: max_variants.max(1),
            max_bytes,
            gate,
            tier: Arc::new(std::sync::OnceLock::new()),
            epochs: Arc::new(Epochs::new()),
        }
    }

    /// Puts `tier` under this store; `false` if it already has one.
    pub(crate) fn set_tier(&self, tier: Tier) -> bool {
        self.tier.set(Arc::new(tier)).is_ok()
    }

    pub(crate) fn tier(&self) -> Option<&Arc<Tier>> {
        let tier = self.tier.get()?;
        if !tier.is_started() {
            tier.start(Arc::new(L1(self.cache.clone(), Arc::clone(&self.epochs))));
        }
        Some(tier)
    }

    /// What memory holds for `key`, without counting a request or asking
    /// the shared tier.
    pub(crate) async fn peek(&self, key: &CacheKey) -> Option<Arc<Variants>> {
        self.cache.get(key)
    }

    /// What memory holds for `key`, counting the request (synchronous: the
    /// hit path).
    pub(crate) fn local(&self, key: &str) -> Option<Arc<Variants>> {
        self.gate.touch(key);
        self.cache.get(key)
    }

    /// What memory or the shared tier holds for `key`; `counted` if
    /// [`local`](Self::local) already counted this request.
    pub(crate) async fn get(&self, key: &CacheKey, counted: bool) -> Option<Arc<Variants>> {
        if !counted {
            self.gate.touch(key.as_str());
        }
        if let Some(v) = self.cache.get(key) {
            return Some(v);
        }
        let entry = self.tier()?.get(key.as_str()).await?.entry;
        // A tier hit fills L1 (and is not written back) — if L1's value gate
        // lets it in; it is served either way.
        self.insert_local(key.clone(), Arc::clone(&entry)).await;
        let now = Instant::now();
        Some(Arc::new(Variants::new(vec![entry], now)))
    }

    /// Stores `entry`, replacing the variant with the same `Vary` values —
    /// unless the value gate turns it away (returns `false`) — and writes it
    /// to the shared tier, if any, in the background.
    pub(crate) async fn insert(&self, key: CacheKey, entry: Arc<Entry>) -> bool {
        if let Some(tier) = self.tier() {
            tier.put(key.as_str(), &entry);
        }
        self.insert_local(key, entry).await
    }

    /// Stores `entry` in L1 only.
    async fn insert_local(&self, key: CacheKey, entry: Arc<Entry>) -> bool {
        let now = Instant::now();
        if entry.saved_per_hit() < self.gate.min_saved_per_hit {
            return false;
        }
        if self.gate.enabled {
            let weight = entry.weight() as u64;
            let full = self.cache.weighted_size() + weight > self.max_bytes / 10 * 9;
            if full {
                let frequency = self.gate.frequency(&key);
                let density = f64::from(frequency) * entry.saved_per_hit() / weight.max(1) as f64;
                if density < self.gate.threshold() {
                    return false;
                }
            }
        }
        let mut entries: Vec<Arc<Entry>> = match self.cache.get(&key) {
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
        self.cache
            .insert(key, Arc::new(Variants::new(entries, now)));
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!(gratify_core::telemetry::CACHE_BYTES.name)
                .set(self.cache.weighted_size() as f64);
            metrics::gauge!(gratify_core::telemetry::CACHE_ENTRIES.name)
                .set(self.cache.entry_count() as f64);
        }
        true
    }

    /// The invalidation epochs (here and from other replicas).
    pub(crate) fn epochs(&self) -> &Epochs {
        &self.epochs
    }

    /// Removes `key` here, from the shared tier and from every replica.
    pub(crate) async fn remove(&self, key: &CacheKey) {
        self.epochs.key(key);
        self.cache.invalidate(key);
        if let Some(tier) = self.tier() {
            tier.invalidate(Scope::Key(key.as_str().to_owned()));
        }
    }

    /// Removes every entry whose key starts with `prefix`, tagged `tag`, or
    /// everything — here, and through the shared tier everywhere.
    pub(crate) fn remove_scope(&self, scope: Scope) {
        L1(self.cache.clone(), Arc::clone(&self.epochs)).evict_now(&scope);
        if let Some(tier) = self.tier() {
            tier.invalidate(scope);
        }
    }

    pub(crate) async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }

    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode, Version};

    use crate::directives::ResponseDirectives;

    fn entry(body: usize, latency_ms: u64) -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![0u8; body]),
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(3600),
            directives: ResponseDirectives::default(),
            vary: Vec::new(),
            tags: Vec::new(),
            origin_latency: Duration::from_millis(latency_ms),
            keep_stale: Duration::ZERO,
            cost_rate: 1.0,
            encodings: Vec::new(),
            prepared: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_million_keys_stay_within_the_budget() {
        // moka evicts lazily, in batches of pending work; after the pending
        // work runs the weighted size is within the budget. In between it can
        // run over by at most the entries inserted since the last
        // maintenance (moka runs it every few hundred writes).
        const BUDGET: u64 = 4 * 1024 * 1024;
        let store = Store::new(BUDGET, 4, false, 0.0);
        let shared = entry(100, 10);
        let mut worst = 0;
        for i in 0..1_000_000u32 {
            store
                .insert(
                    CacheKey::from_text(&format!("http://h/{i}")),
                    Arc::clone(&shared),
                )
                .await;
            if i % 50_000 == 0 {
                worst = worst.max(store.weighted_size());
            }
        }
        store.run_pending_tasks().await;
        assert!(store.weighted_size() <= BUDGET, "{}", store.weighted_size());
        assert!(
            worst <= BUDGET + BUDGET / 4,
            "overshoot {worst} over {BUDGET}"
        );
        assert!(store.entry_count() > 5_000);
    }

    #[tokio::test]
    async fn the_gate_turns_away_less_valuable_entries_when_full() {
        const BUDGET: u64 = 200 * 1024;
        let store = Store::new(BUDGET, 4, true, 0.0);
        // Fill with valuable entries, requested often.
        for i in 0..1000u32 {
            let key = CacheKey::from_text(&format!("http://h/hot/{i}"));
            for _ in 0..20 {
                store.get(&key, false).await;
            }
            store.insert(key, entry(1000, 200)).await;
        }
        store.run_pending_tasks().await;
        // A cheap, rarely requested, large entry is refused.
        let cheap = CacheKey::from_text("http://h/cheap");
        assert!(!store.insert(cheap, entry(20_000, 1)).await);
        // Nothing below the configured minimum is stored, full or not.
        let picky = Store::new(BUDGET, 4, true, 0.05);
        assert!(
            !picky
                .insert(CacheKey::from_text("http://h/x"), entry(10, 1))
                .await
        );
        assert!(
            picky
                .insert(CacheKey::from_text("http://h/y"), entry(10, 100))
                .await
        );
    }
}
