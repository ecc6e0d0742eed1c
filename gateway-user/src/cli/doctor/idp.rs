//! The identity provider's keys (`auth.jwks_url` or `auth.discovery`): can they be fetched from
//! here now, and when did the running `serve` last fetch them (its status file in the state
//! directory)?

use super::Ctx;
use super::report::{Check, Outcome, check};
use crate::auth::KeyStatus;

pub(super) fn provider_keys(cx: &Ctx) -> Check {
    let name = "identity provider keys";
    let cfg = &cx.cfg;
    if !cfg.auth.remote_keys() {
        return check(name, Outcome::Skip, "tokens are verified against a JWKS file (auth.jwks)", None);
    }
    let serve = cx.serve_pid.and_then(|_| KeyStatus::read(&crate::access::state_dir(cfg)));
    let now = match crate::auth::Verifier::load(cfg) {
        Ok(v) => v.key_status(),
        Err(e) => {
            let fix = "check auth.jwks_url / auth.issuer (discovery), that this host reaches the provider over HTTPS, and auth.jwks_ca for a private CA";
            // The running serve may still hold good keys from an earlier fetch.
            return match serve.filter(|st| st.fetched_at.is_some()) {
                Some(st) => check(name, Outcome::Warn, format!("{e}; serve: {}", st.summary()), Some(fix.into())),
                None => check(name, Outcome::Fail, e.to_string(), Some(fix.into())),
            };
        }
    };
    let fetched_now = format!("{} key(s) ({}) fetched now from {}", now.kids.len(), now.kids.join(", "), now.source);
    match serve {
        None => check(name, Outcome::Pass, fetched_now, None),
        Some(st) if st.fetched_at.is_none() => check(
            name,
            Outcome::Fail,
            format!("{fetched_now}; but the running serve has none: {}", st.summary()),
            Some("logins are refused until serve fetches the keys; see its log".into()),
        ),
        Some(st) if st.last_error.is_some() => check(
            name,
            Outcome::Warn,
            format!("{fetched_now}; serve: {}", st.summary()),
            Some("serve keeps its last good keys while the provider is unreachable; see its log".into()),
        ),
        Some(st) => check(name, Outcome::Pass, format!("{fetched_now}; serve: {}", st.summary()), None),
    }
}
