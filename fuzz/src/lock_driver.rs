//! Drives a `LockMachine` with an arbitrary run: options, then operations, replies (plausible
//! and hostile, real captured ones, arbitrary bytes), transport errors, timeouts and time jumps.
//! After every step the invariants are checked: the checker's, with the lock's own rules
//! (`consul_lock_checker::lock`: only a lock's requests, `Acquired` only on a live grant of a lock
//! transaction carrying that entry's indexes, nothing released while held).

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use consul_lock_core::api::{ClientConfig, SessionId};
use consul_lock_core::machine::{
    LOCK_FLAG_VALUE, LockMachine, LockOptions, Reply, SEMAPHORE_FLAG_VALUE, SessionChoice,
};

use crate::arb_reply::{self, KNOWN_SESSIONS};
pub use crate::driver::{EXISTING, Millis, Op, Plausible, Spec};
use crate::driver::{Model, SessionAgent, read_headers, response, write_reply};
use crate::request::{Kind, Sent};

/// The lock key.
pub const KEY: &str = "fuzz/lock";

/// The options: the parts a run varies.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Use the caller's session [`EXISTING`] rather than create one.
    pub existing: bool,
    /// Go's `LockTryOnce`.
    pub try_once: bool,
    /// Go's `MonitorRetries` (`None`: bear failures while renewals succeed).
    pub monitor_retries: Option<u8>,
    /// Session TTL, 10..=60 s.
    pub ttl_secs: u8,
    /// Lock wait time, 1..=30 s.
    pub wait_secs: u8,
    /// Lock-delay asked for the session, 0..=60 s.
    pub lock_delay_secs: Option<u8>,
    /// The jitter seed.
    pub seed: u64,
    /// The value written.
    pub value: Vec<u8>,
}

impl<'a> Arbitrary<'a> for Setup {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Setup> {
        Ok(Setup {
            existing: u.arbitrary()?,
            try_once: u.arbitrary()?,
            monitor_retries: if u.arbitrary()? {
                Some(u.int_in_range(0..=4)?)
            } else {
                None
            },
            ttl_secs: u.int_in_range(10..=60)?,
            wait_secs: u.int_in_range(1..=30)?,
            lock_delay_secs: if u.arbitrary()? {
                Some(u.int_in_range(0..=60)?)
            } else {
                None
            },
            seed: u.arbitrary()?,
            value: {
                let len = u.int_in_range(0..=16)?;
                u.bytes(len)?.to_vec()
            },
        })
    }
}

impl Setup {
    /// The lock options.
    pub fn options(&self) -> LockOptions {
        let mut o = match LockOptions::new(KEY) {
            Ok(o) => o,
            Err(e) => panic!("fuzz harness bug: {e}"),
        };
        if self.existing {
            o.hold.session =
                SessionChoice::Existing(SessionId::new(EXISTING).unwrap_or_else(|e| panic!("{e}")));
        } else if let Some(s) = o.hold.session_options_mut() {
            s.ttl = Duration::from_secs(u64::from(self.ttl_secs));
            s.lock_delay = self.lock_delay_secs.map(|d| Duration::from_secs(u64::from(d)));
            // A lock-delay of 0 leaves a health-bound session nothing to hold by.
            if self.lock_delay_secs == Some(0) {
                *s = s.clone().ttl_only();
            }
        }
        o.hold.try_once = self.try_once;
        o.hold.monitor_retries = self.monitor_retries.map(u32::from);
        o.hold.wait_time = Duration::from_secs(u64::from(self.wait_secs));
        o.hold.seed = self.seed;
        o.hold.value = self.value.clone();
        o
    }
}

/// The lock's agent: plausible replies.
#[derive(Clone, Debug, Default)]
pub struct LockModel {
    sessions: SessionAgent,
    /// The last `LockIndex` a plausible read or grant showed (to make it go up, or down).
    last_lock_index: u64,
    /// The Raft index of the agent's last plausible grant: realistic grants move it forward.
    raft_index: u64,
    /// The session and entry (`LockIndex`, `ModifyIndex`) of the last realistic grant: Consul
    /// answers a holder taking its key again with the entry unchanged.
    holder: Option<(String, u64, u64)>,
}

fn ours(m: &LockMachine) -> String {
    m.session()
        .id()
        .map_or_else(|| EXISTING.to_owned(), |s| s.to_string())
}

