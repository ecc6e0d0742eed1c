//! A small, forgiving lexical scanner for SQL text the parser did not (or cannot) give an AST
//! for: statements the parser rejects, `DO` blocks, and function/procedure bodies.
//!
//! It never fails. It knows Postgres's comments (`--`, nested `/* */`), string forms (`'…'`,
//! `E'…'`, `$tag$…$tag$`) and quoted identifiers well enough to find words, and it scans the
//! contents of string literals as SQL too (bodies of `DO`/`CREATE FUNCTION` and `EXECUTE '…'`
//! are strings). Everything it reports is a conservative guess: it may see a function call or
//! an identity change that is not there, never the other way round for the forms it looks for.

use super::class::{ClassSet, ModSet, Modifier, QName, StatementClass};
use super::settings::setting_change;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lex {
    /// Identifier or keyword, lowercased (quoted identifiers too: matching is case-insensitive).
    Word(String),
    /// Contents of a string literal (any quoting form).
    Str(String),
    Punct(char),
}

/// Split `text` into [`Lex`] items (comments and whitespace dropped).
pub(crate) fn lex(text: &str) -> Vec<Lex> {
    let b: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let n = b.len();
    while i < n {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && i + 1 < n && b[i + 1] == '-' {
            i = skip_line_comment(&b, i);
        } else if c == '/' && i + 1 < n && b[i + 1] == '*' {
            i = skip_block_comment(&b, i);
        } else if c == '\'' {
            let (s, next) = quoted(&b, i + 1, '\'', false);
            out.push(Lex::Str(s));
            i = next;
        } else if (c == 'e' || c == 'E') && i + 1 < n && b[i + 1] == '\'' && !prev_is_ident(&b, i) {
            let (s, next) = quoted(&b, i + 2, '\'', true);
            out.push(Lex::Str(s));
            i = next;
        } else if (c == 'u' || c == 'U')
            && i + 2 < n
            && b[i + 1] == '&'
            && (b[i + 2] == '"' || b[i + 2] == '\'')
            && !prev_is_ident(&b, i)
        {
            // U&"…" / U&'…' with Unicode escapes: what Postgres sees is the decoded text,
            // with the escape character a following `UESCAPE 'c'` names.
            let q = b[i + 2];
            let (s, mut next) = quoted(&b, i + 3, q, false);
            let esc = match uescape(&b, next) {
                Some((c, after)) => {
                    next = after;
                    c
                }
                None => '\\',
            };
            let s = decode_unicode_escapes(&s, esc).unwrap_or(s);
            out.push(if q == '"' { word(&s) } else { Lex::Str(s) });
            i = next;
        } else if c == '"' {
            let (s, next) = quoted(&b, i + 1, '"', false);
            out.push(word(&s));
            i = next;
        } else if c == '$' {
            i = dollar(&b, i, &mut out);
        } else if c.is_alphabetic() || c == '_' {
            let mut j = i;
            while j < n && (b[j].is_alphanumeric() || b[j] == '_' || b[j] == '$') {
                j += 1;
            }
            out.push(word(&b[i..j].iter().collect::<String>()));
            i = j;
        } else if c.is_ascii_digit() {
            while i < n && (b[i].is_ascii_alphanumeric() || b[i] == '.' || b[i] == '_') {
                i += 1;
            }
        } else {
            out.push(Lex::Punct(c));
            i += 1;
        }
    }
    out
}

/// Postgres's longest identifier, in bytes (NAMEDATALEN - 1): a longer one is cut to it.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// An identifier as the server names it: lowercased (quoted ones too, see [`Lex::Word`]) and
/// cut to [`MAX_IDENTIFIER_BYTES`] at a character boundary, so that a 70-character spelling
/// of a 63-character masked column is that column.
fn word(s: &str) -> Lex {
    let mut w = s.to_lowercase();
    if w.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !w.is_char_boundary(end) {
            end -= 1;
        }
        w.truncate(end);
    }
    Lex::Word(w)
}

