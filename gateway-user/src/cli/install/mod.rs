//! `pgward install` / `pgward uninstall`: turn a Debian-like host running PostgreSQL into a
//! pgward appliance, and back.
//!
//! `install` (as root; `--root DIR` applies everything to the tree under DIR instead of `/`):
//!
//! | what | where |
//! |---|---|
//! | system user + group `pgward` (`useradd --system`) | /etc/passwd, group, shadow, gshadow |
//! | the binary | /usr/local/bin/pgward |
//! | configuration (`pgward init` + the appliance settings), `0750/0640 root:pgward` | /etc/pgward/ |
//! | audit log, `pgward:pgward 0750`, append-only (`chattr +a`) where the file system allows | /var/lib/pgward/audit |
//! | access state (revocations, JIT grants), `pgward:pgward 0700` | /var/lib/pgward/state |
//! | the real Postgres socket, in a directory only postgres and group pgward can enter (`0750 postgres:pgward`); tmpfiles.d entry recreates it at boot | /run/postgresql-real, /etc/tmpfiles.d/pgward.conf |
//! | Postgres bound to loopback, socket moved (a `conf.d` drop-in, or a marked block appended to postgresql.conf) | listen_addresses, unix_socket_directories |
//! | sandboxed systemd unit | /etc/systemd/system/pgward.service |
//! | what was changed, with the original files | /var/lib/pgward/install-manifest.json, install-backup/ |
//!
//! pgward then listens on the path clients use by default (`/run/postgresql/.s.PGSQL.5432`) and on
//! 127.0.0.1:6432, and its eBPF programs steer TCP connects to port 5432 into it. On `/` (and
//! without `--no-systemctl`) it also runs `systemctl daemon-reload`, restarts Postgres and
//! `systemctl enable --now pgward`.
//!
//! `uninstall` undoes the manifest's changes in reverse order: files it replaced or edited come
//! back byte for byte (content, mode, owner, mtime) unless they were changed since, created files
//! and directories go, the user goes. The audit log is kept (owned by root, with a copy of the
//! config and JWKS to verify it: /var/lib/pgward/retired/) unless `--purge`. A step that fails
//! stays in the manifest, so `uninstall` can be run again.

mod account;
mod apply;
mod files;
mod manifest;
mod pg_conf;
mod plan;
mod undo;
mod unit;

use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

use crate::host::accounts::{Accounts, effective_uid};
use crate::host::clock::now_rfc3339;
use apply::{apply, install_report};
use manifest::{Journal, MANIFEST_FORMAT, Manifest};
use plan::plan;
use undo::{undo_all, uninstall};

pub use pg_conf::{PgSetting, parse_pg_conf, pg_settings};
pub use unit::{UnitParams, unit_text};

