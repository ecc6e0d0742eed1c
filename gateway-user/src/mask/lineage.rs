//! Column lineage: which output columns of a statement are computed from masked columns.
//!
//! A pure function of the SQL text (sqlparser, Postgres dialect) and of a rule matcher. For
//! every statement that returns rows (SELECT/VALUES/TABLE, INSERT/UPDATE/DELETE … RETURNING,
//! COPY … TO STDOUT, DECLARE … CURSOR, PREPARE … AS) it gives, per output column, the set of
//! mask rules whose columns appear **anywhere** in the column's expression (`upper(card)`,
//! `card || ''`, `substr(card, 1, 6)`, `string_agg(card, ',')`, a scalar subquery selecting
//! `card`, …), and whether the column is a bare reference (the masked value itself) or
//! derived from it. A table (alias) used as a value — `row_to_json(c)`, `c::text`, `SELECT c
//! FROM customers c`, `f(c.*)` — references all its columns.
//!
//! Name resolution is conservative: an unqualified column is looked up in every relation in
//! scope (and outer scopes, for correlated subqueries), an unqualified table name matches a rule
//! table of that name in any schema. `WHERE`/`GROUP BY`/`ORDER BY` do not taint outputs.
//! Functions and views are opaque here (their bodies are not read): that is what the content
//! detectors are for.

use std::cell::Cell;
use std::ops::ControlFlow;

use sqlparser::ast::{
    CopyOption, CopySource, CopyTarget, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query,
    Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableFactor, TableObject, TableWithJoins,
    Visit, Visitor,
};

use crate::mask::sqlparser_normalize::{self as normalize, Normalized};

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
    pub null: Vec<u8>,
    /// CSV HEADER: the first CopyData is the header line (not masked).
    pub header: bool,
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

/// The statements of `sql` as sqlparser reads them, when Postgres's own parser splits the
/// string into as many: a text the two read differently (an operator followed by a comment
/// start, say) has no lineage, and its results are treated as derived from every rule.
fn parse_agreeing(sql: &str) -> Option<Vec<sqlparser::ast::Statement>> {
    let stmts = crate::mask::sqlparser_limits::parse_sql(sql)?;
    let server = crate::policy::pgparse::parse(sql).ok()?;
    let count = server.get("stmts").and_then(|s| s.as_array()).map_or(0, Vec::len);
    (count == stmts.len()).then_some(stmts)
}

/// Analyze a query string: one entry per statement. None: the string does not parse, or
/// sqlparser and Postgres split it differently (callers treat each result as `Unknown`).
pub fn analyze(sql: &str, r: &dyn Resolver) -> Option<Vec<StmtKind>> {
    let stmts = parse_agreeing(sql)?;
    let read = Cell::new(false);
    Some(stmts.iter().map(|s| statement(s, r, &read)).collect())
}

/// [`analyze`], and whether the result holds for every text with the literal-normalized key
/// `norm` (computed from `sql`), for the same resolver: true when the text parsed, every
/// literal became a literal value in the AST where the normalizer saw it (a literal that is
/// structure — a COPY option's character or NULL string, an identifier — keeps the result to
/// this text), and lineage read no literal's value (it reads none, except the alias guessed
/// from an opaque FROM item's text, which counts when that item holds a literal).
pub(crate) fn analyze_normalized(sql: &str, r: &dyn Resolver, norm: &Normalized) -> (Option<Vec<StmtKind>>, bool) {
    let Some(stmts) = parse_agreeing(sql) else { return (None, false) };
    let read = Cell::new(false);
    let out: Vec<StmtKind> = stmts.iter().map(|s| statement(s, r, &read)).collect();
    let shareable = !read.get() && norm.values_cover_literals(sql, &stmts);
    (Some(out), shareable)
}

fn ident_lc(s: &str) -> String {
    s.to_lowercase()
}

fn obj_parts(n: &ObjectName) -> Vec<String> {
    n.0.iter().filter_map(|p| p.as_ident()).map(|i| if i.quote_style.is_some() { i.value.clone() } else { ident_lc(&i.value) }).collect()
}

