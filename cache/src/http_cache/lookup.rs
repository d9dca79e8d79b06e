//! The first half: answer from memory, coalesce, and mark the rest.

use std::future::{Future, poll_fn};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use gratify_core::BoxError;
use gratify_core::slot::SlotHold;
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, COOKIE, IF_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE,
    PRAGMA, RANGE, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::flight::{self, Outcome, Role, Ticket};
use super::invalidate::Invalidation;
use super::represent::{PRECONDITIONS, conditional_matches, serve, serve_now, take_conditionals};
use super::{CACHE_STATUS, CachePurge, METHOD_OVERRIDES, Shared};
use crate::body::CacheBody;
use crate::directives::RequestDirectives;
use crate::entry::{Entry, Reuse, Variants};
use crate::key::{CacheKey, key_of, key_text_into};
use crate::policy::{Rules, strip_hop_by_hop};
use crate::tier::BoxFuture;

/// What the lookup found for a request it sends on, for
/// [`CacheFill`](super::CacheFill): the key, the stored response to
/// revalidate, and — for the request that fills the key for everyone — the
/// [`Ticket`]. Carried in the request's extensions.
#[derive(Clone)]
pub(crate) struct Looked {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: CacheKey,
    pub(crate) stale: Option<Arc<Entry>>,
    /// Taken by the fill half; a request that never reaches it drops it,
    /// which ends the fill as abandoned.
    pub(crate) ticket: Arc<Mutex<Option<Ticket>>>,
    /// `Cache-Status`'s `fwd` detail.
    pub(crate) miss: &'static str,
    /// Whether the request could fill for everyone: only then may its
    /// answer change what everyone is served (store, drop, hit-for-miss).
    pub(crate) may_lead: bool,
}

impl Looked {
    pub(crate) fn take_ticket(&self) -> Option<Ticket> {
        self.ticket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The first half of an [`HttpCacheLayer`](super::HttpCacheLayer), from
/// [`HttpCacheLayer::lookup`](super::HttpCacheLayer::lookup).
#[derive(Clone)]
pub struct CacheLookupLayer {
    shared: Arc<Shared>,
}

impl CacheLookupLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl std::fmt::Debug for CacheLookupLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLookupLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CacheLookupLayer {
    type Service = CacheLookup<S>;

    fn layer(&self, inner: S) -> CacheLookup<S> {
        CacheLookup {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Answers what the store can, holds requests for a key being filled until
/// the fill ends, and sends the rest on marked for [`CacheFill`](super::CacheFill).
/// Clones share the store.
///
/// A request answered from memory does not use the readiness `poll_ready`
/// obtained from the inner service: the next request does. Layers that
/// reserve capacity in `poll_ready` belong inside the fill half.
#[derive(Clone)]
pub struct CacheLookup<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for CacheLookup<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLookup").finish_non_exhaustive()
    }
}

impl<S> CacheLookup<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The purge handle.
    pub fn purge(&self) -> CachePurge {
        CachePurge {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S, B, RB> Service<Request<B>> for CacheLookup<S>
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
    type Future = LookupFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // A fresh hit is answered here, without a task or an allocation for
        // the way to the service.
        let seen = match hit_now(&self.shared, &self.inner, &request) {
            Ok(response) => return LookupFuture::ready(Ok(response)),
            Err(seen) => seen,
        };
        // The ready service handles this request; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        LookupFuture::boxed(Box::pin(lookup(
            Arc::clone(&self.shared),
            inner,
            request,
            seen,
        )))
    }
}

/// The future of [`CacheLookup`]: an answer from memory, ready at once, or
/// the way to the service.
pub struct LookupFuture<T> {
    kind: FutureKind<T>,
}

enum FutureKind<T> {
    Ready(Option<T>),
    Boxed(BoxFuture<T>),
}

impl<T> LookupFuture<T> {
    fn ready(value: T) -> Self {
        Self {
            kind: FutureKind::Ready(Some(value)),
        }
    }

