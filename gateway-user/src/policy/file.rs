//! The policy file format (TOML) and its compilation into rules. The format is documented in
//! `policies/README.md`; keep the two in step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::class::{ClassSet, ModSet, Modifier, StatementClass};
use super::window::{Window, WindowSpec};
use super::{Action, PolicyError};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub defaults: Option<DefaultsSpec>,
    #[serde(default)]
    pub function_sets: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub windows: BTreeMap<String, WindowSpec>,
    #[serde(default)]
    pub group: Vec<GroupSpec>,
    #[serde(default)]
    pub rule: Vec<RuleSpec>,
    /// `[[mask]]` rules: compiled by `crate::mask` (accepted, not interpreted, here).
    #[serde(default)]
    #[allow(dead_code)]
    pub mask: Vec<toml::Value>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct DefaultsSpec {
    #[serde(default)]
    pub action: Option<Action>,
    #[serde(default)]
    pub unparsable: Option<Action>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub search_path: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupSpec {
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub default: Option<Action>,
    #[serde(default)]
    pub unparsable: Option<Action>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleSpec {
    pub name: String,
    pub action: Action,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub except_users: Vec<String>,
    #[serde(default)]
    pub except_groups: Vec<String>,
    #[serde(default)]
    pub databases: Vec<String>,
    #[serde(default)]
    pub classes: Vec<StatementClass>,
    #[serde(default)]
    pub commands: Vec<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub schemas: Vec<String>,
    #[serde(default)]
    pub functions: Vec<String>,
    #[serde(default)]
    pub modifiers: Vec<Modifier>,
    #[serde(default)]
    pub during: Option<OneOrMany>,
    #[serde(default)]
    pub outside: Option<OneOrMany>,
}

/// Built-in function sets (`functions = ["@server_files"]`).
pub(crate) const BUILTIN_SETS: &[(&str, &[&str])] = &[
    (
        "server_files",
        &[
            "pg_read_file",
            "pg_read_binary_file",
            "pg_stat_file",
            "pg_ls_dir",
            "pg_ls_logdir",
            "pg_ls_waldir",
            "pg_ls_tmpdir",
            "pg_ls_archive_statusdir",
            "pg_ls_logicalsnapdir",
            "pg_ls_logicalmapdir",
            "pg_ls_replslotdir",
            "lo_import",
            "lo_export",
            "pg_file_write",
            "pg_file_rename",
            "pg_file_unlink",
            "pg_file_sync",
            "pg_logdir_ls",
        ],
    ),
    (
        "server_admin",
        &[
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_reload_conf",
            "pg_rotate_logfile",
            "pg_promote",
            "pg_switch_wal",
            "pg_create_restore_point",
            "pg_backup_start",
            "pg_backup_stop",
            "pg_start_backup",
            "pg_stop_backup",
            "pg_wal_replay_pause",
            "pg_wal_replay_resume",
            "pg_log_backend_memory_contexts",
            "pg_create_physical_replication_slot",
            "pg_create_logical_replication_slot",
            "pg_drop_replication_slot",
            "pg_logical_slot_get_changes",
            "pg_logical_slot_peek_changes",
            "pg_replication_origin_*",
        ],
    ),
    ("remote", &["dblink*", "postgres_fdw_*"]),
    (
        "dynamic_sql",
        &[
            "query_to_xml",
            "query_to_xml_and_xmlschema",
            "query_to_xmlschema",
            "cursor_to_xml",
            "cursor_to_xmlschema",
            "table_to_xml",
            "table_to_xml_and_xmlschema",
            "table_to_xmlschema",
            "schema_to_xml*",
            "database_to_xml*",
            "ts_stat",
            "ts_rewrite",
            "crosstab*",
            "connectby*",
            "dblink*",
        ],
    ),
    ("large_objects", &["lo_*", "loread", "lowrite"]),
    ("settings", &["set_config"]),
];

/// A glob: `*` matches any run of characters, `?` one character.
#[derive(Debug, Clone)]
pub(crate) struct Glob(String);

impl Glob {
    pub(crate) fn new(s: &str, lowercase: bool) -> Glob {
        Glob(if lowercase { s.trim().to_lowercase() } else { s.trim().to_string() })
    }
    pub(crate) fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }
    pub(crate) fn matches(&self, s: &str) -> bool {
        if self.is_literal() {
            return self.0 == s;
        }
        glob_match(self.0.as_bytes(), s.as_bytes())
    }
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

pub(crate) fn glob_match(p: &[u8], s: &[u8]) -> bool {
    // Iterative matcher with backtracking to the last '*'.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// `schema.name` or `name` pattern (tables, functions).
#[derive(Debug, Clone)]
pub(crate) struct NamePat {
    pub schema: Option<Glob>,
    pub name: Glob,
}

impl NamePat {
    fn parse(s: &str) -> Result<NamePat, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty name pattern".into());
        }
        let parts: Vec<&str> = s.split('.').collect();
        match parts.as_slice() {
            [n] => Ok(NamePat { schema: None, name: Glob::new(n, true) }),
            [sc, n] if !sc.is_empty() && !n.is_empty() => {
                Ok(NamePat { schema: Some(Glob::new(sc, true)), name: Glob::new(n, true) })
            }
            _ => Err(format!("{s:?} is not NAME or SCHEMA.NAME")),
        }
    }
}

impl std::fmt::Display for NamePat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{}.{}", s.as_str(), self.name.as_str()),
            None => f.write_str(self.name.as_str()),
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub name: String,
    pub action: Action,
    pub reason: String,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub except_users: Vec<String>,
    pub except_groups: Vec<String>,
    pub databases: Vec<Glob>,
    pub classes: ClassSet,
    pub commands: Vec<Glob>,
    pub tables: Vec<NamePat>,
    pub schemas: Vec<Glob>,
    pub functions: Vec<NamePat>,
    /// Catalog function classes (`@volatile`, …; deny rules only): a function in any of them
    /// matches like a listed name ([`super::functions`]).
    pub fn_classes: u8,
    pub modifiers: ModSet,
    /// Bit i = window i. Rule applies only inside one of `during` (if any) and outside all of
    /// `outside` (if any).
    pub during: u64,
    pub outside: u64,
    /// Source file, for messages.
    pub source: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub name: String,
    pub role: Option<String>,
    pub default: Option<Action>,
    pub unparsable: Option<Action>,
}

