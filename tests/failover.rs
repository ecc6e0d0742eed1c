//! Upstream failover, with a real primary and its streaming replica (pg_basebackup) behind one
//! pgward whose `upstream.host` lists both, `target_session_attrs = "read-write"`, and a
//! read-only role routed to standbys (`standby_roles`, `prefer-standby`):
//!
//! 1. Writers land on the primary, readers on the standby (`inet_server_port()`,
//!    `pg_is_in_recovery()`), and their connections are pooled.
//! 2. The primary is fenced read-only (`default_transaction_read_only = on`, reloaded — its
//!    pooled connections stay open): a writer's login is refused with 08006 naming
//!    read-write, the pooled connection to the fenced server is discarded at checkout
//!    (`wrong_server`), and no write reaches the fenced server.
//! 3. Failover: the primary stops, the replica is promoted (`pg_ctl promote`): new writers land
//!    on the new primary and their writes succeed.
//! 4. The old primary comes back as a standby: writers — through the same pgward, and through
//!    a new one whose walk starts at the old primary — never land on it (no 25006, no write of
//!    theirs in its log), and a reader of a new pgward is served by it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::APP_DB;
use common::metrics::value as metric;
use common::replica::Replica;
use common::{
    PgCluster, Pgward, marker, rand_hex, restartable_cluster, sqlstate, toml_set, wait_for, within,
};
use tokio_postgres::SimpleQueryMessage;

/// Readers become a read-only role; everyone else runs as the service role.
const POLICY: &str = r#"
version = 1

[defaults]
action = "allow"

[[group]]
name = "readers"
role = "READER"
default = "allow"
"#;

/// A pgward in front of `primary` and `replica` (in that order), metrics on a port of its own.
fn gateway(
    primary: &'static PgCluster,
    replica: &Replica,
    reader_role: &str,
    metrics_port: u16,
) -> Pgward {
    let policy = POLICY.replace("READER", reader_role);
    let reader_role = reader_role.to_string();
    Pgward::builder_on(primary)
        .set("upstream.host", "127.0.0.1,127.0.0.1")
        .set(
            "upstream.port",
            format!("{},{}", primary.port, replica.port),
        )
        .set("upstream.target_session_attrs", "read-write")
        .set("server.metrics_listen", format!("127.0.0.1:{metrics_port}"))
        .config(move |t| {
            toml_set(
                t,
                "upstream.standby_roles",
                vec![toml::Value::from(reader_role)],
            )
        })
        .with_dir(move |dir: &Path, t: &mut toml::Table| {
            std::fs::write(dir.join("test-policy.toml"), policy).unwrap();
            toml_set(
                t,
                "policy.files",
                vec![toml::Value::from("test-policy.toml")],
            );
        })
        .start()
}

/// The values of the first row of `sql`, run in a session of its own as `user` in `group`
/// (ended with Terminate, so its upstream connection goes back to the pool); Err(SQLSTATE) if
/// the login or the statement failed.
async fn session(pw: &Pgward, user: &str, group: &str, sql: &str) -> Result<Vec<String>, String> {
    let token = pw.token(user, &[group], "15m");
    let client = pw
        .login(user, &token, APP_DB)
        .connect()
        .await
        .map_err(|e| describe(&e))?;
    let msgs = within(sql, client.simple_query(sql))
        .await
        .map_err(|e| describe(&e))?;
    let row = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(
            (0..r.len())
                .map(|i| r.get(i).unwrap_or("").to_string())
                .collect(),
        ),
        _ => None,
    });
    Ok(row.unwrap_or_default())
}

/// "SQLSTATE: message" of a failed login or statement.
fn describe(e: &tokio_postgres::Error) -> String {
    let message = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string());
    format!(
        "{}: {message}",
        sqlstate(e).unwrap_or_else(|| "(none)".into())
    )
}

/// Insert a row tagged `tag` as a writer; the port of the server that took it.
async fn write(pw: &Pgward, tag: &str) -> Result<String, String> {
    let sql =
        format!("INSERT INTO events (tag) VALUES ('{tag}') RETURNING inet_server_port()::text");
    session(pw, "writer", "writers", &sql)
        .await
        .map(|r| r[0].clone())
}

const WHERE_SQL: &str =
    "SELECT inet_server_port()::text, pg_is_in_recovery()::text, count(*)::text FROM events";

/// Wait until every upstream connection pgward opened so far (none failed, none discarded) is
/// back in its pool: check-in is asynchronous.
fn wait_all_pooled(metrics_port: u16) {
    wait_for(
        "every upstream connection back in the pool",
        Duration::from_secs(30),
        || {
            let opened = metric(metrics_port, "pgward_upstream_pool_misses_total");
            (opened >= 2.0 && metric(metrics_port, "pgward_upstream_pool_idle") == opened)
                .then_some(())
        },
    );
}

