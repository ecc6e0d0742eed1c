//! `pgward audit tail|verify|replay`

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};

use crate::audit::links::LinkCheck;
use crate::audit::reader::{ReadError, Reader};
use crate::audit::{Client, Kind, Param, Record};

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print audit records (optionally following new ones).
    Tail(TailArgs),
    /// Check the hash chain and checkpoint signatures; exit 1 naming the first bad record.
    /// With --against, also compare the log with an exported copy.
    Verify(VerifyArgs),
    /// Replay one session's statements and outcomes with the original timing scaled.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Keep printing records as they are appended.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub session: Option<String>,
    /// Only records at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Print the records exactly as stored, one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Print only the last N records before following (default: all).
    #[arg(short = 'n', long)]
    pub lines: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// An exported copy (a syslog receiver's file, or JSON lines): every record in it must be
    /// in the local log with the same hash; exit 1 naming the first seq that differs.
    #[arg(long, value_name = "FILE")]
    pub against: Option<PathBuf>,
    /// Off-host anchors to check the log against: `etcd` ([access.etcd], this node's anchors).
    /// Every anchor's seq must hold the anchored hash locally; exit 1 naming the seq if not.
    #[arg(long, value_enum, value_name = "STORE")]
    pub anchors: Option<AnchorStore>,
}

/// Where `verify --anchors` reads the anchors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AnchorStore {
    Etcd,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Session id (as shown by `audit tail`).
    pub session: String,
    /// Speed factor (2 = twice as fast) or `max` for no waiting.
    #[arg(long, default_value = "1")]
    pub speed: String,
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let result = match cmd {
        AuditCommand::Tail(a) => tail(a),
        AuditCommand::Verify(a) => verify(a),
        AuditCommand::Replay(a) => replay(a),
    };
    // A reader that went away (`| head`) is a normal way to stop.
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe))
}

fn load(config: &Path) -> anyhow::Result<(crate::config::Config, PathBuf)> {
    let cfg = crate::config::Config::load(config)?;
    let dir = cfg.resolve(&cfg.audit.dir);
    Ok((cfg, dir))
}

fn parse_ts(ts: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(ts).ok().map(|d| d.with_timezone(&Utc))
}

/// The check of the chain `tail` and `replay` run as they read ([`LinkCheck`]), with the
/// checkpoint JWKS when the config names one.
fn link_check(cfg: &crate::config::Config) -> anyhow::Result<LinkCheck> {
    let keys = match &cfg.audit.checkpoint_jwks {
        Some(jwks) => Some(crate::audit::verify::load_jwks_ed25519(&cfg.resolve(jwks))?),
        None => None,
    };
    Ok(LinkCheck::new(keys))
}

/// Say on stderr where the chain breaks, as soon as it is found.
fn warn_broken(problem: &str) {
    eprintln!(
        "pgward: WARNING: the audit log's chain breaks at {problem}; the records from there on are not vouched for (run `pgward audit verify`)"
    );
}

// ---------------------------------------------------------------------------------- tail

struct Filter {
    user: Option<String>,
    session: Option<String>,
    since: Option<DateTime<Utc>>,
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        self.user.as_ref().is_none_or(|u| r.user.as_deref() == Some(u.as_str()))
            && self.session.as_ref().is_none_or(|s| r.session.as_deref() == Some(s.as_str()))
            && self.since.is_none_or(|since| parse_ts(&r.ts).is_some_and(|t| t >= since))
    }
}

