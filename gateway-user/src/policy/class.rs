//! What a statement is, as the rules see it: its classes ([`StatementClass`], [`ClassSet`]),
//! its modifiers ([`Modifier`], [`ModSet`]) and the qualified names it touches ([`QName`]).
//! Both the parse-tree analysis (`analyze`) and the lexical scan (`lexical`)
//! produce them.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    /// VIEW, SELECT … FOR UPDATE/SHARE, data-modifying CTEs, EXECUTE of an unknown statement,
    /// calls of built-ins that write (`writes`).
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
    /// A statement pgward could not parse and whose leading word says nothing.
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
    /// The statement does not parse (Postgres rejects it too) or nests deeper than pgward
    /// reads; what is known comes from a lexical scan.
    Unparsable,
    /// EXECUTE of a prepared statement whose text the engine was not given.
    UnknownPrepared,
    /// A protocol-level function call (FunctionCall message): only the function's OID is known.
    Fastpath,
    /// The text is longer than pgward parses or scans (`limits::MAX_PARSE_BYTES`). Always
    /// denied (built-in).
    TooLarge,
    /// A DO block or function body that runs SQL text built at run time (`EXECUTE` of
    /// anything but a string constant): pgward cannot see what it will run.
    DynamicSql,
}

impl Modifier {
    pub const ALL: [Modifier; 14] = [
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
        Modifier::DynamicSql,
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
            Modifier::DynamicSql => "dynamic_sql",
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
}

impl fmt::Display for QName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}
