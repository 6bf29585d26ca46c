//! With `CONSUL_HTTP_SSL_VERIFY=false` the CLI says on standard error that the agent's
//! certificate is not checked; with checks on it says nothing of the kind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

fn stderr_of_status(verify: Option<&str>) -> String {
    let mut command = Command::new(common::bin());
    common::scrub(&mut command);
    command
        .env("CONSUL_HTTP_ADDR", "https://127.0.0.1:1")
        .args(["status", "some/key"])
        .stdin(Stdio::null());
    if let Some(verify) = verify {
        command.env("CONSUL_HTTP_SSL_VERIFY", verify);
    }
    let output = command.output().expect("run consul-lock");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn turning_certificate_checks_off_is_warned_about() {
    let stderr = stderr_of_status(Some("false"));
    assert!(
        stderr.contains("warning: CONSUL_HTTP_SSL_VERIFY=false"),
        "{stderr}"
    );
    assert!(stderr.contains("not checked"), "{stderr}");
    for verify in [None, Some("true")] {
        let stderr = stderr_of_status(verify);
        assert!(!stderr.contains("warning"), "{verify:?}: {stderr}");
    }
}
