//! Direct calls to the agent's HTTP API for what a lock does not do (status, watch, the checks
//! before acquiring, the demo's operator actions): core's typed requests sent with the driver's
//! [`Client::call`](consul_lock_tokio::Client::call), over the same connection setup (unix
//! socket, TLS files, server name) as the locks.

use std::time::Duration;

use consul_lock_core::api::{ApiError, Endpoint};
use consul_lock_core::machine::{Leader, TransportErrorKind};
use consul_lock_tokio::LockError;

use crate::flags::Resolved;
use crate::{Failure, Kind};

/// The agent, reached over HTTP, with what is needed to explain failures.
#[derive(Clone, Debug)]
pub(crate) struct Api {
    client: consul_lock_tokio::Client,
    resolved: Resolved,
}

/// Why a call got no answer, or an answer that is not the one asked for.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Nothing answered: connection refused, a timeout, a TLS failure.
    Transport {
        /// Whether the connection itself failed (nothing listens there).
        connect: bool,
        /// The error and its causes.
        message: String,
    },
    /// Consul answered, but not with the answer (a 403, a 500, a garbled body).
    Api(ApiError),
}

impl Api {
    /// A client for the agent `resolved` names.
    pub(crate) fn new(resolved: &Resolved) -> Result<Api, Failure> {
        let client = consul_lock_tokio::Client::new(resolved.config.clone()).map_err(|e| {
            driver_failure(
                resolved,
                &format!("setting up the connection to {}", resolved.url()),
                &e,
            )
        })?;
        Ok(Api {
            client,
            resolved: resolved.clone(),
        })
    }

    /// Sends `endpoint`'s request and decodes the reply, giving up after `timeout`.
    pub(crate) async fn call<E: Endpoint>(
        &self,
        endpoint: &E,
        timeout: Duration,
    ) -> Result<E::Output, CallError> {
        self.client.call(endpoint, timeout).await.map_err(|e| match e {
            consul_lock_tokio::CallError::Transport(t) => CallError::Transport {
                connect: t.kind == TransportErrorKind::Connect,
                message: t.message,
            },
            consul_lock_tokio::CallError::Api(api) => CallError::Api(api),
            other => CallError::Transport {
                connect: false,
                message: other.to_string(),
            },
        })
    }

    /// Follows who leads on the lock key `key` (the driver's observer).
    pub(crate) fn observe(&self, key: &str) -> Result<consul_lock_tokio::Observer, Failure> {
        self.client
            .observe(key)
            .map_err(|e| self.driver_failure(&format!("watching {key}"), &e))
    }

    /// Who leads on the lock key `key` now: the driver's `Client::leader` (one consistent read
    /// of the key, and a lookup of the leader's session), the answer `watch` and the library give.
    pub(crate) async fn leader(&self, key: &str) -> Result<Option<Leader>, Failure> {
        self.client
            .leader(key)
            .await
            .map_err(|e| self.driver_failure(&format!("reading {key}"), &e))
    }

    /// The failure to report for the driver's `error`, met while doing `what`.
    pub(crate) fn driver_failure(&self, what: &str, error: &consul_lock_tokio::Error) -> Failure {
        driver_failure(&self.resolved, what, error)
    }

    /// The failure to report for `error`, met while doing `what` (e.g. "reading service/x").
    pub(crate) fn failure(&self, what: &str, error: &CallError) -> Failure {
        Failure::of(call_kind(error), explain_call(&self.resolved, what, error))
    }
}

