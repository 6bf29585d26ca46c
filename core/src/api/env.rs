//! Building a [`ClientConfig`] from Consul's environment variables.
//!
//! [`ClientConfig::from_env`] follows the conventions of Consul's own clients (Go's `api` package
//! and the `consul` command), with the differences listed on that function. It is pure: the caller
//! hands over the environment as a map and a function that reads a file, so the core never touches
//! the process environment or the filesystem itself.
//!
//! | Variable                 | Meaning                                                          |
//! |--------------------------|------------------------------------------------------------------|
//! | `CONSUL_HTTP_ADDR`       | `host:port`, `http://host[:port]`, `https://host[:port]` or `unix:///abs/path`; default `127.0.0.1:8500` |
//! | `CONSUL_HTTP_TOKEN`      | the ACL token                                                    |
//! | `CONSUL_HTTP_TOKEN_FILE` | a file holding the ACL token; wins over `CONSUL_HTTP_TOKEN`      |
//! | `CONSUL_HTTP_SSL`        | `true` switches to `https`                                       |
//! | `CONSUL_HTTP_SSL_VERIFY` | `false` skips certificate verification (default `true`)          |
//! | `CONSUL_CACERT`          | a PEM file of CA certificates                                    |
//! | `CONSUL_CAPATH`          | a directory of PEM CA certificates                               |
//! | `CONSUL_CLIENT_CERT`     | a PEM client certificate (needs `CONSUL_CLIENT_KEY`)             |
//! | `CONSUL_CLIENT_KEY`      | the client certificate's private key (needs `CONSUL_CLIENT_CERT`)|
//! | `CONSUL_TLS_SERVER_NAME` | the name to verify the server's certificate against             |
//! | `CONSUL_NAMESPACE`       | the namespace (Consul Enterprise)                                |
//! | `CONSUL_PARTITION`       | the admin partition (Consul Enterprise)                          |
//!
//! There is no datacenter variable: Consul's clients take the datacenter only from a flag
//! (`-datacenter`), so [`ClientConfig::datacenter`] is left `None`.
//!
//! Errors never contain the ACL token: neither the value of `CONSUL_HTTP_TOKEN` nor the contents of
//! the token file appear in any [`ConfigError`]'s `Display` or `Debug` output, even when the token
//! was mistakenly put into another variable. Quoted values are cut to about 100 characters.

use core::net::{Ipv4Addr, Ipv6Addr};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use http::uri::Authority;

use crate::api::config::{Address, ClientConfig, InvalidToken, Scheme, TlsConfig, Token};

const HTTP_ADDR: &str = "CONSUL_HTTP_ADDR";
const HTTP_TOKEN: &str = "CONSUL_HTTP_TOKEN";
const HTTP_TOKEN_FILE: &str = "CONSUL_HTTP_TOKEN_FILE";
const HTTP_SSL: &str = "CONSUL_HTTP_SSL";
const HTTP_SSL_VERIFY: &str = "CONSUL_HTTP_SSL_VERIFY";
const CACERT: &str = "CONSUL_CACERT";
const CAPATH: &str = "CONSUL_CAPATH";
const CLIENT_CERT: &str = "CONSUL_CLIENT_CERT";
const CLIENT_KEY: &str = "CONSUL_CLIENT_KEY";
const TLS_SERVER_NAME: &str = "CONSUL_TLS_SERVER_NAME";
const NAMESPACE: &str = "CONSUL_NAMESPACE";
const PARTITION: &str = "CONSUL_PARTITION";

/// The address Consul's clients use when `CONSUL_HTTP_ADDR` is unset.
const DEFAULT_AUTHORITY: &str = "127.0.0.1:8500";

/// How many characters of a value an error quotes before cutting it off with `…`.
const MAX_QUOTED_CHARS: usize = 100;

/// What replaces a secret (or the user info of an address) in error text.
const REDACTED: &str = "<redacted>";

/// The forms `CONSUL_HTTP_ADDR` accepts, for error messages.
const ADDRESS_FORMS: &str = "use host:port, http://host:port, https://host:port or unix:///path/to/socket";

/// A configuration value that can't be used.
///
/// Each variant names the variable (or option) and says what is wrong and what to do. Quoted
/// values are cut to about 100 characters, the user info of an address is replaced by
/// `<redacted>`, and the ACL token never appears, in `Display` or in `Debug`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An address (`CONSUL_HTTP_ADDR`, or the authority given to [`ClientConfig::http`]) that
    /// can't be used.
    #[error("{variable}={value:?}: {problem}")]
    InvalidAddress {
        /// The variable or option, e.g. `CONSUL_HTTP_ADDR`.
        variable: String,
        /// The value as given (cut short, user info redacted).
        value: String,
        /// What is wrong and what to write instead.
        problem: String,
    },
    /// A boolean variable whose value is none of the spellings Go's `strconv.ParseBool` accepts.
    #[error(
        "{variable}={value:?}: not a boolean; use 1, t, T, TRUE, true or True to turn it on, \
         or 0, f, F, FALSE, false or False to turn it off"
    )]
    InvalidBool {
        /// The variable, e.g. `CONSUL_HTTP_SSL`.
        variable: String,
        /// The value as given (cut short).
        value: String,
    },
    /// `CONSUL_HTTP_TOKEN_FILE` names a file that can't be read, is empty, or holds characters a
    /// token can't have. The file's contents are never part of the error.
    #[error("{variable}={path:?}: {problem}")]
    TokenFile {
        /// The variable, `CONSUL_HTTP_TOKEN_FILE`.
        variable: String,
        /// The path as given (cut short).
        path: String,
        /// What is wrong (the I/O error, an empty file, unusable characters) and what to do.
        problem: String,
    },
    /// A client certificate without its private key, or a key without its certificate.
    #[error(
        "{variable}={value:?} is set but {missing} is not; a client certificate needs its \
         private key: set both {variable} and {missing}, or neither"
    )]
    IncompleteClientCert {
        /// The variable that is set, e.g. `CONSUL_CLIENT_CERT`.
        variable: String,
        /// Its value (cut short).
        value: String,
        /// The variable that is missing, e.g. `CONSUL_CLIENT_KEY`.
        missing: String,
    },
    /// `CONSUL_HTTP_TOKEN` holds something that can't be sent as a token (control or non-ASCII
    /// characters). The token itself is never quoted.
    #[error("{variable}: {problem}; set it to the ACL token alone")]
    InvalidToken {
        /// The variable, `CONSUL_HTTP_TOKEN`.
        variable: String,
        /// Why the value can't be a token.
        problem: InvalidToken,
    },
    /// A setting too long for every request to fit the `http` crate's URI limit (see
    /// [`ClientConfig::check`]).
    #[error(
        "the {field} is {len} bytes long; at most {limit} bytes are accepted, so that every \
         request URI stays within its limit"
    )]
    TooLong {
        /// The setting: `datacenter`, `namespace`, `partition` or `address` (`CONSUL_HTTP_ADDR`,
        /// `CONSUL_NAMESPACE`, `CONSUL_PARTITION` or the matching flag).
        field: String,
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        limit: usize,
    },
}

