//! Token revocation and just-in-time (JIT) access grants.
//!
//! State lives in two append-only JSON-lines files in `[access] state_dir` (default
//! `<config dir>/state`):
//!
//! * `revoked.jsonl` — one [`Revocation`] per line: a token id (`jti`), or a user whose tokens
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::audit::{AuditHandle, Kind, Record};
use crate::auth::Identity;
use crate::config::Config;

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

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

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

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

// ------------------------------------------------------------------------------ file records

/// One line of `revoked.jsonl`. Exactly one of `jti` / `user` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub id: String,
    /// When (unix seconds); a user revocation kills that user's tokens with `iat <= at`.
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Effective uid of the process that wrote the line.
    #[serde(default)]
    pub by_uid: u32,
}

impl Revocation {
    fn valid(&self) -> bool {
        match (&self.jti, &self.user) {
            (Some(j), None) => !j.is_empty(),
            (None, Some(u)) => !u.is_empty(),
            _ => false,
        }
    }

    /// The audit record `serve` writes for it.
    pub fn audit_record(&self) -> Record {
        Record {
            kind: Kind::Revoke,
            user: self.user.clone(),
            jti: self.jti.clone(),
            meta: Some(serde_json::json!({
                "id": self.id,
                "scope": if self.jti.is_some() { "jti" } else { "user" },
                "at": rfc3339(self.at),
                "reason": self.reason,
                "by_uid": self.by_uid,
            })),
            ..Default::default()
        }
    }
}

/// One line of `access.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AccessEvent {
    Request { id: String, at: i64, user: String, role: String, ttl_secs: u64, reason: String, by_uid: u32 },
    /// The approver's token was verified by the CLI; its subject, id and groups are kept (never
    /// the token).
    Approve { id: String, at: i64, approver: String, approver_jti: String, approver_groups: Vec<String>, expires_at: i64 },
    /// A grant (or pending request) withdrawn before it expired.
    Revoke { id: String, at: i64, reason: Option<String>, by_uid: u32 },
}

impl AccessEvent {
    pub fn id(&self) -> &str {
        match self {
            AccessEvent::Request { id, .. } | AccessEvent::Approve { id, .. } | AccessEvent::Revoke { id, .. } => id,
        }
    }
}

/// What the config allows for JIT access (`[access]`).
#[derive(Debug, Clone)]
pub struct Rules {
    pub grantable_roles: Vec<String>,
    pub approver_groups: Vec<String>,
    pub max_ttl_secs: u64,
    pub request_ttl_secs: u64,
}

impl Rules {
    pub fn from_config(cfg: &Config) -> Rules {
        Rules {
            grantable_roles: cfg.access.grantable_roles.clone(),
            approver_groups: cfg.access.approver_groups.clone(),
            max_ttl_secs: cfg.access.max_ttl.as_secs(),
            request_ttl_secs: cfg.access.request_ttl.as_secs(),
        }
    }
}

// ------------------------------------------------------------------------------ state

/// A JIT access request and what happened to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessRequest {
    pub id: String,
    pub user: String,
    pub role: String,
    pub ttl_secs: u64,
    pub reason: String,
    pub requested_at: i64,
    pub approver: Option<String>,
    pub approved_at: Option<i64>,
    /// When the grant ends (set on approval).
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for an approver.
    Pending,
    /// Approved and not yet expired: the user's new sessions get the role.
    Active,
    /// Approved, and the grant's time is up.
    Expired,
    /// Withdrawn (`pgward access revoke`).
    Revoked,
    /// Never approved within `[access] request_ttl`.
    Lapsed,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Active => "active",
            RequestState::Expired => "expired",
            RequestState::Revoked => "revoked",
            RequestState::Lapsed => "lapsed",
        }
    }
}

impl AccessRequest {
    pub fn state(&self, now: i64, request_ttl_secs: u64) -> RequestState {
        if self.revoked_at.is_some() {
            return RequestState::Revoked;
        }
        match self.expires_at {
            Some(e) if now >= e => RequestState::Expired,
            Some(_) => RequestState::Active,
            None if now >= self.requested_at.saturating_add(request_ttl_secs as i64) => RequestState::Lapsed,
            None => RequestState::Pending,
        }
    }
}

/// Revocations and requests as read from the state files.
#[derive(Debug, Clone, Default)]
pub struct State {
    revoked_jti: HashMap<String, i64>,
    /// user → latest user revocation time.
    revoked_user: HashMap<String, i64>,
    requests: Vec<AccessRequest>,
    index: HashMap<String, usize>,
}

impl State {
    pub fn apply_revocation(&mut self, r: &Revocation) {
        if let Some(j) = &r.jti {
            self.revoked_jti.entry(j.clone()).or_insert(r.at);
        }
        if let Some(u) = &r.user {
            let e = self.revoked_user.entry(u.clone()).or_insert(r.at);
            *e = (*e).max(r.at);
        }
    }

