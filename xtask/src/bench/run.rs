//! Driving the benchmark: the targets and workloads, the interleaved runs of every workload
//! on every target, the sections that measure pgward alone, and the client commands (pgbench,
//! psql) they run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::procs::{self, Pgward, Proc, WorkDir};
use super::{Binaries, Settings, check_interrupted, disk, idle, interrupted};
use crate::pg::{self, Cluster};
use crate::util::step;

/// Something pgbench and psql connect to.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) password: String,
    /// Run the client inside this cgroup v2 (it moves itself there before it execs).
    pub(super) cgroup: Option<PathBuf>,
    /// The proxy process behind the port: its CPU time per transaction is measured too.
    pub(super) pid: Option<u32>,
}

impl Target {
    pub(super) fn service(name: &str, port: u16) -> Target {
        Target {
            name: name.into(),
            port,
            user: pg::SERVICE_USER.into(),
            password: pg::SERVICE_PASSWORD.into(),
            cgroup: None,
            pid: None,
        }
    }
    pub(super) fn pgward(name: &str, gw: &Pgward) -> Target {
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
    pub(super) fn charged(mut self, pid: u32) -> Target {
        self.pid = Some(pid);
        self
    }

    /// A libpq client command (pgbench, psql) aimed at this target.
    pub(super) fn client(&self, prog: &str) -> Command {
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
pub(super) enum Workload {
    SelectSimple,
    SelectExtended,
    SelectPrepared,
    Tpcb,
    Latency,
    Churn,
    Rows,
}

pub(super) const MAIN_WORKLOADS: [Workload; 7] = [
    Workload::SelectSimple,
    Workload::SelectExtended,
    Workload::SelectPrepared,
    Workload::Tpcb,
    Workload::Latency,
    Workload::Churn,
    Workload::Rows,
];

impl Workload {
    pub(super) fn name(self) -> &'static str {
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
    pub(super) fn unit(self) -> &'static str {
        match self {
            Workload::Latency => "µs",
            Workload::Rows => "ms",
            _ => "tps",
        }
    }
    /// SQL statements per transaction (pgbench's) or per run (psql's): what the proxies' CPU
    /// per transaction is divided by for their CPU per statement. TPC-B is pgbench's built-in
    /// script: BEGIN, three UPDATEs, a SELECT, an INSERT, END.
    pub(super) fn statements_per_txn(self) -> u32 {
        match self {
            Workload::Tpcb => TPCB_STATEMENTS,
            _ => 1,
        }
    }
    pub(super) fn higher_is_better(self) -> bool {
        !matches!(self, Workload::Latency | Workload::Rows)
    }
    pub(super) fn describe(self, s: &Settings) -> String {
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

/// Statements in one transaction of pgbench's built-in TPC-B-like script.
pub(super) const TPCB_STATEMENTS: u32 = 7;

/// Samples of one (workload, target) cell.
#[derive(Default, Clone)]
pub(super) struct Cell {
    pub(super) samples: Vec<f64>,
    pub(super) errors: Vec<String>,
    /// CPU time of the target's proxy process per transaction (µs), per run (per psql run for
    /// the 100k-row result).
    pub(super) cpu_us: Vec<f64>,
    /// Context switches of the proxy's threads per transaction, per run: how often it slept
    /// and was woken (or was preempted) for each transaction.
    pub(super) switches: Vec<f64>,
}

impl Cell {
    pub(super) fn median(&self) -> Option<f64> {
        median(&self.samples)
    }
}

/// CPU time of process `pid` (all its threads, exited ones included), in seconds: the
/// kernel's process CPU clock (nanoseconds, so a single 100 ms psql run is measured too), or
/// where that cannot be read /proc's user + system time (10 ms ticks).
pub(super) fn process_cpu_secs(pid: u32) -> Option<f64> {
    process_clock_secs(pid).or_else(|| proc_stat_cpu_secs(pid))
}

/// The process CPU clock of `pid` (`clock_getcpuclockid`), in seconds.
pub(super) fn process_clock_secs(pid: u32) -> Option<f64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: both calls write only to the locals they are given.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9)
}

/// Context switches (voluntary + involuntary) of process `pid`'s live threads, from
/// /proc/<pid>/task/*/status.
pub(super) fn process_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) =
                line.strip_prefix("voluntary_ctxt_switches:").or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some(total)
}

