//! The state files on disk and the CLI's validated appends to them ([`Store`]).

use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::state::{AccessEvent, AccessRequest, Revocation, Rules, State};
use super::{ACCESS_FILE, AccessError, MAX_LINE, REVOKED_FILE, euid, new_id, now_unix};
use crate::auth::Identity;
use crate::config::Config;

/// The state directory (`[access] state_dir`, relative to the config file).
pub fn state_dir(cfg: &Config) -> PathBuf {
    cfg.resolve(&cfg.access.state_dir)
}

/// Create the state directory (0700) if missing. Created by root inside a directory that
/// belongs to someone else (the config directory of a `serve` running as its own user), it is
/// handed to that owner.
pub(super) fn ensure_dir(dir: &Path) -> Result<(), AccessError> {
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
pub(super) fn parse_lines<T: serde::de::DeserializeOwned>(bytes: &[u8], base: u64, path: &Path) -> (Vec<(T, u64)>, usize) {
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
    pub(super) dir: PathBuf,
    pub(super) rules: Rules,
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
