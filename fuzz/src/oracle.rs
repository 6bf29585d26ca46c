//! What every decoder must make of a reply, checked for all ten endpoints at once:
//! - never a panic (the fuzzer's part);
//! - an error status gives `ApiError::Status` with the status and the trimmed body cut to 512
//!   characters (except where 404 means something: KV reads, renew);
//! - `true`/`false` bodies decode exactly (KV writes, session destroy);
//! - the metadata headers decode exactly, and a garbled one is an error;
//! - the decoders agree with each other (`KvGet` is `KvList` limited to one entry, `SessionRenew`
//!   and `SessionInfo` read the same entry);
//! - whatever decodes holds only valid session IDs;
//! - a structured reply whose every part is valid decodes to exactly what it was built from.

use std::time::Duration;

use consul_lock_core::api::{
    ApiError, Endpoint, KvAcquire, KvCasDelete, KvCasPut, KvGet, KvList, KvPair, KvRelease, MAX_REPLY_BYTES,
    QueryMeta, QueryReply, SessionCreate, SessionDestroy, SessionEntry, SessionInfo, SessionRenew,
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
                _ => false,
            };
            assert!(ok, "{name} does not decode: {r:?}");
        }
    }
}
