//! TLS against a real agent serving HTTPS with certificates made by `consul tls`: a CA file, no
//! CA (a clear error, not a hang), `CONSUL_HTTP_SSL_VERIFY=false`, client certificates with
//! `verify_incoming_https`, and `CONSUL_TLS_SERVER_NAME`, all configured through
//! `ClientConfig::from_env` as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use consul_lock_testkit::agent::{AgentOptions, ConsulAgent, require_new_agent_with};
use consul_lock_tokio::{Client, ClientConfig, Error, LockError, LockOptions};

/// An HTTPS agent that does not ask for client certificates, listening on 127.0.0.1 and on
/// 127.0.0.2 (an address its certificate does not name).
fn open_agent() -> Option<&'static ConsulAgent> {
    static AGENT: OnceLock<Option<ConsulAgent>> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            require_new_agent_with(
                AgentOptions::default()
                    .tls()
                    .hcl(r#"addresses { https = "127.0.0.1 127.0.0.2" }"#),
            )
        })
        .as_ref()
}

/// An HTTPS agent that requires a client certificate from its CA.
fn strict_agent() -> Option<&'static ConsulAgent> {
    static AGENT: OnceLock<Option<ConsulAgent>> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            require_new_agent_with(AgentOptions::default().tls().hcl("verify_incoming_https = true"))
        })
        .as_ref()
}

/// A client configured from `vars`, as `Client::from_env` would from the process environment.
fn client(vars: &[(&str, String)]) -> Client {
    let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let config =
        ClientConfig::from_env(&vars, |path: &std::path::Path| std::fs::read_to_string(path)).unwrap();
    Client::new(config).unwrap()
}

fn https_addr(agent: &ConsulAgent, host: &str) -> String {
    format!("https://{host}:{}", agent.https_addr().unwrap().port())
}

fn ca(agent: &ConsulAgent) -> String {
    agent.tls_files().unwrap().ca.display().to_string()
}

fn options(key: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = format!("tokio tls {key}");
    }
    options
}

/// Acquires and releases `key`: the round trip works end to end.
async fn lock_round_trip(client: &Client, key: &str) {
    let lock = client.lock(options(key)).unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(20), lock.acquire())
        .await
        .expect("acquired in time")
        .expect("acquired");
    assert!(guard.is_held());
    assert_eq!(guard.token().key.as_str(), key);
    assert!(guard.token().lock_index > 0);
    guard.release().await.unwrap();
}

