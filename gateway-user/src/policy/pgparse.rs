//! Postgres's own parser and lexer (libpg_query, through the `pg_query` crate, built from the
//! PostgreSQL 15 sources): the one place pgward turns SQL text into a tree.
//!
//! [`parse`] returns the raw parse tree as libpg_query's JSON (every node type written by
//! generated code, so a walk over it sees every node in every position) and [`scan`] the
//! server lexer's tokens. Both read the text exactly as a PostgreSQL 15 server with
//! `standard_conforming_strings = on` and a UTF-8 encoding does; the session keeps those
//! settings fixed (see `session`).
//!
//! Bounds: texts with a NUL byte are not handed over (C strings end there; the session refuses
//! such messages before they get here). The grammar is a table-driven bison parser (no
//! recursion), but writing the tree out, reading it and walking it recurse once per level,
//! and `1+1+…+1` is one level per `+`. So before parsing, [`nesting_bound`] bounds the depth
//! from the lexer's tokens, and texts over [`MAX_NESTING`] are reported as
//! [`ParseError::TooDeep`] without being parsed; trees deeper than [`MAX_TREE_DEPTH`] JSON
//! levels are refused the same way before they are read.

use std::ffi::{CStr, CString, c_char, c_int};

use serde_json::Value;

/// Deepest JSON nesting of a parse tree pgward walks (about half as many tree levels). Each
/// level costs a few hundred bytes of stack in the JSON reader, the walk and the drop; the
/// event loops and the blocking pool run on 64 MiB stacks, the CLI on the main thread's 8 MiB.
pub const MAX_TREE_DEPTH: usize = 16_000;

/// Most tree-deepening tokens per statement ([`nesting_bound`]) pgward parses. The deepest
/// such tree is written, read, walked and dropped within half of a 64 MiB thread stack in a
/// debug build (test `deepest_allowed_statements_fit_a_small_stack`); every thread that
/// parses has 64 MiB.
pub const MAX_NESTING: usize = 4000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The server would reject the text too (syntax or lexical error): the message and the
    /// 1-based character position Postgres reports.
    Syntax { message: String, cursor: i32 },
    /// The text holds a NUL byte.
    Nul,
    /// The tree is deeper than [`MAX_TREE_DEPTH`].
    TooDeep,
    /// libpg_query returned something pgward could not read (never expected).
    Internal(String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Syntax { message, cursor } => write!(f, "{message} (at character {cursor})"),
            ParseError::Nul => f.write_str("the text holds a NUL byte"),
            ParseError::TooDeep => write!(f, "the statement nests deeper than pgward checks ({MAX_TREE_DEPTH} levels)"),
            ParseError::Internal(m) => write!(f, "parser: {m}"),
        }
    }
}

#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

// libpg_query's JSON entry points (pg_query.h), linked statically by the `pg_query` crate.
unsafe extern "C" {
    fn pg_query_parse(input: *const c_char) -> PgQueryParseResult;
    fn pg_query_free_parse_result(result: PgQueryParseResult);
}

/// The raw parse tree of `sql` (`{"version":…,"stmts":[{"stmt":{…},"stmt_location":…}]}`).
pub fn parse(sql: &str) -> Result<Value, ParseError> {
    match scan(sql) {
        Some(toks) if nesting_bound(&toks) > MAX_NESTING => return Err(ParseError::TooDeep),
        // A text that does not lex does not parse either: the parser reports the error.
        _ => {}
    }
    let json = parse_json(sql)?;
    if json_depth(json.as_bytes()) > MAX_TREE_DEPTH {
        return Err(ParseError::TooDeep);
    }
    // The depth is bounded above; serde_json's own limit (128) would refuse ordinary queries.
    let mut de = serde_json::Deserializer::from_str(&json);
    de.disable_recursion_limit();
    serde::Deserialize::deserialize(&mut de).map_err(|e: serde_json::Error| ParseError::Internal(e.to_string()))
}

