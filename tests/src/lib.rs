//! Test kit for consul-lock: a real Consul agent for tests ([`agent`]), a blocking HTTP
//! exchange that sends the core's requests to it ([`transport`]), a thread driver ([`drive`]),
//! and a virtual-time harness ([`harness`]) that runs machines against the simulated Consul of
//! the `consul-lock-sim` crate (re-exported here as [`sim`] and [`proxy`]).

#[cfg(unix)]
pub mod agent;

#[cfg(unix)]
pub use agent::{AgentError, ConsulAgent};

#[cfg(target_os = "linux")]
pub mod cluster;

#[cfg(unix)]
pub mod golock;

#[cfg(target_os = "linux")]
pub mod procfs;

pub mod transport;
pub use transport::TestTransport;
pub mod drive;
pub use drive::ThreadDriver;
pub mod harness;
/// The simulated Consul ([`SimConsul`](sim::SimConsul), [`SimServer`](sim::SimServer)): the
/// `consul-lock-sim` crate, re-exported so that `consul_lock_testkit::sim::...` paths keep working.
pub use consul_lock_sim as sim;
/// The fault-injecting proxy ([`FaultProxy`](proxy::FaultProxy)), from `consul-lock-sim`.
pub use consul_lock_sim::proxy;
