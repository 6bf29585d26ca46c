//! A contender process seen from the suite: start it, send it commands, wait for its events.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::BenchError;
use crate::protocol::{Command, Event};

/// How long a started contender may take to say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How many lines of a contender's standard error an error message carries.
const STDERR_TAIL: usize = 12;

/// The clients under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    /// `consul-lock-tokio`.
    Tokio,
    /// `consul-lock-blocking`.
    Blocking,
    /// HashiCorp's Go client, `github.com/hashicorp/consul/api` 1.8.7.
    Go,
    /// `consul-lock-tokio` waiting in line (`Waiting::Queue`).
    Queued,
}

impl ClientKind {
    /// Every client, in table order.
    pub const ALL: [ClientKind; 4] = [
        ClientKind::Tokio,
        ClientKind::Blocking,
        ClientKind::Go,
        ClientKind::Queued,
    ];

    /// The client's name in tables, JSON and the command line.
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::Tokio => "tokio",
            ClientKind::Blocking => "blocking",
            ClientKind::Go => "go",
            ClientKind::Queued => "queued",
        }
    }

    /// The client named `name`.
    pub fn parse(name: &str) -> Option<ClientKind> {
        ClientKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// How to start each client's contender.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// This program (the Rust contenders are its `contender` subcommand).
    pub own_exe: PathBuf,
    /// The Go contender, when it could be built.
    pub go: Option<PathBuf>,
}

impl Launcher {
    fn command(&self, kind: ClientKind) -> Result<Process, BenchError> {
        let mut process = match kind {
            ClientKind::Tokio | ClientKind::Blocking => {
                let mut p = Process::new(&self.own_exe);
                p.args(["contender", kind.name()]);
                p
            }
            // The tokio contender, told to queue by each `lock` command (see `send`).
            ClientKind::Queued => {
                let mut p = Process::new(&self.own_exe);
                p.args(["contender", ClientKind::Tokio.name()]);
                p
            }
            ClientKind::Go => match &self.go {
                Some(go) => Process::new(go),
                None => return Err(BenchError::GoUnavailable("not built".to_owned())),
            },
        };
        // The contenders get no agent address from the environment: every command names one.
        process.env_remove("CONSUL_HTTP_ADDR");
        Ok(process)
    }
}

/// A running contender process.
pub struct Contenders {
    kind: ClientKind,
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Event>,
    /// Events read but not yet asked for.
    pending: VecDeque<Event>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Contenders {
    /// Starts `kind`'s contender and waits for it to be ready.
    pub fn spawn(kind: ClientKind, launcher: &Launcher) -> Result<Contenders, BenchError> {
        let mut process = launcher.command(kind)?;
        let program = format!("{process:?}");
        let mut child = process
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                client: kind.name(),
                program,
                source,
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err(BenchError::Contender {
                client: kind.name(),
                msg: "its standard streams were not piped".to_owned(),
                stderr: String::new(),
            });
        };
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line).unwrap_or_else(|e| Event::Error {
                    id: None,
                    msg: format!("unreadable event {line:?}: {e}"),
                });
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let sink = tail.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut tail = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut contenders = Contenders {
            kind,
            child,
            stdin,
            events,
            pending: VecDeque::new(),
            stderr: tail,
        };
        contenders.wait_for("ready", READY_TIMEOUT, |e| matches!(e, Event::Ready { .. }))?;
        Ok(contenders)
    }

    /// The client.
    pub fn kind(&self) -> ClientKind {
        self.kind
    }

    /// The process id, for `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a command.
    pub fn send(&mut self, command: &Command) -> Result<(), BenchError> {
        let mut command = command.clone();
        if let (ClientKind::Queued, Command::Lock { queued, .. }) = (self.kind, &mut command) {
            *queued = true;
        }
        let line =
            serde_json::to_string(&command).map_err(|e| self.failed(format!("encoding a command: {e}")))?;
        let sent = writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush());
        sent.map_err(|e| self.failed(format!("writing a command: {e}")))
    }

    /// Tells contender `id` to unlock.
    pub fn unlock(&mut self, id: u64) -> Result<(), BenchError> {
        self.send(&Command::Unlock { id })
    }

    /// Waits for the first event that `wanted` accepts, keeping the others for later calls. An
    /// `error` event, the process ending, or `timeout` passing fails the wait.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Event) -> bool,
    ) -> Result<Event, BenchError> {
        if let Some(i) = self.pending.iter().position(&wanted) {
            return Ok(self.pending.remove(i).unwrap_or(Event::Bye));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let event = self.next_event(deadline.saturating_duration_since(Instant::now()), what, timeout)?;
            if wanted(&event) {
                return Ok(event);
            }
            if let Event::Error { msg, .. } = &event {
                return Err(self.failed(msg.clone()));
            }
            self.pending.push_back(event);
        }
    }

    /// The next event not yet taken, waiting up to `timeout`; `None` if none came.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Event>, BenchError> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(Some(event));
        }
        match self.events.recv_timeout(timeout) {
            Ok(event) => Ok(Some(event)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(self.failed("the process ended".to_owned())),
        }
    }

    fn next_event(&mut self, left: Duration, what: &str, timeout: Duration) -> Result<Event, BenchError> {
        match self.events.recv_timeout(left) {
            Ok(event) => Ok(event),
            Err(RecvTimeoutError::Timeout) => Err(BenchError::Timeout {
                client: self.kind.name(),
                what: what.to_owned(),
                waited: timeout,
                stderr: self.stderr_tail(),
            }),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.failed(format!("the process ended waiting for {what}")))
            }
        }
    }

    /// Asks the process to release everything and exit, waiting up to `timeout` for it to do so,
    /// then kills it. A partitioned client may never finish its unlock.
    pub fn quit(mut self, timeout: Duration) {
        if self.send(&Command::Quit).is_ok() {
            let _ = self.wait_for("bye", timeout, |e| matches!(e, Event::Bye));
        }
    }

    fn failed(&self, msg: String) -> BenchError {
        BenchError::Contender {
            client: self.kind.name(),
            msg,
            stderr: self.stderr_tail(),
        }
    }

    fn stderr_tail(&self) -> String {
        let tail = self
            .stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.iter().map(|l| format!("\n  | {l}")).collect()
    }
}

impl Drop for Contenders {
    fn drop(&mut self) {
        // After `quit` (or a failure) nothing of the contender may outlive the suite's step.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
