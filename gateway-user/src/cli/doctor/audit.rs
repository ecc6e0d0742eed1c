//! The audit directory: present, private to the service, and append-only.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::Ctx;
use super::report::{Check, Outcome, check};
use crate::host::files;

pub(super) fn audit_dir(cx: &Ctx) -> Check {
    let name = "audit directory";
    let dir = cx.cfg.resolve(&cx.cfg.audit.dir);
    let svc = cx.service.clone();
    let owner_fix = |d: &Path| {
        let u = svc.as_ref().map(|s| s.1.clone()).unwrap_or_else(|| "pgward".into());
        format!("chown {u}:{u} {d} && chmod 0750 {d}", d = d.display())
    };
    let m = match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return check(
                name,
                Outcome::Fail,
                format!("{} is not a directory", dir.display()),
                Some(format!("mkdir -p {0} && {1}", dir.display(), owner_fix(&dir))),
            );
        }
        Err(e) => {
            return check(
                name,
                Outcome::Fail,
                format!("{}: {e}", dir.display()),
                Some(format!("mkdir -p {0} && {1}", dir.display(), owner_fix(&dir))),
            );
        }
    };
    let mode = m.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return check(
            name,
            Outcome::Fail,
            format!("{} is accessible to everyone (mode {mode:04o})", dir.display()),
            Some(format!("chmod 0750 {}", dir.display())),
        );
    }
    if mode & 0o020 != 0 {
        return check(
            name,
            Outcome::Fail,
            format!("{} is group-writable (mode {mode:04o})", dir.display()),
            Some(format!("chmod 0750 {}", dir.display())),
        );
    }
    if let Some((uid, uname)) = &svc
        && *uid != 0
        && !(m.uid() == *uid && mode & 0o300 == 0o300)
    {
        return check(
            name,
            Outcome::Fail,
            format!("{} is not writable by {uname} (owner uid {}, mode {mode:04o})", dir.display(), m.uid()),
            Some(owner_fix(&dir)),
        );
    }
    let exposed: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.mode() & 0o007 != 0))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !exposed.is_empty() {
        return check(
            name,
            Outcome::Fail,
            format!("readable by everyone: {}", exposed.join(", ")),
            Some(format!("chmod o-rwx {}/*", dir.display())),
        );
    }
    let owner = cx.accounts.user_name(m.uid()).unwrap_or_else(|| m.uid().to_string());
    let base = format!("{} owner {owner}, mode {mode:04o}", dir.display());
    match files::is_append_only(&dir) {
        Ok(true) => {
            check(name, Outcome::Pass, format!("{base}, append-only (segments cannot be deleted or renamed)"), None)
        }
        Ok(false) => check(
            name,
            Outcome::Warn,
            format!("{base}; not append-only: records can be deleted by whoever can write the directory"),
            Some(format!("chattr +a {}", dir.display())),
        ),
        Err(e) => {
            check(name, Outcome::Warn, format!("{base}; the file system has no append-only attribute ({e})"), None)
        }
    }
}
