//! Strict masking: a statement runs in a masked session only when pgward can tell, on
//! Postgres's own parse tree, where every masked column's values go.
//!
//! A masked column (a column a `[[mask]]` rule covers, through views, aliases, derived tables
//! and CTEs as [`super::lineage`] follows them) may appear:
//! * as an output column, bare or inside a small set of value-preserving built-in functions
//!   and operators (casts, `||`, `coalesce`, `upper`, `min`, `string_agg`, …): lineage then
//!   masks the output;
//! * in an equality (`=`, `<>`, `IS [NOT] DISTINCT FROM`, `IN (…)`) between the bare column and
//!   a literal or parameter — at most [`MAX_GUESSES`] of those per query string — or in
//!   `IS [NOT] NULL`;
//! * as the argument of `count`, and anywhere in an `EXISTS` subquery's select list: positions
//!   that return no value.
//!
//! Anything else that touches one is a [`Violation`]: an argument to any other function
//! (which covers `set_config`, `pg_notify`, advisory locks, set-returning functions), any other
//! comparison (ranges, `LIKE`, `~`), `ORDER BY`, grouping (`GROUP BY`, `DISTINCT`, `PARTITION
//! BY`: sorted plans return rows in the column's order; `min`/`max` likewise rank values),
//! `LIMIT`, `RETURNING`, values written to a
//! table (`INSERT … SELECT`, `UPDATE … SET`, `CREATE TABLE AS`, `SELECT INTO`), views,
//! `COPY (query)` and `COPY table TO` a file or program, set operations that compare values
//! (`UNION`, `INTERSECT`, `EXCEPT`) or mix masked and unmasked values in one column, `DO` blocks
//! and function bodies that name a masked column or table or build SQL at run time, functions
//! that run SQL given as text (the catalog's `@dynamic_sql` class, and functions pgward's
//! catalog does not know), and catalog statistics (`pg_stats`, `pg_statistic`, …), whose
//! histograms hold column values. Statements of other kinds that name a rule table (DDL with
//! expressions, renames) are refused too.
//!
//! A pure function of the parse tree and a [`Resolver`]; the relay refuses the whole query
//! string when any of its statements is refused.

use serde_json::Value;

use super::lineage::{Cx, Env, Item, Out, RelKind, Resolver, Taint};
use crate::policy::functions::DYNAMIC_SQL;
use crate::policy::lexical::{Lex, lex};
use crate::policy::pgtree::{Obj, list, names, str_field, sval, typed, wrapped};

/// Why a statement was refused, and which rules' columns were involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Mask rules (bits) whose columns the refused use touches; all active rules when the
    /// refusal is not about one column (unknown functions, statistics).
    pub rules: u64,
    pub reason: String,
}

/// Where a value goes: what its position lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Returned to the client as an output column: lineage masks it.
    Output,
    /// Not returned at all (`EXISTS (SELECT …)`'s list, `count`'s argument).
    Discard,
    /// A condition: only equality with literals and null tests may use a masked column.
    Predicate,
    /// An operand of equality or a null test: the bare column itself.
    Operand,
    /// Nothing masked may reach here.
    Deny(Why),
}

/// The positions where no masked value may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Argument,
    Comparison,
    Order,
    Grouping,
    Limit,
    Returning,
    Written,
    View,
    CopyQuery,
    SetOperation,
    Subscript,
    Cast,
    Join,
    Expression,
}

impl Why {
    fn text(self) -> &'static str {
        match self {
            Why::Argument => "is passed to a function that is not a value-preserving built-in",
            Why::Comparison => "is compared other than by equality with a literal or parameter",
            Why::Order => "orders rows (ORDER BY)",
            Why::Grouping => "groups rows (GROUP BY, DISTINCT, PARTITION BY), which sorts them by its values",
            Why::Limit => "is used in LIMIT/OFFSET",
            Why::Returning => "is returned by RETURNING",
            Why::Written => "is written to a table",
            Why::View => "is read by a view being defined",
            Why::CopyQuery => "is read by COPY (query)",
            Why::SetOperation => "is compared by a set operation (UNION, INTERSECT, EXCEPT) or mixed with unmasked values in one column",
            Why::Subscript => "is subscripted",
            Why::Cast => "is cast to a type other than text (a failing cast would echo the value in its error)",
            Why::Join => "is compared by a join's USING or NATURAL condition",
            Why::Expression => "is used in an expression pgward cannot follow",
        }
    }
}

/// Built-in functions whose result is the argument's value, or a piece of it, and that have
/// no side effects: allowed on masked columns in output columns (lineage masks the result).
pub(super) const VALUE_FUNCTIONS: &[&str] = &[
    "upper", "lower", "initcap", "btrim", "ltrim", "rtrim", "concat", "concat_ws", "coalesce", "nullif", "text", "string_agg",
    "array_agg", "substr", "substring", "left", "right",
];

