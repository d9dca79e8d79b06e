//! A layer that is on or off at run time without changing the service's type.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower_service::Service;

/// A service with a layer on (`On`) or off (`Off`): the inner service as it
/// is. Both answer `Response<Either<OnBody, OffBody>>` with the same error.
#[derive(Clone, Debug)]
pub enum Optional<A, B> {
    /// The layer is on.
    On(A),
    /// The layer is off.
    Off(B),
}

/// A layer's service that wraps an inner service `B`: how [`Optional`]
/// reaches the service under the layer, on or off.
pub(crate) trait Wraps<B> {
    fn wrapped(&self) -> &B;
    fn wrapped_mut(&mut self) -> &mut B;
    fn into_wrapped(self) -> B;
}

macro_rules! wraps {
    ($($ty:ident),*) => {$(
        impl<S> Wraps<S> for $ty<S> {
            fn wrapped(&self) -> &S {
                self.get_ref()
            }
            fn wrapped_mut(&mut self) -> &mut S {
                self.get_mut()
            }
            fn into_wrapped(self) -> S {
                self.into_inner()
            }
        }
    )*};
}

use gratify_cache::{CacheFill, CacheLookup};
use gratify_scaling::limit::AdaptiveLimit;

use crate::compression::Compression;

wraps!(CacheLookup, CacheFill, Compression, AdaptiveLimit);

// Its methods are the crate's own: the bound is never seen outside.
#[allow(private_bounds)]
impl<A: Wraps<B>, B> Optional<A, B> {
    /// The service under the layer.
    pub(crate) fn inner_ref(&self) -> &B {
        match self {
            Self::On(a) => a.wrapped(),
            Self::Off(b) => b,
        }
    }

    /// The service under the layer, mutably.
    pub(crate) fn inner_mut(&mut self) -> &mut B {
        match self {
            Self::On(a) => a.wrapped_mut(),
            Self::Off(b) => b,
        }
    }

    /// The service under the layer, the layer dropped.
    pub(crate) fn into_inner_service(self) -> B {
        match self {
            Self::On(a) => a.into_wrapped(),
            Self::Off(b) => b,
        }
    }
}

impl<A, B, ReqB, BA, BB, E> Service<Request<ReqB>> for Optional<A, B>
where
    A: Service<Request<ReqB>, Response = Response<BA>, Error = E>,
    B: Service<Request<ReqB>, Response = Response<BB>, Error = E>,
{
    type Response = Response<Either<BA, BB>>;
    type Error = E;
    type Future = OptionalFuture<A::Future, B::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        match self {
            Self::On(a) => a.poll_ready(cx),
            Self::Off(b) => b.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        match self {
            Self::On(a) => OptionalFuture::on(a.call(request)),
            Self::Off(b) => OptionalFuture::off(b.call(request)),
        }
    }
}

pin_project! {
    /// The future of [`Optional`].
    pub struct OptionalFuture<FA, FB> {
        #[pin]
        kind: Kind<FA, FB>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<FA, FB> {
        On { #[pin] future: FA },
        Off { #[pin] future: FB },
    }
}

impl<FA, FB> OptionalFuture<FA, FB> {
    pub(crate) fn on(future: FA) -> Self {
        Self {
            kind: Kind::On { future },
        }
    }

    pub(crate) fn off(future: FB) -> Self {
        Self {
            kind: Kind::Off { future },
        }
    }
}

impl<FA, FB, BA, BB, E> Future for OptionalFuture<FA, FB>
where
    FA: Future<Output = Result<Response<BA>, E>>,
    FB: Future<Output = Result<Response<BB>, E>>,
{
    type Output = Result<Response<Either<BA, BB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match self.project().kind.project() {
            KindProj::On { future } => ready!(future.poll(cx)).map(|r| r.map(Either::Left)),
            KindProj::Off { future } => ready!(future.poll(cx)).map(|r| r.map(Either::Right)),
        })
    }
}

impl<FA, FB> std::fmt::Debug for OptionalFuture<FA, FB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::On { .. } => "OptionalFuture::On",
            Kind::Off { .. } => "OptionalFuture::Off",
        })
    }
}
