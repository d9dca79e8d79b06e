//! [`HttpCacheConfig`] from TOML.
//!
//! Every key is optional and defaults as [`HttpCacheConfig::default`]:
//!
//! ```toml
//! max_bytes = 67108864          # the memory budget
//! max_entry_bytes = 1048576     # larger responses stream through unstored
//! coalesce_wait = "5s"
//! coalesce_retries = 2          # new fills a waiting crowd elects after failures
//! hit_for_miss = "10s"
//! fail_safe = "10m"             # serve stale this long when the origin fails
//! scheme = "http"
//! sort_query = false
//! tag_header = "surrogate-key"
//! expose_tags = false           # send the tag header on to clients
//! max_variants = 8
//! cost_aware = true
//! min_saved_per_hit = 0.0
//! eager_refresh = 0.9
//!
//! [default]                     # rules where no route matches
//! ttl = "30s"                   # freshness for responses without any (opt-in)
//! allow_cookies = false
//! cache_errors = false
//! heuristic = false             # a tenth of the time since Last-Modified, at most a day
//!
//! [[routes]]                    # per path prefix; the longest prefix wins
//! prefix = "/catalogue"
//! ttl = "5m"
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use gratify_cache::HttpCacheConfig;
//!
//! let config = HttpCacheConfig::from_toml(r#"
//!     max_bytes = 1048576
//!     [[routes]]
//!     prefix = "/catalogue"
//!     ttl = "5m"
//! "#)?;
//! assert_eq!(config.max_bytes, 1_048_576);
//! assert_eq!(config.routes[0].1.default_ttl, Some(Duration::from_secs(300)));
//! # Ok::<(), gratify_cache::config::CacheConfigError>(())
//! ```

use std::time::Duration;

use gratify_core::serde_util;
use http::HeaderName;
use serde::Deserialize;

use crate::http_cache::HttpCacheConfig;
use crate::policy::Rules;

/// A cache configuration that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheConfigError {
    /// Malformed TOML or a wrong shape; the message names the key and line.
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    /// A value that parses but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The key at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesSpec {
    #[serde(default, with = "serde_util::opt_duration")]
    ttl: Option<Duration>,
    #[serde(default)]
    allow_cookies: bool,
    #[serde(default)]
    cache_errors: bool,
    #[serde(default)]
    heuristic: bool,
}

