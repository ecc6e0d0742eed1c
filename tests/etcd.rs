//! `[access] backend = "etcd"` end to end, against a real etcd cluster (Debian's
//! `etcd-server`, three members on loopback ports, started by the test): two gateways in front
//! of one Postgres share the access state — a revoke or approval made with the CLI of either
//! reaches the other's sessions; a member killed mid-run changes nothing; with the whole
//! cluster down the last state stays in force and, past `[access] max_staleness`, new logins
//! are refused, until etcd is back. The audit checkpoints anchored in etcd catch a log
//! rewritten with the key or rolled back (`audit verify --anchors etcd`). And etcd over TLS
//! with client-certificate auth.

mod common;
#[path = "etcd_support.rs"]
mod etcd;
#[path = "export_support.rs"]
mod export;
#[path = "policy_support.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::gateway::rec;
use common::metrics::{sample, text as metrics};
use common::{Login, Pgward, PgwardBuilder, current_user, jwt, rand_hex, sqlstate, toml_set, within};
use etcd::EtcdCluster;
use support::{Env, env};
use tokio_postgres::Client;

/// Longest wait for something that happens within a second or two (a loaded machine is slow).
const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(100);
/// `[access] max_staleness` of the fleet test.
const MAX_STALENESS: &str = "5s";

/// The `[access]` settings of a gateway on `endpoints`, keys under `prefix`, named `node`.
fn with_etcd(b: PgwardBuilder, endpoints: &[String], prefix: &str, node: &str) -> PgwardBuilder {
    let eps: Vec<toml::Value> = endpoints.iter().map(|e| toml::Value::from(e.as_str())).collect();
    let (prefix, node) = (prefix.to_string(), node.to_string());
    b.config(move |t| {
        toml_set(t, "access.backend", "etcd");
        toml_set(t, "access.max_staleness", MAX_STALENESS);
        toml_set(t, "access.etcd.endpoints", eps);
        toml_set(t, "access.etcd.prefix", prefix);
        toml_set(t, "access.etcd.node_name", node);
    })
}

/// A second gateway in front of the same Postgres, with `a`'s policy, roles and token keys
/// (a token issued for one is good for both), sharing `a`'s etcd state; metrics on
/// `metrics_port`.
fn second_gateway(a: &Env, endpoints: &[String], prefix: &str, node: &str, metrics_port: u16) -> Pgward {
    let policy = a.pw.dir.join("test-policy.toml");
    let jwks = a.pw.config_path_value("auth.jwks");
    let rw = a.rw.clone();
    let b = Pgward::builder().config(move |t| {
        toml_set(t, "policy.files", vec![toml::Value::from(policy.display().to_string())]);
        toml_set(t, "auth.jwks", jwks.display().to_string());
        toml_set(t, "access.approver_groups", vec![toml::Value::from("approvers")]);
        toml_set(t, "access.grantable_roles", vec![toml::Value::from(rw)]);
        toml_set(t, "server.metrics_listen", format!("127.0.0.1:{metrics_port}"));
    });
    with_etcd(b, endpoints, prefix, node).start()
}


/// `pgward ARGS… --config <gw's config>`.
fn cli(gw: &Pgward, args: &[&str]) -> common::CmdOut {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(["--config".into(), gw.config_path.display().to_string()]);
    common::pgward_cli(&a)
}

/// The server's message of a refused login.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

