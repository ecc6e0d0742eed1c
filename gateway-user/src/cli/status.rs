//! `pgward status`: the interception programs `serve` attached and their counters.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Exit 0 when interception is running with every program attached, 1 otherwise.
pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::config::Config::load(&args.config)?;
    let st = crate::ebpf::status(&cfg).context("reading interception status")?;
    let healthy = st.running && !st.programs.is_empty() && st.programs.iter().all(|p| p.attached);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let Some(state) = &st.state else {
        if st.enabled {
            println!("interception: enabled in the config, but no `pgward serve` has attached programs");
        } else {
            println!("interception: off ([intercept] enabled = false)");
        }
        return Ok(ExitCode::from(1));
    };
    println!(
        "interception: {} (pgward pid {}, since {})",
        if healthy { "on" } else if st.running { "DEGRADED" } else { "STALE (serve is not running)" },
        state.pid,
        state.started
    );
    println!("  cgroup          {}", state.cgroup.display());
    println!("  gateway cgroup  {} (id {})", state.gateway_cgroup.display(), state.gateway_cgroup_id);
    let list = |v: &[std::net::SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
    println!("  protected       {}", list(&state.protected));
    println!("  guard (EPERM)   {}", if state.guard.is_empty() { "-".into() } else { list(&state.guard) });
    let target = |a: &Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "- (refused)".into());
    println!("  redirect to     {} / {}", target(&state.redirect4), target(&state.redirect6));
    println!();
    println!("{:<15} {:<21} {:>6}  {:<9} target", "program", "attach", "id", "state");
    for p in &st.programs {
        let state = if p.attached { "attached" } else if p.loaded { "loaded" } else { "gone" };
        println!("{:<15} {:<21} {:>6}  {:<9} {}", p.name, p.attach, p.id, state, p.target.display());
    }
    if !st.counters.is_empty() {
        println!();
        println!("{:<15} {:<11} {:>12}", "program", "counter", "value");
        for c in &st.counters {
            println!("{:<15} {:<11} {:>12}", c.program, c.counter, c.value);
        }
    }
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
