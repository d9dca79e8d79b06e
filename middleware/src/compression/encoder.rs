//! Streaming encoders: async-compression's writers over a `Vec`, driven
//! chunk by chunk (writing into a `Vec` never waits).

use std::io;
#[allow(unused_imports)]
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
#[allow(unused_imports)]
use tokio::io::AsyncWrite;

use super::Codec;

/// Runs `$e` with `$w` bound to whichever writer the encoder holds.
macro_rules! each {
    ($self:expr, $w:ident => $e:expr) => {
        match $self {
            #[cfg(feature = "compression-gzip")]
            Self::Gzip($w) => $e,
            #[cfg(feature = "compression-deflate")]
            Self::Deflate($w) => $e,
            #[cfg(feature = "compression-br")]
            Self::Brotli($w) => {
                let $w = &mut **$w;
                $e
            }
            #[cfg(feature = "compression-zstd")]
            Self::Zstd($w) => $e,
            Self::None(never) => match *never {},
        }
    };
}

/// A poll that must be ready: writing into a `Vec` never waits.
#[allow(dead_code)]
fn ready<T>(poll: Poll<io::Result<T>>) -> io::Result<T> {
    match poll {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// An encoder for one response body.
pub(crate) enum Encoder {
    #[cfg(feature = "compression-gzip")]
    Gzip(async_compression::tokio::write::GzipEncoder<Vec<u8>>),
    #[cfg(feature = "compression-deflate")]
    Deflate(async_compression::tokio::write::ZlibEncoder<Vec<u8>>),
    /// Boxed: brotli's state is large, the others' small.
    #[cfg(feature = "compression-br")]
    Brotli(Box<async_compression::tokio::write::BrotliEncoder<Vec<u8>>>),
    #[cfg(feature = "compression-zstd")]
    Zstd(async_compression::tokio::write::ZstdEncoder<Vec<u8>>),
    /// Never built; keeps the enum inhabited without codec features.
    #[allow(dead_code)]
    None(std::convert::Infallible),
}

#[allow(unreachable_code, unused_variables, unused_mut)]
impl Encoder {
    /// An encoder for `codec` at `level` (the codec's own scale), if the
    /// codec's feature is enabled.
    #[allow(unused_variables)]
    pub(crate) fn new(codec: Codec, level: i32) -> Option<Self> {
        #[cfg(any(
            feature = "compression-gzip",
            feature = "compression-deflate",
            feature = "compression-br",
            feature = "compression-zstd"
        ))]
        let quality = async_compression::Level::Precise(level);
        match codec {
            #[cfg(feature = "compression-gzip")]
            Codec::Gzip => Some(Self::Gzip(
                async_compression::tokio::write::GzipEncoder::with_quality(Vec::new(), quality),
            )),
            #[cfg(feature = "compression-deflate")]
            Codec::Deflate => Some(Self::Deflate(
                async_compression::tokio::write::ZlibEncoder::with_quality(Vec::new(), quality),
            )),
            #[cfg(feature = "compression-br")]
            Codec::Brotli => Some(Self::Brotli(Box::new(
                async_compression::tokio::write::BrotliEncoder::with_quality(Vec::new(), quality),
            ))),
            #[cfg(feature = "compression-zstd")]
            Codec::Zstd => Some(Self::Zstd(
                async_compression::tokio::write::ZstdEncoder::with_quality(Vec::new(), quality),
            )),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Compresses `data`; returns what the encoder has produced so far.
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<Bytes> {
        let mut data = data;
        while !data.is_empty() {
            let mut cx = Context::from_waker(Waker::noop());
            let n: io::Result<usize> =
                each!(self, w => ready(Pin::new(w).poll_write(&mut cx, data)));
            let n = n?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(self.take())
    }

    /// Flushes what is buffered so the client can decode it now.
    pub(crate) fn flush(&mut self) -> io::Result<Bytes> {
        let mut cx = Context::from_waker(Waker::noop());
        let r: io::Result<()> = each!(self, w => ready(Pin::new(w).poll_flush(&mut cx)));
        r?;
        Ok(self.take())
    }

    /// Ends the stream; returns the last bytes.
    pub(crate) fn finish(&mut self) -> io::Result<Bytes> {
        let mut cx = Context::from_waker(Waker::noop());
        let r: io::Result<()> = each!(self, w => ready(Pin::new(w).poll_shutdown(&mut cx)));
        r?;
        Ok(self.take())
    }

    fn take(&mut self) -> Bytes {
        let out: Vec<u8> = each!(self, w => std::mem::take(w.get_mut()));
        Bytes::from(out)
    }
}
