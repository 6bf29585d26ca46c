//! `consul-lock status` and `consul-lock watch` against a real Consul agent: status names the
//! holding session, its name and node, and the key's indexes; watch prints the current state and
//! then one line per leadership change, live, until SIGINT.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Running, Scratch, consul_lock, events, kv, unique_prefix, wait_for_file};
use consul_lock_testkit::agent::require_agent;

const EXIT: Duration = Duration::from_secs(30);

#[test]
fn status_shows_the_holder_and_the_indexes() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("status");
    let scratch = Scratch::new("status");

    let (status, stdout, _) = Running::spawn(consul_lock(agent, &["status", &prefix])).finish(EXIT);
    assert_eq!(status.code(), Some(0));
    assert!(stdout.contains("no lock has been taken there"), "{stdout}");

    let child = format!(
        "echo $CONSUL_LOCK_SESSION > '{}'; {}",
        scratch.path("session").display(),
        scratch.wait_for("release")
    );
    let run = Running::spawn(consul_lock(
        agent,
        &["run", "--name", "nightly backup", &prefix, "--", &child],
    ));
    wait_for_file(&scratch.path("session"), EXIT);
    std::thread::sleep(Duration::from_millis(100));
    let session = scratch.read("session").trim().to_owned();
    let pair = kv(agent, &format!("{prefix}/.lock")).unwrap();

    let (status, stdout, stderr) =
        Running::spawn(consul_lock(agent, &["status", "--json", &prefix])).finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(state["kind"], "lock");
    assert_eq!(state["held"], true);
    assert_eq!(state["holder"]["session"], session);
    assert_eq!(state["holder"]["name"], "nightly backup");
    assert!(state["holder"]["node"].is_string());
    assert!(state["holder"]["session_create_index"].is_u64());
    assert_eq!(state["lock_index"], pair.lock_index);
    assert_eq!(state["modify_index"], pair.modify_index);

    // The lock key itself names the same lock; the text says what "since" can honestly mean.
    let (_, text, _) =
        Running::spawn(consul_lock(agent, &["status", &format!("{prefix}/.lock")])).finish(EXIT);
    assert!(text.contains(&session), "{text}");
    assert!(text.contains("\"nightly backup\""), "{text}");
    assert!(
        text.contains(&format!("Raft index {}", pair.modify_index)),
        "{text}"
    );
    assert!(text.contains("Consul keeps no wall-clock time"), "{text}");
    // The fencing token is the sequence (the ModifyIndex of the hold); LockIndex is labelled
    // as Go's, never as the token.
    assert!(
        text.contains(&format!(
            "fencing token {} (the sequence: the key's ModifyIndex)",
            pair.modify_index
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "LockIndex {} (holders so far, what Go exposes)",
            pair.lock_index
        )),
        "{text}"
    );
    assert!(!text.contains("; the fencing token)"), "{text}");
    assert_eq!(state["sequence"], pair.modify_index);

    scratch.touch("release");
    let (status, _, stderr) = run.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn watch_prints_each_leadership_change_live() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("watch");
    let scratch = Scratch::new("watch");
    // The first line is the state before anything happened.
    let mut watch = start_watch(agent, &["watch", "--json", &prefix], &scratch);

    let mut sessions = Vec::new();
    for round in 0..2 {
        let name = format!("session{round}");
        let child = format!(
            "echo $CONSUL_LOCK_SESSION > '{}'; sleep 0.5",
            scratch.path(&name).display()
        );
        let (status, _, stderr) =
            Running::spawn(consul_lock(agent, &["run", &prefix, "--", &child])).finish(EXIT);
        assert_eq!(status.code(), Some(0), "{stderr}");
        sessions.push(scratch.read(&name).trim().to_owned());
    }
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    watch.signal("INT");
    let (status, _, stderr) = watch.finish(EXIT);
    assert_eq!(status.code(), Some(0), "Ctrl-C ends a watch with 0: {stderr}");
    let stdout = scratch.read("watch.out");
    assert!(started.elapsed() < Duration::from_secs(5));

    let changes = events(&stdout);
    assert_eq!(changes[0]["first"], true, "{stdout}");
    assert_eq!(changes[0]["kind"], "absent", "{stdout}");
    let leaders: Vec<&str> = changes
        .iter()
        .filter(|c| c["held"] == true)
        .map(|c| c["holder"]["session"].as_str().unwrap())
        .collect();
    assert_eq!(leaders, [sessions[0].as_str(), sessions[1].as_str()], "{stdout}");
    assert_eq!(
        changes.last().unwrap()["kind"],
        "absent",
        "cleaned up at the end: {stdout}"
    );
    for pair in changes.windows(2) {
        assert_ne!(pair[0], pair[1], "one line per change, no repeats: {stdout}");
    }
}

