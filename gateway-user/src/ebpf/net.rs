//! Facts about this host's network: the ephemeral port range, local interface addresses and
//! a socket's network namespace cookie.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const SO_NETNS_COOKIE: libc::c_int = 71;

/// Those of `ports` the kernel may hand out as ephemeral ports (bind to port 0, listen or
/// connect on an unbound socket): inside `net.ipv4.ip_local_port_range` (which IPv6 uses too)
/// and not in `net.ipv4.ip_local_reserved_ports`. Empty when the sysctls cannot be read.
pub fn ephemeral_ports(ports: &[u16]) -> Vec<u16> {
    let read = |name: &str| fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap_or_default();
    in_ephemeral_range(ports, &read("ip_local_port_range"), &read("ip_local_reserved_ports"))
}

fn in_ephemeral_range(ports: &[u16], range: &str, reserved: &str) -> Vec<u16> {
    let mut r = range.split_whitespace().filter_map(|w| w.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (r.next(), r.next()) else { return Vec::new() };
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

/// Every address configured on this host's interfaces.
pub(super) fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match (*sa).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

pub(super) fn netns_cookie(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the advertised length.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    (r == 0).then_some(cookie)
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
}
