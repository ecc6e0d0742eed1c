//! The `callgrind` section: pgward's CPU cost per statement as a count of instructions, which,
//! unlike throughput, repeats on a busy machine.
//!
//! `pgward serve` (the release build: it has line-table debuginfo, so functions have names)
//! runs under `valgrind --tool=callgrind --callgrind-out-file=…`; one pgbench client drives a
//! fixed number of transactions (`pgbench -n -S -c 1 -t N -M simple|extended|prepared`); then
//! pgward gets SIGTERM and callgrind writes the instructions executed by the whole process (all
//! threads, user space only). Every (fsync policy, protocol mode) is run twice, with a small
//! `-t` (base) and a larger one (measured), each in a fresh pgward, and
//! `(Ir(measured) - Ir(base)) / (measured - base)` is the cost of one transaction with
//! startup, login, pgbench's own setup queries and shutdown cancelled out.
//!
//! For the simple mode (first fsync policy) the top functions by instructions per transaction
//! are printed, inclusive (pgward's own functions: the runtime and thread frames above them are
//! ~100% and say nothing) and self, from `callgrind_annotate` of both runs (per function: the
//! measured run's cost minus the base run's, over the transactions in between), and both
//! profiles are copied next to the JSON for `callgrind_annotate` / kcachegrind.
//!
//! SHA-256 caveat: the `sha2` crate picks its backend at run time; valgrind's virtual CPU has no
//! SHA extensions, so under callgrind the portable ("soft") compression runs, while natively a
//! CPU with SHA-NI runs a much cheaper one. Each row therefore also reports the
//! instructions per transaction spent in `sha2::` functions (self cost), and the total without
//! them.
//!
//! valgrind runs pgward ~50x slower and serializes its threads; the transaction counts are kept
//! small and every timeout is generous. The section takes about a minute (12 runs; 6 with
//! `--quick`, fsync off only); `--quick` leaves it out unless asked for:
//! `cargo xtask bench --only callgrind` (or `--quick --only callgrind`).
//!
//! pgward runs with `upstream.pool = false` here so that both runs make the same number of
//! upstream logins (see `one_run`); pooling changes the login, not the per-statement path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::procs::{self, PgwardOpts, WorkDir};
use super::{Target, check_interrupted, last_lines, parse_pgbench, run_limited};
use crate::pg::Cluster;
use crate::util::step;

pub const MODES: [&str; 3] = ["simple", "extended", "prepared"];
/// Functions kept in the top lists (inclusive and self).
const TOP: usize = 12;
/// pgward's own functions (the gateway-user library crate is `pgward`).
const CRATE_PREFIXES: [&str; 2] = ["pgward::", "<pgward::"];
/// Functions counted as SHA-256 work (self cost).
const SHA_MARK: &str = "sha2::";

pub struct Plan {
    pub fsyncs: Vec<&'static str>,
    pub base_tx: u32,
    pub measured_tx: u32,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        Plan { fsyncs: if quick { vec!["off"] } else { vec!["off", "group"] }, base_tx: 200, measured_tx: 2200 }
    }
}

/// One pgward under callgrind.
#[derive(Default)]
pub struct Run {
    pub tx: u32,
    pub ir: Option<u64>,
    /// Self cost of `sha2::` functions (None when callgrind_annotate did not run).
    pub sha_ir: Option<u64>,
    pub secs: f64,
    pub error: Option<String>,
}

pub struct Row {
    pub fsync: String,
    pub mode: String,
    pub base: Run,
    pub measured: Run,
}

