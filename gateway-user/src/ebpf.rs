//! Transparent interception (`[intercept]`): loads gateway-ebpf's programs, fills their maps,
//! attaches them and pins them in bpffs ([`pins`]), so that interception outlives `serve`.
//!
//! - cgroup/connect4 + connect6 (attached to `intercept.cgroup`, default the cgroup2 root)
//!   rewrite connects to `intercept.protected` to pgward's listener and refuse (EPERM) connects
//!   to `intercept.guard` (default: the real upstream, on every port it says it listens on).
//!   pgward is exempt by its cgroup v2 id: `serve` moves itself into `intercept.gateway_cgroup`
//!   first (and optionally by uid). Only sockets of pgward's network namespace are touched
//!   (netns cookie).
//! - cgroup/getpeername4 + 6: redirected clients still see the address they dialled.
//! - cgroup/bind4 + bind6 (the bind guard, same cgroup): a bind to pgward's ports (its
//!   listener and redirect targets, `PGW_BINDS`) by anyone but pgward fails with EPERM, so no
//!   other local process can listen where the redirect steers clients, while pgward is stopped
//!   or (SO_REUSEPORT) while it runs. pgward binds its listener from its gateway cgroup
//!   ([`Intercept::enter`] runs first), which a restarted pgward re-points the exemption at.
//! - sock_ops: records who connected (pid, uid, gid, cgroup, original destination) by 4-tuple;
//!   [`lookup_peer`] hands that to the session for the login record.
//! - sk_lookup (in `intercept.netns`): connections from other hosts to a protected port land on
//!   pgward's listening socket even while Postgres listens there; loopback traffic is left to
//!   connect4/6 (so pgward's own upstream connection is never steered).
//! - Unix sockets: aya cannot attach cgroup/connect_unix. pgward listens on the well-known path
//!   (`server.unix_socket_dir`, e.g. /var/run/postgresql) and the real Postgres socket must live
//!   in a directory only pgward's user (and Postgres's, and root) can enter;
//!   [`check_unix_sockets`] enforces that at start for every directory the upstream says it
//!   uses ([`discover`]) and every configured one (`intercept.unix_socket_check`).
//!
//! Fail closed: links and maps are pinned under [`pins::pin_dir`]. When `serve` exits (SIGTERM,
//! SIGKILL, crash, restart) the programs stay attached: protected connects go to pgward's
//! address where nothing listens (ECONNREFUSED) and the guard keeps refusing (EPERM). A
//! restarted `serve` adopts the pins and re-points the maps at itself ([`attach`]).
//! `pgward intercept detach` (audited) removes the pins.
//!
//! Kernel log lines (aya-log) reach tracing with target `gateway_ebpf` (e.g.
//! `PGWARD_LOG=info,gateway_ebpf=debug`). `serve` writes `intercept.state_file`, which
//! `pgward status` reads together with the pins ([`status`]).

mod attach;
pub use attach::Entered;
pub mod discover;
pub mod pins;


use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, anyhow, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, SockMap};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramType, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use serde::{Deserialize, Serialize};

use crate::config::{Config, UnixSocketCheck};
use crate::host::accounts::{Accounts, effective_uid};
use crate::host::{caps, cgroup, process, reach};
use gateway_common as common;
use gateway_common::{ConnMeta, PeerKey, RuleKey};

/// The kernel object, embedded at build time when `cargo xtask build-ebpf` has produced it.
#[cfg(pgward_ebpf_object)]
fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(env!("PGWARD_EBPF_OBJECT")))
}
#[cfg(not(pgward_ebpf_object))]
fn object() -> Option<&'static [u8]> {
    None
}

/// Whether this binary carries the eBPF object.
pub fn object_embedded() -> bool {
    object().is_some()
}

