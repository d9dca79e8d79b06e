//! The HTTP cache layer.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use gratify_core::BoxError;
use http::header::{
    AGE, CONTENT_LENGTH, CONTENT_LOCATION, ETAG, HeaderName, HeaderValue, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, LOCATION,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::CacheBody;
use crate::directives::{RequestDirectives, ResponseDirectives};
use crate::key::{CacheKey, KeyPart, key_of};
use crate::policy::{Rules, Usable, initial_age, usable, vary_fields, vary_value};
use crate::store::{Entry, Store};
use crate::tier::{Scope, SharedTier, Tier, TierConfig, TierStats};

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

struct Shared {
    store: Store,
    config: HttpCacheConfig,
    /// Swapped whole by `reload`.
    model: Option<gratify_core::SharedModel>,
    key_part: Option<Box<dyn KeyPart>>,
    /// Fills in progress: followers wait for the value to turn `true`.
    inflight: Mutex<HashMap<CacheKey, watch::Receiver<bool>>>,
    /// Keys recently found uncacheable.
    hit_for_miss: moka::sync::Cache<CacheKey, ()>,
    /// Requests answered: hit, stale, miss, bypass.
    requests: [std::sync::atomic::AtomicU64; 4],
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

    fn status(&self, detail: &str) -> HeaderValue {
        // Recorded on the request's span if it declares `cache` (as
        // `gratify::Stack`'s does).
        tracing::Span::current().record("cache", detail);
        let (result, slot) = if detail.starts_with("hit") {
            ("hit", 0)
        } else if detail.contains("fwd=stale") {
            ("stale", 1)
        } else if detail.contains("fwd=bypass") {
            ("bypass", 3)
        } else {
            ("miss", 2)
        };
        self.requests[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("gratify_cache_requests_total", "result" => result).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = result;
        HeaderValue::from_str(&format!("{}; {detail}", self.config.name))
            .unwrap_or(HeaderValue::from_static("gratify"))
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
    /// Not eligible: passed through (unsafe method, `no-store`, …).
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
        self.shared.store.remove(&CacheKey::from_text(key)).await;
    }

    /// Removes every entry whose key starts with `prefix` (on every replica,
    /// with a shared tier).
    pub fn purge_prefix(&self, prefix: &str) {
        self.shared
            .store
            .remove_scope(Scope::Prefix(prefix.to_owned()));
    }

    /// Removes every entry tagged `tag` (by the tag header; on every
    /// replica, with a shared tier).
    pub fn purge_tag(&self, tag: &str) {
        self.shared.store.remove_scope(Scope::Tag(tag.to_owned()));
    }

    /// Removes everything (on every replica, with a shared tier).
    pub fn purge_all(&self) {
        self.shared.store.remove_scope(Scope::All);
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
        let n = |i: usize| self.shared.requests[i].load(std::sync::atomic::Ordering::Relaxed);
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
    /// Whether memory holds an answer this cache would give `request` now
    /// without calling the service: fresh, stale within the request's
    /// `max-stale`, or within the entry's `stale-while-revalidate`. The
    /// shared tier is not asked. The request is handed back with the answer
    /// (the look-up reads its headers after the store answers, without
    /// copying them). `gratify::Stack` uses it to let such requests past
    /// the limiter ([`PreAdmitted`](gratify_core::classify::PreAdmitted)):
    /// an answer from memory needs no slot.
    ///
    /// The answer may change before the request reaches the cache (a purge,
    /// an eviction); the request is then served by the service as usual.
    pub fn holds_answer<B: Send + 'static>(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = (bool, Request<B>)> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let safe = matches!(*request.method(), Method::GET | Method::HEAD)
            && !overridden(request.headers());
        let key = key_of(
            &request,
            &shared.config.scheme,
            shared.config.sort_query,
            shared.key_part.as_deref(),
        )
        .filter(|_| safe);
        async move {
            let Some(key) = key else {
                return (false, request);
            };
            let Some(variants) = shared.store.peek(&key).await else {
                return (false, request);
            };
            let held = variants.find(request.headers()).is_some_and(|entry| {
                let directives = RequestDirectives::from_headers(request.headers());
                !matches!(answer(entry, Instant::now(), &directives), Answer::Stale)
            });
            (held, request)
        }
    }

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
            .time_to_live(config.hit_for_miss.max(Duration::from_millis(1)))
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
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCache<S>;

    fn layer(&self, inner: S) -> HttpCache<S> {
        HttpCache {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of [`HttpCacheLayer`]. Clones share the store.
#[derive(Clone)]
pub struct HttpCache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for HttpCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache").finish_non_exhaustive()
    }
}

impl<S> HttpCache<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The purge handle.
    pub fn purge(&self) -> CachePurge {
        CachePurge {
            shared: Arc::clone(&self.shared),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<Request<B>> for HttpCache<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<CacheBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The ready service handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        Box::pin(handle(shared, inner, request))
    }
}

/// Answers a request, from the store or the origin.
async fn handle<S, B, RB>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<B>,
) -> Result<Response<CacheBody<RB>>, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let method = request.method().clone();
    let overridden = overridden(request.headers());
    let key = key_of(
        &request,
        &shared.config.scheme,
        shared.config.sort_query,
        shared.key_part.as_deref(),
    );

    // Unsafe methods go through, and invalidate what they may have changed.
    if !matches!(method, Method::GET | Method::HEAD) || overridden {
        let response = inner.call(request).await?;
        if !method.is_safe()
            && response.status().as_u16() < 400
            && let Some(k) = &key
        {
            invalidate(&shared, k, response.headers()).await;
        }
        let mut response = response.map(|b| CacheBody::stream(None, b));
        response
            .headers_mut()
            .insert(CACHE_STATUS, shared.status("fwd=bypass"));
        return Ok(response);
    }
    let Some(key) = key else {
        return Ok(bypass(&shared, inner.call(request).await?));
    };
    let directives = RequestDirectives::from_headers(request.headers());
    let head = method == Method::HEAD;

    // Look it up.
    let now = Instant::now();
    let variants = shared.store.get(&key).await;
    let entry = variants
        .as_ref()
        .and_then(|v| v.find(request.headers()).cloned());
    if let Some(entry) = &entry {
        match answer(entry, now, &directives) {
            Answer::Fresh { age, lifetime } => {
                // Nearly expired: refresh it now, once, in the background.
                if let Some(fraction) = shared.config.eager_refresh
                    && !lifetime.is_zero()
                    && age.as_secs_f64() >= lifetime.as_secs_f64() * fraction
                    && !head
                {
                    spawn_refresh(&shared, inner, &request, key.clone(), Arc::clone(entry));
                }
                return Ok(serve(&shared, entry, &request, now, "hit"));
            }
            Answer::StaleAccepted => {
                return Ok(serve(&shared, entry, &request, now, "hit"));
            }
            Answer::WhileRevalidating => {
                // Stale, within stale-while-revalidate: serve it and refresh
                // once in the background.
                spawn_refresh(&shared, inner, &request, key.clone(), Arc::clone(entry));
                return Ok(serve(&shared, entry, &request, now, "hit; fwd=stale"));
            }
            Answer::Stale if directives.only_if_cached => {
                return Ok(gateway_timeout(&shared, "fwd=stale"));
            }
            Answer::Stale => {}
        }
    } else if directives.only_if_cached {
        return Ok(gateway_timeout(&shared, "fwd=uri-miss"));
    }

    if head {
        // HEAD is answered from a stored GET, never stored itself.
        return Ok(bypass(&shared, inner.call(request).await?));
    }
    let miss = if entry.is_some() {
        "fwd=stale"
    } else if variants.is_some() {
        "fwd=vary-miss"
    } else {
        "fwd=uri-miss"
    };

    // Revalidate a stale entry that has validators.
    if let Some(stale) = entry {
        return revalidate(shared, inner, request, key, stale).await;
    }

    if shared.hit_for_miss.contains_key(&key) {
        return fetch(shared, inner, request, key, None, miss).await;
    }

    // Coalesce: one fill per key; the others wait for it, then look again.
    enum Role {
        Leader(watch::Sender<bool>),
        Follower(watch::Receiver<bool>),
    }
    let role = {
        let mut inflight = shared
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match inflight.get(&key) {
            Some(rx) => Role::Follower(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(false);
                inflight.insert(key.clone(), rx);
                Role::Leader(tx)
            }
        }
    };
    match role {
        Role::Leader(done) => fetch(shared, inner, request, key, Some(done), miss).await,
        Role::Follower(mut rx) => {
            let filled = matches!(
                tokio::time::timeout(shared.config.coalesce_wait, rx.wait_for(|d| *d)).await,
                Ok(Ok(_))
            );
            if filled {
                let now = Instant::now();
                if let Some(v) = shared.store.get(&key).await
                    && let Some(entry) = v.find(request.headers())
                    && entry.age(now) < entry.lifetime
                    && !directives.no_cache
                {
                    return Ok(serve(&shared, entry, &request, now, "hit; collapsed"));
                }
            }
            fetch(shared, inner, request, key, None, miss).await
        }
    }
}

/// Whether the request carries a method-override header: it is not the
/// safe request its method says.
fn overridden(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| METHOD_OVERRIDES.contains(&name.as_str()))
}