/// Scrubs secrets out of text that goes into an error, and cuts it short.
struct Redactor {
    /// Non-empty secrets, longest first.
    secrets: Vec<String>,
}

impl Redactor {
    fn new(secrets: &[String]) -> Redactor {
        let mut secrets: Vec<String> = secrets
            .iter()
            .filter(|secret| !secret.is_empty())
            .cloned()
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` with every secret replaced by `<redacted>`, cut to [`MAX_QUOTED_CHARS`].
    fn clip(&self, text: &str) -> String {
        truncate(self.scrub(text))
    }

    /// Whether `text` holds a secret.
    fn finds_secret_in(&self, text: &str) -> bool {
        self.secrets.iter().any(|secret| text.contains(secret.as_str()))
    }

    /// `text` with every secret replaced by `<redacted>`.
    fn scrub(&self, text: &str) -> String {
        let mut scrubbed = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while let Some(c) = rest.chars().next() {
            for secret in &self.secrets {
                if let Some(after) = rest.strip_prefix(secret.as_str()) {
                    scrubbed.push_str(REDACTED);
                    rest = after;
                    continue 'scan;
                }
            }
            scrubbed.push(c);
            rest = &rest[c.len_utf8()..];
        }
        scrubbed
    }

    /// An address for an error: secrets and user info redacted, cut short.
    fn clip_address(&self, value: &str) -> String {
        truncate(redact_userinfo(&self.scrub(value)))
    }
}

/// Cuts `text` to [`MAX_QUOTED_CHARS`] characters, marking the cut with `…`.
fn truncate(mut text: String) -> String {
    if let Some((end, _)) = text.char_indices().nth(MAX_QUOTED_CHARS) {
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Replaces the user info of an address (`user:password@`) with `<redacted>`, so that a password
/// never reaches an error message.
fn redact_userinfo(value: &str) -> String {
    let start = value.find("://").map_or(0, |i| i + 3);
    let end = value[start..]
        .find(['/', '?', '#'])
        .map_or(value.len(), |i| start + i);
    match value[start..end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &value[..start], &value[start + at..]),
        None => value.to_owned(),
    }
}

/// The port a URL with this scheme and no port uses.
fn default_port(scheme: Scheme) -> u16 {
    match scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    }
}

/// Validates an authority `host:port` and returns it in the form stored in [`Address::Tcp`]: it
/// parses as an [`http::uri::Authority`] with a port.
///
/// The host is a DNS name (letters, digits, `-` and `_`, labels of 1 to 63 characters, a trailing
/// `.` allowed), an IPv4 address, or an IPv6 address in brackets (`[::1]`). The port is required
/// and must be a number from 1 to 65535 (leading zeros are dropped). User info (`user@`), paths,
/// queries, fragments, white space and control characters are rejected.
///
/// `name` is the option or variable the value came from; errors mention it.
pub(crate) fn parse_authority(name: &str, value: &str) -> Result<Authority, ConfigError> {
    let redactor = Redactor::new(&[]);
    check_authority(
        value,
        None,
        "missing port; write host:port, e.g. 127.0.0.1:8500",
        &redactor,
    )
    .map_err(|problem| ConfigError::InvalidAddress {
        variable: name.to_owned(),
        value: redactor.clip_address(value),
        problem,
    })
}

/// The checks behind [`parse_authority`]. `default_port` is used when the port is left out; when
/// it is `None`, a missing port is an error explained by `missing_port`. The error is the problem
/// text.
fn check_authority(
    authority: &str,
    default_port: Option<u16>,
    missing_port: &str,
    r: &Redactor,
) -> Result<Authority, String> {
    if authority.is_empty() {
        return Err("missing host and port; write host:port, e.g. 127.0.0.1:8500".to_owned());
    }
    if authority.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains white space or control characters; remove them".to_owned());
    }
    if authority.contains('@') {
        return Err(format!(
            "user info (\"user@\" or \"user:password@\") is not supported; remove it (an ACL \
             token goes in {HTTP_TOKEN} or {HTTP_TOKEN_FILE})"
        ));
    }
    if let Some(i) = authority.find(['/', '?', '#']) {
        return Err(format!(
            "unexpected {:?} after the host and port; give only host:port (the client adds the \
             API paths itself, and path prefixes are not supported)",
            r.clip(&authority[i..])
        ));
    }

    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((ip, after)) = bracketed.split_once(']') else {
            return Err("missing \"]\" after the IPv6 address; write IPv6 hosts as [::1]:8500".to_owned());
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "{:?} is not a valid IPv6 address; write IPv6 hosts as [::1]:8500",
                r.clip(ip)
            ));
        }
        let port = if after.is_empty() {
            None
        } else if let Some(port) = after.strip_prefix(':') {
            Some(port)
        } else {
            return Err(format!(
                "unexpected {:?} after \"]\"; write IPv6 hosts as [::1]:8500",
                r.clip(after)
            ));
        };
        (&authority[..ip.len() + 2], port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if port.is_some_and(|port| port.contains(':')) {
            return Err(
                "more than one \":\"; write host:port, with IPv6 hosts in brackets, e.g. [::1]:8500"
                    .to_owned(),
            );
        }
        check_host(host, r)?;
        (host, port)
    };

    let port = match port {
        None => default_port.ok_or_else(|| missing_port.to_owned())?,
        Some(port) => check_port(port, r)?,
    };
    match format!("{host}:{port}").parse::<Authority>() {
        Ok(parsed) if parsed.port_u16() == Some(port) => Ok(parsed),
        Ok(_) => Err("not a valid URI authority; write host:port".to_owned()),
        Err(e) => Err(format!("not a valid URI authority ({e}); write host:port")),
    }
}

/// Checks a host that is not in brackets: an IPv4 address or a DNS name.
fn check_host(host: &str, r: &Redactor) -> Result<(), String> {
    const USE: &str = "use a DNS name, an IPv4 address, or an IPv6 address in brackets";
    if host.is_empty() {
        return Err("missing host before the port; write host:port, e.g. 127.0.0.1:8500".to_owned());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<Ipv4Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("{:?} is not a valid IPv4 address; {USE}", r.clip(host))),
        };
    }
    let invalid = |reason: &str| format!("invalid host {:?}: {reason}; {USE}", r.clip(host));
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label (\"..\" or a leading \".\")"));
        }
        if label.len() > 63 {
            return Err(invalid("a label is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(invalid(&format!(
                "contains {c:?}; host names have only letters, digits, '-' and '_' (write \
                 internationalized names in their xn-- form)"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a label starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Checks a port: decimal digits, 1 to 65535.
fn check_port(port: &str, r: &Redactor) -> Result<u16, String> {
    const USE: &str = "use a port from 1 to 65535";
    if port.is_empty() {
        return Err(format!("empty port after \":\"; {USE}"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {:?} is not a number; {USE}", r.clip(port)));
    }
    let digits = port.trim_start_matches('0');
    let number = if digits.len() > 5 {
        None
    } else if digits.is_empty() {
        Some(0)
    } else {
        digits.parse::<u32>().ok()
    };
    match number.and_then(|n| u16::try_from(n).ok()) {
        Some(n) if n != 0 => Ok(n),
        _ => Err(format!("port {} is out of range; {USE}", r.clip(port))),
    }
}

/// Parses `CONSUL_HTTP_ADDR`. `ssl` is `CONSUL_HTTP_SSL`.
fn parse_address(value: &str, ssl: bool, r: &Redactor) -> Result<Address, ConfigError> {
    let invalid = |problem: String| ConfigError::InvalidAddress {
        variable: HTTP_ADDR.to_owned(),
        value: r.clip_address(value),
        // The problem may quote a piece of the value, which could hold part of the token.
        problem: if r.finds_secret_in(value) {
            format!(
                "holds the ACL token (from {HTTP_TOKEN} or {HTTP_TOKEN_FILE}), so the value is                  not shown; {ADDRESS_FORMS}"
            )
        } else {
            problem
        },
    };
    let (explicit, rest) = match value.split_once("://") {
        None => (None, value),
        Some((scheme, rest)) => {
            if scheme.eq_ignore_ascii_case("unix") {
                return parse_unix(rest, r).map_err(invalid);
            } else if scheme.eq_ignore_ascii_case("http") {
                (Some(Scheme::Http), rest)
            } else if scheme.eq_ignore_ascii_case("https") {
                (Some(Scheme::Https), rest)
            } else {
                return Err(invalid(format!(
                    "unsupported scheme {:?}; {ADDRESS_FORMS}",
                    r.clip(scheme)
                )));
            }
        }
    };
    // As in Go's client: CONSUL_HTTP_SSL=true is never undone by an explicit http://.
    let scheme = if ssl || explicit == Some(Scheme::Https) {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let (default, missing_port) = match explicit {
        Some(_) => (Some(default_port(scheme)), ""),
        None => (
            None,
            "missing port; write host:port (e.g. consul.example:8500), or http://host or \
             https://host for port 80 or 443",
        ),
    };
    let authority = check_authority(authority, default, missing_port, r).map_err(invalid)?;
    Ok(Address::Tcp { scheme, authority })
}

/// Parses the path of a `unix://` address. The error is the problem text.
fn parse_unix(path: &str, r: &Redactor) -> Result<Address, String> {
    if path.is_empty() {
        return Err("missing socket path; write unix:///path/to/socket".to_owned());
    }
    if !(path.starts_with('/') || Path::new(path).is_absolute()) {
        return Err(format!(
            "socket path {:?} is not absolute; write unix:///absolute/path/to/socket (three \
             slashes)",
            r.clip(path)
        ));
    }
    Ok(Address::Unix {
        path: PathBuf::from(path),
    })
}

/// Parses a boolean the way Go's `strconv.ParseBool` does.
fn parse_bool(variable: &str, value: &str, r: &Redactor) -> Result<bool, ConfigError> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(ConfigError::InvalidBool {
            variable: variable.to_owned(),
            value: r.clip(value),
        }),
    }
}

