//! Policies enforced end to end: a denied statement gets SQLSTATE 42501 naming the rule, never
//! reaches Postgres, and leaves the session usable — inside a transaction and in a pipeline it
//! behaves exactly as a statement that failed in Postgres. The audit log records the decision
//! and the rule for allowed and denied statements alike. Startup parameters cannot get around
//! the policy either. The policy (tests/policy_support.rs) is written by the test.

mod common;
#[path = "policy_support.rs"]
mod support;

use common::gateway::rec;
use common::raw::{self, fe};
use common::{cluster, marker, sqlstate, within};
use support::{Env, assert_never_reached_postgres, env, never_marker, statement_and_result};

/// psql without ON_ERROR_STOP: every -c runs, errors are printed with their SQLSTATE.
fn psql_all(login: &common::Login, cmds: &[&str]) -> common::CmdOut {
    let mut args = vec!["-v", "ON_ERROR_STOP=0"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    login.psql(&args)
}

#[test]
fn denied_statements_get_42501_naming_the_rule_and_the_session_stays_usable() {
    let e = env("pe_deny", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let (m_secret, m_insert, m_ok) = (never_marker(), never_marker(), marker("still-usable"));
    let out = psql_all(
        &login,
        &[
            "select count(*) from items",
            &format!("select v from secrets where v <> '{m_secret}'"),
            &format!("insert into items values (100, '{m_insert}')"),
            &format!("select '{m_ok}', current_user"),
        ],
    );
    assert_eq!(out.sqlstates(), vec!["42501", "42501"], "{}", out.describe());
    assert!(
        out.stderr.contains("42501: pgward: permission denied by policy rule \"no-secrets\": the secrets table is off limits"),
        "{}",
        out.describe()
    );
    assert!(out.stderr.contains("policy rule \"default:analysts\""), "{}", out.describe());
    // The same connection answered the statements after the denials, as the analysts' role.
    assert_eq!(out.stdout.trim(), format!("3\n{m_ok}|{}", e.ro), "{}", out.describe());

    // Nothing of the denied statements reached Postgres; the table is unchanged.
    assert_never_reached_postgres(&m_secret);
    assert_never_reached_postgres(&m_insert);
    assert_eq!(cluster().sql(&e.db, "select count(*) from items"), "3");

    // The audit log: decision and rule for allowed and denied statements, the result of a denied
    // statement carries the 42501.
    let (s, r) = statement_and_result(&e.pw, "select count(*) from items");
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("allow"), Some("analysts-read")), "{s}");
    assert_eq!(r["tag"], "SELECT 1", "{r}");
    let (s, r) = statement_and_result(&e.pw, &m_secret);
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("deny"), Some("no-secrets")), "{s}");
    assert_eq!(r["sqlstate"], "42501", "{r}");
    assert!(r["error"].as_str().unwrap_or("").contains("no-secrets"), "{r}");
    let (s, _) = statement_and_result(&e.pw, &m_insert);
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("deny"), Some("default:analysts")), "{s}");
    let (s, _) = statement_and_result(&e.pw, &m_ok);
    assert_eq!(s["decision"], "allow", "{s}");
    assert!(!e.pw.log_has_panic());
}

#[test]
fn built_ins_that_write_are_writes_for_a_read_only_group() {
    let e = env("pe_writing_builtins", |b| b);
    cluster().sql(&e.db, &format!("CREATE SEQUENCE counter; GRANT ALL ON counter TO {}", e.ro));
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let m = never_marker();
    let out = psql_all(
        &login,
        &[
            // The analysts' role may create large objects (no privilege needed) and advance a
            // sequence it was granted; the policy says read-only.
            &format!("select lo_from_bytea(0, convert_to('{m}', 'UTF8'))"),
            &format!("select setval('counter', 42) /* {m} */"),
            &format!("select pg_notify('jobs', '{m}')"),
            &format!("select id from items where pg_try_advisory_lock(id) /* {m} */"),
            "select currval('counter') is null",
        ],
    );
    // currval reads (and fails: no nextval in this session), everything else is refused.
    assert_eq!(out.sqlstates(), vec!["42501", "42501", "42501", "42501", "55000"], "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"default:analysts\"").count(), 4, "{}", out.describe());
    assert_never_reached_postgres(&m);
    assert_eq!(cluster().sql(&e.db, "select count(*) from pg_largeobject_metadata"), "0");
    assert_eq!(cluster().sql(&e.db, "select last_value from counter"), "1");
}

