//! Cache keys: scheme, authority (Host), path and query.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;

/// A primary cache key: `scheme://authority/path?query`, optionally
/// followed by `#` and an application-supplied part (a tenant, a user).
///
/// The authority comes from the request URI if absolute, else from `Host`;
/// it is lower-cased. A request without a usable authority has no key and is
/// not cached: keying by path alone would let one host's response be served
/// for another.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(Arc<str>);

impl CacheKey {
    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key from its text (as [`as_str`](Self::as_str) shows it), for purging.
    pub fn from_text(text: &str) -> Self {
        Self(text.into())
    }
}

// Keys hash and compare as their text, so the store can be asked with the
// text alone (no shared allocation for a hit).
impl std::borrow::Borrow<str> for CacheKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<String> for CacheKey {
    fn from(text: String) -> Self {
        Self(text.into())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Adds an application-chosen part to every key, such as a tenant id from an
/// authentication layer's request extension. Return `None` to add nothing.
pub trait KeyPart: Send + Sync + 'static {
    /// The extra part for this request.
    fn key_part(&self, request: &Parts) -> Option<String>;
}

impl<F> KeyPart for F
where
    F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
{
    fn key_part(&self, request: &Parts) -> Option<String> {
        self(request)
    }
}

fn valid_authority(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 255
        && a.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// Request headers that many applications read but caches commonly leave out
/// of their keys — the classic web cache poisoning vectors. When a request
/// carries one, its value becomes part of the key, so a response shaped by it
/// is only ever served to requests with the same value.
pub const KEYED_HEADERS: [&str; 10] = [
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-rewrite-url",
    "x-host",
    "forwarded",
];

/// Builds the key of a request; `None` when it has no usable authority, or
/// when its URI names one authority and its `Host` another (which one the
/// service routes by is not the cache's to guess).
pub(crate) fn key_of<B>(
    request: &http::Request<B>,
    default_scheme: &str,
    sort_query: bool,
    extra: Option<&dyn KeyPart>,
) -> Option<CacheKey> {
    key_text_of(request, default_scheme, sort_query, extra).map(CacheKey::from)
}

/// [`key_of`] as text, for a look-up that needs no [`CacheKey`].
pub(crate) fn key_text_of<B>(
    request: &http::Request<B>,
    default_scheme: &str,
    sort_query: bool,
    extra: Option<&dyn KeyPart>,
) -> Option<String> {
    let mut key = String::new();
    key_text_into(request, default_scheme, sort_query, extra, &mut key).then_some(key)
}

/// [`key_text_of`] written into `key` (cleared first): `false` for a
/// request the cache does not key.
pub(crate) fn key_text_into<B>(
    request: &http::Request<B>,
    default_scheme: &str,
    sort_query: bool,
    extra: Option<&dyn KeyPart>,
    key: &mut String,
) -> bool {
    key.clear();
    let Some((scheme, authority)) = origin_of(request, default_scheme) else {
        return false;
    };
    let part = extra.and_then(|e| e.key_part(&request_parts(request)));
    build_into(
        key,
        scheme,
        authority,
        request.uri(),
        sort_query,
        Some(request.headers()),
        part.as_deref(),
    );
    true
}

/// The request's origin as the cache keys it: its scheme and authority
/// (from the URI, else the one `Host`), as the request spells them — keys
/// lower-case them; `None` if it has none, if they disagree (ignoring case),
/// or if the authority is not a plain host and port.
pub(crate) fn origin_of<'a, B>(
    request: &'a http::Request<B>,
    default_scheme: &'a str,
) -> Option<(&'a str, &'a str)> {
    let (uri, headers) = (request.uri(), request.headers());
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return None,
        (Some(h), None) => Some(h.to_str().ok()?.trim()),
        (None, None) => None,
    };
    let authority = match (uri.authority().map(http::uri::Authority::as_str), host) {
        (Some(a), Some(h)) => {
            if !a.eq_ignore_ascii_case(h) {
                return None;
            }
            a
        }
        (Some(a), None) => a,
        (None, Some(h)) => h,
        (None, None) => return None,
    };
    if !valid_authority(authority) {
        return None;
    }
    Some((uri.scheme_str().unwrap_or(default_scheme), authority))
}

/// A key from its parts. With `headers`, the keyed headers the request
/// carries are appended; with `part`, the application's part.
pub(crate) fn build(
    scheme: &str,
    authority: &str,
    uri: &http::Uri,
    sort_query: bool,
    headers: Option<&http::HeaderMap>,
    part: Option<&str>,
) -> CacheKey {
    build_text(scheme, authority, uri, sort_query, headers, part).into()
}