/// cgroup programs: (program, section/attach point).
const CGROUP_PROGRAMS: [(&str, &str); 6] = [
    ("pgw_connect4", "cgroup/connect4"),
    ("pgw_connect6", "cgroup/connect6"),
    ("pgw_getpeer4", "cgroup/getpeername4"),
    ("pgw_getpeer6", "cgroup/getpeername6"),
    ("pgw_bind4", "cgroup/bind4"),
    ("pgw_bind6", "cgroup/bind6"),
];
const SOCKOPS: &str = "pgw_sockops";
const SK_LOOKUP: &str = "pgw_sk_lookup";
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Interception of this `serve`: the pinned programs (attached now, or adopted from an earlier
/// run), re-pointed at this process. Dropping it does NOT detach: the pins keep interception
/// closed while no gateway serves (protected connects are refused); it clears this process's
/// exemption and leaves the gateway cgroup. Detaching is `pgward intercept detach`.
pub struct Intercept {
    /// A freshly loaded object, until [`Intercept::finish`] has attached and pinned it.
    ebpf: Option<Ebpf>,
    log_task: Option<tokio::task::JoinHandle<()>>,
    /// Dropped after the exemption is cleared: pgward leaves its cgroup.
    _gateway: GatewayCgroup,
    state_file: PathBuf,
    pin_dir: PathBuf,
    config: Array<MapData, common::Config>,
    rules: BpfHashMap<MapData, RuleKey, u32>,
    kcfg: common::Config,
    listen: SocketAddr,
    cgroup: PathBuf,
    cgroup_root: PathBuf,
    /// Programs were pinned by an earlier run and taken over.
    adopted: bool,
    /// Programs are attached (pinned): from here on a drop leaves them closed, not gone.
    attached: usize,
}

/// What `serve` attached, for `pgward status` (the state file, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    pub started: String,
    /// Set when that `serve` stopped cleanly (the programs stay pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The programs were pinned by an earlier run and adopted by this one.
    #[serde(default)]
    pub adopted: bool,
    #[serde(default)]
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub gateway_cgroup: PathBuf,
    pub gateway_cgroup_id: u64,
    pub exempt_uid: Option<u32>,
    pub netns: Option<PathBuf>,
    pub protected: Vec<SocketAddr>,
    pub guard: Vec<SocketAddr>,
    pub redirect4: Option<SocketAddr>,
    pub redirect6: Option<SocketAddr>,
    /// Ports only pgward may bind (the bind guard): its listener and redirect targets.
    #[serde(default)]
    pub bind_guard: Vec<u16>,
    /// Where the real Postgres said it listens (unix socket directories), checked at start.
    #[serde(default)]
    pub upstream_socket_dirs: Vec<PathBuf>,
    pub programs: Vec<ProgramState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramState {
    pub name: String,
    pub attach: String,
    pub target: PathBuf,
    pub id: u32,
}

/// What pgward learned about a redirected / steered client connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerMeta {
    /// The address the client dialled (e.g. 127.0.0.1:5432).
    pub original_dst: SocketAddr,
    /// `connect4`, `connect6` (a local process, redirected) or `sk_lookup` (another host).
    pub via: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// cgroup v2 path of the client (relative to the cgroup2 root), when it can be resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The client's command name (/proc/<pid>/comm at accept time; best effort).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

impl PeerMeta {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

struct PeerState {
    peers: BpfHashMap<MapData, PeerKey, ConnMeta>,
    listen_port: u16,
    cgroup_root: PathBuf,
    /// cgroup id -> path, as resolved (and checked) for an earlier login: a login from a
    /// known cgroup skips reading /proc/<pid>/cgroup and stat'ing the cgroup directory.
    cgroups: CgroupCache,
}

/// Resolved cgroup paths by id. Ids are not reused while the system runs; an entry is
/// trusted for `CGROUP_CACHE_TTL` (a cgroup directory can be renamed), and the cache is
/// emptied when it reaches `CGROUP_CACHE_MAX` entries.
#[derive(Default)]
struct CgroupCache {
    by_id: std::collections::HashMap<u64, (String, std::time::Instant)>,
}

const CGROUP_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(60);
const CGROUP_CACHE_MAX: usize = 4096;

impl CgroupCache {
    fn get(&self, id: u64) -> Option<String> {
        self.by_id.get(&id).filter(|(_, at)| at.elapsed() < CGROUP_CACHE_TTL).map(|(p, _)| p.clone())
    }

    fn put(&mut self, id: u64, path: &str) {
        if self.by_id.len() >= CGROUP_CACHE_MAX {
            self.by_id.clear();
        }
        self.by_id.insert(id, (path.to_owned(), std::time::Instant::now()));
    }
}

static PEERS: Mutex<Option<PeerState>> = Mutex::new(None);

/// Who is behind an accepted TCP connection, when interception brought it here: the original
/// destination, and for local clients their pid, uid, gid and cgroup. Consumes the kernel's
/// record, so call it once per accepted connection. None when interception is off or the
/// client dialled pgward directly.
pub fn lookup_peer(stream: &tokio::net::TcpStream) -> Option<PeerMeta> {
    let (local, peer) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
    let mut guard = PEERS.lock().unwrap_or_else(|e| e.into_inner());
    let st = guard.as_mut()?;
    if local.port() != st.listen_port {
        // Only sk_lookup delivers connections addressed to another port to our socket.
        return Some(PeerMeta {
            original_dst: local,
            via: "sk_lookup",
            pid: None,
            uid: None,
            gid: None,
            cgroup_id: None,
            cgroup: None,
            comm: None,
        });
    }
    let key = PeerKey {
        client_addr: ip_words(&mapped(peer.ip())),
        server_addr: ip_words(&mapped(local.ip())),
        client_port: peer.port() as u32,
        server_port: local.port() as u32,
    };
    let m = st.peers.get(&key, 0).ok()?;
    let _ = st.peers.remove(&key);
    let cached = st.cgroups.get(m.cgroup_id);
    let cgroup_root = st.cgroup_root.clone();
    drop(guard);
    let cgroup = cached.or_else(|| {
        let path = cgroup_path_of(m.pid, m.cgroup_id, &cgroup_root)?;
        if let Some(st) = PEERS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            st.cgroups.put(m.cgroup_id, &path);
        }
        Some(path)
    });
    let ip = if m.family == 4 {
        IpAddr::V4(Ipv4Addr::from(words_octets(&m.addr)[..4].try_into().unwrap_or([0; 4])))
    } else {
        IpAddr::V6(Ipv6Addr::from(words_octets(&m.addr)))
    };
    Some(PeerMeta {
        original_dst: SocketAddr::new(ip, m.port as u16),
        via: if m.via == 6 { "connect6" } else { "connect4" },
        pid: Some(m.pid),
        uid: Some(m.uid),
        gid: Some(m.gid),
        cgroup_id: Some(m.cgroup_id),
        cgroup,
        comm: process::comm(m.pid),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).with_context(|| format!("intercept: program {name} missing in the eBPF object"))?;
    p.try_into().with_context(|| format!("intercept: program {name} has an unexpected type"))
}

fn load_error(name: &str, hook: &str, ty: ProgramType, e: ProgramError) -> anyhow::Error {
    if let Ok(false) = aya::sys::is_program_supported(ty) {
        return anyhow!(
            "intercept: this kernel does not support {hook} programs ({ty:?}), needed for {name} \
             (Linux 5.10+ with CONFIG_CGROUP_BPF and CONFIG_BPF_SYSCALL)"
        );
    }
    if let ProgramError::LoadError { io_error, .. } = &e
        && io_error.raw_os_error() == Some(libc::EPERM)
    {
        return anyhow!("intercept: loading {name} ({hook}) was not permitted: pgward needs CAP_BPF (or CAP_SYS_ADMIN)");
    }
    anyhow!("intercept: the kernel rejected {name} ({hook}): {e}")
}

fn attach_error(name: &str, hook: &str, target: &Path, e: ProgramError) -> anyhow::Error {
    let errno = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|io| io.raw_os_error());
    match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(
            "intercept: attaching {name} to {} was not permitted: pgward needs CAP_NET_ADMIN (and CAP_BPF)",
            target.display()
        ),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => anyhow!(
            "intercept: the kernel cannot attach {hook} programs to {} ({e}); this attach type may be missing",
            target.display()
        ),
        _ => anyhow!("intercept: attaching {name} ({hook}) to {} failed: {e}", target.display()),
    }
}

