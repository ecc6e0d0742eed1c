//! cgroup v2: where the unified hierarchy is mounted, whether a directory belongs to it, and
//! which cgroup a process is in.

use std::path::{Path, PathBuf};

/// statfs `f_type` of cgroup2.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the cgroup2 (unified) hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified
/// on hybrid hosts); Ok(None) when none is. Err: /proc/self/mountinfo could not be read.
pub fn cgroup2_mount() -> std::io::Result<Option<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split(' ').next() != Some("cgroup2") {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    }))
}

/// Whether `dir` is a directory of a cgroup v2 hierarchy. Err: it cannot be statfs'd.
pub fn is_cgroup2(dir: &Path) -> std::io::Result<bool> {
    super::files::fs_type(dir).map(|t| t == CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 path of `pid` relative to the cgroup2 root ("/a/b"), if it is still alive.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}
