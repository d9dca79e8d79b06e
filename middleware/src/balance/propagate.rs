//! A request's class and deadline, carried on the calls made while serving
//! it, and read back — from trusted peers only — by the service called.
//!
//! Two layers and a context:
//! - [`PropagateLayer`] on a **client** (hyper-util's, a tonic channel, any
//!   tower service of `http::Request`s) writes the current [`CallContext`]
//!   onto each outgoing call: `gratify-class` (the class's name),
//!   `gratify-deadline` (milliseconds left) and, for gRPC, `grpc-timeout`.
//!   A call whose deadline has passed fails at once with
//!   [`DeadlineExceeded`], without reaching the network, and a call still
//!   running at its deadline is dropped (the callee sees the caller leave).
//! - [`AcceptCallsLayer`] on a **server**, outside its
//!   [`Stack`](crate::Stack), reads them back **only from peers it trusts**
//!   ([`Trust`]: a shared token, an address range, or any rule of yours,
//!   such as an mTLS identity): the request is then classified as the
//!   caller's class, its wait is bounded by the caller's deadline, work
//!   that cannot finish in time is refused at once, and it queues ahead of
//!   first-hand requests of its class. From anyone else the headers are
//!   removed and ignored: a client cannot raise its own class.
//! - [`CallContext`]: the class and deadline of the request being served.
//!   The `Stack` sets it for its service's future (a task-local), so calls
//!   made from a handler carry it without any code. Work spawned onto other
//!   tasks does not inherit a task-local: take [`CallContext::current`] and
//!   run the task in [`CallContext::scope`], or put the context on the
//!   outgoing request's extensions.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify::balance::{AcceptCallsLayer, CallContext, PropagateLayer, Trust};
//! use gratify::core::classify::propagated_of;
//! use gratify::{Class, CostModel, DelayCost};
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), gratify::BoxError> {
//! let model = CostModel::builder()
//!     .class("checkout", Class::new(DelayCost::linear(20.0)?, 10.0)?)
//!     .class("browse", Class::new(DelayCost::linear(1.0)?, 1.0)?)
//!     .default_class("browse")
//!     .build()?;
//! let secret = "a secret shared by the fleet's services";
//!
//! // The callee (in a real fleet, another process): trusts the token.
//! let callee = ServiceBuilder::new()
//!     .layer(AcceptCallsLayer::new(&model, Trust::token(secret)?))
//!     .service(service_fn(|req: Request<()>| async move {
//!         let propagated = propagated_of(&req).expect("a trusted call");
//!         Ok::<_, gratify::BoxError>(Response::new(propagated.class))
//!     }));
//! // The caller's client.
//! let client = ServiceBuilder::new()
//!     .layer(PropagateLayer::new().token(secret)?)
//!     .service(callee);
//!
//! // Serving a checkout with 120 ms left (inside a `Stack`, its service
//! // runs in such a scope already): the call carries both.
//! let context = CallContext::new()
//!     .with_class("checkout")
//!     .with_deadline(tokio::time::Instant::now().into_std() + Duration::from_millis(120));
//! let answer = context.scope(client.oneshot(Request::new(()))).await?;
//! assert_eq!(*answer.body(), model.id("checkout"));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use gratify_core::classify::Propagated;
use gratify_core::{BoxError, ClassId, CostModel, SharedModel};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Request};
use tower_layer::Layer;
use tower_service::Service;

/// The header naming the caller's class (its name in the caller's model).
pub const CLASS_HEADER: HeaderName = HeaderName::from_static("gratify-class");
/// The header carrying the milliseconds left before the caller gives up.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("gratify-deadline");
/// The header carrying the shared token of [`Trust::token`].
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("gratify-peer-token");
/// gRPC's own deadline header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The longest deadline read from a call: a longer one is read as this (a
/// day; no caller waits longer, and every instant computed from it stays
/// representable).
pub const MAX_PROPAGATED_DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);

/// Now, on tokio's clock where there is one (so that a paused test clock
/// moves deadlines too), as a std instant.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

// ---------------------------------------------------------------------------
// The context of the request being served.

tokio::task_local! {
    static CURRENT: CallContext;
}

