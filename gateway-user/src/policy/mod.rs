//! Policy decisions (pure: no I/O in [`Policy::decide`]).
//!
//! * [`Policy::load`] reads and merges the files in `policy.files` (format: `policies/README.md`).
//! * [`Policy::decide`] classifies every statement of a simple-query string (or a Parse's text)
//!   on Postgres's own parse tree (libpg_query, [`pgparse`]) and checks it against the rules; the whole string is denied if any
//!   statement is. [`Policy::decide_with_prepared`] also resolves `EXECUTE name` through the
//!   session's prepared statements; [`Policy::decide_function_call`] covers fastpath calls.
//! * [`Policy::role_for`] is the database role the session switches to after login.
//!
//! Order of checks for one statement (first that applies decides):
//! 1. built-in denials, which no policy can lift: texts over [`MAX_PARSE_BYTES`]
//!    (`builtin:too-large`), identity changes (`builtin:identity-change`) and turning
//!    standard_conforming_strings off (`builtin:protected-setting`);
//! 2. unparsable statements when the identity's `unparsable` setting is deny (`unparsable…`);
//! 3. the rules, top to bottom across the files in order — the first matching rule decides;
//! 4. the default: `default:<group>` (deny if any of the user's groups defaults to deny) or
//!    `default` (the `[defaults] action`).
//!
//! Caching: the analysis of a statement text is a pure function of the text, so it is cached
//! (LRU, sharded, keyed by text — equality-checked, never by hash alone). Rules are evaluated
//! per call; the verdict for (user, groups, database, state of every time window) is memoized
//! next to the analysis, so a repeated statement costs a hash lookup, a short scan and an `Arc`
//! clone. Time windows are part of the memo key, so a window opening or closing is seen at
//! once. Verdicts that depend on the session's prepared statements (EXECUTE) are not memoized.
//!
//! Texts that differ only in literal values (`… WHERE aid = 12345`, `… WHERE aid = 678`) share
//! one analysis, keyed by the text with its literals replaced by placeholders ([`normalize`]),
//! when that analysis cannot depend on the values: no statement's analysis read a literal
//! (`StatementInfo::literal_dependent`), and every literal ended up as a literal value in the
//! parse, where the normalizer saw it (see `analyze::analyze_sql_with`). Otherwise the
//! analysis is cached by its exact text, as before. A lookup tries the normalized key first,
//! then the exact text.

mod analyze;
mod bound;
mod class;
mod file;
pub mod functions;
pub(crate) mod lexical;
mod limits;
mod settings;
pub(crate) mod normalize;
pub mod pgparse;
pub mod pgtree;
mod window;
mod writes;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use lru::LruCache;
use serde::{Deserialize, Serialize};

pub use limits::MAX_PARSE_BYTES;
pub use analyze::{PreparedOp, StatementInfo, analyze_sql};
pub use class::{ClassSet, ModSet, Modifier, QName, StatementClass};
pub use settings::{supported_client_encoding, utf8_encoding};

use crate::auth::Identity;
use crate::config::Config;
use crate::lock;
use file::{Compiled, NamePat, Rule};
pub(crate) use file::glob_match;

/// `pg_catalog.set_config(text, text, bool)` in every PostgreSQL release's catalog.
pub const SET_CONFIG_OID: i32 = 2078;

/// The policy shipped with the binary (the repository's `policies/default.toml`).
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../../policies/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid policy file {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("invalid policy {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// What a rule (or default) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The decision for one statement.
#[derive(Debug, Clone)]
pub struct StatementVerdict {
    pub decision: Action,
    /// Rule name, `default:<group>`, `default`, `unparsable[:<group>]` or `builtin:…`.
    pub rule: String,
    /// Why (for denials: the text sent to the client).
    pub reason: String,
    pub info: Arc<StatementInfo>,
}

/// See [`Policy::decision_stamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionStamp {
    windows: u64,
    catalog: u64,
}

/// The decision for a whole query string.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub decision: Action,
    /// The rule that decided: for a denial the rule that denied the first denied statement; for
    /// an allowed multi-statement string the distinct allowing rules, comma-separated;
    /// `empty` for a string without statements.
    pub rule: String,
    pub reason: String,
    /// Primary class of each statement.
    pub classes: Vec<StatementClass>,
    /// Some statement could not be parsed (flag this in the audit record).
    pub unparsable: bool,
    pub statement_count: usize,
    pub statements: Vec<StatementVerdict>,
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        self.decision == Action::Allow
    }

    /// The old [`Decision`] shape.
    pub fn to_decision(&self) -> Decision {
        match self.decision {
            Action::Allow => Decision::Allow { rule: self.rule.clone() },
            Action::Deny => Decision::Deny { rule: self.rule.clone(), reason: self.reason.clone() },
        }
    }
}

/// Upper bound for a cached statement text; longer texts are analyzed on every call.
const MAX_CACHED_SQL: usize = 64 * 1024;
const SHARDS: usize = 16;
const DEFAULT_CACHE_ENTRIES: usize = 8192;
/// Verdicts memoized per statement text (distinct identity/database/window states).
const MEMO_PER_ENTRY: usize = 8;

