//! Addresses in the layout the kernel programs use: IPv4 as v4-mapped IPv6, and IPv6 as four
//! u32 words holding the network-order bytes.

use std::net::{IpAddr, Ipv6Addr};

pub(super) fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// IPv6 address as four u32 words holding the network-order bytes (the kernel's layout).
pub(super) fn ip_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

pub(super) fn words_octets(w: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
    }
    o
}
