//! Client frames: each message read from the client is decided on (token re-check, policy),
//! given its statement record and its entry among the answers the server owes, and put into
//! the batch that goes upstream once its records are durable.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::copy_in::{Route, copies_from_client};
use super::durability::{self, Effect, Rule};
use super::held::Batch;
use super::sql_prepared::{Change, Lookup, PreparedNote};
use super::tracked::{Pending, Portal, Prepared, Statement};
use super::{End, Relay, now_unix};
use crate::audit::{Kind, Param, Record};
use crate::mask::relay::{MaskRelay, Tag};
use crate::mask::strict::Violation;
use crate::policy::Verdict;
use crate::sqlstate;
use crate::wire::{self, Awaited, Frame, ParamTypes, WireError};

/// Query and Parse texts at least this long that the policy has not analyzed yet are parsed
/// on tokio's blocking pool, not on the event loop: parsing costs in the order of a
/// microsecond per byte (a long multi-row INSERT would stall every other session on its
/// loop), while handing a text over costs two thread wakeups, too much for short texts.
const ANALYZE_AHEAD_BYTES: usize = 8 * 1024;

/// A complete Query or Parse frame (tag, whole message) whose body is [`ANALYZE_AHEAD_BYTES`]
/// or more: its text is worth analyzing off the loop ([`Relay::analyze_ahead`]).
pub(super) fn is_long_text(tag: u8, raw: &[u8]) -> bool {
    raw.len() >= 5 + ANALYZE_AHEAD_BYTES && matches!(tag, b'Q' | b'P')
}

/// How many statements of an allowed verdict are COPY … FROM STDIN.
fn copies_in(v: &Verdict) -> usize {
    v.statements.iter().filter(|s| copies_from_client(&s.info)).count()
}

/// A malformed client message ends the session.
fn bad(e: WireError) -> End {
    End::Fatal(e.sqlstate(), format!("pgward: {e}"))
}


impl Relay {
    /// Split the client's buffered bytes into frames and decide what to do with each, submit
    /// their records, and put into `uout` what may go upstream at once. Returns the rest, if
    /// any: the batch from its first write-ahead frame on, held until every record of the
    /// session is durable.
    pub(super) fn on_client_data(&mut self, cbuf: &mut BytesMut, uout: &mut BytesMut, client_open: bool) -> Result<Option<Batch>, End> {
        let mut batch = Batch::default();
        let split = self.split_client_frames(cbuf, &mut batch);
        batch.close_binds();
        if let Err(e) = split {
            // What was read before the bad frame is still audited (it never runs).
            self.submit_records(&mut batch, false, false);
            return Err(e);
        }
        // The writer may send the frames itself only if they are all held, and would go out
        // first, after everything of the session's is durable.
        let writer_sends = batch.gate == Some((0, 0)) && uout.is_empty() && self.inflight.is_empty();
        if !self.submit_records(&mut batch, writer_sends, client_open) {
            self.release_batch(batch, Err("a statement record was refused".into()), uout);
            return Ok(None);
        }
        let (frames_now, pendings_now) = batch.gate.unwrap_or((batch.frames.len(), batch.pendings.len()));
        for (f, _) in batch.frames.drain(..frames_now) {
            uout.extend_from_slice(&f.raw);
        }
        let now = std::time::Instant::now();
        let mut pendings: Vec<Pending> = batch.pendings.drain(..pendings_now).collect();
        let mut forwarded = 0;
        for p in pendings.iter_mut() {
            forwarded = forwarded.max(p.seq);
            p.started = now;
        }
        self.tracker.expect(pendings);
        self.inflight.forwarded(forwarded);
        // The held frames' pending indices now count from the first held pending.
        for (_, i) in batch.frames.iter_mut() {
            if let Some(i) = i {
                *i -= pendings_now;
            }
        }
        Ok(batch.gate.map(|_| batch))
    }

    /// The durability rule for a statement of this effect ([`durability`]), and the
    /// session's projected transaction state after it. Everything is write-ahead when
    /// configured so, or while the audit log refuses records (statements are then refused
    /// before they reach Postgres, and the session stays usable).
    fn durability_rule(&mut self, effect: Effect, execute: bool) -> Rule {
        let effect = if self.write_ahead_only() { Effect::Other } else { effect };
        if execute { self.tx.execute(effect) } else { self.tx.query(effect) }
    }

