//! Content codings shared by the cache and compression: `Accept-Encoding`
//! negotiation (RFC 9110 §12.5.3) and the [`Recoder`] interface through
//! which the cache stores a body encoded once and serves the encoding each
//! client accepts — without `gratify-cache` depending on the compression
//! layer or the other way round.
//!
//! # Example
//!
//! ```
//! use gratify_core::encoding::Accepted;
//! use http::HeaderMap;
//!
//! let mut h = HeaderMap::new();
//! h.insert("accept-encoding", "gzip;q=1.0, br;q=0.5, zstd".parse()?);
//! let a = Accepted::parse(&h);
//! assert_eq!(a.best(&["zstd", "br", "gzip"]), Some("zstd"));
//! assert!(a.identity_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use bytes::Bytes;
use http::HeaderMap;
use http::header::ACCEPT_ENCODING;

use crate::BoxError;

/// What a client accepts: q-values per coding token, for `*` and for
/// `identity`. Malformed elements are ignored; more than 64 elements, or an
/// unreadable header, accept nothing but identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accepted {
    codings: Vec<(String, f32)>,
    star: Option<f32>,
    identity: Option<f32>,
}

impl Accepted {
    /// Reads `Accept-Encoding` (`x-gzip` counts as `gzip`).
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        let mut count = 0;
        for value in headers.get_all(ACCEPT_ENCODING) {
            let Ok(text) = value.to_str() else {
                return Self::default();
            };
            for element in text.split(',') {
                count += 1;
                if count > 64 {
                    return Self::default();
                }
                let mut parts = element.split(';');
                let mut coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                if coding.is_empty() {
                    continue;
                }
                if coding == "x-gzip" {
                    coding = "gzip".to_owned();
                }
                let mut q = Some(1.0_f32);
                for param in parts {
                    let param = param.trim();
                    if let Some(v) = param
                        .strip_prefix("q=")
                        .or_else(|| param.strip_prefix("Q="))
                    {
                        q = parse_q(v.trim());
                    }
                }
                let Some(q) = q else { continue };
                match coding.as_str() {
                    "*" => {
                        out.star.get_or_insert(q);
                    }
                    "identity" => {
                        out.identity.get_or_insert(q);
                    }
                    _ => {
                        // Repeated codings: the first one counts.
                        if !out.codings.iter().any(|(c, _)| *c == coding) {
                            out.codings.push((coding, q));
                        }
                    }
                }
            }
        }
        out
    }

    /// The q-value of `coding` (explicit, else `*`, else 0).
    pub fn q(&self, coding: &str) -> f32 {
        self.codings
            .iter()
            .find(|(c, _)| c == coding)
            .map(|(_, q)| *q)
            .or(self.star)
            .unwrap_or(0.0)
    }

    /// Whether an uncompressed response is acceptable.
    pub fn identity_ok(&self) -> bool {
        match self.identity {
            Some(q) => q > 0.0,
            None => self.star != Some(0.0),
        }
    }

    /// The acceptable codings among `offered`, best first: by q-value, then
    /// by the order of `offered` (the server's preference).
    pub fn ranked<'a>(&self, offered: &[&'a str]) -> Vec<&'a str> {
        let mut out: Vec<(&str, f32, usize)> = offered
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, self.q(c), i))
            .filter(|(_, q, _)| *q > 0.0)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
        out.into_iter().map(|(c, ..)| c).collect()
    }

    /// The best acceptable coding among `offered`.
    pub fn best<'a>(&self, offered: &[&'a str]) -> Option<&'a str> {
        self.ranked(offered).first().copied()
    }
}

/// A q-value: `0`, `1`, or `0.`/`1.` with up to three decimals, at most 1.
fn parse_q(v: &str) -> Option<f32> {
    let ok = match v.split_once('.') {
        None => v == "0" || v == "1",
        Some((int, frac)) => {
            (int == "0" || int == "1")
                && frac.len() <= 3
                && frac.bytes().all(|b| b.is_ascii_digit())
                && (int == "0" || frac.bytes().all(|b| b == b'0'))
        }
    };
    if !ok {
        return None;
    }
    v.parse().ok()
}