/// All files merged and compiled.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub rules: Vec<Rule>,
    pub groups: Vec<Group>,
    pub default_action: Action,
    pub default_unparsable: Option<Action>,
    pub default_role: Option<String>,
    pub search_path: Vec<String>,
    pub windows: Vec<(String, Window)>,
    pub sources: Vec<String>,
}

/// Names reserved for decisions that are not rules.
fn reserved_rule_name(n: &str) -> bool {
    let l = n.to_ascii_lowercase();
    l == "default"
        || l == "empty"
        || l.starts_with("default:")
        || l.starts_with("builtin:")
        || l.starts_with("unparsable")
}

pub(crate) fn parse_file(text: &str, source: &Path) -> Result<PolicyFile, PolicyError> {
    toml::from_str::<PolicyFile>(text).map_err(|e| PolicyError::Parse { path: source.to_owned(), msg: e.to_string() })
}

/// Merge files in order and compile. Later files override `[defaults]` fields, windows and
/// function sets of the same name, and group fields of the same group; rules are appended.
pub(crate) fn compile(files: Vec<(PathBuf, PolicyFile)>) -> Result<Compiled, PolicyError> {
    let Merged { defaults, sets, windows, groups, rules, sources, last_path } = merge(files)?;

    let default_action = defaults.action.ok_or_else(|| PolicyError::Invalid {
        path: last_path.clone(),
        msg: "no file sets [defaults] action = \"allow\" or \"deny\"".into(),
    })?;
    let win_list = compile_windows(&windows, last_path)?;
    check_function_sets(&sets)?;

    let mut seen = std::collections::HashSet::new();
    let mut compiled_rules = Vec::new();
    for (r, path) in rules {
        compiled_rules.push(compile_rule(&r, &path, &sets, &win_list, &mut seen)?);
    }

    let search_path = defaults
        .search_path
        .unwrap_or_else(|| vec!["public".into()])
        .into_iter()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .collect();

    Ok(Compiled {
        rules: compiled_rules,
        groups: groups
            .into_iter()
            .map(|(g, _)| Group { name: g.name, role: g.role, default: g.default, unparsable: g.unparsable })
            .collect(),
        default_action,
        default_unparsable: defaults.unparsable,
        default_role: defaults.role,
        search_path,
        windows: win_list,
        sources,
    })
}

