//! The report: the tables on stdout, the budget checks, the JSON and the chart.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::run::{Cell, FLUSH_SAMPLES, MASK_WORKLOAD, TPCB_STATEMENTS, Table, Workload, median};
use super::{Section, Settings, callgrind, chart, disk, ebpf, idle, micro, pgaudit};

#[derive(Default)]
pub(super) struct Report {
    pub(super) main: Option<Table>,
    pub(super) fsync: Option<Table>,
    pub(super) memory: Option<idle::IdleReport>,
    pub(super) ebpf: Option<ebpf::Outcome>,
    pub(super) callgrind: Option<callgrind::Report>,
    pub(super) micro: Option<Vec<micro::TestRun>>,
    /// (unmasked, masked) samples of the 100k-row psql run, ms.
    pub(super) mask: Option<(Cell, Cell)>,
    /// The work directory's flush latency (where pgward's audit log lives), before and after
    /// the main section.
    pub(super) flush: Vec<(&'static str, disk::Flush)>,
    /// The main section's `direct+pgaudit` target: measured, or why not.
    pub(super) pgaudit: Option<pgaudit::Status>,
}

/// One budget line.
pub(super) struct Check {
    pub(super) name: String,
    pub(super) pass: Option<bool>,
    pub(super) detail: String,
}

pub(super) const LATENCY_BUDGET_US: f64 = 60.0;
pub(super) const ROWS_BUDGET_RATIO: f64 = 1.15;
pub(super) const IDLE_BUDGET_KIB: f64 = 64.0;
/// CPU per select statement pgward may spend, as a multiple of PgBouncer's.
pub(super) const CPU_BUDGET_RATIO: f64 = 1.3;
/// TPC-B throughput pgward must reach, as a share of PgBouncer's.
pub(super) const TPCB_BUDGET_SHARE: f64 = 0.8;

impl Report {
    pub(super) fn errors(&self) -> usize {
        self.main.as_ref().map_or(0, Table::errors)
            + self.fsync.as_ref().map_or(0, Table::errors)
            + self.mask.as_ref().map_or(0, |(a, b)| a.errors.len() + b.errors.len())
            + match &self.ebpf {
                Some(ebpf::Outcome::Measured(t)) => t.errors(),
                _ => 0,
            }
            + self.callgrind.as_ref().map_or(0, callgrind::Report::errors)
            + self.micro.as_ref().map_or(0, |v| v.iter().filter(|r| r.error.is_some()).count())
            + self.pgaudit.as_ref().map_or(0, pgaudit::Status::errors)
    }

