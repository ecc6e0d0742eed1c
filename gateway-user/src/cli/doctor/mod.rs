//! `pgward doctor`: is this host set up for pgward, and is the running gateway doing its job?
//!
//! Checks kernel features, capabilities, cgroup v2, eBPF program attachment, the unix socket
//! lockdown, Postgres's listen addresses, the audit directory, the clock, the token keys (and
//! an identity provider's, fetched now and as the running serve last fetched them), the TLS
//! certificate and the access state backend (etcd: members, reads, serve current); prints a
//! table (PASS / WARN / FAIL / SKIP) and a fix for each problem.
//! Works against a live `pgward serve` (found by its listening socket, or the interception state
//! file) and without one. Exit 0 when nothing failed, 1 otherwise.
//!
//! Each group of checks has a file of its own; `report` holds the outcomes and their rendering,
//! `proc_net` the /proc readers several checks share.

mod access;
mod audit;
mod clock;
mod idp;
mod interception;
mod kernel;
mod keys;
mod proc_net;
mod report;
mod socket_lockdown;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::config::Config;
use crate::host::accounts::Accounts;
use crate::host::process;

pub use report::{Check, Outcome};
use report::{Report, check, render};

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
    let serve_pid = proc_net::listener_pid(listen)
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
    checks.push(kernel::kernel());
    checks.push(kernel::bpf_features(&cx));
    checks.push(kernel::capabilities(&cx));
    checks.push(interception::cgroup_v2(&cx));
    checks.push(interception::programs(&cx));
    checks.push(interception::listen_port(&cx));
    checks.push(socket_lockdown::socket_lockdown(&cx));
    checks.push(upstream::postgres_loopback(&cx));
    checks.push(audit::audit_dir(&cx));
    checks.push(clock::clock(&cx));
    checks.push(keys::token_keys(&cx));
    checks.push(idp::provider_keys(&cx));
    checks.push(keys::checkpoint_key(&cx));
    checks.push(keys::tls(&cx));
    checks.push(access::access_backend(&cx));
    Report { config: args.config.clone(), serve_pid, checks }
}
