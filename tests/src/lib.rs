//! Test kit for consul-lock: a real Consul agent for tests ([`agent`]), and a blocking HTTP
//! exchange that sends the core's requests to it ([`transport`]).

#[cfg(unix)]
pub mod agent;

#[cfg(unix)]
pub use agent::{AgentError, ConsulAgent};

#[cfg(unix)]
pub mod golock;

pub mod transport;
pub use transport::TestTransport;
pub mod drive;
pub use drive::ThreadDriver;
pub mod harness;
mod http1;
pub mod proxy;
pub mod sim;
