//! The audit disk's flush latency, measured inside the bench run. With `fsync = "group"` every
//! statement waits for (about) one flush of the audit log before it reaches Postgres, so the
//! flush latency is a floor under pgward's single-client latency, and with N closed-loop
//! clients `N / (flush + direct per-statement time)` is a ceiling on its throughput, whatever
//! the relay costs. On a VM the flush latency moves with the host; measuring it in the same
//! run is what makes the group-mode numbers readable.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

/// Flush latency of a 400-byte append + fdatasync (an audit record's size), in µs.
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    pub p50_us: f64,
    pub p90_us: f64,
    pub samples: usize,
}

/// Append `n` lines of 400 bytes to a scratch file in `dir`, fdatasync after each.
pub fn measure(dir: &Path, n: usize) -> Result<Flush> {
    let path = dir.join("flush-probe.log");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let line = [b'x'; 400];
    let mut us = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = Instant::now();
        f.write_all(&line)?;
        f.sync_data()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    us.sort_by(f64::total_cmp);
    Ok(Flush { p50_us: percentile(&us, 0.5), p90_us: percentile(&us, 0.9), samples: us.len() })
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
        assert!(f.p50_us > 0.0 && f.p90_us >= f.p50_us);
        assert!(!dir.join("flush-probe.log").exists());
        let _ = std::fs::remove_dir(&dir);
    }
}
