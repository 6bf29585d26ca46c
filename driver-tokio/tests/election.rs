//! Leader election on a real agent, with Go's client (`consul lock`, Go's `api.Lock`) among the
//! candidates: an observer sees every change of leader of a run of campaigns, proclaims,
//! resigns, a crash (the leader's session destroyed) and Go's turns, in order, each once, with a
//! sequence that never goes backwards; `leader()` answers who leads at each step; a proclaim
//! keeps the key's `LockIndex` and session and can't take back a key that was lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::Wire;

use std::time::Duration;

use consul_lock_core::api::SessionDestroy;
use consul_lock_testkit::agent::{ConsulAgent, require_agent};
use consul_lock_testkit::golock::{GoLock, PATIENCE, Scratch};
use consul_lock_tokio::{
    Client, Election, Error, Leader, LockError, LockOptions, LossReason, ObserveEvent, Observer,
};

/// Lock options for a Rust candidate on `key`: no lock-delay, so that a crash hands over at once.
fn options(key: &str, name: &str) -> LockOptions {
    let mut options = LockOptions::new(key).unwrap();
    if let Some(session) = options.hold.session_options_mut() {
        session.name = name.to_owned();
        session.lock_delay = Some(Duration::ZERO);
        // No health checks: with no lock-delay, a session a node check could end holds nothing.
        session.checks = Some(Vec::new());
    }
    options
}

fn election(client: &Client, key: &str, name: &str) -> Election {
    client.election_with(options(key, name)).unwrap()
}

/// What an observer reported, kept for the checks at the end.
struct Seen {
    observer: Observer,
    log: Vec<ObserveEvent>,
}

impl Seen {
    /// The next event (a test failure after [`PATIENCE`]).
    async fn next(&mut self) -> ObserveEvent {
        let event = tokio::time::timeout(PATIENCE, self.observer.recv())
            .await
            .unwrap_or_else(|_| panic!("no change seen; so far: {:#?}", self.log))
            .expect("the observation goes on");
        self.log.push(event.clone());
        event
    }

    /// The next change must be a new leader named `session_name` with `value`.
    async fn leader(&mut self, session_name: &str, value: &[u8]) -> Leader {
        match self.next().await {
            ObserveEvent::Leader(l) => {
                assert_eq!(l.session_name.as_deref(), Some(session_name), "{l:?}");
                assert_eq!(l.value, value, "{l:?}");
                assert!(l.node.as_deref().is_some_and(|n| !n.is_empty()), "{l:?}");
                l
            }
            other => panic!(
                "expected {session_name} to lead, saw {other:?}; log {:#?}",
                self.log
            ),
        }
    }

    async fn value(&mut self, value: &[u8]) -> Leader {
        match self.next().await {
            ObserveEvent::Value(l) => {
                assert_eq!(l.value, value, "{l:?}");
                l
            }
            other => panic!("expected a new value, saw {other:?}; log {:#?}", self.log),
        }
    }

    /// A handoff to `session_name`: its leadership next, after no leader or none (a waiter may
    /// take the key before an observer's read sees it free).
    async fn handed_to(&mut self, session_name: &str) -> Leader {
        loop {
            match self.next().await {
                ObserveEvent::NoLeader { .. } => {}
                ObserveEvent::Leader(l) if l.session_name.as_deref() == Some(session_name) => return l,
                other => panic!(
                    "expected {session_name} to lead next, saw {other:?}; log {:#?}",
                    self.log
                ),
            }
        }
    }

    async fn no_leader(&mut self) {
        match self.next().await {
            ObserveEvent::NoLeader { .. } => {}
            other => panic!("expected no leader, saw {other:?}; log {:#?}", self.log),
        }
    }
}

