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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::host::accounts::{Accounts, effective_uid};
use crate::host::cgroup::cgroup2_mount;
use crate::host::clock::now_rfc3339;
use crate::host::files::{clear_append_only_tree, is_append_only, set_append_only};

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
const DROPIN_NAME: &str = "zz-pgward.conf";
const USER_CLUSTERS: &str = "/etc/postgresql-common/user_clusters";
const BLOCK_BEGIN: &str = "# BEGIN pgward";
const BLOCK_END: &str = "# END pgward";
const MANIFEST_FORMAT: u32 = 1;

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

// ---- the target tree ---------------------------------------------------------------------

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

// ---- the manifest ------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    pgward_version: String,
    installed_at: String,
    user: String,
    pg_service: String,
    /// install ran systemctl (so uninstall does too, unless told not to).
    systemctl: bool,
    /// In the order they were made; undone in reverse.
    changes: Vec<Change>,
}

/// One change install made to the tree (paths are system paths).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Change {
    /// A directory that did not exist; removed when empty. `data`: holds what pgward wrote (the
    /// audit log, the access state) — kept unless `--purge`, then removed with its contents.
    Dir {
        path: PathBuf,
        #[serde(default)]
        data: bool,
    },
    /// A directory that did not exist, removed with everything in it (/etc/pgward).
    Tree { path: PathBuf },
    /// A file that did not exist.
    File { path: PathBuf },
    /// An existing file that was replaced or edited.
    Edit(FileEdit),
    /// An existing directory whose mode / owner was changed.
    Attrs { path: PathBuf, mode: u32, uid: u32, gid: u32 },
    /// `chattr +a` was set.
    AppendOnly { path: PathBuf },
    /// The account files useradd changed (restored exactly when unchanged since, else `userdel`).
    Account { user: String, group_created: bool, files: Vec<FileEdit> },
    /// `systemctl enable --now` was run.
    Enabled { unit: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEdit {
    path: PathBuf,
    before: Saved,
    /// sha256 right after install (None: install removed it).
    after: Option<String>,
    /// What uninstall does when the file changed since install.
    #[serde(default)]
    fallback: Fallback,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Fallback {
    /// Leave it as it is (and say so).
    #[default]
    Leave,
    /// Remove the `# BEGIN pgward` … `# END pgward` block, keep the rest.
    StripBlock,
}

/// A file as it was before install: its bytes are in the backup directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    existed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup: Option<String>,
    #[serde(default)]
    mode: u32,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    mtime: (i64, u32),
}

/// Install's journal: every change is recorded (and the manifest rewritten) as it is made, so
/// a failed or interrupted install can be undone.
struct Journal<'a> {
    root: &'a Root,
    m: Manifest,
    /// The manifest can be written (the state directory exists).
    live: bool,
    backups: usize,
}

impl Journal<'_> {
    fn record(&mut self, c: Change) -> anyhow::Result<()> {
        self.m.changes.push(c);
        self.persist()
    }
    fn persist(&self) -> anyhow::Result<()> {
        if !self.live {
            return Ok(());
        }
        write_manifest(self.root, &self.m)
    }
    /// Create `sys` and its missing ancestors (those 0755 root:root), recording each.
    fn mkdirs(&mut self, sys: &Path, mode: u32, uid: u32, gid: u32, data: bool) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(sys);
        while let Some(p) = cur {
            if self.root.p(p).exists() {
                break;
            }
            missing.push(p.to_owned());
            cur = p.parent();
        }
        for p in missing.into_iter().rev() {
            let host = self.root.p(&p);
            std::fs::create_dir(&host).with_context(|| format!("creating {}", host.display()))?;
            let last = p == sys;
            self.record(Change::Dir { path: p, data: last && data })?;
            if last {
                set_attrs(&host, mode, uid, gid)?;
            } else {
                set_attrs(&host, 0o755, 0, 0)?;
            }
        }
        Ok(())
    }
    /// Keep a copy of `bytes` (the old content of `sys`, with metadata `meta`) in the backup dir.
    fn save_bytes(&mut self, sys: &Path, bytes: &[u8], meta: &std::fs::Metadata) -> anyhow::Result<Saved> {
        self.backups += 1;
        let name = format!(
            "{:03}-{}",
            self.backups,
            sys.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
        let dst = self.root.p(BACKUP_DIR).join(&name);
        write_file(&dst, bytes, 0o600, 0, 0)?;
        Ok(Saved {
            existed: true,
            backup: Some(name),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
        })
    }
    fn save(&mut self, sys: &Path) -> anyhow::Result<Saved> {
        let host = self.root.p(sys);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) => {
                let bytes = std::fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
                self.save_bytes(sys, &bytes, &meta)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(absent()),
            Err(e) => Err(e).with_context(|| format!("stat {}", host.display())),
        }
    }
}

fn absent() -> Saved {
    Saved { existed: false, backup: None, mode: 0, uid: 0, gid: 0, mtime: (0, 0) }
}

fn write_manifest(root: &Root, m: &Manifest) -> anyhow::Result<()> {
    let path = root.p(MANIFEST);
    let mut text = serde_json::to_string_pretty(m)?;
    text.push('\n');
    write_file(&path, text.as_bytes(), 0o600, 0, 0)
}

