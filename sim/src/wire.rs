//! The HTTP layer as Go's `net/http` and Consul's handlers see a request: percent-decoding of the
//! path and query (`url.ParseQuery`, `&` and `;` separators), `ServeMux` path cleaning, and the
//! replies (plain-text errors, JSON, metadata headers).

use http::header::{HeaderName, HeaderValue};

use crate::json::Json;

/// A reply under construction.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    /// A reply without a body (and without a content type).
    pub(crate) fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![("Vary", "Accept-Encoding".to_owned())],
            body: Vec::new(),
        }
    }

    /// A plain-text error as Consul writes them (`fmt.Fprint` after `WriteHeader`).
    pub(crate) fn text(status: u16, message: impl Into<String>) -> Reply {
        let mut reply = Reply::empty(status);
        reply.header("Content-Type", "text/plain; charset=utf-8");
        reply.body = message.into().into_bytes();
        reply
    }

    /// A JSON body.
    pub(crate) fn json(value: &Json, pretty: bool) -> Reply {
        let mut reply = Reply::empty(200);
        reply.header("Content-Type", "application/json");
        reply.body = value.encode(pretty);
        reply
    }

    pub(crate) fn header(&mut self, name: &'static str, value: impl Into<String>) {
        self.headers.push((name, value.into()));
    }

    /// `X-Consul-Index` (never 0: Consul answers 1 instead), `X-Consul-KnownLeader`,
    /// `X-Consul-LastContact`.
    pub(crate) fn with_meta(mut self, index: u64, known_leader: bool, last_contact_ms: u64) -> Reply {
        self.header("X-Consul-Index", index.max(1).to_string());
        self.header(
            "X-Consul-KnownLeader",
            if known_leader { "true" } else { "false" },
        );
        self.header("X-Consul-LastContact", last_contact_ms.to_string());
        self
    }

    /// The `http` response. A header that `http` refuses is left out rather than panicking (the
    /// simulator only writes ASCII values, so this does not happen).
    pub(crate) fn into_response(self) -> http::Response<Vec<u8>> {
        let mut response = http::Response::new(self.body);
        *response.status_mut() =
            http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                response.headers_mut().append(name, value);
            }
        }
        response
    }
}

/// A decoded query string: the pairs in order (Go keeps every value of a repeated name).
#[derive(Clone, Debug, Default)]
pub(crate) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Go's `url.ParseQuery`; `None` when a pair has a bad `%` escape (Consul then answers 500
    /// with an empty body: "Failed to decode query").
    pub(crate) fn parse(raw: &str) -> Option<Query> {
        let mut pairs = Vec::new();
        let mut failed = false;
        for part in raw.split(['&', ';']) {
            if part.is_empty() {
                continue;
            }
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match (unescape(key, true), unescape(value, true)) {
                (Some(k), Some(v)) => pairs.push((lossy(k), lossy(v))),
                _ => failed = true,
            }
        }
        if failed { None } else { Some(Query { pairs }) }
    }

    /// Whether the parameter is present, with or without a value (`?recurse`).
    pub(crate) fn has(&self, name: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == name)
    }

    /// The first value, or `""` (Go's `Values.Get`).
    pub(crate) fn get(&self, name: &str) -> &str {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Go's `Values.Encode`: names sorted, values in order, query-escaped.
    pub(crate) fn encode(&self) -> String {
        let mut names: Vec<&str> = self.pairs.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let mut out = String::new();
        for name in names {
            for (_, value) in self.pairs.iter().filter(|(k, _)| k == name) {
                if !out.is_empty() {
                    out.push('&');
                }
                out.push_str(&query_escape(name));
                out.push('=');
                out.push_str(&query_escape(value));
            }
        }
        out
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Go's `url.unescape`: `%XX` decoded, `+` a space in a query; `None` on a bad escape.
pub(crate) fn unescape(s: &str, query: bool) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if query => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

/// The path, percent-decoded (invalid UTF-8 replaced); `None` on a bad escape, which Go's server
/// refuses with `400 Bad Request` before any handler runs.
pub(crate) fn decode_path(raw: &str) -> Option<String> {
    unescape(raw, false).map(lossy)
}

const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(UPPER_HEX[usize::from(b >> 4)]));
    out.push(char::from(UPPER_HEX[usize::from(b & 15)]));
}

