//! Structure-aware replies: Consul's shapes (KV arrays, session entries, `{"ID": ...}`,
//! `true`/`false`, a lock transaction's `{"Results": ..., "Errors": ...}`, the metadata headers) built from arbitrary fields, so that the decoders' deep
//! paths are reached, with hostile values in the fields. Each built reply comes with what a
//! correct decoder must make of it whenever every part is valid ([`Expect`]); parts whose
//! outcome this module does not predict make the expectation unknown, never wrong.

use std::time::Duration;

use arbitrary::Arbitrary;
use base64::Engine as _;
use consul_lock_core::api::{KvPair, QueryMeta, SessionBehavior, SessionEntry, SessionId};

/// Go's largest duration, in nanoseconds.
pub const MAX_NANOS: u64 = i64::MAX as u64;

/// A JSON number field, or something else in its place.
#[derive(Arbitrary, Clone, Debug)]
pub enum Num {
    /// The field is left out (the decoders default it to 0).
    Absent,
    /// A small number.
    Small(u8),
    /// Any u64.
    U64(u64),
    /// `u64::MAX`.
    Max,
    /// A negative number.
    Neg(i64),
    /// `a.b`.
    Float(u32, u8),
    /// `1e<n>`.
    Exp(u8),
    /// Just past `u64::MAX` (`18446744073709551616` plus a few).
    Big(u8),
    /// A number in a string.
    Str(u64),
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
}

impl Num {
    /// The JSON text, `None` when absent.
    pub fn json(&self) -> Option<String> {
        Some(match self {
            Num::Absent => return None,
            Num::Small(n) => n.to_string(),
            Num::U64(n) => n.to_string(),
            Num::Max => u64::MAX.to_string(),
            Num::Neg(n) => format!("-{}", n.unsigned_abs().max(1)),
            Num::Float(a, b) => format!("{a}.{b}"),
            Num::Exp(n) => format!("1e{n}"),
            Num::Big(n) => (u128::from(u64::MAX) + 1 + u128::from(*n)).to_string(),
            Num::Str(n) => format!("\"{n}\""),
            Num::Null => "null".to_owned(),
            Num::Bool(b) => b.to_string(),
        })
    }

    /// What a `#[serde(default)] u64` field decodes to, when that is known to succeed.
    pub fn expected(&self) -> Option<u64> {
        match self {
            Num::Absent => Some(0),
            Num::Small(n) => Some(u64::from(*n)),
            Num::U64(n) => Some(*n),
            Num::Max => Some(u64::MAX),
            _ => None,
        }
    }
}

/// A JSON string field.
#[derive(Arbitrary, Clone, Debug)]
pub enum Text {
    /// Left out.
    Absent,
    /// `null`.
    Null,
    /// `""`.
    Empty,
    /// Any string (escaped as JSON).
    Plain(String),
    /// A number (or other scalar) instead.
    NotString(Num),
}

impl Text {
    fn json(&self) -> Option<String> {
        match self {
            Text::Absent => None,
            Text::Null => Some("null".to_owned()),
            Text::Empty => Some("\"\"".to_owned()),
            Text::Plain(s) => Some(json_string(s)),
            Text::NotString(n) => n.json().or_else(|| Some("0".to_owned())),
        }
    }

