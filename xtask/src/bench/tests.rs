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
    // The nanosecond clock and /proc's 10 ms ticks tell the same time.
    let (clock, stat) = (process_clock_secs(std::process::id()).unwrap(), proc_stat_cpu_secs(std::process::id()).unwrap());
    assert!((clock - stat).abs() < 0.05, "clock {clock} s, /proc stat {stat} s");
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
        flush: vec![("before", disk::Flush { p50_us: 100.0, p90_us: 120.0, cpu_us: 40.0, samples: 100, direct: true })],
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
fn flush_report_shows_the_audit_io_cpu_floor() {
    let t = table_of(
        &[Workload::SelectSimple, Workload::SelectExtended],
        &["direct", "pgbouncer", "pgward"],
        &[((0, 0), &[40000.0], &[]), ((0, 1), &[20000.0], &[10.0])],
    );
    let r = Report {
        flush: vec![
            ("before", disk::Flush { p50_us: 100.0, p90_us: 120.0, cpu_us: 36.0, samples: 100, direct: true }),
            ("after", disk::Flush { p50_us: 100.0, p90_us: 120.0, cpu_us: 44.0, samples: 100, direct: true }),
        ],
        ..Report::default()
    };
    let s = Settings { quick: true, duration: 5, cycles: 1, clients: 8, threads: 2, scale: 1, rows_reps: 1, warmup: 1, idle_sessions: 10 };
    let mut o = String::new();
    r.render_flush(&mut o, &t, &s);
    assert!(o.contains("CPU  36.0 µs per flush") && o.contains("CPU  44.0 µs per flush"), "{o}");
    // Mean 40 µs per flush over at most 8 statements: 5 µs; budget 1.3 × 10 µs = 13 µs.
    assert!(o.contains("costs ≥ 5.0 µs CPU per statement"), "{o}");
    assert!(o.contains("select-simple    PgBouncer  10.0 µs, budget  13.0 µs, audit I/O floor 38% of the budget"), "{o}");
    // 13 − 10 − 5: nothing is left for pgward's own work (parsing, policy, the record's hash).
    assert!(o.contains("left for all pgward does beyond PgBouncer's relay: -2.0 µs"), "{o}");
    // No PgBouncer CPU for extended: no line for it.
    assert!(!o.contains("select-extended  PgBouncer"), "{o}");
}

#[test]
fn budget_checks_cpu_pgaudit_and_tpcb() {
    let t = table_of(
        &[Workload::SelectSimple, Workload::Tpcb],
        &["direct", "direct+pgaudit", "pgbouncer", "splice", "pgward"],
        &[
            ((0, 1), &[30000.0], &[]),
            ((0, 2), &[20000.0], &[10.0]),
            ((0, 4), &[25000.0], &[14.0]),
            ((1, 2), &[1000.0], &[70.0]),
            ((1, 4), &[790.0], &[140.0]),
        ],
    );
    let r = Report { main: Some(t), ..Report::default() };
    let checks = r.budget();
    let pass = |name: &str| checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}")).pass;
    assert_eq!(pass("select-simple: pgward ≥ pgbouncer"), Some(true));
    assert_eq!(pass("select-simple: pgward ≥ direct+pgaudit"), Some(false));
    // 14 µs ≤ 1.3 × 10 µs fails; nothing measured for extended.
    assert_eq!(pass("select-simple: pgward CPU per statement ≤ 1.3× pgbouncer's"), Some(false));
    assert_eq!(pass("select-extended: pgward CPU per statement ≤ 1.3× pgbouncer's"), None);
    assert_eq!(pass("tpc-b: pgward ≥ 0.8× pgbouncer"), Some(false));
}

/// One filled cell: (workload index, target index), samples, CPU µs per transaction.
type CellSpec<'a> = ((usize, usize), &'a [f64], &'a [f64]);

/// A table of `workloads` × `targets` with the given cells.
fn table_of(workloads: &[Workload], targets: &[&str], cells: &[CellSpec]) -> Table {
    let ts: Vec<Target> = targets.iter().map(|n| Target::service(n, 1)).collect();
    let mut t = Table::new(workloads, &ts);
    for (at, samples, cpu) in cells {
        // Context switches: a tenth of the CPU µs, distinct numbers for their columns.
        let switches = cpu.iter().map(|c| c / 10.0).collect();
        t.cells.insert(*at, Cell { samples: samples.to_vec(), cpu_us: cpu.to_vec(), switches, ..Cell::default() });
    }
    t
}