async fn who(client: &Client, key: &str) -> Option<String> {
    client.leader(key).await.unwrap().and_then(|l| l.session_name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_see_every_change_of_campaigns_proclaims_resigns_crashes_and_go() {
    let Some(agent) = require_agent() else { return };
    run_scenario(agent).await;
}

async fn run_scenario(agent: &'static ConsulAgent) {
    let prefix = format!("tokio/election/run/{}", std::process::id());
    let key = format!("{prefix}/.lock");
    let client = Client::new(agent.config().unwrap()).unwrap();
    let wire = Wire::new(agent.config().unwrap());
    let scratch = Scratch::new("election-run");
    let mut seen = Seen {
        observer: client.observe(&key).unwrap(),
        log: Vec::new(),
    };
    seen.no_leader().await;
    assert_eq!(client.leader(&key).await.unwrap(), None);

    // A campaigns, then proclaims: the same leader, a new value, the same LockIndex and token.
    let a = election(&client, &key, "cand-a").campaign("a-1").await.unwrap();
    let first = seen.leader("cand-a", b"a-1").await;
    assert_eq!(first.session, a.token().session);
    assert_eq!(
        first.sequence,
        a.token().sequence(),
        "the observer saw the granting write"
    );
    assert_eq!(who(&client, &key).await.as_deref(), Some("cand-a"));
    a.proclaim("a-2").await.unwrap();
    let proclaimed = seen.value(b"a-2").await;
    assert_eq!(
        (proclaimed.sequence, proclaimed.lock_index, &proclaimed.session),
        (first.sequence, first.lock_index, &first.session)
    );
    let pair = wire.get(&key).await.unwrap();
    assert_eq!(
        pair.lock_index,
        a.token().lock_index,
        "a proclaim keeps LockIndex"
    );
    assert_eq!(pair.session.as_ref(), Some(&a.token().session));
    assert!(a.is_leading());
    a.resign().await.unwrap();
    seen.no_leader().await;

    // Go's client leads: `consul lock` on the prefix, its session named by `-name`.
    let mut go = GoLock::spawn(agent, &scratch, &prefix, "go-cand", true);
    let go_leader = seen.leader("go-cand", b"").await;
    assert!(go_leader.sequence > proclaimed.sequence);
    assert_eq!(who(&client, &key).await.as_deref(), Some("go-cand"));
    // A Rust candidate waits behind Go and takes over when Go's child ends: Go releases, and
    // its cleanup may delete the key (no leader in between) unless we are quicker.
    let b_election = election(&client, &key, "cand-b");
    let b_campaign = tokio::spawn(async move { b_election.campaign("b-1").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    go.release();
    let b_leader = seen.handed_to("cand-b").await;
    assert!(b_leader.sequence > go_leader.sequence);
    tokio::task::block_in_place(|| go.finish());
    let mut b = b_campaign.await.unwrap().unwrap();

    // B crashes: an operator destroys its session. Leading ends with a reason; observers see
    // nobody lead.
    wire.call(SessionDestroy {
        id: b.token().session.clone(),
    })
    .await
    .unwrap();
    let reason = tokio::time::timeout(PATIENCE, b.lost()).await.unwrap().unwrap();
    assert!(
        matches!(reason, LossReason::NotHeld | LossReason::SessionInvalidated),
        "{reason:?}"
    );
    seen.no_leader().await;
    // Its proclaim now fails, and does not take the key back (a plain acquire by the same
    // session would have, were the session alive: see the next test).
    let late = b.proclaim("b-2").await;
    assert!(matches!(late, Err(Error::Misuse(_) | Error::Lock(_))), "{late:?}");
    assert_eq!(wire.get(&key).await.and_then(|p| p.session), None);

    // C campaigns, and Go comes back after it: C resigns, Go leads, Go is done.
    let c = election(&client, &key, "cand-c").campaign("c-1").await.unwrap();
    let c_leader = seen.leader("cand-c", b"c-1").await;
    assert!(c_leader.sequence > b_leader.sequence);
    let mut go2 = GoLock::spawn(agent, &scratch, &prefix, "go-cand-2", true);
    tokio::task::block_in_place(|| go2.wait_attempting());
    c.resign().await.unwrap();
    seen.handed_to("go-cand-2").await;
    go2.release();
    tokio::task::block_in_place(|| go2.finish());
    seen.no_leader().await;

    // Every leader's sequence was larger than the last; nothing was reported twice.
    let sequences: Vec<u64> = seen
        .log
        .iter()
        .filter_map(|e| match e {
            ObserveEvent::Leader(l) => Some(l.sequence),
            _ => None,
        })
        .collect();
    assert_eq!(sequences.len(), 5, "{:#?}", seen.log);
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    for pair in seen.log.windows(2) {
        assert_ne!(pair[0], pair[1], "reported twice: {:?}", pair[0]);
    }
    client.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A proclaim is a checked write: once another session holds the key, the old leader's proclaim
/// is refused (and it learns it lost), where a plain `?acquire=` by its session would have been
/// refused too but, on a free key, would take it back; the proclaim never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proclaim_never_takes_back_a_key_that_was_lost() {
    let Some(agent) = require_agent() else { return };
    let key = format!("tokio/election/takeback/{}/.lock", std::process::id());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let wire = Wire::new(agent.config().unwrap());
    let mut leading = election(&client, &key, "cand-t").campaign("t-1").await.unwrap();
    let session = leading.token().session.clone();
    // Someone releases the key behind the leader's back (its session lives on).
    let released = wire
        .call(consul_lock_core::api::KvRelease {
            key: consul_lock_core::api::Key::new(&key).unwrap(),
            session: session.clone(),
            flags: consul_lock_core::machine::LOCK_FLAG_VALUE,
            value: b"x".to_vec(),
        })
        .await
        .unwrap();
    assert!(released);
    let outcome = leading.proclaim("t-2").await;
    // The monitor may have seen the release first (then the proclaim is a misuse: not held).
    match outcome {
        Err(Error::Lock(LockError::NotHeld) | Error::Misuse(_)) => {}
        other => panic!("a proclaim on a lost key: {other:?}"),
    }
    let reason = tokio::time::timeout(PATIENCE, leading.lost())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, LossReason::NotHeld);
    let pair = wire.get(&key).await.unwrap();
    assert_eq!(pair.session, None, "the proclaim took the key back");
    assert_eq!(pair.value, b"x");
    client.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// An observer started while Go's client holds the key reports it, with the node and the session
/// name Consul has for it, and `leader()` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_sees_a_key_go_holds_from_its_first_read() {
    let Some(agent) = require_agent() else { return };
    let prefix = format!("tokio/election/go-first/{}", std::process::id());
    let key = format!("{prefix}/.lock");
    let client = Client::new(agent.config().unwrap()).unwrap();
    let wire = Wire::new(agent.config().unwrap());
    let scratch = Scratch::new("election-go-first");
    let mut go = GoLock::spawn(agent, &scratch, &prefix, "go-first", true);
    let deadline = std::time::Instant::now() + PATIENCE;
    while wire.get(&key).await.and_then(|p| p.session).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "Go never held\n{}",
            go.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = client.leader(&key).await.unwrap().expect("Go leads");
    assert_eq!(leader.session_name.as_deref(), Some("go-first"));
    let pair = wire.get(&key).await.unwrap();
    assert_eq!(Some(&leader.session), pair.session.as_ref());
    assert_eq!(leader.lock_index, pair.lock_index);
    let mut seen = Seen {
        observer: client.observe(&key).unwrap(),
        log: Vec::new(),
    };
    let observed = seen.leader("go-first", b"").await;
    assert_eq!(observed.session, leader.session);
    assert_eq!(seen.observer.leader().map(|l| l.session), Some(leader.session));
    go.release();
    tokio::task::block_in_place(|| go.finish());
    seen.no_leader().await;
}

/// An observer cut off from the agent (connections refused by a proxy in between) says so once
/// reads have failed for `blind_after`, keeps trying, and when it sees again says so and reports
/// the leader that took over meanwhile, with a larger sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_cut_off_says_so_and_catches_up() {
    use consul_lock_testkit::proxy::{FaultProxy, Mode};
    use consul_lock_tokio::ObserveOptions;

    let Some(agent) = require_agent() else { return };
    let key = format!("tokio/election/cut-off/{}/.lock", std::process::id());
    let client = Client::new(agent.config().unwrap()).unwrap();
    let proxy = FaultProxy::start(agent.addr()).unwrap();
    let through_proxy = Client::new(proxy.config()).unwrap();
    let mut options = ObserveOptions::new(&key).unwrap();
    options.blind_after = Duration::from_secs(1);
    options.retry_time = Duration::from_millis(200);
    let mut seen = Seen {
        observer: through_proxy.observe_with(options).unwrap(),
        log: Vec::new(),
    };
    seen.no_leader().await;
    let a = election(&client, &key, "cut-a").campaign("a").await.unwrap();
    let first = seen.leader("cut-a", b"a").await;

    proxy.set_mode(Mode::Refuse);
    match seen.next().await {
        ObserveEvent::Blind { unseen_for, .. } => assert!(unseen_for >= Duration::from_secs(1)),
        other => panic!("expected Blind, saw {other:?}"),
    }
    // Meanwhile the leader changes, unseen.
    a.resign().await.unwrap();
    let b = election(&client, &key, "cut-b").campaign("b").await.unwrap();
    proxy.set_mode(Mode::Pass);
    match seen.next().await {
        ObserveEvent::Resumed { unseen_for } => assert!(unseen_for >= Duration::from_secs(1)),
        other => panic!("expected Resumed, saw {other:?}"),
    }
    let next = seen.leader("cut-b", b"b").await;
    assert!(next.sequence > first.sequence);
    assert_eq!(next.session, b.token().session);
    b.resign().await.unwrap();
    seen.no_leader().await;
    client.shutdown(Duration::from_secs(10)).await.unwrap();
}
