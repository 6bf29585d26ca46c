//! `consul-lock status` and `consul-lock watch`: what a lock's or a semaphore's keys say, read
//! with one list of the prefix (`GET /v1/kv/<base>?recurse`), plus `/v1/session/info` for the
//! holders' names and nodes. When the list shows a lock, `status` asks the driver who leads it
//! (`Client::leader`: one consistent read of the key, and the leader's session), so that
//! `status`, `watch` and the library give one description of the leader (session, node, session
//! name, value, sequence); `--stale` keeps the listing's answer, as the observer reads
//! consistently. `watch` repeats the list as a blocking read and prints a line when
//! the leadership it shows changes; while someone holds a lock it follows the lock key with the
//! driver's observer instead (core's `ObserverMachine`: each change of leader or of its value,
//! once and in order, and a line when it could not see for a while), and lists again once
//! nobody leads (a deleted key, a semaphore there next). A lock's value is shown, so a leader's
//! proclaim is a change.
//!
//! `<KEY_OR_PREFIX>` names a *base*: a lock key held with Go's `api.Lock` (`service/leader`),
//! or a `consul lock` prefix, whose lock is `<base>/.lock` and whose semaphore keys are
//! `<base>/.lock` (the holders) and `<base>/<session>` (one per contender). A trailing `/.lock`
//! is taken off, so the lock key itself names its prefix.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use consul_lock_core::api::{
    Blocking, Consistency, Key, KvGet, KvList, KvPair, SessionEntry, SessionId, SessionInfo,
};
use consul_lock_core::machine::{
    LOCK_FLAG_VALUE, Leader, ObserveEvent, SEMAPHORE_FLAG_VALUE, SemaphoreState,
};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{StatusArgs, WatchArgs};
use crate::consul::{Api, CallError};
use crate::flags;
use crate::out;
use crate::{Failure, Kind};

/// Consul's default blocking wait, and the longest a watch read waits.
const WATCH_WAIT: Duration = Duration::from_secs(300);
/// The deadline of plain reads.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the keys under a base say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum View {
    /// No key: no lock was taken here (or it was cleaned up).
    Absent {
        /// The base looked at.
        base: String,
    },
    /// A lock key (with Go's lock flags).
    Lock {
        /// The key.
        pair: KvPair,
    },
    /// A semaphore.
    Semaphore(Semaphore),
    /// A key that is neither a lock nor a semaphore's.
    Other {
        /// The key.
        key: String,
        /// Its flags.
        flags: u64,
    },
}

/// A semaphore's state, from its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Semaphore {
    /// The prefix.
    prefix: String,
    /// The `.lock` key, when it exists.
    lock: Option<KvPair>,
    /// The limit it records (`None`: no `.lock` yet, or unreadable).
    limit: Option<u32>,
    /// Why the `.lock` can't be read, if it can't.
    problem: Option<String>,
    /// The holders it lists, each with its contender key when that is alive (held by a session).
    holders: BTreeMap<String, Option<KvPair>>,
    /// Live contender keys whose sessions are not holders: those waiting for a slot.
    waiting: Vec<KvPair>,
}

impl Semaphore {
    /// The holders whose contender key is alive, as Go counts them.
    fn live_holders(&self) -> impl Iterator<Item = (&String, &KvPair)> {
        self.holders.iter().filter_map(|(s, k)| Some((s, k.as_ref()?)))
    }
}

/// The base named by `arg`: a leading `/` and a trailing `/` or `/.lock` taken off.
pub(crate) fn base_of(arg: &str) -> Result<Key, Failure> {
    crate::check_key("the key", arg)?;
    let trimmed = arg.strip_prefix('/').unwrap_or(arg).trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/.lock").unwrap_or(trimmed);
    Key::new(trimmed).map_err(|e| Failure::usage(format!("{} is not a usable key: {e}", crate::quoted(arg))))
}