impl ClientConfig {
    /// Builds a config from Consul's environment variables (see the [module docs](self) for the
    /// list), starting from [`ClientConfig::default`].
    ///
    /// `vars` is the environment; `read_file` reads the file named by `CONSUL_HTTP_TOKEN_FILE` and
    /// is called at most once, only when that variable is set. A driver passes the process
    /// environment and a function that reads the file from disk; tests pass a map and a fake. The
    /// TLS files are not read here, only carried in [`TlsConfig`].
    ///
    /// Rules, as in Go's client unless noted:
    ///
    /// - A variable set to the empty string counts as unset.
    /// - `CONSUL_HTTP_ADDR` is `host:port`, `http://host[:port]`, `https://host[:port]` or
    ///   `unix:///absolute/path/to/socket`, with an optional trailing `/` after a TCP authority.
    ///   Hosts are DNS names, IPv4 addresses or bracketed IPv6 addresses (`[::1]:8500`). Schemes
    ///   are matched case-insensitively (Go: exact). User info, path prefixes, queries and
    ///   fragments are rejected. Unset, the address is `127.0.0.1:8500`.
    /// - The port: without a scheme it is required (`consul.example` is an error; Go would
    ///   silently use port 80, which is rarely what was meant, as the agent listens on 8500).
    ///   After `http://` or `https://` it may be left out and defaults to that scheme's port, 80
    ///   or 443, which is written into the stored authority (`https://consul.example` becomes
    ///   `consul.example:443`).
    /// - `CONSUL_HTTP_SSL` and `CONSUL_HTTP_SSL_VERIFY` take Go's `strconv.ParseBool` spellings
    ///   (`1 t T TRUE true True 0 f F FALSE false False`); anything else is an error (Go ignores
    ///   it with a warning). `CONSUL_HTTP_SSL=true` turns a schemeless or `http://` address into
    ///   `https`; the default port of `http://host` then is 443. It has no effect on `unix://`.
    /// - The token comes from `CONSUL_HTTP_TOKEN_FILE` when that is set (trimmed), else from
    ///   `CONSUL_HTTP_TOKEN` (trimmed; nothing but white space means no token). An unreadable
    ///   token file is an error; so is an empty one (Go falls back to `CONSUL_HTTP_TOKEN`), and so
    ///   is a token with characters an HTTP header can't carry (control or non-ASCII).
    /// - `CONSUL_CLIENT_CERT` and `CONSUL_CLIENT_KEY` must be set together.
    ///
    /// The first problem found is returned; see [`ConfigError`]. The token never appears in it.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use std::path::Path;
    /// use consul_lock_core::api::{Address, ClientConfig, Scheme};
    ///
    /// let vars = HashMap::from([
    ///     ("CONSUL_HTTP_ADDR".to_owned(), "https://consul.example:8501".to_owned()),
    ///     ("CONSUL_HTTP_TOKEN_FILE".to_owned(), "/run/secrets/consul-token".to_owned()),
    ///     ("CONSUL_CACERT".to_owned(), "/etc/consul/ca.pem".to_owned()),
    /// ]);
    /// let config = ClientConfig::from_env(&vars, |path: &Path| {
    ///     assert_eq!(path, Path::new("/run/secrets/consul-token"));
    ///     Ok("3f1b6a0e-secret\n".to_owned())
    /// })?;
    /// assert_eq!(config.base_url(), "https://consul.example:8501");
    /// assert_eq!(config.token.unwrap().expose().to_str().unwrap(), "3f1b6a0e-secret");
    /// assert_eq!(config.tls.ca_file.as_deref(), Some(Path::new("/etc/consul/ca.pem")));
    ///
    /// let bad = HashMap::from([("CONSUL_HTTP_ADDR".to_owned(), "htp://x".to_owned())]);
    /// let error = ClientConfig::from_env(&bad, |_: &Path| unreachable!()).unwrap_err();
    /// assert_eq!(
    ///     error.to_string(),
    ///     "CONSUL_HTTP_ADDR=\"htp://x\": unsupported scheme \"htp\"; use host:port, \
    ///      http://host:port, https://host:port or unix:///path/to/socket",
    /// );
    /// # Ok::<(), consul_lock_core::api::ConfigError>(())
    /// ```
    pub fn from_env<F>(vars: &HashMap<String, String>, mut read_file: F) -> Result<ClientConfig, ConfigError>
    where
        F: FnMut(&Path) -> std::io::Result<String>,
    {
        let get = |name: &str| vars.get(name).map(String::as_str).filter(|v| !v.is_empty());

        let env_token = get(HTTP_TOKEN);
        let mut secrets: Vec<String> = env_token.iter().map(|t| t.trim().to_owned()).collect();
        let token = match get(HTTP_TOKEN_FILE) {
            Some(path) => {
                let r = Redactor::new(&secrets);
                let token_file_error = |problem: String| ConfigError::TokenFile {
                    variable: HTTP_TOKEN_FILE.to_owned(),
                    path: r.clip(path),
                    problem,
                };
                let contents = read_file(Path::new(path)).map_err(|e| {
                    token_file_error(format!(
                        "cannot read the token file: {} (kind: {:?}); check the path and its \
                         permissions, or unset {HTTP_TOKEN_FILE}",
                        r.clip(&e.to_string()),
                        e.kind()
                    ))
                })?;
                match Token::new(&contents) {
                    Ok(token) => {
                        secrets.push(contents.trim().to_owned());
                        Some(token)
                    }
                    Err(InvalidToken::Empty) => {
                        return Err(token_file_error(format!(
                            "the token file is empty (or only white space); put the ACL token \
                             in it, or unset {HTTP_TOKEN_FILE}"
                        )));
                    }
                    Err(problem) => {
                        return Err(token_file_error(format!(
                            "{problem}; put only the ACL token in the file"
                        )));
                    }
                }
            }
            None => match env_token.map(Token::new) {
                None | Some(Err(InvalidToken::Empty)) => None,
                Some(Ok(token)) => Some(token),
                Some(Err(problem)) => {
                    return Err(ConfigError::InvalidToken {
                        variable: HTTP_TOKEN.to_owned(),
                        problem,
                    });
                }
            },
        };
        let r = Redactor::new(&secrets);

        let bool_var = |name: &str, default: bool| match get(name) {
            None => Ok(default),
            Some(value) => parse_bool(name, value, &r),
        };
        let ssl = bool_var(HTTP_SSL, false)?;
        let verify = bool_var(HTTP_SSL_VERIFY, true)?;

        let address = match get(HTTP_ADDR) {
            Some(value) => parse_address(value, ssl, &r)?,
            None => Address::Tcp {
                scheme: if ssl { Scheme::Https } else { Scheme::Http },
                authority: Authority::from_static(DEFAULT_AUTHORITY),
            },
        };

        let (client_cert, client_key) = match (get(CLIENT_CERT), get(CLIENT_KEY)) {
            (Some(cert), Some(key)) => (Some(PathBuf::from(cert)), Some(PathBuf::from(key))),
            (None, None) => (None, None),
            (Some(cert), None) => {
                return Err(ConfigError::IncompleteClientCert {
                    variable: CLIENT_CERT.to_owned(),
                    value: r.clip(cert),
                    missing: CLIENT_KEY.to_owned(),
                });
            }
            (None, Some(key)) => {
                return Err(ConfigError::IncompleteClientCert {
                    variable: CLIENT_KEY.to_owned(),
                    value: r.clip(key),
                    missing: CLIENT_CERT.to_owned(),
                });
            }
        };

        let config = ClientConfig {
            address,
            token,
            namespace: get(NAMESPACE).map(str::to_owned),
            partition: get(PARTITION).map(str::to_owned),
            tls: TlsConfig {
                verify,
                ca_file: get(CACERT).map(PathBuf::from),
                ca_path: get(CAPATH).map(PathBuf::from),
                client_cert,
                client_key,
                server_name: get(TLS_SERVER_NAME).map(str::to_owned),
            },
            ..ClientConfig::default()
        };
        config.check()?;
        Ok(config)
    }

