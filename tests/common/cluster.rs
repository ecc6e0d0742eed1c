//! A real PostgreSQL 15 cluster, one per test binary.
//!
//! Why one per binary and not one per test: initdb + start costs a couple of seconds, and the
//! tests isolate themselves well enough with a fresh database each (every pgward instance gets
//! its own audit directory anyway). The cluster's server log is shared, so tests look for
//! markers that are unique to them.
//!
//! Lifetime: created on first use by [`cluster()`]; an `atexit` handler runs
//! `pg_ctl stop -m immediate` and removes the temp dir when the test binary exits (libtest calls
//! exit() after the last test). A watchdog shell (started by us, ends by itself) does the same if
//! the test process dies without running atexit handlers (SIGKILL, Ctrl-C).
//!
//! Root: initdb/postgres refuse to run as root, so when euid == 0 every server-side command runs
//! as the `postgres` system user (fallback `nobody`) and the temp dir is chowned to it.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::{CmdOut, Login, free_port, marker, rand_hex, run_cmd, scrub_pg_env, wait_for};

pub const SVC_USER: &str = "pgward_svc";
pub const SUPERUSER: &str = "postgres";
pub const APP_DB: &str = "app";

pub struct PgCluster {
    /// Temp dir holding everything below (owned by the server's OS user).
    pub root: PathBuf,
    pub data_dir: PathBuf,
    /// unix_socket_directories
    pub socket_dir: PathBuf,
    /// Server log (log_statement=all): proof of what did or did not reach Postgres.
    pub log_file: PathBuf,
    pub port: u16,
    pub bin_dir: PathBuf,
    pub svc_user: String,
    pub svc_password: String,
    /// File holding the service password (first line), for `pgward init --upstream-password-file`.
    pub svc_password_file: PathBuf,
    run_as: Option<(u32, u32)>,
    db_counter: AtomicU32,
}

/// How a cluster is set up (the shared one uses the defaults).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterOptions {
    /// `ssl = on` with a self-signed certificate (made with openssl) in the data directory.
    pub ssl: bool,
    /// Leave the socket directory open to every local user (a default install's layout, which
    /// pgward's interception refuses). Otherwise it is 0700, owned by the server's user: only
    /// that user and root (the tests, pgward) can reach the socket.
    pub open_socket: bool,
    /// A second unix socket in the abstract namespace (`unix_socket_directories` entry
    /// [`PgCluster::abstract_socket`]): no file, so every local user can connect to it.
    pub abstract_socket: bool,
}

type ClusterCell = OnceLock<Result<PgCluster, String>>;

static CLUSTER: ClusterCell = OnceLock::new();
/// A second cluster with `ssl = on`, started only by test binaries that ask for it (upstream
/// TLS); the shared [`cluster()`] keeps `ssl = off`, which is how a server refusing TLS looks.
static TLS_CLUSTER: ClusterCell = OnceLock::new();
/// A cluster whose unix socket every local user can reach, for the interception test that
/// pgward finds such a socket by asking the server (started only by the binary that asks).
static OPEN_SOCKET_CLUSTER: ClusterCell = OnceLock::new();
/// A cluster that also listens on an abstract-namespace unix socket (started only by the
/// binary that asks).
static ABSTRACT_SOCKET_CLUSTER: ClusterCell = OnceLock::new();
/// A cluster for the one test of a binary that restarts its server (see
/// [`PgCluster::restart_fast`]): the shared [`cluster()`] must stay up for the tests running
/// beside it.
static RESTARTABLE_CLUSTER: ClusterCell = OnceLock::new();

/// The test binary's cluster (started on first call). If starting failed, every later call
/// fails at once with the same message instead of trying again.
#[track_caller]
pub fn cluster() -> &'static PgCluster {
    cluster_in(&CLUSTER, ClusterOptions::default(), stop_cluster_at_exit)
}

