//! Copies of durable audit records for a log pipeline outside the log directory: RFC 5424
//! syslog over a unix datagram socket (`/dev/log`), over TCP with octet-counted framing
//! (RFC 6587) or over TLS (RFC 5425); or JSON lines on stdout (journald).
//!
//! The exporter never drops a record and never holds up a statement. It does not take records
//! from the writer: the writer only tells it how far the log is durable ([`Exporter::durable`],
//! a store and a wake-up), and the exporter's own thread reads the segment files ([`feed`])
//! from just after its cursor ([`cursor`]: the last seq the sink acknowledged, kept in
//! `<audit dir>/export.cursor`). A sink that is slow, full or down only makes the exporter
//! fall behind; it retries, and resumes from the cursor after a reconnect or a restart.
//!
//! Delivery is at least once: what was sent after the last acknowledgement is sent again
//! after a reconnect, so the receiver may hold a record twice. Every message carries the
//! record with its `seq` and `hash`, so copies are recognised (`pgward audit verify --against`
//! accepts them). What "acknowledged" means per sink is in [`sink`] and [`stream`].

mod cursor;
mod feed;
mod settings;
mod sink;
mod stream;

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use crate::config::ExportKind;
pub use cursor::CURSOR_FILE;
pub use settings::{ExportSettings, Target};
pub use sink::rfc5424;

use cursor::Cursor;
use feed::Feed;
use sink::Sink;

/// Records read and sent before the exporter asks the sink whether it has them.
const MAX_BATCH: usize = 512;
/// How long the thread sleeps without a nudge before it looks at the log anyway.
const IDLE_WAKE: Duration = Duration::from_secs(1);
/// First wait after a failed connect or send; doubled on each failure up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// While records keep coming the cursor file is rewritten at most this often (always once
/// the exporter has caught up): a lagging cursor only means more copies after a crash.
const CURSOR_EVERY: Duration = Duration::from_millis(200);
/// At shutdown, how long the writer waits for the exporter to send what is durable.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What the writer shares with the export thread.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// The last seq that is durable in the log.
    durable: u64,
    /// Where the log ended when the writer opened it (taken by the thread once).
    opened_at: Option<u64>,
    stop: bool,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Handle to the export thread (owned by the writer).