// ---- capabilities, rlimit, kernel log -------------------------------------------------------

fn check_capabilities() -> anyhow::Result<()> {
    let Some(have) = caps::effective("self") else { return Ok(()) };
    let missing = caps::missing_for_ebpf(have);
    if !missing.is_empty() {
        bail!(
            "intercept: pgward lacks {} (needed to load and attach the eBPF programs); run it as \
             root, or grant them (systemd: AmbientCapabilities=CAP_BPF CAP_NET_ADMIN; or \
             setcap cap_bpf,cap_net_admin+ep), or set [intercept] enabled = false",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones use memcg accounting.
fn raise_memlock() {
    let rl = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        let e = std::io::Error::last_os_error();
        if aya::util::KernelVersion::current().is_ok_and(|v| v < aya::util::KernelVersion::new(5, 11, 0)) {
            tracing::warn!(error = %e, "intercept: cannot raise RLIMIT_MEMLOCK; loading may fail on this kernel");
        } else {
            tracing::debug!(error = %e, "intercept: cannot raise RLIMIT_MEMLOCK (harmless: memcg accounting)");
        }
    }
}

/// The most verbose level tracing wants from target `gateway_ebpf` (aya-log's numbering).
fn kernel_log_level() -> u8 {
    use tracing::Level;
    if tracing::enabled!(target: "gateway_ebpf", Level::TRACE) {
        5
    } else if tracing::enabled!(target: "gateway_ebpf", Level::DEBUG) {
        4
    } else if tracing::enabled!(target: "gateway_ebpf", Level::INFO) {
        3
    } else if tracing::enabled!(target: "gateway_ebpf", Level::WARN) {
        2
    } else {
        1
    }
}

/// Drain aya-log's ring buffer into `log` (bridged to tracing) continuously; `flush` is
/// `EbpfLogger::flush` (passed in: the logger's type names the `log` crate's trait).
fn start_kernel_log<L, E>(logger: Result<L, E>, flush: fn(&mut L)) -> Option<tokio::task::JoinHandle<()>>
where
    L: std::os::fd::AsRawFd + Send + 'static,
    E: std::fmt::Display,
{
    let logger = match logger {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "intercept: kernel log lines will not be shown");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd; flushing neither closes nor replaces it.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "intercept: kernel log lines will not be shown");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            flush(guard.get_inner_mut());
            guard.clear_ready();
        }
    }))
}

