//! Messages that point at the right thing, against real agents: a certificate failure is about
//! TLS (not "no agent answers … start an agent"); `demo --consul` takes `http://host:port` as
//! every other command takes an address; a key with a control character is refused with a
//! message about the key; `RUST_LOG` shows the library's own tracing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Running, consul_lock, unique_prefix};
use consul_lock_testkit::agent::{AgentOptions, require_agent, require_new_agent_with};

const EXIT: Duration = Duration::from_secs(60);

#[test]
fn a_certificate_failure_is_about_tls_not_a_missing_agent() {
    let Some(agent) = require_new_agent_with(AgentOptions::default().tls()) else {
        return;
    };
    let https = format!("https://{}", agent.https_addr().unwrap());
    let prefix = unique_prefix("tls");
    // No CA given: the agent's certificate is not trusted.
    for command in [
        vec!["status", "--http-addr", &https, &prefix],
        vec!["run", "--http-addr", &https, &prefix, "true"],
    ] {
        let (status, _, stderr) = Running::spawn(consul_lock(&agent, &command)).finish(EXIT);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("TLS"), "{stderr}");
        assert!(stderr.contains("--ca-file"), "{stderr}");
        assert!(!stderr.contains("no Consul agent answers"), "{stderr}");
        assert!(!stderr.contains("Start an agent"), "{stderr}");
    }
    // With the CA it works.
    let ca = agent.tls_files().unwrap().ca.display().to_string();
    let (status, _, stderr) = Running::spawn(consul_lock(
        &agent,
        &["status", "-http-addr", &https, "-ca-file", &ca, &prefix],
    ))
    .finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn demo_takes_an_http_url_like_every_other_command() {
    let Some(agent) = require_agent() else { return };
    let url = format!("http://{}", agent.http_addr());
    let (status, stdout, stderr) = Running::spawn(consul_lock(
        agent,
        &["demo", "--quick", "--contenders", "2", "--consul", &url],
    ))
    .finish(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stderr.contains("not a host:port"), "{stderr}");
    let (status, _, stderr) = Running::spawn(consul_lock(
        agent,
        &["demo", "--quick", "--consul", "unix:///tmp/nowhere"],
    ))
    .finish(EXIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("plain HTTP"), "{stderr}");
}

#[test]
fn a_control_character_in_a_key_is_refused_as_such() {
    let Some(agent) = require_agent() else { return };
    let key = format!("{}/a\u{1}b", unique_prefix("ctl"));
    for args in [
        vec!["run", &key, "true"],
        vec!["status", &key],
        vec!["watch", &key],
    ] {
        let (status, _, stderr) = Running::spawn(consul_lock(agent, &args)).finish(EXIT);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("control character (U+0001)"), "{stderr}");
        assert!(
            !stderr.contains('\u{1}'),
            "the key is printed escaped: {stderr:?}"
        );
    }
}

#[test]
fn rust_log_shows_the_librarys_tracing() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("rust-log");
    let mut command = consul_lock(agent, &["run", &prefix, "true"]);
    command.env("RUST_LOG", "consul_lock_core=info");
    let (status, _, stderr) = Running::spawn(command).finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("lock acquired"), "{stderr}");
    // Without RUST_LOG, nothing of the kind.
    let (status, _, stderr) = Running::spawn(consul_lock(agent, &["run", &prefix, "true"])).finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("lock acquired"), "{stderr}");
}

/// `--queue` is a lock's: with a semaphore's `-n 2` it is refused as a usage error rather than
/// ignored, and nothing is run.
#[test]
fn queue_with_a_semaphore_is_a_usage_error() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("queue-n2");
    let (status, _, stderr) =
        Running::spawn(consul_lock(agent, &["run", "-queue", "-n", "2", &prefix, "true"])).finish(EXIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--queue is for a lock (-n 1)"), "{stderr}");
}
