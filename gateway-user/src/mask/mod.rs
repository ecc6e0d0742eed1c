//! Masking of result values: `[[mask]]` rules in the policy files, applied to every row pgward
//! relays (simple and extended protocol, text and binary format, COPY TO STDOUT, cursors,
//! RETURNING). Format and semantics: `policies/README.md`, section *Masking*.
//!
//! * [`detect`]: content detectors (cards with Luhn, e-mail, SSN, IBAN with mod-97, phone, user
//!   regexes) and the mask styles (full, keep last N, keyed hash, null) — pure functions.
//! * [`lineage`]: which output columns of a statement are computed from masked columns
//!   (Postgres's own parse tree, `policy::pgparse`).
//! * [`catalog`]: rule columns resolved to (table OID, attribute number) through the database's
//!   catalog, cached per database, refreshed after DDL and every minute.
//! * [`relay`]: the per-session state the relay consults: plans built from RowDescription (or
//!   Describe/Bind for the extended protocol, CopyOutResponse for COPY) and the DataRow /
//!   CopyData rewriting. A session none of whose rules apply has no mask state at all, and a
//!   result none of whose columns needs masking or scanning is relayed without decoding rows.
//! * [`strict`] and [`fastpath`]: which statements and fastpath calls a session under a
//!   strict rule may run.

pub mod catalog;
pub mod detect;
pub mod fastpath;
pub mod lineage;
pub mod messages;
pub mod relay;
pub mod strict;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::Identity;
use crate::config::Config;
use crate::policy::PolicyError;
pub use detect::{Detector, Detectors, Style};

/// `[[mask]]` as written.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct MaskSpec {
    name: String,
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    detect: Vec<Detector>,
    #[serde(default)]
    regex: Vec<String>,
    #[serde(default)]
    style: Option<String>,
    #[serde(default)]
    keep: Option<usize>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    except_groups: Vec<String>,
    #[serde(default)]
    except_users: Vec<String>,
    /// Strict masking (default on): statements that use the rule's columns other than in
    /// ways pgward can prove masked are refused (`mask::strict`).
    #[serde(default)]
    strict: Option<bool>,
}

/// `schema.table.column` glob pattern (case-insensitive).
#[derive(Debug, Clone)]
pub struct ColPat {
    pub schema: Option<String>,
    pub table: String,
    pub column: String,
}

impl ColPat {
    fn parse(s: &str) -> Result<ColPat, String> {
        let parts: Vec<String> = s.trim().split('.').map(|p| p.trim().to_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("{s:?} is not SCHEMA.TABLE.COLUMN, TABLE.COLUMN or COLUMN"));
        }
        match parts.as_slice() {
            [c] => Ok(ColPat { schema: None, table: "*".into(), column: c.clone() }),
            [t, c] => Ok(ColPat { schema: None, table: t.clone(), column: c.clone() }),
            [s, t, c] => Ok(ColPat { schema: Some(s.clone()), table: t.clone(), column: c.clone() }),
            _ => Err(format!("{s:?} is not SCHEMA.TABLE.COLUMN, TABLE.COLUMN or COLUMN")),
        }
    }
    /// Does this pattern cover `schema.table` (schema None: unknown, matches any)?
    pub fn covers_table(&self, schema: Option<&str>, table: &str) -> bool {
        let schema_ok = match (&self.schema, schema) {
            (Some(p), Some(s)) => glob(p, &s.to_lowercase()),
            _ => true,
        };
        schema_ok && glob(&self.table, &table.to_lowercase())
    }
    pub fn covers(&self, schema: Option<&str>, table: &str, column: &str) -> bool {
        self.covers_table(schema, table) && glob(&self.column, &column.to_lowercase())
    }
}

/// `*` any run, `?` one character.
pub fn glob(p: &str, s: &str) -> bool {
    crate::policy::glob_match(p.as_bytes(), s.as_bytes())
}

/// A compiled `[[mask]]` rule.
#[derive(Debug, Clone)]
pub struct MaskRule {
    pub name: String,
    pub columns: Vec<ColPat>,
    pub detectors: Detectors,
    pub style: Style,
    pub groups: Vec<String>,
    pub users: Vec<String>,
    pub except_groups: Vec<String>,
    pub except_users: Vec<String>,
    pub strict: bool,
}

impl MaskRule {
    fn applies_to(&self, id: &Identity) -> bool {
        let included = (self.groups.is_empty() && self.users.is_empty())
            || self.users.contains(&id.user)
            || self.groups.iter().any(|g| id.groups.contains(g));
        included && !self.except_users.contains(&id.user) && !self.except_groups.iter().any(|g| id.groups.contains(g))
    }
}

/// Every mask rule of the policy, the hash key and the catalog cache.
pub struct MaskPolicy {
    pub rules: Vec<MaskRule>,
    key: Vec<u8>,
    pub catalog: catalog::Catalog,
}

impl std::fmt::Debug for MaskPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskPolicy").field("rules", &self.rules.len()).finish()
    }
}

/// At most this many `[[mask]]` rules (rule sets are u64 bitmasks).
pub const MAX_RULES: usize = 64;