/// A second cluster of this test binary, with `ssl = on` (self-signed certificate). Same
/// lifetime rules as [`cluster()`]; roles, passwords and databases are its own.
#[track_caller]
pub fn tls_cluster() -> &'static PgCluster {
    cluster_in(
        &TLS_CLUSTER,
        ClusterOptions { ssl: true, ..Default::default() },
        stop_tls_cluster_at_exit,
    )
}

/// A cluster of this test binary whose socket directory is open to everyone (see
/// [`ClusterOptions::open_socket`]). Same lifetime rules as [`cluster()`].
#[track_caller]
pub fn open_socket_cluster() -> &'static PgCluster {
    cluster_in(
        &OPEN_SOCKET_CLUSTER,
        ClusterOptions { open_socket: true, ..Default::default() },
        stop_open_socket_cluster_at_exit,
    )
}

/// A cluster that also listens on an abstract unix socket ([`ClusterOptions::abstract_socket`]).
/// Same lifetime rules as [`cluster()`].
#[track_caller]
pub fn abstract_socket_cluster() -> &'static PgCluster {
    cluster_in(
        &ABSTRACT_SOCKET_CLUSTER,
        ClusterOptions { abstract_socket: true, ..Default::default() },
        stop_abstract_socket_cluster_at_exit,
    )
}

/// A cluster of this test binary that the test using it may restart
/// ([`PgCluster::restart_fast`]); only one test of a binary may use it. Same lifetime rules as
/// [`cluster()`].
#[track_caller]
pub fn restartable_cluster() -> &'static PgCluster {
    cluster_in(
        &RESTARTABLE_CLUSTER,
        ClusterOptions::default(),
        stop_restartable_cluster_at_exit,
    )
}

#[track_caller]
fn cluster_in(
    cell: &'static ClusterCell,
    opts: ClusterOptions,
    at_exit: extern "C" fn(),
) -> &'static PgCluster {
    let r = cell.get_or_init(|| {
        let r = std::panic::catch_unwind(|| PgCluster::start(opts)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into())
        });
        if r.is_ok() {
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe {
                libc::atexit(at_exit);
            }
        }
        r
    });
    match r {
        Ok(c) => c,
        Err(msg) => panic!("PostgreSQL test cluster ({opts:?}) could not be started: {msg}"),
    }
}

extern "C" fn stop_cluster_at_exit() {
    stop_and_remove(&CLUSTER);
}

extern "C" fn stop_tls_cluster_at_exit() {
    stop_and_remove(&TLS_CLUSTER);
}

extern "C" fn stop_open_socket_cluster_at_exit() {
    stop_and_remove(&OPEN_SOCKET_CLUSTER);
}

extern "C" fn stop_abstract_socket_cluster_at_exit() {
    stop_and_remove(&ABSTRACT_SOCKET_CLUSTER);
}

extern "C" fn stop_restartable_cluster_at_exit() {
    stop_and_remove(&RESTARTABLE_CLUSTER);
}

fn stop_and_remove(cell: &ClusterCell) {
    if let Some(Ok(c)) = cell.get() {
        c.stop();
        if std::env::var_os("PGWARD_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&c.root);
        } else {
            eprintln!("PGWARD_E2E_KEEP: cluster dir kept at {}", c.root.display());
        }
    }
}

/// The `pg_ctl -o` options every harness server runs with: loopback TCP on `port`, its unix
/// socket in `socket_dir`, no fsync, every statement logged.
pub(super) fn server_options(port: u16, socket_dir: &Path) -> String {
    format!(
        "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} \
         -c fsync=off -c log_statement=all -c logging_collector=off",
        socket_dir.display()
    )
}

