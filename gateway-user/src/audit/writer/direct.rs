//! Batches written with O_DIRECT: block-aligned buffers.

use std::io;

/// O_DIRECT needs offsets, lengths and memory aligned to the device's logical block size;
/// 4096 is a multiple of every common one.
pub(super) const DIO_ALIGN: usize = 4096;

/// A batch written with O_DIRECT: whole blocks from the one holding the segment's current end
/// (its earlier bytes rewritten unchanged) to the zero-padded block holding the batch's end.
/// The fdatasync then only flushes the device cache, where through the page cache it would
/// also run the writeback machinery for one dirty page: less latency and about half the CPU
/// per durable batch. The write and the flush both happen outside the log lock, in order (one
/// writer thread), so blocks are never in flight twice at once.
pub(super) struct DirectWrite {
    pub(super) buf: AlignedBuf,
    pub(super) at: u64,
}

/// A zero-filled buffer whose usable part starts on a [`DIO_ALIGN`] boundary.
pub(super) struct AlignedBuf {
    pub(super) raw: Vec<u8>,
    pub(super) off: usize,
    pub(super) len: usize,
}

impl AlignedBuf {
    pub(super) fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let raw = vec![0u8; len + DIO_ALIGN];
        let off = raw.as_ptr().align_offset(DIO_ALIGN);
        if off >= DIO_ALIGN {
            return Err(io::Error::other("cannot align a direct I/O buffer"));
        }
        Ok(AlignedBuf { raw, off, len })
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}
