//! pgward kernel-side programs: transparent, unbypassable interception of Postgres connections.
//!
//! - `pgw_connect4` / `pgw_connect6` (cgroup/connect4, connect6): a TCP connect from the host
//!   network namespace to a protected address:port (`PGW_RULES`, action REDIRECT) is rewritten to
//!   pgward's listener; one to the real upstream (action REFUSE) fails with EPERM. pgward itself
//!   (its cgroup v2 id, optionally a uid; `PGW_CONFIG`) is exempt. The original destination and
//!   the caller's pid/uid/gid/cgroup go to `PGW_CONNS` (by socket cookie).
//! - `pgw_getpeer4` / `pgw_getpeer6` (cgroup/getpeername4, getpeername6): a redirected socket
//!   still reports the address it dialled. An MPTCP socket is redirected through its first
//!   subflow (a TCP socket with a cookie of its own), so its record is found by 4-tuple in
//!   `PGW_TUPLES` instead.
//! - `pgw_sockops` (sock_ops, TCP_CONNECT_CB): once the client's port is known, copies the
//!   metadata to `PGW_PEERS`, keyed by the 4-tuple pgward's accepted socket sees (consumed by
//!   pgward), and to `PGW_TUPLES` (the same key; read by getpeername of MPTCP sockets).
//! - `pgw_sk_lookup` (sk_lookup, host network namespace): connections arriving from other hosts
//!   on a protected port go to pgward's listening socket (`PGW_SOCKS`), even while Postgres
//!   listens there; ones to a refused port are dropped. Loopback traffic is left to connect4/6.
//! - `pgw_bind4` / `pgw_bind6` (cgroup/bind4, bind6): the bind guard. A bind in the host network
//!   namespace to one of pgward's ports (`PGW_BINDS`: its listener and redirect targets), on any
//!   address and with any socket type, fails with EPERM unless the caller is pgward. Without it,
//!   while pgward is stopped any local process could listen where the redirect steers clients
//!   (and, with SO_REUSEPORT, share pgward's port while it runs).
//!
//! Every decision is counted in `PGW_COUNTERS` (indexes in gateway-common).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr, sk_action},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, info};
use gateway_common::*;

/// cgroup_sock_addr verdicts: 1 lets the syscall proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_MPTCP: u32 = 262;
const LOOPBACK_IFINDEX: u32 = 1;

#[map(name = "PGW_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "PGW_RULES")]
static RULES: HashMap<RuleKey, u32> = HashMap::with_max_entries(256, 0);
#[map(name = "PGW_CONNS")]
static CONNS: LruHashMap<u64, ConnMeta> = LruHashMap::with_max_entries(65536, 0);
#[map(name = "PGW_PEERS")]
static PEERS: LruHashMap<PeerKey, ConnMeta> = LruHashMap::with_max_entries(65536, 0);
#[map(name = "PGW_TUPLES")]
static TUPLES: LruHashMap<PeerKey, ConnMeta> = LruHashMap::with_max_entries(65536, 0);
#[map(name = "PGW_SOCKS")]
static SOCKS: SockMap = SockMap::with_max_entries(2, 0);
#[map(name = "PGW_BINDS")]
static BINDS: HashMap<u32, u32> = HashMap::with_max_entries(BIND_PORTS_MAX, 0);
#[map(name = "PGW_COUNTERS")]
static COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[inline(always)]
fn count(idx: u32) {
    if let Some(c) = COUNTER.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}

/// REDIRECT / REFUSE / 0 for a destination: the exact address first, then "any address".
#[inline(always)]
fn rule(family: u32, port: u32, addr: [u32; 4]) -> u32 {
    let mut key = RuleKey { family, port, addr };
    if let Some(a) = unsafe { RULES.get(&key) } {
        return *a;
    }
    key.addr = [0; 4];
    unsafe { RULES.get(&key) }.copied().unwrap_or(0)
}

