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
