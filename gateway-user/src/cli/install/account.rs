//! The system user pgward runs as: created with useradd when it is missing, with every account
//! file useradd touched saved first (bytes and metadata), so uninstall can put them back.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::Context;

use super::cmd::run_cmd;
use super::files::sha256_hex;
use super::manifest::{Change, Fallback, FileEdit, Journal, absent};
use super::plan::Plan;
use super::tree::{Root, STATE_DIR};

/// Create the system user (unless it exists), recording what useradd changed in /etc.
pub(super) fn ensure_user(plan: &Plan, j: &mut Journal) -> anyhow::Result<(u32, u32)> {
    let root = &plan.root;
    let accounts = root.accounts();
    if let Some(ids) = accounts.user(&plan.user) {
        return Ok(ids);
    }
    let group_exists = accounts.group(&plan.user).is_some();
    let before = account_snapshot(root)?;
    let mut cmd = Command::new("useradd");
    if !root.host() {
        cmd.arg("--prefix").arg(&root.dir);
    }
    cmd.args(["--system", "--no-create-home", "--home-dir", STATE_DIR, "--shell", "/usr/sbin/nologin"])
        .args(["--comment", "pgward PostgreSQL gateway"]);
    if group_exists {
        cmd.args(["--gid", &plan.user]);
    } else {
        cmd.arg("--user-group");
    }
    cmd.arg(&plan.user);
    let result = run_cmd(&mut cmd);
    // Record whatever useradd changed, even when it failed half way.
    let after = account_snapshot(root)?;
    let mut files = Vec::new();
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        let (b, a) = (before.get(name), after.get(name));
        let same = match (b, a) {
            (Some(x), Some(y)) => x.bytes == y.bytes && x.mode == y.mode && x.uid == y.uid && x.gid == y.gid,
            (None, None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        let sys = Path::new("/etc").join(name);
        let saved = match b {
            Some(x) => j.save_bytes(&sys, &x.bytes, &x.meta)?,
            None => absent(),
        };
        files.push(FileEdit {
            path: sys,
            before: saved,
            after: a.map(|x| sha256_hex(&x.bytes)),
            fallback: Fallback::Leave,
        });
    }
    j.record(Change::Account { user: plan.user.clone(), group_created: !group_exists, files })?;
    result.with_context(|| format!("creating the system user {}", plan.user))?;
    root.accounts()
        .user(&plan.user)
        .with_context(|| format!("useradd ran but {} has no user {}", root.p("/etc/passwd").display(), plan.user))
}

pub(super) struct Snap {
    bytes: Vec<u8>,
    meta: std::fs::Metadata,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The account database files (and their backups and locks) in /etc.
pub(super) fn account_snapshot(root: &Root) -> anyhow::Result<BTreeMap<String, Snap>> {
    const PREFIXES: [&str; 7] = ["passwd", "group", "shadow", "gshadow", "subuid", "subgid", ".pwd.lock"];
    let mut out = BTreeMap::new();
    let etc = root.p("/etc");
    let rd = std::fs::read_dir(&etc).with_context(|| format!("reading {}", etc.display()))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let meta = e.path().symlink_metadata()?;
        if !meta.is_file() {
            continue;
        }
        let bytes = std::fs::read(e.path())?;
        out.insert(name, Snap { bytes, mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), meta });
    }
    Ok(out)
}
