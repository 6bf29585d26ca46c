//! `consul-lock run -n 2` against a real Consul agent: two holders run at once, the third waits
//! for a slot; `status` shows the limit, the holders and the waiting contender.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Running, Scratch, consul_lock, unique_prefix, wait_for_file};
use consul_lock_testkit::agent::require_agent;

const EXIT: Duration = Duration::from_secs(30);

#[test]
fn two_hold_at_once_and_the_third_waits() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("n2");
    let scratch = Scratch::new("n2");
    let child = |who: &str| {
        format!(
            "echo \"{who} start $(date +%s%N)\" >> '{events}'; touch '{started}'; {wait}; \
             echo \"{who} end $(date +%s%N)\" >> '{events}'",
            events = scratch.path("events").display(),
            started = scratch.path(&format!("{who}_started")).display(),
            wait = scratch.wait_for(&format!("{who}_release")),
        )
    };
    let a = Running::spawn(consul_lock(
        agent,
        &["run", "-n", "2", &prefix, "--", &child("a")],
    ));
    let b = Running::spawn(consul_lock(
        agent,
        &["run", "-n", "2", &prefix, "--", &child("b")],
    ));
    wait_for_file(&scratch.path("a_started"), EXIT);
    wait_for_file(&scratch.path("b_started"), EXIT);
    let c = Running::spawn(consul_lock(
        agent,
        &["run", "-n", "2", &prefix, "--", &child("c")],
    ));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !scratch.exists("c_started"),
        "a third holder while two hold a limit of 2"
    );

    // status: the limit, two holders, one waiting.
    let (status, stdout, stderr) =
        Running::spawn(consul_lock(agent, &["status", "--json", &prefix])).finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(state["kind"], "semaphore", "{state}");
    assert_eq!(state["limit"], 2, "{state}");
    assert_eq!(state["held"], 2, "{state}");
    assert_eq!(state["holders"].as_array().unwrap().len(), 2, "{state}");
    assert_eq!(state["waiting"].as_array().unwrap().len(), 1, "{state}");

    scratch.touch("a_release");
    let (status, _, stderr) = a.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    wait_for_file(&scratch.path("c_started"), EXIT);
    scratch.touch("b_release");
    scratch.touch("c_release");
    for run in [b, c] {
        let (status, _, stderr) = run.finish(EXIT);
        assert_eq!(status.code(), Some(0), "{stderr}");
    }

    // Never more than two at once, and c started only after a ended.
    let mut running = 0;
    let mut most = 0;
    let mut lines: Vec<(u128, String)> = scratch
        .read("events")
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            (common::nanos(parts[2]), format!("{} {}", parts[0], parts[1]))
        })
        .collect();
    lines.sort();
    for (_, what) in &lines {
        if what.ends_with("start") {
            running += 1;
            most = most.max(running);
        } else {
            running -= 1;
        }
    }
    assert_eq!(most, 2, "{lines:?}");
    let at = |what: &str| lines.iter().find(|(_, w)| w == what).unwrap().0;
    assert!(at("c start") >= at("a end"), "{lines:?}");
}
