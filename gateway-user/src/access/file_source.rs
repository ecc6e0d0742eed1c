//! The file backend's `serve` side: tailing `revoked.jsonl` and `access.jsonl` (polled; a
//! file replaced or truncated is read again from the start).

use std::io::{Read as _, Seek as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::file_store::parse_lines;
use super::source::{Batch, Delta, Pos};
use super::state::{AccessEvent, Revocation};
use super::{ACCESS_FILE, REVOKED_FILE};

/// One watched file: how far it has been read.
struct Tail {
    path: PathBuf,
    /// Inode and offset read up to (whole lines).
    pos: Pos,
    /// (len, mtime) last seen, to skip reading when nothing changed.
    seen: Option<(u64, i64, i64)>,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail { path, pos: Pos::default(), seen: None }
    }

    /// New complete lines since the last call: (bytes, offset of their start); `reset` when the
    /// file was replaced or truncated (everything is read again from 0).
    fn read_new(&mut self) -> std::io::Result<Option<(Vec<u8>, u64, bool)>> {
        let m = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let reset = self.pos.offset > 0;
                self.pos = Pos::default();
                self.seen = None;
                return Ok(reset.then(|| (Vec::new(), 0, true)));
            }
            Err(e) => return Err(e),
        };
        let stamp = (m.len(), m.mtime(), m.mtime_nsec());
        if self.seen == Some(stamp) && m.ino() == self.pos.ino {
            return Ok(None);
        }
        let mut reset = false;
        if (self.pos.ino != 0 && m.ino() != self.pos.ino) || m.len() < self.pos.offset {
            tracing::warn!(file = %self.path.display(), "state file was replaced or truncated; reading it again from the start");
            self.pos = Pos { ino: m.ino(), offset: 0 };
            reset = true;
        }
        self.pos.ino = m.ino();
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(std::io::SeekFrom::Start(self.pos.offset))?;
        let mut buf = Vec::new();
        f.take(m.len().saturating_sub(self.pos.offset)).read_to_end(&mut buf)?;
        let complete = buf.iter().rposition(|b| *b == b'\n').map(|p| p + 1).unwrap_or(0);
        buf.truncate(complete);
        let start = self.pos.offset;
        self.pos.offset += complete as u64;
        if complete == m.len().saturating_sub(start) as usize {
            self.seen = Some(stamp);
        }
        Ok(Some((buf, start, reset)))
    }

    /// The new lines parsed as `T`, each with the offset just past it.
    fn batch<T: serde::de::DeserializeOwned>(&mut self) -> std::io::Result<Option<Batch<T>>> {
        let Some((bytes, start, reset)) = self.read_new()? else { return Ok(None) };
        let items = parse_lines::<T>(&bytes, start, &self.path).0;
        Ok(Some(Batch { items, reset, pos: self.pos }))
    }
}

/// Both state files of one host.
pub(super) struct FileSource {
    revoked: Tail,
    events: Tail,
}

impl FileSource {
    pub(super) fn new(dir: &Path) -> FileSource {
        FileSource { revoked: Tail::new(dir.join(REVOKED_FILE)), events: Tail::new(dir.join(ACCESS_FILE)) }
    }

    /// Whatever is new in either file.
    pub(super) fn poll(&mut self) -> std::io::Result<Delta> {
        Ok(Delta { revoked: self.revoked.batch::<Revocation>()?, events: self.events.batch::<AccessEvent>()? })
    }
}
