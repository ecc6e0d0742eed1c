//! Tests of event loops that flush their own sessions' batches (`writer::loop_flush`).

use std::sync::{Arc, Mutex};

use super::tests::{keys, opts, policy, records, stmt};
use super::verify;
use super::writer::{Waiter, fault};
use super::*;
use crate::config::FsyncPolicy;

/// Records the name of the thread a durable-hook ran on: the thread that made it durable.
struct ThreadOf(Mutex<Vec<String>>);

impl OnDurable for ThreadOf {
    fn durable(&self, waiter: Waiter) -> Option<Waiter> {
        let name = std::thread::current().name().unwrap_or("?").to_owned();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(name);
        Some(waiter)
    }
}

/// An event loop like pgward's: a current-thread runtime on a named thread, flushing `h`'s
/// batches; runs `tasks` tasks of `per_task` durable appends (each with a hook noting the
/// thread that made it durable). Their seqs, and the hooks' threads.
fn run_loop(
    h: AuditHandle,
    name: &str,
    tasks: u64,
    per_task: u64,
) -> std::thread::JoinHandle<(Vec<u64>, Vec<String>)> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let threads = Arc::new(ThreadOf(Mutex::new(Vec::new())));
            let seqs = rt.block_on(async {
                assert!(h.flush_on_this_loop());
                let mut joins = Vec::new();
                for t in 0..tasks {
                    let (h, hook) = (h.clone(), threads.clone());
                    joins.push(tokio::spawn(async move {
                        let mut v = Vec::new();
                        for i in 0..per_task {
                            let (rx, _) = h.submit_then(
                                stmt(t * 1000 + i),
                                Some(hook.clone() as Arc<dyn OnDurable>),
                            );
                            v.push(rx.await.expect("answered").expect("durable"));
                        }
                        v
                    }));
                }
                let mut all = Vec::new();
                for j in joins {
                    all.extend(j.await.expect("join"));
                }
                all
            });
            let threads = threads.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (seqs, threads)
        })
        .expect("loop thread")
}

#[test]
fn a_loop_writes_and_syncs_its_own_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(opts(d, 1_000_000)).expect("start");
    let (mut seqs, threads) = run_loop(h.clone(), "test-loop-a", 20, 25)
        .join()
        .expect("loop");
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=501).collect::<Vec<_>>());
    // The records were made durable on the loop itself. (The writer thread, waking on its
    // own timer, may take a batch the loop has not got to yet.)
    assert_eq!(threads.len(), 500);
    let on_loop = threads.iter().filter(|t| *t == "test-loop-a").count();
    assert!(on_loop >= 450, "{on_loop} of 500 made durable on the loop");
    let st = h.stats();
    assert_eq!((st.records, st.failed_batches), (501, 0));
    assert!(st.batches < 500, "no group commit on the loop: {st:?}");
    h.shutdown();
    let r = verify::verify_with(d, &keys(), &policy(1_000_000));
    assert!(r.is_ok(), "{}", r.summary());
}

#[test]
fn two_loops_share_one_log() {
    for direct in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let h = AuditHandle::start(WriterOptions {
            direct_io: direct,
            ..opts(d, 50)
        })
        .expect("start");
        let a = run_loop(h.clone(), "test-loop-a", 10, 40);
        let b = run_loop(h.clone(), "test-loop-b", 10, 40);
        let (sa, _) = a.join().expect("loop a");
        let (sb, _) = b.join().expect("loop b");
        // Acknowledged means durable: on disk before shutdown.
        let on_disk: std::collections::HashSet<u64> = records(d).iter().map(|r| r.seq).collect();
        assert!(sa.iter().chain(&sb).all(|s| on_disk.contains(s)));
        assert_eq!(sa.len() + sb.len(), 800);
        h.shutdown();
        let r = verify::verify(d, &keys());
        assert!(r.is_ok(), "{}", r.summary());
        assert_eq!(
            records(d)
                .iter()
                .filter(|r| r.kind == Kind::Statement)
                .count(),
            800
        );
    }
}

#[test]
fn a_failed_sync_on_a_loop_refuses_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let h = AuditHandle::start(opts(&d, 100)).expect("start");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        assert!(h.flush_on_this_loop());
        assert_eq!(h.append_durable(stmt(1)).await.expect("durable"), 2);
        fault::fail_next_sync(&d);
        let e = h
            .append_durable(stmt(2))
            .await
            .expect_err("injected sync failure");
        assert!(matches!(e, AuditError::Io { .. }), "{e:?}");
        assert!(!h.healthy());
        // The chain continues after the last durable record.
        assert_eq!(h.append_durable(stmt(3)).await.expect("durable"), 3);
        assert!(h.healthy());
    });
    h.shutdown();
    assert!(verify::verify(&d, &keys()).is_ok());
    let sqls: Vec<String> = records(&d).into_iter().filter_map(|r| r.sql).collect();
    assert_eq!(sqls, vec!["SELECT 1", "SELECT 3"]);
}

#[test]
fn shutdown_while_loops_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let h = AuditHandle::start(opts(&d, 100)).expect("start");
    let acked = Arc::new(Mutex::new(Vec::new()));
    let loops: Vec<_> = (0..2)
        .map(|i| {
            let (h, acked) = (h.clone(), acked.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    h.flush_on_this_loop();
                    // Until the writer refuses: every acknowledged record must survive.
                    for n in 0.. {
                        match h.append_durable(stmt(i * 1_000_000 + n)).await {
                            Ok(seq) => acked.lock().unwrap_or_else(|e| e.into_inner()).push(seq),
                            Err(_) => break,
                        }
                    }
                });
            })
        })
        .collect();
    while acked.lock().unwrap_or_else(|e| e.into_inner()).len() < 200 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    h.shutdown();
    for l in loops {
        l.join().expect("loop");
    }
    let on_disk: std::collections::HashSet<u64> = records(&d).iter().map(|r| r.seq).collect();
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(acked.iter().all(|s| on_disk.contains(s)));
    assert!(verify::verify(&d, &keys()).is_ok());
}

#[test]
fn only_group_commit_with_one_thread_flushes_on_loops() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (fsync, threads, expect) in [
        (FsyncPolicy::Group, 1, true),
        (FsyncPolicy::Group, 2, false),
        (FsyncPolicy::Always, 1, false),
        (FsyncPolicy::Off, 1, false),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = AuditHandle::start(WriterOptions {
            fsync,
            sync_threads: threads,
            ..opts(dir.path(), 100)
        })
        .expect("start");
        let got = rt.block_on(async {
            let on = h.flush_on_this_loop();
            // Records are durable either way.
            h.append_durable(stmt(1)).await.expect("durable");
            on
        });
        assert_eq!(got, expect, "{fsync:?} with {threads} thread(s)");
        h.shutdown();
    }
}