// ---- what to steer where ---------------------------------------------------------------------

/// Redirect targets and rules, computed from the config (pure, unit-tested).
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    protected: Vec<SocketAddr>,
    guard: Vec<SocketAddr>,
    redirect4: Option<SocketAddr>,
    redirect6: Option<SocketAddr>,
}

impl Plan {
    /// `found`: where the upstream said it listens (its TCP port is guarded too).
    fn new(cfg: &Config, listen: SocketAddr, found: Option<&discover::Found>) -> anyhow::Result<Plan> {
        let ic = &cfg.intercept;
        let parse = |s: &String| s.parse::<SocketAddr>().with_context(|| format!("intercept: {s:?} is not ADDR:PORT"));
        let protected = ic.protected.iter().map(parse).collect::<anyhow::Result<Vec<_>>>()?;
        let (d4, d6) = default_redirects(listen);
        let redirect4 = ic.redirect_to.as_ref().map(parse).transpose()?.or(d4);
        let redirect6 = ic.redirect_to6.as_ref().map(parse).transpose()?.or(d6);
        if let Some(r) = redirect4
            && !r.is_ipv4()
        {
            bail!("intercept.redirect_to must be an IPv4 ADDR:PORT, got {r}");
        }
        let guard = match &ic.guard {
            Some(g) => g.iter().map(parse).collect::<anyhow::Result<Vec<_>>>()?,
            None => default_guard(cfg, &local_addresses(), found),
        };
        let guard: Vec<SocketAddr> = guard.into_iter().filter(|g| !covers(&protected, g)).collect();
        if redirect4.is_none() && protected.iter().any(|p| p.is_ipv4()) {
            tracing::warn!("intercept: pgward has no IPv4 listener to redirect to; protected IPv4 connects will be refused");
        }
        Ok(Plan { protected, guard, redirect4, redirect6 })
    }

    fn rule_entries(&self) -> Vec<(RuleKey, u32)> {
        let mut out: Vec<(RuleKey, u32)> = Vec::new();
        for (list, action) in [(&self.guard, common::ACTION_REFUSE), (&self.protected, common::ACTION_REDIRECT)] {
            for a in list {
                let key = rule_key(a);
                out.retain(|(k, _)| *k != key); // protected wins over guard
                out.push((key, action));
            }
        }
        out
    }

