//! How current `serve`'s copy of a remote access state (etcd) is: when it was last read in
//! full, whether the backend answers, and the staleness bound (`[access] max_staleness`)
//! after which new logins are refused. Shared by the watcher (which records each read), the
//! login check (through the state snapshot), the metrics and the status file.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rfc3339;
use crate::lock;

/// What `serve` writes to `<state_dir>/etcd-status.json` when the backend comes or goes, for
/// `pgward status` and `pgward doctor`.
pub const STATUS_FILE: &str = "etcd-status.json";

/// The status file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub pid: u32,
    pub connected: bool,
    /// When `connected` last changed (RFC 3339).
    pub since: String,
    /// The last complete read (RFC 3339), if any.
    pub last_sync: Option<String>,
    pub last_error: Option<String>,
    pub max_staleness_secs: u64,
}

impl BackendStatus {
    /// The status file of the `serve` using `state_dir`, if it wrote one.
    pub fn read(state_dir: &std::path::Path) -> Option<BackendStatus> {
        let bytes = std::fs::read(state_dir.join(STATUS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[derive(Debug)]
pub struct Freshness {
    max_staleness: Duration,
    /// Unix milliseconds of the last complete read; 0: never.
    synced_at_ms: AtomicI64,
    connected: AtomicBool,
    /// A failure was reported already (the first one is, even before any read succeeded).
    failure_reported: AtomicBool,
    last_error: Mutex<Option<String>>,
    status_path: Option<PathBuf>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Freshness {
    /// Nothing read yet: new logins are refused until the first read.
    pub fn new(max_staleness: Duration, status_path: Option<PathBuf>) -> Freshness {
        Freshness {
            max_staleness,
            synced_at_ms: AtomicI64::new(0),
            connected: AtomicBool::new(false),
            failure_reported: AtomicBool::new(false),
            last_error: Mutex::new(None),
            status_path,
        }
    }

    /// A complete read just succeeded.
    pub fn synced(&self) {
        self.synced_at_ms.store(now_ms(), Ordering::Release);
        *lock(&self.last_error) = None;
        crate::metrics::METRICS.access_backend_connected.set(1);
        crate::metrics::METRICS.access_synced_at_ms.store(now_ms(), Ordering::Relaxed);
        self.failure_reported.store(false, Ordering::Release);
        if !self.connected.swap(true, Ordering::AcqRel) {
            tracing::info!("access backend: etcd reachable, state current");
            self.write_status();
        }
    }

    /// A read failed: the last known state stays in force (until `max_staleness` for logins).
    pub fn failed(&self, error: &str) {
        *lock(&self.last_error) = Some(error.to_string());
        crate::metrics::METRICS.access_backend_connected.set(0);
        let was_connected = self.connected.swap(false, Ordering::AcqRel);
        if !self.failure_reported.swap(true, Ordering::AcqRel) || was_connected {
            tracing::error!(%error, "access backend: etcd unreachable; keeping the last known access state");
            self.write_status();
        }
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Why new logins must be refused (the state is older than `max_staleness`), if they must.
    pub fn stale(&self) -> Option<String> {
        let at = self.synced_at_ms.load(Ordering::Acquire);
        let bound = humantime::format_duration(self.max_staleness);
        if at == 0 {
            return Some(format!(
                "the access state has not been read from etcd yet (new logins wait for it; [access] max_staleness = {bound})"
            ));
        }
        let age = now_ms().saturating_sub(at);
        if age > i64::try_from(self.max_staleness.as_millis()).unwrap_or(i64::MAX) {
            return Some(format!(
                "the access state is stale: etcd not read since {} (over [access] max_staleness = {bound}); new logins are refused until etcd answers",
                rfc3339(at / 1000)
            ));
        }
        None
    }

    fn write_status(&self) {
        let Some(path) = &self.status_path else { return };
        let at = self.synced_at_ms.load(Ordering::Acquire);
        let st = BackendStatus {
            pid: std::process::id(),
            connected: self.connected(),
            since: rfc3339(now_ms() / 1000),
            last_sync: (at > 0).then(|| rfc3339(at / 1000)),
            last_error: lock(&self.last_error).clone(),
            max_staleness_secs: self.max_staleness.as_secs(),
        };
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&st)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the access backend status");
        }
    }
}