/// `consul-lock <args>` (a watch) writing to `watch.out` in `scratch`, once it printed its
/// first line.
fn start_watch(agent: &consul_lock_testkit::agent::ConsulAgent, args: &[&str], scratch: &Scratch) -> Running {
    let out = scratch.path("watch.out");
    let watch = Running::spawn_to_file(consul_lock(agent, args), &out);
    let deadline = Instant::now() + EXIT;
    while !scratch.read("watch.out").contains('\n') {
        assert!(Instant::now() < deadline, "watch printed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    watch
}

/// The first line `watch` prints for `prefix`, in text.
fn first_watch_line(
    agent: &consul_lock_testkit::agent::ConsulAgent,
    prefix: &str,
    scratch: &Scratch,
) -> String {
    let mut watch = start_watch(agent, &["watch", prefix], scratch);
    watch.signal("INT");
    let (status, _, stderr) = watch.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    scratch.read("watch.out").lines().next().unwrap().to_owned()
}

#[test]
fn watch_says_a_semaphore_plainly_with_its_sequence() {
    let Some(agent) = require_agent() else { return };
    let scratch = Scratch::new("watch-sem");

    // A contender that has joined but not written the .lock yet: no limit is known.
    let prefix = unique_prefix("watch-sem-new");
    let (status, body) = common::raw(agent, "PUT", "/v1/session/create", r#"{"TTL":"30s"}"#, None);
    assert_eq!(status, 200, "{body}");
    let session = serde_json::from_str::<serde_json::Value>(&body).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = common::raw(
        agent,
        "PUT",
        &format!(
            "/v1/kv/{prefix}/{session}?acquire={session}&flags={}",
            consul_lock_core::machine::SEMAPHORE_FLAG_VALUE
        ),
        "",
        None,
    );
    assert_eq!((status, body.trim()), (200, "true"));
    let line = first_watch_line(agent, &prefix, &scratch);
    common::destroy_session(agent, &session);
    assert!(!line.contains('?') && !line.contains("[]"), "{line}");
    assert!(line.contains("limit not recorded yet"), "{line}");
    assert!(line.contains("1 waiting"), "{line}");

    // A held slot: the limit, the holder and the sequence.
    let prefix = unique_prefix("watch-sem-held");
    let child = format!(
        "echo $CONSUL_LOCK_SESSION > '{}'; {}",
        scratch.path("session").display(),
        scratch.wait_for("release")
    );
    let run = Running::spawn(consul_lock(agent, &["run", "-n", "2", &prefix, "--", &child]));
    wait_for_file(&scratch.path("session"), EXIT);
    std::thread::sleep(Duration::from_millis(100));
    let holder = scratch.read("session").trim().to_owned();
    let lock = kv(agent, &format!("{prefix}/.lock")).unwrap();
    let line = first_watch_line(agent, &prefix, &scratch);
    scratch.touch("release");
    let (status, _, stderr) = run.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(line.contains("1 of 2 slots held"), "{line}");
    assert!(line.contains(&holder), "{line}");
    assert!(
        line.contains(&format!("sequence {}", lock.modify_index)),
        "{line}"
    );
    assert!(!line.contains("[]"), "{line}");
}

/// While someone leads, `watch` follows the lock key with the observer: a leader proclaiming new
/// values shows as one change each, in order, then nobody leading.
#[test]
fn watch_shows_a_leaders_proclaimed_values_in_order() {
    let Some(agent) = require_agent() else { return };
    let prefix = unique_prefix("watch-proclaim");
    let key = format!("{prefix}/.lock");
    let scratch = Scratch::new("watch-proclaim");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(async { consul_lock_tokio::Client::new(agent.config().unwrap()) })
        .unwrap();
    let election = client.election(&key).unwrap();
    let leading = runtime.block_on(election.campaign("v1")).unwrap();
    let session = leading.token().session.to_string();
    let mut watch = start_watch(agent, &["watch", "--json", &prefix], &scratch);
    for value in ["v2", "v3"] {
        runtime.block_on(leading.proclaim(value)).unwrap();
        // Each proclaim seen before the next, so that none is folded into the next.
        let deadline = Instant::now() + EXIT;
        while !scratch
            .read("watch.out")
            .contains(&format!("\"value\":\"{value}\""))
        {
            assert!(
                Instant::now() < deadline,
                "{value} not shown: {}",
                scratch.read("watch.out")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    runtime.block_on(leading.resign()).unwrap();
    let deadline = Instant::now() + EXIT;
    while !events(&scratch.read("watch.out"))
        .last()
        .is_some_and(|c| c["held"] == false || c["kind"] == "absent")
    {
        assert!(
            Instant::now() < deadline,
            "no end of leadership shown: {}",
            scratch.read("watch.out")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    watch.signal("INT");
    let (status, _, stderr) = watch.finish(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let stdout = scratch.read("watch.out");
    let changes = events(&stdout);
    let held: Vec<(&str, &str)> = changes
        .iter()
        .filter(|c| c["held"] == true)
        .map(|c| {
            (
                c["holder"]["session"].as_str().unwrap(),
                c["value"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            (session.as_str(), "v1"),
            (session.as_str(), "v2"),
            (session.as_str(), "v3")
        ],
        "{stdout}"
    );
    for pair in changes.windows(2) {
        assert_ne!(pair[0], pair[1], "one line per change, no repeats: {stdout}");
    }
    runtime
        .block_on(client.shutdown(Duration::from_secs(10)))
        .unwrap();
}

/// `status` names a lock's leader as the library's `Client::leader` does (session, node,
/// session name, value, sequence), whoever holds it: Go's `consul lock`, `consul-lock run`, or
/// a library election with a value. `--stale` still answers from the listing.
#[test]
fn status_names_the_leader_the_library_names() {
    let Some(agent) = require_agent() else { return };
    let scratch = Scratch::new("status-leader");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(async { consul_lock_tokio::Client::new(agent.config().unwrap()) })
        .unwrap();
    for who in ["go", "rust", "election"] {
        let prefix = unique_prefix(&format!("status-leader-{who}"));
        let key = format!("{prefix}/.lock");
        let child = format!(
            "touch '{}'; {}",
            scratch.path(&format!("{who}_held")).display(),
            scratch.wait_for(&format!("{who}_release"))
        );
        let mut holder = None;
        let mut leading = None;
        match who {
            "go" => holder = Some(Running::spawn(common::go_lock(agent, &[&prefix, &child]))),
            "rust" => {
                holder = Some(Running::spawn(consul_lock(
                    agent,
                    &["run", "--name", "status leader", &prefix, "--", &child],
                )))
            }
            _ => {
                let election = client.election(&key).unwrap();
                leading = Some(runtime.block_on(election.campaign("10.0.0.7:8080")).unwrap());
                scratch.touch(&format!("{who}_held"));
            }
        }
        wait_for_file(&scratch.path(&format!("{who}_held")), EXIT);
        let leader = runtime
            .block_on(client.leader(&key))
            .unwrap()
            .expect("someone leads");

        let (status, stdout, stderr) =
            Running::spawn(consul_lock(agent, &["status", "--json", &prefix])).finish(EXIT);
        assert_eq!(status.code(), Some(0), "{who}: {stderr}");
        let state: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let expected = serde_json::json!({
            "session": leader.session.as_str(),
            "node": leader.node,
            "session_name": leader.session_name,
            "value": String::from_utf8_lossy(&leader.value),
            "lock_index": leader.lock_index,
            "sequence": leader.sequence,
        });
        assert_eq!(state["leader"], expected, "{who}: {stdout}");
        assert!(state["leader"]["node"].is_string(), "{who}: {stdout}");
        assert_eq!(state["source"], "observer", "{who}: {stdout}");
        assert_eq!(state["holder"]["session"], expected["session"], "{who}: {stdout}");
        assert_eq!(
            state["holder"]["name"], expected["session_name"],
            "{who}: {stdout}"
        );
        assert_eq!(state["holder"]["node"], expected["node"], "{who}: {stdout}");
        assert_eq!(state["value"], expected["value"], "{who}: {stdout}");
        assert_eq!(state["sequence"], leader.sequence, "{who}: {stdout}");
        if who == "election" {
            assert_eq!(state["value"], "10.0.0.7:8080", "{stdout}");
        } else if who == "go" {
            // `consul lock` names its session after the command and the prefix.
            let name = state["leader"]["session_name"].as_str().unwrap();
            assert!(name.starts_with("Consul lock for '"), "{stdout}");
            assert!(name.ends_with(&format!("at '{prefix}'")), "{stdout}");
        } else {
            assert_eq!(state["leader"]["session_name"], "status leader", "{stdout}");
        }

        let (_, text, _) = Running::spawn(consul_lock(agent, &["status", &prefix])).finish(EXIT);
        let held_by = format!(
            "held by   session {} ({:?} on node {})",
            leader.session,
            leader.session_name.as_deref().unwrap(),
            leader.node.as_deref().unwrap()
        );
        assert!(text.contains(&held_by), "{who}: {text}");
        assert!(
            text.contains(&format!("fencing token {} ", leader.sequence)),
            "{who}: {text}"
        );

        // `--stale` reads the listing, any server's: the same holder, from another source.
        let (status, stdout, stderr) =
            Running::spawn(consul_lock(agent, &["status", "--stale", "--json", &prefix])).finish(EXIT);
        assert_eq!(status.code(), Some(0), "{who}: {stderr}");
        let stale: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(stale["source"], "listing", "{who}: {stdout}");
        assert_eq!(stale["leader"], expected, "{who}: {stdout}");

        match (holder, leading) {
            (Some(holder), _) => {
                scratch.touch(&format!("{who}_release"));
                let (status, _, stderr) = holder.finish(EXIT);
                assert_eq!(status.code(), Some(0), "{who}: {stderr}");
            }
            (None, Some(leading)) => runtime.block_on(leading.resign()).unwrap(),
            (None, None) => unreachable!(),
        }
    }
    runtime
        .block_on(client.shutdown(Duration::from_secs(10)))
        .unwrap();
}