impl Row {
    pub fn ir_per_tx(&self) -> Option<f64> {
        let (a, b) = (self.base.ir?, self.measured.ir?);
        let n = self.measured.tx.checked_sub(self.base.tx).filter(|n| *n > 0)?;
        Some((b as f64 - a as f64) / f64::from(n))
    }
    /// Of [`Row::ir_per_tx`], the instructions in `sha2::` functions.
    pub fn sha_per_tx(&self) -> Option<f64> {
        let (a, b) = (self.base.sha_ir?, self.measured.sha_ir?);
        let n = self.measured.tx.checked_sub(self.base.tx).filter(|n| *n > 0)?;
        Some((b as f64 - a as f64) / f64::from(n))
    }
    fn errors(&self) -> impl Iterator<Item = &String> {
        self.base.error.iter().chain(self.measured.error.iter())
    }
}

#[derive(Default)]
pub struct Report {
    pub skipped: Option<String>,
    pub valgrind: String,
    pub base_tx: u32,
    pub measured_tx: u32,
    pub rows: Vec<Row>,
    /// (fsync, mode) the top lists and the profile are from.
    pub profiled: Option<(String, String)>,
    /// pgward's functions by inclusive instructions per transaction.
    pub top_inclusive: Vec<PerTx>,
    /// All functions by self instructions per transaction.
    pub top_self: Vec<PerTx>,
    pub annotate_error: Option<String>,
    /// The measured and base runs' profiles of that row, kept next to the JSON.
    pub profile: Option<PathBuf>,
    pub profile_base: Option<PathBuf>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.rows.iter().map(|r| r.errors().count()).sum()
    }

    pub fn json(&self) -> Value {
        if let Some(why) = &self.skipped {
            return json!({ "status": "skipped", "reason": why });
        }
        let func = |f: &PerTx| json!({ "ir_per_transaction": f.ir, "percent": f.percent, "function": f.name });
        json!({
            "status": "measured",
            "tool": self.valgrind,
            "method": "pgward serve (upstream.pool = false) under valgrind --tool=callgrind; pgbench -n -S -c 1 -t N; \
                       ir_per_transaction = (Ir(measured_tx) - Ir(base_tx)) / (measured_tx - base_tx), \
                       instructions of the whole pgward process (user space, all threads); sha256 = self cost of sha2:: functions \
                       (portable code under valgrind, SHA-NI natively)",
            "base_tx": self.base_tx,
            "measured_tx": self.measured_tx,
            "rows": self.rows.iter().map(|r| json!({
                "fsync": r.fsync,
                "mode": r.mode,
                "ir_per_transaction": r.ir_per_tx(),
                "sha256_ir_per_transaction": r.sha_per_tx(),
                "ir_per_transaction_without_sha256": r.ir_per_tx().zip(r.sha_per_tx()).map(|(a, b)| a - b),
                "base": { "tx": r.base.tx, "ir": r.base.ir, "sha256_ir": r.base.sha_ir, "seconds": r.base.secs, "error": r.base.error },
                "measured": { "tx": r.measured.tx, "ir": r.measured.ir, "sha256_ir": r.measured.sha_ir, "seconds": r.measured.secs, "error": r.measured.error },
            })).collect::<Vec<_>>(),
            "profiled": self.profiled.as_ref().map(|(f, m)| json!({ "fsync": f, "mode": m })),
            "top_inclusive_pgward_per_transaction": self.top_inclusive.iter().map(func).collect::<Vec<_>>(),
            "top_self_per_transaction": self.top_self.iter().map(func).collect::<Vec<_>>(),
            "annotate_error": self.annotate_error,
            "profile": self.profile.as_ref().map(|p| p.display().to_string()),
            "profile_base": self.profile_base.as_ref().map(|p| p.display().to_string()),
        })
    }

    pub fn render(&self, o: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(o, "\n== callgrind: pgward instructions per transaction (pgbench -S -c 1, valgrind) ==");
        if let Some(why) = &self.skipped {
            let _ = writeln!(o, "  skipped: {why}");
            return;
        }
        let _ = writeln!(
            o,
            "  (Ir at -t {} minus Ir at -t {}) / {}; whole pgward process (upstream.pool = false), startup and logins cancelled out",
            self.measured_tx,
            self.base_tx,
            self.measured_tx.saturating_sub(self.base_tx)
        );
        let _ = writeln!(
            o,
            "  {:<6} {:<9} {:>14} {:>12} {:>14} {:>16} {:>16}",
            "fsync", "mode", "Ir/transaction", "sha2:: part", "without sha2", "Ir (base)", "Ir (measured)"
        );
        for r in &self.rows {
            let f = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
            let per = r.ir_per_tx().map_or_else(|| "ERROR".to_string(), |v| format!("{v:.0}"));
            let ir = |x: Option<u64>| x.map_or_else(|| "-".to_string(), group_digits);
            let _ = writeln!(
                o,
                "  {:<6} {:<9} {per:>14} {:>12} {:>14} {:>16} {:>16}",
                r.fsync,
                r.mode,
                f(r.sha_per_tx()),
                f(r.ir_per_tx().zip(r.sha_per_tx()).map(|(a, b)| a - b)),
                ir(r.base.ir),
                ir(r.measured.ir)
            );
            for e in r.errors() {
                let _ = writeln!(o, "      error: {e}");
            }
        }
        let _ = writeln!(
            o,
            "  note: valgrind's CPU has no SHA extensions, so sha2 runs its portable code here; natively (SHA-NI) that part takes far fewer instructions"
        );
        if let Some((f, m)) = &self.profiled {
            let list = |o: &mut String, title: &str, v: &[PerTx]| {
                let _ = writeln!(o, "  {title}, instructions per transaction (fsync={f}, {m}; measured minus base run):");
                for x in v {
                    let _ = writeln!(o, "    {:>5.1}%  {:>9.0}  {}", x.percent, x.ir, shorten(&x.name, 150));
                }
            };
            if !self.top_inclusive.is_empty() {
                list(o, "top pgward functions by inclusive cost", &self.top_inclusive);
            }
            if !self.top_self.is_empty() {
                list(o, "top functions by self cost", &self.top_self);
            }
        }
        if let Some(e) = &self.annotate_error {
            let _ = writeln!(o, "  callgrind_annotate: {e}");
        }
        if let (Some(p), Some(b)) = (&self.profile, &self.profile_base) {
            let _ = writeln!(o, "  profiles: {} (-t {}), {} (-t {})", p.display(), self.measured_tx, b.display(), self.base_tx);
            let _ = writeln!(o, "            callgrind_annotate --inclusive=yes <file> | less, or kcachegrind <file>");
        }
    }
}