/// Reads the keys under `base` into a [`View`].
pub(crate) fn view(base: &str, pairs: &[KvPair]) -> View {
    let lock_key = format!("{base}/.lock");
    let exact = pairs.iter().find(|p| p.key == base);
    let dot_lock = pairs.iter().find(|p| p.key == lock_key);
    if let Some(p) = exact.filter(|p| p.flags == LOCK_FLAG_VALUE) {
        return View::Lock { pair: p.clone() };
    }
    if let Some(p) = dot_lock.filter(|p| p.flags == LOCK_FLAG_VALUE) {
        return View::Lock { pair: p.clone() };
    }
    let child_prefix = format!("{base}/");
    let contenders: Vec<&KvPair> = pairs
        .iter()
        .filter(|p| p.flags == SEMAPHORE_FLAG_VALUE && p.key != lock_key)
        .filter(|p| {
            p.key
                .strip_prefix(&child_prefix)
                .is_some_and(|rest| !rest.contains('/'))
        })
        .collect();
    let semaphore_lock = dot_lock.filter(|p| p.flags == SEMAPHORE_FLAG_VALUE);
    if semaphore_lock.is_some() || !contenders.is_empty() {
        let (limit, problem, listed) = match semaphore_lock.map(|p| SemaphoreState::decode(&p.value, 0)) {
            Some(Ok(state)) => (Some(state.limit), None, state.holders.into_keys().collect()),
            Some(Err(e)) => (None, Some(e), Vec::new()),
            None => (None, None, Vec::new()),
        };
        let live = |session: &str| {
            contenders
                .iter()
                .find(|p| p.session.as_ref().is_some_and(|s| s.as_str() == session))
                .map(|p| (*p).clone())
        };
        let holders: BTreeMap<String, Option<KvPair>> = listed
            .into_iter()
            .map(|s| {
                let pair = live(&s);
                (s, pair)
            })
            .collect();
        let waiting = contenders
            .iter()
            .filter(|p| {
                p.session
                    .as_ref()
                    .is_some_and(|s| !holders.contains_key(s.as_str()))
            })
            .map(|p| (*p).clone())
            .collect();
        return View::Semaphore(Semaphore {
            prefix: base.to_owned(),
            lock: semaphore_lock.cloned(),
            limit,
            problem,
            holders,
            waiting,
        });
    }
    match dot_lock.or(exact) {
        Some(p) => View::Other {
            key: p.key.clone(),
            flags: p.flags,
        },
        None => View::Absent {
            base: base.to_owned(),
        },
    }
}

/// What identifies the leadership a view shows: a change of it is a line of `watch`.
fn identity(view: &View) -> String {
    match view {
        View::Absent { .. } => "absent".to_owned(),
        // The value too: a leader proclaiming a new one is a change to show.
        View::Lock { pair } => format!(
            "lock {} {:?} {} {:?}",
            pair.key,
            pair.session.as_ref().map(SessionId::as_str),
            pair.lock_index,
            pair.value
        ),
        View::Semaphore(s) => {
            let holders: Vec<&str> = s.live_holders().map(|(h, _)| h.as_str()).collect();
            format!("semaphore {:?} {holders:?} {:?}", s.limit, s.problem)
        }
        View::Other { key, flags } => format!("other {key} {flags}"),
    }
}

/// Session details, fetched once per session.
#[derive(Default)]
struct Sessions {
    known: HashMap<String, Option<SessionEntry>>,
}

impl Sessions {
    async fn get(&mut self, api: &Api, id: &str) -> Option<SessionEntry> {
        if let Some(entry) = self.known.get(id) {
            return entry.clone();
        }
        let entry = match SessionId::new(id) {
            Ok(sid) => api
                .call(&SessionInfo::new(sid), READ_TIMEOUT)
                .await
                .ok()
                .and_then(|r| r.value),
            Err(_) => None,
        };
        self.known.insert(id.to_owned(), entry.clone());
        entry
    }
}

fn session_json(id: &str, entry: Option<&SessionEntry>) -> Value {
    match entry {
        Some(e) => json!({
            "session": id,
            "name": e.name,
            "node": e.node,
            "session_create_index": e.create_index,
            "lock_delay_ms": out::millis(e.lock_delay),
        }),
        None => json!({ "session": id, "name": null, "node": null }),
    }
}

fn session_text(id: &str, entry: Option<&SessionEntry>) -> String {
    holder_text(id, entry.map(|e| (e.name.as_str(), e.node.as_str())))
}

