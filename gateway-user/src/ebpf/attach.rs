//! Starting interception, in two steps around what needs the upstream:
//!
//! 1. [`Intercept::prepare`]: pgward enters its gateway cgroup, then either adopts what an
//!    earlier run pinned (re-pointing `PGW_CONFIG` at this process, so its own connects are
//!    exempt again, and `PGW_SOCKS` at its listener) or loads a fresh object (not attached).
//! 2. [`Intercept::finish`], with what the upstream said about where it listens: the unix-socket
//!    check, the rules (guard included), and for a fresh object: attach and pin.
//!
//! Dropping an [`Intercept`] leaves the programs pinned and attached (fail closed) and clears
//! this process's exemption.

use std::collections::BTreeSet;

use aya::programs::links::FdLink;

use super::discover::Found;
use super::*;
use crate::host::clock::now_rfc3339;

/// Every program, its attach point as `pgward status` names it, and whether it is a cgroup
/// sock_addr program (else: sock_ops, sk_lookup).
pub(super) fn expected_programs(sk_lookup: bool) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<(&str, &str)> = CGROUP_PROGRAMS.to_vec();
    v.push((SOCKOPS, "sock_ops"));
    if sk_lookup {
        v.push((SK_LOOKUP, "sk_lookup"));
    }
    v
}

/// Maps a restarted pgward re-points or reads (all but the LRU connection records it only
/// reads by 4-tuple, which it also needs: PEERS).
const PINNED_MAPS: [&str; 7] = [
    common::MAP_CONFIG,
    common::MAP_RULES,
    common::MAP_PEERS,
    common::MAP_SOCKS,
    common::MAP_COUNTERS,
    common::MAP_TUPLES,
    common::MAP_BINDS,
];

struct Maps {
    config: Array<MapData, common::Config>,
    rules: BpfHashMap<MapData, RuleKey, u32>,
    peers: BpfHashMap<MapData, PeerKey, ConnMeta>,
    socks: SockMap<MapData>,
    binds: BpfHashMap<MapData, u32, u32>,
}

/// Interception's first step, taken before pgward binds its listener: pgward is in its gateway
/// cgroup and, when an earlier run pinned the programs, exempt in their `PGW_CONFIG` — the
/// pinned bind guard refuses pgward's port to everyone else, pgward included until then.
pub struct Entered {
    gateway: Option<GatewayCgroup>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    cgroup_root: PathBuf,
    state_file: PathBuf,
    adopt: bool,
    object: &'static [u8],
    /// The adopted `PGW_CONFIG`, now exempting this process; cleared again when the
    /// [`Entered`] is dropped without becoming an [`Intercept`] (listening failed).
    exempted: Option<Array<MapData, common::Config>>,
}

impl Intercept {
    /// With `[intercept] enabled = true`: enter the gateway cgroup and, when programs are
    /// pinned, exempt this process in them. Call before binding the listener. `Ok(None)` when
    /// interception is off.
    pub fn enter(cfg: &Config) -> anyhow::Result<Option<Entered>> {
        let ic = &cfg.intercept;
        if !ic.enabled {
            let dir = pins::pin_dir(cfg);
            if pins::any_pinned(&dir) {
                bail!(
                    "intercept: [intercept] enabled = false, but programs an earlier pgward pinned at {} are \
                     still attached (protected connects are refused); detach them first: \
                     pgward intercept detach --config <this config>",
                    dir.display()
                );
            }
            return Ok(None);
        }
        let Some(object) = object() else {
            bail!(
                "intercept: this pgward binary was built without the eBPF object; run \
                 `cargo xtask build-ebpf` (writes target/bpf/gateway-ebpf.o), then rebuild pgward"
            );
        };
        check_capabilities()?;
        // Fail on a bad configuration before touching anything.
        Plan::new(cfg, cfg.listen_addr(), None)?;
        raise_memlock();
        pins::ensure_bpffs()?;
        let pin_dir = pins::pin_dir(cfg);

        let cgroup_root = cgroup2_mount()?;
        let cgroup = match &ic.cgroup {
            Some(p) => cfg.resolve(p),
            None => cgroup_root.clone(),
        };
        require_cgroup2(&cgroup)?;
        let state_file = cfg.resolve(&ic.state_file);
        let adopt = pins::any_pinned(&pin_dir);
        if adopt {
            check_pins_match(&pin_dir, &state_file, &cgroup, ic.sk_lookup)?;
        }

        // pgward's own connects and binds are recognised by its cgroup: move there before any
        // socket exists (a socket's cgroup is fixed when it is created).
        let gateway_path = match &ic.gateway_cgroup {
            Some(p) => cfg.resolve(p),
            None => cgroup.join("pgward-gateway"),
        };
        let gateway = GatewayCgroup::enter(&gateway_path, &cgroup_root)?;
        let exempted = if adopt {
            let mut config: Array<MapData, common::Config> =
                typed(map_of(pins::open_map(&pin_dir, common::MAP_CONFIG)?, common::MAP_CONFIG), common::MAP_CONFIG)?;
            let mut k = config.get(&0, 0).context("intercept: reading PGW_CONFIG")?;
            k.gateway_cgroup_id = gateway.id;
            k.exempt_uid = ic.exempt_uid.unwrap_or(common::NO_UID);
            config.set(0, &k, 0).context("intercept: writing PGW_CONFIG")?;
            Some(config)
        } else {
            None
        };
        Ok(Some(Entered { gateway: Some(gateway), pin_dir, cgroup, cgroup_root, state_file, adopt, object, exempted }))
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some(mut config) = self.exempted.take()
            && let Ok(k) = config.get(&0, 0)
        {
            let closed = common::Config { gateway_cgroup_id: common::NO_CGROUP, exempt_uid: common::NO_UID, ..k };
            let _ = config.set(0, &closed, 0);
        }
    }
}