#[test]
fn a_schema_rule_covers_the_functions_of_the_schema() {
    let e = env("pe_schema_functions", |b| {
        b.with_dir(|dir, _| {
            let path = dir.join("test-policy.toml");
            let policy = std::fs::read_to_string(&path).unwrap();
            let rule = "[[rule]]\nname = \"payroll-schema\"\naction = \"deny\"\nschemas = [\"payroll\"]\nreason = \"payroll is off limits\"\n\n";
            std::fs::write(&path, policy.replacen("[[rule]]", &format!("{rule}[[rule]]"), 1)).unwrap();
        })
    });
    // A function of the schema that writes; its owner's rights (SECURITY DEFINER), callable
    // by everyone (functions are executable by PUBLIC unless revoked).
    cluster().sql(
        &e.db,
        &format!(
            "CREATE SCHEMA payroll; GRANT USAGE ON SCHEMA payroll TO {ro}; \
             CREATE FUNCTION payroll.rename_all() RETURNS int LANGUAGE sql SECURITY DEFINER \
             AS $$ UPDATE items SET name = 'renamed' WHERE id > 0 RETURNING 1 $$",
            ro = e.ro
        ),
    );
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let out = psql_all(&login, &["select payroll.rename_all()", "select * from PayRoll.rename_all()", "select 1"]);
    assert_eq!(out.sqlstates(), vec!["42501", "42501"], "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"payroll-schema\"").count(), 2, "{}", out.describe());
    assert_eq!(cluster().sql(&e.db, "select count(*) from items where name = 'renamed'"), "0");
}

#[test]
fn unbounded_writes_are_denied_and_bounded_ones_run() {
    let e = env("pe_nowhere", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let m = never_marker();
    let out = psql_all(
        &login,
        &[
            &format!("delete from items /* {m} */"),
            &format!("update items set name = '{m}'"),
            &format!("update items set name = '{m}' where true"),
            "update items set name = 'uno' where id = 1",
        ],
    );
    assert_eq!(out.sqlstates(), vec!["42501", "42501", "42501"], "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"no-unbounded-writes\"").count(), 3, "{}", out.describe());
    assert_eq!(out.stdout.trim(), "UPDATE 1", "{}", out.describe());
    assert_eq!(cluster().sql(&e.db, "select string_agg(name, ',' order by id) from items"), "uno,two,three");
    assert_never_reached_postgres(&m);
}

#[test]
fn identity_changes_are_denied() {
    let e = env("pe_identity", |b| b);
    let (_, login) = e.login("alice", &["writers"], "15m");
    let out = psql_all(
        &login,
        &[
            "set role postgres",
            &format!("set role {}", e.ro),
            "reset role",
            "set session authorization postgres",
            "select set_config('role', 'postgres', false)",
            "select current_user",
        ],
    );
    assert_eq!(out.sqlstates(), vec!["42501"; 5], "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"builtin:identity-change\"").count(), 5, "{}", out.describe());
    assert_eq!(out.stdout.trim(), e.rw, "still the writers' role: {}", out.describe());
}

#[test]
fn a_denied_statement_inside_begin_makes_commit_roll_back() {
    let e = env("pe_tx", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let keep = marker("in-tx");
    let out = psql_all(
        &login,
        &[
            "begin",
            &format!("insert into items values (10, '{keep}')"),
            "delete from items",
            "select 1",
            "commit",
            "select count(*) from items",
        ],
    );
    // As in Postgres after an error: the transaction is aborted (25P02 for the next
    // statement) and COMMIT rolls it back.
    assert_eq!(out.sqlstates(), vec!["42501", "25P02"], "{}", out.describe());
    assert_eq!(out.stdout.trim(), "BEGIN\nINSERT 0 1\nROLLBACK\n3", "{}", out.describe());
    assert_eq!(cluster().sql(&e.db, &format!("select count(*) from items where name = '{keep}'")), "0");

    let (s, r) = statement_and_result(&e.pw, "delete from items");
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("deny"), Some("no-unbounded-writes")));
    assert_eq!(r["sqlstate"], "42501");
    let (_, r) = statement_and_result(&e.pw, "commit");
    assert_eq!(r["tag"], "ROLLBACK", "{r}");
}

