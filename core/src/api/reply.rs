//! What every reply shares: the body cap, the query metadata headers and the error type.

use std::time::Duration;

/// The largest reply body the decoders accept. Consul caps a KV value at 512 KiB; a prefix list
/// (a semaphore's contenders) can hold many, so the cap leaves room for a few thousand of them.
/// Drivers should stop reading a body past this size and report [`ApiError::TooLarge`].
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// How much of an error body is kept in an [`ApiError::Status`].
pub const MAX_ERROR_BODY_CHARS: usize = 512;

/// The metadata Consul attaches to read replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryMeta {
    /// `X-Consul-Index`: the index to pass to the next blocking read (0 when absent).
    pub index: u64,
    /// `X-Consul-KnownLeader`: whether the answering server knew of a leader.
    pub known_leader: Option<bool>,
    /// `X-Consul-LastContact`: how stale the answer may be.
    pub last_contact: Option<Duration>,
}

/// A read's decoded value with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryReply<T> {
    /// The decoded value.
    pub value: T,
    /// The reply's metadata.
    pub meta: QueryMeta,
}

/// A reply that is not the answer asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Consul answered with a non-success status.
    #[error("Consul answered HTTP {status}: {body}")]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The body, as text, truncated to [`MAX_ERROR_BODY_CHARS`].
        body: String,
    },
    /// A redirect (3xx). Consul's HTTP API never redirects, so the reply came from something
    /// else (a proxy, a misconfigured address); it is not followed, so that the ACL token is
    /// never sent to where it points.
    #[error(
        "the agent answered HTTP {status} redirecting to {location:?}; Consul's HTTP API does not \
         redirect, so the redirect was not followed: check the address (CONSUL_HTTP_ADDR) and any \
         proxy in front of the agent"
    )]
    Redirect {
        /// The HTTP status code (300-399).
        status: u16,
        /// The `Location` header as sent (truncated), or `<none>`.
        location: String,
    },
    /// No answer could be had: the TLS handshake with the agent failed in a way that retrying
    /// with the same settings can't fix (see
    /// [`TransportErrorKind::TlsRefused`](crate::machine::TransportErrorKind::TlsRefused)).
    #[error(
        "the TLS handshake with the Consul agent failed ({message}): check CONSUL_CACERT or \
         CONSUL_CAPATH, CONSUL_TLS_SERVER_NAME, CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY, and that \
         the address speaks TLS"
    )]
    TlsRefused {
        /// The TLS library's words.
        message: String,
    },
    /// The body exceeds [`MAX_REPLY_BYTES`].
    #[error("Consul's reply to {what} is {len} bytes, over the {limit}-byte cap")]
    TooLarge {
        /// What was asked.
        what: &'static str,
        /// The body's length.
        len: usize,
        /// The cap.
        limit: usize,
    },
    /// A success status with a body or header that does not parse.
    #[error("malformed reply from Consul to {what}: {problem}")]
    Malformed {
        /// What was asked.
        what: &'static str,
        /// What did not parse.
        problem: String,
    },
}

impl ApiError {
    /// The HTTP status, when Consul answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } | ApiError::Redirect { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Consul's 500 for an acquire or release naming a session it does not know.
    pub fn is_invalid_session(&self) -> bool {
        matches!(self, ApiError::Status { status: 500, body } if body.contains("invalid session"))
    }

    /// Consul's refusal for want of an ACL permission (403, or a 500 naming it), or for a token
    /// it does not know (`ACL not found`): retrying with the same token can't succeed.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, ApiError::Status { status: 403 | 500, body }
            if body.contains("Permission denied") || body.contains("ACL not found"))
    }

    /// Consul's 500 while its servers have no leader (an election is under way).
    pub fn is_no_leader(&self) -> bool {
        matches!(self, ApiError::Status { status: 500, body } if body.contains("No cluster leader"))
    }

    /// Whether asking again later may succeed: 5xx and 429 statuses, and garbled replies.
    /// A 4xx means the request itself is wrong (or forbidden) and will stay so.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Status { status, .. } => *status >= 500 || *status == 429,
            // Asking the same address again gets the same redirect, or the same handshake.
            ApiError::Redirect { .. } | ApiError::TlsRefused { .. } => false,
            ApiError::TooLarge { .. } | ApiError::Malformed { .. } => true,
        }
    }
}

