//! The second half: go to the origin for what the lookup marked —
//! conditionally, to revalidate what it found stale — and store what may be
//! stored, while the client reads the response as it arrives.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use gratify_core::BoxError;
use http::header::{
    CONTENT_LENGTH, ETAG, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, SET_COOKIE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::flight::{self, Outcome, Ticket};
use super::lookup::{Looked, origin_failed};
use super::represent::{PRECONDITIONS, represent};
use super::{CACHE_STATUS, Shared};
use crate::body::{FillBody, Tee};
use crate::directives::ResponseDirectives;
use crate::entry::Entry;
use crate::key::CacheKey;
use crate::policy::{
    has_validator, initial_age, keep_stale, strip_hop_by_hop, vary_fields, vary_value,
};
use crate::tier::BoxFuture;
use gratify_core::slot::SlotHold;

/// The second half of an [`HttpCacheLayer`](super::HttpCacheLayer), from
/// [`HttpCacheLayer::fill`](super::HttpCacheLayer::fill).
#[derive(Clone)]
pub struct CacheFillLayer {
    shared: Arc<Shared>,
}

impl CacheFillLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl std::fmt::Debug for CacheFillLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheFillLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CacheFillLayer {
    type Service = CacheFill<S>;

    fn layer(&self, inner: S) -> CacheFill<S> {
        CacheFill {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Sends the requests [`CacheLookup`](super::CacheLookup) marked to the
/// service and stores what may be stored; passes every other request
/// through. Clones share the store.
#[derive(Clone)]
pub struct CacheFill<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for CacheFill<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheFill").finish_non_exhaustive()
    }
}

impl<S> CacheFill<S> {
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
}

impl<S, B, RB> Service<Request<B>> for CacheFill<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<FillBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let looked = request
            .extensions_mut()
            .remove::<Looked>()
            .filter(|l| Arc::ptr_eq(&l.shared, &self.shared));
        match looked {
            Some(looked) => Box::pin(fill(inner, request, looked)),
            None => {
                let future = inner.call(request);
                Box::pin(async move { Ok(future.await?.map(FillBody::passed)) })
            }
        }
    }
}

/// The request's facts that storing its response needs.
#[derive(Clone)]
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
}

async fn fill<S, B, RB>(
    inner: S,
    request: Request<B>,
    looked: Looked,
) -> Result<Response<FillBody<RB>>, S::Error>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Default + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let shared = Arc::clone(&looked.shared);
    let ticket = looked.take_ticket();
    let mut request = request;
    let slot = request.extensions_mut().remove::<SlotHold>();
    let exchange = Exchange {
        asked: Asked::of(&request),
        shared: Arc::clone(&shared),
        key: looked.key.clone(),
        stale: looked
            .stale
            .clone()
            .filter(|entry| has_validator(&entry.headers)),
        miss: looked.miss,
        may_lead: looked.may_lead,
        since: shared.epoch(),
        ticket,
        slot,
    };
    if exchange.ticket.is_none() {
        return exchange.run(inner, request).await;
    }
    // The fill for everyone runs on its own, under its request's slot: its
    // client leaving does not cancel what the others wait for. Once that
    // client is gone, the fill has what anyone waits at most — the
    // coalescing wait — to get its answer.
    let (tx, rx) = oneshot::channel();
    let wait = shared.config.coalesce_wait;
    let fill = async move {
        let mut tx = tx;
        let done = {
            let mut work = std::pin::pin!(exchange.run(inner, request));
            let mut gone = std::pin::pin!(async {
                tx.closed().await;
                tokio::time::sleep(wait).await;
            });
            poll_fn(move |cx| {
                if let Poll::Ready(result) = work.as_mut().poll(cx) {
                    return Poll::Ready(Some(result));
                }
                gone.as_mut().poll(cx).map(|()| None)
            })
            .await
        };
        if let Some(result) = done {
            let _ = tx.send(result);
        }
    };
    // In the request's span: what the fill decides is the request's.
    tokio::spawn(tracing::Instrument::in_current_span(fill));
    match rx.await {
        Ok(result) => result,
        // The fill panicked (its ticket ended it as abandoned): report it as
        // the origin's failure would be, as a 502.
        Err(_) => {
            let mut r = Response::new(FillBody::empty());
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            r.headers_mut()
                .insert(CACHE_STATUS, shared.status(looked.miss));
            Ok(r)
        }
    }
}

/// One request's trip to the origin.
struct Exchange {
    asked: Asked,
    shared: Arc<Shared>,
    key: CacheKey,
    /// The stored response to revalidate (it has validators).
    stale: Option<Arc<Entry>>,
    miss: &'static str,
    /// Whether its answer may change what everyone is served.
    may_lead: bool,
    /// The invalidation epoch when it started.
    since: u64,
    ticket: Option<Ticket>,
    /// The request's share of its slot, kept while the exchange (and the
    /// tee that finishes its body) runs.
    slot: Option<SlotHold>,
}

