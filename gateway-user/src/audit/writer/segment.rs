//! Segment files: the open segment (preallocated, zero-filled ahead of the last line), making
//! sure there is a usable one before a batch, and rotating to a new one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::ffi::CString;
use std::time::Instant;

use super::AuditError;
use super::direct::{AlignedBuf, DIO_ALIGN, DirectWrite};
use super::log::Log;
use super::probe::{OFF_PATH_CHECK_INTERVAL, PathProbe, dir_writable, names_file, path_cstring};
use crate::audit::chain;
use crate::config::FsyncPolicy;

/// How far ahead of the last line the active segment is filled with written zeros (with
/// `group`/`always`; see [`OpenSegment::zero_ahead`]).
pub(super) const ZERO_AHEAD: u64 = 1 << 20;

pub(super) struct OpenSegment {
    pub(super) file: File,
    pub(super) path: PathBuf,
    /// `path` for the system calls of the path checks (see [`super::probe::ProbeTarget`]).
    pub(super) path_c: Arc<CString>,
    /// Distinguishes segments (a sync ticket names the one it covers).
    pub(super) id: u64,
    /// Bytes of complete, chained lines written.
    pub(super) len: u64,
    /// Bytes a successful sync covered.
    pub(super) durable_len: u64,
    /// The file's size: `len` plus the preallocated, zero-filled tail (see [`preallocate`]).
    pub(super) alloc: u64,
    /// The size to preallocate to (the segment size).
    pub(super) reserve: u64,
    /// Bytes up to here are content or zeros written by [`OpenSegment::zero_ahead`].
    pub(super) zeroed: u64,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// A failed write left bytes past `len` that could not be truncated yet.
    pub(super) dirty: bool,
    /// One descriptor per writer thread, opened with the segment: each open file
    /// description sees every writeback error once, so a thread's successful fdatasync
    /// really means its range reached the disk even when another thread's sync reported
    /// (and consumed, for its own descriptor) an error.
    pub(super) sync_fds: Vec<Arc<File>>,
    /// An O_DIRECT descriptor when batches are written directly (see [`DirectWrite`]).
    pub(super) direct_fd: Option<Arc<File>>,
    /// The content bytes of the block holding `len` (from its start), valid while
    /// `tail_end == len`; read back from the file otherwise.
    pub(super) tail: Vec<u8>,
    pub(super) tail_end: u64,
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Open one descriptor per writer thread for `path` (see `OpenSegment::sync_fds`).
pub(super) fn open_sync_fds(path: &Path, n: usize) -> Result<Vec<Arc<File>>, AuditError> {
    (0..n.max(1))
        .map(|_| {
            File::open(path).map(Arc::new).map_err(|e| AuditError::io(format!("opening {}", path.display()), e))
        })
        .collect()
}
/// Reserve the rest of a segment (up to `size` bytes) so batches overwrite allocated,
/// zero-filled space instead of appending (like Postgres WAL segments): an append changes
/// the file's size, so every fdatasync would also write the inode — a second I/O per flush.
/// Readers treat the first NUL byte as the end of the content (JSON lines
/// never contain one). Returns the file's size afterwards; where the filesystem cannot
/// preallocate, the segment just grows with each write as before.
pub(super) fn preallocate(file: &File, len: u64, size: u64) -> u64 {
    if size > len {
        let size = libc::off_t::try_from(size).unwrap_or(libc::off_t::MAX);
        // SAFETY: fallocate on a descriptor this File owns; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size) } != 0 {
            tracing::debug!("audit: cannot preallocate segment: {}", io::Error::last_os_error());
        }
    }
    file.metadata().map_or(len, |m| m.len()).max(len)
}

impl OpenSegment {
    /// Cut the segment back to `to` bytes of content (dropping whatever was written after
    /// it) and preallocate its tail again.
    pub(super) fn cut(&mut self, to: u64) -> io::Result<()> {
        self.tail_end = u64::MAX;
        self.file.set_len(to)?;
        self.alloc = preallocate(&self.file, to, self.reserve);
        self.zeroed = to;
        Ok(())
    }

