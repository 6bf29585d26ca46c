//! Test kit for consul-lock.

#[cfg(unix)]
pub mod agent;

#[cfg(unix)]
pub use agent::{AgentError, ConsulAgent};
