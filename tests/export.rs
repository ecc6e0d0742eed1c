//! Audit export for the host's log pipeline: with `audit.export = "syslog"` every durable record
//! also arrives as an RFC 5424 message on the syslog socket, carrying the record exactly as it
//! is in the hash-chained log; with "stdout" as a JSON line on pgward's stdout (journald); with
//! "syslog-tls" at a real rsyslog over TLS — every record, in order, also after the receiver
//! restarts — and `audit verify --against` that copy catches a rewrite by the key holder.

mod common;
#[path = "export_support.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Pgward, cluster, marker, pgward_cli, wait_for};
use support::{Rsyslog, TestCa, key_holder_rewrite};
use serde_json::Value;

#[test]
fn syslog_export_carries_each_record_as_rfc5424() {
    let db = cluster().create_database("export_syslog");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("log");
    let syslog = UnixDatagram::bind(&sock_path).unwrap();
    syslog.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let pw = Pgward::builder()
        .set("audit.export", "syslog")
        .set("audit.syslog_socket", sock_path.to_str().unwrap())
        .start();
    let token = pw.token("alice", &["analysts"], "15m");
    let m = marker("exported");
    let out = pw.login("alice", &token, &db).psql(&["-c", &format!("select '{m}' as x")]);
    assert_eq!(out.code, Some(0), "{}", out.describe());

    // Collect datagrams until the statement carrying the marker arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline && !got.iter().any(|g| g.contains(&m)) {
        if let Ok(n) = syslog.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let msg = got
        .iter()
        .find(|g| g.contains(&m))
        .unwrap_or_else(|| panic!("no syslog message with the statement; got {got:#?}"));
    // <PRI>1 TS HOST pgward PID MSGID - JSON
    let parts: Vec<&str> = msg.splitn(8, ' ').collect();
    assert_eq!(parts.len(), 8, "{msg}");
    assert_eq!(parts[0], "<38>1", "facility auth, severity info, RFC 5424 version 1: {msg}");
    assert_eq!(parts[3], "pgward");
    assert_eq!(parts[5], "statement");
    let exported: Value = serde_json::from_str(parts[7]).unwrap();
    assert_eq!(parts[1], exported["ts"].as_str().unwrap(), "header timestamp is the record's ts");

    // The exported record is the stored one, hash and all.
    let stored = pw.wait_audit("the exported statement in the log", |r| {
        r.iter().any(|x| x["seq"] == exported["seq"])
    });
    let same = stored.iter().find(|x| x["seq"] == exported["seq"]).unwrap();
    assert_eq!(same, &exported);
    assert_eq!(exported["user"], "alice");
    assert!(got.iter().any(|g| g.split(' ').nth(5) == Some("login")), "login record exported too: {got:#?}");
}