    /// As a required string field (no serde default).
    fn required(&self) -> Option<String> {
        match self {
            Text::Empty => Some(String::new()),
            Text::Plain(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// As a `#[serde(default)] String` field.
    fn defaulted(&self) -> Option<String> {
        match self {
            Text::Absent => Some(String::new()),
            other => other.required(),
        }
    }
}

/// A session ID: a real-looking UUID, or anything.
#[derive(Arbitrary, Clone, Debug)]
pub enum Id {
    /// A UUID made of these bits.
    Uuid(u128),
    /// A fixed few: ours in the lock target.
    Known(u8),
    /// Any text.
    Text(Text),
}

/// The sessions the lock target knows by name (`Id::Known` picks among them).
pub const KNOWN_SESSIONS: [&str; 4] = ["mine", "other", "g-1", "00000000-0000-0000-0000-000000000000"];

/// A UUID's text.
pub fn uuid(bits: u128) -> String {
    let h = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Whether `SessionId::new` must accept `s` (non-empty, no white space or control characters).
pub fn valid_session_text(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl Id {
    fn text(&self) -> Text {
        match self {
            Id::Uuid(bits) => Text::Plain(uuid(*bits)),
            Id::Known(i) => Text::Plain(KNOWN_SESSIONS[usize::from(*i) % KNOWN_SESSIONS.len()].to_owned()),
            Id::Text(t) => t.clone(),
        }
    }

    fn json(&self) -> Option<String> {
        self.text().json()
    }

    /// As a required ID: the session, when it must be accepted.
    fn required(&self) -> Option<SessionId> {
        self.text()
            .required()
            .filter(|s| valid_session_text(s))
            .and_then(|s| SessionId::new(s).ok())
    }

    /// As a KV pair's optional `Session`: `Some(None)` for no session, `None` when unknown.
    fn optional(&self) -> Option<Option<SessionId>> {
        match self.text() {
            Text::Absent | Text::Null | Text::Empty => Some(None),
            Text::Plain(s) if s.is_empty() => Some(None),
            Text::Plain(s) if valid_session_text(&s) => SessionId::new(s).ok().map(Some),
            _ => None,
        }
    }
}

/// A KV value.
#[derive(Arbitrary, Clone, Debug)]
pub enum Value {
    /// Left out.
    Absent,
    /// `null`.
    Null,
    /// These bytes, base64-encoded.
    Base64(Vec<u8>),
    /// Any text (rarely base64).
    Text(String),
    /// A number instead.
    NotString(Num),
}

impl Value {
    fn json(&self) -> Option<String> {
        match self {
            Value::Absent => None,
            Value::Null => Some("null".to_owned()),
            Value::Base64(b) => Some(json_string(&base64::engine::general_purpose::STANDARD.encode(b))),
            Value::Text(s) => Some(json_string(s)),
            Value::NotString(n) => n.json().or_else(|| Some("0".to_owned())),
        }
    }

    fn expected(&self) -> Option<Vec<u8>> {
        match self {
            Value::Absent | Value::Null => Some(Vec::new()),
            Value::Base64(b) => Some(b.clone()),
            _ => None,
        }
    }
}

/// A field unknown to the decoders (they must ignore it).
#[derive(Arbitrary, Clone, Debug)]
pub struct Extra {
    /// Appended to `Extra`, so that it can't collide with a real field.
    pub name: String,
    /// Its value.
    pub value: Num,
}

/// A KV entry as Consul sends it, with arbitrary fields.
#[derive(Arbitrary, Clone, Debug)]
pub struct Kv {
    /// `Key` (required).
    pub key: Text,
    /// `CreateIndex`.
    pub create_index: Num,
    /// `ModifyIndex`.
    pub modify_index: Num,
    /// `LockIndex`.
    pub lock_index: Num,
    /// `Flags`.
    pub flags: Num,
    /// `Value`.
    pub value: Value,
    /// `Session`.
    pub session: Id,
    /// An unknown field.
    pub extra: Option<Extra>,
}

/// Writes a JSON object from `(name, value)` pairs, leaving out the absent ones.
fn object(fields: &[(&str, Option<String>)], extra: Option<&Extra>, pretty: bool) -> String {
    let mut parts: Vec<String> = fields
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{}: {v}", json_string(name))))
        .collect();
    if let Some(e) = extra
        && let Some(v) = e.value.json()
    {
        parts.push(format!("{}: {v}", json_string(&format!("Extra{}", e.name))));
    }
    let (open, sep, close) = if pretty {
        ("{\n        ", ",\n        ", "\n    }")
    } else {
        ("{", ",", "}")
    };
    format!("{open}{}{close}", parts.join(sep))
}

/// A string as JSON.
pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

impl Kv {
    /// The JSON object.
    pub fn json(&self, pretty: bool) -> String {
        object(
            &[
                ("LockIndex", self.lock_index.json()),
                ("Key", self.key.json()),
                ("Flags", self.flags.json()),
                ("Value", self.value.json()),
                ("Session", self.session.json()),
                ("CreateIndex", self.create_index.json()),
                ("ModifyIndex", self.modify_index.json()),
            ],
            self.extra.as_ref(),
            pretty,
        )
    }

    /// The pair a correct decoder makes of it, when every field is valid.
    pub fn expected(&self) -> Option<KvPair> {
        Some(KvPair {
            key: self.key.required()?,
            create_index: self.create_index.expected()?,
            modify_index: self.modify_index.expected()?,
            lock_index: self.lock_index.expected()?,
            flags: self.flags.expected()?,
            value: self.value.expected()?,
            session: self.session.optional()?,
        })
    }
}

/// Session TTL texts: valid ones with their value, and invalid ones (`None`).
pub const TTLS: [(&str, Option<u64>); 20] = [
    ("15s", Some(15_000_000_000)),
    ("10s", Some(10_000_000_000)),
    ("30s", Some(30_000_000_000)),
    ("86400s", Some(86_400_000_000_000)),
    ("24h0m0s", Some(86_400_000_000_000)),
    ("1m30s", Some(90_000_000_000)),
    ("0s", Some(0)),
    ("1ns", Some(1)),
    ("2562047h", Some(2_562_047 * 3_600_000_000_000)),
    ("2562047h47m16.854775807s", Some(MAX_NANOS)),
    ("0.3333333333333333333h", Some(1_200_000_000_000)),
    ("1h2m3s4ms5us6ns", Some(3_723_004_005_006)),
    ("15000ms", Some(15_000_000_000)),
    ("2562048h", None),
    ("2562047h47m16.854775808s", None),
    ("-1s", None),
    ("15", None),
    ("1d", None),
    ("9223372036854775808ns", None),
    ("1.5.5s", None),
];

/// A session's `TTL`.
#[derive(Arbitrary, Clone, Debug)]
pub enum Ttl {
    /// Left out (no TTL).
    Absent,
    /// `""` (no TTL).
    Empty,
    /// One of [`TTLS`].
    Known(u8),
    /// Go's text for this many nanoseconds (saturating at Go's maximum).
    Nanos(u64),
    /// Any text.
    Text(String),
    /// A number instead (Go's `time.Duration` is a number in some replies).
    NotString(Num),
}

impl Ttl {
    fn json(&self) -> Option<String> {
        match self {
            Ttl::Absent => None,
            Ttl::Empty => Some("\"\"".to_owned()),
            Ttl::Known(i) => Some(json_string(TTLS[usize::from(*i) % TTLS.len()].0)),
            Ttl::Nanos(n) => Some(json_string(&consul_lock_core::duration::format(
                Duration::from_nanos(*n),
            ))),
            Ttl::Text(s) => Some(json_string(s)),
            Ttl::NotString(n) => n.json().or_else(|| Some("0".to_owned())),
        }
    }

    /// `Some(ttl)` when valid and known.
    fn expected(&self) -> Option<Option<Duration>> {
        match self {
            Ttl::Absent | Ttl::Empty => Some(None),
            Ttl::Known(i) => TTLS[usize::from(*i) % TTLS.len()]
                .1
                .map(|n| Some(Duration::from_nanos(n))),
            Ttl::Nanos(n) => Some(Some(Duration::from_nanos((*n).min(MAX_NANOS)))),
            _ => None,
        }
    }
}

/// A session's `Behavior`.
#[derive(Arbitrary, Clone, Debug)]
pub enum Behavior {
    /// Left out.
    Absent,
    /// `release`.
    Release,
    /// `delete`.
    Delete,
    /// Anything.
    Text(Text),
}

impl Behavior {
    fn json(&self) -> Option<String> {
        match self {
            Behavior::Absent => None,
            Behavior::Release => Some("\"release\"".to_owned()),
            Behavior::Delete => Some("\"delete\"".to_owned()),
            Behavior::Text(t) => t.json(),
        }
    }

    fn expected(&self) -> Option<SessionBehavior> {
        match self {
            Behavior::Absent | Behavior::Release => Some(SessionBehavior::Release),
            Behavior::Delete => Some(SessionBehavior::Delete),
            Behavior::Text(Text::Empty | Text::Absent) => Some(SessionBehavior::Release),
            Behavior::Text(_) => None,
        }
    }
}

/// A list of check names.
#[derive(Arbitrary, Clone, Debug)]
pub enum Checks {
    /// Left out.
    Absent,
    /// `null`.
    Null,
    /// These names.
    List(Vec<String>),
    /// A scalar instead.
    NotList(Num),
}

impl Checks {
    fn json(&self) -> Option<String> {
        match self {
            Checks::Absent => None,
            Checks::Null => Some("null".to_owned()),
            Checks::List(l) => Some(format!(
                "[{}]",
                l.iter().map(|s| json_string(s)).collect::<Vec<_>>().join(",")
            )),
            Checks::NotList(n) => n.json().or_else(|| Some("0".to_owned())),
        }
    }

    fn expected(&self) -> Option<Vec<String>> {
        match self {
            Checks::Absent | Checks::Null => Some(Vec::new()),
            Checks::List(l) => Some(l.clone()),
            Checks::NotList(_) => None,
        }
    }
}

/// A session entry as Consul sends it (renew and info replies), with arbitrary fields.
#[derive(Arbitrary, Clone, Debug)]
pub struct Session {
    /// `ID` (required).
    pub id: Id,
    /// `Name`.
    pub name: Text,
    /// `Node`.
    pub node: Text,
    /// `LockDelay`, nanoseconds.
    pub lock_delay: Num,
    /// `Behavior`.
    pub behavior: Behavior,
    /// `TTL`.
    pub ttl: Ttl,
    /// `Checks`.
    pub checks: Checks,
    /// `NodeChecks`.
    pub node_checks: Checks,
    /// `ServiceChecks` (ignored by the decoders), as a list of `{"ID": .., "Namespace": ..}`.
    pub service_checks: Option<Vec<(String, String)>>,
    /// `CreateIndex`.
    pub create_index: Num,
    /// `ModifyIndex`.
    pub modify_index: Num,
    /// An unknown field.
    pub extra: Option<Extra>,
}

impl Session {
    /// The JSON object.
    pub fn json(&self, pretty: bool) -> String {
        let service_checks = self.service_checks.as_ref().map(|l| {
            let items: Vec<String> = l
                .iter()
                .map(|(id, ns)| format!("{{\"ID\":{},\"Namespace\":{}}}", json_string(id), json_string(ns)))
                .collect();
            format!("[{}]", items.join(","))
        });
        object(
            &[
                ("ID", self.id.json()),
                ("Name", self.name.json()),
                ("Node", self.node.json()),
                ("LockDelay", self.lock_delay.json()),
                ("Behavior", self.behavior.json()),
                ("TTL", self.ttl.json()),
                ("Checks", self.checks.json()),
                ("NodeChecks", self.node_checks.json()),
                (
                    "ServiceChecks",
                    service_checks.or_else(|| Some("null".to_owned())),
                ),
                ("CreateIndex", self.create_index.json()),
                ("ModifyIndex", self.modify_index.json()),
            ],
            self.extra.as_ref(),
            pretty,
        )
    }

    /// The entry a correct decoder makes of it, when every field is valid.
    pub fn expected(&self) -> Option<SessionEntry> {
        let mut checks = self.checks.expected()?;
        checks.extend(self.node_checks.expected()?);
        Some(SessionEntry {
            id: self.id.required()?,
            name: self.name.defaulted()?,
            node: self.node.defaulted()?,
            lock_delay: Duration::from_nanos(self.lock_delay.expected()?),
            behavior: self.behavior.expected()?,
            ttl: self.ttl.expected()?,
            checks,
            create_index: self.create_index.expected()?,
            modify_index: self.modify_index.expected()?,
        })
    }
}

/// An element of a JSON array of entries.
#[derive(Arbitrary, Clone, Debug)]
pub enum Elem<T> {
    /// An entry.
    Entry(T),
    /// A scalar instead.
    Scalar(Num),
    /// A string instead.
    Str(String),
    /// `{}`.
    EmptyObject,
    /// `[]`.
    EmptyArray,
}

/// How a JSON body is laid out.
#[derive(Arbitrary, Clone, Debug)]
pub enum Shape {
    /// Arbitrary bytes.
    Raw(Vec<u8>),
    /// Arbitrary text.
    Text(String),
    /// `true`, `false` and near misses.
    Bool(BoolText),
    /// An array of KV entries.
    Kvs(Vec<Elem<Kv>>),
    /// An array of session entries.
    Sessions(Vec<Elem<Session>>),
    /// A session create's `{"ID": ...}`.
    Created(Id, Option<Extra>),
    /// A lock transaction's `{"Results": ..., "Errors": ...}`.
    Txn(Txn),
    /// `null`.
    Null,
    /// Nothing.
    Empty,
    /// A scalar.
    Scalar(Num),
}

/// A JSON array field of a transaction reply (`Results`, `Errors`).
#[derive(Arbitrary, Clone, Debug)]
pub enum List<T> {
    /// Left out (the decoder defaults it to none).
    Absent,
    /// `null`, as Consul sends the one that does not apply.
    Null,
    /// An array.
    Items(Vec<Elem<T>>),
    /// A scalar instead.
    NotList(Num),
}

impl<T> List<T> {
    fn json(&self, pretty: bool, item: impl Fn(&T, bool) -> String) -> Option<String> {
        match self {
            List::Absent => None,
            List::Null => Some("null".to_owned()),
            List::Items(elems) => Some(array(elems, pretty, item)),
            List::NotList(n) => n.json().or_else(|| Some("0".to_owned())),
        }
    }

    /// The items, when the field is sure to decode (each item by `valid`): `Some(vec![])` when
    /// left out or `null`, `None` when not predicted (a scalar, a non-object item, an invalid one).
    fn expected<U>(&self, valid: impl Fn(&T) -> Option<U>) -> Option<Vec<U>> {
        match self {
            List::Absent | List::Null => Some(Vec::new()),
            List::Items(elems) => all(elems, valid),
            List::NotList(_) => None,
        }
    }
}

/// One of a transaction's `Results`.
#[derive(Arbitrary, Clone, Debug)]
pub enum TxnResult {
    /// `{"KV": entry}`.
    Kv(Kv),
    /// `{"KV": null}`.
    KvNull,
    /// `{}`: a result of another kind of operation.
    Empty,
}

/// The `What` of a transaction error.
#[derive(Arbitrary, Clone, Debug)]
pub enum What {
    /// Consul's `failed to lock key "<key>", lock is already held`.
    Held(String),
    /// Consul's `failed to lock key "<key>" due to lock delay`.
    Delay(String),
    /// Consul's `invalid session "<id>"`.
    InvalidSession(Id),
    /// Anything (or no string).
    Text(Text),
}

impl What {
    fn text(&self) -> Text {
        // Go's %q, as Consul words them, is close enough to a JSON string for these.
        match self {
            What::Held(key) => Text::Plain(format!(
                "failed to lock key {}, lock is already held",
                json_string(key)
            )),
            What::Delay(key) => Text::Plain(format!(
                "failed to lock key {} due to lock delay",
                json_string(key)
            )),
            What::InvalidSession(id) => match id.text() {
                Text::Plain(s) => Text::Plain(format!("invalid session {}", json_string(&s))),
                other => other,
            },
            What::Text(t) => t.clone(),
        }
    }
}

/// One of a transaction's `Errors`.
#[derive(Arbitrary, Clone, Debug)]
pub struct TxnError {
    /// `OpIndex` (the decoder ignores it, whatever its type).
    pub op_index: Num,
    /// `What`.
    pub what: What,
}

/// A lock transaction's reply, `{"Results": [{"KV": entry}], "Errors": [{"OpIndex": 0, "What":
/// "..."}]}`, with arbitrary parts (Consul sends one of the two, the other `null`).
#[derive(Arbitrary, Clone, Debug)]
pub struct Txn {
    /// `Results`.
    pub results: List<TxnResult>,
    /// `Errors`.
    pub errors: List<TxnError>,
    /// An unknown field.
    pub extra: Option<Extra>,
}

impl Txn {
    /// The JSON object.
    pub fn json(&self, pretty: bool) -> String {
        let result = |r: &TxnResult, pretty: bool| match r {
            TxnResult::Kv(kv) => format!("{{\"KV\": {}}}", kv.json(pretty)),
            TxnResult::KvNull => "{\"KV\": null}".to_owned(),
            TxnResult::Empty => "{}".to_owned(),
        };
        let error = |e: &TxnError, pretty: bool| {
            object(
                &[("OpIndex", e.op_index.json()), ("What", e.what.text().json())],
                None,
                pretty,
            )
        };
        object(
            &[
                ("Results", self.results.json(pretty, result)),
                ("Errors", self.errors.json(pretty, error)),
            ],
            self.extra.as_ref(),
            pretty,
        )
    }

    /// What a correct decoder makes of it when every part is sure to decode. Every result must
    /// be valid, not only the first that is used: the decoder reads the whole array.
    pub fn expected(&self) -> Option<BodyExpect> {
        let results = self.results.expected(|r| match r {
            TxnResult::Kv(kv) => kv.expected().map(Some),
            TxnResult::KvNull | TxnResult::Empty => Some(None),
        })?;
        // `What` is a defaulted string: absent is "", `null` or a number fails.
        let errors = self.errors.expected(|e| e.what.text().defaulted())?;
        Some(BodyExpect::Txn {
            // The lock is a transaction's last operation (the only one of an acquire; after a
            // `check-session` in a proclaim): its entry is the last result.
            locked: results.into_iter().last().flatten(),
            refused: errors.into_iter().next(),
        })
    }
}

/// A `true`/`false` body, or a near miss.
#[derive(Arbitrary, Clone, Debug)]
pub enum BoolText {
    /// `true`/`false`.
    Plain(bool),
    /// With white space around (`"true\n"`, as Consul sends it).
    Padded(bool, u8, u8),
    /// `True`/`FALSE`...
    Case(bool, u8),
    /// `"true"` in quotes.
    Quoted(bool),
    /// Anything.
    Other(String),
}

const PADDING: [&str; 6] = ["", " ", "\n", "\r\n", "\t", "  \n\n"];

impl BoolText {
    fn text(&self) -> String {
        let pad = |i: u8| PADDING[usize::from(i) % PADDING.len()];
        match self {
            BoolText::Plain(b) => b.to_string(),
            BoolText::Padded(b, l, r) => format!("{}{b}{}", pad(*l), pad(*r)),
            BoolText::Case(b, c) => {
                let s = b.to_string();
                match c % 3 {
                    0 => s.to_uppercase(),
                    1 => {
                        let mut chars = s.chars();
                        chars
                            .next()
                            .map(|f| f.to_uppercase().chain(chars).collect())
                            .unwrap_or_default()
                    }
                    _ => format!("{s}e"),
                }
            }
            BoolText::Quoted(b) => format!("\"{b}\""),
            BoolText::Other(s) => s.clone(),
        }
    }
}

/// A reply body.
#[derive(Arbitrary, Clone, Debug)]
pub struct Body {
    /// Its shape.
    pub shape: Shape,
    /// Pretty-printed, as Consul does for curl.
    pub pretty: bool,
    /// JSON white space before and after (indexes into a small table).
    pub pad: (u8, u8),
    /// Cut the body at this many bytes.
    pub cut: Option<u16>,
}

/// What a correct decoder makes of a body, when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyExpect {
    /// Not predicted.
    Unknown,
    /// A valid array of these KV pairs (`null` included, as empty).
    Kvs(Vec<KvPair>),
    /// A valid array of these sessions (`null` included, as empty).
    Sessions(Vec<SessionEntry>),
    /// A valid empty list (`[]` or `null`): no KV pair, no session.
    EmptyList,
    /// A session create's reply with this ID.
    Created(SessionId),
    /// A valid `true`/`false` (after trimming white space).
    Bool(bool),
    /// A lock transaction's reply whose parts are all valid: what a 200 holds (its first
    /// result's entry; `None`: no entry, so malformed), and what a 409 holds (its first error's
    /// `What`, to be classified; `None`: no error, so malformed).
    Txn {
        /// The entry a 200 answers with.
        locked: Option<KvPair>,
        /// The reason a 409 gives.
        refused: Option<String>,
    },
}

fn all<T, U>(elems: &[Elem<T>], f: impl Fn(&T) -> Option<U>) -> Option<Vec<U>> {
    elems
        .iter()
        .map(|e| match e {
            Elem::Entry(t) => f(t),
            _ => None,
        })
        .collect()
}

fn array<T>(elems: &[Elem<T>], pretty: bool, json: impl Fn(&T, bool) -> String) -> String {
    let items: Vec<String> = elems
        .iter()
        .map(|e| match e {
            Elem::Entry(t) => json(t, pretty),
            Elem::Scalar(n) => n.json().unwrap_or_else(|| "0".to_owned()),
            Elem::Str(s) => json_string(s),
            Elem::EmptyObject => "{}".to_owned(),
            Elem::EmptyArray => "[]".to_owned(),
        })
        .collect();
    if pretty {
        format!("[\n    {}\n]", items.join(",\n    "))
    } else {
        format!("[{}]", items.join(","))
    }
}

impl Body {
    /// The bytes and the expectation.
    pub fn build(&self) -> (Vec<u8>, BodyExpect) {
        let (text, expect): (Vec<u8>, BodyExpect) = match &self.shape {
            Shape::Raw(b) => (b.clone(), BodyExpect::Unknown),
            Shape::Text(s) => (s.clone().into_bytes(), BodyExpect::Unknown),
            Shape::Bool(b) => {
                let text = b.text();
                let expect = match text.trim() {
                    "true" => BodyExpect::Bool(true),
                    "false" => BodyExpect::Bool(false),
                    _ => BodyExpect::Unknown,
                };
                (text.into_bytes(), expect)
            }
            Shape::Kvs(elems) => (
                array(elems, self.pretty, Kv::json).into_bytes(),
                all(elems, Kv::expected).map_or(BodyExpect::Unknown, BodyExpect::Kvs),
            ),
            Shape::Sessions(elems) => (
                array(elems, self.pretty, Session::json).into_bytes(),
                all(elems, Session::expected).map_or(BodyExpect::Unknown, BodyExpect::Sessions),
            ),
            Shape::Created(id, extra) => (
                object(&[("ID", id.json())], extra.as_ref(), self.pretty).into_bytes(),
                id.required().map_or(BodyExpect::Unknown, BodyExpect::Created),
            ),
            Shape::Txn(txn) => (
                txn.json(self.pretty).into_bytes(),
                txn.expected().unwrap_or(BodyExpect::Unknown),
            ),
            Shape::Null => (b"null".to_vec(), BodyExpect::Unknown),
            Shape::Empty => (Vec::new(), BodyExpect::Unknown),
            Shape::Scalar(n) => (n.json().unwrap_or_default().into_bytes(), BodyExpect::Unknown),
        };
        let json_pad = [&b""[..], b" ", b"\n", b"\r\n", b"\t", b"\n\n  "];
        let mut body = json_pad[usize::from(self.pad.0) % json_pad.len()].to_vec();
        body.extend_from_slice(&text);
        body.extend_from_slice(json_pad[usize::from(self.pad.1) % json_pad.len()]);
        let mut expect = match expect {
            BodyExpect::Kvs(v) if v.is_empty() => BodyExpect::EmptyList,
            BodyExpect::Sessions(v) if v.is_empty() => BodyExpect::EmptyList,
            other => other,
        };
        if matches!(self.shape, Shape::Null) {
            // `null` is an empty list to every list decoder.
            expect = BodyExpect::EmptyList;
        }
        if let Some(cut) = self.cut {
            let cut = usize::from(cut);
            if cut < body.len() {
                body.truncate(cut);
                expect = BodyExpect::Unknown;
            }
        }
        (body, expect)
    }
}

/// A numeric metadata header.
#[derive(Arbitrary, Clone, Debug)]
pub enum NumHeader {
    /// Not sent.
    Absent,
    /// A number.
    Num(u64),
    /// A small number (indexes near the last one).
    Small(u8),
    /// With spaces or tabs around.
    Padded(u64, u8),
    /// Sent twice (the first one counts).
    Twice(u64, u64),
    /// A negative number.
    Neg(u64),
    /// `+n`.
    Plus(u64),
    /// Any text.
    Text(String),
    /// Any bytes.
    Bytes(Vec<u8>),
}

impl NumHeader {
    fn values(&self) -> Vec<Vec<u8>> {
        let pads = [" ", "\t", "  ", " \t"];
        match self {
            NumHeader::Absent => vec![],
            NumHeader::Num(n) => vec![n.to_string().into_bytes()],
            NumHeader::Small(n) => vec![n.to_string().into_bytes()],
            NumHeader::Padded(n, p) => {
                let p = pads[usize::from(*p) % pads.len()];
                vec![format!("{p}{n}{p}").into_bytes()]
            }
            NumHeader::Twice(a, b) => vec![a.to_string().into_bytes(), b.to_string().into_bytes()],
            NumHeader::Neg(n) => vec![format!("-{n}").into_bytes()],
            NumHeader::Plus(n) => vec![format!("+{n}").into_bytes()],
            NumHeader::Text(s) => vec![s.clone().into_bytes()],
            NumHeader::Bytes(b) => vec![b.clone()],
        }
    }

    /// `Some(Some(n))`: n; `Some(None)`: absent; `None`: not predicted.
    fn expected(&self) -> Option<Option<u64>> {
        match self {
            NumHeader::Absent => Some(None),
            NumHeader::Num(n) | NumHeader::Padded(n, _) | NumHeader::Twice(n, _) => Some(Some(*n)),
            NumHeader::Small(n) => Some(Some(u64::from(*n))),
            _ => None,
        }
    }
}

/// `X-Consul-KnownLeader`.
#[derive(Arbitrary, Clone, Debug)]
pub enum LeaderHeader {
    /// Not sent.
    Absent,
    /// `true`/`false`.
    Bool(bool),
    /// `True`, `FALSE`.
    Case(bool),
    /// Any text.
    Text(String),
}

impl LeaderHeader {
    fn value(&self) -> Option<Vec<u8>> {
        match self {
            LeaderHeader::Absent => None,
            LeaderHeader::Bool(b) => Some(b.to_string().into_bytes()),
            LeaderHeader::Case(b) => Some(b.to_string().to_uppercase().into_bytes()),
            LeaderHeader::Text(s) => Some(s.clone().into_bytes()),
        }
    }

    fn expected(&self) -> Option<Option<bool>> {
        match self {
            LeaderHeader::Absent => Some(None),
            LeaderHeader::Bool(b) => Some(Some(*b)),
            _ => None,
        }
    }
}

/// Other headers Consul (or a proxy) sends.
#[derive(Arbitrary, Clone, Debug)]
pub enum ExtraHeader {
    /// `Content-Type`.
    ContentType(u8),
    /// `Vary: Accept-Encoding`.
    Vary,
    /// `X-Consul-Effective-Consistency`.
    Consistency(String),
    /// Any name and value (the three metadata names are skipped).
    Any(String, Vec<u8>),
}

/// The metadata headers, and others.
#[derive(Arbitrary, Clone, Debug)]
pub struct Meta {
    /// `X-Consul-Index`.
    pub index: NumHeader,
    /// `X-Consul-KnownLeader`.
    pub leader: LeaderHeader,
    /// `X-Consul-LastContact`.
    pub contact: NumHeader,
    /// Others.
    pub extra: Vec<ExtraHeader>,
}

const META_NAMES: [&str; 3] = ["x-consul-index", "x-consul-knownleader", "x-consul-lastcontact"];

impl Meta {
    /// Adds the headers to `headers`; gives the metadata a correct decoder reads, when known.
    pub fn apply(&self, headers: &mut http::HeaderMap) -> Option<QueryMeta> {
        let mut known = true;
        let mut put =
            |name: &str, value: &[u8], known_if_refused: bool| match http::HeaderValue::from_bytes(value) {
                Ok(v) => {
                    if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                        headers.append(name, v);
                    }
                }
                Err(_) => {
                    if !known_if_refused {
                        known = false;
                    }
                }
            };
        for v in self.index.values() {
            put("X-Consul-Index", &v, false);
        }
        if let Some(v) = self.leader.value() {
            put("X-Consul-KnownLeader", &v, false);
        }
        for v in self.contact.values() {
            put("X-Consul-LastContact", &v, false);
        }
        for e in &self.extra {
            match e {
                ExtraHeader::ContentType(i) => {
                    let types = ["application/json", "text/plain; charset=utf-8", "text/html"];
                    put(
                        "Content-Type",
                        types[usize::from(*i) % types.len()].as_bytes(),
                        true,
                    );
                }
                ExtraHeader::Vary => put("Vary", b"Accept-Encoding", true),
                ExtraHeader::Consistency(s) => put("X-Consul-Effective-Consistency", s.as_bytes(), true),
                ExtraHeader::Any(name, value) => {
                    if !META_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
                        put(name, value, true);
                    }
                }
            }
        }
        if !known {
            return None;
        }
        Some(QueryMeta {
            index: self.index.expected()?.unwrap_or(0),
            known_leader: self.leader.expected()?,
            last_contact: self.contact.expected()?.map(Duration::from_millis),
        })
    }
}

/// A status, mostly among Consul's.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Status {
    /// 200.
    Ok,
    /// 404.
    NotFound,
    /// 500.
    Internal,
    /// 400, 403, 429, 502, 503, 204.
    Common(u8),
    /// Anything in 100..=599.
    Any(u16),
}

impl Status {
    /// The code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::NotFound => 404,
            Status::Internal => 500,
            Status::Common(i) => [400, 403, 429, 502, 503, 204][usize::from(i) % 6],
            Status::Any(n) => crate::http_text::fold_status(u64::from(n)),
        }
    }
}

/// A whole reply.
#[derive(Arbitrary, Clone, Debug)]
pub struct Reply {
    /// The status.
    pub status: Status,
    /// The headers.
    pub meta: Meta,
    /// The body.
    pub body: Body,
}

/// What a correct decoder makes of a built reply.
#[derive(Clone, Debug)]
pub struct Expect {
    /// The metadata, when known.
    pub meta: Option<QueryMeta>,
    /// The body, when known.
    pub body: BodyExpect,
}

impl Reply {
    /// The response and what must be made of it.
    pub fn build(&self) -> (http::Response<Vec<u8>>, Expect) {
        let (body, body_expect) = self.body.build();
        let mut response = http::Response::new(body);
        *response.status_mut() =
            http::StatusCode::from_u16(self.status.code()).unwrap_or(http::StatusCode::OK);
        let meta = self.meta.apply(response.headers_mut());
        (
            response,
            Expect {
                meta,
                body: body_expect,
            },
        )
    }
}
