//! A stored response and the variants stored under one key.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use tokio::time::Instant;

use crate::directives::{RequestDirectives, ResponseDirectives};
use crate::policy::{
    Rules, Usable, initial_age, keep_stale, merge_304, selects, usable, vary_fields, vary_value,
};

/// What one field costs a `HeaderMap` beyond its bytes: the bucket (name,
/// value, hash, links) and its index slot.
const MAP_ENTRY_BYTES: usize = 104;

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
    /// What a second of its class's delay costs (1 without a cost model).
    pub(crate) cost_rate: f64,
    /// The body encoded once per coding (then `body` is empty and identity
    /// is decoded on demand), best first.
    pub(crate) encodings: Vec<(&'static str, Bytes)>,
    /// What hits on it reuse: see [`Prepared`].
    pub(crate) prepared: Prepared,
}

/// What every hit on an entry would otherwise build again: its headers as a
/// hit sends them, and the whole map the last hit sent, `Age` and
/// `Cache-Status` included.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    headers: OnceLock<HeaderMap>,
    /// The age (whole seconds) the last hit's map was built for, and the
    /// map: both fields depend only on the age, so hits in the same second
    /// send the same map.
    hit: Mutex<Option<(u64, HeaderMap)>>,
}

impl Entry {
    /// Its headers as a hit sends them, with `Age` and `Cache-Status` in
    /// place (values the hit replaces) and without `hidden` (the tag header
    /// clients are not sent): a hit clones one prepared map instead of
    /// building one header by header. An entry belongs to one cache, so
    /// `hidden` is the same on every call.
    pub(crate) fn served_headers(&self, hidden: Option<&HeaderName>) -> HeaderMap {
        self.prepared
            .headers
            .get_or_init(|| {
                if self.headers.len() > 1024 {
                    // Far beyond any real response; kept as it is.
                    let mut headers = self.headers.clone();
                    if let Some(hidden) = hidden {
                        headers.remove(hidden);
                    }
                    return headers;
                }
                // Room to spare: a map filled to its capacity grows (a
                // reallocation and a rehash) on every insert, even one that
                // replaces a value.
                let mut headers = HeaderMap::with_capacity(self.headers.len() + 4);
                headers.extend(
                    self.headers
                        .iter()
                        .filter(|(k, _)| Some(*k) != hidden)
                        .map(|(k, v)| (k.clone(), v.clone())),
                );
                headers.insert(http::header::AGE, HeaderValue::from_static("0"));
                headers.insert(
                    crate::http_cache::CACHE_STATUS,
                    HeaderValue::from_static("-"),
                );
                headers
            })
            .clone()
    }

    /// Its headers as a hit at `age` whole seconds sends them (without
    /// `hidden`, with `Age` and the `Cache-Status` that `status` builds): the
    /// map the last hit sent if it was at the same age, else one built now
    /// (and kept for the next hit unless another hit holds the kept one at
    /// that moment — nobody waits).
    pub(crate) fn hit_headers(
        &self,
        hidden: Option<&HeaderName>,
        age: u64,
        status: impl FnOnce() -> HeaderValue,
    ) -> HeaderMap {
        let Ok(mut last) = self.prepared.hit.try_lock() else {
            return self.hit_headers_now(hidden, age, status);
        };
        if let Some((at, headers)) = &*last
            && *at == age
        {
            return headers.clone();
        }
        let headers = self.hit_headers_now(hidden, age, status);
        *last = Some((age, headers.clone()));
        headers
    }

    fn hit_headers_now(
        &self,
        hidden: Option<&HeaderName>,
        age: u64,
        status: impl FnOnce() -> HeaderValue,
    ) -> HeaderMap {
        let mut headers = self.served_headers(hidden);
        // In place of the prepared fields: no growth (and a map at its size
        // limit is answered without them rather than a panic).
        let _ = headers.try_insert(http::header::AGE, HeaderValue::from(age));
        let _ = headers.try_insert(crate::http_cache::CACHE_STATUS, status());
        headers
    }

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
        // Each field's name and value once (the maps a hit sends share
        // their bytes), and a map entry (about a hundred bytes: name,
        // value, hash, links, index) in each of the three maps it may be
        // in: as stored, as hits send it, as the last hit sent it.
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 3 * MAP_ENTRY_BYTES)
            .sum();
        let encoded: usize = self.encodings.iter().map(|(_, b)| b.len()).sum();
        self.body.len() + encoded + headers + 256
    }

    /// What one hit on it saves: the origin's latency at its class's cost rate.
    pub(crate) fn saved_per_hit(&self) -> f64 {
        self.origin_latency.as_secs_f64() * self.cost_rate
    }

    /// How long moka should keep it: freshness plus the stale window.
    pub(crate) fn keep_for(&self, now: Instant) -> Duration {
        (self.lifetime + self.keep_stale).saturating_sub(self.age(now))
    }
}

/// The variants stored under one key.
#[derive(Debug)]
pub(crate) struct Variants {
    pub(crate) entries: Vec<Arc<Entry>>,
    /// How long the store keeps the key: the longest of its variants.
    pub(crate) keep_for: Duration,
    /// Bytes held by every variant.
    pub(crate) weight: u32,
}

