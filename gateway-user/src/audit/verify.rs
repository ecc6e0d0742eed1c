//! `verify`: walk the whole log and report the first record that breaks the chain.
//!
//! Checks, in order, per line: it is complete and parses; its seq is the previous seq + 1
//! (starting at 1, across segments); its hash recomputes from its bytes; its prev_hash is
//! the previous record's hash (64 zeros for seq 1); the first record of a segment has the
//! seq the segment's name announces; a checkpoint anchors the record before it and its
//! signature verifies with the JWKS key named by its kid. Finally `HEAD` (the latest
//! checkpoint, if present) must name a record that exists with the same hash and carry a
//! valid signature, which detects a cut-off tail up to that checkpoint. A segment followed by
//! another holds nothing but NULs after its first NUL (see [`Reader::cut_short`]).
//!
//! Because HEAD can be rebuilt from any checkpoint record without the key, the log must also
//! look like what a running writer leaves (see [`Policy`]): HEAD exists once the log holds a
//! checkpoint and names the newest one (lagging only by checkpoints written moments ago); no
//! stretch of records without a checkpoint is longer than `checkpoint_every` records or
//! `checkpoint_interval` of record time (plus [`TIME_GRACE`]) — the unanchored tail
//! included. A `start` record restarts the clock (the writer was down in between); one that
//! says the previous run's HEAD named a checkpoint the log no longer held fails.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};

use super::chain::{self, GENESIS_HASH, HEAD_FILE, Head};
use super::reader::{Line, Reader};
use super::record::{Kind, Record};

/// Ed25519 public keys by `kid`.
pub type PublicKeys = HashMap<String, VerifyingKey>;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read JWKS {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid JWKS {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// The OKP/Ed25519 keys of a JWKS file (other key types are ignored).
pub fn load_jwks_ed25519(path: &Path) -> Result<PublicKeys, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read { path: path.to_owned(), source })?;
    parse_jwks_ed25519(&text).map_err(|reason| JwksError::Invalid { path: path.to_owned(), reason })
}

/// The OKP/Ed25519 keys of a JWKS document `{"keys":[{"kty":"OKP","crv":"Ed25519","x":…,"kid":…}]}`.
pub fn parse_jwks_ed25519(json: &str) -> Result<PublicKeys, String> {
    let doc: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let keys = doc.get("keys").and_then(|k| k.as_array()).ok_or_else(|| "no \"keys\" array".to_string())?;
    let mut out = PublicKeys::new();
    for k in keys {
        let field = |name: &str| k.get(name).and_then(|v| v.as_str());
        if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
            continue;
        }
        let kid = field("kid").ok_or_else(|| "Ed25519 key without kid".to_string())?;
        let x = field("x").ok_or_else(|| format!("key {kid:?}: no \"x\""))?;
        let bytes = decode_b64url(x).ok_or_else(|| format!("key {kid:?}: \"x\" is not base64url"))?;
        let raw: [u8; 32] =
            bytes.as_slice().try_into().map_err(|_| format!("key {kid:?}: \"x\" is {} bytes, not 32", bytes.len()))?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|e| format!("key {kid:?}: {e}"))?;
        out.insert(kid.to_owned(), key);
    }
    Ok(out)
}

fn decode_b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Check a checkpoint signature; `Err` says why it is not acceptable.
pub fn check_signature(
    keys: &PublicKeys,
    kid: Option<&str>,
    sig: Option<&str>,
    anchor_seq: u64,
    anchor_hash: &str,
) -> Result<(), String> {
    let kid = kid.ok_or("checkpoint has no kid")?;
    let key = keys.get(kid).ok_or_else(|| {
        let mut known: Vec<&str> = keys.keys().map(String::as_str).collect();
        known.sort_unstable();
        format!(
            "checkpoint signed by unknown key kid {kid:?}; the checkpoint JWKS holds {}: the log was signed with another key (not the one audit.checkpoint_jwks publishes)",
            if known.is_empty() { "no key".to_string() } else { format!("kid {}", known.join(", ")) }
        )
    })?;
    let sig = sig.ok_or("checkpoint has no signature")?;
    let bytes = decode_b64url(sig).ok_or("checkpoint signature is not base64url")?;
    let sig = Signature::from_slice(&bytes).map_err(|_| "checkpoint signature has the wrong length".to_string())?;
    let msg = chain::checkpoint_message(anchor_seq, anchor_hash);
    key.verify_strict(msg.as_bytes(), &sig).map_err(|_| {
        format!("checkpoint signature does not verify (kid {kid:?}): signed with another key than the one the checkpoint JWKS holds, or altered")
    })
}

