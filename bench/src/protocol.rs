//! The contender protocol (`bench/PROTOCOL.md`): the commands the suite sends a contender process
//! and the events it answers with, one JSON object per line.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A command to a contender process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Start acquiring a lock in the background.
    Lock {
        /// The contender's id, unique within its process.
        id: u64,
        /// The agent's HTTP address, `host:port`.
        addr: String,
        /// The lock key.
        key: String,
        /// The session TTL in milliseconds.
        ttl_ms: u64,
        /// The session's lock-delay in milliseconds; `None`: the client's default session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock_delay_ms: Option<u64>,
        /// Share one client (connection pool) per address with the other sharing contenders.
        #[serde(default)]
        shared_client: bool,
        /// Wait in line (`Waiting::Queue`) rather than on the key (Rust contenders only; the
        /// suite sets it for the `queued` client).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        queued: bool,
        /// While held, report a `write` to the fenced resource every this many milliseconds
        /// (the reliability lab); `None`: no writes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        write_ms: Option<u64>,
    },
    /// Take `n` keys (`<prefix>/<i>`, contender ids `0..n`) on one session, with the key set
    /// (the Rust contenders only): `held` for each key taken, `lost` for each key lost after.
    AcquireSet {
        /// The agent's HTTP address, `host:port`.
        addr: String,
        /// The keys' prefix.
        prefix: String,
        /// How many keys.
        n: u64,
        /// The session TTL in milliseconds.
        ttl_ms: u64,
    },
    /// Answer `stats` (the Rust contenders only).
    Stats,
    /// Release the lock contender `id` holds.
    Unlock {
        /// The contender.
        id: u64,
    },
    /// Release everything, end every session, answer `bye` and exit.
    Quit,
}

/// An event from a contender process. `t_ns` is the wall clock in nanoseconds since the Unix
/// epoch, read inside the contender when the thing happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The process takes commands.
    Ready {
        /// When.
        t_ns: u64,
    },
    /// The lock is held.
    Held {
        /// The contender.
        id: u64,
        /// When the acquire call returned.
        t_ns: u64,
        /// The holding session.
        session: String,
        /// The fencing token's sequence (the grant's `ModifyIndex`); 0 when the client could not
        /// learn it (Go's, when its read of the key after `Lock` failed or saw another holder).
        #[serde(default)]
        seq: u64,
    },
    /// While held, the contender writes to the fenced resource with its sequence (`write_ms`).
    Write {
        /// The contender.
        id: u64,
        /// When the contender, still believing it held the lock, wrote.
        t_ns: u64,
        /// The sequence it wrote with (its `held` event's).
        seq: u64,
    },
    /// The client reported the lock lost.
    Lost {
        /// The contender.
        id: u64,
        /// When the client reported it.
        t_ns: u64,
    },
    /// The unlock call is about to be made.
    Unlocking {
        /// The contender.
        id: u64,
        /// Just before the call.
        t_ns: u64,
    },
    /// The unlock call returned.
    Unlocked {
        /// The contender.
        id: u64,
        /// When it returned.
        t_ns: u64,
    },
    /// A command failed.
    Error {
        /// The contender, when the command named one.
        #[serde(default)]
        id: Option<u64>,
        /// What went wrong.
        msg: String,
    },
    /// The answer to `stats`.
    Stats {
        /// Requests the process's shared clients have sent so far.
        requests: u64,
    },
    /// The answer to `quit`; the last line.
    Bye,
}

impl Event {
    /// The contender the event is about, if any.
    pub fn id(&self) -> Option<u64> {
        match self {
            Event::Held { id, .. }
            | Event::Write { id, .. }
            | Event::Lost { id, .. }
            | Event::Unlocking { id, .. }
            | Event::Unlocked { id, .. } => Some(*id),
            Event::Error { id, .. } => *id,
            Event::Ready { .. } | Event::Stats { .. } | Event::Bye => None,
        }
    }

    /// When it happened, for the events that carry a time.
    pub fn t_ns(&self) -> Option<u64> {
        match self {
            Event::Ready { t_ns }
            | Event::Held { t_ns, .. }
            | Event::Write { t_ns, .. }
            | Event::Lost { t_ns, .. }
            | Event::Unlocking { t_ns, .. }
            | Event::Unlocked { t_ns, .. } => Some(*t_ns),
            Event::Error { .. } | Event::Stats { .. } | Event::Bye => None,
        }
    }
}

/// The wall clock in nanoseconds since the Unix epoch, the clock every contender stamps with.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
