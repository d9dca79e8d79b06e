//! The `Cache-Status` response field (RFC 9211), read as values rather than
//! text: which caches a response passed, and what each did.
//!
//! The field is a Structured Field list (RFC 8941): one member per cache,
//! the cache nearest the origin first, each with parameters (`hit`, `fwd`,
//! `fwd-status`, `ttl`, `stored`, `collapsed`, `key`, `detail`). A field
//! that does not parse is refused whole, as RFC 8941 asks; parameters of
//! another type than RFC 9211 gives them, and unknown ones, are ignored.
//!
//! ```
//! use gratify_cache::cache_status::{CacheStatus, Forward};
//!
//! let status = CacheStatus::parse(r#"origin-cdn; fwd=uri-miss; stored, gratify; hit; ttl=42"#).unwrap();
//! assert_eq!(status.entries().len(), 2);
//! // The cache nearest the client is the last member.
//! let ours = status.last().unwrap();
//! assert_eq!(ours.cache(), "gratify");
//! assert!(ours.hit());
//! assert_eq!(ours.ttl(), Some(42));
//! assert!(status.cache("gratify").is_some_and(|e| e.hit()));
//! assert_eq!(status.entries()[0].forward(), Some(&Forward::UriMiss));
//! // Written back as a field value.
//! assert_eq!(ours.to_string(), "gratify; hit; ttl=42");
//! // Not a Structured Field list: refused, not half read.
//! assert!(CacheStatus::parse("gratify; hit; ttl=4 2").is_err());
//! ```

use std::fmt;

/// A parsed `Cache-Status` field: its members, in the field's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    entries: Vec<CacheStatusEntry>,
}

/// One cache's member of a `Cache-Status` field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatusEntry {
    cache: String,
    hit: bool,
    fwd: Option<Forward>,
    fwd_status: Option<u16>,
    ttl: Option<i64>,
    stored: bool,
    collapsed: bool,
    key: Option<String>,
    detail: Option<String>,
}

/// Why a cache forwarded the request (`fwd`, RFC 9211 §2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Forward {
    /// Configured not to use the cache.
    Bypass,
    /// The method is not cacheable.
    Method,
    /// Nothing stored for the URI.
    UriMiss,
    /// Something stored for the URI, not for this request's `Vary`.
    VaryMiss,
    /// A miss the cache does not describe further.
    Miss,
    /// The request asked for a fresh response (`no-cache`, …).
    Request,
    /// Stored but stale: forwarded to revalidate.
    Stale,
    /// Stored in part.
    Partial,
    /// Another reason, as the cache named it.
    Other(String),
}

impl Forward {
    fn from_token(token: &str) -> Self {
        match token {
            "bypass" => Self::Bypass,
            "method" => Self::Method,
            "uri-miss" => Self::UriMiss,
            "vary-miss" => Self::VaryMiss,
            "miss" => Self::Miss,
            "request" => Self::Request,
            "stale" => Self::Stale,
            "partial" => Self::Partial,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Its token in the field.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Bypass => "bypass",
            Self::Method => "method",
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Miss => "miss",
            Self::Request => "request",
            Self::Stale => "stale",
            Self::Partial => "partial",
            Self::Other(s) => s,
        }
    }
}