/// Parse/Bind/Execute × 3 and one Sync, with the middle statement failing at Parse: through
/// pgward (a policy denial) exactly as in Postgres (a syntax error) — the first ran, the rest
/// up to Sync were skipped, and the implicit transaction was rolled back.
#[test]
fn pipeline_with_a_denied_statement_skips_to_sync_like_postgres() {
    let e = env("pe_pipeline", |b| b);
    let c = cluster();
    let run = |login: &common::Login, middle: &str, base: i32| -> Vec<raw::Msg> {
        let mut conn = login.raw().expect("raw login");
        let mut batch = Vec::new();
        for sql in [format!("insert into items values ({base}, 'first')"), middle.to_string(), format!("insert into items values ({}, 'third')", base + 1)] {
            batch.extend(fe::parse("", &sql));
            batch.extend(fe::bind_text("", "", &[]));
            batch.extend(fe::execute("", 0));
        }
        batch.extend(fe::sync());
        conn.send(&batch).unwrap();
        let msgs = conn.recv_until_ready().unwrap();
        // The connection is still usable.
        let after = conn.simple_query("select 'after'").unwrap();
        assert_eq!(raw::rows(&after), vec![vec![Some("after".to_string())]]);
        let _ = conn.terminate();
        msgs
    };
    let direct = run(&c.svc_unix_login(&e.db), "selec 1", 50);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let via = run(&login, "delete from items", 60);

    let shape = |msgs: &[raw::Msg]| -> Vec<String> {
        msgs.iter()
            .map(|m| match m.tag {
                b'E' => format!("E {}", m.sqlstate().unwrap_or_default()),
                b'C' => format!("C {}", m.command_tag().unwrap_or_default()),
                t => (t as char).to_string(),
            })
            .collect()
    };
    assert_eq!(shape(&direct), ["1", "2", "C INSERT 0 1", "E 42601", "Z"], "Postgres itself");
    assert_eq!(shape(&via), ["1", "2", "C INSERT 0 1", "E 42501", "Z"], "through pgward");
    let err = raw::first_error(&via).unwrap().fields();
    assert!(err[&'M'].contains("no-unbounded-writes"), "{err:?}");
    assert_eq!(c.sql(&e.db, "select count(*) from items where id >= 50"), "0", "rolled back, third never ran");
    assert_eq!(c.sql(&e.db, "select count(*) from items"), "3");

    // Audit: the first insert ran; the third is recorded as not executed; the denial names its rule.
    let (s, r) = statement_and_result(&e.pw, "values (60, 'first')");
    assert_eq!(s["decision"], "allow");
    assert_eq!(r["tag"], "INSERT 0 1");
    let (s, r) = statement_and_result(&e.pw, "delete from items");
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("deny"), Some("no-unbounded-writes")));
    assert_eq!(r["sqlstate"], "42501");
    let (_, r) = statement_and_result(&e.pw, "values (61, 'third')");
    assert!(r["error"].as_str().unwrap_or("").contains("not executed"), "{r}");
}

/// tokio-postgres pipelines concurrently polled requests (each with its own Sync): the denied
/// one fails alone with 42501, the others get their rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_pipeline_with_a_denied_statement() {
    let e = env("pe_tp_pipeline", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let client = login.connect().await.unwrap();
    let m = never_marker();
    let denied = format!("select v from secrets where v <> '{m}'");
    let (a, b, c) = within("pipeline", async {
        tokio::join!(
            client.query_one("select count(*)::int4 from items", &[]),
            client.query_one(denied.as_str(), &[]),
            client.query_one("select max(id) from items where id < $1", &[&3i32])
        )
    })
    .await;
    assert_eq!(a.unwrap().get::<_, i32>(0), 3);
    let err = b.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    assert!(err.as_db_error().unwrap().message().contains("\"no-secrets\""), "{err}");
    assert_eq!(c.unwrap().get::<_, i32>(0), 2);
    // Still usable afterwards, extended and simple protocol.
    let n: i64 = client.query_one("select count(*) from items", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
    drop(client);
    assert_never_reached_postgres(&m);

    // A denied Parse is audited with the rule (it never executes).
    let recs = e.pw.wait_audit("denied Parse", |r| !rec::statements_with(r, &m).is_empty());
    let s = rec::statements_with(&recs, &m)[0];
    assert_eq!((s["decision"].as_str(), s["rule"].as_str(), s["protocol"].as_str()), (Some("deny"), Some("no-secrets"), Some("extended")));
}

/// `EXECUTE name` is decided as the text of the session's `PREPARE name AS …`.
#[test]
fn execute_is_decided_as_the_prepared_statement() {
    let e = env("pe_prepare", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let out = psql_all(
        &login,
        &[
            "PREPARE Counted AS select count(*) from items",
            "EXECUTE counted",
            "prepare del as delete from items where id = 1",
            "execute del",
            "execute nobody_prepared_this",
        ],
    );
    // The analysts may read: the resolved EXECUTE is allowed as analysts-read. The denied
    // PREPARE never ran, so EXECUTE del is an unknown prepared statement (a write): denied.
    assert_eq!(out.sqlstates(), vec!["42501", "42501", "42501"], "{}", out.describe());
    assert!(out.stdout.contains("PREPARE\n3"), "{}", out.describe());
    let (s, r) = statement_and_result(&e.pw, "EXECUTE counted");
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("allow"), Some("analysts-read")), "{s}");
    assert_eq!(r["tag"], "SELECT 1");
    assert_eq!(cluster().sql(&e.db, "select count(*) from items"), "3");
}