fn read_manifest(root: &Root) -> anyhow::Result<Manifest> {
    let path = root.p(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("pgward is not installed in {} (no {})", root.dir.display(), path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let m: Manifest =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not an install manifest", path.display()))?;
    if m.format != MANIFEST_FORMAT {
        bail!("{}: manifest format {} is not supported by this pgward", path.display(), m.format);
    }
    Ok(m)
}

// ---- install -----------------------------------------------------------------------------

/// Everything install needs to know, resolved and checked before anything is changed.
struct Plan {
    root: Root,
    user: String,
    pg_user: String,
    pg_uid: u32,
    pg_gid: u32,
    pg_conf: PathBuf,
    pg_data: Option<PathBuf>,
    pg_port: u16,
    pg_listen: String,
    real_socket_dir: PathBuf,
    socket_dir: PathBuf,
    listen: std::net::SocketAddr,
    upstream_url: String,
    service_role: String,
    password_file: Option<PathBuf>,
    binary: PathBuf,
    bin_dest: PathBuf,
    intercept: bool,
    intercept_cgroup: Option<PathBuf>,
    gateway_cgroup: PathBuf,
    append_only: bool,
    systemctl: bool,
    pg_service: String,
}

fn plan(args: &InstallArgs) -> anyhow::Result<Plan> {
    let root = Root::new(&args.root)?;
    require_root()?;
    if root.p(MANIFEST).exists() {
        bail!(
            "pgward is already installed in {} ({} exists); run `pgward uninstall` first",
            root.dir.display(),
            root.p(MANIFEST).display()
        );
    }
    for p in [CONFIG_DIR, UNIT_FILE, TMPFILES_FILE] {
        if root.p(p).exists() {
            bail!("{} already exists; move it away first (pgward install does not overwrite it)", root.p(p).display());
        }
    }
    for p in [AUDIT_DIR, ACCESS_DIR] {
        if std::fs::read_dir(root.p(p)).is_ok_and(|mut d| d.next().is_some()) {
            bail!(
                "{} is not empty (data of an earlier installation?); move it away first (an \
                 append-only directory needs `chattr -a` before it can be moved)",
                root.p(p).display()
            );
        }
    }
    if !valid_name(&args.user) || !valid_name(&args.pg_user) {
        bail!("--user / --pg-user must be plain user names");
    }
    let real_socket_dir = system_path("--real-socket-dir", &args.real_socket_dir)?;
    let socket_dir = system_path("--socket-dir", &args.socket_dir)?;
    if real_socket_dir == socket_dir {
        bail!("--real-socket-dir and --socket-dir must differ: clients' socket path is pgward's");
    }
    let bin_dir = system_path("--bin-dir", &args.bin_dir)?;
    let listen: std::net::SocketAddr =
        args.listen.parse().with_context(|| format!("--listen {:?} is not HOST:PORT", args.listen))?;
    if args.pg_listen.is_empty() || args.pg_listen.contains('\'') {
        bail!("--pg-listen {:?} is not a listen_addresses value", args.pg_listen);
    }

    let accounts = root.accounts();
    let (pg_uid, pg_gid) = accounts.user(&args.pg_user).with_context(|| {
        format!("user {:?} (--pg-user) does not exist in {}", args.pg_user, root.p("/etc/passwd").display())
    })?;

    let pg_data = args.pg_data.as_deref().map(|p| system_path("--pg-data", p)).transpose()?;
    let pg_conf = match (&args.pg_conf, &pg_data) {
        (Some(c), _) => system_path("--pg-conf", c)?,
        (None, Some(d)) => d.join("postgresql.conf"),
        (None, None) => PathBuf::from("/etc/postgresql/15/main/postgresql.conf"),
    };
    if !root.p(&pg_conf).is_file() {
        bail!("no postgresql.conf at {} (give --pg-conf FILE or --pg-data DIR)", root.p(&pg_conf).display());
    }
    let settings = pg_settings_in(&root, &pg_conf, pg_data.as_deref())?;
    let pg_port = match settings.get("port") {
        Some(s) => s.value.parse::<u16>().with_context(|| format!("port = {:?} in {}", s.value, s.file.display()))?,
        None => 5432,
    };
    if let Some(p) = &args.upstream_password_file {
        std::fs::read(p).with_context(|| format!("cannot read --upstream-password-file {}", p.display()))?;
    }
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating this executable")?,
    };
    if !binary.is_file() {
        bail!("--binary {} is not a file", binary.display());
    }
    let upstream_host = pg_loopback_host(&args.pg_listen);
    let upstream_url = format!(
        "postgres://{}@{}:{pg_port}/{}",
        url_escape(&args.service_role),
        upstream_host,
        url_escape(&args.database)
    );
    let gateway_cgroup = match &args.gateway_cgroup {
        Some(g) => system_path("--gateway-cgroup", g)?,
        None => cgroup2_mount()
            .ok()
            .flatten()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
            .join("system.slice")
            .join(UNIT_NAME)
            .join("gateway"),
    };
    let intercept_cgroup =
        args.intercept_cgroup.as_deref().map(|p| system_path("--intercept-cgroup", p)).transpose()?;
    Ok(Plan {
        systemctl: root.host() && !args.no_systemctl,
        root,
        user: args.user.clone(),
        pg_user: args.pg_user.clone(),
        pg_uid,
        pg_gid,
        pg_conf,
        pg_data,
        pg_port,
        pg_listen: args.pg_listen.clone(),
        real_socket_dir,
        socket_dir,
        listen,
        upstream_url,
        service_role: args.service_role.clone(),
        password_file: args.upstream_password_file.clone(),
        binary,
        bin_dest: bin_dir.join("pgward"),
        intercept: !args.no_intercept,
        intercept_cgroup,
        gateway_cgroup,
        append_only: !args.no_append_only,
        pg_service: args.pg_service.clone(),
    })
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

/// Make the changes, recording each in the journal.
fn apply(plan: &Plan, j: &mut Journal, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    // 1. The state directory first: the manifest and the backups live there.
    let existing = std::fs::metadata(root.p(STATE_DIR)).ok();
    if existing.as_ref().is_some_and(|m| !m.is_dir()) {
        bail!("{} is not a directory", root.p(STATE_DIR).display());
    }
    j.mkdirs(Path::new(STATE_DIR), 0o750, 0, 0, false)?;
    j.live = true;
    if let Some(m) = existing {
        j.m.changes.push(Change::Attrs { path: STATE_DIR.into(), mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() });
    }
    j.persist()?;
    let backup = root.p(BACKUP_DIR);
    std::fs::create_dir_all(&backup).with_context(|| format!("creating {}", backup.display()))?;
    set_attrs(&backup, 0o700, 0, 0)?;

    // 2. The system user.
    let (uid, gid) = ensure_user(plan, j)?;
    set_attrs(&root.p(STATE_DIR), 0o750, 0, gid)?;

    // 3. The binary.
    let dest_host = root.p(&plan.bin_dest);
    let same = plan.binary.canonicalize().ok().zip(dest_host.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    if !same {
        if let Some(dir) = plan.bin_dest.parent() {
            j.mkdirs(dir, 0o755, 0, 0, false)?;
        }
        let before = j.save(&plan.bin_dest)?;
        let bytes = std::fs::read(&plan.binary).with_context(|| format!("reading {}", plan.binary.display()))?;
        if before.existed {
            j.record(Change::Edit(FileEdit {
                path: plan.bin_dest.clone(),
                before,
                after: Some(sha256_hex(&bytes)),
                fallback: Fallback::Leave,
            }))?;
        } else {
            j.record(Change::File { path: plan.bin_dest.clone() })?;
        }
        write_file(&dest_host, &bytes, 0o755, 0, 0)?;
    }

    // 4. The configuration directory.
    let config_dir = root.p(CONFIG_DIR);
    if let Some(parent) = Path::new(CONFIG_DIR).parent() {
        j.mkdirs(parent, 0o755, 0, 0, false)?;
    }
    j.record(Change::Tree { path: CONFIG_DIR.into() })?;
    write_config(plan, &config_dir, gid, notes)?;

    // 5. Audit log and access state.
    j.mkdirs(Path::new(AUDIT_DIR), 0o750, uid, gid, true)?;
    if plan.append_only {
        match set_append_only(&root.p(AUDIT_DIR), true) {
            Ok(()) => j.record(Change::AppendOnly { path: AUDIT_DIR.into() })?,
            Err(e) => notes
                .push(format!("{} is not append-only: the file system does not support `chattr +a` ({e})", AUDIT_DIR)),
        }
    }
    j.mkdirs(Path::new(ACCESS_DIR), 0o700, uid, gid, true)?;

    // 6. Socket directories.
    let mut tmpfiles = format!(
        "# pgward (written by `pgward install`): the real PostgreSQL socket lives where only\n\
         # {pg} and group {user} (pgward) can enter; clients' socket path is pgward's.\n\
         d {real} 0750 {pg} {user} - -\n",
        pg = plan.pg_user,
        user = plan.user,
        real = plan.real_socket_dir.display(),
    );
    let real = root.p(&plan.real_socket_dir);
    if real.exists() {
        let m = std::fs::metadata(&real).with_context(|| format!("stat {}", real.display()))?;
        if !m.is_dir() {
            bail!("{} exists and is not a directory", real.display());
        }
        j.record(Change::Attrs {
            path: plan.real_socket_dir.clone(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })?;
        set_attrs(&real, 0o750, plan.pg_uid, gid)?;
    } else {
        j.mkdirs(&plan.real_socket_dir, 0o750, plan.pg_uid, gid, false)?;
    }
    let public = root.p(&plan.socket_dir);
    if !public.exists() {
        j.mkdirs(&plan.socket_dir, 0o2775, plan.pg_uid, plan.pg_gid, false)?;
        let _ = writeln!(
            tmpfiles,
            "d {} 2775 {} {} - -",
            plan.socket_dir.display(),
            plan.pg_user,
            root.accounts().group_name(plan.pg_gid).unwrap_or_else(|| plan.pg_gid.to_string())
        );
    }
    j.mkdirs(Path::new("/etc/tmpfiles.d"), 0o755, 0, 0, false)?;
    j.record(Change::File { path: TMPFILES_FILE.into() })?;
    write_file(&root.p(TMPFILES_FILE), tmpfiles.as_bytes(), 0o644, 0, 0)?;

    // 7. Postgres: loopback only, socket moved; Debian's client wrapper told about it.
    edit_pg_conf(plan, j, notes)?;
    edit_user_clusters(plan, j, notes)?;

    // 8. The systemd unit.
    let socket_group = {
        let m = std::fs::metadata(&public).with_context(|| format!("stat {}", public.display()))?;
        let accounts = root.accounts();
        if m.mode() & 0o020 != 0 && m.gid() != 0 {
            accounts.group_name(m.gid())
        } else {
            notes.push(format!(
                "{} is not group-writable: pgward (user {}) cannot create its socket there; make it \
                 writable by a group and add that group to SupplementaryGroups= in {}",
                plan.socket_dir.display(),
                plan.user,
                UNIT_FILE
            ));
            None
        }
    };
    j.mkdirs(Path::new("/etc/systemd/system"), 0o755, 0, 0, false)?;
    j.record(Change::File { path: UNIT_FILE.into() })?;
    let unit = unit_text(&UnitParams {
        exec: plan.bin_dest.clone(),
        user: plan.user.clone(),
        supplementary_group: socket_group,
        socket_dir: plan.socket_dir.clone(),
        pg_service: plan.pg_service.clone(),
    });
    write_file(&root.p(UNIT_FILE), unit.as_bytes(), 0o644, 0, 0)?;

    // 9. systemd.
    if plan.systemctl {
        run_systemctl(&["daemon-reload"])?;
        run_systemctl(&["restart", &plan.pg_service])?;
        j.record(Change::Enabled { unit: UNIT_NAME.into() })?;
        run_systemctl(&["enable", "--now", UNIT_NAME])?;
    }
    Ok(())
}

/// `pgward init` (this binary, as a child process) into DIR, then the appliance settings.
fn write_config(plan: &Plan, dir: &Path, gid: u32, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let mut cmd = Command::new(&plan.binary);
    cmd.arg("init")
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &plan.listen.to_string(), "--upstream", &plan.upstream_url])
        .env("PGWARD_LOG", "warn");
    if let Some(pw) = &plan.password_file {
        cmd.arg("--upstream-password-file").arg(pw);
    }
    run_cmd(&mut cmd).context("pgward init")?;

    let path = dir.join("pgward.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut t: toml::Table = toml::from_str(&text).with_context(|| format!("{} (written by init)", path.display()))?;
    let table = |t: &mut toml::Table, k: &str| -> anyhow::Result<toml::Table> {
        Ok(match t.remove(k) {
            Some(toml::Value::Table(x)) => x,
            None => toml::Table::new(),
            Some(_) => bail!("{k} is not a table in {}", path.display()),
        })
    };
    let s = |p: &Path| toml::Value::String(p.display().to_string());

    let mut server = table(&mut t, "server")?;
    server.insert("unix_socket_dir".into(), s(&plan.socket_dir));
    server.insert("unix_socket_port".into(), toml::Value::Integer(plan.pg_port.into()));
    t.insert("server".into(), server.into());

    let mut upstream = table(&mut t, "upstream")?;
    if plan.password_file.is_none() {
        let mut pw = [0u8; 18];
        getrandom::fill(&mut pw).map_err(|e| anyhow!("no randomness: {e}"))?;
        write_file(&dir.join("upstream.password"), format!("{}\n", hex::encode(pw)).as_bytes(), 0o640, 0, gid)?;
        upstream.insert("password_file".into(), "upstream.password".into());
        notes.push(format!(
            "a service password was generated into {CONFIG_DIR}/upstream.password; create the role with it:\n    \
             printf \"CREATE ROLE %s LOGIN PASSWORD '%s';\\nGRANT pg_signal_backend, pg_read_all_settings TO %s;\\n\" \\\n      \
             {role} \"$(head -n1 {CONFIG_DIR}/upstream.password)\" {role} \\\n      \
             | runuser -u {pg} -- psql -h {real} -p {port}",
            role = sh_quote(&plan.service_role),
            pg = plan.pg_user,
            real = plan.real_socket_dir.display(),
            port = plan.pg_port,
        ));
    }
    t.insert("upstream".into(), upstream.into());

    let mut audit = table(&mut t, "audit")?;
    audit.insert("dir".into(), AUDIT_DIR.into());
    t.insert("audit".into(), audit.into());

    let mut ic = toml::Table::new();
    ic.insert("enabled".into(), plan.intercept.into());
    if let Some(c) = &plan.intercept_cgroup {
        ic.insert("cgroup".into(), s(c));
    }
    ic.insert("gateway_cgroup".into(), s(&plan.gateway_cgroup));
    let accounts = plan.root.accounts();
    if let Some((pgward_uid, _)) = accounts.user(&plan.user) {
        ic.insert("exempt_uid".into(), toml::Value::Integer(pgward_uid.into()));
    }
    ic.insert(
        "protected".into(),
        toml::Value::Array(vec![format!("0.0.0.0:{}", plan.pg_port).into(), format!("[::]:{}", plan.pg_port).into()]),
    );
    ic.insert("unix_socket_check".into(), "refuse".into());
    ic.insert("upstream_socket_dirs".into(), toml::Value::Array(vec![s(&plan.real_socket_dir)]));
    ic.insert("state_file".into(), STATE_FILE.into());
    t.insert("intercept".into(), ic.into());

    // `[access]` (revocations, JIT grants) exists in builds that have it: its state must be
    // writable by the service, so it lives under /var/lib/pgward, not /etc.
    let mut with_access = t.clone();
    let mut access = match with_access.remove("access") {
        Some(toml::Value::Table(x)) => x,
        _ => toml::Table::new(),
    };
    access.insert("state_dir".into(), ACCESS_DIR.into());
    with_access.insert("access".into(), access.into());

    let header = "# pgward configuration, written by `pgward install` (see `pgward uninstall`).\n\
                  # Relative paths are resolved against the directory holding this file.\n\n";
    let body = format!("{header}{}", toml::to_string_pretty(&with_access)?);
    write_file(&path, body.as_bytes(), 0o640, 0, gid)?;
    if let Err(e) = Config::load(&path) {
        let msg = format!("{e}");
        if !msg.contains("access") {
            return Err(e).context("the installed config does not load (bug)");
        }
        let body = format!("{header}{}", toml::to_string_pretty(&t)?);
        write_file(&path, body.as_bytes(), 0o640, 0, gid)?;
        Config::load(&path).context("the installed config does not load (bug)")?;
    }
    // init made an audit directory next to the config; the installed one is AUDIT_DIR.
    let _ = std::fs::remove_dir(dir.join("audit"));
    // Everything readable by group pgward only; nothing writable by it.
    chown_tree(dir, 0, gid, 0o750, 0o640)?;
    Ok(())
}

/// Set listen_addresses and unix_socket_directories: a drop-in in the config's include_dir when
/// it has one (and it wins), else a marked block appended to postgresql.conf. Verified by
/// computing the settings Postgres will use.
fn edit_pg_conf(plan: &Plan, j: &mut Journal, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    let settings_text = format!(
        "listen_addresses = '{}'\nunix_socket_directories = '{}'\n",
        plan.pg_listen.replace('\'', "''"),
        plan.real_socket_dir.display().to_string().replace('\'', "''")
    );
    let wins = |s: &BTreeMap<String, PgSetting>| -> Result<(), String> {
        for (k, want) in [
            ("listen_addresses", plan.pg_listen.clone()),
            ("unix_socket_directories", plan.real_socket_dir.display().to_string()),
        ] {
            match s.get(k) {
                Some(v) if v.value == want => {}
                Some(v) => return Err(format!("{k} = '{}' in {} takes precedence", v.value, v.file.display())),
                None => return Err(format!("{k} is not set (bug)")),
            }
        }
        Ok(())
    };

    // A drop-in, when postgresql.conf includes a directory (Debian: include_dir = 'conf.d').
    let main_text = std::fs::read_to_string(root.p(&plan.pg_conf))?;
    let include_dir = parse_pg_conf(&main_text)
        .into_iter()
        .filter(|(k, _)| k == "include_dir")
        .map(|(_, v)| resolve_pg_path(&plan.pg_conf, &v))
        .find(|d| root.p(d).is_dir());
    if let Some(dir) = include_dir {
        let dropin = dir.join(DROPIN_NAME);
        if root.p(&dropin).exists() {
            bail!("{} already exists", root.p(&dropin).display());
        }
        let text = format!(
            "# pgward (written by `pgward install`, removed by `pgward uninstall`): Postgres listens on\n\
             # loopback only and keeps its socket where only pgward can reach it.\n{settings_text}"
        );
        j.record(Change::File { path: dropin.clone() })?;
        let m = std::fs::metadata(root.p(&dir))?;
        write_file(&root.p(&dropin), text.as_bytes(), 0o644, m.uid(), m.gid())?;
        match wins(&pg_settings_in(root, &plan.pg_conf, plan.pg_data.as_deref())?) {
            Ok(()) => return Ok(()),
            Err(why) => {
                notes.push(format!(
                    "a drop-in in {} would not take effect ({why}); appended to {} instead",
                    dir.display(),
                    plan.pg_conf.display()
                ));
                std::fs::remove_file(root.p(&dropin))?;
                j.m.changes.pop();
                j.persist()?;
            }
        }
    }

    // A marked block at the end of postgresql.conf (later settings win).
    let before = j.save(&plan.pg_conf)?;
    let mut text = main_text.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(
        text,
        "\n{BLOCK_BEGIN} (written by `pgward install`, removed by `pgward uninstall`)\n{settings_text}{BLOCK_END}\n"
    );
    j.record(Change::Edit(FileEdit {
        path: plan.pg_conf.clone(),
        before: before.clone(),
        after: Some(sha256_hex(text.as_bytes())),
        fallback: Fallback::StripBlock,
    }))?;
    replace_file_contents(&root.p(&plan.pg_conf), text.as_bytes())?;
    if let Err(why) = wins(&pg_settings_in(root, &plan.pg_conf, plan.pg_data.as_deref())?) {
        bail!("cannot make Postgres listen on loopback with its socket in {}: {why}", plan.real_socket_dir.display());
    }
    Ok(())
}

/// Debian's pg_wrapper (psql, pg_dump, …) connects local users to the socket directory it reads
/// from the cluster's config — after install the real one, which only Postgres and pgward may
/// enter. /etc/postgresql-common/user_clusters says otherwise: Postgres's own user keeps going
/// to the cluster directly, everyone else to the clients' socket path (pgward). Only for a
/// Debian cluster (/etc/postgresql/VERSION/CLUSTER/postgresql.conf) with postgresql-common.
fn edit_user_clusters(plan: &Plan, j: &mut Journal, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    let parts: Vec<String> = plan.pg_conf.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let (version, cluster) = match parts.as_slice() {
        [r, etc, pg, v, c, f] if r == "/" && etc == "etc" && pg == "postgresql" && f == "postgresql.conf" => {
            (v.clone(), c.clone())
        }
        _ => return Ok(()),
    };
    if !root.p("/etc/postgresql-common").is_dir() {
        return Ok(());
    }
    let sys = PathBuf::from(USER_CLUSTERS);
    let host = root.p(&sys);
    let old = std::fs::read_to_string(&host).unwrap_or_default();
    if old.lines().any(|l| {
        let f: Vec<&str> = l.split('#').next().unwrap_or("").split_whitespace().collect();
        f.len() >= 2 && f[0] == "*" && f[1] == "*"
    }) {
        notes.push(format!(
            "{USER_CLUSTERS} already has a line for every user; psql (pg_wrapper) follows it, not pgward's socket path"
        ));
    }
    let mut text = old.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(
        text,
        "\n{BLOCK_BEGIN} (written by `pgward install`, removed by `pgward uninstall`): {pg} reaches the\n\
         # cluster directly; everyone else's psql goes to the default socket path, i.e. pgward.\n\
         {pg}\t*\t{version}\t{cluster}\t*\n\
         *\t*\t{version}\t{sock}:{port}\t*\n{BLOCK_END}\n",
        pg = plan.pg_user,
        sock = plan.socket_dir.display(),
        port = plan.pg_port,
    );
    let before = j.save(&sys)?;
    j.record(Change::Edit(FileEdit {
        path: sys,
        before: before.clone(),
        after: Some(sha256_hex(text.as_bytes())),
        fallback: Fallback::StripBlock,
    }))?;
    if before.existed {
        replace_file_contents(&host, text.as_bytes())?;
    } else {
        write_file(&host, text.as_bytes(), 0o644, 0, 0)?;
    }
    Ok(())
}

/// Create the system user (unless it exists), recording what useradd changed in /etc.
fn ensure_user(plan: &Plan, j: &mut Journal) -> anyhow::Result<(u32, u32)> {
    let root = &plan.root;
    let accounts = root.accounts();
    if let Some(ids) = accounts.user(&plan.user) {
        return Ok(ids);
    }
    let group_exists = accounts.group(&plan.user).is_some();
    let before = account_snapshot(root)?;
    let mut cmd = Command::new("useradd");
    if !root.host() {
        cmd.arg("--prefix").arg(&root.dir);
    }
    cmd.args(["--system", "--no-create-home", "--home-dir", STATE_DIR, "--shell", "/usr/sbin/nologin"])
        .args(["--comment", "pgward PostgreSQL gateway"]);
    if group_exists {
        cmd.args(["--gid", &plan.user]);
    } else {
        cmd.arg("--user-group");
    }
    cmd.arg(&plan.user);
    let result = run_cmd(&mut cmd);
    // Record whatever useradd changed, even when it failed half way.
    let after = account_snapshot(root)?;
    let mut files = Vec::new();
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        let (b, a) = (before.get(name), after.get(name));
        let same = match (b, a) {
            (Some(x), Some(y)) => x.bytes == y.bytes && x.mode == y.mode && x.uid == y.uid && x.gid == y.gid,
            (None, None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        let sys = Path::new("/etc").join(name);
        let saved = match b {
            Some(x) => j.save_bytes(&sys, &x.bytes, &x.meta)?,
            None => absent(),
        };
        files.push(FileEdit {
            path: sys,
            before: saved,
            after: a.map(|x| sha256_hex(&x.bytes)),
            fallback: Fallback::Leave,
        });
    }
    j.record(Change::Account { user: plan.user.clone(), group_created: !group_exists, files })?;
    result.with_context(|| format!("creating the system user {}", plan.user))?;
    root.accounts()
        .user(&plan.user)
        .with_context(|| format!("useradd ran but {} has no user {}", root.p("/etc/passwd").display(), plan.user))
}

struct Snap {
    bytes: Vec<u8>,
    meta: std::fs::Metadata,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The account database files (and their backups and locks) in /etc.
fn account_snapshot(root: &Root) -> anyhow::Result<BTreeMap<String, Snap>> {
    const PREFIXES: [&str; 7] = ["passwd", "group", "shadow", "gshadow", "subuid", "subgid", ".pwd.lock"];
    let mut out = BTreeMap::new();
    let etc = root.p("/etc");
    let rd = std::fs::read_dir(&etc).with_context(|| format!("reading {}", etc.display()))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let meta = e.path().symlink_metadata()?;
        if !meta.is_file() {
            continue;
        }
        let bytes = std::fs::read(e.path())?;
        out.insert(name, Snap { bytes, mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), meta });
    }
    Ok(out)
}

fn install_report(plan: &Plan, notes: &[String]) -> String {
    let mut o = String::new();
    let r = &plan.root;
    let where_ = if r.host() { String::new() } else { format!(" into {}", r.dir.display()) };
    let _ = writeln!(o, "pgward installed{where_}:");
    let line = |o: &mut String, a: &str, b: &str| {
        let _ = writeln!(o, "  {a:<38} {b}");
    };
    line(&mut o, &format!("user {}", plan.user), "system user and group");
    line(&mut o, &plan.bin_dest.display().to_string(), "the binary");
    line(&mut o, CONFIG_FILE, "configuration (0640 root:pgward; keys, TLS, policy next to it)");
    line(&mut o, AUDIT_DIR, "audit log (pgward 0750, append-only where supported)");
    line(&mut o, ACCESS_DIR, "revocations and JIT grants");
    line(
        &mut o,
        &plan.real_socket_dir.display().to_string(),
        &format!("the real Postgres socket (0750 {}:{})", plan.pg_user, plan.user),
    );
    line(
        &mut o,
        &plan.pg_conf.display().to_string(),
        &format!(
            "Postgres: listen_addresses = '{}', unix_socket_directories = '{}'",
            plan.pg_listen,
            plan.real_socket_dir.display()
        ),
    );
    line(&mut o, UNIT_FILE, "sandboxed systemd unit");
    line(&mut o, MANIFEST, "what changed (for `pgward uninstall`)");
    let _ = writeln!(
        o,
        "\nClients: `psql -h {} -p {}` (the default socket) or TCP port {} — both land in pgward (token as password).",
        plan.socket_dir.display(),
        plan.pg_port,
        plan.pg_port
    );
    if !plan.intercept {
        let _ =
            writeln!(o, "Interception is off ([intercept] enabled = false): TCP clients must dial {}.", plan.listen);
    }
    for n in notes {
        let _ = writeln!(o, "Note: {n}");
    }
    if plan.systemctl {
        let _ = writeln!(
            o,
            "\nPostgres was restarted; pgward is enabled and running. Check: pgward doctor --config {CONFIG_FILE}"
        );
    } else {
        let _ = writeln!(
            o,
            "\nNext: restart Postgres (its socket moves to {}), then start pgward \
             (systemctl enable --now {UNIT_NAME}), then: pgward doctor --config {CONFIG_FILE}",
            plan.real_socket_dir.display()
        );
    }
    o
}

// ---- uninstall ---------------------------------------------------------------------------

/// Undo the manifest in `root`. Returns the report and whether everything was undone.
fn uninstall(root: &Root, purge: bool, systemctl: bool) -> anyhow::Result<(String, bool)> {
    let m = read_manifest(root)?;
    let mut o = String::new();
    // Interception is pinned and outlives pgward: stop the service, then detach (audited, while
    // the config and keys are still there). Only on the running system (the pins are the
    // host's, not the tree's).
    let detached = if root.host() { detach_interception(root, systemctl && m.systemctl, &mut o) } else { true };
    if !purge {
        match retire_config(root) {
            Ok(()) => {}
            Err(e) => {
                let _ = writeln!(o, "warning: could not keep a config to verify the audit log with: {e:#}");
            }
        }
    }
    let (report, ok) = undo_all(root, &m, purge, systemctl && m.systemctl)?;
    o.push_str(&report);
    let ok = ok && detached;
    if ok {
        let _ = writeln!(o, "pgward uninstalled from {}.", root.dir.display());
        if !purge {
            let _ = writeln!(
                o,
                "Kept: the audit log {AUDIT_DIR} and access state {ACCESS_DIR} (now owned by root); verify the log with\n  \
                 pgward audit verify --config {RETIRED_DIR}/pgward.toml\n(`pgward uninstall --purge` would have removed them.)"
            );
        }
    } else {
        let _ = writeln!(
            o,
            "pgward uninstall is incomplete; fix the above and run it again (the manifest keeps what is left)."
        );
    }
    Ok((o, ok))
}

/// `pgward intercept detach` for the installed config (after stopping the unit). False, with
/// the reason in `o`, when the programs could not be detached.
fn detach_interception(root: &Root, systemctl: bool, o: &mut String) -> bool {
    let path = root.p(CONFIG_FILE);
    let Ok(cfg) = Config::load(&path) else { return true };
    if !cfg.intercept.enabled && !crate::ebpf::pins::any_pinned(&crate::ebpf::pins::pin_dir(&cfg)) {
        return true;
    }
    if systemctl && let Err(e) = run_systemctl(&["stop", UNIT_NAME]) {
        let _ = writeln!(o, "warning: stopping {UNIT_NAME}: {e:#}");
    }
    match super::intercept::detach(&cfg, Some("pgward uninstall")) {
        Ok(report) => {
            o.push_str(&report);
            true
        }
        Err(e) => {
            let _ = writeln!(o, "error: the interception programs stay attached: {e:#}; stop pgward, then `pgward intercept detach --config {CONFIG_FILE}`");
            false
        }
    }
}

/// Keep the config (without private keys) next to the audit log, to verify it later.
fn retire_config(root: &Root) -> anyhow::Result<()> {
    let cfg = root.p(CONFIG_FILE);
    if !cfg.exists() {
        return Ok(());
    }
    let dir = root.p(RETIRED_DIR);
    std::fs::create_dir_all(dir.join("keys"))?;
    set_attrs(&dir, 0o750, 0, 0)?;
    set_attrs(&dir.join("keys"), 0o750, 0, 0)?;
    let text = std::fs::read(&cfg)?;
    write_file(&dir.join("pgward.toml"), &text, 0o640, 0, 0)?;
    let loaded = Config::load(&cfg)?;
    let jwks = loaded.resolve(&loaded.auth.jwks);
    let rel = loaded.auth.jwks.clone();
    if rel.is_relative() && !rel.components().any(|c| matches!(c, Component::ParentDir)) {
        let dst = dir.join(&rel);
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p)?;
        }
        write_file(&dst, &std::fs::read(&jwks)?, 0o640, 0, 0)?;
    }
    Ok(())
}

/// Undo `m.changes` in reverse order. Failed steps stay in the manifest (rewritten), so the
/// next run retries them; when everything is undone the manifest and backups go.
fn undo_all(root: &Root, m: &Manifest, purge: bool, systemctl: bool) -> anyhow::Result<(String, bool)> {
    let mut o = String::new();
    let mut left: Vec<Change> = Vec::new();
    let mut pg_touched = false;
    // The state directory (and ancestors install created) go last: it holds the manifest and
    // the backups.
    let is_state_dir = |c: &Change| matches!(c, Change::Dir { path, .. } if Path::new(STATE_DIR).starts_with(path));
    for c in m.changes.iter().rev() {
        if is_state_dir(c) {
            continue;
        }
        if matches!(c, Change::Edit(FileEdit { fallback: Fallback::StripBlock, .. }))
            || matches!(c, Change::File { path } if path.file_name().is_some_and(|n| n == DROPIN_NAME))
        {
            pg_touched = true;
        }
        match undo(root, c, purge, systemctl) {
            Ok(msg) => {
                if let Some(msg) = msg {
                    let _ = writeln!(o, "{msg}");
                }
            }
            Err(e) => {
                let _ = writeln!(o, "error: {e:#}");
                left.push(c.clone());
            }
        }
    }
    if systemctl {
        for args in [&["daemon-reload"][..], &["restart", &m.pg_service][..]] {
            if args[0] == "restart" && !pg_touched {
                continue;
            }
            if let Err(e) = run_systemctl(args) {
                let _ = writeln!(o, "error: {e:#}");
            }
        }
    }
    if left.is_empty() {
        let _ = std::fs::remove_file(root.p(MANIFEST));
        let _ = std::fs::remove_dir_all(root.p(BACKUP_DIR));
        for c in m.changes.iter().rev().filter(|c| is_state_dir(c)) {
            if let Err(e) = undo(root, c, purge, systemctl) {
                let _ = writeln!(o, "error: {e:#}");
                left.push(c.clone());
            }
        }
    }
    let ok = left.is_empty();
    if !ok {
        left.reverse();
        let rest = Manifest { changes: left, ..m.clone() };
        if root.p(STATE_DIR).is_dir() {
            write_manifest(root, &rest)?;
        }
    }
    Ok((o, ok))
}

/// Undo one change. Ok(Some(msg)) for things worth saying (kept data, files changed since).
fn undo(root: &Root, c: &Change, purge: bool, systemctl: bool) -> anyhow::Result<Option<String>> {
    match c {
        Change::Enabled { unit } => {
            if systemctl {
                run_systemctl(&["disable", "--now", unit])?;
            }
            Ok(None)
        }
        Change::File { path } => {
            let p = root.p(path);
            match std::fs::remove_file(&p) {
                Ok(()) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Change::Tree { path } => {
            let p = root.p(path);
            if p.exists() {
                clear_append_only_tree(&p);
                std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
            }
            Ok(None)
        }
        Change::Dir { path, data } => {
            let p = root.p(path);
            if !p.exists() {
                return Ok(None);
            }
            if *data && !purge {
                // Kept, handed to root (the user goes). An append-only inode's owner cannot
                // change: lift the flag for the chown.
                let append_only = is_append_only(&p).unwrap_or(false);
                if append_only {
                    set_append_only(&p, false).with_context(|| format!("chattr -a {}", p.display()))?;
                }
                let r = chown_tree_ids(&p, 0, 0);
                if append_only {
                    set_append_only(&p, true).with_context(|| format!("chattr +a {}", p.display()))?;
                }
                r?;
                return Ok(None);
            }
            if *data {
                clear_append_only_tree(&p);
                std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
                return Ok(None);
            }
            match std::fs::remove_dir(&p) {
                Ok(()) => Ok(None),
                Err(_) if Path::new(STATE_DIR).starts_with(path) && !purge => {
                    // It holds the kept audit log.
                    if path == Path::new(STATE_DIR) {
                        set_attrs(&p, 0o750, 0, 0)?;
                    }
                    Ok(None)
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    let names: Vec<String> = std::fs::read_dir(&p)
                        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).take(5).collect())
                        .unwrap_or_default();
                    bail!(
                        "{} is not empty ({}); install created it — is a service still using it (Postgres \
                         keeps its socket there until restarted)?",
                        p.display(),
                        names.join(", ")
                    )
                }
                Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Change::Attrs { path, mode, uid, gid } => {
            let p = root.p(path);
            if p.exists() {
                set_attrs(&p, *mode, *uid, *gid)?;
            }
            Ok(None)
        }
        Change::AppendOnly { path } => {
            let p = root.p(path);
            let keep = !purge && path == Path::new(AUDIT_DIR);
            if p.exists() && !keep {
                set_append_only(&p, false).with_context(|| format!("chattr -a {}", p.display()))?;
            }
            Ok(None)
        }
        Change::Edit(e) => undo_edit(root, e),
        Change::Account { user, group_created, files } => {
            let unchanged = files.iter().all(|f| current_sha(&root.p(&f.path)) == f.after);
            if unchanged {
                for f in files {
                    restore(root, &f.path, &f.before)?;
                }
                return Ok(None);
            }
            // Someone changed the account files since: remove just our user (and group).
            if root.accounts().user(user).is_some() {
                let mut cmd = Command::new("userdel");
                if !root.host() {
                    cmd.arg("--prefix").arg(&root.dir);
                }
                run_cmd(cmd.arg(user)).with_context(|| format!("userdel {user}"))?;
            }
            if *group_created && root.accounts().group(user).is_some() {
                let mut cmd = Command::new("groupdel");
                if !root.host() {
                    cmd.arg("--prefix").arg(&root.dir);
                }
                run_cmd(cmd.arg(user)).with_context(|| format!("groupdel {user}"))?;
            }
            Ok(Some(format!(
                "the account files changed since install: removed user {user} with userdel (backups such as /etc/passwd- are left as they are)"
            )))
        }
    }
}

fn undo_edit(root: &Root, e: &FileEdit) -> anyhow::Result<Option<String>> {
    let p = root.p(&e.path);
    if current_sha(&p) == e.after {
        restore(root, &e.path, &e.before)?;
        return Ok(None);
    }
    match e.fallback {
        Fallback::StripBlock => {
            let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let stripped = strip_block(&text);
            if stripped != text {
                replace_file_contents(&p, stripped.as_bytes())?;
            }
            Ok(Some(format!("{} changed since install: removed only pgward's block from it", e.path.display())))
        }
        Fallback::Leave => Ok(Some(format!("{} changed since install: left as it is", e.path.display()))),
    }
}

/// Put `sys` back as `saved` describes it (or remove it when it did not exist).
fn restore(root: &Root, sys: &Path, saved: &Saved) -> anyhow::Result<()> {
    let p = root.p(sys);
    if !saved.existed {
        return match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
        };
    }
    let name = saved.backup.as_deref().context("manifest: saved file without a backup")?;
    let src = root.p(BACKUP_DIR).join(name);
    let bytes = std::fs::read(&src).with_context(|| format!("reading backup {}", src.display()))?;
    write_file(&p, &bytes, saved.mode, saved.uid, saved.gid)?;
    let t = SystemTime::UNIX_EPOCH + Duration::new(saved.mtime.0.max(0) as u64, saved.mtime.1);
    let f = std::fs::OpenOptions::new().write(true).open(&p)?;
    f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))?;
    Ok(())
}

