//! SQL analysis: a pure function of the statement text. Splits a simple-query string into
//! statements and says, for each, its statement classes, command(s), tables, schemas and
//! functions touched, and modifiers (UPDATE without WHERE, COPY … PROGRAM, identity changes …).
//!
//! sqlparser (Postgres dialect, with its visitor) does the work. Two places where stock
//! sqlparser and Postgres disagree in a way that would *hide* a statement are handled here:
//!
//! * `parse_statements` stops quietly at a bare `END` after a statement (`SELECT 1 END; DROP
//!   TABLE t` parses as just `SELECT 1`, while Postgres reads `END` as a column alias and runs
//!   the DROP). We parse statement by statement and require `;` or the end after each one.
//! * The tokenizer takes the lines after `COPY … FROM STDIN;` as inline COPY data (psql script
//!   style). On the wire, a Query message never carries COPY data: that text is more SQL. We
//!   split the string after such a `COPY …;` and analyze the rest on its own.
//!
//! Statements sqlparser rejects are scanned lexically ([`super::lexical`]) and marked
//! `unparsable`; `DO` blocks (which sqlparser does not support) are recognized lexically and
//! classed `procedural`.

use std::fmt;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    CopySource, CopyTarget, DiscardObject, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName,
    ObjectType, Query, Reset, ResetStatement, Set, SetExpr, Statement, TableFactor, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace};

use super::lexical;
use super::limits;
use super::normalize::{self, Normalized};

/// What kind of statement this is. A statement can be in several classes (`WITH d AS (DELETE
/// …) SELECT …` is read and write); its *primary* class is the most significant one, in the
/// order of this enum (later = more significant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementClass {
    /// SELECT, VALUES, TABLE, FETCH, COPY … TO STDOUT, EXPLAIN of a read.
    Read,
    /// SET/RESET/SHOW of settings, DISCARD, LISTEN/UNLISTEN, DEALLOCATE, CLOSE.
    #[serde(alias = "set")]
    Session,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION.
    Transaction,
    /// INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY … FROM, LOCK, NOTIFY, REFRESH MATERIALIZED
    /// VIEW, SELECT … FOR UPDATE/SHARE, data-modifying CTEs, EXECUTE of an unknown statement.
    Write,
    /// DO blocks and CALL.
    Procedural,
    /// CREATE/ALTER/DROP of tables, views, functions, schemas, extensions …; COMMENT; SELECT INTO.
    Ddl,
    /// GRANT/REVOKE, roles and users, row-level security policies, default privileges.
    Dcl,
    /// VACUUM, ANALYZE, CHECKPOINT, LOAD, ALTER SYSTEM, COPY to/from server files or programs.
    #[serde(alias = "utility")]
    Admin,
    /// A statement sqlparser could not parse and whose leading word says nothing.
    Unknown,
}

impl StatementClass {
    pub const ALL: [StatementClass; 9] = [
        StatementClass::Read,
        StatementClass::Session,
        StatementClass::Transaction,
        StatementClass::Write,
        StatementClass::Procedural,
        StatementClass::Ddl,
        StatementClass::Dcl,
        StatementClass::Admin,
        StatementClass::Unknown,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            StatementClass::Read => "read",
            StatementClass::Session => "session",
            StatementClass::Transaction => "transaction",
            StatementClass::Write => "write",
            StatementClass::Procedural => "procedural",
            StatementClass::Ddl => "ddl",
            StatementClass::Dcl => "dcl",
            StatementClass::Admin => "admin",
            StatementClass::Unknown => "unknown",
        }
    }
}

impl fmt::Display for StatementClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A set of [`StatementClass`]es.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClassSet(pub(crate) u16);

impl ClassSet {
    pub fn insert(&mut self, c: StatementClass) {
        self.0 |= 1 << c as u16;
    }
    pub fn contains(self, c: StatementClass) -> bool {
        self.0 & (1 << c as u16) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = StatementClass> {
        StatementClass::ALL.into_iter().filter(move |c| self.contains(*c))
    }
    /// The most significant class (`unknown` for an empty set).
    pub fn primary(self) -> StatementClass {
        self.iter().last().unwrap_or(StatementClass::Unknown)
    }
}

/// Facts about a statement beyond its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modifier {
    /// UPDATE or DELETE without WHERE (or with a trivially true one: TRUE, x = x, … OR TRUE);
    /// also TRUNCATE.
    NoWhere,
    /// The query string holds more than one statement.
    MultiStatement,
    /// SELECT … FOR UPDATE / FOR SHARE (row locks).
    ForUpdate,
    /// A data-modifying statement inside WITH.
    CteWrite,
    /// COPY … TO/FROM PROGRAM.
    CopyProgram,
    /// COPY … TO/FROM a file on the database server.
    CopyFile,
    /// Changes search_path (SET, set_config, function SET clauses, ALTER ROLE … SET).
    SearchPath,
    /// Changes the session's identity (SET ROLE, RESET ROLE, SET SESSION AUTHORIZATION,
    /// set_config('role', …), DISCARD ALL, writes to pg_settings). Always denied (built-in).
    IdentityChange,
    /// Turns standard_conforming_strings off, or switches to a client encoding whose
    /// multibyte characters can contain a backslash byte (SJIS, BIG5, GBK, GB18030, JOHAB) —
    /// either would make Postgres read string literals differently from pgward's parser.
    /// Always denied (built-in).
    ProtectedSetting,
    /// sqlparser could not parse the statement (or it might nest deeper than pgward parses,
    /// see `limits`); what is known comes from a lexical scan.
    Unparsable,
    /// EXECUTE of a prepared statement whose text the engine was not given.
    UnknownPrepared,
    /// A protocol-level function call (FunctionCall message): only the function's OID is known.
    Fastpath,
    /// The text is longer than pgward parses or scans (`limits::MAX_PARSE_BYTES`). Always
    /// denied (built-in).
    TooLarge,
}