    /// Before writing `n` bytes at `len`: make sure they land on blocks that already hold
    /// written zeros, by writing the next `ZERO_AHEAD` bytes of zeros now and then.
    /// `fallocate` only reserves blocks ("unwritten"); the first write into each one
    /// converts it, and that metadata change makes the next fdatasync write the inode too. The
    /// zeros reach the disk with the next sync, in one larger write, once per `ZERO_AHEAD`.
    pub(super) fn zero_ahead(&mut self, n: u64) -> io::Result<()> {
        let need = self.len + n;
        if need <= self.zeroed || self.zeroed >= self.alloc {
            return Ok(());
        }
        let from = self.zeroed.max(self.len);
        let to = (need + ZERO_AHEAD).min(self.alloc).max(need);
        let zeros = vec![0u8; usize::try_from(to - from).map_err(io::Error::other)?];
        self.file.write_all_at(&zeros, from)?;
        self.zeroed = to;
        Ok(())
    }

    /// Open the segment's O_DIRECT descriptor and check that a direct write works here (by
    /// rewriting the block holding the end of the content as it is). On failure the segment
    /// is written through the page cache.
    pub(super) fn start_direct(&mut self) {
        let res = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
            .and_then(|f| {
                let at = self.head_block()?;
                let mut buf = AlignedBuf::zeroed(DIO_ALIGN)?;
                buf.as_mut_slice()[..self.tail.len()].copy_from_slice(&self.tail);
                f.write_all_at(buf.as_slice(), at)?;
                Ok(f)
            });
        match res {
            Ok(f) => self.direct_fd = Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!("audit: direct I/O unavailable for {} ({e}); writing through the page cache", self.path.display())
            }
        }
    }

    /// The offset of the block holding `len`; `tail` then holds the content bytes before
    /// `len` in it.
    pub(super) fn head_block(&mut self) -> io::Result<u64> {
        let at = self.len - self.len % DIO_ALIGN as u64;
        if self.tail_end != self.len {
            let mut head = vec![0u8; (self.len - at) as usize];
            self.file.read_exact_at(&mut head, at)?;
            self.tail = head;
            self.tail_end = self.len;
        }
        Ok(at)
    }

    /// The aligned write that appends `batch` at `len`; remembers the new tail block.
    pub(super) fn direct_batch(&mut self, batch: &[u8]) -> io::Result<DirectWrite> {
        let at = self.head_block()?;
        let head = self.tail.len();
        let total = head + batch.len();
        let mut buf = AlignedBuf::zeroed(total.div_ceil(DIO_ALIGN) * DIO_ALIGN)?;
        let b = buf.as_mut_slice();
        b[..head].copy_from_slice(&self.tail);
        b[head..total].copy_from_slice(batch);
        let tail_from = total - total % DIO_ALIGN;
        self.tail.clear();
        self.tail.extend_from_slice(&b[tail_from..total]);
        self.tail_end = self.len + batch.len() as u64;
        Ok(DirectWrite { buf, at })
    }

    /// Drop the zero-filled tail: a closed segment holds exactly its lines. Returns whether
    /// a tail was cut (the file's size changed).
    pub(super) fn trim(&mut self) -> bool {
        if self.alloc <= self.len {
            return false;
        }
        match self.file.set_len(self.len) {
            Ok(()) => {
                self.alloc = self.len;
                true
            }
            Err(e) => {
                tracing::warn!("audit: could not trim {}: {e}", self.path.display());
                false
            }
        }
    }
}

