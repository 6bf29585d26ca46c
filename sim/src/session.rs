//! The session endpoints (`/v1/session/...`), session IDs as Consul's state store reads them,
//! and the decoding of a create request's body as Consul's Go code does it.

use std::time::Duration;

use serde_json::Value;

use crate::blocking::Read;
use crate::json::Json;
use crate::wire::{Query, Reply};
use crate::{Outcome, SimBehavior, SimConsul, SimSession, TtlExpiry, gotime};

/// The one health check the simulated node has.
pub(crate) const SERF_HEALTH: &str = "serfHealth";
/// Consul's session TTL bounds.
const TTL_MIN_NS: i64 = 10_000_000_000;
const TTL_MAX_NS: i64 = 86_400_000_000_000;
/// Below this many nanoseconds, a `LockDelay` is taken as seconds (Consul's
/// `lockDelayMinThreshold`).
const LOCK_DELAY_MIN_THRESHOLD: i64 = 1000;
const DEFAULT_LOCK_DELAY_NS: i64 = 15_000_000_000;

/// Go's `%#U` of a byte taken as a rune: `U+0067 'g'`, or `U+0001` when not printable.
fn go_rune_u(b: u8) -> String {
    let c = char::from(b);
    let printable = (0x20..0x7f).contains(&b) || (b >= 0xa1 && b != 0xad);
    if printable {
        format!("U+{:04X} '{c}'", u32::from(b))
    } else {
        format!("U+{:04X}", u32::from(b))
    }
}

/// go-memdb's `UUIDFieldIndex` parse: 36 bytes, at most 4 hyphens (anywhere), an even number of
/// hex digits. The bytes (16 of them only when the digits are 32), or the error text.
pub(crate) fn parse_uuid(s: &str) -> Result<Vec<u8>, String> {
    if s.len() != 36 {
        return Err("UUID must be 36 characters".to_owned());
    }
    let hyphens = s.bytes().filter(|b| *b == b'-').count();
    if hyphens > 4 {
        return Err(format!("UUID should have maximum of 4 \"-\"; got {hyphens}"));
    }
    let digits: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    if digits.len() % 2 != 0 {
        return Err("Input (without hyphens) must be even length".to_owned());
    }
    let nibble = |b: u8| -> Result<u8, String> {
        match b {
            b'0'..=b'9' => Ok(b - b'0'),
            b'a'..=b'f' => Ok(b - b'a' + 10),
            b'A'..=b'F' => Ok(b - b'A' + 10),
            _ => Err(format!(
                "Invalid UUID: encoding/hex: invalid byte: {}",
                go_rune_u(b)
            )),
        }
    };
    digits
        .chunks(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// The 16 bytes a session ID names, if it is a UUID Consul would accept.
pub(crate) fn uuid16(s: &str) -> Option<[u8; 16]> {
    parse_uuid(s)
        .ok()
        .and_then(|bytes| <[u8; 16]>::try_from(bytes.as_slice()).ok())
}

fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn string_list(list: Option<&Vec<String>>) -> Json {
    match list {
        None => Json::Null,
        Some(items) => Json::Arr(items.iter().cloned().map(Json::Str).collect()),
    }
}

/// A session as Consul's JSON has it (field order of Consul 1.8's `SessionEntry`).
pub(crate) fn session_json(s: &SimSession) -> Json {
    let mut fields = vec![
        ("ID", Json::str(s.id.clone())),
        ("Name", Json::str(s.name.clone())),
        ("Node", Json::str(s.node.clone())),
        ("LockDelay", Json::I64(s.lock_delay_nanos)),
        ("Behavior", Json::str(s.behavior.as_str())),
        ("TTL", Json::str(s.ttl.clone())),
        ("NodeChecks", string_list(s.node_checks.as_ref())),
        (
            "ServiceChecks",
            match &s.service_checks {
                None => Json::Null,
                Some(ids) => Json::Arr(
                    ids.iter()
                        .map(|id| {
                            Json::Obj(vec![("ID", Json::str(id.clone())), ("Namespace", Json::str(""))])
                        })
                        .collect(),
                ),
            },
        ),
    ];
    if !s.checks.is_empty() {
        fields.push(("Checks", string_list(Some(&s.checks))));
    }
    fields.push(("CreateIndex", Json::U64(s.create_index)));
    fields.push(("ModifyIndex", Json::U64(s.modify_index)));
    Json::Obj(fields)
}

/// A create request's session, before validation.
#[derive(Clone, Debug)]
struct CreateArgs {
    name: String,
    node: String,
    lock_delay: i64,
    behavior: String,
    ttl: String,
    node_checks: Option<Vec<String>>,
    service_checks: Option<Vec<String>>,
    checks: Option<Vec<String>>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(v: &Value, field: &str, go_type: &str) -> String {
    format!(
        "json: cannot unmarshal {} into Go struct field .{field} of type {go_type}",
        kind(v)
    )
}

fn decode_string(v: &Value, field: &str, go_type: &str, into: &mut String) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) => {
            into.clone_from(s);
            Ok(())
        }
        other => Err(type_error(other, field, go_type)),
    }
}

