use std::cmp::Ordering;
use std::sync::Arc;

use http::{Method, Request};
use serde::{Deserialize, Serialize};

use super::Classify;
use crate::{ClassId, CostModel, ModelError};

/// Classifies requests by method and path.
///
/// # Patterns
///
/// - `/checkout` — exactly this path;
/// - `/orders/{id}` — `{name}` matches one non-empty segment;
/// - `/static/*` — a trailing `*` matches the prefix itself and anything
///   below it (`/static`, `/static/a/b`), at segment boundaries (`/staticx`
///   does not match); `/*` matches every path;
/// - `/assets/{*path}` — axum's catch-all: a trailing `{*name}` matches one
///   segment or more (`/assets/a`, `/assets/css/site.css`, not `/assets`),
///   as axum routes it.
///
/// Anything else with `{`, `}` or `*` in it is refused when the classifier
/// is built, never matched as something else.
///
/// Paths are compared segment by segment, after dropping empty segments
/// (`//a/` is `/a`); the query string is ignored; matching is case-sensitive
/// and on the path as received (no percent-decoding). A route for `GET` also
/// matches `HEAD`.
///
/// # Precedence: the most specific route wins
///
/// 1. Of the routes whose pattern matches the path, compare the patterns one
///    segment at a time from the left; at the first segment where they differ,
///    a literal beats `{param}`, which beats the `*` tail. A pattern that ends
///    exactly where the path ends beats one that continues with `*`. So
///    `/orders/new` beats `/orders/{id}`, which beats `/orders/*`; and
///    `/api/v1/*` beats `/api/*`.
/// 2. Between equally specific paths, a route with a method beats one without.
/// 3. Still tied: the route added first.
/// 4. No match: the model's default class.
///
/// # Example
///
/// ```
/// use gratify_core::classify::{Classify, RouteClassifier};
/// use gratify_core::{Class, CostModel, DelayCost};
/// use http::{Method, Request};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let class = |rate| Class::new(DelayCost::linear(rate).unwrap(), 1.0).unwrap();
/// let model = CostModel::builder()
///     .class("browse", class(1.0))
///     .class("order-status", class(2.0))
///     .class("checkout", class(20.0))
///     .default_class("browse")
///     .build()?;
/// let routes = RouteClassifier::builder(&model)
///     .route(None, "/orders/*", "browse")
///     .route(None, "/orders/{id}", "order-status")
///     .route(Some(Method::POST), "/orders/{id}", "checkout")
///     .build()?;
///
/// let req = |m: Method, p: &str| Request::builder().method(m).uri(p).body(()).unwrap();
/// assert_eq!(routes.classify(&req(Method::GET, "/orders/42")), model.id("order-status").unwrap());
/// assert_eq!(routes.classify(&req(Method::POST, "/orders/42")), model.id("checkout").unwrap());
/// assert_eq!(routes.classify(&req(Method::GET, "/orders/42/items")), model.id("browse").unwrap());
/// assert_eq!(routes.classify(&req(Method::GET, "/elsewhere")), model.default_class());
/// # Ok(())
/// # }
/// ```
// Not `matchit` (axum's router): a class file has what a router refuses or
// means otherwise — one pattern with and without a method, overlapping
// patterns decided by specificity (`/orders/*` beside `/orders/{id}`), a
// `*` tail that matches its prefix itself, empty segments ignored — and
// requests that match nothing fall to a default rather than a 404. With
// axum the declared routes follow `MatchedPath` instead, so both agree on
// what axum routed.
#[derive(Debug, Clone)]
pub struct RouteClassifier {
    routes: Arc<[Route]>,
    default_class: ClassId,
}

#[derive(Debug, Clone)]
struct Route {
    method: Option<Method>,
    segments: Box<[Segment]>,
    tail: Tail,
    /// Whether the pattern ends in `/` (a router tells `/a/` from `/a`;
    /// path matching does not).
    slash: bool,
    class: ClassId,
}

/// What a pattern allows after its fixed segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// Nothing: the path ends where the pattern does.
    End,
    /// `*`: any number of segments, none included.
    Star,
    /// `{*name}`: one segment or more.
    CatchAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Param,
}

/// How specific a pattern is at one segment position; higher is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Wildcard,
    Param,
    Literal,
    End,
}

/// One route as written in configuration:
/// `{ method = "POST", path = "/checkout", class = "checkout" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// The method, or any method when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The path pattern (see [`RouteClassifier`]).
    pub path: String,
    /// The class name.
    pub class: String,
}