/// Whether a transport failure's description is a TLS one (a certificate not trusted or not
/// naming the host, a client certificate wanted, plain HTTP where TLS was expected).
fn is_tls(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "unknownissuer",
        "alert",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// The kind of a failed call.
pub(crate) fn call_kind(error: &CallError) -> Kind {
    match error {
        CallError::Transport { message, .. } if is_tls(message) => Kind::Tls,
        CallError::Transport { .. } => Kind::AgentUnavailable,
        CallError::Api(api) => api_kind(api),
    }
}

/// The kind of a refusal.
fn api_kind(api: &ApiError) -> Kind {
    match api.status() {
        Some(401 | 403) if is_unknown_token(api) => Kind::TokenNotFound,
        Some(401 | 403) => Kind::PermissionDenied,
        _ => Kind::Other,
    }
}

/// Consul's answer to a token it does not know (a mistyped, deleted or expired one).
fn is_unknown_token(api: &ApiError) -> bool {
    matches!(api, ApiError::Status { body, .. } if body.contains("ACL not found"))
}

/// The failure for the driver's `error`, met while doing `what`.
pub(crate) fn driver_failure(resolved: &Resolved, what: &str, error: &consul_lock_tokio::Error) -> Failure {
    use consul_lock_tokio::Error;
    let kind = match error {
        Error::Lock(LockError::PermissionDenied(api)) if is_unknown_token(api) => Kind::TokenNotFound,
        // Also the lock transaction's 409 "Permission denied", which no status says.
        Error::Lock(LockError::PermissionDenied(_)) => Kind::PermissionDenied,
        Error::Lock(LockError::Refused(api) | LockError::Session(api)) => api_kind(api),
        Error::Lock(
            LockError::Conflict { .. }
            | LockError::SemaphoreConflict { .. }
            | LockError::LimitMismatch { .. },
        ) => Kind::Conflict,
        Error::Lock(LockError::AgentUnavailable { last, .. }) if is_tls(last) => Kind::Tls,
        Error::Lock(LockError::AgentUnavailable { .. }) => Kind::AgentUnavailable,
        Error::Lock(LockError::ReleaseUnconfirmed { .. }) => Kind::ReleaseFailed,
        Error::Lock(LockError::Tls(_)) | Error::Tls { .. } => Kind::Tls,
        Error::Config(_) | Error::Options(_) => Kind::Usage,
        _ => Kind::Other,
    };
    Failure::of(kind, explain_driver(resolved, what, error))
}

/// What to tell the user about a failed call.
pub(crate) fn explain_call(resolved: &Resolved, what: &str, error: &CallError) -> String {
    let url = resolved.url();
    match error {
        CallError::Transport { message, .. } if is_tls(message) => format!(
            "the TLS connection to the Consul agent at {url} (the address from {source}) failed while \
             {what}: {message}. Check the CA (--ca-file, CONSUL_CACERT), the name the certificate must \
             carry (--tls-server-name, CONSUL_TLS_SERVER_NAME), a client certificate if the agent \
             wants one (--client-cert, --client-key), and that the port speaks TLS",
            source = resolved.addr_source
        ),
        CallError::Transport {
            connect: true,
            message,
        } => format!(
            "no Consul agent answers at {url} (the address from {source}) while {what}: {message}. \
             Start an agent there, or point CONSUL_HTTP_ADDR (or --http-addr) at a running one",
            source = resolved.addr_source
        ),
        CallError::Transport {
            connect: false,
            message,
        } => format!(
            "the Consul agent at {url} (the address from {source}) did not answer while {what}: \
             {message}. Check that the address is a Consul HTTP API (https:// for a TLS port, \
             with CONSUL_CACERT / --ca-file when its certificate is private)",
            source = resolved.addr_source
        ),
        CallError::Api(api) => explain_api(resolved, what, api),
    }
}

/// What to tell the user about Consul's refusal `api`.
pub(crate) fn explain_api(resolved: &Resolved, what: &str, api: &ApiError) -> String {
    let url = resolved.url();
    match api.status() {
        Some(401 | 403) if is_unknown_token(api) => format!(
            "Consul at {url} does not know the token while {what} ({api}). The request used {token}: \
             it is mistyped, deleted or expired",
            token = resolved.token_source
        ),
        Some(403) => format!(
            "Consul at {url} denied permission while {what} ({api}). The request used {token}; \
             it needs `key_prefix` write (read for status and watch) on the keys and \
             `session_prefix` write on the agent's node",
            token = resolved.token_source
        ),
        Some(401) => format!(
            "Consul at {url} refused the token while {what} ({api}). The request used {token}",
            token = resolved.token_source
        ),
        _ => format!("Consul at {url} failed while {what}: {api}"),
    }
}

/// What to tell the user when acquiring failed with the driver's `error`.
pub(crate) fn explain_driver(resolved: &Resolved, what: &str, error: &consul_lock_tokio::Error) -> String {
    match error {
        consul_lock_tokio::Error::Lock(
            LockError::Refused(api) | LockError::Session(api) | LockError::PermissionDenied(api),
        ) if matches!(api.status(), Some(401 | 403)) => explain_api(resolved, what, api),
        consul_lock_tokio::Error::Lock(
            LockError::Conflict { flags } | LockError::SemaphoreConflict { flags },
        ) => format!(
            "{what}: the key exists but is not a lock of this kind (flags {flags:#x}): a plain key, or a \
             semaphore where a lock is wanted (or the reverse: -n must match what the others use). \
             Pick another prefix, or delete the key if nothing uses it"
        ),
        consul_lock_tokio::Error::Lock(LockError::LimitMismatch { ours, theirs }) => format!(
            "{what}: the semaphore's holders use -n {theirs}, this command -n {ours}: every contender \
             must use the same limit"
        ),
        other => format!("{what}: {other}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cli::HttpFlags;

    fn resolved(token_flag: Option<&str>) -> Resolved {
        let flags = HttpFlags {
            http_addr: Some("127.0.0.1:1".into()),
            token: token_flag.map(str::to_owned),
            ..HttpFlags::default()
        };
        crate::flags::resolve(&flags, Default::default(), |_: &std::path::Path| unreachable!()).unwrap()
    }

    #[test]
    fn a_403_names_the_token_source_and_never_the_token() {
        let r = resolved(Some("s3cr3t-token"));
        let api = ApiError::Status {
            status: 403,
            body: "Permission denied".into(),
        };
        let text = explain_api(&r, "reading svc/x/.lock", &api);
        assert!(text.contains("denied permission"), "{text}");
        assert!(text.contains("the token from --token"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        let driver = consul_lock_tokio::Error::Lock(LockError::Session(api));
        assert_eq!(explain_driver(&r, "reading svc/x/.lock", &driver), text);
        let anonymous = explain_api(
            &resolved(None),
            "x",
            &ApiError::Status {
                status: 403,
                body: String::new(),
            },
        );
        assert!(anonymous.contains("no token (anonymous)"), "{anonymous}");
    }

    #[tokio::test]
    async fn no_agent_names_the_address_and_the_variable() {
        let r = resolved(None);
        let api = Api::new(&r).unwrap();
        let key = consul_lock_core::api::Key::new("x").unwrap();
        let error = api
            .call(&consul_lock_core::api::KvGet::new(key), Duration::from_secs(5))
            .await
            .unwrap_err();
        let text = api.failure("reading x", &error).message;
        assert!(
            text.contains("no Consul agent answers at http://127.0.0.1:1"),
            "{text}"
        );
        assert!(text.contains("CONSUL_HTTP_ADDR"), "{text}");
        assert!(text.contains("--http-addr"), "{text}");
    }
}
