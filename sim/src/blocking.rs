//! Reads, blocking reads and the passing of virtual time.
//!
//! A read is evaluated into an index and a reply. A blocking read (`index` > 0) whose index has
//! not moved past `index` is parked; after every change it is evaluated again and answered once
//! its index moved (Consul's `blockingQuery` re-runs the query when a watched part of the state
//! changes and returns when the index is past the client's). The reply is the state at that
//! moment. A read also ends at its deadline, answering whatever the state is then.

use std::time::{Duration, Instant};

use crate::json::Json;
use crate::wire::Reply;
use crate::{Outcome, QueryOptions, SimConsul, kv, session};

/// Consul's default and longest blocking waits.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// The jitter: up to `wait / JITTER_FRACTION` more.
const JITTER_FRACTION: u32 = 16;

/// What a read asks for.
#[derive(Clone, Debug)]
pub(crate) enum Read {
    /// One key (`raw`: the bare value).
    KvGet { key: String, raw: bool },
    /// Every entry under a prefix.
    KvList { prefix: String },
    /// The keys under a prefix, folded at `separator` when not empty.
    KvKeys { prefix: String, separator: String },
    /// One session.
    SessionInfo { id: String },
    /// Every session.
    SessionList,
}

/// A parked read.
#[derive(Clone, Debug)]
pub(crate) struct Parked {
    pub(crate) read: Read,
    pub(crate) pretty: bool,
    pub(crate) min_index: u64,
    pub(crate) deadline: Instant,
}

/// What is next in virtual time.
enum Event {
    Expiry([u8; 16]),
    Deadline(crate::QueryId),
}

impl SimConsul {
    /// Starts a read: answered now, or parked.
    pub(super) fn start_read(&mut self, read: Read, options: QueryOptions, pretty: bool) -> Outcome {
        let index = self.read_index(&read);
        if options.min_index == 0 || index > options.min_index {
            return Outcome::Reply(self.read_reply(&read, pretty));
        }
        let wait = match options.wait {
            Some(ns) if ns > 0 => Duration::from_nanos(ns.unsigned_abs()).min(MAX_WAIT),
            _ => DEFAULT_WAIT,
        };
        let jitter_bound = wait / JITTER_FRACTION;
        let jitter_ns = self
            .rng
            .below(u64::try_from(jitter_bound.as_nanos()).unwrap_or(u64::MAX));
        let timeout = wait + Duration::from_nanos(jitter_ns);
        let deadline = self.now.checked_add(timeout).unwrap_or(self.now);
        Outcome::Park(Parked {
            read,
            pretty,
            min_index: options.min_index,
            deadline,
        })
    }

    /// The index a read would report (before Consul's "never 0" rule).
    pub(super) fn read_index(&self, read: &Read) -> u64 {
        match read {
            Read::KvGet { key, .. } => self.kv.get(key).map_or(self.kv_table_index, |e| e.modify_index),
            Read::KvList { prefix } | Read::KvKeys { prefix, .. } => self.prefix_index(prefix),
            Read::SessionInfo { .. } | Read::SessionList => self.sessions_table_index,
        }
    }