impl RulesSpec {
    fn rules(&self) -> Rules {
        Rules {
            default_ttl: self.ttl,
            allow_cookies: self.allow_cookies,
            cache_errors: self.cache_errors,
            heuristic: self.heuristic,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSpec {
    prefix: String,
    #[serde(flatten)]
    rules: RulesSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    max_bytes: Option<u64>,
    max_entry_bytes: Option<usize>,
    #[serde(default, with = "serde_util::opt_duration")]
    coalesce_wait: Option<Duration>,
    coalesce_retries: Option<u32>,
    #[serde(default, with = "serde_util::opt_duration")]
    hit_for_miss: Option<Duration>,
    #[serde(default, with = "serde_util::opt_duration")]
    fail_safe: Option<Duration>,
    scheme: Option<String>,
    sort_query: Option<bool>,
    tag_header: Option<String>,
    expose_tags: Option<bool>,
    max_variants: Option<usize>,
    cost_aware: Option<bool>,
    min_saved_per_hit: Option<f64>,
    eager_refresh: Option<f64>,
    #[serde(default)]
    default: RulesSpec,
    #[serde(default)]
    routes: Vec<RouteSpec>,
}

/// The cache's settings as written in a larger TOML file (the `[cache]`
/// table of a `gratify::Stack` file): deserialise it in place, so that the
/// parser's errors keep their lines, then [`into_config`](Self::into_config).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct CacheSection(Spec);

impl CacheSection {
    /// Checks the values and builds the configuration; a key in an error is
    /// prefixed with `prefix` (such as `"cache."`).
    ///
    /// # Errors
    ///
    /// A [`CacheConfigError::Invalid`] naming the key at fault.
    pub fn into_config(self, prefix: &str) -> Result<HttpCacheConfig, CacheConfigError> {
        HttpCacheConfig::from_spec(self.0, prefix)
    }
}

impl HttpCacheConfig {
    /// Reads a configuration from TOML (the shape is in the
    /// [module docs](crate::config)).
    ///
    /// # Errors
    ///
    /// A [`CacheConfigError`] naming the key at fault.
    pub fn from_toml(text: &str) -> Result<Self, CacheConfigError> {
        let spec: Spec = toml::from_str(text)?;
        Self::from_spec(spec, "")
    }

    fn from_spec(spec: Spec, prefix: &str) -> Result<Self, CacheConfigError> {
        let invalid = |key: &str, message: &str| CacheConfigError::Invalid {
            key: format!("{prefix}{key}"),
            message: message.to_owned(),
        };
        let mut c = Self::default();
        if let Some(v) = spec.max_bytes {
            if v < 4096 {
                return Err(invalid("max_bytes", "must be at least 4096 (one entry)"));
            }
            c.max_bytes = v;
        }
        if let Some(v) = spec.max_entry_bytes {
            if v as u64 > c.max_bytes {
                return Err(invalid("max_entry_bytes", "must not exceed max_bytes"));
            }
            c.max_entry_bytes = v;
        }
        if let Some(v) = spec.coalesce_wait {
            if v > Duration::from_secs(3600) {
                return Err(invalid("coalesce_wait", "must be at most an hour"));
            }
            c.coalesce_wait = v;
        }
        if let Some(v) = spec.coalesce_retries {
            if v > 10 {
                return Err(invalid("coalesce_retries", "must be at most 10"));
            }
            c.coalesce_retries = v;
        }
        if let Some(v) = spec.expose_tags {
            c.expose_tags = v;
        }
        if let Some(v) = spec.hit_for_miss {
            c.hit_for_miss = v;
        }
        c.fail_safe = spec.fail_safe;
        if let Some(v) = spec.scheme {
            if !matches!(v.as_str(), "http" | "https") {
                return Err(invalid("scheme", "must be \"http\" or \"https\""));
            }
            c.scheme = v;
        }
        if let Some(v) = spec.sort_query {
            c.sort_query = v;
        }
        if let Some(v) = spec.tag_header {
            c.tag_header = if v.is_empty() {
                None
            } else {
                Some(
                    HeaderName::from_bytes(v.as_bytes())
                        .map_err(|_| invalid("tag_header", "not a valid header name"))?,
                )
            };
        }
        if let Some(v) = spec.max_variants {
            c.max_variants = v.max(1);
        }
        if let Some(v) = spec.cost_aware {
            c.cost_aware = v;
        }
        if let Some(v) = spec.min_saved_per_hit {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    "min_saved_per_hit",
                    "must be finite and non-negative",
                ));
            }
            c.min_saved_per_hit = v;
        }
        if let Some(v) = spec.eager_refresh {
            if !(v.is_finite() && v > 0.0 && v < 1.0) {
                return Err(invalid("eager_refresh", "must be between 0 and 1"));
            }
            c.eager_refresh = Some(v);
        }
        c.rules = spec.default.rules();
        for (i, route) in spec.routes.iter().enumerate() {
            if !route.prefix.starts_with('/') {
                return Err(invalid(
                    &format!("routes[{i}].prefix"),
                    "must start with '/'",
                ));
            }
            c.routes.push((route.prefix.clone(), route.rules.rules()));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let e = HttpCacheConfig::from_toml("max_bytes = 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_bytes"), "{e}");
        let e = HttpCacheConfig::from_toml("[[routes]]\nprefix = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0].prefix"), "{e}");
        let e = HttpCacheConfig::from_toml("[[routes]]\nprefix = \"/x\"\nttl = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon") && e.contains("line"), "{e}");
        let e = HttpCacheConfig::from_toml("max_byte = 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_byte"), "{e}");
        let e = HttpCacheConfig::from_toml("[[routes]]\nprefix = \"/x\"\ntll = \"5m\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tll"), "{e}");
    }

    #[test]
    fn an_empty_file_is_the_default() {
        let c = HttpCacheConfig::from_toml("").unwrap();
        assert_eq!(c.max_bytes, HttpCacheConfig::default().max_bytes);
        assert!(c.routes.is_empty());
    }
}
