//! The exporter's view of the log: the stored lines after a given seq, up to the last durable
//! one, read from the segment files. A line past the durable seq may still be rolled back (a
//! failed sync truncates it), so the reader is put back in front of it and reads it again
//! once it is durable.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::reader::{Line, Reader};

/// Stored lines with their seqs.
type Batch = Vec<(u64, Vec<u8>)>;

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
    /// Where the line of seq `after` is stored, when this feed returned it.
    after_line: Option<Line>,
}

impl Feed {
    /// Lines after seq `after`.
    pub(super) fn new(dir: &Path, after: u64) -> Feed {
        Feed { dir: dir.to_owned(), reader: None, after, after_line: None }
    }

    /// Start again after seq `after` (lines sent since are sent again).
    pub(super) fn rewind(&mut self, after: u64) {
        self.reader = None;
        self.after = after;
        self.after_line = None;
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
    ///
    /// The reader finds the segment to start in, and the one to go on with, by the segments'
    /// names, which anyone who can write the directory can add to (an empty `audit-….jsonl`
    /// named for a seq another segment holds). When it skips records or finds none of the
    /// durable ones, the batch is read again from where the last line returned is stored,
    /// or, without one, from the first segment; what is still missing then is not in the log.
    pub(super) fn next_batch(&mut self, durable: u64, max: usize) -> Result<Batch, String> {
        let (first, stuck) = self.read_batch(durable, max, true)?;
        if !stuck {
            return Ok(first);
        }
        let mut r = Reader::open(&self.dir).map_err(|e| e.to_string())?;
        r.set_follow(true);
        r.set_follow_check(|| false);
        match self.after_line.as_ref() {
            Some(line) => r.unread(line).map_err(|e| e.to_string())?,
            None => tracing::warn!(
                "audit export: the segment named for seq {} does not lead to it; reading the log from its first segment",
                self.after + 1
            ),
        }
        self.reader = Some(r);
        let (again, _) = self.read_batch(durable, max - first.len(), false)?;
        let mut out = first;
        out.extend(again);
        Ok(out)
    }

    /// One pass of [`Feed::next_batch`]; also says whether the reader went wrong: it skipped
    /// records (the `first` pass stops there; the second exports across the gap, which is
    /// then in the log itself), or found nothing where durable records are.
    fn read_batch(&mut self, durable: u64, max: usize, first: bool) -> Result<(Batch, bool), String> {
        let mut out = Vec::new();
        let mut after = self.after;
        let mut after_line = self.after_line.take();
        let reader = self.reader()?;
        let mut stuck = false;
        while out.len() < max {
            let Some(line) = reader.next_line() else {
                stuck = out.is_empty() && durable > after;
                break;
            };
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
                if first {
                    stuck = true;
                    break;
                }
                tracing::warn!(
                    "audit export: the log goes from seq {after} to seq {seq} ({}); exporting what is there",
                    line.location()
                );
            }
            after = seq;
            out.push((seq, line.raw.clone()));
            after_line = Some(line);
        }
        self.after = after;
        self.after_line = after_line;
        Ok((out, stuck))
    }
}
