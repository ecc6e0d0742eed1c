//! A batch of client frames: the frames that may go upstream at once and the rest, held from
//! the first write-ahead frame until every record the session submitted is durable
//! ([`super::durability`]); the hand-over that lets the audit writer thread send the held
//! frames upstream itself, and their release: forwarded as they are once durable, or with
//! their statements replaced by failing markers when the audit log could not take the
//! records.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::Relay;
use super::durability::Rule;
use super::tracked::Pending;
use crate::audit::Record;
use crate::sqlstate;
use crate::wire::{self, Frame};

/// Client frames read in one go, waiting for their statement records to be durable.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) frames: Vec<(Frame, Option<usize>)>,
    pub(super) pendings: Vec<Pending>,
    /// Statement records, submitted together once the batch is complete.
    pub(super) records: Vec<Record>,
    /// The first write-ahead frame: its index among `frames` and among `pendings`. It and
    /// everything after it wait for `needs`.
    pub(super) gate: Option<(usize, usize)>,
    /// The seq every record up to which must be durable before the held frames go.
    pub(super) needs: u64,
    /// The frames, handed to the audit writer to send once the last record is durable.
    pub(super) held: Option<Arc<HeldSend>>,
    /// Bytes the writer sent, once claimed.
    pub(super) sent: usize,
    /// Binds whose planning may run user code ([`Batch::push_bind`]) with no Execute of
    /// their portal after them in this batch yet: the portal's name and the record the Bind
    /// gets if none comes.
    pub(super) binds: Vec<(String, Record)>,
}

impl Batch {
    /// The audit writer sent (some of) the held frames upstream.
    pub(super) fn was_sent(&self) -> bool {
        self.held.as_ref().is_some_and(|h| matches!(*crate::lock(&h.state), HeldState::Sent { .. }))
    }

    /// True if the writer sent the held frames; otherwise it will tell the session when the
    /// records are durable, even if it sends everything.
    pub(super) fn sent_or_ask(&self) -> bool {
        self.held.as_ref().is_some_and(|h| h.sent_or_ask())
    }

    /// A frame that runs a statement (or stands in for a refused one), its statement record
    /// (submitted with the rest by `submit_records`), what it waits for from the server, and
    /// when its record must be durable (write-ahead also for everything after a gate).
    pub(super) fn push_statement(&mut self, frame: Frame, mut rec: Record, mut p: Pending, rule: Rule) {
        if rule == Rule::WriteAhead {
            self.gate_here();
        }
        let applied = if self.gate.is_some() { Rule::WriteAhead } else { rule };
        rec.durability = Some(applied.as_str().into());
        self.records.push(rec);
        p.rec_idx = self.records.len() - 1;
        self.frames.push((frame, Some(self.pendings.len())));
        self.pendings.push(p);
    }

    /// A Bind whose planning may run user code: Postgres plans the statement at Bind, so the
    /// Bind is write-ahead like the Execute that follows it, whose record then stands for
    /// both. A Bind with no Execute of its portal after it in the batch gets `rec` (see
    /// [`Batch::close_binds`]): a function that ran while it was planned is still in the log.
    pub(super) fn push_bind(&mut self, frame: Frame, portal: String, rec: Record) {
        self.gate_here();
        self.frames.push((frame, Some(self.pendings.len())));
        self.pendings.push(Pending::new(crate::wire::Awaited::Bind));
        self.binds.push((portal, rec));
    }

    /// An Execute of `portal` follows a Bind of it in this batch: its record covers the Bind.
    pub(super) fn executed(&mut self, portal: &str) {
        if let Some(i) = self.binds.iter().rposition(|(p, _)| p == portal) {
            self.binds.remove(i);
        }
    }

    /// The batch is complete: the Binds no Execute followed get records of their own.
    pub(super) fn close_binds(&mut self) {
        for (_, mut rec) in self.binds.drain(..) {
            rec.durability = Some(Rule::WriteAhead.as_str().into());
            self.records.push(rec);
        }
    }

    /// The next frame, and everything after it, waits for every record of the session.
    pub(super) fn gate_here(&mut self) {
        if self.gate.is_none() {
            self.gate = Some((self.frames.len(), self.pendings.len()));
        }
    }

    /// A frame that runs nothing itself, and what it waits for from the server.
    pub(super) fn forward(&mut self, frame: Frame, p: Pending) {
        self.frames.push((frame, None));
        self.pendings.push(p);
    }

    /// Take the held frames back (idempotent): how many bytes the writer sent.
    pub(super) fn claim(&mut self) -> usize {
        if let Some(h) = self.held.take() {
            self.sent = h.claim();
        }
        self.sent
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // A batch dropped unreleased (the session ended meanwhile) must never go out later.
        self.claim();
    }
}

