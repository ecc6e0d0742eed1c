//! Read the audit log: every line of every segment in order, optionally following the log
//! as it grows and rotates (`tail -f`).
//!
//! [`Reader::next_line`] yields raw lines (for `verify` and `tail --json`); the `Iterator`
//! impl yields parsed [`Entry`]s. At the end of the last segment a non-following reader
//! stops but keeps its position, so [`Reader::set_follow`] can continue from there.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::chain::{self, SegmentFile};
use super::record::Record;

/// How often a following reader polls for growth and new segments.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// One stored line.
#[derive(Debug, Clone)]
pub struct Line {
    pub segment: Arc<Path>,
    /// The first seq the segment's name announces.
    pub segment_first_seq: u64,
    /// 1-based line number within the segment.
    pub line_no: u64,
    /// Byte offset of the line within the segment.
    pub offset: u64,
    /// The bytes as stored, without the trailing `\n`.
    pub raw: Vec<u8>,
    /// Whether the line was terminated by `\n` (false: an interrupted write).
    pub complete: bool,
}

impl Line {
    pub fn parse(&self) -> Result<Record, serde_json::Error> {
        serde_json::from_slice(&self.raw)
    }

    /// `audit-….jsonl:LINE`
    pub fn location(&self) -> String {
        let name = self
            .segment
            .file_name()
            .map_or_else(|| self.segment.display().to_string(), |n| n.to_string_lossy().into_owned());
        format!("{name}:{}", self.line_no)
    }
}

/// A line and the record it holds.
#[derive(Debug, Clone)]
pub struct Entry {
    pub line: Line,
    pub record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{location}: not a valid audit record: {reason}")]
    Parse { location: String, reason: String },
    #[error("{location}: incomplete line (no trailing newline)")]
    Incomplete { location: String },
}

struct Current {
    reader: BufReader<File>,
    path: Arc<Path>,
    first_seq: u64,
}

pub struct Reader {
    dir: PathBuf,
    segments: Vec<SegmentFile>,
    /// Index into `segments` of the segment being read (or to open next).
    idx: usize,
    cur: Option<Current>,
    line_no: u64,
    offset: u64,
    pending: Vec<u8>,
    follow: Option<Duration>,
    hold_partial: bool,
    keep_following: Option<Box<dyn FnMut() -> bool + Send>>,
    /// Segments followed by another whose content ended at a NUL byte with other bytes after
    /// it, and the offset of that NUL (see [`Reader::cut_short`]).
    cut_short: Vec<(PathBuf, u64)>,
}

impl Reader {
    /// A reader positioned at the first line of the first segment.
    pub fn open(dir: &Path) -> Result<Reader, ReadError> {
        let segments = chain::list_segments(dir).map_err(|source| ReadError::Io { path: dir.to_owned(), source })?;
        Ok(Reader {
            dir: dir.to_owned(),
            segments,
            idx: 0,
            cur: None,
            line_no: 0,
            offset: 0,
            pending: Vec::new(),
            follow: None,
            hold_partial: false,
            keep_following: None,
            cut_short: Vec::new(),
        })
    }

    /// Keep waiting for new lines at the end of the log (polling every `FOLLOW_POLL`).
    pub fn set_follow(&mut self, follow: bool) {
        self.follow = follow.then_some(FOLLOW_POLL);
    }

    /// While following and idle, ask `check` before every poll; `false` ends the iteration
    /// (e.g. `tail -f` whose output pipe was closed).
    pub fn set_follow_check(&mut self, check: impl FnMut() -> bool + Send + 'static) {
        self.keep_following = Some(Box::new(check));
    }

    /// Sleep one poll interval; false if the follow check says to stop.
    fn idle(&mut self, poll: Duration) -> bool {
        if let Some(check) = self.keep_following.as_mut()
            && !check()
        {
            return false;
        }
        std::thread::sleep(poll);
        true
    }