impl Exchange {
    async fn run<S, B, RB>(
        mut self,
        mut inner: S,
        mut request: Request<B>,
    ) -> Result<Response<FillBody<RB>>, S::Error>
    where
        S: Service<Request<B>, Response = Response<RB>> + Send,
        S::Future: Send,
        B: Default + Send + 'static,
        RB: Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        // Kept to ask again, unconditionally, if a 304 does not select what
        // the cache holds.
        let again = self.stale.as_ref().map(|_| {
            (
                request.uri().clone(),
                request.version(),
                request.extensions().clone(),
            )
        });
        if let Some(stale) = &self.stale {
            set_validators(request.headers_mut(), stale);
        }
        loop {
            let started = Instant::now();
            let sent_at = SystemTime::now();
            let response = match inner.call(request).await {
                Ok(r) => r,
                Err(e) => {
                    flight::finish(&mut self.ticket, Outcome::Failed);
                    return Err(e);
                }
            };
            let latency = started.elapsed();
            if response.status() == StatusCode::NOT_MODIFIED
                && let Some(stale) = self.stale.take()
            {
                let rules = self.shared.rules(&self.asked.path);
                let fail_safe = self.shared.config.fail_safe;
                if let Some((fresh, keep)) = stale.freshened(
                    response.headers(),
                    &rules,
                    fail_safe,
                    latency,
                    sent_at + latency,
                ) {
                    return Ok(self.freshened(fresh, keep, response.headers()).await);
                }
                // The 304 is about another response than the one stored.
                let Some((uri, version, extensions)) = again.clone() else {
                    return Ok(self.passed(response));
                };
                drop(response);
                let mut r = Request::new(B::default());
                *r.uri_mut() = uri;
                *r.version_mut() = version;
                *r.headers_mut() = self.asked.headers.clone();
                *r.extensions_mut() = extensions;
                request = r;
                if let Err(e) = poll_fn(|cx| inner.poll_ready(cx)).await {
                    flight::finish(&mut self.ticket, Outcome::Failed);
                    return Err(e);
                }
                continue;
            }
            if origin_failed(response.status()) {
                flight::finish(&mut self.ticket, Outcome::Failed);
                return Ok(self.passed(response));
            }
            return Ok(self.store_or_pass(response, latency, sent_at).await);
        }
    }

    /// The stored response updated by a 304: stored again if it still may
    /// be, else dropped — and served to this request either way.
    async fn freshened<RB>(
        mut self,
        fresh: Arc<Entry>,
        keep: bool,
        update: &HeaderMap,
    ) -> Response<FillBody<RB>> {
        // A request that could not fill for everyone (credentials,
        // cookies, …) is answered, and changes nothing for anyone else.
        let shared_answer = keep && self.may_lead && !self.shared.overtaken(&self.key, self.since);
        let stored = if shared_answer {
            self.shared
                .store
                .insert(self.key.clone(), Arc::clone(&fresh))
                .await
        } else {
            if self.may_lead && !keep {
                self.shared.store.remove(&self.key).await;
            }
            false
        };
        flight::finish(
            &mut self.ticket,
            if shared_answer {
                Outcome::Filled(Arc::clone(&fresh))
            } else {
                Outcome::Uncacheable
            },
        );
        let mut response = represent(&self.shared, &fresh, &self.asked.headers, None, None)
            .await
            .map(FillBody::full);
        // Cookies the origin set are this request's alone.
        for cookie in update.get_all(SET_COOKIE) {
            response.headers_mut().append(SET_COOKIE, cookie.clone());
        }
        let detail = if stored {
            "fwd=stale; fwd-status=304; stored"
        } else {
            "fwd=stale; fwd-status=304"
        };
        response
            .headers_mut()
            .insert(CACHE_STATUS, self.shared.status(detail));
        response
    }

    fn passed<RB>(&self, response: Response<RB>) -> Response<FillBody<RB>> {
        let mut response = response.map(FillBody::passed);
        self.hide_tags(response.headers_mut());
        response
            .headers_mut()
            .insert(CACHE_STATUS, self.shared.status(self.miss));
        response
    }

    fn hide_tags(&self, headers: &mut HeaderMap) {
        if !self.shared.config.expose_tags
            && let Some(tag) = &self.shared.config.tag_header
        {
            headers.remove(tag);
        }
    }

    /// Stores the origin's response if it may be stored, reading what of its
    /// body is ready now; the rest streams to the client while a task keeps
    /// a copy. What may not be stored passes through, and — if the response
    /// itself forbids storing — the key is remembered as hit-for-miss.
    async fn store_or_pass<RB>(
        mut self,
        response: Response<RB>,
        latency: Duration,
        sent_at: SystemTime,
    ) -> Response<FillBody<RB>>
    where
        RB: Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let directives = ResponseDirectives::from_headers(response.headers());
        let rules = self.shared.rules(&self.asked.path);
        let lifetime = match rules.storable(
            &self.asked.method,
            &self.asked.headers,
            response.status(),
            response.headers(),
            &directives,
        ) {
            Ok(lifetime) => lifetime,
            Err(reason) => {
                tracing::trace!(key = %self.key, ?reason, "not stored");
                // Only the response can make a key hit-for-miss: a request's
                // own credentials, cookies or no-store concern it alone.
                // Nor can a partial or conditional answer, or one to a
                // request that could not fill for everyone.
                let by_response = self.may_lead
                    && !matches!(response.status().as_u16(), 206 | 304 | 412)
                    && rules
                        .storable(
                            &Method::GET,
                            &HeaderMap::new(),
                            response.status(),
                            response.headers(),
                            &directives,
                        )
                        .is_err();
                if by_response {
                    self.shared.hit_for_miss.insert(self.key.clone(), ());
                }
                flight::finish(&mut self.ticket, Outcome::Uncacheable);
                return self.passed(response);
            }
        };
        let limit = self.shared.config.max_entry_bytes;
        let (parts, body) = response.into_parts();
        if body.size_hint().lower() > limit as u64 {
            return self.too_large(Response::from_parts(parts, FillBody::passed(body)));
        }
        let mut body = Box::pin(body);
        let mut chunks = Chunks::default();
        // What is ready now is read now: a body the service already holds
        // whole is stored before the client sees it.
        loop {
            let polled = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
            match polled {
                Poll::Ready(None) => break,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        chunks.push(data);
                        if chunks.len > limit {
                            let prefix = chunks.concat();
                            let response =
                                Response::from_parts(parts, FillBody::prefixed(prefix, body));
                            return self.too_large(response);
                        }
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    // The origin's body failed: nothing to store or serve whole.
                    flight::finish(&mut self.ticket, Outcome::Failed);
                    let mut r = Response::new(FillBody::empty());
                    *r.status_mut() = StatusCode::BAD_GATEWAY;
                    r.headers_mut()
                        .insert(CACHE_STATUS, self.shared.status(self.miss));
                    return r;
                }
                Poll::Pending => {
                    let head = Head {
                        parts,
                        directives,
                        lifetime,
                        latency,
                        sent_at,
                    };
                    return self.tee(head, body, chunks);
                }
            }
        }
        let identity = chunks.concat();
        let cookies: Vec<HeaderValue> = parts.headers.get_all(SET_COOKIE).iter().cloned().collect();
        let head = Head {
            parts,
            directives,
            lifetime,
            latency,
            sent_at,
        };
        let entry = entry_of(&self.shared, &self.asked, head, identity.clone()).await;
        let (stored, outcome) = self.shared.fill(&self.key, &entry, self.since).await;
        flight::finish(&mut self.ticket, outcome);
        let mut response = represent(
            &self.shared,
            &entry,
            &self.asked.headers,
            Some(identity),
            None,
        )
        .await
        .map(FillBody::full);
        for cookie in cookies {
            response.headers_mut().append(SET_COOKIE, cookie);
        }
        let detail = if stored {
            format!("{}; stored", self.miss)
        } else {
            self.miss.to_owned()
        };
        response
            .headers_mut()
            .insert(CACHE_STATUS, self.shared.status(&detail));
        response
    }

    /// A body larger than what the cache keeps: passed on, the key
    /// remembered as hit-for-miss.
    fn too_large<RB>(mut self, mut response: Response<FillBody<RB>>) -> Response<FillBody<RB>> {
        if self.may_lead {
            self.shared.hit_for_miss.insert(self.key.clone(), ());
        }
        flight::finish(&mut self.ticket, Outcome::Uncacheable);
        self.hide_tags(response.headers_mut());
        response
            .headers_mut()
            .insert(CACHE_STATUS, self.shared.status(self.miss));
        response
    }

    /// Streams the rest of the body to the client from a task that keeps a
    /// copy and stores it at the end. The task outlives the client by at
    /// most the coalescing wait (no one waits longer for the fill); past
    /// `max_entry_bytes` the client reads the origin directly and nothing is
    /// stored.
    fn tee<RB>(self, head: Head, mut body: Pin<Box<RB>>, chunks: Chunks) -> Response<FillBody<RB>>
    where
        RB: Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let hint = {
            let inner = body.size_hint();
            let mut h = SizeHint::new();
            h.set_lower(inner.lower() + chunks.len as u64);
            if let Some(upper) = inner.upper() {
                h.set_upper(upper + chunks.len as u64);
            }
            h
        };
        for chunk in &chunks.parts {
            let _ = tx.send(Tee::Data(chunk.clone()));
        }
        let mut client_headers = head.parts.headers.clone();
        self.hide_tags(&mut client_headers);
        client_headers.insert(CACHE_STATUS, self.shared.status(self.miss));
        let mut client_parts = head.parts.clone();
        client_parts.headers = client_headers;
        let Self {
            asked,
            shared,
            key,
            mut ticket,
            since,
            may_lead,
            slot,
            ..
        } = self;
        tokio::spawn(async move {
            let limit = shared.config.max_entry_bytes;
            let mut chunks = chunks;
            let mut client = Some(tx);
            // Held until the copy is stored or given up.
            let _slot = slot;
            let mut gone_since: Option<Instant> = None;
            loop {
                let polled = match &client {
                    Some(tx) => {
                        // The next frame, or the client leaving first.
                        let mut frame = std::pin::pin!(body.frame());
                        let mut closed = std::pin::pin!(tx.closed());
                        poll_fn(|cx| {
                            if let Poll::Ready(f) = frame.as_mut().poll(cx) {
                                return Poll::Ready(Some(f));
                            }
                            closed.as_mut().poll(cx).map(|()| None)
                        })
                        .await
                    }
                    None => {
                        let since = *gone_since.get_or_insert_with(Instant::now);
                        let deadline = since + shared.config.coalesce_wait;
                        match tokio::time::timeout_at(deadline, body.frame()).await {
                            Ok(next) => Some(next),
                            Err(_) => return, // the ticket ends it as abandoned
                        }
                    }
                };
                let Some(next) = polled else {
                    client = None;
                    continue;
                };
                match next {
                    None => break,
                    Some(Err(e)) => {
                        if let Some(tx) = &client {
                            let _ = tx.send(Tee::Error(e.into()));
                        }
                        flight::finish(&mut ticket, Outcome::Failed);
                        return;
                    }
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            chunks.push(data.clone());
                            if let Some(tx) = &client
                                && tx.send(Tee::Data(data)).is_err()
                            {
                                client = None;
                            }
                            if chunks.len > limit {
                                if may_lead {
                                    shared.hit_for_miss.insert(key.clone(), ());
                                }
                                flight::finish(&mut ticket, Outcome::Uncacheable);
                                if let Some(tx) = client {
                                    let _ = tx.send(Tee::Rest(body));
                                }
                                return;
                            }
                        }
                        Err(frame) => {
                            if let (Ok(trailers), Some(tx)) = (frame.into_trailers(), &client) {
                                let _ = tx.send(Tee::Trailers(trailers));
                            }
                        }
                    },
                }
            }
            // Stored before the client sees the end: a request it sends next
            // finds the entry.
            let entry = entry_of(&shared, &asked, head, chunks.concat()).await;
            let (_, outcome) = shared.fill(&key, &entry, since).await;
            flight::finish(&mut ticket, outcome);
            if let Some(tx) = client {
                let _ = tx.send(Tee::End);
            }
        });
        Response::from_parts(client_parts, FillBody::tee(rx, hint))
    }
}

