//! Shared by the interception tests (tests/intercept.rs, tests/intercept_lifecycle.rs; included
//! with `#[path]`, not a test binary of its own).
//!
//! - [`TestCgroup`]: a child cgroup `/sys/fs/cgroup/unified/pgwt-<name>-<pid>-<n>` the test's
//!   pgward attaches to. Only the test's own client processes are moved in (before they create
//!   sockets: [`Client`] joins it in `pre_exec`). Never the root cgroup. Removed on Drop (also
//!   when the test panics), children first; cgroup removal also detaches anything attached.
//! - [`Netns`]: a network namespace with a veth pair (10.213.<k>.1 host side, .2 inside) for
//!   "remote" clients; deleted on Drop.
//! - [`Client`]: runs this test binary again as a client process (`intercept_helper` test with
//!   `PGWARD_ICPT_JOB` set) inside a cgroup and/or namespace; the job's JSON result comes back on
//!   stdout. Each test binary must define `#[test] fn intercept_helper() { support::helper_main() }`.
//! - [`intercepting`]: a pgward with `[intercept]` on, attached to the test's cgroup.

#![allow(dead_code)]

use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::raw::{Msg, RawConn, fe};
use crate::common::{CmdOut, Login, Pgward, run_cmd, toml_set};

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
static SEQ: AtomicU32 = AtomicU32::new(0);

fn seq() -> u32 {
    SEQ.fetch_add(1, Ordering::SeqCst)
}

// ---- cgroup ----------------------------------------------------------------------------------

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    #[track_caller]
    pub fn new(name: &str) -> TestCgroup {
        let root = Path::new(CGROUP2_ROOT);
        assert!(
            root.join("cgroup.procs").exists(),
            "cgroup v2 is not mounted at {CGROUP2_ROOT} (the interception tests need it, and root)"
        );
        let path = root.join(format!("pgwt-{name}-{}-{}", std::process::id(), seq()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
    /// "/pgwt-…" as /proc/<pid>/cgroup shows it.
    pub fn rel(&self) -> String {
        format!("/{}", self.path.file_name().unwrap().to_string_lossy())
    }
    /// pgward's own cgroup below this one (the default `intercept.gateway_cgroup`).
    pub fn gateway(&self) -> PathBuf {
        self.path.join("pgward-gateway")
    }
}

/// rmdir `dir` and its child cgroups, depth first. Processes still inside (only ever the test's
/// own, or its pgward when it was killed before cleaning up) are moved to the root cgroup first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("warning: could not remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.split_whitespace() {
                    let _ = std::fs::write(Path::new(CGROUP2_ROOT).join("cgroup.procs"), pid);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

// ---- network namespace -----------------------------------------------------------------------

pub struct Netns {
    pub name: String,
    host_if: String,
    /// Host side of the veth pair (what the remote client dials).
    pub host_ip: IpAddr,
    /// The client's address inside the namespace.
    pub ns_ip: IpAddr,
}

fn ip(args: &[&str]) -> CmdOut {
    run_cmd(Command::new("ip").args(args), None, Duration::from_secs(20))
}

impl Netns {
    #[track_caller]
    pub fn new() -> Netns {
        let k = (std::process::id() as u32 * 7 + seq()) % 250 + 1;
        let tag = format!("{:x}", (std::process::id() << 8) ^ seq());
        let name = format!("pgwt-ns-{tag}");
        let host_if = format!("pgh{}", &tag[tag.len().saturating_sub(8)..]);
        let ns_if = format!("pgn{}", &tag[tag.len().saturating_sub(8)..]);
        let (host_ip, ns_ip) = (format!("10.213.{k}.1"), format!("10.213.{k}.2"));
        let n = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: host_ip.parse().unwrap(), ns_ip: ns_ip.parse().unwrap() };
        for args in [
            vec!["netns", "add", &name],
            vec!["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if],
            vec!["link", "set", &ns_if, "netns", &name],
            vec!["addr", "add", &format!("{host_ip}/24"), "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec!["netns", "exec", &name, "ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if],
            vec!["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"],
            vec!["netns", "exec", &name, "ip", "link", "set", "lo", "up"],
        ] {
            let out = ip(&args);
            assert!(out.success(), "setting up netns {name}: {}", out.describe());
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]); // normally gone with its peer
    }
}

/// The host's first global IPv4 address that is not one of the tests' veths.
#[track_caller]
pub fn host_ipv4() -> IpAddr {
    let out = ip(&["-4", "-o", "addr", "show", "scope", "global"]);
    out.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next()?.parse::<IpAddr>().ok())
        .find(|a| !a.to_string().starts_with("10.213."))
        .unwrap_or_else(|| panic!("this host has no global IPv4 address to test with:\n{}", out.describe()))
}

