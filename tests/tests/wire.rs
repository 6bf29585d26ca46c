//! Wire conformance: every request the core encodes, sent to a real Consul agent, and every
//! reply shape decoded. One test per request and reply shape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use consul_lock_core::api::{
    ApiError, Blocking, ClientConfig, Consistency, Endpoint, Key, KvAcquire, KvCasDelete, KvCasPut, KvGet,
    KvList, KvLockTxn, KvPair, KvRelease, LockRefusal, LockTxnOutcome, SessionBehavior, SessionCreate,
    SessionDestroy, SessionId, SessionInfo, SessionRenew,
};
use consul_lock_core::machine::LOCK_FLAG_VALUE;
use consul_lock_testkit::TestTransport;
use consul_lock_testkit::agent::require_agent;

struct Wire {
    config: ClientConfig,
    http: TestTransport,
}

impl Wire {
    fn new() -> Option<Wire> {
        let agent = require_agent()?;
        Some(Wire {
            config: agent.config().expect("agent config"),
            http: TestTransport::new().expect("http client"),
        })
    }

    fn call<E: Endpoint>(&self, endpoint: &E) -> Result<E::Output, ApiError> {
        self.http.call(&self.config, endpoint).expect("the agent answers")
    }

    fn session(&self, lock_delay: Option<Duration>) -> SessionId {
        self.call(&SessionCreate {
            name: Some("wire-test".into()),
            ttl: Some(Duration::from_secs(30)),
            lock_delay,
            ..SessionCreate::default()
        })
        .expect("session create")
    }

    fn acquire(&self, key: &Key, session: &SessionId, value: &[u8]) -> bool {
        self.call(&KvAcquire {
            key: key.clone(),
            session: session.clone(),
            flags: LOCK_FLAG_VALUE,
            value: value.to_vec(),
        })
        .expect("acquire")
    }

    fn get(&self, key: &Key) -> Option<KvPair> {
        self.call(&KvGet::new(key.clone())).expect("read").value
    }

    fn lock_txn(&self, key: &Key, session: &SessionId, flags: u64, value: &[u8]) -> LockTxnOutcome {
        self.call(&KvLockTxn {
            key: key.clone(),
            session: session.clone(),
            flags,
            value: value.to_vec(),
        })
        .expect("lock transaction")
    }

    fn locked(&self, key: &Key, session: &SessionId, flags: u64, value: &[u8]) -> KvPair {
        match self.lock_txn(key, session, flags, value) {
            LockTxnOutcome::Locked(pair) => pair,
            refused => panic!("lock of {key:?} refused: {refused:?}"),
        }
    }
}

/// A key no other test uses.
fn key(name: &str) -> Key {
    Key::new(format!("wire/{name}")).unwrap()
}

#[test]
fn session_create_then_info_shows_what_was_asked() {
    let Some(w) = Wire::new() else { return };
    let id = w
        .call(&SessionCreate {
            name: Some("wire info".into()),
            ttl: Some(Duration::from_secs(10)),
            lock_delay: Some(Duration::from_secs(2)),
            behavior: SessionBehavior::Delete,
            ..SessionCreate::default()
        })
        .unwrap();
    let info = w.call(&SessionInfo::new(id.clone())).unwrap();
    let entry = info.value.expect("the session exists");
    assert_eq!(entry.id, id);
    assert_eq!(entry.name, "wire info");
    assert_eq!(entry.ttl, Some(Duration::from_secs(10)));
    assert_eq!(entry.lock_delay, Duration::from_secs(2));
    assert_eq!(entry.behavior, SessionBehavior::Delete);
    assert!(
        entry.checks.iter().any(|c| c == "serfHealth"),
        "{:?}",
        entry.checks
    );
    assert!(info.meta.index > 0);
    assert_eq!(info.meta.known_leader, Some(true));
}

#[test]
fn zero_lock_delay_is_sent_and_kept() {
    let Some(w) = Wire::new() else { return };
    let id = w.session(Some(Duration::ZERO));
    let entry = w.call(&SessionInfo::new(id)).unwrap().value.unwrap();
    assert_eq!(entry.lock_delay, Duration::ZERO);
    // And omitted means the server's default.
    let id = w.session(None);
    let entry = w.call(&SessionInfo::new(id)).unwrap().value.unwrap();
    assert_eq!(entry.lock_delay, Duration::from_secs(15));
}