/// A `Cache-Status` value that is not a Structured Field list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Cache-Status is not a structured field list: {0}")]
pub struct CacheStatusError(&'static str);

impl CacheStatus {
    /// Parses one field value (RFC 8941 list; RFC 9211 members).
    ///
    /// # Errors
    ///
    /// The value is not a Structured Field list, or a member is not a
    /// token or string (a cache's name).
    pub fn parse(value: &str) -> Result<Self, CacheStatusError> {
        let mut p = Parser {
            s: value.as_bytes(),
            i: 0,
        };
        let mut entries = Vec::new();
        p.skip_sp();
        while !p.done() {
            let (Bare::Token(name) | Bare::String(name)) = p.bare_item()? else {
                return Err(CacheStatusError("a member is not a cache's name"));
            };
            let mut entry = CacheStatusEntry {
                cache: name,
                ..CacheStatusEntry::default()
            };
            for (key, value) in p.parameters()? {
                entry.set(&key, value);
            }
            p.skip_ows();
            if p.done() {
                entries.push(entry);
                break;
            }
            if p.next() != Some(b',') {
                return Err(CacheStatusError("members are not separated by commas"));
            }
            p.skip_ows();
            if p.done() {
                return Err(CacheStatusError("a trailing comma"));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// Parses every `Cache-Status` field of `headers`, in order, as one
    /// list (fields of one name combine, RFC 9110 §5.3).
    ///
    /// # Errors
    ///
    /// A field is not text or not a Structured Field list.
    pub fn from_headers(headers: &http::HeaderMap) -> Result<Self, CacheStatusError> {
        // The field's lines are one list, joined by commas, then parsed.
        let mut joined = String::new();
        for (i, value) in headers.get_all("cache-status").iter().enumerate() {
            let text = value
                .to_str()
                .map_err(|_| CacheStatusError("a field is not text"))?;
            if i > 0 {
                joined.push_str(", ");
            }
            joined.push_str(text);
        }
        Self::parse(&joined)
    }

    /// The members, the cache nearest the origin first.
    pub fn entries(&self) -> &[CacheStatusEntry] {
        &self.entries
    }

    /// The member of the cache nearest the client.
    pub fn last(&self) -> Option<&CacheStatusEntry> {
        self.entries.last()
    }

    /// The last member of the cache named `name`.
    pub fn cache(&self, name: &str) -> Option<&CacheStatusEntry> {
        self.entries.iter().rev().find(|e| e.cache == name)
    }
}

impl CacheStatusEntry {
    /// A member for the cache `name`, with no parameters.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            cache: name.into(),
            ..Self::default()
        }
    }

    fn set(&mut self, key: &str, value: Bare) {
        match (key, value) {
            ("hit", Bare::Boolean(b)) => self.hit = b,
            ("fwd", Bare::Token(t)) => self.fwd = Some(Forward::from_token(&t)),
            ("fwd-status", Bare::Integer(n)) => self.fwd_status = u16::try_from(n).ok(),
            ("ttl", Bare::Integer(n)) => self.ttl = Some(n),
            ("stored", Bare::Boolean(b)) => self.stored = b,
            ("collapsed", Bare::Boolean(b)) => self.collapsed = b,
            ("key", Bare::String(s)) => self.key = Some(s),
            ("detail", Bare::Token(s) | Bare::String(s)) => self.detail = Some(s),
            // Unknown, or of another type: ignored.
            _ => {}
        }
    }

    /// The cache's name.
    pub fn cache(&self) -> &str {
        &self.cache
    }

    /// Whether it answered from storage without asking the origin.
    pub fn hit(&self) -> bool {
        self.hit
    }

    /// Why it forwarded the request, if it did.
    pub fn forward(&self) -> Option<&Forward> {
        self.fwd.as_ref()
    }

    /// The status the forwarded request got.
    pub fn forward_status(&self) -> Option<u16> {
        self.fwd_status
    }

    /// Seconds of freshness left (negative: stale).
    pub fn ttl(&self) -> Option<i64> {
        self.ttl
    }

    /// Whether it stored the response.
    pub fn stored(&self) -> bool {
        self.stored
    }

    /// Whether the request was collapsed with others to the origin.
    pub fn collapsed(&self) -> bool {
        self.collapsed
    }

    /// The cache key it used, if it says.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Anything else it says.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// With `hit`.
    #[must_use]
    pub fn with_hit(mut self, hit: bool) -> Self {
        self.hit = hit;
        self
    }

    /// With `fwd`.
    #[must_use]
    pub fn with_forward(mut self, fwd: Forward) -> Self {
        self.fwd = Some(fwd);
        self
    }

    /// With `ttl`.
    #[must_use]
    pub fn with_ttl(mut self, ttl: i64) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// With `stored`.
    #[must_use]
    pub fn with_stored(mut self, stored: bool) -> Self {
        self.stored = stored;
        self
    }

    /// With `detail`.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// The member as field text: the name as a token where it can be one,
/// else as a string; then its parameters. What a field cannot hold is
/// changed: characters outside printable ASCII in strings become `?`, a
/// `ttl` beyond 15 digits is clamped, a `fwd` that is not a token is left
/// out.
impl fmt::Display for CacheStatusEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_token_or_string(f, &self.cache)?;
        if self.hit {
            f.write_str("; hit")?;
        }
        if let Some(fwd) = &self.fwd
            && is_token(fwd.as_str())
        {
            write!(f, "; fwd={}", fwd.as_str())?;
        }
        if let Some(n) = self.fwd_status {
            write!(f, "; fwd-status={n}")?;
        }
        if let Some(n) = self.ttl {
            // An integer has at most 15 digits.
            write!(f, "; ttl={}", n.clamp(-MAX_INTEGER, MAX_INTEGER))?;
        }
        if self.stored {
            f.write_str("; stored")?;
        }
        if self.collapsed {
            f.write_str("; collapsed")?;
        }
        if let Some(k) = &self.key {
            f.write_str("; key=")?;
            write_string(f, k)?;
        }
        if let Some(d) = &self.detail {
            f.write_str("; detail=")?;
            write_token_or_string(f, d)?;
        }
        Ok(())
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Appends `name` as a member's first item: as a token where it can be
/// one, else as a string (for the cache's own `Cache-Status`).
pub(crate) fn push_name(out: &mut String, name: &str) {
    use std::fmt::Write as _;
    struct Name<'a>(&'a str);
    impl fmt::Display for Name<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write_token_or_string(f, self.0)
        }
    }
    let _ = write!(out, "{}", Name(name));
}

