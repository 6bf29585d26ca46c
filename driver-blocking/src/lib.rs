//! Consul locks, leader election and semaphores for plain threads.
//!
//! ```no_run
//! use consul_lock_blocking::{Client, Error};
//! use std::time::Duration;
//!
//! fn main() -> Result<(), Error> {
//!     let client = Client::from_env()?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, ...
//!     let lock = client.lock_key("service/leader")?;
//!     let guard = lock.acquire()?;
//!     println!("leading with fencing token {}", guard.token().sequence());
//!     while guard.wait_lost(Duration::from_secs(1))?.is_none() {
//!         // one unit of leader work per second, while still leading
//!     }
//!     // Before main returns: end every lock of the client, and wait for their cleanup.
//!     client.shutdown(Duration::from_secs(5))?;
//!     Ok(())
//! }
//! ```
//!
//! A semaphore (Go's `api.Semaphore`, `consul lock -n N`) lets up to `limit` holders in at once;
//! a [`Semaphore`] has the lock's methods, and its guard is the lock's:
//!
//! ```no_run
//! # use consul_lock_blocking::{Client, Error};
//! # fn run() -> Result<(), Error> {
//! let client = Client::from_env()?;
//! let workers = client.semaphore_prefix("service/workers", 3)?; // at most 3 at once
//! let slot = workers.acquire()?;
//! // ... work while `slot.is_held()` ...
//! slot.release()?;
//! # Ok(())
//! # }
//! ```
//!
//! Before the program ends, call [`Client::shutdown`]: it ends every lock and semaphore of the
//! client (cancels, releases, destroys the sessions) and blocks, within a timeout, until that
//! reached Consul. (Dropping the client's last handle waits too, but for 2 s at most.)
//!
//! Under the hood the lock runs on a private single-threaded tokio runtime owned by the
//! [`Client`] (as `reqwest::blocking` does), driving the same task as `consul-lock-tokio`: a
//! blocking read of the key never holds up a session renewal, because the two are separate
//! requests in flight at once, and no thread of yours is used for either.

use std::sync::{Arc, mpsc};

/// The workspace README's code (the tokio and the threads snippets, the machine in an event
/// loop), compiled by `cargo test --doc` so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
use std::time::Duration;

pub use consul_lock_core::api::ClientConfig;
pub use consul_lock_core::machine::{
    FencingToken, Leader, LockError, LockOptions, LossReason, Misuse, Observation, ObserveEvent,
    ObserveOptions, Retry, SemaphoreOptions, Waiting,
};
pub use consul_lock_tokio::{
    Acquired, BudgetError, CallError, ConnectionBudget, Error, HoldEnd, KeyLoss, KeySetError, KeySetOptions,
    Refusal, ShutdownError, TlsFileError,
};
use tokio::sync::watch;

/// The private runtime: one thread, shut down when the last handle using it is dropped.
#[derive(Debug)]
struct Runtime {
    runtime: Option<tokio::runtime::Runtime>,
    /// The client whose locks run here, for the cleanup when the runtime goes.
    client: Option<consul_lock_tokio::Client>,
}

impl Runtime {
    /// How long the last handle's drop waits for the cleanup of locks that were not shut down.
    const DROP_GRACE: Duration = Duration::from_secs(2);

    fn handle(&self) -> Result<&tokio::runtime::Runtime, Error> {
        self.runtime.as_ref().ok_or(Error::DriverStopped)
    }

