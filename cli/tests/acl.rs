//! Under ACLs, on a real agent: Consul leaves the keys a token may not read out of a listing (and
//! answers 404 when none is left), so `status` and `watch` must not call a held lock free when
//! their token can't see it: they read the lock's keys directly and report the denial. A token
//! Consul does not know is told so, not that it lacks a permission.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Running, Scratch, acl_token, consul_lock, unique_prefix, wait_for_file};
use consul_lock_testkit::agent::{ConsulAgent, require_acl_agent};

const EXIT: Duration = Duration::from_secs(30);

/// A token that may not read anything under `cli-test/hidden/`.
fn blind_token(agent: &ConsulAgent) -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        acl_token(
            agent,
            "cli-blind",
            r#"key_prefix "cli-test/hidden/" { policy = "deny" }"#,
        )
    })
}

#[test]
fn status_and_watch_report_a_denial_instead_of_a_free_lock() {
    let Some(agent) = require_acl_agent() else { return };
    let blind = blind_token(agent);
    let prefix = format!("cli-test/hidden/{}", unique_prefix("acl"));
    let scratch = Scratch::new("acl-status");
    let child = format!(
        "touch '{}'; {}",
        scratch.path("held").display(),
        scratch.wait_for("release")
    );
    let mut holder = consul_lock(agent, &["run", &prefix, "--", &child]);
    holder.env("CONSUL_HTTP_TOKEN", "root");
    let holder = Running::spawn(holder);
    wait_for_file(&scratch.path("held"), EXIT);

    // The root token sees the holder.
    let mut root = consul_lock(agent, &["status", "--json", &prefix]);
    root.env("CONSUL_HTTP_TOKEN", "root");
    let (status, stdout, stderr) = Running::spawn(root).finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("\"held\":true"), "{stdout}");

    // The blind one is told it can't know, not that nothing is held.
    for command in ["status", "watch"] {
        let (status, stdout, stderr) =
            Running::spawn(consul_lock(agent, &[command, "--token", blind, &prefix])).finish(EXIT);
        assert_eq!(status.code(), Some(1), "{command}: {stdout} {stderr}");
        assert!(!stdout.contains("no lock"), "{command}: {stdout}");
        assert!(stderr.contains("denied permission"), "{command}: {stderr}");
        assert!(
            stderr.contains("whether a lock is held there is unknown"),
            "{command}: {stderr}"
        );
        assert!(stderr.contains("the token from --token"), "{command}: {stderr}");
        assert!(!stderr.contains(blind), "the token is never printed: {stderr}");
    }

    scratch.touch("release");
    let (status, _, stderr) = holder.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn an_unknown_token_is_told_it_is_unknown() {
    let Some(agent) = require_acl_agent() else { return };
    let prefix = unique_prefix("acl-unknown");
    let unknown = "11111111-2222-3333-4444-555555555555";
    for args in [
        vec!["run", "--token", unknown, &prefix, "true"],
        vec!["status", "--token", unknown, &prefix],
    ] {
        let (status, _, stderr) = Running::spawn(consul_lock(agent, &args)).finish(EXIT);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("does not know the token"), "{stderr}");
        assert!(
            !stderr.contains("key_prefix"),
            "not a missing permission: {stderr}"
        );
    }
    let (status, stdout, stderr) = Running::spawn(consul_lock(
        agent,
        &["run", "-json", "-token", unknown, &prefix, "true"],
    ))
    .finish(EXIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.contains("\"kind\":\"token_not_found\""), "{stdout}");
}