fn decode_strings(v: &Value, field: &str, go_type: &str) -> Result<Option<Vec<String>>, String> {
    match v {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(type_error(other, field, go_type.trim_start_matches("[]"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(type_error(other, field, go_type)),
    }
}

/// Go's `time.Duration(float64)` on amd64: truncation, and the "integer indefinite" value
/// (`i64::MIN`) when out of range.
fn go_f64_to_i64(f: f64) -> i64 {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if !(-TWO_POW_63..TWO_POW_63).contains(&f) {
        i64::MIN
    } else {
        // In range: `as` truncates like Go's conversion.
        #[allow(clippy::cast_possible_truncation)]
        let n = f as i64;
        n
    }
}

/// Decodes a create body over the defaults as Consul 1.8 does (Go's case-insensitive field
/// matching, `null` leaving a field alone, unknown fields ignored, trailing data ignored, and
/// `SessionEntry.UnmarshalJSON` for `LockDelay`). `Err`: the text after `Request decode failed: `.
fn decode_create(body: &[u8], args: &mut CreateArgs) -> Result<(), String> {
    let mut stream = serde_json::Deserializer::from_slice(body).into_iter::<Value>();
    let value = match stream.next() {
        None => return Err("EOF".to_owned()),
        Some(Err(e)) => return Err(e.to_string()),
        Some(Ok(v)) => v,
    };
    let map = match value {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        other => {
            return Err(format!(
                "json: cannot unmarshal {} into Go value of type struct {{ LockDelay interface {{}}; \
                 *structs.Alias }}",
                kind(&other)
            ));
        }
    };
    let mut lock_delay: Option<&Value> = None;
    for (name, v) in &map {
        match name.to_ascii_lowercase().as_str() {
            "name" => decode_string(v, "Name", "string", &mut args.name)?,
            "node" => decode_string(v, "Node", "string", &mut args.node)?,
            "ttl" => decode_string(v, "TTL", "string", &mut args.ttl)?,
            "id" => decode_string(v, "ID", "string", &mut String::new())?,
            "behavior" => decode_string(v, "Behavior", "structs.SessionBehavior", &mut args.behavior)?,
            "nodechecks" => args.node_checks = decode_strings(v, "NodeChecks", "[]string")?,
            "checks" => args.checks = decode_strings(v, "Checks", "[]types.CheckID")?,
            "servicechecks" => {
                args.service_checks = match v {
                    Value::Null => None,
                    Value::Array(items) => Some(
                        items
                            .iter()
                            .map(|item| match item {
                                Value::Object(check) => {
                                    let mut id = String::new();
                                    for (k, v) in check {
                                        if k.eq_ignore_ascii_case("id") {
                                            decode_string(v, "ServiceChecks.ID", "string", &mut id)?;
                                        }
                                    }
                                    Ok(id)
                                }
                                other => Err(type_error(other, "ServiceChecks", "structs.ServiceCheck")),
                            })
                            .collect::<Result<Vec<_>, String>>()?,
                    ),
                    other => return Err(type_error(other, "ServiceChecks", "[]structs.ServiceCheck")),
                }
            }
            "createindex" | "modifyindex" => match v {
                Value::Null => {}
                Value::Number(n) if n.is_u64() => {}
                Value::Number(n) => {
                    return Err(format!(
                        "json: cannot unmarshal number {n} into Go struct field .{name} of type uint64"
                    ));
                }
                other => return Err(type_error(other, name, "uint64")),
            },
            "lockdelay" => lock_delay = Some(v),
            _ => {}
        }
    }
    if let Some(v) = lock_delay {
        let ns = match v {
            Value::Null => return Ok(()),
            Value::String(s) => gotime::parse_duration(s)?,
            Value::Number(n) => go_f64_to_i64(n.as_f64().unwrap_or(0.0)),
            _ => 0,
        };
        args.lock_delay = if ns < LOCK_DELAY_MIN_THRESHOLD {
            ns.wrapping_mul(1_000_000_000)
        } else {
            ns
        };
    }
    Ok(())
}

/// Consul's `fixupEmptySessionChecks`.
fn fixup_checks(args: &mut CreateArgs) {
    let checks_len = args.checks.as_ref().map_or(0, Vec::len);
    if checks_len == 0 {
        args.node_checks = Some(Vec::new());
        return;
    }
    if args
        .checks
        .as_ref()
        .is_some_and(|c| c.len() == 1 && c[0] == SERF_HEALTH)
    {
        args.checks = None;
        return;
    }
    if args.node_checks.as_ref().is_none_or(Vec::is_empty) {
        args.checks = None;
    }
}

impl SimConsul {
    /// When a TTL session renewed now will be invalidated, per [`TtlExpiry`].
    fn expiry_after(&mut self, ttl: Duration) -> Duration {
        match self.config.ttl_expiry {
            TtlExpiry::TwiceTtl => ttl * 2,
            TtlExpiry::Seeded => {
                let ttl_ns = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
                ttl + Duration::from_nanos(self.rng.below(ttl_ns.saturating_add(1)))
            }
        }
    }

    /// Restarts a session's TTL clock from now (a renew, a creation, a new leader).
    pub(super) fn reset_session_timer(&mut self, id: [u8; 16]) {
        let now = self.now;
        let ttl = self.sessions.get(&id).and_then(|s| s.ttl_duration);
        let expires_at = match ttl {
            Some(ttl) if self.leader => {
                let after = self.expiry_after(ttl);
                now.checked_add(after)
            }
            _ => None,
        };
        if let Some(session) = self.sessions.get_mut(&id) {
            session.last_renew = now;
            session.expires_at = expires_at;
        }
    }

    /// `PUT /v1/session/create`.
    pub(super) fn session_create(
        &mut self,
        request: &http::Request<Vec<u8>>,
        query: &Query,
    ) -> Result<Reply, Reply> {
        SimConsul::check_namespace(request, query)?;
        let mut args = CreateArgs {
            name: String::new(),
            node: self.config.node_name.clone(),
            lock_delay: DEFAULT_LOCK_DELAY_NS,
            behavior: "release".to_owned(),
            ttl: String::new(),
            node_checks: Some(vec![SERF_HEALTH.to_owned()]),
            service_checks: None,
            checks: Some(vec![SERF_HEALTH.to_owned()]),
        };
        if !request.body().is_empty() {
            decode_create(request.body(), &mut args)
                .map_err(|e| Reply::text(400, format!("Request decode failed: {e}")))?;
        }
        fixup_checks(&mut args);
        self.forward(query, true)?;
        let fail = |message: String| Reply::text(500, message);
        if args.node.is_empty() {
            return Err(fail("Must provide Node".to_owned()));
        }
        let behavior = match args.behavior.as_str() {
            "" | "release" => SimBehavior::Release,
            "delete" => SimBehavior::Delete,
            other => return Err(fail(format!("Invalid Behavior setting '{other}'"))),
        };
        let mut ttl_duration = None;
        if !args.ttl.is_empty() {
            let ttl = gotime::parse_duration(&args.ttl)
                .map_err(|e| fail(format!("Session TTL '{}' invalid: {e}", args.ttl)))?;
            if ttl != 0 && !(TTL_MIN_NS..=TTL_MAX_NS).contains(&ttl) {
                return Err(fail(format!(
                    "Invalid Session TTL '{ttl}', must be between [{}={}]",
                    gotime::format_duration(TTL_MIN_NS),
                    gotime::format_duration(TTL_MAX_NS)
                )));
            }
            if ttl > 0 {
                ttl_duration = Some(Duration::from_nanos(ttl.unsigned_abs()));
            }
        }
        // Through Raft from here on: failures take an index.
        let idx = self.raft();
        if args.node != self.config.node_name {
            return Err(fail("Missing node registration".to_owned()));
        }
        let all_checks = args
            .checks
            .iter()
            .flatten()
            .chain(args.node_checks.iter().flatten())
            .chain(args.service_checks.iter().flatten());
        for check in all_checks {
            if check != SERF_HEALTH {
                return Err(fail(format!("Missing check '{check}' registration")));
            }
            // A node the servers still take as failed (the reliability lab's Go contenders were
            // answered this) cannot bind a new session to its health.
            if self.node_failed {
                return Err(fail(format!("Check '{check}' is in critical state")));
            }
        }
        let mut uuid = self.rng.uuid_bytes();
        while self.sessions.contains_key(&uuid) {
            uuid = self.rng.uuid_bytes();
        }
        let id = format_uuid(&uuid);
        let session = SimSession {
            id: id.clone(),
            name: args.name,
            node: args.node,
            lock_delay_nanos: args.lock_delay,
            behavior,
            ttl: args.ttl,
            ttl_duration,
            node_checks: args.node_checks,
            service_checks: args.service_checks,
            checks: args.checks.unwrap_or_default(),
            create_index: idx,
            modify_index: idx,
            last_renew: self.now,
            expires_at: None,
        };
        self.sessions.insert(uuid, session);
        self.sessions_table_index = self.sessions_table_index.max(idx);
        self.reset_session_timer(uuid);
        self.wake_changed();
        Ok(Reply::json(
            &Json::Obj(vec![("ID", Json::Str(id))]),
            self.pretty(query),
        ))
    }

    /// `PUT /v1/session/renew/<id>`.
    pub(super) fn session_renew(
        &mut self,
        request: &http::Request<Vec<u8>>,
        id: &str,
        query: &Query,
    ) -> Result<Reply, Reply> {
        SimConsul::parse_options(query)?;
        SimConsul::check_namespace(request, query)?;
        if id.is_empty() {
            return Err(Reply::text(400, "Missing session"));
        }
        self.forward(query, true)?;
        let uuid = parse_uuid(id)
            .map_err(|e| Reply::text(500, format!("failed session lookup: index error: {e}")))?;
        let Some(uuid) = <[u8; 16]>::try_from(uuid.as_slice())
            .ok()
            .filter(|u| self.sessions.contains_key(u))
        else {
            return Err(Reply::text(404, format!("Session id '{id}' not found")));
        };
        self.reset_session_timer(uuid);
        let entry = self.sessions.get(&uuid).map(session_json).unwrap_or(Json::Null);
        Ok(Reply::json(&Json::Arr(vec![entry]), self.pretty(query)))
    }

    /// `PUT /v1/session/destroy/<id>`: `true`, known or not.
    pub(super) fn session_destroy(
        &mut self,
        request: &http::Request<Vec<u8>>,
        id: &str,
        query: &Query,
    ) -> Result<Reply, Reply> {
        SimConsul::check_namespace(request, query)?;
        if id.is_empty() {
            return Err(Reply::text(400, "Missing session"));
        }
        self.forward(query, true)?;
        let idx = self.raft();
        let uuid = parse_uuid(id)
            .map_err(|e| Reply::text(500, format!("failed session lookup: index error: {e}")))?;
        if let Ok(uuid) = <[u8; 16]>::try_from(uuid.as_slice()) {
            self.invalidate_session(idx, uuid);
            self.wake_changed();
        }
        Ok(Reply::json(&Json::Bool(true), self.pretty(query)))
    }

    /// Errors of the session reads carry (empty) metadata, as Consul's deferred `setMeta` does.
    fn with_empty_meta(reply: Reply) -> Reply {
        reply.with_meta(1, false, 0)
    }

    /// `GET /v1/session/info/<id>`: `[entry]`, or `[]` when unknown.
    pub(super) fn session_info(
        &mut self,
        request: &http::Request<Vec<u8>>,
        id: &str,
        query: &Query,
    ) -> Result<Outcome, Reply> {
        let options = SimConsul::parse_options(query)?;
        SimConsul::check_namespace(request, query)?;
        if id.is_empty() {
            return Err(Reply::text(400, "Missing session"));
        }
        self.forward(query, !options.stale)
            .map_err(SimConsul::with_empty_meta)?;
        parse_uuid(id).map_err(|e| {
            SimConsul::with_empty_meta(Reply::text(
                500,
                format!("failed session lookup: index error: {e}"),
            ))
        })?;
        let pretty = self.pretty(query);
        Ok(self.start_read(Read::SessionInfo { id: id.to_owned() }, options, pretty))
    }

    /// `GET /v1/session/list`.
    pub(super) fn session_list(
        &mut self,
        request: &http::Request<Vec<u8>>,
        query: &Query,
    ) -> Result<Outcome, Reply> {
        let options = SimConsul::parse_options(query)?;
        SimConsul::check_namespace(request, query)?;
        self.forward(query, !options.stale)
            .map_err(SimConsul::with_empty_meta)?;
        let pretty = self.pretty(query);
        Ok(self.start_read(Read::SessionList, options, pretty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse_like_memdb() {
        assert!(uuid16("199e6fcc-4859-0b1d-68fb-b3859a61eb3d").is_some());
        assert_eq!(
            uuid16("199E6FCC-4859-0B1D-68FB-B3859A61EB3D"),
            uuid16("199e6fcc-4859-0b1d-68fb-b3859a61eb3d")
        );
        assert_eq!(
            parse_uuid("garbage"),
            Err("UUID must be 36 characters".to_owned())
        );
        assert_eq!(
            parse_uuid("g1111111-2222-3333-4444-555555555555"),
            Err("Invalid UUID: encoding/hex: invalid byte: U+0067 'g'".to_owned())
        );
        assert!(uuid16("111111112-222-3333-4444-555555555555").is_some());
        assert_eq!(
            parse_uuid("111111111-222-3333-4444-55555555555-"),
            Err("UUID should have maximum of 4 \"-\"; got 5".to_owned())
        );
    }

    fn defaults() -> CreateArgs {
        CreateArgs {
            name: String::new(),
            node: "n".to_owned(),
            lock_delay: DEFAULT_LOCK_DELAY_NS,
            behavior: "release".to_owned(),
            ttl: String::new(),
            node_checks: Some(vec![SERF_HEALTH.to_owned()]),
            service_checks: None,
            checks: Some(vec![SERF_HEALTH.to_owned()]),
        }
    }

    fn lock_delay_of(body: &str) -> Result<i64, String> {
        let mut args = defaults();
        decode_create(body.as_bytes(), &mut args).map(|()| args.lock_delay)
    }

    #[test]
    fn lock_delays_decode_like_consul() {
        assert_eq!(lock_delay_of(r#"{"LockDelay":"1s"}"#), Ok(1_000_000_000));
        assert_eq!(lock_delay_of(r#"{"LockDelay":15}"#), Ok(15_000_000_000));
        assert_eq!(lock_delay_of(r#"{"LockDelay":1000}"#), Ok(1000));
        assert_eq!(lock_delay_of(r#"{"LockDelay":1.5}"#), Ok(1_000_000_000));
        assert_eq!(lock_delay_of(r#"{"LockDelay":"500ns"}"#), Ok(500_000_000_000));
        assert_eq!(
            lock_delay_of(r#"{"LockDelay":"-5s"}"#),
            Ok(-5_000_000_000_000_000_000)
        );
        assert_eq!(lock_delay_of(r#"{"LockDelay":1e30}"#), Ok(0));
        assert_eq!(lock_delay_of(r#"{"LockDelay":true}"#), Ok(0));
        assert_eq!(lock_delay_of(r#"{"LockDelay":null}"#), Ok(DEFAULT_LOCK_DELAY_NS));
        assert_eq!(lock_delay_of(r#"{"lockdelay":"2s"}"#), Ok(2_000_000_000));
        assert_eq!(
            lock_delay_of(r#"{"LockDelay":"abc"}"#),
            Err("time: invalid duration \"abc\"".to_owned())
        );
        assert_eq!(
            lock_delay_of(r#"{"TTL":15}"#),
            Err("json: cannot unmarshal number into Go struct field .TTL of type string".to_owned())
        );
        assert_eq!(
            lock_delay_of(r#"{"TTL":"10s"} trailing"#),
            Ok(DEFAULT_LOCK_DELAY_NS)
        );
    }

    #[test]
    fn checks_fix_up_like_consul() {
        let fixed = |body: &str| {
            let mut args = defaults();
            let _ = decode_create(body.as_bytes(), &mut args);
            fixup_checks(&mut args);
            (args.checks, args.node_checks)
        };
        let serf = || Some(vec![SERF_HEALTH.to_owned()]);
        assert_eq!(fixed("{}"), (None, serf()));
        assert_eq!(fixed(r#"{"Checks":[]}"#), (Some(vec![]), Some(vec![])));
        assert_eq!(fixed(r#"{"Checks":null}"#), (None, Some(vec![])));
        assert_eq!(fixed(r#"{"NodeChecks":[]}"#), (None, Some(vec![])));
        assert_eq!(fixed(r#"{"NodeChecks":null}"#), (None, None));
    }
}