/// An invalid route.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The path pattern is malformed.
    #[error("{key}: invalid path pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The configuration key (`routes[2].path`).
        key: String,
        /// The pattern.
        pattern: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The method is not a valid HTTP method token.
    #[error("{key}: invalid HTTP method {method:?}")]
    InvalidMethod {
        /// The configuration key.
        key: String,
        /// The method given.
        method: String,
    },
    /// The class is unknown, or another model error.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Builds a [`RouteClassifier`]; errors surface at [`build`](Self::build).
#[derive(Debug)]
#[must_use]
pub struct RouteClassifierBuilder {
    model: CostModel,
    routes: Vec<Route>,
    error: Option<RouteError>,
}

impl RouteClassifier {
    /// A builder resolving class names against `model`.
    pub fn builder(model: &CostModel) -> RouteClassifierBuilder {
        RouteClassifierBuilder {
            model: model.clone(),
            routes: Vec::new(),
            error: None,
        }
    }

    /// A classifier from configuration rules (keys in errors are `routes[i]`).
    ///
    /// # Errors
    ///
    /// The first invalid rule.
    pub fn from_rules(model: &CostModel, rules: &[RouteRule]) -> Result<Self, RouteError> {
        let mut builder = Self::builder(model);
        for (i, rule) in rules.iter().enumerate() {
            let key = format!("routes[{i}]");
            let method = match &rule.method {
                None => None,
                Some(m) => match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(m) => Some(m),
                    Err(_) => {
                        return Err(RouteError::InvalidMethod {
                            key: format!("{key}.method"),
                            method: m.clone(),
                        });
                    }
                },
            };
            builder = builder.add(&key, method, &rule.path, &rule.class);
        }
        builder.build()
    }

    /// The class of a request with this method and path.
    pub fn classify_path(&self, method: &Method, path: &str) -> ClassId {
        let n = segments(path).count();
        let mut best: Option<&Route> = None;
        for route in self.routes.iter() {
            if !route.method_matches(method) || !route.matches(path, n) {
                continue;
            }
            best = match best {
                Some(b) if route.compare(b, n) != Ordering::Greater => Some(b),
                _ => Some(route),
            };
        }
        best.map_or(self.default_class, |r| r.class)
    }

    /// The class of the route whose pattern is `template`: a route template
    /// as the router matched it (axum's `MatchedPath`, `/users/{id}`),
    /// compared by shape — literal segments exactly, parameters whatever
    /// they are named. A route for this method wins over one for any
    /// method. `None` when no route has that pattern, or `template` is not
    /// one: then classify by the path.
    ///
    /// ```
    /// use gratify_core::classify::RouteClassifier;
    /// use gratify_core::{Class, CostModel, DelayCost};
    /// use http::Method;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let model = CostModel::builder()
    ///     .class("browse", Class::new(DelayCost::linear(1.0)?, 1.0)?)
    ///     .class("product", Class::new(DelayCost::linear(5.0)?, 5.0)?)
    ///     .default_class("browse")
    ///     .build()?;
    /// let routes = RouteClassifier::builder(&model)
    ///     .route(None, "/products/{id}", "product")
    ///     .build()?;
    /// let product = model.id("product");
    /// assert_eq!(routes.classify_template(&Method::GET, "/products/{product_id}"), product);
    /// assert_eq!(routes.classify_template(&Method::GET, "/products/{id}/reviews"), None);
    /// # Ok(())
    /// # }
    /// ```
    pub fn classify_template(&self, method: &Method, template: &str) -> Option<ClassId> {
        let mut best: Option<&Route> = None;
        for route in self.routes.iter() {
            if !route.method_matches(method) || !route.has_shape(template) {
                continue;
            }
            // The first of equals, as by path; a method-specific route wins.
            if best.is_none_or(|b| b.method.is_none() && route.method.is_some()) {
                best = Some(route);
            }
        }
        best.map(|r| r.class)
    }

    /// This classifier with one more route (after its own: among equally
    /// specific routes the first wins), resolving `class` against `model`
    /// — the model this classifier was built with.
    ///
    /// # Errors
    ///
    /// An unknown class (the error lists the known ones) or a malformed
    /// pattern; `key` names the route in the error.
    pub fn with_route(
        &self,
        model: &CostModel,
        key: &str,
        method: Option<Method>,
        pattern: &str,
        class: &str,
    ) -> Result<Self, RouteError> {
        let builder = RouteClassifierBuilder {
            model: model.clone(),
            routes: self.routes.to_vec(),
            error: None,
        };
        let built = builder.add(key, method, pattern, class).build()?;
        Ok(Self {
            default_class: self.default_class,
            ..built
        })
    }

    /// The routes declared with this pattern (by shape, as
    /// [`classify_template`](Self::classify_template) compares: parameters
    /// whatever they are named, a final `/` counts): each one's method
    /// (`None`: any) and class, in order.
    pub fn declared(&self, pattern: &str) -> Vec<(Option<Method>, ClassId)> {
        self.routes
            .iter()
            .filter(|r| r.has_shape(pattern))
            .map(|r| (r.method.clone(), r.class))
            .collect()
    }

    /// This classifier's routes, then `other`'s (for classifiers built on
    /// the same model); its default class.
    #[must_use]
    pub fn followed_by(&self, other: &Self) -> Self {
        Self {
            routes: self
                .routes
                .iter()
                .chain(other.routes.iter())
                .cloned()
                .collect(),
            default_class: self.default_class,
        }
    }

    /// Whether it has no routes (everything is in the default class).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The class of requests no route matches.
    pub fn default_class(&self) -> ClassId {
        self.default_class
    }
}