/// A simple query on a raw connection, asserting the SQLSTATE of its error (None: none); its
/// command tags.
fn query_expecting(c: &mut raw::RawConn, sql: &str, want: Option<&str>) -> Vec<String> {
    let msgs = c.simple_query(sql).unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(|m| m.sqlstate()).as_deref(), want, "{sql}: {}", raw::describe_all(&msgs));
    raw::tags(&msgs)
}

/// Extended-protocol messages and a Sync; the SQLSTATE of the first error, if any.
fn pipeline(c: &mut raw::RawConn, msgs: &[Vec<u8>]) -> Option<String> {
    let mut batch: Vec<u8> = msgs.concat();
    batch.extend(fe::sync());
    c.send(&batch).unwrap();
    let answers = c.recv_until_ready().unwrap();
    raw::first_error(&answers).and_then(|m| m.sqlstate())
}

#[test]
fn a_bind_of_a_name_sql_prepare_reused_runs_and_is_audited_as_the_prepare() {
    let e = env("pe_prepared_truth", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let mut c = login.raw().expect("raw login");
    // SQL DEALLOCATE drops a protocol-level statement too; PREPARE then reuses its name.
    assert_eq!(pipeline(&mut c, &[fe::parse("reused", "select 'harmless'")]), None);
    query_expecting(&mut c, "DEALLOCATE reused", None);
    query_expecting(&mut c, "PREPARE reused AS insert into items values (4, 'inserted through reused')", None);
    let mut batch = fe::bind_text("", "reused", &[]);
    batch.extend(fe::execute("", 0));
    batch.extend(fe::sync());
    c.send(&batch).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(raw::tags(&msgs), vec!["INSERT 0 1"], "{}", raw::describe_all(&msgs));
    let _ = c.terminate();
    assert_eq!(cluster().sql(&e.db, "select count(*) from items where id = 4"), "1");
    // The Execute's record carries the statement that ran, not the one the name had before.
    let recs = e.pw.wait_audit("the Execute of reused", |r| {
        r.iter().any(|x| x["kind"] == "statement" && x["protocol"] == "extended" && rec::result_for(r, x).is_some_and(|r| r["tag"] == "INSERT 0 1"))
    });
    let exec = recs
        .iter()
        .find(|x| x["kind"] == "statement" && x["protocol"] == "extended" && rec::result_for(&recs, x).is_some_and(|r| r["tag"] == "INSERT 0 1"))
        .unwrap();
    assert!(exec["sql"].as_str().unwrap_or("").contains("insert into items"), "{exec}");
}

#[test]
fn create_table_as_execute_is_ddl_whatever_the_prepared_statement_reads() {
    let e = env("pe_ctas_execute", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let m = never_marker();
    let out = psql_all(
        &login,
        &[
            "PREPARE counted AS select count(*) from items",
            &format!("CREATE TEMP TABLE made_by_analyst /* {m} */ AS EXECUTE counted"),
            "select count(*) from pg_class where relname = 'made_by_analyst'",
        ],
    );
    // The analysts may read, not create tables (their role may: TEMP is granted to PUBLIC).
    assert_eq!(out.sqlstates(), vec!["42501"], "{}", out.describe());
    assert!(out.stderr.contains("policy rule \"default:analysts\""), "{}", out.describe());
    assert_eq!(out.stdout.trim(), "PREPARE\n0", "{}", out.describe());
    assert_never_reached_postgres(&m);
    let (s, _) = statement_and_result(&e.pw, &m);
    assert_eq!(s["decision"], "deny", "{s}");
}

#[test]
fn startup_parameters_cannot_get_around_the_policy() {
    let e = env("pe_startup", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");

    // standard_conforming_strings is not passed on; Role in any case is not either.
    let mut conn = login
        .raw_with(&[("standard_conforming_strings", "off"), ("Role", "postgres"), ("ROLE", "postgres")])
        .expect("login with stripped parameters");
    let msgs = conn.simple_query("show standard_conforming_strings").unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some("on".to_string())]]);
    let msgs = conn.simple_query("select current_user").unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some(e.ro.clone())]]);
    let _ = conn.terminate();

    // Presentation settings pass.
    let mut conn = login.raw_with(&[("client_encoding", "UTF8"), ("DateStyle", "ISO, DMY")]).expect("presentation settings");
    let msgs = conn.simple_query("show datestyle").unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some("ISO, DMY".to_string())]]);
    let _ = conn.terminate();

    // An encoding that could hide quotes from pgward's parser is refused.
    for enc in ["SJIS", "big5", "GBK"] {
        let err = login.raw_with(&[("client_encoding", enc)]).err().expect("unsafe encoding refused");
        assert_eq!(err.sqlstate().as_deref(), Some("22023"), "{enc}: {err:?}");
    }
    // Other settings are decided like SET: analysts may not change search_path.
    let err = login.raw_with(&[("search_path", "evil, public")]).err().expect("search_path refused");
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{err:?}");
    match &err {
        common::raw::RawError::Server(m) => assert!(m.fields()[&'M'].contains("analysts-keep-search-path"), "{m:?}"),
        other => panic!("{other:?}"),
    }
    // …writers may.
    let (_, wlogin) = e.login("wendy", &["writers"], "15m");
    let mut conn = wlogin.raw_with(&[("search_path", "public")]).expect("writers may set search_path");
    let msgs = conn.simple_query("show search_path").unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some("public".to_string())]]);
    let _ = conn.terminate();

    let recs = e.pw.wait_audit("login_failed for the refused startups", |r| {
        rec::of_kind(r, "login_failed").iter().filter(|x| x["user"] == "alice").count() >= 4
    });
    let failed: Vec<_> = rec::of_kind(&recs, "login_failed").into_iter().filter(|x| x["user"] == "alice").collect();
    assert!(failed.iter().any(|f| f["sqlstate"] == "22023"), "{failed:?}");
    assert!(failed.iter().any(|f| f["sqlstate"] == "42501" && f["rule"] == "analysts-keep-search-path"), "{failed:?}");
}

