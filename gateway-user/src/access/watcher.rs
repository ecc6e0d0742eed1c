//! `serve`'s side: reading the access state from its backend ([`Source`]: the state files,
//! or etcd), publishing snapshots, and auditing every event in this gateway's log.

use std::collections::{HashSet, VecDeque};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::file_store::ensure_dir;
use super::source::{Delta, Pos, Source};
use super::state::{Access, AccessEvent, AccessRequest, Rules, State};
use super::store::state_dir;
use super::{AccessError, POLL_INTERVAL, now_unix, rfc3339};
use crate::audit::{AuditHandle, Kind, Record};
use crate::config::Config;

/// How far `serve` has audited each stream of the backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cursor {
    #[serde(default)]
    revoked: Pos,
    #[serde(default)]
    access: Pos,
    /// Grants whose expiry has been audited.
    #[serde(default)]
    expired: Vec<String>,
}

/// `serve`'s watcher: reads the backend, publishes snapshots, writes audit records.
pub struct Watcher {
    access: Arc<Access>,
    audit: AuditHandle,
    rules: Rules,
    dir: PathBuf,
    source: Source,
    state: State,
    /// Where each stream has been read up to.
    revoked_pos: Pos,
    events_pos: Pos,
    cursor: Cursor,
    cursor_dirty: bool,
    /// Revocations read (and enforced) but not yet audited: (position after it, record).
    unaudited_revocations: VecDeque<(u64, Record)>,
    /// Access events read but not yet audited (they take effect once audited).
    unaudited_events: VecDeque<(u64, AccessEvent)>,
    expired: HashSet<String>,
}

