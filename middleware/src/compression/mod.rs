//! Compression that knows what CPU costs right now.
//!
//! [`CompressionLayer`] compresses response bodies as they stream, with gzip,
//! deflate (zlib-wrapped, as HTTP means it), brotli or zstd — one cargo
//! feature per codec (`compression-gzip`, `-deflate`, `-br`, `-zstd`,
//! `-full`), through `async-compression`. It negotiates `Accept-Encoding`
//! (q-values, `*`, `identity;q=0`, `x-gzip`; equal q-values go by the server's
//! preference, zstd > br > gzip > deflate by default) and, when nothing
//! acceptable remains, answers uncompressed: a client that cannot decode any
//! coding gets a readable response rather than a 406.
//!
//! It leaves alone: bodies known to be smaller than `min_size` (1 KiB),
//! responses already encoded or partial (`Content-Encoding`,
//! `Content-Range`), `Cache-Control: no-transform`, HEAD, 1xx/204/304, and
//! types that do not compress (images but SVG, audio, video, archives,
//! woff/woff2, gRPC). `text/event-stream` is compressed with a flush after
//! every chunk, so events arrive when sent. It sets `Content-Encoding`, drops
//! `Content-Length` and `Accept-Ranges`, adds `Vary: Accept-Encoding` once,
//! and weakens a strong `ETag`; trailers pass through.
//!
//! # Levels
//!
//! [`Level::Fixed`] uses one level per codec. [`Level::Adaptive`] picks
//! codec and level per response to minimise
//!
//! ```text
//! CPU price × CPU time + byte price × bytes sent + class cost rate × added latency
//! ```
//!
//! where the added latency is the compression time plus the transfer time at
//! the configured client bandwidth, and the CPU price is the model's
//! `cpu_second` plus what a second of a slot costs now on the
//! [`LoadSignal`](gratify_core::LoadSignal) (its shadow price over the mean
//! latency), as far as the CPU is what requests wait for
//! ([`CpuScarcity`]: by default, how busy the runtime's workers are): idle,
//! it compresses harder; when requests queue for the CPU it steps down (zstd
//! 3 → 1 → −1, br 5 → 4 → 1, gzip 6 → 1) and, for cheap classes at
//! saturation, sends identity; when they queue for something else (a
//! database, another service), it keeps compressing — the bytes would grow
//! and no wait would shorten. Speed and ratio per codec and level are
//! learned from what it compresses, seeded with measured defaults. Brotli
//! above 9 is never used on the request path.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "compression-gzip")]
//! # {
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use gratify::compression::CompressionLayer;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let json = Bytes::from("{\"id\":1,\"name\":\"shoe\"}".repeat(200));
//! let svc = CompressionLayer::new().layer(service_fn(move |_: Request<()>| {
//!     let json = json.clone();
//!     async move { Ok::<_, Infallible>(Response::new(Full::new(json))) }
//! }));
//! let req = Request::get("/products").header("accept-encoding", "gzip").body(()).unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()["content-encoding"], "gzip");
//! assert_eq!(res.headers()["vary"], "accept-encoding");
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.len() < 4400 / 10);
//! # }
//! # }
//! ```

mod body;
mod encoder;
mod recode;
mod service;

use std::sync::Mutex;
use std::time::Duration;

pub use self::body::CompressionBody;
pub use self::recode::Recompress;
pub use self::service::{Compression, CompressionLayer, ResponseFuture};

/// A content coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// zstd.
    Zstd = 0,
    /// brotli (`br`).
    Brotli = 1,
    /// gzip.
    Gzip = 2,
    /// deflate: zlib-wrapped deflate, as HTTP means it.
    Deflate = 3,
}

impl<'de> serde::Deserialize<'de> for Codec {
    /// From its `Content-Encoding` token (`"zstd"`, `"br"`, `"gzip"`,
    /// `"deflate"`).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::from_name(&name).ok_or_else(|| {
            serde::de::Error::unknown_variant(&name, &["zstd", "br", "gzip", "deflate"])
        })
    }
}

