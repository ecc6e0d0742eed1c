//! What sessions hold: [`AuditHandle`] submits records and says when they are durable;
//! [`OnDurable`] hooks run on a writer thread the moment a record is.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::flush::Shared;
use super::head::HeadSlot;
use super::log::Log;
use super::{AuditError, Counters, WriterOptions, WriterStats};
use crate::audit::record::Record;
use crate::config::FsyncPolicy;
use crate::lock;

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
    pub(super) tx: oneshot::Sender<Result<u64, AuditError>>,
    pub(super) seq: u64,
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

/// Says once whether a submitted record is durable (its seq) or refused.
pub type Outcome = oneshot::Receiver<Result<u64, AuditError>>;

/// Who waits for a record: the channel that tells it the outcome, and what to run first when
/// the record is durable (never run when it fails).
pub(super) struct Reply {
    pub(super) tx: oneshot::Sender<Result<u64, AuditError>>,
    pub(super) hook: Option<Arc<dyn OnDurable>>,
}

impl Reply {
    pub(super) fn send(self, r: Result<u64, AuditError>) {
        let _ = self.tx.send(r);
    }
}

/// What the handles share: the writer threads are stopped when the last one goes.
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

/// A session's way into the audit writer. Clones share one writer; it stops (final
/// checkpoint, sync) on [`AuditHandle::shutdown`] or when the last clone is dropped.
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
        let on_checkpoint = opts.on_checkpoint.clone();
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
            on_checkpoint,
        });
        let inner = Inner { shared: shared.clone(), threads: Mutex::new(Vec::new()), head_thread: Mutex::new(None) };
        let s = shared.clone();
        let t = std::thread::Builder::new()
            .name("pgward-audit-head".into())
            .spawn(move || s.head_thread())
            .map_err(|e| AuditError::io("spawning the audit HEAD thread", e))?;
        *lock(&inner.head_thread) = Some(t);
        // A HEAD recovery left to write (see `Log::open`).
        let head = lock(&shared.log).due_head();
        if let Some(h) = head {
            shared.post_head(h);
        }
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
    /// writer thread to run it and the hook is dropped unrun. Also gives the record's seq if
    /// it was queued: None means the receiver already holds its error (e.g. it could not be
    /// encoded), so later records of the caller's may be durable while this one never is.
    pub fn submit_then(
        &self,
        rec: Record,
        hook: Option<Arc<dyn OnDurable>>,
    ) -> (oneshot::Receiver<Result<u64, AuditError>>, Option<u64>) {
        let (tx, rx) = oneshot::channel();
        let hook = hook.filter(|_| self.runs_hooks());
        let queued = self.inner.shared.enqueue(rec, Some(Reply { tx, hook }));
        (rx, queued)
    }

    /// Submit records back to back, so that nothing comes between them in the log (no other
    /// record, no failure): with `last_hook`, run on the last one once it is durable, the
    /// earlier ones are durable too. Each record's receiver and seq (None: refused at once),
    /// in order.
    pub fn submit_all(
        &self,
        records: Vec<Record>,
        last_hook: Option<Arc<dyn OnDurable>>,
    ) -> Vec<(Outcome, Option<u64>)> {
        let n = records.len();
        let mut last_hook = last_hook.filter(|_| self.runs_hooks());
        let mut rxs = Vec::with_capacity(n);
        let items = records.into_iter().enumerate().map(|(i, rec)| {
            let (tx, rx) = oneshot::channel();
            rxs.push(rx);
            let hook = if i + 1 == n { last_hook.take() } else { None };
            (rec, Some(Reply { tx, hook }))
        });
        let mut seqs = Vec::with_capacity(n);
        self.inner.shared.enqueue_all(items, |s| seqs.push(s));
        rxs.into_iter().zip(seqs).collect()
    }

    /// Have the calling event loop (a current-thread tokio runtime: call it from a task on
    /// the loop) write and sync the batches its own sessions wait for, instead of handing
    /// them to the writer thread (see [`super::loop_flush`]). False, and nothing changes,
    /// unless `fsync = "group"` with one sync thread.
    pub fn flush_on_this_loop(&self) -> bool {
        super::loop_flush::start(&self.inner.shared)
    }

    /// Whether the log takes records: false from a refused batch until the next durable one.
    pub fn healthy(&self) -> bool {
        !self.inner.shared.counters.failing.load(Ordering::Relaxed)
    }

    /// Whether durable-hooks run (see [`submit_then`](Self::submit_then)): not with `fsync = off`.
    pub fn runs_hooks(&self) -> bool {
        self.inner.shared.fsync != FsyncPolicy::Off
    }

    /// Append without waiting (still chained; ordered after every record already appended);
    /// failures are logged. Wakes no thread: the record goes out with the next batch or
    /// within `LAZY_FLUSH`.
    pub fn append(&self, rec: Record) {
        let _ = self.inner.shared.enqueue(rec, None);
    }

    /// Write a final checkpoint, fsync, stop the threads. Blocks until the threads have
    /// exited (only the first caller waits). Records appended afterwards fail with `Closed`.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Whether the current segment is written with O_DIRECT (see [`super::direct`]).
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
        // An event loop's flush in flight finishes first (it wakes us: see `loop_flush`).
        while log.busy {
            log = self.shared.work.wait(log).unwrap_or_else(|e| e.into_inner());
        }
        let head = log.final_flush();
        drop(self.shared.run_deferred(log));
        if let Some(h) = head {
            self.shared.write_head(&h);
        }
        // Dropped outside the lock: it waits (briefly) for the sink to take what is durable.
        let export = lock(&self.shared.log).export.take();
        drop(export);
    }
}
