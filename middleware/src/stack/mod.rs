//! [`Stack`]: the layers in the right order, around one cost model and one
//! load signal.
//!
//! ```text
//! request ──► classify ──► cache lookup ──► limit ──► compression ──► cache fill ──► your service
//! ```
//!
//! - **classify** first: every other layer reads the request's class.
//! - **cache lookup** next: what memory can answer (fresh, within the
//!   request's `max-stale` or the response's `stale-while-revalidate`) is
//!   answered here and never waits for a slot; requests for a key that is
//!   being filled wait here for that fill, holding no slot either.
//! - **limit** (admission): every request that goes to the service passes
//!   it — misses, revalidations, and the cache's background refreshes, as
//!   requests of their class. A request shed here costs nothing further, and a
//!   slot is held until the response body ends, so the time spent
//!   compressing counts. The limiter publishes the load signal the others
//!   read.
//! - **compression**: with the cache on too, the fill stores compressible
//!   bodies encoded once, hard, off the request path
//!   ([`HttpCacheConfig::recoder`](crate::cache::HttpCacheConfig::recoder)),
//!   and a hit carries `Content-Encoding` — never compressed again; what the
//!   cache does not store is compressed on its way out, at the level the load
//!   allows.
//! - **cache fill** innermost, next to the service whose responses it keeps:
//!   it goes to the service for what the lookup could not answer and stores
//!   what may be stored. Both halves share one store.
//!
//! Offloading is per route: wrap the CPU-heavy handlers in
//! [`OffloadLayer`](crate::offload::OffloadLayer) with the same model.
//!
//! Every piece is optional and off until asked for; an off piece costs a
//! branch. The stack is one [`Layer`]: use it in `ServiceBuilder` or
//! `axum::Router::layer`. The service keeps the inner service's error type
//! (axum's `Infallible` included).
//!
//! **Clones share.** The pieces are built once, at the first
//! [`layer`](Layer::layer) call, and shared by every service the stack
//! layers and every clone of those: axum layers each route and clones per
//! connection, and a limit per clone would silently not hold.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "compression-gzip")]
//! # {
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use gratify::cache::HttpCacheConfig;
//! use gratify::{CostModel, Stack};
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let model = CostModel::from_toml(r#"
//!     default_class = "browse"
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0 }
//!     refusal_cost = 1.0
//! "#).unwrap();
//! let stack = Stack::new(&model)
//!     .limit()
//!     .compression()
//!     .cache(HttpCacheConfig::default());
//! let svc = stack.layer(service_fn(|_: Request<()>| async {
//!     let mut r = Response::new(Full::new(Bytes::from("{\"id\":1}".repeat(200))));
//!     r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
//!     Ok::<_, Infallible>(r)
//! }));
//! let get = || Request::get("/products").header("host", "shop.example")
//!     .header("accept-encoding", "gzip").body(()).unwrap();
//! let first = svc.clone().oneshot(get()).await.unwrap();
//! assert_eq!(first.headers()["content-encoding"], "gzip");
//! let _ = first.into_body().collect().await.unwrap();
//! let second = svc.oneshot(get()).await.unwrap();
//! let status = gratify::cache::cache_status::CacheStatus::from_headers(second.headers()).unwrap();
//! assert!(status.last().unwrap().hit());
//! assert_eq!(stack.limiter().unwrap().stats().in_flight, 1, "the body is not read yet");
//! # }
//! # }
//! ```

pub mod config;
mod optional;

use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use gratify_cache::{CacheFill, CacheLookup, CachePurge, HttpCacheConfig, HttpCacheLayer};
use gratify_core::classify::{Classify, RouteClassifier};
use gratify_core::{ClassId, CostModel, LoadSignal};
use gratify_scaling::limit::{AdaptiveLimit, AdaptiveLimitLayer, Limiter};
use http::Request;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::compression::{Compression, CompressionConfig, CompressionLayer};

pub use self::config::{
    CompressionSettings, LevelChoice, LevelSettings, LimitAlgorithm, LimitSettings,
    StackConfigError, StackSettings,
};
pub use self::optional::{Optional, OptionalFuture};

/// How the stack classifies: by the routes of its file and those declared
/// with [`Stack::route`]; a request no route takes is in the default class.
#[derive(Clone, Debug)]
pub(crate) struct StackClassifier {
    /// Every route: the file's, then those declared in code.
    all: RouteClassifier,
    /// The file's routes alone, which match paths by pattern.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    file: RouteClassifier,
}