fn parse_json(sql: &str) -> Result<String, ParseError> {
    let input = CString::new(sql).map_err(|_| ParseError::Nul)?;
    // SAFETY: `input` is a valid NUL-terminated string that outlives the call; the result's
    // pointers are either null or NUL-terminated strings owned by the result, read before it
    // is freed exactly once.
    unsafe {
        let r = pg_query_parse(input.as_ptr());
        let out = if !r.error.is_null() {
            let e = &*r.error;
            let message = if e.message.is_null() {
                "syntax error".to_string()
            } else {
                CStr::from_ptr(e.message).to_string_lossy().into_owned()
            };
            Err(ParseError::Syntax { message, cursor: e.cursorpos })
        } else if r.parse_tree.is_null() {
            Err(ParseError::Internal("no parse tree".into()))
        } else {
            Ok(CStr::from_ptr(r.parse_tree).to_string_lossy().into_owned())
        };
        pg_query_free_parse_result(r);
        out
    }
}

/// Deepest nesting of objects and arrays in a JSON text (strings skipped).
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in json {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// What kind of token the server's lexer saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokKind {
    /// A constant: string (any form), bit string, integer or numeric. The char tells them
    /// apart in normalized keys.
    Const(char),
    /// `-` on its own (a negative constant's sign when it precedes one).
    Minus,
    /// A comment.
    Comment,
    /// An operator or keyword that can put one more level on the tree (`+`, `::`, `IS`,
    /// `UNION`, `JOIN`, …). `AND` and `OR` do not: the grammar flattens their chains.
    Deepen,
    Open,
    Close,
    Semicolon,
    /// Anything else: keywords, identifiers, operators, punctuation, parameters.
    Other,
}

/// One token: byte range in the text and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tok {
    pub start: usize,
    pub end: usize,
    pub kind: TokKind,
}

/// The server lexer's tokens for `sql`; None when it reports a lexical error (an unterminated
/// string or comment, …) or the text holds a NUL.
pub fn scan(sql: &str) -> Option<Vec<Tok>> {
    use pg_query::protobuf::Token as T;
    if sql.as_bytes().contains(&0) {
        return None;
    }
    let r = pg_query::scan(sql).ok()?;
    let mut out = Vec::with_capacity(r.tokens.len());
    for t in r.tokens {
        let kind = match T::from_i32(t.token) {
            Some(T::Sconst | T::Usconst) => TokKind::Const('s'),
            Some(T::Bconst | T::Xconst) => TokKind::Const('b'),
            Some(T::Iconst) => TokKind::Const('i'),
            Some(T::Fconst) => TokKind::Const('f'),
            Some(T::Ascii45) => TokKind::Minus,
            Some(T::SqlComment | T::CComment) => TokKind::Comment,
            Some(T::Ascii40) => TokKind::Open,
            Some(T::Ascii41) => TokKind::Close,
            Some(T::Ascii59) => TokKind::Semicolon,
            Some(
                T::Op
                | T::Ascii37
                | T::Ascii42
                | T::Ascii43
                | T::Ascii46
                | T::Ascii47
                | T::Ascii60
                | T::Ascii61
                | T::Ascii62
                | T::Ascii91
                | T::Ascii94
                | T::Typecast
                | T::LessEquals
                | T::GreaterEquals
                | T::NotEquals
                | T::At
                | T::Between
                | T::Case
                | T::Collate
                | T::Escape
                | T::Except
                | T::Ilike
                | T::InP
                | T::Intersect
                | T::Is
                | T::Isnull
                | T::Join
                | T::Like
                | T::Not
                | T::Notnull
                | T::Operator
                | T::Overlaps
                | T::Similar
                | T::Union,
            ) => TokKind::Deepen,
            _ => TokKind::Other,
        };
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        if start > end || end > sql.len() {
            return None;
        }
        out.push(Tok { start, end, kind });
    }
    Some(out)
}

