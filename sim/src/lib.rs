//! A simulated Consul for consul-lock's tests and its `consul-lock demo`: [`SimConsul`], Consul
//! 1.8's KV, sessions, transactions and blocking reads as a deterministic sans-IO machine in
//! virtual time; [`SimServer`], the same served over HTTP/1.1 on loopback in real time; and
//! [`proxy::FaultProxy`], a fault-injecting TCP proxy (black hole, refusal, 500s, latency) to put
//! in front of either, or of a real agent.
//!
//! It depends on `consul-lock-core` (for [`ClientConfig`](consul_lock_core::api::ClientConfig)),
//! `http`, `serde_json` and `tracing` only, and uses nothing but `std` threads for its servers.
//!
//! `SimConsul`: a deterministic, in-memory, sans-IO Consul that answers the very
//! `http::Request<Vec<u8>>`s a client sends, with Consul 1.8's semantics, in virtual time.
//!
//! It parses requests itself (method, percent-decoded path, query, body), independently of the
//! core's encoders, so that it can serve as a reference; it never panics, whatever it is sent
//! (garbage gets the 4xx/5xx text errors Consul would give). The behaviour was checked against a
//! real Consul 1.8.7 agent; `tests/tests/sim_differential.rs` keeps it honest.
//!
//! # What is modelled
//!
//! - **KV**: `GET /v1/kv/<key>` (single key, `?recurse`, `?keys` with `separator`, `?raw`), `PUT`
//!   (plain, `cas`, `acquire`, `release`, `flags`) and `DELETE` (plain, `cas`, `recurse`), with
//!   Consul's entries (`CreateIndex`, `ModifyIndex`, `LockIndex`, `Flags`, base64 `Value`,
//!   `Session`), its indexes (a global Raft index that every applied write takes, even a write
//!   that answers `false`; the KV table index; tombstones of deleted keys, which keep a prefix's
//!   index from going backwards) and its quirks (a plain or CAS `PUT` resets `LockIndex` to 0 and
//!   keeps the holder; a write that changes nothing keeps the `ModifyIndex`; a `release` writes
//!   the value and flags).
//! - **Transactions**: `PUT /v1/txn` with KV `lock`, `unlock`, `check-session` and `delete`
//!   operations (the same state changes as `?acquire`, `?release` and `DELETE`), with Consul's pre-checks (lock-delay, missing key)
//!   before Raft, all-or-nothing application under one index, 409 replies naming each failed
//!   operation, results with `Value` blanked, and its body decoding errors; other verbs and
//!   operation types answer a 500 saying they are not modelled (see `txn.rs`).
//! - **Sessions**: create (Go's JSON decoding of the body, `LockDelay` as a Go duration or a
//!   number, `Checks`/`NodeChecks` fix-ups, TTL range check), renew, destroy, info, list, with
//!   UUID IDs drawn from the seed and validated the way Consul's state store does.
//! - **Invalidation**: a TTL session is invalidated at a point drawn from the seed in
//!   `[TTL, 2×TTL]` after its last renew ([`TtlExpiry`]); on invalidation (expiry or destroy) its
//!   keys are released or deleted per its behavior, and each refuses acquires for the session's
//!   lock-delay (capped at 60 s). An explicit release sets no lock-delay.
//! - **Blocking reads**: a read with `index` > 0 parks until its index moves past `index`, or
//!   until `wait` (default 5 min, max 10 min) plus a seeded jitter of up to `wait/16`.
//! - **Faults**: [`SimConsul::set_leader`] (no leader: every forwarded request answers 500
//!   `No cluster leader`; `stale` reads are served with `X-Consul-KnownLeader: false`; session
//!   timers stop and restart in full when a leader is back, as Consul's do), and operator
//!   actions ([`SimConsul::destroy_session`], [`SimConsul::delete_key`], [`SimConsul::put_key`]);
//!   a failed node ([`SimConsul::fail_node`]: its `serfHealth`-bound sessions invalidated).
//!
//! # The calling contract
//!
//! Time is passed in; it never goes backwards (an earlier `now` counts as the latest one seen).
//!
//! - [`SimConsul::handle`] first brings the simulator up to `now` (expiring sessions, ending
//!   waits), then answers the request: [`SimReply::Now`] with a response, or
//!   [`SimReply::Parked`] for a blocking read that must wait.
//! - A parked read is answered later, by [`SimConsul::advance`], which returns every parked read
//!   that was woken (by a write, an expiry, an operator action, or the end of its wait) since the
//!   last call. **After every `handle` (and every operator action), call `advance(now)`** to
//!   collect the reads that the request woke; nothing is lost in between, but nothing is
//!   returned twice either.
//! - [`SimConsul::poll_timeout`] tells when to call `advance` next when nothing else happens;
//!   [`SimConsul::abandon`] drops a read whose client went away.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use consul_lock_sim::{SimConsul, SimReply};
//!
//! let start = Instant::now();
//! let mut consul = SimConsul::new(7, start);
//! let put = http::Request::put("http://sim/v1/kv/a").body(b"v".to_vec()).unwrap();
//! let SimReply::Now(reply) = consul.handle(start, &put) else { panic!() };
//! assert_eq!(reply.body(), b"true");
//! let index = consul.kv("a").unwrap().modify_index;
//! let read = http::Request::get(format!("http://sim/v1/kv/a?index={index}&wait=10s")).body(vec![]).unwrap();
//! let SimReply::Parked(query) = consul.handle(start, &read) else { panic!() };
//! assert!(consul.advance(start + Duration::from_secs(1)).is_empty());
//! let woken = consul.advance(start + Duration::from_secs(11));
//! assert_eq!(woken.len(), 1);
//! assert_eq!(woken[0].0, query);
//! ```

