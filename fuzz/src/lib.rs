//! Shared parts of the consul-lock-core fuzz targets (see fuzz/README.md):
//! - [`http_text`]: the seed format of `decode_replies` (a response as `curl -si` prints it);
//! - [`arb_reply`]: structure-aware replies (Consul's shapes with hostile values) and what a
//!   correct decoder makes of them;
//! - [`oracle`]: the checks `decode_replies` makes of all eleven decoders;
//! - [`request`]: what a request a machine sent asks (the checker's reading);
//! - [`driver`]: the run's grammar, a driver for any holding machine through the one invariant
//!   checker (the `consul-lock-checker` crate, shared with the core's tests);
//! - [`lock_driver`]: the lock machine's agent model (`lock_machine`);
//! - [`semaphore_driver`]: the semaphore machine's (`semaphore_machine`);
//! - [`seeds`]: the captured real replies, embedded.

pub mod arb_reply;
pub mod driver;
pub mod http_text;
pub mod lock_driver;
pub mod oracle;
pub mod request;
pub mod seeds;
pub mod semaphore_driver;