    fn boxed(future: BoxFuture<T>) -> Self {
        Self {
            kind: FutureKind::Boxed(future),
        }
    }
}

// Nothing in it is pinned: the value is moved out whole, the boxed future
// is pinned by its box.
impl<T> Unpin for LookupFuture<T> {}

impl<T> Future for LookupFuture<T> {
    type Output = T;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().kind {
            FutureKind::Ready(value) => match value.take() {
                Some(value) => Poll::Ready(value),
                None => panic!("LookupFuture polled after completion"),
            },
            FutureKind::Boxed(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for LookupFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            FutureKind::Ready(_) => "ready",
            FutureKind::Boxed(_) => "on its way",
        };
        f.debug_struct("LookupFuture").field("kind", &kind).finish()
    }
}

/// What [`hit_now`] found before it handed a request to the async path.
struct Seen {
    key: CacheKey,
    /// What memory holds for the key (`None`: the tier may still hold it).
    variants: Option<Arc<Variants>>,
    /// Found on the request as the origin will see it (no hop-by-hop
    /// fields to strip): the async path may use it as it is.
    exact: bool,
}

/// A fresh answer from memory, decided without waiting; otherwise `Err`,
/// with what it found (the store counted the request if it got that far),
/// so the async path never keys or looks up twice. Only requests the
/// origin would see as they are take this path: none with hop-by-hop
/// headers beyond `Connection: keep-alive` or `close`, and no stored
/// variant recorded on a hop-by-hop field.
fn hit_now<S, B, RB>(
    shared: &Arc<Shared>,
    inner: &S,
    request: &Request<B>,
) -> Result<Response<CacheBody<RB>>, Option<Seen>>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Send + 'static,
{
    let method = request.method();
    let headers = request.headers();
    if !matches!(*method, Method::GET | Method::HEAD) || overridden(headers) {
        return Err(None);
    }
    let hop = headers
        .keys()
        .any(|n| crate::policy::HOP_BY_HOP.contains(&n.as_str()));
    if hop {
        let benign = headers.keys().all(|n| {
            !crate::policy::HOP_BY_HOP.contains(&n.as_str())
                || *n == http::header::CONNECTION
                || n.as_str() == "keep-alive"
        }) && crate::policy::connection_fields(headers)
            .iter()
            .all(|f| matches!(f.as_str(), "keep-alive" | "close"));
        if !benign {
            return Err(None);
        }
    }
    KEY.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut key) => {
            let answer = hit_keyed(shared, inner, request, hop, &mut key);
            if key.capacity() > 4096 {
                // Not kept for the next request: one long URI only.
                *key = String::new();
            }
            answer
        }
        // Only if a key part asked the same thread's cache for a hit.
        Err(_) => hit_keyed(shared, inner, request, hop, &mut String::new()),
    })
}

