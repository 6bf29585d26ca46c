//! A real Consul agent for tests: `consul agent -dev` on free loopback ports, stopped on drop.
//!
//! [`ConsulAgent::start`] finds a `consul` binary (`CONSUL_BIN`, else `consul` on `PATH`, else the
//! one `scripts/ensure-consul.sh` fetches and caches), starts a dev agent bound to `127.0.0.1` on
//! ports picked at random, and returns once the agent has a leader and can create and destroy a
//! session. [`ConsulAgent::shared`] gives one agent per test process; [`require_agent`] and
//! [`require_new_agent`] apply the project's policy when no agent can be had: fail in CI (the `CI`
//! environment variable is set), skip elsewhere.
//!
//! # No process left behind
//!
//! Consul does not run as a child of the test process but under a small `sh` watchdog, in a
//! process group of its own. The watchdog's standard input is a pipe whose write end only the test
//! process holds. When that pipe closes — [`ConsulAgent`] dropped, or the test process gone for any
//! reason: normal exit with a `static` agent whose `Drop` never runs, a panic, `abort`, `SIGKILL` —
//! the watchdog sends consul `SIGTERM`, then `SIGKILL` if it is still there 5 s later, reaps it,
//! deletes the agent's temporary directory and exits. `Drop` closes the pipe and waits for the
//! watchdog, so when `drop` returns, consul is gone. The only way around this is to `SIGKILL` the
//! watchdog's own shells.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consul_lock_core::api::{ClientConfig, ConfigError};

/// How long [`ConsulAgent::start`] waits for a started agent to become usable.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Timeout of one readiness probe request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many times a start is tried when consul fails because one of its ports got taken.
const START_ATTEMPTS: u32 = 3;
/// How long `Drop` waits for the watchdog (which itself escalates to `SIGKILL` after 5 s) before
/// killing the whole process group.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// How many log lines go into errors and [`ConsulAgent::log_tail`].
const LOG_TAIL_LINES: usize = 40;

/// The watchdog, run as `sh -c WATCHDOG consul-lock-watchdog <dir> <consul> <args...>`.
///
/// It starts consul in the background (stdin `/dev/null`, stdout and stderr to the watchdog's
/// stderr, which is the agent's log file), prints consul's pid on stdout, and then:
/// - a reader subshell blocks on the watchdog's stdin (saved as fd 3, since a background job's
///   stdin is `/dev/null`). On end of file it tells the main shell (`SIGUSR1`), sends consul
///   `SIGTERM`, and `SIGKILL` if it is still there after about 5 s;
/// - the main shell waits for consul. If the stop was asked for, it waits for the reader and
///   removes `<dir>`; if consul ended by itself (startup failure), it ends the reader and keeps
///   `<dir>` so that the log can be read. `SIGHUP`, `SIGINT` or `SIGTERM` sent to the watchdog are
///   passed on to consul.
const WATCHDOG: &str = r#"
dir=$1
shift
"$@" </dev/null >&2 &
pid=$!
echo "$pid"
stopping=0
trap 'stopping=1' USR1
exec 3<&0
(
  read -r _ignored <&3
  kill -USR1 $$
  kill -TERM "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then
      kill -KILL "$pid" 2>/dev/null
      break
    fi
    sleep 0.05
  done
) &
reader=$!
exec 3<&-
trap 'kill -TERM "$pid" 2>/dev/null' HUP INT TERM
status=0
while :; do
  wait "$pid"
  status=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$stopping" = 1 ]; then
  wait "$reader"
  rm -rf "$dir"
else
  kill "$reader" 2>/dev/null
  wait "$reader" 2>/dev/null
fi
exit "$status"
"#;

