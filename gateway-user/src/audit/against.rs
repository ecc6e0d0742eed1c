//! `verify --against`: compare the local log with a copy that left the host (what a syslog
//! receiver wrote, or JSON lines), record by record on `seq` and `hash`. Whoever holds the
//! checkpoint key can rewrite the local log so that `verify` alone passes — re-chained and
//! re-signed — but cannot change what was already exported: the first seq whose hash differs
//! is where the local log was rewritten.
//!
//! In the copy, every line holding a stored record (`{"seq":…` to the end of the line, as in
//! an RFC 5424 message or a JSON line) counts; other lines are skipped. A seq that is there
//! twice with the same hash is a copy (export is at least once); with different hashes the
//! copy itself is inconsistent. Each exported record's hash must recompute from its own bytes,
//! except for the stub a datagram export sends for a record too large for a datagram
//! (`{"seq":…,"kind":…,"hash":…,"oversize":…}`), whose hash is compared as it stands.

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead as _;
use std::path::Path;

use super::chain;
use super::reader::Reader;

/// Where a stored record starts in a line of the copy (records are written seq first).
const RECORD_START: &[u8] = b"{\"seq\":";

/// What a datagram export sends for a record too large for a datagram.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Stub {
    seq: u64,
    kind: String,
    hash: String,
    /// The record's size (required: it is what makes a line a stub).
    #[serde(rename = "oversize")]
    _oversize: u64,
}

/// One record of the copy.
#[derive(Debug, Clone)]
struct Exported {
    hash: String,
    kind: String,
    /// 1-based line in the copy.
    line: u64,
}

/// The records of an exported copy, by seq.
#[derive(Debug, Default)]
pub struct ExportedCopy {
    records: BTreeMap<u64, Exported>,
    /// Records that were there more than once (same hash).
    pub copies: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Bad { path: String, line: u64, reason: String },
}

impl ExportedCopy {
    /// Read the copy at `path`.
    pub fn load(path: &Path) -> Result<ExportedCopy, CopyError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| CopyError::Read { path: name.clone(), source })?;
        let mut copy = ExportedCopy::default();
        for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(|source| CopyError::Read { path: name.clone(), source })?;
            let no = i as u64 + 1;
            copy.add(&line, no).map_err(|reason| CopyError::Bad { path: name.clone(), line: no, reason })?;
        }
        Ok(copy)
    }

    /// Take the record in one line of the copy, if it holds one.
    fn add(&mut self, line: &[u8], no: u64) -> Result<(), String> {
        let Some(start) = line.windows(RECORD_START.len()).position(|w| w == RECORD_START) else { return Ok(()) };
        let raw = line[start..].trim_ascii_end();
        let (seq, new) = match serde_json::from_slice::<Stub>(raw) {
            Ok(stub) => (stub.seq, Exported { hash: stub.hash, kind: stub.kind, line: no }),
            Err(_) => {
                let rec: super::Record =
                    serde_json::from_slice(raw).map_err(|e| format!("a record that does not parse: {e}"))?;
                match chain::recompute(raw, &rec.prev_hash) {
                    Some((stored, computed)) if stored == computed => {}
                    _ => {
                        return Err(format!(
                            "seq {}: the exported record's hash does not recompute from its bytes (cut by the receiver? check its maximum message size)",
                            rec.seq
                        ));
                    }
                }
                (rec.seq, Exported { hash: rec.hash, kind: rec.kind.as_str().to_string(), line: no })
            }
        };
        self.add_record(seq, new)
    }

    fn add_record(&mut self, seq: u64, new: Exported) -> Result<(), String> {
        match self.records.get(&seq) {
            Some(old) if old.hash == new.hash => self.copies += 1,
            Some(old) => {
                return Err(format!(
                    "seq {seq} is in the copy twice with different hashes (line {} and this one)",
                    old.line
                ));
            }
            None => {
                self.records.insert(seq, new);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// The outcome of a comparison.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Records found on both sides with the same hash.
    pub matched: u64,
    /// Of those, checkpoints.
    pub checkpoints: u64,
    /// The first and last seq of the copy.
    pub first_exported: Option<u64>,
    pub last_exported: Option<u64>,
    /// Local records after the copy's last one (not exported yet when the copy was taken).
    pub not_yet_exported: u64,
    /// Local records before the copy's first one.
    pub before_copy: u64,
    /// The first divergence: its seq and what differs.
    pub divergence: Option<(u64, String)>,
}

impl Comparison {
    pub fn is_ok(&self) -> bool {
        self.divergence.is_none()
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((seq, reason)) = &self.divergence {
            return write!(f, "export DIVERGES at seq {seq}: {reason}");
        }
        write!(f, "export matches: {} records ({} checkpoints)", self.matched, self.checkpoints)?;
        if let (Some(a), Some(b)) = (self.first_exported, self.last_exported) {
            write!(f, " compared, seq {a}..{b}")?;
        }
        if self.before_copy > 0 {
            write!(f, "; {} local records before the copy starts", self.before_copy)?;
        }
        if self.not_yet_exported > 0 {
            write!(f, "; {} local records after it (not exported yet)", self.not_yet_exported)?;
        }
        Ok(())
    }
}

/// Compare the log in `dir` with `copy`; stops at the first divergence.
pub fn compare(dir: &Path, copy: &ExportedCopy) -> Result<Comparison, String> {
    let mut out = Comparison {
        first_exported: copy.records.keys().next().copied(),
        last_exported: copy.records.keys().next_back().copied(),
        ..Comparison::default()
    };
    let (Some(first), Some(last)) = (out.first_exported, out.last_exported) else {
        out.divergence = Some((0, "the copy holds no audit records".into()));
        return Ok(out);
    };
    let mut reader = Reader::open(dir).map_err(|e| e.to_string())?;
    let mut local_last = 0u64;
    for entry in reader.by_ref() {
        let entry = entry.map_err(|e| e.to_string())?;
        let (seq, hash) = (entry.record.seq, &entry.record.hash);
        local_last = seq;
        if seq < first {
            out.before_copy += 1;
            continue;
        }
        if seq > last {
            out.not_yet_exported += 1;
            continue;
        }
        match copy.records.get(&seq) {
            None => {
                out.divergence =
                    Some((seq, format!("in the local log ({}) but not in the copy", entry.line.location())));
                return Ok(out);
            }
            Some(e) if &e.hash != hash => {
                out.divergence = Some((
                    seq,
                    format!(
                        "the local record ({}, {}, hash {hash}) differs from the exported one (line {}, {}, hash {}): the local log was rewritten after export",
                        entry.line.location(),
                        entry.record.kind.as_str(),
                        e.line,
                        e.kind,
                        e.hash
                    ),
                ));
                return Ok(out);
            }
            Some(e) => {
                out.matched += 1;
                if e.kind == super::Kind::Checkpoint.as_str() {
                    out.checkpoints += 1;
                }
            }
        }
    }
    if let Some((&seq, e)) = copy.records.range(local_last + 1..).next() {
        out.divergence = Some((
            seq,
            format!(
                "in the copy (line {}, {}) but not in the local log, which ends at seq {local_last}: the local log was cut",
                e.line, e.kind
            ),
        ));
    }
    Ok(out)
}