fn tail(a: TailArgs) -> anyhow::Result<ExitCode> {
    let (cfg, dir) = load(&a.config)?;
    let mut links = link_check(&cfg)?;
    let since = match &a.since {
        Some(s) => Some(parse_ts(s).with_context(|| format!("--since {s:?} is not an RFC 3339 time"))?),
        None => None,
    };
    let filter = Filter { user: a.user.clone(), session: a.session.clone(), since };
    let mut reader = Reader::open(&dir).with_context(|| format!("reading the audit log in {}", dir.display()))?;
    reader.set_hold_partial(true);

    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut line = String::new();
    let mut emit = |out: &mut io::BufWriter<io::StdoutLock<'_>>, raw: &[u8], rec: &Record| -> io::Result<()> {
        if a.json {
            out.write_all(raw)?;
        } else {
            line.clear();
            format_human(&mut line, rec);
            out.write_all(line.as_bytes())?;
        }
        out.write_all(b"\n")
    };

    let mut next = |reader: &mut Reader| -> anyhow::Result<Option<(Vec<u8>, Record)>> {
        loop {
            match reader.next() {
                None => return Ok(None),
                Some(Ok(e)) => {
                    if let Some(p) = links.next(&e.line, &e.record) {
                        warn_broken(p);
                    }
                    if filter.matches(&e.record) {
                        return Ok(Some((e.line.raw, e.record)));
                    }
                }
                Some(Err(ReadError::Incomplete { .. })) => {}
                Some(Err(e @ ReadError::Parse { .. })) => eprintln!("pgward: warning: {e}"),
                Some(Err(e)) => return Err(e.into()),
            }
        }
    };

    match a.lines {
        Some(n) => {
            let mut last: VecDeque<(Vec<u8>, Record)> = VecDeque::with_capacity(n.min(65536));
            while let Some(item) = next(&mut reader)? {
                if n == 0 {
                    continue;
                }
                if last.len() == n {
                    last.pop_front();
                }
                last.push_back(item);
            }
            for (raw, rec) in &last {
                emit(&mut out, raw, rec)?;
            }
        }
        None => {
            while let Some((raw, rec)) = next(&mut reader)? {
                emit(&mut out, &raw, &rec)?;
            }
        }
    }
    out.flush()?;

    if a.follow {
        reader.set_follow(true);
        reader.set_follow_check(stdout_open);
        while let Some((raw, rec)) = next(&mut reader)? {
            emit(&mut out, &raw, &rec)?;
            out.flush()?;
        }
    }
    drop(next);
    Ok(if links.broken().is_some() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// False once stdout is a pipe whose reader went away (`tail -f | head`), so an idle follow
/// ends instead of waiting for the next record to hit EPIPE.
fn stdout_open() -> bool {
    let mut fds = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut fds, 1, 0) };
    !(n > 0 && fds.revents & (libc::POLLERR | libc::POLLHUP) != 0)
}

/// Characters a terminal does not show as themselves but that reorder, hide or break what it
/// shows: bidirectional controls (a right-to-left override turns `SELECT 1 -- x` around),
/// zero-width characters and the Unicode line and paragraph separators. Shown escaped.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Control characters as spaces (a line break and the indentation after it as one space),
/// and [`is_invisible`] characters as `\u{…}`, so one record stays one line and shows what
/// it holds: every text in a human-readable line can come from a client (the startup user
/// and database of a failed login, SQL, a process name), and a terminal would obey the
/// escape sequences, carriage returns and line breaks in it.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut after_break = false;
    for c in s.chars() {
        if c == '\n' || c == '\r' {
            if !after_break {
                out.push(' ');
            }
            after_break = true;
        } else if after_break && (c == ' ' || c == '\t') {
        } else if c.is_control() {
            out.push(' ');
            after_break = false;
        } else if is_invisible(c) {
            out.push_str(&c.escape_unicode().to_string());
            after_break = false;
        } else {
            out.push(c);
            after_break = false;
        }
    }
    out
}

fn fmt_duration_us(us: u64) -> String {
    if us < 1_000_000 { format!("{:.1} ms", us as f64 / 1000.0) } else { format!("{:.2} s", us as f64 / 1_000_000.0) }
}

/// Parameters as `'text', NULL, '\x0a0b' (oid 600), 'abc…' (5000 bytes, sha256 …)`.
fn fmt_params(params: &[Option<Param>]) -> String {
    let items: Vec<String> = params
        .iter()
        .map(|p| match p {
            Some(Param::Text(v)) => format!("'{}'", one_line(v)),
            Some(Param::Raw { oid, hex }) => format!("'{hex}' (oid {oid})"),
            Some(Param::Long { oid, prefix, bytes, sha256 }) => {
                let oid = oid.map(|o| format!("oid {o}, ")).unwrap_or_default();
                format!("'{}' ({oid}{bytes} bytes, sha256 {sha256})", one_line(prefix))
            }
            None => "NULL".to_string(),
        })
        .collect();
    items.join(", ")
}

/// `2026-11-29T14:00:00.123456Z  #42 statement  alice  sess=ab12  db=app  SELECT 1`, every
/// field through [`one_line`].
fn format_human(s: &mut String, r: &Record) {
    let start = s.len();
    format_fields(s, r);
    let clean = one_line(&s[start..]);
    s.truncate(start);
    s.push_str(&clean);
}

