//! Column lineage: which output columns of a statement are computed from masked columns.
//!
//! A pure function of the SQL text, read by Postgres's own parser (libpg_query's raw parse
//! tree, [`crate::policy::pgparse`]: the statements, names and expressions are exactly the
//! ones the server sees), and of a rule matcher. For every statement that returns rows
//! (SELECT/VALUES/TABLE, INSERT/UPDATE/DELETE … RETURNING, COPY … TO STDOUT, DECLARE … CURSOR,
//! PREPARE … AS) it gives, per output column, the set of mask rules whose columns appear
//! **anywhere** in the column's expression (`upper(card)`, `card || ''`, `substr(card, 1, 6)`,
//! `string_agg(card, ',')`, a scalar subquery selecting `card`, …), and whether the column is a
//! bare reference (the masked value itself) or derived from it. A table (alias) used as a
//! value — `row_to_json(c)`, `c::text`, `SELECT c FROM customers c`, `f(c.*)` — references all
//! its columns.
//!
//! Expressions are walked generically: every column reference anywhere under an output
//! expression taints it, whatever node holds it, and a nested query contributes the union of
//! its output columns. FROM items lineage does not know (functions, XMLTABLE, …) are opaque,
//! tainted by whatever their expressions reference. A statement that returns rows lineage
//! cannot follow (CALL) is `Unknown`.
//!
//! Name resolution is conservative: an unqualified column is looked up in every relation in
//! scope (and outer scopes, for correlated subqueries), an unqualified table name matches a rule
//! table of that name in any schema. `WHERE`/`GROUP BY`/`ORDER BY` do not taint outputs.
//! Functions and views are opaque here (their bodies are not read): that is what the content
//! detectors are for.

use std::cell::Cell;

use serde_json::Value;

use crate::policy::normalize::Normalized;
use crate::policy::pgparse;

/// Rule bits (bit i = mask rule i) and whether the value is exactly a base column's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taint {
    pub rules: u64,
    /// A bare column reference (through aliases and derived tables): the rule's style applies
    /// as for the column itself. Otherwise the value is derived (see `mask::Derived`).
    pub direct: bool,
}

impl Taint {
    pub const NONE: Taint = Taint { rules: 0, direct: false };
    pub fn is_none(self) -> bool {
        self.rules == 0
    }
    fn derived(self) -> Taint {
        Taint { rules: self.rules, direct: false }
    }
    fn union(self, o: Taint) -> Taint {
        Taint { rules: self.rules | o.rules, direct: self.direct && o.direct }
    }
}

/// What lineage needs to know about the rules and the catalog.
pub trait Resolver {
    /// Rules covering column `column` of table `schema.table` (`schema` None: any schema).
    /// `column` None: rules covering any column of that table.
    fn rules_for(&self, schema: Option<&str>, table: &str, column: Option<&str>) -> u64;
    /// The table's column names in order, when known (rule tables, from the catalog).
    fn columns_of(&self, schema: Option<&str>, table: &str) -> Option<Vec<String>>;
    /// Strict masking: the catalog classes (`policy::functions`) of the functions named
    /// `name` (in `schema`, or any); every class when the catalog does not know them.
    fn function_classes(&self, _schema: Option<&str>, _name: &str) -> u8 {
        crate::policy::functions::ALL
    }
    /// Strict masking: whether the catalog has a function of this name.
    fn is_function(&self, _name: &str) -> bool {
        true
    }
    /// Strict masking: whether every function of this name is a built-in (`pg_catalog`), so
    /// that an unqualified call cannot reach a function someone created.
    fn builtin_function(&self, _name: &str) -> bool {
        false
    }
    /// Strict masking: rules an identifier in an opaque body may refer to (a masked column's
    /// name, a rule table's or masked view's name).
    fn ident_rules(&self, _ident: &str) -> u64 {
        u64::MAX
    }
    /// Strict masking: the rules (of those this resolver reports) whose style is `hash`.
    fn hashed_rules(&self) -> u64 {
        0
    }
    /// Strict masking: rules that may cover tables of schema `schema` (a pattern without a
    /// schema, or one whose schema part matches).
    fn schema_rules(&self, _schema: &str) -> u64 {
        u64::MAX
    }
}

/// One item of a statement's output list.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Col(Taint),
    /// `*` / `t.*` whose width is not known here (a table that is not a rule table); its
    /// columns are plain base columns (the RowDescription's table OID identifies them).
    Star,
}

/// Lineage of one statement's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lineage {
    /// Output items, when the statement returns rows and could be followed.
    pub items: Vec<Item>,
    /// Union of every output column's rules.
    pub any: u64,
    /// COPY … TO STDOUT: its options (format, delimiter, null string).
    pub copy: Option<CopyFormat>,
}

