//! The session's statement records not yet known durable, and the server's replies held
//! until they are ([`super::durability`]: no reply reaches the client before the records of
//! the statements sent ahead of it are durable).
//!
//! Records become durable in seq order, so one number says how far the session is:
//! `confirmed`, the seq up to which every record of this session was answered durable.
//! Replies read from the server while a statement forwarded ahead of them has a record above
//! it wait in `held` (the session then stops reading the server past its high-water mark:
//! a large result is never buffered whole). Outcomes are taken as they arrive without
//! waiting ([`Inflight::poll_ready`]); the session waits for one ([`Inflight::next`]) only
//! when something is held.

use std::collections::VecDeque;

use bytes::BytesMut;
use tokio::sync::oneshot;

use crate::audit::{AuditError, Outcome};

/// A record the audit log refused.
#[derive(Debug)]
pub(super) struct Failure {
    /// Its statement already went upstream (its effect may be under way): the session must
    /// end, and its open transaction with it. Otherwise nothing of it was sent.
    pub(super) forwarded: bool,
    pub(super) error: String,
}

#[derive(Default)]
pub(super) struct Inflight {
    /// Submitted records, in seq order, not yet answered.
    records: VecDeque<(u64, Outcome)>,
    /// Every record of the session up to this seq is durable.
    confirmed: u64,
    /// The highest seq of a record whose statement went upstream.
    forwarded: u64,
    /// Server bytes waiting for `held_needs` to be confirmed.
    held: BytesMut,
    held_needs: u64,
    /// A refusal taken in and not yet dealt with: nothing after it is taken in meanwhile (a
    /// later record may reuse its seq once the log rolled back).
    failure: Option<Failure>,
}

impl Inflight {
    /// A record submitted as `seq`.
    pub(super) fn push(&mut self, seq: u64, outcome: Outcome) {
        self.records.push_back((seq, outcome));
    }

    /// The statement of record `seq` went upstream.
    pub(super) fn forwarded(&mut self, seq: u64) {
        self.forwarded = self.forwarded.max(seq);
    }

    /// Every record of the session up to `seq` is durable.
    pub(super) fn confirmed(&self, seq: u64) -> bool {
        seq <= self.confirmed
    }

    /// No record is waiting for its outcome.
    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Take the outcomes already there, in order, without waiting; a refusal stops there
    /// and waits for [`Inflight::take_failure`].
    pub(super) fn poll_ready(&mut self) {
        while self.failure.is_none()
            && let Some((seq, rx)) = self.records.front_mut()
        {
            let seq = *seq;
            match rx.try_recv() {
                Ok(r) => self.answered(seq, r),
                Err(oneshot::error::TryRecvError::Empty) => break,
                Err(oneshot::error::TryRecvError::Closed) => self.answered(seq, Err(AuditError::Closed)),
            }
        }
    }

    /// Wait for the oldest unanswered record's outcome (pending forever when there is none,
    /// or while a refusal waits to be dealt with).
    pub(super) async fn next(&mut self) {
        if self.failure.is_some() {
            return std::future::pending().await;
        }
        let Some((seq, rx)) = self.records.front_mut() else { return std::future::pending().await };
        let seq = *seq;
        let r = rx.await.unwrap_or(Err(AuditError::Closed));
        self.answered(seq, r);
    }

    /// The refusal taken in, if any.
    pub(super) fn take_failure(&mut self) -> Option<Failure> {
        self.failure.take()
    }

    fn answered(&mut self, seq: u64, r: Result<u64, AuditError>) {
        self.records.pop_front();
        match r {
            Ok(_) => self.confirmed = self.confirmed.max(seq),
            Err(e) => self.failure = Some(Failure { forwarded: seq <= self.forwarded, error: e.to_string() }),
        }
    }

    /// Every record up to `seq` is known durable by other means (the writer ran a hook of
    /// the last of them): their outcomes need not be waited for.
    pub(super) fn durable_through(&mut self, seq: u64) {
        while self.records.front().is_some_and(|(s, _)| *s <= seq) {
            self.records.pop_front();
        }
        self.confirmed = self.confirmed.max(seq);
    }

    /// Forget the records still waiting (after a failure: none of them will be confirmed).
    pub(super) fn clear(&mut self) {
        self.records.clear();
    }

    /// Server bytes read now may go straight to the client: nothing is held, and every
    /// statement forwarded so far has a durable record.
    pub(super) fn replies_ready(&self) -> bool {
        self.held.is_empty() && self.forwarded <= self.confirmed
    }

    /// The buffer for server bytes that must wait (give it back with [`Inflight::put_held`]).
    pub(super) fn take_held(&mut self) -> BytesMut {
        self.held_needs = self.held_needs.max(self.forwarded);
        std::mem::take(&mut self.held)
    }

    pub(super) fn put_held(&mut self, held: BytesMut) {
        self.held = held;
    }

    /// Bytes held for the client.
    pub(super) fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Something waits for a record's outcome: held replies.
    pub(super) fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Move the held replies to `cout` once their records are durable.
    pub(super) fn release_replies(&mut self, cout: &mut BytesMut) {
        if self.held.is_empty() || self.held_needs > self.confirmed {
            return;
        }
        if cout.is_empty() {
            std::mem::swap(cout, &mut self.held);
        } else {
            cout.extend_from_slice(&self.held);
            self.held.clear();
        }
    }

    /// Drop the held replies unsent (their records failed, or the session ends).
    pub(super) fn drop_replies(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> (oneshot::Sender<Result<u64, AuditError>>, Outcome) {
        oneshot::channel()
    }

    #[test]
    fn replies_wait_for_every_record_forwarded_before_them() {
        let mut i = Inflight::default();
        let (tx1, rx1) = outcome();
        let (tx2, rx2) = outcome();
        i.push(1, rx1);
        i.push(2, rx2);
        i.forwarded(2);
        assert!(!i.replies_ready());
        let mut h = i.take_held();
        h.extend_from_slice(b"rows");
        i.put_held(h);
        let mut cout = BytesMut::new();
        tx1.send(Ok(1)).expect("send");
        i.poll_ready();
        i.release_replies(&mut cout);
        assert!(cout.is_empty(), "record 2 is not durable yet");
        tx2.send(Ok(2)).expect("send");
        i.poll_ready();
        assert!(i.take_failure().is_none());
        i.release_replies(&mut cout);
        assert_eq!(&cout[..], b"rows");
        assert!(i.replies_ready() && i.is_empty());
    }

    #[test]
    fn a_failure_says_whether_its_statement_went_upstream() {
        let mut i = Inflight::default();
        let (tx1, rx1) = outcome();
        let (tx2, rx2) = outcome();
        let (tx3, rx3) = outcome();
        i.push(1, rx1);
        i.push(2, rx2);
        i.push(3, rx3);
        i.forwarded(1);
        tx1.send(Err(AuditError::Closed)).expect("send");
        tx2.send(Ok(2)).expect("send");
        i.poll_ready();
        i.poll_ready();
        assert!(!i.confirmed(2), "nothing is taken in past a refusal");
        let f = i.take_failure().expect("failed");
        assert!(f.forwarded);
        i.poll_ready();
        assert!(i.confirmed(2));
        drop(tx3);
        i.poll_ready();
        let f = i.take_failure().expect("writer gone");
        assert!(!f.forwarded, "record 3's statement was held");
    }
}