/// Why no agent could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No consul binary: `CONSUL_BIN` is wrong, none is on `PATH`, and the fetch script failed.
    #[error(
        "no consul binary found: {reason}; set CONSUL_BIN to a consul binary or run \
         scripts/ensure-consul.sh"
    )]
    BinaryNotFound {
        /// What was tried and how it failed.
        reason: String,
    },
    /// A process (the watchdog shell, `consul version`, the fetch script) could not be started.
    #[error("could not run {what}: {source}")]
    Spawn {
        /// The command.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Setting up the agent failed: temporary directory, log file, free ports, watchdog output.
    #[error("could not set up the consul agent: {what}: {source}")]
    Setup {
        /// The step that failed.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The HTTP client for the readiness probes could not be built.
    #[error("could not build the HTTP client for the readiness probes: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// Consul exited before it was ready.
    #[error("consul agent exited during startup ({status}); last log lines:\n{log_tail}")]
    Exited {
        /// How it exited, as the watchdog reported it.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// Consul kept running but did not become usable before the deadline.
    #[error(
        "consul agent at {addr} not ready within {waited:?} (last probe: {last_problem}); last log \
         lines:\n{log_tail}"
    )]
    NotReady {
        /// The agent's HTTP address.
        addr: SocketAddr,
        /// How long startup waited.
        waited: Duration,
        /// What the last readiness probe saw.
        last_problem: String,
        /// The end of its log.
        log_tail: String,
    },
    /// The agent's address did not make a valid client config.
    #[error("client config for {addr}: {source}")]
    Config {
        /// The address.
        addr: String,
        /// The core's complaint.
        #[source]
        source: ConfigError,
    },
    /// The process-wide shared agent could not be started (the first attempt's error, as text:
    /// it is not retried).
    #[error("the shared consul agent could not be started: {0}")]
    Shared(String),
}

/// A running `consul agent -dev` on loopback, stopped (and its temporary directory deleted) when
/// dropped. See the [module documentation](self) for how it is cleaned up when the test process
/// dies without dropping it.
#[derive(Debug)]
pub struct ConsulAgent {
    binary: PathBuf,
    http: SocketAddr,
    https: Option<SocketAddr>,
    tls: Option<TlsFiles>,
    pid: u32,
    dir: PathBuf,
    log: PathBuf,
    watchdog: Child,
}

impl ConsulAgent {
    /// Starts a new dev agent and waits (up to 30 s) until it has a leader and can create and
    /// destroy a session.
    ///
    /// The binary is `CONSUL_BIN` if set, else `consul` on `PATH`, else the path printed by
    /// `scripts/ensure-consul.sh` (which fetches Consul once per machine); the choice is made once
    /// per process. A start that fails because a port got taken is retried with new ports, up to 3
    /// times in all.
    ///
    /// Safe to call from within an async runtime: the blocking probes run on a thread of their own.
    pub fn start() -> Result<ConsulAgent, AgentError> {
        ConsulAgent::start_with(AgentOptions::default())
    }

