//! The programs of the eBPF object: their names and attach points, loading, attaching and
//! pinning a fresh object, and checking what an earlier run pinned before adopting it.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use aya::Ebpf;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramType, SkLookup, SockOps};

use super::pins;
use super::state::{ProgramState, State};
use crate::config::Config;

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

/// Pins from an earlier run fit this configuration: the same programs, the same cgroup.
pub(super) fn check_pins_match(dir: &Path, state_file: &Path, cgroup: &Path, sk_lookup: bool) -> anyhow::Result<()> {
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

/// The program whose maps hold aya-log's ring buffer of the adopted programs (connect4).
pub(super) fn adopted_program_id(dir: &Path) -> Result<u32, String> {
    pins::pinned_links(dir)
        .into_iter()
        .find(|p| p.name == CGROUP_PROGRAMS[0].0)
        .and_then(|p| p.program_id)
        .ok_or_else(|| "no pinned connect4 program".to_string())
}

/// Load, attach and pin every program of a fresh object.
pub(super) fn attach_and_pin(ebpf: &mut Ebpf, cfg: &Config, cgroup: &Path, dir: &Path) -> anyhow::Result<(Vec<ProgramState>, Option<PathBuf>)> {
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
pub(super) fn adopted_programs(dir: &Path, sk_lookup: bool, cgroup: &Path, cfg: &Config) -> anyhow::Result<(Vec<ProgramState>, Option<PathBuf>)> {
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