/// A `UESCAPE 'c'` clause at `i` (after whitespace and comments): the escape character and
/// the index after the clause.
fn uescape(b: &[char], i: usize) -> Option<(char, usize)> {
    let n = b.len();
    let mut j = skip_space(b, i);
    let word: String = b.get(j..j + 7)?.iter().collect();
    if !word.eq_ignore_ascii_case("uescape") || b.get(j + 7).is_some_and(|c| c.is_alphanumeric() || *c == '_') {
        return None;
    }
    j = skip_space(b, j + 7);
    if j >= n || b[j] != '\'' {
        return None;
    }
    let (s, next) = quoted(b, j + 1, '\'', false);
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Some((c, next)),
        _ => None,
    }
}

/// The index of the first character at or after `i` that is neither whitespace nor in a
/// comment.
fn skip_space(b: &[char], mut i: usize) -> usize {
    let n = b.len();
    loop {
        if i < n && b[i].is_whitespace() {
            i += 1;
        } else if i + 1 < n && b[i] == '-' && b[i + 1] == '-' {
            i = skip_line_comment(b, i);
        } else if i + 1 < n && b[i] == '/' && b[i + 1] == '*' {
            i = skip_block_comment(b, i);
        } else {
            return i;
        }
    }
}

/// Skip a `--` comment starting at `i`: returns the index of the newline (or the end).
fn skip_line_comment(b: &[char], mut i: usize) -> usize {
    let n = b.len();
    while i < n && b[i] != '\n' {
        i += 1;
    }
    i
}

/// Skip a `/* … */` comment starting at `i`, nested comments included: returns the index
/// after its end (or the end of the text).
fn skip_block_comment(b: &[char], mut i: usize) -> usize {
    let n = b.len();
    let mut depth = 0usize;
    while i < n {
        if b[i] == '/' && i + 1 < n && b[i + 1] == '*' {
            depth += 1;
            i += 2;
        } else if b[i] == '*' && i + 1 < n && b[i + 1] == '/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                break;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// At a `$` (index `i`): a `$n` parameter or a lone `$` (pushed as `Punct('$')`), or a
/// `$tag$ … $tag$` dollar-quoted string (its contents pushed as `Str`). Returns the index
/// after what it read.
fn dollar(b: &[char], i: usize, out: &mut Vec<Lex>) -> usize {
    let n = b.len();
    let mut j = i + 1;
    if j < n && b[j].is_ascii_digit() {
        while j < n && b[j].is_ascii_digit() {
            j += 1;
        }
        out.push(Lex::Punct('$'));
        return j;
    }
    while j < n && (b[j].is_alphanumeric() || b[j] == '_') {
        j += 1;
    }
    if j < n && b[j] == '$' {
        let tag: String = b[i..=j].iter().collect();
        let tag: Vec<char> = tag.chars().collect();
        let start = j + 1;
        let mut k = start;
        let mut end = None;
        while k + tag.len() <= n {
            if b[k..k + tag.len()] == tag[..] {
                end = Some(k);
                break;
            }
            k += 1;
        }
        let stop = end.unwrap_or(n);
        out.push(Lex::Str(b[start..stop].iter().collect()));
        end.map(|e| e + tag.len()).unwrap_or(n)
    } else {
        out.push(Lex::Punct('$'));
        i + 1
    }
}

fn prev_is_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_' || b[i - 1] == '$')
}

/// Read a quoted run starting after the opening quote; a doubled quote is a literal quote,
/// and with `backslash` a backslash escapes the next character. Returns (contents, index
/// after the closing quote).
fn quoted(b: &[char], mut i: usize, q: char, backslash: bool) -> (String, usize) {
    let mut s = String::new();
    while i < b.len() {
        let c = b[i];
        if backslash && c == '\\' && i + 1 < b.len() {
            s.push(b[i + 1]);
            i += 2;
        } else if c == q {
            if i + 1 < b.len() && b[i + 1] == q {
                s.push(q);
                i += 2;
            } else {
                return (s, i + 1);
            }
        } else {
            s.push(c);
            i += 1;
        }
    }
    (s, i)
}

/// What a lexical scan found.
#[derive(Debug, Default, Clone)]
pub(crate) struct Findings {
    /// The first few words of the text (lowercased), for the class guess.
    pub lead: Vec<String>,
    pub functions: Vec<QName>,
    /// Words and `a.b` pairs that might name tables (for unparsable statements).
    pub names: Vec<QName>,
    pub modifiers: ModSet,
}

/// Words that look like `word(` but are syntax, not function calls.
const NOT_FUNCTIONS: &[&str] = &[
    "in",
    "values",
    "exists",
    "any",
    "all",
    "some",
    "as",
    "and",
    "or",
    "not",
    "on",
    "using",
    "over",
    "filter",
    "array",
    "row",
    "into",
    "table",
    "from",
    "where",
    "select",
    "returns",
    "with",
    "when",
    "then",
    "else",
    "if",
    "elsif",
    "while",
    "loop",
    "return",
    "query",
    "by",
    "partition",
    "is",
    "distinct",
    "join",
    "lateral",
    "set",
    "update",
    "insert",
    "delete",
    "check",
    "references",
    "primary",
    "unique",
    "key",
    "default",
    "cast",
    "window",
    "group",
    "order",
    "having",
    "limit",
    "foreach",
    "perform",
    "execute",
    "format",
    "raise",
    "within",
    "ordinality",
    "case",
    "end",
];

/// Scan `text` (recursing into string literals up to a small depth).
pub(crate) fn scan(text: &str) -> Findings {
    let mut f = Findings::default();
    scan_into(text, 0, &mut f);
    f.functions.sort();
    f.functions.dedup();
    f.names.sort();
    f.names.dedup();
    f
}

fn scan_into(text: &str, depth: usize, f: &mut Findings) {
    let toks = lex(text);
    if depth == 0 {
        f.lead =
            toks.iter().filter_map(|t| if let Lex::Word(w) = t { Some(w.clone()) } else { None }).take(3).collect();
    }
    let t = Tokens(&toks);
    // Within the current (sub)statement: did we see UPDATE/INSERT (so `SET role = …` is a
    // column assignment, not SET ROLE)? Reset at `;` and block keywords.
    let mut in_dml = false;
    let mut has_settings_table = false;
    let mut has_write_word = false;
    for (i, tok) in toks.iter().enumerate() {
        match tok {
            Lex::Punct(';') => in_dml = false,
            Lex::Str(s) => {
                if depth < 3 {
                    scan_into(s, depth + 1, f);
                }
            }
            Lex::Word(w) => {
                let w = w.as_str();
                match w {
                    "begin" | "then" | "else" | "loop" | "do" => in_dml = false,
                    "update" | "insert" | "merge" => {
                        in_dml = true;
                        has_write_word = true;
                    }
                    "delete" | "truncate" | "copy" => has_write_word = true,
                    "pg_settings" => has_settings_table = true,
                    _ => {}
                }
                if w == "set" && !in_dml {
                    scan_set(&t, i, f);
                }
                scan_setting_word(&t, i, w, depth, f);
                scan_bound_function(&t, i, w, f);
                scan_call_or_name(&t, i, w, f);
            }
            Lex::Punct(_) => {}
        }
    }
    if has_settings_table && has_write_word {
        // UPDATE pg_settings … calls set_config() through the view's rule.
        f.modifiers.insert(Modifier::IdentityChange);
    }
}

/// The tokens of one text being scanned, looked at by index (out of range: nothing).
struct Tokens<'a>(&'a [Lex]);