/// A holder for a line of text: its session, and its session's name and node when known.
fn holder_text(id: &str, known: Option<(&str, &str)>) -> String {
    match known {
        Some((name, node)) => format!("session {id} ({name:?} on node {node})"),
        None => format!("session {id} (no longer known to Consul)"),
    }
}

/// The lock key as the observer's `leader` shows it: the key's fields the observer reports.
fn leader_pair(leader: &Leader) -> KvPair {
    KvPair {
        key: leader.key.as_str().to_owned(),
        create_index: 0,
        modify_index: leader.sequence,
        lock_index: leader.lock_index,
        flags: LOCK_FLAG_VALUE,
        value: leader.value.clone(),
        session: Some(leader.session.clone()),
    }
}

/// The leader as JSON, with the field names of the observer's `Leader` (all but `since`, an instant
/// of this process).
fn leader_json(session: &str, node: Option<&str>, name: Option<&str>, pair: &KvPair) -> Value {
    json!({
        "session": session,
        "node": node,
        "session_name": name,
        "value": String::from_utf8_lossy(&pair.value),
        "lock_index": pair.lock_index,
        "sequence": pair.modify_index,
    })
}

/// A key's value for a line of text: quoted, cut at 80 characters.
fn value_text(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Where the leader of a lock view comes from.
#[derive(Clone, Copy, Debug)]
enum Source<'a> {
    /// The listing of the base (and `/v1/session/info` for the holder): a semaphore, `--stale`,
    /// and `watch` between leaders.
    Listing,
    /// The driver's observer: its leader, or `None` when it saw nobody lead. The view's pair
    /// is then the observer's (see [`leader_pair`]).
    Observer(Option<&'a Leader>),
}

/// The view as a JSON object, and as lines of text. With [`Source::Observer`], a lock's holder
/// (session name and node) is the observer's.
async fn render(view: &View, api: &Api, sessions: &mut Sessions, source: Source<'_>) -> (Value, Vec<String>) {
    match view {
        View::Absent { base } => (
            json!({ "kind": "absent", "key": base }),
            vec![format!(
                "nothing at {base} or {base}/.lock: no lock has been taken there (or it was cleaned up)"
            )],
        ),
        View::Other { key, flags } => (
            json!({ "kind": "other", "key": key, "flags": flags }),
            vec![format!(
                "{key} is not a lock or a semaphore's key (flags {flags:#x}); \
                 consul-lock and consul lock would refuse to use it"
            )],
        ),
        View::Lock { pair } => {
            let mut lines = vec![format!("lock {}", pair.key)];
            let observed = match source {
                Source::Observer(Some(l)) if pair.session.as_ref() == Some(&l.session) => Some(l),
                _ => None,
            };
            let mut leader_value = Value::Null;
            let holder = match &pair.session {
                Some(s) => {
                    // The session's create index and lock delay: details the observer does not
                    // report, looked up even when it named the holder.
                    let entry = sessions.get(api, s.as_str()).await;
                    let (name, node) = match observed {
                        Some(l) => (l.session_name.clone(), l.node.clone()),
                        None => (
                            entry.as_ref().map(|e| e.name.clone()),
                            entry.as_ref().map(|e| e.node.clone()),
                        ),
                    };
                    let known = name.as_deref().zip(node.as_deref());
                    lines.push(format!("  held by   {}", holder_text(s.as_str(), known)));
                    leader_value = leader_json(s.as_str(), node.as_deref(), name.as_deref(), pair);
                    lines.push(format!(
                        "  since     Raft index {} (the acquiring write, unless the holder wrote the key \
                         again){}; Consul keeps no wall-clock time",
                        pair.modify_index,
                        entry
                            .as_ref()
                            .map(|e| format!("; session created at index {}", e.create_index))
                            .unwrap_or_default()
                    ));
                    let mut holder = session_json(s.as_str(), entry.as_ref());
                    holder["name"] = name.into();
                    holder["node"] = node.into();
                    holder
                }
                None => {
                    lines.push("  free      (nobody holds it)".to_owned());
                    Value::Null
                }
            };
            lines.push(format!(
                "  fencing token {} (the sequence: the key's ModifyIndex)   LockIndex {} \
                 (holders so far, what Go exposes)",
                pair.modify_index, pair.lock_index
            ));
            if !pair.value.is_empty() {
                lines.push(format!("  value     {}", value_text(&pair.value)));
            }
            (
                json!({
                    "kind": "lock",
                    "key": pair.key,
                    "value": String::from_utf8_lossy(&pair.value),
                    "held": pair.session.is_some(),
                    "holder": holder,
                    "lock_index": pair.lock_index,
                    "modify_index": pair.modify_index,
                    "sequence": pair.modify_index,
                    "leader": leader_value,
                    "source": match source {
                        Source::Listing => "listing",
                        Source::Observer(_) => "observer",
                    },
                }),
                lines,
            )
        }
        View::Semaphore(s) => {
            let live = s.live_holders().count();
            let mut lines = vec![match s.limit {
                Some(limit) => format!(
                    "semaphore {} (limit {limit}): {live} of {limit} slots held, {} waiting",
                    s.prefix,
                    s.waiting.len()
                ),
                None => format!(
                    "semaphore {} (no limit recorded yet: its .lock is not written): {live} held, {} waiting",
                    s.prefix,
                    s.waiting.len()
                ),
            }];
            if let Some(lock) = &s.lock {
                lines.push(format!(
                    "  sequence  {} (the .lock's ModifyIndex; a holder's fencing token is what it was \
                     when that holder joined)",
                    lock.modify_index
                ));
            }
            if let Some(problem) = &s.problem {
                lines.push(format!("  warning   {}/.lock is unreadable: {problem}", s.prefix));
            }
            let mut holders = Vec::new();
            for (session, pair) in &s.holders {
                let entry = sessions.get(api, session).await;
                match pair {
                    Some(pair) => {
                        lines.push(format!(
                            "  holder    {}, joined at index {}",
                            session_text(session, entry.as_ref()),
                            pair.create_index
                        ));
                        let mut j = session_json(session, entry.as_ref());
                        j["contender_key"] = pair.key.clone().into();
                        j["live"] = true.into();
                        holders.push(j);
                    }
                    None => {
                        lines.push(format!(
                            "  stale     session {session}: listed as a holder, but its contender key is gone \
                             (its slot is freed by the next contender)"
                        ));
                        let mut j = session_json(session, None);
                        j["live"] = false.into();
                        holders.push(j);
                    }
                }
            }
            let mut waiting = Vec::new();
            for pair in &s.waiting {
                let Some(session) = &pair.session else { continue };
                let entry = sessions.get(api, session.as_str()).await;
                lines.push(format!(
                    "  waiting   {}, since index {}",
                    session_text(session.as_str(), entry.as_ref()),
                    pair.create_index
                ));
                let mut j = session_json(session.as_str(), entry.as_ref());
                j["contender_key"] = pair.key.clone().into();
                waiting.push(j);
            }
            (
                json!({
                    "kind": "semaphore",
                    "prefix": s.prefix,
                    "limit": s.limit,
                    "held": live,
                    "holders": holders,
                    "waiting": waiting,
                    "modify_index": s.lock.as_ref().map(|p| p.modify_index),
                    "sequence": s.lock.as_ref().map(|p| p.modify_index),
                    "problem": s.problem,
                }),
                lines,
            )
        }
    }
}

/// Runs `consul-lock status`.
pub(crate) async fn status(args: StatusArgs) -> Result<u8, Failure> {
    let resolved = flags::resolve_from_process(&args.http)?;
    let api = Api::new(&resolved)?;
    let base = base_of(&args.target)?;
    let what = format!("listing {}", base.as_str());
    let mut list = KvList::new(base.clone());
    list.consistency = consistency(args.http.stale);
    let listed = api
        .call(&list, READ_TIMEOUT)
        .await
        .map_err(|e| api.failure(&what, &e))?;
    let view = unhide(&api, &base, view(base.as_str(), &listed.value), args.http.stale).await?;
    let (view, leader) = match view {
        // The listing told a lock from a semaphore; who leads it is the driver's answer, the one
        // `watch` and the library give. Not with `--stale`: the observer reads consistently,
        // and `--stale` asks for an answer any server may give, so the listing's stays.
        View::Lock { pair } if !args.http.stale => {
            let leader = api.leader(&pair.key).await?;
            let pair = match &leader {
                Some(l) => leader_pair(l),
                // Freed (or deleted) since the listing: the key as listed, without a holder.
                None => KvPair {
                    session: None,
                    ..pair
                },
            };
            (View::Lock { pair }, Some(leader))
        }
        view => (view, None),
    };
    let source = match &leader {
        Some(l) => Source::Observer(l.as_ref()),
        None => Source::Listing,
    };
    let (value, lines) = render(&view, &api, &mut Sessions::default(), source).await;
    if args.json {
        out::json(&value);
    } else {
        for line in lines {
            out::line(&line);
        }
    }
    Ok(0)
}

/// The consistency `--stale` asks for.
fn consistency(stale: bool) -> Consistency {
    if stale {
        Consistency::Stale
    } else {
        Consistency::Default
    }
}

/// `view` when it shows something; when it shows nothing, whether that is true. Consul leaves
/// the keys a token can't read out of a listing (and answers 404 when none is left), so an empty
/// listing may hide a held lock: the lock's keys are read directly, where Consul says 403. Keys
/// the direct reads find (a token that may read them but not list the prefix) make the view.
async fn unhide(api: &Api, base: &Key, view: View, stale: bool) -> Result<View, Failure> {
    if !matches!(view, View::Absent { .. }) {
        return Ok(view);
    }
    let mut found = Vec::new();
    for key in [
        base.clone(),
        base.join(".lock").map_err(|e| Failure::usage(e.to_string()))?,
    ] {
        let mut get = KvGet::new(key.clone());
        get.consistency = consistency(stale);
        match api.call(&get, READ_TIMEOUT).await {
            Ok(read) => found.extend(read.value),
            Err(CallError::Api(e)) if matches!(e.status(), Some(401 | 403)) => {
                let failure = api.failure(&format!("reading {}", key.as_str()), &CallError::Api(e));
                if failure.kind == Kind::TokenNotFound {
                    return Err(failure);
                }
                return Err(Failure::of(
                    Kind::PermissionDenied,
                    format!(
                        "{}. The listing of {base} came back empty only because Consul leaves out \
                         what the token may not read: whether a lock is held there is unknown",
                        failure.message,
                        base = base.as_str()
                    ),
                ));
            }
            Err(e) => return Err(api.failure(&format!("reading {}", key.as_str()), &e)),
        }
    }
    Ok(if found.is_empty() {
        view
    } else {
        self::view(base.as_str(), &found)
    })
}

/// Runs `consul-lock watch`.
pub(crate) async fn watch(args: WatchArgs) -> Result<u8, Failure> {
    let resolved = flags::resolve_from_process(&args.http)?;
    let api = Api::new(&resolved)?;
    let base = base_of(&args.target)?;
    let stop = async {
        let signals = signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)));
        match signals {
            Ok((mut int, mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = watch_loop(&api, &base, args.json, args.http.stale) => result,
        () = stop => Ok(0),
    }
}

async fn watch_loop(api: &Api, base: &Key, json: bool, stale: bool) -> Result<u8, Failure> {
    let mut index = 0;
    let mut last: Option<(String, Instant)> = None;
    let mut sessions = Sessions::default();
    let mut idle_backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let request = KvList {
            prefix: base.clone(),
            consistency: consistency(stale),
            blocking: Some(Blocking {
                index,
                wait: WATCH_WAIT,
            }),
        };
        let deadline = WATCH_WAIT + WATCH_WAIT / 16 + Duration::from_secs(5);
        let reply = match api.call(&request, deadline).await {
            Ok(reply) => reply,
            Err(e) => {
                let what = format!("watching {}", base.as_str());
                if last.is_none() {
                    return Err(api.failure(&what, &e));
                }
                failures += 1;
                if failures == 1 {
                    retrying(&api.failure(&what, &e).message, json);
                }
                tokio::time::sleep(Duration::from_secs(1).min(Duration::from_millis(250) * failures)).await;
                continue;
            }
        };
        if failures > 0 {
            failures = 0;
            if !json {
                out::info("in contact with Consul again");
            }
        }
        // Blocking-read hygiene: an index that goes backwards starts over; one that does not move
        // (an early answer) is not asked again at once.
        let new_index = reply.meta.index;
        if new_index < index {
            index = 0;
        } else if new_index == index {
            tokio::time::sleep(idle_backoff).await;
            idle_backoff = (idle_backoff * 2).min(Duration::from_secs(1));
        } else {
            index = new_index;
            idle_backoff = Duration::from_millis(50);
        }
        let view = view(base.as_str(), &reply.value);
        // A listing the token's ACLs emptied is no proof of a free lock.
        let view = if matches!(view, View::Absent { .. }) {
            unhide(api, base, view, stale).await?
        } else {
            view
        };
        show(&view, Source::Listing, index, json, api, &mut sessions, &mut last).await;
        if let View::Lock { pair } = &view {
            // (`--stale` asks for reads any server may answer; the observer's are consistent.)
            if pair.session.is_some() && !stale {
                // Someone leads: follow the lock key with the driver's observer (every change of
                // leader or value, once, in order; blindness reported) until nobody leads, then
                // list the base again for whatever comes next (a deleted key, a semaphore).
                follow(api, &pair.key, json, &mut sessions, &mut last).await?;
                index = 0;
            }
        }
    }
}