impl Lineage {
    /// Per-column taints for a result with `n` columns; None when the items cannot be aligned
    /// (more than one star of unknown width, or a count that does not fit).
    pub fn columns(&self, n: usize) -> Option<Vec<Taint>> {
        let stars = self.items.iter().filter(|i| matches!(i, Item::Star)).count();
        let fixed = self.items.len() - stars;
        let star_width = match stars {
            0 if fixed == n => 0,
            1 if n >= fixed => n - fixed,
            _ => return None,
        };
        let mut out = Vec::with_capacity(n);
        for i in &self.items {
            match i {
                Item::Col(t) => out.push(*t),
                Item::Star => out.extend(std::iter::repeat_n(Taint::NONE, star_width)),
            }
        }
        Some(out)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CopyFormat {
    pub format: CopyKind,
    pub delimiter: u8,
    pub quote: u8,
    /// CSV ESCAPE (the quote character unless set).
    pub escape: u8,
    pub null: Vec<u8>,
    /// CSV HEADER: the first CopyData is the header line (not masked).
    pub header: bool,
    /// ENCODING: the data is converted to an encoding other than the session's UTF-8, in
    /// which a byte after a character's first may equal a delimiter, quote or backslash
    /// (Shift-JIS, Big5, GBK, …): pgward cannot split it into fields.
    pub other_encoding: bool,
}

impl CopyFormat {
    /// COPY's defaults: text format, tab, `\N`.
    pub fn text() -> CopyFormat {
        CopyFormat { format: CopyKind::Text, delimiter: b'\t', quote: b'"', escape: b'"', null: b"\\N".to_vec(), header: false, other_encoding: false }
    }
}

/// Whether COPY's `ENCODING` value names an encoding other than UTF-8 (or SQL_ASCII, which
/// passes the server's UTF-8 bytes as they are). Names are compared as PostgreSQL's
/// `clean_encoding_name` does: lower case, letters and digits only (`UTF-8` is `utf8`).
pub fn other_encoding(name: &str) -> bool {
    let clean: String = name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    !matches!(clean.as_str(), "utf8" | "unicode" | "sqlascii")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Text,
    Csv,
    Binary,
}

/// What one statement of a query string does, as far as results go.
#[derive(Debug, Clone, PartialEq)]
pub enum StmtKind {
    /// Returns rows described by the lineage (SELECT, RETURNING, COPY TO STDOUT, …).
    Rows(Lineage),
    /// `DECLARE name CURSOR FOR …`: remember the lineage for FETCH.
    Declare(String, Lineage),
    /// `FETCH … FROM name`.
    Fetch(String),
    /// `PREPARE name AS …` (the prepared statement's lineage).
    Prepare(String, Lineage),
    /// `EXECUTE name`.
    Execute(String),
    /// Returns no rows pgward needs to follow (SET, BEGIN, DDL, …).
    Other,
    /// Could not be analyzed: results of OID-0 columns are treated as derived from every rule.
    Unknown,
}

use crate::policy::pgtree::{Obj, const_locations, list, names, raw_stmts, str_field, sval, typed, wrapped};

/// The parse tree of `sql`, when it parses within pgward's bounds (Err(None): over the size
/// bound; Err(Some): the parser's error).
fn parse(sql: &str) -> Result<Value, Option<pgparse::ParseError>> {
    if sql.len() > crate::policy::MAX_PARSE_BYTES {
        return Err(None);
    }
    pgparse::parse(sql).map_err(Some)
}

fn run(tree: &Value, r: &dyn Resolver) -> (Vec<StmtKind>, bool) {
    let cx = Cx { r, read: Cell::new(false) };
    let out = raw_stmts(tree).iter().map(|raw| raw.get("stmt").map_or(StmtKind::Unknown, |s| cx.statement(s))).collect();
    (out, cx.read.get())
}

/// Analyze a query string: one entry per statement, as Postgres splits it. None: the string
/// does not parse (or is over pgward's bounds); callers treat each result as `Unknown`.
pub fn analyze(sql: &str, r: &dyn Resolver) -> Option<Vec<StmtKind>> {
    let tree = parse(sql).ok()?;
    Some(run(&tree, r).0)
}

/// [`analyze`], and whether the result holds for every text with the literal-normalized key
/// `norm` (the server lexer's, [`crate::policy::normalize`], computed from `sql`), for the same
/// resolver: true when the text parsed, every constant of the text is a constant node
/// (`A_Const`) of the tree where the lexer found it (a constant that is structure — a COPY
/// option's character or NULL string, a FETCH count — keeps the result to this text), and
/// lineage read no constant's value.
#[cfg(test)]
pub(crate) fn analyze_normalized(sql: &str, r: &dyn Resolver, norm: &Normalized) -> (Option<Vec<StmtKind>>, bool) {
    let a = analyze_with(sql, r, None, Some(norm));
    (a.stmts, a.shareable)
}

/// Lineage of a query string and, with `strict` (a resolver that reports only the rules
/// strict masking applies to, and those rules' bits), strict masking's verdict.
pub(crate) struct Analysis {
    pub stmts: Option<Vec<StmtKind>>,
    pub strict: Option<super::strict::Violation>,
    /// Holds for every text with the same literal-normalized key (see [`analyze_normalized`]).
    pub shareable: bool,
}

pub(crate) fn analyze_with(sql: &str, r: &dyn Resolver, strict: Option<(&dyn Resolver, u64)>, norm: Option<&Normalized>) -> Analysis {
    let tree = match parse(sql) {
        Ok(t) => t,
        Err(e) => {
            // A syntax error is the server's too: nothing runs. A text over pgward's bounds
            // may run, unchecked.
            let strict = strict.and_then(|(_, bits)| match e {
                Some(pgparse::ParseError::Syntax { .. }) => None,
                _ => Some(super::strict::Violation {
                    rules: bits,
                    reason: "the statement is larger or deeper than pgward analyzes, so where masked values go cannot be proven".into(),
                }),
            });
            return Analysis { stmts: None, strict, shareable: false };
        }
    };
    let (stmts, mut read) = run(&tree, r);
    let strict = strict.and_then(|(sr, bits)| {
        let (verdict, strict_read) = super::strict::check(raw_stmts(&tree), sr, bits);
        read |= strict_read;
        verdict.err()
    });
    let shareable = norm.is_some_and(|n| {
        let mut consts = Vec::new();
        const_locations(&tree, &mut consts);
        !read && n.covered_by(&consts)
    });
    Analysis { stmts: Some(stmts), strict, shareable }
}

/// An `alias` field: the alias and its column names.
fn alias_of(m: &Obj) -> Option<(String, Vec<String>)> {
    let a = typed(m.get("alias")?, "Alias")?;
    Some((str_field(a, "aliasname")?.to_string(), names(list(a, "colnames"))))
}

fn is_star(v: &Value) -> bool {
    v.get("A_Star").is_some()
}

/// The name Postgres gives an output column without an alias (`FigureColname`), when it is
/// one lineage can tell; `?column?` otherwise.
fn figure_name(v: &Value) -> Option<String> {
    let (ty, b) = wrapped(v)?;
    match ty {
        "ColumnRef" => list(b, "fields").last().and_then(sval).map(str::to_string),
        "A_Indirection" => match list(b, "indirection").last() {
            Some(last) => sval(last).map(str::to_string).or_else(|| figure_name(b.get("arg")?)),
            None => figure_name(b.get("arg")?),
        },
        "FuncCall" => names(list(b, "funcname")).pop(),
        "A_Expr" if str_field(b, "kind") == Some("AEXPR_NULLIF") => Some("nullif".into()),
        "TypeCast" => b
            .get("arg")
            .and_then(figure_name)
            .or_else(|| b.get("typeName").and_then(|t| typed(t, "TypeName")).and_then(|t| names(list(t, "names")).pop())),
        "CollateClause" => figure_name(b.get("arg")?),
        "GroupingFunc" => Some("grouping".into()),
        "SubLink" => match str_field(b, "subLinkType") {
            Some("EXISTS_SUBLINK") => Some("exists".into()),
            Some("ARRAY_SUBLINK") => Some("array".into()),
            Some("EXPR_SUBLINK") => {
                let q = typed(b.get("subselect")?, "SelectStmt")?;
                let t = typed(list(q, "targetList").first()?, "ResTarget")?;
                str_field(t, "name").map(str::to_string).or_else(|| figure_name(t.get("val")?))
            }
            _ => None,
        },
        "CaseExpr" => b.get("defresult").and_then(figure_name).or_else(|| Some("case".into())),
        "A_ArrayExpr" => Some("array".into()),
        "RowExpr" => Some("row".into()),
        "CoalesceExpr" => Some("coalesce".into()),
        "MinMaxExpr" => Some(if str_field(b, "op") == Some("IS_LEAST") { "least" } else { "greatest" }.into()),
        "XmlSerialize" => Some("xmlserialize".into()),
        _ => None,
    }
}

/// A relation in scope.
#[derive(Debug, Clone)]
pub(super) struct Rel {
    /// Alias, or the table's own name (CTEs of a WITH: `\0cte:name`).
    pub(super) name: String,
    pub(super) kind: RelKind,
}

#[derive(Debug, Clone)]
pub(super) enum RelKind {
    Base { schema: Option<String>, table: String, rules_any: u64, columns: Option<Vec<String>> },
    /// Output items in order (stars of unknown width kept in place), and the relations those
    /// stars came from (for lookups by name).
    Derived { cols: Vec<(Option<String>, Item)>, stars: Vec<Rel> },
    /// Function results, VALUES in FROM, …: its columns all carry `whole` (derived).
    Opaque { whole: Taint },
}

/// The output of a query: named items, and the relations behind its stars of unknown width.
#[derive(Debug, Default)]
pub(super) struct Out {
    pub(super) cols: Vec<(Option<String>, Item)>,
    pub(super) stars: Vec<Rel>,
}

impl Out {
    fn items(self) -> Vec<Item> {
        self.cols.into_iter().map(|(_, i)| i).collect()
    }
    fn extend(&mut self, o: Out) {
        self.cols.extend(o.cols);
        self.stars.extend(o.stars);
    }
}

/// Relations in scope: this level's, then the enclosing ones.
#[derive(Clone, Copy)]
pub(super) struct Env<'p> {
    pub(super) rels: &'p [Rel],
    pub(super) parent: Option<&'p Env<'p>>,
}

impl<'p> Env<'p> {
    fn levels(&self) -> impl Iterator<Item = &Env<'p>> {
        std::iter::successors(Some(self), |e| e.parent)
    }
    pub(super) fn find(&self, name: &str) -> Option<&Rel> {
        self.levels().find_map(|e| e.rels.iter().find(|r| r.name == name))
    }
    /// Every relation in scope, innermost level first.
    pub(super) fn levels_rels(&self) -> impl Iterator<Item = &Rel> {
        self.levels().flat_map(|e| e.rels.iter())
    }
}

fn find_in(env: Option<&Env<'_>>, name: &str) -> Option<Rel> {
    env.and_then(|e| e.find(name)).cloned()
}

/// Items of a relation-like thing whose columns all carry `whole`, of unknown width: a star,
/// and (when tainted) a second star and the taint, so that its columns never line up with a
/// result (every computed column of it is then treated as carrying `any`).
fn opaque_items(whole: Taint) -> Vec<(Option<String>, Item)> {
    if whole.is_none() {
        vec![(None, Item::Star)]
    } else {
        vec![(None, Item::Star), (None, Item::Star), (None, Item::Col(whole.derived()))]
    }
}