/// The response head and the facts its entry needs.
struct Head {
    parts: http::response::Parts,
    directives: ResponseDirectives,
    lifetime: Duration,
    latency: Duration,
    sent_at: SystemTime,
}

/// Body bytes as they arrived.
#[derive(Default)]
struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.parts.push(data);
        }
    }

    /// One buffer (no copy for a body that came in one piece).
    fn concat(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut buf = BytesMut::with_capacity(self.len);
                for part in many {
                    buf.extend_from_slice(part);
                }
                buf.freeze()
            }
        }
    }
}

/// The request sent to revalidate `entry`: the stored response's validators
/// in place of any the request had, and no range.
fn set_validators(headers: &mut HeaderMap, entry: &Entry) {
    for name in PRECONDITIONS {
        headers.remove(name);
    }
    if let Some(etag) = entry.headers.get(ETAG) {
        headers.insert(IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = entry.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, lm.clone());
    }
}

/// The entry for a response read whole: what the request varied on, its
/// tags, how long to keep it stale, the body encoded once per coding (off
/// the async threads) — and none of what a shared cache never replays
/// (cookies, hop-by-hop fields).
async fn entry_of(shared: &Shared, asked: &Asked, head: Head, body: Bytes) -> Arc<Entry> {
    let Head {
        parts,
        directives,
        lifetime,
        latency,
        sent_at,
    } = head;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(SET_COOKIE);
    headers.remove("set-cookie2");
    let vary = vary_fields(&headers)
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
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let keep_stale = keep_stale(&directives, &headers, lifetime, shared.config.fail_safe);
    let mut body = body;
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
    Arc::new(Entry {
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
        cost_rate: shared.cost_rate(asked.class, latency),
        encodings,
        prepared: Default::default(),
    })
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
