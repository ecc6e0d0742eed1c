//! The decision for a session: whether its token (and the grant it runs under) still holds,
//! checked before every statement.

use std::time::Instant;

use super::rfc3339;
use super::state::{Access, AccessRequest};
use crate::auth::Identity;

/// The grant a session runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGrant {
    pub id: String,
    pub role: String,
    pub expires_at: i64,
}

impl SessionGrant {
    pub fn from_request(r: &AccessRequest) -> Option<SessionGrant> {
        Some(SessionGrant { id: r.id.clone(), role: r.role.clone(), expires_at: r.expires_at? })
    }
}

/// Why a session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pgward: your token has expired; log in again with a fresh token")]
    TokenExpired,
    #[error("pgward: your token has been revoked ({0}); log in again with a fresh token")]
    TokenRevoked(String),
    #[error("pgward: access grant {id} (role {role}) expired at {}; the session is closed", rfc3339(*.at))]
    GrantExpired { id: String, role: String, at: i64 },
    #[error("pgward: access grant {id} (role {role}) was revoked; the session is closed")]
    GrantRevoked { id: String, role: String },
}

impl Refusal {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Refusal::TokenExpired | Refusal::TokenRevoked(_) => crate::sqlstate::INVALID_PASSWORD,
            Refusal::GrantExpired { .. } | Refusal::GrantRevoked { .. } => crate::sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        }
    }
}

/// Per-session re-check of the token (and grant) before each statement.
#[derive(Debug, Clone)]
pub struct SessionCheck {
    seen: u64,
    /// `auth.leeway_secs`: a token is expired for a session exactly when it would be refused
    /// at login.
    leeway: i64,
    pub grant: Option<SessionGrant>,
    /// The wall clock at login and the monotonic instant it was read at: time a session has
    /// run cannot be taken back by stepping the wall clock backwards (NTP, an operator, a
    /// restored VM), so an expired token or grant stays expired.
    login: (i64, Instant),
}

impl SessionCheck {
    /// `generation` must be read *before* the snapshot the login was checked against; `now`
    /// is the wall clock the login was checked with.
    pub fn new(generation: u64, grant: Option<SessionGrant>, leeway_secs: u64, now: i64) -> SessionCheck {
        Self::started_at(generation, grant, leeway_secs, now, Instant::now())
    }

    /// As [`Self::new`], for a login checked at wall time `now` at monotonic instant `at`.
    pub fn started_at(generation: u64, grant: Option<SessionGrant>, leeway_secs: u64, now: i64, at: Instant) -> SessionCheck {
        SessionCheck { seen: generation, leeway: i64::try_from(leeway_secs).unwrap_or(i64::MAX), grant, login: (now, at) }
    }

    /// The later of the wall clock `now` and the login's wall time plus the monotonic time
    /// since.
    fn effective_now(&self, now: i64) -> i64 {
        let ran = i64::try_from(self.login.1.elapsed().as_secs()).unwrap_or(i64::MAX);
        now.max(self.login.0.saturating_add(ran))
    }

    pub fn check(&mut self, access: &Access, identity: &Identity, now: i64) -> Result<(), Refusal> {
        let now = self.effective_now(now);
        if now > identity.expires_at.saturating_add(self.leeway) {
            return Err(Refusal::TokenExpired);
        }
        if let Some(g) = &self.grant
            && now >= g.expires_at
        {
            return Err(Refusal::GrantExpired { id: g.id.clone(), role: g.role.clone(), at: g.expires_at });
        }
        let generation = access.generation();
        if generation != self.seen {
            let snap = access.snapshot();
            if let Some(why) = snap.revoked_in_state(identity) {
                return Err(Refusal::TokenRevoked(why));
            }
            if let Some(g) = &self.grant
                && snap.request(&g.id).is_none_or(|r| r.revoked_at.is_some())
            {
                return Err(Refusal::GrantRevoked { id: g.id.clone(), role: g.role.clone() });
            }
            self.seen = generation;
        }
        Ok(())
    }
}
