//! How a stored response is shown to a client: the coding it accepts, `Age`,
//! `304` for a conditional request it satisfies, no body for HEAD, and
//! nothing a shared cache must not replay.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    AGE, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, DATE, ETAG, HeaderMap, HeaderName,
    HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE, VARY,
};
use http::{Method, Response, StatusCode};
use tokio::time::Instant;

use super::{CACHE_STATUS, Shared};
use crate::body::CacheBody;
use crate::entry::Entry;

/// The stored response in the representation the client accepts: the
/// identity body, or — for an entry stored encoded — the best stored coding
/// it accepts, decoded (on the blocking pool, never on the async threads)
/// for a client that accepts none. `identity`, when the caller still holds
/// the body as the origin sent it, spares the decoding. `hit`: a hit, which
/// [`finish`] completes (its headers come with `Age` and `Cache-Status` in
/// place, set for a plain hit, for it to set otherwise).
pub(crate) async fn represent(
    shared: &Shared,
    entry: &Entry,
    request: &HeaderMap,
    identity: Option<Bytes>,
    hit: Option<Hit<'_>>,
) -> Response<Bytes> {
    if let Ok(response) = represent_now(shared, entry, request, identity, hit) {
        return response;
    }
    match decode(shared, entry).await {
        Some(identity) => match represent_now(shared, entry, request, Some(identity), hit) {
            Ok(response) => response,
            Err(NeedsDecoding) => Response::new(Bytes::new()),
        },
        None => {
            let mut response = Response::new(Bytes::new());
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    }
}

/// The identity body must be decoded (on the blocking pool) first.
#[derive(Debug)]
pub(crate) struct NeedsDecoding;

/// How a stored response is served as a hit: at what age, and whether as a
/// plain hit (`Cache-Status: …; hit`), whose `Age` and `Cache-Status` the
/// entry keeps ready for the hits of the same second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hit<'a> {
    age: Duration,
    /// `Cache-Status`'s detail.
    detail: &'a str,
}

impl<'a> Hit<'a> {
    fn new(entry: &Entry, now: Instant, detail: &'a str) -> Self {
        Self {
            age: entry.age(now),
            detail,
        }
    }

    /// A plain hit (`Cache-Status: …; hit`): the entry keeps its fields
    /// ready for the hits of the same second.
    fn plain(self) -> bool {
        self.detail == "hit"
    }

    /// `Cache-Status`'s `ttl`: the freshness it has left.
    fn ttl(self, entry: &Entry) -> i64 {
        entry.lifetime.as_secs() as i64 - self.age.as_secs() as i64
    }
}

/// [`represent`] without waiting: `Err` when the client accepts none of the
/// stored codings and the identity body must be decoded first.
pub(crate) fn represent_now(
    shared: &Shared,
    entry: &Entry,
    request: &HeaderMap,
    identity: Option<Bytes>,
    hit: Option<Hit<'_>>,
) -> Result<Response<Bytes>, NeedsDecoding> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = entry.status;
    *response.version_mut() = entry.version;
    *response.headers_mut() = if let Some(hit) = hit {
        if hit.plain() {
            entry.hit_headers(hidden_tag(shared), hit.age.as_secs(), || {
                shared.status_text("hit", Some(hit.ttl(entry)))
            })
        } else {
            entry.served_headers(hidden_tag(shared))
        }
    } else {
        let mut headers = entry.headers.clone();
        if let Some(tag) = hidden_tag(shared) {
            headers.remove(tag);
        }
        headers
    };
    if entry.encodings.is_empty() {
        *response.body_mut() = entry.body.clone();
        return Ok(response);
    }
    let accepted = gratify_core::encoding::Accepted::parse(request);
    let offered: Vec<&'static str> = entry.encodings.iter().map(|(c, _)| *c).collect();
    let headers = response.headers_mut();
    let vary_present = headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|f| f.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if !vary_present {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
    let (body, coding) = match accepted.best(&offered) {
        Some(coding) => {
            let bytes = entry
                .encodings
                .iter()
                .find(|(c, _)| *c == coding)
                .map(|(_, b)| b.clone());
            (bytes, Some(coding))
        }
        None => match identity {
            Some(identity) => (Some(identity), None),
            None => return Err(NeedsDecoding),
        },
    };
    let Some(body) = body else {
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response.headers_mut().remove(CONTENT_LENGTH);
        return Ok(response);
    };
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(coding) = coding {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static(coding));
        if let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok())
            && !etag.starts_with("W/")
            && let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}"))
        {
            headers.insert(ETAG, weak);
        }
    }
    *response.body_mut() = body;
    Ok(response)
}

