//! The `micro` section: gateway-user's hand-run micro-benchmarks, the `#[ignore]` tests
//! `policy::tests::bench_decide` and `audit::tests::throughput`, as
//! `cargo test -p gateway-user --release --lib -- --ignored --nocapture --exact <name>` would run
//! them: the release test binary is built once (`--no-run`, its path read from cargo's JSON
//! messages), then run once per test, so both tests run the same build even while the sources
//! change underneath.
//!
//! Their printed lines are kept as they are (the tests' output format is theirs to change);
//! numbers are picked out where a line has a known shape (`<what>: <duration>/call`,
//! `<n>/s`), and a line with no known shape is still reported. A test that is gone (renamed)
//! or fails is an error of this section, not of the whole bench.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::run_limited;
use crate::util;

pub const TESTS: [&str; 2] = ["policy::tests::bench_decide", "audit::tests::throughput"];

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: String,
}

pub struct TestRun {
    pub test: String,
    /// The equivalent cargo command (to run it by hand).
    pub command: String,
    /// The test binary that ran.
    pub binary: Option<PathBuf>,
    pub secs: f64,
    /// What the test printed (libtest's own lines removed).
    pub lines: Vec<String>,
    pub metrics: Vec<Metric>,
    pub error: Option<String>,
}

impl TestRun {
    pub fn json(&self) -> Value {
        json!({
            "test": self.test,
            "command": self.command,
            "binary": self.binary.as_ref().map(|p| p.display().to_string()),
            "ok": self.error.is_none(),
            "seconds": self.secs,
            "lines": self.lines,
            "metrics": self.metrics.iter().map(|m| json!({ "name": m.name, "value": m.value, "unit": m.unit })).collect::<Vec<_>>(),
            "error": self.error,
        })
    }
}

/// `cargo test -p gateway-user --release --lib --no-run` (progress shown on stderr); the test
/// binary's path from cargo's JSON messages.
fn build(root: &Path) -> Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.current_dir(root)
        .args(["test", "-p", "gateway-user", "--release", "--lib", "--no-run", "--message-format=json-render-diagnostics"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    util::step("micro: build gateway-user's release test binary: cargo test -p gateway-user --release --lib --no-run");
    let start = Instant::now();
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test -p gateway-user --release --lib --no-run failed ({})", out.status);
    }
    let exe = test_executable(&String::from_utf8_lossy(&out.stdout)).context("cargo named no test executable for gateway-user's lib")?;
    util::step(&format!("micro: built {} in {:.1}s", exe.display(), start.elapsed().as_secs_f64()));
    Ok(exe)
}

/// The lib test executable of gateway-user in cargo's `--message-format=json` output.
pub fn test_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|x| x == "lib")))
        .filter(|m| m["package_id"].as_str().is_some_and(|p| p.contains("gateway-user")))
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Build the release test binary (output shown: it can take minutes), then run each test.
pub fn run(root: &Path, interrupted: &dyn Fn() -> bool) -> Vec<TestRun> {
    let exe = build(root);
    let crate_dir = root.join("gateway-user");
    TESTS
        .iter()
        .map(|&test| {
            let command = format!("cargo test -p gateway-user --release --lib -- --ignored --nocapture --exact {test}");
            let mut r = TestRun { test: test.into(), command, binary: None, secs: 0.0, lines: Vec::new(), metrics: Vec::new(), error: None };
            let exe = match &exe {
                Ok(e) => e,
                Err(e) => {
                    r.error = Some(format!("the test binary did not build: {e:#}"));
                    return r;
                }
            };
            if interrupted() {
                r.error = Some("interrupted".into());
                return r;
            }
            r.binary = Some(exe.clone());
            util::step(&format!("micro: {test}"));
            let start = Instant::now();
            // As cargo runs it: from the package directory, with its manifest dir set.
            let mut cmd = Command::new(exe);
            cmd.current_dir(&crate_dir).env("CARGO_MANIFEST_DIR", &crate_dir).args(["--ignored", "--nocapture", "--exact", test]);
            let out = run_limited(&mut cmd, Duration::from_secs(600));
            r.secs = start.elapsed().as_secs_f64();
            match out {
                Err(e) => r.error = Some(format!("{e:#}")),
                Ok((status, stdout, stderr)) => {
                    let o = test_output(&stdout);
                    r.lines = o.lines;
                    r.metrics = r.lines.iter().flat_map(|l| metrics(l)).collect();
                    for l in &r.lines {
                        eprintln!("    [micro] {l}");
                    }
                    r.error = if o.ran == Some(0) {
                        Some(format!("no test named {test} (renamed or removed?)"))
                    } else if !status.success() {
                        let tail: Vec<&str> = stderr.lines().chain(stdout.lines()).filter(|l| !l.trim().is_empty()).collect();
                        Some(format!("failed ({status}): {}", tail[tail.len().saturating_sub(8)..].join(" | ")))
                    } else {
                        None
                    };
                }
            }
            r
        })
        .collect()
}

pub struct TestOutput {
    /// From libtest's `running N test(s)`.
    pub ran: Option<usize>,
    pub lines: Vec<String>,
}