struct Stmt {
    info: Arc<StatementInfo>,
    /// Bit i: rule i's statement conditions (classes, commands, tables, schemas, functions,
    /// modifiers) hold for this statement.
    content: Box<[u64]>,
}

struct Memo {
    user: String,
    groups: Vec<String>,
    database: String,
    windows: u64,
    /// Generation of the database's function catalog the verdict was made with.
    catalog: u64,
    verdict: Arc<Verdict>,
}

/// The analysis of one statement text ([`Policy::analysis`]), to decide it later.
#[derive(Clone)]
pub struct Analysis(Arc<Entry>);

struct Entry {
    /// The statement text, or (`normalized`) its literal-normalized key.
    key: Box<str>,
    normalized: bool,
    stmts: Vec<Stmt>,
    has_execute: bool,
    memo: Mutex<Vec<Memo>>,
}

impl Entry {
    fn empty() -> Entry {
        Entry { key: "".into(), normalized: false, stmts: Vec::new(), has_execute: false, memo: Mutex::new(Vec::new()) }
    }
}

/// Key hash → entries with that hash (compared by key), and the shard's counters.
struct Shard {
    lru: LruCache<u64, Vec<Arc<Entry>>>,
    stats: CacheStats,
}

/// Counters of the analysis cache (summed over its shards; kept under the shard locks, so they
/// cost no extra synchronization).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered by an entry for the exact text.
    pub exact_hits: u64,
    /// Lookups answered by an entry shared by texts that differ only in literal values.
    pub normalized_hits: u64,
    /// Analyses made and cached (misses).
    pub analyses: u64,
    /// … of which were cached under a literal-normalized key.
    pub shared: u64,
}

/// How the session resolves `EXECUTE name` to the prepared statement's text: the texts the
/// name may run (several when a PREPARE of the name is on its way and may or may not
/// succeed: the EXECUTE is allowed only if each is); none when the session does not know.
pub type PreparedLookup<'a> = &'a dyn Fn(&str) -> Vec<String>;

struct Cache {
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Cache {
    fn new(entries: usize) -> Cache {
        let per = NonZeroUsize::new(entries.div_ceil(SHARDS).max(1)).expect("non-zero");
        Cache {
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { lru: LruCache::new(per), stats: CacheStats::default() }))
                .collect(),
        }
    }

    fn shard(&self, key: &str, normalized: bool) -> (u64, &Mutex<Shard>) {
        let h = self.hasher.hash_one((normalized, key));
        (h, &self.shards[(h as usize) % SHARDS])
    }

    fn get(&self, key: &str, normalized: bool) -> Option<Arc<Entry>> {
        let (h, shard) = self.shard(key, normalized);
        let mut g = lock(shard);
        let e = g.lru.get(&h)?.iter().find(|e| e.normalized == normalized && &*e.key == key)?.clone();
        if normalized {
            g.stats.normalized_hits += 1;
        } else {
            g.stats.exact_hits += 1;
        }
        Some(e)
    }

    /// Cache a new entry; if another thread cached one for the same key meanwhile, that one.
    fn insert(&self, e: Arc<Entry>) -> Arc<Entry> {
        let (h, shard) = self.shard(&e.key, e.normalized);
        let mut g = lock(shard);
        g.stats.analyses += 1;
        g.stats.shared += u64::from(e.normalized);
        match g.lru.get_mut(&h) {
            Some(bucket) => {
                if let Some(existing) = bucket.iter().find(|x| x.normalized == e.normalized && x.key == e.key) {
                    return existing.clone();
                }
                if bucket.len() >= 4 {
                    bucket.remove(0);
                }
                bucket.push(e.clone());
            }
            None => {
                g.lru.put(h, vec![e.clone()]);
            }
        }
        e
    }

    fn stats(&self) -> CacheStats {
        let mut t = CacheStats::default();
        for s in self.shards.iter() {
            let s = lock(s).stats;
            t.exact_hits += s.exact_hits;
            t.normalized_hits += s.normalized_hits;
            t.analyses += s.analyses;
            t.shared += s.shared;
        }
        t
    }
}

/// A loaded policy. Cheap to share (`Arc<Policy>`); `decide` takes `&self`.
pub struct Policy {
    c: Compiled,
    cache: Cache,
    fastpath: Arc<Entry>,
    /// A fastpath call of set_config (an identity or lexical change pgward cannot read).
    fastpath_set_config: Arc<Entry>,
    /// An Execute of a portal bound to a statement the session does not know.
    unknown_statement: Arc<Entry>,
    /// Function catalogs by database, for rules that name catalog function classes:
    /// (generation, catalog). A database without one: every function is in every class.
    catalogs: std::sync::RwLock<std::collections::HashMap<String, (u64, Arc<functions::FunctionCatalog>)>>,
    catalog_generation: std::sync::atomic::AtomicU64,
    /// Some rule names a catalog function class.
    class_rules: bool,
}