impl Rel {
    /// The taint of column `name`. `strict`: the column was named with this relation, so a
    /// name lineage does not find here is one it mis-named (every column counts).
    pub(super) fn col_with(&self, name: &str, r: &dyn Resolver, strict: bool) -> Taint {
        match &self.kind {
            RelKind::Base { schema, table, .. } => {
                let bits = r.rules_for(schema.as_deref(), table, Some(name));
                Taint { rules: bits, direct: true }
            }
            RelKind::Derived { cols, stars } => {
                let mut t: Option<Taint> = None;
                for (n, it) in cols {
                    if let (Some(n), Item::Col(ct)) = (n.as_deref(), it)
                        && n == name
                    {
                        t = Some(t.map_or(*ct, |t| t.union(*ct)));
                    }
                }
                if t.is_none() {
                    for s in stars {
                        let st = s.col_with(name, r, false);
                        t = Some(t.map_or(st, |t| t.union(st)));
                    }
                }
                match t {
                    Some(t) => t,
                    None if strict => self.whole(),
                    None => Taint::NONE,
                }
            }
            RelKind::Opaque { whole } => whole.derived(),
        }
    }
    pub(super) fn whole(&self) -> Taint {
        match &self.kind {
            RelKind::Base { rules_any, .. } => Taint { rules: *rules_any, direct: false },
            RelKind::Derived { cols, stars } => {
                let mut t = Taint::NONE;
                for (_, c) in cols {
                    if let Item::Col(c) = c {
                        t = t.union(*c);
                    }
                }
                for s in stars {
                    t = t.union(s.whole());
                }
                t.derived()
            }
            RelKind::Opaque { whole } => whole.derived(),
        }
    }
}

pub(super) struct Cx<'a> {
    pub(super) r: &'a dyn Resolver,
    /// The result depended on a constant's value.
    pub(super) read: Cell<bool>,
}

impl<'a> Cx<'a> {
    pub(super) fn new(r: &'a dyn Resolver) -> Cx<'a> {
        Cx { r, read: Cell::new(false) }
    }

    fn lineage(&self, items: Vec<Item>) -> Lineage {
        let mut any = 0;
        for i in &items {
            if let Item::Col(t) = i {
                any |= t.rules;
            }
        }
        Lineage { items, any, copy: None }
    }

    /// One raw statement (a `{"SelectStmt": {…}}` node).
    fn statement(&self, s: &Value) -> StmtKind {
        let Some((ty, b)) = wrapped(s) else { return StmtKind::Unknown };
        match ty {
            "SelectStmt" => StmtKind::Rows(self.lineage(self.select(b, None).items())),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" => match self.modify(ty, b, None) {
                Some(o) => StmtKind::Rows(self.lineage(o.items())),
                None => StmtKind::Other,
            },
            "CopyStmt" => self.copy(b),
            "DeclareCursorStmt" => {
                let name = str_field(b, "portalname").unwrap_or("").to_string();
                match b.get("query").and_then(|q| self.rows(q, None)) {
                    Some(o) => StmtKind::Declare(name, self.lineage(o.items())),
                    None => StmtKind::Unknown,
                }
            }
            "FetchStmt" if b.get("ismove").and_then(Value::as_bool) == Some(true) => StmtKind::Other,
            "FetchStmt" => StmtKind::Fetch(str_field(b, "portalname").unwrap_or("").to_string()),
            "PrepareStmt" => match b.get("query").map(|q| self.statement(q)) {
                Some(StmtKind::Rows(l)) => StmtKind::Prepare(str_field(b, "name").unwrap_or("").to_string(), l),
                _ => StmtKind::Other,
            },
            "ExecuteStmt" => StmtKind::Execute(str_field(b, "name").unwrap_or("").to_string()),
            // A procedure's OUT parameters come back as a row lineage cannot follow.
            "CallStmt" => StmtKind::Unknown,
            _ => StmtKind::Other,
        }
    }

    /// The output of a query in a query position (a wrapped node): SELECT/VALUES, or a data-
    /// modifying statement's RETURNING list. None: not a query lineage knows.
    pub(super) fn rows(&self, q: &Value, env: Option<&Env<'_>>) -> Option<Out> {
        let (ty, b) = wrapped(q)?;
        match ty {
            "SelectStmt" => Some(self.select(b, env)),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" => Some(self.modify(ty, b, env).unwrap_or_default()),
            _ => None,
        }
    }

    /// COPY: rows for `COPY … TO STDOUT`, with its format.
    fn copy(&self, b: &Obj) -> StmtKind {
        let to_stdout = b.get("is_from").and_then(Value::as_bool) != Some(true)
            && b.get("is_program").and_then(Value::as_bool) != Some(true)
            && b.get("filename").is_none_or(Value::is_null);
        if !to_stdout {
            return StmtKind::Other;
        }
        let items = if let Some(q) = b.get("query") {
            match self.rows(q, None) {
                Some(o) => o.items(),
                None => return StmtKind::Unknown,
            }
        } else if let Some(rv) = b.get("relation").and_then(|v| typed(v, "RangeVar")) {
            let rel = self.base_rel(rv, false);
            let cols = names(list(b, "attlist"));
            if cols.is_empty() {
                self.star_of(&rel).items()
            } else {
                cols.iter().map(|c| Item::Col(rel.col_with(c, self.r, true))).collect()
            }
        } else {
            return StmtKind::Unknown;
        };
        let mut l = self.lineage(items);
        l.copy = Some(self.copy_format(list(b, "options")));
        StmtKind::Rows(l)
    }

    fn copy_format(&self, options: &[Value]) -> CopyFormat {
        let mut f = CopyFormat::text();
        let (mut null_set, mut delim_set, mut escape_set) = (false, false, false);
        for o in options {
            let Some(d) = o.get("DefElem").and_then(Value::as_object) else { continue };
            // The options' values are the text's (structure, not constants): reading them
            // keeps the result to this text.
            self.read.set(true);
            let arg = d.get("arg");
            // defGetString: strings, numbers and booleans as text.
            let text = arg.and_then(|a| {
                let (ty, v) = wrapped(a)?;
                match ty {
                    "String" => str_field(v, "sval").map(str::to_string),
                    "Integer" => Some(v.get("ival").and_then(Value::as_i64).unwrap_or(0).to_string()),
                    "Float" => str_field(v, "fval").map(str::to_string),
                    "Boolean" => Some(v.get("boolval").and_then(Value::as_bool).unwrap_or(false).to_string()),
                    _ => None,
                }
            });
            let one_byte = |s: &Option<String>| s.as_deref().and_then(|s| (s.len() == 1).then(|| s.as_bytes()[0]));
            match str_field(d, "defname").unwrap_or("") {
                "format" => {
                    f.format = match text.as_deref() {
                        Some("csv") => CopyKind::Csv,
                        Some("binary") => CopyKind::Binary,
                        _ => CopyKind::Text,
                    }
                }
                "delimiter" => {
                    if let Some(c) = one_byte(&text) {
                        f.delimiter = c;
                        delim_set = true;
                    }
                }
                "quote" => {
                    if let Some(c) = one_byte(&text) {
                        f.quote = c;
                    }
                }
                "escape" => {
                    if let Some(c) = one_byte(&text) {
                        f.escape = c;
                        escape_set = true;
                    }
                }
                "null" => {
                    if let Some(s) = &text {
                        f.null = s.as_bytes().to_vec();
                        null_set = true;
                    }
                }
                // defGetCopyHeaderChoice: no value is true; 0/1, true/false/on/off.
                "encoding" => f.other_encoding = text.as_deref().is_none_or(other_encoding),
                "header" => {
                    f.header = match (arg, text.as_deref().map(str::to_ascii_lowercase).as_deref()) {
                        (None, _) => true,
                        (_, Some("0" | "false" | "off")) => false,
                        _ => true,
                    }
                }
                _ => {}
            }
        }
        if f.format == CopyKind::Csv {
            if !null_set {
                f.null = Vec::new();
            }
            if !delim_set {
                f.delimiter = b',';
            }
            if !escape_set {
                f.escape = f.quote;
            }
        }
        f
    }