    pub(super) fn budget(&self) -> Vec<Check> {
        let mut v = Vec::new();
        if let Some(t) = &self.main {
            for w in [Workload::SelectSimple, Workload::SelectExtended, Workload::SelectPrepared] {
                for other in ["splice", "pgbouncer", pgaudit::TARGET] {
                    v.push(at_least(t, w, "pgward", other));
                }
                v.push(cpu_at_most(t, w, "pgward", "pgbouncer", CPU_BUDGET_RATIO));
            }
            v.push(at_least_share(t, Workload::Tpcb, "pgward", "pgbouncer", TPCB_BUDGET_SHARE));
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

    pub(super) fn render(&self, s: &Settings) -> String {
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
            if let Some(p) = &self.pgaudit {
                let _ = writeln!(o, "{}", p.line());
            }
            let _ = writeln!(o, "\nworkloads:");
            for w in &t.workloads {
                let _ = writeln!(o, "  {:<16} {}", w.name(), w.describe(s));
            }
            self.render_flush(&mut o, t, s);
        }
        if let Some(t) = &self.fsync {
            let _ = writeln!(o, "\n== fsync: pgward audit.fsync policy on pgbench -S simple and single-client latency (ratio to direct) ==");
            render_table(&mut o, t);
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
        self.render_ebpf(&mut o, s);
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
        self.render_micro(&mut o);
        self.render_budget(&mut o);
        o
    }

    /// The ebpf section: the table, or why it was skipped.
    fn render_ebpf(&self, o: &mut String, s: &Settings) {
        use std::fmt::Write as _;
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
                render_table(o, t);
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
    }

    /// The micro-benchmark tests' printed lines.
    fn render_micro(&self, o: &mut String) {
        use std::fmt::Write as _;
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
    }

    /// The budget lines, PASS/FAIL/N/A.
    fn render_budget(&self, o: &mut String) {
        use std::fmt::Write as _;
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
    }

    /// The measured flush latency and CPU per flush, and what they allow pgward with
    /// `fsync = group`.
    pub(super) fn render_flush(&self, o: &mut String, t: &Table, s: &Settings) {
        use std::fmt::Write as _;
        if self.flush.is_empty() {
            return;
        }
        let how = if self.flush.iter().all(|(_, f)| f.direct) { "O_DIRECT" } else { "page cache (O_DIRECT refused)" };
        let _ = writeln!(
            o,
            "\naudit disk flush (one ~1.2 KB batch as pgward writes it: in place, 4 KiB blocks, {how}, + fdatasync; {FLUSH_SAMPLES} samples):"
        );
        for (label, f) in &self.flush {
            let _ = writeln!(
                o,
                "  {label:<7} p50 {:>7.0} µs   p90 {:>7.0} µs   CPU {:>5.1} µs per flush",
                f.p50_us, f.p90_us, f.cpu_us
            );
        }
        let n = self.flush.len() as f64;
        let p50 = self.flush.iter().map(|(_, f)| f.p50_us).sum::<f64>() / n;
        let cpu = self.flush.iter().map(|(_, f)| f.cpu_us).sum::<f64>() / n;
        let _ = writeln!(
            o,
            "  every reply waits for its statement's record to be durable, so with fsync = group\n  \
             pgward's single-client latency is ≥ direct + ~{p50:.0} µs less what Postgres does meanwhile, and {} closed-loop\n  \
             clients, each waiting ~one flush per statement, can reach at most:",
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
        self.render_io_floor(o, t, s, cpu);
    }

    /// The CPU the audit I/O alone adds to each statement, beside PgBouncer's whole CPU per
    /// statement and the CPU budget.
    fn render_io_floor(&self, o: &mut String, t: &Table, s: &Settings, cpu_per_flush: f64) {
        use std::fmt::Write as _;
        let floor = disk::io_cpu_floor_per_statement(s.clients, cpu_per_flush);
        let _ = writeln!(
            o,
            "  a flush covers at most one statement per client: the audit I/O alone costs ≥ {floor:.1} µs CPU per statement\n  \
             at {} clients (CPU budget: ≤ {CPU_BUDGET_RATIO}× PgBouncer's whole CPU per statement):",
            s.clients
        );
        for w in [Workload::SelectSimple, Workload::SelectExtended, Workload::SelectPrepared] {
            if let Some(b) = t.cpu_per_statement(w, "pgbouncer") {
                let _ = writeln!(
                    o,
                    "    {:<16} PgBouncer {b:>5.1} µs, budget {:>5.1} µs, audit I/O floor {:.0}% of the budget; \
                     left for all pgward does beyond PgBouncer's relay: {:.1} µs",
                    w.name(),
                    b * CPU_BUDGET_RATIO,
                    100.0 * floor / (b * CPU_BUDGET_RATIO),
                    b * CPU_BUDGET_RATIO - b - floor
                );
            }
        }
    }

    pub(super) fn json(&self, s: &Settings, sections: &[Section], iso: &str, secs: f64) -> Value {
        let budget: Vec<Value> =
            self.budget().iter().map(|c| json!({ "check": c.name, "pass": c.pass, "detail": c.detail })).collect();
        json!({
            "timestamp": iso,
            "duration_secs": secs,
            "quick": s.quick,
            "sections": sections.iter().map(|x| format!("{x:?}").to_lowercase()).collect::<Vec<_>>(),
            "settings": settings_json(s),
            "machine": machine_json(),
            "flush_latency": self.flush.iter().map(|(label, f)| json!({
                "when": label, "p50_us": f.p50_us, "p90_us": f.p90_us, "cpu_us_per_flush": f.cpu_us, "samples": f.samples, "direct": f.direct,
            })).collect::<Vec<_>>(),
            "main": self.main.as_ref().map(|t| table_json(t, s)),
            "pgaudit": self.pgaudit.as_ref().map(pgaudit::Status::json),
            "fsync": self.fsync.as_ref().map(|t| table_json(t, s)),
            "memory": self.memory.as_ref().map(memory_json),
            "mask": self.mask.as_ref().map(|(u, m)| mask_json(u, m)),
            "ebpf": match &self.ebpf {
                None => Value::Null,
                Some(outcome) => ebpf_json(outcome, s),
            },
            "callgrind": self.callgrind.as_ref().map(callgrind::Report::json),
            "micro": self.micro.as_ref().map(|v| v.iter().map(micro::TestRun::json).collect::<Vec<_>>()),
            "budget": budget,
        })
    }
}

/// The JSON of one table: per workload, each target's samples, median, CPU and ratio.
fn table_json(t: &Table, s: &Settings) -> Value {
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
                        "cpu_us_per_statement": t.cpu_per_statement(w, name),
                        "cpu_us_per_txn_samples": cell.cpu_us,
                        "context_switches_per_statement": t.switches_per_statement(w, name),
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
                "statements_per_txn": w.statements_per_txn(),
                "results": results,
            })
        })
        .collect();
    json!({ "targets": t.targets, "workloads": workloads })
}

