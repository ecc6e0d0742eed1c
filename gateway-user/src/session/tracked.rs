//! What the session keeps in its protocol tracker ([`crate::wire::Tracker`]) per prepared
//! statement, portal and awaited answer: the policy's verdict and the audit bookkeeping, next
//! to what masking keeps of the same statement or portal.

use std::sync::Arc;
use std::time::Instant;

use std::collections::VecDeque;

use super::durability::Effect;
use super::sql_prepared::{Change, PreparedNote};
use crate::audit::Param;
use crate::mask::relay::{PortalInfo, PreparedInfo, Tag};
use crate::policy::DecisionStamp;
use crate::wire::ParamTypes;
use crate::wire::tracker::{Await, Awaited, Retained, Tracker};

pub(super) type SessionTracker = Tracker<Statement, Portal, Pending>;

/// A Parse the policy allowed: its text, the rule that allowed it, and its parameter types
/// (for the audit record's parameters).
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    pub(super) sql: Arc<str>,
    pub(super) rule: Arc<str>,
    pub(super) unparsable: bool,
    /// What executing it can do, for the durability rule of its Executes.
    pub(super) effect: Effect,
    /// Planning it may run code that is not a plain built-in ([`super::durability::plans_user_code`]):
    /// its Binds are write-ahead.
    pub(super) plans_user_code: bool,
    pub(super) types: Arc<ParamTypes>,
    /// What the policy's verdict at Parse rested on besides the text ([`DecisionStamp`]): an
    /// Execute under another stamp (a time window opened or closed, the function catalog
    /// changed) is decided again. None: every Execute is decided again (the text runs a
    /// prepared statement by name, or was prepared by SQL `PREPARE`).
    pub(super) stamp: Option<DecisionStamp>,
    /// It is a COPY … FROM STDIN ([`super::copy_in`]).
    pub(super) copies_in: bool,
    /// The text is a PREPARE or DEALLOCATE: what executing it does to the SQL-level names.
    pub(super) note: Option<PreparedNote>,
}

impl Prepared {
    /// A statement the session does not know under `name` (Postgres will say whether it
    /// exists: code in the database can PREPARE one). A named one is decided at every Execute
    /// as SQL `EXECUTE "name"` would be — a statement whose text pgward never saw.
    pub(super) fn unknown(name: &str) -> Prepared {
        let sql = if name.is_empty() { String::new() } else { format!("EXECUTE \"{}\"", name.replace('"', "\"\"")) };
        Prepared {
            sql: Arc::from(sql),
            rule: Arc::from("unknown-statement"),
            unparsable: false,
            effect: Effect::Other,
            plans_user_code: true,
            types: Arc::default(),
            stamp: None,
            copies_in: false,
            note: None,
        }
    }
}

/// A prepared statement name the session saw parsed.
#[derive(Debug)]
pub(super) struct Statement {
    /// The allowed Parse; None when the last Parse of the name was refused (Postgres then
    /// has no statement of this text under the name).
    pub(super) allowed: Option<Prepared>,
    /// What masking keeps of the last Parse of the name (allowed or not), when masking is on.
    pub(super) mask: Option<Arc<PreparedInfo>>,
}

/// A portal the session saw bound.
#[derive(Debug)]
pub(super) struct Portal {
    pub(super) stmt: Prepared,
    /// Its parameters as the audit log shows them.
    pub(super) params: Vec<Option<Param>>,
    /// What masking keeps of it, when masking is on and the Bind carried its result formats.
    pub(super) mask: Option<Arc<PortalInfo>>,
}

/// An answer the server owes for a forwarded client frame.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) kind: Awaited,
    /// seq of the statement record (Execute/Query/FunctionCall), 0 if none.
    pub(super) seq: u64,
    pub(super) started: Instant,
    /// If set, the frame was replaced by a failing marker; rewrite its error into this.
    pub(super) refusal: Option<(&'static str, String)>,
    /// Index into the batch's record receivers (before durability), usize::MAX if none.
    pub(super) rec_idx: usize,
    /// What masking knows about this frame (statement lineage, portal, described statement).
    pub(super) mask: Tag,
    /// A forwarded Parse: the name and what it meant before, restored if the Parse fails.
    /// (Boxed: rare, and the queue of pendings is on the per-frame path.)
    pub(super) replaced: Option<Box<(String, Option<Statement>)>>,
    /// A forwarded Describe of an allowed statement: where its ParameterDescription goes.
    pub(super) described: Option<Arc<ParamTypes>>,
    /// A forwarded Query or Execute that starts COPY FROM STDIN ([`super::copy_in`]).
    pub(super) copy_in: bool,
    /// What a forwarded Query (per statement, in order), Execute or Close changes in the
    /// SQL-level prepared statements once the server completes it.
    pub(super) changes: VecDeque<Option<Change>>,
}

impl Pending {
    pub(super) fn new(kind: Awaited) -> Pending {
        Pending {
            kind,
            seq: 0,
            started: Instant::now(),
            refusal: None,
            rec_idx: usize::MAX,
            mask: Tag::None,
            replaced: None,
            described: None,
            copy_in: false,
            changes: VecDeque::new(),
        }
    }

    pub(super) fn with_mask(kind: Awaited, mask: Tag) -> Pending {
        Pending { mask, ..Pending::new(kind) }
    }
}

impl Await for Pending {
    fn awaited(&self) -> Awaited {
        self.kind
    }
}

impl Retained for Statement {
    /// The allowed text (masking's analysis of the same text is counted with it).
    fn retained_bytes(&self) -> usize {
        self.allowed.as_ref().map_or(0, |p| p.sql.len())
    }
}

impl Retained for Portal {
    /// The bound values as kept for the audit record (the statement's text is counted with
    /// the statement).
    fn retained_bytes(&self) -> usize {
        self.params.iter().map(|p| p.as_ref().map_or(0, crate::audit::Param::retained_bytes)).sum()
    }
}
