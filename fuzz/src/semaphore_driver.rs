//! Drives a `SemaphoreMachine` with an arbitrary run, as `lock_driver` drives the lock (the same
//! operations, time steps and reply kinds, the same invariants of [`crate::driver`]), with a
//! semaphore's agent: plausible replies are listings of the prefix with other holders, our
//! contender key missing, released or held by another session, a `.lock` that is missing, what
//! we last wrote, of another limit, garbage, a map of thousands of holders, under foreign flags,
//! with a ModifyIndex going backwards; check-and-set refusals in storms; 404s and 500s.
//!
//! The semaphore's own invariants are the checker's `consul_lock_checker::semaphore` rules (the
//! requests a semaphore sends, when `Acquired` may come, what gives a slot up).

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use consul_lock_core::api::{ClientConfig, SessionId};
use consul_lock_core::machine::{
    LOCK_FLAG_VALUE, Reply, SEMAPHORE_FLAG_VALUE, SemaphoreMachine, SemaphoreOptions, SemaphoreState,
    SessionChoice,
};

use crate::arb_reply::{self, KNOWN_SESSIONS};
pub use crate::driver::{EXISTING, Millis, Op, Plausible, Spec};
use crate::driver::{Model, SessionAgent, acquire_reply, read_headers, response, write_reply};
use crate::request::{Kind, Sent};

/// The semaphore's prefix.
pub const PREFIX: &str = "fuzz/sem";
/// Its `.lock`.
pub const LOCK: &str = "fuzz/sem/.lock";

/// The options: the parts a run varies.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Use the caller's session [`EXISTING`] rather than create one.
    pub existing: bool,
    /// Give up after one wait.
    pub try_once: bool,
    /// Go's `MonitorRetries` (`None`: bear failures while renewals succeed).
    pub monitor_retries: Option<u8>,
    /// The number of slots, 1..=4.
    pub limit: u8,
    /// Session TTL, 10..=60 s.
    pub ttl_secs: u8,
    /// Wait time, 1..=30 s.
    pub wait_secs: u8,
    /// The jitter seed.
    pub seed: u64,
    /// The contender key's value.
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
            limit: u.int_in_range(1..=4)?,
            ttl_secs: u.int_in_range(10..=60)?,
            wait_secs: u.int_in_range(1..=30)?,
            seed: u.arbitrary()?,
            value: {
                let len = u.int_in_range(0..=16)?;
                u.bytes(len)?.to_vec()
            },
        })
    }
}

impl Setup {
    /// The semaphore options.
    pub fn options(&self) -> SemaphoreOptions {
        let mut o = match SemaphoreOptions::new(PREFIX, u32::from(self.limit)) {
            Ok(o) => o,
            Err(e) => panic!("fuzz harness bug: {e}"),
        };
        if self.existing {
            o.hold.session =
                SessionChoice::Existing(SessionId::new(EXISTING).unwrap_or_else(|e| panic!("{e}")));
        } else if let Some(s) = o.hold.session_options_mut() {
            s.ttl = Duration::from_secs(u64::from(self.ttl_secs));
        }
        o.hold.try_once = self.try_once;
        o.hold.monitor_retries = self.monitor_retries.map(u32::from);
        o.hold.wait_time = Duration::from_secs(u64::from(self.wait_secs));
        o.hold.seed = self.seed;
        o.hold.value = self.value.clone();
        o
    }
}

/// The semaphore's agent: plausible replies.
#[derive(Clone, Debug)]
pub struct SemaphoreModel {
    sessions: SessionAgent,
    limit: u32,
    /// The `.lock`'s value as a coherent agent has it: what the last check-and-set answered `true`
    /// wrote.
    stored: Option<Vec<u8>>,
    /// Its ModifyIndex.
    modify: u64,
}

impl SemaphoreModel {
    /// The model for a semaphore of `limit`.
    pub fn new(limit: u32) -> SemaphoreModel {
        SemaphoreModel {
            sessions: SessionAgent::default(),
            limit,
            stored: None,
            modify: 5,
        }
    }
}