/// Catalog relations whose rows hold column values (histograms, most common values).
const STATISTICS: &[&str] = &["pg_stats", "pg_statistic", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic_ext_data", "pg_statistic_ext"];

/// Statement kinds that name tables but evaluate no expression over their rows.
const HARMLESS: &[&str] = &[
    "CreateStmt",
    "LockStmt",
    "TruncateStmt",
    "VacuumStmt",
    "GrantStmt",
    "DropStmt",
    "ReindexStmt",
    "CommentStmt",
    "TransactionStmt",
    "VariableSetStmt",
    "VariableShowStmt",
    "NotifyStmt",
    "ListenStmt",
    "UnlistenStmt",
    "DiscardStmt",
    "DeallocateStmt",
    "ClosePortalStmt",
    "FetchStmt",
    "ExecuteStmt",
    "CheckPointStmt",
];

/// How deep string bodies inside string bodies are scanned.
const MAX_BODY_DEPTH: usize = 4;

/// How many literals or parameters one query string may compare masked columns with (in
/// equalities, `IN` lists and simple `CASE` arms, all statements of the string together).
/// Each one is a guess at a value, and one statement can combine its answers: scalar
/// subqueries that count the rows matching different halves of a candidate list name the
/// matching candidate among 2^k in k columns. The bound keeps a dictionary attack at a
/// handful of guesses per statement, each statement in the audit log.
pub const MAX_GUESSES: usize = 16;

type Check = Result<(), Violation>;

/// Check every statement of a parse tree's raw statements: the first violation, and whether
/// the verdict depended on a constant's value (`ORDER BY 2`).
pub(super) fn check(stmts: &[Value], r: &dyn Resolver, all_rules: u64) -> (Check, bool) {
    let cx = Cx::new(r);
    let s = Strict { cx: &cx, r, all: all_rules, guesses: std::cell::Cell::new(0) };
    let verdict = stmts.iter().filter_map(|raw| raw.get("stmt")).try_for_each(|stmt| {
        s.everywhere(stmt)?;
        s.statement(stmt)
    });
    (verdict, cx.read.get())
}

struct Strict<'a> {
    cx: &'a Cx<'a>,
    r: &'a dyn Resolver,
    all: u64,
    /// Literals and parameters compared with masked columns so far ([`MAX_GUESSES`]).
    guesses: std::cell::Cell<usize>,
}

fn empty_env() -> Env<'static> {
    Env { rels: &[], parent: None }
}

