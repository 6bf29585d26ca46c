//! Runs consul-lock on plain threads (under construction: see the drivers issue).
