//! The store's inventory as a gRPC service on tonic, behind gratify, and
//! the store's side of it: calls through gratify's balancer across the
//! service's replicas.
//!
//! The service (`shop.Inventory`: `Reserve`, and `Release` to give a
//! reservation back) is written by
//! hand on tonic's server and client building blocks, as `tonic-build`
//! would generate it, so that building the example needs no `protoc`.
//!
//! - [`serve`] runs one replica: tonic's server, with the peers' class and
//!   deadline accepted from callers holding the shared token
//!   ([`AcceptCallsLayer`]) and a [`Stack`] that classifies each call by its
//!   gRPC path (`/shop.Inventory/Reserve`) and limits it. A call the limit
//!   refuses is answered as gRPC says — `RESOURCE_EXHAUSTED` with
//!   `grpc-retry-pushback-ms` — never an HTTP 503 page.
//! - [`InventoryClient`] is the store's checkout calling it: a tonic client
//!   over [`CostBalance`] across one tonic `Channel` per replica, under
//!   [`PropagateLayer`], which sends the class and remaining deadline of
//!   the request being served with every call.
//!
//! ```
//! use gratify_examples::inventory::{self, InventoryClient, Replica, Stock};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), gratify::BoxError> {
//! let model = inventory::model();
//! let stock = Stock::with([("sku-1", 10)]);
//! let mut urls = Vec::new();
//! for name in ["a", "b", "c"] {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//!     urls.push(format!("http://{}", listener.local_addr()?));
//!     let replica = Replica::new(name, stock.clone());
//!     tokio::spawn(inventory::serve(listener, replica, &model, std::future::pending())?);
//! }
//! let client = InventoryClient::connect(&urls, &model)?;
//! let reply = client.reserve("sku-1", 2).await?;
//! assert!(reply.reserved);
//! assert_eq!((reply.left, stock.left("sku-1")), (8, 8));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use gratify::balance::{
    AcceptCallsLayer, BalanceConfig, CostBalance, DeadlineExceeded, PeerAddr, PropagateLayer, Trust,
};
use gratify::core::classify::RouteClassifier;
use gratify::{BoxError, CostModel, Stack};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::{Layer, Service, ServiceBuilder};

/// The reservation's path: gRPC's `/package.Service/Method`.
pub const RESERVE: &str = "/shop.Inventory/Reserve";

/// The release's path: what a reservation took, given back (a checkout
/// that did not place its order).
pub const RELEASE: &str = "/shop.Inventory/Release";

/// The shared secret the store's calls carry, so that the inventory trusts
/// the class and deadline they bring (a real deployment reads it from its
/// secrets). To trust a network instead, see [`serve_trusting`].
pub const PEER_TOKEN: &str = "the store's inventory calls, in the example";

/// The cost model of the inventory's calls: a reservation for a checkout is
/// worth keeping; the same call made to show "in stock" on a product page
/// (class `browse`) is not.
pub const MODEL: &str = r#"
default_class = "browse"
[classes.checkout]
delay_cost = { shape = "linear", per_second = 20.0, deadline = "500ms" }
refusal_cost = 10.0
[classes.browse]
delay_cost = { shape = "linear", per_second = 2.0, deadline = "1s" }
refusal_cost = 1.0
# Giving back what a checkout reserved and did not use: never shed by the
# cost or deadline rules, and ranked above every other call (so that a full
# queue makes room for it), or the stock stays taken.
[classes.release]
delay_cost = { shape = "linear", per_second = 50.0 }
refusal_cost = 20.0
"#;

/// [`MODEL`], parsed.
///
/// # Panics
///
/// Never: the model is a constant that the tests parse.
#[must_use]
pub fn model() -> CostModel {
    #[allow(clippy::expect_used)]
    CostModel::from_toml(MODEL).expect("the inventory's model parses")
}

