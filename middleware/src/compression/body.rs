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
use crate::offload::{CpuPool, OffloadError};

/// A chunk being compressed on the pool: the encoder comes back with the
/// output and the CPU time.
type OnPool = Pin<
    Box<
        dyn Future<Output = Result<(Encoder, std::io::Result<Bytes>, Duration), OffloadError>>
            + Send,
    >,
>;

/// Where large chunks are compressed: the pool, the predicted time above
/// which a chunk goes there, the codec's learned speed (bytes per CPU
/// second) and the job's priority.
pub(crate) struct Offload {
    pub(crate) pool: CpuPool,
    pub(crate) above: Duration,
    pub(crate) speed: f64,
    pub(crate) priority: f64,
}

/// Chunks smaller than this are always compressed in place: a hand-off
/// costs more than it saves.
const MIN_OFFLOAD_CHUNK: usize = 32 * 1024;

pin_project! {
    /// The inner body, untouched or compressed as it streams.
    pub struct CompressionBody<B> {
        #[pin]
        inner: B,
        state: Option<Box<State>>,
    }
}

struct State {
    /// `None` while a chunk is on the pool.
    encoder: Option<Encoder>,
    on_pool: Option<OnPool>,
    offload: Option<Offload>,
    /// Flush after every chunk (server-sent events).
    flush_each: bool,
    trailers: Option<HeaderMap>,
    finished: bool,
    bytes_in: u64,
    bytes_out: u64,
    cpu: Duration,
    calibration: Arc<Calibration>,
    choice: super::Choice,
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
        choice: super::Choice,
        offload: Option<Offload>,
    ) -> Self {
        Self {
            inner,
            state: Some(Box::new(State {
                encoder: Some(encoder),
                on_pool: None,
                offload,
                flush_each,
                trailers: None,
                finished: false,
                bytes_in: 0,
                bytes_out: 0,
                cpu: Duration::ZERO,
                calibration,
                choice,
            })),
        }
    }
}

impl State {
    /// Responses, bytes in and out, CPU and ratio by codec and level, once per
    /// body.
    #[cfg(feature = "metrics")]
    fn record_metrics(&self) {
        let codec = self.choice.codec.name();
        let level = self.choice.level.to_string();
        metrics::counter!(gratify_core::telemetry::COMPRESSION_RESPONSES_TOTAL.name, "codec" => codec, "level" => level.clone())
            .increment(1);
        metrics::counter!(gratify_core::telemetry::COMPRESSION_BYTES_IN_TOTAL.name, "codec" => codec, "level" => level.clone())
            .increment(self.bytes_in);
        metrics::counter!(gratify_core::telemetry::COMPRESSION_BYTES_OUT_TOTAL.name, "codec" => codec, "level" => level.clone())
            .increment(self.bytes_out);
        metrics::histogram!(gratify_core::telemetry::COMPRESSION_CPU_SECONDS.name, "codec" => codec, "level" => level.clone())
            .record(self.cpu.as_secs_f64());
        if self.bytes_in > 0 {
            metrics::histogram!(gratify_core::telemetry::COMPRESSION_RATIO.name, "codec" => codec, "level" => level)
                .record(self.bytes_out as f64 / self.bytes_in as f64);
        }
    }

    fn timed<T>(
        &mut self,
        f: impl FnOnce(&mut Encoder) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Err(std::io::Error::other("encoder busy on the pool"));
        };
        let start = Instant::now();
        let r = f(encoder);
        self.cpu += start.elapsed();
        r
    }

    /// Sends a large, slow chunk to the pool; `false` when it should be
    /// compressed here (small, fast, flushed per event, or refused — then
    /// the encoder is back in place).
    // Without a codec feature `Encoder` has no values and nothing here runs.
    #[cfg_attr(
        not(any(
            feature = "compression-gzip",
            feature = "compression-deflate",
            feature = "compression-br",
            feature = "compression-zstd"
        )),
        allow(unreachable_code, unused_variables)
    )]
    fn hand_off(&mut self, data: &Bytes) -> bool {
        let Some(offload) = &self.offload else {
            return false;
        };
        if self.flush_each
            || data.len() < MIN_OFFLOAD_CHUNK
            || Duration::from_secs_f64(data.len() as f64 / offload.speed.max(1.0)) < offload.above
        {
            return false;
        }
        let Some(mut encoder) = self.encoder.take() else {
            return false;
        };
        let data = data.clone();
        let work = move || {
            let start = Instant::now();
            let out = encoder.write(&data);
            (encoder, out, start.elapsed())
        };
        match offload.pool.try_run(offload.priority, work) {
            Ok(job) => {
                self.on_pool = Some(Box::pin(job));
                true
            }
            Err(work) => {
                // Refused (queue full, shutting down): compress here after
                // all, and deliver through the same path.
                let done = work();
                self.on_pool = Some(Box::pin(std::future::ready(Ok(done))));
                true
            }
        }
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
            if let Some(job) = state.on_pool.as_mut() {
                let done = ready!(job.as_mut().poll(cx));
                state.on_pool = None;
                let (encoder, out, took) = done.map_err(|e| -> BoxError {
                    format!("compressing on the offload pool: {e}").into()
                })?;
                state.encoder = Some(encoder);
                state.cpu += took;
                let out = out?;
                if !out.is_empty() {
                    state.bytes_out += out.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                continue;
            }
            if state.finished {
                return Poll::Ready(state.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        state.bytes_in += data.len() as u64;
                        if state.hand_off(&data) {
                            continue;
                        }
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
                        state.choice.slot,
                        state.bytes_in,
                        state.bytes_out,
                        state.cpu,
                    );
                    state
                        .calibration
                        .record(state.bytes_in, state.bytes_out, state.cpu);
                    #[cfg(feature = "metrics")]
                    state.record_metrics();
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