impl Tokens<'_> {
    fn get(&self, i: usize) -> Option<&Lex> {
        self.0.get(i)
    }

    fn word(&self, i: usize) -> Option<&str> {
        match self.0.get(i) {
            Some(Lex::Word(w)) => Some(w.as_str()),
            _ => None,
        }
    }

    fn punct(&self, i: usize, c: char) -> bool {
        matches!(self.0.get(i), Some(Lex::Punct(p)) if *p == c)
    }

    /// The value of `name = v` / `name TO v` where `name` is token `i`.
    fn assigned_value(&self, i: usize) -> Option<String> {
        match (self.get(i + 1), self.get(i + 2)) {
            (Some(Lex::Punct('=')), Some(v)) => lex_value(v),
            (Some(Lex::Word(t)), Some(v)) if t == "to" => lex_value(v),
            _ => None,
        }
    }
}

/// `SET [SESSION|LOCAL] ROLE / SESSION AUTHORIZATION / <guc> …` at token `i` (outside DML).
fn scan_set(t: &Tokens<'_>, i: usize, f: &mut Findings) {
    let mut j = i + 1;
    if matches!(t.word(j), Some("session" | "local")) && t.word(j + 1) != Some("authorization") {
        j += 1;
    }
    if let Some(name) = t.word(j) {
        let value = t.assigned_value(j);
        let name =
            if name == "session" && t.word(j + 1) == Some("authorization") { "session_authorization" } else { name };
        f.modifiers |= setting_change(name, value.as_deref());
    }
}

