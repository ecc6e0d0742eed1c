//! Literal-normalized cache keys for statement texts: one pass over the bytes, no parser.
//!
//! [`normalize`] replaces every numeric and string literal of a statement text by a placeholder,
//! so texts that differ only in literal values share a key: `… WHERE aid = 12345` and `… WHERE
//! aid = 678` both become `… WHERE aid = \0i-`. Everything else — keywords, identifiers, quoted
//! identifiers, comments, whitespace, operators, `$n` parameters, `::type` casts — is kept byte
//! for byte, so two texts with one key differ *only* inside literals of the same kind.
//!
//! The scanner follows Postgres's lexer (with `standard_conforming_strings` on, which pgward
//! enforces) and sqlparser's tokenizer where they agree; where they might not, or where the
//! text is anything but plain, it gives up (`None`: the caller uses the exact text):
//!
//! * unterminated quotes, quoted identifiers, dollar quotes and block comments;
//! * NUL and control characters other than tab, CR, LF and form feed; non-ASCII characters
//!   outside literals, comments and quoted identifiers (identifier rules differ);
//! * `U&'…'` / `U&"…"` (their meaning depends on `UESCAPE '…'`, itself a literal);
//! * numbers Postgres and sqlparser may read differently: `.5`, `1.`, exponents, `0x1F`,
//!   `1_000`, a number followed by a letter, `.` or `$`; `$1` followed by a letter or `$`;
//! * a string literal followed (after whitespace/comments) by another `'…'` — Postgres joins
//!   them across a newline, sqlparser does not.
//!
//! Literals that stay in the key verbatim (only their kind would be replaced otherwise, and their
//! contents could change how sqlparser reads them): `E'…'` and `X'…'` containing a backslash
//! (escapes), integers above `i32::MAX` (Postgres reads those as numeric, not integer).
//!
//! A placeholder is `\0`, a kind and a size class: `s` `'…'`, `e` `E'…'`, `b` `B'…'`, `x`
//! `X'…'`, `n` `N'…'`, `d` `$tag$…$tag$`, `i` integer, `f` decimal (`12.50`); the size class of a
//! string is its decoded length in bytes, 0, 1 or more (`0`/`1`/`2`; sqlparser accepts a
//! one-character string where a character is expected, e.g. `COPY … (DELIMITER '|')`), `-` for
//! numbers. A text holding NUL is never normalized, so a key decodes uniquely.
//!
//! Whether an analysis of one text may be reused for another with the same key is a separate
//! question (the analysis must not have looked at a literal's value): see `Policy::entry` and
//! [`Normalized::values_cover_literals`].

use std::ops::ControlFlow;
use std::ops::Range;

use sqlparser::ast::{Statement, Value, ValueWithSpan, Visit, Visitor};
use sqlparser::tokenizer::Location;

/// A statement text with its literal values replaced by placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Normalized {
    /// The cache key.
    pub key: String,
    /// Byte ranges of the replaced literals in the original text, in order (the whole literal,
    /// with its prefix and quotes: `E'a'`, `$x$…$x$`, `12`).
    pub literals: Vec<Range<usize>>,
}

/// Postgres `ident_cont` as far as this scanner accepts identifiers (ASCII only).
fn ident_cont(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$'
}

/// The size class of a string literal's decoded contents.
fn size_class(len: usize) -> u8 {
    match len {
        0 => b'0',
        1 => b'1',
        _ => b'2',
    }
}

