//! Map layouts shared by the kernel programs (gateway-ebpf) and the userspace loader
//! (gateway-user's `ebpf` module): names, keys, values and counter indexes. `#[repr(C)]`, no
//! padding holes: the same bytes on both sides.
//!
//! Conventions: addresses are stored in network byte order exactly as the kernel's socket
//! structs hold them (`[u32; 4]`, an IPv4 address in `addr[0]`, or v4-mapped where noted);
//! ports are in host byte order.
//!
//! `no_std` and without dependencies for the kernel side; the `user` feature adds the
//! `aya::Pod` impls the loader needs to use these types as map keys and values.
#![no_std]

/// Map names (the kernel truncates names to 15 bytes; these fit).
pub const MAP_CONFIG: &str = "PGW_CONFIG";
pub const MAP_RULES: &str = "PGW_RULES";
pub const MAP_CONNS: &str = "PGW_CONNS";
pub const MAP_PEERS: &str = "PGW_PEERS";
pub const MAP_SOCKS: &str = "PGW_SOCKS";
pub const MAP_COUNTERS: &str = "PGW_COUNTERS";
pub const MAP_TUPLES: &str = "PGW_TUPLES";
pub const MAP_BINDS: &str = "PGW_BINDS";

/// Entries of `PGW_BINDS` (key: a port pgward listens on or is redirected to, host order;
/// value: `BIND_GUARDED`). Few: pgward's listener and its redirect targets.
pub const BIND_PORTS_MAX: u32 = 8;
pub const BIND_GUARDED: u32 = 1;

/// `Config::gateway_cgroup_id` when no gateway serves: no cgroup has this id, so nobody is
/// exempt (a stale id of a removed cgroup would not be reused either, but this says so).
pub const NO_CGROUP: u64 = u64::MAX;

/// `Config::exempt_uid` when no uid is exempt.
pub const NO_UID: u32 = u32::MAX;

/// The one entry of `PGW_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Only sockets in this network namespace are rewritten (0 = any). Other namespaces
    /// (containers) reach the host over the network, where sk_lookup applies.
    pub host_netns_cookie: u64,
    /// pgward's own cgroup v2 id: its connects are never redirected or refused.
    pub gateway_cgroup_id: u64,
    /// Also exempt this uid (`NO_UID` = none).
    pub exempt_uid: u32,
    /// Port of the IPv4 redirect target (0 = no IPv4 target: protected IPv4 connects are refused).
    pub redirect4_port: u32,
    /// IPv4 redirect target, network order.
    pub redirect4_ip: u32,
    /// Port of the IPv6 redirect target (0 = none: protected IPv6 connects are refused).
    pub redirect6_port: u32,
    /// IPv6 redirect target (may be v4-mapped), network order.
    pub redirect6_ip: [u32; 4],
}

/// Key of `PGW_RULES`: an address (all zero = any address of that family) and a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    /// 4 or 6 (v4-mapped IPv6 destinations are looked up as 4).
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// Values of `PGW_RULES`.
pub const ACTION_REDIRECT: u32 = 1;
pub const ACTION_REFUSE: u32 = 2;

/// What connect4/6 learned about a redirected socket (`PGW_CONNS`, keyed by socket cookie;
/// copied into `PGW_PEERS` by sock_ops once the client's port is known).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnMeta {
    /// Original destination: family (4 or 6), port, address (IPv4 in `addr[0]`).
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
    /// Connecting process (tgid), its uid and gid.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Which program redirected it: 4 (connect4) or 6 (connect6).
    pub via: u32,
    /// cgroup v2 id of the connecting process.
    pub cgroup_id: u64,
}

/// Key of `PGW_PEERS` and `PGW_TUPLES`: the client socket's 4-tuple as pgward's accepted socket sees it
/// (addresses IPv6 or v4-mapped, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub client_addr: [u32; 4],
    pub server_addr: [u32; 4],
    pub client_port: u32,
    pub server_port: u32,
}

/// `PGW_SOCKS` slots: pgward's listening sockets for sk_lookup.
pub const SOCK_V4: u32 = 0;
pub const SOCK_V6: u32 = 1;

/// `PGW_COUNTERS` (per-CPU u64) indexes.
pub const C_CONNECT4_REDIRECTED: u32 = 0;
pub const C_CONNECT4_REFUSED: u32 = 1;
pub const C_CONNECT4_EXEMPT: u32 = 2;
pub const C_CONNECT6_REDIRECTED: u32 = 3;
pub const C_CONNECT6_REFUSED: u32 = 4;
pub const C_CONNECT6_EXEMPT: u32 = 5;
pub const C_GETPEER4_REWRITTEN: u32 = 6;
pub const C_GETPEER6_REWRITTEN: u32 = 7;
pub const C_SOCKOPS_RECORDED: u32 = 8;
pub const C_SKLOOKUP_REDIRECTED: u32 = 9;
pub const C_SKLOOKUP_REFUSED: u32 = 10;
/// getpeername of an MPTCP socket, answered from `PGW_TUPLES` (its subflow was redirected).
pub const C_GETPEER_MPTCP: u32 = 11;
/// bind4/bind6 to a port in `PGW_BINDS`: refused (EPERM), or pgward's own (exempt).
pub const C_BIND4_REFUSED: u32 = 12;
pub const C_BIND4_EXEMPT: u32 = 13;
pub const C_BIND6_REFUSED: u32 = 14;
pub const C_BIND6_EXEMPT: u32 = 15;
pub const COUNTERS: u32 = 16;

/// (program, counter) names for `pgward status`, indexed like the counters.
pub const COUNTER_NAMES: [(&str, &str); COUNTERS as usize] = [
    ("pgw_connect4", "redirected"),
    ("pgw_connect4", "refused"),
    ("pgw_connect4", "exempt"),
    ("pgw_connect6", "redirected"),
    ("pgw_connect6", "refused"),
    ("pgw_connect6", "exempt"),
    ("pgw_getpeer4", "rewritten"),
    ("pgw_getpeer6", "rewritten"),
    ("pgw_sockops", "recorded"),
    ("pgw_sk_lookup", "redirected"),
    ("pgw_sk_lookup", "refused"),
    ("pgw_getpeer", "mptcp"),
    ("pgw_bind4", "refused"),
    ("pgw_bind4", "exempt"),
    ("pgw_bind6", "refused"),
    ("pgw_bind6", "exempt"),
];

// SAFETY: plain #[repr(C)] integers, no padding holes; any bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Config {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for RuleKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnMeta {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerKey {}
