//! Interception bypass matrix: every way a client could try to reach Postgres, each with its
//! exact outcome. Every test makes its own child cgroup (pgward attaches there, never to the
//! root), moves only its own client processes in, and removes it afterwards; remote clients
//! live in network namespaces the test creates. See tests/intercept_support.rs.
//!
//! The shared cluster's random port stands in for 5432 (the default `intercept.protected`).
//! Two layouts:
//! - in place: Postgres stays on the protected port, pgward connects to it and is exempt;
//! - moved: Postgres is on another port (the guard refuses it), clients dial the protected one.

mod common;
#[path = "intercept_support.rs"]
mod support;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use common::{Pgward, cluster, toml_set};
use support::{Client, Job, Netns, TestCgroup, any_port, counter, host_ipv4, intercepting, wait_log};

/// Authentication request codes: what pgward asks for, and what the real Postgres asks of its
/// SCRAM service role.
const CLEARTEXT: i32 = 3;
const SASL: i32 = 10;

#[test]
fn intercept_helper() {
    support::helper_main()
}

fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
fn v4(port: u16) -> SocketAddr {
    addr([127, 0, 0, 1].into(), port)
}
fn v6(port: u16) -> SocketAddr {
    addr(Ipv6Addr::LOCALHOST.into(), port)
}

/// In place: the real Postgres port is the protected one.
fn in_place(name: &str) -> (TestCgroup, Pgward, u16) {
    let cg = TestCgroup::new(name);
    let port = cluster().port;
    let pw = intercepting(&cg, any_port(port), |_| {});
    (cg, pw, port)
}

#[test]
fn local_tcp_to_protected_port_lands_in_pgward_and_needs_a_token() {
    let (cg, pw, port) = in_place("local");
    let db = cluster().create_database("icpt_local");
    let token = pw.token("alice", &[], "15m");
    let client = Client::in_cgroup(&cg);
    for dst in [v4(port), v6(port), addr(host_ipv4(), port)] {
        let o = client.login(dst, "alice", "not-a-token", &db, None);
        assert_eq!(o.auth, [CLEARTEXT], "{dst}: pgward (cleartext request) must answer, got {o:?}");
        assert_eq!(o.sqlstate.as_deref(), Some("28P01"), "{dst}: a password that is not a token: {o:?}");
        assert!(!o.ready, "{dst}: {o:?}");

        let o = client.login(dst, "alice", &token, &db, Some("show application_name"));
        assert_eq!((o.auth.as_slice(), o.ready, o.sqlstate.as_deref()), ([CLEARTEXT].as_slice(), true, None), "{dst}: {o:?}");
        assert_eq!(o.rows, [[Some("pgward:alice".to_string())]], "{dst}: relayed by pgward to the real Postgres");
        // Redirected: the socket's own end is on loopback, towards pgward's listener.
        let local = o.local.unwrap();
        assert!(local.ip().is_loopback() || local.ip() == IpAddr::V6("::ffff:127.0.0.1".parse().unwrap()), "{dst}: {local}");
    }
    assert!(counter(&pw, "pgw_connect4", "redirected") >= 4);
    assert!(counter(&pw, "pgw_connect6", "redirected") >= 2);
}