impl Strict<'_> {
    fn refuse(&self, rules: u64, reason: String) -> Check {
        Err(Violation { rules: if rules == 0 { self.all } else { rules }, reason })
    }

    fn deny(&self, t: Taint, why: Why) -> Check {
        self.refuse(t.rules, format!("a masked column {}", why.text()))
    }

    /// `n` more literals or parameters compared with a masked column of taint `t`.
    fn guess(&self, t: Taint, n: usize) -> Check {
        let total = self.guesses.get().saturating_add(n);
        self.guesses.set(total);
        if total > MAX_GUESSES {
            return self.refuse(
                t.rules,
                format!("masked columns are compared with more than {MAX_GUESSES} literals or parameters in one query string (each is a guess at a value)"),
            );
        }
        Ok(())
    }

    /// Checks that hold at every position of a statement: statistics catalogs and functions
    /// that run SQL from text.
    fn everywhere(&self, v: &Value) -> Check {
        match v {
            Value::Array(a) => a.iter().try_for_each(|x| self.everywhere(x)),
            Value::Object(m) => {
                if let Some(rv) = range_var(m) {
                    let schema = str_field(rv, "schemaname");
                    let rel = str_field(rv, "relname").unwrap_or("");
                    if schema.is_none_or(|s| s == "pg_catalog") && STATISTICS.contains(&rel) {
                        return self.refuse(0, format!("catalog statistics ({rel}) hold values of masked columns"));
                    }
                }
                if let Some(fc) = m.get("FuncCall").and_then(Value::as_object) {
                    let n = names(list(fc, "funcname"));
                    if let Some(name) = n.last() {
                        let schema = (n.len() > 1).then(|| n[n.len() - 2].as_str());
                        if self.r.function_classes(schema, name) & DYNAMIC_SQL != 0 {
                            return self.refuse(0, format!("{} runs SQL given as text, which pgward cannot follow (or is a function pgward's catalog does not know yet)", n.join(".")));
                        }
                    }
                }
                m.values().try_for_each(|x| self.everywhere(x))
            }
            _ => Ok(()),
        }
    }

    /// One raw statement.
    fn statement(&self, s: &Value) -> Check {
        let Some((ty, b)) = wrapped(s) else { return Ok(()) };
        if let Some(name) = shadow::shadowing_name(ty, b) {
            return self.refuse(
                0,
                format!("a function or type named {name:?} would stand in for the built-in strict masking trusts (under a search_path that puts pg_catalog after it)"),
            );
        }
        match ty {
            "SelectStmt" => self.select(b, None, Ctx::Output),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => self.modify(ty, b, None),
            "CopyStmt" => self.copy(b),
            "DeclareCursorStmt" => self.query_opt(b.get("query"), None, Ctx::Output),
            "PrepareStmt" | "ExplainStmt" => match b.get("query") {
                Some(q) => self.statement(q),
                None => Ok(()),
            },
            "CreateTableAsStmt" => match b.get("query").and_then(wrapped) {
                // What the prepared statement returns — masked columns too — would be written
                // to the table, where no output mask follows it.
                Some(("ExecuteStmt", _)) => {
                    self.refuse(0, "CREATE TABLE … AS EXECUTE writes what a prepared statement returns to a table".into())
                }
                _ => self.query_opt(b.get("query"), None, Ctx::Deny(Why::Written)),
            },
            "ViewStmt" => self.query_opt(b.get("query"), None, Ctx::Deny(Why::View)),
            "CallStmt" => match b.get("funccall") {
                Some(f) => self.expr(f, Ctx::Deny(Why::Argument), &empty_env()),
                None => Ok(()),
            },
            "DoStmt" | "CreateFunctionStmt" => self.bodies(ty, b),
            // New operators, aggregates and casts can change what the allowed comparisons
            // and value functions run.
            "DefineStmt" | "CreateCastStmt" | "CreateConversionStmt" => {
                self.refuse(0, "defining operators, aggregates or casts can change what comparisons of masked columns run".into())
            }
            _ if HARMLESS.contains(&ty) => Ok(()),
            _ => match self.names_rule_table(s) {
                0 => Ok(()),
                bits => self.refuse(bits, format!("{} on a table with masked columns", command_name(ty))),
            },
        }
    }

    /// Rules of the rule tables a statement names anywhere (RangeVars).
    fn names_rule_table(&self, v: &Value) -> u64 {
        match v {
            Value::Array(a) => a.iter().fold(0, |b, x| b | self.names_rule_table(x)),
            Value::Object(m) => {
                let mut bits = 0;
                if let Some(rv) = range_var(m) {
                    bits |= self.r.rules_for(str_field(rv, "schemaname"), str_field(rv, "relname").unwrap_or(""), None);
                }
                m.values().fold(bits, |b, x| b | self.names_rule_table(x))
            }
            _ => 0,
        }
    }

    fn query_opt(&self, q: Option<&Value>, env: Option<&Env<'_>>, ctx: Ctx) -> Check {
        match q {
            Some(q) => self.query(q, env, ctx),
            None => Ok(()),
        }
    }

    /// A query in a query position whose output columns go to `ctx`.
    fn query(&self, q: &Value, env: Option<&Env<'_>>, ctx: Ctx) -> Check {
        match wrapped(q) {
            Some(("SelectStmt", b)) => self.select(b, env, ctx),
            Some((ty @ ("InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"), b)) => self.modify(ty, b, env),
            _ => self.expr(q, ctx, env.unwrap_or(&empty_env())),
        }
    }

    /// The queries of a WITH clause, with every CTE in scope.
    fn with_clause(&self, b: &Obj, ctes: &Env<'_>) -> Check {
        let Some(w) = b.get("withClause").and_then(|w| typed(w, "WithClause")) else { return Ok(()) };
        for c in list(w, "ctes") {
            if let Some(cte) = typed(c, "CommonTableExpr") {
                self.query_opt(cte.get("ctequery"), Some(ctes), Ctx::Output)?;
            }
        }
        Ok(())
    }

    fn select(&self, b: &Obj, env: Option<&Env<'_>>, ctx: Ctx) -> Check {
        let ctes = self.cx.ctes(b, env);
        let cenv = Env { rels: &ctes, parent: env };
        self.with_clause(b, &cenv)?;
        let ctx = if b.get("intoClause").is_some_and(|i| !i.is_null()) { Ctx::Deny(Why::Written) } else { ctx };
        if let Some(op) = str_field(b, "op").filter(|op| *op != "SETOP_NONE") {
            for side in ["larg", "rarg"] {
                if let Some(s) = b.get(side).and_then(|v| typed(v, "SelectStmt")) {
                    self.select(s, Some(&cenv), ctx)?;
                }
            }
            self.set_operation(b, op, &cenv)?;
            return self.tail(b, &cenv);
        }
        for row in list(b, "valuesLists") {
            self.expr(row, ctx, &cenv)?;
        }
        let rels = self.cx.from_list(list(b, "fromClause"), Some(&cenv));
        let here = Env { rels: &rels, parent: Some(&cenv) };
        self.from_items(list(b, "fromClause"), &here)?;
        self.expr_opt(b.get("whereClause"), Ctx::Predicate, &here)?;
        self.expr_opt(b.get("havingClause"), Ctx::Predicate, &here)?;
        for g in list(b, "groupClause").iter().chain(list(b, "distinctClause")) {
            self.expr(g, Ctx::Deny(Why::Grouping), &here)?;
        }
        for w in list(b, "windowClause") {
            self.expr(w, Ctx::Deny(Why::Grouping), &here)?;
        }
        for t in list(b, "targetList") {
            self.expr(t, ctx, &here)?;
        }
        if !list(b, "distinctClause").is_empty() {
            // SELECT DISTINCT: every output column is a key.
            if let Some(t) = self.first_taint(list(b, "targetList"), &here) {
                return self.deny(t, Why::Grouping);
            }
        }
        self.tail(b, &here)
    }

    /// ORDER BY, LIMIT and OFFSET of a SELECT. An ORDER BY item that is a position
    /// (`ORDER BY 1`) or an output column's name orders by that output column.
    fn tail(&self, b: &Obj, env: &Env<'_>) -> Check {
        let sorts = list(b, "sortClause");
        if !sorts.is_empty() {
            let outputs = self.cx.select(b, env.parent);
            for s in sorts {
                let Some(node) = typed(s, "SortBy").and_then(|s| s.get("node")) else { continue };
                if node.get("A_Const").is_some() {
                    // Which column `ORDER BY n` names is the constant's value.
                    self.cx.read.set(true);
                }
                if let Some((_, Item::Col(t))) = output_named(&outputs, node)
                    && !t.is_none()
                {
                    return self.deny(*t, Why::Order);
                }
            }
        }
        for s in sorts {
            self.expr(s, Ctx::Deny(Why::Order), env)?;
        }
        self.expr_opt(b.get("limitCount"), Ctx::Deny(Why::Limit), env)?;
        self.expr_opt(b.get("limitOffset"), Ctx::Deny(Why::Limit), env)
    }

    /// UNION/INTERSECT/EXCEPT: only `UNION ALL` of columns masked on both sides (or on
    /// neither) keeps values apart.
    fn set_operation(&self, b: &Obj, op: &str, env: &Env<'_>) -> Check {
        let side = |k: &str| b.get(k).and_then(|v| typed(v, "SelectStmt")).map(|s| self.cx.select(s, Some(env))).unwrap_or_default();
        let (l, r) = (side("larg"), side("rarg"));
        let all = b.get("all").and_then(Value::as_bool) == Some(true);
        let (lt, rt) = (out_taints(&l), out_taints(&r));
        let any = lt.iter().chain(&rt).fold(0, |a, t| a | t.rules);
        if any == 0 {
            return Ok(());
        }
        let mixed = lt.len() != rt.len() || lt.iter().zip(&rt).any(|(a, b)| a.is_none() != b.is_none());
        if op != "SETOP_UNION" || !all || mixed {
            return self.deny(Taint { rules: any, direct: false }, Why::SetOperation);
        }
        Ok(())
    }

    /// FROM items: subqueries, join conditions, function arguments.
    fn from_items(&self, items: &[Value], env: &Env<'_>) -> Check {
        items.iter().try_for_each(|f| self.from_item(f, env))
    }

    fn from_item(&self, v: &Value, env: &Env<'_>) -> Check {
        let Some((ty, b)) = wrapped(v) else { return self.expr(v, Ctx::Deny(Why::Expression), env) };
        match ty {
            "RangeVar" => Ok(()),
            "RangeSubselect" => self.query_opt(b.get("subquery"), Some(env), Ctx::Output),
            "JoinExpr" => {
                for k in ["larg", "rarg"] {
                    if let Some(s) = b.get(k) {
                        self.from_item(s, env)?;
                    }
                }
                self.join_columns(b, env)?;
                self.expr_opt(b.get("quals"), Ctx::Predicate, env)
            }
            "RangeTableSample" => {
                if let Some(r) = b.get("relation") {
                    self.from_item(r, env)?;
                }
                self.expr(&Value::Array(list(b, "args").to_vec()), Ctx::Deny(Why::Argument), env)
            }
            // Functions in FROM (set-returning functions), XMLTABLE, …: their arguments.
            _ => self.expr(v, Ctx::Deny(Why::Argument), env),
        }
    }

    /// `USING (c)` compares the sides' columns `c`; `NATURAL` compares every column the
    /// sides share: refused when a compared column may be masked.
    fn join_columns(&self, b: &Obj, env: &Env<'_>) -> Check {
        let natural = b.get("isNatural").and_then(Value::as_bool) == Some(true);
        let using = names(list(b, "usingClause"));
        if !natural && using.is_empty() {
            return Ok(());
        }
        let mut rels = Vec::new();
        for k in ["larg", "rarg"] {
            if let Some(s) = b.get(k) {
                self.cx.from_item(s, env.parent, &mut rels);
            }
        }
        let mut t = Taint::NONE;
        for r in &rels {
            if natural {
                t.rules |= r.whole().rules;
            }
            for c in &using {
                t.rules |= r.col_with(c, self.r, false).rules;
            }
        }
        if t.is_none() { Ok(()) } else { self.deny(t, Why::Join) }
    }

    /// INSERT/UPDATE/DELETE/MERGE.
    fn modify(&self, ty: &str, b: &Obj, env: Option<&Env<'_>>) -> Check {
        let ctes = self.cx.ctes(b, env);
        let cenv = Env { rels: &ctes, parent: env };
        self.with_clause(b, &cenv)?;
        let mut rels = Vec::new();
        if let Some(rv) = b.get("relation").and_then(|v| typed(v, "RangeVar")) {
            let target = self.cx.base_rel(rv, true);
            // ON CONFLICT … DO UPDATE reads the proposed row as `excluded`.
            let mut excluded = target.clone();
            excluded.name = "excluded".into();
            rels.push(target);
            rels.push(excluded);
        }
        let more: &[Value] = match ty {
            "UpdateStmt" => list(b, "fromClause"),
            "DeleteStmt" => list(b, "usingClause"),
            "MergeStmt" => b.get("sourceRelation").map(std::slice::from_ref).unwrap_or(&[]),
            _ => &[],
        };
        for f in more {
            self.cx.from_item(f, Some(&cenv), &mut rels);
        }
        let here = Env { rels: &rels, parent: Some(&cenv) };
        self.from_items(more, &here)?;
        self.expr_opt(b.get("whereClause"), Ctx::Predicate, &here)?;
        self.expr_opt(b.get("joinCondition"), Ctx::Predicate, &here)?;
        if let Some(sel) = b.get("selectStmt") {
            // The rows an INSERT writes see the WITH clause, not the target table.
            self.query(sel, Some(&cenv), Ctx::Deny(Why::Written))?;
        }
        for t in list(b, "targetList") {
            self.expr(t, Ctx::Deny(Why::Written), &here)?;
        }
        if let Some(oc) = b.get("onConflictClause").and_then(|o| typed(o, "OnConflictClause")) {
            self.expr_opt(oc.get("whereClause"), Ctx::Predicate, &here)?;
            for t in list(oc, "targetList") {
                self.expr(t, Ctx::Deny(Why::Written), &here)?;
            }
        }
        for w in list(b, "mergeWhenClauses") {
            let Some(w) = typed(w, "MergeWhenClause") else { return self.expr(w, Ctx::Deny(Why::Written), &here) };
            self.expr_opt(w.get("condition"), Ctx::Predicate, &here)?;
            for t in list(w, "targetList").iter().chain(list(w, "values")) {
                self.expr(t, Ctx::Deny(Why::Written), &here)?;
            }
        }
        for t in list(b, "returningList") {
            self.expr(t, Ctx::Deny(Why::Returning), &here)?;
        }
        Ok(())
    }

    /// COPY: a table to the client is masked on the way out; a query, or a table to a server
    /// file or program, is not.
    fn copy(&self, b: &Obj) -> Check {
        if let Some(q) = b.get("query") {
            return self.query(q, None, Ctx::Deny(Why::CopyQuery));
        }
        let Some(rv) = b.get("relation").and_then(|v| typed(v, "RangeVar")) else { return Ok(()) };
        let rel = self.cx.base_rel(rv, false);
        let rels = [rel];
        let env = Env { rels: &rels, parent: None };
        self.expr_opt(b.get("whereClause"), Ctx::Predicate, &env)?;
        let from = b.get("is_from").and_then(Value::as_bool) == Some(true);
        let to_client = b.get("filename").is_none_or(Value::is_null) && b.get("is_program").and_then(Value::as_bool) != Some(true);
        let bits = rels[0].whole().rules;
        if !from && !to_client && bits != 0 {
            return self.refuse(bits, "COPY of a table with masked columns to a server file or program".into());
        }
        Ok(())
    }

    /// DO blocks and function bodies: refused when they name a masked column, a rule table or
    /// a masked view, call a function that runs SQL from text, or run `EXECUTE`.
    fn bodies(&self, ty: &str, b: &Obj) -> Check {
        if let Some(sql_body) = b.get("sql_body").filter(|v| !v.is_null()) {
            let bits = self.names_rule_table(sql_body) | self.names_masked_column(sql_body);
            if bits != 0 {
                return self.refuse(bits, "a function body reads a table with masked columns".into());
            }
        }
        let key = if ty == "DoStmt" { "args" } else { "options" };
        for opt in list(b, key) {
            let Some(d) = opt.get("DefElem").and_then(Value::as_object) else { continue };
            if str_field(d, "defname") != Some("as") {
                continue;
            }
            let texts: Vec<String> = match d.get("arg") {
                Some(a) if a.get("String").is_some() => sval(a).map(str::to_string).into_iter().collect(),
                Some(a) => a.get("List").and_then(Value::as_object).map(|l| names(list(l, "items"))).unwrap_or_default(),
                None => Vec::new(),
            };
            for t in &texts {
                self.body_text(t, 0)?;
            }
        }
        Ok(())
    }

    fn body_text(&self, text: &str, depth: usize) -> Check {
        if depth > MAX_BODY_DEPTH {
            return self.refuse(0, "a body nests SQL text too deeply to be checked".into());
        }
        for item in lex(text) {
            match item {
                Lex::Word(w) => {
                    if w == "execute" {
                        return self.refuse(0, "a DO block or function body runs EXECUTE, which pgward cannot follow".into());
                    }
                    let bits = self.r.ident_rules(&w);
                    if bits != 0 {
                        return self.refuse(bits, format!("a DO block or function body names {w:?}, a masked column or a table with masked columns"));
                    }
                    if self.r.function_classes(None, &w) & DYNAMIC_SQL != 0 && self.r.is_function(&w) {
                        return self.refuse(0, format!("a DO block or function body calls {w}, which runs SQL given as text"));
                    }
                }
                Lex::Str(s) => self.body_text(&s, depth + 1)?,
                Lex::Punct(_) => {}
            }
        }
        Ok(())
    }

    /// Rules of masked column names anywhere under `v` (ColumnRef fields).
    fn names_masked_column(&self, v: &Value) -> u64 {
        match v {
            Value::Array(a) => a.iter().fold(0, |b, x| b | self.names_masked_column(x)),
            Value::Object(m) => {
                let mut bits = 0;
                if let Some(cr) = m.get("ColumnRef").and_then(Value::as_object) {
                    for f in list(cr, "fields") {
                        bits |= sval(f).map_or(0, |n| self.r.ident_rules(n));
                    }
                }
                m.values().fold(bits, |b, x| b | self.names_masked_column(x))
            }
            _ => 0,
        }
    }

    fn expr_opt(&self, v: Option<&Value>, ctx: Ctx, env: &Env<'_>) -> Check {
        match v {
            Some(v) => self.expr(v, ctx, env),
            None => Ok(()),
        }
    }

    fn exprs(&self, vs: &[Value], ctx: Ctx, env: &Env<'_>) -> Check {
        vs.iter().try_for_each(|v| self.expr(v, ctx, env))
    }

    /// An expression whose value goes to `ctx`.
    fn expr(&self, v: &Value, ctx: Ctx, env: &Env<'_>) -> Check {
        let b = match v {
            Value::Array(a) => return self.exprs(a, ctx, env),
            Value::Object(m) => match wrapped(v) {
                Some((ty, b)) => (ty, b),
                None => return m.values().try_for_each(|x| self.expr(x, ctx, env)),
            },
            _ => return Ok(()),
        };
        let (ty, b) = b;
        match ty {
            "ColumnRef" => self.column(v, ctx, env),
            "A_Const" | "ParamRef" | "SetToDefault" | "SQLValueFunction" => Ok(()),
            "ResTarget" => {
                self.exprs(list(b, "indirection"), Ctx::Deny(Why::Subscript), env)?;
                self.expr_opt(b.get("val"), ctx, env)
            }
            "TypeCast" if !text_cast(b) => {
                let inner = if let Ctx::Deny(w) = ctx { Ctx::Deny(w) } else { Ctx::Deny(Why::Cast) };
                self.expr_opt(b.get("arg"), inner, env)
            }
            "TypeCast" | "CollateClause" => {
                let inner = match ctx {
                    Ctx::Output | Ctx::Discard => ctx,
                    Ctx::Predicate | Ctx::Operand => Ctx::Deny(Why::Comparison),
                    Ctx::Deny(w) => Ctx::Deny(w),
                };
                self.expr_opt(b.get("arg"), inner, env)
            }
            "FuncCall" => self.func_call(b, ctx, env),
            "A_Expr" => self.a_expr(b, ctx, env),
            "BoolExpr" | "BooleanTest" => {
                let inner = if let Ctx::Deny(w) = ctx { Ctx::Deny(w) } else { Ctx::Predicate };
                self.exprs(list(b, "args"), inner, env)?;
                self.expr_opt(b.get("arg"), inner, env)
            }
            "NullTest" => {
                let inner = if let Ctx::Deny(w) = ctx { Ctx::Deny(w) } else { Ctx::Operand };
                self.expr_opt(b.get("arg"), inner, env)
            }
            "SubLink" => self.sublink(b, ctx, env),
            "CaseExpr" => self.case(b, ctx, env),
            "CoalesceExpr" | "A_ArrayExpr" | "RowExpr" => {
                let inner = match ctx {
                    Ctx::Output | Ctx::Discard => ctx,
                    Ctx::Deny(w) => Ctx::Deny(w),
                    _ => Ctx::Deny(Why::Comparison),
                };
                self.exprs(list(b, "args"), inner, env)?;
                self.exprs(list(b, "elements"), inner, env)
            }
            "A_Indirection" => {
                let fields_only = list(b, "indirection").iter().all(|i| i.get("String").is_some());
                let inner = if fields_only { ctx } else { Ctx::Deny(Why::Subscript) };
                self.expr_opt(b.get("arg"), inner, env)?;
                self.exprs(list(b, "indirection"), Ctx::Deny(Why::Subscript), env)
            }
            "GroupingFunc" => self.exprs(list(b, "args"), Ctx::Discard, env),
            "SortBy" => self.expr_opt(b.get("node"), Ctx::Deny(Why::Order), env),
            "WindowDef" => {
                self.exprs(list(b, "partitionClause"), Ctx::Deny(Why::Grouping), env)?;
                self.exprs(list(b, "orderClause"), Ctx::Deny(Why::Order), env)?;
                self.expr_opt(b.get("startOffset"), Ctx::Deny(Why::Limit), env)?;
                self.expr_opt(b.get("endOffset"), Ctx::Deny(Why::Limit), env)
            }
            "GroupingSet" => self.exprs(list(b, "content"), ctx, env),
            "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => self.query(v, Some(env), ctx),
            "MultiAssignRef" => self.expr_opt(b.get("source"), ctx, env),
            _ => {
                let inner = if let Ctx::Deny(w) = ctx { Ctx::Deny(w) } else { Ctx::Deny(Why::Expression) };
                b.values().try_for_each(|x| self.expr(x, inner, env))
            }
        }
    }

    fn column(&self, v: &Value, ctx: Ctx, env: &Env<'_>) -> Check {
        let t = self.cx.walk_taint(v, env);
        if t.is_none() {
            return Ok(());
        }
        match ctx {
            Ctx::Output | Ctx::Discard => Ok(()),
            Ctx::Predicate | Ctx::Operand if t.direct => Ok(()),
            Ctx::Predicate | Ctx::Operand => self.deny(t, Why::Comparison),
            Ctx::Deny(w) => self.deny(t, w),
        }
    }

    fn func_call(&self, b: &Obj, ctx: Ctx, env: &Env<'_>) -> Check {
        let n = names(list(b, "funcname"));
        let name = n.last().map(String::as_str).unwrap_or("");
        let builtin = (n.len() == 1 || n[0] == "pg_catalog") && self.r.builtin_function(name);
        self.expr_opt(b.get("agg_filter"), Ctx::Predicate, env)?;
        self.exprs(list(b, "agg_order"), Ctx::Deny(Why::Order), env)?;
        self.expr_opt(b.get("over"), Ctx::Deny(Why::Grouping), env)?;
        let windowed = b.get("over").is_some_and(|o| !o.is_null());
        let args = list(b, "args");
        let inner = if builtin && name == "count" {
            Ctx::Discard
        } else if builtin && !windowed && ctx == Ctx::Output && VALUE_FUNCTIONS.contains(&name) {
            Ctx::Output
        } else if let Ctx::Deny(w) = ctx {
            Ctx::Deny(w)
        } else {
            Ctx::Deny(Why::Argument)
        };
        match (inner, self.first_taint(args, env)) {
            (Ctx::Deny(Why::Argument), Some(t)) => {
                self.refuse(t.rules, format!("a masked column is passed to {}, which is not a value-preserving built-in", n.join(".")))
            }
            (Ctx::Output, Some(t)) if !value_preserving_form(name, args) => self.refuse(
                t.rules,
                format!("a masked column is passed to {} with a character set, pattern or position other than an integer literal, which compares its characters", n.join(".")),
            ),
            _ => self.exprs(args, inner, env),
        }
    }

    /// The taint of the first tainted value among `vs`, for messages.
    fn first_taint(&self, vs: &[Value], env: &Env<'_>) -> Option<Taint> {
        vs.iter().map(|v| self.cx.walk_taint(v, env)).find(|t| !t.is_none())
    }

    fn a_expr(&self, b: &Obj, ctx: Ctx, env: &Env<'_>) -> Check {
        let kind = str_field(b, "kind").unwrap_or("");
        let op = names(list(b, "name")).pop().unwrap_or_default();
        let (l, r) = (b.get("lexpr"), b.get("rexpr"));
        if let Ctx::Deny(w) = ctx {
            self.expr_opt(l, Ctx::Deny(w), env)?;
            return self.expr_opt(r, Ctx::Deny(w), env);
        }
        let equality = matches!(kind, "AEXPR_DISTINCT" | "AEXPR_NOT_DISTINCT")
            || (kind == "AEXPR_OP" && matches!(op.as_str(), "=" | "<>" | "!="));
        if equality {
            return self.equality(l, r, env);
        }
        if kind == "AEXPR_IN" {
            let items = r.and_then(|r| typed(r, "List")).map(|l| list(l, "items")).or_else(|| r.and_then(Value::as_array).map(Vec::as_slice));
            let literals = items.is_some_and(|items| items.iter().all(is_literal));
            self.expr_opt(l, if literals { Ctx::Operand } else { Ctx::Deny(Why::Comparison) }, env)?;
            let t = l.map_or(Taint::NONE, |l| self.cx.walk_taint(l, env));
            if !t.is_none() {
                self.guess(t, items.map_or(0, <[Value]>::len))?;
            }
            return self.expr_opt(r, Ctx::Deny(Why::Comparison), env);
        }
        if kind == "AEXPR_NULLIF" {
            // NULLIF(a, b) is NULL exactly when a = b: an equality, whatever it returns.
            return self.equality(l, r, env);
        }
        let preserving = ctx == Ctx::Output && kind == "AEXPR_OP" && op == "||";
        let inner = if preserving { Ctx::Output } else { Ctx::Deny(Why::Comparison) };
        self.expr_opt(l, inner, env)?;
        self.expr_opt(r, inner, env)
    }

    /// `a = b`: a bare masked column against a literal or parameter.
    fn equality(&self, l: Option<&Value>, r: Option<&Value>, env: &Env<'_>) -> Check {
        let (Some(l), Some(r)) = (l, r) else {
            self.expr_opt(l, Ctx::Deny(Why::Comparison), env)?;
            return self.expr_opt(r, Ctx::Deny(Why::Comparison), env);
        };
        let (lt, rt) = (self.cx.walk_taint(l, env), self.cx.walk_taint(r, env));
        let ok_pair = |col: &Value, other: &Value| col.get("ColumnRef").is_some() && is_literal(other);
        if (!lt.is_none() && ok_pair(l, r)) || (!rt.is_none() && ok_pair(r, l)) || (lt.is_none() && rt.is_none()) {
            if !lt.is_none() || !rt.is_none() {
                self.guess(if lt.is_none() { rt } else { lt }, 1)?;
            }
            self.expr(l, Ctx::Operand, env)?;
            return self.expr(r, Ctx::Operand, env);
        }
        self.expr(l, Ctx::Deny(Why::Comparison), env)?;
        self.expr(r, Ctx::Deny(Why::Comparison), env)
    }

    fn sublink(&self, b: &Obj, ctx: Ctx, env: &Env<'_>) -> Check {
        let sub = b.get("subselect");
        match str_field(b, "subLinkType").unwrap_or("") {
            "EXISTS_SUBLINK" => self.query_opt(sub, Some(env), Ctx::Discard),
            "EXPR_SUBLINK" | "ARRAY_SUBLINK" => self.query_opt(sub, Some(env), ctx),
            _ => {
                // x IN (SELECT …), x op ANY/ALL (…), row comparisons: values compared.
                let inner = if let Ctx::Deny(w) = ctx { Ctx::Deny(w) } else { Ctx::Deny(Why::Comparison) };
                self.expr_opt(b.get("testexpr"), inner, env)?;
                self.query_opt(sub, Some(env), inner)
            }
        }
    }

    fn case(&self, b: &Obj, ctx: Ctx, env: &Env<'_>) -> Check {
        let deny = if let Ctx::Deny(w) = ctx { Some(Ctx::Deny(w)) } else { None };
        let simple = b.get("arg").is_some_and(|a| !a.is_null());
        let whens = list(b, "args");
        // CASE x WHEN 'a' …: equality of x with each WHEN value.
        let literals = whens.iter().all(|w| typed(w, "CaseWhen").and_then(|w| w.get("expr")).is_some_and(is_literal));
        let arg_ctx = deny.unwrap_or(if literals { Ctx::Operand } else { Ctx::Deny(Why::Comparison) });
        self.expr_opt(b.get("arg"), arg_ctx, env)?;
        let t = b.get("arg").map_or(Taint::NONE, |a| self.cx.walk_taint(a, env));
        if simple && !t.is_none() {
            self.guess(t, whens.len())?;
        }
        let result_ctx = match ctx {
            Ctx::Output | Ctx::Discard => ctx,
            Ctx::Deny(w) => Ctx::Deny(w),
            _ => Ctx::Deny(Why::Comparison),
        };
        for w in whens {
            let Some(w) = typed(w, "CaseWhen") else { continue };
            let cond_ctx = deny.unwrap_or(if simple { Ctx::Deny(Why::Comparison) } else { Ctx::Predicate });
            self.expr_opt(w.get("expr"), cond_ctx, env)?;
            self.expr_opt(w.get("result"), result_ctx, env)?;
        }
        self.expr_opt(b.get("defresult"), result_ctx, env)
    }
}

