//! Consul locks, leader election and semaphores on tokio: [`consul-lock-core`](consul_lock_core)'s
//! sans-IO [`LockMachine`] and [`SemaphoreMachine`] driven by a task, with reqwest for HTTP.
//!
//! ```no_run
//! use consul_lock_tokio::{Client, Error};
//! use std::time::Duration;
//!
//! # async fn work() {}
//! #[tokio::main]
//! async fn main() -> Result<(), Error> {
//!     let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ...
//!     let lock = client.lock_key("service/leader")?;
//!     let mut guard = lock.acquire().await?;
//!     println!("leading with fencing token {}", guard.token().sequence());
//!     tokio::select! {
//!         () = work() => guard.release().await?,
//!         lost = guard.lost() => println!("lost leadership: {lost:?}"),
//!     }
//!     // Before main returns: end every lock of the client, and wait for their cleanup.
//!     client.shutdown(Duration::from_secs(5)).await?;
//!     Ok(())
//! }
//! ```
//!
//! A semaphore (Go's `api.Semaphore`, `consul lock -n N`) lets up to `limit` holders in at once;
//! a [`Semaphore`] has the lock's methods, and its guard is the lock's:
//!
//! ```no_run
//! use consul_lock_tokio::{Client, Error};
//!
//! # async fn work() {}
//! # async fn run() -> Result<(), Error> {
//! let client = Client::from_env()?;
//! let workers = client.semaphore_prefix("service/workers", 3)?; // at most 3 at once
//! let mut slot = workers.acquire().await?;
//! tokio::select! {
//!     () = work() => slot.release().await?,
//!     lost = slot.lost() => println!("lost the slot: {lost:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - Dropping the future of [`Lock::acquire`] cancels the attempt at once; its session is
//!   destroyed in the background.
//! - Dropping a [`LockGuard`] releases the lock (or the slot) in the background (no IO happens in
//!   `Drop`, and no runtime is needed there).
//! - A lock or a semaphore is usable again after it was lost or released.
//! - Before the program ends, call [`Client::shutdown`] (or [`Lock::close`] on each lock): it
//!   ends every lock and semaphore of the client (cancels, releases, destroys the sessions) and
//!   waits, within a timeout, for that to reach Consul. Background work still under way when the
//!   runtime stops is cut short, and Consul then keeps the key until the session's TTL runs out.

mod budget;
mod caught;
mod error;
mod keyset;
mod observe;
mod seed;
mod task;
mod transport;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use budget::{BudgetError, ConnectionBudget};
pub use consul_lock_core::api::ClientConfig;
use consul_lock_core::api::Endpoint;
pub use consul_lock_core::machine::{
    FencingToken, Leader, LockError, LockOptions, LossReason, Misuse, Observation, ObserveEvent,
    ObserveOptions, Retry, SemaphoreOptions, Waiting,
};
use consul_lock_core::machine::{HoldMachine, LockMachine, SemaphoreMachine};
pub use consul_lock_core::machine::{KeySetError, KeySetOptions, Refusal};
pub use error::{CallError, Error, ShutdownError, TlsFileError};
pub use keyset::{Acquired, KeyLoss, KeySet};
pub use observe::{Election, Leadership, Observer};
pub use task::HoldEnd;
use task::{Command, Generation};
use tokio::sync::{mpsc, oneshot, watch};

/// A connection to one Consul agent: one HTTP client (connection pool) shared by every lock and
/// semaphore, within one [`ConnectionBudget`] (by default 64 connections, 16 of them kept for
/// renewals and other prompt requests; see [`Client::with_budget`]).
///
/// Clones share the connection pool, the budget and the set of locks that
/// [`shutdown`](Client::shutdown) ends.
#[derive(Clone, Debug)]
pub struct Client {
    transport: Arc<transport::Transport>,
    config: Arc<ClientConfig>,
    tasks: Arc<Mutex<Vec<Registered>>>,
}

/// A lock or semaphore task this client started, as [`Client::shutdown`] finds it: a weak
/// sender, so that the registry does not keep the task's channel open (dropping the `Lock` must
/// still end its task).
#[derive(Debug)]
struct Registered {
    name: String,
    commands: Closer,
    task: tokio::task::JoinHandle<()>,
}

