//! KV requests: reads, prefix lists, acquire, release, check-and-set writes and deletes.

use base64::Engine as _;
use http::Method;
use serde::Deserialize;

use crate::api::reply::{bool_body, check_len, json_body, query_meta, success_body};
use crate::api::request::Target;
use crate::api::{
    ApiError, Blocking, ClientConfig, Consistency, Endpoint, Key, QueryReply, RequestClass, SessionId,
};

/// A stored KV entry as Consul reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPair {
    /// The key, as stored.
    pub key: String,
    /// The index at which the key was created.
    pub create_index: u64,
    /// The index of the key's last change.
    pub modify_index: u64,
    /// How many times a new session acquired the key (what Go exposes). Not a fencing token on
    /// its own: it restarts when the key is deleted; see
    /// [`FencingToken::sequence`](crate::machine::FencingToken::sequence).
    pub lock_index: u64,
    /// Opaque flags; locks and semaphores write their own marker here.
    pub flags: u64,
    /// The value's bytes (Consul's `null` and an empty value both give an empty vector).
    pub value: Vec<u8>,
    /// The session holding the key, if any.
    pub session: Option<SessionId>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct WireKvPair {
    key: String,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

impl WireKvPair {
    pub(crate) fn into_pair(self, what: &'static str) -> Result<KvPair, ApiError> {
        let value = match self.value {
            None => Vec::new(),
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| ApiError::Malformed {
                    what,
                    problem: format!("the value of {:?} is not base64: {e}", self.key),
                })?,
        };
        let session = match self.session {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(SessionId::new(s).map_err(|e| ApiError::Malformed {
                what,
                problem: format!("the session of {:?}: {e}", self.key),
            })?),
        };
        Ok(KvPair {
            key: self.key,
            create_index: self.create_index,
            modify_index: self.modify_index,
            lock_index: self.lock_index,
            flags: self.flags,
            value,
            session,
        })
    }
}

/// Decodes a KV read: 404 is an empty list (with metadata), 200 a JSON array of entries.
fn decode_pairs(
    what: &'static str,
    response: &http::Response<Vec<u8>>,
) -> Result<QueryReply<Vec<KvPair>>, ApiError> {
    check_len(what, response)?;
    if response.status() == http::StatusCode::NOT_FOUND {
        return Ok(QueryReply {
            value: Vec::new(),
            meta: query_meta(what, response)?,
        });
    }
    let body = success_body(what, response)?;
    let meta = query_meta(what, response)?;
    let wire: Option<Vec<WireKvPair>> = json_body(what, body)?;
    let value = wire
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.into_pair(what))
        .collect::<Result<_, _>>()?;
    Ok(QueryReply { value, meta })
}

/// `GET /v1/kv/<key>`: one key, optionally as a blocking read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvGet {
    /// The key to read.
    pub key: Key,
    /// Read consistency.
    pub consistency: Consistency,
    /// Block until the key's index moves past this one.
    pub blocking: Option<Blocking>,
}

impl KvGet {
    /// A plain read of `key`.
    pub fn new(key: Key) -> KvGet {
        KvGet {
            key,
            consistency: Consistency::Default,
            blocking: None,
        }
    }
}

impl Endpoint for KvGet {
    /// The entry (`None` for a missing key) and the metadata.
    type Output = QueryReply<Option<KvPair>>;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        Target::new(Method::GET, "kv/", self.key.as_str())
            .consistency(self.consistency)
            .blocking(self.blocking)
            .build(config, Vec::new())
    }

    fn class(&self) -> RequestClass {
        RequestClass::of_read(self.blocking)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<Self::Output, ApiError> {
        let QueryReply { value, meta } = decode_pairs("a KV read", response)?;
        if value.len() > 1 {
            return Err(ApiError::Malformed {
                what: "a KV read",
                problem: format!("expected at most one entry, got {}", value.len()),
            });
        }
        Ok(QueryReply {
            value: value.into_iter().next(),
            meta,
        })
    }
}

/// `GET /v1/kv/<prefix>?recurse`: every key under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvList {
    /// The prefix (a plain string prefix: `a/b` also lists `a/bc`).
    pub prefix: Key,
    /// Read consistency.
    pub consistency: Consistency,
    /// Block until an index under the prefix moves past this one.
    pub blocking: Option<Blocking>,
}

