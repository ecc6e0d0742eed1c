//! SQL analysis: a pure function of the statement text. Splits a simple-query string into
//! statements and says, for each, its statement classes, command(s), tables, schemas and
//! functions touched, and modifiers (UPDATE without WHERE, COPY … PROGRAM, identity changes …).
//!
//! The tree is Postgres's own ([`super::pgparse`]: the server's lexer and grammar), so pgward
//! splits and reads a string exactly as the server will. The walk visits every node in every
//! position: a function call in FROM, LATERAL, a subquery, a CTE, RETURNING, a DEFAULT, an
//! index expression or COPY (…) is seen like one in a select list, and a setting change in
//! SET, set_config(), ALTER ROLE … SET, ALTER SYSTEM or a function's SET clause is checked the
//! same way. Bodies the grammar keeps as strings (DO blocks, function bodies) are scanned
//! lexically ([`super::lexical`]).

use serde_json::{Map, Value};

use super::bound;
use super::class::{ClassSet, ModSet, Modifier, QName, StatementClass};
use super::lexical;
use super::limits;
use super::normalize::Normalized;
use super::pgparse;
use super::pgtree::{const_locations, list, name_list, names, node, raw_stmts, str_field, wrapped_map as wrapped};
use super::settings::setting_change;
use super::writes;


/// Everything the policy engine knows about one statement.
#[derive(Debug, Clone, Default)]
pub struct StatementInfo {
    /// The statement's source text (one statement of a multi-statement string).
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
    /// Schemas named explicitly: schema-qualified names of relations, functions, operators,
    /// types and collations (not `pg_catalog` for those but relations), CREATE/DROP/ALTER
    /// SCHEMA, GRANT … IN SCHEMA, ALTER DEFAULT PRIVILEGES IN SCHEMA.
    pub schemas: Vec<String>,
    pub functions: Vec<QName>,
    /// Functions a lexical scan of a body (DO, CREATE FUNCTION … AS '…') names: matched by
    /// name patterns like `functions`, but not looked up for catalog classes (the body is not
    /// run by this statement, and a scan also reports words that are not functions).
    pub body_functions: Vec<QName>,
    /// Words and `a.b` pairs of such a body that might name tables: matched by table
    /// patterns like `tables` (a qualified one's schema counts as touched), so a table rule
    /// sees `LANGUAGE sql AS 'SELECT … FROM salaries'` as it sees a `BEGIN ATOMIC` body.
    pub body_tables: Vec<QName>,
    /// `EXECUTE name`: the prepared statement's name (as Postgres folds it).
    pub execute: Option<String>,
    /// What the statement around an `EXECUTE` does itself (`CREATE TABLE … AS EXECUTE`,
    /// `EXPLAIN ANALYZE EXECUTE`): its classes and commands, kept when the EXECUTE is
    /// resolved to the prepared text. Empty for a plain EXECUTE.
    pub execute_wrapper: (ClassSet, Vec<String>),
    /// PREPARE / DEALLOCATE: what it does to the session's prepared statements.
    pub prepared: Option<PreparedOp>,
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
    /// The statement text's first `n` words as its command ([`leading_words`]).
    fn add_leading_words(&mut self, n: usize) {
        let w = leading_words(&self.text, n);
        self.add_command(w);
    }
    fn finish(&mut self) {
        // Writing to pg_settings calls set_config() through the view's update rule.
        if self.classes.contains(StatementClass::Write) && self.tables.iter().any(|t| t.name == "pg_settings") {
            self.modifiers.insert(Modifier::IdentityChange);
        }
        for t in self.tables.iter().chain(&self.body_tables) {
            if let Some(s) = &t.schema {
                self.schemas.push(s.clone());
            }
        }
        self.tables.sort();
        self.tables.dedup();
        self.functions.sort();
        self.functions.dedup();
        self.body_functions.sort();
        self.body_functions.dedup();
        self.body_tables.sort();
        self.body_tables.dedup();
        self.schemas.sort();
        self.schemas.dedup();
        if self.classes.is_empty() {
            self.classes.insert(StatementClass::Unknown);
        }
    }
}

/// What a PREPARE or DEALLOCATE does to the session's SQL-level prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedOp {
    /// `PREPARE name AS …` (name as Postgres folds it).
    Prepare(String),
    /// `DEALLOCATE name`.
    Deallocate(String),
    /// `DEALLOCATE ALL`.
    DeallocateAll,
}


/// The last two parts of a name list, lowercased (matching is case-insensitive).
fn qname(parts: &[String]) -> Option<QName> {
    match parts {
        [] => None,
        [name] => Some(QName::new(None, name.to_lowercase())),
        [.., schema, name] => Some(QName::new(Some(schema.to_lowercase()), name.to_lowercase())),
    }
}