/// How [`Client::shutdown`] asks a task to close.
#[derive(Debug)]
enum Closer {
    Hold(mpsc::WeakUnboundedSender<Command>),
    KeySet(mpsc::WeakUnboundedSender<keyset::Command>),
}

impl Closer {
    /// Asks the task to close, if its handles are still alive (a task whose handles are all
    /// gone ends by itself).
    fn close(&self) {
        let (reply, _) = oneshot::channel();
        match self {
            Closer::Hold(commands) => {
                if let Some(commands) = commands.upgrade() {
                    let _ = commands.send(Command::Close { reply });
                }
            }
            Closer::KeySet(commands) => {
                if let Some(commands) = commands.upgrade() {
                    let _ = commands.send(keyset::Command::Close { reply });
                }
            }
        }
    }
}

impl Client {
    /// A client configured from Consul's `CONSUL_*` environment variables (reading
    /// `CONSUL_HTTP_TOKEN_FILE` if set).
    pub fn from_env() -> Result<Client, Error> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        let config = ClientConfig::from_env(&vars, |path: &std::path::Path| std::fs::read_to_string(path))?;
        Client::new(config)
    }

    /// A client for `config`, with the default [`ConnectionBudget`].
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        Client::with_budget(config, ConnectionBudget::default())
    }

    /// How many requests the client has sent to the agent so far (every lock, semaphore, key
    /// set and [`call`](Client::call) of it and its clones): what a process's locks cost the
    /// agent, e.g. per minute while idle.
    pub fn requests_sent(&self) -> u64 {
        self.transport.sent()
    }

    /// A client for `config` whose requests stay within `budget`: at most
    /// `budget.connections()` in flight (so HTTP/1.1 connections to the agent), of which
    /// blocking reads may take at most `budget.blocking_share()`, so that session renewals,
    /// acquires and releases always find room. With more locks held than the blocking share,
    /// their monitor reads take turns: each lock still learns of a change to its key, later
    /// (see ARCHITECTURE.md, Drivers).
    ///
    /// ```no_run
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use consul_lock_tokio::{Client, ClientConfig, ConnectionBudget};
    ///
    /// // Four processes share this host's 200 connections to the agent: 40 each, 8 reserved.
    /// let budget = ConnectionBudget::new(40, 8)?;
    /// let client = Client::with_budget(ClientConfig::http("127.0.0.1:8500")?, budget)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_budget(config: ClientConfig, budget: ConnectionBudget) -> Result<Client, Error> {
        config.check()?;
        Ok(Client {
            transport: Arc::new(transport::Transport::new(&config, budget)?),
            config: Arc::new(config),
            tasks: Arc::default(),
        })
    }

    /// The connection budget in use.
    pub fn budget(&self) -> ConnectionBudget {
        self.transport.budget()
    }

    /// How many of this client's requests are in flight now, each holding a place in the budget
    /// (at most [`ConnectionBudget::connections`]); requests waiting for room are not counted.
    /// Zero once every lock has ended and its requests are answered or dropped.
    pub fn requests_in_flight(&self) -> usize {
        self.transport.in_flight()
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Sends one typed Consul request (any of core's [`Endpoint`]s) over this client's
    /// connection pool and decodes the reply, giving up after `timeout`: for what a lock does not
    /// do itself, such as showing who holds a key.
    ///
    /// ```no_run
    /// # async fn show() -> Result<(), Box<dyn std::error::Error>> {
    /// use consul_lock_core::api::{Key, KvGet};
    /// use std::time::Duration;
    ///
    /// let client = consul_lock_tokio::Client::from_env()?;
    /// let read = client.call(&KvGet::new(Key::new("service/leader/.lock")?), Duration::from_secs(5)).await?;
    /// println!("held by {:?}", read.value.and_then(|pair| pair.session));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn call<E: Endpoint>(&self, endpoint: &E, timeout: Duration) -> Result<E::Output, CallError> {
        let request = endpoint.encode(&self.config);
        let deadline = std::time::Instant::now() + timeout;
        let reply =
            transport::exchange(&self.transport, &self.config, request, endpoint.class(), deadline).await;
        let response = reply.map_err(CallError::Transport)?;
        E::decode(&response).map_err(CallError::Api)
    }

    /// A lock with Go's defaults on `key`.
    pub fn lock_key(&self, key: &str) -> Result<Lock, Error> {
        self.lock(LockOptions::new(key)?)
    }

    /// A lock with `options`. Must be called inside a tokio runtime: the lock's task starts here.
    ///
    /// `options.seed` is replaced by a seed drawn from entropy, different for every lock: a
    /// driver's timing is real and can't be replayed anyway, and processes sharing a seed would
    /// retry in lockstep after a shared failure.
    pub fn lock(&self, options: LockOptions) -> Result<Lock, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let name = options.key.as_str().to_owned();
        let machine = self.lock_machine(options)?;
        Ok(self.spawn(&runtime, machine, name))
    }

    /// The machine for a lock with `options`, its jitter seeded from entropy (see [`seed`]).
    pub(crate) fn lock_machine(&self, mut options: LockOptions) -> Result<LockMachine, Error> {
        options.hold.seed = seed::fresh();
        Ok(LockMachine::new((*self.config).clone(), options)?)
    }

    /// Follows who leads on the lock key `key`, with the default [`ObserveOptions`]: every
    /// change of leader or of its value, in order (see [`Observer`]). Works on any lock key:
    /// ours, Go's `api.Lock`'s, `consul lock <prefix>`'s (`<prefix>/.lock`). Must be called inside
    /// a tokio runtime: the observer's task starts here.
    pub fn observe(&self, key: &str) -> Result<Observer, Error> {
        self.observe_with(ObserveOptions::new(key)?)
    }

    /// [`observe`](Client::observe) with `options` (its `seed` is replaced by one from entropy).
    pub fn observe_with(&self, options: ObserveOptions) -> Result<Observer, Error> {
        Observer::start(self, options)
    }

    /// Who leads on the lock key `key` now: the leader (session, node, session name, value,
    /// fencing sequence), or `None` when nobody does. One consistent read of the key, and one
    /// lookup of the leader's session. Errors: [`Error::Lock`] with the refusal (ACLs), or
    /// [`LockError::Unavailable`] when reads kept failing for the default `blind_after` (10 s).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), consul_lock_tokio::Error> {
    /// let client = consul_lock_tokio::Client::from_env()?;
    /// match client.leader("service/leader").await? {
    ///     Some(l) => println!("{} leads on {:?}", String::from_utf8_lossy(&l.value), l.node),
    ///     None => println!("nobody leads"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn leader(&self, key: &str) -> Result<Option<Leader>, Error> {
        self.observe(key)?.first().await
    }

    /// Leader election on `key`, with a lock with Go's defaults (see [`Election`]).
    pub fn election(&self, key: &str) -> Result<Election, Error> {
        self.election_with(LockOptions::new(key)?)
    }

    /// Leader election with the lock `options` (its `value` is each campaign's).
    pub fn election_with(&self, options: LockOptions) -> Result<Election, Error> {
        options.validate()?;
        Ok(Election::new(self.clone(), options))
    }

    /// A semaphore of `limit` slots under `prefix`, with Go's defaults (Go's `SemaphorePrefix`).
    pub fn semaphore_prefix(&self, prefix: &str, limit: u32) -> Result<Semaphore, Error> {
        self.semaphore(SemaphoreOptions::new(prefix, limit)?)
    }

    /// A semaphore with `options`: each [`acquire`](Lock::acquire) takes one of its slots. Must
    /// be called inside a tokio runtime: the semaphore's task starts here. As with
    /// [`lock`](Client::lock), `options.seed` is replaced by a fresh seed from entropy.
    ///
    /// The keys and the algorithm are Go's `api.Semaphore`'s (`<prefix>/<session>` and
    /// `<prefix>/.lock`), so Rust and Go contenders (`consul lock -n N <prefix>`) share one
    /// semaphore, provided they agree on the limit.
    pub fn semaphore(&self, options: SemaphoreOptions) -> Result<Semaphore, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let name = options.prefix.as_str().to_owned();
        let machine = self.semaphore_machine(options)?;
        Ok(Semaphore {
            slots: self.spawn(&runtime, machine, name),
        })
    }

    /// The machine for a semaphore with `options`, its jitter seeded from entropy (see [`seed`]).
    pub(crate) fn semaphore_machine(&self, mut options: SemaphoreOptions) -> Result<SemaphoreMachine, Error> {
        options.hold.seed = seed::fresh();
        Ok(SemaphoreMachine::new((*self.config).clone(), options)?)
    }

    /// Ends every lock and semaphore this client (or a clone of it) made that is still at work,
    /// and waits for their cleanup, for at most `timeout`: call it before the program ends.
    ///
    /// Each one is ended as [`Lock::close`] ends it: an attempt under way is cancelled, a hold is
    /// released, and the session the lock made is destroyed; locks whose handles were dropped
    /// already (whose cleanup goes on in the background) are waited for too. Guards still alive
    /// lose their hold ([`LossWatch::ended`] answers [`HoldEnd::Released`]); dropping them
    /// afterwards is harmless, and [`LockGuard::release`] then answers
    /// [`Error::DriverStopped`], as does any use of the handles.
    ///
    /// Without it, a guard dropped just before `main` returns, or a runtime shut down with locks
    /// alive, leaves the key held and the session alive until Consul expires it (the session's
    /// TTL, 15 s by default): the background release never goes out.
    ///
    /// [`ShutdownError::Unfinished`] names the locks whose cleanup did not end within `timeout`
    /// (an unreachable agent: the release is retried until the session must have expired); they
    /// go on in the background, and a later `shutdown` waits for them again. Locks made after
    /// this call are not affected.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// let client = consul_lock_tokio::Client::from_env()?;
    /// let lock = client.lock_key("service/leader")?;
    /// let _guard = lock.acquire().await?;
    /// // ... lead ...
    /// client.shutdown(Duration::from_secs(5)).await?; // the key is free, the session gone
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), ShutdownError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for registered in &tasks {
            registered.commands.close();
        }
        let mut unfinished = Vec::new();
        for mut registered in tasks {
            // A task that panicked or was aborted is over too: only a timeout leaves one behind.
            if tokio::time::timeout_at(deadline, &mut registered.task)
                .await
                .is_err()
            {
                unfinished.push(registered);
            }
        }
        if unfinished.is_empty() {
            return Ok(());
        }
        let names = unfinished.iter().map(|r| r.name.clone()).collect();
        tracing::warn!(unfinished = ?names, "shutdown: cleanup not finished in time");
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(unfinished);
        Err(ShutdownError::Unfinished { unfinished: names })
    }

    /// Registers a task for [`shutdown`](Self::shutdown).
    fn register(&self, name: String, commands: Closer, task: tokio::task::JoinHandle<()>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|registered| !registered.task.is_finished());
        tasks.push(Registered { name, commands, task });
    }

    /// Many lock keys on one session, with the default [`KeySetOptions`] (see [`KeySet`]). Must
    /// be called inside a tokio runtime: the set's task starts here.
    pub fn key_set(&self) -> Result<KeySet, Error> {
        self.key_set_with(KeySetOptions::new())
    }

    /// [`key_set`](Client::key_set) with `options` (its `seed` is replaced by one from
    /// entropy).
    pub fn key_set_with(&self, mut options: KeySetOptions) -> Result<KeySet, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        options.hold.seed = seed::fresh();
        let machine = consul_lock_core::machine::KeySetMachine::new((*self.config).clone(), options)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (losses, loss_rx) = mpsc::unbounded_channel();
        let task = runtime.spawn(keyset::run(
            machine,
            self.transport.clone(),
            (*self.config).clone(),
            rx,
            losses,
        ));
        self.register("key set".to_owned(), Closer::KeySet(commands.downgrade()), task);
        Ok(KeySet::new(commands, loss_rx))
    }

    /// Starts the task that owns `machine`, registers it for [`shutdown`](Self::shutdown), and
    /// hands out its handle.
    fn spawn<M: HoldMachine>(&self, runtime: &tokio::runtime::Handle, machine: M, name: String) -> Lock {
        let (commands, rx) = mpsc::unbounded_channel();
        let (retries, retry_watch) = watch::channel(None);
        let task = runtime.spawn(task::run(
            machine,
            self.transport.clone(),
            (*self.config).clone(),
            rx,
            retries,
        ));
        self.register(name, Closer::Hold(commands.downgrade()), task);
        Lock {
            commands,
            generation: Arc::new(AtomicU64::new(0)),
            retries: RetryWatch { state: retry_watch },
        }
    }
}