/// Statements that differ only in literal values share pgward's parse cache only where the
/// decision cannot depend on the values: through one session, an allowed statement is followed
/// by one with the same shape and other literals whose decision does depend on them (`1 = 2`
/// then `2 = 2`; `set_config('work_mem', …)` then `set_config('role', …)`; a setting's value),
/// and each gets its own decision. Varying literals in allowed and denied reads, pgbench-style,
/// are decided per statement as well.
#[test]
fn varying_literals_get_their_own_decisions() {
    let e = env("pe_literals", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let out = psql_all(
        &login,
        &[
            "update items set name = 'x' where 1 = 2",
            "update items set name = 'x' where 2 = 2",
            "delete from items where 'a' = 'b'",
            "delete from items where 'a' = 'a'",
            "select set_config('work_mem', '64MB', false)",
            "select set_config('role', 'postgres', false)",
            "set standard_conforming_strings to 'on'",
            "set standard_conforming_strings to 'no'",
            "show standard_conforming_strings",
            "select current_user",
        ],
    );
    assert_eq!(out.sqlstates(), vec!["42501"; 4], "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"no-unbounded-writes\"").count(), 2, "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"builtin:identity-change\"").count(), 1, "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"builtin:protected-setting\"").count(), 1, "{}", out.describe());
    assert_eq!(out.stdout.trim(), format!("UPDATE 0\nDELETE 0\n64MB\nSET\non\n{}", e.rw), "{}", out.describe());
    assert_eq!(cluster().sql(&e.db, "select string_agg(name, ',' order by id) from items"), "one,two,three");

    // pgbench-style: the same statements with other numbers and strings, allowed and denied
    // interleaved.
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let markers: Vec<String> = (0..20).map(|_| never_marker()).collect();
    let mut cmds = Vec::new();
    for (i, m) in markers.iter().enumerate() {
        cmds.push(format!("select count(*) from items where id <> {}", i + 10));
        cmds.push(format!("select v from secrets where v <> '{m}'"));
    }
    let out = psql_all(&login, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.sqlstates(), vec!["42501"; 20], "{}", out.describe());
    assert_eq!(out.stderr.matches("policy rule \"no-secrets\"").count(), 20, "{}", out.describe());
    assert_eq!(out.stdout.trim(), vec!["3"; 20].join("\n"), "{}", out.describe());
    for m in &markers {
        assert_never_reached_postgres(m);
    }
    // The audit log has each statement as sent, with its own decision.
    let (s, _) = statement_and_result(&e.pw, &markers[7]);
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("deny"), Some("no-secrets")), "{s}");
    let (s, r) = statement_and_result(&e.pw, "select count(*) from items where id <> 17");
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("allow"), Some("analysts-read")), "{s}");
    assert_eq!(r["tag"], "SELECT 1", "{r}");
    assert!(!e.pw.log_has_panic());
}

