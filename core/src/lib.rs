//! The sans-IO core of consul-lock: Consul's distributed lock as a pure state machine, and the
//! typed Consul HTTP API it speaks.
//!
//! - [`api`]: one type per Consul request, encoding to `http::Request<Vec<u8>>` and decoding
//!   `http::Response<Vec<u8>>`; the client config and its environment conventions.
//! - [`duration`]: Go's duration text, as Consul reads and writes it.
//! - [`machine`]: the session and lock machines.
//!
//! Nothing here does IO, reads a clock, spawns a thread or draws global randomness: time comes in
//! as `now`, randomness as a seed, and bytes go in and out as values. Drivers do the rest.
pub mod api;
pub mod duration;
pub mod machine;
