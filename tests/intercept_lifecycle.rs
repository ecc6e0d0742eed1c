//! Interception lifecycle: `pgward status`, detaching on SIGTERM and on SIGKILL, missing
//! capabilities, the unix socket check, and test cleanup when a test fails. Same rules as
//! tests/intercept.rs: own child cgroups only, removed afterwards.

mod common;
#[path = "intercept_support.rs"]
mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{CmdOut, Pgward, cluster, run_cmd, toml_set};
use support::{Client, TestCgroup, any_port, counter, intercept_settings, intercepting, program_loaded, state, status, wait_attached};

#[test]
fn intercept_helper() {
    support::helper_main()
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn program_ids(pw: &Pgward) -> Vec<u32> {
    state(pw)["programs"].as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap() as u32).collect()
}

#[track_caller]
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn status_shows_attached_programs_and_counters() {
    let cg = TestCgroup::new("status");
    let port = common::free_port();
    let pw = intercepting(&cg, any_port(port), |t| {
        toml_set(t, "intercept.sk_lookup", true);
        toml_set(t, "intercept.guard", Vec::<String>::new());
    });
    let (code, st) = status(&pw);
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["running"], true);
    let programs = st["programs"].as_array().unwrap();
    let names: Vec<(&str, &str)> = programs.iter().map(|p| (p["name"].as_str().unwrap(), p["attach"].as_str().unwrap())).collect();
    assert_eq!(
        names,
        [
            ("pgw_connect4", "cgroup/connect4"),
            ("pgw_connect6", "cgroup/connect6"),
            ("pgw_getpeer4", "cgroup/getpeername4"),
            ("pgw_getpeer6", "cgroup/getpeername6"),
            ("pgw_bind4", "cgroup/bind4"),
            ("pgw_bind6", "cgroup/bind6"),
            ("pgw_sockops", "sock_ops"),
            ("pgw_sk_lookup", "sk_lookup"),
        ]
    );
    assert!(programs.iter().all(|p| p["attached"] == true), "{st}");
    assert!(programs[..7].iter().all(|p| p["target"] == cg.path.display().to_string()), "{st}");
    assert_eq!(st["counters"].as_array().unwrap().len(), 16);

    assert_eq!(counter(&pw, "pgw_connect4", "redirected"), 0);
    let o = Client::in_cgroup(&cg).connect(v4(port));
    assert_eq!(o.errno, None, "{o:?}");
    assert_eq!(counter(&pw, "pgw_connect4", "redirected"), 1);
    assert_eq!(counter(&pw, "pgw_sockops", "recorded"), 1);
    assert_eq!(counter(&pw, "pgw_getpeer4", "rewritten"), 1);

    // The human form names every program and its state.
    let out = common::pgward_cli(&["status".as_ref(), "--config".as_ref(), pw.config_path.as_os_str()] as &[&std::ffi::OsStr]);
    let text = out.expect_ok();
    assert!(text.starts_with("interception: on"), "{text}");
    for p in ["pgw_connect4", "pgw_connect6", "pgw_getpeer4", "pgw_getpeer6", "pgw_bind4", "pgw_bind6", "pgw_sockops", "pgw_sk_lookup"] {
        assert!(text.lines().any(|l| l.starts_with(p) && l.contains("attached")), "{p} in:\n{text}");
    }
}

/// The programs pinned for a gateway: (name, program id), from `pgward status --json`.
fn pinned_ids(pw: &Pgward) -> Vec<(String, u64)> {
    let (_, st) = status(pw);
    st["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["pinned"] == true)
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["id"].as_u64().unwrap()))
        .collect()
}

