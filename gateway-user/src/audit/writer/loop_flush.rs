//! Event loops that write and sync their own sessions' batches.
//!
//! With `fsync = "group"` and one writer thread, an event loop that called
//! [`AuditHandle::flush_on_this_loop`](super::AuditHandle::flush_on_this_loop) takes the
//! batch its sessions wait for itself, instead of waking the writer thread and being woken
//! back when the sync is done: a session that queues a waited-for record wakes the loop's
//! flusher task (same thread: no system call), the flusher first lets the loop make a few
//! passes — running every task that is ready and polling the reactor — so that the batch holds
//! all of this round's records, then writes and fdatasyncs it right there, blocking the loop, and answers
//! the records (the sessions' tasks are woken on the same thread). Statements that went
//! upstream before their record was durable (`session::durability`) are executed by Postgres
//! meanwhile, so the flush overlaps Postgres's work; the loop has nothing else to do then
//! anyway, since every session on it waits for its reply to be released.
//!
//! One flush is in flight at a time (`Log::busy`): a loop finding another flusher (the writer
//! thread, or another loop) busy leaves its records to it — that flusher takes the next batch
//! when it is done, waking the writer thread if the records are not its own. The writer
//! thread keeps the rest of its work: records nobody waits for, interval checkpoints, and
//! sessions on threads that are not event loops.
//!
//! The cost: while a loop syncs, its sessions make no progress (new connections, cancel
//! requests and timers included) — for as long as the disk takes.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use tokio::sync::Notify;

use super::flush::Shared;
use super::log::Log;
use crate::config::FsyncPolicy;
use crate::lock;

/// Passes of the event loop a flusher lets go by between being woken and taking the batch
/// (see [`flusher`]). One pass only catches the statements already waiting in the reactor; a
/// few more let the clients whose replies were just released send their next statement first,
/// so batches are larger and each statement shares its flush with more others. A pass with
/// nothing ready is one non-blocking reactor poll: a lone client's record waits for four of
/// them (a few µs) before its flush starts.
const GATHER_PASSES: usize = 4;

thread_local! {
    /// The logs this thread's event loop flushes, and how to wake its flusher for each.
    static FLUSHERS: RefCell<Vec<(Weak<Shared>, Arc<Notify>)>> = const { RefCell::new(Vec::new()) };
}

/// Whether a log can be flushed by event loops: group commit with one writer thread.
pub(super) fn supported(shared: &Shared, log: &Log) -> bool {
    shared.fsync == FsyncPolicy::Group && log.threads == 1
}

/// The flusher of this thread's event loop for `shared`, if it has one.
pub(super) fn this_loops(shared: &Shared, log: &Log) -> Option<Arc<Notify>> {
    if !supported(shared, log) {
        return None;
    }
    FLUSHERS.with(|f| {
        f.borrow()
            .iter()
            .find(|(w, _)| std::ptr::eq(w.as_ptr(), shared))
            .map(|(_, n)| n.clone())
    })
}

/// Register this thread's event loop as a flusher of `shared` and spawn its flusher task.
/// Must run inside the loop's current-thread runtime. False when the log's settings do not
/// allow it (its sessions then use the writer thread).
pub(super) fn start(shared: &Arc<Shared>) -> bool {
    if !supported(shared, &lock(&shared.log)) {
        return false;
    }
    let wake = Arc::new(Notify::new());
    let weak = Arc::downgrade(shared);
    let registered = FLUSHERS.with(|f| {
        let mut f = f.borrow_mut();
        f.retain(|(w, _)| w.strong_count() > 0);
        if f.iter().any(|(w, _)| w.ptr_eq(&weak)) {
            return false;
        }
        f.push((weak.clone(), wake.clone()));
        true
    });
    if registered {
        tokio::spawn(flusher(weak, wake));
    }
    true
}

/// The loop's flusher task: woken when a session queued a waited-for record.
async fn flusher(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        // Let the loop make a few passes first — each runs the tasks that are ready and polls
        // the reactor without blocking — so that the records of statements arriving right
        // now join this batch instead of waiting a whole flush for the next one.
        for _ in 0..GATHER_PASSES {
            tokio::task::yield_now().await;
        }
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if !shared.flush_from_loop() {
            break;
        }
    }
}

impl Shared {
    /// Write, sync and answer the queued batch in the calling event loop, unless another
    /// flusher is busy (it takes the batch next). False once the writer is shutting down.
    fn flush_from_loop(&self) -> bool {
        let log = lock(&self.log);
        if log.shutdown {
            return false;
        }
        if log.busy || !log.urgent {
            return true;
        }
        let log = self.flush_batch(log, 0);
        // Records other threads queued meanwhile, and a shutdown waiting for this flush, are
        // the writer thread's.
        let wake_writer = log.shutdown || (log.urgent && log.idle > 0);
        drop(log);
        if wake_writer {
            self.work.notify_all();
        }
        true
    }
}