/// A lock on one key ([`Client::lock`]), or a semaphore ([`Client::semaphore`]): acquire it as
/// often as you like, one hold at a time per handle. A semaphore handle holds at most one slot;
/// take several slots with several handles.
#[derive(Debug)]
pub struct Lock {
    commands: mpsc::UnboundedSender<Command>,
    generation: Arc<AtomicU64>,
    retries: RetryWatch,
}

/// A lock or a semaphore, for code that takes either (as `consul lock` does: `-n 1` is a lock,
/// more is a semaphore): the methods the two share.
#[derive(Debug)]
pub enum Hold {
    /// A lock ([`Client::lock`]).
    Lock(Lock),
    /// A semaphore ([`Client::semaphore`]).
    Semaphore(Semaphore),
}

impl Hold {
    /// See [`Lock::retries`].
    pub fn retries(&self) -> RetryWatch {
        match self {
            Hold::Lock(lock) => lock.retries(),
            Hold::Semaphore(semaphore) => semaphore.retries(),
        }
    }

    /// See [`Lock::acquire`] and [`Semaphore::acquire`].
    pub async fn acquire(&self) -> Result<LockGuard, Error> {
        match self {
            Hold::Lock(lock) => lock.acquire().await,
            Hold::Semaphore(semaphore) => semaphore.acquire().await,
        }
    }