/// Stops the server of `data_dir` and removes `root` (a `pgward-e2e-pg-` temp dir or a
/// directory inside one) if this test process dies without running atexit handlers (SIGKILL,
/// Ctrl-C). Runs as the test's own user: it stops the postmaster we started with SIGQUIT (what
/// `pg_ctl stop -m immediate` sends), by the pid in the data dir's postmaster.pid.
pub(super) fn spawn_watchdog(data_dir: &Path, root: &Path) {
    if std::env::var_os("PGWARD_E2E_KEEP").is_some() {
        return;
    }
    let script = r#"while [ -d "/proc/$1" ]; do sleep 1; done
pid=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null; then
  n=0; while kill -0 "$pid" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
fi
case "$3" in */pgward-e2e-pg-*) rm -rf -- "$3" ;; esac"#;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .arg("pgward-e2e-watchdog")
        .arg(std::process::id().to_string())
        .arg(data_dir)
        .arg(root)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // own process group: a Ctrl-C to the test's terminal must not kill the cleaner
        .process_group(0);
    // Not waited for: it outlives this process on purpose and exits by itself.
    let _ = cmd.spawn();
}

/// Serializes read-modify-write of server config files + reload (tests run in parallel).
static CONFIG_LOCK: Mutex<()> = Mutex::new(());

/// (uid, gid) of the OS user that runs server-side commands when we are root.
fn server_os_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let c = CString::new(name).unwrap();
        // SAFETY: getpwnam with a valid C string; fields copied out immediately. Called once,
        // under the OnceLock, so the static buffer is not shared with another caller here.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if !pw.is_null() {
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid));
        }
    }
    panic!("running as root but neither `postgres` nor `nobody` exists to run the server as");
}

fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

impl PgCluster {
    fn start(opts: ClusterOptions) -> PgCluster {
        let mut c = PgCluster::lay_out(opts);
        c.initdb();
        c.configure(opts);
        c.start_server(opts);
        std::fs::create_dir_all(c.scratch_dir()).unwrap();
        c.spawn_watchdog();
        c.create_roles();
        c
    }

