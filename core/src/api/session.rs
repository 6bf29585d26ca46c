//! Session requests: create, renew, destroy, info.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use http::Method;
use serde::Deserialize;

use crate::api::reply::{bool_body, check_len, json_body, query_meta, success_body, truncate};
use crate::api::request::Target;
use crate::api::{ApiError, Blocking, ClientConfig, Consistency, Endpoint, QueryReply, RequestClass};

/// A session's ID, as Consul issued it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

/// Why a string can't be a session ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSessionId {
    /// The ID is empty.
    #[error("the session ID is empty")]
    Empty,
    /// The ID holds white space or control characters, which Consul never issues.
    #[error("the session ID {0:?} holds white space or control characters; Consul's IDs are UUIDs")]
    BadCharacters(String),
    /// The ID is longer than [`SessionId::MAX_LEN`], which no Consul ID is.
    #[error(
        "the session ID is {len} bytes long; Consul's IDs are 36-byte UUIDs and at most {limit} \
         bytes are accepted"
    )]
    TooLong {
        /// The ID's length in bytes.
        len: usize,
        /// The most allowed.
        limit: usize,
    },
}

impl SessionId {
    /// The longest ID accepted, in bytes (Consul's are 36-byte UUIDs): the ID travels in URIs
    /// (`acquire=`, a semaphore's `<prefix>/<session>` key), whose length is bounded.
    pub const MAX_LEN: usize = 128;

    /// Wraps an ID. Consul issues UUIDs; any non-empty string of at most [`SessionId::MAX_LEN`]
    /// bytes without white space or control characters is accepted, since the ID travels
    /// percent-encoded anyway.
    pub fn new(id: impl Into<String>) -> Result<SessionId, InvalidSessionId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidSessionId::Empty);
        }
        if id.len() > SessionId::MAX_LEN {
            return Err(InvalidSessionId::TooLong {
                len: id.len(),
                limit: SessionId::MAX_LEN,
            });
        }
        if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(InvalidSessionId::BadCharacters(truncate(&id, 64)));
        }
        Ok(SessionId(id))
    }

    /// The ID's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What happens to a session's keys when it is invalidated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionBehavior {
    /// The keys are released (Consul's default; what a lock uses).
    #[default]
    Release,
    /// The keys are deleted (what a semaphore's contender keys use).
    Delete,
}

impl SessionBehavior {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionBehavior::Release => "release",
            SessionBehavior::Delete => "delete",
        }
    }
}

/// `PUT /v1/session/create`: a new session. Every field left `None` takes the server's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionCreate {
    /// A human-readable name.
    pub name: Option<String>,
    /// Time to live between renewals (Consul accepts 10 s to 86400 s); `None`: no TTL.
    pub ttl: Option<Duration>,
    /// How long the session's keys refuse new holders after it is invalidated. `None`: the
    /// server's default (15 s). `Some(Duration::ZERO)` is really sent, as `0s`.
    pub lock_delay: Option<Duration>,
    /// What happens to held keys on invalidation.
    pub behavior: SessionBehavior,
    /// The node the session belongs to; `None`: the agent's node.
    pub node: Option<String>,
    /// Health checks tying the session to the node (Consul's `Checks`). `None`: the default,
    /// `serfHealth`; `Some(vec![])`: no checks, only the TTL.
    pub checks: Option<Vec<String>>,
    /// Node health checks (`NodeChecks`, Consul 1.7 and later).
    pub node_checks: Option<Vec<String>>,
}

impl Endpoint for SessionCreate {
    /// The new session's ID.
    type Output = SessionId;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        let mut body = serde_json::Map::new();
        let mut put = |name: &str, value: serde_json::Value| {
            body.insert(name.to_owned(), value);
        };
        if let Some(name) = &self.name {
            put("Name", name.clone().into());
        }
        if let Some(ttl) = self.ttl {
            put("TTL", crate::duration::format(ttl).into());
        }
        if let Some(delay) = self.lock_delay {
            put("LockDelay", crate::duration::format(delay).into());
        }
        put("Behavior", self.behavior.as_str().into());
        if let Some(node) = &self.node {
            put("Node", node.clone().into());
        }
        if let Some(checks) = &self.checks {
            put("Checks", checks.clone().into());
        }
        if let Some(checks) = &self.node_checks {
            put("NodeChecks", checks.clone().into());
        }
        let body = serde_json::Value::Object(body).to_string().into_bytes();
        Target::new(Method::PUT, "session/create", "").build(config, body)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<SessionId, ApiError> {
        const WHAT: &str = "a session create";
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created = json_body(WHAT, success_body(WHAT, response)?)?;
        SessionId::new(created.id).map_err(|e| ApiError::Malformed {
            what: WHAT,
            problem: e.to_string(),
        })
    }
}

/// A session as Consul reports it (renew and info replies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    /// The session's ID.
    pub id: SessionId,
    /// Its name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its lock-delay.
    pub lock_delay: Duration,
    /// Its behavior.
    pub behavior: SessionBehavior,
    /// Its TTL (`None` when it has none). A renew reply may carry a larger TTL than asked for:
    /// the server raises it under load, and the renew period must follow.
    pub ttl: Option<Duration>,
    /// Its health checks.
    pub checks: Vec<String>,
    /// The index at which it was created.
    pub create_index: u64,
    /// The index of its last change.
    pub modify_index: u64,
}