/// The value of a constant node, lowercased, as text (`'on'`, `1`, `true`); reading it makes
/// the analysis literal-dependent (`dep`).
fn const_value(v: &Value, dep: &mut bool) -> Option<String> {
    let c = node(v, "A_Const")?;
    *dep = true;
    if let Some(s) = c.get("sval") {
        return Some(s.get("sval").and_then(Value::as_str).unwrap_or("").to_lowercase());
    }
    if let Some(i) = c.get("ival") {
        return Some(i.get("ival").and_then(Value::as_i64).unwrap_or(0).to_string());
    }
    if let Some(f) = c.get("fval") {
        return f.get("fval").and_then(Value::as_str).map(str::to_string);
    }
    if let Some(b) = c.get("boolval") {
        return Some(b.get("boolval").and_then(Value::as_bool).unwrap_or(false).to_string());
    }
    None
}

/// A JSON value with every `location` removed: two expressions written the same way at
/// different places compare equal.
fn without_locations(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| k.as_str() != "location").map(|(k, v)| (k.clone(), without_locations(v))).collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_locations).collect()),
        other => other.clone(),
    }
}

fn has_const(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.contains_key("A_Const") || m.values().any(has_const),
        Value::Array(a) => a.iter().any(has_const),
        _ => false,
    }
}

/// A WHERE clause that does not restrict anything: TRUE, `x = x`, `… OR TRUE`, NOT FALSE.
/// When both sides of `x = x` hold constants the answer depends on their values (`dep`); a
/// side with a constant is never the same expression as a side without one.
fn trivially_true(e: &Value, dep: &mut bool) -> bool {
    if let Some(c) = node(e, "A_Const") {
        return c.get("boolval").and_then(|b| b.get("boolval")).and_then(Value::as_bool) == Some(true);
    }
    if let Some(b) = node(e, "BoolExpr") {
        let args: Vec<&Value> = b.get("args").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default();
        // Every argument is looked at (no short circuit): whether the analysis depended on a
        // constant must not depend on the order of evaluation.
        let vals: Vec<bool> = args.iter().map(|a| trivially_true(a, dep)).collect();
        return match str_field(b, "boolop") {
            Some("OR_EXPR") => vals.iter().any(|v| *v),
            Some("AND_EXPR") => !vals.is_empty() && vals.iter().all(|v| *v),
            Some("NOT_EXPR") => args.first().is_some_and(|a| {
                node(a, "A_Const").and_then(|c| c.get("boolval")).is_some_and(|b| b.get("boolval").is_none())
            }),
            _ => false,
        };
    }
    if let Some(a) = node(e, "A_Expr")
        && str_field(a, "kind") == Some("AEXPR_OP")
        && name_list(a.get("name")).last().map(String::as_str) == Some("=")
    {
        let (Some(l), Some(r)) = (a.get("lexpr"), a.get("rexpr")) else { return false };
        return match (has_const(l), has_const(r)) {
            (false, false) => without_locations(l) == without_locations(r),
            (true, true) => {
                *dep = true;
                without_locations(l) == without_locations(r)
            }
            _ => false,
        };
    }
    false
}

fn no_where(body: &Map<String, Value>, dep: &mut bool) -> bool {
    body.get("whereClause").is_none_or(|w| trivially_true(w, dep))
}

/// Node fields that hold a possibly qualified name of something other than a relation, as a
/// list of strings: FuncCall and CREATE FUNCTION (`funcname`), TypeName (`names`), an
/// operator in A_Expr (`name`) or a subquery comparison (`operName`), ObjectWithArgs
/// (`objname`), CREATE OPERATOR/AGGREGATE/… (`defnames`), COLLATE (`collname`).
const NAME_LIST_FIELDS: &[&str] = &["funcname", "names", "name", "operName", "objname", "defnames", "collname"];

/// Node fields that hold a statement in a statement's place (EXPLAIN, PREPARE, COPY, DECLARE,
/// CREATE TABLE AS / VIEW, WITH): a SELECT there is read as a statement of its own.
const STATEMENT_FIELDS: &[&str] = &["stmt", "query", "ctequery"];

/// The walk over one statement's tree: every node in every position is visited, and
/// relations, function calls, setting changes and nested statements are collected.
struct Walker<'a> {
    info: &'a mut StatementInfo,
}