/// User + system CPU time of process `pid` from /proc/<pid>/stat, in seconds.
pub(super) fn proc_stat_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // In clock ticks of USER_HZ, which Linux fixes at 100 for userspace (sysconf(_SC_CLK_TCK)).
    Some((utime + stime) / 100.0)
}

pub(super) fn median(v: &[f64]) -> Option<f64> {
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
pub(super) struct Table {
    pub(super) workloads: Vec<Workload>,
    pub(super) targets: Vec<String>,
    pub(super) cells: BTreeMap<(usize, usize), Cell>,
}

impl Table {
    pub(super) fn new(workloads: &[Workload], targets: &[Target]) -> Table {
        Table { workloads: workloads.to_vec(), targets: targets.iter().map(|t| t.name.clone()).collect(), cells: BTreeMap::new() }
    }
    pub(super) fn cell(&self, w: Workload, target: &str) -> Option<&Cell> {
        let wi = self.workloads.iter().position(|x| *x == w)?;
        let ti = self.targets.iter().position(|x| x == target)?;
        self.cells.get(&(wi, ti))
    }
    pub(super) fn median(&self, w: Workload, target: &str) -> Option<f64> {
        self.cell(w, target).and_then(Cell::median)
    }
    pub(super) fn baseline(&self) -> &str {
        self.targets.first().map_or("direct", String::as_str)
    }
    /// value / baseline (direct)
    pub(super) fn ratio(&self, w: Workload, target: &str) -> Option<f64> {
        Some(self.median(w, target)? / self.median(w, self.baseline())?)
    }
    /// Performance relative to direct: higher is better for every workload.
    pub(super) fn relative(&self, w: Workload, target: &str) -> Option<f64> {
        let r = self.ratio(w, target)?;
        Some(if w.higher_is_better() { r } else { 1.0 / r })
    }
    pub(super) fn errors(&self) -> usize {
        self.cells.values().map(|c| c.errors.len()).sum()
    }
    /// Median CPU time (µs) of `target`'s proxy process per SQL statement of `w`.
    pub(super) fn cpu_per_statement(&self, w: Workload, target: &str) -> Option<f64> {
        median(&self.cell(w, target)?.cpu_us).map(|us| us / f64::from(w.statements_per_txn()))
    }
    /// Median context switches of `target`'s proxy process per SQL statement of `w`.
    pub(super) fn switches_per_statement(&self, w: Workload, target: &str) -> Option<f64> {
        median(&self.cell(w, target)?.switches).map(|n| n / f64::from(w.statements_per_txn()))
    }
}

/// pgbench -i as the service user (so pgward's upstream role owns the tables) and the table
/// the 100k-row query reads.
pub(super) fn prepare_data(cluster: &Cluster, s: &Settings) -> Result<()> {
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
pub(super) fn sanity(t: &Target) -> Result<()> {
    let (status, out, err) = run_limited(
        t.client("psql").args(["-X", "-At", "-d", "app", "-c", "select count(*) from pgbench_branches"]),
        Duration::from_secs(30),
    )?;
    if !status.success() {
        bail!("psql through {} (port {}) failed ({status}): {}{}", t.name, t.port, out.trim(), err.trim());
    }
    Ok(())
}

pub(super) fn warm(t: &Target, s: &Settings) {
    let _ = run_limited(
        t.client("pgbench").args(["-n", "-S", "-c", &s.clients.to_string(), "-j", &s.threads.to_string(), "-T", &s.warmup.to_string(), "app"]),
        Duration::from_secs(60),
    );
}

/// Write back what the last run left dirty (pgaudit's log, Postgres's WAL and data, pgward's
/// audit segments) before the next run starts: otherwise the kernel writes it back during
/// the next target's run, and on a disk with a volatile write cache every fdatasync there
/// (pgward's audit flush, a commit's WAL flush) waits for those writes too.
fn settle_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Run every workload on every target, interleaved: for each cycle, for each workload, each
/// target in order. Samples go into `slot` as they come, so an interrupted run keeps them.
pub(super) fn run_interleaved(
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
                    let switches_before = t.pid.and_then(process_switches);
                    let r = measure(w, t, s);
                    let cpu = cpu_before.zip(t.pid.and_then(process_cpu_secs)).map(|(a, b)| b - a);
                    let switches =
                        switches_before.zip(t.pid.and_then(process_switches)).map(|(a, b)| b.saturating_sub(a));
                    settle_disk();
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
                            cell.switches
                                .extend(switches.zip(txns.filter(|&n| n > 0)).map(|(c, n)| c as f64 / n as f64));
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

/// The main section: every workload on direct, direct+pgaudit (when `audited` runs), PgBouncer,
/// the splice proxy and pgward, interleaved; the audit disk's flush latency before and after.
pub(super) fn section_main(
    s: &Settings,
    work: &WorkDir,
    cluster: &Cluster,
    audited: Option<&Target>,
    bins: &Binaries,
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
    let (mut splice, splice_port) = procs::start_splice(&bins.splice, work, cluster)?;
    let mut gw = procs::start_pgward(&bins.pgward, work, "pgward-main", cluster, "group")?;
    let mut targets = vec![Target::service("direct", cluster.port)];
    targets.extend(audited.cloned());
    targets.extend([
        Target::service("pgbouncer", bouncer_port).charged(bouncer.pid()),
        Target::service("splice", splice_port).charged(splice.pid()),
        Target::pgward("pgward", &gw),
    ]);
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
pub(super) const FLUSH_SAMPLES: usize = 100;

pub(super) const MASK_WORKLOAD: &str = "psql: 100000 rows x 5 columns, column h masked (keep_last 4) vs unmasked, one pgward, wall time";

/// One pgward whose policy masks `bench_rows.h` for everyone but group `bench_raw`: the same
/// 100k-row query with a token in that group (no mask applies: rows are not decoded) and
/// without (every row rewritten), interleaved.
pub(super) fn section_mask(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path, slot: &mut Option<(Cell, Cell)>) -> Result<()> {
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

pub(super) fn section_fsync(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path, slot: &mut Option<Table>) -> Result<()> {
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

pub(super) fn section_memory(s: &Settings, work: &WorkDir, cluster: &Cluster, bin: &Path) -> Result<idle::IdleReport> {
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
pub(super) fn measure(w: Workload, t: &Target, s: &Settings) -> Result<(f64, Option<u64>)> {
    let (c, j) = (s.clients.to_string(), s.threads.to_string());
    let extra: Vec<&str> = match w {
        Workload::SelectSimple => vec!["-n", "-S", "-M", "simple", "-c", &c, "-j", &j],
        Workload::SelectExtended => vec!["-n", "-S", "-M", "extended", "-c", &c, "-j", &j],
        Workload::SelectPrepared => vec!["-n", "-S", "-M", "prepared", "-c", &c, "-j", &j],
        // The default script; pgbench vacuums the small tables and empties history first.
        Workload::Tpcb => vec!["-M", "simple", "-c", &c, "-j", &j],
        Workload::Latency => vec!["-n", "-S", "-M", "simple", "-c", "1", "-j", "1"],
        Workload::Churn => vec!["-n", "-S", "-C", "-M", "simple", "-c", &c, "-j", &j],
        // One psql run: one statement (and one login), its CPU charged as one "transaction".
        Workload::Rows => return rows_once(t).map(|v| (v, Some(1))),
    };
    let r = pgbench(t, s, &extra)?;
    let v = match w {
        Workload::Latency => r.latency_ms.map(|ms| ms * 1000.0).context("pgbench printed no latency average")?,
        _ => r.tps,
    };
    Ok((v, r.transactions))
}

pub(super) struct PgbenchResult {
    pub(super) tps: f64,
    pub(super) latency_ms: Option<f64>,
    pub(super) transactions: Option<u64>,
}

pub(super) fn pgbench(t: &Target, s: &Settings, extra: &[&str]) -> Result<PgbenchResult> {
    let mut cmd = t.client("pgbench");
    cmd.args(extra).args(["-T", &s.duration.to_string(), "app"]);
    let (status, out, err) = run_limited(&mut cmd, Duration::from_secs(u64::from(s.duration) + 120))?;
    if !status.success() {
        bail!("pgbench {} failed ({status}): {}", extra.join(" "), last_lines(&format!("{out}{err}"), 6));
    }
    parse_pgbench(&out).with_context(|| format!("unexpected pgbench output: {}", last_lines(&out, 6)))
}

pub(super) fn parse_pgbench(out: &str) -> Result<PgbenchResult> {
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
pub(super) fn rows_once(t: &Target) -> Result<f64> {
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
pub(super) fn run_limited(cmd: &mut Command, limit: Duration) -> Result<(ExitStatus, String, String)> {
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
pub(super) static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(super) fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
