//! The `ebpf` section: what the transparent redirect costs a client.
//!
//! One pgward (audit fsync = off, so disk flushes do not drown the connect path) with
//! `[intercept]` on, attached to a child cgroup v2 the bench creates (never the root) — the
//! same setup `cargo xtask demo` uses. Three ways to reach it, interleaved per cycle:
//!
//! - `pgward-port` (a): pgbench dials pgward's listen port from the bench's own cgroup; no eBPF
//!   program runs for it.
//! - `redirected` (b): pgbench dials the *Postgres* port from inside the child cgroup
//!   (`sh -c 'echo $$ > CG/cgroup.procs && exec pgbench …'`); cgroup/connect4 rewrites the
//!   connect to pgward (and getpeername / sock_ops run).
//! - `cgroup-pgward-port` (c): from inside the child cgroup, dialing pgward's port: the programs
//!   run but rewrite nothing (separates "programs attached" from "address rewritten").
//!
//! Workloads: connection churn (pgbench -S -C, a connect per transaction) and single-client
//! latency (pgbench -S -c 1, one connect for the whole run). The headline is b/a.
//!
//! The section is skipped, with the reason printed, when the eBPF programs cannot be loaded
//! (not root, no CAP_BPF / CAP_SYS_ADMIN, no cgroup v2, a pgward built without the object).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::procs::{self, PgwardOpts, WorkDir};
use super::{Settings, Table, Target, Workload, run_interleaved};
use crate::pg::Cluster;
use crate::util::step;

pub const WORKLOADS: [Workload; 2] = [Workload::Churn, Workload::Latency];
pub const DIRECT: &str = "pgward-port";
pub const REDIRECTED: &str = "redirected";
pub const IN_CGROUP: &str = "cgroup-pgward-port";
pub const FSYNC: &str = "off";
/// The three ways in, for the report.
pub const TARGETS: [(&str, &str); 3] = [
    (DIRECT, "(a) pgbench -> pgward's listen port, from the bench's own cgroup (no eBPF program runs)"),
    (REDIRECTED, "(b) pgbench -> the Postgres port from inside the child cgroup; cgroup/connect4 redirects it to pgward"),
    (IN_CGROUP, "(c) pgbench -> pgward's listen port from inside the child cgroup (programs run, nothing rewritten)"),
];

/// `pgward intercept detach` for a config, on drop.
struct Detach(PathBuf, PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.0)
            .args(["intercept", "detach", "--reason", "bench ends", "--config"])
            .arg(&self.1)
            .env("PGWARD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .status();
    }
}

pub enum Outcome {
    /// Not measured, and why.
    Skipped(String),
    Measured(Table),
}

