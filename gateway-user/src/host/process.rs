//! Other processes, from /proc: their command name and the user they act as.

/// The command name of `pid` (/proc/<pid>/comm, trimmed); None when it is gone or hidden.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}

/// The effective uid of `pid` (the second field of `Uid:` in /proc/<pid>/status).
pub fn euid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}