impl<B> Classify<Request<B>> for RouteClassifier {
    fn classify(&self, request: &Request<B>) -> ClassId {
        self.classify_path(request.method(), request.uri().path())
    }

    fn slot_hold(&self, request: &Request<B>) -> Option<crate::slot::SlotHold> {
        super::slot_hold_of(request)
    }

    fn propagated(&self, request: &Request<B>) -> Option<super::Propagated> {
        super::propagated_of(request)
    }

    fn grpc(&self, request: &Request<B>) -> bool {
        crate::refusal::is_grpc(request.headers())
    }
}

impl Classify<http::request::Parts> for RouteClassifier {
    fn classify(&self, parts: &http::request::Parts) -> ClassId {
        self.classify_path(&parts.method, parts.uri.path())
    }
}

impl RouteClassifierBuilder {
    /// Adds a route: requests with `method` (any method when `None`) whose
    /// path matches `pattern` belong to `class`.
    pub fn route(self, method: Option<Method>, pattern: &str, class: &str) -> Self {
        let key = format!("route {pattern:?}");
        self.add(&key, method, pattern, class)
    }

    fn add(mut self, key: &str, method: Option<Method>, pattern: &str, class: &str) -> Self {
        if self.error.is_some() {
            return self;
        }
        let parsed = parse_pattern(pattern).map_err(|reason| RouteError::InvalidPattern {
            key: format!("{key}.path"),
            pattern: pattern.to_owned(),
            reason,
        });
        let class = self
            .model
            .resolve(&format!("{key}.class"), class)
            .map_err(RouteError::from);
        match (parsed, class) {
            (Ok((segments, tail)), Ok(class)) => self.routes.push(Route {
                method,
                segments,
                tail,
                slash: pattern.len() > 1 && pattern.ends_with('/'),
                class,
            }),
            (Err(e), _) | (_, Err(e)) => self.error = Some(e),
        }
        self
    }

    /// Validates and builds the classifier.
    ///
    /// # Errors
    ///
    /// The first invalid route.
    pub fn build(self) -> Result<RouteClassifier, RouteError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(RouteClassifier {
                routes: self.routes.into(),
                default_class: self.model.default_class(),
            }),
        }
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// One segment of a pattern, as written.
enum Part<'a> {
    Literal(&'a str),
    Param,
    /// `{*name}`: the rest of the path (last only).
    CatchAll,
    /// `*`: any number of segments (last only).
    Star,
}

fn part(segment: &str) -> Result<Part<'_>, &'static str> {
    let whole = |name: &str| !name.is_empty() && !name.contains(['{', '}', '*']);
    if segment == "*" {
        Ok(Part::Star)
    } else if let Some(name) = segment.strip_prefix("{*") {
        match name.strip_suffix('}') {
            Some(name) if whole(name) => Ok(Part::CatchAll),
            _ => Err("a catch-all must be a whole segment such as {*path}"),
        }
    } else if let Some(name) = segment.strip_prefix('{') {
        match name.strip_suffix('}') {
            Some(name) if whole(name) => Ok(Part::Param),
            _ => Err("a parameter must be a whole segment such as {id}"),
        }
    } else if segment.contains(['{', '}', '*']) {
        Err("'{', '}' and '*' may only form whole segments")
    } else {
        Ok(Part::Literal(segment))
    }
}

