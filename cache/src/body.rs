//! The response bodies of the cache's two halves.
//!
//! [`CacheBody`] is what [`CacheLookup`](crate::CacheLookup) (and so
//! [`HttpCache`](crate::HttpCache)) answers: a stored body, shared and never
//! copied, or nothing (HEAD, `304`), or the body of the service below.
//! [`FillBody`] is what [`CacheFill`](crate::CacheFill) answers: a stored
//! body, the origin's body passed through, or the origin's body streamed to
//! the client while the cache keeps a copy.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use gratify_core::BoxError;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc;

pin_project! {
    /// The body of a [`CacheLookup`](crate::CacheLookup) response: stored
    /// bytes or the inner service's body.
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes> },
        Inner { #[pin] body: B },
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        Self {
            kind: Kind::Full { data: None },
        }
    }

    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
        }
    }
}

impl<B> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full { data } => f
                .debug_struct("CacheBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Inner { .. } => f.debug_struct("CacheBody::Inner").finish_non_exhaustive(),
        }
    }
}

/// What the task that reads an origin's body while the cache keeps a copy
/// sends to the client's body.
pub(crate) enum Tee<B> {
    Data(Bytes),
    Trailers(HeaderMap),
    Error(BoxError),
    /// The body grew past what the cache keeps: the client reads the rest
    /// from the origin itself.
    Rest(Pin<Box<B>>),
    /// The body ended whole (a channel that closes without it was cut off).
    End,
}

pin_project! {
    /// The body of a [`CacheFill`](crate::CacheFill) response.
    pub struct FillBody<B> {
        #[pin]
        kind: FillKind<B>,
    }
}

pin_project! {
    #[project = FillKindProj]
    enum FillKind<B> {
        Full { data: Option<Bytes> },
        Passed { #[pin] body: B },
        Prefixed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
        Tee { rx: mpsc::UnboundedReceiver<Tee<B>>, rest: Option<Pin<Box<B>>>, hint: SizeHint, ended: bool },
    }
}

impl<B> FillBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: FillKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn empty() -> Self {
        Self {
            kind: FillKind::Full { data: None },
        }
    }

    pub(crate) fn passed(body: B) -> Self {
        Self {
            kind: FillKind::Passed { body },
        }
    }

    pub(crate) fn prefixed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: FillKind::Prefixed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }

    pub(crate) fn tee(rx: mpsc::UnboundedReceiver<Tee<B>>, hint: SizeHint) -> Self {
        Self {
            kind: FillKind::Tee {
                rx,
                rest: None,
                hint,
                ended: false,
            },
        }
    }
}

impl<B> Body for FillBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            FillKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            FillKindProj::Passed { body } => {
                let frame = ready!(body.poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            FillKindProj::Prefixed { prefix, rest } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                let frame = ready!(rest.as_mut().poll_frame(cx));
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            FillKindProj::Tee {
                rx, rest, ended, ..
            } => loop {
                if let Some(rest) = rest {
                    let frame = ready!(rest.as_mut().poll_frame(cx));
                    return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                return match ready!(rx.poll_recv(cx)) {
                    Some(Tee::Data(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Some(Tee::Trailers(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    Some(Tee::Error(e)) => Poll::Ready(Some(Err(e))),
                    Some(Tee::Rest(body)) => {
                        *rest = Some(body);
                        continue;
                    }
                    Some(Tee::End) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    // The task that read the origin's body stopped short
                    // (it panicked, or the runtime is shutting down): the
                    // client must not take what it got for the whole body.
                    None => {
                        *ended = true;
                        Poll::Ready(Some(Err("the origin's body was cut off".into())))
                    }
                };
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            FillKind::Full { data } => data.is_none(),
            FillKind::Passed { body } => body.is_end_stream(),
            FillKind::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            FillKind::Tee { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            FillKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            FillKind::Passed { body } => body.size_hint(),
            FillKind::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
            // What the origin announced, less nothing: the tee forwards
            // every byte, so the origin's exact length still holds.
            FillKind::Tee { hint, .. } => *hint,
        }
    }
}

impl<B> fmt::Debug for FillBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            FillKind::Full { .. } => "full",
            FillKind::Passed { .. } => "passed",
            FillKind::Prefixed { .. } => "prefixed",
            FillKind::Tee { .. } => "tee",
        };
        f.debug_struct("FillBody").field("kind", &kind).finish()
    }
}
