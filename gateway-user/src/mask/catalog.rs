//! Rule columns resolved through the catalog: `schema.table.column` patterns → (table OID,
//! attribute number), which is what RowDescription carries — so `SELECT card AS x`, `SELECT *`,
//! `TABLE customers`, views' plain columns and cursors are matched whatever the output name.
//!
//! pgward reads `pg_attribute` on a connection of its own (the service role, `application_name
//! = pgward:catalog`) to the session's database. Snapshots are cached per database, reloaded
//! in the background after a session sees DDL succeed (CREATE/ALTER/DROP …) and when older
//! than [`MAX_AGE`]. Until a reload lands, lineage (which works on names) still covers direct
//! references; see policies/README.md for the window this leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::MaskPolicy;
use crate::upstream::{self, Target};
use crate::wire::{self, Reader};

/// A snapshot older than this is reloaded (in the background) when next used.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// Rule columns of one database.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (table OID, attnum) → rule bits.
    pub cols: HashMap<(u32, i16), u64>,
    /// (schema, table) of tables with masked columns → their column names in attnum order.
    pub tables: HashMap<(String, String), Vec<String>>,
    /// Columns of views (and materialized views) computed from masked columns, not plain
    /// references: they are masked as derived values.
    pub derived: std::collections::HashSet<(u32, i16)>,
    /// (schema, relation) → (column, rule bits) for views over masked columns and for tables
    /// that inherit from a rule table (partitions, children): their names are not the rule's,
    /// their columns are (for lineage and strict masking).
    pub views: HashMap<(String, String), Vec<(String, u64)>>,
    /// (schema, table) → (column, rule bits) for generated columns computed from masked
    /// columns (`GENERATED ALWAYS AS (upper(notes))`): masked as derived values, and named
    /// in lineage and strict masking like masked columns.
    pub generated: HashMap<(String, String), Vec<(String, u64)>>,
    pub loaded: Option<Instant>,
}

impl Snapshot {
    pub fn rules_at(&self, oid: u32, attnum: i16) -> u64 {
        self.cols.get(&(oid, attnum)).copied().unwrap_or(0)
    }
    pub fn is_derived(&self, oid: u32, attnum: i16) -> bool {
        self.derived.contains(&(oid, attnum))
    }
    /// Rule bits of a view's column (column None: any column), by name.
    pub fn view_rules(&self, schema: Option<&str>, view: &str, column: Option<&str>) -> u64 {
        let mut b = 0;
        for ((s, v), cols) in self.views.iter().chain(&self.generated) {
            if v != view || schema.is_some_and(|x| x != s) {
                continue;
            }
            for (c, bits) in cols {
                if column.is_none_or(|x| x == c) {
                    b |= bits;
                }
            }
        }
        b
    }
    /// Column names of `table` (unqualified: the first schema holding one of that name).
    pub fn columns_of(&self, schema: Option<&str>, table: &str) -> Option<Vec<String>> {
        let view = |s: &str| self.views.get(&(s.to_string(), table.to_string())).map(|c| c.iter().map(|(n, _)| n.clone()).collect());
        if let Some(s) = schema
            && let Some(v) = view(s)
        {
            return Some(v);
        }
        if schema.is_none() {
            let mut hits = self.views.iter().filter(|((_, v), _)| v == table);
            if let (Some(first), None) = (hits.next(), hits.next())
                && !self.tables.keys().any(|(_, t)| t == table)
            {
                return Some(first.1.iter().map(|(n, _)| n.clone()).collect());
            }
        }
        match schema {
            Some(s) => self.tables.get(&(s.to_string(), table.to_string())).cloned(),
            None => {
                let mut hits = self.tables.iter().filter(|((_, t), _)| t == table);
                let first = hits.next()?;
                // Ambiguous (same name in several schemas): the layout is unknown.
                if hits.next().is_some() {
                    return None;
                }
                Some(first.1.clone())
            }
        }
    }
}

struct Entry {
    snap: Option<Arc<Snapshot>>,
    loading: bool,
    /// Invalidated while a load was running: load again when it ends.
    again: bool,
}

/// Per-database snapshots.
#[derive(Default)]
pub struct Catalog {
    dbs: Mutex<HashMap<String, Entry>>,
}

/// How pgward reaches the database for catalog reads.
#[derive(Clone)]
pub struct Access {
    pub target: Target,
    pub user: String,
    pub password: Option<String>,
}

