//! `pgward doctor`: is this host set up for pgward, and is the running gateway doing its job?
//!
//! Checks kernel features, capabilities, cgroup v2, eBPF program attachment, the unix socket
//! lockdown, Postgres's listen addresses, the audit directory, the clock, the token keys and
//! the TLS certificate; prints a table (PASS / WARN / FAIL / SKIP) and a fix for each problem.
//! Works against a live `pgward serve` (found by its listening socket, or the interception state
//! file) and without one. Exit 0 when nothing failed, 1 otherwise.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::config::Config;
use crate::host::accounts::Accounts;
use crate::host::{caps, cgroup, files, process, reach};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// The user the service runs as (used when no `pgward serve` is running to ask).
    #[arg(long, default_value = "pgward")]
    pub service_user: String,
    /// The systemd unit file whose capabilities count when no `pgward serve` is running.
    #[arg(long, default_value = "/etc/systemd/system/pgward.service")]
    pub unit: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub result: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, result: Outcome, detail: impl Into<String>, fix: Option<String>) -> Check {
    Check { check: name, result, detail: detail.into(), fix }
}

#[derive(Debug, Serialize)]
struct Report {
    config: PathBuf,
    serve_pid: Option<u32>,
    checks: Vec<Check>,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = diagnose(&args);
    let failed = report.checks.iter().any(|c| c.result == Outcome::Fail);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "pgward doctor: {}", r.config.display());
    match r.serve_pid {
        Some(pid) => {
            let _ = writeln!(o, "pgward serve: running (pid {pid})");
        }
        None => {
            let _ = writeln!(o, "pgward serve: not running");
        }
    }
    let _ = writeln!(o);
    let w = r.checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(o, "{:<w$}  {:<6}  DETAIL", "CHECK", "RESULT");
    for c in &r.checks {
        let _ = writeln!(o, "{:<w$}  {:<6}  {}", c.check, c.result.label(), c.detail);
    }
    let (fails, warns) = (
        r.checks.iter().filter(|c| c.result == Outcome::Fail).count(),
        r.checks.iter().filter(|c| c.result == Outcome::Warn).count(),
    );
    let _ = writeln!(
        o,
        "\n{fails} failed, {warns} warning(s), {} passed",
        r.checks.iter().filter(|c| c.result == Outcome::Pass).count()
    );
    let fixes: Vec<&Check> =
        r.checks.iter().filter(|c| matches!(c.result, Outcome::Fail | Outcome::Warn) && c.fix.is_some()).collect();
    if !fixes.is_empty() {
        let _ = writeln!(o, "\nHow to fix:");
        for c in fixes {
            let _ = writeln!(o, "  [{}] {}: {}", c.result.label(), c.check, c.fix.as_deref().unwrap_or_default());
        }
    }
    o
}

/// What the checks share.
struct Ctx {
    cfg: Config,
    status: Option<crate::ebpf::Status>,
    status_error: Option<String>,
    serve_pid: Option<u32>,
    /// uid the service runs (or would run) as, and its name.
    service: Option<(u32, String)>,
    /// Users allowed to reach the real Postgres socket besides root and its owner: the running
    /// serve's, `intercept.exempt_uid`, `--service-user`.
    service_uids: Vec<u32>,
    accounts: Accounts,
    unit: PathBuf,
}