    /// A base table (RangeVar body) with its alias. `alias`: read the RangeVar's alias.
    pub(super) fn base_rel(&self, rv: &Obj, alias: bool) -> Rel {
        let schema = str_field(rv, "schemaname").map(str::to_string);
        let table = str_field(rv, "relname").unwrap_or("").to_string();
        let al = if alias { alias_of(rv) } else { None };
        let rules_any = self.r.rules_for(schema.as_deref(), &table, None);
        let columns = if rules_any != 0 { self.r.columns_of(schema.as_deref(), &table) } else { None };
        let name = al.as_ref().map(|a| a.0.clone()).unwrap_or_else(|| table.clone());
        let colnames = al.map(|a| a.1).unwrap_or_default();
        if !colnames.is_empty() && rules_any != 0 {
            // Column aliases (`FROM t AS x(a, b)`) rename columns positionally.
            let Some(cols) = &columns else {
                // Renamed columns of a rule table whose layout is not known: every column
                // may be a masked one.
                return Rel { name, kind: RelKind::Opaque { whole: Taint { rules: rules_any, direct: false } } };
            };
            let out = cols
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let t = Taint { rules: self.r.rules_for(schema.as_deref(), &table, Some(c)), direct: true };
                    (Some(colnames.get(i).cloned().unwrap_or_else(|| c.clone())), Item::Col(t))
                })
                .collect();
            return Rel { name, kind: RelKind::Derived { cols: out, stars: Vec::new() } };
        }
        Rel { name, kind: RelKind::Base { schema, table, rules_any, columns } }
    }

    /// The CTEs of a `withClause` as relations (`\0cte:name`), each seeing the ones before it.
    pub(super) fn ctes(&self, m: &Obj, env: Option<&Env<'_>>) -> Vec<Rel> {
        let mut ctes: Vec<Rel> = Vec::new();
        let Some(w) = m.get("withClause").and_then(|w| typed(w, "WithClause")) else { return ctes };
        let recursive = w.get("recursive").and_then(Value::as_bool) == Some(true);
        for c in list(w, "ctes") {
            let Some(cte) = typed(c, "CommonTableExpr") else { continue };
            let name = format!("\u{0}cte:{}", str_field(cte, "ctename").unwrap_or(""));
            let kind_in = |rels: &[Rel]| {
                let inner = Env { rels, parent: env };
                let q = cte.get("ctequery");
                match q.and_then(|q| self.rows(q, Some(&inner))) {
                    Some(mut o) => {
                        rename(&mut o, &names(list(cte, "aliascolnames")));
                        RelKind::Derived { cols: o.cols, stars: o.stars }
                    }
                    None => RelKind::Opaque { whole: q.map_or(Taint::NONE, |q| self.walk_taint(q, &inner)) },
                }
            };
            let mut rel = Rel { name, kind: kind_in(&ctes) };
            if recursive {
                rel = self.recursive_cte(rel, &ctes, kind_in);
            }
            ctes.push(rel);
        }
        ctes
    }

    /// A CTE of `WITH RECURSIVE` that may read itself: its lineage with itself in scope,
    /// recomputed until it stops changing (a column's values can reach another column through
    /// the recursion). When it does not settle within a few passes, every column carries
    /// everything any column does.
    fn recursive_cte(&self, first: Rel, before: &[Rel], kind_in: impl Fn(&[Rel]) -> RelKind) -> Rel {
        const PASSES: usize = 8;
        let mut rel = first;
        for _ in 0..PASSES {
            let mut scope = before.to_vec();
            scope.push(rel.clone());
            let next = Rel { name: rel.name.clone(), kind: kind_in(&scope) };
            if format!("{:?}", next.kind) == format!("{:?}", rel.kind) {
                return next;
            }
            rel = next;
        }
        let whole = rel.whole();
        Rel { name: rel.name, kind: RelKind::Opaque { whole } }
    }

    /// SELECT (with WITH, set operations, VALUES).
    pub(super) fn select(&self, b: &Obj, env: Option<&Env<'_>>) -> Out {
        let ctes = self.ctes(b, env);
        let cenv;
        let env = if ctes.is_empty() {
            env
        } else {
            cenv = Env { rels: &ctes, parent: env };
            Some(&cenv)
        };
        match str_field(b, "op") {
            Some(op) if op != "SETOP_NONE" => {
                let side = |k: &str| b.get(k).and_then(|v| typed(v, "SelectStmt")).map(|s| self.select(s, env)).unwrap_or_default();
                return set_op(side("larg"), side("rarg"));
            }
            _ => {}
        }
        let values = list(b, "valuesLists");
        if !values.is_empty() {
            let width = values.first().and_then(|v| typed(v, "List")).map_or(0, |l| list(l, "items").len());
            let t = match env {
                Some(e) => self.walk_taint_list(values, e),
                None => self.walk_taint_list(values, &Env { rels: &[], parent: None }),
            };
            return Out {
                cols: (0..width).map(|i| (Some(format!("column{}", i + 1)), Item::Col(t.derived()))).collect(),
                stars: Vec::new(),
            };
        }
        let rels = self.from_list(list(b, "fromClause"), env);
        let here = Env { rels: &rels, parent: env };
        self.targets(list(b, "targetList"), &here)
    }

    /// INSERT/UPDATE/DELETE: the RETURNING list's output; None without one.
    fn modify(&self, ty: &str, b: &Obj, env: Option<&Env<'_>>) -> Option<Out> {
        let returning = list(b, "returningList");
        if returning.is_empty() {
            return None;
        }
        let ctes = self.ctes(b, env);
        let cenv = Env { rels: &ctes, parent: env };
        let mut rels = Vec::new();
        if let Some(rv) = b.get("relation").and_then(|v| typed(v, "RangeVar")) {
            rels.push(self.base_rel(rv, true));
        }
        let more = match ty {
            "UpdateStmt" => list(b, "fromClause"),
            "DeleteStmt" => list(b, "usingClause"),
            _ => &[],
        };
        for f in more {
            self.from_item(f, Some(&cenv), &mut rels);
        }
        Some(self.targets(returning, &Env { rels: &rels, parent: Some(&cenv) }))
    }

    pub(super) fn from_list(&self, items: &[Value], env: Option<&Env<'_>>) -> Vec<Rel> {
        let mut rels = Vec::new();
        for f in items {
            self.from_item(f, env, &mut rels);
        }
        rels
    }

    /// One FROM item; `rels` holds the items before it (LATERAL references see them).
    pub(super) fn from_item(&self, v: &Value, env: Option<&Env<'_>>, rels: &mut Vec<Rel>) {
        let Some((ty, b)) = wrapped(v) else {
            let whole = self.walk_taint(v, &Env { rels: rels.as_slice(), parent: env });
            rels.push(Rel { name: String::new(), kind: RelKind::Opaque { whole } });
            return;
        };
        match ty {
            "RangeVar" => {
                if str_field(b, "schemaname").is_none()
                    && let Some(name) = str_field(b, "relname")
                    && let Some(mut c) = find_in(env, &format!("\u{0}cte:{name}"))
                {
                    let al = alias_of(b);
                    c.name = al.as_ref().map_or_else(|| name.to_string(), |a| a.0.clone());
                    if let (Some((_, cols)), RelKind::Derived { cols: out, .. }) = (&al, &mut c.kind) {
                        rename_cols(out, cols);
                    }
                    rels.push(c);
                    return;
                }
                rels.push(self.base_rel(b, true));
            }
            "RangeSubselect" => {
                let lateral = b.get("lateral").and_then(Value::as_bool) == Some(true);
                let al = alias_of(b);
                let name = al.as_ref().map(|a| a.0.clone()).unwrap_or_default();
                let lenv = Env { rels: rels.as_slice(), parent: env };
                let env2 = if lateral { Some(&lenv) } else { env };
                let kind = match b.get("subquery").and_then(|q| self.rows(q, env2)) {
                    Some(mut o) => {
                        rename(&mut o, &al.map(|a| a.1).unwrap_or_default());
                        RelKind::Derived { cols: o.cols, stars: o.stars }
                    }
                    None => RelKind::Opaque { whole: self.walk_taint(v, &lenv) },
                };
                rels.push(Rel { name, kind });
            }
            "JoinExpr" => {
                let start = rels.len();
                for k in ["larg", "rarg"] {
                    if let Some(s) = b.get(k) {
                        self.from_item(s, env, rels);
                    }
                }
                let using = names(list(b, "usingClause"));
                if let Some(ua) = b.get("join_using_alias").and_then(|a| typed(a, "Alias")).and_then(|a| str_field(a, "aliasname")) {
                    let cols = using
                        .iter()
                        .map(|c| {
                            let t = rels[start..].iter().fold(Taint::NONE, |t, r| {
                                let c = r.col_with(c, self.r, false);
                                if t.is_none() { c } else { t.union(c) }
                            });
                            (Some(c.clone()), Item::Col(t))
                        })
                        .collect();
                    rels.push(Rel { name: ua.to_string(), kind: RelKind::Derived { cols, stars: Vec::new() } });
                }
                if let Some((name, colnames)) = alias_of(b) {
                    let inner: Vec<Rel> = rels.drain(start..).collect();
                    let mut o = Out::default();
                    for r in &inner {
                        o.extend(self.star_of(r));
                    }
                    rename(&mut o, &colnames);
                    rels.push(Rel { name, kind: RelKind::Derived { cols: o.cols, stars: o.stars } });
                }
            }
            "RangeTableSample" => match b.get("relation") {
                Some(rel) => self.from_item(rel, env, rels),
                None => rels.push(Rel { name: String::new(), kind: RelKind::Opaque { whole: Taint::NONE } }),
            },
            _ => {
                // Functions (RangeFunction), XMLTABLE, …: opaque, tainted by whatever their
                // expressions reference (LATERAL is implicit for functions).
                let whole = self.walk_taint(v, &Env { rels: rels.as_slice(), parent: env });
                let name = alias_of(b).map(|a| a.0).or_else(|| {
                    // An unaliased function call is named after the function.
                    let f = list(b, "functions").first().and_then(|l| typed(l, "List")).and_then(|l| list(l, "items").first());
                    f.and_then(|f| f.get("FuncCall")).and_then(Value::as_object).and_then(|fc| names(list(fc, "funcname")).pop())
                });
                rels.push(Rel { name: name.unwrap_or_default(), kind: RelKind::Opaque { whole } });
            }
        }
    }

    /// What `rel.*` expands to.
    pub(super) fn star_of(&self, r: &Rel) -> Out {
        match &r.kind {
            RelKind::Base { columns: Some(cols), schema, table, .. } => Out {
                cols: cols
                    .iter()
                    .map(|c| (Some(c.clone()), Item::Col(Taint { rules: self.r.rules_for(schema.as_deref(), table, Some(c)), direct: true })))
                    .collect(),
                stars: Vec::new(),
            },
            RelKind::Base { .. } => Out { cols: vec![(None, Item::Star)], stars: vec![r.clone()] },
            RelKind::Derived { cols, stars } => Out { cols: cols.clone(), stars: stars.clone() },
            RelKind::Opaque { whole } => Out { cols: opaque_items(*whole), stars: Vec::new() },
        }
    }

    /// A select list or RETURNING list (ResTargets) in `env`.
    fn targets(&self, items: &[Value], env: &Env<'_>) -> Out {
        let mut out = Out::default();
        for it in items {
            let Some(t) = it.get("ResTarget").and_then(Value::as_object) else {
                out.cols.push((None, Item::Col(self.walk_taint(it, env).derived())));
                continue;
            };
            let Some(val) = t.get("val") else { continue };
            if let Some(cr) = val.get("ColumnRef").and_then(Value::as_object) {
                let fields = list(cr, "fields");
                if fields.last().is_some_and(is_star) {
                    match fields {
                        [_] => {
                            for r in env.rels {
                                out.extend(self.star_of(r));
                            }
                        }
                        [.., rel, _] => match sval(rel).and_then(|n| env.find(n)) {
                            Some(r) => out.extend(self.star_of(r)),
                            None => out.cols.push((None, Item::Star)),
                        },
                        [] => {}
                    }
                    continue;
                }
            }
            if let Some(ind) = val.get("A_Indirection").and_then(Value::as_object)
                && list(ind, "indirection").last().is_some_and(is_star)
            {
                // `(expr).*`: a composite's columns, of unknown width.
                out.cols.extend(opaque_items(self.walk_taint(val, env)));
                continue;
            }
            let name = str_field(t, "name").map(str::to_string).or_else(|| figure_name(val)).unwrap_or_else(|| "?column?".into());
            out.cols.push((Some(name), Item::Col(self.expr(val, env))));
        }
        out
    }

    /// The taint of an output expression: direct when it is a bare column reference.
    fn expr(&self, v: &Value, env: &Env<'_>) -> Taint {
        let mut w = Walker { cx: self, env, taint: Taint::NONE, whole_row: false };
        w.walk(v);
        let bare = v.get("ColumnRef").and_then(|c| c.get("fields")).and_then(Value::as_array).and_then(|f| f.last()).is_some_and(|f| sval(f).is_some());
        if bare && !w.whole_row { w.taint } else { w.taint.derived() }
    }

    /// The taint of everything under `v`.
    pub(super) fn walk_taint(&self, v: &Value, env: &Env<'_>) -> Taint {
        let mut w = Walker { cx: self, env, taint: Taint::NONE, whole_row: false };
        w.walk(v);
        w.taint
    }

    fn walk_taint_list(&self, v: &[Value], env: &Env<'_>) -> Taint {
        let mut w = Walker { cx: self, env, taint: Taint::NONE, whole_row: false };
        v.iter().for_each(|x| w.walk(x));
        w.taint
    }
}

