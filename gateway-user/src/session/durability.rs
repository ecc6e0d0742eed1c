//! The durability contract: no effect of a statement is observable before its audit record
//! is durable. Every reply is held until the records of the statements before it are durable
//! ([`super::inflight`]); what this module decides is whether a statement may also reach
//! Postgres before its record is durable (its work then overlaps the flush) or must wait for
//! it ([`Rule::WriteAhead`]).
//!
//! A statement may go at once ([`Rule::HoldReply`]) when it cannot change anything outside its
//! own transaction before that transaction commits, and whatever can commit the transaction
//! is itself held back until every record of it is durable:
//! - reads that call only built-in (`pg_catalog`) functions the catalog says are neither
//!   volatile nor reach outside the database ([`Effect::Read`]); not FETCH or MOVE, which run
//!   a cursor's query that another statement gave;
//! - INSERT, UPDATE, DELETE, MERGE and locking reads with the same function restriction
//!   ([`Effect::TxWrite`]), inside an explicit transaction block or in the extended
//!   protocol's implicit transaction (which only a Sync, a simple Query or a transaction
//!   command commits);
//! - BEGIN / START TRANSACTION ([`Effect::Begin`]).
//!
//! Commit points wait ([`TxState`]): COMMIT and every other transaction command are
//! write-ahead; a Sync or a simple Query that would end an implicit transaction holding
//! writes waits for their records. A block counts as open only once Postgres has said so
//! (ReadyForQuery): a BEGIN sent is not a block opened — Postgres skips every message after
//! an extended-protocol error up to the Sync, a simple-query BEGIN included, and a BEGIN can
//! fail — and a write taken for one inside a block would autocommit before its record is
//! durable. Everything else — autocommit writes, DDL, COPY FROM,
//! session commands, user-defined or volatile functions, what does not parse — is
//! write-ahead. If pgward dies while a transaction is open, its upstream connection dies
//! with it and Postgres rolls the transaction back.

use crate::policy::functions::{self, FunctionCatalog};
use crate::policy::{Modifier, StatementClass, StatementInfo};

/// When a statement's record must be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rule {
    /// Before the statement reaches Postgres.
    WriteAhead,
    /// Before any reply to it (or to anything after it) reaches the client.
    HoldReply,
}

impl Rule {
    /// As the statement record's `durability` field has it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Rule::WriteAhead => "write-ahead",
            Rule::HoldReply => "hold-reply",
        }
    }
}

/// What a statement (or a whole query string) can do, as far as durability goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// Nothing beyond its reply.
    Read,
    /// Changes that take effect when its transaction commits.
    TxWrite,
    /// Opens a transaction block.
    Begin,
    /// Anything else: its effect may be visible at once.
    Other,
}

/// Function classes that make a call an effect of its own.
const EFFECT_CLASSES: u8 = functions::VOLATILE | functions::OUTSIDE | functions::DYNAMIC_SQL;

/// Commands of the write class whose changes are transactional row changes.
const TX_WRITE_COMMANDS: &[&str] = &["insert", "update", "delete", "merge", "select"];

/// Commands of the read class that run nothing but the read (EXPLAIN may ANALYZE). FETCH and
/// MOVE are not among them: they run the query of a cursor an earlier statement declared (or
/// a function opened), which may call volatile functions (nextval, advisory locks, dblink)
/// that this statement's text does not show.
const READ_COMMANDS: &[&str] = &["select", "values", "table", "declare", "copy"];

/// The effect of one analyzed statement.
pub(super) fn statement_effect(info: &StatementInfo, catalog: Option<&FunctionCatalog>) -> Effect {
    use StatementClass::*;
    if info.unparsable
        || !info.body_functions.is_empty()
        || info.modifiers.contains(Modifier::UnknownPrepared)
        || !functions_are_plain(info, catalog)
    {
        return Effect::Other;
    }
    let only = |allowed: &[StatementClass]| StatementClass::ALL.iter().all(|c| !info.classes.contains(*c) || allowed.contains(c));
    let commands_in = |list: &[&str]| info.commands.iter().all(|c| list.contains(&c.as_str()));
    if info.classes.contains(Transaction) {
        let begin = only(&[Transaction]) && matches!(info.commands.as_slice(), [c] if c == "begin" || c == "start");
        return if begin { Effect::Begin } else { Effect::Other };
    }
    if only(&[Read]) && commands_in(READ_COMMANDS) {
        return Effect::Read;
    }
    if only(&[Read, Write]) && commands_in(TX_WRITE_COMMANDS) {
        return Effect::TxWrite;
    }
    Effect::Other
}

/// The effect of a query string's statements together: reads if all read, transactional
/// writes if all are reads or such writes, a lone BEGIN; otherwise [`Effect::Other`].
pub(super) fn combined<I: IntoIterator<Item = Effect>>(effects: I) -> Effect {
    let mut it = effects.into_iter();
    // An empty string runs nothing.
    let Some(mut acc) = it.next() else { return Effect::Read };
    for e in it {
        acc = match (acc, e) {
            (Effect::Other | Effect::Begin, _) | (_, Effect::Other | Effect::Begin) => Effect::Other,
            (Effect::Read, Effect::Read) => Effect::Read,
            _ => Effect::TxWrite,
        };
    }
    acc
}