    /// [`ClientConfig::from_env`] for any sequence of `(name, value)` pairs, such as the pairs of
    /// the process environment. Only variables whose names start with `CONSUL_` are kept; when a
    /// name occurs twice, the last value wins.
    ///
    /// ```
    /// use consul_lock_core::api::ClientConfig;
    ///
    /// let vars = [("CONSUL_HTTP_ADDR", "[::1]:8500"), ("CONSUL_HTTP_SSL", "true")];
    /// let config = ClientConfig::from_env_vars(vars, |_: &std::path::Path| unreachable!())?;
    /// assert_eq!(config.base_url(), "https://[::1]:8500");
    /// # Ok::<(), consul_lock_core::api::ConfigError>(())
    /// ```
    pub fn from_env_vars<I, K, V, F>(vars: I, read_file: F) -> Result<ClientConfig, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
        F: FnMut(&Path) -> std::io::Result<String>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .filter(|(name, _)| name.as_ref().starts_with("CONSUL_"))
            .map(|(name, value)| (name.as_ref().to_owned(), value.as_ref().to_owned()))
            .collect();
        ClientConfig::from_env(&vars, read_file)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io;

    use proptest::prelude::*;

    use super::*;

    const TOKEN: &str = "9b1de2f4-51a3-4c0e-8f6e-secret-token";

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn no_file(path: &Path) -> io::Result<String> {
        panic!("read_file called for {}", path.display())
    }

    fn config(pairs: &[(&str, &str)]) -> ClientConfig {
        ClientConfig::from_env(&vars(pairs), no_file).unwrap()
    }

    fn error(pairs: &[(&str, &str)]) -> ConfigError {
        ClientConfig::from_env(&vars(pairs), no_file).unwrap_err()
    }

    fn address(value: &str) -> Address {
        config(&[(HTTP_ADDR, value)]).address
    }

    fn address_error(value: &str) -> String {
        error(&[(HTTP_ADDR, value)]).to_string()
    }

    fn tcp(scheme: Scheme, authority: &str) -> Address {
        Address::Tcp {
            scheme,
            authority: authority.parse().unwrap(),
        }
    }

    // ---- defaults and unset variables ----

    #[test]
    fn empty_environment_gives_the_default_config() {
        assert_eq!(config(&[]), ClientConfig::default());
        assert_eq!(config(&[]).base_url(), "http://127.0.0.1:8500");
    }

