//! The audit log as its reader sees it: `pgward audit tail --json` shows login, statement (with
//! bound parameters), result and session_end records carrying who/where; statements precede
//! their results; `audit verify` passes on the real log and fails on an edited line, a deleted
//! line and a cut-off tail; checkpoints are signed with a key of their own, which the token key
//! cannot stand in for; `tail` filters and `replay` work.

mod common;
#[path = "export_support.rs"]
mod export_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::gateway::{audit_tail_with, audit_verify_config, rec};
use common::jwt;
use common::raw::fe;
use common::{Pgward, cluster, contains_number, marker, sqlstate, within};
use serde_json::Value;

/// Wait until the session that logged in with `token` has ended; return (records, session id).
#[track_caller]
fn wait_session_end(pw: &Pgward, token: &str) -> (Vec<Value>, String) {
    let jti = jwt::jti_of(token);
    let recs = pw.wait_audit(&format!("login + session_end for jti {jti}"), |r| {
        rec::login_by_jti(r, &jti)
            .and_then(|l| l["session"].as_str())
            .is_some_and(|s| rec::has_session_end(r, s))
    });
    let session = rec::login_by_jti(&recs, &jti).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_string();
    (recs, session)
}

/// Unique texts in each statement of the session, to find its records.
struct Markers {
    simple: String,
    ext: String,
    ins: String,
    sel: String,
    err: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_is_recorded_with_statements_params_results_and_end() {
    let c = cluster();
    let db = c.create_database("audit_session");
    c.fixture_table(&db, "audit_items", "id int, v text", "");
    let pw = Pgward::start();
    let token = pw.token("alice", &["analysts", "dev"], "15m");
    let jti = jwt::jti_of(&token);
    let m = Markers {
        simple: marker("audit-simple"),
        ext: marker("audit-ext"),
        ins: marker("audit-ins"),
        sel: marker("audit-sel"),
        err: marker("audit-err"),
    };
    run_session(&pw, &token, &db, &m).await; // client dropped: the session ends

    let (recs, session) = wait_session_end(&pw, &token);
    let mine = rec::of_session(&recs, &session);
    check_who_and_order(&recs, &mine, &jti, &db);
    check_statements(&recs, &session, &m);

    let end = mine.last().unwrap();
    assert!(mine.iter().all(|r| rec::seq(r) <= rec::seq(end)));
    check_chain(&recs);
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "audit verify on the untouched log: {out}");

    // The token is a secret: never in the audit files.
    let audit = String::from_utf8_lossy(&pw.audit_bytes()).into_owned();
    assert!(!audit.contains(&token), "token in the audit log");
    assert!(
        !audit.contains(jwt::signature_part(&token)),
        "token signature in the audit log"
    );
}