#[test]
fn session_ttl_out_of_range_is_a_500_naming_the_ttl() {
    let Some(w) = Wire::new() else { return };
    let err = w
        .call(&SessionCreate {
            ttl: Some(Duration::from_secs(5)),
            ..SessionCreate::default()
        })
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.to_string().contains("Invalid Session TTL"), "{err}");
}

#[test]
fn acquire_reads_back_flags_lock_index_session_and_value() {
    let Some(w) = Wire::new() else { return };
    let k = key("acquire");
    let s = w.session(None);
    assert!(w.acquire(&k, &s, b"holder-1"));
    let pair = w.get(&k).unwrap();
    assert_eq!(pair.key, k.as_str());
    assert_eq!(pair.flags, LOCK_FLAG_VALUE);
    assert_eq!(pair.lock_index, 1);
    assert_eq!(pair.session.as_ref(), Some(&s));
    assert_eq!(pair.value, b"holder-1");
    assert!(pair.create_index > 0 && pair.modify_index >= pair.create_index);
}

#[test]
fn acquire_by_another_session_is_refused() {
    let Some(w) = Wire::new() else { return };
    let k = key("contend");
    let (a, b) = (w.session(None), w.session(None));
    assert!(w.acquire(&k, &a, b""));
    assert!(!w.acquire(&k, &b, b""));
    assert_eq!(w.get(&k).unwrap().session, Some(a));
}

#[test]
fn release_frees_the_key_and_writes_the_value() {
    let Some(w) = Wire::new() else { return };
    let k = key("release");
    let s = w.session(None);
    assert!(w.acquire(&k, &s, b"held"));
    let released = w
        .call(&KvRelease {
            key: k.clone(),
            session: s.clone(),
            flags: LOCK_FLAG_VALUE,
            value: b"released".to_vec(),
        })
        .unwrap();
    assert!(released);
    let pair = w.get(&k).unwrap();
    assert_eq!(pair.session, None);
    assert_eq!(pair.value, b"released");
    assert_eq!(pair.flags, LOCK_FLAG_VALUE);
}

#[test]
fn lock_index_grows_only_for_a_new_holder() {
    let Some(w) = Wire::new() else { return };
    let k = key("lock-index");
    let (a, b) = (w.session(None), w.session(None));
    assert!(w.acquire(&k, &a, b""));
    assert_eq!(w.get(&k).unwrap().lock_index, 1);
    // Re-acquire by the holder: no new holder, no new index.
    assert!(w.acquire(&k, &a, b""));
    assert_eq!(w.get(&k).unwrap().lock_index, 1);
    let release = KvRelease {
        key: k.clone(),
        session: a.clone(),
        flags: LOCK_FLAG_VALUE,
        value: vec![],
    };
    assert!(w.call(&release).unwrap());
    assert_eq!(w.get(&k).unwrap().lock_index, 1);
    assert!(w.acquire(&k, &b, b""));
    assert_eq!(w.get(&k).unwrap().lock_index, 2);
}

#[test]
fn blocking_read_returns_on_change_and_otherwise_after_wait() {
    let Some(w) = Wire::new() else { return };
    let k = key("blocking");
    let put = KvCasPut {
        key: k.clone(),
        cas: 0,
        flags: 0,
        value: b"v1".to_vec(),
    };
    assert!(w.call(&put).unwrap());
    let first = w.call(&KvGet::new(k.clone())).unwrap();
    let index = first.meta.index;
    assert!(index > 0);

    // No change: returns after about `wait` (plus up to wait/16), with the same index.
    let wait = Duration::from_millis(600);
    let blocking = KvGet {
        key: k.clone(),
        consistency: Consistency::Default,
        blocking: Some(Blocking { index, wait }),
    };
    let started = Instant::now();
    let unchanged = w.call(&blocking).unwrap();
    let took = started.elapsed();
    assert!(
        took >= wait - Duration::from_millis(50),
        "returned after {took:?}"
    );
    assert_eq!(unchanged.meta.index, index);

    // A change: returns early with a greater index.
    let writer = {
        let (config, http) = (w.config.clone(), w.http.clone());
        let k = k.clone();
        let modify_index = first.value.unwrap().modify_index;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let put = KvCasPut {
                key: k,
                cas: modify_index,
                flags: 0,
                value: b"v2".to_vec(),
            };
            http.call(&config, &put).unwrap().unwrap()
        })
    };
    let long = KvGet {
        blocking: Some(Blocking {
            index,
            wait: Duration::from_secs(20),
        }),
        ..blocking
    };
    let started = Instant::now();
    let changed = w.call(&long).unwrap();
    assert!(writer.join().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(changed.meta.index > index);
    assert_eq!(changed.value.unwrap().value, b"v2");
}

