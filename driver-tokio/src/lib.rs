//! Consul locks and leader election on tokio: [`consul-lock-core`](consul_lock_core)'s sans-IO
//! [`LockMachine`] driven by a task, with reqwest for HTTP.
//!
//! ```no_run
//! use consul_lock_tokio::{Client, Error};
//!
//! # async fn work() {}
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ...
//!     let lock = client.lock_key("service/leader")?;
//!     let mut guard = lock.acquire().await?;
//!     println!("leading with fencing token {}", guard.token().lock_index);
//!     tokio::select! {
//!         () = work() => guard.release().await?,
//!         lost = guard.lost() => println!("lost leadership: {lost:?}"),
//!     }
//!     Ok(())
//! }
//! ```
//!
//! - Dropping the future of [`Lock::acquire`] cancels the attempt at once; its session is
//!   destroyed in the background.
//! - Dropping a [`LockGuard`] releases the lock in the background (no IO happens in `Drop`,
//!   and no runtime is needed there).
//! - A lock is usable again after it was lost or released.

mod error;
mod task;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::LockMachine;
pub use consul_lock_core::machine::{FencingToken, LockError, LockOptions, LossReason};
pub use error::Error;
use task::{Command, Ended, Generation};
use tokio::sync::{mpsc, oneshot, watch};

/// A connection to one Consul agent: one HTTP client (connection pool) shared by every lock.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
}

impl Client {
    /// A client configured from Consul's `CONSUL_*` environment variables (reading
    /// `CONSUL_HTTP_TOKEN_FILE` if set).
    pub fn from_env() -> Result<Client, Error> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        let config = ClientConfig::from_env(&vars, |path: &std::path::Path| std::fs::read_to_string(path))?;
        Client::new(config)
    }

    /// A client for `config`.
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        Ok(Client {
            http: transport::build_client(&config)?,
            config: Arc::new(config),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A lock with Go's defaults on `key`.
    pub fn lock_key(&self, key: &str) -> Result<Lock, Error> {
        self.lock(LockOptions::new(key)?)
    }

    /// A lock with `options`. Must be called inside a tokio runtime: the lock's task starts here.
    pub fn lock(&self, options: LockOptions) -> Result<Lock, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let machine = LockMachine::new((*self.config).clone(), options)?;
        let (commands, rx) = mpsc::unbounded_channel();
        runtime.spawn(task::run(machine, self.http.clone(), (*self.config).clone(), rx));
        Ok(Lock {
            commands,
            generation: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// A lock on one key. Acquire it as often as you like, one hold at a time.
#[derive(Debug)]
pub struct Lock {
    commands: mpsc::UnboundedSender<Command>,
    generation: Arc<AtomicU64>,
}

impl Lock {
    /// Waits for the lock. Cancel by dropping the future: the attempt stops at once.
    ///
    /// Errors: [`Error::GaveUp`] with `lock_try_once` when the wait ended without the lock (never
    /// a guard); [`Error::Lock`] for a key used otherwise (`Conflict`), a session Consul refused,
    /// a permission error, or a lock already held by this handle.
    pub async fn acquire(&self) -> Result<LockGuard, Error> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Acquire { generation, reply })
            .map_err(|_| Error::DriverStopped)?;
        let cancel = CancelOnDrop {
            commands: Some(self.commands.clone()),
            generation,
        };
        let granted = answer.await.map_err(|_| Error::DriverStopped)?;
        cancel.disarm();
        let granted = granted?;
        Ok(LockGuard {
            token: granted.token,
            watch: LossWatch { state: granted.state },
            commands: self.commands.clone(),
            generation,
            released: false,
        })
    }

    /// Deletes the lock key if nobody holds it (Go's `Destroy`): [`LockError::InUse`] if someone
    /// does, [`LockError::Conflict`] if the key is not a lock.
    pub async fn destroy(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Destroy { reply })
            .map_err(|_| Error::DriverStopped)?;
        answer.await.map_err(|_| Error::DriverStopped)?
    }
}

/// Sends the cancel when an acquire future is dropped before it finished.
struct CancelOnDrop {
    commands: Option<mpsc::UnboundedSender<Command>>,
    generation: Generation,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.commands = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::CancelAcquire {
                generation: self.generation,
            });
        }
    }
}

/// Watches a hold for its loss; cheap to clone, and usable after the guard moved elsewhere (to
/// hand to a worker that must stop when leadership ends).
#[derive(Clone, Debug)]
pub struct LossWatch {
    state: watch::Receiver<task::HoldState>,
}

impl LossWatch {
    /// Whether the lock is still held, as far as the machine knows right now.
    pub fn is_held(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// Resolves when the lock is lost, with the reason. Resolves with
    /// [`Error::DriverStopped`] if the runtime shut the lock's task down, and never resolves
    /// after a release (there is nothing to lose).
    pub async fn lost(&mut self) -> Result<LossReason, Error> {
        loop {
            // Cloned out, so that no borrow of the channel is held across an await.
            let state = self.state.borrow_and_update().clone();
            match state {
                Some(Ended::Lost(reason)) => return Ok(reason),
                Some(Ended::Released) => std::future::pending::<()>().await,
                None => self.state.changed().await.map_err(|_| Error::DriverStopped)?,
            }
        }
    }
}

/// A held lock. Dropping it releases the lock in the background.
#[derive(Debug)]
pub struct LockGuard {
    token: FencingToken,
    watch: LossWatch,
    commands: mpsc::UnboundedSender<Command>,
    generation: Generation,
    released: bool,
}

impl LockGuard {
    /// The fencing token: key, session and `LockIndex`, which grows with each new holder. Pass
    /// it along with writes made on the lock's behalf so stale holders can be refused.
    pub fn token(&self) -> &FencingToken {
        &self.token
    }

    /// Whether the lock is still held, as far as the machine knows right now.
    pub fn is_held(&self) -> bool {
        self.watch.is_held()
    }

    /// Resolves when the lock is lost, with the reason (see [`LossWatch::lost`]).
    pub async fn lost(&mut self) -> Result<LossReason, Error> {
        self.watch.lost().await
    }

    /// A watcher of this hold's loss, to hand to other tasks.
    pub fn watch(&self) -> LossWatch {
        self.watch.clone()
    }

    /// Releases the lock (writing the lock's value) and destroys its session, waiting for both.
    /// Releasing a lock that was lost meanwhile succeeds: there is nothing left to release.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Release {
                generation: self.generation,
                reply: Some(reply),
            })
            .map_err(|_| Error::DriverStopped)?;
        answer.await.map_err(|_| Error::DriverStopped)?
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            // A channel send: no IO here, and no runtime needed.
            let _ = self.commands.send(Command::Release {
                generation: self.generation,
                reply: None,
            });
        }
    }
}
