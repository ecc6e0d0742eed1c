//! A small filesystem of its own for a test (a size-limited tmpfs, mounted by the test, which
//! runs as root), and a filler file that takes every free block of it: how a full disk looks
//! to a program writing there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run_cmd;

/// Size of the pieces the filler writes: one page, tmpfs's unit of allocation, so the last
/// write takes the last free page.
const FILL_PIECE: usize = 4096;

/// A tmpfs of a fixed size mounted on a fresh temporary directory; unmounted (by path) and
/// removed on Drop. Drop it after every process that has files open on it has stopped.
pub struct SmallFs {
    dir: Option<tempfile::TempDir>,
}

impl SmallFs {
    /// Mount a tmpfs of `bytes` (mode 0700, no huge pages) on a new directory under the system
    /// temp dir.
    #[track_caller]
    pub fn mount(bytes: u64) -> SmallFs {
        let dir = tempfile::Builder::new()
            .prefix("pgward-e2e-fs-")
            .tempdir()
            .expect("temp dir");
        let out = run_cmd(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                // Small pages only: a full filesystem then has no room left at all.
                .arg(format!("size={bytes},mode=0700,huge=never"))
                .arg("pgward-e2e")
                .arg(dir.path()),
            None,
            Duration::from_secs(30),
        );
        assert!(
            out.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN): {}",
            out.describe()
        );
        SmallFs { dir: Some(dir) }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("mounted").path()
    }

    /// Bytes a new file could still get (statvfs f_bavail × f_frsize).
    pub fn free_bytes(&self) -> u64 {
        free_bytes(self.path())
    }

    /// Create `name` on the filesystem and write to it until the filesystem refuses with
    /// ENOSPC; panics on any other error. Returns the filler's path and its size.
    #[track_caller]
    pub fn fill(&self, name: &str) -> (PathBuf, u64) {
        let path = self.path().join(name);
        let mut f = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let piece = [0x5au8; FILL_PIECE];
        let mut size = 0u64;
        loop {
            match f.write(&piece) {
                Ok(0) => break,
                Ok(n) => size += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        (path, size)
    }
}

/// Bytes a new file on `path`'s filesystem could still get: statvfs(2) f_bavail × f_frsize
/// (tmpfs keeps no blocks back for root).
pub fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a valid C string and a struct it fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    st.f_bavail as u64 * st.f_frsize as u64
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let path = dir.path().to_path_buf();
        let out = run_cmd(
            Command::new("umount").arg(&path),
            None,
            Duration::from_secs(30),
        );
        if !out.success() {
            // Something still has a file open there: detach it now, freed when closed.
            eprintln!(
                "warning: umount {} failed ({}); detaching it lazily",
                path.display(),
                out.stderr.trim()
            );
            let _ = run_cmd(
                Command::new("umount").arg("-l").arg(&path),
                None,
                Duration::from_secs(30),
            );
        }
        // The empty mount point goes with the TempDir.
        drop(dir);
    }
}
