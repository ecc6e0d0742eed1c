//! A throwaway PostgreSQL 15 cluster for the demo and the bench: initdb under a directory,
//! its own port on 127.0.0.1, a unix socket in the directory, run as a non-root user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

pub const SERVICE_USER: &str = "pgward_svc";
pub const SERVICE_PASSWORD: &str = "svc-secret-do-not-share";

pub fn bindir() -> PathBuf {
    std::env::var_os("PGWARD_TEST_PG_BINDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// (uid, gid) to run Postgres (and other daemons that refuse root, e.g. PgBouncer) as when we
/// are root; None when we are not root.
pub fn run_as() -> Option<(u32, u32)> {
    if unsafe { libc_geteuid() } != 0 {
        return None;
    }
    let name = std::env::var("PGWARD_TEST_PG_USER").unwrap_or_else(|_| "postgres".into());
    for n in [name.as_str(), "postgres", "pgtest", "nobody"] {
        if let Ok(out) = Command::new("id").arg("-u").arg(n).output() {
            if out.status.success() {
                let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
                let gid_out = Command::new("id").arg("-g").arg(n).output().ok()?;
                let gid = String::from_utf8_lossy(&gid_out.stdout).trim().parse().ok()?;
                return Some((uid, gid));
            }
        }
    }
    None
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Lowest port [`gateway_port`] picks.
const GATEWAY_PORTS_FROM: u16 = 20000;

/// A free loopback port for pgward below the kernel's ephemeral range: `serve` with
/// interception reserves a port inside the range in `net.ipv4.ip_local_reserved_ports` (until
/// a reboot), and the demo and the bench leave the host's sysctls alone.
pub fn gateway_port() -> Result<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let lo: u16 = range.split_whitespace().next().and_then(|w| w.parse().ok()).unwrap_or(0);
    if lo <= GATEWAY_PORTS_FROM {
        return free_port();
    }
    let span = u32::from(lo - GATEWAY_PORTS_FROM);
    let start = std::process::id() % span;
    for i in 0..span {
        let port = GATEWAY_PORTS_FROM + ((start + i) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port below the ephemeral range {range:?}")
}

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    owner: Option<(u32, u32)>,
}

impl Cluster {
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(bindir().join(prog));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        c.env_remove("PGPASSWORD");
        c
    }

    /// initdb + start. `dir` is created (and emptied first).
    pub fn start(dir: &Path, extra_conf: &[&str]) -> Result<Cluster> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            chown_r(dir, uid, gid)?;
        }
        // The socket lives here: only the server's user (and root, pgward) may enter, as
        // pgward's interception requires of the real Postgres socket.
        std::fs::set_permissions(dir, <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700))?;
        let port = free_port()?;
        let c = Cluster { dir: dir.to_owned(), port, socket_dir: dir.to_owned(), owner };
        let data = dir.join("data");
        let pwfile = dir.join("superuser.pw");
        std::fs::write(&pwfile, "superuser-pw\n")?;
        if let Some((uid, gid)) = owner {
            chown_r(&pwfile, uid, gid)?;
        }
        let out = c
            .cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .context("running initdb")?;
        check("initdb", &out)?;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\npassword_encryption = 'scram-sha-256'\nmax_connections = 300\n",
            dir.display()
        );
        for l in extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf)?;
        if let Some((uid, gid)) = owner {
            chown_r(&data.join("postgresql.auto.conf"), uid, gid)?;
        }
        let out = c
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("postgres.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .context("running pg_ctl start")?;
        check("pg_ctl start", &out)?;
        c.psql_super("postgres", &format!("CREATE ROLE {SERVICE_USER} LOGIN PASSWORD '{SERVICE_PASSWORD}' CREATEDB"))?;
        // pgward with interception asks where the server listens (unix_socket_directories)
        // and ends the sessions that did not come through it.
        c.psql_super("postgres", &format!("GRANT pg_signal_backend, pg_read_all_settings TO {SERVICE_USER}"))?;
        c.psql_super("postgres", &format!("CREATE DATABASE app OWNER {SERVICE_USER}"))?;
        Ok(c)
    }

    /// Run SQL as the superuser over the unix socket.
    pub fn psql_super(&self, db: &str, sql: &str) -> Result<String> {
        let out = self
            .cmd("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .output()?;
        check("psql", &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn stop(&self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn check(what: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn chown_r(p: &Path, uid: u32, gid: u32) -> Result<()> {
    let st = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(p).status()?;
    if !st.success() {
        bail!("chown {} failed", p.display());
    }
    Ok(())
}
