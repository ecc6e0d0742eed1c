//! The statements SQL `PREPARE` named in the server's session, as the server confirmed them:
//! what `EXECUTE name` (and a Bind of that name) runs, for the policy to decide it on.
//!
//! A PREPARE, DEALLOCATE or protocol-level Close changes the server's names only if the server
//! runs it: one that follows a failed statement of its query string, one in an aborted
//! transaction, a PREPARE of a name that exists, a Parse of `DEALLOCATE p` never executed, a
//! Close skipped after a pipeline error — all leave the name as it was. So a change is taken
//! only when the server's answer confirms it ([`SqlPrepared::confirm`]). While one is on its
//! way ([`Change`], held by the answer the session waits for) the name may end up as it was or
//! as any PREPARE on the way makes it ([`Lookup::InFlight`]): an `EXECUTE` sent meanwhile (a
//! client pipelining PREPARE and EXECUTE) is allowed only if every one of them is.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// What an allowed statement does to the session's SQL-level prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PreparedNote {
    /// Name (as Postgres folds it) and the PREPARE statement's text.
    Prepare(String, Arc<str>),
    Deallocate(String),
    DeallocateAll,
}

impl PreparedNote {
    pub(super) fn of(info: &crate::policy::StatementInfo) -> Option<PreparedNote> {
        use crate::policy::PreparedOp;
        match info.prepared.as_ref()? {
            PreparedOp::Prepare(name) => Some(PreparedNote::Prepare(name.clone(), Arc::from(info.text.as_str()))),
            PreparedOp::Deallocate(name) => Some(PreparedNote::Deallocate(name.clone())),
            PreparedOp::DeallocateAll => Some(PreparedNote::DeallocateAll),
        }
    }
}

/// A change forwarded and not answered yet. While it exists its name (or, for DEALLOCATE
/// ALL, every name) is unknown; dropping it without [`SqlPrepared::confirm`] (the server
/// failed or skipped the statement) leaves the name as it was.
#[derive(Debug)]
pub(super) struct Change {
    op: Op,
    _in_flight: Guard,
}

/// Held by a [`Change`] while it is on its way: the text a PREPARE gives its name (None for a
/// DEALLOCATE or Close).
type Guard = Arc<Option<Arc<str>>>;

#[derive(Debug)]
enum Op {
    Note(PreparedNote),
    /// A protocol-level Close of a statement of this name.
    Close(String),
}

