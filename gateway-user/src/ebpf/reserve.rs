//! Keeping pgward's ports out of the kernel's ephemeral port allocation.
//!
//! The bind guard sees the port a `bind` asks for; a port the kernel picks itself (`bind` to
//! port 0, `listen` or `connect` on an unbound socket — made deterministic by narrowing the
//! socket's range to one port with `IP_LOCAL_PORT_RANGE`) is chosen after it. While pgward is
//! stopped its port is free, and a process handed it would receive the clients interception
//! steers there, with their tokens. The kernel never hands out a port listed in
//! `net.ipv4.ip_local_reserved_ports` (IPv4 and IPv6 alike), so `serve` adds its ports there,
//! in its own network namespace, before it attaches. The entry stays while pgward is stopped;
//! a reboot clears it together with the pins.

use std::fs;
use std::path::Path;

use anyhow::{Context, bail};

/// Where the network namespace of the calling process keeps its IPv4 sysctls (IPv6 uses
/// the same port range and reservations).
const SYSCTL_DIR: &str = "/proc/sys/net/ipv4";
/// The ephemeral port range: "low<TAB>high".
const PORT_RANGE: &str = "ip_local_port_range";
/// Ports the kernel never hands out as ephemeral: "a,b-c" (empty when none).
const RESERVED_PORTS: &str = "ip_local_reserved_ports";

/// Those of `ports` the kernel may hand out as ephemeral ports (bind to port 0, listen or
/// connect on an unbound socket): inside `net.ipv4.ip_local_port_range` (which IPv6 uses too)
/// and not in `net.ipv4.ip_local_reserved_ports`. Empty when the sysctls cannot be read.
pub fn ephemeral_ports(ports: &[u16]) -> Vec<u16> {
    let read = |name: &str| fs::read_to_string(Path::new(SYSCTL_DIR).join(name)).unwrap_or_default();
    in_ephemeral_range(ports, &read(PORT_RANGE), &read(RESERVED_PORTS))
}

/// Add those of `ports` the kernel could hand out to `net.ipv4.ip_local_reserved_ports` of
/// this process's network namespace, keeping the entries already there. Returns the ports
/// added (empty when every one is outside the ephemeral range or already reserved). Fails —
/// and `serve` refuses to start — when the sysctls cannot be read or written, or when a port
/// is still not reserved afterwards.
pub fn reserve_ports(ports: &[u16]) -> anyhow::Result<Vec<u16>> {
    reserve_ports_in(Path::new(SYSCTL_DIR), ports)
}

fn reserve_ports_in(dir: &Path, ports: &[u16]) -> anyhow::Result<Vec<u16>> {
    let (range_file, reserved_file) = (dir.join(PORT_RANGE), dir.join(RESERVED_PORTS));
    let read = |p: &Path| fs::read_to_string(p).with_context(|| format!("intercept: reading {}", p.display()));
    let range = read(&range_file)?;
    let reserved = read(&reserved_file)?;
    if parse_range(&range).is_none() {
        bail!("intercept: {} says {:?}, not a port range", range_file.display(), range.trim());
    }
    let need = in_ephemeral_range(ports, &range, &reserved);
    if need.is_empty() {
        return Ok(need);
    }
    fs::write(&reserved_file, with_ports(&reserved, &need))
        .with_context(|| format!("intercept: adding port(s) {need:?} to {}", reserved_file.display()))?;
    let left = in_ephemeral_range(ports, &read(&range_file)?, &read(&reserved_file)?);
    if !left.is_empty() {
        bail!("intercept: port(s) {left:?} are still not in {} after adding them", reserved_file.display());
    }
    Ok(need)
}

/// The sysctl's list with `ports` appended (the kernel merges and sorts it).
fn with_ports(reserved: &str, ports: &[u16]) -> String {
    let added = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    match reserved.trim() {
        "" => added,
        old => format!("{old},{added}"),
    }
}

fn parse_range(range: &str) -> Option<(u16, u16)> {
    let mut r = range.split_whitespace().filter_map(|w| w.parse::<u16>().ok());
    Some((r.next()?, r.next()?))
}

fn in_ephemeral_range(ports: &[u16], range: &str, reserved: &str) -> Vec<u16> {
    let Some((lo, hi)) = parse_range(range) else { return Vec::new() };
    let reserved: Vec<(u16, u16)> = reserved
        .trim()
        .split(',')
        .filter_map(|item| {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    ports
        .iter()
        .copied()
        .filter(|p| (lo..=hi).contains(p) && !reserved.iter().any(|(a, b)| (*a..=*b).contains(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_range_and_reserved_ports() {
        let ports = [80, 6432, 40000, 40001, 61000];
        assert_eq!(in_ephemeral_range(&ports, "32768\t60999\n", "\n"), [40000, 40001]);
        assert_eq!(in_ephemeral_range(&ports, "32768\t60999\n", "40000\n"), [40001]);
        assert_eq!(in_ephemeral_range(&ports, "32768\t60999\n", "8080,39990-40005\n"), Vec::<u16>::new());
        assert_eq!(in_ephemeral_range(&ports, "1024 65535", ""), [6432, 40000, 40001, 61000]);
        assert_eq!(in_ephemeral_range(&ports, "", ""), Vec::<u16>::new());
    }

    fn sysctl_dir(range: &str, reserved: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(PORT_RANGE), range).unwrap();
        fs::write(d.path().join(RESERVED_PORTS), reserved).unwrap();
        d
    }

    #[test]
    fn reserving_keeps_existing_entries_and_skips_ports_the_kernel_cannot_hand_out() {
        let d = sysctl_dir("32768\t60999\n", "7777,50000-50010\n");
        assert_eq!(reserve_ports_in(d.path(), &[6432, 40000, 50005]).unwrap(), [40000]);
        assert_eq!(fs::read_to_string(d.path().join(RESERVED_PORTS)).unwrap(), "7777,50000-50010,40000");
        assert_eq!(reserve_ports_in(d.path(), &[40000]).unwrap(), Vec::<u16>::new(), "already reserved: nothing written");

        let d = sysctl_dir("32768 60999", "");
        assert_eq!(reserve_ports_in(d.path(), &[40000, 40001]).unwrap(), [40000, 40001]);
        assert_eq!(fs::read_to_string(d.path().join(RESERVED_PORTS)).unwrap(), "40000,40001");
    }

    #[test]
    fn reserving_fails_closed() {
        // Unreadable or nonsensical range: refuse rather than assume the port is safe.
        let d = sysctl_dir("", "");
        assert!(reserve_ports_in(d.path(), &[40000]).is_err());
        let d = tempfile::tempdir().unwrap();
        assert!(reserve_ports_in(d.path(), &[40000]).is_err(), "no sysctl files");
        // The list cannot be read or written (here: it is a directory).
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(PORT_RANGE), "32768 60999").unwrap();
        fs::create_dir(d.path().join(RESERVED_PORTS)).unwrap();
        assert!(reserve_ports_in(d.path(), &[40000]).is_err());
    }
}