thread_local! {
    /// Where [`hit_now`] writes a request's key: a hit allocates none.
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// [`hit_now`] for a request without hop-by-hop fields beyond the benign
/// ones (`hop`: it has some), its key written into `key`.
fn hit_keyed<S, B, RB>(
    shared: &Arc<Shared>,
    inner: &S,
    request: &Request<B>,
    hop: bool,
    key: &mut String,
) -> Result<Response<CacheBody<RB>>, Option<Seen>>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Send + 'static,
{
    let method = request.method();
    let headers = request.headers();
    if !key_text_into(
        request,
        &shared.config.scheme,
        shared.config.sort_query,
        shared.key_part.as_deref(),
        key,
    ) {
        return Err(None);
    }
    let key = &*key;
    // The key is looked up as text; a miss takes it along as a `CacheKey`.
    let seen = |variants: Option<&Arc<Variants>>| Seen {
        key: CacheKey::from_text(key),
        variants: variants.cloned(),
        exact: !hop,
    };
    let Some(variants) = shared.store.local(key) else {
        return Err(Some(seen(None)));
    };
    let Some(entry) = variants.find(headers) else {
        return Err(Some(seen(Some(&variants))));
    };
    // With hop-by-hop headers present, the stored variants are matched as
    // the async path matches them (on the stripped request) unless none of
    // them varies on a hop-by-hop field.
    if hop
        && variants.entries.iter().any(|e| {
            e.vary
                .iter()
                .any(|(n, _)| crate::policy::HOP_BY_HOP.contains(&n.as_str()))
        })
    {
        return Err(Some(seen(Some(&variants))));
    }
    let directives = RequestDirectives::from_headers(headers);
    let now = Instant::now();
    match entry.reuse(&directives, now, shared.config.fail_safe) {
        Reuse::Fresh { age, lifetime } => {
            if let Some(fraction) = shared.config.eager_refresh
                && !lifetime.is_zero()
                && age.as_secs_f64() >= lifetime.as_secs_f64() * fraction
                && *method != Method::HEAD
                && may_lead(headers, &directives, &shared.rules(request.uri().path()))
            {
                refresh(shared, inner, request, &CacheKey::from_text(key), entry);
            }
            serve_now(shared, entry, method, headers, now, "hit")
                .ok_or_else(|| Some(seen(Some(&variants))))
        }
        Reuse::StaleAccepted => serve_now(shared, entry, method, headers, now, "hit")
            .ok_or_else(|| Some(seen(Some(&variants)))),
        Reuse::WhileRevalidating | Reuse::Validate { .. } => Err(Some(seen(Some(&variants)))),
    }
}

/// Whether the request carries a method-override header: it is not the
/// safe request its method says.
fn overridden(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| METHOD_OVERRIDES.contains(&name.as_str()))
}

/// Whether a request may fill its key for everyone: nothing in it makes
/// the origin's answer its own (credentials, cookies the route does not key
/// by, `no-store`) or partial or conditional in a way the cache does not
/// answer itself (`Range`, `If-Match`, …). Other requests go to the origin
/// alone — and do not change how anyone else is served.
fn may_lead(headers: &HeaderMap, directives: &RequestDirectives, rules: &Rules) -> bool {
    !directives.no_store
        && !headers.contains_key(AUTHORIZATION)
        && (rules.allow_cookies || !headers.contains_key(COOKIE))
        && ![RANGE, IF_RANGE, IF_MATCH, IF_UNMODIFIED_SINCE]
            .iter()
            .any(|h| headers.contains_key(h))
}

