//! Linux capabilities: what a process may do that loading and attaching the eBPF programs
//! needs (CAP_BPF and CAP_NET_ADMIN; CAP_SYS_ADMIN stands in for either).

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The effective capability set of a process (`CapEff:` of /proc/<pid>/status); `pid` is a
/// number or `self`.
pub fn effective(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Which of CAP_BPF and CAP_NET_ADMIN `caps` lacks (CAP_SYS_ADMIN stands in for either).
pub fn missing_for_ebpf(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut m = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        m.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        m.push("CAP_NET_ADMIN");
    }
    m
}

/// The names of the capabilities pgward cares about that `caps` has.
pub fn names(caps: u64) -> Vec<&'static str> {
    [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(c, _)| caps & (1u64 << c) != 0)
    .map(|(_, n)| n)
    .collect()
}
