//! From the HTTP options and the environment to a [`ClientConfig`], with one parser: the flags
//! are written into a copy of the `CONSUL_*` variables as the variables they stand for, and
//! [`ClientConfig::from_env`] reads the result. Where each setting came from is kept for error
//! messages ("no agent at ... (from CONSUL_HTTP_ADDR)", "the token from --token-file ...").

use std::collections::HashMap;
use std::path::Path;

use consul_lock_core::api::ClientConfig;

use crate::Failure;
use crate::cli::HttpFlags;

/// A client config and where its address and token came from.
#[derive(Clone, Debug)]
pub(crate) struct Resolved {
    /// The config.
    pub(crate) config: ClientConfig,
    /// Where the agent's address came from, for messages.
    pub(crate) addr_source: String,
    /// Where the ACL token came from, for messages.
    pub(crate) token_source: String,
}

impl Resolved {
    /// The agent's base URL (`http://127.0.0.1:8500`, or `unix:///path`).
    pub(crate) fn url(&self) -> String {
        match &self.config.address {
            consul_lock_core::api::Address::Unix { path } => format!("unix://{}", path.display()),
            _ => self.config.base_url(),
        }
    }
}

const HTTP_ADDR: &str = "CONSUL_HTTP_ADDR";
const HTTP_TOKEN: &str = "CONSUL_HTTP_TOKEN";
const HTTP_TOKEN_FILE: &str = "CONSUL_HTTP_TOKEN_FILE";

/// The process's `CONSUL_*` variables (those that are valid UTF-8).
pub(crate) fn consul_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("CONSUL_"))
        .collect()
}

/// The config for `flags` over the variables `env`, reading the token file with `read_file`.
pub(crate) fn resolve<F>(
    flags: &HttpFlags,
    mut env: HashMap<String, String>,
    read_file: F,
) -> Result<Resolved, Failure>
where
    F: FnMut(&Path) -> std::io::Result<String>,
{
    let set = |env: &mut HashMap<String, String>, name: &str, value: Option<String>| {
        if let Some(value) = value {
            env.insert(name.to_owned(), value);
        }
    };
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let non_empty =
        |env: &HashMap<String, String>, name: &str| env.get(name).is_some_and(|v| !v.trim().is_empty());

    let addr_source = if flags.http_addr.is_some() {
        crate::goflags::typed("http-addr")
    } else if non_empty(&env, HTTP_ADDR) {
        HTTP_ADDR.to_owned()
    } else {
        format!("the default, as {HTTP_ADDR} is unset")
    };
    set(&mut env, HTTP_ADDR, flags.http_addr.clone());

    // A token given on the command line beats the environment's token file (Go lets the file
    // win); --token-file beats --token, as the variables do.
    if flags.token.is_some() && flags.token_file.is_none() {
        env.remove(HTTP_TOKEN_FILE);
    }
    set(&mut env, HTTP_TOKEN, flags.token.clone());
    set(&mut env, HTTP_TOKEN_FILE, path(&flags.token_file));
    let token_source = if let Some(file) = &flags.token_file {
        format!(
            "the token from {} {}",
            crate::goflags::typed("token-file"),
            file.display()
        )
    } else if let Some(file) = env.get(HTTP_TOKEN_FILE).filter(|v| !v.is_empty()) {
        format!("the token from {HTTP_TOKEN_FILE}={file}")
    } else if flags.token.as_deref().is_some_and(|t| !t.trim().is_empty()) {
        format!("the token from {}", crate::goflags::typed("token"))
    } else if non_empty(&env, HTTP_TOKEN) {
        format!("the token from {HTTP_TOKEN}")
    } else {
        format!("no token (anonymous): set {HTTP_TOKEN} or {HTTP_TOKEN_FILE}, or pass --token")
    };

    set(&mut env, "CONSUL_CACERT", path(&flags.ca_file));
    set(&mut env, "CONSUL_CAPATH", path(&flags.ca_path));
    set(&mut env, "CONSUL_CLIENT_CERT", path(&flags.client_cert));
    set(&mut env, "CONSUL_CLIENT_KEY", path(&flags.client_key));
    set(&mut env, "CONSUL_TLS_SERVER_NAME", flags.tls_server_name.clone());
    set(&mut env, "CONSUL_NAMESPACE", flags.namespace.clone());
    set(&mut env, "CONSUL_PARTITION", flags.partition.clone());

    // Which variables the flags set: an error about one of them names the flag instead.
    let from_flags: Vec<(&str, &str)> = [
        (HTTP_TOKEN_FILE, "token-file", flags.token_file.is_some()),
        (HTTP_TOKEN, "token", flags.token.is_some()),
        (HTTP_ADDR, "http-addr", flags.http_addr.is_some()),
        ("CONSUL_CACERT", "ca-file", flags.ca_file.is_some()),
        ("CONSUL_CAPATH", "ca-path", flags.ca_path.is_some()),
        ("CONSUL_CLIENT_CERT", "client-cert", flags.client_cert.is_some()),
        ("CONSUL_CLIENT_KEY", "client-key", flags.client_key.is_some()),
        (
            "CONSUL_TLS_SERVER_NAME",
            "tls-server-name",
            flags.tls_server_name.is_some(),
        ),
        ("CONSUL_NAMESPACE", "namespace", flags.namespace.is_some()),
        ("CONSUL_PARTITION", "partition", flags.partition.is_some()),
    ]
    .into_iter()
    .filter(|(_, _, given)| *given)
    .map(|(var, flag, _)| (var, flag))
    .collect();
    let mut config = ClientConfig::from_env(&env, read_file)
        .map_err(|e| Failure::usage(name_the_flags(&e.to_string(), &from_flags)))?;
    // Consul's tools take the datacenter from the flag only: there is no variable for it.
    if let Some(dc) = &flags.datacenter {
        if dc.is_empty() {
            return Err(Failure::usage(format!(
                "{} is empty: leave it out for the agent's datacenter",
                crate::goflags::typed("datacenter")
            )));
        }
        config.datacenter = Some(dc.clone());
    }
    Ok(Resolved {
        config,
        addr_source,
        token_source,
    })
}