    #[test]
    fn empty_strings_count_as_unset() {
        let all = [
            HTTP_ADDR,
            HTTP_TOKEN,
            HTTP_TOKEN_FILE,
            HTTP_SSL,
            HTTP_SSL_VERIFY,
            CACERT,
            CAPATH,
            CLIENT_CERT,
            CLIENT_KEY,
            TLS_SERVER_NAME,
            NAMESPACE,
            PARTITION,
        ];
        let pairs: Vec<(&str, &str)> = all.iter().map(|name| (*name, "")).collect();
        assert_eq!(config(&pairs), ClientConfig::default());
    }

    #[test]
    fn unrelated_variables_are_ignored() {
        let c = config(&[("CONSUL_DATACENTER", "dc2"), ("HOME", "/root")]);
        assert_eq!(c, ClientConfig::default());
        assert_eq!(c.datacenter, None);
    }

    // ---- CONSUL_HTTP_ADDR ----

    #[test]
    fn accepts_schemeless_host_port() {
        assert_eq!(address("127.0.0.1:8500"), tcp(Scheme::Http, "127.0.0.1:8500"));
        assert_eq!(
            address("consul.example:8500"),
            tcp(Scheme::Http, "consul.example:8500")
        );
        assert_eq!(address("localhost:1"), tcp(Scheme::Http, "localhost:1"));
        assert_eq!(
            address("consul-server_1:65535"),
            tcp(Scheme::Http, "consul-server_1:65535")
        );
        assert_eq!(
            address("consul.example.:8500"),
            tcp(Scheme::Http, "consul.example.:8500")
        );
    }

    #[test]
    fn accepts_bracketed_ipv6() {
        assert_eq!(address("[::1]:8500"), tcp(Scheme::Http, "[::1]:8500"));
        assert_eq!(
            address("https://[2001:db8::7]:8501"),
            tcp(Scheme::Https, "[2001:db8::7]:8501")
        );
        assert_eq!(
            config(&[(HTTP_ADDR, "[::1]:8500")]).base_url(),
            "http://[::1]:8500"
        );
    }

    #[test]
    fn accepts_http_and_https_urls() {
        assert_eq!(
            address("http://127.0.0.1:8500"),
            tcp(Scheme::Http, "127.0.0.1:8500")
        );
        assert_eq!(
            address("https://consul.example:8501"),
            tcp(Scheme::Https, "consul.example:8501")
        );
        assert_eq!(
            config(&[(HTTP_ADDR, "https://consul.example:8501")]).base_url(),
            "https://consul.example:8501"
        );
    }

    #[test]
    fn schemes_are_case_insensitive() {
        assert_eq!(address("HTTPS://a:1"), tcp(Scheme::Https, "a:1"));
        assert_eq!(address("Http://a:1"), tcp(Scheme::Http, "a:1"));
        assert!(matches!(address("UNIX:///s"), Address::Unix { .. }));
    }

    #[test]
    fn tolerates_one_trailing_slash() {
        assert_eq!(
            address("https://consul.example:8501/"),
            tcp(Scheme::Https, "consul.example:8501")
        );
        assert_eq!(address("127.0.0.1:8500/"), tcp(Scheme::Http, "127.0.0.1:8500"));
        assert!(address_error("http://a:1//").contains("unexpected \"/\""));
    }

    #[test]
    fn port_defaults_to_the_schemes_port_only_after_a_scheme() {
        assert_eq!(
            address("http://consul.example"),
            tcp(Scheme::Http, "consul.example:80")
        );
        assert_eq!(
            address("https://consul.example"),
            tcp(Scheme::Https, "consul.example:443")
        );
        assert_eq!(address("https://[::1]"), tcp(Scheme::Https, "[::1]:443"));
        assert_eq!(address("http://10.0.0.1/"), tcp(Scheme::Http, "10.0.0.1:80"));
        assert_eq!(
            address_error("consul.example"),
            "CONSUL_HTTP_ADDR=\"consul.example\": missing port; write host:port (e.g. \
             consul.example:8500), or http://host or https://host for port 80 or 443"
        );
        assert!(address_error("[::1]").contains("missing port"));
    }

    #[test]
    fn leading_zeros_in_the_port_are_dropped() {
        assert_eq!(address("a:08500"), tcp(Scheme::Http, "a:8500"));
        assert_eq!(address("a:0000000001"), tcp(Scheme::Http, "a:1"));
    }

    #[test]
    fn accepts_unix_sockets() {
        assert_eq!(
            address("unix:///var/run/consul.sock"),
            Address::Unix {
                path: PathBuf::from("/var/run/consul.sock")
            }
        );
        let c = config(&[(HTTP_ADDR, "unix:///var/run/consul.sock")]);
        assert_eq!(c.base_url(), "http://localhost");
    }

    #[test]
    fn rejects_unsupported_schemes() {
        assert_eq!(
            address_error("htp://x"),
            "CONSUL_HTTP_ADDR=\"htp://x\": unsupported scheme \"htp\"; use host:port, \
             http://host:port, https://host:port or unix:///path/to/socket"
        );
        assert!(address_error("ftp://a:1").contains("unsupported scheme \"ftp\""));
        assert!(address_error("://a:1").contains("unsupported scheme \"\""));
        assert!(matches!(
            error(&[(HTTP_ADDR, "tcp://a:1")]),
            ConfigError::InvalidAddress { ref variable, .. } if variable == HTTP_ADDR
        ));
    }

    #[test]
    fn rejects_bad_ports() {
        assert_eq!(
            address_error("127.0.0.1:0"),
            "CONSUL_HTTP_ADDR=\"127.0.0.1:0\": port 0 is out of range; use a port from 1 to 65535"
        );
        assert_eq!(
            address_error("127.0.0.1:70000"),
            "CONSUL_HTTP_ADDR=\"127.0.0.1:70000\": port 70000 is out of range; use a port from \
             1 to 65535"
        );
        assert_eq!(
            address_error("127.0.0.1:abc"),
            "CONSUL_HTTP_ADDR=\"127.0.0.1:abc\": port \"abc\" is not a number; use a port from \
             1 to 65535"
        );
        assert!(address_error("a:65536").contains("out of range"));
        assert!(address_error("a:99999999999999999999999").contains("out of range"));
        assert!(address_error("a:-1").contains("not a number"));
        assert!(address_error("a:+80").contains("not a number"));
        assert!(address_error("a:").contains("empty port"));
        assert!(address_error("https://a:").contains("empty port"));
        assert!(address_error("[::1]:0").contains("out of range"));
    }