fn diagnose(args: &DoctorArgs) -> Report {
    let mut checks = Vec::new();
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            checks.push(check(
                "config",
                Outcome::Fail,
                format!("{e}"),
                Some(format!(
                    "fix the config, or write one: pgward init --dir {}",
                    args.config.parent().unwrap_or(Path::new(".")).display()
                )),
            ));
            return Report { config: args.config.clone(), serve_pid: None, checks };
        }
    };
    let (status, status_error) = match crate::ebpf::status(&cfg) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let listen = cfg.listen_addr();
    let serve_pid = listener_pid(listen)
        .or_else(|| status.as_ref().filter(|s| s.running).and_then(|s| s.state.as_ref()).map(|s| s.pid));
    let accounts = Accounts::load_from(Path::new("/etc/passwd"), Path::new("/etc/group"));
    let service = match serve_pid.and_then(process::euid) {
        Some(uid) => Some((uid, accounts.user_name(uid).unwrap_or_else(|| uid.to_string()))),
        None => cfg
            .intercept
            .exempt_uid
            .map(|uid| (uid, accounts.user_name(uid).unwrap_or_else(|| uid.to_string())))
            .or_else(|| accounts.user(&args.service_user).map(|(uid, _)| (uid, args.service_user.clone()))),
    };
    let mut service_uids: Vec<u32> = serve_pid.and_then(process::euid).into_iter().collect();
    service_uids.extend(cfg.intercept.exempt_uid);
    service_uids.extend(accounts.user(&args.service_user).map(|(uid, _)| uid));
    let cx = Ctx { cfg, status, status_error, serve_pid, service, service_uids, accounts, unit: args.unit.clone() };
    checks.push(check(
        "config",
        Outcome::Pass,
        format!(
            "loads; listens on {}, upstream {}:{} as {}",
            cx.cfg.server.listen, cx.cfg.upstream.host, cx.cfg.upstream.port, cx.cfg.upstream.user
        ),
        None,
    ));
    checks.push(kernel());
    checks.push(bpf_features(&cx));
    checks.push(capabilities(&cx));
    checks.push(cgroup_v2(&cx));
    checks.push(programs(&cx));
    checks.push(listen_port(&cx));
    checks.push(socket_lockdown(&cx));
    checks.push(postgres_loopback(&cx));
    checks.push(audit_dir(&cx));
    checks.push(clock(&cx));
    checks.push(token_keys(&cx));
    checks.push(tls(&cx));
    Report { config: args.config.clone(), serve_pid, checks }
}

// ---- kernel ------------------------------------------------------------------------------

fn kernel() -> Check {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 10, 0) => {
            check("kernel", Outcome::Pass, format!("Linux {v} (5.10 or newer needed)"), None)
        }
        Ok(v) => check(
            "kernel",
            Outcome::Fail,
            format!("Linux {v}: the interception programs need 5.10 or newer"),
            Some("upgrade the kernel (Debian 12 ships 6.1)".into()),
        ),
        Err(e) => check("kernel", Outcome::Warn, format!("cannot read the kernel version: {e}"), None),
    }
}

fn bpf_features(cx: &Ctx) -> Check {
    use aya::programs::ProgramType;
    let severity = if cx.cfg.intercept.enabled { Outcome::Fail } else { Outcome::Warn };
    if !crate::ebpf::object_embedded() {
        return check(
            "bpf features",
            severity,
            "this pgward binary was built without the eBPF object",
            Some("cargo xtask build-ebpf, then rebuild pgward (cargo build --release -p gateway-user)".into()),
        );
    }
    let mut missing = Vec::new();
    let mut unknown = Vec::new();
    for (ty, name) in [
        (ProgramType::CgroupSockAddr, "cgroup_sock_addr"),
        (ProgramType::SockOps, "sock_ops"),
        (ProgramType::SkLookup, "sk_lookup"),
    ] {
        match aya::sys::is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => missing.push(name),
            Err(e) => unknown.push(format!("{name} ({e})")),
        }
    }
    if !missing.is_empty() {
        return check(
            "bpf features",
            severity,
            format!("the kernel lacks program types: {}", missing.join(", ")),
            Some("a kernel built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_JIT (Linux 5.10+)".into()),
        );
    }
    if !unknown.is_empty() {
        return check(
            "bpf features",
            Outcome::Warn,
            format!("could not probe {}", unknown.join(", ")),
            Some("run pgward doctor as root (probing loads a tiny program)".into()),
        );
    }
    check("bpf features", Outcome::Pass, "cgroup_sock_addr, sock_ops, sk_lookup supported; eBPF object embedded", None)
}

