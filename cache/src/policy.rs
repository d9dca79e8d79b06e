//! Shared-cache rules (RFC 9111): what may be stored, for how long it is
//! fresh, how old it is, and whether a request accepts it.

use std::time::{Duration, SystemTime};

use http::header::{
    AGE, AUTHORIZATION, COOKIE, DATE, ETAG, EXPIRES, HeaderName, LAST_MODIFIED, SET_COOKIE, VARY,
};
use http::{HeaderMap, Method, StatusCode};

use crate::directives::{RequestDirectives, ResponseDirectives, parse_delta};

/// Statuses stored by default (RFC 9110 §15.1 heuristically cacheable,
/// less the error statuses: caching 4xx and 5xx by default invites
/// cache-poisoning denial of service).
pub fn storable_by_default(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 308)
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// The request method is not GET.
    Method,
    /// The status is not one the cache stores.
    Status,
    /// `no-store` on the request or the response.
    NoStore,
    /// `private` on the response.
    Private,
    /// The request carried `Authorization` and the response does not say
    /// `public`, `s-maxage` or `must-revalidate`.
    Authorization,
    /// The response sets a cookie, or the request carried one.
    Cookie,
    /// `Vary: *`.
    VaryStar,
    /// No freshness information and no default TTL for the route.
    NoFreshness,
}

/// The freshness lifetime of a response (RFC 9111 §4.2.1): `s-maxage`, then
/// `max-age`, then `Expires − Date`, then `default_ttl` (the route's TTL for
/// origins that send no freshness information). `None` when none applies.
pub fn freshness_lifetime(
    directives: &ResponseDirectives,
    headers: &HeaderMap,
    default_ttl: Option<Duration>,
) -> Option<Duration> {
    if let Some(s) = directives.s_maxage {
        return Some(s);
    }
    if let Some(m) = directives.max_age {
        return Some(m);
    }
    if headers.contains_key(EXPIRES) && !directives.targeted {
        // An invalid Expires (or several) means already expired.
        let expires = single_date(headers, &EXPIRES);
        let date = single_date(headers, &DATE);
        return Some(match (expires, date) {
            (Some(e), Some(d)) => e.duration_since(d).unwrap_or(Duration::ZERO),
            (Some(e), None) => e
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            _ => Duration::ZERO,
        });
    }
    default_ttl
}

/// An HTTP date header present exactly once and valid.
pub fn single_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse_date(first.to_str().ok()?)
}

/// An HTTP date (RFC 9110 §5.6.7): IMF-fixdate, RFC 850 or asctime — in any
/// letter case, and with a weekday that does not match the date (recipients
/// are asked to be lenient there). Anything else — another zone, missing
/// punctuation, a one-digit hour — is not a date.
pub fn parse_date(text: &str) -> Option<SystemTime> {
    if let Ok(t) = httpdate::parse_http_date(text) {
        return Some(t);
    }
    if text.len() > 64 || !text.is_ascii() {
        return None;
    }
    // Letters as the grammar spells them: `Mon`, `Aug`, `GMT`.
    let mut fixed = String::with_capacity(text.len());
    let mut in_word = false;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            fixed.push(if in_word {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            });
            in_word = true;
        } else {
            fixed.push(c);
            in_word = false;
        }
    }
    let fixed = fixed.replace("Gmt", "GMT");
    if let Ok(t) = httpdate::parse_http_date(&fixed) {
        return Some(t);
    }
    // The weekday is redundant: try the date under each weekday name.
    const SHORT: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const LONG: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let end = fixed.find([',', ' '])?;
    let (weekday, rest) = fixed.split_at(end);
    if weekday.len() < 3 || !weekday.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let names: &[&str] = if weekday.len() > 3 { &LONG } else { &SHORT };
    names
        .iter()
        .find_map(|name| httpdate::parse_http_date(&format!("{name}{rest}")).ok())
}

