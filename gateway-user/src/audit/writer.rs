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
//!   device and inode) — a writer thread just before it takes the batch, without the log
//!   lock (see `ProbeTarget`). If either fails, the whole batch is refused. A removed or replaced
//!   segment is never written again: once the directory is usable, the next batch starts a
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

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::SecondsFormat;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use tokio::sync::oneshot;

use super::chain::{self, GENESIS_HASH, HASH_HEX_LEN, HASH_PREFIX, HEAD_FILE, Head};
use super::record::{Kind, Record};
use crate::config::FsyncPolicy;
use crate::lock;

/// Longest time a record appended with `append` (nobody waiting) stays in memory.
const LAZY_FLUSH: Duration = Duration::from_millis(100);

/// With `fsync = off` (no durability promise, one write per statement) the directory and
/// segment path checks run at most this often; with `group`/`always` before every write
/// (their cost is small next to the fdatasync the batch waits for anyway).
const OFF_PATH_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// How far ahead of the last line the active segment is filled with written zeros (with
/// `group`/`always`; see [`OpenSegment::zero_ahead`]).
const ZERO_AHEAD: u64 = 1 << 20;

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
    #[error("audit segment {} was removed or replaced while in use", path.display())]
    SegmentGone { path: PathBuf },
    #[error("audit log {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint signing key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
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

/// Signs checkpoints with the gateway's Ed25519 key.
pub struct CheckpointSigner {
    kid: String,
    key: SigningKey,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    pub fn new(kid: impl Into<String>, key: SigningKey) -> CheckpointSigner {
        CheckpointSigner { kid: kid.into(), key }
    }

