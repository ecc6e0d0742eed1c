//! Fail closed: when the audit log cannot be written, no effect of a statement is observable.
//! Write-ahead statements (autocommit writes, and every statement once the log is known to be
//! failing) are refused and never reach Postgres; a read or a write inside a transaction that
//! went to Postgres while its record was being flushed gets no reply but FATAL 58030, and its
//! transaction is rolled back. Proof of "never reached": Postgres runs with
//! log_statement=all, and the statement's unique marker is absent from its log (checked after
//! a log barrier); proof of "no effect": the rows, read as superuser.
//!
//! How the log is broken: tests run as root, and root ignores a chmod-000 directory, so the audit
//! directory is renamed away and a regular file put in its place. The writer's current segment
//! path no longer leads to its file and no new file can be created there.

mod common;

use std::time::Duration;

use common::{Pgward, cluster, marker, sqlstate, within};

/// Replace the audit directory with a file (see the module doc); `restore` undoes it.
struct Broken {
    dir: std::path::PathBuf,
    moved: std::path::PathBuf,
}

impl Broken {
    fn new(pw: &Pgward) -> Broken {
        let dir = pw.audit_dir();
        let moved = dir.with_extension("moved");
        std::fs::rename(&dir, &moved).unwrap();
        std::fs::write(&dir, b"not a directory\n").unwrap();
        Broken { dir, moved }
    }

    fn restore(self) {
        std::fs::remove_file(&self.dir).unwrap();
        std::fs::rename(&self.moved, &self.dir).unwrap();
    }
}

/// Run `sql` on a new session until the log takes records again.
async fn until_recovered(login: &common::Login, sql: &str) {
    let fresh = login.connect().await.unwrap();
    for _ in 0..50 {
        if fresh.simple_query(sql).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("statements still refused after the audit directory came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_effect_is_observable_when_the_audit_log_is_gone() {
    let c = cluster();
    let db = c.create_database("failclosed");
    c.sql(&db, "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC");
    // No time checkpoint may find the log broken before the statement under test does.
    let mut pw = Pgward::builder().set("audit.checkpoint_interval", "1h").start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);

    // Sessions opened while the log is healthy.
    let reader = login.connect().await.unwrap();
    let in_tx = login.connect().await.unwrap();
    let writer = login.connect().await.unwrap();
    let extended = login.connect().await.unwrap();

    // Control: with a healthy log a marked statement does reach Postgres (and its log).
    let ok = marker("failclosed-control");
    within("control", reader.simple_query(&format!("select '{ok}'"))).await.unwrap();
    assert!(c.wait_log_contains(&ok, Duration::from_secs(10)), "control statement missing from the server log");
    // A transaction opened while the log is healthy: its first row is written (durably audited).
    let m_before = marker("failclosed-tx-before");
    within("begin", in_tx.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ('{m_before}')"))).await.unwrap();
    // Let the result records (written without waiting) reach the log before it breaks.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let broken = Broken::new(&pw);
    // A write inside the open transaction goes to Postgres while its record is flushed; the
    // flush fails: an error, and the transaction is rolled back (the row written before the
    // break is gone too).
    let m_tx = marker("failclosed-tx");
    let r = within("write in a transaction", in_tx.simple_query(&format!("INSERT INTO t VALUES ('{m_tx}')"))).await;
    let e = r.expect_err("a write was answered although it could not be audited");
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e}");
    let _ = in_tx.simple_query("COMMIT").await;

    // An autocommit write: write-ahead, never reaches Postgres; the session stays usable.
    let m_write = marker("failclosed-write");
    let r = within("write while broken", writer.simple_query(&format!("insert into t values ('{m_write}')"))).await;
    let e = r.expect_err("a write was answered although it could not be audited");
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e}");

    // With the log known to be failing, reads are write-ahead too: refused before Postgres,
    // in either protocol.
    let m_ext = marker("failclosed-extended");
    let r = within("extended while broken", extended.query(&format!("select $1::text || '{m_ext}'"), &[&"x"])).await;
    let e = r.expect_err("extended query was answered although it could not be audited");
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e}");
    let m_read_known = marker("failclosed-read-known");
    let r = within("read once failing", writer.simple_query(&format!("select '{m_read_known}'"))).await;
    assert!(r.is_err(), "a read was answered while the log was failing: {r:?}");

    // A session opened now must not get a statement through either (refusing the login, which
    // cannot be recorded, is the expected way; refusing its statement would also be closed).
    let m_new = marker("failclosed-new-session");
    if let Ok(client) = login.connect().await {
        let r = within("new session while broken", client.simple_query(&format!("select '{m_new}'"))).await;
        assert!(r.is_err(), "a session opened while the log was broken ran a statement: {r:?}");
    }

    // Refusing is per statement: the gateway itself keeps running.
    assert!(pw.is_running(), "pgward exited when the audit log broke:\n{}", pw.stderr_log());

    let log = c.log_after_barrier();
    for m in [&m_write, &m_ext, &m_read_known, &m_new] {
        assert!(!log.contains(m.as_str()), "{m} reached Postgres although it could not be audited");
    }
    assert_eq!(c.sql(&db, "SELECT count(*) FROM t").trim(), "0", "rows whose statements could not be audited were committed");

    // The log recovers: statements run again.
    broken.restore();
    until_recovered(&login, "insert into t values ('after')").await;
    assert_eq!(c.sql(&db, "SELECT count(*) FROM t").trim(), "1");

    // Broken again, a read first: it went to Postgres while its record was flushed, and its
    // rows never reach the client.
    let reader = login.connect().await.unwrap();
    within("warm", reader.simple_query("select 1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let broken = Broken::new(&pw);
    let r = within("read while broken", reader.simple_query("select v from t")).await;
    let e = r.expect_err("a read was answered although it could not be audited");
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"), "{e}");
    broken.restore();
    until_recovered(&login, "select 1").await;
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "audit verify after the failures: {out}");
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