/// A session through pgward: a simple query, an extended one with parameters, an INSERT, a
/// SELECT and an error, each carrying its marker.
async fn run_session(pw: &Pgward, token: &str, db: &str, m: &Markers) {
    let client = pw.login("alice", token, db).connect().await.unwrap();
    within(
        "simple",
        client.simple_query(&format!("select '{}'", m.simple)),
    )
    .await
    .unwrap();
    let row = within(
        "extended",
        client.query_one(
            &format!("select $1::int4 + 1 as n, $2::text as t -- {}", m.ext),
            &[&41i32, &"p-text"],
        ),
    )
    .await
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let n = within(
        "insert",
        client.execute(
            &format!(
                "insert into audit_items select g, 'x' from generate_series(1, 3) g -- {}",
                m.ins
            ),
            &[],
        ),
    )
    .await
    .unwrap();
    assert_eq!(n, 3);
    let rows = within(
        "select",
        client.query(&format!("select * from audit_items -- {}", m.sel), &[]),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 3);
    let err = within(
        "error",
        client.simple_query(&format!("select 1/0 -- {}", m.err)),
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
}

/// Who, from where, to what — on every record of the session; login first, session_end last.
fn check_who_and_order(recs: &[Value], mine: &[&Value], jti: &str, db: &str) {
    let login = rec::login_by_jti(recs, jti).unwrap();
    assert_eq!(login["user"], "alice", "{login}");
    assert_eq!(rec::groups(login), vec!["analysts", "dev"], "{login}");
    assert_eq!(login["database"].as_str(), Some(db), "{login}");
    assert!(
        login["client"]["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "login.client should be the TCP peer: {login}"
    );
    for r in mine {
        for f in ["user", "groups", "client", "database"] {
            assert_eq!(r[f], login[f], "{f} differs between login and {r}");
        }
    }
    let kinds: Vec<&str> = mine.iter().map(|r| rec::kind(r)).collect();
    assert_eq!(kinds.first(), Some(&"login"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"session_end"), "{kinds:?}");

}

/// The one statement record containing `needle`, sent with `protocol`, and its result (which
/// follows it).
#[track_caller]
fn statement_and_result(recs: &[Value], session: &str, needle: &str, protocol: &str) -> (Value, Value) {
    let stmts = rec::statements_with(recs, needle);
    assert_eq!(
        stmts.len(),
        1,
        "one statement record for {needle}: {stmts:?}"
    );
    let st = stmts[0].clone();
    assert_eq!(st["session"].as_str(), Some(session));
    assert_eq!(st["protocol"].as_str(), Some(protocol), "{st}");
    let res = rec::result_for(recs, &st)
        .unwrap_or_else(|| panic!("no result for {st}"))
        .clone();
    assert!(
        rec::seq(&res) > rec::seq(&st),
        "result must follow its statement: {st} / {res}"
    );
    (st, res)
}

/// Each statement's record (with bound parameters) and its result's tag, rows or SQLSTATE.
fn check_statements(recs: &[Value], session: &str, m: &Markers) {
    let (_, res) = statement_and_result(recs, session, &m.simple, "simple");
    assert_eq!(res["tag"], "SELECT 1");
    assert_eq!(res["rows"], 1);

    let (st, res) = statement_and_result(recs, session, &m.ext, "extended");
    // tokio-postgres binds both parameters in binary (int4 41 and the text's bytes): the
    // record shows them as Postgres prints them.
    assert_eq!(st["params"], serde_json::json!(["41", "p-text"]), "{st}");
    assert_eq!(res["tag"], "SELECT 1");
    assert_eq!(res["rows"], 1);

    let (_, res) = statement_and_result(recs, session, &m.ins, "extended");
    assert_eq!(res["tag"], "INSERT 0 3");
    assert_eq!(res["rows"], 3);
    let (_, res) = statement_and_result(recs, session, &m.sel, "extended");
    assert_eq!(res["tag"], "SELECT 3");
    assert_eq!(res["rows"], 3);
    let (_, res) = statement_and_result(recs, session, &m.err, "simple");
    assert_eq!(res["sqlstate"], "22012", "{res}");

}

/// The chain as stored: seq increases, each prev_hash is the previous record's hash.
fn check_chain(recs: &[Value]) {
    for w in recs.windows(2) {
        assert!(
            rec::seq(&w[1]) > rec::seq(&w[0]),
            "seq not increasing: {} then {}",
            w[0],
            w[1]
        );
        assert_eq!(
            w[1]["prev_hash"], w[0]["hash"],
            "chain broken between {} and {}",
            w[0], w[1]
        );
    }
}

#[test]
fn text_parameters_and_client_address_from_the_raw_protocol() {
    let c = cluster();
    let db = c.create_database("audit_raw");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let m = marker("audit-raw");
    let mut conn = pw.login("alice", &token, &db).raw().unwrap();
    let local = conn.local_addr.unwrap();
    let msgs = conn
        .extended_query(
            &format!("select $1::int4 + 1, $2::text -- {m}"),
            &[Some("41"), None],
        )
        .unwrap();
    assert_eq!(
        common::raw::rows(&msgs),
        vec![vec![Some("42".to_string()), None]]
    );
    conn.terminate().unwrap();

    let (recs, session) = wait_session_end(&pw, &token);
    let login = rec::login_by_jti(&recs, &jwt::jti_of(&token)).unwrap();
    assert_eq!(
        login["client"]["addr"].as_str(),
        Some(local.to_string().as_str()),
        "{login}"
    );
    let st = rec::statements_with(&recs, &m);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0]["session"].as_str(), Some(session.as_str()));
    assert_eq!(
        st[0]["params"],
        serde_json::json!(["41", null]),
        "{}",
        st[0]
    );
    let res = rec::result_for(&recs, st[0]).expect("result record");
    assert_eq!(res["tag"], "SELECT 1");
}

/// After an extended-protocol error Postgres ignores every message up to the Sync, a simple
/// Query and a BEGIN in it included: the ignored Query gets a "not executed" result record,
/// the statements after the Sync get their own results, and a write after a BEGIN that never
/// ran is recorded write-ahead (it autocommits).
#[test]
fn queries_postgres_skips_after_a_pipeline_error_are_recorded_as_not_executed() {
    let c = cluster();
    let db = c.create_database("audit_skipped");
    c.sql(&db, "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let m = marker("audit-skipped");
    let mut conn = pw.login("alice", &token, &db).raw().unwrap();
    let pipeline = [
        fe::parse("", &format!("SELECT 1/0 -- {m}-fails")),
        fe::bind_text("", "", &[]),
        fe::execute("", 0),
        fe::query(&format!("SELECT '{m}-ignored'")),
        fe::query(&format!("BEGIN -- {m}-begin")),
        fe::sync(),
        fe::query(&format!("INSERT INTO t VALUES ('{m}-insert')")),
        fe::query(&format!("SELECT '{m}-after'")),
    ]
    .concat();
    conn.send(&pipeline).unwrap();
    let mut msgs = Vec::new();
    for _ in 0..3 {
        msgs.extend(conn.recv_until_ready().expect("answered"));
    }
    assert_eq!(
        common::raw::tags(&msgs),
        ["INSERT 0 1", "SELECT 1"],
        "{}",
        common::raw::describe_all(&msgs)
    );
    assert_eq!(common::raw::rows(&msgs), vec![vec![Some(format!("{m}-after"))]]);
    assert_eq!(c.sql(&db, "SELECT count(*) FROM t"), "1", "the INSERT autocommitted");
    conn.terminate().unwrap();

    let (recs, _) = wait_session_end(&pw, &token);
    let result = |needle: &str| {
        let st = rec::statements_with(&recs, needle);
        assert_eq!(st.len(), 1, "{needle}");
        let r = rec::result_for(&recs, st[0]).unwrap_or_else(|| panic!("no result for {needle}"));
        (st[0].clone(), r.clone())
    };
    for skipped in ["-ignored", "-begin"] {
        let (_, r) = result(&format!("{m}{skipped}"));
        assert!(r["error"].as_str().unwrap_or("").contains("not executed"), "{skipped}: {r}");
    }
    let (st, r) = result(&format!("{m}-insert"));
    assert_eq!(r["tag"], "INSERT 0 1", "{r}");
    assert_eq!(st["durability"], "write-ahead", "{st}");
    let (_, r) = result(&format!("{m}-after"));
    assert_eq!(r["tag"], "SELECT 1", "{r}");
}

/// A protocol-level Execute can name a cursor DECLARE opened (its portal) instead of a portal
/// Bind made: it runs the cursor's query like FETCH does — here `nextval`, whose effect no
/// rollback undoes — so its record is durable before it reaches Postgres, as FETCH's is.
#[test]
fn an_execute_of_a_cursor_portal_is_write_ahead_like_fetch() {
    let c = cluster();
    let db = c.create_database("audit_cursor_execute");
    c.sql(&db, "CREATE SEQUENCE s; GRANT ALL ON s TO PUBLIC");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let m = marker("audit-cursor");
    let mut conn = pw.login("alice", &token, &db).raw().unwrap();
    for sql in ["BEGIN".to_string(), format!("DECLARE cur CURSOR FOR SELECT nextval('s') -- {m}")] {
        let msgs = conn.simple_query(&sql).unwrap();
        assert!(common::raw::first_error(&msgs).is_none(), "{sql}: {}", common::raw::describe_all(&msgs));
    }
    conn.send(&[fe::execute("cur", 1), fe::sync()].concat()).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(common::raw::rows(&msgs), vec![vec![Some("1".to_string())]], "{}", common::raw::describe_all(&msgs));
    conn.simple_query("COMMIT").unwrap();
    conn.terminate().unwrap();
    assert_eq!(c.sql(&db, "SELECT last_value FROM s"), "1", "the cursor's query ran");

    let (recs, _) = wait_session_end(&pw, &token);
    let exec: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "statement" && r["protocol"] == "extended").collect();
    assert_eq!(exec.len(), 1, "{exec:?}");
    assert_eq!(exec[0]["durability"], "write-ahead", "{}", exec[0]);
}