    /// Load a PKCS#8 PEM Ed25519 private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem_file(path: &Path, kid: impl Into<String>) -> Result<CheckpointSigner, AuditError> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| AuditError::Key { path: path.to_owned(), reason: e.to_string() })?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| AuditError::Key { path: path.to_owned(), reason: e.to_string() })?;
        Ok(CheckpointSigner::new(kid, key))
    }

    /// Same as [`CheckpointSigner::from_pkcs8_pem_file`].
    pub fn from_pem_file(path: &Path, kid: impl Into<String>) -> Result<CheckpointSigner, AuditError> {
        CheckpointSigner::from_pkcs8_pem_file(path, kid)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// base64url (no padding) Ed25519 signature over `pgward-checkpoint:{seq}:{hash}`.
    pub fn sign(&self, anchor_seq: u64, anchor_hash: &str) -> String {
        let msg = chain::checkpoint_message(anchor_seq, anchor_hash);
        let sig = self.key.sign(msg.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.to_bytes())
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
    /// [`DirectWrite`]); falls back to the page cache where the filesystem refuses it.
    pub direct_io: bool,
    pub signer: Option<CheckpointSigner>,
    /// Copies of durable lines for syslog/journald (best effort).
    pub export: Option<super::Exporter>,
}

impl WriterOptions {
    /// Options from the config: `[audit]` plus the checkpoint signer from `auth.signing_key`
    /// / `auth.signing_kid`.
    pub fn from_config(cfg: &crate::config::Config) -> Result<WriterOptions, AuditError> {
        let signer =
            CheckpointSigner::from_pkcs8_pem_file(&cfg.resolve(&cfg.auth.signing_key), cfg.auth.signing_kid.clone())?;
        Ok(WriterOptions {
            dir: cfg.resolve(&cfg.audit.dir),
            fsync: cfg.audit.fsync,
            checkpoint_every: cfg.audit.checkpoint_every,
            checkpoint_interval: cfg.audit.checkpoint_interval,
            segment_bytes: cfg.audit.segment_bytes,
            sync_threads: cfg.audit.sync_threads,
            direct_io: cfg.audit.direct_io,
            signer: Some(signer),
            export: super::Exporter::start(cfg.audit.export, cfg.audit.syslog_socket.clone()),
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

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    failed_batches: AtomicU64,
}

/// Work a writer thread runs the moment a record is durable, before the record's waiter is
/// told, outside the log lock. The session uses it to send a held statement to a plaintext
/// upstream itself, saving the hop back to the session's event loop (see `session`).
pub trait OnDurable: Send + Sync {
    /// The record is durable. Return the waiter to have the writer tell it now, or keep it to
    /// tell it later with [`Waiter::tell`] (the waiting task is not woken meanwhile: the
    /// hook's owner learns of the outcome some other way and saves a wakeup). Dropping it
    /// untold tells the waiter the writer stopped.
    fn durable(&self, waiter: Waiter) -> Option<Waiter>;
}

/// The waiter of a durable record, handed to its [`OnDurable`] hook.
pub struct Waiter {
    tx: oneshot::Sender<Result<u64, AuditError>>,
    seq: u64,
}

impl Waiter {
    /// The durable record's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Tell the waiter its record is durable.
    pub fn tell(self) {
        let _ = self.tx.send(Ok(self.seq));
    }

    /// A waiter for record `seq`, and what it is told (for tests of hooks).
    #[cfg(test)]
    pub(crate) fn for_test(seq: u64) -> (Waiter, oneshot::Receiver<Result<u64, AuditError>>) {
        let (tx, rx) = oneshot::channel();
        (Waiter { tx, seq }, rx)
    }
}

/// Who waits for a record: the channel that tells it the outcome, and what to run first when
/// the record is durable (never run when it fails).
struct Reply {
    tx: oneshot::Sender<Result<u64, AuditError>>,
    hook: Option<Arc<dyn OnDurable>>,
}

impl Reply {
    fn send(self, r: Result<u64, AuditError>) {
        let _ = self.tx.send(r);
    }
}

/// A position in the chain: the last record at some point, and the count since the last
/// checkpoint after it (what a rollback restores).
#[derive(Clone)]
struct ChainPos {
    seq: u64,
    hash: String,
    since_ckpt: u64,
}

/// A record encoded into `Log::buf`, not written yet.
struct Queued {
    seq: u64,
    reply: Option<Reply>,
    event: Option<crate::metrics::Event>,
    /// Offset in `buf` just past this record's line.
    end: usize,
    /// The chain position after this record.
    hash: [u8; HASH_HEX_LEN],
    since_ckpt: u64,
}

/// Records written to the segment (page cache) and waiting for a sync to cover them.
struct Chunk {
    last_seq: u64,
    items: Vec<(u64, Option<Reply>, Option<crate::metrics::Event>)>,
    lines: u64,
    /// A copy of the lines for the exporter (only when exporting).
    bytes: Option<Vec<u8>>,
}

/// What a syncer needs to make a write durable without holding the lock.
struct SyncTicket {
    epoch: u64,
    seg_id: u64,
    len: u64,
    pos: ChainPos,
    fd: Arc<File>,
    /// With direct I/O the batch is written by the syncer (through `fd`), not under the lock.
    direct: Option<DirectWrite>,
}

/// O_DIRECT needs offsets, lengths and memory aligned to the device's logical block size;
/// 4096 is a multiple of every common one.
const DIO_ALIGN: usize = 4096;

/// A batch written with O_DIRECT: whole blocks from the one holding the segment's current end
/// (its earlier bytes rewritten unchanged) to the zero-padded block holding the batch's end.
/// The fdatasync then only flushes the device cache, where through the page cache it would
/// also run the writeback machinery for one dirty page: less latency and about half the CPU
/// per durable batch. The write and the flush both happen outside the log lock, in order (one
/// writer thread), so blocks are never in flight twice at once.
struct DirectWrite {
    buf: AlignedBuf,
    at: u64,
}

/// A zero-filled buffer whose usable part starts on a [`DIO_ALIGN`] boundary.
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let raw = vec![0u8; len + DIO_ALIGN];
        let off = raw.as_ptr().align_offset(DIO_ALIGN);
        if off >= DIO_ALIGN {
            return Err(io::Error::other("cannot align a direct I/O buffer"));
        }
        Ok(AlignedBuf { raw, off, len })
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Make the ticket's batch durable: write it first if it goes direct, then fdatasync.
fn sync_ticket(t: &SyncTicket, dir: &Path) -> io::Result<()> {
    if let Some(d) = &t.direct {
        direct_write(&t.fd, d.buf.as_slice(), d.at, dir)?;
    }
    sync_batch(&t.fd, dir)
}

/// State shared by the handles and the writer threads.
struct Shared {
    log: Mutex<Log>,
    /// Writer threads wait here for work.
    work: Condvar,
    /// Serializes HEAD rewrites; holds the seq of the checkpoint HEAD names.
    head_written: Mutex<u64>,
    /// The next HEAD for the head thread to write (the newest wins), and its stop flag.
    head_slot: Mutex<HeadSlot>,
    head_cv: Condvar,
    dir: PathBuf,
    fsync: FsyncPolicy,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct HeadSlot {
    head: Option<Head>,
    stop: bool,
}

struct Inner {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    head_thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Clone)]
pub struct AuditHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle").finish_non_exhaustive()
    }
}

impl AuditHandle {
    /// Start the writer: opens/continues the log in `dir` (creating it), continuing seq and
    /// hash chain from the last record of the last segment; writes a `start` record (durable
    /// before this returns).
    pub fn start(opts: WriterOptions) -> Result<AuditHandle, AuditError> {
        let counters = Arc::new(Counters::default());
        let fsync = opts.fsync;
        let dir = opts.dir.clone();
        let threads = if fsync == FsyncPolicy::Group { opts.sync_threads.clamp(1, 16) } else { 1 };
        let log = Log::open(opts, counters.clone(), threads)?;
        let shared = Arc::new(Shared {
            log: Mutex::new(log),
            work: Condvar::new(),
            head_written: Mutex::new(0),
            head_slot: Mutex::new(HeadSlot::default()),
            head_cv: Condvar::new(),
            dir,
            fsync,
            counters,
        });
        let inner = Inner { shared: shared.clone(), threads: Mutex::new(Vec::new()), head_thread: Mutex::new(None) };
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("pgward-audit-head".into())
            .spawn(move || s.head_thread())
            .map_err(|e| AuditError::io("spawning the audit HEAD thread", e))?;
        *lock(&inner.head_thread) = Some(t);
        for id in 0..threads {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("pgward-audit-{id}"))
                .spawn(move || s.writer_thread(id))
                .map_err(|e| AuditError::io("spawning an audit writer thread", e))?;
            lock(&inner.threads).push(t);
        }
        Ok(AuditHandle { inner: Arc::new(inner) })
    }

    /// Append and wait until durable per the fsync policy (group commit). Returns the
    /// record's seq. Any error means the record is not in the log: refuse the statement.
    pub async fn append_durable(&self, rec: Record) -> Result<u64, AuditError> {
        self.submit(rec).await.unwrap_or(Err(AuditError::Closed))
    }

    /// Enqueue now (ordered with every other append) and return the receiver that resolves
    /// once the record is durable; a receive error (sender dropped) means the writer is gone
    /// and must be treated like `Err(AuditError::Closed)`. Lets a caller submit several
    /// records back to back and then wait for all of them.
    pub fn submit(&self, rec: Record) -> oneshot::Receiver<Result<u64, AuditError>> {
        self.submit_then(rec, None).0
    }

    /// [`submit`](Self::submit), and run `hook` on a writer thread once the record is durable,
    /// before the receiver resolves (never when it fails). With `fsync = off` there is no
    /// writer thread to run it and the hook is dropped unrun. Also says whether the record
    /// was queued: false means the receiver already holds its error (e.g. it could not be
    /// encoded), so later records of the caller's may be durable while this one never is.
    pub fn submit_then(
        &self,
        rec: Record,
        hook: Option<Arc<dyn OnDurable>>,
    ) -> (oneshot::Receiver<Result<u64, AuditError>>, bool) {
        let (tx, rx) = oneshot::channel();
        let hook = hook.filter(|_| self.runs_hooks());
        let queued = self.inner.shared.enqueue(rec, Some(Reply { tx, hook }));
        (rx, queued)
    }

    /// Whether durable-hooks run (see [`submit_then`](Self::submit_then)): not with `fsync = off`.
    pub fn runs_hooks(&self) -> bool {
        self.inner.shared.fsync != FsyncPolicy::Off
    }

    /// Append without waiting (still chained; ordered after every record already appended);
    /// failures are logged. Wakes no thread: the record goes out with the next batch or
    /// within `LAZY_FLUSH`.
    pub fn append(&self, rec: Record) {
        self.inner.shared.enqueue(rec, None);
    }

    /// Write a final checkpoint, fsync, stop the threads. Blocks until the threads have
    /// exited (only the first caller waits). Records appended afterwards fail with `Closed`.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Whether the current segment is written with O_DIRECT (see [`DirectWrite`]).
    pub fn direct_io(&self) -> bool {
        lock(&self.inner.shared.log).seg.as_ref().is_some_and(|s| s.direct_fd.is_some())
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.inner.shared.counters;
        WriterStats {
            records: c.records.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn shutdown(&self) {
        let threads = {
            let mut threads = lock(&self.threads);
            let mut log = lock(&self.shared.log);
            if log.shutdown {
                return;
            }
            log.shutdown = true;
            std::mem::take(&mut *threads)
        };
        self.shared.work.notify_all();
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an audit writer thread panicked");
            }
        }
        // The head thread writes what it was handed, then stops.
        lock(&self.shared.head_slot).stop = true;
        self.shared.head_cv.notify_all();
        if let Some(t) = lock(&self.head_thread).take()
            && t.join().is_err()
        {
            tracing::error!("the audit HEAD thread panicked");
        }
        let mut log = lock(&self.shared.log);
        let head = log.final_flush();
        drop(self.shared.run_deferred(log));
        if let Some(h) = head {
            self.shared.write_head(&h);
        }
    }
}

impl Shared {
    /// Queue `rec`; false if it was refused at once (its waiter has the error).
    fn enqueue(&self, rec: Record, reply: Option<Reply>) -> bool {
        let mut log = lock(&self.log);
        if log.shutdown {
            match reply {
                Some(r) => {
                    let _ = r.send(Err(AuditError::Closed));
                }
                None => tracing::warn!("audit record dropped: the writer has stopped"),
            }
            return false;
        }
        if matches!(rec.kind, Kind::Checkpoint | Kind::Start) {
            let e = AuditError::InvalidRecord(format!("{:?} records are written by the writer itself", rec.kind));
            match reply {
                Some(r) => {
                    let _ = r.send(Err(e));
                }
                None => tracing::error!("audit record dropped: {e}"),
            }
            return false;
        }
        let urgent = reply.is_some();
        if !log.queue(rec, reply) {
            return false;
        }
        if !urgent {
            log.lazy_since.get_or_insert_with(Instant::now);
            return true;
        }
        log.urgent = true;
        if self.fsync == FsyncPolicy::Off {
            // Nothing to wait for: write now, in the caller's thread (no handoff).
            let _ = log.write_queued(0, None);
            let head = log.due_head();
            drop(log);
            if let Some(h) = head {
                self.post_head(h);
            }
        } else if log.idle > 0 {
            drop(log);
            self.work.notify_one();
        }
        // else: every writer thread is busy and takes this batch when it comes back.
        true
    }

    /// Run the hooks of records made durable while the lock was held, then tell their
    /// waiters — with the lock released (a hook may do a system call).
    fn run_deferred<'a>(&'a self, mut log: std::sync::MutexGuard<'a, Log>) -> std::sync::MutexGuard<'a, Log> {
        if log.deferred.is_empty() {
            return log;
        }
        let ready = std::mem::take(&mut log.deferred);
        drop(log);
        for (seq, r) in ready {
            let w = Waiter { tx: r.tx, seq };
            let untold = match &r.hook {
                Some(h) => h.durable(w),
                None => Some(w),
            };
            if let Some(w) = untold {
                w.tell();
            }
        }
        lock(&self.log)
    }

    /// Writer thread `id`: waits for records, writes them (under the lock, so the file holds
    /// them in seq order), then fdatasyncs (without the lock, so another thread can write and
    /// sync the next batch meanwhile), then answers every record the sync covered. Also
    /// writes lazy records within `LAZY_FLUSH` and interval checkpoints.
    fn writer_thread(&self, id: usize) {
        let mut log = lock(&self.log);
        loop {
            loop {
                if log.shutdown {
                    return;
                }
                if log.urgent {
                    break;
                }
                // Lazy records are queued without a wakeup, so an idle thread looks again
                // every LAZY_FLUSH.
                let now = Instant::now();
                let mut deadline = now + LAZY_FLUSH;
                if let Some(t) = log.lazy_since {
                    let due = t + LAZY_FLUSH;
                    if due <= now {
                        break;
                    }
                    deadline = deadline.min(due);
                }
                if let Some(due) = log.checkpoint_due_at() {
                    if due <= now {
                        log.encode_checkpoint();
                        break;
                    }
                    deadline = deadline.min(due);
                }
                log.idle += 1;
                log = self.work.wait_timeout(log, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
                log.idle -= 1;
            }
            // The path checks run without the lock (see `ProbeTarget`).
            let probe = match log.probe_target() {
                Some(t) => {
                    drop(log);
                    let p = t.run();
                    log = lock(&self.log);
                    Some(p)
                }
                None => None,
            };
            let written = log.write_queued(id, probe);
            // (A segment rotation inside the write may have made records durable.)
            log = self.run_deferred(log);
            if let Ok(Some(ticket)) = written {
                drop(log);
                let started = Instant::now();
                let res = sync_ticket(&ticket, &self.dir);
                crate::metrics::METRICS.audit_fsync_seconds.observe(started.elapsed().as_secs_f64());
                log = lock(&self.log);
                match res {
                    Ok(()) => log.synced(&ticket),
                    Err(e) => log.sync_failed(&ticket, e),
                }
                log = self.run_deferred(log);
            }
            if let Some(h) = log.due_head() {
                self.post_head(h);
            }
        }
    }

    /// Hand a HEAD to the head thread: rewriting HEAD costs two more flushes (the file and
    /// the directory), which would otherwise hold up the next batch's sync (with one writer
    /// thread, ~20 times a second at 10k statements/s) or, with `fsync = off`, the session.
    fn post_head(&self, head: Head) {
        let mut slot = lock(&self.head_slot);
        if slot.head.as_ref().is_none_or(|h| h.seq < head.seq) {
            slot.head = Some(head);
            drop(slot);
            self.head_cv.notify_one();
        }
    }

    /// Writes the newest posted HEAD, until stopped (after writing what was posted).
    fn head_thread(&self) {
        let mut slot = lock(&self.head_slot);
        loop {
            if let Some(h) = slot.head.take() {
                drop(slot);
                self.write_head(&h);
                slot = lock(&self.head_slot);
                continue;
            }
            if slot.stop {
                return;
            }
            slot = self.head_cv.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn write_head(&self, head: &Head) {
        let mut written = lock(&self.head_written);
        if head.seq <= *written {
            return;
        }
        match write_head(&self.dir, self.fsync, head) {
            Ok(()) => *written = head.seq,
            Err(e) => tracing::error!("audit: writing HEAD failed: {e}"),
        }
    }
}

struct OpenSegment {
    file: File,
    path: PathBuf,
    /// `path` for the system calls of the path checks (see [`ProbeTarget`]).
    path_c: Arc<CString>,
    /// Distinguishes segments (a sync ticket names the one it covers).
    id: u64,
    /// Bytes of complete, chained lines written.
    len: u64,
    /// Bytes a successful sync covered.
    durable_len: u64,
    /// The file's size: `len` plus the preallocated, zero-filled tail (see [`preallocate`]).
    alloc: u64,
    /// The size to preallocate to (the segment size).
    reserve: u64,
    /// Bytes up to here are content or zeros written by [`OpenSegment::zero_ahead`].
    zeroed: u64,
    dev: u64,
    ino: u64,
    /// A failed write left bytes past `len` that could not be truncated yet.
    dirty: bool,
    /// One descriptor per writer thread, opened with the segment: each open file
    /// description sees every writeback error once, so a thread's successful fdatasync
    /// really means its range reached the disk even when another thread's sync reported
    /// (and consumed, for its own descriptor) an error.
    sync_fds: Vec<Arc<File>>,
    /// An O_DIRECT descriptor when batches are written directly (see [`DirectWrite`]).
    direct_fd: Option<Arc<File>>,
    /// The content bytes of the block holding `len` (from its start), valid while
    /// `tail_end == len`; read back from the file otherwise.
    tail: Vec<u8>,
    tail_end: u64,
}

/// The log's state (behind `Shared::log`).
struct Log {
    dir: PathBuf,
    dir_c: Arc<CString>,
    fsync: FsyncPolicy,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    segment_bytes: u64,
    signer: Option<CheckpointSigner>,
    export: Option<super::Exporter>,
    seg: Option<OpenSegment>,
    segments_opened: u64,
    threads: usize,
    /// Batches go to the disk with O_DIRECT (see [`DirectWrite`]).
    direct: bool,
    ts_cache: TsCache,
    /// Chain head of everything encoded (queued or further).
    next_seq: u64,
    prev_hash: String,
    since_ckpt: u64,
    last_ckpt_at: Instant,
    /// Encoded lines not written yet, and their records.
    buf: Vec<u8>,
    queued: Vec<Queued>,
    /// Some queued record has a waiter.
    urgent: bool,
    /// When the oldest queued lazy record (nobody waiting) was queued.
    lazy_since: Option<Instant>,
    /// Written, waiting for a sync; oldest first.
    unsynced: VecDeque<Chunk>,
    /// The last record written to the segment, and the last one made durable.
    written: ChainPos,
    durable: ChainPos,
    /// Bumped when non-durable records are rolled back: older sync tickets then prove
    /// nothing about records with the same (reused) seqs.
    epoch: u64,
    /// Durable records whose waiters have a hook: answered by `Shared::run_deferred` once the
    /// lock is released.
    deferred: Vec<(u64, Reply)>,
    /// Writer threads waiting for work.
    idle: usize,
    shutdown: bool,
    /// What HEAD should say once the checkpoint it names is durable.
    head: Option<Head>,
    /// When the directory and segment path last checked out fine.
    paths_checked_at: Option<Instant>,
    counters: Arc<Counters>,
}

/// The current time as a record's `ts`: RFC 3339, UTC, microseconds
/// (`2026-12-02T05:10:41.123456Z`).
fn now_ts(cache: &mut TsCache) -> String {
    format_ts(chrono::Utc::now(), cache)
}

/// The formatted date and time of the last second a `ts` was made for: records come
/// thousands per second, and only the microseconds change within one (chrono's RFC 3339
/// formatting was ~1% of pgward's instructions per statement).
#[derive(Default)]
pub(super) struct TsCache {
    second: Option<i64>,
    prefix: String,
}

pub(super) fn format_ts(t: chrono::DateTime<chrono::Utc>, cache: &mut TsCache) -> String {
    use std::fmt::Write as _;
    let micros = t.timestamp_subsec_micros();
    if micros >= 1_000_000 {
        // A leap second: leave it to chrono.
        return t.to_rfc3339_opts(SecondsFormat::Micros, true);
    }
    let second = t.timestamp();
    if cache.second != Some(second) {
        cache.prefix = t.format("%Y-%m-%dT%H:%M:%S.").to_string();
        cache.second = Some(second);
    }
    let mut s = String::with_capacity(cache.prefix.len() + 7);
    s.push_str(&cache.prefix);
    let _ = write!(s, "{micros:06}Z");
    s
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The last complete line of `file` (without `\n`) and the length up to and including its
/// newline (bytes after it are an unterminated fragment).
fn read_last_line(file: &File, len: u64) -> io::Result<(Option<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    loop {
        // Enough once we have seen the last newline and the one before it (or the start).
        let newlines = tail.iter().filter(|&&b| b == b'\n').count();
        if newlines >= 2 || pos == 0 {
            break;
        }
        let n = CHUNK.min(pos);
        pos -= n;
        let mut chunk = vec![0u8; n as usize];
        file.read_exact_at(&mut chunk, pos)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
    }
    let Some(last_nl) = tail.iter().rposition(|&b| b == b'\n') else {
        return Ok((None, 0));
    };
    let good_len = pos + last_nl as u64 + 1;
    let start = tail[..last_nl].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok((Some(tail[start..last_nl].to_vec()), good_len))
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == HASH_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Open one descriptor per writer thread for `path` (see `OpenSegment::sync_fds`).
fn open_sync_fds(path: &Path, n: usize) -> Result<Vec<Arc<File>>, AuditError> {
    (0..n.max(1))
        .map(|_| {
            File::open(path).map(Arc::new).map_err(|e| AuditError::io(format!("opening {}", path.display()), e))
        })
        .collect()
}
/// Reserve the rest of a segment (up to `size` bytes) so batches overwrite allocated,
/// zero-filled space instead of appending (like Postgres WAL segments): an append changes
/// the file's size, so every fdatasync would also write the inode — a second I/O per flush.
/// Readers treat the first NUL byte as the end of the content (JSON lines
/// never contain one). Returns the file's size afterwards; where the filesystem cannot
/// preallocate, the segment just grows with each write as before.
fn preallocate(file: &File, len: u64, size: u64) -> u64 {
    if size > len {
        let size = libc::off_t::try_from(size).unwrap_or(libc::off_t::MAX);
        // SAFETY: fallocate on a descriptor this File owns; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size) } != 0 {
            tracing::debug!("audit: cannot preallocate segment: {}", io::Error::last_os_error());
        }
    }
    file.metadata().map_or(len, |m| m.len()).max(len)
}

/// Whether `path` still names the file with this device and inode. Asks `statx` for the
/// inode number only: a stat that includes the timestamps (as `std::fs::metadata` does)
/// marks them as observed, so Linux (6.13+, multigrain timestamps) gives the next write a
/// fine-grained mtime, the inode is dirty after every batch, and every fdatasync writes the
/// inode as well as the data (a second I/O per flush). Without the query, mtime moves once
/// per clock tick.
fn names_file(c: &CStr, dev: u64, ino: u64) -> bool {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `stx` is writable for the duration of the call.
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_INO, &mut stx) };
    r == 0
        && stx.stx_mask & libc::STATX_INO != 0
        && stx.stx_ino == ino
        && libc::makedev(stx.stx_dev_major, stx.stx_dev_minor) == dev
}

/// `path` as a C string for system calls. A path that holds a NUL (none that was opened can)
/// becomes the empty path, which every check fails.
fn path_cstring(path: &Path) -> Arc<CString> {
    Arc::new(CString::new(path.as_os_str().as_bytes()).unwrap_or_default())
}

/// What a writer thread checks before it writes a batch: that the audit directory is
/// writable and that the segment's path still names the open file. Taken under the log lock
/// (a few reference counts), run without it: under the lock, the event loop appending its
/// next record would block on the two system calls during nearly every batch.
struct ProbeTarget {
    dir_c: Arc<CString>,
    seg_id: u64,
    seg_c: Arc<CString>,
    dev: u64,
    ino: u64,
}

/// The outcome of a [`ProbeTarget`]'s checks, for the segment it looked at.
struct PathProbe {
    seg_id: u64,
    dir: io::Result<()>,
    same: bool,
}

/// Whether the directory `c` is writable (`access(2)` with `W_OK`).
fn dir_writable(c: &CStr) -> io::Result<()> {
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl ProbeTarget {
    fn run(&self) -> PathProbe {
        let dir = dir_writable(&self.dir_c);
        let same = dir.is_ok() && names_file(&self.seg_c, self.dev, self.ino);
        PathProbe { seg_id: self.seg_id, dir, same }
    }
}

/// The last complete line of the segment at `path` (its content ends at the first NUL; an
/// unterminated fragment after the last newline is not a line).
pub fn last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = File::open(path)?;
    let (content, _) = content_len(&file, file.metadata()?.len())?;
    Ok(read_last_line(&file, content)?.0)
}

/// The content of a segment: the offset of its first NUL byte (or `size`), and whether any
/// non-NUL byte follows it (an interrupted write that reached the disk out of order; never
/// acknowledged, since a sync covers everything before it).
fn content_len(file: &File, size: u64) -> io::Result<(u64, bool)> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let mut end: Option<u64> = None;
    while pos < size {
        let n = usize::try_from(size - pos).map_or(CHUNK, |r| r.min(CHUNK));
        file.read_exact_at(&mut buf[..n], pos)?;
        let chunk = &buf[..n];
        match end {
            None => {
                if let Some(i) = chunk.iter().position(|&b| b == 0) {
                    end = Some(pos + i as u64);
                    if chunk[i..].iter().any(|&b| b != 0) {
                        return Ok((pos + i as u64, true));
                    }
                }
            }
            Some(e) => {
                if chunk.iter().any(|&b| b != 0) {
                    return Ok((e, true));
                }
            }
        }
        pos += n as u64;
    }
    Ok((end.unwrap_or(size), false))
}

impl OpenSegment {
    /// Cut the segment back to `to` bytes of content (dropping whatever was written after
    /// it) and preallocate its tail again.
    fn cut(&mut self, to: u64) -> io::Result<()> {
        self.tail_end = u64::MAX;
        self.file.set_len(to)?;
        self.alloc = preallocate(&self.file, to, self.reserve);
        self.zeroed = to;
        Ok(())
    }

    /// Before writing `n` bytes at `len`: make sure they land on blocks that already hold
    /// written zeros, by writing the next `ZERO_AHEAD` bytes of zeros now and then.
    /// `fallocate` only reserves blocks ("unwritten"); the first write into each one
    /// converts it, and that metadata change makes the next fdatasync write the inode too. The
    /// zeros reach the disk with the next sync, in one larger write, once per `ZERO_AHEAD`.
    fn zero_ahead(&mut self, n: u64) -> io::Result<()> {
        let need = self.len + n;
        if need <= self.zeroed || self.zeroed >= self.alloc {
            return Ok(());
        }
        let from = self.zeroed.max(self.len);
        let to = (need + ZERO_AHEAD).min(self.alloc).max(need);
        let zeros = vec![0u8; usize::try_from(to - from).map_err(io::Error::other)?];
        self.file.write_all_at(&zeros, from)?;
        self.zeroed = to;
        Ok(())
    }

    /// Open the segment's O_DIRECT descriptor and check that a direct write works here (by
    /// rewriting the block holding the end of the content as it is). On failure the segment
    /// is written through the page cache.
    fn start_direct(&mut self) {
        let res = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .and_then(|f| {
                let at = self.head_block()?;
                let mut buf = AlignedBuf::zeroed(DIO_ALIGN)?;
                buf.as_mut_slice()[..self.tail.len()].copy_from_slice(&self.tail);
                f.write_all_at(buf.as_slice(), at)?;
                Ok(f)
            });
        match res {
            Ok(f) => self.direct_fd = Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!("audit: direct I/O unavailable for {} ({e}); writing through the page cache", self.path.display())
            }
        }
    }

    /// The offset of the block holding `len`; `tail` then holds the content bytes before
    /// `len` in it.
    fn head_block(&mut self) -> io::Result<u64> {
        let at = self.len - self.len % DIO_ALIGN as u64;
        if self.tail_end != self.len {
            let mut head = vec![0u8; (self.len - at) as usize];
            self.file.read_exact_at(&mut head, at)?;
            self.tail = head;
            self.tail_end = self.len;
        }
        Ok(at)
    }

    /// The aligned write that appends `batch` at `len`; remembers the new tail block.
    fn direct_batch(&mut self, batch: &[u8]) -> io::Result<DirectWrite> {
        let at = self.head_block()?;
        let head = self.tail.len();
        let total = head + batch.len();
        let mut buf = AlignedBuf::zeroed(total.div_ceil(DIO_ALIGN) * DIO_ALIGN)?;
        let b = buf.as_mut_slice();
        b[..head].copy_from_slice(&self.tail);
        b[head..total].copy_from_slice(batch);
        let tail_from = total - total % DIO_ALIGN;
        self.tail.clear();
        self.tail.extend_from_slice(&b[tail_from..total]);
        self.tail_end = self.len + batch.len() as u64;
        Ok(DirectWrite { buf, at })
    }

    /// Drop the zero-filled tail: a closed segment holds exactly its lines. Returns whether
    /// a tail was cut (the file's size changed).
    fn trim(&mut self) -> bool {
        if self.alloc <= self.len {
            return false;
        }
        match self.file.set_len(self.len) {
            Ok(()) => {
                self.alloc = self.len;
                true
            }
            Err(e) => {
                tracing::warn!("audit: could not trim {}: {e}", self.path.display());
                false
            }
        }
    }
}

impl Log {
    fn open(opts: WriterOptions, counters: Arc<Counters>, threads: usize) -> Result<Log, AuditError> {
        let dir = opts.dir;
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&dir)
                .map_err(|e| AuditError::io(format!("creating {}", dir.display()), e))?;
        }
        let dir_c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| AuditError::Unwritable { path: dir.clone(), reason: "path contains NUL".into() })?;
        let segments =
            chain::list_segments(&dir).map_err(|e| AuditError::io(format!("listing {}", dir.display()), e))?;

        let mut warnings: Vec<String> = Vec::new();
        let mut last: Option<(u64, String)> = None;
        let mut current: Option<(OpenSegment, u64)> = None;
        for (i, s) in segments.iter().enumerate().rev() {
            let is_last = i + 1 == segments.len();
            let file =
                if is_last { OpenOptions::new().read(true).write(true).open(&s.path) } else { File::open(&s.path) }
                    .map_err(|e| AuditError::io(format!("opening {}", s.path.display()), e))?;
            let meta = file.metadata().map_err(|e| AuditError::io(format!("stat {}", s.path.display()), e))?;
            // The content ends at the first NUL (the rest is the preallocated tail).
            let (content, gap) =
                content_len(&file, meta.len()).map_err(|e| AuditError::io(format!("reading {}", s.path.display()), e))?;
            let (line, good_len) = read_last_line(&file, content)
                .map_err(|e| AuditError::io(format!("reading {}", s.path.display()), e))?;
            if good_len < content || gap {
                let mut what = Vec::new();
                if good_len < content {
                    what.push(format!("an unterminated fragment of {} bytes at the end", content - good_len));
                }
                if gap {
                    what.push("bytes written after a gap".to_owned());
                }
                let what = what.join(" and ");
                if is_last {
                    let msg = format!("{}: dropped {what} (interrupted write)", s.path.display());
                    tracing::warn!("{msg}");
                    warnings.push(msg);
                } else {
                    warnings.push(format!("{}: {what} in a non-final segment", s.path.display()));
                }
            }
            if is_last {
                let mut seg = OpenSegment {
                    file,
                    path: s.path.clone(),
                    path_c: path_cstring(&s.path),
                    id: 1,
                    len: good_len,
                    durable_len: good_len,
                    alloc: meta.len(),
                    reserve: opts.segment_bytes,
                    zeroed: good_len,
                    dev: meta.dev(),
                    ino: meta.ino(),
                    dirty: false,
                    sync_fds: open_sync_fds(&s.path, threads)?,
                    direct_fd: None,
                    tail: Vec::new(),
                    tail_end: u64::MAX,
                };
                if good_len < meta.len() {
                    // Whatever follows the last complete line goes, durably, before the
                    // tail is preallocated again.
                    seg.file
                        .set_len(good_len)
                        .and_then(|()| seg.file.sync_all())
                        .map_err(|e| AuditError::io(format!("truncating {}", s.path.display()), e))?;
                    seg.alloc = good_len;
                }
                current = Some((seg, s.first_seq));
            }
            if let Some(line) = line {
                let rec: Record = serde_json::from_slice(&line).map_err(|e| AuditError::Corrupt {
                    path: s.path.clone(),
                    reason: format!("last line does not parse ({e}); run `pgward audit verify`"),
                })?;
                if !is_hex_hash(&rec.hash) {
                    return Err(AuditError::Corrupt {
                        path: s.path.clone(),
                        reason: "last line has no valid hash; run `pgward audit verify`".into(),
                    });
                }
                match chain::recompute(&line, &rec.prev_hash) {
                    Some((stored, computed)) if stored == computed => {}
                    _ => {
                        let msg = format!(
                            "{}: last record (seq {}) does not match its hash; continuing the chain from the stored hash",
                            s.path.display(),
                            rec.seq
                        );
                        tracing::error!("{msg}");
                        warnings.push(msg);
                    }
                }
                last = Some((rec.seq, rec.hash));
                break;
            }
        }
        let (last_seq, prev_hash) = last.unwrap_or((0, GENESIS_HASH.to_owned()));
        let next_seq = last_seq + 1;

        // Direct I/O needs the writes in order: one writer thread.
        let direct = opts.direct_io && opts.fsync != FsyncPolicy::Off && threads == 1;
        // Keep appending to the last segment unless it is empty and misnamed.
        let seg = match current {
            Some((mut seg, first_seq)) if seg.len > 0 || first_seq == next_seq => {
                seg.alloc = preallocate(&seg.file, seg.len, seg.reserve);
                if direct {
                    seg.start_direct();
                }
                Some(seg)
            }
            _ => None,
        };

        match std::fs::read(dir.join(HEAD_FILE)) {
            Ok(bytes) => match serde_json::from_slice::<Head>(&bytes) {
                Ok(head) if head.seq > last_seq => {
                    let msg = format!(
                        "HEAD checkpoint is seq {} but the log ends at seq {last_seq} (truncated tail?)",
                        head.seq
                    );
                    tracing::error!("{msg}");
                    warnings.push(msg);
                }
                Ok(_) => {}
                Err(e) => warnings.push(format!("HEAD does not parse: {e}")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warnings.push(format!("HEAD unreadable: {e}")),
        }

        let start_pos = ChainPos { seq: last_seq, hash: prev_hash.clone(), since_ckpt: 0 };
        let mut w = Log {
            dir,
            dir_c: Arc::new(dir_c),
            fsync: opts.fsync,
            checkpoint_every: opts.checkpoint_every,
            checkpoint_interval: opts.checkpoint_interval,
            segment_bytes: opts.segment_bytes,
            signer: opts.signer,
            export: opts.export,
            segments_opened: u64::from(seg.is_some()),
            seg,
            threads,
            direct,
            ts_cache: TsCache::default(),
            next_seq,
            prev_hash,
            since_ckpt: 0,
            last_ckpt_at: Instant::now(),
            buf: Vec::with_capacity(64 * 1024),
            queued: Vec::new(),
            urgent: false,
            lazy_since: None,
            unsynced: VecDeque::new(),
            written: start_pos.clone(),
            durable: start_pos,
            epoch: 0,
            idle: 0,
            deferred: Vec::new(),
            shutdown: false,
            head: None,
            paths_checked_at: None,
            counters,
        };

        let mut meta = serde_json::json!({
            "pgward": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        });
        if !warnings.is_empty() {
            meta["warnings"] = serde_json::json!(warnings);
        }
        let (tx, mut rx) = oneshot::channel();
        w.queue(Record { kind: Kind::Start, meta: Some(meta), ..Record::default() }, Some(Reply { tx, hook: None }));
        if let Some(ticket) = w.write_queued(0, None)? {
            match sync_ticket(&ticket, &w.dir) {
                Ok(()) => w.synced(&ticket),
                Err(e) => w.sync_failed(&ticket, e),
            }
        }
        match rx.try_recv() {
            Ok(Ok(_)) => Ok(w),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AuditError::Closed),
        }
    }

    /// Encode `rec` as the next record and queue it (plus a checkpoint when one is due by
    /// count). An encoding error is answered at once.
    /// False if the record was refused (its waiter has the error).
    fn queue(&mut self, rec: Record, reply: Option<Reply>) -> bool {
        let seq = self.next_seq;
        let event = Some(crate::metrics::Event::of(&rec));
        let ts = now_ts(&mut self.ts_cache);
        match self.encode(rec, ts) {
            Ok(hash) => {
                self.since_ckpt += 1;
                self.push(seq, reply, event, hash);
                if self.signer.is_some() && self.checkpoint_every > 0 && self.since_ckpt >= self.checkpoint_every {
                    self.encode_checkpoint();
                }
                true
            }
            Err(e) => {
                match reply {
                    Some(r) => {
                        let _ = r.send(Err(e));
                    }
                    None => tracing::error!("audit record dropped: {e}"),
                }
                false
            }
        }
    }

    fn push(&mut self, seq: u64, reply: Option<Reply>, event: Option<crate::metrics::Event>, hash: [u8; HASH_HEX_LEN]) {
        let end = self.buf.len();
        let since_ckpt = self.since_ckpt;
        self.queued.push(Queued { seq, reply, event, end, hash, since_ckpt });
    }

    /// When an interval checkpoint is due (None: none needed).
    fn checkpoint_due_at(&self) -> Option<Instant> {
        if self.signer.is_none() || self.since_ckpt == 0 {
            return None;
        }
        Some(self.last_ckpt_at + self.checkpoint_interval)
    }

    /// What the writer thread should check before the next batch, if it is to check the
    /// paths itself (durable policies, an open segment, records waiting).
    fn probe_target(&self) -> Option<ProbeTarget> {
        if self.fsync == FsyncPolicy::Off || self.queued.is_empty() {
            return None;
        }
        let seg = self.seg.as_ref()?;
        Some(ProbeTarget {
            dir_c: self.dir_c.clone(),
            seg_id: seg.id,
            seg_c: seg.path_c.clone(),
            dev: seg.dev,
            ino: seg.ino,
        })
    }

    /// Write what is queued (one record with `fsync = always`) to the segment. With
    /// `fsync = off` the records are then durable as far as this policy goes and are answered
    /// at once; otherwise the returned ticket is what the caller must sync. On error every
    /// queued record is refused (they are chained onto each other) and the chain rolls back
    /// to the last written record.
    fn write_queued(&mut self, thread: usize, probe: Option<PathProbe>) -> Result<Option<SyncTicket>, AuditError> {
        if self.queued.is_empty() {
            self.urgent = false;
            self.lazy_since = None;
            return Ok(None);
        }
        if let Err(e) = self.prepare(probe) {
            self.fail_queued(&e);
            return Err(e);
        }
        let take = if self.fsync == FsyncPolicy::Always { 1 } else { self.queued.len() };
        let end = self.queued[take - 1].end;
        let Some(seg) = self.seg.as_mut() else {
            self.fail_queued(&AuditError::Closed);
            return Err(AuditError::Closed);
        };
        let zeroed = if self.fsync == FsyncPolicy::Off { Ok(()) } else { seg.zero_ahead(end as u64) };
        let wrote = zeroed.and_then(|()| {
            if seg.direct_fd.is_some() {
                // Written by the syncer, outside the lock.
                seg.direct_batch(&self.buf[..end]).map(Some)
            } else {
                write_batch(&seg.file, &self.buf[..end], seg.len, &self.dir).map(|()| None)
            }
        });
        let direct = match wrote {
            Ok(d) => d,
            Err(e) => {
                // Never leave a partial batch in front of later appends.
                match seg.cut(seg.len) {
                    Ok(()) => {
                        if self.fsync != FsyncPolicy::Off {
                            // The cut changed the file's blocks: sync them with the data.
                            let _ = seg.file.sync_all();
                        }
                    }
                    Err(te) => {
                        tracing::error!("audit: could not truncate {} after a failed write: {te}", seg.path.display());
                        seg.dirty = true;
                    }
                }
                let e = AuditError::io(format!("appending to {}", seg.path.display()), e);
                self.fail_queued(&e);
                return Err(e);
            }
        };
        seg.len += end as u64;
        seg.alloc = seg.alloc.max(seg.len);
        if let Some(d) = &direct {
            seg.alloc = seg.alloc.max(d.at + d.buf.len as u64);
        }
        let (seg_id, seg_len) = (seg.id, seg.len);
        let fd = match (&direct, &seg.direct_fd) {
            (Some(_), Some(dfd)) => dfd.clone(),
            _ => seg.sync_fds[thread % seg.sync_fds.len()].clone(),
        };

        // One line per queued record (JSON escapes newlines inside values).
        let lines = take as u64;
        let bytes = self.export.is_some().then(|| self.buf[..end].to_vec());
        self.buf.drain(..end);
        let mut items = Vec::with_capacity(take);
        let mut last: Option<([u8; HASH_HEX_LEN], u64, u64)> = None;
        for q in self.queued.drain(..take) {
            last = Some((q.hash, q.seq, q.since_ckpt));
            items.push((q.seq, q.reply, q.event));
        }
        for q in &mut self.queued {
            q.end -= end;
        }
        if let Some((hash, seq, since_ckpt)) = last {
            self.written = ChainPos { seq, hash: String::from_utf8_lossy(&hash).into_owned(), since_ckpt };
        }
        self.unsynced.push_back(Chunk { last_seq: self.written.seq, items, lines, bytes });
        if self.queued.is_empty() {
            self.urgent = false;
            self.lazy_since = None;
        } else {
            self.urgent = self.queued.iter().any(|q| q.reply.is_some());
        }
        if self.fsync == FsyncPolicy::Off {
            let pos = self.written.clone();
            self.advance(pos);
            return Ok(None);
        }
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(Some(SyncTicket { epoch: self.epoch, seg_id, len: seg_len, pos: self.written.clone(), fd, direct }))
    }

    /// Refuse every queued record and roll the chain back to the last written record.
    fn fail_queued(&mut self, e: &AuditError) {
        self.last_ckpt_at = Instant::now(); // do not spin on a due checkpoint
        let queued = std::mem::take(&mut self.queued);
        self.buf.clear();
        self.urgent = false;
        self.lazy_since = None;
        let pos = self.written.clone();
        self.reset_chain(&pos);
        if !queued.is_empty() {
            self.fail_items(queued.into_iter().map(|q| q.reply), e);
        }
    }

    fn reset_chain(&mut self, pos: &ChainPos) {
        self.next_seq = pos.seq + 1;
        self.prev_hash.clone_from(&pos.hash);
        self.since_ckpt = pos.since_ckpt;
        if self.head.as_ref().is_some_and(|h| h.seq > pos.seq) {
            self.head = None;
        }
    }

    /// Everything up to `pos` is durable: answer the records it covers.
    fn advance(&mut self, pos: ChainPos) {
        if pos.seq <= self.durable.seq {
            return;
        }
        self.durable = pos;
        while self.unsynced.front().is_some_and(|c| c.last_seq <= self.durable.seq) {
            let Some(c) = self.unsynced.pop_front() else { break };
            self.counters.records.fetch_add(c.lines, Ordering::Relaxed);
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            if let (Some(ex), Some(b)) = (&self.export, &c.bytes) {
                ex.send(b);
            }
            for (seq, reply, event) in c.items {
                if let Some(e) = event {
                    crate::metrics::METRICS.event(e);
                }
                match reply {
                    Some(r) if r.hook.is_some() => self.deferred.push((seq, r)),
                    Some(r) => r.send(Ok(seq)),
                    None => {}
                }
            }
        }
    }

    fn synced(&mut self, t: &SyncTicket) {
        if t.epoch != self.epoch {
            return; // what it covered was rolled back meanwhile
        }
        if let Some(seg) = &mut self.seg
            && seg.id == t.seg_id
        {
            seg.durable_len = seg.durable_len.max(t.len);
        }
        self.advance(t.pos.clone());
    }

    /// An fdatasync failed: nothing after the last durable record can be trusted (the
    /// kernel may have dropped the pages). Truncate the segment back to the durable length
    /// and refuse every record after it.
    fn sync_failed(&mut self, t: &SyncTicket, e: io::Error) {
        if self.seg.as_ref().is_none_or(|s| s.id != t.seg_id) {
            // A segment already closed: closing it synced it through the writer's own
            // descriptor, which would have reported this error too.
            tracing::error!("audit: fdatasync of a closed segment failed: {e}");
            return;
        }
        self.truncate_to_durable(e);
    }

    /// The current segment's sync failed: truncate it to its durable length and roll back.
    fn truncate_to_durable(&mut self, e: io::Error) -> AuditError {
        let Some(seg) = &mut self.seg else {
            let err = AuditError::io("fdatasync", e);
            self.rollback_to_durable(&err);
            return err;
        };
        let err = AuditError::io(format!("fdatasync of {}", seg.path.display()), e);
        tracing::error!("audit: {err}");
        if let Err(te) = seg.cut(seg.durable_len) {
            tracing::error!("audit: could not truncate {} after a failed sync: {te}", seg.path.display());
            seg.dirty = true;
        } else {
            let _ = seg.file.sync_all();
        }
        seg.len = seg.durable_len;
        self.rollback_to_durable(&err);
        err
    }

    /// Refuse every record that is not durable and continue the chain after the last one
    /// that is.
    fn rollback_to_durable(&mut self, e: &AuditError) {
        self.epoch += 1;
        self.written = self.durable.clone();
        let unsynced = std::mem::take(&mut self.unsynced);
        let replies: Vec<Option<Reply>> = unsynced.into_iter().flat_map(|c| c.items.into_iter().map(|i| i.1)).collect();
        let had_unsynced = !replies.is_empty();
        self.fail_queued(e);
        if had_unsynced {
            self.fail_items(replies.into_iter(), e);
        }
    }

    fn fail_items(&self, replies: impl Iterator<Item = Option<Reply>>, e: &AuditError) {
        self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS.audit_batches_failed.inc();
        let mut unanswered = 0usize;
        for r in replies {
            match r {
                Some(r) => {
                    let _ = r.send(Err(e.clone()));
                }
                None => unanswered += 1,
            }
        }
        if unanswered > 0 {
            tracing::error!("audit: {unanswered} record(s) appended without waiting were lost: {e}");
        } else {
            tracing::warn!("audit: batch refused: {e}");
        }
    }

    /// The HEAD to write, once the checkpoint it names is durable.
    fn due_head(&mut self) -> Option<Head> {
        if self.head.as_ref().is_some_and(|h| h.seq <= self.durable.seq) { self.head.take() } else { None }
    }

    /// At shutdown (the writer threads have stopped): write what is queued plus a final
    /// checkpoint, sync, answer. Returns the HEAD to write.
    fn final_flush(&mut self) -> Option<Head> {
        if self.signer.is_some() && self.since_ckpt > 0 {
            self.encode_checkpoint();
        }
        while !self.queued.is_empty() {
            match self.write_queued(0, None) {
                Ok(Some(ticket)) => match sync_ticket(&ticket, &self.dir) {
                    Ok(()) => self.synced(&ticket),
                    Err(e) => self.sync_failed(&ticket, e),
                },
                Ok(None) => {}
                Err(_) => break,
            }
        }
        if let Some(seg) = &mut self.seg
            && let Err(e) = {
                seg.trim();
                seg.file.sync_all()
            }
        {
            tracing::error!("audit: final fsync of {} failed: {e}", seg.path.display());
        }
        self.due_head()
    }

    /// Serialize `rec` with the next seq into `buf` as a chained line. On error `buf` and the
    /// chain are unchanged.
    fn encode(&mut self, mut rec: Record, ts: String) -> Result<[u8; HASH_HEX_LEN], AuditError> {
        rec.seq = self.next_seq;
        rec.ts = ts;
        rec.prev_hash = std::mem::take(&mut self.prev_hash);
        rec.hash.clear();
        let start = self.buf.len();
        if let Err(e) = rec.write_json(&mut self.buf) {
            self.buf.truncate(start);
            self.prev_hash = rec.prev_hash;
            return Err(AuditError::InvalidRecord(e.to_string()));
        }
        let hash = chain::chain_hash(rec.prev_hash.as_bytes(), &self.buf[start..], b"");
        // A serialized struct always ends with '}'.
        self.buf.pop();
        self.buf.extend_from_slice(HASH_PREFIX);
        self.buf.extend_from_slice(&hash);
        self.buf.extend_from_slice(b"\"}\n");
        // Reuse the old prev_hash allocation for the new chain head.
        let mut head = rec.prev_hash;
        head.clear();
        head.push_str(std::str::from_utf8(&hash).unwrap_or_default());
        self.prev_hash = head;
        self.next_seq += 1;
        Ok(hash)
    }

    /// Queue a checkpoint anchoring the record just encoded; HEAD will name it once durable.
    fn encode_checkpoint(&mut self) {
        let Some(signer) = self.signer.as_ref() else { return };
        let anchor_seq = self.next_seq - 1;
        let anchor_hash = self.prev_hash.clone();
        let sig = signer.sign(anchor_seq, &anchor_hash);
        let kid = signer.kid().to_owned();
        let ts = now_ts(&mut self.ts_cache);
        let rec = Record {
            kind: Kind::Checkpoint,
            anchor_seq: Some(anchor_seq),
            anchor_hash: Some(anchor_hash.clone()),
            sig: Some(sig.clone()),
            kid: Some(kid.clone()),
            ..Record::default()
        };
        let seq = self.next_seq;
        match self.encode(rec, ts.clone()) {
            Ok(hash) => {
                self.since_ckpt = 0;
                self.last_ckpt_at = Instant::now();
                self.push(seq, None, None, hash);
                self.head = Some(Head {
                    seq,
                    hash: String::from_utf8_lossy(&hash).into_owned(),
                    anchor_seq,
                    anchor_hash,
                    sig,
                    kid,
                    ts,
                });
            }
            Err(e) => {
                self.last_ckpt_at = Instant::now();
                tracing::error!("audit: encoding checkpoint failed: {e}");
            }
        }
    }

    /// Make sure there is a usable segment to append to (see the module docs).
    fn prepare(&mut self, probe: Option<PathProbe>) -> Result<(), AuditError> {
        // Taken: any error below means the next write checks again.
        let last_check = self.paths_checked_at.take();
        let check_paths = self.seg.is_none()
            || self.fsync != FsyncPolicy::Off
            || last_check.is_none_or(|t| t.elapsed() >= OFF_PATH_CHECK_INTERVAL);
        // Checks the writer thread ran just before it took the lock stand for the segment they
        // looked at; for any other (rotated or replaced meanwhile) they are run here.
        let probe = probe.filter(|p| check_paths && self.seg.as_ref().is_some_and(|s| s.id == p.seg_id));
        let (dir, probed_same) = match probe {
            Some(p) => (p.dir, Some(p.same)),
            None if check_paths => (dir_writable(&self.dir_c), None),
            None => (Ok(()), None),
        };
        if let Err(e) = dir {
            return Err(AuditError::Unwritable { path: self.dir.clone(), reason: e.to_string() });
        }
        let mut rotate = false;
        if let Some(seg) = &mut self.seg {
            let same = !check_paths
                || probed_same.unwrap_or_else(|| names_file(&seg.path_c, seg.dev, seg.ino));
            if !same {
                let path = seg.path.clone();
                self.seg = None;
                tracing::error!("audit: segment {} was removed or replaced", path.display());
                let e = AuditError::SegmentGone { path };
                // What was written to it but not yet synced is gone with it.
                self.rollback_to_durable(&e);
                return Err(e);
            }
            if seg.dirty {
                seg.cut(seg.len)
                    .map_err(|e| AuditError::io(format!("truncating {}", seg.path.display()), e))?;
                seg.dirty = false;
            }
            rotate = seg.len > 0 && seg.len >= self.segment_bytes;
        }
        if rotate {
            // Everything in the old segment must be durable before the next one gets
            // records: a later sync only covers the file it is called on. A closed segment
            // holds exactly its lines (no preallocated tail).
            let trimmed = self.seg.as_mut().is_some_and(OpenSegment::trim);
            if self.fsync != FsyncPolicy::Off && (trimmed || self.written.seq > self.durable.seq) {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                let res = self.seg.as_ref().map_or(Ok(()), |s| s.file.sync_all());
                match res {
                    Ok(()) => {
                        let pos = self.written.clone();
                        self.advance(pos);
                    }
                    Err(e) => {
                        let err = self.truncate_to_durable(e);
                        return Err(err);
                    }
                }
            }
            self.seg = None;
        }
        if self.seg.is_none() {
            self.seg = Some(self.open_segment()?);
        }
        self.paths_checked_at = if check_paths { Some(Instant::now()) } else { last_check };
        Ok(())
    }

    fn open_segment(&mut self) -> Result<OpenSegment, AuditError> {
        // Named after the first record it will hold (the next one to be written).
        let first_seq = self.written.seq + 1;
        let path = self.dir.join(chain::segment_name(first_seq));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false) // an existing file with data is refused below
            .read(true)
            .write(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| AuditError::io(format!("creating {}", path.display()), e))?;
        let meta = file.metadata().map_err(|e| AuditError::io(format!("stat {}", path.display()), e))?;
        if meta.len() != 0 {
            return Err(AuditError::Corrupt {
                path,
                reason: format!("a new segment for seq {first_seq} already holds data"),
            });
        }
        if self.fsync != FsyncPolicy::Off {
            sync_dir(&self.dir).map_err(|e| AuditError::io(format!("fsync {}", self.dir.display()), e))?;
        }
        let sync_fds = open_sync_fds(&path, self.threads)?;
        self.segments_opened += 1;
        let alloc = preallocate(&file, 0, self.segment_bytes);
        let mut seg = OpenSegment {
            file,
            path_c: path_cstring(&path),
            path,
            id: self.segments_opened,
            len: 0,
            durable_len: 0,
            alloc,
            reserve: self.segment_bytes,
            zeroed: 0,
            dev: meta.dev(),
            ino: meta.ino(),
            dirty: false,
            sync_fds,
            direct_fd: None,
            tail: Vec::new(),
            tail_end: u64::MAX,
        };
        if self.direct {
            seg.start_direct();
        }
        Ok(seg)
    }
}