    /// See [`Lock::destroy`] and [`Semaphore::destroy`].
    pub async fn destroy(&self) -> Result<(), Error> {
        match self {
            Hold::Lock(lock) => lock.destroy().await,
            Hold::Semaphore(semaphore) => semaphore.destroy().await,
        }
    }

    /// See [`Lock::close`].
    pub async fn close(&self) {
        match self {
            Hold::Lock(lock) => lock.close().await,
            Hold::Semaphore(semaphore) => semaphore.close().await,
        }
    }
}

impl From<Lock> for Hold {
    fn from(lock: Lock) -> Hold {
        Hold::Lock(lock)
    }
}

impl From<Semaphore> for Hold {
    fn from(semaphore: Semaphore) -> Hold {
        Hold::Semaphore(semaphore)
    }
}

/// Follows the failed tries of a lock's acquisitions ([`Lock::retries`]): an agent that is down,
/// hangs or answers errors is retried with backoff, and every failed try shows here, with its
/// cause, its count in a row and when the next goes out. Past the options'
/// `acquire_error_budget` the acquisition fails with [`LockError::AgentUnavailable`].
///
/// ```no_run
/// # async fn run(lock: &consul_lock_tokio::Lock) {
/// let mut retries = lock.retries();
/// tokio::spawn(async move {
///     while let Ok(retry) = retries.next().await {
///         eprintln!("lock: try {} failed ({}); trying again", retry.attempt, retry.cause);
///     }
/// });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RetryWatch {
    state: watch::Receiver<Option<Retry>>,
}

