//! Function classes from the catalog: what a function can do, read from `pg_proc` of the
//! session's database rather than from hand-kept lists, so policy rules can name what matters
//! (`functions = ["@outside", "@dynamic_sql"]`) and new or renamed functions are covered.
//!
//! | class | a function is in it when |
//! |---|---|
//! | `@volatile` | `pg_proc.provolatile = 'v'` (it may change the database or return different results for the same arguments) |
//! | `@security_definer` | `pg_proc.prosecdef` (it runs with its owner's privileges) |
//! | `@dynamic_sql` | it executes SQL given to it as text: PL/pgSQL with `EXECUTE`, the built-in `query_to_xml` family, `ts_stat`, `ts_rewrite(…, text)`, tablefunc's `crosstab`/`connectby`, dblink |
//! | `@outside` | it reaches outside the database: server files (`pg_read_file`, `pg_ls_dir` …), large objects (`lo_*`), adminpack, dblink and postgres_fdw (network), any function in an untrusted procedural language (plpython3u, plperlu …) |
//!
//! A function pgward does not find in the snapshot (created since, or not visible to the
//! service role) is in every class: rules that deny a class deny it (fail closed) until the
//! snapshot is reloaded. An unqualified name has the classes of every function of that name
//! in any schema.

use std::collections::HashMap;

use super::QName;

pub const VOLATILE: u8 = 1;
pub const SECURITY_DEFINER: u8 = 2;
pub const DYNAMIC_SQL: u8 = 4;
pub const OUTSIDE: u8 = 8;
pub const ALL: u8 = VOLATILE | SECURITY_DEFINER | DYNAMIC_SQL | OUTSIDE;

/// Names of the classes as policy rules write them (`@name`).
pub const CLASS_NAMES: &[(&str, u8)] =
    &[("volatile", VOLATILE), ("security_definer", SECURITY_DEFINER), ("dynamic_sql", DYNAMIC_SQL), ("outside", OUTSIDE)];

/// The catalog query: one row per function, with what [`ProcRow`] needs. Bodies are not
/// fetched; whether a PL/pgSQL body runs `EXECUTE` is answered by the server.
pub const CATALOG_SQL: &str = "SELECT n.nspname, p.proname, p.provolatile, p.prosecdef, l.lanname, l.lanpltrusted, \
     p.probin, CASE WHEN l.lanname IN ('internal', 'c') THEN p.prosrc END, \
     (l.lanname = 'plpgsql' AND p.prosrc ~* '\\mexecute\\M') \
     FROM pg_catalog.pg_proc p \
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     JOIN pg_catalog.pg_language l ON l.oid = p.prolang";

/// One `pg_proc` row, as [`CATALOG_SQL`] returns it.
#[derive(Debug, Clone, Default)]
pub struct ProcRow {
    pub schema: String,
    pub name: String,
    pub volatility: char,
    pub security_definer: bool,
    pub language: String,
    pub language_trusted: bool,
    /// `probin`: the shared library of a C function (`$libdir/dblink`).
    pub library: Option<String>,
    /// `prosrc` of an internal or C function: its C symbol.
    pub symbol: Option<String>,
    /// A PL/pgSQL body that contains `EXECUTE`.
    pub executes: bool,
}

impl ProcRow {
    /// From a text-format row of [`CATALOG_SQL`].
    pub fn from_text(row: &[Option<String>]) -> Option<ProcRow> {
        let s = |i: usize| row.get(i).cloned().flatten();
        let b = |i: usize| s(i).as_deref() == Some("t");
        Some(ProcRow {
            schema: s(0)?,
            name: s(1)?,
            volatility: s(2)?.chars().next()?,
            security_definer: b(3),
            language: s(4)?,
            language_trusted: b(5),
            library: s(6).filter(|l| !l.is_empty() && l != "-"),
            symbol: s(7),
            executes: b(8),
        })
    }
}

/// C symbols of built-in functions that run SQL given as text (or a cursor's query).
const DYNAMIC_SQL_SYMBOLS: &[&str] = &[
    "query_to_xml*",
    "cursor_to_xml*",
    "table_to_xml*",
    "schema_to_xml*",
    "database_to_xml*",
    "ts_stat*",
    "tsquery_rewrite_query",
    "crosstab*",
    "connectby*",
    "dblink*",
];

/// C symbols of built-in functions that reach server files or large objects.
const OUTSIDE_SYMBOLS: &[&str] =
    &["pg_read_file*", "pg_read_binary_file*", "pg_stat_file*", "pg_ls_*", "pg_logdir_ls*", "be_lo*", "lo_*", "pg_file_*"];

/// Shared libraries whose functions reach the network or the file system.
const OUTSIDE_LIBRARIES: &[&str] = &["dblink", "postgres_fdw", "adminpack", "file_fdw"];

/// The classes of one function.
pub fn classify(p: &ProcRow) -> u8 {
    let mut c = 0;
    if p.volatility == 'v' {
        c |= VOLATILE;
    }
    if p.security_definer {
        c |= SECURITY_DEFINER;
    }
    let native = matches!(p.language.as_str(), "internal" | "c");
    let symbol = p.symbol.as_deref().unwrap_or("");
    let library = p.library.as_deref().map(|l| l.rsplit('/').next().unwrap_or(l)).unwrap_or("");
    let any = |pats: &[&str], s: &str| pats.iter().any(|g| super::glob_match(g.as_bytes(), s.as_bytes()));
    if p.executes || (native && any(DYNAMIC_SQL_SYMBOLS, symbol)) {
        c |= DYNAMIC_SQL;
    }
    let untrusted_pl = !native && p.language != "sql" && !p.language_trusted;
    if untrusted_pl || (native && any(OUTSIDE_SYMBOLS, symbol)) || OUTSIDE_LIBRARIES.contains(&library) {
        c |= OUTSIDE;
    }
    c
}

