//! The one shape of a refusal, whoever refuses.
//!
//! The limit and the CPU pool refuse in the same form, so that a client, a
//! load balancer or a dashboard handles every refusal alike: a
//! `503 Service Unavailable` with `Retry-After`, `Cache-Control: no-store`
//! and [`SHED_REASON_HEADER`] naming a machine-readable reason, and a body a
//! [`RefusalBody`] writes — plain text by default, JSON, or your own
//! function, so refusals look like the rest of your API's errors. (The
//! reason, and the JSON body's `by`, say who refused, for whoever wants to
//! know.)
//!
//! ```
//! use std::time::Duration;
//! use gratify_core::refusal::{Refused, RefusalBody, SHED_REASON_HEADER};
//!
//! let refused = Refused::shed("limit", "cost", Duration::from_secs(2));
//! let response = RefusalBody::json().response(&refused, |bytes| bytes);
//! assert_eq!(response.status(), 503);
//! assert_eq!(response.headers()["retry-after"], "2");
//! assert_eq!(response.headers()["cache-control"], "no-store");
//! assert_eq!(response.headers()[SHED_REASON_HEADER], "cost");
//! assert_eq!(response.headers()["content-type"], "application/json");
//! assert_eq!(
//!     response.body().as_ref(),
//!     br#"{"error":{"code":"overloaded","message":"overloaded: request shed (cost)","reason":"cost","by":"limit","retry_after":2}}"#
//! );
//!
//! // Your API's own error shape.
//! let mine = RefusalBody::custom(|r| {
//!     let body = format!("<error reason='{}'/>", r.reason);
//!     (http::HeaderValue::from_static("application/xml"), body.into())
//! });
//! let response = mine.response(&refused, |bytes| bytes);
//! assert_eq!(response.body().as_ref(), b"<error reason='cost'/>");
//! assert_eq!(response.headers()[SHED_REASON_HEADER], "cost", "the headers stay");
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

/// The header naming why a request was shed (`cost`, `deadline`,
/// `offload-queue-full`, ...).
pub const SHED_REASON_HEADER: &str = "x-gratify-shed";

/// What a refusal says, for the body it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refused<'a> {
    /// The status: 503 for a request shed, 500 for work lost to a panic.
    pub status: StatusCode,
    /// Who refused: `limit` or `offload`, as the `by` label of the refusal
    /// counter says it.
    pub by: &'a str,
    /// Why, as [`SHED_REASON_HEADER`] says it (`cost`, `deadline`,
    /// `queue-full`, `offload-queue-full`, `shutting-down`, ...); `internal`
    /// for a 500.
    pub reason: &'a str,
    /// When the client may try again: whole seconds, 1 to 3,600, as
    /// `Retry-After` says it ([`shed`](Self::shed) rounds up and bounds
    /// it); `None` for a 500.
    pub retry_after: Option<Duration>,
}

impl<'a> Refused<'a> {
    /// A request shed (503) by `by` for `reason`, to retry after
    /// `retry_after` (rounded up to whole seconds, 1 to 3,600).
    pub fn shed(by: &'a str, reason: &'a str, retry_after: Duration) -> Self {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            by,
            reason,
            retry_after: Some(Duration::from_secs(secs.clamp(1, 3600))),
        }
    }

    /// `Retry-After` in seconds, for a 503 that has one.
    fn retry_secs(&self) -> Option<u64> {
        (self.status == StatusCode::SERVICE_UNAVAILABLE)
            .then_some(self.retry_after)
            .flatten()
            .map(|d| d.as_secs().clamp(1, 3600))
    }

    /// Work `by` lost to a failure of its own (500, reason `internal`).
    pub fn internal(by: &'a str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            by,
            reason: "internal",
            retry_after: None,
        }
    }

    /// A stable, machine-readable code: `overloaded`, `shutting-down` or
    /// `internal`.
    pub fn code(&self) -> &'static str {
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            "internal"
        } else if self.reason == "shutting-down" {
            "shutting-down"
        } else {
            "overloaded"
        }
    }

    /// One line for a person: `overloaded: request shed (cost)`.
    pub fn message(&self) -> String {
        match self.code() {
            "internal" => "internal error".to_owned(),
            "shutting-down" => "shutting down".to_owned(),
            _ => format!("overloaded: request shed ({})", self.reason),
        }
    }
}

