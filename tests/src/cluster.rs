//! A real Consul cluster for the reliability lab: three (or five) Consul servers and one client
//! agent per contender node, in the network namespace of the calling process, each agent on a
//! loopback address of its own, with the faults that hurt locks in production: network partitions
//! made by nftables rules, and `SIGSTOP`/`SIGCONT`, `SIGKILL` and restart of any agent, and a
//! graceful leave of the leader (a forced election).
//!
//! # Only inside a private network namespace
//!
//! [`Cluster::start`] refuses to run unless the process's network namespace has no interface but
//! `lo` (`/proc/self/net/dev`): the caller runs under `unshare --net` (the lab command's test does
//! it for you), so the agents, the rules and every packet stay in a namespace that dies with the
//! process. It brings `lo` up, which a new namespace has down.
//!
//! # Telling agents apart on one loopback
//!
//! A TCP connection from one agent to another leaves from `127.0.0.1` whatever address the agent
//! binds (the kernel picks the source by route, not by who dials), so a rule cannot tell the
//! sender by source address. Each agent runs under a user id of its own instead, and a rule drops
//! what a given user's sockets send to a given address (`meta skuid U ip daddr A drop`, in the
//! output hook): `A → B` blocked means agent A can no longer reach any of B's ports, whether A
//! dials or answers. Every connection is dialled to a listener's own address, so blocking both
//! directions cuts them all.
//!
//! # Nothing left behind
//!
//! Dropping the [`Cluster`] kills every agent (`SIGKILL`, after `SIGCONT` for stopped ones),
//! reaps it, removes the rules and the data directories. A process that dies without dropping it
//! takes its namespace with it; run it as the first process of a PID namespace as well (`unshare
//! --net --pid --fork --kill-child`, as the lab's test does) and the kernel kills the agents too.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::{consul_path, find_tool};

/// The first user id the agents run under (agent `i` runs as `UID_BASE + i`).
const UID_BASE: u32 = 47_000;
/// How long [`Cluster::start`] and [`Cluster::wait_ready`] wait for a leader and every agent.
pub const READY_DEADLINE: Duration = Duration::from_secs(90);
/// How long one status request to an agent may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Consul's HTTP port on every agent (each agent has its own address).
pub const HTTP_PORT: u16 = 8500;
/// The nftables table the faults live in.
const TABLE: &str = "consul_lock_lab";

/// Why the cluster could not be made or a fault could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The process is not in a network namespace of its own.
    #[error(
        "refusing to start a cluster outside a private network namespace (interfaces other than lo: \
         {interfaces}); run under `unshare --net`"
    )]
    NotIsolated {
        /// The interfaces found.
        interfaces: String,
    },
    /// A tool (consul, nft, ip) could not be found.
    #[error("{tool} not found: {reason}")]
    ToolNotFound {
        /// Which tool.
        tool: &'static str,
        /// What was tried.
        reason: String,
    },
    /// A command failed or could not be run.
    #[error("{what} failed: {detail}")]
    Command {
        /// The command.
        what: String,
        /// Its status and standard error.
        detail: String,
    },
    /// File or process I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The HTTP client for the status probes could not be built.
    #[error("could not build the status probe client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The cluster did not get a leader, or not every agent joined, in time.
    #[error("cluster not ready within {waited:?}: {problem}")]
    NotReady {
        /// How long it waited.
        waited: Duration,
        /// What was still missing.
        problem: String,
    },
    /// An agent index out of range, or a restart of a running agent.
    #[error("bad agent request: {0}")]
    BadAgent(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// How many agents of each kind.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Consul servers (3 or 5 in production).
    pub servers: usize,
    /// Client agents, one per contender node.
    pub clients: usize,
    /// Where the agents' data directories and logs go (created; removed on drop).
    pub dir: PathBuf,
}

/// Server or client agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A Consul server (a Raft voter).
    Server,
    /// A client agent.
    Client,
}

/// One agent of the cluster.
#[derive(Debug)]
pub struct Agent {
    /// `s1`, `s2`, … or `c1`, `c2`, ….
    pub name: String,
    /// Server or client.
    pub role: Role,
    /// The loopback address it binds (`127.0.0.1x` for servers, `127.0.0.2x` for clients).
    pub ip: Ipv4Addr,
    uid: u32,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl Agent {
    /// Its HTTP address, `ip:8500`.
    pub fn http_addr(&self) -> String {
        format!("{}:{HTTP_PORT}", self.ip)
    }

    /// Whether its process is running (not killed or left; a stopped one counts as running).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it is stopped by `SIGSTOP`.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
}

/// A running cluster; see the [module documentation](self).
pub struct Cluster {
    consul: PathBuf,
    nft: PathBuf,
    agents: Vec<Agent>,
    dir: PathBuf,
    http: reqwest::blocking::Client,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("agents", &self.agents)
            .field("dir", &self.dir)
            .finish()
    }
}