    /// The bind guard's ports: where protected connects land (the redirect targets) and
    /// pgward's listener.
    fn bind_ports(&self, listen: SocketAddr) -> Vec<u16> {
        let mut out = vec![listen.port()];
        for p in [self.redirect4, self.redirect6].into_iter().flatten().map(|a| a.port()) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    fn kernel_config(&self, netns_cookie: u64, gateway_cgroup_id: u64, exempt_uid: Option<u32>) -> common::Config {
        let mut c = common::Config {
            host_netns_cookie: netns_cookie,
            gateway_cgroup_id,
            exempt_uid: exempt_uid.unwrap_or(common::NO_UID),
            ..Default::default()
        };
        if let Some(SocketAddr::V4(a)) = self.redirect4 {
            c.redirect4_ip = u32::from_ne_bytes(a.ip().octets());
            c.redirect4_port = a.port() as u32;
        }
        if let Some(a) = self.redirect6 {
            c.redirect6_ip = ip_words(&mapped(a.ip()));
            c.redirect6_port = a.port() as u32;
        }
        c
    }
}

/// pgward's listener as seen from IPv4 and IPv6 clients.
fn default_redirects(listen: SocketAddr) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let port = listen.port();
    match listen.ip() {
        IpAddr::V4(ip) => {
            let ip = if ip.is_unspecified() { Ipv4Addr::LOCALHOST } else { ip };
            (Some((ip, port).into()), Some((ip.to_ipv6_mapped(), port).into()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            (Some((Ipv4Addr::LOCALHOST, port).into()), Some((Ipv6Addr::LOCALHOST, port).into()))
        }
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => (Some((v4, port).into()), Some((ip, port).into())),
            None => (None, Some((ip, port).into())),
        },
    }
}

/// The real upstream: any address on its port when it is local (a local Postgres listening on
/// `*` is reachable through every local address), else exactly. With `found` (what the server
/// said): the port it really listens on, also when the configured upstream is a unix socket,
/// unless it listens on no TCP address at all.
fn default_guard(cfg: &Config, local: &[IpAddr], found: Option<&discover::Found>) -> Vec<SocketAddr> {
    let up = &cfg.upstream;
    let mut out = Vec::new();
    let mut push = |e: SocketAddr| {
        if !out.contains(&e) {
            out.push(e);
        }
    };
    let any = |port: u16| -> [SocketAddr; 2] { [(Ipv4Addr::UNSPECIFIED, port).into(), (Ipv6Addr::UNSPECIFIED, port).into()] };
    let listens_tcp = found.is_some_and(|f| !f.listen_addresses.is_empty());
    if up.host.starts_with('/') {
        // A unix-socket upstream is local: whatever TCP port it also has is guarded everywhere.
        if let Some(f) = found.filter(|_| listens_tcp) {
            any(f.port).into_iter().for_each(&mut push);
        }
        return out;
    }
    let addrs: Vec<SocketAddr> = match (up.host.as_str(), up.port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            tracing::warn!(host = %up.host, error = %e, "intercept: cannot resolve the upstream for the guard");
            return out;
        }
    };
    let ports: Vec<u16> = match found.filter(|_| listens_tcp) {
        Some(f) if f.port != up.port => vec![up.port, f.port],
        _ => vec![up.port],
    };
    for a in addrs {
        let ip = a.ip();
        for &port in &ports {
            if ip.is_loopback() || ip.is_unspecified() || local.contains(&ip) {
                any(port).into_iter().for_each(&mut push);
            } else {
                push(SocketAddr::new(ip, port));
            }
        }
    }
    out
}

/// Whether a protected entry already matches `a` (same port; same address or "any").
fn covers(protected: &[SocketAddr], a: &SocketAddr) -> bool {
    let k = rule_key(a);
    protected.iter().any(|p| {
        let pk = rule_key(p);
        pk.family == k.family && pk.port == k.port && (pk.addr == [0; 4] || pk.addr == k.addr)
    })
}

fn rule_key(a: &SocketAddr) -> RuleKey {
    let port = a.port() as u32;
    match a.ip() {
        IpAddr::V4(ip) => RuleKey { family: 4, port, addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0] },
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => RuleKey { family: 4, port, addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0] },
            None => RuleKey { family: 6, port, addr: ip_words(&ip) },
        },
    }
}

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// IPv6 address as four u32 words holding the network-order bytes (the kernel's layout).
fn ip_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

fn words_octets(w: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, x) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&x.to_ne_bytes());
    }
    o
}

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
fn local_addresses() -> Vec<IpAddr> {
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

fn netns_cookie(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the advertised length.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    (r == 0).then_some(cookie)
}

// ---- cgroups ---------------------------------------------------------------------------------

/// Where the cgroup2 (unified) hierarchy is mounted (/sys/fs/cgroup/unified on hybrid hosts).
fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    cgroup::cgroup2_mount()
        .context("intercept: reading /proc/self/mountinfo")?
        .context("intercept: no cgroup2 (unified) hierarchy is mounted")
}

fn require_cgroup2(dir: &Path) -> anyhow::Result<()> {
    let is_v2 = cgroup::is_cgroup2(dir).map_err(|e| anyhow!("intercept: cgroup {}: {e}", dir.display()))?;
    if !is_v2 {
        bail!("intercept: {} is not a cgroup v2 directory (set intercept.cgroup to one under the cgroup2 mount)", dir.display());
    }
    Ok(())
}

/// pgward's own cgroup: entered at start (created if needed), left at exit.
struct GatewayCgroup {
    path: PathBuf,
    id: u64,
    original: Option<PathBuf>,
    created: bool,
}

impl GatewayCgroup {
    fn enter(path: &Path, root: &Path) -> anyhow::Result<GatewayCgroup> {
        let original = cgroup::cgroup_of(std::process::id()).map(|p| root.join(p.trim_start_matches('/')));
        let created = !path.exists();
        if created {
            fs::create_dir(path).with_context(|| format!("intercept: creating gateway cgroup {}", path.display()))?;
        }
        let mut g = GatewayCgroup { path: path.to_owned(), id: 0, original, created };
        fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("intercept: moving pgward into {}", path.display()))?;
        g.id = fs::metadata(path)?.ino();
        Ok(g)
    }
}