#[test]
fn stdout_export_prints_json_lines() {
    let db = cluster().create_database("export_stdout");
    let pw = Pgward::builder().set("audit.export", "stdout").start();
    let token = pw.token("bob", &[], "15m");
    let m = marker("stdout-export");
    let out = pw.login("bob", &token, &db).psql(&["-c", &format!("select '{m}'")]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = pw.stderr_log();
        let line = log.lines().find(|l| l.starts_with('{') && l.contains(&m));
        if let Some(line) = line {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["kind"], "statement");
            assert_eq!(v["user"], "bob");
            assert_eq!(v["hash"].as_str().map(str::len), Some(64));
            break;
        }
        assert!(Instant::now() < deadline, "no JSON line with the statement on stdout:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One psql session running `n` statements, each with a marker.
fn run_statements(pw: &Pgward, token: &str, db: &str, prefix: &str, n: usize) -> Vec<String> {
    let markers: Vec<String> = (0..n).map(|i| marker(&format!("{prefix}-{i}"))).collect();
    let sql: Vec<String> = markers.iter().map(|m| format!("select '{m}'")).collect();
    let mut args = Vec::new();
    for s in &sql {
        args.push("-c");
        args.push(s.as_str());
    }
    pw.login("alice", token, db).psql(&args).expect_ok();
    markers
}

/// Wait until the local log is at rest (its last record is a checkpoint: the session ended and
/// the interval checkpoint anchored it) and rsyslog wrote every one of its seqs. Returns the
/// last local seq.
fn wait_delivered(pw: &Pgward, rsyslog: &Rsyslog, what: &str) -> u64 {
    wait_for(what, Duration::from_secs(60), || {
        let local = pw.audit_records();
        let last = local.last()?;
        if last["kind"] != "checkpoint" {
            return None;
        }
        let got: BTreeSet<u64> = rsyslog.seqs().into_iter().collect();
        local.iter().all(|r| got.contains(&r["seq"].as_u64().unwrap_or(0))).then(|| last["seq"].as_u64().unwrap_or(0))
    })
}

fn verify_against(config: &std::path::Path, copy: &std::path::Path) -> (i32, String) {
    let out = pgward_cli(&[
        "audit".as_ref(),
        "verify".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--against".as_ref(),
        copy.as_os_str(),
    ] as &[&std::ffi::OsStr]);
    (out.code.unwrap_or(-1), out.all_output())
}

#[test]
fn syslog_tls_export_reaches_rsyslog_once_in_order_across_a_receiver_restart() {
    let db = cluster().create_database("export_rsyslog");
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(tmp.path());
    let mut rsyslog = Rsyslog::start(tmp.path(), &ca);
    let mut pw = Pgward::builder()
        .set("audit.export", "syslog-tls")
        .set("audit.syslog_address", rsyslog.addr())
        .set("audit.syslog_ca", ca.ca_pem.display().to_string())
        .start();
    let token = pw.token("alice", &["analysts"], "15m");
    let before = run_statements(&pw, &token, &db, "before-restart", 20);
    let acked = wait_delivered(&pw, &rsyslog, "rsyslog to have every record");

    // The receiver goes away; statements keep running and are audited meanwhile.
    rsyslog.stop();
    let during = run_statements(&pw, &token, &db, "receiver-down", 20);
    rsyslog.spawn();
    wait_delivered(&pw, &rsyslog, "rsyslog, restarted, to have every record");
    // A clean stop sends what is left (the shutdown checkpoint).
    pw.stop();
    let local: Vec<u64> = pw.audit_records().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let last = *local.last().unwrap();
    wait_for("the shutdown checkpoint at rsyslog", Duration::from_secs(30), || {
        rsyslog.seqs().contains(&last).then_some(())
    });

    let arrived = rsyslog.seqs();
    let unique: BTreeSet<u64> = arrived.iter().copied().collect();
    assert_eq!(unique.into_iter().collect::<Vec<_>>(), local, "every local record arrives, nothing else");
    let mut max = 0;
    for &s in &arrived {
        if s > max {
            assert_eq!(s, max + 1, "records arrive in order: {arrived:?}");
            max = s;
        } else {
            assert!(s > acked, "seq {s} arrived twice, but rsyslog had it before the restart: {arrived:?}");
        }
    }
    let text = std::fs::read_to_string(&rsyslog.out).unwrap();
    for m in before.iter().chain(&during) {
        assert!(text.contains(m.as_str()), "statement {m} at rsyslog");
    }
    let line = text.lines().find(|l| l.contains(&during[0])).unwrap();
    assert!(line.contains(" pgward statement {\"seq\":"), "RFC 5424 APP-NAME and MSGID: {line}");

    // verify --against: the untouched log matches the copy rsyslog wrote...
    let (code, out) = verify_against(&pw.config_path, &rsyslog.out);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit log OK") && out.contains("export matches"), "{out}");

    // ...and a rewrite by someone holding the checkpoint key passes verify alone, but not
    // against the copy: the first divergence is the rewritten record.
    let records = pw.audit_records();
    let target = records
        .iter()
        .find(|r| r["kind"] == "statement" && r["sql"].as_str().is_some_and(|s| s.contains(&before[3])))
        .expect("the statement")["seq"]
        .as_u64()
        .unwrap();
    let (_copy_dir, cfg) = key_holder_rewrite(&pw, target, |r| r.sql = Some("select 'nothing to see'".into()));
    let (code, out) = common::gateway::audit_verify_config(&cfg);
    assert_eq!(code, 0, "a consistent rewrite with the key passes verify alone: {out}");
    let (code, out) = verify_against(&cfg, &rsyslog.out);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("export DIVERGES at seq {target}:")), "{out}");
}

#[test]
fn syslog_tcp_export_reaches_rsyslog_octet_counted() {
    let db = cluster().create_database("export_rsyslog_tcp");
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(tmp.path());
    let rsyslog = Rsyslog::start(tmp.path(), &ca);
    let pw = Pgward::builder()
        .set("audit.export", "syslog-tcp")
        .set("audit.syslog_address", rsyslog.tcp_addr())
        .set("audit.syslog_max_message", support::RSYSLOG_MAX_MESSAGE as i64)
        .start();
    let token = pw.token("alice", &[], "15m");
    // A statement longer than rsyslog's default 8 KiB message size (the test's rsyslog allows
    // 256 KiB, and pgward is told so): one frame, not cut.
    let long = "x".repeat(20_000);
    let markers = run_statements(&pw, &token, &db, "plain-tcp", 5);
    pw.login("alice", &token, &db).psql(&["-c", &format!("select '{long}' as long")]).expect_ok();
    wait_delivered(&pw, &rsyslog, "rsyslog to have every record");
    let arrived = rsyslog.seqs();
    let local: Vec<u64> = pw.audit_records().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(arrived, local, "each record once, in order");
    let text = std::fs::read_to_string(&rsyslog.out).unwrap();
    assert!(markers.iter().all(|m| text.contains(m.as_str())), "{text}");
    let (code, out) = verify_against(&pw.config_path, &rsyslog.out);
    assert_eq!(code, 0, "the 20 kB statement arrived whole: {out}");
    assert!(out.contains("export matches"), "{out}");
}

