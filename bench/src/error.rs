//! What can stop the suite.

use std::io;
use std::time::Duration;

use consul_lock_testkit::agent::AgentError;

/// A failure of the suite itself (a client being slow is a figure, not an error).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The Consul agent could not be started.
    #[error("consul agent: {0}")]
    Agent(#[from] AgentError),
    /// A contender process could not be started.
    #[error("could not start the {client} contender ({program}): {source}")]
    Spawn {
        /// The client.
        client: &'static str,
        /// The program run.
        program: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A contender reported an error, or its process ended.
    #[error("the {client} contender failed: {msg}{stderr}")]
    Contender {
        /// The client.
        client: &'static str,
        /// What it said.
        msg: String,
        /// The end of its standard error, if any, on lines of its own.
        stderr: String,
    },
    /// A contender did not do what was expected in time.
    #[error("the {client} contender did not report {what} within {waited:?}{stderr}")]
    Timeout {
        /// The client.
        client: &'static str,
        /// The awaited event.
        what: String,
        /// How long the suite waited.
        waited: Duration,
        /// The end of its standard error, if any.
        stderr: String,
    },
    /// A request the suite made itself (an operator action, the protocol floor) failed.
    #[error("{what}: {msg}")]
    Request {
        /// The request.
        what: &'static str,
        /// The error.
        msg: String,
    },
    /// The Go reference contender could not be built or found.
    #[error(
        "the Go reference contender is not available: {0}; run scripts/ensure-go-contender.sh, \
         set GO_CONTENDER_BIN, or leave Go out with --clients tokio,blocking"
    )]
    GoUnavailable(String),
    /// Reading `/proc`, writing the results, or another local operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The command line was wrong.
    #[error("{0}\n\nrun `consul-lock-bench --help` for the options")]
    Usage(String),
}
