//! How much SQL pgward hands to sqlparser.
//!
//! sqlparser builds chains of binary operators, casts, subscripts and set operations in
//! loops, so `SELECT 1+1+…+1` with 100 000 terms, or 100 000 `SELECT 1` joined by `UNION ALL`,
//! parses into a tree 100 000 levels deep — and everything that walks, clones or drops that
//! tree recurses once per level. One such statement overflowed the event loop's stack and
//! took the whole gateway (every session) down. Nesting through parentheses, subqueries,
//! `NOT`, `CASE`, … is already bounded by sqlparser's recursion limit; the loops are not.
//!
//! So before parsing, [`nesting_bound`] reads the tokens and bounds how deep the tree can be:
//! each loop iteration that deepens the tree consumes an operator token or one of a few
//! keywords (`AND`, `OR`, `IS`, `UNION`, `COLLATE`, …), so their count per statement, plus the
//! deepest parenthesis nesting, bounds the depth. Literals, placeholders, commas and other
//! words do not count, so long `IN (…)` lists and multi-row `VALUES` stay parseable. A
//! statement over [`MAX_NESTING`] is not parsed: the policy treats it as unparsable (a
//! lexical scan, then the identity's `unparsable` setting; masking treats its columns as
//! unknown). Texts over [`MAX_PARSE_BYTES`] are not parsed or scanned at all, and the policy
//! denies them outright (`builtin:too-large`).

use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

/// Longest statement text (a simple-query string or a Parse's text) pgward parses: 1 MiB.
/// Parsing costs ~0.5–2 µs per byte on the event loop, and the tokens and tree ~30× the
/// text's size in memory.
pub const MAX_PARSE_BYTES: usize = 1 << 20;

/// Most tokens that may deepen the tree, per statement ([`nesting_bound`]). The policy's
/// and masking's walks of the deepest such tree, and its drop, fit half a 64 MiB stack in a debug
/// build (test `deepest_allowed_statements_fit_a_small_stack`; 16 000 levels do not); the
/// event loops have 64 MiB (`server`).
pub const MAX_NESTING: usize = 4000;

/// Keywords that continue an expression or a set operation in sqlparser's loops (its
/// `get_next_precedence` for PostgreSQL and the set-operator loop).
const CHAIN_KEYWORDS: &[Keyword] = &[
    Keyword::AND,
    Keyword::OR,
    Keyword::XOR,
    Keyword::NOT,
    Keyword::IS,
    Keyword::NOTNULL,
    Keyword::IN,
    Keyword::BETWEEN,
    Keyword::LIKE,
    Keyword::ILIKE,
    Keyword::RLIKE,
    Keyword::REGEXP,
    Keyword::SIMILAR,
    Keyword::GLOB,
    Keyword::MATCH,
    Keyword::MEMBER,
    Keyword::OVERLAPS,
    Keyword::OPERATOR,
    Keyword::DIV,
    Keyword::MOD,
    Keyword::AT,
    Keyword::COLLATE,
    Keyword::ESCAPE,
    Keyword::UNION,
    Keyword::INTERSECT,
    Keyword::EXCEPT,
    Keyword::MINUS,
];

/// An upper bound on the depth of the tree sqlparser would build from `tokens`: the most
/// tree-deepening tokens in one statement (between top-level `;`), plus the deepest
/// parenthesis nesting. A `.` right after a word continues a qualified name (one flat list)
/// and does not count.
pub(crate) fn nesting_bound(tokens: &[TokenWithSpan]) -> usize {
    let (mut most, mut here, mut depth, mut deepest) = (0usize, 0usize, 0usize, 0usize);
    let mut after_word = false;
    for t in tokens {
        let word = matches!(t.token, Token::Word(_));
        match &t.token {
            Token::Whitespace(_) => continue,
            // `schema.table.column`: one flat name, however long.
            Token::Period if after_word => {}
            Token::SemiColon => {
                most = most.max(here);
                here = 0;
            }
            Token::LParen => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            Token::RParen => depth = depth.saturating_sub(1),
            Token::Word(w) => {
                if w.quote_style.is_none() && CHAIN_KEYWORDS.contains(&w.keyword) {
                    here += 1;
                }
            }
            Token::EOF
            | Token::Comma
            | Token::Number(..)
            | Token::Placeholder(_)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_) => {}
            _ => here += 1,
        }
        after_word = word;
    }
    most.max(here) + deepest
}

/// Whether pgward parses `tokens` at all ([`nesting_bound`] within [`MAX_NESTING`]).
pub(crate) fn parseable(tokens: &[TokenWithSpan]) -> bool {
    nesting_bound(tokens) <= MAX_NESTING
}