/// A child cgroup v2 for the bench's redirected clients; pgward attaches its programs here and
/// moves itself into `<dir>/pgward-gateway`. Removed on drop (after the processes in it ended).
struct BenchCgroup(PathBuf);

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        // pgbench processes and pgward may take a moment to leave; rmdir only works when empty.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let _ = std::fs::remove_dir(self.0.join("pgward-gateway"));
            match std::fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("xtask bench: warning: could not remove cgroup {}: {e}", self.0.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

fn skip(slot: &mut Option<Outcome>, why: String) -> Result<()> {
    step(&format!("ebpf: skipped: {why}"));
    *slot = Some(Outcome::Skipped(why));
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// Why the programs cannot be loaded here, if we can tell beforehand; else the cgroup v2 mount.
fn preflight() -> std::result::Result<PathBuf, String> {
    if unsafe { geteuid() } != 0 {
        return Err("not running as root (pgward needs CAP_BPF + CAP_SYS_ADMIN to attach, and the bench writes cgroup.procs)".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(eff) = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()) {
        const CAP_SYS_ADMIN: u32 = 21;
        const CAP_BPF: u32 = 39;
        if eff & (1 << CAP_SYS_ADMIN) == 0 {
            return Err(format!("no CAP_SYS_ADMIN (CapEff {eff:#x})"));
        }
        if eff & (1 << CAP_BPF) == 0 {
            return Err(format!("no CAP_BPF (CapEff {eff:#x})"));
        }
    }
    cgroup2_root().ok_or_else(|| "no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup".to_string())
}

/// The cgroup v2 mount: /sys/fs/cgroup/unified (hybrid layout) or /sys/fs/cgroup (unified).
fn cgroup2_root() -> Option<PathBuf> {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        return Some(unified.to_path_buf());
    }
    let root = Path::new("/sys/fs/cgroup");
    root.join("cgroup.controllers").exists().then(|| root.to_path_buf())
}

/// Run the section; the outcome (skipped, or the table so far) goes into `slot`.
pub fn section(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path, slot: &mut Option<Outcome>) -> Result<()> {
    let root = match preflight() {
        Ok(r) => r,
        Err(why) => return skip(slot, why),
    };
    let dir = root.join(format!("pgward-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        return skip(slot, format!("cannot create the child cgroup {}: {e}", dir.display()));
    }
    // Declared before pgward: dropped (removed) after pgward has stopped.
    let cg = BenchCgroup(dir);
    let intercept = format!(
        "\n[intercept]\nenabled = true\ncgroup = \"{}\"\nprotected = [\"0.0.0.0:{p}\", \"[::]:{p}\"]\nsk_lookup = false\n",
        cg.0.display(),
        p = cluster.port
    );
    step(&format!("ebpf: starting pgward (audit fsync = {FSYNC}) with interception on cgroup {}", cg.0.display()));
    let opts = PgwardOpts { fsync: FSYNC, config_extra: &intercept, ..PgwardOpts::default() };
    let mut gw = match procs::start_pgward_opts(bin, work, "pgward-ebpf", cluster, &opts) {
        Ok(gw) => gw,
        Err(e) => {
            let why = format!("pgward with [intercept] did not start: {e:#}");
            return skip(slot, why);
        }
    };
    // Interception is pinned and outlives pgward: detached (audited) once pgward has stopped
    // (declared after `cg`, before `gw` is dropped below: dropped after it, before `cg`).
    let _detach = Detach(bin.to_owned(), gw.dir.join("pgward.toml"));
    // serve writes the state file once the programs are attached.
    let state = gw.dir.join("intercept.state.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !state.exists() {
        if let Err(e) = gw.proc.check_alive() {
            let why = format!("pgward could not attach its eBPF programs: {e:#}");
            return skip(slot, why);
        }
        if Instant::now() > deadline {
            let why = format!(
                "pgward wrote no {} within 20 s (programs not attached); last lines of {}:\n{}",
                state.display(),
                gw.proc.log.display(),
                procs::tail(&gw.proc.log, 10)
            );
            return skip(slot, why);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let a = Target::pgward(DIRECT, &gw);
    let mut b = a.clone();
    b.name = REDIRECTED.into();
    b.port = cluster.port;
    b.cgroup = Some(cg.0.clone());
    let mut c = a.clone();
    c.name = IN_CGROUP.into();
    c.cgroup = Some(cg.0.clone());
    // A redirected psql must land in pgward: `bench` with a token is not a Postgres login, so
    // the sanity check in run_interleaved fails if the connect is not rewritten.
    let targets = vec![a, b, c];
    step(&format!("ebpf: {} cycle(s) x {} workloads x {} targets, -T {} s", s.cycles, WORKLOADS.len(), targets.len(), s.duration));
    let mut table = None;
    let r = run_interleaved(s, &WORKLOADS, &targets, &mut [&mut gw.proc], "ebpf", &mut table);
    drop(gw);
    drop(_detach);
    drop(cg);
    // Keep what was measured even when stopped by an error.
    if let Some(t) = table {
        *slot = Some(Outcome::Measured(t));
    }
    r
}
