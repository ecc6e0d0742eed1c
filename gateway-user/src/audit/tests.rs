//! Tests of the writer, reader and verifier together.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use super::chain::{self, GENESIS_HASH, Head};
use super::reader::Reader;
use super::verify::{self, PublicKeys, VerifyReport};
use super::writer::fault;
use super::*;
use crate::config::FsyncPolicy;

pub(super) const KID: &str = "gw-test";

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

pub(super) fn keys() -> PublicKeys {
    let mut k = PublicKeys::new();
    k.insert(KID.into(), signing_key().verifying_key());
    k
}

pub(super) fn opts(dir: &Path, every: u64) -> WriterOptions {
    WriterOptions {
        export: None,
        on_checkpoint: None,
        dir: dir.to_owned(),
        fsync: FsyncPolicy::Group,
        checkpoint_every: every,
        checkpoint_interval: Duration::from_secs(3600),
        segment_bytes: 64 * 1024 * 1024,
        sync_threads: 1,
        direct_io: true,
        signer: Some(CheckpointSigner::new(KID, signing_key())),
    }
}

/// The other way batches reach the disk: through the page cache, two pipelined writer threads.
fn buffered(o: WriterOptions) -> WriterOptions {
    WriterOptions { sync_threads: 2, direct_io: false, ..o }
}

pub(super) fn stmt(n: u64) -> Record {
    Record {
        kind: Kind::Statement,
        session: Some("s1".into()),
        user: Some("alice".into()),
        database: Some("app".into()),
        sql: Some(format!("SELECT {n}")),
        protocol: Some("simple".into()),
        decision: Some("allow".into()),
        ..Record::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}

/// `tasks` concurrent tasks each append `per_task` statements durably; all their seqs.
fn append_from_tasks(h: &AuditHandle, tasks: u64, per_task: u64) -> Vec<u64> {
    rt().block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let h = h.clone();
            handles.push(tokio::spawn(async move {
                let mut v = Vec::new();
                for i in 0..per_task {
                    v.push(h.append_durable(stmt(t * 100 + i)).await.expect("append"));
                }
                v
            }));
        }
        let mut all = Vec::new();
        for t in handles {
            all.extend(t.await.expect("join"));
        }
        all
    })
}

/// Start a writer, append `n` statements durably, shut down. Returns their seqs.
fn write_log(o: WriterOptions, n: u64) -> Vec<u64> {
    let h = AuditHandle::start(o).expect("start");
    let seqs = rt().block_on(async {
        let mut v = Vec::new();
        for i in 0..n {
            v.push(h.append_durable(stmt(i)).await.expect("append"));
        }
        v
    });
    h.shutdown();
    seqs
}

/// Every stored line of the log as (file, line text).
fn lines(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut r = Reader::open(dir).expect("reader");
    let mut out = Vec::new();
    while let Some(l) = r.next_line() {
        let l = l.expect("line");
        out.push((l.segment.to_path_buf(), String::from_utf8(l.raw).expect("utf8")));
    }
    out
}

pub(super) fn records(dir: &Path) -> Vec<Record> {
    Reader::open(dir).expect("reader").map(|e| e.expect("entry").record).collect()
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    chain::list_segments(dir).expect("list").into_iter().map(|s| s.path).collect()
}

/// Rewrite one line (by seq) of the log in place with `f` applied to its text.
fn edit_line(dir: &Path, seq: u64, f: impl Fn(&str) -> Option<String>) {
    for path in segment_paths(dir) {
        let text = std::fs::read_to_string(&path).expect("read");
        let needle = format!("{{\"seq\":{seq},");
        if !text.lines().any(|l| l.starts_with(&needle)) {
            continue;
        }
        let mut out = String::new();
        for l in text.lines() {
            if l.starts_with(&needle) {
                if let Some(new) = f(l) {
                    out.push_str(&new);
                    out.push('\n');
                }
            } else {
                out.push_str(l);
                out.push('\n');
            }
        }
        std::fs::write(&path, out).expect("write");
        return;
    }
    panic!("seq {seq} not found");
}

/// What an attacker with write access does: change records and recompute the whole chain.
/// `f` gets the record and the (new) hash of the record before it.
fn rewrite_and_rechain(dir: &Path, mut f: impl FnMut(&mut Record, &str)) {
    let mut prev = GENESIS_HASH.to_string();
    for path in segment_paths(dir) {
        let text = std::fs::read_to_string(&path).expect("read");
        let mut out = String::new();
        for l in text.lines() {
            let mut rec: Record = serde_json::from_str(l).expect("parse");
            f(&mut rec, &prev);
            rec.prev_hash = prev.clone();
            rec.hash.clear();
            let c = serde_json::to_string(&rec).expect("ser");
            let h = hex::encode(Sha256::new().chain_update(prev.as_bytes()).chain_update(c.as_bytes()).finalize());
            out.push_str(&c[..c.len() - 1]);
            out.push_str(&format!(",\"hash\":\"{h}\"}}\n"));
            prev = h;
        }
        std::fs::write(&path, out).expect("write");
    }
}

/// The verify policy matching `opts(_, every)`.
pub(super) fn policy(every: u64) -> verify::Policy {
    verify::Policy { checkpoint_every: every, checkpoint_interval: Duration::from_secs(3600) }
}

fn problem(r: &VerifyReport) -> &verify::Problem {
    r.problem.as_ref().unwrap_or_else(|| panic!("expected a problem, got {}", r.summary()))
}

#[test]
fn chain_written_then_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    let seqs = write_log(opts(&d, 4), 10);
    // seq 1 start; statements 2..=4, checkpoint 5, 6..=9, checkpoint 10, 11..=13, final checkpoint 14.
    assert_eq!(seqs, vec![2, 3, 4, 6, 7, 8, 9, 11, 12, 13]);

    let ls = lines(&d);
    assert_eq!(ls.len(), 14);
    // The line format, checked independently of the writer's code.
    let mut prev = GENESIS_HASH.to_string();
    for (i, (_, l)) in ls.iter().enumerate() {
        let pos = l.rfind(",\"hash\":\"").expect("hash suffix");
        let hash = &l[pos + 9..l.len() - 2];
        let canonical = format!("{}}}", &l[..pos]);
        assert!(canonical.starts_with(&format!("{{\"seq\":{},\"ts\":\"", i + 1)), "{canonical}");
        assert!(canonical.contains(&format!("\"prev_hash\":\"{prev}\"")));
        let expect =
            hex::encode(Sha256::new().chain_update(prev.as_bytes()).chain_update(canonical.as_bytes()).finalize());
        assert_eq!(hash, expect);
        prev = hash.to_string();
    }
    let recs = records(&d);
    assert_eq!(recs[0].kind, Kind::Start);
    assert_eq!(recs[0].prev_hash, GENESIS_HASH);
    let ts = &recs[1].ts;
    assert_eq!(ts.len(), "2026-11-29T14:00:00.123456Z".len(), "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    let ck = &recs[4];
    assert_eq!(ck.kind, Kind::Checkpoint);
    assert_eq!(ck.anchor_seq, Some(4));
    assert_eq!(ck.anchor_hash.as_deref(), Some(recs[3].hash.as_str()));
    assert_eq!(ck.kid.as_deref(), Some(KID));

    let head: Head = serde_json::from_slice(&std::fs::read(d.join("HEAD")).expect("HEAD")).expect("parse HEAD");
    assert_eq!((head.seq, head.anchor_seq), (14, 13));
    assert_eq!(head.hash, recs[13].hash);

    let r = verify::verify(&d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!((r.records, r.segments, r.checkpoints), (14, 1, 3));
    assert_eq!((r.last_anchored_seq, r.unanchored, r.head_seq), (Some(13), 0, Some(14)));
    assert_eq!(
        r.summary(),
        "audit log OK: 14 records in 1 segment, 3 checkpoints, last anchored seq 13 (0 unanchored records after it)"
    );
}

#[test]
fn group_commit_from_many_tasks() {
    group_commit_from_many_tasks_with(|o| o, true);
    group_commit_from_many_tasks_with(buffered, false);
}

fn group_commit_from_many_tasks_with(f: fn(WriterOptions) -> WriterOptions, direct: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let h = AuditHandle::start(f(opts(&d, 1_000_000))).expect("start");
    assert_eq!(h.direct_io(), direct);
    let mut seqs = append_from_tasks(&h, 200, 10);
    // Durable before shutdown: every acknowledged seq is already in the file.
    let on_disk: Vec<u64> = records(&d).iter().map(|r| r.seq).collect();
    assert_eq!(on_disk, (1..=2001).collect::<Vec<_>>());
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=2001).collect::<Vec<_>>());
    let st = h.stats();
    assert_eq!(st.records, 2001);
    assert_eq!(st.failed_batches, 0);
    assert_eq!(st.syncs, st.batches);
    assert!(st.batches < st.records, "no batching happened: {st:?}");
    h.shutdown();
    let r = verify::verify_with(&d, &keys(), &policy(1_000_000));
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!((r.records, r.checkpoints, r.last_anchored_seq), (2002, 1, Some(2001)));
}

