//! A batch of client frames held until its statement records are durable, and the hand-over
//! that lets the audit writer thread send it upstream itself.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Pending;
use crate::audit::{AuditError, Record};
use crate::wire::{self, Frame};

/// Client frames read in one go, waiting for their statement records to be durable.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) frames: Vec<(Frame, Option<usize>)>,
    pub(super) pendings: Vec<Pending>,
    /// Statement records, submitted together once the batch is complete.
    pub(super) records: Vec<Record>,
    pub(super) receivers: Vec<tokio::sync::oneshot::Receiver<Result<u64, AuditError>>>,
    /// The frames, handed to the audit writer to send once the last record is durable.
    pub(super) held: Option<Arc<HeldSend>>,
    /// Bytes the writer sent, once claimed.
    pub(super) sent: usize,
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
    /// (submitted with the rest by `submit_records`) and what it waits for from the server.
    pub(super) fn push_statement(&mut self, frame: Frame, rec: Record, mut p: Pending) {
        self.records.push(rec);
        p.rec_idx = self.records.len() - 1;
        self.frames.push((frame, Some(self.pendings.len())));
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

