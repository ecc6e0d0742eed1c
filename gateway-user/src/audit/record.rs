//! The audit record: one JSON line per event. Field order here is the canonical order that
//! the hash covers (serde serializes struct fields in declaration order).
//!
//! The writer encodes records with [`Record::write_json`], a hand-written twin of the derived
//! `Serialize` that produces the same bytes (tested field by field and on every escape) at a
//! fraction of the cost: serde_json escapes strings byte by byte through a table, which was
//! the largest user-space cost per statement after SHA-256.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Param;
use crate::metrics::{Event, EventKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Login,
    LoginFailed,
    #[default]
    Statement,
    Result,
    SessionEnd,
    /// Signed by the gateway's key over (seq, hash) of the record before it.
    Checkpoint,
    /// The audit writer (re)started; first record of every run.
    Start,
    /// `pgward token revoke` (noticed by serve): `jti` or `user`, details in `meta`.
    Revoke,
    /// `pgward access request`: `user` asks for `meta.role` for `meta.ttl`.
    AccessRequest,
    /// `pgward access approve`: `user`'s request approved by `meta.approver` (whose token id is
    /// `jti`); the grant ends at `meta.expires_at`.
    AccessApprove,
    /// `pgward access revoke`: a grant or pending request withdrawn.
    AccessRevoke,
    /// A grant's time ran out.
    GrantExpired,
    /// At switch-on, a session on the real Postgres that did not come through pgward was
    /// ended: `user`, `client`, backend pid / application in `meta`.
    Evicted,
    /// `pgward intercept detach`: the pinned interception programs were removed.
    InterceptDetach,
}

impl Kind {
    /// The name this kind has in a line (as serde writes it).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Login => "login",
            Kind::LoginFailed => "login_failed",
            Kind::Statement => "statement",
            Kind::Result => "result",
            Kind::SessionEnd => "session_end",
            Kind::Checkpoint => "checkpoint",
            Kind::Start => "start",
            Kind::Revoke => "revoke",
            Kind::AccessRequest => "access_request",
            Kind::AccessApprove => "access_approve",
            Kind::AccessRevoke => "access_revoke",
            Kind::GrantExpired => "grant_expired",
            Kind::Evicted => "evicted",
            Kind::InterceptDetach => "intercept_detach",
        }
    }
}

/// Where a client came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Client {
    /// "127.0.0.1:50412"; `meta` for connections steered by the eBPF programs: what the
    /// kernel saw (original_dst, via, pid, uid, gid, cgroup_id, cgroup, comm). Shared: every
    /// record of the session carries it, and a clone per record would copy the whole map.
    Tcp {
        addr: Arc<str>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<Arc<serde_json::Value>>,
    },
    /// unix socket peer credentials
    Unix { uid: u32, pid: i32 },
}

