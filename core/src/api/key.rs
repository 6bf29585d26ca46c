//! KV keys: validation and URI escaping.
//!
//! What a key may be, and why:
//! - One leading `/` is dropped, as Go's client does (`strings.TrimPrefix(key, "/")`), so that
//!   `/service/leader` and `service/leader` name the same key in Rust and Go programs alike.
//! - An empty key (or a lone `/`) is refused: `/v1/kv/` names the whole store, not a key.
//! - `.` and `..` segments and empty interior segments (`a//b`) are refused: HTTP stacks on both
//!   sides normalise such paths (Consul's Go router redirects them, and URL libraries fold dot
//!   segments even when percent-encoded), so the key that reached Consul would not be the key
//!   that was asked for.
//! - Anything else, spaces, `?`, `#`, `%`, control characters and non-ASCII included, is allowed
//!   and percent-encoded on the wire, and round-trips.
//! - The key, once percent-encoded, may take at most [`Key::MAX_ENCODED_LEN`] bytes (32 KiB). A
//!   request URI can take at most 65,534 bytes (the `http` crate's limit), and non-ASCII text
//!   grows up to three times under percent-encoding (a CJK character is 3 UTF-8 bytes, 9 encoded
//!   characters). The rest of the URI budget is left for what a request adds to the key: the base
//!   URL, a semaphore's `/<session>` or `/.lock` child key, and the query (session, flags, index,
//!   wait, and the bounded `dc`, `ns` and `partition`; see [`ClientConfig::check`]). Consul itself
//!   sets no limit of its own on key length below this.
//!
//! [`ClientConfig::check`]: crate::api::ClientConfig::check

use std::fmt;

/// A validated Consul KV key (see the [module docs](self) for the rules).
///
/// ```
/// # use consul_lock_core::api::Key;
/// let key = Key::new("/service/leader").unwrap();
/// assert_eq!(key.as_str(), "service/leader");
/// assert!(Key::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

/// Why a string is not a usable key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing left after the leading `/`.
    #[error("the key is empty; give a key such as \"service/leader\"")]
    Empty,
    /// A `.` or `..` segment, or an empty segment between two `/`.
    #[error(
        "the key {key:?} has a {segment:?} segment, which HTTP path normalisation would rewrite; \
         remove it"
    )]
    BadSegment {
        /// The key as given (truncated).
        key: String,
        /// The offending segment.
        segment: String,
    },
    /// The key is longer than [`Key::MAX_ENCODED_LEN`] once percent-encoded.
    #[error(
        "the key is too long once encoded for a URI: {encoded_len} bytes percent-encoded, the \
         limit is {limit} (non-ASCII characters take 2-4 bytes each, 3 encoded characters per \
         byte); use a shorter key"
    )]
    TooLong {
        /// The key's length once percent-encoded.
        encoded_len: usize,
        /// The most allowed.
        limit: usize,
    },
}

impl Key {
    /// The most bytes a key may take once percent-encoded (32 KiB): half of the `http` crate's
    /// URI limit, leaving the other half for the rest of any request (see the
    /// [module docs](self)).
    pub const MAX_ENCODED_LEN: usize = 32 * 1024;

    /// What a machine's derived key (`<prefix>/<session>`, `<prefix>/.lock`, or a queued lock's
    /// entry `<key>/.queue/<session>`) may add to a valid key: `/.queue`, `/` and a session ID
    /// of at most [`SessionId::MAX_LEN`] bytes, encoded.
    ///
    /// [`SessionId::MAX_LEN`]: crate::api::SessionId::MAX_LEN
    pub(crate) const CHILD_ROOM: usize = "/.queue".len() + 1 + 3 * crate::api::SessionId::MAX_LEN;

    /// Validates `key`, dropping one leading `/`.
    pub fn new(key: impl Into<String>) -> Result<Key, KeyError> {
        Key::with_limit(key.into(), Key::MAX_ENCODED_LEN)
    }

    /// [`Key::new`], allowing `limit` encoded bytes.
    fn with_limit(mut key: String, limit: usize) -> Result<Key, KeyError> {
        if key.starts_with('/') {
            key.remove(0);
        }
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        let encoded_len = encoded_len(&key, true);
        if encoded_len > limit {
            return Err(KeyError::TooLong { encoded_len, limit });
        }
        let segments: Vec<&str> = key.split('/').collect();
        let last = segments.len() - 1;
        for (i, segment) in segments.iter().enumerate() {
            // A trailing `/` (a "folder" key) is fine; an empty segment elsewhere is not.
            let empty_inside = segment.is_empty() && i != last;
            if *segment == "." || *segment == ".." || empty_inside {
                return Err(KeyError::BadSegment {
                    key: crate::api::reply::truncate(&key, 200),
                    segment: (*segment).to_owned(),
                });
            }
        }
        Ok(Key(key))
    }

