//! How `consul-lock run` ends: a child that ignores the signal passed on to it is killed after
//! the grace period (and at once at a second signal), so a stuck child can't keep the lock for
//! ever; an agent that dies while the lock is held is a loss (exit 3), and nothing is called
//! released that was not; `--json` errors say what kind of failure they are, and `--verbose`
//! still speaks with `--json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Running, Scratch, consul_lock, events, kv, unique_prefix, wait_for_file};
use consul_lock_testkit::agent::{require_agent, require_new_agent};

const EXIT: Duration = Duration::from_secs(30);

/// A child that ignores SIGTERM (and SIGINT) and never ends by itself.
fn stubborn(scratch: &Scratch) -> String {
    format!(
        "trap '' TERM INT; touch '{}'; while :; do sleep 0.05; done",
        scratch.path("started").display()
    )
}

fn event_names(stdout: &str) -> Vec<String> {
    events(stdout)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_child_that_ignores_the_signal_is_killed_after_the_grace_and_the_lock_released() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("signal-grace");
    let scratch = Scratch::new("signal-grace");
    let mut run = Running::spawn(consul_lock(
        agent,
        &[
            "run",
            "--json",
            "--kill-grace",
            "1s",
            &prefix,
            "--",
            &stubborn(&scratch),
        ],
    ));
    wait_for_file(&scratch.path("started"), EXIT);
    std::thread::sleep(Duration::from_millis(200));
    run.signal("TERM");
    let (status, stdout, stderr) = run.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let names = event_names(&stdout);
    assert!(names.contains(&"kill".to_owned()), "{stdout}");
    let exited = events(&stdout)
        .into_iter()
        .find(|e| e["event"] == "child_exited")
        .unwrap();
    assert_eq!(exited["signal"], 9, "{exited}");
    assert!(names.contains(&"released".to_owned()), "{stdout}");
    assert!(
        kv(agent, &format!("{prefix}/.lock")).is_none(),
        "released and cleaned up"
    );
}

#[test]
fn a_second_signal_kills_the_child_at_once() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("signal-twice");
    let scratch = Scratch::new("signal-twice");
    // A grace no test waits out: only the second signal can end this run.
    let mut run = Running::spawn(consul_lock(
        agent,
        &[
            "run",
            "--json",
            "--kill-grace",
            "1h",
            &prefix,
            "--",
            &stubborn(&scratch),
        ],
    ));
    wait_for_file(&scratch.path("started"), EXIT);
    std::thread::sleep(Duration::from_millis(200));
    run.signal("INT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!run.exited(), "one signal leaves the child its grace period");
    run.signal("TERM");
    let (status, stdout, stderr) = run.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("second SIGTERM: SIGKILL"), "{stderr}");
    let exited = events(&stdout)
        .into_iter()
        .find(|e| e["event"] == "child_exited")
        .unwrap();
    assert_eq!(exited["signal"], 9, "{exited}");
    assert!(
        kv(agent, &format!("{prefix}/.lock")).is_none(),
        "released and cleaned up"
    );
}

#[test]
fn an_agent_that_dies_while_the_lock_is_held_is_a_loss_exit_3_never_released() {
    let Some(agent) = require_new_agent() else { return };
    let prefix = unique_prefix("agent-dies");
    let scratch = Scratch::new("agent-dies");
    let child = format!(
        "trap 'exit 0' TERM; touch '{}'; while :; do sleep 0.05; done",
        scratch.path("started").display()
    );
    let run = Running::spawn(consul_lock(&agent, &["run", "--json", &prefix, "--", &child]));
    wait_for_file(&scratch.path("started"), EXIT);
    let killed = Command::new("kill")
        .args(["-s", "KILL", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, stdout, stderr) = run.finish(Duration::from_secs(90));
    assert_eq!(status.code(), Some(3), "a loss\n{stdout}\n{stderr}");
    let names = event_names(&stdout);
    assert!(names.contains(&"lost".to_owned()), "{stdout}");
    assert!(
        !names.contains(&"released".to_owned()),
        "nothing could be released: {stdout}"
    );
    assert!(!stderr.contains("released"), "{stderr}");
}

#[test]
fn json_errors_carry_a_kind_and_verbose_still_speaks() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("json-kind");
    let scratch = Scratch::new("json-kind");
    let holder = format!(
        "touch '{}'; {}",
        scratch.path("started").display(),
        scratch.wait_for("release")
    );
    let a = Running::spawn(consul_lock(agent, &["run", &prefix, "--", &holder]));
    wait_for_file(&scratch.path("started"), EXIT);
    let (status, stdout, stderr) = Running::spawn(consul_lock(
        agent,
        &["run", "-json", "-verbose", "-timeout=500ms", &prefix, "true"],
    ))
    .finish(EXIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let error = events(&stdout)
        .into_iter()
        .find(|e| e["event"] == "error")
        .expect("an error event");
    assert_eq!(error["kind"], "timeout", "{error}");
    assert_eq!(error["exit_code"], 1, "{error}");
    assert!(
        stderr.contains("waiting for the lock"),
        "--verbose speaks with --json: {stderr}"
    );
    assert!(stderr.contains("(-timeout)"), "names the flag as typed: {stderr}");
    scratch.touch("release");
    let (status, _, stderr) = a.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // A usage error is one too.
    let (status, _, stderr) =
        Running::spawn(consul_lock(agent, &["run", "-http-addr=a:b:c", &prefix, "true"])).finish(EXIT);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("-http-addr=\"a:b:c\""),
        "names the flag, not the variable: {stderr}"
    );
    assert!(!stderr.contains("CONSUL_HTTP_ADDR"), "{stderr}");
}

#[test]
fn with_json_a_command_line_that_does_not_parse_is_an_error_event() {
    let Some(agent) = require_agent() else { return };
    for args in [
        vec!["run", "-json", "-bogus", "p", "true"],
        vec!["run", "--json", "--timeout", "10", "p", "true"],
    ] {
        let (status, stdout, stderr) = Running::spawn(consul_lock(agent, &args)).finish(EXIT);
        assert_eq!(status.code(), Some(1), "{stderr}");
        let error = events(&stdout)
            .into_iter()
            .find(|e| e["event"] == "error")
            .unwrap_or_else(|| panic!("{args:?}: no error event: {stdout} {stderr}"));
        assert_eq!(error["kind"], "usage", "{error}");
    }
}
