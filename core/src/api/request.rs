//! The shape shared by every request: the [`Endpoint`] trait and the URI and header encoding.

use std::time::Duration;

use crate::api::key::percent_encode;
use crate::api::{ApiError, ClientConfig};

/// One Consul HTTP call: how to encode it and how to decode its reply.
///
/// ```
/// # use consul_lock_core::api::{ClientConfig, Endpoint, Key, KvGet};
/// let config = ClientConfig::default();
/// let request = KvGet::new(Key::new("service/leader").unwrap()).encode(&config);
/// assert_eq!(request.uri(), "http://127.0.0.1:8500/v1/kv/service/leader");
///
/// let reply = http::Response::builder().status(404).header("X-Consul-Index", "7").body(vec![]).unwrap();
/// let read = KvGet::decode(&reply).unwrap();
/// assert_eq!((read.value, read.meta.index), (None, 7));
/// ```
pub trait Endpoint {
    /// The decoded reply.
    type Output;
    /// The request, for the agent `config` describes.
    fn encode(&self, config: &ClientConfig) -> http::Request<Vec<u8>>;
    /// Decodes a reply to this kind of request. Never panics, whatever the reply holds.
    fn decode(response: &http::Response<Vec<u8>>) -> Result<Self::Output, ApiError>;
    /// How the agent will treat the request: [`RequestClass::Prompt`] unless it is a blocking
    /// read (a read with a [`Blocking`] index above 0), which the agent may hold for its wait.
    /// A driver that shares a bounded set of connections uses it to keep room for prompt
    /// requests (session renewals above all) that blocking reads can't take.
    fn class(&self) -> RequestClass {
        RequestClass::Prompt
    }
}

/// How the agent treats a request, for a driver that budgets its connections: a blocking read
/// can hold a connection for minutes, anything else is answered promptly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestClass {
    /// Answered at once: session create, renew and destroy, lock transactions, releases,
    /// deletes, plain reads. A lock's safety depends on these (a renewal that can't go out in
    /// time loses the lock), so they must never wait behind blocking reads.
    Prompt,
    /// A blocking read, which the agent may hold for up to `wait` (plus its jitter of up to
    /// `wait/16`) before answering without news.
    BlockingRead {
        /// The read's `wait`.
        wait: Duration,
    },
}

impl RequestClass {
    /// The class of a read with `blocking`: a blocking read only when the index is above 0
    /// (a read on index 0 is encoded as a plain read, see [`Blocking`]), with its wait as sent
    /// (in whole milliseconds, rounded up).
    pub fn of_read(blocking: Option<Blocking>) -> RequestClass {
        match blocking {
            Some(b) if b.index > 0 => {
                let millis = u64::try_from(crate::duration::wait_millis(b.wait)).unwrap_or(u64::MAX);
                RequestClass::BlockingRead {
                    wait: Duration::from_millis(millis),
                }
            }
            _ => RequestClass::Prompt,
        }
    }
}

/// Shortens the `wait` of a blocking read that `Endpoint::encode` made to `wait`, if that is
/// shorter than the one it has: for a driver whose blocking reads take turns on a bounded set of
/// connections. Answers whether the request was changed; a request without a `wait` parameter
/// (not a blocking read) is left alone.
///
/// The reply is then a blocking read's reply like any other: Consul answers when the index moves
/// or the shorter wait has passed.
///
/// ```
/// # use consul_lock_core::api::{shorten_wait, Blocking, ClientConfig, Endpoint, Key, KvGet};
/// # use std::time::Duration;
/// let mut read = KvGet::new(Key::new("service/leader").unwrap());
/// read.blocking = Some(Blocking { index: 7, wait: Duration::from_secs(300) });
/// let mut request = read.encode(&ClientConfig::default());
/// assert!(shorten_wait(&mut request, Duration::from_secs(2)));
/// assert_eq!(request.uri(), "http://127.0.0.1:8500/v1/kv/service/leader?index=7&wait=2000ms");
/// ```
pub fn shorten_wait(request: &mut http::Request<Vec<u8>>, wait: Duration) -> bool {
    let Some(query) = request.uri().query() else {
        return false;
    };
    let mut found = None;
    let mut rebuilt = String::with_capacity(query.len());
    for param in query.split('&') {
        if !rebuilt.is_empty() {
            rebuilt.push('&');
        }
        match param.strip_prefix("wait=") {
            Some(old) => {
                found = Some(crate::duration::parse(old));
                rebuilt.push_str("wait=");
                rebuilt.push_str(&crate::duration::format_millis_wait(wait));
            }
            None => rebuilt.push_str(param),
        }
    }
    // A wait that does not parse was not written by this crate: leave the request as it is.
    match found {
        Some(Ok(old)) if wait < old => {}
        _ => return false,
    }
    let mut parts = request.uri().clone().into_parts();
    let path = parts
        .path_and_query
        .as_ref()
        .map_or("/", http::uri::PathAndQuery::path);
    let Ok(path_and_query) = format!("{path}?{rebuilt}").parse() else {
        return false;
    };
    parts.path_and_query = Some(path_and_query);
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            *request.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Consul's default mode: served by the leader, which may be briefly stale after an election.
    #[default]
    Default,
    /// `consistent`: the leader confirms its leadership first.
    Consistent,
    /// `stale`: any server may answer.
    Stale,
}

