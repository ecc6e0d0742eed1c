//! End-to-end harness shared by every test binary in `tests/` (each binary does `mod common;`).
//!
//! Real parts only:
//! - [`PgCluster`]: a real PostgreSQL 15 cluster (initdb/pg_ctl from /usr/lib/postgresql/15/bin),
//!   ONE per test binary, started lazily by [`cluster()`], stopped at process exit (atexit) and,
//!   should the test process die without running atexit, by a tiny watchdog that notices the
//!   test process is gone. Tests isolate themselves with fresh databases
//!   ([`PgCluster::create_database`]).
//! - [`Pgward`]: the real `pgward` binary (`init`, then `serve`), one per test, killed by pid on
//!   Drop. Helpers for tokens and the audit CLI.
//! - [`Login`]: how a client reaches a server (pgward or Postgres): psql, tokio-postgres, and a
//!   minimal raw wire-protocol client ([`raw::RawConn`]) for facts libraries hide
//!   (BackendKeyData, ParameterStatus, CancelRequest with chosen keys, Terminate).
//! - [`replica::Replica`]: a streaming replica of a cluster (pg_basebackup), for failover.
//! - [`tls::TestAuthority`], [`tls::TestCa`]: a throwaway CA (rcgen) for the TLS peers tests
//!   start (syslog receivers, an identity provider, etcd).
//! - [`tmpfs::SmallFs`]: a size-limited tmpfs a test mounts (tests run as root) and fills,
//!   for a full disk under the audit log.
//! - [`Target`]: what relay/cancel tests talk to. Normally a fresh pgward in front of a fresh
//!   database; with `PGWARD_E2E_DIRECT=1` the same tests run straight against Postgres, which is
//!   how the suite's own expectations are checked against the real server.
//!
//! Async tests use `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`: they block the
//! test thread (psql, log and audit polling) while spawned tokio-postgres connection tasks must
//! keep running (e.g. to send Terminate when a client is dropped).
//!
//! Environment knobs: `PGWARD_E2E_PG_BIN` (default /usr/lib/postgresql/15/bin),
//! `PGWARD_E2E_PSQL` (default /usr/bin/psql), `PGWARD_E2E_DIRECT=1`, `PGWARD_E2E_LOG`
//! (PGWARD_LOG for the spawned gateway, default "info"), `PGWARD_E2E_KEEP=1` (keep temp dirs).

#![allow(dead_code, unused_imports)]

pub mod clients;
pub mod cluster;
pub mod gateway;
pub mod jwt;
pub mod metrics;
pub mod raw;
pub mod replica;
pub mod rng;
pub mod tls;
pub mod tmpfs;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use clients::{Login, current_user, sqlstate, within};
pub use cluster::{ClusterOptions, PgCluster, cluster, restartable_cluster, tls_cluster};
pub use gateway::{Pgward, PgwardBuilder, pgward_cli, toml_set};

/// Send `sig` to our own unreaped child (by pid), wait up to `grace` for it to exit, then
/// SIGKILL it. Returns its exit status.
pub fn stop_child(mut child: std::process::Child, sig: libc::c_int, grace: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Output of a finished command.
#[derive(Debug, Clone)]
pub struct CmdOut {
    /// Exit code; None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// What was run (for messages).
    pub what: String,
}

impl CmdOut {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    /// Panic (with everything the command printed) unless it exited 0; return trimmed stdout.
    #[track_caller]
    pub fn expect_ok(&self) -> String {
        assert!(self.success(), "command failed: {}", self.describe());
        self.stdout.trim_end().to_string()
    }
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }
    /// stdout and stderr together.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    /// SQLSTATEs psql printed with VERBOSITY=verbose ("ERROR:  22012: division by zero").
    pub fn sqlstates(&self) -> Vec<String> {
        let mut out = Vec::new();
        for line in self.stderr.lines() {
            for sev in ["ERROR:", "FATAL:", "PANIC:"] {
                if let Some(pos) = line.find(sev) {
                    let rest = line[pos + sev.len()..].trim_start();
                    let code: String = rest.chars().take(5).collect();
                    if code.len() == 5
                        && rest[5..].starts_with(':')
                        && code
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                    {
                        out.push(code);
                    }
                }
            }
        }
        out
    }
}