impl KvList {
    /// A plain list of `prefix`.
    pub fn new(prefix: Key) -> KvList {
        KvList {
            prefix,
            consistency: Consistency::Default,
            blocking: None,
        }
    }
}

impl Endpoint for KvList {
    /// The entries (empty when none) and the metadata.
    type Output = QueryReply<Vec<KvPair>>;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        Target::new(Method::GET, "kv/", self.prefix.as_str())
            .flag("recurse")
            .consistency(self.consistency)
            .blocking(self.blocking)
            .build(config, Vec::new())
    }

    fn class(&self) -> RequestClass {
        RequestClass::of_read(self.blocking)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<Self::Output, ApiError> {
        decode_pairs("a KV list", response)
    }
}

/// `PUT /v1/kv/<key>?acquire=<session>&flags=<flags>`: take the key for a session, writing the
/// value. Answers `true` when the session holds the key afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvAcquire {
    /// The key.
    pub key: Key,
    /// The acquiring session.
    pub session: SessionId,
    /// The flags to store.
    pub flags: u64,
    /// The value to store.
    pub value: Vec<u8>,
}

/// `PUT /v1/kv/<key>?release=<session>&flags=<flags>`: give the key up, writing the value.
/// Answers `true` when the key was released (or was not held by that session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvRelease {
    /// The key.
    pub key: Key,
    /// The holding session.
    pub session: SessionId,
    /// The flags to store.
    pub flags: u64,
    /// The value to store.
    pub value: Vec<u8>,
}

/// `PUT /v1/kv/<key>?cas=<index>&flags=<flags>`: write only if the key's `ModifyIndex` is still
/// `cas` (0: only if the key does not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCasPut {
    /// The key.
    pub key: Key,
    /// The expected `ModifyIndex`, or 0 to create.
    pub cas: u64,
    /// The flags to store.
    pub flags: u64,
    /// The value to store.
    pub value: Vec<u8>,
}

/// `DELETE /v1/kv/<key>?cas=<index>`: delete only if the key's `ModifyIndex` is still `cas`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCasDelete {
    /// The key.
    pub key: Key,
    /// The expected `ModifyIndex`.
    pub cas: u64,
}

/// `DELETE /v1/kv/<key>`: delete the key, whoever holds it (what Go's `KV.Delete` sends). Consul
/// answers `true` whether or not the key existed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvDelete {
    /// The key.
    pub key: Key,
}

/// The KV writes share one shape: a method, one parameter, maybe flags and a body, and a
/// `true`/`false` answer.
macro_rules! bool_write {
    ($ty:ty, $what:literal, |$s:ident| $target:expr, $body:expr) => {
        impl Endpoint for $ty {
            /// Whether Consul applied the write.
            type Output = bool;

            fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
                let $s = self;
                $target.build(config, $body)
            }

            fn decode(response: &http::Response<Vec<u8>>) -> Result<bool, ApiError> {
                bool_body($what, response)
            }
        }
    };
}

bool_write!(
    KvAcquire,
    "a KV acquire",
    |s| Target::new(Method::PUT, "kv/", s.key.as_str())
        .param("acquire", s.session.as_str())
        .param("flags", &s.flags.to_string()),
    s.value.clone()
);
bool_write!(
    KvRelease,
    "a KV release",
    |s| Target::new(Method::PUT, "kv/", s.key.as_str())
        .param("release", s.session.as_str())
        .param("flags", &s.flags.to_string()),
    s.value.clone()
);
bool_write!(
    KvCasPut,
    "a KV check-and-set",
    |s| Target::new(Method::PUT, "kv/", s.key.as_str())
        .param("cas", &s.cas.to_string())
        .param("flags", &s.flags.to_string()),
    s.value.clone()
);
bool_write!(
    KvDelete,
    "a KV delete",
    |s| Target::new(Method::DELETE, "kv/", s.key.as_str()),
    Vec::new()
);
bool_write!(
    KvCasDelete,
    "a KV check-and-delete",
    |s| Target::new(Method::DELETE, "kv/", s.key.as_str()).param("cas", &s.cas.to_string()),
    Vec::new()
);