#[test]
fn sigterm_leaves_interception_closed_until_detached() {
    let cg = TestCgroup::new("sigterm");
    let c = cluster();
    let mut pw = intercepting(&cg, any_port(c.port), |_| {});
    let ids = program_ids(&pw);
    assert_eq!(ids.len(), 7);
    assert!(ids.iter().all(|id| program_loaded(*id)));
    assert!(cg.gateway().exists());
    let db = c.create_database("icpt_sigterm");
    // While attached, a client dialling Postgres's port gets pgward (cleartext request)...
    let o = Client::in_cgroup(&cg).login(v4(c.port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(o.auth, [3], "{o:?}");

    let st = pw.stop().expect("pgward was running");
    assert!(st.success(), "serve exits 0 on SIGTERM: {st:?}\n{}", pw.stderr_log());
    assert!(pw.stderr_log().contains("interception stays closed while pgward is stopped: 7 eBPF programs remain pinned"), "{}", pw.stderr_log());
    // ...and while no pgward serves, the service password gets nowhere: refused, every family.
    std::thread::sleep(Duration::from_millis(300));
    assert!(ids.iter().all(|id| program_loaded(*id)), "the programs stay loaded");
    assert!(!cg.gateway().exists(), "pgward removes the cgroup it created");
    for dst in [v4(c.port), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, c.port))] {
        let o = Client::in_cgroup(&cg).login(dst, &c.svc_user, &c.svc_password, &db, None);
        assert_eq!(o.errno, Some(libc::ECONNREFUSED), "{dst}: protected connects are refused while pgward is down: {o:?}");
        assert!(o.auth.is_empty(), "{o:?}");
    }
    let (code, v) = status(&pw);
    assert_eq!((code, &v["running"], &v["pinned"]), (1, &serde_json::json!(false), &serde_json::json!(true)), "{v}");
    let text = common::pgward_cli(&["status".as_ref(), "--config".as_ref(), pw.config_path.as_os_str()] as &[&std::ffi::OsStr]);
    assert!(text.stdout.starts_with("interception: CLOSED"), "{}", text.describe());

    // Detaching is the explicit, audited step; afterwards the real Postgres (SCRAM) again.
    let out = support::detach(&pw);
    assert!(out.success() && out.stdout.contains("detached 7 interception programs"), "{}", out.describe());
    wait_until("programs unloaded after detach", || ids.iter().all(|id| !program_loaded(*id)));
    let o = Client::in_cgroup(&cg).login(v4(c.port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(o.auth, [10], "{o:?}");
    let recs = pw.audit_records();
    let rec = recs.iter().find(|r| r["kind"] == "intercept_detach").unwrap_or_else(|| panic!("no intercept_detach record: {recs:?}"));
    assert_eq!(rec["meta"]["reason"], "test", "{rec}");
    assert_eq!(rec["meta"]["programs"].as_array().map(|a| a.len()), Some(7), "{rec}");
    let (code, _) = pw.audit_verify();
    assert_eq!(code, 0, "the audit chain stays intact across serve and detach");
}

#[test]
fn killed_gateway_stays_closed_and_a_restart_adopts_the_pins() {
    let cg = TestCgroup::new("sigkill");
    let c = cluster();
    let protected = common::free_port();
    // Moved layout: clients dial `protected`, the real Postgres port is guarded (EPERM).
    let mut pw = intercepting(&cg, any_port(protected), |t| toml_set(t, "intercept.sk_lookup", true));
    let before = pinned_ids(&pw);
    assert_eq!(before.len(), 8, "{before:?}");
    let pid = state(&pw)["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the pid of the `serve` process this test started (via the harness).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let st = pw.stop().expect("reaped");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL));
    let db = c.create_database("icpt_sigkill");
    let client = Client::in_cgroup(&cg);
    // Nothing cleaned up, nothing fails open: the redirect target is gone (ECONNREFUSED) and
    // the guard still refuses the real Postgres (EPERM) — the dead gateway's exemption (its
    // cgroup) does not let a client in the protected cgroup through.
    assert_eq!(client.connect(v4(protected)).errno, Some(libc::ECONNREFUSED));
    let o = client.login(v4(c.port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(o.errno, Some(libc::EPERM), "direct connect to the real Postgres while pgward is dead: {o:?}");
    assert_eq!(client.connect_mptcp(v4(c.port)).errno, Some(libc::EPERM), "MPTCP too");
    let (code, v) = status(&pw);
    assert_eq!((code, &v["running"], &v["pinned"]), (1, &serde_json::json!(false), &serde_json::json!(true)), "{v}");

    // A restart adopts the pinned programs instead of attaching twice: same programs, and
    // the protected port works again.
    pw.spawn();
    wait_log(&pw, "interception on: 8 eBPF programs adopted");
    assert_eq!(pinned_ids(&pw), before, "the very same programs");
    assert_eq!(status(&pw).0, 0);
    let token = pw.token("alice", &[], "15m");
    let o = client.login(v4(protected), "alice", &token, &db, Some("show application_name"));
    assert_eq!(o.rows, [[Some("pgward:alice".to_string())]], "{o:?}");
    assert_eq!(client.connect(v4(c.port)).errno, Some(libc::EPERM), "the guard holds after the restart");
}

#[test]
fn status_piped_into_a_closed_reader_ends_quietly() {
    let cg = TestCgroup::new("pipe");
    let pw = intercepting(&cg, any_port(common::free_port()), |_| {});
    let bin = common::gateway::pgward_bin();
    for reader in ["head -1", "head -c0", "true"] {
        let script = format!("set -o pipefail; {bin} status --config {} | {reader}", pw.config_path.display());
        let out = run_cmd(Command::new("bash").args(["-c", &script]), None, Duration::from_secs(30));
        assert!(!out.stderr.contains("panicked") && !out.stderr.contains("Broken pipe"), "{reader}: {}", out.describe());
        assert_eq!(out.code, Some(0), "{reader}: status exits as usual (0: serving): {}", out.describe());
        if reader == "head -1" {
            assert!(out.stdout.starts_with("interception: on"), "{}", out.describe());
        }
    }
}

/// Wait until pgward's stderr contains `needle`.
fn wait_log(pw: &Pgward, needle: &str) -> String {
    support::wait_log(pw, needle)
}

#[test]
fn cleanup_happens_when_a_test_fails() {
    let mut seen = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cg = TestCgroup::new("failing");
        let pw = intercepting(&cg, any_port(common::free_port()), |_| {});
        seen = Some((cg.path.clone(), program_ids(&pw)));
        panic!("a failing interception test");
    }));
    assert!(r.is_err());
    let (path, ids) = seen.unwrap();
    assert!(!path.exists(), "{} must be removed", path.display());
    wait_until("programs unloaded", || ids.iter().all(|id| !program_loaded(*id)));
}

/// `pgward serve` expected to exit at once (with `setpriv` and its arguments first, if any).
fn serve_fails(pw: &Pgward, wrapper: &[&str]) -> CmdOut {
    let mut cmd = match wrapper.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(common::gateway::pgward_bin());
            c
        }
        None => Command::new(common::gateway::pgward_bin()),
    };
    cmd.args(["serve", "--config"]).arg(&pw.config_path).env("NO_COLOR", "1");
    let out = run_cmd(&mut cmd, None, Duration::from_secs(30));
    assert_eq!(out.code, Some(2), "serve must refuse to start: {}", out.describe());
    out
}