/// Run a command to completion with a hard timeout (the child is killed by pid after it).
/// stdout/stderr are captured; `stdin` is fed if given (else /dev/null).
pub fn run_cmd(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> CmdOut {
    let what = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let t_in = stdin.map(|data| {
        let mut sin = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = sin.write_all(&data);
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill(); // our own child, by pid
                let _ = child.wait();
                let so = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
                let se = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
                panic!(
                    "timed out after {timeout:?}: {what}\n--- stdout ---\n{so}\n--- stderr ---\n{se}"
                );
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    if let Some(t) = t_in {
        let _ = t.join();
    }
    CmdOut {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
        what,
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A short random hex string (for names and markers that must not collide).
pub fn rand_hex(n: usize) -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(n.min(32));
    s
}

/// `prefix-<random>`: a marker that occurs nowhere else.
pub fn marker(prefix: &str) -> String {
    format!("{prefix}-{}", rand_hex(16))
}

/// Poll `f` every 50 ms until it returns Some, or panic after `timeout` naming `what`.
/// (Waiting for an eventual fact, not a performance assertion.)
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Remove environment variables that would change where/how libpq tools connect.
pub fn scrub_pg_env(cmd: &mut Command) -> &mut Command {
    for v in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGOPTIONS",
        "PGAPPNAME",
        "PGCLIENTENCODING",
        "PGCONNECT_TIMEOUT",
        "PGSYSCONFDIR",
        "PGTZ",
        "PGDATESTYLE",
        "PGTARGETSESSIONATTRS",
        "PGREQUIRESSL",
        "PGGSSENCMODE",
        "PGCHANNELBINDING",
        "PSQLRC",
        "PGDATA",
        "LANGUAGE",
    ] {
        cmd.env_remove(v);
    }
    // A path that cannot exist: no ~/.pgpass, no warning.
    cmd.env("PGPASSFILE", "/dev/null/no-pgpass")
        .env("LC_ALL", "C.UTF-8")
        .env("LANG", "C.UTF-8")
}

/// Every regular file under `dir`, recursively, sorted by path.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// Copy a directory tree (regular files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_dir(&src, &dst);
        } else if t.is_file() {
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
        }
    }
}

/// True when `needle` occurs in `hay` as a whole number (not part of a longer digit run).
pub fn contains_number(hay: &str, n: u64) -> bool {
    let needle = n.to_string();
    let b = hay.as_bytes();
    let mut from = 0;
    while let Some(pos) = hay[from..].find(&needle) {
        let start = from + pos;
        let end = start + needle.len();
        let before_ok = start == 0 || !b[start - 1].is_ascii_digit();
        let after_ok = end == b.len() || !b[end].is_ascii_digit();
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
    }
    false
}

/// Run the relay/cancel suites against Postgres itself instead of pgward (self-check mode).
pub fn direct_mode() -> bool {
    std::env::var("PGWARD_E2E_DIRECT")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// What relay/cancel tests talk to: a fresh database behind a fresh pgward (default), or behind
/// nothing (PGWARD_E2E_DIRECT=1). Field order matters: pgward is dropped (killed) first.
pub struct Target {
    pub pgward: Option<Pgward>,
    pub db: String,
    login: Login,
    raw_login: Login,
}

impl Target {
    /// A new database named after `prefix`, and a way in for user "alice" (token) or, in direct
    /// mode, the service role (password over TCP; trust over the unix socket for the raw client,
    /// which does not speak SCRAM).
    pub fn new(prefix: &str) -> Target {
        let c = cluster();
        let db = c.create_database(prefix);
        if direct_mode() {
            Target {
                pgward: None,
                login: c.svc_tcp_login(&db),
                raw_login: c.svc_unix_login(&db),
                db,
            }
        } else {
            let pw = Pgward::start();
            // The relay suite exercises the protocol, so alice is in the group the default
            // policy restricts nothing for (fastpath calls, unparsable text reach Postgres and
            // get Postgres's own answers); policy decisions have their own tests.
            let token = pw.token("alice", &["pgward_admins"], "30m");
            let login = pw.login("alice", &token, &db);
            Target {
                raw_login: login.clone(),
                login,
                pgward: Some(pw),
                db,
            }
        }
    }
    /// Login for psql / tokio-postgres (TCP).
    pub fn login(&self) -> Login {
        self.login.clone()
    }
    /// Login for the raw protocol client (cleartext password or trust).
    pub fn raw_login(&self) -> Login {
        self.raw_login.clone()
    }
}
