//! Opening an existing log: find the last complete record, drop an interrupted write's
//! fragment, continue the chain, and write the `start` record.

use std::ffi::CString;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::handle::Reply;
use super::log::{Log, sync_ticket};
use super::probe::path_cstring;
use super::segment::{OpenSegment, open_sync_fds, preallocate};
use super::{AuditError, Counters, WriterOptions};
use crate::audit::chain::{self, GENESIS_HASH, HASH_HEX_LEN, HEAD_FILE, HEAD_LOST, Head, SegmentFile, UNANCHORED_TAIL};
use crate::audit::record::{Kind, Record};
use crate::config::FsyncPolicy;

/// The last complete line of `file` (without `\n`) and the length up to and including its
/// newline (bytes after it are an unterminated fragment).
pub(super) fn read_last_line(file: &File, len: u64) -> io::Result<(Option<Vec<u8>>, u64)> {
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

pub(super) fn is_hex_hash(s: &str) -> bool {
    s.len() == HASH_HEX_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
pub(super) fn content_len(file: &File, size: u64) -> io::Result<(u64, bool)> {
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

/// Where the existing segments leave the chain.
struct ChainEnd {
    /// The last record's seq and hash (None: the log holds no record yet).
    last: Option<(u64, String)>,
    /// The last record itself.
    last_record: Option<Record>,
    /// The records the last run left after its last checkpoint: first and last seq.
    unanchored: Option<(u64, u64)>,
    /// The last checkpoint in the last segment holding records: its seq and hash.
    last_checkpoint: Option<(u64, String)>,
    /// The last segment, open for writing, and the seq its name says it starts at.
    current: Option<(OpenSegment, u64)>,
    /// What was found wrong on the way, for the `start` record.
    warnings: Vec<String>,
}

/// The end of one segment's content.
struct SegmentEnd {
    file: File,
    meta: Metadata,
    /// The last complete line (without its newline).
    line: Option<Vec<u8>>,
    /// The length up to and including that line's newline.
    good_len: u64,
}

impl Log {
    /// Open the log in `opts.dir` (creating the directory) and continue its chain from the
    /// last record of the last segment; the `start` record is durable before this returns.
    pub(super) fn open(opts: WriterOptions, counters: Arc<Counters>, threads: usize) -> Result<Log, AuditError> {
        create_dir(&opts.dir)?;
        let dir_c = CString::new(opts.dir.as_os_str().as_bytes())
            .map_err(|_| AuditError::Unwritable { path: opts.dir.clone(), reason: "path contains NUL".into() })?;
        let segments =
            chain::list_segments(&opts.dir).map_err(|e| AuditError::io(format!("listing {}", opts.dir.display()), e))?;
        let ChainEnd { last, last_record, unanchored, last_checkpoint, current, mut warnings } =
            find_chain_end(&segments, opts.segment_bytes, threads)?;
        let (last_seq, prev_hash) = last.unwrap_or((0, GENESIS_HASH.to_owned()));

        // Direct I/O needs the writes in order: one writer thread.
        let direct = opts.direct_io && opts.fsync != FsyncPolicy::Off && threads == 1;
        let seg = continue_segment(current, last_seq + 1, direct);
        let head = read_head(&opts.dir, &mut warnings);
        let head_seq = head.as_ref().map(|h| h.seq);
        let head_lost = head
            .as_ref()
            .filter(|h| signed_by(h, opts.signer.as_ref()))
            .and_then(|h| head_not_in_log(h, last_seq, last_checkpoint.as_ref(), &mut warnings));

        let mut log = Log::new(opts, Arc::new(dir_c), counters, threads, direct, seg, last_seq, prev_hash);
        log.write_start(warnings, unanchored, head_lost)?;
        match last_record {
            // The last run stopped between making its last checkpoint durable and rewriting
            // HEAD: name it now (the handle hands it to the HEAD thread).
            Some(rec) if rec.kind == Kind::Checkpoint => {
                if head_seq.is_none_or(|s| s < rec.seq)
                    && let Some(h) = head_of(&rec)
                    && log.head.is_none()
                {
                    log.head = Some(h);
                }
            }
            // The last run stopped (crashed) with records after its last checkpoint: anchor
            // them (and the start record) now, so no stretch without a checkpoint spans two
            // runs' worth of records.
            Some(_) if log.signer.is_some() => {
                log.encode_checkpoint();
                match log.write_queued(0, None) {
                    Ok(Some(ticket)) => match sync_ticket(&ticket, &log.dir) {
                        Ok(()) => log.synced(&ticket),
                        Err(e) => log.sync_failed(&ticket, e),
                    },
                    Ok(None) => {}
                    Err(e) => tracing::error!("audit: checkpoint after the previous run's tail failed: {e}"),
                }
            }
            _ => {}
        }
        Ok(log)
    }

    /// Write the `start` record (with what recovery found wrong, the records the last run
    /// left unanchored, which the checkpoint after this record anchors, and the checkpoint
    /// the last run's HEAD named when the log no longer holds it) and make it durable.
    fn write_start(
        &mut self,
        warnings: Vec<String>,
        unanchored: Option<(u64, u64)>,
        head_lost: Option<serde_json::Value>,
    ) -> Result<(), AuditError> {
        let mut meta = serde_json::json!({
            "pgward": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        });
        if !warnings.is_empty() {
            meta["warnings"] = serde_json::json!(warnings);
        }
        if let Some((first, last)) = unanchored {
            meta[UNANCHORED_TAIL] = serde_json::json!({ "first": first, "last": last });
        }
        if let Some(lost) = head_lost {
            meta[HEAD_LOST] = lost;
        }
        let (tx, mut rx) = oneshot::channel();
        self.queue(Record { kind: Kind::Start, meta: Some(meta), ..Record::default() }, Some(Reply { tx, hook: None }));
        if let Some(ticket) = self.write_queued(0, None)? {
            match sync_ticket(&ticket, &self.dir) {
                Ok(()) => self.synced(&ticket),
                Err(e) => self.sync_failed(&ticket, e),
            }
        }
        match rx.try_recv() {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AuditError::Closed),
        }
    }
}

/// Create the audit directory if it does not exist.
fn create_dir(dir: &Path) -> Result<(), AuditError> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| AuditError::io(format!("creating {}", dir.display()), e))?;
    }
    Ok(())
}

