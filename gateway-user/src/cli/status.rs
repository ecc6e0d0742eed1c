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
    let healthy = st.running && !st.programs.is_empty() && st.programs.iter().all(|p| p.attached);
    let text = if args.json { serde_json::to_string_pretty(&st)? + "\n" } else { table(&st, healthy) };
    super::print_quietly(&text)?;
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
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