impl<B> Classify<Request<B>> for StackClassifier {
    /// Installed with axum's `Router::layer` (the `axum` feature), by the
    /// route template the router matched (its `MatchedPath`): the route
    /// declared with that template, else the file's routes matched against
    /// the path — so a route declared in code takes exactly the requests
    /// axum sends to it. Elsewhere every route is matched against the
    /// path.
    fn classify(&self, request: &Request<B>) -> ClassId {
        #[cfg(feature = "axum")]
        if let Some(template) = request.extensions().get::<axum::extract::MatchedPath>() {
            return self
                .all
                .classify_template(request.method(), template.as_str())
                .unwrap_or_else(|| self.file.classify(request));
        }
        self.all.classify(request)
    }
}

/// Routes declared in code, and whether a stack sharing them has been
/// built (then no more may be declared: they could not take effect).
#[derive(Debug)]
struct Declared {
    routes: RouteClassifier,
    sealed: bool,
}

/// Declares the routes of a router nested under a prefix; from
/// [`Stack::nest`].
#[derive(Debug)]
pub struct NestedRoutes<'s> {
    stack: &'s Stack,
    prefix: String,
}

impl<'s> NestedRoutes<'s> {
    fn new(stack: &'s Stack, outer: String, prefix: &str) -> Result<Self, StackConfigError> {
        let full = format!("{outer}{prefix}");
        let model = stack.model();
        let template = RouteClassifier::builder(&model)
            .route(None, &full, model.name(model.default_class()))
            .build()
            .is_ok();
        if !template || !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
            return Err(config::invalid(
                format!("nest {full:?}"),
                "a prefix starts with `/`, does not end with one, and is a template",
            ));
        }
        Ok(Self {
            stack,
            prefix: full,
        })
    }

    /// As [`Stack::route`], for a route of the nested router: declares the
    /// prefix and `template` together, returns `template`.
    ///
    /// # Errors
    ///
    /// As [`Stack::route`].
    pub fn route<'t>(&self, template: &'t str, class: &str) -> Result<&'t str, StackConfigError> {
        // axum nests a router's `/` at the prefix itself.
        let full = if template == "/" {
            self.prefix.clone()
        } else {
            format!("{}{template}", self.prefix)
        };
        self.stack.declare(&full, template, class)
    }

    /// The routes of a router nested in this one under `prefix`.
    ///
    /// # Errors
    ///
    /// As [`Stack::nest`].
    pub fn nest(&self, prefix: &str) -> Result<Self, StackConfigError> {
        Self::new(self.stack, self.prefix.clone(), prefix)
    }
}

/// The layers of a [`Stack`], built once and shared.
#[derive(Debug)]
struct Built {
    classifier: StackClassifier,
    /// Class names by index, for the request span (they never change).
    names: Arc<[String]>,
    limit: Option<AdaptiveLimitLayer>,
    compression: Option<CompressionLayer>,
    cache: Option<HttpCacheLayer>,
}

/// Classify, limit, compress and cache around a service, in that order,
/// sharing one [`CostModel`] and one [`LoadSignal`]. See the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct Stack {
    /// Shared by clones; swapped by `reload`.
    model: Arc<gratify_core::SharedModel>,
    signal: LoadSignal,
    routes: Option<RouteClassifier>,
    limiter: Option<Limiter>,
    compression: Option<CompressionConfig>,
    cache: Option<CacheChoice>,
    /// Paths passed straight to the service.
    exempt: Arc<[String]>,
    /// Routes declared in code with [`route`](Self::route), after the
    /// file's: shared by every stack made from this one.
    declared: Arc<Mutex<Declared>>,
    /// Keep a class an earlier layer set.
    keep_earlier_class: bool,
    /// A shared tier to put under the cache when it is built.
    cache_tier: Option<AttachTier>,
    built: Arc<OnceLock<Built>>,
}

/// Puts a shared tier under a cache layer (the tier and its settings,
/// captured).
#[derive(Clone)]
struct AttachTier(Arc<dyn Fn(HttpCacheLayer) -> HttpCacheLayer + Send + Sync>);

impl std::fmt::Debug for AttachTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachTier")
    }
}

