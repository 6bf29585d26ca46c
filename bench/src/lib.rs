//! The consul-lock benchmark suite: the tokio and blocking drivers side by side with HashiCorp's
//! Go client on one real Consul agent, and the sans-IO core's own cost. `bench/README.md` says
//! how to run it; `BENCHMARKS.md` at the root of the repository has the figures.
//!
//! The layout follows the measurement: [`protocol`] is the line protocol every client's
//! contender process speaks, [`contender`] the Rust contenders, [`host`] the suite's side of a
//! contender process, [`scenarios`] the measurements, [`report`] the table and JSON. [`lab`] is
//! the reliability lab: the same contenders on a real Consul cluster under faults.

pub mod alloc_count;
pub mod contender;
pub mod core_cycle;
pub mod error;
pub mod host;
pub mod lab;
pub mod operator;
/// What `/proc` tells about a contender process (in the test kit, which the tests share).
pub use consul_lock_testkit::procfs;
pub mod protocol;
pub mod report;
pub mod scenarios;
pub mod stats;
