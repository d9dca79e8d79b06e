//! Future types.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use gratify_core::slot::SlotHold;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::limiter::{Permit, Refusal, Ticket, TicketOutcome};
use super::mode::Mode;

pin_project! {
    /// Future for the [`AdaptiveLimit`](super::AdaptiveLimit) service.
    pub struct ResponseFuture<S, Req, M>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, S::Future, Req>,
        hold_body: bool,
        // A refusal is written as a gRPC status (the request was gRPC).
        grpc: bool,
        _mode: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, Req> {
        Refused {
            refusal: Option<Refusal>,
        },
        // Boxed: waiting is the rare path, and a `Sleep` would make every
        // response future several hundred bytes larger.
        Waiting {
            wait: Pin<Box<Wait<S, Req>>>,
        },
        Called {
            #[pin]
            future: F,
            permit: Option<Permit>,
        },
        Done,
    }
}

pin_project! {
    #[project = WaitProj]
    struct Wait<S, Req> {
        ticket: Ticket,
        #[pin]
        sleep: Sleep,
        service: Option<S>,
        request: Option<Req>,
        hold: Option<SlotHold>,
    }
}

impl<S: Service<Req>, Req, M> ResponseFuture<S, Req, M> {
    pub(crate) fn refused(refusal: Refusal) -> Self {
        Self::with(State::Refused {
            refusal: Some(refusal),
        })
    }

    pub(crate) fn called(future: S::Future, permit: Permit, hold_body: bool) -> Self {
        let mut f = Self::with(State::Called {
            future,
            permit: Some(permit),
        });
        f.hold_body = hold_body;
        f
    }

    pub(crate) fn waiting(
        ticket: Ticket,
        service: S,
        request: Req,
        hold: Option<SlotHold>,
        hold_body: bool,
    ) -> Self {
        let sleep = tokio::time::sleep_until(ticket.deadline());
        let mut f = Self::with(State::Waiting {
            wait: Box::pin(Wait {
                ticket,
                sleep,
                service: Some(service),
                request: Some(request),
                hold,
            }),
        });
        f.hold_body = hold_body;
        f
    }

    fn with(state: State<S, S::Future, Req>) -> Self {
        Self {
            state,
            hold_body: false,
            grpc: false,
            _mode: PhantomData,
        }
    }

    /// When `grpc`: writes a refusal as a gRPC status, and reads the
    /// answer's gRPC status from its head.
    pub(crate) fn grpc(mut self, grpc: bool) -> Self {
        self.grpc = grpc;
        self
    }
}

impl<S, Req, M> Future for ResponseFuture<S, Req, M>
where
    S: Service<Req>,
    M: Mode<S::Response, S::Error>,
{
    type Output = Result<M::Response, M::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Refused { refusal } => {
                    let Some(refusal) = refusal.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    this.state.set(State::Done);
                    let mut refusal = refusal;
                    refusal.grpc = *this.grpc;
                    return Poll::Ready(M::refused(refusal));
                }
                StateProj::Waiting { wait } => {
                    let WaitProj {
                        ticket,
                        sleep,
                        service,
                        request,
                        hold,
                    } = wait.as_mut().project();
                    let outcome = match ticket.poll(cx) {
                        Poll::Ready(outcome) => ticket.settle(outcome),
                        Poll::Pending => {
                            ready!(sleep.poll(cx));
                            ticket.time_out()
                        }
                    };
                    let span = tracing::Span::current();
                    match &outcome {
                        TicketOutcome::Admitted(_) => {
                            span.record("admission", "admitted after queueing");
                        }
                        TicketOutcome::Refused(refusal) => {
                            span.record("admission", "shed");
                            span.record("shed_reason", refusal.reason().as_str());
                        }
                    }
                    match outcome {
                        TicketOutcome::Admitted(permit) => {
                            let (Some(mut service), Some(request)) =
                                (service.take(), request.take())
                            else {
                                panic!("ResponseFuture polled after completion");
                            };
                            // The service was made ready before the request
                            // was queued, and kept for it.
                            let permit = permit.held_by(hold.take());
                            let future = service.call(request);
                            this.state.set(State::Called {
                                future,
                                permit: Some(permit),
                            });
                        }
                        TicketOutcome::Refused(refusal) => {
                            this.state.set(State::Refused {
                                refusal: Some(refusal),
                            });
                        }
                    }
                }
                StateProj::Called { future, permit } => {
                    let result = ready!(future.poll(cx));
                    let Some(permit) = permit.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(M::completed(result, permit, *this.hold_body, *this.grpc));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S: Service<Req>, Req, M> fmt::Debug for ResponseFuture<S, Req, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Refused { .. } => "refused",
            State::Waiting { .. } => "waiting",
            State::Called { .. } => "called",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