/// The socket is a TCP socket of the host netns, and the caller is not pgward.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext, sa: *mut bpf_sock_addr, cfg: &Config) -> bool {
    let (ty, proto) = unsafe { ((*sa).type_, (*sa).protocol) };
    if ty != SOCK_STREAM || (proto != IPPROTO_TCP && proto != 0) {
        return false;
    }
    cfg.host_netns_cookie == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.host_netns_cookie
}

#[inline(always)]
fn cgroup_id() -> u64 {
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
fn is_pgward(cfg: &Config) -> bool {
    cgroup_id() == cfg.gateway_cgroup_id
        || (cfg.exempt_uid != NO_UID && bpf_get_current_uid_gid() as u32 == cfg.exempt_uid)
}

/// Remember who dialled what, for getpeername and for pgward's login record.
#[inline(always)]
fn remember(ctx: &SockAddrContext, family: u32, port: u32, addr: [u32; 4], via: u32) {
    let ug = bpf_get_current_uid_gid();
    let meta = ConnMeta {
        family,
        port,
        addr,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: ug as u32,
        gid: (ug >> 32) as u32,
        via,
        cgroup_id: cgroup_id(),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CONNS.insert(&cookie, &meta, 0);
}

#[cgroup_sock_addr(connect4)]
pub fn pgw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(cfg) = CONFIG.get(0) else { return ALLOW };
    if !in_scope(&ctx, sa, cfg) {
        return ALLOW;
    }
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16) as u32;
    let action = rule(4, port, [ip, 0, 0, 0]);
    if action == 0 {
        return ALLOW;
    }
    if is_pgward(cfg) {
        count(C_CONNECT4_EXEMPT);
        return ALLOW;
    }
    if action == ACTION_REDIRECT && cfg.redirect4_port != 0 {
        remember(&ctx, 4, port, [ip, 0, 0, 0], 4);
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), cfg.redirect4_ip);
            write_volatile(addr_of_mut!((*sa).user_port), ((cfg.redirect4_port as u16).to_be()) as u32);
        }
        count(C_CONNECT4_REDIRECTED);
        debug!(&ctx, "connect4: {:i}:{} redirected to pgward", u32::from_be(ip), port);
        return ALLOW;
    }
    count(C_CONNECT4_REFUSED);
    info!(&ctx, "connect4: {:i}:{} refused (EPERM)", u32::from_be(ip), port);
    DENY
}

#[inline(always)]
fn read_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // One 4-byte load per word: the verifier rejects wider loads of user_ip6.
    unsafe {
        let p = addr_of!((*sa).user_ip6) as *const u32;
        [read_volatile(p), read_volatile(p.add(1)), read_volatile(p.add(2)), read_volatile(p.add(3))]
    }
}

#[inline(always)]
fn write_ip6(sa: *mut bpf_sock_addr, ip: [u32; 4]) {
    unsafe {
        let p = addr_of_mut!((*sa).user_ip6) as *mut u32;
        write_volatile(p, ip[0]);
        write_volatile(p.add(1), ip[1]);
        write_volatile(p.add(2), ip[2]);
        write_volatile(p.add(3), ip[3]);
    }
}

/// ::ffff:a.b.c.d (network order) → Some(a.b.c.d).
#[inline(always)]
fn v4_mapped(ip: [u32; 4]) -> Option<u32> {
    (ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffff_u32.to_be()).then_some(ip[3])
}

#[cgroup_sock_addr(connect6)]
pub fn pgw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(cfg) = CONFIG.get(0) else { return ALLOW };
    if !in_scope(&ctx, sa, cfg) {
        return ALLOW;
    }
    let ip = read_ip6(sa);
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16) as u32;
    let (family, key) = match v4_mapped(ip) {
        Some(v4) => (4, [v4, 0, 0, 0]),
        None => (6, ip),
    };
    let action = rule(family, port, key);
    if action == 0 {
        return ALLOW;
    }
    if is_pgward(cfg) {
        count(C_CONNECT6_EXEMPT);
        return ALLOW;
    }
    if action == ACTION_REDIRECT && cfg.redirect6_port != 0 {
        remember(&ctx, family, port, key, 6);
        write_ip6(sa, cfg.redirect6_ip);
        unsafe { write_volatile(addr_of_mut!((*sa).user_port), ((cfg.redirect6_port as u16).to_be()) as u32) };
        count(C_CONNECT6_REDIRECTED);
        debug!(&ctx, "connect6: port {} redirected to pgward", port);
        return ALLOW;
    }
    count(C_CONNECT6_REFUSED);
    info!(&ctx, "connect6: port {} refused (EPERM)", port);
    DENY
}

