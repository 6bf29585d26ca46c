//! `consul-lock run` as a process against a real Consul agent: the child runs while the lock is
//! held and sees its fencing token; a second invocation waits, or gives up with `--timeout`; a
//! lost lock terminates the child (SIGTERM, then SIGKILL after the grace period) and exits 3;
//! signals are passed on; the exit codes are Go's; the key is cleaned up afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Running, Scratch, consul_lock, destroy_session, events, kv, nanos, unique_prefix, wait_for_file,
};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_testkit::agent::require_agent;

const EXIT: Duration = Duration::from_secs(30);

#[test]
fn the_child_runs_while_held_and_sees_the_token() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("held");
    let scratch = Scratch::new("held");
    let script = format!(
        "echo \"$CONSUL_LOCK_HELD $CONSUL_LOCK_INDEX $CONSUL_LOCK_SEQUENCE $CONSUL_LOCK_SESSION $CONSUL_LOCK_KEY\" \
         > '{env}'; touch '{started}'; {wait}",
        env = scratch.path("env").display(),
        started = scratch.path("started").display(),
        wait = scratch.wait_for("go"),
    );
    let run = Running::spawn(consul_lock(agent, &["run", "--json", &prefix, "--", &script]));
    wait_for_file(&scratch.path("started"), EXIT);

    // While the child runs, Consul shows the lock held by the session the child was told of.
    let env = scratch.read("env");
    let fields: Vec<&str> = env.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "{env:?}");
    let key = format!("{prefix}/.lock");
    let pair = kv(agent, &key).expect("the lock key exists while held");
    assert_eq!(fields[0], "true", "CONSUL_LOCK_HELD");
    assert_eq!(
        fields[1],
        pair.lock_index.to_string(),
        "CONSUL_LOCK_INDEX is the LockIndex"
    );
    assert_eq!(
        fields[2],
        pair.modify_index.to_string(),
        "CONSUL_LOCK_SEQUENCE is the hold's ModifyIndex"
    );
    assert_eq!(
        Some(fields[3]),
        pair.session.as_ref().map(|s| s.as_str()),
        "CONSUL_LOCK_SESSION"
    );
    assert_eq!(fields[4], key, "CONSUL_LOCK_KEY");
    assert_eq!(pair.flags, LOCK_FLAG_VALUE, "Go's lock flags");

    scratch.touch("go");
    let (status, stdout, stderr) = run.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let names: Vec<String> = events(&stdout)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "waiting",
            "acquired",
            "child_started",
            "child_exited",
            "released",
            "cleaned_up"
        ],
        "{stdout}"
    );
    let acquired = &events(&stdout)[1];
    assert_eq!(acquired["session"], fields[3]);
    assert_eq!(acquired["lock_index"].to_string(), fields[1]);
    assert_eq!(acquired["sequence"].to_string(), fields[2]);
    assert!(acquired["waited_ms"].is_u64());
    assert!(
        kv(agent, &key).is_none(),
        "the key is cleaned up, as Go's consul lock does"
    );
}

#[test]
fn a_second_invocation_waits_for_the_first() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("waits");
    let scratch = Scratch::new("waits");
    let first = format!(
        "date +%s%N > '{start}'; {wait}; date +%s%N > '{end}'",
        start = scratch.path("a_start").display(),
        wait = scratch.wait_for("release"),
        end = scratch.path("a_end").display(),
    );
    let second = format!("date +%s%N > '{}'", scratch.path("b_start").display());
    let a = Running::spawn(consul_lock(agent, &["run", &prefix, "--", &first]));
    wait_for_file(&scratch.path("a_start"), EXIT);
    let b = Running::spawn(consul_lock(agent, &["run", &prefix, "--", &second]));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !scratch.exists("b_start"),
        "the second child must not start while the first holds"
    );

    scratch.touch("release");
    let (a_status, _, a_err) = a.finish(EXIT);
    let (b_status, _, b_err) = b.finish(EXIT);
    assert_eq!(a_status.code(), Some(0), "{a_err}");
    assert_eq!(b_status.code(), Some(0), "{b_err}");
    assert!(
        nanos(&scratch.read("b_start")) >= nanos(&scratch.read("a_end")),
        "the second child started only after the first ended"
    );
}