    /// `self/child`, validated.
    ///
    /// ```
    /// # use consul_lock_core::api::Key;
    /// let key = Key::new("jobs/nightly").unwrap().join(".lock").unwrap();
    /// assert_eq!(key.as_str(), "jobs/nightly/.lock");
    /// ```
    pub fn join(&self, child: &str) -> Result<Key, KeyError> {
        let base = self.0.trim_end_matches('/');
        Key::new(format!("{base}/{}", child.trim_start_matches('/')))
    }

    /// [`join`](Self::join) for a machine's own child keys: the result may exceed
    /// [`Key::MAX_ENCODED_LEN`] by [`Key::CHILD_ROOM`], which the URI budget provides for, so
    /// that any valid prefix has room for `/.lock` and `/<session>`.
    pub(crate) fn child(&self, child: &str) -> Result<Key, KeyError> {
        let base = self.0.trim_end_matches('/');
        Key::with_limit(
            format!("{base}/{}", child.trim_start_matches('/')),
            Key::MAX_ENCODED_LEN + Key::CHILD_ROOM,
        )
    }

    /// The key's length once percent-encoded, as it travels in a URI path.
    pub fn encoded_len(&self) -> usize {
        encoded_len(&self.0, true)
    }

    /// The key as Consul stores it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Key, KeyError> {
        Key::new(s)
    }
}

/// The length of `s` once [`percent_encode`]d.
pub(crate) fn encoded_len(s: &str, keep_slash: bool) -> usize {
    s.bytes()
        .map(|b| if is_kept(b, keep_slash) { 1 } else { 3 })
        .sum()
}

/// Whether [`percent_encode`] writes `b` as itself.
fn is_kept(b: u8, keep_slash: bool) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/')
}

/// Appends `s` percent-encoded: every byte but the unreserved ones (RFC 3986) and, when
/// `keep_slash`, `/`. The output is always valid in a URI path or query.
pub(crate) fn percent_encode(s: &str, keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if is_kept(b, keep_slash) {
            out.push(char::from(b));
        } else {
            out.push('%');
            // `b >> 4` and `b & 0xf` are below 16: the indexing can't go out of bounds.
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn leading_slash_is_dropped_once() {
        assert_eq!(Key::new("/a/b").map(|k| k.0), Ok("a/b".to_owned()));
        assert!(matches!(
            Key::new("//a"),
            Err(KeyError::Empty) | Err(KeyError::BadSegment { .. })
        ));
        assert_eq!(Key::new("/"), Err(KeyError::Empty));
        assert_eq!(Key::new(""), Err(KeyError::Empty));
    }

    #[test]
    fn dot_and_empty_segments_are_refused() {
        for bad in ["a/./b", "a/../b", "..", ".", "a//b", "a/.."] {
            assert!(matches!(Key::new(bad), Err(KeyError::BadSegment { .. })), "{bad}");
        }
        for good in ["a/", "a/b/", ".lock", "a/.lock", "a b?#%é/ü", "...", "a/.../b"] {
            assert!(Key::new(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn join_makes_child_keys() {
        let k = Key::new("a/").and_then(|k| k.join("/.lock")).map(|k| k.0);
        assert_eq!(k, Ok("a/.lock".to_owned()));
    }

    #[test]
    fn encoding_escapes_reserved_and_non_ascii() {
        let mut out = String::new();
        percent_encode("a b?#%/é", true, &mut out);
        assert_eq!(out, "a%20b%3F%23%25/%C3%A9");
        out.clear();
        percent_encode("a/b", false, &mut out);
        assert_eq!(out, "a%2Fb");
    }

    fn decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn encoding_round_trips_and_is_uri_safe(s in ".*") {
            let mut out = String::new();
            percent_encode(&s, true, &mut out);
            prop_assert!(out.bytes().all(|b| b.is_ascii_graphic()));
            prop_assert!(!out.contains(['?', '#', ' ']));
            prop_assert_eq!(decode(&out), s.as_bytes().to_vec());
        }

        #[test]
        fn key_validation_never_panics(s in ".*") {
            let _ = Key::new(s);
        }
    }
}
