//! The processes the bench starts (pgward, PgBouncer, the splice proxy) and the work
//! directory, each behind a guard that cleans up on drop: a process is sent SIGTERM by its own
//! pid (then SIGKILL if it has not exited after 5 s); the work directory is removed.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::pg::{self, Cluster};

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
const SIGTERM: i32 = 15;

/// A child process we started; stopped (by its pid only) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Start `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fail (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); last lines of {}:\n{}", self.name, self.log.display(), tail(&self.log, 20));
        }
        Ok(())
    }

    /// Wait until something accepts TCP connections on 127.0.0.1:`port` (20 s at most).
    pub fn wait_port(&mut self, port: u16) -> Result<()> {
        self.wait_port_for(port, Duration::from_secs(20))
    }

    /// Wait until something accepts TCP connections on 127.0.0.1:`port`, `limit` at most.
    pub fn wait_port_for(&mut self, port: u16, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            self.check_alive()?;
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not listen on port {port} within {} s; last lines of {}:\n{}",
            self.name,
            limit.as_secs(),
            self.log.display(),
            tail(&self.log, 20)
        )
    }

    /// SIGTERM (by our child's pid) and wait up to `limit` for it to exit on its own (e.g. so
    /// valgrind can write its output); SIGKILL and an error when it does not.
    pub fn stop_wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            unsafe { kill(pid, SIGTERM) };
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("{} did not exit within {} s of SIGTERM (killed)", self.name, limit.as_secs())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // Our own child, by its pid.
            unsafe { kill(pid, SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|l| format!("    {l}\n")).collect()
}