/// The lines a test printed under `--nocapture`, without libtest's framing (`running 1 test`,
/// `test x ... ok`, `test result: …`, failure sections are kept).
pub fn test_output(stdout: &str) -> TestOutput {
    let mut ran = None;
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let t = line.trim_end();
        if t.trim().is_empty() || t.starts_with("test result:") {
            continue;
        }
        if let Some(n) = t.strip_prefix("running ").and_then(|r| r.strip_suffix(" tests").or_else(|| r.strip_suffix(" test")))
            && let Ok(n) = n.trim().parse::<usize>()
        {
            ran = Some(ran.unwrap_or(0) + n);
            continue;
        }
        // `test a::b ... ok` (or, with one test thread, `test a::b ... <first printed line>`).
        if let Some(rest) = t.strip_prefix("test ").and_then(|r| r.split_once(" ... ")).map(|(_, rest)| rest) {
            if !matches!(rest.trim(), "ok" | "ignored" | "FAILED" | "") {
                lines.push(rest.to_string());
            }
            continue;
        }
        if matches!(t.trim(), "ok" | "FAILED") {
            continue;
        }
        lines.push(t.to_string());
    }
    TestOutput { ran, lines }
}

/// Numbers in a line of known shape: `<what>: <duration>/call` (ns per call) and `<n>/s`
/// (per second, named after the text before `:` without a leading count and ` in …`).
pub fn metrics(line: &str) -> Vec<Metric> {
    let mut v = Vec::new();
    if let Some((what, rest)) = line.rsplit_once(": ")
        && let Some(d) = rest.trim().strip_suffix("/call")
        && let Some(ns) = duration_ns(d)
    {
        v.push(Metric { name: what.trim().to_string(), value: ns, unit: "ns/call".into() });
        return v;
    }
    let label = line.split_once(':').map_or(line, |(a, _)| a);
    let label = label.split_once(" in ").map_or(label, |(a, _)| a).trim();
    let label = label.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '_').trim();
    for tok in line.split_whitespace() {
        let tok = tok.trim_end_matches([',', ';', ')']);
        if let Some(n) = tok.strip_suffix("/s")
            && let Ok(x) = n.parse::<f64>()
        {
            let name = if label.is_empty() { "rate".to_string() } else { label.to_string() };
            v.push(Metric { name, value: x, unit: "/s".into() });
        }
    }
    v
}

/// Rust's `Debug` of a `Duration` (`99ns`, `20.873µs`, `1.5ms`, `1.527243547s`) in ns.
pub fn duration_ns(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = [("ns", 1.0), ("µs", 1e3), ("us", 1e3), ("ms", 1e6), ("s", 1e9)]
        .iter()
        .find_map(|&(unit, scale)| s.strip_suffix(unit).map(|n| (n, scale)))?;
    num.trim().parse::<f64>().ok().filter(|x| x.is_finite()).map(|x| x * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ns("99ns"), Some(99.0));
        assert_eq!(duration_ns("20.873µs"), Some(20873.0));
        assert_eq!(duration_ns("1.5ms"), Some(1_500_000.0));
        assert_eq!(duration_ns("2s"), Some(2e9));
        assert_eq!(duration_ns("fast"), None);
        assert_eq!(duration_ns("ns"), None);
    }

    #[test]
    fn libtest_framing_removed() {
        let out = "\nrunning 1 test\ncached decide: 99ns/call\nuncached decide (parse): 20.873µs/call\n\
                   test policy::tests::bench_decide ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; \
                   0 measured; 120 filtered out; finished in 0.33s\n\n";
        let o = test_output(out);
        assert_eq!(o.ran, Some(1));
        assert_eq!(o.lines, ["cached decide: 99ns/call", "uncached decide (parse): 20.873µs/call"]);
        // One test thread: the first printed line shares libtest's `test x ... ` line.
        let out = "running 1 test\ntest policy::tests::bench_decide ... cached decide: 61ns/call\nsecond line\nok\n";
        assert_eq!(test_output(out).lines, ["cached decide: 61ns/call", "second line"]);
        let none = "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 121 filtered out\n";
        let o = test_output(none);
        assert_eq!(o.ran, Some(0));
        assert!(o.lines.is_empty());
    }

    #[test]
    fn test_executable_from_cargo_messages() {
        let msgs = r#"{"reason":"compiler-artifact","package_id":"registry+https://github.com/rust-lang/crates.io-index#ring@0.17.14","target":{"kind":["lib"]},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","package_id":"path+file:///work/main/gateway-user#0.1.0","target":{"kind":["bin"],"name":"pgward"},"profile":{"test":true},"executable":"/t/release/deps/pgward-bin"}
{"reason":"compiler-artifact","package_id":"path+file:///work/main/gateway-user#0.1.0","manifest_path":"/work/main/gateway-user/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"pgward"},"profile":{"opt_level":"3","test":true},"executable":"/work/main/target/release/deps/pgward-afd585b3c220612f","fresh":false}
{"reason":"build-finished","success":true}"#;
        assert_eq!(test_executable(msgs), Some(PathBuf::from("/work/main/target/release/deps/pgward-afd585b3c220612f")));
        assert_eq!(test_executable("not json\n"), None);
    }

    #[test]
    fn metrics_of_known_shapes() {
        assert_eq!(
            metrics("uncached decide (parse): 20.873µs/call"),
            [Metric { name: "uncached decide (parse)".into(), value: 20873.0, unit: "ns/call".into() }]
        );
        let m = metrics("102400 durable appends in 1.527243547s: 67049/s, 959 batches (106.9 records/batch), 959 syncs");
        assert_eq!(m, [Metric { name: "durable appends".into(), value: 67049.0, unit: "/s".into() }]);
        // Another shape: no numbers, but no error either (the line is still reported).
        assert!(metrics("writer: 3 threads, batching on").is_empty());
        assert!(metrics("cached decide took about 90 ns").is_empty());
    }
}