/// Append the frames to `out`, less the first `sent` bytes (what the writer already sent).
pub(super) fn append_unsent(frames: &[(Frame, Option<usize>)], sent: usize, out: &mut BytesMut) {
    let mut skip = sent;
    for (f, _) in frames {
        let raw = &f.raw[..];
        if skip >= raw.len() {
            skip -= raw.len();
            continue;
        }
        out.extend_from_slice(&raw[skip..]);
        skip = 0;
    }
}

/// A batch's frames, sent to the upstream socket by the audit writer thread once the batch's
/// last statement record is durable (records become durable in order, so all of them are),
/// unless the session claimed them first. The socket is a dup of the session's, so a late
/// send can never reach another connection; `claim` makes sure there is no late send.
pub(super) struct HeldSend {
    fd: Arc<std::os::fd::OwnedFd>,
    state: std::sync::Mutex<HeldState>,
}

pub(super) enum HeldState {
    /// Not durable yet. With `quiet`, a writer that sends all of it keeps the record's waiter
    /// untold (the session learns of it when Postgres answers or the client sends more).
    Held { bytes: Bytes, quiet: bool },
    /// The writer sent this many bytes (all, unless the socket buffer was full); `untold` is
    /// the waiter it kept.
    Sent { n: usize, untold: Option<crate::audit::Waiter> },
    Claimed,
}

impl HeldSend {
    pub(super) fn new(fd: Arc<std::os::fd::OwnedFd>, bytes: Bytes, quiet: bool) -> HeldSend {
        HeldSend { fd, state: std::sync::Mutex::new(HeldState::Held { bytes, quiet }) }
    }

    /// The session takes the batch back: how many bytes the writer already sent (a waiter
    /// the writer kept is told now). From now on the writer sends nothing.
    pub(super) fn claim(&self) -> usize {
        match std::mem::replace(&mut *crate::lock(&self.state), HeldState::Claimed) {
            HeldState::Sent { n, untold } => {
                if let Some(w) = untold {
                    w.tell();
                }
                n
            }
            HeldState::Held { .. } | HeldState::Claimed => 0,
        }
    }

    /// True if the writer sent (some of) the frames; otherwise it must tell the waiter when
    /// it does.
    pub(super) fn sent_or_ask(&self) -> bool {
        match &mut *crate::lock(&self.state) {
            HeldState::Sent { .. } => true,
            HeldState::Held { quiet, .. } => {
                *quiet = false;
                false
            }
            HeldState::Claimed => false,
        }
    }
}

impl crate::audit::OnDurable for HeldSend {
    fn durable(&self, waiter: crate::audit::Waiter) -> Option<crate::audit::Waiter> {
        use std::os::fd::AsFd;
        let mut st = crate::lock(&self.state);
        let HeldState::Held { bytes, quiet } = &*st else {
            return Some(waiter);
        };
        let n = wire::send_now(self.fd.as_fd(), bytes);
        if *quiet && n == bytes.len() {
            *st = HeldState::Sent { n, untold: Some(waiter) };
            return None;
        }
        *st = HeldState::Sent { n, untold: None };
        Some(waiter)
    }
}

impl Relay {
    /// Submit the batch's statement records, back to back, and note them in the session's
    /// [`Inflight`](super::inflight::Inflight). With `writer_sends` the last record carries a
    /// [`HeldSend`] of the batch's frames (all of them held, nothing else of the session's
    /// outstanding). `client_open`: the client may still send (so the writer may keep quiet,
    /// see [`HeldState`]). False if a record was refused at once: the whole batch then
    /// stays held (and is refused by the caller).
    pub(super) fn submit_records(&mut self, batch: &mut Batch, writer_sends: bool, client_open: bool) -> bool {
        let records = std::mem::take(&mut batch.records);
        if records.is_empty() {
            batch.needs = self.last_seq;
            return true;
        }
        let held = match &self.upstream_fd {
            Some(fd) if writer_sends => {
                let len = batch.frames.iter().map(|(f, _)| f.raw.len()).sum();
                let mut bytes = BytesMut::with_capacity(len);
                append_unsent(&batch.frames, 0, &mut bytes);
                // Quiet only while the session still reads the client (which may owe the
                // Sync that makes Postgres answer).
                let quiet = client_open && !self.terminated;
                Some(Arc::new(HeldSend::new(fd.clone(), bytes.freeze(), quiet)))
            }
            _ => None,
        };
        let hook = held.clone().map(|h| h as Arc<dyn crate::audit::OnDurable>);
        let outcomes = self.shared.audit.submit_all(records, hook);
        let mut seqs = Vec::with_capacity(outcomes.len());
        let mut all_queued = true;
        for (rx, seq) in outcomes {
            match seq {
                Some(seq) => {
                    self.last_seq = self.last_seq.max(seq);
                    self.inflight.push(seq, rx);
                }
                None => all_queued = false,
            }
            seqs.push(seq.unwrap_or(0));
        }
        for p in batch.pendings.iter_mut() {
            if let Some(s) = seqs.get(p.rec_idx) {
                p.seq = *s;
            }
        }
        batch.needs = self.last_seq;
        if all_queued {
            batch.held = held;
        } else {
            batch.gate = Some((0, 0));
        }
        all_queued
    }

