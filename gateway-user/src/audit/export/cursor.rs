//! The export cursor: the last seq the sink acknowledged, in `<audit dir>/export.cursor` as
//! `{"sink":"syslog-tls logs:6514","seq":1234}`. Rewritten atomically (temporary file, fsync,
//! rename, fsync of the directory), so after a crash it holds an old value or the new one,
//! never a torn one; an old value only means records are sent again.
//!
//! A cursor written for another sink is not used: a new sink gets the log from seq 1.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the cursor in the audit directory.
pub const CURSOR_FILE: &str = "export.cursor";
const CURSOR_TMP: &str = "export.cursor.tmp";

#[derive(Serialize, Deserialize)]
struct Stored {
    sink: String,
    seq: u64,
}

pub(super) struct Cursor {
    dir: PathBuf,
    sink: String,
    /// The last seq the sink acknowledged (0: none).
    pub(super) acked: u64,
    persisted: u64,
}

impl Cursor {
    /// The stored cursor for `sink`, or 0 (send from the start) when there is none for it.
    pub(super) fn load(dir: &Path, sink: &str) -> Cursor {
        let path = dir.join(CURSOR_FILE);
        let acked = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Stored>(&bytes) {
                Ok(s) if s.sink == sink => s.seq,
                Ok(s) => {
                    tracing::info!(
                        "audit export: the cursor is for {:?}, not {sink:?}: sending the log from seq 1",
                        s.sink
                    );
                    0
                }
                Err(e) => {
                    tracing::warn!("audit export: {} does not parse ({e}): sending the log from seq 1", path.display());
                    0
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::warn!("audit export: cannot read {} ({e}): sending the log from seq 1", path.display());
                0
            }
        };
        Cursor { dir: dir.to_owned(), sink: sink.to_owned(), acked, persisted: acked }
    }

    pub(super) fn path(&self) -> PathBuf {
        self.dir.join(CURSOR_FILE)
    }

    /// Make `acked` durable (nothing to do when it has not moved).
    pub(super) fn persist(&mut self) -> io::Result<()> {
        if self.acked == self.persisted {
            return Ok(());
        }
        let tmp = self.dir.join(CURSOR_TMP);
        let mut body =
            serde_json::to_vec(&Stored { sink: self.sink.clone(), seq: self.acked }).map_err(io::Error::other)?;
        body.push(b'\n');
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.path())?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.persisted = self.acked;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_belongs_to_one_sink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cursor::load(dir.path(), "syslog-tcp a:1");
        assert_eq!(c.acked, 0);
        c.acked = 42;
        c.persist().expect("persist");
        assert_eq!(Cursor::load(dir.path(), "syslog-tcp a:1").acked, 42);
        assert_eq!(Cursor::load(dir.path(), "syslog-tcp b:1").acked, 0, "another sink starts from the beginning");
        std::fs::write(dir.path().join(CURSOR_FILE), b"{garbage").expect("write");
        assert_eq!(Cursor::load(dir.path(), "syslog-tcp a:1").acked, 0, "an unreadable cursor resends, never skips");
    }
}