#[test]
fn missing_key_is_none_with_an_index() {
    let Some(w) = Wire::new() else { return };
    let read = w.call(&KvGet::new(key("never-written"))).unwrap();
    assert_eq!(read.value, None);
    assert!(read.meta.index > 0);
    assert_eq!(read.meta.known_leader, Some(true));
    let list = w.call(&KvList::new(key("never-written-prefix/"))).unwrap();
    assert!(list.value.is_empty());
}

#[test]
fn renew_answers_the_ttl_and_404_once_destroyed() {
    let Some(w) = Wire::new() else { return };
    let s = w.session(None);
    let renewed = w
        .call(&SessionRenew { id: s.clone() })
        .unwrap()
        .expect("known session");
    assert_eq!(renewed.id, s);
    assert_eq!(renewed.ttl, Some(Duration::from_secs(30)));
    assert!(w.call(&SessionDestroy { id: s.clone() }).unwrap());
    assert_eq!(w.call(&SessionRenew { id: s.clone() }).unwrap(), None);
    assert_eq!(w.call(&SessionInfo::new(s.clone())).unwrap().value, None);
    // Destroying an unknown session still answers true.
    assert!(w.call(&SessionDestroy { id: s }).unwrap());
}

#[test]
fn destroying_the_session_releases_its_key() {
    let Some(w) = Wire::new() else { return };
    let k = key("destroy-releases");
    let s = w.session(Some(Duration::ZERO));
    assert!(w.acquire(&k, &s, b""));
    assert!(w.call(&SessionDestroy { id: s }).unwrap());
    assert_eq!(w.get(&k).unwrap().session, None);
}

#[test]
fn lock_delay_refuses_acquires_after_invalidation() {
    let Some(w) = Wire::new() else { return };
    let k = key("lock-delay");
    let a = w.session(Some(Duration::from_secs(2)));
    assert!(w.acquire(&k, &a, b""));
    let destroyed_at = Instant::now();
    assert!(w.call(&SessionDestroy { id: a }).unwrap());
    let b = w.session(None);
    // Free, yet refused: this is how a waiter tells lock-delay from contention.
    assert!(!w.acquire(&k, &b, b""));
    assert_eq!(w.get(&k).unwrap().session, None);
    let left = Duration::from_millis(2100).saturating_sub(destroyed_at.elapsed());
    std::thread::sleep(left);
    assert!(w.acquire(&k, &b, b""));
}

#[test]
fn cas_put_and_delete_follow_the_modify_index() {
    let Some(w) = Wire::new() else { return };
    let k = key("cas");
    let create = KvCasPut {
        key: k.clone(),
        cas: 0,
        flags: 7,
        value: b"a".to_vec(),
    };
    assert!(w.call(&create).unwrap());
    // cas=0 only creates.
    assert!(!w.call(&create).unwrap());
    let pair = w.get(&k).unwrap();
    assert_eq!(pair.flags, 7);
    let stale = pair.modify_index;
    let update = KvCasPut {
        key: k.clone(),
        cas: stale,
        flags: 7,
        value: b"b".to_vec(),
    };
    assert!(w.call(&update).unwrap());
    assert!(!w.call(&update).unwrap(), "stale cas put");
    let stale_delete = KvCasDelete {
        key: k.clone(),
        cas: stale,
    };
    assert!(!w.call(&stale_delete).unwrap(), "stale cas delete");
    let current = w.get(&k).unwrap().modify_index;
    assert!(
        w.call(&KvCasDelete {
            key: k.clone(),
            cas: current
        })
        .unwrap()
    );
    assert_eq!(w.get(&k), None);
}