    /// Check `ev` against the rules and the current state; apply it if valid. `Err` says why
    /// it is not (the event is then ignored).
    pub fn apply_access(&mut self, ev: &AccessEvent, rules: &Rules) -> Result<(), String> {
        match ev {
            AccessEvent::Request { id, at, user, role, ttl_secs, reason, .. } => {
                if self.index.contains_key(id) {
                    return Err(format!("duplicate request id {id}"));
                }
                if user.is_empty() {
                    return Err("empty user".into());
                }
                if !rules.grantable_roles.iter().any(|r| r == role) {
                    return Err(format!(
                        "role {role:?} is not grantable ([access] grantable_roles = {:?})",
                        rules.grantable_roles
                    ));
                }
                if *ttl_secs == 0 || *ttl_secs > rules.max_ttl_secs {
                    return Err(format!(
                        "ttl {} is not between 1s and [access] max_ttl = {}",
                        humantime::format_duration(Duration::from_secs(*ttl_secs)),
                        humantime::format_duration(Duration::from_secs(rules.max_ttl_secs))
                    ));
                }
                self.index.insert(id.clone(), self.requests.len());
                self.requests.push(AccessRequest {
                    id: id.clone(),
                    user: user.clone(),
                    role: role.clone(),
                    ttl_secs: *ttl_secs,
                    reason: reason.clone(),
                    requested_at: *at,
                    approver: None,
                    approved_at: None,
                    expires_at: None,
                    revoked_at: None,
                    revoke_reason: None,
                });
                Ok(())
            }
            AccessEvent::Approve { id, at, approver, approver_groups, expires_at, .. } => {
                let Some(&i) = self.index.get(id) else {
                    return Err(format!("no access request {id}"));
                };
                let req = &self.requests[i];
                match req.state(*at, rules.request_ttl_secs) {
                    RequestState::Pending => {}
                    s => return Err(format!("request {id} is {} (only a pending request can be approved)", s.as_str())),
                }
                if approver.is_empty() || *approver == req.user {
                    return Err(format!("{approver:?} cannot approve their own request"));
                }
                if !approver_groups.iter().any(|g| rules.approver_groups.contains(g)) {
                    return Err(format!(
                        "{approver:?} is in none of the approver groups ([access] approver_groups = {:?})",
                        rules.approver_groups
                    ));
                }
                if !rules.grantable_roles.contains(&req.role) {
                    return Err(format!("role {:?} is no longer grantable", req.role));
                }
                let end = at.saturating_add(req.ttl_secs.min(rules.max_ttl_secs) as i64).min(*expires_at);
                let req = &mut self.requests[i];
                req.approver = Some(approver.clone());
                req.approved_at = Some(*at);
                req.expires_at = Some(end);
                Ok(())
            }
            AccessEvent::Revoke { id, at, reason, .. } => {
                let Some(&i) = self.index.get(id) else {
                    return Err(format!("no access request {id}"));
                };
                let req = &mut self.requests[i];
                match req.state(*at, rules.request_ttl_secs) {
                    RequestState::Pending | RequestState::Active => {}
                    s => return Err(format!("request {id} is already {}", s.as_str())),
                }
                req.revoked_at = Some(*at);
                req.revoke_reason = reason.clone();
                Ok(())
            }
        }
    }

    /// Why `identity`'s token is revoked, if it is.
    pub fn token_revoked(&self, identity: &Identity) -> Option<String> {
        if let Some(at) = self.revoked_jti.get(&identity.jti) {
            return Some(format!("token {} was revoked at {}", identity.jti, rfc3339(*at)));
        }
        match self.revoked_user.get(&identity.user) {
            Some(at) if identity.issued_at <= *at => Some(format!(
                "tokens of user {:?} issued at or before {} were revoked",
                identity.user,
                rfc3339(*at)
            )),
            _ => None,
        }
    }

    /// The grant a new session of `user` gets: the most recently approved active one.
    pub fn active_grant(&self, user: &str, now: i64) -> Option<&AccessRequest> {
        self.requests
            .iter()
            .filter(|r| r.user == user && r.revoked_at.is_none() && r.expires_at.is_some_and(|e| now < e))
            .max_by_key(|r| r.approved_at)
    }

    pub fn request(&self, id: &str) -> Option<&AccessRequest> {
        self.index.get(id).map(|&i| &self.requests[i])
    }

    /// Every request, in the order they were made.
    pub fn requests(&self) -> &[AccessRequest] {
        &self.requests
    }

    fn clear_revocations(&mut self) {
        self.revoked_jti.clear();
        self.revoked_user.clear();
    }

    fn clear_requests(&mut self) {
        self.requests.clear();
        self.index.clear();
    }
}

// ------------------------------------------------------------------------------ sharing

/// The snapshot sessions read. Writers (the watcher) replace the `Arc` and then bump the
/// generation; a session that sees a new generation re-checks against the new snapshot.
#[derive(Debug)]
pub struct Access {
    generation: AtomicU64,
    state: RwLock<Arc<State>>,
}

impl Access {
    pub fn new(state: State) -> Access {
        Access { generation: AtomicU64::new(1), state: RwLock::new(Arc::new(state)) }
    }

