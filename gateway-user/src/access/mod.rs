//! Token revocation and just-in-time (JIT) access grants.
//!
//! State lives in two append-only JSON-lines files in `[access] state_dir` (default
//! `<config dir>/state`):
//!
//! * `revoked.jsonl` — one [`Revocation`] per line: a token id (`jti`, or `sha256:` and the
//!   token's hash for a token without one — see `auth::token_id`), or a user whose tokens
//!   issued at or before the revocation are dead.
//! * `access.jsonl` — one [`AccessEvent`] per line: `request`, `approve`, `revoke` (of a grant).
//!
//! The CLI (`pgward token revoke`, `pgward access …`) appends to them under an exclusive
//! `flock`, validating against the whole file first ([`Store`]). `serve` watches them
//! ([`Watcher`], polling every 200 ms), keeps a [`State`] snapshot behind an `Arc` with an
//! atomic generation counter ([`Access`]), and writes an audit record for every event it
//! notices — only `serve` owns the audit writer. Sessions check their token (and grant) before
//! every statement ([`SessionCheck`]): the common case is one atomic load and two integer
//! compares; the snapshot is consulted only when the generation moved.
//!
//! Order of effects in `serve`: a revocation is enforced as soon as it is read (it only takes
//! rights away) and audited right after; an access event is audited first and takes effect
//! only once its record is durable (a grant gives rights). `serve-cursor.json` remembers how
//! far each file has been audited, so a restart neither repeats nor skips records.
//!
//! The state directory is as sensitive as the signing key next to it: whoever can write
//! `access.jsonl` can grant roles. `serve` creates it 0700 and re-checks every event against
//! the current config (grantable roles, approver groups, TTLs, approver ≠ requester) before it
//! takes effect.
//!
//! Files: `state` (revocations and requests in memory, the shared snapshot), `store` (the files
//! on disk, the CLI's appends), `watcher` (`serve`'s polling and auditing), `check` (the
//! per-statement decision for a session).

mod check;
mod state;
mod store;
mod watcher;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use check::{Refusal, SessionCheck, SessionGrant};
pub use state::{Access, AccessEvent, AccessRequest, RequestState, Revocation, Rules, State};
pub use store::{Store, state_dir};
pub use watcher::Watcher;

pub const REVOKED_FILE: &str = "revoked.jsonl";
pub const ACCESS_FILE: &str = "access.jsonl";
pub const CURSOR_FILE: &str = "serve-cursor.json";
/// How often `serve` looks at the state files.
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
