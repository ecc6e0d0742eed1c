//! Pinning in bpffs: the links and maps of an interception outlive the `serve` process that
//! made them, so interception stays closed while pgward is stopped, crashed or restarting.
//!
//! Layout, one directory per configuration (`pin_dir`): `link_<program>` for every attached
//! program (the link holds the program: it stays loaded and attached until the pin is removed)
//! and `map_<MAP>` for the maps a restarted pgward re-points or reads. Removing the pins
//! ([`unpin_all`]) detaches: nothing else holds the links.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::maps::{Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use sha2::Digest;

use crate::config::Config;

/// Where bpffs is mounted on every distribution we know.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Parent of the per-configuration pin directories.
const PIN_PARENT: &str = "pgward";
/// statfs f_type of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Hex digits of the config directory's hash that name a pin directory.
const INSTANCE_HEX: usize = 16;
const LINK_PREFIX: &str = "link_";
const MAP_PREFIX: &str = "map_";

/// `/sys/fs/bpf/pgward/<instance>`, `<instance>` derived from the config's directory, so two
/// configurations (two gateways, parallel tests) never share pins.
pub fn pin_dir(cfg: &Config) -> PathBuf {
    let digest = sha2::Sha256::digest(cfg.base_dir.as_os_str().as_bytes());
    let instance: String = hex::encode(digest).chars().take(INSTANCE_HEX).collect();
    Path::new(BPFFS).join(PIN_PARENT).join(instance)
}

pub fn link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{program}"))
}

pub fn map_path(dir: &Path, map: &str) -> PathBuf {
    dir.join(format!("{MAP_PREFIX}{map}"))
}

fn is_bpffs(p: &Path) -> bool {
    crate::host::files::fs_type(p).is_ok_and(|t| t == BPF_FS_MAGIC)
}

/// bpffs at /sys/fs/bpf, mounted here if it is not (needs CAP_SYS_ADMIN).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new(BPFFS);
    if is_bpffs(root) {
        return Ok(());
    }
    let _ = fs::create_dir_all(root);
    let (src, ty) = (c"bpf", c"bpf");
    let target = std::ffi::CString::new(root.as_os_str().as_bytes()).context("bpffs path")?;
    // SAFETY: mount(2) with valid C strings and no data.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if r != 0 || !is_bpffs(root) {
        bail!(
            "intercept: bpffs is not mounted at {BPFFS} and mounting it failed ({}); pgward pins its \
             programs there so that interception survives restarts: `mount -t bpf bpf {BPFFS}`",
            std::io::Error::last_os_error()
        );
    }
    tracing::info!("intercept: mounted bpffs at {BPFFS}");
    Ok(())
}

/// The pin directory, created (0700) if needed.
pub fn create_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("intercept: creating pin directory {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    Ok(())
}

/// Pin an attached link; the returned path stays until [`unpin_all`].
pub fn pin_link(dir: &Path, program: &str, link: FdLink) -> anyhow::Result<()> {
    let path = link_path(dir, program);
    let pinned = link.pin(&path).with_context(|| format!("intercept: pinning {program}'s link at {}", path.display()))?;
    // Dropping the handle closes our fd only: the pin keeps the link (and the program).
    drop(pinned);
    Ok(())
}

pub fn pin_map(dir: &Path, name: &str, map: &Map) -> anyhow::Result<()> {
    let path = map_path(dir, name);
    map.pin(&path).with_context(|| format!("intercept: pinning map {name} at {}", path.display()))
}

pub fn open_map(dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = map_path(dir, name);
    MapData::from_pin(&path).with_context(|| format!("intercept: opening pinned map {}", path.display()))
}

/// A pinned link: which program it runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PinnedProgram {
    pub name: String,
    pub path: PathBuf,
    /// Kernel ids (None when the pin could not be opened).
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

/// The links pinned in `dir`, by program name (empty when there is no such directory).
pub fn pinned_links(dir: &Path) -> Vec<PinnedProgram> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PinnedProgram> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().strip_prefix(LINK_PREFIX)?.to_string();
            let path = e.path();
            let info = PinnedLink::from_pin(&path).ok().and_then(|l| FdLink::from(l).info().ok());
            Some(PinnedProgram {
                name,
                path,
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether anything of an interception is pinned in `dir`.
pub fn any_pinned(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_some())
}

/// Remove every pin in `dir` and the directory: the links go (detached) once no process holds
/// them, then the programs and maps. Returns the programs whose links were unpinned.
pub fn unpin_all(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut detached = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(detached),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        fs::remove_file(e.path()).with_context(|| format!("removing pin {}", e.path().display()))?;
        if let Some(p) = name.strip_prefix(LINK_PREFIX) {
            detached.push(p.to_string());
        }
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    detached.sort();
    Ok(detached)
}