/// The cache as configured: from settings (the stack builds it, with the
/// compress-once recoder when compressing), or built by the caller.
#[derive(Clone, Debug)]
enum CacheChoice {
    Config(Box<HttpCacheConfig>),
    Layer(HttpCacheLayer),
}

impl Stack {
    /// A stack with every piece off: each request is put in the model's
    /// default class and passed on.
    pub fn new(model: &CostModel) -> Self {
        Self {
            model: Arc::new(gratify_core::SharedModel::new(model.clone())),
            signal: LoadSignal::new(),
            routes: None,
            limiter: None,
            compression: None,
            cache: None,
            exempt: Arc::new([]),
            declared: Arc::new(Mutex::new(Declared {
                routes: RouteClassifier::builder(model)
                    .build()
                    .expect("a classifier without routes is valid"),
                sealed: false,
            })),
            keep_earlier_class: false,
            cache_tier: None,
            built: Arc::new(OnceLock::new()),
        }
    }

    /// Puts requests for the route `template` in `class`, next to where
    /// the route is declared; returns `template`, so that the route is
    /// written once:
    ///
    /// ```
    /// # use gratify::Stack;
    /// # use axum::{Router, body::Body, routing::{get, post}};
    /// # use tower::ServiceExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// # let stack = Stack::from_config(r#"
    /// #     default_class = "browse"
    /// #     [classes.checkout]
    /// #     delay_cost = { shape = "linear", per_second = 20.0 }
    /// #     refusal_cost = 10.0
    /// #     [classes.browse]
    /// #     delay_cost = { shape = "linear", per_second = 1.0 }
    /// #     refusal_cost = 1.0
    /// #     [limit]
    /// # "#)?;
    /// let app: Router = Router::new()
    ///     .route(stack.route("/checkout", "checkout")?, post(|| async { "ordered" }))
    ///     .route("/products/{id}", get(|| async { "a product" })) // the default class
    ///     .layer(stack.clone());
    /// # let post = http::Request::post("/checkout").body(Body::empty())?;
    /// # app.oneshot(post).await?;
    /// # let checkout = stack.model().id("checkout").unwrap().index();
    /// # assert_eq!(stack.limiter().unwrap().stats().classes[checkout].admitted, 1);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// `template` is a route as axum writes it: literal segments, `{name}`
    /// for one segment, `{*name}` last for the rest of the path. Installed
    /// with axum's `Router::layer` (the `axum` feature), the stack
    /// classifies a routed request by the template axum matched (its
    /// `MatchedPath`), so the class follows the route axum chose, for every
    /// method the route has; elsewhere — and for requests axum routes to
    /// no route (its fallback) — by matching the path against the template.
    /// For a router nested under a prefix, declare with
    /// [`nest`](Self::nest). Routes from the file come first among equally
    /// specific ones.
    ///
    /// Declarations are shared by this stack, its clones and every stack a
    /// builder call makes from it, and must all be made before any of them
    /// is built — by `layer`, or by `admin`, `cache_purge` or `reload`.
    ///
    /// # Errors
    ///
    /// An unknown class (the error lists the known ones), a malformed
    /// template or one with a bare `*` segment (not an axum template), a
    /// template already declared for another class (in code or in the file,
    /// for any method), or a stack already built.
    pub fn route<'t>(&self, template: &'t str, class: &str) -> Result<&'t str, StackConfigError> {
        self.declare(template, template, class)
    }

    /// Declares the routes of a router nested under `prefix` (axum's
    /// `Router::nest`): axum matches them by their full template
    /// (`/api/orders/{id}`), which the returned handle declares while
    /// giving back the template the nested router is written with.
    ///
    /// ```
    /// # use gratify::Stack;
    /// # use axum::{Router, routing::post};
    /// # fn main() -> Result<(), gratify::stack::StackConfigError> {
    /// # let stack = Stack::from_config(r#"
    /// #     default_class = "browse"
    /// #     [classes.checkout]
    /// #     delay_cost = { shape = "linear", per_second = 20.0 }
    /// #     refusal_cost = 10.0
    /// #     [classes.browse]
    /// #     delay_cost = { shape = "linear", per_second = 1.0 }
    /// #     refusal_cost = 1.0
    /// # "#)?;
    /// let api = stack.nest("/api")?;
    /// let orders: Router = Router::new().route(api.route("/orders", "checkout")?, post(|| async { "ordered" }));
    /// let app: Router = Router::new().nest("/api", orders).layer(stack);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// `prefix` does not start with `/`, ends with `/`, or is not a
    /// template.
    pub fn nest(&self, prefix: &str) -> Result<NestedRoutes<'_>, StackConfigError> {
        NestedRoutes::new(self, String::new(), prefix)
    }

    fn declare<'t>(
        &self,
        full: &str,
        template: &'t str,
        class: &str,
    ) -> Result<&'t str, StackConfigError> {
        let key = format!("route {full:?}");
        let model = self.model();
        let class_id = model.resolve(&format!("{key}.class"), class)?;
        if full.split('/').any(|segment| segment == "*") {
            return Err(config::invalid(
                key,
                "a bare `*` segment is a file pattern, not an axum template (use {*name})",
            ));
        }
        let mut declared = self
            .declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if declared.sealed {
            return Err(config::invalid(
                key,
                "the stack is already built (by `layer`, `admin`, `cache_purge` or `reload`): declare routes before",
            ));
        }
        let with = declared
            .routes
            .with_route(&model, &key, None, full, class)?;
        let earlier = [self.routes.as_ref(), Some(&declared.routes)]
            .into_iter()
            .flatten()
            .flat_map(|r| r.declared(full))
            .find(|(_, c)| *c != class_id);
        if let Some((method, earlier)) = earlier {
            let method = method.map_or_else(|| "any method".to_owned(), |m| m.to_string());
            return Err(config::invalid(
                key,
                format!(
                    "already declared for class {:?} ({method})",
                    model.name(earlier)
                ),
            ));
        }
        declared.routes = with;
        Ok(template)
    }

    /// Keeps the class a request already carries instead of classifying
    /// it again: a [`ClassId`] of this stack's model
    /// (`stack.model().id("checkout")`) that a layer of yours outside the
    /// stack put in the request's extensions — for the requests it can
    /// tell apart (a tenant's plan, a trusted upstream's header); requests
    /// without one are classified by the routes. A layer that classifies
    /// every request (a [`ClassifyLayer`](gratify_core::classify::ClassifyLayer))
    /// takes over from the routes entirely. A class index beyond this
    /// model's classes is ignored. Off by default: the routes decide, and a
    /// class a client could have caused to be set is never trusted.
    #[must_use]
    pub fn keep_earlier_class(mut self) -> Self {
        self.keep_earlier_class = true;
        self.unbuilt()
    }

    /// Passes `GET` and `HEAD` requests for these paths (exactly, without
    /// the query) straight to the service: no limit, no cache, no
    /// compression, no span (the request still gets its class). For health
    /// and readiness checks, which must be answered at once however loaded
    /// the service is — a probe that waits behind the load or is shed as
    /// part of it gets a healthy replica restarted or taken out of
    /// rotation. Keep what these routes do cheap: nothing counts or bounds
    /// it, and a path the router does not know reaches its fallback the
    /// same way. A path that does not start with `/` never matches and is
    /// left out (with a warning). Under axum's `nest`, the stack sees the
    /// nested router's own paths.
    #[must_use]
    pub fn exempt<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let mut all: Vec<String> = self.exempt.to_vec();
        for path in paths.into_iter().map(Into::into) {
            if path.starts_with('/') && !path.contains(['?', '#']) {
                all.push(path);
            } else {
                tracing::warn!(
                    path,
                    "an exempt path must start with / and have no query; left out"
                );
            }
        }
        all.sort();
        all.dedup();
        self.exempt = all.into();
        self.unbuilt()
    }

    /// Classifies requests by `routes` (else: all in the default class).
    #[must_use]
    pub fn routes(mut self, routes: RouteClassifier) -> Self {
        self.routes = Some(routes);
        self.unbuilt()
    }

    /// Limits concurrency and admits by the delay-cost model (the default
    /// [`Limiter`]), holding each slot until the response body ends.
    #[must_use]
    pub fn limit(self) -> Self {
        let limiter = Limiter::new(&self.model());
        self.limit_with(limiter)
    }

    /// Limits with `limiter` (its algorithm and settings); the stack's load
    /// signal becomes the one it publishes.
    #[must_use]
    pub fn limit_with(mut self, limiter: Limiter) -> Self {
        self.signal = limiter.load_signal().clone();
        self.limiter = Some(limiter);
        self.unbuilt()
    }

    /// Compresses responses, choosing codec and level by cost and load
    /// ([`Level::Adaptive`](crate::compression::Level::Adaptive)).
    #[must_use]
    pub fn compression(self) -> Self {
        self.compression_with(CompressionConfig {
            level: crate::compression::Level::Adaptive,
            ..CompressionConfig::default()
        })
    }

    /// Compresses responses with `config` (which says fixed or adaptive).
    #[must_use]
    pub fn compression_with(mut self, config: CompressionConfig) -> Self {
        self.compression = Some(config);
        self.unbuilt()
    }

    /// Caches responses with `config`, valuing entries by the model. With
    /// compression on and no recoder in `config`, compressible bodies are
    /// stored encoded once ([`Recompress`](crate::compression::Recompress))
    /// and a hit is never compressed again.
    #[must_use]
    pub fn cache(mut self, config: HttpCacheConfig) -> Self {
        self.cache = Some(CacheChoice::Config(Box::new(config)));
        self.unbuilt()
    }

    /// Caches with an `HttpCacheLayer` built elsewhere (with a shared tier,
    /// a key part), as it is.
    #[must_use]
    pub fn cache_layer(mut self, layer: HttpCacheLayer) -> Self {
        self.cache = Some(CacheChoice::Layer(layer));
        self.unbuilt()
    }

    /// Puts a shared second tier (Redis) under the stack's cache, however the
    /// cache was configured (from a file's `[cache]` table too): every
    /// replica given the same tier and namespace shares entries, and a purge
    /// on one reaches all (see [`gratify_cache::tier`]). Without a cache it
    /// does nothing.
    ///
    /// ```
    /// # #[cfg(feature = "redis")] {
    /// use gratify::cache::tier::TierConfig;
    /// use gratify::cache::tier::redis::RedisTier;
    ///
    /// let stack = gratify::Stack::from_config(r#"
    ///     default_class = "page"
    ///     [classes.page]
    ///     delay_cost = { shape = "linear", per_second = 1.0 }
    ///     refusal_cost = 1.0
    ///     [cache]
    /// "#).unwrap();
    /// // Connects lazily: no Redis is needed until the first request.
    /// let tier = RedisTier::open("redis://127.0.0.1:6379").unwrap();
    /// let stack = stack.cache_tier(tier, TierConfig::new("shop:cache"));
    /// assert!(stack.cache_purge().is_some());
    /// # }
    /// ```
    #[must_use]
    pub fn cache_tier<T>(mut self, tier: T, config: gratify_cache::tier::TierConfig) -> Self
    where
        T: gratify_cache::tier::SharedTier + Clone,
    {
        self.cache_tier = Some(AttachTier(Arc::new(move |layer: HttpCacheLayer| {
            layer.with_tier(tier.clone(), config.clone())
        })));
        self.unbuilt()
    }

    /// A builder call makes a new stack: it shares nothing with the one it
    /// was called on (or that one's clones), used or not.
    fn unbuilt(mut self) -> Self {
        self.built = Arc::new(OnceLock::new());
        self.model = Arc::new(gratify_core::SharedModel::new(self.model()));
        self
    }

    /// The cost model (the latest, after a [`reload`](Self::reload)).
    pub fn model(&self) -> CostModel {
        self.model.get()
    }

    /// Takes new costs and prices at run time, without a restart and without
    /// dropping a request: the limiter, compression and the cache each swap
    /// to `model` at once (a request decided before a swap keeps the old
    /// costs in that layer). The classes and the default class must stay
    /// the same — so every route and `ClassId` keeps its meaning.
    ///
    /// # Errors
    ///
    /// [`ModelError::Incompatible`](gratify_core::ModelError::Incompatible):
    /// nothing changes.
    pub fn reload(&self, model: &CostModel) -> Result<(), gratify_core::ModelError> {
        self.model().check_reload(model)?;
        let built = self.built();
        if let Some(limiter) = &self.limiter {
            limiter.reload(model)?;
        }
        if let Some(compression) = &built.compression {
            compression.reload(model)?;
        }
        if let Some(cache) = &built.cache {
            cache.reload(model)?;
        }
        self.model.reload(model)
    }

    /// Reloads the costs and prices of a stack file (see
    /// [`config`]); the whole file is checked, but
    /// only the model takes effect — other settings need a restart.
    ///
    /// # Errors
    ///
    /// The file is invalid, or its classes differ.
    pub fn reload_config(&self, text: &str) -> Result<(), StackConfigError> {
        let new = Self::from_config(text)?;
        self.reload(&new.model())?;
        Ok(())
    }

    /// The load signal every piece shares (published by the limiter).
    pub fn load_signal(&self) -> &LoadSignal {
        &self.signal
    }

    /// The limiter, if limiting.
    pub fn limiter(&self) -> Option<&Limiter> {
        self.limiter.as_ref()
    }

    /// The admin service over this stack's pieces: a JSON snapshot and
    /// Prometheus text (see [`Admin`](crate::Admin)); add CPU pools and
    /// deferred queues with its `with_pool` and `with_defer`.
    pub fn admin(&self) -> crate::Admin {
        let built = self.built();
        let model = Arc::clone(&self.model);
        crate::Admin::new(
            move || model.get(),
            self.limiter.clone(),
            built.cache.as_ref().map(HttpCacheLayer::purge),
            built.compression.clone(),
        )
    }

    /// The cache's purge handle, if caching.
    pub fn cache_purge(&self) -> Option<CachePurge> {
        self.built().cache.as_ref().map(HttpCacheLayer::purge)
    }

    fn built(&self) -> &Built {
        self.built.get_or_init(|| self.build())
    }

    /// The layers, built once (by [`built`](Self::built)).
    fn build(&self) -> Built {
        let compression = self.compression.clone().map(|config| {
            CompressionLayer::adaptive_with_config(config, &self.model(), self.signal.clone())
        });
        Built {
            names: self
                .model()
                .iter()
                .map(|(_, name, _)| name.to_owned())
                .collect(),
            classifier: {
                let mut declared = self
                    .declared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                // Sealed under the lock that declarations take: none can
                // slip in after this copy and be lost.
                declared.sealed = true;
                let file = self.routes.clone().unwrap_or_else(|| {
                    RouteClassifier::builder(&self.model())
                        .build()
                        .expect("a classifier without routes is valid")
                });
                StackClassifier {
                    all: file.followed_by(&declared.routes),
                    file,
                }
            },
            limit: self
                .limiter
                .clone()
                .map(|l| AdaptiveLimitLayer::with_limiter(l).hold_until_body_end(true)),
            cache: self.cache.clone().map(|choice| {
                let layer = match choice {
                    CacheChoice::Layer(layer) => layer,
                    CacheChoice::Config(config) => {
                        let mut config = *config;
                        if let Some(compression) = &compression
                            && config.recoder.is_none()
                        {
                            // Compressed once for the cache, and counted as
                            // the compression it is.
                            // In the codecs the compression offers.
                            let codecs = self
                                .compression
                                .as_ref()
                                .map(|c| c.codecs.clone())
                                .unwrap_or_default();
                            config.recoder = Some(Arc::new(
                                crate::compression::Recompress::with_codecs(&codecs)
                                    .counted_in(compression),
                            ));
                        }
                        HttpCacheLayer::with_model(config, &self.model())
                    }
                };
                match &self.cache_tier {
                    Some(attach) => (attach.0)(layer),
                    None => layer,
                }
            }),
            compression,
        }
    }
}

