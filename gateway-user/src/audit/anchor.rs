//! Off-host anchors: each durable checkpoint is also written to etcd
//! (`<prefix>/anchors/<node name>/<seq>`, the `HEAD` JSON), and `pgward audit verify
//! --anchors etcd` checks the local log against them.
//!
//! Whoever is root on the host can truncate the log, re-chain it and re-sign checkpoints and
//! HEAD with the key on the host, so that `verify` alone passes; an anchor already in etcd
//! still names the hash the record at its seq had. A local record at an anchor's seq with
//! another hash (rewritten), or no record there (rolled back), fails the check.
//!
//! Writing never holds up the audit writer or a session: the HEAD thread hands each
//! checkpoint to a watch channel (the newest replaces one not yet sent — it pins the whole
//! chain before it), and a task writes it, retrying while etcd is away.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::chain::{HEAD_FILE, Head};
use super::reader::Reader;
use super::verify::{PublicKeys, check_signature};
use super::writer::{CheckpointHook, CheckpointSigner};
use crate::config::Config;
use crate::etcd::{Etcd, EtcdError};

/// Pause before writing an anchor again after etcd failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Start the anchor task (when `[access] backend = "etcd"` and `[access.etcd] anchors`);
/// the hook to give the audit writer. `signer` is the writer's checkpoint key, which the last
/// run's HEAD must be signed with to be anchored. Must run inside the tokio runtime.
pub fn start(cfg: &Config, signer: Option<&CheckpointSigner>) -> Option<CheckpointHook> {
    let e = cfg.access.etcd().filter(|e| e.anchors)?;
    let node = e.node_name();
    let (tx, rx) = tokio::sync::watch::channel::<Option<Head>>(None);
    // The HEAD of the last run: anchored too, in case etcd was away when it was written.
    let keys: PublicKeys = signer.map(|s| (s.kid().to_string(), s.verifying_key())).into_iter().collect();
    if let Some(h) = last_run_head(&cfg.resolve(&cfg.audit.dir), &keys) {
        tx.send_replace(Some(h));
    }
    tokio::spawn(run(cfg.clone(), node, rx));
    Some(CheckpointHook(Arc::new(move |h: &Head| {
        tx.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.seq >= h.seq) {
                return false;
            }
            *cur = Some(h.clone());
            true
        });
    })))
}

/// The last run's `HEAD`, if it names the checkpoint the log holds there, signed with this
/// gateway's key. HEAD is a file whoever can write the log directory can replace, and an
/// anchor is created once and never overwritten: a HEAD taken on trust would put their anchor
/// in etcd under pgward's name, and one naming a seq far ahead would hold back every genuine
/// anchor after it (only a newer checkpoint replaces the one waiting).
fn last_run_head(dir: &Path, keys: &PublicKeys) -> Option<Head> {
    let bytes = std::fs::read(dir.join(HEAD_FILE)).ok()?;
    let h: Head = serde_json::from_slice(&bytes).ok()?;
    let refuse = |why: String| {
        tracing::warn!(seq = h.seq, "audit: not anchoring HEAD of the last run: {why}");
        None
    };
    if let Some(why) = forged(keys, &h.seq.to_string(), &h) {
        return refuse(why);
    }
    let mut reader = match Reader::open(dir) {
        Ok(r) => r,
        Err(e) => return refuse(e.to_string()),
    };
    reader.start_near(h.seq);
    let at = reader.filter_map(Result::ok).map(|e| e.record).find(|r| r.seq >= h.seq);
    match at {
        Some(r) if r.seq == h.seq && r.kind == super::Kind::Checkpoint && r.hash == h.hash => Some(h),
        _ => refuse(format!("the log holds no checkpoint seq {} with hash {}", h.seq, h.hash)),
    }
}