/// The statuses that count as the origin failing (RFC 5861): stale may be
/// served in their place, and a coalesced fill that gets one has failed.
pub(crate) fn origin_failed(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// A service made ready for one call, or the clone to make ready when the
/// request waited (a ready service may hold a reservation: it is not kept
/// while waiting).
enum Ready<S> {
    Now(S),
    Later(S),
}

impl<S> Ready<S> {
    // The clone is the point: the ready service is dropped (with whatever
    // it reserved), and a fresh clone is made ready when the wait ends.
    #[allow(clippy::redundant_clone)]
    fn release(self) -> Self
    where
        S: Clone,
    {
        match self {
            Self::Now(s) => Self::Later(s.clone()),
            later @ Self::Later(_) => later,
        }
    }

    async fn call<Req>(self, request: Req) -> Result<S::Response, S::Error>
    where
        S: Service<Req>,
    {
        let mut service = match self {
            Self::Now(s) => s,
            Self::Later(mut s) => {
                poll_fn(|cx| s.poll_ready(cx)).await?;
                s
            }
        };
        service.call(request).await
    }
}

async fn lookup<S, B, RB>(
    shared: Arc<Shared>,
    inner: S,
    mut request: Request<B>,
    seen: Option<Seen>,
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
    // Unsafe methods go through, and invalidate what they may have changed
    // (a GET that says it is another method is taken at its word).
    if !matches!(method, Method::GET | Method::HEAD) || overridden {
        let invalidation = (!method.is_safe() || overridden)
            .then(|| Invalidation::of(&shared, &request))
            .flatten();
        let mut inner = inner;
        let response = inner.call(request).await?;
        if let Some(invalidation) = invalidation
            && response.status().as_u16() < 400
        {
            invalidation.run(&shared, response.headers()).await;
        }
        // No `Cache-Status`: a cache never looks at such a request for an
        // answer, so there is nothing to say about one.
        return Ok(response.map(CacheBody::inner));
    }
    // A protocol switch (WebSocket) is a connection, not a response.
    if request.headers().contains_key(UPGRADE) {
        let mut inner = inner;
        return Ok(bypass(&shared, inner.call(request).await?));
    }
    // Key and vary on what the origin will see.
    strip_hop_by_hop(request.headers_mut());
    let counted = seen.is_some();
    let (key, known) = match seen {
        Some(Seen {
            key,
            variants,
            exact: true,
        }) => (key, variants),
        _ => {
            let Some(key) = key_of(
                &request,
                &shared.config.scheme,
                shared.config.sort_query,
                shared.key_part.as_deref(),
            ) else {
                let mut inner = inner;
                return Ok(bypass(&shared, inner.call(request).await?));
            };
            (key, None)
        }
    };
    let directives = RequestDirectives::from_headers(request.headers());
    let fail_safe = shared.config.fail_safe;
    let head = method == Method::HEAD;
    // Whether this request may fill for everyone: asked only off the hit
    // path.
    let leads = |request: &Request<B>| {
        let rules = shared.rules(request.uri().path());
        may_lead(request.headers(), &directives, &rules)
    };

    let now = Instant::now();
    let variants = match known {
        Some(variants) => Some(variants),
        None => shared.store.get(&key, counted).await,
    };
    let mut entry = variants
        .as_ref()
        .and_then(|v| v.find(request.headers()).cloned());
    if let Some(found) = &entry {
        match found.reuse(&directives, now, fail_safe) {
            Reuse::Fresh { age, lifetime } => {
                // Nearly expired: refresh it now, once, in the background.
                if let Some(fraction) = shared.config.eager_refresh
                    && !lifetime.is_zero()
                    && age.as_secs_f64() >= lifetime.as_secs_f64() * fraction
                    && !head
                    && leads(&request)
                {
                    refresh(&shared, &inner, &request, &key, found);
                }
                return Ok(serve(&shared, found, &method, request.headers(), now, "hit").await);
            }
            Reuse::StaleAccepted => {
                return Ok(serve(&shared, found, &method, request.headers(), now, "hit").await);
            }
            Reuse::WhileRevalidating => {
                if !head && leads(&request) {
                    refresh(&shared, &inner, &request, &key, found);
                }
                let detail = "hit; fwd=stale";
                return Ok(serve(&shared, found, &method, request.headers(), now, detail).await);
            }
            Reuse::Validate { .. } if directives.only_if_cached => {
                return Ok(gateway_timeout(&shared, "fwd=stale"));
            }
            Reuse::Validate { .. } => {}
        }
    } else if directives.only_if_cached {
        return Ok(gateway_timeout(&shared, "fwd=uri-miss"));
    }
    if head {
        // HEAD is answered from a stored GET, never stored itself.
        let mut inner = inner;
        return Ok(bypass(&shared, inner.call(request).await?));
    }
    let miss = if entry.is_some() {
        "fwd=stale"
    } else if variants.is_some() {
        "fwd=vary-miss"
    } else {
        "fwd=uri-miss"
    };

    // Coalesce: one fill per key; the others wait for its outcome — all
    // rounds together at most `coalesce_wait`.
    let may_lead = leads(&request);
    let mut solo = !may_lead || shared.hit_for_miss.contains_key(&key);
    let mut service = Ready::Now(inner);
    let deadline = Instant::now() + shared.config.coalesce_wait;
    let mut rounds = 0u32;
    let ticket = loop {
        if solo {
            break None;
        }
        let rx = match flight::elect(&shared, &key) {
            Role::Leader(ticket) => break Some(ticket),
            Role::Follower(rx) => rx,
        };
        service = service.release();
        rounds += 1;
        let pause = match flight::wait(rx, deadline).await {
            Some(Outcome::Filled(filled)) => {
                let now = Instant::now();
                let found = if filled.matches(request.headers()) {
                    Some(filled)
                } else {
                    // Another variant was filled: what fits this request?
                    shared
                        .store
                        .peek(&key)
                        .await
                        .and_then(|v| v.find(request.headers()).cloned())
                };
                if let Some(found) = found {
                    if !matches!(
                        found.reuse(&directives, now, fail_safe),
                        Reuse::Validate { .. }
                    ) {
                        let detail = "hit; collapsed";
                        return Ok(
                            serve(&shared, &found, &method, request.headers(), now, detail).await,
                        );
                    }
                    entry = Some(found);
                }
                // Filled, but not for this request (it wants fresher, or
                // another variant): alone.
                solo = true;
                continue;
            }
            // Not storable, or too slow: alone.
            Some(Outcome::Uncacheable) | None => {
                solo = true;
                continue;
            }
            Some(Outcome::Failed) => {
                let now = Instant::now();
                if let Some(stale) = &entry
                    && matches!(
                        stale.reuse(&directives, now, fail_safe),
                        Reuse::Validate { if_error: true }
                    )
                {
                    let detail = "hit; fwd=stale; detail=stale-if-error";
                    return Ok(
                        serve(&shared, stale, &method, request.headers(), now, detail).await,
                    );
                }
                // Every fill this crowd elected failed: the origin is failing,
                // and a crowd sent on alone now would be the stampede
                // coalescing exists to prevent.
                let failures = flight::failures(&shared, &key);
                if failures > shared.config.coalesce_retries {
                    return Ok(origin_failing(&shared, miss));
                }
                flight::jitter(failures, shared.config.coalesce_wait)
            }
            // The filling request never reached the origin (shed, its
            // client gone): elect another — a bounded number of times.
            Some(Outcome::Abandoned | Outcome::Pending) => {
                if rounds > 8 {
                    solo = true;
                    continue;
                }
                flight::jitter(0, shared.config.coalesce_wait)
            }
        };
        if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            solo = true;
        } else if flight::failures(&shared, &key) > shared.config.coalesce_retries {
            return Ok(origin_failing(&shared, miss));
        }
    };

    // A request that fills for everyone, or revalidates, asks the origin
    // for the whole response; the client's own conditions are answered here.
    let conditions = if ticket.is_some() || entry.is_some() {
        take_conditionals(request.headers_mut())
    } else {
        None
    };
    // What serving the stale entry in place of a failure needs.
    let asked = entry.as_ref().map(|_| {
        let mut h = request.headers().clone();
        if let Some(c) = &conditions {
            h.extend(c.clone());
        }
        h
    });
    request.extensions_mut().insert(Looked {
        shared: Arc::clone(&shared),
        key,
        stale: entry.clone(),
        ticket: Arc::new(Mutex::new(ticket)),
        miss,
        may_lead,
    });
    // The fill may outlive this request: it keeps the request's slot.
    request.extensions_mut().insert(SlotHold::new());
    let outcome = service.call(request).await;
    let stale = entry.as_deref().zip(asked.as_ref());
    answer(&shared, outcome, stale, &directives, conditions, miss).await
}

