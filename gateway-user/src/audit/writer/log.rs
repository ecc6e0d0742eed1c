//! The log's state: the chain of encoded records, the batch that goes to the segment next, and
//! the batches written but not yet durable. `queue` encodes a record in the caller's thread;
//! `write_queued` writes the batch; `synced`/`sync_failed` settle a sync's outcome and answer
//! the records it covered.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::direct::DirectWrite;
use super::disk::{direct_write, sync_batch, write_batch};
use super::handle::Reply;
use super::probe::PathProbe;
use super::segment::OpenSegment;
use super::ts::{TsCache, format_ts};
use super::{AuditError, CheckpointSigner, Counters, WriterOptions};
use crate::audit::chain::{self, HASH_HEX_LEN, HASH_PREFIX, Head};
use crate::audit::record::{Kind, Record};
use crate::config::FsyncPolicy;

/// A record's time (its `ts`).
pub(super) type Stamp = chrono::DateTime<chrono::Utc>;

/// A position in the chain: the last record at some point, the count since the last
/// checkpoint before it and when that stretch began (what a rollback restores).
#[derive(Clone)]
pub(super) struct ChainPos {
    pub(super) seq: u64,
    pub(super) hash: String,
    pub(super) since_ckpt: u64,
    pub(super) stretch_from: Option<Stamp>,
}

/// A record encoded into `Log::buf`, not written yet.
pub(super) struct Queued {
    pub(super) seq: u64,
    pub(super) reply: Option<Reply>,
    pub(super) event: Option<crate::metrics::Event>,
    /// Offset in `buf` just past this record's line.
    pub(super) end: usize,
    /// The chain position after this record.
    pub(super) hash: [u8; HASH_HEX_LEN],
    pub(super) since_ckpt: u64,
    pub(super) stretch_from: Option<Stamp>,
}

/// Records written to the segment (page cache) and waiting for a sync to cover them.
pub(super) struct Chunk {
    pub(super) last_seq: u64,
    pub(super) items: Vec<(u64, Option<Reply>, Option<crate::metrics::Event>)>,
    pub(super) lines: u64,
}

/// What a syncer needs to make a write durable without holding the lock.
pub(super) struct SyncTicket {
    pub(super) epoch: u64,
    pub(super) seg_id: u64,
    pub(super) len: u64,
    pub(super) pos: ChainPos,
    pub(super) fd: Arc<File>,
    /// With direct I/O the batch is written by the syncer (through `fd`), not under the lock.
    pub(super) direct: Option<DirectWrite>,
}

/// Make the ticket's batch durable: write it first if it goes direct, then fdatasync.
pub(super) fn sync_ticket(t: &SyncTicket, dir: &Path) -> io::Result<()> {
    if let Some(d) = &t.direct {
        direct_write(&t.fd, d.buf.as_slice(), d.at, dir)?;
    }
    sync_batch(&t.fd, dir)
}

/// The log's state (behind `Shared::log`).
pub(super) struct Log {
    pub(super) dir: PathBuf,
    pub(super) dir_c: Arc<CString>,
    pub(super) fsync: FsyncPolicy,
    pub(super) checkpoint_every: u64,
    pub(super) checkpoint_interval: Duration,
    pub(super) segment_bytes: u64,
    pub(super) signer: Option<CheckpointSigner>,
    pub(super) export: Option<crate::audit::Exporter>,
    pub(super) seg: Option<OpenSegment>,
    pub(super) segments_opened: u64,
    pub(super) threads: usize,
    /// Batches go to the disk with O_DIRECT (see [`DirectWrite`]).
    pub(super) direct: bool,
    pub(super) ts_cache: TsCache,
    /// Chain head of everything encoded (queued or further).
    pub(super) next_seq: u64,
    pub(super) prev_hash: String,
    pub(super) since_ckpt: u64,
    /// The `ts` of the first record after the last checkpoint (None: no record since).
    pub(super) stretch_from: Option<Stamp>,
    pub(super) last_ckpt_at: Instant,
    /// Encoded lines not written yet, and their records.
    pub(super) buf: Vec<u8>,
    pub(super) queued: Vec<Queued>,
    /// Some queued record has a waiter.
    pub(super) urgent: bool,
    /// When the oldest queued lazy record (nobody waiting) was queued.
    pub(super) lazy_since: Option<Instant>,
    /// Written, waiting for a sync; oldest first.
    pub(super) unsynced: VecDeque<Chunk>,
    /// The last record written to the segment, and the last one made durable.
    pub(super) written: ChainPos,
    pub(super) durable: ChainPos,
    /// Bumped when non-durable records are rolled back: older sync tickets then prove
    /// nothing about records with the same (reused) seqs.
    pub(super) epoch: u64,
    /// Durable records whose waiters have a hook: answered by `Shared::run_deferred` once the
    /// lock is released.
    pub(super) deferred: Vec<(u64, Reply)>,
    /// Writer threads waiting for work.
    pub(super) idle: usize,
    /// With one writer thread: a flusher (that thread or an event loop) has taken a batch
    /// and not settled its sync yet; no other flusher takes the next one meanwhile.
    pub(super) busy: bool,
    pub(super) shutdown: bool,
    /// What HEAD should say once the checkpoint it names is durable.
    pub(super) head: Option<Head>,
    /// When the directory and segment path last checked out fine.
    pub(super) paths_checked_at: Option<Instant>,
    pub(super) counters: Arc<Counters>,
}