/// One RFC 5424 message, octet-counted, to a syslog TCP input: what any local user (or anyone
/// who reaches the receiver) can send with `logger -t pgward`.
fn inject(addr: &str, msgid: &str, body: &str) {
    use std::io::Write as _;
    let msg = format!("<38>1 2026-12-01T10:00:00.000000Z host pgward 1 {msgid} - {body}");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("{} {msg}", msg.len()).as_bytes()).unwrap();
}

/// A record for `seq` that is self-consistent (its hash recomputes from its bytes) and links to
/// the genuine record before it, but says something else: forgeable without any key.
fn forged_line(genuine: &Value, edit: impl Fn(&mut pgward::audit::Record)) -> String {
    let mut rec: pgward::audit::Record = serde_json::from_value(genuine.clone()).unwrap();
    edit(&mut rec);
    rec.hash.clear();
    let mut c = Vec::new();
    rec.write_json(&mut c).unwrap();
    let h = pgward::audit::chain::chain_hash(rec.prev_hash.as_bytes(), &c, b"");
    c.pop();
    format!("{},\"hash\":\"{}\"}}", String::from_utf8(c).unwrap(), String::from_utf8(h.to_vec()).unwrap())
}

/// The receiver takes messages from anyone, so its copy holds lines pgward never sent. Lines
/// forged without the checkpoint key — another version of a statement, a record past the log's
/// end, a stub, text that does not parse — neither make an untouched log look rewritten nor
/// keep `verify --against` from catching a rewrite by the key holder.
#[test]
fn lines_forged_into_the_receiver_neither_accuse_nor_hide() {
    let db = cluster().create_database("export_forged_lines");
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(tmp.path());
    let rsyslog = Rsyslog::start(tmp.path(), &ca);
    let mut pw = Pgward::builder()
        .set("audit.export", "syslog-tcp")
        .set("audit.syslog_address", rsyslog.tcp_addr())
        .start();
    let token = pw.token("alice", &[], "15m");
    let markers = run_statements(&pw, &token, &db, "forged-lines", 6);
    wait_delivered(&pw, &rsyslog, "rsyslog to have every record");
    pw.stop();
    let last = *rsyslog.seqs().iter().max().unwrap();
    wait_for("the shutdown checkpoint at rsyslog", Duration::from_secs(30), || {
        let local = pw.audit_records();
        (rsyslog.seqs().iter().max() == local.last().and_then(|r| r["seq"].as_u64()).as_ref()).then_some(())
    });
    let records = pw.audit_records();
    let statement = |m: &str| {
        records.iter().find(|r| r["kind"] == "statement" && r["sql"].as_str().is_some_and(|s| s.contains(m))).unwrap()
    };
    let victim = statement(&markers[1]);
    let forged = forged_line(victim, |r| {
        r.user = Some("mallory".into());
        r.sql = Some("drop table payroll".into());
    });
    let tail = records.last().unwrap();
    let past_end = forged_line(tail, |r| {
        r.seq += 1;
        r.prev_hash = "f".repeat(64);
    });
    let stub_seq = statement(&markers[2])["seq"].as_u64().unwrap();
    let stub = format!("{{\"seq\":{stub_seq},\"kind\":\"statement\",\"hash\":\"{}\",\"oversize\":1}}", "0".repeat(64));
    inject(&rsyslog.tcp_addr(), "statement", &forged);
    inject(&rsyslog.tcp_addr(), "statement", &past_end);
    inject(&rsyslog.tcp_addr(), "statement", &stub);
    inject(&rsyslog.tcp_addr(), "statement", "{\"seq\":");
    wait_for("the forged lines at rsyslog", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&rsyslog.out).unwrap_or_default();
        (text.contains("drop table payroll") && text.contains("{\"seq\":\n")).then_some(())
    });
    assert!(last >= victim["seq"].as_u64().unwrap());

    let (code, out) = verify_against(&pw.config_path, &rsyslog.out);
    assert_eq!(code, 0, "the untouched log matches what pgward sent: {out}");
    assert!(out.contains("export matches"), "{out}");
    assert!(out.contains("4 lines of the copy are not pgward's records"), "{out}");

    // The key holder rewrites another statement: still the first divergence, forged lines or not.
    let target = statement(&markers[4])["seq"].as_u64().unwrap();
    let (_copy_dir, cfg) = key_holder_rewrite(&pw, target, |r| r.sql = Some("select 'nothing to see'".into()));
    let (code, out) = verify_against(&cfg, &rsyslog.out);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("export DIVERGES at seq {target}:")), "{out}");
}