/// How a stored entry may answer a request now: the one decision the
/// request path and [`HttpCacheLayer::holds_answer`] share.
enum Answer {
    /// Fresh for this request.
    Fresh { age: Duration, lifetime: Duration },
    /// Stale, but within the request's `max-stale`.
    StaleAccepted,
    /// Stale, within the entry's `stale-while-revalidate`: served while a
    /// refresh runs.
    WhileRevalidating,
    /// To revalidate or fetch before answering.
    Stale,
}

fn answer(entry: &Entry, now: Instant, directives: &RequestDirectives) -> Answer {
    let age = entry.age(now);
    let lifetime = if entry.directives.no_cache {
        Duration::ZERO
    } else {
        entry.lifetime
    };
    match usable(age, lifetime, directives) {
        Usable::Fresh => return Answer::Fresh { age, lifetime },
        Usable::StaleAccepted => return Answer::StaleAccepted,
        Usable::Stale if directives.only_if_cached => return Answer::Stale,
        Usable::Stale => {}
    }
    // Only the entry's own expiry qualifies: a client asking for something
    // fresher than the entry is gets a fresh answer.
    let swr = entry
        .directives
        .stale_while_revalidate
        .unwrap_or(Duration::ZERO);
    if !swr.is_zero()
        && !directives.no_cache
        && directives.max_age.is_none()
        && directives.min_fresh.is_none()
        && !entry.directives.requires_revalidation()
        && age >= lifetime
        && age < lifetime + swr
    {
        Answer::WhileRevalidating
    } else {
        Answer::Stale
    }
}

