//! A [`Stack`] from one TOML file.
//!
//! One file holds the cost model (classes, cost curves, prices), the routes
//! that put requests in classes, and each layer's settings. A layer whose
//! table is absent is off. Every key but the classes is optional; the
//! defaults are the ones shown.
//!
//! ```toml
//! default_class = "browse"          # requests no route matches
//! exempt = ["/healthz", "/readyz"]  # none by default: straight to the service, never limited
//!                                   # cached or compressed (health checks)
//!
//! [prices]                          # all 0 by default
//! cpu_second = 1.1e-5
//! byte_sent = 9e-11
//!
//! [classes.checkout]                # see docs/model.md for the curves
//! delay_cost = { shape = "linear", per_second = 20.0, deadline = "2s" }
//! refusal_cost = 10.0
//! [classes.browse]
//! delay_cost = { shape = "linear", per_second = 2.0 }
//! refusal_cost = 1.0
//!
//! [[routes]]                        # the most specific match wins; method optional
//! method = "POST"
//! path = "/checkout"
//! class = "checkout"
//!
//! [limit]                           # present: limit and admit by cost
//! algorithm = "delay-cost"          # "aimd", "vegas", "gradient2", "fixed"
//! # fixed_limit = 64                # the limit of "fixed": required with it, refused otherwise
//! max_queue = 1024                  # requests waiting, all classes
//! max_queue_time = "5s"             # the longest anyone waits
//! warmup_samples = 50               # completions before shedding by cost
//! never_shed = { checkout = 256 }   # class = most of it that may wait
//! refusal_body = "text"             # or "json": the body of the limit's refusals
//!
//! [compression]                     # present: compress
//! level = "adaptive"                # or "fixed", with [compression.levels]
//! levels = { zstd = 3, br = 4, gzip = 6, deflate = 6 }
//! codecs = ["zstd", "br", "gzip", "deflate"]   # offered, in preference
//! min_size = 1024                   # smaller known sizes go as they are
//! client_bandwidth = 5e6            # bytes/s, for the transfer time
//! cpu_scarcity = "runtime"          # or "always": does CPU saved shorten the queue?
//!
//! [cache]                           # present: cache; keys as gratify_cache::config
//! max_bytes = 67108864
//! [[cache.routes]]
//! prefix = "/catalogue"
//! ttl = "5m"
//! ```
//!
//! A wrong file is refused at start-up with an error that names the key
//! (and the line, where the TOML parser knows it): an unknown key, a value
//! of the wrong type, a negative price, a route to an unknown class, a cache
//! smaller than one entry, a codec this build does not have.
//!
//! # Example
//!
//! ```
//! use gratify::Stack;
//!
//! let stack = Stack::from_config(r#"
//!     default_class = "browse"
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0 }
//!     refusal_cost = 1.0
//!     [limit]
//! "#).unwrap();
//! assert!(stack.limiter().is_some());
//!
//! let err = Stack::from_config(r#"
//!     [classes.browse]
//!     delay_cost = { shape = "linear", per_second = 2.0 }
//!     refusal_cost = 1.0
//!     [[routes]]
//!     path = "/checkout"
//!     class = "checkout"
//! "#).unwrap_err();
//! assert!(err.to_string().contains("checkout"), "{err}");
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use gratify_cache::config::{CacheConfigError, CacheSection};
use gratify_core::classify::{RouteClassifier, RouteError, RouteRule};
use gratify_core::error::ModelError;
use gratify_core::model::CostModelConfig;
use gratify_core::{Class, CostModel, Prices, serde_util};
use gratify_scaling::limit::{
    Aimd, DelayCostLimit, Fixed, Gradient2, Limiter, LimiterConfig, Vegas,
};
use serde::Deserialize;

use super::Stack;
use crate::compression::{Codec, CompressionConfig, CpuScarcity, Level, Levels};

