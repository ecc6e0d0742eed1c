//! What install changed: the manifest (in /var/lib/pgward) and the journal that records each
//! change as it is made, with a backup of every file it replaces or edits.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::files::{set_attrs, write_file};
use super::tree::{BACKUP_DIR, MANIFEST, Root};

pub(super) const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Manifest {
    pub(super) format: u32,
    pub(super) pgward_version: String,
    pub(super) installed_at: String,
    pub(super) user: String,
    pub(super) pg_service: String,
    /// install ran systemctl (so uninstall does too, unless told not to).
    pub(super) systemctl: bool,
    /// In the order they were made; undone in reverse.
    pub(super) changes: Vec<Change>,
}

/// One change install made to the tree (paths are system paths).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Change {
    /// A directory that did not exist; removed when empty. `data`: holds what pgward wrote (the
    /// audit log, the access state) — kept unless `--purge`, then removed with its contents.
    Dir {
        path: PathBuf,
        #[serde(default)]
        data: bool,
    },
    /// A directory that did not exist, removed with everything in it (/etc/pgward).
    Tree { path: PathBuf },
    /// A file that did not exist.
    File { path: PathBuf },
    /// An existing file that was replaced or edited.
    Edit(FileEdit),
    /// An existing directory whose mode / owner was changed.
    Attrs { path: PathBuf, mode: u32, uid: u32, gid: u32 },
    /// `chattr +a` was set.
    AppendOnly { path: PathBuf },
    /// The account files useradd changed (restored exactly when unchanged since, else `userdel`).
    Account { user: String, group_created: bool, files: Vec<FileEdit> },
    /// `systemctl enable --now` was run.
    Enabled { unit: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct FileEdit {
    pub(super) path: PathBuf,
    pub(super) before: Saved,
    /// sha256 right after install (None: install removed it).
    pub(super) after: Option<String>,
    /// What uninstall does when the file changed since install.
    #[serde(default)]
    pub(super) fallback: Fallback,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Fallback {
    /// Leave it as it is (and say so).
    #[default]
    Leave,
    /// Remove the `# BEGIN pgward` … `# END pgward` block, keep the rest.
    StripBlock,
}

/// A file as it was before install: its bytes are in the backup directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Saved {
    pub(super) existed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) backup: Option<String>,
    #[serde(default)]
    pub(super) mode: u32,
    #[serde(default)]
    pub(super) uid: u32,
    #[serde(default)]
    pub(super) gid: u32,
    #[serde(default)]
    pub(super) mtime: (i64, u32),
}

/// Install's journal: every change is recorded (and the manifest rewritten) as it is made, so
/// a failed or interrupted install can be undone.
pub(super) struct Journal<'a> {
    pub(super) root: &'a Root,
    pub(super) m: Manifest,
    /// The manifest can be written (the state directory exists).
    pub(super) live: bool,
    pub(super) backups: usize,
}

impl Journal<'_> {
    pub(super) fn record(&mut self, c: Change) -> anyhow::Result<()> {
        self.m.changes.push(c);
        self.persist()
    }
    pub(super) fn persist(&self) -> anyhow::Result<()> {
        if !self.live {
            return Ok(());
        }
        write_manifest(self.root, &self.m)
    }
    /// Create `sys` and its missing ancestors (those 0755 root:root), recording each.
    pub(super) fn mkdirs(&mut self, sys: &Path, mode: u32, uid: u32, gid: u32, data: bool) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(sys);
        while let Some(p) = cur {
            if self.root.p(p).exists() {
                break;
            }
            missing.push(p.to_owned());
            cur = p.parent();
        }
        for p in missing.into_iter().rev() {
            let host = self.root.p(&p);
            std::fs::create_dir(&host).with_context(|| format!("creating {}", host.display()))?;
            let last = p == sys;
            self.record(Change::Dir { path: p, data: last && data })?;
            if last {
                set_attrs(&host, mode, uid, gid)?;
            } else {
                set_attrs(&host, 0o755, 0, 0)?;
            }
        }
        Ok(())
    }
    /// Keep a copy of `bytes` (the old content of `sys`, with metadata `meta`) in the backup dir.
    pub(super) fn save_bytes(&mut self, sys: &Path, bytes: &[u8], meta: &std::fs::Metadata) -> anyhow::Result<Saved> {
        self.backups += 1;
        let name = format!(
            "{:03}-{}",
            self.backups,
            sys.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
        let dst = self.root.p(BACKUP_DIR).join(&name);
        write_file(&dst, bytes, 0o600, 0, 0)?;
        Ok(Saved {
            existed: true,
            backup: Some(name),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
        })
    }
    pub(super) fn save(&mut self, sys: &Path) -> anyhow::Result<Saved> {
        let host = self.root.p(sys);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) => {
                let bytes = std::fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
                self.save_bytes(sys, &bytes, &meta)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(absent()),
            Err(e) => Err(e).with_context(|| format!("stat {}", host.display())),
        }
    }
}

pub(super) fn absent() -> Saved {
    Saved { existed: false, backup: None, mode: 0, uid: 0, gid: 0, mtime: (0, 0) }
}

pub(super) fn write_manifest(root: &Root, m: &Manifest) -> anyhow::Result<()> {
    let path = root.p(MANIFEST);
    let mut text = serde_json::to_string_pretty(m)?;
    text.push('\n');
    write_file(&path, text.as_bytes(), 0o600, 0, 0)
}

pub(super) fn read_manifest(root: &Root) -> anyhow::Result<Manifest> {
    let path = root.p(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("pgward is not installed in {} (no {})", root.dir.display(), path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let m: Manifest =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not an install manifest", path.display()))?;
    if m.format != MANIFEST_FORMAT {
        bail!("{}: manifest format {} is not supported by this pgward", path.display(), m.format);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::super::tree::AUDIT_DIR;
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            pgward_version: "0".into(),
            installed_at: "now".into(),
            user: "pgward".into(),
            pg_service: "postgresql.service".into(),
            systemctl: false,
            changes: vec![
                Change::Dir { path: "/var/lib/pgward".into(), data: false },
                Change::Edit(FileEdit {
                    path: "/etc/x".into(),
                    before: absent(),
                    after: Some("ab".into()),
                    fallback: Fallback::StripBlock,
                }),
                Change::AppendOnly { path: AUDIT_DIR.into() },
            ],
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"kind\":\"edit\"") && j.contains("\"fallback\":\"strip_block\""), "{j}");
        let back: Manifest = serde_json::from_str(&j).unwrap();
        assert_eq!(back.changes.len(), 3);
    }
}