/// What a route allows the cache to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Rules {
    /// Freshness for responses that carry no freshness information (opt-in
    /// per route; heuristic freshness is off otherwise).
    pub default_ttl: Option<Duration>,
    /// Store responses that set cookies and answers to requests that carry
    /// them — only for routes whose cache key includes the user.
    pub allow_cookies: bool,
    /// Also store the heuristically cacheable error statuses (404, 405, 410,
    /// 414, 501) when they carry freshness information.
    pub cache_errors: bool,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses with a
    /// `Last-Modified` and no freshness information: a tenth of the time
    /// since it was modified, at most a day. Off by default — for a proxy in
    /// front of origins it does not control.
    pub heuristic: bool,
}

impl Rules {
    /// Whether a response with `status` may be stored.
    pub fn status_storable(&self, status: StatusCode) -> bool {
        storable_by_default(status)
            || (self.cache_errors && matches!(status.as_u16(), 404 | 405 | 410 | 414 | 501))
    }

    /// Decides whether a response to a request may be stored, and for how
    /// long it is fresh.
    ///
    /// # Errors
    ///
    /// Why it may not be stored.
    pub fn storable(
        &self,
        method: &Method,
        request: &HeaderMap,
        status: StatusCode,
        response: &HeaderMap,
        directives: &ResponseDirectives,
    ) -> Result<Duration, NotStored> {
        if method != Method::GET {
            return Err(NotStored::Method);
        }
        // Redirects that say how long they hold are stored too (RFC 9111
        // §3: any understood status, with explicit freshness).
        let explicit = directives.s_maxage.is_some()
            || directives.max_age.is_some()
            || (response.contains_key(EXPIRES) && !directives.targeted);
        let understood = self.status_storable(status)
            || (explicit && matches!(status.as_u16(), 302 | 303 | 307));
        if !understood {
            return Err(NotStored::Status);
        }
        // `must-understand`: a cache that understands the status stores it
        // despite `no-store` (which is for caches that do not).
        let no_store = directives.no_store && !directives.must_understand;
        if no_store || RequestDirectives::from_headers(request).no_store {
            return Err(NotStored::NoStore);
        }
        if directives.private {
            return Err(NotStored::Private);
        }
        if request.contains_key(AUTHORIZATION)
            && !(directives.public || directives.s_maxage.is_some() || directives.must_revalidate)
        {
            return Err(NotStored::Authorization);
        }
        if !self.allow_cookies
            && (response.contains_key(SET_COOKIE) || request.contains_key(COOKIE))
        {
            return Err(NotStored::Cookie);
        }
        if vary_fields(response).is_none() {
            return Err(NotStored::VaryStar);
        }
        let heuristic = || {
            if !self.heuristic || !self.status_storable(status) || directives.no_cache {
                return None;
            }
            let modified = single_date(response, &LAST_MODIFIED)?;
            let date = single_date(response, &DATE).unwrap_or_else(SystemTime::now);
            let since = date.duration_since(modified).ok()?;
            Some((since / 10).min(Duration::from_secs(86_400)))
        };
        // An answer to a request with credentials, stored on the strength of
        // `must-revalidate` alone, is fresh only as long as it says: no
        // route TTL, no heuristic — the origin never said others may have it.
        if request.contains_key(AUTHORIZATION)
            && !directives.public
            && directives.s_maxage.is_none()
        {
            return Ok(freshness_lifetime(directives, response, None).unwrap_or(Duration::ZERO));
        }
        match freshness_lifetime(directives, response, self.default_ttl).or_else(heuristic) {
            Some(lifetime) => Ok(lifetime),
            // `no-cache` with a validator: store, revalidate every time.
            None if directives.no_cache && has_validator(response) => Ok(Duration::ZERO),
            None => Err(NotStored::NoFreshness),
        }
    }
}

/// Whether the response carries `ETag` or `Last-Modified`.
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED)
}

/// The header names a response varies on, lower-cased and deduplicated;
/// `None` for `Vary: *` or an unreadable `Vary`.
pub fn vary_fields(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(VARY) {
        let text = value.to_str().ok()?;
        for field in text.split(',') {
            let field = field.trim();
            if field.is_empty() {
                continue;
            }
            if field == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(field.as_bytes()).ok()?;
            if !out.contains(&name) {
                out.push(name);
            }
        }
        if out.len() > 16 {
            return None;
        }
    }
    Some(out)
}