/// Says that watching failed and goes on: an `error` event, or a line on standard error.
fn retrying(message: &str, json: bool) {
    if json {
        out::event(
            "error",
            ("unix_ms", out::unix_ms()),
            &json!({ "message": message }),
        );
    } else {
        out::info(&format!("{message}; retrying"));
    }
}

/// Prints `view` if it shows another leadership than the last line did.
async fn show(
    view: &View,
    source: Source<'_>,
    index: u64,
    json: bool,
    api: &Api,
    sessions: &mut Sessions,
    last: &mut Option<(String, Instant)>,
) {
    let id = identity(view);
    if last.as_ref().is_some_and(|(previous, _)| *previous == id) {
        return;
    }
    let now = Instant::now();
    let after = last.as_ref().map(|(_, at)| now.duration_since(*at));
    let (mut value, lines) = render(view, api, sessions, source).await;
    if json {
        if let Value::Object(object) = &mut value {
            object.insert("first".into(), after.is_none().into());
            object.insert("index".into(), index.into());
        }
        out::event("change", ("unix_ms", out::unix_ms()), &value);
    } else {
        let head = match after {
            None => format!("{} now:", out::clock()),
            Some(d) => format!("{} changed after {}:", out::clock(), out::secs(d)),
        };
        out::line(&format!("{head} {}", one_line(view, &lines)));
    }
    *last = Some((id, now));
}

