//! The system calls that write and sync a batch. Tests can make the next one in a directory
//! fail ([`fault`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[cfg(test)]
use super::direct::DIO_ALIGN;

#[cfg(not(test))]
pub(super) fn write_batch(file: &File, buf: &[u8], at: u64, _dir: &Path) -> io::Result<()> {
    file.write_all_at(buf, at)
}

#[cfg(not(test))]
pub(super) fn sync_batch(file: &File, _dir: &Path) -> io::Result<()> {
    file.sync_data()
}

/// Tests can make the next writer-thread fdatasync in a directory fail.
#[cfg(test)]
pub(super) fn sync_batch(file: &File, dir: &Path) -> io::Result<()> {
    if fault::take_sync(dir) {
        return Err(io::Error::other("injected fdatasync failure"));
    }
    file.sync_data()
}

/// Tests can make the next write into a directory fail after writing half the batch.
#[cfg(test)]
pub(super) fn write_batch(file: &File, buf: &[u8], at: u64, dir: &Path) -> io::Result<()> {
    if fault::take(dir) {
        file.write_all_at(&buf[..buf.len() / 2], at)?;
        return Err(io::Error::other("injected write failure"));
    }
    file.write_all_at(buf, at)
}

#[cfg(not(test))]
pub(super) fn direct_write(file: &File, buf: &[u8], at: u64, _dir: &Path) -> io::Result<()> {
    file.write_all_at(buf, at)
}

/// Tests can make the next write into a directory fail after writing its first block.
#[cfg(test)]
pub(super) fn direct_write(file: &File, buf: &[u8], at: u64, dir: &Path) -> io::Result<()> {
    if fault::take(dir) {
        if buf.len() > DIO_ALIGN {
            file.write_all_at(&buf[..DIO_ALIGN], at)?;
        }
        return Err(io::Error::other("injected write failure"));
    }
    file.write_all_at(buf, at)
}

#[cfg(test)]
pub(crate) mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAIL_NEXT_WRITE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static FAIL_NEXT_SYNC: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub(crate) fn fail_next_sync(dir: &Path) {
        FAIL_NEXT_SYNC.lock().unwrap_or_else(|e| e.into_inner()).push(dir.to_owned());
    }

    pub(crate) fn take_sync(dir: &Path) -> bool {
        take_from(&FAIL_NEXT_SYNC, dir)
    }

    pub(crate) fn fail_next_write(dir: &Path) {
        FAIL_NEXT_WRITE.lock().unwrap_or_else(|e| e.into_inner()).push(dir.to_owned());
    }

    pub(crate) fn take(dir: &Path) -> bool {
        take_from(&FAIL_NEXT_WRITE, dir)
    }

    fn take_from(list: &Mutex<Vec<PathBuf>>, dir: &Path) -> bool {
        let mut v = list.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter().position(|d| d == dir) {
            Some(i) => {
                v.remove(i);
                true
            }
            None => false,
        }
    }
}
