//! The writer threads (group commit): they take the queued batch, write it under the log lock,
//! sync it without the lock, and answer the records the sync covered.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::handle::{Reply, Waiter};
use super::head::HeadSlot;
use super::log::{Log, sync_ticket};
use super::{AuditError, Counters};
use crate::audit::record::{Kind, Record};
use crate::config::FsyncPolicy;
use crate::lock;

/// Longest time a record appended with `append` (nobody waiting) stays in memory.
pub(super) const LAZY_FLUSH: Duration = Duration::from_millis(100);

/// State shared by the handles and the writer threads.
pub(super) struct Shared {
    pub(super) log: Mutex<Log>,
    /// Writer threads wait here for work.
    pub(super) work: Condvar,
    /// Serializes HEAD rewrites; holds the seq of the checkpoint HEAD names.
    pub(super) head_written: Mutex<u64>,
    /// The next HEAD for the head thread to write (the newest wins), and its stop flag.
    pub(super) head_slot: Mutex<HeadSlot>,
    pub(super) head_cv: Condvar,
    pub(super) dir: PathBuf,
    pub(super) fsync: FsyncPolicy,
    pub(super) counters: Arc<Counters>,
    /// Told each checkpoint once HEAD names it.
    pub(super) on_checkpoint: Option<super::CheckpointHook>,
}

impl Shared {
    /// Queue `rec`: its seq, or None if it was refused at once (its waiter has the error).
    pub(super) fn enqueue(&self, rec: Record, reply: Option<Reply>) -> Option<u64> {
        let mut seq = None;
        self.enqueue_all(std::iter::once((rec, reply)), |s| seq = s);
        seq
    }

    /// Queue records back to back under one hold of the lock, so that no other record and no
    /// failure comes between them; `each` is told each one's seq (None: refused at once).
    pub(super) fn enqueue_all(&self, items: impl IntoIterator<Item = (Record, Option<Reply>)>, mut each: impl FnMut(Option<u64>)) {
        let mut log = lock(&self.log);
        let mut urgent = false;
        for (rec, reply) in items {
            each(queue_one(&mut log, rec, reply, &mut urgent));
        }
        if !urgent {
            return;
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
        } else if let Some(wake) = super::loop_flush::this_loops(self, &log) {
            // This event loop writes the batch itself once its ready sessions have run.
            drop(log);
            wake.notify_one();
        } else if log.idle > 0 {
            drop(log);
            self.work.notify_one();
        }
        // else: every writer thread is busy and takes this batch when it comes back.
    }

    /// Run the hooks of records made durable while the lock was held, then tell their
    /// waiters — with the lock released (a hook may do a system call).
    pub(super) fn run_deferred<'a>(&'a self, mut log: std::sync::MutexGuard<'a, Log>) -> std::sync::MutexGuard<'a, Log> {
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
    pub(super) fn writer_thread(&self, id: usize) {
        let mut log = lock(&self.log);
        loop {
            log = match self.wait_for_work(log) {
                Some(log) => log,
                None => return,
            };
            log = self.flush_batch(log, id);
        }
    }

    /// Wait until there is a batch to write (or a checkpoint due): the lock, or None at
    /// shutdown.
    fn wait_for_work<'a>(&'a self, mut log: std::sync::MutexGuard<'a, Log>) -> Option<std::sync::MutexGuard<'a, Log>> {
        loop {
            if log.shutdown {
                return None;
            }
            let now = Instant::now();
            let ckpt_due = log.checkpoint_due_at();
            // Another flusher (an event loop, see `loop_flush`) has a batch in flight: the
            // next one waits for it, and is told when it is done.
            if !log.busy {
                // Checked before `urgent`, so a steady stream of waited-for records cannot
                // starve the interval checkpoint (`verify` bounds the time between two).
                if ckpt_due.is_some_and(|due| due <= now) {
                    log.encode_checkpoint();
                    return Some(log);
                }
                if log.urgent {
                    return Some(log);
                }
            }
            // Lazy records are queued without a wakeup, so an idle thread looks again
            // every LAZY_FLUSH.
            let mut deadline = now + LAZY_FLUSH;
            if let Some(t) = log.lazy_since {
                let due = t + LAZY_FLUSH;
                if due <= now && !log.busy {
                    return Some(log);
                }
                deadline = deadline.min(due.max(now + BUSY_RECHECK));
            }
            if let Some(due) = ckpt_due {
                deadline = deadline.min(due.max(now + BUSY_RECHECK));
            }
            log.idle += 1;
            log = self.work.wait_timeout(log, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            log.idle -= 1;
        }
    }

    /// Write the queued batch, sync it, answer the records the sync covered (running their
    /// hooks), and hand HEAD its next checkpoint. Called and returns with the lock held;
    /// releases it for the path checks, the sync and the hooks. While it runs, `busy` keeps
    /// the other flushers of a one-thread log off the segment (see `loop_flush`).
    pub(super) fn flush_batch<'a>(&'a self, mut log: std::sync::MutexGuard<'a, Log>, id: usize) -> std::sync::MutexGuard<'a, Log> {
        let exclusive = log.threads == 1;
        if exclusive {
            log.busy = true;
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
        if exclusive {
            log.busy = false;
        }
        log
    }
}

/// How soon a writer thread that found another flusher busy looks again for a due lazy
/// record or checkpoint (the flusher wakes it when records wait; lazy ones do not).
const BUSY_RECHECK: Duration = Duration::from_millis(1);

/// Queue one record under the lock; `urgent` is set when someone waits for it.
fn queue_one(log: &mut Log, rec: Record, reply: Option<Reply>, urgent: &mut bool) -> Option<u64> {
    if log.shutdown {
        match reply {
            Some(r) => r.send(Err(AuditError::Closed)),
            None => tracing::warn!("audit record dropped: the writer has stopped"),
        }
        return None;
    }
    if matches!(rec.kind, Kind::Checkpoint | Kind::Start) {
        let e = AuditError::InvalidRecord(format!("{:?} records are written by the writer itself", rec.kind));
        match reply {
            Some(r) => r.send(Err(e)),
            None => tracing::error!("audit record dropped: {e}"),
        }
        return None;
    }
    let waited = reply.is_some();
    let seq = log.queue(rec, reply)?;
    if waited {
        *urgent = true;
    } else {
        log.lazy_since.get_or_insert_with(Instant::now);
    }
    Some(seq)
}