impl Walker<'_> {
    fn value(&mut self, v: &Value, field: Option<&str>) {
        match v {
            Value::Object(m) => self.object(m, field),
            Value::Array(a) => a.iter().for_each(|x| self.value(x, field)),
            _ => {}
        }
    }

    fn object(&mut self, m: &Map<String, Value>, field: Option<&str>) {
        let body = match wrapped(m) {
            Some((ty, body)) => {
                self.typed(ty, body, field);
                body
            }
            None => m,
        };
        self.shape(body, field);
        for (k, v) in body {
            self.value(v, Some(k.as_str()));
        }
    }

    /// Nodes recognized by their fields (also where the tree holds them without a type
    /// wrapper): relations, function calls, setting changes.
    fn shape(&mut self, b: &Map<String, Value>, field: Option<&str>) {
        if let Some(rel) = str_field(b, "relname") {
            let schema = str_field(b, "schemaname").map(str::to_lowercase);
            self.info.tables.push(QName::new(schema, rel.to_lowercase()));
        }
        if b.contains_key("funcname") {
            let parts = name_list(b.get("funcname"));
            if let Some(q) = qname(&parts) {
                if q.name == "set_config" {
                    self.info.modifiers |= set_config_call(b, &mut self.info.literal_dependent);
                }
                if runs_sql_text(&q) {
                    self.scan_sql_text_args(b);
                }
                if writes::writes(&q.name) {
                    self.info.classes.insert(StatementClass::Write);
                }
                self.info.functions.push(q);
            }
        }
        if str_field(b, "kind").is_some_and(|k| k.starts_with("VAR_")) {
            self.setting(b, field);
        }
        self.qualified_names(b);
    }

    /// The schemas of qualified names other than relations': functions called or defined,
    /// operators (`OPERATOR(hr.+)`), types, collations and objects named by signature (`DROP
    /// FUNCTION hr.f(int)`). `pg_catalog` is left out: the grammar writes it into SQL-standard
    /// syntax (`CAST(x AS int)` is `pg_catalog.int4`, `EXTRACT` is `pg_catalog.extract`).
    fn qualified_names(&mut self, b: &Map<String, Value>) {
        for key in NAME_LIST_FIELDS {
            let Some(Value::Array(parts)) = b.get(*key) else { continue };
            let parts = names(parts);
            if let [.., schema, _] = parts.as_slice() {
                let schema = schema.to_lowercase();
                if schema != "pg_catalog" {
                    self.info.schemas.push(schema);
                }
            }
        }
    }

    /// A call of a built-in that runs SQL given to it as text: its string-constant arguments
    /// are read as SQL, as a DO body's constant `EXECUTE` is — an identity change there is
    /// one here, whoever may call the function. (Arguments built at run time are what the
    /// `@dynamic_sql` class is for.)
    fn scan_sql_text_args(&mut self, call: &Map<String, Value>) {
        for arg in list(call, "args") {
            let text = node(arg, "A_Const").and_then(|c| c.get("sval")).and_then(|s| s.get("sval")).and_then(Value::as_str);
            if let Some(text) = text {
                self.info.literal_dependent = true;
                let f = lexical::scan(text);
                self.info.modifiers |= f.modifiers;
                self.info.body_functions.extend(f.functions);
            }
        }
    }

    fn typed(&mut self, ty: &str, b: &Map<String, Value>, field: Option<&str>) {
        classify(ty, b, field, self.info);
        // Functions bound for later implicit calls count as called by this statement; bound
        // set_config is an identity change (whatever it will be called with).
        for q in bound::functions(ty, b).iter().filter_map(|p| qname(p)) {
            if q.name == "set_config" {
                self.info.modifiers.insert(Modifier::IdentityChange);
            }
            self.info.functions.push(q);
        }
    }

    /// A VariableSetStmt: as a statement (SET/RESET) or inside another (ALTER ROLE … SET,
    /// ALTER SYSTEM, a function's SET clause).
    fn setting(&mut self, b: &Map<String, Value>, field: Option<&str>) {
        let name = str_field(b, "name").unwrap_or("").to_lowercase();
        let kind = str_field(b, "kind").unwrap_or("");
        let args = list(b, "args");
        let info = &mut *self.info;
        let value = match kind {
            "VAR_SET_DEFAULT" | "VAR_RESET" => Some("default".to_string()),
            "VAR_SET_VALUE" if args.len() == 1 => const_value(&args[0], &mut info.literal_dependent),
            _ => None,
        };
        match kind {
            // SET TRANSACTION …, SET SESSION CHARACTERISTICS …; RESET ALL (which leaves role
            // and session_authorization alone and restores the startup lexical settings).
            "VAR_SET_MULTI" | "VAR_RESET_ALL" => {}
            _ => info.modifiers |= setting_change(&name, value.as_deref()),
        }
        if field.is_some() && field != Some("stmt") {
            return;
        }
        let multi = kind == "VAR_SET_MULTI";
        info.classes.insert(if multi && name != "session characteristics" {
            StatementClass::Transaction
        } else {
            StatementClass::Session
        });
        let command = match (kind, name.as_str()) {
            ("VAR_SET_MULTI", "transaction") => "set transaction",
            ("VAR_SET_MULTI", _) => "set session characteristics",
            ("VAR_RESET" | "VAR_RESET_ALL", _) => "reset",
            (_, "role") => "set role",
            (_, "session_authorization") => "set session authorization",
            _ => "set",
        };
        info.add_command(command);
    }
}