    /// Nothing revoked, nothing granted.
    pub fn empty() -> Access {
        Access::new(State::default())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, s: State) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// The grant a session runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGrant {
    pub id: String,
    pub role: String,
    pub expires_at: i64,
}

impl SessionGrant {
    pub fn from_request(r: &AccessRequest) -> Option<SessionGrant> {
        Some(SessionGrant { id: r.id.clone(), role: r.role.clone(), expires_at: r.expires_at? })
    }
}

/// Why a session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pgward: your token has expired; log in again with a fresh token")]
    TokenExpired,
    #[error("pgward: your token has been revoked ({0}); log in again with a fresh token")]
    TokenRevoked(String),
    #[error("pgward: access grant {id} (role {role}) expired at {}; the session is closed", rfc3339(*.at))]
    GrantExpired { id: String, role: String, at: i64 },
    #[error("pgward: access grant {id} (role {role}) was revoked; the session is closed")]
    GrantRevoked { id: String, role: String },
}

impl Refusal {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Refusal::TokenExpired | Refusal::TokenRevoked(_) => crate::sqlstate::INVALID_PASSWORD,
            Refusal::GrantExpired { .. } | Refusal::GrantRevoked { .. } => crate::sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        }
    }
}

/// Per-session re-check of the token (and grant) before each statement.
#[derive(Debug, Clone)]
pub struct SessionCheck {
    seen: u64,
    /// `auth.leeway_secs`: a token is expired for a session exactly when it would be refused
    /// at login.
    leeway: i64,
    pub grant: Option<SessionGrant>,
}

impl SessionCheck {
    /// `generation` must be read *before* the snapshot the login was checked against.
    pub fn new(generation: u64, grant: Option<SessionGrant>, leeway_secs: u64) -> SessionCheck {
        SessionCheck { seen: generation, leeway: i64::try_from(leeway_secs).unwrap_or(i64::MAX), grant }
    }

    pub fn check(&mut self, access: &Access, identity: &Identity, now: i64) -> Result<(), Refusal> {
        if now > identity.expires_at.saturating_add(self.leeway) {
            return Err(Refusal::TokenExpired);
        }
        if let Some(g) = &self.grant
            && now >= g.expires_at
        {
            return Err(Refusal::GrantExpired { id: g.id.clone(), role: g.role.clone(), at: g.expires_at });
        }
        let generation = access.generation();
        if generation != self.seen {
            let snap = access.snapshot();
            if let Some(why) = snap.token_revoked(identity) {
                return Err(Refusal::TokenRevoked(why));
            }
            if let Some(g) = &self.grant
                && snap.request(&g.id).is_none_or(|r| r.revoked_at.is_some())
            {
                return Err(Refusal::GrantRevoked { id: g.id.clone(), role: g.role.clone() });
            }
            self.seen = generation;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------ files

/// The state directory (`[access] state_dir`, relative to the config file).
pub fn state_dir(cfg: &Config) -> PathBuf {
    cfg.resolve(&cfg.access.state_dir)
}

/// Create the state directory (0700) if missing. Created by root inside a directory that
/// belongs to someone else (the config directory of a `serve` running as its own user), it is
/// handed to that owner.
fn ensure_dir(dir: &Path) -> Result<(), AccessError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| AccessError::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| AccessError::io(dir, e))?;
    if euid() == 0
        && let Some(parent) = dir.parent()
        && let Ok(m) = std::fs::metadata(parent)
        && m.uid() != 0
    {
        std::os::unix::fs::chown(dir, Some(m.uid()), Some(m.gid())).map_err(|e| AccessError::io(dir, e))?;
    }
    Ok(())
}

/// Open `path` for appending (created 0600; when running as root, handed to the owner of the
/// directory so a `serve` running as another user can read it) and take an exclusive lock.
fn open_locked(path: &Path) -> Result<std::fs::File, AccessError> {
    let existed = path.exists();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AccessError::io(path, e))?;
    if !existed
        && euid() == 0
        && let Some(dir) = path.parent()
        && let Ok(m) = std::fs::metadata(dir)
        && m.uid() != 0
    {
        let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
    }
    // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if rc != 0 {
        return Err(AccessError::io(path, std::io::Error::last_os_error()));
    }
    Ok(f)
}

fn append_line<T: Serialize>(f: &mut std::fs::File, path: &Path, item: &T) -> Result<(), AccessError> {
    let mut line = serde_json::to_vec(item).map_err(|e| AccessError::Invalid(format!("cannot encode: {e}")))?;
    line.push(b'\n');
    f.write_all(&line).and_then(|_| f.sync_all()).map_err(|e| AccessError::io(path, e))
}

/// Parse the complete lines of `bytes`: (items with the offset just past their line,
/// bytes consumed). A trailing line without '\n' is left for later; bad lines are skipped with
/// a warning.
fn parse_lines<T: serde::de::DeserializeOwned>(bytes: &[u8], base: u64, path: &Path) -> (Vec<(T, u64)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(nl) = bytes[pos..].iter().position(|b| *b == b'\n') {
        let line = &bytes[pos..pos + nl];
        pos += nl + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<T>(line) {
            Ok(v) if line.len() <= MAX_LINE => out.push((v, base + pos as u64)),
            Ok(_) => tracing::warn!(file = %path.display(), offset = base + pos as u64, "line too long; ignored"),
            Err(e) => tracing::warn!(file = %path.display(), offset = base + pos as u64, error = %e, "unreadable line; ignored"),
        }
    }
    (out, pos)
}

