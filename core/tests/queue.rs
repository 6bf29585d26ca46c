//! Queued waiting (`Waiting::Queue`), driven by hand with crafted replies: the line's requests,
//! the entry ahead and only it, dead entries, an entry an operator deleted, a refusal at the
//! head, and leaving the line on cancel. Every step is checked against the invariants in
//! `support` (the checker knows the queued lock's requests). The line's order among many
//! contenders, crashes and operators are the simulator's (`tests/tests/sim_queue.rs`).

#![allow(clippy::unwrap_used)]

mod support;

use consul_lock_core::machine::{LockEvent, LockOptions, QUEUE_FLAG_VALUE, Waiting};
use support::reply::{self, yes};
use support::{FLAGS, Kv, Rig, entry, ms, options, renew_ok, secs};

fn queued() -> LockOptions {
    let mut o = options();
    o.waiting = Waiting::Queue;
    o
}

/// The entry of `session` in the line, created at `create`.
fn line_entry(session: &str, create: u64) -> Kv {
    Kv {
        key: format!("k/.queue/{session}"),
        lock_index: 1,
        flags: QUEUE_FLAG_VALUE,
        value: Vec::new(),
        session: Some(session.to_owned()),
        create_index: create,
        modify_index: create,
    }
}

/// A recursive list of `k` at `index`.
fn listing(index: u64, entries: &[Kv]) -> consul_lock_core::machine::Reply {
    let body = serde_json::Value::Array(entries.iter().map(Kv::json).collect()).to_string();
    reply::raw(200, Some(index), Some(true), body)
}

fn enqueue_pattern(session: &str) -> String {
    format!("PUT /v1/txn?verb=lock&key=k/.queue/{session}&session={session}&flags={QUEUE_FLAG_VALUE}&tree=k")
}

fn acquire_pattern(session: &str) -> String {
    format!("PUT /v1/txn?verb=lock&key=k&session={session}&flags={FLAGS}&leaves=k/.queue/{session}")
}

/// A queued lock on session `s1`, enqueued with its entry created at 7 (the transaction's
/// index), the enqueue's tree showing `others` beside it.
fn in_line(others: &[Kv]) -> Rig {
    let mut r = Rig::new(queued());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    let mine = line_entry("s1", 7);
    let mut tree = others.to_vec();
    tree.push(mine.clone());
    tree.sort_by(|a, b| a.key.cmp(&b.key));
    r.answer(&enqueue_pattern("s1"), reply::lined(&mine, &tree));
    r
}

#[test]
fn alone_it_lines_up_and_takes_the_key_leaving_the_line_in_the_same_write() {
    let mut r = in_line(&[]);
    // The enqueue's tree showed the line: no list before the acquire.
    let held = entry().held_by("s1", 1).modified(9);
    r.answer(&acquire_pattern("s1"), reply::locked(&held));
    match &r.outcomes()[..] {
        [LockEvent::Acquired(token)] => assert_eq!(token.modify_index, 9),
        other => panic!("expected Acquired, got {other:?}"),
    }
    // Nothing reads the line while holding: only the monitor of the key.
    assert!(r.find("GET /v1/kv/k?recurse").is_none());
    r.expect("GET /v1/kv/k?consistent&index=9");
}

#[test]
fn a_waiter_watches_only_the_entry_ahead_and_looks_again_when_it_goes() {
    let holder = entry().held_by("a", 1).modified(4);
    let mut r = in_line(&[holder.clone(), line_entry("a", 3), line_entry("b", 5)]);
    // Only b, just ahead: not a, not the key; from the enqueue's own index, with no list.
    let ahead = r.expect("GET /v1/kv/k/.queue/b?index=7&wait=*");
    assert!(r.find("GET /v1/kv/k?recurse").is_none());
    assert_eq!(r.count("GET /v1/kv/k?index=*"), 0);
    // b leaves (acquired, gave up or died): one list finds the next one ahead, a.
    r.reply(ahead.id, reply::missing(10));
    r.answer(
        "GET /v1/kv/k?recurse",
        listing(10, &[holder, line_entry("a", 3), line_entry("s1", 7)]),
    );
    let ahead = r.expect("GET /v1/kv/k/.queue/a?index=10&wait=*");
    // a acquired the key and left the line: we are the head, and wait on the key itself.
    r.reply(ahead.id, reply::missing(12));
    let a_holds = entry().held_by("a", 2).modified(12);
    r.answer(
        "GET /v1/kv/k?recurse",
        listing(12, &[a_holds, line_entry("s1", 7)]),
    );
    let read = r.expect("GET /v1/kv/k?index=12&wait=*");
    r.reply(read.id, reply::kv(14, &entry().free().modified(14)));
    r.answer(
        &acquire_pattern("s1"),
        reply::locked(&entry().held_by("s1", 3).modified(15)),
    );
    assert!(matches!(&r.outcomes()[..], [LockEvent::Acquired(_)]));
}