    /// Like [`start`](Self::start), with extra configuration: `-hcl` snippets and, on request,
    /// HTTPS with certificates made by `consul tls` (see [`AgentOptions`]).
    pub fn start_with(options: AgentOptions) -> Result<ConsulAgent, AgentError> {
        match thread::spawn(move || start_agent(&options)).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// One agent for the whole test process, started on first use. `cargo test` runs the tests of
    /// one binary as threads of one process, so they all get the same agent; the watchdog stops it
    /// when the process exits. A failed start is not retried: every caller gets its error.
    pub fn shared() -> Result<&'static ConsulAgent, AgentError> {
        static SHARED: OnceLock<Result<ConsulAgent, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| ConsulAgent::start().map_err(|err| err.to_string()))
            .as_ref()
            .map_err(|err| AgentError::Shared(err.clone()))
    }

    /// The HTTP API's address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.http
    }

    /// The HTTP API's address as `127.0.0.1:PORT`, the form of `CONSUL_HTTP_ADDR`.
    pub fn http_addr(&self) -> String {
        self.http.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// A client config pointing at this agent, everything else at its defaults.
    pub fn config(&self) -> Result<ClientConfig, AgentError> {
        let addr = self.http_addr();
        ClientConfig::http(&addr).map_err(|source| AgentError::Config { addr, source })
    }

    /// The HTTPS API's address (`127.0.0.1:PORT`), when the agent was started with
    /// [`AgentOptions::tls`].
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    /// The certificates the agent's HTTPS port uses, and a client certificate from the same CA,
    /// when the agent was started with [`AgentOptions::tls`]. They live in the agent's temporary
    /// directory, deleted when the agent stops.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The consul binary the agent runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The process id of consul itself (not of its watchdog).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last lines of the agent's log (it logs at level `warn`).
    pub fn log_tail(&self) -> String {
        read_log_tail(&self.log)
    }

    /// Stops consul: closes the watchdog's pipe, waits for the watchdog to stop and reap consul,
    /// and as a last resort kills the whole process group.
    fn stop(&mut self) {
        drop(self.watchdog.stdin.take());
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match self.watchdog.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => {
                    tracing::warn!(
                        pid = self.pid,
                        "consul watchdog did not stop; killing its process group"
                    );
                    kill_process_group(self.watchdog.id());
                    let _ = self.watchdog.kill();
                    let _ = self.watchdog.wait();
                    break;
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared agent, or `None` (after saying why on stderr) when there is none and the `CI`
/// environment variable is unset or empty.
///
/// # Panics
///
/// When no agent can be had and `CI` is set: in CI, tests that need Consul fail instead of
/// skipping.
///
/// ```no_run
/// # use consul_lock_testkit::agent::require_agent;
/// let Some(agent) = require_agent() else { return };
/// println!("{}", agent.base_url());
/// ```
pub fn require_agent() -> Option<&'static ConsulAgent> {
    apply_policy(ConsulAgent::shared())
}

/// Like [`require_agent`], but a new agent of the caller's own, for tests that stop an agent or
/// need several.
///
/// # Panics
///
/// When no agent can be had and `CI` is set.
pub fn require_new_agent() -> Option<ConsulAgent> {
    apply_policy(ConsulAgent::start())
}

/// The test binary's agent with ACLs on (allowing by default, master token `root`), started
/// once and shared by the binary's tests; `None` (the test skips) only when no agent can be had
/// outside CI.
///
/// # Panics
///
/// When no agent can be had and `CI` is set.
pub fn require_acl_agent() -> Option<&'static ConsulAgent> {
    static AGENT: OnceLock<Option<ConsulAgent>> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            require_new_agent_with(
                AgentOptions::default()
                    .hcl(r#"acl { enabled = true, default_policy = "allow", tokens { master = "root" } }"#),
            )
        })
        .as_ref()
}

/// Like [`require_new_agent`], for an agent started with `options` (see
/// [`ConsulAgent::start_with`]).
///
/// # Panics
///
/// When no agent can be had and `CI` is set.
pub fn require_new_agent_with(options: AgentOptions) -> Option<ConsulAgent> {
    apply_policy(ConsulAgent::start_with(options))
}

/// Opt-in settings for [`ConsulAgent::start_with`]; the default starts the same agent as
/// [`ConsulAgent::start`].
///
/// ```no_run
/// # use consul_lock_testkit::agent::{AgentOptions, ConsulAgent};
/// // HTTPS that wants a client certificate, also listening on 127.0.0.2.
/// let options = AgentOptions::default()
///     .tls()
///     .hcl("verify_incoming_https = true")
///     .hcl(r#"addresses { https = "127.0.0.1 127.0.0.2" }"#);
/// let agent = ConsulAgent::start_with(options)?;
/// let https = agent.https_addr().unwrap();
/// let ca = &agent.tls_files().unwrap().ca;
/// # Ok::<(), consul_lock_testkit::AgentError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    hcl: Vec<String>,
    tls: bool,
}