/// Follows the lock key `key` with the observer while someone leads; returns when nobody does.
async fn follow(
    api: &Api,
    key: &str,
    json: bool,
    sessions: &mut Sessions,
    last: &mut Option<(String, Instant)>,
) -> Result<(), Failure> {
    let mut observer = api.observe(key)?;
    while let Some(event) = observer.recv().await {
        match event {
            ObserveEvent::Leader(leader) | ObserveEvent::Value(leader) => {
                let view = View::Lock {
                    pair: leader_pair(&leader),
                };
                let source = Source::Observer(Some(&leader));
                show(&view, source, leader.sequence, json, api, sessions, last).await;
            }
            ObserveEvent::NoLeader { .. } => return Ok(()),
            ObserveEvent::Blind {
                unseen_for,
                last: why,
                ..
            } => {
                retrying(
                    &format!("could not see {key} for {}: {why}", out::secs(unseen_for)),
                    json,
                );
            }
            ObserveEvent::Resumed { .. } => {
                if !json {
                    out::info("in contact with Consul again");
                }
            }
            ObserveEvent::Failed(e) => {
                return Err(
                    api.driver_failure(&format!("watching {key}"), &consul_lock_tokio::Error::Lock(e))
                );
            }
        }
    }
    Err(api.driver_failure(
        &format!("watching {key}"),
        &consul_lock_tokio::Error::DriverStopped,
    ))
}