fn read_all(f: &mut std::fs::File, path: &Path) -> Result<Vec<u8>, AccessError> {
    let mut v = Vec::new();
    f.seek(std::io::SeekFrom::Start(0)).and_then(|_| f.read_to_end(&mut v)).map_err(|e| AccessError::io(path, e))?;
    Ok(v)
}

/// The CLI side: validated appends to the state files.
pub struct Store {
    dir: PathBuf,
    rules: Rules,
}

impl Store {
    pub fn open(cfg: &Config) -> Result<Store, AccessError> {
        let dir = state_dir(cfg);
        ensure_dir(&dir)?;
        Ok(Store { dir, rules: Rules::from_config(cfg) })
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Append a revocation of token `jti` or of every token of `user` issued until now.
    pub fn revoke(&self, jti: Option<&str>, user: Option<&str>, reason: Option<&str>) -> Result<Revocation, AccessError> {
        let r = Revocation {
            id: new_id("rev"),
            at: now_unix(),
            jti: jti.map(str::trim).map(str::to_owned),
            user: user.map(str::trim).map(str::to_owned),
            reason: reason.map(str::to_owned).filter(|r| !r.trim().is_empty()),
            by_uid: euid(),
        };
        if !r.valid() {
            return Err(AccessError::Invalid("give exactly one of --jti and --user, not empty".into()));
        }
        let path = self.path(REVOKED_FILE);
        let mut f = open_locked(&path)?;
        append_line(&mut f, &path, &r)?;
        Ok(r)
    }

    /// Everything in the state files, as `serve` would see it.
    pub fn load(&self) -> Result<State, AccessError> {
        let mut state = State::default();
        let path = self.path(REVOKED_FILE);
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|e| AccessError::io(&path, e))?;
            for (r, _) in parse_lines::<Revocation>(&bytes, 0, &path).0 {
                if r.valid() {
                    state.apply_revocation(&r);
                }
            }
        }
        let path = self.path(ACCESS_FILE);
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|e| AccessError::io(&path, e))?;
            self.apply_all(&mut state, &bytes, &path);
        }
        Ok(state)
    }

    fn apply_all(&self, state: &mut State, bytes: &[u8], path: &Path) {
        for (ev, _) in parse_lines::<AccessEvent>(bytes, 0, path).0 {
            let _ = state.apply_access(&ev, &self.rules);
        }
    }

    /// Validate `make(state)`'s event against the current file and append it, under the lock.
    fn append_event(&self, make: impl FnOnce(&State) -> Result<AccessEvent, AccessError>) -> Result<AccessRequest, AccessError> {
        let path = self.path(ACCESS_FILE);
        let mut f = open_locked(&path)?;
        let bytes = read_all(&mut f, &path)?;
        let mut state = State::default();
        self.apply_all(&mut state, &bytes, &path);
        let ev = make(&state)?;
        state.apply_access(&ev, &self.rules).map_err(AccessError::Refused)?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            // A torn last line (a writer died mid-write): end it so ours stays readable.
            f.write_all(b"\n").map_err(|e| AccessError::io(&path, e))?;
        }
        append_line(&mut f, &path, &ev)?;
        state.request(ev.id()).cloned().ok_or_else(|| AccessError::Invalid("request vanished".into()))
    }

    pub fn request(&self, user: &str, role: &str, ttl: Duration, reason: &str) -> Result<AccessRequest, AccessError> {
        let (user, role, reason) = (user.trim(), role.trim(), reason.trim());
        if user.is_empty() || role.is_empty() {
            return Err(AccessError::Invalid("--user and --role must not be empty".into()));
        }
        if reason.is_empty() {
            return Err(AccessError::Invalid("--reason must say why the access is needed".into()));
        }
        if self.rules.grantable_roles.is_empty() {
            return Err(AccessError::Refused(
                "just-in-time access is not configured: [access] grantable_roles is empty".into(),
            ));
        }
        self.append_event(|_| {
            Ok(AccessEvent::Request {
                id: new_id("jit"),
                at: now_unix(),
                user: user.to_owned(),
                role: role.to_owned(),
                ttl_secs: ttl.as_secs(),
                reason: reason.to_owned(),
                by_uid: euid(),
            })
        })
    }

    /// Approve request `id` as `approver` (an identity from a verified token).
    pub fn approve(&self, id: &str, approver: &Identity) -> Result<AccessRequest, AccessError> {
        let revoked = self.load()?.token_revoked(approver);
        if let Some(why) = revoked {
            return Err(AccessError::Refused(format!("the approver's token is revoked: {why}")));
        }
        self.append_event(|state| {
            let Some(req) = state.request(id) else {
                return Err(AccessError::Refused(format!("no access request {id}")));
            };
            let at = now_unix();
            Ok(AccessEvent::Approve {
                id: id.to_owned(),
                at,
                approver: approver.user.clone(),
                approver_jti: approver.jti.clone(),
                approver_groups: approver.groups.clone(),
                expires_at: at.saturating_add(req.ttl_secs as i64),
            })
        })
    }

    /// Withdraw a pending request or an active grant.
    pub fn revoke_grant(&self, id: &str, reason: Option<&str>) -> Result<AccessRequest, AccessError> {
        self.append_event(|state| {
            if state.request(id).is_none() {
                return Err(AccessError::Refused(format!("no access request {id}")));
            }
            Ok(AccessEvent::Revoke {
                id: id.to_owned(),
                at: now_unix(),
                reason: reason.map(str::to_owned).filter(|r| !r.trim().is_empty()),
                by_uid: euid(),
            })
        })
    }
}

