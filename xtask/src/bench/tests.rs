use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use super::report::*;
use super::run::*;

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