/// A statement of 30 000 `UNION ALL`s is a tree that deep, and walking it would overflow the
/// event loop's stack and abort the whole gateway. Such a statement is not parsed (unparsable: denied under this policy),
/// one over 1 MiB is denied outright (`builtin:too-large`), and the session and the gateway
/// go on. A deep-but-allowed statement still runs.
#[test]
fn statements_nested_too_deep_or_too_long_are_denied_and_the_gateway_survives() {
    let mut e = env("pe_deep", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let (m_deep, m_long, m_ok) = (never_marker(), never_marker(), marker("after-deep"));
    let deep = format!("select '{m_deep}'{};\n", " union all select 'x'".repeat(30_000));
    let long = format!("select '{m_long}' /* {} */;\n", "x".repeat(1_100_000));
    let allowed = format!("select 1{};\n", " + 1".repeat(999));
    let script = format!("{deep}{long}{allowed}select '{m_ok}';\n");
    let out = login.psql_with_stdin(&["-v", "ON_ERROR_STOP=0", "-f", "-"], Some(script.as_bytes()));
    assert_eq!(out.sqlstates(), vec!["42501", "42501"], "{}", out.describe());
    assert!(out.stderr.contains("permission denied by policy rule \"unparsable"), "{}", out.describe());
    assert!(
        out.stderr.contains("policy rule \"builtin:too-large\": the statement is longer than pgward checks"),
        "{}",
        out.describe()
    );
    // The same session answered what came after.
    assert_eq!(out.stdout.trim(), format!("1000\n{m_ok}"), "{}", out.describe());
    assert_never_reached_postgres(&m_deep);
    assert_never_reached_postgres(&m_long);

    // The gateway is still up for everybody.
    assert!(e.pw.is_running(), "{}", e.pw.stderr_log());
    let again = login.sql("select 'again'");
    assert_eq!(again.stdout.trim(), "again", "{}", again.describe());
    let (s, r) = statement_and_result(&e.pw, &m_deep);
    assert_eq!(s["decision"], "deny", "{s}");
    assert_eq!(r["sqlstate"], "42501", "{r}");
    let (s, _) = statement_and_result(&e.pw, &m_long);
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("deny"), Some("builtin:too-large")), "{s}");
    assert!(!e.pw.log_has_panic());
}

/// Long statement texts (over 8 KiB, not in the policy's cache) are parsed on a blocking
/// thread so the event loop keeps relaying other sessions, then decided exactly as short
/// ones: rules apply, Parse texts too, and `EXECUTE name` sees what the session prepared
/// earlier in the same read.
#[test]
fn long_statements_are_analyzed_off_the_event_loop_and_decided_the_same() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = env("pe_long", move |b| b.set("server.metrics_listen", format!("127.0.0.1:{port}")));
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let ids = (0..3000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let m_secret = never_marker();
    let long_read = format!("select count(*) from items where id in ({ids})");
    let long_secret = format!("select v from secrets where v <> '{m_secret}' and id in ({ids})");
    let pad = format!("/* {} */", "p".repeat(10_000));
    assert!(long_read.len() > 8192 && long_secret.len() > 8192);

    let mut c = login.raw().unwrap();
    // One read: an allowed long Query, a denied long Query, a short PREPARE and a long
    // EXECUTE of it.
    let mut batch = Vec::new();
    batch.extend(fe::query(&long_read));
    batch.extend(fe::query(&long_secret));
    batch.extend(fe::query("prepare p as select count(*) + 100 from items"));
    batch.extend(fe::query(&format!("execute p {pad}")));
    c.send(&batch).unwrap();
    let read = c.recv_until_ready().unwrap();
    assert_eq!(raw::rows(&read), vec![vec![Some("3".to_string())]], "{}", raw::describe_all(&read));
    let denied = c.recv_until_ready().unwrap();
    let err = raw::first_error(&denied).map(|m| m.fields()).unwrap_or_default();
    assert_eq!(err.get(&'C').map(String::as_str), Some("42501"), "{}", raw::describe_all(&denied));
    assert!(err.get(&'M').is_some_and(|m| m.contains("\"no-secrets\"")), "{err:?}");
    let prepared = c.recv_until_ready().unwrap();
    assert!(raw::first_error(&prepared).is_none(), "{}", raw::describe_all(&prepared));
    let executed = c.recv_until_ready().unwrap();
    assert_eq!(raw::rows(&executed), vec![vec![Some("103".to_string())]], "{}", raw::describe_all(&executed));

    let long_secret_2 = format!("select id, v from secrets where v <> '{m_secret}' and id in ({ids})");
    let parsed = c.extended_query(&long_secret_2, &[]).unwrap();
    let err = raw::first_error(&parsed).map(|m| m.fields()).unwrap_or_default();
    assert_eq!(err.get(&'C').map(String::as_str), Some("42501"), "{}", raw::describe_all(&parsed));
    assert!(err.get(&'M').is_some_and(|m| m.contains("\"no-secrets\"")), "{err:?}");
    assert_never_reached_postgres(&m_secret);
    // A long text analyzed before is in the policy's cache: decided on the loop.
    let again = c.simple_query(&long_read).unwrap();
    assert_eq!(raw::rows(&again), vec![vec![Some("3".to_string())]], "{}", raw::describe_all(&again));

    // Four long texts went to the blocking pool (not the short PREPARE, nor the repeat).
    let metrics = common::metrics::text(port);
    let n = common::metrics::sample(&metrics, "pgward_statements_analyzed_off_loop_total");
    assert_eq!(n, Some(4.0), "{metrics}");
    assert!(!e.pw.log_has_panic());
}