impl MaskPolicy {
    /// The `[[mask]]` rules of the files in `policy.files`; the keyed-hash key is derived from
    /// the token-signing key (`auth.signing_key`).
    pub fn load(cfg: &Config) -> Result<MaskPolicy, PolicyError> {
        let paths: Vec<PathBuf> = cfg.policy.files.iter().map(|p| cfg.resolve(p)).collect();
        let mut sources = Vec::new();
        for p in &paths {
            let text = std::fs::read_to_string(p).map_err(|source| PolicyError::Read { path: p.clone(), source })?;
            sources.push((p.clone(), text));
        }
        let key_path = cfg.resolve(&cfg.auth.signing_key);
        let key_material = std::fs::read(&key_path).map_err(|source| PolicyError::Read { path: key_path, source })?;
        MaskPolicy::from_sources(&sources, &key_material)
    }

    /// Masks from (name, TOML text) pairs; `key_material` seeds the keyed hash.
    pub fn from_sources(sources: &[(PathBuf, String)], key_material: &[u8]) -> Result<MaskPolicy, PolicyError> {
        let mut rules: Vec<MaskRule> = Vec::new();
        for (path, text) in sources {
            let bad = |msg: String| PolicyError::Invalid { path: path.clone(), msg };
            let table: toml::Table =
                toml::from_str(text).map_err(|e| PolicyError::Parse { path: path.clone(), msg: e.to_string() })?;
            let Some(masks) = table.get("mask") else { continue };
            let specs: Vec<MaskSpec> = masks
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| bad(format!("[[mask]]: {e}")))?;
            for s in specs {
                let r = compile(&s).map_err(|m| bad(format!("mask {:?}: {m}", s.name)))?;
                if rules.iter().any(|x| x.name == r.name) {
                    return Err(bad(format!("mask {:?}: duplicate name", r.name)));
                }
                rules.push(r);
            }
        }
        if rules.len() > MAX_RULES {
            return Err(PolicyError::Invalid {
                path: sources.last().map(|s| s.0.clone()).unwrap_or_default(),
                msg: format!("at most {MAX_RULES} [[mask]] rules"),
            });
        }
        Ok(MaskPolicy { rules, key: derive_key(key_material), catalog: catalog::Catalog::default() })
    }

    pub fn none() -> MaskPolicy {
        MaskPolicy { rules: Vec::new(), key: Vec::new(), catalog: catalog::Catalog::default() }
    }

    /// Rules that apply to `id`, as bits (exemptions applied).
    pub fn active_for(&self, id: &Identity) -> u64 {
        self.rule_bits(|r| r.applies_to(id))
    }

    /// The rules (bits) for which `pred` holds.
    fn rule_bits(&self, pred: impl Fn(&MaskRule) -> bool) -> u64 {
        self.rules.iter().enumerate().filter(|(_, r)| pred(r)).fold(0, |b, (i, _)| b | 1 << i)
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Rules (bits) having column patterns.
    pub fn column_rules(&self) -> u64 {
        self.rule_bits(|r| !r.columns.is_empty())
    }

    /// Rules (bits) with a column pattern that may cover a table of `schema`.
    pub fn schema_rules(&self, schema: &str) -> u64 {
        let schema = schema.to_lowercase();
        self.rule_bits(|r| r.columns.iter().any(|p| p.schema.as_deref().is_none_or(|s| glob(s, &schema))))
    }

    /// Rules (bits) of style `hash`.
    pub fn hashed_rules(&self) -> u64 {
        self.rule_bits(|r| r.style == Style::Hash)
    }

    /// Column rules (bits) under strict masking.
    pub fn strict_rules(&self) -> u64 {
        self.rule_bits(|r| r.strict && !r.columns.is_empty())
    }

    /// Rules whose columns an identifier in an opaque body may name: a masked column's name
    /// or a rule table's name (patterns with a `*` table match by column only).
    pub fn ident_rules(&self, ident: &str) -> u64 {
        self.rule_bits(|r| r.columns.iter().any(|p| glob(&p.column, ident) || (p.table != "*" && glob(&p.table, ident))))
    }

    /// Rules covering `schema.table.column` (column None: any column of the table).
    pub fn rules_for(&self, schema: Option<&str>, table: &str, column: Option<&str>) -> u64 {
        self.rule_bits(|r| {
            r.columns.iter().any(|p| match column {
                Some(c) => p.covers(schema, table, c),
                None => p.covers_table(schema, table),
            })
        })
    }
}

/// HMAC key for the `hash` style: SHA-256 over a label and the signing key's file. Rotating
/// the signing key changes every hashed value.
fn derive_key(material: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::new().chain_update(b"pgward-mask-hash-key-v1\0").chain_update(material).finalize().to_vec()
}

