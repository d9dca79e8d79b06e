//! The caching reverse proxy behind the `caching-proxy` command: a hyper
//! server, `HttpCacheLayer`, and a hyper client to the origin, so the cache
//! can sit in front of any HTTP/1.1 service.
//!
//! Hop-by-hop headers are dropped in both directions; the origin sees its
//! own authority in `Host`; an unreachable origin is a 502. The cache keys on
//! the `Host` the client sent to the proxy.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use gratify::cache::{HttpCacheConfig, HttpCacheLayer};
use gratify::core::BoxError;
use gratify::core::body::{BoxBody, boxed, full};
use http::header::{HOST, HeaderName};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::{Layer, ServiceBuilder};

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

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
    let client: Client<HttpConnector, ReqBody> = Client::builder(TokioExecutor::new()).build_http();
    let origin = Upstream {
        client,
        upstream: Arc::new(upstream),
    };
    let cache = HttpCacheLayer::new(config).layer(origin);
    let service = ServiceBuilder::new()
        .map_request(box_request as fn(Request<Incoming>) -> Request<ReqBody>)
        .service(cache);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
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
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;

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
    Ok(match client.request(req).await {
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
