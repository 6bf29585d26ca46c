//! Test kit for consul-lock.
