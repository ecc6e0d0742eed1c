//! File attributes the kernel keeps beside mode and owner: inode flags (the append-only
//! attribute, `chattr +a`) and the type of file system a path is on.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// FS_APPEND_FL (`chattr +a`).
const FS_APPEND_FL: libc::c_int = 0x20;

/// The file system type (statfs `f_type`, e.g. CGROUP2_SUPER_MAGIC) of the one `p` is on.
pub fn fs_type(p: &Path) -> std::io::Result<i64> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: statfs into a zeroed struct with a valid C path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Opens `p` (file or directory, not following a link) for the flag ioctls.
fn open_for_flags(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW).open(p)
}

fn get_flags(f: &std::fs::File) -> std::io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags)
}

/// The inode flags (`lsattr`) of a file or directory.
pub fn inode_flags(p: &Path) -> std::io::Result<libc::c_int> {
    get_flags(&open_for_flags(p)?)
}

pub fn is_append_only(p: &Path) -> std::io::Result<bool> {
    inode_flags(p).map(|f| f & FS_APPEND_FL != 0)
}

/// `chattr +a` / `chattr -a`.
pub fn set_append_only(p: &Path, on: bool) -> std::io::Result<()> {
    let f = open_for_flags(p)?;
    let flags = get_flags(&f)?;
    let new = if on { flags | FS_APPEND_FL } else { flags & !FS_APPEND_FL };
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer.
    if new != flags && unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Clear the append-only flag on everything under `p`, itself included (so it can be
/// removed or handed to another owner). Best effort: what cannot be cleared is skipped.
pub fn clear_append_only_tree(p: &Path) {
    let Ok(m) = std::fs::symlink_metadata(p) else { return };
    if m.is_dir() {
        let _ = set_append_only(p, false);
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            clear_append_only_tree(&e.path());
        }
    } else if m.is_file() && is_append_only(p).unwrap_or(false) {
        let _ = set_append_only(p, false);
    }
}