impl Variants {
    /// Variants as stored now.
    pub(crate) fn new(entries: Vec<Arc<Entry>>, now: Instant) -> Self {
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
        Self {
            entries,
            keep_for,
            weight,
        }
    }

    pub(crate) fn find(&self, request: &HeaderMap) -> Option<&Arc<Entry>> {
        self.entries.iter().find(|e| e.matches(request))
    }

    /// Delay cost saved per hit, per byte held.
    pub(crate) fn density(&self, frequency: u32) -> f64 {
        let saved: f64 = self.entries.iter().map(|e| e.saved_per_hit()).sum::<f64>()
            / self.entries.len().max(1) as f64;
        f64::from(frequency) * saved / f64::from(self.weight.max(1))
    }
}

/// Whether and how a stored response may answer a request now: the one
/// decision every path that serves from the store asks (a hit, `max-stale`,
/// `stale-while-revalidate`, `stale-if-error`, the fail-safe, a coalesced
/// request after its fill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reuse {
    /// Fresh for this request.
    Fresh { age: Duration, lifetime: Duration },
    /// Stale, within the request's `max-stale`.
    StaleAccepted,
    /// Stale, within the response's `stale-while-revalidate`: served while
    /// one refresh runs.
    WhileRevalidating,
    /// To validate (or fetch) before answering; `if_error` if it may still
    /// be served when the origin fails (`stale-if-error`, the fail-safe).
    Validate { if_error: bool },
}

impl Entry {
    /// How this stored response may answer a request with `request`'s
    /// directives now. A response that says `no-cache`, `must-revalidate`,
    /// `proxy-revalidate` or `s-maxage` is never served stale, on any path
    /// (RFC 9111 §4.2.4, §5.2.2); a request's `max-age`, `min-fresh` and
    /// `no-cache` bound every stale answer as they bound a fresh one.
    pub(crate) fn reuse(
        &self,
        request: &RequestDirectives,
        now: Instant,
        fail_safe: Option<Duration>,
    ) -> Reuse {
        let age = self.age(now);
        let d = &self.directives;
        let lifetime = if d.no_cache {
            Duration::ZERO
        } else {
            self.lifetime
        };
        let may_be_stale = !d.no_cache && !d.requires_revalidation();
        match usable(age, lifetime, request) {
            Usable::Fresh => return Reuse::Fresh { age, lifetime },
            Usable::StaleAccepted if may_be_stale => return Reuse::StaleAccepted,
            _ => {}
        }
        // What the request itself allows of a stale answer.
        let request_allows = !request.no_cache
            && request.min_fresh.is_none()
            && request.max_age.is_none_or(|max_age| age < max_age);
        if !may_be_stale || !request_allows {
            return Reuse::Validate { if_error: false };
        }
        // Only the response's own expiry qualifies: a client asking for
        // something fresher than the response is gets a fresh answer.
        let swr = d.stale_while_revalidate.unwrap_or(Duration::ZERO);
        if !swr.is_zero() && request.max_age.is_none() && age < lifetime.saturating_add(swr) {
            return Reuse::WhileRevalidating;
        }
        let window = d.stale_if_error.max(fail_safe);
        Reuse::Validate {
            if_error: window.is_some_and(|w| age < lifetime.saturating_add(w)),
        }
    }

    /// This response updated by a `304` to a request that revalidated it
    /// (RFC 9111 §4.3.4): `None` if the `304`'s validators do not select it;
    /// otherwise the merged response, its freshness recomputed from the
    /// `304`'s `Date` and `Age`, and whether it may still be stored — not if
    /// the merged fields (or the `304` itself) say `no-store` or `private`,
    /// or the `304` changes `Vary`.
    pub(crate) fn freshened(
        &self,
        update: &HeaderMap,
        rules: &Rules,
        fail_safe: Option<Duration>,
        latency: Duration,
        received: SystemTime,
    ) -> Option<(Arc<Self>, bool)> {
        if !selects(update, &self.headers) {
            return None;
        }
        let headers = merge_304(&self.headers, update);
        let directives = ResponseDirectives::from_headers(&headers);
        let own = ResponseDirectives::from_headers(update);
        let vary_changed = update.contains_key(http::header::VARY)
            && vary_fields(update) != vary_fields(&self.headers);
        let storable = rules.storable(
            &Method::GET,
            &HeaderMap::new(),
            self.status,
            &headers,
            &directives,
        );
        let keep = !own.no_store && !own.private && !vary_changed && storable.is_ok();
        let lifetime = storable.unwrap_or(Duration::ZERO);
        Some((
            Arc::new(Self {
                status: self.status,
                version: self.version,
                initial_age: initial_age(update, latency, received),
                keep_stale: keep_stale(&directives, &headers, lifetime, fail_safe),
                headers,
                body: self.body.clone(),
                stored_at: Instant::now(),
                lifetime,
                directives,
                vary: self.vary.clone(),
                tags: self.tags.clone(),
                origin_latency: self.origin_latency,
                cost_rate: self.cost_rate,
                encodings: self.encodings.clone(),
                prepared: Prepared::default(),
            }),
            keep,
        ))
    }
}
