//! `cargo xtask bench`: pgward against direct Postgres, PgBouncer (session mode) and a bare
//! splice proxy, on one throwaway PostgreSQL 15 cluster.
//!
//! Sections (all by default; `--quick` leaves out callgrind and micro unless named in `--only`;
//! pick with `--only main,fsync,memory,ebpf,mask,callgrind,micro`):
//!
//! - `main`: the targets A B C D (direct, pgbouncer, splice, pgward) run interleaved — for each
//!   cycle, for each workload, every target in turn — on pgbench -S in simple, extended and
//!   prepared modes, TPC-B, single-client latency, connection churn (-C) and a 100k-row ×
//!   5-column result through psql. Medians over the cycles, with the ratio to direct, then the
//!   budget (PASS/FAIL per line).
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

mod callgrind;
mod chart;
mod disk;
mod ebpf;
mod idle;
mod micro;
mod procs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::pg::{self, Cluster};
use crate::util::{self, step};
use procs::{Pgward, Proc, WorkDir};

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
struct Settings {
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

// ---------------------------------------------------------------------------- targets, work

/// Something pgbench and psql connect to.
#[derive(Clone)]
struct Target {
    name: String,
    port: u16,
    user: String,
    password: String,
    /// Run the client inside this cgroup v2 (it moves itself there before it execs).
    cgroup: Option<PathBuf>,
    /// The proxy process behind the port: its CPU time per transaction is measured too.
    pid: Option<u32>,
}

impl Target {
    fn service(name: &str, port: u16) -> Target {
        Target {
            name: name.into(),
            port,
            user: pg::SERVICE_USER.into(),
            password: pg::SERVICE_PASSWORD.into(),
            cgroup: None,
            pid: None,
        }
    }
    fn pgward(name: &str, gw: &Pgward) -> Target {
        Target {
            name: name.into(),
            port: gw.port,
            user: "bench".into(),
            password: gw.token.clone(),
            cgroup: None,
            pid: Some(gw.proc.pid()),
        }
    }
    /// Also measure the CPU time of process `pid` (the proxy serving this port).
    fn charged(mut self, pid: u32) -> Target {
        self.pid = Some(pid);
        self
    }

    /// A libpq client command (pgbench, psql) aimed at this target.
    fn client(&self, prog: &str) -> Command {
        let path = pg::bindir().join(prog);
        let mut c = match &self.cgroup {
            // The shell joins the cgroup, then becomes the client (same pid), so every socket
            // the client creates belongs to the cgroup.
            Some(cg) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("echo $$ > '{}/cgroup.procs' && exec \"$0\" \"$@\"", cg.display())).arg(path);
                c
            }
            None => Command::new(path),
        };
        for v in ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGPASSFILE", "PGOPTIONS", "PGSSLMODE"] {
            c.env_remove(v);
        }
        c.env("PGPASSWORD", &self.password)
            .env("PGSSLMODE", "disable")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", &self.user]);
        c
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    SelectSimple,
    SelectExtended,
    SelectPrepared,
    Tpcb,
    Latency,
    Churn,
    Rows,
}

const MAIN_WORKLOADS: [Workload; 7] = [
    Workload::SelectSimple,
    Workload::SelectExtended,
    Workload::SelectPrepared,
    Workload::Tpcb,
    Workload::Latency,
    Workload::Churn,
    Workload::Rows,
];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::SelectSimple => "select-simple",
            Workload::SelectExtended => "select-extended",
            Workload::SelectPrepared => "select-prepared",
            Workload::Tpcb => "tpc-b",
            Workload::Latency => "latency-1c",
            Workload::Churn => "churn",
            Workload::Rows => "rows-100k",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Workload::Latency => "µs",
            Workload::Rows => "ms",
            _ => "tps",
        }
    }
    fn higher_is_better(self) -> bool {
        !matches!(self, Workload::Latency | Workload::Rows)
    }
    fn describe(self, s: &Settings) -> String {
        let (c, j) = (s.clients, s.threads);
        match self {
            Workload::SelectSimple => format!("pgbench -S -M simple -c {c} -j {j}"),
            Workload::SelectExtended => format!("pgbench -S -M extended -c {c} -j {j}"),
            Workload::SelectPrepared => format!("pgbench -S -M prepared -c {c} -j {j}"),
            Workload::Tpcb => format!("pgbench (TPC-B) -c {c} -j {j}"),
            Workload::Latency => "pgbench -S -c 1 -j 1, mean latency".into(),
            Workload::Churn => format!("pgbench -S -C -c {c} -j {j}"),
            Workload::Rows => "psql: 100000 rows x 5 columns > /dev/null, wall time".into(),
        }
    }
}

/// Samples of one (workload, target) cell.
#[derive(Default, Clone)]
struct Cell {
    samples: Vec<f64>,
    errors: Vec<String>,
    /// CPU time of the target's proxy process per transaction (µs), per run.
    cpu_us: Vec<f64>,
}

impl Cell {
    fn median(&self) -> Option<f64> {
        median(&self.samples)
    }
}

/// User + system CPU time of process `pid` (all its threads), in seconds.
fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // In clock ticks of USER_HZ, which Linux fixes at 100 for userspace (sysconf(_SC_CLK_TCK)).
    Some((utime + stime) / 100.0)
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 })
}

/// Results of a section: cells by (workload, target). The first target is the baseline the
/// ratios are to ("direct" in main and fsync).
struct Table {
    workloads: Vec<Workload>,
    targets: Vec<String>,
    cells: BTreeMap<(usize, usize), Cell>,
}

impl Table {
    fn new(workloads: &[Workload], targets: &[Target]) -> Table {
        Table { workloads: workloads.to_vec(), targets: targets.iter().map(|t| t.name.clone()).collect(), cells: BTreeMap::new() }
    }
    fn cell(&self, w: Workload, target: &str) -> Option<&Cell> {
        let wi = self.workloads.iter().position(|x| *x == w)?;
        let ti = self.targets.iter().position(|x| x == target)?;
        self.cells.get(&(wi, ti))
    }
    fn median(&self, w: Workload, target: &str) -> Option<f64> {
        self.cell(w, target).and_then(Cell::median)
    }
    fn baseline(&self) -> &str {
        self.targets.first().map_or("direct", String::as_str)
    }
    /// value / baseline (direct)
    fn ratio(&self, w: Workload, target: &str) -> Option<f64> {
        Some(self.median(w, target)? / self.median(w, self.baseline())?)
    }
    /// Performance relative to direct: higher is better for every workload.
    fn relative(&self, w: Workload, target: &str) -> Option<f64> {
        let r = self.ratio(w, target)?;
        Some(if w.higher_is_better() { r } else { 1.0 / r })
    }
    fn errors(&self) -> usize {
        self.cells.values().map(|c| c.errors.len()).sum()
    }
}

// ---------------------------------------------------------------------------------- running

pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(json_path) = &args.replot {
        let text = std::fs::read_to_string(json_path).with_context(|| format!("reading {}", json_path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", json_path.display()))?;
        let png = json_path.with_extension("png");
        if !chart_from_json(&v, &png)? {
            bail!("{} has no main or fsync results to draw", json_path.display());
        }
        println!("chart: {}", png.display());
        return Ok(());
    }
    install_signal_handlers();
    let s = Settings {
        quick: args.quick,
        duration: args.duration.unwrap_or(if args.quick { 3 } else { 10 }).max(1),
        cycles: args.cycles.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        clients: args.clients.max(1),
        threads: args.threads.clamp(1, args.clients.max(1)),
        scale: args.scale.max(1),
        rows_reps: args.rows_reps.unwrap_or(if args.quick { 3 } else { 5 }).max(1),
        warmup: if args.quick { 1 } else { 3 },
        idle_sessions: args.idle_sessions.max(1),
    };
    let sections: Vec<Section> = if args.only.is_empty() {
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
    };
    let root = util::workspace_root();
    let out_dir = args.out.clone().unwrap_or_else(|| root.join("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let needs_pg = sections.iter().any(|s| *s != Section::Micro);
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
            util::cargo().args(["build", "--release"]).args(&packages).current_dir(&root),
        )?;
    }
    let pgward_bin = args.pgward.clone().unwrap_or_else(|| target_dir.join("release/pgward"));
    let splice_bin = target_dir.join("release/xtask");

    let (stamp, iso) = utc_stamp();
    let started = Instant::now();
    let load_start = loadavg();
    let mut report = Report::default();

    // Before the cluster starts: it compiles (possibly for minutes) and needs nothing else.
    if sections.contains(&Section::Micro) {
        report.micro = Some(micro::run(&root, &interrupted));
    }

    // Declared before the cluster so it is dropped (removed) after the cluster has stopped.
    let work = WorkDir::create(args.keep_workdir)?;
    let result = (|| -> Result<()> {
        if !needs_pg {
            return Ok(());
        }
        step(&format!("starting a throwaway PostgreSQL 15 in {}", work.path.display()));
        let cluster = Cluster::start(&work.join("pg"), &["max_connections = 700", "shared_buffers = 256MB"])?;
        prepare_data(&cluster, &s)?;
        for sec in &sections {
            check_interrupted()?;
            match sec {
                Section::Main => {
                    section_main(&s, &work, &cluster, &pgward_bin, &splice_bin, &mut report.main, &mut report.flush)?
                }
                Section::Fsync => section_fsync(&s, &work, &cluster, &pgward_bin, &mut report.fsync)?,
                Section::Memory => report.memory = Some(section_memory(&s, &work, &cluster, &pgward_bin)?),
                Section::Ebpf => ebpf::section(&s, &work, &cluster, &pgward_bin, &mut report.ebpf)?,
                Section::Mask => section_mask(&s, &work, &cluster, &pgward_bin, &mut report.mask)?,
                Section::Callgrind => callgrind::section(
                    &callgrind::Plan::new(s.quick),
                    &work,
                    &cluster,
                    &pgward_bin,
                    &out_dir,
                    &stamp,
                    &mut report.callgrind,
                )?,
                Section::Micro => {}
            }
        }
        cluster.stop();
        Ok(())
    })();
    if let Err(e) = &result {
        // Keep whatever was measured; the error decides the exit code below.
        eprintln!("xtask bench: stopped by an error (shown at the end): {e:#}");
        if !work.keep {
            // The logs go with the work directory: show their ends now.
            let mut logs: Vec<PathBuf> = std::fs::read_dir(&work.path)
                .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
                .unwrap_or_default();
            logs.sort();
            logs.push(work.join("pg/postgres.log"));
            for p in logs.iter().filter(|p| p.is_file()) {
                eprintln!("--- last lines of {}:\n{}", p.display(), procs::tail(p, 10));
            }
        }
    }
    drop(work);

    // Output.
    let text = report.render(&s);
    println!("{text}");
    let mut json = report.json(&s, &sections, &iso, started.elapsed().as_secs_f64());
    let load_end = loadavg();
    json["machine"]["loadavg_start"] = json!(load_start);
    json["machine"]["loadavg_end"] = json!(load_end);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if let (Some(a), Some(b)) = (load_start, load_end) {
        println!("load average (1 min): {a:.2} at start, {b:.2} at the end ({cpus} CPUs)");
        if a.max(b) > cpus + 1.0 {
            println!("note: other work was running on this machine; the numbers are noisier than usual");
        }
    }
    if let Some(line) = cpuidle_line(&json["machine"]["cpuidle"]) {
        println!("{line}");
    }
    if let Err(e) = &result {
        json["error"] = json!(format!("{e:#}"));
    }
    let png = out_dir.join(format!("{stamp}.png"));
    let png_latest = out_dir.join("latest.png");
    match chart_from_json(&json, &png) {
        Ok(true) => {
            json["chart"] = json!(png.display().to_string());
        }
        Ok(false) => {}
        Err(e) => {
            eprintln!("xtask bench: warning: no chart: {e:#}");
            json["chart_error"] = json!(format!("{e:#}"));
        }
    }
    let json_path = out_dir.join(format!("{stamp}.json"));
    let body = serde_json::to_string_pretty(&json)? + "\n";
    std::fs::write(&json_path, &body).with_context(|| format!("writing {}", json_path.display()))?;
    // latest.* are only replaced by a run that was not stopped by an error.
    let complete = result.is_ok();
    if complete {
        std::fs::write(out_dir.join("latest.json"), &body)?;
    }
    println!("results: {}{}", json_path.display(), if complete { "" } else { " (incomplete: stopped by an error)" });
    if complete {
        println!("         {}", out_dir.join("latest.json").display());
    }
    if json.get("chart").is_some() {
        println!("chart:   {}", png.display());
        if complete {
            let _ = std::fs::copy(&png, &png_latest);
            println!("         {}", png_latest.display());
        }
    }
    println!("took {:.0} s", started.elapsed().as_secs_f64());

    result?;
    let failed = report.errors();
    if failed > 0 {
        bail!("{failed} measurement(s) failed (see the table and the JSON for the errors)");
    }
    Ok(())
}

/// pgbench -i as the service user (so pgward's upstream role owns the tables) and the table
/// the 100k-row query reads.
fn prepare_data(cluster: &Cluster, s: &Settings) -> Result<()> {
    let direct = Target::service("direct", cluster.port);
    let t0 = Instant::now();
    step(&format!("pgbench -i -s {} (as {})", s.scale, pg::SERVICE_USER));
    let (status, out, err) = run_limited(
        direct.client("pgbench").args(["-i", "-q", "-s", &s.scale.to_string(), "app"]),
        Duration::from_secs(600),
    )?;
    if !status.success() {
        bail!("pgbench -i failed ({status}):\n{out}{err}");
    }
    let create = "create table bench_rows as select g as id, g * 7 as n, md5(g::text) as h, \
        timestamptz '2026-01-01' + g * interval '1 second' as ts, 'row number ' || g as label \
        from generate_series(1, 100000) g";
    let (status, out, err) = run_limited(
        direct.client("psql").args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "app"]).args([
            "-c",
            "drop table if exists bench_rows",
            "-c",
            create,
            "-c",
            "vacuum analyze bench_rows",
        ]),
        Duration::from_secs(120),
    )?;
    if !status.success() {
        bail!("creating bench_rows failed ({status}):\n{out}{err}");
    }
    cluster.psql_super("app", "checkpoint")?;
    step(&format!("data ready in {:.1} s", t0.elapsed().as_secs_f64()));
    Ok(())
}