#[test]
fn old_service_password_is_refused_by_pgward() {
    let (cg, pw, port) = in_place("svcpw");
    let c = cluster();
    let db = c.create_database("icpt_svcpw");
    // Control, outside the cgroup: the real Postgres asks the service role for SCRAM.
    let direct = Client::outside().login(v4(port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(direct.auth, [SASL], "outside the cgroup the real Postgres answers: {direct:?}");
    // Inside: pgward answers, and the service credential is not a token.
    let o = Client::in_cgroup(&cg).login(v4(port), &c.svc_user, &c.svc_password, &db, None);
    assert_eq!(o.auth, [CLEARTEXT], "{o:?}");
    assert_eq!(o.sqlstate.as_deref(), Some("28P01"), "{o:?}");
    pw.wait_audit("login_failed for the service role", |r| {
        r.iter().any(|r| r["kind"] == "login_failed" && r["user"] == c.svc_user.as_str())
    });
}

#[test]
fn gateway_upstream_connection_is_exempt_by_cgroup_not_uid() {
    let (cg, pw, port) = in_place("exempt");
    let db = cluster().create_database("icpt_exempt");
    let token = pw.token("alice", &[], "15m");
    // pgward's connect to the protected port reaches Postgres (else this login would loop back
    // into pgward and fail), and it is counted as exempt.
    let exempt_before = counter(&pw, "pgw_connect4", "exempt");
    let o = Client::in_cgroup(&cg).login(v4(port), "alice", &token, &db, Some("select current_user"));
    assert!(o.ready, "{o:?}");
    assert_eq!(o.rows, [[Some(cluster().svc_user.clone())]]);
    assert!(counter(&pw, "pgw_connect4", "exempt") > exempt_before);
    // pgward sits in its own cgroup below the test's...
    let st = support::state(&pw);
    let pid = st["pid"].as_u64().unwrap();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.contains(&format!("0::{}/pgward-gateway", cg.rel())), "{own}");
    // ...and that, not its uid, is what exempts it: the client ran as the same uid (root) and
    // was still redirected.
    // SAFETY: getuid has no preconditions.
    assert_eq!(unsafe { libc::getuid() }, 0);
    assert_eq!(o.auth, [CLEARTEXT], "a root client in the cgroup is redirected: {o:?}");
}

#[test]
fn getpeername_shows_the_dialled_address() {
    let (cg, pw, port) = in_place("peer");
    let client = Client::in_cgroup(&cg);
    let pgward_port = pw.addr.port();
    for dst in [v4(port), v6(port), addr(host_ipv4(), port)] {
        let o = client.connect(dst);
        assert_eq!(o.errno, None, "{dst}: {o:?}");
        assert_eq!(o.peer, Some(dst), "{dst}: getpeername must show the dialled address");
        assert_ne!(o.peer.unwrap().port(), pgward_port);
    }
    assert!(counter(&pw, "pgw_getpeer4", "rewritten") >= 2);
    assert!(counter(&pw, "pgw_getpeer6", "rewritten") >= 1);
}

/// Over IPv6 too, and for a second client from the same cgroup (whose path pgward then takes
/// from its cache of resolved cgroups instead of /proc).
#[test]
fn pgward_learns_who_connected() {
    let (cg, pw, port) = in_place("meta");
    let db = cluster().create_database("icpt_meta");
    let token = pw.token("alice", &[], "15m");
    let first = Client::in_cgroup(&cg).login(v6(port), "alice", &token, &db, None);
    let second = Client::in_cgroup(&cg).login(v6(port), "alice", &token, &db, None);
    assert!(first.ready && second.ready, "{first:?} {second:?}");
    assert_ne!(first.pid, second.pid);
    let recs = pw.wait_audit("two logins", |r| r.iter().filter(|r| r["kind"] == "login").count() >= 2);
    for o in [&first, &second] {
        let login = recs
            .iter()
            .find(|r| r["kind"] == "login" && r["client"]["meta"]["pid"] == o.pid)
            .unwrap_or_else(|| panic!("no login record for pid {}: {recs:?}", o.pid));
        let meta = &login["client"]["meta"];
        assert_eq!(meta["original_dst"], format!("[::1]:{port}"), "{login}");
        assert_eq!(meta["via"], "connect6", "{login}");
        assert_eq!(meta["uid"], 0, "{login}");
        assert_eq!(meta["cgroup"], cg.rel(), "{login}");
    }
}

/// The login record's `client.meta` carries what the kernel recorded about the client.
#[test]
fn login_record_carries_who_connected() {
    let (cg, pw, port) = in_place("audit");
    let db = cluster().create_database("icpt_audit");
    let token = pw.token("alice", &[], "15m");
    let o = Client::in_cgroup(&cg).login(v4(port), "alice", &token, &db, None);
    assert!(o.ready, "{o:?}");
    let recs = pw.wait_audit("login", |r| r.iter().any(|r| r["kind"] == "login"));
    let login = recs.iter().find(|r| r["kind"] == "login").unwrap();
    let meta = &login["client"]["meta"];
    assert_eq!(meta["original_dst"], format!("127.0.0.1:{port}"), "{login}");
    assert_eq!(meta["pid"], o.pid, "{login}");
    assert_eq!(meta["uid"], 0, "{login}");
    assert_eq!(meta["cgroup"], cg.rel(), "{login}");
}

#[test]
fn direct_connect_to_the_real_upstream_is_eperm() {
    // Moved: Postgres stays on its port (guarded by default), clients dial another one.
    let cg = TestCgroup::new("guard");
    let pg_port = cluster().port;
    let protected = common::free_port();
    let pw = intercepting(&cg, any_port(protected), |_| {});
    let client = Client::in_cgroup(&cg);
    for dst in [v4(pg_port), v6(pg_port), addr(host_ipv4(), pg_port)] {
        let o = client.connect(dst);
        assert_eq!(o.errno, Some(libc::EPERM), "{dst}: {o:?}");
        // TCP Fast Open connects inside sendto(MSG_FASTOPEN): the same hook refuses it.
        let o = client.run(&Job::FastOpen { addr: dst });
        assert_eq!(o.errno, Some(libc::EPERM), "{dst}: Fast Open: {o:?}");
    }
    // Through the protected port, Fast Open lands in pgward too: it asks for a password in
    // cleartext (the token), where Postgres would have asked for SCRAM.
    for dst in [v4(protected), v6(protected)] {
        let o = client.run(&Job::FastOpen { addr: dst });
        assert_eq!((o.errno, o.auth.as_slice(), o.peer), (None, [CLEARTEXT].as_slice(), Some(dst)), "{dst}: Fast Open: {o:?}");
    }
    // The same client through the protected port gets pgward, and pgward (exempt from the
    // guard) gets the real Postgres.
    let db = cluster().create_database("icpt_guard");
    let token = pw.token("alice", &[], "15m");
    let o = client.login(v4(protected), "alice", &token, &db, Some("show application_name"));
    assert_eq!(o.rows, [[Some("pgward:alice".to_string())]], "{o:?}");
    assert!(counter(&pw, "pgw_connect4", "refused") >= 4);
    assert_eq!(counter(&pw, "pgw_connect6", "refused"), 2);
    // Kernel log lines reach pgward's log (aya-log → tracing, target gateway_ebpf).
    wait_log(&pw, &format!("connect4: 127.0.0.1:{pg_port} refused (EPERM)"));
    // A process outside the attached cgroup is not affected.
    assert_eq!(Client::outside().connect(v4(pg_port)).errno, None);
}

/// sk_lookup is per network namespace and these tests run in parallel: each matches only its
/// own veth address.
fn with_sk_lookup(ns: &Netns, pg_port: u16, kind: &'static str) -> impl FnOnce(&mut toml::Table) + 'static {
    let entry = vec![format!("{}:{pg_port}", ns.host_ip)];
    move |t: &mut toml::Table| {
        toml_set(t, "intercept.sk_lookup", true);
        // No default guard (any address on Postgres's port): it would overlap the other test.
        toml_set(t, "intercept.guard", Vec::<String>::new());
        toml_set(t, kind, entry);
    }
}

/// Accepts on the host-side veth address at Postgres's port: a stand-in for Postgres listening
/// on `*` (the shared cluster listens on 127.0.0.1 only). Returns how many it accepted.
fn decoy(at: SocketAddr) -> (std::net::TcpListener, impl Fn(&std::net::TcpListener) -> usize) {
    let l = std::net::TcpListener::bind(at).unwrap_or_else(|e| panic!("decoy on {at}: {e}"));
    l.set_nonblocking(true).unwrap();
    (l, |l: &std::net::TcpListener| std::iter::from_fn(|| l.accept().ok()).count())
}

#[test]
fn remote_client_in_another_netns_lands_in_pgward() {
    let cg = TestCgroup::new("remote");
    let ns = Netns::new();
    let port = cluster().port;
    let (decoy, accepted) = decoy(addr(ns.host_ip, port));
    let pw = intercepting(&cg, any_port(port), with_sk_lookup(&ns, port, "intercept.protected"));
    let db = cluster().create_database("icpt_remote");
    let token = pw.token("alice", &[], "15m");
    let dst = addr(ns.host_ip, port);
    // The remote client is even in the attached cgroup: connect4 leaves other namespaces alone.
    let remote = Client::in_cgroup(&cg).in_netns(&ns);
    // pgward answers (Postgres would ask for SCRAM): plain TCP from another host is refused
    // before any password is asked for; with TLS the token works.
    let o = remote.login(dst, "alice", &token, &db, None);
    assert_eq!((o.auth.as_slice(), o.sqlstate.as_deref()), ([].as_slice(), Some("28000")), "{o:?}");
    assert!(o.message.as_deref().is_some_and(|m| m.contains("only over TLS")), "{o:?}");
    let mut cmd = remote.command(&common::clients::psql_bin(), &["-X", "-At", "-w", "-c", "show application_name", "-d"]);
    common::scrub_pg_env(&mut cmd).env("PGPASSWORD", &token).arg(format!(
        "host={} port={port} user=alice dbname={db} sslmode=require connect_timeout=15",
        ns.host_ip
    ));
    let mut out = common::run_cmd(&mut cmd, None, std::time::Duration::from_secs(60));
    out.what = out.what.replace(&token, "<token>");
    assert_eq!(out.expect_ok(), "pgward:alice:psql");
    assert_eq!(accepted(&decoy), 0, "the stand-in for Postgres on {dst} must get nothing");
    assert!(counter(&pw, "pgw_sk_lookup", "redirected") >= 2);
    let recs = pw.wait_audit("a login via sk_lookup", |r| {
        r.iter().any(|r| r["kind"] == "login" && r["client"]["meta"]["via"] == "sk_lookup")
    });
    let login = recs.iter().find(|r| r["kind"] == "login" && r["client"]["meta"]["via"] == "sk_lookup").unwrap();
    assert_eq!(login["client"]["meta"]["original_dst"], dst.to_string(), "{login}");
}

#[test]
fn remote_client_to_the_guarded_port_is_refused() {
    let cg = TestCgroup::new("rguard");
    let ns = Netns::new();
    let pg_port = cluster().port;
    let (decoy, accepted) = decoy(addr(ns.host_ip, pg_port));
    let pw = intercepting(&cg, any_port(common::free_port()), with_sk_lookup(&ns, pg_port, "intercept.guard"));
    let o = Client::outside().in_netns(&ns).connect(addr(ns.host_ip, pg_port));
    assert_eq!(o.errno, Some(libc::ECONNREFUSED), "{o:?}");
    assert_eq!(accepted(&decoy), 0);
    assert_eq!(counter(&pw, "pgw_sk_lookup", "refused"), 1);
    // Without pgward's programs the stand-in would have answered.
    drop(pw);
    let o = Client::outside().in_netns(&ns).connect(addr(ns.host_ip, pg_port));
    assert_eq!(o.errno, None, "{o:?}");
    assert_eq!(accepted(&decoy), 1);
}

#[test]
fn default_unix_socket_path_lands_in_pgward() {
    // aya cannot attach cgroup/connect_unix: pgward itself listens on the well-known path (here a
    // temp dir standing in for /var/run/postgresql, and the cluster's port for 5432).
    let cg = TestCgroup::new("unix");
    let c = cluster();
    let run = tempfile::tempdir().unwrap();
    let well_known = run.path().join("postgresql");
    std::fs::create_dir(&well_known).unwrap();
    let dir = well_known.display().to_string();
    let pw = intercepting(&cg, any_port(c.port), move |t| {
        toml_set(t, "server.unix_socket_dir", dir);
        toml_set(t, "server.unix_socket_port", c.port as i64);
    });
    let db = c.create_database("icpt_unix");
    let token = pw.token("alice", &[], "15m");
    let login = common::Login::new(&well_known.to_string_lossy(), c.port, "alice", Some(&token), &db);
    let out = login.sql("show application_name");
    assert_eq!(out.expect_ok(), "pgward:alice:psql", "psql's own application_name follows the user");
    // The service password over that path gets pgward's refusal, not Postgres.
    let svc = common::Login::new(&well_known.to_string_lossy(), c.port, &c.svc_user, Some(&c.svc_password), &db);
    match svc.raw() {
        Err(e) => assert_eq!(e.sqlstate().as_deref(), Some("28P01"), "{e:?}"),
        Ok(_) => panic!("the service password must not log in through pgward's socket"),
    }
}

/// MPTCP sockets are redirected through their first subflow; getpeername on the MPTCP socket
/// itself must still show the dialled address, not pgward's listener.
#[test]
fn getpeername_shows_the_dialled_address_for_mptcp() {
    let (cg, pw, port) = in_place("mptcp");
    let client = Client::in_cgroup(&cg);
    for dst in [v4(port), v6(port)] {
        let o = client.connect_mptcp(dst);
        assert_eq!(o.errno, None, "{dst}: {o:?}");
        assert_eq!(o.peer, Some(dst), "{dst}: getpeername of an MPTCP socket must show the dialled address");
    }
    assert!(counter(&pw, "pgw_getpeer", "mptcp") >= 2);
    // And it is pgward that answers an MPTCP client, not Postgres.
    assert!(counter(&pw, "pgw_connect4", "redirected") >= 1 && counter(&pw, "pgw_connect6", "redirected") >= 1);
}

/// The attacker of the threat model: a non-root-ish process inside the protected cgroup that
/// holds the service password, trying every address form and socket kind while pgward is
/// stopped (SIGTERM). Every attempt fails; nothing reaches the real Postgres.
#[test]
fn bypass_attempts_while_pgward_is_stopped_all_fail() {
    let cg = TestCgroup::new("bypassdown");
    let c = cluster();
    let protected = common::free_port();
    let mut pw = intercepting(&cg, any_port(protected), |_| {});
    let db = c.create_database("icpt_bypassdown");
    assert!(pw.stop().is_some_and(|s| s.success()));
    let client = Client::in_cgroup(&cg);
    let mapped = |p: u16| addr("::ffff:127.0.0.1".parse().unwrap(), p);
    let host = host_ipv4();
    for dst in [v4(protected), v6(protected), addr(host, protected), mapped(protected)] {
        assert_eq!(client.connect(dst).errno, Some(libc::ECONNREFUSED), "{dst}: nothing serves the protected port");
        assert_eq!(client.connect_mptcp(dst).errno, Some(libc::ECONNREFUSED), "{dst} (MPTCP)");
    }
    for dst in [v4(c.port), v6(c.port), addr(host, c.port), mapped(c.port)] {
        assert_eq!(client.connect(dst).errno, Some(libc::EPERM), "{dst}: the guard holds while pgward is stopped");
        assert_eq!(client.connect_mptcp(dst).errno, Some(libc::EPERM), "{dst} (MPTCP)");
        let o = client.login(dst, &c.svc_user, &c.svc_password, &db, Some("select 1"));
        assert!(!o.ready && o.auth.is_empty(), "{dst}: the service password gets nowhere: {o:?}");
    }
    // A process in a cgroup below the protected one is covered the same way.
    let nested = TestCgroup { path: cg.path.join("nested") };
    std::fs::create_dir(&nested.path).unwrap();
    assert_eq!(Client::in_cgroup(&nested).connect(v4(c.port)).errno, Some(libc::EPERM));
    // pgward's exemption is its cgroup: a non-root process cannot move itself there (the
    // gateway's cgroup is gone once pgward stopped; its parent is root's).
    let gw = cg.gateway();
    std::fs::create_dir_all(&gw).unwrap();
    let mut sh = std::process::Command::new("setpriv");
    sh.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c"])
        .arg(format!("echo $$ > {}/cgroup.procs", gw.display()));
    let out = common::run_cmd(&mut sh, None, std::time::Duration::from_secs(10));
    assert!(!out.success() && out.stderr.contains("Permission denied"), "{}", out.describe());
}
