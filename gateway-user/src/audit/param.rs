//! A bound parameter as a statement record shows it (`params`, one entry per parameter, in
//! order): `null` for SQL NULL; a string, the value's text — as sent for a text-format value,
//! as Postgres prints it for a binary one of a type pgward reads ([`crate::wire::binary`]);
//! `{"oid":…,"hex":"\x…"}` for a binary value pgward does not print (a type it does not
//! read, a type it does not know — oid 0 —, or bytes Postgres would refuse as the type); and
//! for a value whose text or hex is over [`LONG_BYTES`], `{"prefix":"…","bytes":…,
//! "sha256":"…"}` (with `"oid"` first when it stands for hex): the first
//! [`PREFIX_BYTES`] of it followed by `…`, its whole length in bytes, and the SHA-256 of
//! its whole UTF-8 bytes.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::write_str;
use crate::wire::binary;

/// A value's text (or hex) longer than this many bytes is recorded as a prefix, its length
/// and its SHA-256: statement records stay small whatever clients bind.
pub const LONG_BYTES: usize = 4096;
/// How much of a long value's text (or hex) a record keeps, cut at a character boundary.
pub const PREFIX_BYTES: usize = 1024;
/// What ends the prefix of a long value.
pub const CUT_MARKER: &str = "…";
/// The Bind / FunctionCall format code of text values (1 is binary).
const TEXT_FORMAT: i16 = 0;

/// One bound parameter (SQL NULL is `None` next to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Param {
    /// The value's text.
    Text(String),
    /// A binary value pgward does not print: its type OID (0: unknown) and its bytes.
    Raw { oid: u32, hex: String },
    /// A value over [`LONG_BYTES`]: the start of its text (or, with `oid`, of its hex),
    /// its length and SHA-256.
    Long {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oid: Option<u32>,
        prefix: String,
        bytes: u64,
        sha256: String,
    },
}

impl Param {
    /// Bytes this value keeps in memory (its texts).
    pub fn retained_bytes(&self) -> usize {
        match self {
            Param::Text(t) => t.len(),
            Param::Raw { hex, .. } => hex.len(),
            Param::Long { prefix, sha256, .. } => prefix.len() + sha256.len(),
        }
    }

    /// The parameter a client bound in `format` with the bytes `value` (None: NULL), its
    /// type `oid` as far as pgward knows it (0: unknown).
    pub fn of(format: i16, value: Option<&[u8]>, oid: u32) -> Option<Param> {
        let v = value?;
        if format == TEXT_FORMAT {
            return Some(Param::text(String::from_utf8_lossy(v)));
        }
        Some(match binary::to_text(oid, v) {
            Some(t) => Param::text(Cow::Owned(t)),
            None => {
                let hex = binary::bytea_hex(v);
                match long(&hex, Some(oid)) {
                    Some(l) => l,
                    None => Param::Raw { oid, hex },
                }
            }
        })
    }

    fn text(t: Cow<'_, str>) -> Param {
        long(&t, None).unwrap_or_else(|| Param::Text(t.into_owned()))
    }

    /// Append the JSON serde writes for the parameter.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Param::Text(t) => write_str(out, t),
            Param::Raw { oid, hex } => {
                out.extend_from_slice(b"{\"oid\":");
                out.extend_from_slice(itoa::Buffer::new().format(*oid).as_bytes());
                out.extend_from_slice(b",\"hex\":");
                write_str(out, hex);
                out.push(b'}');
            }
            Param::Long { oid, prefix, bytes, sha256 } => {
                out.push(b'{');
                if let Some(oid) = oid {
                    out.extend_from_slice(b"\"oid\":");
                    out.extend_from_slice(itoa::Buffer::new().format(*oid).as_bytes());
                    out.push(b',');
                }
                out.extend_from_slice(b"\"prefix\":");
                write_str(out, prefix);
                out.extend_from_slice(b",\"bytes\":");
                out.extend_from_slice(itoa::Buffer::new().format(*bytes).as_bytes());
                out.extend_from_slice(b",\"sha256\":");
                write_str(out, sha256);
                out.push(b'}');
            }
        }
    }
}

/// `t` as a [`Param::Long`] when it is over [`LONG_BYTES`].
fn long(t: &str, oid: Option<u32>) -> Option<Param> {
    if t.len() <= LONG_BYTES {
        return None;
    }
    Some(Param::Long { oid, prefix: prefix(t), bytes: t.len() as u64, sha256: hex::encode(Sha256::digest(t.as_bytes())) })
}

/// The first [`PREFIX_BYTES`] of `t` (cut at a character boundary) and [`CUT_MARKER`].
fn prefix(t: &str) -> String {
    let mut cut = PREFIX_BYTES.min(t.len());
    while !t.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{CUT_MARKER}", &t[..cut])
}

