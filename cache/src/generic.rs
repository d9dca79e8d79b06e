//! A cache for any tower service: RPC, game protocols, anything whose
//! requests map to a key and whose responses can be cloned.
//!
//! [`CacheLayer`] keys each request with a function (returning `None` for
//! requests that must not be cached), keeps responses for a TTL in a moka
//! cache bounded by entry count, and coalesces concurrent misses for one key
//! into one call of the inner service — a call that runs detached, so the
//! first caller going away does not cancel it. Errors are never cached.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use gratify_cache::generic::CacheLayer;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), gratify_core::BoxError> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let leaderboard = {
//!     let calls = Arc::clone(&calls);
//!     service_fn(move |season: u32| {
//!         calls.fetch_add(1, Ordering::SeqCst);
//!         async move { Ok::<_, std::io::Error>(format!("top players of season {season}")) }
//!     })
//! };
//! let cache = CacheLayer::new(|season: &u32| Some(*season), 10_000, Duration::from_secs(5));
//! let purge = cache.purge();
//! let svc = cache.layer(leaderboard);
//! assert_eq!(svc.clone().oneshot(3).await?, "top players of season 3");
//! assert_eq!(svc.clone().oneshot(3).await?, "top players of season 3");
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! purge.purge(&3).await;
//! svc.oneshot(3).await?;
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use gratify_core::BoxError;
use moka::future::Cache;
use tower_layer::Layer;
use tower_service::Service;

/// Caches a service's responses by key. Cloning shares the cache.
pub struct CacheLayer<K, V, F> {
    cache: Cache<K, V>,
    key: Arc<F>,
}

impl<K, V, F> Clone for CacheLayer<K, V, F> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

impl<K, V, F> fmt::Debug for CacheLayer<K, V, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer").finish_non_exhaustive()
    }
}

impl<K, V, F> CacheLayer<K, V, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Keys requests with `key`, keeps at most `max_entries` responses, each
    /// for `ttl`.
    pub fn new(key: F, max_entries: u64, ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            key: Arc::new(key),
        }
    }

    /// The purge handle.
    pub fn purge(&self) -> Purge<K, V> {
        Purge {
            cache: self.cache.clone(),
        }
    }
}

impl<S, K, V, F> Layer<S> for CacheLayer<K, V, F> {
    type Service = CacheService<S, K, V, F>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService {
            inner,
            cache: self.cache.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

/// Removes entries from a [`CacheLayer`]'s cache.
pub struct Purge<K, V> {
    cache: Cache<K, V>,
}

impl<K, V> Clone for Purge<K, V> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
        }
    }
}

impl<K, V> fmt::Debug for Purge<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Purge").finish_non_exhaustive()
    }
}

impl<K, V> Purge<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Removes one key.
    pub async fn purge(&self, key: &K) {
        self.cache.invalidate(key).await;
    }

    /// Removes every key for which `predicate` holds.
    pub fn purge_if(&self, predicate: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        // Closures are enabled at build time; this cannot fail.
        let _ = self.cache.invalidate_entries_if(predicate);
    }

    /// Removes everything.
    pub fn purge_all(&self) {
        self.cache.invalidate_all();
    }

    /// Entries held (may lag behind by moka's pending work).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

/// The service of [`CacheLayer`].
pub struct CacheService<S, K, V, F> {
    inner: S,
    cache: Cache<K, V>,
    key: Arc<F>,
}

impl<S, K, V, F> CacheService<S, K, V, F> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K, V, F> Clone for CacheService<S, K, V, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
            key: Arc::clone(&self.key),
        }
    }
}

impl<S, K, V, F> fmt::Debug for CacheService<S, K, V, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheService").finish_non_exhaustive()
    }
}

/// An error shared by every caller of a coalesced call.
#[derive(Debug, Clone)]
pub struct SharedError(Arc<BoxError>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

impl<S, Req, K, V, F> Service<Req> for CacheService<S, K, V, F>
where
    S: Service<Req, Response = V> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
    F: Fn(&Req) -> Option<K> + Send + Sync + 'static,
{
    type Response = V;
    type Error = BoxError;
    type Future = gratify_core::BoxFuture<Result<V, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(key) = (self.key)(&request) else {
            let future = inner.call(request);
            return Box::pin(async move { future.await.map_err(Into::into) });
        };
        let cache = self.cache.clone();
        Box::pin(async move {
            // One call per key at a time; it runs detached and stores its own
            // result, so it completes and is cached even if every caller goes
            // away.
            let store = cache.clone();
            let stored_key = key.clone();
            let init = async move {
                let call = tokio::spawn(async move {
                    poll_fn(|cx| inner.poll_ready(cx))
                        .await
                        .map_err(Into::into)?;
                    let value: V = inner.call(request).await.map_err(Into::into)?;
                    store.insert(stored_key, value.clone()).await;
                    Ok::<V, BoxError>(value)
                });
                match call.await {
                    Ok(result) => result,
                    Err(join) => Err(BoxError::from(join)),
                }
            };
            cache
                .try_get_with(key, init)
                .await
                .map_err(|e: Arc<BoxError>| BoxError::from(SharedError(e)))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::{ServiceExt, service_fn};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn coalesces_expires_and_does_not_cache_errors() {
        let calls = Arc::new(AtomicUsize::new(0));
        let origin = {
            let calls = Arc::clone(&calls);
            service_fn(move |n: u32| {
                let c = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if n == 0 {
                        Err::<String, _>("zero is an error")
                    } else {
                        Ok(format!("{n}:{c}"))
                    }
                }
            })
        };
        let svc = CacheLayer::new(
            |n: &u32| (*n != 99).then_some(*n),
            100,
            Duration::from_secs(3600),
        )
        .layer(origin);
        let tasks: Vec<_> = (0..50)
            .map(|_| tokio::spawn(svc.clone().oneshot(7)))
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "7:0");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Errors are not cached.
        assert!(svc.clone().oneshot(0).await.is_err());
        assert!(svc.clone().oneshot(0).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Unkeyed requests always go through.
        svc.clone().oneshot(99).await.unwrap();
        svc.clone().oneshot(99).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_call_survives_its_caller_leaving() {
        let calls = Arc::new(AtomicUsize::new(0));
        let origin = {
            let calls = Arc::clone(&calls);
            service_fn(move |n: u32| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>(n * 2)
                }
            })
        };
        let svc = CacheLayer::new(|n: &u32| Some(*n), 100, Duration::from_secs(60)).layer(origin);
        let first = tokio::spawn(svc.clone().oneshot(21));
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(svc.clone().oneshot(21).await.unwrap(), 42);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
