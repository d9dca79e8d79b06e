//! `Accept-Encoding` negotiation (RFC 9110 §12.5.3).

use http::HeaderMap;
use http::header::ACCEPT_ENCODING;

use super::Codec;

/// What a client accepts: a q-value per codec, for `*`, and for `identity`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Accepted {
    q: [Option<f32>; 4],
    star: Option<f32>,
    identity: Option<f32>,
}

/// Reads `Accept-Encoding`. Malformed elements are ignored; more than 64
/// elements, or an unreadable header, accept nothing but identity.
pub(crate) fn parse(headers: &HeaderMap) -> Accepted {
    let mut out = Accepted {
        q: [None; 4],
        star: None,
        identity: None,
    };
    let mut count = 0;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else {
            return Accepted {
                q: [None; 4],
                star: None,
                identity: None,
            };
        };
        for element in text.split(',') {
            count += 1;
            if count > 64 {
                return Accepted {
                    q: [None; 4],
                    star: None,
                    identity: None,
                };
            }
            let mut parts = element.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if coding.is_empty() {
                continue;
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
            let slot = match coding.as_str() {
                "*" => &mut out.star,
                "identity" => &mut out.identity,
                name => match Codec::from_name(name) {
                    Some(c) => &mut out.q[c as usize],
                    None => continue,
                },
            };
            // Repeated codings: the first one counts.
            if slot.is_none() {
                *slot = Some(q);
            }
        }
    }
    out
}

/// A q-value: `0`, `1`, or `0.` / `1.` with up to three decimals, no more
/// than 1.
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

impl Accepted {
    /// The q-value of `codec` (explicit, else `*`, else not acceptable).
    pub(crate) fn q(&self, codec: Codec) -> f32 {
        self.q[codec as usize].or(self.star).unwrap_or(0.0)
    }

    /// Whether an uncompressed response is acceptable.
    pub(crate) fn identity_ok(&self) -> bool {
        match self.identity {
            Some(q) => q > 0.0,
            None => self.star != Some(0.0),
        }
    }

    /// The acceptable codecs among `enabled`, best first: by q-value, then
    /// by the server's preference (the order of `enabled`).
    pub(crate) fn ranked(&self, enabled: &[Codec]) -> Vec<Codec> {
        let mut out: Vec<(Codec, f32, usize)> = enabled
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, self.q(*c), i))
            .filter(|(_, q, _)| *q > 0.0)
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
        out.into_iter().map(|(c, ..)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn accept(v: &str) -> Accepted {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT_ENCODING, v.parse().unwrap());
        parse(&h)
    }

    const ALL: [Codec; 4] = [Codec::Zstd, Codec::Brotli, Codec::Gzip, Codec::Deflate];

    #[test]
    fn q_values_then_server_preference() {
        assert_eq!(accept("gzip, br, zstd").ranked(&ALL), ALL[..3].to_vec());
        assert_eq!(
            accept("gzip;q=1.0, br;q=0.5, zstd;q=0.8").ranked(&ALL),
            vec![Codec::Gzip, Codec::Zstd, Codec::Brotli]
        );
        assert_eq!(accept("x-gzip").ranked(&ALL), vec![Codec::Gzip]);
        assert_eq!(accept("*").ranked(&ALL), ALL.to_vec());
        assert_eq!(
            accept("*;q=0.5, gzip;q=0").ranked(&ALL),
            vec![Codec::Zstd, Codec::Brotli, Codec::Deflate]
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
        assert!(accept("gzip;q=abc, br").ranked(&ALL) == vec![Codec::Brotli]);
        assert!(accept(",,,").ranked(&ALL).is_empty());
        let many = vec!["gzip"; 100].join(",");
        assert!(accept(&many).ranked(&ALL).is_empty());
    }

    proptest! {
        #[test]
        fn never_panics_and_ranks_only_acceptable(v in "[ -~]{0,200}") {
            let mut h = HeaderMap::new();
            if let Ok(value) = v.parse() {
                h.insert(ACCEPT_ENCODING, value);
            }
            let a = parse(&h);
            for c in a.ranked(&ALL) {
                prop_assert!(a.q(c) > 0.0);
            }
        }
    }
}
