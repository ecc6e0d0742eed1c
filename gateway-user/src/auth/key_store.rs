//! The verification keys sessions read, and the background task that keeps remote keys current.
//!
//! Sessions take an `Arc` snapshot of the current [`KeySet`] (a read lock held for a pointer
//! copy) and never wait for a fetch. The [`Refresher`] runs on `serve`'s main runtime: it fetches
//! every `auth.jwks_refresh`, and sooner when a token names a key id the snapshot lacks (a
//! provider that rotated its keys) — no sooner than `auth.jwks_min_refresh` after the previous
//! fetch. A failed fetch keeps the last good keys; until one fetch succeeded there are none and
//! every login is refused. Each attempt is written to `<access.state_dir>/idp-keys.json` for
//! `pgward doctor`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::claims::Checks;
use super::jwks_fetch::Fetcher;
use super::keyset::{KeySet, Strictness};
use crate::access::rfc3339;
use crate::host::clock::now_unix;

/// What `serve` writes after each fetch of remote keys, in `access.state_dir`.
pub const KEY_STATUS_FILE: &str = "idp-keys.json";
/// Shortest wait before a failed fetch is tried again, whatever `auth.jwks_min_refresh` says.
const MIN_RETRY: Duration = Duration::from_secs(1);

/// The current keys (none until a fetch succeeded) and how they were got.
#[derive(Debug)]
pub struct KeyStore {
    current: RwLock<Option<Arc<KeySet>>>,
    status: Mutex<KeyStatus>,
    /// Woken when a token names an unknown key id (remote keys only).
    wake: Notify,
    remote: bool,
    /// Fetch attempts so far, successful or not: a login waiting for the fetch its unknown key
    /// id asked for watches it.
    attempts: watch::Sender<u64>,
}

/// How the keys were got: for the log, `pgward doctor`, and the status file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The JWKS file, or the URL the keys are fetched from (after discovery: the `jwks_uri`).
    pub source: String,
    /// Unix seconds of the last successful fetch (or load, for a file).
    pub fetched_at: Option<i64>,
    /// Key ids of the current keys.
    pub kids: Vec<String>,
    /// Unix seconds of the last attempt, successful or not.
    pub last_attempt: Option<i64>,
    /// Why the last attempt failed (cleared by a success).
    pub last_error: Option<String>,
    pub fetches: u64,
    pub failures: u64,
}

impl KeyStatus {
    /// One line for logs and `pgward doctor`.
    pub fn summary(&self) -> String {
        match (self.fetched_at, &self.last_error) {
            (None, Some(e)) => format!("no keys were ever fetched from {}: {e}", self.source),
            (None, None) => format!("no keys fetched from {} yet", self.source),
            (Some(at), err) => {
                let mut s = format!("{} key(s) ({}) fetched from {} at {}", self.kids.len(), self.kids.join(", "), self.source, rfc3339(at));
                if let Some(e) = err {
                    s.push_str(&format!("; the last fetch failed, the last good keys are kept: {e}"));
                }
                s
            }
        }
    }