/// The function catalog a decision is made with: (generation, catalog); None: no rule needs
/// one.
type CatalogRef = Option<(u64, Option<Arc<functions::FunctionCatalog>>)>;

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("sources", &self.c.sources)
            .field("rules", &self.c.rules.len())
            .field("groups", &self.c.groups.len())
            .finish()
    }
}

impl Policy {
    /// The files in `policy.files` (resolved against the config's directory), merged in order.
    /// No files: only the built-in denials apply, everything else is allowed (rule `default`).
    pub fn load(cfg: &Config) -> Result<Policy, PolicyError> {
        let paths: Vec<PathBuf> = cfg.policy.files.iter().map(|p| cfg.resolve(p)).collect();
        if paths.is_empty() {
            return Ok(Policy::builtin_only());
        }
        Policy::from_files(&paths)
    }

    /// Read and merge policy files in order.
    pub fn from_files(paths: &[PathBuf]) -> Result<Policy, PolicyError> {
        let mut sources = Vec::new();
        for p in paths {
            let text = std::fs::read_to_string(p).map_err(|source| PolicyError::Read { path: p.clone(), source })?;
            sources.push((p.clone(), text));
        }
        Policy::from_sources(&sources)
    }

    /// Policy from one TOML text (`name` is used in error messages).
    pub fn from_toml(name: &str, text: &str) -> Result<Policy, PolicyError> {
        Policy::from_sources(&[(PathBuf::from(name), text.to_string())])
    }