/// An error text as a record keeps it (`error`): whole up to [`LONG_BYTES`], else its
/// first [`PREFIX_BYTES`], [`CUT_MARKER`] and ` (N bytes, sha256 HEX)` of the whole text.
/// Postgres echoes refused values in its messages (`invalid input syntax for type integer:
/// "…"`), so a short statement can draw an error of up to `server.max_message_bytes`; kept
/// whole, every such statement would add that much to the log (and to its export), filling
/// the disk that every statement's record needs.
pub fn error_text(t: &str) -> String {
    if t.len() <= LONG_BYTES {
        return t.to_owned();
    }
    format!("{} ({} bytes, sha256 {})", prefix(t), t.len(), hex::encode(Sha256::digest(t.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::binary::oid;

    #[test]
    fn long_error_texts_are_cut_with_their_length_and_hash() {
        assert_eq!(error_text("short"), "short");
        let exact = "é".repeat(LONG_BYTES / 2);
        assert_eq!(error_text(&exact), exact, "at the limit: whole");
        let long = format!("x{}", "é".repeat(LONG_BYTES));
        let got = error_text(&long);
        let sha = hex::encode(Sha256::digest(long.as_bytes()));
        let want = format!("x{}{CUT_MARKER} ({} bytes, sha256 {sha})", "é".repeat((PREFIX_BYTES - 1) / 2), long.len());
        assert_eq!(got, want);
    }

    fn json(p: &Option<Param>) -> String {
        serde_json::to_string(p).expect("serde")
    }

    #[test]
    fn text_binary_unknown_and_null() {
        assert_eq!(Param::of(0, None, oid::INT4), None);
        assert_eq!(Param::of(0, Some(b"41"), oid::INT4), Some(Param::Text("41".into())));
        assert_eq!(Param::of(1, Some(&4100i32.to_be_bytes()), oid::INT4), Some(Param::Text("4100".into())));
        // The type unknown (no Describe answered yet), a type pgward does not print, bytes the
        // type does not allow: hex with the OID.
        let raw = |oid| Some(Param::Raw { oid, hex: "\\x00001004".into() });
        assert_eq!(Param::of(1, Some(&4100i32.to_be_bytes()), 0), raw(0));
        assert_eq!(Param::of(1, Some(&4100i32.to_be_bytes()), 3904), raw(3904));
        assert_eq!(Param::of(1, Some(&4100i32.to_be_bytes()), oid::INT8), raw(oid::INT8));
        assert_eq!(json(&raw(3904)), r#"{"oid":3904,"hex":"\\x00001004"}"#);
        // Text sent in text format that is not UTF-8 is recorded with U+FFFD in its place.
        assert_eq!(Param::of(0, Some(b"a\xffb"), oid::TEXT), Some(Param::Text("a\u{fffd}b".into())));
    }

    #[test]
    fn long_values_keep_a_prefix_their_length_and_sha256() {
        let at_limit = "x".repeat(LONG_BYTES);
        assert_eq!(Param::of(0, Some(at_limit.as_bytes()), 0), Some(Param::Text(at_limit.clone())));
        // 'é' is two bytes: the prefix stops before one that would be cut in half.
        let text = format!("a{}", "é".repeat(LONG_BYTES));
        let Some(Param::Long { oid: None, prefix, bytes, sha256 }) = Param::of(1, Some(text.as_bytes()), oid::TEXT) else { panic!("not long") };
        assert_eq!(prefix, format!("a{}…", "é".repeat((PREFIX_BYTES - 1) / 2)));
        assert_eq!(bytes, text.len() as u64);
        assert_eq!(sha256, hex::encode(Sha256::digest(text.as_bytes())));
        // A long bytea: Postgres's text is its hex, and that is what is summed.
        let blob = vec![0xabu8; LONG_BYTES];
        let p = Param::of(1, Some(&blob), oid::BYTEA);
        let hex = format!("\\x{}", "ab".repeat(LONG_BYTES));
        let want = Param::Long {
            oid: None,
            prefix: format!("{}…", &hex[..PREFIX_BYTES]),
            bytes: hex.len() as u64,
            sha256: hex::encode(Sha256::digest(hex.as_bytes())),
        };
        assert_eq!(p, Some(want));
        // Long bytes of a type pgward does not print: the OID, then the summary of the hex.
        let p = Param::of(1, Some(&blob), 0);
        let s = json(&p);
        assert!(s.starts_with(r#"{"oid":0,"prefix":"\\xabab"#) && s.contains(&format!(r#"…","bytes":{},"sha256":""#, hex.len())), "{s}");
    }

    #[test]
    fn write_json_writes_what_serde_writes_and_serde_reads_it_back() {
        let cases = [
            None,
            Some(Param::Text("a\"\\\n€".into())),
            Some(Param::Raw { oid: u32::MAX, hex: "\\x".into() }),
            Param::of(1, Some(&[7; LONG_BYTES]), 600),
            Param::of(0, Some(&[b'q'; LONG_BYTES + 1]), 0),
        ];
        for p in &cases {
            let mut ours = Vec::new();
            match p {
                Some(p) => p.write_json(&mut ours),
                None => ours.extend_from_slice(b"null"),
            }
            assert_eq!(String::from_utf8_lossy(&ours), json(p));
            let back: Option<Param> = serde_json::from_slice(&ours).expect("reads back");
            assert_eq!(&back, p);
        }
    }
}