// ---- tampering ------------------------------------------------------------------------------

/// A gateway with frequent checkpoints, one psql session running `markers` as separate
/// statements, then stopped (so the log no longer changes).
fn audited_workload(prefix: &str, n: usize) -> (Pgward, Vec<String>) {
    let c = cluster();
    let db = c.create_database(prefix);
    let mut pw = Pgward::builder().set("audit.checkpoint_every", 4).start();
    let token = pw.token("alice", &[], "15m");
    let markers: Vec<String> = (0..n)
        .map(|i| marker(&format!("audit-tamper-{i}")))
        .collect();
    let sql: Vec<String> = markers.iter().map(|m| format!("select '{m}'")).collect();
    let mut args = Vec::new();
    for s in &sql {
        args.push("-c");
        args.push(s.as_str());
    }
    pw.login("alice", &token, &db).psql(&args).expect_ok();
    wait_session_end(&pw, &token);
    pw.stop();
    let (code, out) = pw.audit_verify();
    assert_eq!(
        code, 0,
        "control: verify must pass on the untouched log: {out}"
    );
    (pw, markers)
}

/// Files in an audit dir whose lines are all audit records (JSON objects with seq, kind,
/// prev_hash and hash), with their lines, ordered by first seq. Other files (e.g. a HEAD that
/// names the latest checkpoint) are not segments and are left alone.
fn segments(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut segs: Vec<(u64, PathBuf, Vec<String>)> = Vec::new();
    for f in common::files_under(dir) {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let lines: Vec<String> = text.lines().map(String::from).collect();
        let recs: Option<Vec<Value>> = lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str::<Value>(l).ok().filter(|v| {
                    v["seq"].is_u64()
                        && v["kind"].is_string()
                        && v["prev_hash"].is_string()
                        && v["hash"].is_string()
                })
            })
            .collect();
        if let Some(recs) = recs.filter(|r| !r.is_empty()) {
            segs.push((rec::seq(&recs[0]), f, lines));
        }
    }
    segs.sort_by_key(|s| s.0);
    segs.into_iter().map(|(_, f, l)| (f, l)).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// (file index, line index, record) of the first line whose record satisfies `pred`.
fn find_line(
    segs: &[(PathBuf, Vec<String>)],
    pred: impl Fn(&Value) -> bool,
) -> Option<(usize, usize, Value)> {
    for (fi, (_, lines)) in segs.iter().enumerate() {
        for (li, l) in lines.iter().enumerate() {
            if let Ok(v) = serde_json::from_str::<Value>(l)
                && pred(&v)
            {
                return Some((fi, li, v));
            }
        }
    }
    None
}

/// A copy of the gateway's audit dir and a config that points at it; verify passes on it.
fn verified_copy(pw: &Pgward) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = pw.copy_with_audit(tmp.path());
    let (code, out) = audit_verify_config(&cfg);
    assert_eq!(
        code, 0,
        "control: verify must pass on an untouched copy: {out}"
    );
    let dir = tmp.path().join("audit");
    (tmp, cfg, dir)
}

#[test]
fn verify_detects_an_edited_record_and_names_its_seq() {
    let (pw, markers) = audited_workload("audit_edit", 8);
    let (_tmp, cfg, dir) = verified_copy(&pw);
    let mut segs = segments(&dir);
    let target = &markers[5];
    let (fi, li, v) = find_line(&segs, |v| {
        rec::kind(v) == "statement"
            && v["sql"]
                .as_str()
                .is_some_and(|s| s.contains(target.as_str()))
    })
    .expect("the statement record in the log files");
    let seq = rec::seq(&v);
    // Same length, still valid JSON, stored hash untouched: only the content changed.
    let forged = target.replacen("audit-tamper", "audit-TAMPER", 1);
    let line = segs[fi].1[li].replacen(target.as_str(), &forged, 1);
    let parsed: Value = serde_json::from_str(&line).expect("edited line is still JSON");
    assert_eq!(parsed["hash"], v["hash"]);
    segs[fi].1[li] = line;
    write_lines(&segs[fi].0, &segs[fi].1);

    let (code, out) = audit_verify_config(&cfg);
    assert_eq!(code, 1, "verify must fail on an edited record: {out}");
    assert!(
        contains_number(&out, seq),
        "verify output must name seq {seq}: {out}"
    );
}

