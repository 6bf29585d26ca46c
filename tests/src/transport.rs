//! A blocking HTTP exchange for tests: sends the core's `http::Request`s to a real agent and
//! hands back `http::Response`s, the way a driver would, without a driver.

use std::time::Duration;

use consul_lock_core::api::{ApiError, Endpoint, MAX_REPLY_BYTES};
use consul_lock_core::machine::{TransportError, TransportErrorKind};

/// A blocking reqwest client builder without proxies, with a TLS crypto provider installed.
///
/// reqwest is built without a default crypto provider in this workspace (to keep aws-lc's C
/// build out), so every client builder must make sure one is installed first.
pub fn blocking_client_builder() -> reqwest::blocking::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder().no_proxy()
}

/// One blocking HTTP client for test requests.
#[derive(Clone, Debug)]
pub struct TestTransport {
    client: reqwest::blocking::Client,
}

impl TestTransport {
    /// A client with no proxy and a generous default timeout (blocking reads pass their own).
    pub fn new() -> Result<TestTransport, TransportError> {
        let client = blocking_client_builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| TransportError::new(TransportErrorKind::Io, e.to_string()))?;
        Ok(TestTransport { client })
    }

    /// Sends `request`, returning the reply with its status, headers and body.
    pub fn exchange(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, TransportError> {
        self.exchange_timeout(request, None)
    }

    pub(crate) fn exchange_timeout(
        &self,
        request: http::Request<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<http::Response<Vec<u8>>, TransportError> {
        let mut request = reqwest::blocking::Request::try_from(request)
            .map_err(|e| TransportError::new(TransportErrorKind::Io, e.to_string()))?;
        if let Some(timeout) = timeout {
            *request.timeout_mut() = Some(timeout);
        }
        let response = self.client.execute(request).map_err(|e| {
            let kind = if e.is_timeout() {
                TransportErrorKind::Timeout
            } else if e.is_connect() {
                TransportErrorKind::Connect
            } else {
                TransportErrorKind::Io
            };
            TransportError::new(kind, e.to_string())
        })?;
        let mut builder = http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        let body = response
            .bytes()
            .map_err(|e| TransportError::new(TransportErrorKind::Io, e.to_string()))?;
        if body.len() > MAX_REPLY_BYTES {
            return Err(TransportError::new(
                TransportErrorKind::TooLarge,
                format!("{} bytes", body.len()),
            ));
        }
        builder
            .body(body.to_vec())
            .map_err(|e| TransportError::new(TransportErrorKind::Io, e.to_string()))
    }

    /// Encodes `endpoint` for `config`, sends it and decodes the reply.
    pub fn call<E: Endpoint>(
        &self,
        config: &consul_lock_core::api::ClientConfig,
        endpoint: &E,
    ) -> Result<Result<E::Output, ApiError>, TransportError> {
        let response = self.exchange(endpoint.encode(config))?;
        Ok(E::decode(&response))
    }
}
