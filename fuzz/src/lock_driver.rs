//! Drives a `LockMachine` with an arbitrary run: options, then operations, replies (plausible
//! and hostile, real captured ones, arbitrary bytes), transport errors, timeouts and time jumps.
//! After every step the invariants of [`crate::driver`] are checked, and the lock's own:
//! - only the requests a lock sends go out;
//! - `Acquired` (with the key, a session and the `LockIndex` of the read it follows) only after
//!   an acquire for that session was answered `true`;
//! - while held, no release or destroy of the session goes out.

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use consul_lock_core::api::{ClientConfig, Endpoint, KvGet, SessionId};
use consul_lock_core::machine::{
    FencingToken, LOCK_FLAG_VALUE, LockMachine, LockOptions, Reply, SEMAPHORE_FLAG_VALUE, SessionChoice,
};

use crate::arb_reply::{self, KNOWN_SESSIONS};
use crate::driver::{Cause, Model, SessionAgent, acquire_reply, read_headers, response, write_reply};
pub use crate::driver::{EXISTING, Millis, Op, Plausible, Spec};
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
            o.session = SessionChoice::Existing(SessionId::new(EXISTING).unwrap_or_else(|e| panic!("{e}")));
        } else if let Some(s) = o.session_options_mut() {
            s.ttl = Duration::from_secs(u64::from(self.ttl_secs));
            s.lock_delay = self.lock_delay_secs.map(|d| Duration::from_secs(u64::from(d)));
        }
        o.lock_try_once = self.try_once;
        o.monitor_retries = self.monitor_retries.map(u32::from);
        o.lock_wait_time = Duration::from_secs(u64::from(self.wait_secs));
        o.seed = self.seed;
        o.value = self.value.clone();
        o
    }
}

/// What a reply says: the session an acquire was granted to, and what a KV read showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    granted: Option<String>,
    pair: Option<(Option<String>, u64)>,
}

/// The lock's agent: plausible replies, and when `Acquired` may come.
#[derive(Clone, Debug, Default)]
pub struct LockModel {
    sessions: SessionAgent,
    /// Sessions an acquire was granted to, since the last `lock`.
    granted: Vec<String>,
    /// The last `LockIndex` a plausible read showed (to make it go down).
    last_lock_index: u64,
}

fn ours(m: &LockMachine) -> String {
    m.session()
        .id()
        .map_or_else(|| EXISTING.to_owned(), |s| s.to_string())
}

fn kv_json(session: Option<&str>, flags: u64, lock_index: u64, modify_index: u64) -> String {
    let session = session.map_or(String::new(), |s| {
        format!(",\"Session\":{}", arb_reply::json_string(s))
    });
    format!(
        "{{\"LockIndex\":{lock_index},\"Key\":\"{KEY}\",\"Flags\":{flags},\"Value\":null{session},\
         \"CreateIndex\":1,\"ModifyIndex\":{modify_index}}}"
    )
}

impl Model for LockModel {
    type M = LockMachine;
    type Facts = Facts;

    fn check_send(&mut self, _m: &LockMachine, s: &Sent) {
        let lock = matches!(
            s.kind(),
            Kind::Create
                | Kind::Renew(_)
                | Kind::Destroy(_)
                | Kind::Info(_)
                | Kind::Get { .. }
                | Kind::Acquire { .. }
                | Kind::Release { .. }
                | Kind::Delete { .. }
        );
        assert!(lock, "a lock sent {}", s.describe());
    }

    fn plausible(&mut self, m: &LockMachine, sent: &Sent, p: &Plausible) -> Reply {
        if let Some(reply) = self.sessions.plausible(sent, p) {
            return reply;
        }
        let (a, b, c, n) = (usize::from(p.a), p.b, usize::from(p.c), p.n);
        let known = KNOWN_SESSIONS[n as usize % KNOWN_SESSIONS.len()];
        match sent.kind() {
            Kind::Release { .. } | Kind::Delete { .. } => write_reply(p.a),
            Kind::Acquire { .. } => acquire_reply(p.a, &ours(m)),
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
            Kind::Acquire { .. } => response(200, &[], "false"),
            Kind::Get { index, .. } => response(
                404,
                &[("X-Consul-Index", index.unwrap_or(0).saturating_add(1).to_string())],
                "",
            ),
            _ => response(400, &[], "?"),
        }
    }

    fn facts(&self, _m: &LockMachine, sent: &Sent, reply: &Reply) -> Facts {
        let (mut granted, mut pair) = (None, None);
        if let Ok(resp) = reply {
            match sent.kind() {
                Kind::Acquire { session, .. }
                    if resp.status().is_success()
                        && std::str::from_utf8(resp.body()).map(str::trim) == Ok("true") =>
                {
                    granted = Some(session);
                }
                Kind::Get { .. } => {
                    if let Ok(q) = KvGet::decode(resp) {
                        pair = q.value.map(|p| (p.session.map(|s| s.to_string()), p.lock_index));
                    }
                }
                _ => {}
            }
        }
        Facts { granted, pair }
    }

