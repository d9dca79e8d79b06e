//! The versioned envelope an entry travels in through the shared tier.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! magic "GRT" · version u8 (1) · stored_at unix ms u64 · initial_age ms u64
//! · lifetime ms u64 · keep_stale ms u64 · origin_latency µs u64 · cost_rate f64
//! · status u16 · http version u8
//! · headers: u32 count × (name: u16 len + bytes, value: u32 len + bytes)
//! · vary:    u32 count × (name: u16 len + bytes, present u8, value: u32 len + bytes)
//! · tags:    u32 count × (u32 len + bytes)
//! · encodings: u32 count × (coding: u16 len + bytes, body: u32 len + bytes)
//! · body: u32 len + bytes
//! ```
//!
//! Anything that does not decode — another version, a truncated value,
//! garbage — is a miss, never an error: it is a cache.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode, Version};
use tokio::time::Instant;

use crate::directives::ResponseDirectives;
use crate::entry::Entry;

const MAGIC: &[u8; 3] = b"GRT";
const VERSION: u8 = 1;
/// Codings the envelope may carry (anything else is refused on decode, as the
/// entry must hold `&'static str` names).
const CODINGS: [&str; 5] = ["zstd", "br", "gzip", "deflate", "identity"];

fn version_code(v: Version) -> u8 {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

fn version_of(code: u8) -> Option<Version> {
    Some(match code {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return None,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wall-clock time an entry was stored (unix milliseconds).
pub(crate) fn stored_wall_ms(entry: &Entry, now: Instant, wall: SystemTime) -> u64 {
    let since = now.saturating_duration_since(entry.stored_at);
    let at = wall.checked_sub(since).unwrap_or(UNIX_EPOCH);
    millis(at.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// Encodes `entry` (stored at wall time `stored_ms`).
pub(crate) fn encode(entry: &Entry, stored_ms: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(entry.weight() + 64);
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u64(stored_ms);
    b.put_u64(millis(entry.initial_age));
    b.put_u64(millis(entry.lifetime));
    b.put_u64(millis(entry.keep_stale));
    b.put_u64(u64::try_from(entry.origin_latency.as_micros()).unwrap_or(u64::MAX));
    b.put_f64(entry.cost_rate);
    b.put_u16(entry.status.as_u16());
    b.put_u8(version_code(entry.version));
    b.put_u32(entry.headers.len() as u32);
    for (name, value) in &entry.headers {
        put_short(&mut b, name.as_str().as_bytes());
        put_long(&mut b, value.as_bytes());
    }
    b.put_u32(entry.vary.len() as u32);
    for (name, value) in &entry.vary {
        put_short(&mut b, name.as_str().as_bytes());
        match value {
            Some(v) => {
                b.put_u8(1);
                put_long(&mut b, v.as_bytes());
            }
            None => {
                b.put_u8(0);
                put_long(&mut b, b"");
            }
        }
    }
    b.put_u32(entry.tags.len() as u32);
    for tag in &entry.tags {
        put_long(&mut b, tag.as_bytes());
    }
    b.put_u32(entry.encodings.len() as u32);
    for (coding, body) in &entry.encodings {
        put_short(&mut b, coding.as_bytes());
        put_long(&mut b, body);
    }
    put_long(&mut b, &entry.body);
    b.freeze()
}

fn put_short(b: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn put_long(b: &mut BytesMut, s: &[u8]) {
    let s = &s[..s.len().min(u32::MAX as usize)];
    b.put_u32(s.len() as u32);
    b.put_slice(s);
}

/// A decoded entry and the wall time it was stored at.
pub(crate) struct Decoded {
    pub(crate) entry: Arc<Entry>,
    pub(crate) stored_ms: u64,
}

/// Decodes an envelope; `None` for anything malformed, of another version,
/// or stored in the future by more than a minute of clock skew.
pub(crate) fn decode(mut b: Bytes, now: Instant, wall: SystemTime) -> Option<Decoded> {
    if b.len() < 4 || &b[..3] != MAGIC || b[3] != VERSION {
        return None;
    }
    b.advance(4);
    let stored_ms = get_u64(&mut b)?;
    let initial_age = Duration::from_millis(get_u64(&mut b)?);
    let lifetime = Duration::from_millis(get_u64(&mut b)?);
    let keep_stale = Duration::from_millis(get_u64(&mut b)?);
    let origin_latency = Duration::from_micros(get_u64(&mut b)?);
    let cost_rate = f64::from_bits(get_u64(&mut b)?);
    if !cost_rate.is_finite() || cost_rate < 0.0 {
        return None;
    }
    let status = StatusCode::from_u16(get_u16(&mut b)?).ok()?;
    let version = version_of(get_u8(&mut b)?)?;
    let mut headers = HeaderMap::new();
    for _ in 0..get_u32(&mut b)? {
        let name = HeaderName::from_bytes(&get_short(&mut b)?).ok()?;
        let value = HeaderValue::from_maybe_shared(get_long(&mut b)?).ok()?;
        headers.append(name, value);
    }
    let mut vary = Vec::new();
    for _ in 0..get_u32(&mut b)? {
        let name = HeaderName::from_bytes(&get_short(&mut b)?).ok()?;
        let present = get_u8(&mut b)?;
        let value = String::from_utf8(get_long(&mut b)?.to_vec()).ok()?;
        vary.push((name, (present == 1).then_some(value)));
    }
    let mut tags = Vec::new();
    for _ in 0..get_u32(&mut b)? {
        tags.push(String::from_utf8(get_long(&mut b)?.to_vec()).ok()?);
    }
    let mut encodings = Vec::new();
    for _ in 0..get_u32(&mut b)? {
        let coding = get_short(&mut b)?;
        let coding = CODINGS.iter().find(|c| c.as_bytes() == &coding[..])?;
        encodings.push((*coding, get_long(&mut b)?));
    }
    let body = get_long(&mut b)?;
    if b.has_remaining() {
        return None;
    }
    // Its age now, from the wall clock; a little skew is tolerated.
    let wall_ms = millis(wall.duration_since(UNIX_EPOCH).unwrap_or_default());
    if stored_ms > wall_ms.saturating_add(60_000) {
        return None;
    }
    let since = Duration::from_millis(wall_ms.saturating_sub(stored_ms));
    let stored_at = now.checked_sub(since)?;
    let directives = ResponseDirectives::from_headers(&headers);
    Some(Decoded {
        entry: Arc::new(Entry {
            status,
            version,
            headers,
            body,
            stored_at,
            initial_age,
            lifetime,
            directives,
            vary,
            tags,
            origin_latency,
            keep_stale,
            cost_rate,
            encodings,
            prepared: Default::default(),
        }),
        stored_ms,
    })
}

fn get_u8(b: &mut Bytes) -> Option<u8> {
    (b.remaining() >= 1).then(|| b.get_u8())
}

fn get_u16(b: &mut Bytes) -> Option<u16> {
    (b.remaining() >= 2).then(|| b.get_u16())
}

fn get_u32(b: &mut Bytes) -> Option<u32> {
    (b.remaining() >= 4).then(|| b.get_u32())
}

fn get_u64(b: &mut Bytes) -> Option<u64> {
    (b.remaining() >= 8).then(|| b.get_u64())
}

fn get_short(b: &mut Bytes) -> Option<Bytes> {
    let n = usize::from(get_u16(b)?);
    (b.remaining() >= n).then(|| b.split_to(n))
}

fn get_long(b: &mut Bytes) -> Option<Bytes> {
    let n = get_u32(b)? as usize;
    (b.remaining() >= n).then(|| b.split_to(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(body: &[u8]) -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/html"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=60"),
        );
        Entry {
            status: StatusCode::OK,
            version: Version::HTTP_11,
            directives: ResponseDirectives::from_headers(&headers),
            headers,
            body: Bytes::copy_from_slice(body),
            stored_at: Instant::now(),
            initial_age: Duration::from_secs(3),
            lifetime: Duration::from_secs(60),
            vary: vec![
                (
                    HeaderName::from_static("accept-language"),
                    Some("de".into()),
                ),
                (HeaderName::from_static("x-absent"), None),
            ],
            tags: vec!["product-7".into(), "catalogue".into()],
            origin_latency: Duration::from_micros(12_345),
            keep_stale: Duration::from_secs(30),
            cost_rate: 2.5,
            encodings: vec![("zstd", Bytes::from_static(b"zz"))],
            prepared: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_round_trips_with_its_age() {
        let e = entry(b"<p>hello</p>");
        let wall = SystemTime::now();
        let stored = stored_wall_ms(&e, Instant::now(), wall);
        let bytes = encode(&e, stored);
        tokio::time::advance(Duration::from_secs(5)).await;
        let later = wall + Duration::from_secs(5);
        let d = decode(bytes, Instant::now(), later).unwrap();
        let got = &d.entry;
        assert_eq!(got.status, e.status);
        assert_eq!(got.headers, e.headers);
        assert_eq!(got.body, e.body);
        assert_eq!(got.vary, e.vary);
        assert_eq!(got.tags, e.tags);
        assert_eq!(got.encodings, e.encodings);
        assert_eq!(got.lifetime, e.lifetime);
        assert_eq!(got.keep_stale, e.keep_stale);
        assert_eq!(got.origin_latency, e.origin_latency);
        assert_eq!(got.cost_rate, e.cost_rate);
        assert_eq!(got.directives, e.directives);
        let age = got.age(Instant::now());
        assert!(
            age >= Duration::from_millis(7_999) && age <= Duration::from_millis(8_001),
            "3 s initial age + 5 s in the tier: {age:?}"
        );
    }

    #[test]
    fn another_version_or_a_truncation_is_a_miss() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let e = entry(b"body");
            let wall = SystemTime::now();
            let bytes = encode(&e, stored_wall_ms(&e, Instant::now(), wall));
            let mut other = BytesMut::from(&bytes[..]);
            other[3] = 2;
            assert!(decode(other.freeze(), Instant::now(), wall).is_none());
            for cut in 0..bytes.len() {
                assert!(decode(bytes.slice(..cut), Instant::now(), wall).is_none());
            }
            let mut longer = BytesMut::from(&bytes[..]);
            longer.put_u8(0);
            assert!(decode(longer.freeze(), Instant::now(), wall).is_none());
            // Stored an hour in the future: a clock gone wrong, a miss.
            let future = stored_wall_ms(&e, Instant::now(), wall + Duration::from_secs(3600));
            assert!(decode(encode(&e, future), Instant::now(), wall).is_none());
        });
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let mut with_magic = b"GRT\x01".to_vec();
                with_magic.extend_from_slice(&data);
                let _ = decode(Bytes::from(data), Instant::now(), SystemTime::now());
                let _ = decode(Bytes::from(with_magic), Instant::now(), SystemTime::now());
            });
        }

        #[test]
        fn flipping_any_byte_never_panics(i in 0usize..200, x in any::<u8>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let e = entry(b"some body bytes");
                let wall = SystemTime::now();
                let bytes = encode(&e, stored_wall_ms(&e, Instant::now(), wall));
                let mut m = BytesMut::from(&bytes[..]);
                let i = i % m.len();
                m[i] ^= x;
                let _ = decode(m.freeze(), Instant::now(), wall);
            });
        }
    }
}
