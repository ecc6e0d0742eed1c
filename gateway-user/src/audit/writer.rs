//! The audit writer: one dedicated OS thread owns the current segment file.
//!
//! Sessions send records over an unbounded `std::sync::mpsc` channel, each with an optional
//! oneshot reply. The thread blocks for the first message, drains whatever else is queued,
//! assigns seq/ts/prev_hash, hashes, writes the whole batch with one `write(2)`, does one
//! `fdatasync` (policy `group`), then answers every waiter (group commit).
//!
//! Failure handling (fail closed):
//! * Before every batch the writer checks that the audit directory is writable
//!   (`access(2)` with `W_OK`) and that the segment path still names the open file (same
//!   device and inode). If either fails, the whole batch is refused. A removed or replaced
//!   segment is never written again: once the directory is usable, the next batch starts a
//!   new segment named after the next seq (so `verify` shows the gap, if any, honestly).
//!   Note: root passes `access(W_OK)` whatever the mode bits, so for root only removing or
//!   renaming the directory/segment makes the writer refuse.
//! * If the write or the fdatasync fails, the file is truncated back to its last good
//!   length (retried before the next batch if that fails too), the in-memory seq and hash
//!   chain are rolled back, and every waiter of the batch gets `Err`. Later batches work
//!   again once the disk recovers.
//!
//! Checkpoints are only written when a [`CheckpointSigner`] is configured.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
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

/// Longest time a record appended with `append` (nobody waiting) stays in memory.
const LAZY_FLUSH: Duration = Duration::from_millis(100);

/// Upper bound on records per batch (bounds the buffer; the rest go in the next batch).
const MAX_BATCH: usize = 8192;

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

type Reply = oneshot::Sender<Result<u64, AuditError>>;
type Item = (Record, Option<Reply>);

// Records travel by value: boxing them would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Append(Record, Option<Reply>),
    Shutdown,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    /// Records nobody waits for (`append`): queued without waking the writer thread; they
    /// ride along with the next batch, or go out within `LAZY_FLUSH` when traffic is idle.
    lazy: Arc<Mutex<Vec<Record>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
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
        let mut writer = Writer::open(opts, counters.clone())?;
        let (tx, rx) = mpsc::channel::<Msg>();
        let lazy = Arc::new(Mutex::new(Vec::new()));
        let lazy_w = lazy.clone();
        let thread = std::thread::Builder::new()
            .name("pgward-audit".into())
            .spawn(move || writer.run(rx, lazy_w))
            .map_err(|e| AuditError::io("spawning the audit writer thread", e))?;
        Ok(AuditHandle { inner: Arc::new(Inner { tx, lazy, thread: Mutex::new(Some(thread)), counters }) })
    }

    /// Append and wait until durable per the fsync policy (group commit). Returns the
    /// record's seq. Any error means the record is not in the log: refuse the statement.
    pub async fn append_durable(&self, rec: Record) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.inner.tx.send(Msg::Append(rec, Some(tx))).map_err(|_| AuditError::Closed)?;
        rx.await.unwrap_or(Err(AuditError::Closed))
    }

    /// Enqueue now (ordered with every other append) and return the receiver that resolves
    /// once the record is durable; a receive error (sender dropped) means the writer is gone
    /// and must be treated like `Err(AuditError::Closed)`. Lets a caller submit several
    /// records back to back and then wait for all of them.
    pub fn submit(&self, rec: Record) -> oneshot::Receiver<Result<u64, AuditError>> {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Msg::Append(_, Some(tx)))) = self.inner.tx.send(Msg::Append(rec, Some(tx))) {
            let _ = tx.send(Err(AuditError::Closed));
        }
        rx
    }

    /// Append without waiting (still chained; ordered after every record already made
    /// durable); failures are logged. Does not wake the writer thread: the record goes out
    /// with the next batch or within `LAZY_FLUSH`.
    pub fn append(&self, rec: Record) {
        self.inner.lazy.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
    }

    /// Write a final checkpoint, fsync, stop the thread. Blocks until the thread has exited
    /// (only the first caller waits). Records appended afterwards fail with `Closed`.
    pub fn shutdown(&self) {
        let _ = self.inner.tx.send(Msg::Shutdown);
        let handle = self.inner.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the audit writer thread panicked");
        }
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.inner.counters;
        WriterStats {
            records: c.records.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
        }
    }
}