/// Words other than `SET` that change (or may change) a setting pgward guards: RESET of the
/// identity, SESSION AUTHORIZATION, DISCARD ALL, standard_conforming_strings, search_path,
/// dynamic `EXECUTE` and `set_config(…)`.
fn scan_setting_word(t: &Tokens<'_>, i: usize, w: &str, depth: usize, f: &mut Findings) {
    if w == "reset" {
        let name = match (t.word(i + 1), t.word(i + 2)) {
            (Some("session"), Some("authorization")) => Some("session_authorization"),
            (Some(n), _) => Some(n),
            _ => None,
        };
        if let Some(n @ ("role" | "session_authorization")) = name {
            f.modifiers |= setting_change(n, None);
        }
    }
    if w == "session" && t.word(i + 1) == Some("authorization") {
        f.modifiers.insert(Modifier::IdentityChange);
    }
    if w == "discard" && t.word(i + 1) == Some("all") {
        f.modifiers.insert(Modifier::IdentityChange);
    }
    if w == "standard_conforming_strings" {
        // Assignments in ALTER ROLE/DATABASE … SET, or anything we cannot read:
        // only an explicit "= on" / "TO on" is harmless.
        let shown = i > 0 && matches!(t.word(i - 1), Some("show"));
        let value = t.assigned_value(i);
        if !shown {
            f.modifiers |= setting_change(w, Some(value.as_deref().unwrap_or("?")));
        }
    }
    if w == "search_path" {
        f.modifiers.insert(Modifier::SearchPath);
    }
    // PL/pgSQL `EXECUTE <expression>`: SQL text built at run time, unless the
    // expression is a single string constant (whose contents are scanned as well).
    if w == "execute" && depth == 0 {
        let constant = matches!(t.get(i + 1), Some(Lex::Str(_)))
            && matches!(t.get(i + 2), None | Some(Lex::Punct(';')) | Some(Lex::Word(_)));
        if !constant {
            f.modifiers.insert(Modifier::DynamicSql);
        }
    }
    if w == "set_config" && t.punct(i + 1, '(') {
        match (t.get(i + 2), t.get(i + 3)) {
            (Some(Lex::Str(name)), Some(Lex::Punct(','))) => {
                let value = t.get(i + 4).and_then(lex_value);
                f.modifiers |= setting_change(&name.to_lowercase(), value.as_deref());
            }
            (Some(Lex::Str(name)), Some(Lex::Punct(')'))) => {
                f.modifiers |= setting_change(&name.to_lowercase(), None);
            }
            // A computed parameter name could be anything, including 'role'.
            _ => f.modifiers.insert(Modifier::IdentityChange),
        }
    }
}

/// `<option> = [schema.]name` (or `= 'name'`) where the option binds a function for Postgres
/// to call later ([`super::bound::FUNCTION_OPTIONS`]: `sfunc = …` in CREATE AGGREGATE,
/// `function = …` in CREATE OPERATOR, …): the name counts as a function the body calls.
/// `set_config` named other than in a call may be bound that way: an identity change.
fn scan_bound_function(t: &Tokens<'_>, i: usize, w: &str, f: &mut Findings) {
    if w == "set_config" && !t.punct(i + 1, '(') {
        f.modifiers.insert(Modifier::IdentityChange);
    }
    if !super::bound::FUNCTION_OPTIONS.contains(&w) || !t.punct(i + 1, '=') {
        return;
    }
    let name = match t.get(i + 2) {
        Some(Lex::Word(n)) => match t.word(i + 4).filter(|_| t.punct(i + 3, '.')) {
            Some(q) => QName::new(Some(n.clone()), q.to_owned()),
            None => QName::new(None, n.clone()),
        },
        Some(Lex::Str(n)) => QName::new(None, n.to_lowercase()),
        _ => return,
    };
    if name.name == "set_config" {
        f.modifiers.insert(Modifier::IdentityChange);
    }
    f.functions.push(name);
}

