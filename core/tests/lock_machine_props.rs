//! The lock machine under random operations, random replies (well-formed, odd and garbage),
//! transport errors and time jumps. Every step is checked against the invariants in `support`
//! (no panic, nothing after quiescence, no-op spurious timeouts, `poll_timeout` never in the
//! past, one renew at most, deadlines, the events' grammar, the fencing token, the renew
//! deadline); at the end, a cancel against a responsive Consul must bring the machine to rest.
//! And an agent that answers everything at once, never making index progress, can't make the
//! machine spin.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use consul_lock_core::machine::{
    LockOptions, LockStatus, Reply, SEMAPHORE_FLAG_VALUE, TransportError, TransportErrorKind,
};
use proptest::prelude::*;
use support::reply;
use support::{Clock, Fake, KEY, Kind, Node, Sent, entry, existing, ms, options, secs};

/// What the agent answers to one request.
#[derive(Clone, Debug)]
enum Spec {
    /// What the fake Consul says (at once, even to a blocking read it would hold).
    Fake,
    /// A well-formed reply of the request's kind, with random content.
    Plausible {
        choice: u8,
        a: u64,
    },
    /// A status and a body from Consul's repertoire.
    Status {
        code: u16,
        body: u8,
    },
    /// Random bytes, odd headers.
    Garbage {
        status: u16,
        body: Vec<u8>,
        index: u8,
        leader: u8,
    },
    Transport(u8),
}

/// A change to the fake Consul's state behind the machine's back.
#[derive(Clone, Debug)]
enum Mutation {
    DeleteKey,
    TakenByOther(u64),
    Released,
    InvalidateOurs,
    Flags(u64),
}

#[derive(Clone, Debug)]
enum Op {
    Lock,
    Unlock,
    Cancel,
    Destroy,
    /// Answer a request in flight.
    Reply {
        pick: usize,
        spec: Spec,
    },
    /// Answer any request ever sent: late, duplicate, abandoned.
    Late {
        pick: usize,
        spec: Spec,
    },
    /// Move time, calling `handle_timeout` whenever asked.
    Advance(u64),
    /// Move time with one `handle_timeout` at the end: a late driver.
    Jump(u64),
    Mutate(Mutation),
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        8 => Just(Spec::Fake),
        4 => (any::<u8>(), any::<u64>()).prop_map(|(choice, a)| Spec::Plausible { choice, a }),
        1 => (
            prop::sample::select(vec![200u16, 400, 403, 404, 429, 500, 502, 503]),
            any::<u8>()
        )
            .prop_map(|(code, body)| Spec::Status { code, body }),
        1 => (
            prop::sample::select(vec![200u16, 404, 500]),
            prop::collection::vec(any::<u8>(), 0..40),
            any::<u8>(),
            any::<u8>()
        )
            .prop_map(|(status, body, index, leader)| Spec::Garbage {
                status,
                body,
                index,
                leader
            }),
        1 => any::<u8>().prop_map(Spec::Transport),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let millis = prop_oneof![0..50u64, 0..2_000u64, 0..20_000u64, 0..400_000u64];
    prop_oneof![
        3 => Just(Op::Lock),
        1 => Just(Op::Unlock),
        1 => Just(Op::Cancel),
        1 => Just(Op::Destroy),
        14 => (any::<usize>(), spec()).prop_map(|(pick, spec)| Op::Reply { pick, spec }),
        2 => (any::<usize>(), spec()).prop_map(|(pick, spec)| Op::Late { pick, spec }),
        5 => millis.clone().prop_map(Op::Advance),
        1 => millis.prop_map(Op::Jump),
        1 => prop_oneof![
            Just(Mutation::DeleteKey),
            (0..5_000u64).prop_map(Mutation::TakenByOther),
            Just(Mutation::Released),
            Just(Mutation::InvalidateOurs),
            prop::sample::select(vec![0, 1, SEMAPHORE_FLAG_VALUE]).prop_map(Mutation::Flags),
        ]
        .prop_map(Op::Mutate),
    ]
}

fn lock_options() -> impl Strategy<Value = LockOptions> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0..4u32),
        any::<u64>(),
        0..3u8,
    )
        .prop_map(|(own_session, try_once, monitor_retries, seed, wait)| {
            let mut o = if own_session { existing("mine") } else { options() };
            o.hold.try_once = try_once;
            o.hold.monitor_retries = monitor_retries;
            o.hold.seed = seed;
            o.hold.wait_time = [ms(250), secs(2), secs(15)][usize::from(wait)];
            o
        })
}

struct World {
    clock: Clock,
    node: Node,
    fake: Fake,
    sessions: u64,
}