/// Run the section; results go into `slot` as they come. The profiles of the first simple-mode
/// row are copied to `<keep_dir>/<stamp>.callgrind{,-base}.out`.
pub fn section(
    plan: &Plan,
    work: &WorkDir,
    cluster: &Cluster,
    bin: &Path,
    keep_dir: &Path,
    stamp: &str,
    slot: &mut Option<Report>,
) -> Result<()> {
    let report = slot.insert(Report { base_tx: plan.base_tx, measured_tx: plan.measured_tx, ..Report::default() });
    match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => report.valgrind = String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => report.skipped = Some(format!("valgrind --version failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => report.skipped = Some(format!("valgrind not found ({e}); install it (apt-get install valgrind)")),
    }
    if let Some(why) = &report.skipped {
        step(&format!("callgrind: skipped: {why}"));
        return Ok(());
    }
    step(&format!(
        "callgrind: {} ({} fsync polic{} x {} modes x 2 runs of pgward under callgrind, -t {} and -t {})",
        report.valgrind,
        plan.fsyncs.len(),
        if plan.fsyncs.len() == 1 { "y" } else { "ies" },
        MODES.len(),
        plan.base_tx,
        plan.measured_tx
    ));
    for &fsync in &plan.fsyncs {
        for mode in MODES {
            let mut row = Row { fsync: fsync.into(), mode: mode.into(), base: Run::default(), measured: Run::default() };
            // (profile, its functions by self cost) of the base and measured runs.
            let mut outs: Vec<Option<(PathBuf, Vec<Func>)>> = Vec::new();
            for (run, tx) in [(&mut row.base, plan.base_tx), (&mut row.measured, plan.measured_tx)] {
                check_interrupted()?;
                run.tx = tx;
                let start = Instant::now();
                let mut kept = None;
                match one_run(work, cluster, bin, fsync, mode, tx) {
                    Ok((ir, out)) => {
                        run.ir = Some(ir);
                        match annotate(&out, false) {
                            Ok(funcs) => {
                                run.sha_ir = Some(funcs.iter().filter(|f| f.name.contains(SHA_MARK)).map(|f| f.ir).sum());
                                kept = Some((out, funcs));
                            }
                            Err(e) => {
                                report.annotate_error.get_or_insert_with(|| format!("{e:#}"));
                            }
                        }
                    }
                    Err(e) => run.error = Some(format!("{e:#}")),
                }
                outs.push(kept);
                run.secs = start.elapsed().as_secs_f64();
                match (&run.ir, &run.error) {
                    (Some(ir), _) => eprintln!("    [callgrind] fsync={fsync:<5} {mode:<9} -t {tx:<5} {:>16} Ir ({:.0} s)", group_digits(*ir), run.secs),
                    (None, Some(e)) => eprintln!("    [callgrind] fsync={fsync:<5} {mode:<9} -t {tx:<5} ERROR: {e}"),
                    _ => {}
                }
            }
            let per = row.ir_per_tx();
            if let Some(v) = per {
                step(&format!("callgrind: fsync={fsync} {mode}: {v:.0} instructions per transaction"));
            }
            report.rows.push(row);
            if report.profiled.is_some() || mode != "simple" {
                continue;
            }
            let (Some(per), [Some((base_out, base_self)), Some((out, own))]) = (per, &outs[..]) else { continue };
            report.profiled = Some((fsync.into(), mode.into()));
            let n = plan.measured_tx - plan.base_tx;
            report.top_self = per_tx(own, base_self, n, per).into_iter().take(TOP).collect();
            match annotate(out, true).and_then(|m| Ok((m, annotate(base_out, true)?))) {
                Ok((m, b)) => {
                    report.top_inclusive = per_tx(&m, &b, n, per)
                        .into_iter()
                        .filter(|f| CRATE_PREFIXES.iter().any(|p| f.name.starts_with(p)))
                        .take(TOP)
                        .collect();
                }
                Err(e) => report.annotate_error = Some(format!("{e:#}")),
            }
            let _ = std::fs::create_dir_all(keep_dir);
            let keep = keep_dir.join(format!("{stamp}.callgrind.out"));
            let keep_base = keep_dir.join(format!("{stamp}.callgrind-base.out"));
            if std::fs::copy(out, &keep).is_ok() && std::fs::copy(base_out, &keep_base).is_ok() {
                report.profile = Some(keep);
                report.profile_base = Some(keep_base);
            }
        }
    }
    Ok(())
}

/// One fresh pgward under callgrind, `tx` transactions through it; (total Ir, profile path).
fn one_run(work: &WorkDir, cluster: &Cluster, bin: &Path, fsync: &str, mode: &str, tx: u32) -> Result<(u64, PathBuf)> {
    let name = format!("pgward-cg-{fsync}-{mode}-{tx}");
    let out = work.join(&format!("{name}.callgrind"));
    let wrapper = vec!["valgrind".into(), "--tool=callgrind".into(), format!("--callgrind-out-file={}", out.display()).into()];
    // No upstream pooling: with it, whether pgbench's second login (it connects once for its
    // setup query, then the client) reuses the first one's backend is a race, and one SCRAM
    // key derivation (PBKDF2, 4096 rounds of soft SHA-256 here) is ~57M instructions, which then
    // would not cancel out between the two runs. The per-statement path is the same.
    //
    // Time-driven checkpoints are off too (count-driven ones stay): each is an Ed25519
    // signature, and under valgrind's slowdown one a second of wall time would be charged to
    // the statements, varying with how slow the run was rather than with the code.
    let opts = PgwardOpts {
        fsync,
        wrapper,
        set: vec![("upstream", "pool", "false"), ("audit", "checkpoint_interval", "\"1h\"")],
        start_timeout: Duration::from_secs(300),
        ..PgwardOpts::default()
    };
    let mut gw = procs::start_pgward_opts(bin, work, &name, cluster, &opts)?;
    let t = Target::pgward(&name, &gw);
    let mut cmd = t.client("pgbench");
    cmd.args(["-n", "-S", "-M", mode, "-c", "1", "-j", "1", "-t", &tx.to_string(), "app"]);
    // ~1-3 ms per transaction under valgrind; generous.
    let limit = Duration::from_secs(300 + u64::from(tx) / 10);
    let (status, stdout, stderr) = run_limited(&mut cmd, limit)?;
    if !status.success() {
        bail!("pgbench -M {mode} -t {tx} failed ({status}): {}", last_lines(&format!("{stdout}{stderr}"), 6));
    }
    parse_pgbench(&stdout).with_context(|| format!("unexpected pgbench output: {}", last_lines(&stdout, 6)))?;
    let st = gw.proc.stop_wait(Duration::from_secs(300))?;
    if !out.is_file() {
        bail!("pgward under callgrind exited ({st}) without writing {}; last lines of {}:\n{}", out.display(), gw.proc.log.display(), procs::tail(&gw.proc.log, 10));
    }
    let text = std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let ir = total_ir(&text).with_context(|| format!("no `totals:`/`summary:` line in {}", out.display()))?;
    Ok((ir, out))
}

/// Total instructions (the first event, Ir) of a callgrind output file: its `totals:` line, else
/// `summary:`; summed over the parts when a file holds several (one per dump).
pub fn total_ir(text: &str) -> Option<u64> {
    let first_num = |v: &str| v.split_whitespace().next().and_then(|x| x.parse::<u64>().ok());
    let sum = |prefix: &str| -> Option<u64> {
        let v: Vec<u64> = text.lines().filter_map(|l| l.strip_prefix(prefix)).filter_map(first_num).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    sum("totals:").or_else(|| sum("summary:"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Func {
    pub ir: u64,
    pub percent: f64,
    pub name: String,
}

/// One function's instructions per transaction: its cost in the measured run minus its cost in
/// the base run, over the transactions in between.
#[derive(Debug, Clone, PartialEq)]
pub struct PerTx {
    pub name: String,
    pub ir: f64,
    /// Of the whole process's instructions per transaction.
    pub percent: f64,
}

/// [`PerTx`] for every function of the measured run, most expensive first.
pub fn per_tx(measured: &[Func], base: &[Func], n: u32, total_per_tx: f64) -> Vec<PerTx> {
    let base: std::collections::HashMap<&str, u64> = base.iter().map(|f| (f.name.as_str(), f.ir)).collect();
    let n = f64::from(n.max(1));
    let mut v: Vec<PerTx> = measured
        .iter()
        .map(|f| {
            let ir = (f.ir as f64 - base.get(f.name.as_str()).copied().unwrap_or(0) as f64) / n;
            PerTx { name: f.name.clone(), ir, percent: if total_per_tx > 0.0 { ir * 100.0 / total_per_tx } else { 0.0 } }
        })
        .collect();
    v.sort_by(|a, b| b.ir.total_cmp(&a.ir));
    v
}

/// Every function of a profile with its inclusive or self cost, from `callgrind_annotate`, one
/// entry per function, most expensive first.
fn annotate(profile: &Path, inclusive: bool) -> Result<Vec<Func>> {
    let out = Command::new("callgrind_annotate")
        .args(["--auto=no", "--threshold=100"])
        .arg(format!("--inclusive={}", if inclusive { "yes" } else { "no" }))
        .arg(profile)
        .output()
        .context("running callgrind_annotate")?;
    if !out.status.success() {
        bail!("callgrind_annotate failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let funcs = parse_annotate(&String::from_utf8_lossy(&out.stdout), if inclusive { Merge::Max } else { Merge::Sum });
    if funcs.is_empty() {
        bail!("no function lines in callgrind_annotate's output");
    }
    Ok(funcs)
}

/// How the entries of one function (one per source file inlined into it) are combined: self
/// costs add up; inclusive costs overlap (each entry counts the calls made from its lines, and
/// async state machines re-enter), so the largest is taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Merge {
    Sum,
    Max,
}

/// The function lines of callgrind_annotate's output (valgrind 3.19's format: `<Ir with
/// commas> [(<percent>)]  <file>:<function> [<object>]` after a `file:function` header), one
/// entry per function (see [`Merge`]), most expensive first, with their share of
/// `PROGRAM TOTALS`.
pub fn parse_annotate(text: &str, merge: Merge) -> Vec<Func> {
    let num = |s: &str| s.replace(',', "").parse::<u64>().ok();
    let mut total = None;
    let mut in_funcs = false;
    let mut by_name: Vec<(String, u64)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(x) = t.strip_suffix("PROGRAM TOTALS") {
            total = x.split_whitespace().next().and_then(num);
            continue;
        }
        if t.ends_with("file:function") {
            in_funcs = true;
            continue;
        }
        if !in_funcs || t.is_empty() || t.starts_with("--") {
            continue;
        }
        let Some((count, rest)) = t.split_once(char::is_whitespace) else { continue };
        let Some(ir) = num(count) else { continue };
        // A percentage column, when present: `1,234 (12.3%)  name`.
        let rest = rest.trim_start();
        let rest = if rest.starts_with('(') { rest.split_once(')').map_or(rest, |(_, r)| r).trim_start() } else { rest };
        let mut name = rest;
        if name.ends_with(']')
            && let Some(i) = name.rfind(" [")
        {
            name = &name[..i];
        }
        let name = function_name(name).to_string();
        match index.get(&name) {
            Some(&i) => {
                let e = &mut by_name[i].1;
                *e = if merge == Merge::Sum { *e + ir } else { (*e).max(ir) };
            }
            None => {
                index.insert(name.clone(), by_name.len());
                by_name.push((name, ir));
            }
        }
    }
    by_name.sort_by_key(|a| std::cmp::Reverse(a.1));
    by_name
        .into_iter()
        .map(|(name, ir)| Func { ir, percent: total.filter(|t| *t > 0).map_or(0.0, |t| ir as f64 * 100.0 / t as f64), name })
        .collect()
}

/// `<file>:<function>` → `<function>` (`???:f` → `f`; a bare `a::b` stays).
fn function_name(s: &str) -> &str {
    match s.find(':') {
        Some(i) if !s[i..].starts_with("::") => &s[i + 1..],
        _ => s,
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { s.chars().take(max - 1).collect::<String>() + "…" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_of_a_callgrind_file() {
        let f = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 24949\ncmd:  pgward serve\n\
                 part: 1\n\npositions: line\nevents: Ir\nsummary: 2708259\n\nob=(1) /x/pgward\nfl=(1) ???\nfn=(1) main\n\
                 0 5\n\ntotals: 2708427\n";
        assert_eq!(total_ir(f), Some(2708427));
        assert_eq!(total_ir("events: Ir\nsummary: 10\n"), Some(10));
        // Two parts (dumps): summed.
        assert_eq!(total_ir("part: 1\ntotals: 10\npart: 2\ntotals: 32\n"), Some(42));
        // Several events: the first is Ir.
        assert_eq!(total_ir("events: Ir Dr Dw\ntotals: 7 3 2\n"), Some(7));
        assert_eq!(total_ir("nothing here"), None);
    }

    #[test]
    fn ir_per_transaction_subtracts_the_base_run() {
        let run = |tx, ir| Run { tx, ir: Some(ir), ..Run::default() };
        let mut r = Row { fsync: "off".into(), mode: "simple".into(), base: run(200, 5_000_000), measured: run(2200, 85_000_000) };
        assert_eq!(r.ir_per_tx(), Some(40_000.0));
        assert_eq!(r.sha_per_tx(), None);
        (r.base.sha_ir, r.measured.sha_ir) = (Some(1_000_000), Some(21_000_000));
        assert_eq!(r.sha_per_tx(), Some(10_000.0));
        let r = Row { fsync: "off".into(), mode: "simple".into(), base: run(200, 1), measured: Run { tx: 2200, ..Run::default() } };
        assert_eq!(r.ir_per_tx(), None);
    }

    #[test]
    fn annotate_output_parsed() {
        let out = "--------------------------------------------------------------------------------\n\
Profile data file 'cg.out' (creator: callgrind-3.19.0)\n\
--------------------------------------------------------------------------------\n\
Events recorded:  Ir\nEvents shown:     Ir\nEvent sort order: Ir\nThresholds:       100\n\n\
--------------------------------------------------------------------------------\n\
Ir                   \n\
--------------------------------------------------------------------------------\n\
200,000,000 (100.0%)  PROGRAM TOTALS\n\n\
--------------------------------------------------------------------------------\n\
Ir                   file:function\n\
--------------------------------------------------------------------------------\n\
60,000,000 (30.00%)  /cargo/sha2-0.11.1/src/sha256/soft/unroll.rs:sha2::sha256::soft::unroll::compress [/x/pgward]\n\
50,000,000 (25.00%)  /rustc/abc/library/core/src/intrinsics/mod.rs:sha2::sha256::soft::unroll::compress [/x/pgward]\n\
40,000,000 (20.00%)  ???:start_thread [/usr/lib/x86_64-linux-gnu/libc.so.6]\n\
 1,000 ( 0.00%)  gateway-user/src/wire.rs:<pgward::wire::Frame>::read [/x/pgward]\n\
   500  pgward::bare::name\n";
        let f = parse_annotate(out, Merge::Sum);
        assert_eq!(f.len(), 4);
        // The two source files of one function are summed.
        assert_eq!(f[0], Func { ir: 110_000_000, percent: 55.0, name: "sha2::sha256::soft::unroll::compress".into() });
        assert_eq!(f[1], Func { ir: 40_000_000, percent: 20.0, name: "start_thread".into() });
        assert_eq!(f[2].name, "<pgward::wire::Frame>::read");
        assert_eq!(f[3].name, "pgward::bare::name");
        assert_eq!(parse_annotate(out, Merge::Max)[0].ir, 60_000_000);
        // No percentage column.
        let plain = "Ir \n200  PROGRAM TOTALS\n\nIr  file:function\n100  ???:main [/x]\n";
        assert_eq!(parse_annotate(plain, Merge::Sum), [Func { ir: 100, percent: 50.0, name: "main".into() }]);
        assert!(parse_annotate("nothing", Merge::Max).is_empty());
    }

    #[test]
    fn per_transaction_functions() {
        let f = |name: &str, ir| Func { ir, percent: 0.0, name: name.into() };
        let measured = [f("a", 2_200_000), f("b", 300_000), f("login", 50_000)];
        let base = [f("a", 200_000), f("login", 50_000)];
        let v = per_tx(&measured, &base, 2000, 2000.0);
        assert_eq!(v[0], PerTx { name: "a".into(), ir: 1000.0, percent: 50.0 });
        assert_eq!(v[1], PerTx { name: "b".into(), ir: 150.0, percent: 7.5 });
        assert_eq!(v[2].ir, 0.0);
    }

    #[test]
    fn digits_grouped() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(2708427), "2,708,427");
    }
}