#[test]
fn acquire_with_an_unknown_session_is_a_typed_invalid_session_error() {
    let Some(w) = Wire::new() else { return };
    let bogus = SessionId::new("00000000-0000-0000-0000-000000000000").unwrap();
    let err = w
        .call(&KvAcquire {
            key: key("bogus-session"),
            session: bogus,
            flags: LOCK_FLAG_VALUE,
            value: vec![],
        })
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.is_invalid_session(), "{err}");
}

#[test]
fn every_byte_value_round_trips() {
    let Some(w) = Wire::new() else { return };
    let k = key("bytes");
    let value: Vec<u8> = (0..=255).collect();
    let put = KvCasPut {
        key: k.clone(),
        cas: 0,
        flags: 0,
        value: value.clone(),
    };
    assert!(w.call(&put).unwrap());
    assert_eq!(w.get(&k).unwrap().value, value);
}

#[test]
fn empty_value_reads_back_empty() {
    let Some(w) = Wire::new() else { return };
    let k = key("empty");
    let s = w.session(None);
    assert!(w.acquire(&k, &s, b""));
    assert_eq!(w.get(&k).unwrap().value, Vec::<u8>::new());
}

#[test]
fn awkward_keys_round_trip() {
    let Some(w) = Wire::new() else { return };
    let names = [
        "with space",
        "question?mark",
        "hash#tag",
        "per%cent",
        "per%25cent-encoded-looking",
        "plus+sign",
        "ampersand&equals=",
        "non-ascii/ünïcødé/日本",
        "trailing-slash/",
        "semi;colon",
        "...",
    ];
    let s = w.session(None);
    for name in names {
        let k = key(&format!("awkward/{name}"));
        assert!(w.acquire(&k, &s, name.as_bytes()), "acquire {name:?}");
        let pair = w.get(&k).unwrap_or_else(|| panic!("read back {name:?}"));
        assert_eq!(pair.key, k.as_str());
        assert_eq!(pair.value, name.as_bytes());
    }
    let listed = w.call(&KvList::new(key("awkward/"))).unwrap().value;
    let mut got: Vec<String> = listed.into_iter().map(|p| p.key).collect();
    let mut want: Vec<String> = names.iter().map(|n| format!("wire/awkward/{n}")).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn leading_slash_names_the_same_key_as_go() {
    let Some(w) = Wire::new() else { return };
    let s = w.session(None);
    assert!(w.acquire(&Key::new("/wire/slash").unwrap(), &s, b"x"));
    assert_eq!(w.get(&key("slash")).unwrap().value, b"x");
}

#[test]
fn list_returns_every_key_under_the_prefix() {
    let Some(w) = Wire::new() else { return };
    for i in 0..3 {
        let put = KvCasPut {
            key: key(&format!("list/{i}")),
            cas: 0,
            flags: 1,
            value: vec![i],
        };
        assert!(w.call(&put).unwrap());
    }
    let listed = w
        .call(&KvList {
            consistency: Consistency::Consistent,
            ..KvList::new(key("list/"))
        })
        .unwrap();
    assert_eq!(listed.value.len(), 3);
    assert!(listed.value.iter().all(|p| p.flags == 1));
    let stale = w
        .call(&KvList {
            consistency: Consistency::Stale,
            ..KvList::new(key("list/"))
        })
        .unwrap();
    assert_eq!(stale.value.len(), 3);
}

#[test]
fn namespace_on_open_source_consul_is_a_400() {
    let Some(w) = Wire::new() else { return };
    let config = ClientConfig {
        namespace: Some("team-a".into()),
        ..w.config.clone()
    };
    let err = w.http.call(&config, &KvGet::new(key("ns"))).unwrap().unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert!(!err.is_retryable());
}

#[test]
fn datacenter_parameter_is_honoured() {
    let Some(w) = Wire::new() else { return };
    let dc1 = ClientConfig {
        datacenter: Some("dc1".into()),
        ..w.config.clone()
    };
    assert!(w.http.call(&dc1, &KvGet::new(key("dc"))).unwrap().is_ok());
    let elsewhere = ClientConfig {
        datacenter: Some("nowhere".into()),
        ..w.config.clone()
    };
    let err = w
        .http
        .call(&elsewhere, &KvGet::new(key("dc")))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.status(), Some(500));
    assert!(err.to_string().contains("No path to datacenter"), "{err}");
}