/// Walk the segments from the last one back to the first that holds a complete line: that
/// line is the last record. The last segment is opened for writing, cut back to its last
/// complete line.
fn find_chain_end(segments: &[SegmentFile], segment_bytes: u64, threads: usize) -> Result<ChainEnd, AuditError> {
    let mut end = ChainEnd {
        last: None,
        last_record: None,
        unanchored: None,
        last_checkpoint: None,
        current: None,
        warnings: Vec::new(),
    };
    for (i, s) in segments.iter().enumerate().rev() {
        let is_last = i + 1 == segments.len();
        let SegmentEnd { file, meta, line, good_len } = segment_end(s, is_last, &mut end.warnings)?;
        let rec = match &line {
            Some(line) => Some(check_last_record(&s.path, line, &mut end.warnings)?),
            None => None,
        };
        match &rec {
            Some(r) if r.kind == Kind::Checkpoint => end.last_checkpoint = Some((r.seq, r.hash.clone())),
            Some(_) => {
                (end.unanchored, end.last_checkpoint) = unanchored_tail(&file, good_len)
                    .map_err(|e| AuditError::io(format!("reading {}", s.path.display()), e))?;
            }
            None => {}
        }
        if is_last {
            let seg = reopen_last_segment(s, file, &meta, good_len, segment_bytes, threads)?;
            end.current = Some((seg, s.first_seq));
        }
        if let Some(rec) = rec {
            end.last = Some((rec.seq, rec.hash.clone()));
            end.last_record = Some(rec);
            break;
        }
    }
    Ok(end)
}

