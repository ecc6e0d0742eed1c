//! Where `serve` reads the access state from ([`Source`]): this host's files or etcd. Both
//! hand the watcher what is new since the last read ([`Delta`]), each item with a position
//! ([`Pos`]) the watcher's cursor records once the item is audited.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::etcd_source::EtcdSource;
use super::file_source::FileSource;
use super::freshness::Freshness;
use super::state::{AccessEvent, Revocation};
use super::{CURSOR_FILE, ETCD_CURSOR_FILE};
use crate::config::Config;

/// A position in one stream of items. Files: inode and byte offset just past a line. etcd:
/// the cluster id and the revision an item was created at (or read up to).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Pos {
    pub(super) ino: u64,
    pub(super) offset: u64,
}

/// New items of one stream: each with the position just past it, whether the stream started
/// over (everything before is gone: forget it), and the position read up to.
pub(super) struct Batch<T> {
    pub(super) items: Vec<(T, u64)>,
    pub(super) reset: bool,
    pub(super) pos: Pos,
}

/// What is new in both streams (None: nothing read).
pub(super) struct Delta {
    pub(super) revoked: Option<Batch<Revocation>>,
    pub(super) events: Option<Batch<AccessEvent>>,
}

pub(super) enum Source {
    File(FileSource),
    Etcd(Box<EtcdSource>),
}

impl Source {
    /// The source `[access] backend` names; with etcd, also how current its state is.
    pub(super) fn new(cfg: &Config, dir: &Path) -> (Source, Option<Arc<Freshness>>) {
        match cfg.access.etcd() {
            None => (Source::File(FileSource::new(dir)), None),
            Some(_) => {
                let src = EtcdSource::new(cfg, dir);
                let f = src.freshness();
                (Source::Etcd(Box::new(src)), Some(f))
            }
        }
    }

    /// The cursor file's name: one per backend, so switching backends audits the other
    /// backend's items from its own start.
    pub(super) fn cursor_file(&self) -> &'static str {
        match self {
            Source::File(_) => CURSOR_FILE,
            Source::Etcd(_) => ETCD_CURSOR_FILE,
        }
    }

    /// What is new. `Err` when the backend cannot be read (the last state stays in force).
    pub(super) async fn poll(&mut self) -> Result<Delta, String> {
        match self {
            Source::File(f) => f.poll().map_err(|e| e.to_string()),
            Source::Etcd(e) => e.poll().await,
        }
    }

    /// Wait until the next poll is due: the poll interval, or (etcd) a change reported by
    /// the watch, whichever comes first.
    pub(super) async fn next(&mut self, iv: &mut tokio::time::Interval) {
        match self {
            Source::File(_) => {
                iv.tick().await;
            }
            Source::Etcd(e) => {
                tokio::select! {
                    _ = iv.tick() => {}
                    _ = e.changed() => {}
                }
            }
        }
    }
}