#[test]
fn an_entry_ahead_unchanged_while_the_agent_moves_is_read_again_without_a_list() {
    let mut r = in_line(&[entry().held_by("a", 1), line_entry("a", 3)]);
    // Another key moved the agent's index: Consul answers at once, the entry as it was.
    r.advance(secs(2));
    let since = r.now();
    r.answer(
        "GET /v1/kv/k/.queue/a?index=7",
        reply::kv(20, &line_entry("a", 3)),
    );
    r.expect("GET /v1/kv/k/.queue/a?index=20&wait=*");
    let sent: Vec<String> = r.sent_since(since).iter().map(|s| s.describe()).collect();
    assert_eq!(sent.len(), 1, "only the read again: {sent:?}");
}

#[test]
fn a_dead_entry_just_ahead_is_skipped_and_cleared_once() {
    let mut dead = line_entry("d", 5);
    dead.session = None;
    dead.modify_index = 6;
    let mut r = in_line(&[entry().held_by("a", 1), line_entry("a", 3), dead]);
    r.expect("GET /v1/kv/k/.queue/a?index=7&wait=*");
    r.answer("DELETE /v1/kv/k/.queue/d?cas=6", yes());
}

#[test]
fn our_entry_deleted_by_an_operator_is_taken_again_in_its_place_within_a_wait() {
    let mut r = in_line(&[entry().held_by("a", 1), line_entry("a", 3)]);
    let ahead = r.expect("GET /v1/kv/k/.queue/a?index=7&wait=*");
    // The wait runs out without news (the session renewed meanwhile): list once, which shows
    // our entry gone.
    r.run(secs(15), renew_ok);
    r.reply(ahead.id, reply::kv(7, &line_entry("a", 3)));
    r.answer(
        "GET /v1/kv/k?recurse",
        listing(9, &[entry().held_by("a", 1), line_entry("a", 3)]),
    );
    let again = r.expect(&enqueue_pattern("s1"));
    assert_eq!(
        again.value(),
        b"7",
        "the entry made again carries its first CreateIndex"
    );
    let mut remade = line_entry("s1", 11);
    remade.value = b"7".to_vec();
    r.reply(
        again.id,
        reply::lined(
            &remade,
            &[entry().held_by("a", 1), line_entry("a", 3), remade.clone()],
        ),
    );
    // Taken again, the line was disturbed: others ranked ahead may be re-making theirs just
    // now, so the enqueue's tree is not trusted; a list a round trip later is.
    let list = r.expect("GET /v1/kv/k?recurse&!index");
    assert!(r.find("GET /v1/kv/k/.queue/a").is_none(), "not from the tree");
    // A waiter that came between (created at 9) stays behind us.
    r.reply(
        list.id,
        listing(
            11,
            &[
                entry().held_by("a", 1),
                line_entry("a", 3),
                line_entry("c", 9),
                remade,
            ],
        ),
    );
    r.expect("GET /v1/kv/k/.queue/a?index=11&wait=*");
    assert!(r.find("GET /v1/kv/k/.queue/c").is_none());
}

#[test]
fn a_head_refused_for_an_outsider_keeps_its_place_and_waits_on_the_key() {
    let mut r = in_line(&[entry().free()]);
    let start = r.now();
    // Go's client took the key meanwhile: the transaction is refused, the delete rolled back.
    r.answer(&acquire_pattern("s1"), reply::lock_held());
    r.answer(
        "GET /v1/kv/k?!index",
        reply::kv(9, &entry().held_by("go", 1).modified(9)),
    );
    r.expect("GET /v1/kv/k?index=9&wait=*");
    let deletes = r
        .sent_since(start)
        .iter()
        .filter(|s| s.method == "DELETE")
        .count();
    assert_eq!(deletes, 0, "still in line");
}

