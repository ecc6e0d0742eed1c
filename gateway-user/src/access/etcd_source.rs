//! The etcd backend's `serve` side: every gateway reads the fleet's revocations and access
//! events from etcd and watches `<prefix>/state/` for new ones.
//!
//! Each poll is a linearizable range read of the keys created since the last one (so a poll
//! that succeeds means the state is current as of then: [`Freshness::synced`]). The watch only
//! makes the next poll happen at once instead of at the next interval; whatever the watch
//! does, the polls alone deliver everything. When etcd cannot be reached the last state stays
//! in force; the connection is made again on the next poll.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{WatchOptions, WatchStream};

use super::etcd_store::{by_creation, decode};
use super::freshness::{Freshness, STATUS_FILE};
use super::source::{Batch, Delta, Pos};
use super::state::{AccessEvent, Revocation};
use crate::config::Config;
use crate::etcd::{Etcd, EtcdError};

/// How long after the watch broke it is set up again.
const WATCH_RETRY: Duration = Duration::from_secs(1);

pub(super) struct EtcdSource {
    cfg: Config,
    etcd: Option<Etcd>,
    watch: Option<WatchStream>,
    /// When the watch last ended or failed.
    watch_broken_at: Option<Instant>,
    /// The cluster read from (a different cluster: everything is read again).
    cluster: u64,
    /// The revision read up to.
    revision: i64,
    freshness: Arc<Freshness>,
}

impl EtcdSource {
    pub(super) fn new(cfg: &Config, state_dir: &Path) -> EtcdSource {
        let status = state_dir.is_dir().then(|| state_dir.join(STATUS_FILE));
        EtcdSource {
            cfg: cfg.clone(),
            etcd: None,
            watch: None,
            watch_broken_at: None,
            cluster: 0,
            revision: 0,
            freshness: Arc::new(Freshness::new(cfg.access.max_staleness, status)),
        }
    }

    pub(super) fn freshness(&self) -> Arc<Freshness> {
        self.freshness.clone()
    }

    async fn client(&mut self) -> Result<Etcd, EtcdError> {
        if let Some(e) = &self.etcd {
            return Ok(e.clone());
        }
        let e = Etcd::connect(&self.cfg).await?;
        self.etcd = Some(e.clone());
        Ok(e)
    }

    /// The keys created since the last poll. A failure is recorded in the freshness (and
    /// the watch dropped, to be set up again once etcd answers).
    pub(super) async fn poll(&mut self) -> Result<Delta, String> {
        match self.read_new().await {
            Ok(d) => {
                self.freshness.synced();
                Ok(d)
            }
            Err(e) => {
                let msg = e.to_string();
                self.freshness.failed(&msg);
                self.watch = None;
                Err(msg)
            }
        }
    }

    async fn read_new(&mut self) -> Result<Delta, EtcdError> {
        let etcd = self.client().await?;
        let mut read = read_since(&etcd, self.revision + 1).await?;
        let reset = self.cluster != 0 && read.cluster != self.cluster;
        if reset {
            tracing::warn!(
                old = self.cluster,
                new = read.cluster,
                "etcd cluster id changed; reading the access state again"
            );
            read = read_since(&etcd, 1).await?;
        }
        self.cluster = read.cluster;
        self.revision = read.revision;
        let pos = Pos { ino: read.cluster, offset: read.revision.max(0) as u64 };
        Ok(Delta {
            revoked: (reset || !read.revoked.is_empty()).then_some(Batch { items: read.revoked, reset, pos }),
            events: (reset || !read.events.is_empty()).then_some(Batch { items: read.events, reset, pos }),
        })
    }

    /// Resolves when the watch reports a change under `<prefix>/state/` (or ends: the next
    /// poll finds out why). Pending while there is no watch and it cannot be set up (or, after
    /// the watch broke, until [`WATCH_RETRY`] passed: the polls carry on meanwhile).
    pub(super) async fn changed(&mut self) {
        if self.watch.is_none() {
            let retry_later = self.watch_broken_at.is_some_and(|t| t.elapsed() < WATCH_RETRY);
            let Some(etcd) = self.etcd.clone().filter(|_| !retry_later) else {
                return std::future::pending().await;
            };
            let opts = WatchOptions::new().with_prefix().with_start_revision(self.revision + 1);
            match etcd.watch(etcd.keys.state(), opts).await {
                Ok(stream) => self.watch = Some(stream),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch etcd; polling only");
                    return std::future::pending().await;
                }
            }
        }
        let Some(stream) = self.watch.as_mut() else {
            return;
        };
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                self.watch = None;
                self.watch_broken_at = Some(Instant::now());
            }
        }
    }
}

/// One consistent read of the keys created at or after `since`.
struct Read {
    cluster: u64,
    revision: i64,
    revoked: Vec<(Revocation, u64)>,
    events: Vec<(AccessEvent, u64)>,
}

async fn read_since(etcd: &Etcd, since: i64) -> Result<Read, EtcdError> {
    let revoked = etcd.get(etcd.keys.revoked_dir(), Some(by_creation().with_min_create_revision(since))).await?;
    let header = revoked.header().ok_or_else(|| EtcdError::Data("a response without header".into()))?;
    let (cluster, revision) = (header.cluster_id(), header.revision());
    let opts = by_creation().with_min_create_revision(since).with_revision(revision);
    let events = etcd.get(etcd.keys.access_dir(), Some(opts)).await?;
    Ok(Read { cluster, revision, revoked: items(revoked.kvs()), events: items(events.kvs()) })
}

/// The values that parse as `T`, each with the revision it was created at.
fn items<T: serde::de::DeserializeOwned>(kvs: &[etcd_client::KeyValue]) -> Vec<(T, u64)> {
    kvs.iter().filter_map(|kv| decode(kv).map(|v| (v, kv.create_revision().max(0) as u64))).collect()
}