/// The literal-normalized key of `sql`, or `None` when it holds no literal or is not plain
/// enough to normalize safely (see the module doc).
pub(crate) fn normalize(sql: &str) -> Option<Normalized> {
    let b = sql.as_bytes();
    let n = b.len();
    // A placeholder is 3 bytes: room for a few one-digit literals without growing.
    let mut key = String::with_capacity(n + 16);
    let mut literals = Vec::with_capacity(4);
    // Bytes before `copied` are in `key` already.
    let mut copied = 0usize;
    let mut i = 0usize;
    // Replace b[start..end] by a placeholder.
    let mut replace = |key: &mut String, copied: &mut usize, start: usize, end: usize, kind: u8, class: u8| {
        key.push_str(&sql[*copied..start]);
        key.push('\0');
        key.push(kind as char);
        key.push(class as char);
        *copied = end;
        literals.push(start..end);
    };
    while i < n {
        let c = b[i];
        let next = b.get(i + 1).copied();
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => i += 1,
            b'-' if next == Some(b'-') => {
                // To the end of the line (Postgres and sqlparser both stop at \n or \r).
                i += 2;
                while i < n && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
            }
            b'/' if next == Some(b'*') => i = block_comment_end(b, i)?,
            b'\'' => {
                let (end, len) = plain_string(b, i + 1)?;
                string_not_continued(b, end)?;
                replace(&mut key, &mut copied, i, end, b's', size_class(len));
                i = end;
            }
            b'"' => i = quoted_identifier_end(b, i + 1)?,
            b'$' => match next {
                Some(d) if d.is_ascii_digit() => {
                    // $n parameter
                    let mut j = i + 1;
                    while j < n && b[j].is_ascii_digit() {
                        j += 1;
                    }
                    if j < n && (ident_cont(b[j]) || b[j] >= 0x80) {
                        return None;
                    }
                    i = j;
                }
                _ => {
                    let (end, _) = dollar_quoted(b, i)?;
                    replace(&mut key, &mut copied, i, end, b'd', b'-');
                    i = end;
                }
            },
            b'0'..=b'9' => {
                let (end, kind) = number(b, i)?;
                // None: a large integer, kept verbatim
                if let Some(k) = kind {
                    replace(&mut key, &mut copied, i, end, k, b'-');
                }
                i = end;
            }
            b'.' if next.is_some_and(|d| d.is_ascii_digit()) => return None,
            b'u' | b'U' if next == Some(b'&') && matches!(b.get(i + 2), Some(b'\'' | b'"')) => return None,
            b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == Some(b'\'') => {
                let kind = c.to_ascii_lowercase();
                let (end, len, backslash) =
                    if kind == b'e' { escape_string(b, i + 2)? } else { prefixed_string(b, i + 2)? };
                string_not_continued(b, end)?;
                // E'…' / X'…' with a backslash: escapes that sqlparser and Postgres decode (and
                // may reject) by content. Kept verbatim.
                if !(backslash && matches!(kind, b'e' | b'x')) {
                    replace(&mut key, &mut copied, i, end, kind, size_class(len));
                }
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let mut j = i + 1;
                while j < n && ident_cont(b[j]) {
                    j += 1;
                }
                if j < n && b[j] >= 0x80 {
                    return None;
                }
                i = j;
            }
            c if !(0x20..0x7f).contains(&c) => return None, // control characters, non-ASCII
            _ => i += 1,                                    // operators and punctuation
        }
    }
    if literals.is_empty() {
        return None;
    }
    key.push_str(&sql[copied..]);
    Some(Normalized { key, literals })
}

/// End (exclusive) of a nested `/* … */` comment starting at `i`.
fn block_comment_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// `'…'` contents from `i` (after the opening quote): (end after the closing quote, decoded
/// length in bytes). `''` is a quote; a backslash is an ordinary character.
fn plain_string(b: &[u8], mut i: usize) -> Option<(usize, usize)> {
    let mut len = 0usize;
    while i < b.len() {
        if b[i] == b'\'' {
            if b.get(i + 1) == Some(&b'\'') {
                len += 1;
                i += 2;
                continue;
            }
            return Some((i + 1, len));
        }
        len += 1;
        i += 1;
    }
    None
}

/// `B'…'`, `X'…'`, `N'…'` from `i` (after the quote): (end, length, holds a backslash).
fn prefixed_string(b: &[u8], i: usize) -> Option<(usize, usize, bool)> {
    let (end, len) = plain_string(b, i)?;
    Some((end, len, b[i..end].contains(&b'\\')))
}

/// `E'…'` from `i` (after the quote): a backslash escapes the next character, `''` is a quote.
/// The length is only meaningful without backslashes.
fn escape_string(b: &[u8], mut i: usize) -> Option<(usize, usize, bool)> {
    let mut len = 0usize;
    let mut backslash = false;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                backslash = true;
                i += 2;
            }
            b'\'' if b.get(i + 1) == Some(&b'\'') => {
                len += 1;
                i += 2;
            }
            b'\'' => return Some((i + 1, len, backslash)),
            _ => {
                len += 1;
                i += 1;
            }
        }
    }
    None
}

/// A string literal must not be followed (across whitespace and comments) by another `'…'`:
/// Postgres concatenates such strings when a newline separates them, sqlparser never does.
fn string_not_continued(b: &[u8], mut i: usize) -> Option<()> {
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = block_comment_end(b, i)?,
            b'\'' => return None,
            _ => return Some(()),
        }
    }
    Some(())
}