/// Whether Postgres may run code that is not a plain built-in function while it plans the
/// statement, which in the extended protocol it does at Bind, before any Execute: the
/// planner evaluates immutable functions with constant arguments, and stable ones to
/// estimate selectivity, trusting the volatility a function's owner declared. True for a
/// call of any function that is not a plain built-in (user-defined ones included) and for
/// what pgward cannot analyze.
pub(super) fn plans_user_code(info: &StatementInfo, catalog: Option<&FunctionCatalog>) -> bool {
    info.unparsable || !functions_are_plain(info, catalog)
}

/// Every function the statement calls is a built-in the catalog knows as neither volatile
/// nor reaching outside the database. Without a catalog only statements without calls pass.
fn functions_are_plain(info: &StatementInfo, catalog: Option<&FunctionCatalog>) -> bool {
    if info.functions.is_empty() {
        return true;
    }
    let Some(cat) = catalog else { return false };
    info.functions.iter().all(|f| {
        f.schema.as_deref().is_none_or(|s| s == "pg_catalog")
            && cat.only_builtin(&f.name)
            && cat.classes_of(f) & EFFECT_CLASSES == 0
    })
}

/// What the session has sent upstream that matters for commits, as projected at the time a
/// frame is forwarded (Postgres's own status arrives later, with ReadyForQuery).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TxState {
    /// An explicit transaction block is open (or failed), as Postgres's last ReadyForQuery
    /// said and nothing forwarded since may have ended: statements do not commit.
    pub(super) in_block: bool,
    /// Writes were forwarded before their records were durable, and have not been followed
    /// by a write-ahead frame (which waits for every earlier record).
    pub(super) unsettled: bool,
}

impl TxState {
    /// The rule for a simple Query of this effect, and the projected state after it.
    pub(super) fn query(&mut self, effect: Effect) -> Rule {
        // A Query outside a block commits the implicit transaction of earlier extended
        // messages with it.
        let commits_earlier = self.unsettled && !self.in_block;
        let rule = match effect {
            // BEGIN opens no block until ReadyForQuery says so (Postgres may skip it).
            Effect::Read | Effect::Begin if !commits_earlier => Rule::HoldReply,
            Effect::TxWrite if self.in_block => Rule::HoldReply,
            _ => Rule::WriteAhead,
        };
        self.after(effect, rule);
        rule
    }

    /// The rule for an Execute of this effect (extended protocol: it runs in a block or in
    /// the implicit transaction that the next Sync ends).
    pub(super) fn execute(&mut self, effect: Effect) -> Rule {
        let rule = match effect {
            Effect::Read | Effect::TxWrite | Effect::Begin => Rule::HoldReply,
            Effect::Other => Rule::WriteAhead,
        };
        self.after(effect, rule);
        rule
    }

    /// Whether a Sync must wait for the session's records: it commits the implicit
    /// transaction, and that holds writes whose records may not be durable yet.
    pub(super) fn sync_waits(&mut self) -> bool {
        let waits = self.unsettled && !self.in_block;
        if waits {
            self.unsettled = false;
        }
        waits
    }

    fn after(&mut self, effect: Effect, rule: Rule) {
        match rule {
            Rule::HoldReply => self.unsettled |= effect == Effect::TxWrite,
            Rule::WriteAhead => {
                // Every earlier record is durable before this goes; what it does to the
                // transaction status is not projected (ReadyForQuery will tell).
                self.unsettled = false;
                self.in_block = false;
            }
        }
    }