/// Checkpoints are signed with `audit.checkpoint_key` (0400, not the token key): someone who
/// holds only the token key cannot re-sign a rewritten log, and verifying against the wrong
/// public key says which key signed and which the JWKS holds.
#[test]
fn checkpoints_have_a_key_of_their_own_that_the_token_key_cannot_replace() {
    let (pw, markers) = audited_workload("audit_ckpt_key", 4);
    let key = pw.config_path_value("audit.checkpoint_key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o400);
    let kid = pw.config_str("audit.checkpoint_kid");
    assert_ne!(kid, pw.signing_kid());
    let recs = pw.audit_records();
    let ckpts = rec::of_kind(&recs, "checkpoint");
    assert!(!ckpts.is_empty() && ckpts.iter().all(|c| c["kid"] == kid.as_str()), "{ckpts:?}");

    // A rewrite re-signed with the token key (under the checkpoint kid) fails verify.
    let (_tmp, cfg, dir) = verified_copy(&pw);
    let target = recs
        .iter()
        .find(|r| rec::kind(r) == "statement" && r["sql"].as_str().is_some_and(|s| s.contains(&markers[1])))
        .map(rec::seq)
        .expect("the statement");
    export_support::rewrite_with_key(&dir, target, &pw.signing_key_path(), &kid, |r| {
        r.sql = Some("select 'nothing to see'".into());
    });
    let (code, out) = audit_verify_config(&cfg);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("checkpoint signature does not verify"), "{out}");

    // The log checked against the token JWKS instead: a clear message, naming both kids.
    let (_tmp, cfg, _) = verified_copy(&pw);
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let token_jwks = pw.config_path_value("auth.jwks");
    common::toml_set(&mut t, "audit.checkpoint_jwks", token_jwks.display().to_string());
    std::fs::write(&cfg, toml::to_string(&t).unwrap()).unwrap();
    let (code, out) = audit_verify_config(&cfg);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("checkpoint signed by unknown key kid \"{kid}\"; the checkpoint JWKS holds kid {}", pw.signing_kid())),
        "{out}"
    );
}

#[test]
fn verify_detects_a_deleted_record() {
    let (pw, markers) = audited_workload("audit_delete", 8);
    let (_tmp, cfg, dir) = verified_copy(&pw);
    let mut segs = segments(&dir);
    let target = &markers[4];
    let (fi, li, _) = find_line(&segs, |v| {
        rec::kind(v) == "statement"
            && v["sql"]
                .as_str()
                .is_some_and(|s| s.contains(target.as_str()))
    })
    .expect("the statement record in the log files");
    assert!(
        li > 0 && li + 1 < segs[fi].1.len(),
        "pick a line in the middle"
    );
    segs[fi].1.remove(li);
    write_lines(&segs[fi].0, &segs[fi].1);

    let (code, out) = audit_verify_config(&cfg);
    assert_eq!(code, 1, "verify must fail when a record was deleted: {out}");
}

#[test]
fn verify_detects_a_cut_off_tail() {
    let (pw, _markers) = audited_workload("audit_truncate", 12);
    let (_tmp, cfg, dir) = verified_copy(&pw);
    let mut segs = segments(&dir);
    let all: Vec<Value> = audit_tail_with(&cfg, &[]);
    let checkpoints: Vec<u64> = rec::of_kind(&all, "checkpoint")
        .into_iter()
        .map(rec::seq)
        .collect();
    assert!(
        checkpoints.len() >= 2,
        "workload should have produced several checkpoints: {checkpoints:?}"
    );
    let last_cp = *checkpoints.last().unwrap();
    let (fi, li, _) = find_line(&segs, |v| rec::seq(v) == last_cp).expect("last checkpoint line");
    // Cut from a few records before the last checkpoint to the end: later segment files go,
    // and this one ends early. Files that are not segments (HEAD, ...) stay as they are.
    let cut_from = li.saturating_sub(3).max(1);
    let removed = segs[fi].1.len() - cut_from;
    assert!(removed >= 3, "must cut several lines, not {removed}");
    segs[fi].1.truncate(cut_from);
    write_lines(&segs[fi].0, &segs[fi].1);
    for (path, _) in segs.drain(fi + 1..) {
        std::fs::remove_file(path).unwrap();
    }

    let (code, out) = audit_verify_config(&cfg);
    assert_eq!(code, 1, "verify must fail when the tail was cut off: {out}");
}

// ---- reading --------------------------------------------------------------------------------