fn build_text(
    scheme: &str,
    authority: &str,
    uri: &http::Uri,
    sort_query: bool,
    headers: Option<&http::HeaderMap>,
    part: Option<&str>,
) -> String {
    let mut key = String::new();
    build_into(&mut key, scheme, authority, uri, sort_query, headers, part);
    key
}

/// [`build_text`] appended to `key`, which is empty.
fn build_into(
    key: &mut String,
    scheme: &str,
    authority: &str,
    uri: &http::Uri,
    sort_query: bool,
    headers: Option<&http::HeaderMap>,
    part: Option<&str>,
) {
    let path = uri.path();
    key.reserve(
        scheme.len() + authority.len() + uri.path_and_query().map_or(0, |p| p.as_str().len()) + 4,
    );
    key.push_str(scheme);
    key.push_str("://");
    key.push_str(authority);
    key.make_ascii_lowercase();
    key.push_str(path);
    if let Some(query) = uri.query() {
        key.push('?');
        if sort_query {
            let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
            fn name(pair: &str) -> &str {
                pair.split('=').next().unwrap_or("")
            }
            pairs.sort_by(|a, b| name(a).cmp(name(b)));
            key.push_str(&pairs.join("&"));
        } else {
            key.push_str(query);
        }
    }
    if let Some(headers) = headers {
        // One pass over the request's headers (usually a handful) rather
        // than a lookup per keyed name; sorted so the key does not depend on
        // order.
        let mut keyed: Vec<(&str, &[u8])> = headers
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                (name.starts_with("x-") || name == "forwarded") && KEYED_HEADERS.contains(&name)
            })
            .map(|(name, value)| (name.as_str(), value.as_bytes()))
            .collect();
        keyed.sort();
        for (name, value) in keyed {
            // A space cannot occur in a request target: no URI can collide.
            key.push(' ');
            key.push_str(name);
            key.push('=');
            // Escaped, so that no value can spell another header or a part.
            for c in String::from_utf8_lossy(value).chars() {
                match c {
                    ' ' => key.push_str("%20"),
                    '=' => key.push_str("%3D"),
                    '#' => key.push_str("%23"),
                    '%' => key.push_str("%25"),
                    c => key.push(c),
                }
            }
        }
    }
    if let Some(part) = part {
        key.push('#');
        key.push_str(part);
    }
}

/// The request's head without its body, for a [`KeyPart`].
pub(crate) fn request_parts<B>(request: &http::Request<B>) -> Parts {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = request.method().clone();
    parts.uri = request.uri().clone();
    parts.version = request.version();
    parts.headers = request.headers().clone();
    parts.extensions = request.extensions().clone();
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::get(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn keys_include_host_path_and_query() {
        let k = key_of(&parts("/a?x=1", Some("Example.COM")), "http", false, None).unwrap();
        assert_eq!(k.as_str(), "http://example.com/a?x=1");
        let k = key_of(&parts("https://h.example/p", None), "http", false, None).unwrap();
        assert_eq!(k.as_str(), "https://h.example/p");
        assert!(key_of(&parts("/a", None), "http", false, None).is_none());
        assert!(key_of(&parts("/a", Some("evil host/")), "http", false, None).is_none());
        // The URI and Host name different origins: not keyed at all.
        assert!(
            key_of(
                &parts("http://a.example/p", Some("b.example")),
                "http",
                false,
                None
            )
            .is_none()
        );
        let k = key_of(
            &parts("http://A.example/p", Some("a.example")),
            "http",
            false,
            None,
        )
        .unwrap();
        assert_eq!(k.as_str(), "http://a.example/p");
        // A keyed header's value cannot spell another keyed header or a part.
        let forged = |v: &str| {
            let mut r = parts("/p", Some("h"));
            r.headers_mut()
                .insert("x-forwarded-host", v.parse().unwrap());
            key_of(&r, "http", false, None).unwrap()
        };
        let mut two = parts("/p", Some("h"));
        two.headers_mut()
            .insert("x-forwarded-host", "a".parse().unwrap());
        two.headers_mut().insert("x-host", "b".parse().unwrap());
        let two = key_of(&two, "http", false, None).unwrap();
        assert_ne!(forged("a x-host=b"), two);
        let sorted = key_of(&parts("/a?b=2&a=1", Some("h")), "http", true, None).unwrap();
        assert_eq!(sorted.as_str(), "http://h/a?a=1&b=2");
        let tenant = |_: &Parts| Some("t1".to_owned());
        let k = key_of(&parts("/a", Some("h")), "http", false, Some(&tenant)).unwrap();
        assert_eq!(k.as_str(), "http://h/a#t1");
    }
}