#[test]
fn submit_then_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = AuditHandle::start(opts(dir.path(), 100)).expect("start");
    let rxs: Vec<_> = (0..3).map(|i| h.submit(stmt(i))).collect();
    let got: Vec<u64> = rt().block_on(async {
        let mut v = Vec::new();
        for rx in rxs {
            v.push(rx.await.expect("answered").expect("durable"));
        }
        v
    });
    assert_eq!(got, vec![2, 3, 4]);
    h.shutdown();
    let rx = h.submit(stmt(9));
    assert!(matches!(rt().block_on(rx), Ok(Err(AuditError::Closed))));
}

#[test]
fn edited_sql_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 100), 5);
    assert!(verify::verify(d, &keys()).is_ok());
    edit_line(d, 3, |l| Some(l.replace("SELECT 1", "SELECT 9")));
    let r = verify::verify(d, &keys());
    let p = problem(&r);
    assert_eq!(p.seq, Some(3));
    assert_eq!(p.line, Some(3));
    assert_eq!(p.file.as_deref(), Some(d.join(chain::segment_name(1)).as_path()));
    assert!(p.reason.starts_with("hash mismatch"), "{}", p.reason);
    assert!(r.summary().starts_with("audit log BROKEN at seq 3 (audit-0000000000000001.jsonl:3): hash mismatch"));
}

#[test]
fn deleted_line_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 100), 5);
    edit_line(d, 4, |_| None);
    let r = verify::verify(d, &keys());
    let p = problem(&r);
    assert_eq!((p.seq, p.line), (Some(5), Some(4)));
    assert_eq!(p.reason, "seq gap: expected seq 4, found 5 (records 4..4 missing)");
}

#[test]
fn truncated_tail_past_head_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 3), 7);
    // 1 start, 2 3 stmt, 4 ckpt, 5 6 7 stmt, 8 ckpt, 9 10 stmt, 11 final ckpt
    assert_eq!(verify::verify(d, &keys()).head_seq, Some(11));
    let seg = d.join(chain::segment_name(1));
    let text = std::fs::read_to_string(&seg).expect("read");
    let keep: String = text.lines().take(9).map(|l| format!("{l}\n")).collect();
    std::fs::write(&seg, keep).expect("truncate");
    let r = verify::verify(d, &keys());
    let p = problem(&r);
    assert_eq!(p.reason, "truncated: log ends at seq 9 but HEAD checkpoint is seq 11");
    assert_eq!(p.seq, Some(11));
    assert_eq!(
        r.summary(),
        "audit log BROKEN at seq 11 (HEAD): truncated: log ends at seq 9 but HEAD checkpoint is seq 11"
    );
}

#[test]
fn unanchored_tail_is_a_warning_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(opts(d, 3)).expect("start");
    rt().block_on(async {
        for i in 0..4 {
            h.append_durable(stmt(i)).await.expect("append");
        }
    });
    // No shutdown yet: 1 start, 2 3, 4 ckpt, 5 6 unanchored.
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!((r.last_anchored_seq, r.unanchored), (Some(3), 2));
    assert_eq!(
        r.summary(),
        "audit log OK: 6 records in 1 segment, 1 checkpoint, last anchored seq 3 (2 unanchored records after it)"
    );
    h.shutdown();
}

#[test]
fn restart_continues_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    assert_eq!(write_log(opts(d, 100), 3), vec![2, 3, 4]);
    // run 1: 1 start, 2..4, 5 final ckpt; run 2: 6 start, 7..9, 10 ckpt
    assert_eq!(write_log(opts(d, 100), 3), vec![7, 8, 9]);
    let recs = records(d);
    assert_eq!(recs.len(), 10);
    assert_eq!(recs[5].kind, Kind::Start);
    assert_eq!(recs[5].prev_hash, recs[4].hash);
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!((r.records, r.checkpoints, r.head_seq), (10, 2, Some(10)));
}

#[test]
fn restart_drops_an_interrupted_fragment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 100), 2);
    let seg = d.join(chain::segment_name(1));
    let good = std::fs::metadata(&seg).expect("stat").len();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(b"{\"seq\":5,\"ts\":\"2026").expect("write");
    }
    assert_eq!(problem(&verify::verify(d, &keys())).seq, Some(5));
    let seqs = write_log(opts(d, 100), 1);
    assert_eq!(seqs, vec![6]);
    let recs = records(d);
    assert_eq!(recs[4].kind, Kind::Start);
    let warnings = recs[4].meta.as_ref().and_then(|m| m.get("warnings")).expect("warning recorded");
    assert!(warnings.to_string().contains("unterminated fragment"), "{warnings}");
    assert!(std::fs::metadata(&seg).expect("stat").len() > good);
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
}

/// The active segment is preallocated to the segment size (batches overwrite zero-filled
/// space, so an fdatasync does not also have to write the inode): readers stop at the
/// zeros, a clean shutdown trims them, and what a crash leaves — the zero tail plus the
/// bytes of a never-synced batch that reached the disk after a gap — goes at the next start.
#[test]
fn preallocated_segment_is_read_live_trimmed_and_recovered() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let size = 1u64 << 20;
    let o = || WriterOptions { segment_bytes: size, ..opts(d, 100) };
    let h = AuditHandle::start(o()).expect("start");
    assert_eq!(append_from_tasks(&h, 2, 5).len(), 10);
    let seg = d.join(chain::segment_name(1));
    assert_eq!(std::fs::metadata(&seg).expect("stat").len(), size, "preallocated while in use");
    let live = verify::verify(d, &keys());
    assert!(live.is_ok(), "{}", live.summary());
    assert_eq!(live.records, 11, "start + 10 statements, read up to the zero tail");
    h.shutdown();
    let clean = std::fs::read(&seg).expect("read");
    assert!(!clean.contains(&0) && clean.ends_with(b"\n"), "a closed segment holds just its lines");

    // As a crash leaves it: still preallocated, and a later unsynced write landed on disk
    // while the one before it did not.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open");
    f.set_len(size).expect("extend");
    f.write_all_at(b"{\"seq\":99,\"ts\":\"2026\"}\n", clean.len() as u64 + 4096).expect("write");
    drop(f);
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "nothing before the first NUL is damaged: {}", r.summary());
    // run 1: start 1, statements 2..11, final checkpoint 12; run 2: start 13, statement 14.
    assert_eq!(write_log(o(), 1), vec![14]);
    let recs = records(d);
    assert_eq!(recs.len(), 15);
    assert_eq!((recs[12].kind, recs[12].prev_hash.as_str()), (Kind::Start, recs[11].hash.as_str()));
    let warnings = recs[12].meta.as_ref().and_then(|m| m.get("warnings")).expect("warning recorded");
    assert!(warnings.to_string().contains("bytes written after a gap"), "{warnings}");
    let after = std::fs::read(&seg).expect("read");
    assert!(after.starts_with(&clean) && !after.contains(&0), "the tail and the stray batch are gone");
    assert!(!String::from_utf8_lossy(&after).contains("\"seq\":99"));
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!(r.records, 15);
}

