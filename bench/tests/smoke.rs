//! The suite's smoke pass, as CI runs it: every scenario, small, for every client, against a real
//! agent; the JSON must hold every section with plausible figures. It proves the suite still runs,
//! it measures nothing worth quoting (the figures come from `consul-lock-bench` without `--smoke`,
//! in release mode: BENCHMARKS.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

#[test]
fn the_smoke_pass_runs_every_scenario_for_every_client() {
    if std::env::var_os("CI").is_none() && consul_lock_testkit::agent::require_agent().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("consul-lock-bench-smoke-{}", std::process::id()));
    let out = dir.join("smoke.json");
    let run = Command::new(env!("CARGO_BIN_EXE_consul-lock-bench"))
        .args(["--smoke", "--out"])
        .arg(&out)
        .output()
        .expect("the suite starts");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the suite failed:\n{stdout}\n{stderr}");
    let results: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("the JSON was written")).expect("JSON");
    let _ = std::fs::remove_dir_all(&dir);

    // Go is part of it unless this machine can't build it (outside CI only: there it must).
    let clients: Vec<&str> = results["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(clients.starts_with(&["tokio", "blocking"]), "{clients:?}");
    if std::env::var_os("CI").is_some() {
        assert_eq!(clients, ["tokio", "blocking", "go", "queued"]);
    }
    for client in &clients {
        let handoff = &results["handoff"]["clients"][client]["summary"];
        assert!(handoff["p50"].as_f64().unwrap() > 0.0, "{client} handoff");
        let failover = results["failover"]["clients"][client]["next_holder"]["p50"]
            .as_f64()
            .unwrap();
        assert!(
            failover >= 2000.0,
            "{client} failover {failover} ms beat the 2 s lock-delay"
        );
        assert!(
            results["partition"]["clients"][client].is_object(),
            "{client} partition"
        );
        let contention = &results["contention"]["sizes"]["5"][client];
        assert!(
            contention["requests_per_handoff"].as_f64().unwrap() >= 3.0,
            "{client} contention"
        );
        // One uncontended acquisition: at least a session, an acquire and a release.
        let alone = contention["uncontended_requests"].as_u64().unwrap();
        assert!(alone >= 3, "{client} uncontended: {alone}");
        let waiting = contention["waiting_per_handoff"].as_f64().unwrap();
        let all = contention["requests_per_handoff"].as_f64().unwrap();
        assert!(
            (all - alone as f64 - waiting).abs() < 1e-9,
            "{client}: waiting {waiting} is all {all} less {alone}"
        );
        if *client != "tokio" && clients.contains(&"tokio") {
            let blocks = results["handoff"]["vs_tokio"][client]["per_repeat"]
                .as_array()
                .unwrap();
            assert_eq!(blocks.len(), 2, "{client}: a ratio per block");
        }
        assert!(
            results["idle"]["clients"][client]["rss_kib"].as_u64().unwrap() > 0,
            "{client} idle"
        );
    }
    // Our clients notice a partition within the TTL; whatever Go does is a figure, not a failure.
    for client in ["tokio", "blocking"] {
        let lost = results["partition"]["clients"][client]["lost_ms"].as_f64();
        assert!(
            lost.is_some_and(|ms| ms <= 10_000.0),
            "{client} lost the partitioned lock at {lost:?} ms"
        );
    }
    assert!(results["core"]["events_per_sec"].as_f64().unwrap() > 0.0);
    let runs = results["scale"]["runs"].as_array().unwrap();
    // Each client's locks at both limits (but the queued client's: the scale scenario holds
    // free keys, where waiting in line changes nothing), and the tokio key set at the default
    // one.
    let scaled = clients.iter().filter(|c| **c != "queued").count();
    assert_eq!(runs.len(), 2 * scaled + 1);
    let key_set = runs.iter().find(|r| r["mode"] == "key_set").unwrap();
    assert_eq!(
        key_set["session_keys_lost"],
        key_set["held"].as_u64().unwrap() - key_set["deletes"].as_u64().unwrap()
    );
    assert!(
        runs.iter().all(|r| r["held"] == r["locks"]),
        "every lock held: {runs:?}"
    );
    assert!(
        stdout.contains("1. Handoff") && stdout.contains("7. Scale"),
        "{stdout}"
    );
}
