//! Invalidation by unsafe methods (RFC 9111 §4.4): after a non-error
//! response to an unsafe request, the cache drops what it holds for the
//! target URI and for the `Location` and `Content-Location` the response
//! names — when they are of the same origin, compared by parsed scheme, host
//! and port, and keyed exactly as the cache keys a request for them (query
//! order, the request's keyed headers and key part). The key without the
//! request's keyed headers and part is dropped too: the shared copy most
//! clients are served.

use http::header::{CONTENT_LOCATION, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Request, Uri};

use super::Shared;
use crate::key::{CacheKey, KEYED_HEADERS, build, origin_of, request_parts};

/// What an unsafe request may invalidate, taken before it is sent on.
pub(crate) struct Invalidation {
    scheme: String,
    authority: String,
    target: Uri,
    keyed: HeaderMap,
    part: Option<String>,
}

impl Invalidation {
    /// The request's origin and keyed inputs; `None` if it has no origin the
    /// cache keys.
    pub(crate) fn of<B>(shared: &Shared, request: &Request<B>) -> Option<Self> {
        let (scheme, authority) = origin_of(request, &shared.config.scheme)?;
        let (scheme, authority) = (scheme.to_ascii_lowercase(), authority.to_ascii_lowercase());
        let mut keyed = HeaderMap::new();
        for (name, value) in request.headers() {
            if KEYED_HEADERS.contains(&name.as_str()) {
                keyed.append(name.clone(), value.clone());
            }
        }
        let part = shared
            .key_part
            .as_deref()
            .and_then(|p| p.key_part(&request_parts(request)));
        Some(Self {
            scheme,
            authority,
            target: request.uri().clone(),
            keyed,
            part,
        })
    }

    /// Drops the target and the same-origin locations `response` names.
    pub(crate) async fn run(self, shared: &Shared, response: &HeaderMap) {
        let mut uris = vec![self.target.clone()];
        for name in [LOCATION, CONTENT_LOCATION] {
            for value in response.get_all(&name) {
                if let Some(uri) = value.to_str().ok().and_then(|v| self.resolve(v.trim())) {
                    uris.push(uri);
                }
            }
        }
        for uri in uris {
            for key in self.keys(shared, &uri) {
                shared.invalidate(&key).await;
            }
        }
    }

    fn keys(&self, shared: &Shared, uri: &Uri) -> [CacheKey; 2] {
        let sort = shared.config.sort_query;
        [
            build(
                &self.scheme,
                &self.authority,
                uri,
                sort,
                Some(&self.keyed),
                self.part.as_deref(),
            ),
            build(&self.scheme, &self.authority, uri, sort, None, None),
        ]
    }

    /// `reference` resolved against the request's URI, if it is of the
    /// request's origin.
    fn resolve(&self, reference: &str) -> Option<Uri> {
        if reference.is_empty() {
            return None;
        }
        if let Some(rest) = reference.strip_prefix("//") {
            // A network-path reference: our scheme, its authority.
            return self.resolve(&format!("{}://{rest}", self.scheme));
        }
        if reference.starts_with('/') {
            return path_only(reference);
        }
        if let Ok(uri) = reference.parse::<Uri>()
            && let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority())
        {
            if !self.same_origin(scheme, authority) {
                return None;
            }
            return path_only(uri.path_and_query().map_or("/", PathAndQuery::as_str));
        }
        if reference.contains(':') || reference.split(['/', '?']).any(|s| s == "..") {
            // Another scheme, or dot segments: not ours to guess.
            return None;
        }
        // A relative path: beside the request's own.
        let reference = reference.trim_start_matches("./");
        let base = self.target.path();
        let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
        let joined = format!("{}{}", if dir.is_empty() { "/" } else { dir }, reference);
        path_only(&joined)
    }

    fn same_origin(&self, scheme: &str, authority: &Authority) -> bool {
        let Ok(ours) = self.authority.parse::<Authority>() else {
            return false;
        };
        let port = |scheme: &str, a: &Authority| {
            a.port_u16().or(match scheme {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            })
        };
        scheme.eq_ignore_ascii_case(&self.scheme)
            && authority.host().eq_ignore_ascii_case(ours.host())
            && port(&scheme.to_ascii_lowercase(), authority) == port(&self.scheme, &ours)
    }
}

fn path_only(path: &str) -> Option<Uri> {
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    path.parse::<PathAndQuery>().ok().map(Uri::from)
}