/// The class and deadline of the request being served, which calls made
/// while serving it carry to the services they call. See the
/// [module docs](self).
#[derive(Clone)]
pub struct CallContext {
    inner: ContextInner,
}

#[derive(Clone)]
enum ContextInner {
    Given {
        class: Option<Arc<str>>,
        deadline: Option<Instant>,
    },
    /// Set by the `Stack` for each request: the class's name and deadline
    /// are looked up only when a call asks (most requests make none).
    Served {
        model: Arc<SharedModel>,
        class: ClassId,
        arrived: Instant,
        propagated: Option<Instant>,
    },
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("class", &self.class())
            .field("deadline", &self.deadline())
            .finish()
    }
}

impl Default for CallContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CallContext {
    /// A context with no class and no deadline.
    pub fn new() -> Self {
        Self {
            inner: ContextInner::Given {
                class: None,
                deadline: None,
            },
        }
    }

    /// The same context with the class named `class` (a name in the
    /// caller's model; a callee without that class classifies the call
    /// itself).
    #[must_use]
    pub fn with_class(self, class: impl Into<Arc<str>>) -> Self {
        let deadline = self.deadline();
        Self {
            inner: ContextInner::Given {
                class: Some(class.into()),
                deadline,
            },
        }
    }

    /// The same context, due by `deadline` (or by its own deadline, if that
    /// is sooner).
    #[must_use]
    pub fn with_deadline(self, deadline: Instant) -> Self {
        let class = self.class();
        let deadline = Some(self.deadline().map_or(deadline, |d| d.min(deadline)));
        Self {
            inner: ContextInner::Given { class, deadline },
        }
    }

    /// The context of a request the `Stack` serves: class `class` of
    /// `model`, arrived at `arrived`, due by its class's deadline from then
    /// or by `propagated`, whichever is sooner.
    pub(crate) fn served(
        model: Arc<SharedModel>,
        class: ClassId,
        arrived: Instant,
        propagated: Option<Instant>,
    ) -> Self {
        Self {
            inner: ContextInner::Served {
                model,
                class,
                arrived,
                propagated,
            },
        }
    }

    /// The class's name, if the context has one.
    pub fn class(&self) -> Option<Arc<str>> {
        match &self.inner {
            ContextInner::Given { class, .. } => class.clone(),
            ContextInner::Served { model, class, .. } => {
                model.read(|m| m.get(*class).map(|_| Arc::from(m.name(*class))))
            }
        }
    }

    /// When the caller gives up, if it ever does.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.inner {
            ContextInner::Given { deadline, .. } => *deadline,
            ContextInner::Served {
                model,
                class,
                arrived,
                propagated,
            } => {
                let own = model
                    .read(|m| m.get(*class).and_then(gratify_core::Class::deadline))
                    .and_then(|d| arrived.checked_add(d));
                match (own, *propagated) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// The time left before the deadline (zero once it has passed), if
    /// there is a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline().map(|d| d.saturating_duration_since(now()))
    }

    /// The context of an outgoing call: the one on the request (it wins),
    /// else the task's.
    pub(crate) fn of(extensions: &http::Extensions) -> Option<Self> {
        extensions.get::<Self>().cloned().or_else(Self::current)
    }

    /// Puts the task's context on `request` unless it has one: for layers
    /// that send it (again) from inside a future, or on another task.
    pub(crate) fn attach<B>(request: &mut Request<B>) {
        if request.extensions().get::<Self>().is_none()
            && let Some(context) = Self::current()
        {
            request.extensions_mut().insert(context);
        }
    }

    /// Runs `f` with the class's name, if the context has one — without
    /// copying it (a lookup per call on a balancer's hot path).
    pub(crate) fn with_class_name<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> R {
        match &self.inner {
            ContextInner::Given { class, .. } => f(class.as_deref()),
            ContextInner::Served { model, class, .. } => {
                model.read(|m| f(m.get(*class).map(|_| m.name(*class))))
            }
        }
    }

    /// The context of the request this task is serving, if a `Stack` (or a
    /// [`scope`](Self::scope)) set one.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this context as the [current](Self::current) one:
    /// for work spawned onto another task on a request's behalf.
    pub fn scope<F: Future>(self, future: F) -> tokio::task::futures::TaskLocalFuture<Self, F> {
        CURRENT.scope(self, future)
    }

