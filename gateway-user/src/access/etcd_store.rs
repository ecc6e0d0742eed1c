//! The etcd backend's CLI side: revocations and access events written to etcd (key layout in
//! `crate::etcd`), so an operator on any host revokes or approves for the whole fleet.
//!
//! An access event is validated against every event before it, as with the file backend's
//! lock: the writer reads the events and `<prefix>/access-seq` at one revision, checks its
//! event, and writes it as the next seq only if `access-seq` has not moved since
//! (compare-and-swap); otherwise it reads again.

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use serde::de::DeserializeOwned;

use super::AccessError;
use super::state::{AccessEvent, Revocation, Rules, State};
use crate::config::Config;
use crate::etcd::{Etcd, EtcdError};

/// How often a write is retried when other writers keep winning the compare-and-swap.
const MAX_CAS_ATTEMPTS: usize = 16;

impl From<EtcdError> for AccessError {
    fn from(e: EtcdError) -> AccessError {
        AccessError::Invalid(e.to_string())
    }
}

/// The value of `kv` as `T`; None (with a warning) when it does not parse.
pub(super) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    match serde_json::from_slice(kv.value()) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable value in etcd; ignored");
            None
        }
    }
}

/// Keys of a prefix in the order they were created.
pub(super) fn by_creation() -> GetOptions {
    GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend)
}

/// The CLI's connection (and the runtime it lives on: the CLI is synchronous).
pub(super) struct EtcdStore {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
}

impl EtcdStore {
    pub(super) fn open(cfg: &Config) -> Result<EtcdStore, AccessError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AccessError::Invalid(format!("cannot start a runtime: {e}")))?;
        let etcd = rt.block_on(Etcd::connect(cfg))?;
        Ok(EtcdStore { rt, etcd })
    }

    pub(super) fn append_revocation(&self, r: &Revocation) -> Result<(), AccessError> {
        let key = self.etcd.keys.revoked(&r.id);
        let value = serde_json::to_vec(r).map_err(|e| AccessError::Invalid(format!("cannot encode: {e}")))?;
        let txn = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key.clone(),
            value,
            None,
        )]);
        let resp = self.rt.block_on(self.etcd.txn(txn))?;
        if !resp.succeeded() {
            return Err(AccessError::Invalid(format!("etcd already holds {key}")));
        }
        Ok(())
    }

    pub(super) fn load(&self, rules: &Rules) -> Result<State, AccessError> {
        self.rt.block_on(load_state(&self.etcd, rules, 0)).map(|(s, _)| s).map_err(AccessError::from)
    }

    /// Validate `make(state)`'s event against every event before it and write it as the next
    /// seq (compare-and-swap on `access-seq`, retried). Returns the state with it applied.
    pub(super) fn append_event(
        &self,
        rules: &Rules,
        make: impl Fn(&State) -> Result<AccessEvent, AccessError>,
    ) -> Result<(State, AccessEvent), AccessError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut state, last) = self.rt.block_on(self.read_events(rules))?;
            let ev = make(&state)?;
            state.apply_access(&ev, rules).map_err(AccessError::Refused)?;
            if self.rt.block_on(self.write_event(&ev, last))? {
                return Ok((state, ev));
            }
        }
        Err(AccessError::Invalid(format!("etcd: {MAX_CAS_ATTEMPTS} attempts lost to concurrent writers; try again")))
    }

    /// The events and `access-seq` (its value and mod revision) at one revision.
    async fn read_events(&self, rules: &Rules) -> Result<(State, (u64, i64)), EtcdError> {
        let seq_resp = self.etcd.get(self.etcd.keys.access_seq(), None).await?;
        let rev = seq_resp.header().map(|h| h.revision()).unwrap_or(0);
        let last = match seq_resp.kvs().first() {
            Some(k) => {
                let n = std::str::from_utf8(k.value()).ok().and_then(|s| s.trim().parse::<u64>().ok());
                let n = n.ok_or_else(|| EtcdError::Data(format!("{} is not a number", self.etcd.keys.access_seq())))?;
                (n, k.mod_revision())
            }
            None => (0, 0),
        };
        let (state, _) = load_state(&self.etcd, rules, rev).await?;
        Ok((state, last))
    }

    /// Write `ev` as seq `last.0 + 1` if `access-seq` is still at `last.1`.
    async fn write_event(&self, ev: &AccessEvent, last: (u64, i64)) -> Result<bool, AccessError> {
        let value = serde_json::to_vec(ev).map_err(|e| AccessError::Invalid(format!("cannot encode: {e}")))?;
        let keys = &self.etcd.keys;
        let next = last.0 + 1;
        let txn = Txn::new().when([Compare::mod_revision(keys.access_seq(), CompareOp::Equal, last.1)]).and_then([
            TxnOp::put(keys.access_seq(), next.to_string(), None::<PutOptions>),
            TxnOp::put(keys.access(next), value, None),
        ]);
        Ok(self.etcd.txn(txn).await?.succeeded())
    }
}

/// Every revocation and access event in etcd (at `revision`, 0: the newest), applied in the
/// order they were written; also the revision read.
pub(super) async fn load_state(etcd: &Etcd, rules: &Rules, revision: i64) -> Result<(State, i64), EtcdError> {
    let opts = if revision > 0 { by_creation().with_revision(revision) } else { by_creation() };
    let revoked = etcd.get(etcd.keys.revoked_dir(), Some(opts)).await?;
    let at = revoked.header().map(|h| h.revision()).unwrap_or(revision);
    let events = etcd.get(etcd.keys.access_dir(), Some(by_creation().with_revision(at))).await?;
    let mut state = State::default();
    for r in revoked.kvs().iter().filter_map(decode::<Revocation>) {
        if r.valid() {
            state.apply_revocation(&r);
        }
    }
    for ev in events.kvs().iter().filter_map(decode::<AccessEvent>) {
        let _ = state.apply_access(&ev, rules);
    }
    Ok((state, at))
}