// ---- capabilities ------------------------------------------------------------------------

/// Capabilities a unit file grants (AmbientCapabilities=, limited by CapabilityBoundingSet=).
fn unit_caps(text: &str) -> Option<u64> {
    let names = |key: &str| -> Option<Vec<String>> {
        let vals: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=').map(|v| v.to_string()))
            .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
            .collect();
        (!vals.is_empty()).then_some(vals)
    };
    let bits = |v: &[String]| {
        v.iter().fold(0u64, |acc, n| {
            acc | match n.as_str() {
                "CAP_BPF" => 1 << caps::CAP_BPF,
                "CAP_NET_ADMIN" => 1 << caps::CAP_NET_ADMIN,
                "CAP_PERFMON" => 1 << caps::CAP_PERFMON,
                "CAP_SYS_ADMIN" => 1 << caps::CAP_SYS_ADMIN,
                _ => 0,
            }
        })
    };
    let ambient = bits(&names("AmbientCapabilities")?);
    Some(match names("CapabilityBoundingSet") {
        Some(b) => ambient & bits(&b),
        None => ambient,
    })
}

fn capabilities(cx: &Ctx) -> Check {
    let name = "capabilities";
    if !cx.cfg.intercept.enabled {
        return check(name, Outcome::Skip, "interception is off: no capabilities needed", None);
    }
    let fix = Some(
        "grant CAP_BPF and CAP_NET_ADMIN (the unit `pgward install` writes has \
         AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON), or run pgward as root"
            .to_string(),
    );
    let (whose, have) = if let Some(pid) = cx.serve_pid {
        match caps::effective(&pid.to_string()) {
            Some(c) => (format!("pgward serve (pid {pid})"), c),
            None => return check(name, Outcome::Warn, format!("cannot read /proc/{pid}/status"), None),
        }
    } else if let Some(c) = std::fs::read_to_string(&cx.unit).ok().and_then(|t| unit_caps(&t)) {
        (format!("the unit {}", cx.unit.display()), c)
    } else {
        match caps::effective("self") {
            Some(c) => ("this process (no serve running, no unit)".to_string(), c),
            None => return check(name, Outcome::Warn, "cannot read /proc/self/status", None),
        }
    };
    let missing = caps::missing_for_ebpf(have);
    if missing.is_empty() {
        check(name, Outcome::Pass, format!("{whose}: {}", caps::names(have).join(" ")), None)
    } else {
        check(name, Outcome::Fail, format!("{whose} lacks {}", missing.join(" and ")), fix)
    }
}

// ---- cgroups, programs -------------------------------------------------------------------

