//! `consul lock` (Go, the binary the test agent runs) and `consul-lock run` on the same prefix
//! exclude each other: each waits for the other, or gives up with its timeout. Both use Go's keys
//! and flags (`<prefix>/.lock`), and each cleans the key up after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Running, Scratch, consul_lock, go_lock, nanos, unique_prefix, wait_for_file};
use consul_lock_testkit::agent::require_agent;

const EXIT: Duration = Duration::from_secs(30);

/// A child that records its start and end and holds until `release` appears.
fn holder(scratch: &Scratch, who: &str) -> String {
    format!(
        "date +%s%N > '{start}'; {wait}; date +%s%N > '{end}'",
        start = scratch.path(&format!("{who}_start")).display(),
        wait = scratch.wait_for(&format!("{who}_release")),
        end = scratch.path(&format!("{who}_end")).display(),
    )
}

#[test]
fn go_holds_and_rust_waits_or_gives_up() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("go-holds");
    let scratch = Scratch::new("go-holds");
    let go = Running::spawn(go_lock(agent, &[&prefix, &holder(&scratch, "go")]));
    wait_for_file(&scratch.path("go_start"), EXIT);

    let ran = format!("touch '{}'", scratch.path("ran").display());
    let (status, _, stderr) = Running::spawn(consul_lock(
        agent,
        &["run", "--timeout", "1s", &prefix, "--", &ran],
    ))
    .finish(EXIT);
    assert_eq!(status.code(), Some(1), "Go holds the lock: {stderr}");
    assert!(stderr.contains("timeout"), "{stderr}");
    assert!(!scratch.exists("ran"));

    let rust = Running::spawn(consul_lock(
        agent,
        &["run", &prefix, "--", &holder(&scratch, "rust")],
    ));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !scratch.exists("rust_start"),
        "Rust's child started while Go's held the lock"
    );
    scratch.touch("go_release");
    let (status, _, stderr) = go.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    wait_for_file(&scratch.path("rust_start"), EXIT);
    scratch.touch("rust_release");
    let (status, _, stderr) = rust.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(nanos(&scratch.read("rust_start")) >= nanos(&scratch.read("go_end")));
}

#[test]
fn rust_holds_and_go_waits_or_gives_up() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("rust-holds");
    let scratch = Scratch::new("rust-holds");
    let rust = Running::spawn(consul_lock(
        agent,
        &["run", &prefix, "--", &holder(&scratch, "rust")],
    ));
    wait_for_file(&scratch.path("rust_start"), EXIT);

    let ran = format!("touch '{}'", scratch.path("ran").display());
    let (status, stdout, stderr) =
        Running::spawn(go_lock(agent, &["-timeout=1s", &prefix, &ran])).finish(EXIT);
    assert_eq!(status.code(), Some(1), "Rust holds the lock: {stdout} {stderr}");
    assert!(!scratch.exists("ran"));

    let go = Running::spawn(go_lock(agent, &[&prefix, &holder(&scratch, "go")]));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !scratch.exists("go_start"),
        "Go's child started while Rust's held the lock"
    );
    scratch.touch("rust_release");
    let (status, _, stderr) = rust.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    wait_for_file(&scratch.path("go_start"), EXIT);
    scratch.touch("go_release");
    let (status, _, stderr) = go.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(nanos(&scratch.read("go_start")) >= nanos(&scratch.read("rust_end")));
}

