//! What the CLI tests share: the built binary as a process pointed at the test agent, scratch
//! directories with marker files, and direct reads of the agent's KV store.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consul_lock_core::api::{ClientConfig, Endpoint, Key, KvGet, KvPair, SessionDestroy, SessionId};
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::ConsulAgent;

/// The binary under test: this build's, or `CONSUL_LOCK_TEST_BIN` when set (to check that a
/// test fails on an older build).
pub fn bin() -> String {
    std::env::var("CONSUL_LOCK_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_consul-lock").to_owned())
}

/// `consul-lock <args>` aimed at `agent`, with none of the caller's Consul settings.
pub fn consul_lock(agent: &ConsulAgent, args: &[&str]) -> Command {
    let mut command = Command::new(bin());
    scrub(&mut command);
    command
        .env("CONSUL_HTTP_ADDR", agent.http_addr())
        .env("SHELL", "/bin/sh")
        .args(args)
        .stdin(Stdio::null());
    command
}

/// `consul lock <args>` (Go's, the binary the test agent runs) aimed at `agent`.
pub fn go_lock(agent: &ConsulAgent, args: &[&str]) -> Command {
    let mut command = Command::new(agent.binary());
    scrub(&mut command);
    command
        .arg("lock")
        .env("CONSUL_HTTP_ADDR", agent.http_addr())
        .env("SHELL", "/bin/sh")
        .args(args)
        .stdin(Stdio::null());
    command
}

/// Removes the caller's `CONSUL_*` variables from `command`'s environment.
pub fn scrub(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CONSUL_") {
            command.env_remove(name);
        }
    }
}

/// A prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("cli-test/{test}/{}-{nanos}", std::process::id())
}

/// A child process killed (if still running) when dropped, so a failed test leaves nothing.
pub struct Running {
    child: Option<Child>,
}

impl Running {
    pub fn spawn(mut command: Command) -> Running {
        Running {
            child: Some(
                command
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            ),
        }
    }

    /// Like [`spawn`](Self::spawn), with standard output going to the file `stdout` (to be read
    /// while the process runs); [`finish`](Self::finish) then gives an empty stdout.
    pub fn spawn_to_file(mut command: Command, stdout: &Path) -> Running {
        let file = fs::File::create(stdout).unwrap();
        Running {
            child: Some(command.stdout(file).stderr(Stdio::piped()).spawn().unwrap()),
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child().try_wait().unwrap().is_some()
    }

    /// Waits up to `timeout` for the process to exit; its status and output.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        while !self.exited() {
            assert!(
                Instant::now() < deadline,
                "consul-lock did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let Output {
            status,
            stdout,
            stderr,
        } = self.child.take().unwrap().wait_with_output().unwrap();
        (
            status,
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        )
    }

    /// Sends `signal` (`TERM`, `INT`) to the process.
    pub fn signal(&mut self, signal: &str) {
        let pid = self.child().id().to_string();
        let status = Command::new("kill").args(["-s", signal, &pid]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A scratch directory for marker files, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("consul-lock-cli-{test}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A shell fragment that waits (at most 30 s, so nothing outlives a failed test) for the
    /// marker file `name`.
    pub fn wait_for(&self, name: &str) -> String {
        format!(
            "i=0; while [ ! -f '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
            self.path(name).display()
        )
    }

    pub fn touch(&self, name: &str) {
        fs::write(self.path(name), b"").unwrap();
    }

    pub fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    pub fn exists(&self, name: &str) -> bool {
        self.path(name).exists()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits up to `timeout` for `path` to exist.
pub fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn transport() -> &'static TestTransport {
    static HTTP: OnceLock<TestTransport> = OnceLock::new();
    HTTP.get_or_init(|| TestTransport::new().unwrap())
}

fn config(agent: &ConsulAgent) -> ClientConfig {
    agent.config().unwrap()
}

/// Calls the agent's API directly.
pub fn call<E: Endpoint>(agent: &ConsulAgent, endpoint: &E) -> E::Output
where
    E::Output: std::fmt::Debug,
{
    transport()
        .call(&config(agent), endpoint)
        .expect("the agent answers")
        .expect("the agent accepts the request")
}

/// The KV entry at `key`, if any.
pub fn kv(agent: &ConsulAgent, key: &str) -> Option<KvPair> {
    call(agent, &KvGet::new(Key::new(key).unwrap())).value
}

/// Destroys session `id`, as an operator (or a failed node) would.
pub fn destroy_session(agent: &ConsulAgent, id: &str) {
    assert!(call(
        agent,
        &SessionDestroy {
            id: SessionId::new(id).unwrap()
        }
    ));
}

/// The JSON event lines of `stdout`.
pub fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with("{\"event\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Wall-clock nanoseconds, as `date +%s%N` writes them.
pub fn nanos(text: &str) -> u128 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a timestamp: {text:?}"))
}

/// One raw request to `agent` with `token` if given: the status and the body.
pub fn raw(agent: &ConsulAgent, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", agent.base_url()));
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    let reply = transport()
        .exchange(request.body(body.as_bytes().to_vec()).unwrap())
        .unwrap();
    (
        reply.status().as_u16(),
        String::from_utf8_lossy(reply.body()).into_owned(),
    )
}

/// A new ACL token (made with the master token `root`) with the rules `rules`: its secret.
pub fn acl_token(agent: &ConsulAgent, name: &str, rules: &str) -> String {
    let policy = serde_json::json!({ "Name": name, "Rules": rules });
    let (status, body) = raw(agent, "PUT", "/v1/acl/policy", &policy.to_string(), Some("root"));
    assert_eq!(status, 200, "{body}");
    let token = serde_json::json!({ "Policies": [{ "Name": name }] });
    let (status, body) = raw(agent, "PUT", "/v1/acl/token", &token.to_string(), Some("root"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["SecretID"]
        .as_str()
        .unwrap()
        .to_owned()
}
