//! Literal-normalized cache keys, from the server's own lexer ([`super::pgparse::scan`]).
//!
//! Texts that differ only in the values of their constants (`… WHERE aid = 12345`, `… WHERE
//! aid = 678`) lex into the same token sequence but for those values, so the parser builds
//! the same tree for them but for the constants' values — as long as every constant becomes
//! a constant node (`A_Const`) in the tree. A constant the grammar turns into structure (a
//! COPY file name, an option's value, a function body, a FETCH count) does not: then
//! [`Normalized::covered_by`] is false and the analysis is cached by its exact text only.
//!
//! The key is the text with each constant replaced by `\0` and a letter for its kind (the
//! server never sees a NUL in a statement text, so the key cannot collide with a real text).
//!
//! Most statements an application repeats are plain (`SELECT abalance FROM pgbench_accounts
//! WHERE aid = 12345`): [`plain`] reads those without calling into the server's lexer, and
//! gives up — leaving the text to the server's lexer — at the first character whose reading
//! could depend on lexer state it does not model: comments, `-`, `/`, quoted identifiers,
//! prefixed strings (`E'`, `U&'`, `B'`, `X'`, `N'`), dollar quotes, exponents, digits
//! followed by a letter, non-ASCII. On what it accepts, it finds exactly the constants the
//! server's lexer finds (test `plain_keys_match_the_servers_lexer`).

use super::pgparse::{self, TokKind};

/// A statement text with its constants replaced by placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Normalized {
    /// The cache key.
    pub key: String,
    /// Where each constant's node must be in the tree: the byte offset of the constant, or
    /// of the `-` right before it (the parser folds a negated number into one constant at
    /// the sign's position), with the constant's own offset as the second choice.
    consts: Vec<(usize, usize)>,
    /// Byte range of each constant in the text, in order.
    pub ranges: Vec<std::ops::Range<usize>>,
}

/// The literal-normalized key of `sql`; None when it holds no constant or does not lex.
pub(crate) fn normalize(sql: &str) -> Option<Normalized> {
    match plain(sql) {
        Some(n) => n,
        None => scanned(sql),
    }
}

/// Largest integer the server's lexer reads as an integer constant (larger ones are numeric).
const INT4_MAX: u64 = i32::MAX as u64;

/// [`normalize`] for plain texts without the server's lexer: Some(key) when `sql` uses only
/// what this reader models (see the module doc), None to leave it to the lexer.
fn plain(sql: &str) -> Option<Option<Normalized>> {
    let b = sql.as_bytes();
    let (mut key, mut ranges) = (String::new(), Vec::new());
    let (mut i, mut copied) = (0usize, 0usize);
    while i < b.len() {
        let c = b[i];
        let start = i;
        let kind = match c {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                // An identifier or keyword; a quote right after one is a prefixed string.
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                if b.get(i) == Some(&b'\'') || b.get(i) == Some(&b'&') {
                    return None;
                }
                continue;
            }
            b'0'..=b'9' => {
                let (kind, end) = plain_number(sql, start)?;
                i = end;
                kind
            }
            b'\'' => {
                i = plain_string(b, start)?;
                's'
            }
            b'$' => {
                // A parameter `$1`; anything else may be a dollar quote.
                i += 1;
                let digits = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if i == digits || b.get(i).is_some_and(|&n| ident(n)) {
                    return None;
                }
                continue;
            }
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b'(' | b')' | b';' | b'=' | b'<' | b'>' | b'*' | b'+' | b'[' | b']'
            | b':' => {
                i += 1;
                continue;
            }
            // `.` right before a digit starts a number (`.5`); elsewhere it qualifies a name.
            b'.' if !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                continue;
            }
            _ => return None,
        };
        key.push_str(&sql[copied..start]);
        key.push('\0');
        key.push(kind);
        copied = i;
        ranges.push(start..i);
    }
    if ranges.is_empty() {
        return Some(None);
    }
    key.push_str(&sql[copied..]);
    let consts = ranges.iter().map(|r| (r.start, r.start)).collect();
    Some(Some(Normalized { key, consts, ranges }))
}

/// A byte that continues an identifier.
fn ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$'
}

/// The number starting at byte `start` of `sql`: its kind (`i` integer, `f` numeric) and the
/// index after it; None for forms left to the server's lexer.
fn plain_number(sql: &str, start: usize) -> Option<(char, usize)> {
    let b = sql.as_bytes();
    let mut i = start;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut kind = 'i';
    if b.get(i) == Some(&b'.') {
        kind = 'f';
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
    }
    // `1e5`, `12abc`, `1.2.3`: forms the lexer reads in ways not modelled here.
    if b.get(i).is_some_and(|&n| ident(n) || n == b'.') {
        return None;
    }
    if kind == 'i' && sql[start..i].parse::<u64>().map_or(true, |v| v > INT4_MAX) {
        kind = 'f';
    }
    Some((kind, i))
}

