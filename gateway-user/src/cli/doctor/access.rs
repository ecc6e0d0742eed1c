//! The access state backend: with `[access] backend = "etcd"`, does every member answer, can
//! this config read pgward's keys, and is the running `serve` current?

use super::Ctx;
use super::report::{Check, Outcome, check};
use crate::access::BackendStatus;
use crate::etcd::Etcd;

const NAME: &str = "access backend";

pub(super) fn access_backend(cx: &Ctx) -> Check {
    let Some(e) = cx.cfg.access.etcd() else {
        return check(NAME, Outcome::Pass, "file (revocations and grants of this host only)", None);
    };
    let probe = crate::etcd::block_on(probe(cx));
    let (down, read) = match probe {
        Ok(r) => r,
        Err(err) => {
            return check(NAME, Outcome::Fail, format!("cannot run the etcd probe: {err}"), None);
        }
    };
    let serve = cx.serve_pid.and_then(|_| BackendStatus::read(&crate::access::state_dir(&cx.cfg)));
    if let Err(err) = read {
        return check(
            NAME,
            Outcome::Fail,
            format!("etcd: cannot read {}/state/: {err}", e.prefix),
            Some(
                "check [access.etcd] endpoints, TLS files and user, and that etcd is up (etcdctl endpoint health)"
                    .into(),
            ),
        );
    }
    if let Some(s) = serve.as_ref().filter(|s| !s.connected) {
        return check(
            NAME,
            Outcome::Fail,
            format!(
                "etcd answers this check, but serve (pid {}) has not read it since {}",
                s.pid,
                s.last_sync.as_deref().unwrap_or("it started")
            ),
            Some(format!("see serve's log; its last error: {}", s.last_error.as_deref().unwrap_or("-"))),
        );
    }
    if !down.is_empty() {
        return check(
            NAME,
            Outcome::Warn,
            format!("etcd answers, but not every member: {} down", down.join(", ")),
            Some("bring the members back before the cluster loses its quorum".into()),
        );
    }
    let who = if serve.is_some() { "; serve is current" } else { "" };
    check(NAME, Outcome::Pass, format!("etcd, {} members answer{who}", e.endpoints.len()), None)
}

/// The members that do not answer, and whether a read through all of them works.
async fn probe(cx: &Ctx) -> (Vec<String>, Result<(), String>) {
    let Some(e) = cx.cfg.access.etcd() else {
        return (Vec::new(), Ok(()));
    };
    let mut down = Vec::new();
    for ep in &e.endpoints {
        let one = match Etcd::connect_to(&cx.cfg, e, std::slice::from_ref(ep)).await {
            Ok(c) => c.call(|mut m| async move { m.status().await }).await.map(|_| ()),
            Err(err) => Err(err),
        };
        if one.is_err() {
            down.push(ep.clone());
        }
    }
    let read = async {
        let c = Etcd::connect(&cx.cfg).await?;
        c.get(c.keys.state(), Some(etcd_client::GetOptions::new().with_prefix().with_count_only())).await?;
        Ok::<(), crate::etcd::EtcdError>(())
    };
    (down, read.await.map_err(|e| e.to_string()))
}
