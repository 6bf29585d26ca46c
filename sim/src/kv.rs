//! The KV endpoint (`/v1/kv/<key>`) and the KV state changes, in the order Consul's HTTP
//! handlers, RPC endpoint and state store check things.

use crate::blocking::Read;
use crate::json::{self, Json};
use crate::wire::{self, Query, Reply};
use crate::{Outcome, SimBehavior, SimConsul, SimEntry, session};

/// Consul's `kv_max_value_size` default.
const MAX_VALUE_SIZE: usize = 512 * 1024;

/// A KV entry as Consul's JSON has it (`Session` left out when none; `Value` null when empty).
pub(crate) fn entry_json(entry: &SimEntry) -> Json {
    let mut fields = vec![
        ("LockIndex", Json::U64(entry.lock_index)),
        ("Key", Json::str(entry.key.clone())),
        ("Flags", Json::U64(entry.flags)),
        (
            "Value",
            if entry.value.is_empty() {
                Json::Null
            } else {
                Json::Str(json::base64(&entry.value))
            },
        ),
    ];
    if let Some(session) = &entry.session {
        fields.push(("Session", Json::str(session.clone())));
    }
    fields.push(("CreateIndex", Json::U64(entry.create_index)));
    fields.push(("ModifyIndex", Json::U64(entry.modify_index)));
    Json::Obj(fields)
}

/// A KV write, once the request is parsed.
enum Write {
    Set { flags: u64 },
    Cas { cas: u64, flags: u64 },
    Lock { session: String, flags: u64 },
    Unlock { session: String, flags: u64 },
}

fn bool_reply(value: bool, pretty: bool) -> Reply {
    Reply::json(&Json::Bool(value), pretty)
}

/// `Conflicting flags: <query, re-encoded>` when more than one of `names` is present.
fn conflicting(query: &Query, names: &[&str]) -> Result<(), Reply> {
    if names.iter().filter(|n| query.has(n)).count() > 1 {
        return Err(Reply::text(400, format!("Conflicting flags: {}", query.encode())));
    }
    Ok(())
}

impl SimConsul {
    pub(super) fn kv_endpoint(
        &mut self,
        request: &http::Request<Vec<u8>>,
        key: &str,
        query: &Query,
    ) -> Result<Outcome, Reply> {
        let options = SimConsul::parse_options(query)?;
        let pretty = self.pretty(query);
        match request.method().as_str() {
            "GET" => {
                SimConsul::check_namespace(request, query)?;
                let read = if query.has("keys") {
                    Read::KvKeys {
                        prefix: key.to_owned(),
                        separator: query.get("separator").to_owned(),
                    }
                } else if query.has("recurse") {
                    Read::KvList {
                        prefix: key.to_owned(),
                    }
                } else if key.is_empty() {
                    return Err(Reply::text(400, "Missing key name"));
                } else {
                    Read::KvGet {
                        key: key.to_owned(),
                        raw: query.has("raw"),
                    }
                };
                self.forward(query, !options.stale)?;
                Ok(self.start_read(read, options, pretty))
            }
            "PUT" => self
                .kv_put(request, key, query)
                .map(|v| bool_reply(v, pretty).into()),
            _ => self
                .kv_delete(request, key, query)
                .map(|v| bool_reply(v, pretty).into()),
        }
    }