/// HEAD follows the durable checkpoints while the writer runs (its own thread rewrites it),
/// not only at shutdown.
#[test]
fn head_follows_checkpoints_while_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(opts(d, 10)).expect("start");
    assert_eq!(append_from_tasks(&h, 1, 25).len(), 25);
    // start 1, statements 2..10, checkpoint 11 (every 10 records), 12..21, checkpoint 22,
    // 23..28; the final checkpoint at shutdown is 29.
    let deadline = Instant::now() + Duration::from_secs(10);
    let head = loop {
        let head = std::fs::read(d.join("HEAD")).ok().and_then(|b| serde_json::from_slice::<Head>(&b).ok());
        match head {
            Some(h) if h.seq == 22 => break h,
            _ if Instant::now() > deadline => panic!("HEAD did not reach seq 22: {head:?}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert_eq!(head.anchor_seq, 21);
    h.shutdown();
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!(r.head_seq, Some(29), "the final checkpoint at shutdown");
}

#[test]
fn segments_rotate_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut o = opts(d, 10);
    o.segment_bytes = 1000;
    write_log(o, 40);
    let segs = chain::list_segments(d).expect("list");
    assert!(segs.len() >= 5, "{segs:?}");
    // Each segment starts with the seq in its name and stays near the limit.
    for s in &segs {
        let text = std::fs::read_to_string(&s.path).expect("read");
        let first: Record = serde_json::from_str(text.lines().next().expect("non-empty")).expect("parse");
        assert_eq!(first.seq, s.first_seq);
        assert!(text.len() < 1000 + 800, "{} is {} bytes", s.path.display(), text.len());
    }
    // Each closed segment ends with a checkpoint (written at rotation), the last one too
    // (written at shutdown).
    for s in &segs {
        let text = std::fs::read_to_string(&s.path).expect("read");
        let last: Record = serde_json::from_str(text.lines().last().expect("non-empty")).expect("parse");
        assert_eq!(last.kind, Kind::Checkpoint, "{} does not end with a checkpoint", s.path.display());
    }
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!(r.segments, segs.len());
    // Removing a middle segment is a gap at the first record of the next one.
    let gone = &segs[2];
    std::fs::remove_file(&gone.path).expect("rm");
    let r = verify::verify(d, &keys());
    let p = problem(&r);
    assert_eq!(p.seq, Some(segs[3].first_seq));
    assert_eq!(p.line, Some(1));
    assert!(p.reason.starts_with(&format!("seq gap: expected seq {}", gone.first_seq)), "{}", p.reason);
}

/// Someone who can write the log's files appends a NUL and forged lines to a closed segment.
/// Every pgward reader stops at the NUL (the live segment's preallocated tail starts with
/// one), so the chain still checks out; tools that drop NULs (`tr -d '\0'`) show the forged
/// lines. A closed segment is trimmed to its lines at rotation: `verify` refuses a NUL in one.
#[test]
fn a_nul_in_a_closed_segment_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut o = opts(d, 10);
    o.segment_bytes = 1000;
    write_log(o, 30);
    let segs = chain::list_segments(d).expect("list");
    assert!(segs.len() >= 3, "{segs:?}");
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    for (i, s) in segs.iter().enumerate() {
        let bytes = std::fs::read(&s.path).expect("read");
        assert!(!bytes.contains(&0) || i + 1 == segs.len(), "{} holds a NUL", s.path.display());
    }
    let closed = &segs[1].path;
    let len = std::fs::metadata(closed).expect("stat").len();
    let mut f = std::fs::OpenOptions::new().append(true).open(closed).expect("open");
    std::io::Write::write_all(&mut f, b"\0{\"seq\":999,\"kind\":\"statement\",\"sql\":\"forged\"}\n").expect("append");
    drop(f);
    let r = verify::verify(d, &keys());
    let p = problem(&r);
    assert_eq!(p.file.as_deref(), Some(closed.as_path()), "{}", r.summary());
    assert!(p.reason.contains(&format!("bytes hidden after a NUL at offset {len} of a closed segment")), "{}", p.reason);
    // A tail of NULs alone (a segment abandoned while in use) hides nothing.
    let f = std::fs::OpenOptions::new().write(true).open(closed).expect("open");
    f.set_len(len).and_then(|()| f.set_len(len + 4096)).expect("zeros");
    assert!(verify::verify(d, &keys()).is_ok());
    // The live segment's preallocated tail is not one.
    std::fs::OpenOptions::new().write(true).open(closed).expect("open").set_len(len).expect("cut");
    assert!(verify::verify(d, &keys()).is_ok());
    let last = &segs.last().expect("a segment").path;
    let f = std::fs::OpenOptions::new().write(true).open(last).expect("open");
    let live = f.metadata().expect("stat").len();
    f.set_len(live + 4096).expect("preallocate");
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
}

#[test]
fn removed_dir_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    let moved = dir.path().join("moved");
    let h = AuditHandle::start(opts(&d, 100)).expect("start");
    let rt = rt();
    assert_eq!(rt.block_on(h.append_durable(stmt(1))).expect("append"), 2);
    let before = std::fs::read(d.join(chain::segment_name(1))).expect("read");

    std::fs::rename(&d, &moved).expect("rename away");
    let err = rt.block_on(h.append_durable(stmt(2))).expect_err("must fail closed");
    assert!(matches!(err, AuditError::Unwritable { .. }), "{err:?}");
    h.append(stmt(3)); // not awaited: also lost, and logged
    let err = rt.block_on(h.append_durable(stmt(4))).expect_err("still failing");
    assert!(matches!(err, AuditError::Unwritable { .. }), "{err:?}");
    // Nothing (partial or whole) was written while failing.
    assert_eq!(std::fs::read(moved.join(chain::segment_name(1))).expect("read"), before);

    std::fs::rename(&moved, &d).expect("rename back");
    assert_eq!(rt.block_on(h.append_durable(stmt(5))).expect("recovered"), 3);
    assert!(h.stats().failed_batches >= 2);
    h.shutdown();
    let r = verify::verify(&d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!(r.records, 4);
}

#[test]
fn dir_replaced_by_a_file_fails_closed_and_recovers() {
    // What the end-to-end fail-closed test does (it runs as root, so no chmod).
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    let moved = dir.path().join("audit.moved");
    let h = AuditHandle::start(opts(&d, 100)).expect("start");
    let rt = rt();
    assert_eq!(rt.block_on(h.append_durable(stmt(1))).expect("append"), 2);
    std::fs::rename(&d, &moved).expect("rename away");
    std::fs::write(&d, b"not a directory\n").expect("file in its place");
    for i in 2..5 {
        assert!(rt.block_on(h.append_durable(stmt(i))).is_err(), "append {i} must fail closed");
    }
    assert_eq!(std::fs::read(&d).expect("read"), b"not a directory\n");
    std::fs::remove_file(&d).expect("rm");
    std::fs::rename(&moved, &d).expect("rename back");
    assert_eq!(rt.block_on(h.append_durable(stmt(5))).expect("recovered"), 3);
    h.shutdown();
    // The writer moved on to a fresh segment; the chain is intact.
    assert!(d.join(chain::segment_name(3)).exists());
    let r = verify::verify(&d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!((r.records, r.segments), (4, 2));
}

/// The live segment cut short while pgward runs (`logrotate` with `copytruncate`, `>` on the
/// file): the next batch would land after a hole of zeros, where every reader stops and the
/// next start's recovery drops it — records answered durable, then gone. The writer refuses
/// the batch and moves on to a new segment, like for a removed one.
#[test]
fn truncated_segment_fails_then_continues_in_a_new_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(opts(d, 100)).expect("start");
    let rt = rt();
    assert_eq!(rt.block_on(h.append_durable(stmt(1))).expect("append"), 2);
    let first = d.join(chain::segment_name(1));
    std::fs::OpenOptions::new().write(true).open(&first).expect("open").set_len(0).expect("truncate");
    let err = rt.block_on(h.append_durable(stmt(2))).expect_err("must fail closed");
    assert!(matches!(err, AuditError::SegmentGone { .. }), "{err:?}");
    assert_eq!(rt.block_on(h.append_durable(stmt(3))).expect("continues"), 3);
    h.shutdown();
    assert_eq!(std::fs::metadata(&first).expect("stat").len(), 0, "written after the cut");
    let recs = records(d);
    assert_eq!(recs.first().map(|r| r.seq), Some(3), "{recs:?}");
    // The loss shows up as a gap where the new segment starts.
    let p = verify::verify(d, &keys()).problem.expect("gap");
    assert!(p.reason.starts_with("seq gap: expected seq 1, found 3"), "{}", p.reason);
}