#[test]
fn a_cancel_while_waiting_leaves_the_line_before_the_session_goes() {
    let mut r = in_line(&[entry().held_by("a", 1), line_entry("a", 3)]);
    r.cancel();
    assert!(matches!(&r.outcomes()[..], [LockEvent::Cancelled]));
    let leave = r.expect("DELETE /v1/kv/k/.queue/s1?!cas");
    assert!(
        r.find("PUT /v1/session/destroy/s1").is_none(),
        "the entry goes first"
    );
    r.reply(leave.id, yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

#[test]
fn a_cancel_with_the_enqueue_in_flight_waits_for_it_then_leaves() {
    let mut r = Rig::new(queued());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    let enqueue = r.expect(&enqueue_pattern("s1"));
    r.cancel();
    assert!(matches!(&r.outcomes()[..], [LockEvent::Cancelled]));
    assert!(
        r.find("DELETE /v1/kv/k/.queue/s1").is_none(),
        "not before the enqueue lands"
    );
    let mine = line_entry("s1", 7);
    r.reply(enqueue.id, reply::lined(&mine, std::slice::from_ref(&mine)));
    r.answer("DELETE /v1/kv/k/.queue/s1", yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

#[test]
fn a_cancel_while_an_earlier_attempts_acquire_is_settled_keeps_that_work() {
    let mut r = in_line(&[]);
    let acquire = r.expect(&acquire_pattern("s1"));
    r.cancel();
    assert!(matches!(&r.outcomes()[..], [LockEvent::Cancelled]));
    // Again on the same session: it waits for the abandoned acquire before taking its entry.
    r.advance(ms(1));
    let again = r.now();
    r.lock().unwrap();
    assert!(r.sent_since(again).is_empty(), "{:?}", r.sent_since(again));
    r.cancel();
    assert!(matches!(&r.outcomes()[..], [LockEvent::Cancelled]));
    // The abandoned acquire was granted: the key is given back before the session goes (the
    // grant took the entry with it).
    r.reply(acquire.id, reply::locked(&entry().held_by("s1", 1).modified(9)));
    r.answer(&format!("PUT /v1/kv/k?release=s1&flags={FLAGS}"), yes());
    r.answer("PUT /v1/session/destroy/s1", yes());
    assert!(r.m().is_quiescent());
}

/// The enqueue's answer is one transaction's: a 500, a garbled body or a tree without our entry
/// is tried again (paced, reported, counted against the error budget), never taken for a line;
/// a refusal for permission ends the attempt with a typed error.
#[test]
fn a_failed_or_garbled_enqueue_is_tried_again_and_a_permission_refusal_is_fatal() {
    let mut r = Rig::new(queued());
    r.lock().unwrap();
    r.answer("PUT /v1/session/create", reply::created("s1"));
    let mine = line_entry("s1", 7);
    let garbled = [
        reply::status(500, "rpc error: No cluster leader"),
        reply::raw(200, None, None, "{\"Results\":[{\"KV\":"),
        // The tree is read after the lock: without our entry it is not Consul's answer.
        reply::lined(&mine, &[entry().free()]),
    ];
    for answer in garbled {
        let enqueue = r.expect(&enqueue_pattern("s1"));
        r.reply(enqueue.id, answer);
        match &r.events()[..] {
            [LockEvent::Retrying(_)] => {}
            other => panic!("expected a retry, got {other:?}"),
        }
        assert_eq!(r.count("GET /v1/kv/k*"), 0, "nothing read as a line");
        r.advance(secs(3));
        r.run(ms(1), |_, _| None);
    }
    r.answer(&enqueue_pattern("s1"), reply::lock_refused("Permission denied"));
    assert!(matches!(
        &r.outcomes()[..],
        [LockEvent::Failed(
            consul_lock_core::machine::LockError::PermissionDenied(_)
        )]
    ));
}