    #[test]
    fn rejects_userinfo_without_repeating_it() {
        let message = address_error("https://admin:hunter2@consul.example:8501");
        assert!(message.contains("user info"), "{message}");
        assert!(message.contains(HTTP_TOKEN), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!message.contains("admin"), "{message}");
        assert!(message.starts_with("CONSUL_HTTP_ADDR=\"https://<redacted>@consul.example:8501\""));
        let debug = format!("{:?}", error(&[(HTTP_ADDR, "u:hunter2@a:1")]));
        assert!(!debug.contains("hunter2"), "{debug}");
        // Any other error about such an address redacts it too.
        let message = address_error("htp://u:hunter2 x@a");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn rejects_paths_queries_and_fragments() {
        assert_eq!(
            address_error("http://consul.example:8500/v1/kv"),
            "CONSUL_HTTP_ADDR=\"http://consul.example:8500/v1/kv\": unexpected \"/v1/kv\" after \
             the host and port; give only host:port (the client adds the API paths itself, and \
             path prefixes are not supported)"
        );
        assert!(address_error("a:1/consul").contains("unexpected \"/consul\""));
        assert!(address_error("https://a:1?dc=x").contains("unexpected \"?dc=x\""));
        assert!(address_error("https://a:1#top").contains("unexpected \"#top\""));
        assert!(address_error("https://a:1/?x").contains("unexpected \"/?x\""));
    }

    #[test]
    fn rejects_whitespace_and_control_characters() {
        for value in [" 127.0.0.1:8500", "127.0.0.1:8500 ", "a b:1", "a:1\n", "a\t:1"] {
            assert!(
                address_error(value).contains("white space"),
                "{value:?}: {}",
                address_error(value)
            );
        }
    }

    #[test]
    fn rejects_bad_hosts() {
        assert!(address_error(":8500").contains("missing host"));
        assert!(address_error("http://:8500").contains("missing host"));
        assert!(address_error("https://").contains("missing host and port"));
        assert!(address_error("256.0.0.1:1").contains("not a valid IPv4 address"));
        assert!(address_error("1.2.3:1").contains("not a valid IPv4 address"));
        assert!(address_error("a..b:1").contains("empty label"));
        assert!(address_error(".a:1").contains("empty label"));
        assert!(address_error("-a:1").contains("starts or ends with '-'"));
        assert!(address_error("a-.b:1").contains("starts or ends with '-'"));
        assert!(address_error("bücher.example:1").contains("xn--"));
        assert!(address_error("a*b:1").contains("contains '*'"));
        let label = "a".repeat(64);
        assert!(address_error(&format!("{label}:1")).contains("longer than 63"));
        let long = [
            "a".repeat(60),
            "b".repeat(60),
            "c".repeat(60),
            "d".repeat(60),
            "e".repeat(20),
        ]
        .join(".");
        assert!(address_error(&format!("{long}:1")).contains("longer than 253"));
    }

    #[test]
    fn rejects_bad_ipv6() {
        assert!(address_error("::1:8500").contains("IPv6 hosts in brackets"));
        assert!(address_error("::1").contains("IPv6 hosts in brackets"));
        assert!(address_error("[::1:8500").contains("missing \"]\""));
        assert!(address_error("[zz::1]:8500").contains("not a valid IPv6 address"));
        assert!(address_error("[127.0.0.1]:8500").contains("not a valid IPv6 address"));
        assert!(address_error("[fe80::1%eth0]:8500").contains("not a valid IPv6 address"));
        assert!(address_error("[::1]8500").contains("unexpected \"8500\" after \"]\""));
    }

    #[test]
    fn rejects_bad_unix_paths() {
        assert_eq!(
            address_error("unix://var/run/consul.sock"),
            "CONSUL_HTTP_ADDR=\"unix://var/run/consul.sock\": socket path \
             \"var/run/consul.sock\" is not absolute; write unix:///absolute/path/to/socket \
             (three slashes)"
        );
        assert!(address_error("unix://").contains("missing socket path"));
    }

    #[test]
    fn long_values_are_cut_short() {
        let value = format!("htp://{}", "x".repeat(500));
        let message = address_error(&value);
        assert!(message.len() < 400, "{message}");
        assert!(message.contains('…'));
        let ConfigError::InvalidAddress { value: quoted, .. } = error(&[(HTTP_ADDR, &value)]) else {
            panic!("wrong variant");
        };
        assert_eq!(quoted.chars().count(), MAX_QUOTED_CHARS + 1);
    }

    // ---- parse_authority (ClientConfig::http) ----

    #[test]
    fn parse_authority_requires_a_port() {
        assert_eq!(
            parse_authority("address", "127.0.0.1:8500").unwrap(),
            "127.0.0.1:8500"
        );
        assert_eq!(parse_authority("address", "[::1]:1").unwrap(), "[::1]:1");
        assert_eq!(
            parse_authority("address", "consul.example")
                .unwrap_err()
                .to_string(),
            "address=\"consul.example\": missing port; write host:port, e.g. 127.0.0.1:8500"
        );
        assert_eq!(
            parse_authority("address", "").unwrap_err().to_string(),
            "address=\"\": missing host and port; write host:port, e.g. 127.0.0.1:8500"
        );
        assert!(parse_authority("address", "http://a:1").is_err());
        assert!(
            parse_authority("-http-addr", "u@a:1")
                .unwrap_err()
                .to_string()
                .starts_with("-http-addr=\"<redacted>@a:1\"")
        );
    }

    #[test]
    fn client_config_http_uses_parse_authority() {
        assert_eq!(
            ClientConfig::http("consul.example:8500").unwrap().base_url(),
            "http://consul.example:8500"
        );
        assert!(matches!(
            ClientConfig::http("a:0"),
            Err(ConfigError::InvalidAddress { .. })
        ));
    }

    // ---- CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY ----

    #[test]
    fn ssl_switches_schemeless_and_http_addresses_to_https() {
        let with_ssl = |addr: &str| config(&[(HTTP_SSL, "true"), (HTTP_ADDR, addr)]).address;
        assert_eq!(with_ssl("a:8501"), tcp(Scheme::Https, "a:8501"));
        assert_eq!(with_ssl("http://a:8501"), tcp(Scheme::Https, "a:8501"));
        assert_eq!(with_ssl("http://a"), tcp(Scheme::Https, "a:443"));
        assert_eq!(with_ssl("https://a:1"), tcp(Scheme::Https, "a:1"));
        assert!(matches!(with_ssl("unix:///s"), Address::Unix { .. }));
        assert_eq!(config(&[(HTTP_SSL, "1")]).base_url(), "https://127.0.0.1:8500");
    }

    #[test]
    fn ssl_false_keeps_the_written_scheme() {
        let without = |addr: &str| config(&[(HTTP_SSL, "false"), (HTTP_ADDR, addr)]).address;
        assert_eq!(without("a:1"), tcp(Scheme::Http, "a:1"));
        assert_eq!(without("https://a:1"), tcp(Scheme::Https, "a:1"));
    }

    #[test]
    fn booleans_take_gos_spellings() {
        for on in ["1", "t", "T", "TRUE", "true", "True"] {
            let c = config(&[(HTTP_SSL, on), (HTTP_SSL_VERIFY, on)]);
            assert_eq!(c.base_url(), "https://127.0.0.1:8500", "{on}");
            assert!(c.tls.verify, "{on}");
        }
        for off in ["0", "f", "F", "FALSE", "false", "False"] {
            let c = config(&[(HTTP_SSL, off), (HTTP_SSL_VERIFY, off)]);
            assert_eq!(c.base_url(), "http://127.0.0.1:8500", "{off}");
            assert!(!c.tls.verify, "{off}");
        }
    }

    #[test]
    fn ssl_verify_defaults_to_true() {
        assert!(config(&[]).tls.verify);
        assert!(!config(&[(HTTP_SSL_VERIFY, "0")]).tls.verify);
    }

    #[test]
    fn rejects_other_booleans() {
        assert_eq!(
            error(&[(HTTP_SSL, "yes")]).to_string(),
            "CONSUL_HTTP_SSL=\"yes\": not a boolean; use 1, t, T, TRUE, true or True to turn it \
             on, or 0, f, F, FALSE, false or False to turn it off"
        );
        for bad in ["yes", "on", "tRUE", " true", "true ", "2"] {
            assert_eq!(
                error(&[(HTTP_SSL_VERIFY, bad)]),
                ConfigError::InvalidBool {
                    variable: HTTP_SSL_VERIFY.to_owned(),
                    value: bad.to_owned(),
                },
            );
        }
    }

    // ---- TLS files, server name, namespace, partition ----

    #[test]
    fn reads_tls_settings() {
        let c = config(&[
            (CACERT, "/etc/consul/ca.pem"),
            (CAPATH, "/etc/consul/ca.d"),
            (CLIENT_CERT, "/etc/consul/client.pem"),
            (CLIENT_KEY, "client-key.pem"),
            (TLS_SERVER_NAME, "server.dc1.consul"),
        ]);
        assert_eq!(
            c.tls,
            TlsConfig {
                verify: true,
                ca_file: Some(PathBuf::from("/etc/consul/ca.pem")),
                ca_path: Some(PathBuf::from("/etc/consul/ca.d")),
                client_cert: Some(PathBuf::from("/etc/consul/client.pem")),
                client_key: Some(PathBuf::from("client-key.pem")),
                server_name: Some("server.dc1.consul".to_owned()),
            }
        );
    }

    #[test]
    fn reads_namespace_and_partition() {
        let c = config(&[(NAMESPACE, "team-a"), (PARTITION, "part-1")]);
        assert_eq!(c.namespace.as_deref(), Some("team-a"));
        assert_eq!(c.partition.as_deref(), Some("part-1"));
        assert_eq!(c.datacenter, None);
    }

    #[test]
    fn rejects_a_client_cert_without_key_and_vice_versa() {
        assert_eq!(
            error(&[(CLIENT_CERT, "/etc/consul/client.pem")]).to_string(),
            "CONSUL_CLIENT_CERT=\"/etc/consul/client.pem\" is set but CONSUL_CLIENT_KEY is not; a \
             client certificate needs its private key: set both CONSUL_CLIENT_CERT and \
             CONSUL_CLIENT_KEY, or neither"
        );
        assert_eq!(
            error(&[(CLIENT_KEY, "/k.pem"), (CLIENT_CERT, "")]),
            ConfigError::IncompleteClientCert {
                variable: CLIENT_KEY.to_owned(),
                value: "/k.pem".to_owned(),
                missing: CLIENT_CERT.to_owned(),
            }
        );
    }

    // ---- tokens ----

    #[test]
    fn reads_the_token_from_the_environment() {
        let c = config(&[(HTTP_TOKEN, TOKEN)]);
        assert_eq!(c.token.unwrap().expose().to_str().unwrap(), TOKEN);
        let c = config(&[(HTTP_TOKEN, "  tok \n")]);
        assert_eq!(c.token.unwrap().expose().to_str().unwrap(), "tok");
        assert_eq!(config(&[(HTTP_TOKEN, "  ")]).token, None);
    }

    #[test]
    fn reads_the_token_file_which_wins() {
        let mut calls = Vec::new();
        let c = ClientConfig::from_env(
            &vars(&[(HTTP_TOKEN, "from-env"), (HTTP_TOKEN_FILE, "/run/token")]),
            |path: &Path| {
                calls.push(path.to_path_buf());
                Ok(format!("\n  {TOKEN}  \n"))
            },
        )
        .unwrap();
        assert_eq!(c.token.unwrap().expose().to_str().unwrap(), TOKEN);
        assert_eq!(calls, [PathBuf::from("/run/token")]);
    }

    #[test]
    fn token_file_alone() {
        let c = ClientConfig::from_env(&vars(&[(HTTP_TOKEN_FILE, "t")]), |_: &Path| {
            Ok("file-token".to_owned())
        })
        .unwrap();
        assert_eq!(c.token.unwrap().expose().to_str().unwrap(), "file-token");
    }

    #[test]
    fn rejects_an_unreadable_token_file() {
        let e = ClientConfig::from_env(&vars(&[(HTTP_TOKEN_FILE, "/missing/token")]), |_: &Path| {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                "No such file or directory",
            ))
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CONSUL_HTTP_TOKEN_FILE=\"/missing/token\": cannot read the token file: No such file \
             or directory (kind: NotFound); check the path and its permissions, or unset \
             CONSUL_HTTP_TOKEN_FILE"
        );
        let e = ClientConfig::from_env(&vars(&[(HTTP_TOKEN_FILE, "/root/t")]), |_: &Path| {
            Err(io::Error::from(io::ErrorKind::PermissionDenied))
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::TokenFile { ref path, .. } if path == "/root/t"));
        assert!(e.to_string().contains("PermissionDenied"), "{e}");
    }

