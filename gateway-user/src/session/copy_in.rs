//! COPY FROM STDIN and what the client sends until its CopyDone or CopyFail. While Postgres
//! copies it ignores a Sync (no ReadyForQuery comes back for it) and fails the COPY on any
//! other statement message, which it consumes unanswered; once the COPY failed, or if it never
//! started, it answers both as usual. The protocol tracker must know which, or every answer
//! after it is matched to the wrong message: results recorded against other statements, and
//! masking planning one statement's rows from another's (or not at all). So, from a forwarded
//! statement that starts COPY FROM STDIN up to the client's CopyDone or CopyFail:
//! - a Sync sent before the server said whether it copies (CopyInResponse, or the statement's
//!   end without one) is held, with a Flush sent in its place so that the statement's answer
//!   comes back; it is dropped if the server copies, and sent if it does not;
//! - a Sync sent while the server copies is dropped (Postgres would ignore it) — unless
//!   CopyData went before it: a row may have failed the COPY, and then the server answers it;
//!   which, depends on when it reads it, so the session ends (FATAL 08P01);
//! - a statement message (Query, Parse, Bind, Execute, Describe, Close, FunctionCall), or a
//!   CopyDone or CopyFail before the server started copying, ends the session (FATAL 08P01):
//!   what Postgres makes of it depends on timing pgward cannot see.
//!
//! A CopyInResponse pgward did not expect (a statement it could not parse) ends the session
//! too.

use bytes::BytesMut;

use crate::policy::{Modifier, StatementClass, StatementInfo};
use crate::wire::{self, Frame};

/// A Flush: what goes upstream in place of a held Sync.
pub(super) fn flush_frame() -> Frame {
    let mut b = BytesMut::new();
    wire::message(&mut b, b'H', &[]);
    Frame { tag: b'H', raw: b.freeze() }
}

/// A Sync: a held one, sent once the server did not start copying.
pub(super) fn sync_bytes(out: &mut BytesMut) {
    wire::message(out, b'S', &[]);
}

/// Whether `info` is a COPY … FROM STDIN: a COPY that writes and names no server file or
/// program (whose data the client sends).
pub(super) fn copies_from_client(info: &StatementInfo) -> bool {
    info.commands.first().is_some_and(|c| c == "copy")
        && info.classes.contains(StatementClass::Write)
        && !info.modifiers.contains(Modifier::CopyFile)
        && !info.modifiers.contains(Modifier::CopyProgram)
}

/// Where the COPY FROM STDIN of the last forwarded statement that starts one stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyIn {
    /// No COPY FROM STDIN is under way.
    #[default]
    Idle,
    /// The statement went upstream; the server has not yet said whether it copies. `left`
    /// COPY FROM STDIN statements of it may still start; `held` Syncs wait for the answer;
    /// `data`: the client sent CopyData already.
    Starting { left: usize, held: usize, data: bool },
    /// The server copies (CopyInResponse); `left` more COPYs of the statement may follow;
    /// `data`: the client sent CopyData already.
    Copying { left: usize, data: bool },
    /// The server left the COPY (it failed), the client has not sent CopyDone/CopyFail yet.
    Over,
}

/// What to do with a client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// As always.
    Forward,
    /// A Sync held until the server says whether it copies (a Flush goes in its place).
    Hold,
    /// A Sync Postgres would ignore: not sent.
    Drop,
    /// The session ends (FATAL 08P01).
    Refuse,
}

impl CopyIn {
    /// A statement with `copies` COPY FROM STDIN statements in it was forwarded.
    pub(super) fn started(&mut self, copies: usize) {
        if copies > 0 {
            *self = CopyIn::Starting { left: copies, held: 0, data: false };
        }
    }

