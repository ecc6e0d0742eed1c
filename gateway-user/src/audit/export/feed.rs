//! The exporter's view of the log: the stored lines after a given seq, up to the last durable
//! one, read from the segment files. A line past the durable seq may still be rolled back (a
//! failed sync truncates it), so the reader is put back in front of it and reads it again
//! once it is durable.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::reader::Reader;

/// Only the seq of a stored line.
#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

pub(super) struct Feed {
    dir: PathBuf,
    reader: Option<Reader>,
    /// The last seq returned (or the cursor after a rewind).
    after: u64,
}

impl Feed {
    /// Lines after seq `after`.
    pub(super) fn new(dir: &Path, after: u64) -> Feed {
        Feed { dir: dir.to_owned(), reader: None, after }
    }

    /// Start again after seq `after` (lines sent since are sent again).
    pub(super) fn rewind(&mut self, after: u64) {
        self.reader = None;
        self.after = after;
    }

    fn reader(&mut self) -> Result<&mut Reader, String> {
        if self.reader.is_none() {
            let mut r = Reader::open(&self.dir).map_err(|e| e.to_string())?;
            // Look for new lines and segments without waiting: the writer's nudge or the
            // exporter's own timer says when to look again.
            r.set_follow(true);
            r.set_follow_check(|| false);
            r.start_near(self.after + 1);
            self.reader = Some(r);
        }
        self.reader.as_mut().ok_or_else(|| "no reader".to_string())
    }

    /// Up to `max` stored lines after the last one returned, none past seq `durable`.
    pub(super) fn next_batch(&mut self, durable: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, String> {
        let mut out = Vec::new();
        let mut after = self.after;
        let reader = self.reader()?;
        while out.len() < max {
            let Some(line) = reader.next_line() else { break };
            let line = line.map_err(|e| e.to_string())?;
            if !line.complete {
                // A write cut off in a closed segment: never a durable record.
                tracing::warn!("audit export: skipping the incomplete line {}", line.location());
                continue;
            }
            let seq = serde_json::from_slice::<SeqOnly>(&line.raw)
                .map_err(|e| format!("{}: not an audit record: {e}", line.location()))?
                .seq;
            if seq <= after {
                continue;
            }
            if seq > durable {
                reader.unread(&line).map_err(|e| e.to_string())?;
                break;
            }
            if seq != after + 1 && after > 0 {
                tracing::warn!(
                    "audit export: the log goes from seq {after} to seq {seq} ({}); exporting what is there",
                    line.location()
                );
            }
            after = seq;
            out.push((seq, line.raw));
        }
        self.after = after;
        Ok(out)
    }
}
