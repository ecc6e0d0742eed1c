//! The in-memory state: revocations and access requests as read from the state files (the
//! events, [`Revocation`] and [`AccessEvent`], are their lines), the rules they are checked
//! against, and the snapshot sessions read ([`Access`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::freshness::Freshness;
use super::rfc3339;
use crate::audit::{Kind, Record};
use crate::auth::Identity;
use crate::config::Config;

/// One line of `revoked.jsonl`. Exactly one of `jti` / `user` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub id: String,
    /// When (unix seconds); a user revocation kills that user's tokens with `iat <= at`.
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Effective uid of the process that wrote the line.
    #[serde(default)]
    pub by_uid: u32,
}

impl Revocation {
    pub(super) fn valid(&self) -> bool {
        match (&self.jti, &self.user) {
            (Some(j), None) => !j.is_empty(),
            (None, Some(u)) => !u.is_empty(),
            _ => false,
        }
    }

    /// The audit record `serve` writes for it.
    pub fn audit_record(&self) -> Record {
        Record {
            kind: Kind::Revoke,
            user: self.user.as_deref().map(Into::into),
            jti: self.jti.clone(),
            meta: Some(serde_json::json!({
                "id": self.id,
                "scope": if self.jti.is_some() { "jti" } else { "user" },
                "at": rfc3339(self.at),
                "reason": self.reason,
                "by_uid": self.by_uid,
            })),
            ..Default::default()
        }
    }
}

/// One line of `access.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AccessEvent {
    Request { id: String, at: i64, user: String, role: String, ttl_secs: u64, reason: String, by_uid: u32 },
    /// The approver's token was verified by the CLI; its subject, id and groups are kept (never
    /// the token).
    Approve { id: String, at: i64, approver: String, approver_jti: String, approver_groups: Vec<String>, expires_at: i64 },
    /// A grant (or pending request) withdrawn before it expired.
    Revoke { id: String, at: i64, reason: Option<String>, by_uid: u32 },
}

impl AccessEvent {
    pub fn id(&self) -> &str {
        match self {
            AccessEvent::Request { id, .. } | AccessEvent::Approve { id, .. } | AccessEvent::Revoke { id, .. } => id,
        }
    }
}

/// What the config allows for JIT access (`[access]`).
#[derive(Debug, Clone)]
pub struct Rules {
    pub grantable_roles: Vec<String>,
    pub approver_groups: Vec<String>,
    pub max_ttl_secs: u64,
    pub request_ttl_secs: u64,
}

impl Rules {
    pub fn from_config(cfg: &Config) -> Rules {
        Rules {
            grantable_roles: cfg.access.grantable_roles.clone(),
            approver_groups: cfg.access.approver_groups.clone(),
            max_ttl_secs: cfg.access.max_ttl.as_secs(),
            request_ttl_secs: cfg.access.request_ttl.as_secs(),
        }
    }
}

/// A JIT access request and what happened to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccessRequest {
    pub id: String,
    pub user: String,
    pub role: String,
    pub ttl_secs: u64,
    pub reason: String,
    pub requested_at: i64,
    pub approver: Option<String>,
    pub approved_at: Option<i64>,
    /// When the grant ends (set on approval).
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for an approver.
    Pending,
    /// Approved and not yet expired: the user's new sessions get the role.
    Active,
    /// Approved, and the grant's time is up.
    Expired,
    /// Withdrawn (`pgward access revoke`).
    Revoked,
    /// Never approved within `[access] request_ttl`.
    Lapsed,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Active => "active",
            RequestState::Expired => "expired",
            RequestState::Revoked => "revoked",
            RequestState::Lapsed => "lapsed",
        }
    }
}

impl AccessRequest {
    pub fn state(&self, now: i64, request_ttl_secs: u64) -> RequestState {
        if self.revoked_at.is_some() {
            return RequestState::Revoked;
        }
        match self.expires_at {
            Some(e) if now >= e => RequestState::Expired,
            Some(_) => RequestState::Active,
            None if now >= self.requested_at.saturating_add(request_ttl_secs as i64) => RequestState::Lapsed,
            None => RequestState::Pending,
        }
    }
}

/// Revocations and requests as read from the state files.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// With a remote backend: how current this state is (new logins are refused once it is
    /// older than `[access] max_staleness`).
    freshness: Option<Arc<Freshness>>,
    revoked_jti: HashMap<String, i64>,
    /// user → latest user revocation time.
    revoked_user: HashMap<String, i64>,
    requests: Vec<AccessRequest>,
    index: HashMap<String, usize>,
}

impl State {
    pub fn apply_revocation(&mut self, r: &Revocation) {
        if let Some(j) = &r.jti {
            self.revoked_jti.entry(j.clone()).or_insert(r.at);
        }
        if let Some(u) = &r.user {
            let e = self.revoked_user.entry(u.clone()).or_insert(r.at);
            *e = (*e).max(r.at);
        }
    }