/// `select 1` through a target, so a broken setup fails before any measurement.
fn sanity(t: &Target) -> Result<()> {
    let (status, out, err) = run_limited(
        t.client("psql").args(["-X", "-At", "-d", "app", "-c", "select count(*) from pgbench_branches"]),
        Duration::from_secs(30),
    )?;
    if !status.success() {
        bail!("psql through {} (port {}) failed ({status}): {}{}", t.name, t.port, out.trim(), err.trim());
    }
    Ok(())
}

fn warm(t: &Target, s: &Settings) {
    let _ = run_limited(
        t.client("pgbench").args(["-n", "-S", "-c", &s.clients.to_string(), "-j", &s.threads.to_string(), "-T", &s.warmup.to_string(), "app"]),
        Duration::from_secs(60),
    );
}

/// Run every workload on every target, interleaved: for each cycle, for each workload, each
/// target in order. Samples go into `slot` as they come, so an interrupted run keeps them.
fn run_interleaved(
    s: &Settings,
    workloads: &[Workload],
    targets: &[Target],
    procs: &mut [&mut Proc],
    label: &str,
    slot: &mut Option<Table>,
) -> Result<()> {
    for t in targets {
        sanity(t).with_context(|| format!("checking {}", t.name))?;
    }
    step(&format!("{label}: warm-up ({} s per target)", s.warmup));
    for t in targets {
        warm(t, s);
    }
    let width = targets.iter().map(|t| t.name.len()).max().unwrap_or(6);
    let table = slot.insert(Table::new(workloads, targets));
    for cycle in 0..s.cycles {
        for (wi, &w) in workloads.iter().enumerate() {
            let reps = if w == Workload::Rows { s.rows_reps } else { 1 };
            for _ in 0..reps {
                for (ti, t) in targets.iter().enumerate() {
                    check_interrupted()?;
                    for p in procs.iter_mut() {
                        p.check_alive()?;
                    }
                    let cpu_before = t.pid.and_then(process_cpu_secs);
                    let r = measure(w, t, s);
                    let cpu = cpu_before.zip(t.pid.and_then(process_cpu_secs)).map(|(a, b)| b - a);
                    check_interrupted()?;
                    let cell = table.cells.entry((wi, ti)).or_default();
                    match r {
                        Ok((v, txns)) => {
                            let per_txn = cpu.zip(txns.filter(|&n| n > 0)).map(|(c, n)| c * 1e6 / n as f64);
                            let cpu_note = per_txn.map(|u| format!("   cpu {u:.1} µs/txn")).unwrap_or_default();
                            eprintln!(
                                "    [{label} {}/{}] {:<16} {:<width$} {:>10.1} {}{cpu_note}",
                                cycle + 1,
                                s.cycles,
                                w.name(),
                                t.name,
                                v,
                                w.unit()
                            );
                            cell.samples.push(v);
                            cell.cpu_us.extend(per_txn);
                        }
                        Err(e) => {
                            eprintln!("    [{label} {}/{}] {:<16} {:<width$} ERROR: {e:#}", cycle + 1, s.cycles, w.name(), t.name);
                            cell.errors.push(format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn section_main(
    s: &Settings,
    work: &WorkDir,
    cluster: &Cluster,
    bin: &Path,
    splice_bin: &Path,
    slot: &mut Option<Table>,
    flush: &mut Vec<(&'static str, disk::Flush)>,
) -> Result<()> {
    let probe = |label: &'static str, flush: &mut Vec<(&'static str, disk::Flush)>| match disk::measure(&work.path, FLUSH_SAMPLES) {
        Ok(f) => {
            step(&format!("main: audit disk flush latency {label}: p50 {:.0} µs, p90 {:.0} µs", f.p50_us, f.p90_us));
            flush.push((label, f));
        }
        Err(e) => step(&format!("main: flush latency probe failed: {e:#}")),
    };
    probe("before", flush);
    step("main: starting pgbouncer (session mode), the splice proxy and pgward (audit fsync = group)");
    let (mut bouncer, bouncer_port) = procs::start_pgbouncer(work, cluster)?;
    let (mut splice, splice_port) = procs::start_splice(splice_bin, work, cluster)?;
    let mut gw = procs::start_pgward(bin, work, "pgward-main", cluster, "group")?;
    let targets = vec![
        Target::service("direct", cluster.port),
        Target::service("pgbouncer", bouncer_port).charged(bouncer.pid()),
        Target::service("splice", splice_port).charged(splice.pid()),
        Target::pgward("pgward", &gw),
    ];
    step(&format!(
        "main: {} cycle(s) x {} workloads x {} targets, -T {} s",
        s.cycles,
        MAIN_WORKLOADS.len(),
        targets.len(),
        s.duration
    ));
    let res = run_interleaved(s, &MAIN_WORKLOADS, &targets, &mut [&mut bouncer, &mut splice, &mut gw.proc], "main", slot);
    probe("after", flush);
    res
}

/// fdatasyncs per flush-latency probe.
const FLUSH_SAMPLES: usize = 100;

const MASK_WORKLOAD: &str = "psql: 100000 rows x 5 columns, column h masked (keep_last 4) vs unmasked, one pgward, wall time";

/// One pgward whose policy masks `bench_rows.h` for everyone but group `bench_raw`: the same
/// 100k-row query with a token in that group (no mask applies: rows are not decoded) and
/// without (every row rewritten), interleaved.
fn section_mask(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path, slot: &mut Option<(Cell, Cell)>) -> Result<()> {
    step("mask: starting pgward with a [[mask]] rule on bench_rows.h");
    let policy = "\n[[mask]]\nname = \"bench-h\"\ncolumns = [\"public.bench_rows.h\"]\nstyle = \"keep_last\"\nkeep = 4\nexcept_groups = [\"bench_raw\"]\n";
    let mut gw = procs::start_pgward_with_policy(bin, work, "pgward-mask", cluster, "group", policy)?;
    let config = work.join("pgward-mask").join("pgward.toml");
    let out = Command::new(bin)
        .args(["token", "issue", "--config"])
        .arg(&config)
        .args(["--user", "bench", "--groups", "bench_raw", "--ttl", "12h"])
        .output()
        .context("pgward token issue")?;
    let raw_token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || raw_token.is_empty() {
        bail!("pgward token issue --groups bench_raw failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let masked = Target::pgward("pgward-masked", &gw);
    let mut unmasked = masked.clone();
    unmasked.name = "pgward-unmasked".into();
    unmasked.password = raw_token;
    sanity(&masked)?;
    sanity(&unmasked)?;
    // The masked session really is masked, the other one is not.
    for (t, want_masked) in [(&masked, true), (&unmasked, false)] {
        let (status, out, err) = run_limited(
            t.client("psql").args(["-X", "-At", "-d", "app", "-c", "select h from bench_rows where id = 1"]),
            Duration::from_secs(30),
        )?;
        if !status.success() || out.trim().starts_with("****") != want_masked {
            bail!("mask: {} returned {:?} for bench_rows.h (masked expected: {want_masked}) {err}", t.name, out.trim());
        }
    }
    let _ = rows_once(&masked);
    let _ = rows_once(&unmasked);
    let (u, m) = slot.insert((Cell::default(), Cell::default()));
    for _ in 0..s.cycles * s.rows_reps {
        for (t, cell) in [(&unmasked, &mut *u), (&masked, &mut *m)] {
            check_interrupted()?;
            gw.proc.check_alive()?;
            match rows_once(t) {
                Ok(v) => {
                    eprintln!("    [mask] {:<16} {v:>10.1} ms", t.name);
                    cell.samples.push(v);
                }
                Err(e) => cell.errors.push(format!("{e:#}")),
            }
        }
    }
    Ok(())
}

fn section_fsync(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path, slot: &mut Option<Table>) -> Result<()> {
    step("fsync: starting pgward with audit.fsync = always, group, off");
    let mut always = procs::start_pgward(bin, work, "pgward-fsync-always", cluster, "always")?;
    let mut group = procs::start_pgward(bin, work, "pgward-fsync-group", cluster, "group")?;
    let mut off = procs::start_pgward(bin, work, "pgward-fsync-off", cluster, "off")?;
    let targets = vec![
        Target::service("direct", cluster.port),
        Target::pgward("fsync=always", &always),
        Target::pgward("fsync=group", &group),
        Target::pgward("fsync=off", &off),
    ];
    // Latency too: with `off` it shows the relay's own cost, with `group` relay + flush.
    let workloads = [Workload::SelectSimple, Workload::Latency];
    run_interleaved(s, &workloads, &targets, &mut [&mut always.proc, &mut group.proc, &mut off.proc], "fsync", slot)
}

fn section_memory(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path) -> Result<idle::IdleReport> {
    step(&format!("memory: fresh pgward, {} idle sessions", s.idle_sessions));
    let mut gw = procs::start_pgward(bin, work, "pgward-memory", cluster, "group")?;
    let r = idle::measure(gw.proc.pid(), gw.port, "bench", &gw.token, s.idle_sessions, &interrupted)?;
    gw.proc.check_alive()?;
    step(&format!(
        "memory: RSS {} KiB -> {} KiB with {} sessions ({:.1} KiB/session), {} KiB after closing",
        r.rss_before_kib,
        r.rss_after_kib,
        r.sessions,
        r.per_session_kib(),
        r.rss_closed_kib
    ));
    Ok(r)
}

/// One measurement of `w` through `t`.
fn measure(w: Workload, t: &Target, s: &Settings) -> Result<(f64, Option<u64>)> {
    let (c, j) = (s.clients.to_string(), s.threads.to_string());
    let extra: Vec<&str> = match w {
        Workload::SelectSimple => vec!["-n", "-S", "-M", "simple", "-c", &c, "-j", &j],
        Workload::SelectExtended => vec!["-n", "-S", "-M", "extended", "-c", &c, "-j", &j],
        Workload::SelectPrepared => vec!["-n", "-S", "-M", "prepared", "-c", &c, "-j", &j],
        // The default script; pgbench vacuums the small tables and empties history first.
        Workload::Tpcb => vec!["-M", "simple", "-c", &c, "-j", &j],
        Workload::Latency => vec!["-n", "-S", "-M", "simple", "-c", "1", "-j", "1"],
        Workload::Churn => vec!["-n", "-S", "-C", "-M", "simple", "-c", &c, "-j", &j],
        Workload::Rows => return rows_once(t).map(|v| (v, None)),
    };
    let r = pgbench(t, s, &extra)?;
    let v = match w {
        Workload::Latency => r.latency_ms.map(|ms| ms * 1000.0).context("pgbench printed no latency average")?,
        _ => r.tps,
    };
    Ok((v, r.transactions))
}

struct PgbenchResult {
    tps: f64,
    latency_ms: Option<f64>,
    transactions: Option<u64>,
}

fn pgbench(t: &Target, s: &Settings, extra: &[&str]) -> Result<PgbenchResult> {
    let mut cmd = t.client("pgbench");
    cmd.args(extra).args(["-T", &s.duration.to_string(), "app"]);
    let (status, out, err) = run_limited(&mut cmd, Duration::from_secs(u64::from(s.duration) + 120))?;
    if !status.success() {
        bail!("pgbench {} failed ({status}): {}", extra.join(" "), last_lines(&format!("{out}{err}"), 6));
    }
    parse_pgbench(&out).with_context(|| format!("unexpected pgbench output: {}", last_lines(&out, 6)))
}

fn parse_pgbench(out: &str) -> Result<PgbenchResult> {
    let num = |prefix: &str| -> Option<f64> {
        out.lines().find_map(|l| l.trim().strip_prefix(prefix)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
    };
    let tps = num("tps = ").context("no `tps = ` line")?;
    let failed = num("number of failed transactions: ").unwrap_or(0.0);
    if failed > 0.0 {
        bail!("{failed} failed transactions");
    }
    let transactions = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok());
    Ok(PgbenchResult { tps, latency_ms: num("latency average = "), transactions })
}

/// Wall time (ms) of psql fetching the 100k-row × 5-column table to /dev/null.
fn rows_once(t: &Target) -> Result<f64> {
    let mut cmd = t.client("psql");
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "app", "-c", "select id, n, h, ts, label from bench_rows"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
    let start = Instant::now();
    let out = cmd.output().context("running psql")?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!("psql failed ({}): {}", out.status, last_lines(&String::from_utf8_lossy(&out.stderr), 4));
    }
    Ok(ms)
}

/// Run to completion with stdout/stderr captured, killing the child after `limit`.
fn run_limited(cmd: &mut Command, limit: Duration) -> Result<(ExitStatus, String, String)> {
    let tmp = std::env::temp_dir();
    let id = format!("pgward-bench-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let (out_p, err_p) = (tmp.join(format!("{id}.out")), tmp.join(format!("{id}.err")));
    let r = (|| {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_p)?)
            .stderr(std::fs::File::create(&err_p)?)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{:?} did not finish within {} s", cmd.get_program(), limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = std::fs::read_to_string(&out_p).unwrap_or_default();
        let err = std::fs::read_to_string(&err_p).unwrap_or_default();
        Ok((status, out, err))
    })();
    let _ = std::fs::remove_file(&out_p);
    let _ = std::fs::remove_file(&err_p);
    r
}
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

// ---------------------------------------------------------------------------------- report

#[derive(Default)]
struct Report {
    main: Option<Table>,
    fsync: Option<Table>,
    memory: Option<idle::IdleReport>,
    ebpf: Option<ebpf::Outcome>,
    callgrind: Option<callgrind::Report>,
    micro: Option<Vec<micro::TestRun>>,
    /// (unmasked, masked) samples of the 100k-row psql run, ms.
    mask: Option<(Cell, Cell)>,
    /// The work directory's flush latency (where pgward's audit log lives), before and after
    /// the main section.
    flush: Vec<(&'static str, disk::Flush)>,
}

/// One budget line.
struct Check {
    name: String,
    pass: Option<bool>,
    detail: String,
}

const LATENCY_BUDGET_US: f64 = 60.0;
const ROWS_BUDGET_RATIO: f64 = 1.15;
const IDLE_BUDGET_KIB: f64 = 64.0;

impl Report {
    fn errors(&self) -> usize {
        self.main.as_ref().map_or(0, Table::errors)
            + self.fsync.as_ref().map_or(0, Table::errors)
            + self.mask.as_ref().map_or(0, |(a, b)| a.errors.len() + b.errors.len())
            + match &self.ebpf {
                Some(ebpf::Outcome::Measured(t)) => t.errors(),
                _ => 0,
            }
            + self.callgrind.as_ref().map_or(0, callgrind::Report::errors)
            + self.micro.as_ref().map_or(0, |v| v.iter().filter(|r| r.error.is_some()).count())
    }

    fn budget(&self) -> Vec<Check> {
        let mut v = Vec::new();
        if let Some(t) = &self.main {
            for w in [Workload::SelectSimple, Workload::SelectExtended, Workload::SelectPrepared] {
                for other in ["splice", "pgbouncer"] {
                    v.push(at_least(t, w, "pgward", other));
                }
            }
            let lat = match (t.median(Workload::Latency, "pgward"), t.median(Workload::Latency, "direct")) {
                (Some(p), Some(d)) => Check {
                    name: format!("latency-1c: pgward ≤ direct + {LATENCY_BUDGET_US:.0} µs"),
                    pass: Some(p - d <= LATENCY_BUDGET_US),
                    detail: format!("{:+.1} µs ({p:.1} vs {d:.1} µs)", p - d),
                },
                _ => missing(format!("latency-1c: pgward ≤ direct + {LATENCY_BUDGET_US:.0} µs")),
            };
            v.push(lat);
            let name = format!("rows-100k: pgward ≤ {ROWS_BUDGET_RATIO:.2}× direct");
            v.push(match (t.ratio(Workload::Rows, "pgward"), t.median(Workload::Rows, "pgward"), t.median(Workload::Rows, "direct")) {
                (Some(r), Some(p), Some(d)) => {
                    Check { name, pass: Some(r <= ROWS_BUDGET_RATIO), detail: format!("{r:.3}× ({p:.1} vs {d:.1} ms)") }
                }
                _ => missing(name),
            });
            v.push(at_least(t, Workload::Churn, "pgward", "pgbouncer"));
        }
        if let Some(m) = &self.memory {
            let per = m.per_session_kib();
            v.push(Check {
                name: format!("memory: pgward ≤ {IDLE_BUDGET_KIB:.0} KiB per idle session"),
                pass: Some(per <= IDLE_BUDGET_KIB),
                detail: format!("{per:.1} KiB/session ({} sessions)", m.sessions),
            });
        }
        v
    }

    fn render(&self, s: &Settings) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\npgward bench{}: medians of {} cycle(s), pgbench -T {} s, {} clients / {} threads, scale {}, {} psql run(s) per cycle",
            if s.quick { " (--quick)" } else { "" },
            s.cycles,
            s.duration,
            s.clients,
            s.threads,
            s.scale,
            s.rows_reps
        );
        if let Some(t) = &self.main {
            let _ = writeln!(o, "\n== main: value (ratio to direct) ==");
            render_table(&mut o, t);
            render_cpu(&mut o, t);
            let _ = writeln!(o, "\nworkloads:");
            for w in &t.workloads {
                let _ = writeln!(o, "  {:<16} {}", w.name(), w.describe(s));
            }
            self.render_flush(&mut o, t, s);
        }
        if let Some(t) = &self.fsync {
            let _ = writeln!(o, "\n== fsync: pgward audit.fsync policy on pgbench -S simple and single-client latency (ratio to direct) ==");
            render_table(&mut o, t);
            render_cpu(&mut o, t);
            if let (Some(a), Some(g), Some(f)) = (
                t.median(Workload::SelectSimple, "fsync=always"),
                t.median(Workload::SelectSimple, "fsync=group"),
                t.median(Workload::SelectSimple, "fsync=off"),
            ) {
                let _ = writeln!(o, "  group vs off: {:.3}×, always vs off: {:.3}×", g / f, a / f);
            }
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(o, "\n== memory: pgward RSS with {} idle sessions ==", m.sessions);
            let _ = writeln!(
                o,
                "  VmRSS before {} KiB, with sessions {} KiB, after closing {} KiB\n  per session: {:.1} KiB (VmRSS), {:.1} KiB (RssAnon); {} logins in {:.1} s",
                m.rss_before_kib,
                m.rss_after_kib,
                m.rss_closed_kib,
                m.per_session_kib(),
                m.anon_per_session_kib(),
                m.sessions,
                m.login_secs
            );
        }
        match &self.ebpf {
            Some(ebpf::Outcome::Skipped(why)) => {
                let _ = writeln!(o, "\n== ebpf: eBPF redirect vs connecting to pgward's port ==\n  skipped: {why}");
            }
            Some(ebpf::Outcome::Measured(t)) => {
                let _ = writeln!(
                    o,
                    "\n== ebpf: eBPF redirect vs connecting to pgward's port (pgward audit fsync = {}; ratio to {}) ==",
                    ebpf::FSYNC,
                    ebpf::DIRECT
                );
                render_table(&mut o, t);
                for (name, what) in ebpf::TARGETS {
                    let _ = writeln!(o, "  {name:<18} {what}");
                }
                for &w in &ebpf::WORKLOADS {
                    match t.ratio(w, ebpf::REDIRECTED) {
                        Some(r) => {
                            let what = if w.higher_is_better() { "throughput" } else { "time" };
                            let _ = writeln!(o, "  {:<16} redirected / pgward-port (b/a): {r:.3}× ({what}; {})", w.name(), w.describe(s));
                        }
                        None => {
                            let _ = writeln!(o, "  {:<16} redirected / pgward-port (b/a): not measured", w.name());
                        }
                    }
                }
            }
            None => {}
        }
        if let Some((u, m)) = &self.mask {
            let _ = writeln!(o, "\n== mask: {} ==", MASK_WORKLOAD);
            match (u.median(), m.median()) {
                (Some(a), Some(b)) => {
                    let _ = writeln!(o, "  unmasked {a:.1} ms, masked {b:.1} ms: {:.3}× ({} run(s) each)", b / a, m.samples.len());
                }
                _ => {
                    let _ = writeln!(o, "  not measured ({} error(s))", u.errors.len() + m.errors.len());
                }
            }
        }
        if let Some(c) = &self.callgrind {
            c.render(&mut o);
        }
        if let Some(runs) = &self.micro {
            let _ = writeln!(o, "\n== micro: gateway-user micro-benchmarks (#[ignore] tests, release build) ==");
            for r in runs {
                let _ = writeln!(o, "  {} ({:.1} s){}", r.test, r.secs, if r.error.is_some() { ": ERROR" } else { "" });
                for l in &r.lines {
                    let _ = writeln!(o, "    {l}");
                }
                if let Some(e) = &r.error {
                    let _ = writeln!(o, "    error: {e}");
                }
            }
        }
        let checks = self.budget();
        if !checks.is_empty() {
            let _ = writeln!(o, "\n== budget ==");
            let wn = checks.iter().map(|c| c.name.chars().count()).max().unwrap_or(0);
            for c in &checks {
                let verdict = match c.pass {
                    Some(true) => "PASS",
                    Some(false) => "FAIL",
                    None => "N/A ",
                };
                let pad = wn - c.name.chars().count();
                let _ = writeln!(o, "  {verdict}  {}{}  {}", c.name, " ".repeat(pad), c.detail);
            }
        }
        o
    }

    /// The measured flush latency and what it allows pgward with `fsync = group`.
    fn render_flush(&self, o: &mut String, t: &Table, s: &Settings) {
        use std::fmt::Write as _;
        if self.flush.is_empty() {
            return;
        }
        let how = if self.flush.iter().all(|(_, f)| f.direct) { "O_DIRECT" } else { "page cache (O_DIRECT refused)" };
        let _ = writeln!(
            o,
            "\naudit disk flush latency (one ~1.2 KB batch as pgward writes it: in place, 4 KiB blocks, {how}, + fdatasync; {FLUSH_SAMPLES} samples):"
        );
        for (label, f) in &self.flush {
            let _ = writeln!(o, "  {label:<7} p50 {:>7.0} µs   p90 {:>7.0} µs", f.p50_us, f.p90_us);
        }
        let p50 = self.flush.iter().map(|(_, f)| f.p50_us).sum::<f64>() / self.flush.len() as f64;
        let _ = writeln!(
            o,
            "  write-ahead audit: every statement waits ~one flush, so with fsync = group pgward's single-client\n  \
             latency is ≥ direct + {p50:.0} µs, and {} closed-loop clients can reach at most:",
            s.clients
        );
        for w in [Workload::SelectSimple, Workload::SelectExtended, Workload::SelectPrepared, Workload::Tpcb] {
            if let Some(d) = t.median(w, "direct") {
                let c = disk::group_ceiling_tps(s.clients, d, p50);
                // Against PgBouncer: below 1.0 even a proxy that added nothing but the flush
                // would lose to it in this run.
                let vs_pgb = t.median(w, "pgbouncer").map(|b| format!(", {:.2}× PgBouncer", c / b)).unwrap_or_default();
                let _ = writeln!(o, "    {:<16} {:>8.0} tps ({:.2}× direct{vs_pgb})", w.name(), c, c / d);
            }
        }
    }

    fn json(&self, s: &Settings, sections: &[Section], iso: &str, secs: f64) -> Value {
        let table_json = |t: &Table| -> Value {
            // main and fsync: ratios to direct Postgres; ebpf: to its own baseline target.
            let ratio_key = if t.baseline() == "direct" { "ratio_to_direct" } else { "ratio_to_baseline" };
            let workloads: Vec<Value> = t
                .workloads
                .iter()
                .map(|&w| {
                    let mut results = serde_json::Map::new();
                    for name in &t.targets {
                        let cell = t.cell(w, name).cloned().unwrap_or_default();
                        results.insert(
                            name.clone(),
                            json!({
                                "median": cell.median(),
                                "cpu_us_per_txn": median(&cell.cpu_us),
                                "cpu_us_per_txn_samples": cell.cpu_us,
                                ratio_key: t.ratio(w, name),
                                "relative_performance": t.relative(w, name),
                                "samples": cell.samples,
                                "errors": cell.errors,
                            }),
                        );
                    }
                    json!({
                        "name": w.name(),
                        "unit": w.unit(),
                        "better": if w.higher_is_better() { "higher" } else { "lower" },
                        "command": w.describe(s),
                        "results": results,
                    })
                })
                .collect();
            json!({ "targets": t.targets, "workloads": workloads })
        };
        let budget: Vec<Value> =
            self.budget().iter().map(|c| json!({ "check": c.name, "pass": c.pass, "detail": c.detail })).collect();
        json!({
            "timestamp": iso,
            "duration_secs": secs,
            "quick": s.quick,
            "sections": sections.iter().map(|x| format!("{x:?}").to_lowercase()).collect::<Vec<_>>(),
            "settings": {
                "pgbench_seconds": s.duration,
                "cycles": s.cycles,
                "clients": s.clients,
                "threads": s.threads,
                "scale": s.scale,
                "rows_reps_per_cycle": s.rows_reps,
                "idle_sessions": s.idle_sessions,
            },
            "machine": {
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
                "cpuidle": cpuidle(),
            },
            "flush_latency": self.flush.iter().map(|(label, f)| json!({
                "when": label, "p50_us": f.p50_us, "p90_us": f.p90_us, "samples": f.samples, "direct": f.direct,
            })).collect::<Vec<_>>(),
            "main": self.main.as_ref().map(table_json),
            "fsync": self.fsync.as_ref().map(table_json),
            "memory": self.memory.as_ref().map(|m| json!({
                "sessions": m.sessions,
                "rss_before_kib": m.rss_before_kib,
                "rss_after_kib": m.rss_after_kib,
                "rss_after_close_kib": m.rss_closed_kib,
                "rss_anon_before_kib": m.anon_before_kib,
                "rss_anon_after_kib": m.anon_after_kib,
                "kib_per_session": m.per_session_kib(),
                "anon_kib_per_session": m.anon_per_session_kib(),
                "login_secs": m.login_secs,
            })),
            "mask": self.mask.as_ref().map(|(u, m)| json!({
                "workload": MASK_WORKLOAD,
                "unmasked_ms": { "median": u.median(), "samples": u.samples, "errors": u.errors },
                "masked_ms": { "median": m.median(), "samples": m.samples, "errors": m.errors },
                "ratio": match (u.median(), m.median()) { (Some(a), Some(b)) => Some(b / a), _ => None },
            })),
            "ebpf": match &self.ebpf {
                None => Value::Null,
                Some(ebpf::Outcome::Skipped(why)) => json!({ "status": "skipped", "reason": why }),
                Some(ebpf::Outcome::Measured(t)) => {
                    let mut v = table_json(t);
                    v["status"] = json!("measured");
                    v["baseline"] = json!(ebpf::DIRECT);
                    v["pgward_fsync"] = json!(ebpf::FSYNC);
                    v["targets_described"] =
                        ebpf::TARGETS.iter().map(|(n, w)| (n.to_string(), json!(w))).collect::<serde_json::Map<_, _>>().into();
                    v["redirect_ratio"] = ebpf::WORKLOADS
                        .iter()
                        .map(|&w| (w.name().to_string(), json!(t.ratio(w, ebpf::REDIRECTED))))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                    v
                }
            },
            "callgrind": self.callgrind.as_ref().map(callgrind::Report::json),
            "micro": self.micro.as_ref().map(|v| v.iter().map(micro::TestRun::json).collect::<Vec<_>>()),
            "budget": budget,
        })
    }

}

/// Draw the PNG from a report's JSON (so `--replot` can redraw a saved run); Ok(false) when
/// it has nothing to draw.
fn chart_from_json(v: &Value, path: &Path) -> Result<bool> {
    let panel = |section: &str, title: &str| -> Option<chart::Panel> {
        let t = v.get(section)?.as_object()?;
        let series: Vec<String> =
            t.get("targets")?.as_array()?.iter().filter_map(|x| x.as_str()).filter(|n| *n != "direct").map(String::from).collect();
        let groups = t
            .get("workloads")?
            .as_array()?
            .iter()
            .map(|w| {
                let unit = w["unit"].as_str().unwrap_or("");
                chart::Group {
                    label: w["name"].as_str().unwrap_or("?").to_string(),
                    sublabel: if w["better"] == "lower" { format!("{unit}, inverted") } else { unit.to_string() },
                    values: series.iter().map(|n| w["results"][n]["relative_performance"].as_f64()).collect(),
                }
            })
            .collect();
        Some(chart::Panel { title: title.into(), series, groups })
    };
    let panels: Vec<chart::Panel> = [
        panel("main", "direct vs PgBouncer (session) vs splice proxy vs pgward (audit fsync = group)"),
        panel("fsync", "pgward audit fsync policy (pgbench -S simple; single-client latency)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if panels.is_empty() {
        return Ok(false);
    }
    let st = &v["settings"];
    let mut line1 = format!(
        "{}{}  ·  medians of {} cycle(s), {} s per pgbench run, {} clients",
        v["timestamp"].as_str().unwrap_or("?"),
        if v["quick"] == true { " (quick)" } else { "" },
        st["cycles"],
        st["pgbench_seconds"],
        st["clients"],
    );
    if let Some(k) = v["memory"]["kib_per_session"].as_f64() {
        line1.push_str(&format!("  ·  idle session: {k:.1} KiB"));
    }
    if let Some(b) = v["budget"].as_array().filter(|b| !b.is_empty()) {
        let count = |p: &Value| b.iter().filter(|c| &c["pass"] == p).count();
        line1.push_str(&format!("  ·  budget: {} PASS, {} FAIL", count(&json!(true)), count(&json!(false))));
    }
    let subtitle = [
        line1,
        "bar = performance relative to direct Postgres (1.0): throughput as target / direct, times (µs, ms) as direct / target; higher is better".to_string(),
    ];
    chart::draw(path, "pgward bench", &subtitle, &panels)?;
    Ok(true)
}

fn at_least(t: &Table, w: Workload, a: &str, b: &str) -> Check {
    let name = format!("{}: {a} ≥ {b}", w.name());
    match (t.median(w, a), t.median(w, b)) {
        (Some(x), Some(y)) => Check { name, pass: Some(x >= y), detail: format!("{:.3}× ({x:.0} vs {y:.0} {})", x / y, w.unit()) },
        _ => missing(name),
    }
}

fn missing(name: String) -> Check {
    Check { name, pass: None, detail: "not measured".into() }
}

fn render_table(o: &mut String, t: &Table) {
    use std::fmt::Write as _;
    let cw = 22;
    let _ = write!(o, "{:<16} {:<5}", "workload", "unit");
    for name in &t.targets {
        let _ = write!(o, " {name:>cw$}");
    }
    o.push('\n');
    for &w in &t.workloads {
        let _ = write!(o, "{:<16} {:<5}", w.name(), w.unit());
        for name in &t.targets {
            let cellstr = match (t.median(w, name), t.ratio(w, name)) {
                (Some(v), _) if name == t.baseline() => fmt_value(v),
                (Some(v), Some(r)) => format!("{} ({r:.2}×)", fmt_value(v)),
                (Some(v), None) => fmt_value(v),
                (None, _) if t.cell(w, name).is_some_and(|c| !c.errors.is_empty()) => "ERROR".to_string(),
                (None, _) => "-".to_string(),
            };
            let _ = write!(o, " {cellstr:>cw$}");
        }
        o.push('\n');
    }
}

/// The proxies' CPU time per transaction (medians), for the targets and workloads that have it.
fn render_cpu(o: &mut String, t: &Table) {
    use std::fmt::Write as _;
    let has = |ti: usize| t.cells.iter().any(|(&(_, i), c)| i == ti && !c.cpu_us.is_empty());
    let cols: Vec<usize> = (0..t.targets.len()).filter(|&i| has(i)).collect();
    if cols.is_empty() {
        return;
    }
    let cw = 22;
    let _ = writeln!(o, "proxy CPU per transaction, µs (user+system of the process over each pgbench run / transactions):");
    let _ = write!(o, "{:<16} {:<5}", "workload", "");
    for &i in &cols {
        let _ = write!(o, " {:>cw$}", t.targets[i]);
    }
    o.push('\n');
    for (wi, &w) in t.workloads.iter().enumerate() {
        let cells: Vec<Option<f64>> = cols.iter().map(|&i| t.cells.get(&(wi, i)).and_then(|c| median(&c.cpu_us))).collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        let _ = write!(o, "{:<16} {:<5}", w.name(), "µs");
        for c in cells {
            let _ = write!(o, " {:>cw$}", c.map_or_else(|| "-".to_string(), |v| format!("{v:.1}")));
        }
        o.push('\n');
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 1000.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// How idle CPUs wait: cpuidle driver and governor, and for the guest `haltpoll` driver how long
/// an idle vCPU polls before halting (0: it halts at once, so every wakeup of an idle CPU costs a
/// VM exit and re-entry — on this project's Firecracker VMs ~30 µs, which dominates loopback
/// latencies; see README "Performance").
fn cpuidle() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    json!({
        "driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "governor": read("/sys/devices/system/cpu/cpuidle/current_governor_ro")
            .or_else(|| read("/sys/devices/system/cpu/cpuidle/current_governor")),
        "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").and_then(|v| v.parse::<u64>().ok()),
    })
}

/// One line about `cpuidle()` for the report, when it says something.
fn cpuidle_line(v: &serde_json::Value) -> Option<String> {
    let driver = v["driver"].as_str()?;
    Some(match v["guest_halt_poll_ns"].as_u64() {
        Some(0) => format!(
            "cpuidle: {driver}, guest_halt_poll_ns = 0 (an idle vCPU halts at once: every wakeup pays a VM exit, which dominates loopback latency)"
        ),
        Some(ns) => format!("cpuidle: {driver}, guest_halt_poll_ns = {ns}"),
        None => format!("cpuidle: {driver}"),
    })
}

/// The 1-minute load average.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// ("20260901T120000Z", "2026-09-01T12:00:00Z") for now, in UTC.
fn utc_stamp() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z"), format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuidle_line_names_a_halting_guest() {
        let halting = json!({"driver": "haltpoll", "governor": "haltpoll", "guest_halt_poll_ns": 0});
        let line = cpuidle_line(&halting).expect("a line");
        assert!(line.contains("guest_halt_poll_ns = 0") && line.contains("halts at once"), "{line}");
        let polling = json!({"driver": "haltpoll", "guest_halt_poll_ns": 200000});
        assert_eq!(cpuidle_line(&polling).as_deref(), Some("cpuidle: haltpoll, guest_halt_poll_ns = 200000"));
        assert_eq!(cpuidle_line(&json!({"driver": "intel_idle", "guest_halt_poll_ns": null})).as_deref(), Some("cpuidle: intel_idle"));
        assert_eq!(cpuidle_line(&json!({"driver": null})), None);
    }

    #[test]
    fn parses_pgbench_output() {
        let out = "transaction type: <builtin: select only>\nnumber of failed transactions: 0 (0.000%)\n\
                   latency average = 0.412 ms\ninitial connection time = 3.1 ms\n\
                   tps = 19402.123456 (without initial connection time)\n";
        let r = parse_pgbench(out).unwrap();
        assert!((r.tps - 19402.123456).abs() < 1e-6);
        assert_eq!(r.latency_ms, Some(0.412));
        assert_eq!(r.transactions, None);
        let r = parse_pgbench("number of transactions actually processed: 228393\ntps = 22839.1 (x)\n").unwrap();
        assert_eq!(r.transactions, Some(228393));
        let r = parse_pgbench("number of transactions actually processed: 2000/2000\ntps = 900.0 (x)\n").unwrap();
        assert_eq!(r.transactions, Some(2000));
        assert!(parse_pgbench("number of failed transactions: 3 (0.1%)\ntps = 5 (x)\n").is_err());
        assert!(parse_pgbench("nothing").is_err());
    }

    #[test]
    fn reads_a_process_cpu_time() {
        let before = process_cpu_secs(std::process::id()).expect("own /proc stat");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let after = process_cpu_secs(std::process::id()).expect("own /proc stat");
        assert!(after - before >= 0.03, "a 60 ms busy loop shows as CPU time: {before} -> {after}");
        assert_eq!(process_cpu_secs(u32::MAX), None);
    }

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn utc_stamp_shape() {
        let (a, b) = utc_stamp();
        assert_eq!(a.len(), 16);
        assert_eq!(b.len(), 20);
        assert!(a.starts_with("20") && b.ends_with('Z'));
    }

    #[test]
    fn relative_inverts_times() {
        let targets = [Target::service("direct", 1), Target::service("pgward", 2)];
        let mut t = Table::new(&[Workload::SelectSimple, Workload::Rows], &targets);
        t.cells.insert((0, 0), Cell { samples: vec![100.0], ..Cell::default() });
        t.cells.insert((0, 1), Cell { samples: vec![80.0], ..Cell::default() });
        t.cells.insert((1, 0), Cell { samples: vec![100.0], ..Cell::default() });
        t.cells.insert((1, 1), Cell { samples: vec![125.0], ..Cell::default() });
        assert_eq!(t.relative(Workload::SelectSimple, "pgward"), Some(0.8));
        assert_eq!(t.ratio(Workload::Rows, "pgward"), Some(1.25));
        assert_eq!(t.relative(Workload::Rows, "pgward"), Some(0.8));
    }

    #[test]
    fn flush_ceiling_is_compared_with_pgbouncer() {
        let targets = [Target::service("direct", 1), Target::service("pgbouncer", 2), Target::service("pgward", 3)];
        let mut t = Table::new(&[Workload::SelectSimple, Workload::SelectExtended], &targets);
        t.cells.insert((0, 0), Cell { samples: vec![40000.0], ..Cell::default() });
        t.cells.insert((0, 1), Cell { samples: vec![20000.0], ..Cell::default() });
        t.cells.insert((1, 0), Cell { samples: vec![40000.0], ..Cell::default() });
        let r = Report {
            flush: vec![("before", disk::Flush { p50_us: 100.0, p90_us: 120.0, samples: 100, direct: true })],
            ..Report::default()
        };
        let s = Settings {
            quick: false,
            duration: 10,
            cycles: 3,
            clients: 8,
            threads: 2,
            scale: 10,
            rows_reps: 5,
            warmup: 3,
            idle_sessions: 500,
        };
        let mut o = String::new();
        r.render_flush(&mut o, &t, &s);
        // 8 / (8/40000 s + 100 µs) = 8 / 300 µs: 0.67× direct, 1.33× PgBouncer's 20000.
        assert!(o.contains("select-simple       26667 tps (0.67× direct, 1.33× PgBouncer)\n"), "{o}");
        // No PgBouncer figure: the ratio to direct only.
        assert!(o.contains("select-extended     26667 tps (0.67× direct)\n"), "{o}");
    }

    #[test]
    fn cpu_table_lists_only_targets_with_cpu_samples() {
        let targets = [Target::service("direct", 1), Target::service("pgward", 2)];
        let mut t = Table::new(&[Workload::SelectSimple, Workload::Rows], &targets);
        t.cells.insert((0, 0), Cell { samples: vec![100.0], ..Cell::default() });
        t.cells.insert((0, 1), Cell { samples: vec![80.0], cpu_us: vec![31.0, 29.0, 40.0], ..Cell::default() });
        t.cells.insert((1, 1), Cell { samples: vec![125.0], ..Cell::default() });
        let mut o = String::new();
        render_cpu(&mut o, &t);
        let lines: Vec<&str> = o.lines().collect();
        assert_eq!(lines.len(), 3, "{o}");
        assert!(lines[1].trim_end().ends_with("pgward") && !lines[1].contains("direct"), "{o}");
        assert!(lines[2].starts_with("select-simple") && lines[2].trim_end().ends_with("31.0"), "{o}");
        let mut none = String::new();
        render_cpu(&mut none, &Table::new(&[Workload::SelectSimple], &targets));
        assert!(none.is_empty());
    }

    #[test]
    fn sample_chart_draws() {
        let dir = std::env::temp_dir().join(format!("pgward-chart-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sample.png");
        match chart::sample(&p) {
            Ok(()) => assert!(std::fs::metadata(&p).unwrap().len() > 1000),
            // No TrueType font on this machine: nothing to check.
            Err(e) if format!("{e:#}").contains("no TrueType font") => {}
            Err(e) => panic!("{e:#}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