fn cgroup_v2(cx: &Ctx) -> Check {
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

/// The bind guard refuses explicit binds to pgward's port; the kernel can still hand it out
/// as an ephemeral port (bind to port 0, listen on an unbound socket) while pgward is stopped.
fn listen_port(cx: &Ctx) -> Check {
    let name = "listen port";
    if !cx.cfg.intercept.enabled {
        return check(name, Outcome::Skip, "interception is off", None);
    }
    let port = cx.cfg.listen_addr().port();
    match crate::ebpf::ephemeral_ports(&[port]).first() {
        Some(p) => check(
            name,
            Outcome::Warn,
            format!(
                "port {p} (server.listen) is in the ephemeral range (net.ipv4.ip_local_port_range): while pgward \
                 is stopped another local process can be given it without binding it explicitly, and receive the \
                 clients interception steers there"
            ),
            Some(format!(
                "use a port outside the range, or reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={p} \
                 (persist it in /etc/sysctl.d)"
            )),
        ),
        None => check(name, Outcome::Pass, format!("port {port} is outside the ephemeral range (or reserved); only pgward may bind it"), None),
    }
}

fn programs(cx: &Ctx) -> Check {
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

// ---- sockets -----------------------------------------------------------------------------

fn socket_lockdown(cx: &Ctx) -> Check {
    let name = "socket lockdown";
    let cfg = &cx.cfg;
    let dirs: Vec<PathBuf> = match &cfg.intercept.upstream_socket_dirs {
        Some(d) => d.iter().map(|p| cfg.resolve(p)).collect(),
        None if cfg.upstream.host.starts_with('/') => vec![PathBuf::from(&cfg.upstream.host)],
        None => Vec::new(),
    };
    let mut problems: Vec<(String, String)> = Vec::new();
    let mut good = Vec::new();
    // (what, fix)
    let mut warn: Vec<(String, &str)> = Vec::new();
    const START: &str = "start Postgres and pgward (systemctl start postgresql pgward)";
    const PATHS: &str = "set intercept.upstream_socket_dirs to Postgres's unix_socket_directories and \
                         server.unix_socket_dir to the directory clients use (pgward install does both)";
    for dir in &dirs {
        let sock = dir.join(format!(".s.PGSQL.{}", cfg.upstream.port));
        let (target, is_sock) = match std::fs::symlink_metadata(&sock) {
            Ok(_) => (sock.clone(), true),
            Err(_) => (dir.clone(), false),
        };
        let owner = std::fs::symlink_metadata(&target).map(|m| m.uid()).ok();
        let Some(owner) = owner else {
            warn.push((format!("{} does not exist", dir.display()), START));
            continue;
        };
        let mut allowed = vec![0, owner];
        allowed.extend(&cx.service_uids);
        match reach::reachable_by_others(&target, is_sock, &allowed, &cx.accounts) {
            Some(who) => problems.push((
                format!("{} can be reached by {who}", target.display()),
                format!(
                    "chmod 0750 {d} && chown {pg}:{grp} {d} (and unix_socket_directories = '{d}' in postgresql.conf)",
                    d = dir.display(),
                    pg = cx.accounts.user_name(owner).unwrap_or_else(|| owner.to_string()),
                    grp = cx.service.as_ref().map(|s| s.1.clone()).unwrap_or_else(|| "pgward".into())
                ),
            )),
            None if is_sock => good.push(format!("{} only by root, {}", sock.display(), allowed_names(&allowed, cx))),
            None => {
                good.push(format!("{} only by root, {}", dir.display(), allowed_names(&allowed, cx)));
                warn.push((format!("no Postgres socket in {} (Postgres not running?)", dir.display()), START));
            }
        }
    }
    if dirs.is_empty() {
        warn.push((
            "the real Postgres socket directory is not configured (intercept.upstream_socket_dirs)".into(),
            PATHS,
        ));
    }
    // The path clients use must be pgward's.
    match &cfg.server.unix_socket_dir {
        None => warn.push((
            "server.unix_socket_dir is not set: clients using the default socket path do not reach pgward".into(),
            PATHS,
        )),
        Some(d) => {
            let dir = cfg.resolve(d);
            let port = cfg.server.unix_socket_port.unwrap_or(cfg.listen_addr().port());
            let path = dir.join(format!(".s.PGSQL.{port}"));
            if dirs.contains(&dir) && port == cfg.upstream.port {
                problems.push((
                    format!("clients' socket path {} is the real Postgres socket", path.display()),
                    "move Postgres's socket (unix_socket_directories) to a private directory".into(),
                ));
            }
            let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
            let holders = if is_socket { unix_socket_pids(&path) } else { Vec::new() };
            match (cx.serve_pid, is_socket) {
                (Some(pid), true) if holders.contains(&pid) => {
                    good.push(format!("clients' path {} is pgward's", path.display()))
                }
                (Some(_), false) => problems.push((
                    format!("pgward serve runs, but {} does not exist", path.display()),
                    "restart pgward; check that it may create sockets in that directory".into(),
                )),
                (_, true) if !holders.is_empty() => problems.push((
                    format!("clients' path {} belongs to {} (not pgward)", path.display(), describe_pids(&holders)),
                    "restart Postgres so it uses its new unix_socket_directories, then start pgward".into(),
                )),
                (None, _) => {
                    warn.push((format!("clients' path {} is not served (pgward not running)", path.display()), START))
                }
                (Some(_), true) => {
                    warn.push((format!("cannot tell who holds {}", path.display()), "run pgward doctor as root"))
                }
            }
        }
    }
    if let Some((what, fix)) = problems.first() {
        let mut detail = what.clone();
        for (w, _) in problems.iter().skip(1) {
            let _ = write!(detail, "; {w}");
        }
        return check(name, Outcome::Fail, detail, Some(fix.clone()));
    }
    let mut detail = good.join("; ");
    if !warn.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&warn.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join("; "));
        let mut fixes: Vec<&str> = Vec::new();
        for (_, f) in &warn {
            if !fixes.contains(f) {
                fixes.push(f);
            }
        }
        return check(name, Outcome::Warn, detail, Some(fixes.join("; ")));
    }
    check(name, Outcome::Pass, format!("reachable {detail}"), None)
}