/// Phase 2: the primary fenced read-only (`default_transaction_read_only = on`): no write
/// reaches it, its pooled connection is caught at checkout, readers stay on the standby.
async fn fenced_primary_takes_no_writes(p: &'static PgCluster, pw: &Pgward, metrics_port: u16, replica_port: &str) {
    p.alter_system("default_transaction_read_only", "'on'");
    let fenced = marker("fenced");
    let refused = write(pw, &fenced)
        .await
        .expect_err("no server takes writes");
    assert!(
        refused.starts_with("08006") && refused.contains("read-write"),
        "{refused}"
    );
    assert!(
        metric(
            metrics_port,
            "pgward_upstream_pool_discards_total{reason=\"wrong_server\"}"
        ) >= 1.0,
        "the pooled connection to the fenced primary was discarded at checkout"
    );
    assert!(
        !p.log_after_barrier().contains(&fenced),
        "no write reached the fenced primary"
    );
    let row = session(pw, "rita", "readers", WHERE_SQL)
        .await
        .expect("reader session while fenced");
    assert_eq!(row[..2], [replica_port, "true"]);
}

/// Phase 4: the old primary returns as a standby, first in the host list: writers of the
/// running pgward and of a new one never land on it; a new pgward's reader is served by it.
/// The new pgward and the tags written.
async fn demoted_primary_takes_no_writes(
    p: &'static PgCluster,
    r: &Replica,
    pw: &Pgward,
    reader: &str,
    primary_port: &str,
    replica_port: &str,
) -> (Pgward, Vec<String>) {
    p.start_as_standby();
    let metrics2 = common::free_port();
    let pw2 = gateway(p, r, reader, metrics2);
    let mut demoted_tags = Vec::new();
    for i in 0..3 {
        for (gw, name) in [(pw, "pw"), (&pw2, "pw2")] {
            let tag = marker(&format!("demoted-{name}-{i}"));
            assert_eq!(
                write(gw, &tag).await,
                Ok(replica_port.to_string()),
                "{name}: a writer never lands on the demoted server"
            );
            demoted_tags.push(tag);
        }
    }
    let row = session(&pw2, "rita", "readers", WHERE_SQL)
        .await
        .expect("reader session on the demoted server");
    assert_eq!(
        row,
        [primary_port, "true", "3"],
        "a reader of a new pgward is served by the demoted server"
    );
    (pw2, demoted_tags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_the_primary_and_never_use_a_demoted_server() {
    let p = restartable_cluster();
    let reader = format!("fo_reader_{}", rand_hex(6));
    p.sql(
        "postgres",
        &format!(
            "CREATE ROLE {reader} NOLOGIN; GRANT {reader} TO {}",
            p.svc_user
        ),
    );
    p.fixture_table(
        APP_DB,
        "events",
        "id serial PRIMARY KEY, tag text NOT NULL",
        "",
    );
    p.svc_sql(APP_DB, &format!("GRANT SELECT ON events TO {reader}"));
    let r = Replica::of(p);
    let (primary_port, replica_port) = (p.port.to_string(), r.port.to_string());
    let metrics_port = common::free_port();
    let pw = gateway(p, &r, &reader, metrics_port);

    // 1. Writers on the primary, readers on the standby; both pooled.
    for i in 0..3 {
        assert_eq!(
            write(&pw, &format!("before-{i}")).await,
            Ok(primary_port.clone()),
            "a writer lands on the primary"
        );
    }
    r.wait_caught_up();
    for _ in 0..2 {
        let row = session(&pw, "rita", "readers", WHERE_SQL)
            .await
            .expect("reader session");
        assert_eq!(
            row,
            [replica_port.as_str(), "true", "3"],
            "a reader is served by the standby"
        );
    }
    wait_all_pooled(metrics_port);

    fenced_primary_takes_no_writes(p, &pw, metrics_port, &replica_port).await;

    // 3. Failover: the primary stops, the replica is promoted.
    p.stop_fast();
    r.promote();
    for i in 0..3 {
        assert_eq!(
            write(&pw, &format!("after-{i}")).await,
            Ok(replica_port.clone()),
            "a writer lands on the new primary"
        );
    }
    let row = session(&pw, "rita", "readers", WHERE_SQL)
        .await
        .expect("reader session after failover");
    assert_eq!(
        row,
        [replica_port.as_str(), "false", "6"],
        "no standby left: prefer-standby takes the primary"
    );

    let (pw2, demoted_tags) = demoted_primary_takes_no_writes(p, &r, &pw, &reader, &primary_port, &replica_port).await;

    let total = r.sql(APP_DB, "SELECT count(*) FROM events");
    assert_eq!(total, "12", "every write landed on the new primary");
    let old_log = p.server_log();
    for tag in &demoted_tags {
        assert!(
            !old_log.contains(tag.as_str()),
            "{tag} reached the demoted server"
        );
    }
    assert!(!pw.log_has_panic() && !pw2.log_has_panic());
}