#[test]
fn removed_segment_fails_then_continues_in_a_new_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(opts(d, 100)).expect("start");
    let rt = rt();
    assert_eq!(rt.block_on(h.append_durable(stmt(1))).expect("append"), 2);
    std::fs::remove_file(d.join(chain::segment_name(1))).expect("rm");
    let err = rt.block_on(h.append_durable(stmt(2))).expect_err("must fail closed");
    assert!(matches!(err, AuditError::SegmentGone { .. }), "{err:?}");
    assert_eq!(rt.block_on(h.append_durable(stmt(3))).expect("continues"), 3);
    h.shutdown();
    assert!(d.join(chain::segment_name(3)).exists());
    // The deletion shows up as a gap where the new segment starts.
    let p = verify::verify(d, &keys()).problem.expect("gap");
    assert_eq!(p.seq, Some(3));
    assert!(p.reason.starts_with("seq gap: expected seq 1, found 3"), "{}", p.reason);
}

/// Append one record, make the next batch fail with `inject`, and check what a failed batch
/// must leave: an `Io` error, the segment byte for byte as before, the chain continuing at the
/// next seq (3), a log that verifies. `lazy` also queues a record nobody waits for into the
/// failing batch. Returns the writer's stats after the failure and the SQL texts in the log.
fn fail_one_batch(inject: fn(&Path), lazy: bool, f: fn(WriterOptions) -> WriterOptions) -> (WriterStats, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(f(opts(d, 100))).expect("start");
    let rt = rt();
    assert_eq!(rt.block_on(h.append_durable(stmt(1))).expect("append"), 2);
    let seg = d.join(chain::segment_name(1));
    let before = std::fs::read(&seg).expect("read");
    inject(d);
    if lazy {
        h.append(stmt(2)); // rides along with the failing batch, and is lost with it
    }
    let err = rt.block_on(h.append_durable(stmt(3))).expect_err("injected failure");
    assert!(matches!(err, AuditError::Io { .. }), "{err:?}");
    assert_eq!(std::fs::read(&seg).expect("read"), before, "failed lines left behind");
    let stats = h.stats();
    // The seq was not consumed and the chain continues.
    assert_eq!(rt.block_on(h.append_durable(stmt(4))).expect("append"), 3);
    h.shutdown();
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    (stats, records(d).into_iter().filter_map(|r| r.sql).collect())
}

#[test]
fn failed_write_leaves_nothing_partial() {
    for f in [|o| o, buffered] {
        let (_, sqls) = fail_one_batch(fault::fail_next_write, false, f);
        assert_eq!(sqls, vec!["SELECT 1", "SELECT 4"]);
    }
}

#[test]
fn failed_sync_refuses_what_is_not_durable() {
    // The written but not durable lines are truncated away, the lazy one with them.
    for f in [|o| o, buffered] {
        let (stats, sqls) = fail_one_batch(fault::fail_next_sync, true, f);
        assert_eq!(stats.failed_batches, 1);
        assert_eq!(sqls, vec!["SELECT 1", "SELECT 4"]);
    }
}

#[test]
fn fsync_off_answers_in_the_callers_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut o = opts(d, 100);
    o.fsync = FsyncPolicy::Off;
    let h = AuditHandle::start(o).expect("start");
    // No handoff to a writer thread: the answer is there before submit returns.
    let mut rx = h.submit(stmt(1));
    assert_eq!(rx.try_recv().expect("answered at once").expect("written"), 2);
    assert_eq!(records(d).last().map(|r| r.seq), Some(2));
    assert_eq!(h.stats().syncs, 0);
    h.shutdown();
    assert!(verify::verify(d, &keys()).is_ok());
}

#[test]
fn lazy_records_go_out_without_other_traffic() {
    for policy in [FsyncPolicy::Group, FsyncPolicy::Always, FsyncPolicy::Off] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let mut o = opts(d, 100);
        o.fsync = policy;
        let h = AuditHandle::start(o).expect("start");
        h.append(stmt(1));
        h.append(stmt(2));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while records(d).len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let sqls: Vec<_> = records(d).into_iter().filter_map(|r| r.sql).collect();
        assert_eq!(sqls, vec!["SELECT 1", "SELECT 2"], "{policy:?}");
        h.shutdown();
    }
}

#[test]
fn concurrent_appends_across_segment_rotations() {
    concurrent_appends_across_segment_rotations_with(|o| o);
    concurrent_appends_across_segment_rotations_with(buffered);
}

fn concurrent_appends_across_segment_rotations_with(f: fn(WriterOptions) -> WriterOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let mut o = f(opts(&d, 50));
    o.segment_bytes = 4096;
    let h = AuditHandle::start(o).expect("start");
    let mut seqs = append_from_tasks(&h, 40, 25);
    // Every acknowledged record is on disk already, in some segment.
    let on_disk: std::collections::HashSet<u64> = records(&d).iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 1000);
    assert!(seqs.iter().all(|s| on_disk.contains(s)));
    h.shutdown();
    let segs = chain::list_segments(&d).expect("list");
    assert!(segs.len() > 10, "{} segments", segs.len());
    let r = verify::verify(&d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!(r.segments, segs.len());
}

#[test]
fn unwritable_dir_fails_closed() {
    // root passes access(W_OK) regardless of mode bits; see the writer's module docs.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    let h = AuditHandle::start(opts(&d, 100)).expect("start");
    let rt = rt();
    rt.block_on(h.append_durable(stmt(1))).expect("append");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o550)).expect("chmod");
    let err = rt.block_on(h.append_durable(stmt(2))).expect_err("must fail closed");
    assert!(matches!(err, AuditError::Unwritable { .. }), "{err:?}");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    assert_eq!(rt.block_on(h.append_durable(stmt(3))).expect("recovered"), 3);
    h.shutdown();
    assert!(verify::verify(&d, &keys()).is_ok());
}

#[test]
fn tampered_checkpoint_signature_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 3), 4);
    // 1 start, 2 3, 4 ckpt, 5 6, 7 final ckpt
    // Flip the signature and recompute every hash, as an attacker could.
    let other = SigningKey::from_bytes(&[9u8; 32]);
    rewrite_and_rechain(d, |r, _| {
        if r.seq == 4 {
            let forged = CheckpointSigner::new(KID, other.clone()).sign(3, r.anchor_hash.as_deref().unwrap_or(""));
            r.sig = Some(forged);
        }
    });
    let p = problem(&verify::verify(d, &keys())).clone();
    assert_eq!(p.seq, Some(4));
    assert!(p.reason.starts_with(&format!("checkpoint signature does not verify (kid {KID:?}): signed with another key")), "{}", p.reason);
}

#[test]
fn rechained_edit_is_caught_by_the_next_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 3), 4);
    // The attacker edits seq 2, recomputes all hashes and fixes up the anchor hash: the
    // signature over (3, new hash) then fails.
    rewrite_and_rechain(d, |r, prev| {
        if r.seq == 2 {
            r.sql = Some("SELECT 'innocent'".into());
        }
        if r.seq == 4 {
            r.anchor_hash = Some(prev.to_string());
        }
    });
    let p = problem(&verify::verify(d, &keys())).clone();
    assert_eq!(p.seq, Some(4));
    assert!(p.reason.starts_with("checkpoint signature does not verify"), "{}", p.reason);
}

#[test]
fn unknown_checkpoint_key_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 100), 1);
    // 1 start, 2 statement, 3 final checkpoint
    let p = problem(&verify::verify(d, &PublicKeys::new())).clone();
    assert_eq!((p.seq, p.line), (Some(3), Some(3)));
    assert_eq!(
        p.reason,
        "checkpoint signed by unknown key kid \"gw-test\"; the checkpoint JWKS holds no key: the log was signed with another key (not the one audit.checkpoint_jwks publishes)"
    );
}