fn compile(s: &MaskSpec) -> Result<MaskRule, String> {
    if s.name.trim().is_empty() {
        return Err("empty name".into());
    }
    let columns = s.columns.iter().map(|c| ColPat::parse(c)).collect::<Result<Vec<_>, _>>()?;
    let mut regexes = Vec::new();
    for r in &s.regex {
        regexes.push(regex::bytes::Regex::new(r).map_err(|e| format!("regex {r:?}: {e}"))?);
    }
    if columns.is_empty() && s.detect.is_empty() && regexes.is_empty() {
        return Err("needs at least one of columns, detect, regex".into());
    }
    let style = match s.style.as_deref().unwrap_or("full") {
        "full" => Style::Full,
        "keep_last" | "last" => Style::KeepLast(s.keep.unwrap_or(4)),
        "hash" => Style::Hash,
        "null" => Style::Null,
        other => return Err(format!("unknown style {other:?} (full, keep_last, hash, null)")),
    };
    if s.keep.is_some() && !matches!(style, Style::KeepLast(_)) {
        return Err("`keep` only goes with style = \"keep_last\"".into());
    }
    Ok(MaskRule {
        name: s.name.clone(),
        columns,
        detectors: Detectors { builtin: s.detect.clone(), regexes },
        style,
        groups: s.groups.clone(),
        users: s.users.clone(),
        except_groups: s.except_groups.clone(),
        except_users: s.except_users.clone(),
        strict: s.strict.unwrap_or(true),
    })
}

/// What a session's relay needs: the policy and which of its rules apply.
#[derive(Clone)]
pub struct SessionMask {
    pub policy: Arc<MaskPolicy>,
    pub active: u64,
    pub database: String,
}

impl SessionMask {
    pub fn rule(&self, i: usize) -> &MaskRule {
        &self.policy.rules[i]
    }
    /// Active rules with content detectors.
    pub fn content_rules(&self) -> impl Iterator<Item = &MaskRule> {
        self.policy.rules.iter().enumerate().filter(move |(i, r)| self.active & (1 << i) != 0 && !r.detectors.is_empty()).map(|(_, r)| r)
    }
    pub fn has_content(&self) -> bool {
        self.content_rules().next().is_some()
    }
    pub fn column_rules(&self) -> u64 {
        self.policy.column_rules() & self.active
    }
    /// Active column rules under strict masking.
    pub fn strict_rules(&self) -> u64 {
        self.policy.strict_rules() & self.active
    }
    /// The names of the rules in `bits`, comma-separated.
    pub fn rule_names(&self, bits: u64) -> String {
        let names: Vec<&str> =
            self.policy.rules.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, r)| r.name.as_str()).collect();
        names.join(", ")
    }
}

/// Load the policy's masks for `serve` (no policy files: no masks).
pub fn load_for_serve(cfg: &Config) -> Result<Arc<MaskPolicy>, PolicyError> {
    if cfg.policy.files.is_empty() {
        return Ok(Arc::new(MaskPolicy::none()));
    }
    Ok(Arc::new(MaskPolicy::load(cfg)?))
}

pub fn path_display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            jti: "j".into(),
            expires_at: i64::MAX,
            issued_at: 0,
        }
    }

    #[test]
    fn parse_and_exempt() {
        let text = r#"
[defaults]
action = "allow"

[[mask]]
name = "cards"
columns = ["public.customers.card"]
detect = ["card"]
style = "keep_last"
keep = 4
except_groups = ["pii_readers"]

[[mask]]
name = "emails"
columns = ["*.*.email", "contact_*"]
detect = ["email"]
regex = ["EMP-[0-9]{6}"]
style = "hash"
"#;
        let p = MaskPolicy::from_sources(&[(PathBuf::from("t.toml"), text.into())], b"key").unwrap();
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.active_for(&id("a", &["support"])), 0b11);
        assert_eq!(p.active_for(&id("a", &["pii_readers"])), 0b10);
        assert_eq!(p.rules_for(Some("public"), "customers", Some("card")), 1);
        assert_eq!(p.rules_for(None, "Customers", Some("CARD")), 1);
        assert_eq!(p.rules_for(Some("other"), "customers", Some("card")), 0);
        assert_eq!(p.rules_for(Some("x"), "y", Some("email")), 2);
        assert_eq!(p.rules_for(None, "t", Some("contact_phone")), 2);
        assert_eq!(p.rules_for(None, "customers", None), 3);
        for bad in [
            "[[mask]]\nname = \"x\"\n",
            "[[mask]]\nname = \"x\"\ncolumns = [\"a.b.c.d\"]\n",
            "[[mask]]\nname = \"x\"\ndetect = [\"dna\"]\n",
            "[[mask]]\nname = \"x\"\nregex = [\"(\"]\n",
            "[[mask]]\nname = \"x\"\ncolumns = [\"c\"]\nstyle = \"blur\"\n",
            "[[mask]]\nname = \"x\"\ncolumns = [\"c\"]\nkeep = 2\n",
            "[[mask]]\nname = \"x\"\ncolumns = [\"c\"]\nbogus = 1\n",
        ] {
            assert!(MaskPolicy::from_sources(&[(PathBuf::from("t.toml"), bad.into())], b"k").is_err(), "{bad}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("*card*", "credit_card_no"));
        assert!(!glob("card", "cards"));
        assert!(glob("c?rd", "card"));
    }
}