/// The bench's temporary directory (cluster, pgward dirs, PgBouncer ini, logs); removed on
/// drop unless `keep`.
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl WorkDir {
    pub fn create(keep: bool) -> Result<WorkDir> {
        let path = std::env::temp_dir().join(format!("pgward-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        // Postgres and PgBouncer run as a non-root user when we are root: let them in.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(WorkDir { path, keep })
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("==> bench: work directory kept: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ------------------------------------------------------------------------------------ pgward

/// A running `pgward serve` with its own directory (from `pgward init`) and a token for the
/// user `bench`.
pub struct Pgward {
    pub proc: Proc,
    pub port: u16,
    pub token: String,
    /// Its directory (pgward.toml, audit/, intercept.state.json).
    pub dir: PathBuf,
}

pub fn start_pgward(bin: &Path, work: &WorkDir, name: &str, cluster: &Cluster, fsync: &str) -> Result<Pgward> {
    start_pgward_opts(bin, work, name, cluster, &PgwardOpts { fsync, ..PgwardOpts::default() })
}

/// Like [`start_pgward`], with `policy_extra` appended to the policy file `init` wrote (e.g.
/// `[[mask]]` rules).
pub fn start_pgward_with_policy(
    bin: &Path,
    work: &WorkDir,
    name: &str,
    cluster: &Cluster,
    fsync: &str,
    policy_extra: &str,
) -> Result<Pgward> {
    start_pgward_opts(bin, work, name, cluster, &PgwardOpts { fsync, policy_extra, ..PgwardOpts::default() })
}

/// How to set up and start one pgward.
pub struct PgwardOpts<'a> {
    /// `audit.fsync`: "always", "group", "off".
    pub fsync: &'a str,
    /// Appended to the policy file `init` wrote.
    pub policy_extra: &'a str,
    /// Appended to pgward.toml (e.g. an `[intercept]` section).
    pub config_extra: &'a str,
    /// `(section, key, value)` set in pgward.toml (value as TOML, e.g. `false`).
    pub set: Vec<(&'a str, &'a str, &'a str)>,
    /// Run `serve` under this command (e.g. `valgrind --tool=callgrind …`).
    pub wrapper: Vec<OsString>,
    /// How long `serve` may take to listen.
    pub start_timeout: Duration,
}

impl Default for PgwardOpts<'_> {
    fn default() -> Self {
        PgwardOpts {
            fsync: "group",
            policy_extra: "",
            config_extra: "",
            set: Vec::new(),
            wrapper: Vec::new(),
            start_timeout: Duration::from_secs(20),
        }
    }
}

/// `pgward init` into `<work>/<name>`, adjust the config and policy, `pgward serve`, and issue a
/// token for `bench`.
pub fn start_pgward_opts(bin: &Path, work: &WorkDir, name: &str, cluster: &Cluster, o: &PgwardOpts) -> Result<Pgward> {
    let dir = work.join(name);
    let pwfile = work.join("svc.password");
    std::fs::write(&pwfile, format!("{}\n", pg::SERVICE_PASSWORD))?;
    let port = pg::gateway_port()?;
    let listen = format!("127.0.0.1:{port}");
    let upstream = format!("postgres://{}@127.0.0.1:{}/app", pg::SERVICE_USER, cluster.port);
    run_ok(
        Command::new(bin)
            .args(["init", "--force", "--dir"])
            .arg(&dir)
            .args(["--listen", &listen, "--upstream", &upstream, "--upstream-password-file"])
            .arg(&pwfile),
    )
    .with_context(|| format!("pgward init for {name}"))?;
    let config = dir.join("pgward.toml");
    let text = std::fs::read_to_string(&config)?;
    let mut text = set_toml_key(&text, "audit", "fsync", &format!("\"{}\"", o.fsync))
        .with_context(|| format!("setting audit.fsync in {}", config.display()))?;
    for (section, key, value) in &o.set {
        text = set_toml_key(&text, section, key, value).with_context(|| format!("setting {section}.{key} in {}", config.display()))?;
    }
    text.push_str(o.config_extra);
    std::fs::write(&config, text)?;
    if !o.policy_extra.is_empty() {
        let policy = dir.join("policies/default.toml");
        let mut p = std::fs::read_to_string(&policy).with_context(|| format!("reading {}", policy.display()))?;
        p.push_str(o.policy_extra);
        std::fs::write(&policy, p)?;
    }

    let mut cmd = match o.wrapper.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(["serve", "--config"]).arg(&config);
    let mut proc = Proc::spawn(name, &mut cmd, work.join(&format!("{name}.log")))?;
    proc.wait_port_for(port, o.start_timeout)?;
    let token = run_ok(
        Command::new(bin).args(["token", "issue", "--config"]).arg(&config).args(["--user", "bench", "--ttl", "12h"]),
    )
    .context("pgward token issue")?
    .trim()
    .to_string();
    if token.is_empty() {
        bail!("pgward token issue printed no token");
    }
    Ok(Pgward { proc, port, token, dir })
}

/// Set `key = value` in `[section]` of a TOML text (replacing the key's line, or adding it
/// right after the section header).
pub fn set_toml_key(text: &str, section: &str, key: &str, value: &str) -> Result<String> {
    let header = format!("[{section}]");
    let mut out = Vec::new();
    let mut in_section = false;
    let mut seen_section = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_section && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            in_section = t == header;
            seen_section |= in_section;
            out.push(line.to_string());
            continue;
        }
        if in_section
            && !done
            && let Some((k, _)) = t.split_once('=')
            && k.trim() == key
        {
            out.push(format!("{key} = {value}"));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if in_section && !done {
        out.push(format!("{key} = {value}"));
        done = true;
    }
    if !seen_section || !done {
        bail!("no [{section}] section");
    }
    Ok(out.join("\n") + "\n")
}

// --------------------------------------------------------------------------------- PgBouncer

/// PgBouncer in session mode in front of the cluster, authenticating clients with SCRAM
/// against a userlist holding the service user's password (so it can also log in upstream).
pub fn start_pgbouncer(work: &WorkDir, cluster: &Cluster) -> Result<(Proc, u16)> {
    let bin = std::env::var_os("PGWARD_BENCH_PGBOUNCER").map(PathBuf::from).unwrap_or_else(|| "/usr/sbin/pgbouncer".into());
    let dir = work.join("pgbouncer");
    std::fs::create_dir_all(&dir)?;
    let port = pg::free_port()?;
    let userlist = dir.join("userlist.txt");
    std::fs::write(&userlist, format!("\"{}\" \"{}\"\n", pg::SERVICE_USER, pg::SERVICE_PASSWORD))?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             app = host=127.0.0.1 port={pgport} dbname=app\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {userlist}\n\
             pool_mode = session\n\
             max_client_conn = 1000\n\
             default_pool_size = 50\n\
             ignore_startup_parameters = extra_float_digits\n",
            pgport = cluster.port,
            userlist = userlist.display(),
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&userlist, std::fs::Permissions::from_mode(0o600))?;
    let owner = pg::run_as();
    if let Some((uid, gid)) = owner {
        pg::chown_r(&dir, uid, gid)?;
    }
    let mut cmd = Command::new(&bin);
    cmd.arg(&ini);
    if let Some((uid, gid)) = owner {
        // PgBouncer refuses to run as root.
        cmd.uid(uid).gid(gid);
    }
    let mut proc = Proc::spawn("pgbouncer", &mut cmd, work.join("pgbouncer.log"))?;
    proc.wait_port(port)?;
    Ok((proc, port))
}

// ------------------------------------------------------------------------------ splice proxy

/// The bare proxy (`xtask splice-proxy`, from a release build of xtask) in front of the cluster.
pub fn start_splice(exe: &Path, work: &WorkDir, cluster: &Cluster) -> Result<(Proc, u16)> {
    let port = pg::free_port()?;
    let mut cmd = Command::new(exe);
    cmd.args(["splice-proxy", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("127.0.0.1:{}", cluster.port)]);
    let mut proc = Proc::spawn("splice", &mut cmd, work.join("splice.log"))?;
    proc.wait_port(port)?;
    Ok((proc, port))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::set_toml_key;

    #[test]
    fn toml_key_replaced_in_its_section_only() {
        let t = "[server]\nfsync = 1\n\n[audit]\ndir = \"audit\"\nfsync = \"group\"\n\n[policy]\n";
        let out = set_toml_key(t, "audit", "fsync", "\"off\"").unwrap();
        assert!(out.contains("[server]\nfsync = 1\n"));
        assert!(out.contains("[audit]\ndir = \"audit\"\nfsync = \"off\"\n"));
    }

    #[test]
    fn toml_key_added_when_missing() {
        let t = "[audit]\ndir = \"audit\"\n[policy]\nfiles = []\n";
        let out = set_toml_key(t, "audit", "fsync", "\"always\"").unwrap();
        assert_eq!(out, "[audit]\ndir = \"audit\"\nfsync = \"always\"\n[policy]\nfiles = []\n");
        let out = set_toml_key("[audit]\ndir = 1", "audit", "fsync", "\"off\"").unwrap();
        assert_eq!(out, "[audit]\ndir = 1\nfsync = \"off\"\n");
        assert!(set_toml_key("[server]\n", "audit", "fsync", "1").is_err());
    }
}
