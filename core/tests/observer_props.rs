//! The observer machine under generated replies: any mix of holders, values, indexes that jump
//! or go backwards, errors, garbled bodies, servers without a leader, and time passing. After
//! every step: `poll_timeout` never before now, at most one request in flight, every request's
//! deadline after now, never a blocking read on index 0; reports in order (a leader's sequence
//! strictly above the last leader's, a value report carrying the current leader's sequence, no
//! report twice in a row, `Blind` and `Resumed` alternating). And whatever came before, a
//! healthy agent then brings it to the key's state within a few answers.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use consul_lock_core::api::ClientConfig;
use consul_lock_core::machine::{
    Action, Observation, ObserveEvent, ObserveOptions, ObserverMachine, Reply, Transmit,
};
use proptest::prelude::*;
use support::reply;
use support::{entry, ms};

/// A reply the generated agent gives.
#[derive(Clone, Debug)]
enum Answer {
    /// The key held by session `s{session}` with `LockIndex` `lock_index`, value `v{value}`,
    /// `ModifyIndex` and `X-Consul-Index` moved by `step` from the last (backwards if negative).
    Held {
        session: u8,
        lock_index: u64,
        value: u8,
        step: i64,
        leader: bool,
    },
    Free {
        step: i64,
    },
    Missing {
        step: i64,
    },
    Status(u16),
    Refused,
    Garbled,
    /// A session lookup's answer (to whatever is in flight).
    Info {
        known: bool,
    },
}

#[derive(Clone, Debug)]
enum Step {
    Answer(Answer),
    Wait(u64),
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => (0u8..3, 1u64..4, 0u8..3, -40i64..40, prop::bool::weighted(0.9)).prop_map(
            |(session, lock_index, value, step, leader)| Answer::Held { session, lock_index, value, step, leader }
        ),
        1 => (-40i64..40).prop_map(|step| Answer::Free { step }),
        1 => (-40i64..40).prop_map(|step| Answer::Missing { step }),
        1 => prop_oneof![Just(500u16), Just(429), Just(503)].prop_map(Answer::Status),
        1 => Just(Answer::Refused),
        1 => Just(Answer::Garbled),
        2 => any::<bool>().prop_map(|known| Answer::Info { known }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => answer().prop_map(Step::Answer),
        1 => (1u64..30_000).prop_map(Step::Wait),
    ]
}

struct Run {
    m: ObserverMachine,
    now: Instant,
    inflight: Vec<Transmit>,
    events: Vec<ObserveEvent>,
    index: u64,
}

impl Run {
    fn new() -> Run {
        let now = Instant::now();
        let mut options = ObserveOptions::new("k").unwrap();
        options.wait = Duration::from_secs(10);
        options.seed = 5;
        let m = ObserverMachine::new(ClientConfig::default(), options, now).unwrap();
        let mut run = Run {
            m,
            now,
            inflight: Vec::new(),
            events: Vec::new(),
            index: 100,
        };
        run.drain();
        run
    }

    fn drain(&mut self) {
        while let Some(action) = self.m.poll_action() {
            match action {
                Action::Send(t) => {
                    assert!(t.deadline > self.now, "a deadline not after now");
                    let query = t.request.uri().query().unwrap_or("").to_owned();
                    assert!(!query.contains("index=0"), "a blocking read on index 0: {query}");
                    self.inflight.push(t);
                }
                Action::Event(e) => self.events.push(e),
            }
        }
        if let Some(at) = self.m.poll_timeout() {
            assert!(at >= self.now, "poll_timeout before now");
        }
        // A request past its deadline is the machine's to time out; the test forgets it then.
        let now = self.now;
        self.inflight.retain(|t| t.deadline > now);
        assert!(
            self.m.in_flight() <= 1,
            "{} requests in flight",
            self.m.in_flight()
        );
    }

    fn moved(&mut self, step: i64) -> u64 {
        self.index = self.index.saturating_add_signed(step).max(1);
        self.index
    }

    fn reply_for(&mut self, a: &Answer) -> Reply {
        match *a {
            Answer::Held {
                session,
                lock_index,
                value,
                step,
                leader,
            } => {
                let at = self.moved(step);
                let pair = entry()
                    .held_by(&format!("s{session}"), lock_index)
                    .value(format!("v{value}").as_bytes())
                    .modified(at);
                reply::kv_leader(at, Some(leader), &pair)
            }
            Answer::Free { step } => {
                let at = self.moved(step);
                reply::kv(at, &entry().free().modified(at))
            }
            Answer::Missing { step } => {
                let at = self.moved(step);
                reply::missing(at)
            }
            Answer::Status(status) => reply::status(status, "injected"),
            Answer::Refused => reply::refused(),
            Answer::Garbled => reply::raw(200, Some(self.index), Some(true), "[{"),
            Answer::Info { known: true } => reply::info("s0", Duration::ZERO, self.index),
            Answer::Info { known: false } => reply::info_none(self.index),
        }
    }

    fn play(&mut self, step: &Step) {
        match step {
            Step::Wait(millis) => {
                self.now += ms(*millis);
                self.m.handle_timeout(self.now);
            }
            Step::Answer(a) => {
                self.now += ms(1);
                match self.inflight.pop() {
                    Some(t) => {
                        let reply = self.reply_for(a);
                        self.m.handle_response(self.now, t.id, reply);
                    }
                    None => self.m.handle_timeout(self.now),
                }
            }
        }
        self.drain();
    }

    /// Answers every request as a healthy agent showing `s9` holding with value `final`, for at
    /// most `rounds` requests; whether the observer then shows it.
    fn settle_on_final(&mut self, rounds: usize) -> bool {
        for _ in 0..rounds {
            if let Some(t) = self.inflight.pop() {
                self.now += ms(1);
                let is_info = t.request.uri().path().starts_with("/v1/session/info/");
                let reply = if is_info {
                    reply::info("s9", Duration::ZERO, self.index)
                } else {
                    let at = self.moved(1);
                    reply::kv(at, &entry().held_by("s9", 7).value(b"final").modified(at))
                };
                self.m.handle_response(self.now, t.id, reply);
            } else if let Some(at) = self.m.poll_timeout() {
                self.now = self.now.max(at);
                self.m.handle_timeout(self.now);
            }
            self.drain();
            if let Some(Observation::Leader(l)) = self.m.current() {
                if l.session.as_str() == "s9" && l.value == b"final" {
                    return true;
                }
            }
        }
        false
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn reports_stay_in_order_and_a_healthy_agent_brings_the_final_state(
        steps in proptest::collection::vec(step(), 0..120)
    ) {
        let mut run = Run::new();
        for s in &steps {
            run.play(s);
        }
        // Past any pause or deadline the script left, then a healthy agent.
        prop_assert!(run.settle_on_final(20), "not settled: {:?}; events {:#?}", run.m.current(), run.events);
        consul_lock_checker::observe::check_reports(&run.events).map_err(TestCaseError::fail)?;
    }
}
