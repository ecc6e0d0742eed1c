//! The tree install works on (`/` or `--root DIR`) and pgward's layout in it: the system
//! paths install creates or changes.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};

use crate::host::accounts::{Accounts, effective_uid};

pub const STATE_DIR: &str = "/var/lib/pgward";
pub const MANIFEST: &str = "/var/lib/pgward/install-manifest.json";
pub(super) const BACKUP_DIR: &str = "/var/lib/pgward/install-backup";
pub const RETIRED_DIR: &str = "/var/lib/pgward/retired";
pub const CONFIG_DIR: &str = "/etc/pgward";
pub const CONFIG_FILE: &str = "/etc/pgward/pgward.toml";
pub const AUDIT_DIR: &str = "/var/lib/pgward/audit";
pub const ACCESS_DIR: &str = "/var/lib/pgward/state";
pub const UNIT_FILE: &str = "/etc/systemd/system/pgward.service";
pub const UNIT_NAME: &str = "pgward.service";
pub const TMPFILES_FILE: &str = "/etc/tmpfiles.d/pgward.conf";
/// systemd's RuntimeDirectory= for the unit: the interception state file lives here.
pub const RUNTIME_DIR: &str = "/run/pgward";
pub const STATE_FILE: &str = "/run/pgward/intercept.state.json";
/// Where the Debian package puts the binary: `pgward install` run from there uses it in place
/// (dpkg owns it), instead of copying it to `--bin-dir`'s default.
pub const PACKAGE_BIN_DIR: &str = "/usr/bin";
/// `--bin-dir` for any other binary.
pub const DEFAULT_BIN_DIR: &str = "/usr/local/bin";

/// The directory the system paths are applied under (`/` for the running system).
#[derive(Debug, Clone)]
pub(super) struct Root {
    pub(super) dir: PathBuf,
}

impl Root {
    pub(super) fn new(p: &Path) -> anyhow::Result<Root> {
        let dir = p.canonicalize().with_context(|| format!("--root {}", p.display()))?;
        if !dir.is_dir() {
            bail!("--root {} is not a directory", p.display());
        }
        Ok(Root { dir })
    }
    pub(super) fn host(&self) -> bool {
        self.dir == Path::new("/")
    }
    /// The tree's /etc/passwd and /etc/group.
    pub(super) fn accounts(&self) -> Accounts {
        Accounts::load_from(&self.p("/etc/passwd"), &self.p("/etc/group"))
    }
    /// Where system path `sys` (absolute) is in this tree.
    pub(super) fn p(&self, sys: impl AsRef<Path>) -> PathBuf {
        let s = sys.as_ref();
        let rel = s.strip_prefix("/").unwrap_or(s);
        if rel.as_os_str().is_empty() { self.dir.clone() } else { self.dir.join(rel) }
    }
}

pub(super) fn require_root() -> anyhow::Result<()> {
    if effective_uid() != 0 {
        bail!("must run as root (it creates a system user and changes file ownership)");
    }
    Ok(())
}

/// An absolute path without `..` (what every system path given on the command line must be).
pub(super) fn system_path(flag: &str, p: &Path) -> anyhow::Result<PathBuf> {
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("{flag} {} must be an absolute path without '..'", p.display());
    }
    Ok(p.components().collect())
}