#[test]
fn forged_head_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 100), 1);
    let head_path = d.join("HEAD");
    let mut head: Head = serde_json::from_slice(&std::fs::read(&head_path).expect("HEAD")).expect("parse");
    head.anchor_seq += 1;
    std::fs::write(&head_path, serde_json::to_vec(&head).expect("ser")).expect("write");
    let p = problem(&verify::verify(d, &keys())).clone();
    assert_eq!(p.file.as_deref(), Some(head_path.as_path()));
    assert!(p.reason.starts_with(&format!("HEAD: checkpoint signature does not verify (kid {KID:?})")), "{}", p.reason);
    std::fs::write(&head_path, b"{").expect("write");
    assert!(problem(&verify::verify(d, &keys())).reason.starts_with("HEAD does not parse"));
}

#[test]
fn interval_checkpoint_and_policies() {
    for policy in [FsyncPolicy::Always, FsyncPolicy::Off] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let mut o = opts(d, 1000);
        o.fsync = policy;
        o.checkpoint_interval = Duration::from_millis(100);
        let h = AuditHandle::start(o).expect("start");
        let rt = rt();
        let rxs: Vec<_> = (0..5).map(|i| h.submit(stmt(i))).collect();
        rt.block_on(async {
            for rx in rxs {
                rx.await.expect("answer").expect("durable");
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let kinds: Vec<Kind> = records(d).iter().map(|r| r.kind).collect();
        assert_eq!(kinds.len(), 7, "{policy:?}: {kinds:?}");
        assert_eq!(kinds[6], Kind::Checkpoint, "{policy:?}");
        let st = h.stats();
        match policy {
            FsyncPolicy::Always => assert!(st.syncs >= 7, "{st:?}"),
            _ => assert_eq!(st.syncs, 0),
        }
        h.shutdown();
        // Nothing new since the interval checkpoint: shutdown adds no other checkpoint.
        let r = verify::verify(d, &keys());
        assert!(r.is_ok(), "{}", r.summary());
        assert_eq!((r.records, r.checkpoints), (7, 1));
    }
}

#[test]
fn callers_cannot_forge_writer_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = AuditHandle::start(opts(dir.path(), 100)).expect("start");
    let rec = Record { kind: Kind::Checkpoint, anchor_seq: Some(1), ..Record::default() };
    let err = rt().block_on(h.append_durable(rec)).expect_err("rejected");
    assert!(matches!(err, AuditError::InvalidRecord(_)), "{err:?}");
    h.shutdown();
    assert!(matches!(rt().block_on(h.append_durable(stmt(1))), Err(AuditError::Closed)));
}

#[test]
fn no_signer_means_no_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut o = opts(d, 2);
    o.signer = None;
    write_log(o, 3);
    assert!(!d.join("HEAD").exists());
    let r = verify::verify(d, &keys());
    assert!(r.is_ok());
    assert_eq!(
        r.summary(),
        "audit log OK: 4 records in 1 segment, 0 checkpoints, no checkpoint yet (4 unanchored records)"
    );
}

#[test]
fn signer_from_pem_and_jwks() {
    use base64::Engine as _;
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = signing_key().to_pkcs8_pem(Default::default()).expect("pem");
    let key_path = dir.path().join("signing.pem");
    std::fs::write(&key_path, pem.as_bytes()).expect("write");
    let signer = CheckpointSigner::from_pem_file(&key_path, KID).expect("load");
    assert_eq!(signer.verifying_key(), signing_key().verifying_key());
    assert!(CheckpointSigner::from_pem_file(&dir.path().join("missing"), KID).is_err());

    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signing_key().verifying_key().to_bytes());
    let jwks = format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"r","n":"xx","e":"AQAB"}},{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"{KID}","alg":"EdDSA"}}]}}"#
    );
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks).expect("write");
    let keys = verify::load_jwks_ed25519(&jwks_path).expect("jwks");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys.get(KID), Some(&signing_key().verifying_key()));
    let sig = signer.sign(5, "ab");
    assert_eq!(verify::check_signature(&keys, Some(KID), Some(&sig), 5, "ab"), Ok(()));
    assert!(verify::check_signature(&keys, Some(KID), Some(&sig), 6, "ab").is_err());
}

/// `cargo test -p gateway-user --release --lib audit::tests::throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn throughput() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = AuditHandle::start(opts(dir.path(), 1000)).expect("start");
    let n_tasks = 256u64;
    let per_task = 400u64;
    let t0 = std::time::Instant::now();
    append_from_tasks(&h, n_tasks, per_task);
    let el = t0.elapsed();
    let st = h.stats();
    h.shutdown();
    let n = n_tasks * per_task;
    println!(
        "{n} durable appends in {el:?}: {:.0}/s, {} batches ({:.1} records/batch), {} syncs",
        n as f64 / el.as_secs_f64(),
        st.batches,
        st.records as f64 / st.batches as f64,
        st.syncs
    );
    assert!(verify::verify(dir.path(), &keys()).is_ok());
}

/// A durable-hook that notes, when it runs, the statements the log then holds.
/// With `keep`, it keeps the waiter untold.
struct SeenAtHook {
    dir: PathBuf,
    seen: std::sync::Mutex<Option<Vec<String>>>,
    keep: bool,
    kept: std::sync::Mutex<Option<Waiter>>,
}

impl OnDurable for SeenAtHook {
    fn durable(&self, waiter: Waiter) -> Option<Waiter> {
        let sqls = records(&self.dir).into_iter().filter_map(|r| r.sql).collect();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(sqls);
        if !self.keep {
            return Some(waiter);
        }
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(waiter);
        None
    }
}

fn seen_at_hook(dir: &Path, keep: bool) -> std::sync::Arc<SeenAtHook> {
    std::sync::Arc::new(SeenAtHook {
        dir: dir.to_owned(),
        seen: std::sync::Mutex::new(None),
        keep,
        kept: std::sync::Mutex::new(None),
    })
}

#[test]
fn a_hook_that_keeps_the_waiter_tells_it_when_it_likes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let h = AuditHandle::start(opts(d, 100)).expect("start"); // fsync = group
    let rt = rt();
    let hook = seen_at_hook(d, true);
    let (mut rx, queued) = h.submit_then(stmt(1), Some(hook.clone()));
    assert!(queued.is_some());
    // A later hooked record is answered after the first record's hook was dealt with
    // (hooks run in order, each record answered after its own hook).
    let (rx2, _) = h.submit_then(stmt(2), Some(seen_at_hook(d, false)));
    assert_eq!(rt.block_on(rx2).expect("answered").expect("durable"), 3);
    let seen = hook.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(seen.is_some_and(|s| s.contains(&"SELECT 1".to_string())), "the hook ran once the record was durable");
    assert!(matches!(rx.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)), "the writer kept quiet");
    let w = hook.kept.lock().unwrap_or_else(|e| e.into_inner()).take().expect("kept");
    assert_eq!(w.seq(), 2);
    w.tell();
    assert_eq!(rx.try_recv().expect("told").expect("durable"), 2);
    h.shutdown();
}

#[test]
fn durable_hooks_run_before_the_answer_and_never_on_failure() {
    for policy in [FsyncPolicy::Group, FsyncPolicy::Always] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let mut o = opts(d, 100);
        o.fsync = policy;
        let h = AuditHandle::start(o).expect("start");
        assert!(h.runs_hooks());
        let rt = rt();

        // Durable: the hook ran (the record already in the log) before the answer came.
        let hook = seen_at_hook(d, false);
        let (rx, queued) = h.submit_then(stmt(1), Some(hook.clone()));
        assert!(queued.is_some());
        assert_eq!(rt.block_on(rx).expect("answered").expect("durable"), 2);
        let seen = hook.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(seen, Some(vec!["SELECT 1".to_string()]), "{policy:?}");

        // A failed sync: refused, and the hook never runs.
        fault::fail_next_sync(d);
        let hook = seen_at_hook(d, false);
        let (rx, queued) = h.submit_then(stmt(2), Some(hook.clone()));
        assert!(queued.is_some(), "queued; the failure comes with the sync");
        assert!(rt.block_on(rx).expect("answered").is_err(), "{policy:?}");
        assert_eq!(*hook.seen.lock().unwrap_or_else(|e| e.into_inner()), None, "{policy:?}");

        // Refused at once (the writer writes checkpoints itself): says so, hook never runs.
        let hook = seen_at_hook(d, false);
        let (mut rx, queued) =
            h.submit_then(Record { kind: Kind::Checkpoint, ..Record::default() }, Some(hook.clone()));
        assert!(queued.is_none());
        assert!(rx.try_recv().expect("answered at once").is_err());
        h.shutdown();
        assert_eq!(*hook.seen.lock().unwrap_or_else(|e| e.into_inner()), None);
    }

    // fsync = off has no writer thread to run hooks: dropped unrun, the record still written.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut o = opts(d, 100);
    o.fsync = FsyncPolicy::Off;
    let h = AuditHandle::start(o).expect("start");
    assert!(!h.runs_hooks());
    let hook = seen_at_hook(d, false);
    let (mut rx, queued) = h.submit_then(stmt(1), Some(hook.clone()));
    assert!(queued.is_some());
    assert_eq!(rx.try_recv().expect("answered at once").expect("written"), 2);
    assert_eq!(*hook.seen.lock().unwrap_or_else(|e| e.into_inner()), None);
    h.shutdown();
}

