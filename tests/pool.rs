//! Upstream session pooling, as users, a DBA and an auditor see it: a backend is reused by the
//! next login to the same database (same `pg_backend_pid()`), and the second user finds it as a
//! fresh login would leave it — their own role and application_name, no temp table, prepared
//! statement, session setting, advisory lock, LISTEN or `random()` seed of the first. Never
//! across databases; never after a session that ended in a transaction, with an unsynced
//! extended-protocol pipeline or after a cancel; a pooled backend that was terminated is not
//! handed out; idle ones expire; `pool = false` turns it off. A group role that `SET ROLE`
//! cannot set (missing, or `none`) refuses the login and never leaves a session as the
//! service role. The audit `login` record says whether the
//! connection was reused, and every statement keeps its own user.
//!
//! Whether a connection is back in the pool is read from pgward's metrics
//! (`pgward_upstream_pool_idle`): the reset runs after the client left, so a test waits for it
//! instead of racing it.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::rec;
use common::raw::{self, fe};
use common::{Login, PgCluster, Pgward, PgwardBuilder, cluster, jwt, marker, rand_hex, tls_cluster, toml_set, wait_for, within};
use pgward::pool::{Acquired, Pool, PoolKey};
use pgward::upstream::{Target, Upstream};
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
        // Two event loops (the default is one per 4 cores): pooled backends then move
        // between loops, which is what the re-homing in pool.rs is for.
        .set("server.worker_threads", 2)
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
        common::metrics::text(self.metrics_port)
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
    common::metrics::sample(text, name).unwrap_or(0.0)
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

/// The random generator's seed is backend state `DISCARD ALL` keeps (the `seed` setting is
/// outside `RESET ALL`): a user who seeds it and leaves must not know the next user's
/// `random()` values on the reused backend — by `setseed()` or by `SET seed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_planted_by_one_user_does_not_predict_the_next_users_random() {
    let e = env("pool_seed", |b| b);
    // What random() returns first after seeding with 0.5, on any backend.
    let known = cluster().sql("postgres", "with s as materialized (select setseed(0.5)) select random() from s");
    for plant in ["select setseed(0.5)", "set seed = 0.5"] {
        let (_, alice) = e.login("alice", "team_a");
        let (_, bob) = e.login("bob", "team_b");
        let a = alice.connect().await.unwrap();
        let pid1 = backend_pid(&a).await;
        within(plant, a.simple_query(plant)).await.unwrap();
        drop(a);
        e.wait_idle(1);

        let b = bob.connect().await.unwrap();
        assert_eq!(backend_pid(&b).await, pid1, "{plant}: the backend is reused");
        let got = one(&b, "select random()").await.unwrap();
        assert_ne!(got, known, "{plant}: alice's seed predicts bob's random()");
        drop(b);
        e.wait_idle(1);
    }
}

