//! Interception itself: the cgroup the programs attach to, pgward's own listen port, and
//! whether a running gateway has its programs attached.

use std::path::Path;

use super::Ctx;
use super::report::{Check, Outcome, check};
use crate::host::cgroup;

pub(super) fn cgroup_v2(cx: &Ctx) -> Check {
    let name = "cgroup v2";
    let severity = if cx.cfg.intercept.enabled { Outcome::Fail } else { Outcome::Warn };
    let Some(mount) = cgroup::cgroup2_mount().ok().flatten() else {
        return check(
            name,
            severity,
            "no cgroup2 (unified) hierarchy is mounted",
            Some("boot with systemd.unified_cgroup_hierarchy=1 (Debian 12's default), or mount -t cgroup2 none /sys/fs/cgroup".into()),
        );
    };
    let target = cx.cfg.intercept.cgroup.as_ref().map(|p| cx.cfg.resolve(p)).unwrap_or_else(|| mount.clone());
    if !cgroup::is_cgroup2(&target).unwrap_or(false) {
        return check(
            name,
            severity,
            format!("intercept.cgroup {} is not a cgroup v2 directory", target.display()),
            Some(format!("set intercept.cgroup to a directory under {}", mount.display())),
        );
    }
    let gateway = cx
        .cfg
        .intercept
        .gateway_cgroup
        .as_ref()
        .map(|p| cx.cfg.resolve(p))
        .unwrap_or_else(|| target.join("pgward-gateway"));
    let parent_ok = gateway.exists() || gateway.parent().is_some_and(|p| cgroup::is_cgroup2(p).unwrap_or(false));
    if !parent_ok {
        let fix = if gateway.to_string_lossy().contains(".service/") {
            "start pgward with systemd (the unit has Delegate=yes: systemd creates its cgroup)".to_string()
        } else {
            format!("create {} or set intercept.gateway_cgroup", gateway.parent().unwrap_or(Path::new("/")).display())
        };
        return check(
            name,
            if cx.serve_pid.is_some() { severity } else { Outcome::Warn },
            format!("{} (cgroup2); gateway cgroup {}: its parent does not exist", target.display(), gateway.display()),
            Some(fix),
        );
    }
    check(
        name,
        Outcome::Pass,
        format!("programs attach to {}; pgward's own cgroup {}", target.display(), gateway.display()),
        None,
    )
}

/// The bind guard refuses explicit binds to pgward's port; the kernel could still hand it out
/// as an ephemeral port (bind to port 0, listen on an unbound socket) while pgward is stopped,
/// unless it is in `net.ipv4.ip_local_reserved_ports`, which `serve` sees to at every start.
pub(super) fn listen_port(cx: &Ctx) -> Check {
    let name = "listen port";
    if !cx.cfg.intercept.enabled {
        return check(name, Outcome::Skip, "interception is off", None);
    }
    let port = cx.cfg.listen_addr().port();
    let Some(p) = crate::ebpf::ephemeral_ports(&[port]).first().copied() else {
        return check(name, Outcome::Pass, format!("port {port} is outside the ephemeral range or reserved; only pgward may bind it"), None);
    };
    let risk = format!(
        "port {p} (server.listen) is in the ephemeral range (net.ipv4.ip_local_port_range) and not in \
         net.ipv4.ip_local_reserved_ports: another local process can be given it without binding it explicitly, \
         and receive the clients interception steers there while pgward is stopped"
    );
    if cx.serve_pid.is_some() {
        // serve reserved it before attaching: someone removed the reservation since.
        return check(name, Outcome::Fail, risk, Some("restart pgward (serve reserves its ports at start)".into()));
    }
    check(
        name,
        Outcome::Warn,
        risk,
        Some(format!(
            "start pgward (serve reserves its ports at start; the reservation lasts until a reboot), or use a port \
             outside the range, or reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={p} (persist it in /etc/sysctl.d)"
        )),
    )
}

pub(super) fn programs(cx: &Ctx) -> Check {
    let name = "programs attached";
    if !cx.cfg.intercept.enabled {
        return check(
            name,
            Outcome::Warn,
            "interception is off: clients can reach Postgres's port directly",
            Some("set [intercept] enabled = true in the config and restart pgward".into()),
        );
    }
    let Some(st) = &cx.status else {
        return check(
            name,
            Outcome::Fail,
            format!("cannot read the interception status: {}", cx.status_error.as_deref().unwrap_or("?")),
            Some("run pgward doctor as root".into()),
        );
    };
    let start = "start the gateway: systemctl start pgward (or pgward serve --config <this config>)".to_string();
    let Some(state) = &st.state else {
        return check(name, Outcome::Fail, "no pgward serve has attached the programs (no state file)", Some(start));
    };
    if !st.running {
        let what = if st.pinned {
            "the programs stay pinned and attached (closed: protected connects are refused)"
        } else {
            "nothing is attached"
        };
        return check(name, Outcome::Fail, format!("no gateway is serving (last: pid {}); {what}", state.pid), Some(start));
    }
    let detached: Vec<&str> = st.programs.iter().filter(|p| !p.attached).map(|p| p.name.as_str()).collect();
    if st.programs.is_empty() || !detached.is_empty() {
        return check(
            name,
            Outcome::Fail,
            format!(
                "pgward serve (pid {}) runs, but these programs are not attached: {}",
                state.pid,
                detached.join(", ")
            ),
            Some("restart pgward (systemctl restart pgward) and read its log (journalctl -u pgward)".into()),
        );
    }
    let redirected: u64 = st.counters.iter().filter(|c| c.counter == "redirected").map(|c| c.value).sum();
    check(
        name,
        Outcome::Pass,
        format!(
            "{} programs attached by pid {} to {} ({redirected} connections redirected so far)",
            st.programs.len(),
            state.pid,
            state.cgroup.display()
        ),
        None,
    )
}