mod blocking;
mod gotime;
mod http1;
mod json;
mod kv;
pub mod proxy;
mod rng;
mod server;
mod session;
mod txn;
mod wire;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use self::json::base64_decode;
use self::rng::SplitMix64;
pub use self::server::SimServer;
use self::wire::{Query, Reply};

/// The lock-delay cap Consul applies when it invalidates a session.
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// Identifies a parked (blocking) read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueryId(pub u64);

/// What [`SimConsul::handle`] gives back.
#[derive(Debug)]
pub enum SimReply {
    /// The answer.
    Now(http::Response<Vec<u8>>),
    /// A blocking read that waits; [`SimConsul::advance`] answers it later.
    Parked(QueryId),
}

/// When a TTL session that is not renewed is invalidated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TtlExpiry {
    /// At a point drawn from the seed in `[TTL, 2×TTL]` after the last renew: what Consul
    /// promises, so that clients are tested against the whole range.
    #[default]
    Seeded,
    /// At exactly `2×TTL` after the last renew: what Consul 1.8.7 does (measured: a 10 s session
    /// went at 20.1 s).
    TwiceTtl,
}

/// The simulator's settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The node's name (the `Node` of sessions; the only node sessions may be created on).
    pub node_name: String,
    /// The datacenter; any other `dc` answers 500 `No path to datacenter`.
    pub datacenter: String,
    /// The Raft index before the first write.
    pub start_index: u64,
    /// Indented JSON as a `-dev` agent writes it (`json.MarshalIndent` plus a newline); else
    /// compact JSON, as a production agent writes it unless asked `?pretty`.
    pub pretty_json: bool,
    /// When unrenewed sessions expire.
    pub ttl_expiry: TtlExpiry,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            node_name: "sim-node".to_owned(),
            datacenter: "dc1".to_owned(),
            start_index: 10,
            pretty_json: false,
            ttl_expiry: TtlExpiry::Seeded,
        }
    }
}

