//! The audit writer: sessions append records to the log under a lock; writer threads
//! write and sync them (group commit, pipelined).
//!
//! `submit`/`append` encode the record in the caller's thread under the log's mutex: assign
//! seq/ts/prev_hash, hash, and append the line to an in-memory buffer (so the chain order
//! is the order of appends). With `fsync = group` a writer thread then takes the whole
//! buffer, writes it with one `write(2)` (still under the lock, so the file holds records in
//! seq order), releases the lock and runs one `fdatasync` that covers the batch; meanwhile
//! the other writer thread can take and write the next batch and start its own sync
//! (pipelined group commit: a record waits for about one flush, not one and a half). When a
//! sync returns, every record it covered — in order, including earlier batches still
//! waiting for their own sync — is answered. With `fsync = off` the appending session
//! writes the buffer itself: no thread handoff at all. With `always` one record per
//! write+sync. Records nobody waits for (`append`) wake no thread: they ride along with the
//! next batch, or go out within `LAZY_FLUSH`.
//!
//! Segments are preallocated to `segment_bytes` (`fallocate`) and, with `group`/`always`,
//! filled with written zeros `ZERO_AHEAD` ahead of the last line; batches are `pwrite`s
//! over those zeros (like Postgres WAL), so an fdatasync flushes the data and nothing else:
//! appending would change the file size and make every fdatasync write the inode too. The
//! content of a segment ends at its first NUL byte (JSON lines never hold one): readers stop
//! there, a clean shutdown or rotation trims the tail, and recovery at start drops whatever
//! follows the last complete line.
//!
//! Failure handling (fail closed):
//! * Before every write the writer checks that the audit directory is writable
//!   (`access(2)` with `W_OK`) and that the segment path still names the open file (same
//!   device and inode, not cut shorter than what was written to it) — a writer thread just
//!   before it takes the batch, without the log lock (see `ProbeTarget`). If either fails,
//!   the whole batch is refused. A removed, replaced or truncated segment is never written
//!   again: once the directory is usable, the next batch starts a
//!   new segment named after the next seq (so `verify` shows the gap, if any, honestly).
//!   Note: root passes `access(W_OK)` whatever the mode bits, so for root only removing or
//!   renaming the directory/segment makes the writer refuse.
//! * If a write fails, the file is truncated back to its last good length (retried before
//!   the next write if that fails too), the in-memory seq and hash chain roll back to the
//!   last written record, and every queued record gets `Err`.
//! * If an fdatasync fails, nothing after the last durable record is trusted: the segment is
//!   truncated to its durable length, the chain rolls back to the last durable record, and
//!   every record after it gets `Err`. Each writer thread syncs through its own descriptor,
//!   so no thread's success hides an error another thread's sync reported.
//! * A segment is rotated only once everything in it is durable.
//!
//! Later batches work again once the disk recovers.
//!
//! Checkpoints are only written when a [`CheckpointSigner`] is configured. HEAD (which names
//! the latest durable checkpoint) is rewritten by a thread of its own, so its two flushes
//! never hold up a batch.

//! Files: [`handle`] (what sessions call: submit a record, await durability), [`log`] (the
//! in-memory chain and the batch written to the segment), [`flush`] (the writer threads: group
//! commit), [`segment`] (segment files and rotation), [`probe`] (the directory and path checks),
//! [`loop_flush`] (event loops that flush their own sessions' batches), [`direct`] (O_DIRECT batches), [`disk`] (the write and sync calls), [`recovery`] (opening an
//! existing log), [`checkpoint`] and [`signer`] (signed checkpoints), [`head`] (the HEAD file),
//! [`ts`] (record timestamps).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::config::FsyncPolicy;

mod checkpoint;
mod direct;
mod disk;
mod flush;
mod handle;
mod head;
mod log;
mod loop_flush;
mod probe;
mod recovery;
mod segment;
mod signer;
mod ts;

#[cfg(test)]
pub(crate) use disk::fault;
pub use handle::{AuditHandle, OnDurable, Outcome, Waiter};
pub use recovery::last_line;
pub use signer::CheckpointSigner;
#[cfg(test)]
pub(super) use ts::{TsCache, format_ts};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log I/O error: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("audit directory {} is not writable: {reason}", path.display())]
    Unwritable { path: PathBuf, reason: String },
    #[error("audit segment {} was removed, replaced or truncated while in use", path.display())]
    SegmentGone { path: PathBuf },
    #[error("audit log {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint signing key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("audit export: {0}")]
    Export(String),
    #[error("invalid audit record: {0}")]
    InvalidRecord(String),
    #[error("the audit writer is not running")]
    Closed,
}

impl AuditError {
    fn io(context: impl Into<String>, source: io::Error) -> AuditError {
        AuditError::Io { context: context.into(), source: Arc::new(source) }
    }
}

#[derive(Debug)]
pub struct WriterOptions {
    pub dir: PathBuf,
    pub fsync: FsyncPolicy,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    pub segment_bytes: u64,
    /// Writer threads with `fsync = group` (at least 1).
    pub sync_threads: usize,
    /// With `fsync` group/always and one writer thread: write batches with O_DIRECT (see
    /// [`direct`]); falls back to the page cache where the filesystem refuses it.
    pub direct_io: bool,
    pub signer: Option<CheckpointSigner>,
    /// Sends durable records to syslog/journald (told how far the log is durable).
    pub export: Option<super::Exporter>,
    /// Told each durable checkpoint (the off-host anchors, `audit::anchor`).
    pub on_checkpoint: Option<CheckpointHook>,
}

/// Called with each durable checkpoint, from the HEAD thread after it rewrote HEAD. It must
/// not block: it hands the checkpoint on (the anchor sink keeps only the newest).
#[derive(Clone)]
pub struct CheckpointHook(pub Arc<dyn Fn(&crate::audit::chain::Head) + Send + Sync>);

impl std::fmt::Debug for CheckpointHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointHook")
    }
}

impl WriterOptions {
    /// Options from the config: `[audit]`, with the checkpoint signer from
    /// `audit.checkpoint_key` / `audit.checkpoint_kid`.
    pub fn from_config(cfg: &crate::config::Config) -> Result<WriterOptions, AuditError> {
        let signer = CheckpointSigner::from_config(cfg)?;
        let export = match super::export::ExportSettings::from_config(cfg).map_err(AuditError::Export)? {
            Some(settings) => Some(super::Exporter::start(settings).map_err(AuditError::Export)?),
            None => None,
        };
        Ok(WriterOptions {
            dir: cfg.resolve(&cfg.audit.dir),
            fsync: cfg.audit.fsync,
            checkpoint_every: cfg.audit.checkpoint_every,
            checkpoint_interval: cfg.audit.checkpoint_interval,
            segment_bytes: cfg.audit.segment_bytes,
            sync_threads: cfg.audit.sync_threads,
            direct_io: cfg.audit.direct_io,
            signer: Some(signer),
            export,
            on_checkpoint: None,
        })
    }
}

/// Counters since start (for metrics and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records made durable (including start and checkpoint records).
    pub records: u64,
    /// Successful batches (each one write).
    pub batches: u64,
    /// fdatasync calls on segment files.
    pub syncs: u64,
    /// Batches refused because of an error.
    pub failed_batches: u64,
}

/// The counters behind [`WriterStats`], shared by the log and the handles.
#[derive(Default)]
struct Counters {
    records: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    failed_batches: AtomicU64,
    /// The last batch written was refused, and none has been durable since.
    failing: std::sync::atomic::AtomicBool,
}