fn response(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> Reply {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    Ok(b.body(body).unwrap())
}

impl World {
    fn new(options: LockOptions) -> World {
        let mut fake = Fake::new();
        fake.add_session("mine", secs(15));
        World {
            clock: Clock::new(),
            node: support::node(options),
            fake,
            sessions: 0,
        }
    }

    fn ours(&self) -> String {
        self.node
            .m
            .session()
            .id()
            .map_or_else(|| "mine".to_owned(), |s| s.to_string())
    }

    fn reply(&mut self, sent: &Sent, spec: &Spec, now: Instant) -> Reply {
        match spec {
            Spec::Fake => self.fake.serve_now(sent, now),
            Spec::Plausible { choice, a } => self.plausible(sent, *choice, *a),
            Spec::Status { code, body } => {
                let bodies = [
                    "",
                    "No cluster leader",
                    "invalid session \"x\"",
                    "Permission denied",
                    "rpc error making call: EOF",
                    "true",
                    "[]",
                    "null",
                ];
                reply::status(*code, bodies[usize::from(*body) % bodies.len()])
            }
            Spec::Garbage {
                status,
                body,
                index,
                leader,
            } => {
                let mut headers = Vec::new();
                let indexes = ["", "abc", "18446744073709551615", "-1", "5", "0"];
                let i = indexes[usize::from(*index) % indexes.len()];
                if !i.is_empty() {
                    headers.push(("X-Consul-Index", i.to_owned()));
                }
                let leaders = ["", "maybe", "false", "true"];
                let l = leaders[usize::from(*leader) % leaders.len()];
                if !l.is_empty() {
                    headers.push(("X-Consul-KnownLeader", l.to_owned()));
                }
                response(*status, &headers, body.clone())
            }
            Spec::Transport(k) => {
                let kinds = [
                    TransportErrorKind::Connect,
                    TransportErrorKind::Io,
                    TransportErrorKind::Timeout,
                    TransportErrorKind::TooLarge,
                ];
                Err(TransportError::new(
                    kinds[usize::from(*k) % kinds.len()],
                    "injected",
                ))
            }
        }
    }

    /// A well-formed reply to `sent`, with content drawn from `choice` and `a`.
    fn plausible(&mut self, sent: &Sent, choice: u8, a: u64) -> Reply {
        let c = usize::from(choice);
        match sent.kind() {
            Kind::Create => {
                self.sessions += 1;
                reply::created(&format!("g-{}", self.sessions))
            }
            Kind::Renew(id) => match c % 6 {
                0 => reply::session_gone(&id),
                1 => reply::renewed_ttl(&id, "30s"),
                2 => reply::renewed_ttl(&id, "10s"),
                _ => reply::renewed(&id),
            },
            Kind::Destroy(_) | Kind::Release { .. } | Kind::Delete { .. } => {
                if c % 4 == 0 {
                    reply::no()
                } else {
                    reply::yes()
                }
            }
            Kind::Info(id) => match c % 3 {
                0 => reply::info_none(a % 100),
                _ => reply::info(&id, ms(a % 20_000), a % 100),
            },
            Kind::LockTxn { session, .. } => match c % 5 {
                0 => reply::no(),
                1 => reply::invalid_session(&session),
                2 => reply::no_leader(),
                _ => reply::yes(),
            },
            Kind::Get { index, .. } => {
                let sent_index = index.unwrap_or(0);
                let index = match (c / 6) % 5 {
                    0 => Some(sent_index),
                    1 => Some(sent_index / 2),
                    2 => None,
                    _ => Some(sent_index + 1 + a % 3),
                };
                let leader = [Some(true), Some(true), None, Some(false)][(c / 30) % 4];
                let lock_index = 1 + a % 3;
                let e = match c % 10 {
                    0 => None,
                    1 | 2 => Some(entry().free()),
                    3..=6 => Some(entry().held_by(&self.ours(), lock_index)),
                    7 | 8 => Some(entry().held_by("other", lock_index)),
                    _ => Some(
                        entry()
                            .held_by(&self.ours(), lock_index)
                            .flags([0, SEMAPHORE_FLAG_VALUE][usize::from(a % 2 == 0)]),
                    ),
                };
                match e {
                    None => reply::raw(404, index, leader, Vec::new()),
                    Some(e) => {
                        let body = serde_json::Value::Array(vec![e.json()]).to_string();
                        reply::raw(200, index, leader, body)
                    }
                }
            }
            _ => reply::status(400, "?"),
        }
    }

    fn step(&mut self, op: &Op) {
        let now = self.clock.now();
        match op {
            Op::Lock => {
                let _ = self.node.lock(now);
            }
            Op::Unlock => {
                let _ = self.node.unlock(now);
            }
            Op::Cancel => self.node.cancel(now),
            Op::Destroy => {
                let _ = self.node.destroy(now);
            }
            Op::Reply { pick, spec } => {
                let n = self.node.inflight.len();
                if n == 0 {
                    return;
                }
                let sent = self.node.inflight.values().nth(pick % n).cloned().unwrap();
                let reply = self.reply(&sent, spec, now);
                self.node.deliver(now, sent.id, reply);
            }
            Op::Late { pick, spec } => {
                let n = self.node.log.len();
                if n == 0 {
                    return;
                }
                let sent = self.node.log[pick % n].clone();
                let reply = self.reply(&sent, spec, now);
                self.node.deliver(now, sent.id, reply);
            }
            Op::Advance(d) => {
                let to = now + Duration::from_millis(*d);
                self.node.advance(now, to);
                self.clock.set(to);
            }
            Op::Jump(d) => {
                let to = now + Duration::from_millis(*d);
                self.clock.set(to);
                self.node.tick(to);
            }
            Op::Mutate(m) => match m {
                Mutation::DeleteKey => self.fake.delete(KEY),
                Mutation::TakenByOther(delay) => {
                    self.fake.add_session("other", ms(*delay));
                    self.fake.hold(KEY, "other");
                }
                Mutation::Released => self.fake.release(KEY),
                Mutation::InvalidateOurs => {
                    let ours = self.ours();
                    self.fake.invalidate(&ours, now);
                }
                Mutation::Flags(f) => self.fake.put(KEY, *f),
            },
        }
    }

    /// Cancel (unlocking a held lock), then let the fake Consul answer everything: the machine
    /// must come to rest.
    fn wind_down(&mut self) {
        let now = self.clock.now();
        self.node.cancel(now);
        let until = now + secs(120);
        let fake = &mut self.fake;
        let rested = support::run(
            &mut self.clock,
            std::slice::from_mut(&mut self.node),
            until,
            &mut |s, now| fake.serve(s, now),
            &mut |nodes| nodes[0].m.is_quiescent(),
        );
        assert!(
            rested,
            "not at rest 120 s after cancel: status {:?}, in flight {:?}",
            self.node.m.status(),
            self.node.describe()
        );
        assert_eq!(self.node.m.status(), LockStatus::Idle);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_drives_keep_the_invariants(
        options in lock_options(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let mut world = World::new(options);
        for op in &ops {
            world.step(op);
        }
        world.wind_down();
    }
}

/// SplitMix64: an agent's choices, from a seed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % sides
    }
}

/// The highest index the impatient agent ever reports.
const TOP: u64 = 10;

/// An agent that answers at once, with random content, and whose indexes never pass [`TOP`]:
/// the same index, a backwards one, none at all, or `TOP`.
fn impatient(dice: &mut Dice, created: &mut u64, sent: &Sent, ours: &str) -> Reply {
    match sent.kind() {
        Kind::Create => {
            *created += 1;
            reply::created(&format!("i-{created}"))
        }
        Kind::Renew(id) => match dice.roll(8) {
            0 => reply::no_leader(),
            _ => reply::renewed(&id),
        },
        Kind::Info(id) => reply::info(&id, ms(dice.roll(3_000)), TOP),
        Kind::LockTxn { .. } => {
            [reply::yes, reply::no, reply::no_leader][usize::try_from(dice.roll(3)).unwrap()]()
        }
        Kind::Get { index, .. } => {
            let sent_index = index.unwrap_or(0);
            let index = match dice.roll(4) {
                0 => Some(sent_index),
                1 => Some(sent_index / 2),
                2 => None,
                _ => Some(TOP),
            };
            let e = match dice.roll(4) {
                0 => None,
                1 => Some(entry().free()),
                2 => Some(entry().held_by(ours, 1)),
                _ => Some(entry().held_by("other", 1)),
            };
            match e {
                None => reply::raw(404, index, Some(true), Vec::new()),
                Some(e) => reply::raw(
                    200,
                    index,
                    Some(true),
                    serde_json::Value::Array(vec![e.json()]).to_string(),
                ),
            }
        }
        _ => reply::yes(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn an_impatient_agent_cannot_make_the_machine_spin(options in lock_options(), seed in any::<u64>()) {
        let mut clock = Clock::new();
        let mut nodes = [support::node(options)];
        let mut dice = Dice(seed);
        let mut created = 0;
        let start = clock.now();
        for _ in 0..60 {
            if nodes[0].m.status() == LockStatus::Idle {
                let _ = nodes[0].lock(clock.now());
            }
            let until = clock.now() + secs(1);
            let ours = nodes[0].m.session().id().map_or_else(|| "mine".to_owned(), |s| s.to_string());
            // (the run loop itself fails if requests keep coming without time passing)
            support::run(
                &mut clock,
                &mut nodes,
                until,
                &mut |s, _| Some(impatient(&mut dice, &mut created, s, &ours)),
                &mut |_| false,
            );
        }
        let sent = nodes[0].log.iter().filter(|s| s.at >= start).count();
        // At most 15 a second on average (try-once attempts, restarted every second, are the
        // busiest: each starts with a fresh backoff).
        prop_assert!(sent <= 900, "{} requests in 60 s", sent);
    }
}