    /// The temp dir with the data, socket and log paths and the service password file, owned
    /// by the server's OS user; the socket directory private unless `opts.open_socket`.
    fn lay_out(opts: ClusterOptions) -> PgCluster {
        let bin_dir = PathBuf::from(
            std::env::var("PGWARD_E2E_PG_BIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        assert!(
            bin_dir.join("initdb").exists(),
            "PostgreSQL 15 server binaries not found in {} (install postgresql-15)",
            bin_dir.display()
        );
        let run_as = server_os_user();
        let root = tempfile::Builder::new()
            .prefix("pgward-e2e-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        assert!(
            !root.to_string_lossy().contains(char::is_whitespace),
            "temp dir path must not contain whitespace: {}",
            root.display()
        );
        let data_dir = root.join("data");
        let socket_dir = root.join("sock");
        let log_file = root.join("postgres.log");
        std::fs::create_dir(&socket_dir).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let svc_password = rand_hex(24);
        let svc_password_file = root.join("svc-password");
        std::fs::write(&svc_password_file, format!("{svc_password}\n")).unwrap();
        std::fs::set_permissions(&svc_password_file, std::fs::Permissions::from_mode(0o600))
            .unwrap();
        if let Some((uid, gid)) = run_as {
            chown_tree(&root, uid, gid);
        }
        if !opts.open_socket {
            std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }

        PgCluster {
            root,
            data_dir,
            socket_dir,
            log_file,
            port: 0,
            bin_dir,
            svc_user: SVC_USER.into(),
            svc_password,
            svc_password_file,
            run_as,
            db_counter: AtomicU32::new(0),
        }
    }

    /// A fresh data directory: UTF8, C locale, trust on the socket, SCRAM over TCP.
    fn initdb(&self) {
        let init = run_cmd(
            self.server_cmd("initdb")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-U", SUPERUSER, "-E", "UTF8", "--locale=C", "--no-sync"])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"]),
            None,
            Duration::from_secs(180),
        );
        init.expect_ok();
    }

    /// The harness's settings in postgresql.conf (and TLS with `opts.ssl`).
    fn configure(&self, opts: ClusterOptions) {
        // Settings that need no shell quoting go on the pg_ctl command line; these go here.
        let extra = "\n# pgward e2e harness\n\
            password_encryption = 'scram-sha-256'\n\
            log_line_prefix = '%m [%p] %q%u@%d '\n\
            synchronous_commit = off\n\
            full_page_writes = off\n\
            max_connections = 200\n";
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(extra);
        if opts.ssl {
            self.make_server_certificate();
            text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        std::fs::write(&conf, text).unwrap();
    }

    /// `pg_ctl start` on a free port.
    fn start_server(&mut self, cluster: ClusterOptions) {
        // A port can be taken between our probe and postgres' bind: retry with another.
        let mut last = None;
        for _ in 0..5 {
            let port = free_port();
            let mut opts = server_options(port, &self.socket_dir);
            if cluster.abstract_socket {
                opts = opts.replace(
                    &format!("unix_socket_directories={}", self.socket_dir.display()),
                    &format!("unix_socket_directories={},{}", self.socket_dir.display(), self.abstract_socket()),
                );
            }
            let out = run_cmd(
                self.pg_ctl(&self.data_dir)
                    .arg("-l")
                    .arg(&self.log_file)
                    .args(["-w", "-t", "120", "-o", &opts, "start"]),
                None,
                Duration::from_secs(180),
            );
            if out.success() {
                self.port = port;
                last = None;
                break;
            }
            last = Some((
                out,
                std::fs::read_to_string(&self.log_file).unwrap_or_default(),
            ));
        }
        if let Some((out, log)) = last {
            panic!(
                "pg_ctl start failed: {}\n--- server log ---\n{log}",
                out.describe()
            );
        }
    }

    /// The service role (with what pgward with interception needs) and the app database.
    fn create_roles(&self) {
        self.sql(
            "postgres",
            &format!(
                "CREATE ROLE {SVC_USER} LOGIN CREATEDB PASSWORD '{}'",
                self.svc_password
            ),
        );
        self.sql(
            "postgres",
            &format!("CREATE DATABASE {APP_DB} OWNER {SVC_USER}"),
        );
        // pgward with interception asks where the server listens (unix_socket_directories is
        // for pg_read_all_settings) and ends sessions that did not come through it.
        self.sql(
            "postgres",
            &format!("GRANT pg_signal_backend, pg_read_all_settings TO {SVC_USER}"),
        );
    }

    /// A command for a server-side binary, run as the server's OS user when we are root.
    pub(super) fn server_cmd(&self, prog: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(prog));
        scrub_pg_env(&mut cmd);
        cmd.current_dir(&self.root);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// The abstract-namespace socket directory of a cluster started with
    /// [`ClusterOptions::abstract_socket`] (`@name`, as libpq's `host` takes it).
    pub fn abstract_socket(&self) -> String {
        let name = self.root.file_name().expect("cluster root has a name").to_string_lossy();
        format!("@{name}")
    }

    /// `pg_ctl -D <data_dir>`, run as the server's OS user; the caller adds the action.
    pub(super) fn pg_ctl(&self, data_dir: &Path) -> Command {
        let mut cmd = self.server_cmd("pg_ctl");
        cmd.arg("-D").arg(data_dir);
        cmd
    }

    /// Stops the cluster (and removes the temp dir, including the gateways' dirs under `gw/`)
    /// if this test process dies without running atexit handlers (see [`spawn_watchdog`]).
    fn spawn_watchdog(&self) {
        spawn_watchdog(&self.data_dir, &self.root);
    }

    /// Where gateways put their config dirs (inside the cluster's temp dir, so that the
    /// watchdog's cleanup covers them too).
    pub fn scratch_dir(&self) -> PathBuf {
        self.root.join("gw")
    }

    fn stop(&self) {
        let _ = run_cmd(
            self.pg_ctl(&self.data_dir)
                .args(["stop", "-m", "immediate", "-w"]),
            None,
            Duration::from_secs(60),
        );
    }

    /// `pg_ctl restart -m fast`, waiting until the server accepts connections again: every
    /// backend is terminated (its client gets FATAL 57P01) and the server comes back on the
    /// same port with the same options (pg_ctl reuses postmaster.opts), logging to the same
    /// file.
    #[track_caller]
    pub fn restart_fast(&self) {
        let out = run_cmd(
            self.pg_ctl(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t", "120", "-m", "fast", "restart"]),
            None,
            Duration::from_secs(180),
        );
        assert!(
            out.success(),
            "pg_ctl restart failed: {}\n--- server log ---\n{}",
            out.describe(),
            self.server_log()
        );
    }

    /// Self-signed certificate + key for `ssl = on`, made with openssl in the data directory,
    /// owned by the server's OS user, key mode 0600 (Postgres refuses a group/world-readable key).
    fn make_server_certificate(&self) {
        let (crt, key) = (
            self.data_dir.join("server.crt"),
            self.data_dir.join("server.key"),
        );
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .current_dir(&self.root);
        let out = run_cmd(&mut cmd, None, Duration::from_secs(120));
        assert!(
            out.success() && crt.exists() && key.exists(),
            "openssl could not make a server certificate: {}",
            out.describe()
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&crt, std::fs::Permissions::from_mode(0o644)).unwrap();
        if let Some((uid, gid)) = self.run_as {
            chown_tree(&crt, uid, gid);
            chown_tree(&key, uid, gid);
        }
    }

    // ---- server configuration at runtime ----------------------------------------------------

    /// `select pg_reload_conf()` and wait (bounded) until the postmaster has reloaded: a new
    /// backend inherits the postmaster's config load time, and the postmaster re-reads
    /// pg_hba.conf in the same SIGHUP handling, so a newer load time seen from a fresh
    /// connection means later connections get the new postgresql.conf and pg_hba.conf.
    /// Callers hold [`CONFIG_LOCK`].
    fn reload_and_wait(&self) {
        let before = self.sql("postgres", "select pg_conf_load_time()::text");
        assert_eq!(self.sql("postgres", "select pg_reload_conf()"), "t");
        wait_for(
            "PostgreSQL to reload its configuration",
            Duration::from_secs(30),
            || {
                (self.sql(
                    "postgres",
                    &format!("select pg_conf_load_time() > '{before}'::timestamptz"),
                ) == "t")
                    .then_some(())
            },
        );
    }

    /// Put `lines` at the top of pg_hba.conf (so they win over initdb's rules) and reload.
    /// Lines stay for the rest of the test binary; make them specific (a role of your own).
    pub fn prepend_hba_lines(&self, lines: &[&str]) {
        let _g = CONFIG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let hba = self.data_dir.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        let mut text = String::from("# added by a pgward e2e test\n");
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        text.push_str(&old);
        // Rewriting the existing file keeps its owner (the server's OS user).
        std::fs::write(&hba, text).unwrap();
        self.reload_and_wait();
    }

    /// `ALTER SYSTEM SET name = value` (value is SQL, e.g. `'on'`) and reload.
    pub fn alter_system(&self, name: &str, value: &str) {
        let _g = CONFIG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        self.sql("postgres", &format!("ALTER SYSTEM SET {name} = {value}"));
        self.reload_and_wait();
    }

    /// A LOGIN role. `password`: None for no password at all; else the password stored with
    /// `password_encryption` = `encryption` ("md5" or "scram-sha-256"). Returns how the stored
    /// verifier starts ("md5…", "SCRAM-SHA-256$…", or "" without a password).
    #[track_caller]
    pub fn create_login_role(
        &self,
        role: &str,
        password: Option<&str>,
        encryption: &str,
    ) -> String {
        match password {
            None => self.sql("postgres", &format!("CREATE ROLE {role} LOGIN")),
            Some(p) => {
                let p = p.replace('\'', "''");
                self.superuser_login("postgres")
                    .psql(&[
                        "-c",
                        &format!("SET password_encryption = '{encryption}'"),
                        "-c",
                        &format!("CREATE ROLE {role} LOGIN PASSWORD '{p}'"),
                    ])
                    .expect_ok()
            }
        };
        self.sql(
            "postgres",
            &format!("select coalesce(rolpassword, '') from pg_authid where rolname = '{role}'"),
        )
    }

    // ---- logins -------------------------------------------------------------------------

    /// Superuser over the unix socket (trust).
    pub fn superuser_login(&self, db: &str) -> Login {
        Login::new(
            &self.socket_dir.to_string_lossy(),
            self.port,
            SUPERUSER,
            None,
            db,
        )
    }
    /// The service role over the unix socket (trust): fixtures owned by the role pgward uses.
    pub fn svc_unix_login(&self, db: &str) -> Login {
        Login::new(
            &self.socket_dir.to_string_lossy(),
            self.port,
            &self.svc_user,
            None,
            db,
        )
    }
    /// The service role over TCP with its password (SCRAM), as pgward connects.
    pub fn svc_tcp_login(&self, db: &str) -> Login {
        Login::new(
            "127.0.0.1",
            self.port,
            &self.svc_user,
            Some(&self.svc_password),
            db,
        )
    }

    // ---- SQL as superuser / service role -------------------------------------------------

    /// Run SQL as the superuser; panic on error; return psql's -At output (trimmed).
    #[track_caller]
    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.superuser_login(db).psql(&["-c", sql]).expect_ok()
    }
    /// Run SQL as the superuser, returning the raw result.
    pub fn try_sql(&self, db: &str, sql: &str) -> CmdOut {
        self.superuser_login(db).psql(&["-c", sql])
    }
    /// Run SQL as the service role (objects it creates are usable through pgward).
    #[track_caller]
    pub fn svc_sql(&self, db: &str, sql: &str) -> String {
        self.svc_unix_login(db).psql(&["-c", sql]).expect_ok()
    }
    /// Table fixture: create `table` with `columns` (SQL column list) owned by the service role,
    /// and insert `rows` (a VALUES list without the keyword, or "" for none).
    #[track_caller]
    pub fn fixture_table(&self, db: &str, table: &str, columns: &str, rows: &str) {
        let mut sql = format!("CREATE TABLE {table} ({columns});");
        if !rows.is_empty() {
            sql.push_str(&format!(" INSERT INTO {table} VALUES {rows};"));
        }
        self.svc_sql(db, &sql);
    }

    /// A fresh database owned by the service role; the name starts with `prefix`.
    pub fn create_database(&self, prefix: &str) -> String {
        let clean: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let n = self.db_counter.fetch_add(1, Ordering::SeqCst);
        let name = format!("{clean}_{n}_{}", rand_hex(6));
        self.sql(
            "postgres",
            &format!("CREATE DATABASE {name} OWNER {}", self.svc_user),
        );
        name
    }

    // ---- server log ----------------------------------------------------------------------

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Wait until the server log contains `needle` (bounded); false if it never did.
    pub fn wait_log_contains(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.server_log().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Log barrier: run a unique statement as the superuser and wait until the log shows it,
    /// then return the whole log. Anything that reached Postgres before the call has been logged
    /// by then (each backend logs a statement when it receives it, before answering).
    pub fn log_after_barrier(&self) -> String {
        let m = marker("log-barrier");
        self.sql("postgres", &format!("select '{m}'"));
        assert!(
            self.wait_log_contains(&m, Duration::from_secs(30)),
            "barrier {m} never reached the server log"
        );
        self.server_log()
    }

    /// Number of active backends (other than the asking one) whose query text contains `needle`.
    pub fn active_queries(&self, needle: &str) -> i64 {
        let needle = needle.replace('\'', "''");
        self.sql(
            "postgres",
            &format!(
                "select count(*) from pg_stat_activity where state = 'active' \
                 and pid <> pg_backend_pid() and position('{needle}' in query) > 0"
            ),
        )
        .parse()
        .unwrap()
    }

    /// Wait (bounded) until a query containing `needle` is running in Postgres.
    #[track_caller]
    pub fn wait_active_query(&self, needle: &str) {
        wait_for(
            &format!("a running query containing {needle:?}"),
            Duration::from_secs(30),
            || (self.active_queries(needle) > 0).then_some(()),
        )
    }
}