/// Someone who can write the audit directory (not the key) puts an empty segment file there,
/// named for the seq after the export cursor, while the receiver is away. The exporter, which
/// finds the segment to resume in by name, still delivers every record once the receiver is
/// back — none skipped, none stalled — and `verify` names the file.
#[test]
fn a_planted_segment_name_neither_stalls_nor_thins_the_export() {
    let db = cluster().create_database("export_planted_segment");
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(tmp.path());
    let mut rsyslog = Rsyslog::start(tmp.path(), &ca);
    let mut pw = Pgward::builder()
        .set("audit.export", "syslog-tcp")
        .set("audit.syslog_address", rsyslog.tcp_addr())
        .start();
    let token = pw.token("alice", &[], "15m");
    run_statements(&pw, &token, &db, "before-plant", 3);
    wait_delivered(&pw, &rsyslog, "rsyslog to have every record");
    rsyslog.stop();
    let during = run_statements(&pw, &token, &db, "receiver-down", 5);
    let cursor: Value = serde_json::from_slice(&std::fs::read(pw.audit_dir().join("export.cursor")).unwrap()).unwrap();
    let acked = cursor["seq"].as_u64().unwrap();
    let planted = pw.audit_dir().join(pgward::audit::chain::segment_name(acked + 1));
    std::fs::write(&planted, b"").unwrap();
    rsyslog.spawn();
    wait_delivered(&pw, &rsyslog, "rsyslog, restarted, to have every record");
    let text = std::fs::read_to_string(&rsyslog.out).unwrap();
    assert!(during.iter().all(|m| text.contains(m.as_str())), "{text}");
    pw.stop();
    let (code, out) = common::gateway::audit_verify_config(&pw.config_path);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&pgward::audit::chain::segment_name(acked + 1)) && out.contains("no records"), "{out}");
}

/// A client decides how long its statement record is. One longer than the receiver takes whole
/// (`audit.syslog_max_message`, set to what rsyslog is configured with) is sent as a stub with
/// its seq and hash instead of arriving cut: the copy stays evidence, `verify --against`
/// compares the stub's hash, and a rewrite of that record by the key holder still shows.
#[test]
fn a_record_longer_than_the_receiver_takes_arrives_as_a_stub_not_cut() {
    let db = cluster().create_database("export_long_record");
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(tmp.path());
    let rsyslog = Rsyslog::start(tmp.path(), &ca);
    let mut pw = Pgward::builder()
        .set("audit.export", "syslog-tcp")
        .set("audit.syslog_address", rsyslog.tcp_addr())
        .set("audit.syslog_max_message", support::RSYSLOG_MAX_MESSAGE as i64)
        .start();
    let token = pw.token("alice", &[], "15m");
    let m = marker("long-record");
    let long = format!("{m}{}", "x".repeat(support::RSYSLOG_MAX_MESSAGE + 1000));
    // Through stdin: one argument may not be that long.
    let sql = format!("select '{long}' as long;\n");
    pw.login("alice", &token, &db).psql_with_stdin(&[], Some(sql.as_bytes())).expect_ok();
    wait_delivered(&pw, &rsyslog, "rsyslog to have every record");
    pw.stop();
    let records = pw.audit_records();
    let target = records
        .iter()
        .find(|r| r["kind"] == "statement" && r["sql"].as_str().is_some_and(|s| s.contains(&m)))
        .unwrap();
    let seq = target["seq"].as_u64().unwrap();
    let text = std::fs::read_to_string(&rsyslog.out).unwrap();
    let line = text.lines().find(|l| l.contains(&format!("{{\"seq\":{seq},"))).expect("the record at rsyslog");
    assert!(line.contains("\"oversize\":") && line.contains(target["hash"].as_str().unwrap()), "{line}");
    let (code, out) = verify_against(&pw.config_path, &rsyslog.out);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("export matches") && !out.contains("not pgward's records"), "{out}");

    let (_copy_dir, cfg) = key_holder_rewrite(&pw, seq, |r| r.sql = Some("select 1".into()));
    let (code, out) = verify_against(&cfg, &rsyslog.out);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("export DIVERGES at seq {seq}:")), "{out}");
}
