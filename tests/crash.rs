//! The durability contract under a crash: pgward is killed (SIGKILL) at random points while
//! clients run a mixed load (autocommit and transactional writes, simple and extended
//! protocol, pipelined statements, several writes before one Sync, COPY FROM STDIN, DDL,
//! function calls, reads), with the audit directory behind a power-failure
//! shim (`common/lose_unsynced.c`, LD_PRELOAD): what pgward wrote but never synced is lost
//! with the process, as a power failure would lose it. Afterwards every row Postgres has
//! (read as superuser) was written by a statement whose record is in the audit log, and
//! `audit verify` passes once pgward has restarted. Rows are tagged uniquely in the statement
//! text or its parameters; rows COPY writes carry their tag in a comment of the COPY
//! statement, rows a function writes in its argument, and tables DDL creates in their name.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::rng::{Rng, seed};
use common::{Pgward, cluster, within};
use serde_json::Value;

/// Rounds of load-then-kill.
const ROUNDS: usize = 4;
/// Concurrent clients per round.
const CLIENTS: usize = 6;



/// One operation of the mixed load; any error ends the client (pgward is gone).
async fn one_op(c: &tokio_postgres::Client, rng: &mut Rng, tag: &mut (dyn FnMut() -> String + Send)) -> Result<(), tokio_postgres::Error> {
    match rng.next() % 11 {
        0 => {
            c.simple_query(&format!("INSERT INTO crash (tag) VALUES ('{}')", tag())).await?;
        }
        1 => {
            c.simple_query("BEGIN").await?;
            c.simple_query(&format!("INSERT INTO crash (tag) VALUES ('{}')", tag())).await?;
            c.simple_query(&format!("INSERT INTO crash (tag) VALUES ('{}')", tag())).await?;
            c.simple_query("COMMIT").await?;
        }
        2 => {
            c.execute("INSERT INTO crash (tag) VALUES ($1)", &[&tag()]).await?;
        }
        3 => {
            c.simple_query("BEGIN").await?;
            c.execute("INSERT INTO crash (tag) VALUES ($1)", &[&tag()]).await?;
            c.execute("UPDATE crash SET n = n + 1 WHERE tag = $1", &[&tag()]).await?;
            c.simple_query("COMMIT").await?;
        }
        4 => {
            // Pipelined: three Executes in flight on one connection.
            let (a, b, d) = (tag(), tag(), tag());
            let (x, y, z) = futures_util::future::join3(
                c.execute("INSERT INTO crash (tag) VALUES ($1)", &[&a]),
                c.execute("INSERT INTO crash (tag) VALUES ($1)", &[&b]),
                c.execute("INSERT INTO crash (tag) VALUES ($1)", &[&d]),
            )
            .await;
            x?;
            y?;
            z?;
        }
        5 => {
            // One simple Query, two statements: one implicit transaction.
            c.simple_query(&format!("INSERT INTO crash (tag) VALUES ('{}'); INSERT INTO crash (tag) VALUES ('{}')", tag(), tag()))
                .await?;
        }
        6 => {
            c.simple_query("SELECT count(*) FROM crash").await?;
            c.query("SELECT tag FROM crash WHERE n > $1 LIMIT 5", &[&0i32]).await?;
        }
        7 => {
            // COPY FROM STDIN (Bind, Execute and Sync before the data): the row's tag is in
            // the statement's text too.
            use futures_util::SinkExt as _;
            let t = tag();
            let sink = c.copy_in(&format!("COPY crash (tag) FROM STDIN /* '{t}' */")).await?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from(format!("{t}\n"))).await?;
            sink.finish().await?;
        }
        8 => {
            // DDL: the table's name is the tag.
            c.simple_query(&format!("CREATE TABLE \"{DDL_PREFIX}{}\" (n int)", tag())).await?;
        }
        9 => {
            // A user-defined function writes the row (extended protocol, the tag bound).
            c.execute("SELECT crash_put($1)", &[&tag()]).await?;
        }
        _ => {
            // A transaction rolled back: none of its rows may be there.
            c.simple_query("BEGIN").await?;
            c.simple_query(&format!("INSERT INTO crash (tag) VALUES ('{}')", tag())).await?;
            c.simple_query("ROLLBACK").await?;
        }
    }
    Ok(())
}

/// A raw-protocol client sending, until pgward is gone, pipelines of two INSERTs (Parse,
/// Bind, Execute each) and one Sync: one implicit transaction whose writes go to Postgres
/// while their records are flushed (`hold-reply`), committed by the Sync, which waits for
/// them. Returns the thread; it ends with the count of pipelines answered.
fn implicit_transactions(login: common::Login, round: usize) -> std::thread::JoinHandle<u64> {
    use common::raw::{self, fe};
    std::thread::spawn(move || {
        let Ok(mut conn) = login.raw() else { return 0 };
        let mut n = 0;
        loop {
            let mut msgs = Vec::new();
            for part in ["a", "b"] {
                msgs.extend(fe::parse("", &format!("INSERT INTO crash (tag) VALUES ('r{round}-p-{n}{part}')")));
                msgs.extend(fe::bind_text("", "", &[]));
                msgs.extend(fe::execute("", 0));
            }
            msgs.extend(fe::sync());
            if conn.send(&msgs).is_err() {
                return n;
            }
            match conn.recv_until_ready() {
                Ok(m) if raw::first_error(&m).is_none() => n += 1,
                _ => return n,
            }
        }
    })
}