/// A reservation: take `quantity` of `sku` from the stock.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveRequest {
    /// The item.
    #[prost(string, tag = "1")]
    pub sku: String,
    /// How many.
    #[prost(uint32, tag = "2")]
    pub quantity: u32,
}

/// Whether it was reserved, and by which replica.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReserveReply {
    /// Taken from the stock (false: not enough left; nothing taken).
    #[prost(bool, tag = "1")]
    pub reserved: bool,
    /// What is left of the item.
    #[prost(uint32, tag = "2")]
    pub left: u32,
    /// The replica that answered.
    #[prost(string, tag = "3")]
    pub replica: String,
}

/// The stock the replicas share (as replicas share a database).
#[derive(Clone, Debug, Default)]
pub struct Stock(Arc<Mutex<HashMap<String, u32>>>);

impl Stock {
    /// A stock of these items.
    pub fn with<'a>(items: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        Self(Arc::new(Mutex::new(
            items.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        )))
    }

    /// Takes `quantity` of `sku` if that many are left; returns whether it
    /// did and what is left.
    pub fn take(&self, sku: &str, quantity: u32) -> (bool, u32) {
        let mut stock = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(left) = stock.get_mut(sku) else {
            return (false, 0);
        };
        if *left >= quantity {
            *left -= quantity;
            (true, *left)
        } else {
            (false, *left)
        }
    }

    /// Gives back `quantity` of `sku`; returns what is left then.
    pub fn put(&self, sku: &str, quantity: u32) -> u32 {
        let mut stock = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let left = stock.entry(sku.to_owned()).or_insert(0);
        *left = left.saturating_add(quantity);
        *left
    }

    /// What is left of `sku`.
    pub fn left(&self, sku: &str) -> u32 {
        let stock = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stock.get(sku).copied().unwrap_or(0)
    }
}

/// Work a replica does before answering, for tests and the demo to hold a
/// call in flight: every call awaits it.
pub type Work = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One replica of the inventory: the gRPC service, before gratify.
#[derive(Clone)]
pub struct Replica {
    name: Arc<str>,
    stock: Stock,
    work: Option<Work>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// A replica called `name` serving `stock`.
    pub fn new(name: &str, stock: Stock) -> Self {
        Self {
            name: name.into(),
            stock,
            work: None,
        }
    }

    /// Awaits `work` in every call before answering it.
    #[must_use]
    pub fn work(mut self, work: Work) -> Self {
        self.work = Some(work);
        self
    }
}

impl NamedService for Replica {
    const NAME: &'static str = "shop.Inventory";
}

/// The `Reserve` method (or, `release`, the `Release` method), as tonic's
/// server runs a unary method.
struct ReserveMethod {
    replica: Replica,
    release: bool,
}

impl tonic::server::UnaryService<ReserveRequest> for ReserveMethod {
    type Response = ReserveReply;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ReserveReply>, Status>> + Send>>;

    fn call(&mut self, request: Request<ReserveRequest>) -> Self::Future {
        let (replica, release) = (self.replica.clone(), self.release);
        Box::pin(async move {
            if let Some(work) = &replica.work {
                work().await;
            }
            let r = request.into_inner();
            if r.quantity == 0 {
                return Err(Status::invalid_argument("quantity must be at least 1"));
            }
            let (reserved, left) = if release {
                (true, replica.stock.put(&r.sku, r.quantity))
            } else {
                replica.stock.take(&r.sku, r.quantity)
            };
            Ok(Response::new(ReserveReply {
                reserved,
                left,
                replica: replica.name.to_string(),
            }))
        })
    }
}

