//! The seed format of `decode_replies`: an HTTP/1.x response as `curl -si` prints it.
//!
//! ```text
//! HTTP/1.1 200 OK\r\n
//! X-Consul-Index: 16\r\n
//! X-Consul-Knownleader: true\r\n
//! \r\n
//! [{"Key":"fuzz/lock", ...}]
//! ```
//!
//! Parsing is lenient, so that every mutation of a seed still means a reply:
//! - the status is the first run of ASCII digits on the first line after its first space
//!   (`HTTP/1.1 404 Not Found` -> 404); no digits -> 200; a number outside 100..=599 is folded
//!   into it (`100 + n % 500`);
//! - then one header per line (`\r\n` or `\n`) up to the first empty line: the name is what comes
//!   before the first `:` (trimmed), the value what comes after it (leading spaces and tabs
//!   dropped, like HTTP does; the trailing `\r` is dropped). A line without `:`, or whose name or
//!   value `http` refuses, is skipped;
//! - everything after the empty line is the body, byte for byte (no empty line: no body).

/// Whether `data` is in this format (it starts with `HTTP/`).
pub fn is_http_text(data: &[u8]) -> bool {
    data.starts_with(b"HTTP/")
}

/// Folds any number into Consul's status range, 100..=599.
pub fn fold_status(n: u64) -> u16 {
    if (100..=599).contains(&n) {
        n as u16
    } else {
        (100 + n % 500) as u16
    }
}

fn split_line(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&c| c == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Parses `data` (see the module's doc); never fails.
pub fn parse(data: &[u8]) -> http::Response<Vec<u8>> {
    let (status_line, mut rest) = split_line(data);
    let after_space = status_line
        .iter()
        .position(|&c| c == b' ')
        .map_or(&[][..], |at| &status_line[at + 1..]);
    let digits: Vec<u8> = after_space
        .iter()
        .copied()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(u8::is_ascii_digit)
        .take(6)
        .collect();
    let status = if digits.is_empty() {
        200
    } else {
        let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        fold_status(n)
    };
    let mut builder = http::Response::builder().status(status);
    let mut body = Vec::new();
    while let Some(data) = rest {
        let (line, next) = split_line(data);
        let line = strip_cr(line);
        if line.is_empty() {
            body = next.unwrap_or_default().to_vec();
            break;
        }
        rest = next;
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = &line[colon + 1..];
        let value = &value[value.iter().take_while(|c| matches!(c, b' ' | b'\t')).count()..];
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    match builder.body(body) {
        Ok(response) => response,
        // Only a bad status fails, and the status is always in range.
        Err(e) => unreachable!("fuzz harness bug: {e}"),
    }
}

/// Writes `response` in this format (the inverse of [`parse`] for the headers it keeps).
pub fn write(response: &http::Response<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let status = response.status();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(response.body());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_curl_output() {
        let r = parse(
            b"HTTP/1.1 404 Not Found\r\nX-Consul-Index: 7\r\nX-Consul-Knownleader: true\r\n\r\nbody\r\n",
        );
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-consul-index"], "7");
        assert_eq!(r.headers()["X-Consul-KnownLeader"], "true");
        assert_eq!(r.body(), b"body\r\n");
    }

    #[test]
    fn lenient() {
        assert_eq!(parse(b"HTTP/").status(), 200);
        assert_eq!(parse(b"HTTP/1.1 999 x").status(), 100 + 999 % 500);
        assert_eq!(
            parse(b"HTTP/1.1 42\nno colon\n: empty name\nA: \x01\nB:\tv\n\nrest")
                .headers()
                .len(),
            1
        );
        assert_eq!(parse(b"HTTP/1.1 200\nB: v").body(), b"");
        let r = parse(b"HTTP/1.1 200 OK\nX: 1\n\n[]");
        assert_eq!(parse(&write(&r)).headers(), r.headers());
        assert_eq!(parse(&write(&r)).body(), r.body());
    }
}