/// Value-preserving functions whose arguments after the first are positions and lengths
/// (`substr(card, 1, 6)`): with a text there (`substring(card, '^42')`, the regular-expression
/// forms) the result's NULL or length tells whether the value matched.
const POSITION_FUNCTIONS: &[&str] = &["substr", "substring", "left", "right"];

/// Trims: with a second argument, a set of characters to strip, so the masked result's
/// length tells which characters the value has at its ends (`ltrim(substr(card, 2, 1), '5')`
/// is empty exactly when the second digit is 5).
const TRIM_FUNCTIONS: &[&str] = &["btrim", "ltrim", "rtrim"];

/// Integer types a position argument may be cast to.
pub(super) const INTEGER_TYPES: &[&str] = &["int2", "int4", "int8", "smallint", "integer", "int", "bigint"];

/// A call of value function `name` with `args` whose result compares nothing: trims without
/// a character set, positions and lengths that are integer literals (or parameters and
/// literals cast to an integer type).
fn value_preserving_form(name: &str, args: &[Value]) -> bool {
    if TRIM_FUNCTIONS.contains(&name) {
        return args.len() <= 1;
    }
    if POSITION_FUNCTIONS.contains(&name) {
        return args.iter().skip(1).all(is_integer_literal);
    }
    true
}

