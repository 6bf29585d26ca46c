//! `consul-lock demo` runs to its summary on its own: on the simulated Consul (no agent needed),
//! in text and in JSON, and against a real agent with `--consul`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Running, bin, events, scrub};
use consul_lock_testkit::agent::require_agent;

fn demo(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let mut command = Command::new(bin());
    scrub(&mut command);
    command.arg("demo").args(args);
    let started = Instant::now();
    let (status, stdout, stderr) = Running::spawn(command).finish(Duration::from_secs(60));
    (status.code(), stdout, stderr, started.elapsed())
}

#[test]
fn the_quick_demo_fails_over_and_prints_its_summary() {
    let (code, stdout, stderr, took) = demo(&["--quick", "--contenders", "3", "--hold", "300ms"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(stdout.contains("== crash: "), "{stdout}");
    assert!(stdout.contains("== step down: "), "{stdout}");
    assert!(stdout.contains("Summary"), "{stdout}");
    assert!(stdout.contains("leadership changes   2"), "{stdout}");
    assert!(stdout.contains("overlap              none"), "{stdout}");
    assert!(stdout.contains("strictly increasing"), "{stdout}");
    assert!(stdout.contains("result               ok"), "{stdout}");
}

#[test]
fn the_demo_speaks_json() {
    let (code, stdout, stderr, _) = demo(&["--quick", "--json", "--hold", "300ms"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let events = events(&stdout);
    assert_eq!(
        events.len(),
        stdout.lines().count(),
        "every line is an event: {stdout}"
    );
    assert_eq!(events[0]["event"], "start");
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary", "{stdout}");
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["overlaps"].as_array().unwrap().len(), 0);
    let failovers = summary["failovers"].as_array().unwrap();
    assert_eq!(failovers.len(), 2);
    // The crash waits out the lock-delay (1 s by default); the step-down does not.
    assert!(failovers[0]["took_ms"].as_u64().unwrap() >= 1000, "{summary}");
    assert!(failovers[1]["took_ms"].as_u64().unwrap() < 1000, "{summary}");
}

#[test]
fn the_demo_runs_against_a_real_agent() {
    let Some(agent) = require_agent() else { return };
    let (code, stdout, stderr, _) = demo(&["--quick", "--hold", "300ms", "--consul", &agent.http_addr()]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("the Consul agent at {}", agent.http_addr())),
        "{stdout}"
    );
    assert!(stdout.contains("result               ok"), "{stdout}");
}
