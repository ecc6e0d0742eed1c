//! The bind guard (cgroup/bind4 + bind6): nobody but pgward may bind pgward's port — not while
//! it runs (SO_REUSEPORT would share its connections), not while it is stopped or killed (the
//! pinned redirect still steers clients there, with their tokens). Same rules as
//! tests/intercept.rs: own child cgroups only, removed afterwards; the attacker is a non-root
//! process (uid 65534) inside the protected cgroup.

mod common;
#[path = "intercept_support.rs"]
mod support;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use common::{Pgward, toml_set};
use support::{
    Client, Job, Netns, Outcome, TestCgroup, any_port, counter, intercept_settings, intercepting, job_result, state, status, wait_attached,
    wait_bound, wait_log,
};

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
    // The port is below the ephemeral range: nothing to reserve, the host's sysctl untouched.
    assert!(pgward::ebpf::ephemeral_ports(&[port]).is_empty(), "port {port}");
    assert!(!pw.stderr_log().contains("reserved pgward's port"), "{}", pw.stderr_log());

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

/// `cat FILE` inside network namespace `ns`.
#[track_caller]
fn read_in_netns(ns: &Netns, file: &str) -> String {
    let out = common::run_cmd(Command::new("ip").args(["netns", "exec", &ns.name, "cat", file]), None, Duration::from_secs(20));
    assert!(out.success(), "{}", out.describe());
    out.stdout.trim().to_string()
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// A port the test's namespace already reserved before pgward starts (kept by pgward).
const ALREADY_RESERVED: u16 = 7777;
/// pgward's port in the test's namespace: inside the kernel's default ephemeral range.
const NS_PGWARD_PORT: u16 = 45432;
/// The protected port in the test's namespace (nothing listens there).
const NS_PROTECTED_PORT: u16 = 5432;

/// While pgward is stopped its port is free. The bind guard sees the port a bind asks for, but
/// not the one the kernel picks for a bind to port 0 or a listen on an unbound socket — and the
/// `IP_LOCAL_PORT_RANGE` socket option narrows that pick to pgward's port. `serve` reserves its
/// port in `net.ipv4.ip_local_reserved_ports` of its network namespace before attaching, so
/// the kernel never hands it out; steered clients get ECONNREFUSED, never a squatter. pgward
/// runs in a network namespace of the test's own (its sysctls are not the host's), reaching
/// the real Postgres over its unix socket.
#[test]
fn pgwards_port_is_never_handed_out_as_an_ephemeral_port() {
    let ns = Netns::new();
    let cg = TestCgroup::new("ephemeral");
    let range = read_in_netns(&ns, "/proc/sys/net/ipv4/ip_local_port_range");
    let (lo, hi) = range.split_once('\t').map(|(a, b)| (a.parse::<u16>().unwrap(), b.trim().parse::<u16>().unwrap())).unwrap();
    assert!((lo..=hi).contains(&NS_PGWARD_PORT), "{NS_PGWARD_PORT} is an ephemeral port in the namespace ({range})");
    let set = common::run_cmd(
        Command::new("ip").args(["netns", "exec", &ns.name, "sh", "-c", &format!("echo {ALREADY_RESERVED} > {RESERVED_PORTS}")]),
        None,
        Duration::from_secs(20),
    );
    assert!(set.success(), "{}", set.describe());

    let c = common::cluster();
    let socket_dir = c.socket_dir.display().to_string();
    let on = intercept_settings(&cg, vec![format!("127.0.0.1:{NS_PROTECTED_PORT}")]);
    let mut pw = Pgward::builder()
        .config(move |t| {
            on(t);
            toml_set(t, "server.listen", format!("127.0.0.1:{NS_PGWARD_PORT}"));
            toml_set(t, "upstream.host", socket_dir);
        })
        .init();
    pw.netns = Some(ns.name.clone());
    pw.spawn();
    wait_attached(&pw);
    wait_log(&pw, &format!("reserved pgward's port(s) [{NS_PGWARD_PORT}]"));
    assert_eq!(read_in_netns(&ns, RESERVED_PORTS), format!("{ALREADY_RESERVED},{NS_PGWARD_PORT}"), "kept what was there");
    // Steering works in the namespace: a client there dialling the protected port lands in pgward.
    let client = Client::in_cgroup(&cg).in_netns(&ns);
    let o = client.connect(v4(NS_PROTECTED_PORT));
    assert_eq!((o.errno, o.peer), (None, Some(v4(NS_PROTECTED_PORT))), "{o:?}");

    assert!(pw.stop().unwrap().success(), "{}", pw.stderr_log());
    assert_eq!(read_in_netns(&ns, RESERVED_PORTS), format!("{ALREADY_RESERVED},{NS_PGWARD_PORT}"), "stays while pgward is stopped");
    for listen_unbound in [false, true] {
        let job = Job::EphemeralSquat { port: NS_PGWARD_PORT, listen_unbound, uid: Some(NOBODY), wait_ms: 1500 };
        let mut squatter = client.spawn(&job);
        wait_bound(&mut squatter);
        let victim = client.connect(v4(NS_PROTECTED_PORT));
        let o = job_result(squatter);
        assert_eq!(o.failure, None, "{o:?}");
        assert_eq!((o.accepted, o.local), (0, None), "the kernel handed pgward's port to a squatter ({job:?}): {o:?}");
        assert!(o.binds.len() == 2 && o.binds.iter().all(Option::is_some), "no port for either family: {o:?}");
        assert_eq!(victim.errno, Some(libc::ECONNREFUSED), "the steered client reaches nobody: {victim:?}");
    }
}