/// Word `w` at token `i` as a function call (`word(` or `schema.word(`), a qualified name
/// (`w.name`), or a bare name that might be a table.
fn scan_call_or_name(t: &Tokens<'_>, i: usize, w: &str, f: &mut Findings) {
    if t.punct(i + 1, '(') && !NOT_FUNCTIONS.contains(&w) {
        let schema = if i >= 2 && t.punct(i - 1, '.') { t.word(i - 2) } else { None };
        f.functions.push(QName::new(schema.map(str::to_owned), w.to_owned()));
    } else if t.punct(i + 1, '.') {
        if let Some(n) = t.word(i + 2) {
            f.names.push(QName::new(Some(w.to_owned()), n.to_owned()));
        }
    } else if !(i >= 1 && t.punct(i - 1, '.')) {
        f.names.push(QName::new(None, w.to_owned()));
    }
}

fn lex_value(v: &Lex) -> Option<String> {
    match v {
        Lex::Word(w) => Some(w.clone()),
        Lex::Str(s) => Some(s.to_lowercase()),
        Lex::Punct(_) => None,
    }
}

/// Guess the classes of a statement from its leading words (used for statements the parser
/// rejects). Ambiguous leads get the more dangerous class; an unknown lead is `unknown`.
pub(crate) fn guess_classes(lead: &[String], f: &Findings) -> (ClassSet, String) {
    use StatementClass::*;
    let w0 = lead.first().map(String::as_str).unwrap_or("");
    let w1 = lead.get(1).map(String::as_str).unwrap_or("");
    let mut set = ClassSet::default();
    let command = match w0 {
        "select" | "values" | "table" | "fetch" | "with" | "explain" => {
            set.insert(Read);
            // Could hide a write (data-modifying CTE, FOR UPDATE, EXPLAIN ANALYZE DELETE …):
            // any DML keyword anywhere makes it a write, too.
            if f.names.iter().any(|n| {
                n.schema.is_none()
                    && matches!(n.name.as_str(), "insert" | "update" | "delete" | "merge" | "into" | "share")
            }) {
                set.insert(Write);
            }
            w0.to_string()
        }
        "insert" | "update" | "delete" | "merge" | "truncate" | "lock" | "refresh" | "notify" => {
            set.insert(Write);
            w0.to_string()
        }
        "copy" => {
            set.insert(Write);
            set.insert(Admin);
            "copy".into()
        }
        "grant" | "revoke" => {
            set.insert(Dcl);
            w0.to_string()
        }
        "create" | "alter" | "drop" => {
            let obj = if matches!(w1, "or" | "unique" | "temp" | "temporary" | "unlogged" | "materialized" | "default")
            {
                lead.get(2).map(String::as_str).unwrap_or("")
            } else {
                w1
            };
            if w0 == "alter" && obj == "system" {
                set.insert(Admin);
            } else if matches!(obj, "role" | "user" | "group" | "policy" | "privileges") || w1 == "default" {
                set.insert(Dcl);
            } else {
                set.insert(Ddl);
            }
            format!("{w0} {obj}").trim().to_string()
        }
        "comment" | "security" | "import" => {
            set.insert(Ddl);
            w0.to_string()
        }
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" => {
            set.insert(Transaction);
            w0.to_string()
        }
        "prepare" if w1 == "transaction" => {
            set.insert(Transaction);
            "prepare transaction".into()
        }
        "set" | "reset" | "show" | "discard" | "listen" | "unlisten" | "deallocate" | "close" => {
            set.insert(Session);
            w0.to_string()
        }
        "vacuum" | "analyze" | "analyse" | "checkpoint" | "cluster" | "reindex" | "load" => {
            set.insert(Admin);
            w0.to_string()
        }
        "do" | "call" => {
            set.insert(Procedural);
            w0.to_string()
        }
        _ => {
            set.insert(Unknown);
            w0.to_string()
        }
    };
    (set, command)
}