    /// At the end of the log, keep an unterminated last line buffered (it may be a write in
    /// progress, to be completed when following) instead of returning it as incomplete.
    pub fn set_hold_partial(&mut self, hold: bool) {
        self.hold_partial = hold;
    }

    /// Before the first read: start with the segment that holds `seq` (the last one whose
    /// name announces a seq at or before it), skipping the segments before it.
    pub fn start_near(&mut self, seq: u64) {
        if self.cur.is_none() {
            self.idx = self.segments.iter().rposition(|s| s.first_seq <= seq).unwrap_or(0);
        }
    }

    /// Go back to just before `line` (one this reader returned), so the next read returns it
    /// again as it is then stored.
    pub fn unread(&mut self, line: &Line) -> Result<(), ReadError> {
        let in_current = self.cur.as_ref().is_some_and(|c| *c.path == *line.segment);
        if !in_current {
            let gone = || ReadError::Io {
                path: line.segment.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "segment no longer listed"),
            };
            self.idx = self.segments.iter().position(|s| s.first_seq == line.segment_first_seq).ok_or_else(gone)?;
            self.open_current()?;
        }
        let Some(cur) = self.cur.as_mut() else { return Ok(()) };
        cur.reader
            .seek(SeekFrom::Start(line.offset))
            .map_err(|source| ReadError::Io { path: line.segment.to_path_buf(), source })?;
        self.line_no = line.line_no.saturating_sub(1);
        self.offset = line.offset;
        self.pending.clear();
        Ok(())
    }

    /// Segments read so far, each followed by another, whose content ended at a NUL byte with
    /// bytes other than NULs after it, and that NUL's offset. A closed segment holds its lines
    /// (rotation trims the preallocated tail) or, abandoned while in use, its lines and NULs.
    /// Anything after a NUL is hidden from every reader of the log (they stop there) but not
    /// from tools that drop the NULs.
    pub fn cut_short(&self) -> &[(PathBuf, u64)] {
        &self.cut_short
    }

    /// The segments known so far, in order.
    pub fn segments(&self) -> &[SegmentFile] {
        &self.segments
    }

    fn open_current(&mut self) -> Result<(), ReadError> {
        let Some(seg) = self.segments.get(self.idx) else { return Ok(()) };
        let file = open_regular(&seg.path).map_err(|source| ReadError::Io { path: seg.path.clone(), source })?;
        self.cur = Some(Current {
            reader: BufReader::with_capacity(64 * 1024, file),
            path: Arc::from(seg.path.as_path()),
            first_seq: seg.first_seq,
        });
        self.line_no = 0;
        self.offset = 0;
        self.pending.clear();
        Ok(())
    }

    /// Re-list the directory; keeps the current segment and adds newer ones. Returns whether
    /// a segment after the current one exists.
    fn refresh(&mut self) -> Result<bool, ReadError> {
        let list =
            chain::list_segments(&self.dir).map_err(|source| ReadError::Io { path: self.dir.clone(), source })?;
        match self.segments.get(self.idx).cloned() {
            Some(cur) => {
                let mut segs = vec![cur.clone()];
                segs.extend(list.into_iter().filter(|s| s.first_seq > cur.first_seq));
                self.segments = segs;
                self.idx = 0;
                Ok(self.segments.len() > 1)
            }
            None => {
                let found = !list.is_empty();
                self.segments = list;
                self.idx = 0;
                Ok(found)
            }
        }
    }

    fn take_line(&mut self, complete: bool) -> Option<Line> {
        let cur = self.cur.as_ref()?;
        let mut raw = std::mem::take(&mut self.pending);
        let len = raw.len() as u64;
        if complete {
            raw.pop();
        }
        self.line_no += 1;
        let line = Line {
            segment: cur.path.clone(),
            segment_first_seq: cur.first_seq,
            line_no: self.line_no,
            offset: self.offset,
            raw,
            complete,
        };
        self.offset += len;
        Some(line)
    }

    /// The next stored line, or `None` at the end of the log (never, when following).
    pub fn next_line(&mut self) -> Option<Result<Line, ReadError>> {
        loop {
            if self.cur.is_none() {
                if self.idx >= self.segments.len() {
                    let poll = self.follow?;
                    match self.refresh() {
                        Ok(true) => {}
                        Ok(false) => {
                            if !self.idle(poll) {
                                return None;
                            }
                        }
                        Err(e) => return Some(Err(e)),
                    }
                    continue;
                }
                if let Err(e) = self.open_current() {
                    return Some(Err(e));
                }
            }
            let Some(cur) = self.cur.as_mut() else { continue };
            let path = cur.path.clone();
            match read_line(&mut cur.reader, &mut self.pending) {
                Err(source) => return Some(Err(ReadError::Io { path: path.to_path_buf(), source })),
                Ok(_) if self.pending.last() == Some(&b'\n') => return self.take_line(true).map(Ok),
                Ok(_) => {}
            }
            // End of the segment's current content (possibly with an unterminated fragment).
            let is_last = self.idx + 1 >= self.segments.len();
            if let Some(poll) = self.follow {
                let newer = if is_last {
                    match self.refresh() {
                        Ok(n) => n,
                        Err(e) => return Some(Err(e)),
                    }
                } else {
                    true
                };
                if !newer {
                    if !self.idle(poll) {
                        return None;
                    }
                    continue;
                }
                // The writer finished this segment before creating the next: one more read
                // sees everything it will ever hold.
                let Some(cur) = self.cur.as_mut() else { continue };
                match read_line(&mut cur.reader, &mut self.pending) {
                    Err(source) => return Some(Err(ReadError::Io { path: path.to_path_buf(), source })),
                    Ok(n) if n > 0 => {
                        if self.pending.last() == Some(&b'\n') {
                            return self.take_line(true).map(Ok);
                        }
                        continue;
                    }
                    Ok(_) => {}
                }
            } else if is_last {
                // Stay positioned at the end so following can resume here.
                if self.pending.is_empty() || self.hold_partial {
                    return None;
                }
                return self.take_line(false).map(Ok);
            }
            if let Some(cur) = self.cur.as_mut()
                && bytes_after_nuls(&mut cur.reader)
            {
                self.cut_short.push((path.to_path_buf(), self.offset + self.pending.len() as u64));
            }
            let fragment = if self.pending.is_empty() { None } else { self.take_line(false) };
            self.cur = None;
            self.idx += 1;
            if let Some(line) = fragment {
                return Some(Ok(line));
            }
        }
    }
}

