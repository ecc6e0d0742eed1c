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
use support::{Client, TestCgroup, any_port, counter, intercepting, program_loaded, state, status, wait_attached};

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
            ("pgw_sockops", "sock_ops"),
            ("pgw_sk_lookup", "sk_lookup"),
        ]
    );
    assert!(programs.iter().all(|p| p["attached"] == true), "{st}");
    assert!(programs[..5].iter().all(|p| p["target"] == cg.path.display().to_string()), "{st}");
    assert_eq!(st["counters"].as_array().unwrap().len(), 11);

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
    for p in ["pgw_connect4", "pgw_connect6", "pgw_getpeer4", "pgw_getpeer6", "pgw_sockops", "pgw_sk_lookup"] {
        assert!(text.lines().any(|l| l.starts_with(p) && l.contains("attached")), "{p} in:\n{text}");
    }
}

#[test]
fn sigterm_detaches_the_programs_and_leaves_the_cgroup() {
    let cg = TestCgroup::new("sigterm");
    let c = cluster();
    let mut pw = intercepting(&cg, any_port(c.port), |_| {});
    let ids = program_ids(&pw);
    assert_eq!(ids.len(), 5);
    assert!(ids.iter().all(|id| program_loaded(*id)));
    assert!(cg.gateway().exists());
    let db = c.create_database("icpt_sigterm");
    // While attached, a client dialling Postgres's port gets pgward (cleartext request)...
    let o = Client::in_cgroup(&cg).login(v4(c.port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(o.auth, [3], "{o:?}");

    let st = pw.stop().expect("pgward was running");
    assert!(st.success(), "serve exits 0 on SIGTERM: {st:?}\n{}", pw.stderr_log());
    assert!(pw.stderr_log().contains("interception off: 5 eBPF programs detached"), "{}", pw.stderr_log());
    wait_until("programs unloaded", || ids.iter().all(|id| !program_loaded(*id)));
    assert!(!cg.gateway().exists(), "pgward removes the cgroup it created");
    assert!(!pw.dir.join("intercept.state.json").exists());
    let (code, v) = status(&pw);
    assert_eq!((code, &v["running"], &v["programs"]), (1, &serde_json::json!(false), &serde_json::json!([])));
    // ...and afterwards the real Postgres (SCRAM) again.
    let o = Client::in_cgroup(&cg).login(v4(c.port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(o.auth, [10], "{o:?}");
}

#[test]
fn killed_gateway_leaves_nothing_attached() {
    let cg = TestCgroup::new("sigkill");
    let port = common::free_port();
    let pw = intercepting(&cg, any_port(port), |t| toml_set(t, "intercept.sk_lookup", true));
    let ids = program_ids(&pw);
    assert_eq!(ids.len(), 6);
    let pid = state(&pw)["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the pid of the `serve` process this test started (via the harness).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // The links are file descriptors of the process: gone with it, no cleanup code needed.
    wait_until("programs unloaded after SIGKILL", || ids.iter().all(|id| !program_loaded(*id)));
    let o = Client::in_cgroup(&cg).connect(v4(port));
    assert_eq!(o.errno, Some(libc::ECONNREFUSED), "nothing redirects any more: {o:?}");
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
    let (cgp, dir) = (cg.path.display().to_string(), dir.display().to_string());
    Pgward::builder()
        .config(move |t| {
            toml_set(t, "intercept.enabled", true);
            toml_set(t, "intercept.cgroup", cgp);
            toml_set(t, "intercept.protected", any_port(common::free_port()));
            toml_set(t, "intercept.sk_lookup", false);
            toml_set(t, "intercept.upstream_socket_dirs", vec![dir]);
            toml_set(t, "intercept.unix_socket_check", mode);
        })
        .init()
}

#[test]
fn world_reachable_real_socket_refuses_start_or_warns() {
    let cg = TestCgroup::new("unixchk");
    let c = cluster();
    // The test cluster's socket directory is open to everyone (like a default install).
    let sock = c.socket_dir.join(format!(".s.PGSQL.{}", c.port));
    assert!(sock.exists());
    let pw = with_socket_check(&cg, &c.socket_dir, "refuse");
    let out = serve_fails(&pw, &[]);
    let want = format!("the real Postgres socket {} can be reached by every local user", sock.display());
    assert!(out.stderr.contains(&want) && out.stderr.contains("unix_socket_check = \"refuse\""), "{}", out.describe());
    assert!(!cg.gateway().exists(), "refused before attaching anything");

    let mut pw = with_socket_check(&cg, &c.socket_dir, "warn");
    pw.spawn();
    wait_attached(&pw);
    let log = pw.stderr_log();
    assert!(log.contains(" WARN ") && log.contains(&want), "{log}");
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