type Render = dyn Fn(&Refused<'_>) -> (HeaderValue, Bytes) + Send + Sync;

/// How refusal bodies are written: plain text (the default), JSON, or a
/// function of yours. The status and headers are the same whichever.
///
/// From a configuration file: `"text"` or `"json"`.
#[derive(Clone, Default)]
pub struct RefusalBody(Kind);

#[derive(Clone, Default)]
enum Kind {
    #[default]
    Text,
    Json,
    Custom(Arc<Render>),
}

impl RefusalBody {
    /// `overloaded: request shed (cost)` and a newline, as `text/plain`.
    pub fn text() -> Self {
        Self(Kind::Text)
    }

    /// `{"error":{"code":"overloaded","message":"...","reason":"cost",
    /// "by":"limit","retry_after":2}}` as `application/json`
    /// (`retry_after` only for a 503, as the header).
    pub fn json() -> Self {
        Self(Kind::Json)
    }

    /// Your own: the function gets what the refusal says and returns the
    /// `Content-Type` and the body.
    pub fn custom<F>(render: F) -> Self
    where
        F: Fn(&Refused<'_>) -> (HeaderValue, Bytes) + Send + Sync + 'static,
    {
        Self(Kind::Custom(Arc::new(render)))
    }

    /// The `Content-Type` and body for `refused`.
    pub fn render(&self, refused: &Refused<'_>) -> (HeaderValue, Bytes) {
        match &self.0 {
            Kind::Text => (
                HeaderValue::from_static("text/plain; charset=utf-8"),
                Bytes::from(format!("{}\n", refused.message())),
            ),
            Kind::Json => (
                HeaderValue::from_static("application/json"),
                Bytes::from(json(refused)),
            ),
            Kind::Custom(render) => render(refused),
        }
    }

    /// The whole refusal: status, `Retry-After` (for a 503),
    /// `Cache-Control: no-store`, [`SHED_REASON_HEADER`] (for a 503 whose
    /// reason is a valid header value — gratify's always are),
    /// `Content-Type` and the body, made into the service's body type by
    /// `body`.
    pub fn response<B>(&self, refused: &Refused<'_>, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let (content_type, bytes) = self.render(refused);
        let mut response = Response::new(body(bytes));
        *response.status_mut() = refused.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, content_type);
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if refused.status == StatusCode::SERVICE_UNAVAILABLE {
            if let Ok(reason) = HeaderValue::from_str(refused.reason) {
                headers.insert(SHED_REASON_HEADER, reason);
            }
            if let Some(secs) = refused.retry_secs() {
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        response
    }
}

/// Whether a request with `headers` is a gRPC call (its `Content-Type`
/// is `application/grpc` or one of its `+proto`, `+json` forms).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// A refusal of a gRPC call, as gRPC says it: a "trailers-only" response —
/// HTTP 200 with no body, `grpc-status` and `grpc-message` in the head —
/// never an HTTP error page a gRPC client cannot read.
///
/// A request refused because it could not finish before its deadline
/// gets `DEADLINE_EXCEEDED` (4); any other shed request
/// `RESOURCE_EXHAUSTED` (8) with `grpc-retry-pushback-ms`, so that gRPC's
/// own retry policy waits as long as `Retry-After` would say; work lost to
/// a panic `INTERNAL` (13). [`SHED_REASON_HEADER`] and
/// `Cache-Control: no-store` stay.
///
/// ```
/// use std::time::Duration;
/// use gratify_core::refusal::{grpc_response, Refused, SHED_REASON_HEADER};
///
/// let refused = Refused::shed("limit", "cost", Duration::from_millis(1500));
/// let response = grpc_response(&refused, |bytes| bytes);
/// assert_eq!(response.status(), 200);
/// assert_eq!(response.headers()["content-type"], "application/grpc");
/// assert_eq!(response.headers()["grpc-status"], "8");
/// assert_eq!(response.headers()["grpc-retry-pushback-ms"], "2000");
/// assert_eq!(response.headers()["grpc-message"], "overloaded: request shed (cost)");
/// assert_eq!(response.headers()[SHED_REASON_HEADER], "cost");
/// assert!(response.body().is_empty());
/// ```
pub fn grpc_response<B>(refused: &Refused<'_>, body: impl FnOnce(Bytes) -> B) -> Response<B> {
    let mut response = Response::new(body(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let status = if refused.status != StatusCode::SERVICE_UNAVAILABLE {
        "13"
    } else if refused.reason == "deadline" {
        "4"
    } else {
        "8"
    };
    headers.insert("grpc-status", HeaderValue::from_static(status));
    if let Ok(message) = HeaderValue::from_str(&grpc_message(&refused.message())) {
        headers.insert("grpc-message", message);
    }
    if refused.status == StatusCode::SERVICE_UNAVAILABLE {
        if let Ok(reason) = HeaderValue::from_str(refused.reason) {
            headers.insert(SHED_REASON_HEADER, reason);
        }
        if status == "8"
            && let Some(secs) = refused.retry_secs()
        {
            headers.insert(
                "grpc-retry-pushback-ms",
                HeaderValue::from(secs.saturating_mul(1000)),
            );
        }
    }
    response
}

/// The gRPC status code in a response's head, if it has one: a
/// "trailers-only" answer (an error, or a refusal) carries it there; a
/// successful call carries it in its trailers, which this does not read.
///
/// ```
/// use http::HeaderMap;
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(gratify_core::refusal::grpc_status(&headers), None);
/// headers.insert("grpc-status", "8".parse().unwrap());
/// assert_eq!(gratify_core::refusal::grpc_status(&headers), Some(8));
/// headers.insert("grpc-status", "eight".parse().unwrap());
/// assert_eq!(gratify_core::refusal::grpc_status(&headers), None);
/// ```
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII,
/// and `%` itself.
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Debug for RefusalBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0 {
            Kind::Text => "text",
            Kind::Json => "json",
            Kind::Custom(_) => "custom",
        };
        f.debug_tuple("RefusalBody").field(&kind).finish()
    }
}

impl<'de> serde::Deserialize<'de> for RefusalBody {
    /// `"text"` or `"json"`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        match name.as_ref() {
            "text" => Ok(Self::text()),
            "json" => Ok(Self::json()),
            other => Err(serde::de::Error::unknown_variant(other, &["text", "json"])),
        }
    }
}

fn json(r: &Refused<'_>) -> String {
    let mut out = String::from("{\"error\":{\"code\":");
    push_string(&mut out, r.code());
    out.push_str(",\"message\":");
    push_string(&mut out, &r.message());
    out.push_str(",\"reason\":");
    push_string(&mut out, r.reason);
    out.push_str(",\"by\":");
    push_string(&mut out, r.by);
    if let Some(secs) = r.retry_secs() {
        out.push_str(&format!(",\"retry_after\":{secs}"));
    }
    out.push_str("}}");
    out
}

/// `text` as a JSON string (quotes, backslashes and control characters
/// escaped).
fn push_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod grpc_tests {
    use proptest::prelude::*;

    use super::*;

    fn decode(text: &str) -> Vec<u8> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn grpc_messages_are_header_values_that_decode_back(text in "\\PC{0,60}") {
            let encoded = grpc_message(&text);
            prop_assert!(HeaderValue::from_str(&encoded).is_ok());
            prop_assert_eq!(decode(&encoded), text.as_bytes());
        }

        #[test]
        fn only_grpc_content_types_are_grpc(value in "[ -~]{0,40}") {
            let mut headers = http::HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(CONTENT_TYPE, v);
            }
            let lower = value.to_ascii_lowercase();
            let expected = lower == "application/grpc"
                || lower.starts_with("application/grpc+")
                || lower.starts_with("application/grpc;");
            prop_assert_eq!(is_grpc(&headers), expected && HeaderValue::from_str(&value).is_ok());
        }
    }

    #[test]
    fn grpc_look_alikes_are_not_grpc() {
        for value in ["application/grpc-web", "application/grpcx", "text/grpc", ""] {
            let mut headers = http::HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            assert!(!is_grpc(&headers), "{value}");
        }
        let mut headers = http::HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&headers));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a reason says, the JSON body parses and says it back.
        #[test]
        fn json_bodies_parse_whatever_the_reason(reason in any::<String>(), by in "[a-z]{1,10}", secs in 0u64..10_000) {
            let refused = Refused::shed(&by, &reason, Duration::from_secs(secs));
            let (_, body) = RefusalBody::json().render(&refused);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(v["error"]["reason"].as_str(), Some(reason.as_str()));
            prop_assert_eq!(v["error"]["by"].as_str(), Some(by.as_str()));
            prop_assert_eq!(v["error"]["retry_after"].as_u64(), Some(secs.clamp(1, 3600)));
        }
    }

    #[test]
    fn the_retry_time_is_whole_seconds_in_the_body_as_in_the_header() {
        let refused = Refused::shed("offload", "offload-deadline", Duration::from_millis(3));
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        let refused = Refused::shed("limit", "cost", Duration::from_millis(2_100));
        assert_eq!(refused.retry_after, Some(Duration::from_secs(3)));
        let response = RefusalBody::json().response(&refused, |b| b);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
        let v: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(v["error"]["retry_after"], 3);
        let long = Refused::shed("limit", "cost", Duration::from_secs(1 << 40));
        assert_eq!(long.retry_after, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn a_500_has_no_retry_after_and_no_shed_header() {
        // Even one made with a retry time: a 500 is not a refusal to retry.
        let mut refused = Refused::shed("offload", "internal", Duration::from_secs(5));
        refused.status = StatusCode::INTERNAL_SERVER_ERROR;
        let response = RefusalBody::json().response(&refused, |b| b);
        assert!(response.headers().get(RETRY_AFTER).is_none());
        let v: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert!(v["error"].get("retry_after").is_none());
        let refused = Refused::internal("offload");
        let response = RefusalBody::json().response(&refused, |b| b);
        assert_eq!(response.status(), 500);
        assert!(response.headers().get(RETRY_AFTER).is_none());
        assert!(response.headers().get(SHED_REASON_HEADER).is_none());
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        let v: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(v["error"]["code"], "internal");
        assert!(v["error"].get("retry_after").is_none());
        let text = RefusalBody::text().response(&refused, |b| b);
        assert_eq!(text.body().as_ref(), b"internal error\n");
    }

    #[test]
    fn shutting_down_has_its_own_code() {
        let refused = Refused::shed("offload", "shutting-down", Duration::from_secs(1));
        assert_eq!(refused.code(), "shutting-down");
        let text = RefusalBody::text().response(&refused, |b| b);
        assert_eq!(text.body().as_ref(), b"shutting down\n");
        assert_eq!(text.headers()[SHED_REASON_HEADER], "shutting-down");
    }

    #[test]
    fn reads_text_or_json_from_a_file() {
        let body: RefusalBody = serde_json::from_str("\"json\"").unwrap();
        assert_eq!(format!("{body:?}"), "RefusalBody(\"json\")");
        let error = serde_json::from_str::<RefusalBody>("\"xml\"").unwrap_err();
        assert!(error.to_string().contains("unknown variant"), "{error}");
    }
}