/// set_config(name, value, is_local), in any position: a constant name is checked like SET; a
/// computed one (or named or variadic arguments) could be 'role', so it counts as an identity
/// change. Reading the constants sets `dep`.
fn set_config_call(call: &Map<String, Value>, dep: &mut bool) -> ModSet {
    let mut unknown = ModSet::default();
    unknown.insert(Modifier::IdentityChange);
    let args = list(call, "args");
    if call.get("func_variadic").and_then(Value::as_bool) == Some(true) || args.iter().any(|a| a.get("NamedArgExpr").is_some())
    {
        return unknown;
    }
    let Some(name) = args.first().and_then(|a| node(a, "A_Const")).and_then(|c| c.get("sval")) else {
        return unknown;
    };
    *dep = true;
    let name = name.get("sval").and_then(Value::as_str).unwrap_or("").to_lowercase();
    let value = args.get(1).and_then(|v| const_value(v, dep));
    setting_change(name.trim(), value.as_deref())
}

/// Words of a statement text (comments and whitespace skipped), lowercased, up to `n`, with
/// the modifiers between CREATE and the object's kind left out (`create or replace temp view`
/// → `create view`).
fn leading_words(text: &str, n: usize) -> String {
    let mut words: Vec<String> = Vec::new();
    for w in lexical::lex(text) {
        let lexical::Lex::Word(w) = w else { break };
        let skip = matches!(w.as_str(), "or" | "replace" | "temporary" | "temp" | "unique" | "unlogged" | "global" | "local" | "trusted" | "procedural" | "recursive" | "default" | "constraint");
        if skip && !words.is_empty() {
            continue;
        }
        words.push(w);
        if words.len() == n {
            break;
        }
    }
    words.join(" ")
}

fn object_kind(objtype: Option<&str>) -> String {
    let t = objtype.unwrap_or("OBJECT_UNKNOWN").trim_start_matches("OBJECT_").to_ascii_lowercase();
    match t.as_str() {
        "matview" => "materialized view".into(),
        "foreign_table" => "foreign table".into(),
        "fdw" => "foreign data wrapper".into(),
        "foreign_server" => "server".into(),
        "tsconfiguration" => "text search configuration".into(),
        "tsdictionary" => "text search dictionary".into(),
        "tsparser" => "text search parser".into(),
        "tstemplate" => "text search template".into(),
        "event_trigger" => "event trigger".into(),
        "opclass" => "operator class".into(),
        "opfamily" => "operator family".into(),
        "largeobject" => "large object".into(),
        "statistic_ext" => "statistics".into(),
        other => other.replace('_', " "),
    }
}

/// Statements whose class and command follow from their node type alone.
const SIMPLE_STATEMENTS: &[(&str, StatementClass, &str)] = &[
    ("LockStmt", StatementClass::Write, "lock"),
    ("NotifyStmt", StatementClass::Write, "notify"),
    ("RefreshMatViewStmt", StatementClass::Write, "refresh materialized view"),
    ("ListenStmt", StatementClass::Session, "listen"),
    ("UnlistenStmt", StatementClass::Session, "unlisten"),
    ("VariableShowStmt", StatementClass::Session, "show"),
    ("ClosePortalStmt", StatementClass::Session, "close"),
    ("CallStmt", StatementClass::Procedural, "call"),
    ("CreateStmt", StatementClass::Ddl, "create table"),
    ("ViewStmt", StatementClass::Ddl, "create view"),
];