#[test]
fn timeout_gives_up_with_exit_1_and_names_the_holder() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("timeout");
    let scratch = Scratch::new("timeout");
    let holder = format!(
        "echo $CONSUL_LOCK_SESSION > '{}'; {}",
        scratch.path("session").display(),
        scratch.wait_for("release")
    );
    let a = Running::spawn(consul_lock(agent, &["run", &prefix, "--", &holder]));
    wait_for_file(&scratch.path("session"), EXIT);
    std::thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let touch_ran = format!("touch '{}'", scratch.path("ran").display());
    let b = Running::spawn(consul_lock(
        agent,
        &["run", "--timeout", "1s", &prefix, "--", &touch_ran],
    ));
    let (status, _, stderr) = b.finish(EXIT);
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        took >= Duration::from_millis(900),
        "gave up after {took:?}, before the timeout"
    );
    assert!(took < Duration::from_secs(10), "gave up only after {took:?}");
    assert!(
        stderr.contains("timeout: no lock within 1.000s (--timeout)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(scratch.read("session").trim()),
        "names the holder: {stderr}"
    );
    assert!(!scratch.exists("ran"), "the child never ran");

    scratch.touch("release");
    let (status, _, stderr) = a.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn losing_the_lock_terminates_the_child_and_exits_3() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("loss");
    let scratch = Scratch::new("loss");
    let child = format!(
        "trap 'echo TERM > \"{got}\"; exit 0' TERM; echo $CONSUL_LOCK_SESSION > '{session}'; \
         i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        got = scratch.path("got").display(),
        session = scratch.path("session").display(),
    );
    let run = Running::spawn(consul_lock(agent, &["run", "--json", &prefix, "--", &child]));
    wait_for_file(&scratch.path("session"), EXIT);
    std::thread::sleep(Duration::from_millis(200));

    let destroyed = Instant::now();
    destroy_session(agent, scratch.read("session").trim());
    let (status, stdout, stderr) = run.finish(EXIT);
    assert_eq!(
        status.code(),
        Some(3),
        "exit 3: the lock was lost while the child ran\n{stderr}"
    );
    assert!(
        destroyed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        destroyed.elapsed()
    );
    assert_eq!(scratch.read("got").trim(), "TERM", "the child got SIGTERM");
    let events = events(&stdout);
    let lost = events
        .iter()
        .find(|e| e["event"] == "lost")
        .expect("a lost event");
    assert!(
        ["not_held", "session_invalidated", "key_deleted"].contains(&lost["reason"].as_str().unwrap()),
        "{lost}"
    );
    let exited = events.iter().find(|e| e["event"] == "child_exited").unwrap();
    assert_eq!(exited["code"], 0);
    assert!(
        events.iter().any(|e| e["event"] == "not_released"),
        "nothing is called released after a loss: {stdout}"
    );
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("kill");
    let scratch = Scratch::new("kill");
    let child = format!(
        "trap '' TERM; echo $CONSUL_LOCK_SESSION > '{session}'; \
         i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        session = scratch.path("session").display(),
    );
    let run = Running::spawn(consul_lock(
        agent,
        &["run", "--json", "--kill-grace", "1s", &prefix, "--", &child],
    ));
    wait_for_file(&scratch.path("session"), EXIT);
    std::thread::sleep(Duration::from_millis(200));

    let destroyed = Instant::now();
    destroy_session(agent, scratch.read("session").trim());
    let (status, stdout, stderr) = run.finish(EXIT);
    let took = destroyed.elapsed();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        took >= Duration::from_secs(1),
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(took < Duration::from_secs(12), "took {took:?}");
    let events = events(&stdout);
    assert!(events.iter().any(|e| e["event"] == "kill"), "{stdout}");
    let exited = events.iter().find(|e| e["event"] == "child_exited").unwrap();
    assert_eq!(exited["signal"], 9, "{exited}");
}