#[test]
fn missing_capabilities_are_reported() {
    let cg = TestCgroup::new("caps");
    let port = common::free_port();
    let cgp = cg.path.display().to_string();
    let pw = Pgward::builder()
        .config(move |t| {
            toml_set(t, "intercept.enabled", true);
            toml_set(t, "intercept.cgroup", cgp);
            toml_set(t, "intercept.protected", any_port(port));
        })
        .init();
    let out = serve_fails(&pw, &["setpriv", "--bounding-set=-bpf,-net_admin,-sys_admin"]);
    assert!(out.stderr.contains("pgward lacks CAP_BPF and CAP_NET_ADMIN"), "{}", out.describe());
    let out = serve_fails(&pw, &["setpriv", "--bounding-set=-net_admin,-sys_admin"]);
    assert!(out.stderr.contains("pgward lacks CAP_NET_ADMIN (needed"), "{}", out.describe());
    assert!(!cg.gateway().exists(), "nothing is left behind");
}

/// A directory holding a socket named like the cluster's, standing in for the real one.
fn fake_socket(dir: &Path, port: u16) -> std::os::unix::net::UnixListener {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(format!(".s.PGSQL.{port}"));
    let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap(); // as Postgres does
    l
}

fn with_socket_check(cg: &TestCgroup, dir: &Path, mode: &'static str) -> Pgward {
    let dir = dir.display().to_string();
    Pgward::builder()
        .config(intercept_settings(cg, any_port(common::free_port())))
        .config(move |t| {
            toml_set(t, "intercept.upstream_socket_dirs", vec![dir]);
            toml_set(t, "intercept.unix_socket_check", mode);
        })
        .init()
}

