//! The maps pgward writes and reads: opening them (from a fresh object or from the pins), and
//! keeping the rules, the bind guard's ports and the sk_lookup listener in step with the plan.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, SockMap};
use gateway_common::{self as common, ConnMeta, PeerKey, RuleKey};

use super::pins;

/// Maps a restarted pgward re-points or reads (all but the LRU connection records it only
/// reads by 4-tuple, which it also needs: PEERS).
pub(super) const PINNED_MAPS: [&str; 7] = [
    common::MAP_CONFIG,
    common::MAP_RULES,
    common::MAP_PEERS,
    common::MAP_SOCKS,
    common::MAP_COUNTERS,
    common::MAP_TUPLES,
    common::MAP_BINDS,
];

/// Typed handles on the maps pgward writes (`PGW_PEERS` is handed to [`super::peer`]).
pub(super) struct Maps {
    pub(super) config: Array<MapData, common::Config>,
    pub(super) rules: BpfHashMap<MapData, RuleKey, u32>,
    pub(super) peers: BpfHashMap<MapData, PeerKey, ConnMeta>,
    pub(super) socks: SockMap<MapData>,
    pub(super) binds: BpfHashMap<MapData, u32, u32>,
}


pub(super) fn typed<T>(map: Map, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).with_context(|| format!("intercept: map {name} has an unexpected type"))
}

pub(super) fn fresh_maps(ebpf: &mut Ebpf) -> anyhow::Result<Maps> {
    // Pinned (by name, from the Ebpf's own handles) in `finish`; these handles share the maps.
    let open = |ebpf: &mut Ebpf, name: &str| -> anyhow::Result<Map> {
        let data = ebpf.map(name).with_context(|| format!("intercept: map {name} missing in the eBPF object"))?;
        let fd = map_fd(data)?;
        Ok(map_of(MapData::from_fd(fd).with_context(|| format!("intercept: opening map {name}"))?, name))
    };
    Ok(Maps {
        config: typed(open(ebpf, common::MAP_CONFIG)?, common::MAP_CONFIG)?,
        rules: typed(open(ebpf, common::MAP_RULES)?, common::MAP_RULES)?,
        peers: typed(open(ebpf, common::MAP_PEERS)?, common::MAP_PEERS)?,
        socks: typed(open(ebpf, common::MAP_SOCKS)?, common::MAP_SOCKS)?,
        binds: typed(open(ebpf, common::MAP_BINDS)?, common::MAP_BINDS)?,
    })
}

pub(super) fn adopted_maps(dir: &Path) -> anyhow::Result<Maps> {
    let open = |name: &str| -> anyhow::Result<Map> { Ok(map_of(pins::open_map(dir, name)?, name)) };
    Ok(Maps {
        config: typed(open(common::MAP_CONFIG)?, common::MAP_CONFIG)?,
        rules: typed(open(common::MAP_RULES)?, common::MAP_RULES)?,
        peers: typed(open(common::MAP_PEERS)?, common::MAP_PEERS)?,
        socks: typed(open(common::MAP_SOCKS)?, common::MAP_SOCKS)?,
        binds: typed(open(common::MAP_BINDS)?, common::MAP_BINDS)?,
    })
}

/// A second handle on a map of a loaded object (the object keeps its own, for pinning).
fn map_fd(map: &Map) -> anyhow::Result<std::os::fd::OwnedFd> {
    let data: &MapData = match map {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) | Map::SockMap(d) => d,
        _ => bail!("intercept: unexpected map type"),
    };
    let fd = data.fd().as_fd().try_clone_to_owned().context("intercept: duplicating a map fd")?;
    Ok(fd)
}

/// The typed `Map` enum for a map's data, by its name (the kinds gateway-common declares).
pub(super) fn map_of(data: MapData, name: &str) -> Map {
    match name {
        common::MAP_CONFIG => Map::Array(data),
        common::MAP_RULES | common::MAP_BINDS => Map::HashMap(data),
        common::MAP_SOCKS => Map::SockMap(data),
        common::MAP_COUNTERS => Map::PerCpuArray(data),
        _ => Map::LruHashMap(data),
    }
}

/// Make the rules map hold exactly `want`: new entries first, then stale ones removed (never
/// a moment with fewer rules than either the old or the new set).
pub(super) fn sync_rules(rules: &mut BpfHashMap<MapData, RuleKey, u32>, want: &[(RuleKey, u32)]) -> anyhow::Result<()> {
    for (key, action) in want {
        rules.insert(key, action, 0).context("intercept: writing PGW_RULES")?;
    }
    let stale: Vec<RuleKey> = rules.keys().filter_map(Result::ok).filter(|k| !want.iter().any(|(w, _)| w == k)).collect();
    for k in stale {
        rules.remove(&k).context("intercept: removing a stale rule from PGW_RULES")?;
    }
    Ok(())
}

/// Make the bind guard's map hold exactly `ports` (new ones first, like [`sync_rules`]).
pub(super) fn sync_binds(binds: &mut BpfHashMap<MapData, u32, u32>, ports: &[u16]) -> anyhow::Result<()> {
    for p in ports {
        binds.insert(&(*p as u32), &common::BIND_GUARDED, 0).context("intercept: writing PGW_BINDS")?;
    }
    let stale: Vec<u32> = binds.keys().filter_map(Result::ok).filter(|k| !ports.iter().any(|p| *p as u32 == *k)).collect();
    for k in stale {
        binds.remove(&k).context("intercept: removing a stale port from PGW_BINDS")?;
    }
    Ok(())
}

pub(super) fn set_listener(socks: &mut SockMap<MapData>, listener: &tokio::net::TcpListener, listen: SocketAddr) -> anyhow::Result<()> {
    let fd = listener.as_fd();
    if listen.is_ipv4() || listen.ip().is_unspecified() {
        socks.set(if listen.is_ipv4() { common::SOCK_V4 } else { common::SOCK_V6 }, &fd, 0)?;
    }
    if listen.is_ipv6() {
        socks.set(common::SOCK_V6, &fd, 0)?;
        if listen.ip().is_unspecified() {
            socks.set(common::SOCK_V4, &fd, 0)?; // dual-stack [::] takes IPv4 too
        }
    }
    Ok(())
}