/// End after the closing quote of a `"…"` identifier (contents from `i`; `""` is a quote).
fn quoted_identifier_end(b: &[u8], mut i: usize) -> Option<usize> {
    while i < b.len() {
        if b[i] == b'"' {
            if b.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// `$tag$…$tag$` starting at `i` (the first `$`): (end, body length). The tag is ASCII
/// `[A-Za-z_][A-Za-z0-9_]*` or empty; anything else after `$` (a lone `$`, a non-ASCII tag) is
/// refused.
fn dollar_quoted(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let mut j = i + 1;
    if j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_') {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        return None;
    }
    let delim = &b[i..=j];
    let body = j + 1;
    let close = b[body..].windows(delim.len()).position(|w| w == delim)?;
    Some((body + close + delim.len(), close))
}

/// A number starting at `i` (a digit): (end, kind). Kind `i` for an integer Postgres reads as
/// `int4`, `f` for `digits.digits`, None (kept verbatim) for a larger integer. Anything else —
/// `1.`, `1..`, exponents, `0x…`, `1_000`, a letter, `$` or `.` right after — is refused.
fn number(b: &[u8], i: usize) -> Option<(usize, Option<u8>)> {
    let n = b.len();
    let mut j = i;
    while j < n && b[j].is_ascii_digit() {
        j += 1;
    }
    let mut kind = None;
    if j < n && b[j] == b'.' {
        if !b.get(j + 1).is_some_and(u8::is_ascii_digit) {
            return None;
        }
        j += 1;
        while j < n && b[j].is_ascii_digit() {
            j += 1;
        }
        kind = Some(b'f');
    }
    if j < n && (ident_cont(b[j]) || b[j] == b'.' || b[j] >= 0x80) {
        return None;
    }
    if kind.is_none() {
        let mut value = 0u64;
        let small = b[i..j].iter().all(|d| {
            value = value * 10 + u64::from(d - b'0');
            value <= i32::MAX as u64
        });
        kind = small.then_some(b'i');
    }
    Some((j, kind))
}

impl Normalized {
    /// Did every replaced literal become a literal value (`Expr::Value`) in the parsed
    /// statements, spanning exactly that literal's text?
    ///
    /// A literal that sqlparser turned into something else — an identifier
    /// (`SET NAMES 'big5'`), a COPY option character, a file name or program of `COPY`, a
    /// type modifier (`varchar(10)`), a count (`FETCH 5`) — is part of the statement's
    /// structure, not a value, and its contents may decide things without any code looking
    /// at a `Value`. Then the analysis of this text must not be reused for other texts with
    /// the same key. (`stmts` must come from parsing the text this was computed from.)
    pub(crate) fn values_cover_literals(&self, sql: &str, stmts: &[Statement]) -> bool {
        let mut spans = ValueSpans(Vec::new());
        for s in stmts {
            let _ = s.visit(&mut spans);
        }
        let mut spans = spans.0;
        spans.sort_by_key(|&(s, e)| (s.line, s.column, e.line, e.column));
        let locations = self.locations(sql);
        locations.iter().all(|want| {
            spans
                .binary_search_by_key(&(want.0.line, want.0.column, want.1.line, want.1.column), |&(s, e)| {
                    (s.line, s.column, e.line, e.column)
                })
                .is_ok()
        })
    }

    /// (start, end) of each literal as sqlparser's tokenizer counts them: lines from 1 at
    /// each `\n`, columns from 1 in characters; the end is the position after the literal.
    fn locations(&self, sql: &str) -> Vec<(Location, Location)> {
        let mut marks: Vec<usize> = Vec::with_capacity(self.literals.len() * 2);
        for r in &self.literals {
            marks.push(r.start);
            marks.push(r.end);
        }
        // Literals are in order and do not overlap, so `marks` is sorted.
        let mut at = Vec::with_capacity(marks.len());
        let (mut line, mut column) = (1u64, 1u64);
        let mut m = 0;
        for (off, ch) in sql.char_indices().chain(std::iter::once((sql.len(), '\0'))) {
            while m < marks.len() && marks[m] == off {
                at.push(Location { line, column });
                m += 1;
            }
            if ch == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        at.chunks(2).filter_map(|p| Some((*p.first()?, *p.get(1)?))).collect()
    }
}

/// Spans of the literal values in an AST (booleans, NULL and placeholders are keywords or
/// parameters, not literals).
struct ValueSpans(Vec<(Location, Location)>);

impl Visitor for ValueSpans {
    type Break = ();
    fn pre_visit_value(&mut self, v: &ValueWithSpan) -> ControlFlow<()> {
        if !matches!(v.value, Value::Boolean(_) | Value::Null | Value::Placeholder(_)) {
            self.0.push((v.span.start, v.span.end));
        }
        ControlFlow::Continue(())
    }
}

/// Does an AST node contain a literal value?
pub(crate) fn has_literal<T: Visit>(node: &T) -> bool {
    struct Any;
    impl Visitor for Any {
        type Break = ();
        fn pre_visit_value(&mut self, v: &ValueWithSpan) -> ControlFlow<()> {
            if matches!(v.value, Value::Boolean(_) | Value::Null | Value::Placeholder(_)) {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        }
    }
    node.visit(&mut Any).is_break()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (text, expected key with `?` for `\0`, or None)
    #[rustfmt::skip]
    const CASES: &[(&str, Option<&str>)] = &[
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", Some("SELECT abalance FROM pgbench_accounts WHERE aid = ?i-;")),
        ("select 'abc', '', 'x', 'it''s'", Some("select ?s2, ?s0, ?s1, ?s2")),
        ("SELECT 1.50, 0, 007", Some("SELECT ?f-, ?i-, ?i-")),
        // negative numbers: the minus is an operator and stays
        ("UPDATE t SET a = a + -5 WHERE b = - 3", Some("UPDATE t SET a = a + -?i- WHERE b = - ?i-")),
        ("SELECT 1-2", Some("SELECT ?i--?i-")),
        // `--` starts a comment even right after a number
        ("SELECT 1--2\n, 3", Some("SELECT ?i---2\n, ?i-")),
        // casts, typed literals
        ("SELECT '5'::int, 't'::regclass, DATE '2025-01-01'", Some("SELECT ?s1::int, ?s1::regclass, DATE ?s2")),
        ("SELECT nextval('seq')", Some("SELECT nextval(?s2)")),
        // prefixed strings
        ("SELECT E'a''b', e'x', B'101', X'FF', N'n'", Some("SELECT ?e2, ?e1, ?b2, ?x2, ?n1")),
        // E'…' / X'…' with a backslash stay verbatim (escapes)
        ("SELECT E'a\\'b', 7", Some("SELECT E'a\\'b', ?i-")),
        ("SELECT X'\\', 7", Some("SELECT X'\\', ?i-")),
        // a backslash in a standard string is an ordinary character
        ("SELECT 'a\\', 7", Some("SELECT ?s2, ?i-")),
        // dollar quotes, with and without tags; $n parameters are not literals
        ("DO $$BEGIN NULL; END$$", Some("DO ?d-")),
        ("SELECT $f$ it's $g$ $f$, $1, $22", Some("SELECT ?d-, $1, $22")),
        // identifiers that end in e/b/x/n, or contain $, are identifiers
        ("SELECT type'x', abc$1, n1", Some("SELECT type?s1, abc$1, n1")),
        // literal-looking things in comments and quoted identifiers stay
        ("SELECT /* 'a' 1 /* nested 2 */ 3 */ \"it's 5\" -- 'x' 6\n, 7", Some("SELECT /* 'a' 1 /* nested 2 */ 3 */ \"it's 5\" -- 'x' 6\n, ?i-")),
        ("SELECT \"a\"\"b\", 1", Some("SELECT \"a\"\"b\", ?i-")),
        // a comment ends at \r, too
        ("SELECT 1 --x\r, 2", Some("SELECT ?i- --x\r, ?i-")),
        // non-ASCII inside literals, comments and quoted identifiers is fine
        ("SELECT 'é', \"é\" /* é */", Some("SELECT ?s2, \"é\" /* é */")),
        // large integers are numeric in Postgres: verbatim
        ("SELECT 2147483647, 2147483648, 99999999999999999999999", Some("SELECT ?i-, 2147483648, 99999999999999999999999")),
        // no literal at all: nothing to normalize
        ("SELECT a FROM t WHERE b = $1", None),
        ("BEGIN", None),
        ("", None),
        // unterminated quotes and comments
        ("SELECT 'abc", None),
        ("SELECT 1, \"abc", None),
        ("SELECT 1 /* abc", None),
        ("SELECT 1 /* a /* b */", None),
        ("SELECT $$abc", None),
        ("SELECT $a$abc$b$", None),
        ("SELECT E'abc\\'", None),
        // forms Postgres and sqlparser may read differently
        ("SELECT .5", None),
        ("SELECT 1.", None),
        ("SELECT 1.5.6", None),
        ("SELECT 1e5", None),
        ("SELECT 0x1F", None),
        ("SELECT 1_000", None),
        ("SELECT 123abc", None),
        ("SELECT $1abc, 2", None),
        ("SELECT $1$, 2", None),
        ("SELECT t.1, 2", None),
        ("SELECT $ 1", None),
        ("SELECT $é$x$é$", None),
        ("SELECT U&'\\0041', 1", None),
        ("SELECT U&\"\\0041\" UESCAPE '!', 1", None),
        ("SELECT 'a'\n'b'", None),
        ("SELECT 'a' /* c */ 'b'", None),
        ("SELECT café, 1", None),
        ("SELECT 1\u{b}", None),
        ("SELECT 1\0", None),
        ("SELECT\u{a0}1", None),
    ];

    #[test]
    fn keys() {
        let mut failures = Vec::new();
        for (sql, want) in CASES {
            let got = normalize(sql).map(|n| n.key.replace('\0', "?"));
            if got.as_deref() != *want {
                failures.push(format!("{sql:?}: want {want:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// Texts that differ only in literal values (same kind and size class) share a key; a
    /// different kind, size class, or anything outside a literal gives another key.
    #[test]
    fn same_and_different_keys() {
        #[rustfmt::skip]
        let same: &[(&str, &str)] = &[
            ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;", "SELECT abalance FROM pgbench_accounts WHERE aid = 999999;"),
            ("SELECT set_config('role', 'admin', false)", "SELECT set_config('role', 'app', false)"),
            ("SET search_path TO 'xx'", "SET search_path TO 'yy'"),
            ("DELETE FROM t WHERE 1 = 1", "DELETE FROM t WHERE 1 = 2"),
            ("DO $$BEGIN NULL; END$$", "DO $$BEGIN PERFORM pg_read_file('x'); END$$"),
            ("COPY t TO PROGRAM 'gzip > /tmp/x'", "COPY t TO PROGRAM 'curl evil'"),
            ("SELECT 1.5", "SELECT 22.75"),
        ];
        for (a, b) in same {
            assert_eq!(normalize(a).map(|n| n.key), normalize(b).map(|n| n.key), "{a:?} vs {b:?}");
            assert!(normalize(a).is_some(), "{a:?}");
        }
        #[rustfmt::skip]
        let different: &[(&str, &str)] = &[
            ("SELECT 1", "SELECT '1'"),
            ("SELECT 'a'", "SELECT E'a'"),
            ("SELECT 'a'", "SELECT 'ab'"),
            ("SELECT ''", "SELECT 'a'"),
            ("SELECT 1", "SELECT 1.0"),
            ("SELECT 1", "SELECT -1"),
            ("COPY t TO PROGRAM 'x'", "COPY t TO 'x'"),
            ("SELECT 1 -- a\n", "SELECT 1 -- b\n"),
            ("SELECT \"a\", 1", "SELECT \"b\", 1"),
            ("SELECT 1", "select 1"),
            ("SELECT $1, 1", "SELECT $2, 1"),
        ];
        for (a, b) in different {
            assert_ne!(normalize(a).map(|n| n.key), normalize(b).map(|n| n.key), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn literal_ranges() {
        let sql = "SELECT E'x', 12, $q$a$q$ FROM t WHERE c = 'it''s'";
        let n = normalize(sql).expect("normalizes");
        let lits: Vec<&str> = n.literals.iter().map(|r| &sql[r.clone()]).collect();
        assert_eq!(lits, ["E'x'", "12", "$q$a$q$", "'it''s'"]);
    }

    /// Garbage never panics, and whatever comes out is consistent: the key is the text with
    /// the literal ranges replaced, each by a 3-byte placeholder.
    #[test]
    fn garbage_never_panics() {
        let alphabet: &[u8] = b"'\"$-/*.eEbBxXnNuU&0123456789 \n\r\t;:()_aZ\\\0\x0b\xc3\xa9";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..50_000 {
            let len = (rnd() % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| if round % 3 == 0 { rnd() as u8 } else { alphabet[(rnd() as usize) % alphabet.len()] })
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            if let Some(n) = normalize(&text) {
                let mut rebuilt = String::new();
                let mut at = 0;
                for r in &n.literals {
                    assert!(r.start >= at && r.end > r.start && r.end <= text.len(), "{text:?}");
                    rebuilt.push_str(&text[at..r.start]);
                    rebuilt.push_str("\0??");
                    at = r.end;
                }
                rebuilt.push_str(&text[at..]);
                assert_eq!(rebuilt.len(), n.key.len(), "{text:?}");
                assert!(!n.literals.is_empty());
                // Locations never panic either.
                let _ = n.locations(&text);
            }
        }
    }
}