#[test]
fn statements_per_transaction() {
    for (w, n) in [
        (Workload::SelectSimple, 1),
        (Workload::SelectExtended, 1),
        (Workload::SelectPrepared, 1),
        (Workload::Tpcb, 7),
        (Workload::Latency, 1),
        (Workload::Churn, 1),
        (Workload::Rows, 1),
    ] {
        assert_eq!(w.statements_per_txn(), n, "{}", w.name());
    }
}

#[test]
fn cpu_per_statement_divides_the_median_per_transaction() {
    let t = table_of(
        &[Workload::SelectSimple, Workload::Tpcb, Workload::Rows],
        &["direct", "pgward"],
        &[((0, 1), &[1.0], &[31.0, 29.0, 40.0]), ((1, 1), &[1.0], &[700.0, 350.0]), ((2, 1), &[1.0], &[])],
    );
    for (w, target, want) in [
        (Workload::SelectSimple, "pgward", Some(31.0)),
        (Workload::Tpcb, "pgward", Some(75.0)),
        (Workload::Rows, "pgward", None),
        (Workload::SelectSimple, "direct", None),
        (Workload::SelectSimple, "nobody", None),
    ] {
        assert_eq!(t.cpu_per_statement(w, target), want, "{} {target}", w.name());
    }
}

#[test]
fn grid_aligns_columns() {
    let rows = |r: &[&[&str]]| -> Vec<Vec<String>> { r.iter().map(|x| x.iter().map(|c| c.to_string()).collect()).collect() };
    for (rows, left, want) in [
        (rows(&[&["a", "bb", "c"], &["ccc", "d", "ee"]]), 1, "a   bb  c\nccc  d ee\n"),
        (rows(&[&["a", "bb", "c"], &["ccc", "d", "ee"]]), 2, "a   bb  c\nccc d  ee\n"),
        // µs and × are one column each; a left column's padding is not left at the line's end.
        (rows(&[&["µs", "1.00×"], &["tps", "12"]]), 2, "µs  1.00×\ntps 12\n"),
        (rows(&[&["x", ""], &["yy"]]), 1, "x\nyy\n"),
        (Vec::new(), 1, ""),
    ] {
        assert_eq!(grid(&rows, left), want);
    }
}

#[test]
fn table_shows_cpu_per_statement_pgbouncer_then_pgward() {
    let targets = ["direct", "direct+pgaudit", "pgbouncer", "splice", "pgward"];
    let t = table_of(
        &[Workload::SelectSimple, Workload::Tpcb],
        &targets,
        &[
            ((0, 0), &[40000.0], &[]),
            ((0, 1), &[30000.0], &[]),
            ((0, 2), &[20000.0], &[18.5]),
            ((0, 3), &[22000.0], &[19.6]),
            ((0, 4), &[10000.0], &[47.1]),
            ((1, 0), &[3000.0], &[]),
            ((1, 2), &[2000.0], &[140.0]),
            ((1, 4), &[1200.0], &[385.0]),
        ],
    );
    let mut o = String::new();
    render_table(&mut o, &t);
    let lines: Vec<&str> = o.lines().collect();
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    for (line, want) in [
        (0, "workload unit direct direct+pgaudit pgbouncer splice pgward | pgbouncer cpu pgward cpu splice cpu | pgbouncer cs pgward cs splice cs"),
        (1, "select-simple tps 40000 30000 (0.75×) 20000 (0.50×) 22000 (0.55×) 10000 (0.25×) | 18.5 47.1 19.6 | 1.85 4.71 1.96"),
        // TPC-B: per statement = per transaction / 7; no splice sample, no pgaudit run.
        (2, "tpc-b tps 3000 - 2000 (0.67×) - 1200 (0.40×) | 20.0 55.0 - | 2.00 5.50 -"),
        (3, "<target> cpu: µs of user + system CPU of that proxy's process per SQL statement (over each run, / (transactions × statements per transaction))"),
        (4, "<target> cs: context switches of that proxy's threads per SQL statement (each time a thread slept and was woken, or was preempted), counted the same way"),
        (5, "tpc-b: 7 statements per transaction"),
    ] {
        assert_eq!(words(lines[line]).join(" "), want, "line {line} of:\n{o}");
    }
    assert_eq!(lines.len(), 6, "{o}");
    // Columns line up: each header ends where its values end (in characters: µ and × are one).
    let end = |l: &str, word: &str| l.find(word).map(|i| l[..i].chars().count() + word.chars().count());
    assert_eq!(end(lines[0], "pgward cpu"), end(lines[1], "47.1"), "{o}");
    assert_eq!(end(lines[0], "direct+pgaudit"), end(lines[1], "30000 (0.75×)"), "{o}");
}