fn bypass<RB>(shared: &Shared, response: Response<RB>) -> Response<CacheBody<RB>> {
    let mut response = response.map(|b| CacheBody::stream(None, b));
    response
        .headers_mut()
        .insert(CACHE_STATUS, shared.status("fwd=bypass"));
    response
}

fn gateway_timeout<RB>(shared: &Shared, detail: &str) -> Response<CacheBody<RB>> {
    let mut r = Response::new(CacheBody::empty());
    *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    r.headers_mut().insert(CACHE_STATUS, shared.status(detail));
    r
}

/// Serves a stored entry: `Age`, `Cache-Status`, and a 304 for a matching
/// conditional request.
fn serve<B, RB>(
    shared: &Shared,
    entry: &Entry,
    request: &Request<B>,
    now: Instant,
    detail: &str,
) -> Response<CacheBody<RB>> {
    let age = entry.age(now);
    let ttl = entry.lifetime.as_secs() as i64 - age.as_secs() as i64;
    let not_modified = conditional_matches(request.headers(), &entry.headers);
    let mut response = represent(shared, entry, request.headers());
    if request.method() == Method::HEAD || not_modified {
        *response.body_mut() = CacheBody::empty();
    }
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response.headers_mut().remove(CONTENT_LENGTH);
    }
    response
        .headers_mut()
        .insert(AGE, HeaderValue::from(age.as_secs()));
    response
        .headers_mut()
        .insert(CACHE_STATUS, shared.status(&format!("{detail}; ttl={ttl}")));
    response
}