fn ident_name(i: &sqlparser::ast::Ident) -> String {
    if i.quote_style.is_some() { i.value.clone() } else { ident_lc(&i.value) }
}

/// `read`: set when the result depended on a literal's value.
fn statement(s: &Statement, r: &dyn Resolver, read: &Cell<bool>) -> StmtKind {
    let cx = Cx { r, read };
    match s {
        Statement::Query(q) => StmtKind::Rows(cx.lineage(&cx.query(q, &[]))),
        Statement::Insert(ins) => match &ins.returning {
            Some(items) => {
                let mut rels = Vec::new();
                if let TableObject::TableName(n) = &ins.table {
                    let mut rel = cx.base_rel(n, None);
                    if let Some(a) = &ins.table_alias {
                        rel.name = ident_name(&a.alias);
                    }
                    rels.push(rel);
                }
                StmtKind::Rows(cx.lineage(&cx.projection(items, &[Scope { rels }])))
            }
            None => StmtKind::Other,
        },
        Statement::Update(u) => match &u.returning {
            Some(items) => {
                let mut rels = cx.from(std::slice::from_ref(&u.table), &[]);
                if let Some(from) = &u.from {
                    let tables = match from {
                        sqlparser::ast::UpdateTableFromKind::BeforeSet(t) | sqlparser::ast::UpdateTableFromKind::AfterSet(t) => t,
                    };
                    rels.extend(cx.from(tables, &[]));
                }
                StmtKind::Rows(cx.lineage(&cx.projection(items, &[Scope { rels }])))
            }
            None => StmtKind::Other,
        },
        Statement::Delete(d) => match &d.returning {
            Some(items) => {
                let tables = match &d.from {
                    sqlparser::ast::FromTable::WithFromKeyword(t) | sqlparser::ast::FromTable::WithoutKeyword(t) => t,
                };
                let mut rels = cx.from(tables, &[]);
                if let Some(u) = &d.using {
                    rels.extend(cx.from(u, &[]));
                }
                StmtKind::Rows(cx.lineage(&cx.projection(items, &[Scope { rels }])))
            }
            None => StmtKind::Other,
        },
        Statement::Copy { source, to: true, target: CopyTarget::Stdout, options, legacy_options, .. } => {
            let items = match source {
                CopySource::Query(q) => cx.query(q, &[]),
                CopySource::Table { table_name, columns } => {
                    let rel = cx.base_rel(table_name, None);
                    if columns.is_empty() {
                        rel.star_items(r)
                    } else {
                        columns.iter().map(|c| Item::Col(rel.col_with(&ident_name(c), r))).collect()
                    }
                }
            };
            let mut l = cx.lineage(&items);
            let mut f = CopyFormat { format: CopyKind::Text, delimiter: b'\t', quote: b'"', null: b"\\N".to_vec(), header: false };
            let mut null_set = false;
            let mut delim_set = false;
            for o in options {
                match o {
                    CopyOption::Format(i) => {
                        f.format = match i.value.to_lowercase().as_str() {
                            "csv" => CopyKind::Csv,
                            "binary" => CopyKind::Binary,
                            _ => CopyKind::Text,
                        }
                    }
                    CopyOption::Delimiter(c) if c.is_ascii() => {
                        f.delimiter = *c as u8;
                        delim_set = true;
                    }
                    CopyOption::Quote(c) if c.is_ascii() => f.quote = *c as u8,
                    CopyOption::Header(h) => f.header = *h,
                    CopyOption::Null(s) => {
                        f.null = s.as_bytes().to_vec();
                        null_set = true;
                    }
                    _ => {}
                }
            }
            for o in legacy_options {
                match o {
                    sqlparser::ast::CopyLegacyOption::Binary => f.format = CopyKind::Binary,
                    sqlparser::ast::CopyLegacyOption::Csv(_) => f.format = CopyKind::Csv,
                    sqlparser::ast::CopyLegacyOption::Delimiter(c) if c.is_ascii() => {
                        f.delimiter = *c as u8;
                        delim_set = true;
                    }
                    sqlparser::ast::CopyLegacyOption::Null(s) => {
                        f.null = s.as_bytes().to_vec();
                        null_set = true;
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
            }
            l.copy = Some(f);
            StmtKind::Rows(l)
        }
        Statement::Copy { .. } => StmtKind::Other,
        Statement::Declare { stmts, .. } => {
            for d in stmts {
                if let (Some(q), Some(name)) = (&d.for_query, d.names.first()) {
                    return StmtKind::Declare(ident_name(name), cx.lineage(&cx.query(q, &[])));
                }
            }
            StmtKind::Other
        }
        Statement::Fetch { name, .. } => StmtKind::Fetch(ident_name(name)),
        Statement::Prepare { name, statement: inner, .. } => match statement(inner, r, read) {
            StmtKind::Rows(l) => StmtKind::Prepare(ident_name(name), l),
            _ => StmtKind::Other,
        },
        Statement::Execute { name: Some(n), .. } => StmtKind::Execute(obj_parts(n).join(".")),
        Statement::Explain { .. } | Statement::ExplainTable { .. } => StmtKind::Other,
        _ => StmtKind::Other,
    }
}

/// A relation in scope.
#[derive(Debug, Clone)]
struct Rel {
    /// Alias, or the table's own name (lowercase unless quoted).
    name: String,
    kind: RelKind,
}

#[derive(Debug, Clone)]
enum RelKind {
    Base { schema: Option<String>, table: String, rules_any: u64, columns: Option<Vec<String>> },
    /// Output items in order (stars of unknown width kept in place), and the relations those
    /// stars came from (for lookups by name).
    Derived { cols: Vec<(Option<String>, Item)>, stars: Vec<Rel> },
    /// Function results, VALUES, …: its columns all carry `whole` (derived).
    Opaque { whole: Taint },
}

struct Cx<'a> {
    r: &'a dyn Resolver,
    /// The result depended on a literal's value.
    read: &'a Cell<bool>,
}

struct Scope {
    rels: Vec<Rel>,
}

impl Rel {
    fn col_with(&self, name: &str, r: &dyn Resolver) -> Taint {
        match &self.kind {
            RelKind::Base { schema, table, .. } => {
                let bits = r.rules_for(schema.as_deref(), table, Some(name));
                Taint { rules: bits, direct: true }
            }
            RelKind::Derived { cols, stars } => {
                let mut t = Taint::NONE;
                let mut found = false;
                for (n, it) in cols {
                    if let (Some(n), Item::Col(ct)) = (n.as_deref(), it)
                        && n == name
                    {
                        t = if found { t.union(*ct) } else { *ct };
                        found = true;
                    }
                }
                if !found {
                    for s in stars {
                        let st = s.col_with(name, r);
                        t = if found { t.union(st) } else { st };
                        found = true;
                    }
                }
                t
            }
            RelKind::Opaque { whole } => whole.derived(),
        }
    }
    fn whole(&self) -> Taint {
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
    /// The items `rel.*` expands to.
    fn star_items(&self, r: &dyn Resolver) -> Vec<Item> {
        match &self.kind {
            RelKind::Base { columns: Some(cols), .. } => cols.iter().map(|c| Item::Col(self.col_with(c, r))).collect(),
            RelKind::Base { .. } => vec![Item::Star],
            RelKind::Derived { cols, .. } => cols.iter().map(|(_, i)| i.clone()).collect(),
            RelKind::Opaque { whole } => {
                if whole.is_none() {
                    vec![Item::Star]
                } else {
                    vec![Item::Star, Item::Col(whole.derived())]
                }
            }
        }
    }
}

impl<'a> Cx<'a> {
    fn lineage(&self, items: &[Item]) -> Lineage {
        let mut any = 0;
        for i in items {
            if let Item::Col(t) = i {
                any |= t.rules;
            }
        }
        Lineage { items: items.to_vec(), any, copy: None }
    }

    fn base_rel(&self, n: &ObjectName, alias: Option<&sqlparser::ast::TableAlias>) -> Rel {
        self.base_rel_parts(obj_parts(n), alias)
    }

    fn base_rel_parts(&self, parts: Vec<String>, alias: Option<&sqlparser::ast::TableAlias>) -> Rel {
        let (schema, table) = match parts.as_slice() {
            [t] => (None, t.clone()),
            [.., s, t] => (Some(s.clone()), t.clone()),
            [] => (None, String::new()),
        };
        let rules_any = self.r.rules_for(schema.as_deref(), &table, None);
        let columns = if rules_any != 0 { self.r.columns_of(schema.as_deref(), &table) } else { None };
        let name = alias.map(|a| ident_name(&a.name)).unwrap_or_else(|| table.clone());
        let rel = Rel { name, kind: RelKind::Base { schema: schema.clone(), table: table.clone(), rules_any, columns: columns.clone() } };
        // Column aliases on a base table (`FROM t AS x(a, b)`) rename columns positionally.
        if let (Some(a), Some(cols)) = (alias, &columns)
            && !a.columns.is_empty()
        {
            let mut out = Vec::new();
            for (i, c) in cols.iter().enumerate() {
                let t = Taint { rules: self.r.rules_for(schema.as_deref(), &table, Some(c)), direct: true };
                let n = a.columns.get(i).map(|d| ident_name(&d.name)).unwrap_or_else(|| c.clone());
                out.push((Some(n), Item::Col(t)));
            }
            return Rel { name: rel.name, kind: RelKind::Derived { cols: out, stars: Vec::new() } };
        }
        if alias.is_some_and(|a| !a.columns.is_empty()) && rules_any != 0 {
            // Renamed columns of a rule table whose layout we do not know: every column may be
            // a masked one.
            return Rel { name: rel.name, kind: RelKind::Opaque { whole: Taint { rules: rules_any, direct: false } } };
        }
        rel
    }

    /// Relations of a FROM list (with joins).
    fn from(&self, from: &[TableWithJoins], outer: &[Scope]) -> Vec<Rel> {
        let mut rels = Vec::new();
        for twj in from {
            self.factor(&twj.relation, outer, &mut rels);
            for j in &twj.joins {
                self.factor(&j.relation, outer, &mut rels);
            }
        }
        rels
    }

    fn factor(&self, f: &TableFactor, outer: &[Scope], rels: &mut Vec<Rel>) {
        match f {
            TableFactor::Table { name, alias, args, .. } => {
                let parts = obj_parts(name);
                // A CTE of an enclosing WITH?
                if parts.len() == 1 {
                    for sc in outer.iter().rev() {
                        if let Some(cte) = sc.rels.iter().find(|r| r.name == format!("\u{0}cte:{}", parts[0])) {
                            let mut c = cte.clone();
                            c.name = alias.as_ref().map(|a| ident_name(&a.name)).unwrap_or_else(|| parts[0].clone());
                            rels.push(c);
                            return;
                        }
                    }
                }
                if args.is_some() {
                    // table-valued function call: opaque, tainted by its arguments
                    let mut w = Walker::new(self, outer);
                    let _ = f.visit(&mut w);
                    let name = alias.as_ref().map(|a| ident_name(&a.name)).unwrap_or_else(|| parts.last().cloned().unwrap_or_default());
                    rels.push(Rel { name, kind: RelKind::Opaque { whole: w.taint } });
                    return;
                }
                rels.push(self.base_rel(name, alias.as_ref()));
            }
            TableFactor::Derived { subquery, alias, lateral, .. } => {
                let scope_for_lateral: Vec<Scope>;
                let outer2: &[Scope] = if *lateral {
                    scope_for_lateral = outer.iter().map(|s| Scope { rels: s.rels.clone() }).chain([Scope { rels: rels.clone() }]).collect();
                    &scope_for_lateral
                } else {
                    outer
                };
                let (cols, stars) = self.query_cols(subquery, outer2);
                let name = alias.as_ref().map(|a| ident_name(&a.name)).unwrap_or_default();
                let mut cols = cols;
                if let Some(a) = alias {
                    for (i, c) in a.columns.iter().enumerate() {
                        if let Some(slot) = cols.get_mut(i) {
                            slot.0 = Some(ident_name(&c.name));
                        }
                    }
                }
                rels.push(Rel { name, kind: RelKind::Derived { cols, stars } });
            }
            TableFactor::NestedJoin { table_with_joins, alias, .. } => {
                let inner = self.from(std::slice::from_ref(table_with_joins), outer);
                match alias {
                    Some(a) => rels.push(Rel { name: ident_name(&a.name), kind: RelKind::Derived { cols: Vec::new(), stars: inner } }),
                    None => rels.extend(inner),
                }
            }
            other => {
                // Functions, UNNEST, JSON_TABLE, VALUES-like factors: opaque, tainted by whatever
                // their expressions reference (LATERAL may reference earlier relations).
                let mut scopes: Vec<Scope> = outer.iter().map(|s| Scope { rels: s.rels.clone() }).collect();
                scopes.push(Scope { rels: rels.clone() });
                let mut w = Walker::new(self, &scopes);
                let _ = other.visit(&mut w);
                // The alias is read from the item's printed text, literals included.
                if normalize::has_literal(other) {
                    self.read.set(true);
                }
                let name = factor_alias(other).unwrap_or_default();
                rels.push(Rel { name, kind: RelKind::Opaque { whole: w.taint } });
            }
        }
    }

    /// Output columns of a query as (name, taint), plus relations whose columns follow from
    /// an unknown-width star.
    fn query_cols(&self, q: &Query, outer: &[Scope]) -> (Vec<(Option<String>, Item)>, Vec<Rel>) {
        let saved = STAR_RELS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let items_named = self.query_named(q, outer);
        // Stars of unknown width inside a derived table: their columns are looked up by name
        // in the relations they came from.
        let stars = STAR_RELS.with(|s| std::mem::replace(&mut *s.borrow_mut(), saved));
        (items_named, stars)
    }

    fn query(&self, q: &Query, outer: &[Scope]) -> Vec<Item> {
        let saved = STAR_RELS.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let v = self.query_named(q, outer);
        STAR_RELS.with(|s| *s.borrow_mut() = saved);
        v.into_iter().map(|(_, i)| i).collect()
    }

    fn query_named(&self, q: &Query, outer: &[Scope]) -> Vec<(Option<String>, Item)> {
        let mut scopes: Vec<Scope> = outer.iter().map(|s| Scope { rels: s.rels.clone() }).collect();
        if let Some(with) = &q.with {
            let mut ctes = Vec::new();
            for cte in &with.cte_tables {
                let name = ident_name(&cte.alias.name);
                // (recursive CTEs see themselves as untainted on the first pass: fine, their
                // base case carries the taint)
                let sc: Vec<Scope> = scopes.iter().map(|s| Scope { rels: s.rels.clone() }).chain([Scope { rels: ctes.clone() }]).collect();
                let (mut cols, stars) = self.query_cols(&cte.query, &sc);
                for (i, c) in cte.alias.columns.iter().enumerate() {
                    if let Some(slot) = cols.get_mut(i) {
                        slot.0 = Some(ident_name(&c.name));
                    }
                }
                ctes.push(Rel { name: format!("\u{0}cte:{name}"), kind: RelKind::Derived { cols, stars } });
            }
            scopes.push(Scope { rels: ctes });
        }
        self.set_expr(&q.body, &scopes)
    }

    fn set_expr(&self, body: &SetExpr, outer: &[Scope]) -> Vec<(Option<String>, Item)> {
        match body {
            SetExpr::Select(s) => self.select(s, outer),
            SetExpr::Query(q) => self.query_named(q, outer),
            SetExpr::SetOperation { left, right, .. } => {
                let l = self.set_expr(left, outer);
                let r = self.set_expr(right, outer);
                if l.len() != r.len() || l.iter().chain(&r).any(|(_, i)| matches!(i, Item::Star)) {
                    // cannot pair columns: every column carries everything
                    let mut t = Taint::NONE;
                    for (_, i) in l.iter().chain(&r) {
                        if let Item::Col(c) = i {
                            t = t.union(*c);
                        }
                    }
                    return l.into_iter().map(|(n, i)| (n, if matches!(i, Item::Star) { i } else { Item::Col(t) })).collect();
                }
                l.into_iter()
                    .zip(r)
                    .map(|((n, a), (_, b))| match (a, b) {
                        (Item::Col(x), Item::Col(y)) => {
                            let direct = (x.direct || x.is_none()) && (y.direct || y.is_none());
                            (n, Item::Col(Taint { rules: x.rules | y.rules, direct }))
                        }
                        (a, _) => (n, a),
                    })
                    .collect()
            }
            SetExpr::Values(v) => {
                let mut w = Walker::new(self, outer);
                let _ = v.visit(&mut w);
                let width = v.rows.first().map(|r| r.len()).unwrap_or(0);
                (0..width).map(|i| (Some(format!("column{}", i + 1)), Item::Col(w.taint.derived()))).collect()
            }
            SetExpr::Table(t) => {
                let Some(name) = &t.table_name else { return vec![(None, Item::Star)] };
                let mut parts = Vec::new();
                if let Some(s) = &t.schema_name {
                    parts.push(ident_name(s));
                }
                parts.push(ident_name(name));
                let rels = vec![self.base_rel_parts(parts, None)];
                self.expand_star(&rels)
            }
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => match statement(s, self.r, self.read) {
                StmtKind::Rows(l) => l.items.into_iter().map(|i| (None, i)).collect(),
                _ => Vec::new(),
            },
        }
    }

    fn expand_star(&self, rels: &[Rel]) -> Vec<(Option<String>, Item)> {
        let mut out = Vec::new();
        for r in rels {
            out.extend(self.rel_star_named(r));
        }
        out
    }

    fn rel_star_named(&self, r: &Rel) -> Vec<(Option<String>, Item)> {
        match &r.kind {
            RelKind::Base { columns: Some(cols), schema, table, .. } => cols
                .iter()
                .map(|c| (Some(c.clone()), Item::Col(Taint { rules: self.r.rules_for(schema.as_deref(), table, Some(c)), direct: true })))
                .collect(),
            RelKind::Base { .. } => {
                STAR_RELS.with(|s| s.borrow_mut().push(r.clone()));
                vec![(None, Item::Star)]
            }
            RelKind::Derived { cols, .. } => cols.clone(),
            RelKind::Opaque { whole } => {
                if whole.is_none() {
                    vec![(None, Item::Star)]
                } else {
                    vec![(None, Item::Star), (None, Item::Col(whole.derived()))]
                }
            }
        }
    }

    fn select(&self, s: &Select, outer: &[Scope]) -> Vec<(Option<String>, Item)> {
        let rels = self.from(&s.from, outer);
        let mut scopes: Vec<Scope> = outer.iter().map(|s| Scope { rels: s.rels.clone() }).collect();
        scopes.push(Scope { rels });
        self.projection(&s.projection, &scopes).into_iter().collect::<Vec<_>>().into_iter().zip(names(&s.projection, &scopes, self)).map(|(i, n)| (n, i)).collect()
    }

    /// Items of a select list / RETURNING list in `scopes` (last = innermost).
    fn projection(&self, items: &[SelectItem], scopes: &[Scope]) -> Vec<Item> {
        let mut out = Vec::new();
        for it in items {
            match it {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => out.push(Item::Col(self.expr(e, scopes))),
                SelectItem::ExprWithAliases { expr, aliases } => {
                    let t = self.expr(expr, scopes).derived();
                    out.extend(aliases.iter().map(|_| Item::Col(t)));
                }
                SelectItem::Wildcard(_) => {
                    if let Some(sc) = scopes.last() {
                        out.extend(self.expand_star(&sc.rels).into_iter().map(|(_, i)| i));
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => match kind {
                    SelectItemQualifiedWildcardKind::ObjectName(n) => {
                        let parts = obj_parts(n);
                        match parts.last().and_then(|p| find_rel(scopes, p)) {
                            Some(r) => out.extend(self.rel_star_named(&r).into_iter().map(|(_, i)| i)),
                            None => out.push(Item::Star),
                        }
                    }
                    SelectItemQualifiedWildcardKind::Expr(e) => {
                        let t = self.expr(e, scopes).derived();
                        out.push(Item::Star);
                        if !t.is_none() {
                            out.push(Item::Col(t));
                        }
                    }
                },
            }
        }
        out
    }

    /// The taint of an expression.
    fn expr(&self, e: &Expr, scopes: &[Scope]) -> Taint {
        let mut bare = e;
        while let Expr::Nested(inner) = bare {
            bare = inner;
        }
        let direct = matches!(bare, Expr::Identifier(_) | Expr::CompoundIdentifier(_));
        let mut w = Walker::new(self, scopes);
        let _ = e.visit(&mut w);
        let t = w.taint;
        if direct && !w.whole_row { t } else { t.derived() }
    }
}

thread_local! {
    static STAR_RELS: std::cell::RefCell<Vec<Rel>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn factor_alias(f: &TableFactor) -> Option<String> {
    let s = f.to_string();
    // "<factor> AS alias" — good enough for naming an opaque relation
    s.rsplit_once(" AS ").map(|(_, a)| a.split(['(', ' ']).next().unwrap_or("").trim_matches('"').to_lowercase())
}

fn names(items: &[SelectItem], scopes: &[Scope], cx: &Cx<'_>) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for it in items {
        match it {
            SelectItem::UnnamedExpr(e) => out.push(match e {
                Expr::Identifier(i) => Some(ident_name(i)),
                Expr::CompoundIdentifier(p) => p.last().map(ident_name),
                Expr::Function(f) => obj_parts(&f.name).last().cloned(),
                _ => None,
            }),
            SelectItem::ExprWithAlias { alias, .. } => out.push(Some(ident_name(alias))),
            SelectItem::ExprWithAliases { aliases, .. } => out.extend(aliases.iter().map(|a| Some(ident_name(a)))),
            SelectItem::Wildcard(_) => {
                if let Some(sc) = scopes.last() {
                    out.extend(cx.expand_star(&sc.rels).into_iter().map(|(n, _)| n));
                }
            }
            SelectItem::QualifiedWildcard(kind, _) => match kind {
                SelectItemQualifiedWildcardKind::ObjectName(n) => {
                    let parts = obj_parts(n);
                    match parts.last().and_then(|p| find_rel(scopes, p)) {
                        Some(r) => out.extend(cx.rel_star_named(&r).into_iter().map(|(n, _)| n)),
                        None => out.push(None),
                    }
                }
                SelectItemQualifiedWildcardKind::Expr(e) => {
                    out.push(None);
                    if !cx.expr(e, scopes).is_none() {
                        out.push(None);
                    }
                }
            },
        }
    }
    out
}

fn find_rel(scopes: &[Scope], name: &str) -> Option<Rel> {
    for sc in scopes.iter().rev() {
        if let Some(r) = sc.rels.iter().find(|r| r.name == name) {
            return Some(r.clone());
        }
    }
    None
}

/// Walks an expression; nested queries are analyzed with the current scopes as outer scopes
/// and contribute the union of their output columns.
struct Walker<'c, 'a> {
    cx: &'c Cx<'a>,
    scopes: &'c [Scope],
    depth: usize,
    taint: Taint,
    whole_row: bool,
}

impl<'c, 'a> Walker<'c, 'a> {
    fn new(cx: &'c Cx<'a>, scopes: &'c [Scope]) -> Self {
        Walker { cx, scopes, depth: 0, taint: Taint::NONE, whole_row: false }
    }
    fn add(&mut self, t: Taint) {
        self.taint = if self.taint.is_none() && !t.is_none() { t } else { self.taint.union(t) };
        if self.taint.rules == t.rules && !t.is_none() && t.direct {
            self.taint.direct = true;
        }
    }
    fn ident(&mut self, parts: &[String]) {
        match parts {
            [col] => {
                let mut t = Taint::NONE;
                let mut first = true;
                for sc in self.scopes.iter().rev() {
                    for r in sc.rels.iter().filter(|r| !r.name.starts_with('\u{0}')) {
                        let c = r.col_with(col, self.cx.r);
                        if !c.is_none() {
                            t = if first { c } else { t.union(c) };
                            first = false;
                        }
                        if &r.name == col {
                            // a relation used as a value: the whole row
                            let w = r.whole();
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
            [.., rel, col] => {
                match find_rel(self.scopes, rel) {
                    Some(r) => {
                        let c = r.col_with(col, self.cx.r);
                        self.add(c);
                    }
                    None => {
                        // `schema.table.column` or a composite field access: match by name
                        let schema = if parts.len() >= 3 { Some(parts[parts.len() - 3].as_str()) } else { None };
                        let bits = self.cx.r.rules_for(schema, rel, Some(col));
                        self.add(Taint { rules: bits, direct: true });
                    }
                }
            }
            [] => {}
        }
    }
    fn wildcard_ref(&mut self, n: &ObjectName) {
        let parts = obj_parts(n);
        if let Some(r) = parts.last().and_then(|p| find_rel(self.scopes, p)) {
            self.whole_row = true;
            let w = r.whole();
            self.add(w);
        }
    }
}

impl Visitor for Walker<'_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.depth == 0 {
            let items = self.cx.query(q, self.scopes);
            for i in items {
                if let Item::Col(t) = i {
                    self.add(t.derived());
                }
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::Identifier(i) => self.ident(&[ident_name(i)]),
            Expr::CompoundIdentifier(p) => self.ident(&p.iter().map(ident_name).collect::<Vec<_>>()),
            Expr::QualifiedWildcard(n, _) => self.wildcard_ref(n),
            Expr::Function(f) => {
                if let FunctionArguments::List(l) = &f.args {
                    for a in &l.args {
                        let ae = match a {
                            FunctionArg::Named { arg, .. } | FunctionArg::ExprNamed { arg, .. } | FunctionArg::Unnamed(arg) => arg,
                        };
                        if let FunctionArgExpr::QualifiedWildcard(n) = ae {
                            self.wildcard_ref(n);
                        }
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A string sqlparser reads as one statement and Postgres as several gets no lineage
    /// (every result is then treated as derived from every rule).
    #[test]
    fn texts_the_two_parsers_split_differently_have_no_lineage() {
        for sql in [
            "SELECT 1 #-- '\n 2; SELECT upper(card) FROM customers; --'",
            "SELECT 1 |/* '*/ 2; SELECT upper(card) FROM customers; -- '",
        ] {
            assert!(analyze(sql, &R).is_none(), "{sql:?}");
        }
        assert!(analyze("SELECT 1; SELECT upper(card) FROM customers", &R).is_some());
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

    /// Literal values by the normalizer's kind and size class (see `mask::sqlparser_normalize`).
    fn battery(kind: u8, class: u8) -> &'static [&'static str] {
        match (kind, class) {
            (b's', b'0') => &["''"],
            (b's', b'1') => &["'x'", "'|'", "','", "'1'"],
            (b's', _) => &["'card'", "'a AS card'", "'customers'", "'email'", "'n/a'", "'x AS c'"],
            (b'i', _) => &["0", "1", "2", "42"],
            (b'f', _) => &["1.5", "0.0"],
            (b'd', _) => &["$$card$$", "$$ AS card $$"],
            (b'e', b'1') => &["E'x'"],
            (b'e', _) => &["E'card'"],
            _ => &[],
        }
    }

    fn variants(sql: &str) -> Vec<String> {
        let Some(n) = normalize::normalize(sql) else { return Vec::new() };
        let kinds: Vec<(u8, u8)> = n.key.as_bytes().windows(3).filter(|w| w[0] == 0).map(|w| (w[1], w[2])).collect();
        (0..8usize)
            .map(|v| {
                let mut s = String::new();
                let mut at = 0;
                for (j, (r, (k, c))) in n.literals.iter().zip(&kinds).enumerate() {
                    s.push_str(&sql[at..r.start]);
                    let b = battery(*k, *c);
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
            // an opaque FROM item holding literals: its alias is read from its printed text
            ("select * from unnest(array['a AS card']) ", Some(false)),
            ("select u.x from unnest(array[1, 2]) as u(x)", Some(false)),
            // does not parse
            ("selec nonsense (1", Some(false)),
            ("select card from customers", None),
        ];
        let mut failures = Vec::new();
        for (sql, want) in corpus {
            let Some(n) = normalize::normalize(sql) else {
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
                assert_eq!(normalize::normalize(&v).map(|x| x.key), Some(n.key.clone()), "{v}");
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
}