#[test]
fn go_and_rust_share_a_semaphore() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("go-sem");
    let scratch = Scratch::new("go-sem");
    let go = Running::spawn(go_lock(agent, &["-n=2", &prefix, &holder(&scratch, "go")]));
    wait_for_file(&scratch.path("go_start"), EXIT);
    // One slot left: Rust gets it while Go holds the other.
    let rust = Running::spawn(consul_lock(
        agent,
        &["run", "-n", "2", &prefix, "--", &holder(&scratch, "rust")],
    ));
    wait_for_file(&scratch.path("rust_start"), EXIT);
    // None left: a third (Go) gives up.
    let ran = format!("touch '{}'", scratch.path("ran").display());
    let (status, _, _) = Running::spawn(go_lock(agent, &["-n=2", "-timeout=1s", &prefix, &ran])).finish(EXIT);
    assert_eq!(status.code(), Some(1));
    assert!(!scratch.exists("ran"));
    scratch.touch("go_release");
    scratch.touch("rust_release");
    for run in [go, rust] {
        let (status, _, stderr) = run.finish(EXIT);
        assert_eq!(status.code(), Some(0), "{stderr}");
    }
}

/// The live entries of the line under `prefix`'s lock key.
fn line(agent: &consul_lock_testkit::agent::ConsulAgent, prefix: &str) -> usize {
    let queue = consul_lock_core::api::Key::new(format!("{prefix}/.lock/.queue/")).unwrap();
    common::call(agent, &consul_lock_core::api::KvList::new(queue))
        .value
        .iter()
        .filter(|p| p.session.is_some())
        .count()
}

/// Queued `consul-lock run -queue` contenders take Go's `consul lock` key in the order they
/// came, while a Go contender waits on the same key (and may overtake them): every child runs
/// alone, the queued in order, and the line is empty afterwards.
#[test]
fn queued_contenders_keep_their_order_beside_go() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("queued");
    let scratch = Scratch::new("queued");
    let go = Running::spawn(go_lock(agent, &[&prefix, &holder(&scratch, "go")]));
    wait_for_file(&scratch.path("go_start"), EXIT);
    // Each child records its start and end; a short hold, so that overlaps would show.
    let child = |who: &str| {
        format!(
            "date +%s%N > '{start}'; sleep 0.2; date +%s%N > '{end}'",
            start = scratch.path(&format!("{who}_start")).display(),
            end = scratch.path(&format!("{who}_end")).display(),
        )
    };
    let mut queued = Vec::new();
    for i in 0..3 {
        let who = format!("q{i}");
        // Go's single-dash spelling, as `consul lock` takes flags.
        queued.push(Running::spawn(consul_lock(
            agent,
            &["run", "-queue", &prefix, &child(&who)],
        )));
        let deadline = std::time::Instant::now() + EXIT;
        while line(agent, &prefix) < i + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "contender {i} never lined up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let go_waiter = Running::spawn(go_lock(agent, &[&prefix, &child("gw")]));
    std::thread::sleep(Duration::from_millis(300));
    scratch.touch("go_release");
    for (i, q) in queued.into_iter().enumerate() {
        let (status, _, stderr) = q.finish(EXIT);
        assert_eq!(status.code(), Some(0), "queued {i}: {stderr}");
    }
    let (status, _, stderr) = go_waiter.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let (status, _, stderr) = go.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");

    let span = |who: &str| {
        (
            nanos(&scratch.read(&format!("{who}_start"))),
            nanos(&scratch.read(&format!("{who}_end"))),
        )
    };
    let mut spans: Vec<(u128, u128, &str)> = ["go", "q0", "q1", "q2", "gw"]
        .into_iter()
        .map(|w| {
            let (s, e) = span(w);
            (s, e, w)
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "{} and {} overlap: {spans:?}",
            pair[0].2,
            pair[1].2
        );
    }
    let order: Vec<&str> = spans.iter().map(|s| s.2).filter(|w| w.starts_with('q')).collect();
    assert_eq!(order, ["q0", "q1", "q2"], "{spans:?}");
    assert_eq!(line(agent, &prefix), 0);
    let queue = consul_lock_core::api::Key::new(format!("{prefix}/.lock/.queue/")).unwrap();
    let left = common::call(agent, &consul_lock_core::api::KvList::new(queue)).value;
    assert!(left.is_empty(), "entries left: {left:?}");
}
