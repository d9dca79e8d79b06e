//! Body helpers shared by the layers.
//!
//! # Example
//!
//! ```
//! use gratify_core::body::{collect_limited, full, CollectError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let small = collect_limited(full("hello"), 16).await.unwrap();
//! assert_eq!(&small[..], b"hello");
//! let big = collect_limited(full(vec![0u8; 100]), 16).await;
//! assert!(matches!(big, Err(CollectError::TooLarge { limit: 16 })));
//! # }
//! ```

use bytes::{Buf, Bytes, BytesMut};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::BoxError;

/// A type-erased body with `Bytes` chunks and a boxed error, as layers return
/// when they replace a response body.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body with `Bytes` chunks.
pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A boxed body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

/// An empty boxed body.
pub fn empty() -> BoxBody {
    boxed(Empty::new().map_err(|never| match never {}))
}

/// A body that could not be collected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectError {
    /// The body is longer than the limit.
    #[error("body longer than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body failed.
    #[error("body error: {0}")]
    Body(#[source] BoxError),
}

/// Collects a body into one buffer, failing as soon as it exceeds `limit`
/// bytes (from its size hint, before reading, or while reading). Trailers
/// are dropped. Never holds more than `limit` bytes plus one chunk.
///
/// # Errors
///
/// [`CollectError::TooLarge`] or [`CollectError::Body`].
pub async fn collect_limited<B>(body: B, limit: usize) -> Result<Bytes, CollectError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let hint = body.size_hint();
    if hint.lower() > limit as u64 {
        return Err(CollectError::TooLarge { limit });
    }
    let capacity = hint.exact().map_or(0, |n| n as usize).min(limit);
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Body(e.into()))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let chunk = data.copy_to_bytes(data.remaining());
        len = len.saturating_add(chunk.len());
        if len > limit {
            return Err(CollectError::TooLarge { limit });
        }
        // A body of one chunk is returned without a copy.
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            prev => {
                if buf.is_empty() {
                    buf.reserve(capacity.max(len));
                }
                if let Some(prev) = prev {
                    buf.extend_from_slice(&prev);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(match first {
        Some(only) => only,
        None => buf.freeze(),
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body::Frame;
    use http_body_util::StreamBody;

    use super::*;

    fn chunks(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = Infallible> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn collects_chunks_in_order() {
        let b = collect_limited(chunks(&["ab", "cd", "e"]), 5)
            .await
            .unwrap();
        assert_eq!(&b[..], b"abcde");
    }

    #[tokio::test]
    async fn stops_at_the_limit_while_streaming() {
        let e = collect_limited(chunks(&["ab", "cd", "e"]), 4).await;
        assert!(matches!(e, Err(CollectError::TooLarge { limit: 4 })));
    }

    #[tokio::test]
    async fn empty_body() {
        assert!(collect_limited(empty(), 0).await.unwrap().is_empty());
    }
}