#[test]
fn tail_json_with_user_session_and_lines_filters() {
    let c = cluster();
    let db = c.create_database("audit_tail");
    let mut pw = Pgward::start();
    let t_alice = pw.token("alice", &[], "15m");
    let t_bob = pw.token("bob", &[], "15m");
    let m_alice = marker("tail-alice");
    let m_bob = marker("tail-bob");
    pw.login("alice", &t_alice, &db)
        .sql(&format!("select '{m_alice}'"))
        .expect_ok();
    pw.login("bob", &t_bob, &db)
        .sql(&format!("select '{m_bob}'"))
        .expect_ok();
    let (_, s_alice) = wait_session_end(&pw, &t_alice);
    wait_session_end(&pw, &t_bob);
    pw.stop(); // the log stops changing, so separate tail calls see the same records

    let all = pw.audit_records();
    assert!(
        !rec::statements_with(&all, &m_alice).is_empty()
            && !rec::statements_with(&all, &m_bob).is_empty()
    );

    let bob = pw.audit_tail(&["--user", "bob"]);
    assert!(!bob.is_empty());
    assert!(
        bob.iter().all(|r| r["user"] == "bob"),
        "--user bob returned others: {bob:?}"
    );
    assert_eq!(rec::statements_with(&bob, &m_bob).len(), 1);
    assert!(rec::statements_with(&bob, &m_alice).is_empty());

    let sess = pw.audit_tail(&["--session", &s_alice]);
    assert!(
        sess.iter()
            .all(|r| r["session"].as_str() == Some(s_alice.as_str())),
        "{sess:?}"
    );
    let kinds: Vec<&str> = sess.iter().map(rec::kind).collect();
    for k in ["login", "statement", "result", "session_end"] {
        assert!(kinds.contains(&k), "--session output lacks {k}: {kinds:?}");
    }
    assert_eq!(rec::statements_with(&sess, &m_alice).len(), 1);
    assert!(rec::statements_with(&sess, &m_bob).is_empty());

    let last3 = pw.audit_tail(&["--lines", "3"]);
    assert_eq!(last3, all[all.len() - 3..].to_vec());
}

#[test]
fn replay_prints_the_sessions_statements_in_order() {
    let c = cluster();
    let db = c.create_database("audit_replay");
    let pw = Pgward::start();
    let t_alice = pw.token("alice", &[], "15m");
    let t_bob = pw.token("bob", &[], "15m");
    let ms: Vec<String> = (0..4).map(|i| marker(&format!("replay-{i}"))).collect();
    let sql: Vec<String> = ms.iter().map(|m| format!("select '{m}'")).collect();
    let mut args = Vec::new();
    for s in &sql {
        args.push("-c");
        args.push(s.as_str());
    }
    pw.login("alice", &t_alice, &db).psql(&args).expect_ok();
    let m_bob = marker("replay-bob");
    pw.login("bob", &t_bob, &db)
        .sql(&format!("select '{m_bob}'"))
        .expect_ok();
    let (_, session) = wait_session_end(&pw, &t_alice);
    wait_session_end(&pw, &t_bob);

    let out = pw.audit_replay(&session, "max");
    let stdout = out.expect_ok();
    let mut last = 0;
    for m in &ms {
        let pos = stdout
            .find(m.as_str())
            .unwrap_or_else(|| panic!("replay output lacks {m}: {}", out.describe()));
        assert!(
            pos >= last,
            "statements out of order in replay: {}",
            out.describe()
        );
        last = pos;
    }
    assert!(
        !stdout.contains(&m_bob),
        "replay of alice's session shows bob's statement"
    );
    // A speed that would make a gap longer than any sleep is refused up front, not a panic.
    for speed in ["1e-300", "0", "nan", "fast"] {
        let out = pw.audit_replay(&session, speed);
        assert!(!out.success() && out.code.is_some(), "--speed {speed}: {}", out.describe());
        assert!(out.stderr.contains("--speed") && !out.stderr.contains("panicked"), "--speed {speed}: {}", out.describe());
    }
}

/// A client picks the startup user and database of a failed login, and pgward records them:
/// `audit tail` must show them as text on the record's own line, not as terminal commands —
/// no carriage return or escape sequence that erases the line, no line break that starts a
/// forged record, no right-to-left override that reorders it.
#[test]
fn tail_shows_client_chosen_texts_without_obeying_them() {
    let pw = Pgward::start();
    let forged = "#1 login  alice  from=10.0.0.1";
    let user = format!("mallory\r\x1b[2K\n2026-01-01T00:00:00.000000Z  {forged}");
    let login = pw.login(&user, "not-a-token", "app\u{202e}evil");
    match common::raw::RawConn::connect(&login, &[]) {
        Err(common::raw::RawError::Server(m)) => assert_eq!(m.sqlstate().as_deref(), Some("28P01"), "{}", m.describe()),
        other => panic!("a bad token must be refused with 28P01: {:?}", other.err()),
    }
    let recs = pw.wait_audit("login_failed", |r| rec::of_kind(r, "login_failed").iter().any(|x| rec::s(x, "user") == Some(user.as_str())));
    assert!(!rec::of_kind(&recs, "login_failed").is_empty());
    let out = common::pgward_cli(&["audit", "tail", "--config", pw.config_path.to_str().unwrap()]);
    let stdout = out.expect_ok();
    assert!(!stdout.contains('\r') && !stdout.contains('\x1b') && !stdout.contains('\u{202e}'), "{}", out.describe());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), recs.len(), "one line per record: {}", out.describe());
    assert!(lines.iter().all(|l| !l.contains(&format!("Z  {forged}")) || l.contains("login_failed")), "{}", out.describe());
    let failed = lines.iter().find(|l| l.contains("login_failed")).expect("the failed login's line");
    assert!(failed.contains("mallory") && failed.contains(forged) && failed.contains("db=app\\u{202e}evil"), "{failed}");
    // pgward's own log quotes the refused user too.
    assert!(!pw.stderr_log().contains("\n2026-01-01T00:00:00.000000Z"), "pgward's log holds the forged line");
}

