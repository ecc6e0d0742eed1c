//! cgroup v2: where the hierarchy is mounted, pgward's own gateway cgroup (its connects and
//! binds are exempt by its id), and resolving a client's cgroup path.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

use crate::host::cgroup;

/// Where the cgroup2 (unified) hierarchy is mounted (/sys/fs/cgroup/unified on hybrid hosts).
pub(super) fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    cgroup::cgroup2_mount()
        .context("intercept: reading /proc/self/mountinfo")?
        .context("intercept: no cgroup2 (unified) hierarchy is mounted")
}

pub(super) fn require_cgroup2(dir: &Path) -> anyhow::Result<()> {
    let is_v2 = cgroup::is_cgroup2(dir).map_err(|e| anyhow!("intercept: cgroup {}: {e}", dir.display()))?;
    if !is_v2 {
        bail!("intercept: {} is not a cgroup v2 directory (set intercept.cgroup to one under the cgroup2 mount)", dir.display());
    }
    Ok(())
}

/// Whether a user other than root could move processes out of the protected cgroup `cgroup`
/// (past interception) or into pgward's exempt `gateway` cgroup. Moving a process needs write
/// access to the destination's `cgroup.procs` and to that of the common ancestor: a cgroup above
/// `cgroup` (up to the hierarchy's `root`) delegated to a user (its `cgroup.procs` theirs, or
/// writable by group or others, as a systemd user manager's subtree is) lets that user move
/// its processes from the protected cgroup to a sibling it owns; a pre-existing gateway cgroup
/// of theirs lets them join pgward's exemption. Some(why) names the first such cgroup.
pub(super) fn movable_by_others(cgroup: &Path, gateway: &Path, root: &Path) -> Option<String> {
    let open = |dir: &Path| -> Option<String> {
        let procs = dir.join("cgroup.procs");
        match fs::metadata(&procs) {
            Ok(m) if m.uid() == 0 && m.mode() & 0o022 == 0 => None,
            Ok(m) => Some(format!("{} (owner uid {}, mode {:o})", procs.display(), m.uid(), m.mode() & 0o7777)),
            // Unknown is not private.
            Err(e) => Some(format!("{} ({e})", procs.display())),
        }
    };
    let above = cgroup.ancestors().skip(1).take_while(|a| a.starts_with(root));
    for dir in above {
        if let Some(why) = open(dir) {
            return Some(format!("a user other than root can move processes out of {} through the cgroup above it: {why}", cgroup.display()));
        }
    }
    if gateway.exists()
        && let Some(why) = open(gateway)
    {
        return Some(format!("a user other than root can move processes into pgward's exempt gateway cgroup: {why}"));
    }
    None
}

/// pgward's own cgroup: entered at start (created if needed), left at exit.
pub(super) struct GatewayCgroup {
    pub(super) path: PathBuf,
    pub(super) id: u64,
    original: Option<PathBuf>,
    created: bool,
}

impl GatewayCgroup {
    pub(super) fn enter(path: &Path, root: &Path) -> anyhow::Result<GatewayCgroup> {
        let original = cgroup::cgroup_of(std::process::id()).map(|p| root.join(p.trim_start_matches('/')));
        let created = !path.exists();
        if created {
            fs::create_dir(path).with_context(|| format!("intercept: creating gateway cgroup {}", path.display()))?;
        }
        let mut g = GatewayCgroup { path: path.to_owned(), id: 0, original, created };
        fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("intercept: moving pgward into {}", path.display()))?;
        g.id = fs::metadata(path)?.ino();
        Ok(g)
    }
}

impl Drop for GatewayCgroup {
    fn drop(&mut self) {
        if let Some(orig) = &self.original {
            let _ = fs::write(orig.join("cgroup.procs"), std::process::id().to_string());
        }
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// The client's cgroup path (relative to the cgroup2 root), checked against the kernel's id.
pub(super) fn cgroup_path_of(pid: u32, id: u64, root: &Path) -> Option<String> {
    let rel = cgroup::cgroup_of(pid)?;
    let ino = fs::metadata(root.join(rel.trim_start_matches('/'))).ok()?.ino();
    (ino == id).then_some(rel)
}