/// A node's own contribution when it is a statement (nested statements are classified when
/// the walk reaches them). `field`: where it stands in its parent (None: the root).
fn classify(ty: &str, b: &Map<String, Value>, field: Option<&str>, info: &mut StatementInfo) {
    use StatementClass::*;
    // In a statement's place, not a subquery.
    let top = field.is_none_or(|f| STATEMENT_FIELDS.contains(&f));
    match ty {
        "SelectStmt" => classify_select(b, top, info),
        "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => classify_dml(ty, b, field, info),
        "CommonTableExpr" => {}
        "TruncateStmt" => {
            info.classes.insert(Write);
            info.add_command("truncate");
            info.modifiers.insert(Modifier::NoWhere);
        }
        "CopyStmt" => classify_copy(b, info),
        "DiscardStmt" => {
            info.classes.insert(Session);
            info.add_command("discard");
            if str_field(b, "target") == Some("DISCARD_ALL") {
                // DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT.
                info.modifiers.insert(Modifier::IdentityChange);
            }
        }
        "DeallocateStmt" | "PrepareStmt" | "ExecuteStmt" => classify_prepared(ty, b, info),
        "TransactionStmt" => classify_transaction(b, info),
        "DeclareCursorStmt" | "FetchStmt" => {
            info.classes.insert(Read);
            let mv = b.get("ismove").and_then(Value::as_bool) == Some(true);
            info.add_command(if ty == "FetchStmt" { if mv { "move" } else { "fetch" } } else { "declare" });
        }
        "ExplainStmt" => info.add_command("explain"),
        simple if let Some((_, class, command)) = SIMPLE_STATEMENTS.iter().find(|(t, _, _)| *t == simple) => {
            info.classes.insert(*class);
            info.add_command(*command);
        }
        "DoStmt" | "CreateFunctionStmt" => classify_procedural(ty, b, info),
        "VacuumStmt" | "CheckPointStmt" | "LoadStmt" | "ClusterStmt" | "ReindexStmt" | "AlterSystemStmt" => {
            classify_admin(ty, b, info)
        }
        "GrantStmt" | "GrantRoleStmt" | "CreateRoleStmt" | "AlterRoleStmt" | "AlterRoleSetStmt" | "DropRoleStmt"
        | "AlterDefaultPrivilegesStmt" | "CreatePolicyStmt" | "AlterPolicyStmt" | "ReassignOwnedStmt"
        | "DropOwnedStmt" => classify_dcl(ty, b, info),
        "DropStmt" => classify_drop(b, info),
        "CreateSchemaStmt" | "CreateTableAsStmt" | "CommentStmt" | "SecLabelStmt" | "CreatedbStmt" | "DropdbStmt"
        | "AlterDatabaseStmt" | "AlterDatabaseSetStmt" | "AlterDatabaseRefreshCollStmt" => classify_ddl(ty, b, info),
        "RenameStmt" | "AlterObjectSchemaStmt" | "AlterOwnerStmt" => classify_alter_object(b, info),
        other if other.ends_with("Stmt") && other != "RawStmt" && other != "VariableSetStmt" => classify_other(info),
        _ => {}
    }
}

/// PREPARE, EXECUTE and DEALLOCATE: what the session must remember about named statements.
/// (Any other type: [`classify_other`].)
fn classify_prepared(ty: &str, b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    match ty {
        "DeallocateStmt" => {
            info.classes.insert(Session);
            info.add_command("deallocate");
            info.prepared = Some(match str_field(b, "name") {
                Some(n) => PreparedOp::Deallocate(n.to_string()),
                None => PreparedOp::DeallocateAll,
            });
        }
        "PrepareStmt" => {
            info.add_command("prepare");
            // The session keeps this statement's text to decide a later EXECUTE.
            info.literal_dependent = true;
            info.prepared = Some(PreparedOp::Prepare(str_field(b, "name").unwrap_or("").to_string()));
        }
        "ExecuteStmt" => {
            // The walk classifies a node before its children: what is recorded so far is
            // the wrapping statement's own doing.
            info.execute_wrapper = (info.classes, info.commands.clone());
            info.add_command("execute");
            // Until the session tells us what it runs: a write.
            info.classes.insert(Write);
            info.modifiers.insert(Modifier::UnknownPrepared);
            info.execute = Some(str_field(b, "name").unwrap_or("").to_string());
        }
        _ => classify_other(info),
    }
}

/// DO blocks and CREATE FUNCTION/PROCEDURE, whose string bodies are scanned.
/// (Any other type: [`classify_other`].)
fn classify_procedural(ty: &str, b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    match ty {
        "DoStmt" => {
            info.classes.insert(Procedural);
            info.add_command("do");
            scan_bodies(b, info);
        }
        "CreateFunctionStmt" => {
            info.classes.insert(Ddl);
            let proc = b.get("is_procedure").and_then(Value::as_bool) == Some(true);
            info.add_command(if proc { "create procedure" } else { "create function" });
            // Bodies given as strings are opaque to the parser: scan them.
            scan_bodies(b, info);
        }
        _ => classify_other(info),
    }
}