/// A stored KV entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimEntry {
    /// The key (invalid UTF-8 in a request's key is replaced by U+FFFD).
    pub key: String,
    /// The index of the write that created it.
    pub create_index: u64,
    /// The index of its last change.
    pub modify_index: u64,
    /// How many times a session acquired it while not holding it (a plain or CAS write resets it
    /// to 0, as Consul does).
    pub lock_index: u64,
    /// Its flags.
    pub flags: u64,
    /// Its value.
    pub value: Vec<u8>,
    /// The holding session's ID, as the acquire named it.
    pub session: Option<String>,
}

/// What a session's invalidation does to its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimBehavior {
    /// Release them.
    Release,
    /// Delete them.
    Delete,
}

impl SimBehavior {
    fn as_str(self) -> &'static str {
        match self {
            SimBehavior::Release => "release",
            SimBehavior::Delete => "delete",
        }
    }
}

/// A live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimSession {
    /// Its ID (a lower-case UUID).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its lock-delay in nanoseconds, as stored (Consul stores what it decoded, even a negative
    /// or huge value, and caps it at 60 s only when applying it).
    pub lock_delay_nanos: i64,
    /// Its behavior.
    pub behavior: SimBehavior,
    /// Its TTL, as the create request wrote it (`""`: none).
    pub ttl: String,
    /// Its TTL, parsed (`None`: no TTL, including `0s`).
    pub ttl_duration: Option<Duration>,
    /// `NodeChecks` (`None`: JSON `null`).
    pub node_checks: Option<Vec<String>>,
    /// `ServiceChecks` IDs (`None`: JSON `null`).
    pub service_checks: Option<Vec<String>>,
    /// The deprecated `Checks`, when the fix-ups kept them.
    pub checks: Vec<String>,
    /// The index of its creation.
    pub create_index: u64,
    /// Its modify index (equal to the create index: sessions are never modified).
    pub modify_index: u64,
    /// When it was created or last renewed.
    pub last_renew: Instant,
    /// When it will be invalidated unless renewed (`None`: no TTL, or no leader to run timers).
    pub expires_at: Option<Instant>,
}

impl SimSession {
    /// The lock-delay Consul applies on invalidation: the stored one, capped at 60 s, none when
    /// not positive.
    pub fn effective_lock_delay(&self) -> Duration {
        u64::try_from(self.lock_delay_nanos)
            .map(Duration::from_nanos)
            .unwrap_or(Duration::ZERO)
            .min(MAX_LOCK_DELAY)
    }
}

/// A deterministic, in-memory Consul (see the [module documentation](self)).
#[derive(Debug)]
pub struct SimConsul {
    config: SimConfig,
    rng: SplitMix64,
    /// The latest time seen.
    now: Instant,
    /// The Raft index: the last applied write.
    index: u64,
    kv: BTreeMap<String, SimEntry>,
    /// The KV table's index (every change, deletes included).
    kv_table_index: u64,
    /// Deleted keys and the index of their deletion.
    tombstones: BTreeMap<String, u64>,
    /// Sessions by the 16 bytes of their UUID (Consul's `id` index; its order is the list order).
    sessions: BTreeMap<[u8; 16], SimSession>,
    sessions_table_index: u64,
    /// Keys refusing acquires until then.
    lock_delays: BTreeMap<String, Instant>,
    leader: bool,
    leader_lost_at: Instant,
    /// The node's `serfHealth` is critical ([`SimConsul::fail_node`] until
    /// [`SimConsul::recover_node`]).
    node_failed: bool,
    parked: BTreeMap<QueryId, blocking::Parked>,
    next_query: u64,
    /// Answered parked reads not yet collected by `advance`.
    ready: Vec<(QueryId, http::Response<Vec<u8>>)>,
}

/// What the dispatch decided.
enum Outcome {
    Reply(Reply),
    Park(blocking::Parked),
}

impl From<Reply> for Outcome {
    fn from(reply: Reply) -> Outcome {
        Outcome::Reply(reply)
    }
}

/// The endpoints served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Kv,
    SessionCreate,
    SessionRenew,
    SessionDestroy,
    SessionInfo,
    SessionList,
    StatusLeader,
    Txn,
}