    fn kv_put(&mut self, request: &http::Request<Vec<u8>>, key: &str, query: &Query) -> Result<bool, Reply> {
        SimConsul::check_namespace(request, query)?;
        if key.is_empty() {
            return Err(Reply::text(400, "Missing key name"));
        }
        conflicting(query, &["cas", "acquire", "release"])?;
        let flags = if query.has("flags") {
            wire::parse_uint(query.get("flags")).map_err(|e| Reply::text(500, e))?
        } else {
            0
        };
        let mut write = Write::Set { flags };
        if query.has("cas") {
            let cas = wire::parse_uint(query.get("cas")).map_err(|e| Reply::text(500, e))?;
            write = Write::Cas { cas, flags };
        }
        if query.has("acquire") {
            write = Write::Lock {
                session: query.get("acquire").to_owned(),
                flags,
            };
        }
        if query.has("release") {
            write = Write::Unlock {
                session: query.get("release").to_owned(),
                flags,
            };
        }
        let value = request.body();
        if value.len() > MAX_VALUE_SIZE {
            let mut reply = Reply::text(
                413,
                format!(
                    "Request body({} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See \
                     https://www.consul.io/docs/agent/options.html#kv_max_value_size.",
                    value.len()
                ),
            );
            reply.header("Connection", "close");
            return Err(reply);
        }
        self.forward(query, true)?;
        // The lock-delay is checked before the write goes through Raft: a refusal takes no index.
        if let Write::Lock { .. } = write {
            if self.lock_delays.get(key).is_some_and(|until| *until > self.now) {
                return Ok(false);
            }
        }
        let idx = self.raft();
        let value = value.clone();
        let result = match write {
            Write::Set { flags } => {
                self.kvs_set(idx, key, flags, value);
                Ok(true)
            }
            Write::Cas { cas, flags } => Ok(self.kvs_cas(idx, key, cas, flags, value)),
            Write::Lock { session, flags } => self.kvs_lock(idx, key, &session, flags, value),
            Write::Unlock { session, flags } => self.kvs_unlock(idx, key, &session, flags, value),
        };
        self.wake_changed();
        result.map_err(|e| Reply::text(500, e))
    }

    fn kv_delete(
        &mut self,
        request: &http::Request<Vec<u8>>,
        key: &str,
        query: &Query,
    ) -> Result<bool, Reply> {
        SimConsul::check_namespace(request, query)?;
        conflicting(query, &["recurse", "cas"])?;
        let recurse = query.has("recurse");
        if !recurse && key.is_empty() {
            return Err(Reply::text(400, "Missing key name"));
        }
        let cas = if query.has("cas") {
            Some(wire::parse_uint(query.get("cas")).map_err(|e| Reply::text(500, e))?)
        } else {
            None
        };
        self.forward(query, true)?;
        let idx = self.raft();
        let result = match (recurse, cas) {
            (true, _) => {
                self.kvs_delete_tree(idx, key);
                true
            }
            (false, Some(cas)) => self.kvs_delete_cas(idx, key, cas),
            (false, None) => {
                self.kvs_delete(idx, key);
                true
            }
        };
        self.wake_changed();
        Ok(result)
    }

    /// Consul's `kvsSetTxn`: `CreateIndex` kept, the session kept unless `update_session`, and
    /// the `ModifyIndex` (and the table's index) left alone when nothing changes.
    fn kvs_write(&mut self, idx: u64, mut entry: SimEntry, update_session: bool) {
        let existing = self.kv.get(&entry.key);
        entry.create_index = existing.map_or(idx, |e| e.create_index);
        if !update_session {
            entry.session = existing.and_then(|e| e.session.clone());
        }
        let unchanged = existing.is_some_and(|e| {
            e.lock_index == entry.lock_index
                && e.flags == entry.flags
                && e.value == entry.value
                && e.session == entry.session
        });
        if unchanged {
            entry.modify_index = existing.map_or(idx, |e| e.modify_index);
        } else {
            entry.modify_index = idx;
            self.kv_table_index = self.kv_table_index.max(idx);
        }
        self.kv.insert(entry.key.clone(), entry);
    }

    /// A plain write: the holder stays, `LockIndex` goes back to 0 (as in Consul).
    pub(super) fn kvs_set(&mut self, idx: u64, key: &str, flags: u64, value: Vec<u8>) {
        let entry = SimEntry {
            key: key.to_owned(),
            create_index: 0,
            modify_index: 0,
            lock_index: 0,
            flags,
            value,
            session: None,
        };
        self.kvs_write(idx, entry, false);
    }

    fn kvs_cas(&mut self, idx: u64, key: &str, cas: u64, flags: u64, value: Vec<u8>) -> bool {
        let applies = match self.kv.get(key) {
            None => cas == 0,
            Some(e) => cas != 0 && e.modify_index == cas,
        };
        if applies {
            self.kvs_set(idx, key, flags, value);
        }
        applies
    }