pub struct Exporter {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// Start the export thread. It sends nothing until [`Exporter::durable`] says how far the
    /// log is durable.
    pub fn start(settings: ExportSettings) -> Result<Exporter, String> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { durable: 0, opened_at: None, stop: false }),
            wake: Condvar::new(),
        });
        let (done_tx, done) = mpsc::channel();
        let cursor = Cursor::load(&settings.dir, &settings.sink_id());
        let worker = Worker {
            feed: Feed::new(&settings.dir, cursor.acked),
            sent: cursor.acked,
            cursor,
            settings,
            shared: shared.clone(),
            sink: None,
            retry: RETRY_MIN,
            failing_since: None,
            last_persist: Instant::now(),
        };
        std::thread::Builder::new()
            .name("pgward-audit-export".into())
            .spawn(move || {
                worker.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| format!("cannot start the audit export thread: {e}"))?;
        Ok(Exporter { shared, done })
    }

    /// The writer opened the log, which ends at `last_seq` (all of it durable).
    pub fn log_opened(&self, last_seq: u64) {
        let mut st = lock(&self.shared);
        st.opened_at = Some(last_seq);
        st.durable = st.durable.max(last_seq);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// Everything up to `seq` is durable (never blocks beyond a short lock).
    pub fn durable(&self, seq: u64) {
        let mut st = lock(&self.shared);
        if seq > st.durable {
            st.durable = seq;
            drop(st);
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for Exporter {
    /// Let the thread send what is durable (at most [`SHUTDOWN_GRACE`]), then stop it; what
    /// it did not send goes out after the next start.
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.wake.notify_one();
        if self.done.recv_timeout(SHUTDOWN_GRACE).is_err() {
            tracing::warn!(
                "audit export: stopped before the sink took every record; the rest goes out after the next start"
            );
        }
    }
}

/// The export thread's state.
struct Worker {
    settings: ExportSettings,
    shared: Arc<Shared>,
    cursor: Cursor,
    feed: Feed,
    /// The last seq handed to the sink (≥ the cursor).
    sent: u64,
    sink: Option<Box<dyn Sink>>,
    retry: Duration,
    /// Set while the sink fails (logged once per outage).
    failing_since: Option<Instant>,
    last_persist: Instant,
}

impl Worker {
    fn run(mut self) {
        loop {
            let (durable, stop) = self.wait();
            let opened_at = lock(&self.shared).opened_at.take();
            if let Some(end) = opened_at {
                self.check_log_end(end);
            }
            let caught_up = self.pass(durable);
            if stop {
                self.persist();
                if !caught_up {
                    tracing::warn!(
                        "audit export: stopping with records up to seq {durable} durable but only up to seq {} acknowledged",
                        self.cursor.acked
                    );
                }
                return;
            }
        }
    }

    /// A cursor past the end of the log means the log lost records since they were exported
    /// (a crash with `fsync = "off"`, or a replaced log): the records now written under those
    /// seqs are new and are sent too, so the copy shows both versions.
    fn check_log_end(&mut self, end: u64) {
        if self.cursor.acked <= end {
            return;
        }
        tracing::warn!(
            "audit export: the cursor (seq {}) is past the end of the log (seq {end}): the log lost records since they were exported; exporting from seq {}",
            self.cursor.acked,
            end + 1
        );
        self.cursor.acked = end;
        self.sent = end;
        self.feed.rewind(end);
        self.persist();
    }

    /// Wait for work: a durable seq not yet sent, a stop, or the next retry / idle look.
    fn wait(&self) -> (u64, bool) {
        let mut st = lock(&self.shared);
        let timeout = if self.failing_since.is_some() { self.retry } else { IDLE_WAKE };
        let ready =
            |st: &State| st.stop || st.opened_at.is_some() || (self.failing_since.is_none() && st.durable > self.sent);
        if !ready(&st) {
            st = self
                .shared
                .wake
                .wait_timeout_while(st, timeout, |st| !ready(st))
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        (st.durable, st.stop)
    }

    /// Send what is durable and not yet acknowledged. True once the sink acknowledged
    /// everything up to `durable`.
    fn pass(&mut self, durable: u64) -> bool {
        if self.cursor.acked >= durable {
            return true;
        }
        if let Err(e) = self.send_until(durable) {
            self.failed(&e);
            return false;
        }
        if self.failing_since.take().is_some() {
            tracing::info!(
                "audit export: {} reachable again; resumed after seq {}",
                self.settings.sink_id(),
                self.cursor.acked
            );
        }
        self.retry = RETRY_MIN;
        let caught_up = self.cursor.acked >= durable;
        if caught_up || self.last_persist.elapsed() >= CURSOR_EVERY {
            self.persist();
        }
        caught_up
    }

    fn send_until(&mut self, durable: u64) -> Result<(), String> {
        if self.sink.is_none() {
            let sink = sink::connect(&self.settings.target, self.settings.max_message)
                .map_err(|e| format!("connecting: {e}"))?;
            self.sink = Some(sink);
        }
        loop {
            let batch = self.feed.next_batch(durable, MAX_BATCH)?;
            let Some(sink) = self.sink.as_mut() else { return Ok(()) };
            if let Some((last, _)) = batch.last() {
                for (_, line) in &batch {
                    sink.send(line).map_err(|e| format!("sending: {e}"))?;
                }
                self.sent = *last;
            }
            if self.sent > self.cursor.acked && sink.confirm().map_err(|e| format!("waiting for the sink: {e}"))? {
                self.cursor.acked = self.sent;
            }
            if batch.len() < MAX_BATCH {
                return Ok(());
            }
        }
    }

    /// Drop the connection and go back to the cursor: what was sent after it is sent again.
    fn failed(&mut self, e: &str) {
        self.sink = None;
        self.sent = self.cursor.acked;
        self.feed.rewind(self.cursor.acked);
        if self.failing_since.is_none() {
            tracing::warn!(
                "audit export to {}: {e}; retrying, records after seq {} wait in the log",
                self.settings.sink_id(),
                self.cursor.acked
            );
            self.failing_since = Some(Instant::now());
            self.retry = RETRY_MIN;
        } else {
            tracing::debug!("audit export to {}: {e}", self.settings.sink_id());
            self.retry = (self.retry * 2).min(RETRY_MAX);
        }
    }

    fn persist(&mut self) {
        self.last_persist = Instant::now();
        if let Err(e) = self.cursor.persist() {
            tracing::warn!("audit export: cannot write the cursor {}: {e}", self.cursor.path().display());
        }
    }
}

#[cfg(test)]
mod tests;
