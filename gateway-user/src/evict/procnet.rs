//! Who is on the other end of a Postgres backend's client socket, from /proc: the backend's
//! socket fds, the TCP tables of its network namespace, and for unix sockets the peer's
//! credentials (SO_PEERCRED on a duplicate of the backend's fd, via pidfd_getfd; root only).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// TCP_ESTABLISHED in /proc/net/tcp's `st` column.
const TCP_ESTABLISHED: &str = "01";

/// The far end of a backend's client connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Peer {
    /// Local processes (found by their socket: every process holding the client's end, which
    /// may have been passed on or duplicated; for a unix socket the one that connected), and
    /// how they reached Postgres. Never empty.
    Local { pids: Vec<u32>, addr: Option<SocketAddr> },
    /// A TCP client that is not a socket of this host's namespace (another host, a container).
    Remote { addr: SocketAddr },
}

/// One row of /proc/<pid>/net/tcp{,6}.
#[derive(Debug, Clone, Copy)]
struct TcpRow {
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
}

/// What a Postgres backend's /proc/<pid>/comm says (its process title is in cmdline).
const BACKEND_COMM: &str = "postgres";

/// The client of backend `pid`, if it can be found. None also when /proc/<pid> is not a
/// Postgres backend listening on `port` (e.g. Postgres in another pid namespace).
pub fn backend_peer(pid: u32, port: u16) -> Option<Peer> {
    if crate::host::process::comm(pid)? != BACKEND_COMM {
        return None;
    }
    let socks = socket_inodes(pid);
    if socks.is_empty() {
        return None;
    }
    let rows = tcp_rows(pid);
    if let Some(mine) = rows.iter().find(|r| socks.contains_key(&r.inode)) {
        if mine.local.port() != port {
            return None;
        }
        // The client's socket: local and remote swapped, in the same table.
        let theirs = rows.iter().find(|r| r.local == mine.remote && r.remote == mine.local);
        let holders = theirs.map(|t| holders_of(t.inode)).unwrap_or_default();
        return Some(if holders.is_empty() { Peer::Remote { addr: mine.remote } } else { Peer::Local { pids: holders, addr: Some(mine.remote) } });
    }
    let unix = unix_inodes(pid);
    socks.iter().filter(|(ino, _)| unix.contains(ino)).find_map(|(_, fd)| unix_peer_pid(pid, *fd)).map(|p| Peer::Local { pids: vec![p], addr: None })
}

/// socket inode → fd number, for every socket `pid` has open.
fn socket_inodes(pid: u32) -> HashMap<u64, RawFd> {
    let mut out = HashMap::new();
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in rd.flatten() {
        let (Ok(link), Some(fd)) = (fs::read_link(e.path()), e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok())) else {
            continue;
        };
        if let Some(ino) = socket_inode(&link.to_string_lossy()) {
            out.insert(ino, fd);
        }
    }
    out
}

/// "socket:[12345]" → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

fn tcp_rows(pid: u32) -> Vec<TcpRow> {
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        out.extend(text.lines().skip(1).filter_map(|l| parse_tcp_row(l, v6)));
    }
    out
}

fn parse_tcp_row(line: &str, v6: bool) -> Option<TcpRow> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(3) != Some(&TCP_ESTABLISHED) {
        return None;
    }
    Some(TcpRow { local: parse_addr(f.get(1)?, v6)?, remote: parse_addr(f.get(2)?, v6)?, inode: f.get(9)?.parse().ok()? })
}

/// "0100007F:1538" (address words as the host prints its memory, port in hex), v4-mapped
/// IPv6 addresses made IPv4.
fn parse_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> { Some(u32::from_str_radix(a.get(8 * i..8 * i + 8)?, 16).ok()?.to_ne_bytes()) };
    let ip = if v6 {
        let mut o = [0u8; 16];
        for i in 0..4 {
            o[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
        }
        let ip = Ipv6Addr::from(o);
        ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip))
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some(SocketAddr::new(ip, port))
}

fn unix_inodes(pid: u32) -> HashSet<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(6)?.parse().ok()).collect()
}

/// Every process that has a socket with this inode open (a socket passed over SCM_RIGHTS or
/// inherited is held by several; which of them uses it cannot be told from here).
fn holders_of(inode: u64) -> Vec<u32> {
    let want = format!("socket:[{inode}]");
    let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str())) {
            out.push(pid);
        }
    }
    out
}

/// SO_PEERCRED of backend `pid`'s connected stream socket `fd` (not a listening one).
fn unix_peer_pid(pid: u32, fd: RawFd) -> Option<u32> {
    // SAFETY: raw syscalls with plain integer arguments; each returned fd is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return None;
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0) };
    if dup < 0 {
        return None;
    }
    let dup = unsafe { OwnedFd::from_raw_fd(dup as RawFd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&dup);
    if sockopt_int(raw, libc::SO_TYPE)? != libc::SOCK_STREAM || sockopt_int(raw, libc::SO_ACCEPTCONN)? != 0 {
        return None;
    }
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a ucred of the advertised length.
    let r = unsafe { libc::getsockopt(raw, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int of the advertised length.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows_parse() {
        let l = "   3: 0100007F:1538 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000   106        0 424242 1 0000000000000000 20 4 30 10 -1";
        let r = parse_tcp_row(l, false).unwrap();
        assert_eq!((r.local, r.remote, r.inode), ("127.0.0.1:5432".parse().unwrap(), "127.0.0.1:54000".parse().unwrap(), 424242));
        let listen = l.replace(" 01 ", " 0A ");
        assert!(parse_tcp_row(&listen, false).is_none(), "only established connections");
        // ::1 and v4-mapped 127.0.0.1 as /proc/net/tcp6 prints them on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(parse_addr("00000000000000000000000001000000:1538", true), Some("[::1]:5432".parse().unwrap()));
            assert_eq!(parse_addr("0000000000000000FFFF00000100007F:1538", true), Some("127.0.0.1:5432".parse().unwrap()));
        }
        assert_eq!(socket_inode("socket:[77]"), Some(77));
        assert_eq!(socket_inode("pipe:[77]"), None);
    }

    #[test]
    fn only_postgres_backends_are_inspected_and_unix_peers_are_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        let me = std::process::id();
        // Not a Postgres backend: nothing is concluded from its sockets.
        assert_eq!(backend_peer(me, l.local_addr().unwrap().port()), None);
        drop(c);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&a);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(unix_peer_pid(me, fd), Some(me));
        }
        drop(b);
    }
}