/// How often the writer checkpoints, which bounds what `verify` accepts as a stretch without a
/// checkpoint. `pgward audit verify --config` takes it from `[audit]`; [`Policy::default`] is the
/// config's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            checkpoint_every: crate::config::DEFAULT_CHECKPOINT_EVERY,
            checkpoint_interval: crate::config::DEFAULT_CHECKPOINT_INTERVAL,
        }
    }
}

impl Policy {
    pub fn from_config(cfg: &crate::config::Config) -> Policy {
        Policy { checkpoint_every: cfg.audit.checkpoint_every, checkpoint_interval: cfg.audit.checkpoint_interval }
    }

    /// Most non-checkpoint records allowed between two checkpoints: one more than
    /// `checkpoint_every`, for the `start` record of a writer restarted after a crash.
    fn max_records(&self) -> u64 {
        self.checkpoint_every.max(1).saturating_add(1)
    }

    fn max_span(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.checkpoint_interval + TIME_GRACE).unwrap_or(chrono::Duration::MAX)
    }
}

/// How much longer than `checkpoint_interval` (in record timestamps) a stretch without a
/// checkpoint may be: the writer thread may be busy with a slow sync when one is due.
pub const TIME_GRACE: Duration = Duration::from_secs(5);

/// How long before `verify` started a checkpoint may have been written and still be missing
/// from HEAD (HEAD is rewritten just after each checkpoint is durable).
pub const HEAD_LAG_GRACE: Duration = Duration::from_secs(5);

fn parse_ts(ts: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(ts).ok().map(|d| d.with_timezone(&Utc))
}

/// Where and why the log is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Segment file (or HEAD) the problem is in.
    pub file: Option<PathBuf>,
    /// 1-based line within `file`.
    pub line: Option<u64>,
    /// The seq of the bad record (for unparseable lines: the seq expected there).
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("audit log BROKEN")?;
        if let Some(seq) = self.seq {
            write!(f, " at seq {seq}")?;
        }
        if let Some(file) = &self.file {
            let name =
                file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
            match self.line {
                Some(l) => write!(f, " ({name}:{l})")?,
                None => write!(f, " ({name})")?,
            }
        }
        write!(f, ": {}", self.reason)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines checked and found good (all kinds, checkpoints included).
    pub records: u64,
    /// Segment files in the directory.
    pub segments: usize,
    /// Valid checkpoint records.
    pub checkpoints: u64,
    pub last_seq: Option<u64>,
    /// The seq the last valid checkpoint anchors.
    pub last_anchored_seq: Option<u64>,
    /// Non-checkpoint records after the last checkpoint.
    pub unanchored: u64,
    /// The seq of the checkpoint `HEAD` names, if there is a HEAD.
    pub head_seq: Option<u64>,
    /// Records a restart anchored that the run before it had left unanchored: (first seq,
    /// last seq, the seq of the `start` record that names them). Only the hash chain
    /// vouches for them (see [`chain::UNANCHORED_TAIL`]).
    pub restart_anchored: Vec<(u64, u64, u64)>,
    /// The first thing wrong, if anything.
    pub problem: Option<Problem>,
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }

    /// One line: `audit log OK: …` or `audit log BROKEN at seq N (file:line): reason`.
    pub fn summary(&self) -> String {
        if let Some(p) = &self.problem {
            return p.to_string();
        }
        let mut s = format!(
            "audit log OK: {} in {}, {}",
            plural(self.records, "record", "records"),
            plural(self.segments as u64, "segment", "segments"),
            plural(self.checkpoints, "checkpoint", "checkpoints"),
        );
        match self.last_anchored_seq {
            Some(a) => s.push_str(&format!(
                ", last anchored seq {a} ({} after it)",
                plural(self.unanchored, "unanchored record", "unanchored records")
            )),
            None if self.unanchored > 0 => s.push_str(&format!(
                ", no checkpoint yet ({})",
                plural(self.unanchored, "unanchored record", "unanchored records")
            )),
            None => {}
        }
        for (first, last, start) in &self.restart_anchored {
            s.push_str(&format!(
                "; seq {first}..{last} were anchored by the restart at seq {start}, not by the run that wrote them (a crash, or records written while pgward was down)"
            ));
        }
        s
    }
}

