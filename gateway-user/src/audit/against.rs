//! `verify --against`: compare the local log with a copy that left the host (what a syslog
//! receiver wrote, or JSON lines), record by record on `seq` and `hash`. Whoever holds the
//! checkpoint key can rewrite the local log so that `verify` alone passes — re-chained and
//! re-signed — but cannot change what was already exported: the first seq whose hash differs
//! is where the local log was rewritten.
//!
//! In the copy, every line holding a stored record (`{"seq":…` to the end of the line, as in
//! an RFC 5424 message or a JSON line) counts; other lines are skipped. Each exported record's
//! hash must recompute from its own bytes, except for the stub a datagram export sends for a
//! record too large for a datagram (`{"seq":…,"kind":…,"hash":…,"oversize":…}`), whose hash is
//! compared as it stands. A seq that is there twice with the same hash is a copy (export is at
//! least once).
//!
//! The receiver takes messages from anyone who can reach it (any local user can log as
//! `pgward`), so lines in the copy are not all pgward's. What pgward sent is chained and
//! signed: a record is *vouched for* when a checkpoint of the copy whose signature verifies
//! with the checkpoint JWKS reaches it through the copy's `prev_hash` links — forging one
//! needs the record's own bytes or the checkpoint key. Where the copy holds several versions
//! of a seq, the one vouched for is compared and the others are listed as foreign; with none
//! or several vouched for, the copy is ambiguous there (a divergence). Lines that do not parse
//! or whose hash does not recompute are listed, and count as a divergence only where the copy
//! has no readable version of a local record they claim. Records after the local log's end
//! count (a cut log) when vouched for or continuing the local chain; others are foreign.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::BufRead as _;
use std::path::Path;

use super::chain;
use super::reader::Reader;
use super::verify::{PublicKeys, check_signature};

/// Where a stored record starts in a line of the copy (records are written seq first).
const RECORD_START: &[u8] = b"{\"seq\":";

/// How many line numbers of foreign or unreadable lines the summary names.
const LINES_NAMED: usize = 5;

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

/// A checkpoint's signed statement: the seq and hash it anchors, and its signature.
#[derive(Debug, Clone)]
struct Signed {
    anchor_seq: u64,
    anchor_hash: String,
    kid: Option<String>,
    sig: Option<String>,
}

/// One version of a record in the copy.
#[derive(Debug, Clone)]
struct Exported {
    hash: String,
    kind: String,
    /// 1-based line in the copy (the first that held this version).
    line: u64,
    /// The record's link to the one before it (stubs carry none).
    prev_hash: Option<String>,
    /// For a checkpoint record: what it signs.
    signed: Option<Signed>,
    /// Reached from a checkpoint of the copy with a valid signature (see [`ExportedCopy::vouch`]).
    vouched: bool,
}

/// A line of the copy that claims to hold a record but cannot be one of pgward's.
#[derive(Debug, Clone)]
struct Unreadable {
    line: u64,
    /// The seq its text starts with, if it has one.
    seq: Option<u64>,
    reason: String,
}

/// The records of an exported copy, by seq.
#[derive(Debug, Default)]
pub struct ExportedCopy {
    /// Every distinct version (by hash) of each seq, in the order first seen.
    records: BTreeMap<u64, Vec<Exported>>,
    unreadable: Vec<Unreadable>,
    /// Records that were there more than once (same hash).
    pub copies: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
}