// ------------------------------------------------------------------------------ serve side

/// How far `serve` has audited each state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    #[serde(default)]
    revoked: FilePos,
    #[serde(default)]
    access: FilePos,
    /// Grants whose expiry has been audited.
    #[serde(default)]
    expired: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct FilePos {
    ino: u64,
    offset: u64,
}

/// One watched file: how far it has been read.
struct Tail {
    path: PathBuf,
    /// Inode and offset read up to (whole lines).
    pos: FilePos,
    /// (len, mtime) last seen, to skip reading when nothing changed.
    seen: Option<(u64, i64, i64)>,
}

impl Tail {
    /// New complete lines since the last call: (bytes, offset of their start); `reset` when the
    /// file was replaced or truncated (everything is read again from 0).
    fn read_new(&mut self) -> std::io::Result<Option<(Vec<u8>, u64, bool)>> {
        let m = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let reset = self.pos.offset > 0;
                self.pos = FilePos::default();
                self.seen = None;
                return Ok(reset.then(|| (Vec::new(), 0, true)));
            }
            Err(e) => return Err(e),
        };
        let stamp = (m.len(), m.mtime(), m.mtime_nsec());
        if self.seen == Some(stamp) && m.ino() == self.pos.ino {
            return Ok(None);
        }
        let mut reset = false;
        if (self.pos.ino != 0 && m.ino() != self.pos.ino) || m.len() < self.pos.offset {
            tracing::warn!(file = %self.path.display(), "state file was replaced or truncated; reading it again from the start");
            self.pos = FilePos { ino: m.ino(), offset: 0 };
            reset = true;
        }
        self.pos.ino = m.ino();
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(std::io::SeekFrom::Start(self.pos.offset))?;
        let mut buf = Vec::new();
        f.take(m.len().saturating_sub(self.pos.offset)).read_to_end(&mut buf)?;
        let complete = buf.iter().rposition(|b| *b == b'\n').map(|p| p + 1).unwrap_or(0);
        buf.truncate(complete);
        let start = self.pos.offset;
        self.pos.offset += complete as u64;
        if complete == m.len().saturating_sub(start) as usize {
            self.seen = Some(stamp);
        }
        Ok(Some((buf, start, reset)))
    }
}

/// `serve`'s watcher: reads the state files, publishes snapshots, writes audit records.
pub struct Watcher {
    access: Arc<Access>,
    audit: AuditHandle,
    rules: Rules,
    dir: PathBuf,
    state: State,
    revoked: Tail,
    events: Tail,
    cursor: Cursor,
    cursor_dirty: bool,
    /// Revocations read (and enforced) but not yet audited: (offset after its line, record).
    unaudited_revocations: VecDeque<(u64, Record)>,
    /// Access events read but not yet audited (they take effect once audited).
    unaudited_events: VecDeque<(u64, AccessEvent)>,
    expired: HashSet<String>,
}

