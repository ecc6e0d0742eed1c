//! The CLI side: validated writes of revocations and access events ([`Store`]), to whichever
//! backend `[access] backend` names — this host's files ([`FileStore`]) or the fleet's etcd
//! ([`EtcdStore`]). The checks that do not depend on where the state lives are here.

use std::path::PathBuf;
use std::time::Duration;

use super::etcd_store::EtcdStore;
use super::file_store::FileStore;
use super::state::{AccessEvent, AccessRequest, Revocation, Rules, State};
use super::{AccessError, euid, new_id, now_unix};
use crate::auth::Identity;
use crate::config::{AccessBackend, Config};

/// The state directory (`[access] state_dir`, relative to the config file): the state files
/// of the file backend, and `serve`'s cursor (how far it audited) for either backend.
pub fn state_dir(cfg: &Config) -> PathBuf {
    cfg.resolve(&cfg.access.state_dir)
}

/// Where the access state is written.
enum Backend {
    File(FileStore),
    Etcd(Box<EtcdStore>),
}

/// Validated appends of revocations and access events.
pub struct Store {
    rules: Rules,
    backend: Backend,
}

impl Store {
    pub fn open(cfg: &Config) -> Result<Store, AccessError> {
        let backend = match cfg.access.backend {
            AccessBackend::File => Backend::File(FileStore::open(state_dir(cfg))?),
            AccessBackend::Etcd => Backend::Etcd(Box::new(EtcdStore::open(cfg)?)),
        };
        Ok(Store { rules: Rules::from_config(cfg), backend })
    }

    /// A file store in `dir` (unit tests).
    #[cfg(test)]
    pub(super) fn in_dir(dir: PathBuf, rules: Rules) -> Store {
        Store { rules, backend: Backend::File(FileStore { dir }) }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Revoke token `jti` or every token of `user` issued until now.
    pub fn revoke(
        &self,
        jti: Option<&str>,
        user: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Revocation, AccessError> {
        let r = Revocation {
            id: new_id("rev"),
            at: now_unix(),
            jti: jti.map(str::trim).map(str::to_owned),
            user: user.map(str::trim).map(str::to_owned),
            reason: reason.map(str::to_owned).filter(|r| !r.trim().is_empty()),
            by_uid: euid(),
        };
        if !r.valid() {
            return Err(AccessError::Invalid("give exactly one of --jti and --user, not empty".into()));
        }
        match &self.backend {
            Backend::File(f) => f.append_revocation(&r)?,
            Backend::Etcd(e) => e.append_revocation(&r)?,
        }
        Ok(r)
    }

    /// Everything revoked and requested, as `serve` would see it.
    pub fn load(&self) -> Result<State, AccessError> {
        match &self.backend {
            Backend::File(f) => f.load(&self.rules),
            Backend::Etcd(e) => e.load(&self.rules),
        }
    }

    /// Validate `make(state)`'s event against everything before it and append it.
    fn append_event(
        &self,
        make: impl Fn(&State) -> Result<AccessEvent, AccessError>,
    ) -> Result<AccessRequest, AccessError> {
        let (state, ev) = match &self.backend {
            Backend::File(f) => f.append_event(&self.rules, make)?,
            Backend::Etcd(e) => e.append_event(&self.rules, make)?,
        };
        state.request(ev.id()).cloned().ok_or_else(|| AccessError::Invalid("request vanished".into()))
    }

    pub fn request(&self, user: &str, role: &str, ttl: Duration, reason: &str) -> Result<AccessRequest, AccessError> {
        let (user, role, reason) = (user.trim(), role.trim(), reason.trim());
        if user.is_empty() || role.is_empty() {
            return Err(AccessError::Invalid("--user and --role must not be empty".into()));
        }
        if reason.is_empty() {
            return Err(AccessError::Invalid("--reason must say why the access is needed".into()));
        }
        if self.rules.grantable_roles.is_empty() {
            return Err(AccessError::Refused(
                "just-in-time access is not configured: [access] grantable_roles is empty".into(),
            ));
        }
        let id = new_id("jit");
        let at = now_unix();
        self.append_event(|_| {
            Ok(AccessEvent::Request {
                id: id.clone(),
                at,
                user: user.to_owned(),
                role: role.to_owned(),
                ttl_secs: ttl.as_secs(),
                reason: reason.to_owned(),
                by_uid: euid(),
            })
        })
    }

    /// Approve request `id` as `approver` (an identity from a verified token).
    pub fn approve(&self, id: &str, approver: &Identity) -> Result<AccessRequest, AccessError> {
        let revoked = self.load()?.token_revoked(approver);
        if let Some(why) = revoked {
            return Err(AccessError::Refused(format!("the approver's token is revoked: {why}")));
        }
        self.append_event(|state| {
            let Some(req) = state.request(id) else {
                return Err(AccessError::Refused(format!("no access request {id}")));
            };
            let at = now_unix();
            Ok(AccessEvent::Approve {
                id: id.to_owned(),
                at,
                approver: approver.user.clone(),
                approver_jti: approver.jti.clone(),
                approver_groups: approver.groups.clone(),
                expires_at: at.saturating_add(req.ttl_secs as i64),
            })
        })
    }

    /// Withdraw a pending request or an active grant.
    pub fn revoke_grant(&self, id: &str, reason: Option<&str>) -> Result<AccessRequest, AccessError> {
        self.append_event(|state| {
            if state.request(id).is_none() {
                return Err(AccessError::Refused(format!("no access request {id}")));
            }
            Ok(AccessEvent::Revoke {
                id: id.to_owned(),
                at: now_unix(),
                reason: reason.map(str::to_owned).filter(|r| !r.trim().is_empty()),
                by_uid: euid(),
            })
        })
    }
}
