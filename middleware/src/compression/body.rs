//! The response body of [`Compression`](super::Compression).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gratify_core::BoxError;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Calibration;
use super::encoder::Encoder;

pin_project! {
    /// The inner body, untouched or compressed as it streams.
    pub struct CompressionBody<B> {
        #[pin]
        inner: B,
        state: Option<Box<State>>,
    }
}

struct State {
    encoder: Encoder,
    /// Flush after every chunk (server-sent events).
    flush_each: bool,
    trailers: Option<HeaderMap>,
    finished: bool,
    bytes_in: u64,
    bytes_out: u64,
    cpu: Duration,
    calibration: Arc<Calibration>,
    slot: usize,
}

impl<B> CompressionBody<B> {
    pub(crate) fn identity(inner: B) -> Self {
        Self { inner, state: None }
    }

    pub(crate) fn compressed(
        inner: B,
        encoder: Encoder,
        flush_each: bool,
        calibration: Arc<Calibration>,
        slot: usize,
    ) -> Self {
        Self {
            inner,
            state: Some(Box::new(State {
                encoder,
                flush_each,
                trailers: None,
                finished: false,
                bytes_in: 0,
                bytes_out: 0,
                cpu: Duration::ZERO,
                calibration,
                slot,
            })),
        }
    }
}

impl State {
    fn timed<T>(
        &mut self,
        f: impl FnOnce(&mut Encoder) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let start = Instant::now();
        let r = f(&mut self.encoder);
        self.cpu += start.elapsed();
        r
    }
}

impl<B> Body for CompressionBody<B>
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
        let mut this = self.project();
        let Some(state) = this.state.as_mut() else {
            let frame = ready!(this.inner.poll_frame(cx));
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        };
        loop {
            if state.finished {
                return Poll::Ready(state.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        state.bytes_in += data.len() as u64;
                        let flush = state.flush_each;
                        let out = state.timed(|e| {
                            let mut out = e.write(&data)?;
                            if flush {
                                let more = e.flush()?;
                                if !more.is_empty() {
                                    let mut joined = out.to_vec();
                                    joined.extend_from_slice(&more);
                                    out = Bytes::from(joined);
                                }
                            }
                            Ok(out)
                        })?;
                        if !out.is_empty() {
                            state.bytes_out += out.len() as u64;
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            state.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => {
                    let out = state.timed(Encoder::finish)?;
                    state.finished = true;
                    state.bytes_out += out.len() as u64;
                    state.calibration.observe(
                        state.slot,
                        state.bytes_in,
                        state.bytes_out,
                        state.cpu,
                    );
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            None => self.inner.is_end_stream(),
            Some(s) => s.finished && s.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for CompressionBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompressionBody")
            .field("compressed", &self.state.is_some())
            .finish_non_exhaustive()
    }
}