/// A blocking read: return once the index moves past `index`, or after `wait` (plus Consul's
/// jitter of up to `wait/16`).
///
/// An `index` of 0 encodes as a plain, non-blocking read, whatever `wait` says: Consul answers a
/// blocking read on index 0 at once anyway, and a loop built on it would spin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// The `X-Consul-Index` of the previous reply.
    pub index: u64,
    /// The longest the server may hold the read.
    pub wait: Duration,
}

/// The longest URI the `http` crate accepts (`u16::MAX - 1`; longer is `InvalidUri(TooLong)`).
pub(crate) const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// The longest URI any request can have, with every bounded input at its bound: the base URL
/// (`https://` and the authority), the longest path (`/v1/session/renew/` or `/v1/kv/` and a
/// machine's child key), and every parameter any request adds, with the session ID and the
/// datacenter, namespace and partition fully percent-encoded.
pub(crate) const WORST_CASE_URI_LEN: usize = {
    let base = "https://".len() + ClientConfig::MAX_AUTHORITY_LEN;
    let path = "/v1/kv/".len() + crate::api::Key::MAX_ENCODED_LEN + crate::api::Key::CHILD_ROOM;
    let session = 3 * crate::api::SessionId::MAX_LEN;
    let number = 20; // u64::MAX has 20 digits
    let params = "?acquire=".len() + session // or release=
        + "&flags=".len() + number
        + "&cas=".len() + number
        + "&recurse".len() + "&consistent".len()
        + "&index=".len() + number
        + "&wait=".len() + 32 // a duration in milliseconds
        + "&dc=&ns=&partition=".len() + 3 * 3 * ClientConfig::MAX_NAME_LEN;
    base + path + params
};

// Every request a valid key, session ID and checked config produce fits the `http` crate's URI
// limit, which is what makes `Target::build`'s failure unreachable.
const _: () = assert!(WORST_CASE_URI_LEN <= MAX_URI_LEN);

/// The URI path and query of a request under construction.
pub(crate) struct Target {
    method: http::Method,
    path_and_query: String,
    has_query: bool,
}

impl Target {
    /// `/v1/<prefix>` followed by `rest` percent-encoded (keeping `/`).
    pub(crate) fn new(method: http::Method, prefix: &str, rest: &str) -> Target {
        // Room for the parameters most requests add, so that building the path does not keep
        // reallocating it (percent-encoding pushes a character at a time).
        let mut path_and_query = String::with_capacity(96 + prefix.len() + 3 * rest.len());
        path_and_query.push_str("/v1/");
        path_and_query.push_str(prefix);
        percent_encode(rest, true, &mut path_and_query);
        Target {
            method,
            path_and_query,
            has_query: false,
        }
    }

    fn separator(&mut self) {
        self.path_and_query.push(if self.has_query { '&' } else { '?' });
        self.has_query = true;
    }

    /// `name=value`, with the value percent-encoded.
    pub(crate) fn param(mut self, name: &str, value: &str) -> Target {
        self.separator();
        self.path_and_query.push_str(name);
        self.path_and_query.push('=');
        percent_encode(value, false, &mut self.path_and_query);
        self
    }

    /// A parameter without a value, such as `recurse`.
    pub(crate) fn flag(mut self, name: &str) -> Target {
        self.separator();
        self.path_and_query.push_str(name);
        self
    }

