//! The function catalogs of the databases sessions use, loaded for policy rules that name
//! catalog function classes (`@volatile`, `@security_definer`, `@dynamic_sql`, `@outside`; the
//! pure side is [`crate::policy::functions`]), strict masking and the durability rule.
//!
//! pgward reads `pg_proc` on a connection of its own (the service role, `application_name =
//! pgward:catalog`) to the session's database: before a session's first statement when the
//! database has no catalog yet, in the background when the catalog is older than [`MAX_AGE`]
//! or a session ran DDL that can create or change functions. Until a catalog is there, every
//! function is in every class (rules denying a class deny every call: fail closed).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::policy::functions::{CATALOG_SQL, FunctionCatalog, ProcRow};
use super::Shared;

/// A catalog older than this is reloaded (in the background) when a session starts.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// How long a session waits for a first load before it goes on without a catalog.
const FIRST_LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Which databases have a catalog on the policy, and since when; loads under way.
#[derive(Default)]
pub struct FunctionCatalogs {
    loaded: Mutex<HashMap<String, Instant>>,
    reloading: Mutex<HashSet<String>>,
    /// One first load per database: sessions that start together (after a restart, say)
    /// wait for the same load instead of each running its own.
    first_loads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl FunctionCatalogs {
    /// Make sure the policy has a catalog for `db`: load it now if it has none, reload it in
    /// the background if it is old.
    pub async fn ensure(&self, shared: &Arc<Shared>, db: &str) {
        if !needed(shared) {
            return;
        }
        let age = self.age(db);
        match age {
            None => {
                let gate = self.first_loads.lock().unwrap_or_else(PoisonError::into_inner).entry(db.to_string()).or_default().clone();
                let _first = gate.lock().await;
                if self.age(db).is_some() {
                    return;
                }
                match tokio::time::timeout(FIRST_LOAD_TIMEOUT, load(shared, db)).await {
                    Ok(Ok(cat)) => self.set(shared, db, cat),
                    Ok(Err(e)) => tracing::warn!(database = db, error = %e, "function catalog not loaded; catalog function classes match every function"),
                    Err(_) => tracing::warn!(database = db, "function catalog load timed out; catalog function classes match every function"),
                }
            }
            Some(a) if a > MAX_AGE => self.reload(shared, db),
            Some(_) => {}
        }
    }

    /// How old `db`'s catalog is, if it has one.
    fn age(&self, db: &str) -> Option<Duration> {
        self.loaded.lock().unwrap_or_else(PoisonError::into_inner).get(db).map(Instant::elapsed)
    }

    /// Reload `db`'s catalog in the background (after DDL that may have changed functions).
    pub fn reload(&self, shared: &Arc<Shared>, db: &str) {
        if !needed(shared) {
            return;
        }
        if !self.reloading.lock().unwrap_or_else(PoisonError::into_inner).insert(db.to_string()) {
            return;
        }
        let (shared, db) = (shared.clone(), db.to_string());
        tokio::spawn(async move {
            let r = load(&shared, &db).await;
            let me = &shared.fn_catalogs;
            match r {
                Ok(cat) => me.set(&shared, &db, cat),
                Err(e) => tracing::warn!(database = %db, error = %e, "function catalog reload failed; keeping the previous one"),
            }
            me.reloading.lock().unwrap_or_else(PoisonError::into_inner).remove(&db);
        });
    }

    fn set(&self, shared: &Shared, db: &str, cat: FunctionCatalog) {
        tracing::debug!(database = db, functions = cat.len(), "function catalog loaded");
        shared.policy.set_function_catalog(db, cat);
        self.loaded.lock().unwrap_or_else(PoisonError::into_inner).insert(db.to_string(), Instant::now());
    }
}

/// Catalogs are loaded for policy rules that name function classes, for strict masking
/// (which refuses functions that run SQL from text, and functions it does not know), and for
/// the durability rule (a statement calling a volatile function is write-ahead).
fn needed(shared: &Shared) -> bool {
    shared.policy.uses_function_classes()
        || shared.masks.strict_rules() != 0
        || shared.cfg.audit.durability == crate::config::Durability::HoldReply
}

/// Whether a command tag says functions may have been created or changed.
pub fn changes_functions(tag: &str) -> bool {
    let mut w = tag.split(' ');
    matches!(w.next(), Some("CREATE" | "ALTER" | "DROP"))
        && matches!(w.next(), Some("FUNCTION" | "PROCEDURE" | "EXTENSION" | "LANGUAGE" | "AGGREGATE" | "SCHEMA"))
}

async fn load(shared: &Shared, db: &str) -> Result<FunctionCatalog, String> {
    let (mut up, mut buf) = crate::mask::catalog::connect(
        &shared.target,
        &shared.cfg.upstream.user,
        shared.upstream_password.as_deref(),
        db,
    )
    .await?;
    let rows = crate::mask::catalog::rows(&mut up, &mut buf, CATALOG_SQL).await?;
    let procs: Vec<ProcRow> = rows.iter().filter_map(|r| ProcRow::from_text(r)).collect();
    if procs.len() != rows.len() {
        return Err("unexpected pg_proc row".into());
    }
    Ok(FunctionCatalog::from_rows(procs))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ddl_that_changes_functions() {
        for (tag, want) in [
            ("CREATE FUNCTION", true),
            ("ALTER FUNCTION", true),
            ("CREATE EXTENSION", true),
            ("DROP PROCEDURE", true),
            ("CREATE TABLE", false),
            ("SELECT 1", false),
        ] {
            assert_eq!(super::changes_functions(tag), want, "{tag}");
        }
    }
}
