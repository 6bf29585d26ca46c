//! The one place that decides what a failed request means: try again, or give up.

use crate::api::ApiError;
use crate::machine::{TransportError, TransportErrorKind};

/// What went wrong with a request, as a machine must act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Asking again later may work: no answer, a 5xx, a 429, a garbled reply, a leader election.
    Transient(String),
    /// The request itself is wrong or forbidden and will stay so (4xx, a known request error).
    Fatal(ApiError),
}

impl Failure {
    pub(crate) fn from_transport(e: &TransportError) -> Failure {
        let what = match e.kind {
            // A TLS setup that is wrong stays wrong: no retry can get an answer.
            TransportErrorKind::TlsRefused => {
                return Failure::Fatal(ApiError::TlsRefused {
                    message: e.message.clone(),
                });
            }
            TransportErrorKind::Timeout => "timed out",
            TransportErrorKind::Connect => "could not connect",
            TransportErrorKind::Io => "connection failed",
            TransportErrorKind::TooLarge => "reply too large",
        };
        Failure::Transient(format!("{what}: {}", e.message))
    }

    pub(crate) fn from_api(e: ApiError) -> Failure {
        // A 500 is usually Consul's way of saying "not now" (no leader, an RPC timeout), but a
        // few 500s name a request that can never succeed.
        let request_error = e.is_invalid_session()
            || matches!(&e, ApiError::Status { status: 500, body }
                if body.contains("Invalid Session TTL") || body.contains("Missing node registration")
                    || body.contains("Permission denied") || body.contains("ACL not found"));
        if e.is_retryable() && !request_error {
            Failure::Transient(e.to_string())
        } else {
            Failure::Fatal(e)
        }
    }

    /// Classifies a decoded reply: the value, or the failure.
    pub(crate) fn of<T>(reply: Result<T, ApiError>) -> Result<T, Failure> {
        reply.map_err(Failure::from_api)
    }
}

/// Decodes a driver's reply with endpoint `E`, classifying any failure.
pub(crate) fn decode<E: crate::api::Endpoint>(reply: &crate::machine::Reply) -> Result<E::Output, Failure> {
    match reply {
        Err(e) => Err(Failure::from_transport(e)),
        Ok(response) => Failure::of(E::decode(response)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, body: &str) -> ApiError {
        ApiError::Status {
            status,
            body: body.to_owned(),
        }
    }

    #[test]
    fn five_hundreds_are_transient_unless_they_name_a_request_error() {
        assert!(matches!(
            Failure::from_api(status(500, "No cluster leader")),
            Failure::Transient(_)
        ));
        assert!(matches!(
            Failure::from_api(status(503, "")),
            Failure::Transient(_)
        ));
        assert!(matches!(
            Failure::from_api(status(429, "")),
            Failure::Transient(_)
        ));
        assert!(matches!(
            Failure::from_api(status(500, "invalid session \"x\"")),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            Failure::from_api(status(
                500,
                "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"
            )),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            Failure::from_api(status(403, "Permission denied")),
            Failure::Fatal(_)
        ));
        assert!(matches!(Failure::from_api(status(400, "bad")), Failure::Fatal(_)));
    }

    #[test]
    fn a_redirect_is_fatal_and_names_where_it_pointed() {
        let reply = http::Response::builder()
            .status(307)
            .header("Location", "http://elsewhere:8500/v1/kv/a")
            .body(Vec::new())
            .unwrap_or_default();
        let failure = decode::<crate::api::KvGet>(&Ok(reply));
        let Err(Failure::Fatal(e)) = failure else {
            panic!("a redirect must be fatal, got {failure:?}")
        };
        let text = e.to_string();
        assert!(text.contains("does not redirect"), "{text}");
        assert!(text.contains("http://elsewhere:8500/v1/kv/a"), "{text}");
    }
}