/// Someone who can write the log's files but not read the checkpoint key appends a forged
/// record while pgward is down. The restart continues the chain from it and its checkpoint
/// anchors it; `verify` must name the records the restart anchored for a run that did not,
/// and the `start` record says which they are.
#[test]
fn records_appended_while_down_are_named_by_verify_after_the_restart() {
    use sha2::{Digest, Sha256};
    let (mut pw, _) = audited_workload("audit_append_down", 2);
    let segs = segments(&pw.audit_dir());
    let (path, lines) = segs.last().expect("a segment");
    let last: Value = serde_json::from_str(lines.last().expect("a record")).unwrap();
    assert_eq!(rec::kind(&last), "checkpoint", "a clean stop ends with a checkpoint");
    let seq = rec::seq(&last) + 1;
    let (ts, prev) = (last["ts"].as_str().unwrap(), last["hash"].as_str().unwrap());
    let body = format!(
        r#"{{"seq":{seq},"ts":"{ts}","prev_hash":"{prev}","kind":"statement","session":"forged","user":"alice","database":"app","sql":"DROP TABLE payroll","protocol":"simple","decision":"allow","rule":"default"}}"#
    );
    let hash = hex::encode(Sha256::new().chain_update(prev.as_bytes()).chain_update(body.as_bytes()).finalize());
    let mut forged = lines.clone();
    forged.push(format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]));
    write_lines(path, &forged);
    // Down, the forged record is the unanchored tail a crash would leave: verify says so.
    let (code, out) = pw.audit_verify();
    assert!(code == 0 && out.contains("1 unanchored record"), "{out}");

    pw.spawn();
    pw.stop();
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("seq {seq}..{seq} were anchored by the restart")), "verify does not name the forged record: {out}");
    let recs = pw.audit_records();
    let start = recs.iter().find(|r| rec::kind(r) == "start" && rec::seq(r) == seq + 1).expect("the restart's start record");
    assert_eq!(start["meta"]["unanchored_tail"], serde_json::json!({ "first": seq, "last": seq }), "{start}");
}

/// Someone who can write the audit directory puts a FIFO, or a symlink to a device, under a
/// segment's name. Opening a FIFO blocks and a device reads without end: `verify` and `tail`
/// refuse the file by name and exit, instead of hanging where an auditor's check would never
/// report.
#[test]
fn a_segment_name_that_is_not_a_regular_file_is_refused_not_waited_on() {
    let (pw, _markers) = audited_workload("audit_fifo", 2);
    let (_tmp, cfg, dir) = verified_copy(&pw);
    let name = dir.join("audit-0000000000009999.jsonl");
    let c_name = std::ffi::CString::new(name.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_name.as_ptr(), 0o600) }, 0, "mkfifo");
    let check = |what: &str| {
        let (code, out) = audit_verify_config(&cfg);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains("audit-0000000000009999.jsonl") && out.contains("not a regular file"), "{what}: {out}");
        let tail = common::pgward_cli(&["audit", "tail", "--config", cfg.to_str().unwrap(), "--json"]);
        assert!(!tail.success() && tail.all_output().contains("not a regular file"), "{what}: {}", tail.describe());
    };
    check("a FIFO");
    std::fs::remove_file(&name).unwrap();
    std::os::unix::fs::symlink("/dev/urandom", &name).unwrap();
    check("a symlink to /dev/urandom");
}

/// Build the LD_PRELOAD shim `common/NAME.c` into `dir`; returns its path.
fn build_shim(dir: &Path, name: &str) -> PathBuf {
    let so = dir.join(format!("{name}.so"));
    let src = format!("{}/../tests/common/{name}.c", env!("CARGO_MANIFEST_DIR"));
    let st = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("cc");
    assert!(st.success(), "building {src}");
    so
}

/// Step pgward's wall clock (through `common/clock_offset.c`) to `secs` ahead of the real one.
fn step_clock(file: &Path, secs: i64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(&secs.to_ne_bytes(), 0).unwrap();
}

/// The wall clock of pgward's host steps forward while it runs (NTP correcting a drifted
/// clock, a VM resumed after a pause). The interval checkpoint is timed by the monotonic
/// clock, so the records on either side of the step would fall into one stretch without a
/// checkpoint that spans hours of record time — which `verify` refuses as "checkpoints were
/// removed or records forged". An honest log must verify: the record after the step waits
/// behind a checkpoint of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_forward_leaves_a_log_that_verifies() {
    const STEP_SECS: i64 = 2 * 3600;
    let c = cluster();
    let db = c.create_database("audit_clock_step");
    // No interval checkpoint of its own between the two statements: only the step can bring one.
    let mut pw = Pgward::builder().set("audit.checkpoint_interval", "1h").init();
    let shim = build_shim(&pw.dir, "clock_offset");
    let offset = pw.dir.join("clock-offset");
    std::fs::write(&offset, 0i64.to_ne_bytes()).unwrap();
    pw.env.push(("LD_PRELOAD".into(), shim.display().to_string()));
    pw.env.push(("CLOCK_OFFSET_FILE".into(), offset.display().to_string()));
    pw.spawn();
    let token = pw.token("alice", &[], "8h");
    let client = pw.login("alice", &token, &db).connect().await.expect("login");
    let (before, after) = (marker("clock-before"), marker("clock-after"));
    within("before the step", client.simple_query(&format!("SELECT '{before}'"))).await.unwrap();
    step_clock(&offset, STEP_SECS);
    within("after the step", client.simple_query(&format!("SELECT '{after}'"))).await.unwrap();
    drop(client);
    pw.stop();

    let recs = pw.audit_records();
    let ts_of = |needle: &str| {
        let s = rec::statements_with(&recs, needle);
        let ts = s.first().unwrap_or_else(|| panic!("no record of {needle}"))["ts"].as_str().unwrap().to_string();
        chrono::DateTime::parse_from_rfc3339(&ts).unwrap()
    };
    let gap = ts_of(&after) - ts_of(&before);
    assert!(gap.num_seconds() >= STEP_SECS, "the clock did not step: {gap}");
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "verify after a step of the wall clock: {out}");
}

