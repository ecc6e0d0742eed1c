//! `cargo xtask bench`: pgward against direct Postgres, Postgres with pgaudit, PgBouncer
//! (session mode) and a bare splice proxy, on throwaway PostgreSQL 15 clusters.
//!
//! Sections (all by default; `--quick` leaves out callgrind and micro unless named in `--only`;
//! pick with `--only main,fsync,memory,ebpf,mask,callgrind,micro`):
//!
//! - `main`: the targets A B C D E (direct, direct+pgaudit, pgbouncer, splice, pgward) run
//!   interleaved — for each cycle, for each workload, every target in turn — on pgbench -S in
//!   simple, extended and prepared modes, TPC-B, single-client latency, connection churn (-C)
//!   and a 100k-row × 5-column result through psql. direct+pgaudit is a second cluster with the
//!   same data and pgaudit logging every statement (bench/pgaudit.rs; skipped, with the reason,
//!   where pgaudit is not installed). Medians over the cycles, with the ratio to direct and the
//!   proxies' CPU per statement (PgBouncer's beside pgward's), then the budget (PASS/FAIL per
//!   line).
//! - `fsync`: pgward with audit.fsync = always, group, off (and direct) on pgbench -S simple.
//! - `memory`: pgward's RSS per idle session with N (500) sessions open.
//! - `ebpf`: what the eBPF redirect costs (bench/ebpf.rs): one pgward with `[intercept]` on a
//!   child cgroup, reached (a) on its own port, (b) by dialing the Postgres port from inside the
//!   cgroup (redirected by cgroup/connect4), (c) on its own port from inside the cgroup; churn
//!   (-C) and single-client latency, interleaved; medians and b/a. Skipped, with the reason,
//!   where the programs cannot be loaded.
//! - `mask`: the 100k-row result through one pgward with one masked column (`[[mask]]` on
//!   `bench_rows.h`, keep_last 4) vs the same result for a session no mask applies to.
//! - `callgrind` (~1 min): instructions per transaction of the pgward process under valgrind's
//!   callgrind, pgbench -S -c 1 in the three protocol modes, audit fsync off and group (off only
//!   with `--quick`), startup and login subtracted with a second, shorter run; the top functions
//!   per transaction (bench/callgrind.rs). Repeatable to ~0.1% on a busy machine.
//! - `micro`: gateway-user's `#[ignore]` micro-benchmark tests (policy decide, audit writer
//!   throughput) in release mode, their printed lines (bench/micro.rs). Runs first, before
//!   the cluster starts; its release test build can take minutes.
//!
//! Results: a table on stdout, JSON in target/bench/<timestamp>.json and target/bench/latest.json,
//! a PNG chart beside them. The process exits non-zero only on errors (setup failures or failed
//! measurements), never on a budget miss.

//!
//! Files: `run` (targets, workloads, the interleaved runs and the sections), `report` (tables,
//! budget checks, JSON, chart); the other sections and helpers have a file each.