    /// Runs `f` with this context as the current one (for a synchronous
    /// `call` that builds its future).
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }
}

// ---------------------------------------------------------------------------
// Trust.

/// Which callers a service believes about class and deadline. Nobody, by
/// default; each rule added is enough on its own.
///
/// ```
/// use gratify::balance::Trust;
///
/// # fn main() -> Result<(), gratify::balance::TrustError> {
/// let trust = Trust::nobody()
///     .or(Trust::networks(["10.0.0.0/8", "fd00::/8"])?)
///     .or(Trust::token("rotate me: at least sixteen bytes")?);
/// assert!(!trust.is_nobody());
/// assert!(Trust::token("short").is_err());
/// assert!(Trust::networks(["10.0.0.0/33"]).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Trust {
    rules: Vec<Rule>,
}

#[derive(Clone)]
enum Rule {
    Token(Arc<[u8]>),
    Networks(Arc<[Network]>),
    When(Arc<dyn Fn(&http::request::Parts) -> bool + Send + Sync>),
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|r| match r {
                // Never the token itself.
                Rule::Token(_) => "token".to_owned(),
                Rule::Networks(n) => format!("networks {n:?}"),
                Rule::When(_) => "rule".to_owned(),
            })
            .collect();
        f.debug_struct("Trust").field("rules", &rules).finish()
    }
}

/// A [`Trust`] rule that could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustError {
    /// A token shorter than 16 bytes is guessable.
    #[error("a peer token needs at least 16 bytes, got {0}")]
    ShortToken(usize),
    /// A token that is not a valid header value (control characters).
    #[error("a peer token must be visible ASCII (a header value)")]
    TokenNotHeaderValue,
    /// A network that is not `address/prefix` (or a bare address).
    #[error("{0:?} is not a network (expected e.g. 10.0.0.0/8, ::1/128 or 192.168.1.7)")]
    Network(String),
}

const MIN_TOKEN: usize = 16;

impl Trust {
    /// Trusts no caller: class and deadline headers are removed and ignored.
    pub fn nobody() -> Self {
        Self::default()
    }

    /// Trusts a caller that sends `secret` in the `gratify-peer-token`
    /// header (as [`PropagateLayer::token`] does), compared in constant
    /// time. The token travels in clear: use it over TLS or inside a
    /// network that only the fleet reaches.
    ///
    /// # Errors
    ///
    /// A secret shorter than 16 bytes, or one that is not a header value.
    pub fn token(secret: impl AsRef<[u8]>) -> Result<Self, TrustError> {
        let secret = secret.as_ref();
        if secret.len() < MIN_TOKEN {
            return Err(TrustError::ShortToken(secret.len()));
        }
        HeaderValue::from_bytes(secret).map_err(|_| TrustError::TokenNotHeaderValue)?;
        Ok(Self {
            rules: vec![Rule::Token(secret.into())],
        })
    }