#[test]
fn world_reachable_real_socket_refuses_start_or_warns() {
    let cg = TestCgroup::new("unixchk");
    let port = cluster().port;
    // A directory open to everyone (like a default install), configured explicitly.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let open = tmp.path().join("pg-open");
    let _l = fake_socket(&open, port);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = open.join(format!(".s.PGSQL.{port}"));
    let pw = with_socket_check(&cg, &open, "refuse");
    let out = serve_fails(&pw, &[]);
    let want = format!("the real Postgres socket {} can be reached by every local user", sock.display());
    assert!(out.stderr.contains(&want) && out.stderr.contains("unix_socket_check = \"refuse\""), "{}", out.describe());
    assert!(!cg.gateway().exists(), "refused before attaching anything");
    assert!(!support::pinned_anything(&pw), "nothing pinned");

    let mut pw = with_socket_check(&cg, &open, "warn");
    pw.spawn();
    wait_attached(&pw);
    let log = pw.stderr_log();
    assert!(log.contains(" WARN ") && log.contains(&want), "{log}");
}

/// The quick-start layout: a TCP upstream and nothing about unix sockets in the config. pgward
/// asks the server where its sockets are and refuses a world-reachable one (the default).
#[test]
fn world_reachable_socket_is_found_without_configuration() {
    let cg = TestCgroup::new("unixfound");
    let c = common::cluster::open_socket_cluster();
    let sock = c.socket_dir.join(format!(".s.PGSQL.{}", c.port));
    let pw = Pgward::builder_on(c)
        .config(intercept_settings(&cg, any_port(common::free_port())))
        .init();
    let text = std::fs::read_to_string(&pw.config_path).unwrap();
    assert!(!text.contains("upstream_socket_dirs") && !text.contains("unix_socket_check"), "nothing configured:\n{text}");
    let out = serve_fails(&pw, &[]);
    let want = format!("the real Postgres socket {} can be reached by every local user", sock.display());
    assert!(out.stderr.contains(&want), "{}", out.describe());
    // ...and what that refusal protects: any local user could log in there with the password.
    let mut psql = Command::new(common::clients::psql_bin());
    common::scrub_pg_env(&mut psql)
        .args(["-X", "-At", "-w", "-c", "select current_user", "-d"])
        .arg(format!("host={} port={} user={} dbname=postgres", c.socket_dir.display(), c.port, c.svc_user))
        .env("PGPASSWORD", &c.svc_password);
    let nobody = run_cmd(Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(psql.get_program()).args(psql.get_args()).env("PGPASSWORD", &c.svc_password), None, Duration::from_secs(30));
    assert_eq!(nobody.expect_ok(), c.svc_user, "the world-reachable socket really lets uid 65534 in");
}

