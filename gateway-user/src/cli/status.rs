//! `pgward status`: the pinned interception programs, whether a gateway is serving with them,
//! and their counters.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::ebpf::Status;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Exit 0 when a gateway is serving with every program attached, 1 otherwise (also while the
/// programs are pinned but no gateway serves: interception is closed, nothing gets through).
pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::config::Config::load(&args.config)?;
    let st = crate::ebpf::status(&cfg).context("reading interception status")?;
    let access = access_view(&cfg);
    let healthy = st.running && !st.programs.is_empty() && st.programs.iter().all(|p| p.attached);
    let logins_ok = access.as_ref().is_none_or(|a| !a.logins_refused);
    let text = if args.json {
        let mut v = serde_json::to_value(&st)?;
        if let (Some(o), Some(a)) = (v.as_object_mut(), &access) {
            o.insert("access".into(), serde_json::to_value(a)?);
        }
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        let mut t = table(&st, healthy);
        if let Some(a) = &access {
            t.push_str(&access_line(a));
        }
        t
    };
    super::print_quietly(&text)?;
    Ok(if healthy && logins_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The etcd access backend as the running `serve` sees it (from the status file it writes
/// when etcd comes or goes).
#[derive(Debug, serde::Serialize)]
struct AccessView {
    backend: &'static str,
    endpoints: Vec<String>,
    /// What the serve that wrote the status file reported (None: no serve running).
    serve: Option<crate::access::BackendStatus>,
    /// The state is older than `[access] max_staleness`: new logins are refused.
    logins_refused: bool,
}

fn access_view(cfg: &crate::config::Config) -> Option<AccessView> {
    let e = cfg.access.etcd()?;
    let serve = crate::access::BackendStatus::read(&crate::access::state_dir(cfg))
        .filter(|s| std::path::Path::new(&format!("/proc/{}", s.pid)).exists());
    let logins_refused = serve.as_ref().is_some_and(|s| {
        let last = s.last_sync.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let age = last.map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds());
        !s.connected && age.is_none_or(|a| a > s.max_staleness_secs as i64)
    });
    Some(AccessView { backend: "etcd", endpoints: e.endpoints.clone(), serve, logins_refused })
}

fn access_line(a: &AccessView) -> String {
    let eps = a.endpoints.join(", ");
    let Some(s) = &a.serve else {
        return format!("\naccess: etcd ({eps}); no `pgward serve` is reading it\n");
    };
    let last = s.last_sync.as_deref().unwrap_or("never");
    let mut o = if s.connected {
        format!("\naccess: etcd ({eps}): connected since {} (pid {})\n", s.since, s.pid)
    } else {
        format!("\naccess: etcd ({eps}): UNREACHABLE since {} (pid {}); last complete read {last}\n", s.since, s.pid)
    };
    if let Some(err) = &s.last_error {
        let _ = writeln!(o, "  last error      {err}");
    }
    if a.logins_refused {
        let _ = writeln!(o, "  new logins      REFUSED: the state is older than [access] max_staleness = {}s", s.max_staleness_secs);
    } else if !s.connected {
        let _ = writeln!(o, "  new logins      accepted on the last known state until it is {}s old", s.max_staleness_secs);
    }
    o
}

fn headline(st: &Status, healthy: bool) -> String {
    let Some(state) = &st.state.as_ref().filter(|_| st.running) else {
        return match (st.pinned, st.enabled) {
            (true, _) => "interception: CLOSED (programs pinned, no gateway serving: protected connects are refused; \
                          `pgward intercept detach` removes them)"
                .into(),
            (false, true) => "interception: enabled in the config, but no `pgward serve` has attached programs".into(),
            (false, false) => "interception: off ([intercept] enabled = false)".into(),
        };
    };
    let what = if healthy { "on" } else { "DEGRADED" };
    format!("interception: {what} (pgward pid {}, since {}{})", state.pid, state.started, if state.adopted { ", adopted pinned programs" } else { "" })
}

fn table(st: &Status, healthy: bool) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", headline(st, healthy));
    let _ = writeln!(o, "  pinned at       {}{}", st.pin_dir.display(), if st.pinned { "" } else { " (nothing pinned)" });
    let serving = match &st.state {
        Some(s) if st.running => format!("serving (pid {})", s.pid),
        Some(s) => format!("not serving (last: pid {}{})", s.pid, s.stopped.as_ref().map(|t| format!(", stopped {t}")).unwrap_or_default()),
        None => "not serving".into(),
    };
    let _ = writeln!(o, "  gateway         {serving}");
    if let Some(state) = &st.state {
        let _ = writeln!(o, "  cgroup          {}", state.cgroup.display());
        let _ = writeln!(o, "  gateway cgroup  {} (id {})", state.gateway_cgroup.display(), state.gateway_cgroup_id);
        let list = |v: &[std::net::SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
        let _ = writeln!(o, "  protected       {}", list(&state.protected));
        let _ = writeln!(o, "  guard (EPERM)   {}", if state.guard.is_empty() { "-".into() } else { list(&state.guard) });
        let target = |a: &Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "- (refused)".into());
        let _ = writeln!(o, "  redirect to     {} / {}", target(&state.redirect4), target(&state.redirect6));
        if !state.bind_guard.is_empty() {
            let ports = state.bind_guard.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
            let _ = writeln!(o, "  bind guard      port {ports}: only pgward may bind (EPERM)");
        }
    }
    if !st.programs.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "{:<15} {:<21} {:>6}  {:<9} {:<6} target", "program", "attach", "id", "state", "pinned");
        for p in &st.programs {
            let state = if p.attached { "attached" } else if p.loaded { "loaded" } else { "gone" };
            let pinned = if p.pinned { "yes" } else { "no" };
            let _ = writeln!(o, "{:<15} {:<21} {:>6}  {:<9} {:<6} {}", p.name, p.attach, p.id, state, pinned, p.target.display());
        }
    }
    if !st.counters.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "{:<15} {:<11} {:>12}", "program", "counter", "value");
        for c in &st.counters {
            let _ = writeln!(o, "{:<15} {:<11} {:>12}", c.program, c.counter, c.value);
        }
    }
    o
}
