//! `Cache-Control` directives (RFC 9111 §5.2), parsed conservatively.
//!
//! Every parser here takes untrusted header values and never panics. When a
//! value is malformed the result errs towards *not* reusing a response: an
//! unparseable or repeated `max-age` counts as zero (stale), an unknown
//! `private="..."` or `no-cache="..."` field list counts as the whole
//! response, and a `Cache-Control` value that is not visible ASCII is read as
//! `no-store`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify_cache::directives::ResponseDirectives;
//! use http::HeaderMap;
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("cache-control", "public, max-age=60, s-maxage=300, stale-while-revalidate=30".parse()?);
//! let d = ResponseDirectives::from_headers(&headers);
//! assert_eq!(d.s_maxage, Some(Duration::from_secs(300)));
//! assert_eq!(d.stale_while_revalidate, Some(Duration::from_secs(30)));
//! assert!(d.public && !d.no_store);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::Duration;

use http::HeaderMap;
use http::header::CACHE_CONTROL;

/// The largest delta-seconds value: RFC 9111 §1.2.2 says to use 2^31 when a
/// value overflows.
pub const MAX_DELTA: Duration = Duration::from_secs(2_147_483_648);

/// The targeted cache-control field (RFC 9213) this cache obeys: a CDN-like
/// shared cache in front of the service.
pub const CDN_CACHE_CONTROL: http::HeaderName = http::HeaderName::from_static("cdn-cache-control");

/// One directive: a lower-case name and an optional value (quotes removed).
fn directives(headers: &HeaderMap) -> Result<Vec<(String, Option<String>)>, ()> {
    directives_of(headers, &CACHE_CONTROL)
}

/// The directives of every `name` field of `headers`.
fn directives_of(
    headers: &HeaderMap,
    name: &http::HeaderName,
) -> Result<Vec<(String, Option<String>)>, ()> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let text = value.to_str().map_err(|_| ())?;
        parse_list(text, &mut out)?;
        if out.len() > 64 {
            // Absurd lists are not served from the cache.
            return Err(());
        }
    }
    Ok(out)
}

/// Parses `a, b=1, c="x, y"` into `out`; an unterminated quote is an error.
fn parse_list(text: &str, out: &mut Vec<(String, Option<String>)>) -> Result<(), ()> {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    let mut items = Vec::new();
    for (i, c) in text.char_indices() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = false;
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            ',' => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err(());
    }
    items.push(&text[start..bytes.len()]);
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim()))),
            None => (item, None),
        };
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(());
        }
        out.push((name.to_ascii_lowercase(), value));
    }
    Ok(())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if escaped || c != '\\' {
                    out.push(c);
                    escaped = false;
                } else {
                    escaped = true;
                }
            }
            out
        }
        None => v.to_owned(),
    }
}

/// Parses delta-seconds: digits only; overflow saturates at [`MAX_DELTA`].
pub fn parse_delta(value: &str) -> Option<Duration> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match value.parse::<u64>() {
        Ok(n) => Duration::from_secs(n).min(MAX_DELTA),
        Err(_) => MAX_DELTA,
    })
}

/// A delta-seconds directive seen once with a valid value, else zero:
/// "the response should be considered stale" (RFC 9111 §4.2.1).
fn delta(list: &[(String, Option<String>)], name: &str) -> Option<Duration> {
    let mut found = list.iter().filter(|(n, _)| n == name);
    let first = found.next()?;
    if found.next().is_some() {
        return Some(Duration::ZERO);
    }
    Some(
        first
            .1
            .as_deref()
            .and_then(parse_delta)
            .unwrap_or(Duration::ZERO),
    )
}

fn has(list: &[(String, Option<String>)], name: &str) -> bool {
    list.iter().any(|(n, _)| n == name)
}