impl Entered {
    /// Adopt the pinned programs (or load fresh ones) and point them at `listener` (bound
    /// after [`Intercept::enter`]).
    pub fn prepare(mut self, cfg: &Config, listener: &tokio::net::TcpListener) -> anyhow::Result<Intercept> {
        let ic = &cfg.intercept;
        let listen = listener.local_addr().context("intercept: listener address")?;
        let plan = Plan::new(cfg, listen, None)?;
        let gateway = self.gateway.take().context("intercept: prepared twice")?;
        let (adopt, pin_dir) = (self.adopt, self.pin_dir.clone());
        let netns_cookie = netns_cookie(listener.as_fd().as_raw_fd()).unwrap_or(0);
        let kcfg = plan.kernel_config(netns_cookie, gateway.id, ic.exempt_uid);

        let (ebpf, log_task, mut maps) = if adopt {
            let log_task = match adopted_program_id(&pin_dir) {
                Ok(id) => start_kernel_log(aya_log::EbpfLogger::init_from_id(id), |l| l.flush()),
                Err(e) => start_kernel_log::<std::fs::File, _>(Err(e), |_| {}),
            };
            (None, log_task, adopted_maps(&pin_dir)?)
        } else {
            let mut ebpf = EbpfLoader::new()
                .override_global("AYA_LOG_LEVEL", &kernel_log_level(), false)
                .load(self.object)
                .context("intercept: loading the eBPF object (maps)")?;
            let log_task = start_kernel_log(aya_log::EbpfLogger::init(&mut ebpf), |l| l.flush());
            let maps = fresh_maps(&mut ebpf)?;
            (Some(ebpf), log_task, maps)
        };
        // This process's connects are exempt (an adopted CONFIG already says so since
        // `enter`; before, it named no live gateway, or a dead one's cgroup, which only root
        // can enter).
        maps.config.set(0, &kcfg, 0).context("intercept: writing PGW_CONFIG")?;
        self.exempted = None;
        let bind_ports = plan.bind_ports(listen);
        sync_binds(&mut maps.binds, &bind_ports)?;
        warn_ephemeral(&bind_ports);
        if ic.sk_lookup {
            set_listener(&mut maps.socks, listener, listen)?;
        }
        *PEERS.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(PeerState { peers: maps.peers, listen_port: listen.port(), cgroup_root: self.cgroup_root.clone(), cgroups: CgroupCache::default() });
        if adopt {
            tracing::info!(pin_dir = %pin_dir.display(), "intercept: adopting the programs an earlier pgward pinned");
        }
        Ok(Intercept {
            ebpf,
            log_task,
            _gateway: gateway,
            state_file: self.state_file.clone(),
            pin_dir,
            config: maps.config,
            rules: maps.rules,
            kcfg,
            listen,
            cgroup: self.cgroup.clone(),
            cgroup_root: self.cgroup_root.clone(),
            adopted: adopt,
            attached: 0,
        })
    }
}