/// A stack configuration that could not be used.
///
/// Its `Debug` prints what `Display` does (the key, the line, what is
/// wrong), so that a `main` returning it with `?` prints a message, not a
/// structure.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum StackConfigError {
    /// Malformed TOML, an unknown key or a value of the wrong type; the
    /// message names the key, the line and the column.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// The cost model is invalid (a negative price, no classes, …).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A route is invalid (an unknown class, a malformed pattern, …).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The `[cache]` table is invalid.
    #[error(transparent)]
    Cache(#[from] CacheConfigError),
    /// A value that parses but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The key at fault (`limit.fixed_limit`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl std::fmt::Debug for StackConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> StackConfigError {
    StackConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The stack's settings: the shape of its TOML file (see the [module
/// docs](self)), as serde types. Deserialise it from a file of its own with
/// [`Stack::from_config`], or as a table of your application's own
/// configuration (any serde format: figment, config-rs, TOML, YAML) and
/// build the stack with [`Stack::from_settings`]; the parser's errors then
/// point into your file. Fields can be set in code after parsing (from the
/// environment, say).
///
/// ```
/// use gratify::stack::{LimitAlgorithm, StackSettings};
/// use gratify::Stack;
///
/// #[derive(serde::Deserialize)]
/// struct AppConfig {
///     port: u16,
///     gratify: StackSettings,
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config: AppConfig = toml::from_str(r#"
///     port = 8080
///     [gratify]
///     default_class = "browse"
///     [gratify.classes.browse]
///     delay_cost = { shape = "linear", per_second = 2.0 }
///     refusal_cost = 1.0
///     [gratify.limit]
///     algorithm = "gradient2"
/// "#)?;
/// assert_eq!(config.gratify.limit.as_ref().unwrap().algorithm, Some(LimitAlgorithm::Gradient2));
/// // An override from the environment (GRATIFY_MAX_QUEUE=64, say), where
/// // the file has a [limit] table (adding one would switch limiting on).
/// if let (Ok(v), Some(limit)) = (std::env::var("GRATIFY_MAX_QUEUE"), config.gratify.limit.as_mut()) {
///     limit.max_queue = Some(v.parse()?);
/// }
/// let stack = Stack::from_settings(config.gratify.clone())?;
/// assert!(stack.limiter().is_some());
/// // Without the [limit] table, no limiter.
/// config.gratify.limit = None;
/// assert!(Stack::from_settings(config.gratify)?.limiter().is_none());
///
/// // A misspelt value is refused by the parser, with the line in your file.
/// let err = toml::from_str::<AppConfig>("port = 1\n[gratify.limit]\nalgorithm = \"gradiant2\"\n")
///     .err()
///     .unwrap()
///     .to_string();
/// assert!(err.contains("line 3") && err.contains("gradient2"), "{err}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StackSettings {
    /// The class of requests no route matches (needed with more than one
    /// class).
    pub default_class: Option<String>,
    /// What CPU, bytes, memory and replicas cost.
    #[serde(default)]
    pub prices: Prices,
    /// The request classes, by name.
    #[serde(default)]
    pub classes: BTreeMap<String, Class>,
    /// Routes to classes (the most specific match wins; method optional).
    #[serde(default)]
    pub routes: Vec<RouteRule>,
    /// Paths passed straight to the service (health checks).
    #[serde(default)]
    pub exempt: Vec<String>,
    /// Present: limit and admit by cost.
    pub limit: Option<LimitSettings>,
    /// Present: compress.
    pub compression: Option<CompressionSettings>,
    /// Present: cache (keys as `gratify_cache::config`).
    pub cache: Option<CacheSection>,
}

/// The limiter's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LimitAlgorithm {
    /// The delay-cost limit (the default).
    #[default]
    DelayCost,
    /// Additive increase, multiplicative decrease.
    Aimd,
    /// TCP Vegas, as Netflix's concurrency-limits has it.
    Vegas,
    /// Netflix's Gradient2.
    Gradient2,
    /// A fixed limit (`fixed_limit`).
    Fixed,
}

/// The `[limit]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitSettings {
    /// How the limit moves (default: the delay-cost limit).
    pub algorithm: Option<LimitAlgorithm>,
    /// The limit of [`LimitAlgorithm::Fixed`] (required then, only then).
    pub fixed_limit: Option<usize>,
    /// Requests waiting, all classes.
    pub max_queue: Option<usize>,
    /// The longest anyone waits (`"5s"`).
    #[serde(default, with = "serde_util::opt_duration")]
    pub max_queue_time: Option<Duration>,
    /// Completions before shedding by cost.
    pub warmup_samples: Option<u64>,
    /// Classes never shed by cost, each with how many of it may wait.
    #[serde(default)]
    pub never_shed: BTreeMap<String, usize>,
    /// How refusals' bodies are written: `"text"` (the default) or
    /// `"json"`; in code, any [`RefusalBody`](crate::refusal::RefusalBody).
    pub refusal_body: Option<crate::refusal::RefusalBody>,
}