/// Fails unless the process's network namespace holds `lo` alone.
pub fn ensure_isolated() -> Result<(), ClusterError> {
    let dev = fs::read_to_string("/proc/self/net/dev").map_err(io_err("reading /proc/self/net/dev"))?;
    let others: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next().map(str::trim))
        .filter(|name| *name != "lo")
        .collect();
    if others.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::NotIsolated {
            interfaces: others.join(", "),
        })
    }
}

fn run(program: &Path, args: &[&str], input: Option<&str>) -> Result<(), ClusterError> {
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running {what}")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(io_err(format!("writing to {what}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(io_err(format!("waiting for {what}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            what,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

impl Cluster {
    /// Brings `lo` up, installs the (empty) fault table, starts the agents and waits (up to
    /// [`READY_DEADLINE`]) until [`wait_ready`](Self::wait_ready) holds. Fails outside a private
    /// network namespace.
    pub fn start(options: &ClusterOptions) -> Result<Cluster, ClusterError> {
        ensure_isolated()?;
        if options.servers == 0 || options.servers > 9 || options.clients > 9 {
            return Err(ClusterError::BadAgent(format!(
                "{} servers and {} clients: 1 to 9 servers and up to 9 clients",
                options.servers, options.clients
            )));
        }
        let consul = consul_path().map_err(|e| ClusterError::ToolNotFound {
            tool: "consul",
            reason: e.to_string(),
        })?;
        let nft = find_tool("NFT_BIN", "nft", Some("ensure-nftables.sh"))
            .map_err(|reason| ClusterError::ToolNotFound { tool: "nft", reason })?;
        let ip = find_tool("IP_BIN", "ip", None)
            .map_err(|reason| ClusterError::ToolNotFound { tool: "ip", reason })?;
        run(&ip, &["link", "set", "lo", "up"], None)?;
        run(
            &nft,
            &["-f", "-"],
            Some(&format!(
                "table inet {TABLE} {{\n chain faults {{ type filter hook output priority 0; policy accept; }}\n}}\n"
            )),
        )?;
        fs::create_dir_all(&options.dir).map_err(io_err(format!("creating {}", options.dir.display())))?;
        // The agents run as other users, who may not be able to reach the binary where it is
        // (`~/.cache` of root is private): a link (or copy) of it in the lab's directory.
        let reachable = options.dir.join("consul");
        if fs::hard_link(&consul, &reachable).is_err() {
            fs::copy(&consul, &reachable).map_err(io_err(format!("copying {}", consul.display())))?;
        }
        let consul = reachable;
        let http = crate::transport::blocking_client_builder()
            .timeout(PROBE_TIMEOUT)
            .build()
            .map_err(ClusterError::HttpClient)?;
        let mut cluster = Cluster {
            consul,
            nft,
            agents: Vec::new(),
            dir: options.dir.clone(),
            http,
        };
        let servers: Vec<Ipv4Addr> = (1..=options.servers)
            .map(|i| Ipv4Addr::new(127, 0, 0, 10 + i as u8))
            .collect();
        let join: Vec<String> = servers.iter().map(ToString::to_string).collect();
        for (i, ip) in servers.iter().enumerate() {
            cluster.add(Role::Server, format!("s{}", i + 1), *ip, &join, options.servers)?;
        }
        for i in 1..=options.clients {
            cluster.add(
                Role::Client,
                format!("c{i}"),
                Ipv4Addr::new(127, 0, 0, 20 + i as u8),
                &join,
                0,
            )?;
        }
        for i in 0..cluster.agents.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(READY_DEADLINE)?;
        Ok(cluster)
    }

    fn add(
        &mut self,
        role: Role,
        name: String,
        ip: Ipv4Addr,
        join: &[String],
        expect: usize,
    ) -> Result<(), ClusterError> {
        let uid = UID_BASE + self.agents.len() as u32;
        let data = self.dir.join(&name);
        fs::create_dir_all(&data).map_err(io_err(format!("creating {}", data.display())))?;
        std::os::unix::fs::chown(&data, Some(uid), Some(uid))
            .map_err(io_err(format!("chown {}", data.display())))?;
        let server = role == Role::Server;
        // raft_multiplier 1: the production setting HashiCorp recommends (elections in about a
        // second), not the 5 of a default agent.
        let config = serde_json::json!({
            "datacenter": "lab",
            "node_name": name,
            "data_dir": data,
            "bind_addr": ip.to_string(),
            "client_addr": ip.to_string(),
            "retry_join": join,
            "retry_interval": "1s",
            "server": server,
            "bootstrap_expect": if server { Some(expect) } else { None },
            "ports": { "http": HTTP_PORT, "dns": -1, "grpc": -1 },
            "performance": { "raft_multiplier": 1 },
            "disable_update_check": true,
            "leave_on_terminate": false,
            "skip_leave_on_interrupt": true,
            "log_level": "info",
        });
        let path = self.dir.join(format!("{name}.json"));
        fs::write(&path, config.to_string()).map_err(io_err(format!("writing {}", path.display())))?;
        let log = self.dir.join(format!("{name}.log"));
        self.agents.push(Agent {
            name,
            role,
            ip,
            uid,
            config: path,
            log,
            child: None,
            stopped: false,
        });
        Ok(())
    }

    fn agent(&self, i: usize) -> Result<&Agent, ClusterError> {
        self.agents
            .get(i)
            .ok_or_else(|| ClusterError::BadAgent(format!("no agent {i} (there are {})", self.agents.len())))
    }

    fn agent_mut(&mut self, i: usize) -> Result<&mut Agent, ClusterError> {
        let count = self.agents.len();
        self.agents
            .get_mut(i)
            .ok_or_else(|| ClusterError::BadAgent(format!("no agent {i} (there are {count})")))
    }

    fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        let consul = self.consul.clone();
        let agent = self.agent_mut(i)?;
        if agent.child.is_some() {
            return Err(ClusterError::BadAgent(format!(
                "{} is already running",
                agent.name
            )));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&agent.log)
            .map_err(io_err(format!("opening {}", agent.log.display())))?;
        let err = log.try_clone().map_err(io_err("duplicating the log file"))?;
        let child = Command::new(&consul)
            .arg("agent")
            .arg(format!("-config-file={}", agent.config.display()))
            .uid(agent.uid)
            .gid(agent.uid)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("starting {} ({})", agent.name, consul.display())))?;
        agent.child = Some(child);
        agent.stopped = false;
        Ok(())
    }

    /// Every agent.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The indexes of the servers.
    pub fn servers(&self) -> Vec<usize> {
        self.indexes(Role::Server)
    }

    /// The indexes of the client agents.
    pub fn clients(&self) -> Vec<usize> {
        self.indexes(Role::Client)
    }

    fn indexes(&self, role: Role) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].role == role)
            .collect()
    }

    /// What agent `i` answers to `/v1/status/leader` (the leader's `ip:8300`, or empty), `None`
    /// when it does not answer within a second.
    pub fn leader_seen_by(&self, i: usize) -> Option<String> {
        let text = self.get(i, "/v1/status/leader")?;
        Some(text.trim().trim_matches('"').to_owned())
    }

    /// What agent `i` answers to a GET of `path` (`/v1/...`) with a 2xx, `None` when it does not
    /// answer so within a second (or answers 404).
    pub fn get(&self, i: usize, path: &str) -> Option<String> {
        let agent = self.agents.get(i)?;
        let url = format!("http://{}{path}", agent.http_addr());
        self.http
            .get(url)
            .send()
            .ok()?
            .error_for_status()
            .ok()?
            .text()
            .ok()
    }

    /// The server the running, unstopped servers agree leads, by index; `None` when they don't
    /// agree or none is elected.
    pub fn leader(&self) -> Option<usize> {
        let mut seen: Option<String> = None;
        for i in self.servers() {
            let agent = &self.agents[i];
            if !agent.is_running() || agent.stopped {
                continue;
            }
            let answer = self.leader_seen_by(i)?;
            if seen.as_ref().is_some_and(|s| *s != answer) {
                return None;
            }
            seen = Some(answer);
        }
        let addr = seen.filter(|s| !s.is_empty())?;
        let ip = addr.split(':').next()?.parse::<Ipv4Addr>().ok()?;
        self.agents
            .iter()
            .position(|a| a.ip == ip && a.role == Role::Server)
    }

    /// Waits until the servers agree on a leader and every running client agent sees one (so it
    /// has joined and reaches a server), up to `deadline`.
    pub fn wait_ready(&self, deadline: Duration) -> Result<usize, ClusterError> {
        let started = Instant::now();
        loop {
            let problem = match self.leader() {
                None => "the servers agree on no leader".to_owned(),
                Some(leader) => {
                    let lost: Vec<&str> = self
                        .clients()
                        .into_iter()
                        .filter(|&i| self.agents[i].is_running() && !self.agents[i].stopped)
                        .filter(|&i| self.leader_seen_by(i).is_none_or(|l| l.is_empty()))
                        .map(|i| self.agents[i].name.as_str())
                        .collect();
                    if lost.is_empty() {
                        return Ok(leader);
                    }
                    format!("client agents without a leader: {}", lost.join(", "))
                }
            };
            if started.elapsed() > deadline {
                // The directory goes with the cluster: the logs' ends go into the error.
                let logs: String = (0..self.agents.len())
                    .map(|i| format!("\n-- {}:\n{}", self.agents[i].name, self.log_tail(i, 5)))
                    .collect();
                return Err(ClusterError::NotReady {
                    waited: deadline,
                    problem: format!("{problem}{logs}"),
                });
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn nft(&self, args: &[&str]) -> Result<(), ClusterError> {
        run(&self.nft, args, None)
    }

    /// Agents `from` can no longer send anything to agents `to` (one-way: `to` still reaches
    /// `from`, though no TCP connection survives either way).
    pub fn block(&self, from: &[usize], to: &[usize]) -> Result<(), ClusterError> {
        for &a in from {
            for &b in to {
                if a == b {
                    continue;
                }
                let (uid, ip) = (self.agent(a)?.uid.to_string(), self.agent(b)?.ip.to_string());
                self.nft(&[
                    "add", "rule", "inet", TABLE, "faults", "meta", "skuid", &uid, "ip", "daddr", &ip, "drop",
                ])?;
            }
        }
        Ok(())
    }

    /// `a` and `b` cannot reach each other (a symmetric partition).
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<(), ClusterError> {
        self.block(a, b)?;
        self.block(b, a)
    }

    /// Agent `i` cut off from every other agent.
    pub fn isolate(&self, i: usize) -> Result<(), ClusterError> {
        let others: Vec<usize> = (0..self.agents.len()).filter(|&j| j != i).collect();
        self.partition(&[i], &others)
    }

    /// Removes every network fault.
    pub fn heal(&self) -> Result<(), ClusterError> {
        self.nft(&["flush", "chain", "inet", TABLE, "faults"])
    }

    fn signal(&self, i: usize, signal: &str) -> Result<(), ClusterError> {
        let agent = self.agent(i)?;
        let Some(child) = &agent.child else {
            return Err(ClusterError::BadAgent(format!("{} is not running", agent.name)));
        };
        run(Path::new("kill"), &[signal, &child.id().to_string()], None)
    }

    /// `SIGSTOP`: the agent freezes, its connections stay open and silent.
    pub fn pause(&mut self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "-STOP")?;
        self.agent_mut(i)?.stopped = true;
        Ok(())
    }

    /// `SIGCONT` after [`pause`](Self::pause).
    pub fn resume(&mut self, i: usize) -> Result<(), ClusterError> {
        self.signal(i, "-CONT")?;
        self.agent_mut(i)?.stopped = false;
        Ok(())
    }

    /// `SIGKILL`, and reaps it; [`restart`](Self::restart) brings it back with its data.
    pub fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        let agent = self.agent_mut(i)?;
        if let Some(mut child) = agent.child.take() {
            let _ = child.kill();
            child.wait().map_err(io_err(format!("reaping {}", agent.name)))?;
        }
        agent.stopped = false;
        Ok(())
    }

    /// Starts a killed (or left) agent again, with the data it had.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.spawn(i)
    }

    /// A graceful leave (`consul leave`): the agent tells the cluster it goes and exits; a
    /// leader that leaves forces an election among the others. [`restart`](Self::restart) brings
    /// it back.
    pub fn leave(&mut self, i: usize) -> Result<(), ClusterError> {
        let addr = format!("-http-addr={}", self.agent(i)?.http_addr());
        let consul = self.consul.clone();
        run(&consul, &["leave", &addr], None)?;
        let agent = self.agent_mut(i)?;
        if let Some(mut child) = agent.child.take() {
            // `consul leave` returns once the agent has left; the process exits right after.
            let deadline = Instant::now() + Duration::from_secs(10);
            while child
                .try_wait()
                .map_err(io_err("waiting for a left agent"))?
                .is_none()
            {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The end of agent `i`'s log, for error messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let Some(agent) = self.agents.get(i) else {
            return String::new();
        };
        let text = fs::read_to_string(&agent.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            if let Some(mut child) = agent.child.take() {
                if agent.stopped {
                    let _ = Command::new("kill")
                        .args(["-CONT", &child.id().to_string()])
                        .status();
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = run(&self.nft, &["delete", "table", "inet", TABLE], None);
        let _ = fs::remove_dir_all(&self.dir);
    }
}