/// How much of a segment's end is read at first when looking for its last checkpoint
/// (doubled until one is found or the whole segment is read).
const TAIL_WINDOW: u64 = 256 * 1024;

/// The first and last seq of the records after the last checkpoint among the first
/// `content` bytes of `file` (complete lines), or of all its records when it holds no
/// checkpoint (None when it holds no record after one); and that checkpoint's seq and hash.
type TailEnd = (Option<(u64, u64)>, Option<(u64, String)>);

fn unanchored_tail(file: &File, content: u64) -> io::Result<TailEnd> {
    let mut window = TAIL_WINDOW.min(content);
    loop {
        let start = content - window;
        let mut buf = vec![0u8; usize::try_from(window).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut buf, start)?;
        // A line cut by the window's start is not whole: skip it (unless the window starts
        // the file).
        let mut lines = buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect::<Vec<_>>();
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        let (mut first, mut last, mut anchor) = (None, None, None);
        for line in lines.iter().rev() {
            let Ok(rec) = serde_json::from_slice::<Record>(line) else { break };
            if rec.kind == Kind::Checkpoint {
                anchor = Some((rec.seq, rec.hash));
                break;
            }
            last.get_or_insert(rec.seq);
            first = Some(rec.seq);
        }
        if anchor.is_some() || window == content {
            return Ok((first.zip(last), anchor));
        }
        window = window.saturating_mul(2).min(content);
    }
}

/// Open segment `s` (for writing if it is the last one) and find the end of its content;
/// bytes after the last complete line are reported in `warnings`.
fn segment_end(s: &SegmentFile, is_last: bool, warnings: &mut Vec<String>) -> Result<SegmentEnd, AuditError> {
    let file = if is_last { OpenOptions::new().read(true).write(true).open(&s.path) } else { File::open(&s.path) }
        .map_err(|e| AuditError::io(format!("opening {}", s.path.display()), e))?;
    let meta = file.metadata().map_err(|e| AuditError::io(format!("stat {}", s.path.display()), e))?;
    // The content ends at the first NUL (the rest is the preallocated tail).
    let (content, gap) =
        content_len(&file, meta.len()).map_err(|e| AuditError::io(format!("reading {}", s.path.display()), e))?;
    let (line, good_len) =
        read_last_line(&file, content).map_err(|e| AuditError::io(format!("reading {}", s.path.display()), e))?;
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
    Ok(SegmentEnd { file, meta, line, good_len })
}

