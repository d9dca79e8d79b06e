//! `gratify-cache`: response caching that values an entry by the delay it
//! saves.
//!
//! [`HttpCacheLayer`] caches HTTP responses with shared-cache semantics
//! (RFC 9111, RFC 5861) on moka, in memory:
//!
//! - GET and HEAD (HEAD answered from a stored GET); storable statuses only
//!   (not 4xx/5xx by default); freshness from `s-maxage`, `max-age`,
//!   `Expires − Date`, or a per-route TTL — heuristic freshness is off, so
//!   caching is opt-in by response headers or by route;
//! - `no-store`, `private`, `no-cache`, `must-revalidate`,
//!   `proxy-revalidate`, `s-maxage`; request `no-cache`, `no-store`,
//!   `max-age`, `max-stale`, `min-fresh`, `only-if-cached`; `Age` on every
//!   reuse; `Vary` (`Vary: *` never stored);
//! - revalidation with `ETag` / `Last-Modified` (304 refreshes the entry);
//!   client conditional requests answered 304 from a fresh entry;
//!   `stale-while-revalidate` (one background refresh) and `stale-if-error`,
//!   or a configured fail-safe; 504 when a `must-revalidate` entry cannot be
//!   revalidated;
//! - coalescing: concurrent misses for one key make one origin call, run
//!   detached so the first client leaving does not cancel it; followers wait
//!   a bounded time; uncacheable answers are remembered briefly
//!   (hit-for-miss);
//! - keys of scheme, Host, path and query (never path alone); requests with
//!   method-override headers bypass the cache; unsafe methods invalidate their
//!   target and same-origin `Location` / `Content-Location`;
//! - never one user's response to another: requests with `Authorization`
//!   are stored only if the response says `public`, `s-maxage` or
//!   `must-revalidate`; `Set-Cookie` responses and `Cookie` requests are not
//!   stored unless a route allows it (with the user in the key); `private`
//!   is never stored;
//! - a [`CachePurge`] handle: by key, prefix, tag (`Surrogate-Key`), or all;
//! - `Cache-Status` (RFC 9211) on every response to a plain GET or HEAD (a
//!   request with another method, or a method override, is never answered
//!   from a cache and gets none).
//!
//! [`generic::CacheLayer`] caches any tower service by a key function, with
//! a TTL, coalescing and purge.
//!
//! It depends only on `gratify-core`.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use gratify_cache::{HttpCacheConfig, HttpCacheLayer};
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let origin = {
//!     let calls = Arc::clone(&calls);
//!     service_fn(move |_req: Request<()>| {
//!         calls.fetch_add(1, Ordering::SeqCst);
//!         async {
//!             let mut r = Response::new(Full::new(Bytes::from_static(b"catalogue")));
//!             r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
//!             Ok::<_, Infallible>(r)
//!         }
//!     })
//! };
//! let cache = HttpCacheLayer::new(HttpCacheConfig::default());
//! let svc = cache.layer(origin);
//! let get = || Request::get("/products").header("host", "shop.example").body(()).unwrap();
//!
//! let first = svc.clone().oneshot(get()).await.unwrap();
//! assert_eq!(first.headers()["cache-status"], "gratify; fwd=uri-miss; stored");
//! let second = svc.oneshot(get()).await.unwrap();
//! let status = gratify_cache::cache_status::CacheStatus::from_headers(second.headers()).unwrap();
//! assert!(status.cache("gratify").unwrap().hit());
//! assert_eq!(second.headers()["age"], "0");
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod cache_status;
pub mod config;
pub mod directives;
mod entry;
pub mod generic;
mod http_cache;
pub mod key;
pub mod policy;
mod store;
pub mod tier;

pub use self::http_cache::{
    CACHE_STATUS, CacheFill, CacheFillLayer, CacheLookup, CacheLookupLayer, CachePurge,
    CacheRequests, HttpCache, HttpCacheConfig, HttpCacheLayer, LookupFuture,
};
pub use self::key::{CacheKey, KeyPart};
pub use gratify_core::{ClassId, CostModel};