/// Checks the cap and the status, giving the body of a 2xx reply.
pub(crate) fn success_body<'r>(
    what: &'static str,
    response: &'r http::Response<Vec<u8>>,
) -> Result<&'r [u8], ApiError> {
    check_len(what, response)?;
    if response.status().is_success() {
        Ok(response.body())
    } else {
        Err(status_error(response))
    }
}

/// The cap check alone, for replies whose non-2xx statuses carry meaning (404).
pub(crate) fn check_len(what: &'static str, response: &http::Response<Vec<u8>>) -> Result<(), ApiError> {
    let len = response.body().len();
    if len > MAX_REPLY_BYTES {
        return Err(ApiError::TooLarge {
            what,
            len,
            limit: MAX_REPLY_BYTES,
        });
    }
    Ok(())
}

/// The error for a non-success reply.
pub(crate) fn status_error(response: &http::Response<Vec<u8>>) -> ApiError {
    if response.status().is_redirection() {
        let location = response.headers().get(http::header::LOCATION).map_or_else(
            || "<none>".to_owned(),
            |l| String::from_utf8_lossy(l.as_bytes()).into_owned(),
        );
        return ApiError::Redirect {
            status: response.status().as_u16(),
            location: truncate(&location, 200),
        };
    }
    let text = String::from_utf8_lossy(response.body());
    ApiError::Status {
        status: response.status().as_u16(),
        body: truncate(text.trim(), MAX_ERROR_BODY_CHARS),
    }
}

/// At most `max` characters of `s`, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// Reads the metadata headers. A header that is present but garbled is an error: the index
/// drives blocking reads, and guessing it would make the next read wrong.
pub(crate) fn query_meta(
    what: &'static str,
    response: &http::Response<Vec<u8>>,
) -> Result<QueryMeta, ApiError> {
    let header = |name: &str| -> Result<Option<&str>, ApiError> {
        match response.headers().get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim()))
                .map_err(|_| ApiError::Malformed {
                    what,
                    problem: format!("header {name} is not text"),
                }),
        }
    };
    let number = |name: &str| -> Result<Option<u64>, ApiError> {
        header(name)?
            .map(|v| {
                v.parse::<u64>().map_err(|_| ApiError::Malformed {
                    what,
                    problem: format!("header {name} is {:?}, not an unsigned integer", truncate(v, 40)),
                })
            })
            .transpose()
    };
    let known_leader = match header("X-Consul-KnownLeader")? {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::Malformed {
                what,
                problem: format!("header X-Consul-KnownLeader is {:?}", truncate(other, 40)),
            });
        }
    };
    Ok(QueryMeta {
        index: number("X-Consul-Index")?.unwrap_or(0),
        known_leader,
        last_contact: number("X-Consul-LastContact")?.map(Duration::from_millis),
    })
}

/// Decodes a `true`/`false` body (KV writes, session destroy).
pub(crate) fn bool_body(what: &'static str, response: &http::Response<Vec<u8>>) -> Result<bool, ApiError> {
    let body = success_body(what, response)?;
    match std::str::from_utf8(body).map(str::trim) {
        Ok("true") => Ok(true),
        Ok("false") => Ok(false),
        _ => Err(ApiError::Malformed {
            what,
            problem: format!(
                "expected true or false, got {:?}",
                truncate(&String::from_utf8_lossy(body), 60)
            ),
        }),
    }
}

/// Decodes a JSON body.
pub(crate) fn json_body<'a, T: serde::Deserialize<'a>>(
    what: &'static str,
    body: &'a [u8],
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Malformed {
        what,
        problem: format!("invalid JSON: {e}"),
    })
}