/// The policy files merged, each item with the file it came from: later files override
/// defaults, function sets, windows and group settings; rules are kept in file order.
struct Merged {
    defaults: DefaultsSpec,
    sets: BTreeMap<String, (Vec<String>, PathBuf)>,
    windows: BTreeMap<String, (WindowSpec, PathBuf)>,
    groups: Vec<(GroupSpec, PathBuf)>,
    rules: Vec<(RuleSpec, PathBuf)>,
    sources: Vec<String>,
    /// The last file (errors about the merged whole name it).
    last_path: PathBuf,
}

fn merge(files: Vec<(PathBuf, PolicyFile)>) -> Result<Merged, PolicyError> {
    let mut m = Merged {
        defaults: DefaultsSpec::default(),
        sets: BTreeMap::new(),
        windows: BTreeMap::new(),
        groups: Vec::new(),
        rules: Vec::new(),
        sources: Vec::new(),
        last_path: PathBuf::from("<policy>"),
    };
    for (path, f) in files {
        let bad = |msg: String| PolicyError::Invalid { path: path.clone(), msg };
        if let Some(v) = f.version
            && v != 1
        {
            return Err(bad(format!("version = {v} is not supported (this pgward reads version 1)")));
        }
        if let Some(d) = f.defaults {
            if d.action.is_some() {
                m.defaults.action = d.action;
            }
            if d.unparsable.is_some() {
                m.defaults.unparsable = d.unparsable;
            }
            if d.role.is_some() {
                m.defaults.role = d.role;
            }
            if d.search_path.is_some() {
                m.defaults.search_path = d.search_path;
            }
        }
        for (k, v) in f.function_sets {
            m.sets.insert(k, (v, path.clone()));
        }
        for (k, v) in f.windows {
            m.windows.insert(k, (v, path.clone()));
        }
        for g in f.group {
            if g.name.trim().is_empty() {
                return Err(bad("a [[group]] has an empty name".into()));
            }
            match m.groups.iter_mut().find(|(x, _)| x.name == g.name) {
                Some((x, _)) => {
                    if g.role.is_some() {
                        x.role = g.role;
                    }
                    if g.default.is_some() {
                        x.default = g.default;
                    }
                    if g.unparsable.is_some() {
                        x.unparsable = g.unparsable;
                    }
                }
                None => m.groups.push((g, path.clone())),
            }
        }
        for r in f.rule {
            m.rules.push((r, path.clone()));
        }
        m.sources.push(path.display().to_string());
        m.last_path = path;
    }
    Ok(m)
}

/// Compile the `[windows.*]` (at most 64: a rule's windows are a bit set).
fn compile_windows(
    windows: &BTreeMap<String, (WindowSpec, PathBuf)>,
    last_path: PathBuf,
) -> Result<Vec<(String, Window)>, PolicyError> {
    let mut win_list = Vec::new();
    for (name, (spec, path)) in windows {
        let w = Window::compile(spec)
            .map_err(|msg| PolicyError::Invalid { path: path.clone(), msg: format!("[windows.{name}]: {msg}") })?;
        win_list.push((name.clone(), w));
    }
    if win_list.len() > 64 {
        return Err(PolicyError::Invalid { path: last_path, msg: "at most 64 windows".into() });
    }
    Ok(win_list)
}

/// The bit set of the windows named in `list` (a rule's `during` or `outside`).
fn window_bits(
    win_list: &[(String, Window)],
    list: &Option<OneOrMany>,
    rule: &str,
    path: &Path,
) -> Result<u64, PolicyError> {
    let mut bits = 0u64;
    for n in list.iter().flat_map(OneOrMany::list) {
        let i = win_list.iter().position(|(w, _)| *w == n).ok_or_else(|| PolicyError::Invalid {
            path: path.to_owned(),
            msg: format!("rule {rule:?}: unknown window {n:?} (define it as [windows.{n}])"),
        })?;
        bits |= 1 << i;
    }
    Ok(bits)
}

/// User-defined function sets may not take a built-in set's or class's name, nor refer to
/// other sets.
fn check_function_sets(sets: &BTreeMap<String, (Vec<String>, PathBuf)>) -> Result<(), PolicyError> {
    for (name, (list, path)) in sets {
        if BUILTIN_SETS.iter().any(|(b, _)| b == name) || super::functions::CLASS_NAMES.iter().any(|(b, _)| b == name) {
            return Err(PolicyError::Invalid {
                path: path.clone(),
                msg: format!("function set {name:?} is built in; choose another name"),
            });
        }
        if list.iter().any(|f| f.starts_with('@')) {
            return Err(PolicyError::Invalid {
                path: path.clone(),
                msg: format!("function set {name:?} cannot refer to other sets"),
            });
        }
    }
    Ok(())
}