    /// Blocks on `wait` for at most `timeout` (`None`: as long as it takes); `Ok(None)` when
    /// the time ran out first.
    fn block_on_within<T>(
        &self,
        timeout: Option<Duration>,
        wait: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<Option<T>, Error> {
        self.handle()?.block_on(async move {
            match timeout {
                Some(t) => match tokio::time::timeout(t, wait).await {
                    Ok(done) => done.map(Some),
                    Err(_) => Ok(None),
                },
                None => wait.await.map(Some),
            }
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        // Every handle is gone, so every lock task is finishing its cleanup (a release handed
        // over by a dropped guard, a session destroy): give them a moment to finish, without
        // blocking the dropping thread for long. Shutting the runtime down alone would not:
        // it drops its tasks at their next pause, cutting the release short.
        // (Not from inside an async runtime, where blocking is not allowed.)
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                if let Err(e) = runtime.block_on(client.shutdown(Self::DROP_GRACE)) {
                    tracing::warn!("consul-lock client dropped: {e}; left for Consul to expire");
                }
            }
        }
        runtime.shutdown_timeout(Self::DROP_GRACE);
    }
}

/// A connection to one Consul agent, with the thread that runs its locks and semaphores.
#[derive(Clone, Debug)]
pub struct Client {
    runtime: Arc<Runtime>,
    inner: consul_lock_tokio::Client,
}

impl Client {
    /// A client configured from Consul's `CONSUL_*` environment variables.
    pub fn from_env() -> Result<Client, Error> {
        Client::with(consul_lock_tokio::Client::from_env)
    }

    /// A client for `config`, with the default [`ConnectionBudget`] (64 connections, 16 of them
    /// kept for renewals and other prompt requests).
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        Client::with(|| consul_lock_tokio::Client::new(config))
    }

