//! Runs consul-lock on tokio (under construction: see the drivers issue).