/// An integer constant, or a literal or parameter cast to an integer type.
fn is_integer_literal(v: &Value) -> bool {
    match wrapped(v) {
        Some(("A_Const", b)) => b.get("ival").is_some(),
        Some(("TypeCast", b)) => {
            let ty = b.get("typeName").and_then(|t| typed(t, "TypeName")).map(|t| names(list(t, "names"))).unwrap_or_default();
            ty.last().is_some_and(|t| INTEGER_TYPES.contains(&t.as_str())) && b.get("arg").is_some_and(is_literal)
        }
        _ => false,
    }
}

/// Types a cast to which cannot fail on a string's content.
pub(super) const TEXT_TYPES: &[&str] = &["text", "varchar", "bpchar", "char", "name", "citext"];

/// A cast to a text type (not an array of one).
fn text_cast(b: &Obj) -> bool {
    let Some(t) = b.get("typeName").and_then(|t| typed(t, "TypeName")) else { return false };
    let n = names(list(t, "names"));
    list(t, "arrayBounds").is_empty() && n.last().is_some_and(|l| TEXT_TYPES.contains(&l.as_str()))
}

/// A RangeVar's body: wrapped in a Node position, bare in a typed field (`relation`).
fn range_var(m: &Obj) -> Option<&Obj> {
    match m.get("RangeVar") {
        Some(rv) => rv.as_object(),
        None => m.get("relname").is_some_and(Value::is_string).then_some(m),
    }
}