impl Service<http::Request<Body>> for Replica {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let release = match request.uri().path() {
            RESERVE => false,
            RELEASE => true,
            _ => {
                return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
            }
        };
        let method = ReserveMethod {
            replica: self.clone(),
            release,
        };
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ReserveReply, ReserveRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// gratify in front of a replica: calls' class and deadline accepted from
/// holders of [`PEER_TOKEN`], each call classified by its gRPC path (a
/// caller's class, when trusted, wins) and limited by `model`'s costs.
///
/// # Errors
///
/// A route the classifier rejects (none here).
pub fn stack(model: &CostModel) -> Result<Stack, BoxError> {
    // A release is never shed: a refused one would leave stock taken.
    let routes = RouteClassifier::builder(model)
        .route(None, RESERVE, "checkout")
        .route(None, RELEASE, "release")
        .build()?;
    let mut config = gratify::scaling::limit::LimiterConfig::default();
    if let Some(release) = model.id("release") {
        config.never_shed = vec![(release, 4096)];
    }
    let limiter = gratify::scaling::limit::Limiter::with_algorithm(
        model,
        gratify::scaling::limit::DelayCostLimit::new(model),
        config,
    );
    Ok(Stack::new(model).routes(routes).limit_with(limiter))
}

/// Serves `replica` on `listener` with tonic's server, behind
/// [`AcceptCallsLayer`] trusting holders of [`PEER_TOKEN`] and `stack`,
/// until `shutdown` completes.
///
/// # Errors
///
/// The peer token is rejected (never: it is a constant).
pub fn serve_with<F>(
    listener: tokio::net::TcpListener,
    replica: Replica,
    model: &CostModel,
    stack: Stack,
    shutdown: F,
) -> Result<impl Future<Output = Result<(), BoxError>> + Send + use<F>, BoxError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let trust = Trust::token(PEER_TOKEN)?;
    Ok(serve_trusting(
        listener, replica, model, stack, trust, shutdown,
    ))
}

/// [`serve_with`], trusting the callers `trust` names: a token, or
/// networks — tonic's server records the peer's address its own way, and
/// [`peer_addr_from_tonic`] puts it where [`Trust::networks`] reads it.
pub fn serve_trusting<F>(
    listener: tokio::net::TcpListener,
    replica: Replica,
    model: &CostModel,
    stack: Stack,
    trust: Trust,
    shutdown: F,
) -> impl Future<Output = Result<(), BoxError>> + Send + use<F>
where
    F: Future<Output = ()> + Send + 'static,
{
    let accept = AcceptCallsLayer::new(model, trust);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let layers = ServiceBuilder::new()
        .map_request(peer_addr_from_tonic)
        .layer(accept)
        .layer(stack)
        .into_inner();
    let server = tonic::transport::Server::builder()
        .layer(layers)
        .add_service(replica);
    async move {
        server
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(BoxError::from)
    }
}

/// [`serve_with`] the default [`stack`].
///
/// # Errors
///
/// As [`serve_with`].
pub fn serve<F>(
    listener: tokio::net::TcpListener,
    replica: Replica,
    model: &CostModel,
    shutdown: F,
) -> Result<impl Future<Output = Result<(), BoxError>> + Send + use<F>, BoxError>
where
    F: Future<Output = ()> + Send + 'static,
{
    serve_with(listener, replica, model, stack(model)?, shutdown)
}

/// Copies the peer's address from tonic's connection info into the
/// request's extensions as [`PeerAddr`], where [`Trust::networks`] reads
/// it (tonic's server records it as its own `TcpConnectInfo`).
pub fn peer_addr_from_tonic<B>(mut request: http::Request<B>) -> http::Request<B> {
    let addr = request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(tonic::transport::server::TcpConnectInfo::remote_addr);
    if let Some(addr) = addr {
        request.extensions_mut().insert(PeerAddr(addr));
    }
    request
}

/// The calls' service: propagation over a buffered balancer over one
/// channel per replica.
type Calls = gratify::balance::Propagate<
    Buffer<http::Request<Body>, <Balanced as Service<http::Request<Body>>>::Future>,
>;
type Balanced = CostBalance<
    ServiceList<Vec<gratify::balance::Propagate<tonic::transport::Channel>>>,
    http::Request<Body>,