/// Postgres 14+ can listen on an abstract-namespace unix socket (`unix_socket_directories =
/// '@name'`): no file, no permission bits, every process of the network namespace can connect.
/// pgward finds it by asking the server and refuses to start; the attack it stops is a
/// non-root process of the protected cgroup logging in there with the service password.
#[test]
fn abstract_namespace_socket_refuses_start() {
    let cg = TestCgroup::new("unixabs");
    let c = common::cluster::abstract_socket_cluster();
    let pw = Pgward::builder_on(c)
        .config(intercept_settings(&cg, any_port(common::free_port())))
        .init();
    let out = serve_fails(&pw, &[]);
    let want = format!("the real Postgres socket {}/.s.PGSQL.{} is in the abstract namespace", c.abstract_socket(), c.port);
    assert!(out.stderr.contains(&want) && out.stderr.contains("unix_socket_check = \"refuse\""), "{}", out.describe());
    assert!(!cg.gateway().exists(), "refused before attaching anything");
    assert!(!support::pinned_anything(&pw), "nothing pinned");
    // What the refusal protects: uid 65534 inside the protected cgroup gets in there.
    let conninfo = format!("host={} port={} user={} dbname=postgres sslmode=disable", c.abstract_socket(), c.port, c.svc_user);
    let psql = common::clients::psql_bin();
    let mut cmd = Client::in_cgroup(&cg).command(
        "setpriv",
        &["--reuid=65534", "--regid=65534", "--clear-groups", "--", &psql, "-X", "-At", "-w", "-c", "select current_user", "-d", &conninfo],
    );
    common::scrub_pg_env(&mut cmd).env("PGPASSWORD", &c.svc_password);
    let nobody = run_cmd(&mut cmd, None, Duration::from_secs(30));
    assert_eq!(nobody.expect_ok(), c.svc_user, "the abstract socket really lets uid 65534 in");
}