/// A literal or parameter (possibly cast): what equality may compare a masked column with.
fn is_literal(v: &Value) -> bool {
    match wrapped(v) {
        Some(("A_Const" | "ParamRef", _)) => true,
        Some(("TypeCast", b)) => b.get("arg").is_some_and(is_literal),
        _ => false,
    }
}

/// The output column an ORDER BY item names by position or by output name.
fn output_named<'o>(o: &'o Out, node: &Value) -> Option<&'o (Option<String>, Item)> {
    if let Some(c) = node.get("A_Const").and_then(Value::as_object) {
        let n = c.get("ival")?.get("ival")?.as_u64()?;
        return o.cols.get(usize::try_from(n).ok()?.checked_sub(1)?);
    }
    let fields = node.get("ColumnRef")?.get("fields")?.as_array()?;
    let [f] = fields.as_slice() else { return None };
    let name = sval(f)?;
    o.cols.iter().find(|(n, _)| n.as_deref() == Some(name))
}

/// Per-column taints of a query's output (stars: the relations' whole taint).
fn out_taints(o: &Out) -> Vec<Taint> {
    let mut v: Vec<Taint> = o
        .cols
        .iter()
        .map(|(_, i)| match i {
            Item::Col(t) => *t,
            Item::Star => Taint::NONE,
        })
        .collect();
    for s in &o.stars {
        let w = match &s.kind {
            RelKind::Opaque { whole } => *whole,
            _ => s.whole(),
        };
        v.push(w);
    }
    v
}

/// `CreateStmt` → `CREATE`-ish words for messages.
fn command_name(ty: &str) -> String {
    let base = ty.strip_suffix("Stmt").unwrap_or(ty);
    let mut out = String::new();
    for (i, c) in base.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

mod shadow;

#[cfg(test)]
mod tests;
