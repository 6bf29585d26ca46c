//! Where and how to reach Consul: address, token, datacenter, namespace, partition, TLS files.
//!
//! The config is plain data. [`ClientConfig::from_env`](crate::api::ClientConfig::from_env) builds
//! one from Consul's environment conventions; the drivers turn the TLS part into a real TLS setup.

use std::fmt;
use std::path::PathBuf;

/// How requests reach the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// TCP to `authority` (`host:port`, IPv6 hosts in brackets).
    Tcp {
        /// `http` or `https`.
        scheme: Scheme,
        /// `host:port`; the type guarantees it is a valid URI authority.
        authority: http::uri::Authority,
    },
    /// A Unix domain socket (`unix:///path` in `CONSUL_HTTP_ADDR`). Requests are encoded with the
    /// authority `localhost`; the driver connects to the socket.
    Unix {
        /// Filesystem path of the socket.
        path: PathBuf,
    },
}

/// The URI scheme for a TCP address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// The scheme as it appears in a URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// An ACL token. It never appears in `Debug` output or error text.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(http::HeaderValue);

/// Why a string can't be a token. The messages never quote the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    /// Nothing but white space.
    #[error("the token is empty")]
    Empty,
    /// Characters that can't travel in an HTTP header (control characters, non-ASCII).
    #[error("the token holds characters that can't be sent in an HTTP header (control or non-ASCII)")]
    NotHeaderSafe,
}

impl Token {
    /// Wraps a token, trimming leading and trailing white space as Consul's own clients do for
    /// token files.
    ///
    /// ```
    /// # use consul_lock_core::api::Token;
    /// let token = Token::new(" 0b6a3c2e-1111-2222-3333-444455556666\n").unwrap();
    /// assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    /// assert!(Token::new("  ").is_err());
    /// ```
    pub fn new(token: impl AsRef<str>) -> Result<Token, InvalidToken> {
        let trimmed = token.as_ref().trim();
        if trimmed.is_empty() {
            return Err(InvalidToken::Empty);
        }
        if !trimmed.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(InvalidToken::NotHeaderSafe);
        }
        let mut value = http::HeaderValue::from_str(trimmed).map_err(|_| InvalidToken::NotHeaderSafe)?;
        value.set_sensitive(true);
        Ok(Token(value))
    }

    /// The secret itself, for the `X-Consul-Token` header.
    pub fn expose(&self) -> &http::HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// TLS settings from `CONSUL_HTTP_SSL_VERIFY`, `CONSUL_CACERT`, `CONSUL_CAPATH`,
/// `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY` and `CONSUL_TLS_SERVER_NAME`. The core only carries
/// them; a driver reads the files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// Verify the server's certificate (default `true`).
    pub verify: bool,
    /// A PEM file of CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// A directory of PEM CA certificates to trust.
    pub ca_path: Option<PathBuf>,
    /// A PEM client certificate (requires `client_key`).
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// The name to check the server's certificate against, when it differs from the host.
    pub server_name: Option<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            verify: true,
            ca_file: None,
            ca_path: None,
            client_cert: None,
            client_key: None,
            server_name: None,
        }
    }
}

/// Everything a request needs to know about the agent it goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Where the agent listens.
    pub address: Address,
    /// Sent as `X-Consul-Token` when set.
    pub token: Option<Token>,
    /// Sent as `dc=` when set.
    pub datacenter: Option<String>,
    /// Sent as `ns=` when set (Consul Enterprise; the open-source agent answers 400 to any `ns`).
    pub namespace: Option<String>,
    /// Sent as `partition=` when set (Consul Enterprise).
    pub partition: Option<String>,
    /// TLS settings, used when the scheme is `https`.
    pub tls: TlsConfig,
}

impl Default for ClientConfig {
    /// `http://127.0.0.1:8500`, no token, no datacenter, namespace or partition: the defaults of
    /// Consul's own clients.
    fn default() -> Self {
        ClientConfig {
            address: Address::Tcp {
                scheme: Scheme::Http,
                authority: http::uri::Authority::from_static("127.0.0.1:8500"),
            },
            token: None,
            datacenter: None,
            namespace: None,
            partition: None,
            tls: TlsConfig::default(),
        }
    }
}

impl ClientConfig {
    /// The most bytes a `datacenter`, `namespace` or `partition` may take (Consul's own names
    /// are far shorter: namespaces and partitions at most 64 characters). Each travels
    /// percent-encoded in every request's query, whose length is bounded.
    pub const MAX_NAME_LEN: usize = 256;

    /// The most bytes the address's `host:port` may take (a DNS name is at most 253).
    pub const MAX_AUTHORITY_LEN: usize = 1024;

    /// Checks that every request this config makes can be encoded: the datacenter, namespace,
    /// partition and address are within [`MAX_NAME_LEN`](Self::MAX_NAME_LEN) and
    /// [`MAX_AUTHORITY_LEN`](Self::MAX_AUTHORITY_LEN), and a namespace or partition that is set
    /// is not empty. [`ClientConfig::from_env`] and the machines' constructors call it.
    ///
    /// ```
    /// # use consul_lock_core::api::ClientConfig;
    /// let mut config = ClientConfig::default();
    /// assert!(config.check().is_ok());
    /// config.datacenter = Some("d".repeat(300));
    /// assert!(config.check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), crate::api::ConfigError> {
        for (field, value) in [
            ("datacenter", &self.datacenter),
            ("namespace", &self.namespace),
            ("partition", &self.partition),
        ] {
            if let Some(value) = value {
                if value.len() > Self::MAX_NAME_LEN {
                    return Err(crate::api::ConfigError::TooLong {
                        field: field.to_owned(),
                        len: value.len(),
                        limit: Self::MAX_NAME_LEN,
                    });
                }
            }
        }
        if let Address::Tcp { authority, .. } = &self.address {
            if authority.as_str().len() > Self::MAX_AUTHORITY_LEN {
                return Err(crate::api::ConfigError::TooLong {
                    field: "address".to_owned(),
                    len: authority.as_str().len(),
                    limit: Self::MAX_AUTHORITY_LEN,
                });
            }
        }
        Ok(())
    }

    /// A config for `http://<authority>` with every other setting at its default.
    ///
    /// ```
    /// # use consul_lock_core::api::ClientConfig;
    /// let config = ClientConfig::http("127.0.0.1:8500").unwrap();
    /// assert_eq!(config.base_url(), "http://127.0.0.1:8500");
    /// ```
    pub fn http(authority: &str) -> Result<ClientConfig, crate::api::ConfigError> {
        let authority = crate::api::env::parse_authority("address", authority)?;
        Ok(ClientConfig {
            address: Address::Tcp {
                scheme: Scheme::Http,
                authority,
            },
            ..ClientConfig::default()
        })
    }

    /// The scheme and authority every request URI starts with, e.g. `http://127.0.0.1:8500`.
    pub fn base_url(&self) -> String {
        let mut url = String::new();
        self.write_base_url(&mut url);
        url
    }

    /// Appends [`base_url`](Self::base_url) to `out`, without a string of its own: every request
    /// starts with it.
    pub(crate) fn write_base_url(&self, out: &mut String) {
        match &self.address {
            Address::Tcp { scheme, authority } => {
                out.push_str(scheme.as_str());
                out.push_str("://");
                out.push_str(authority.as_str());
            }
            Address::Unix { .. } => out.push_str("http://localhost"),
        }
    }
}