/// The answer to a request the lookup sent on: stale in place of an origin
/// failure where allowed, a `304` for the client's own conditions.
async fn answer<RB, E>(
    shared: &Shared,
    outcome: Result<Response<RB>, E>,
    stale: Option<(&Entry, &HeaderMap)>,
    directives: &RequestDirectives,
    conditions: Option<HeaderMap>,
    miss: &str,
) -> Result<Response<CacheBody<RB>>, E> {
    let failed = match &outcome {
        Ok(r) => origin_failed(r.status()),
        Err(_) => true,
    };
    if failed && let Some((stale, asked)) = stale {
        let now = Instant::now();
        if let Reuse::Validate { if_error: true } =
            stale.reuse(directives, now, shared.config.fail_safe)
        {
            let detail = "hit; fwd=stale; detail=stale-if-error";
            return Ok(serve(shared, stale, &Method::GET, asked, now, detail).await);
        }
        if outcome.is_err() && stale.directives.requires_revalidation() {
            // It must not be served stale, and the origin cannot be asked.
            return Ok(gateway_timeout(shared, "fwd=stale; detail=must-revalidate"));
        }
    }
    let mut response = outcome?.map(CacheBody::inner);
    if let Some(conditions) = conditions
        && response.status() == StatusCode::OK
        && conditional_matches(&conditions, response.headers())
    {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.body_mut() = CacheBody::empty();
        response.headers_mut().remove(CONTENT_LENGTH);
    }
    if !response.headers().contains_key(CACHE_STATUS) {
        response
            .headers_mut()
            .insert(CACHE_STATUS, shared.status(miss));
    }
    Ok(response)
}