pub const STATE_DIR: &str = "/var/lib/pgward";
pub const MANIFEST: &str = "/var/lib/pgward/install-manifest.json";
const BACKUP_DIR: &str = "/var/lib/pgward/install-backup";
pub const RETIRED_DIR: &str = "/var/lib/pgward/retired";
pub const CONFIG_DIR: &str = "/etc/pgward";
pub const CONFIG_FILE: &str = "/etc/pgward/pgward.toml";
pub const AUDIT_DIR: &str = "/var/lib/pgward/audit";
pub const ACCESS_DIR: &str = "/var/lib/pgward/state";
pub const UNIT_FILE: &str = "/etc/systemd/system/pgward.service";
pub const UNIT_NAME: &str = "pgward.service";
pub const TMPFILES_FILE: &str = "/etc/tmpfiles.d/pgward.conf";
/// systemd's RuntimeDirectory= for the unit: the interception state file lives here.
pub const RUNTIME_DIR: &str = "/run/pgward";
pub const STATE_FILE: &str = "/run/pgward/intercept.state.json";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Install into the tree under DIR instead of the running system (an image, a chroot, a test
    /// root); every path below is then inside DIR. systemctl is only run when DIR is /.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// The real Postgres's postgresql.conf (a path on the target system). Default:
    /// DATA/postgresql.conf with --pg-data, else /etc/postgresql/15/main/postgresql.conf.
    #[arg(long)]
    pub pg_conf: Option<PathBuf>,
    /// Postgres's data directory (where postgresql.auto.conf is checked). Default: the config's
    /// `data_directory`, else the directory holding postgresql.conf.
    #[arg(long)]
    pub pg_data: Option<PathBuf>,
    /// The OS user Postgres runs as (owner of the moved socket directory).
    #[arg(long, default_value = "postgres")]
    pub pg_user: String,
    /// systemd unit restarted so that Postgres picks up the new socket directory and address.
    #[arg(long, default_value = "postgresql.service")]
    pub pg_service: String,
    /// `listen_addresses` for Postgres (loopback: remote clients reach port 5432 through pgward).
    #[arg(long, default_value = "127.0.0.1")]
    pub pg_listen: String,
    /// Where the real Postgres socket moves: a directory only postgres and group pgward can enter.
    #[arg(long, default_value = "/run/postgresql-real")]
    pub real_socket_dir: PathBuf,
    /// The directory clients look in (libpq's default); pgward listens there instead of Postgres.
    #[arg(long, default_value = "/run/postgresql")]
    pub socket_dir: PathBuf,
    /// pgward's own TCP listener (connects to the Postgres port are steered here).
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: String,
    /// System user (and group) pgward runs as; created unless it exists.
    #[arg(long, default_value = "pgward")]
    pub user: String,
    /// pgward's role on the real Postgres (the service credential; see --upstream-password-file).
    #[arg(long, default_value = "pgward_svc")]
    pub service_role: String,
    /// File holding the service role's password (first line). Without it a password is generated
    /// into /etc/pgward/upstream.password and install prints how to create the role with it.
    #[arg(long)]
    pub upstream_password_file: Option<PathBuf>,
    /// Database used when a client names none.
    #[arg(long, default_value = "postgres")]
    pub database: String,
    /// The pgward binary to install (default: this executable).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where the binary goes (a path on the target system).
    #[arg(long, default_value = "/usr/local/bin")]
    pub bin_dir: PathBuf,
    /// Write `[intercept] enabled = false` (no eBPF: clients must dial pgward themselves).
    #[arg(long)]
    pub no_intercept: bool,
    /// cgroup v2 directory the eBPF programs attach to (default: the root of the cgroup2 mount,
    /// i.e. every process on the host).
    #[arg(long)]
    pub intercept_cgroup: Option<PathBuf>,
    /// cgroup pgward moves itself into (its connects are exempt). Default: `gateway` below the
    /// unit's own (delegated) cgroup, `<cgroup2 mount>/system.slice/pgward.service/gateway`.
    #[arg(long)]
    pub gateway_cgroup: Option<PathBuf>,
    /// Do not set the append-only attribute on the audit directory.
    #[arg(long)]
    pub no_append_only: bool,
    /// Do not run systemctl (daemon-reload, Postgres restart, enable --now pgward).
    #[arg(long)]
    pub no_systemctl: bool,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The tree `pgward install --root` was applied to.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Also delete the audit log and the access state (otherwise kept, owned by root, with a
    /// config to verify the log: /var/lib/pgward/retired/pgward.toml).
    #[arg(long)]
    pub purge: bool,
    /// Do not run systemctl (disable --now pgward, daemon-reload, Postgres restart).
    #[arg(long)]
    pub no_systemctl: bool,
}

pub fn run_install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let report = install(&args)?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let root = Root::new(&args.root)?;
    require_root()?;
    let (report, ok) = uninstall(&root, args.purge, root.host() && !args.no_systemctl)?;
    print!("{report}");
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn install(args: &InstallArgs) -> anyhow::Result<String> {
    let plan = plan(args)?;
    let root = &plan.root;
    let mut j = Journal {
        root,
        m: Manifest {
            format: MANIFEST_FORMAT,
            pgward_version: env!("CARGO_PKG_VERSION").into(),
            installed_at: now_rfc3339(),
            user: plan.user.clone(),
            pg_service: plan.pg_service.clone(),
            systemctl: plan.systemctl,
            changes: Vec::new(),
        },
        live: false,
        backups: 0,
    };
    let mut notes = Vec::new();
    match apply(&plan, &mut j, &mut notes) {
        Ok(()) => {
            j.persist()?;
            Ok(install_report(&plan, &notes))
        }
        Err(e) => {
            // Undo what was done (nothing is worth keeping from a failed install).
            let m = j.m.clone();
            let undone = if j.live || !m.changes.is_empty() {
                match undo_all(root, &m, true, plan.systemctl) {
                    Ok((_, true)) => "everything it changed was undone".to_string(),
                    Ok((report, false)) => format!("undoing it was incomplete:\n{report}"),
                    Err(u) => format!("undoing it failed: {u:#}"),
                }
            } else {
                "nothing had been changed".to_string()
            };
            Err(e.context(format!("pgward install failed; {undone}")))
        }
    }
}

/// The directory the system paths are applied under (`/` for the running system).
#[derive(Debug, Clone)]
struct Root {
    dir: PathBuf,
}

impl Root {
    fn new(p: &Path) -> anyhow::Result<Root> {
        let dir = p.canonicalize().with_context(|| format!("--root {}", p.display()))?;
        if !dir.is_dir() {
            bail!("--root {} is not a directory", p.display());
        }
        Ok(Root { dir })
    }
    fn host(&self) -> bool {
        self.dir == Path::new("/")
    }
    /// The tree's /etc/passwd and /etc/group.
    fn accounts(&self) -> Accounts {
        Accounts::load_from(&self.p("/etc/passwd"), &self.p("/etc/group"))
    }
    /// Where system path `sys` (absolute) is in this tree.
    fn p(&self, sys: impl AsRef<Path>) -> PathBuf {
        let s = sys.as_ref();
        let rel = s.strip_prefix("/").unwrap_or(s);
        if rel.as_os_str().is_empty() { self.dir.clone() } else { self.dir.join(rel) }
    }
}

fn require_root() -> anyhow::Result<()> {
    if effective_uid() != 0 {
        bail!("must run as root (it creates a system user and changes file ownership)");
    }
    Ok(())
}

/// An absolute path without `..` (what every system path given on the command line must be).
fn system_path(flag: &str, p: &Path) -> anyhow::Result<PathBuf> {
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("{flag} {} must be an absolute path without '..'", p.display());
    }
    Ok(p.components().collect())
}

fn run_systemctl(args: &[&str]) -> anyhow::Result<()> {
    run_cmd(Command::new("systemctl").args(args)).map(|_| ())
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:=@,+".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