fn format_fields(s: &mut String, r: &Record) {
    use std::fmt::Write as _;
    let _ = write!(s, "{}  #{} {}", r.ts, r.seq, r.kind.as_str());
    if let Some(u) = &r.user {
        let _ = write!(s, "  {u}");
    }
    if let Some(x) = &r.session {
        let _ = write!(s, "  sess={x}");
    }
    if let Some(x) = &r.database {
        let _ = write!(s, "  db={x}");
    }
    match r.kind {
        Kind::Login | Kind::LoginFailed => format_login(s, r),
        Kind::Statement => {
            if r.decision.as_deref() == Some("deny") {
                field(s, format!("DENIED({})", r.rule.as_deref().unwrap_or("?")));
            }
            if let Some(sql) = &r.sql {
                field(s, one_line(sql));
            }
            if let Some(p) = &r.params {
                field(s, format!("[{}]", fmt_params(p)));
            }
        }
        Kind::Result => format_result(s, r),
        Kind::SessionEnd => {
            if let Some(e) = &r.error {
                field(s, one_line(e));
            }
        }
        Kind::Checkpoint => {
            if let Some(a) = r.anchor_seq {
                field(s, format!("anchors #{a}"));
            }
            if let Some(k) = &r.kid {
                field(s, format!("kid={k}"));
            }
        }
        Kind::Start => {}
        Kind::Revoke
        | Kind::AccessRequest
        | Kind::AccessApprove
        | Kind::AccessRevoke
        | Kind::GrantExpired
        | Kind::Evicted
        | Kind::InterceptDetach => {
            if let Some(j) = &r.jti {
                field(s, format!("jti={j}"));
            }
            if let Some(e) = &r.error {
                field(s, one_line(e));
            }
        }
    }
    if r.kind != Kind::Checkpoint
        && let Some(m) = &r.meta
    {
        field(s, m.to_string());
    }
}

/// Append `text` as one more field of a human-readable line.
fn field(s: &mut String, text: String) {
    s.push_str("  ");
    s.push_str(&text);
}

/// A login's (or failed login's) client, groups, token id and error.
fn format_login(s: &mut String, r: &Record) {
    match &r.client {
        Some(Client::Tcp { addr, meta }) => {
            field(s, format!("from={addr}"));
            if let Some(m) = meta {
                format_intercepted(s, m);
            }
        }
        Some(Client::Unix { uid, pid }) => field(s, format!("from=unix(uid={uid},pid={pid})")),
        None => {}
    }
    if let Some(g) = &r.groups {
        field(s, format!("groups={}", g.join(",")));
    }
    if let Some(j) = &r.jti {
        field(s, format!("jti={j}"));
    }
    if let Some(st) = &r.sqlstate {
        field(s, format!("ERROR {st}"));
    }
    if let Some(e) = &r.error {
        field(s, one_line(e));
    }
}

/// An intercepted connection: who the kernel saw and what it dialled.
fn format_intercepted(s: &mut String, m: &serde_json::Value) {
    let get = |k: &str| m.get(k).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
    let mut parts = Vec::new();
    if let Some(d) = get("original_dst") {
        parts.push(format!("dialled={d}"));
    }
    for k in ["comm", "pid", "uid", "cgroup"] {
        if let Some(v) = get(k) {
            parts.push(format!("{k}={v}"));
        }
    }
    if !parts.is_empty() {
        field(s, format!("[{}]", parts.join(" ")));
    }
}

/// A result's statement number, command tag, rows, duration and error.
fn format_result(s: &mut String, r: &Record) {
    if let Some(st) = r.statement_seq {
        field(s, format!("-> #{st}"));
    }
    if let Some(t) = &r.tag {
        field(s, t.clone());
    }
    if let Some(n) = r.rows {
        field(s, format!("rows={n}"));
    }
    if let Some(us) = r.duration_us {
        field(s, fmt_duration_us(us));
    }
    if let Some(st) = &r.sqlstate {
        field(s, format!("ERROR {st}"));
    }
    if let Some(e) = &r.error {
        field(s, one_line(e));
    }
}

