//! Moves the core's requests over reqwest: an `http::Request` in, an `http::Response` (or a
//! transport error) out, with the request's deadline as its timeout and the body size capped.

use std::time::Instant;

use consul_lock_core::api::{Address, ClientConfig, MAX_REPLY_BYTES, RequestClass};
use consul_lock_core::machine::{Reply, TransportError, TransportErrorKind};

use crate::budget::{ConnectionBudget, Gate};
use crate::{Error, TlsFileError};

/// What a client's requests go through: its HTTP client (connection pool) and the budget that
/// bounds its connections. Shared by every lock of the client.
#[derive(Debug)]
pub(crate) struct Transport {
    http: reqwest::Client,
    gate: Gate,
    /// Requests sent so far, for [`Client::requests_sent`](crate::Client::requests_sent).
    sent: std::sync::atomic::AtomicU64,
}

impl Transport {
    /// The transport for `config`, within `budget`.
    pub(crate) fn new(config: &ClientConfig, budget: ConnectionBudget) -> Result<Transport, Error> {
        Ok(Transport {
            http: build_client(config, budget)?,
            gate: Gate::new(budget),
            sent: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Requests sent so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn budget(&self) -> ConnectionBudget {
        self.gate.budget()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.gate.in_flight()
    }
}

/// Builds the reqwest client for `config`: unix socket or TCP, and TLS from its settings. The
/// pool keeps no more idle connections than the budget allows in flight, so that idle ones do not
/// pile up above it.
fn build_client(config: &ClientConfig, budget: ConnectionBudget) -> Result<reqwest::Client, Error> {
    // reqwest is built without a default crypto provider (to keep aws-lc's C build out of the
    // tree); ring is installed once per process unless the application installed one already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Consul's API never redirects; following one would send `X-Consul-Token` to wherever it
    // points (even from https to http). A 3xx comes back as it is, and the core makes it a
    // fatal `ApiError::Redirect`.
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(None)
        .pool_max_idle_per_host(budget.connections())
        .redirect(reqwest::redirect::Policy::none());
    if let Address::Unix { path } = &config.address {
        builder = builder.unix_socket(path.as_path());
    }
    let tls = &config.tls;
    let tls_error = |what: &'static str, path: &std::path::Path, source: TlsFileError| Error::Tls {
        what,
        path: path.to_owned(),
        source,
    };
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| tls_error(what, path, TlsFileError::Read(e)))
    };
    let mut roots = Vec::new();
    if let Some(ca) = &tls.ca_file {
        let pem = read("CA file (CONSUL_CACERT)", ca)?;
        let found = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| tls_error("CA file (CONSUL_CACERT)", ca, TlsFileError::Parse(e)))?;
        // An empty bundle would silently leave the system roots in charge.
        if found.is_empty() {
            return Err(tls_error(
                "CA file (CONSUL_CACERT)",
                ca,
                TlsFileError::NoCertificate,
            ));
        }
        roots.extend(found);
    }
    if let Some(dir) = &tls.ca_path {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| tls_error("CA directory (CONSUL_CAPATH)", dir, TlsFileError::Read(e)))?;
        let before = roots.len();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                let pem = read("CA directory (CONSUL_CAPATH)", &path)?;
                // Files that are not certificates (a README, a key) are skipped, as Go does.
                roots.extend(reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default());
            }
        }
        // A directory without any certificate would silently leave the system roots in charge.
        if roots.len() == before {
            return Err(tls_error(
                "CA directory (CONSUL_CAPATH)",
                dir,
                TlsFileError::NoCertificate,
            ));
        }
    }
    if !roots.is_empty() {
        builder = builder.tls_certs_only(roots);
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let mut pem = read("client certificate (CONSUL_CLIENT_CERT)", cert)?;
        pem.push(b'\n');
        pem.extend(read("client key (CONSUL_CLIENT_KEY)", key)?);
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| tls_error("client certificate and key", cert, TlsFileError::Parse(e)))?;
        builder = builder.identity(identity);
    }
    if !tls.verify {
        tracing::warn!("CONSUL_HTTP_SSL_VERIFY=false: the server's certificate is not checked");
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    if let (Some(name), Address::Tcp { authority, .. }) = (&tls.server_name, &config.address) {
        // Connect to the configured address but check the certificate against `name`: requests
        // go to `name` (see `rewrite_for_server_name`), which resolves to the real address.
        let addr = resolve(authority)?;
        builder = builder.resolve(name, addr);
    }
    builder.build().map_err(Error::Http)
}

fn resolve(authority: &http::uri::Authority) -> Result<std::net::SocketAddr, Error> {
    use std::net::ToSocketAddrs;
    let port = authority.port_u16().unwrap_or(443);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let resolve_error = |source| Error::Resolve {
        address: authority.to_string(),
        source,
    };
    (host, port)
        .to_socket_addrs()
        .map_err(resolve_error)?
        .next()
        .ok_or_else(|| {
            resolve_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "it resolved to no address",
            ))
        })
}