    /// The status `serve` last wrote into `dir`, if any.
    pub fn read(dir: &Path) -> Option<KeyStatus> {
        let text = std::fs::read_to_string(dir.join(KEY_STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl KeyStore {
    /// Keys from a file, fixed for the life of the process.
    pub fn fixed(keys: KeySet, source: String) -> KeyStore {
        let status = KeyStatus {
            source,
            fetched_at: Some(now_unix()),
            kids: keys.kids().into_iter().map(|(k, _)| k).collect(),
            last_attempt: Some(now_unix()),
            fetches: 1,
            ..KeyStatus::default()
        };
        KeyStore {
            current: RwLock::new(Some(Arc::new(keys))),
            status: Mutex::new(status),
            wake: Notify::new(),
            remote: false,
            attempts: watch::Sender::new(0),
        }
    }

    /// No keys yet; a [`Refresher`] fills them in.
    pub fn remote(source: String) -> KeyStore {
        let status = KeyStatus { source, ..KeyStatus::default() };
        KeyStore { current: RwLock::new(None), status: Mutex::new(status), wake: Notify::new(), remote: true, attempts: watch::Sender::new(0) }
    }

    /// The current keys (`None`: never fetched).
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn status(&self) -> KeyStatus {
        crate::lock(&self.status).clone()
    }

    /// Whether the keys are fetched (and may change), not read from a file.
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// Watches the count of fetch attempts: changes when one finished, successful or not.
    pub fn attempts(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }

    /// A token named a key id the current keys lack: ask the refresher for a fetch (it decides
    /// when). Never waits.
    pub fn unknown_kid(&self) {
        if self.remote {
            self.wake.notify_one();
        }
    }

    fn publish(&self, keys: KeySet, jwks_url: String) {
        let kids = keys.kids().into_iter().map(|(k, _)| k).collect();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(keys));
        let mut st = crate::lock(&self.status);
        st.source = jwks_url;
        st.fetched_at = Some(now_unix());
        st.last_attempt = st.fetched_at;
        st.kids = kids;
        st.last_error = None;
        st.fetches += 1;
        drop(st);
        self.attempts.send_modify(|n| *n += 1);
    }

    fn failed(&self, error: String) {
        let mut st = crate::lock(&self.status);
        st.last_attempt = Some(now_unix());
        st.last_error = Some(error);
        st.failures += 1;
        drop(st);
        self.attempts.send_modify(|n| *n += 1);
    }
}

/// Keeps a remote [`KeyStore`] current.
pub struct Refresher {
    store: Arc<KeyStore>,
    fetcher: Fetcher,
    checks: Checks,
    every: Duration,
    min_gap: Duration,
    /// Where each attempt's [`KeyStatus`] is written (the state directory).
    status_dir: Option<PathBuf>,
}

impl Refresher {
    pub fn new(store: Arc<KeyStore>, fetcher: Fetcher, checks: Checks, every: Duration, min_gap: Duration, status_dir: Option<PathBuf>) -> Refresher {
        Refresher { store, fetcher, checks, every, min_gap, status_dir }
    }

    /// One fetch: publish the keys, or keep the last good ones and record why not.
    pub async fn refresh_once(&self) -> bool {
        let outcome = match self.fetcher.fetch().await {
            Ok(f) => KeySet::from_jwks(&f.body, &self.checks, Strictness::Provider)
                .map(|k| (k, f.jwks_url.clone()))
                .map_err(|e| format!("{}: {e}", f.jwks_url)),
            Err(e) => Err(e),
        };
        let ok = match outcome {
            Ok((keys, url)) => {
                let kids: Vec<String> = keys.kids().into_iter().map(|(k, _)| k).collect();
                let before = self.store.status();
                self.store.publish(keys, url.clone());
                if before.kids != kids || before.last_error.is_some() {
                    tracing::info!(source = %url, ?kids, "token keys fetched from the identity provider");
                } else {
                    tracing::debug!(source = %url, "token keys fetched from the identity provider (unchanged)");
                }
                true
            }
            Err(e) => {
                let had_keys = self.store.current().is_some();
                self.store.failed(e.clone());
                if had_keys {
                    tracing::warn!(error = %e, "fetching the identity provider's keys failed; the last good keys stay in use");
                } else {
                    tracing::error!(error = %e, "fetching the identity provider's keys failed; no keys yet, every login is refused");
                }
                false
            }
        };
        self.write_status();
        ok
    }

    /// Fetch on the timer and on request, forever (the task is aborted at shutdown).
    pub async fn run(self, mut last_ok: bool) {
        let mut last = Instant::now();
        loop {
            let wait = if last_ok { self.every } else { self.min_gap.clamp(MIN_RETRY, self.every) };
            tokio::select! {
                _ = tokio::time::sleep_until(last + wait) => {}
                _ = self.store.wake.notified() => {
                    tokio::time::sleep_until(last + self.min_gap).await;
                }
            }
            last = Instant::now();
            last_ok = self.refresh_once().await;
        }
    }

    fn write_status(&self) {
        let Some(dir) = &self.status_dir else { return };
        let st = self.store.status();
        let Ok(text) = serde_json::to_string_pretty(&st) else { return };
        let tmp = dir.join(format!("{KEY_STATUS_FILE}.tmp"));
        let r = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, dir.join(KEY_STATUS_FILE)));
        if let Err(e) = r {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot write the key status file");
        }
    }
}