/// A session entry as the server sends it. The strings borrow from the reply where they can
/// (they hold no escapes): a renew reply is decoded every few seconds for every lock held, and
/// the behavior and TTL are only looked at.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireSessionEntry<'a> {
    #[serde(rename = "ID", borrow)]
    id: Cow<'a, str>,
    #[serde(default, borrow)]
    name: Cow<'a, str>,
    #[serde(default, borrow)]
    node: Cow<'a, str>,
    /// Nanoseconds, as Go encodes a `time.Duration`.
    #[serde(default)]
    lock_delay: u64,
    #[serde(default, borrow)]
    behavior: Cow<'a, str>,
    #[serde(rename = "TTL", default, borrow)]
    ttl: Cow<'a, str>,
    #[serde(default, borrow)]
    checks: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    node_checks: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
}

impl WireSessionEntry<'_> {
    fn into_entry(self, what: &'static str) -> Result<SessionEntry, ApiError> {
        let malformed = |problem: String| ApiError::Malformed { what, problem };
        let id = SessionId::new(self.id.into_owned()).map_err(|e| malformed(e.to_string()))?;
        let ttl = match &*self.ttl {
            "" => None,
            text => Some(crate::duration::parse(text).map_err(|e| malformed(format!("session TTL: {e}")))?),
        };
        let behavior = match &*self.behavior {
            "" | "release" => SessionBehavior::Release,
            "delete" => SessionBehavior::Delete,
            other => {
                return Err(malformed(format!(
                    "unknown session behavior {:?}",
                    truncate(other, 40)
                )));
            }
        };
        let checks = (self.checks.into_iter().flatten())
            .chain(self.node_checks.into_iter().flatten())
            .map(Cow::into_owned)
            .collect();
        Ok(SessionEntry {
            id,
            name: self.name.into_owned(),
            node: self.node.into_owned(),
            lock_delay: Duration::from_nanos(self.lock_delay),
            behavior,
            ttl,
            checks,
            create_index: self.create_index,
            modify_index: self.modify_index,
        })
    }
}

/// Decodes the `[SessionEntry]` (or `null`) that renew and info answer with.
fn decode_entry(what: &'static str, body: &[u8]) -> Result<Option<SessionEntry>, ApiError> {
    let entries: Option<Vec<WireSessionEntry<'_>>> = json_body(what, body)?;
    entries
        .unwrap_or_default()
        .into_iter()
        .next()
        .map(|e| e.into_entry(what))
        .transpose()
}

/// `PUT /v1/session/renew/<id>`: reset the session's TTL clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRenew {
    /// The session to renew.
    pub id: SessionId,
}

impl Endpoint for SessionRenew {
    /// The renewed session, or `None` when Consul no longer knows it (404: it expired or was
    /// destroyed, and every key it held has been released).
    type Output = Option<SessionEntry>;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        Target::new(Method::PUT, "session/renew/", self.id.as_str()).build(config, Vec::new())
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<Self::Output, ApiError> {
        const WHAT: &str = "a session renew";
        check_len(WHAT, response)?;
        if response.status() == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        match decode_entry(WHAT, success_body(WHAT, response)?)? {
            Some(entry) => Ok(Some(entry)),
            // A 200 without the session would leave the TTL in doubt: not an answer.
            None => Err(ApiError::Malformed {
                what: WHAT,
                problem: "a success reply without the session".to_owned(),
            }),
        }
    }
}

/// `PUT /v1/session/destroy/<id>`: end the session, releasing (or deleting) its keys. Consul
/// answers `true` even for an unknown session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionDestroy {
    /// The session to destroy.
    pub id: SessionId,
}

impl Endpoint for SessionDestroy {
    /// Consul's answer (`true` in every version seen so far).
    type Output = bool;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        Target::new(Method::PUT, "session/destroy/", self.id.as_str()).build(config, Vec::new())
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<bool, ApiError> {
        bool_body("a session destroy", response)
    }
}

/// `GET /v1/session/info/<id>`: one session, optionally as a blocking read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session to read.
    pub id: SessionId,
    /// Read consistency.
    pub consistency: Consistency,
    /// Block until the session's index moves past this one.
    pub blocking: Option<Blocking>,
}

impl SessionInfo {
    /// A plain read of session `id`.
    pub fn new(id: SessionId) -> SessionInfo {
        SessionInfo {
            id,
            consistency: Consistency::Default,
            blocking: None,
        }
    }
}

impl Endpoint for SessionInfo {
    /// The session (`None` when Consul does not know it) and the metadata.
    type Output = QueryReply<Option<SessionEntry>>;

    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>> {
        Target::new(Method::GET, "session/info/", self.id.as_str())
            .consistency(self.consistency)
            .blocking(self.blocking)
            .build(config, Vec::new())
    }

    fn class(&self) -> RequestClass {
        RequestClass::of_read(self.blocking)
    }

    fn decode(response: &http::Response<Vec<u8>>) -> Result<Self::Output, ApiError> {
        const WHAT: &str = "a session info read";
        let body = success_body(WHAT, response)?;
        Ok(QueryReply {
            value: decode_entry(WHAT, body)?,
            meta: query_meta(WHAT, response)?,
        })
    }
}