/// The stored response in the representation the client accepts: the
/// identity body, or — for an entry stored encoded — the best stored coding
/// it accepts, decoded for a client that accepts none.
fn represent<RB>(shared: &Shared, entry: &Entry, request: &HeaderMap) -> Response<CacheBody<RB>> {
    let mut response = Response::new(CacheBody::empty());
    *response.status_mut() = entry.status;
    *response.version_mut() = entry.version;
    *response.headers_mut() = entry.headers.clone();
    if entry.encodings.is_empty() {
        *response.body_mut() = CacheBody::full(entry.body.clone());
        return response;
    }
    let accepted = gratify_core::encoding::Accepted::parse(request);
    let offered: Vec<&'static str> = entry.encodings.iter().map(|(c, _)| *c).collect();
    let headers = response.headers_mut();
    let vary_present = headers.get_all(http::header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|f| f.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if !vary_present {
        headers.append(
            http::header::VARY,
            HeaderValue::from_static("accept-encoding"),
        );
    }
    let (body, coding) = match accepted.best(&offered) {
        Some(coding) => {
            let bytes = entry
                .encodings
                .iter()
                .find(|(c, _)| *c == coding)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            (Some(bytes), Some(coding))
        }
        None => {
            let (coding, encoded) = &entry.encodings[0];
            let decoded = shared
                .config
                .recoder
                .as_ref()
                .and_then(|r| r.decode(coding, encoded).ok());
            (decoded, None)
        }
    };
    let Some(body) = body else {
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response.headers_mut().remove(CONTENT_LENGTH);
        return response;
    };
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(coding) = coding {
        headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static(coding),
        );
        if let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok())
            && !etag.starts_with("W/")
            && let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}"))
        {
            headers.insert(ETAG, weak);
        }
    }
    *response.body_mut() = CacheBody::full(body);
    response
}

/// Whether a client's `If-None-Match` (weak comparison) or
/// `If-Modified-Since` is satisfied by the stored response.
fn conditional_matches(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(etag));
    }
    match (
        crate::policy::single_date(request, &IF_MODIFIED_SINCE),
        crate::policy::single_date(stored, &LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Whether a stored body is worth keeping encoded: big enough, of a
/// compressible type, not encoded already, transformable.
fn worth_encoding(headers: &HeaderMap, directives: &ResponseDirectives, len: usize) -> bool {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    len >= 1024
        && !directives.no_transform
        && !headers.contains_key(http::header::CONTENT_ENCODING)
        && !headers.contains_key(http::header::CONTENT_RANGE)
        && gratify_core::encoding::compressible(content_type)
}

/// A coalesced fill or refresh in progress; dropping it (at the end, or in
/// a panic) removes it and wakes the requests waiting for it.
struct Inflight {
    shared: Arc<Shared>,
    key: CacheKey,
    done: watch::Sender<bool>,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
        let _ = self.done.send(true);
    }
}

/// What the origin's response became.
enum Filled<RB> {
    /// Read whole; `true` if the store kept it (the value gate may not).
    Stored(Arc<Entry>, bool),
    Passed(Response<CacheBody<RB>>),
}

/// Goes to the origin for `request`; stores what may be stored. With
/// `done`, this is the key's coalesced fill: it runs detached, so the
/// client going away does not cancel it, and followers are told when it ends.
async fn fetch<S, B, RB>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<B>,
    key: CacheKey,
    done: Option<watch::Sender<bool>>,
    miss: &'static str,
) -> Result<Response<CacheBody<RB>>, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let asked = Asked::of(&request);
    let request_headers = asked.headers.clone();
    let (tx, rx) = oneshot::channel();
    let fill = {
        let shared = Arc::clone(&shared);
        let key = key.clone();
        async move {
            // Ends the coalesced fill on every path, a panic included.
            let guard = done.map(|done| Inflight {
                shared: Arc::clone(&shared),
                key: key.clone(),
                done,
            });
            let result = fill(&shared, inner, request, &key, &asked).await;
            drop(guard);
            let _ = tx.send(result);
        }
    };
    tokio::spawn(fill);
    let Ok(result) = rx.await else {
        // The fill task panicked: nothing to serve; report it as the
        // origin's failure would be, as a 502.
        let mut r = Response::new(CacheBody::empty());
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r.headers_mut().insert(CACHE_STATUS, shared.status(miss));
        return Ok(r);
    };
    Ok(filled_response(&shared, result?, &request_headers, miss))
}