    pub(crate) fn consistency(self, consistency: Consistency) -> Target {
        match consistency {
            Consistency::Default => self,
            Consistency::Consistent => self.flag("consistent"),
            Consistency::Stale => self.flag("stale"),
        }
    }

    pub(crate) fn blocking(self, blocking: Option<Blocking>) -> Target {
        match blocking {
            Some(b) if b.index > 0 => self
                .param("index", &b.index.to_string())
                .param("wait", &crate::duration::format_millis_wait(b.wait)),
            _ => self,
        }
    }

    /// The finished request: the config's datacenter, namespace and partition parameters and its
    /// token header are added here, so that no endpoint can forget them.
    pub(crate) fn build(self, config: &ClientConfig, body: Vec<u8>) -> http::Request<Vec<u8>> {
        let mut target = self;
        for (name, value) in [
            ("dc", &config.datacenter),
            ("ns", &config.namespace),
            ("partition", &config.partition),
        ] {
            if let Some(value) = value {
                target = target.param(name, value);
            }
        }
        let mut uri = String::with_capacity(48 + target.path_and_query.len());
        config.write_base_url(&mut uri);
        uri.push_str(&target.path_and_query);
        let mut builder = http::Request::builder().method(target.method).uri(uri);
        if let Some(token) = &config.token {
            builder = builder.header("X-Consul-Token", token.expose().clone());
        }
        // The base URL comes from a validated authority and everything after it is
        // percent-encoded ASCII, a token is checked for header-safe characters when it is made,
        // and the URI's length is bounded by `WORST_CASE_URI_LEN` (checked against the `http`
        // crate's limit at compile time) for a valid key and session ID and a config that passed
        // `ClientConfig::check` (which the machines' constructors and the drivers call), so the
        // builder cannot fail; a failure is a bug in this module.
        match builder.body(body) {
            Ok(request) => request,
            Err(e) => unreachable!("consul-lock bug: request encoding produced an invalid request: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        Key, KeyError, KvAcquire, KvCasDelete, KvCasPut, KvDelete, KvGet, KvList, KvLockTxn, KvRelease,
        SessionDestroy, SessionId, SessionInfo, SessionRenew,
    };
    use crate::machine::{LockOptions, OptionsError, SemaphoreOptions};
    use std::time::Duration;

    /// A key of exactly `encoded` bytes once percent-encoded: `cjk` makes it of `中` (3 UTF-8
    /// bytes, 9 encoded), padded with ASCII.
    fn key_of(encoded: usize, cjk: bool) -> String {
        let wide = if cjk { encoded / 9 } else { 0 };
        format!("{}{}", "中".repeat(wide), "k".repeat(encoded - 9 * wide))
    }

    /// A config with every bounded setting at its bound, non-ASCII where it can be.
    fn longest_config() -> ClientConfig {
        let name = "é".repeat(ClientConfig::MAX_NAME_LEN / 2);
        let host = "h".repeat(ClientConfig::MAX_AUTHORITY_LEN - ":8501".len());
        // Longer than `from_env` allows (a 253-byte host), as a program may set it.
        let authority = http::uri::Authority::try_from(format!("{host}:8501")).expect("authority");
        let mut config = ClientConfig {
            address: crate::api::Address::Tcp {
                scheme: crate::api::Scheme::Https,
                authority,
            },
            ..ClientConfig::default()
        };
        config.datacenter = Some(name.clone());
        config.namespace = Some(name.clone());
        config.partition = Some(name);
        config.token = Some(crate::api::Token::new("t").expect("token"));
        assert_eq!(config.check(), Ok(()));
        config
    }

    /// Encodes every request `key` and the longest session ID can make.
    fn encode_everything(key: &Key, config: &ClientConfig) -> Vec<usize> {
        let session = SessionId::new("ü".repeat(SessionId::MAX_LEN / 2)).expect("session");
        let mut options = SemaphoreOptions::new(key.as_str(), 3).expect("semaphore options");
        options.hold.session = crate::machine::SessionChoice::Existing(session.clone());
        assert_eq!(options.validate(), Ok(()));
        let contender = options.contender_key(&session).expect("contender key");
        let blocking = Some(Blocking {
            index: u64::MAX,
            wait: Duration::from_secs(600),
        });
        let mut uris = Vec::new();
        for key in [key.clone(), options.lock_key(), contender] {
            let get = KvGet {
                key: key.clone(),
                consistency: Consistency::Consistent,
                blocking,
            };
            let list = KvList {
                prefix: key.clone(),
                consistency: Consistency::Consistent,
                blocking,
            };
            let requests = [
                get.encode(config),
                list.encode(config),
                KvAcquire {
                    key: key.clone(),
                    session: session.clone(),
                    flags: u64::MAX,
                    value: vec![],
                }
                .encode(config),
                KvRelease {
                    key: key.clone(),
                    session: session.clone(),
                    flags: u64::MAX,
                    value: vec![],
                }
                .encode(config),
                KvCasPut {
                    key: key.clone(),
                    cas: u64::MAX,
                    flags: u64::MAX,
                    value: vec![],
                }
                .encode(config),
                KvCasDelete {
                    key: key.clone(),
                    cas: u64::MAX,
                }
                .encode(config),
                KvDelete { key: key.clone() }.encode(config),
                KvLockTxn {
                    key: key.clone(),
                    session: session.clone(),
                    flags: u64::MAX,
                    value: vec![],
                }
                .encode(config),
                SessionRenew { id: session.clone() }.encode(config),
                SessionDestroy { id: session.clone() }.encode(config),
                SessionInfo {
                    id: session.clone(),
                    consistency: Consistency::Consistent,
                    blocking,
                }
                .encode(config),
            ];
            uris.extend(requests.iter().map(|r| r.uri().to_string().len()));
        }
        uris
    }

    #[test]
    fn a_key_at_the_limit_encodes_every_request() {
        let config = longest_config();
        for cjk in [false, true] {
            let raw = key_of(Key::MAX_ENCODED_LEN, cjk);
            let key = Key::new(raw.clone()).expect("a key at the limit is valid");
            assert_eq!(key.encoded_len(), Key::MAX_ENCODED_LEN);
            assert!(LockOptions::new(&raw).is_ok());
            assert!(SemaphoreOptions::new(&raw, 2).is_ok());
            let longest = encode_everything(&key, &config).into_iter().max().unwrap_or(0);
            assert!(longest > Key::MAX_ENCODED_LEN && longest <= WORST_CASE_URI_LEN);
        }
    }

    #[test]
    fn a_key_over_the_limit_is_refused_with_its_encoded_length() {
        for cjk in [false, true] {
            let raw = key_of(Key::MAX_ENCODED_LEN + 1, cjk);
            let expected = KeyError::TooLong {
                encoded_len: Key::MAX_ENCODED_LEN + 1,
                limit: Key::MAX_ENCODED_LEN,
            };
            assert_eq!(Key::new(raw.clone()), Err(expected.clone()));
            assert_eq!(
                LockOptions::new(&raw).err(),
                Some(OptionsError::Key(expected.clone()))
            );
            assert_eq!(
                SemaphoreOptions::new(&raw, 2).err(),
                Some(OptionsError::Key(expected.clone()))
            );
            let message = expected.to_string();
            assert!(message.contains("too long once encoded"), "{message}");
            assert!(
                message.contains(&(Key::MAX_ENCODED_LEN + 1).to_string()),
                "{message}"
            );
            assert!(message.contains(&Key::MAX_ENCODED_LEN.to_string()), "{message}");
        }
        // Far over: what used to reach `unreachable!` in `Target::build`.
        assert!(matches!(
            Key::new("中".repeat(30_000)),
            Err(KeyError::TooLong { .. })
        ));
    }

    #[test]
    fn over_long_config_names_and_session_ids_are_refused() {
        let config = ClientConfig {
            partition: Some("p".repeat(ClientConfig::MAX_NAME_LEN + 1)),
            ..ClientConfig::default()
        };
        assert!(matches!(
            config.check(),
            Err(crate::api::ConfigError::TooLong { ref field, .. }) if field == "partition"
        ));
        let options = LockOptions::new("a").expect("options");
        assert!(matches!(
            crate::machine::LockMachine::new(config, options.clone()),
            Err(OptionsError::Config(_))
        ));
        let mut long_ns = options;
        long_ns.hold.namespace = Some("n".repeat(ClientConfig::MAX_NAME_LEN + 1));
        assert!(matches!(
            long_ns.validate(),
            Err(OptionsError::NamespaceTooLong { .. })
        ));
        assert!(SessionId::new("s".repeat(SessionId::MAX_LEN + 1)).is_err());
        assert!(SessionId::new("s".repeat(SessionId::MAX_LEN)).is_ok());
    }
}
