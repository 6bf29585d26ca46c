//! Keys too long for a request URI: `run` and `status` refuse them with a message and exit 1,
//! before any request (they used to reach a panic in request encoding and exit 101).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use consul_lock_core::api::Key;

/// `consul-lock <args>` aimed at a port nothing listens on: the key must be refused first.
fn consul_lock(args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(common::bin());
    common::scrub(&mut command);
    let output = command
        .env("CONSUL_HTTP_ADDR", "127.0.0.1:1")
        .env("SHELL", "/bin/sh")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run consul-lock");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Keys just over the limit once encoded: ASCII, and CJK (9 encoded bytes per character); and
/// a CJK key over the `http` crate's 64 KiB URI limit (72,000 bytes encoded).
fn over_limit_keys() -> [String; 3] {
    let cjk = Key::MAX_ENCODED_LEN / 9 + 1;
    [
        "k".repeat(Key::MAX_ENCODED_LEN + 1),
        "中".repeat(cjk),
        "中".repeat(8_000),
    ]
}

#[test]
fn run_refuses_a_key_too_long_to_encode() {
    for key in over_limit_keys() {
        for n in ["1", "2"] {
            let (code, stderr) = consul_lock(&["run", "-n", n, &key, "--", "true"]);
            assert_eq!(code, Some(1), "-n {n}: {stderr}");
            assert!(stderr.contains("too long once encoded"), "-n {n}: {stderr}");
            assert!(stderr.contains(&Key::MAX_ENCODED_LEN.to_string()), "{stderr}");
            assert!(
                stderr.len() < 2_000,
                "the key is not echoed whole: {} bytes",
                stderr.len()
            );
        }
    }
}

#[test]
fn status_refuses_a_key_too_long_to_encode() {
    for key in over_limit_keys() {
        let (code, stderr) = consul_lock(&["status", &key]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("too long once encoded"), "{stderr}");
    }
}
