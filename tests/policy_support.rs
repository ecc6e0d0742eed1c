//! Shared set-up for tests/policy_e2e.rs and tests/access.rs: a database with two tables, three
//! database roles of the test's own, a policy file written by the test, and a pgward in front.
//! (Included with `#[path]`; each test binary also has `mod common;`.)

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::gateway::{pgward_bin, rec};
use crate::common::{CmdOut, Pgward, PgwardBuilder, cluster, marker, rand_hex, run_cmd, toml_set};
use serde_json::Value;

/// The policy every test runs under (RO / RW are replaced by the test's role names):
/// analysts read (their role can only SELECT), writers read and write, nobody touches
/// `secrets`, nobody updates or deletes without WHERE, analysts keep their search_path.
pub const POLICY: &str = r#"
version = 1

[defaults]
action = "deny"

[[group]]
name = "analysts"
role = "RO"
default = "deny"

[[group]]
name = "writers"
role = "RW"
default = "deny"

[[group]]
name = "approvers"
default = "deny"

[[rule]]
name = "no-secrets"
action = "deny"
tables = ["secrets"]
reason = "the secrets table is off limits"

[[rule]]
name = "no-unbounded-writes"
action = "deny"
modifiers = ["no_where"]
reason = "UPDATE and DELETE need a WHERE clause"

[[rule]]
name = "analysts-keep-search-path"
action = "deny"
groups = ["analysts"]
modifiers = ["search_path"]
reason = "analysts keep the default search_path"

[[rule]]
name = "analysts-read"
action = "allow"
groups = ["analysts"]
classes = ["read", "session", "transaction"]

[[rule]]
name = "writers-read-write"
action = "allow"
groups = ["writers"]
classes = ["read", "write", "session", "transaction"]
"#;

pub struct Env {
    /// Dropped first (killed), before anything it uses.
    pub pw: Pgward,
    pub db: String,
    /// The analysts' role (SELECT on items and secrets).
    pub ro: String,
    /// The writers' role (SELECT/INSERT/UPDATE/DELETE on items), also the JIT-grantable one.
    pub rw: String,
}

/// A database with `items` (3 rows) and `secrets`, roles `pe_ro_*` / `pe_rw_*` that pgward's
/// service role may SET ROLE to, the policy above, `[access]` with approver group
/// `approvers` and grantable role RW; `tweak` edits the config further.
pub fn env(prefix: &str, tweak: impl FnOnce(PgwardBuilder) -> PgwardBuilder) -> Env {
    let c = cluster();
    let db = c.create_database(prefix);
    let tag = rand_hex(8);
    let (ro, rw) = (format!("pe_ro_{tag}"), format!("pe_rw_{tag}"));
    c.sql(
        "postgres",
        &format!("CREATE ROLE {ro} NOLOGIN; CREATE ROLE {rw} NOLOGIN; GRANT {ro}, {rw} TO {}", c.svc_user),
    );
    c.fixture_table(&db, "items", "id int primary key, name text", "(1, 'one'), (2, 'two'), (3, 'three')");
    c.fixture_table(&db, "secrets", "id int, v text", "(1, 'hunter2')");
    c.svc_sql(
        &db,
        &format!("GRANT SELECT ON items, secrets TO {ro}; GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {rw}"),
    );
    let policy = POLICY.replace("\"RO\"", &format!("\"{ro}\"")).replace("\"RW\"", &format!("\"{rw}\""));
    let rw2 = rw.clone();
    let b = Pgward::builder().with_dir(move |dir: &Path, t: &mut toml::Table| {
        std::fs::write(dir.join("test-policy.toml"), policy).unwrap();
        toml_set(t, "policy.files", vec![toml::Value::from("test-policy.toml")]);
        toml_set(t, "access.approver_groups", vec![toml::Value::from("approvers")]);
        toml_set(t, "access.grantable_roles", vec![toml::Value::from(rw2)]);
    });
    let pw = tweak(b).start();
    Env { pw, db, ro, rw }
}

impl Env {
    /// A token for `user` in `groups` and a login with it.
    pub fn login(&self, user: &str, groups: &[&str], ttl: &str) -> (String, crate::common::Login) {
        let token = self.pw.token(user, groups, ttl);
        let login = self.pw.login(user, &token, &self.db);
        (token, login)
    }

    /// `pgward ARGS… --config <this config>`.
    pub fn cli(&self, args: &[&str]) -> CmdOut {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.push("--config".into());
        a.push(self.pw.config_path.display().to_string());
        crate::common::pgward_cli(&a)
    }

    /// `pgward ARGS… --config <this config>` with extra environment variables.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOut {
        let mut cmd = Command::new(pgward_bin());
        cmd.args(args).arg("--config").arg(&self.pw.config_path).env("NO_COLOR", "1").env_remove("PGWARD_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut out = run_cmd(&mut cmd, None, Duration::from_secs(60));
        for (_, v) in env {
            out.what = out.what.replace(v, "<secret>");
        }
        out
    }
}

/// A marker string for SQL that must never reach Postgres.
pub fn never_marker() -> String {
    marker("never-upstream")
}

/// Assert the cluster's server log (after a barrier) does not contain `needle`.
#[track_caller]
pub fn assert_never_reached_postgres(needle: &str) {
    let log = cluster().log_after_barrier();
    assert!(!log.contains(needle), "{needle:?} reached Postgres (server log)");
}

/// The statement record whose SQL contains `needle` (exactly one), and its result record.
#[track_caller]
pub fn statement_and_result(pw: &Pgward, needle: &str) -> (Value, Value) {
    let recs = pw.wait_audit(&format!("statement + result for {needle:?}"), |r| {
        rec::statements_with(r, needle).first().is_some_and(|s| rec::result_for(r, s).is_some())
    });
    let stmts = rec::statements_with(&recs, needle);
    assert_eq!(stmts.len(), 1, "one statement record for {needle:?}: {stmts:?}");
    let s = stmts[0].clone();
    let r = rec::result_for(&recs, &s).unwrap().clone();
    (s, r)
}

/// Wait until unix time has passed `t` (seconds): for tokens and grants that must be expired,
/// and for tokens that must be issued after a revocation second.
pub fn wait_past(t: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::common::jwt::now() <= t {
        assert!(Instant::now() < deadline, "clock did not pass {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// exp of a token (unverified read).
pub fn token_exp(token: &str) -> i64 {
    crate::common::jwt::decode_unverified(token).1["exp"].as_i64().unwrap()
}