    /// Consul's `kvsLockTxn`: `Ok(false)` when another session holds the key; `Err` with
    /// Consul's words for a missing, malformed or unknown session.
    pub(super) fn kvs_lock(
        &mut self,
        idx: u64,
        key: &str,
        session: &str,
        flags: u64,
        value: Vec<u8>,
    ) -> Result<bool, String> {
        if session.is_empty() {
            return Err("missing session".to_owned());
        }
        let uuid =
            session::parse_uuid(session).map_err(|e| format!("failed session lookup: index error: {e}"))?;
        let known = <[u8; 16]>::try_from(uuid.as_slice()).is_ok_and(|id| self.sessions.contains_key(&id));
        if !known {
            return Err(format!("invalid session {}", wire::go_quote(session)));
        }
        let lock_index = match self.kv.get(key) {
            Some(e) if e.session.as_deref() == Some(session) => e.lock_index,
            Some(e) if e.session.is_some() => return Ok(false),
            Some(e) => e.lock_index + 1,
            None => 1,
        };
        let entry = SimEntry {
            key: key.to_owned(),
            create_index: 0,
            modify_index: 0,
            lock_index,
            flags,
            value,
            session: Some(session.to_owned()),
        };
        self.kvs_write(idx, entry, true);
        Ok(true)
    }

    /// Consul's `kvsUnlockTxn`: `Ok(false)` when the session does not hold the key; `Err` for a
    /// missing session.
    pub(super) fn kvs_unlock(
        &mut self,
        idx: u64,
        key: &str,
        session: &str,
        flags: u64,
        value: Vec<u8>,
    ) -> Result<bool, String> {
        if session.is_empty() {
            return Err("missing session".to_owned());
        }
        let Some(existing) = self.kv.get(key) else {
            return Ok(false);
        };
        if existing.session.as_deref() != Some(session) {
            return Ok(false);
        }
        let entry = SimEntry {
            key: key.to_owned(),
            create_index: 0,
            modify_index: 0,
            lock_index: existing.lock_index,
            flags,
            value,
            session: None,
        };
        self.kvs_write(idx, entry, true);
        Ok(true)
    }

    /// Deletes `key` if present, leaving a tombstone.
    pub(super) fn kvs_delete(&mut self, idx: u64, key: &str) {
        if self.kv.remove(key).is_some() {
            self.tombstones.insert(key.to_owned(), idx);
            self.kv_table_index = self.kv_table_index.max(idx);
        }
    }

    /// Consul's `kvsDeleteCASTxn`: a missing key answers `true`.
    fn kvs_delete_cas(&mut self, idx: u64, key: &str, cas: u64) -> bool {
        match self.kv.get(key) {
            None => true,
            Some(e) if e.modify_index != cas => false,
            Some(_) => {
                self.kvs_delete(idx, key);
                true
            }
        }
    }

    fn kvs_delete_tree(&mut self, idx: u64, prefix: &str) {
        let keys: Vec<String> = self
            .kv
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for key in keys {
            self.kvs_delete(idx, &key);
        }
    }

    /// Consul's `deleteSessionTxn`: the session goes, its keys are released or deleted, and
    /// each starts the session's lock-delay (capped at 60 s) from now.
    pub(super) fn invalidate_session(&mut self, idx: u64, id: [u8; 16]) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        self.sessions_table_index = self.sessions_table_index.max(idx);
        let delay = session.effective_lock_delay();
        let held: Vec<String> = self
            .kv
            .values()
            .filter(|e| e.session.as_deref().and_then(session::uuid16) == Some(id))
            .map(|e| e.key.clone())
            .collect();
        for key in held {
            match session.behavior {
                SimBehavior::Release => {
                    if let Some(entry) = self.kv.get_mut(&key) {
                        entry.session = None;
                        entry.modify_index = idx;
                        self.kv_table_index = self.kv_table_index.max(idx);
                    }
                }
                SimBehavior::Delete => self.kvs_delete(idx, &key),
            }
            if !delay.is_zero() {
                if let Some(until) = self.now.checked_add(delay) {
                    self.lock_delays.insert(key, until);
                }
            }
        }
    }
}
