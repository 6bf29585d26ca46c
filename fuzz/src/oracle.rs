//! What every decoder must make of a reply, checked for all eleven endpoints at once:
//! - never a panic (the fuzzer's part);
//! - an error status gives `ApiError::Status` with the status and the trimmed body cut to 512
//!   characters (except where 404 means something: KV reads, renew);
//! - `true`/`false` bodies decode exactly (KV writes, session destroy);
//! - the metadata headers decode exactly, and a garbled one is an error;
//! - the decoders agree with each other (`KvGet` is `KvList` limited to one entry, `SessionRenew`
//!   and `SessionInfo` read the same entry);
//! - the lock transaction (`KvLockTxn`) decodes a 200 to the entry and a 409 to the refusal its
//!   first error's `What` words (or `Malformed`), and any other status to that status's error;
//! - the enqueue transaction (`KvEnqueueTxn`) agrees with it: the same refusals and errors, and
//!   a line whose tree ends with the lock transaction's entry and holds the entry written;
//! - whatever decodes holds only valid session IDs;
//! - a structured reply whose every part is valid decodes to exactly what it was built from.

use std::time::Duration;

use consul_lock_core::api::{
    ApiError, Endpoint, EnqueueOutcome, KvAcquire, KvCasDelete, KvCasPut, KvEnqueueTxn, KvGet, KvList,
    KvLockTxn, KvPair, KvRelease, LockRefusal, LockTxnOutcome, MAX_REPLY_BYTES, QueryMeta, QueryReply,
    SessionCreate, SessionDestroy, SessionEntry, SessionInfo, SessionRenew,
};

use crate::arb_reply::{BodyExpect, Expect, valid_session_text};

/// An error a decoder must give.
#[derive(Debug)]
enum Want {
    /// Exactly this one.
    Exact(ApiError),
    /// Some `ApiError::Malformed`.
    Malformed,
}

fn check_err<T: std::fmt::Debug>(what: &str, got: &Result<T, ApiError>, want: &Want) {
    let ok = match (got, want) {
        (Err(e), Want::Exact(w)) => e == w,
        (Err(ApiError::Malformed { .. }), Want::Malformed) => true,
        _ => false,
    };
    assert!(ok, "{what}: decoded {got:?}, expected {want:?}");
}

fn check<T: std::fmt::Debug + PartialEq>(what: &str, got: &Result<T, ApiError>, want: &Result<T, Want>) {
    match want {
        Ok(w) => assert!(
            matches!(got, Ok(g) if g == w),
            "{what}: decoded {got:?}, expected Ok({w:?})"
        ),
        Err(w) => check_err(what, got, w),
    }
}

/// The error for a non-2xx reply: the status, and the body as text, trimmed, cut to 512
/// characters with `…`.
fn status_error(response: &http::Response<Vec<u8>>) -> ApiError {
    // Consul's API never redirects, so a 3xx is never followed: it names where it pointed, with
    // the `Location` header cut to 200 characters.
    if response.status().is_redirection() {
        let location = response.headers().get(http::header::LOCATION).map_or_else(
            || "<none>".to_owned(),
            |l| String::from_utf8_lossy(l.as_bytes()).into_owned(),
        );
        let location = if location.chars().count() > 200 {
            let mut cut: String = location.chars().take(200).collect();
            cut.push('…');
            cut
        } else {
            location
        };
        return ApiError::Redirect {
            status: response.status().as_u16(),
            location,
        };
    }
    let text = String::from_utf8_lossy(response.body());
    let text = text.trim();
    let body = if text.chars().count() > 512 {
        let mut cut: String = text.chars().take(512).collect();
        cut.push('…');
        cut
    } else {
        text.to_owned()
    };
    ApiError::Status {
        status: response.status().as_u16(),
        body,
    }
}

/// The metadata headers as Consul means them: the first of each name, as text (visible ASCII),
/// without surrounding white space; the index and last contact unsigned decimal numbers, the
/// known-leader flag `true` or `false`. `None` when one is present and isn't that.
pub fn meta(response: &http::Response<Vec<u8>>) -> Option<QueryMeta> {
    // `Some(None)`: absent; `None`: not text.
    let text = |name: &str| -> Option<Option<String>> {
        match response.headers().get(name) {
            None => Some(None),
            Some(v) => {
                let bytes = v.as_bytes();
                bytes
                    .iter()
                    .all(|&c| c == b'\t' || (32..127).contains(&c))
                    .then(|| Some(String::from_utf8_lossy(bytes).trim().to_owned()))
            }
        }
    };
    let number = |name: &str| -> Option<Option<u64>> {
        match text(name)? {
            None => Some(None),
            Some(s) => s.parse::<u64>().ok().map(Some),
        }
    };
    let known_leader = match text("X-Consul-KnownLeader")?.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return None,
    };
    Some(QueryMeta {
        index: number("X-Consul-Index")?.unwrap_or(0),
        known_leader,
        last_contact: number("X-Consul-LastContact")?.map(Duration::from_millis),
    })
}