/// Poll until a login with `login` is refused with 28P01 and a message containing `needle`.
async fn wait_refused(login: &Login, needle: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match login.connect().await {
            Err(e) if sqlstate(&e).as_deref() == Some("28P01") && message(&e).contains(needle) => {
                return message(&e);
            }
            r => assert!(Instant::now() < deadline, "login not refused with {needle:?} within {DEADLINE:?}: {r:?}"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Poll until a login with `login` succeeds.
async fn wait_accepted(login: &Login) -> Client {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match login.connect().await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "login still refused after {DEADLINE:?}: {e}"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The next statement must end the session: FATAL with `code`, message containing `needle`.
#[track_caller]
fn assert_fatal(r: Result<String, tokio_postgres::Error>, code: &str, needle: &str) {
    let e = r.expect_err("the session should have been ended");
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    assert_eq!((db.severity(), db.code().code()), ("FATAL", code), "{e}");
    assert!(db.message().contains(needle), "{needle:?} not in {:?}", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revokes_and_approvals_reach_every_gateway_and_an_outage_keeps_the_last_state() {
    let mut cluster = EtcdCluster::start(3);
    let eps = cluster.endpoints();
    let prefix = format!("/pgward-test-{}", rand_hex(8));
    let a = env("etcd_fleet", {
        let (eps, prefix) = (eps.clone(), prefix.clone());
        move |b| with_etcd(b, &eps, &prefix, "gw-a")
    });
    let metrics_port = common::free_port();
    let b = second_gateway(&a, &eps, &prefix, "gw-b", metrics_port);
    assert_eq!(sample(&metrics(metrics_port), "pgward_access_backend_connected"), Some(1.0));
    assert_eq!(doctor_access(&b), "pass");

    // A token revoked with A's CLI: B ends its live session and refuses it.
    let (leaked, _) = a.login("alice", &["analysts"], "15m");
    let leaked_on_b = b.login("alice", &leaked, &a.db);
    let live_b = leaked_on_b.connect().await.expect("the token logs in through B");
    assert_eq!(current_user(&live_b).await.unwrap(), a.ro);
    let jti = jwt::jti_of(&leaked);
    cli(&a.pw, &["token", "revoke", "--jti", &jti, "--reason", "leaked"]).expect_ok();
    wait_refused(&leaked_on_b, "revoked").await;
    assert_fatal(current_user(&live_b).await, "28P01", "revoked");
    b.wait_audit("B audits the revocation made on A", |r| {
        rec::of_kind(r, "revoke").iter().any(|x| x["jti"] == jti.as_str())
    });

    // A member killed mid-run: revocations and approvals still go through, both ways.
    cluster.kill(0);
    let (_, bob_on_a) = a.login("bob", &["analysts"], "15m");
    let live_a = bob_on_a.connect().await.expect("bob logs in through A");
    cli(&b, &["token", "revoke", "--user", "bob", "--reason", "left"]).expect_ok();
    wait_refused(&bob_on_a, "revoked").await;
    assert_fatal(current_user(&live_a).await, "28P01", "revoked");

    let id = cli(
        &a.pw,
        &["access", "request", "--user", "carol", "--role", &a.rw, "--ttl", "10m", "--reason", "incident 7"],
    )
    .expect_ok();
    let dave = a.pw.token("dave", &["approvers"], "5m");
    cli(&b, &["access", "approve", &id, "--approver", "dave", "--token", &dave]).expect_ok();
    a.pw.wait_audit("A audits the approval made on B", |r| {
        rec::of_kind(r, "access_approve").iter().any(|x| x["meta"]["id"] == id.as_str())
    });
    let (_, carol_on_a) = a.login("carol", &["analysts"], "15m");
    let carol = carol_on_a.connect().await.expect("carol logs in through A");
    assert_eq!(current_user(&carol).await.unwrap(), a.rw, "the grant approved on B applies on A");
    let list = cli(&b, &["access", "list", "--json"]).expect_ok();
    assert!(list.lines().any(|l| l.contains(&id) && l.contains("\"active\"")), "{list}");

    // The whole cluster down: the last state stays in force, live sessions keep running.
    let erin_token = a.pw.token("erin", &["analysts"], "15m");
    let erin_on_b = b.login("erin", &erin_token, &a.db);
    let erin = erin_on_b.connect().await.expect("erin logs in through B");
    cluster.kill_all();
    let refused = leaked_on_b.connect().await.expect_err("still revoked with etcd down");
    assert_eq!(sqlstate(&refused).as_deref(), Some("28P01"), "{refused}");
    let status = wait_status(&b, "UNREACHABLE");
    assert!(status.contains("etcd"), "{status}");
    let text = metrics(metrics_port);
    assert_eq!(sample(&text, "pgward_access_backend_connected"), Some(0.0), "{text}");
    assert!(sample(&text, "pgward_access_state_age_seconds").is_some_and(|v| v > 0.0), "{text}");
    assert_eq!(doctor_access(&b), "fail");

    // Past max_staleness: new logins are refused, sessions already in keep running.
    let fresh = a.pw.token("frank", &["analysts"], "15m");
    let frank_on_b = b.login("frank", &fresh, &a.db);
    let why = wait_refused(&frank_on_b, "stale").await;
    assert!(why.contains("max_staleness"), "{why}");
    assert_eq!(current_user(&erin).await.unwrap(), a.ro, "a live session outlives the staleness bound");
    assert_eq!(current_user(&carol).await.unwrap(), a.rw);

    // etcd back: logins are accepted again, the revoked token stays refused.
    cluster.restart_all();
    let frank = wait_accepted(&frank_on_b).await;
    assert_eq!(current_user(&frank).await.unwrap(), a.ro);
    let refused = leaked_on_b.connect().await.expect_err("still revoked");
    assert_eq!(sqlstate(&refused).as_deref(), Some("28P01"), "{refused}");
    assert_eq!(sample(&metrics(metrics_port), "pgward_access_backend_connected"), Some(1.0));
    assert!(!a.pw.log_has_panic() && !b.log_has_panic());
}


/// The result (`pass`, `warn`, `fail`) of `pgward doctor`'s access backend check for `gw`.
fn doctor_access(gw: &Pgward) -> String {
    let out = cli(gw, &["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    let check = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["check"] == "access backend")).cloned();
    let check = check.unwrap_or_else(|| panic!("no access backend check: {report}"));
    check["result"].as_str().unwrap_or_default().to_string()
}

/// `pgward status` of `gw`, polled until it mentions `needle`.
fn wait_status(gw: &Pgward, needle: &str) -> String {
    common::wait_for(&format!("pgward status mentions {needle:?}"), DEADLINE, || {
        let out = cli(gw, &["status"]);
        let text = out.all_output();
        text.contains(needle).then_some(text)
    })
}

/// The seqs etcd holds anchors for, under `prefix` for `node`.
async fn anchored_seqs(endpoints: &[String], prefix: &str, node: &str) -> Vec<u64> {
    let mut c = etcd_client::Client::connect(endpoints, None).await.expect("etcd client");
    let key = format!("{prefix}/anchors/{node}/");
    let resp = c.get(key.clone(), Some(etcd_client::GetOptions::new().with_prefix())).await.expect("get anchors");
    resp.kvs().iter().map(|kv| kv.key_str().unwrap()[key.len()..].parse().unwrap()).collect()
}

/// Write two anchors pgward never wrote, from the genuine anchor of `seq`: one claiming a seq far
/// past the log, one a verbatim copy under another seq. Returns their keys.
async fn forge_anchors(endpoints: &[String], prefix: &str, node: &str, seq: u64) -> Vec<String> {
    let mut c = etcd_client::Client::connect(endpoints, None).await.expect("etcd client");
    let dir = format!("{prefix}/anchors/{node}/");
    let resp = c.get(format!("{dir}{seq:020}"), None).await.expect("get anchor");
    let genuine: serde_json::Value = serde_json::from_slice(resp.kvs()[0].value()).expect("anchor JSON");
    let far = seq + 1_000_000;
    let mut moved = genuine.clone();
    moved["seq"] = far.into();
    let keys = vec![format!("{dir}{far:020}"), format!("{dir}{:020}", far + 1)];
    c.put(keys[0].clone(), moved.to_string(), None).await.expect("put");
    c.put(keys[1].clone(), genuine.to_string(), None).await.expect("put");
    keys
}

async fn remove_keys(endpoints: &[String], keys: &[String]) {
    let mut c = etcd_client::Client::connect(endpoints, None).await.expect("etcd client");
    for k in keys {
        c.delete(k.clone(), None).await.expect("delete");
    }
}

/// `pgward audit verify --anchors etcd --config <config>`: (exit code, output).
fn verify_anchors(config: &Path) -> (i32, String) {
    let out = common::pgward_cli(&["audit", "verify", "--anchors", "etcd", "--config", &config.display().to_string()]);
    (out.code.unwrap_or(-1), out.all_output())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_anchored_in_etcd_catch_a_rewritten_or_rolled_back_log() {
    let cluster = EtcdCluster::start(3);
    let eps = cluster.endpoints();
    let prefix = format!("/pgward-test-{}", rand_hex(8));
    let db = common::cluster().create_database("etcd_anchor");
    let mut pw = with_etcd(Pgward::builder(), &eps, &prefix, "gw-anchor").set("audit.checkpoint_every", 4).start();
    let token = pw.token("alice", &[], "15m");
    let c = pw.login("alice", &token, &db).connect().await.expect("login");
    for i in 0..12 {
        within("select", c.simple_query(&format!("select {i} as marker_{i}"))).await.expect("select");
    }
    drop(c);
    let deadline = Instant::now() + DEADLINE;
    let seqs = loop {
        let s = anchored_seqs(&eps, &prefix, "gw-anchor").await;
        if s.len() >= 3 {
            break s;
        }
        assert!(Instant::now() < deadline, "fewer than three anchors in etcd after {DEADLINE:?}: {s:?}");
        tokio::time::sleep(POLL).await;
    };
    let (code, out) = verify_anchors(&pw.config_path);
    assert_eq!(code, 0, "the untouched log passes: {out}");
    assert!(out.contains("etcd anchors match"), "{out}");

    // Someone who can write etcd but not read the checkpoint key: an anchor far past the log
    // (a genuine one with its seq changed) and a genuine one copied under another seq. Neither
    // is signed for where it stands: reported as forged, and the untouched log is not called
    // rolled back or rewritten.
    let forged = forge_anchors(&eps, &prefix, "gw-anchor", seqs[0]).await;
    let (code, out) = verify_anchors(&pw.config_path);
    assert_eq!(code, 1, "forged anchors are reported: {out}");
    assert!(out.contains("etcd anchors match") && out.contains("FORGED: 2 not written by pgward"), "{out}");
    assert!(!out.contains("CONTRADICT"), "forged anchors do not make the log look rolled back: {out}");
    remove_keys(&eps, &forged).await;
    pw.stop();

    // Rolled back: the log cut before the newest anchor (HEAD removed).
    let last = *seqs.iter().max().unwrap();
    let cut_dir = tempfile::tempdir().unwrap();
    let cut_cfg = pw.copy_with_audit(cut_dir.path());
    let audit = cut_dir.path().join("audit");
    truncate_before(&audit, last);
    let (code, out) = verify_anchors(&cut_cfg);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("at seq {last}")) && out.contains("no record"), "{out}");

    // Rewritten with the checkpoint key: verify alone passes, the anchors do not.
    let first = *seqs.iter().min().unwrap();
    let target = first - 1;
    let key = pw.config_path_value("audit.checkpoint_key");
    let kid = pw.config_str("audit.checkpoint_kid");
    export::rewrite_with_key(&pw.audit_dir(), target, &key, &kid, |r| r.sql = Some("select 'nothing to see'".into()));
    let (code, out) = common::gateway::audit_verify_config(&pw.config_path);
    assert_eq!(code, 0, "a consistent rewrite with the key passes verify alone: {out}");
    let (code, out) = verify_anchors(&pw.config_path);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("at seq {target}")) && out.contains("rewritten"), "{out}");
}

/// Cut the log in `dir` so that its last record is `seq - 1`, and remove HEAD.
fn truncate_before(dir: &Path, seq: u64) {
    for seg in pgward::audit::chain::list_segments(dir).expect("segments") {
        let text = std::fs::read_to_string(&seg.path).expect("segment");
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["seq"].as_u64())
                    .is_some_and(|s| s < seq)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if kept.is_empty() {
            std::fs::remove_file(&seg.path).expect("remove segment");
        } else {
            std::fs::write(&seg.path, kept).expect("rewrite segment");
        }
    }
    let _ = std::fs::remove_file(dir.join("HEAD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let cluster = EtcdCluster::start_tls();
    let tls = cluster.tls().expect("TLS files");
    let eps = cluster.endpoints();
    let prefix = format!("/pgward-test-{}", rand_hex(8));
    let (ca, cert, key) = (tls.ca.clone(), tls.client_cert.clone(), tls.client_key.clone());
    let db = common::cluster().create_database("etcd_tls");
    let pw = with_etcd(Pgward::builder(), &eps, &prefix, "gw-tls")
        .config(move |t| {
            toml_set(t, "access.etcd.ca_file", ca.display().to_string());
            toml_set(t, "access.etcd.cert_file", cert.display().to_string());
            toml_set(t, "access.etcd.key_file", key.display().to_string());
        })
        .start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let live = wait_accepted(&login).await;

    // Without the client certificate etcd refuses the CLI: an error, nothing revoked.
    let mut t = pw.config();
    common::gateway::toml_unset(&mut t, "access.etcd.cert_file");
    common::gateway::toml_unset(&mut t, "access.etcd.key_file");
    let no_cert_cfg = pw.dir.join("no-cert.toml");
    std::fs::write(&no_cert_cfg, toml::to_string(&t).unwrap()).unwrap();
    let out = common::pgward_cli(&[
        "token",
        "revoke",
        "--jti",
        &jwt::jti_of(&token),
        "--config",
        &no_cert_cfg.display().to_string(),
    ]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("etcd"), "{}", out.describe());
    assert!(!current_user(&live).await.unwrap().is_empty(), "the session runs on");

    // With it: the revocation goes through and ends the session.
    cli(&pw, &["token", "revoke", "--jti", &jwt::jti_of(&token)]).expect_ok();
    wait_refused(&login, "revoked").await;
    assert_fatal(current_user(&live).await, "28P01", "revoked");
}

/// Turn on etcd's auth on `endpoints`: `root`, and `user` with read-write on `prefix` only.
async fn enable_auth(endpoints: &[String], prefix: &str, user: &str, password: &str) {
    let mut c = etcd_client::Client::connect(endpoints, None).await.expect("etcd client");
    c.user_add("root", "root-secret", None).await.expect("add root");
    c.user_grant_role("root", "root").await.expect("root role");
    c.role_add("pgward-rw").await.expect("add role");
    let perm = etcd_client::Permission::read_write(prefix.to_string()).with_prefix();
    c.role_grant_permission("pgward-rw", perm).await.expect("grant prefix");
    c.user_add(user, password, None).await.expect("add user");
    c.user_grant_role(user, "pgward-rw").await.expect("grant role");
    c.auth_enable().await.expect("auth enable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_auth_user_and_password() {
    let cluster = EtcdCluster::start(1);
    let eps = cluster.endpoints();
    let prefix = format!("/pgward-test-{}", rand_hex(8));
    enable_auth(&eps, &prefix, "pgward", "s3cret-pw").await;
    let secrets = tempfile::tempdir().unwrap();
    let (good, bad) = (secrets.path().join("good"), secrets.path().join("bad"));
    std::fs::write(&good, "s3cret-pw\n").unwrap();
    std::fs::write(&bad, "wrong\n").unwrap();
    let db = common::cluster().create_database("etcd_auth");
    let good_path = good.display().to_string();
    let pw = with_etcd(Pgward::builder(), &eps, &prefix, "gw-auth")
        .config(move |t| {
            toml_set(t, "access.etcd.user", "pgward");
            toml_set(t, "access.etcd.password_file", good_path);
        })
        .start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let live = wait_accepted(&login).await;

    // A wrong password: the CLI fails (exit 2) and nothing is revoked.
    let mut t = pw.config();
    toml_set(&mut t, "access.etcd.password_file", bad.display().to_string());
    let bad_cfg = pw.dir.join("bad-password.toml");
    std::fs::write(&bad_cfg, toml::to_string(&t).unwrap()).unwrap();
    let jti = jwt::jti_of(&token);
    let out = common::pgward_cli(&["token", "revoke", "--jti", &jti, "--config", &bad_cfg.display().to_string()]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.contains("etcd"), "{}", out.describe());
    assert!(!current_user(&live).await.unwrap().is_empty(), "the session runs on");

    // The right one: the revocation goes through and ends the session.
    cli(&pw, &["token", "revoke", "--jti", &jti]).expect_ok();
    wait_refused(&login, "revoked").await;
    assert_fatal(current_user(&live).await, "28P01", "revoked");
}

/// Wait until etcd holds an anchor for `node` past seq `after`; all the anchored seqs.
async fn wait_anchor_after(endpoints: &[String], prefix: &str, node: &str, after: u64) -> Vec<u64> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = anchored_seqs(endpoints, prefix, node).await;
        if s.iter().any(|&x| x > after) {
            return s;
        }
        assert!(Instant::now() < deadline, "no anchor past seq {after} in etcd after {DEADLINE:?}: {s:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Someone who can write the audit directory but not read the checkpoint key replaces `HEAD`
/// while the gateway is down, naming a checkpoint far ahead. The restarted gateway anchors the
/// last run's HEAD only when its log holds that checkpoint, signed with its key: nothing lands
/// in etcd under pgward's name for that seq, and the new run's checkpoints are anchored as
/// usual (the one waiting to be written is replaced only by a newer seq, so a HEAD far ahead
/// held every later anchor back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_head_is_not_anchored_and_holds_no_anchor_back() {
    let cluster = EtcdCluster::start(1);
    let eps = cluster.endpoints();
    let prefix = format!("/pgward-test-{}", rand_hex(8));
    let db = common::cluster().create_database("etcd_head_replaced");
    let mut pw = with_etcd(Pgward::builder(), &eps, &prefix, "gw-head").start();
    let token = pw.token("alice", &[], "15m");
    let c = pw.login("alice", &token, &db).connect().await.expect("login");
    within("select", c.simple_query("select 1")).await.expect("select");
    drop(c);
    wait_anchor_after(&eps, &prefix, "gw-head", 0).await;
    pw.stop();
    let last_local = pw.audit_records().last().and_then(|r| r["seq"].as_u64()).unwrap();

    let head_path = pw.audit_dir().join("HEAD");
    let mut head: serde_json::Value = serde_json::from_slice(&std::fs::read(&head_path).unwrap()).unwrap();
    let far = last_local + 1_000_000;
    head["seq"] = far.into();
    head["anchor_seq"] = (far - 1).into();
    std::fs::write(&head_path, head.to_string()).unwrap();

    pw.spawn();
    let c = pw.login("alice", &token, &db).connect().await.expect("login after the restart");
    within("select", c.simple_query("select 2")).await.expect("select");
    drop(c);
    let seqs = wait_anchor_after(&eps, &prefix, "gw-head", last_local).await;
    assert!(!seqs.contains(&far), "the replaced HEAD was anchored: {seqs:?}");
    assert!(seqs.iter().any(|&s| s > last_local && s < far), "the new run's checkpoints are anchored: {seqs:?}");
    let (code, out) = verify_anchors(&pw.config_path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("etcd anchors match") && !out.contains("FORGED"), "{out}");
}