fn is_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'*')
        && bytes.all(is_tchar_or_colon_slash)
}

fn write_token_or_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    if is_token(s) {
        f.write_str(s)
    } else {
        write_string(f, s)
    }
}

/// An sf-string: printable ASCII, `"` and `\` escaped; other characters
/// (which a string cannot hold) become `?`.
fn write_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' | '\\' => write!(f, "\\{c}")?,
            ' '..='~' => write!(f, "{c}")?,
            _ => f.write_str("?")?,
        }
    }
    f.write_str("\"")
}

fn is_tchar_or_colon_slash(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c)
}

/// The largest integer a Structured Field holds (15 digits).
const MAX_INTEGER: i64 = 999_999_999_999_999;

/// A bare item (RFC 8941 §3.3).
enum Bare {
    Integer(i64),
    Decimal,
    String(String),
    Token(String),
    Bytes,
    Boolean(bool),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn bare_item(&mut self) -> Result<Bare, CacheStatusError> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'"') => self.string().map(Bare::String),
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => Ok(Bare::Token(self.token())),
            Some(b':') => self.bytes(),
            Some(b'?') => self.boolean(),
            Some(b'(') => Err(CacheStatusError("an inner list")),
            _ => Err(CacheStatusError("an item is expected")),
        }
    }

    fn number(&mut self) -> Result<Bare, CacheStatusError> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let start = self.i;
        let mut dot = None;
        while let Some(c) = self.peek() {
            match c {
                b'0'..=b'9' => self.i += 1,
                b'.' if dot.is_none() => {
                    dot = Some(self.i);
                    self.i += 1;
                }
                _ => break,
            }
        }
        let digits = &self.s[start..self.i];
        match dot {
            None => {
                if digits.is_empty() || digits.len() > 15 {
                    return Err(CacheStatusError("an integer of 1 to 15 digits"));
                }
                let text = std::str::from_utf8(digits).map_err(|_| CacheStatusError("digits"))?;
                let n: i64 = text.parse().map_err(|_| CacheStatusError("an integer"))?;
                Ok(Bare::Integer(if negative { -n } else { n }))
            }
            Some(d) => {
                let (int, frac) = (d - start, self.i - d - 1);
                if int == 0 || int > 12 || frac == 0 || frac > 3 {
                    return Err(CacheStatusError("a decimal of 1–12 and 1–3 digits"));
                }
                Ok(Bare::Decimal)
            }
        }
    }

    fn string(&mut self) -> Result<String, CacheStatusError> {
        self.i += 1; // the opening quote
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(CacheStatusError("an unterminated string")),
                Some(b'"') => return Ok(out),
                Some(b'\\') => match self.next() {
                    Some(c @ (b'"' | b'\\')) => out.push(char::from(c)),
                    _ => return Err(CacheStatusError("a bad escape in a string")),
                },
                Some(c @ b' '..=b'~') => out.push(char::from(c)),
                Some(_) => return Err(CacheStatusError("a string holds printable ASCII")),
            }
        }
    }

    fn token(&mut self) -> String {
        let start = self.i;
        self.i += 1;
        while self.peek().is_some_and(is_tchar_or_colon_slash) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    /// A byte sequence: base64 between colons, `=` only as the padding of
    /// a whole number of quads.
    fn bytes(&mut self) -> Result<Bare, CacheStatusError> {
        self.i += 1;
        let start = self.i;
        loop {
            match self.next() {
                Some(b':') => break,
                Some(c) if c.is_ascii_alphanumeric() || b"+/=".contains(&c) => {}
                _ => return Err(CacheStatusError("a byte sequence")),
            }
        }
        let body = &self.s[start..self.i - 1];
        let padding = body.iter().rev().take_while(|&&c| c == b'=').count();
        let well_formed = body.len().is_multiple_of(4)
            && padding <= 2
            && !body[..body.len() - padding].contains(&b'=');
        if well_formed {
            Ok(Bare::Bytes)
        } else {
            Err(CacheStatusError("a byte sequence is not base64"))
        }
    }

    fn boolean(&mut self) -> Result<Bare, CacheStatusError> {
        self.i += 1;
        match self.next() {
            Some(b'1') => Ok(Bare::Boolean(true)),
            Some(b'0') => Ok(Bare::Boolean(false)),
            _ => Err(CacheStatusError("a boolean is ?0 or ?1")),
        }
    }

    fn key(&mut self) -> Result<String, CacheStatusError> {
        let start = self.i;
        match self.peek() {
            Some(c) if c.is_ascii_lowercase() || c == b'*' => self.i += 1,
            _ => return Err(CacheStatusError("a parameter's key")),
        }
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(&c))
        {
            self.i += 1;
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn parameters(&mut self) -> Result<Vec<(String, Bare)>, CacheStatusError> {
        let mut out: Vec<(String, Bare)> = Vec::new();
        while self.peek() == Some(b';') {
            self.i += 1;
            self.skip_sp();
            let key = self.key()?;
            let value = if self.peek() == Some(b'=') {
                self.i += 1;
                self.bare_item()?
            } else {
                Bare::Boolean(true)
            };
            // A key given twice: the last value counts, in the first's place.
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => out.push((key, value)),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_gratify_writes_reads_back() {
        for (text, hit, fwd) in [
            ("gratify; hit", true, None),
            (
                "gratify; fwd=uri-miss; stored",
                false,
                Some(Forward::UriMiss),
            ),
            (
                "gratify; hit; fwd=stale; detail=stale-if-error",
                true,
                Some(Forward::Stale),
            ),
            ("gratify; fwd=bypass", false, Some(Forward::Bypass)),
        ] {
            let s = CacheStatus::parse(text).unwrap();
            let e = s.cache("gratify").unwrap();
            assert_eq!((e.hit(), e.forward().cloned()), (hit, fwd), "{text}");
        }
    }

    #[test]
    fn lines_are_one_list_and_byte_sequences_are_base64() {
        let mut h = http::HeaderMap::new();
        h.append("cache-status", http::HeaderValue::from_static("a"));
        h.append("cache-status", http::HeaderValue::from_static(""));
        assert!(
            CacheStatus::from_headers(&h).is_err(),
            "a, is a trailing comma"
        );
        let mut h = http::HeaderMap::new();
        h.append("cache-status", http::HeaderValue::from_static("a; hit"));
        h.append(
            "cache-status",
            http::HeaderValue::from_static("b; fwd=miss"),
        );
        let s = CacheStatus::from_headers(&h).unwrap();
        assert_eq!(s.entries().len(), 2);
        assert!(CacheStatus::parse("a; x=:aGk=:").is_ok());
        for bad in ["a; x=:a:", "a; x=:=a==:", "a; x=:a=b=:"] {
            assert!(CacheStatus::parse(bad).is_err(), "{bad}");
        }
        // A key given twice: the last value.
        assert_eq!(
            CacheStatus::parse("a; ttl=1; ttl=2").unwrap().entries()[0].ttl(),
            Some(2)
        );
    }

    #[test]
    fn values_of_another_type_are_ignored_and_bad_lists_refused() {
        let s = CacheStatus::parse(r#"a; hit=?0; ttl="x"; fwd="stale"; fwd-status=503"#).unwrap();
        let e = &s.entries()[0];
        assert!(!e.hit());
        assert_eq!(
            (e.ttl(), e.forward(), e.forward_status()),
            (None, None, Some(503))
        );
        for bad in [
            "a,",
            "a b",
            "a; ttl=1.",
            "(a)",
            "a; hit=?2",
            "\"a",
            "a;;hit",
            ", a",
        ] {
            assert!(CacheStatus::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(CacheStatus::parse("").unwrap().entries().len(), 0);
    }

    fn entry() -> impl Strategy<Value = CacheStatusEntry> {
        (
            "[a-z*][a-z0-9_.:/-]{0,8}|[ -~]{0,10}",
            any::<bool>(),
            proptest::option::of("[a-z][a-z-]{0,8}"),
            proptest::option::of(100u16..600),
            proptest::option::of(-999_999_999_999_999i64..999_999_999_999_999),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of("[ -~]{0,12}"),
            proptest::option::of("[a-z][a-z0-9-]{0,8}|[ -~]{0,10}"),
        )
            .prop_map(
                |(cache, hit, fwd, fwd_status, ttl, stored, collapsed, key, detail)| {
                    CacheStatusEntry {
                        cache,
                        hit,
                        fwd: fwd.map(|f| Forward::from_token(&f)),
                        fwd_status,
                        ttl,
                        stored,
                        collapsed,
                        key,
                        detail,
                    }
                },
            )
    }

    proptest! {
        /// Any text: an answer or an error, never a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in "\\PC{0,60}") {
            let _ = CacheStatus::parse(&text);
        }

        /// Text made of the field's own characters reaches every path of
        /// the parser: an answer or an error, never a panic.
        #[test]
        fn field_like_text_parses_or_is_refused(text in "[a-z0-9;=:?\"*,. \t\\()/+-]{0,40}") {
            let _ = CacheStatus::parse(&text);
        }

        /// Whatever a member holds, what the writer writes parses.
        #[test]
        fn anything_written_parses(
            name in "\\PC{0,12}",
            detail in "\\PC{0,12}",
            ttl in any::<i64>(),
            fwd in "\\PC{0,8}",
        ) {
            let entry = CacheStatusEntry::new(name)
                .with_detail(detail)
                .with_ttl(ttl)
                .with_forward(Forward::Other(fwd));
            let text = entry.to_string();
            prop_assert!(CacheStatus::parse(&text).is_ok(), "{}", text);
        }

        /// What the writer writes, the parser reads back as it was.
        #[test]
        fn written_members_read_back(entries in proptest::collection::vec(entry(), 0..4)) {
            let status = CacheStatus { entries };
            let text = status.to_string();
            prop_assert_eq!(CacheStatus::parse(&text).unwrap(), status, "{}", text);
        }
    }
}
