//! Who listens where, from /proc: TCP listeners, the holders of a unix socket, and the process
//! behind a socket inode.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// Processes holding the listening unix socket at `path` (from /proc/net/unix and /proc/*/fd).
pub(super) fn unix_socket_pids(path: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let want = path.to_string_lossy();
    let inodes: BTreeSet<u64> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(7) == Some(&want.as_ref())).then(|| f.get(6)?.parse().ok()).flatten()
        })
        .collect();
    pids_with_sockets(&inodes)
}

fn pids_with_sockets(inodes: &BTreeSet<u64>) -> Vec<u32> {
    let mut out = Vec::new();
    if inodes.is_empty() {
        return out;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else { continue };
            let l = link.to_string_lossy();
            if let Some(ino) =
                l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<u64>().ok())
                && inodes.contains(&ino)
            {
                out.push(pid);
                break;
            }
        }
    }
    out
}

/// TCP listeners of this network namespace: (address, socket inode).
pub(super) fn tcp_listeners() -> Vec<(SocketAddr, u64)> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                continue; // not LISTEN
            }
            let (Some(local), Some(inode)) = (f.get(1), f.get(9).and_then(|s| s.parse::<u64>().ok())) else { continue };
            if let Some(a) = parse_proc_addr(local, v6) {
                out.push((a, inode));
            }
        }
    }
    out
}

/// "0100007F:1538" (IPv4) or 32 hex digits + port (IPv6), each 32-bit word in host order.
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut o = [0u8; 16];
        for i in 0..4 {
            let w = u32::from_str_radix(&addr[8 * i..8 * i + 8], 16).ok()?;
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        let w = u32::from_str_radix(addr, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

/// The process listening on `addr` (exactly, or a wildcard on its port).
pub(super) fn listener_pid(addr: SocketAddr) -> Option<u32> {
    let inodes: BTreeSet<u64> = tcp_listeners()
        .into_iter()
        .filter(|(a, _)| {
            a.port() == addr.port() && (a.ip() == addr.ip() || a.ip().is_unspecified() || mapped_eq(a.ip(), addr.ip()))
        })
        .map(|(_, i)| i)
        .collect();
    pids_with_sockets(&inodes).into_iter().next()
}

fn mapped_eq(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V6(v6), IpAddr::V4(v4)) | (IpAddr::V4(v4), IpAddr::V6(v6)) => v6.to_ipv4_mapped() == Some(v4),
        _ => false,
    }
}

pub(super) fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses() {
        assert_eq!(parse_proc_addr("0100007F:1538", false), Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(parse_proc_addr("00000000:1920", false), Some("0.0.0.0:6432".parse().unwrap()));
        assert_eq!(parse_proc_addr("00000000000000000000000001000000:1538", true), Some("[::1]:5432".parse().unwrap()));
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F:1538", true),
            Some("[::ffff:127.0.0.1]:5432".parse().unwrap())
        );
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    }
}