/// The classes of every function of one database.
#[derive(Debug, Clone, Default)]
pub struct FunctionCatalog {
    /// name → (schema, classes) of each function of that name (overloads merged per schema).
    by_name: HashMap<String, Vec<(String, u8)>>,
}

impl FunctionCatalog {
    pub fn from_rows(rows: impl IntoIterator<Item = ProcRow>) -> FunctionCatalog {
        let mut by_name: HashMap<String, Vec<(String, u8)>> = HashMap::new();
        for r in rows {
            let c = classify(&r);
            let list = by_name.entry(r.name.to_lowercase()).or_default();
            let schema = r.schema.to_lowercase();
            match list.iter_mut().find(|(s, _)| *s == schema) {
                Some((_, bits)) => *bits |= c,
                None => list.push((schema, c)),
            }
        }
        FunctionCatalog { by_name }
    }

    /// The classes of a function named in a statement ([`ALL`] when it is not in the
    /// catalog).
    pub fn classes_of(&self, f: &QName) -> u8 {
        let Some(list) = self.by_name.get(&f.name) else { return ALL };
        let mut bits = 0;
        let mut found = false;
        for (schema, c) in list {
            if f.schema.as_ref().is_none_or(|s| s == schema) {
                bits |= c;
                found = true;
            }
        }
        if found { bits } else { ALL }
    }

    /// Whether the catalog has a function of this name (any schema).
    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Whether every function of this name is in `pg_catalog` (none in a schema someone can
    /// create functions in).
    pub fn only_builtin(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|l| l.iter().all(|(s, _)| s == "pg_catalog"))
    }

    /// From [`CATALOG_SQL`]'s output as `psql -At -F '<tab>'` prints it (NULL as empty).
    pub fn from_tsv(text: &str) -> Result<FunctionCatalog, String> {
        let mut rows = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let fields: Vec<Option<String>> = line.split('\t').map(|f| (!f.is_empty()).then(|| f.to_string())).collect();
            rows.push(ProcRow::from_text(&fields).ok_or_else(|| format!("line {}: not a pg_proc row", n + 1))?);
        }
        Ok(FunctionCatalog::from_rows(rows))
    }

    pub fn len(&self) -> usize {
        self.by_name.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(schema: &str, name: &str, vol: char, lang: &str, symbol: Option<&str>) -> ProcRow {
        ProcRow {
            schema: schema.into(),
            name: name.into(),
            volatility: vol,
            language: lang.into(),
            language_trusted: matches!(lang, "sql" | "plpgsql"),
            symbol: symbol.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn classes_table() {
        let cases: &[(ProcRow, u8)] = &[
            (row("pg_catalog", "lower", 'i', "internal", Some("lower")), 0),
            (row("pg_catalog", "random", 'v', "internal", Some("drandom")), VOLATILE),
            (row("pg_catalog", "pg_read_file", 'v', "internal", Some("pg_read_file_off_len")), VOLATILE | OUTSIDE),
            (row("pg_catalog", "lo_import", 'v', "internal", Some("be_lo_import")), VOLATILE | OUTSIDE),
            (row("pg_catalog", "query_to_xml", 's', "internal", Some("query_to_xml")), DYNAMIC_SQL),
            (row("pg_catalog", "ts_stat", 'v', "internal", Some("ts_stat1")), VOLATILE | DYNAMIC_SQL),
            (row("pg_catalog", "ts_rewrite", 'v', "internal", Some("tsquery_rewrite_query")), VOLATILE | DYNAMIC_SQL),
            (ProcRow { executes: true, ..row("public", "run", 'v', "plpgsql", None) }, VOLATILE | DYNAMIC_SQL),
            (ProcRow { security_definer: true, ..row("public", "f", 's', "sql", None) }, SECURITY_DEFINER),
            (row("public", "py", 'v', "plpython3u", None), VOLATILE | OUTSIDE),
            (
                ProcRow { library: Some("$libdir/dblink".into()), ..row("public", "dblink", 'v', "c", Some("dblink_record")) },
                VOLATILE | DYNAMIC_SQL | OUTSIDE,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(classify(r), *want, "{r:?}");
        }
    }

    #[test]
    fn lookup_by_name_schema_and_unknown() {
        let cat = FunctionCatalog::from_rows([
            row("pg_catalog", "lower", 'i', "internal", Some("lower")),
            row("public", "lower", 'v', "plpgsql", None),
            row("pg_catalog", "pg_read_file", 'v', "internal", Some("pg_read_file_off_len")),
        ]);
        let q = |s: Option<&str>, n: &str| QName::new(s.map(str::to_string), n.to_string());
        assert_eq!(cat.classes_of(&q(Some("pg_catalog"), "lower")), 0);
        assert_eq!(cat.classes_of(&q(None, "lower")), VOLATILE, "an unqualified name: any schema's");
        assert_eq!(cat.classes_of(&q(None, "pg_read_file")), VOLATILE | OUTSIDE);
        assert_eq!(cat.classes_of(&q(None, "made_up")), ALL);
        assert_eq!(cat.classes_of(&q(Some("other"), "lower")), ALL);
    }

    #[test]
    fn rows_from_text() {
        let t = |s: &str| Some(s.to_string());
        let r = ProcRow::from_text(&[t("pg_catalog"), t("lo_import"), t("v"), t("f"), t("internal"), t("f"), None, t("be_lo_import"), t("f")])
            .unwrap();
        assert_eq!(classify(&r), VOLATILE | OUTSIDE);
        assert!(ProcRow::from_text(&[None]).is_none());
    }
}