impl Codec {
    /// Every codec, in the default server preference.
    pub const ALL: [Self; 4] = [Self::Zstd, Self::Brotli, Self::Gzip, Self::Deflate];

    /// The `Content-Encoding` token.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Brotli => "br",
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
        }
    }

    /// The codec of an `Accept-Encoding` token (`x-gzip` is gzip).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "zstd" => Some(Self::Zstd),
            "br" => Some(Self::Brotli),
            "gzip" | "x-gzip" => Some(Self::Gzip),
            "deflate" => Some(Self::Deflate),
            _ => None,
        }
    }

    /// Whether this build can encode it (its cargo feature is on).
    pub const fn available(self) -> bool {
        match self {
            Self::Zstd => cfg!(feature = "compression-zstd"),
            Self::Brotli => cfg!(feature = "compression-br"),
            Self::Gzip => cfg!(feature = "compression-gzip"),
            Self::Deflate => cfg!(feature = "compression-deflate"),
        }
    }

    /// The levels the adaptive policy chooses among, strongest first.
    const fn ladder(self) -> &'static [i32] {
        match self {
            Self::Zstd => &[3, 1, -1],
            Self::Brotli => &[5, 4, 1],
            Self::Gzip | Self::Deflate => &[6, 1],
        }
    }

    /// The highest level allowed on the request path.
    const fn max_level(self) -> i32 {
        match self {
            Self::Zstd => 19,
            Self::Brotli => 9,
            Self::Gzip | Self::Deflate => 9,
        }
    }
}

/// One level per codec, on each codec's own scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Levels {
    /// zstd (−7 to 19 here; 3 by default).
    pub zstd: i32,
    /// brotli (0 to 9 on the request path; 4 by default).
    pub brotli: i32,
    /// gzip (1 to 9; 6 by default).
    pub gzip: i32,
    /// deflate (1 to 9; 6 by default).
    pub deflate: i32,
}

impl Default for Levels {
    fn default() -> Self {
        Self {
            zstd: 3,
            brotli: 4,
            gzip: 6,
            deflate: 6,
        }
    }
}

impl Levels {
    fn of(&self, codec: Codec) -> i32 {
        let level = match codec {
            Codec::Zstd => self.zstd,
            Codec::Brotli => self.brotli,
            Codec::Gzip => self.gzip,
            Codec::Deflate => self.deflate,
        };
        level.min(codec.max_level())
    }
}

/// How hard to compress.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Level {
    /// The same level per codec for every response.
    Fixed(Levels),
    /// Codec and level per response, by cost (see the [module docs](self)).
    Adaptive,
}

/// Learned speed (input bytes per CPU second) and ratio (output ÷ input)
/// per codec and ladder level; a few floats, updated as responses finish.
#[derive(Debug)]
pub(crate) struct Calibration {
    table: Mutex<Vec<(f64, f64)>>,
    /// Bodies compressed, bytes in and out, CPU nanoseconds.
    totals: [std::sync::atomic::AtomicU64; 4],
}

/// What a [`CompressionLayer`] has done, for reports and the admin service.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct CompressionStats {
    /// Bodies compressed to the end.
    pub responses: u64,
    /// Bytes they held.
    pub bytes_in: u64,
    /// Bytes they became.
    pub bytes_out: u64,
    /// CPU spent compressing them.
    pub cpu: Duration,
    /// The learned speed (bytes per second of CPU) and ratio per codec and
    /// ladder level: `(codec, level, speed, ratio)`.
    pub levels: Vec<(Codec, i32, f64, f64)>,
}

/// The slot of a codec and level in the table (ladder levels, then one slot
/// per codec for any other level).
fn slot(codec: Codec, level: i32) -> usize {
    let base = codec as usize * 4;
    match codec.ladder().iter().position(|l| *l == level) {
        Some(i) => base + i,
        None => base + 3,
    }
}