impl Modifier {
    pub const ALL: [Modifier; 13] = [
        Modifier::NoWhere,
        Modifier::MultiStatement,
        Modifier::ForUpdate,
        Modifier::CteWrite,
        Modifier::CopyProgram,
        Modifier::CopyFile,
        Modifier::SearchPath,
        Modifier::IdentityChange,
        Modifier::ProtectedSetting,
        Modifier::Unparsable,
        Modifier::UnknownPrepared,
        Modifier::Fastpath,
        Modifier::TooLarge,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Modifier::NoWhere => "no_where",
            Modifier::MultiStatement => "multi_statement",
            Modifier::ForUpdate => "for_update",
            Modifier::CteWrite => "cte_write",
            Modifier::CopyProgram => "copy_program",
            Modifier::CopyFile => "copy_file",
            Modifier::SearchPath => "search_path",
            Modifier::IdentityChange => "identity_change",
            Modifier::ProtectedSetting => "protected_setting",
            Modifier::Unparsable => "unparsable",
            Modifier::UnknownPrepared => "unknown_prepared",
            Modifier::Fastpath => "fastpath",
            Modifier::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for Modifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A set of [`Modifier`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ModSet(pub(crate) u32);

impl ModSet {
    pub fn insert(&mut self, m: Modifier) {
        self.0 |= 1 << m as u32;
    }
    pub fn contains(self, m: Modifier) -> bool {
        self.0 & (1 << m as u32) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Modifier> {
        Modifier::ALL.into_iter().filter(move |m| self.contains(*m))
    }
}

impl std::ops::BitOrAssign for ModSet {
    fn bitor_assign(&mut self, rhs: ModSet) {
        self.0 |= rhs.0;
    }
}

/// A possibly schema-qualified name, lowercased (matching is case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QName {
    pub schema: Option<String>,
    pub name: String,
}

impl QName {
    pub fn new(schema: Option<String>, name: String) -> QName {
        QName { schema, name }
    }
    /// From an AST name: the last two parts (`db.schema.table` → `schema.table`).
    fn from_object(n: &ObjectName) -> Option<QName> {
        let parts: Vec<String> = n.0.iter().filter_map(|p| p.as_ident()).map(|i| i.value.to_lowercase()).collect();
        match parts.as_slice() {
            [] => None,
            [name] => Some(QName::new(None, name.clone())),
            [.., schema, name] => Some(QName::new(Some(schema.clone()), name.clone())),
        }
    }
}

impl fmt::Display for QName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Everything the policy engine knows about one statement.
#[derive(Debug, Clone, Default)]
pub struct StatementInfo {
    /// The statement (as sqlparser prints it, or the source text if it could not be parsed).
    /// An analysis is shared by texts that differ only in literal values when it does not
    /// depend on them (`literal_dependent` false): then this is the text of the first of
    /// them pgward analyzed, with that text's literals.
    pub text: String,
    pub classes: ClassSet,
    /// Command names, lowercased: `select`, `insert`, `drop table`, `create function`, …
    /// (nested statements too: a data-modifying CTE adds `delete`).
    pub commands: Vec<String>,
    pub modifiers: ModSet,
    /// Relations named (tables, views, sequences; CTE names too — conservatively).
    pub tables: Vec<QName>,
    /// Schemas named explicitly (schema-qualified names, CREATE/DROP/ALTER SCHEMA).
    pub schemas: Vec<String>,
    pub functions: Vec<QName>,
    /// `EXECUTE name`: the prepared statement's name (as Postgres folds it).
    pub execute: Option<String>,
    pub unparsable: bool,
    /// The analysis read the value of a literal — a setting's value, `set_config`'s
    /// arguments, a DO or function body, `x = x` between literals, the text of an
    /// unparsable statement — or its text is used later (PREPARE): it holds for this exact
    /// text only, not for texts that differ in literal values.
    pub literal_dependent: bool,
}

impl StatementInfo {
    pub fn class(&self) -> StatementClass {
        self.classes.primary()
    }
    fn add_command(&mut self, c: impl Into<String>) {
        let c = c.into();
        if !self.commands.contains(&c) {
            self.commands.push(c);
        }
    }
    /// The statement's first `n` words as its command ([`leading_words`]).
    fn add_leading_words(&mut self, s: &Statement, n: usize) {
        let (words, from_literal) = leading_words(s, n);
        self.literal_dependent |= from_literal;
        self.add_command(words);
    }
    fn finish(&mut self) {
        // Writing to pg_settings calls set_config() through the view's update rule.
        if self.classes.contains(StatementClass::Write) && self.tables.iter().any(|t| t.name == "pg_settings") {
            self.modifiers.insert(Modifier::IdentityChange);
        }
        for t in &self.tables {
            if let Some(s) = &t.schema {
                self.schemas.push(s.clone());
            }
        }
        self.tables.sort();
        self.tables.dedup();
        self.functions.sort();
        self.functions.dedup();
        self.schemas.sort();
        self.schemas.dedup();
        if self.classes.is_empty() {
            self.classes.insert(StatementClass::Unknown);
        }
    }
}

/// The modifiers a change of setting `name` (lowercase) to `value` (lowercase literal, if
/// known) implies.
pub(crate) fn setting_change(name: &str, value: Option<&str>) -> ModSet {
    let mut m = ModSet::default();
    match name {
        "role" | "session_authorization" => m.insert(Modifier::IdentityChange),
        "standard_conforming_strings" => {
            let harmless = matches!(value, Some("on" | "true" | "yes" | "1" | "t" | "y" | "default"));
            if !harmless {
                m.insert(Modifier::ProtectedSetting);
            }
        }
        "search_path" => m.insert(Modifier::SearchPath),
        "client_encoding" | "names" if value.is_none_or(unsafe_client_encoding) => {
            m.insert(Modifier::ProtectedSetting);
        }
        _ => {}
    }
    m
}

/// Client encodings whose multibyte characters can contain the byte 0x5C (backslash): with
/// one of these, Postgres and pgward (which reads non-UTF-8 bytes as Latin-1) would split
/// `E'…'` literals differently. Postgres refuses them as server encodings for the same reason.
/// The session should refuse them as a startup `client_encoding`, too. `default` is fine.
pub fn unsafe_client_encoding(name: &str) -> bool {
    let n: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    matches!(
        n.as_str(),
        "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "cp932"
            | "shiftjis2004"
            | "big5"
            | "win950"
            | "windows950"
            | "cp950"
            | "gbk"
            | "win936"
            | "windows936"
            | "cp936"
            | "gb18030"
            | "johab"
    )
}

/// The value of a literal or a bare identifier (`SET x TO 'v'` / `SET x TO v`). Reading a
/// literal's value marks the analysis literal-dependent (`dep`).
fn expr_literal(e: &Expr, dep: &mut bool) -> Option<String> {
    match e {
        Expr::Value(v) if !matches!(v.value, Value::Boolean(_) | Value::Null | Value::Placeholder(_)) => {
            *dep = true;
            literal_value(&v.value)
        }
        Expr::Value(v) => literal_value(&v.value),
        Expr::Identifier(i) => Some(i.value.to_lowercase()),
        Expr::Nested(e) => expr_literal(e, dep),
        _ => None,
    }
}

fn literal_value(v: &Value) -> Option<String> {
    match v {
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s)
        | Value::NationalStringLiteral(s) => Some(s.to_lowercase()),
        Value::DollarQuotedString(d) => Some(d.value.to_lowercase()),
        Value::Boolean(b) => Some(b.to_string()),
        Value::Number(n, _) => Some(n.to_string()),
        _ => None,
    }
}

/// A name written as an expression (`SELECT … INTO s.t`).
fn expr_name(e: &Expr) -> Option<QName> {
    match e {
        Expr::Identifier(i) => Some(QName::new(None, i.value.to_lowercase())),
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [.., s, n] => Some(QName::new(Some(s.value.to_lowercase()), n.value.to_lowercase())),
            [n] => Some(QName::new(None, n.value.to_lowercase())),
            [] => None,
        },
        _ => None,
    }
}

fn object_last(n: &ObjectName) -> String {
    n.0.last().and_then(|p| p.as_ident()).map(|i| i.value.to_lowercase()).unwrap_or_default()
}

/// A WHERE clause that does not restrict anything: TRUE, `x = x`, `… OR TRUE`, NOT FALSE.
/// `x = x` compares the two sides as written; when both hold literals (`1 = 1` against `1 =
/// 2`) the answer depends on their values (`dep`). A side with a literal is never the same
/// expression as a side without one (`a = 1` is not trivially true, whatever the value).
fn trivially_true(e: &Expr, dep: &mut bool) -> bool {
    use sqlparser::ast::{BinaryOperator, UnaryOperator};
    match e {
        Expr::Value(v) => matches!(v.value, Value::Boolean(true)),
        Expr::Nested(e) => trivially_true(e, dep),
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            match (normalize::has_literal(&**left), normalize::has_literal(&**right)) {
                (false, false) => left.to_string() == right.to_string(),
                (true, true) => {
                    *dep = true;
                    left.to_string() == right.to_string()
                }
                _ => false,
            }
        }
        Expr::BinaryOp { left, op: BinaryOperator::Or, right } => {
            // Both sides are looked at (no short circuit): whether an analysis depended on a
            // literal must not depend on the order of evaluation.
            let (l, r) = (trivially_true(left, dep), trivially_true(right, dep));
            l || r
        }
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            let (l, r) = (trivially_true(left, dep), trivially_true(right, dep));
            l && r
        }
        Expr::UnaryOp { op: UnaryOperator::Not, expr } => {
            matches!(&**expr, Expr::Value(v) if matches!(v.value, Value::Boolean(false)))
        }
        _ => false,
    }
}