/// The load the run was measured under.
fn settings_json(s: &Settings) -> Value {
    json!({
        "pgbench_seconds": s.duration,
        "cycles": s.cycles,
        "clients": s.clients,
        "threads": s.threads,
        "scale": s.scale,
        "rows_reps_per_cycle": s.rows_reps,
        "idle_sessions": s.idle_sessions,
    })
}

/// What the run's numbers depend on: CPUs, kernel, and whether idle CPUs halt.
fn machine_json() -> Value {
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpuidle": cpuidle(),
    })
}

/// pgward's memory before, with and after the idle sessions.
fn memory_json(m: &idle::IdleReport) -> Value {
    json!({
        "sessions": m.sessions,
        "rss_before_kib": m.rss_before_kib,
        "rss_after_kib": m.rss_after_kib,
        "rss_after_close_kib": m.rss_closed_kib,
        "rss_anon_before_kib": m.anon_before_kib,
        "rss_anon_after_kib": m.anon_after_kib,
        "kib_per_session": m.per_session_kib(),
        "anon_kib_per_session": m.anon_per_session_kib(),
        "login_secs": m.login_secs,
    })
}

/// The masked run against the unmasked one (`ratio`: masked / unmasked median).
fn mask_json(u: &Cell, m: &Cell) -> Value {
    json!({
        "workload": MASK_WORKLOAD,
        "unmasked_ms": { "median": u.median(), "samples": u.samples, "errors": u.errors },
        "masked_ms": { "median": m.median(), "samples": m.samples, "errors": m.errors },
        "ratio": match (u.median(), m.median()) { (Some(a), Some(b)) => Some(b / a), _ => None },
    })
}