    /// Merge (name, TOML text) pairs in order.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Policy, PolicyError> {
        let mut files = Vec::new();
        for (path, text) in sources {
            files.push((path.clone(), file::parse_file(text, path)?));
        }
        Ok(Policy::new(file::compile(files)?))
    }

    /// Allow everything except the built-in denials.
    pub fn builtin_only() -> Policy {
        let f = file::PolicyFile {
            defaults: Some(file::DefaultsSpec { action: Some(Action::Allow), ..Default::default() }),
            ..Default::default()
        };
        Policy::new(file::compile(vec![(PathBuf::from("<built-in>"), f)]).expect("built-in policy compiles"))
    }

    fn new(c: Compiled) -> Policy {
        let class_rules = c.rules.iter().any(|r| r.fn_classes != 0);
        let mut p = Policy {
            c,
            catalogs: Default::default(),
            catalog_generation: std::sync::atomic::AtomicU64::new(1),
            class_rules,
            cache: Cache::new(DEFAULT_CACHE_ENTRIES),
            fastpath: Arc::new(Entry::empty()),
            fastpath_set_config: Arc::new(Entry::empty()),
            unknown_statement: Arc::new(Entry::empty()),
        };
        let fastpath = |set_config: bool| {
            let mut info = StatementInfo { text: "<fastpath function call>".into(), ..Default::default() };
            info.classes.insert(StatementClass::Admin);
            info.modifiers.insert(Modifier::Fastpath);
            if set_config {
                // Its arguments are binary values pgward does not read: any setting, 'role'
                // included.
                info.modifiers.insert(Modifier::IdentityChange);
                info.functions.push(QName::new(Some("pg_catalog".into()), "set_config".into()));
            }
            info.commands.push("function call".into());
            info
        };
        let (plain, set_config) = (p.stmt(Arc::new(fastpath(false))), p.stmt(Arc::new(fastpath(true))));
        p.fastpath = Arc::new(Entry { stmts: vec![plain], ..Entry::empty() });
        p.fastpath_set_config = Arc::new(Entry { stmts: vec![set_config], ..Entry::empty() });
        let mut unknown = StatementInfo { text: "<execute of a statement pgward does not know>".into(), ..Default::default() };
        unknown.classes.insert(StatementClass::Write);
        unknown.modifiers.insert(Modifier::UnknownPrepared);
        unknown.commands.push("execute".into());
        let unknown = p.stmt(Arc::new(unknown));
        p.unknown_statement = Arc::new(Entry { stmts: vec![unknown], ..Entry::empty() });
        p
    }

    /// Whether some rule names a catalog function class (`@volatile`, `@outside`, …): then the
    /// gateway loads each database's function catalog ([`Policy::set_function_catalog`]).
    pub fn uses_function_classes(&self) -> bool {
        self.class_rules
    }

    /// The function catalog of `database`, for rules that name catalog function classes.
    /// Until one is set, every function of that database is in every class (fail closed).
    pub fn set_function_catalog(&self, database: &str, catalog: functions::FunctionCatalog) {
        let generation = self.catalog_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut g = self.catalogs.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        g.insert(database.to_string(), (generation, Arc::new(catalog)));
    }

    /// The function catalog set for `database`, if any (whether or not rules name classes).
    pub fn function_catalog(&self, database: &str) -> Option<Arc<functions::FunctionCatalog>> {
        let g = self.catalogs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        g.get(database).map(|(_, c)| c.clone())
    }

    fn catalog_for(&self, database: &str) -> CatalogRef {
        if !self.class_rules {
            return None;
        }
        let g = self.catalogs.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(match g.get(database) {
            Some((generation, c)) => (*generation, Some(c.clone())),
            None => (0, None),
        })
    }

    /// Resize the analysis cache (entries across all shards; default 8192).
    pub fn with_cache_capacity(mut self, entries: usize) -> Policy {
        self.cache = Cache::new(entries.max(SHARDS));
        self
    }

    /// Counters of the analysis cache (hits by exact text and by literal-normalized key,
    /// analyses made).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The files this policy was built from.
    pub fn sources(&self) -> &[String] {
        &self.c.sources
    }

    /// Rule names in evaluation order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.c.rules.iter().map(|r| r.name.as_str())
    }

    /// Human-readable summary (for `pgward policy validate`).
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "files: {}", self.c.sources.join(", "));
        let _ = writeln!(
            s,
            "defaults: action={} unparsable={} role={} search_path={}",
            self.c.default_action,
            self.c.default_unparsable.map(|a| a.as_str()).unwrap_or("(derived)"),
            self.c.default_role.as_deref().unwrap_or("-"),
            self.c.search_path.join(",")
        );
        for g in &self.c.groups {
            let _ = writeln!(
                s,
                "group {}: role={} default={} unparsable={}",
                g.name,
                g.role.as_deref().unwrap_or("-"),
                g.default.map(|a| a.as_str()).unwrap_or("-"),
                g.unparsable.map(|a| a.as_str()).unwrap_or("-")
            );
        }
        for (n, _) in &self.c.windows {
            let _ = writeln!(s, "window {n}");
        }
        for (i, r) in self.c.rules.iter().enumerate() {
            let _ = writeln!(s, "rule {:>3} {:<5} {} ({})", i + 1, r.action.as_str(), r.name, r.source);
        }
        s
    }

    /// The database role to `SET ROLE` to after login: the role of the first `[[group]]` (in
    /// policy order) the identity belongs to that names one, else `[defaults] role`.
    pub fn role_for(&self, identity: &Identity) -> Option<String> {
        self.c
            .groups
            .iter()
            .filter(|g| identity.groups.contains(&g.name))
            .find_map(|g| g.role.clone())
            .or_else(|| self.c.default_role.clone())
    }

    /// The `[[group]]`s whose `role` is exactly `role`, in policy order (a session running
    /// under a just-in-time grant of `role` is decided as a member of these).
    pub fn groups_with_role(&self, role: &str) -> Vec<String> {
        self.c.groups.iter().filter(|g| g.role.as_deref() == Some(role)).map(|g| g.name.clone()).collect()
    }

    /// Decide a simple-query string or a Parse's text. `EXECUTE name` counts as a write (the
    /// prepared text is unknown here); see [`Policy::decide_with_prepared`].
    pub fn decide(&self, identity: &Identity, database: &str, sql: &str, now: DateTime<Utc>) -> Arc<Verdict> {
        self.decide_entry(&self.entry(sql), identity, database, now, None)
    }

    /// Like [`Policy::decide`], and `EXECUTE name` is decided as the statement `lookup(name)`
    /// returns (the text the session saw in `PREPARE name AS …` — the whole PREPARE or just
    /// the statement — or in a Parse that named `name`). Names are passed as Postgres folds
    /// them (unquoted → lowercase). `None` from `lookup` keeps the conservative "write".
    pub fn decide_with_prepared(
        &self,
        identity: &Identity,
        database: &str,
        sql: &str,
        now: DateTime<Utc>,
        lookup: PreparedLookup<'_>,
    ) -> Arc<Verdict> {
        self.decide_entry(&self.entry(sql), identity, database, now, Some(lookup))
    }

    /// A protocol-level FunctionCall ('F' message): only an OID is known, so it is a statement
    /// of class `admin` with modifier `fastpath` and no known function name — except
    /// set_config's OID, which is an identity change (built-in denial).
    pub fn decide_function_call(&self, identity: &Identity, database: &str, oid: i32, now: DateTime<Utc>) -> Arc<Verdict> {
        let windows = self.window_bits(now);
        let entry = if oid == SET_CONFIG_OID { &self.fastpath_set_config } else { &self.fastpath };
        self.memoized(entry, identity, database, windows, None)
    }

    /// A protocol-level Execute of a statement the session does not know (Postgres may still
    /// hold one under that name, made where pgward could not follow): decided as `EXECUTE`
    /// of an unknown prepared statement — class `write`, modifier `unknown_prepared`.
    pub fn decide_unknown_statement(&self, identity: &Identity, database: &str, now: DateTime<Utc>) -> Arc<Verdict> {
        let windows = self.window_bits(now);
        self.memoized(&self.unknown_statement, identity, database, windows, None)
    }

    /// The analysis of `sql` (cached), without deciding anything.
    pub fn analyze(&self, sql: &str) -> Vec<Arc<StatementInfo>> {
        self.entry(sql).stmts.iter().map(|s| s.info.clone()).collect()
    }

    fn decide_entry(
        &self,
        entry: &Entry,
        identity: &Identity,
        database: &str,
        now: DateTime<Utc>,
        lookup: Option<PreparedLookup<'_>>,
    ) -> Arc<Verdict> {
        let windows = self.window_bits(now);
        self.memoized(entry, identity, database, windows, lookup)
    }

    fn memoized(
        &self,
        entry: &Entry,
        identity: &Identity,
        database: &str,
        windows: u64,
        lookup: Option<PreparedLookup<'_>>,
    ) -> Arc<Verdict> {
        let memoize = !(entry.has_execute && lookup.is_some());
        let cat = self.catalog_for(database);
        let generation = cat.as_ref().map_or(0, |(g, _)| *g);
        if memoize {
            let memo = lock(&entry.memo);
            if let Some(m) = memo.iter().find(|m| {
                m.windows == windows
                    && m.catalog == generation
                    && m.user == identity.user
                    && m.database == database
                    && m.groups == identity.groups
            }) {
                return m.verdict.clone();
            }
        }
        let verdict = Arc::new(self.evaluate(entry, identity, database, windows, lookup, &cat));
        if memoize {
            let mut memo = lock(&entry.memo);
            if memo.len() >= MEMO_PER_ENTRY {
                memo.remove(0);
            }
            memo.push(Memo {
                user: identity.user.clone(),
                groups: identity.groups.clone(),
                database: database.to_string(),
                windows,
                catalog: generation,
                verdict: verdict.clone(),
            });
        }
        verdict
    }

    /// The cached analysis of `sql`: shared with texts that differ only in literal values
    /// when it does not depend on them, else by exact text.
    fn entry(&self, sql: &str) -> Arc<Entry> {
        if sql.len() > MAX_CACHED_SQL {
            return Arc::new(self.build_entry(sql, None));
        }
        // The exact text first: a text without constants (a Parse with $n) needs no key.
        if let Some(e) = self.cache.get(sql, false) {
            return e;
        }
        let norm = normalize::normalize(sql);
        if let Some(n) = &norm
            && let Some(e) = self.cache.get(&n.key, true)
        {
            return e;
        }
        // Parse outside the lock.
        self.cache.insert(Arc::new(self.build_entry(sql, norm)))
    }

    fn cached(&self, sql: &str, norm: Option<&normalize::Normalized>) -> Option<Arc<Entry>> {
        if let Some(n) = norm
            && let Some(e) = self.cache.get(&n.key, true)
        {
            return Some(e);
        }
        self.cache.get(sql, false)
    }

    /// Whether deciding `sql` would parse it: a text within [`MAX_PARSE_BYTES`] that the cache
    /// does not hold. (Texts over [`MAX_PARSE_BYTES`] are denied without parsing.)
    pub fn would_parse(&self, sql: &str) -> bool {
        match sql.len() {
            n if n > MAX_PARSE_BYTES => false,
            n if n > MAX_CACHED_SQL => true,
            _ => self.cached(sql, normalize::normalize(sql).as_ref()).is_none(),
        }
    }

    /// Analyze `sql` (or take its analysis from the cache) ahead of deciding it with
    /// [`Policy::decide_analyzed`] — a session does this on a blocking thread for long texts,
    /// so that parsing them does not stall its event loop.
    pub fn analysis(&self, sql: &str) -> Analysis {
        Analysis(self.entry(sql))
    }

    /// [`Policy::decide_with_prepared`] for a text analyzed ahead: the same verdict (the
    /// session's prepared statements are looked up now, not when it was analyzed).
    pub fn decide_analyzed(
        &self,
        analysis: &Analysis,
        identity: &Identity,
        database: &str,
        now: DateTime<Utc>,
        lookup: PreparedLookup<'_>,
    ) -> Arc<Verdict> {
        self.decide_entry(&analysis.0, identity, database, now, Some(lookup))
    }

    /// Analyze `sql`; the entry is keyed by `norm`'s key when the analysis holds for every text
    /// with that key, else by `sql`.
    fn build_entry(&self, sql: &str, norm: Option<normalize::Normalized>) -> Entry {
        let (infos, shareable) = analyze::analyze_sql_with(sql, norm.as_ref());
        let has_execute = infos.iter().any(|i| i.execute.is_some());
        let stmts = infos.into_iter().map(|i| self.stmt(Arc::new(i))).collect();
        let (key, normalized) = match norm {
            Some(n) if shareable => (n.key.into_boxed_str(), true),
            _ => (sql.into(), false),
        };
        Entry { key, normalized, stmts, has_execute, memo: Mutex::new(Vec::new()) }
    }

    /// The verdict from a fresh analysis of `sql`, bypassing the cache (tests compare the
    /// cached paths against this).
    #[cfg(test)]
    fn decide_uncached(
        &self,
        identity: &Identity,
        database: &str,
        sql: &str,
        now: DateTime<Utc>,
        lookup: Option<PreparedLookup<'_>>,
    ) -> Verdict {
        let entry = self.build_entry(sql, None);
        self.evaluate(&entry, identity, database, self.window_bits(now), lookup, &self.catalog_for(database))
    }

    fn stmt(&self, info: Arc<StatementInfo>) -> Stmt {
        let mut content = vec![0u64; self.c.rules.len().div_ceil(64)];
        for (i, r) in self.c.rules.iter().enumerate() {
            if content_matches(r, &info, &self.c.search_path, None) {
                content[i / 64] |= 1 << (i % 64);
            }
        }
        Stmt { info, content: content.into_boxed_slice() }
    }

    /// What a verdict depends on besides the text, the identity and the database: which
    /// time windows are open at `now` and the generation of `database`'s function catalog.
    /// For the same text, identity and database, equal stamps mean the same verdict — unless
    /// the text runs a prepared statement by name (`EXECUTE`), whose text can change.
    pub fn decision_stamp(&self, database: &str, now: DateTime<Utc>) -> DecisionStamp {
        DecisionStamp { windows: self.window_bits(now), catalog: self.catalog_for(database).map_or(0, |(g, _)| g) }
    }

    fn window_bits(&self, now: DateTime<Utc>) -> u64 {
        let mut bits = 0;
        for (i, (_, w)) in self.c.windows.iter().enumerate() {
            if w.contains(now) {
                bits |= 1 << i;
            }
        }
        bits
    }

    fn evaluate(
        &self,
        entry: &Entry,
        identity: &Identity,
        database: &str,
        windows: u64,
        lookup: Option<PreparedLookup<'_>>,
        cat: &CatalogRef,
    ) -> Verdict {
        let mut out: Vec<StatementVerdict> = Vec::with_capacity(entry.stmts.len());
        for s in &entry.stmts {
            if let (Some(name), Some(lookup)) = (&s.info.execute, lookup)
                && let Some(resolved) = self.resolve_candidates(&s.info, &lookup(name))
            {
                // The EXECUTE is allowed only if everything the prepared text does is.
                let mut verdicts: Vec<StatementVerdict> = resolved
                    .into_iter()
                    .map(|r| {
                        let (decision, rule, reason) = self.decide_stmt(&r, identity, database, windows, cat);
                        StatementVerdict {
                            decision,
                            rule: rule.into_owned(),
                            reason: reason.into_owned(),
                            info: r.info,
                        }
                    })
                    .collect();
                let pick = verdicts.iter().position(|v| v.decision == Action::Deny).unwrap_or(0);
                out.push(verdicts.swap_remove(pick));
                continue;
            }
            let (decision, rule, reason) = self.decide_stmt(s, identity, database, windows, cat);
            out.push(StatementVerdict {
                decision,
                rule: rule.into_owned(),
                reason: reason.into_owned(),
                info: s.info.clone(),
            });
        }
        combine(out)
    }

    /// EXECUTE resolved to every text the name may run: all their statements; None when
    /// there is none or one does not resolve (then it is an unknown prepared statement).
    fn resolve_candidates(&self, exec: &StatementInfo, texts: &[String]) -> Option<Vec<Stmt>> {
        let mut all = Vec::new();
        for text in texts {
            all.extend(self.resolve_execute(exec, text)?);
        }
        (!all.is_empty()).then_some(all)
    }

    /// EXECUTE resolved to a prepared text: its statements, carrying the EXECUTE's own
    /// parameters' functions and the outer string's modifiers.
    fn resolve_execute(&self, exec: &StatementInfo, text: &str) -> Option<Vec<Stmt>> {
        let prepared = self.entry(text);
        if prepared.stmts.is_empty() {
            return None;
        }
        Some(
            prepared
                .stmts
                .iter()
                .map(|p| {
                    let mut info = (*p.info).clone();
                    info.text = format!("{} /* prepared: {} */", exec.text, p.info.text);
                    info.commands.insert(0, "execute".into());
                    // `CREATE TABLE t AS EXECUTE p` creates and writes a table whatever p reads.
                    let (wrapper_classes, wrapper_commands) = &exec.execute_wrapper;
                    info.classes.0 |= wrapper_classes.0;
                    for c in wrapper_commands.iter().rev() {
                        info.commands.insert(0, c.clone());
                    }
                    info.functions.extend(exec.functions.iter().cloned());
                    info.tables.extend(exec.tables.iter().cloned());
                    let mut m = exec.modifiers;
                    m.0 &= !(1 << Modifier::UnknownPrepared as u32);
                    info.modifiers |= m;
                    // A prepared EXECUTE inside is not resolved again (stays "unknown_prepared").
                    self.stmt(Arc::new(info))
                })
                .collect(),
        )
    }

    fn decide_stmt<'a>(
        &'a self,
        s: &Stmt,
        identity: &Identity,
        database: &str,
        windows: u64,
        cat: &CatalogRef,
    ) -> (Action, Cow<'a, str>, Cow<'a, str>) {
        let info = &s.info;
        if info.modifiers.contains(Modifier::TooLarge) {
            return (
                Action::Deny,
                "builtin:too-large".into(),
                format!("the statement is longer than pgward checks ({} bytes)", MAX_PARSE_BYTES).into(),
            );
        }
        if info.modifiers.contains(Modifier::IdentityChange) {
            return (
                Action::Deny,
                "builtin:identity-change".into(),
                "changing the session's role or authorization is not allowed through pgward".into(),
            );
        }
        if info.modifiers.contains(Modifier::ProtectedSetting) {
            return (
                Action::Deny,
                "builtin:protected-setting".into(),
                "standard_conforming_strings must stay on, client_encoding as the session started and backslash_quote safe_encoding (pgward reads statements assuming so)".into(),
            );
        }
        if info.unparsable {
            let (action, rule) = self.unparsable_for(identity);
            if action == Action::Deny {
                return (
                    Action::Deny,
                    rule,
                    "pgward could not parse this statement, and the policy denies statements it cannot check".into(),
                );
            }
        }
        // EXECUTE of a prepared statement pgward did not see prepared (code in the database
        // can PREPARE): what it runs is as unknown as an unparsable text's.
        if info.modifiers.contains(Modifier::UnknownPrepared) {
            let (action, rule) = self.unparsable_for(identity);
            if action == Action::Deny {
                return (
                    Action::Deny,
                    rule,
                    "pgward did not see this prepared statement prepared, so it cannot check what it runs, and the policy denies statements it cannot check".into(),
                );
            }
        }
        let classes_of = |f: &QName| match cat {
            Some((_, Some(c))) => c.classes_of(f),
            _ => functions::ALL,
        };
        for (i, r) in self.c.rules.iter().enumerate() {
            let content = s.content[i / 64] & (1 << (i % 64)) != 0
                || (r.fn_classes != 0 && content_matches(r, info, &self.c.search_path, Some(&classes_of)));
            if content
                && subject_matches(r, identity)
                && (r.databases.is_empty() || r.databases.iter().any(|d| d.matches(database)))
                && (r.during == 0 || windows & r.during != 0)
                && windows & r.outside == 0
            {
                return (r.action, r.name.as_str().into(), r.reason.as_str().into());
            }
        }
        let (action, rule) = self.default_for(identity);
        let reason = match action {
            Action::Allow => Cow::Borrowed(""),
            Action::Deny => format!("no policy rule allows this statement ({rule} is deny)").into(),
        };
        (action, rule, reason)
    }

    /// Deny if any of the identity's groups defaults to deny; else allow if any defaults to
    /// allow; else `[defaults] action`.
    fn default_for(&self, identity: &Identity) -> (Action, Cow<'_, str>) {
        self.group_setting(identity, "default", |g| g.default)
            .unwrap_or((self.c.default_action, "default".into()))
    }

    /// A per-group setting among the identity's groups: deny wins, else the first allow; the
    /// rule name is `<label>:<group>`. None when no group of the identity sets it.
    fn group_setting(
        &self,
        identity: &Identity,
        label: &str,
        setting: impl Fn(&file::Group) -> Option<Action>,
    ) -> Option<(Action, Cow<'_, str>)> {
        let mut allow: Option<&str> = None;
        for g in self.c.groups.iter().filter(|g| identity.groups.contains(&g.name)) {
            match setting(g) {
                Some(Action::Deny) => return Some((Action::Deny, format!("{label}:{}", g.name).into())),
                Some(Action::Allow) if allow.is_none() => allow = Some(&g.name),
                _ => {}
            }
        }
        allow.map(|g| (Action::Allow, format!("{label}:{g}").into()))
    }

    /// The identity's `unparsable` setting: an explicit group setting (deny wins), else
    /// `[defaults] unparsable`, else deny if the policy restricts this identity at all (a deny
    /// default or any deny rule that names it, its groups, or everyone).
    fn unparsable_for(&self, identity: &Identity) -> (Action, Cow<'_, str>) {
        if let Some(v) = self.group_setting(identity, "unparsable", |g| g.unparsable) {
            return v;
        }
        if let Some(a) = self.c.default_unparsable {
            return (a, "unparsable".into());
        }
        let restricted = self.default_for(identity).0 == Action::Deny
            || self.c.rules.iter().any(|r| r.action == Action::Deny && subject_matches(r, identity));
        (if restricted { Action::Deny } else { Action::Allow }, "unparsable".into())
    }
}