fn strip_block(text: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let Some(start) = lines.iter().position(|l| l.starts_with(BLOCK_BEGIN)) else {
        return text.to_string();
    };
    let Some(end) = lines[start..].iter().position(|l| l.trim_end() == BLOCK_END).map(|i| start + i) else {
        return text.to_string();
    };
    // The empty line install put before the block goes too.
    let from = if start > 0 && lines[start - 1] == "\n" { start - 1 } else { start };
    let mut out: String = lines[..from].concat();
    out.push_str(&lines[end + 1..].concat());
    out
}

// ---- postgresql.conf ---------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct PgSetting {
    pub value: String,
    /// The file that set it last (a system path).
    pub file: PathBuf,
}

/// `name = value` lines of a postgresql.conf-style file (names lowercased, values unquoted).
pub fn parse_pg_conf(text: &str) -> Vec<(String, String)> {
    text.lines().filter_map(parse_pg_line).collect()
}

fn parse_pg_line(line: &str) -> Option<(String, String)> {
    let s = line.trim_start();
    if s.is_empty() || s.starts_with('#') {
        return None;
    }
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let name = s[..end].to_ascii_lowercase();
    let mut rest = s[end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let value = if let Some(r) = rest.strip_prefix('\'') {
        let mut v = String::new();
        let mut chars = r.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    v.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(n) = chars.next() {
                        v.push(n);
                    }
                }
                c => v.push(c),
            }
        }
        v
    } else {
        rest.split(|c: char| c.is_whitespace() || c == '#').next().unwrap_or("").to_string()
    };
    Some((name, value))
}