/// Encodes and decodes whole bodies in content codings: what the cache needs
/// to store a body compressed once and serve every client the coding it
/// accepts. The `gratify` crate's compression module provides one.
pub trait Recoder: Send + Sync + 'static {
    /// The codings it produces, in the server's preference (`"zstd"`, ...).
    fn codings(&self) -> &[&'static str];

    /// Encodes `data` in `coding`.
    ///
    /// # Errors
    ///
    /// An unknown coding or an encoder failure.
    fn encode(&self, coding: &str, data: &[u8]) -> Result<Bytes, BoxError>;

    /// Decodes `data` from `coding`.
    ///
    /// # Errors
    ///
    /// An unknown coding or malformed input.
    fn decode(&self, coding: &str, data: &[u8]) -> Result<Bytes, BoxError>;
}

/// Whether a response of this type is worth compressing: not images (but
/// SVG), audio, video, archives, PDF, fonts, gRPC or octet streams.
pub fn compressible(content_type: &str) -> bool {
    let t = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if t == "image/svg+xml" {
        return true;
    }
    !(t.starts_with("image/")
        || t.starts_with("audio/")
        || t.starts_with("video/")
        || t.starts_with("application/grpc")
        || matches!(
            t.as_str(),
            "application/zip"
                | "application/gzip"
                | "application/x-gzip"
                | "application/zstd"
                | "application/x-7z-compressed"
                | "application/x-rar-compressed"
                | "application/x-bzip2"
                | "application/x-xz"
                | "application/pdf"
                | "font/woff"
                | "font/woff2"
                | "application/octet-stream"
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn accept(v: &str) -> Accepted {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT_ENCODING, v.parse().unwrap());
        Accepted::parse(&h)
    }

    const ALL: [&str; 4] = ["zstd", "br", "gzip", "deflate"];

    #[test]
    fn q_values_then_server_preference() {
        assert_eq!(
            accept("gzip, br, zstd").ranked(&ALL),
            vec!["zstd", "br", "gzip"]
        );
        assert_eq!(
            accept("gzip;q=1.0, br;q=0.5, zstd;q=0.8").ranked(&ALL),
            vec!["gzip", "zstd", "br"]
        );
        assert_eq!(accept("x-gzip").ranked(&ALL), vec!["gzip"]);
        assert_eq!(accept("*").ranked(&ALL), ALL.to_vec());
        assert_eq!(
            accept("*;q=0.5, gzip;q=0").ranked(&ALL),
            vec!["zstd", "br", "deflate"]
        );
        assert!(accept("br;q=0").ranked(&ALL).is_empty());
    }

    #[test]
    fn identity() {
        assert!(accept("gzip").identity_ok());
        assert!(!accept("gzip, identity;q=0").identity_ok());
        assert!(!accept("*;q=0").identity_ok());
        assert!(accept("*;q=0, identity").identity_ok());
    }

    #[test]
    fn malformed_is_ignored() {
        assert!(accept("gzip;q=2").ranked(&ALL).is_empty());
        assert!(accept("gzip;q=0.1234").ranked(&ALL).is_empty());
        assert_eq!(accept("gzip;q=abc, br").ranked(&ALL), vec!["br"]);
        assert!(accept(",,,").ranked(&ALL).is_empty());
        let many = vec!["gzip"; 100].join(",");
        assert!(accept(&many).ranked(&ALL).is_empty());
    }

    #[test]
    fn types() {
        assert!(compressible("application/json; charset=utf-8"));
        assert!(compressible("image/svg+xml"));
        assert!(!compressible("image/png"));
        assert!(!compressible("application/grpc+proto"));
    }

    proptest! {
        #[test]
        fn never_panics_and_ranks_only_acceptable(v in "[ -~]{0,200}") {
            let mut h = HeaderMap::new();
            if let Ok(value) = v.parse() {
                h.insert(ACCEPT_ENCODING, value);
            }
            let a = Accepted::parse(&h);
            for c in a.ranked(&ALL) {
                prop_assert!(a.q(c) > 0.0);
            }
        }
    }
}
