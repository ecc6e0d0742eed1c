//! The main section's `direct+pgaudit` target: what in-database auditing costs Postgres users
//! who run it today.
//!
//! A second throwaway PostgreSQL 15 cluster, initdb'd like the first and loaded with the same
//! pgbench data, so it can run interleaved with the other targets. It preloads Debian's pgaudit
//! (`postgresql-15-pgaudit`), has `CREATE EXTENSION pgaudit` in the bench database (the
//! extension's DDL event triggers), then `pgaudit.log = 'all'` — set after the data load, in
//! the order pgaudit's README asks — with the logging collector writing to files under the
//! data directory. The clients connect to it directly, as to `direct`.
//!
//! Where pgaudit is not installed the target is skipped with that reason (the rest of the bench
//! runs); any other setup failure skips it too and counts as a failed measurement.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::Settings;
use super::procs::WorkDir;
use super::run::{self, Target};
use crate::pg::{self, Cluster};
use crate::util::step;

/// The target's name in the tables.
pub(super) const TARGET: &str = "direct+pgaudit";
/// The Debian package that ships the extension (`.ci/run` installs it).
pub(super) const PACKAGE: &str = "postgresql-15-pgaudit";
/// `pgaudit.log`: every statement class.
pub(super) const LOG_CLASSES: &str = "all";
/// Settings the audited cluster starts with, besides those the main cluster has.
const CONF: [&str; 4] = [
    "shared_preload_libraries = 'pgaudit'",
    "logging_collector = on",
    // Relative to the data directory: the log stays in the cluster's own directory.
    "log_directory = 'log'",
    // The prefix pgaudit's README suggests (time, user, database, pid).
    "log_line_prefix = '%m %u %d [%p]: '",
];
/// The statement whose audit record shows that auditing is on before anything is measured.
const PROBE: &str = "select 'pgward-bench-pgaudit-probe'";
/// How long the probe's audit record may take to reach the log file (a reload, then the
/// logging collector's pipe).
const PROBE_WAIT: Duration = Duration::from_secs(20);

/// The audited cluster, running for the main section.
pub(super) struct Audited {
    pub(super) cluster: Cluster,
    log_dir: PathBuf,
    /// pgaudit's version as `pg_extension` reports it.
    version: String,
    /// Bytes in the log directory when the measurements began.
    log_bytes_start: u64,
}

/// What the report says about the target.
pub(super) enum Status {
    /// Measured: pgaudit's version and the bytes of log the section made it write.
    Measured { version: String, log_bytes: u64 },
    /// pgaudit is not installed: skipped, and why.
    NotInstalled(String),
    /// Setting the cluster up failed: skipped, and counted as a failed measurement.
    Failed(String),
}

/// Start and load the audited cluster under `work`, or say why the target is skipped.
pub(super) fn setup(s: &Settings, work: &WorkDir, base_conf: &[&str]) -> Result<Audited, Status> {
    if let Err(why) = installed() {
        return Err(Status::NotInstalled(why));
    }
    let dir = work.join("pg-pgaudit");
    step(&format!("main: starting a second PostgreSQL 15 with pgaudit (pgaudit.log = '{LOG_CLASSES}') in {}", dir.display()));
    let conf: Vec<&str> = base_conf.iter().copied().chain(CONF).collect();
    let cluster = match Cluster::start(&dir, &conf) {
        Ok(c) => c,
        // The server names the library it could not load.
        Err(e) if format!("{e:#}").contains("could not access file \"pgaudit\"") => {
            return Err(Status::NotInstalled(format!("PostgreSQL could not load pgaudit (install {PACKAGE}): {e:#}")));
        }
        Err(e) => return Err(Status::Failed(format!("starting the pgaudit cluster: {e:#}"))),
    };
    let log_dir = dir.join("data/log");
    match enable(&cluster, s, &log_dir) {
        Ok(version) => {
            let log_bytes_start = dir_bytes(&log_dir);
            Ok(Audited { cluster, log_dir, version, log_bytes_start })
        }
        Err(e) => Err(Status::Failed(format!("setting up pgaudit: {e:#}{}", newest_log_tail(&log_dir)))),
    }
}