/// The last segment as the open segment, durably cut back to `good_len` (its last complete
/// line) when anything follows it.
fn reopen_last_segment(
    s: &SegmentFile,
    file: File,
    meta: &Metadata,
    good_len: u64,
    segment_bytes: u64,
    threads: usize,
) -> Result<OpenSegment, AuditError> {
    let mut seg = OpenSegment {
        file,
        path: s.path.clone(),
        path_c: path_cstring(&s.path),
        id: 1,
        len: good_len,
        durable_len: good_len,
        alloc: meta.len(),
        reserve: segment_bytes,
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
    Ok(seg)
}

/// The seq and hash of the last record (`line`, in the segment at `path`). A record that does
/// not parse or has no valid hash stops the start; one whose hash does not match its content
/// is reported in `warnings` and the chain continues from the stored hash.
fn check_last_record(path: &Path, line: &[u8], warnings: &mut Vec<String>) -> Result<Record, AuditError> {
    let rec: Record = serde_json::from_slice(line).map_err(|e| AuditError::Corrupt {
        path: path.to_owned(),
        reason: format!("last line does not parse ({e}); run `pgward audit verify`"),
    })?;
    if !is_hex_hash(&rec.hash) {
        return Err(AuditError::Corrupt {
            path: path.to_owned(),
            reason: "last line has no valid hash; run `pgward audit verify`".into(),
        });
    }
    match chain::recompute(line, &rec.prev_hash) {
        Some((stored, computed)) if stored == computed => {}
        _ => {
            let msg = format!(
                "{}: last record (seq {}) does not match its hash; continuing the chain from the stored hash",
                path.display(),
                rec.seq
            );
            tracing::error!("{msg}");
            warnings.push(msg);
        }
    }
    Ok(rec)
}

/// The segment to keep appending to: the last one, unless it is empty and not named after
/// `next_seq` (then the first batch opens a new one).
fn continue_segment(current: Option<(OpenSegment, u64)>, next_seq: u64, direct: bool) -> Option<OpenSegment> {
    match current {
        Some((mut seg, first_seq)) if seg.len > 0 || first_seq == next_seq => {
            seg.alloc = preallocate(&seg.file, seg.len, seg.reserve);
            if direct {
                seg.start_direct();
            }
            Some(seg)
        }
        _ => None,
    }
}

/// The HEAD naming checkpoint record `rec` (None if it lacks a field).
fn head_of(rec: &Record) -> Option<Head> {
    Some(Head {
        seq: rec.seq,
        hash: rec.hash.clone(),
        anchor_seq: rec.anchor_seq?,
        anchor_hash: rec.anchor_hash.clone()?,
        sig: rec.sig.clone()?,
        kid: rec.kid.clone()?,
        ts: rec.ts.clone(),
    })
}

/// What HEAD says, if it can be read (what it cannot be is reported in `warnings`).
fn read_head(dir: &Path, warnings: &mut Vec<String>) -> Option<Head> {
    match std::fs::read(dir.join(HEAD_FILE)) {
        Ok(bytes) => match serde_json::from_slice::<Head>(&bytes) {
            Ok(head) => Some(head),
            Err(e) => {
                warnings.push(format!("HEAD does not parse: {e}"));
                None
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            warnings.push(format!("HEAD unreadable: {e}"));
            None
        }
    }
}

/// Whether `head` is one this gateway wrote: it names the checkpoint right after the record
/// it anchors, signed with `signer`'s key. HEAD is a file whoever can write the log directory
/// can replace; only a genuine one says which checkpoint the last run made durable.
fn signed_by(head: &Head, signer: Option<&super::CheckpointSigner>) -> bool {
    let Some(signer) = signer else { return false };
    let keys = crate::audit::verify::PublicKeys::from([(signer.kid().to_owned(), signer.verifying_key())]);
    head.anchor_seq.checked_add(1) == Some(head.seq)
        && crate::audit::verify::check_signature(&keys, Some(&head.kid), Some(&head.sig), head.anchor_seq, &head.anchor_hash).is_ok()
}

/// The last run's HEAD (a genuine one, [`signed_by`]) names a checkpoint it made durable. When the log no longer holds it
/// — it ends before `head.seq` (a cut-off tail), or its last checkpoint (`last_checkpoint`)
/// is an older one or another record at that seq (a tail replaced) — records were lost or
/// removed while pgward was down. The start record says so (`meta.head_lost`, which
/// `verify` reports): the next checkpoint rewrites HEAD, which would erase the evidence.
fn head_not_in_log(
    head: &Head,
    last_seq: u64,
    last_checkpoint: Option<&(u64, String)>,
    warnings: &mut Vec<String>,
) -> Option<serde_json::Value> {
    let held = match last_checkpoint {
        _ if head.seq > last_seq => false,
        Some((seq, hash)) if *seq == head.seq => *hash == head.hash,
        Some((seq, _)) => *seq > head.seq,
        // No checkpoint in the last segment: HEAD names one before it.
        None => true,
    };
    if held {
        return None;
    }
    let msg = format!(
        "HEAD names checkpoint seq {} but the log does not hold it (it ends at seq {last_seq}): records were cut or replaced",
        head.seq
    );
    tracing::error!("{msg}");
    warnings.push(msg);
    Some(serde_json::json!({ "seq": head.seq, "hash": head.hash, "log_end": last_seq }))
}