/// What a confirmed [`Change`] did to a name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Changed<'a> {
    /// SQL `PREPARE` made a statement of this name.
    Prepared(&'a str),
    /// DEALLOCATE dropped the statement of this name, whichever made it.
    Deallocated(&'a str),
    /// A protocol-level Close dropped it.
    Closed(&'a str),
    /// DEALLOCATE ALL dropped every statement.
    All,
}

/// What the session knows of a name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    /// SQL `PREPARE` made it with this text (the PREPARE statement's).
    Known(Arc<str>),
    /// It may exist with a text pgward cannot tell (a DEALLOCATE ALL is on its way): decide as
    /// an unknown statement.
    Unknown,
    /// No SQL `PREPARE` made it (a protocol-level Parse may have).
    NotPrepared,
    /// Changes are on their way: the name will hold one of the PREPAREs' texts, or stay as it
    /// is — `base`, the confirmed text (None: no SQL `PREPARE` made it), or gone.
    InFlight { prepares: Vec<Arc<str>>, base: Option<Arc<str>> },
}

/// The session's SQL-level prepared statements.
#[derive(Debug, Default)]
pub(super) struct SqlPrepared {
    /// Confirmed names and their PREPARE statements' texts.
    names: HashMap<String, Arc<str>>,
    /// Bytes `names` keeps, for `server.max_session_state_bytes`.
    bytes: usize,
    /// Per name, the changes on their way (those whose [`Change`] still exists).
    in_flight: HashMap<String, Vec<Weak<Option<Arc<str>>>>>,
    /// DEALLOCATE ALLs on their way (strong count above one): they change every name.
    all_in_flight: Guard,
}

/// Entries of `in_flight` beyond which finished ones are dropped.
const IN_FLIGHT_PRUNE: usize = 64;

impl SqlPrepared {
    pub(super) fn lookup(&self, name: &str) -> Lookup {
        if Arc::strong_count(&self.all_in_flight) > 1 {
            return Lookup::Unknown;
        }
        let live: Vec<Guard> = self.in_flight.get(name).map_or_else(Vec::new, |v| v.iter().filter_map(Weak::upgrade).collect());
        match self.names.get(name) {
            _ if !live.is_empty() => Lookup::InFlight {
                prepares: live.iter().filter_map(|g| g.as_ref().clone()).collect(),
                base: self.names.get(name).cloned(),
            },
            Some(t) => Lookup::Known(t.clone()),
            None => Lookup::NotPrepared,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// A PREPARE or DEALLOCATE is forwarded: its name is unknown until [`Self::confirm`].
    pub(super) fn begin(&mut self, note: PreparedNote) -> Change {
        let guard = match &note {
            PreparedNote::Prepare(n, text) => self.guard(n, Some(text.clone())),
            PreparedNote::Deallocate(n) => self.guard(n, None),
            PreparedNote::DeallocateAll => self.all_in_flight.clone(),
        };
        Change { op: Op::Note(note), _in_flight: guard }
    }

    /// A protocol-level Close of statement `name` is forwarded.
    pub(super) fn begin_close(&mut self, name: &str) -> Change {
        Change { op: Op::Close(name.to_string()), _in_flight: self.guard(name, None) }
    }

    fn guard(&mut self, name: &str, text: Option<Arc<str>>) -> Guard {
        if self.in_flight.len() > IN_FLIGHT_PRUNE {
            self.in_flight.retain(|_, v| v.iter().any(|w| w.strong_count() > 0));
        }
        let guard = Arc::new(text);
        let changes = self.in_flight.entry(name.to_string()).or_default();
        changes.retain(|w| w.strong_count() > 0);
        changes.push(Arc::downgrade(&guard));
        guard
    }

    /// The server completed the statement of `change`. (A protocol-level statement the
    /// session knows under its name is gone or stale either way — Postgres had none of that
    /// name when a PREPARE succeeded — and is the caller's to drop: [`Self::changed_name`].)
    pub(super) fn confirm(&mut self, change: Change) {
        match change.op {
            Op::Note(PreparedNote::Prepare(name, text)) => {
                self.remove(&name);
                self.bytes += name.len() + text.len();
                self.names.insert(name, text);
            }
            Op::Note(PreparedNote::Deallocate(name)) | Op::Close(name) => self.remove(&name),
            Op::Note(PreparedNote::DeallocateAll) => {
                self.names.clear();
                self.bytes = 0;
            }
        }
    }

    /// A protocol-level Parse of `name` succeeded: Postgres had no statement of that name, so
    /// none SQL `PREPARE` made.
    pub(super) fn parsed(&mut self, name: &str) {
        self.remove(name);
    }

    fn remove(&mut self, name: &str) {
        if let Some(t) = self.names.remove(name) {
            self.bytes -= name.len() + t.len();
        }
    }

    /// What the change does to the server's names once confirmed.
    pub(super) fn changed(change: &Change) -> Changed<'_> {
        match &change.op {
            Op::Note(PreparedNote::Prepare(n, _)) => Changed::Prepared(n),
            Op::Note(PreparedNote::Deallocate(n)) => Changed::Deallocated(n),
            Op::Close(n) => Changed::Closed(n),
            Op::Note(PreparedNote::DeallocateAll) => Changed::All,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(name: &str, text: &str) -> PreparedNote {
        PreparedNote::Prepare(name.into(), Arc::from(text))
    }

    #[test]
    fn only_confirmed_changes_count_and_names_are_unknown_meanwhile() {
        let mut s = SqlPrepared::default();
        let c = s.begin(prepare("p", "PREPARE p AS DELETE FROM t"));
        assert_eq!(s.lookup("p"), Lookup::InFlight { prepares: vec![Arc::from("PREPARE p AS DELETE FROM t")], base: None });
        s.confirm(c);
        assert_eq!(s.lookup("p"), Lookup::Known(Arc::from("PREPARE p AS DELETE FROM t")));
        // While a PREPARE of the name is on its way: either text.
        let c = s.begin(prepare("p", "PREPARE p AS SELECT 1"));
        let both = vec![Arc::from("PREPARE p AS SELECT 1")];
        assert_eq!(s.lookup("p"), Lookup::InFlight { prepares: both, base: Some(Arc::from("PREPARE p AS DELETE FROM t")) });
        drop(c);
        // A DEALLOCATE the server skipped, a PREPARE it refused: p stays.
        drop(s.begin(PreparedNote::Deallocate("p".into())));
        drop(s.begin(prepare("p", "PREPARE p AS SELECT 1")));
        assert_eq!(s.lookup("p"), Lookup::Known(Arc::from("PREPARE p AS DELETE FROM t")));
        // DEALLOCATE ALL on its way: every name is unknown.
        let all = s.begin(PreparedNote::DeallocateAll);
        assert_eq!(s.lookup("p"), Lookup::Unknown);
        assert_eq!(s.lookup("q"), Lookup::Unknown);
        s.confirm(all);
        assert_eq!(s.lookup("p"), Lookup::NotPrepared);
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn a_close_or_a_parse_of_the_name_removes_it() {
        let mut s = SqlPrepared::default();
        let c = s.begin(prepare("p", "PREPARE p AS SELECT 1"));
        s.confirm(c);
        let close = s.begin_close("p");
        assert_eq!(s.lookup("p"), Lookup::InFlight { prepares: vec![], base: Some(Arc::from("PREPARE p AS SELECT 1")) });
        s.confirm(close);
        assert_eq!(s.lookup("p"), Lookup::NotPrepared);
        let c = s.begin(prepare("p", "PREPARE p AS SELECT 1"));
        s.confirm(c);
        s.parsed("p");
        assert_eq!(s.lookup("p"), Lookup::NotPrepared);
        assert_eq!(s.bytes(), 0);
    }
}