/// The bind guard: a bind to one of pgward's ports (any address, any socket type) by anyone
/// but pgward. Port 0 (an ephemeral port, chosen after this hook) is not seen here.
#[inline(always)]
fn bind_refused(ctx: &SockAddrContext, cfg: &Config) -> Option<bool> {
    let sa = ctx.sock_addr;
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16) as u32;
    if port == 0 || unsafe { BINDS.get(&port) }.is_none() {
        return None;
    }
    if cfg.host_netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.host_netns_cookie {
        return None;
    }
    Some(!is_pgward(cfg))
}

#[cgroup_sock_addr(bind4)]
pub fn pgw_bind4(ctx: SockAddrContext) -> i32 {
    bind_guard(&ctx, C_BIND4_EXEMPT, C_BIND4_REFUSED)
}

#[cgroup_sock_addr(bind6)]
pub fn pgw_bind6(ctx: SockAddrContext) -> i32 {
    bind_guard(&ctx, C_BIND6_EXEMPT, C_BIND6_REFUSED)
}

/// A bind by anyone but pgward to one of pgward's ports is refused (EPERM); the counters say
/// which family's program decided.
#[inline(always)]
fn bind_guard(ctx: &SockAddrContext, exempt: u32, refused: u32) -> i32 {
    let Some(cfg) = CONFIG.get(0) else { return ALLOW };
    match bind_refused(ctx, cfg) {
        None => ALLOW,
        Some(false) => {
            count(exempt);
            ALLOW
        }
        Some(true) => {
            count(refused);
            let port = u16::from_be(unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) } as u16);
            info!(ctx, "bind: port {} is pgward's, refused (EPERM)", port);
            DENY
        }
    }
}

/// The original destination of a redirected socket, if this is one.
#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<ConnMeta> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { CONNS.get(&cookie) }.copied()
}

/// An MPTCP socket's record, by the 4-tuple its first subflow had (the MPTCP socket carries
/// the same addresses): src = the client's end, dst = pgward's listener.
#[inline(always)]
fn original_mptcp(ctx: &SockAddrContext, v6: bool) -> Option<ConnMeta> {
    let sa = ctx.sock_addr;
    if unsafe { read_volatile(addr_of!((*sa).protocol)) } != IPPROTO_MPTCP {
        return None;
    }
    let sk = unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return None;
    }
    let (client_addr, server_addr) = if v6 {
        let src = unsafe { addr_of!((*sk).src_ip6) as *const u32 };
        let dst = unsafe { addr_of!((*sk).dst_ip6) as *const u32 };
        unsafe {
            (
                [read_volatile(src), read_volatile(src.add(1)), read_volatile(src.add(2)), read_volatile(src.add(3))],
                [read_volatile(dst), read_volatile(dst.add(1)), read_volatile(dst.add(2)), read_volatile(dst.add(3))],
            )
        }
    } else {
        let (s4, d4) = unsafe { (read_volatile(addr_of!((*sk).src_ip4)), read_volatile(addr_of!((*sk).dst_ip4))) };
        ([0, 0, 0xffff_u32.to_be(), s4], [0, 0, 0xffff_u32.to_be(), d4])
    };
    let key = PeerKey {
        client_addr,
        server_addr,
        client_port: unsafe { read_volatile(addr_of!((*sk).src_port)) },
        server_port: u16::from_be(unsafe { read_volatile(addr_of!((*sk).dst_port)) }) as u32,
    };
    let m = unsafe { TUPLES.get(&key) }.copied()?;
    count(C_GETPEER_MPTCP);
    Some(m)
}