/// Verify the log in `dir` against the checkpoint keys in `keys`, with the default [`Policy`].
pub fn verify(dir: &Path, keys: &PublicKeys) -> VerifyReport {
    verify_with(dir, keys, &Policy::default())
}

/// Verify the log in `dir` against the checkpoint keys in `keys` and the writer's `policy`.
pub fn verify_with(dir: &Path, keys: &PublicKeys, policy: &Policy) -> VerifyReport {
    verify_at(dir, keys, policy, SystemTime::now().into())
}

/// [`verify_with`] as if started at `started` (which decides what counts as a checkpoint
/// written just now, see [`HEAD_LAG_GRACE`]).
pub fn verify_at(dir: &Path, keys: &PublicKeys, policy: &Policy, started: DateTime<Utc>) -> VerifyReport {
    let mut report = VerifyReport::default();
    report.problem = run(dir, keys, policy, started, &mut report).err();
    report
}

/// A checkpoint after the one HEAD names (or any, without HEAD).
struct NewerCheckpoint {
    seq: u64,
    file: PathBuf,
    line: u64,
    ts: Option<DateTime<Utc>>,
}

/// A problem about a whole file (the directory, HEAD), not one line.
fn whole(file: Option<PathBuf>, seq: Option<u64>, reason: String) -> Problem {
    Problem { file, line: None, seq, reason }
}

/// A problem at a line of a segment.
fn at(line: &Line, seq: Option<u64>, reason: String) -> Problem {
    Problem { file: Some(line.segment.to_path_buf()), line: Some(line.line_no), seq, reason }
}

/// What `HEAD` says: `Ok(None)` when there is none, `Err` when it cannot be read.
fn read_head(path: &Path) -> Result<Option<Head>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("HEAD does not parse: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("HEAD unreadable: {e}")),
    }
}

fn run(
    dir: &Path,
    keys: &PublicKeys,
    policy: &Policy,
    started: DateTime<Utc>,
    report: &mut VerifyReport,
) -> Result<(), Problem> {
    if !dir.is_dir() {
        return Err(whole(Some(dir.to_owned()), None, "audit directory does not exist".into()));
    }
    // HEAD problems are reported after the records: a bad record is the more precise finding.
    let head_path = dir.join(HEAD_FILE);
    let head_status = read_head(&head_path);
    let head = head_status.clone().ok().flatten();
    report.head_seq = head.as_ref().map(|h| h.seq);

    let mut reader = Reader::open(dir).map_err(|e| whole(Some(dir.to_owned()), None, e.to_string()))?;
    report.segments = reader.segments().len();
    let mut walk = Walk::new(keys, policy, head.as_ref(), report);
    while let Some(line) = reader.next_line() {
        let line = line.map_err(|e| whole(None, None, e.to_string()))?;
        walk.line(&line)?;
    }
    let Walk { newer, head_found, read_from, .. } = walk;
    check_empty_segments(reader.segments(), &read_from, report.last_seq)?;
    if let Some((path, at)) = reader.cut_short().first() {
        return Err(whole(
            Some(path.clone()),
            None,
            format!(
                "bytes hidden after a NUL at offset {at} of a closed segment: a closed segment holds its lines and nothing after them but NULs (every reader of the log stops at the first NUL, tools that drop NULs do not)"
            ),
        ));
    }
    check_newer_checkpoints(&newer, &head_status, &head_path, started)?;
    check_head(keys, head_status, &head_path, head_found, report)
}