/// Fixed compression levels, by codec (`[compression.levels]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LevelSettings {
    /// zstd, -7 to 19.
    pub zstd: Option<i32>,
    /// brotli, 0 to 9.
    pub br: Option<i32>,
    /// gzip, 1 to 9.
    pub gzip: Option<i32>,
    /// deflate, 1 to 9.
    pub deflate: Option<i32>,
}

/// How compression chooses its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LevelChoice {
    /// By cost and load (the default).
    #[default]
    Adaptive,
    /// The levels of `[compression.levels]`.
    Fixed,
}

/// The `[compression]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CompressionSettings {
    /// Adaptive (the default) or fixed.
    pub level: Option<LevelChoice>,
    /// The fixed levels (only with `level = "fixed"`).
    pub levels: Option<LevelSettings>,
    /// Codecs offered, in preference (`"zstd"`, `"br"`, `"gzip"`,
    /// `"deflate"`).
    pub codecs: Option<Vec<Codec>>,
    /// Smaller known sizes go as they are (bytes).
    pub min_size: Option<u64>,
    /// Bytes per second a client receives, for the transfer time.
    pub client_bandwidth: Option<f64>,
    /// Whether CPU saved shortens the queue: `"runtime"` or `"always"`.
    pub cpu_scarcity: Option<CpuScarcity>,
}

impl Stack {
    /// A stack from a TOML file's text (the shape is in the
    /// [module docs](crate::stack::config)).
    ///
    /// # Errors
    ///
    /// A [`StackConfigError`] naming the key at fault.
    pub fn from_config(text: &str) -> Result<Self, StackConfigError> {
        Self::from_settings(toml::from_str(text)?)
    }

    /// A stack from settings parsed elsewhere (a table of your own
    /// configuration; see [`StackSettings`]).
    ///
    /// # Errors
    ///
    /// A [`StackConfigError`] naming the key at fault (without a line: the
    /// parser has checked the shape; this checks the values).
    pub fn from_settings(file: StackSettings) -> Result<Self, StackConfigError> {
        let mut model_config = CostModelConfig::default();
        model_config.default_class = file.default_class;
        model_config.prices = file.prices;
        model_config.classes = file.classes;
        let model = CostModel::from_config(model_config)?;
        let mut stack = Self::new(&model);
        if !file.routes.is_empty() {
            stack = stack.routes(RouteClassifier::from_rules(&model, &file.routes)?);
        }
        for (i, path) in file.exempt.iter().enumerate() {
            if !path.starts_with('/') || path.contains('?') {
                return Err(invalid(
                    format!("exempt[{i}]"),
                    format!("{path:?} is not a path (it starts with / and has no query)"),
                ));
            }
        }
        if !file.exempt.is_empty() {
            stack = stack.exempt(file.exempt);
        }
        if let Some(limit) = file.limit {
            stack = stack.limit_with(limiter(&model, limit)?);
        }
        if let Some(compression) = file.compression {
            stack = stack.compression_with(compression_config(compression)?);
        }
        if let Some(cache) = file.cache {
            stack = stack.cache(cache.into_config("cache.")?);
        }
        Ok(stack)
    }

    /// A stack from a TOML file.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a [`StackConfigError`] naming the key at
    /// fault.
    pub fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<Self, StackConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| StackConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_config(&text)
    }
}

fn limiter(model: &CostModel, s: LimitSettings) -> Result<Limiter, StackConfigError> {
    let mut config = LimiterConfig::default();
    if let Some(v) = s.max_queue {
        config.max_queue = v;
    }
    if let Some(v) = s.max_queue_time {
        config.max_queue_time = v;
    }
    if let Some(v) = s.warmup_samples {
        config.warmup_samples = v;
    }
    if let Some(body) = s.refusal_body {
        config.refusal_body = body;
    }
    for (name, cap) in &s.never_shed {
        let id = model.id(name).ok_or_else(|| {
            let known: Vec<&str> = model.iter().map(|(_, n, _)| n).collect();
            invalid(
                format!("limit.never_shed.{name}"),
                format!("unknown class {name:?} (known: {})", known.join(", ")),
            )
        })?;
        config.never_shed.push((id, *cap));
    }
    let algorithm = s.algorithm.unwrap_or_default();
    if s.fixed_limit.is_some() && algorithm != LimitAlgorithm::Fixed {
        return Err(invalid(
            "limit.fixed_limit",
            "only for algorithm = \"fixed\"",
        ));
    }
    Ok(match algorithm {
        LimitAlgorithm::DelayCost => {
            Limiter::with_algorithm(model, DelayCostLimit::new(model), config)
        }
        LimitAlgorithm::Aimd => Limiter::with_algorithm(model, Aimd::new(), config),
        LimitAlgorithm::Vegas => Limiter::with_algorithm(model, Vegas::new(), config),
        LimitAlgorithm::Gradient2 => Limiter::with_algorithm(model, Gradient2::new(), config),
        LimitAlgorithm::Fixed => {
            let n = s.fixed_limit.ok_or_else(|| {
                invalid("limit.fixed_limit", "required with algorithm = \"fixed\"")
            })?;
            if n == 0 {
                return Err(invalid("limit.fixed_limit", "must be at least 1"));
            }
            Limiter::with_algorithm(model, Fixed::new(n), config)
        }
    })
}