/// A session opened straight to the real Postgres with the service password before pgward
/// switched interception on (from inside the protected cgroup) is ended when it does — and
/// audited; one from a process outside the protected cgroup is not pgward's to end.
#[test]
fn sessions_older_than_the_switch_on_are_evicted() {
    let cg = TestCgroup::new("evict");
    let c = cluster();
    let db = c.create_database("icpt_evict");
    let inside_app = format!("attacker-{}", std::process::id());
    let outside_app = format!("bystander-{}", std::process::id());
    let mut inside = Client::in_cgroup(&cg).hold_session(v4(c.port), &c.svc_user, &c.svc_password, &db, &inside_app);
    let mut outside = Client::outside().hold_session(v4(c.port), &c.svc_user, &c.svc_password, &db, &outside_app);
    // Over the real unix socket too (root may reach it; the peer is found by its credentials).
    let unix_app = format!("attacker-unix-{}", std::process::id());
    let socket_dir = c.socket_dir.display().to_string();
    let mut inside_unix = Client::in_cgroup(&cg).hold_session_at(&socket_dir, c.port, &c.svc_user, &c.svc_password, &db, &unix_app);
    let backend = |app: &str| -> Option<(i64, String)> {
        let out = c.sql("postgres", &format!("select pid, client_port from pg_stat_activity where application_name = '{app}'"));
        let (pid, port) = out.trim().split_once('|')?;
        Some((pid.parse().ok()?, port.to_string()))
    };
    wait_until("the sessions open", || backend(&inside_app).is_some() && backend(&outside_app).is_some() && backend(&unix_app).is_some());
    let (unix_pid, _) = backend(&unix_app).unwrap();
    let (pid, client_port) = backend(&inside_app).unwrap();

    let pw = intercepting(&cg, any_port(c.port), |_| {});
    // Eviction runs once the programs are attached, before the first accept; it says when done.
    let log = wait_log(&pw, "sessions older than the switch-on that did not come through pgward");
    assert!(log.contains("evicted a session that did not come through pgward"), "{log}");
    // The old session is gone on the server (checked as superuser), its client saw why...
    assert_eq!(backend(&inside_app), None, "the session from the protected cgroup must be ended");
    let status = support::wait_child(&mut inside, Duration::from_secs(10));
    let mut err = String::new();
    std::io::Read::read_to_string(inside.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success() && err.contains("terminating connection due to administrator command"), "{status:?} {err}");
    assert_eq!(backend(&unix_app), None, "the unix-socket session from the protected cgroup must be ended");
    assert!(!support::wait_child(&mut inside_unix, Duration::from_secs(10)).success());
    // ...and the bystander outside the protected cgroup still has its session.
    assert!(backend(&outside_app).is_some(), "a session outside the intercepted cgroup is left alone");
    assert!(outside.try_wait().unwrap().is_none());
    let _ = outside.kill();
    let _ = outside.wait();

    // (Tests run in parallel on one cluster: other sessions may be in the record too, but
    // never the bystander's.)
    let recs = pw.wait_audit("an evicted record", |r| r.iter().any(|r| r["kind"] == "evicted"));
    assert!(!recs.iter().any(|r| r["kind"] == "evicted" && r["meta"]["application_name"] == outside_app.as_str()), "{recs:?}");
    let ev: Vec<&serde_json::Value> = recs.iter().filter(|r| r["kind"] == "evicted" && r["meta"]["pid"] == pid).collect();
    assert_eq!(ev.len(), 1, "{recs:?}");
    let ev = ev[0];
    assert_eq!(ev["user"], c.svc_user.as_str(), "{ev}");
    assert_eq!(ev["meta"]["pid"], pid, "{ev}");
    assert_eq!(ev["meta"]["application_name"], inside_app.as_str(), "{ev}");
    assert_eq!(ev["meta"]["terminated"], true, "{ev}");
    assert_eq!(ev["client"]["addr"], format!("127.0.0.1:{client_port}"), "{ev}");
    assert_eq!(ev["meta"]["client_cgroup"], cg.rel(), "{ev}");
    let ev = recs.iter().find(|r| r["kind"] == "evicted" && r["meta"]["pid"] == unix_pid).unwrap_or_else(|| panic!("{recs:?}"));
    assert_eq!((&ev["meta"]["application_name"], &ev["meta"]["client_cgroup"]), (&serde_json::json!(unix_app), &serde_json::json!(cg.rel())), "{ev}");
    assert_eq!(ev["client"]["uid"], 0, "a unix-socket client is named by its credentials: {ev}");
    assert_eq!(ev["client"]["pid"], ev["meta"]["client_pid"], "{ev}");
}

/// Copies (pidfd_getfd) of every socket `pid` has open, into this process.
fn take_sockets_of(pid: u32) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open with a plain pid; the returned fd is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_socket = std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd on an owned pidfd; the returned fd is owned at once.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0) };
        assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        out.push(unsafe { OwnedFd::from_raw_fd(dup as i32) });
    }
    out
}

/// A process of the protected cgroup that opened a session to the real Postgres before the
/// switch-on and handed a copy of its socket to a process outside the cgroup (as a service
/// manager's file-descriptor store would hold it) still has its session ended: the copy
/// outside does not make the session a bystander's.
#[test]
fn a_session_whose_socket_is_also_held_outside_is_evicted() {
    let cg = TestCgroup::new("evictdup");
    let c = cluster();
    let db = c.create_database("icpt_evictdup");
    let app = format!("fdstore-{}", std::process::id());
    let mut inside = Client::in_cgroup(&cg).hold_session(v4(c.port), &c.svc_user, &c.svc_password, &db, &app);
    let backend = || c.sql("postgres", &format!("select pid from pg_stat_activity where application_name = '{app}'"));
    wait_until("the session opens", || !backend().is_empty());
    let pid: i64 = backend().trim().parse().unwrap();
    // This test process (outside every test cgroup, and older than the client) holds a copy.
    let copies = take_sockets_of(inside.id());
    assert!(!copies.is_empty(), "psql holds its connection socket");

    let pw = intercepting(&cg, any_port(c.port), |_| {});
    wait_log(&pw, "sessions older than the switch-on that did not come through pgward");
    assert_eq!(backend(), "", "the session of the protected cgroup must be ended");
    assert!(!support::wait_child(&mut inside, Duration::from_secs(10)).success());
    let recs = pw.wait_audit("an evicted record", |r| r.iter().any(|r| r["kind"] == "evicted" && r["meta"]["pid"] == pid));
    let ev = recs.iter().find(|r| r["kind"] == "evicted" && r["meta"]["pid"] == pid).unwrap();
    assert_eq!((&ev["meta"]["client_pid"], &ev["meta"]["client_cgroup"]), (&serde_json::json!(inside.id()), &serde_json::json!(cg.rel())), "{ev}");
    drop(copies);
}