impl Calibration {
    fn new() -> Self {
        // Seeds: single-core figures for JSON-like text, from published
        // comparisons (zstd 1-3 beat gzip at every level; brotli's speed
        // falls steeply with quality).
        let mut table = vec![(50e6, 0.3); 16];
        let seed = |codec: Codec, level: i32, speed: f64, ratio: f64, t: &mut Vec<(f64, f64)>| {
            t[slot(codec, level)] = (speed, ratio);
        };
        seed(Codec::Zstd, 3, 250e6, 0.20, &mut table);
        seed(Codec::Zstd, 1, 450e6, 0.23, &mut table);
        seed(Codec::Zstd, -1, 700e6, 0.30, &mut table);
        seed(Codec::Brotli, 5, 60e6, 0.18, &mut table);
        seed(Codec::Brotli, 4, 90e6, 0.20, &mut table);
        seed(Codec::Brotli, 1, 250e6, 0.25, &mut table);
        seed(Codec::Gzip, 6, 50e6, 0.21, &mut table);
        seed(Codec::Gzip, 1, 150e6, 0.26, &mut table);
        seed(Codec::Deflate, 6, 50e6, 0.21, &mut table);
        seed(Codec::Deflate, 1, 150e6, 0.26, &mut table);
        Self {
            table: Mutex::new(table),
            totals: Default::default(),
        }
    }

