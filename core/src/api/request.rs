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
        // percent-encoded ASCII, and a token is checked for header-safe characters when it is
        // made, so the builder cannot fail; a failure is a bug in this module.
        match builder.body(body) {
            Ok(request) => request,
            Err(e) => unreachable!("consul-lock bug: request encoding produced an invalid request: {e}"),
        }
    }
}