/// Postgres reads `SET ROLE "none"` — quoted or not — as `SET ROLE NONE`, the session user;
/// no role can be named `none`. A group whose role is written "none" must not log its users
/// in as the service role (with every role the service role may switch to): the login is
/// refused like one whose role does not exist, and nothing ran upstream as the service role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_role_named_none_is_refused_not_the_service_role() {
    let e = env("pool_role_none", |b| {
        b.with_dir(|dir: &Path, _t: &mut toml::Table| {
            let policy = POLICY.replace("\"RB\"", "\"none\"").replace("\"RA\"", "\"none\"");
            std::fs::write(dir.join("test-policy.toml"), policy).unwrap();
        })
    });
    let m = marker("pool-role-none");
    for round in 0..2 {
        // The second login finds a pooled connection (left by the control session below) when
        // the first did not get one.
        let (token, bob) = e.login("bob", "team_b");
        match bob.connect().await {
            Ok(c) => {
                let who = one(&c, "select current_user").await.unwrap();
                let _ = c.simple_query(&format!("insert into items values ('{m}')")).await;
                panic!("round {round}: logged in as {who:?} (the service role is {})", cluster().svc_user);
            }
            Err(err) => {
                let db = err.as_db_error().unwrap_or_else(|| panic!("a server error: {err}"));
                assert_eq!((db.severity(), db.code().code()), ("FATAL", "22023"), "{err}");
                assert!(db.message().contains("\"none\""), "{err}");
            }
        }
        let jti = jwt::jti_of(&token);
        let recs = e.pw.wait_audit("login_failed", |r| {
            r.iter().any(|x| x["kind"] == "login_failed" && x["jti"] == jti.as_str())
        });
        assert!(rec::login_by_jti(&recs, &jti).is_none(), "no login record");
        // A control session as the service role leaves a pooled connection behind.
        if round == 0 {
            let c = e.pw.login("carol", &e.pw.token("carol", &[], "15m"), &e.db).connect().await.unwrap();
            assert_eq!(one(&c, "select current_user").await.unwrap(), cluster().svc_user);
            drop(c);
            e.wait_idle(1);
        }
    }
    assert_eq!(cluster().sql(&e.db, &format!("select count(*) from items where id = '{m}'")), "0");
}

/// A group whose role does not exist: the checkout's `SET ROLE` fails on the pooled backend,
/// the login is refused with Postgres's answer, and the backend — which ran the failed setup —
/// is closed rather than pooled again or handed to the session without its role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_role_is_missing_is_refused_and_the_backend_closed() {
    let missing = format!("pool_missing_{}", rand_hex(8));
    let policy = POLICY.replace("\"RB\"", &format!("\"{missing}\""));
    let e = env("pool_role_missing", move |b| {
        b.with_dir(move |dir: &Path, _t: &mut toml::Table| std::fs::write(dir.join("test-policy.toml"), policy).unwrap())
    });
    // A service-role session leaves a pooled backend behind.
    let c = e.pw.login("carol", &e.pw.token("carol", &[], "15m"), &e.db).connect().await.unwrap();
    let pid1 = backend_pid(&c).await;
    drop(c);
    e.wait_idle(1);

    let (token, bob) = e.login("bob", "team_b");
    let err = match bob.connect().await {
        Ok(c) => panic!("logged in as {:?}", one(&c, "select current_user").await),
        Err(err) => err,
    };
    let db = err.as_db_error().unwrap_or_else(|| panic!("a server error: {err}"));
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "22023"), "{err}");
    assert!(db.message().contains(&missing), "{err}");
    e.wait_discards("setup_failed", 1);
    wait_for("the backend to exit", Duration::from_secs(20), || (!backend_alive(&pid1)).then_some(()));
    assert_eq!(e.sample("pgward_upstream_pool_idle"), 0.0);
    let jti = jwt::jti_of(&token);
    let recs = e.pw.wait_audit("login_failed", |r| r.iter().any(|x| x["kind"] == "login_failed" && x["jti"] == jti.as_str()));
    assert!(rec::login_by_jti(&recs, &jti).is_none(), "no login record");
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

// ---------------------------------------------------------------------------------------------
// Event-loop homing, against the library (`pgward::pool`) with real event loops: pgward runs one
// current-thread runtime per OS thread, and a pooled connection must be driven by the loop of
// the session that checks it out — not by the loop that opened it.