/// An acquisition that must fail: it does, soon, with an error that names the TLS problem.
async fn lock_fails(client: &Client, key: &str, expect: &[&str]) -> String {
    let lock = client.lock(options(key)).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), lock.acquire())
        .await
        .expect("an error, not a hang");
    let took = started.elapsed();
    let err = match result {
        Ok(_) => panic!("{key}: acquired, but the TLS setup should have been refused"),
        Err(err) => err,
    };
    assert!(matches!(err, Error::Lock(LockError::Tls(_))), "{key}: {err:?}");
    let text = err.to_string();
    assert!(
        expect.iter().any(|e| text.contains(e)),
        "{key}: {text:?} names none of {expect:?}"
    );
    assert!(took < Duration::from_secs(5), "{key}: failed only after {took:?}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_acquire_release() {
    let Some(agent) = open_agent() else { return };
    let client = client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1")),
        ("CONSUL_CACERT", ca(agent)),
    ]);
    assert!(client.config().base_url().starts_with("https://"));
    lock_round_trip(&client, "tokio/tls/ca-file/.lock").await;

    // CONSUL_HTTP_SSL=true turns host:port into https, as for Consul's own clients.
    let client = self::client(&[
        ("CONSUL_HTTP_ADDR", agent.https_addr().unwrap().to_string()),
        ("CONSUL_HTTP_SSL", "true".into()),
        ("CONSUL_CACERT", ca(agent)),
    ]);
    lock_round_trip(&client, "tokio/tls/http-ssl/.lock").await;

    // A directory of CA certificates (CONSUL_CAPATH) works too: the agent's directory holds the
    // CA next to keys and other files, which are skipped.
    let dir = agent
        .tls_files()
        .unwrap()
        .ca
        .parent()
        .unwrap()
        .display()
        .to_string();
    let client = self::client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1")),
        ("CONSUL_CAPATH", dir),
    ]);
    lock_round_trip(&client, "tokio/tls/ca-path/.lock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_a_clear_error() {
    let Some(agent) = open_agent() else { return };
    let client = client(&[("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1"))]);
    let text = lock_fails(
        &client,
        "tokio/tls/no-ca/.lock",
        &["UnknownIssuer", "unknown issuer"],
    )
    .await;
    eprintln!("without CONSUL_CACERT: {text}");
    // The lock is usable again, and fails the same way (nothing wedged).
    let text = lock_fails(
        &client,
        "tokio/tls/no-ca/.lock",
        &["UnknownIssuer", "unknown issuer"],
    )
    .await;
    assert!(!text.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_false_without_ca() {
    let Some(agent) = open_agent() else { return };
    let client = client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1")),
        ("CONSUL_HTTP_SSL_VERIFY", "false".into()),
    ]);
    lock_round_trip(&client, "tokio/tls/no-verify/.lock").await;
    // Not checked at all: an address the certificate does not name is accepted too.
    let client = self::client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.2")),
        ("CONSUL_HTTP_SSL_VERIFY", "false".into()),
    ]);
    lock_round_trip(&client, "tokio/tls/no-verify-other-ip/.lock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate() {
    let Some(agent) = strict_agent() else { return };
    let files = agent.tls_files().unwrap();
    let client = client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1")),
        ("CONSUL_CACERT", ca(agent)),
        ("CONSUL_CLIENT_CERT", files.client_cert.display().to_string()),
        ("CONSUL_CLIENT_KEY", files.client_key.display().to_string()),
    ]);
    lock_round_trip(&client, "tokio/tls/client-cert/.lock").await;

    let client = self::client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1")),
        ("CONSUL_CACERT", ca(agent)),
    ]);
    let text = lock_fails(
        &client,
        "tokio/tls/no-client-cert/.lock",
        &["certificate", "Certificate", "handshake", "Handshake"],
    )
    .await;
    eprintln!("without a client certificate: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name() {
    let Some(agent) = open_agent() else { return };
    // 127.0.0.2 is not among the certificate's names (server.dc1.consul, localhost, 127.0.0.1).
    let client = client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.2")),
        ("CONSUL_CACERT", ca(agent)),
    ]);
    let text = lock_fails(
        &client,
        "tokio/tls/wrong-ip/.lock",
        &["NotValidForName", "not valid for name"],
    )
    .await;
    eprintln!("127.0.0.2 without CONSUL_TLS_SERVER_NAME: {text}");

    // Naming the server makes the same address work: the name is what is checked.
    let client = self::client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.2")),
        ("CONSUL_CACERT", ca(agent)),
        ("CONSUL_TLS_SERVER_NAME", "server.dc1.consul".into()),
    ]);
    lock_round_trip(&client, "tokio/tls/server-name/.lock").await;

    // And a name the certificate lacks fails even on 127.0.0.1, which the certificate does name:
    // the address is only where to connect.
    let client = self::client(&[
        ("CONSUL_HTTP_ADDR", https_addr(agent, "127.0.0.1")),
        ("CONSUL_CACERT", ca(agent)),
        ("CONSUL_TLS_SERVER_NAME", "other.dc1.consul".into()),
    ]);
    let text = lock_fails(
        &client,
        "tokio/tls/wrong-name/.lock",
        &["NotValidForName", "not valid for name"],
    )
    .await;
    eprintln!("127.0.0.1 named other.dc1.consul: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_a_plain_http_port() {
    let Some(agent) = open_agent() else { return };
    let client = client(&[
        ("CONSUL_HTTP_ADDR", format!("https://{}", agent.http_addr())),
        ("CONSUL_CACERT", ca(agent)),
    ]);
    let text = lock_fails(
        &client,
        "tokio/tls/plain-port/.lock",
        &["corrupt message", "InvalidContentType"],
    )
    .await;
    eprintln!("https to the plain HTTP port: {text}");
}