impl RetryWatch {
    /// The acquisition's latest failed try, while its last try failed (cleared when the lock is
    /// acquired).
    pub fn latest(&self) -> Option<Retry> {
        self.state.borrow().clone()
    }

    /// Waits for the next failed try. [`Error::DriverStopped`] once the lock's task has ended
    /// (the lock was dropped or closed, or its runtime shut down).
    pub async fn next(&mut self) -> Result<Retry, Error> {
        loop {
            self.state.changed().await.map_err(|_| Error::DriverStopped)?;
            if let Some(retry) = self.state.borrow_and_update().clone() {
                return Ok(retry);
            }
        }
    }
}

/// A semaphore (Go's `api.Semaphore`, made by [`Client::semaphore`]): up to its limit of holders
/// at once. Each [`acquire`](Semaphore::acquire) waits for one of its slots, and the guard holds
/// it; a handle holds at most one slot at a time (take several slots with several handles).
///
/// A slot's guard carries a [`FencingToken`] that names `<prefix>/.lock` and carries its
/// `ModifyIndex` after the grant (as both `lock_index` and `modify_index`): it orders grants (a
/// slot granted before another contender's attempt wrote carries a smaller one), but slots granted
/// close together may carry the same value; their sessions tell them apart.
#[derive(Debug)]
pub struct Semaphore {
    slots: Lock,
}