fn combine(statements: Vec<StatementVerdict>) -> Verdict {
    let classes = statements.iter().map(|s| s.info.class()).collect();
    let unparsable = statements.iter().any(|s| s.info.unparsable);
    let statement_count = statements.len();
    if statements.is_empty() {
        return Verdict {
            decision: Action::Allow,
            rule: "empty".into(),
            reason: String::new(),
            classes,
            unparsable,
            statement_count,
            statements,
        };
    }
    let (decision, rule, reason) = match statements.iter().find(|s| s.decision == Action::Deny) {
        Some(d) => (Action::Deny, d.rule.clone(), d.reason.clone()),
        None => {
            let mut names: Vec<&str> = Vec::new();
            for s in &statements {
                if !names.contains(&s.rule.as_str()) {
                    names.push(&s.rule);
                }
            }
            (Action::Allow, names.join(","), String::new())
        }
    };
    Verdict { decision, rule, reason, classes, unparsable, statement_count, statements }
}

fn subject_matches(r: &Rule, id: &Identity) -> bool {
    let included = (r.users.is_empty() && r.groups.is_empty())
        || r.users.contains(&id.user)
        || r.groups.iter().any(|g| id.groups.contains(g));
    included && !r.except_users.contains(&id.user) && !r.except_groups.iter().any(|g| id.groups.contains(g))
}

