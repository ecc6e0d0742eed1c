//! The HEAD file (the latest durable checkpoint), rewritten by a thread of its own so its two
//! flushes never hold up a batch.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::flush::Shared;
use super::segment::sync_dir;
use crate::audit::chain::{HEAD_FILE, Head};
use crate::config::FsyncPolicy;
use crate::lock;

/// The next HEAD for the head thread to write, and whether it is to stop.
#[derive(Default)]
pub(super) struct HeadSlot {
    pub(super) head: Option<Head>,
    pub(super) stop: bool,
}

impl Shared {
    /// Hand a HEAD to the head thread: rewriting HEAD costs two more flushes (the file and
    /// the directory), which would otherwise hold up the next batch's sync (with one writer
    /// thread, ~20 times a second at 10k statements/s) or, with `fsync = off`, the session.
    pub(super) fn post_head(&self, head: Head) {
        let mut slot = lock(&self.head_slot);
        if slot.head.as_ref().is_none_or(|h| h.seq < head.seq) {
            slot.head = Some(head);
            drop(slot);
            self.head_cv.notify_one();
        }
    }

    /// Writes the newest posted HEAD, until stopped (after writing what was posted).
    pub(super) fn head_thread(&self) {
        let mut slot = lock(&self.head_slot);
        loop {
            if let Some(h) = slot.head.take() {
                drop(slot);
                self.write_head(&h);
                slot = lock(&self.head_slot);
                continue;
            }
            if slot.stop {
                return;
            }
            slot = self.head_cv.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(super) fn write_head(&self, head: &Head) {
        let mut written = lock(&self.head_written);
        if head.seq <= *written {
            return;
        }
        match write_head(&self.dir, self.fsync, head) {
            Ok(()) => *written = head.seq,
            Err(e) => tracing::error!("audit: writing HEAD failed: {e}"),
        }
        // The checkpoint is durable either way (HEAD only names it).
        if let Some(hook) = &self.on_checkpoint {
            (hook.0)(head);
        }
    }
}

/// Replace HEAD with `head`: write `HEAD.tmp` and rename it over HEAD (or, where the directory
/// is append-only, overwrite HEAD in place), then sync the directory.
fn write_head(dir: &Path, fsync: FsyncPolicy, head: &Head) -> io::Result<()> {
    let tmp = dir.join("HEAD.tmp");
    let json = serde_json::to_vec(head).map_err(io::Error::other)?;
    {
        // Never through a link someone planted under the name (it would write where it points).
        let mut f =
            OpenOptions::new().create(true).write(true).truncate(true).mode(0o640).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        if fsync != FsyncPolicy::Off {
            f.sync_all()?;
        }
    }
    match std::fs::rename(&tmp, dir.join(HEAD_FILE)) {
        Ok(()) => {}
        // An append-only directory (`chattr +a`, as `pgward install` sets it) allows no
        // rename or removal: rewrite HEAD in place (one small write at offset 0).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let mut line = json;
            line.push(b'\n');
            // No truncate on open: the new line is written over the old one, then cut to size.
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o640)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dir.join(HEAD_FILE))?;
            f.write_all_at(&line, 0)?;
            f.set_len(line.len() as u64)?;
            if fsync != FsyncPolicy::Off {
                f.sync_all()?;
            }
        }
        Err(e) => return Err(e),
    }
    if fsync != FsyncPolicy::Off {
        sync_dir(dir)?;
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;

    /// A link planted as `HEAD.tmp` is not written through: the file it points to is left as it
    /// was, and the HEAD write fails (the writer logs it; HEAD stays the last one written).
    #[test]
    fn head_tmp_is_never_written_through_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep me\n").expect("write");
        std::os::unix::fs::symlink(&target, dir.path().join("HEAD.tmp")).expect("symlink");
        let head = Head {
            seq: 2,
            hash: "h".into(),
            anchor_seq: 1,
            anchor_hash: "a".into(),
            sig: "s".into(),
            kid: "k".into(),
            ts: "2026-01-01T00:00:00Z".into(),
        };
        assert!(write_head(dir.path(), FsyncPolicy::Off, &head).is_err());
        assert_eq!(std::fs::read(&target).expect("read"), b"keep me\n");
        assert!(!dir.path().join(HEAD_FILE).exists());
    }
}