impl Endpoint {
    /// The methods served (besides `OPTIONS`).
    fn methods(self) -> &'static [&'static str] {
        match self {
            Endpoint::Kv => &["GET", "PUT", "DELETE"],
            Endpoint::SessionCreate | Endpoint::SessionRenew | Endpoint::SessionDestroy | Endpoint::Txn => {
                &["PUT"]
            }
            Endpoint::SessionInfo | Endpoint::SessionList | Endpoint::StatusLeader => &["GET"],
        }
    }

    fn allow_header(self) -> String {
        let mut allow = vec!["OPTIONS"];
        allow.extend(self.methods());
        allow.join(",")
    }
}

/// How the path routes.
enum Route<'p> {
    NotFound,
    Redirect(String),
    Endpoint(Endpoint, &'p str),
}

fn route(path: &str) -> Route<'_> {
    const SUBTREES: [(&str, Endpoint); 4] = [
        ("/v1/kv/", Endpoint::Kv),
        ("/v1/session/renew/", Endpoint::SessionRenew),
        ("/v1/session/destroy/", Endpoint::SessionDestroy),
        ("/v1/session/info/", Endpoint::SessionInfo),
    ];
    for (prefix, endpoint) in SUBTREES {
        if let Some(rest) = path.strip_prefix(prefix) {
            return Route::Endpoint(endpoint, rest);
        }
        if path.len() + 1 == prefix.len() && prefix.starts_with(path) {
            return Route::Redirect(prefix.to_owned());
        }
    }
    match path {
        "/v1/session/create" => Route::Endpoint(Endpoint::SessionCreate, ""),
        "/v1/session/list" => Route::Endpoint(Endpoint::SessionList, ""),
        "/v1/status/leader" => Route::Endpoint(Endpoint::StatusLeader, ""),
        "/v1/txn" => Route::Endpoint(Endpoint::Txn, ""),
        "/" => Route::Redirect("/ui/".to_owned()),
        _ => Route::NotFound,
    }
}

/// Consul's `parse`: consistency flags, then `wait` and `index`.
#[derive(Clone, Copy, Debug)]
struct QueryOptions {
    stale: bool,
    wait: Option<i64>,
    min_index: u64,
}

impl SimConsul {
    /// A simulator with the default [`SimConfig`], empty, with a leader, at time `now`.
    pub fn new(seed: u64, now: Instant) -> SimConsul {
        SimConsul::with_config(seed, now, SimConfig::default())
    }

    /// A simulator with `config`.
    pub fn with_config(seed: u64, now: Instant, config: SimConfig) -> SimConsul {
        SimConsul {
            index: config.start_index,
            config,
            rng: SplitMix64::new(seed),
            now,
            kv: BTreeMap::new(),
            kv_table_index: 0,
            tombstones: BTreeMap::new(),
            sessions: BTreeMap::new(),
            sessions_table_index: 0,
            lock_delays: BTreeMap::new(),
            leader: true,
            leader_lost_at: now,
            node_failed: false,
            parked: BTreeMap::new(),
            next_query: 1,
            ready: Vec::new(),
        }
    }

    /// Answers `request` at `now` (after bringing the simulator up to `now`). A blocking read
    /// that must wait is parked: [`SimConsul::advance`] answers it later. Reads woken by this
    /// request are returned by the next `advance`, not here.
    pub fn handle(&mut self, now: Instant, request: &http::Request<Vec<u8>>) -> SimReply {
        self.run_until(now);
        match self.dispatch(request) {
            Outcome::Reply(reply) => SimReply::Now(reply.into_response()),
            Outcome::Park(parked) => {
                let id = QueryId(self.next_query);
                self.next_query += 1;
                self.parked.insert(id, parked);
                SimReply::Parked(id)
            }
        }
    }

    /// Brings the simulator up to `now`: invalidates the sessions that expired, in time order,
    /// and ends the waits that ran out; returns every parked read answered since the last call
    /// (woken by a write, an expiry, an operator action or the end of its wait), in the order
    /// they were answered.
    pub fn advance(&mut self, now: Instant) -> Vec<(QueryId, http::Response<Vec<u8>>)> {
        self.run_until(now);
        std::mem::take(&mut self.ready)
    }