    /// Trusts callers whose address is in one of `networks`
    /// (`"10.0.0.0/8"`, `"fd00::/8"`, `"127.0.0.1"`). The address is read
    /// from the request's [`PeerAddr`] extension, or from axum's
    /// `ConnectInfo<SocketAddr>` (with the `axum` feature, when the app is
    /// served with `into_make_service_with_connect_info`); a request with
    /// neither is not trusted by this rule.
    ///
    /// The address is the last hop's. A proxy, ingress or sidecar in the
    /// range (an Envoy sidecar connects from 127.0.0.1, an ingress from the
    /// cluster's network) passes its clients' headers on as its own: trust
    /// a range only when everything in it removes `gratify-class` and
    /// `gratify-deadline` from outside traffic, and prefer a token or an
    /// mTLS identity ([`when`](Self::when)) otherwise.
    ///
    /// # Errors
    ///
    /// A network that does not parse.
    pub fn networks<I>(networks: I) -> Result<Self, TrustError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let parsed = networks
            .into_iter()
            .map(|n| n.as_ref().parse::<Network>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules: vec![Rule::Networks(parsed.into())],
        })
    }

    /// Trusts callers for which `rule` says so, given the request's head —
    /// for example an mTLS identity that the TLS acceptor put in the
    /// request's extensions.
    pub fn when(rule: impl Fn(&http::request::Parts) -> bool + Send + Sync + 'static) -> Self {
        Self {
            rules: vec![Rule::When(Arc::new(rule))],
        }
    }

    /// Trusts callers that either trusts.
    #[must_use]
    pub fn or(mut self, other: Self) -> Self {
        self.rules.extend(other.rules);
        self
    }

    /// Whether no caller is trusted.
    pub fn is_nobody(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the caller of the request with head `parts` is trusted.
    pub fn trusts(&self, parts: &http::request::Parts) -> bool {
        self.rules.iter().any(|rule| match rule {
            Rule::Token(secret) => {
                let mut values = parts.headers.get_all(&TOKEN_HEADER).iter();
                match (values.next(), values.next()) {
                    (Some(value), None) => {
                        subtle::ConstantTimeEq::ct_eq(value.as_bytes(), secret).into()
                    }
                    _ => false,
                }
            }
            Rule::Networks(networks) => peer_addr(&parts.extensions)
                .is_some_and(|ip| networks.iter().any(|n| n.contains(ip))),
            Rule::When(f) => f(parts),
        })
    }
}

/// The address of the peer that sent a request, for [`Trust::networks`]:
/// put it in the request's extensions where the connection is accepted
/// (axum's `ConnectInfo` is read too, with the `axum` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

fn peer_addr(extensions: &http::Extensions) -> Option<IpAddr> {
    if let Some(PeerAddr(addr)) = extensions.get::<PeerAddr>() {
        return Some(addr.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip());
    }
    None
}

/// An address range: an address and the length of its prefix.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Network {
    type Err = TrustError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TrustError::Network(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let mut addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let mut max = if addr.is_ipv4() { 32 } else { 128 };
        let mut mapped = false;
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            // `::ffff:10.0.0.0/104` is `10.0.0.0/8`: peers are matched as
            // IPv4 (see `contains`).
            addr = IpAddr::V4(v4);
            mapped = true;
        }
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would take a leading `+`.
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        if prefix > max {
            return Err(bad());
        }
        let prefix = if mapped {
            // The mapped form's first 96 bits are the mapping itself.
            if prefix < 96 {
                return Err(bad());
            }
            max = 32;
            prefix - 96
        } else {
            prefix
        };
        debug_assert!(prefix <= max);
        Ok(Self { addr, prefix })
    }
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer reaching an IPv6 socket arrives mapped (::ffff:a.b.c.d).
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        let masked = |bits: u128, width: u32| -> u128 {
            let prefix = u32::from(self.prefix);
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), 32) == masked(u128::from(u32::from(ip)), 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128) == masked(u128::from(ip), 128)
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------
// Reading and writing deadlines.

/// Parses a `gratify-deadline` value: whole milliseconds left, digits only.
/// `None` for anything else; at most [`MAX_PROPAGATED_DEADLINE`].
pub fn parse_deadline_ms(value: &[u8]) -> Option<Duration> {
    if value.is_empty() || value.len() > 12 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms = std::str::from_utf8(value).ok()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ms).min(MAX_PROPAGATED_DEADLINE))
}

/// Parses a `grpc-timeout` value (up to eight digits and a unit: `H`, `M`,
/// `S`, `m`, `u`, `n`). `None` for anything else; at most
/// [`MAX_PROPAGATED_DEADLINE`].
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?;
    let d = match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d.min(MAX_PROPAGATED_DEADLINE))
}

/// Writes `d` as a `grpc-timeout` value in the finest unit that holds it
/// in eight digits, rounded down (a callee never gets longer than the
/// caller has).
pub fn format_grpc_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    for (unit, per) in [
        ('n', 1u128),
        ('u', 1_000),
        ('m', 1_000_000),
        ('S', 1_000_000_000),
        ('M', 60_000_000_000),
        ('H', 3_600_000_000_000),
    ] {
        if nanos / per <= MAX {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{MAX}H")
}

fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => Some(v),
        _ => None,
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

// ---------------------------------------------------------------------------
// The callee's side.

/// Reads class and deadline from trusted callers; removes the headers from
/// everyone. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct AcceptCallsLayer {
    shared: Arc<AcceptShared>,
}