impl Intercept {
    /// Check the unix sockets (configured and `found`), write the rules, and attach + pin a
    /// freshly loaded object. After this the programs stay attached whatever happens to pgward.
    pub fn finish(&mut self, cfg: &Config, found: Option<&Found>) -> anyhow::Result<()> {
        let found_dirs = found.map(|f| f.socket_dirs.clone()).unwrap_or_default();
        check_unix_sockets(cfg, found)?;
        let plan = Plan::new(cfg, self.listen, found)?;
        sync_rules(&mut self.rules, &plan.rule_entries())?;
        let ic = &cfg.intercept;
        let (programs, netns) = match self.ebpf.take() {
            Some(mut ebpf) => {
                pins::create_dir(&self.pin_dir)?;
                for name in PINNED_MAPS {
                    let map = ebpf.map(name).with_context(|| format!("intercept: map {name} missing in the eBPF object"))?;
                    pins::pin_map(&self.pin_dir, name, map)?;
                }
                let r = attach_and_pin(&mut ebpf, cfg, &self.cgroup, &self.pin_dir);
                if r.is_err() {
                    // Half attached is not a state to keep: undo, so a retry starts clean.
                    let _ = pins::unpin_all(&self.pin_dir);
                }
                r?
                // `ebpf` drops here: the pinned links hold the programs.
            }
            None => adopted_programs(&self.pin_dir, ic.sk_lookup, &self.cgroup, cfg)?,
        };
        self.attached = programs.len();
        let state = State {
            pid: std::process::id(),
            started: now_rfc3339(),
            stopped: None,
            adopted: self.adopted,
            pin_dir: self.pin_dir.clone(),
            cgroup: self.cgroup.clone(),
            gateway_cgroup: self._gateway.path.clone(),
            gateway_cgroup_id: self._gateway.id,
            exempt_uid: ic.exempt_uid,
            netns,
            protected: plan.protected.clone(),
            guard: plan.guard.clone(),
            redirect4: plan.redirect4,
            redirect6: plan.redirect6,
            bind_guard: plan.bind_ports(self.listen),
            upstream_socket_dirs: found_dirs,
            programs,
        };
        write_state(&self.state_file, &state)?;
        let verb = if self.adopted { "adopted" } else { "attached and pinned" };
        tracing::info!(
            cgroup = %self.cgroup.display(),
            gateway_cgroup = %self._gateway.path.display(),
            pin_dir = %self.pin_dir.display(),
            protected = ?plan.protected,
            guard = ?plan.guard,
            redirect4 = ?plan.redirect4,
            redirect6 = ?plan.redirect6,
            bind_guard = ?plan.bind_ports(self.listen),
            sk_lookup = ic.sk_lookup,
            "interception on: {} eBPF programs {verb}",
            self.attached
        );
        Ok(())
    }

    /// What interception covers, for ending the sessions older than it ([`crate::evict`]).
    pub fn scope(&self, cfg: &Config, found: &Found) -> crate::evict::Scope {
        crate::evict::Scope {
            cgroup: self.cgroup.clone(),
            cgroup_root: self.cgroup_root.clone(),
            upstream_local: upstream_is_local(cfg),
            port: found.port,
        }
    }
}

/// The upstream is a unix socket or an address of this host.
fn upstream_is_local(cfg: &Config) -> bool {
    let up = &cfg.upstream;
    if up.host.starts_with('/') {
        return true;
    }
    let local = local_addresses();
    (up.host.as_str(), up.port)
        .to_socket_addrs()
        .is_ok_and(|mut a| a.all(|a| a.ip().is_loopback() || a.ip().is_unspecified() || local.contains(&a.ip())))
}