impl Watcher {
    /// Read the backend (creating the state directory if needed) and build the first
    /// snapshot: every revocation, and the access events up to where the previous run
    /// audited them. The rest is audited (and applied) by the first [`Watcher::tick`].
    /// A directory that cannot be created is not fatal (the CLI creates it when it first
    /// writes); state files that exist but cannot be read are (revocations would be missed).
    /// etcd that cannot be reached is not: the gateway starts with nothing known, and refuses
    /// logins until the first read succeeds (see `Freshness`).
    pub async fn load(cfg: &Config, audit: AuditHandle) -> Result<(Watcher, Arc<Access>), AccessError> {
        let dir = state_dir(cfg);
        if let Err(e) = ensure_dir(&dir) {
            tracing::warn!(error = %e, "cannot create the access state directory; watching for it");
        }
        let (source, freshness) = Source::new(cfg, &dir);
        let cursor_path = dir.join(source.cursor_file());
        let cursor: Cursor = match std::fs::read(&cursor_path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %cursor_path.display(), error = %e, "unreadable cursor; auditing the access state from the start");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        };
        let mut state = State::default();
        if let Some(f) = freshness {
            state.set_freshness(f);
        }
        let access = Arc::new(Access::new(state.clone()));
        let mut w = Watcher {
            access: access.clone(),
            audit,
            rules: Rules::from_config(cfg),
            source,
            dir,
            state,
            revoked_pos: Pos::default(),
            events_pos: Pos::default(),
            expired: cursor.expired.iter().cloned().collect(),
            cursor,
            cursor_dirty: false,
            unaudited_revocations: VecDeque::new(),
            unaudited_events: VecDeque::new(),
        };
        match w.source.poll().await {
            Ok(d) => {
                w.apply_delta(d);
            }
            Err(e) if matches!(w.source, Source::File(_)) => return Err(AccessError::io(&w.dir, std::io::Error::other(e))),
            Err(e) => tracing::error!(error = %e, "cannot read the access state from etcd; new logins are refused until it answers"),
        }
        access.publish(w.state.clone());
        Ok((w, access))
    }

    /// Take in what the backend read. Revocations apply at once; access events up to the
    /// audited cursor apply at once (audited by an earlier run), later ones wait for their
    /// record.
    fn apply_delta(&mut self, d: Delta) -> bool {
        let mut changed = false;
        if let Some(b) = d.revoked {
            if b.reset {
                self.state.clear_revocations();
                self.unaudited_revocations.clear();
                changed = true;
            }
            let audited = if self.cursor.revoked.ino == b.pos.ino { self.cursor.revoked.offset } else { 0 };
            for (r, end) in b.items {
                if !r.valid() {
                    tracing::warn!(id = %r.id, "revocation without exactly one of jti/user; ignored");
                    continue;
                }
                self.state.apply_revocation(&r);
                changed = true;
                if end > audited {
                    self.unaudited_revocations.push_back((end, r.audit_record()));
                }
            }
            self.revoked_pos = b.pos;
            if self.unaudited_revocations.is_empty() && self.cursor.revoked != self.revoked_pos {
                self.cursor.revoked = self.revoked_pos;
                self.cursor_dirty = true;
            }
        }
        if let Some(b) = d.events {
            if b.reset {
                self.state.clear_requests();
                self.unaudited_events.clear();
                changed = true;
            }
            let audited = if self.cursor.access.ino == b.pos.ino { self.cursor.access.offset } else { 0 };
            for (ev, end) in b.items {
                if end > audited {
                    self.unaudited_events.push_back((end, ev));
                } else {
                    let _ = self.state.apply_access(&ev, &self.rules);
                    changed = true;
                }
            }
            self.events_pos = b.pos;
            if self.unaudited_events.is_empty() && self.cursor.access != self.events_pos {
                self.cursor.access = self.events_pos;
                self.cursor_dirty = true;
            }
        }
        changed
    }

    /// The audit record for an access event (and whether it was valid).
    fn event_record(&self, ev: &AccessEvent, verdict: &Result<(), String>, state: &State) -> Record {
        let req = state.request(ev.id());
        let (kind, user, jti, meta) = match ev {
            AccessEvent::Request { id, user, role, ttl_secs, reason, by_uid, .. } => (
                Kind::AccessRequest,
                Some(user.clone()),
                None,
                serde_json::json!({
                    "id": id, "role": role,
                    "ttl": humantime::format_duration(Duration::from_secs(*ttl_secs)).to_string(),
                    "reason": reason, "by_uid": by_uid,
                }),
            ),
            AccessEvent::Approve { id, approver, approver_jti, approver_groups, .. } => (
                Kind::AccessApprove,
                req.map(|r| r.user.clone()),
                Some(approver_jti.clone()),
                serde_json::json!({
                    "id": id, "role": req.map(|r| r.role.clone()),
                    "approver": approver, "approver_groups": approver_groups,
                    "expires_at": req.and_then(|r| r.expires_at).map(rfc3339),
                }),
            ),
            AccessEvent::Revoke { id, reason, by_uid, .. } => (
                Kind::AccessRevoke,
                req.map(|r| r.user.clone()),
                None,
                serde_json::json!({ "id": id, "role": req.map(|r| r.role.clone()), "reason": reason, "by_uid": by_uid }),
            ),
        };
        Record {
            kind,
            user: user.map(Into::into),
            jti,
            meta: Some(meta),
            error: verdict.as_ref().err().map(|e| format!("ignored: {e}")),
            ..Default::default()
        }
    }

    /// One round: read the backend, enforce revocations, audit and apply access events, audit
    /// grant expiries, publish, persist the cursor.
    pub async fn tick(&mut self) {
        let changed = match self.source.poll().await {
            Ok(d) => self.apply_delta(d),
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "cannot read the access state");
                false
            }
        };
        // Revocations are enforced before they are audited: they only take rights away.
        if changed {
            self.access.publish(self.state.clone());
        }
        self.audit_revocations().await;
        // Access events take effect only once their record is durable.
        if self.audit_events().await {
            self.access.publish(self.state.clone());
        }
        self.audit_expiries().await;
        if self.cursor_dirty {
            match self.save_cursor() {
                Ok(()) => self.cursor_dirty = false,
                Err(e) => tracing::warn!(error = %e, "cannot save the access cursor"),
            }
        }
    }

    /// Audit the revocations read (and already enforced), in order, moving the cursor past
    /// each; stops at the first that cannot be audited (retried next round).
    async fn audit_revocations(&mut self) {
        while let Some((end, rec)) = self.unaudited_revocations.front().cloned() {
            if let Err(e) = self.audit.append_durable(rec).await {
                tracing::error!(error = %e, "cannot audit a revocation; will retry");
                break;
            }
            self.unaudited_revocations.pop_front();
            self.cursor.revoked = Pos { ino: self.revoked_pos.ino, offset: end };
            self.cursor_dirty = true;
        }
        if self.unaudited_revocations.is_empty() && self.cursor.revoked != self.revoked_pos {
            self.cursor.revoked = self.revoked_pos;
            self.cursor_dirty = true;
        }
    }

    /// Audit the access events read, in order, and apply each valid one once its record is
    /// durable; stops at the first that cannot be audited (retried next round). Returns
    /// whether the state changed.
    async fn audit_events(&mut self) -> bool {
        let mut changed = false;
        while let Some((end, ev)) = self.unaudited_events.front().cloned() {
            let mut next = self.state.clone();
            let verdict = next.apply_access(&ev, &self.rules);
            let rec = self.event_record(&ev, &verdict, &next);
            if let Err(e) = self.audit.append_durable(rec).await {
                tracing::error!(error = %e, "cannot audit an access event; will retry");
                break;
            }
            match &verdict {
                Ok(()) => tracing::info!(id = ev.id(), "access event applied"),
                Err(why) => tracing::warn!(id = ev.id(), %why, "access event ignored"),
            }
            if verdict.is_ok() {
                self.state = next;
                changed = true;
            }
            self.unaudited_events.pop_front();
            self.cursor.access = Pos { ino: self.events_pos.ino, offset: end };
            self.cursor_dirty = true;
        }
        if self.unaudited_events.is_empty() && self.cursor.access != self.events_pos {
            self.cursor.access = self.events_pos;
            self.cursor_dirty = true;
        }
        changed
    }

    /// One `grant_expired` record for each grant whose time ran out and was not audited yet.
    async fn audit_expiries(&mut self) {
        let now = now_unix();
        let due: Vec<AccessRequest> = self
            .state
            .requests()
            .iter()
            .filter(|r| r.revoked_at.is_none() && r.expires_at.is_some_and(|e| e <= now) && !self.expired.contains(&r.id))
            .cloned()
            .collect();
        for r in due {
            let rec = Record {
                kind: Kind::GrantExpired,
                user: Some(r.user.as_str().into()),
                meta: Some(serde_json::json!({
                    "id": r.id, "role": r.role, "expires_at": r.expires_at.map(rfc3339),
                })),
                ..Default::default()
            };
            if let Err(e) = self.audit.append_durable(rec).await {
                tracing::error!(error = %e, "cannot audit a grant expiry; will retry");
                break;
            }
            tracing::info!(id = %r.id, user = %r.user, role = %r.role, "access grant expired");
            self.expired.insert(r.id.clone());
            self.cursor.expired.push(r.id);
            self.cursor_dirty = true;
        }
    }

    fn save_cursor(&self) -> std::io::Result<()> {
        let name = self.source.cursor_file();
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let bytes = serde_json::to_vec(&self.cursor).map_err(std::io::Error::other)?;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Poll (and, with etcd, watch) forever, until the task is dropped.
    pub async fn run(mut self) {
        let mut iv = tokio::time::interval(POLL_INTERVAL);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.source.next(&mut iv).await;
            self.tick().await;
        }
    }
}