/// Column aliases (`AS x(a, b)`, a CTE's column list) rename the output positionally. With a
/// star of unknown width among them positions are not known: every column may be any.
fn rename(o: &mut Out, colnames: &[String]) {
    if colnames.is_empty() {
        return;
    }
    if o.cols.iter().take(colnames.len()).any(|(_, i)| matches!(i, Item::Star)) {
        let mut t = Taint::NONE;
        for (_, i) in &o.cols {
            if let Item::Col(c) = i {
                t = t.union(*c);
            }
        }
        for s in &o.stars {
            t = t.union(s.whole());
        }
        let t = t.derived();
        o.cols = colnames.iter().map(|n| (Some(n.clone()), Item::Col(t))).collect();
        o.cols.extend(opaque_items(t));
        o.stars.clear();
        return;
    }
    rename_cols(&mut o.cols, colnames);
}

fn rename_cols(cols: &mut [(Option<String>, Item)], colnames: &[String]) {
    for (slot, n) in cols.iter_mut().zip(colnames) {
        slot.0 = Some(n.clone());
    }
}

/// UNION/INTERSECT/EXCEPT: columns pair up by position, named by the left side.
fn set_op(l: Out, r: Out) -> Out {
    let mut stars = l.stars;
    stars.extend(r.stars);
    let (l, r) = (l.cols, r.cols);
    if l.len() != r.len() || l.iter().chain(&r).any(|(_, i)| matches!(i, Item::Star)) {
        // cannot pair columns: every column carries everything
        let mut t = Taint::NONE;
        for (_, i) in l.iter().chain(&r) {
            if let Item::Col(c) = i {
                t = t.union(*c);
            }
        }
        for s in &stars {
            t = t.union(s.whole());
        }
        let cols = l.into_iter().map(|(n, i)| (n, if matches!(i, Item::Star) { i } else { Item::Col(t.derived()) })).collect();
        return Out { cols, stars };
    }
    let cols = l
        .into_iter()
        .zip(r)
        .map(|((n, a), (_, b))| match (a, b) {
            (Item::Col(x), Item::Col(y)) => {
                let direct = (x.direct || x.is_none()) && (y.direct || y.is_none());
                (n, Item::Col(Taint { rules: x.rules | y.rules, direct }))
            }
            (a, _) => (n, a),
        })
        .collect();
    Out { cols, stars }
}