/// Tables the load creates are named this and a tag.
const DDL_PREFIX: &str = "ddl_";

/// Every string an allowed statement record carries: its text and its parameters (as
/// recorded, and decoded from hex where they were recorded as bytes).
fn audited_texts(records: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r["kind"] == "statement" && r["decision"] == "allow") {
        if let Some(s) = r["sql"].as_str() {
            out.push(s.to_string());
        }
        for p in r["params"].as_array().into_iter().flatten() {
            let Some(p) = p.as_str() else { continue };
            out.push(p.to_string());
            if let Some(h) = p.strip_prefix("\\x")
                && let Ok(b) = hex::decode(h)
            {
                out.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_effect_seen_after_a_crash_has_its_record() {
    let c = cluster();
    let db = c.create_database("crash");
    c.sql(
        &db,
        "CREATE TABLE crash (tag text PRIMARY KEY, n int NOT NULL DEFAULT 0); GRANT ALL ON crash TO PUBLIC;
         GRANT CREATE ON SCHEMA public TO PUBLIC;
         CREATE FUNCTION crash_put(t text) RETURNS void LANGUAGE sql AS $$ INSERT INTO crash (tag) VALUES (t) $$",
    );
    let mut pw = Pgward::builder().init();
    let shim = pw.dir.join("lose_unsynced.so");
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&shim)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/common/lose_unsynced.c"))
        .args(["-ldl", "-lpthread"])
        .status()
        .expect("cc");
    assert!(cc.success(), "building the power-failure shim");
    std::fs::create_dir_all(pw.audit_dir()).unwrap();
    let audit_dir = pw.audit_dir().canonicalize().unwrap();
    pw.env.push(("LD_PRELOAD".into(), shim.display().to_string()));
    pw.env.push(("LOSE_UNSYNCED_DIR".into(), audit_dir.display().to_string()));
    pw.spawn();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut master = Rng(seed());
    let ops = Arc::new(AtomicU64::new(0));

    let probe = login.connect().await.expect("connect");
    probe.simple_query("select 1").await.expect("select 1");
    drop(probe);
    for round in 0..ROUNDS {
        let mut tasks = Vec::new();
        let pipeline = implicit_transactions(login.clone(), round);
        for client in 0..CLIENTS {
            let login = login.clone();
            let ops = ops.clone();
            let mut rng = Rng(master.next() | 1);
            tasks.push(tokio::spawn(async move {
                let c = match login.connect().await {
                    Ok(c) => c,
                    Err(e) => return eprintln!("client {client}: connect: {e}"),
                };
                let mut n = 0u64;
                let mut tag = move || {
                    n += 1;
                    format!("r{round}-c{client}-{n}")
                };
                loop {
                    if let Err(e) = one_op(&c, &mut rng, &mut tag).await {
                        eprintln!("client {client}: ended by {e}");
                        break;
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Kill at a random point of the load, once it runs.
        let started = ops.load(Ordering::Relaxed);
        within("the load starts", async {
            while ops.load(Ordering::Relaxed) < started + CLIENTS as u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(master.next() % 500)).await;
        let pid = pw.pid();
        // SAFETY: kill(2) on the pid of our own running child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        let st = pw.stop();
        assert!(st.is_some_and(|s| std::os::unix::process::ExitStatusExt::signal(&s) == Some(libc::SIGKILL)));
        for t in tasks {
            within("client ends after the kill", t).await.expect("client task");
        }
        let pipelines = within("the pipelining client ends after the kill", tokio::task::spawn_blocking(move || pipeline.join()))
            .await
            .expect("join")
            .expect("pipelining client");
        eprintln!("round {round}: {pipelines} pipelines of two INSERTs and one Sync");
        pw.spawn();
    }
    assert!(ops.load(Ordering::Relaxed) > (ROUNDS * CLIENTS) as u64, "the load ran: {} operations\n{}", ops.load(Ordering::Relaxed), pw.stderr_log());

    let rows: HashSet<String> = c.sql(&db, "SELECT tag FROM crash").lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    assert!(!rows.is_empty(), "no row was committed");
    let texts = audited_texts(&pw.audit_records());
    let missing: Vec<&String> = rows
        .iter()
        .filter(|tag| !texts.iter().any(|t| t.contains(&format!("'{tag}'")) || *t == **tag))
        .collect();
    assert!(missing.is_empty(), "{} of {} committed rows have no statement record: {missing:?}", missing.len(), rows.len());
    let tables: Vec<String> = c
        .sql(&db, &format!("SELECT relname FROM pg_class WHERE relname LIKE '{DDL_PREFIX}%'"))
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(!tables.is_empty(), "no table was created");
    let unrecorded: Vec<&String> = tables.iter().filter(|t| !texts.iter().any(|x| x.contains(t.as_str()))).collect();
    assert!(unrecorded.is_empty(), "{} of {} tables created have no statement record: {unrecorded:?}", unrecorded.len(), tables.len());
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "audit verify after {ROUNDS} kills: {out}");
}