/// What a session hands to the writer. seq/ts/prev_hash/hash are assigned by the writer.
/// Optional fields are omitted from the line when `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339 with microseconds, UTC, assigned by the writer.
    pub ts: String,
    pub prev_hash: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Arc<[String]>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Client>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Arc<str>>,
    /// login: token id; login_failed: token id if it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// statement: SQL text (for the extended protocol, the text of the Parse that named the
    /// statement; for FunctionCall, a description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// statement (extended protocol, function call): the bound parameters, None for SQL
    /// NULL ([`Param`] says how each value is shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<Option<Param>>>,
    /// statement: "simple", "extended", "function_call".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// statement: allow / deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// statement: name of the policy rule that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// statement: when the record was made durable relative to the statement's effects —
    /// "write-ahead" (before the statement reached the server) or "hold-reply" (while the
    /// server ran it, with every reply held until then; see docs/audit-log.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<std::borrow::Cow<'static, str>>,
    /// result: seq of the statement record this result belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_seq: Option<u64>,
    /// result: command tag ("SELECT 3", "INSERT 0 1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// result: rows affected / returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// result: microseconds from forwarding to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// result / login_failed: SQLSTATE on error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    /// result / login_failed / session_end: human-readable error or reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// checkpoint: seq and hash of the record it anchors, and the signature over them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    /// checkpoint: key id of the signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Free-form extra facts (pid/uid/cgroup of an intercepted client, etc.).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
    /// Only on lines read back: the hash stored in the line. Never serialized by the writer
    /// as part of the canonical bytes (it is appended after hashing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Record {
    /// Append the record's JSON to `out`: byte for byte what `serde_json::to_writer` writes
    /// for it (fields in declaration order, `None`s and an empty `hash` left out, compact,
    /// serde_json's string escapes), only faster. Numbers inside `meta` values are written by
    /// serde_json.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let mut w = JsonObject::new(out);
        w.u64("seq", self.seq);
        w.str("ts", &self.ts);
        w.str("prev_hash", &self.prev_hash);
        w.str("kind", self.kind.as_str());
        w.opt_str("session", &self.session);
        w.opt_str("user", &self.user);
        if let Some(groups) = &self.groups {
            write_seq(w.key("groups"), b'[', b']', groups.iter(), |out, g| {
                write_str(out, g);
                Ok(())
            })?;
        }
        if let Some(client) = &self.client {
            let out = w.key("client");
            let mut c = JsonObject::new(out);
            match client {
                Client::Tcp { addr, meta } => {
                    c.str("addr", addr);
                    if let Some(m) = meta {
                        write_value(c.key("meta"), m)?;
                    }
                }
                Client::Unix { uid, pid } => {
                    c.u64("uid", u64::from(*uid));
                    let out = c.key("pid");
                    out.extend_from_slice(itoa::Buffer::new().format(*pid).as_bytes());
                }
            }
            c.end();
        }
        w.opt_str("database", &self.database);
        w.opt_str("jti", &self.jti);
        w.opt_str("sql", &self.sql);
        if let Some(params) = &self.params {
            write_seq(w.key("params"), b'[', b']', params, |out, p| {
                match p {
                    Some(v) => v.write_json(out),
                    None => out.extend_from_slice(b"null"),
                }
                Ok(())
            })?;
        }
        w.opt_str("protocol", &self.protocol);
        w.opt_str("decision", &self.decision);
        w.opt_str("rule", &self.rule);
        if let Some(d) = &self.durability {
            w.str("durability", d);
        }
        w.opt_u64("statement_seq", self.statement_seq);
        w.opt_str("tag", &self.tag);
        w.opt_u64("rows", self.rows);
        w.opt_u64("duration_us", self.duration_us);
        w.opt_str("sqlstate", &self.sqlstate);
        w.opt_str("error", &self.error);
        w.opt_u64("anchor_seq", self.anchor_seq);
        w.opt_str("anchor_hash", &self.anchor_hash);
        w.opt_str("sig", &self.sig);
        w.opt_str("kid", &self.kid);
        if let Some(m) = &self.meta {
            write_value(w.key("meta"), m)?;
        }
        if !self.hash.is_empty() {
            w.str("hash", &self.hash);
        }
        w.end();
        Ok(())
    }
}

impl Record {
    /// What the metrics count of this record once it is durable (see [`crate::metrics`]).
    pub(crate) fn metrics_event(&self) -> Event {
        let kind = match self.kind {
            Kind::Login => EventKind::Login,
            Kind::LoginFailed => EventKind::LoginFailed,
            Kind::Statement => EventKind::Statement,
            Kind::Result => EventKind::Result,
            Kind::SessionEnd => EventKind::SessionEnd,
            _ => EventKind::Other,
        };
        Event {
            kind,
            denied: self.decision.as_deref() == Some("deny"),
            error: self.sqlstate.as_deref().is_some_and(|s| !s.is_empty()),
            masked: self.meta.as_ref().and_then(|m| m.get("masked_values")).and_then(|v| v.as_u64()).unwrap_or(0),
        }
    }
}

/// `v` as serde_json writes it (objects in the map's own order, numbers by serde_json).
fn write_value(out: &mut Vec<u8>, v: &serde_json::Value) -> Result<(), serde_json::Error> {
    use serde_json::Value;
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => serde_json::to_writer(&mut *out, n)?,
        Value::String(s) => write_str(out, s),
        Value::Array(a) => write_seq(out, b'[', b']', a, write_value)?,
        Value::Object(m) => write_seq(out, b'{', b'}', m, |out, (k, x)| {
            write_str(out, k);
            out.push(b':');
            write_value(out, x)
        })?,
    }
    Ok(())
}

/// `open`, the items separated by commas (each written by `each`), `close`.
fn write_seq<I: IntoIterator>(
    out: &mut Vec<u8>,
    open: u8,
    close: u8,
    items: I,
    mut each: impl FnMut(&mut Vec<u8>, I::Item) -> Result<(), serde_json::Error>,
) -> Result<(), serde_json::Error> {
    out.push(open);
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        each(out, item)?;
    }
    out.push(close);
    Ok(())
}

