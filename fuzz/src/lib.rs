//! Shared parts of the consul-lock-core fuzz targets (see fuzz/README.md):
//! - [`http_text`]: the seed format of `decode_replies` (a response as `curl -si` prints it);
//! - [`arb_reply`]: structure-aware replies (Consul's shapes with hostile values) and what a
//!   correct decoder makes of them;
//! - [`oracle`]: the checks `decode_replies` makes of all ten decoders;
//! - [`request`]: what a request the lock machine sent asks;
//! - [`lock_driver`]: the lock machine's driver and invariants (`lock_machine`);
//! - [`seeds`]: the captured real replies, embedded.

pub mod arb_reply;
pub mod http_text;
pub mod lock_driver;
pub mod oracle;
pub mod request;
pub mod seeds;