/// A pgward-style event loop: a current-thread runtime on its own OS thread, running tasks
/// spawned through its handle (as `server::run` does). Stopping it drops the runtime, and with
/// it the reactor every socket registered there depends on.
struct EventLoop {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventLoop {
    fn start(name: &str) -> EventLoop {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                tx.send(rt.handle().clone()).unwrap();
                let _ = rt.block_on(stopped);
                // `rt` is dropped here: its reactor is gone.
            })
            .unwrap();
        EventLoop { handle: rx.recv().unwrap(), stop: Some(stop), thread: Some(thread) }
    }

    /// Run `fut` as a task of this loop and wait for its output (a panic in it fails the test).
    fn run<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(Duration::from_secs(60)).expect("the task on the event loop panicked or hung")
    }

    /// End the loop and drop its runtime (joins the thread).
    fn shut_down(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A pool as `pgward serve` makes it, and the key of a login to `db` as the service role.
fn lib_pool(c: &PgCluster, host: &str, tls: pgward::config::UpstreamTls, db: &str) -> (Arc<Pool>, Target, PoolKey) {
    let endpoint = pgward::upstream::Endpoint { host: host.to_string(), port: c.port };
    let target = Target::new(vec![endpoint], tls, Duration::from_secs(10));
    let key = PoolKey::new(&target, &c.svc_user, db, &[("TimeZone".to_string(), "UTC".to_string())]);
    (Arc::new(Pool::new(true, 4, 8, Duration::from_secs(300), Duration::from_secs(10))), target, key)
}

/// Check out a connection for `user` on the current loop (role: none, the service role).
async fn checkout(pool: &Pool, target: &Target, key: &PoolKey, password: &str, user: &str) -> Acquired {
    within("checkout", pool.acquire(target, key, Some(password), &format!("pgward:{user}"), None))
        .await
        .unwrap_or_else(|e| panic!("checkout for {user}: {e}"))
}

/// Run a simple query on an upstream connection; the rows as text (None for SQL NULL).
async fn up_query(up: &mut Upstream, sql: &str) -> Vec<Vec<Option<String>>> {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    pgward::wire::query(&mut out, sql);
    up.stream.write_all(&out).await.unwrap();
    up.stream.flush().await.unwrap();
    let mut rows = Vec::new();
    loop {
        let f = within(sql, pgward::wire::read_frame(&mut up.stream, &mut up.leftover, 1 << 20)).await.unwrap();
        match f.tag {
            b'D' => {
                let b = f.body();
                let n = i16::from_be_bytes([b[0], b[1]]) as usize;
                let mut at = 2;
                let mut row = Vec::new();
                for _ in 0..n {
                    let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    at += 4;
                    if len < 0 {
                        row.push(None);
                    } else {
                        row.push(Some(String::from_utf8(b[at..at + len as usize].to_vec()).unwrap()));
                        at += len as usize;
                    }
                }
                rows.push(row);
            }
            b'E' => panic!("{sql}: {}", pgward::wire::decode_error(&f).message),
            b'Z' => {
                up.tx_status = f.body()[0];
                return rows;
            }
            _ => {}
        }
    }
}

/// Wait (from the test thread) until the pool holds `n` idle connections.
#[track_caller]
fn wait_pool_idle(pool: &Pool, n: usize) {
    wait_for(&format!("{n} idle connection(s) in the pool"), Duration::from_secs(20), || (pool.idle() == n).then_some(()));
}

/// A plain TCP or unix-socket connection opened on loop A and checked in there is checked out
/// on loop B after loop A's runtime is gone — so B's reactor must be the one driving it: a
/// stream still registered with A's (dropped) reactor fails its first read, the setup Query
/// fails, and the pool would open a new connection instead (`reused` false, another pid).
#[test]
fn a_pooled_plain_connection_is_driven_by_the_loop_that_checks_it_out() {
    let c = cluster();
    for (what, host) in [("tcp", "127.0.0.1".to_string()), ("unix socket", c.socket_dir.display().to_string())] {
        let db = c.create_database("pool_rehome");
        let (pool, target, key) = lib_pool(c, &host, pgward::config::UpstreamTls::Disable, &db);
        let pw = c.svc_password.clone();

        // Loop A: a new login, used, then the session ends cleanly (reset + check-in run on A).
        let a = EventLoop::start("test-loop-a");
        let (p, t, k, w) = (pool.clone(), target.clone(), key.clone(), pw.clone());
        let pid = a.run(async move {
            let mut got = checkout(&p, &t, &k, &w, "alice").await;
            assert!(!got.reused, "{what}: the first login opens a connection");
            let pid = up_query(&mut got.up, "select pg_backend_pid()").await[0][0].clone().unwrap();
            assert_eq!(pid, got.up.backend_pid.to_string());
            up_query(&mut got.up, "set statement_timeout = '4242s'").await;
            p.session_ended(k, Some(got.up), false);
            pid
        });
        wait_pool_idle(&pool, 1);
        a.shut_down();

        // Loop B (another thread, another runtime): the same backend, working.
        let b = EventLoop::start("test-loop-b");
        let (p, t, k, w) = (pool.clone(), target.clone(), key.clone(), pw.clone());
        let (reused, rows) = b.run(async move {
            let mut got = checkout(&p, &t, &k, &w, "bob").await;
            let rows = up_query(
                &mut got.up,
                "select pg_backend_pid(), current_setting('application_name'), current_setting('statement_timeout')",
            )
            .await;
            // And again after B's reactor had to wake the task for it.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let again = up_query(&mut got.up, "select 41 + 1").await;
            assert_eq!(again, vec![vec![Some("42".to_string())]], "{what}");
            (got.reused, rows)
        });
        assert!(reused, "{what}: the pooled connection is reused on another loop after its first loop is gone");
        assert_eq!(
            rows,
            vec![vec![Some(pid.clone()), Some("pgward:bob".to_string()), Some("0".to_string())]],
            "{what}: the same backend, reset, named after the new user"
        );
        assert_eq!(pool.idle(), 0);
    }
}

/// A TLS upstream connection cannot leave the loop that registered it (the TLS state lives
/// in the tokio stream): it is only handed out on that loop. Loop B gets a new connection while
/// A's stays pooled, and A gets its own back.
#[test]
fn a_pooled_tls_connection_stays_on_its_loop() {
    let c = tls_cluster();
    let db = c.create_database("pool_tls_home");
    let (pool, target, key) = lib_pool(c, "127.0.0.1", pgward::config::UpstreamTls::Require, &db);
    let pw = c.svc_password.clone();
    let a = EventLoop::start("test-loop-a");
    let b = EventLoop::start("test-loop-b");

    let (p, t, k, w) = (pool.clone(), target.clone(), key.clone(), pw.clone());
    let pid_a = a.run(async move {
        let mut got = checkout(&p, &t, &k, &w, "alice").await;
        assert!(!got.reused);
        let ssl = up_query(&mut got.up, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").await;
        assert_eq!(ssl, vec![vec![Some("t".to_string())]], "the upstream connection is TLS");
        let pid = got.up.backend_pid;
        p.session_ended(k, Some(got.up), false);
        pid
    });
    wait_pool_idle(&pool, 1);

    let (p, t, k, w) = (pool.clone(), target.clone(), key.clone(), pw.clone());
    let (reused_b, pid_b) = b.run(async move {
        let mut got = checkout(&p, &t, &k, &w, "bob").await;
        let rows = up_query(&mut got.up, "select 1").await;
        assert_eq!(rows, vec![vec![Some("1".to_string())]]);
        let r = (got.reused, got.up.backend_pid);
        got.up.close().await;
        r
    });
    assert!(!reused_b, "loop B does not get loop A's TLS connection");
    assert_ne!(pid_b, pid_a);
    assert_eq!(pool.idle(), 1, "A's TLS connection was skipped, not closed");

    let (p, t, k, w) = (pool.clone(), target.clone(), key.clone(), pw.clone());
    let (reused_a, rows) = a.run(async move {
        let mut got = checkout(&p, &t, &k, &w, "carol").await;
        let rows = up_query(&mut got.up, "select pg_backend_pid(), current_setting('application_name')").await;
        (got.reused, rows)
    });
    assert!(reused_a, "loop A gets its TLS connection back");
    assert_eq!(rows, vec![vec![Some(pid_a.to_string()), Some("pgward:carol".to_string())]]);
    assert_eq!(pool.idle(), 0);
}