    /// A client for `config` whose requests stay within `budget`: see
    /// [`consul_lock_tokio::Client::with_budget`].
    ///
    /// ```no_run
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use consul_lock_blocking::{Client, ClientConfig, ConnectionBudget};
    ///
    /// let client = Client::with_budget(ClientConfig::http("127.0.0.1:8500")?, ConnectionBudget::new(40, 8)?)?;
    /// assert_eq!(client.budget().blocking_share(), 32);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_budget(config: ClientConfig, budget: ConnectionBudget) -> Result<Client, Error> {
        Client::with(|| consul_lock_tokio::Client::with_budget(config, budget))
    }

    /// The connection budget in use.
    pub fn budget(&self) -> ConnectionBudget {
        self.inner.budget()
    }

    fn with(make: impl FnOnce() -> Result<consul_lock_tokio::Client, Error>) -> Result<Client, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("consul-lock")
            .enable_time()
            .enable_io()
            .build()
            .map_err(Error::Thread)?;
        let inner = {
            let _entered = runtime.enter();
            make()?
        };
        Ok(Client {
            runtime: Arc::new(Runtime {
                runtime: Some(runtime),
                client: Some(inner.clone()),
            }),
            inner,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        self.inner.config()
    }

    /// Ends every lock and semaphore this client (or a clone of it) made that is still at work,
    /// and blocks until their cleanup is done, for at most `timeout`: call it before the program
    /// ends. See [`consul_lock_tokio::Client::shutdown`].
    ///
    /// An attempt under way is cancelled, a hold is released, and each session the locks made is
    /// destroyed; guards still alive lose their hold, and dropping them afterwards is harmless.
    /// [`ShutdownError::Unfinished`] names the locks whose cleanup did not end in time (an
    /// unreachable agent); Consul expires what they leave with the session's TTL.
    ///
    /// Dropping the last handle of a client (client, locks, guards, watches) also waits for the
    /// cleanup, but for 2 s at most, and not when dropped inside an async runtime.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// let client = consul_lock_blocking::Client::from_env()?;
    /// let lock = client.lock_key("service/leader")?;
    /// let _guard = lock.acquire()?;
    /// // ... lead ...
    /// client.shutdown(Duration::from_secs(5))?; // the key is free, the session gone
    /// # Ok(())
    /// # }
    /// ```
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ShutdownError> {
        match self.runtime.handle() {
            Ok(runtime) => runtime.block_on(self.inner.shutdown(timeout)),
            // The runtime is gone, and its tasks with it: nothing is left to end.
            Err(_) => Ok(()),
        }
    }

    /// Sends one typed Consul request (any of core's
    /// [`Endpoint`](consul_lock_core::api::Endpoint)s) and decodes the reply, giving up after
    /// `timeout`: for what a lock does not do itself, such as showing who holds a key. See
    /// [`consul_lock_tokio::Client::call`].
    ///
    /// ```no_run
    /// # fn show() -> Result<(), Box<dyn std::error::Error>> {
    /// use consul_lock_core::api::{Key, KvGet};
    /// use std::time::Duration;
    ///
    /// let client = consul_lock_blocking::Client::from_env()?;
    /// let read = client.call(&KvGet::new(Key::new("service/leader/.lock")?), Duration::from_secs(5))?;
    /// println!("held by {:?}", read.value.and_then(|pair| pair.session));
    /// # Ok(())
    /// # }
    /// ```
    pub fn call<E: consul_lock_core::api::Endpoint>(
        &self,
        endpoint: &E,
        timeout: Duration,
    ) -> Result<E::Output, CallError> {
        match self.runtime.handle() {
            Ok(runtime) => runtime.block_on(self.inner.call(endpoint, timeout)),
            Err(_) => Err(CallError::Stopped),
        }
    }

    /// Many lock keys on one session, with the default [`KeySetOptions`] (see [`KeySet`]).
    pub fn key_set(&self) -> Result<KeySet, Error> {
        self.key_set_with(KeySetOptions::new())
    }

    /// [`key_set`](Client::key_set) with `options`.
    pub fn key_set_with(&self, options: KeySetOptions) -> Result<KeySet, Error> {
        let _entered = self.runtime.handle()?.enter();
        Ok(KeySet {
            inner: self.inner.key_set_with(options)?,
            runtime: self.runtime.clone(),
        })
    }

    /// A lock with Go's defaults on `key`.
    pub fn lock_key(&self, key: &str) -> Result<Lock, Error> {
        self.lock(LockOptions::new(key)?)
    }

    /// A lock with `options`.
    pub fn lock(&self, options: LockOptions) -> Result<Lock, Error> {
        let _entered = self.runtime.handle()?.enter();
        Ok(Lock {
            inner: Arc::new(self.inner.lock(options)?.into()),
            runtime: self.runtime.clone(),
        })
    }

    /// Follows who leads on the lock key `key` (ours, Go's `api.Lock`'s, `consul lock`'s
    /// `<prefix>/.lock`): every change of leader or of its value, in order (see [`Observer`]).
    pub fn observe(&self, key: &str) -> Result<Observer, Error> {
        self.observe_with(ObserveOptions::new(key)?)
    }

    /// [`observe`](Client::observe) with `options`.
    pub fn observe_with(&self, options: ObserveOptions) -> Result<Observer, Error> {
        let _entered = self.runtime.handle()?.enter();
        Ok(Observer {
            inner: self.inner.observe_with(options)?,
            runtime: self.runtime.clone(),
        })
    }

    /// Who leads on the lock key `key` now: the leader (session, node, session name, value,
    /// fencing sequence), or `None` when nobody does (see the tokio driver's `Client::leader`).
    ///
    /// ```no_run
    /// # fn run() -> Result<(), consul_lock_blocking::Error> {
    /// let client = consul_lock_blocking::Client::from_env()?;
    /// if let Some(l) = client.leader("service/leader")? {
    ///     println!("{} leads", String::from_utf8_lossy(&l.value));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn leader(&self, key: &str) -> Result<Option<Leader>, Error> {
        let runtime = self.runtime.handle()?;
        runtime.block_on(self.inner.leader(key))
    }

    /// Leader election on `key`, with a lock with Go's defaults (see [`Election`]).
    pub fn election(&self, key: &str) -> Result<Election, Error> {
        self.election_with(LockOptions::new(key)?)
    }

    /// Leader election with the lock `options` (its `value` is each campaign's).
    pub fn election_with(&self, options: LockOptions) -> Result<Election, Error> {
        options.validate()?;
        Ok(Election {
            client: self.clone(),
            options,
        })
    }

    /// A semaphore of `limit` slots under `prefix`, with Go's defaults (Go's `SemaphorePrefix`).
    pub fn semaphore_prefix(&self, prefix: &str, limit: u32) -> Result<Semaphore, Error> {
        self.semaphore(SemaphoreOptions::new(prefix, limit)?)
    }

    /// A semaphore with `options`: each [`acquire`](Lock::acquire) takes one of its slots. Its
    /// keys are Go's `api.Semaphore`'s, so Rust and Go contenders (`consul lock -n N <prefix>`)
    /// share one semaphore, provided they agree on the limit.
    pub fn semaphore(&self, options: SemaphoreOptions) -> Result<Semaphore, Error> {
        let _entered = self.runtime.handle()?.enter();
        Ok(Semaphore {
            slots: Lock {
                inner: Arc::new(self.inner.semaphore(options)?.into()),
                runtime: self.runtime.clone(),
            },
        })
    }
}

