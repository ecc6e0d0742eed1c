//! What install would do: the command line resolved and checked against the target tree
//! before anything is changed.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::host::cgroup::cgroup2_mount;
use super::pg_conf::pg_settings_in;
use super::{ACCESS_DIR, AUDIT_DIR, CONFIG_DIR, InstallArgs, MANIFEST, Root, TMPFILES_FILE, UNIT_FILE, UNIT_NAME, require_root, system_path};

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