fn allowed_names(uids: &[u32], cx: &Ctx) -> String {
    let set: BTreeSet<u32> = uids.iter().copied().filter(|u| *u != 0).collect();
    set.into_iter().map(|u| cx.accounts.user_name(u).unwrap_or_else(|| u.to_string())).collect::<Vec<_>>().join(", ")
}

/// Processes holding the listening unix socket at `path` (from /proc/net/unix and /proc/*/fd).
fn unix_socket_pids(path: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let want = path.to_string_lossy();
    let inodes: BTreeSet<u64> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(7) == Some(&want.as_ref())).then(|| f.get(6)?.parse().ok()).flatten()
        })
        .collect();
    pids_with_sockets(&inodes)
}

fn pids_with_sockets(inodes: &BTreeSet<u64>) -> Vec<u32> {
    let mut out = Vec::new();
    if inodes.is_empty() {
        return out;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else { continue };
            let l = link.to_string_lossy();
            if let Some(ino) =
                l.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<u64>().ok())
                && inodes.contains(&ino)
            {
                out.push(pid);
                break;
            }
        }
    }
    out
}

fn describe_pids(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| {
            format!("{} (pid {p})", process::comm(*p).unwrap_or_default())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// TCP listeners of this network namespace: (address, socket inode).
fn tcp_listeners() -> Vec<(SocketAddr, u64)> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                continue; // not LISTEN
            }
            let (Some(local), Some(inode)) = (f.get(1), f.get(9).and_then(|s| s.parse::<u64>().ok())) else { continue };
            if let Some(a) = parse_proc_addr(local, v6) {
                out.push((a, inode));
            }
        }
    }
    out
}

/// "0100007F:1538" (IPv4) or 32 hex digits + port (IPv6), each 32-bit word in host order.
fn parse_proc_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut o = [0u8; 16];
        for i in 0..4 {
            let w = u32::from_str_radix(&addr[8 * i..8 * i + 8], 16).ok()?;
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        let w = u32::from_str_radix(addr, 16).ok()?;
        IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

/// The process listening on `addr` (exactly, or a wildcard on its port).
fn listener_pid(addr: SocketAddr) -> Option<u32> {
    let inodes: BTreeSet<u64> = tcp_listeners()
        .into_iter()
        .filter(|(a, _)| {
            a.port() == addr.port() && (a.ip() == addr.ip() || a.ip().is_unspecified() || mapped_eq(a.ip(), addr.ip()))
        })
        .map(|(_, i)| i)
        .collect();
    pids_with_sockets(&inodes).into_iter().next()
}

fn mapped_eq(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V6(v6), IpAddr::V4(v4)) | (IpAddr::V4(v4), IpAddr::V6(v6)) => v6.to_ipv4_mapped() == Some(v4),
        _ => false,
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn postgres_loopback(cx: &Ctx) -> Check {
    let name = "postgres loopback";
    let up = &cx.cfg.upstream;
    if !up.host.starts_with('/') {
        let local = up.host == "localhost"
            || up
                .host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| is_loopback(ip) || ip.is_unspecified());
        if !local {
            return check(name, Outcome::Skip, format!("the upstream {} is on another host", up.host), None);
        }
    }
    let listeners: Vec<SocketAddr> =
        tcp_listeners().into_iter().map(|(a, _)| a).filter(|a| a.port() == up.port).collect();
    if listeners.is_empty() {
        return check(
            name,
            Outcome::Warn,
            format!("nothing listens on TCP port {} (Postgres not running?)", up.port),
            Some("start Postgres".into()),
        );
    }
    let open: Vec<String> = listeners.iter().filter(|a| !is_loopback(a.ip())).map(|a| a.to_string()).collect();
    if !open.is_empty() {
        return check(
            name,
            Outcome::Fail,
            format!("port {} is listened on at {} (not loopback only)", up.port, open.join(", ")),
            Some(
                "listen_addresses = '127.0.0.1' in postgresql.conf (pgward install sets it), then restart Postgres"
                    .into(),
            ),
        );
    }
    let list: Vec<String> = listeners.iter().map(|a| a.to_string()).collect();
    check(name, Outcome::Pass, format!("port {}: {} only", up.port, list.join(", ")), None)
}