/// Stops a blocked [`Lock::acquire`] from another thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    stop: Arc<watch::Sender<bool>>,
}

impl StopHandle {
    /// Makes every `acquire` waiting with this handle return [`Error::Cancelled`]
    /// at once (the attempt is cancelled and its session destroyed in the background).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Whether `stop` was called.
    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// A lock on one key ([`Client::lock`]) or a semaphore ([`Client::semaphore`]), for threads.
/// Acquire it as often as you like, one hold at a time per handle (a semaphore handle holds at
/// most one slot; take several slots with several handles).
#[derive(Clone, Debug)]
pub struct Lock {
    inner: Arc<consul_lock_tokio::Hold>,
    runtime: Arc<Runtime>,
}

/// A semaphore (made by [`Client::semaphore`]), for threads: up to its limit of holders at once.
/// [`acquire`](Semaphore::acquire) blocks until one of its slots is held; a handle holds at most
/// one slot at a time. See [`consul_lock_tokio::Semaphore`] for what a slot's fencing token
/// carries.
#[derive(Clone, Debug)]
pub struct Semaphore {
    slots: Lock,
}

impl Semaphore {
    /// A handle that stops acquisitions made with [`acquire_with`](Self::acquire_with).
    pub fn stop_handle() -> StopHandle {
        Lock::stop_handle()
    }

    /// Blocks until one of the semaphore's slots is held. With `try_once`, returns
    /// [`Error::GaveUp`] when the wait ends without one. The errors are those of
    /// [`consul_lock_tokio::Semaphore::acquire`].
    pub fn acquire(&self) -> Result<LockGuard, Error> {
        self.slots.acquire()
    }

    /// Blocks until a slot is held, `timeout` passes (then [`Error::GaveUp`]), or `stop` is
    /// stopped (then [`Error::Cancelled`]).
    pub fn acquire_with(
        &self,
        timeout: Option<Duration>,
        stop: Option<&StopHandle>,
    ) -> Result<LockGuard, Error> {
        self.slots.acquire_with(timeout, stop)
    }

    /// A watch of this semaphore's failed tries while acquiring (see [`RetryWatch`]).
    pub fn retries(&self) -> RetryWatch {
        self.slots.retries()
    }

    /// Deletes `<prefix>/.lock` if no live contender remains (Go's `Destroy`).
    pub fn destroy(&self) -> Result<(), Error> {
        self.slots.destroy()
    }

    /// Ends the semaphore handle and blocks until its cleanup is done, as [`Lock::close`].
    pub fn close(&self) {
        self.slots.close();
    }
}

impl Lock {
    /// A handle that stops acquisitions made with [`acquire_with`](Self::acquire_with).
    pub fn stop_handle() -> StopHandle {
        StopHandle {
            stop: Arc::new(watch::channel(false).0),
        }
    }