/// `message` with each variable of `from_flags` (variable, flag) that it names replaced by the
/// flag as the user typed it: the user set the flag, not the variable.
fn name_the_flags(message: &str, from_flags: &[(&str, &str)]) -> String {
    let mut text = message.to_owned();
    for (var, flag) in from_flags {
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find(var) {
            let after = &rest[at + var.len()..];
            // CONSUL_HTTP_TOKEN is not CONSUL_HTTP_TOKEN_FILE.
            if after.starts_with(|c: char| c == '_' || c.is_ascii_alphanumeric()) {
                out.push_str(&rest[..at + var.len()]);
            } else {
                out.push_str(&rest[..at]);
                out.push_str(&crate::goflags::typed(flag));
            }
            rest = after;
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// [`resolve`] on the process's environment and filesystem.
pub(crate) fn resolve_from_process(flags: &HttpFlags) -> Result<Resolved, Failure> {
    let resolved = resolve(flags, consul_env(), |p: &Path| std::fs::read_to_string(p))?;
    if let Some(warning) = verify_warning(&resolved.config) {
        crate::out::info(warning);
    }
    Ok(resolved)
}

/// The warning to print when the agent's certificate is not checked (`CONSUL_HTTP_SSL_VERIFY`
/// false): anyone on the path can then read the token and forge the lock's answers.
fn verify_warning(config: &ClientConfig) -> Option<&'static str> {
    (!config.tls.verify).then_some(
        "warning: CONSUL_HTTP_SSL_VERIFY=false: the agent's TLS certificate is not checked, so \
         anyone on the network path can read the ACL token and forge Consul's answers",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn token(r: &Resolved) -> String {
        r.config
            .token
            .as_ref()
            .unwrap()
            .expose()
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn flags_override_the_environment() {
        let flags = HttpFlags {
            http_addr: Some("https://consul.example:8501".into()),
            datacenter: Some("dc2".into()),
            namespace: Some("team".into()),
            ..HttpFlags::default()
        };
        let r = resolve(
            &flags,
            env(&[("CONSUL_HTTP_ADDR", "10.1.1.1:8500")]),
            |_: &Path| unreachable!(),
        )
        .unwrap();
        assert_eq!(r.config.base_url(), "https://consul.example:8501");
        assert_eq!(r.config.datacenter.as_deref(), Some("dc2"));
        assert_eq!(r.config.namespace.as_deref(), Some("team"));
        assert_eq!(r.addr_source, "--http-addr");
    }

    #[test]
    fn environment_applies_without_flags() {
        let r = resolve(
            &HttpFlags::default(),
            env(&[
                ("CONSUL_HTTP_ADDR", "10.1.1.1:8500"),
                ("CONSUL_HTTP_TOKEN", "secret"),
            ]),
            |_: &Path| unreachable!(),
        )
        .unwrap();
        assert_eq!(r.config.base_url(), "http://10.1.1.1:8500");
        assert_eq!(r.addr_source, "CONSUL_HTTP_ADDR");
        assert_eq!(token(&r), "secret");
        assert_eq!(r.token_source, "the token from CONSUL_HTTP_TOKEN");
        let r = resolve(&HttpFlags::default(), HashMap::new(), |_: &Path| unreachable!()).unwrap();
        assert_eq!(r.config.base_url(), "http://127.0.0.1:8500");
        assert!(r.addr_source.contains("default"), "{}", r.addr_source);
        assert!(r.token_source.starts_with("no token"), "{}", r.token_source);
    }

    #[test]
    fn token_flag_beats_the_environments_token_file() {
        let flags = HttpFlags {
            token: Some("from-flag".into()),
            ..HttpFlags::default()
        };
        let r = resolve(
            &flags,
            env(&[("CONSUL_HTTP_TOKEN_FILE", "/nowhere")]),
            |_: &Path| unreachable!(),
        )
        .unwrap();
        assert_eq!(token(&r), "from-flag");
        assert_eq!(r.token_source, "the token from --token");
    }

    #[test]
    fn token_file_flag_is_read_and_named() {
        let flags = HttpFlags {
            token: Some("ignored".into()),
            token_file: Some("/run/token".into()),
            ..HttpFlags::default()
        };
        let r = resolve(&flags, HashMap::new(), |p: &Path| {
            assert_eq!(p, Path::new("/run/token"));
            Ok("from-file\n".to_owned())
        })
        .unwrap();
        assert_eq!(token(&r), "from-file");
        assert_eq!(r.token_source, "the token from --token-file /run/token");
    }

    #[test]
    fn bad_values_are_named() {
        let flags = HttpFlags {
            http_addr: Some("htp://x".into()),
            ..HttpFlags::default()
        };
        let e = resolve(&flags, HashMap::new(), |_: &Path| unreachable!()).unwrap_err();
        assert!(e.message.contains("--http-addr=\"htp://x\""), "{}", e.message);
        let flags = HttpFlags {
            client_cert: Some("/c.pem".into()),
            ..HttpFlags::default()
        };
        let e = resolve(&flags, HashMap::new(), |_: &Path| unreachable!()).unwrap_err();
        assert!(e.message.contains("CONSUL_CLIENT_KEY"), "{}", e.message);
    }
}