/// The cache's second half (it fills what the first could not answer), on
/// or off.
pub type FillStage<S> = Optional<CacheFill<S>, S>;
/// Compression around the fill, on or off.
pub type CompressionStage<S> = Optional<Compression<FillStage<S>>, FillStage<S>>;
/// The limit around compression, on or off.
pub type LimitStage<S> = Optional<AdaptiveLimit<CompressionStage<S>>, CompressionStage<S>>;
/// The cache's first half (it answers from memory) around the limit, on or
/// off.
pub type LookupStage<S> = Optional<CacheLookup<LimitStage<S>>, LimitStage<S>>;

impl<S: Clone> Layer<S> for Stack {
    type Service = StackService<S>;

    fn layer(&self, inner: S) -> StackService<S> {
        let built = self.built();
        // A second handle on the service, only when some paths bypass the
        // stack; it is made ready only for the requests it takes.
        let direct = (!self.exempt.is_empty()).then(|| inner.clone());
        let fill = match &built.cache {
            Some(l) => Optional::On(l.fill().layer(inner)),
            None => Optional::Off(inner),
        };
        let compression = match &built.compression {
            Some(l) => Optional::On(l.layer(fill)),
            None => Optional::Off(fill),
        };
        let limit = match &built.limit {
            Some(l) => Optional::On(l.layer(compression)),
            None => Optional::Off(compression),
        };
        let lookup = match &built.cache {
            Some(l) => Optional::On(l.lookup().layer(limit)),
            None => Optional::Off(limit),
        };
        StackService {
            inner: lookup,
            direct,
            exempt: Arc::clone(&self.exempt),
            classifier: built.classifier.clone(),
            keep_earlier_class: self.keep_earlier_class,
            names: Arc::clone(&built.names),
            model: Arc::clone(&self.model),
        }
    }
}

