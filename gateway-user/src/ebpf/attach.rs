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

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use anyhow::{Context, bail};
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::{Ebpf, EbpfLoader};
use gateway_common::{self as common, RuleKey};

use super::cgroups::{GatewayCgroup, cgroup2_mount, movable_by_others, require_cgroup2};
use super::discover::Found;
use super::kernel::{check_capabilities, kernel_log_level, raise_memlock, start_kernel_log};
use super::maps::{PINNED_MAPS, adopted_maps, fresh_maps, map_of, set_listener, sync_binds, sync_rules, typed};
use super::net::{local_addresses, netns_cookie};
use super::peer::{CgroupCache, PEERS, PeerState};
use super::plan::Plan;
use super::programs::{adopted_program_id, adopted_programs, attach_and_pin, check_pins_match};
use super::reserve::reserve_ports;
use super::state::{State, mark_stopped, write_state};
use super::unix_sockets::check_unix_sockets;
use super::{object, pins};
use crate::config::Config;
use crate::host::clock::now_rfc3339;

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
        if let Some(why) = movable_by_others(&cgroup, &gateway_path, &cgroup_root) {
            bail!("intercept: {why}; interception cannot hold against that user (set intercept.cgroup to a cgroup whose ancestors only root may write)");
        }
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

        // Before anything is attached: the kernel must never hand pgward's ports to anyone.
        let bind_ports = plan.bind_ports(listen);
        reserve(&bind_ports)?;

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
        sync_binds(&mut maps.binds, &bind_ports)?;
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

/// Every host of the upstream is a unix socket or an address of this host.
fn upstream_is_local(cfg: &Config) -> bool {
    let local = local_addresses();
    let endpoints = cfg.upstream.endpoints().unwrap_or_default();
    !endpoints.is_empty()
        && endpoints.iter().all(|(host, port)| {
            host.starts_with('/')
                || (host.as_str(), *port).to_socket_addrs().is_ok_and(|mut a| {
                    a.all(|a| a.ip().is_loopback() || a.ip().is_unspecified() || local.contains(&a.ip()))
                })
        })
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

/// Reserve pgward's ports (listener and redirect targets) in its network namespace, so the
/// kernel never hands one out as an ephemeral port while pgward is stopped: the bind guard
/// sees the port a bind asks for, not the one the kernel picks for port 0 ([`super::reserve`]).
fn reserve(ports: &[u16]) -> anyhow::Result<()> {
    let added = reserve_ports(ports).context(
        "intercept: cannot keep pgward's port(s) out of the kernel's ephemeral ports (while pgward is stopped \
         another local process could be handed one and receive the steered clients); run serve where \
         /proc/sys/net/ipv4/ip_local_reserved_ports is writable, or listen on a port outside \
         net.ipv4.ip_local_port_range",
    )?;
    if !added.is_empty() {
        tracing::info!(
            ports = ?added,
            "intercept: reserved pgward's port(s) {added:?} in net.ipv4.ip_local_reserved_ports of its network \
             namespace (the kernel never hands them out as ephemeral ports; they stay reserved while pgward is \
             stopped, until a reboot)"
        );
    }
    Ok(())
}