    /// The held frames may go (their records are durable), or the audit log refused a
    /// record (`Err`): forward them, or their statements replaced by failing markers.
    pub(super) fn release_batch(&mut self, mut b: Batch, result: Result<(), String>, uout: &mut BytesMut) {
        let sent = b.claim();
        let frames = std::mem::take(&mut b.frames);
        let mut pendings = std::mem::take(&mut b.pendings);
        let result = match result {
            Err(e) if sent > 0 => {
                // Cannot happen (the writer sends only what is durable), but the frames are
                // upstream: account for them as sent.
                tracing::error!(error = %e, "audit reported a failure for a batch already sent upstream");
                Ok(())
            }
            r => r,
        };
        match result {
            Ok(()) => {
                let now = Instant::now();
                for p in pendings.iter_mut() {
                    p.started = now;
                }
                self.inflight.forwarded(b.needs);
                append_unsent(&frames, sent, uout);
            }
            Err(e) => {
                tracing::error!(error = %e, "audit append failed; refusing statements");
                // The cause (with the audit directory's path) stays in pgward's log.
                let msg = "pgward: audit log unavailable, statement refused (the cause is in pgward's log)".to_string();
                for (f, pi) in &frames {
                    match pi {
                        Some(i) => {
                            let marker = match f.tag {
                                b'Q' => self.marker_query(),
                                b'E' => self.marker_execute(),
                                b'B' => self.marker_bind(),
                                b'P' => {
                                    let name = wire::decode_parse(f, self.watch.encoding()).map(|(n, _)| n.into_owned()).unwrap_or_default();
                                    self.marker_parse(&name)
                                }
                                _ => self.marker_function_call(),
                            };
                            if let Some(p) = pendings.get_mut(*i) {
                                p.refusal = Some((sqlstate::IO_ERROR, msg.clone()));
                            }
                            uout.extend_from_slice(&marker.raw);
                        }
                        None => uout.extend_from_slice(&f.raw),
                    }
                }
            }
        }
        self.tracker.expect(pendings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_writer_did_not_send_follows_in_order() {
        let frame = |s: &str| (Frame { tag: b'Q', raw: Bytes::copy_from_slice(s.as_bytes()) }, None);
        let frames = vec![frame("abc"), frame("de"), frame("fghi")];
        for (sent, want) in
            [(0, "abcdefghi"), (1, "bcdefghi"), (3, "defghi"), (4, "efghi"), (5, "fghi"), (8, "i"), (9, ""), (12, "")]
        {
            let mut out = BytesMut::from(&b">"[..]);
            append_unsent(&frames, sent, &mut out);
            assert_eq!(&out[..], format!(">{want}").as_bytes(), "sent {sent}");
        }
    }

    #[test]
    fn a_held_batch_claimed_first_is_never_sent() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let fd = Arc::new(std::os::fd::OwnedFd::from(a));
        let held = |s: &'static str, quiet: bool| HeldSend::new(fd.clone(), Bytes::from(s), quiet);
        use crate::audit::{OnDurable as _, Waiter};
        use std::io::Read as _;
        use tokio::sync::oneshot::error::TryRecvError;

        // Durable first, quiet: the writer sends it all and keeps the waiter untold; the
        // session's claim says what was sent and tells the waiter.
        let first = held("sent", true);
        let (w, mut rx) = Waiter::for_test(7);
        assert!(first.durable(w).is_none(), "kept");
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        assert!(first.sent_or_ask());
        assert_eq!(first.claim(), 4);
        assert_eq!(rx.try_recv().expect("told at the claim").expect("durable"), 7);
        let (w, _) = Waiter::for_test(8);
        assert!(first.durable(w).is_some(), "claimed: never again, the writer tells");

        // Not quiet (the client is gone), or asked to tell before the writer got to it: sent,
        // and the writer tells.
        for asked in [false, true] {
            let h = held("told", asked);
            if asked {
                assert!(!h.sent_or_ask(), "still held");
            }
            let (w, _) = Waiter::for_test(9);
            assert_eq!(h.durable(w).map(|w| w.seq()), Some(9));
            assert_eq!(h.claim(), 4);
        }

        // Claimed first (the session ended or was answered): nothing goes out, ever.
        let second = held("never", true);
        assert_eq!(second.claim(), 0);
        let (w, _) = Waiter::for_test(10);
        assert!(second.durable(w).is_some());
        // Every dup closed: the reader sees the end after what was sent.
        drop((fd, first, second));
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"senttoldtold");
    }
}