fn write_head(dir: &Path, fsync: FsyncPolicy, head: &Head) -> io::Result<()> {
    let tmp = dir.join("HEAD.tmp");
    let json = serde_json::to_vec(head).map_err(io::Error::other)?;
    {
        let mut f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o640).open(&tmp)?;
        f.write_all(&json)?;
        f.write_all(b"\n")?;
        if fsync != FsyncPolicy::Off {
            f.sync_all()?;
        }
    }
    match std::fs::rename(&tmp, dir.join(HEAD_FILE)) {
        Ok(()) => {}
        // An append-only directory (`chattr +a`, as `pgward install` sets it) allows no
        // rename or removal: rewrite HEAD in place (one small write at offset 0).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let mut line = json;
            line.push(b'\n');
            // No truncate on open: the new line is written over the old one, then cut to size.
            let f =
                OpenOptions::new().create(true).write(true).truncate(false).mode(0o640).open(dir.join(HEAD_FILE))?;
            f.write_all_at(&line, 0)?;
            f.set_len(line.len() as u64)?;
            if fsync != FsyncPolicy::Off {
                f.sync_all()?;
            }
        }
        Err(e) => return Err(e),
    }
    if fsync != FsyncPolicy::Off {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(not(test))]
fn write_batch(file: &File, buf: &[u8], at: u64, _dir: &Path) -> io::Result<()> {
    file.write_all_at(buf, at)
}