fn kv_json(session: Option<&str>, flags: u64, lock_index: u64, modify_index: u64) -> String {
    entry_json(KEY, session, flags, lock_index, modify_index)
}

fn entry_json(key: &str, session: Option<&str>, flags: u64, lock_index: u64, modify_index: u64) -> String {
    let session = session.map_or(String::new(), |s| {
        format!(",\"Session\":{}", arb_reply::json_string(s))
    });
    format!(
        "{{\"LockIndex\":{lock_index},\"Key\":{},\"Flags\":{flags},\"Value\":null{session},\
         \"CreateIndex\":1,\"ModifyIndex\":{modify_index}}}",
        arb_reply::json_string(key)
    )
}

/// A lock transaction's 200: `{"Results":[{"KV":<entry>}],"Errors":null}`.
fn locked(entry: &str) -> Reply {
    response(
        200,
        &[],
        format!("{{\"Results\":[{{\"KV\":{entry}}}],\"Errors\":null}}"),
    )
}

/// A lock transaction's 409 with Consul's words `what`.
fn refused(what: &str) -> Reply {
    response(
        409,
        &[],
        format!(
            "{{\"Results\":null,\"Errors\":[{{\"OpIndex\":0,\"What\":{}}}]}}",
            arb_reply::json_string(what)
        ),
    )
}

/// Consul's 409 when another session holds the key.
fn lock_held() -> Reply {
    refused(&format!("failed to lock key \"{KEY}\", lock is already held"))
}

impl LockModel {
    /// A plausible reply to a lock transaction sent with `session`: granted with realistic or
    /// arbitrary indices, granted to another session or with a mangled entry, each of Consul's
    /// refusals (409) and unknown ones, other statuses, malformed bodies.
    fn lock_txn(&mut self, session: &str, p: &Plausible) -> Reply {
        let (b, c, n) = (p.b, usize::from(p.c), p.n);
        let known = KNOWN_SESSIONS[n as usize % KNOWN_SESSIONS.len()];
        match p.a % 16 {
            0 | 1 => lock_held(),
            2 => refused(&format!("failed to lock key \"{KEY}\" due to lock delay")),
            3 => refused(&format!("invalid session \"{session}\"")),
            // A permission refusal (fatal, typed), and refusals core doesn't know: passed on as
            // `Other`, which ends the attempt rather than loop unseen.
            4 => match c % 4 {
                0 => refused("rpc error making call: Permission denied"),
                1 => refused(""),
                2 => refused(&"x".repeat(300)),
                _ => response(409, &[], "{\"Results\":null,\"Errors\":[{\"OpIndex\":0}]}"),
            },
            5 => match c % 7 {
                0 => response(500, &[], "No cluster leader"),
                1 => response(403, &[], "Permission denied"),
                // The plain acquire's wording, in a status error.
                2 => response(500, &[], format!("invalid session \"{session}\"")),
                3 => response(400, &[], "Failed to parse body: unexpected EOF"),
                4 => response(413, &[], "Transaction contains too many operations"),
                5 => response(429, &[], "rate limit exceeded"),
                _ => response(503, &[], ""),
            },
            6 => match c % 10 {
                0 => response(200, &[], "{}"),
                1 => response(200, &[], "{\"Results\":null,\"Errors\":null}"),
                2 => response(200, &[], "{\"Results\":[{\"KV\":null}],\"Errors\":null}"),
                3 => response(200, &[], "{\"Results\":[],\"Errors\":null}"),
                4 => response(409, &[], "{\"Results\":null,\"Errors\":[]}"),
                5 => response(409, &[], "{\"Results\":null,\"Errors\":null}"),
                6 => response(200, &[], "true"),
                // A grant cut short, and a grant's body under a 409.
                7 => response(200, &[], "{\"Results\":[{\"KV\":{\"LockIndex\":1,\"Key\""),
                8 => response(
                    409,
                    &[],
                    format!(
                        "{{\"Results\":[{{\"KV\":{}}}],\"Errors\":null}}",
                        kv_json(Some(session), LOCK_FLAG_VALUE, 1, 2)
                    ),
                ),
                _ => response(
                    200,
                    &[],
                    "{\"Results\":[{\"KV\":{\"Key\":\"fuzz/lock\",\"Value\":\"%%%\"}}]}",
                ),
            },
            // Granted, but the entry is someone else's or no one's: a contradicting agent.
            7 => {
                let holder = match c % 4 {
                    0 => Some("other"),
                    1 => Some(known),
                    2 => Some(""),
                    _ => None,
                };
                locked(&kv_json(holder, LOCK_FLAG_VALUE, n % 8, n % 1000))
            }
            // Granted to us with a mangled entry: foreign flags, another key, indices at the
            // limits, a second result, errors alongside.
            8 => match c % 7 {
                0 => locked(&kv_json(Some(session), SEMAPHORE_FLAG_VALUE, 1, n)),
                1 => locked(&kv_json(Some(session), n, 1, n)),
                2 => locked(&entry_json("fuzz/other", Some(session), LOCK_FLAG_VALUE, 1, n)),
                3 => locked(&kv_json(Some(session), LOCK_FLAG_VALUE, 0, 0)),
                4 => locked(&kv_json(Some(session), LOCK_FLAG_VALUE, u64::MAX, u64::MAX)),
                5 => {
                    let ours = kv_json(Some(session), LOCK_FLAG_VALUE, 1, n);
                    let theirs = kv_json(Some("other"), LOCK_FLAG_VALUE, 2, n);
                    response(
                        200,
                        &[],
                        format!("{{\"Results\":[{{\"KV\":{ours}}},{{\"KV\":{theirs}}}],\"Errors\":null}}"),
                    )
                }
                _ => response(
                    200,
                    &[],
                    format!(
                        "{{\"Results\":[{{\"KV\":{}}}],\"Errors\":[{{\"OpIndex\":0,\"What\":\"lock is already held\"}}]}}",
                        kv_json(Some(session), LOCK_FLAG_VALUE, 1, n)
                    ),
                ),
            },
            // Granted to us, as Consul would: a new holder gets the next LockIndex at a new Raft
            // index; the holder taking its key again gets the entry unchanged. Sometimes any
            // indices (`b`), or the Raft index going back.
            _ => {
                let (lock_index, modify_index) = match (b % 8, &self.holder) {
                    (0, _) => (n, n.rotate_left(17)),
                    (1, _) => (self.last_lock_index, self.raft_index / 2),
                    (2..=4, Some((h, li, mi))) if h == session => (*li, *mi),
                    _ => {
                        self.raft_index = self.raft_index.saturating_add(1 + n % 16);
                        (self.last_lock_index.saturating_add(1), self.raft_index)
                    }
                };
                self.last_lock_index = lock_index;
                self.holder = Some((session.to_owned(), lock_index, modify_index));
                locked(&kv_json(Some(session), LOCK_FLAG_VALUE, lock_index, modify_index))
            }
        }
    }
}

