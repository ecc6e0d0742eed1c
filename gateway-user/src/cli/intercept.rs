//! `pgward intercept detach`: the explicit, audited admin step that removes the pinned
//! interception programs. Until then they stay attached whether or not pgward runs (fail
//! closed). Refused while a gateway is serving with them (stop it first): only `serve` writes
//! the audit log while it runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::json;

use crate::audit::{AuditHandle, Kind, Record, WriterOptions};
use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum InterceptCommand {
    /// Remove the pinned interception programs (audited). Protected connects then reach the
    /// real Postgres directly again. pgward must be stopped.
    Detach(DetachArgs),
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Why (kept in the audit record).
    #[arg(long)]
    pub reason: Option<String>,
}

pub fn run(cmd: InterceptCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InterceptCommand::Detach(a) => {
            let cfg = Config::load(&a.config)?;
            let report = detach(&cfg, a.reason.as_deref())?;
            super::print_quietly(&report)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Audit, then unpin (and so detach) every program pinned for this configuration, and remove
/// the state file. Returns a human report.
pub fn detach(cfg: &Config, reason: Option<&str>) -> anyhow::Result<String> {
    let st = crate::ebpf::status(cfg).context("reading interception status")?;
    if st.running {
        let pid = st.state.as_ref().map(|s| s.pid).unwrap_or_default();
        bail!(
            "a pgward (pid {pid}) is serving with these programs; stop it first (e.g. systemctl stop pgward), \
             then detach: while it runs, only it writes the audit log"
        );
    }
    let dir = crate::ebpf::pins::pin_dir(cfg);
    let pinned = crate::ebpf::pins::pinned_links(&dir);
    if !crate::ebpf::pins::any_pinned(&dir) {
        return Ok(format!("nothing is pinned at {}: no interception to detach\n", dir.display()));
    }
    let names: Vec<&str> = pinned.iter().map(|p| p.name.as_str()).collect();
    // The record first: if it cannot be made durable, nothing is detached.
    audit_detach(cfg, &dir, &names, reason)?;
    let detached = crate::ebpf::pins::unpin_all(&dir)?;
    let _ = std::fs::remove_file(cfg.resolve(&cfg.intercept.state_file));
    tracing::info!(pin_dir = %dir.display(), programs = ?detached, "interception detached");
    Ok(format!(
        "detached {} interception programs ({}) pinned at {}; protected connects now reach their destination directly\n",
        detached.len(),
        detached.join(", "),
        dir.display()
    ))
}

fn audit_detach(cfg: &Config, dir: &std::path::Path, programs: &[&str], reason: Option<&str>) -> anyhow::Result<()> {
    let opts = WriterOptions::from_config(cfg).context("loading the checkpoint signing key")?;
    let audit = AuditHandle::start(opts).context("opening the audit log")?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let rec = Record {
        kind: Kind::InterceptDetach,
        user: std::env::var("SUDO_USER").ok().or_else(|| std::env::var("USER").ok()).map(Into::into),
        meta: Some(json!({
            "uid": uid,
            "pin_dir": dir,
            "programs": programs,
            "reason": reason,
        })),
        ..Record::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a runtime")?;
    let r = rt.block_on(audit.append_durable(rec));
    audit.shutdown();
    r.map(|_| ()).map_err(|e| anyhow::anyhow!("auditing the detach (nothing was detached): {e}"))
}