/// The extended protocol's Bind plans the statement, and the planner runs immutable
/// functions with constant arguments (and stable ones, to estimate selectivity) — trusting the
/// volatility a function's owner declared. A user-defined function declared immutable that
/// advances a sequence (or calls dblink, or signals a backend) therefore takes effect at the
/// Bind. Parse, Bind, Sync without an Execute ran it with no statement record at all, and
/// while the audit log refused records the Bind still went upstream ahead of the refused
/// Execute. A Bind that plans user code is write-ahead: it has a record (its Execute's, or
/// one of its own) durable before it reaches Postgres, and while the log refuses records it
/// never does.
#[test]
fn a_bind_that_runs_user_code_while_planning_has_a_durable_record_first() {
    use common::raw::{self, fe};
    let c = cluster();
    let db = c.create_database("audit_bind_plans");
    c.sql(
        &db,
        "CREATE SEQUENCE planted_calls; GRANT ALL ON SEQUENCE planted_calls TO PUBLIC;
         CREATE FUNCTION planted(t text) RETURNS int LANGUAGE plpgsql IMMUTABLE
           AS $$ BEGIN PERFORM nextval('planted_calls'); RETURN length(t); END $$;",
    );
    let calls = || c.sql(&db, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM planted_calls").trim().to_string();
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);

    // Parse, Bind, Sync: the function runs while the Bind plans, and no Execute follows.
    let m = marker("bind-only");
    let mut conn = login.raw().unwrap();
    let mut msgs = fe::parse("", &format!("SELECT planted('{m}')"));
    msgs.extend(fe::bind_text("", "", &[]));
    msgs.extend(fe::sync());
    conn.send(&msgs).unwrap();
    let got = conn.recv_until_ready().unwrap();
    assert!(raw::first_error(&got).is_none(), "{}", raw::describe_all(&got));
    assert_eq!(calls(), "1", "the function did not run at the Bind: the test shows nothing");
    let recs = pw.wait_audit("a record of the Bind", |r| !rec::statements_with(r, &m).is_empty());
    let st = rec::statements_with(&recs, &m);
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(st[0]["meta"]["stage"], "bind", "{}", st[0]);
    assert_eq!(st[0]["durability"], "write-ahead", "{}", st[0]);

    // Parse, Bind, Execute, Sync: one record, the Execute's.
    let m2 = marker("bind-exec");
    let rows = conn.extended_query(&format!("SELECT planted('{m2}')"), &[]).unwrap();
    assert_eq!(raw::rows(&rows), vec![vec![Some(m2.len().to_string())]], "{}", raw::describe_all(&rows));
    let recs = pw.wait_audit("the Execute's record", |r| !rec::statements_with(r, &m2).is_empty());
    let st = rec::statements_with(&recs, &m2);
    assert_eq!(st.len(), 1, "{st:?}");
    assert!(st[0]["meta"].get("stage").is_none(), "{}", st[0]);
    let before = calls();

    // The audit log refuses records (its directory is gone): the Bind must not run the function.
    std::fs::remove_dir_all(pw.audit_dir()).unwrap();
    let m3 = marker("bind-refused");
    let got = conn.extended_query(&format!("SELECT planted('{m3}')"), &[]).unwrap();
    let err = raw::first_error(&got).unwrap_or_else(|| panic!("answered without a record: {}", raw::describe_all(&got)));
    assert_eq!(err.sqlstate().as_deref(), Some("58030"), "{}", raw::describe_all(&got));
    assert_eq!(calls(), before, "the Bind ran the function although its record was refused");
}

/// Postgres echoes a value it refuses in its error message (`invalid input syntax for type
/// integer: "…"`). A statement of a few dozen bytes makes it answer with an error of megabytes,
/// which the result record kept whole: each such statement added that much to the audit log
/// (and its export) — a cheap way to fill the disk every statement's record needs, after
/// which pgward refuses everyone's statements. The record keeps the start of a long error
/// text, its length and its SHA-256; the client still gets the whole message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_postgres_echoes_at_length_is_recorded_bounded() {
    use sha2::{Digest, Sha256};
    const ECHO_BYTES: usize = 8 << 20;
    let c = cluster();
    let db = c.create_database("audit_error_echo");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let client = pw.login("alice", &token, &db).connect().await.expect("login");
    let m = marker("error-echo");
    let sql = format!("SELECT ('{m}' || repeat('x', {ECHO_BYTES}))::int");
    let e = within("the echoing error", client.simple_query(&sql)).await.expect_err("not an integer");
    let msg = e.as_db_error().expect("a server error").message().to_string();
    assert_eq!(sqlstate(&e).as_deref(), Some("22P02"), "{e}");
    assert!(msg.len() > ECHO_BYTES, "the client gets the whole message ({} bytes)", msg.len());

    let recs = pw.wait_audit("the result record", |r| {
        rec::statements_with(r, &m).first().is_some_and(|s| rec::result_for(r, s).is_some())
    });
    let st = rec::statements_with(&recs, &m);
    let res = rec::result_for(&recs, st[0]).unwrap();
    let err = res["error"].as_str().expect("error text");
    let sha = hex::encode(Sha256::digest(msg.as_bytes()));
    assert!(err.len() < 8 << 10, "the record keeps {} bytes of the error", err.len());
    assert!(err.ends_with(&format!("… ({} bytes, sha256 {sha})", msg.len())), "{err}");
    assert!(msg.starts_with(err.split('…').next().unwrap()), "{err}");
    let log: usize = pw.audit_records().iter().map(|r| r.to_string().len()).sum();
    assert!(log < ECHO_BYTES, "the audit log holds {log} bytes of records");
}