/// The eBPF section: the reason it was skipped, or its table with what each target is.
fn ebpf_json(outcome: &ebpf::Outcome, s: &Settings) -> Value {
    match outcome {
        ebpf::Outcome::Skipped(why) => json!({ "status": "skipped", "reason": why }),
        ebpf::Outcome::Measured(t) => {
            let mut v = table_json(t, s);
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
    }
}

/// When and under what load a run started (for the JSON and the file names).
pub(super) struct RunInfo {
    /// `20260901T120000Z`: the result files' names.
    pub(super) stamp: String,
    /// `2026-09-01T12:00:00Z`
    pub(super) iso: String,
    pub(super) started: Instant,
    pub(super) load_start: Option<f64>,
}

/// `--replot`: redraw the PNG of a saved run from its JSON, beside it.
pub(super) fn replot(json_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(json_path).with_context(|| format!("reading {}", json_path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", json_path.display()))?;
    let png = json_path.with_extension("png");
    if !chart_from_json(&v, &png)? {
        bail!("{} has no main or fsync results to draw", json_path.display());
    }
    println!("chart: {}", png.display());
    Ok(())
}

/// Print the report and write its JSON and chart to `out_dir` (`latest.*` too when the run was
/// not stopped by an error, `result`).
pub(super) fn write(
    report: &Report,
    s: &Settings,
    sections: &[Section],
    info: &RunInfo,
    out_dir: &Path,
    result: &Result<()>,
) -> Result<()> {
    let text = report.render(s);
    println!("{text}");
    let mut json = report.json(s, sections, &info.iso, info.started.elapsed().as_secs_f64());
    let load_start = info.load_start;
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
    if let Err(e) = result {
        json["error"] = json!(format!("{e:#}"));
    }
    let png = out_dir.join(format!("{}.png", info.stamp));
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
    let json_path = out_dir.join(format!("{}.json", info.stamp));
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
    println!("took {:.0} s", info.started.elapsed().as_secs_f64());
    Ok(())
}

/// Draw the PNG from a report's JSON (so `--replot` can redraw a saved run); Ok(false) when
/// it has nothing to draw.
pub(super) fn chart_from_json(v: &Value, path: &Path) -> Result<bool> {
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
        panel("main", "main (pgaudit log = all, PgBouncer session, pgward fsync = group)"),
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

pub(super) fn at_least(t: &Table, w: Workload, a: &str, b: &str) -> Check {
    let name = format!("{}: {a} ≥ {b}", w.name());
    match (t.median(w, a), t.median(w, b)) {
        (Some(x), Some(y)) => Check { name, pass: Some(x >= y), detail: format!("{:.3}× ({x:.0} vs {y:.0} {})", x / y, w.unit()) },
        _ => missing(name),
    }
}

/// `a`'s throughput on `w` is at least `share` × `b`'s.
pub(super) fn at_least_share(t: &Table, w: Workload, a: &str, b: &str, share: f64) -> Check {
    let name = format!("{}: {a} ≥ {share}× {b}", w.name());
    match (t.median(w, a), t.median(w, b)) {
        (Some(x), Some(y)) => {
            Check { name, pass: Some(x >= share * y), detail: format!("{:.3}× ({x:.0} vs {y:.0} {})", x / y, w.unit()) }
        }
        _ => missing(name),
    }
}

/// `a`'s CPU per statement of `w` is at most `ratio` × `b`'s.
pub(super) fn cpu_at_most(t: &Table, w: Workload, a: &str, b: &str, ratio: f64) -> Check {
    let name = format!("{}: {a} CPU per statement ≤ {ratio}× {b}'s", w.name());
    match (t.cpu_per_statement(w, a), t.cpu_per_statement(w, b)) {
        (Some(x), Some(y)) if y > 0.0 => {
            Check { name, pass: Some(x <= ratio * y), detail: format!("{:.2}× ({x:.1} vs {y:.1} µs)", x / y) }
        }
        _ => missing(name),
    }
}

pub(super) fn missing(name: String) -> Check {
    Check { name, pass: None, detail: "not measured".into() }
}

/// A section's table: per workload, each target's median (with its ratio to the baseline),
/// then each proxy's CPU per statement (`<target> cpu`, µs) — PgBouncer's first, pgward's
/// beside it — and a legend for those columns.
pub(super) fn render_table(o: &mut String, t: &Table) {
    let cpu = cpu_columns(t);
    let mut header = vec!["workload".to_string(), "unit".to_string()];
    header.extend(t.targets.iter().cloned());
    if !cpu.is_empty() {
        header.push("|".into());
        header.extend(cpu.iter().map(|&i| format!("{} cpu", t.targets[i])));
        header.push("|".into());
        header.extend(cpu.iter().map(|&i| format!("{} cs", t.targets[i])));
    }
    let mut rows = vec![header];
    for &w in &t.workloads {
        let mut row = vec![w.name().to_string(), w.unit().to_string()];
        row.extend(t.targets.iter().map(|name| value_cell(t, w, name)));
        if !cpu.is_empty() {
            row.push("|".into());
            row.extend(cpu.iter().map(|&i| t.cpu_per_statement(w, &t.targets[i]).map_or_else(|| "-".to_string(), fmt_value)));
            row.push("|".into());
            row.extend(cpu.iter().map(|&i| {
                t.switches_per_statement(w, &t.targets[i]).map_or_else(|| "-".to_string(), |n| format!("{n:.2}"))
            }));
        }
        rows.push(row);
    }
    o.push_str(&grid(&rows, 2));
    if !cpu.is_empty() {
        o.push_str(&cpu_legend(&t.workloads));
    }
}

/// What the `<target> cpu` columns are, with a note for each of `workloads` whose statements
/// are counted differently.
pub(super) fn cpu_legend(workloads: &[Workload]) -> String {
    let mut o = String::from(
        "<target> cpu: µs of user + system CPU of that proxy's process per SQL statement \
         (over each run, / (transactions × statements per transaction))\n\
         <target> cs: context switches of that proxy's threads per SQL statement (each time a \
         thread slept and was woken, or was preempted), counted the same way\n",
    );
    for w in workloads {
        let note = match w {
            Workload::Tpcb => format!("{} statements per transaction", TPCB_STATEMENTS),
            Workload::Churn => "each statement's connection and login included".into(),
            Workload::Rows => "one psql run (one statement), its login included".into(),
            _ => continue,
        };
        o.push_str(&format!("  {}: {note}\n", w.name()));
    }
    o
}

/// One value cell: the median, with its ratio to the baseline; ERROR or `-` when not measured.
fn value_cell(t: &Table, w: Workload, name: &str) -> String {
    match (t.median(w, name), t.ratio(w, name)) {
        (Some(v), _) if name == t.baseline() => fmt_value(v),
        (Some(v), Some(r)) => format!("{} ({r:.2}×)", fmt_value(v)),
        (Some(v), None) => fmt_value(v),
        (None, _) if t.cell(w, name).is_some_and(|c| !c.errors.is_empty()) => "ERROR".to_string(),
        (None, _) => "-".to_string(),
    }
}

/// The targets with CPU samples (the proxies), as indexes into `t.targets`: PgBouncer, then
/// pgward's, then the others, each group in table order.
pub(super) fn cpu_columns(t: &Table) -> Vec<usize> {
    let has = |ti: usize| t.cells.iter().any(|(&(_, i), c)| i == ti && !c.cpu_us.is_empty());
    let rank = |name: &str| match name {
        "pgbouncer" => 0,
        n if n.starts_with("pgward") => 1,
        _ => 2,
    };
    let mut cols: Vec<usize> = (0..t.targets.len()).filter(|&i| has(i)).collect();
    cols.sort_by_key(|&i| rank(&t.targets[i]));
    cols
}

/// Rows of cells as aligned text: the first `left` columns left-aligned, the others right-
/// aligned, one space between columns, no trailing spaces.
pub(super) fn grid(rows: &[Vec<String>], left: usize) -> String {
    let ncols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..ncols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|x| x.chars().count()).max().unwrap_or(0)).collect();
    let mut o = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = " ".repeat(widths[c] - cell.chars().count());
            if c > 0 {
                line.push(' ');
            }
            if c < left {
                line.push_str(cell);
                line.push_str(&pad);
            } else {
                line.push_str(&pad);
                line.push_str(cell);
            }
        }
        o.push_str(line.trim_end());
        o.push('\n');
    }
    o
}

pub(super) fn fmt_value(v: f64) -> String {
    if v >= 1000.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

/// How idle CPUs wait: cpuidle driver and governor, and for the guest `haltpoll` driver how long
/// an idle vCPU polls before halting (0: it halts at once, so every wakeup of an idle CPU costs a
/// VM exit and re-entry — on this project's Firecracker VMs ~30 µs, which dominates loopback
/// latencies; see README "Performance").
pub(super) fn cpuidle() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    json!({
        "driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "governor": read("/sys/devices/system/cpu/cpuidle/current_governor_ro")
            .or_else(|| read("/sys/devices/system/cpu/cpuidle/current_governor")),
        "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").and_then(|v| v.parse::<u64>().ok()),
    })
}

/// One line about `cpuidle()` for the report, when it says something.
pub(super) fn cpuidle_line(v: &serde_json::Value) -> Option<String> {
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
pub(super) fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// ("20260901T120000Z", "2026-09-01T12:00:00Z") for now, in UTC.
pub(super) fn utc_stamp() -> (String, String) {
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