fn parse_pattern(pattern: &str) -> Result<(Box<[Segment]>, Tail), &'static str> {
    if !pattern.starts_with('/') {
        return Err("must start with '/'");
    }
    if pattern.len() > 2048 {
        return Err("longer than 2048 bytes");
    }
    let parts: Vec<&str> = segments(pattern).collect();
    let mut out = Vec::with_capacity(parts.len());
    let mut tail = Tail::End;
    for (i, segment) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match part(segment)? {
            Part::Star if !last => return Err("'*' may only be the last segment"),
            Part::Star => tail = Tail::Star,
            Part::CatchAll if !last => {
                return Err("a catch-all {*name} may only be the last segment");
            }
            Part::CatchAll => tail = Tail::CatchAll,
            Part::Param => out.push(Segment::Param),
            Part::Literal(l) => out.push(Segment::Literal(l.into())),
        }
    }
    Ok((out.into(), tail))
}

impl Route {
    /// Whether `template` is this route's pattern by shape: the same
    /// literal segments, parameters where it has parameters (whatever they
    /// are named), the same tail and final `/`. Walks the template without
    /// building anything (it runs per request).
    fn has_shape(&self, template: &str) -> bool {
        if !template.starts_with('/')
            || template.len() > 2048
            || (template.len() > 1 && template.ends_with('/')) != self.slash
        {
            return false;
        }
        let mut parts = segments(template);
        for expected in self.segments.iter() {
            let matches = match (expected, parts.next().map(part)) {
                (Segment::Literal(l), Some(Ok(Part::Literal(p)))) => **l == *p,
                (Segment::Param, Some(Ok(Part::Param))) => true,
                _ => false,
            };
            if !matches {
                return false;
            }
        }
        let rest = parts.next().map(part);
        let tail = match rest {
            None => Tail::End,
            Some(Ok(Part::CatchAll)) => Tail::CatchAll,
            Some(Ok(Part::Star)) => Tail::Star,
            Some(_) => return false,
        };
        tail == self.tail && parts.next().is_none()
    }

    fn method_matches(&self, method: &Method) -> bool {
        match &self.method {
            None => true,
            Some(m) => m == method || (*m == Method::GET && *method == Method::HEAD),
        }
    }

    fn matches(&self, path: &str, n: usize) -> bool {
        let fixed = self.segments.len();
        let fits = match self.tail {
            Tail::End => n == fixed,
            Tail::Star => n >= fixed,
            Tail::CatchAll => n > fixed,
        };
        if !fits {
            return false;
        }
        self.segments
            .iter()
            .zip(segments(path))
            .all(|(seg, part)| match seg {
                Segment::Literal(lit) => **lit == *part,
                Segment::Param => true,
            })
    }

    fn rank(&self, i: usize) -> Rank {
        match self.segments.get(i) {
            Some(Segment::Literal(_)) => Rank::Literal,
            Some(Segment::Param) => Rank::Param,
            None if self.tail != Tail::End => Rank::Wildcard,
            None => Rank::End,
        }
    }