    /// Check `ev` against the rules and the current state; apply it if valid. `Err` says why
    /// it is not (the event is then ignored).
    pub fn apply_access(&mut self, ev: &AccessEvent, rules: &Rules) -> Result<(), String> {
        match ev {
            AccessEvent::Request { id, at, user, role, ttl_secs, reason, .. } => {
                if self.index.contains_key(id) {
                    return Err(format!("duplicate request id {id}"));
                }
                if user.is_empty() {
                    return Err("empty user".into());
                }
                if !rules.grantable_roles.iter().any(|r| r == role) {
                    return Err(format!(
                        "role {role:?} is not grantable ([access] grantable_roles = {:?})",
                        rules.grantable_roles
                    ));
                }
                if *ttl_secs == 0 || *ttl_secs > rules.max_ttl_secs {
                    return Err(format!(
                        "ttl {} is not between 1s and [access] max_ttl = {}",
                        humantime::format_duration(Duration::from_secs(*ttl_secs)),
                        humantime::format_duration(Duration::from_secs(rules.max_ttl_secs))
                    ));
                }
                self.index.insert(id.clone(), self.requests.len());
                self.requests.push(AccessRequest {
                    id: id.clone(),
                    user: user.clone(),
                    role: role.clone(),
                    ttl_secs: *ttl_secs,
                    reason: reason.clone(),
                    requested_at: *at,
                    approver: None,
                    approved_at: None,
                    expires_at: None,
                    revoked_at: None,
                    revoke_reason: None,
                });
                Ok(())
            }
            AccessEvent::Approve { id, at, approver, approver_groups, expires_at, .. } => {
                let Some(&i) = self.index.get(id) else {
                    return Err(format!("no access request {id}"));
                };
                let req = &self.requests[i];
                match req.state(*at, rules.request_ttl_secs) {
                    RequestState::Pending => {}
                    s => return Err(format!("request {id} is {} (only a pending request can be approved)", s.as_str())),
                }
                if approver.is_empty() || *approver == req.user {
                    return Err(format!("{approver:?} cannot approve their own request"));
                }
                if !approver_groups.iter().any(|g| rules.approver_groups.contains(g)) {
                    return Err(format!(
                        "{approver:?} is in none of the approver groups ([access] approver_groups = {:?})",
                        rules.approver_groups
                    ));
                }
                if !rules.grantable_roles.contains(&req.role) {
                    return Err(format!("role {:?} is no longer grantable", req.role));
                }
                let end = at.saturating_add(req.ttl_secs.min(rules.max_ttl_secs) as i64).min(*expires_at);
                let req = &mut self.requests[i];
                req.approver = Some(approver.clone());
                req.approved_at = Some(*at);
                req.expires_at = Some(end);
                Ok(())
            }
            AccessEvent::Revoke { id, at, reason, .. } => {
                let Some(&i) = self.index.get(id) else {
                    return Err(format!("no access request {id}"));
                };
                let req = &mut self.requests[i];
                match req.state(*at, rules.request_ttl_secs) {
                    RequestState::Pending | RequestState::Active => {}
                    s => return Err(format!("request {id} is already {}", s.as_str())),
                }
                req.revoked_at = Some(*at);
                req.revoke_reason = reason.clone();
                Ok(())
            }
        }
    }

    /// Why `identity`'s token may not log in: it is revoked, or (remote backend) the state is
    /// too stale to tell. `None`: it may.
    pub fn token_revoked(&self, identity: &Identity) -> Option<String> {
        if let Some(why) = self.freshness.as_ref().and_then(|f| f.stale()) {
            return Some(why);
        }
        self.revoked_in_state(identity)
    }

    /// Why `identity`'s token is revoked in this state, if it is (whatever its age: a session
    /// already logged in keeps running on the last known state).
    pub fn revoked_in_state(&self, identity: &Identity) -> Option<String> {
        if let Some(at) = self.revoked_jti.get(&identity.jti) {
            return Some(format!("token {} was revoked at {}", identity.jti, rfc3339(*at)));
        }
        match self.revoked_user.get(&identity.user) {
            Some(at) if identity.issued_at <= *at => Some(format!(
                "tokens of user {:?} issued at or before {} were revoked",
                identity.user,
                rfc3339(*at)
            )),
            _ => None,
        }
    }

    /// The grant a new session of `user` gets: the most recently approved active one.
    pub fn active_grant(&self, user: &str, now: i64) -> Option<&AccessRequest> {
        self.requests
            .iter()
            .filter(|r| r.user == user && r.revoked_at.is_none() && r.expires_at.is_some_and(|e| now < e))
            .max_by_key(|r| r.approved_at)
    }

    pub fn request(&self, id: &str) -> Option<&AccessRequest> {
        self.index.get(id).map(|&i| &self.requests[i])
    }

    /// Every request, in the order they were made.
    pub fn requests(&self) -> &[AccessRequest] {
        &self.requests
    }

    pub(super) fn set_freshness(&mut self, f: Arc<Freshness>) {
        self.freshness = Some(f);
    }

    pub(super) fn clear_revocations(&mut self) {
        self.revoked_jti.clear();
        self.revoked_user.clear();
    }

    pub(super) fn clear_requests(&mut self) {
        self.requests.clear();
        self.index.clear();
    }
}

/// The snapshot sessions read. Writers (the watcher) replace the `Arc` and then bump the
/// generation; a session that sees a new generation re-checks against the new snapshot.
#[derive(Debug)]
pub struct Access {
    generation: AtomicU64,
    state: RwLock<Arc<State>>,
}

impl Access {
    pub fn new(state: State) -> Access {
        Access { generation: AtomicU64::new(1), state: RwLock::new(Arc::new(state)) }
    }

    /// Nothing revoked, nothing granted.
    pub fn empty() -> Access {
        Access::new(State::default())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn publish(&self, s: State) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
        self.generation.fetch_add(1, Ordering::Release);
    }
}
