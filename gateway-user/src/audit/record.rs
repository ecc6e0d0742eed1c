//! The audit record: one JSON line per event. Field order here is the canonical order that
//! the hash covers (serde serializes struct fields in declaration order).

use serde::{Deserialize, Serialize};

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
}

/// Where a client came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Client {
    /// "127.0.0.1:50412"; `meta` for connections steered by the eBPF programs: what the
    /// kernel saw (original_dst, via, pid, uid, gid, cgroup_id, cgroup, comm).
    Tcp {
        addr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<serde_json::Value>,
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
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Client>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// login: token id; login_failed: token id if it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// statement: SQL text (for the extended protocol, the text of the Parse that named the
    /// statement; for FunctionCall, a description).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// statement (extended protocol): bound parameters, text or `\x…` hex for binary, null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<Option<String>>>,
    /// statement: "simple", "extended", "function_call".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// statement: allow / deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// statement: name of the policy rule that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
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