/// The service of a [`Stack`]. Clones share every piece.
///
/// Each request runs in a `gratify` span (at `INFO`) whose fields the layers
/// fill in: `class`; `admission` (`admitted`, `queued`, `admitted after
/// queueing`, `shed`) and `shed_reason`; `cache` (the `Cache-Status` detail:
/// `hit`, `fwd=uri-miss; stored`, …); `codec` and `level` when the response
/// is compressed.
///
/// Requests for the [exempt](Stack::exempt) paths go straight to the
/// service: its response is the `Right` arm of the body.
#[derive(Clone, Debug)]
pub struct StackService<S> {
    inner: LookupStage<S>,
    /// The service itself, for the exempt paths (only when there are some).
    direct: Option<S>,
    exempt: Arc<[String]>,
    classifier: StackClassifier,
    keep_earlier_class: bool,
    names: Arc<[String]>,
    /// For the context of calls the service makes (class and deadline).
    model: Arc<gratify_core::SharedModel>,
}

impl<S> StackService<S> {
    /// The service under the stack's layers.
    pub fn get_ref(&self) -> &S {
        self.inner.inner_ref().inner_ref().inner_ref().inner_ref()
    }

    /// The service under the stack's layers, mutably. (With exempt paths the
    /// stack keeps a clone of the service for them, which this does not
    /// reach.)
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.inner_mut().inner_mut().inner_mut().inner_mut()
    }

    /// The service under the stack's layers, the layers dropped.
    pub fn into_inner(self) -> S {
        self.inner
            .into_inner_service()
            .into_inner_service()
            .into_inner_service()
            .into_inner_service()
    }
}