fn no_where(selection: &Option<Expr>, dep: &mut bool) -> bool {
    selection.as_ref().is_none_or(|e| trivially_true(e, dep))
}

/// The visitor: called for every statement (top level and nested), query, table factor,
/// relation and expression.
struct Collector<'a> {
    info: &'a mut StatementInfo,
    /// The next relation is a table function's name (`FROM pg_ls_dir('.')`), not a table.
    skip_relation: bool,
}

impl Visitor for Collector<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        classify(s, self.info);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if !q.locks.is_empty() {
            self.info.classes.insert(StatementClass::Write);
            self.info.modifiers.insert(Modifier::ForUpdate);
        }
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                if matches!(
                    &*cte.query.body,
                    SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
                ) {
                    self.info.classes.insert(StatementClass::Write);
                    self.info.modifiers.insert(Modifier::CteWrite);
                }
            }
        }
        table_commands(&q.body, self.info);
        if let SetExpr::Select(sel) = &*q.body
            && let Some(into) = &sel.into
        {
            // SELECT … INTO t creates and fills a table.
            self.info.classes.insert(StatementClass::Ddl);
            self.info.classes.insert(StatementClass::Write);
            self.info.add_command("select into");
            for t in &into.targets {
                if let Some(q) = expr_name(t) {
                    self.info.tables.push(q);
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        match tf {
            TableFactor::Table { name, args: Some(_), .. } => {
                if let Some(f) = QName::from_object(name) {
                    self.info.functions.push(f);
                }
                self.skip_relation = true;
            }
            TableFactor::Function { name, .. } => {
                if let Some(f) = QName::from_object(name) {
                    self.info.functions.push(f);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.skip_relation) {
            return ControlFlow::Continue(());
        }
        if let Some(t) = QName::from_object(name) {
            self.info.tables.push(t);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e
            && let Some(q) = QName::from_object(&f.name)
        {
            if q.name == "set_config" {
                self.info.modifiers |= set_config_call(&f.args, &mut self.info.literal_dependent);
            }
            self.info.functions.push(q);
        }
        ControlFlow::Continue(())
    }
}

/// `TABLE name` (also inside UNION/EXCEPT/INTERSECT): the visitor does not report these names.
fn table_commands(body: &SetExpr, info: &mut StatementInfo) {
    match body {
        SetExpr::Table(t) => {
            if let Some(name) = &t.table_name {
                let schema = t.schema_name.as_ref().map(|s| s.value.to_lowercase());
                info.tables.push(QName::new(schema, name.value.to_lowercase()));
            }
        }
        SetExpr::SetOperation { left, right, .. } => {
            table_commands(left, info);
            table_commands(right, info);
        }
        _ => {}
    }
}

/// set_config(name, value, is_local): a literal name is checked like SET; a computed one could
/// be 'role', so it counts as an identity change. Reading the literals sets `dep`.
fn set_config_call(args: &FunctionArguments, dep: &mut bool) -> ModSet {
    let mut unknown = ModSet::default();
    unknown.insert(Modifier::IdentityChange);
    let FunctionArguments::List(list) = args else {
        return unknown;
    };
    // Named arguments can come in any order: do not guess which one is the name.
    if list.args.iter().any(|a| !matches!(a, FunctionArg::Unnamed(_))) {
        return unknown;
    }
    let arg = |i: usize| -> Option<&Expr> {
        match list.args.get(i)? {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        }
    };
    match arg(0).and_then(|e| match e {
        // Only a real string literal names the setting; an identifier here is a column.
        Expr::Value(_) => expr_literal(e, dep),
        _ => None,
    }) {
        Some(name) => setting_change(&name, arg(1).and_then(|e| expr_literal(e, dep)).as_deref()),
        None => unknown,
    }
}

/// A statement's own contribution (nested statements are visited separately).
fn classify(s: &Statement, info: &mut StatementInfo) {
    use StatementClass::*;
    match s {
        Statement::Query(_) => {
            info.classes.insert(Read);
            info.add_command("select");
        }
        Statement::Insert(_) => {
            info.classes.insert(Write);
            info.add_command("insert");
        }
        Statement::Update(u) => {
            info.classes.insert(Write);
            info.add_command("update");
            if no_where(&u.selection, &mut info.literal_dependent) {
                info.modifiers.insert(Modifier::NoWhere);
            }
        }
        Statement::Delete(d) => {
            info.classes.insert(Write);
            info.add_command("delete");
            if no_where(&d.selection, &mut info.literal_dependent) {
                info.modifiers.insert(Modifier::NoWhere);
            }
        }
        Statement::Merge(_) => {
            info.classes.insert(Write);
            info.add_command("merge");
        }
        Statement::Truncate(_) => {
            info.classes.insert(Write);
            info.add_command("truncate");
            info.modifiers.insert(Modifier::NoWhere);
        }
        Statement::Copy { source, to, target, .. } => {
            info.add_command("copy");
            if let CopySource::Table { table_name, .. } = source
                && let Some(t) = QName::from_object(table_name)
            {
                info.tables.push(t);
            }
            info.classes.insert(if *to { Read } else { Write });
            match target {
                CopyTarget::Program { .. } => {
                    info.classes.insert(Admin);
                    info.modifiers.insert(Modifier::CopyProgram);
                }
                CopyTarget::File { .. } => {
                    info.classes.insert(Admin);
                    info.modifiers.insert(Modifier::CopyFile);
                }
                CopyTarget::Stdin | CopyTarget::Stdout => {}
            }
        }
        Statement::Lock(_) => {
            info.classes.insert(Write);
            info.add_command("lock");
        }
        Statement::RefreshMaterializedView(_) => {
            info.classes.insert(Write);
            info.add_command("refresh materialized view");
        }
        Statement::NOTIFY { .. } => {
            info.classes.insert(Write);
            info.add_command("notify");
        }
        Statement::LISTEN { .. } => {
            info.classes.insert(Session);
            info.add_command("listen");
        }
        Statement::UNLISTEN { .. } => {
            info.classes.insert(Session);
            info.add_command("unlisten");
        }
        Statement::CreateTable(ct) => {
            info.classes.insert(Ddl);
            if ct.query.is_some() {
                info.classes.insert(Write);
            }
            info.add_command("create table");
        }
        Statement::CreateView(v) => {
            info.classes.insert(Ddl);
            info.add_command(if v.materialized { "create materialized view" } else { "create view" });
        }
        Statement::CreateSchema { schema_name, .. } => {
            info.classes.insert(Ddl);
            info.add_command("create schema");
            let name = schema_name.to_string();
            let name = name.split_whitespace().next().unwrap_or("").trim_matches('"').to_lowercase();
            if !name.is_empty() && name != "authorization" {
                info.schemas.push(name);
            }
        }
        Statement::AlterSchema(a) => {
            info.classes.insert(Ddl);
            info.add_command("alter schema");
            info.schemas.push(object_last(&a.name));
        }
        Statement::CreateFunction(_)
        | Statement::CreateProcedure { .. }
        | Statement::AlterFunction(_)
        | Statement::CreateTrigger(_) => {
            info.classes.insert(Ddl);
            info.add_leading_words(s, 2);
            // Bodies and SET clauses are opaque strings to the parser: scan them (their
            // contents are literals).
            info.literal_dependent = true;
            let f = lexical::scan(&s.to_string());
            info.modifiers |= f.modifiers;
            info.functions.extend(f.functions);
        }
        Statement::Drop { object_type, names, .. } => {
            info.add_command(format!("drop {}", object_type.to_string().to_lowercase()));
            match object_type {
                ObjectType::Role | ObjectType::User | ObjectType::Group => info.classes.insert(Dcl),
                ObjectType::Schema => {
                    info.classes.insert(Ddl);
                    info.schemas.extend(names.iter().map(object_last));
                }
                ObjectType::Table
                | ObjectType::View
                | ObjectType::MaterializedView
                | ObjectType::Index
                | ObjectType::Sequence
                | ObjectType::ForeignTable => {
                    info.classes.insert(Ddl);
                    info.tables.extend(names.iter().filter_map(QName::from_object));
                }
                _ => info.classes.insert(Ddl),
            }
        }
        Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::GrantRole(_)
        | Statement::RevokeRole(_)
        | Statement::Deny(_)
        | Statement::CreateRole(_)
        | Statement::CreateUser(_)
        | Statement::AlterUser(_)
        | Statement::AlterRole { .. }
        | Statement::AlterDefaultPrivileges(_)
        | Statement::CreatePolicy(_)
        | Statement::AlterPolicy(_)
        | Statement::DropPolicy(_) => {
            info.classes.insert(Dcl);
            let grant = matches!(
                s,
                Statement::Grant(_)
                    | Statement::Revoke(_)
                    | Statement::GrantRole(_)
                    | Statement::RevokeRole(_)
                    | Statement::Deny(_)
            );
            info.add_leading_words(s, if grant { 1 } else { 2 });
            if matches!(s, Statement::AlterRole { .. } | Statement::AlterUser(_)) {
                // ALTER ROLE … SET standard_conforming_strings = off applies to later logins.
                info.literal_dependent = true;
                let f = lexical::scan(&s.to_string());
                info.modifiers |= f.modifiers;
            }
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => {
            info.classes.insert(Transaction);
            info.add_leading_words(s, 1);
        }
        Statement::Set(set) => classify_set(set, info),
        Statement::Reset(ResetStatement { reset }) => {
            info.classes.insert(Session);
            info.add_command("reset");
            match reset {
                Reset::ALL => {}
                Reset::SessionAuthorization => info.modifiers.insert(Modifier::IdentityChange),
                Reset::ConfigurationParameter(n) => info.modifiers |= setting_change(&object_last(n), Some("default")),
            }
        }
        Statement::Discard { object_type } => {
            info.classes.insert(Session);
            info.add_command("discard");
            if matches!(object_type, DiscardObject::ALL) {
                // DISCARD ALL includes RESET SESSION AUTHORIZATION and resets the role.
                info.modifiers.insert(Modifier::IdentityChange);
            }
        }
        Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::Use(_)
        | Statement::Deallocate { .. }
        | Statement::Close { .. } => {
            info.classes.insert(Session);
            info.add_leading_words(s, 1);
        }
        Statement::Declare { .. } => {
            info.classes.insert(Read);
            info.add_command("declare");
        }
        Statement::Fetch { .. } => {
            info.classes.insert(Read);
            info.add_command("fetch");
        }
        Statement::ExplainTable { .. } => {
            info.classes.insert(Read);
            info.add_command("describe");
        }
        // Wrappers: the inner statement is visited and classified on its own.
        Statement::Prepare { .. } => {
            info.add_command("prepare");
            // The session keeps this statement's text (`text`) to decide a later EXECUTE.
            info.literal_dependent = true;
        }
        Statement::Explain { .. } => info.add_command("explain"),
        Statement::Execute { name, .. } => {
            info.add_command("execute");
            // Until the session tells us what it runs: a write.
            info.classes.insert(Write);
            info.modifiers.insert(Modifier::UnknownPrepared);
            info.execute = Some(
                name.as_ref()
                    .and_then(|n| n.0.last())
                    .and_then(|p| p.as_ident())
                    .map(|i| if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() })
                    .unwrap_or_default(),
            );
        }
        Statement::Call(f) => {
            info.classes.insert(Procedural);
            info.add_command("call");
            if let Some(q) = QName::from_object(&f.name) {
                info.functions.push(q);
            }
        }
        Statement::Case(_) | Statement::If(_) | Statement::While(_) | Statement::Raise(_) | Statement::Return(_) => {
            info.classes.insert(Procedural);
            info.add_leading_words(s, 1);
        }
        Statement::Vacuum(_) | Statement::Analyze(_) | Statement::Kill { .. } | Statement::Load { .. } => {
            info.classes.insert(Admin);
            info.add_leading_words(s, 1);
        }
        Statement::Comment { .. } | Statement::RenameTable(_) => {
            info.classes.insert(Ddl);
            info.add_leading_words(s, 1);
        }
        other => {
            let (cmd, from_literal) = leading_words(other, 2);
            info.literal_dependent |= from_literal;
            if cmd.starts_with("create ") || cmd.starts_with("alter ") || cmd.starts_with("drop ") {
                info.classes.insert(Ddl);
            } else {
                // Anything else sqlparser knows (mostly other dialects' utilities).
                info.classes.insert(Admin);
            }
            info.add_command(cmd);
        }
    }
}

fn classify_set(set: &Set, info: &mut StatementInfo) {
    use StatementClass::*;
    match set {
        Set::SetTransaction { .. } => {
            info.classes.insert(Transaction);
            info.add_command("set transaction");
        }
        Set::SetRole { .. } => {
            info.classes.insert(Session);
            info.add_command("set role");
            info.modifiers.insert(Modifier::IdentityChange);
        }
        Set::SetSessionAuthorization(_) => {
            info.classes.insert(Session);
            info.add_command("set session authorization");
            info.modifiers.insert(Modifier::IdentityChange);
        }
        Set::SingleAssignment { variable, values, .. } => {
            info.classes.insert(Session);
            info.add_command("set");
            let v = if values.len() == 1 { expr_literal(&values[0], &mut info.literal_dependent) } else { None };
            info.modifiers |= setting_change(&object_last(variable), v.as_deref());
        }
        Set::MultipleAssignments { assignments } => {
            info.classes.insert(Session);
            info.add_command("set");
            for a in assignments {
                let v = expr_literal(&a.value, &mut info.literal_dependent);
                info.modifiers |= setting_change(&object_last(&a.name), v.as_deref());
            }
        }
        Set::ParenthesizedAssignments { variables, .. } => {
            info.classes.insert(Session);
            info.add_command("set");
            for v in variables {
                info.modifiers |= setting_change(&object_last(v), None);
            }
        }
        Set::SetNames { charset_name, .. } => {
            info.classes.insert(Session);
            info.add_command("set names");
            // `SET NAMES 'big5'`: the name may have been a literal.
            info.literal_dependent = true;
            info.modifiers |= setting_change("client_encoding", Some(&charset_name.value.to_lowercase()));
        }
        _ => {
            info.classes.insert(Session);
            info.add_command("set");
        }
    }
}

/// The first `n` words of a statement as sqlparser prints it, lowercased ("create function"),
/// and whether one of them came from a literal (a number, or the prefix of `E'…'`).
fn leading_words(s: &Statement, n: usize) -> (String, bool) {
    let text = s.to_string();
    let mut words = Vec::new();
    let mut from_literal = false;
    for piece in text.split_whitespace() {
        let skip =
            matches!(piece.to_ascii_uppercase().as_str(), "OR" | "REPLACE" | "TEMPORARY" | "TEMP" | "UNIQUE" | "ALTER");
        // "CREATE OR REPLACE FUNCTION" → "create function"; "CREATE OR ALTER" likewise.
        if skip && !words.is_empty() {
            continue;
        }
        let w: String = piece.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if w.is_empty() {
            break;
        }
        let rest = &piece[w.len()..];
        from_literal |= w.starts_with(|c: char| c.is_ascii_digit()) || rest.starts_with(['\'', '&']);
        words.push(w.to_lowercase());
        if words.len() == n {
            break;
        }
    }
    (words.join(" "), from_literal)
}

/// Analyze one parsed statement.
fn analyze_statement(s: &Statement) -> StatementInfo {
    let mut info = StatementInfo { text: s.to_string(), ..Default::default() };
    let mut v = Collector { info: &mut info, skip_relation: false };
    let _ = s.visit(&mut v);
    info.finish();
    info
}

/// Analyze a statement sqlparser rejected (or a DO block).
fn analyze_lexically(text: &str) -> StatementInfo {
    let f = lexical::scan(text);
    let is_do = f.lead.first().map(String::as_str) == Some("do");
    let (classes, command) = lexical::guess_classes(&f.lead, &f);
    let mut info = StatementInfo {
        text: text.trim().to_string(),
        classes,
        commands: vec![command],
        modifiers: f.modifiers,
        functions: f.functions,
        unparsable: !is_do,
        // The scan reads string contents (DO bodies, EXECUTE '…') and the text as written.
        literal_dependent: true,
        ..Default::default()
    };
    // Any word might be a table: deny rules on tables still see them.
    info.tables = f.names;
    if is_do {
        // DO [LANGUAGE l] '<body>': a known statement form with an opaque body (scanned).
        info.classes = ClassSet::default();
        info.classes.insert(StatementClass::Procedural);
    } else {
        info.modifiers.insert(Modifier::Unparsable);
        let lead = info.commands[0].clone();
        if lead == "copy" && info.tables.iter().any(|t| t.name == "program") {
            info.modifiers.insert(Modifier::CopyProgram);
        }
    }
    info.finish();
    info
}

const DIALECT: PostgreSqlDialect = PostgreSqlDialect {};

/// A text over [`limits::MAX_PARSE_BYTES`]: neither parsed nor scanned (a scan allocates per
/// word too), denied by the policy as `builtin:too-large`. Its `text` is the first 256 bytes.
fn too_large(sql: &str) -> StatementInfo {
    let mut end = 256.min(sql.len());
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    let mut info = StatementInfo {
        text: format!("{}…", sql[..end].trim_start()),
        commands: vec!["unknown".to_string()],
        unparsable: true,
        literal_dependent: true,
        ..Default::default()
    };
    info.modifiers.insert(Modifier::TooLarge);
    info.modifiers.insert(Modifier::Unparsable);
    info.finish();
    info
}

/// Split and analyze a simple-query string (or a Parse's text). Never fails: what cannot be
/// parsed comes back `unparsable`. Empty strings (or only comments) give no statements.
pub fn analyze_sql(sql: &str) -> Vec<StatementInfo> {
    analyze_sql_with(sql, None).0
}

/// [`analyze_sql`], and whether the analysis holds for every text with the same
/// literal-normalized key as `sql` (`norm`, computed from `sql`): true only when
///
/// * no statement's analysis read a literal's value (`literal_dependent`; the places that do
///   set it: `expr_literal`, `set_config_call`, `trivially_true`, lexical scans, PREPARE), and
/// * every literal of the text became a literal value in sqlparser's AST, exactly where the
///   normalizer found it ([`Normalized::values_cover_literals`]) — so a literal that sqlparser
///   made part of the statement's structure (an identifier, a COPY program or option, a type
///   modifier, a count) always keeps the analysis to this text, whatever code reads it, and
/// * the string was not split after `COPY … FROM STDIN;` (where the tokenizer's view of the
///   rest depends on its contents).
///
/// `norm` None: false.
pub(crate) fn analyze_sql_with(sql: &str, norm: Option<&Normalized>) -> (Vec<StatementInfo>, bool) {
    if sql.len() > limits::MAX_PARSE_BYTES {
        return (vec![too_large(sql)], false);
    }
    let mut out = Vec::new();
    let mut parsed = Vec::new();
    let mut split = false;
    let mut rest = sql;
    // Segments end after a `COPY … FROM STDIN;` whose following lines the tokenizer would
    // swallow as inline data.
    loop {
        match Tokenizer::new(&DIALECT, rest).tokenize_with_location() {
            Err(_) => {
                if !rest.trim().is_empty() {
                    out.push(analyze_lexically(rest));
                }
                break;
            }
            Ok(tokens) => {
                if let Some(at) = copy_data_split(rest, &tokens) {
                    split = true;
                    let (head, tail) = rest.split_at(at);
                    // `head` ends with the `;` of COPY … FROM STDIN and has no data after it.
                    match Tokenizer::new(&DIALECT, head).tokenize_with_location() {
                        Ok(t) if copy_data_split(head, &t).is_none() => analyze_tokens(t, &mut out, &mut parsed),
                        _ => out.push(analyze_lexically(head)),
                    }
                    rest = tail;
                    continue;
                }
                analyze_tokens(tokens, &mut out, &mut parsed);
                break;
            }
        }
    }
    if out.len() > 1 {
        for s in &mut out {
            s.modifiers.insert(Modifier::MultiStatement);
        }
    }
    let shareable = norm
        .is_some_and(|n| !split && out.iter().all(|i| !i.literal_dependent) && n.values_cover_literals(sql, &parsed));
    (out, shareable)
}

/// If the tokens hold inline COPY data, the byte offset just after the `;` that ends the COPY.
fn copy_data_split(text: &str, tokens: &[TokenWithSpan]) -> Option<usize> {
    let at = tokens.iter().position(|t| matches!(t.token, Token::CopyData { .. }))?;
    let semi = tokens[at..].iter().find(|t| t.token == Token::SemiColon)?;
    let off = byte_offset(text, semi.span.start.line, semi.span.start.column)?;
    Some(off + 1)
}

/// Byte offset of a 1-based (line, column-in-chars) location.
fn byte_offset(text: &str, line: u64, column: u64) -> Option<usize> {
    let (mut l, mut c) = (1u64, 1u64);
    for (i, ch) in text.char_indices() {
        if l == line && c == column {
            return Some(i);
        }
        if ch == '\n' {
            l += 1;
            c = 1;
        } else {
            c += 1;
        }
    }
    None
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

/// sqlparser reads Postgres's Unicode identifier `U&"\0070g_read_file"` as `U & "\0070…"`
/// (a bitwise AND): join such tokens into the identifier Postgres sees. `Err` if an escape is
/// malformed (the statement is then treated as unparsable).
fn join_unicode_identifiers(tokens: &mut Vec<TokenWithSpan>) -> Result<(), ()> {
    use sqlparser::keywords::Keyword;
    let mut i = 0;
    while i + 2 < tokens.len() {
        let is_u =
            matches!(&tokens[i].token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("u"));
        let adjacent =
            tokens[i].span.end == tokens[i + 1].span.start && tokens[i + 1].span.end == tokens[i + 2].span.start;
        let quoted = matches!(&tokens[i + 2].token, Token::Word(w) if w.quote_style == Some('"'));
        if !(is_u && adjacent && tokens[i + 1].token == Token::Ampersand && quoted) {
            i += 1;
            continue;
        }
        let Token::Word(w) = &tokens[i + 2].token else { unreachable!() };
        let raw = w.value.clone();
        let mut end = i + 3;
        let mut esc = '\\';
        // Optional UESCAPE 'c'.
        let mut j = end;
        while j < tokens.len() && matches!(tokens[j].token, Token::Whitespace(_)) {
            j += 1;
        }
        if matches!(&tokens.get(j).map(|t| &t.token), Some(Token::Word(w)) if w.value.eq_ignore_ascii_case("uescape")) {
            let mut k = j + 1;
            while k < tokens.len() && matches!(tokens[k].token, Token::Whitespace(_)) {
                k += 1;
            }
            match tokens.get(k).map(|t| &t.token) {
                Some(Token::SingleQuotedString(c)) if c.chars().count() == 1 => {
                    esc = c.chars().next().ok_or(())?;
                    end = k + 1;
                }
                _ => return Err(()),
            }
        }
        let value = decode_unicode_escapes(&raw, esc).ok_or(())?;
        let span = tokens[i].span.start.span_to(tokens[end - 1].span.end);
        let word = sqlparser::tokenizer::Word { value, quote_style: Some('"'), keyword: Keyword::NoKeyword };
        tokens.splice(i..end, [TokenWithSpan::new(Token::Word(word), span)]);
        i += 1;
    }
    Ok(())
}

/// Analyze a segment's tokens into `out`; the statements sqlparser parsed go to `parsed`.
fn analyze_tokens(mut tokens: Vec<TokenWithSpan>, out: &mut Vec<StatementInfo>, parsed: &mut Vec<Statement>) {
    if join_unicode_identifiers(&mut tokens).is_err() {
        out.push(analyze_lexically(&group_text(&tokens)));
        return;
    }
    // Whole string first: one statement after another, each ended by `;` or the end.
    if let Some(stmts) = parse_strict(tokens.clone()) {
        out.extend(stmts.iter().map(analyze_statement));
        parsed.extend(stmts);
        return;
    }
    // Otherwise statement by statement, split at top-level `;` tokens (quotes, comments and
    // dollar-quoted bodies are single tokens, so their semicolons do not split).
    let mut group: Vec<TokenWithSpan> = Vec::new();
    let flush = |group: &mut Vec<TokenWithSpan>, out: &mut Vec<StatementInfo>, parsed: &mut Vec<Statement>| {
        let significant = group.iter().any(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF));
        if significant {
            match parse_strict(group.clone()) {
                Some(stmts) if stmts.len() == 1 => {
                    out.push(analyze_statement(&stmts[0]));
                    parsed.extend(stmts);
                }
                _ => out.push(analyze_lexically(&group_text(group))),
            }
        }
        group.clear();
    };
    for t in tokens {
        if t.token == Token::SemiColon {
            flush(&mut group, out, parsed);
        } else {
            group.push(t);
        }
    }
    flush(&mut group, out, parsed);
}

fn group_text(group: &[TokenWithSpan]) -> String {
    group
        .iter()
        .map(|t| match &t.token {
            Token::Whitespace(Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_)) => {
                " ".to_string()
            }
            other => other.to_string(),
        })
        .collect()
}

/// Parse all statements; `None` unless every statement is followed by `;` or the end, or when
/// a statement might nest deeper than pgward parses ([`limits::parseable`]).
fn parse_strict(mut tokens: Vec<TokenWithSpan>) -> Option<Vec<Statement>> {
    if !limits::parseable(&tokens) {
        return None;
    }
    if !matches!(tokens.last().map(|t| &t.token), Some(Token::EOF)) {
        tokens.push(TokenWithSpan::new_eof());
    }
    let mut p = Parser::new(&DIALECT).with_tokens_with_locations(tokens);
    let mut out = Vec::new();
    loop {
        while p.consume_token(&Token::SemiColon) {}
        if p.peek_token().token == Token::EOF {
            return Some(out);
        }
        out.push(p.parse_statement().ok()?);
        match p.peek_token().token {
            Token::SemiColon | Token::EOF => {}
            _ => return None,
        }
    }
}