impl Watcher {
    /// Read the state files (creating the directory if needed) and build the first snapshot:
    /// every revocation, and the access events up to where the previous run audited them. The
    /// rest is audited (and applied) by the first [`Watcher::tick`].
    /// A directory that cannot be created is not fatal (the CLI creates it when it first
    /// writes); state files that exist but cannot be read are (revocations would be missed).
    pub fn load(cfg: &Config, audit: AuditHandle) -> Result<(Watcher, Arc<Access>), AccessError> {
        let dir = state_dir(cfg);
        if let Err(e) = ensure_dir(&dir) {
            tracing::warn!(error = %e, "cannot create the access state directory; watching for it");
        }
        let rules = Rules::from_config(cfg);
        let cursor_path = dir.join(CURSOR_FILE);
        let cursor: Cursor = match std::fs::read(&cursor_path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %cursor_path.display(), error = %e, "unreadable cursor; auditing the state files from the start");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        };
        let access = Arc::new(Access::new(State::default()));
        let mut w = Watcher {
            access: access.clone(),
            audit,
            rules,
            revoked: Tail { path: dir.join(REVOKED_FILE), pos: FilePos::default(), seen: None },
            events: Tail { path: dir.join(ACCESS_FILE), pos: FilePos::default(), seen: None },
            dir,
            state: State::default(),
            expired: cursor.expired.iter().cloned().collect(),
            cursor,
            cursor_dirty: false,
            unaudited_revocations: VecDeque::new(),
            unaudited_events: VecDeque::new(),
        };
        w.read_files().map_err(|e| AccessError::io(&w.dir, e))?;
        access.publish(w.state.clone());
        Ok((w, access))
    }

    /// Read whatever is new. Revocations apply at once; access events up to the audited
    /// cursor apply at once (audited by an earlier run), later ones wait for their record.
    fn read_files(&mut self) -> std::io::Result<bool> {
        let mut changed = false;
        if let Some((bytes, start, reset)) = self.revoked.read_new()? {
            if reset {
                self.state.clear_revocations();
                self.unaudited_revocations.clear();
                changed = true;
            }
            let audited = if self.cursor.revoked.ino == self.revoked.pos.ino { self.cursor.revoked.offset } else { 0 };
            for (r, end) in parse_lines::<Revocation>(&bytes, start, &self.revoked.path).0 {
                if !r.valid() {
                    tracing::warn!(id = %r.id, "revocation without exactly one of jti/user; ignored");
                    continue;
                }
                self.state.apply_revocation(&r);
                changed = true;
                if end > audited {
                    self.unaudited_revocations.push_back((end, r.audit_record()));
                }
            }
            if self.unaudited_revocations.is_empty() && self.cursor.revoked != self.revoked.pos {
                self.cursor.revoked = self.revoked.pos;
                self.cursor_dirty = true;
            }
        }
        if let Some((bytes, start, reset)) = self.events.read_new()? {
            if reset {
                self.state.clear_requests();
                self.unaudited_events.clear();
                changed = true;
            }
            let audited = if self.cursor.access.ino == self.events.pos.ino { self.cursor.access.offset } else { 0 };
            for (ev, end) in parse_lines::<AccessEvent>(&bytes, start, &self.events.path).0 {
                if end > audited {
                    self.unaudited_events.push_back((end, ev));
                } else {
                    let _ = self.state.apply_access(&ev, &self.rules);
                    changed = true;
                }
            }
            if self.unaudited_events.is_empty() && self.cursor.access != self.events.pos {
                self.cursor.access = self.events.pos;
                self.cursor_dirty = true;
            }
        }
        Ok(changed)
    }

    /// The audit record for an access event (and whether it was valid).
    fn event_record(&self, ev: &AccessEvent, verdict: &Result<(), String>, state: &State) -> Record {
        let req = state.request(ev.id());
        let (kind, user, jti, meta) = match ev {
            AccessEvent::Request { id, user, role, ttl_secs, reason, by_uid, .. } => (
                Kind::AccessRequest,
                Some(user.clone()),
                None,
                serde_json::json!({
                    "id": id, "role": role,
                    "ttl": humantime::format_duration(Duration::from_secs(*ttl_secs)).to_string(),
                    "reason": reason, "by_uid": by_uid,
                }),
            ),
            AccessEvent::Approve { id, approver, approver_jti, approver_groups, .. } => (
                Kind::AccessApprove,
                req.map(|r| r.user.clone()),
                Some(approver_jti.clone()),
                serde_json::json!({
                    "id": id, "role": req.map(|r| r.role.clone()),
                    "approver": approver, "approver_groups": approver_groups,
                    "expires_at": req.and_then(|r| r.expires_at).map(rfc3339),
                }),
            ),
            AccessEvent::Revoke { id, reason, by_uid, .. } => (
                Kind::AccessRevoke,
                req.map(|r| r.user.clone()),
                None,
                serde_json::json!({ "id": id, "role": req.map(|r| r.role.clone()), "reason": reason, "by_uid": by_uid }),
            ),
        };
        Record {
            kind,
            user,
            jti,
            meta: Some(meta),
            error: verdict.as_ref().err().map(|e| format!("ignored: {e}")),
            ..Default::default()
        }
    }

    /// One round: read the files, enforce revocations, audit and apply access events, audit
    /// grant expiries, publish, persist the cursor.
    pub async fn tick(&mut self) {
        let mut changed = match self.read_files() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the access state files");
                false
            }
        };
        // Revocations are enforced before they are audited: they only take rights away.
        if changed {
            self.access.publish(self.state.clone());
            changed = false;
        }
        while let Some((end, rec)) = self.unaudited_revocations.front().cloned() {
            if let Err(e) = self.audit.append_durable(rec).await {
                tracing::error!(error = %e, "cannot audit a revocation; will retry");
                break;
            }
            self.unaudited_revocations.pop_front();
            self.cursor.revoked = FilePos { ino: self.revoked.pos.ino, offset: end };
            self.cursor_dirty = true;
        }
        if self.unaudited_revocations.is_empty() && self.cursor.revoked != self.revoked.pos {
            self.cursor.revoked = self.revoked.pos;
            self.cursor_dirty = true;
        }
        // Access events take effect only once their record is durable.
        while let Some((end, ev)) = self.unaudited_events.front().cloned() {
            let mut next = self.state.clone();
            let verdict = next.apply_access(&ev, &self.rules);
            let rec = self.event_record(&ev, &verdict, &next);
            if let Err(e) = self.audit.append_durable(rec).await {
                tracing::error!(error = %e, "cannot audit an access event; will retry");
                break;
            }
            match &verdict {
                Ok(()) => tracing::info!(id = ev.id(), "access event applied"),
                Err(why) => tracing::warn!(id = ev.id(), %why, "access event ignored"),
            }
            if verdict.is_ok() {
                self.state = next;
                changed = true;
            }
            self.unaudited_events.pop_front();
            self.cursor.access = FilePos { ino: self.events.pos.ino, offset: end };
            self.cursor_dirty = true;
        }
        if self.unaudited_events.is_empty() && self.cursor.access != self.events.pos {
            self.cursor.access = self.events.pos;
            self.cursor_dirty = true;
        }
        if changed {
            self.access.publish(self.state.clone());
        }
        // Grants whose time ran out: one record each.
        let now = now_unix();
        let due: Vec<AccessRequest> = self
            .state
            .requests()
            .iter()
            .filter(|r| r.revoked_at.is_none() && r.expires_at.is_some_and(|e| e <= now) && !self.expired.contains(&r.id))
            .cloned()
            .collect();
        for r in due {
            let rec = Record {
                kind: Kind::GrantExpired,
                user: Some(r.user.clone()),
                meta: Some(serde_json::json!({
                    "id": r.id, "role": r.role, "expires_at": r.expires_at.map(rfc3339),
                })),
                ..Default::default()
            };
            if let Err(e) = self.audit.append_durable(rec).await {
                tracing::error!(error = %e, "cannot audit a grant expiry; will retry");
                break;
            }
            tracing::info!(id = %r.id, user = %r.user, role = %r.role, "access grant expired");
            self.expired.insert(r.id.clone());
            self.cursor.expired.push(r.id);
            self.cursor_dirty = true;
        }
        if self.cursor_dirty {
            match self.save_cursor() {
                Ok(()) => self.cursor_dirty = false,
                Err(e) => tracing::warn!(error = %e, "cannot save the access cursor"),
            }
        }
    }

    fn save_cursor(&self) -> std::io::Result<()> {
        let path = self.dir.join(CURSOR_FILE);
        let tmp = self.dir.join(format!("{CURSOR_FILE}.tmp"));
        let bytes = serde_json::to_vec(&self.cursor).map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Poll forever (until the task is dropped).
    pub async fn run(mut self) {
        let mut iv = tokio::time::interval(POLL_INTERVAL);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            self.tick().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            grantable_roles: vec!["app_rw".into()],
            approver_groups: vec!["dba".into()],
            max_ttl_secs: 3600,
            request_ttl_secs: 600,
        }
    }

    fn ident(user: &str, groups: &[&str], jti: &str, iat: i64) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            jti: jti.into(),
            expires_at: i64::MAX,
            issued_at: iat,
        }
    }

    fn request(id: &str, at: i64, role: &str, ttl: u64) -> AccessEvent {
        AccessEvent::Request {
            id: id.into(),
            at,
            user: "alice".into(),
            role: role.into(),
            ttl_secs: ttl,
            reason: "fix".into(),
            by_uid: 0,
        }
    }

    fn approve(id: &str, at: i64, who: &str, groups: &[&str]) -> AccessEvent {
        AccessEvent::Approve {
            id: id.into(),
            at,
            approver: who.into(),
            approver_jti: "j".into(),
            approver_groups: groups.iter().map(|g| g.to_string()).collect(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn request_approve_expire() {
        let r = rules();
        let mut s = State::default();
        assert!(s.apply_access(&request("a", 100, "postgres", 60), &r).unwrap_err().contains("not grantable"));
        assert!(s.apply_access(&request("a", 100, "app_rw", 7200), &r).unwrap_err().contains("max_ttl"));
        s.apply_access(&request("a", 100, "app_rw", 60), &r).unwrap();
        assert!(s.apply_access(&request("a", 100, "app_rw", 60), &r).unwrap_err().contains("duplicate"));
        assert_eq!(s.request("a").unwrap().state(120, 600), RequestState::Pending);
        assert!(s.apply_access(&approve("a", 110, "alice", &["dba"]), &r).unwrap_err().contains("own request"));
        assert!(s.apply_access(&approve("a", 110, "bob", &["analysts"]), &r).unwrap_err().contains("approver groups"));
        assert!(s.apply_access(&approve("zz", 110, "bob", &["dba"]), &r).unwrap_err().contains("no access request"));
        assert!(s.active_grant("alice", 110).is_none());
        s.apply_access(&approve("a", 110, "bob", &["dba"]), &r).unwrap();
        assert!(s.apply_access(&approve("a", 111, "carol", &["dba"]), &r).unwrap_err().contains("active"));
        let g = s.active_grant("alice", 120).unwrap();
        assert_eq!((g.role.as_str(), g.expires_at), ("app_rw", Some(170)));
        assert!(s.active_grant("alice", 170).is_none());
        assert_eq!(s.request("a").unwrap().state(170, 600), RequestState::Expired);

        // A request not approved in time lapses.
        s.apply_access(&request("b", 100, "app_rw", 60), &r).unwrap();
        assert_eq!(s.request("b").unwrap().state(700, 600), RequestState::Lapsed);
        assert!(s.apply_access(&approve("b", 700, "bob", &["dba"]), &r).is_err());

        // Revoked grants end.
        s.apply_access(&request("c", 150, "app_rw", 60), &r).unwrap();
        s.apply_access(&approve("c", 151, "bob", &["dba"]), &r).unwrap();
        let rv = AccessEvent::Revoke { id: "c".into(), at: 171, reason: None, by_uid: 0 };
        assert_eq!(s.active_grant("alice", 171).map(|g| g.id.as_str()), Some("c"));
        s.apply_access(&rv, &r).unwrap();
        assert!(s.active_grant("alice", 171).is_none());
        assert_eq!(s.request("c").unwrap().state(172, 600), RequestState::Revoked);
    }

    #[test]
    fn revocations() {
        let mut s = State::default();
        let mk = |jti: Option<&str>, user: Option<&str>, at| Revocation {
            id: "r".into(),
            at,
            jti: jti.map(Into::into),
            user: user.map(Into::into),
            reason: None,
            by_uid: 0,
        };
        s.apply_revocation(&mk(Some("j1"), None, 100));
        s.apply_revocation(&mk(None, Some("bob"), 200));
        assert!(s.token_revoked(&ident("alice", &[], "j1", 50)).is_some());
        assert!(s.token_revoked(&ident("alice", &[], "j2", 50)).is_none());
        assert!(s.token_revoked(&ident("bob", &[], "j3", 200)).is_some(), "issued at the revocation second");
        assert!(s.token_revoked(&ident("bob", &[], "j4", 201)).is_none(), "issued after");
        assert!(!mk(Some("a"), Some("b"), 1).valid());
        assert!(!mk(None, None, 1).valid());
    }

    #[test]
    fn session_check_sees_new_generation_only() {
        let access = Access::new(State::default());
        let id = ident("alice", &[], "j1", 10);
        let mut c = SessionCheck::new(access.generation(), None, 0);
        c.check(&access, &id, 20).unwrap();
        let mut s = State::default();
        s.apply_revocation(&Revocation { id: "r".into(), at: 30, jti: Some("j1".into()), user: None, reason: None, by_uid: 0 });
        access.publish(s);
        assert!(matches!(c.check(&access, &id, 40), Err(Refusal::TokenRevoked(_))));
        let mut expired = ident("alice", &[], "j5", 1);
        expired.expires_at = 5;
        assert_eq!(SessionCheck::new(0, None, 0).check(&access, &expired, 6), Err(Refusal::TokenExpired));
        SessionCheck::new(0, None, 30).check(&access, &expired, 35).unwrap();
        assert_eq!(SessionCheck::new(0, None, 30).check(&access, &expired, 36), Err(Refusal::TokenExpired));
        let g = SessionGrant { id: "g".into(), role: "app_rw".into(), expires_at: 50 };
        let mut c = SessionCheck::new(access.generation(), Some(g), 30);
        let other = ident("alice", &[], "j9", 10);
        c.check(&access, &other, 49).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.check(&access, &other, 50), Err(Refusal::GrantExpired { .. })));
    }

    #[test]
    fn store_appends_and_validates() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store { dir: tmp.path().to_owned(), rules: rules() };
        let req = store.request("alice", "app_rw", Duration::from_secs(60), "incident 42").unwrap();
        assert!(req.id.starts_with("jit-"));
        assert!(matches!(store.request("alice", "postgres", Duration::from_secs(60), "x"), Err(AccessError::Refused(_))));
        assert!(matches!(store.request("alice", "app_rw", Duration::from_secs(60), " "), Err(AccessError::Invalid(_))));
        let bob = ident("bob", &["dba"], "jb", now_unix());
        assert!(matches!(store.approve(&req.id, &ident("alice", &["dba"], "ja", 0)), Err(AccessError::Refused(_))));
        let done = store.approve(&req.id, &bob).unwrap();
        assert!(done.expires_at.is_some());
        assert_eq!(store.load().unwrap().active_grant("alice", now_unix()).map(|r| r.id.clone()), Some(req.id.clone()));
        store.revoke(None, Some("bob"), Some("left")).unwrap();
        let req2 = store.request("alice", "app_rw", Duration::from_secs(60), "again").unwrap();
        let e = store.approve(&req2.id, &bob).unwrap_err().to_string();
        assert!(e.contains("revoked"), "{e}");
        assert!(store.revoke(Some("x"), Some("y"), None).is_err());
        // A torn line does not break later appends or reads.
        let path = tmp.path().join(ACCESS_FILE);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"event\":\"req").unwrap();
        let req3 = store.request("carol", "app_rw", Duration::from_secs(60), "torn").unwrap();
        assert_eq!(store.load().unwrap().request(&req3.id).unwrap().user, "carol");
    }
}