struct OpenSegment {
    file: File,
    path: PathBuf,
    /// Bytes of complete, chained lines.
    len: u64,
    dev: u64,
    ino: u64,
    /// A failed write left bytes past `len` that could not be truncated yet.
    dirty: bool,
}

struct Writer {
    dir: PathBuf,
    dir_c: CString,
    fsync: FsyncPolicy,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    segment_bytes: u64,
    signer: Option<CheckpointSigner>,
    export: Option<super::Exporter>,
    seg: Option<OpenSegment>,
    next_seq: u64,
    prev_hash: String,
    since_ckpt: u64,
    last_ckpt_at: Instant,
    buf: Vec<u8>,
    waiters: Vec<(Option<Reply>, u64)>,
    counters: Arc<Counters>,
}

fn now_ts() -> String {
    chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
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

impl Writer {
    fn open(opts: WriterOptions, counters: Arc<Counters>) -> Result<Writer, AuditError> {
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
                if is_last { OpenOptions::new().read(true).append(true).open(&s.path) } else { File::open(&s.path) }
                    .map_err(|e| AuditError::io(format!("opening {}", s.path.display()), e))?;
            let meta = file.metadata().map_err(|e| AuditError::io(format!("stat {}", s.path.display()), e))?;
            let (line, good_len) = read_last_line(&file, meta.len())
                .map_err(|e| AuditError::io(format!("reading {}", s.path.display()), e))?;
            if good_len < meta.len() {
                let msg = format!(
                    "{}: dropped an unterminated fragment of {} bytes at the end (interrupted write)",
                    s.path.display(),
                    meta.len() - good_len
                );
                if is_last {
                    file.set_len(good_len)
                        .and_then(|_| file.sync_all())
                        .map_err(|e| AuditError::io(format!("truncating {}", s.path.display()), e))?;
                    tracing::warn!("{msg}");
                    warnings.push(msg);
                } else {
                    warnings
                        .push(format!("{}: unterminated fragment at the end of a non-final segment", s.path.display()));
                }
            }
            if is_last {
                current = Some((
                    OpenSegment {
                        file,
                        path: s.path.clone(),
                        len: good_len,
                        dev: meta.dev(),
                        ino: meta.ino(),
                        dirty: false,
                    },
                    s.first_seq,
                ));
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

        // Keep appending to the last segment unless it is empty and misnamed.
        let seg = match current {
            Some((seg, first_seq)) if seg.len > 0 || first_seq == next_seq => Some(seg),
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

        let mut w = Writer {
            dir,
            dir_c,
            fsync: opts.fsync,
            checkpoint_every: opts.checkpoint_every,
            checkpoint_interval: opts.checkpoint_interval,
            segment_bytes: opts.segment_bytes,
            signer: opts.signer,
            export: opts.export,
            seg,
            next_seq,
            prev_hash,
            since_ckpt: 0,
            last_ckpt_at: Instant::now(),
            buf: Vec::with_capacity(64 * 1024),
            waiters: Vec::new(),
            counters,
        };

        let mut meta = serde_json::json!({
            "pgward": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        });
        if !warnings.is_empty() {
            meta["warnings"] = serde_json::json!(warnings);
        }
        let start = Record { kind: Kind::Start, meta: Some(meta), ..Record::default() };
        let mut items = vec![(start, None)];
        w.commit_chunk(&mut items, false)?;
        Ok(w)
    }

    fn run(&mut self, rx: mpsc::Receiver<Msg>, lazy: Arc<Mutex<Vec<Record>>>) {
        let mut batch: Vec<Item> = Vec::with_capacity(1024);
        let mut lazy_buf: Vec<Record> = Vec::new();
        loop {
            let wait = self.checkpoint_wait().map_or(LAZY_FLUSH, |d| d.min(LAZY_FLUSH));
            let first = rx.recv_timeout(wait);
            // Records nobody waits for were queued before anything now in the channel that
            // depends on them (a session's result before its next statement): take them first.
            std::mem::swap(&mut *lazy.lock().unwrap_or_else(|e| e.into_inner()), &mut lazy_buf);
            for r in lazy_buf.drain(..) {
                self.accept(&mut batch, r, None);
            }
            let mut stop = false;
            match first {
                Ok(Msg::Append(r, w)) => self.accept(&mut batch, r, w),
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            while !stop && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Append(r, w)) => self.accept(&mut batch, r, w),
                    Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => stop = true,
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.commit(&mut batch, stop);
            if stop {
                break;
            }
        }
        if let Some(seg) = &self.seg
            && let Err(e) = seg.file.sync_all()
        {
            tracing::error!("audit: final fsync of {} failed: {e}", seg.path.display());
        }
    }

    fn accept(&self, batch: &mut Vec<Item>, rec: Record, reply: Option<Reply>) {
        if matches!(rec.kind, Kind::Checkpoint | Kind::Start) {
            let e = AuditError::InvalidRecord(format!("{:?} records are written by the writer itself", rec.kind));
            match reply {
                Some(r) => {
                    let _ = r.send(Err(e));
                }
                None => tracing::error!("audit record dropped: {e}"),
            }
            return;
        }
        batch.push((rec, reply));
    }

    /// How long to wait for records before an interval checkpoint is due (None: forever).
    fn checkpoint_wait(&self) -> Option<Duration> {
        if self.signer.is_none() || self.since_ckpt == 0 {
            return None;
        }
        Some((self.last_ckpt_at + self.checkpoint_interval).saturating_duration_since(Instant::now()))
    }

    fn commit(&mut self, batch: &mut Vec<Item>, final_ckpt: bool) {
        if self.fsync == FsyncPolicy::Always && batch.len() > 1 {
            let n = batch.len();
            let mut one = Vec::with_capacity(1);
            for (i, item) in batch.drain(..).enumerate() {
                one.push(item);
                let _ = self.commit_chunk(&mut one, final_ckpt && i + 1 == n);
            }
        } else {
            let _ = self.commit_chunk(batch, final_ckpt);
        }
    }

    /// Write `items` (drained) plus any due checkpoint with one write and at most one sync,
    /// then answer the waiters.
    fn commit_chunk(&mut self, items: &mut Vec<Item>, final_ckpt: bool) -> Result<(), AuditError> {
        let signing = self.signer.is_some();
        let interval_due = |w: &Writer| Instant::now() >= w.last_ckpt_at + w.checkpoint_interval;
        if items.is_empty() && !(signing && self.since_ckpt > 0 && (final_ckpt || interval_due(self))) {
            return Ok(());
        }
        if let Err(e) = self.prepare() {
            self.last_ckpt_at = Instant::now(); // do not spin on a due checkpoint
            self.fail_items(items.drain(..).map(|(_, r)| r), &e);
            return Err(e);
        }

        let saved = (self.next_seq, self.prev_hash.clone(), self.since_ckpt, self.last_ckpt_at);
        self.buf.clear();
        self.waiters.clear();
        let mut head: Option<Head> = None;
        let mut events = Vec::with_capacity(items.len());
        for (rec, reply) in items.drain(..) {
            let seq = self.next_seq;
            let event = crate::metrics::Event::of(&rec);
            match self.encode(rec, now_ts()) {
                Ok(_) => {
                    events.push(event);
                    self.waiters.push((reply, seq));
                    self.since_ckpt += 1;
                    if signing && self.checkpoint_every > 0 && self.since_ckpt >= self.checkpoint_every {
                        head = self.encode_checkpoint().or(head);
                    }
                }
                Err(e) => match reply {
                    Some(r) => {
                        let _ = r.send(Err(e));
                    }
                    None => tracing::error!("audit record dropped: {e}"),
                },
            }
        }
        if signing && self.since_ckpt > 0 && (final_ckpt || interval_due(self)) {
            head = self.encode_checkpoint().or(head);
        }
        if self.buf.is_empty() {
            return Ok(());
        }

        let lines = self.buf.iter().filter(|&&b| b == b'\n').count() as u64;
        match self.write_and_sync() {
            Ok(()) => {
                self.counters.records.fetch_add(lines, Ordering::Relaxed);
                for e in events {
                    crate::metrics::METRICS.event(e);
                }
                if let Some(ex) = &self.export {
                    ex.send(&self.buf);
                }
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                for (reply, seq) in self.waiters.drain(..) {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(seq));
                    }
                }
                if let Some(h) = head
                    && let Err(e) = self.write_head(&h)
                {
                    tracing::error!("audit: writing HEAD failed: {e}");
                }
                Ok(())
            }
            Err(e) => {
                (self.next_seq, self.prev_hash, self.since_ckpt, self.last_ckpt_at) = saved;
                self.last_ckpt_at = Instant::now();
                let waiters = std::mem::take(&mut self.waiters);
                self.fail_items(waiters.into_iter().map(|(r, _)| r), &e);
                Err(e)
            }
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

    /// Serialize `rec` with the next seq into `buf` as a chained line. On error `buf` and the
    /// chain are unchanged.
    fn encode(&mut self, mut rec: Record, ts: String) -> Result<[u8; HASH_HEX_LEN], AuditError> {
        rec.seq = self.next_seq;
        rec.ts = ts;
        rec.prev_hash = std::mem::take(&mut self.prev_hash);
        rec.hash.clear();
        let start = self.buf.len();
        if let Err(e) = serde_json::to_writer(&mut self.buf, &rec) {
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

    /// Append a checkpoint anchoring the record just encoded. Returns what HEAD should say.
    fn encode_checkpoint(&mut self) -> Option<Head> {
        let signer = self.signer.as_ref()?;
        let anchor_seq = self.next_seq - 1;
        let anchor_hash = self.prev_hash.clone();
        let sig = signer.sign(anchor_seq, &anchor_hash);
        let kid = signer.kid().to_owned();
        let ts = now_ts();
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
                Some(Head {
                    seq,
                    hash: String::from_utf8_lossy(&hash).into_owned(),
                    anchor_seq,
                    anchor_hash,
                    sig,
                    kid,
                    ts,
                })
            }
            Err(e) => {
                tracing::error!("audit: encoding checkpoint failed: {e}");
                None
            }
        }
    }

    /// Make sure there is a usable segment to append to (see the module docs).
    fn prepare(&mut self) -> Result<(), AuditError> {
        // SAFETY: dir_c is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::access(self.dir_c.as_ptr(), libc::W_OK) } != 0 {
            return Err(AuditError::Unwritable {
                path: self.dir.clone(),
                reason: io::Error::last_os_error().to_string(),
            });
        }
        if let Some(seg) = &mut self.seg {
            let same = std::fs::metadata(&seg.path).map(|m| m.dev() == seg.dev && m.ino() == seg.ino).unwrap_or(false);
            if !same {
                let path = seg.path.clone();
                self.seg = None;
                tracing::error!("audit: segment {} was removed or replaced", path.display());
                return Err(AuditError::SegmentGone { path });
            }
            if seg.dirty {
                seg.file
                    .set_len(seg.len)
                    .map_err(|e| AuditError::io(format!("truncating {}", seg.path.display()), e))?;
                seg.dirty = false;
            }
            if seg.len > 0 && seg.len >= self.segment_bytes {
                self.seg = None;
            }
        }
        if self.seg.is_none() {
            self.seg = Some(self.open_segment()?);
        }
        Ok(())
    }

    fn open_segment(&self) -> Result<OpenSegment, AuditError> {
        let path = self.dir.join(chain::segment_name(self.next_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| AuditError::io(format!("creating {}", path.display()), e))?;
        let meta = file.metadata().map_err(|e| AuditError::io(format!("stat {}", path.display()), e))?;
        if meta.len() != 0 {
            return Err(AuditError::Corrupt {
                path,
                reason: format!("a new segment for seq {} already holds data", self.next_seq),
            });
        }
        if self.fsync != FsyncPolicy::Off {
            sync_dir(&self.dir).map_err(|e| AuditError::io(format!("fsync {}", self.dir.display()), e))?;
        }
        Ok(OpenSegment { file, path, len: 0, dev: meta.dev(), ino: meta.ino(), dirty: false })
    }

    fn write_and_sync(&mut self) -> Result<(), AuditError> {
        let fsync = self.fsync;
        let Some(seg) = self.seg.as_mut() else {
            return Err(AuditError::Closed);
        };
        let started = Instant::now();
        let res = write_batch(&mut seg.file, &self.buf, &self.dir).and_then(|()| {
            if fsync != FsyncPolicy::Off {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                let r = seg.file.sync_data();
                crate::metrics::METRICS.audit_fsync_seconds.observe(started.elapsed().as_secs_f64());
                r
            } else {
                Ok(())
            }
        });
        match res {
            Ok(()) => {
                seg.len += self.buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Never leave a partial batch in front of later appends.
                match seg.file.set_len(seg.len) {
                    Ok(()) => {
                        if fsync != FsyncPolicy::Off {
                            let _ = seg.file.sync_data();
                        }
                    }
                    Err(te) => {
                        tracing::error!("audit: could not truncate {} after a failed write: {te}", seg.path.display());
                        seg.dirty = true;
                    }
                }
                Err(AuditError::io(format!("appending to {}", seg.path.display()), e))
            }
        }
    }

    fn write_head(&self, head: &Head) -> io::Result<()> {
        let tmp = self.dir.join("HEAD.tmp");
        let json = serde_json::to_vec(head).map_err(io::Error::other)?;
        {
            let mut f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o640).open(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            if self.fsync != FsyncPolicy::Off {
                f.sync_all()?;
            }
        }
        match std::fs::rename(&tmp, self.dir.join(HEAD_FILE)) {
            Ok(()) => {}
            // An append-only directory (`chattr +a`, as `pgward install` sets it) allows no
            // rename or removal: rewrite HEAD in place (one small write at offset 0).
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                let mut line = json;
                line.push(b'\n');
                let f = OpenOptions::new().create(true).write(true).mode(0o640).open(self.dir.join(HEAD_FILE))?;
                f.write_all_at(&line, 0)?;
                f.set_len(line.len() as u64)?;
                if self.fsync != FsyncPolicy::Off {
                    f.sync_all()?;
                }
            }
            Err(e) => return Err(e),
        }
        if self.fsync != FsyncPolicy::Off {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

#[cfg(not(test))]
fn write_batch(file: &mut File, buf: &[u8], _dir: &Path) -> io::Result<()> {
    file.write_all(buf)
}

/// Tests can make the next write into a directory fail after writing half the batch.
#[cfg(test)]
fn write_batch(file: &mut File, buf: &[u8], dir: &Path) -> io::Result<()> {
    if fault::take(dir) {
        file.write_all(&buf[..buf.len() / 2])?;
        return Err(io::Error::other("injected write failure"));
    }
    file.write_all(buf)
}

#[cfg(test)]
pub(crate) mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAIL_NEXT_WRITE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(crate) fn fail_next_write(dir: &Path) {
        FAIL_NEXT_WRITE.lock().unwrap_or_else(|e| e.into_inner()).push(dir.to_owned());
    }

    pub(crate) fn take(dir: &Path) -> bool {
        let mut v = FAIL_NEXT_WRITE.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter().position(|d| d == dir) {
            Some(i) => {
                v.remove(i);
                true
            }
            None => false,
        }
    }
}