/// An upper bound on the depth of the tree the parser builds from `toks`: the most
/// tree-deepening tokens in one statement (a `-` right before a constant is part of it), plus
/// the deepest parenthesis nesting. Lists, constants, names, `AND`/`OR` do not count, so long
/// `IN (…)` lists and multi-row `VALUES` stay parseable.
pub fn nesting_bound(toks: &[Tok]) -> usize {
    let (mut best, mut count, mut depth, mut max_depth) = (0usize, 0usize, 0usize, 0usize);
    let significant: Vec<&Tok> = toks.iter().filter(|t| t.kind != TokKind::Comment).collect();
    for (i, t) in significant.iter().enumerate() {
        match t.kind {
            TokKind::Deepen => count += 1,
            TokKind::Minus if !matches!(significant.get(i + 1).map(|n| n.kind), Some(TokKind::Const(_))) => count += 1,
            TokKind::Open => {
                depth += 1;
                max_depth = max_depth.max(depth);
            }
            TokKind::Close => depth = depth.saturating_sub(1),
            TokKind::Semicolon if depth == 0 => {
                best = best.max(count + max_depth);
                (count, max_depth) = (0, 0);
            }
            _ => {}
        }
    }
    best.max(count + max_depth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_operators_and_comments_as_the_server_does() {
        // `#--` is the operator `#` followed by a comment, not an operator `#--`.
        let v = parse("SELECT 1 #-- '\n2; RESET ROLE; DELETE FROM ledger").unwrap();
        assert_eq!(v["stmts"].as_array().unwrap().len(), 3);
        assert_eq!(v["stmts"][1]["stmt"]["VariableSetStmt"]["name"], "role");
    }

    #[test]
    fn errors_and_bounds() {
        assert!(matches!(parse("SELEC 1"), Err(ParseError::Syntax { .. })));
        assert_eq!(parse("SELECT 1\0; DROP TABLE t"), Err(ParseError::Nul));
        assert_eq!(json_depth(br#"{"a":[{"b":"{{{"}]}"#), 3);
        assert!(scan("SELECT 'unterminated").is_none());
        let toks = scan("SELECT -5, 'x'").unwrap();
        let kinds: Vec<TokKind> = toks.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [TokKind::Other, TokKind::Minus, TokKind::Const('i'), TokKind::Other, TokKind::Const('s')]);
    }

    fn bound(sql: &str) -> usize {
        nesting_bound(&scan(sql).unwrap())
    }

    #[test]
    fn bounds_count_deepening_tokens_not_lists() {
        assert_eq!(bound("SELECT 1"), 0);
        assert_eq!(bound("SELECT 1 + 2 * 3"), 2);
        assert_eq!(bound("SELECT -1, - 2, -a"), 1);
        assert_eq!(bound("SELECT (((1)))"), 3);
        assert_eq!(bound("SELECT 1 + 1 + 1; SELECT 1 + 1"), 2);
        assert_eq!(bound("SELECT a FROM t WHERE a = 1 AND b = 2 OR c = 3"), 3);
        assert_eq!(bound("SELECT a::int FROM s.t JOIN u ON true"), 3);
        assert_eq!(bound("SELECT '+ + +' /* + + */, \"+\""), 0);
        let values = format!("INSERT INTO t VALUES {}", vec!["(-1, 'x', $1, NULL, true)"; 30_000].join(", "));
        assert_eq!(bound(&values), 1);
    }

    /// Half the stack pgward's threads have (`server::LOOP_STACK`, and the CLI's worker).
    const STACK_FOR_TESTS: usize = 32 << 20;

    /// The deepest statements pgward parses are parsed, walked and dropped on half the stack
    /// pgward's threads have, in a debug build; one level more is refused before parsing.
    #[test]
    fn deepest_allowed_statements_fit_a_small_stack() {
        let run = std::thread::Builder::new()
            .stack_size(STACK_FOR_TESTS)
            .spawn(|| {
                let k = MAX_NESTING;
                let chains = [
                    format!("SELECT a{}", " + a".repeat(k)),
                    format!("SELECT a{} FROM t", "::text".repeat(k)),
                    format!("SELECT a FROM t{}", " UNION ALL SELECT a FROM t".repeat(k)),
                    format!("SELECT a FROM t{}", " JOIN t ON true".repeat(k)),
                    format!("SELECT {}1{}", "(".repeat(k), ")".repeat(k)),
                    format!("SELECT {}a", "NOT ".repeat(k)),
                    format!("SELECT {}1", "- ".repeat(k)),
                ];
                // Nested scalar subqueries put ~7 JSON levels on each: the JSON depth bound
                // stops them before the token bound does.
                let sub = |n: usize| format!("SELECT {}1{}", "(SELECT ".repeat(n), ")".repeat(n));
                assert!(parse(&sub(2000)).is_ok());
                assert_eq!(parse(&sub(2400)), Err(ParseError::TooDeep));
                for sql in &chains {
                    let r = parse(sql).map(|_| ());
                    assert!(r.is_ok(), "{} {r:?}", &sql[..40]);
                    let deeper = sql.replacen("SELECT ", "SELECT - - ", 1);
                    assert_eq!(parse(&deeper), Err(ParseError::TooDeep), "{}", &sql[..40]);
                }
            })
            .expect("thread");
        assert!(run.join().is_ok());
    }
}
