//! Writing files into the target tree: atomically (temp file + rename), with a given mode and
//! owner; and their hashes, which tell uninstall whether a file changed since install.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};


pub(super) fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub(super) fn current_sha(p: &Path) -> Option<String> {
    std::fs::read(p).ok().map(|b| sha256_hex(&b))
}

pub(super) fn set_attrs(p: &Path, mode: u32, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).with_context(|| format!("chown {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", p.display()))
}

/// Write a file atomically (temp file + rename) with the given mode and owner.
pub(super) fn write_file(p: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> anyhow::Result<()> {
    let dir = p.parent().context("file without a directory")?;
    let tmp = dir.join(format!(".{}.pgward-tmp", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
    }
    set_attrs(&tmp, mode, uid, gid)?;
    std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))
}

/// Replace a file's contents keeping its mode and owner.
pub(super) fn replace_file_contents(p: &Path, data: &[u8]) -> anyhow::Result<()> {
    let m = std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
    write_file(p, data, m.mode() & 0o7777, m.uid(), m.gid())
}

/// chown uid:gid and chmod (dirs `dmode`, files `fmode`) everything under `dir`, itself included.
pub(super) fn chown_tree(dir: &Path, uid: u32, gid: u32, dmode: u32, fmode: u32) -> anyhow::Result<()> {
    set_attrs(dir, dmode, uid, gid)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let t = e.file_type()?;
        if t.is_dir() {
            chown_tree(&e.path(), uid, gid, dmode, fmode)?;
        } else if t.is_file() {
            set_attrs(&e.path(), fmode, uid, gid)?;
        }
    }
    Ok(())
}

/// chown (only) everything under `dir`, itself included.
pub(super) fn chown_tree_ids(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).with_context(|| format!("chown {}", dir.display()))?;
    if dir.is_dir() && !dir.is_symlink() {
        for e in std::fs::read_dir(dir)?.flatten() {
            chown_tree_ids(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}