// ---- client processes ------------------------------------------------------------------------

/// What a client process does (serialized into `PGWARD_ICPT_JOB`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// TCP connect; reports errno, getpeername and getsockname. With `mptcp`, the socket is
    /// `socket(AF_INET[6], SOCK_STREAM, IPPROTO_MPTCP)`.
    Connect {
        addr: SocketAddr,
        #[serde(default)]
        mptcp: bool,
    },
    /// Startup + password; reports the authentication requests seen, the error's SQLSTATE, and
    /// with `query`, its rows.
    Login { addr: SocketAddr, user: String, password: String, db: String, query: Option<String> },
    /// An attacker squatting on a port: drops to `uid` (and its gid) first when set, then for
    /// each address a socket (`mptcp`: IPPROTO_MPTCP; `reuseport`: SO_REUSEPORT) is bound and
    /// listens; reports each bind's errno (`binds`, None = bound), prints `ICPT-BOUND`, then
    /// accepts on what it holds for `wait_ms` (`accepted`).
    Squat {
        addrs: Vec<SocketAddr>,
        #[serde(default)]
        reuseport: bool,
        #[serde(default)]
        mptcp: bool,
        uid: Option<u32>,
        #[serde(default)]
        wait_ms: u64,
    },
    /// TCP Fast Open: `sendto(MSG_FASTOPEN)` on an unconnected socket carries a StartupMessage
    /// in the SYN (connect and send in one call); reports errno, getpeername and the first
    /// authentication request code the server answers with (`auth`).
    FastOpen { addr: SocketAddr },
    /// An attacker asking the kernel for `port` as an ephemeral port: drops to `uid` first,
    /// then for each of IPv4 and IPv6 a socket narrowed to that one port (`IP_LOCAL_PORT_RANGE`)
    /// that `bind`s to the wildcard with port 0 and listens (`listen_unbound`: listens without
    /// binding, so the kernel binds it). Reports each socket's errno (`binds`) and the port it got
    /// (`local`, the last one), prints `ICPT-BOUND`, then accepts for `wait_ms` (`accepted`).
    EphemeralSquat {
        port: u16,
        #[serde(default)]
        listen_unbound: bool,
        uid: Option<u32>,
        #[serde(default)]
        wait_ms: u64,
    },
}

/// The job's outcome (`errno` set when the connect failed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub pid: u32,
    pub errno: Option<i32>,
    pub peer: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// Authentication request codes in order (3 = cleartext: what pgward asks; 10 = SASL).
    pub auth: Vec<i32>,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub ready: bool,
    pub rows: Vec<Vec<Option<String>>>,
    pub failure: Option<String>,
    /// Squat: errno of each bind (None: bound and listening), connections accepted.
    #[serde(default)]
    pub binds: Vec<Option<i32>>,
    #[serde(default)]
    pub accepted: u32,
}

pub struct Client<'a> {
    cgroup: Option<&'a TestCgroup>,
    netns: Option<&'a Netns>,
}

impl<'a> Client<'a> {
    pub fn in_cgroup(cg: &'a TestCgroup) -> Self {
        Client { cgroup: Some(cg), netns: None }
    }
    pub fn outside() -> Self {
        Client { cgroup: None, netns: None }
    }
    pub fn in_netns(mut self, ns: &'a Netns) -> Self {
        self.netns = Some(ns);
        self
    }