impl Drop for GatewayCgroup {
    fn drop(&mut self) {
        if let Some(orig) = &self.original {
            let _ = fs::write(orig.join("cgroup.procs"), std::process::id().to_string());
        }
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// The client's cgroup path (relative to the cgroup2 root), checked against the kernel's id.
fn cgroup_path_of(pid: u32, id: u64, root: &Path) -> Option<String> {
    let rel = cgroup::cgroup_of(pid)?;
    let ino = fs::metadata(root.join(rel.trim_start_matches('/'))).ok()?.ino();
    (ino == id).then_some(rel)
}

fn write_state(path: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(state)?).with_context(|| format!("intercept: writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("intercept: writing {}", path.display()))?;
    Ok(())
}

// ---- pgward status ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct Status {
    pub enabled: bool,
    /// A `serve` process is serving with these programs (it wrote the state file, is alive,
    /// and has not stopped).
    pub running: bool,
    /// Where the programs are pinned, and whether anything is.
    pub pin_dir: PathBuf,
    pub pinned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    pub programs: Vec<ProgramStatus>,
    pub counters: Vec<CounterStatus>,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attach: String,
    pub target: PathBuf,
    pub id: u32,
    pub loaded: bool,
    pub attached: bool,
    /// Its link is pinned (it stays attached when pgward exits).
    pub pinned: bool,
}

#[derive(Debug, Serialize)]
pub struct CounterStatus {
    pub program: String,
    pub counter: String,
    pub value: u64,
}

/// The pinned programs (from bpffs), what `serve` recorded (its state file), whether it is
/// serving, and the live counters.
pub fn status(cfg: &Config) -> anyhow::Result<Status> {
    let pin_dir = pins::pin_dir(cfg);
    let pinned = pins::pinned_links(&pin_dir);
    let mut st = Status {
        enabled: cfg.intercept.enabled,
        running: false,
        pin_dir: pin_dir.clone(),
        pinned: !pinned.is_empty(),
        state: None,
        programs: vec![],
        counters: vec![],
    };
    let path = cfg.resolve(&cfg.intercept.state_file);
    let state: Option<State> = match fs::read(&path) {
        Ok(b) => Some(serde_json::from_slice(&b).with_context(|| format!("{} is not a pgward state file", path.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    st.running = state.as_ref().is_some_and(|s| s.stopped.is_none() && is_pgward_process(s.pid));
    let loaded: std::collections::HashMap<u32, aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p))
        .collect();
    let linked: BTreeSet<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.program_id()).collect();
    let recorded = |name: &str| state.as_ref().and_then(|s| s.programs.iter().find(|p| p.name == name));
    let mut names: Vec<(String, String)> = attach::expected_programs(true).into_iter().map(|(n, h)| (n.into(), h.into())).collect();
    names.retain(|(n, _)| pinned.iter().any(|p| p.name == *n) || recorded(n).is_some());
    for (name, hook) in names {
        let pin = pinned.iter().find(|p| p.name == name);
        let rec = recorded(&name);
        let id = pin.and_then(|p| p.program_id).or(rec.map(|r| r.id)).unwrap_or(0);
        let info = loaded.get(&id).filter(|i| i.name_as_str().is_some_and(|n| name.starts_with(n)));
        st.programs.push(ProgramStatus {
            name: name.clone(),
            attach: rec.map(|r| r.attach.clone()).unwrap_or(hook),
            target: rec.map(|r| r.target.clone()).unwrap_or_default(),
            id,
            loaded: info.is_some(),
            attached: info.is_some() && linked.contains(&id),
            pinned: pin.is_some(),
        });
    }
    if st.pinned
        && let Ok(data) = pins::open_map(&pin_dir, common::MAP_COUNTERS)
    {
        let arr: PerCpuArray<MapData, u64> = Map::PerCpuArray(data).try_into()?;
        for (i, (program, counter)) in common::COUNTER_NAMES.iter().enumerate() {
            let value = arr.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            st.counters.push(CounterStatus { program: program.to_string(), counter: counter.to_string(), value });
        }
    }
    st.state = state;
    Ok(st)
}

/// `pid` is alive and is a pgward (not a process that reused the pid of one that died).
fn is_pgward_process(pid: u32) -> bool {
    process::comm(pid).is_some_and(|c| c == PROCESS_NAME)
}
const PROCESS_NAME: &str = "pgward";

// ---- unix sockets ----------------------------------------------------------------------------

/// Refuses (or warns, per `intercept.unix_socket_check`) when a user other than root, pgward's
/// user and the socket's owner (Postgres's user) can connect to a real Postgres unix socket:
/// such a user would bypass pgward. The sockets: every directory the upstream said it uses
/// (`found`) and every configured one. Checks directory search and socket write permission
/// along the whole path, from mode bits and the users and groups NSS knows (not ACLs).
pub fn check_unix_sockets(cfg: &Config, found: Option<&discover::Found>) -> anyhow::Result<()> {
    let ic = &cfg.intercept;
    if ic.unix_socket_check == UnixSocketCheck::Off {
        return Ok(());
    }
    let mut socks: Vec<PathBuf> = match &ic.upstream_socket_dirs {
        Some(d) => d.iter().map(|p| cfg.resolve(p)).collect(),
        None if cfg.upstream.host.starts_with('/') => vec![PathBuf::from(&cfg.upstream.host)],
        None => Vec::new(),
    }
    .into_iter()
    .map(|d| d.join(format!(".s.PGSQL.{}", cfg.upstream.port)))
    .collect();
    if let Some(f) = found {
        for d in &f.socket_dirs {
            let s = d.join(format!(".s.PGSQL.{}", f.port));
            if !socks.contains(&s) {
                socks.push(s);
            }
        }
    }
    if cfg.server.unix_socket_dir.is_none() {
        tracing::warn!("intercept: server.unix_socket_dir is not set; clients using the default unix socket path do not reach pgward");
    }
    let mut users = Accounts::load_nss();
    let me = effective_uid();
    for sock in socks {
        let problem = match fs::symlink_metadata(&sock) {
            Err(e) => {
                tracing::warn!(socket = %sock.display(), error = %e, "intercept: the real Postgres socket is not there; cannot check who can reach it");
                continue;
            }
            Ok(m) => {
                for gid in reach::path_groups(&sock) {
                    users.add_group(gid);
                }
                let allowed = [0, me, m.uid()];
                reach::reachable_by_others(&sock, true, &allowed, &users)
            }
        };
        let Some(who) = problem else {
            tracing::info!(socket = %sock.display(), "intercept: the real Postgres socket is private");
            continue;
        };
        let msg = format!(
            "intercept: the real Postgres socket {} can be reached by {who}, bypassing pgward; \
             move it into a directory only pgward's user can enter (e.g. mode 0700 or 0750 with a \
             group of pgward only)",
            sock.display()
        );
        match ic.unix_socket_check {
            UnixSocketCheck::Refuse => bail!("{msg} (intercept.unix_socket_check = \"refuse\")"),
            _ => tracing::warn!("{msg}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:6432"
tls_cert = "c.pem"
tls_key = "k.pem"
[upstream]
host = "127.0.0.1"
port = 5433
user = "svc"
[auth]
issuer = "i"
audience = "a"
jwks = "j"
signing_key = "k"
signing_kid = "kid"
[audit]
dir = "audit"
{extra}
"#
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn cgroup_cache_remembers_paths_and_empties_when_full() {
        let mut c = CgroupCache::default();
        assert_eq!(c.get(7), None);
        c.put(7, "/svc/app");
        assert_eq!(c.get(7).as_deref(), Some("/svc/app"));
        for id in 0..CGROUP_CACHE_MAX as u64 {
            c.put(1000 + id, "/other");
        }
        assert!(c.by_id.len() < CGROUP_CACHE_MAX, "bounded: {}", c.by_id.len());
        assert_eq!(c.get(7), None, "emptied when it filled up");
    }

    #[test]
    fn config_without_intercept_section_loads_with_defaults() {
        let c = cfg("");
        assert!(!c.intercept.enabled);
        assert_eq!(c.intercept.protected, ["0.0.0.0:5432", "[::]:5432"]);
        assert!(!c.to_toml().contains("[intercept]"), "default section is not written");
        let c = cfg("[intercept]\nenabled = true\n");
        assert!(c.intercept.enabled && c.to_toml().contains("[intercept]"));
    }

    #[test]
    fn redirect_targets_follow_the_listener() {
        let p = |s: &str| default_redirects(s.parse().unwrap());
        assert_eq!(p("127.0.0.1:6432"), (Some("127.0.0.1:6432".parse().unwrap()), Some("[::ffff:127.0.0.1]:6432".parse().unwrap())));
        assert_eq!(p("0.0.0.0:6432").0, Some("127.0.0.1:6432".parse().unwrap()));
        assert_eq!(p("[::]:6432"), (Some("127.0.0.1:6432".parse().unwrap()), Some("[::1]:6432".parse().unwrap())));
        assert_eq!(p("[::1]:6432"), (None, Some("[::1]:6432".parse().unwrap())));
    }

    #[test]
    fn guard_defaults_to_the_local_upstream_port_on_any_address() {
        let c = cfg("[intercept]\nenabled = true\n");
        let plan = Plan::new(&c, "127.0.0.1:6432".parse().unwrap(), None).unwrap();
        assert_eq!(plan.guard, ["0.0.0.0:5433".parse::<SocketAddr>().unwrap(), "[::]:5433".parse().unwrap()]);
        let rules = plan.rule_entries();
        assert_eq!(rules.len(), 4);
        let any5432 = RuleKey { family: 4, port: 5432, addr: [0; 4] };
        assert!(rules.contains(&(any5432, common::ACTION_REDIRECT)));
        assert!(rules.contains(&(RuleKey { family: 6, port: 5433, addr: [0; 4] }, common::ACTION_REFUSE)));
    }

    #[test]
    fn upstream_on_a_protected_port_is_not_guarded() {
        // The in-place layout: Postgres stays on the protected port; pgward is exempt.
        let mut c = cfg("[intercept]\nenabled = true\nprotected = [\"0.0.0.0:5433\", \"[::]:5433\"]\n");
        c.upstream.port = 5433;
        let plan = Plan::new(&c, "127.0.0.1:6432".parse().unwrap(), None).unwrap();
        assert!(plan.guard.is_empty(), "{:?}", plan.guard);
        c.upstream.host = "/var/run/postgresql".into();
        assert!(default_guard(&c, &[], None).is_empty());
        // ...but a TCP port the server says it listens on is guarded even then.
        let found = discover::Found { socket_dirs: vec![], listen_addresses: vec!["*".into()], port: 5499 };
        assert_eq!(default_guard(&c, &[], Some(&found)), ["0.0.0.0:5499".parse::<SocketAddr>().unwrap(), "[::]:5499".parse().unwrap()]);
        let no_tcp = discover::Found { listen_addresses: vec![], ..found };
        assert!(default_guard(&c, &[], Some(&no_tcp)).is_empty());
    }

    #[test]
    fn bind_guard_covers_the_listener_and_the_redirect_targets() {
        let c = cfg("[intercept]\nenabled = true\n");
        let listen: SocketAddr = "127.0.0.1:6432".parse().unwrap();
        assert_eq!(Plan::new(&c, listen, None).unwrap().bind_ports(listen), [6432]);
        let c = cfg("[intercept]\nenabled = true\nredirect_to = \"127.0.0.1:7000\"\n");
        assert_eq!(Plan::new(&c, listen, None).unwrap().bind_ports(listen), [6432, 7000]);
    }

    #[test]
    fn ephemeral_range_and_reserved_ports() {
        let ports = [80, 6432, 40000, 40001, 61000];
        assert_eq!(in_ephemeral_range(&ports, "32768\t60999\n", "\n"), [40000, 40001]);
        assert_eq!(in_ephemeral_range(&ports, "32768\t60999\n", "40000\n"), [40001]);
        assert_eq!(in_ephemeral_range(&ports, "32768\t60999\n", "8080,39990-40005\n"), Vec::<u16>::new());
        assert_eq!(in_ephemeral_range(&ports, "1024 65535", ""), [6432, 40000, 40001, 61000]);
        assert_eq!(in_ephemeral_range(&ports, "", ""), Vec::<u16>::new());
    }

    #[test]
    fn rule_keys_use_kernel_byte_order() {
        let k = rule_key(&"127.0.0.1:5432".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port, 5432);
        // v4-mapped IPv6 destinations are IPv4 rules.
        assert_eq!(rule_key(&"[::ffff:127.0.0.1]:5432".parse().unwrap()), k);
        let k6 = rule_key(&"[fd00::2]:5432".parse().unwrap());
        assert_eq!((k6.family, words_octets(&k6.addr)), (6, "fd00::2".parse::<Ipv6Addr>().unwrap().octets()));
        let c = Plan { protected: vec![], guard: vec![], redirect4: Some("127.0.0.1:6432".parse().unwrap()), redirect6: Some("[::ffff:127.0.0.1]:6432".parse().unwrap()) }
            .kernel_config(7, 9, None);
        assert_eq!((c.redirect4_ip.to_ne_bytes(), c.redirect4_port, c.exempt_uid), ([127, 0, 0, 1], 6432, common::NO_UID));
        assert_eq!(words_octets(&c.redirect6_ip)[10..], [0xff, 0xff, 127, 0, 0, 1]);
    }
}
