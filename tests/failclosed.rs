//! Fail closed: when the audit log cannot be written, statements are refused and never reach
//! Postgres. Proof of "never reached": Postgres runs with log_statement=all, and the statement's
//! unique marker is absent from its log (checked after a log barrier).
//!
//! How the log is broken: tests run as root, and root ignores a chmod-000 directory, so the audit
//! directory is renamed away and a regular file put in its place. The writer's current segment
//! path no longer leads to its file and no new file can be created there.

mod common;

use std::time::Duration;

use common::{Pgward, cluster, marker, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_refused_and_never_reach_postgres_when_the_audit_log_is_gone() {
    let c = cluster();
    let db = c.create_database("failclosed");
    let mut pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);

    // Sessions opened while the log is healthy.
    let simple = login.connect().await.unwrap();
    let extended = login.connect().await.unwrap();

    // Control: with a healthy log a marked statement does reach Postgres (and its log).
    let ok = marker("failclosed-control");
    within("control", simple.simple_query(&format!("select '{ok}'")))
        .await
        .unwrap();
    assert!(
        c.wait_log_contains(&ok, Duration::from_secs(10)),
        "control statement missing from the server log"
    );

    // Break the audit log.
    let dir = pw.audit_dir();
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).unwrap();
    std::fs::write(&dir, b"not a directory\n").unwrap();

    let m_simple = marker("failclosed-simple");
    let r = within(
        "simple while broken",
        simple.simple_query(&format!("select '{m_simple}'")),
    )
    .await;
    assert!(
        r.is_err(),
        "simple query was answered although it could not be audited: {r:?}"
    );
    let e = r.unwrap_err();
    assert!(
        e.as_db_error().is_some(),
        "the client must be told why (an ErrorResponse), got: {e}"
    );

    let m_ext = marker("failclosed-extended");
    let r = within(
        "extended while broken",
        extended.query(&format!("select $1::text || '{m_ext}'"), &[&"x"]),
    )
    .await;
    assert!(
        r.is_err(),
        "extended query was answered although it could not be audited: {r:?}"
    );
    let e = r.unwrap_err();
    assert!(
        e.as_db_error().is_some(),
        "the client must be told why (an ErrorResponse), got: {e}"
    );

    // A session opened now must not get a statement through either (refusing the login, which
    // cannot be recorded, is the expected way; refusing its statement would also be closed).
    let m_new = marker("failclosed-new-session");
    if let Ok(client) = login.connect().await {
        let r = within(
            "new session while broken",
            client.simple_query(&format!("select '{m_new}'")),
        )
        .await;
        assert!(
            r.is_err(),
            "a session opened while the log was broken ran a statement: {r:?}"
        );
    }

    // Refusing is per statement: the gateway itself keeps running.
    assert!(
        pw.is_running(),
        "pgward exited when the audit log broke:\n{}",
        pw.stderr_log()
    );

    let log = c.log_after_barrier();
    for m in [&m_simple, &m_ext, &m_new] {
        assert!(
            !log.contains(m.as_str()),
            "{m} reached Postgres although it could not be audited"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_does_not_tell_the_client_where_the_audit_log_is() {
    let c = cluster();
    let db = c.create_database("failclosed_msg");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let client = pw.login("alice", &token, &db).connect().await.unwrap();

    // Broken as above: the writer's next file cannot be created under the audit directory.
    let dir = pw.audit_dir();
    std::fs::rename(&dir, dir.with_extension("moved")).unwrap();
    std::fs::write(&dir, b"not a directory\n").unwrap();

    let e = within("statement while broken", client.simple_query("select 1"))
        .await
        .expect_err("the statement is refused");
    let db_err = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_err.code().code(), "58030", "{db_err:?}");
    let told = format!(
        "{} {:?} {:?}",
        db_err.message(),
        db_err.detail(),
        db_err.hint()
    );
    let root = pw.dir.parent().unwrap().to_string_lossy().to_string();
    assert!(
        !told.contains('/') && !told.contains(&root),
        "the client was told a server path: {told}"
    );
    assert!(
        told.contains("audit log unavailable"),
        "the client is told why: {told}"
    );
    // The cause, with the path, is in pgward's own log.
    let log = pw.stderr_log();
    assert!(
        log.lines().any(|l| l.contains("audit append failed") && l.contains(&root)),
        "pgward's log must carry the cause:\n{log}"
    );
}
