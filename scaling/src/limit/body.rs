//! The response body of an HTTP [`AdaptiveLimit`](super::AdaptiveLimit).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::algorithm::Outcome;
use super::limiter::Permit;

pin_project! {
    /// The inner service's body, or the short text of a refusal.
    ///
    /// When the layer holds slots until bodies end
    /// ([`hold_until_body_end`](super::AdaptiveLimitLayer::hold_until_body_end)),
    /// the slot is released when this body ends, fails or is dropped.
    pub struct LimitBody<B> {
        #[pin]
        kind: Kind<B>,
    }

    impl<B> PinnedDrop for LimitBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // A response without a body (204, 304) that nobody polled ended
            // with its head: its request's latency is whole, not a
            // cancellation's; so did a body that said it had ended when
            // asked (hyper and tonic drop such a body unread: an empty
            // answer, a gRPC error "trailers-only"). Any other body dropped
            // unread is a cancellation (the client left before it was
            // sent).
            if let KindProj::Inner { permit, outcome, polled, bodiless, ended, .. } =
                this.project().kind.project()
                && !*polled
                && (*bodiless || ended.load(std::sync::atomic::Ordering::Relaxed))
                && let Some(permit) = permit.take()
            {
                permit.complete(*outcome);
            }
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            permit: Option<Permit>,
            outcome: Outcome,
            polled: bool,
            bodiless: bool,
            // A gRPC call's answer whose head said nothing of its status
            // (HTTP 200, no `grpc-status`): the trailers will.
            grpc: bool,
            // It said it had ended when asked (`is_end_stream`, which
            // takes `&self`).
            ended: std::sync::atomic::AtomicBool,
        },
        Refusal {
            text: Option<Bytes>,
        },
    }
}

impl<B> LimitBody<B> {
    pub(crate) fn inner(
        body: B,
        permit: Option<Permit>,
        outcome: Outcome,
        bodiless: bool,
        grpc: bool,
    ) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                permit,
                outcome,
                polled: false,
                bodiless,
                grpc,
                ended: std::sync::atomic::AtomicBool::new(false),
            },
        }
    }

    pub(crate) fn refusal(text: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Refusal {
                text: Some(text.into()),
            },
        }
    }
}

impl<B> Body for LimitBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner {
                mut body,
                permit,
                outcome,
                polled,
                grpc,
                ..
            } => {
                *polled = true;
                let frame = std::task::ready!(body.as_mut().poll_frame(cx));
                // A gRPC answer that streamed its messages says how it ended
                // in its trailers (`grpc-status`): that is its outcome, not
                // the head's HTTP 200.
                if *grpc
                    && let Some(Ok(frame)) = &frame
                    && let Some(trailers) = frame.trailers_ref()
                    && gratify_core::refusal::grpc_status(trailers).is_some()
                {
                    *outcome = super::mode::outcome_of_head(http::StatusCode::OK, trailers);
                }
                // The body ends at `None`, at an error, or at the frame after
                // which it says it has ended: hyper does not poll again then.
                // Trailers are the last frame too, whatever the body says of
                // itself (hyper drops a body after its trailers unpolled).
                let end = match &frame {
                    None => Some(*outcome),
                    Some(Err(_)) => Some(Outcome::Error),
                    Some(Ok(f)) if f.is_trailers() => Some(*outcome),
                    Some(Ok(_)) => body.is_end_stream().then_some(*outcome),
                };
                if let Some(end) = end
                    && let Some(permit) = permit.take()
                {
                    permit.complete(end);
                }
                Poll::Ready(frame)
            }
            KindProj::Refusal { text } => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, ended, .. } => {
                let end = body.is_end_stream();
                if end {
                    ended.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                end
            }
            Kind::Refusal { text } => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Refusal { text } => {
                SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for LimitBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { permit, .. } => f
                .debug_struct("LimitBody::Inner")
                .field("holds_slot", &permit.is_some())
                .finish_non_exhaustive(),
            Kind::Refusal { .. } => f.debug_struct("LimitBody::Refusal").finish_non_exhaustive(),
        }
    }
}