impl Drop for Intercept {
    fn drop(&mut self) {
        *PEERS.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(t) = self.log_task.take() {
            t.abort();
        }
        // A fresh object that was never attached: nothing stays behind.
        drop(self.ebpf.take());
        if self.attached == 0 && !self.adopted {
            return;
        }
        // The programs stay: no exemption for a process that is gone (its cgroup is removed
        // next); protected connects keep going to pgward's address, where nothing listens.
        let closed = common::Config { gateway_cgroup_id: common::NO_CGROUP, exempt_uid: common::NO_UID, ..self.kcfg };
        if let Err(e) = self.config.set(0, &closed, 0) {
            tracing::warn!(error = %e, "intercept: could not clear pgward's exemption");
        }
        mark_stopped(&self.state_file);
        tracing::info!(
            pin_dir = %self.pin_dir.display(),
            "interception stays closed while pgward is stopped: {} eBPF programs remain pinned and attached \
             (protected connects are refused); `pgward intercept detach` removes them",
            self.attached
        );
    }
}

fn mark_stopped(path: &Path) {
    let Ok(bytes) = fs::read(path) else { return };
    let Ok(mut state) = serde_json::from_slice::<State>(&bytes) else { return };
    if state.pid != std::process::id() {
        return;
    }
    state.stopped = Some(now_rfc3339());
    let _ = write_state(path, &state);
}

/// Pins from an earlier run fit this configuration: the same programs, the same cgroup.
fn check_pins_match(dir: &Path, state_file: &Path, cgroup: &Path, sk_lookup: bool) -> anyhow::Result<()> {
    let pinned: BTreeSet<String> = pins::pinned_links(dir).into_iter().map(|p| p.name).collect();
    let wanted: BTreeSet<String> = expected_programs(sk_lookup).into_iter().map(|(n, _)| n.to_string()).collect();
    let hint = || format!("run `pgward intercept detach --config <this config>` to remove them (pins in {})", dir.display());
    if pinned != wanted {
        bail!(
            "intercept: the pinned programs {pinned:?} differ from what this configuration attaches \
             {wanted:?}; {} and start again",
            hint()
        );
    }
    if let Ok(bytes) = fs::read(state_file)
        && let Ok(state) = serde_json::from_slice::<State>(&bytes)
        && state.cgroup != cgroup
    {
        bail!(
            "intercept: the pinned programs are attached to {}, the configuration says {}; {} and start again",
            state.cgroup.display(),
            cgroup.display(),
            hint()
        );
    }
    Ok(())
}

fn typed<T>(map: Map, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).with_context(|| format!("intercept: map {name} has an unexpected type"))
}

