//! Server frames: masked where masking applies, matched to the answers the session waits for
//! (which is how `result` records find their statements), errors of refused statements
//! rewritten into pgward's own, and ParameterStatus reports checked.

use std::time::Instant;

use bytes::BytesMut;

use super::{End, Relay};
use super::tracked::Pending;
use crate::audit::Kind;
use crate::sqlstate;
use crate::wire::{self, Awaited, Frame};

/// The error a skipped Execute's result record carries.
const NOT_EXECUTED: &str = "not executed: an earlier message in the pipeline failed";

impl Relay {
    /// Process complete server frames: bookkeeping, rewriting, and copying to `cout`. Large
    /// messages pgward does not read (a session that masks nothing) go to `cout` in pieces as
    /// they arrive. Err: the session ends (a malformed message, or one too large to hold).
    pub(super) fn on_upstream_data(&mut self, ubuf: &mut BytesMut, cout: &mut BytesMut) -> Result<(), End> {
        let masking = self.mask.is_some();
        let client_engaged = self.client_in.engaged();
        loop {
            self.upstream_in.pass(ubuf, cout, |tag| masking || !wire::passes_unread(tag));
            let f = match self.upstream_in.next(ubuf, client_engaged) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e @ wire::WireError::Malformed(_)) => {
                    tracing::error!(error = %e, "malformed message from the database server");
                    let msg = "pgward: malformed message from the database server";
                    return Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, msg.into()));
                }
                Err(e) => return Err(End::Fatal(e.sqlstate(), format!("pgward: {e}"))),
            };
            let f = match self.mask.as_mut() {
                // None: a DataRow / CopyData rewritten into `cout`. Some: the frame to go on with
                // (an ErrorResponse / NoticeResponse may come back with detected values masked).
                Some(m) => {
                    let tracker = &self.tracker;
                    let statements = |name: &str| tracker.statement(name).and_then(|s| s.mask.clone());
                    match m.on_server_frame(f, tracker.front().map(|p| &p.mask), cout, &statements) {
                        Some(f) => f,
                        None => continue,
                    }
                }
                None => f,
            };
            match f.tag {
                b'1' => self.on_parse_complete()?,
                b'2' => self.answer_exactly(Awaited::Bind)?,
                b'3' => {
                    self.confirm_next_change(Awaited::Close);
                    self.answer_exactly(Awaited::Close)?;
                }
                b't' => self.on_parameter_description(&f),
                b'n' => self.answer_exactly(Awaited::Describe)?,
                // (Also the first answer to a simple Query.)
                b'T' => {
                    self.tracker.answered(Awaited::Describe);
                }
                b'C' | b'I' | b's' => self.on_command_done(&f),
                b'V' => self.on_function_call_response(),
                b'E' => {
                    self.on_error_response(f, cout);
                    continue;
                }
                b'S' => {
                    if !self.on_parameter_status(&f) {
                        ubuf.clear();
                        break;
                    }
                }
                b'Z' => self.on_ready_for_query(&f),
                b'G' if !self.copy_in.server_copies() => {
                    tracing::error!("the server started a COPY FROM STDIN pgward did not expect");
                    let msg = "pgward: the server started a COPY FROM STDIN pgward did not expect";
                    return Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, msg.into()));
                }
                _ => {}
            }
            cout.extend_from_slice(&f.raw);
        }
        Ok(())
    }

    /// ParseComplete, BindComplete, CloseComplete and NoData answer one kind of client message
    /// each. One that does not fit the oldest message awaiting an answer means the pairing of
    /// answers with messages — which result records and masking plans rest on — no longer
    /// holds: the session ends rather than mask or record by a wrong pairing.
    fn answer_exactly(&mut self, kind: Awaited) -> Result<(), End> {
        if self.tracker.answered(kind) {
            return Ok(());
        }
        tracing::error!(answer = ?kind, "the database server's answer does not fit the message awaiting one");
        let msg = "pgward: the database server's answers no longer match the client's messages";
        Err(End::Fatal(sqlstate::PROTOCOL_VIOLATION, msg.into()))
    }

    /// Once the statement that started COPY FROM STDIN is answered in full, the Syncs held for
    /// it go upstream ([`super::copy_in`]). Called with no batch held (nothing of the session's
    /// may go ahead of one).
    pub(super) fn settle_copy_in(&mut self, uout: &mut BytesMut) {
        if !self.copy_in.watching() || self.tracker.pending().any(|p| p.copy_in) {
            return;
        }
        for _ in 0..self.copy_in.statement_over() {
            self.tracker.client_message(b'S');
            super::copy_in::sync_bytes(uout);
            self.tracker.expect([Pending::new(Awaited::Sync)]);
        }
    }

    /// CommandComplete, EmptyQueryResponse, PortalSuspended: the statement's result record.
    fn on_command_done(&mut self, f: &Frame) {
        let (tag, rows) = match f.tag {
            b'C' => match wire::decode_command_complete(f) {
                Ok((t, r)) => (Some(t.into_owned()), r),
                Err(_) => (None, None),
            },
            b'I' => (Some("EMPTY".to_string()), None),
            _ => (Some("SUSPENDED".to_string()), None),
        };
        if tag.as_deref().is_some_and(super::function_catalogs::changes_functions) {
            self.shared.fn_catalogs.reload(&self.shared, &self.database);
        }
        if f.tag == b'C' {
            self.confirm_next_change(Awaited::Query);
            self.confirm_next_change(Awaited::Execute);
        }
        let Some(p) = self.tracker.front() else { return };
        match p.kind {
            Awaited::Execute => {
                self.result_record(p, tag.as_deref(), rows, None);
                self.tracker.pop_front();
            }
            Awaited::Query => {
                // One result per statement of the text: the next one starts now.
                self.result_record(p, tag.as_deref(), rows, None);
                if let Some(p) = self.tracker.front_mut() {
                    p.started = Instant::now();
                }
            }
            _ => {}
        }
    }

    /// ParseComplete: a named statement Parse made exists now, so none SQL `PREPARE` made
    /// under that name does (Postgres refuses a Parse of a name that exists).
    fn on_parse_complete(&mut self) -> Result<(), End> {
        if let Some((name, _)) = self.tracker.front().filter(|p| p.kind == Awaited::Parse).and_then(|p| p.replaced.as_deref()) {
            let name = name.clone();
            self.sql_prepared.parsed(&name);
            if let Some(m) = self.mask.as_mut() {
                m.forget_prepared(Some(&name));
            }
        }
        self.answer_exactly(Awaited::Parse)
    }

    /// The server completed the front entry's next statement, if that entry is of `kind`:
    /// what it does to the SQL-level prepared statements takes effect. A PREPARE or
    /// DEALLOCATE also ends a protocol-level statement the session knew under that name
    /// (Postgres had none when PREPARE succeeded; DEALLOCATE drops either kind), and
    /// masking forgets the lineage of a SQL-level statement that is gone.
    fn confirm_next_change(&mut self, kind: Awaited) {
        use super::sql_prepared::{Changed, SqlPrepared};
        let Some(p) = self.tracker.front_mut().filter(|p| p.kind == kind) else { return };
        let Some(Some(change)) = p.changes.pop_front() else { return };
        let gone = match SqlPrepared::changed(&change) {
            Changed::Prepared(name) => {
                self.tracker.remove_statement(name);
                None
            }
            Changed::Deallocated(name) => {
                self.tracker.remove_statement(name);
                Some(Some(name))
            }
            Changed::Closed(name) => Some(Some(name)),
            Changed::All => Some(None),
        };
        if let (Some(name), Some(m)) = (gone, self.mask.as_mut()) {
            m.forget_prepared(name);
        }
        self.sql_prepared.confirm(change);
    }

    /// ParameterDescription (first answer to a Describe of a statement): the statement's
    /// parameter types, for the audit records of its Binds. A malformed one teaches nothing.
    fn on_parameter_description(&self, f: &Frame) {
        let Some(types) = self.tracker.front().filter(|p| p.kind == Awaited::Describe).and_then(|p| p.described.as_ref()) else {
            return;
        };
        if let Ok(oids) = wire::decode_parameter_description(f) {
            types.describe(oids);
        }
    }

    /// FunctionCallResponse: the call's result record.
    fn on_function_call_response(&self) {
        if let Some(p) = self.tracker.front().filter(|p| p.kind == Awaited::FunctionCall) {
            self.result_record(p, Some("FUNCTION CALL"), None, None);
        }
    }

    /// ErrorResponse: the failed statement's result record (a refused statement's marker
    /// error becomes pgward's own), and in the extended protocol the messages Postgres now
    /// skips up to the Sync. The error (or its rewrite) goes to `cout`.
    fn on_error_response(&mut self, f: Frame, cout: &mut BytesMut) {
        let e = wire::decode_error(&f);
        let mut rewritten = None;
        if let Some((name, before)) = self.tracker.front_mut().and_then(|p| p.replaced.take()).map(|b| *b) {
            match before {
                Some(s) => self.tracker.insert_statement(&name, s),
                None => {
                    self.tracker.remove_statement(&name);
                }
            }
        }
        if let Some(p) = self.tracker.front() {
            if let Some((code, msg)) = &p.refusal {
                rewritten = Some(wire::error_response_bytes("ERROR", code, msg));
                self.result_record(p, None, None, Some((code, msg)));
            } else if matches!(p.kind, Awaited::Execute | Awaited::Query | Awaited::FunctionCall) {
                self.result_record(p, None, None, Some((&e.code, &e.message)));
            }
            if !matches!(p.kind, Awaited::Query | Awaited::FunctionCall | Awaited::Sync) {
                self.tracker.pop_front();
                self.tracker.extended_error();
                self.skip_to_sync();
            }
        }
        match rewritten {
            Some(b) => cout.extend_from_slice(&b),
            None => cout.extend_from_slice(&f.raw),
        }
    }

    /// ParameterStatus: checked against what the session must keep ([`crate::param_watch`]).
    /// False: nothing after this report may reach the client; the relay loop ends the session
    /// before it forwards another statement.
    fn on_parameter_status(&mut self, f: &Frame) -> bool {
        let (name, value) = wire::decode_parameter_status(f);
        match self.watch.check(&name, &value) {
            Ok(()) => true,
            Err(msg) => {
                tracing::error!(%msg, "server reported an unexpected setting; ending the session");
                self.watch_violation = Some(msg);
                false
            }
        }
    }

    /// ReadyForQuery: the transaction status, and the end of what the last sync point owed
    /// (Executes Postgres skipped get their result records).
    fn on_ready_for_query(&mut self, f: &Frame) {
        self.tracker.ready_for_query(f.body().first().copied().unwrap_or(b'I'));
        self.skip_to_sync();
        self.tracker.pop_front();
    }

    /// Drop the entries Postgres skips after an error, up to the next sync point; the
    /// Executes, Queries and FunctionCalls among them get result records saying they did not
    /// run.
    fn skip_to_sync(&mut self) {
        while let Some(q) = self.tracker.pop_before_sync() {
            if matches!(q.kind, Awaited::Execute | Awaited::Query | Awaited::FunctionCall) {
                self.result_record(&q, None, None, Some(("", NOT_EXECUTED)));
            }
        }
    }

    fn result_record(&self, p: &Pending, tag: Option<&str>, rows: Option<u64>, err: Option<(&str, &str)>) {
        let masked = self.mask.as_ref().and_then(|m| m.take_meta());
        if p.seq == 0 {
            return;
        }
        let mut rec = self.record(Kind::Result);
        rec.statement_seq = Some(p.seq);
        rec.tag = tag.map(str::to_string);
        rec.rows = rows;
        rec.duration_us = Some(p.started.elapsed().as_micros() as u64);
        if let Some((code, msg)) = err {
            rec.sqlstate = Some(code.to_string());
            rec.error = Some(crate::audit::param::error_text(msg));
        }
        // Which columns were masked and how many values (never the values).
        if let Some(meta) = masked {
            rec.meta = Some(meta);
        }
        self.shared.audit.append(rec);
    }
}