#[derive(Debug)]
struct AcceptShared {
    trust: Trust,
    classes: HashMap<Box<[u8]>, ClassId>,
}

impl AcceptCallsLayer {
    /// Accepts propagated class names of `model` from callers `trust`
    /// trusts.
    pub fn new(model: &CostModel, trust: Trust) -> Self {
        let classes = model
            .iter()
            .map(|(id, name, _)| (name.as_bytes().into(), id))
            .collect();
        Self {
            shared: Arc::new(AcceptShared { trust, classes }),
        }
    }
}

impl<S> Layer<S> for AcceptCallsLayer {
    type Service = AcceptCalls<S>;

    fn layer(&self, inner: S) -> AcceptCalls<S> {
        AcceptCalls {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service of [`AcceptCallsLayer`].
#[derive(Clone, Debug)]
pub struct AcceptCalls<S> {
    inner: S,
    shared: Arc<AcceptShared>,
}

impl<S> AcceptCalls<S> {
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

impl AcceptShared {
    /// What a trusted caller propagated, if it propagated anything.
    fn read(&self, headers: &HeaderMap) -> Option<Propagated> {
        let class =
            single(headers, &CLASS_HEADER).and_then(|v| self.classes.get(v.as_bytes()).copied());
        let ms = single(headers, &DEADLINE_HEADER).and_then(|v| parse_deadline_ms(v.as_bytes()));
        let grpc = single(headers, &GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let left = match (ms, grpc) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let named = headers.contains_key(&CLASS_HEADER);
        if !named && ms.is_none() {
            // A plain call (or gRPC's own timeout alone): nothing says it was
            // admitted upstream.
            return None;
        }
        let now = now();
        Some(Propagated::new(
            class,
            left.map(|left| now.checked_add(left).unwrap_or(now)),
        ))
    }
}

impl<S, B> Service<Request<B>> for AcceptCalls<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let trusted = self.shared.trust.trusts(&parts);
        let propagated = if trusted {
            self.shared.read(&parts.headers)
        } else {
            None
        };
        // Never seen by the service: not the token, and not what an
        // untrusted client claimed.
        let forged = !trusted
            && (parts.headers.contains_key(&CLASS_HEADER)
                || parts.headers.contains_key(&DEADLINE_HEADER));
        parts.headers.remove(&CLASS_HEADER);
        parts.headers.remove(&DEADLINE_HEADER);
        parts.headers.remove(&TOKEN_HEADER);
        if forged {
            tracing::debug!("ignored class or deadline headers from an untrusted caller");
        }
        // Whatever a layer in front may have put there is replaced: only
        // this layer's reading of a trusted caller stands.
        parts.extensions.remove::<Propagated>();
        if let Some(propagated) = propagated {
            parts.extensions.insert(propagated);
        }
        self.inner.call(Request::from_parts(parts, body))
    }
}

// ---------------------------------------------------------------------------
// The caller's side.

/// The call's deadline passed before it could be made, or while it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the deadline of the request being served passed before the call could finish")]
pub struct DeadlineExceeded(());

/// Writes the current [`CallContext`] onto outgoing calls. See the
/// [module docs](self).
///
/// The context is read when the call is made (`Service::call`): a
/// `CallContext` in the request's extensions, else the task's current one.
/// Make the call from inside the scope — in a handler under a `Stack`, or
/// in [`CallContext::scope`] — not before entering it.
///
/// Put it outermost on the client, above any `Buffer` (a tonic `Channel`
/// is one): a buffer's worker calls the layers below it on its own task,
/// where no task context is set. It leaves the context it read in the
/// request's extensions, for the layers below. The headers say the time
/// left when the call passes this layer: time it then waits in a buffer,
/// for a ready replica or for a connection is not taken off. To take it
/// off, add a second `PropagateLayer` under the buffer, on each replica's
/// client: it reads the context from the extensions and writes the
/// headers again as the call leaves. The deadline covers the response's
/// head; a body still streaming after it is not cut.
#[derive(Clone, Debug, Default)]
pub struct PropagateLayer {
    token: Option<HeaderValue>,
}

impl PropagateLayer {
    /// Propagates class and deadline, without a token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `secret` in the `gratify-peer-token` header, for callees that
    /// trust it ([`Trust::token`]).
    ///
    /// It goes on **every** call this client makes: give it only to a
    /// client that calls your own services, never to one that also calls
    /// third parties.
    ///
    /// # Errors
    ///
    /// As [`Trust::token`]: a secret shorter than 16 bytes, or one that is
    /// not a header value.
    pub fn token(mut self, secret: impl AsRef<[u8]>) -> Result<Self, TrustError> {
        let secret = secret.as_ref();
        if secret.len() < MIN_TOKEN {
            return Err(TrustError::ShortToken(secret.len()));
        }
        let mut value =
            HeaderValue::from_bytes(secret).map_err(|_| TrustError::TokenNotHeaderValue)?;
        value.set_sensitive(true);
        self.token = Some(value);
        Ok(self)
    }
}

impl<S> Layer<S> for PropagateLayer {
    type Service = Propagate<S>;

    fn layer(&self, inner: S) -> Propagate<S> {
        Propagate {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service of [`PropagateLayer`]. Its error is a [`BoxError`]: the
/// inner service's, or [`DeadlineExceeded`].
#[derive(Clone, Debug)]
pub struct Propagate<S> {
    inner: S,
    token: Option<HeaderValue>,
}

impl<S> Propagate<S> {
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

impl<S, B> Service<Request<B>> for Propagate<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let context = CallContext::of(request.extensions());
        if let Some(context) = &context {
            // For the layers below, which may run on another task (a
            // buffer's worker, where the task's context is not set): the
            // balancer reads the class from it.
            request.extensions_mut().insert(context.clone());
        }
        let headers = request.headers_mut();
        // The caller's own headers never pass as propagated ones.
        headers.remove(&CLASS_HEADER);
        headers.remove(&DEADLINE_HEADER);
        headers.remove(&TOKEN_HEADER);
        if let Some(token) = &self.token {
            headers.insert(TOKEN_HEADER, token.clone());
        }
        let mut deadline = None;
        if let Some(context) = &context {
            if let Some(class) = context.class()
                && let Ok(value) = HeaderValue::from_str(&class)
            {
                headers.insert(CLASS_HEADER, value);
            }
            if let Some(due) = context.deadline() {
                let left = due.saturating_duration_since(now());
                if left.is_zero() {
                    return PropagateFuture::expired();
                }
                headers.insert(
                    DEADLINE_HEADER,
                    HeaderValue::from(left.as_millis().min(u128::from(u64::MAX)) as u64),
                );
                if is_grpc(headers) {
                    // gRPC's own header too: the smaller of the caller's and
                    // what the application set.
                    let set = single(headers, &GRPC_TIMEOUT)
                        .and_then(|v| parse_grpc_timeout(v.as_bytes()));
                    let left = set.map_or(left, |s| s.min(left));
                    if let Ok(value) = HeaderValue::from_str(&format_grpc_timeout(left)) {
                        headers.insert(GRPC_TIMEOUT, value);
                    }
                }
                deadline = Some(due);
            }
        }
        PropagateFuture::call(self.inner.call(request), deadline)
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Propagate`].
    pub struct PropagateFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F> fmt::Debug for PropagateFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateFuture").finish_non_exhaustive()
    }
}

impl<F> PropagateFuture<F> {
    fn expired() -> Self {
        Self {
            inner: None,
            sleep: None,
        }
    }

    fn call(inner: F, deadline: Option<Instant>) -> Self {
        Self {
            inner: Some(inner),
            sleep: deadline.map(|d| tokio::time::sleep_until(d.into())),
        }
    }
}

impl<F, T, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(DeadlineExceeded(()).into()));
        };
        if let Poll::Ready(out) = inner.poll(cx) {
            return Poll::Ready(out.map_err(Into::into));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            // Dropping the call cancels it: the callee sees the caller go.
            this.inner.set(None);
            return Poll::Ready(Err(DeadlineExceeded(()).into()));
        }
        Poll::Pending
    }
}