#[test]
fn record_timestamps_match_chrono_across_seconds() {
    use chrono::{SecondsFormat, TimeZone, Utc};
    let mut cache = super::writer::TsCache::default();
    let base = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 58).single().expect("valid");
    // Within a second, across seconds, a minute, a day and a year; back in time too.
    for micros in [0i64, 1, 999_999, 1_000_000, 1_000_001, 1_500_000, 2_000_000, 2_000_042, 62_000_000, 123, 86_400_000_007] {
        let t = base + chrono::Duration::microseconds(micros);
        assert_eq!(super::writer::format_ts(t, &mut cache), t.to_rfc3339_opts(SecondsFormat::Micros, true), "{t:?}");
    }
}

/// The time format of `ts`.
fn fmt_ts(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Append records to the last segment as someone with write access would: chained onto the
/// last record, `ts` that many seconds after its `ts`. A checkpoint is signed with the test
/// key (what only the writer can do: used to build logs the writer would not write).
fn forge(dir: &Path, items: &[(Kind, i64)]) {
    let path = segment_paths(dir).pop().expect("a segment");
    let mut text = std::fs::read_to_string(&path).expect("read");
    let last: Record = serde_json::from_str(text.lines().last().expect("a line")).expect("parse");
    let base = chrono::DateTime::parse_from_rfc3339(&last.ts).expect("ts").with_timezone(&chrono::Utc);
    let (mut seq, mut prev) = (last.seq, last.hash);
    let signer = CheckpointSigner::new(KID, signing_key());
    for &(kind, secs) in items {
        seq += 1;
        let mut rec = if kind == Kind::Statement { stmt(seq) } else { Record { kind, ..Record::default() } };
        if kind == Kind::Checkpoint {
            rec.anchor_seq = Some(seq - 1);
            rec.anchor_hash = Some(prev.clone());
            rec.sig = Some(signer.sign(seq - 1, &prev));
            rec.kid = Some(KID.into());
        }
        rec.seq = seq;
        rec.ts = fmt_ts(base + chrono::Duration::seconds(secs));
        rec.prev_hash = prev.clone();
        rec.hash.clear();
        let c = serde_json::to_string(&rec).expect("ser");
        let h = hex::encode(Sha256::new().chain_update(prev.as_bytes()).chain_update(c.as_bytes()).finalize());
        text.push_str(&c[..c.len() - 1]);
        text.push_str(&format!(",\"hash\":\"{h}\"}}\n"));
        prev = h;
    }
    std::fs::write(&path, text).expect("write");
}

/// Keep only the records up to `seq`.
fn cut_after(dir: &Path, seq: u64) {
    let path = segment_paths(dir).pop().expect("a segment");
    let text = std::fs::read_to_string(&path).expect("read");
    let keep: String = text.lines().take(seq as usize).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, keep).expect("write");
}

/// Replace HEAD with one built from checkpoint record `seq` (all HEAD holds is copied from
/// that record: no key needed).
fn head_from(dir: &Path, seq: u64) {
    let r = records(dir).into_iter().find(|r| r.seq == seq).expect("record");
    assert_eq!(r.kind, Kind::Checkpoint);
    let h = Head {
        seq,
        hash: r.hash,
        anchor_seq: r.anchor_seq.expect("anchor_seq"),
        anchor_hash: r.anchor_hash.expect("anchor_hash"),
        sig: r.sig.expect("sig"),
        kid: r.kid.expect("kid"),
        ts: r.ts,
    };
    std::fs::write(dir.join("HEAD"), serde_json::to_vec(&h).expect("ser")).expect("write HEAD");
}

/// A change to a log, the verify policy, when verify starts (seconds from now), and the
/// problem expected: (seq, file, start of the reason).
type TamperCase = (&'static str, fn(&Path), verify::Policy, i64, Option<(u64, &'static str, &'static str)>);

/// Run each case on a fresh log: 1 start, 2 3, 4 ckpt, 5 6 7, 8 ckpt, 9 10, 11 final ckpt (HEAD).
fn check_tampering(cases: Vec<TamperCase>) {
    for (name, change, pol, at, expect) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write_log(opts(d, 3), 7);
        change(d);
        let started = chrono::Utc::now() + chrono::Duration::seconds(at);
        let r = verify::verify_at(d, &keys(), &pol, started);
        match expect {
            None => assert!(r.is_ok(), "{name}: {}", r.summary()),
            Some((seq, file, reason)) => {
                let p = r.problem.as_ref().unwrap_or_else(|| panic!("{name}: expected a problem, got {}", r.summary()));
                assert_eq!(p.seq, Some(seq), "{name}: {p}");
                let f = p.file.as_ref().and_then(|f| f.file_name()).map(|f| f.to_string_lossy().into_owned());
                assert_eq!(f.as_deref(), Some(file), "{name}: {p}");
                assert!(p.reason.starts_with(reason), "{name}: {p}");
            }
        }
    }
}

/// What `verify` says about a HEAD changed by someone who can write the files but lacks the key.
#[test]
fn head_tampering_without_the_key_is_detected() {
    let every3 = policy(3);
    check_tampering(vec![
        ("a normal log", |_| {}, every3, 60, None),
        ("a normal log, with the default policy", |_| {}, verify::Policy::default(), 60, None),
        (
            "HEAD deleted",
            |d| std::fs::remove_file(d.join("HEAD")).expect("rm"),
            every3,
            60,
            Some((11, "HEAD", "HEAD is missing, but the log holds checkpoint records (the newest at seq 11)")),
        ),
        (
            "HEAD deleted and the tail cut at a checkpoint",
            |d| {
                std::fs::remove_file(d.join("HEAD")).expect("rm");
                cut_after(d, 8);
            },
            every3,
            60,
            Some((8, "HEAD", "HEAD is missing")),
        ),
        (
            "HEAD deleted moments ago (a checkpoint written while verify runs) is tolerated",
            |d| std::fs::remove_file(d.join("HEAD")).expect("rm"),
            every3,
            0,
            None,
        ),
        (
            "older HEAD copy and the tail cut",
            |d| {
                head_from(d, 4);
                cut_after(d, 10);
            },
            every3,
            60,
            Some((8, "HEAD", "HEAD names checkpoint seq 4, but the log holds a newer checkpoint at seq 8")),
        ),
        (
            "older HEAD copy, log intact",
            |d| head_from(d, 4),
            every3,
            60,
            Some((8, "HEAD", "HEAD names checkpoint seq 4, but the log holds a newer checkpoint at seq 8")),
        ),
        (
            "HEAD one checkpoint behind",
            |d| head_from(d, 8),
            every3,
            60,
            Some((11, "HEAD", "HEAD names checkpoint seq 8, but the log holds a newer checkpoint at seq 11")),
        ),
        ("HEAD one checkpoint behind, written moments ago", |d| head_from(d, 8), every3, 0, None),
        ("HEAD beyond the log's end", |d| cut_after(d, 9), every3, 60, Some((11, "HEAD", "truncated: log ends at seq 9"))),
    ]);
}