    /// `cmd` with the cgroup join (before exec, so before any socket exists) and the netns.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = match self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, program]);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args);
        let procs = self.cgroup.map(|c| CString::new(c.procs().to_string_lossy().into_owned()).unwrap());
        // SAFETY: only async-signal-safe calls (open, write, close, prctl) on prepared data.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(p) = &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if r != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    #[track_caller]
    pub fn run(&self, job: &Job) -> Outcome {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = self.command(
            &exe.to_string_lossy(),
            &["--exact", "intercept_helper", "--nocapture", "--test-threads=1", "-q"],
        );
        cmd.env("PGWARD_ICPT_JOB", serde_json::to_string(job).unwrap());
        let out = run_cmd(&mut cmd, None, Duration::from_secs(60));
        let line = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("ICPT-RESULT "))
            .unwrap_or_else(|| panic!("client process printed no result for {job:?}: {}", out.describe()));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad client result {line}: {e}"))
    }

    /// Start a job without waiting for it (e.g. a [`Job::Squat`]); its stdout is piped.
    pub fn spawn(&self, job: &Job) -> std::process::Child {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = self.command(
            &exe.to_string_lossy(),
            &["--exact", "intercept_helper", "--nocapture", "--test-threads=1", "-q"],
        );
        cmd.env("PGWARD_ICPT_JOB", serde_json::to_string(job).unwrap())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        cmd.spawn().unwrap_or_else(|e| panic!("spawning a client job: {e}"))
    }

    #[track_caller]
    pub fn connect(&self, addr: SocketAddr) -> Outcome {
        self.run(&Job::Connect { addr, mptcp: false })
    }

    #[track_caller]
    pub fn connect_mptcp(&self, addr: SocketAddr) -> Outcome {
        self.run(&Job::Connect { addr, mptcp: true })
    }

    /// A psql session as the service role, straight to the real Postgres over TCP with the
    /// service password (what an attacker holding it would open), running `pg_sleep` with
    /// `application_name = app`. Returns the running child (killed on drop by the caller).
    pub fn hold_session(&self, addr: SocketAddr, user: &str, password: &str, db: &str, app: &str) -> std::process::Child {
        self.hold_session_at(&addr.ip().to_string(), addr.port(), user, password, db, app)
    }

    /// [`Self::hold_session`] with a libpq `host` (an address, or a unix socket directory).
    pub fn hold_session_at(&self, host: &str, port: u16, user: &str, password: &str, db: &str, app: &str) -> std::process::Child {
        let mut cmd = self.command(&crate::common::clients::psql_bin(), &["-X", "-At", "-w", "-c", "select pg_sleep(300)", "-d"]);
        crate::common::scrub_pg_env(&mut cmd)
            .env("PGPASSWORD", password)
            .arg(format!("host={host} port={port} user={user} dbname={db} application_name={app} sslmode=disable"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap_or_else(|e| panic!("spawning psql: {e}"))
    }

    #[track_caller]
    pub fn login(&self, addr: SocketAddr, user: &str, password: &str, db: &str, query: Option<&str>) -> Outcome {
        self.run(&Job::Login {
            addr,
            user: user.into(),
            password: password.into(),
            db: db.into(),
            query: query.map(Into::into),
        })
    }
}

/// Body of each binary's `intercept_helper` test: a no-op unless `PGWARD_ICPT_JOB` is set.
pub fn helper_main() {
    let Ok(job) = std::env::var("PGWARD_ICPT_JOB") else { return };
    let job: Job = serde_json::from_str(&job).expect("PGWARD_ICPT_JOB is a Job");
    let mut o = Outcome { pid: std::process::id(), ..Default::default() };
    match job {
        Job::Connect { addr, mptcp: false } => match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => {
                o.peer = s.peer_addr().ok();
                o.local = s.local_addr().ok();
            }
            Err(e) => o.errno = e.raw_os_error(),
        },
        Job::Connect { addr, mptcp: true } => match mptcp_connect(addr) {
            Ok(s) => {
                o.peer = s.peer_addr().ok();
                o.local = s.local_addr().ok();
            }
            Err(e) => o.errno = e.raw_os_error(),
        },
        Job::Login { addr, user, password, db, query } => login_job(&mut o, addr, &user, &password, &db, query.as_deref()),
        Job::Squat { addrs, reuseport, mptcp, uid, wait_ms } => squat_job(&mut o, &addrs, reuseport, mptcp, uid, wait_ms),
        Job::FastOpen { addr } => fast_open_job(&mut o, addr),
        Job::EphemeralSquat { port, listen_unbound, uid, wait_ms } => ephemeral_squat_job(&mut o, port, listen_unbound, uid, wait_ms),
    }
    println!("ICPT-RESULT {}", serde_json::to_string(&o).unwrap());
}

/// A blocking MPTCP connect (the kernel's IPPROTO_MPTCP socket), as a TcpStream.
fn mptcp_connect(addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    const IPPROTO_MPTCP: libc::c_int = 262;
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2); the fd is owned by the TcpStream at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, IPPROTO_MPTCP) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: connect(2) with a sockaddr of the given length.
    if unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s)
}