    fn write_ahead_only(&self) -> bool {
        self.shared.cfg.audit.durability == crate::config::Durability::WriteAhead || !self.shared.audit.healthy()
    }

    /// What the statements of an allowed verdict can do ([`durability::Effect`]).
    fn effect_of(&self, v: &Verdict) -> Effect {
        if !v.is_allowed() {
            // Replaced by a marker that fails: nothing runs.
            return Effect::Read;
        }
        // The catalog is looked up only for statements that call functions.
        let calls = v.statements.iter().any(|s| !s.info.functions.is_empty());
        let cat = if calls { self.shared.policy.function_catalog(&self.database) } else { None };
        durability::combined(v.statements.iter().map(|s| durability::statement_effect(&s.info, cat.as_deref())))
    }

    /// Whether planning the statements of an allowed verdict may run user code
    /// ([`durability::plans_user_code`]).
    fn plans_user_code_of(&self, v: &Verdict) -> bool {
        if v.unparsable {
            return true;
        }
        let calls = v.statements.iter().any(|s| !s.info.functions.is_empty());
        let cat = if calls { self.shared.policy.function_catalog(&self.database) } else { None };
        v.statements.iter().any(|s| durability::plans_user_code(&s.info, cat.as_deref()))
    }

    fn split_client_frames(&mut self, cbuf: &mut BytesMut, batch: &mut Batch) -> Result<(), End> {
        let upstream_engaged = self.upstream_in.engaged();
        loop {
            let f = match self.client_in.next(cbuf, upstream_engaged) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(bad(e)),
            };
            self.on_client_frame(f, batch)?;
            if self.terminated {
                break;
            }
        }
        Ok(())
    }

    fn on_client_frame(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        match self.copy_in.client(f.tag) {
            Route::Forward => {}
            Route::Hold => {
                self.check_token()?;
                batch.frames.push((super::copy_in::flush_frame(), None));
                return Ok(());
            }
            Route::Drop => return self.check_token(),
            Route::Refuse => {
                return Err(End::Fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("pgward: unexpected message type {:?} during COPY from stdin", f.tag as char),
                ));
            }
        }
        self.tracker.client_message(f.tag);
        match f.tag {
            b'Q' => self.on_query(f, batch),
            b'P' => self.on_parse(f, batch),
            b'B' => self.on_bind(f, batch),
            b'E' => self.on_execute(f, batch),
            b'D' => self.on_describe(f, batch),
            b'C' => self.on_close(f, batch),
            b'S' if self.tracker.sync_inside_copy_data() => Err(End::Fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "pgward: Sync inside COPY data (before CopyDone or CopyFail)".into(),
            )),
            b'S' => {
                // A Sync commits the implicit transaction of the Executes before it.
                self.check_token()?;
                if self.tx.sync_waits() {
                    batch.gate_here();
                }
                batch.forward(f, Pending::new(Awaited::Sync));
                Ok(())
            }
            b'd' => {
                // COPY FROM STDIN data writes rows: a COPY started before the token expired
                // or was revoked must not go on writing.
                self.check_token()?;
                batch.frames.push((f, None));
                Ok(())
            }
            b'c' | b'f' => {
                // CopyDone completes the rows (the token is checked as for data).
                if f.tag == b'c' {
                    self.check_token()?;
                }
                batch.forward(f, Pending::new(Awaited::CopyEnd));
                Ok(())
            }
            b'H' => {
                batch.frames.push((f, None));
                Ok(())
            }
            b'F' => self.on_function_call(f, batch),
            b'X' => {
                self.on_terminate(f, batch);
                Ok(())
            }
            other => Err(End::Fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgward: invalid frontend message type {:?}", other as char),
            )),
        }
    }

    /// `Q`: decided by the policy on its text; a denied text is replaced by a failing marker.
    fn on_query(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        self.check_token()?;
        let sql = match wire::decode_query(&f, self.watch.encoding()) {
            Err(WireError::Encoding(at)) => {
                self.refuse_undecodable(&f, at, batch);
                return Ok(());
            }
            r => r.map_err(bad)?,
        };
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some("simple".into());
        let (tag, strict) = self.mask.as_mut().map_or((Tag::None, None), |m| m.query(&sql));
        let verdict = self.strict_masking(self.decide(&sql), strict);
        let mut p = Pending::with_mask(Awaited::Query, tag);
        rec.sql = Some(sql.to_string());
        let allowed = Self::apply_verdict(&mut rec, &mut p, &verdict);
        if allowed {
            p.changes = self.begin_changes(verdict.statements.iter().map(|s| PreparedNote::of(&s.info)));
            self.check_retained()?;
        }
        let rule = if allowed { self.durability_rule(self.effect_of(&verdict), false) } else { Rule::HoldReply };
        if allowed {
            p.copy_in = copies_in(&verdict) > 0;
            self.copy_in.started(copies_in(&verdict));
        }
        let frame = if allowed { f } else { self.marker_query() };
        batch.push_statement(frame, rec, p, rule);
        Ok(())
    }

    /// `P`: decided by the policy on its text. An allowed statement is remembered for the
    /// Binds and Executes that use it; a denied one is audited now (it will never execute),
    /// and the Parse is replaced by one that fails upstream so Postgres skips to Sync itself.
    fn on_parse(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        self.check_token()?;
        let wire::Parse { name, sql, param_types } = match wire::decode_parse_typed(&f, self.watch.encoding()) {
            Err(WireError::Encoding(at)) => {
                self.refuse_undecodable(&f, at, batch);
                return Ok(());
            }
            r => r.map_err(bad)?,
        };
        if !name.is_empty() && self.prepared_exists(&name) {
            self.refuse_existing_name(&name, &sql, batch);
            return Ok(());
        }
        let (mask, strict) = self.mask.as_mut().map(|m| m.parse(&sql)).unzip();
        // Taken before deciding: a window or catalog that changes meanwhile makes the first
        // Execute decide again, never the other way round.
        let stamp = self.shared.policy.decision_stamp(&self.database, chrono::Utc::now());
        let verdict = self.strict_masking(self.decide(&sql), strict.flatten());
        if verdict.is_allowed() {
            let runs_by_name = verdict.statements.iter().any(|s| s.info.execute.is_some());
            let prepared = Prepared {
                sql: Arc::from(sql.as_ref()),
                rule: Arc::from(verdict.rule.as_str()),
                unparsable: verdict.unparsable,
                effect: self.effect_of(&verdict),
                plans_user_code: self.plans_user_code_of(&verdict),
                types: Arc::new(ParamTypes::declared(param_types)),
                stamp: (!runs_by_name).then_some(stamp),
                copies_in: copies_in(&verdict) > 0,
                // Taken when an Execute of it completes.
                note: verdict.statements.first().and_then(|s| PreparedNote::of(&s.info)),
            };
            let mut p = Pending::new(Awaited::Parse);
            if name.is_empty() {
                // A failed Parse leaves no unnamed statement behind.
                self.tracker.insert_statement(&name, Statement { allowed: Some(prepared), mask });
            } else {
                // A named statement survives a Parse of its name that fails: put it back on the
                // error.
                let before = self.tracker.remove_statement(&name);
                self.tracker.insert_statement(&name, Statement { allowed: Some(prepared), mask });
                p.replaced = Some(Box::new((name.to_string(), before)));
            }
            self.check_retained()?;
            batch.forward(f, p);
        } else {
            let mut rec = self.record(Kind::Statement);
            rec.protocol = Some("extended".into());
            rec.sql = Some(sql.to_string());
            let mut p = Pending::new(Awaited::Parse);
            Self::apply_verdict(&mut rec, &mut p, &verdict);
            let marker = self.marker_parse(&name);
            // The marker fails upstream: a named statement of this name stays as it was.
            if name.is_empty() || self.tracker.statement(&name).is_none() {
                self.refused_statement(&name, mask);
            }
            batch.push_statement(marker, rec, p, Rule::HoldReply);
        }
        Ok(())
    }

    /// The last Parse of `name` was refused: the policy's record of it goes, what masking
    /// made of it (if masking is on) stays.
    fn refused_statement(&mut self, name: &str, mask: Option<Arc<crate::mask::relay::PreparedInfo>>) {
        match mask {
            Some(mask) => self.tracker.insert_statement(name, Statement { allowed: None, mask: Some(mask) }),
            None => {
                self.tracker.remove_statement(name);
            }
        }
    }

    /// `B`: the portal remembers its statement and parameters, for the Execute's record.
    fn on_bind(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        let b = wire::decode_bind(&f).map_err(bad)?;
        let by_sql = self.sql_prepared.lookup(&b.statement) != Lookup::NotPrepared;
        let (stmt, stmt_mask) = match self.tracker.statement(&b.statement) {
            Some(s) if !by_sql => (s.allowed.clone().unwrap_or_else(|| Prepared::unknown(&b.statement)), s.mask.as_ref()),
            _ => (self.sql_prepared_statement(&b.statement), None),
        };
        let mask = match (&self.mask, b.result_formats) {
            (None, _) => None,
            (Some(_), Some(formats)) => Some(MaskRelay::bind(stmt_mask, formats.to_vec())),
            // Masking learns nothing from a Bind without result formats (Postgres refuses it).
            (Some(_), None) => self.tracker.portal(&b.portal).and_then(|p| p.mask.clone()),
        };
        let params: Vec<Option<Param>> =
            b.params.iter().enumerate().map(|(i, (fmt, v))| Param::of(*fmt, *v, stmt.types.get(i))).collect();
        // Planning may run functions the statement's text does not show (in a view, a column
        // default): while every statement is write-ahead, so is every Bind.
        let plans = stmt.plans_user_code || self.write_ahead_only();
        let planned = plans.then(|| self.bind_record(&stmt, &params));
        let verdict = if planned.is_some() { self.redecide(&stmt) } else { None };
        let portal = b.portal.to_string();
        self.tracker.insert_portal(&portal, Portal { stmt, params, mask });
        self.check_retained()?;
        match planned {
            None => batch.forward(f, Pending::new(Awaited::Bind)),
            Some(mut rec) => {
                let mut p = Pending::new(Awaited::Bind);
                match verdict {
                    Some(v) if !Self::apply_verdict(&mut rec, &mut p, &v) => {
                        batch.push_statement(self.marker_bind(), rec, p, Rule::HoldReply)
                    }
                    _ => batch.push_bind(f, portal, rec),
                }
            }
        }
        Ok(())
    }

    /// The statement record a Bind of `stmt` gets when no Execute of its portal follows
    /// ([`Batch::push_bind`]): the statement and its parameters, `meta.stage` "bind".
    fn bind_record(&self, stmt: &Prepared, params: &[Option<Param>]) -> Record {
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some("extended".into());
        rec.decision = Some("allow".into());
        rec.sql = Some(stmt.sql.to_string());
        rec.params = Some(params.to_vec());
        rec.rule = Some(stmt.rule.to_string());
        let mut meta = serde_json::json!({ "stage": "bind" });
        if stmt.unparsable {
            meta["unparsable"] = serde_json::Value::Bool(true);
        }
        rec.meta = Some(meta);
        rec
    }

    /// A statement Bind names that no Parse of this session made: one made by SQL `PREPARE`
    /// (they share Postgres's namespace), with the text the policy allowed then — decided
    /// again at every Execute — or one the session does not know.
    fn sql_prepared_statement(&self, name: &str) -> Prepared {
        match self.sql_prepared.lookup(name) {
            Lookup::Known(text) if !name.is_empty() => {
                let verdict = self.decide(&text);
                Prepared {
                    sql: text.clone(),
                    rule: Arc::from(verdict.rule.as_str()),
                    unparsable: verdict.unparsable,
                    effect: if verdict.is_allowed() { self.effect_of(&verdict) } else { Effect::Other },
                    plans_user_code: !verdict.is_allowed() || self.plans_user_code_of(&verdict),
                    types: Arc::default(),
                    stamp: None,
                    copies_in: false,
                    note: None,
                }
            }
            _ => Prepared::unknown(name),
        }
    }

    /// The policy's verdict for executing `stmt` now, when it may differ from the one its
    /// Parse got (see [`Prepared::stamp`]); None when that one stands.
    fn redecide(&self, stmt: &Prepared) -> Option<Arc<Verdict>> {
        if stmt.sql.is_empty() {
            // A statement the session does not know: Postgres may hold one of that name that
            // pgward could not follow (made in a function, or kept by a Close it skipped).
            let now = chrono::Utc::now();
            return Some(self.shared.policy.decide_unknown_statement(&self.policy_identity, &self.database, now));
        }
        if let Some(stamp) = stmt.stamp
            && stamp == self.shared.policy.decision_stamp(&self.database, chrono::Utc::now())
        {
            return None;
        }
        Some(self.decide(&stmt.sql))
    }

    /// `E`: a statement record with the portal's statement and parameters. The statement is
    /// decided again when what its Parse was decided on has changed (a time window closed);
    /// a denied Execute is replaced by one that fails upstream.
    fn on_execute(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        self.check_token()?;
        let portal = wire::decode_execute(&f).map_err(bad)?;
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some("extended".into());
        rec.decision = Some("allow".into());
        let known = self.tracker.portal(&portal);
        let verdict = known.and_then(|p| self.redecide(&p.stmt));
        // A portal the session did not bind runs nothing (Postgres answers 34000) — unless it
        // is a cursor DECLARE opened (a portal of that name), whose query runs like a FETCH's.
        let effect = known.map_or(Effect::Other, |p| p.stmt.effect);
        match known {
            Some(p) => {
                rec.sql = Some(p.stmt.sql.to_string());
                rec.params = Some(p.params.clone());
                rec.rule = Some(p.stmt.rule.to_string());
                if p.stmt.unparsable {
                    rec.meta = Some(serde_json::json!({ "unparsable": true }));
                }
            }
            // Postgres will answer 34000 (no such portal); nothing runs.
            None => {
                rec.sql = Some(String::new());
                rec.rule = Some("unknown-portal".into());
            }
        }
        // A portal masking does not know gets an empty plan.
        let tag = match &self.mask {
            Some(_) => Tag::Execute(known.and_then(|p| p.mask.clone()).unwrap_or_default()),
            None => Tag::None,
        };
        let mut p = Pending::with_mask(Awaited::Execute, tag);
        let note = known.and_then(|k| k.stmt.note.clone());
        if let Some(v) = verdict
            && !Self::apply_verdict(&mut rec, &mut p, &v)
        {
            batch.push_statement(self.marker_execute(), rec, p, Rule::HoldReply);
            return Ok(());
        }
        if known.is_some_and(|k| k.stmt.copies_in) {
            p.copy_in = true;
            self.copy_in.started(1);
        }
        p.changes = self.begin_changes(std::iter::once(note));
        // Its record stands for a Bind of the portal held in this batch (not a refused one's:
        // the Bind's own record says what ran while it was planned).
        batch.executed(&portal);
        let rule = self.durability_rule(effect, true);
        batch.push_statement(f, rec, p, rule);
        Ok(())
    }

    /// `D`: masking learns the described statement's or portal's columns from the answer; a
    /// described statement's ParameterDescription gives its parameter types.
    fn on_describe(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        let (kind, name) = wire::decode_close_or_describe(&f).map_err(bad)?;
        let tag = match &self.mask {
            None => Tag::None,
            Some(_) if kind == b'S' => {
                self.tracker.statement(&name).and_then(|s| s.mask.clone()).map_or(Tag::None, Tag::DescribeStmt)
            }
            Some(_) => self.tracker.portal(&name).and_then(|p| p.mask.clone()).map_or(Tag::None, Tag::DescribePortal),
        };
        let mut p = Pending::with_mask(Awaited::Describe, tag);
        if kind == b'S' {
            p.described = self.tracker.statement(&name).and_then(|s| s.allowed.as_ref()).map(|s| s.types.clone());
        }
        batch.forward(f, p);
        Ok(())
    }

    /// `C`: the statement or portal is gone.
    fn on_close(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        let (kind, name) = wire::decode_close_or_describe(&f).map_err(bad)?;
        self.tracker.close(kind, &name);
        let mut p = Pending::new(Awaited::Close);
        if kind == b'S' {
            p.changes = [Some(self.sql_prepared.begin_close(&name))].into();
        }
        batch.forward(f, p);
        Ok(())
    }

    /// `F`: decided by the policy on the function's OID, and under strict masking refused
    /// unless it is a large-object function; a denied call is replaced by one that fails
    /// upstream.
    fn on_function_call(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        self.check_token()?;
        let (oid, args) = wire::decode_function_call(&f).map_err(bad)?;
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some("function_call".into());
        rec.sql = Some(format!("-- fastpath function call: oid {oid}"));
        // The argument types are the function's, which pgward does not look up.
        rec.params = Some(args.iter().map(|(fmt, v)| Param::of(*fmt, *v, 0)).collect());
        let mut p = Pending::new(Awaited::FunctionCall);
        let verdict = self.shared.policy.decide_function_call(&self.policy_identity, &self.database, oid, chrono::Utc::now());
        let verdict = self.strict_masking(verdict, self.mask.as_ref().and_then(|m| m.function_call(oid)));
        let (frame, rule) = if Self::apply_verdict(&mut rec, &mut p, &verdict) {
            (f, self.durability_rule(Effect::Other, true))
        } else {
            (self.marker_function_call(), Rule::HoldReply)
        };
        batch.push_statement(frame, rec, p, rule);
        Ok(())
    }

    /// `X`: the session ends. With pooling, a Terminate on its own with nothing outstanding is
    /// not forwarded: the upstream goes back to the pool (reset there). Else Postgres gets it.
    fn on_terminate(&mut self, f: Frame, batch: &mut Batch) {
        self.terminated = true;
        self.end_reason = None;
        if self.keep_upstream && batch.frames.is_empty() && batch.pendings.is_empty() && self.tracker.is_clean() {
            self.detach = true;
        } else {
            batch.frames.push((f, None));
        }
    }

    /// The session keeps at most `server.max_session_state_bytes` in prepared statements and
    /// portals (protocol-level and SQL-level): past it the session ends (FATAL 54000) before
    /// the message that went over is forwarded.
    fn check_retained(&self) -> Result<(), End> {
        let max = self.shared.cfg.server.max_session_state_bytes;
        let kept = self.tracker.retained() + self.sql_prepared.bytes();
        if kept <= max {
            return Ok(());
        }
        Err(End::Fatal(
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!(
                "pgward: the session keeps {kept} bytes of prepared statements and portals, more than \
                 server.max_session_state_bytes ({max}); close some (Close, DEALLOCATE)"
            ),
        ))
    }

    /// Before any statement, COPY data and Sync, and before the server's bytes reach the
    /// client: the token is unexpired and not revoked, and a grant the session runs under is
    /// neither expired nor revoked. Otherwise the session ends (FATAL) before the message is
    /// forwarded, and what it left unfinished (a COPY, an implicit transaction) is rolled back
    /// with the upstream connection.
    pub(super) fn check_token(&mut self) -> Result<(), End> {
        self.check
            .check(&self.shared.access, &self.identity, now_unix())
            .map_err(|r| End::Fatal(r.sqlstate(), r.to_string()))
    }

    /// The texts `EXECUTE name` may run, if the session knows them: an SQL-level PREPARE, else a
    /// protocol-level Parse of that name (they share Postgres's namespace).
    /// While a PREPARE or DEALLOCATE of the name is on its way: every text the name may
    /// then run (none known: unknown).
    fn lookup_prepared(&self, name: &str) -> Vec<String> {
        let parsed = || {
            self.tracker.statement(name).and_then(|s| s.allowed.as_ref()).filter(|_| !name.is_empty()).map(|p| p.sql.to_string())
        };
        match self.sql_prepared.lookup(name) {
            Lookup::Known(t) => vec![t.to_string()],
            Lookup::Unknown => Vec::new(),
            Lookup::NotPrepared => parsed().into_iter().collect(),
            Lookup::InFlight { prepares, base } => {
                let now = base.map(|t| t.to_string()).or_else(parsed);
                prepares.iter().map(|t| t.to_string()).chain(now).collect()
            }
        }
    }

    /// Whether Postgres has a prepared statement named `name` as far as the session knows: an
    /// allowed Parse of it, or a SQL `PREPARE` made or on its way. (A name only a DEALLOCATE or
    /// Close on its way may free is taken as free: Postgres runs them before a Parse sent
    /// after them, and one it skips skips that Parse too.)
    fn prepared_exists(&self, name: &str) -> bool {
        self.tracker.statement(name).is_some_and(|s| s.allowed.is_some())
            || match self.sql_prepared.lookup(name) {
                Lookup::Known(_) | Lookup::Unknown => true,
                Lookup::InFlight { prepares, .. } => !prepares.is_empty(),
                Lookup::NotPrepared => false,
            }
    }

    /// A Parse of a name the session already has a statement under: Postgres refuses it (42P05)
    /// and keeps the old statement, but a Bind sent after the next Sync — before that answer is
    /// back — would be taken for one of the new text (its record, its masking plan, its
    /// decision). So pgward refuses it itself, as Postgres would, and nothing changes.
    fn refuse_existing_name(&mut self, name: &str, sql: &str, batch: &mut Batch) {
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some("extended".into());
        rec.sql = Some(sql.to_string());
        rec.decision = Some("deny".into());
        rec.rule = Some("builtin:duplicate-statement".into());
        let mut p = Pending::new(Awaited::Parse);
        p.refusal = Some((sqlstate::DUPLICATE_PREPARED_STATEMENT, format!("prepared statement \"{name}\" already exists")));
        let marker = self.marker_parse(name);
        batch.push_statement(marker, rec, p, Rule::HoldReply);
    }

    /// The PREPAREs and DEALLOCATEs of a forwarded Query (one entry per statement) or
    /// Execute: their names are unknown until the server completes them (a statement of the
    /// string that fails, an aborted transaction, a name that exists — then nothing changed).
    /// Empty when there are none.
    fn begin_changes(&mut self, notes: impl Iterator<Item = Option<PreparedNote>>) -> VecDeque<Option<Change>> {
        let notes: Vec<Option<PreparedNote>> = notes.collect();
        if notes.iter().all(Option::is_none) {
            return VecDeque::new();
        }
        notes.into_iter().map(|n| n.map(|n| self.sql_prepared.begin(n))).collect()
    }

    /// The policy's verdict on a Query's or Parse's text, for this session's effective
    /// identity, with `EXECUTE name` resolved through the session's prepared statements.
    fn decide(&self, sql: &str) -> Arc<Verdict> {
        let lookup = |name: &str| self.lookup_prepared(name);
        let now = chrono::Utc::now();
        match self.analyzed.iter().find(|(text, _)| **text == *sql) {
            Some((_, a)) => self.shared.policy.decide_analyzed(a, &self.policy_identity, &self.database, now, &lookup),
            None => self.shared.policy.decide_with_prepared(&self.policy_identity, &self.database, sql, now, &lookup),
        }
    }

    /// A statement the policy allows may still be refused by strict masking (`mask::strict`,
    /// its `violation` found by masking's analysis of the text): the verdict then names the
    /// mask rules and why.
    fn strict_masking(&self, verdict: Arc<Verdict>, violation: Option<Violation>) -> Arc<Verdict> {
        if !verdict.is_allowed() {
            return verdict;
        }
        let (Some(m), Some(v)) = (self.mask.as_ref(), violation) else { return verdict };
        let (rule, reason) = m.refusal_message(&v);
        Arc::new(Verdict { decision: crate::policy::Action::Deny, rule, reason, ..(*verdict).clone() })
    }

    /// Analyze the long Query and Parse texts among the complete frames in `cbuf` that the
    /// policy would parse ([`ANALYZE_AHEAD_BYTES`]) on tokio's blocking pool, while this
    /// session waits and the loop relays the others; [`Relay::decide`] then decides them with
    /// that analysis. Frames are only peeked at: `on_client_data` reads them as always (and
    /// rejects what is malformed). A text whose analysis fails here is analyzed there.
    pub(super) async fn analyze_ahead(&mut self, cbuf: &[u8]) {
        for (tag, raw) in wire::complete_frames(cbuf).filter(|&(tag, raw)| is_long_text(tag, raw)) {
            let f = Frame { tag, raw: Bytes::copy_from_slice(raw) };
            let text: Arc<str> = match tag {
                b'Q' => match wire::decode_query(&f, self.watch.encoding()) {
                    Ok(t) => Arc::from(t.as_ref()),
                    Err(_) => continue,
                },
                _ => match wire::decode_parse(&f, self.watch.encoding()) {
                    Ok((_, t)) => Arc::from(t.as_ref()),
                    Err(_) => continue,
                },
            };
            if self.analyzed.iter().any(|(t, _)| *t == text) || !self.shared.policy.would_parse(&text) {
                continue;
            }
            let (shared, t) = (self.shared.clone(), text.clone());
            if let Ok(a) = tokio::task::spawn_blocking(move || shared.policy.analysis(&t)).await {
                crate::metrics::METRICS.statements_analyzed_off_loop.inc();
                self.analyzed.push((text, a));
            }
        }
    }

    /// A Query or Parse whose text is not valid in the client's encoding: never decided on and
    /// never forwarded. In its place goes a marker that fails upstream, so Postgres does the
    /// transaction and pipeline bookkeeping; the client gets ERROR 22021, as from Postgres
    /// itself, and the session goes on. Audited as denied (`builtin:encoding`). Masking reads
    /// the text byte for byte ([`wire::text`]), as it reads every text.
    fn refuse_undecodable(&mut self, f: &Frame, at: usize, batch: &mut Batch) {
        let (kind, name, raw) = if f.tag == b'Q' {
            (Awaited::Query, String::new(), f.body())
        } else {
            let mut r = wire::Reader::new(f.body());
            let name = r.cstr().map(|n| n.into_owned()).unwrap_or_default();
            (Awaited::Parse, name, r.rest())
        };
        let text = raw.split(|&b| b == 0).next().unwrap_or(&[]);
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some(if kind == Awaited::Query { "simple" } else { "extended" }.into());
        rec.sql = Some(String::from_utf8_lossy(text).into_owned());
        rec.decision = Some("deny".into());
        rec.rule = Some("builtin:encoding".into());
        let mut p = Pending::new(kind);
        let enc = self.watch.encoding_name();
        p.refusal = Some((
            sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            format!("pgward: invalid byte sequence for encoding \"{enc}\" at byte {at} of the statement text"),
        ));
        let marker = if kind == Awaited::Query {
            if let Some(m) = self.mask.as_mut() {
                p.mask = m.query(&wire::text(text)).0;
            }
            self.marker_query()
        } else {
            let mask = self.mask.as_mut().map(|m| m.parse(&wire::text(text)).0);
            self.refused_statement(&name, mask);
            self.marker_parse(&name)
        };
        batch.push_statement(marker, rec, p, Rule::HoldReply);
    }

    /// Put the verdict into the statement record; for a denial, set the pending's refusal
    /// (42501 naming the rule). Returns whether the statement may go upstream as sent.
    fn apply_verdict(rec: &mut Record, p: &mut Pending, v: &Verdict) -> bool {
        rec.rule = Some(v.rule.clone());
        if v.unparsable {
            rec.meta = Some(serde_json::json!({ "unparsable": true }));
        }
        if v.is_allowed() {
            rec.decision = Some("allow".into());
            true
        } else {
            rec.decision = Some("deny".into());
            p.refusal = Some((
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("pgward: permission denied by policy rule \"{}\": {}", v.rule, v.reason),
            ));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notes(sql: &str) -> Vec<Option<PreparedNote>> {
        crate::policy::analyze_sql(sql).iter().map(PreparedNote::of).collect()
    }

    #[test]
    fn prepare_and_deallocate_names_are_folded() {
        let n = notes("PREPARE Q(int) AS SELECT $1; DEALLOCATE ALL; deallocate prepare \"X\"; EXECUTE q(1); PREPARE \"Mixed\" AS DELETE FROM t");
        assert!(matches!(&n[0], Some(PreparedNote::Prepare(name, text)) if name == "q" && text.contains("SELECT $1")), "{n:?}");
        assert_eq!(n[1], Some(PreparedNote::DeallocateAll));
        assert_eq!(n[2], Some(PreparedNote::Deallocate("X".into())));
        assert_eq!(n[3], None);
        assert!(matches!(&n[4], Some(PreparedNote::Prepare(name, _)) if name == "Mixed"), "{n:?}");
    }
}
