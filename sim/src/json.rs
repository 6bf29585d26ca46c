//! JSON as Go's `encoding/json` writes it: struct fields in declaration order, HTML-safe string
//! escapes, and (Consul's `?pretty` and dev mode) `MarshalIndent` with four spaces plus a newline.

/// A JSON value with ordered object fields.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    pub(crate) fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    /// Encodes like `json.Marshal`, or like `json.MarshalIndent(v, "", "    ")` followed by a
    /// newline when `pretty`.
    pub(crate) fn encode(&self, pretty: bool) -> Vec<u8> {
        let mut out = String::new();
        self.write(&mut out, pretty, 0);
        if pretty {
            out.push('\n');
        }
        out.into_bytes()
    }

    fn write(&self, out: &mut String, pretty: bool, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if pretty {
                out.push('\n');
                for _ in 0..depth {
                    out.push_str("    ");
                }
            }
        };
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::U64(n) => out.push_str(&n.to_string()),
            Json::I64(n) => out.push_str(&n.to_string()),
            Json::Str(s) => write_string(out, s),
            Json::Arr(items) => {
                out.push('[');
                if !items.is_empty() {
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        newline(out, depth + 1);
                        item.write(out, pretty, depth + 1);
                    }
                    newline(out, depth);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                if !fields.is_empty() {
                    for (i, (name, value)) in fields.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        newline(out, depth + 1);
                        write_string(out, name);
                        out.push(':');
                        if pretty {
                            out.push(' ');
                        }
                        value.write(out, pretty, depth + 1);
                    }
                    newline(out, depth);
                }
                out.push('}');
            }
        }
    }
}

/// A Go JSON string: `"`, `\`, `\n`, `\r`, `\t` escaped; other control characters, `<`, `>`, `&`,
/// U+2028 and U+2029 as `\u00XX`.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c if c < ' ' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Standard base64 with padding, as Go encodes a `[]byte`.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[usize::try_from((n >> shift) & 63).unwrap_or(0)]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// The value of a standard base64 character.
fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Go's `base64.StdEncoding.DecodeString`, as `encoding/json` decodes a `[]byte`: padding
/// required, `\r` and `\n` skipped, not strict about the unused bits. `Err`: the offset Go's
/// `CorruptInputError` names (`illegal base64 data at input byte N`).
///
/// ```
/// assert_eq!(consul_lock_sim::base64_decode(b"aGk="), Ok(b"hi".to_vec()));
/// assert_eq!(consul_lock_sim::base64_decode(b"a!=="), Err(1));
/// ```
pub fn base64_decode(src: &[u8]) -> Result<Vec<u8>, usize> {
    let is_newline = |c: u8| c == b'\n' || c == b'\r';
    let mut out = Vec::with_capacity(src.len() / 4 * 3);
    let mut si = 0;
    // Go's `decodeQuantum`, one quantum of four characters at a time.
    while si < src.len() {
        let mut quantum = [0u8; 4];
        let mut len = 0;
        let mut trailing = None;
        while len < 4 {
            let Some(&c) = src.get(si) else {
                return if len == 0 { Ok(out) } else { Err(si - len) };
            };
            si += 1;
            if let Some(v) = base64_value(c) {
                quantum[len] = v;
                len += 1;
                continue;
            }
            if is_newline(c) {
                continue;
            }
            if c != b'=' || len < 2 {
                return Err(si - 1);
            }
            if len == 2 {
                // "==" expected: the first "=" is consumed.
                while src.get(si).copied().is_some_and(is_newline) {
                    si += 1;
                }
                match src.get(si) {
                    None => return Err(src.len()),
                    Some(b'=') => si += 1,
                    Some(_) => return Err(si - 1),
                }
            }
            while src.get(si).copied().is_some_and(is_newline) {
                si += 1;
            }
            if si < src.len() {
                trailing = Some(si);
            }
            break;
        }
        let n = quantum.iter().fold(0u32, |acc, v| (acc << 6) | u32::from(*v));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..len]);
        if let Some(at) = trailing {
            return Err(at);
        }
        if len < 4 {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_pretty_match_go() {
        let v = Json::Arr(vec![Json::Obj(vec![
            ("Key", Json::str("a<b>&\u{1}\u{2028}é")),
            ("Value", Json::Null),
            ("List", Json::Arr(vec![])),
        ])]);
        assert_eq!(
            String::from_utf8(v.encode(false)).unwrap_or_default(),
            r#"[{"Key":"a\u003cb\u003e\u0026\u0001\u2028é","Value":null,"List":[]}]"#
        );
        assert_eq!(
            String::from_utf8(v.encode(true)).unwrap_or_default(),
            "[\n    {\n        \"Key\": \"a\\u003cb\\u003e\\u0026\\u0001\\u2028é\",\n        \"Value\": null,\n        \"List\": []\n    }\n]\n"
        );
        assert_eq!(Json::Bool(true).encode(true), b"true\n");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"v1"), "djE=");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn base64_decodes_like_go() {
        for bytes in [&b""[..], b"v", b"v1", b"abc", b"hello", &[0xff, 0xfe, 0x00, 0x01]] {
            assert_eq!(base64_decode(base64(bytes).as_bytes()), Ok(bytes.to_vec()));
        }
        assert_eq!(base64_decode(b"aG\nk=\r\n"), Ok(b"hi".to_vec()));
        // Offsets as Go's `CorruptInputError` gives them (checked against Go 1.14).
        assert_eq!(base64_decode(b"!!"), Err(0));
        assert_eq!(base64_decode(b"aGk"), Err(0));
        assert_eq!(base64_decode(b"aGk=x"), Err(4));
        assert_eq!(base64_decode(b"aGVsbG8"), Err(4));
        assert_eq!(base64_decode(b"a==="), Err(1));
        assert_eq!(base64_decode(b"aG="), Err(3));
        assert_eq!(base64_decode(b"aG=x"), Err(2));
    }
}