// ---- audit, clock, keys, tls -------------------------------------------------------------

fn audit_dir(cx: &Ctx) -> Check {
    let name = "audit directory";
    let dir = cx.cfg.resolve(&cx.cfg.audit.dir);
    let svc = cx.service.clone();
    let owner_fix = |d: &Path| {
        let u = svc.as_ref().map(|s| s.1.clone()).unwrap_or_else(|| "pgward".into());
        format!("chown {u}:{u} {d} && chmod 0750 {d}", d = d.display())
    };
    let m = match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return check(
                name,
                Outcome::Fail,
                format!("{} is not a directory", dir.display()),
                Some(format!("mkdir -p {0} && {1}", dir.display(), owner_fix(&dir))),
            );
        }
        Err(e) => {
            return check(
                name,
                Outcome::Fail,
                format!("{}: {e}", dir.display()),
                Some(format!("mkdir -p {0} && {1}", dir.display(), owner_fix(&dir))),
            );
        }
    };
    let mode = m.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return check(
            name,
            Outcome::Fail,
            format!("{} is accessible to everyone (mode {mode:04o})", dir.display()),
            Some(format!("chmod 0750 {}", dir.display())),
        );
    }
    if mode & 0o020 != 0 {
        return check(
            name,
            Outcome::Fail,
            format!("{} is group-writable (mode {mode:04o})", dir.display()),
            Some(format!("chmod 0750 {}", dir.display())),
        );
    }
    if let Some((uid, uname)) = &svc
        && *uid != 0
        && !(m.uid() == *uid && mode & 0o300 == 0o300)
    {
        return check(
            name,
            Outcome::Fail,
            format!("{} is not writable by {uname} (owner uid {}, mode {mode:04o})", dir.display(), m.uid()),
            Some(owner_fix(&dir)),
        );
    }
    let exposed: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.mode() & 0o007 != 0))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !exposed.is_empty() {
        return check(
            name,
            Outcome::Fail,
            format!("readable by everyone: {}", exposed.join(", ")),
            Some(format!("chmod o-rwx {}/*", dir.display())),
        );
    }
    let owner = cx.accounts.user_name(m.uid()).unwrap_or_else(|| m.uid().to_string());
    let base = format!("{} owner {owner}, mode {mode:04o}", dir.display());
    match files::is_append_only(&dir) {
        Ok(true) => {
            check(name, Outcome::Pass, format!("{base}, append-only (segments cannot be deleted or renamed)"), None)
        }
        Ok(false) => check(
            name,
            Outcome::Warn,
            format!("{base}; not append-only: records can be deleted by whoever can write the directory"),
            Some(format!("chattr +a {}", dir.display())),
        ),
        Err(e) => {
            check(name, Outcome::Warn, format!("{base}; the file system has no append-only attribute ({e})"), None)
        }
    }
}

