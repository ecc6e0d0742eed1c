//! The real `pgward` binary: `init` a config dir, tweak its TOML, `serve`, issue tokens, read and
//! verify the audit log.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{CmdOut, Login, PgCluster, cluster, copy_dir, files_under, free_port, run_cmd};

pub fn pgward_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgward")
}

/// Run `pgward ARGS…` to completion (60 s limit).
pub fn pgward_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> CmdOut {
    let mut cmd = Command::new(pgward_bin());
    cmd.args(args)
        .env("PGWARD_LOG", log_filter())
        .env("NO_COLOR", "1")
        .env_remove("PGWARD_LOG_JSON");
    run_cmd(&mut cmd, None, Duration::from_secs(60))
}

fn log_filter() -> String {
    std::env::var("PGWARD_E2E_LOG").unwrap_or_else(|_| "info".into())
}

/// Set `dotted` ("audit.checkpoint_every") in a TOML table, creating intermediate tables.
pub fn toml_set(table: &mut toml::Table, dotted: &str, value: impl Into<toml::Value>) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut t = table;
    for p in parts {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{p} is not a table"));
    }
    t.insert(last.to_string(), value.into());
}

fn toml_get<'a>(table: &'a toml::Table, dotted: &str) -> Option<&'a toml::Value> {
    let mut parts = dotted.split('.');
    let mut v = table.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Remove `dotted` from a TOML table (no-op when absent).
pub fn toml_unset(table: &mut toml::Table, dotted: &str) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut t = table;
    for p in parts {
        match t.get_mut(p).and_then(|v| v.as_table_mut()) {
            Some(inner) => t = inner,
            None => return,
        }
    }
    t.remove(last);
}

type Edit = Box<dyn FnOnce(&mut toml::Table)>;
type DirEdit = Box<dyn FnOnce(&Path, &mut toml::Table)>;

pub struct PgwardBuilder {
    cluster: &'static PgCluster,
    edits: Vec<Edit>,
    dir_edits: Vec<DirEdit>,
}

impl PgwardBuilder {
    /// Edit the TOML that `pgward init` wrote, before `serve` reads it.
    pub fn config(mut self, f: impl FnOnce(&mut toml::Table) + 'static) -> Self {
        self.edits.push(Box::new(f));
        self
    }
    /// Shorthand for one `toml_set`.
    pub fn set(self, dotted: &str, value: impl Into<toml::Value>) -> Self {
        let (k, v) = (dotted.to_string(), value.into());
        self.config(move |t| toml_set(t, &k, v))
    }
    /// Remove a key ("upstream.password_file") from the config, if present.
    pub fn unset(self, dotted: &str) -> Self {
        let k = dotted.to_string();
        self.config(move |t| toml_unset(t, &k))
    }
    /// Log in upstream as `user` with `password` (written to a 0600 file next to the config and
    /// named in upstream.password_file), or with no password at all (trust) when None.
    pub fn upstream_login(self, user: &str, password: Option<&str>) -> Self {
        let b = self.set("upstream.user", user);
        match password {
            None => b.unset("upstream.password_file"),
            Some(p) => {
                let p = p.to_string();
                b.with_dir(move |dir, t| {
                    use std::os::unix::fs::PermissionsExt;
                    let f = dir.join("test-upstream.password");
                    std::fs::write(&f, format!("{p}\n")).unwrap();
                    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
                    toml_set(t, "upstream.password_file", f.display().to_string());
                })
            }
        }
    }
    /// Like [`Self::config`], with the directory `pgward init` wrote (for files the edit needs).
    pub fn with_dir(mut self, f: impl FnOnce(&Path, &mut toml::Table) + 'static) -> Self {
        self.dir_edits.push(Box::new(f));
        self
    }
    /// `pgward init` + edits; not started.
    pub fn init(self) -> Pgward {
        let tmp = tempfile::Builder::new()
            .prefix("pgward-e2e-gw-")
            .tempdir_in(self.cluster.scratch_dir())
            .expect("temp dir");
        let dir = tmp.path().join("pgward");
        let port = free_port();
        let c = self.cluster;
        let upstream = format!("postgres://{}@127.0.0.1:{}/app", c.svc_user, c.port);
        let out = pgward_cli(&[
            "init".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
            "--listen".as_ref(),
            format!("127.0.0.1:{port}").as_ref(),
            "--upstream".as_ref(),
            upstream.as_ref(),
            "--upstream-password-file".as_ref(),
            c.svc_password_file.as_os_str(),
        ] as &[&std::ffi::OsStr]);
        assert!(out.success(), "pgward init failed: {}", out.describe());
        let config_path = dir.join("pgward.toml");
        assert!(
            config_path.exists(),
            "pgward init wrote no {}",
            config_path.display()
        );
        let pw = Pgward {
            stderr_path: tmp.path().join("pgward.stderr"),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
            config_path,
            child: None,
            env: Vec::new(),
            netns: None,
            cluster: c,
            _tmp: tmp,
        };
        if !self.edits.is_empty() || !self.dir_edits.is_empty() {
            let mut t = pw.config();
            for e in self.edits {
                e(&mut t);
            }
            for e in self.dir_edits {
                e(&pw.dir, &mut t);
            }
            std::fs::write(&pw.config_path, toml::to_string(&t).unwrap()).unwrap();
        }
        pw
    }
    /// init + edits + serve.
    pub fn start(self) -> Pgward {
        let mut pw = self.init();
        pw.spawn();
        pw
    }
}