/// The identity body of an entry stored encoded, decoded off the async
/// threads.
async fn decode(shared: &Shared, entry: &Entry) -> Option<Bytes> {
    let recoder = Arc::clone(shared.config.recoder.as_ref()?);
    let (coding, encoded) = entry.encodings.first().cloned()?;
    tokio::task::spawn_blocking(move || recoder.decode(coding, &encoded).ok())
        .await
        .ok()
        .flatten()
}

/// Serves a stored entry from the store: `Age`, `Cache-Status`, a `304` for
/// a matching conditional request, no body for HEAD.
pub(crate) async fn serve<RB>(
    shared: &Shared,
    entry: &Entry,
    method: &Method,
    request: &HeaderMap,
    now: Instant,
    detail: &str,
) -> Response<CacheBody<RB>> {
    let not_modified = conditional_matches(request, &entry.headers);
    // Ranges are cut from a body stored as it is served: not from one the
    // origin encoded (its ranges would count encoded bytes), nor from one
    // the cache stored encoded (each range would decode it again, on the
    // blocking pool, for a hit that passes no limit) — those are answered
    // whole.
    let cuttable = entry.encodings.is_empty() && !entry.headers.contains_key(CONTENT_ENCODING);
    let range =
        (*method == Method::GET && !not_modified && entry.status == StatusCode::OK && cuttable)
            .then(|| byte_range(request, &entry.headers))
            .flatten();
    let hit = Hit::new(entry, now, detail);
    let (response, in_place) = match range {
        Some(range) => (partial(shared, entry, range).await, false),
        None => (
            represent(shared, entry, request, None, Some(hit)).await,
            hit.plain(),
        ),
    };
    finish(shared, entry, response, method, not_modified, hit, in_place)
}

/// [`serve`] without waiting, for the hit path: `None` when the answer needs
/// the blocking pool (a range, or a coding the client does not accept).
pub(crate) fn serve_now<RB>(
    shared: &Shared,
    entry: &Entry,
    method: &Method,
    request: &HeaderMap,
    now: Instant,
    detail: &str,
) -> Option<Response<CacheBody<RB>>> {
    if request.contains_key(RANGE) {
        return None;
    }
    let not_modified = conditional_matches(request, &entry.headers);
    let hit = Hit::new(entry, now, detail);
    let response = represent_now(shared, entry, request, None, Some(hit)).ok()?;
    Some(finish(
        shared,
        entry,
        response,
        method,
        not_modified,
        hit,
        hit.plain(),
    ))
}

/// A stored response's representation as sent: no body for HEAD or a
/// `304`, `Age`, `Cache-Status` (already `in_place` for a plain hit's
/// prepared headers), with `detail` counted.
fn finish<RB>(
    shared: &Shared,
    entry: &Entry,
    response: Response<Bytes>,
    method: &Method,
    not_modified: bool,
    hit: Hit<'_>,
    in_place: bool,
) -> Response<CacheBody<RB>> {
    let (age, ttl) = (hit.age, hit.ttl(entry));
    let (mut parts, body) = response.into_parts();
    let body = if *method == Method::HEAD || not_modified {
        CacheBody::empty()
    } else {
        CacheBody::full(body)
    };
    if not_modified {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove(CONTENT_LENGTH);
    }
    if hit.plain() {
        shared.count(hit.detail);
    }
    if !in_place {
        // In place of the prepared fields: no growth (and a map at its size
        // limit is answered without them rather than a panic).
        let status = if hit.plain() {
            shared.status_text(hit.detail, Some(ttl))
        } else {
            shared.status_with(hit.detail, Some(ttl))
        };
        let _ = parts
            .headers
            .try_insert(AGE, HeaderValue::from(age.as_secs()));
        let _ = parts.headers.try_insert(CACHE_STATUS, status);
    }
    Response::from_parts(parts, body)
}

/// The tag header clients are not sent, if any.
fn hidden_tag(shared: &Shared) -> Option<&HeaderName> {
    if shared.config.expose_tags {
        None
    } else {
        shared.config.tag_header.as_ref()
    }
}