#[cfg(not(test))]
fn sync_batch(file: &File, _dir: &Path) -> io::Result<()> {
    file.sync_data()
}

/// Tests can make the next writer-thread fdatasync in a directory fail.
#[cfg(test)]
fn sync_batch(file: &File, dir: &Path) -> io::Result<()> {
    if fault::take_sync(dir) {
        return Err(io::Error::other("injected fdatasync failure"));
    }
    file.sync_data()
}

/// Tests can make the next write into a directory fail after writing half the batch.
#[cfg(test)]
fn write_batch(file: &File, buf: &[u8], at: u64, dir: &Path) -> io::Result<()> {
    if fault::take(dir) {
        file.write_all_at(&buf[..buf.len() / 2], at)?;
        return Err(io::Error::other("injected write failure"));
    }
    file.write_all_at(buf, at)
}

#[cfg(not(test))]
fn direct_write(file: &File, buf: &[u8], at: u64, _dir: &Path) -> io::Result<()> {
    file.write_all_at(buf, at)
}

/// Tests can make the next write into a directory fail after writing its first block.
#[cfg(test)]
fn direct_write(file: &File, buf: &[u8], at: u64, dir: &Path) -> io::Result<()> {
    if fault::take(dir) {
        if buf.len() > DIO_ALIGN {
            file.write_all_at(&buf[..DIO_ALIGN], at)?;
        }
        return Err(io::Error::other("injected write failure"));
    }
    file.write_all_at(buf, at)
}

#[cfg(test)]
pub(crate) mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAIL_NEXT_WRITE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static FAIL_NEXT_SYNC: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(crate) fn fail_next_sync(dir: &Path) {
        FAIL_NEXT_SYNC.lock().unwrap_or_else(|e| e.into_inner()).push(dir.to_owned());
    }

    pub(crate) fn take_sync(dir: &Path) -> bool {
        take_from(&FAIL_NEXT_SYNC, dir)
    }

    pub(crate) fn fail_next_write(dir: &Path) {
        FAIL_NEXT_WRITE.lock().unwrap_or_else(|e| e.into_inner()).push(dir.to_owned());
    }

    pub(crate) fn take(dir: &Path) -> bool {
        take_from(&FAIL_NEXT_WRITE, dir)
    }

    fn take_from(list: &Mutex<Vec<PathBuf>>, dir: &Path) -> bool {
        let mut v = list.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter().position(|d| d == dir) {
            Some(i) => {
                v.remove(i);
                true
            }
            None => false,
        }
    }
}