fn clock(cx: &Ctx) -> Check {
    let name = "clock";
    let now = chrono::Utc::now();
    // The newest audit record: the clock must not be behind it.
    if let Some(ts) = last_audit_ts(&cx.cfg.resolve(&cx.cfg.audit.dir))
        && now + chrono::Duration::seconds(cx.cfg.auth.leeway_secs as i64) < ts
    {
        return check(
            name,
            Outcome::Fail,
            format!("the clock ({}) is behind the newest audit record ({})", now.to_rfc3339(), ts.to_rfc3339()),
            Some("set the clock right and keep it synchronized: timedatectl set-ntp true".into()),
        );
    }
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into the struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return check(
            name,
            Outcome::Warn,
            format!("cannot read the clock state: {}", std::io::Error::last_os_error()),
            None,
        );
    }
    let unsync = state == libc::TIME_ERROR || tx.status & libc::STA_UNSYNC != 0;
    if unsync {
        return check(
            name,
            Outcome::Warn,
            format!(
                "not synchronized (kernel: STA_UNSYNC); token exp/nbf are checked against it with {} s leeway",
                cx.cfg.auth.leeway_secs
            ),
            Some("enable time synchronization: timedatectl set-ntp true (systemd-timesyncd) or install chrony".into()),
        );
    }
    check(name, Outcome::Pass, format!("synchronized (estimated error {} ms)", tx.esterror / 1000), None)
}

fn last_audit_ts(dir: &Path) -> Option<chrono::DateTime<chrono::Utc>> {
    let last = crate::audit::chain::list_segments(dir).ok()?.pop()?;
    let line = crate::audit::last_line(&last.path).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&line).ok()?;
    chrono::DateTime::parse_from_rfc3339(v.get("ts")?.as_str()?).ok().map(|t| t.with_timezone(&chrono::Utc))
}

fn token_keys(cx: &Ctx) -> Check {
    let name = "token keys";
    let cfg = &cx.cfg;
    let verifier = match crate::auth::Verifier::load(cfg) {
        Ok(v) => v,
        Err(e) => {
            return check(
                name,
                Outcome::Fail,
                format!("JWKS {}: {e}", cfg.resolve(&cfg.auth.jwks).display()),
                Some("point auth.jwks at a JWKS file (pgward init writes keys/jwks.json)".into()),
            );
        }
    };
    let key_path = cfg.resolve(&cfg.auth.signing_key);
    let signer = match crate::auth::Signer::load(cfg) {
        Ok(s) => s,
        Err(e) => return check(
            name,
            Outcome::Fail,
            format!("signing key {}: {e}", key_path.display()),
            Some(
                "auth.signing_key must be a PKCS#8 Ed25519 key (pgward init writes one); it signs tokens"
                    .into(),
            ),
        ),
    };
    if let Ok(m) = std::fs::metadata(&key_path)
        && m.mode() & 0o027 != 0
    {
        return check(
            name,
            Outcome::Fail,
            format!(
                "{} is {} (mode {:04o})",
                key_path.display(),
                if m.mode() & 0o007 != 0 { "readable by everyone" } else { "group-writable" },
                m.mode() & 0o7777
            ),
            Some(format!("chmod 0640 {} (owner root, group pgward)", key_path.display())),
        );
    }
    let token = match signer.issue(
        "pgward-doctor",
        &[],
        std::time::Duration::from_secs(60),
        &cfg.auth.issuer,
        &cfg.auth.audience,
    ) {
        Ok(t) => t,
        Err(e) => return check(name, Outcome::Fail, format!("cannot sign: {e}"), None),
    };
    if let Err(e) = verifier.verify(&token, "pgward-doctor") {
        return check(
            name,
            Outcome::Fail,
            format!("a token signed with kid {} does not verify: {e}", cfg.auth.signing_kid),
            Some(format!(
                "put the signing key's public half (kid {}) into {}",
                cfg.auth.signing_kid,
                cfg.resolve(&cfg.auth.jwks).display()
            )),
        );
    }
    check(
        name,
        Outcome::Pass,
        format!("kid {} signs; a token issued with it verifies against the JWKS", cfg.auth.signing_kid),
        None,
    )
}