/// Decode Postgres Unicode escapes (`\XXXX`, `\+XXXXXX`, doubled escape character).
pub(crate) fn decode_unicode_escapes(s: &str, esc: char) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != esc {
            out.push(c);
            continue;
        }
        if it.peek() == Some(&esc) {
            it.next();
            out.push(esc);
            continue;
        }
        let n = if it.peek() == Some(&'+') {
            it.next();
            6
        } else {
            4
        };
        let hex: String = (0..n).filter_map(|_| it.next()).collect();
        if hex.len() != n || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
            return None;
        }
        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_postgres_quoting() {
        let t = lex("SELECT E'a\\'b', $x$ in $ side $x$, \"Mixed\" /* a /* nested */ c */ -- x\n, $1");
        assert_eq!(
            t,
            vec![
                Lex::Word("select".into()),
                Lex::Str("a'b".into()),
                Lex::Punct(','),
                Lex::Str(" in $ side ".into()),
                Lex::Punct(','),
                Lex::Word("mixed".into()),
                Lex::Punct(','),
                Lex::Punct('$'),
            ]
        );
    }

    /// Identifiers longer than 63 bytes are cut as the server cuts them.
    #[test]
    fn long_identifiers_are_truncated() {
        let long = format!("{}tail", "n".repeat(63));
        assert_eq!(lex(&long), vec![Lex::Word("n".repeat(63))]);
        assert_eq!(lex(&format!("\"{}\"", "N".repeat(70))), vec![Lex::Word("n".repeat(63))]);
        // A two-byte character is not cut in half.
        assert_eq!(lex(&format!("{}é", "x".repeat(62))), vec![Lex::Word("x".repeat(62))]);
    }

    /// `U&"…" UESCAPE 'c'` decodes with `c`, as Postgres does; the clause is not a word.
    #[test]
    fn uescape_names_the_escape_character() {
        let t = lex("SELECT U&\"!006eotes\" UESCAPE '!', U&'x!0041' /* c */ uescape\n'!' FROM U&\"d\\0061ta\"");
        assert_eq!(
            t,
            vec![
                Lex::Word("select".into()),
                Lex::Word("notes".into()),
                Lex::Punct(','),
                Lex::Str("xA".into()),
                Lex::Word("from".into()),
                Lex::Word("data".into()),
            ]
        );
        let f = scan("DO $$BEGIN PERFORM U&\"!0070g_read_file\" UESCAPE '!'('/etc/passwd'); END$$");
        assert!(f.functions.contains(&QName::new(None, "pg_read_file".into())), "{:?}", f.functions);
    }

    #[test]
    fn finds_identity_changes_in_bodies() {
        let f = scan("DO $$BEGIN EXECUTE 'reset role'; END$$");
        assert!(f.modifiers.contains(Modifier::IdentityChange));
        let f = scan("DO $$BEGIN UPDATE users SET role = 'x' WHERE id = 1; END$$");
        assert!(!f.modifiers.contains(Modifier::IdentityChange));
        let f = scan("DO $$BEGIN PERFORM set_config('ro' || 'le', 'x', false); END$$");
        assert!(f.modifiers.contains(Modifier::IdentityChange));
        let f = scan("DO $$BEGIN PERFORM U&\"\\0070g_read_file\"('/etc/passwd'); END$$");
        assert!(f.functions.contains(&QName::new(None, "pg_read_file".into())), "{:?}", f.functions);
        let f = scan("DO $$BEGIN PERFORM pg_catalog.pg_read_file('/etc/passwd'); END$$");
        assert!(f.functions.contains(&QName::new(Some("pg_catalog".into()), "pg_read_file".into())));
    }

    #[test]
    fn finds_functions_bound_in_bodies() {
        let f = scan("DO $$BEGIN CREATE AGGREGATE a(text, bool) (sfunc = set_config, stype = text); END$$");
        assert!(f.modifiers.contains(Modifier::IdentityChange));
        let f = scan("DO $$BEGIN EXECUTE 'CREATE AGGREGATE a(text, bool) (sfunc = pg_catalog . set_config, stype = text)'; END$$");
        assert!(f.modifiers.contains(Modifier::IdentityChange));
        let f = scan("DO $$BEGIN CREATE OPERATOR === (FUNCTION = pg_catalog.pg_terminate_backend, leftarg = int4); END$$");
        assert!(f.functions.contains(&QName::new(Some("pg_catalog".into()), "pg_terminate_backend".into())), "{:?}", f.functions);
        let f = scan("DO $$BEGIN CREATE OPERATOR ### (procedure = 'pg_read_file', rightarg = text); END$$");
        assert!(f.functions.contains(&QName::new(None, "pg_read_file".into())), "{:?}", f.functions);
        let f = scan("DO $$BEGIN PERFORM set_config('application_name', 'x', false); END$$");
        assert!(!f.modifiers.contains(Modifier::IdentityChange));
    }
}