/// Starts at most one background refresh of `key` through the inner service
/// — so through whatever limit sits between the halves, as a request of the
/// class of the request that found the entry: the limit admits, queues or
/// refuses it at the going price of a slot like any request of that class
/// (a refused refresh costs no one a wait). Only a request that could fill
/// for everyone starts one (no credentials or cookies go to the origin for
/// an answer others will be served), without its conditions, range or
/// `Cache-Control`.
fn refresh<S, B, RB>(
    shared: &Arc<Shared>,
    inner: &S,
    request: &Request<B>,
    key: &CacheKey,
    entry: &Arc<Entry>,
) where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Send + 'static,
{
    // A hit may be answered in `call`, which need not run on a runtime: no
    // runtime, no refresh (the next request will try).
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Some(ticket) = flight::try_lead(shared, key) else {
        return;
    };
    let mut r = Request::new(B::default());
    *r.method_mut() = Method::GET;
    *r.uri_mut() = request.uri().clone();
    *r.version_mut() = request.version();
    *r.headers_mut() = request.headers().clone();
    // As the origin would see it (a hit answered in `call` is not stripped).
    strip_hop_by_hop(r.headers_mut());
    *r.extensions_mut() = request.extensions().clone();
    for name in PRECONDITIONS.into_iter().chain([CACHE_CONTROL, PRAGMA]) {
        r.headers_mut().remove(name);
    }
    r.extensions_mut().insert(Looked {
        shared: Arc::clone(shared),
        key: key.clone(),
        stale: Some(Arc::clone(entry)),
        ticket: Arc::new(Mutex::new(Some(ticket))),
        miss: "fwd=stale",
        may_lead: true,
    });
    r.extensions_mut().insert(SlotHold::new());
    let service = Ready::Later(inner.clone());
    runtime.spawn(async move {
        // Nobody reads the answer: the fill stores it on its own.
        let _ = service.call(r).await;
    });
}

fn bypass<RB>(shared: &Shared, response: Response<RB>) -> Response<CacheBody<RB>> {
    let mut response = response.map(CacheBody::inner);
    response
        .headers_mut()
        .insert(CACHE_STATUS, shared.status("fwd=bypass"));
    response
}

/// The answer to a request whose coalesced fills all failed: 503, retry in
/// a second.
fn origin_failing<RB>(shared: &Shared, miss: &str) -> Response<CacheBody<RB>> {
    let mut r = Response::new(CacheBody::empty());
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = r.headers_mut();
    headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    headers.insert(CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    headers.insert(
        CACHE_STATUS,
        shared.status(&format!("{miss}; detail=origin-failed")),
    );
    r
}

fn gateway_timeout<RB>(shared: &Shared, detail: &str) -> Response<CacheBody<RB>> {
    let mut r = Response::new(CacheBody::empty());
    *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    r.headers_mut().insert(CACHE_STATUS, shared.status(detail));
    r
}