/// The `'…'` string starting at byte `start`: the index after it; None for forms left to the
/// server's lexer.
fn plain_string(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    // '…' with '' for a quote; standard_conforming_strings is on, so a backslash
    // is an ordinary character.
    i += 1;
    loop {
        match b.get(i) {
            None => return None,
            Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
            Some(b'\'') => break,
            Some(&ch) if ch >= 0x80 || ch == 0 => return None,
            Some(_) => i += 1,
        }
    }
    i += 1;
    // 'a' <newline> 'b' is one constant to the lexer: not modelled here.
    let mut j = i;
    while j < b.len() && matches!(b[j], b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') {
        j += 1;
    }
    if b.get(j) == Some(&b'\'') && b[i..j].iter().any(|&w| w == b'\n' || w == b'\r') {
        return None;
    }
    Some(i)
}

/// [`normalize`] with the server's lexer.
fn scanned(sql: &str) -> Option<Normalized> {
    let toks = pgparse::scan(sql)?;
    if !toks.iter().any(|t| matches!(t.kind, TokKind::Const(_))) {
        return None;
    }
    let mut key = String::with_capacity(sql.len());
    let mut consts = Vec::new();
    let mut ranges = Vec::new();
    let mut copied = 0;
    let mut prev_minus: Option<usize> = None;
    for t in &toks {
        match t.kind {
            TokKind::Const(k) => {
                key.push_str(sql.get(copied..t.start)?);
                key.push('\0');
                key.push(k);
                copied = t.end;
                consts.push((prev_minus.unwrap_or(t.start), t.start));
                ranges.push(t.start..t.end);
            }
            TokKind::Comment => continue,
            _ => {}
        }
        prev_minus = (t.kind == TokKind::Minus).then_some(t.start);
    }
    key.push_str(sql.get(copied..)?);
    Some(Normalized { key, consts, ranges })
}

impl Normalized {
    /// Whether every constant of the text is a constant node of the tree, at the place the
    /// lexer found it. `locations`: the locations of the tree's `A_Const` nodes.
    pub(crate) fn covered_by(&self, locations: &[usize]) -> bool {
        self.consts.iter().all(|&(sign, own)| locations.contains(&sign) || locations.contains(&own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let a = normalize("SELECT * FROM t WHERE a = 12345 AND b = 'x'").unwrap();
        let b = normalize("SELECT * FROM t WHERE a = 6 AND b = 'it''s'").unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.key, "SELECT * FROM t WHERE a = \0i AND b = \0s");
        // Different kinds of constant are different keys.
        assert_ne!(a.key, normalize("SELECT * FROM t WHERE a = 1.5 AND b = 'x'").unwrap().key);
        // A quote inside a constant is the constant's: the rest of the text is unchanged.
        let c = normalize("SELECT 'a'';DROP TABLE t;--'").unwrap();
        assert_eq!(c.key, "SELECT \0s");
        assert!(normalize("SELECT a FROM t").is_none());
        assert!(normalize("SELECT 'open").is_none());
    }

    /// Whenever the plain reader accepts a text, its key and constants are exactly those of
    /// the server's lexer: over hand-picked texts and random ones from an alphabet of the
    /// characters it handles and the ones it must refuse.
    #[test]
    fn plain_keys_match_the_servers_lexer() {
        let mut texts: Vec<String> = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345",
            "UPDATE pgbench_accounts SET abalance = abalance + 4100 WHERE aid = 77;",
            "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'it''s'), (2147483648, '')",
            "SELECT 'a'\n'b', 'c' 'd', 1.5, 2., 3.25, t.x::text, a[1] FROM s.t WHERE $1 = 'q' AND $12 > 0",
            "SELECT 'back\\slash', 'semi;colon', 'dash--dash', 'star/*'",
            "SELECT E'x', U&'y', B'1', X'F', N'z', \"q\", $$d$$, 1e5, 12abc, -1, a/b",
            "SELECT 1 .5",
            "SELECT a.b.c FROM x WHERE y = 2147483647 OR y = 4294967296",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let alphabet: &[&str] = &[
            "SELECT", " ", "a", "x1", "_", "1", "42", "9999999999", ".", "'", "''", "'q'", "$", "$1", ",", "(", ")", ";",
            "=", "<", ">", "*", "+", "::", "[", "]", "\n", "\t", "\r", "-", "/", "\\", "E", "\"", "&", "é", "e", "0.5", "2147483647", "2147483648",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..60_000 {
            let mut t = String::new();
            for _ in 0..(seed % 12 + 1) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                t.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            texts.push(t);
        }
        let mut accepted = 0;
        for t in &texts {
            let Some(fast) = plain(t) else { continue };
            accepted += 1;
            let server = scanned(t);
            let shape = |n: &Option<Normalized>| n.as_ref().map(|n| (n.key.clone(), n.ranges.clone()));
            // The server's lexer may reject a text the plain reader accepts (an unterminated
            // construct it does not model): then nothing is normalized either way that matters
            // (the parse fails too), but the plain reader must not claim constants the lexer
            // would not find in a text it does lex.
            if pgparse::scan(t).is_some() {
                assert_eq!(shape(&fast), shape(&server), "{t:?}");
            }
        }
        assert!(accepted > 5_000, "the plain reader accepted only {accepted} texts");
        assert!(plain("SELECT abalance FROM pgbench_accounts WHERE aid = 12345").is_some());
    }

    #[test]
    fn negative_numbers_are_covered_at_the_sign() {
        let n = normalize("SELECT -5").unwrap();
        assert!(n.covered_by(&[7]));
        assert!(!n.covered_by(&[3]));
    }
}
