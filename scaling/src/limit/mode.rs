//! How refusals and completions reach the caller: as HTTP responses
//! ([`Http`]) or as errors ([`ErrorOnRefusal`]).

use gratify_core::BoxError;

use http::{Response, StatusCode};

use super::algorithm::Outcome;
use super::body::LimitBody;
use super::error::Overloaded;
use super::limiter::{Permit, Refusal};

pub use gratify_core::refusal::SHED_REASON_HEADER;

/// Refusals become HTTP 503 responses with `Retry-After`, so an `Infallible`
/// service stays `Infallible` (the default, for axum and hyper).
#[derive(Debug, Clone, Copy, Default)]
pub struct Http;

/// Refusals become an [`Overloaded`] error inside a
/// [`BoxError`], for services that are not HTTP.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorOnRefusal;

/// Turns the inner service's results and the limiter's refusals into the
/// layer's results. Implemented by [`Http`] and [`ErrorOnRefusal`].
pub trait Mode<Resp, E>: sealed::Sealed {
    /// The layer's response type.
    type Response;
    /// The layer's error type.
    type Error;

    #[doc(hidden)]
    fn refused(refusal: Refusal) -> Result<Self::Response, Self::Error>;

    #[doc(hidden)]
    fn error(error: E) -> Self::Error;

    /// `grpc`: the request was a gRPC call (its answer's status may be in
    /// the head).
    #[doc(hidden)]
    fn completed(
        result: Result<Resp, E>,
        permit: Permit,
        hold_body: bool,
        grpc: bool,
    ) -> Result<Self::Response, Self::Error>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Http {}
    impl Sealed for super::ErrorOnRefusal {}
}

/// The outcome an HTTP status says: 503 and 429 are the service's own
/// overload signals, 504 a timeout further in (a loss signal too), other
/// 5xx are errors, other 4xx the client's doing.
pub(crate) fn outcome_of_status(status: StatusCode) -> Outcome {
    match status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => Outcome::Overload,
        StatusCode::GATEWAY_TIMEOUT => Outcome::Timeout,
        s if s.is_server_error() => Outcome::Error,
        s if s.is_client_error() => Outcome::ClientError,
        _ => Outcome::Success,
    }
}

/// The outcome a response's head says: for a gRPC answer that carries its
/// status there ("trailers-only": an error or a refusal, under HTTP 200),
/// the gRPC status — `RESOURCE_EXHAUSTED` and `UNAVAILABLE` are overload
/// signals, `DEADLINE_EXCEEDED` a timeout, `CANCELLED` the caller's
/// leaving, codes about the request itself the client's doing, the rest
/// errors; otherwise the HTTP status.
pub(crate) fn outcome_of_head(status: StatusCode, headers: &http::HeaderMap) -> Outcome {
    if status == StatusCode::OK
        && !headers.is_empty()
        && let Some(code) = gratify_core::refusal::grpc_status(headers)
    {
        return match code {
            0 => Outcome::Success,
            8 | 14 => Outcome::Overload,
            4 => Outcome::Timeout,
            1 => Outcome::Cancelled,
            // INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED,
            // FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED,
            // UNAUTHENTICATED.
            3 | 5 | 6 | 7 | 9 | 11 | 12 | 16 => Outcome::ClientError,
            _ => Outcome::Error,
        };
    }
    outcome_of_status(status)
}

impl<RB, E> Mode<Response<RB>, E> for Http {
    type Response = Response<LimitBody<RB>>;
    type Error = E;

    fn refused(refusal: Refusal) -> Result<Self::Response, E> {
        let refused = gratify_core::refusal::Refused::shed(
            "limit",
            refusal.reason.as_str(),
            refusal.retry_after,
        );
        if refusal.grpc {
            // Never an HTTP 503 inside a gRPC exchange: a status the
            // client's library understands, with its pushback.
            return Ok(gratify_core::refusal::grpc_response(
                &refused,
                LimitBody::refusal,
            ));
        }
        Ok(refusal.body.response(&refused, LimitBody::refusal))
    }

    fn error(error: E) -> E {
        error
    }

    fn completed(
        result: Result<Response<RB>, E>,
        permit: Permit,
        hold_body: bool,
        grpc: bool,
    ) -> Result<Self::Response, E> {
        match result {
            Ok(response) => {
                let status = response.status();
                let outcome = if grpc {
                    outcome_of_head(status, response.headers())
                } else {
                    outcome_of_status(status)
                };
                let permit = if hold_body {
                    Some(permit)
                } else {
                    permit.complete(outcome);
                    None
                };
                // A 204, a 304 or an interim response has no body to send:
                // dropped unread, it ended with its head (as does a body
                // that says it has ended: see `LimitBody`).
                let bodiless = status == StatusCode::NO_CONTENT
                    || status == StatusCode::NOT_MODIFIED
                    || status.is_informational();
                // Only an answer whose head said nothing of its gRPC status
                // (200 without `grpc-status`) says it in its trailers: a
                // proxy's 503, or a trailers-only status, stands.
                let trailers_decide = grpc
                    && status == StatusCode::OK
                    && gratify_core::refusal::grpc_status(response.headers()).is_none();
                Ok(response
                    .map(|body| LimitBody::inner(body, permit, outcome, bodiless, trailers_decide)))
            }
            Err(e) => {
                permit.complete(Outcome::Error);
                Err(e)
            }
        }
    }
}

impl<Resp, E: Into<BoxError>> Mode<Resp, E> for ErrorOnRefusal {
    type Response = Resp;
    type Error = BoxError;

    fn refused(refusal: Refusal) -> Result<Resp, BoxError> {
        Err(Overloaded::new(refusal.reason, refusal.retry_after).into())
    }

    fn error(error: E) -> BoxError {
        error.into()
    }

    fn completed(
        result: Result<Resp, E>,
        permit: Permit,
        _: bool,
        _: bool,
    ) -> Result<Resp, BoxError> {
        let outcome = if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Error
        };
        permit.complete(outcome);
        result.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn grpc(code: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/grpc".parse().unwrap());
        h.insert("grpc-status", code.parse().unwrap());
        h
    }

    /// A gRPC error answered "trailers-only" is HTTP 200: read as a
    /// success, a service failing fast would teach the limit that it is
    /// fast and healthy.
    #[test]
    fn a_grpc_status_in_the_head_is_the_outcome() {
        let ok = StatusCode::OK;
        assert_eq!(outcome_of_head(ok, &grpc("0")), Outcome::Success);
        assert_eq!(outcome_of_head(ok, &grpc("14")), Outcome::Overload);
        assert_eq!(outcome_of_head(ok, &grpc("8")), Outcome::Overload);
        assert_eq!(outcome_of_head(ok, &grpc("4")), Outcome::Timeout);
        assert_eq!(outcome_of_head(ok, &grpc("1")), Outcome::Cancelled);
        assert_eq!(outcome_of_head(ok, &grpc("3")), Outcome::ClientError);
        assert_eq!(outcome_of_head(ok, &grpc("13")), Outcome::Error);
        assert_eq!(outcome_of_head(ok, &grpc("99")), Outcome::Error);
        // Unreadable: the HTTP status decides.
        assert_eq!(outcome_of_head(ok, &grpc("x")), Outcome::Success);
        assert_eq!(
            outcome_of_head(ok, &http::HeaderMap::new()),
            Outcome::Success
        );
        // An HTTP error decides whatever the head says.
        assert_eq!(
            outcome_of_head(StatusCode::SERVICE_UNAVAILABLE, &grpc("0")),
            Outcome::Overload
        );
    }
}