/// What `verify` says about records forged or left without checkpoints.
#[test]
fn unanchored_records_are_detected() {
    use Kind::{Checkpoint as C, Start as S, Statement as St};
    let every3 = policy(3);
    let second = verify::Policy { checkpoint_every: 3, checkpoint_interval: Duration::from_secs(1) };
    check_tampering(vec![
        (
            "forged tail longer than checkpoint_every",
            |d| forge(d, &[(St, 0), (St, 0), (St, 0), (St, 0), (St, 0)]),
            every3,
            60,
            Some((16, "audit-0000000000000001.jsonl", "5 records without a checkpoint (seq 12..16)")),
        ),
        ("unanchored tail within checkpoint_every", |d| forge(d, &[(St, 0), (St, 0)]), every3, 60, None),
        (
            "unanchored tail longer than checkpoint_interval",
            |d| forge(d, &[(St, 0), (St, 10)]),
            second,
            60,
            Some((13, "audit-0000000000000001.jsonl", "no checkpoint for 10.0 s of records (seq 12..12)")),
        ),
        (
            "long gap without a checkpoint inside the log",
            |d| forge(d, &[(St, 0), (St, 10), (C, 10), (St, 10)]),
            second,
            60,
            Some((13, "audit-0000000000000001.jsonl", "no checkpoint for 10.0 s of records (seq 12..12)")),
        ),
        (
            // What the writer leaves after a step of the wall clock or a stalled disk: the
            // record after the gap waits behind a checkpoint of its own.
            "a checkpoint that comes late ends the stretch",
            |d| {
                forge(d, &[(St, 0), (C, 10), (St, 10)]);
                head_from(d, 13);
            },
            second,
            60,
            None,
        ),
        (
            "a restart (start record) restarts the clock",
            |d| forge(d, &[(St, 0), (S, 3600), (C, 3600)]),
            second,
            60,
            None,
        ),
    ]);
}

/// Someone who can write the log's files cuts its tail off while pgward is down, at a
/// checkpoint or not, or replaces it with records of their own. Before a restart `verify`
/// names the cut (HEAD is past the log's end, or names a record that is not its checkpoint);
/// the restart's first checkpoint rewrote HEAD and the log verified again. The restart's
/// `start` record names the checkpoint HEAD named, and `verify` fails on it.
#[test]
fn a_tail_cut_or_replaced_while_down_is_not_laundered_by_the_restart() {
    use Kind::Statement as St;
    type Tamper = fn(&Path);
    let cases: Vec<(&str, Tamper)> = vec![
        ("cut at a checkpoint", |d| cut_after(d, 12)),
        ("cut after a statement", |d| cut_after(d, 10)),
        ("replaced by unanchored records", |d| {
            cut_after(d, 12);
            forge(d, &[(St, 0), (St, 0), (St, 0), (St, 0)]);
        }),
    ];
    for (what, tamper) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // seq 1 start, statements, checkpoints at seq 4, 8, 12 (every 3 records) and 15 (the
        // shutdown's).
        write_log(opts(d, 3), 10);
        assert_eq!(records(d).last().map(|r| (r.seq, r.kind)), Some((15, Kind::Checkpoint)), "{what}");
        tamper(d);
        assert!(verify::verify(d, &keys()).problem.is_some(), "{what}: verify names the cut before a restart");
        write_log(opts(d, 3), 2);
        let r = verify::verify(d, &keys());
        let p = r.problem.clone().unwrap_or_else(|| panic!("{what}: verify passed after the restart: {}", r.summary()));
        assert!(p.reason.contains("found HEAD naming checkpoint seq 15 that the log did not hold"), "{what}: {}", p.reason);
        let start = records(d).into_iter().rfind(|r| r.kind == Kind::Start).expect("the restart's start record");
        assert_eq!(p.seq, Some(start.seq), "{what}");
    }

    // A HEAD someone replaced (it names a checkpoint far ahead, its signature no longer
    // matches) says nothing about what the last run wrote: the restart is not flagged for it.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write_log(opts(d, 3), 4);
    let mut head: Head = serde_json::from_slice(&std::fs::read(d.join("HEAD")).expect("HEAD")).expect("parse");
    head.seq += 1_000_000;
    head.anchor_seq += 1_000_000;
    std::fs::write(d.join("HEAD"), serde_json::to_vec(&head).expect("ser")).expect("write");
    write_log(opts(d, 3), 2);
    let r = verify::verify(d, &keys());
    assert!(r.is_ok(), "{}", r.summary());
}

#[test]
fn clean_shutdown_and_restart_leave_the_log_anchored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // checkpoint_every far away: only the shutdown writes a checkpoint.
    write_log(opts(d, 1000), 3);
    let recs = records(d);
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[4].kind, Kind::Checkpoint);
    let head: Head = serde_json::from_slice(&std::fs::read(d.join("HEAD")).expect("HEAD")).expect("parse");
    assert_eq!(head.seq, 5);
    let later = chrono::Utc::now() + chrono::Duration::seconds(60);
    let r = verify::verify_at(d, &keys(), &verify::Policy::default(), later);
    assert!(r.is_ok(), "{}", r.summary());
    assert_eq!((r.checkpoints, r.unanchored), (1, 0));

    // A run that stopped with records after its last checkpoint (a crash): the next start
    // anchors them at once.
    forge(d, &[(Kind::Statement, 0), (Kind::Statement, 0)]);
    let h = AuditHandle::start(opts(d, 1000)).expect("start");
    let recs = records(d);
    assert_eq!(recs.iter().map(|r| r.kind).collect::<Vec<_>>()[5..], [Kind::Statement, Kind::Statement, Kind::Start, Kind::Checkpoint]);
    h.shutdown();
    let r = verify::verify_at(d, &keys(), &verify::Policy::default(), later);
    assert!(r.is_ok(), "{}", r.summary());
    // ... and a run that stopped between its last checkpoint and HEAD: the next start
    // rewrites HEAD.
    head_from(d, 5);
    let h = AuditHandle::start(opts(d, 1000)).expect("start");
    h.shutdown();
    let head: Head = serde_json::from_slice(&std::fs::read(d.join("HEAD")).expect("HEAD")).expect("parse");
    assert_eq!(head.seq, records(d).len() as u64);
    let r = verify::verify_at(d, &keys(), &verify::Policy::default(), later);
    assert!(r.is_ok(), "{}", r.summary());
}

/// What someone holding the checkpoint key can do: change records, re-chain, re-sign every
/// checkpoint and rewrite HEAD, so that `verify` alone finds nothing.
fn rewrite_with_the_key(dir: &Path, mut f: impl FnMut(&mut Record)) {
    let signer = CheckpointSigner::new(KID, signing_key());
    rewrite_and_rechain(dir, |r, prev| {
        f(r);
        if r.kind == Kind::Checkpoint {
            r.anchor_hash = Some(prev.to_string());
            r.sig = Some(signer.sign(r.anchor_seq.unwrap_or(0), prev));
        }
    });
    let last = records(dir).into_iter().rev().find(|r| r.kind == Kind::Checkpoint).expect("a checkpoint");
    let head = Head {
        seq: last.seq,
        hash: last.hash,
        anchor_seq: last.anchor_seq.unwrap_or(0),
        anchor_hash: last.anchor_hash.unwrap_or_default(),
        sig: last.sig.unwrap_or_default(),
        kid: last.kid.unwrap_or_default(),
        ts: last.ts,
    };
    std::fs::write(dir.join("HEAD"), serde_json::to_vec(&head).expect("ser")).expect("write HEAD");
}

/// The stored lines as a syslog receiver writes them (one message per line), a copy of seq 3
/// included (export is at least once).
fn syslog_copy(dir: &Path, to: &Path) {
    let mut text = String::new();
    for (_, l) in lines(dir) {
        text.push_str(&format!("2026-12-01T10:00:00+00:00 db1 pgward 1 statement {l}\n"));
        if l.starts_with("{\"seq\":3,") {
            text.push_str(&format!("2026-12-01T10:00:00+00:00 db1 pgward 1 statement {l}\n"));
        }
    }
    text.push_str("2026-12-01T10:00:01+00:00 db1 sshd[1]: unrelated line\n");
    std::fs::write(to, text).expect("write copy");
}