/// Go's `url.QueryEscape`.
pub(crate) fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => push_escaped(&mut out, b),
        }
    }
    out
}

/// Go's path escaping (`url.URL.EscapedPath` without a raw path).
pub(crate) fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z'
            | b'A'..=b'Z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'~'
            | b'$'
            | b'&'
            | b'+'
            | b','
            | b'/'
            | b':'
            | b';'
            | b'='
            | b'@' => out.push(char::from(b)),
            _ => push_escaped(&mut out, b),
        }
    }
    out
}

/// `net/http`'s `cleanPath`: `path.Clean`, keeping a trailing slash.
pub(crate) fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".to_owned();
    }
    let mut stack: Vec<&str> = Vec::new();
    for segment in p.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    let mut cleaned = format!("/{}", stack.join("/"));
    if p.ends_with('/') && cleaned != "/" {
        cleaned.push('/');
    }
    cleaned
}

/// `http.Redirect` with 301, as `ServeMux` sends it for an unclean path.
pub(crate) fn redirect(method: &http::Method, path: &str, raw_query: &str) -> Reply {
    let mut location = path_escape(path);
    if !raw_query.is_empty() {
        location.push('?');
        location.push_str(raw_query);
    }
    let mut reply = Reply {
        status: 301,
        headers: Vec::new(),
        body: Vec::new(),
    };
    if *method == http::Method::GET || *method == http::Method::HEAD {
        reply.header("Content-Type", "text/html; charset=utf-8");
        let escaped = location
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&#34;")
            .replace('\'', "&#39;");
        reply.body = format!("<a href=\"{escaped}\">Moved Permanently</a>.\n\n").into_bytes();
    }
    reply.header("Location", location);
    reply
}

/// Go's `strconv.Quote` (close enough: control characters escaped, the rest kept).
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `strconv.ParseUint(s, 10, 64)`, with its error text.
pub(crate) fn parse_uint(s: &str) -> Result<u64, String> {
    let syntax = || format!("strconv.ParseUint: parsing {}: invalid syntax", go_quote(s));
    if s.is_empty() {
        return Err(syntax());
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return Err(syntax());
        }
        n = match n.checked_mul(10).and_then(|n| n.checked_add(u64::from(b - b'0'))) {
            Some(n) => n,
            None => {
                return Err(format!(
                    "strconv.ParseUint: parsing {}: value out of range",
                    go_quote(s)
                ));
            }
        };
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_like_go() {
        let q = Query::parse("recurse&acquire=a%2Fb&x=1;y=a+b&flags=").unwrap_or_default();
        assert!(q.has("recurse") && q.has("flags") && !q.has("cas"));
        assert_eq!(q.get("acquire"), "a/b");
        assert_eq!(q.get("y"), "a b");
        assert_eq!(q.get("recurse"), "");
        assert!(Query::parse("x=%zz").is_none());
        assert_eq!(
            Query::parse("release=x&cas=1").map(|q| q.encode()),
            Some("cas=1&release=x".to_owned())
        );
        assert_eq!(
            Query::parse("recurse&cas=1").map(|q| q.encode()),
            Some("cas=1&recurse=".to_owned())
        );
    }

    #[test]
    fn paths_clean_like_go() {
        assert_eq!(clean_path("/v1/kv/a//b"), "/v1/kv/a/b");
        assert_eq!(clean_path("/v1/kv/a/../b"), "/v1/kv/b");
        assert_eq!(clean_path("/v1/kv/a/"), "/v1/kv/a/");
        assert_eq!(clean_path("/v1/kv/"), "/v1/kv/");
        assert_eq!(clean_path("/"), "/");
        assert_eq!(
            decode_path("/v1/kv/a%2Fb%20c+d").as_deref(),
            Some("/v1/kv/a/b c+d")
        );
        assert_eq!(decode_path("/v1/kv/a%zz"), None);
    }

    #[test]
    fn uints_parse_like_go() {
        assert_eq!(parse_uint("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_uint("18446744073709551616"),
            Err("strconv.ParseUint: parsing \"18446744073709551616\": value out of range".to_owned())
        );
        assert_eq!(
            parse_uint(" 5"),
            Err("strconv.ParseUint: parsing \" 5\": invalid syntax".to_owned())
        );
        assert!(parse_uint("").is_err() && parse_uint("-1").is_err());
    }
}