/// The request's facts that storing its response needs.
struct Asked {
    headers: HeaderMap,
    method: Method,
    path: String,
    class: Option<gratify_core::ClassId>,
}

impl Asked {
    fn of<B>(request: &Request<B>) -> Self {
        Self {
            headers: request.headers().clone(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            class: request.extensions().get::<gratify_core::ClassId>().copied(),
        }
    }

    /// The cost rate of a second of this request's delay.
    fn cost_rate(&self, shared: &Shared, latency: Duration) -> f64 {
        match &shared.model.as_ref().map(gratify_core::SharedModel::get) {
            Some(model) => {
                let id = self.class.unwrap_or_else(|| model.default_class());
                model
                    .get(id)
                    .map_or(1.0, |c| c.urgency(latency.as_secs_f64()))
            }
            None => 1.0,
        }
    }
}

async fn fill<S, B, RB>(
    shared: &Shared,
    mut inner: S,
    request: Request<B>,
    key: &CacheKey,
    asked: &Asked,
) -> Result<Filled<RB>, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Send,
    S::Future: Send,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let started = Instant::now();
    let sent_at = SystemTime::now();
    let response = inner.call(request).await?;
    Ok(process(shared, key, asked, response, started.elapsed(), sent_at).await)
}

/// Stores a response from the origin if it may be stored; otherwise (or if
/// its body is too large) passes it through, remembering the key as
/// hit-for-miss.
async fn process<RB>(
    shared: &Shared,
    key: &CacheKey,
    asked: &Asked,
    response: Response<RB>,
    latency: Duration,
    sent_at: SystemTime,
) -> Filled<RB>
where
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let directives = ResponseDirectives::from_headers(response.headers());
    let rules = shared.rules(&asked.path);
    let lifetime = match rules.storable(
        &asked.method,
        &asked.headers,
        response.status(),
        response.headers(),
        &directives,
    ) {
        Ok(l) => l,
        Err(reason) => {
            tracing::trace!(key = %key, ?reason, "not stored");
            shared.hit_for_miss.insert(key.clone(), ());
            return Filled::Passed(response.map(|b| CacheBody::stream(None, b)));
        }
    };
    let (parts, body) = response.into_parts();
    // Read the body up to the entry limit; past it, stream the rest.
    let limit = shared.config.max_entry_bytes;
    if body.size_hint().lower() > limit as u64 {
        shared.hit_for_miss.insert(key.clone(), ());
        return Filled::Passed(Response::from_parts(parts, CacheBody::stream(None, body)));
    }
    let mut body = Box::pin(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The origin's body failed: nothing to store or serve whole.
            let mut r = Response::new(CacheBody::empty());
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return Filled::Passed(r);
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                shared.hit_for_miss.insert(key.clone(), ());
                return Filled::Passed(Response::from_parts(
                    parts,
                    CacheBody::stream_pinned(Some(buf.freeze()), body),
                ));
            }
        }
    }
    let vary = vary_fields(&parts.headers)
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            let value = vary_value(&asked.headers, &name);
            (name, value)
        })
        .collect();
    let tags = shared
        .config
        .tag_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let keep_stale = directives
        .stale_while_revalidate
        .unwrap_or_default()
        .max(directives.stale_if_error.unwrap_or_default())
        .max(shared.config.fail_safe.unwrap_or_default())
        .max(if crate::policy::has_validator(&parts.headers) {
            // Keep entries with validators a while to revalidate cheaply.
            lifetime.max(Duration::from_secs(60))
        } else {
            Duration::ZERO
        });
    let mut body = buf.freeze();
    let mut headers = parts.headers;
    let mut encodings = Vec::new();
    if let Some(recoder) = shared.config.recoder.clone()
        && worth_encoding(&headers, &directives, body.len())
    {
        // Once, hard, on the blocking pool: the work of a miss, not of every hit.
        let data = body.clone();
        let done = tokio::task::spawn_blocking(move || {
            recoder
                .codings()
                .iter()
                .filter_map(|c| recoder.encode(c, &data).ok().map(|b| (*c, b)))
                .filter(|(_, b)| b.len() < data.len())
                .collect::<Vec<_>>()
        })
        .await;
        if let Ok(done) = done
            && !done.is_empty()
        {
            encodings = done;
            body = Bytes::new();
            headers.remove(CONTENT_LENGTH);
        }
    }
    let entry = Arc::new(Entry {
        status: parts.status,
        version: parts.version,
        initial_age: initial_age(&headers, latency, sent_at + latency),
        headers,
        body,
        stored_at: Instant::now(),
        lifetime,
        directives,
        vary,
        tags,
        origin_latency: latency,
        keep_stale,
        cost_rate: asked.cost_rate(shared, latency),
        encodings,
    });
    let kept = shared.store.insert(key.clone(), Arc::clone(&entry)).await;
    if kept {
        shared.hit_for_miss.invalidate(key);
    }
    // Served from the buffer whether or not the gate kept it.
    Filled::Stored(entry, kept)
}