#[test]
fn exported_copy_catches_a_rewrite_by_the_key_holder() {
    use crate::audit::against::{ExportedCopy, compare};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    write_log(opts(&d, 3), 6);
    let copy_path = dir.path().join("exported.log");
    syslog_copy(&d, &copy_path);
    let copy = ExportedCopy::load(&copy_path, &keys()).expect("load");
    assert_eq!(copy.copies, 1);
    let same = compare(&d, &copy).expect("compare");
    assert!(same.is_ok(), "{same}");
    assert_eq!((same.matched, same.first_exported), (copy.len() as u64, Some(1)));

    rewrite_with_the_key(&d, |r| {
        if r.seq == 5 {
            r.sql = Some("SELECT 'innocent'".into());
        }
    });
    let local = verify::verify_with(&d, &keys(), &policy(3));
    assert!(local.is_ok(), "the rewrite passes verify alone: {}", local.summary());
    let c = compare(&d, &copy).expect("compare");
    let (seq, reason) = c.divergence.clone().expect("a divergence");
    assert_eq!(seq, 5, "{c}");
    assert!(reason.contains("rewritten after export"), "{reason}");

    // A local log cut short is caught too: the copy holds the record cut off, which continues
    // the local chain. A record past the end that neither continues it nor is vouched for by
    // a signed checkpoint is someone else's line, not evidence of a cut.
    syslog_copy(&d, &copy_path); // a fresh copy of the rewritten log
    let mut text = std::fs::read_to_string(&copy_path).expect("copy");
    text.push_str("{\"seq\":99,\"ts\":\"x\",\"prev_hash\":\"00\",\"kind\":\"start\",\"hash\":\"");
    text.push_str(&hex::encode(Sha256::new().chain_update(b"00").chain_update(b"{\"seq\":99,\"ts\":\"x\",\"prev_hash\":\"00\",\"kind\":\"start\"}").finalize()));
    text.push_str("\"}\n");
    std::fs::write(&copy_path, &text).expect("write copy");
    let c = compare(&d, &ExportedCopy::load(&copy_path, &keys()).expect("load")).expect("compare");
    assert!(c.is_ok(), "{c}");
    assert_eq!(c.foreign_lines.len(), 1, "{c}");
    let last = records(&d).last().expect("records").seq;
    let seg = segment_paths(&d).pop().expect("segment");
    let stored = std::fs::read_to_string(&seg).expect("read");
    let kept: Vec<&str> = stored.lines().filter(|l| !l.starts_with(&format!("{{\"seq\":{last},"))).collect();
    std::fs::write(&seg, kept.join("\n") + "\n").expect("write");
    let c = compare(&d, &ExportedCopy::load(&copy_path, &keys()).expect("load")).expect("compare");
    assert_eq!(c.divergence.as_ref().map(|d| d.0), Some(last), "{c}");
    assert!(c.to_string().contains("the local log was cut"), "{c}");
}

#[test]
fn an_exported_copy_with_a_mangled_record_is_refused() {
    use crate::audit::against::{ExportedCopy, compare};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    write_log(opts(&d, 3), 2);
    let copy_path = dir.path().join("exported.log");
    syslog_copy(&d, &copy_path);
    let text = std::fs::read_to_string(&copy_path).expect("copy").replace("SELECT 1", "SELECT 2");
    std::fs::write(&copy_path, text).expect("write");
    let copy = ExportedCopy::load(&copy_path, &keys()).expect("load");
    let c = compare(&d, &copy).expect("compare");
    let (seq, reason) = c.divergence.clone().expect("the mangled record is not in the copy");
    assert!(reason.contains("unreadable") && reason.contains("hash does not recompute"), "{c}");
    assert!(records(&d).iter().any(|r| r.seq == seq && r.sql.as_deref() == Some("SELECT 1")), "{c}");
}

#[test]
fn a_datagram_stub_in_the_copy_is_compared_by_its_hash() {
    use crate::audit::against::{ExportedCopy, compare};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("audit");
    write_log(opts(&d, 3), 2);
    let stub = |r: &Record| format!("{{\"seq\":{},\"kind\":\"{}\",\"hash\":\"{}\",\"oversize\":70000}}", r.seq, r.kind.as_str(), r.hash);
    let recs = records(&d);
    let copy_path = dir.path().join("exported.log");
    let write_copy = |second: String| {
        let mut text = String::new();
        for (i, (_, l)) in lines(&d).into_iter().enumerate() {
            text.push_str(&format!("db1 pgward statement {}\n", if i == 1 { second.clone() } else { l }));
        }
        std::fs::write(&copy_path, text).expect("write copy");
    };
    write_copy(stub(&recs[1]));
    let c = compare(&d, &ExportedCopy::load(&copy_path, &keys()).expect("load")).expect("compare");
    assert!(c.is_ok(), "{c}");
    let mut forged = recs[1].clone();
    forged.hash = "0".repeat(64);
    write_copy(stub(&forged));
    let c = compare(&d, &ExportedCopy::load(&copy_path, &keys()).expect("load")).expect("compare");
    assert_eq!(c.divergence.map(|d| d.0), Some(2));
}

/// The checkpoint hook is told each durable checkpoint; the local log matches those anchors,
/// and `anchor::check` names the seq where a changed hash or a cut log contradicts them.
#[test]
fn checkpoint_hook_feeds_anchors_that_catch_rewrites_and_cuts() {
    let tmp = tempfile::tempdir().unwrap();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Head>>> = Default::default();
    let sink = seen.clone();
    let hook = CheckpointHook(std::sync::Arc::new(move |h: &Head| sink.lock().unwrap().push(h.clone())));
    let h = AuditHandle::start(WriterOptions { on_checkpoint: Some(hook), ..opts(tmp.path(), 3) }).unwrap();
    append_from_tasks(&h, 1, 10);
    h.shutdown();
    let stored = |hs: &[Head]| -> Vec<(String, Head)> { hs.iter().map(|h| (format!("{:020}", h.seq), h.clone())).collect() };
    let anchors: Vec<Head> = seen.lock().unwrap().clone();
    assert!(anchors.len() >= 3, "{anchors:?}");
    let ok = anchor::check(tmp.path(), &keys(), &stored(&anchors)).unwrap();
    assert!(ok.is_ok() && ok.matched == anchors.len() as u64, "{ok}");

    let first = anchors[0].seq;
    let mut rewritten = anchors.clone();
    rewritten[0].hash = "0".repeat(64);
    let bad = anchor::check(tmp.path(), &keys(), &stored(&rewritten)).unwrap();
    assert_eq!(bad.mismatch.as_ref().map(|m| m.0), Some(first), "{bad}");
    assert!(bad.to_string().contains(&format!("at seq {first}")), "{bad}");

    // A signed anchor past the log's end: the log was cut.
    let last = anchors.last().unwrap().clone();
    let mut extra = last.clone();
    extra.seq = last.seq + 1000;
    extra.anchor_seq = extra.seq - 1;
    extra.sig = CheckpointSigner::new(KID, signing_key()).sign(extra.anchor_seq, &extra.anchor_hash);
    let mut beyond = anchors.clone();
    beyond.push(extra.clone());
    let cut = anchor::check(tmp.path(), &keys(), &stored(&beyond)).unwrap();
    assert_eq!(cut.mismatch.as_ref().map(|m| m.0), Some(extra.anchor_seq), "{cut}");
    assert!(!cut.is_ok() && cut.to_string().contains("no record"), "{cut}");

    // The same anchor without the key's signature, and a genuine one under another seq: forged,
    // not compared, and reported.
    let mut unsigned = extra;
    unsigned.sig = last.sig.clone();
    let mut forged = stored(&anchors);
    forged.push((format!("{:020}", unsigned.seq), unsigned));
    forged.push((format!("{:020}", last.seq + 5000), last));
    let f = anchor::check(tmp.path(), &keys(), &forged).unwrap();
    assert!(f.mismatch.is_none() && f.matched == anchors.len() as u64, "{f}");
    assert_eq!(f.forged.as_ref().map(|x| x.0), Some(2), "{f}");
    assert!(!f.is_ok() && f.to_string().contains("FORGED"), "{f}");

    let none = anchor::check(tmp.path(), &keys(), &[]).unwrap();
    assert!(!none.is_ok(), "a log with checkpoints and no anchors fails: {none}");
}