/// The view in one line: the first line of its rendering, plus the holder's.
fn one_line(view: &View, lines: &[String]) -> String {
    match view {
        View::Lock { pair } => {
            let holder = lines
                .get(1)
                .map(|l| l.trim().trim_start_matches("held by").trim())
                .unwrap_or("");
            match &pair.session {
                Some(_) => format!(
                    "{} leader {holder}, LockIndex {}, sequence {}",
                    pair.key, pair.lock_index, pair.modify_index
                ),
                None => format!("{} no leader (free; LockIndex {})", pair.key, pair.lock_index),
            }
        }
        View::Semaphore(s) => {
            let holders: Vec<&str> = s.live_holders().map(|(h, _)| h.as_str()).collect();
            let limit = match s.limit {
                Some(limit) => format!("{} of {limit} slots held", holders.len()),
                // No readable .lock yet: the contenders are still setting it up.
                None => format!("{} held, limit not recorded yet", holders.len()),
            };
            let sequence = s
                .lock
                .as_ref()
                .map(|p| format!(", sequence {}", p.modify_index))
                .unwrap_or_default();
            let holders = if holders.is_empty() {
                "no holder".to_owned()
            } else {
                format!("holders {}", holders.join(", "))
            };
            format!(
                "semaphore {}: {limit} ({holders}), {} waiting{sequence}",
                s.prefix,
                s.waiting.len()
            )
        }
        View::Absent { base } => format!("{base}: no lock (no key at {base} or {base}/.lock)"),
        View::Other { .. } => lines.first().cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pair(key: &str, flags: u64, session: Option<&str>, value: &[u8]) -> KvPair {
        KvPair {
            key: key.to_owned(),
            create_index: 5,
            modify_index: 9,
            lock_index: 2,
            flags,
            value: value.to_vec(),
            session: session.map(|s| SessionId::new(s).unwrap()),
        }
    }

    #[test]
    fn bases() {
        assert_eq!(base_of("/svc/x/").unwrap().as_str(), "svc/x");
        assert_eq!(base_of("svc/x/.lock").unwrap().as_str(), "svc/x");
        assert!(base_of("a//b").is_err());
    }

    #[test]
    fn a_lock_key_or_a_prefix_with_a_lock() {
        let direct = [pair("svc/leader", LOCK_FLAG_VALUE, Some("s1"), b"")];
        assert!(matches!(view("svc/leader", &direct), View::Lock { pair } if pair.key == "svc/leader"));
        let prefixed = [pair("svc/x/.lock", LOCK_FLAG_VALUE, None, b"")];
        assert!(matches!(view("svc/x", &prefixed), View::Lock { pair } if pair.session.is_none()));
        assert_eq!(view("svc/y", &[]), View::Absent { base: "svc/y".into() });
        assert!(matches!(
            view("svc/z", &[pair("svc/z", 0, None, b"v")]),
            View::Other { flags: 0, .. }
        ));
    }

    #[test]
    fn a_semaphore_with_holders_stale_entries_and_waiters() {
        let pairs = [
            pair(
                "w/.lock",
                SEMAPHORE_FLAG_VALUE,
                None,
                br#"{"Limit":2,"Holders":{"a":true,"gone":true}}"#,
            ),
            pair("w/a", SEMAPHORE_FLAG_VALUE, Some("a"), b""),
            pair("w/b", SEMAPHORE_FLAG_VALUE, Some("b"), b""),
            pair("w/sub/c", SEMAPHORE_FLAG_VALUE, Some("c"), b""),
        ];
        let View::Semaphore(s) = view("w", &pairs) else {
            panic!()
        };
        assert_eq!(s.limit, Some(2));
        assert_eq!(
            s.live_holders().map(|(h, _)| h.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert!(s.holders["gone"].is_none());
        assert_eq!(s.waiting.len(), 1);
        assert_eq!(s.waiting[0].key, "w/b");
        // The stale holder does not count: a change of live holders is a change of identity.
        let mut fewer = pairs.clone();
        fewer[1].session = None;
        assert_ne!(identity(&view("w", &pairs)), identity(&view("w", &fewer)));
    }
}