    /// Drops a parked read (its client gave up), or its answer if not yet collected.
    pub fn abandon(&mut self, query: QueryId) {
        self.parked.remove(&query);
        self.ready.retain(|(id, _)| *id != query);
    }

    /// When [`SimConsul::advance`] has something to do: the next session expiry or end of a
    /// wait, or the latest time seen when answers are waiting to be collected. `None`: nothing
    /// will happen until a request comes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return Some(self.now);
        }
        let expiry = self.next_expiry().map(|(at, _)| at);
        let deadline = self.parked.values().map(|p| p.deadline).min();
        match (expiry, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Operator action: destroys session `id` as `PUT /v1/session/destroy` would, releasing or
    /// deleting its keys and starting their lock-delay. Returns whether the session existed.
    /// Applies even without a leader (it stands for whatever the test means to happen).
    pub fn destroy_session(&mut self, now: Instant, id: &str) -> bool {
        self.run_until(now);
        let Some(uuid) = session::uuid16(id) else {
            return false;
        };
        if !self.sessions.contains_key(&uuid) {
            return false;
        }
        let idx = self.raft();
        self.invalidate_session(idx, uuid);
        self.wake_changed();
        true
    }

    /// Fault injection: the agent's node fails (a client agent killed or cut off long enough for
    /// the servers' failure detector to mark its `serfHealth` check critical). Every session
    /// bound to that check, which is every session made with the default checks, is invalidated
    /// at once, as Consul does, long before its TTL would run out: keys released or deleted per
    /// its behavior, lock-delay started. Sessions made without `serfHealth` (`NodeChecks: []`,
    /// TTL only) live on, and until [`recover_node`](Self::recover_node) a session create
    /// that names `serfHealth` answers 500 `Check 'serfHealth' is in critical state`. Returns
    /// how many sessions went. Seen in the reliability lab (client agents frozen, cut off or
    /// killed); applies even without a leader, as the operator actions do.
    pub fn fail_node(&mut self, now: Instant) -> usize {
        self.run_until(now);
        self.node_failed = true;
        let bound: Vec<[u8; 16]> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.checks
                    .iter()
                    .chain(s.node_checks.iter().flatten())
                    .any(|c| c == session::SERF_HEALTH)
            })
            .map(|(id, _)| *id)
            .collect();
        if bound.is_empty() {
            return 0;
        }
        let idx = self.raft();
        for id in &bound {
            self.invalidate_session(idx, *id);
        }
        self.wake_changed();
        bound.len()
    }

    /// Ends [`fail_node`](Self::fail_node): the node's `serfHealth` passes again and sessions
    /// bound to it can be made.
    pub fn recover_node(&mut self, now: Instant) {
        self.run_until(now);
        self.node_failed = false;
    }

    /// Operator action: deletes `key` (whoever holds it) as a plain `DELETE` would. Returns
    /// whether it existed.
    pub fn delete_key(&mut self, now: Instant, key: &str) -> bool {
        self.run_until(now);
        if !self.kv.contains_key(key) {
            return false;
        }
        let idx = self.raft();
        self.kvs_delete(idx, key);
        self.wake_changed();
        true
    }

    /// Operator action: writes `key` as a plain `PUT ?flags=` would: the holder (if any) stays,
    /// and, as with Consul, `LockIndex` is reset to 0.
    pub fn put_key(&mut self, now: Instant, key: &str, flags: u64, value: &[u8]) {
        self.run_until(now);
        let idx = self.raft();
        self.kvs_set(idx, key, flags, value.to_vec());
        self.wake_changed();
    }

    /// Operator action: in one transaction, deletes `key` (whoever holds it) and locks it anew,
    /// with the same flags and value, by the live session `session`, as a `consul txn` of a
    /// `delete` and a `lock` would: the key never shows free, so its holder learns it lost only
    /// by reading who holds it. Returns whether the lock took (`false` for a missing key or a
    /// session that is not live).
    pub fn take_over(&mut self, now: Instant, key: &str, session: &str) -> bool {
        self.run_until(now);
        let known = session::uuid16(session).is_some_and(|id| self.sessions.contains_key(&id));
        let Some(entry) = self.kv.get(key).filter(|_| known) else {
            return false;
        };
        let (flags, value) = (entry.flags, entry.value.clone());
        let idx = self.raft();
        self.kvs_delete(idx, key);
        let took = self.kvs_lock(idx, key, session, flags, value) == Ok(true);
        self.wake_changed();
        took
    }

    /// Fault injection: loses (`false`) or regains (`true`) the cluster leader at `now`.
    ///
    /// Without a leader every request that Consul forwards to the leader (writes, session
    /// calls, and reads without `stale`) answers 500 `No cluster leader`; `stale` reads are
    /// served, with `X-Consul-KnownLeader: false` and the time since the loss as
    /// `X-Consul-LastContact`; session TTL timers stop. Parked reads stay parked. When a leader is
    /// back, every TTL session gets a full new TTL from `now`, as Consul's new leader does.
    pub fn set_leader(&mut self, now: Instant, leader: bool) {
        self.run_until(now);
        if leader == self.leader {
            return;
        }
        self.leader = leader;
        if leader {
            let ids: Vec<[u8; 16]> = self.sessions.keys().copied().collect();
            for id in ids {
                self.reset_session_timer(id);
            }
        } else {
            self.leader_lost_at = self.now;
            for session in self.sessions.values_mut() {
                session.expires_at = None;
            }
        }
    }

    /// The entry stored under `key`.
    pub fn kv(&self, key: &str) -> Option<&SimEntry> {
        self.kv.get(key)
    }

    /// Every entry, in key order.
    pub fn kv_entries(&self) -> impl Iterator<Item = &SimEntry> {
        self.kv.values()
    }

    /// The live sessions, in ID order.
    pub fn sessions(&self) -> impl Iterator<Item = &SimSession> {
        self.sessions.values()
    }

    /// The live session `id` (any UUID spelling Consul accepts).
    pub fn session(&self, id: &str) -> Option<&SimSession> {
        session::uuid16(id).and_then(|uuid| self.sessions.get(&uuid))
    }

    /// The Raft index: that of the last applied write.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The latest time seen.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Whether there is a leader.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Until when `key` refuses acquires (a past instant once the delay is over).
    pub fn lock_delay_until(&self, key: &str) -> Option<Instant> {
        self.lock_delays.get(key).copied()
    }

    /// How many reads are parked.
    pub fn parked_queries(&self) -> usize {
        self.parked.len()
    }

    /// Takes the next Raft index.
    fn raft(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn last_contact_ms(&self) -> u64 {
        if self.leader {
            0
        } else {
            u64::try_from(
                self.now
                    .saturating_duration_since(self.leader_lost_at)
                    .as_millis(),
            )
            .unwrap_or(u64::MAX)
        }
    }

    fn pretty(&self, query: &Query) -> bool {
        self.config.pretty_json || query.has("pretty")
    }

    /// The leader and datacenter checks of an RPC: `Err` with Consul's 500.
    fn forward(&self, query: &Query, needs_leader: bool) -> Result<(), Reply> {
        let dc = query.get("dc");
        if !dc.is_empty() && dc != self.config.datacenter {
            return Err(Reply::text(500, "No path to datacenter"));
        }
        if needs_leader && !self.leader {
            return Err(Reply::text(500, "No cluster leader"));
        }
        Ok(())
    }

    /// Consul's `parseEntMeta` in the open-source build: any namespace is refused.
    fn check_namespace(request: &http::Request<Vec<u8>>, query: &Query) -> Result<(), Reply> {
        let header = request
            .headers()
            .get("X-Consul-Namespace")
            .is_some_and(|v| !v.as_bytes().is_empty());
        if header {
            return Err(Reply::text(
                400,
                "Bad request: Invalid header: \"X-Consul-Namespace\" - Namespaces are a Consul Enterprise feature",
            ));
        }
        if !query.get("ns").is_empty() {
            return Err(Reply::text(
                400,
                "Bad request: Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
            ));
        }
        Ok(())
    }

    /// Consul's `parse`: consistency, then `wait` and `index`.
    fn parse_options(query: &Query) -> Result<QueryOptions, Reply> {
        let mut stale = query.has("stale");
        let consistent = query.has("consistent");
        let cached = query.has("cached");
        let max_stale = query.get("max_stale");
        if !max_stale.is_empty() {
            match gotime::parse_duration(max_stale) {
                Ok(d) => stale |= d > 0,
                Err(_) => {
                    return Err(Reply::text(
                        400,
                        format!("Invalid max_stale value {}", wire::go_quote(max_stale)),
                    ));
                }
            }
        }
        if stale && consistent {
            return Err(Reply::text(
                400,
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        if cached && consistent {
            return Err(Reply::text(
                400,
                "Cannot specify ?cached with ?consistent, conflicting semantics.",
            ));
        }
        let mut options = QueryOptions {
            stale,
            wait: None,
            min_index: 0,
        };
        let wait = query.get("wait");
        if !wait.is_empty() {
            match gotime::parse_duration(wait) {
                Ok(d) => options.wait = Some(d),
                Err(_) => return Err(Reply::text(400, "Invalid wait time")),
            }
        }
        let index = query.get("index");
        if !index.is_empty() {
            match wire::parse_uint(index) {
                Ok(i) => options.min_index = i,
                Err(_) => return Err(Reply::text(400, "Invalid index")),
            }
        }
        Ok(options)
    }

    fn dispatch(&mut self, request: &http::Request<Vec<u8>>) -> Outcome {
        let method = request.method();
        let raw_path = request.uri().path();
        let raw_query = request.uri().query().unwrap_or("");
        let Some(path) = wire::decode_path(raw_path).filter(|p| p.starts_with('/')) else {
            let mut reply = Reply::text(400, "400 Bad Request");
            reply.header("Connection", "close");
            return reply.into();
        };
        let cleaned = wire::clean_path(&path);
        if cleaned != path {
            return wire::redirect(method, &cleaned, raw_query).into();
        }
        let (endpoint, rest) = match route(&path) {
            Route::NotFound => return Reply::empty(404).into(),
            Route::Redirect(to) => return wire::redirect(method, &to, raw_query).into(),
            Route::Endpoint(endpoint, rest) => (endpoint, rest),
        };
        if *method == http::Method::OPTIONS {
            let mut reply = Reply::empty(200);
            reply.header("Allow", endpoint.allow_header());
            return reply.into();
        }
        if !endpoint.methods().contains(&method.as_str()) {
            let mut reply = Reply::text(405, format!("method {method} not allowed"));
            reply.header("Allow", endpoint.allow_header());
            return reply.into();
        }
        let Some(query) = Query::parse(raw_query) else {
            return Reply::empty(500).into();
        };
        let result = match endpoint {
            Endpoint::Kv => self.kv_endpoint(request, rest, &query),
            Endpoint::SessionCreate => self.session_create(request, &query).map(Outcome::Reply),
            Endpoint::SessionRenew => self.session_renew(request, rest, &query).map(Outcome::Reply),
            Endpoint::SessionDestroy => self.session_destroy(request, rest, &query).map(Outcome::Reply),
            Endpoint::SessionInfo => self.session_info(request, rest, &query),
            Endpoint::SessionList => self.session_list(request, &query),
            Endpoint::Txn => self.txn_endpoint(request, &query).map(Outcome::Reply),
            Endpoint::StatusLeader => {
                let leader = if self.leader { "127.0.0.1:8300" } else { "" };
                Ok(Reply::json(&json::Json::str(leader), self.pretty(&query)).into())
            }
        };
        match result {
            Ok(outcome) => outcome,
            Err(reply) => reply.into(),
        }
    }
}