    /// Counts one finished body.
    pub(crate) fn record(&self, bytes_in: u64, bytes_out: u64, cpu: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.totals[0].fetch_add(1, Relaxed);
        self.totals[1].fetch_add(bytes_in, Relaxed);
        self.totals[2].fetch_add(bytes_out, Relaxed);
        self.totals[3].fetch_add(u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub(crate) fn stats(&self) -> CompressionStats {
        use std::sync::atomic::Ordering::Relaxed;
        let levels = Codec::ALL
            .iter()
            .filter(|c| c.available())
            .flat_map(|c| {
                c.ladder().iter().map(move |l| {
                    let (speed, ratio) = self.get(slot(*c, *l));
                    (*c, *l, speed, ratio)
                })
            })
            .collect();
        CompressionStats {
            responses: self.totals[0].load(Relaxed),
            bytes_in: self.totals[1].load(Relaxed),
            bytes_out: self.totals[2].load(Relaxed),
            cpu: Duration::from_nanos(self.totals[3].load(Relaxed)),
            levels,
        }
    }

    pub(crate) fn get(&self, slot: usize) -> (f64, f64) {
        self.table
            .lock()
            .map(|t| t.get(slot).copied().unwrap_or((50e6, 0.3)))
            .unwrap_or((50e6, 0.3))
    }

    /// Learns from one finished body (ignoring tiny ones, whose timing is noise).
    pub(crate) fn observe(&self, slot: usize, bytes_in: u64, bytes_out: u64, cpu: Duration) {
        if bytes_in < 4096 || cpu.is_zero() {
            return;
        }
        let speed = bytes_in as f64 / cpu.as_secs_f64();
        let ratio = bytes_out as f64 / bytes_in as f64;
        if let Ok(mut t) = self.table.lock()
            && let Some(entry) = t.get_mut(slot)
        {
            entry.0 += (speed - entry.0) * 0.1;
            entry.1 += (ratio - entry.1) * 0.1;
        }
    }
}

/// The settings of a [`CompressionLayer`].
///
/// They read from a configuration file as a [`Stack`](crate::Stack)'s
/// `[compression]` table does ([`CompressionSettings`]), with the same
/// checks and the same defaults — adaptive levels unless `level = "fixed"`.
/// The CPU pool is code, not configuration: set [`offload`](Self::offload)
/// after reading.
///
/// [`CompressionSettings`]: crate::stack::config::CompressionSettings
///
/// ```
/// use gratify::compression::{Codec, CompressionConfig, Level};
///
/// let config: CompressionConfig = toml::from_str(
///     r#"
///     codecs = ["gzip"]
///     min_size = 2048
///     "#,
/// ).unwrap();
/// assert_eq!(config.codecs, [Codec::Gzip]);
/// assert_eq!(config.min_size, 2048);
/// assert_eq!(config.level, Level::Adaptive);
///
/// // Values are checked as the Stack checks them.
/// let bad = toml::from_str::<CompressionConfig>("level = \"fixed\"\nlevels = { gzip = 12 }");
/// assert!(bad.unwrap_err().to_string().contains("must be within 1..=9"));
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(try_from = "crate::stack::config::CompressionSettings")]
#[non_exhaustive]
pub struct CompressionConfig {
    /// Codecs to offer, in server preference (the first of equal q-values wins).
    pub codecs: Vec<Codec>,
    /// Bodies known to be smaller are sent as they are.
    pub min_size: u64,
    /// How hard to compress.
    pub level: Level,
    /// The client bandwidth assumed for transfer time (bytes per second).
    pub client_bandwidth: f64,
    /// The body size assumed when a response does not say (bytes).
    pub assumed_size: u64,
    /// A pool for large, slow compressions: a chunk whose predicted
    /// compression time (from the learned speed of its codec and level) is
    /// at least [`offload_above`](Self::offload_above), and which is at
    /// least 32 KiB, is compressed there instead of on the async thread.
    /// Small chunks never go (a hand-off costs more than it saves), nor
    /// flushed event streams. If the pool refuses, the chunk is compressed
    /// in place. `None` (the default): always in place.
    pub offload: Option<crate::offload::CpuPool>,
    /// The predicted compression time of a chunk from which it goes to
    /// [`offload`](Self::offload); default 2 ms.
    pub offload_above: Duration,
    /// How adaptive levels learn whether CPU is what requests wait for
    /// (default [`CpuScarcity::Runtime`]).
    pub cpu_scarcity: CpuScarcity,
}

/// How adaptive compression learns whether CPU is what requests wait for.
///
/// A slot's price on the [`LoadSignal`](gratify_core::LoadSignal) says that
/// requests are waiting, not why. When they wait for a database or another
/// service, CPU saved by a lighter level shortens nothing: only the bytes
/// grow. So the slot's price reaches the CPU only as far as the CPU is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CpuScarcity {
    /// From the tokio runtime that compresses (the default): the share of
    /// its worker threads' time spent inside task polls, over the last half
    /// second or more. At or below 50% busy a CPU-second costs its
    /// `cpu_second` price alone; from 80% (a saturated runtime also spends
    /// time in its drivers, which is not counted as busy) it also costs a
    /// slot-second; linearly between. Outside a tokio runtime, as
    /// [`Always`](Self::Always).
    ///
    /// Time a task spends blocking its worker (a synchronous database
    /// driver, `std::thread::sleep`) counts as busy; work on other threads
    /// (a [`CpuPool`](crate::offload::CpuPool), `spawn_blocking`) does not —
    /// with compression offloaded to a pool, choose `Always`.
    #[default]
    Runtime,
    /// Always scarce: every CPU-second saved is worth a slot-second (for a
    /// service whose cores are shared with work its runtime does not see).
    Always,
}

/// The busy share of the current tokio runtime's workers, measured over
/// windows of at least half a second by whichever response asks (never
/// waiting for another).
///
/// tokio publishes a worker's busy time when it parks and every 61 task
/// polls, so a shorter window could see no update from a saturated worker;
/// a window in which no worker's busy time moved at all is therefore no
/// news, not idleness. A window longer than five seconds describes a past
/// that no longer matters, and is only a new start.
#[derive(Debug, Default)]
pub(crate) struct CpuGauge {
    /// At the start of the window: when, the runtime, and its workers'
    /// summed busy time.
    last: Mutex<Option<(std::time::Instant, tokio::runtime::Id, Duration)>>,
    /// The latest busy share (f64 bits; 0 until the first window ends).
    busy: std::sync::atomic::AtomicU64,
}