// -------------------------------------------------------------------------------- verify

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let (cfg, dir) = load(&a.config)?;
    let jwks = cfg.audit.checkpoint_jwks.as_ref().context(
        "audit.checkpoint_jwks is not set: checkpoints are verified against the public half of \
         audit.checkpoint_key (pgward init writes keys/checkpoint-jwks.json)",
    )?;
    let keys = crate::audit::verify::load_jwks_ed25519(&cfg.resolve(jwks))?;
    let policy = crate::audit::verify::Policy::from_config(&cfg);
    let report = crate::audit::verify::verify_with(&dir, &keys, &policy);
    let mut out = io::stdout().lock();
    writeln!(out, "{}", report.summary())?;
    let mut ok = report.is_ok();
    if let Some(copy) = &a.against {
        let comparison = compare_with_copy(&dir, copy, &keys)?;
        writeln!(out, "{comparison}")?;
        ok &= comparison.is_ok();
    }
    if let Some(AnchorStore::Etcd) = a.anchors {
        let check = check_etcd_anchors(&cfg, &dir, &keys)?;
        writeln!(out, "{check}")?;
        ok &= check.is_ok();
    }
    out.flush()?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `verify --anchors etcd`: the local log against this node's anchors in etcd.
fn check_etcd_anchors(
    cfg: &crate::config::Config,
    dir: &Path,
    keys: &crate::audit::verify::PublicKeys,
) -> anyhow::Result<crate::audit::anchor::AnchorCheck> {
    let e = cfg.access.etcd.as_ref().context("--anchors etcd needs [access.etcd] in the config")?;
    let node = e.node_name();
    let anchors = crate::etcd::block_on(async {
        let etcd = crate::etcd::Etcd::connect(cfg).await?;
        crate::audit::anchor::load(&etcd, &node).await
    })??;
    crate::audit::anchor::check(dir, keys, &anchors).map_err(|e| anyhow::anyhow!("reading the audit log in {}: {e}", dir.display()))
}

/// `verify --against FILE`: the local log next to an exported copy.
fn compare_with_copy(
    dir: &Path,
    copy: &Path,
    keys: &crate::audit::verify::PublicKeys,
) -> anyhow::Result<crate::audit::against::Comparison> {
    use crate::audit::against::{ExportedCopy, compare};
    let exported = ExportedCopy::load(copy, keys)?;
    compare(dir, &exported).map_err(|e| anyhow::anyhow!("reading the audit log in {}: {e}", dir.display()))
}

// -------------------------------------------------------------------------------- replay

/// Slowest `replay --speed`: a thousandth of real time.
const MIN_REPLAY_SPEED: f64 = 0.001;

