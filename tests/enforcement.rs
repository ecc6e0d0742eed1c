//! Enforcement Postgres cannot disagree with, tried as an attacker holding a valid token for a
//! restricted group would: statements hidden from a parser that reads differently from the
//! server, identity and lexical changes in positions a select-list check misses, bytes pgward
//! did not check, and a setting changed behind the policy's back (the server's own
//! ParameterStatus reports end the session). Every test checks what did not happen upstream.

mod common;
#[path = "policy_support.rs"]
mod support;

use std::time::Duration;

use common::raw::{self, RawConn, RawError, fe};
use common::{cluster, marker};
use support::{assert_never_reached_postgres, env, never_marker};

fn first_sqlstate(msgs: &[raw::Msg]) -> Option<String> {
    raw::first_error(msgs).and_then(|m| m.sqlstate())
}

fn current_user(c: &mut RawConn) -> String {
    let msgs = c.simple_query("select current_user").expect("session usable");
    raw::rows(&msgs)[0][0].clone().unwrap_or_default()
}

/// Texts where a parser that joins an operator with the comment start after it (`#--`,
/// `|/*`, `>>--`, …) would see one SELECT of a string, while Postgres runs what follows.
#[test]
fn statements_hidden_behind_operator_comment_splits_are_seen_and_denied() {
    let e = env("enf_split", |b| b);
    let (_, login) = e.login("ann", &["analysts"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    let shell = std::env::temp_dir().join(marker("enf-copy-program"));
    let m = never_marker();
    let attacks = [
        format!("SELECT 1 #-- '\n2; DELETE FROM items /* {m} */"),
        format!("SELECT 1 >>-- '\n2; UPDATE items SET name = '{m}' WHERE true"),
        format!("SELECT 1 |/* '*/ 2; COPY items TO PROGRAM 'touch {}'", shell.display()),
        format!("SELECT true &&/* '*/ true; GRANT ALL ON items TO PUBLIC /* {m} */"),
        "SELECT 1 @-- '\n; RESET ROLE".to_string(),
        format!("SELECT 1 END; DELETE FROM items /* {m} */"),
    ];
    for sql in &attacks {
        let msgs = c.simple_query(sql).expect("answered");
        assert_eq!(first_sqlstate(&msgs).as_deref(), Some("42501"), "{sql:?}: {}", raw::describe_all(&msgs));
    }
    assert_eq!(current_user(&mut c), e.ro, "still the analysts' role");
    assert_eq!(cluster().sql(&e.db, "select count(*) from items where name not like 'never%'"), "3");
    assert_eq!(cluster().sql(&e.db, "select count(*) from information_schema.role_table_grants where table_name = 'items' and grantee = 'PUBLIC'"), "0");
    assert!(!shell.exists(), "COPY … TO PROGRAM ran");
    assert_never_reached_postgres(&m);
}

/// set_config() wherever a function can be called, through the simple and the extended
/// protocol: denied, and the session keeps its role.
#[test]
fn identity_changes_in_every_position_are_denied() {
    let e = env("enf_setcfg", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    let positions = [
        "SELECT * FROM set_config('role', 'postgres', false)",
        "SELECT * FROM items, LATERAL set_config('role', 'postgres', false) s",
        "SELECT EXISTS (SELECT set_config('session_authorization', 'postgres', false))",
        "COPY (SELECT set_config('role', 'postgres', false)) TO STDOUT",
        "WITH c AS (SELECT set_config('role', 'postgres', false)) SELECT * FROM c",
        "INSERT INTO items VALUES (50, 'x') RETURNING set_config('role', 'postgres', false)",
        "SELECT set_config(name => 'role', value => 'postgres', is_local => false)",
        "SELECT pg_catalog.set_config(lower('ROLE'), 'postgres', false)",
        "SELECT * FROM set_config('standard_conforming_strings', 'off', false)",
        "SET client_encoding = 'SJIS'",
        "ALTER ROLE CURRENT_USER SET standard_conforming_strings = off",
    ];
    for sql in positions {
        let msgs = c.simple_query(sql).expect("answered");
        assert_eq!(first_sqlstate(&msgs).as_deref(), Some("42501"), "simple {sql:?}: {}", raw::describe_all(&msgs));
        let msgs = c.extended_query(sql, &[]).expect("answered");
        assert_eq!(first_sqlstate(&msgs).as_deref(), Some("42501"), "extended {sql:?}: {}", raw::describe_all(&msgs));
    }
    let msgs = c.simple_query("PREPARE p AS SELECT * FROM set_config('role', 'postgres', false)").expect("answered");
    assert_eq!(first_sqlstate(&msgs).as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("EXECUTE p").expect("answered");
    assert!(first_sqlstate(&msgs).is_some(), "EXECUTE of the refused PREPARE must fail: {}", raw::describe_all(&msgs));
    assert_eq!(current_user(&mut c), e.rw, "still the writers' role");
    let msgs = c.simple_query("show standard_conforming_strings").expect("answered");
    assert_eq!(raw::rows(&msgs)[0][0].as_deref(), Some("on"));
    assert_eq!(cluster().sql(&e.db, "select count(*) from items where id = 50"), "0");
}

/// A Query or Parse whose text pgward would read differently from the server is never
/// forwarded: a NUL inside it ends the session (FATAL 08P01, a malformed message); text that is
/// not valid in the client's encoding (invalid or overlong UTF-8) gets ERROR 22021, as from
/// Postgres itself, and the session goes on.
#[test]
fn bytes_pgward_did_not_check_never_reach_postgres() {
    let e = env("enf_bytes", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let m = never_marker();
    let fatal: Vec<(&str, Vec<u8>)> = vec![
        ("NUL in Query", msg(b'Q', &[b"SELECT 1\0; DELETE FROM items /* ", m.as_bytes(), b" */\0"])),
        ("NUL in Parse", msg(b'P', &[b"\0SELECT 1\0; DELETE FROM items /* ", m.as_bytes(), b" */\0\0\0"])),
    ];
    for (what, bytes) in fatal {
        let mut c = RawConn::connect(&login, &[]).expect("login");
        c.send(&bytes).expect("send");
        c.send(&fe::sync()).ok();
        let msgs = c.read_until_eof(Duration::from_secs(10)).unwrap_or_else(|err| panic!("{what}: connection stayed open: {err}"));
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{what}: no error: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{what}: {}", err.describe());
        assert_eq!(err.fields().get(&'S').map(String::as_str), Some("FATAL"), "{what}");
    }
    let undecodable: Vec<(&str, Vec<u8>)> = vec![
        ("overlong UTF-8 in Query", msg(b'Q', &[b"DELETE FROM items WHERE name <> '\xC0\xA7' /* ", m.as_bytes(), b" */\0"])),
        ("invalid UTF-8 in Query", msg(b'Q', &[b"DELETE FROM items WHERE id > 0 /* \xFF ", m.as_bytes(), b" */\0"])),
        ("surrogate in Parse", [msg(b'P', &[b"\0DELETE FROM items WHERE name <> '\xED\xA0\x80' /* ", m.as_bytes(), b" */\0\0\0"]), fe::bind_text("", "", &[]), fe::execute("", 0), fe::sync()].concat()),
    ];
    let mut c = RawConn::connect(&login, &[]).expect("login");
    for (what, bytes) in undecodable {
        c.send(&bytes).expect("send");
        let msgs = c.recv_until_ready().unwrap_or_else(|err| panic!("{what}: session ended: {err}"));
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{what}: no error: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("22021"), "{what}: {}", err.describe());
        assert_eq!(err.fields().get(&'S').map(String::as_str), Some("ERROR"), "{what}");
    }
    assert_eq!(current_user(&mut c), e.rw, "the session goes on");
    assert_eq!(cluster().sql(&e.db, "select count(*) from items"), "3");
    assert_never_reached_postgres(&m);
    // Audited as refused, with the rule that refused them.
    e.pw.wait_audit("refused undecodable statements", |r| {
        r.iter().filter(|x| x["kind"] == "statement" && x["rule"] == "builtin:encoding" && x["decision"] == "deny").count() == 3
    });
}

/// Startup client encodings pgward cannot decode exactly as the server does are refused at
/// login; UTF8 and LATIN1 work.
#[test]
fn client_encodings_pgward_cannot_parse_are_refused_at_login() {
    let e = env("enf_enc", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    for enc in ["SJIS", "BIG5", "WIN1251", "KOI8R", "EUC_JP"] {
        match RawConn::connect(&login, &[("client_encoding", enc)]) {
            Err(RawError::Server(m)) => assert_eq!(m.sqlstate().as_deref(), Some("22023"), "{enc}: {}", m.describe()),
            Err(other) => panic!("{enc}: {other:?}"),
            Ok(_) => panic!("{enc}: login accepted"),
        }
    }
    let mut c = RawConn::connect(&login, &[("client_encoding", "UTF8")]).expect("UTF8 login");
    assert_eq!(c.params.get("standard_conforming_strings").map(String::as_str), Some("on"));
    assert_eq!(current_user(&mut c), e.rw);
    // A LATIN1 session that switches to another encoding mid-session: the policy denies it,
    // and were it to happen anyway, the server's report would end the session.
    let mut l = RawConn::connect(&login, &[("client_encoding", "LATIN1")]).expect("LATIN1 login");
    let msgs = l.simple_query("SET client_encoding = 'WIN1251'").expect("answered");
    assert_eq!(first_sqlstate(&msgs).as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert_eq!(current_user(&mut l), e.rw);
}

/// A function created by the DBA that flips a lexical setting from inside: the policy sees only
/// a function call, but the server reports the change, and pgward ends the session before it
/// forwards anything else; the end is audited with the reported value.
#[test]
fn a_setting_changed_behind_the_policys_back_ends_the_session() {
    let e = env("enf_watch", |b| b);
    cluster().sql(
        &e.db,
        "CREATE FUNCTION public.flip() RETURNS text LANGUAGE sql \
         AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$; \
         GRANT EXECUTE ON FUNCTION public.flip() TO PUBLIC",
    );
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    c.send(&fe::query("SELECT public.flip()")).expect("send");
    let msgs = c.read_until_eof(Duration::from_secs(10)).expect("pgward closes the session");
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("no error: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", err.describe());
    assert!(err.describe().contains("standard_conforming_strings"), "{}", err.describe());
    // Nothing after the report reached the client: no ReadyForQuery to send more on.
    assert!(!msgs.iter().any(|m| m.tag == b'Z'), "{}", raw::describe_all(&msgs));
    let recs = e.pw.wait_audit("session_end with the reported value", |r| {
        r.iter().any(|x| x["kind"] == "session_end" && x["error"].as_str().is_some_and(|s| s.contains("standard_conforming_strings")))
    });
    assert!(!recs.is_empty());
}

/// A frontend message whose body is `parts` joined.
fn msg(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    fe::raw_msg(tag, &parts.concat())
}

/// A policy that denies catalog function classes (`@dynamic_sql`, `@outside`) to analysts:
/// the classes come from the database's own pg_proc — a DBA-created PL/pgSQL function that
/// runs EXECUTE is caught without being listed anywhere, a plain one is not — and a function
/// created during the session is in every class until the catalog is reloaded.
#[test]
fn catalog_function_classes_are_enforced() {
    let e = env("enf_classes", |b| {
        b.with_dir(|dir, t| {
            std::fs::write(
                dir.join("classes.toml"),
                "version = 1\n[[rule]]\nname = \"no-dynamic-sql\"\naction = \"deny\"\ngroups = [\"analysts\"]\n\
                 functions = [\"@dynamic_sql\", \"@outside\"]\nreason = \"functions that run SQL from text or reach outside the database\"\n",
            )
            .unwrap();
            common::toml_set(t, "policy.files", vec![toml::Value::from("classes.toml"), toml::Value::from("test-policy.toml")]);
        })
    });
    cluster().sql(
        &e.db,
        "CREATE FUNCTION public.run_text(q text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE q; END $$; \
         CREATE FUNCTION public.shout(t text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN upper(t); END $$; \
         GRANT EXECUTE ON FUNCTION public.run_text(text), public.shout(text) TO PUBLIC",
    );
    let (_, login) = e.login("ann", &["analysts"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    for sql in [
        "SELECT * FROM ts_stat('SELECT to_tsvector(v) FROM secrets')",
        "SELECT query_to_xml('SELECT v FROM secrets', true, false, '')",
        "SELECT public.run_text('SELECT 1')",
        "SELECT pg_read_file('/etc/hostname')",
        "SELECT lo_get(1)",
    ] {
        let msgs = c.simple_query(sql).expect("answered");
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{sql}: allowed: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{sql}: {}", err.describe());
        assert!(err.describe().contains("no-dynamic-sql"), "{sql}: {}", err.describe());
    }
    let msgs = c.simple_query("SELECT public.shout('ok'), lower('X'), count(*) FROM items").expect("answered");
    assert_eq!(raw::rows(&msgs), vec![vec![Some("OK".into()), Some("x".into()), Some("3".into())]], "{}", raw::describe_all(&msgs));
}

/// set_config called through the protocol's FunctionCall message (by OID, arguments as
/// bytes): an identity change whatever the arguments, denied to everyone; the session keeps
/// its role and goes on.
#[test]
fn fastpath_set_config_is_denied() {
    let e = env("enf_fastpath", |b| b);
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    let mut body = Vec::new();
    body.extend_from_slice(&2078i32.to_be_bytes()); // pg_catalog.set_config
    body.extend_from_slice(&1i16.to_be_bytes()); // one format code: text for all
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&3i16.to_be_bytes());
    for arg in ["role", "postgres", "false"] {
        body.extend_from_slice(&(arg.len() as i32).to_be_bytes());
        body.extend_from_slice(arg.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes()); // result in text
    c.send(&fe::raw_msg(b'F', &body)).expect("send");
    let msgs = c.recv_until_ready().expect("answered");
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("allowed: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", err.describe());
    assert!(err.describe().contains("builtin:identity-change"), "{}", err.describe());
    assert_eq!(current_user(&mut c), e.rw);
}

/// A group that may run DDL binds functions by name for Postgres to call later under another
/// name: an aggregate whose transition function is set_config (`SELECT pick('<role>', false)`
/// would switch the session's role), an operator or aggregate over a server-administration or
/// server-file function. pgward decides the binding as a call: the identity change is denied
/// to everyone, the server functions by the policy's rule, and none of them reaches Postgres,
/// while an aggregate over an ordinary built-in is created and works.
#[test]
fn functions_bound_by_ddl_are_decided_as_calls() {
    const DDL_POLICY: &str = "version = 1\n\
        [[rule]]\nname = \"no-server-functions\"\naction = \"deny\"\n\
        functions = [\"@server_files\", \"@server_admin\", \"@remote\"]\nreason = \"server functions\"\n\
        [[rule]]\nname = \"writers-ddl\"\naction = \"allow\"\ngroups = [\"writers\"]\nclasses = [\"ddl\"]\n";
    let e = env("enf_bound", |b| {
        b.with_dir(|dir, t| {
            std::fs::write(dir.join("ddl.toml"), DDL_POLICY).unwrap();
            common::toml_set(t, "policy.files", vec![toml::Value::from("ddl.toml"), toml::Value::from("test-policy.toml")]);
        })
    });
    cluster().sql(&e.db, &format!("GRANT CREATE ON SCHEMA public TO {}", e.rw));
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    let m = never_marker();
    let attacks = [
        (format!("CREATE AGGREGATE public.pick(text, bool) (sfunc = set_config, stype = text, initcond = 'role') /* {m} */"), "builtin:identity-change"),
        (format!("CREATE AGGREGATE public.pick(text, bool) (SFUNC = 'set_config', STYPE = text) /* {m} */"), "builtin:identity-change"),
        (format!("CREATE OPERATOR public.=== (function = pg_terminate_backend, leftarg = int4, rightarg = int8) /* {m} */"), "no-server-functions"),
        (format!("CREATE OPERATOR public.### (procedure = pg_catalog.pg_read_file, rightarg = text) /* {m} */"), "no-server-functions"),
        (format!("CREATE AGGREGATE public.rf(int8, int8) (sfunc = pg_read_file, stype = text, initcond = '/etc/hostname') /* {m} */"), "no-server-functions"),
        (format!("DO $$BEGIN CREATE AGGREGATE public.pick(text, bool) (sfunc = set_config, stype = text); END$$ /* {m} */"), "builtin:identity-change"),
    ];
    for (sql, rule) in &attacks {
        for (how, msgs) in [("simple", c.simple_query(sql)), ("extended", c.extended_query(sql, &[]))] {
            let msgs = msgs.expect("answered");
            let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{how} {sql:?}: allowed: {}", raw::describe_all(&msgs)));
            assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{how} {sql:?}: {}", err.describe());
            assert!(err.describe().contains(rule), "{how} {sql:?}: {}", err.describe());
        }
    }
    // DDL as such is allowed: an aggregate over an ordinary built-in is created and works.
    let msgs = c.simple_query("CREATE AGGREGATE public.total(int4) (sfunc = int4pl, stype = int4)").expect("answered");
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("SELECT public.total(id) FROM items").expect("answered");
    assert_eq!(raw::rows(&msgs), vec![vec![Some("6".to_string())]], "{}", raw::describe_all(&msgs));
    assert_never_reached_postgres(&m);
    let bound = "SELECT count(*) FROM pg_proc WHERE proname IN ('pick', 'rf') OR oid IN (SELECT oprcode FROM pg_operator WHERE oprname IN ('===', '###'))";
    assert_eq!(cluster().sql(&e.db, bound), "0");
    assert_eq!(current_user(&mut c), e.rw, "still the writers' role");
}

/// Code in the database can PREPARE (a `LANGUAGE sql` function's body is enough), so a
/// session can hold a prepared statement whose text pgward never saw. Executing it — SQL
/// `EXECUTE` or a protocol Bind/Execute of the name — is decided like an unparsable text:
/// denied to a group the policy restricts, and recorded under the name. Without that, a
/// writer ran an unbounded DELETE the policy denies and read a table it may not.
#[test]
fn statements_prepared_out_of_sight_do_not_run_unchecked() {
    let e = env("enf_unseen_prep", |b| b);
    cluster().sql(
        &e.db,
        "CREATE FUNCTION public.prep_delete() RETURNS void LANGUAGE sql AS 'PREPARE wipe AS DELETE FROM items'; \
         CREATE FUNCTION public.prep_peek() RETURNS void LANGUAGE sql AS 'PREPARE peek AS SELECT v FROM secrets'; \
         GRANT EXECUTE ON FUNCTION public.prep_delete(), public.prep_peek() TO PUBLIC",
    );
    // Only the policy (rule no-secrets) keeps the writers from the secrets table.
    cluster().sql(&e.db, &format!("GRANT SELECT ON secrets TO {}", e.rw));
    let (_, login) = e.login("wendy", &["writers"], "15m");
    let mut c = RawConn::connect(&login, &[]).expect("login");
    for sql in ["SELECT public.prep_delete()", "SELECT public.prep_peek()"] {
        let msgs = c.simple_query(sql).expect("answered");
        assert!(raw::first_error(&msgs).is_none(), "{sql}: {}", raw::describe_all(&msgs));
    }
    let denied = |msgs: &[raw::Msg], what: &str| {
        let err = raw::first_error(msgs).unwrap_or_else(|| panic!("{what}: allowed: {}", raw::describe_all(msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{what}: {}", err.describe());
        assert!(err.describe().contains("unparsable"), "{what}: {}", err.describe());
        assert!(!raw::describe_all(msgs).contains("hunter2"), "{what}: {}", raw::describe_all(msgs));
    };
    for sql in ["EXECUTE wipe", "EXECUTE peek"] {
        denied(&c.simple_query(sql).expect("answered"), sql);
    }
    for name in ["wipe", "peek"] {
        let mut b = fe::bind_text("", name, &[]);
        b.extend(fe::execute("", 0));
        b.extend(fe::sync());
        c.send(&b).expect("send");
        denied(&c.recv_until_ready().expect("answered"), name);
    }
    assert_eq!(cluster().sql(&e.db, "SELECT count(*) FROM items"), "3", "the DELETE ran");
    let recs = e.pw.wait_audit("the protocol-level denial", |recs| {
        common::gateway::rec::of_kind(recs, "statement").iter().any(|r| common::gateway::rec::s(r, "sql") == Some("EXECUTE \"peek\""))
    });
    let r = common::gateway::rec::of_kind(&recs, "statement").into_iter().find(|r| common::gateway::rec::s(r, "sql") == Some("EXECUTE \"wipe\"")).expect("recorded under its name");
    assert_eq!(common::gateway::rec::s(r, "decision"), Some("deny"), "{r}");
    // The session goes on.
    assert_eq!(current_user(&mut c), e.rw);
}
