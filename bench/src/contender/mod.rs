//! The Rust contender processes: `consul-lock-bench contender tokio|blocking` reads the
//! contender protocol's commands on standard input and drives the tokio or the blocking driver,
//! as `bench/go` drives HashiCorp's Go client.

mod blocking;
mod tokio;

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{LockOptions, MIN_HOLD_WINDOW, Waiting};

use crate::protocol::{Command, Event};

pub use self::blocking::run as run_blocking;
pub use self::tokio::run as run_tokio;

/// Why a contender process could not run at all (a failed command is an `error` event instead).
#[derive(Debug, thiserror::Error)]
pub enum ContenderError {
    /// Standard input or output failed.
    #[error("contender I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// The process's standard output, shared by every contender of the process: one event per line,
/// flushed at once so that the suite sees it when it happens.
#[derive(Clone)]
struct Output(Arc<Mutex<io::Stdout>>);

impl Output {
    fn stdout() -> Output {
        Output(Arc::new(Mutex::new(io::stdout())))
    }

    fn send(&self, event: &Event) {
        let Ok(line) = serde_json::to_string(event) else {
            return;
        };
        let mut out = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A closed pipe means the suite is gone; the next read of stdin ends the process.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }

    fn error(&self, id: Option<u64>, msg: impl Into<String>) {
        self.send(&Event::Error { id, msg: msg.into() });
    }
}

/// Reads one command line; an unreadable one is reported and skipped.
fn parse(line: &str, out: &Output) -> Option<Command> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    match serde_json::from_str(line) {
        Ok(command) => Some(command),
        Err(e) => {
            out.error(None, format!("unreadable command {line:?}: {e}"));
            None
        }
    }
}

/// What a `lock` command asks for, checked: the agent's config and the lock's options.
struct LockRequest {
    id: u64,
    addr: String,
    config: ClientConfig,
    options: LockOptions,
    shared_client: bool,
    /// How often a holder reports a write to the fenced resource; `None`: never.
    write_every: Option<Duration>,
}

/// What a `lock` command asks of the lock itself.
struct Asked {
    ttl_ms: u64,
    lock_delay_ms: Option<u64>,
    queued: bool,
}

impl LockRequest {
    fn new(
        id: u64,
        addr: String,
        key: &str,
        asked: Asked,
        shared_client: bool,
    ) -> Result<LockRequest, String> {
        let Asked {
            ttl_ms,
            lock_delay_ms,
            queued,
        } = asked;
        let config = ClientConfig::http(&addr).map_err(|e| format!("bad addr {addr:?}: {e}"))?;
        let mut options = LockOptions::new(key).map_err(|e| format!("bad key {key:?}: {e}"))?;
        // Each contender its own jitter, as separate processes would have.
        options.hold.seed = id;
        if queued {
            options.waiting = Waiting::Queue;
        }
        if let Some(session) = options.hold.session_options_mut() {
            session.ttl = Duration::from_millis(ttl_ms);
            session.lock_delay = lock_delay_ms.map(Duration::from_millis);
            // Too short a lock-delay to hold by when a failed node check can end the session
            // at any moment (the lab's finding): then a session with no checks, the TTL alone.
            if session.lock_delay.is_some_and(|d| d < MIN_HOLD_WINDOW) {
                *session = session.clone().ttl_only();
            }
        }
        options.validate().map_err(|e| format!("bad lock options: {e}"))?;
        Ok(LockRequest {
            id,
            addr,
            config,
            options,
            shared_client,
            write_every: None,
        })
    }

    /// The client this contender uses: its own, or the one shared by every contender of the
    /// process that asked to share, per address (made by `new` the first time).
    fn client<C: Clone, E>(
        &self,
        shared: &mut HashMap<String, C>,
        new: impl FnOnce(ClientConfig) -> Result<C, E>,
    ) -> Result<C, E> {
        if !self.shared_client {
            return new(self.config.clone());
        }
        if let Some(client) = shared.get(&self.addr) {
            return Ok(client.clone());
        }
        let client = new(self.config.clone())?;
        shared.insert(self.addr.clone(), client.clone());
        Ok(client)
    }

    fn from_command(command: Command) -> Option<Result<LockRequest, (u64, String)>> {
        match command {
            Command::Lock {
                id,
                addr,
                key,
                ttl_ms,
                lock_delay_ms,
                shared_client,
                queued,
                write_ms,
            } => {
                let asked = Asked {
                    ttl_ms,
                    lock_delay_ms,
                    queued,
                };
                Some(
                    LockRequest::new(id, addr, &key, asked, shared_client)
                        .map(|request| LockRequest {
                            write_every: write_ms.filter(|&ms| ms > 0).map(Duration::from_millis),
                            ..request
                        })
                        .map_err(|e| (id, e)),
                )
            }
            Command::Unlock { .. } | Command::Quit | Command::AcquireSet { .. } | Command::Stats => None,
        }
    }
}
