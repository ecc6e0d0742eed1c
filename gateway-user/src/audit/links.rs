//! The chain as `tail` and `replay` read it: each record's seq follows the one before (from
//! seq 1), its hash recomputes from its bytes, its `prev_hash` is the previous record's hash,
//! and a checkpoint anchors the record before it with a signature the checkpoint JWKS
//! verifies. They print records as they read them, so a record someone edited, inserted or
//! removed would otherwise be shown like any other: they say where the chain breaks and exit
//! 1. `verify` checks this and more (HEAD, the runs without a checkpoint).

use super::chain::{self, GENESIS_HASH};
use super::reader::Line;
use super::record::{Kind, Record};
use super::verify::{PublicKeys, check_signature};

/// Follows the chain line by line; remembers the first break.
pub struct LinkCheck {
    keys: Option<PublicKeys>,
    expected: u64,
    prev_hash: String,
    broken: Option<String>,
}

impl LinkCheck {
    /// A check from the log's first record; checkpoint signatures are checked when `keys`
    /// holds the checkpoint JWKS.
    pub fn new(keys: Option<PublicKeys>) -> LinkCheck {
        LinkCheck { keys, expected: 1, prev_hash: GENESIS_HASH.to_owned(), broken: None }
    }

    /// Check the next record read. Returns the problem at the first record that breaks the
    /// chain (`seq N (file:line): reason`); nothing after that, the chain being broken.
    pub fn next(&mut self, line: &Line, rec: &Record) -> Option<&str> {
        if self.broken.is_some() {
            return None;
        }
        if let Err(reason) = self.link(line, rec) {
            self.broken = Some(format!("seq {} ({}): {reason}", rec.seq, line.location()));
            return self.broken.as_deref();
        }
        self.expected = rec.seq + 1;
        self.prev_hash.clone_from(&rec.hash);
        None
    }

    /// The first break found, if any.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn link(&self, line: &Line, rec: &Record) -> Result<(), String> {
        if rec.seq != self.expected {
            return Err(format!("expected seq {}: records were removed, inserted or reordered", self.expected));
        }
        match chain::recompute(&line.raw, &rec.prev_hash) {
            Some((stored, computed)) if stored == computed => {}
            _ => return Err("its hash does not match its bytes: the record was altered".into()),
        }
        if rec.prev_hash != self.prev_hash {
            return Err("its prev_hash is not the hash of the record before it".into());
        }
        if rec.kind != Kind::Checkpoint {
            return Ok(());
        }
        let (anchor_seq, anchor_hash) = (rec.anchor_seq.unwrap_or(0), rec.anchor_hash.as_deref().unwrap_or(""));
        if anchor_seq + 1 != rec.seq || anchor_hash != self.prev_hash {
            return Err("the checkpoint does not anchor the record before it".into());
        }
        match &self.keys {
            Some(keys) => check_signature(keys, rec.kid.as_deref(), rec.sig.as_deref(), anchor_seq, anchor_hash),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::reader::Reader;
    use crate::audit::tests::{keys, opts, records, stmt};

    fn check(dir: &std::path::Path) -> Option<String> {
        let mut c = LinkCheck::new(Some(keys()));
        for e in Reader::open(dir).expect("open") {
            let e = e.expect("a record");
            c.next(&e.line, &e.record);
        }
        c.broken().map(str::to_owned)
    }

    /// A real log passes; an edited record, a removed one, and a re-chained edit (caught at the
    /// checkpoint whose anchor no longer matches) are named.
    #[test]
    fn edits_and_removals_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let h = crate::audit::AuditHandle::start(opts(d, 4)).expect("start");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        for i in 0..6 {
            rt.block_on(h.append_durable(stmt(i))).expect("append");
        }
        h.shutdown();
        assert_eq!(check(d), None);
        let seg = d.join(chain::segment_name(1));
        let text = std::fs::read_to_string(&seg).expect("read");
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replacen("SELECT 2", "SELECT 9", 1);
        std::fs::write(&seg, &edited).expect("write");
        let p = check(d).expect("an edit");
        assert!(p.starts_with("seq 4 (") && p.contains("the record was altered"), "{p}");

        let removed: String = lines.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, l)| format!("{l}\n")).collect();
        std::fs::write(&seg, &removed).expect("write");
        let p = check(d).expect("a removal");
        assert!(p.starts_with("seq 4 (") && p.contains("expected seq 3"), "{p}");

        // Re-chained from the edit on (no key needed), the checkpoint after it left as it was.
        std::fs::write(&seg, &text).expect("write");
        let recs = records(d);
        let mut prev = chain::GENESIS_HASH.to_string();
        let mut out = String::new();
        for (i, mut r) in recs.into_iter().enumerate() {
            if i == 3 {
                r.sql = Some("SELECT 9".into());
            }
            r.prev_hash = prev.clone();
            r.hash.clear();
            let c = serde_json::to_string(&r).expect("ser");
            let h = chain::chain_hash(prev.as_bytes(), c.as_bytes(), b"");
            prev = String::from_utf8_lossy(&h).into_owned();
            out.push_str(&format!("{},\"hash\":\"{prev}\"}}\n", &c[..c.len() - 1]));
        }
        std::fs::write(&seg, &out).expect("write");
        let p = check(d).expect("a re-chained edit");
        assert!(p.contains("does not anchor") || p.contains("signature"), "{p}");
    }
}
