//! `pgward uninstall`: interception detached, the manifest's changes undone in reverse order,
//! the audit log kept (with a config to verify it) unless `--purge`.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use crate::config::Config;
use crate::host::files::{clear_append_only_tree, is_append_only, set_append_only};
use super::cmd::{run_cmd, run_systemctl};
use super::files::{chown_tree_ids, current_sha, replace_file_contents, set_attrs, write_file};
use super::manifest::{Change, Fallback, FileEdit, Manifest, Saved, read_manifest, write_manifest};
use super::pg_conf::{DROPIN_NAME, strip_block};
use super::tree::{ACCESS_DIR, AUDIT_DIR, BACKUP_DIR, CONFIG_FILE, MANIFEST, RETIRED_DIR, Root, STATE_DIR, UNIT_NAME};

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The tree `pgward install --root` was applied to.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Also delete the audit log and the access state (otherwise kept, owned by root, with a
    /// config to verify the log: /var/lib/pgward/retired/pgward.toml).
    #[arg(long)]
    pub purge: bool,
    /// Do not run systemctl (disable --now pgward, daemon-reload, Postgres restart).
    #[arg(long)]
    pub no_systemctl: bool,
}

/// Undo the manifest in `root`. Returns the report and whether everything was undone.
pub(super) fn uninstall(root: &Root, purge: bool, systemctl: bool) -> anyhow::Result<(String, bool)> {
    let m = read_manifest(root)?;
    let mut o = String::new();
    // Interception is pinned and outlives pgward: stop the service, then detach (audited, while
    // the config and keys are still there). Only on the running system (the pins are the
    // host's, not the tree's).
    let detached = if root.host() { detach_interception(root, systemctl && m.systemctl, &mut o) } else { true };
    if !purge {
        match retire_config(root) {
            Ok(()) => {}
            Err(e) => {
                let _ = writeln!(o, "warning: could not keep a config to verify the audit log with: {e:#}");
            }
        }
    }
    let (report, ok) = undo_all(root, &m, purge, systemctl && m.systemctl)?;
    o.push_str(&report);
    let ok = ok && detached;
    if ok {
        let _ = writeln!(o, "pgward uninstalled from {}.", root.dir.display());
        if !purge {
            let _ = writeln!(
                o,
                "Kept: the audit log {AUDIT_DIR} and access state {ACCESS_DIR} (now owned by root); verify the log with\n  \
                 pgward audit verify --config {RETIRED_DIR}/pgward.toml\n(`pgward uninstall --purge` would have removed them.)"
            );
        }
    } else {
        let _ = writeln!(
            o,
            "pgward uninstall is incomplete; fix the above and run it again (the manifest keeps what is left)."
        );
    }
    Ok((o, ok))
}

/// `pgward intercept detach` for the installed config (after stopping the unit). False, with
/// the reason in `o`, when the programs could not be detached.
pub(super) fn detach_interception(root: &Root, systemctl: bool, o: &mut String) -> bool {
    let path = root.p(CONFIG_FILE);
    let Ok(cfg) = Config::load(&path) else { return true };
    if !cfg.intercept.enabled && !crate::ebpf::pins::any_pinned(&crate::ebpf::pins::pin_dir(&cfg)) {
        return true;
    }
    if systemctl && let Err(e) = run_systemctl(&["stop", UNIT_NAME]) {
        let _ = writeln!(o, "warning: stopping {UNIT_NAME}: {e:#}");
    }
    match crate::cli::intercept::detach(&cfg, Some("pgward uninstall")) {
        Ok(report) => {
            o.push_str(&report);
            true
        }
        Err(e) => {
            let _ = writeln!(o, "error: the interception programs stay attached: {e:#}; stop pgward, then `pgward intercept detach --config {CONFIG_FILE}`");
            false
        }
    }
}

/// Keep the config (without private keys) next to the audit log, to verify it later.
pub(super) fn retire_config(root: &Root) -> anyhow::Result<()> {
    let cfg = root.p(CONFIG_FILE);
    if !cfg.exists() {
        return Ok(());
    }
    let dir = root.p(RETIRED_DIR);
    std::fs::create_dir_all(dir.join("keys"))?;
    set_attrs(&dir, 0o750, 0, 0)?;
    set_attrs(&dir.join("keys"), 0o750, 0, 0)?;
    let text = std::fs::read(&cfg)?;
    write_file(&dir.join("pgward.toml"), &text, 0o640, 0, 0)?;
    let loaded = Config::load(&cfg)?;
    // The public keys: the checkpoint JWKS is what `audit verify` checks the log against.
    for rel in [loaded.auth.jwks.as_ref(), loaded.audit.checkpoint_jwks.as_ref()].into_iter().flatten() {
        if rel.is_relative() && !rel.components().any(|c| matches!(c, Component::ParentDir)) {
            let dst = dir.join(rel);
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p)?;
            }
            write_file(&dst, &std::fs::read(loaded.resolve(rel))?, 0o640, 0, 0)?;
        }
    }
    Ok(())
}