    fn on_lock(&mut self) {
        self.granted.clear();
    }

    fn witness(&mut self, facts: &Facts, _live: bool) {
        if let Some(s) = &facts.granted
            && !self.granted.contains(s)
        {
            self.granted.push(s.clone());
        }
    }

    fn check_acquired(&self, _m: &LockMachine, token: &FencingToken, cause: &Cause<Facts>) {
        assert_eq!(token.key.as_str(), KEY, "Acquired names another key");
        let session = token.session.to_string();
        assert!(
            self.granted.contains(&session),
            "Acquired({token:?}) but no acquire for that session was answered true (granted: {:?})",
            self.granted
        );
        match cause {
            Cause::Reply(Some(Facts { pair, .. })) => assert_eq!(
                pair,
                &Some((Some(session), token.lock_index)),
                "Acquired must carry the session and LockIndex of the read it follows"
            ),
            other => panic!("Acquired on {other:?}, not on a read's reply"),
        }
    }

    fn gives_up(&self, token: &FencingToken, s: &Sent) -> bool {
        let session = token.session.as_str();
        match s.kind() {
            Kind::Release { session: s, .. } | Kind::Destroy(s) => s == session,
            _ => false,
        }
    }
}

/// The lock's driver.
pub type Driver = crate::driver::Driver<LockModel>;

/// A driver for a machine with `setup`'s options.
pub fn driver(setup: &Setup) -> Driver {
    let m = match LockMachine::new(ClientConfig::default(), setup.options()) {
        Ok(m) => m,
        Err(e) => panic!("fuzz harness bug: invalid options: {e}"),
    };
    Driver::new(m, LockModel::default())
}

/// Runs a whole input: the setup, up to `max_ops` operations, the wind-down.
pub fn run(data: &[u8], max_ops: usize) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let mut driver = driver(&setup);
    crate::driver::run_ops(&mut driver, &mut u, max_ops);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::splitmix_bytes as bytes;
    use consul_lock_core::machine::LockEvent;

    #[test]
    fn random_runs_keep_the_invariants() {
        let seeds = std::env::var("FUZZ_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300u64);
        for seed in 0..seeds {
            let data = bytes(seed, 2048);
            if std::panic::catch_unwind(|| run(&data, 400)).is_err() {
                panic!("seed {seed} fails");
            }
        }
    }

    /// Writes seeds for the `lock_machine` target: the first random inputs (SplitMix64 bytes,
    /// deterministic) whose runs end in each outcome. `cargo test --lib -- --ignored write_seeds`.
    #[test]
    #[ignore = "writes fuzz/seeds/lock_machine"]
    fn write_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/lock_machine");
        let missing = crate::driver::write_seeds(&dir, 1024, 20_000, |data| {
            let mut u = Unstructured::new(data);
            let setup = Setup::arbitrary(&mut u).unwrap();
            let mut d = driver(&setup);
            while !u.is_empty() {
                let Ok(op) = Op::arbitrary(&mut u) else { break };
                d.step(&op);
            }
            let events = d.events.clone();
            d.wind_down();
            events
        });
        assert!(missing.is_empty(), "no input found for {missing:?}");
    }

    /// Replays one seed of `random_runs_keep_the_invariants`: `FUZZ_SEED=n FUZZ_TRACE=1`.
    #[test]
    #[ignore = "replays FUZZ_SEED"]
    fn replay_seed() {
        let seed = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        run(&bytes(seed, 2048), 400);
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
        let well = Plausible {
            a: 7,
            b: 5,
            c: 8 * 3 + 64 * 3 + 1,
            n: 3,
        };
        for _ in 0..6 {
            d.step(&Op::Reply(0, Spec::Plausible(well.clone())));
        }
        assert!(
            d.events.iter().any(|e| matches!(e, LockEvent::Acquired(_))),
            "{:?}",
            d.events
        );
        d.step(&Op::Advance(Millis(60_000)));
        d.wind_down();
    }
}

/// What the inputs of a corpus reach: `FUZZ_CORPUS=fuzz/corpus/lock_machine cargo test --release
/// --lib -- --ignored corpus_outcomes --nocapture`.
#[cfg(test)]
mod corpus {
    use super::*;

    #[test]
    #[ignore = "reads FUZZ_CORPUS"]
    fn corpus_outcomes() {
        let dir = std::env::var("FUZZ_CORPUS").unwrap_or_else(|_| "corpus/lock_machine".to_owned());
        crate::driver::corpus_outcomes(&dir, |data| {
            let mut u = Unstructured::new(data);
            let setup = Setup::arbitrary(&mut u).ok()?;
            let mut d = driver(&setup);
            for _ in 0..512 {
                if u.is_empty() {
                    break;
                }
                let Ok(op) = Op::arbitrary(&mut u) else { break };
                d.step(&op);
            }
            let events = d.events.clone();
            d.wind_down();
            Some(events)
        });
    }
}