/// Write the newest checkpoint handed over, until the channel closes.
async fn run(cfg: Config, node: String, mut rx: tokio::sync::watch::Receiver<Option<Head>>) {
    let mut etcd: Option<Etcd> = None;
    let mut written = 0u64;
    loop {
        let head = rx.borrow_and_update().clone();
        if let Some(h) = head.filter(|h| h.seq > written) {
            match write_one(&cfg, &mut etcd, &node, &h).await {
                Ok(()) => written = h.seq,
                Err(e) => {
                    tracing::warn!(seq = h.seq, error = %e, "cannot write the audit anchor to etcd; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Create the anchor key for `h` (an anchor is never overwritten; one already there with
/// other contents is reported: the log was rewritten, or two gateways share a node name).
async fn write_one(cfg: &Config, etcd: &mut Option<Etcd>, node: &str, h: &Head) -> Result<(), EtcdError> {
    if etcd.is_none() {
        *etcd = Some(Etcd::connect(cfg).await?);
    }
    let Some(c) = etcd.as_ref() else {
        return Err(EtcdError::NotConfigured);
    };
    let key = c.keys.anchor(node, h.seq);
    let value = serde_json::to_vec(h).map_err(|e| EtcdError::Data(e.to_string()))?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), value, None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = match c.txn(txn).await {
        Ok(r) => r,
        Err(e) => {
            *etcd = None;
            return Err(e);
        }
    };
    if resp.succeeded() {
        tracing::debug!(seq = h.seq, %key, "audit anchor written");
        return Ok(());
    }
    let existing = resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| serde_json::from_slice::<Head>(kv.value()).ok()),
        _ => None,
    });
    if existing.as_ref().is_some_and(|e| e.hash != h.hash) {
        tracing::error!(seq = h.seq, %key, "etcd holds a different audit anchor for this seq: the local log was rewritten, or another gateway uses node name {node:?}");
    }
    Ok(())
}

/// The anchors etcd holds for `node`: each key (without the node's directory) and what it
/// holds.
pub async fn load(etcd: &Etcd, node: &str) -> Result<Vec<(String, Head)>, EtcdError> {
    let dir = etcd.keys.anchors_dir(node);
    let resp = etcd.get(dir.clone(), Some(GetOptions::new().with_prefix())).await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let h: Head = serde_json::from_slice(kv.value())
            .map_err(|e| EtcdError::Data(format!("anchor {key} does not parse: {e}")))?;
        out.push((key.strip_prefix(dir.as_str()).unwrap_or(&key).to_string(), h));
    }
    Ok(out)
}

/// Why an anchor is not one pgward wrote, if it is not: pgward writes each checkpoint under
/// its own seq, and the checkpoint's signature covers the record before it. Whoever can write
/// etcd but not read the checkpoint key can only copy or invent anchors, and neither passes.
pub fn forged(keys: &PublicKeys, key: &str, h: &Head) -> Option<String> {
    if key.parse::<u64>().ok() != Some(h.seq) {
        return Some(format!("key {key:?} holds the checkpoint of seq {} (copied from elsewhere)", h.seq));
    }
    if h.anchor_seq.checked_add(1) != Some(h.seq) {
        return Some(format!("the checkpoint at seq {} claims to anchor seq {}", h.seq, h.anchor_seq));
    }
    check_signature(keys, Some(&h.kid), Some(&h.sig), h.anchor_seq, &h.anchor_hash)
        .err()
        .map(|why| format!("seq {}: {why}", h.seq))
}

/// The outcome of checking the local log against the anchors.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AnchorCheck {
    /// Anchors whose seq holds the same hash locally.
    pub matched: u64,
    pub last_anchor: Option<u64>,
    /// Checkpoints in the local log.
    pub local_checkpoints: u64,
    /// Anchors pgward did not write (not signed with the checkpoint key, or under another
    /// key than their seq): how many, and why the first is not genuine.
    pub forged: Option<(usize, String)>,
    /// The first anchor the local log contradicts: its seq and how.
    pub mismatch: Option<(u64, String)>,
}

impl AnchorCheck {
    pub fn is_ok(&self) -> bool {
        self.mismatch.is_none() && self.forged.is_none() && (self.matched > 0 || self.local_checkpoints == 0)
    }
}

impl fmt::Display for AnchorCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((seq, why)) = &self.mismatch {
            write!(f, "etcd anchors CONTRADICT the log at seq {seq}: {why}")?;
        } else {
            match self.last_anchor {
                Some(last) => write!(f, "etcd anchors match: {} checked, the newest at seq {last}", self.matched)?,
                None if self.local_checkpoints == 0 => write!(f, "etcd anchors: none yet (the log has no checkpoint)")?,
                None => write!(
                    f,
                    "etcd anchors MISSING: the log has {} checkpoints but etcd holds no anchor for this node",
                    self.local_checkpoints
                )?,
            }
        }
        if let Some((n, why)) = &self.forged {
            write!(
                f,
                "; etcd anchors FORGED: {n} not written by pgward (someone with write access to etcd), not compared: {why}"
            )?;
        }
        Ok(())
    }
}

/// Compare the log in `dir` with the anchors etcd holds (`(key, anchor)` as [`load`] returns
/// them); only genuine anchors (see [`forged`]) are compared. Stops at the first contradiction.
pub fn check(dir: &Path, keys: &PublicKeys, stored: &[(String, Head)]) -> Result<AnchorCheck, String> {
    let mut out = AnchorCheck::default();
    let mut anchors: BTreeMap<u64, &Head> = BTreeMap::new();
    let mut forgeries = Vec::new();
    for (key, h) in stored {
        match forged(keys, key, h) {
            Some(why) => forgeries.push(why),
            None => {
                anchors.insert(h.seq, h);
            }
        }
    }
    out.forged = forgeries.first().map(|why| (forgeries.len(), why.clone()));
    out.last_anchor = anchors.keys().next_back().copied();
    // The checkpoint record itself (its hash is not signed), then the record each anchor's
    // signature covers: where both name a seq (consecutive checkpoints), the signed hash.
    let mut wanted: BTreeMap<u64, (&str, &Head)> = BTreeMap::new();
    for h in anchors.values() {
        wanted.insert(h.seq, (&h.hash, h));
    }
    for h in anchors.values() {
        wanted.insert(h.anchor_seq, (&h.anchor_hash, h));
    }
    let mut found = std::collections::BTreeSet::new();
    let reader = Reader::open(dir).map_err(|e| e.to_string())?;
    for entry in reader {
        let rec = entry.map_err(|e| e.to_string())?.record;
        if rec.kind == super::Kind::Checkpoint {
            out.local_checkpoints += 1;
        }
        let Some(&(hash, a)) = wanted.get(&rec.seq) else {
            continue;
        };
        if rec.hash != hash {
            let why = format!(
                "the local record has hash {}, the anchor written at {} says {hash} (the log was rewritten here or before)",
                rec.hash, a.ts
            );
            out.mismatch = Some((rec.seq, why));
            return Ok(out);
        }
        found.insert(rec.seq);
        if anchors.contains_key(&rec.seq) {
            out.matched += 1;
        }
    }
    if let Some((&seq, (_, a))) = wanted.iter().find(|(s, _)| !found.contains(*s)) {
        let why =
            format!("the local log has no record {seq}, anchored at {} (the log was truncated or rolled back)", a.ts);
        out.mismatch = Some((seq, why));
    }
    Ok(out)
}