impl<S, B, StackBody, ServiceBody> Service<Request<B>> for StackService<S>
where
    LookupStage<S>: Service<Request<B>, Response = http::Response<StackBody>>,
    S: Clone
        + Service<
            Request<B>,
            Response = http::Response<ServiceBody>,
            Error = <LookupStage<S> as Service<Request<B>>>::Error,
        >,
{
    type Response = http::Response<http_body_util::Either<StackBody, ServiceBody>>;
    type Error = <LookupStage<S> as Service<Request<B>>>::Error;
    type Future = StackFuture<
        OptionalFuture<
            <LookupStage<S> as Service<Request<B>>>::Future,
            DirectFuture<S, Request<B>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Only the stack's own way is made ready here: an exempt request
        // readies a clone of its own, so that a service whose readiness
        // reserves capacity is never reserved twice for one request.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let earlier = request
            .extensions()
            .get::<ClassId>()
            .filter(|c| self.keep_earlier_class && c.index() < self.names.len())
            .copied();
        let propagated = gratify_core::classify::propagated_of(&request);
        // A class the application set earlier (when told to keep it), else
        // the one a trusted caller propagated, else the stack's own rules.
        let class = earlier
            .or_else(|| {
                propagated
                    .and_then(|p| p.class)
                    .filter(|c| c.index() < self.names.len())
            })
            .unwrap_or_else(|| self.classifier.classify(&request));
        request.extensions_mut().insert(class);
        // Calls the service makes while serving carry the request's class
        // and what is left of its deadline.
        let context = crate::balance::CallContext::served(
            Arc::clone(&self.model),
            class,
            gratify_core::classify::arrived_of(&request)
                .unwrap_or_else(crate::balance::propagate::now),
            propagated.and_then(|p| p.deadline),
        );
        if let Some(direct) = &self.direct
            && matches!(*request.method(), http::Method::GET | http::Method::HEAD)
            && self
                .exempt
                .binary_search_by(|p| p.as_str().cmp(request.uri().path()))
                .is_ok()
        {
            let future = DirectFuture::new(direct.clone(), request);
            return StackFuture {
                inner: context
                    .scope(OptionalFuture::off(future))
                    .instrument(tracing::Span::none()),
                measure: None,
            };
        }
        let measure = Measure::start(&request, &self.names, class);
        let name = self.names.get(class.index()).map_or("", String::as_str);
        let span = tracing::info_span!(
            "gratify",
            class = name,
            admission = tracing::field::Empty,
            shed_reason = tracing::field::Empty,
            cache = tracing::field::Empty,
            codec = tracing::field::Empty,
            level = tracing::field::Empty,
        );
        // The layers decide inside `call`: enter the span for it.
        let inner = span.in_scope(|| {
            let future = context
                .clone()
                .sync_scope(|| OptionalFuture::on(self.inner.call(request)));
            context.scope(future)
        });
        let inner = inner.instrument(span);
        StackFuture { inner, measure }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`StackService`]: the stack's answer in the request's
    /// span, its duration recorded (with the `metrics` feature) as
    /// OpenTelemetry's `http.server.request.duration`.
    pub struct StackFuture<F> {
        #[pin]
        inner: Instrumented<tokio::task::futures::TaskLocalFuture<crate::balance::CallContext, F>>,
        measure: Option<Measure>,
    }
}