/// One range of bytes a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// `first-last` or `first-`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// The one byte range a request asks of a stored response, if it asks for
/// exactly one and its `If-Range` (if any) names this response; several
/// ranges, other units or anything malformed are answered in full.
fn byte_range(request: &HeaderMap, stored: &HeaderMap) -> Option<ByteRange> {
    let mut values = request.get_all(RANGE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    if let Some(if_range) = request.get(IF_RANGE) {
        let if_range = if_range.to_str().ok()?.trim();
        let matches = if if_range.starts_with('"') {
            // A strong comparison: weak validators never match.
            stored
                .get(ETAG)
                .and_then(|e| e.to_str().ok())
                .is_some_and(|e| e.trim() == if_range)
        } else {
            let date = crate::policy::parse_date(if_range);
            date.is_some() && date == crate::policy::single_date(stored, &LAST_MODIFIED)
        };
        if !matches {
            return None;
        }
    }
    let spec = value.to_str().ok()?.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let number = |t: &str| -> Option<u64> {
        let t = t.trim();
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => Some(ByteRange::Suffix(number(last)?)),
        (false, true) => Some(ByteRange::From(number(first)?, None)),
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            (first <= last).then_some(ByteRange::From(first, Some(last)))
        }
        (true, true) => None,
    }
}

/// The stored response's identity body, cut to `range` (206), or 416 when
/// the range lies outside it.
async fn partial(shared: &Shared, entry: &Entry, range: ByteRange) -> Response<Bytes> {
    let body = if entry.encodings.is_empty() {
        Some(entry.body.clone())
    } else {
        decode(shared, entry).await
    };
    let mut response = Response::new(Bytes::new());
    *response.version_mut() = entry.version;
    *response.headers_mut() = entry.served_headers(hidden_tag(shared));
    let Some(body) = body else {
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response.headers_mut().remove(CONTENT_LENGTH);
        return response;
    };
    let len = body.len() as u64;
    let span = match range {
        ByteRange::From(first, last) if first < len => {
            Some((first, last.map_or(len - 1, |l| l.min(len - 1))))
        }
        ByteRange::Suffix(n) if n > 0 && len > 0 => Some((len - n.min(len), len - 1)),
        _ => None,
    };
    let headers = response.headers_mut();
    headers.remove(CONTENT_ENCODING);
    match span {
        Some((first, last)) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let part = body.slice(first as usize..=last as usize);
            let headers = response.headers_mut();
            headers.insert(CONTENT_LENGTH, HeaderValue::from(part.len()));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
                headers.insert(CONTENT_RANGE, v);
            }
            *response.body_mut() = part;
        }
        None => {
            *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let headers = response.headers_mut();
            headers.insert(CONTENT_LENGTH, HeaderValue::from(0));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                headers.insert(CONTENT_RANGE, v);
            }
        }
    }
    response
}

/// Whether a client's `If-None-Match` (weak comparison) or
/// `If-Modified-Since` is satisfied by a response with `stored`'s
/// validators.
pub(crate) fn conditional_matches(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(etag));
    }
    let Some(since) = crate::policy::single_date(request, &IF_MODIFIED_SINCE) else {
        return false;
    };
    // Without `Last-Modified`, the stored response's `Date` stands in
    // (RFC 9111 §4.3.2).
    crate::policy::single_date(stored, &LAST_MODIFIED)
        .or_else(|| crate::policy::single_date(stored, &DATE))
        .is_some_and(|modified| modified <= since)
}

/// A request's preconditions and range: what a request the cache sends for
/// everyone (a revalidation, a refresh) never carries of a client's.
pub(crate) const PRECONDITIONS: [HeaderName; 6] = [
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    http::header::IF_MATCH,
    http::header::IF_UNMODIFIED_SINCE,
    IF_RANGE,
    RANGE,
];

/// The client's own validators (`If-None-Match`, `If-Modified-Since`),
/// taken out of a request the cache sends on for everyone: the origin
/// answers the shared request in full, and the cache answers the client's
/// conditions itself.
pub(crate) fn take_conditionals(headers: &mut HeaderMap) -> Option<HeaderMap> {
    let mut taken = HeaderMap::new();
    for name in [IF_NONE_MATCH, IF_MODIFIED_SINCE] {
        for value in headers.get_all(&name) {
            taken.append(name.clone(), value.clone());
        }
        headers.remove(&name);
    }
    (!taken.is_empty()).then_some(taken)
}
