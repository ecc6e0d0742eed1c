//! The pieces of the line format that the writer and `verify` must agree on byte for byte:
//! the genesis hash, how a line's hash is computed and stripped, the checkpoint message,
//! segment file names, the `HEAD` file and the `start` record's note of a previous run's
//! unanchored records.
//!
//! A stored line is `c` (the canonical JSON of the record without `hash`) with its final `}`
//! replaced by `,"hash":"<hex>"}`, then `\n`, where
//! `hash = hex(SHA-256(prev_hash_hex_bytes ‖ c))`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record ever written.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Length of a hex SHA-256.
pub const HASH_HEX_LEN: usize = 64;

/// What precedes the hex hash at the end of a stored line.
pub const HASH_PREFIX: &[u8] = b",\"hash\":\"";

/// The `start` record's meta key naming the records the previous run left after its last
/// checkpoint (`{"first": seq, "last": seq}`): the restart's checkpoint anchors them, but only
/// their hash chain vouches for them — they may be a crashed run's last records, or records
/// someone who can write the log's files (not the checkpoint key) appended or replaced while
/// pgward was down. `verify` lists these ranges, so a restart never anchors them silently.
pub const UNANCHORED_TAIL: &str = "unanchored_tail";

/// The `start` record's meta key naming the checkpoint the previous run's HEAD named when
/// the log no longer holds it (`{"seq": N, "hash": …, "log_end": M}`): records were cut off or
/// replaced while pgward was down. `verify` fails on it (the restart's checkpoints rewrite
/// HEAD, which would otherwise erase the evidence).
pub const HEAD_LOST: &str = "head_lost";

/// Name of the file holding the latest checkpoint.
pub const HEAD_FILE: &str = "HEAD";

/// Length of the suffix `,"hash":"<64 hex>"}` at the end of a stored line (without `\n`).
pub const HASH_SUFFIX_LEN: usize = HASH_PREFIX.len() + HASH_HEX_LEN + 2;

/// hex(SHA-256(prev_hash ‖ canonical_without_brace ‖ tail)). `tail` lets the caller hash
/// `c` when it holds `c` minus its closing brace (as `verify` does) without copying.
pub fn chain_hash(prev_hash: &[u8], canonical: &[u8], tail: &[u8]) -> [u8; HASH_HEX_LEN] {
    let mut h = Sha256::new();
    h.update(prev_hash);
    h.update(canonical);
    h.update(tail);
    let digest = h.finalize();
    let mut out = [0u8; HASH_HEX_LEN];
    // Lengths always match (32 bytes -> 64 hex chars).
    let _ = hex::encode_to_slice(digest.as_slice(), &mut out);
    out
}

/// Split a stored line (without its `\n`) into the canonical bytes minus the closing brace
/// and the stored hex hash. `None` if the line does not end with `,"hash":"<64 hex>"}`.
pub fn split_line(line: &[u8]) -> Option<(&[u8], &str)> {
    if line.len() < HASH_SUFFIX_LEN + 1 || !line.ends_with(b"\"}") {
        return None;
    }
    let start = line.len() - HASH_SUFFIX_LEN;
    let (body, suffix) = line.split_at(start);
    if !suffix.starts_with(HASH_PREFIX) {
        return None;
    }
    let hex_part = &suffix[HASH_PREFIX.len()..HASH_PREFIX.len() + HASH_HEX_LEN];
    if !hex_part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    // All ASCII hex digits: valid UTF-8.
    let hex_str = std::str::from_utf8(hex_part).ok()?;
    Some((body, hex_str))
}

/// Recompute the hash of a stored line given its `prev_hash`; returns (stored, recomputed).
pub fn recompute(line: &[u8], prev_hash: &str) -> Option<(String, String)> {
    let (body, stored) = split_line(line)?;
    let computed = chain_hash(prev_hash.as_bytes(), body, b"}");
    Some((stored.to_owned(), String::from_utf8_lossy(&computed).into_owned()))
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(anchor_seq: u64, anchor_hash: &str) -> String {
    format!("pgward-checkpoint:{anchor_seq}:{anchor_hash}")
}

/// `audit-<16-digit first seq>.jsonl`
pub fn segment_name(first_seq: u64) -> String {
    format!("audit-{first_seq:016}.jsonl")
}

/// The first seq encoded in a segment file name, if `name` is a segment name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One segment file of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    pub path: PathBuf,
    /// The seq its name says it starts with.
    pub first_seq: u64,
}

/// Every segment in `dir`, ordered by first seq. Other files are ignored. A segment name that
/// is not a regular file (a FIFO, a device, a directory — directly or through a symlink) is an
/// error: opening a FIFO blocks and a device reads without end, so every reader of the log
/// would hang on it instead of reporting it.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<SegmentFile>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(first_seq) = parse_segment_name(name) {
            let path = entry.path();
            if !std::fs::metadata(&path)?.is_file() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a regular file: not a segment pgward wrote", path.display()),
                ));
            }
            out.push(SegmentFile { path, first_seq });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// Contents of `dir/HEAD`: the latest checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The checkpoint record's own seq.
    pub seq: u64,
    /// The checkpoint record's hash.
    pub hash: String,
    pub anchor_seq: u64,
    pub anchor_hash: String,
    pub sig: String,
    pub kid: String,
    pub ts: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_recompute_roundtrip() {
        let c = br#"{"seq":1,"ts":"x","prev_hash":"00","kind":"start"}"#;
        let h = chain_hash(GENESIS_HASH.as_bytes(), c, b"");
        let mut line = c[..c.len() - 1].to_vec();
        line.extend_from_slice(HASH_PREFIX);
        line.extend_from_slice(&h);
        line.extend_from_slice(b"\"}");
        let (stored, again) = recompute(&line, GENESIS_HASH).expect("well-formed line");
        assert_eq!(stored.as_bytes(), &h[..]);
        assert_eq!(stored, again);
        assert!(split_line(b"{\"seq\":1}").is_none());
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(42), "audit-0000000000000042.jsonl");
        assert_eq!(parse_segment_name("audit-0000000000000042.jsonl"), Some(42));
        assert_eq!(parse_segment_name("audit-42.jsonl"), None);
        assert_eq!(parse_segment_name("audit-0000000000000042.jsonl.tmp"), None);
    }
}
