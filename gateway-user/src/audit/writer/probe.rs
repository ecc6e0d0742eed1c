//! The checks before a write: the audit directory is writable and the segment's path still
//! names the open file.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::log::Log;
use crate::config::FsyncPolicy;

/// With `fsync = off` (no durability promise, one write per statement) the directory and
/// segment path checks run at most this often; with `group`/`always` before every write
/// (their cost is small next to the fdatasync the batch waits for anyway).
pub(super) const OFF_PATH_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Whether `path` still names the file with this device and inode, at least `len` bytes long
/// (the lines written to it so far). A file cut shorter (`logrotate` with `copytruncate`,
/// `> segment`) would take the next batch after a hole of zeros, where every reader stops
/// and the next start's recovery drops it. Asks `statx` for the inode number and size only: a
/// stat that includes the timestamps (as `std::fs::metadata` does)
/// marks them as observed, so Linux (6.13+, multigrain timestamps) gives the next write a
/// fine-grained mtime, the inode is dirty after every batch, and every fdatasync writes the
/// inode as well as the data (a second I/O per flush). Without the query, mtime moves once
/// per clock tick.
pub(super) fn names_file(c: &CStr, dev: u64, ino: u64, len: u64) -> bool {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `stx` is writable for the duration of the call.
    let want = libc::STATX_INO | libc::STATX_SIZE;
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, want, &mut stx) };
    r == 0
        && stx.stx_mask & want == want
        && stx.stx_ino == ino
        && stx.stx_size >= len
        && libc::makedev(stx.stx_dev_major, stx.stx_dev_minor) == dev
}

/// `path` as a C string for system calls. A path that holds a NUL (none that was opened can)
/// becomes the empty path, which every check fails.
pub(super) fn path_cstring(path: &Path) -> Arc<CString> {
    Arc::new(CString::new(path.as_os_str().as_bytes()).unwrap_or_default())
}

/// What a writer thread checks before it writes a batch: that the audit directory is
/// writable and that the segment's path still names the open file. Taken under the log lock
/// (a few reference counts), run without it: under the lock, the event loop appending its
/// next record would block on the two system calls during nearly every batch.
pub(super) struct ProbeTarget {
    pub(super) dir_c: Arc<CString>,
    pub(super) seg_id: u64,
    pub(super) seg_c: Arc<CString>,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// The segment's content length when the target was taken.
    pub(super) len: u64,
}

/// The outcome of a [`ProbeTarget`]'s checks, for the segment it looked at.
pub(super) struct PathProbe {
    pub(super) seg_id: u64,
    pub(super) dir: io::Result<()>,
    pub(super) same: bool,
}

/// Whether the directory `c` is writable (`access(2)` with `W_OK`).
pub(super) fn dir_writable(c: &CStr) -> io::Result<()> {
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl ProbeTarget {
    pub(super) fn run(&self) -> PathProbe {
        let dir = dir_writable(&self.dir_c);
        let same = dir.is_ok() && names_file(&self.seg_c, self.dev, self.ino, self.len);
        PathProbe { seg_id: self.seg_id, dir, same }
    }
}

impl Log {
    /// What the writer thread should check before the next batch, if it is to check the
    /// paths itself (durable policies, an open segment, records waiting).
    pub(super) fn probe_target(&self) -> Option<ProbeTarget> {
        if self.fsync == FsyncPolicy::Off || self.queued.is_empty() {
            return None;
        }
        let seg = self.seg.as_ref()?;
        Some(ProbeTarget {
            dir_c: self.dir_c.clone(),
            seg_id: seg.id,
            seg_c: seg.path_c.clone(),
            dev: seg.dev,
            ino: seg.ino,
            len: seg.len,
        })
    }
}