impl Catalog {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        crate::lock(&self.dbs)
    }

    /// The current snapshot of `db`, without waiting. Starts a background reload when it is
    /// missing, stale or marked dirty.
    pub fn current(&self, policy: &Arc<MaskPolicy>, access: &Access, db: &str) -> Option<Arc<Snapshot>> {
        let (snap, reload) = {
            let g = self.lock();
            match g.get(db) {
                Some(e) => {
                    let stale = e.snap.as_ref().is_none_or(|s| s.loaded.is_none_or(|t| t.elapsed() > MAX_AGE));
                    (e.snap.clone(), stale && !e.loading)
                }
                None => (None, true),
            }
        };
        if reload {
            self.spawn_reload(policy, access, db);
        }
        snap
    }

    /// Wait for a snapshot of `db` (loading it if there is none yet).
    pub async fn get(&self, policy: &Arc<MaskPolicy>, access: &Access, db: &str) -> Option<Arc<Snapshot>> {
        if let Some(s) = self.lock().get(db).and_then(|e| e.snap.clone()) {
            if s.loaded.is_some_and(|t| t.elapsed() <= MAX_AGE) {
                return Some(s);
            }
        }
        match load(policy, access, db).await {
            Ok(s) => {
                let s = Arc::new(s);
                self.lock().insert(db.to_string(), Entry { snap: Some(s.clone()), loading: false, again: false });
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, database = db, "masking: reading the catalog failed");
                self.lock().get(db).and_then(|e| e.snap.clone())
            }
        }
    }

    /// DDL ran in `db`: reload its snapshot now (in the background).
    pub fn invalidate(&self, policy: &Arc<MaskPolicy>, access: &Access, db: &str) {
        self.spawn_reload(policy, access, db);
    }

    fn spawn_reload(&self, policy: &Arc<MaskPolicy>, access: &Access, db: &str) {
        {
            let mut g = self.lock();
            let e = g.entry(db.to_string()).or_insert(Entry { snap: None, loading: false, again: false });
            if e.loading {
                e.again = true;
                return;
            }
            e.loading = true;
        }
        let (policy, access, db) = (policy.clone(), access.clone(), db.to_string());
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            loop {
                let r = load(&policy, &access, &db).await;
                let mut g = policy.catalog.lock();
                let e = g.entry(db.clone()).or_insert(Entry { snap: None, loading: false, again: false });
                match r {
                    Ok(s) => e.snap = Some(Arc::new(s)),
                    Err(err) => tracing::warn!(error = %err, database = %db, "masking: reloading the catalog failed"),
                }
                if e.again {
                    e.again = false;
                    continue;
                }
                e.loading = false;
                break;
            }
        });
    }
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A glob as an ILIKE pattern (`\` escapes).
fn like(glob: &str) -> String {
    let mut out = String::new();
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The catalog query for the policy's column patterns (None: no column rules).
pub fn catalog_sql(policy: &MaskPolicy) -> Option<String> {
    let mut conds = Vec::new();
    for r in &policy.rules {
        for p in &r.columns {
            let mut c = format!("c.relname ILIKE {}", sql_literal(&like(&p.table)));
            match &p.schema {
                Some(s) => c.push_str(&format!(" AND n.nspname ILIKE {}", sql_literal(&like(s)))),
                None => c.push_str(" AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"),
            }
            conds.push(format!("({c})"));
        }
    }
    if conds.is_empty() {
        return None;
    }
    Some(format!(
        "SELECT c.oid, a.attnum, n.nspname, c.relname, a.attname FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r','p','v','m','f') AND ({}) \
         ORDER BY c.oid, a.attnum",
        conds.join(" OR ")
    ))
}

/// Run one query on a catalog connection: its rows as text.
/// A catalog connection to `db` as the service role (`application_name = pgward:catalog`),
/// and the bytes that arrived with its login.
pub(crate) async fn connect(
    target: &Target,
    user: &str,
    password: Option<&str>,
    db: &str,
) -> Result<(upstream::Upstream, BytesMut), String> {
    let mut up = upstream::connect(target, user, password, db, &[("application_name", "pgward:catalog")])
        .await
        .map_err(|e| e.to_string())?;
    let buf = std::mem::take(&mut up.leftover);
    Ok((up, buf))
}

pub(crate) async fn rows(up: &mut upstream::Upstream, buf: &mut BytesMut, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let mut out = BytesMut::new();
    wire::query(&mut out, sql);
    up.stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut failure = None;
    loop {
        let f = wire::read_frame(&mut up.stream, buf, wire::MAX_FRAME).await.map_err(|e| e.to_string())?;
        match f.tag {
            b'D' => rows.push(data_row_text(f.body()).ok_or("malformed catalog row")?),
            b'E' => failure = Some(wire::decode_error(&f).message),
            b'Z' => break,
            _ => {}
        }
    }
    match failure {
        Some(m) => Err(m),
        None => Ok(rows),
    }
}

/// Lineage of view definitions: rules from the policy and the views resolved so far.
struct ViewResolver<'a> {
    policy: &'a MaskPolicy,
    snap: &'a Snapshot,
}

impl super::lineage::Resolver for ViewResolver<'_> {
    fn rules_for(&self, schema: Option<&str>, table: &str, column: Option<&str>) -> u64 {
        self.policy.rules_for(schema, table, column) | self.snap.view_rules(schema, table, column)
    }
    fn columns_of(&self, schema: Option<&str>, table: &str) -> Option<Vec<String>> {
        self.snap.columns_of(schema, table)
    }
}

/// How long a catalog load may take before it is given up (the snapshot stays as it was).
const LOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// How many levels of views over views over masked columns are followed.
const VIEW_DEPTH: usize = 4;

async fn load(policy: &MaskPolicy, access: &Access, db: &str) -> Result<Snapshot, String> {
    let Some(sql) = catalog_sql(policy) else {
        return Ok(Snapshot { loaded: Some(Instant::now()), ..Default::default() });
    };
    // A snapshot is as of the moment its load started (DDL after that makes it stale).
    let started = Instant::now();
    let fut = async {
        let (mut up, mut buf) = connect(&access.target, &access.user, access.password.as_deref(), db).await?;
        let mut snap = Snapshot::default();
        let (mut masked_oids, by_oid) = rule_columns(policy, &mut up, &mut buf, &sql, &mut snap).await?;
        inherit(&mut up, &mut buf, &mut snap, &mut masked_oids, &by_oid).await?;
        generated(&mut up, &mut buf, &mut snap, &masked_oids).await?;
        views(policy, &mut up, &mut buf, &mut snap, &masked_oids).await?;
        let mut t = BytesMut::new();
        wire::message(&mut t, b'X', &[]);
        let _ = up.stream.write_all(&t).await;
        let _ = up.stream.shutdown().await;
        snap.loaded = Some(started);
        Ok(snap)
    };
    match tokio::time::timeout(LOAD_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

/// Columns of the policy's rule tables, by the catalog query `sql`: into `snap.cols` (masked
/// ones) and `snap.tables` (tables with a masked column). Returns the OIDs of tables with a
/// masked column, and OID → (column, rule bits) of every rule table, for its children.
async fn rule_columns(
    policy: &MaskPolicy,
    up: &mut upstream::Upstream,
    buf: &mut BytesMut,
    sql: &str,
    snap: &mut Snapshot,
) -> Result<(Vec<u32>, HashMap<u32, Vec<(String, u64)>>), String> {
    let mut masked_oids: Vec<u32> = Vec::new();
    let mut by_oid: HashMap<u32, Vec<(String, u64)>> = HashMap::new();
    for row in rows(up, buf, sql).await? {
        let [Some(oid), Some(attnum), Some(schema), Some(table), Some(column)] = row.as_slice() else {
            return Err("unexpected catalog row".to_string());
        };
        let oid: u32 = oid.parse().map_err(|_| "bad oid")?;
        let attnum: i16 = attnum.parse().map_err(|_| "bad attnum")?;
        let bits = policy.rules_for(Some(schema), table, Some(column));
        by_oid.entry(oid).or_default().push((column.to_lowercase(), bits));
        if bits != 0 {
            snap.cols.insert((oid, attnum), bits);
            if !masked_oids.contains(&oid) {
                masked_oids.push(oid);
            }
        }
        if policy.rules_for(Some(schema), table, None) != 0 {
            snap.tables.entry((schema.to_lowercase(), table.to_lowercase())).or_default().push(column.to_lowercase());
        }
    }
    // Keep only tables that actually have a masked column.
    let masked_tables: std::collections::HashSet<(String, String)> = snap
        .tables
        .iter()
        .filter(|((s, t), cols)| cols.iter().any(|c| policy.rules_for(Some(s), t, Some(c)) != 0))
        .map(|(k, _)| k.clone())
        .collect();
    snap.tables.retain(|k, _| masked_tables.contains(k));
    Ok((masked_oids, by_oid))
}

/// Generated columns of tables with masked columns that are computed from a masked column
/// (the dependencies of their expressions, `pg_depend` of `pg_attrdef`): masked as derived
/// values of the rules of the columns they are computed from.
async fn generated(up: &mut upstream::Upstream, buf: &mut BytesMut, snap: &mut Snapshot, masked_oids: &[u32]) -> Result<(), String> {
    if masked_oids.is_empty() {
        return Ok(());
    }
    let list = masked_oids.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(",");
    let q = format!(
        "SELECT ad.adrelid, ad.adnum, d.refobjsubid, n.nspname, c.relname, a.attname FROM pg_catalog.pg_attrdef ad \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum AND a.attgenerated <> '' \
         JOIN pg_catalog.pg_class c ON c.oid = ad.adrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid \
         AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = ad.adrelid \
         WHERE ad.adrelid IN ({list}) ORDER BY 1, 2"
    );
    for row in rows(up, buf, &q).await? {
        let [Some(oid), Some(attnum), Some(source), Some(schema), Some(table), Some(column)] = row.as_slice() else {
            return Err("unexpected catalog row".to_string());
        };
        let (Ok(oid), Ok(attnum), Ok(source)) = (oid.parse::<u32>(), attnum.parse::<i16>(), source.parse::<i16>()) else {
            return Err("unexpected catalog row".to_string());
        };
        let bits = snap.rules_at(oid, source);
        if bits == 0 {
            continue;
        }
        *snap.cols.entry((oid, attnum)).or_default() |= bits;
        snap.derived.insert((oid, attnum));
        let cols = snap.generated.entry((schema.to_lowercase(), table.to_lowercase())).or_default();
        match cols.iter_mut().find(|(c, _)| *c == column.to_lowercase()) {
            Some((_, b)) => *b |= bits,
            None => cols.push((column.to_lowercase(), bits)),
        }
    }
    Ok(())
}

/// Views over masked columns (and views over those, [`VIEW_DEPTH`] levels): a view's columns
/// carry the view's OID in RowDescription, so each view definition goes through lineage.
async fn views(
    policy: &MaskPolicy,
    up: &mut upstream::Upstream,
    buf: &mut BytesMut,
    snap: &mut Snapshot,
    masked_oids: &[u32],
) -> Result<(), String> {
    let mut frontier = masked_oids.to_vec();
    let mut seen: std::collections::HashSet<u32> = masked_oids.iter().copied().collect();
    for _round in 0..VIEW_DEPTH {
        if frontier.is_empty() {
            break;
        }
        let list = frontier.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(",");
        let q = format!(
            "SELECT v.oid, n.nspname, v.relname, pg_catalog.pg_get_viewdef(v.oid), \
             pg_catalog.array_to_string(ARRAY(SELECT a.attname FROM pg_catalog.pg_attribute a \
               WHERE a.attrelid = v.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum), chr(31)) \
             FROM pg_catalog.pg_class v JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace \
             WHERE v.relkind IN ('v', 'm') AND v.oid IN (SELECT r.ev_class FROM pg_catalog.pg_depend d \
               JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
               WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
               AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid IN ({list}))"
        );
        frontier.clear();
        for row in rows(up, buf, &q).await? {
            let [Some(oid), Some(schema), Some(name), Some(def), Some(cols)] = row.as_slice() else { continue };
            let Ok(oid) = oid.parse::<u32>() else { continue };
            if !seen.insert(oid) {
                continue;
            }
            let cols: Vec<String> = cols.split('\u{1f}').map(|c| c.to_lowercase()).collect();
            let vcols = view_columns(policy, snap, oid, def, &cols);
            if vcols.iter().any(|(_, b)| *b != 0) {
                snap.views.insert((schema.to_lowercase(), name.to_lowercase()), vcols);
                frontier.push(oid);
            }
        }
    }
    Ok(())
}

/// The rule bits of each column `cols` of view `oid` (definition `def`), by lineage; masked
/// ones go into `snap.cols`, and computed ones into `snap.derived`.
fn view_columns(policy: &MaskPolicy, snap: &mut Snapshot, oid: u32, def: &str, cols: &[String]) -> Vec<(String, u64)> {
    let res = ViewResolver { policy, snap };
    let taints = match super::lineage::analyze(def, &res).as_deref() {
        Some([super::lineage::StmtKind::Rows(l)]) => l.columns(cols.len()),
        _ => None,
    };
    let mut vcols = Vec::new();
    for (i, c) in cols.iter().enumerate() {
        // A definition lineage cannot follow: every column may carry masked data.
        let t = match &taints {
            Some(t) => t.get(i).copied().unwrap_or_default(),
            None => super::lineage::Taint { rules: policy.rules_for(None, "*", None), direct: false },
        };
        vcols.push((c.clone(), t.rules));
        if t.rules != 0 {
            let attnum = (i + 1) as i16;
            snap.cols.insert((oid, attnum), t.rules);
            if !t.direct {
                snap.derived.insert((oid, attnum));
            }
        }
    }
    vcols
}

/// Tables that inherit from a rule table (partitions, at any depth) carry its rules on the
/// columns of the same name: `SELECT card FROM customers_2024` is the parent's data.
async fn inherit(
    up: &mut upstream::Upstream,
    buf: &mut BytesMut,
    snap: &mut Snapshot,
    masked_oids: &mut Vec<u32>,
    by_oid: &HashMap<u32, Vec<(String, u64)>>,
) -> Result<(), String> {
    if masked_oids.is_empty() {
        return Ok(());
    }
    let list = masked_oids.iter().map(|o| o.to_string()).collect::<Vec<_>>().join(",");
    let q = format!(
        "WITH RECURSIVE kids(oid, root) AS (SELECT i.inhrelid, i.inhparent FROM pg_catalog.pg_inherits i            WHERE i.inhparent IN ({list})            UNION SELECT i.inhrelid, k.root FROM pg_catalog.pg_inherits i JOIN kids k ON i.inhparent = k.oid)          SELECT k.oid, k.root, a.attnum, n.nspname, c.relname, a.attname FROM kids k          JOIN pg_catalog.pg_class c ON c.oid = k.oid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace          JOIN pg_catalog.pg_attribute a ON a.attrelid = k.oid WHERE a.attnum > 0 AND NOT a.attisdropped          ORDER BY k.oid, a.attnum"
    );
    for row in rows(up, buf, &q).await? {
        let [Some(oid), Some(root), Some(attnum), Some(schema), Some(table), Some(column)] = row.as_slice() else {
            return Err("unexpected catalog row".to_string());
        };
        let (Ok(oid), Ok(root), Ok(attnum)) = (oid.parse::<u32>(), root.parse::<u32>(), attnum.parse::<i16>()) else {
            return Err("unexpected catalog row".to_string());
        };
        let column = column.to_lowercase();
        let bits = by_oid.get(&root).and_then(|cols| cols.iter().find(|(c, _)| *c == column)).map_or(0, |(_, b)| *b);
        if bits != 0 {
            snap.cols.insert((oid, attnum), bits);
            if !masked_oids.contains(&oid) {
                masked_oids.push(oid);
            }
        }
        snap.views.entry((schema.to_lowercase(), table.to_lowercase())).or_default().push((column, bits));
    }
    Ok(())
}

/// A DataRow's columns as text (None = NULL).
pub fn data_row_text(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut r = Reader::new(body);
    let n = r.i16().ok()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32().ok()?;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(String::from_utf8_lossy(r.bytes(len as usize).ok()?).into_owned()));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn sql_for_patterns() {
        let text = "[[mask]]\nname = \"c\"\ncolumns = [\"public.cust_omers.card\", \"o'x.*\"]\n";
        let p = MaskPolicy::from_sources(&[(PathBuf::from("t"), text.into())], b"k").unwrap();
        let sql = catalog_sql(&p).unwrap();
        assert!(sql.contains("c.relname ILIKE 'cust\\_omers' AND n.nspname ILIKE 'public'"), "{sql}");
        assert!(sql.contains("c.relname ILIKE 'o''x'"), "{sql}");
        assert!(catalog_sql(&MaskPolicy::none()).is_none());
    }
}