    /// The route of a client message with this tag.
    pub(super) fn client(&mut self, tag: u8) -> Route {
        use CopyIn::*;
        match (*self, tag) {
            (Idle, _) | (_, b'X') => Route::Forward,
            // A Sync behind CopyData: if a row failed the COPY, the server answers it;
            // otherwise it ignores it — which, depends on when it reads it.
            (Starting { data: true, .. } | Copying { data: true, .. }, b'S') => Route::Refuse,
            (Starting { left, held, data }, b'S') => {
                *self = Starting { left, held: held + 1, data };
                Route::Hold
            }
            (Starting { left, held, .. }, b'd') => {
                *self = Starting { left, held, data: true };
                Route::Forward
            }
            (Copying { left, .. }, b'd') => {
                *self = Copying { left, data: true };
                Route::Forward
            }
            (Starting { .. } | Copying { .. }, b'H') => Route::Forward,
            (Starting { .. }, _) => Route::Refuse,
            (Copying { .. }, b'S') => Route::Drop,
            (Copying { left, .. }, b'c' | b'f') => {
                *self = if left > 0 { Starting { left, held: 0, data: false } } else { Idle };
                Route::Forward
            }
            (Copying { .. }, _) => Route::Refuse,
            (Over, b'c' | b'f') => {
                *self = Idle;
                Route::Forward
            }
            (Over, _) => Route::Forward,
        }
    }

    /// The server sent CopyInResponse: the held Syncs are dropped. False if no COPY FROM
    /// STDIN was expected.
    pub(super) fn server_copies(&mut self) -> bool {
        match *self {
            CopyIn::Starting { left, data, .. } => {
                *self = CopyIn::Copying { left: left.saturating_sub(1), data };
                true
            }
            _ => false,
        }
    }

    /// The statement that started the COPY has been answered in full (or failed): the number
    /// of held Syncs to send now.
    pub(super) fn statement_over(&mut self) -> usize {
        match *self {
            CopyIn::Starting { held, .. } => {
                *self = CopyIn::Idle;
                held
            }
            CopyIn::Copying { .. } => {
                *self = CopyIn::Over;
                0
            }
            CopyIn::Idle | CopyIn::Over => 0,
        }
    }

    /// A COPY statement's answers are still awaited (its end is watched for).
    pub(super) fn watching(self) -> bool {
        matches!(self, CopyIn::Starting { .. } | CopyIn::Copying { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_before_the_answer_are_held_and_statements_refused() {
        let mut c = CopyIn::default();
        assert_eq!(c.client(b'Q'), Route::Forward, "idle");
        c.started(1);
        assert_eq!(c.client(b'S'), Route::Hold);
        assert_eq!(c.client(b'H'), Route::Forward);
        for tag in *b"QPBEDCFcf" {
            assert_eq!(c.client(tag), Route::Refuse, "{}", tag as char);
        }
        assert_eq!(c.client(b'S'), Route::Hold);
        // The COPY failed before it started: both Syncs go now, the session is as before.
        assert_eq!(c.statement_over(), 2);
        assert_eq!(c, CopyIn::Idle);
        assert_eq!(c.client(b'S'), Route::Forward);
    }

    #[test]
    fn syncs_while_copying_are_dropped_until_copy_done() {
        let mut c = CopyIn::default();
        c.started(1);
        assert_eq!(c.client(b'S'), Route::Hold);
        assert!(c.server_copies(), "held Syncs are dropped");
        assert_eq!(c.client(b'S'), Route::Drop);
        assert_eq!(c.client(b'd'), Route::Forward);
        assert_eq!(c.client(b'S'), Route::Refuse, "a Sync behind CopyData: answered or not, by timing");
        assert_eq!(c.client(b'Q'), Route::Refuse);
        assert_eq!(c.client(b'c'), Route::Forward);
        assert_eq!(c, CopyIn::Idle);
        assert_eq!(c.client(b'S'), Route::Forward);
        assert_eq!(c.statement_over(), 0);
        assert!(!c.server_copies(), "no COPY expected");
    }

    #[test]
    fn a_failed_copy_answers_syncs_again_and_a_second_copy_is_expected() {
        let mut c = CopyIn::default();
        c.started(2);
        assert!(c.server_copies());
        assert_eq!(c.client(b'c'), Route::Forward);
        assert_eq!(c, CopyIn::Starting { left: 1, held: 0, data: false }, "the statement's next COPY");
        assert!(c.server_copies());
        assert_eq!(c.statement_over(), 0, "the COPY failed while copying");
        assert_eq!(c.client(b'S'), Route::Forward);
        assert_eq!(c.client(b'Q'), Route::Forward);
        assert_eq!(c.client(b'f'), Route::Forward);
        assert_eq!(c, CopyIn::Idle);
    }
}