impl Log {
    /// Make sure there is a usable segment to append to (see the module docs).
    pub(super) fn prepare(&mut self, probe: Option<PathProbe>) -> Result<(), AuditError> {
        // Taken: any error below means the next write checks again.
        let last_check = self.paths_checked_at.take();
        let check_paths = self.seg.is_none()
            || self.fsync != FsyncPolicy::Off
            || last_check.is_none_or(|t| t.elapsed() >= OFF_PATH_CHECK_INTERVAL);
        // Checks the writer thread ran just before it took the lock stand for the segment they
        // looked at; for any other (rotated or replaced meanwhile) they are run here.
        let probe = probe.filter(|p| check_paths && self.seg.as_ref().is_some_and(|s| s.id == p.seg_id));
        let (dir, probed_same) = match probe {
            Some(p) => (p.dir, Some(p.same)),
            None if check_paths => (dir_writable(&self.dir_c), None),
            None => (Ok(()), None),
        };
        if let Err(e) = dir {
            return Err(AuditError::Unwritable { path: self.dir.clone(), reason: e.to_string() });
        }
        let mut rotate = false;
        if let Some(seg) = &mut self.seg {
            let same = !check_paths
                || probed_same.unwrap_or_else(|| names_file(&seg.path_c, seg.dev, seg.ino, seg.len));
            if !same {
                let path = seg.path.clone();
                self.seg = None;
                tracing::error!("audit: segment {} was removed, replaced or truncated", path.display());
                let e = AuditError::SegmentGone { path };
                // What was written to it but not yet synced is gone with it.
                self.rollback_to_durable(&e);
                return Err(e);
            }
            if seg.dirty {
                seg.cut(seg.len)
                    .map_err(|e| AuditError::io(format!("truncating {}", seg.path.display()), e))?;
                seg.dirty = false;
            }
            rotate = seg.len > 0 && seg.len >= self.segment_bytes;
        }
        if rotate {
            // Everything in the old segment must be durable before the next one gets
            // records: a later sync only covers the file it is called on. A closed segment
            // holds exactly its lines (no preallocated tail).
            let trimmed = self.seg.as_mut().is_some_and(OpenSegment::trim);
            if self.fsync != FsyncPolicy::Off && (trimmed || self.written.seq > self.durable.seq) {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                let res = self.seg.as_ref().map_or(Ok(()), |s| s.file.sync_all());
                match res {
                    Ok(()) => {
                        let pos = self.written.clone();
                        self.advance(pos);
                    }
                    Err(e) => {
                        let err = self.truncate_to_durable(e);
                        return Err(err);
                    }
                }
            }
            self.seg = None;
        }
        if self.seg.is_none() {
            self.seg = Some(self.open_segment()?);
        }
        self.paths_checked_at = if check_paths { Some(Instant::now()) } else { last_check };
        Ok(())
    }

    pub(super) fn open_segment(&mut self) -> Result<OpenSegment, AuditError> {
        // Named after the first record it will hold (the next one to be written).
        let first_seq = self.written.seq + 1;
        let path = self.dir.join(chain::segment_name(first_seq));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false) // an existing file with data is refused below
            .read(true)
            .write(true)
            .mode(0o640)
            .open(&path)
            .map_err(|e| AuditError::io(format!("creating {}", path.display()), e))?;
        let meta = file.metadata().map_err(|e| AuditError::io(format!("stat {}", path.display()), e))?;
        if meta.len() != 0 {
            return Err(AuditError::Corrupt {
                path,
                reason: format!("a new segment for seq {first_seq} already holds data"),
            });
        }
        if self.fsync != FsyncPolicy::Off {
            sync_dir(&self.dir).map_err(|e| AuditError::io(format!("fsync {}", self.dir.display()), e))?;
        }
        let sync_fds = open_sync_fds(&path, self.threads)?;
        self.segments_opened += 1;
        let alloc = preallocate(&file, 0, self.segment_bytes);
        let mut seg = OpenSegment {
            file,
            path_c: path_cstring(&path),
            path,
            id: self.segments_opened,
            len: 0,
            durable_len: 0,
            alloc,
            reserve: self.segment_bytes,
            zeroed: 0,
            dev: meta.dev(),
            ino: meta.ino(),
            dirty: false,
            sync_fds,
            direct_fd: None,
            tail: Vec::new(),
            tail_end: u64::MAX,
        };
        if self.direct {
            seg.start_direct();
        }
        Ok(seg)
    }
}
