//! Who is behind an intercepted connection: the sock_ops program records the client by
//! 4-tuple in `PGW_PEERS`; [`lookup_peer`] takes that record for an accepted connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData};
use gateway_common::{ConnMeta, PeerKey};
use serde::Serialize;

use super::addr::{ip_words, mapped, words_octets};
use super::cgroups::cgroup_path_of;
use crate::host::process;

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

pub(super) struct PeerState {
    pub(super) peers: BpfHashMap<MapData, PeerKey, ConnMeta>,
    pub(super) listen_port: u16,
    pub(super) cgroup_root: PathBuf,
    /// cgroup id -> path, as resolved (and checked) for an earlier login: a login from a
    /// known cgroup skips reading /proc/<pid>/cgroup and stat'ing the cgroup directory.
    pub(super) cgroups: CgroupCache,
}

/// Resolved cgroup paths by id. Ids are not reused while the system runs; an entry is
/// trusted for `CGROUP_CACHE_TTL` (a cgroup directory can be renamed), and the cache is
/// emptied when it reaches `CGROUP_CACHE_MAX` entries.
#[derive(Default)]
pub(super) struct CgroupCache {
    by_id: std::collections::HashMap<u64, (String, std::time::Instant)>,
}

const CGROUP_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(60);
const CGROUP_CACHE_MAX: usize = 4096;

impl CgroupCache {
    pub(super) fn get(&self, id: u64) -> Option<String> {
        self.by_id.get(&id).filter(|(_, at)| at.elapsed() < CGROUP_CACHE_TTL).map(|(p, _)| p.clone())
    }

    pub(super) fn put(&mut self, id: u64, path: &str) {
        if self.by_id.len() >= CGROUP_CACHE_MAX {
            self.by_id.clear();
        }
        self.by_id.insert(id, (path.to_owned(), std::time::Instant::now()));
    }
}

pub(super) static PEERS: Mutex<Option<PeerState>> = Mutex::new(None);

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
