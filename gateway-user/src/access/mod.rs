//! Token revocation and just-in-time (JIT) access grants.
//!
//! The state is two append-only streams of events, kept by the backend `[access] backend`
//! names:
//!
//! * revocations — one [`Revocation`] each: a token id (`jti`, or `sha256:` and the token's
//!   hash for a token without one — see `auth::token_id`), or a user whose tokens issued at or
//!   before the revocation are dead;
//! * access events — one [`AccessEvent`] each: `request`, `approve`, `revoke` (of a grant).
//!
//! `file` (the default, one host): `revoked.jsonl` and `access.jsonl` in `[access] state_dir`
//! (default `<config dir>/state`); the CLI appends under an exclusive `flock`. `etcd` (a
//! fleet): keys under `[access.etcd] prefix` (layout in `crate::etcd`); the CLI writes with a
//! compare-and-swap, so an operator on any host revokes or approves for every gateway.
//!
//! The CLI (`pgward token revoke`, `pgward access …`) validates each event against all before
//! it ([`Store`]). `serve` reads the backend ([`Watcher`]: polling every 200 ms, and with
//! etcd also watching), keeps a [`State`] snapshot behind an `Arc` with an atomic generation
//! counter ([`Access`]), and writes an audit record for every event it notices in its own log.
//! Sessions check their token (and grant) before every statement ([`SessionCheck`]): the
//! common case is one atomic load and two integer compares; the snapshot is consulted only
//! when the generation moved.
//!
//! With etcd, an outage keeps the last known state in force; once it is older than
//! `[access] max_staleness`, new logins are refused ([`Freshness`]) while sessions already
//! logged in keep running on it.
//!
//! Order of effects in `serve`: a revocation is enforced as soon as it is read (it only takes
//! rights away) and audited right after; an access event is audited first and takes effect
//! only once its record is durable (a grant gives rights). A cursor file in the state
//! directory (`serve-cursor.json`, `serve-cursor-etcd.json`) remembers how far each stream has
//! been audited, so a restart neither repeats nor skips records.
//!
//! The state is as sensitive as the signing key: whoever can write it can grant roles.
//! `serve` creates the state directory 0700 and re-checks every event against the current
//! config (grantable roles, approver groups, TTLs, approver ≠ requester) before it takes
//! effect; with etcd, give write access to the prefix only to operators (etcd auth/TLS).
//!
//! Files: `state` (revocations and requests in memory, the shared snapshot), `store` (the
//! CLI's validated writes) with `file_store` and `etcd_store`, `source` (what `serve` reads)
//! with `file_source` and `etcd_source`, `freshness` (how current a remote state is),
//! `watcher` (`serve`'s reading and auditing), `check` (the per-statement decision).

mod check;
mod etcd_source;
mod etcd_store;
mod file_source;
mod file_store;
mod freshness;
mod source;
mod state;
mod store;
mod watcher;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use check::{Refusal, SessionCheck, SessionGrant};
pub use freshness::{BackendStatus, Freshness, STATUS_FILE};
pub use state::{Access, AccessEvent, AccessRequest, RequestState, Revocation, Rules, State};
pub use store::{Store, state_dir};
pub use watcher::Watcher;

pub const REVOKED_FILE: &str = "revoked.jsonl";
pub const ACCESS_FILE: &str = "access.jsonl";
pub const CURSOR_FILE: &str = "serve-cursor.json";
/// How far `serve` audited the etcd backend's items.
pub const ETCD_CURSOR_FILE: &str = "serve-cursor-etcd.json";
/// How often `serve` looks at the state files (and reads etcd, besides its watch).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Longest line `serve` accepts in a state file.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The request or approval is not allowed (exit status 1 in the CLI).
    #[error("{0}")]
    Refused(String),
    /// Bad arguments or configuration.
    #[error("{0}")]
    Invalid(String),
}

impl AccessError {
    fn io(path: &Path, source: std::io::Error) -> AccessError {
        AccessError::Io { path: path.to_owned(), source }
    }
}

pub use crate::host::clock::now_unix;

/// RFC 3339 (UTC, seconds) for unix seconds.
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

fn new_id(prefix: &str) -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(12);
    format!("{prefix}-{s}")
}

use crate::host::accounts::effective_uid as euid;