/// `Parser::parse_sql` for PostgreSQL within the limits: None when the text is too long, does
/// not tokenize, may nest too deep, or does not parse.
pub fn parse_sql(sql: &str) -> Option<Vec<Statement>> {
    if sql.len() > MAX_PARSE_BYTES {
        return None;
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location().ok()?;
    if !parseable(&tokens) {
        return None;
    }
    Parser::new(&PostgreSqlDialect {}).with_tokens_with_locations(tokens).parse_statements().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::lineage::{self, Resolver};

    /// Every column of every table is masked by rule 1, so lineage follows every expression.
    struct AllMasked;
    impl Resolver for AllMasked {
        fn rules_for(&self, _: Option<&str>, _: &str, _: Option<&str>) -> u64 {
            1
        }
        fn columns_of(&self, _: Option<&str>, _: &str) -> Option<Vec<String>> {
            Some(vec!["a".into(), "b".into()])
        }
    }

    fn tokens(sql: &str) -> Vec<TokenWithSpan> {
        Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location().expect("tokenizes")
    }

    /// Statements whose tree is (about) `n` levels deep, each built by one of sqlparser's loops.
    fn chains(n: usize) -> Vec<(&'static str, String)> {
        let k = n - 1;
        vec![
            ("plus", format!("SELECT a{}", " + a".repeat(k))),
            ("and", format!("SELECT a FROM t WHERE a{}", " AND a".repeat(k))),
            ("or-eq", format!("SELECT a FROM t WHERE a = 1{}", " OR a = 1".repeat(k / 2))),
            ("concat", format!("SELECT a{}", " || 'x'".repeat(k))),
            ("cast", format!("SELECT a{} FROM t", "::text".repeat(k))),
            ("subscript", format!("SELECT a{} FROM t", "[1]".repeat(k / 2))),
            ("field", format!("SELECT (a){} FROM t", "[1].f".repeat(k / 3))),
            ("json", format!("SELECT a{} FROM t", " -> 'k'".repeat(k))),
            ("collate", format!("SELECT a{} FROM t", " COLLATE \"C\"".repeat(k))),
            ("is-null", format!("SELECT a{} FROM t", " IS NULL".repeat(k))),
            ("at-time-zone", format!("SELECT a{} FROM t", " AT TIME ZONE 'UTC'".repeat(k))),
            ("union", format!("SELECT a FROM t{}", " UNION ALL SELECT a FROM t".repeat(k))),
            ("except", format!("SELECT a FROM t{}", " EXCEPT SELECT b FROM t".repeat(k))),
            ("insert-select", format!("INSERT INTO t SELECT a FROM t WHERE a{}", " - 1".repeat(k))),
        ]
    }

    #[test]
    fn bounds_count_chain_tokens_not_lists() {
        let cases: &[(&str, usize)] = &[
            ("SELECT 1", 0),
            ("SELECT 1 + 2 * 3", 2),
            ("SELECT a FROM t WHERE a = 1 AND b IS NULL", 3),
            ("SELECT (((1)))", 3),
            ("SELECT 1 UNION SELECT 2 UNION SELECT 3", 2),
            // A statement's count ends at `;`: the longest statement counts.
            ("SELECT 1 + 1 + 1; SELECT 1 + 1", 2),
            // Lists, literals, placeholders and plain words do not deepen the tree.
            ("SELECT a, b, c FROM t WHERE a IN (1, 2, 3, 4, 5, 6, 'x', $1, $2)", 2),
            ("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, 'z')", 1),
            // Quoted words are identifiers, never operators.
            ("SELECT \"and\", \"or\" FROM t", 0),
            // Qualified names are flat; a field of a parenthesized value is a step.
            ("SELECT s.t.a, \"T\".\"b\" FROM s.t", 0),
            ("SELECT (f(x)).a.b", 3),
        ];
        for (sql, want) in cases {
            assert_eq!(nesting_bound(&tokens(sql)), *want, "{sql}");
        }
        let values = format!("INSERT INTO t VALUES {}", vec!["(1, 'x', $1, NULL, true)"; 30_000].join(", "));
        assert_eq!(nesting_bound(&tokens(&values)), 1, "a long multi-row VALUES list");
        assert!(parse_sql(&values).is_some());
        let in_list = format!("SELECT * FROM t WHERE a IN ({})", (0..100_000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        assert!(parse_sql(&in_list).is_some(), "a long IN list");
    }

    /// The deepest statements lineage parses are analyzed and dropped on half the stack pgward's threads have — the
    /// event loops have 64 MiB. A few levels deeper, lineage gives up.
    #[test]
    fn deepest_allowed_statements_fit_a_small_stack() {
        let run = std::thread::Builder::new()
            .stack_size(32 << 20)
            .spawn(|| {
                for (name, sql) in chains(MAX_NESTING) {
                    let b = nesting_bound(&tokens(&sql));
                    assert!(b <= MAX_NESTING && b + 3 >= MAX_NESTING, "{name}: bound {b}");
                    assert!(lineage::analyze(&sql, &AllMasked).is_some(), "{name}: lineage at the limit");
                }
                for (name, sql) in chains(MAX_NESTING + 4) {
                    assert!(lineage::analyze(&sql, &AllMasked).is_none(), "{name}: lineage beyond the limit");
                    assert!(parse_sql(&sql).is_none(), "{name}");
                }
            })
            .expect("thread");
        assert!(run.join().is_ok());
    }

    #[test]
    fn texts_over_the_byte_limit_are_not_parsed() {
        let sql = format!("SELECT 1 /* {} */", "x".repeat(MAX_PARSE_BYTES));
        assert!(parse_sql(&sql).is_none());
        assert!(parse_sql("SELECT 1").is_some());
    }
}