/// A window that is open now and closes at the next full minute (UTC), as a policy
/// `[windows.NAME]` table; first waits, if need be, until at least `setup` of the minute is left
/// so that the test's set-up runs inside the window.
fn window_closing_this_minute(name: &str, setup: std::time::Duration) -> String {
    use chrono::Timelike as _;
    let mut now = chrono::Utc::now();
    if 60 - i64::from(now.second()) < setup.as_secs() as i64 {
        std::thread::sleep(std::time::Duration::from_secs(u64::from(61 - now.second())));
        now = chrono::Utc::now();
    }
    let minute = now.hour() * 60 + now.minute();
    let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
    format!("\n[windows.{name}]\nstart = \"{}\"\nend = \"{}\"\nutc_offset = \"+00:00\"\n", hhmm(minute), hhmm(minute + 1))
}

/// Wait until the minute `window_closing_this_minute` was made in has passed.
fn wait_for_the_next_minute(made_in: chrono::DateTime<chrono::Utc>) {
    use chrono::Timelike as _;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let minute = |t: chrono::DateTime<chrono::Utc>| t.timestamp() / 60;
    while minute(chrono::Utc::now()) == minute(made_in) {
        assert!(std::time::Instant::now() < deadline, "the clock did not pass minute {}", made_in.minute());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A statement Parsed while a time window allowed it is decided again when it is Executed
/// (protocol level) after the window closed: a prepared statement carries no allowance past
/// its window. The denied Execute gets 42501 naming the rule, writes nothing, is audited as
/// denied, and the session stays usable.
/// The test policy plus a group `shift` (the writers' role) that may read at any time and
/// write only inside a window that closes at the end of this minute; returns the
/// environment and when the window was made.
fn shift_env(prefix: &str) -> (Env, chrono::DateTime<chrono::Utc>) {
    let window = window_closing_this_minute("shift", std::time::Duration::from_secs(25));
    let made_in = chrono::Utc::now();
    let extra = format!(
        "{window}
[[group]]
name = \"shift\"
role = \"RW\"
default = \"deny\"

[[rule]]
name = \"shift-read\"
action = \"allow\"
groups = [\"shift\"]
classes = [\"read\", \"session\", \"transaction\"]

[[rule]]
name = \"shift-writes-in-window\"
action = \"allow\"
groups = [\"shift\"]
classes = [\"write\"]
during = \"shift\"
"
    );
    let e = env(prefix, move |b| {
        b.with_dir(move |dir, _| {
            let path = dir.join("test-policy.toml");
            let policy = std::fs::read_to_string(&path).unwrap();
            // RW was replaced by the env's role name in the groups above; the same for shift.
            let rw = policy.split("name = \"writers\"\nrole = \"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
            std::fs::write(&path, policy + &extra.replace("\"RW\"", &format!("\"{rw}\""))).unwrap();
        })
    });
    (e, made_in)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execute_after_its_window_closed_is_decided_again() {
    let (e, made_in) = shift_env("pe_window_exec");
    let (_, login) = e.login("sam", &["shift"], "15m");
    let client = login.connect().await.unwrap();
    let insert = client.prepare("insert into items values ($1, $2)").await.unwrap();
    let (m_in, m_after, m_ok) = (marker("in-window"), never_marker(), marker("after-window-read"));
    // Inside the window: the prepared insert runs.
    assert!(chrono::Utc::now().timestamp() / 60 == made_in.timestamp() / 60, "set-up took past the window");
    client.execute(&insert, &[&10i32, &m_in]).await.unwrap();
    assert_eq!(cluster().sql(&e.db, &format!("select count(*) from items where name = '{m_in}'")), "1");

    wait_for_the_next_minute(made_in);
    // After it: the same prepared statement, bound and executed again, is refused.
    let err = client.execute(&insert, &[&11i32, &m_after]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    assert!(err.as_db_error().unwrap().message().contains("policy rule \"default:shift\""), "{err}");
    assert_eq!(cluster().sql(&e.db, "select count(*) from items where id = 11"), "0");
    // Reads are still allowed, on the same connection.
    let row = client.query_one(&format!("select '{m_ok}'::text"), &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), m_ok);
    drop(client);

    let recs = e.pw.wait_audit("the refused Execute", |r| {
        r.iter().any(|x| x["kind"] == "statement" && x["decision"] == "deny" && x["protocol"] == "extended")
    });
    let denied: Vec<_> = recs.iter().filter(|x| x["kind"] == "statement" && x["decision"] == "deny").collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    let s = denied[0];
    assert_eq!((s["rule"].as_str(), s["sql"].as_str()), (Some("default:shift"), Some("insert into items values ($1, $2)")), "{s}");
    assert_eq!(s["params"][1].as_str(), Some(m_after.as_str()), "{s}");
    let r = rec::result_for(&recs, s).expect("result record of the refused Execute");
    assert_eq!(r["sqlstate"], "42501", "{r}");
    assert!(!e.pw.log_has_panic());
}

/// A protocol-level Bind of a name made by SQL `PREPARE` runs that statement: its Execute is
/// audited with the `PREPARE` that made it, and decided on it again.
#[test]
fn binding_a_sql_prepared_statement_is_audited_and_decided_on_its_text() {
    let e = env("pe_bind_sql_prepared", |b| b);
    let (_, login) = e.login("alice", &["analysts"], "15m");
    let mut conn = login.raw().expect("raw login");
    let m = marker("sql-prepared");
    let prepared = format!("PREPARE counted AS select count(*) from items where name <> '{m}'");
    let msgs = conn.simple_query(&prepared).unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let mut batch = fe::bind_text("", "counted", &[]);
    batch.extend(fe::execute("", 0));
    batch.extend(fe::sync());
    conn.send(&batch).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some("3".to_string())]], "{}", raw::describe_all(&msgs));
    let _ = conn.terminate();
    let recs = e.pw.wait_audit("the Execute of the SQL-prepared statement and its result", |r| {
        r.iter().any(|x| {
            x["kind"] == "statement" && x["protocol"] == "extended" && x["sql"] == prepared.as_str() && rec::result_for(r, x).is_some()
        })
    });
    let s = recs.iter().find(|x| x["protocol"] == "extended" && x["sql"] == prepared.as_str()).unwrap();
    assert_eq!((s["decision"].as_str(), s["rule"].as_str()), (Some("allow"), Some("analysts-read")), "{s}");
    assert_eq!(rec::result_for(&recs, s).expect("result")["tag"], "SELECT 1");
}

/// A prepared statement's name keeps what Postgres did with it, not what the client sent: a
/// DEALLOCATE Postgres skipped (an earlier statement of its string failed), a PREPARE it
/// refused (the name exists), a Close of a SQL-prepared name followed by a Parse of it, a
/// Parse of `DEALLOCATE` never executed, a Close skipped after a pipeline error. Each leaves
/// a write under the name, prepared inside the window; after it, executing the name is
/// refused like the write it runs.
#[test]
fn prepared_names_follow_what_postgres_did_across_a_window() {
    let (e, made_in) = shift_env("pe_prepared_swap");
    let (_, login) = e.login("sam", &["shift"], "15m");
    let mut c = login.raw().expect("raw login");
    let q = query_expecting;
    q(&mut c, "PREPARE swap_a AS insert into items values (21, 'a')", None);
    q(&mut c, "select 1/0; DEALLOCATE swap_a", Some("22012"));
    q(&mut c, "PREPARE swap_a AS select 'harmless'", Some("42P05"));

    q(&mut c, "PREPARE swap_b AS select 'harmless'", None);
    assert_eq!(pipeline(&mut c, &[fe::raw_msg(b'C', b"Sswap_b\0"), fe::parse("swap_b", "insert into items values (22, 'b')")]), None);

    q(&mut c, "PREPARE swap_c AS insert into items values (23, 'c')", None);
    assert_eq!(pipeline(&mut c, &[fe::parse("", "DEALLOCATE swap_c")]), None);
    q(&mut c, "PREPARE swap_c AS select 'harmless'", Some("42P05"));

    assert_eq!(pipeline(&mut c, &[fe::parse("swap_d", "insert into items values (24, 'd')")]), None);
    let failing = [fe::parse("", "select 1/0"), fe::bind_text("", "", &[]), fe::execute("", 0), fe::raw_msg(b'C', b"Sswap_d\0")];
    assert_eq!(pipeline(&mut c, &failing).as_deref(), Some("22012"));
    assert!(chrono::Utc::now().timestamp() / 60 == made_in.timestamp() / 60, "set-up took past the window");

    wait_for_the_next_minute(made_in);
    for name in ["swap_a", "swap_b", "swap_c"] {
        q(&mut c, &format!("EXECUTE {name}"), Some("42501"));
    }
    let bound = [fe::bind_text("", "swap_d", &[]), fe::execute("", 0)];
    assert_eq!(pipeline(&mut c, &bound).as_deref(), Some("42501"));
    // Still the same session, and nothing was written.
    assert_eq!(q(&mut c, "select 1", None), vec!["SELECT 1"]);
    let _ = c.terminate();
    assert_eq!(cluster().sql(&e.db, "select count(*) from items where id > 20"), "0");
    assert!(!e.pw.log_has_panic());
}
