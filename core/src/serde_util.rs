//! Serde helpers for configuration types: durations written as `"300ms"`,
//! `"1.5s"`, `"2m"` (or a bare number of seconds), and checked numbers.
//!
//! ```
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Settings {
//!     #[serde(with = "gratify_core::serde_util::duration")]
//!     timeout: Duration,
//! }
//! let s: Settings = toml::from_str("timeout = \"1.5s\"").unwrap();
//! assert_eq!(s.timeout, Duration::from_millis(1500));
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Parses a duration such as `"300ms"`, `"1.5s"`, `"2m 30s"` or `"10us"`.
///
/// Accepts everything [`humantime::parse_duration`] accepts, plus decimal
/// seconds with a unit (`"1.5s"`, `"0.25ms"`). Never panics.
///
/// # Errors
///
/// A message saying what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(d);
    }
    // humantime has no fractions: accept "<decimal><unit>".
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hr" | "hrs" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        _ => return Err(expected(text)),
    };
    let value: f64 = number.parse().map_err(|_| expected(text))?;
    seconds(value * scale).ok_or_else(|| expected(text))
}

fn expected(text: &str) -> String {
    format!(
        "invalid duration {text:?}: expected a number and a unit, such as \"300ms\", \"1.5s\" or \"2m\""
    )
}

/// A `Duration` from seconds, if finite, non-negative and representable.
pub(crate) fn seconds(value: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(value).ok()
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"300ms\" or \"1.5s\", or a number of seconds")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration(v).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        seconds(v).ok_or_else(|| {
            E::custom(format!(
                "invalid duration {v}: seconds must be finite and non-negative"
            ))
        })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v).map(Duration::from_secs).map_err(|_| {
            E::custom(format!(
                "invalid duration {v}: seconds must not be negative"
            ))
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(v))
    }
}

/// `#[serde(with = "gratify_core::serde_util::duration")]` for a `Duration`.
pub mod duration {
    use super::*;

    /// Writes the duration as text such as `"1s 500ms"`.
    ///
    /// # Errors
    ///
    /// The serializer's.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Reads text such as `"300ms"` or a number of seconds.
    ///
    /// # Errors
    ///
    /// A message saying what was expected.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }
}

/// `#[serde(with = "gratify_core::serde_util::opt_duration")]` for an
/// `Option<Duration>` (combine with `#[serde(default)]`).
pub mod opt_duration {
    use super::*;

    /// Writes the duration as text, or nothing.
    ///
    /// # Errors
    ///
    /// The serializer's.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    /// Reads text such as `"300ms"` or a number of seconds.
    ///
    /// # Errors
    ///
    /// A message saying what was expected.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor).map(Some)
    }
}

/// Deserialises an `f64` that must be finite and non-negative.
///
/// # Errors
///
/// When the number is negative, NaN or infinite.
pub fn non_negative_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v: f64 = serde::Deserialize::deserialize(d)?;
    crate::error::non_negative("value", v)
        .map_err(|_| de::Error::custom(format!("expected a finite, non-negative number, got {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m 30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("0.25ms"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", "ms", "-1s", "1.2.3s", "1e400s", "1 parsec", "∞s", "NaNs",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,24}") {
            let _ = parse_duration(&text);
        }

        #[test]
        fn formatted_durations_round_trip(nanos in 0u64..u64::MAX / 4) {
            let d = Duration::from_nanos(nanos);
            let text = humantime::format_duration(d).to_string();
            prop_assert_eq!(parse_duration(&text), Ok(d));
        }

        #[test]
        fn decimal_seconds(ms in 0u32..10_000_000) {
            let text = format!("{}.{:03}s", ms / 1000, ms % 1000);
            prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(u64::from(ms))));
        }
    }
}