/// Create the extension, load the pgbench data, turn auditing on and wait until a probe
/// statement's audit record is in the log. Returns pgaudit's version.
fn enable(cluster: &Cluster, s: &Settings, log_dir: &Path) -> Result<String> {
    cluster.psql_super("app", "create extension pgaudit")?;
    let version = cluster.psql_super("app", "select extversion from pg_extension where extname = 'pgaudit'")?.trim().to_string();
    run::prepare_data(cluster, s)?;
    cluster.psql_super("postgres", &format!("alter system set pgaudit.log = '{LOG_CLASSES}'"))?;
    cluster.psql_super("postgres", "select pg_reload_conf()")?;
    let target = Target::service(TARGET, cluster.port);
    let deadline = Instant::now() + PROBE_WAIT;
    // New sessions see the setting once the postmaster has reloaded: probe until one is audited.
    loop {
        let (status, out, err) = run::run_limited(
            target.client("psql").args(["-X", "-At", "-d", "app", "-c", PROBE]),
            Duration::from_secs(30),
        )?;
        if !status.success() {
            bail!("the probe statement failed ({status}): {}{}", out.trim(), err.trim());
        }
        if log_has_audit_of(log_dir, PROBE) {
            step(&format!("main: pgaudit {version} audits every statement into {}", log_dir.display()));
            return Ok(version);
        }
        if Instant::now() > deadline {
            bail!("no pgaudit record of `{PROBE}` in {} after {} s", log_dir.display(), PROBE_WAIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Audited {
    /// The target the clients use: Postgres's own port, as for `direct`.
    pub(super) fn target(&self) -> Target {
        Target::service(TARGET, self.cluster.port)
    }

    /// Measured, with the log the section has made pgaudit write so far.
    pub(super) fn status(&self) -> Status {
        Status::Measured {
            version: self.version.clone(),
            log_bytes: dir_bytes(&self.log_dir).saturating_sub(self.log_bytes_start),
        }
    }
}

impl Status {
    /// A setup failure (not a missing package) counts as a failed measurement.
    pub(super) fn errors(&self) -> usize {
        usize::from(matches!(self, Status::Failed(_)))
    }

    /// The report's line about the target.
    pub(super) fn line(&self) -> String {
        match self {
            Status::Measured { version, log_bytes } => format!(
                "{TARGET}: PostgreSQL with pgaudit {version} (pgaudit.log = '{LOG_CLASSES}', logging_collector = on, clients connect directly); \
                 it wrote {} of log during the section",
                fmt_bytes(*log_bytes)
            ),
            Status::NotInstalled(why) => format!("{TARGET}: skipped: {why}"),
            Status::Failed(why) => format!("{TARGET}: skipped after an ERROR: {why}"),
        }
    }

    pub(super) fn json(&self) -> Value {
        match self {
            Status::Measured { version, log_bytes } => json!({
                "status": "measured",
                "target": TARGET,
                "pgaudit_version": version,
                "pgaudit_log": LOG_CLASSES,
                "settings": CONF,
                "log_bytes": log_bytes,
            }),
            Status::NotInstalled(why) => json!({ "status": "skipped", "target": TARGET, "reason": why }),
            Status::Failed(why) => json!({ "status": "failed", "target": TARGET, "error": why }),
        }
    }
}

/// `Err(why)` when the extension's files are not where this PostgreSQL looks for them.
/// Undecided (`Ok`) when `pg_config` cannot say: the server's start then decides.
fn installed() -> Result<(), String> {
    let ask = |opt: &str| -> Option<PathBuf> {
        let out = Command::new(pg::bindir().join("pg_config")).arg(opt).output().ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    match (ask("--pkglibdir"), ask("--sharedir")) {
        (Some(lib), Some(share)) => missing_files(&lib, &share),
        _ => Ok(()),
    }
}

/// `Err` naming the first of pgaudit's files missing under `pkglibdir` / `sharedir`, and the
/// package that installs them.
pub(super) fn missing_files(pkglibdir: &Path, sharedir: &Path) -> Result<(), String> {
    let files = [pkglibdir.join("pgaudit.so"), sharedir.join("extension/pgaudit.control")];
    match files.iter().find(|p| !p.is_file()) {
        Some(p) => Err(format!("pgaudit is not installed (no {}); install the Debian package {PACKAGE}", p.display())),
        None => Ok(()),
    }
}

/// Whether a log file in `dir` holds pgaudit's session record of `statement`.
fn log_has_audit_of(dir: &Path, statement: &str) -> bool {
    log_files(dir).iter().any(|p| {
        std::fs::read_to_string(p).is_ok_and(|text| text.lines().any(|l| l.contains("AUDIT: SESSION,") && l.contains(statement)))
    })
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default()
}

/// Total size of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    log_files(dir).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

/// `812 B`, `3.4 KiB`, `120.5 MiB`, `1.25 GiB`.
pub(super) fn fmt_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    if x < KIB {
        format!("{n} B")
    } else if x < KIB * KIB {
        format!("{:.1} KiB", x / KIB)
    } else if x < KIB * KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else {
        format!("{:.2} GiB", x / (KIB * KIB * KIB))
    }
}

/// The last lines of the newest log file in `dir` (the server's own errors go there, not to
/// the file `pg_ctl -l` names, once the logging collector runs).
fn newest_log_tail(dir: &Path) -> String {
    match log_files(dir).into_iter().max() {
        Some(p) => format!("\nlast lines of {}:\n{}", p.display(), super::procs::tail(&p, 10)),
        None => String::new(),
    }
}