fn resolve_pg_path(including_file: &Path, value: &str) -> PathBuf {
    let p = Path::new(value);
    if p.is_absolute() { p.to_owned() } else { including_file.parent().unwrap_or(Path::new("/")).join(p) }
}

/// The settings Postgres will use: postgresql.conf with its includes (include, include_if_exists,
/// include_dir), then postgresql.auto.conf in the data directory. Paths are system paths.
pub fn pg_settings(
    root_dir: &Path,
    conf: &Path,
    data_dir: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, PgSetting>> {
    let root = Root { dir: root_dir.to_owned() };
    pg_settings_in(&root, conf, data_dir)
}

fn pg_settings_in(root: &Root, conf: &Path, data_dir: Option<&Path>) -> anyhow::Result<BTreeMap<String, PgSetting>> {
    fn read(
        root: &Root,
        sys: &Path,
        depth: u32,
        must: bool,
        out: &mut BTreeMap<String, PgSetting>,
    ) -> anyhow::Result<()> {
        if depth > 10 {
            bail!("{}: includes nested too deeply", sys.display());
        }
        let text = match std::fs::read_to_string(root.p(sys)) {
            Ok(t) => t,
            Err(e) if !must && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", root.p(sys).display())),
        };
        for (name, value) in parse_pg_conf(&text) {
            match name.as_str() {
                "include" | "include_if_exists" => {
                    read(root, &resolve_pg_path(sys, &value), depth + 1, name == "include", out)?;
                }
                "include_dir" => {
                    let dir = resolve_pg_path(sys, &value);
                    let mut files: Vec<String> = std::fs::read_dir(root.p(&dir))
                        .with_context(|| format!("include_dir {}", root.p(&dir).display()))?
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".conf") && !n.starts_with('.'))
                        .collect();
                    files.sort();
                    for f in files {
                        read(root, &dir.join(f), depth + 1, true, out)?;
                    }
                }
                _ => {
                    out.insert(name, PgSetting { value, file: sys.to_owned() });
                }
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    read(root, conf, 0, true, &mut out)?;
    let data = match (data_dir, out.get("data_directory")) {
        (Some(d), _) => d.to_owned(),
        (None, Some(s)) => PathBuf::from(&s.value),
        (None, None) => conf.parent().unwrap_or(Path::new("/")).to_owned(),
    };
    read(root, &data.join("postgresql.auto.conf"), 0, false, &mut out)?;
    Ok(out)
}

/// The host pgward dials for a Postgres with these listen_addresses.
fn pg_loopback_host(listen: &str) -> String {
    let addrs: Vec<&str> = listen.split(',').map(str::trim).collect();
    if addrs.iter().any(|a| matches!(*a, "127.0.0.1" | "localhost" | "*" | "0.0.0.0")) {
        return "127.0.0.1".into();
    }
    match addrs.first() {
        Some(a) if a.contains(':') => format!("[{}]", a.trim_matches(|c| c == '[' || c == ']')),
        Some(a) if !a.is_empty() => a.to_string(),
        _ => "127.0.0.1".into(),
    }
}

// ---- systemd -----------------------------------------------------------------------------

pub struct UnitParams {
    pub exec: PathBuf,
    pub user: String,
    /// Group that may create sockets in the clients' socket directory.
    pub supplementary_group: Option<String>,
    pub socket_dir: PathBuf,
    pub pg_service: String,
}

/// The systemd unit: pgward as its own user, with the eBPF capabilities only, a read-only
/// system except the audit log (and the socket directory it listens in), no new privileges.
pub fn unit_text(p: &UnitParams) -> String {
    let supp = match &p.supplementary_group {
        Some(g) => format!(
            "# May create its socket in {} (that directory's group).\nSupplementaryGroups={g}\n",
            p.socket_dir.display()
        ),
        None => String::new(),
    };
    format!(
        r#"# pgward: token-authenticated, audited PostgreSQL gateway. Written by `pgward install`;
# `pgward uninstall` removes it. Check the host with: pgward doctor --config {CONFIG_FILE}
[Unit]
Description=pgward PostgreSQL gateway (token login, policies, write-ahead audit log)
After=network.target {pg}
Wants=network.target

[Service]
Type=exec
ExecStart={exec} serve --config {CONFIG_FILE}
Restart=on-failure
RestartSec=2s
User={user}
Group={user}
{supp}UMask=0027

# eBPF interception: load and attach the programs (CAP_BPF, CAP_NET_ADMIN; CAP_PERFMON for the
# verifier's pointer rules). Nothing else.
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON
AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON
NoNewPrivileges=yes
# The programs are pinned in bpffs so that interception outlives pgward (closed while it is
# stopped or restarting); the pin directory is pgward's. '+': run with full privileges, before
# the sandbox below applies.
ExecStartPre=+/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; install -d -m 0700 -o {user} -g {user} /sys/fs/bpf/pgward'
# pgward moves itself into a child cgroup ("gateway") whose connects the programs exempt.
Delegate=yes
# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
LimitMEMLOCK=infinity
LimitNOFILE=65536

# File system: everything read-only but the audit log, the access state, pgward's socket
# directory and its runtime directory (/run/pgward: the interception state file).
ProtectSystem=strict
ReadWritePaths={AUDIT_DIR} {ACCESS_DIR} {sock} -/sys/fs/bpf/pgward
RuntimeDirectory=pgward
RuntimeDirectoryMode=0750
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
# Not ProtectProc=invisible: the audit log names intercepted clients from /proc/<pid>.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# bpf(2) is in @privileged; it is what the capabilities above are for.
SystemCallFilter=bpf
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"#,
        pg = p.pg_service,
        exec = p.exec.display(),
        user = p.user,
        sock = p.socket_dir.display(),
    )
}

fn run_systemctl(args: &[&str]) -> anyhow::Result<()> {
    run_cmd(Command::new("systemctl").args(args)).map(|_| ())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !s.starts_with('-')
}

// ---- files -------------------------------------------------------------------------------

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn current_sha(p: &Path) -> Option<String> {
    std::fs::read(p).ok().map(|b| sha256_hex(&b))
}

fn set_attrs(p: &Path, mode: u32, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).with_context(|| format!("chown {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", p.display()))
}

/// Write a file atomically (temp file + rename) with the given mode and owner.
fn write_file(p: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) -> anyhow::Result<()> {
    let dir = p.parent().context("file without a directory")?;
    let tmp = dir.join(format!(".{}.pgward-tmp", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
    }
    set_attrs(&tmp, mode, uid, gid)?;
    std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))
}