impl AgentOptions {
    /// Adds a configuration snippet, passed to consul as one `-hcl` argument (after the
    /// launcher's own).
    pub fn hcl(mut self, snippet: impl Into<String>) -> AgentOptions {
        self.hcl.push(snippet.into());
        self
    }

    /// Serves HTTPS too, on a free loopback port ([`ConsulAgent::https_addr`]), with a CA and a
    /// server certificate for `server.dc1.consul` (SANs: `server.dc1.consul`, `localhost`,
    /// `127.0.0.1`) made by `consul tls` in the agent's directory ([`ConsulAgent::tls_files`]).
    /// Client certificates are not required unless a snippet says so
    /// (`verify_incoming_https = true`). Plain HTTP stays on.
    pub fn tls(mut self) -> AgentOptions {
        self.tls = true;
        self
    }
}

/// PEM files made by `consul tls ca create`, `consul tls cert create -server -dc dc1` and
/// `consul tls cert create -client -dc dc1`.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA certificate (`consul-agent-ca.pem`).
    pub ca: PathBuf,
    /// The server certificate (`dc1-server-consul-0.pem`): CN `server.dc1.consul`.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate from the same CA (`dc1-client-consul-0.pem`).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes a CA, a server certificate and a client certificate in `dir` with `consul tls`.
    pub fn create(consul: &Path, dir: &Path) -> Result<TlsFiles, AgentError> {
        let steps: [&[&str]; 3] = [
            &["tls", "ca", "create"],
            &["tls", "cert", "create", "-server", "-dc", "dc1"],
            &["tls", "cert", "create", "-client", "-dc", "dc1"],
        ];
        for args in steps {
            let what = format!("{} {}", consul.display(), args.join(" "));
            let output = Command::new(consul)
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|source| AgentError::Spawn {
                    what: what.clone(),
                    source,
                })?;
            if !output.status.success() {
                return Err(AgentError::Setup {
                    what,
                    source: io::Error::other(format!(
                        "{}: {}",
                        describe_exit(output.status),
                        String::from_utf8_lossy(&output.stderr).trim()
                    )),
                });
            }
        }
        let files = TlsFiles {
            ca: dir.join("consul-agent-ca.pem"),
            server_cert: dir.join("dc1-server-consul-0.pem"),
            server_key: dir.join("dc1-server-consul-0-key.pem"),
            client_cert: dir.join("dc1-client-consul-0.pem"),
            client_key: dir.join("dc1-client-consul-0-key.pem"),
        };
        for path in [
            &files.ca,
            &files.server_cert,
            &files.server_key,
            &files.client_cert,
            &files.client_key,
        ] {
            fs::metadata(path).map_err(|source| AgentError::Setup {
                what: format!("consul tls did not write {}", path.display()),
                source,
            })?;
        }
        Ok(files)
    }
}

/// Fail in CI, skip elsewhere.
#[allow(clippy::print_stderr)]
fn apply_policy<T>(result: Result<T, AgentError>) -> Option<T> {
    match result {
        Ok(agent) => Some(agent),
        Err(err) if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) => {
            panic!("no consul agent (CI is set, so this is a failure, not a skip): {err}")
        }
        Err(err) => {
            eprintln!("skipping: no consul agent: {err}");
            None
        }
    }
}

/// The consul binary and its `major.minor` version when `consul version` tells it.
#[derive(Clone, Debug)]
struct Binary {
    path: PathBuf,
    version: Option<(u32, u32)>,
}

/// Finds the binary once per process (the fetch script must not run concurrently with itself).
fn binary() -> Result<Binary, AgentError> {
    static BINARY: OnceLock<Result<Binary, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let path = find_binary()?;
            let version = binary_version(&path);
            Ok(Binary { path, version })
        })
        .clone()
        .map_err(|reason| AgentError::BinaryNotFound { reason })
}

fn find_binary() -> Result<PathBuf, String> {
    find_tool("CONSUL_BIN", "consul", Some("ensure-consul.sh"))
}