/// Walks an expression: every column reference under it adds its taint; nested queries are
/// analyzed with the current scopes as outer scopes and contribute the union of their output
/// columns; every other node contributes whatever is under it.
struct Walker<'c, 'a, 'e> {
    cx: &'c Cx<'a>,
    env: &'e Env<'e>,
    taint: Taint,
    whole_row: bool,
}

impl Walker<'_, '_, '_> {
    fn add(&mut self, t: Taint) {
        self.taint = if self.taint.is_none() && !t.is_none() { t } else { self.taint.union(t) };
        if self.taint.rules == t.rules && !t.is_none() && t.direct {
            self.taint.direct = true;
        }
    }

    fn walk(&mut self, v: &Value) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| self.walk(x)),
            Value::Object(m) => match wrapped(v) {
                Some(("ColumnRef", b)) => self.column_ref(list(b, "fields")),
                Some(("SubLink", b)) => {
                    if let Some(t) = b.get("testexpr") {
                        self.walk(t);
                    }
                    if let Some(q) = b.get("subselect") {
                        self.query(q);
                    }
                }
                Some(("SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt", _)) => self.query(v),
                Some((_, b)) => b.values().for_each(|x| self.walk(x)),
                None => m.values().for_each(|x| self.walk(x)),
            },
            _ => {}
        }
    }

    fn query(&mut self, q: &Value) {
        match self.cx.rows(q, Some(self.env)) {
            Some(o) => {
                for (_, i) in &o.cols {
                    if let Item::Col(t) = i {
                        self.add(t.derived());
                    }
                }
                for s in &o.stars {
                    self.add(s.whole());
                }
            }
            // Not a query lineage knows: whatever is under it.
            None => self.walk(q),
        }
    }

    fn column_ref(&mut self, fields: &[Value]) {
        let r = self.cx.r;
        let parts: Vec<&str> = fields.iter().map(|f| sval(f).unwrap_or("*")).collect();
        let star = fields.last().is_some_and(is_star);
        match parts.as_slice() {
            [] => {}
            // `*` in an expression: every relation of this level, whole.
            [_] if star => {
                for rel in self.env.rels {
                    self.whole_row = true;
                    self.add(rel.whole());
                }
            }
            [col] => {
                let mut t = Taint::NONE;
                let mut first = true;
                for e in self.env.levels() {
                    for rel in e.rels.iter().filter(|r| !r.name.starts_with('\u{0}')) {
                        let c = rel.col_with(col, r, false);
                        if !c.is_none() {
                            t = if first { c } else { t.union(c) };
                            first = false;
                        }
                        if rel.name == *col {
                            // a relation used as a value: the whole row
                            let w = rel.whole();
                            if !w.is_none() {
                                self.whole_row = true;
                                t = t.union(w);
                                first = false;
                            }
                        }
                    }
                }
                self.add(t);
            }
            [.., rel, _] if star => {
                // `t.*`: the whole row.
                if let Some(found) = self.env.find(rel) {
                    self.whole_row = true;
                    let w = found.whole();
                    self.add(w);
                }
            }
            [.., rel, col] => match self.env.find(rel) {
                Some(found) => {
                    let c = found.col_with(col, r, true);
                    self.add(c);
                }
                None => {
                    // `schema.table.column` or a composite field access: match by name
                    let schema = (parts.len() >= 3).then(|| parts[parts.len() - 3]);
                    let bits = r.rules_for(schema, rel, Some(*col));
                    self.add(Taint { rules: bits, direct: true });
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::normalize::normalize;

    /// Rules: bit 0 = public.customers.card, bit 1 = *.*.email (any table).
    struct R;
    impl Resolver for R {
        fn rules_for(&self, schema: Option<&str>, table: &str, column: Option<&str>) -> u64 {
            let mut b = 0;
            if table == "customers" && schema.is_none_or(|s| s == "public") && column.is_none_or(|c| c == "card") {
                b |= 1;
            }
            if column.is_none_or(|c| c == "email") {
                b |= 2;
            }
            b
        }
        fn columns_of(&self, _schema: Option<&str>, table: &str) -> Option<Vec<String>> {
            (table == "customers").then(|| vec!["id".into(), "name".into(), "card".into(), "email".into()])
        }
    }

    /// A string is split into statements as Postgres splits it: an operator followed by a
    /// comment start is the operator and a comment (the former tokenizer read `#--` as one
    /// operator, and these texts as one statement).
    #[test]
    fn texts_are_split_as_postgres_splits_them() {
        for sql in [
            "SELECT 1 #-- '\n 2; SELECT upper(card) FROM customers; --'",
            "SELECT 1 |/* '*/ 2; SELECT upper(card) FROM customers; -- '",
        ] {
            let v = analyze(sql, &R).expect("parses");
            assert_eq!(v.len(), 2, "{sql:?}");
            assert!(matches!(&v[1], StmtKind::Rows(l) if l.any == 1), "{sql:?}: {v:?}");
        }
        assert_eq!(analyze("SELECT 1; SELECT upper(card) FROM customers", &R).map(|v| v.len()), Some(2));
    }

    fn cols(sql: &str) -> Vec<(u64, bool)> {
        match analyze(sql, &R).expect("parses").remove(0) {
            StmtKind::Rows(l) | StmtKind::Declare(_, l) | StmtKind::Prepare(_, l) => {
                l.items
                    .iter()
                    .map(|i| match i {
                        Item::Col(t) => (t.rules, t.direct && t.rules != 0),
                        Item::Star => (u64::MAX, false),
                    })
                    .collect()
            }
            other => panic!("{sql}: {other:?}"),
        }
    }

    const D: bool = true;
    const X: bool = false;

    #[test]
    fn table_driven() {
        let cases: &[(&str, &[(u64, bool)])] = &[
            ("select card from customers", &[(1, D)]),
            ("select c.card as x, c.id from customers c", &[(1, D), (0, X)]),
            ("select upper(card) from customers", &[(1, X)]),
            ("select card || '' from customers", &[(1, X)]),
            ("select substr(card,1,6) from customers", &[(1, X)]),
            ("select string_agg(card, ',') from customers", &[(1, X)]),
            ("select row_to_json(c) from customers c", &[(3, X)]),
            ("select c::text from customers c", &[(3, X)]),
            ("select c from customers c", &[(3, X)]),
            ("select to_json(c.*) from customers c", &[(3, X)]),
            ("select * from customers", &[(0, X), (0, X), (1, D), (2, D)]),
            ("select id, (select card from customers limit 1) from orders", &[(0, X), (1, X)]),
            ("select x.k from (select card as k from customers) x", &[(1, D)]),
            ("select k from (select lower(card) k from customers) x", &[(1, X)]),
            ("with t as (select card from customers) select card from t", &[(1, D)]),
            ("select card from customers union all select 'x'", &[(1, D)]),
            ("select name from customers", &[(0, X)]),
            ("select length(card) from customers where card like '4%'", &[(1, X)]),
            ("select o.email from orders o", &[(2, D)]),
            ("select case when true then card end from public.customers", &[(1, X)]),
            ("select t.* from (select upper(card) u, 1 n from customers) t", &[(1, X), (0, X)]),
            ("select * from orders", &[(u64::MAX, X)]),
            ("select count(*) from customers", &[(0, X)]),
        ];
        for (sql, want) in cases {
            assert_eq!(cols(sql), want.to_vec(), "{sql}");
        }
    }

    #[test]
    fn statements() {
        assert_eq!(cols("insert into customers(card) values ('1') returning card, id"), vec![(1, D), (0, X)]);
        assert_eq!(cols("update customers set name='x' returning upper(card)"), vec![(1, X)]);
        assert_eq!(cols("delete from customers returning *"), vec![(0, X), (0, X), (1, D), (2, D)]);
        assert_eq!(cols("copy customers to stdout"), vec![(0, X), (0, X), (1, D), (2, D)]);
        assert_eq!(cols("copy customers(card) to stdout with (format csv)"), vec![(1, D)]);
        assert_eq!(cols("copy (select upper(card) from customers) to stdout"), vec![(1, X)]);
        assert_eq!(cols("declare c cursor for select card from customers"), vec![(1, D)]);
        assert_eq!(cols("prepare p as select email from customers"), vec![(2, D)]);
        let all = analyze("set x = 1; fetch 5 from c; execute p; select 1", &R).unwrap();
        assert_eq!(all[0], StmtKind::Other);
        assert_eq!(all[1], StmtKind::Fetch("c".into()));
        assert_eq!(all[2], StmtKind::Execute("p".into()));
        match analyze("copy customers to stdout (format csv, delimiter '|')", &R).unwrap().remove(0) {
            StmtKind::Rows(l) => {
                let f = l.copy.unwrap();
                assert_eq!((f.format, f.delimiter, f.null.as_slice()), (CopyKind::Csv, b'|', &b""[..]));
            }
            o => panic!("{o:?}"),
        }
        assert!(analyze("selec nonsense (", &R).is_none());
    }

    /// Constants by the server lexer's kind (see `policy::normalize`).
    fn battery(kind: u8) -> &'static [&'static str] {
        match kind {
            b's' => &["''", "'x'", "'|'", "'card'", "'a AS card'", "'customers'", "E'card'", "$$ AS card $$", "'n/a'"],
            b'i' => &["0", "1", "2", "42"],
            b'f' => &["1.5", "0.0", "4294967296"],
            b'b' => &["B'1'", "X'F'"],
            _ => &[],
        }
    }

    fn variants(sql: &str) -> Vec<String> {
        let Some(n) = normalize(sql) else { return Vec::new() };
        let kinds: Vec<u8> = n.key.as_bytes().windows(2).filter(|w| w[0] == 0).map(|w| w[1]).collect();
        (0..8usize)
            .map(|v| {
                let mut s = String::new();
                let mut at = 0;
                for (j, (r, k)) in n.ranges.iter().zip(&kinds).enumerate() {
                    s.push_str(&sql[at..r.start]);
                    let b = battery(*k);
                    s.push_str(b.get((v * 5 + j * 3) % b.len().max(1)).copied().unwrap_or(&sql[r.clone()]));
                    at = r.end;
                }
                s.push_str(&sql[at..]);
                s
            })
            .collect()
    }

    /// Whenever lineage says its result holds for every text with the same normalized key,
    /// texts with other literal values (chosen to matter if anything read them) get the same
    /// result; COPY options and opaque FROM items with literals keep the result to the text.
    #[test]
    fn shared_lineage_does_not_depend_on_literal_values() {
        #[rustfmt::skip]
        let corpus: &[(&str, Option<bool>)] = &[
            ("select card from customers where id = 1", Some(true)),
            ("select upper(card), 'x', 1.5 from customers c where c.name = 'bob' limit 5", Some(true)),
            ("select substr(card, 1, 6) from customers", Some(true)),
            ("select card || ' ' || email from customers where id in (1, 2, 3)", Some(true)),
            ("insert into customers(card) values ('1') returning card, id", Some(true)),
            ("update customers set name = 'x' where id = 5 returning upper(card)", Some(true)),
            ("delete from customers where id = 7 returning *", Some(true)),
            ("copy (select card from customers where id = 3) to stdout", Some(true)),
            ("declare c cursor for select card from customers where id = 9", Some(true)),
            ("prepare p as select email from customers where id = 4", Some(true)),
            ("with t as (select card from customers where id = 2) select card from t", Some(true)),
            ("select card from customers union all select 'x'", Some(true)),
            ("select x.k from (select card as k, 1 from customers) x", Some(true)),
            // COPY options are characters and strings, not values
            ("copy customers to stdout (format csv, delimiter '|')", Some(false)),
            ("copy customers to stdout (format csv, null 'n/a')", Some(false)),
            ("copy customers to stdout with csv delimiter ','", Some(false)),
            // opaque FROM items holding constants (lineage once read their alias from
            // the item's printed text; the tree has it)
            ("select * from unnest(array['a AS card']) ", Some(true)),
            ("select u.x from unnest(array[1, 2]) as u(x)", Some(true)),
            // a FETCH count is not a constant node
            ("fetch 5 from c", Some(false)),
            // does not parse
            ("selec nonsense (1", Some(false)),
            ("select card from customers", None),
        ];
        let mut failures = Vec::new();
        for (sql, want) in corpus {
            let Some(n) = normalize(sql) else {
                assert!(want.is_none(), "{sql}: no normalized key");
                continue;
            };
            let (got, shareable) = analyze_normalized(sql, &R, &n);
            assert_eq!(got, analyze(sql, &R), "{sql}");
            if Some(shareable) != *want {
                failures.push(format!("{sql}: shareable {shareable}, want {want:?}"));
            }
            if !shareable {
                continue;
            }
            for v in variants(sql) {
                assert_eq!(normalize(&v).map(|x| x.key), Some(n.key.clone()), "{v}");
                if analyze(&v, &R) != got {
                    failures.push(format!("{sql}: shared, but {v} differs: {:?} vs {got:?}", analyze(&v, &R)));
                }
            }
        }
        // The COPY options really differ between texts with one key.
        let a = analyze("copy customers to stdout (format csv, delimiter '|')", &R);
        let b = analyze("copy customers to stdout (format csv, delimiter ',')", &R);
        assert_ne!(a, b);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn alignment() {
        let l = Lineage { items: vec![Item::Col(Taint { rules: 1, direct: false }), Item::Star], any: 1, copy: None };
        assert_eq!(l.columns(3).unwrap().len(), 3);
        assert_eq!(l.columns(3).unwrap()[0].rules, 1);
        let two = Lineage { items: vec![Item::Star, Item::Star], any: 0, copy: None };
        assert!(two.columns(3).is_none());
    }

    /// Expressions lineage has no special case for still carry what is under them; FROM
    /// items it does not know are opaque and tainted by what they reference; names are the
    /// server's (folded, `U&"…"` decoded).
    #[test]
    fn conservative_and_as_postgres_reads() {
        let cases: &[(&str, &[(u64, bool)])] = &[
            ("select (c).card from customers c", &[(3, X)]),
            ("select coalesce(null, card) from customers", &[(1, X)]),
            ("select array[card] from customers", &[(1, X)]),
            ("select card is distinct from 'x' from customers", &[(1, X)]),
            ("select exists (select 1 from customers where card = 'x')", &[(0, X)]),
            ("select xmlelement(name a, card) from customers", &[(1, X)]),
            ("select json_build_object('k', card) from customers", &[(1, X)]),
            ("select card collate \"C\" from customers", &[(1, X)]),
            ("select \"CARD\" from customers", &[(0, X)]),
            ("select CARD from Customers", &[(1, D)]),
            ("select U&\"c\\0061rd\" from customers", &[(1, D)]),
            ("select x.card from (select card::text from customers) x", &[(1, X)]),
            ("select x.\"?column?\" from (select card || 'x' from customers) x", &[(1, X)]),
            ("select x.nope from (select card || 'x' as y from customers) x", &[(1, X)]),
            ("select y.email from (select x.* from (select * from orders) x) y", &[(2, D)]),
            ("select j.card from (customers join orders using (id)) as j", &[(1, D)]),
            ("select u.card from customers join orders using (card) as u", &[(1, D)]),
            ("select x from customers c, lateral (select c.card as x) s", &[(1, D)]),
            ("select v from customers c, lateral unnest(array[c.card]) as u(v)", &[(1, X)]),
            ("table customers", &[(0, X), (0, X), (1, D), (2, D)]),
            ("values (1, (select card from customers))", &[(1, X), (1, X)]),
            ("select * from customers tablesample system (10)", &[(0, X), (0, X), (1, D), (2, D)]),
            ("select a from customers as t(a, b, c)", &[(0, X)]),
            ("select c from customers as t(a, b, c)", &[(1, D)]),
            ("with x(k) as (select card from customers) select k from x", &[(1, D)]),
            ("with x as (update customers set name = 'n' returning card) select card from x", &[(1, D)]),
            ("select card from customers union select email from orders", &[(3, D)]),
            ("select * from xmltable('/r' passing (select card from customers) columns a text)", &[(u64::MAX, X), (u64::MAX, X), (1, X)]),
        ];
        for (sql, want) in cases {
            assert_eq!(cols(sql), want.to_vec(), "{sql}");
        }
        // A procedure's OUT parameters: a row lineage cannot follow.
        assert_eq!(analyze("call p(null)", &R), Some(vec![StmtKind::Unknown]));
        assert_eq!(analyze("move 5 in c", &R), Some(vec![StmtKind::Other]));
        assert_eq!(analyze("", &R), Some(vec![]));
        assert!(analyze(&format!("select 1 /* {} */", "x".repeat(crate::policy::MAX_PARSE_BYTES)), &R).is_none());
        // COPY options as the server reads them (legacy syntax too).
        let fmt = |sql: &str| match analyze(sql, &R).and_then(|mut v| (v.len() == 1).then(|| v.remove(0))) {
            Some(StmtKind::Rows(l)) => l.copy,
            o => panic!("{sql}: {o:?}"),
        };
        let f = fmt("copy customers to stdout with csv header delimiter as ';' null as 'N'").unwrap();
        assert_eq!((f.format, f.delimiter, f.null.as_slice(), f.header), (CopyKind::Csv, b';', &b"N"[..], true));
        let f = fmt("copy (select 1) to stdout (format binary)").unwrap();
        assert_eq!(f.format, CopyKind::Binary);
        let f = fmt("copy customers to stdout (format csv, header false, quote '''')").unwrap();
        assert_eq!((f.header, f.quote, f.delimiter), (false, b'\'', b','));
        for (enc, other) in [("SJIS", true), ("big5", true), ("LATIN1", true), ("UTF-8", false), ("utf8", false), ("Unicode", false)] {
            let f = fmt(&format!("copy customers to stdout (encoding '{enc}')")).unwrap();
            assert_eq!(f.other_encoding, other, "{enc}");
        }
        assert!(!fmt("copy customers to stdout").unwrap().other_encoding);
        assert_eq!(analyze("copy customers to '/tmp/x'", &R), Some(vec![StmtKind::Other]));
        assert_eq!(analyze("copy customers from stdin", &R), Some(vec![StmtKind::Other]));
    }

    /// No tree shape makes lineage panic: every node of real trees replaced by odd values.
    #[test]
    fn odd_tree_shapes_do_not_panic() {
        let texts = [
            "with t(a) as (select card from customers) select t.*, (select 1), x.* from t, lateral unnest(array[1]) x join (customers c join orders o using (id)) j on true",
            "copy (select * from customers) to stdout (format csv, header, delimiter '|', null 'n')",
            "insert into customers as c select * from customers returning c.*, (c).card",
            "update customers set name = 'x' from orders o returning *",
            "select a.b.c.d, t.*, * from s.t, (values (1)) v(a) union all select 1, 2, 3",
            "declare c cursor for select 1; prepare p as select card from customers; execute p; fetch c",
        ];
        let odd = [
            Value::Null,
            Value::Bool(true),
            serde_json::json!(7),
            serde_json::json!("x"),
            serde_json::json!([]),
            serde_json::json!({}),
            serde_json::json!([{}]),
            serde_json::json!({"A_Star": {}}),
        ];
        fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            out.push(at.clone());
            match v {
                Value::Object(m) => m.iter().for_each(|(k, x)| {
                    at.push(k.clone());
                    paths(x, at, out);
                    at.pop();
                }),
                Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| {
                    at.push(i.to_string());
                    paths(x, at, out);
                    at.pop();
                }),
                _ => {}
            }
        }
        fn at_mut<'v>(v: &'v mut Value, p: &[String]) -> Option<&'v mut Value> {
            p.iter().try_fold(v, |v, k| match v {
                Value::Object(m) => m.get_mut(k),
                Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
                _ => None,
            })
        }
        let mut n = 0;
        for sql in texts {
            let tree = pgparse::parse(sql).expect("parses");
            let mut all = Vec::new();
            paths(&tree, &mut Vec::new(), &mut all);
            for p in &all {
                for o in &odd {
                    let mut t = tree.clone();
                    if let Some(slot) = at_mut(&mut t, p) {
                        *slot = o.clone();
                    }
                    let _ = run(&t, &R);
                    n += 1;
                }
            }
        }
        assert!(n > 1000);
    }

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

    /// The deepest statements pgward parses (`pgparse::MAX_NESTING`, and the server
    /// grammar's own stack limit) are analyzed by lineage on half the stack pgward's threads
    /// have, in a debug build; one level more is not parsed (no lineage). (The parse itself
    /// runs on the full 64 MiB here: reading the deepest nested subqueries' JSON takes more
    /// than half, see `policy::pgparse`.)
    #[test]
    fn deepest_allowed_statements_fit_a_small_stack() {
        let run_all = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(|| {
                type Gen = Box<dyn Fn(usize) -> String>;
                let rep = |pre: &'static str, r: &'static str, post: &'static str| -> Gen {
                    Box::new(move |k| format!("{pre}{}{post}", r.repeat(k)))
                };
                let chains: Vec<(&str, Gen)> = vec![
                    ("plus", rep("SELECT a", " + a", " FROM t")),
                    ("concat", rep("SELECT a", " || 'x'", " FROM t")),
                    ("cast", rep("SELECT a", "::text", " FROM t")),
                    ("subscript", rep("SELECT a", "[1]", " FROM t")),
                    ("is-null", rep("SELECT a", " IS NULL", " FROM t")),
                    ("collate", rep("SELECT a", " COLLATE \"C\"", " FROM t")),
                    ("union", rep("SELECT a FROM t", " UNION ALL SELECT a FROM t", "")),
                    ("except", rep("SELECT a FROM t", " EXCEPT SELECT b FROM t", "")),
                    ("join", rep("SELECT * FROM t", " JOIN t ON true", "")),
                    ("not", rep("SELECT ", "NOT ", "a FROM t")),
                    ("minus", rep("SELECT ", "- ", "a FROM t")),
                    ("insert-returning", rep("INSERT INTO t SELECT 1 RETURNING a", " + a", "")),
                    ("parens", Box::new(|k| format!("SELECT {}a{} FROM t", "(".repeat(k), ")".repeat(k)))),
                    ("scalar-subqueries", Box::new(|k| format!("SELECT {}a FROM t{}", "(SELECT ".repeat(k), ")".repeat(k)))),
                    ("derived-tables", Box::new(|k| format!("SELECT * FROM {}t{}", "(SELECT * FROM ".repeat(k), ") x".repeat(k)))),
                    ("case", Box::new(|k| format!("SELECT {}a{} FROM t", "CASE WHEN true THEN ".repeat(k), " END".repeat(k)))),
                ];
                // Within the nesting bound, and parsed (the server's grammar has a stack limit
                // of its own that deep subqueries and CASEs reach first).
                let accepted = |s: &str| {
                    pgparse::nesting_bound(&pgparse::scan(s).expect("lexes")) <= pgparse::MAX_NESTING && pgparse::parse(s).is_ok()
                };
                for (name, generate) in &chains {
                    let mut k = 1;
                    while accepted(&generate(k * 2)) {
                        k *= 2;
                    }
                    // the deepest accepted statement of this kind
                    let (mut lo, mut hi) = (k, k * 2);
                    while hi - lo > 1 {
                        let mid = (lo + hi) / 2;
                        if accepted(&generate(mid)) { lo = mid } else { hi = mid }
                    }
                    let tree = pgparse::parse(&generate(lo)).expect("parses");
                    let v = std::thread::scope(|sc| {
                        std::thread::Builder::new().stack_size(32 << 20).spawn_scoped(sc, || run(&tree, &AllMasked).0).expect("thread").join()
                    });
                    assert!(
                        matches!(v.as_deref(), Ok([StmtKind::Rows(l)]) if l.any == 1),
                        "{name}: lineage at {lo} levels: {v:?}"
                    );
                    assert!(lo >= 1000, "{name}: only {lo} levels");
                    assert!(analyze(&generate(hi), &AllMasked).is_none(), "{name}: lineage beyond the limit");
                }
            })
            .expect("thread");
        assert!(run_all.join().is_ok());
    }
}
