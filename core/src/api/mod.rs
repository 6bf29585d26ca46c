//! The typed Consul HTTP API that the lock and semaphore need, as pure encode and decode functions.

pub mod config;
pub mod env;

pub use config::{Address, ClientConfig, Scheme, TlsConfig, Token};
pub use env::ConfigError;
