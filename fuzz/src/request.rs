//! What a request a machine sent asks: the checker's [`Sent`] and [`Kind`] (one reading of
//! requests for the core's tests and the fuzz targets).

pub use consul_lock_checker::request::{Kind, Sent};