fn tls(cx: &Ctx) -> Check {
    let name = "tls certificate";
    match crate::tls::server_config(&cx.cfg) {
        Ok(_) => {
            let key = cx.cfg.resolve(&cx.cfg.server.tls_key);
            if let Ok(m) = std::fs::metadata(&key)
                && m.mode() & 0o007 != 0
            {
                return check(name, Outcome::Fail, format!("{} is readable by everyone", key.display()), Some(format!("chmod 0640 {}", key.display())));
            }
            check(name, Outcome::Pass, format!("{} and its key load", cx.cfg.resolve(&cx.cfg.server.tls_cert).display()), None)
        }
        Err(e) => check(name, Outcome::Fail, format!("{e}"), Some("server.tls_cert / server.tls_key must be a PEM certificate chain and key (pgward init writes a self-signed pair)".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest record is the last complete line of the last segment, before the zeros of
    /// its preallocated tail and any unterminated fragment.
    #[test]
    fn last_audit_ts_reads_the_newest_complete_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(last_audit_ts(d), None);
        let line = |seq: u64, ts: &str| format!("{{\"seq\":{seq},\"ts\":\"{ts}\",\"kind\":\"statement\"}}\n");
        std::fs::write(d.join(crate::audit::chain::segment_name(1)), line(1, "2026-01-01T00:00:01Z")).unwrap();
        let mut live = line(2, "2026-01-02T00:00:02Z") + &line(3, "2026-01-03T00:00:03Z") + "{\"seq\":4,\"ts\":\"2026-01-04";
        live.push_str(&"\0".repeat(4096));
        std::fs::write(d.join(crate::audit::chain::segment_name(2)), live).unwrap();
        let want = chrono::DateTime::parse_from_rfc3339("2026-01-03T00:00:03Z").unwrap().with_timezone(&chrono::Utc);
        assert_eq!(last_audit_ts(d), Some(want));
    }

    #[test]
    fn proc_net_addresses() {
        assert_eq!(parse_proc_addr("0100007F:1538", false), Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(parse_proc_addr("00000000:1920", false), Some("0.0.0.0:6432".parse().unwrap()));
        assert_eq!(parse_proc_addr("00000000000000000000000001000000:1538", true), Some("[::1]:5432".parse().unwrap()));
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F:1538", true),
            Some("[::ffff:127.0.0.1]:5432".parse().unwrap())
        );
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn unit_capabilities() {
        let u = "[Service]\nCapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\nAmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n";
        let c = unit_caps(u).unwrap();
        assert!(caps::missing_for_ebpf(c).is_empty());
        assert_eq!(caps::names(c), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        let bounded = "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN\nCapabilityBoundingSet=CAP_BPF\n";
        assert_eq!(caps::missing_for_ebpf(unit_caps(bounded).unwrap()), ["CAP_NET_ADMIN"]);
        assert_eq!(unit_caps("[Service]\nUser=x\n"), None);
    }

    #[test]
    fn render_lists_fixes_for_failures() {
        let r = Report {
            config: "/etc/pgward/pgward.toml".into(),
            serve_pid: None,
            checks: vec![
                check("kernel", Outcome::Pass, "Linux 6.1", None),
                check("programs attached", Outcome::Fail, "not running", Some("systemctl start pgward".into())),
            ],
        };
        let t = render(&r);
        assert!(t.contains("pgward serve: not running"), "{t}");
        assert!(t.contains("programs attached  FAIL    not running"), "{t}");
        assert!(t.contains("[FAIL] programs attached: systemctl start pgward"), "{t}");
        assert!(t.contains("1 failed, 0 warning(s), 1 passed"), "{t}");
    }
}