impl Semaphore {
    /// A watch of this semaphore's failed tries while acquiring a slot (see [`RetryWatch`]).
    pub fn retries(&self) -> RetryWatch {
        self.slots.retries()
    }

    /// Waits for one of the semaphore's slots. Cancel by dropping the future: the attempt stops
    /// at once.
    ///
    /// Errors: [`Error::GaveUp`] with `try_once` when the wait ended without a slot;
    /// [`Error::Lock`] for a prefix used otherwise ([`LockError::SemaphoreConflict`]), a `.lock`
    /// with another limit ([`LockError::LimitMismatch`]) or that is not a semaphore's
    /// ([`LockError::BadSemaphore`]), a session Consul refused, a permission error, or an agent
    /// that gave no usable answer for the error budget; [`Error::Misuse`] when this handle holds
    /// a slot already.
    pub async fn acquire(&self) -> Result<LockGuard, Error> {
        self.slots.acquire().await
    }

    /// Deletes `<prefix>/.lock` if no live contender remains, holding or waiting (Go's
    /// `Destroy`): [`LockError::SemaphoreInUse`] if one does, [`LockError::SemaphoreConflict`]
    /// if the `.lock` is not a semaphore's.
    pub async fn destroy(&self) -> Result<(), Error> {
        self.slots.destroy().await
    }

    /// Ends the semaphore handle and waits for its cleanup, as [`Lock::close`] does.
    pub async fn close(&self) {
        self.slots.close().await;
    }
}

impl Lock {
    /// A watch of this lock's failed tries while acquiring (see [`RetryWatch`]).
    pub fn retries(&self) -> RetryWatch {
        let mut watch = self.retries.clone();
        // Only tries that fail from now on are "next".
        watch.state.mark_unchanged();
        watch
    }

    /// Waits for the lock (for a semaphore: for a slot). Cancel by dropping the future: the
    /// attempt stops at once.
    ///
    /// Errors: [`Error::GaveUp`] with `try_once` when the wait
    /// ended without the lock (never a guard); [`Error::Lock`] for a key used otherwise
    /// (`Conflict`: a lock where a semaphore is, or the reverse), a semaphore whose `.lock` has
    /// another limit (`LimitMismatch`) or is unreadable (`BadSemaphore`), a session Consul
    /// refused, a permission error, or a lock already held by this handle (`AlreadyHeld`).
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
    /// does, [`LockError::Conflict`] if the key is not a lock, [`Misuse::AlreadyHeld`] ([`Error::Misuse`]) if this
    /// handle holds it. For a semaphore: deletes `<prefix>/.lock` if no live contender remains
    /// (holding or waiting), with the same errors.
    pub async fn destroy(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Destroy { reply })
            .map_err(|_| Error::DriverStopped)?;
        answer.await.map_err(|_| Error::DriverStopped)?
    }

    /// Ends the lock and waits for its cleanup: an attempt under way is cancelled, a hold is
    /// released, and the session the lock made is destroyed before this returns.
    ///
    /// Dropping a `Lock` (or cancelling an acquire) does the same in the background; call
    /// `close` (or [`Client::shutdown`], for every lock of the client) before a process exits,
    /// so that the background work is not cut short and no session is left for Consul to
    /// expire. If the agent can't be reached, the destroy is retried until the session must have
    /// expired on its own (up to twice its TTL): wrap the call in a timeout if the process can't
    /// wait that long. After `close`, the handle answers [`Error::DriverStopped`].
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).is_ok() {
            let _ = done.await;
        }
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