/// Become `uid` (and gid `uid`, no supplementary groups); false (with `o.failure` set and
/// `ICPT-BOUND` printed, so a waiting test goes on) when that fails.
fn drop_to(o: &mut Outcome, uid: Option<u32>) -> bool {
    let Some(uid) = uid else { return true };
    // SAFETY: plain syscalls dropping this (single-threaded helper) process's privileges.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0 && libc::setresgid(uid, uid, uid) == 0 && libc::setresuid(uid, uid, uid) == 0
    };
    if !ok || unsafe { libc::geteuid() } != uid {
        o.failure = Some(format!("could not become uid {uid}: {}", std::io::Error::last_os_error()));
        println!("ICPT-BOUND");
        return false;
    }
    true
}

/// Print `ICPT-BOUND`, then accept (and close) connections on `held` for `wait_ms`.
fn accept_for(o: &mut Outcome, held: &[std::os::fd::OwnedFd], wait_ms: u64) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    println!("ICPT-BOUND");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    while Instant::now() < deadline {
        for fd in held {
            // SAFETY: accept(2) on a non-blocking listening socket; a returned fd is closed.
            let c = unsafe { libc::accept(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
            if c >= 0 {
                o.accepted += 1;
                unsafe { libc::close(c) };
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fast_open_job(o: &mut Outcome, addr: SocketAddr) {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        o.errno = std::io::Error::last_os_error().raw_os_error();
        return;
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let startup = crate::common::raw::fe::startup(&[("user", "tfo"), ("database", "tfo")]);
    let (storage, len) = sockaddr(addr);
    // SAFETY: sendto(2) of a buffer of the given length to a sockaddr of the given length.
    let n = unsafe {
        libc::sendto(fd.as_raw_fd(), startup.as_ptr().cast(), startup.len(), libc::MSG_FASTOPEN, (&storage as *const libc::sockaddr_storage).cast(), len)
    };
    if n < 0 {
        o.errno = std::io::Error::last_os_error().raw_os_error();
        return;
    }
    let mut s = unsafe { std::net::TcpStream::from_raw_fd(fd.into_raw_fd()) };
    o.peer = s.peer_addr().ok();
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = [0u8; 9];
    match s.read_exact(&mut head) {
        Ok(()) if head[0] == b'R' => o.auth.push(i32::from_be_bytes(head[5..9].try_into().unwrap())),
        Ok(()) => o.failure = Some(format!("first message {:?}", head[0] as char)),
        Err(e) => o.failure = Some(e.to_string()),
    }
}

/// `IP_LOCAL_PORT_RANGE` (Linux 6.3): the socket's own ephemeral range, low | high << 16.
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

fn ephemeral_squat_job(o: &mut Outcome, port: u16, listen_unbound: bool, uid: Option<u32>, wait_ms: u64) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if !drop_to(o, uid) {
        return;
    }
    let mut held: Vec<OwnedFd> = Vec::new();
    for any in [SocketAddr::from(([0, 0, 0, 0], 0)), SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))] {
        let family = if any.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
        if fd < 0 {
            o.binds.push(std::io::Error::last_os_error().raw_os_error());
            continue;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let range: u32 = u32::from(port) | (u32::from(port) << 16);
        let (storage, len) = sockaddr(any);
        // SAFETY: setsockopt with a u32 option of the advertised length; bind(2) with a
        // sockaddr of the given length; listen(2).
        let ok = unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::IPPROTO_IP, IP_LOCAL_PORT_RANGE, (&range as *const u32).cast(), 4) == 0
                && (listen_unbound || libc::bind(fd.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len) == 0)
                && libc::listen(fd.as_raw_fd(), 16) == 0
        };
        if !ok {
            o.binds.push(std::io::Error::last_os_error().raw_os_error());
            continue;
        }
        o.binds.push(None);
        o.local = local_addr(fd.as_raw_fd());
        held.push(fd);
    }
    accept_for(o, &held, wait_ms);
}

/// getsockname(2) as a SocketAddr.
fn local_addr(fd: std::os::fd::RawFd) -> Option<SocketAddr> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // Borrow the fd as a listener just long enough to ask; never close it here.
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let a = l.local_addr().ok();
    let _ = l.into_raw_fd();
    a
}