/// Whether `addr` accepts a TCP connection, dialled from network namespace `netns` (a
/// thread of its own enters it) or from the test's own.
fn accepts(netns: Option<&str>, addr: SocketAddr) -> bool {
    let dial = move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
    let Some(ns) = netns else { return dial() };
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let Ok(f) = std::fs::File::open(&path) else { return false };
        // SAFETY: setns(2) moves only this short-lived thread into the namespace.
        let entered = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } == 0;
        entered && dial()
    })
    .join()
    .unwrap_or(false)
}

/// A pgward instance: its config dir (in a temp dir removed on Drop) and its `serve` process.
/// Field order matters: the child is stopped in Drop before the temp dir goes.
pub struct Pgward {
    /// The directory `pgward init` wrote (holds pgward.toml).
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// Where `serve` listens (127.0.0.1:free port).
    pub addr: SocketAddr,
    pub cluster: &'static PgCluster,
    /// Extra environment for `serve` (set before [`Pgward::spawn`]).
    pub env: Vec<(String, String)>,
    /// The named network namespace (`ip netns`, one the test created) `serve` runs in;
    /// None: the test's own.
    pub netns: Option<String>,
    stderr_path: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Pgward {
    pub fn builder() -> PgwardBuilder {
        Self::builder_on(cluster())
    }
    /// A gateway in front of another cluster (e.g. [`super::tls_cluster`]).
    pub fn builder_on(c: &'static PgCluster) -> PgwardBuilder {
        PgwardBuilder {
            cluster: c,
            edits: Vec::new(),
            dir_edits: Vec::new(),
        }
    }
    /// Default config, started.
    pub fn start() -> Pgward {
        Self::builder().start()
    }

    /// Spawn `pgward serve --config …` (stderr to a file) and wait until the port accepts.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let cfg = self.config();
        if let Some(listen) = toml_get(&cfg, "server.listen").and_then(|v| v.as_str()) {
            self.addr = listen.parse().expect("server.listen is HOST:PORT");
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut cmd = Command::new(pgward_bin());
        cmd.args(["serve", "--config"])
            .arg(&self.config_path)
            .env("PGWARD_LOG", log_filter())
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stderr.try_clone().unwrap()))
            .stderr(Stdio::from(stderr));
        let netns = self.netns.as_ref().map(|n| std::ffi::CString::new(format!("/run/netns/{n}")).unwrap());
        // SAFETY: prctl, open, setns and close are async-signal-safe, on prepared data. If the
        // test process dies without running Drop, the kernel kills the gateway (we start it
        // from the test's own thread, which outlives the instance).
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(ns) = &netns {
                    let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn pgward serve: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "pgward serve exited with {st} before listening on {}\n--- stderr ---\n{}",
                    self.addr,
                    self.stderr_log()
                );
            }
            if accepts(self.netns.as_deref(), self.addr) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "pgward serve did not listen on {} within 30 s\n--- stderr ---\n{}",
                    self.addr,
                    self.stderr_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (graceful), then SIGKILL after 10 s. Our own child, by pid.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let child = self.child.take()?;
        super::stop_child(child, libc::SIGTERM, Duration::from_secs(10))
    }

    /// Whether `serve` printed a Rust panic message (any thread, including session tasks).
    pub fn log_has_panic(&self) -> bool {
        self.stderr_log().contains("panicked")
    }

    /// The unix socket directory from server.unix_socket_dir (resolved), if configured.
    pub fn unix_socket_dir(&self) -> Option<PathBuf> {
        toml_get(&self.config(), "server.unix_socket_dir")
            .and_then(|v| v.as_str())
            .map(|_| self.config_path_value("server.unix_socket_dir"))
    }

    /// Login through this gateway's unix socket (needs server.unix_socket_dir; the socket's
    /// port number is server.unix_socket_port or the TCP port).
    #[track_caller]
    pub fn unix_login(&self, user: &str, token: &str, db: &str) -> Login {
        let dir = self
            .unix_socket_dir()
            .expect("server.unix_socket_dir is not configured");
        let port = toml_get(&self.config(), "server.unix_socket_port")
            .and_then(|v| v.as_integer())
            .map(|p| p as u16)
            .unwrap_or(self.addr.port());
        Login::new(&dir.to_string_lossy(), port, user, Some(token), db)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Process id of the running `serve`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pgward serve is running").id()
    }

    /// A memory figure of the running `serve` from /proc/<pid>/status, in KiB: `VmRSS`
    /// (resident now) or `VmHWM` (the most it was ever resident).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {path}:\n{status}"))
    }

    /// What `serve` printed so far.
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    // ---- config ----------------------------------------------------------------------------

    pub fn config(&self) -> toml::Table {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not TOML: {e}", self.config_path.display()))
    }
    /// A string value from the config ("auth.signing_kid").
    #[track_caller]
    pub fn config_str(&self, dotted: &str) -> String {
        toml_get(&self.config(), dotted)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("config has no string {dotted}"))
            .to_string()
    }
    /// A path from the config, resolved against the config's directory (as pgward does).
    pub fn config_path_value(&self, dotted: &str) -> PathBuf {
        let p = PathBuf::from(self.config_str(dotted));
        if p.is_absolute() { p } else { self.dir.join(p) }
    }
    pub fn audit_dir(&self) -> PathBuf {
        self.config_path_value("audit.dir")
    }
    pub fn signing_key_path(&self) -> PathBuf {
        self.config_path_value("auth.signing_key")
    }
    pub fn signing_kid(&self) -> String {
        self.config_str("auth.signing_kid")
    }

    // ---- clients ---------------------------------------------------------------------------

    /// Login through this gateway (TCP, sslmode=disable) with `token` as the password.
    pub fn login(&self, user: &str, token: &str, db: &str) -> Login {
        Login::new("127.0.0.1", self.addr.port(), user, Some(token), db)
    }

    /// `pgward token issue` for `user` (groups may be empty; ttl like "15m").
    #[track_caller]
    pub fn token(&self, user: &str, groups: &[&str], ttl: &str) -> String {
        let out = self.try_token(user, groups, ttl);
        let tok = out.expect_ok().trim().to_string();
        assert_eq!(
            tok.split('.').count(),
            3,
            "token issue printed something that is not a JWT: {tok:?}"
        );
        tok
    }
    pub fn try_token(&self, user: &str, groups: &[&str], ttl: &str) -> CmdOut {
        let mut args: Vec<String> = vec![
            "token".into(),
            "issue".into(),
            "--config".into(),
            self.config_path.display().to_string(),
        ];
        args.extend(["--user".into(), user.into()]);
        if !groups.is_empty() {
            args.extend(["--groups".into(), groups.join(",")]);
        }
        args.extend(["--ttl".into(), ttl.into()]);
        pgward_cli(&args)
    }

    // ---- audit CLI ---------------------------------------------------------------------------

    /// `pgward audit tail --config F --json EXTRA…`, every line parsed as a JSON object.
    #[track_caller]
    pub fn audit_tail(&self, extra: &[&str]) -> Vec<Value> {
        audit_tail_with(&self.config_path, extra)
    }
    /// Every record, in log order.
    #[track_caller]
    pub fn audit_records(&self) -> Vec<Value> {
        self.audit_tail(&[])
    }
    /// Poll the audit log (bounded) until `pred` holds; returns the records that satisfied it.
    #[track_caller]
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let (ok, recs) = self.poll_audit(pred);
        if !ok {
            let tail: Vec<String> = recs
                .iter()
                .rev()
                .take(40)
                .rev()
                .map(|r| r.to_string())
                .collect();
            panic!(
                "timed out waiting for audit records: {what}\n--- last records ---\n{}",
                tail.join("\n")
            );
        }
        recs
    }
    /// Poll the audit log (up to 20 s) until `pred` holds: (whether it did, the last records read).
    #[track_caller]
    pub fn poll_audit(&self, pred: impl Fn(&[Value]) -> bool) -> (bool, Vec<Value>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let recs = self.audit_records();
            if pred(&recs) {
                return (true, recs);
            }
            if Instant::now() > deadline {
                return (false, recs);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    /// `pgward audit verify` → (exit code, stdout+stderr).
    pub fn audit_verify(&self) -> (i32, String) {
        audit_verify_config(&self.config_path)
    }
    /// `pgward audit replay SESSION --speed SPEED`.
    pub fn audit_replay(&self, session: &str, speed: &str) -> CmdOut {
        pgward_cli(&[
            "audit".as_ref(),
            "replay".as_ref(),
            "--config".as_ref(),
            self.config_path.as_os_str(),
            session.as_ref(),
            "--speed".as_ref(),
            speed.as_ref(),
        ] as &[&std::ffi::OsStr])
    }

    /// Concatenated bytes of every file in the audit directory (for "never logged" checks).
    pub fn audit_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for f in files_under(&self.audit_dir()) {
            all.extend(std::fs::read(&f).unwrap_or_default());
            all.push(b'\n');
        }
        all
    }

    /// Copy the audit dir to `dest/audit` and write `dest/pgward.toml`: this config with every
    /// relative path made absolute and audit.dir pointing at the copy. Returns the new config
    /// path (for `audit verify` on a tampered copy).
    pub fn copy_with_audit(&self, dest: &Path) -> PathBuf {
        copy_dir(&self.audit_dir(), &dest.join("audit"));
        let mut t = self.config();
        for key in [
            "server.tls_cert",
            "server.tls_key",
            "server.unix_socket_dir",
            "upstream.password_file",
            "auth.jwks",
            "auth.signing_key",
            "audit.checkpoint_key",
            "audit.checkpoint_jwks",
        ] {
            if let Some(s) = toml_get(&t, key).and_then(|v| v.as_str()).map(String::from) {
                let p = PathBuf::from(&s);
                if p.is_relative() {
                    toml_set(&mut t, key, self.dir.join(p).display().to_string());
                }
            }
        }
        if let Some(files) = toml_get(&t, "policy.files")
            .and_then(|v| v.as_array())
            .cloned()
        {
            let abs: Vec<toml::Value> = files
                .iter()
                .filter_map(|v| v.as_str())
                .map(|s| {
                    let p = PathBuf::from(s);
                    toml::Value::from(
                        if p.is_relative() { self.dir.join(p) } else { p }
                            .display()
                            .to_string(),
                    )
                })
                .collect();
            toml_set(&mut t, "policy.files", abs);
        }
        toml_set(
            &mut t,
            "audit.dir",
            dest.join("audit").display().to_string(),
        );
        let cfg = dest.join("pgward.toml");
        std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
        cfg
    }
}