/// Watches a hold (of a lock or a semaphore slot) for its loss; cheap to clone, and usable after
/// the guard moved elsewhere (to hand to a worker that must stop when leadership ends).
#[derive(Clone, Debug)]
pub struct LossWatch {
    state: watch::Receiver<task::HoldState>,
}

impl LossWatch {
    /// Whether the lock is still held, as far as the machine knows right now.
    pub fn is_held(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// How the hold ended, if it has (without waiting).
    pub fn end(&self) -> Option<HoldEnd> {
        self.state.borrow().clone()
    }

    /// Resolves when the lock is lost, with the reason. Resolves with
    /// [`Error::DriverStopped`] if the runtime shut the lock's task down,
    /// [`Error::DriverPanicked`] if the task failed, and never resolves after a release (there
    /// is nothing to lose).
    pub async fn lost(&mut self) -> Result<LossReason, Error> {
        loop {
            // Cloned out, so that no borrow of the channel is held across an await.
            let state = self.state.borrow_and_update().clone();
            match state {
                Some(HoldEnd::Lost(reason)) => return Ok(reason),
                Some(HoldEnd::DriverFailed(why)) => return Err(Error::DriverPanicked(why)),
                Some(HoldEnd::Released) => std::future::pending::<()>().await,
                None => self.state.changed().await.map_err(|_| Error::DriverStopped)?,
            }
        }
    }

    /// Resolves when the hold ends either way: lost (with the reason) or released. Unlike
    /// [`lost`](Self::lost), it also resolves after a release, so a task waiting on it ends
    /// with the hold.
    ///
    /// ```no_run
    /// # async fn run(guard: consul_lock_tokio::LockGuard) {
    /// let mut watch = guard.watch();
    /// tokio::spawn(async move {
    ///     if let Ok(consul_lock_tokio::HoldEnd::Lost(reason)) = watch.ended().await {
    ///         eprintln!("leadership lost: {reason:?}");
    ///     }
    /// });
    /// # }
    /// ```
    pub async fn ended(&mut self) -> Result<HoldEnd, Error> {
        let state = self
            .state
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::DriverStopped)?
            .clone();
        state.ok_or(Error::DriverStopped)
    }
}

/// A held lock, or a held semaphore slot. Dropping it releases the lock (the slot) in the
/// background.
#[derive(Debug)]
pub struct LockGuard {
    token: FencingToken,
    watch: LossWatch,
    commands: mpsc::UnboundedSender<Command>,
    generation: Generation,
    released: bool,
}

impl LockGuard {
    /// The fencing token: key, session, and [`FencingToken::sequence`] (the key's
    /// `ModifyIndex` as the granting lock transaction wrote it), which strictly increases from
    /// one holder to the next. Pass `sequence()` along with writes made on the lock's behalf so
    /// stale holders can be refused. `lock_index` is Go's `LockIndex`, kept for display; it
    /// restarts when the key is deleted, so it is not the token. (For a semaphore slot, see
    /// [`Semaphore`].)
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

    /// Writes `value` to the lock key while this hold lasts, checking that it does (an
    /// election's proclaim; see [`Leadership::proclaim`]). The fencing token does not change.
    /// [`Misuse::NotALock`] for a semaphore slot.
    pub async fn proclaim(&self, value: Vec<u8>) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Proclaim {
                generation: self.generation,
                value,
                reply,
            })
            .map_err(|_| Error::DriverStopped)?;
        answer.await.map_err(|_| Error::DriverStopped)?
    }

    /// Releases the lock (writing the lock's value) and destroys its session, waiting for both.
    /// For a semaphore: takes the session out of the `.lock`'s holders, deletes the contender key
    /// and destroys the session. Releasing a hold that was lost meanwhile succeeds: there is
    /// nothing left to release.
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
