//! The protocol state both directions of a session share: prepared statements and portals by
//! name, the answers the server owes (one entry per forwarded message that gets one, in the
//! order they were sent), whether an extended-protocol message still waits for its Sync, and
//! the transaction status of the last ReadyForQuery.
//!
//! The tracker knows the protocol's rules: which server message answers which client message,
//! where Postgres resumes after an error, when the connection is clean. What the session keeps
//! per statement, portal and awaited answer (policy verdicts, audit sequence numbers, masking
//! plans) is its own business: the tracker is generic over it.

use std::collections::{HashMap, VecDeque};

/// What a forwarded client message waits for from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// ParseComplete (or an error).
    Parse,
    /// BindComplete.
    Bind,
    /// RowDescription or NoData (after a ParameterDescription for a statement).
    Describe,
    /// CloseComplete.
    Close,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// One result per statement of the text, then ReadyForQuery.
    Query,
    /// FunctionCallResponse, then ReadyForQuery.
    FunctionCall,
    /// ReadyForQuery.
    Sync,
    /// Nothing: the client ended a COPY FROM STDIN (CopyDone or CopyFail). The entry leaves
    /// the queue as soon as it is the oldest.
    CopyEnd,
}

impl Awaited {
    /// Where Postgres resumes after an error in this message: a Query or FunctionCall is
    /// answered with ReadyForQuery on its own; after an extended-protocol message Postgres
    /// skips everything up to the next Sync (Queries and FunctionCalls included).
    pub fn is_sync_point(self) -> bool {
        matches!(self, Awaited::Sync | Awaited::Query | Awaited::FunctionCall)
    }
}

/// An entry of the queue of awaited answers: what it waits for.
pub trait Await {
    fn awaited(&self) -> Awaited;
}

/// What a kept statement or portal costs in memory beyond its name (its texts and values).
pub trait Retained {
    fn retained_bytes(&self) -> usize;
}

/// Prepared statements (`S`), portals (`P`) and awaited answers (`A`) of one connection.
#[derive(Debug)]
pub struct Tracker<S, P, A> {
    statements: HashMap<String, S>,
    portals: HashMap<String, P>,
    pending: VecDeque<A>,
    tx_status: u8,
    unsynced: bool,
    /// An extended-protocol message failed: Postgres ignores every message up to the next
    /// Sync, whose ReadyForQuery ends this.
    skipping: bool,
    /// Bytes the statements and portals keep ([`Retained`] plus their names).
    retained: usize,
    /// The client sent CopyData and no CopyDone or CopyFail since.
    copy_data: bool,
}

impl<S: Retained, P: Retained, A: Await> Tracker<S, P, A> {
    /// A connection whose last ReadyForQuery said `tx_status`, with nothing outstanding.
    pub fn new(tx_status: u8) -> Self {
        Tracker {
            statements: HashMap::new(),
            portals: HashMap::new(),
            pending: VecDeque::new(),
            tx_status,
            unsynced: false,
            skipping: false,
            retained: 0,
            copy_data: false,
        }
    }

    /// Bytes the prepared statements and portals keep.
    pub fn retained(&self) -> usize {
        self.retained
    }

    /// A client message of this tag is forwarded: extended-protocol messages open a run that
    /// only a Sync closes (the server may be inside an implicit transaction or a COPY until then).
    pub fn client_message(&mut self, tag: u8) {
        match tag {
            b'P' | b'B' | b'E' | b'D' | b'C' => self.unsynced = true,
            b'S' => self.unsynced = false,
            b'd' => self.copy_data = true,
            b'c' | b'f' => self.copy_data = false,
            _ => {}
        }
    }

    /// A Sync sent now would follow CopyData the client has not ended: whether Postgres
    /// ignores it (read in copy-in mode) or answers it (read after a bad row ended the COPY
    /// with an error) depends on when the server reads it, so no one can tell which answers
    /// follow. No client library sends one; the session refuses it.
    pub fn sync_inside_copy_data(&self) -> bool {
        self.copy_data
    }

    pub fn statement(&self, name: &str) -> Option<&S> {
        self.statements.get(name)
    }

    pub fn insert_statement(&mut self, name: &str, s: S) {
        self.retained += name.len() + s.retained_bytes();
        if let Some(old) = self.statements.insert(name.to_string(), s) {
            self.retained -= name.len() + old.retained_bytes();
        }
    }

    pub fn remove_statement(&mut self, name: &str) -> Option<S> {
        let old = self.statements.remove(name)?;
        self.retained -= name.len() + old.retained_bytes();
        Some(old)
    }