fn squat_job(o: &mut Outcome, addrs: &[SocketAddr], reuseport: bool, mptcp: bool, uid: Option<u32>, wait_ms: u64) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if !drop_to(o, uid) {
        return;
    }
    let mut held: Vec<OwnedFd> = Vec::new();
    for &addr in addrs {
        let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let proto = if mptcp { 262 } else { 0 };
        // SAFETY: socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, proto) };
        if fd < 0 {
            o.binds.push(std::io::Error::last_os_error().raw_os_error());
            continue;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        let opt = if reuseport { libc::SO_REUSEPORT } else { libc::SO_REUSEADDR };
        // SAFETY: setsockopt with an int option of the advertised length.
        unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&one as *const libc::c_int).cast(), 4) };
        let (storage, len) = sockaddr(addr);
        // SAFETY: bind(2) / listen(2) with a sockaddr of the given length.
        let r = unsafe { libc::bind(fd.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len) };
        if r != 0 || unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            o.binds.push(std::io::Error::last_os_error().raw_os_error());
            continue;
        }
        o.binds.push(None);
        held.push(fd);
    }
    accept_for(o, &held, wait_ms);
}

/// Wait for a spawned [`Job::Squat`] to hold (or fail to hold) its sockets.
#[track_caller]
pub fn wait_bound(child: &mut std::process::Child) {
    use std::io::Read;
    // Byte by byte: nothing after the marker may be swallowed (the result line follows).
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = out.read(&mut b).unwrap();
        assert!(n > 0, "the squatter ended before binding: {}", String::from_utf8_lossy(&line));
        if b[0] != b'\n' {
            line.push(b[0]);
            continue;
        }
        if line.starts_with(b"ICPT-BOUND") {
            return;
        }
        line.clear();
    }
}

/// The result of a spawned job, once it has ended.
#[track_caller]
pub fn job_result(child: std::process::Child) -> Outcome {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("ICPT-RESULT ")).unwrap_or_else(|| panic!("no result: {text}"));
    serde_json::from_str(line).unwrap()
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family-specific view is filled in.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            (ss, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn login_job(o: &mut Outcome, addr: SocketAddr, user: &str, password: &str, db: &str, query: Option<&str>) {
    let host = match addr.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let login = Login::new(&host, addr.port(), user, Some(password), db);
    let mut c = match RawConn::open(&login) {
        Ok(c) => c,
        Err(e) => {
            o.errno = e.raw_os_error();
            o.failure = Some(e.to_string());
            return;
        }
    };
    o.local = c.local_addr;
    let mut step = || -> std::io::Result<Option<Msg>> {
        c.send(&fe::startup(&[("user", user), ("database", db)]))?;
        loop {
            let m = c.recv()?;
            match m.tag {
                b'R' => {
                    let code = i32::from_be_bytes(m.body[..4].try_into().unwrap());
                    if code != 0 {
                        o.auth.push(code);
                    }
                    match code {
                        0 => {}
                        3 => c.send(&fe::password(password))?,
                        _ => return Ok(None), // not pgward's cleartext request: stop here
                    }
                }
                b'E' => return Ok(Some(m)),
                b'Z' => break,
                _ => {}
            }
        }
        o.ready = true;
        if let Some(q) = query {
            let msgs = c.simple_query(q)?;
            if let Some(e) = msgs.iter().find(|m| m.is_error()) {
                return Ok(Some(e.clone()));
            }
            o.rows = crate::common::raw::rows(&msgs);
        }
        Ok(None)
    };
    match step() {
        Ok(Some(err)) => {
            let f = err.fields();
            o.sqlstate = f.get(&'C').cloned();
            o.message = f.get(&'M').cloned();
        }
        Ok(None) => {}
        Err(e) => o.failure = Some(e.to_string()),
    }
}

// ---- pgward with interception ----------------------------------------------------------------

/// `0.0.0.0:PORT` and `[::]:PORT`: every address of both families.
pub fn any_port(port: u16) -> Vec<String> {
    vec![format!("0.0.0.0:{port}"), format!("[::]:{port}")]
}

/// Lowest port [`port_outside_ephemeral`] picks (above the well-known and common service ports).
const OWN_PORTS_FROM: u16 = 20000;

/// A free loopback port below the host's ephemeral range (`net.ipv4.ip_local_port_range`).
/// `serve` with interception reserves its port in `net.ipv4.ip_local_reserved_ports` when the
/// kernel could hand it out; a port outside the range needs no reservation, so tests that run
/// pgward in the host's network namespace leave the host's sysctls alone.
#[track_caller]
pub fn port_outside_ephemeral() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let lo: u16 = range.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or(0);
    assert!(lo > OWN_PORTS_FROM + 1000, "the ephemeral range {range:?} leaves no room below it for test ports");
    for _ in 0..1000 {
        let r = u16::from_str_radix(&crate::common::rand_hex(4), 16).unwrap_or(0);
        let p = OWN_PORTS_FROM + r % (lo - OWN_PORTS_FROM);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port below the ephemeral range {range:?}");
}

/// The config edit for `[intercept]` on, attached to `cg`, steering `protected`, sk_lookup off
/// (it is per network namespace: tests running in parallel must not overlap in what it matches).
/// pgward listens on a port outside the ephemeral range ([`port_outside_ephemeral`]).
pub fn intercept_settings(cg: &TestCgroup, protected: Vec<String>) -> impl FnOnce(&mut toml::Table) + 'static {
    let cg = cg.path.display().to_string();
    let listen = format!("127.0.0.1:{}", port_outside_ephemeral());
    move |t| {
        toml_set(t, "server.listen", listen);
        toml_set(t, "intercept.enabled", true);
        toml_set(t, "intercept.cgroup", cg);
        toml_set(t, "intercept.protected", protected);
        toml_set(t, "intercept.sk_lookup", false);
    }
}

