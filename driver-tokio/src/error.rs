//! The driver's error type.

use std::path::PathBuf;

use consul_lock_core::api::ConfigError;
use consul_lock_core::machine::{LockError, Misuse, OptionsError};

/// Everything that can go wrong with a lock on tokio.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client configuration (from `CONSUL_*` variables) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The lock options are unusable.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// A TLS file (`CONSUL_CACERT`, `CONSUL_CAPATH`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`)
    /// can't be used.
    #[error("TLS setup: {what} {path:?}: {source}")]
    Tls {
        /// Which file, and the variable that names it.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: TlsFileError,
    },
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client")]
    Http(#[source] reqwest::Error),
    /// The agent's address did not resolve (with `CONSUL_TLS_SERVER_NAME`, the client resolves
    /// it once, to connect there while checking the certificate against the name).
    #[error("could not resolve the agent's address {address} (for CONSUL_TLS_SERVER_NAME)")]
    Resolve {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The blocking driver's thread could not be started.
    #[error("could not start the thread that runs the locks")]
    Thread(#[source] std::io::Error),
    /// A call the lock can't take in the state it is in: acquiring while already held, a
    /// destroy while held or while another operation is under way.
    #[error(transparent)]
    Misuse(#[from] Misuse),
    /// The acquisition was cancelled (a stop handle, a shutdown, or the lock closed) before it
    /// ended.
    #[error("the acquisition was cancelled")]
    Cancelled,
    /// No tokio runtime is running here.
    #[error("no tokio runtime: create locks from inside a tokio runtime (e.g. under #[tokio::main])")]
    NoRuntime,
    /// The lock's task failed: its machine panicked (a bug in consul-lock; please report it),
    /// with this message. The lock's session was destroyed, best effort, and the handle answers
    /// this error from then on.
    #[error("the lock's driver failed (a consul-lock bug; please report it): {0}")]
    DriverPanicked(String),
    /// The lock's task is gone (its runtime shut down).
    #[error("the lock's driver task has stopped (its tokio runtime shut down)")]
    DriverStopped,
    /// The lock refused the operation or the attempt failed (conflict, session, permission).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A key set refused the call (an invalid key, one given twice or already in the set, too
    /// many keys, a release of a key not held, a call after close).
    #[error(transparent)]
    KeySet(consul_lock_core::machine::KeySetError),
    /// Try-once: the wait ended without the lock. Not a success: there is no guard.
    #[error("gave up: no lock within the wait time (try_once)")]
    GaveUp,
    /// [`Client::shutdown`](crate::Client::shutdown) did not finish every cleanup in time (here
    /// so that `?` works on it in a function returning this error).
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
}

/// What is wrong with a TLS file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFileError {
    /// It could not be read.
    #[error("could not read it")]
    Read(#[source] std::io::Error),
    /// It is not what it should be (PEM certificates; a PEM key for a client key).
    #[error("could not parse it")]
    Parse(#[source] reqwest::Error),
    /// It holds no PEM certificate (a CA directory: none of its files does). Using it would
    /// silently leave the system's roots in charge.
    #[error("it holds no PEM certificate")]
    NoCertificate,
}

/// Why a [`Client::call`](crate::Client::call) has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// Nothing answered: no connection, a timeout, a TLS failure.
    #[error(transparent)]
    Transport(consul_lock_core::machine::TransportError),
    /// Consul answered, but not with the answer asked for (a 403, a 500, a garbled body).
    #[error(transparent)]
    Api(consul_lock_core::api::ApiError),
    /// The client's runtime is gone (the blocking client was shut down).
    #[error("the client's runtime has stopped")]
    Stopped,
}

/// Why [`Client::shutdown`](crate::Client::shutdown) did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShutdownError {
    /// The timeout passed before these locks and semaphores finished their cleanup (releasing,
    /// destroying their session): each is named by its key (a semaphore by its prefix). They go
    /// on in the background for as long as the runtime runs; what is cut short is left for
    /// Consul to expire with the session's TTL.
    #[error("{} lock(s) did not finish their cleanup in time: {}", unfinished.len(), unfinished.join(", "))]
    Unfinished {
        /// The keys (semaphore prefixes) still cleaning up.
        unfinished: Vec<String>,
    },
}