fn filled_response<RB>(
    shared: &Shared,
    filled: Filled<RB>,
    request: &HeaderMap,
    detail: &str,
) -> Response<CacheBody<RB>> {
    match filled {
        Filled::Stored(entry, kept) => {
            let mut r = represent(shared, &entry, request);
            let detail = if kept {
                format!("{detail}; stored")
            } else {
                detail.to_owned()
            };
            r.headers_mut().insert(CACHE_STATUS, shared.status(&detail));
            r
        }
        Filled::Passed(mut r) => {
            r.headers_mut().insert(CACHE_STATUS, shared.status(detail));
            r
        }
    }
}

/// Revalidates a stale entry with the origin (inline), using its validators.
async fn revalidate<S, B, RB>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<B>,
    key: CacheKey,
    stale: Arc<Entry>,
) -> Result<Response<CacheBody<RB>>, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let has_validators = crate::policy::has_validator(&stale.headers);
    if !has_validators {
        return fetch(shared, inner, request, key, None, "fwd=stale").await;
    }
    let conditional = conditional_request(&request, &stale);
    let asked = Asked::of(&request);
    let started = Instant::now();
    let sent_at = SystemTime::now();
    let outcome = inner.call(conditional).await;
    let now = Instant::now();
    let age = stale.age(now);
    let stale_ok = |window: Option<Duration>| {
        !stale.directives.requires_revalidation()
            && window.is_some_and(|w| age < stale.lifetime + w)
    };
    let error_window = stale.directives.stale_if_error.max(shared.config.fail_safe);
    // The origin failed: serve stale within stale-if-error or the fail-safe,
    // a 504 if the entry must be revalidated, else nothing (pass it on).
    let failed = || {
        if stale_ok(error_window) {
            Some(serve(
                &shared,
                &stale,
                &request,
                now,
                "hit; fwd=stale; detail=stale-if-error",
            ))
        } else if stale.directives.requires_revalidation() {
            Some(gateway_timeout(
                &shared,
                "fwd=stale; detail=must-revalidate",
            ))
        } else {
            None
        }
    };
    match outcome {
        Ok(response) if response.status() == StatusCode::NOT_MODIFIED => {
            let refreshed = refreshed(&stale, response.headers(), started.elapsed());
            shared.store.insert(key, Arc::clone(&refreshed)).await;
            Ok(serve(
                &shared,
                &refreshed,
                &request,
                now,
                "fwd=stale; fwd-status=304",
            ))
        }
        Ok(response) if response.status().is_server_error() => {
            Ok(failed().unwrap_or_else(|| bypass(&shared, response)))
        }
        Ok(response) => {
            // A new representation: store it as a fill would.
            let filled = process(&shared, &key, &asked, response, started.elapsed(), sent_at).await;
            Ok(filled_response(
                &shared,
                filled,
                request.headers(),
                "fwd=stale",
            ))
        }
        Err(e) => failed().ok_or(e),
    }
}