/// Writes `{"k":v,...}` one member at a time. Keys are written as they are: every key here is
/// a plain identifier.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> JsonObject<'a> {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    /// Start a member: its separator and key; the caller writes the value.
    #[inline]
    fn key(&mut self, k: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn str(&mut self, k: &str, v: &str) {
        write_str(self.key(k), v);
    }

    fn opt_str<S: AsRef<str>>(&mut self, k: &str, v: &Option<S>) {
        if let Some(v) = v {
            self.str(k, v.as_ref());
        }
    }

    fn u64(&mut self, k: &str, v: u64) {
        let out = self.key(k);
        out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }

    fn opt_u64(&mut self, k: &str, v: Option<u64>) {
        if let Some(v) = v {
            self.u64(k, v);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Whether serde_json escapes byte `b` in a string: `"`, `\` and the control characters
/// below 0x20 (not DEL, not non-ASCII).
#[inline]
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether no byte of `chunk` needs an escape. A fixed-size, branch-free loop: compiled to a
/// few SIMD compares (a loop over a slice with an early exit was not vectorized).
#[inline]
fn clean(chunk: &[u8; 16]) -> bool {
    let mut dirty = 0u8;
    for &b in chunk {
        dirty |= u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\');
    }
    dirty == 0
}

/// Whether no byte of `bytes` needs an escape (the usual case), 16 bytes at a time; the last
/// few bytes are checked in a padded copy.
fn clean_all(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    for c in &mut chunks {
        if !<&[u8; 16]>::try_from(c).is_ok_and(clean) {
            return false;
        }
    }
    let rest = chunks.remainder();
    let mut pad = [b'a'; 16];
    pad[..rest.len()].copy_from_slice(rest);
    clean(&pad)
}

/// `s` as a JSON string, escaped exactly as serde_json does: `\"`, `\\`, `\b \t \n \f \r`,
/// other control characters as `\u00xx` (lowercase hex). A string with nothing to escape is
/// found so 16 bytes at a time (a branch-free test the compiler vectorizes) and copied whole;
/// otherwise runs of bytes that need no escape are skipped 16 at a time.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    const CHUNK: usize = 16;
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if clean_all(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0; // first byte not copied yet
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + CHUNK).and_then(|c| <&[u8; CHUNK]>::try_from(c).ok())
            && clean(chunk)
        {
            i += CHUNK;
            continue;
        }
        let b = bytes[i];
        if needs_escape(b) {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x09 => out.extend_from_slice(b"\\t"),
                0x0a => out.extend_from_slice(b"\\n"),
                0x0c => out.extend_from_slice(b"\\f"),
                0x0d => out.extend_from_slice(b"\\r"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
            }
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_event_of_a_record() {
        let ev = |r: Record| r.metrics_event();
        let denied = Record { kind: Kind::Statement, decision: Some("deny".into()), ..Default::default() };
        assert_eq!(ev(denied), Event { kind: EventKind::Statement, denied: true, error: false, masked: 0 });
        let allowed = Record { kind: Kind::Statement, decision: Some("allow".into()), ..Default::default() };
        assert!(!ev(allowed).denied);
        let failed = Record { kind: Kind::Result, sqlstate: Some("22012".into()), ..Default::default() };
        assert!(ev(failed).error);
        let ok = Record { kind: Kind::Result, sqlstate: Some(String::new()), ..Default::default() };
        assert!(!ev(ok).error);
        let masked = Record { kind: Kind::Result, meta: Some(serde_json::json!({"masked_values": 3})), ..Default::default() };
        assert_eq!(ev(masked).masked, 3);
        assert_eq!(ev(Record { kind: Kind::Login, ..Default::default() }).kind, EventKind::Login);
        assert_eq!(ev(Record { kind: Kind::Checkpoint, ..Default::default() }).kind, EventKind::Other);
    }

    fn serde_bytes(r: &Record) -> Vec<u8> {
        serde_json::to_vec(r).expect("serde")
    }

    fn ours(r: &Record) -> Vec<u8> {
        let mut out = b"prefix".to_vec();
        r.write_json(&mut out).expect("write_json");
        assert!(out.starts_with(b"prefix"), "appends");
        out.split_off(6)
    }

    /// Every field set. A struct literal without `..Default::default()`: a field added to
    /// `Record` does not compile here until this test (and `write_json`) know it.
    fn full(s: &str) -> Record {
        Record {
            seq: u64::MAX,
            ts: "2026-12-02T06:56:11.161423Z".into(),
            prev_hash: "ab".repeat(32),
            kind: Kind::Statement,
            session: Some(format!("sess{s}").into()),
            user: Some(format!("user{s}").into()),
            groups: Some(vec![String::new(), s.into(), "g".into()].into()),
            client: Some(Client::Tcp {
                addr: format!("127.0.0.1:1{s}").into(),
                meta: Some(Arc::new(serde_json::json!({
                    "pid": 7, "comm": s, "z": [1, null, {"a": -1.5, "b": true, "c": false}], "u": u64::MAX, "i": i64::MIN,
                    "e": {}, "f": [], "q\"k\n": 1e300
                }))),
            }),
            database: Some(s.into()),
            jti: Some(s.into()),
            sql: Some(format!("select '{s}'")),
            params: Some(vec![
                None,
                Some(Param::Text(s.into())),
                Some(Param::Text(String::new())),
                Some(Param::Raw { oid: 600, hex: format!("\\x{s}") }),
                Param::of(1, Some(&[1; 5000]), 0),
                Param::of(0, Some(format!("{s}{}", "€".repeat(2000)).as_bytes()), 0),
            ]),
            protocol: Some("extended".into()),
            decision: Some("allow".into()),
            rule: Some(s.into()),
            durability: Some(s.to_string().into()),
            statement_seq: Some(0),
            tag: Some("SELECT 1".into()),
            rows: Some(1),
            duration_us: Some(123_456),
            sqlstate: Some("42501".into()),
            error: Some(s.into()),
            anchor_seq: Some(9),
            anchor_hash: Some(s.into()),
            sig: Some(s.into()),
            kid: Some(s.into()),
            meta: Some(serde_json::json!({"k": s, "masked": [{"column": s, "values": 3}], "Z": 0.1, "a": null})),
            hash: s.into(),
        }
    }

    #[test]
    fn writes_what_serde_writes_for_every_field_and_kind() {
        let kinds = [
            Kind::Login,
            Kind::LoginFailed,
            Kind::Statement,
            Kind::Result,
            Kind::SessionEnd,
            Kind::Checkpoint,
            Kind::Start,
            Kind::Revoke,
            Kind::AccessRequest,
            Kind::AccessApprove,
            Kind::AccessRevoke,
            Kind::GrantExpired,
        ];
        let mut cases = vec![Record::default(), full("x"), full("")];
        for kind in kinds {
            cases.push(Record { kind, ..full("k") });
        }
        cases.push(Record { client: Some(Client::Unix { uid: u32::MAX, pid: -1 }), ..full("u") });
        cases.push(Record { client: Some(Client::Unix { uid: 0, pid: i32::MIN }), ..Record::default() });
        cases.push(Record { client: Some(Client::Tcp { addr: "a".into(), meta: None }), ..Record::default() });
        cases.push(Record { groups: Some(Vec::new().into()), params: Some(vec![]), ..Record::default() });
        cases.push(Record { groups: Some(vec!["only".into()].into()), params: Some(vec![None]), ..Record::default() });
        cases.push(Record { meta: Some(serde_json::Value::Null), ..Record::default() });
        for r in &cases {
            assert_eq!(String::from_utf8_lossy(&ours(r)), String::from_utf8_lossy(&serde_bytes(r)));
        }
    }

    #[test]
    fn escapes_every_byte_as_serde_does() {
        // Each ASCII byte alone, at each position around the 16-byte chunk edges, then
        // non-ASCII text and long runs.
        let mut texts: Vec<String> = Vec::new();
        for b in 0u8..=0x7f {
            let c = char::from(b);
            for pad in [0, 1, 15, 16, 17, 31, 32, 33] {
                texts.push(format!("{}{c}{}", "a".repeat(pad), "b".repeat(pad % 5)));
            }
        }
        texts.push("é ü — 漢字 🦀 \u{7f}\u{80}\u{ffff}".into());
        texts.push("\"".repeat(40));
        texts.push("\\".repeat(33));
        texts.push(format!("{}\n{}\t{}", "x".repeat(100), "y".repeat(15), "z".repeat(16)));
        texts.push("select * from t where a = '\u{0}' and b = \"q\"\r\n\u{1b}[0m".into());
        for t in &texts {
            let mut ours = Vec::new();
            write_str(&mut ours, t);
            assert_eq!(ours, serde_json::to_vec(t).expect("serde"), "{t:?}");
            let r = Record { sql: Some(t.clone()), groups: Some(vec![t.clone()].into()), ..full(t) };
            assert_eq!(super::tests::ours(&r), serde_bytes(&r), "{t:?}");
        }
    }
}