impl ExportedCopy {
    /// Read the copy at `path` and find which of its records `keys` vouch for.
    pub fn load(path: &Path, keys: &PublicKeys) -> Result<ExportedCopy, CopyError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| CopyError::Read { path: name.clone(), source })?;
        let mut copy = ExportedCopy::default();
        for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
            let line = line.map_err(|source| CopyError::Read { path: name.clone(), source })?;
            copy.add(&line, i as u64 + 1);
        }
        copy.vouch(keys);
        Ok(copy)
    }

    /// Take the record in one line of the copy, if it holds one.
    fn add(&mut self, line: &[u8], no: u64) {
        let Some(start) = line.windows(RECORD_START.len()).position(|w| w == RECORD_START) else { return };
        let raw = line[start..].trim_ascii_end();
        match parse_exported(raw, no) {
            Ok((seq, new)) => self.add_record(seq, new),
            Err(reason) => self.unreadable.push(Unreadable { line: no, seq: claimed_seq(raw), reason }),
        }
    }

    fn add_record(&mut self, seq: u64, new: Exported) {
        let versions = self.records.entry(seq).or_default();
        if versions.iter().any(|v| v.hash == new.hash) {
            self.copies += 1;
        } else {
            versions.push(new);
        }
    }

    /// Mark what the copy's validly signed checkpoints reach: the record each anchors (the
    /// version with the signed hash), then, through `prev_hash`, the versions before it.
    fn vouch(&mut self, keys: &PublicKeys) {
        let starts: Vec<(u64, String)> = self
            .records
            .iter()
            .flat_map(|(&seq, versions)| versions.iter().map(move |v| (seq, v)))
            .filter_map(|(seq, v)| {
                let s = v.signed.as_ref()?;
                let valid = s.anchor_seq.checked_add(1) == Some(seq)
                    && check_signature(keys, s.kid.as_deref(), s.sig.as_deref(), s.anchor_seq, &s.anchor_hash).is_ok();
                valid.then(|| (s.anchor_seq, s.anchor_hash.clone()))
            })
            .collect();
        for (mut seq, mut hash) in starts {
            while let Some(v) = self.records.get_mut(&seq).and_then(|vs| vs.iter_mut().find(|v| v.hash == hash)) {
                if v.vouched {
                    break;
                }
                v.vouched = true;
                let (Some(prev), Some(before)) = (v.prev_hash.clone(), seq.checked_sub(1)) else { break };
                (seq, hash) = (before, prev);
            }
        }
    }

    /// The version of `seq` to compare: the only one, or the only one vouched for;
    /// `Err` names the versions when the copy is ambiguous.
    fn chosen(&self, seq: u64) -> Option<Result<&Exported, String>> {
        let versions = self.records.get(&seq)?;
        if let [only] = versions.as_slice() {
            return Some(Ok(only));
        }
        let vouched: Vec<&Exported> = versions.iter().filter(|v| v.vouched).collect();
        Some(match vouched.as_slice() {
            [one] => Ok(*one),
            _ => Err(format!(
                "the copy holds {} versions of this record (lines {}) and {} of them vouched for by a signed checkpoint of the copy",
                versions.len(),
                versions.iter().map(|v| v.line.to_string()).collect::<Vec<_>>().join(", "),
                if vouched.is_empty() { "none".to_string() } else { format!("{}", vouched.len()) }
            )),
        })
    }

    /// Lines of the copy that are not compared: versions beside the one vouched for, and
    /// unreadable lines.
    fn foreign_lines(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .records
            .values()
            .filter(|vs| vs.len() > 1 && vs.iter().filter(|v| v.vouched).count() == 1)
            .flat_map(|vs| vs.iter().filter(|v| !v.vouched).map(|v| v.line))
            .collect();
        out.extend(self.unreadable.iter().map(|u| u.line));
        out.sort_unstable();
        out
    }

    /// Distinct seqs in the copy.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// A record or a datagram stub from the text of one line of the copy.
fn parse_exported(raw: &[u8], no: u64) -> Result<(u64, Exported), String> {
    if let Ok(stub) = serde_json::from_slice::<Stub>(raw) {
        let e = Exported { hash: stub.hash, kind: stub.kind, line: no, prev_hash: None, signed: None, vouched: false };
        return Ok((stub.seq, e));
    }
    let rec: super::Record = serde_json::from_slice(raw).map_err(|e| format!("a record that does not parse: {e}"))?;
    match chain::recompute(raw, &rec.prev_hash) {
        Some((stored, computed)) if stored == computed => {}
        _ => {
            return Err(format!(
                "seq {}: the exported record's hash does not recompute from its bytes (cut by the receiver? check its maximum message size)",
                rec.seq
            ));
        }
    }
    let signed = (rec.kind == super::Kind::Checkpoint).then(|| Signed {
        anchor_seq: rec.anchor_seq.unwrap_or(0),
        anchor_hash: rec.anchor_hash.clone().unwrap_or_default(),
        kid: rec.kid.clone(),
        sig: rec.sig.clone(),
    });
    let e = Exported {
        hash: rec.hash,
        kind: rec.kind.as_str().to_string(),
        line: no,
        prev_hash: Some(rec.prev_hash),
        signed,
        vouched: false,
    };
    Ok((rec.seq, e))
}