    /// Blocks until the lock (for a semaphore: a slot) is held. With `try_once`, returns
    /// [`Error::GaveUp`] when the wait ends without it. The
    /// errors are those of [`consul_lock_tokio::Lock::acquire`].
    pub fn acquire(&self) -> Result<LockGuard, Error> {
        self.acquire_with(None, None)
    }

    /// Blocks until the lock is held, `timeout` passes (then [`Error::GaveUp`]), or `stop` is
    /// stopped (then [`Error::Cancelled`]). Either way the attempt is cancelled at once.
    pub fn acquire_with(
        &self,
        timeout: Option<Duration>,
        stop: Option<&StopHandle>,
    ) -> Result<LockGuard, Error> {
        let runtime = self.runtime.handle()?;
        let mut stopped = stop.map(|s| s.stop.subscribe());
        let inner = self.inner.clone();
        let guard = runtime.block_on(async move {
            let stop = async {
                match &mut stopped {
                    Some(rx) => {
                        let _ = rx.wait_for(|stopped| *stopped).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let limit = async {
                match timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                result = inner.acquire() => result,
                () = stop => Err(Error::Cancelled),
                () = limit => Err(Error::GaveUp),
            }
        })?;
        Ok(LockGuard::new(guard, self.runtime.clone()))
    }

    /// A watch of this lock's failed tries while acquiring, to follow from any thread (see
    /// [`RetryWatch`]).
    pub fn retries(&self) -> RetryWatch {
        RetryWatch {
            inner: self.inner.retries(),
            runtime: self.runtime.clone(),
        }
    }

    /// Ends the lock and blocks until its cleanup is done: an attempt under way is cancelled, a
    /// hold is released, and the session the lock made is destroyed before this returns. Every
    /// clone of this handle answers [`Error::DriverStopped`] afterwards. See
    /// [`consul_lock_tokio::Lock::close`]; [`Client::shutdown`] does it for every lock of a
    /// client, with a timeout.
    pub fn close(&self) {
        if let Ok(runtime) = self.runtime.handle() {
            runtime.block_on(self.inner.close());
        }
    }

    /// Deletes the lock key if nobody holds it (Go's `Destroy`); for a semaphore, its `.lock` if
    /// no live contender remains.
    pub fn destroy(&self) -> Result<(), Error> {
        let inner = self.inner.clone();
        self.runtime
            .handle()?
            .block_on(async move { inner.destroy().await })
    }
}

/// A held lock, or a held semaphore slot. Dropping it releases the lock (the slot) in the
/// background.
#[derive(Debug)]
pub struct LockGuard {
    token: FencingToken,
    inner: Option<consul_lock_tokio::LockGuard>,
    watch: consul_lock_tokio::LossWatch,
    lost: mpsc::Receiver<LossReason>,
    runtime: Arc<Runtime>,
}

/// Follows a lock's failed tries while acquiring, from any thread ([`Lock::retries`]): every
/// failed try, with its cause, its count in a row and when the next goes out. Past the options'
/// `acquire_error_budget` the acquisition fails with [`LockError::AgentUnavailable`].
///
/// ```no_run
/// # fn run(lock: &consul_lock_blocking::Lock) {
/// let mut retries = lock.retries();
/// std::thread::spawn(move || {
///     while let Ok(Some(retry)) = retries.wait_next(None) {
///         eprintln!("lock: try {} failed ({}); trying again", retry.attempt, retry.cause);
///     }
/// });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RetryWatch {
    inner: consul_lock_tokio::RetryWatch,
    runtime: Arc<Runtime>,
}

impl RetryWatch {
    /// The acquisition's latest failed try, while its last try failed.
    pub fn latest(&self) -> Option<Retry> {
        self.inner.latest()
    }

    /// Blocks until the next failed try (`Some`), or `timeout` passes (`None`; `None` as the
    /// timeout waits as long as it takes). [`Error::DriverStopped`] once the lock has ended.
    pub fn wait_next(&mut self, timeout: Option<Duration>) -> Result<Option<Retry>, Error> {
        self.runtime.block_on_within(timeout, self.inner.next())
    }
}

/// Watches a hold for its end from any thread ([`LockGuard::watch`]); cheap to clone.
#[derive(Clone, Debug)]
pub struct LossWatch {
    inner: consul_lock_tokio::LossWatch,
    runtime: Arc<Runtime>,
}

impl LossWatch {
    /// Whether the lock is still held, as far as the machine knows right now.
    pub fn is_held(&self) -> bool {
        self.inner.is_held()
    }

    /// Blocks until the hold ends, lost or released (`Some`), or `timeout` passes (`None`;
    /// `None` as the timeout waits as long as it takes).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<HoldEnd>, Error> {
        self.runtime.block_on_within(timeout, self.inner.ended())
    }
}

impl LockGuard {
    fn new(guard: consul_lock_tokio::LockGuard, runtime: Arc<Runtime>) -> LockGuard {
        let token = guard.token().clone();
        let (tx, lost) = mpsc::channel();
        let watch = guard.watch();
        let mut watcher = guard.watch();
        if let Ok(handle) = runtime.handle() {
            handle.spawn(async move {
                if let Ok(reason) = watcher.lost().await {
                    let _ = tx.send(reason);
                }
            });
        }
        LockGuard {
            token,
            inner: Some(guard),
            watch,
            lost,
            runtime,
        }
    }