#[test]
fn table_without_cpu_samples_has_no_cpu_columns() {
    let t = table_of(&[Workload::Rows], &["direct", "pgward"], &[((0, 0), &[300.0], &[]), ((0, 1), &[320.0], &[])]);
    let mut o = String::new();
    render_table(&mut o, &t);
    assert_eq!(o, "workload  unit direct        pgward\nrows-100k ms    300.0 320.0 (1.07×)\n");
}

#[test]
fn cpu_legend_notes_the_workloads_counted_differently() {
    for (workloads, notes) in [
        (vec![Workload::SelectSimple, Workload::Latency], vec![]),
        (vec![Workload::Tpcb], vec!["  tpc-b: 7 statements per transaction"]),
        (
            MAIN_WORKLOADS.to_vec(),
            vec![
                "  tpc-b: 7 statements per transaction",
                "  churn: each statement's connection and login included",
                "  rows-100k: one psql run (one statement), its login included",
            ],
        ),
    ] {
        let legend = cpu_legend(&workloads);
        let lines: Vec<&str> = legend.lines().collect();
        assert!(lines[0].starts_with("<target> cpu: µs of user + system CPU"), "{legend}");
        assert!(lines[1].starts_with("<target> cs: context switches"), "{legend}");
        assert_eq!(lines[2..], notes[..], "{legend}");
    }
}

#[test]
fn pgaudit_status_in_the_report() {
    use super::pgaudit::{PACKAGE, Status, fmt_bytes, missing_files};
    let measured = Status::Measured { version: "1.7".into(), log_bytes: 3 * 1024 * 1024 };
    let missing = Status::NotInstalled(format!("pgaudit is not installed; install the Debian package {PACKAGE}"));
    let failed = Status::Failed("setting up pgaudit: boom".into());
    for (st, errors, json_status, line_has) in [
        (&measured, 0, "measured", "pgaudit 1.7 (pgaudit.log = 'all', logging_collector = on, clients connect directly); it wrote 3.0 MiB of log"),
        (&missing, 0, "skipped", "direct+pgaudit: skipped: pgaudit is not installed; install the Debian package postgresql-15-pgaudit"),
        (&failed, 1, "failed", "direct+pgaudit: skipped after an ERROR: setting up pgaudit: boom"),
    ] {
        assert_eq!(st.errors(), errors);
        assert_eq!(st.json()["status"], json_status);
        assert!(st.line().contains(line_has), "{}", st.line());
    }
    assert_eq!(measured.json()["log_bytes"], 3 * 1024 * 1024);
    assert_eq!(measured.json()["pgaudit_log"], "all");
    // A failed setup is a failed measurement of the whole report.
    let r = Report { pgaudit: Some(Status::Failed("x".into())), ..Report::default() };
    assert_eq!(r.errors(), 1);

    for (n, want) in [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 30, "3.00 GiB")] {
        assert_eq!(fmt_bytes(n), want);
    }

    let dir = std::env::temp_dir().join(format!("pgward-pgaudit-test-{}", std::process::id()));
    let (lib, share) = (dir.join("lib"), dir.join("share"));
    std::fs::create_dir_all(share.join("extension")).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    let err = missing_files(&lib, &share).unwrap_err();
    assert!(err.contains("pgaudit.so") && err.contains(PACKAGE), "{err}");
    std::fs::write(lib.join("pgaudit.so"), "").unwrap();
    let err = missing_files(&lib, &share).unwrap_err();
    assert!(err.contains("extension/pgaudit.control"), "{err}");
    std::fs::write(share.join("extension/pgaudit.control"), "").unwrap();
    assert_eq!(missing_files(&lib, &share), Ok(()));
    let _ = std::fs::remove_dir_all(&dir);
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
