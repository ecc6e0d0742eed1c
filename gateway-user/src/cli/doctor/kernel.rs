//! What the host must offer for interception: the kernel version, its eBPF program types, and
//! the capabilities pgward runs (or would run) with.

use super::Ctx;
use super::report::{Check, Outcome, check};
use crate::host::caps;

pub(super) fn kernel() -> Check {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 10, 0) => {
            check("kernel", Outcome::Pass, format!("Linux {v} (5.10 or newer needed)"), None)
        }
        Ok(v) => check(
            "kernel",
            Outcome::Fail,
            format!("Linux {v}: the interception programs need 5.10 or newer"),
            Some("upgrade the kernel (Debian 12 ships 6.1)".into()),
        ),
        Err(e) => check("kernel", Outcome::Warn, format!("cannot read the kernel version: {e}"), None),
    }
}

pub(super) fn bpf_features(cx: &Ctx) -> Check {
    use aya::programs::ProgramType;
    let severity = if cx.cfg.intercept.enabled { Outcome::Fail } else { Outcome::Warn };
    if !crate::ebpf::object_embedded() {
        return check(
            "bpf features",
            severity,
            "this pgward binary was built without the eBPF object",
            Some("cargo xtask build-ebpf, then rebuild pgward (cargo build --release -p gateway-user)".into()),
        );
    }
    let mut missing = Vec::new();
    let mut unknown = Vec::new();
    for (ty, name) in [
        (ProgramType::CgroupSockAddr, "cgroup_sock_addr"),
        (ProgramType::SockOps, "sock_ops"),
        (ProgramType::SkLookup, "sk_lookup"),
    ] {
        match aya::sys::is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => missing.push(name),
            Err(e) => unknown.push(format!("{name} ({e})")),
        }
    }
    if !missing.is_empty() {
        return check(
            "bpf features",
            severity,
            format!("the kernel lacks program types: {}", missing.join(", ")),
            Some("a kernel built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_JIT (Linux 5.10+)".into()),
        );
    }
    if !unknown.is_empty() {
        return check(
            "bpf features",
            Outcome::Warn,
            format!("could not probe {}", unknown.join(", ")),
            Some("run pgward doctor as root (probing loads a tiny program)".into()),
        );
    }
    check("bpf features", Outcome::Pass, "cgroup_sock_addr, sock_ops, sk_lookup supported; eBPF object embedded", None)
}

/// Capabilities a unit file grants (AmbientCapabilities=, limited by CapabilityBoundingSet=).
fn unit_caps(text: &str) -> Option<u64> {
    let names = |key: &str| -> Option<Vec<String>> {
        let vals: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=').map(|v| v.to_string()))
            .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
            .collect();
        (!vals.is_empty()).then_some(vals)
    };
    let bits = |v: &[String]| {
        v.iter().fold(0u64, |acc, n| {
            acc | match n.as_str() {
                "CAP_BPF" => 1 << caps::CAP_BPF,
                "CAP_NET_ADMIN" => 1 << caps::CAP_NET_ADMIN,
                "CAP_PERFMON" => 1 << caps::CAP_PERFMON,
                "CAP_SYS_ADMIN" => 1 << caps::CAP_SYS_ADMIN,
                _ => 0,
            }
        })
    };
    let ambient = bits(&names("AmbientCapabilities")?);
    Some(match names("CapabilityBoundingSet") {
        Some(b) => ambient & bits(&b),
        None => ambient,
    })
}

pub(super) fn capabilities(cx: &Ctx) -> Check {
    let name = "capabilities";
    if !cx.cfg.intercept.enabled {
        return check(name, Outcome::Skip, "interception is off: no capabilities needed", None);
    }
    let fix = Some(
        "grant CAP_BPF and CAP_NET_ADMIN (the unit `pgward install` writes has \
         AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON), or run pgward as root"
            .to_string(),
    );
    let (whose, have) = if let Some(pid) = cx.serve_pid {
        match caps::effective(&pid.to_string()) {
            Some(c) => (format!("pgward serve (pid {pid})"), c),
            None => return check(name, Outcome::Warn, format!("cannot read /proc/{pid}/status"), None),
        }
    } else if let Some(c) = std::fs::read_to_string(&cx.unit).ok().and_then(|t| unit_caps(&t)) {
        (format!("the unit {}", cx.unit.display()), c)
    } else {
        match caps::effective("self") {
            Some(c) => ("this process (no serve running, no unit)".to_string(), c),
            None => return check(name, Outcome::Warn, "cannot read /proc/self/status", None),
        }
    };
    let missing = caps::missing_for_ebpf(have);
    if missing.is_empty() {
        check(name, Outcome::Pass, format!("{whose}: {}", caps::names(have).join(" ")), None)
    } else {
        check(name, Outcome::Fail, format!("{whose} lacks {}", missing.join(" and ")), fix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_capabilities() {
        let u = "[Service]\nCapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\nAmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n";
        let c = unit_caps(u).unwrap();
        assert!(caps::missing_for_ebpf(c).is_empty());
        assert_eq!(caps::names(c), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        let bounded = "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN\nCapabilityBoundingSet=CAP_BPF\n";
        assert_eq!(caps::missing_for_ebpf(unit_caps(bounded).unwrap()), ["CAP_NET_ADMIN"]);
        assert_eq!(unit_caps("[Service]\nUser=x\n"), None);
    }
}