/// Maintenance and server administration: VACUUM/ANALYZE, CHECKPOINT, LOAD, CLUSTER, REINDEX,
/// ALTER SYSTEM. (Any other type: [`classify_other`].)
fn classify_admin(ty: &str, b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    match ty {
        "VacuumStmt" => {
            info.classes.insert(Admin);
            let vacuum = b.get("is_vacuumcmd").and_then(Value::as_bool) == Some(true);
            info.add_command(if vacuum { "vacuum" } else { "analyze" });
        }
        "CheckPointStmt" | "LoadStmt" | "ClusterStmt" | "ReindexStmt" | "AlterSystemStmt" => {
            info.classes.insert(Admin);
            info.add_leading_words(if ty == "AlterSystemStmt" { 2 } else { 1 });
        }
        _ => classify_other(info),
    }
}

/// Privileges, roles and row policies. (Any other type: [`classify_other`].)
fn classify_dcl(ty: &str, b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    match ty {
        "GrantStmt" | "GrantRoleStmt" => {
            info.classes.insert(Dcl);
            let grant = b.get("is_grant").and_then(Value::as_bool) == Some(true);
            info.add_command(if grant { "grant" } else { "revoke" });
            // GRANT … ON ALL TABLES IN SCHEMA hr: the objects are schema names.
            if str_field(b, "targtype") == Some("ACL_TARGET_ALL_IN_SCHEMA") {
                info.schemas.extend(names(list(b, "objects")).into_iter().map(|s| s.to_lowercase()));
            }
        }
        "AlterDefaultPrivilegesStmt" => {
            info.classes.insert(Dcl);
            info.add_leading_words(2);
            // ALTER DEFAULT PRIVILEGES IN SCHEMA hr …
            for opt in list(b, "options").iter().filter_map(|o| node(o, "DefElem")) {
                if str_field(opt, "defname") == Some("schemas") {
                    let items = opt.get("arg").and_then(|a| node(a, "List")).map(|l| name_list(l.get("items")));
                    info.schemas.extend(items.unwrap_or_default().into_iter().map(|s| s.to_lowercase()));
                }
            }
        }
        "CreateRoleStmt" | "AlterRoleStmt" | "AlterRoleSetStmt" | "DropRoleStmt"
        | "CreatePolicyStmt" | "AlterPolicyStmt" | "ReassignOwnedStmt" | "DropOwnedStmt" => {
            info.classes.insert(Dcl);
            info.add_leading_words(2);
        }
        _ => classify_other(info),
    }
}

/// Schema, CREATE TABLE AS, comments and security labels, databases.
/// (Any other type: [`classify_other`].)
fn classify_ddl(ty: &str, b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    match ty {
        "CreateSchemaStmt" => {
            info.classes.insert(Ddl);
            info.add_command("create schema");
            if let Some(s) = str_field(b, "schemaname") {
                info.schemas.push(s.to_lowercase());
            }
        }
        "CreateTableAsStmt" => {
            info.classes.insert(Ddl);
            info.classes.insert(Write);
            let matview = str_field(b, "objtype") == Some("OBJECT_MATVIEW");
            info.add_command(if matview { "create materialized view" } else { "create table" });
        }
        "CommentStmt" | "SecLabelStmt" => {
            info.classes.insert(Ddl);
            info.add_leading_words(1);
        }
        "CreatedbStmt" | "DropdbStmt" | "AlterDatabaseStmt" | "AlterDatabaseSetStmt" | "AlterDatabaseRefreshCollStmt" => {
            info.classes.insert(Ddl);
            info.add_leading_words(2);
        }
        _ => classify_other(info),
    }
}

/// SELECT: FOR UPDATE/SHARE writes (locks rows), SELECT … INTO creates a table; in a
/// statement's place (`top`) it reads.
fn classify_select(b: &Map<String, Value>, top: bool, info: &mut StatementInfo) {
    use StatementClass::*;
    if b.get("lockingClause").is_some_and(|l| l.as_array().is_some_and(|a| !a.is_empty())) {
        info.classes.insert(Write);
        info.modifiers.insert(Modifier::ForUpdate);
    }
    if b.contains_key("intoClause") {
        // SELECT … INTO t creates and fills a table: a `create table` as CREATE TABLE AS is.
        info.classes.insert(Ddl);
        info.classes.insert(Write);
        info.add_command("select into");
        info.add_command("create table");
    }
    if top {
        info.classes.insert(Read);
        info.add_command("select");
    }
}