/// The value a request has for a `Vary` field, normalised: the field lines
/// joined with `,`, whitespace around each element removed, lower-cased for
/// the fields whose values are case-insensitive tokens.
pub fn vary_value(request: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for v in request.get_all(name) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for element in text.split(',') {
            let element = element.trim();
            if !element.is_empty() {
                parts.push(element.to_owned());
            }
        }
    }
    if parts.is_empty() {
        return None;
    }
    let case_insensitive = matches!(
        name.as_str(),
        "accept-encoding" | "accept-language" | "accept" | "accept-charset"
    );
    let joined = parts.join(",");
    Some(if case_insensitive {
        joined.to_ascii_lowercase()
    } else {
        joined
    })
}

/// The initial age of a response when it is received (RFC 9111 §4.2.3):
/// the larger of its apparent age (`now − Date`) and its `Age` header plus
/// the time the request took.
pub fn initial_age(headers: &HeaderMap, response_delay: Duration, now: SystemTime) -> Duration {
    let apparent = single_date(headers, &DATE)
        .and_then(|d| now.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    // The first value of the first line (`Age: 7200, 0` is 7200 s old; a
    // parameter does not change the number).
    let age_header = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split([',', ';']).next())
        .and_then(|v| parse_delta(v.trim()))
        .unwrap_or(Duration::ZERO);
    apparent.max(age_header.saturating_add(response_delay))
}

/// How a request may use a stored response of `age` and `lifetime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    /// Fresh enough for this request.
    Fresh,
    /// Stale but within what the request accepts (`max-stale`).
    StaleAccepted,
    /// Must be revalidated (or refreshed) first.
    Stale,
}

/// Judges a stored response against the request's directives.
pub fn usable(age: Duration, lifetime: Duration, request: &RequestDirectives) -> Usable {
    if request.no_cache {
        return Usable::Stale;
    }
    let mut lifetime = lifetime;
    if let Some(max_age) = request.max_age {
        lifetime = lifetime.min(max_age);
    }
    let needed = age.saturating_add(request.min_fresh.unwrap_or(Duration::ZERO));
    if needed < lifetime {
        return Usable::Fresh;
    }
    // `max-stale` widens the response's own lifetime; the request's
    // `max-age` still bounds the age it accepts.
    if request.max_age.is_some_and(|max_age| age >= max_age) {
        return Usable::Stale;
    }
    match request.max_stale {
        Some(None) => Usable::StaleAccepted,
        Some(Some(extra)) if age < lifetime.saturating_add(extra) => Usable::StaleAccepted,
        _ => Usable::Stale,
    }
}

/// Header fields that concern one connection, not the message: never keyed,
/// never stored, never copied from a `304` (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// The fields a `Connection` header names (hop-by-hop for this message).
pub fn connection_fields(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Removes the hop-by-hop fields and those `Connection` names, as a proxy
/// does before it forwards a message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds what to remove (usually nothing, or
    // `Connection` alone): no lookup per hop-by-hop name.
    let mut found: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if HOP_BY_HOP.contains(&name.as_str()) {
            found.push(name.clone());
        }
    }
    if found.is_empty() {
        return;
    }
    if found.contains(&http::header::CONNECTION) {
        found.extend(connection_fields(headers));
    }
    for name in found {
        headers.remove(name);
    }
}

/// Fields a `304` never changes in a stored response (RFC 9111 §3.2, and
/// cookies, which a shared cache never keeps).
const NOT_UPDATED: [HeaderName; 6] = [
    SET_COOKIE,
    HeaderName::from_static("set-cookie2"),
    http::header::CONTENT_ENCODING,
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_RANGE,
    ETAG,
];