/// The directives of a response's `Cache-Control`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResponseDirectives {
    /// `max-age`.
    pub max_age: Option<Duration>,
    /// `s-maxage` (shared caches only; implies `proxy-revalidate`).
    pub s_maxage: Option<Duration>,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (with or without a field list): store, revalidate before reuse.
    pub no_cache: bool,
    /// `private` (with or without a field list): a shared cache must not store it.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `no-transform`.
    pub no_transform: bool,
    /// `immutable`.
    pub immutable: bool,
    /// `stale-while-revalidate` (RFC 5861).
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error` (RFC 5861).
    pub stale_if_error: Option<Duration>,
    /// `must-understand`: store only if the status is understood (then
    /// `no-store` is for caches that do not understand it).
    pub must_understand: bool,
    /// Read from `CDN-Cache-Control` (RFC 9213): `Cache-Control` and
    /// `Expires` do not apply to this cache.
    pub targeted: bool,
}

impl ResponseDirectives {
    /// The directives this shared cache obeys: those of a valid, non-empty
    /// `CDN-Cache-Control` if the response has one (RFC 9213 — then
    /// `Cache-Control` and `Expires` are for other caches), else those of
    /// every `Cache-Control` field. A malformed `Cache-Control` makes the
    /// response `no-store`; a malformed `CDN-Cache-Control` is ignored.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        if let Some(list) = targeted(headers) {
            return Self {
                targeted: true,
                ..Self::from_list(&list)
            };
        }
        let Ok(list) = directives(headers) else {
            return Self {
                no_store: true,
                ..Self::default()
            };
        };
        Self::from_list(&list)
    }

    fn from_list(list: &[(String, Option<String>)]) -> Self {
        Self {
            max_age: delta(list, "max-age"),
            s_maxage: delta(list, "s-maxage"),
            no_store: has(list, "no-store"),
            no_cache: has(list, "no-cache"),
            private: has(list, "private"),
            public: has(list, "public"),
            must_revalidate: has(list, "must-revalidate"),
            proxy_revalidate: has(list, "proxy-revalidate"),
            no_transform: has(list, "no-transform"),
            immutable: has(list, "immutable"),
            stale_while_revalidate: delta(list, "stale-while-revalidate"),
            stale_if_error: delta(list, "stale-if-error"),
            must_understand: has(list, "must-understand"),
            targeted: false,
        }
    }

    /// Whether a stale response must be revalidated before reuse (no serving
    /// stale): `must-revalidate`, `proxy-revalidate` or `s-maxage`.
    pub fn requires_revalidation(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some()
    }
}

/// The directives of a valid, non-empty `CDN-Cache-Control`: a Structured
/// Field dictionary (RFC 8941) — lower-case keys, no whitespace around `=`,
/// integers where a number of seconds is meant. Anything else makes the
/// whole field invalid, and it is ignored.
fn targeted(headers: &HeaderMap) -> Option<Vec<(String, Option<String>)>> {
    if !headers.contains_key(&CDN_CACHE_CONTROL) {
        return None;
    }
    match strict_dictionary(headers) {
        Some(list) if !list.is_empty() => Some(list),
        Some(_) => None,
        None => {
            // Present but not a valid dictionary: ignored — unless it tried
            // to keep the response from this cache, which is then obeyed.
            let text: String = headers
                .get_all(&CDN_CACHE_CONTROL)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
                .collect();
            (text.contains("private") || text.contains("no-store"))
                .then(|| vec![("no-store".to_owned(), None)])
        }
    }
}

/// `CDN-Cache-Control` read as a Structured Field dictionary: members split
/// outside quoted strings, lower-case keys, no whitespace around `=`,
/// integers where a number of seconds is meant, `?0` for false; `None` for
/// anything else.
fn strict_dictionary(headers: &HeaderMap) -> Option<Vec<(String, Option<String>)>> {
    let mut list = Vec::new();
    for value in headers.get_all(&CDN_CACHE_CONTROL) {
        let text = value.to_str().ok()?;
        let mut members = Vec::new();
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in text.char_indices() {
            if quoted {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => quoted = false,
                    _ => {}
                }
            } else if c == '"' {
                quoted = true;
            } else if c == ',' {
                members.push(&text[start..i]);
                start = i + 1;
            }
        }
        if quoted {
            return None;
        }
        members.push(&text[start..]);
        for member in members {
            let member = member.trim_matches([' ', '\t']);
            // Parameters do not change a directive's meaning here.
            let member = member.split(';').next().unwrap_or("");
            let (key, value) = match member.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (member, None),
            };
            let mut key_bytes = key.bytes();
            let key_ok = key_bytes
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
                && key_bytes
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.*".contains(&b));
            if !key_ok {
                return None;
            }
            let seconds = matches!(
                key,
                "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
            );
            let value = match value {
                // A boolean: `?1` is the bare key, `?0` no directive at all.
                Some("?1") => None,
                Some("?0") => continue,
                Some(v) if seconds && (v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit())) => {
                    return None;
                }
                Some(v) if v.is_empty() || (!v.starts_with('"') && v.contains([' ', '\t'])) => {
                    return None;
                }
                v => v,
            };
            list.push((key.to_owned(), value.map(unquote)));
        }
    }
    Some(list)
}

/// The directives of a request's `Cache-Control` (and `Pragma: no-cache`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestDirectives {
    /// `max-age`: the oldest response the client accepts.
    pub max_age: Option<Duration>,
    /// `max-stale`: `Some(None)` accepts any staleness.
    pub max_stale: Option<Option<Duration>>,
    /// `min-fresh`.
    pub min_fresh: Option<Duration>,
    /// `no-cache` (or `Pragma: no-cache` without `Cache-Control`).
    pub no_cache: bool,
    /// `no-store`.
    pub no_store: bool,
    /// `only-if-cached`.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// Reads a request's `Cache-Control` and `Pragma`. A malformed field
    /// makes the request `no-cache` (go to the origin).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        if !headers.contains_key(CACHE_CONTROL) && !headers.contains_key(http::header::PRAGMA) {
            return Self::default();
        }
        let Ok(list) = directives(headers) else {
            return Self {
                no_cache: true,
                ..Self::default()
            };
        };
        let pragma_no_cache = list.is_empty()
            && headers
                .get_all(http::header::PRAGMA)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
        let max_stale = list.iter().find(|(n, _)| n == "max-stale").map(|(_, v)| {
            // A malformed value accepts no staleness.
            v.as_deref()
                .map(|v| Some(parse_delta(v).unwrap_or(Duration::ZERO)))
                .unwrap_or(None)
        });
        Self {
            max_age: delta(&list, "max-age"),
            max_stale,
            min_fresh: delta(&list, "min-fresh"),
            no_cache: has(&list, "no-cache") || pragma_no_cache,
            no_store: has(&list, "no-store"),
            only_if_cached: has(&list, "only-if-cached"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CACHE_CONTROL, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn response_directives() {
        let d = ResponseDirectives::from_headers(&headers(&[
            "Public, MAX-AGE=60",
            "s-maxage=\"120\", must-revalidate, stale-if-error=10",
        ]));
        assert!(d.public && d.must_revalidate);
        assert_eq!(d.max_age, Some(Duration::from_secs(60)));
        assert_eq!(d.s_maxage, Some(Duration::from_secs(120)));
        assert_eq!(d.stale_if_error, Some(Duration::from_secs(10)));
        assert!(d.requires_revalidation());
    }

    #[test]
    fn malformed_values_are_conservative() {
        // Repeated or invalid max-age: stale.
        let d = ResponseDirectives::from_headers(&headers(&["max-age=60, max-age=120"]));
        assert_eq!(d.max_age, Some(Duration::ZERO));
        let d = ResponseDirectives::from_headers(&headers(&["max-age=-1"]));
        assert_eq!(d.max_age, Some(Duration::ZERO));
        let d = ResponseDirectives::from_headers(&headers(&["max-age=1e3"]));
        assert_eq!(d.max_age, Some(Duration::ZERO));
        // Overflow saturates.
        let d = ResponseDirectives::from_headers(&headers(&["max-age=99999999999999999999999"]));
        assert_eq!(d.max_age, Some(MAX_DELTA));
        // Field lists count as the whole response.
        let d = ResponseDirectives::from_headers(&headers(&["private=\"set-cookie, x\""]));
        assert!(d.private);
        // Garbage: no-store.
        let d = ResponseDirectives::from_headers(&headers(&["max-age=\"60"]));
        assert!(d.no_store);
        let d = ResponseDirectives::from_headers(&headers(&["max age"]));
        assert!(d.no_store);
    }

    #[test]
    fn request_directives() {
        let d = RequestDirectives::from_headers(&headers(&["max-stale, min-fresh=5"]));
        assert_eq!(d.max_stale, Some(None));
        assert_eq!(d.min_fresh, Some(Duration::from_secs(5)));
        let d = RequestDirectives::from_headers(&headers(&["max-stale=10, only-if-cached"]));
        assert_eq!(d.max_stale, Some(Some(Duration::from_secs(10))));
        assert!(d.only_if_cached);
        let mut h = HeaderMap::new();
        h.insert(http::header::PRAGMA, "no-cache".parse().unwrap());
        assert!(RequestDirectives::from_headers(&h).no_cache);
        assert!(RequestDirectives::from_headers(&headers(&["\"unterminated"])).no_cache);
    }

    proptest! {
        #[test]
        fn never_panics(values in proptest::collection::vec("[ -~]{0,60}", 0..4)) {
            let mut h = HeaderMap::new();
            for v in &values {
                if let Ok(v) = v.parse() {
                    h.append(CACHE_CONTROL, v);
                }
            }
            let r = ResponseDirectives::from_headers(&h);
            let _ = RequestDirectives::from_headers(&h);
            if let Some(a) = r.max_age {
                prop_assert!(a <= MAX_DELTA);
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut h = HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_bytes(&bytes) {
                h.append(CACHE_CONTROL, v);
            }
            let _ = ResponseDirectives::from_headers(&h);
            let _ = RequestDirectives::from_headers(&h);
        }

        #[test]
        fn valid_max_age_round_trips(n in 0u64..10_000_000) {
            let d = ResponseDirectives::from_headers(&headers(&[&format!("public, max-age={n}")]));
            prop_assert_eq!(d.max_age, Some(Duration::from_secs(n)));
            prop_assert!(d.public && !d.no_store);
        }
    }
}
