//! The real-agent launcher: start, leader, KV round trip, two agents at once, and no consul process
//! left behind after a drop, a panic, an exit or a `SIGKILL` of the test process.
#![cfg(unix)]

use std::time::Duration;

use consul_lock_testkit::ConsulAgent;
use consul_lock_testkit::agent::{require_agent, require_new_agent};

fn client() -> reqwest::blocking::Client {
    consul_lock_testkit::transport::blocking_client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

fn leader(agent: &ConsulAgent) -> String {
    let body = client()
        .get(format!("{}/v1/status/leader", agent.base_url()))
        .send()
        .and_then(|response| response.error_for_status())
        .and_then(|response| response.text())
        .expect("GET /v1/status/leader");
    serde_json::from_str(&body).expect("leader is a JSON string")
}

fn unique_key(name: &str) -> String {
    format!("consul-lock-testkit/{name}/{}", std::process::id())
}

#[test]
fn agent_starts_with_a_leader() {
    let Some(agent) = require_agent() else { return };
    assert!(!leader(agent).is_empty());
    assert_eq!(agent.addr().ip().to_string(), "127.0.0.1");
    assert_eq!(agent.http_addr(), format!("127.0.0.1:{}", agent.addr().port()));
    assert_eq!(agent.base_url(), format!("http://{}", agent.http_addr()));
    assert!(agent.binary().is_file());
    let config = agent.config().expect("client config");
    assert_eq!(config.base_url(), agent.base_url());
}

#[test]
fn kv_put_get_round_trip() {
    let Some(agent) = require_agent() else { return };
    let client = client();
    let url = format!("{}/v1/kv/{}", agent.base_url(), unique_key("round-trip"));
    let put = client
        .put(&url)
        .body("hello, consul")
        .send()
        .and_then(|response| response.error_for_status())
        .and_then(|response| response.text())
        .expect("PUT");
    assert_eq!(put.trim(), "true");
    let got = client
        .get(format!("{url}?raw"))
        .send()
        .and_then(|response| response.error_for_status())
        .and_then(|response| response.text())
        .expect("GET");
    assert_eq!(got, "hello, consul");
}

#[test]
fn two_agents_at_once() {
    let Some(first) = require_new_agent() else {
        return;
    };
    let Some(second) = require_new_agent() else {
        return;
    };
    assert_ne!(first.addr(), second.addr());
    assert_ne!(first.pid(), second.pid());
    assert!(!leader(&first).is_empty());
    assert!(!leader(&second).is_empty());
    // Separate clusters: a key written to one is absent from the other.
    let key = unique_key("two-agents");
    let client = client();
    let put = client
        .put(format!("{}/v1/kv/{key}", first.base_url()))
        .body("first")
        .send()
        .expect("PUT");
    assert!(put.status().is_success());
    let get = client
        .get(format!("{}/v1/kv/{key}", second.base_url()))
        .send()
        .expect("GET");
    assert_eq!(get.status(), reqwest::StatusCode::NOT_FOUND);
}

/// No consul outlives its test process, however that process ends (Linux: uses `/proc`).
#[cfg(target_os = "linux")]
mod cleanup {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::thread;
    use std::time::{Duration, Instant};

    use consul_lock_testkit::ConsulAgent;
    use consul_lock_testkit::agent::{require_agent, require_new_agent};

    /// Set in the environment of the child test processes that these tests start.
    const CHILD_ENV: &str = "CONSUL_LOCK_TESTKIT_AGENT_CHILD";
    /// Where a child test process writes the pid of its consul.
    const PID_FILE_ENV: &str = "CONSUL_LOCK_TESTKIT_AGENT_PID_FILE";

    fn process_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn drop_ends_the_process() {
        let Some(agent) = require_new_agent() else {
            return;
        };
        let pid = agent.pid();
        assert!(process_exists(pid), "consul (pid {pid}) should be running");
        drop(agent);
        assert!(!process_exists(pid), "consul (pid {pid}) still exists after drop");
    }

    fn wait_until_gone(pid: u32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while process_exists(pid) {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Runs `helper` (one of the ignored tests below) in a child test process with an agent, waits
    /// until it reports consul's pid, applies `end` to the child, and returns the pid.
    fn run_child(helper: &str, end: impl FnOnce(&mut std::process::Child)) -> u32 {
        let pid_file: PathBuf =
            std::env::temp_dir().join(format!("consul-lock-testkit-{helper}-{}.pid", std::process::id()));
        let _ = std::fs::remove_file(&pid_file);
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([helper, "--exact", "--ignored", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env(PID_FILE_ENV, &pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning the child test process");
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.strip_suffix('\n')?.parse::<u32>().ok())
            {
                break pid;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("child {helper} exited ({status}) before reporting consul's pid");
            }
            assert!(
                Instant::now() < deadline,
                "child {helper} did not report consul's pid"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_file(&pid_file);
        assert!(
            process_exists(pid),
            "consul (pid {pid}) of {helper} should be running"
        );
        end(&mut child);
        let _ = child.wait();
        pid
    }

    #[test]
    fn no_consul_left_after_sigkill_of_the_test_process() {
        // Skips (or fails in CI) like the other tests when there is no consul.
        if require_agent().is_none() {
            return;
        }
        let pid = run_child("cleanup::child_holds_an_agent", |child| {
            child.kill().expect("SIGKILL");
        });
        assert!(
            wait_until_gone(pid, Duration::from_secs(10)),
            "consul (pid {pid}) outlived its SIGKILLed test process"
        );
    }

    #[test]
    fn no_consul_left_after_exit_with_a_shared_agent() {
        if require_agent().is_none() {
            return;
        }
        let pid = run_child("cleanup::child_exits_with_a_shared_agent", |_| {});
        assert!(
            wait_until_gone(pid, Duration::from_secs(10)),
            "consul (pid {pid}) outlived its test process, which exited without dropping it"
        );
    }

    #[test]
    fn no_consul_left_after_a_panicking_test_with_a_shared_agent() {
        if require_agent().is_none() {
            return;
        }
        let pid = run_child("cleanup::child_panics_with_a_shared_agent", |_| {});
        assert!(
            wait_until_gone(pid, Duration::from_secs(10)),
            "consul (pid {pid}) outlived its panicked test process"
        );
    }

    #[test]
    fn no_consul_left_after_a_panicking_test_with_its_own_agent() {
        if require_agent().is_none() {
            return;
        }
        let pid = run_child("cleanup::child_panics_with_its_own_agent", |_| {});
        // Drop runs while the panic unwinds, so consul is gone by the time the child has exited.
        assert!(
            !process_exists(pid),
            "consul (pid {pid}) outlived the panic that dropped it"
        );
    }

    /// In a child test process: the agent (`shared` or a new one), after its pid is written to the
    /// file named by `PID_FILE_ENV`. `None` when not run as a child by the tests above.
    fn child_agent(shared: bool) -> Option<(Option<ConsulAgent>, u32)> {
        let pid_file = std::env::var_os(PID_FILE_ENV).filter(|_| std::env::var_os(CHILD_ENV).is_some())?;
        let (own, pid) = if shared {
            (None, ConsulAgent::shared().expect("shared agent").pid())
        } else {
            let agent = ConsulAgent::start().expect("agent");
            let pid = agent.pid();
            (Some(agent), pid)
        };
        let tmp = PathBuf::from(format!("{}.tmp", Path::new(&pid_file).display()));
        std::fs::write(&tmp, format!("{pid}\n")).expect("writing the pid file");
        std::fs::rename(&tmp, &pid_file).expect("renaming the pid file");
        Some((own, pid))
    }

    #[test]
    #[ignore = "run by no_consul_left_after_sigkill_of_the_test_process"]
    fn child_holds_an_agent() {
        let Some(_agent) = child_agent(false) else {
            return;
        };
        thread::sleep(Duration::from_secs(120));
    }

    #[test]
    #[ignore = "run by no_consul_left_after_exit_with_a_shared_agent"]
    fn child_exits_with_a_shared_agent() {
        let Some(_agent) = child_agent(true) else {
            return;
        };
        // Like the end of a test binary: statics are never dropped.
        std::process::exit(0);
    }

    #[test]
    #[ignore = "run by no_consul_left_after_a_panicking_test_with_a_shared_agent"]
    fn child_panics_with_a_shared_agent() {
        let Some(_agent) = child_agent(true) else {
            return;
        };
        panic!("a test that panics while the shared agent runs");
    }

    #[test]
    #[ignore = "run by no_consul_left_after_a_panicking_test_with_its_own_agent"]
    fn child_panics_with_its_own_agent() {
        let Some(_agent) = child_agent(false) else {
            return;
        };
        panic!("a test that panics while its own agent runs");
    }
}