fn fresh_maps(ebpf: &mut Ebpf) -> anyhow::Result<Maps> {
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

fn adopted_maps(dir: &Path) -> anyhow::Result<Maps> {
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
fn map_of(data: MapData, name: &str) -> Map {
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
fn sync_rules(rules: &mut BpfHashMap<MapData, RuleKey, u32>, want: &[(RuleKey, u32)]) -> anyhow::Result<()> {
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
fn sync_binds(binds: &mut BpfHashMap<MapData, u32, u32>, ports: &[u16]) -> anyhow::Result<()> {
    for p in ports {
        binds.insert(&(*p as u32), &common::BIND_GUARDED, 0).context("intercept: writing PGW_BINDS")?;
    }
    let stale: Vec<u32> = binds.keys().filter_map(Result::ok).filter(|k| !ports.iter().any(|p| *p as u32 == *k)).collect();
    for k in stale {
        binds.remove(&k).context("intercept: removing a stale port from PGW_BINDS")?;
    }
    Ok(())
}

/// The bind guard sees the port a bind asks for; an ephemeral port is chosen after it (bind
/// to port 0, listen or connect on an unbound socket). A port the kernel may hand out that way
/// can be had by anyone while pgward is stopped: say so.
fn warn_ephemeral(ports: &[u16]) {
    for p in ephemeral_ports(ports) {
        tracing::warn!(
            port = p,
            "intercept: pgward's port {p} is in the kernel's ephemeral range (net.ipv4.ip_local_port_range) \
             and not reserved: while pgward is stopped, another local process can be given it without \
             binding it explicitly (the bind guard cannot see that); use a port outside the range, or \
             reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={p}"
        );
    }
}

fn set_listener(socks: &mut SockMap<MapData>, listener: &tokio::net::TcpListener, listen: SocketAddr) -> anyhow::Result<()> {
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

/// The program whose maps hold aya-log's ring buffer of the adopted programs (connect4).
fn adopted_program_id(dir: &Path) -> Result<u32, String> {
    pins::pinned_links(dir)
        .into_iter()
        .find(|p| p.name == CGROUP_PROGRAMS[0].0)
        .and_then(|p| p.program_id)
        .ok_or_else(|| "no pinned connect4 program".to_string())
}

/// Load, attach and pin every program of a fresh object.
fn attach_and_pin(ebpf: &mut Ebpf, cfg: &Config, cgroup: &Path, dir: &Path) -> anyhow::Result<(Vec<ProgramState>, Option<PathBuf>)> {
    let ic = &cfg.intercept;
    let mut programs = Vec::new();
    let cg_fd = fs::File::open(cgroup).with_context(|| format!("intercept: opening cgroup {}", cgroup.display()))?;
    for (name, hook) in CGROUP_PROGRAMS {
        let p: &mut CgroupSockAddr = program(ebpf, name)?;
        p.load().map_err(|e| load_error(name, hook, ProgramType::CgroupSockAddr, e))?;
        let id = p.attach(&cg_fd, CgroupAttachMode::Single).map_err(|e| attach_error(name, hook, cgroup, e))?;
        let link = FdLink::try_from(p.take_link(id)?).with_context(|| format!("intercept: {name}'s link cannot be pinned"))?;
        pins::pin_link(dir, name, link)?;
        programs.push(ProgramState { name: name.into(), attach: hook.into(), target: cgroup.to_owned(), id: p.info()?.id() });
    }
    let p: &mut SockOps = program(ebpf, SOCKOPS)?;
    p.load().map_err(|e| load_error(SOCKOPS, "sock_ops", ProgramType::SockOps, e))?;
    let id = p.attach(&cg_fd, CgroupAttachMode::Single).map_err(|e| attach_error(SOCKOPS, "sock_ops", cgroup, e))?;
    let link = FdLink::try_from(p.take_link(id)?).with_context(|| format!("intercept: {SOCKOPS}'s link cannot be pinned"))?;
    pins::pin_link(dir, SOCKOPS, link)?;
    programs.push(ProgramState { name: SOCKOPS.into(), attach: "sock_ops".into(), target: cgroup.to_owned(), id: p.info()?.id() });
    let mut netns = None;
    if ic.sk_lookup {
        let path = cfg.resolve(&ic.netns);
        let ns = fs::File::open(&path).with_context(|| format!("intercept: opening netns {}", path.display()))?;
        let p: &mut SkLookup = program(ebpf, SK_LOOKUP)?;
        p.load().map_err(|e| load_error(SK_LOOKUP, "sk_lookup", ProgramType::SkLookup, e))?;
        let id = p.attach(ns).map_err(|e| attach_error(SK_LOOKUP, "sk_lookup", &path, e))?;
        pins::pin_link(dir, SK_LOOKUP, FdLink::from(p.take_link(id)?))?;
        programs.push(ProgramState { name: SK_LOOKUP.into(), attach: "sk_lookup".into(), target: netns_target(&path), id: p.info()?.id() });
        netns = Some(path);
    }
    Ok((programs, netns))
}

/// e.g. "/proc/self/ns/net (net:[4026531840])": which namespace, not just the path.
fn netns_target(path: &Path) -> PathBuf {
    match fs::read_link(path) {
        Ok(l) => PathBuf::from(format!("{} ({})", path.display(), l.display())),
        Err(_) => path.to_owned(),
    }
}

/// What an earlier run pinned, checked: every expected link is there and runs a loaded program.
fn adopted_programs(dir: &Path, sk_lookup: bool, cgroup: &Path, cfg: &Config) -> anyhow::Result<(Vec<ProgramState>, Option<PathBuf>)> {
    let pinned = pins::pinned_links(dir);
    let mut programs = Vec::new();
    for (name, hook) in expected_programs(sk_lookup) {
        let p = pinned.iter().find(|p| p.name == name).with_context(|| format!("intercept: {name} is not pinned in {}", dir.display()))?;
        let id = p.program_id.with_context(|| format!("intercept: the pinned link {} cannot be read", p.path.display()))?;
        let target = if name == SK_LOOKUP { netns_target(&cfg.resolve(&cfg.intercept.netns)) } else { cgroup.to_owned() };
        programs.push(ProgramState { name: name.into(), attach: hook.into(), target, id });
    }
    let netns = sk_lookup.then(|| cfg.resolve(&cfg.intercept.netns));
    Ok((programs, netns))
}