fn replay(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let speed: Option<f64> = match a.speed.trim() {
        "max" => None,
        s => Some(
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= MIN_REPLAY_SPEED)
                .with_context(|| format!("--speed {s:?}: expected a number ≥ {MIN_REPLAY_SPEED} or `max`"))?,
        ),
    };
    let (cfg, dir) = load(&a.config)?;
    let reader = Reader::open(&dir).with_context(|| format!("reading the audit log in {}", dir.display()))?;
    let mut links = link_check(&cfg)?;

    let mut found = false;
    let (mut user, mut db): (Option<String>, Option<String>) = (None, None);
    let mut statements: Vec<Record> = Vec::new();
    // A multi-statement simple query has one result per command, all naming its statement.
    let mut results: HashMap<u64, Vec<Record>> = HashMap::new();
    for e in reader {
        let rec = match e {
            Ok(e) => {
                if let Some(p) = links.next(&e.line, &e.record) {
                    warn_broken(p);
                }
                e.record
            }
            Err(ReadError::Io { path, source }) => {
                return Err(source).with_context(|| format!("reading {}", path.display()));
            }
            Err(e) => {
                eprintln!("pgward: warning: {e}");
                continue;
            }
        };
        if rec.session.as_deref() != Some(a.session.as_str()) {
            continue;
        }
        found = true;
        if user.is_none() {
            user = rec.user.as_deref().map(str::to_string);
        }
        if db.is_none() {
            db = rec.database.as_deref().map(str::to_string);
        }
        match rec.kind {
            Kind::Statement => statements.push(rec),
            Kind::Result => {
                if let Some(s) = rec.statement_seq {
                    results.entry(s).or_default().push(rec);
                }
            }
            _ => {}
        }
    }
    if !found {
        eprintln!("pgward: session {:?} not found in the audit log", a.session);
        return Ok(ExitCode::from(1));
    }

    let mut out = io::stdout().lock();
    let t0 = statements.first().and_then(|s| parse_ts(&s.ts));
    let mut prev = t0;
    for st in &statements {
        let t = parse_ts(&st.ts);
        if let (Some(speed), Some(p), Some(t)) = (speed, prev, t) {
            let gap = (t - p).to_std().unwrap_or(Duration::ZERO);
            let wait = gap.as_secs_f64() / speed;
            if wait > 0.0 {
                out.flush()?;
                // A gap the log's timestamps make absurdly long is not worth a panic.
                std::thread::sleep(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX));
            }
        }
        if t.is_some() {
            prev = t;
        }
        let offset = match (t0, t) {
            (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1e6,
            _ => 0.0,
        };
        let who = st.user.as_deref().or(user.as_deref()).unwrap_or("?");
        let on = st.database.as_deref().or(db.as_deref()).unwrap_or("?");
        let mut sql = one_line(st.sql.as_deref().unwrap_or(""));
        if let Some(p) = &st.params {
            sql.push_str(&format!(" [{}]", fmt_params(p)));
        }
        let outcome = match results.get(&st.seq) {
            Some(rs) if !rs.is_empty() => rs.iter().map(fmt_outcome).collect::<Vec<_>>().join("; "),
            _ if st.decision.as_deref() == Some("deny") => {
                format!("DENIED by rule {}", st.rule.as_deref().unwrap_or("?"))
            }
            _ => "(no result recorded)".to_string(),
        };
        writeln!(out, "{}", one_line(&format!("[+{offset:.3}s] {who}@{on}: {sql} -> {outcome}")))?;
    }
    out.flush()?;
    if let Some(p) = links.broken() {
        eprintln!("pgward: the replay above comes from a log whose chain breaks at {p}");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `SELECT 3 (3 rows, 1.2 ms)` or `ERROR 42501 message`
fn fmt_outcome(r: &Record) -> String {
    if let Some(state) = &r.sqlstate {
        return format!("ERROR {state} {}", one_line(r.error.as_deref().unwrap_or(""))).trim_end().to_string();
    }
    let mut parts = Vec::new();
    if let Some(n) = r.rows {
        parts.push(if n == 1 { "1 row".to_string() } else { format!("{n} rows") });
    }
    if let Some(us) = r.duration_us {
        parts.push(fmt_duration_us(us));
    }
    let tag = r.tag.as_deref().unwrap_or("OK");
    if parts.is_empty() { tag.to_string() } else { format!("{tag} ({})", parts.join(", ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_format() {
        let r = Record {
            seq: 42,
            ts: "2026-11-29T14:00:00.123456Z".into(),
            kind: Kind::Statement,
            user: Some("alice".into()),
            session: Some("ab12".into()),
            database: Some("app".into()),
            sql: Some("SELECT\r\n    1,\t2".into()),
            ..Record::default()
        };
        let mut s = String::new();
        format_human(&mut s, &r);
        assert_eq!(s, "2026-11-29T14:00:00.123456Z  #42 statement  alice  sess=ab12  db=app  SELECT 1, 2");
        let r = Record {
            seq: 43,
            ts: "t".into(),
            kind: Kind::Result,
            statement_seq: Some(42),
            tag: Some("SELECT 3".into()),
            rows: Some(3),
            duration_us: Some(1234),
            ..Record::default()
        };
        s.clear();
        format_human(&mut s, &r);
        assert_eq!(s, "t  #43 result  -> #42  SELECT 3  rows=3  1.2 ms");
        assert_eq!(fmt_outcome(&r), "SELECT 3 (3 rows, 1.2 ms)");
        let e = Record { sqlstate: Some("42501".into()), error: Some("denied\nby rule".into()), ..Record::default() };
        assert_eq!(fmt_outcome(&e), "ERROR 42501 denied by rule");
        // Client-chosen texts (a failed login's startup user and database) cannot break the
        // line, move the cursor or reorder what the terminal shows.
        let r = Record {
            seq: 44,
            ts: "t".into(),
            kind: Kind::LoginFailed,
            user: Some("m\r\x1b[2K\nt  #1 login  alice".into()),
            database: Some("app\u{202e}live".into()),
            ..Record::default()
        };
        s.clear();
        format_human(&mut s, &r);
        assert_eq!(s, "t  #44 login_failed  m  [2K t  #1 login  alice  db=app\\u{202e}live");
    }
}
