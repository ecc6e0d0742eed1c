//! What install would do: the command line resolved and checked against the target tree
//! before anything is changed.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::host::cgroup::cgroup2_mount;
use super::pg_settings::pg_settings_in;
use super::tree::{
    ACCESS_DIR, AUDIT_DIR, CONFIG_DIR, DEFAULT_BIN_DIR, MANIFEST, PACKAGE_BIN_DIR, Root, TMPFILES_FILE, UNIT_FILE, UNIT_NAME,
    require_root, system_path,
};

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
    /// Where the binary goes (a path on the target system). Default: /usr/bin when the binary
    /// already is the target's /usr/bin/pgward (the Debian package's: used in place), else
    /// /usr/local/bin.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
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

/// Everything install needs to know, resolved and checked before anything is changed.
pub(super) struct Plan {
    pub(super) root: Root,
    pub(super) user: String,
    pub(super) pg_user: String,
    pub(super) pg_uid: u32,
    pub(super) pg_gid: u32,
    pub(super) pg_conf: PathBuf,
    pub(super) pg_data: Option<PathBuf>,
    pub(super) pg_port: u16,
    pub(super) pg_listen: String,
    pub(super) real_socket_dir: PathBuf,
    pub(super) socket_dir: PathBuf,
    pub(super) listen: std::net::SocketAddr,
    pub(super) upstream_url: String,
    pub(super) service_role: String,
    pub(super) password_file: Option<PathBuf>,
    pub(super) binary: PathBuf,
    pub(super) bin_dest: PathBuf,
    pub(super) intercept: bool,
    pub(super) intercept_cgroup: Option<PathBuf>,
    pub(super) gateway_cgroup: PathBuf,
    pub(super) append_only: bool,
    pub(super) systemctl: bool,
    pub(super) pg_service: String,
}

pub(super) fn plan(args: &InstallArgs) -> anyhow::Result<Plan> {
    let root = Root::new(&args.root)?;
    require_root()?;
    check_not_installed(&root)?;
    if !valid_name(&args.user) || !valid_name(&args.pg_user) {
        bail!("--user / --pg-user must be plain user names");
    }
    let real_socket_dir = system_path("--real-socket-dir", &args.real_socket_dir)?;
    let socket_dir = system_path("--socket-dir", &args.socket_dir)?;
    if real_socket_dir == socket_dir {
        bail!("--real-socket-dir and --socket-dir must differ: clients' socket path is pgward's");
    }
    let listen: std::net::SocketAddr =
        args.listen.parse().with_context(|| format!("--listen {:?} is not HOST:PORT", args.listen))?;
    if args.pg_listen.is_empty() || args.pg_listen.contains('\'') {
        bail!("--pg-listen {:?} is not a listen_addresses value", args.pg_listen);
    }

    let accounts = root.accounts();
    let (pg_uid, pg_gid) = accounts.user(&args.pg_user).with_context(|| {
        format!("user {:?} (--pg-user) does not exist in {}", args.pg_user, root.p("/etc/passwd").display())
    })?;

    let (pg_conf, pg_data, pg_port) = postgres_config(&root, args)?;
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
    let bin_dir = match &args.bin_dir {
        Some(d) => system_path("--bin-dir", d)?,
        None => default_bin_dir(&root, &binary),
    };
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

/// `--bin-dir` when not given: the package's directory when `binary` is the target's
/// /usr/bin/pgward (installed by the Debian package, which owns it), else /usr/local/bin.
fn default_bin_dir(root: &Root, binary: &std::path::Path) -> PathBuf {
    let packaged = root.p(PACKAGE_BIN_DIR).join("pgward");
    let same = binary.canonicalize().ok().zip(packaged.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    PathBuf::from(if same { PACKAGE_BIN_DIR } else { DEFAULT_BIN_DIR })
}

/// The real Postgres's postgresql.conf and data directory (system paths), and the port its
/// settings give.
fn postgres_config(root: &Root, args: &InstallArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>, u16)> {
    let pg_data = args.pg_data.as_deref().map(|p| system_path("--pg-data", p)).transpose()?;
    let pg_conf = match (&args.pg_conf, &pg_data) {
        (Some(c), _) => system_path("--pg-conf", c)?,
        (None, Some(d)) => d.join("postgresql.conf"),
        (None, None) => PathBuf::from("/etc/postgresql/15/main/postgresql.conf"),
    };
    if !root.p(&pg_conf).is_file() {
        bail!("no postgresql.conf at {} (give --pg-conf FILE or --pg-data DIR)", root.p(&pg_conf).display());
    }
    let settings = pg_settings_in(root, &pg_conf, pg_data.as_deref())?;
    let pg_port = match settings.get("port") {
        Some(s) => s.value.parse::<u16>().with_context(|| format!("port = {:?} in {}", s.value, s.file.display()))?,
        None => 5432,
    };
    Ok((pg_conf, pg_data, pg_port))
}

/// Nothing of an earlier installation is in the way: install never overwrites pgward's own
/// files, and data directories must be empty.
fn check_not_installed(root: &Root) -> anyhow::Result<()> {
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
    Ok(())
}

/// The host pgward dials for a Postgres with these listen_addresses.
pub(super) fn pg_loopback_host(listen: &str) -> String {
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

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !s.starts_with('-')
}

pub(super) fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_-.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_host_from_listen_addresses() {
        assert_eq!(pg_loopback_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(pg_loopback_host("localhost, ::1"), "127.0.0.1");
        assert_eq!(pg_loopback_host("::1"), "[::1]");
        assert_eq!(pg_loopback_host("10.1.2.3"), "10.1.2.3");
        assert_eq!(url_escape("my db"), "my%20db");
    }
}