    /// Compares two routes that both match a path of `n` segments.
    fn compare(&self, other: &Self, n: usize) -> Ordering {
        for i in 0..=n {
            match self.rank(i).cmp(&other.rank(i)) {
                Ordering::Equal => {}
                unequal => return unequal,
            }
        }
        self.method.is_some().cmp(&other.method.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Class, DelayCost};

    fn model(names: &[&str]) -> CostModel {
        let mut b = CostModel::builder();
        for n in names {
            b = b.class(
                *n,
                Class::new(DelayCost::linear(1.0).unwrap(), 1.0).unwrap(),
            );
        }
        b.default_class(names[0]).build().unwrap()
    }

    fn check(routes: &RouteClassifier, m: &CostModel, method: Method, path: &str, want: &str) {
        let got = routes.classify_path(&method, path);
        assert_eq!(m.name(got), want, "{method} {path}");
    }

    #[test]
    fn precedence() {
        let m = model(&[
            "default", "any", "api", "v1", "param", "literal", "post", "exact",
        ]);
        let r = RouteClassifier::builder(&m)
            .route(None, "/*", "any")
            .route(None, "/api/*", "api")
            .route(None, "/api/v1/*", "v1")
            .route(None, "/api/v1/items/{id}", "param")
            .route(None, "/api/v1/items/new", "literal")
            .route(Some(Method::POST), "/api/v1/items/{id}", "post")
            .route(None, "/api/v1", "exact")
            .build()
            .unwrap();
        check(&r, &m, Method::GET, "/", "any");
        check(&r, &m, Method::GET, "/other", "any");
        check(&r, &m, Method::GET, "/api", "api");
        check(&r, &m, Method::GET, "/api/x", "api");
        check(&r, &m, Method::GET, "/api/v1", "exact");
        check(&r, &m, Method::GET, "/api/v1/", "exact");
        check(&r, &m, Method::GET, "/api/v1/items", "v1");
        check(&r, &m, Method::GET, "/api/v1/items/7", "param");
        check(&r, &m, Method::POST, "/api/v1/items/7", "post");
        check(&r, &m, Method::POST, "/api/v1/items/new", "literal");
        check(&r, &m, Method::GET, "/api/v1/items/7/parts", "v1");
        check(&r, &m, Method::GET, "/apix", "any");
    }

    #[test]
    fn no_match_is_default_and_methods_filter() {
        let m = model(&["default", "checkout"]);
        let r = RouteClassifier::builder(&m)
            .route(Some(Method::POST), "/checkout", "checkout")
            .build()
            .unwrap();
        check(&r, &m, Method::POST, "/checkout", "checkout");
        check(&r, &m, Method::GET, "/checkout", "default");
        check(&r, &m, Method::POST, "/checkout/x", "default");
        check(&r, &m, Method::POST, "/", "default");
    }

    #[test]
    fn get_routes_match_head() {
        let m = model(&["default", "page"]);
        let r = RouteClassifier::builder(&m)
            .route(Some(Method::GET), "/p/{id}", "page")
            .build()
            .unwrap();
        check(&r, &m, Method::HEAD, "/p/1", "page");
    }

    #[test]
    fn first_added_wins_a_tie() {
        let m = model(&["default", "a", "b"]);
        let r = RouteClassifier::builder(&m)
            .route(None, "/x/{a}", "a")
            .route(None, "/x/{b}", "b")
            .build()
            .unwrap();
        check(&r, &m, Method::GET, "/x/1", "a");
    }

    proptest::proptest! {
        /// Whatever the pattern and the path, building refuses or accepts
        /// without panicking, and a path that matches a pattern has at least
        /// as many segments as the pattern has fixed ones (more for a
        /// catch-all).
        #[test]
        fn patterns_and_paths_never_panic(
            pattern in "[/{}*ab]{0,12}",
            path in "[/ab*{}]{0,12}",
        ) {
            let m = model(&["default", "x"]);
            if let Ok(r) = RouteClassifier::builder(&m).route(None, &pattern, "x").build() {
                let got = r.classify_path(&Method::GET, &path);
                if got == m.id("x").unwrap() {
                    let (fixed, tail) = parse_pattern(&pattern).unwrap();
                    let n = segments(&path).count();
                    proptest::prop_assert!(n >= fixed.len());
                    if tail == Tail::CatchAll {
                        proptest::prop_assert!(n > fixed.len());
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// A template finds the route declared with it, whatever its
        /// parameters are named, and nothing else: a template with a
        /// segment more or less, or a literal where the route has a
        /// parameter, is another route.
        #[test]
        fn a_template_finds_exactly_the_route_of_its_shape(
            parts in proptest::collection::vec(0u8..4, 1..5),
            rename in 0u8..3,
        ) {
            let m = model(&["default", "x"]);
            let spell = |suffix: &str| -> String {
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| match p {
                        0 => "/a".to_owned(),
                        1 => "/b".to_owned(),
                        2 => format!("/{{id{i}{suffix}}}"),
                        _ if i + 1 == parts.len() => format!("/{{*rest{suffix}}}"),
                        _ => format!("/{{n{i}{suffix}}}"),
                    })
                    .collect()
            };
            let pattern = spell("");
            let r = RouteClassifier::builder(&m).route(None, &pattern, "x").build().unwrap();
            let x = m.id("x");
            let renamed = spell(&"z".repeat(usize::from(rename)));
            proptest::prop_assert_eq!(r.classify_template(&Method::GET, &renamed), x);
            proptest::prop_assert_eq!(r.declared(&renamed), vec![(None, x.unwrap())]);
            proptest::prop_assert_eq!(r.classify_template(&Method::GET, &format!("{renamed}/")), None);
            let longer = format!("{pattern}/more");
            if !pattern.contains('*') {
                proptest::prop_assert_eq!(r.classify_template(&Method::GET, &longer), None);
            }
            if let Some(i) = parts.iter().position(|p| *p == 2) {
                // The parameter as a literal: the same paths would match,
                // but it is not this route's template.
                let literal = pattern.replacen(&format!("{{id{i}}}"), "lit", 1);
                proptest::prop_assert_eq!(r.classify_template(&Method::GET, &literal), None);
            }
        }
    }

    #[test]
    fn a_route_for_the_method_wins_over_one_for_any_in_a_template() {
        let m = model(&["default", "any", "post"]);
        let r = RouteClassifier::builder(&m)
            .route(None, "/orders/{id}", "any")
            .route(Some(Method::POST), "/orders/{order}", "post")
            .build()
            .unwrap();
        let of = |method: Method| {
            r.classify_template(&method, "/orders/{x}")
                .map(|c| m.name(c).to_owned())
        };
        assert_eq!(of(Method::POST).as_deref(), Some("post"));
        assert_eq!(of(Method::GET).as_deref(), Some("any"));
        assert_eq!(r.classify_template(&Method::GET, "not a template"), None);
        let more = r.with_route(&m, "route", None, "/cart", "post").unwrap();
        assert_eq!(
            more.classify_path(&Method::GET, "/cart"),
            m.id("post").unwrap()
        );
        assert!(r.with_route(&m, "route", None, "/cart", "nope").is_err());
        assert_eq!(
            r.followed_by(&more).classify_path(&Method::GET, "/cart"),
            m.id("post").unwrap()
        );
        assert!(!r.is_empty());
    }

    #[test]
    fn axum_catch_alls_take_the_rest_of_the_path() {
        let m = model(&["default", "assets", "one", "css"]);
        let r = RouteClassifier::builder(&m)
            .route(Some(Method::GET), "/assets/{*path}", "assets")
            .route(None, "/files/{name}", "one")
            .route(None, "/assets/css/{*rest}", "css")
            .build()
            .unwrap();
        check(&r, &m, Method::GET, "/assets/logo.png", "assets");
        check(&r, &m, Method::GET, "/assets/js/app/main.js", "assets");
        // As axum: the catch-all needs a segment, the prefix alone is not it.
        check(&r, &m, Method::GET, "/assets", "default");
        check(&r, &m, Method::GET, "/assets/", "default");
        // The more specific catch-all wins below its prefix.
        check(&r, &m, Method::GET, "/assets/css/site.css", "css");
        // A plain parameter is still one segment.
        check(&r, &m, Method::GET, "/files/a", "one");
        check(&r, &m, Method::GET, "/files/a/b", "default");
    }

    #[test]
    fn invalid_patterns() {
        let m = model(&["default"]);
        for bad in [
            "nope", "/a/*/b", "/a{b}", "/{}", "/{a", "/a*", "/{*}", "/{*a}/b", "/{a*}", "/{**a}",
        ] {
            let e = RouteClassifier::builder(&m)
                .route(None, bad, "default")
                .build();
            assert!(matches!(e, Err(RouteError::InvalidPattern { .. })), "{bad}");
        }
    }

    #[test]
    fn rules_from_config() {
        let m = model(&["default", "checkout"]);
        let rules: Vec<RouteRule> =
            toml::from_str::<std::collections::BTreeMap<String, Vec<RouteRule>>>(
                "routes = [{ method = \"post\", path = \"/checkout\", class = \"checkout\" }]",
            )
            .unwrap()
            .remove("routes")
            .unwrap();
        let r = RouteClassifier::from_rules(&m, &rules).unwrap();
        check(&r, &m, Method::POST, "/checkout", "checkout");

        let bad_class = [RouteRule {
            method: None,
            path: "/x".into(),
            class: "nope".into(),
        }];
        let e = RouteClassifier::from_rules(&m, &bad_class)
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0].class") && e.contains("nope"), "{e}");

        let bad_method = [RouteRule {
            method: Some("GE T".into()),
            path: "/x".into(),
            class: "default".into(),
        }];
        let e = RouteClassifier::from_rules(&m, &bad_method)
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0].method"), "{e}");
    }
}