/// Open a segment for reading without blocking on what is not a regular file (a FIFO put
/// under a segment's name after the directory was listed), and refuse it.
fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file: not a segment pgward wrote"));
    }
    Ok(file)
}

/// Whether anything but NUL bytes follows in `reader` (consumed to the end, or to the first
/// such byte). A segment abandoned while in use (removed, or its directory moved away, and
/// then put back) keeps its preallocated tail of NULs; bytes after them are hidden content.
fn bytes_after_nuls(reader: &mut BufReader<File>) -> bool {
    loop {
        let rest = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Unreadable: the next read of this segment reports it.
            Err(_) => return false,
        };
        if rest.is_empty() {
            return false;
        }
        if rest.iter().any(|&b| b != 0) {
            return true;
        }
        let n = rest.len();
        reader.consume(n);
    }
}

/// Like `read_until(b'\n')`, but a NUL byte ends the content: the writer preallocates
/// segments, and their zero-filled tail is not (yet) part of the log. At a NUL the
/// read-ahead is dropped, so the next call reads what has been written there since.
fn read_line(reader: &mut BufReader<File>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut added = 0;
    loop {
        let avail = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Some(i) = avail.iter().position(|&b| b == b'\n' || b == 0) else {
            if avail.is_empty() {
                return Ok(added);
            }
            let n = avail.len();
            buf.extend_from_slice(avail);
            reader.consume(n);
            added += n;
            continue;
        };
        if avail[i] == b'\n' {
            buf.extend_from_slice(&avail[..=i]);
            reader.consume(i + 1);
            return Ok(added + i + 1);
        }
        buf.extend_from_slice(&avail[..i]);
        reader.consume(i);
        // Seeking drops BufReader's buffer (the stale zeros after this point);
        // `stream_position` would keep it.
        #[allow(clippy::seek_from_current)]
        reader.seek(SeekFrom::Current(0))?;
        return Ok(added + i);
    }
}

