//! Upstream session pooling, as users, a DBA and an auditor see it: a backend is reused by the
//! next login to the same database (same `pg_backend_pid()`), and the second user finds it as a
//! fresh login would leave it — their own role and application_name, no temp table, prepared
//! statement, session setting, advisory lock or LISTEN of the first. Never across databases;
//! never after a session that ended in a transaction, with an unsynced extended-protocol
//! pipeline or after a cancel; a pooled backend that was terminated is not handed out; idle
//! ones expire; `pool = false` turns it off. The audit `login` record says whether the
//! connection was reused, and every statement keeps its own user.
//!
//! Whether a connection is back in the pool is read from pgward's metrics
//! (`pgward_upstream_pool_idle`): the reset runs after the client left, so a test waits for it
//! instead of racing it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::gateway::rec;
use common::raw::{self, fe};
use common::{Login, Pgward, PgwardBuilder, cluster, jwt, marker, rand_hex, toml_set, wait_for, within};
use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Two groups, each becoming its own database role; everything else allowed (the tests need
/// temp tables, advisory locks, LISTEN, PREPARE and SET to reach Postgres).
const POLICY: &str = r#"
version = 1

[defaults]
action = "allow"

[[group]]
name = "team_a"
role = "RA"
default = "allow"

[[group]]
name = "team_b"
role = "RB"
default = "allow"
"#;

struct Env {
    /// Dropped first (killed), before anything it uses.
    pw: Pgward,
    db: String,
    ra: String,
    rb: String,
    metrics_port: u16,
}

/// A database with table `items`, roles RA / RB (the service role may SET ROLE to them, both
/// may insert into `items`), the policy above, metrics on a port of its own; `tweak` edits
/// the config further.
fn env(prefix: &str, tweak: impl FnOnce(PgwardBuilder) -> PgwardBuilder) -> Env {
    let c = cluster();
    let db = c.create_database(prefix);
    let tag = rand_hex(8);
    let (ra, rb) = (format!("pool_a_{tag}"), format!("pool_b_{tag}"));
    c.sql(
        "postgres",
        &format!("CREATE ROLE {ra} NOLOGIN; CREATE ROLE {rb} NOLOGIN; GRANT {ra}, {rb} TO {}", c.svc_user),
    );
    c.fixture_table(&db, "items", "id text", "");
    c.svc_sql(&db, &format!("GRANT SELECT, INSERT ON items TO {ra}, {rb}"));
    let policy = POLICY.replace("\"RA\"", &format!("\"{ra}\"")).replace("\"RB\"", &format!("\"{rb}\""));
    let metrics_port = common::free_port();
    let b = Pgward::builder()
        .set("server.metrics_listen", format!("127.0.0.1:{metrics_port}"))
        .with_dir(move |dir: &Path, t: &mut toml::Table| {
            std::fs::write(dir.join("test-policy.toml"), policy).unwrap();
            toml_set(t, "policy.files", vec![toml::Value::from("test-policy.toml")]);
        });
    let pw = tweak(b).start();
    Env { pw, db, ra, rb, metrics_port }
}

impl Env {
    /// A token for `user` in `group` and a login with it to `db`.
    fn login_to(&self, user: &str, group: &str, db: &str) -> (String, Login) {
        let token = self.pw.token(user, &[group], "15m");
        let login = self.pw.login(user, &token, db);
        (token, login)
    }
    fn login(&self, user: &str, group: &str) -> (String, Login) {
        self.login_to(user, group, &self.db)
    }

    /// The OpenMetrics text.
    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
    /// A sample's value (`name` with its labels, e.g. `x_total{reason="dead"}`); 0 if absent.
    fn sample(&self, name: &str) -> f64 {
        sample(&self.metrics(), name)
    }
    /// Wait until the pool holds `n` idle connections.
    #[track_caller]
    fn wait_idle(&self, n: u32) {
        wait_for(&format!("{n} idle pooled connection(s)"), Duration::from_secs(20), || {
            (self.sample("pgward_upstream_pool_idle") == f64::from(n)).then_some(())
        });
    }
    fn discards(&self, reason: &str) -> f64 {
        self.sample(&format!("pgward_upstream_pool_discards_total{{reason=\"{reason}\"}}"))
    }
    /// Wait until `n` connections were discarded for `reason` (counted as the session ends).
    #[track_caller]
    fn wait_discards(&self, reason: &str, n: u32) {
        wait_for(&format!("{n} discard(s) for {reason}"), Duration::from_secs(20), || {
            (self.discards(reason) == f64::from(n)).then_some(())
        });
    }
}

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// First column of the first row of a simple query (None for SQL NULL or no row).
async fn one(c: &Client, sql: &str) -> Option<String> {
    let msgs = within(sql, c.simple_query(sql)).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(String::from)),
        _ => None,
    })?
}