>;

/// The store's client of the inventory: one tonic `Channel` per replica,
/// chosen per call by [`CostBalance`], with the class and remaining
/// deadline of the request being served carried by [`PropagateLayer`].
/// Clones share the balancer.
///
/// The layers, outermost first: `PropagateLayer` (reads the task's
/// context, which the buffer's worker cannot see, and leaves it on the
/// request), a `Buffer` (so that clones share one balancer),
/// [`CostBalance`], and under it a `PropagateLayer` on each replica's
/// channel, which writes the headers again as the call leaves, so that the
/// time spent in the buffer and waiting for a ready replica is taken off
/// the deadline the replica is sent.
#[derive(Clone)]
pub struct InventoryClient {
    grpc: tonic::client::Grpc<Calls>,
}

impl std::fmt::Debug for InventoryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventoryClient").finish_non_exhaustive()
    }
}

impl InventoryClient {
    /// A client of the replicas at `urls` (`http://host:port`), connecting
    /// lazily. Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// A URL that does not parse.
    pub fn connect(urls: &[String], model: &CostModel) -> Result<Self, BoxError> {
        let propagate = PropagateLayer::new().token(PEER_TOKEN)?;
        let channels = urls
            .iter()
            .map(|u| {
                let channel = tonic::transport::Endpoint::from_shared(u.clone())?.connect_lazy();
                Ok(propagate.layer(channel))
            })
            .collect::<Result<Vec<_>, BoxError>>()?;
        let balanced: Balanced =
            CostBalance::new(ServiceList::new(channels), model, BalanceConfig::default());
        let calls = propagate.layer(Buffer::new(balanced, 1024));
        Ok(Self {
            grpc: tonic::client::Grpc::new(calls),
        })
    }

    /// Reserves `quantity` of `sku` on whichever replica is expected to
    /// answer sooner.
    ///
    /// # Errors
    ///
    /// The call's gRPC status: `RESOURCE_EXHAUSTED` when the replica's
    /// limit refused it (with `grpc-retry-pushback-ms` in its metadata),
    /// `DEADLINE_EXCEEDED` when the request being served has no time left,
    /// `UNAVAILABLE` when no replica could be reached.
    pub async fn reserve(&self, sku: &str, quantity: u32) -> Result<ReserveReply, Status> {
        self.reserve_request(Request::new(ReserveRequest {
            sku: sku.to_owned(),
            quantity,
        }))
        .await
    }

    /// [`reserve`](Self::reserve) with a request of the caller's making
    /// (metadata, a timeout).
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub async fn reserve_request(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<ReserveReply, Status> {
        self.unary(RESERVE, request).await
    }

    /// Gives back `quantity` of `sku` that a reservation took.
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub async fn release(&self, sku: &str, quantity: u32) -> Result<ReserveReply, Status> {
        let request = Request::new(ReserveRequest {
            sku: sku.to_owned(),
            quantity,
        });
        self.unary(RELEASE, request).await
    }

    async fn unary(
        &self,
        path: &'static str,
        request: Request<ReserveRequest>,
    ) -> Result<ReserveReply, Status> {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("no inventory replica: {e}")))?;
        let codec = tonic_prost::ProstCodec::<ReserveRequest, ReserveReply>::default();
        let path = http::uri::PathAndQuery::from_static(path);
        grpc.unary(request, path, codec)
            .await
            .map(Response::into_inner)
            .map_err(deadline_status)
    }
}

/// tonic reports an error of the client's own layers as `UNKNOWN`; the
/// propagation layer's "no time left" is gRPC's `DEADLINE_EXCEEDED`.
fn deadline_status(status: Status) -> Status {
    let passed = std::error::Error::source(&status)
        .is_some_and(|e| e.downcast_ref::<DeadlineExceeded>().is_some());
    if passed {
        Status::deadline_exceeded(status.message())
    } else {
        status
    }
}