/// The walk over the records: the chain so far and the stretch since the last checkpoint.
struct Walk<'a> {
    keys: &'a PublicKeys,
    head: Option<&'a Head>,
    report: &'a mut VerifyReport,
    prev_hash: String,
    expected: u64,
    head_found: bool,
    /// The stretch since the last checkpoint: its first record, and when its clock started.
    stretch_first: Option<u64>,
    stretch_clock: Option<DateTime<Utc>>,
    newer: Vec<NewerCheckpoint>,
    max_records: u64,
    max_span: chrono::Duration,
    policy: &'a Policy,
    /// The segments that held at least one line.
    read_from: std::collections::HashSet<PathBuf>,
}

impl<'a> Walk<'a> {
    fn new(keys: &'a PublicKeys, policy: &'a Policy, head: Option<&'a Head>, report: &'a mut VerifyReport) -> Walk<'a> {
        Walk {
            keys,
            head,
            report,
            prev_hash: GENESIS_HASH.to_owned(),
            expected: 1,
            head_found: false,
            stretch_first: None,
            stretch_clock: None,
            newer: Vec::new(),
            max_records: policy.max_records(),
            max_span: policy.max_span(),
            policy,
            read_from: std::collections::HashSet::new(),
        }
    }

    /// Check one stored line and move the chain on.
    fn line(&mut self, line: &Line) -> Result<(), Problem> {
        if line.line_no == 1 {
            self.read_from.insert(line.segment.to_path_buf());
        }
        let expected = self.expected;
        if !line.complete {
            return Err(at(
                line,
                Some(expected),
                "incomplete line (no trailing newline): interrupted write or truncation".into(),
            ));
        }
        let rec = line
            .parse()
            .map_err(|e| at(line, Some(expected), format!("line does not parse as an audit record: {e}")))?;
        self.chain(line, &rec)?;
        let ts = parse_ts(&rec.ts).ok_or_else(|| at(line, Some(rec.seq), format!("ts {:?} is not an RFC 3339 time", rec.ts)))?;
        self.stretch_span(line, &rec, ts)?;
        if rec.kind == Kind::Start
            && let Some(lost) = rec.meta.as_ref().and_then(|m| m.get(chain::HEAD_LOST))
        {
            let n = |k: &str| lost.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            return Err(at(
                line,
                Some(rec.seq),
                format!(
                    "the restart at seq {} found HEAD naming checkpoint seq {} that the log did not hold (it ended at seq {}): records were cut off or replaced while pgward was down",
                    rec.seq,
                    n("seq"),
                    n("log_end")
                ),
            ));
        }
        if rec.kind == Kind::Start
            && let Some(t) = rec.meta.as_ref().and_then(|m| m.get(chain::UNANCHORED_TAIL))
        {
            let seq_of = |k: &str| t.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            self.report.restart_anchored.push((seq_of("first"), seq_of("last"), rec.seq));
        }
        if rec.kind == Kind::Checkpoint {
            self.checkpoint(line, &rec, ts)?;
        } else {
            self.unanchored(line, &rec, ts)?;
        }
        self.head_match(line, &rec)?;
        self.prev_hash = rec.hash;
        self.expected += 1;
        self.report.records += 1;
        self.report.last_seq = Some(rec.seq);
        Ok(())
    }

    /// seq continuity, the stored hash, the link to the previous record, the segment name.
    fn chain(&self, line: &Line, rec: &Record) -> Result<(), Problem> {
        let (seq, expected) = (rec.seq, self.expected);
        if seq != expected {
            let reason = if seq > expected {
                format!("seq gap: expected seq {expected}, found {seq} (records {expected}..{} missing)", seq - 1)
            } else {
                format!("seq out of order: expected seq {expected}, found {seq} (duplicated or reordered record)")
            };
            return Err(at(line, Some(seq), reason));
        }
        match chain::recompute(&line.raw, &rec.prev_hash) {
            None => return Err(at(line, Some(seq), "line does not end with a well-formed \"hash\" field".into())),
            Some((stored, computed)) if stored != computed => {
                return Err(at(
                    line,
                    Some(seq),
                    format!("hash mismatch: the record was altered (stored {stored}, computed {computed})"),
                ));
            }
            Some(_) => {}
        }
        if rec.prev_hash != self.prev_hash {
            let what = if seq == 1 { "the genesis hash".to_string() } else { format!("the hash of seq {}", seq - 1) };
            return Err(at(line, Some(seq), format!("prev_hash does not match {what} (chain broken)")));
        }
        if line.line_no == 1 && seq != line.segment_first_seq {
            return Err(at(
                line,
                Some(seq),
                format!(
                    "segment name says it starts at seq {}, but its first record is seq {seq}",
                    line.segment_first_seq
                ),
            ));
        }
        Ok(())
    }

    /// The stretch without a checkpoint that this record extends must not be longer than
    /// `checkpoint_interval` (+ grace) of record time. The checkpoint that ends it may come
    /// later: it is signed, so no one without the key adds one, and the writer checkpoints
    /// before a record that would stretch it further (after a step of the wall clock, or a
    /// stall of the disk that held up the interval checkpoint).
    fn stretch_span(&self, line: &Line, rec: &Record, ts: DateTime<Utc>) -> Result<(), Problem> {
        let Some(first) = self.stretch_first else { return Ok(()) };
        if matches!(rec.kind, Kind::Start | Kind::Checkpoint) {
            return Ok(());
        }
        let span = self.stretch_clock.map(|c| ts - c);
        if span.is_some_and(|s| s > self.max_span) {
            return Err(at(
                line,
                Some(rec.seq),
                format!(
                    "no checkpoint for {:.1} s of records (seq {first}..{}), more than checkpoint_interval {} s + {} s: checkpoints were removed or records forged",
                    span.map_or(0.0, |s| s.num_milliseconds() as f64 / 1000.0),
                    rec.seq - 1,
                    self.policy.checkpoint_interval.as_secs_f64(),
                    TIME_GRACE.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// A checkpoint anchors the record before it with a valid signature; it ends the stretch.
    fn checkpoint(&mut self, line: &Line, rec: &Record, ts: DateTime<Utc>) -> Result<(), Problem> {
        let seq = rec.seq;
        let anchor_seq = rec.anchor_seq.unwrap_or(0);
        let anchor_hash = rec.anchor_hash.as_deref().unwrap_or("");
        if anchor_seq + 1 != seq || anchor_hash != self.prev_hash {
            return Err(at(line, Some(seq), "checkpoint does not anchor the record before it".into()));
        }
        check_signature(self.keys, rec.kid.as_deref(), rec.sig.as_deref(), anchor_seq, anchor_hash)
            .map_err(|r| at(line, Some(seq), r))?;
        self.report.checkpoints += 1;
        self.report.last_anchored_seq = Some(anchor_seq);
        self.report.unanchored = 0;
        self.stretch_first = None;
        self.stretch_clock = None;
        if self.head.is_none_or(|h| h.seq < seq) {
            self.newer.push(NewerCheckpoint { seq, file: line.segment.to_path_buf(), line: line.line_no, ts: Some(ts) });
        }
        Ok(())
    }

    /// Any other record extends the stretch, which may hold at most `max_records`.
    fn unanchored(&mut self, line: &Line, rec: &Record, ts: DateTime<Utc>) -> Result<(), Problem> {
        let seq = rec.seq;
        self.report.unanchored += 1;
        self.stretch_first.get_or_insert(seq);
        if rec.kind == Kind::Start || self.stretch_clock.is_none() {
            self.stretch_clock = Some(ts);
        }
        if self.report.unanchored > self.max_records {
            return Err(at(
                line,
                Some(seq),
                format!(
                    "{} records without a checkpoint (seq {}..{seq}), more than checkpoint_every {} allows: checkpoints were removed or records forged",
                    self.report.unanchored,
                    self.stretch_first.unwrap_or(seq),
                    self.policy.checkpoint_every
                ),
            ));
        }
        Ok(())
    }

    /// The record HEAD names must be that checkpoint.
    fn head_match(&mut self, line: &Line, rec: &Record) -> Result<(), Problem> {
        let Some(h) = self.head.filter(|h| h.seq == rec.seq) else { return Ok(()) };
        if rec.kind != Kind::Checkpoint || rec.hash != h.hash {
            return Err(at(
                line,
                Some(rec.seq),
                format!(
                    "HEAD names checkpoint seq {} with hash {}, but the log has a different record there",
                    rec.seq, h.hash
                ),
            ));
        }
        self.head_found = true;
        Ok(())
    }
}

/// Every segment holds records, except a last one named for the seq after the last record
/// (just rotated to): the writer names a segment for the seq it starts with and fills it
/// before the next. Any other empty one was put there by someone else, and readers that go by
/// the names (the exporter resuming at its cursor, `tail -f` moving on to a newer segment)
/// would skip the records it claims to start.
fn check_empty_segments(
    segments: &[chain::SegmentFile],
    read_from: &std::collections::HashSet<PathBuf>,
    last_seq: Option<u64>,
) -> Result<(), Problem> {
    let next = last_seq.map_or(1, |s| s.saturating_add(1));
    let n = segments.len();
    let planted = segments
        .iter()
        .enumerate()
        .find(|(i, s)| !read_from.contains(&s.path) && !(i + 1 == n && s.first_seq == next));
    match planted {
        Some((_, s)) => Err(whole(
            Some(s.path.clone()),
            Some(s.first_seq),
            format!(
                "segment holds no records but is named for seq {} (the log's next seq is {next}): not written by pgward",
                s.first_seq
            ),
        )),
        None => Ok(()),
    }
}

/// Checkpoints HEAD does not name yet: tolerated only if written just before verify started
/// (or while it ran). Anything else means HEAD was deleted or replaced by an older copy — or
/// the writer died between making a checkpoint durable and rewriting HEAD; its next start
/// rewrites HEAD.
fn check_newer_checkpoints(
    newer: &[NewerCheckpoint],
    head_status: &Result<Option<Head>, String>,
    head_path: &Path,
    started: DateTime<Utc>,
) -> Result<(), Problem> {
    let recent = started - chrono::Duration::from_std(HEAD_LAG_GRACE).unwrap_or(chrono::Duration::zero());
    let Some(c) = newer.iter().find(|c| c.ts.is_none_or(|t| t < recent)) else { return Ok(()) };
    let newest = newer.last().map(|c| c.seq);
    let reason = match head_status {
        Err(reason) => return Err(whole(Some(head_path.to_owned()), None, reason.clone())),
        Ok(Some(h)) => format!(
            "HEAD names checkpoint seq {}, but the log holds a newer checkpoint at seq {} ({}:{}): HEAD was replaced by an older copy",
            h.seq,
            c.seq,
            c.file.file_name().map_or_else(|| c.file.display().to_string(), |n| n.to_string_lossy().into_owned()),
            c.line
        ),
        Ok(None) => format!(
            "HEAD is missing, but the log holds checkpoint records (the newest at seq {}): HEAD was deleted",
            newest.unwrap_or(c.seq)
        ),
    };
    let seq = if matches!(head_status, Ok(Some(_))) { c.seq } else { newest.unwrap_or(c.seq) };
    Err(whole(Some(head_path.to_owned()), Some(seq), reason))
}

/// HEAD's own signature, and that the log still reaches the checkpoint it names.
fn check_head(
    keys: &PublicKeys,
    head_status: Result<Option<Head>, String>,
    head_path: &Path,
    head_found: bool,
    report: &VerifyReport,
) -> Result<(), Problem> {
    let h = match head_status {
        Err(reason) => return Err(whole(Some(head_path.to_owned()), None, reason)),
        Ok(None) => return Ok(()),
        Ok(Some(h)) => h,
    };
    check_signature(keys, Some(&h.kid), Some(&h.sig), h.anchor_seq, &h.anchor_hash)
        .map_err(|r| whole(Some(head_path.to_owned()), Some(h.seq), format!("HEAD: {r}")))?;
    if !head_found {
        return Err(whole(
            Some(head_path.to_owned()),
            Some(h.seq),
            format!("truncated: log ends at seq {} but HEAD checkpoint is seq {}", report.last_seq.unwrap_or(0), h.seq),
        ));
    }
    Ok(())
}