/// The refusal a 409's `What` means, by Consul's wording (`state/txn.go`, the same from 0.7 to
/// 1.x): held, lock-delay, invalid session, permission denied, tested in that order on the whole text; anything else
/// passed on, cut to 200 characters with `…`.
pub fn refusal(what: &str) -> LockRefusal {
    if what.contains("lock is already held") {
        LockRefusal::Held
    } else if what.contains("lock delay") {
        LockRefusal::LockDelay
    } else if what.contains("invalid session") {
        LockRefusal::InvalidSession
    } else if what.contains("Permission denied") {
        LockRefusal::PermissionDenied
    } else if what.chars().count() > 200 {
        let mut cut: String = what.chars().take(200).collect();
        cut.push('…');
        LockRefusal::Other(cut)
    } else {
        LockRefusal::Other(what.to_owned())
    }
}

/// The lock transaction's checks that hold for any reply: a 200 is the entry (with a valid
/// session) or `Malformed`, a 409 a refusal or `Malformed`, never a status error; any other status,
/// 2xx included, is exactly that status's error; a refusal passed on as `Other` is none of the
/// known ones (they are looked for in the whole text, so no cut of it can hold them).
fn check_txn(response: &http::Response<Vec<u8>>, txn: &Result<LockTxnOutcome, ApiError>) {
    match (response.status().as_u16(), txn) {
        (200, Ok(LockTxnOutcome::Locked(pair))) => check_pair("KvLockTxn", pair),
        (409, Ok(LockTxnOutcome::Refused(LockRefusal::Other(what)))) => {
            assert!(
                what.chars().count() <= 201,
                "KvLockTxn: a refusal passed on uncut: {} characters",
                what.chars().count()
            );
            for known in [
                "lock is already held",
                "lock delay",
                "invalid session",
                "Permission denied",
            ] {
                assert!(
                    !what.contains(known),
                    "KvLockTxn: {what:?} passed on as Other, yet it says {known:?}"
                );
            }
        }
        (409, Ok(LockTxnOutcome::Refused(_))) => {}
        (200 | 409, Err(ApiError::Malformed { .. })) => {}
        (200 | 409, other) => panic!("KvLockTxn: decoded a {} reply to {other:?}", response.status()),
        (_, got) => check_err("KvLockTxn", got, &Want::Exact(status_error(response))),
    }
}

/// The enqueue transaction against the lock transaction, which reads the same answers (its
/// last result, where the enqueue's first is the entry written and the rest the tree).
fn check_enqueue(
    response: &http::Response<Vec<u8>>,
    enqueue: &Result<EnqueueOutcome, ApiError>,
    txn: &Result<LockTxnOutcome, ApiError>,
) {
    match (response.status().as_u16(), enqueue, txn) {
        (200, Ok(EnqueueOutcome::Lined(line)), Ok(LockTxnOutcome::Locked(last))) => {
            check_pair("KvEnqueueTxn", &line.entry);
            line.tree.iter().for_each(|p| check_pair("KvEnqueueTxn", p));
            assert!(
                line.tree.iter().any(|p| p.key == line.entry.key),
                "KvEnqueueTxn: a tree without the entry written: {line:?}"
            );
            assert_eq!(line.tree.last(), Some(last), "KvEnqueueTxn: another last entry");
            let highest = line.tree.iter().map(|p| p.modify_index).max().unwrap_or(0);
            assert_eq!(line.index(), highest.max(line.entry.modify_index));
        }
        // A tree without the entry, or no tree: not Consul's answer to a lock then a get-tree.
        (200, Err(ApiError::Malformed { .. }), _) => {}
        (409, Ok(EnqueueOutcome::Refused(a)), Ok(LockTxnOutcome::Refused(b))) => {
            assert_eq!(a, b, "KvEnqueueTxn: another refusal");
        }
        (409, Err(ApiError::Malformed { .. }), Err(ApiError::Malformed { .. })) => {}
        (200 | 409, got, _) => panic!(
            "KvEnqueueTxn: decoded a {} reply to {got:?} where the lock transaction gave {txn:?}",
            response.status()
        ),
        (_, got, _) => check_err("KvEnqueueTxn", got, &Want::Exact(status_error(response))),
    }
}

