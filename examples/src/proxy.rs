//! The caching reverse proxy behind the `caching-proxy` command: a hyper
//! server, `HttpCacheLayer`, and a hyper client to the origin, so the cache
//! can sit in front of any HTTP/1.1 service.
//!
//! Hop-by-hop headers are dropped in both directions; the origin sees its
//! own authority in `Host`; an unreachable origin is a 502. The cache keys on
//! the `Host` the client sent to the proxy.
//!
//! Idle upstream connections are closed before the origin would close them
//! ([`ProxyOptions::upstream_idle`], 4 s: Node's default keep-alive is 5 s),
//! and an idempotent request whose connection fails before any byte of the
//! response — the race a reused connection loses when the origin closes it
//! just as the request goes out — is sent once more on a new connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use gratify::cache::policy::strip_hop_by_hop;
use gratify::cache::{HttpCacheConfig, HttpCacheLayer};
use gratify::core::BoxError;
use gratify::core::body::{BoxBody, boxed, full};
use http::header::HOST;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Layer, ServiceBuilder};

/// A proxy error: the upstream address is not an absolute `http://` URI.
#[derive(Debug, thiserror::Error)]
#[error("upstream must be an absolute http:// URI with a host, got {0:?}")]
pub struct UpstreamError(String);

/// Checks an upstream URI.
///
/// # Errors
///
/// [`UpstreamError`] if it is not `http://host[:port]`.
pub fn parse_upstream(text: &str) -> Result<Uri, UpstreamError> {
    let uri: Uri = text.parse().map_err(|_| UpstreamError(text.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(UpstreamError(text.to_owned()));
    }
    Ok(uri)
}

/// Serves the caching proxy on `listener` until the process ends, forwarding
/// misses to `upstream`.
///
/// # Errors
///
/// When accepting a connection fails.
pub async fn serve(
    listener: TcpListener,
    upstream: Uri,
    config: HttpCacheConfig,
) -> Result<(), BoxError> {
    serve_with(listener, upstream, config, ProxyOptions::default()).await
}

/// How the proxy treats its upstream connections.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyOptions {
    /// Close an idle upstream connection after this long: keep it below the
    /// origin's own keep-alive timeout, or the proxy will reuse connections
    /// the origin is closing.
    pub upstream_idle: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            upstream_idle: Duration::from_secs(4),
        }
    }
}

/// [`serve`] with `options`.
///
/// # Errors
///
/// When accepting a connection fails.
pub async fn serve_with(
    listener: TcpListener,
    upstream: Uri,
    config: HttpCacheConfig,
    options: ProxyOptions,
) -> Result<(), BoxError> {
    serve_until(listener, upstream, config, options, std::future::pending())
        .await
        .map(|_| ())
}

/// What a graceful stop of [`serve_until`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections open when the stop began.
    pub open: usize,
    /// Of those, the ones still open at the deadline, closed then.
    pub cut: usize,
}

/// As [`serve_with`], until `stop` completes: then no new connection is
/// accepted, every open one finishes the request it is serving and closes
/// (keep-alive ends), and those still open after 10 s are closed.
///
/// # Errors
///
/// The listener fails.
pub async fn serve_until(
    listener: TcpListener,
    upstream: Uri,
    config: HttpCacheConfig,
    options: ProxyOptions,
    stop: impl Future<Output = ()>,
) -> Result<Stopped, BoxError> {
    let client: Client<HttpConnector, ReqBody> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(options.upstream_idle)
        .build_http();
    let origin = Upstream {
        client,
        upstream: Arc::new(upstream),
    };
    let cache = HttpCacheLayer::new(config).layer(origin);
    let service = ServiceBuilder::new()
        .map_request(box_request as fn(Request<Incoming>) -> Request<ReqBody>)
        .service(cache);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        // The stop first: once asked to stop, nothing more is accepted.
        let stream = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted?.0,
        };
        // Forget the connections that have ended.
        while connections.try_join_next().is_some() {}
        let service = TowerToHyperService::new(service.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    while connections.try_join_next().is_some() {}
    let open = connections.len();
    let finished = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    while connections.try_join_next().is_some() {}
    let cut = if finished.is_ok() {
        0
    } else {
        connections.len()
    };
    // Those still open at the deadline are closed now, not when the
    // runtime ends.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(Stopped { open, cut })
}

/// A request body as the proxy holds it: a newtype over the boxed body, so
/// that futures over it stay `Send` without higher-ranked lifetime trouble.
#[derive(Default)]
pub struct ReqBody(BoxBody);

impl std::fmt::Debug for ReqBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReqBody")
    }
}

impl hyper::body::Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

/// Forwards requests to the origin.
#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, ReqBody>,
    upstream: Arc<Uri>,
}

impl tower::Service<Request<ReqBody>> for Upstream {
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = gratify::BoxFuture<Result<Response<BoxBody>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        Box::pin(forward(
            self.client.clone(),
            Arc::clone(&self.upstream),
            request,
        ))
    }
}

async fn forward(
    client: Client<HttpConnector, ReqBody>,
    upstream: Arc<Uri>,
    mut req: Request<ReqBody>,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let target = format!(
        "http://{}{}",
        upstream.authority().map_or("", |a| a.as_str()),
        path
    );
    let Ok(uri) = target.parse::<Uri>() else {
        return Ok(error(StatusCode::BAD_REQUEST, "bad request target"));
    };
    *req.uri_mut() = uri;
    strip_hop_by_hop(req.headers_mut());
    if let Some(a) = upstream.authority()
        && let Ok(v) = a.as_str().parse()
    {
        req.headers_mut().insert(HOST, v);
    }
    Ok(match send(&client, req).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, boxed(body))
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream failed");
            error(StatusCode::BAD_GATEWAY, "upstream unreachable")
        }
    })
}

/// Request bodies up to this size are kept to send an idempotent request a
/// second time.
const REPLAYABLE: u64 = 64 * 1024;

/// Sends `req`; an idempotent request with a small body that fails before
/// any byte of the response (the connection closed under it) is sent once
/// more.
async fn send(
    client: &Client<HttpConnector, ReqBody>,
    req: Request<ReqBody>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    let small = hyper::body::Body::size_hint(req.body())
        .upper()
        .is_some_and(|upper| upper <= REPLAYABLE);
    if !idempotent || !small {
        return client.request(req).await;
    }
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        // The client's body failed: nothing to send.
        Err(_) => Bytes::new(),
    };
    let again = Request::from_parts(parts.clone(), ReqBody(full(body.clone())));
    match client
        .request(Request::from_parts(parts, ReqBody(full(body))))
        .await
    {
        Err(e) if failed_before_response(&e) => {
            tracing::debug!(error = %e, "upstream connection closed under the request; once more");
            client.request(again).await
        }
        other => other,
    }
}

/// Whether the upstream connection failed before any byte of a response:
/// closed while the request was written or before the response began.
fn failed_before_response(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message() || h.is_canceled() || h.is_closed();
        }
        source = s.source();
    }
    false
}

fn box_request(request: Request<Incoming>) -> Request<ReqBody> {
    request.map(|b| ReqBody(boxed(b)))
}

fn error(status: StatusCode, text: &'static str) -> Response<BoxBody> {
    let mut r = Response::new(full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r
}

/// Binds `addr` (use port 0 for any free port).
///
/// # Errors
///
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