/// INSERT, UPDATE, DELETE, MERGE: writes; UPDATE/DELETE without WHERE and writes in a CTE
/// are modifiers.
fn classify_dml(ty: &str, b: &Map<String, Value>, field: Option<&str>, info: &mut StatementInfo) {
    info.classes.insert(StatementClass::Write);
    let cmd = ty.trim_end_matches("Stmt").to_ascii_lowercase();
    if matches!(ty, "UpdateStmt" | "DeleteStmt") && no_where(b, &mut info.literal_dependent) {
        info.modifiers.insert(Modifier::NoWhere);
    }
    if field == Some("ctequery") {
        info.modifiers.insert(Modifier::CteWrite);
    }
    info.add_command(cmd);
}

/// COPY FROM writes, COPY TO reads; to or from a file or program on the server it is admin.
fn classify_copy(b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    info.add_command("copy");
    let from = b.get("is_from").and_then(Value::as_bool) == Some(true);
    info.classes.insert(if from { Write } else { Read });
    if b.contains_key("filename") {
        info.classes.insert(Admin);
        let program = b.get("is_program").and_then(Value::as_bool) == Some(true);
        info.modifiers.insert(if program { Modifier::CopyProgram } else { Modifier::CopyFile });
    }
}

/// BEGIN, COMMIT, … and the two-phase commit statements.
fn classify_transaction(b: &Map<String, Value>, info: &mut StatementInfo) {
    info.classes.insert(StatementClass::Transaction);
    let cmd = match str_field(b, "kind") {
        Some("TRANS_STMT_PREPARE") => "prepare transaction".to_string(),
        Some("TRANS_STMT_COMMIT_PREPARED") => "commit prepared".to_string(),
        Some("TRANS_STMT_ROLLBACK_PREPARED") => "rollback prepared".to_string(),
        _ => leading_words(&info.text, 1),
    };
    info.add_command(cmd);
}

/// DROP: DDL (DROP POLICY: DCL), with the schemas or tables it drops.
fn classify_drop(b: &Map<String, Value>, info: &mut StatementInfo) {
    use StatementClass::*;
    let kind = object_kind(str_field(b, "removeType"));
    info.add_command(format!("drop {kind}"));
    match kind.as_str() {
        "policy" => info.classes.insert(Dcl),
        "schema" => {
            info.classes.insert(Ddl);
            // DROP SCHEMA's objects are name lists of one part.
            for o in list(b, "objects") {
                if let Some(s) = node(o, "String").and_then(|s| str_field(s, "sval")) {
                    info.schemas.push(s.to_lowercase());
                }
            }
        }
        "table" | "view" | "materialized view" | "index" | "sequence" | "foreign table" => {
            info.classes.insert(Ddl);
            for o in list(b, "objects") {
                if let Some(q) = node(o, "List").and_then(|l| qname(&name_list(l.get("items")))) {
                    info.tables.push(q);
                }
            }
        }
        _ => info.classes.insert(Ddl),
    }
}

/// ALTER … RENAME / SET SCHEMA / OWNER TO: DDL, with the schema a schema rename touches.
fn classify_alter_object(b: &Map<String, Value>, info: &mut StatementInfo) {
    info.classes.insert(StatementClass::Ddl);
    let kind = object_kind(str_field(b, "renameType").or(str_field(b, "objectType")));
    info.add_command(format!("alter {kind}"));
    if str_field(b, "renameType") == Some("OBJECT_SCHEMA")
        && let Some(s) = str_field(b, "subname")
    {
        info.schemas.push(s.to_lowercase());
    }
}

/// Any other statement: DDL if its first words say create/alter/drop/import, else admin.
fn classify_other(info: &mut StatementInfo) {
    let cmd = leading_words(&info.text, 2);
    if cmd.starts_with("create ") || cmd.starts_with("alter ") || cmd.starts_with("drop ") || cmd.starts_with("import ") {
        info.classes.insert(StatementClass::Ddl);
    } else {
        info.classes.insert(StatementClass::Admin);
    }
    info.add_command(cmd);
}

/// Built-in functions that execute SQL text passed as an argument (the `query_to_xml` family,
/// `ts_stat`, `ts_rewrite`, tablefunc's `crosstab`/`connectby`, dblink), by name in any schema
/// (a function of another schema with such a name has its text arguments read too).
fn runs_sql_text(q: &QName) -> bool {
    const NAMES: &[&str] = &["query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema", "ts_stat", "ts_rewrite"];
    const PREFIXES: &[&str] = &["crosstab", "connectby", "dblink"];
    NAMES.contains(&q.name.as_str()) || PREFIXES.iter().any(|p| q.name.starts_with(p))
}