    /// The fencing token: key, session, and [`FencingToken::sequence`] (the key's
    /// `ModifyIndex` as the granting lock transaction wrote it), which strictly increases from
    /// one holder to the next; pass `sequence()` with writes. `lock_index` is Go's `LockIndex`,
    /// for display only.
    pub fn token(&self) -> &FencingToken {
        &self.token
    }

    /// Whether the lock is still held, as far as the machine knows right now.
    pub fn is_held(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(consul_lock_tokio::LockGuard::is_held)
    }

    /// A watch on this hold for another thread: it can wait for the hold to end (lost or
    /// released) while this thread keeps the guard, and is usable after the guard is gone.
    ///
    /// ```no_run
    /// # fn run(guard: consul_lock_blocking::LockGuard) {
    /// let mut watch = guard.watch();
    /// std::thread::spawn(move || {
    ///     if let Ok(Some(consul_lock_blocking::HoldEnd::Lost(reason))) = watch.wait(None) {
    ///         eprintln!("leadership lost: {reason:?}"); // stop the leader's work here
    ///     }
    /// });
    /// # }
    /// ```
    pub fn watch(&self) -> LossWatch {
        LossWatch {
            inner: self.watch.clone(),
            runtime: self.runtime.clone(),
        }
    }

    /// The channel that receives the reason when the lock is lost (once).
    pub fn lost(&self) -> &mpsc::Receiver<LossReason> {
        &self.lost
    }

    /// Waits up to `timeout` for the lock to be lost: `Some(reason)` if it was, `None` if it is
    /// still held.
    pub fn wait_lost(&self, timeout: Duration) -> Result<Option<LossReason>, Error> {
        match self.lost.recv_timeout(timeout) {
            Ok(reason) => Ok(Some(reason)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            // The watcher ended without a loss: the lock's task failed, or the runtime is going
            // away.
            Err(mpsc::RecvTimeoutError::Disconnected) => match self.watch.end() {
                Some(HoldEnd::DriverFailed(why)) => Err(Error::DriverPanicked(why)),
                _ => Err(Error::DriverStopped),
            },
        }
    }

    /// Writes `value` to the lock key while this hold lasts, checking that it does (an
    /// election's proclaim; see [`Leadership::proclaim`]).
    pub fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        let guard = self.inner.as_ref().ok_or(Error::Misuse(Misuse::NotHeld))?;
        self.runtime.handle()?.block_on(guard.proclaim(value.into()))
    }