/// `intercept.cgroup` below a cgroup delegated to a user (its `cgroup.procs` theirs, as in a
/// systemd user manager's subtree): a process of that user in the protected cgroup can move
/// itself to a sibling cgroup it owns, out of interception. `serve` refuses to start there.
#[test]
fn a_protected_cgroup_its_users_can_leave_refuses_start() {
    const NOBODY: u32 = 65534;
    let parent = TestCgroup::new("deleg");
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    chown(&parent.path);
    chown(&parent.procs());
    let protected = TestCgroup { path: parent.path.join("protected") };
    std::fs::create_dir(&protected.path).unwrap();
    let side = parent.path.join("side");
    std::fs::create_dir(&side).unwrap();
    chown(&side);
    chown(&side.join("cgroup.procs"));
    let pw = Pgward::builder()
        .config(intercept_settings(&protected, any_port(common::free_port())))
        .init();
    let out = serve_fails(&pw, &[]);
    let want = format!("a user other than root can move processes out of {}", protected.path.display());
    assert!(out.stderr.contains(&want) && out.stderr.contains(&parent.procs().display().to_string()), "{}", out.describe());
    assert!(!protected.gateway().exists(), "refused before entering the gateway cgroup");
    assert!(!support::pinned_anything(&pw), "nothing pinned");
    // What the refusal protects: uid 65534 inside the protected cgroup leaves it.
    let script = format!("echo $$ > {}/cgroup.procs && cat /proc/self/cgroup", side.display());
    let mut cmd = Client::in_cgroup(&protected).command("setpriv", &["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/bin/sh", "-c", &script]);
    let moved = run_cmd(&mut cmd, None, Duration::from_secs(30));
    assert!(moved.expect_ok().ends_with("/side"), "uid 65534 really moves out: {}", moved.describe());
}

#[test]
fn private_real_socket_passes_and_group_members_count_as_others() {
    let cg = TestCgroup::new("unixok");
    let port = cluster().port;
    // 0700 root: only root (and pgward, root here) can enter.
    let tmp = tempfile::tempdir().unwrap();
    let private = tmp.path().join("pg-private");
    let _l = fake_socket(&private, port);
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut pw = with_socket_check(&cg, &private, "refuse");
    pw.spawn();
    wait_attached(&pw);
    assert!(pw.stderr_log().contains("the real Postgres socket is private"), "{}", pw.stderr_log());
    drop(pw);

    // 0750 with the group of a local non-root user: that user gets in.
    let (name, uid, gid) = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f[0].to_string(), f.get(2)?.parse::<u32>().ok()?, f.get(3)?.parse::<u32>().ok()?))
        })
        .find(|(_, uid, gid)| *uid != 0 && *gid != 0)
        .expect("a local non-root user with a non-root primary group");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = tmp.path().join("pg-group");
    let _l2 = fake_socket(&shared, port);
    std::os::unix::fs::chown(&shared, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o750)).unwrap();
    let pw = with_socket_check(&cg, &shared, "refuse");
    let out = serve_fails(&pw, &[]);
    assert!(out.stderr.contains(&format!("can be reached by user {name} (uid {uid})")), "{}", out.describe());
}