/// Fields that decide how a response may be cached: a `304` that carries
/// them always governs, whether the stored response had them or not.
const CACHING: [HeaderName; 4] = [
    http::header::CACHE_CONTROL,
    crate::directives::CDN_CACHE_CONTROL,
    EXPIRES,
    DATE,
];

/// The stored response's fields updated by a `304`'s (RFC 9111 §4.3.4):
/// only fields the stored response already has — and the caching fields
/// ([`CACHING`]), which always govern — never those in [`NOT_UPDATED`],
/// hop-by-hop fields or `Age`.
pub(crate) fn merge_304(stored: &HeaderMap, update: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    let named = connection_fields(update);
    for name in update.keys() {
        if !(stored.contains_key(name) || CACHING.contains(name))
            || NOT_UPDATED.contains(name)
            || HOP_BY_HOP.contains(&name.as_str())
            || named.contains(name)
            || name == AGE
        {
            continue;
        }
        headers.remove(name);
        for value in update.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.remove(AGE);
    headers
}

/// Whether a `304`'s validators select a stored response (RFC 9111
/// §4.3.4): a strong `ETag` must be the stored one, strongly; a weak one
/// must match weakly; without an `ETag`, the `Last-Modified` dates must be
/// equal. A `304` with no validator at all answers the conditional request
/// the cache built from this very response's validators, and selects it.
pub(crate) fn selects(update: &HeaderMap, stored: &HeaderMap) -> bool {
    let text = |h: &HeaderMap, n: &HeaderName| {
        let mut values = h.get_all(n).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok().map(str::trim).map(str::to_owned),
            _ => None,
        }
    };
    if update.contains_key(ETAG) {
        let (Some(new), Some(old)) = (text(update, &ETAG), text(stored, &ETAG)) else {
            return false;
        };
        return if new.starts_with("W/") {
            new.trim_start_matches("W/") == old.trim_start_matches("W/")
        } else {
            !old.starts_with("W/") && new == old
        };
    }
    if update.contains_key(LAST_MODIFIED) {
        return match (
            single_date(update, &LAST_MODIFIED),
            single_date(stored, &LAST_MODIFIED),
        ) {
            (Some(new), Some(old)) => new == old,
            _ => false,
        };
    }
    true
}