    /// Releases the lock (the slot) and destroys its session, blocking until both are done.
    pub fn release(mut self) -> Result<(), Error> {
        let Some(guard) = self.inner.take() else {
            return Ok(());
        };
        self.runtime.handle()?.block_on(guard.release())
    }
}

/// Who leads on a key, and every change of leader, as they happen ([`Client::observe`]): an
/// iterator of [`ObserveEvent`]s, blocking for the next (a new leader, a new value of the leader,
/// no leader, could not see for a while, seeing again), in order, each once, the leader's
/// sequence never going backwards. It ends only after [`ObserveEvent::Failed`] or when the
/// client's runtime is gone. Dropping it stops the observation.
///
/// ```no_run
/// # fn run() -> Result<(), consul_lock_blocking::Error> {
/// let client = consul_lock_blocking::Client::from_env()?;
/// for event in client.observe("service/leader")? {
///     println!("{event:?}");
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Observer {
    inner: consul_lock_tokio::Observer,
    runtime: Arc<Runtime>,
}

impl Observer {
    /// Waits up to `timeout` (`None`: as long as it takes) for the next change: `Ok(None)` when
    /// the time ran out; [`Error::DriverStopped`] once the observation is over.
    pub fn recv_timeout(&mut self, timeout: Option<Duration>) -> Result<Option<ObserveEvent>, Error> {
        let inner = &mut self.inner;
        self.runtime.block_on_within(
            timeout,
            async move { inner.recv().await.ok_or(Error::DriverStopped) },
        )
    }

    /// What the key showed at the last answer (`None` before the first), without waiting.
    pub fn current(&self) -> Option<Observation> {
        self.inner.current()
    }

    /// The leader as of the last answer.
    pub fn leader(&self) -> Option<Leader> {
        self.inner.leader()
    }
}

impl Iterator for Observer {
    type Item = ObserveEvent;

    fn next(&mut self) -> Option<ObserveEvent> {
        self.recv_timeout(None).ok().flatten()
    }
}

/// Leader election on one key ([`Client::election`]): campaign with a value for everyone to see
/// (stored in the key, as Go's lock stores its value), follow who leads with
/// [`observe`](Election::observe) and [`leader`](Election::leader).
///
/// ```no_run
/// # fn run() -> Result<(), consul_lock_blocking::Error> {
/// let client = consul_lock_blocking::Client::from_env()?;
/// let election = client.election("service/leader")?;
/// let leading = election.campaign("10.0.0.7:8080")?;
/// // ... lead, until done or leading.wait_lost(..) says it ended ...
/// leading.resign()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Election {
    client: Client,
    options: LockOptions,
}

impl Election {
    /// Blocks until leading, with `value` in the key.
    pub fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership, Error> {
        self.campaign_with(value, None, None)
    }

    /// [`campaign`](Election::campaign) for at most `timeout` ([`Error::GaveUp`] after it), or
    /// until `stop` is stopped ([`Error::Cancelled`]), as [`Lock::acquire_with`].
    pub fn campaign_with(
        &self,
        value: impl Into<Vec<u8>>,
        timeout: Option<Duration>,
        stop: Option<&StopHandle>,
    ) -> Result<Leadership, Error> {
        let mut options = self.options.clone();
        options.hold.value = value.into();
        let lock = self.client.lock(options)?;
        let guard = lock.acquire_with(timeout, stop)?;
        Ok(Leadership { guard, lock })
    }

    /// Who leads now.
    pub fn leader(&self) -> Result<Option<Leader>, Error> {
        self.client.leader(self.options.key.as_str())
    }

    /// Every change of leader on the election's key.
    pub fn observe(&self) -> Result<Observer, Error> {
        self.client.observe(self.options.key.as_str())
    }
}

/// Leading an [`Election`] (the tokio driver's `Leadership`, blocking): a [`LockGuard`] on the
/// election's key with [`proclaim`](Leadership::proclaim) and [`resign`](Leadership::resign),
/// ending with a reason as a hold does ([`wait_lost`](Leadership::wait_lost),
/// [`watch`](Leadership::watch)). Dropping it resigns in the background.
#[derive(Debug)]
pub struct Leadership {
    // Dropped first: its release goes out before the lock's task sees its handle gone.
    guard: LockGuard,
    lock: Lock,
}

impl Leadership {
    /// The term's fencing token ([`LockGuard::token`]), which proclaims leave as it is.
    pub fn token(&self) -> &FencingToken {
        self.guard.token()
    }