#[test]
fn exit_codes_follow_go() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("codes");
    let code = |args: &[&str]| {
        let (status, _, stderr) = Running::spawn(consul_lock(agent, args)).finish(EXIT);
        (status.code(), stderr)
    };
    assert_eq!(code(&["run", &prefix, "--", "true"]).0, Some(0));
    // Go's consul lock: a failed child is exit 0, unless -child-exit-code asks for 2.
    assert_eq!(code(&["run", &prefix, "--", "exit 7"]).0, Some(0));
    assert_eq!(
        code(&["run", "--child-exit-code", &prefix, "--", "exit 7"]).0,
        Some(2)
    );
    assert_eq!(
        code(&["run", "--child-exit-code", &prefix, "--", "kill -9 $$"]).0,
        Some(2)
    );
    assert_eq!(
        code(&["run", "--child-exit-code", &prefix, "--", "exit 0"]).0,
        Some(0)
    );
    // --shell=false runs argv as is (no shell to expand `$$` or `exit`).
    assert_eq!(
        code(&[
            "run",
            "--shell=false",
            "--child-exit-code",
            &prefix,
            "--",
            "sh",
            "-c",
            "exit 4"
        ])
        .0,
        Some(2)
    );
    let (status, stderr) = code(&["run", "--shell=false", &prefix, "--", "/nonexistent/program"]);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("could not start the child"), "{stderr}");
    // Usage errors are 1, as Go's.
    let (status, stderr) = code(&["run", &prefix]);
    assert_eq!(status, Some(1));
    assert!(stderr.contains("CHILD"), "{stderr}");
    assert_eq!(code(&["run", "-n", "0", &prefix, "--", "true"]).0, Some(1));
    assert_eq!(code(&["run", "--timeout", "5", &prefix, "--", "true"]).0, Some(1));
    assert!(
        kv(agent, &format!("{prefix}/.lock")).is_none(),
        "cleaned up after every run"
    );
}

#[test]
fn signals_are_passed_on_to_the_child() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("signals");
    let scratch = Scratch::new("signals");
    let child = format!(
        "trap 'echo HUP >> \"{got}\"' HUP; trap 'echo TERM >> \"{got}\"; exit 0' TERM; touch '{started}'; \
         i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        got = scratch.path("got").display(),
        started = scratch.path("started").display(),
    );
    let mut run = Running::spawn(consul_lock(agent, &["run", "--json", &prefix, "--", &child]));
    wait_for_file(&scratch.path("started"), EXIT);
    std::thread::sleep(Duration::from_millis(200));
    run.signal("HUP");
    let deadline = Instant::now() + EXIT;
    while !scratch.read("got").contains("HUP") {
        assert!(Instant::now() < deadline, "the child never got SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!run.exited(), "SIGHUP is passed on, consul-lock keeps running");
    run.signal("TERM");
    let (status, stdout, stderr) = run.finish(EXIT);
    assert_eq!(
        status.code(),
        Some(0),
        "the child exited 0 after SIGTERM\n{stderr}"
    );
    assert_eq!(scratch.read("got").lines().collect::<Vec<_>>(), ["HUP", "TERM"]);
    let forwarded: Vec<String> = events(&stdout)
        .iter()
        .filter(|e| e["event"] == "signal")
        .map(|e| e["signal"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(forwarded, ["SIGHUP", "SIGTERM"]);
    assert!(
        kv(agent, &format!("{prefix}/.lock")).is_none(),
        "released and cleaned up"
    );
}

#[test]
fn no_agent_at_the_address_names_it_and_the_variable() {
    let mut command = std::process::Command::new(common::bin());
    common::scrub(&mut command);
    command
        .env("CONSUL_HTTP_ADDR", "127.0.0.1:1")
        .args(["run", "svc/x", "--", "true"]);
    let (status, _, stderr) = Running::spawn(command).finish(EXIT);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("no Consul agent answers at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("(the address from CONSUL_HTTP_ADDR)"), "{stderr}");
}
