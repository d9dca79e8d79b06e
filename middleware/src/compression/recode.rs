//! Whole-body encoding and decoding for the cache: [`Recompress`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use gratify_core::BoxError;
use gratify_core::encoding::Recoder;
use tokio::io::AsyncWrite;

use super::Codec;

/// Compresses a body once, hard, for the cache to store and serve many
/// times (a [`Recoder`]): zstd 12, brotli 9, gzip 9, deflate 9 by default —
/// the work of one miss, not of every hit — and decodes for clients that
/// accept no coding.
///
/// ```
/// # #[cfg(feature = "compression-gzip")]
/// # {
/// use gratify::compression::Recompress;
/// use gratify_core::encoding::Recoder;
///
/// let r = Recompress::new();
/// let text = "hello ".repeat(1000);
/// let gz = r.encode("gzip", text.as_bytes()).unwrap();
/// assert!(gz.len() < 100);
/// assert_eq!(r.decode("gzip", &gz).unwrap(), text.as_bytes());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Recompress {
    codings: Vec<&'static str>,
    /// A compression layer's figures, which this encoding counts in (the
    /// stack connects them: a body compressed once for the cache is
    /// compression, as the dashboard and the metrics say it).
    counted: Option<std::sync::Arc<super::Calibration>>,
}

impl Default for Recompress {
    fn default() -> Self {
        Self::new()
    }
}

impl Recompress {
    /// Every codec this build has, in the default preference.
    pub fn new() -> Self {
        Self {
            codings: Codec::ALL
                .iter()
                .filter(|c| c.available())
                .map(|c| c.name())
                .collect(),
            counted: None,
        }
    }

    /// Counts what it encodes in `layer`'s figures
    /// ([`CompressionLayer::stats`](super::CompressionLayer::stats), and the
    /// compression metrics with the `metrics` feature, at level `cache`):
    /// each coding a stored body is encoded in counts as one body
    /// compressed, with its bytes and time — kept or not (an encoding no
    /// smaller than the body is not stored, but its CPU was spent). Call it
    /// on the layer as it will serve: a layer rebuilt after (`no`) has
    /// figures of its own.
    #[must_use]
    pub fn counted_in(mut self, layer: &super::CompressionLayer) -> Self {
        self.counted = Some(layer.calibration());
        self
    }

    /// Only these codecs (those this build has), in this preference.
    pub fn with_codecs(codecs: &[Codec]) -> Self {
        Self {
            codings: codecs
                .iter()
                .filter(|c| c.available())
                .map(|c| c.name())
                .collect(),
            counted: None,
        }
    }
}

impl Recompress {
    /// Encodes `data` in `coding`, uncounted.
    #[allow(unused_variables)]
    fn encode_uncounted(&self, coding: &str, data: &[u8]) -> Result<Bytes, BoxError> {
        #[allow(unused_imports)]
        use async_compression_alias::*;
        match coding {
            #[cfg(feature = "compression-zstd")]
            "zstd" => {
                let mut w = ZstdEncoder::with_quality(Vec::new(), Level::Precise(12));
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            #[cfg(feature = "compression-br")]
            "br" => {
                let mut w = BrotliEncoder::with_quality(Vec::new(), Level::Precise(9));
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            #[cfg(feature = "compression-gzip")]
            "gzip" => {
                let mut w = GzipEncoder::with_quality(Vec::new(), Level::Precise(9));
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            #[cfg(feature = "compression-deflate")]
            "deflate" => {
                let mut w = ZlibEncoder::with_quality(Vec::new(), Level::Precise(9));
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            other => Err(unknown(other)),
        }
    }
}

/// Writes all of `data` into `w` and ends it (writing into a `Vec` never waits).
#[allow(dead_code)]
fn run<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut data = data;
    while !data.is_empty() {
        match Pin::new(&mut *w).poll_write(&mut cx, data) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => data = &data[n..],
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    match Pin::new(&mut *w).poll_shutdown(&mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

fn unknown(coding: &str) -> BoxError {
    format!("coding {coding:?} is not available in this build").into()
}

impl Recoder for Recompress {
    fn codings(&self) -> &[&'static str] {
        &self.codings
    }

    fn encode(&self, coding: &str, data: &[u8]) -> Result<Bytes, BoxError> {
        let started = std::time::Instant::now();
        let encoded = self.encode_uncounted(coding, data)?;
        let cpu = started.elapsed();
        let Some(calibration) = &self.counted else {
            return Ok(encoded);
        };
        calibration.record(data.len() as u64, encoded.len() as u64, cpu);
        #[cfg(feature = "metrics")]
        {
            use gratify_core::telemetry as t;
            let (codec, level) = (coding.to_owned(), "cache");
            metrics::counter!(t::COMPRESSION_RESPONSES_TOTAL.name, "codec" => codec.clone(), "level" => level)
                .increment(1);
            metrics::counter!(t::COMPRESSION_BYTES_IN_TOTAL.name, "codec" => codec.clone(), "level" => level)
                .increment(data.len() as u64);
            metrics::counter!(t::COMPRESSION_BYTES_OUT_TOTAL.name, "codec" => codec.clone(), "level" => level)
                .increment(encoded.len() as u64);
            metrics::histogram!(t::COMPRESSION_CPU_SECONDS.name, "codec" => codec, "level" => level)
                .record(cpu.as_secs_f64());
        }
        Ok(encoded)
    }

    #[allow(unused_variables)]
    fn decode(&self, coding: &str, data: &[u8]) -> Result<Bytes, BoxError> {
        #[allow(unused_imports)]
        use async_compression_alias::*;
        match coding {
            #[cfg(feature = "compression-zstd")]
            "zstd" => {
                let mut w = ZstdDecoder::new(Vec::new());
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            #[cfg(feature = "compression-br")]
            "br" => {
                let mut w = BrotliDecoder::new(Vec::new());
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            #[cfg(feature = "compression-gzip")]
            "gzip" => {
                let mut w = GzipDecoder::new(Vec::new());
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            #[cfg(feature = "compression-deflate")]
            "deflate" => {
                let mut w = ZlibDecoder::new(Vec::new());
                run(&mut w, data)?;
                Ok(Bytes::from(w.into_inner()))
            }
            other => Err(unknown(other)),
        }
    }
}

/// The writers of every enabled codec, under one name.
mod async_compression_alias {
    #[cfg(any(
        feature = "compression-gzip",
        feature = "compression-deflate",
        feature = "compression-br",
        feature = "compression-zstd"
    ))]
    pub(super) use async_compression::Level;
    #[cfg(feature = "compression-br")]
    pub(super) use async_compression::tokio::write::{BrotliDecoder, BrotliEncoder};
    #[cfg(feature = "compression-gzip")]
    pub(super) use async_compression::tokio::write::{GzipDecoder, GzipEncoder};
    #[cfg(feature = "compression-deflate")]
    pub(super) use async_compression::tokio::write::{ZlibDecoder, ZlibEncoder};
    #[cfg(feature = "compression-zstd")]
    pub(super) use async_compression::tokio::write::{ZstdDecoder, ZstdEncoder};
}
