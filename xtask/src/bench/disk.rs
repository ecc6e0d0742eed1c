//! The audit disk's flush latency, measured inside the bench run. With `fsync = "group"` every
//! statement waits for (about) one flush of the audit log before it reaches Postgres, so the
//! flush latency is a floor under pgward's single-client latency, and with N closed-loop
//! clients `N / (flush + direct per-statement time)` is a ceiling on its throughput, whatever
//! the relay costs. On a VM the flush latency moves with the host; measuring it in the same
//! run is what makes the group-mode numbers readable.
//!
//! The probe also measures the CPU time one flush costs the thread that issues it (the write
//! and the cache flush are system calls; on a VM each device request is a notification to
//! the host and an interrupt back). With N closed-loop clients a flush covers at most N
//! statements, so that cost divided by N is CPU every statement pays on top of relaying it.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

/// Flush latency of one audit batch written the way pgward's writer does it (see
/// [`measure`]), in µs.
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    pub p50_us: f64,
    pub p90_us: f64,
    /// Mean CPU time of the probing thread per flush (user + system), µs.
    pub cpu_us: f64,
    pub samples: usize,
    /// The writes went with O_DIRECT (otherwise through the page cache: the filesystem
    /// refused direct I/O, and so would pgward's writer).
    pub direct: bool,
}

const BLOCK: usize = 4096;
/// Bytes of "records" per sample (a batch of a few audit records).
const BATCH: usize = 1200;

/// `n` samples of what pgward's writer does per batch with `audit.direct_io` (the default):
/// the 4 KiB-aligned blocks holding the next ~1.2 KB of a preallocated, zero-filled file,
/// rewritten with O_DIRECT, then fdatasync — in place, so no size or extent change makes the
/// sync write the inode too. Falls back to page-cache writes where O_DIRECT is refused.
pub fn measure(dir: &Path, n: usize) -> Result<Flush> {
    let n = n.max(1);
    let path = dir.join("flush-probe.log");
    let size = (n * BATCH).div_ceil(BLOCK) * BLOCK + BLOCK;
    {
        // Written zeros, synced: the blocks are allocated and initialized, as pgward's are.
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all_at(&vec![0u8; size], 0)?;
        f.sync_all()?;
    }
    let res = probe(&path, n, size);
    let _ = std::fs::remove_file(&path);
    let (mut us, cpu_us, direct) = res?;
    us.sort_by(f64::total_cmp);
    Ok(Flush { p50_us: percentile(&us, 0.5), p90_us: percentile(&us, 0.9), cpu_us, samples: us.len(), direct })
}

/// CPU time the calling thread has used so far, µs.
fn thread_cpu_us() -> Result<f64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    }
    Ok(ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3)
}

/// The samples (wall µs each), the mean CPU µs per sample, and whether O_DIRECT was used.
fn probe(path: &Path, n: usize, size: usize) -> Result<(Vec<f64>, f64, bool)> {
    let (f, direct) = match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => (f, true),
        Err(_) => (OpenOptions::new().write(true).open(path)?, false),
    };
    // An aligned window into a plain buffer (O_DIRECT needs aligned memory).
    let mut raw = vec![b'x'; 2 * BLOCK + BLOCK];
    let off = raw.as_ptr().align_offset(BLOCK).min(BLOCK);
    let mut us = Vec::with_capacity(n);
    let mut end = 0usize;
    let cpu_start = thread_cpu_us()?;
    for _ in 0..n {
        let at = end - end % BLOCK;
        end += BATCH;
        let len = (end - at).div_ceil(BLOCK) * BLOCK;
        if at + len > size {
            break;
        }
        let buf = &mut raw[off..off + len];
        let t = Instant::now();
        f.write_all_at(buf, at as u64)?;
        f.sync_data()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let cpu_us = (thread_cpu_us()? - cpu_start) / us.len().max(1) as f64;
    Ok((us, cpu_us, direct))
}

/// CPU per statement the audit I/O costs at least when every flush covers one statement of
/// each of `clients` closed-loop clients (the most a flush can cover), µs.
pub fn io_cpu_floor_per_statement(clients: u32, cpu_per_flush_us: f64) -> f64 {
    cpu_per_flush_us / f64::from(clients.max(1))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Throughput ceiling (tps) for `clients` closed-loop clients when each statement also waits
/// one flush: every client's cycle is at least the direct per-statement time plus the flush.
pub fn group_ceiling_tps(clients: u32, direct_tps: f64, flush_us: f64) -> f64 {
    if direct_tps <= 0.0 {
        return 0.0;
    }
    let per_stmt_direct_us = f64::from(clients) * 1e6 / direct_tps;
    f64::from(clients) * 1e6 / (per_stmt_direct_us + flush_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_math() {
        // 8 clients at 40k tps direct = 200 µs per statement; +200 µs flush halves it.
        assert!((group_ceiling_tps(8, 40_000.0, 200.0) - 20_000.0).abs() < 1e-6);
        assert_eq!(group_ceiling_tps(8, 0.0, 200.0), 0.0);
    }

    #[test]
    fn io_floor_math() {
        assert!((io_cpu_floor_per_statement(8, 40.0) - 5.0).abs() < 1e-9);
        assert!((io_cpu_floor_per_statement(0, 40.0) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 6.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn measures_a_real_disk() {
        let dir = std::env::temp_dir().join(format!("pgward-flush-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = measure(&dir, 5).expect("measure");
        assert_eq!(f.samples, 5);
        // The same filesystem takes the audit writer's direct writes (its unit tests say so).
        assert!(f.direct, "O_DIRECT refused in {}", dir.display());
        assert!(f.p50_us > 0.0 && f.p90_us >= f.p50_us);
        // A write and a sync are system calls: the probing thread spends CPU on each.
        assert!(f.cpu_us > 0.0, "no CPU time measured for {} flushes", f.samples);
        assert!(!dir.join("flush-probe.log").exists());
        let _ = std::fs::remove_dir(&dir);
    }
}
