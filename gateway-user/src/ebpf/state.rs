//! The state file `serve` writes (`intercept.state_file`): what it attached, read by
//! `pgward status`.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::host::clock::now_rfc3339;

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

/// Replaces the state file atomically (temp file, then rename), so a reader never sees half.
pub(super) fn write_state(path: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(state)?).with_context(|| format!("intercept: writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("intercept: writing {}", path.display()))?;
    Ok(())
}

/// Records in the state file that this `serve` stopped (only when the file is still its own).
pub(super) fn mark_stopped(path: &Path) {
    let Ok(bytes) = fs::read(path) else { return };
    let Ok(mut state) = serde_json::from_slice::<State>(&bytes) else { return };
    if state.pid != std::process::id() {
        return;
    }
    state.stopped = Some(now_rfc3339());
    let _ = write_state(path, &state);
}