/// A tool the test kit runs: `$env_var` if set, else `program` on `PATH` (or in `/usr/sbin`,
/// `/sbin`, which a non-root `PATH` may lack), else what `scripts/<script>` prints last (those
/// scripts fetch the tool once per machine).
pub(crate) fn find_tool(env_var: &str, program: &str, script: Option<&str>) -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os(env_var).filter(|bin| !bin.is_empty()) {
        let path = PathBuf::from(bin);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("{env_var}={} is not an executable file", path.display()))
        };
    }
    if let Some(path) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|path| is_executable(path))
    {
        return Ok(path);
    }
    let Some(script) = script else {
        return Err(format!("{env_var} is unset and {program} is not on PATH"));
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(script);
    if !script.is_file() {
        return Err(format!(
            "{env_var} is unset, {program} is not on PATH, and {} does not exist",
            script.display()
        ));
    }
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("could not run bash {}: {err}", script.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = last_lines(&stderr, 10);
    if !output.status.success() {
        return Err(format!(
            "{env_var} is unset, {program} is not on PATH, and {} failed ({}):\n{stderr}",
            script.display(),
            output.status
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(format!(
            "{} printed {:?}, which is not an executable file:\n{stderr}",
            script.display(),
            path
        ))
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// `major.minor` from the first line of `consul version` (`Consul v1.8.7`).
fn binary_version(path: &Path) -> Option<(u32, u32)> {
    let output = Command::new(path)
        .arg("version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout.lines().next()?.trim().strip_prefix("Consul v")?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The agent's loopback ports.
#[derive(Clone, Copy, Debug)]
struct Ports {
    http: u16,
    dns: u16,
    serf_lan: u16,
    serf_wan: u16,
    server: u16,
    https: Option<u16>,
}

/// Picks five distinct free ports at once (six with `https`): each is bound (TCP, plus UDP for DNS
/// and Serf, which use both) until all are chosen, then released for consul.
fn pick_ports(https: bool) -> io::Result<Ports> {
    let mut held: Vec<(TcpListener, Option<UdpSocket>)> = Vec::new();
    let mut rejected: Vec<TcpListener> = Vec::new();
    let mut ports = [0_u16; 6];
    let count = if https { 6 } else { 5 };
    // http, dns, serf_lan, serf_wan, server, https
    for (slot, needs_udp) in ports
        .iter_mut()
        .zip([false, true, true, true, false, false])
        .take(count)
    {
        let mut tries = 0;
        loop {
            let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let port = tcp.local_addr()?.port();
            let udp = if needs_udp {
                match UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
                    Ok(udp) => Some(udp),
                    Err(err) => {
                        tries += 1;
                        if tries > 20 {
                            return Err(err);
                        }
                        // Keep it bound so that the next bind gets another port.
                        rejected.push(tcp);
                        continue;
                    }
                }
            } else {
                None
            };
            held.push((tcp, udp));
            *slot = port;
            break;
        }
    }
    let [http, dns, serf_lan, serf_wan, server, https_port] = ports;
    Ok(Ports {
        http,
        dns,
        serf_lan,
        serf_wan,
        server,
        https: https.then_some(https_port),
    })
}

/// Why one start attempt failed.
enum Attempt {
    /// The ports were taken by someone else meanwhile: try again with new ones.
    PortTaken(AgentError),
    /// Anything else.
    Failed(AgentError),
}

fn start_agent(options: &AgentOptions) -> Result<ConsulAgent, AgentError> {
    let binary = binary()?;
    let client = crate::transport::blocking_client_builder()
        .no_proxy()
        .timeout(PROBE_TIMEOUT)
        .build()
        .map_err(AgentError::HttpClient)?;
    let mut attempt = 1;
    loop {
        match start_once(&binary, &client, options) {
            Ok(agent) => return Ok(agent),
            Err(Attempt::PortTaken(err)) if attempt < START_ATTEMPTS => {
                tracing::debug!(attempt, %err, "consul agent port taken; retrying with new ports");
                attempt += 1;
            }
            Err(Attempt::PortTaken(err) | Attempt::Failed(err)) => return Err(err),
        }
    }
}

fn start_once(
    binary: &Binary,
    client: &reqwest::blocking::Client,
    options: &AgentOptions,
) -> Result<ConsulAgent, Attempt> {
    let began = Instant::now();
    let setup = |what: &str| {
        let what = what.to_owned();
        move |source| Attempt::Failed(AgentError::Setup { what, source })
    };
    let dir = make_temp_dir().map_err(setup("creating a temporary directory"))?;
    let log = dir.join("consul.log");
    let log_file = match File::create(&log) {
        Ok(file) => file,
        Err(err) => {
            let _ = fs::remove_dir_all(&dir);
            return Err(setup("creating the log file")(err));
        }
    };
    let tls = if options.tls {
        match TlsFiles::create(&binary.path, &dir) {
            Ok(files) => Some(files),
            Err(err) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(Attempt::Failed(err));
            }
        }
    } else {
        None
    };
    let ports = match pick_ports(options.tls) {
        Ok(ports) => ports,
        Err(err) => {
            let _ = fs::remove_dir_all(&dir);
            return Err(setup("picking free loopback ports")(err));
        }
    };
    let mut args: Vec<OsString> = vec![
        "agent".into(),
        "-dev".into(),
        "-bind=127.0.0.1".into(),
        "-client=127.0.0.1".into(),
        format!("-http-port={}", ports.http).into(),
        format!("-dns-port={}", ports.dns).into(),
        format!("-serf-lan-port={}", ports.serf_lan).into(),
        format!("-serf-wan-port={}", ports.serf_wan).into(),
        format!("-server-port={}", ports.server).into(),
        "-grpc-port=-1".into(),
        "-log-level=warn".into(),
        "-hcl=disable_update_check = true".into(),
    ];
    if binary.version.is_some_and(|version| version >= (1, 14)) {
        // Consul 1.14 added a gRPC TLS port, on 8503 in dev mode.
        args.push("-hcl=ports { grpc_tls = -1 }".into());
    }
    if let (Some(port), Some(tls)) = (ports.https, &tls) {
        args.push(format!("-hcl=ports {{ https = {port} }}").into());
        for (name, path) in [
            ("ca_file", &tls.ca),
            ("cert_file", &tls.server_cert),
            ("key_file", &tls.server_key),
        ] {
            args.push(format!("-hcl={name} = {:?}", path.display().to_string()).into());
        }
    }
    args.extend(options.hcl.iter().map(|snippet| format!("-hcl={snippet}").into()));
    let mut watchdog = match Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("consul-lock-watchdog")
        .arg(&dir)
        .arg(&binary.path)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        // A group of its own: signals for the test's group (Ctrl-C) don't reach it; the pipe does.
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(source) => {
            let _ = fs::remove_dir_all(&dir);
            return Err(Attempt::Failed(AgentError::Spawn {
                what: "sh (the consul watchdog)".into(),
                source,
            }));
        }
    };
    let pid_line = watchdog.stdout.take().map(|stdout| {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let pid = match pid_line {
        Some(Ok(line)) => line.trim().parse::<u32>().ok(),
        _ => None,
    };
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.http));
    let agent = ConsulAgent {
        binary: binary.path.clone(),
        http,
        https: ports
            .https
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        tls,
        pid: pid.unwrap_or(0),
        dir,
        log,
        watchdog,
    };
    if pid.is_none() {
        let log_tail = agent.log_tail();
        return Err(Attempt::Failed(AgentError::Exited {
            status: "the watchdog did not report consul's pid".into(),
            log_tail,
        }));
    }
    wait_ready(agent, client, began)
}

/// Polls until the agent is usable, consul exits, or the deadline passes.
fn wait_ready(
    mut agent: ConsulAgent,
    client: &reqwest::blocking::Client,
    began: Instant,
) -> Result<ConsulAgent, Attempt> {
    let base = agent.base_url();
    let deadline = began + READY_DEADLINE;
    loop {
        if let Ok(Some(status)) = agent.watchdog.try_wait() {
            let log_tail = agent.log_tail();
            let port_taken = log_tail.contains("address already in use");
            let err = AgentError::Exited {
                status: describe_exit(status),
                log_tail,
            };
            return Err(if port_taken {
                Attempt::PortTaken(err)
            } else {
                Attempt::Failed(err)
            });
        }
        let last_problem = match probe(client, &base) {
            Ok(()) => {
                tracing::debug!(addr = %agent.http, pid = agent.pid, elapsed = ?began.elapsed(), "consul agent ready");
                return Ok(agent);
            }
            Err(problem) => problem,
        };
        if Instant::now() >= deadline {
            let log_tail = agent.log_tail();
            return Err(Attempt::Failed(AgentError::NotReady {
                addr: agent.http,
                waited: began.elapsed(),
                last_problem,
                log_tail,
            }));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Ready when there is a leader and a session can be created and destroyed (a fresh dev agent may
/// answer 500 "No cluster leader" for a moment after it reports a leader).
fn probe(client: &reqwest::blocking::Client, base: &str) -> Result<(), String> {
    let leader = request(
        client.get(format!("{base}/v1/status/leader")),
        "GET /v1/status/leader",
    )?;
    match serde_json::from_str::<String>(&leader) {
        Ok(leader) if !leader.is_empty() => {}
        _ => {
            return Err(format!(
                "GET /v1/status/leader: no leader yet ({})",
                leader.trim()
            ));
        }
    }
    let created = request(
        client
            .put(format!("{base}/v1/session/create"))
            .body(r#"{"Name": "consul-lock-testkit readiness probe", "TTL": "10s"}"#),
        "PUT /v1/session/create",
    )?;
    let id = serde_json::from_str::<serde_json::Value>(&created)
        .ok()
        .and_then(|value| value.get("ID")?.as_str().map(str::to_owned))
        .ok_or_else(|| format!("PUT /v1/session/create: no ID in {}", created.trim()))?;
    request(
        client.put(format!("{base}/v1/session/destroy/{id}")),
        "PUT /v1/session/destroy",
    )?;
    Ok(())
}

/// Sends a request; the body of a 2xx answer, else a description of what went wrong.
fn request(request: reqwest::blocking::RequestBuilder, what: &str) -> Result<String, String> {
    let response = request.send().map_err(|err| format!("{what}: {err}"))?;
    let status = response.status();
    let body = response
        .text()
        .map_err(|err| format!("{what}: reading the body: {err}"))?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{what}: {status}: {}", body.trim()))
    }
}

fn describe_exit(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

/// A new directory under the system's temporary directory.
fn make_temp_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "consul-lock-agent-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(name);
    fs::create_dir(&dir)?;
    Ok(dir)
}

fn read_log_tail(log: &Path) -> String {
    match fs::read(log) {
        Ok(bytes) => last_lines(&String::from_utf8_lossy(&bytes), LOG_TAIL_LINES),
        Err(err) => format!("(log {} unreadable: {err})", log.display()),
    }
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// `SIGKILL` to a process group, through the shell's `kill` (std has no `kill(2)` and the crate
/// forbids `unsafe`).
fn kill_process_group(pgid: u32) {
    let _ = Command::new("sh")
        .args(["-c", r#"kill -s KILL -- "-$1" 2>/dev/null"#, "sh"])
        .arg(pgid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The consul binary the test kit runs (see [`ConsulAgent::start`] for how it is found).
pub(crate) fn consul_path() -> Result<PathBuf, AgentError> {
    binary().map(|binary| binary.path)
}