/// With `CONSUL_TLS_SERVER_NAME`, requests name the server by that name (SNI and certificate
/// check), and the client resolves it to the configured address.
pub(crate) fn rewrite_for_server_name(config: &ClientConfig, request: &mut http::Request<Vec<u8>>) {
    let (Some(name), Address::Tcp { authority, .. }) = (&config.tls.server_name, &config.address) else {
        return;
    };
    let port = authority.port_u16().unwrap_or(443);
    let mut parts = request.uri().clone().into_parts();
    if let Ok(new) = format!("{name}:{port}").parse() {
        parts.authority = Some(new);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

/// Sends a machine's request `t` with [`exchange`]; the reply comes back with its id, for the
/// machine that sent it.
pub(crate) async fn transmit(
    transport: std::sync::Arc<Transport>,
    config: std::sync::Arc<ClientConfig>,
    t: consul_lock_core::machine::Transmit,
) -> (consul_lock_core::machine::RequestId, Reply) {
    let reply = exchange(&transport, &config, t.request, t.class, t.deadline).await;
    (t.id, reply)
}

/// Sends one request of `class` through the client's budget (waiting for room in it), giving up
/// at `deadline`, time spent waiting included.
pub(crate) async fn exchange(
    transport: &Transport,
    config: &ClientConfig,
    mut request: http::Request<Vec<u8>>,
    class: RequestClass,
    deadline: Instant,
) -> Reply {
    rewrite_for_server_name(config, &mut request);
    let budget = deadline.saturating_duration_since(Instant::now());
    if budget.is_zero() {
        return Err(TransportError::new(
            TransportErrorKind::Timeout,
            "deadline passed before sending",
        ));
    }
    let exchange = async {
        // Held until the reply is read (or this future is dropped): the request's place in
        // the budget.
        let pass = transport.gate.enter(class, deadline).await.ok_or_else(|| {
            TransportError::new(TransportErrorKind::Io, "the client's connection budget is closed")
        })?;
        transport.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(wait) = pass.cut_wait {
            consul_lock_core::api::shorten_wait(&mut request, wait);
        }
        let request = reqwest::Request::try_from(request).map_err(|e| transport_error(&e))?;
        let mut response = transport
            .http
            .execute(request)
            .await
            .map_err(|e| transport_error(&e))?;
        let mut reply = http::Response::builder().status(response.status());
        if let Some(headers) = reply.headers_mut() {
            *headers = std::mem::take(response.headers_mut());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e))? {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(TransportError::new(
                    TransportErrorKind::TooLarge,
                    format!("reply body over {MAX_REPLY_BYTES} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        // hyper hands the connection back to its pool on a task of its own once the body is
        // read; a request let in before that finds no idle connection and opens a spare one.
        // One yield lets that task run first, most of the time (spares are harmless, only
        // wasteful: see ARCHITECTURE.md, the budget).
        tokio::task::yield_now().await;
        drop(pass);
        reply
            .body(body)
            .map_err(|e| TransportError::new(TransportErrorKind::Io, e.to_string()))
    };
    match tokio::time::timeout(budget, exchange).await {
        Ok(reply) => reply,
        Err(_) => Err(TransportError::new(
            TransportErrorKind::Timeout,
            format!("no reply within {budget:?}"),
        )),
    }
}

/// Whether `e` is a TLS failure that asking again can't fix, because the configuration is wrong:
/// the agent's certificate is not trusted or does not name the host we asked for, the agent
/// refused our (missing) client certificate, or the other side does not speak TLS at all.
fn tls_refused(e: &reqwest::Error) -> bool {
    use rustls::AlertDescription as Alert;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(mut cause) = source {
        // rustls's error travels inside an `io::Error` (itself sometimes inside another), whose
        // `source` skips what it wraps.
        while let Some(inner) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            cause = inner;
        }
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
                    | rustls::Error::PeerIncompatible(_)
                    | rustls::Error::InvalidMessage(_)
                    | rustls::Error::AlertReceived(
                        Alert::BadCertificate
                            | Alert::UnsupportedCertificate
                            | Alert::CertificateRevoked
                            | Alert::CertificateExpired
                            | Alert::CertificateUnknown
                            | Alert::UnknownCA
                            | Alert::AccessDenied
                            | Alert::CertificateRequired
                            | Alert::HandshakeFailure
                            | Alert::ProtocolVersion
                            | Alert::InsufficientSecurity
                    )
            );
        }
        source = cause.source();
    }
    false
}

/// What became of a request that got no reply, for the core to classify: the TLS failures that
/// retrying can't fix are told apart here, where the TLS library's error can be seen.
fn transport_error(e: &reqwest::Error) -> TransportError {
    let kind = if tls_refused(e) {
        TransportErrorKind::TlsRefused
    } else if e.is_timeout() {
        TransportErrorKind::Timeout
    } else if e.is_connect() {
        TransportErrorKind::Connect
    } else {
        TransportErrorKind::Io
    };
    // reqwest's Display leaves out the cause ("error sending request"); the chain says why.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    TransportError::new(kind, message)
}
