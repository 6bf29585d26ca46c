//! The sans-IO core of consul-lock.
pub mod api;