    /// [`LockGuard::is_held`]: leading still, as far as this process knows.
    pub fn is_leading(&self) -> bool {
        self.guard.is_held()
    }

    /// Writes a new `value` to the key, provided this candidate still leads (see the tokio
    /// driver's `Leadership::proclaim` for the errors).
    pub fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.guard.proclaim(value)
    }

    /// Stops leading: releases the key and destroys the session, blocking until both are done.
    pub fn resign(self) -> Result<(), Error> {
        let Leadership { guard, lock } = self;
        let released = guard.release();
        lock.close();
        released
    }

    /// Waits up to `timeout` for leading to be lost: `Some(reason)` if it was.
    pub fn wait_lost(&self, timeout: Duration) -> Result<Option<LossReason>, Error> {
        self.guard.wait_lost(timeout)
    }

    /// A watch on this term for another thread (see [`LockGuard::watch`]).
    pub fn watch(&self) -> LossWatch {
        self.guard.watch()
    }
}

/// Many lock keys held on one Consul session ([`Client::key_set`]): the tokio driver's
/// [`consul_lock_tokio::KeySet`], each call blocking the calling thread until it is answered.
///
/// ```no_run
/// # fn run() -> Result<(), consul_lock_blocking::Error> {
/// let client = consul_lock_blocking::Client::from_env()?;
/// let set = client.key_set()?;
/// let shards: Vec<String> = (0..1000).map(|i| format!("shards/{i}/.lock")).collect();
/// let got = set.acquire(&shards)?; // batched: 16 transactions of at most 64 keys
/// println!("{} held, {} refused", got.held.len(), got.refused.len());
/// if let Some(loss) = set.wait_loss(Some(std::time::Duration::from_secs(1)))? {
///     println!("lost {}: {:?}", loss.key, loss.reason);
/// }
/// set.close();
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct KeySet {
    inner: consul_lock_tokio::KeySet,
    runtime: Arc<Runtime>,
}

impl KeySet {
    /// See [`consul_lock_tokio::KeySet::acquire`].
    pub fn acquire<S: AsRef<str>>(&self, keys: &[S]) -> Result<Acquired, Error> {
        self.runtime.handle()?.block_on(self.inner.acquire(keys))
    }

    /// See [`consul_lock_tokio::KeySet::release`].
    pub fn release<S: AsRef<str>>(&self, keys: &[S]) -> Result<(), Error> {
        self.runtime.handle()?.block_on(self.inner.release(keys))
    }

    /// See [`consul_lock_tokio::KeySet::release_all`].
    pub fn release_all(&self) -> Result<(), Error> {
        self.runtime.handle()?.block_on(self.inner.release_all())
    }

    /// See [`consul_lock_tokio::KeySet::held`].
    pub fn held(&self) -> Result<Vec<FencingToken>, Error> {
        self.runtime.handle()?.block_on(self.inner.held())
    }

    /// The next key lost, waiting at most `timeout` (`None`: until one is): `Ok(None)` when the
    /// time ran out first; [`Error::DriverStopped`] once the set is closed.
    pub fn wait_loss(&self, timeout: Option<Duration>) -> Result<Option<KeyLoss>, Error> {
        self.runtime.block_on_within(timeout, async {
            self.inner.next_loss().await.ok_or(Error::DriverStopped)
        })
    }

    /// See [`consul_lock_tokio::KeySet::close`].
    pub fn close(&self) {
        if let Ok(runtime) = self.runtime.handle() {
            runtime.block_on(self.inner.close());
        }
    }
}