/// Replace a file's contents keeping its mode and owner.
fn replace_file_contents(p: &Path, data: &[u8]) -> anyhow::Result<()> {
    let m = std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?;
    write_file(p, data, m.mode() & 0o7777, m.uid(), m.gid())
}

/// chown uid:gid and chmod (dirs `dmode`, files `fmode`) everything under `dir`, itself included.
fn chown_tree(dir: &Path, uid: u32, gid: u32, dmode: u32, fmode: u32) -> anyhow::Result<()> {
    set_attrs(dir, dmode, uid, gid)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let t = e.file_type()?;
        if t.is_dir() {
            chown_tree(&e.path(), uid, gid, dmode, fmode)?;
        } else if t.is_file() {
            set_attrs(&e.path(), fmode, uid, gid)?;
        }
    }
    Ok(())
}

/// chown (only) everything under `dir`, itself included.
fn chown_tree_ids(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).with_context(|| format!("chown {}", dir.display()))?;
    if dir.is_dir() && !dir.is_symlink() {
        for e in std::fs::read_dir(dir)?.flatten() {
            chown_tree_ids(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

// ---- small helpers -----------------------------------------------------------------------

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

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_-.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:=@,+".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_conf_lines() {
        let p = |l: &str| parse_pg_line(l);
        assert_eq!(p("port = 5433"), Some(("port".into(), "5433".into())));
        assert_eq!(p("  Port 5433 # comment"), Some(("port".into(), "5433".into())));
        assert_eq!(p("listen_addresses='localhost'  # what IP"), Some(("listen_addresses".into(), "localhost".into())));
        assert_eq!(p("a = 'it''s \\'x\\''"), Some(("a".into(), "it's 'x'".into())));
        assert_eq!(p("#port = 1"), None);
        assert_eq!(p("   "), None);
        assert_eq!(p("include_dir = 'conf.d'"), Some(("include_dir".into(), "conf.d".into())));
    }

    #[test]
    fn effective_settings_follow_includes_and_auto_conf() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root { dir: tmp.path().to_owned() };
        let etc = root.p("/etc/postgresql/15/main");
        std::fs::create_dir_all(etc.join("conf.d")).unwrap();
        let data = root.p("/var/lib/postgresql/15/main");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(
            etc.join("postgresql.conf"),
            "data_directory = '/var/lib/postgresql/15/main'\nport = 5432\nlisten_addresses = '*'\n\
             include_dir = 'conf.d'\ninclude_if_exists = 'missing.conf'\n",
        )
        .unwrap();
        std::fs::write(etc.join("conf.d/10-port.conf"), "port = 5433\n").unwrap();
        std::fs::write(etc.join("conf.d/.hidden.conf"), "port = 1\n").unwrap();
        let conf = Path::new("/etc/postgresql/15/main/postgresql.conf");
        let s = pg_settings_in(&root, conf, None).unwrap();
        assert_eq!(s["port"].value, "5433");
        assert_eq!(s["port"].file, Path::new("/etc/postgresql/15/main/conf.d/10-port.conf"));
        assert_eq!(s["listen_addresses"].value, "*");
        std::fs::write(data.join("postgresql.auto.conf"), "listen_addresses = '10.0.0.1'\n").unwrap();
        let s = pg_settings_in(&root, conf, None).unwrap();
        assert_eq!(s["listen_addresses"].value, "10.0.0.1");
        assert_eq!(s["listen_addresses"].file, Path::new("/var/lib/postgresql/15/main/postgresql.auto.conf"));
    }

    #[test]
    fn block_strip_keeps_the_rest() {
        let orig = "a = 1\nb = 2\n";
        let with = format!("{orig}\n{BLOCK_BEGIN} (x)\nlisten_addresses = '127.0.0.1'\n{BLOCK_END}\nc = 3\n");
        assert_eq!(strip_block(&with), "a = 1\nb = 2\nc = 3\n");
        assert_eq!(strip_block(orig), orig);
    }

    #[test]
    fn upstream_host_from_listen_addresses() {
        assert_eq!(pg_loopback_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(pg_loopback_host("localhost, ::1"), "127.0.0.1");
        assert_eq!(pg_loopback_host("::1"), "[::1]");
        assert_eq!(pg_loopback_host("10.1.2.3"), "10.1.2.3");
        assert_eq!(url_escape("my db"), "my%20db");
    }

    #[test]
    fn unit_has_the_sandbox() {
        let u = unit_text(&UnitParams {
            exec: "/usr/local/bin/pgward".into(),
            user: "pgward".into(),
            supplementary_group: Some("postgres".into()),
            socket_dir: "/run/postgresql".into(),
            pg_service: "postgresql.service".into(),
        });
        for needle in [
            "ExecStart=/usr/local/bin/pgward serve --config /etc/pgward/pgward.toml",
            "User=pgward",
            "SupplementaryGroups=postgres",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/pgward/audit /var/lib/pgward/state /run/postgresql",
            "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
            "PrivateTmp=yes",
            "SystemCallFilter=@system-service",
            "SystemCallFilter=bpf",
        ] {
            assert!(u.contains(needle), "unit lacks {needle:?}:\n{u}");
        }
        // The bpf allowance comes after the @privileged deny (later lines win).
        assert!(u.find("SystemCallFilter=bpf").unwrap() > u.find("~@privileged").unwrap());
    }

    #[test]
    fn manifest_round_trip() {
        let m = Manifest {
            format: MANIFEST_FORMAT,
            pgward_version: "0".into(),
            installed_at: "now".into(),
            user: "pgward".into(),
            pg_service: "postgresql.service".into(),
            systemctl: false,
            changes: vec![
                Change::Dir { path: "/var/lib/pgward".into(), data: false },
                Change::Edit(FileEdit {
                    path: "/etc/x".into(),
                    before: absent(),
                    after: Some("ab".into()),
                    fallback: Fallback::StripBlock,
                }),
                Change::AppendOnly { path: AUDIT_DIR.into() },
            ],
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"kind\":\"edit\"") && j.contains("\"fallback\":\"strip_block\""), "{j}");
        let back: Manifest = serde_json::from_str(&j).unwrap();
        assert_eq!(back.changes.len(), 3);
    }

    #[test]
    fn restore_puts_bytes_mode_and_mtime_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root { dir: tmp.path().to_owned() };
        std::fs::create_dir_all(root.p(BACKUP_DIR)).unwrap();
        std::fs::create_dir_all(root.p("/etc")).unwrap();
        let f = root.p("/etc/conf");
        std::fs::write(&f, "original\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let old_mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        let mut j = Journal {
            root: &root,
            m: Manifest {
                format: 1,
                pgward_version: String::new(),
                installed_at: String::new(),
                user: String::new(),
                pg_service: String::new(),
                systemctl: false,
                changes: vec![],
            },
            live: false,
            backups: 0,
        };
        let saved = j.save(Path::new("/etc/conf")).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        replace_file_contents(&f, b"changed\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = FileEdit { path: "/etc/conf".into(), before: saved, after: current_sha(&f), fallback: Fallback::Leave };
        assert_eq!(undo_edit(&root, &e).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "original\n");
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!(m.modified().unwrap(), old_mtime);
        // Changed since install: left alone.
        std::fs::write(&f, "admin edit\n").unwrap();
        assert!(undo_edit(&root, &e).unwrap().unwrap().contains("left as it is"));
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "admin edit\n");
    }
}