/// A pgward in front of the shared cluster with `[intercept]` on, attached to `cg`, steering
/// `protected`; sk_lookup off unless the edit turns it on (it is per network namespace, so
/// tests running in parallel must not overlap in what it matches).
pub fn intercepting(cg: &TestCgroup, protected: Vec<String>, edit: impl FnOnce(&mut toml::Table) + 'static) -> Pgward {
    let on = intercept_settings(cg, protected);
    let pw = Pgward::builder()
        .config(move |t| {
            on(t);
            edit(t);
        })
        .start();
    wait_attached(&pw);
    pw
}

/// `serve` listens before it attaches (sk_lookup needs the listening socket); the state file
/// is written once every program is attached.
#[track_caller]
pub fn wait_attached(pw: &Pgward) {
    let p = pw.dir.join("intercept.state.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        if Instant::now() > deadline {
            panic!("pgward never attached its programs:\n{}", pw.stderr_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pgward's state file (what `serve` attached), parsed.
pub fn state(pw: &Pgward) -> Value {
    let p = pw.dir.join("intercept.state.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// `pgward status --json` → (exit code, parsed output).
#[track_caller]
pub fn status(pw: &Pgward) -> (i32, Value) {
    let out = crate::common::pgward_cli(&["status".as_ref(), "--config".as_ref(), pw.config_path.as_os_str(), "--json".as_ref()] as &[&std::ffi::OsStr]);
    let v = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", out.describe()));
    (out.code.unwrap_or(-1), v)
}

/// A counter from `pgward status --json`.
#[track_caller]
pub fn counter(pw: &Pgward, program: &str, name: &str) -> u64 {
    let (_, v) = status(pw);
    v["counters"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["program"] == program && c["counter"] == name))
        .and_then(|c| c["value"].as_u64())
        .unwrap_or_else(|| panic!("no counter {program}/{name} in {v}"))
}

/// `pgward intercept detach --config …` (serve must be stopped).
#[track_caller]
pub fn detach(pw: &Pgward) -> CmdOut {
    crate::common::pgward_cli(&[
        "intercept".as_ref(),
        "detach".as_ref(),
        "--reason".as_ref(),
        "test".as_ref(),
        "--config".as_ref(),
        pw.config_path.as_os_str(),
    ] as &[&std::ffi::OsStr])
}

/// Whether anything is pinned for this gateway (`pgward status --json`).
pub fn pinned_anything(pw: &Pgward) -> bool {
    status(pw).1["pinned"] == true
}

/// Wait for a child process to exit (bounded; killed if it does not).
#[track_caller]
pub fn wait_child(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("the child process did not exit within {timeout:?} ({st:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a bpf program with this id is still loaded in the kernel.
pub fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs().filter_map(Result::ok).any(|p| p.id() == id)
}

/// Wait until pgward's stderr contains `needle` (logs are written asynchronously).
#[track_caller]
pub fn wait_log(pw: &Pgward, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = pw.stderr_log();
        if log.contains(needle) {
            return log;
        }
        if Instant::now() > deadline {
            panic!("pgward's log never contained {needle:?}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