impl Model for LockModel {
    type M = LockMachine;
    fn plausible(&mut self, m: &LockMachine, sent: &Sent, p: &Plausible) -> Reply {
        if let Some(reply) = self.sessions.plausible(sent, p) {
            return reply;
        }
        let (a, b, c, n) = (usize::from(p.a), p.b, usize::from(p.c), p.n);
        let known = KNOWN_SESSIONS[n as usize % KNOWN_SESSIONS.len()];
        match sent.kind() {
            Kind::Release { .. } | Kind::Delete { .. } => write_reply(p.a),
            Kind::LockTxn { session, .. } => self.lock_txn(&session, p),
            Kind::Get { index, .. } => {
                let headers = read_headers(index.unwrap_or(0), b, n);
                if a % 10 == 0 {
                    return response(404, &headers, "");
                }
                let ours = ours(m);
                let session = match c % 8 {
                    0 => None,
                    1..=4 => Some(ours.as_str()),
                    5 => Some("other"),
                    6 => Some(known),
                    _ => Some(""),
                };
                let flags = match (c / 8) % 8 {
                    0 => 0,
                    1 => SEMAPHORE_FLAG_VALUE,
                    2 => n,
                    _ => LOCK_FLAG_VALUE,
                };
                let lock_index = match (c / 64) % 4 {
                    0 => n,
                    1 => self.last_lock_index.saturating_sub(1),
                    2 => 0,
                    _ => self.last_lock_index.saturating_add(1 + n % 2),
                };
                self.last_lock_index = lock_index;
                let pair = kv_json(session, flags, lock_index, n % 100);
                let body = match a % 16 {
                    1 => format!("[{pair},{pair}]"),
                    2 => "[]".to_owned(),
                    3 => "null".to_owned(),
                    _ => format!("[{pair}]"),
                };
                response(200, &headers, body)
            }
            _ => response(400, &[], "?"),
        }
    }