    /// ReadyForQuery with nothing else outstanding: Postgres's own status.
    pub(super) fn ready(&mut self, status: u8) {
        self.in_block = matches!(status, b'T' | b'E');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> FunctionCatalog {
        let row = |schema: &str, name: &str, vol: char, lang: &str| functions::ProcRow {
            schema: schema.into(),
            name: name.into(),
            volatility: vol,
            security_definer: false,
            language: lang.into(),
            language_trusted: true,
            symbol: None,
            library: None,
            executes: false,
        };
        FunctionCatalog::from_rows([
            row("pg_catalog", "now", 's', "internal"),
            row("pg_catalog", "lower", 'i', "internal"),
            row("pg_catalog", "count", 'i', "internal"),
            row("pg_catalog", "random", 'v', "internal"),
            row("pg_catalog", "nextval", 'v', "internal"),
            row("pg_catalog", "pg_sleep", 'v', "internal"),
            row("public", "stable_udf", 's', "plpgsql"),
        ])
    }

    fn effect(sql: &str) -> Effect {
        let cat = catalog();
        combined(crate::policy::analyze_sql(sql).iter().map(|i| statement_effect(i, Some(&cat))))
    }

    #[test]
    fn effects_of_statements() {
        use Effect::*;
        for (sql, want) in [
            ("select 1", Read),
            ("SELECT abalance FROM pgbench_accounts WHERE aid = 5", Read),
            ("select lower(name), count(*) from t group by 1", Read),
            ("select now()", Read),
            ("values (1), (2)", Read),
            ("table t", Read),
            ("copy t to stdout", Read),
            ("declare c cursor for select 1", Read),
            ("declare c cursor for select nextval('s')", Other),
            ("fetch 10 from c", Other),
            ("move forward 5 in c", Other),
            ("select 1; select 2", Read),
            ("", Read),
            ("select random()", Other),
            ("select nextval('s')", Other),
            ("select pg_catalog.pg_sleep(1)", Other),
            ("select stable_udf()", Other),
            ("select public.lower('x')", Other),
            ("select unknown_fn()", Other),
            ("explain analyze delete from t", Other),
            ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 3", TxWrite),
            ("insert into t values (1)", TxWrite),
            ("insert into t values (nextval('s'))", Other),
            ("delete from t where id = 1", TxWrite),
            ("select * from t for update", TxWrite),
            ("with d as (delete from t returning *) select * from d", TxWrite),
            ("select 1; insert into t values (2)", TxWrite),
            ("begin", Begin),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", Begin),
            ("start transaction", Begin),
            ("begin; insert into t values (1)", Other),
            ("commit", Other),
            ("end", Other),
            ("rollback", Other),
            ("prepare transaction 'x'", Other),
            ("savepoint a", Other),
            ("insert into t values (1); commit", Other),
            ("truncate t", Other),
            ("lock table t", Other),
            ("notify c", Other),
            ("copy t from stdin", Other),
            ("create table x (a int)", Other),
            ("set work_mem = '1MB'", Other),
            ("do $$ begin perform 1; end $$", Other),
            ("call p()", Other),
            ("execute q", Other),
            ("vacuum t", Other),
            ("refresh materialized view m", Other),
            ("selec 1", Other),
        ] {
            assert_eq!(effect(sql), want, "{sql}");
        }
    }

    #[test]
    fn without_a_catalog_only_calls_free_statements_overlap() {
        let infos = crate::policy::analyze_sql("select now(); select 1");
        assert_eq!(statement_effect(&infos[0], None), Effect::Other);
        assert_eq!(statement_effect(&infos[1], None), Effect::Read);
    }

    #[test]
    fn commit_points_wait_for_the_writes_before_them() {
        use Effect::*;
        use Rule::*;
        // Autocommit: reads overlap, writes are write-ahead.
        let mut tx = TxState::default();
        assert_eq!(tx.query(Read), HoldReply);
        assert_eq!(tx.query(TxWrite), WriteAhead);
        // A block: BEGIN overlaps; the writes after it too once Postgres says the block is
        // open; COMMIT waits; after it, autocommit again.
        assert_eq!(tx.query(Begin), HoldReply);
        assert_eq!(tx.query(TxWrite), WriteAhead, "the BEGIN may not have run (skipped after an error, failed)");
        tx.ready(b'T');
        assert_eq!(tx.query(TxWrite), HoldReply);
        assert_eq!(tx.query(Read), HoldReply);
        assert_eq!(tx.query(Other), WriteAhead);
        assert_eq!(tx.query(TxWrite), WriteAhead, "COMMIT's outcome is not projected");
        tx.ready(b'I');
        assert_eq!(tx.query(TxWrite), WriteAhead);

        // Extended protocol: the implicit transaction's writes overlap, its Sync waits.
        let mut tx = TxState::default();
        assert_eq!(tx.execute(Read), HoldReply);
        assert!(!tx.sync_waits(), "reads only: nothing to commit");
        assert_eq!(tx.execute(TxWrite), HoldReply);
        assert!(tx.sync_waits());
        assert!(!tx.sync_waits(), "settled by the first");
        // A simple Query after unsynced writes commits them: it waits, even a read.
        assert_eq!(tx.execute(TxWrite), HoldReply);
        assert_eq!(tx.query(Read), WriteAhead);
        assert_eq!(tx.execute(TxWrite), HoldReply);
        assert_eq!(tx.query(Begin), WriteAhead);
        // A BEGIN Executed is not a block yet: the Sync after it still waits for the writes.
        let mut tx = TxState::default();
        assert_eq!(tx.execute(Begin), HoldReply);
        assert_eq!(tx.execute(TxWrite), HoldReply);
        assert!(tx.sync_waits());
        // Inside a block a Sync commits nothing.
        let mut tx = TxState::default();
        tx.ready(b'T');
        assert_eq!(tx.execute(TxWrite), HoldReply);
        assert!(!tx.sync_waits());
        assert_eq!(tx.query(Read), HoldReply);
        // A failed block is still a block (its statements fail).
        tx.ready(b'E');
        assert_eq!(tx.query(TxWrite), HoldReply);
        assert_eq!(tx.execute(Other), WriteAhead);
    }
}