/// Does a name (table or function reference) match a pattern?
///
/// * qualified reference `s.n`: schema and name must match (a pattern without schema matches
///   any schema);
/// * unqualified reference `n` (pgward cannot see the session's search_path): in a **deny**
///   rule it matches `x.n` for a literal `n` whatever `x` is, and `x.<glob>` when `x` is in
///   `[defaults] search_path`; in an **allow** rule the pattern's schema must match every
///   schema of the search_path.
fn name_matches(p: &NamePat, q: &QName, deny: bool, search_path: &[String]) -> bool {
    if !p.name.matches(&q.name) {
        return false;
    }
    match (&p.schema, &q.schema) {
        (None, _) => true,
        (Some(ps), Some(qs)) => ps.matches(qs),
        (Some(ps), None) => {
            if deny {
                p.name.is_literal() || search_path.iter().any(|s| ps.matches(s))
            } else {
                !search_path.is_empty() && search_path.iter().all(|s| ps.matches(s))
            }
        }
    }
}

/// The statement-dependent conditions of a rule. Deny rules match a statement that does *any*
/// of the listed things; allow rules only a statement whose classes, commands, tables, schemas
/// and functions are *all* listed. Modifiers: the statement has any of the listed ones.
/// `classes`: the catalog classes of a function, for rules that name catalog function classes
/// (None: such a rule's class condition is not met; it is checked again with the catalog).
fn content_matches(
    r: &Rule,
    info: &StatementInfo,
    search_path: &[String],
    classes: Option<&dyn Fn(&QName) -> u8>,
) -> bool {
    let deny = r.action == Action::Deny;
    // any/all over the statement's items
    fn check<T>(items: &[T], deny: bool, f: impl Fn(&T) -> bool) -> bool {
        if deny { items.iter().any(f) } else { items.iter().all(f) }
    }
    if !r.classes.is_empty() {
        let ok = if deny {
            info.classes.0 & r.classes.0 != 0
        } else {
            !info.classes.is_empty() && info.classes.0 & !r.classes.0 == 0
        };
        if !ok {
            return false;
        }
    }
    if !r.commands.is_empty() && !check(&info.commands, deny, |c| r.commands.iter().any(|g| g.matches(c))) {
        return false;
    }
    if !r.tables.is_empty() {
        let listed = |t: &QName| r.tables.iter().any(|p| name_matches(p, t, deny, search_path));
        let (named, in_bodies) = (check(&info.tables, deny, listed), check(&info.body_tables, deny, listed));
        if !(if deny { named || in_bodies } else { named && in_bodies }) {
            return false;
        }
    }
    if !r.schemas.is_empty() {
        // Schemas touched: explicit ones, and for unqualified tables the search_path.
        let mut touched: Vec<&str> = info.schemas.iter().map(String::as_str).collect();
        if info.tables.iter().any(|t| t.schema.is_none()) {
            touched.extend(search_path.iter().map(String::as_str));
        }
        if !check(&touched, deny, |s| r.schemas.iter().any(|g| g.matches(s))) {
            return false;
        }
    }
    let in_class = |f: &QName| r.fn_classes != 0 && classes.is_some_and(|c| c(f) & r.fn_classes != 0);
    let named = |f: &QName| r.functions.iter().any(|p| name_matches(p, f, deny, search_path));
    if !r.functions.is_empty() || r.fn_classes != 0 {
        let called = check(&info.functions, deny, |f| named(f) || in_class(f));
        let in_bodies = check(&info.body_functions, deny, named);
        let ok = if deny { called || in_bodies } else { called && in_bodies };
        if !ok {
            return false;
        }
    }
    if !r.modifiers.is_empty() && info.modifiers.0 & r.modifiers.0 == 0 {
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Legacy interface (session.rs calls this until it switches to `Policy`).

/// The old decision shape. Prefer [`Policy::decide`] and [`Verdict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { rule: String },
    Deny { rule: String, reason: String },
}

/// Stub kept for the session until it holds a [`Policy`]: allows everything under rule
/// "default". Replace calls with `policy.decide(identity, database, sql, Utc::now())`.
pub fn decide(_identity: &Identity, _database: &str, _sql: &str) -> Decision {
    Decision::Allow { rule: "default".into() }
}

/// Path helper for callers that have a policy file list but no [`Config`].
pub fn load_files<P: AsRef<Path>>(paths: &[P]) -> Result<Policy, PolicyError> {
    Policy::from_files(&paths.iter().map(|p| p.as_ref().to_path_buf()).collect::<Vec<_>>())
}
