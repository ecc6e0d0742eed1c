//! The bind guard (cgroup/bind4 + bind6): nobody but pgward may bind pgward's port — not while
//! it runs (SO_REUSEPORT would share its connections), not while it is stopped or killed (the
//! pinned redirect still steers clients there, with their tokens). Same rules as
//! tests/intercept.rs: own child cgroups only, removed afterwards; the attacker is a non-root
//! process (uid 65534) inside the protected cgroup.

mod common;
#[path = "intercept_support.rs"]
mod support;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use common::Pgward;
use support::{Client, Job, Outcome, TestCgroup, any_port, counter, intercepting, job_result, state, status, wait_bound, wait_log};

#[test]
fn intercept_helper() {
    support::helper_main()
}

const NOBODY: u32 = 65534;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Every way to name pgward's port on this host: wildcard, loopback, v4-mapped, both families.
fn every_address(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        v4(port),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port)),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), port)),
    ]
}

fn squat(cg: &TestCgroup, addrs: Vec<SocketAddr>, reuseport: bool, mptcp: bool) -> Outcome {
    Client::in_cgroup(cg).run(&Job::Squat { addrs, reuseport, mptcp, uid: Some(NOBODY), wait_ms: 0 })
}

#[track_caller]
fn assert_all_refused(o: &Outcome, what: &str) {
    assert_eq!(o.failure, None, "{what}: {o:?}");
    assert!(!o.binds.is_empty() && o.binds.iter().all(|e| *e == Some(libc::EPERM)), "{what}: every bind is refused with EPERM: {o:?}");
}

/// While nothing serves pgward's port: a non-root squatter in the protected cgroup is refused
/// on every address and form, a client dialling the protected port is refused (ECONNREFUSED)
/// and the squatter accepts nothing.
#[track_caller]
fn closed_while_stopped(cg: &TestCgroup, pw_port: u16, protected: u16, what: &str) {
    assert_all_refused(&squat(cg, every_address(pw_port), false, false), &format!("{what}: plain"));
    assert_all_refused(&squat(cg, every_address(pw_port), true, false), &format!("{what}: SO_REUSEPORT"));
    assert_all_refused(&squat(cg, every_address(pw_port), false, true), &format!("{what}: MPTCP"));
    let mut child = Client::in_cgroup(cg).spawn(&Job::Squat { addrs: every_address(pw_port), reuseport: false, mptcp: false, uid: Some(NOBODY), wait_ms: 1500 });
    wait_bound(&mut child);
    let c = Client::in_cgroup(cg);
    for dst in [v4(protected), SocketAddr::from((Ipv6Addr::LOCALHOST, protected))] {
        assert_eq!(c.connect(dst).errno, Some(libc::ECONNREFUSED), "{what}: {dst} is steered to pgward's port, where nothing listens");
    }
    let o = job_result(child);
    assert_all_refused(&o, &format!("{what}: listening squatter"));
    assert_eq!(o.accepted, 0, "{what}: the squatter never gets a steered client: {o:?}");
}

#[test]
fn only_pgward_binds_its_port_running_stopped_killed_and_restarted() {
    let cg = TestCgroup::new("bind");
    let protected = common::free_port();
    let mut pw: Pgward = intercepting(&cg, any_port(protected), |_| {});
    let port = pw.addr.port();
    let st = state(&pw);
    assert_eq!(st["bind_guard"], serde_json::json!([port]), "{st}");
    let (code, v) = status(&pw);
    assert_eq!(code, 0, "{v}");
    for p in ["pgw_bind4", "pgw_bind6"] {
        let prog = v["programs"].as_array().unwrap().iter().find(|x| x["name"] == p).unwrap_or_else(|| panic!("{p} in {v}"));
        assert_eq!((&prog["attached"], &prog["pinned"]), (&serde_json::json!(true), &serde_json::json!(true)), "{prog}");
    }
    let text = common::pgward_cli(&["status".as_ref(), "--config".as_ref(), pw.config_path.as_os_str()] as &[&std::ffi::OsStr]);
    assert!(text.stdout.contains(&format!("bind guard      port {port}: only pgward may bind")), "{}", text.describe());
    // The test's port is a random one, from the ephemeral range: serve says what that means.
    if !pw_port_reserved(port) {
        wait_log(&pw, "is in the kernel's ephemeral range");
    }

    // While pgward runs: a second socket on its port (SO_REUSEPORT would share its
    // connections) is refused on every address, before the kernel even looks for a conflict.
    assert_all_refused(&squat(&cg, every_address(port), true, false), "running, SO_REUSEPORT");
    assert_all_refused(&squat(&cg, every_address(port), false, true), "running, MPTCP");
    assert!(counter(&pw, "pgw_bind4", "refused") >= 2 && counter(&pw, "pgw_bind6", "refused") >= 4);
    // Any other port binds as before, for the same process, both families.
    let other = common::free_port();
    let o = squat(&cg, vec![v4(other), SocketAddr::from((Ipv6Addr::LOCALHOST, other))], true, false);
    assert_eq!(o.binds, [None, None], "other ports are not guarded: {o:?}");
    // And clients still reach pgward through the protected port.
    let c = Client::in_cgroup(&cg).connect(v4(protected));
    assert_eq!((c.errno, c.peer), (None, Some(v4(protected))), "{c:?}");

    // SIGTERM: the guard stays with the pins.
    assert!(pw.stop().unwrap().success(), "{}", pw.stderr_log());
    closed_while_stopped(&cg, port, protected, "after SIGTERM");

    // A restart binds its own port (from its gateway cgroup, below the protected one: the guard
    // runs for it and lets it through) and adopts the pins.
    let exempt_before = counter(&pw, "pgw_bind4", "exempt");
    pw.spawn();
    wait_log(&pw, "interception on: 7 eBPF programs adopted");
    assert!(counter(&pw, "pgw_bind4", "exempt") > exempt_before, "pgward's own bind went through the guard");
    let c = Client::in_cgroup(&cg).connect(v4(protected));
    assert_eq!(c.errno, None, "{c:?}");
    assert_all_refused(&squat(&cg, every_address(port), true, false), "restarted, SO_REUSEPORT");

    // SIGKILL: nothing cleans up; the dead gateway's cgroup (still in PGW_CONFIG) is root's.
    let pid = state(&pw)["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the pid of the `serve` process this test started (via the harness).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let _ = pw.stop();
    closed_while_stopped(&cg, port, protected, "after SIGKILL");

    // Restarted once more: serving again.
    pw.spawn();
    wait_log(&pw, "interception on: 7 eBPF programs adopted");
    let c = Client::in_cgroup(&cg).connect(v4(protected));
    assert_eq!(c.errno, None, "{c:?}");
}

fn pw_port_reserved(port: u16) -> bool {
    pgward::ebpf::ephemeral_ports(&[port]).is_empty()
}