/// The request sent to revalidate `entry`: the client's, body-less, with the
/// entry's validators in place of the client's own.
fn conditional_request<B: Default>(request: &Request<B>, entry: &Entry) -> Request<B> {
    let mut r = Request::new(B::default());
    *r.method_mut() = Method::GET;
    *r.uri_mut() = request.uri().clone();
    *r.version_mut() = request.version();
    *r.headers_mut() = request.headers().clone();
    let h = r.headers_mut();
    h.remove(IF_NONE_MATCH);
    h.remove(IF_MODIFIED_SINCE);
    h.remove(http::header::IF_MATCH);
    h.remove(http::header::IF_UNMODIFIED_SINCE);
    h.remove(http::header::IF_RANGE);
    if let Some(etag) = entry.headers.get(ETAG) {
        h.insert(IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = entry.headers.get(LAST_MODIFIED) {
        h.insert(IF_MODIFIED_SINCE, lm.clone());
    }
    r
}

/// The entry after a 304: its headers updated by the 304's (RFC 9111 §4.3.4),
/// freshness recomputed, age reset.
fn refreshed(entry: &Entry, update: &HeaderMap, latency: Duration) -> Arc<Entry> {
    let mut headers = entry.headers.clone();
    for name in update.keys() {
        if name == CONTENT_LENGTH {
            continue;
        }
        headers.remove(name);
        for v in update.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let directives = ResponseDirectives::from_headers(&headers);
    let lifetime =
        crate::policy::freshness_lifetime(&directives, &headers, None).unwrap_or(entry.lifetime);
    Arc::new(Entry {
        status: entry.status,
        version: entry.version,
        initial_age: initial_age(&headers, latency, SystemTime::now()),
        headers,
        body: entry.body.clone(),
        stored_at: Instant::now(),
        lifetime,
        directives,
        vary: entry.vary.clone(),
        tags: entry.tags.clone(),
        origin_latency: entry.origin_latency,
        keep_stale: entry.keep_stale,
        cost_rate: entry.cost_rate,
        encodings: entry.encodings.clone(),
    })
}

/// Starts at most one background refresh of `key` (stale-while-revalidate).
fn spawn_refresh<S, B, RB>(
    shared: &Arc<Shared>,
    mut inner: S,
    request: &Request<B>,
    key: CacheKey,
    stale: Arc<Entry>,
) where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let done = {
        let mut inflight = shared
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if inflight.contains_key(&key) {
            return;
        }
        let (tx, rx) = watch::channel(false);
        inflight.insert(key.clone(), rx);
        tx
    };
    let conditional = conditional_request(request, &stale);
    let asked = Asked::of(request);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _guard = Inflight {
            shared: Arc::clone(&shared),
            key: key.clone(),
            done,
        };
        let started = Instant::now();
        let sent_at = SystemTime::now();
        if poll_fn(|cx| inner.poll_ready(cx)).await.is_ok()
            && let Ok(response) = inner.call(conditional).await
        {
            if response.status() == StatusCode::NOT_MODIFIED {
                let fresh = refreshed(&stale, response.headers(), started.elapsed());
                shared.store.insert(key.clone(), fresh).await;
            } else if !response.status().is_server_error() {
                let _ = process(&shared, &key, &asked, response, started.elapsed(), sent_at).await;
            }
        }
    });
}

/// After a successful unsafe request, removes the target URI and the
/// same-origin `Location` / `Content-Location` (RFC 9111 §4.4).
async fn invalidate(shared: &Shared, key: &CacheKey, headers: &HeaderMap) {
    shared.store.remove(key).await;
    let text = key.as_str();
    // The origin: scheme://authority.
    let origin_end = text
        .find("://")
        .and_then(|i| text[i + 3..].find('/').map(|j| i + 3 + j))
        .unwrap_or(text.len());
    let origin = &text[..origin_end];
    for name in [LOCATION, CONTENT_LOCATION] {
        let Some(target) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let target = if target.starts_with('/') {
            format!("{origin}{target}")
        } else if target.starts_with(origin) {
            target.to_owned()
        } else {
            // Another origin: not ours to invalidate.
            continue;
        };
        shared.store.remove(&CacheKey::from_text(&target)).await;
    }
}