/// The shortest window a busy share is measured over.
const CPU_WINDOW: Duration = Duration::from_millis(500);

impl CpuGauge {
    /// How scarce CPU is now, 0 (idle enough that saving it gains nothing)
    /// to 1 (requests wait for it). Outside a tokio runtime there is no
    /// telling: 1, as if it were always scarce.
    pub(crate) fn scarcity(&self) -> f64 {
        match self.busy_share() {
            Some(busy) => ((busy - 0.5) / 0.3).clamp(0.0, 1.0),
            None => 1.0,
        }
    }

    /// The workers' busy share over the last window; `None` outside a
    /// tokio runtime.
    pub(crate) fn busy_share(&self) -> Option<f64> {
        use std::sync::atomic::Ordering::Relaxed;
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let now = std::time::Instant::now();
        if let Ok(mut last) = self.last.try_lock()
            && last.is_none_or(|(t, ..)| now.duration_since(t) >= CPU_WINDOW)
        {
            let metrics = handle.metrics();
            let workers = metrics.num_workers().max(1);
            let busy: Duration = (0..metrics.num_workers())
                .map(|i| metrics.worker_total_busy_duration(i))
                .sum();
            let id = handle.id();
            if let Some((t, runtime, before)) = *last
                && runtime == id
                && busy > before
                && now.duration_since(t) <= Duration::from_secs(5)
            {
                let wall = now.duration_since(t).as_secs_f64() * workers as f64;
                let share = (busy - before).as_secs_f64() / wall.max(1e-9);
                self.busy.store(share.clamp(0.0, 1.0).to_bits(), Relaxed);
            }
            *last = Some((now, id, busy));
        }
        Some(f64::from_bits(self.busy.load(Relaxed)))
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            codecs: Codec::ALL
                .iter()
                .copied()
                .filter(|c| c.available())
                .collect(),
            min_size: 1024,
            level: Level::Fixed(Levels::default()),
            client_bandwidth: 5e6,
            assumed_size: 16 * 1024,
            offload: None,
            offload_above: Duration::from_millis(2),
            cpu_scarcity: CpuScarcity::Runtime,
        }
    }
}

/// The choice for one response: a codec and level, or identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Choice {
    pub(crate) codec: Codec,
    pub(crate) level: i32,
    pub(crate) slot: usize,
}

/// Chooses codec and level by cost (see the module docs); `None` means
/// identity is cheapest (and acceptable).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adaptive(
    ranked: &[Codec],
    identity_ok: bool,
    size: f64,
    calibration: &Calibration,
    cpu_price: f64,
    byte_price: f64,
    delay_rate: f64,
    bandwidth: f64,
) -> Option<Choice> {
    let transfer = |bytes: f64| bytes / bandwidth.max(1.0);
    let identity_cost = byte_price * size + delay_rate * transfer(size);
    let mut best: Option<(f64, Choice)> = None;
    // Only the client's most preferred q-value tier competes: a client that
    // prefers gzip to br gets gzip.
    for codec in ranked {
        for &level in codec.ladder() {
            let s = slot(*codec, level);
            let (speed, ratio) = calibration.get(s);
            let cpu = size / speed.max(1.0);
            let out = size * ratio;
            let cost = cpu_price * cpu + byte_price * out + delay_rate * (cpu + transfer(out));
            if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                best = Some((
                    cost,
                    Choice {
                        codec: *codec,
                        level,
                        slot: s,
                    },
                ));
            }
        }
    }
    match best {
        Some((cost, choice)) if cost < identity_cost || !identity_ok => Some(choice),
        _ => None,
    }
}