/// Compile rule `r` (from `path`); `seen` holds the names of the rules compiled so far (names
/// are unique across all files).
fn compile_rule(
    r: &RuleSpec,
    path: &Path,
    sets: &BTreeMap<String, (Vec<String>, PathBuf)>,
    win_list: &[(String, Window)],
    seen: &mut std::collections::HashSet<String>,
) -> Result<Rule, PolicyError> {
    let bad = |msg: String| PolicyError::Invalid { path: path.to_owned(), msg: format!("rule {:?}: {msg}", r.name) };
    if r.name.trim().is_empty() {
        return Err(PolicyError::Invalid { path: path.to_owned(), msg: "a [[rule]] has an empty name".into() });
    }
    if reserved_rule_name(&r.name) {
        return Err(bad("this name is reserved (default, empty, default:*, builtin:*, unparsable*)".into()));
    }
    if !seen.insert(r.name.clone()) {
        return Err(bad("duplicate rule name (names must be unique across all policy files)".into()));
    }
    let mut classes = ClassSet::default();
    for c in &r.classes {
        classes.insert(*c);
    }
    let mut modifiers = ModSet::default();
    for m in &r.modifiers {
        modifiers.insert(*m);
    }
    let tables = r.tables.iter().map(|t| NamePat::parse(t)).collect::<Result<Vec<_>, _>>().map_err(bad)?;
    let (functions, fn_classes) = rule_functions(r, sets, &bad)?;
    let during = window_bits(win_list, &r.during, &r.name, path)?;
    let outside = window_bits(win_list, &r.outside, &r.name, path)?;
    let reason = r.reason.clone().unwrap_or_else(|| match r.action {
        Action::Allow => String::new(),
        Action::Deny => format!("denied by policy rule {:?}", r.name),
    });
    Ok(Rule {
        name: r.name.clone(),
        action: r.action,
        reason,
        users: r.users.clone(),
        groups: r.groups.clone(),
        except_users: r.except_users.clone(),
        except_groups: r.except_groups.clone(),
        databases: r.databases.iter().map(|d| Glob::new(d, false)).collect(),
        classes,
        commands: r
            .commands
            .iter()
            .map(|c| Glob::new(&c.split_whitespace().collect::<Vec<_>>().join(" "), true))
            .collect(),
        tables,
        schemas: r.schemas.iter().map(|s| Glob::new(s, true)).collect(),
        functions,
        fn_classes,
        modifiers,
        during,
        outside,
        source: path.display().to_string(),
    })
}

/// A rule's function patterns, with `@set`s expanded (built-in sets, then the policy's), and
/// the catalog function classes it names (`@class`, deny rules only).
fn rule_functions(
    r: &RuleSpec,
    sets: &BTreeMap<String, (Vec<String>, PathBuf)>,
    bad: &dyn Fn(String) -> PolicyError,
) -> Result<(Vec<NamePat>, u8), PolicyError> {
    let mut functions = Vec::new();
    let mut fn_classes = 0u8;
    for f in &r.functions {
        if let Some(set) = f.strip_prefix('@') {
            let class = super::functions::CLASS_NAMES.iter().find(|(n, _)| *n == set).map(|(_, b)| *b);
            if let Some(bits) = class {
                if r.action != Action::Deny {
                    return Err(bad(format!("the catalog function class {f:?} can only be used in deny rules")));
                }
                fn_classes |= bits;
            }
            let list: Vec<String> = match BUILTIN_SETS.iter().find(|(n, _)| *n == set) {
                Some((_, l)) => l.iter().map(|s| s.to_string()).collect(),
                None => match sets.get(set) {
                    Some((l, _)) => l.clone(),
                    None if class.is_some() => Vec::new(),
                    None => return Err(bad(format!("unknown function set {f:?}"))),
                },
            };
            for x in list {
                functions.push(NamePat::parse(&x).map_err(bad)?);
            }
        } else {
            functions.push(NamePat::parse(f).map_err(bad)?);
        }
    }
    Ok((functions, fn_classes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("dblink*", true);
        assert!(g.matches("dblink"));
        assert!(g.matches("dblink_exec"));
        assert!(!g.matches("xdblink"));
        assert!(Glob::new("a*b?c", true).matches("axxxbyc"));
        assert!(!Glob::new("a*b?c", true).matches("axxxbc"));
        assert!(Glob::new("*", true).matches(""));
        assert!(Glob::new("pg_*_file", true).matches("pg_read_binary_file"));
    }
}