    /// `DEALLOCATE ALL`: every named statement is gone (the unnamed one stays).
    pub fn remove_named_statements(&mut self) {
        let named: Vec<String> = self.statements.keys().filter(|n| !n.is_empty()).cloned().collect();
        for n in named {
            self.remove_statement(&n);
        }
    }

    pub fn portal(&self, name: &str) -> Option<&P> {
        self.portals.get(name)
    }

    pub fn insert_portal(&mut self, name: &str, p: P) {
        self.retained += name.len() + p.retained_bytes();
        if let Some(old) = self.portals.insert(name.to_string(), p) {
            self.retained -= name.len() + old.retained_bytes();
        }
    }

    pub fn remove_portal(&mut self, name: &str) -> Option<P> {
        let old = self.portals.remove(name)?;
        self.retained -= name.len() + old.retained_bytes();
        Some(old)
    }

    /// Close (`kind` 'S' for a statement, 'P' for a portal): the name is gone.
    pub fn close(&mut self, kind: u8, name: &str) {
        if kind == b'S' {
            self.remove_statement(name);
        } else {
            self.remove_portal(name);
        }
    }

    /// Answers the server owes, oldest first, for messages now forwarded.
    pub fn expect(&mut self, answers: impl IntoIterator<Item = A>) {
        self.pending.extend(answers);
        self.drop_copy_ends();
    }

    /// CopyEnd entries await nothing: gone once they are the oldest.
    fn drop_copy_ends(&mut self) {
        while self.pending.front().is_some_and(|a| a.awaited() == Awaited::CopyEnd) {
            self.pending.pop_front();
        }
    }

