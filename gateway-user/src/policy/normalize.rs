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

    #[test]
    fn negative_numbers_are_covered_at_the_sign() {
        let n = normalize("SELECT -5").unwrap();
        assert!(n.covered_by(&[7]));
        assert!(!n.covered_by(&[3]));
    }
}