fn ours(m: &SemaphoreMachine) -> String {
    m.session()
        .id()
        .map_or_else(|| EXISTING.to_owned(), |s| s.to_string())
}

/// A KV entry's JSON; `value: None` writes `null`.
fn entry(key: &str, flags: u64, value: Option<&[u8]>, session: Option<&str>, modify_index: u64) -> String {
    let value = value.map_or_else(
        || "null".to_owned(),
        |v| format!("\"{}\"", base64::engine::general_purpose::STANDARD.encode(v)),
    );
    let session = session.map_or(String::new(), |s| {
        format!(",\"Session\":{}", arb_reply::json_string(s))
    });
    format!(
        "{{\"LockIndex\":1,\"Key\":{},\"Flags\":{flags},\"Value\":{value}{session},\"CreateIndex\":1,\
         \"ModifyIndex\":{modify_index}}}",
        arb_reply::json_string(key)
    )
}

fn state(limit: u32, holders: impl IntoIterator<Item = String>) -> Vec<u8> {
    SemaphoreState {
        limit,
        holders: holders.into_iter().map(|h| (h, true)).collect(),
    }
    .encode()
}

impl SemaphoreModel {
    /// The other contenders of a listing: `o-<i>`, live (holding their key) or not, as `n` says.
    fn others(n: u64) -> Vec<(String, bool)> {
        let count = (n >> 8) % 4;
        (0..count)
            .map(|i| (format!("o-{i}"), (n >> (10 + i)) & 1 == 0))
            .collect()
    }

    /// The `.lock` entry, hostile as `c` and `n` choose (`None`: missing).
    fn lock_entry(&self, ours: &str, c: u8, n: u64) -> Option<String> {
        let limit = self.limit;
        let others: Vec<String> = Self::others(n)
            .into_iter()
            .filter(|(_, live)| *live)
            .map(|(s, _)| s)
            .collect();
        let mut holders: Vec<String> = others.iter().take(limit as usize).cloned().collect();
        if (n >> 16) & 1 == 1 {
            holders.push(ours.to_owned());
        }
        if (n >> 17) & 1 == 1 {
            holders.push("dead-1".to_owned());
        }
        let value: Option<Vec<u8>> = match (c / 8) % 8 {
            0 => return None,
            1..=3 => Some(self.stored.clone()?),
            4 => Some(state(limit, holders)),
            5 => {
                let wrong = match (n >> 18) % 3 {
                    0 => 0,
                    1 => limit + 1,
                    _ => u32::MAX,
                };
                Some(state(wrong, holders))
            }
            6 => Some(match (n >> 28) % 13 {
                0 => b"{".to_vec(),
                1 => b"[]".to_vec(),
                2 => b"1".to_vec(),
                3 => br#"{"Limit":-1}"#.to_vec(),
                4 => br#"{"Limit":1.5,"Holders":{}}"#.to_vec(),
                5 => br#"{"Holders":[]}"#.to_vec(),
                6 => format!(
                    r#"{{"Limit":{limit},"Holders":{{{}:1}}}}"#,
                    arb_reply::json_string(ours)
                )
                .into_bytes(),
                7 => b"null".to_vec(),
                8 => format!(
                    r#"{{"limit":{limit},"holders":{{{}:true}}}}"#,
                    arb_reply::json_string(ours)
                )
                .into_bytes(),
                9 => format!(
                    r#"{{"Limit":{limit},"Holders":{{{}:false}}}}"#,
                    arb_reply::json_string(ours)
                )
                .into_bytes(),
                10 => format!(
                    r#"{{"Limit":{limit},"Holders":{{{}:null}}}}"#,
                    arb_reply::json_string(ours)
                )
                .into_bytes(),
                11 => Vec::new(),
                _ => vec![0xff, 0xfe, b'{'],
            }),
            _ => {
                // Hundreds (sometimes thousands: they cost time) of holders: dead ones, with or
                // without us, or every live other.
                let count = if (n >> 44).is_multiple_of(8) { 2000 } else { 200 };
                let mut many: Vec<String> = (0..count).map(|i| format!("h-{i}")).collect();
                match (n >> 20) % 3 {
                    0 => {}
                    1 => many.push(ours.to_owned()),
                    _ => many = others.clone(),
                }
                Some(state(limit, many))
            }
        };
        let flags = match (c / 64) % 4 {
            0..=2 => SEMAPHORE_FLAG_VALUE,
            _ => [0, LOCK_FLAG_VALUE, n][(n % 3) as usize],
        };
        let modify = match (n >> 24) % 4 {
            0 | 1 => self.modify,
            2 => self.modify.saturating_sub(1 + n % 3),
            _ => n % 100,
        };
        let value = value.filter(|v| !v.is_empty() || (n >> 30) & 1 == 0);
        Some(entry(LOCK, flags, value.as_deref(), None, modify))
    }