async fn backend_pid(c: &Client) -> String {
    one(c, "select pg_backend_pid()").await.unwrap()
}

/// Whether Postgres still has a backend with this pid.
fn backend_alive(pid: &str) -> bool {
    cluster().sql("postgres", &format!("select count(*) from pg_stat_activity where pid = {pid}")) == "1"
}

/// The login record of the session that logged in with `token` (waits for it).
fn login_record(pw: &Pgward, token: &str) -> Value {
    let jti = jwt::jti_of(token);
    let recs = pw.wait_audit("login record", |r| rec::login_by_jti(r, &jti).is_some());
    rec::login_by_jti(&recs, &jti).unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_user_gets_the_backend_reset_with_their_own_identity() {
    let e = env("pool_reuse", |b| b);
    let (ta, alice) = e.login("alice", "team_a");
    let (tb, bob) = e.login("bob", "team_b");
    let tmp = format!("pool_tmp_{}", rand_hex(8));
    let chan = format!("pool_chan_{}", rand_hex(8));
    let lock_key: i64 = 7_000_000 + i64::from(u16::from_str_radix(&rand_hex(4), 16).unwrap());
    let m_alice = marker("pool-alice");
    let m_bob = marker("pool-bob");

    // Session 1: alice leaves every kind of session state behind.
    let a = alice.connect().await.unwrap();
    let pid1 = backend_pid(&a).await;
    assert_eq!(one(&a, "select current_user").await.unwrap(), e.ra);
    assert_eq!(one(&a, "show application_name").await.unwrap(), "pgward:alice");
    for sql in [
        format!("create temp table {tmp}(x int)"),
        "prepare pool_stmt as select 1".to_string(),
        "set search_path = pool_nowhere, public".to_string(),
        "set statement_timeout = '4242s'".to_string(),
        format!("select pg_advisory_lock({lock_key})"),
        format!("listen {chan}"),
        format!("insert into items values ('{m_alice}')"),
    ] {
        within(&sql, a.simple_query(&sql)).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // Kept alive: tokio-postgres closes a statement when it is dropped.
    let _kept = within("protocol-level prepare", a.prepare("select 2")).await.unwrap();
    // Control: the state is really there in session 1.
    assert_eq!(one(&a, &format!("select count(*) from pg_class where relname = '{tmp}'")).await.unwrap(), "1");
    assert_eq!(one(&a, "select count(*) from pg_prepared_statements").await.unwrap(), "2");
    assert_eq!(one(&a, "show search_path").await.unwrap(), "pool_nowhere, public");
    let locks = format!("select count(*) from pg_locks where locktype = 'advisory' and objid = {lock_key}");
    assert_eq!(one(&a, &locks).await.unwrap(), "1");
    assert_eq!(one(&a, "select count(*) from pg_listening_channels()").await.unwrap(), "1");
    drop(_kept);
    drop(a);
    e.wait_idle(1);

    // Session 2: bob, another user and role, same database — same backend, clean.
    let b = bob.connect().await.unwrap();
    assert_eq!(backend_pid(&b).await, pid1, "the backend is reused");
    assert_eq!(one(&b, "select current_user").await.unwrap(), e.rb);
    assert_eq!(one(&b, "select session_user").await.unwrap(), cluster().svc_user);
    assert_eq!(one(&b, "show application_name").await.unwrap(), "pgward:bob");
    assert_eq!(one(&b, &format!("select count(*) from pg_class where relname = '{tmp}'")).await.unwrap(), "0");
    assert_eq!(one(&b, "select count(*) from pg_prepared_statements").await.unwrap(), "0");
    assert_eq!(one(&b, "show search_path").await.unwrap(), "\"$user\", public");
    assert_eq!(one(&b, "show statement_timeout").await.unwrap(), "0");
    assert_eq!(one(&b, &locks).await.unwrap(), "0");
    assert_eq!(one(&b, "select count(*) from pg_listening_channels()").await.unwrap(), "0");
    // Postgres's own view names bob, not alice.
    let activity = format!("select application_name, usename from pg_stat_activity where pid = {pid1}");
    assert_eq!(cluster().sql("postgres", &activity), format!("pgward:bob|{}", cluster().svc_user));
    within("bob's insert", b.simple_query(&format!("insert into items values ('{m_bob}')"))).await.unwrap();
    drop(b);
    e.wait_idle(1);

    // The audit: reused false then true, the same backend pid, each statement its own user.
    let la = login_record(&e.pw, &ta);
    let lb = login_record(&e.pw, &tb);
    assert_eq!(la["meta"]["upstream"]["reused"], false, "{la}");
    assert_eq!(lb["meta"]["upstream"]["reused"], true, "{lb}");
    assert_eq!(la["meta"]["upstream"]["pid"].to_string(), pid1, "{la}");
    assert_eq!(lb["meta"]["upstream"]["pid"].to_string(), pid1, "{lb}");
    let recs = e.pw.wait_audit("both inserts", |r| {
        !rec::statements_with(r, &m_alice).is_empty() && !rec::statements_with(r, &m_bob).is_empty()
    });
    let (sa, sb) = (la["session"].as_str().unwrap(), lb["session"].as_str().unwrap());
    assert_ne!(sa, sb);
    for s in rec::statements_with(&recs, &m_bob) {
        assert_eq!((s["user"].as_str(), s["session"].as_str()), (Some("bob"), Some(sb)), "{s}");
    }
    for s in rec::statements_with(&recs, &m_alice) {
        assert_eq!((s["user"].as_str(), s["session"].as_str()), (Some("alice"), Some(sa)), "{s}");
    }
    assert!(
        rec::of_session(&recs, sb).iter().all(|r| r["user"] == "bob"),
        "every record of bob's session is bob's"
    );
    assert_eq!(e.sample("pgward_upstream_pool_hits_total"), 1.0);
    assert_eq!(e.sample("pgward_upstream_pool_misses_total"), 1.0);
}

#[test]
fn the_client_is_told_the_new_application_name_and_its_own_cancel_key() {
    let e = env("pool_hello", |b| b);
    let (_, alice) = e.login("alice", "team_a");
    let (_, bob) = e.login("bob", "team_b");
    let mut a = alice.raw().unwrap();
    assert_eq!(a.params.get("application_name").map(String::as_str), Some("pgward:alice"));
    let ka = a.backend_key.unwrap();
    let pid1 = raw::rows(&a.simple_query("select pg_backend_pid()").unwrap());
    a.terminate().unwrap();
    e.wait_idle(1);

    let mut b = bob.raw_with(&[("application_name", "report")]).unwrap();
    assert_eq!(raw::rows(&b.simple_query("select pg_backend_pid()").unwrap()), pid1, "reused");
    assert_eq!(
        b.params.get("application_name").map(String::as_str),
        Some("pgward:bob:report"),
        "ParameterStatus names the new user"
    );
    assert_ne!(b.backend_key.unwrap(), ka, "a cancel key of its own");
    assert_eq!(
        raw::rows(&b.simple_query("show application_name").unwrap()),
        vec![vec![Some("pgward:bob:report".to_string())]]
    );
    b.terminate().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_across_databases() {
    let e = env("pool_db1", |b| b);
    let db2 = cluster().create_database("pool_db2");
    let (_, alice1) = e.login("alice", "team_a");
    let (_, alice2) = e.login_to("alice", "team_a", &db2);

    let c = alice1.connect().await.unwrap();
    let pid1 = backend_pid(&c).await;
    drop(c);
    e.wait_idle(1);

    let c = alice2.connect().await.unwrap();
    let pid2 = backend_pid(&c).await;
    assert_eq!(one(&c, "select current_database()").await.unwrap(), db2);
    assert_ne!(pid2, pid1, "a backend of another database is never handed out");
    drop(c);
    e.wait_idle(2);

    // Control: each database's backend is reused by a login to that database.
    let c = alice1.connect().await.unwrap();
    assert_eq!(backend_pid(&c).await, pid1);
    assert_eq!(one(&c, "select current_database()").await.unwrap(), e.db);
    drop(c);
    let c = alice2.connect().await.unwrap();
    assert_eq!(backend_pid(&c).await, pid2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ending_in_a_transaction_is_not_reused_and_rolled_back() {
    let e = env("pool_tx", |b| b);
    let (_, alice) = e.login("alice", "team_a");
    let (_, bob) = e.login("bob", "team_b");
    let m = marker("pool-tx");

    let c = alice.connect().await.unwrap();
    let pid1 = backend_pid(&c).await;
    within("begin + insert", c.simple_query(&format!("begin; insert into items values ('{m}')"))).await.unwrap();
    drop(c); // Terminate inside the open transaction
    wait_for("the backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));
    e.wait_discards("unclean", 1);
    assert_eq!(
        cluster().sql(&e.db, &format!("select count(*) from items where id = '{m}'")),
        "0",
        "the open transaction was rolled back"
    );

    let c = bob.connect().await.unwrap();
    assert_ne!(backend_pid(&c).await, pid1);
}

#[test]
fn an_unsynced_extended_protocol_pipeline_is_not_reused_nor_committed() {
    let e = env("pool_unsynced", |b| b);
    let (_, alice) = e.login("alice", "team_a");
    let m = marker("pool-unsynced");

    let mut c = alice.raw().unwrap();
    let pid1 = raw::rows(&c.simple_query("select pg_backend_pid()").unwrap());
    let pid1 = pid1[0][0].clone().unwrap();
    // Parse/Bind/Execute of an INSERT, Flush, no Sync: Postgres runs it in an implicit
    // transaction that only the Sync would commit.
    let mut batch = fe::parse("", &format!("insert into items values ('{m}')"));
    batch.extend(fe::bind_text("", "", &[]));
    batch.extend(fe::execute("", 0));
    batch.extend(fe::flush());
    c.send(&batch).unwrap();
    loop {
        let msg = c.recv().unwrap();
        assert!(!msg.is_error(), "{}", msg.describe());
        if msg.tag == b'C' {
            break;
        }
    }
    c.terminate().unwrap();
    wait_for("the backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));
    e.wait_discards("unclean", 1);
    assert_eq!(cluster().sql(&e.db, &format!("select count(*) from items where id = '{m}'")), "0");
}

#[test]
fn a_session_with_a_forwarded_cancel_is_not_reused() {
    let e = env("pool_cancel", |b| b);
    let (_, alice) = e.login("alice", "team_a");
    let mut c = alice.raw().unwrap();
    let pid1 = raw::rows(&c.simple_query("select pg_backend_pid()").unwrap())[0][0].clone().unwrap();
    let (kp, kk) = c.backend_key.unwrap();
    c.send(&fe::query("select pg_sleep(60)")).unwrap();
    cluster().wait_active_query("pg_sleep(60)");
    raw::send_cancel_request(&alice, kp, kk).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(|m| m.sqlstate()).as_deref(), Some("57014"));
    c.terminate().unwrap();
    wait_for("the backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));
    e.wait_discards("cancelled", 1);
    assert_eq!(e.sample("pgward_upstream_pool_idle"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_backend_terminated_while_idle_is_replaced() {
    let e = env("pool_killed", |b| b);
    let (_, alice) = e.login("alice", "team_a");
    let (_, bob) = e.login("bob", "team_b");
    let c = alice.connect().await.unwrap();
    let pid1 = backend_pid(&c).await;
    drop(c);
    e.wait_idle(1);
    assert_eq!(cluster().sql("postgres", &format!("select pg_terminate_backend({pid1})")), "t");
    wait_for("the backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));

    let c = bob.connect().await.expect("the next login still works");
    let pid2 = backend_pid(&c).await;
    assert_ne!(pid2, pid1);
    assert_eq!(one(&c, "select current_user").await.unwrap(), e.rb);
    assert_eq!(e.discards("dead") + e.discards("setup_failed"), 1.0);
    assert_eq!(e.sample("pgward_upstream_pool_hits_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_expire() {
    let e = env("pool_expire", |b| b.set("upstream.pool_idle_timeout", "1s"));
    let (_, alice) = e.login("alice", "team_a");
    let c = alice.connect().await.unwrap();
    let pid1 = backend_pid(&c).await;
    drop(c);
    e.wait_idle(1);
    let t0 = Instant::now();
    e.wait_idle(0);
    assert!(t0.elapsed() < Duration::from_secs(15));
    wait_for("the expired backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));
    e.wait_discards("expired", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_off_means_a_new_backend_per_login() {
    let e = env("pool_off", |b| b.set("upstream.pool", false));
    let (ta, alice) = e.login("alice", "team_a");
    let (tb, bob) = e.login("bob", "team_b");
    let c = alice.connect().await.unwrap();
    let pid1 = backend_pid(&c).await;
    drop(c);
    wait_for("the backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));
    let c = bob.connect().await.unwrap();
    assert_ne!(backend_pid(&c).await, pid1);
    assert_eq!(one(&c, "select current_user").await.unwrap(), e.rb);
    assert_eq!(one(&c, "show application_name").await.unwrap(), "pgward:bob");
    drop(c);
    for t in [&ta, &tb] {
        let l = login_record(&e.pw, t);
        assert_eq!(l["meta"]["upstream"]["reused"], false, "{l}");
    }
    assert_eq!(e.sample("pgward_upstream_pool_idle"), 0.0);
    assert_eq!(e.sample("pgward_upstream_pool_misses_total"), 0.0);
}