    /// The answers still owed, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &A> {
        self.pending.iter()
    }

    /// The oldest answer still owed.
    pub fn front(&self) -> Option<&A> {
        self.pending.front()
    }

    pub fn front_mut(&mut self) -> Option<&mut A> {
        self.pending.front_mut()
    }

    /// The oldest answer is in; a Sync's ends the skipping after an error.
    pub fn pop_front(&mut self) -> Option<A> {
        let a = self.pending.pop_front();
        if a.as_ref().is_some_and(|a| a.awaited() == Awaited::Sync) {
            self.skipping = false;
        }
        self.drop_copy_ends();
        a
    }

    /// The server answered a message of this kind: the oldest entry goes if it is one. False
    /// when it is not (the answer does not fit the oldest message awaiting one).
    pub fn answered(&mut self, kind: Awaited) -> bool {
        let fits = self.pending.front().is_some_and(|p| p.awaited() == kind);
        if fits {
            self.pending.pop_front();
            self.drop_copy_ends();
        }
        fits
    }

    /// An extended-protocol message failed: from here to the next Sync Postgres answers
    /// nothing ([`Self::pop_before_sync`]).
    pub fn extended_error(&mut self) {
        self.skipping = true;
    }

    /// The oldest entry if Postgres skips it without an answer: after an extended-protocol
    /// error every entry before the next Sync (a Query or FunctionCall too), else every entry
    /// before the next sync point.
    pub fn pop_before_sync(&mut self) -> Option<A> {
        let skipped = |a: Awaited| if self.skipping { a != Awaited::Sync } else { !a.is_sync_point() };
        let a = if self.pending.front().is_some_and(|p| skipped(p.awaited())) { self.pending.pop_front() } else { None };
        self.drop_copy_ends();
        a
    }

    /// ReadyForQuery with this transaction status ('I' idle, 'T' in a block, 'E' failed).
    /// Idle: the transaction ended, and Postgres dropped its portals with it.
    pub fn ready_for_query(&mut self, status: u8) {
        self.tx_status = status;
        if status == b'I' && !self.portals.is_empty() {
            let gone: usize = self.portals.iter().map(|(n, p)| n.len() + p.retained_bytes()).sum();
            self.retained -= gone;
            self.portals.clear();
        }
    }

    pub fn tx_status(&self) -> u8 {
        self.tx_status
    }

    /// Nothing outstanding upstream: no answer owed, no extended-protocol message waiting for
    /// its Sync, and idle (not in a transaction block or a failed one).
    pub fn is_clean(&self) -> bool {
        self.pending.is_empty() && !self.unsynced && self.tx_status == b'I'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Await for Awaited {
        fn awaited(&self) -> Awaited {
            *self
        }
    }

    impl Retained for () {
        fn retained_bytes(&self) -> usize {
            0
        }
    }

    /// A test value that keeps as many bytes as it says.
    impl Retained for u8 {
        fn retained_bytes(&self) -> usize {
            usize::from(*self)
        }
    }

    #[test]
    fn an_error_skips_to_the_sync_point_and_ready_for_query_leaves_it_clean() {
        let mut t: Tracker<(), (), Awaited> = Tracker::new(b'I');
        for tag in [b'P', b'B', b'E', b'S'] {
            t.client_message(tag);
        }
        t.expect([Awaited::Parse, Awaited::Bind, Awaited::Execute, Awaited::Sync]);
        assert!(!t.is_clean());
        assert!(!t.answered(Awaited::Bind), "a BindComplete does not answer a Parse");
        assert_eq!(t.front().copied(), Some(Awaited::Parse), "only the oldest entry is answered");
        assert!(t.answered(Awaited::Parse));
        let skipped: Vec<_> = std::iter::from_fn(|| t.pop_before_sync()).collect();
        assert_eq!(skipped, [Awaited::Bind, Awaited::Execute]);
        assert_eq!(t.pop_before_sync(), None, "the Sync stays");
        t.ready_for_query(b'T');
        assert_eq!(t.pop_front(), Some(Awaited::Sync));
        assert!(!t.is_clean(), "inside a transaction block");
        t.ready_for_query(b'I');
        assert!(t.is_clean());
        t.client_message(b'B');
        assert!(!t.is_clean(), "a Bind without its Sync");
    }

    /// Syncs behind CopyData the client has not ended are refused; a COPY that fails before
    /// copy-in mode answers every Sync.
    #[test]
    fn copy_data_and_copy_ends() {
        use Awaited::*;
        // CopyData the client has not ended: a Sync now is refused.
        let mut t: Tracker<(), (), Awaited> = Tracker::new(b'I');
        t.client_message(b'd');
        assert!(t.sync_inside_copy_data());
        t.client_message(b'H');
        assert!(t.sync_inside_copy_data());
        t.client_message(b'c');
        assert!(!t.sync_inside_copy_data());
        t.client_message(b'd');
        t.client_message(b'f');
        assert!(!t.sync_inside_copy_data());

        // A COPY that fails before copy-in mode (no CopyInResponse): every Sync is answered.
        let mut t: Tracker<(), (), Awaited> = Tracker::new(b'I');
        t.expect([Execute, Sync, CopyEnd, Sync]);
        t.pop_front();
        t.extended_error();
        assert_eq!(std::iter::from_fn(|| t.pop_before_sync()).count(), 0);
        assert_eq!(t.pop_front(), Some(Sync));
        assert_eq!(t.pop_front(), Some(Sync), "the CopyEnd went with the first");
        assert!(t.front().is_none());
    }

    #[test]
    fn an_extended_error_skips_queries_and_function_calls_up_to_the_sync() {
        let mut t: Tracker<(), (), Awaited> = Tracker::new(b'I');
        t.expect([Awaited::Execute, Awaited::Query, Awaited::FunctionCall, Awaited::Sync, Awaited::Query]);
        t.pop_front();
        t.extended_error();
        let skipped: Vec<_> = std::iter::from_fn(|| t.pop_before_sync()).collect();
        assert_eq!(skipped, [Awaited::Query, Awaited::FunctionCall]);
        t.ready_for_query(b'I');
        assert_eq!(t.pop_front(), Some(Awaited::Sync));
        assert_eq!(t.pop_before_sync(), None, "after the Sync a Query is answered again");
        assert_eq!(t.front().copied(), Some(Awaited::Query));
    }

    #[test]
    fn close_forgets_the_statement_or_the_portal() {
        let mut t: Tracker<u8, u8, Awaited> = Tracker::new(b'I');
        t.insert_statement("s", 1);
        t.insert_portal("s", 2);
        t.close(b'P', "s");
        assert_eq!((t.statement("s"), t.portal("s")), (Some(&1), None));
        t.close(b'S', "s");
        assert_eq!(t.statement("s"), None);
    }

    #[test]
    fn retained_bytes_follow_inserts_replacements_and_closes() {
        let mut t: Tracker<u8, u8, Awaited> = Tracker::new(b'I');
        t.insert_statement("ab", 10);
        t.insert_portal("", 5);
        assert_eq!(t.retained(), 2 + 10 + 5);
        t.insert_statement("ab", 3);
        assert_eq!(t.retained(), 2 + 3 + 5, "a replaced statement no longer counts");
        t.close(b'P', "");
        t.close(b'P', "missing");
        assert_eq!(t.retained(), 5);
        assert_eq!(t.remove_statement("ab"), Some(3));
        assert_eq!(t.retained(), 0);
        // Portals end with their transaction, statements stay.
        t.insert_statement("s", 4);
        t.insert_portal("p", 6);
        t.ready_for_query(b'T');
        assert_eq!((t.retained(), t.portal("p")), (1 + 4 + 1 + 6, Some(&6)));
        t.ready_for_query(b'I');
        assert_eq!((t.retained(), t.portal("p"), t.statement("s")), (1 + 4, None, Some(&4)));
    }
}