/// The seq a line's text starts with (`{"seq":N`), for naming an unreadable line.
fn claimed_seq(raw: &[u8]) -> Option<u64> {
    let digits = raw.get(RECORD_START.len()..)?;
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..n]).ok()?.parse().ok()
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
    /// Lines of the copy that are not pgward's records (see the module doc), in order.
    pub foreign_lines: Vec<u64>,
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
            write!(f, "export DIVERGES at seq {seq}: {reason}")?;
        } else {
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
        }
        if !self.foreign_lines.is_empty() {
            let named: Vec<String> = self.foreign_lines.iter().take(LINES_NAMED).map(u64::to_string).collect();
            let more = self.foreign_lines.len().saturating_sub(LINES_NAMED);
            write!(
                f,
                "; {} lines of the copy are not pgward's records (unreadable, or neither signed nor chained by pgward: written to the receiver by someone else), not compared: line {}{}",
                self.foreign_lines.len(),
                named.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            )?;
        }
        Ok(())
    }
}

/// Compare the log in `dir` with `copy`; stops at the first divergence.
pub fn compare(dir: &Path, copy: &ExportedCopy) -> Result<Comparison, String> {
    let mut out = Comparison {
        first_exported: copy.records.keys().next().copied(),
        last_exported: copy.records.keys().next_back().copied(),
        foreign_lines: copy.foreign_lines(),
        ..Comparison::default()
    };
    let (Some(first), Some(last)) = (out.first_exported, out.last_exported) else {
        out.divergence = Some((0, "the copy holds no audit records".into()));
        return Ok(out);
    };
    let mut reader = Reader::open(dir).map_err(|e| e.to_string())?;
    let (mut local_last, mut local_last_hash) = (0u64, String::new());
    for entry in reader.by_ref() {
        let entry = entry.map_err(|e| e.to_string())?;
        let (seq, hash) = (entry.record.seq, &entry.record.hash);
        local_last = seq;
        local_last_hash.clone_from(hash);
        if seq < first {
            out.before_copy += 1;
            continue;
        }
        if seq > last {
            out.not_yet_exported += 1;
            continue;
        }
        if let Some(reason) = differs(copy, &entry, &mut out) {
            out.divergence = Some((seq, reason));
            return Ok(out);
        }
    }
    out.divergence = beyond_local_end(copy, local_last, &local_last_hash);
    if out.divergence.is_none() {
        let past_end = copy.records.range(local_last + 1..).flat_map(|(_, vs)| vs.iter().map(|v| v.line));
        out.foreign_lines.extend(past_end);
        out.foreign_lines.sort_unstable();
    }
    Ok(out)
}

/// Why the copy's version of the local record `entry` differs from it (`None`: it matches,
/// counted in `out`).
fn differs(copy: &ExportedCopy, entry: &super::reader::Entry, out: &mut Comparison) -> Option<String> {
    let (seq, hash) = (entry.record.seq, &entry.record.hash);
    let e = match copy.chosen(seq) {
        None => {
            let why = match copy.unreadable.iter().find(|u| u.seq == Some(seq)) {
                Some(u) => format!("the copy's line {} claiming it is unreadable: {}", u.line, u.reason),
                None => "not in the copy".to_string(),
            };
            return Some(format!("in the local log ({}) but {why}", entry.line.location()));
        }
        Some(Err(ambiguous)) => return Some(ambiguous),
        Some(Ok(e)) => e,
    };
    if &e.hash != hash {
        return Some(format!(
            "the local record ({}, {}, hash {hash}) differs from the exported one (line {}, {}, hash {}{}): the local log was rewritten after export",
            entry.line.location(),
            entry.record.kind.as_str(),
            e.line,
            e.kind,
            e.hash,
            if e.vouched { "" } else { ", not vouched for by a signed checkpoint of the copy" }
        ));
    }
    out.matched += 1;
    if e.kind == super::Kind::Checkpoint.as_str() {
        out.checkpoints += 1;
    }
    None
}

/// The first record of the copy after the local log's end that is pgward's — vouched for, or
/// continuing the local chain (a record after it in the copy links back to its last record):
/// the local log was cut there. Other records past the end are foreign.
fn beyond_local_end(copy: &ExportedCopy, local_last: u64, local_last_hash: &str) -> Option<(u64, String)> {
    let continues: BTreeSet<u64> = copy
        .records
        .get(&(local_last + 1))
        .into_iter()
        .flatten()
        .filter(|v| local_last == 0 || v.prev_hash.as_deref() == Some(local_last_hash))
        .map(|_| local_last + 1)
        .collect();
    copy.records.range(local_last + 1..).find_map(|(&seq, versions)| {
        let e = versions.iter().find(|v| v.vouched || continues.contains(&seq))?;
        Some((
            seq,
            format!(
                "in the copy (line {}, {}) but not in the local log, which ends at seq {local_last}: the local log was cut",
                e.line, e.kind
            ),
        ))
    })
}