/// Undo `m.changes` in reverse order. Failed steps stay in the manifest (rewritten), so the
/// next run retries them; when everything is undone the manifest and backups go.
pub(super) fn undo_all(root: &Root, m: &Manifest, purge: bool, systemctl: bool) -> anyhow::Result<(String, bool)> {
    let mut o = String::new();
    let mut left: Vec<Change> = Vec::new();
    let mut pg_touched = false;
    // The state directory (and ancestors install created) go last: it holds the manifest and
    // the backups.
    let is_state_dir = |c: &Change| matches!(c, Change::Dir { path, .. } if Path::new(STATE_DIR).starts_with(path));
    for c in m.changes.iter().rev() {
        if is_state_dir(c) {
            continue;
        }
        if matches!(c, Change::Edit(FileEdit { fallback: Fallback::StripBlock, .. }))
            || matches!(c, Change::File { path } if path.file_name().is_some_and(|n| n == DROPIN_NAME))
        {
            pg_touched = true;
        }
        match undo(root, c, purge, systemctl) {
            Ok(msg) => {
                if let Some(msg) = msg {
                    let _ = writeln!(o, "{msg}");
                }
            }
            Err(e) => {
                let _ = writeln!(o, "error: {e:#}");
                left.push(c.clone());
            }
        }
    }
    if systemctl {
        for args in [&["daemon-reload"][..], &["restart", &m.pg_service][..]] {
            if args[0] == "restart" && !pg_touched {
                continue;
            }
            if let Err(e) = run_systemctl(args) {
                let _ = writeln!(o, "error: {e:#}");
            }
        }
    }
    if left.is_empty() {
        let _ = std::fs::remove_file(root.p(MANIFEST));
        let _ = std::fs::remove_dir_all(root.p(BACKUP_DIR));
        for c in m.changes.iter().rev().filter(|c| is_state_dir(c)) {
            if let Err(e) = undo(root, c, purge, systemctl) {
                let _ = writeln!(o, "error: {e:#}");
                left.push(c.clone());
            }
        }
    }
    let ok = left.is_empty();
    if !ok {
        left.reverse();
        let rest = Manifest { changes: left, ..m.clone() };
        if root.p(STATE_DIR).is_dir() {
            write_manifest(root, &rest)?;
        }
    }
    Ok((o, ok))
}