/// Scan the string bodies of a DO block or a function (`AS '…'`) for what they call: they
/// are opaque to the parser (PL/pgSQL, or SQL run later).
fn scan_bodies(b: &Map<String, Value>, info: &mut StatementInfo) {
    let key = if b.contains_key("args") { "args" } else { "options" };
    for opt in list(b, key) {
        let Some(d) = node(opt, "DefElem") else { continue };
        if str_field(d, "defname") != Some("as") {
            continue;
        }
        info.literal_dependent = true;
        let bodies: Vec<String> = match d.get("arg") {
            Some(a) => match node(a, "String") {
                Some(s) => str_field(s, "sval").map(str::to_string).into_iter().collect(),
                None => node(a, "List").map(|l| name_list(l.get("items"))).unwrap_or_default(),
            },
            None => Vec::new(),
        };
        for body in &bodies {
            let f = lexical::scan(body);
            info.modifiers |= f.modifiers;
            info.body_functions.extend(f.functions);
            info.body_tables.extend(f.names.into_iter().map(|q| QName::new(q.schema.map(|s| s.to_lowercase()), q.name.to_lowercase())));
        }
    }
}

/// A statement pgward could not parse — Postgres rejects it too (same parser), or it is over
/// pgward's depth bound. What is known comes from a lexical scan (for rules and the audit
/// log); its class comes from the leading words. `DO` is never here (it parses).
fn analyze_lexically(text: &str) -> StatementInfo {
    let f = lexical::scan(text);
    let (classes, command) = lexical::guess_classes(&f.lead, &f);
    let mut info = StatementInfo {
        text: text.trim().to_string(),
        classes,
        commands: vec![command],
        modifiers: f.modifiers,
        functions: f.functions,
        unparsable: true,
        // The scan reads string contents and the text as written.
        literal_dependent: true,
        ..Default::default()
    };
    // Any word might be a table: deny rules on tables still see them.
    info.tables = f.names;
    info.modifiers.insert(Modifier::Unparsable);
    if info.commands[0] == "copy" && info.tables.iter().any(|t| t.name == "program") {
        info.modifiers.insert(Modifier::CopyProgram);
    }
    info.finish();
    info
}

/// A text over [`limits::MAX_PARSE_BYTES`]: neither parsed nor scanned, denied by the policy
/// as `builtin:too-large`. Its `text` is the first 256 bytes.
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

/// The text of one raw statement: `stmt_location`/`stmt_len` are byte offsets (a length of 0
/// runs to the end of the string).
fn statement_text<'a>(sql: &'a str, raw: &Value) -> &'a str {
    let at = |k: &str| raw.get(k).and_then(Value::as_u64).and_then(|v| usize::try_from(v).ok()).unwrap_or(0);
    let (start, len) = (at("stmt_location"), at("stmt_len"));
    let end = if len == 0 { sql.len() } else { start.saturating_add(len).min(sql.len()) };
    sql.get(start..end).unwrap_or(sql).trim()
}

/// [`analyze_sql`], and whether the analysis holds for every text with the same
/// literal-normalized key as `sql` (`norm`, computed from `sql`): true only when no
/// statement's analysis read a constant's value (`literal_dependent`), and every constant of
/// the text is a constant node of the tree where the lexer found it
/// ([`Normalized::covered_by`]). `norm` None: false.
pub(crate) fn analyze_sql_with(sql: &str, norm: Option<&Normalized>) -> (Vec<StatementInfo>, bool) {
    if sql.len() > limits::MAX_PARSE_BYTES {
        return (vec![too_large(sql)], false);
    }
    let tree = match pgparse::parse(sql) {
        Ok(t) => t,
        // Postgres rejects the text too (same parser), or it is over pgward's bounds.
        Err(_) => {
            let out = if sql.trim().is_empty() { Vec::new() } else { vec![analyze_lexically(sql)] };
            return (out, false);
        }
    };
    let raws = raw_stmts(&tree);
    let mut out = Vec::with_capacity(raws.len());
    for raw in raws {
        let mut info = StatementInfo { text: statement_text(sql, raw).to_string(), ..Default::default() };
        if let Some(stmt) = raw.get("stmt") {
            Walker { info: &mut info }.value(stmt, None);
        }
        info.finish();
        out.push(info);
    }
    if out.len() > 1 {
        for s in &mut out {
            s.modifiers.insert(Modifier::MultiStatement);
        }
    }
    let shareable = norm.is_some_and(|n| {
        let mut consts = Vec::new();
        const_locations(&tree, &mut consts);
        out.iter().all(|i| !i.literal_dependent) && n.covered_by(&consts)
    });
    (out, shareable)
}