impl Iterator for Reader {
    type Item = Result<Entry, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        let line = match self.next_line()? {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        if !line.complete {
            return Some(Err(ReadError::Incomplete { location: line.location() }));
        }
        Some(match line.parse() {
            Ok(record) => Ok(Entry { line, record }),
            Err(e) => Err(ReadError::Parse { location: line.location(), reason: e.to_string() }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, s: &str) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open");
        f.write_all(s.as_bytes()).expect("write");
    }

    #[test]
    fn reads_across_segments_and_follows_growth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(&d.join(chain::segment_name(1)), "{\"seq\":1,\"ts\":\"\",\"prev_hash\":\"\",\"kind\":\"start\"}\n");
        write(
            &d.join(chain::segment_name(2)),
            "{\"seq\":2,\"ts\":\"\",\"prev_hash\":\"\",\"kind\":\"statement\"}\n{\"seq\":3,",
        );
        let mut r = Reader::open(d).expect("open");
        let seqs: Vec<_> = r.by_ref().map(|e| e.map(|e| e.record.seq).map_err(|e| e.to_string())).collect();
        assert_eq!(seqs.len(), 3);
        assert_eq!(seqs[0], Ok(1));
        assert_eq!(seqs[1], Ok(2));
        assert_eq!(seqs[2], Err(format!("{}:2: incomplete line (no trailing newline)", chain::segment_name(2))));
        // Nothing more at the end; then the fragment is completed and a new segment appears.
        assert!(r.next().is_none());
        write(&d.join(chain::segment_name(2)), "\"ts\":\"\",\"prev_hash\":\"\",\"kind\":\"result\"}\n");
        write(&d.join(chain::segment_name(4)), "{\"seq\":4,\"ts\":\"\",\"prev_hash\":\"\",\"kind\":\"session_end\"}\n");
        let mut r = Reader::open(d).expect("open");
        r.set_follow(true);
        let mut got = Vec::new();
        for _ in 0..4 {
            let e = r.next().expect("following never ends").expect("valid");
            got.push((e.record.seq, e.line.line_no));
        }
        assert_eq!(got, vec![(1, 1), (2, 1), (3, 2), (4, 1)]);
    }

    /// The writer preallocates the active segment: its content ends at the first NUL, and
    /// lines written over the zeros later are read from where the reader stopped.
    #[test]
    fn stops_at_the_preallocated_tail_and_reads_what_replaces_it() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(chain::segment_name(1));
        let first = "{\"seq\":1,\"ts\":\"\",\"prev_hash\":\"\",\"kind\":\"start\"}\n";
        write(&path, first);
        let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(256 * 1024).expect("preallocate");
        let mut r = Reader::open(dir.path()).expect("open");
        assert_eq!(r.next().expect("a line").expect("valid").record.seq, 1);
        assert!(r.next().is_none(), "the zero tail is not a line");
        let second = "{\"seq\":2,\"ts\":\"\",\"prev_hash\":\"\",\"kind\":\"statement\"}\n";
        f.write_all_at(second.as_bytes(), first.len() as u64).expect("write");
        let e = r.next().expect("the new line").expect("valid");
        assert_eq!((e.record.seq, e.line.line_no, e.line.offset), (2, 2, first.len() as u64));
        assert!(r.next().is_none());
    }
}