/// Undo one change. Ok(Some(msg)) for things worth saying (kept data, files changed since).
pub(super) fn undo(root: &Root, c: &Change, purge: bool, systemctl: bool) -> anyhow::Result<Option<String>> {
    match c {
        Change::Enabled { unit } => {
            if systemctl {
                run_systemctl(&["disable", "--now", unit])?;
            }
            Ok(None)
        }
        Change::File { path } => {
            let p = root.p(path);
            match std::fs::remove_file(&p) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Change::Tree { path } => {
            let p = root.p(path);
            if p.exists() {
                clear_append_only_tree(&p);
                std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
            }
            Ok(None)
        }
        Change::Dir { path, data } => undo_dir(root, path, *data, purge),
        Change::Attrs { path, mode, uid, gid } => {
            let p = root.p(path);
            if p.exists() {
                set_attrs(&p, *mode, *uid, *gid)?;
            }
            Ok(None)
        }
        Change::AppendOnly { path } => {
            let p = root.p(path);
            let keep = !purge && path == Path::new(AUDIT_DIR);
            if p.exists() && !keep {
                set_append_only(&p, false).with_context(|| format!("chattr -a {}", p.display()))?;
            }
            Ok(None)
        }
        Change::Edit(e) => undo_edit(root, e),
        Change::Account { user, group_created, files } => undo_account(root, user, *group_created, files),
    }
}

/// A directory install created: removed when empty; one holding data (the audit log, the
/// access state) is kept and handed to root unless `purge`.
fn undo_dir(root: &Root, path: &Path, data: bool, purge: bool) -> anyhow::Result<Option<String>> {
    let p = root.p(path);
    if !p.exists() {
        return Ok(None);
    }
    if data && !purge {
        // Kept, handed to root (the user goes). An append-only inode's owner cannot
        // change: lift the flag for the chown.
        let append_only = is_append_only(&p).unwrap_or(false);
        if append_only {
            set_append_only(&p, false).with_context(|| format!("chattr -a {}", p.display()))?;
        }
        let r = chown_tree_ids(&p, 0, 0);
        if append_only {
            set_append_only(&p, true).with_context(|| format!("chattr +a {}", p.display()))?;
        }
        r?;
        return Ok(None);
    }
    if data {
        clear_append_only_tree(&p);
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        return Ok(None);
    }
    match std::fs::remove_dir(&p) {
        Ok(()) => Ok(None),
        Err(_) if Path::new(STATE_DIR).starts_with(path) && !purge => {
            // It holds the kept audit log.
            if path == Path::new(STATE_DIR) {
                set_attrs(&p, 0o750, 0, 0)?;
            }
            Ok(None)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            let names: Vec<String> = std::fs::read_dir(&p)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).take(5).collect())
                .unwrap_or_default();
            bail!(
                "{} is not empty ({}); install created it — is a service still using it (Postgres \
                 keeps its socket there until restarted)?",
                p.display(),
                names.join(", ")
            )
        }
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// The account files restored when nobody changed them since install, else just pgward's user
/// (and the group install created) removed.
fn undo_account(root: &Root, user: &str, group_created: bool, files: &[FileEdit]) -> anyhow::Result<Option<String>> {
    let unchanged = files.iter().all(|f| current_sha(&root.p(&f.path)) == f.after);
    if unchanged {
        for f in files {
            restore(root, &f.path, &f.before)?;
        }
        return Ok(None);
    }
    // Someone changed the account files since: remove just our user (and group).
    if root.accounts().user(user).is_some() {
        let mut cmd = Command::new("userdel");
        if !root.host() {
            cmd.arg("--prefix").arg(&root.dir);
        }
        run_cmd(cmd.arg(user)).with_context(|| format!("userdel {user}"))?;
    }
    if group_created && root.accounts().group(user).is_some() {
        let mut cmd = Command::new("groupdel");
        if !root.host() {
            cmd.arg("--prefix").arg(&root.dir);
        }
        run_cmd(cmd.arg(user)).with_context(|| format!("groupdel {user}"))?;
    }
    Ok(Some(format!(
        "the account files changed since install: removed user {user} with userdel (backups such as /etc/passwd- are left as they are)"
    )))
}

pub(super) fn undo_edit(root: &Root, e: &FileEdit) -> anyhow::Result<Option<String>> {
    let p = root.p(&e.path);
    if current_sha(&p) == e.after {
        restore(root, &e.path, &e.before)?;
        return Ok(None);
    }
    match e.fallback {
        Fallback::StripBlock => {
            let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let stripped = strip_block(&text);
            if stripped != text {
                replace_file_contents(&p, stripped.as_bytes())?;
            }
            Ok(Some(format!("{} changed since install: removed only pgward's block from it", e.path.display())))
        }
        Fallback::Leave => Ok(Some(format!("{} changed since install: left as it is", e.path.display()))),
    }
}

/// Put `sys` back as `saved` describes it (or remove it when it did not exist).
pub(super) fn restore(root: &Root, sys: &Path, saved: &Saved) -> anyhow::Result<()> {
    let p = root.p(sys);
    if !saved.existed {
        return match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
        };
    }
    let name = saved.backup.as_deref().context("manifest: saved file without a backup")?;
    let src = root.p(BACKUP_DIR).join(name);
    let bytes = std::fs::read(&src).with_context(|| format!("reading backup {}", src.display()))?;
    write_file(&p, &bytes, saved.mode, saved.uid, saved.gid)?;
    let t = SystemTime::UNIX_EPOCH + Duration::new(saved.mtime.0.max(0) as u64, saved.mtime.1);
    let f = std::fs::OpenOptions::new().write(true).open(&p)?;
    f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::super::manifest::Journal;
    use super::*;

    #[test]
    fn restore_puts_bytes_mode_and_mtime_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root { dir: tmp.path().to_owned() };
        std::fs::create_dir_all(root.p(BACKUP_DIR)).unwrap();
        std::fs::create_dir_all(root.p("/etc")).unwrap();
        let f = root.p("/etc/conf");
        std::fs::write(&f, "original\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let old_mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        let mut j = Journal {
            root: &root,
            m: Manifest {
                format: 1,
                pgward_version: String::new(),
                installed_at: String::new(),
                user: String::new(),
                pg_service: String::new(),
                systemctl: false,
                changes: vec![],
            },
            live: false,
            backups: 0,
        };
        let saved = j.save(Path::new("/etc/conf")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        replace_file_contents(&f, b"changed\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = FileEdit { path: "/etc/conf".into(), before: saved, after: current_sha(&f), fallback: Fallback::Leave };
        assert_eq!(undo_edit(&root, &e).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "original\n");
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!(m.modified().unwrap(), old_mtime);
        // Changed since install: left alone.
        std::fs::write(&f, "admin edit\n").unwrap();
        assert!(undo_edit(&root, &e).unwrap().unwrap().contains("left as it is"));
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "admin edit\n");
    }
}