    #[test]
    fn rejects_an_empty_token_file() {
        for contents in ["", " \n\t\n"] {
            let e = ClientConfig::from_env(
                &vars(&[(HTTP_TOKEN, TOKEN), (HTTP_TOKEN_FILE, "/run/token")]),
                |_: &Path| Ok(contents.to_owned()),
            )
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                "CONSUL_HTTP_TOKEN_FILE=\"/run/token\": the token file is empty (or only white \
                 space); put the ACL token in it, or unset CONSUL_HTTP_TOKEN_FILE"
            );
        }
    }

    #[test]
    fn rejects_tokens_an_http_header_cannot_carry() {
        let secret = "abc\u{1}def-secret";
        let e = error(&[(HTTP_TOKEN, secret)]);
        assert_eq!(
            e,
            ConfigError::InvalidToken {
                variable: HTTP_TOKEN.to_owned(),
                problem: InvalidToken::NotHeaderSafe,
            }
        );
        assert_eq!(
            e.to_string(),
            "CONSUL_HTTP_TOKEN: the token holds characters that can't be sent in an HTTP header \
             (control or non-ASCII); set it to the ACL token alone"
        );
        assert!(!format!("{e} {e:?}").contains("def-secret"));
        assert!(matches!(
            error(&[(HTTP_TOKEN, "tökén")]),
            ConfigError::InvalidToken { .. }
        ));
        let e = ClientConfig::from_env(&vars(&[(HTTP_TOKEN_FILE, "/t")]), |_: &Path| {
            Ok("line one\nline two secret".to_owned())
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::TokenFile { .. }), "{e}");
        assert!(
            e.to_string().contains("put only the ACL token in the file"),
            "{e}"
        );
        assert!(!format!("{e} {e:?}").contains("secret"));
    }

    #[test]
    fn an_unusable_env_token_is_ignored_when_the_file_wins() {
        let c = ClientConfig::from_env(
            &vars(&[(HTTP_TOKEN, "bad\u{7f}"), (HTTP_TOKEN_FILE, "/t")]),
            |_: &Path| Ok("good".to_owned()),
        )
        .unwrap();
        assert_eq!(c.token.unwrap().expose().to_str().unwrap(), "good");
    }

    #[test]
    fn the_token_never_appears_in_debug_output() {
        let c = config(&[(HTTP_TOKEN, TOKEN)]);
        let debug = format!("{c:?}");
        assert!(!debug.contains(TOKEN), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
        let c = ClientConfig::from_env(&vars(&[(HTTP_TOKEN_FILE, "/t")]), |_: &Path| Ok(TOKEN.to_owned()))
            .unwrap();
        assert!(!format!("{c:?} {c:#?}").contains(TOKEN));
    }

    fn assert_no_token(e: &ConfigError, secret: &str) {
        let text = format!("{e} {e:?} {e:#?}");
        assert!(!text.contains(secret), "{text}");
        // Not even a long piece of it.
        assert!(!text.contains(&secret[..12]), "{text}");
    }

    #[test]
    fn the_token_never_appears_in_errors() {
        let with_token = |pairs: &[(&str, &str)]| {
            let mut v = vars(pairs);
            v.insert(HTTP_TOKEN.to_owned(), TOKEN.to_owned());
            ClientConfig::from_env(&v, no_file).unwrap_err()
        };
        // Malformed values next to a token.
        for e in [
            with_token(&[(HTTP_ADDR, "htp://x")]),
            with_token(&[(HTTP_SSL, "yes")]),
            with_token(&[(CLIENT_CERT, "/c")]),
        ] {
            assert_no_token(&e, TOKEN);
        }
        // The token pasted into the wrong variable.
        for variable in [HTTP_ADDR, HTTP_SSL, HTTP_SSL_VERIFY, CLIENT_CERT, CLIENT_KEY] {
            let e = with_token(&[(variable, TOKEN)]);
            assert_no_token(&e, TOKEN);
            assert!(e.to_string().contains("<redacted>"), "{e}");
        }
        for value in [
            format!("htp://{TOKEN}"),
            format!("https://{TOKEN}:99999"),
            format!("a:1/{TOKEN}"),
            format!("a:{TOKEN}"),
            format!("[{TOKEN}]:1"),
            format!("unix://{TOKEN}"),
            format!("{TOKEN}@a:1"),
            format!("{}{TOKEN}", "x".repeat(95)),
        ] {
            assert_no_token(&with_token(&[(HTTP_ADDR, &value)]), TOKEN);
        }
    }

    #[test]
    fn the_token_file_contents_never_appear_in_errors() {
        let e = ClientConfig::from_env(
            &vars(&[(HTTP_TOKEN_FILE, "/t"), (HTTP_ADDR, TOKEN)]),
            |_: &Path| Ok(TOKEN.to_owned()),
        )
        .unwrap_err();
        assert_no_token(&e, TOKEN);
        // An I/O error that (oddly) quotes CONSUL_HTTP_TOKEN, or a path holding it.
        let e = ClientConfig::from_env(
            &vars(&[(HTTP_TOKEN, TOKEN), (HTTP_TOKEN_FILE, &format!("/x/{TOKEN}"))]),
            |_: &Path| Err(io::Error::other(format!("bad {TOKEN}"))),
        )
        .unwrap_err();
        assert_no_token(&e, TOKEN);
    }

    #[test]
    fn from_env_vars_takes_any_pairs() {
        let c = ClientConfig::from_env_vars(
            vec![
                ("PATH".to_owned(), "/bin".to_owned()),
                (HTTP_ADDR.to_owned(), "a:1".to_owned()),
                (HTTP_ADDR.to_owned(), "b:2".to_owned()),
                (NAMESPACE.to_owned(), "ns".to_owned()),
            ],
            no_file,
        )
        .unwrap();
        assert_eq!(c.address, tcp(Scheme::Http, "b:2"));
        assert_eq!(c.namespace.as_deref(), Some("ns"));
    }

    #[test]
    fn read_file_is_not_called_without_a_token_file() {
        let mut called = false;
        ClientConfig::from_env(&vars(&[(HTTP_TOKEN, TOKEN)]), |_: &Path| {
            called = true;
            Ok(String::new())
        })
        .unwrap();
        assert!(!called);
    }

    // ---- properties ----

    fn address_like() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "(https?://|unix://|[a-z]{0,5}://)?[a-z0-9.:\\[\\]@/?#% _-]{0,40}",
            "(https?://)?(\\[[0-9a-f:]{0,20}\\]|[a-z0-9.-]{0,20})(:[0-9]{0,7})?/?",
        ]
    }

    proptest! {
        #[test]
        fn from_env_never_panics_on_any_address(addr in address_like(), ssl in any::<bool>()) {
            let v = vars(&[(HTTP_ADDR, &addr), (HTTP_SSL, if ssl { "true" } else { "false" })]);
            match ClientConfig::from_env(&v, no_file) {
                Ok(c) => {
                    if let Address::Tcp { authority, .. } = &c.address {
                        prop_assert!(authority.port_u16().is_some());
                        let reparsed = authority.as_str().parse::<Authority>().unwrap();
                        prop_assert_eq!(&reparsed, authority);
                    }
                    let uri = format!("{}/v1/status/leader", c.base_url());
                    prop_assert!(uri.parse::<http::Uri>().is_ok(), "{}", uri);
                }
                Err(e) => {
                    prop_assert!(matches!(e, ConfigError::InvalidAddress { .. }), "{:?}", e);
                    prop_assert!(e.to_string().starts_with("CONSUL_HTTP_ADDR="));
                }
            }
        }

        #[test]
        fn parse_authority_results_have_a_port_and_round_trip(value in address_like()) {
            if let Ok(authority) = parse_authority("address", &value) {
                prop_assert!(authority.port_u16().is_some());
                prop_assert_eq!(authority.as_str().parse::<Authority>().unwrap(), authority);
            }
        }

        #[test]
        fn errors_never_contain_the_token(
            addr in address_like(),
            token in "[A-Za-z0-9-]{12,40}",
            in_addr in any::<bool>(),
        ) {
            let addr = if in_addr { format!("{addr}{token}") } else { addr };
            let v = vars(&[(HTTP_ADDR, &addr), (HTTP_TOKEN, &token)]);
            if let Err(e) = ClientConfig::from_env(&v, no_file) {
                let text = format!("{e} {e:?}");
                prop_assert!(!text.contains(&token), "{}", text);
            }
        }
    }
}