/// `pgward audit tail --config CONFIG --json EXTRA…` parsed.
#[track_caller]
pub fn audit_tail_with(config: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args: Vec<String> = vec![
        "audit".into(),
        "tail".into(),
        "--config".into(),
        config.display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = pgward_cli(&args);
    assert!(out.success(), "audit tail failed: {}", out.describe());
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("audit tail --json printed a line that is not JSON ({e}): {l}")
            });
            assert!(v.is_object(), "audit record is not a JSON object: {l}");
            v
        })
        .collect()
}

/// `pgward audit verify --config CONFIG` → (exit code, stdout+stderr). -1 when killed.
pub fn audit_verify_config(config: &Path) -> (i32, String) {
    let out = pgward_cli(&[
        "audit".as_ref(),
        "verify".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    (out.code.unwrap_or(-1), out.all_output())
}

impl Pgward {
    /// Interception is pinned and outlives `serve`: a gateway with `[intercept]` on removes its
    /// pins when the test is done with it (`pgward intercept detach`, after `serve` stopped).
    fn detach_interception(&self) {
        let enabled = toml_get(&self.config(), "intercept.enabled").and_then(|v| v.as_bool()).unwrap_or(false);
        if !enabled {
            return;
        }
        let out = pgward_cli(&[
            "intercept".as_ref(),
            "detach".as_ref(),
            "--reason".as_ref(),
            "test cleanup".as_ref(),
            "--config".as_ref(),
            self.config_path.as_os_str(),
        ] as &[&std::ffi::OsStr]);
        if !out.success() {
            eprintln!("warning: test cleanup could not detach interception: {}", out.describe());
        }
    }
}

impl Drop for Pgward {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.stop();
        self.detach_interception();
        if std::thread::panicking() && was_running {
            let log = self.stderr_log();
            let tail: Vec<&str> = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!(
                "--- pgward serve stderr (last 60 lines; config {}) ---\n{}",
                self.config_path.display(),
                tail.join("\n")
            );
        }
        if std::env::var_os("PGWARD_E2E_KEEP").is_some() {
            let kept = std::mem::replace(&mut self._tmp, tempfile::TempDir::new().unwrap());
            eprintln!(
                "PGWARD_E2E_KEEP: pgward dir kept at {}",
                kept.keep().display()
            );
        }
    }
}

/// Helpers over audit records (serde_json values as stored).
pub mod rec {
    use serde_json::Value;

    pub fn kind(r: &Value) -> &str {
        r["kind"].as_str().unwrap_or("")
    }
    pub fn seq(r: &Value) -> u64 {
        r["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("record without numeric seq: {r}"))
    }
    pub fn s<'a>(r: &'a Value, field: &str) -> Option<&'a str> {
        r[field].as_str()
    }
    pub fn of_kind<'a>(recs: &'a [Value], k: &str) -> Vec<&'a Value> {
        recs.iter().filter(|r| kind(r) == k).collect()
    }
    pub fn of_session<'a>(recs: &'a [Value], session: &str) -> Vec<&'a Value> {
        recs.iter()
            .filter(|r| r["session"].as_str() == Some(session))
            .collect()
    }
    /// The login record carrying token id `jti`.
    pub fn login_by_jti<'a>(recs: &'a [Value], jti: &str) -> Option<&'a Value> {
        recs.iter()
            .find(|r| kind(r) == "login" && r["jti"].as_str() == Some(jti))
    }
    /// Statement record(s) whose SQL contains `needle`.
    pub fn statements_with<'a>(recs: &'a [Value], needle: &str) -> Vec<&'a Value> {
        recs.iter()
            .filter(|r| {
                kind(r) == "statement" && r["sql"].as_str().is_some_and(|s| s.contains(needle))
            })
            .collect()
    }
    /// The result record for statement `stmt`.
    pub fn result_for<'a>(recs: &'a [Value], stmt: &Value) -> Option<&'a Value> {
        let sq = seq(stmt);
        recs.iter()
            .find(|r| kind(r) == "result" && r["statement_seq"].as_u64() == Some(sq))
    }
    /// groups as a sorted list.
    pub fn groups(r: &Value) -> Vec<String> {
        let mut g: Vec<String> = r["groups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        g.sort();
        g
    }
    pub fn has_session_end(recs: &[Value], session: &str) -> bool {
        recs.iter()
            .any(|r| kind(r) == "session_end" && r["session"].as_str() == Some(session))
    }
    /// Does any string anywhere in the record contain `needle`?
    pub fn mentions(r: &Value, needle: &str) -> bool {
        match r {
            Value::String(s) => s.contains(needle),
            Value::Array(a) => a.iter().any(|v| mentions(v, needle)),
            Value::Object(o) => o.values().any(|v| mentions(v, needle)),
            _ => false,
        }
    }
}
