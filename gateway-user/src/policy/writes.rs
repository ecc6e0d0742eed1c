//! Built-in functions that change what the database keeps — a sequence, a large object, a
//! catalog, an index — or what other sessions see (a notification, an advisory lock), when
//! called in any statement. A statement that calls one is a `write` as well as whatever else
//! it is: `SELECT setval('orders_id_seq', 1)` writes like the `ALTER SEQUENCE` it stands for,
//! `SELECT pg_notify('c', 'x')` is `NOTIFY c, 'x'`, and `SELECT pg_advisory_lock(1)` locks as
//! `LOCK` and `SELECT … FOR UPDATE` do, so an allow rule for `read` does not let them through.
//!
//! Names are matched in any schema: a function of another schema with one of these names is
//! taken to write too.

/// The functions, by name.
const WRITING_FUNCTIONS: &[&str] = &[
    // sequences
    "nextval",
    "setval",
    // large objects (server-side; the client-side ones go by fastpath)
    "lo_create",
    "lo_creat",
    "lo_from_bytea",
    "lo_import",
    "lo_put",
    "lo_truncate",
    "lo_truncate64",
    "lo_unlink",
    "lowrite",
    // notifications and advisory locks
    "pg_notify",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    // catalogs, indexes and WAL
    "pg_import_system_collations",
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    "pg_logical_emit_message",
];

/// Whether a call of a function named `name` (lowercased) writes.
pub(super) fn writes(name: &str) -> bool {
    WRITING_FUNCTIONS.contains(&name)
}

#[cfg(test)]
mod tests {
    /// Every name is one the PostgreSQL 15 catalog has (a misspelt entry would protect nothing).
    #[test]
    fn every_name_is_a_postgres_function() {
        let proc = include_str!("testdata/pg15_proc.tsv");
        for name in super::WRITING_FUNCTIONS {
            let listed = proc.lines().any(|l| l.split('\t').nth(1) == Some(*name));
            assert!(listed, "{name} is not in pg_proc");
        }
    }
}