    /// A listing of the prefix: our contender key, the others', the `.lock`.
    fn listing(&self, ours: &str, c: u8, n: u64) -> Vec<String> {
        let mut entries = Vec::new();
        let key = format!("{PREFIX}/{ours}");
        let known = KNOWN_SESSIONS[(n >> 4) as usize % KNOWN_SESSIONS.len()];
        match c % 8 {
            0 => {}
            1 => entries.push(entry(&key, SEMAPHORE_FLAG_VALUE, None, None, 3)),
            2 => entries.push(entry(&key, SEMAPHORE_FLAG_VALUE, None, Some(known), 3)),
            _ => {
                let flags = if (n >> 40).is_multiple_of(8) {
                    LOCK_FLAG_VALUE
                } else {
                    SEMAPHORE_FLAG_VALUE
                };
                entries.push(entry(&key, flags, Some(b"v"), Some(ours), 3));
            }
        }
        for (other, live) in Self::others(n) {
            let session = live.then_some(other.as_str());
            entries.push(entry(
                &format!("{PREFIX}/{other}"),
                SEMAPHORE_FLAG_VALUE,
                None,
                session,
                4,
            ));
        }
        entries.extend(self.lock_entry(ours, c, n));
        entries
    }
}

impl Model for SemaphoreModel {
    type M = SemaphoreMachine;
    fn plausible(&mut self, m: &SemaphoreMachine, sent: &Sent, p: &Plausible) -> Reply {
        if let Some(reply) = self.sessions.plausible(sent, p) {
            return reply;
        }
        let ours = ours(m);
        let (a, b, c, n) = (p.a, p.b, p.c, p.n);
        match sent.kind() {
            Kind::Acquire { .. } => acquire_reply(a, &ours),
            Kind::CasPut { cas, .. } => match a % 8 {
                0..=2 => response(200, &[], "false"),
                3 => response(500, &[], "No cluster leader"),
                4 => response(403, &[], "Permission denied"),
                _ => {
                    self.stored = Some(sent.body.clone());
                    self.modify = self.modify.max(cas).saturating_add(1);
                    response(200, &[], "true")
                }
            },
            Kind::Remove { .. } | Kind::Delete { .. } => write_reply(a),
            Kind::Get { .. } => {
                let headers = read_headers(0, b, n);
                match self.lock_entry(&ours, c, n) {
                    Some(lock) if a % 8 != 0 => response(200, &headers, format!("[{lock}]")),
                    _ => response(404, &headers, ""),
                }
            }
            Kind::List { index, .. } => {
                let headers = read_headers(index.unwrap_or(0), b, n);
                let entries = self.listing(&ours, c, n);
                let body = match a % 16 {
                    0 => return response(404, &headers, ""),
                    1 => "[]".to_owned(),
                    2 => "null".to_owned(),
                    3 => format!("[{},{}]", entries.join(","), entries.join(",")),
                    _ if entries.is_empty() => return response(404, &headers, ""),
                    _ => format!("[{}]", entries.join(",")),
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
            Kind::CasPut { .. } | Kind::Remove { .. } | Kind::Delete { .. } => response(200, &[], "true"),
            Kind::Acquire { .. } => response(200, &[], "false"),
            Kind::Get { .. } => response(404, &[("X-Consul-Index", "1".to_owned())], ""),
            Kind::List { index, .. } => response(
                404,
                &[("X-Consul-Index", index.unwrap_or(0).saturating_add(1).to_string())],
                "",
            ),
            _ => response(400, &[], "?"),
        }
    }
}

/// The semaphore's driver.
pub type Driver = crate::driver::Driver<SemaphoreModel>;

/// The `semaphore_machine` target.
pub struct SemaphoreTarget;

impl crate::driver::Target for SemaphoreTarget {
    type Setup = Setup;
    type Model = SemaphoreModel;
    const NAME: &'static str = "semaphore_machine";

    fn driver(setup: &Setup) -> Driver {
        let m = match SemaphoreMachine::new(ClientConfig::default(), setup.options()) {
            Ok(m) => m,
            Err(e) => panic!("fuzz harness bug: invalid options: {e}"),
        };
        Driver::new(m, SemaphoreModel::new(u32::from(setup.limit)))
    }
}

/// A driver for a machine with `setup`'s options.
pub fn driver(setup: &Setup) -> Driver {
    <SemaphoreTarget as crate::driver::Target>::driver(setup)
}

/// Runs a whole input: the setup, up to `max_ops` operations, the wind-down.
pub fn run(data: &[u8], max_ops: usize) {
    crate::driver::run::<SemaphoreTarget>(data, max_ops);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::target_tests;
    use consul_lock_core::machine::LockEvent;

    #[test]
    fn random_runs_keep_the_invariants() {
        target_tests::random_runs::<SemaphoreTarget>();
    }

    /// Writes seeds for the `semaphore_machine` target: the first random inputs (SplitMix64
    /// bytes, deterministic) whose runs end in each outcome.
    /// `cargo test --lib -- --ignored write_semaphore_seeds`.
    #[test]
    #[ignore = "writes fuzz/seeds/semaphore_machine"]
    fn write_semaphore_seeds() {
        target_tests::seeds::<SemaphoreTarget>(4096);
    }

    /// Replays one seed of `random_runs_keep_the_invariants`: `FUZZ_SEED=n FUZZ_TRACE=1`.
    #[test]
    #[ignore = "replays FUZZ_SEED"]
    fn replay_semaphore_seed() {
        target_tests::replay_seed::<SemaphoreTarget>();
    }

    /// Replays a file (a crash, a corpus input): `FUZZ_INPUT=path FUZZ_TRACE=1`.
    #[test]
    #[ignore = "replays FUZZ_INPUT"]
    fn replay_semaphore_input() {
        target_tests::replay_input::<SemaphoreTarget>();
    }

    #[test]
    fn a_plausible_agent_grants_a_slot() {
        // Lock, then answer everything plausibly with the "all is well" choices: a fresh session,
        // our contender key, the `.lock` as we last wrote it, check-and-sets granted.
        let setup = Setup {
            existing: false,
            try_once: false,
            monitor_retries: None,
            limit: 2,
            ttl_secs: 15,
            wait_secs: 15,
            seed: 1,
            value: Vec::new(),
        };
        let mut d = driver(&setup);
        d.step(&Op::Lock);
        let well = Plausible {
            a: 7,
            b: 5,
            c: 8 + 3,
            n: 3,
        };
        for _ in 0..8 {
            d.step(&Op::Reply(0, Spec::Plausible(well.clone())));
        }
        assert!(
            d.events().iter().any(|e| matches!(e, LockEvent::Acquired(_))),
            "{:?}",
            d.events()
        );
        d.step(&Op::Advance(Millis(1_000)));
        d.step(&Op::Unlock);
        for _ in 0..8 {
            d.step(&Op::Reply(0, Spec::Plausible(well.clone())));
        }
        assert!(d.events().contains(&LockEvent::Released), "{:?}", d.events());
        d.wind_down();
    }
}

/// What the inputs of a corpus reach: `FUZZ_CORPUS=corpus/semaphore_machine cargo test --release
/// --lib -- --ignored semaphore_corpus_outcomes --nocapture`.
#[cfg(test)]
mod corpus {
    use super::SemaphoreTarget;
    use crate::driver::target_tests;

    #[test]
    #[ignore = "reads FUZZ_CORPUS"]
    fn semaphore_corpus_outcomes() {
        target_tests::corpus::<SemaphoreTarget>();
    }
}
