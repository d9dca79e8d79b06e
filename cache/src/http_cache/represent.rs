//! How a stored response is shown to a client: the coding it accepts, `Age`,
//! `304` for a conditional request it satisfies, no body for HEAD, and
//! nothing a shared cache must not replay.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    AGE, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, VARY,
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
/// the body as the origin sent it, spares the decoding.
pub(crate) async fn represent(
    shared: &Shared,
    entry: &Entry,
    request: &HeaderMap,
    identity: Option<Bytes>,
) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = entry.status;
    *response.version_mut() = entry.version;
    *response.headers_mut() = entry.headers.clone();
    if !shared.config.expose_tags
        && let Some(tag) = &shared.config.tag_header
    {
        response.headers_mut().remove(tag);
    }
    if entry.encodings.is_empty() {
        *response.body_mut() = entry.body.clone();
        return response;
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
            None => (decode(shared, entry).await, None),
        },
    };
    let Some(body) = body else {
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        response.headers_mut().remove(CONTENT_LENGTH);
        return response;
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
    response
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
    let age = entry.age(now);
    let ttl = entry.lifetime.as_secs() as i64 - age.as_secs() as i64;
    let not_modified = conditional_matches(request, &entry.headers);
    let response = represent(shared, entry, request, None).await;
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
    parts.headers.insert(AGE, HeaderValue::from(age.as_secs()));
    parts
        .headers
        .insert(CACHE_STATUS, shared.status(&format!("{detail}; ttl={ttl}")));
    Response::from_parts(parts, body)
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
    match (
        crate::policy::single_date(request, &IF_MODIFIED_SINCE),
        crate::policy::single_date(stored, &LAST_MODIFIED),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

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