/// `COPY … FROM STDIN` through the extended protocol as tokio-postgres sends it: Bind,
/// Execute and Sync first, then the data, CopyDone and another Sync. Postgres ignores a Sync
/// that arrives in copy-in mode, so it answers the two Syncs with one ReadyForQuery; pgward
/// waited for two, and from then on took each answer for the message before: the next
/// statements' parameter types were lost (bound values recorded as untyped hex) and a
/// statement that ran got the result "not executed". After the COPY, the session's records
/// must still say what ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_after_an_extended_protocol_copy_say_what_ran() {
    use futures_util::SinkExt as _;
    let c = cluster();
    let db = c.create_database("audit_copy_sync");
    c.sql(&db, "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let client = pw.login("alice", &token, &db).connect().await.expect("login");
    let copied = marker("copied");
    let sink = client.copy_in("COPY t (v) FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(format!("{copied}\n"))).await.expect("data");
    assert_eq!(sink.finish().await.expect("copy done"), 1);
    let after: Vec<String> = (0..3).map(|i| marker(&format!("after-copy-{i}"))).collect();
    for a in &after {
        let n = within("insert after the copy", client.execute("INSERT INTO t VALUES ($1)", &[a])).await.expect("insert");
        assert_eq!(n, 1);
    }
    assert_eq!(c.sql(&db, "SELECT count(*) FROM t").trim(), "4");
    drop(client);

    let (recs, _) = wait_session_end(&pw, &token);
    for a in &after {
        let st: Vec<&Value> = recs
            .iter()
            .filter(|r| rec::kind(r) == "statement" && r["params"] == serde_json::json!([a]))
            .collect();
        assert_eq!(st.len(), 1, "the INSERT of {a} with its value as text: {st:?}");
        let res = rec::result_for(&recs, st[0]).unwrap_or_else(|| panic!("no result for {}", st[0]));
        assert_eq!(res["tag"], "INSERT 0 1", "{res}");
    }
}

/// `tail` and `replay` print records as they read them. Someone who can write the log's files
/// changes who ran a statement and what it was; without a word, `tail --user` and `replay`
/// showed the forgery like any record. They check the chain as they read: they say on stderr
/// where it breaks and exit 1, and still show what is there.
#[test]
fn tail_and_replay_say_where_the_chain_breaks() {
    let (pw, markers) = audited_workload("audit_tail_links", 6);
    let (_tmp, cfg, dir) = verified_copy(&pw);
    let cfg_s = cfg.to_str().unwrap();
    let mut segs = segments(&dir);
    let target = &markers[3];
    let (fi, li, v) = find_line(&segs, |v| {
        rec::kind(v) == "statement" && v["sql"].as_str().is_some_and(|s| s.contains(target.as_str()))
    })
    .expect("the statement record");
    let (seq, session) = (rec::seq(&v), v["session"].as_str().unwrap().to_string());
    let tail = || common::pgward_cli(&["audit", "tail", "--config", cfg_s]);
    let replay = || common::pgward_cli(&["audit", "replay", "--config", cfg_s, "--speed", "max", &session]);
    // Control: the untouched copy.
    for out in [tail(), replay()] {
        assert!(out.success() && !out.all_output().contains("WARNING"), "{}", out.describe());
    }
    let line = segs[fi].1[li].replacen("\"user\":\"alice\"", "\"user\":\"bob\"", 1).replacen(target.as_str(), "DROP TABLE payroll", 1);
    assert_ne!(line, segs[fi].1[li]);
    segs[fi].1[li] = line;
    write_lines(&segs[fi].0, &segs[fi].1);
    for (what, out) in [("tail", tail()), ("replay", replay())] {
        assert_eq!(out.code, Some(1), "{what}: {}", out.describe());
        assert!(out.stdout.contains("DROP TABLE payroll"), "{what} still shows what is there: {}", out.describe());
        assert!(
            out.stderr.contains(&format!("chain breaks at seq {seq} (")) && out.stderr.contains("altered"),
            "{what}: {}",
            out.describe()
        );
    }
}

/// Startup parameters other than pgward's own go upstream as the session's settings, as `SET`
/// statements would (decided by the policy as such). `search_path` decides which function a
/// name in every later statement calls, yet no record showed it: the login record names the
/// settings the session was opened with.
#[test]
fn the_login_record_names_the_startup_settings() {
    let c = cluster();
    let db = c.create_database("audit_startup_settings");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let path = "audit_elsewhere, public";
    let mut conn = pw.login("alice", &token, &db).raw_with(&[("search_path", path), ("statement_timeout", "12345")]).expect("login");
    let msgs = conn.simple_query("SHOW search_path").unwrap();
    assert_eq!(common::raw::rows(&msgs), vec![vec![Some(path.to_string())]], "the setting reached the session");
    conn.terminate().unwrap();
    let (recs, _) = wait_session_end(&pw, &token);
    let login = rec::login_by_jti(&recs, &jwt::jti_of(&token)).expect("login record");
    assert_eq!(login["meta"]["settings"]["search_path"], path, "{login}");
    assert_eq!(login["meta"]["settings"]["statement_timeout"], "12345", "{login}");
}