mod callgrind;
mod chart;
mod disk;
mod ebpf;
mod idle;
mod micro;
mod pgaudit;
mod procs;
mod report;
mod run;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::pg::Cluster;
use crate::util::{self, step};
use procs::WorkDir;
use report::{Report, RunInfo};
// The sections in their own files reach these as `super::…`.
use run::{Table, Target, Workload, last_lines, parse_pgbench, run_interleaved, run_limited};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
pub enum Section {
    /// direct / pgbouncer / splice / pgward on every workload, with the budget.
    Main,
    /// pgward with audit.fsync = always, group, off on pgbench -S simple.
    Fsync,
    /// pgward's memory per idle session.
    Memory,
    /// eBPF redirect vs connecting to pgward's port (churn and latency).
    Ebpf,
    /// The 100k-row result through pgward with one masked column vs the same result unmasked.
    Mask,
    /// Instructions per transaction of pgward under callgrind (not in --quick's default set).
    Callgrind,
    /// gateway-user's #[ignore] micro-benchmark tests (release build; not in --quick's default set).
    Micro,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Short run: -T 3, 1 cycle, fewer psql repetitions (still every target and workload).
    #[arg(long)]
    pub quick: bool,
    /// Seconds per pgbench run (default 10; 3 with --quick).
    #[arg(short = 'T', long, value_name = "SECS")]
    pub duration: Option<u32>,
    /// Interleaved cycles over all targets (default 3; 1 with --quick).
    #[arg(long, value_name = "N")]
    pub cycles: Option<usize>,
    /// pgbench clients for the multi-client workloads.
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// pgbench threads for the multi-client workloads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// pgbench -i scale factor.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// psql runs of the 100k-row query per target per cycle (default 5; 3 with --quick).
    #[arg(long, value_name = "N")]
    pub rows_reps: Option<usize>,
    /// Idle sessions for the memory section.
    #[arg(long, default_value_t = 500)]
    pub idle_sessions: usize,
    /// Sections to run, comma-separated (default: all; with --quick all but callgrind and micro).
    #[arg(long, value_delimiter = ',', value_name = "SECTIONS")]
    pub only: Vec<Section>,
    /// Use this pgward binary instead of building it with `cargo build --release -p gateway-user`.
    #[arg(long, value_name = "PATH")]
    pub pgward: Option<PathBuf>,
    /// Keep the temporary work directory (cluster, configs, logs) for inspection.
    #[arg(long)]
    pub keep_workdir: bool,
    /// Only redraw the PNG of a saved run from its JSON (written beside it as <name>.png).
    #[arg(long, value_name = "JSON")]
    pub replot: Option<PathBuf>,
    /// Where results go (default: <workspace>/target/bench).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Resolved run parameters.
pub(crate) struct Settings {
    quick: bool,
    duration: u32,
    cycles: usize,
    clients: u32,
    threads: u32,
    scale: u32,
    rows_reps: usize,
    warmup: u32,
    idle_sessions: usize,
}

impl Settings {
    fn from_args(args: &BenchArgs) -> Settings {
        Settings {
            quick: args.quick,
            duration: args.duration.unwrap_or(if args.quick { 3 } else { 10 }).max(1),
            cycles: args.cycles.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
            clients: args.clients.max(1),
            threads: args.threads.clamp(1, args.clients.max(1)),
            scale: args.scale.max(1),
            rows_reps: args.rows_reps.unwrap_or(if args.quick { 3 } else { 5 }).max(1),
            warmup: if args.quick { 1 } else { 3 },
            idle_sessions: args.idle_sessions.max(1),
        }
    }
}

// ------------------------------------------------------------------------------- interrupts

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C / SIGTERM: note it and let the current child (which got the same SIGINT from the
/// terminal) end; the bench then unwinds through its guards, which stop what it started.
fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(i32) as usize;
    unsafe {
        signal(2, handler); // SIGINT
        signal(15, handler); // SIGTERM
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- running

pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(json_path) = &args.replot {
        return report::replot(json_path);
    }
    install_signal_handlers();
    let s = Settings::from_args(args);
    let sections = sections(args);
    let root = util::workspace_root();
    let out_dir = args.out.clone().unwrap_or_else(|| root.join("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let bins = build(args, &sections, &root)?;

    let (stamp, iso) = report::utc_stamp();
    let info = RunInfo { stamp, iso, started: Instant::now(), load_start: report::loadavg() };
    let mut report = Report::default();

    // Before the cluster starts: it compiles (possibly for minutes) and needs nothing else.
    if sections.contains(&Section::Micro) {
        report.micro = Some(micro::run(&root, &interrupted));
    }

    // Declared before the cluster so it is dropped (removed) after the cluster has stopped.
    let work = WorkDir::create(args.keep_workdir)?;
    let result = run_sections(&s, &sections, &work, &bins, &out_dir, &info.stamp, &mut report);
    if let Err(e) = &result {
        // Keep whatever was measured; the error decides the exit code below.
        eprintln!("xtask bench: stopped by an error (shown at the end): {e:#}");
        if !work.keep {
            show_logs(&work);
        }
    }
    drop(work);

    report::write(&report, &s, &sections, &info, &out_dir, &result)?;
    result?;
    let failed = report.errors();
    if failed > 0 {
        bail!("{failed} measurement(s) failed (see the table and the JSON for the errors)");
    }
    Ok(())
}

/// The sections to run: `--only`'s (sorted, once each), or all (but callgrind and micro with
/// `--quick`).
fn sections(args: &BenchArgs) -> Vec<Section> {
    if args.only.is_empty() {
        let mut v = vec![Section::Main, Section::Fsync, Section::Memory, Section::Ebpf, Section::Mask];
        if args.quick {
            step("--quick: leaving out callgrind (~1 min) and micro (a release test build, minutes); name them in --only to add them");
        } else {
            v.extend([Section::Callgrind, Section::Micro]);
        }
        v
    } else {
        let mut v = args.only.clone();
        v.sort();
        v.dedup();
        v
    }
}

/// Settings of the bench's PostgreSQL clusters (the main one, and the pgaudit one of the
/// main section): room for the memory section's idle sessions behind pgward.
const PG_CONF: [&str; 2] = ["max_connections = 700", "shared_buffers = 256MB"];

/// The binaries the sections run.
struct Binaries {
    pgward: PathBuf,
    /// This xtask, for the splice proxy.
    splice: PathBuf,
}

/// Build what the sections need, in release mode.
fn build(args: &BenchArgs, sections: &[Section], root: &Path) -> Result<Binaries> {
    let needs_pg = needs_pg(sections);
    // Release builds: pgward, and this xtask for the splice proxy (a debug build of tokio
    // would make the baseline proxy look slower than it is).
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let mut packages = Vec::new();
    if needs_pg && args.pgward.is_none() {
        packages.extend(["-p", "gateway-user"]);
    }
    if sections.contains(&Section::Main) {
        packages.extend(["-p", "xtask"]);
    }
    // The ebpf section needs pgward built with the kernel programs embedded: build them first
    // (as `cargo xtask test` does). If that fails, the section is skipped with the reason.
    if sections.contains(&Section::Ebpf) && args.pgward.is_none() {
        if let Err(e) = crate::ebpf::build(&crate::ebpf::BuildEbpfArgs::default()) {
            util::step(&format!("build-ebpf failed ({e:#}); the ebpf section will be skipped"));
        }
    }
    if !packages.is_empty() {
        util::run_timed(
            "build pgward and the splice proxy (release)",
            util::cargo().args(["build", "--release"]).args(&packages).current_dir(root),
        )?;
    }
    Ok(Binaries {
        pgward: args.pgward.clone().unwrap_or_else(|| target_dir.join("release/pgward")),
        splice: target_dir.join("release/xtask"),
    })
}

/// Whether any section needs the PostgreSQL cluster (all but micro).
fn needs_pg(sections: &[Section]) -> bool {
    sections.iter().any(|s| *s != Section::Micro)
}

/// Start the cluster in `work` and run the sections that need it, in order, into `report`.
fn run_sections(
    s: &Settings,
    sections: &[Section],
    work: &WorkDir,
    bins: &Binaries,
    out_dir: &Path,
    stamp: &str,
    report: &mut Report,
) -> Result<()> {
    if !needs_pg(sections) {
        return Ok(());
    }
    step(&format!("starting a throwaway PostgreSQL 15 in {}", work.path.display()));
    let cluster = Cluster::start(&work.join("pg"), &PG_CONF)?;
    run::prepare_data(&cluster, s)?;
    for sec in sections {
        check_interrupted()?;
        match sec {
            Section::Main => main_section(s, work, &cluster, bins, report)?,
            Section::Fsync => run::section_fsync(s, work, &cluster, &bins.pgward, &mut report.fsync)?,
            Section::Memory => report.memory = Some(run::section_memory(s, work, &cluster, &bins.pgward)?),
            Section::Ebpf => ebpf::section(s, work, &cluster, &bins.pgward, &mut report.ebpf)?,
            Section::Mask => run::section_mask(s, work, &cluster, &bins.pgward, &mut report.mask)?,
            Section::Callgrind => callgrind::section(
                &callgrind::Plan::new(s.quick),
                work,
                &cluster,
                &bins.pgward,
                out_dir,
                stamp,
                &mut report.callgrind,
            )?,
            Section::Micro => {}
        }
    }
    cluster.stop();
    Ok(())
}

/// The main section, with the `direct+pgaudit` target's cluster running beside `cluster` for
/// its duration (or the reason it is skipped, in the report).
fn main_section(s: &Settings, work: &WorkDir, cluster: &Cluster, bins: &Binaries, report: &mut Report) -> Result<()> {
    let audited = match pgaudit::setup(s, work, &PG_CONF) {
        Ok(a) => Some(a),
        Err(status) => {
            step(&format!("main: {}", status.line()));
            report.pgaudit = Some(status);
            None
        }
    };
    let target = audited.as_ref().map(pgaudit::Audited::target);
    let res = run::section_main(s, work, cluster, target.as_ref(), bins, &mut report.main, &mut report.flush);
    if let Some(a) = audited {
        report.pgaudit = Some(a.status());
        // Dropping it stops the cluster.
    }
    res
}

/// After an error: the ends of the logs in the work directory, which goes with them.
fn show_logs(work: &WorkDir) {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&work.path)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
        .unwrap_or_default();
    logs.sort();
    logs.push(work.join("pg/postgres.log"));
    logs.push(work.join("pg-pgaudit/postgres.log"));
    for p in logs.iter().filter(|p| p.is_file()) {
        eprintln!("--- last lines of {}:\n{}", p.display(), procs::tail(p, 10));
    }
}
