//! Just enough HTTP/1.1 for the test servers: read one request (request line, headers, and a
//! `Content-Length` or chunked body) off a connection, keeping its exact bytes.

use std::io::{self, BufRead, Read};

/// The largest request head (request line and headers) read.
const MAX_HEAD: usize = 64 * 1024;

/// The head of an HTTP/1.1 request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target: path and query (`/v1/kv/a?index=5`).
    pub target: String,
    /// The headers, names as sent.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(path, _)| path)
    }

    /// The query (after `?`), empty when there is none.
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, query)| query)
    }

    /// Whether the query has parameter `name` (with or without a value).
    pub fn has_param(&self, name: &str) -> bool {
        self.param(name).is_some()
    }

    /// The value of query parameter `name` (`""` for a bare flag), undecoded.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query()
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The value of header `name` (case-insensitive), the first if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A request read in full: its head, and its exact bytes (to forward as they came).
pub(crate) struct Request {
    pub(crate) head: RequestHead,
    pub(crate) raw: Vec<u8>,
    /// Where the body starts in `raw`.
    pub(crate) body_start: usize,
}

impl Request {
    /// The body as bytes, for a `Content-Length` body; `None` for a chunked one (the raw bytes
    /// keep the chunk framing).
    pub(crate) fn plain_body(&self) -> Option<&[u8]> {
        let chunked = self
            .head
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        (!chunked).then(|| &self.raw[self.body_start.min(self.raw.len())..])
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

/// Reads one line (up to `\n`) onto `raw`, returning it without the line end.
fn read_line(reader: &mut impl BufRead, raw: &mut Vec<u8>, head_len: &mut usize) -> io::Result<String> {
    let start = raw.len();
    let n = reader
        .take((MAX_HEAD - *head_len) as u64 + 1)
        .read_until(b'\n', raw)?;
    *head_len += n;
    if *head_len > MAX_HEAD {
        return Err(bad("request head too large"));
    }
    if n == 0 || raw.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-request",
        ));
    }
    let line = &raw[start..raw.len() - 1];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8(line.to_vec()).map_err(|_| bad("a request line that is not UTF-8"))
}

/// Reads one request; `None` when the connection ended cleanly before one began.
pub(crate) fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    if reader.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let mut raw = Vec::new();
    let mut head_len = 0;
    let mut line = read_line(reader, &mut raw, &mut head_len)?;
    // Tolerate empty lines before a request (RFC 9112 2.2).
    while line.is_empty() {
        line = read_line(reader, &mut raw, &mut head_len)?;
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(_version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("a malformed request line"));
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut raw, &mut head_len)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| bad("a malformed header"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let head = RequestHead {
        method,
        target,
        headers,
    };
    let body_start = raw.len();
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        read_chunked(reader, &mut raw)?;
    } else if let Some(length) = head.header("content-length") {
        let length: u64 = length.parse().map_err(|_| bad("a malformed Content-Length"))?;
        let read = reader.take(length).read_to_end(&mut raw)?;
        if read as u64 != length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-body",
            ));
        }
    }
    Ok(Some(Request {
        head,
        raw,
        body_start,
    }))
}

/// Reads a chunked body onto `raw`, as sent.
fn read_chunked(reader: &mut impl BufRead, raw: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let mut line_len = 0;
        let line = read_line(reader, raw, &mut line_len)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| bad("a malformed chunk size"))?;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let mut trailer_len = 0;
                if read_line(reader, raw, &mut trailer_len)?.is_empty() {
                    return Ok(());
                }
            }
        }
        // The chunk and its CRLF.
        let want = size + 2;
        let read = reader.take(want).read_to_end(raw)?;
        if read as u64 != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-chunk",
            ));
        }
    }
}