#[test]
fn lock_txn_answers_the_entry_it_wrote() {
    let Some(w) = Wire::new() else { return };
    let k = key("txn-lock");
    let (a, b) = (w.session(None), w.session(None));
    // A missing key is created; the reply is the entry as written, its value left out.
    let first = w.locked(&k, &a, LOCK_FLAG_VALUE, b"holder-a");
    assert_eq!(first.key, k.as_str());
    assert_eq!(
        (first.lock_index, first.flags, first.session.as_ref()),
        (1, LOCK_FLAG_VALUE, Some(&a))
    );
    assert_eq!(first.value, b"");
    assert_eq!(first.create_index, first.modify_index);
    // The stored entry is the same, with the value.
    let stored = w.get(&k).unwrap();
    assert_eq!(
        stored,
        KvPair {
            value: b"holder-a".to_vec(),
            ..first.clone()
        }
    );

    // The holder again, the same value and flags: the entry unchanged, not even re-indexed.
    assert_eq!(w.locked(&k, &a, LOCK_FLAG_VALUE, b"holder-a"), first);
    assert_eq!(w.get(&k).unwrap().modify_index, first.modify_index);
    // The holder with another value and flags: written, with a new ModifyIndex, same LockIndex.
    let rewritten = w.locked(&k, &a, 7, b"again");
    assert_eq!((rewritten.lock_index, rewritten.flags), (1, 7));
    assert!(rewritten.modify_index > first.modify_index);
    assert_eq!(rewritten.create_index, first.create_index);
    let stored = w.get(&k).unwrap();
    assert_eq!((stored.value.as_slice(), stored.flags), (&b"again"[..], 7));

    // Another session: refused, nothing written.
    assert_eq!(
        w.lock_txn(&k, &b, LOCK_FLAG_VALUE, b"holder-b"),
        LockTxnOutcome::Refused(LockRefusal::Held)
    );
    assert_eq!(w.get(&k).unwrap(), stored);

    // Released through the KV endpoint, then taken by the other: a new LockIndex.
    let release = KvRelease {
        key: k.clone(),
        session: a.clone(),
        flags: LOCK_FLAG_VALUE,
        value: vec![],
    };
    assert!(w.call(&release).unwrap());
    let taken = w.locked(&k, &b, LOCK_FLAG_VALUE, b"holder-b");
    assert_eq!((taken.lock_index, taken.session.as_ref()), (2, Some(&b)));
    assert!(taken.modify_index > rewritten.modify_index);
    assert_eq!(w.get(&k).unwrap().value, b"holder-b");
}

#[test]
fn lock_txn_refusals_say_why() {
    let Some(w) = Wire::new() else { return };
    let k = key("txn-lock-refusals");
    let bogus = SessionId::new("00000000-0000-0000-0000-000000000000").unwrap();
    assert_eq!(
        w.lock_txn(&k, &bogus, LOCK_FLAG_VALUE, b""),
        LockTxnOutcome::Refused(LockRefusal::InvalidSession)
    );
    assert_eq!(w.get(&k), None, "a refused lock writes nothing");

    let a = w.session(Some(Duration::from_secs(2)));
    w.locked(&k, &a, LOCK_FLAG_VALUE, b"a");
    let destroyed_at = Instant::now();
    assert!(w.call(&SessionDestroy { id: a }).unwrap());
    let b = w.session(None);
    assert_eq!(
        w.lock_txn(&k, &b, LOCK_FLAG_VALUE, b"b"),
        LockTxnOutcome::Refused(LockRefusal::LockDelay)
    );
    // The lock-delay is checked before the session.
    assert_eq!(
        w.lock_txn(&k, &bogus, LOCK_FLAG_VALUE, b""),
        LockTxnOutcome::Refused(LockRefusal::LockDelay)
    );
    assert_eq!(w.get(&k).unwrap().session, None);
    let left = Duration::from_millis(2100).saturating_sub(destroyed_at.elapsed());
    std::thread::sleep(left);
    let taken = w.locked(&k, &b, LOCK_FLAG_VALUE, b"b");
    assert_eq!((taken.lock_index, taken.session.as_ref()), (2, Some(&b)));
}