impl<F> std::fmt::Debug for StackFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackFuture").finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for StackFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some(measure) = this.measure.take() {
            measure.record(out.as_ref().ok().map(http::Response::status));
        }
        Poll::Ready(out)
    }
}

/// A request's duration in the making, with OpenTelemetry's attributes:
/// its method, its route template (axum's `MatchedPath`, never the raw
/// path), and its class.
#[derive(Debug)]
struct Measure {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
    #[cfg(feature = "metrics")]
    labels: Vec<metrics::Label>,
}

impl Measure {
    #[cfg(feature = "metrics")]
    fn start<B>(request: &Request<B>, names: &[String], class: ClassId) -> Option<Self> {
        #[cfg_attr(not(feature = "axum"), allow(unused_mut))]
        let mut labels = vec![
            metrics::Label::new("http.request.method", request.method().as_str().to_owned()),
            metrics::Label::new(
                "gratify.class",
                names.get(class.index()).cloned().unwrap_or_default(),
            ),
        ];
        #[cfg(feature = "axum")]
        if let Some(route) = request.extensions().get::<axum::extract::MatchedPath>() {
            labels.push(metrics::Label::new("http.route", route.as_str().to_owned()));
        }
        Some(Self {
            started: std::time::Instant::now(),
            labels,
        })
    }