/// How long past its freshness a response is kept: for
/// `stale-while-revalidate`, `stale-if-error`, the fail-safe, and (with a
/// validator) a while longer to revalidate it cheaply.
pub(crate) fn keep_stale(
    directives: &ResponseDirectives,
    headers: &HeaderMap,
    lifetime: Duration,
    fail_safe: Option<Duration>,
) -> Duration {
    directives
        .stale_while_revalidate
        .unwrap_or_default()
        .max(directives.stale_if_error.unwrap_or_default())
        .max(fail_safe.unwrap_or_default())
        .max(if has_validator(headers) {
            lifetime.max(Duration::from_secs(60))
        } else {
            Duration::ZERO
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn check(
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
    ) -> Result<Duration, NotStored> {
        let resp = map(resp);
        let d = ResponseDirectives::from_headers(&resp);
        Rules::default().storable(
            &Method::GET,
            &map(req),
            StatusCode::from_u16(status).unwrap(),
            &resp,
            &d,
        )
    }

    #[test]
    fn freshness_precedence() {
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=10, s-maxage=20")]),
            Ok(Duration::from_secs(20))
        );
        assert_eq!(
            check(&[], 200, &[("cache-control", "max-age=10")]),
            Ok(Duration::from_secs(10))
        );
        assert_eq!(
            check(
                &[],
                200,
                &[
                    ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                    ("expires", "Sun, 06 Nov 1994 08:50:37 GMT")
                ]
            ),
            Ok(Duration::from_secs(60))
        );
        // Invalid Expires: already stale, but storable.
        assert_eq!(check(&[], 200, &[("expires", "soon")]), Ok(Duration::ZERO));
        // Heuristic freshness is off.
        assert_eq!(check(&[], 200, &[]), Err(NotStored::NoFreshness));
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "no-cache"), ("etag", "\"a\"")]
            ),
            Ok(Duration::ZERO)
        );
    }

    #[test]
    fn heuristic_freshness_only_where_asked() {
        let mut rules = Rules::default();
        let resp = map(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("last-modified", "Sun, 06 Nov 1994 07:49:37 GMT"),
        ]);
        let check = |rules: &Rules, resp: &HeaderMap, status: u16| {
            let d = ResponseDirectives::from_headers(resp);
            rules.storable(
                &Method::GET,
                &HeaderMap::new(),
                StatusCode::from_u16(status).unwrap(),
                resp,
                &d,
            )
        };
        assert_eq!(check(&rules, &resp, 200), Err(NotStored::NoFreshness));
        rules.heuristic = true;
        // A tenth of the hour since it was modified.
        assert_eq!(check(&rules, &resp, 200), Ok(Duration::from_secs(360)));
        // At most a day.
        let old = map(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("last-modified", "Sun, 06 Nov 1990 08:49:37 GMT"),
        ]);
        assert_eq!(check(&rules, &old, 200), Ok(Duration::from_secs(86_400)));
        // Not for what is not heuristically cacheable, nor without a date.
        assert_eq!(check(&rules, &resp, 404), Err(NotStored::Status));
        assert_eq!(check(&rules, &map(&[]), 200), Err(NotStored::NoFreshness));
        // An answer to a request with credentials that only says
        // must-revalidate gets no heuristic (nor route) freshness.
        let auth = map(&[("authorization", "Bearer a")]);
        let mut personal = resp.clone();
        personal.insert("cache-control", "must-revalidate".parse().unwrap());
        let d = ResponseDirectives::from_headers(&personal);
        let mut with_ttl = rules;
        with_ttl.default_ttl = Some(Duration::from_secs(600));
        assert_eq!(
            with_ttl.storable(&Method::GET, &auth, StatusCode::OK, &personal, &d),
            Ok(Duration::ZERO)
        );
        // Explicit freshness wins.
        let mut explicit = resp;
        explicit.insert("cache-control", "max-age=5".parse().unwrap());
        assert_eq!(check(&rules, &explicit, 200), Ok(Duration::from_secs(5)));
    }

    #[test]
    fn privacy_rules() {
        let cc = ("cache-control", "max-age=60");
        assert_eq!(
            check(&[("authorization", "Bearer x")], 200, &[cc]),
            Err(NotStored::Authorization)
        );
        assert!(
            check(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "public, max-age=60")]
            )
            .is_ok()
        );
        assert!(
            check(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "s-maxage=60")]
            )
            .is_ok()
        );
        assert_eq!(
            check(&[], 200, &[("cache-control", "private, max-age=60")]),
            Err(NotStored::Private)
        );
        assert_eq!(
            check(&[], 200, &[cc, ("set-cookie", "a=b")]),
            Err(NotStored::Cookie)
        );
        assert_eq!(
            check(&[("cookie", "a=b")], 200, &[cc]),
            Err(NotStored::Cookie)
        );
        assert_eq!(
            check(&[("cache-control", "no-store")], 200, &[cc]),
            Err(NotStored::NoStore)
        );
        assert_eq!(
            check(&[], 200, &[cc, ("vary", "*")]),
            Err(NotStored::VaryStar)
        );
        assert_eq!(check(&[], 404, &[cc]), Err(NotStored::Status));
        assert_eq!(check(&[], 500, &[cc]), Err(NotStored::Status));
    }

    #[test]
    fn request_acceptance() {
        let r = |s: &str| RequestDirectives::from_headers(&map(&[("cache-control", s)]));
        let s = Duration::from_secs;
        assert_eq!(
            usable(s(5), s(10), &RequestDirectives::default()),
            Usable::Fresh
        );
        assert_eq!(
            usable(s(10), s(10), &RequestDirectives::default()),
            Usable::Stale
        );
        assert_eq!(usable(s(5), s(10), &r("max-age=4")), Usable::Stale);
        assert_eq!(usable(s(5), s(10), &r("min-fresh=6")), Usable::Stale);
        assert_eq!(
            usable(s(12), s(10), &r("max-stale=5")),
            Usable::StaleAccepted
        );
        assert_eq!(usable(s(16), s(10), &r("max-stale=5")), Usable::Stale);
        assert_eq!(
            usable(s(1000), s(10), &r("max-stale")),
            Usable::StaleAccepted
        );
        assert_eq!(usable(s(1), s(10), &r("no-cache")), Usable::Stale);
        // max-stale widens the lifetime, not the request's own max-age.
        assert_eq!(
            usable(s(30), s(60), &r("max-age=5, max-stale=100")),
            Usable::Stale
        );
        assert_eq!(
            usable(s(70), s(60), &r("max-age=80, max-stale=100")),
            Usable::StaleAccepted
        );
        assert_eq!(
            usable(s(70), s(60), &r("max-age=69, max-stale")),
            Usable::Stale
        );
    }

    #[test]
    fn dates_are_read_leniently() {
        let t = |s: &str| parse_date(s).map(httpdate::fmt_http_date);
        let want = Some("Thu, 18 Aug 2050 02:01:18 GMT".to_owned());
        for text in [
            "Thu, 18 Aug 2050 02:01:18 GMT",
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gmt",
            "Thursday, 18-Aug-50 02:01:18 GMT",
            "Thu Aug 18 02:01:18 2050",
            // A weekday that does not match the date.
            "Mon, 18 Aug 2050 02:01:18 GMT",
            "Mon Aug 18 02:01:18 2050",
        ] {
            assert_eq!(t(text), want, "{text}");
        }
        for bad in [
            "",
            "soon",
            "18 Aug 2050",
            "Thu, 32 Aug 2050 02:01:18 GMT",
            "0",
            "2050-08-18T02:01:18Z",
            // Not the grammar: another zone, no comma, doubled spaces,
            // dashes in an IMF date, a one-digit hour.
            "Thu, 18 Aug 2050 02:01:18 UTC",
            "Thu, 18 Aug 2050 02:01:18 AEST",
            "Thu 18 Aug 2050 02:01:18 GMT",
            "Thu,  18 Aug 2050  02:01:18 GMT",
            "Thu, 18-Aug-2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 2:01:18 GMT",
            // The weekday is letters or nothing parses.
            ", 18 Aug 2050 02:01:18 GMT",
            "1, 18 Aug 2050 02:01:18 GMT",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_date_text_never_panics(text in "[ -~]{0,40}") {
            let _ = parse_date(&text);
        }
    }

    #[test]
    fn age_and_vary() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777 + 30);
        let h = map(&[("date", "Sun, 06 Nov 1994 08:49:37 GMT"), ("age", "10")]);
        assert_eq!(
            initial_age(&h, Duration::from_secs(1), now),
            Duration::from_secs(30)
        );
        let h = map(&[("age", "100")]);
        assert_eq!(
            initial_age(&h, Duration::from_secs(1), now),
            Duration::from_secs(101)
        );
        let h = map(&[("age", "-3")]);
        assert_eq!(initial_age(&h, Duration::ZERO, now), Duration::ZERO);
        for (age, secs) in [
            ("7200, 0", 7200),
            ("0, 7200", 0),
            ("7200;a=1", 7200),
            (" 12 ", 12),
        ] {
            let h = map(&[("age", age)]);
            assert_eq!(
                initial_age(&h, Duration::ZERO, now),
                Duration::from_secs(secs),
                "{age}"
            );
        }

        let v = map(&[
            ("vary", "Accept-Encoding, accept-encoding"),
            ("vary", "X-Tenant"),
        ]);
        let fields = vary_fields(&v).unwrap();
        assert_eq!(fields.len(), 2);
        let req = map(&[("accept-encoding", "GZIP , br")]);
        assert_eq!(vary_value(&req, &fields[0]).as_deref(), Some("gzip,br"));
        assert_eq!(vary_value(&req, &fields[1]), None);
        assert!(vary_fields(&map(&[("vary", "a b")])).is_none());
    }
}
