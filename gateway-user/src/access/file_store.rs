//! The file backend: the state files on disk (`revoked.jsonl`, `access.jsonl` in
//! `[access] state_dir`) and the CLI's validated appends to them, under an exclusive `flock`.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::state::{AccessEvent, Revocation, Rules, State};
use super::{ACCESS_FILE, AccessError, MAX_LINE, REVOKED_FILE, euid};

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

/// Open a state file, never through a symbolic link, and only if it is a regular file. The
/// state directory belongs to the user `serve` runs as while operators run the CLI as root: a
/// link planted there would otherwise have root create or append to any file (and hand a
/// created one to the directory's owner).
fn open_state_file(path: &Path, opts: &mut std::fs::OpenOptions) -> Result<std::fs::File, AccessError> {
    let f = opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => AccessError::io(path, std::io::Error::other("is a symbolic link; refusing to follow it")),
        _ => AccessError::io(path, e),
    })?;
    let m = f.metadata().map_err(|e| AccessError::io(path, e))?;
    if !m.file_type().is_file() {
        return Err(AccessError::io(path, std::io::Error::other("is not a regular file")));
    }
    Ok(f)
}

/// Read a whole state file (see [`open_state_file`]).
fn read_state_file(path: &Path) -> Result<Vec<u8>, AccessError> {
    let mut f = open_state_file(path, std::fs::OpenOptions::new().read(true))?;
    read_all(&mut f, path)
}

/// Open `path` for appending (created 0600; when running as root, handed to the owner of the
/// directory so a `serve` running as another user can read it) and take an exclusive lock.
fn open_locked(path: &Path) -> Result<std::fs::File, AccessError> {
    let existed = path.symlink_metadata().is_ok();
    let f = open_state_file(path, std::fs::OpenOptions::new().read(true).append(true).create(true).mode(0o600))?;
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

/// The state files of one host.
pub(super) struct FileStore {
    pub(super) dir: PathBuf,
}

impl FileStore {
    pub(super) fn open(dir: PathBuf) -> Result<FileStore, AccessError> {
        ensure_dir(&dir)?;
        Ok(FileStore { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(super) fn append_revocation(&self, r: &Revocation) -> Result<(), AccessError> {
        let path = self.path(REVOKED_FILE);
        let mut f = open_locked(&path)?;
        append_line(&mut f, &path, r)
    }

    /// Everything in the state files, as `serve` would see it.
    pub(super) fn load(&self, rules: &Rules) -> Result<State, AccessError> {
        let mut state = State::default();
        let path = self.path(REVOKED_FILE);
        if path.symlink_metadata().is_ok() {
            let bytes = read_state_file(&path)?;
            for (r, _) in parse_lines::<Revocation>(&bytes, 0, &path).0 {
                if r.valid() {
                    state.apply_revocation(&r);
                }
            }
        }
        let path = self.path(ACCESS_FILE);
        if path.symlink_metadata().is_ok() {
            let bytes = read_state_file(&path)?;
            apply_all(&mut state, &bytes, &path, rules);
        }
        Ok(state)
    }

    /// Validate `make(state)`'s event against the current file and append it, under the lock.
    /// Returns the state with the event applied.
    pub(super) fn append_event(
        &self,
        rules: &Rules,
        make: impl FnOnce(&State) -> Result<AccessEvent, AccessError>,
    ) -> Result<(State, AccessEvent), AccessError> {
        let path = self.path(ACCESS_FILE);
        let mut f = open_locked(&path)?;
        let bytes = read_all(&mut f, &path)?;
        let mut state = State::default();
        apply_all(&mut state, &bytes, &path, rules);
        let ev = make(&state)?;
        state.apply_access(&ev, rules).map_err(AccessError::Refused)?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            // A torn last line (a writer died mid-write): end it so ours stays readable.
            f.write_all(b"\n").map_err(|e| AccessError::io(&path, e))?;
        }
        append_line(&mut f, &path, &ev)?;
        Ok((state, ev))
    }
}

fn apply_all(state: &mut State, bytes: &[u8], path: &Path, rules: &Rules) {
    for (ev, _) in parse_lines::<AccessEvent>(bytes, 0, path).0 {
        let _ = state.apply_access(&ev, rules);
    }
}