    #[cfg(not(feature = "metrics"))]
    fn start<B>(_: &Request<B>, _: &[String], _: ClassId) -> Option<Self> {
        None
    }

    /// Records the duration, with the response's status (`None`: the
    /// service failed, `error.type` then).
    fn record(self, status: Option<http::StatusCode>) {
        #[cfg(feature = "metrics")]
        {
            let mut labels = self.labels;
            labels.push(match status {
                Some(s) => metrics::Label::new("http.response.status_code", s.as_u16().to_string()),
                None => metrics::Label::new("error.type", "_OTHER"),
            });
            metrics::histogram!(
                gratify_core::telemetry::HTTP_SERVER_REQUEST_DURATION.name,
                labels
            )
            .record(self.started.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = status;
    }
}

pin_project_lite::pin_project! {
    /// The future of a request on an [exempt](Stack::exempt) path: a clone
    /// of the service, made ready, then called.
    pub struct DirectFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: DirectState<S, Req, S::Future>,
    }
}

pin_project_lite::pin_project! {
    #[project = DirectProj]
    enum DirectState<S, Req, F> {
        Readying { service: S, request: Option<Req> },
        Called { #[pin] future: F },
    }
}

impl<S: Service<Req>, Req> DirectFuture<S, Req> {
    fn new(service: S, request: Req) -> Self {
        Self {
            state: DirectState::Readying {
                service,
                request: Some(request),
            },
        }
    }
}

impl<S: Service<Req>, Req> Future for DirectFuture<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                DirectProj::Readying { service, request } => {
                    std::task::ready!(service.poll_ready(cx))?;
                    let Some(request) = request.take() else {
                        panic!("DirectFuture polled after completion");
                    };
                    let future = service.call(request);
                    this.state.set(DirectState::Called { future });
                }
                DirectProj::Called { future } => return future.poll(cx),
            }
        }
    }
}

impl<S: Service<Req>, Req> std::fmt::Debug for DirectFuture<S, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectFuture")
    }
}