#[cgroup_sock_addr(getpeername4)]
pub fn pgw_getpeer4(ctx: SockAddrContext) -> i32 {
    let Some(m) = original(&ctx).or_else(|| original_mptcp(&ctx, false)) else { return ALLOW };
    if m.family == 4 {
        let sa = ctx.sock_addr;
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), m.addr[0]);
            write_volatile(addr_of_mut!((*sa).user_port), ((m.port as u16).to_be()) as u32);
        }
        count(C_GETPEER4_REWRITTEN);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn pgw_getpeer6(ctx: SockAddrContext) -> i32 {
    let Some(m) = original(&ctx).or_else(|| original_mptcp(&ctx, true)) else { return ALLOW };
    let sa = ctx.sock_addr;
    let ip = if m.family == 4 { [0, 0, 0xffff_u32.to_be(), m.addr[0]] } else { m.addr };
    write_ip6(sa, ip);
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), ((m.port as u16).to_be()) as u32) };
    count(C_GETPEER6_REWRITTEN);
    ALLOW
}

/// A u32 ctx field, loaded at its fixed offset (the verifier rejects ctx pointer arithmetic).
macro_rules! ctx_u32 {
    ($p:expr, $($field:tt)+) => {
        unsafe { read_volatile(addr_of!((*$p).$($field)+) as *const u32) }
    };
}

#[sock_ops]
pub fn pgw_sockops(ctx: SockOpsContext) -> u32 {
    let o = ctx.ops;
    if ctx_u32!(o, op) != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(meta) = (unsafe { CONNS.get(&cookie) }) else { return 1 };
    let (l4, r4) = (ctx_u32!(o, local_ip4), ctx_u32!(o, remote_ip4));
    let l6 = [ctx_u32!(o, local_ip6[0]), ctx_u32!(o, local_ip6[1]), ctx_u32!(o, local_ip6[2]), ctx_u32!(o, local_ip6[3])];
    let r6 = [ctx_u32!(o, remote_ip6[0]), ctx_u32!(o, remote_ip6[1]), ctx_u32!(o, remote_ip6[2]), ctx_u32!(o, remote_ip6[3])];
    let (client_addr, server_addr) = if ctx_u32!(o, family) == AF_INET {
        ([0, 0, 0xffff_u32.to_be(), l4], [0, 0, 0xffff_u32.to_be(), r4])
    } else {
        (l6, r6)
    };
    let key = PeerKey {
        client_addr,
        server_addr,
        client_port: ctx_u32!(o, local_port),
        server_port: u32::from_be(ctx_u32!(o, remote_port)),
    };
    let _ = TUPLES.insert(&key, meta, 0);
    if PEERS.insert(&key, meta, 0).is_ok() {
        count(C_SOCKOPS_RECORDED);
    }
    1
}

#[sk_lookup]
pub fn pgw_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    let (proto, family, port, ifindex) =
        unsafe { ((*l).protocol, (*l).family, (*l).local_port, (*l).ingress_ifindex) };
    if proto != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return sk_action::SK_PASS;
    }
    let (fam, addr, slot) = if family == AF_INET6 {
        let ip = unsafe { (*l).local_ip6 };
        match v4_mapped(ip) {
            Some(v4) => (4, [v4, 0, 0, 0], SOCK_V6),
            None => (6, ip, SOCK_V6),
        }
    } else {
        (4, [unsafe { (*l).local_ip4 }, 0, 0, 0], SOCK_V4)
    };
    match rule(fam, port, addr) {
        ACTION_REDIRECT => {
            if SOCKS.redirect_sk_lookup(&ctx, slot, 0).is_ok() {
                count(C_SKLOOKUP_REDIRECTED);
                debug!(&ctx, "sk_lookup: port {} steered to pgward", port);
                return sk_action::SK_PASS;
            }
            // No pgward socket for this family: drop rather than let Postgres answer.
            count(C_SKLOOKUP_REFUSED);
            sk_action::SK_DROP
        }
        ACTION_REFUSE => {
            count(C_SKLOOKUP_REFUSED);
            info!(&ctx, "sk_lookup: remote connection to port {} dropped", port);
            sk_action::SK_DROP
        }
        _ => sk_action::SK_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible license, so the kernel lets the programs call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