    /// Consul's `kvsListTxn` index: the highest `ModifyIndex` under the prefix or tombstone
    /// under it; the table's index for an empty prefix or when there is neither.
    fn prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.kv_table_index;
        }
        let entries = self
            .kv
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let graves = self
            .tombstones
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, idx)| *idx)
            .max()
            .unwrap_or(0);
        match entries.max(graves) {
            0 => self.kv_table_index,
            idx => idx,
        }
    }

    fn entries_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a crate::SimEntry> + 'a {
        self.kv
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e)
    }

    /// The reply to a read, from the current state.
    pub(super) fn read_reply(&self, read: &Read, pretty: bool) -> Reply {
        let index = self.read_index(read);
        let (leader, contact) = (self.leader, self.last_contact_ms());
        match read {
            Read::KvGet { key, raw } => match self.kv.get(key) {
                None => Reply::empty(404).with_meta(index, leader, contact),
                Some(entry) if *raw => {
                    let mut reply = Reply::empty(200).with_meta(index, leader, contact);
                    reply.header("Content-Type", "text/plain");
                    reply.header("X-Content-Type-Options", "nosniff");
                    reply.header("Content-Security-Policy", "sandbox");
                    reply.body = entry.value.clone();
                    reply
                }
                Some(entry) => Reply::json(&Json::Arr(vec![kv::entry_json(entry)]), pretty)
                    .with_meta(index, leader, contact),
            },
            Read::KvList { prefix } => {
                let entries: Vec<Json> = self.entries_under(prefix).map(kv::entry_json).collect();
                if entries.is_empty() {
                    Reply::empty(404).with_meta(index, leader, contact)
                } else {
                    Reply::json(&Json::Arr(entries), pretty).with_meta(index, leader, contact)
                }
            }
            Read::KvKeys { prefix, separator } => {
                let mut keys: Vec<String> = Vec::new();
                for entry in self.entries_under(prefix) {
                    let after = &entry.key[prefix.len()..];
                    match after.find(separator.as_str()).filter(|_| !separator.is_empty()) {
                        Some(at) => {
                            let folded = &entry.key[..prefix.len() + at + separator.len()];
                            if keys.last().map(String::as_str) != Some(folded) {
                                keys.push(folded.to_owned());
                            }
                        }
                        None => keys.push(entry.key.clone()),
                    }
                }
                if keys.is_empty() {
                    Reply::empty(404).with_meta(index, leader, contact)
                } else {
                    let list = Json::Arr(keys.into_iter().map(Json::Str).collect());
                    Reply::json(&list, pretty).with_meta(index, leader, contact)
                }
            }
            Read::SessionInfo { id } => {
                let found: Vec<Json> = session::uuid16(id)
                    .and_then(|uuid| self.sessions.get(&uuid))
                    .map(session::session_json)
                    .into_iter()
                    .collect();
                Reply::json(&Json::Arr(found), pretty).with_meta(index, leader, contact)
            }
            Read::SessionList => {
                let all = self.sessions.values().map(session::session_json).collect();
                Reply::json(&Json::Arr(all), pretty).with_meta(index, leader, contact)
            }
        }
    }

    /// Answers every parked read whose index moved past its own, in query order.
    pub(super) fn wake_changed(&mut self) {
        let woken: Vec<crate::QueryId> = self
            .parked
            .iter()
            .filter(|(_, p)| self.read_index(&p.read) > p.min_index)
            .map(|(id, _)| *id)
            .collect();
        for id in woken {
            if let Some(parked) = self.parked.remove(&id) {
                let reply = self.read_reply(&parked.read, parked.pretty);
                self.ready.push((id, reply.into_response()));
            }
        }
    }

    /// The next session expiry (none without a leader: timers only run on a leader).
    pub(super) fn next_expiry(&self) -> Option<(Instant, [u8; 16])> {
        if !self.leader {
            return None;
        }
        self.sessions
            .iter()
            .filter_map(|(id, s)| s.expires_at.map(|at| (at, *id)))
            .min()
    }

    /// Processes, in time order, every expiry and end of wait up to `target`, then sets the clock
    /// to `target` (or leaves it, if `target` is earlier than the latest time seen). An expiry
    /// comes before an end of wait at the same instant, so that the read sees it.
    pub(super) fn run_until(&mut self, target: Instant) {
        let target = target.max(self.now);
        loop {
            let expiry = self.next_expiry().filter(|(at, _)| *at <= target);
            let deadline = self
                .parked
                .iter()
                .map(|(id, p)| (p.deadline, *id))
                .min()
                .filter(|(at, _)| *at <= target);
            let (at, event) = match (expiry, deadline) {
                (Some((e, id)), Some((d, _))) if e <= d => (e, Event::Expiry(id)),
                (Some((e, id)), None) => (e, Event::Expiry(id)),
                (_, Some((d, q))) => (d, Event::Deadline(q)),
                (None, None) => break,
            };
            self.now = self.now.max(at);
            match event {
                Event::Expiry(id) => {
                    let idx = self.raft();
                    self.invalidate_session(idx, id);
                    self.wake_changed();
                }
                Event::Deadline(q) => {
                    if let Some(parked) = self.parked.remove(&q) {
                        let reply = self.read_reply(&parked.read, parked.pretty);
                        self.ready.push((q, reply.into_response()));
                    }
                }
            }
        }
        self.now = target;
    }
}
