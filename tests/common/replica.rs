//! A streaming replica of a harness cluster, and the moves of a failover: stop the primary,
//! promote the replica, bring the old primary back as a standby.
//!
//! The replica is a `pg_basebackup -R` of the primary (so it streams from it over the
//! primary's unix socket, which initdb's `local replication all trust` admits), in a directory
//! inside the primary's temp dir, with its socket in the primary's socket directory (its own
//! port number in the file name) and TCP on a free port of 127.0.0.1. It is stopped on Drop,
//! and by a watchdog if the test process dies without unwinding.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use super::cluster::{server_options, spawn_watchdog};
use super::{Login, PgCluster, free_port, run_cmd, wait_for};

/// Time a pg_ctl or pg_basebackup run may take on a loaded machine.
const PG_TOOL_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Replica {
    primary: &'static PgCluster,
    /// The replica's own directory (data and log), inside the primary's temp dir.
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    pub port: u16,
}

impl Replica {
    /// Base-backup `primary` into a new data directory and start it as a hot standby
    /// streaming from it; returns once it streams (the primary's `pg_stat_replication` says so).
    #[track_caller]
    pub fn of(primary: &'static PgCluster) -> Replica {
        let root = primary.root.join("replica");
        let data_dir = root.join("data");
        let log_file = root.join("postgres.log");
        let backup = run_cmd(
            primary
                .server_cmd("pg_basebackup")
                .arg("-D")
                .arg(&data_dir)
                .args([
                    "-h",
                    &primary.socket_dir.to_string_lossy(),
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    super::cluster::SUPERUSER,
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ]),
            None,
            PG_TOOL_TIMEOUT,
        );
        backup.expect_ok();
        spawn_watchdog(&data_dir, &root);
        let mut r = Replica {
            primary,
            root,
            data_dir,
            log_file,
            port: 0,
        };
        r.start();
        wait_for(
            "the replica to stream from the primary",
            Duration::from_secs(60),
            || {
                (primary.sql(
                    "postgres",
                    "select count(*) from pg_stat_replication where state = 'streaming'",
                ) == "1")
                    .then_some(())
            },
        );
        r
    }

    /// `pg_ctl start` on a free port (retried: a port can be taken between the probe and the bind).
    fn start(&mut self) {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port();
            if let Some(out) = start_server(self.primary, &self.data_dir, &self.log_file, port) {
                last = Some(out);
                continue;
            }
            self.port = port;
            return;
        }
        panic!(
            "starting the replica failed: {}\n--- log ---\n{}",
            last.unwrap_or_default(),
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The superuser over the replica's unix socket.
    pub fn superuser_login(&self, db: &str) -> Login {
        Login::new(
            &self.primary.socket_dir.to_string_lossy(),
            self.port,
            super::cluster::SUPERUSER,
            None,
            db,
        )
    }

    /// Run SQL on the replica as the superuser; panic on error; psql's -At output (trimmed).
    #[track_caller]
    pub fn sql(&self, db: &str, sql: &str) -> String {
        self.superuser_login(db).psql(&["-c", sql]).expect_ok()
    }

    /// Wait until the replica has replayed everything the primary has written so far.
    #[track_caller]
    pub fn wait_caught_up(&self) {
        let lsn = self.primary.sql("postgres", "select pg_current_wal_lsn()");
        wait_for(
            "the replica to replay the primary's WAL",
            Duration::from_secs(60),
            || {
                (self.sql(
                    "postgres",
                    &format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
                ) == "t")
                    .then_some(())
            },
        );
    }

    /// `pg_ctl promote -w`: the replica leaves recovery and becomes a primary.
    #[track_caller]
    pub fn promote(&self) {
        let out = run_cmd(
            self.primary.pg_ctl(&self.data_dir)
                .args(["-w", "-t", "120", "promote"]),
            None,
            PG_TOOL_TIMEOUT,
        );
        assert!(
            out.success(),
            "pg_ctl promote failed: {}\n--- log ---\n{}",
            out.describe(),
            self.log()
        );
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = run_cmd(
            self.primary.pg_ctl(&self.data_dir)
                .args(["stop", "-m", "immediate", "-w"]),
            None,
            PG_TOOL_TIMEOUT,
        );
    }
}

/// `pg_ctl start -w` of `data_dir` with the harness's options on `port`; None on success, else
/// what pg_ctl said.
fn start_server(
    c: &PgCluster,
    data_dir: &std::path::Path,
    log: &std::path::Path,
    port: u16,
) -> Option<String> {
    let opts = server_options(port, &c.socket_dir);
    let out = run_cmd(
        c.pg_ctl(data_dir)
            .arg("-l")
            .arg(log)
            .args(["-w", "-t", "120", "-o", &opts, "start"]),
        None,
        PG_TOOL_TIMEOUT,
    );
    (!out.success()).then(|| out.describe())
}

impl PgCluster {
    /// `pg_ctl stop -m fast`: sessions end, a shutdown checkpoint is written (and streamed to
    /// a replica before the server exits).
    #[track_caller]
    pub fn stop_fast(&self) {
        let out = run_cmd(
            self.pg_ctl(&self.data_dir)
                .args(["-w", "-t", "120", "-m", "fast", "stop"]),
            None,
            PG_TOOL_TIMEOUT,
        );
        assert!(out.success(), "pg_ctl stop failed: {}", out.describe());
    }

    /// Start a stopped cluster again as a hot standby (a `standby.signal` in its data
    /// directory, no primary to stream from: it stays in recovery and serves reads) on its own
    /// port — a demoted primary.
    #[track_caller]
    pub fn start_as_standby(&self) {
        let signal = self.data_dir.join("standby.signal");
        std::fs::write(&signal, "").unwrap();
        let owner = std::fs::metadata(&self.data_dir).unwrap();
        std::os::unix::fs::chown(&signal, Some(owner.uid()), Some(owner.gid())).unwrap();
        if let Some(why) = start_server(self, &self.data_dir, &self.log_file, self.port) {
            panic!(
                "starting the old primary as a standby failed: {why}\n--- log ---\n{}",
                self.server_log()
            );
        }
        assert_eq!(
            self.sql("postgres", "select pg_is_in_recovery()"),
            "t",
            "the old primary is a standby"
        );
    }
}
