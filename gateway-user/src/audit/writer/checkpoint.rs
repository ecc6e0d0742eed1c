//! Checkpoints: a signed record anchoring the chain, written every `checkpoint_every` records
//! or `checkpoint_interval`, and named by HEAD once durable.

use std::time::Instant;

use super::log::Log;
use super::ts::now_ts;
use crate::audit::chain::Head;
use crate::audit::record::{Kind, Record};

impl Log {
    /// When an interval checkpoint is due (None: none needed).
    pub(super) fn checkpoint_due_at(&self) -> Option<Instant> {
        if self.signer.is_none() || self.since_ckpt == 0 {
            return None;
        }
        Some(self.last_ckpt_at + self.checkpoint_interval)
    }

    /// The HEAD to write, once the checkpoint it names is durable.
    pub(super) fn due_head(&mut self) -> Option<Head> {
        if self.head.as_ref().is_some_and(|h| h.seq <= self.durable.seq) { self.head.take() } else { None }
    }

    /// Queue a checkpoint anchoring the record just encoded; HEAD will name it once durable.
    pub(super) fn encode_checkpoint(&mut self) {
        let Some(signer) = self.signer.as_ref() else { return };
        let anchor_seq = self.next_seq - 1;
        let anchor_hash = self.prev_hash.clone();
        let sig = signer.sign(anchor_seq, &anchor_hash);
        let kid = signer.kid().to_owned();
        let ts = now_ts(&mut self.ts_cache);
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
                self.stretch_from = None;
                self.last_ckpt_at = Instant::now();
                self.push(seq, None, None, hash);
                self.head = Some(Head {
                    seq,
                    hash: String::from_utf8_lossy(&hash).into_owned(),
                    anchor_seq,
                    anchor_hash,
                    sig,
                    kid,
                    ts,
                });
            }
            Err(e) => {
                self.last_ckpt_at = Instant::now();
                tracing::error!("audit: encoding checkpoint failed: {e}");
            }
        }
    }
}