impl Log {
    /// The state of a log whose chain ends at `last_seq` / `prev_hash` (all of it durable),
    /// appending to `seg` if there is one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        opts: WriterOptions,
        dir_c: Arc<CString>,
        counters: Arc<Counters>,
        threads: usize,
        direct: bool,
        seg: Option<OpenSegment>,
        last_seq: u64,
        prev_hash: String,
    ) -> Log {
        let start_pos = ChainPos { seq: last_seq, hash: prev_hash.clone(), since_ckpt: 0, stretch_from: None };
        if let Some(ex) = &opts.export {
            // What recovery kept is the log: the exporter may send it.
            ex.log_opened(last_seq);
        }
        Log {
            dir: opts.dir,
            dir_c,
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
            next_seq: last_seq + 1,
            prev_hash,
            since_ckpt: 0,
            stretch_from: None,
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
            busy: false,
            deferred: Vec::new(),
            shutdown: false,
            head: None,
            paths_checked_at: None,
            counters,
        }
    }

    /// Queue `rec` as the next record (after a checkpoint when its time is past the stretch's
    /// bound, see [`Log::stretch_overdue`]; followed by one when one is due by count): its
    /// seq, or None if it could not be encoded (its waiter has the error).
    pub(super) fn queue(&mut self, rec: Record, reply: Option<Reply>) -> Option<u64> {
        let mut now = chrono::Utc::now();
        if rec.kind != Kind::Start && self.stretch_overdue(now) {
            self.encode_checkpoint();
            now = chrono::Utc::now();
        }
        let seq = self.next_seq;
        let event = Some(rec.metrics_event());
        let starts_stretch = self.since_ckpt == 0 || rec.kind == Kind::Start;
        let ts = format_ts(now, &mut self.ts_cache);
        match self.encode(rec, ts) {
            Ok(hash) => {
                if starts_stretch {
                    self.stretch_from = Some(now);
                }
                self.since_ckpt += 1;
                self.push(seq, reply, event, hash);
                if self.signer.is_some() && self.checkpoint_every > 0 && self.since_ckpt >= self.checkpoint_every {
                    self.encode_checkpoint();
                }
                Some(seq)
            }
            Err(e) => {
                match reply {
                    Some(r) => {
                        r.send(Err(e));
                    }
                    None => tracing::error!("audit record dropped: {e}"),
                }
                None
            }
        }
    }

    pub(super) fn push(&mut self, seq: u64, reply: Option<Reply>, event: Option<crate::metrics::Event>, hash: [u8; HASH_HEX_LEN]) {
        let end = self.buf.len();
        let (since_ckpt, stretch_from) = (self.since_ckpt, self.stretch_from);
        self.queued.push(Queued { seq, reply, event, end, hash, since_ckpt, stretch_from });
    }

    /// Whether a record made at `now` would end a stretch without a checkpoint longer than
    /// `checkpoint_interval` of record time — which `verify` refuses (it cannot tell such a
    /// stretch from one whose checkpoints were removed). The interval checkpoint is timed by
    /// the monotonic clock and written by a writer thread, so it comes late when the wall
    /// clock steps forward (NTP, a resumed VM) or every writer thread is stuck in a slow
    /// fdatasync; the record then waits behind a checkpoint of its own.
    fn stretch_overdue(&self, now: Stamp) -> bool {
        let bound = chrono::Duration::from_std(self.checkpoint_interval).unwrap_or(chrono::Duration::MAX);
        self.signer.is_some() && self.since_ckpt > 0 && self.stretch_from.is_some_and(|from| now - from > bound)
    }

    /// Write what is queued (one record with `fsync = always`) to the segment. With
    /// `fsync = off` the records are then durable as far as this policy goes and are answered
    /// at once; otherwise the returned ticket is what the caller must sync. On error every
    /// queued record is refused (they are chained onto each other) and the chain rolls back
    /// to the last written record.
    pub(super) fn write_queued(&mut self, thread: usize, probe: Option<PathProbe>) -> Result<Option<SyncTicket>, AuditError> {
        if self.queued.is_empty() {
            self.urgent = false;
            self.lazy_since = None;
            return Ok(None);
        }
        if let Err(e) = self.prepare(probe) {
            self.fail_queued(&e);
            return Err(e);
        }
        let mut take = if self.fsync == FsyncPolicy::Always { 1 } else { self.queued.len() };
        if self.seg.as_ref().is_some_and(|s| s.len + self.queued[take - 1].end as u64 >= self.segment_bytes) {
            // This batch fills the segment: the next one rotates. End the segment with a
            // checkpoint (and so write everything queued now) so each closed segment is anchored.
            if self.signer.is_some() && self.since_ckpt > 0 {
                self.encode_checkpoint();
            }
            take = self.queued.len();
        }
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
        self.buf.drain(..end);
        let mut items = Vec::with_capacity(take);
        let mut last: Option<([u8; HASH_HEX_LEN], u64, u64, Option<Stamp>)> = None;
        for q in self.queued.drain(..take) {
            last = Some((q.hash, q.seq, q.since_ckpt, q.stretch_from));
            items.push((q.seq, q.reply, q.event));
        }
        for q in &mut self.queued {
            q.end -= end;
        }
        if let Some((hash, seq, since_ckpt, stretch_from)) = last {
            let hash = String::from_utf8_lossy(&hash).into_owned();
            self.written = ChainPos { seq, hash, since_ckpt, stretch_from };
        }
        self.unsynced.push_back(Chunk { last_seq: self.written.seq, items, lines });
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
    pub(super) fn fail_queued(&mut self, e: &AuditError) {
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

    pub(super) fn reset_chain(&mut self, pos: &ChainPos) {
        self.next_seq = pos.seq + 1;
        self.prev_hash.clone_from(&pos.hash);
        self.since_ckpt = pos.since_ckpt;
        self.stretch_from = pos.stretch_from;
        if self.head.as_ref().is_some_and(|h| h.seq > pos.seq) {
            self.head = None;
        }
    }

    /// Everything up to `pos` is durable: answer the records it covers.
    pub(super) fn advance(&mut self, pos: ChainPos) {
        if pos.seq <= self.durable.seq {
            return;
        }
        self.durable = pos;
        if let Some(ex) = &self.export {
            ex.durable(self.durable.seq);
        }
        while self.unsynced.front().is_some_and(|c| c.last_seq <= self.durable.seq) {
            let Some(c) = self.unsynced.pop_front() else { break };
            self.counters.records.fetch_add(c.lines, Ordering::Relaxed);
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            self.counters.failing.store(false, Ordering::Relaxed);
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

    pub(super) fn synced(&mut self, t: &SyncTicket) {
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
    pub(super) fn sync_failed(&mut self, t: &SyncTicket, e: io::Error) {
        if self.seg.as_ref().is_none_or(|s| s.id != t.seg_id) {
            // A segment already closed: closing it synced it through the writer's own
            // descriptor, which would have reported this error too.
            tracing::error!("audit: fdatasync of a closed segment failed: {e}");
            return;
        }
        self.truncate_to_durable(e);
    }

    /// The current segment's sync failed: truncate it to its durable length and roll back.
    pub(super) fn truncate_to_durable(&mut self, e: io::Error) -> AuditError {
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
    pub(super) fn rollback_to_durable(&mut self, e: &AuditError) {
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

    pub(super) fn fail_items(&self, replies: impl Iterator<Item = Option<Reply>>, e: &AuditError) {
        self.counters.failed_batches.fetch_add(1, Ordering::Relaxed);
        self.counters.failing.store(true, Ordering::Relaxed);
        crate::metrics::METRICS.audit_batches_failed.inc();
        let mut unanswered = 0usize;
        for r in replies {
            match r {
                Some(r) => {
                    r.send(Err(e.clone()));
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

    /// At shutdown (the writer threads have stopped): write what is queued plus a final
    /// checkpoint, sync, answer. Returns the HEAD to write.
    pub(super) fn final_flush(&mut self) -> Option<Head> {
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
    pub(super) fn encode(&mut self, mut rec: Record, ts: String) -> Result<[u8; HASH_HEX_LEN], AuditError> {
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
}