    fn benign(&mut self, sent: &Sent) -> Reply {
        if let Some(reply) = self.sessions.benign(sent) {
            return reply;
        }
        match sent.kind() {
            Kind::Release { .. } | Kind::Delete { .. } => response(200, &[], "true"),
            // Held by someone else: an idle agent grants nothing the wind-down must give back.
            Kind::LockTxn { .. } => lock_held(),
            Kind::Get { index, .. } => response(
                404,
                &[("X-Consul-Index", index.unwrap_or(0).saturating_add(1).to_string())],
                "",
            ),
            _ => response(400, &[], "?"),
        }
    }
}

/// The lock's driver.
pub type Driver = crate::driver::Driver<LockModel>;

/// The `lock_machine` target.
pub struct LockTarget;

impl crate::driver::Target for LockTarget {
    type Setup = Setup;
    type Model = LockModel;
    const NAME: &'static str = "lock_machine";

    fn driver(setup: &Setup) -> Driver {
        let m = match LockMachine::new(ClientConfig::default(), setup.options()) {
            Ok(m) => m,
            Err(e) => panic!("fuzz harness bug: invalid options: {e}"),
        };
        Driver::new(m, LockModel::default())
    }
}

/// A driver for a machine with `setup`'s options.
pub fn driver(setup: &Setup) -> Driver {
    <LockTarget as crate::driver::Target>::driver(setup)
}

/// Runs a whole input: the setup, up to `max_ops` operations, the wind-down.
pub fn run(data: &[u8], max_ops: usize) {
    crate::driver::run::<LockTarget>(data, max_ops);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::target_tests;
    use consul_lock_core::machine::LockEvent;

    #[test]
    fn random_runs_keep_the_invariants() {
        target_tests::random_runs::<LockTarget>();
    }

    /// Writes seeds for the `lock_machine` target: the first random inputs (SplitMix64 bytes,
    /// deterministic) whose runs end in each outcome. `cargo test --lib -- --ignored write_seeds`.
    #[test]
    #[ignore = "writes fuzz/seeds/lock_machine"]
    fn write_seeds() {
        target_tests::seeds::<LockTarget>(1024);
    }

    /// Replays one seed of `random_runs_keep_the_invariants`: `FUZZ_SEED=n FUZZ_TRACE=1`.
    #[test]
    #[ignore = "replays FUZZ_SEED"]
    fn replay_seed() {
        target_tests::replay_seed::<LockTarget>();
    }

    /// Replays a file (a crash, a corpus input): `FUZZ_INPUT=path FUZZ_TRACE=1`.
    #[test]
    #[ignore = "replays FUZZ_INPUT"]
    fn replay_input() {
        target_tests::replay_input::<LockTarget>();
    }

    #[test]
    fn a_plausible_agent_gets_the_lock_held() {
        // Lock, then answer everything plausibly with the "all is well" choices.
        let setup = Setup {
            existing: false,
            try_once: false,
            monitor_retries: None,
            ttl_secs: 15,
            wait_secs: 15,
            lock_delay_secs: None,
            seed: 1,
            value: Vec::new(),
        };
        let mut d = driver(&setup);
        d.step(&Op::Lock);
        // `a` = 29 picks the healthy answer of every kind: a session (29 % 8), a renew with
        // 15 s (29 % 10), a grant with realistic indices (29 % 16), writes `true` (29 % 6).
        let well = Plausible {
            a: 29,
            b: 5,
            c: 8 * 3 + 64 * 3 + 1,
            n: 3,
        };
        for _ in 0..6 {
            d.step(&Op::Reply(0, Spec::Plausible(well.clone())));
        }
        assert!(
            d.events().iter().any(|e| matches!(e, LockEvent::Acquired(_))),
            "{:?}",
            d.events()
        );
        d.step(&Op::Advance(Millis(60_000)));
        d.wind_down();
    }
}

/// What the inputs of a corpus reach: `FUZZ_CORPUS=corpus/lock_machine cargo test --release
/// --lib -- --ignored corpus_outcomes --nocapture`.
#[cfg(test)]
mod corpus {
    use super::LockTarget;
    use crate::driver::target_tests;

    #[test]
    #[ignore = "reads FUZZ_CORPUS"]
    fn corpus_outcomes() {
        target_tests::corpus::<LockTarget>();
    }
}