fn check_pair(what: &str, pair: &KvPair) {
    if let Some(s) = &pair.session {
        assert!(
            valid_session_text(s.as_str()),
            "{what}: invalid session ID accepted: {s:?}"
        );
    }
}

fn check_entry(what: &str, entry: &SessionEntry) {
    assert!(
        valid_session_text(entry.id.as_str()),
        "{what}: invalid session ID accepted: {:?}",
        entry.id
    );
    if let Some(ttl) = entry.ttl {
        assert!(
            ttl <= Duration::from_nanos(i64::MAX as u64),
            "{what}: TTL {ttl:?} over Go's maximum"
        );
    }
}

/// Decodes `response` with every endpoint and checks the results (see the module's doc).
/// `expect` is what a structured reply was built to mean; `None` for raw bytes.
pub fn check_reply(response: &http::Response<Vec<u8>>, expect: Option<&Expect>) {
    let get = KvGet::decode(response);
    let list = KvList::decode(response);
    let bools = [
        ("KvAcquire", KvAcquire::decode(response)),
        ("KvRelease", KvRelease::decode(response)),
        ("KvCasPut", KvCasPut::decode(response)),
        ("KvCasDelete", KvCasDelete::decode(response)),
        ("SessionDestroy", SessionDestroy::decode(response)),
    ];
    let create = SessionCreate::decode(response);
    let renew = SessionRenew::decode(response);
    let info = SessionInfo::decode(response);
    let txn = KvLockTxn::decode(response);
    let enqueue = KvEnqueueTxn::decode(response);

    if response.body().len() > MAX_REPLY_BYTES {
        return;
    }
    let status = response.status().as_u16();
    let success = response.status().is_success();
    let not_found = status == 404;
    let meta = meta(response);

    // Whatever decodes is valid.
    for r in [&get] {
        if let Ok(QueryReply { value: Some(p), .. }) = r {
            check_pair("KvGet", p);
        }
    }
    if let Ok(q) = &list {
        q.value.iter().for_each(|p| check_pair("KvList", p));
    }
    if let Ok(id) = &create {
        assert!(
            valid_session_text(id.as_str()),
            "SessionCreate: invalid ID {id:?}"
        );
    }
    if let Ok(Some(e)) = &renew {
        check_entry("SessionRenew", e);
    }
    if let Ok(QueryReply { value: Some(e), .. }) = &info {
        check_entry("SessionInfo", e);
    }
    for (what, q) in [
        ("KvGet", get.as_ref().ok().map(|q| q.meta)),
        ("KvList", list.as_ref().ok().map(|q| q.meta)),
        ("SessionInfo", info.as_ref().ok().map(|q| q.meta)),
    ] {
        if let Some(m) = q {
            assert_eq!(Some(m), meta, "{what}: metadata differs from the headers");
        }
    }

    // The lock transaction takes its own statuses (200 and 409), and ignores the metadata.
    check_txn(response, &txn);
    check_enqueue(response, &enqueue, &txn);
    if status == 200 || status == 409 {
        // Its body is a JSON object (or sequence): never the KV writes' bare `true`/`false`.
        if let Ok("true" | "false") = std::str::from_utf8(response.body()).map(str::trim) {
            check_err("KvLockTxn (true/false)", &txn, &Want::Malformed);
        }
        if let Some(Expect {
            body: BodyExpect::Txn { locked, refused },
            ..
        }) = expect
        {
            let want = match (status, locked, refused) {
                (200, Some(pair), _) => Ok(LockTxnOutcome::Locked(pair.clone())),
                (409, _, Some(what)) => Ok(LockTxnOutcome::Refused(refusal(what))),
                _ => Err(Want::Malformed),
            };
            check("KvLockTxn", &txn, &want);
        }
    }

    // Error statuses.
    let status_err = Want::Exact(status_error(response));
    if !success {
        for (what, r) in &bools {
            check_err(what, r, &status_err);
        }
        check_err("SessionCreate", &create, &status_err);
        check_err("SessionInfo", &info, &status_err);
        if not_found {
            check("SessionRenew", &renew, &Ok(None));
            fn want_empty<T>(value: T, meta: Option<QueryMeta>) -> Result<QueryReply<T>, Want> {
                match meta {
                    Some(meta) => Ok(QueryReply { value, meta }),
                    None => Err(Want::Malformed),
                }
            }
            check("KvGet", &get, &want_empty(None, meta));
            check("KvList", &list, &want_empty(Vec::new(), meta));
        } else {
            check_err("SessionRenew", &renew, &status_err);
            check_err("KvGet", &get, &status_err);
            check_err("KvList", &list, &status_err);
        }
        return;
    }

    // `true` / `false`.
    let want_bool = match std::str::from_utf8(response.body()).map(str::trim) {
        Ok("true") => Ok(true),
        Ok("false") => Ok(false),
        _ => Err(Want::Malformed),
    };
    for (what, r) in &bools {
        check(what, r, &want_bool);
    }

    // A garbled metadata header spoils every read.
    if meta.is_none() {
        check_err("KvGet", &get, &Want::Malformed);
        check_err("KvList", &list, &Want::Malformed);
        check_err("SessionInfo", &info, &Want::Malformed);
    }

    // The decoders agree.
    match &list {
        Ok(q) if q.value.len() <= 1 => check(
            "KvGet (as KvList)",
            &get,
            &Ok(QueryReply {
                value: q.value.first().cloned(),
                meta: q.meta,
            }),
        ),
        Ok(_) => check_err("KvGet (several entries)", &get, &Want::Malformed),
        Err(_) => assert!(
            get.is_err(),
            "KvGet decoded {get:?} where KvList failed: {list:?}"
        ),
    }
    match (&renew, &info) {
        (Ok(Some(e)), Ok(q)) => {
            assert_eq!(q.value.as_ref(), Some(e), "SessionInfo differs from SessionRenew")
        }
        (Ok(Some(_)), Err(e)) => assert!(
            meta.is_none() && matches!(e, ApiError::Malformed { .. }),
            "SessionInfo failed ({e:?}) where SessionRenew decoded {renew:?}"
        ),
        (Ok(None), _) => panic!("SessionRenew gave no session on a {status} reply"),
        (Err(_), Ok(QueryReply { value: Some(e), .. })) => {
            panic!("SessionRenew failed ({renew:?}) where SessionInfo decoded {e:?}")
        }
        (Err(_), _) => {}
    }

    // A structured reply whose every part is valid.
    let Some(expect) = expect else { return };
    let Some(meta) = expect.meta else { return };
    match &expect.body {
        BodyExpect::Unknown => {}
        BodyExpect::Bool(b) => {
            for (what, r) in &bools {
                check(what, r, &Ok(*b));
            }
        }
        BodyExpect::EmptyList => {
            check("KvGet", &get, &Ok(QueryReply { value: None, meta }));
            check(
                "KvList",
                &list,
                &Ok(QueryReply {
                    value: Vec::new(),
                    meta,
                }),
            );
            check("SessionInfo", &info, &Ok(QueryReply { value: None, meta }));
            check_err("SessionRenew", &renew, &Want::Malformed);
        }
        BodyExpect::Kvs(pairs) => {
            check(
                "KvList",
                &list,
                &Ok(QueryReply {
                    value: pairs.clone(),
                    meta,
                }),
            );
        }
        BodyExpect::Sessions(entries) => {
            let first = entries.first().cloned();
            check("SessionRenew", &renew, &Ok(first.clone()));
            check("SessionInfo", &info, &Ok(QueryReply { value: first, meta }));
        }
        BodyExpect::Created(id) => check("SessionCreate", &create, &Ok(id.clone())),
        // Checked above, whatever the headers: the transaction reads none.
        BodyExpect::Txn { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds::{REAL_REPLIES, real_reply};

    #[test]
    fn real_replies_pass_and_decode() {
        for (i, (name, _)) in REAL_REPLIES.iter().enumerate() {
            let r = real_reply(i);
            check_reply(&r, None);
            let ok = match name.split('-').take(2).collect::<Vec<_>>()[..] {
                ["kv", "get" | "list"] => KvList::decode(&r).is_ok() || name.contains("400"),
                ["kv", _] => KvAcquire::decode(&r).is_ok() || name.contains("500"),
                ["session", "create"] => SessionCreate::decode(&r).is_ok() || name.contains("500"),
                ["session", "renew"] => SessionRenew::decode(&r).is_ok(),
                ["session", "info"] => SessionInfo::decode(&r).is_ok(),
                ["session", "destroy"] => SessionDestroy::decode(&r).is_ok(),
                ["txn", "lock"] => KvLockTxn::decode(&r).is_ok(),
                ["txn", "enqueue"] => matches!(KvEnqueueTxn::decode(&r), Ok(EnqueueOutcome::Lined(_))),
                _ => false,
            };
            assert!(ok, "{name} does not decode: {r:?}");
        }
    }

    #[test]
    fn real_lock_transactions_decode_as_consul_means_them() {
        let outcome = |name: &str| {
            let i = REAL_REPLIES
                .iter()
                .position(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("no seed {name}"));
            KvLockTxn::decode(&real_reply(i)).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        for name in ["txn-lock-200.http", "txn-lock-again-200.http"] {
            let LockTxnOutcome::Locked(pair) = outcome(name) else {
                panic!("{name} is not a grant")
            };
            // The holder taking its key again gets the entry unchanged (Consul 1.8.7).
            assert_eq!((pair.key.as_str(), pair.lock_index), ("fuzz/lock", 1), "{name}");
            assert!(
                pair.session.is_some() && pair.modify_index > 0,
                "{name}: {pair:?}"
            );
        }
        for (name, why) in [
            ("txn-lock-held-409.http", LockRefusal::Held),
            ("txn-lock-delay-409.http", LockRefusal::LockDelay),
            ("txn-lock-invalid-session-409.http", LockRefusal::InvalidSession),
        ] {
            assert_eq!(outcome(name), LockTxnOutcome::Refused(why), "{name}");
        }
    }

    /// The structured lock transaction replies predict exact outcomes, and the predictions hold.
    #[test]
    fn structured_lock_transactions_are_predicted() {
        use crate::arb_reply::{
            Body, Elem, Id, LeaderHeader, List, Meta, Num, NumHeader, Reply, Shape, Status, Text, Txn,
            TxnError, TxnResult, Value, What,
        };
        let kv = crate::arb_reply::Kv {
            key: Text::Plain("fuzz/lock".to_owned()),
            create_index: Num::Small(5),
            modify_index: Num::U64(9),
            lock_index: Num::Small(2),
            flags: Num::Max,
            value: Value::Null,
            session: Id::Known(0),
            extra: None,
        };
        let error = |what| TxnError {
            op_index: Num::Small(0),
            what,
        };
        let reply = |status, txn| Reply {
            status,
            meta: Meta {
                index: NumHeader::Absent,
                leader: LeaderHeader::Absent,
                contact: NumHeader::Absent,
                extra: Vec::new(),
            },
            body: Body {
                shape: Shape::Txn(txn),
                pretty: true,
                pad: (0, 2),
                cut: None,
            },
        };
        let cases = [
            (
                Status::Ok,
                Txn {
                    results: List::Items(vec![Elem::Entry(TxnResult::Kv(kv.clone()))]),
                    errors: List::Null,
                    extra: None,
                },
                Ok(LockTxnOutcome::Locked(kv.expected().expect("valid"))),
            ),
            (
                Status::Common(0),
                Txn {
                    results: List::Null,
                    errors: List::Items(vec![Elem::Entry(error(What::Held("fuzz/lock".to_owned())))]),
                    extra: None,
                },
                Err(()),
            ),
            (
                Status::Any(409),
                Txn {
                    results: List::Null,
                    errors: List::Items(vec![
                        Elem::Entry(error(What::Delay("k".to_owned()))),
                        Elem::Entry(error(What::Held("k".to_owned()))),
                    ]),
                    extra: None,
                },
                Ok(LockTxnOutcome::Refused(LockRefusal::LockDelay)),
            ),
            (
                Status::Any(409),
                Txn {
                    results: List::Absent,
                    errors: List::Items(vec![Elem::Entry(error(What::Text(Text::Absent)))]),
                    extra: None,
                },
                Ok(LockTxnOutcome::Refused(LockRefusal::Other(String::new()))),
            ),
            (
                Status::Ok,
                Txn {
                    results: List::Items(vec![Elem::Entry(TxnResult::KvNull)]),
                    errors: List::Absent,
                    extra: None,
                },
                Err(()),
            ),
        ];
        for (status, txn, want) in cases {
            let (response, expect) = reply(status, txn).build();
            check_reply(&response, Some(&expect));
            let got = KvLockTxn::decode(&response);
            match want {
                Ok(w) => assert_eq!(got.as_ref().ok(), Some(&w), "{response:?}"),
                Err(()) => assert!(got.is_err(), "{response:?}: {got:?}"),
            }
        }
    }
}