impl TryFrom<CompressionSettings> for CompressionConfig {
    type Error = StackConfigError;

    /// The layer's settings from the table, checked.
    fn try_from(settings: CompressionSettings) -> Result<Self, StackConfigError> {
        compression_config(settings)
    }
}

fn compression_config(s: CompressionSettings) -> Result<CompressionConfig, StackConfigError> {
    let mut config = CompressionConfig::default();
    if let Some(chosen) = s.codecs {
        let mut codecs = Vec::new();
        for (i, codec) in chosen.into_iter().enumerate() {
            let key = format!("compression.codecs[{i}]");
            let name = codec.name();
            if !codec.available() {
                return Err(invalid(
                    key,
                    format!("{name} is not in this build (cargo feature compression-{name})"),
                ));
            }
            if !codecs.contains(&codec) {
                codecs.push(codec);
            }
        }
        config.codecs = codecs;
    }
    if let Some(v) = s.min_size {
        config.min_size = v;
    }
    if let Some(v) = s.client_bandwidth {
        if !(v.is_finite() && v > 0.0) {
            return Err(invalid(
                "compression.client_bandwidth",
                "must be a positive number of bytes per second",
            ));
        }
        config.client_bandwidth = v;
    }
    if let Some(v) = s.cpu_scarcity {
        config.cpu_scarcity = v;
    }
    let mut levels = Levels::default();
    if let Some(l) = &s.levels {
        let set = |key: &str,
                   value: Option<i32>,
                   range: std::ops::RangeInclusive<i32>,
                   slot: &mut i32| {
            match value {
                Some(v) if !range.contains(&v) => Err(invalid(
                    format!("compression.levels.{key}"),
                    format!("must be within {}..={}", range.start(), range.end()),
                )),
                Some(v) => {
                    *slot = v;
                    Ok(())
                }
                None => Ok(()),
            }
        };
        set("zstd", l.zstd, -7..=19, &mut levels.zstd)?;
        set("br", l.br, 0..=9, &mut levels.brotli)?;
        set("gzip", l.gzip, 1..=9, &mut levels.gzip)?;
        set("deflate", l.deflate, 1..=9, &mut levels.deflate)?;
    }
    config.level = match s.level.unwrap_or_default() {
        LevelChoice::Adaptive => {
            if s.levels.is_some() {
                return Err(invalid("compression.levels", "only with level = \"fixed\""));
            }
            Level::Adaptive
        }
        LevelChoice::Fixed => Level::Fixed(levels),
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CLASSES: &str = r#"
        default_class = "browse"
        [classes.checkout]
        delay_cost = { shape = "linear", per_second = 20.0 }
        refusal_cost = 10.0
        [classes.browse]
        delay_cost = { shape = "linear", per_second = 2.0 }
        refusal_cost = 1.0
    "#;

    fn err(extra: &str) -> String {
        Stack::from_config(&format!("{CLASSES}\n{extra}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_full_file_builds_every_piece() {
        let stack = Stack::from_config(&format!(
            r#"{CLASSES}
            [[routes]]
            method = "POST"
            path = "/checkout"
            class = "checkout"
            [limit]
            algorithm = "fixed"
            fixed_limit = 8
            never_shed = {{ checkout = 16 }}
            [compression]
            level = "fixed"
            levels = {{ gzip = 1 }}
            codecs = ["gzip"]
            cpu_scarcity = "always"
            [cache]
            max_bytes = 1048576
            "#
        ))
        .unwrap();
        assert_eq!(stack.limiter().unwrap().stats().limit, 8);
        assert_eq!(stack.limiter().unwrap().algorithm_name(), "fixed");
        assert!(stack.cache_purge().is_some());
        let c = stack.compression.as_ref().unwrap();
        assert_eq!(c.codecs, vec![Codec::Gzip]);
        assert!(matches!(c.level, Level::Fixed(l) if l.gzip == 1 && l.zstd == 3));
        assert_eq!(c.cpu_scarcity, CpuScarcity::Always);
    }

    #[test]
    fn absent_tables_leave_their_pieces_off() {
        let stack = Stack::from_config(CLASSES).unwrap();
        assert!(stack.limiter().is_none());
        assert!(stack.compression.is_none());
        assert!(stack.cache_purge().is_none());
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let e = err("[limt]");
        assert!(e.contains("limt") && e.contains("line"), "{e}");
        let e = err("[limit]\nmax_queue = \"lots\"");
        assert!(e.contains("max_queue") && e.contains("line"), "{e}");
        let e = err("[compression]\nmin_sise = 10");
        assert!(e.contains("min_sise"), "{e}");
        let e = err("[cache]\nmax_bytes = 10");
        assert!(e.contains("cache.max_bytes"), "{e}");
        let e = err("[[routes]]\npath = \"/x\"\nclass = \"refunds\"");
        assert!(e.contains("refunds"), "{e}");
        let e = err("[limit]\nnever_shed = { refunds = 1 }");
        assert!(e.contains("limit.never_shed.refunds"), "{e}");
        let e = err("[limit]\nalgorithm = \"fixed\"");
        assert!(e.contains("limit.fixed_limit"), "{e}");
        // A value outside the choices: the parser says where, and what the
        // choices are.
        let e = err("[limit]\nalgorithm = \"magic\"");
        assert!(
            e.contains("line") && e.contains("magic") && e.contains("gradient2"),
            "{e}"
        );
        let e = err("[compression]\ncodecs = [\"gzip\", \"lzma\"]");
        assert!(
            e.contains("line") && e.contains("lzma") && e.contains("zstd"),
            "{e}"
        );
        let e = err("[compression]\nlevel = \"fixed\"\nlevels = { br = 11 }");
        assert!(e.contains("compression.levels.br"), "{e}");
        let e = err("[compression]\nlevels = { gzip = 1 }");
        assert!(e.contains("compression.levels"), "{e}");
        let e = err("[compression]\nclient_bandwidth = -1.0");
        assert!(e.contains("compression.client_bandwidth"), "{e}");
        let e = err("[compression]\ncpu_scarcity = \"sometimes\"");
        assert!(
            e.contains("line") && e.contains("sometimes") && e.contains("always"),
            "{e}"
        );
        let e = err("[compression]\nlevel = \"turbo\"");
        assert!(
            e.contains("line") && e.contains("turbo") && e.contains("adaptive"),
            "{e}"
        );
    }

    #[test]
    fn debug_prints_the_message_for_main() {
        let e = Stack::from_config("[limt]").unwrap_err();
        assert_eq!(format!("{e:?}"), e.to_string());
        assert!(!format!("{e:?}").contains("Toml("), "{e:?}");
    }

    #[test]
    fn a_negative_price_is_refused() {
        let e = err("[prices]\ncpu_second = -1.0");
        assert!(e.contains("cpu_second") || e.contains("price"), "{e}");
    }

    proptest! {
        #[test]
        fn any_text_is_a_stack_or_an_error(text in "\\PC{0,200}") {
            let _ = Stack::from_config(&text);
        }

        #[test]
        fn any_limit_and_compression_values_are_a_stack_or_an_error(
            algorithm in "[a-z0-9-]{0,12}",
            fixed in proptest::option::of(0usize..100),
            level in "[a-z]{0,9}",
            gzip in -20i32..30,
            bandwidth in proptest::num::f64::ANY,
        ) {
            let fixed = fixed.map(|n| format!("fixed_limit = {n}")).unwrap_or_default();
            let bandwidth = if bandwidth.is_finite() { format!("client_bandwidth = {bandwidth:?}") } else { String::new() };
            let text = format!(
                "{CLASSES}\n[limit]\nalgorithm = {algorithm:?}\n{fixed}\n[compression]\nlevel = {level:?}\n{bandwidth}\nlevels = {{ gzip = {gzip} }}\n"
            );
            let _ = Stack::from_config(&text);
        }
    }
}
