use std::io::Write as _;
use std::time::Duration;

use super::*;
use crate::auth::Identity;

fn rules() -> Rules {
    Rules {
        grantable_roles: vec!["app_rw".into()],
        approver_groups: vec!["dba".into()],
        max_ttl_secs: 3600,
        request_ttl_secs: 600,
    }
}

fn ident(user: &str, groups: &[&str], jti: &str, iat: i64) -> Identity {
    Identity {
        user: user.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        jti: jti.into(),
        expires_at: i64::MAX,
        issued_at: iat,
    }
}

fn request(id: &str, at: i64, role: &str, ttl: u64) -> AccessEvent {
    AccessEvent::Request {
        id: id.into(),
        at,
        user: "alice".into(),
        role: role.into(),
        ttl_secs: ttl,
        reason: "fix".into(),
        by_uid: 0,
    }
}

fn approve(id: &str, at: i64, who: &str, groups: &[&str]) -> AccessEvent {
    AccessEvent::Approve {
        id: id.into(),
        at,
        approver: who.into(),
        approver_jti: "j".into(),
        approver_groups: groups.iter().map(|g| g.to_string()).collect(),
        expires_at: i64::MAX,
    }
}

#[test]
fn request_approve_expire() {
    let r = rules();
    let mut s = State::default();
    assert!(s.apply_access(&request("a", 100, "postgres", 60), &r).unwrap_err().contains("not grantable"));
    assert!(s.apply_access(&request("a", 100, "app_rw", 7200), &r).unwrap_err().contains("max_ttl"));
    s.apply_access(&request("a", 100, "app_rw", 60), &r).unwrap();
    assert!(s.apply_access(&request("a", 100, "app_rw", 60), &r).unwrap_err().contains("duplicate"));
    assert_eq!(s.request("a").unwrap().state(120, 600), RequestState::Pending);
    assert!(s.apply_access(&approve("a", 110, "alice", &["dba"]), &r).unwrap_err().contains("own request"));
    assert!(s.apply_access(&approve("a", 110, "bob", &["analysts"]), &r).unwrap_err().contains("approver groups"));
    assert!(s.apply_access(&approve("zz", 110, "bob", &["dba"]), &r).unwrap_err().contains("no access request"));
    assert!(s.active_grant("alice", 110).is_none());
    s.apply_access(&approve("a", 110, "bob", &["dba"]), &r).unwrap();
    assert!(s.apply_access(&approve("a", 111, "carol", &["dba"]), &r).unwrap_err().contains("active"));
    let g = s.active_grant("alice", 120).unwrap();
    assert_eq!((g.role.as_str(), g.expires_at), ("app_rw", Some(170)));
    assert!(s.active_grant("alice", 170).is_none());
    assert_eq!(s.request("a").unwrap().state(170, 600), RequestState::Expired);

    // A request not approved in time lapses.
    s.apply_access(&request("b", 100, "app_rw", 60), &r).unwrap();
    assert_eq!(s.request("b").unwrap().state(700, 600), RequestState::Lapsed);
    assert!(s.apply_access(&approve("b", 700, "bob", &["dba"]), &r).is_err());

    // Revoked grants end.
    s.apply_access(&request("c", 150, "app_rw", 60), &r).unwrap();
    s.apply_access(&approve("c", 151, "bob", &["dba"]), &r).unwrap();
    let rv = AccessEvent::Revoke { id: "c".into(), at: 171, reason: None, by_uid: 0 };
    assert_eq!(s.active_grant("alice", 171).map(|g| g.id.as_str()), Some("c"));
    s.apply_access(&rv, &r).unwrap();
    assert!(s.active_grant("alice", 171).is_none());
    assert_eq!(s.request("c").unwrap().state(172, 600), RequestState::Revoked);
}

#[test]
fn revocations() {
    let mut s = State::default();
    let mk = |jti: Option<&str>, user: Option<&str>, at| Revocation {
        id: "r".into(),
        at,
        jti: jti.map(Into::into),
        user: user.map(Into::into),
        reason: None,
        by_uid: 0,
    };
    s.apply_revocation(&mk(Some("j1"), None, 100));
    s.apply_revocation(&mk(None, Some("bob"), 200));
    assert!(s.token_revoked(&ident("alice", &[], "j1", 50)).is_some());
    assert!(s.token_revoked(&ident("alice", &[], "j2", 50)).is_none());
    assert!(s.token_revoked(&ident("bob", &[], "j3", 200)).is_some(), "issued at the revocation second");
    assert!(s.token_revoked(&ident("bob", &[], "j4", 201)).is_none(), "issued after");
    assert!(!mk(Some("a"), Some("b"), 1).valid());
    assert!(!mk(None, None, 1).valid());
}

#[test]
fn session_check_sees_new_generation_only() {
    let access = Access::new(State::default());
    let id = ident("alice", &[], "j1", 10);
    let mut c = SessionCheck::new(access.generation(), None, 0, 0);
    c.check(&access, &id, 20).unwrap();
    let mut s = State::default();
    s.apply_revocation(&Revocation { id: "r".into(), at: 30, jti: Some("j1".into()), user: None, reason: None, by_uid: 0 });
    access.publish(s);
    assert!(matches!(c.check(&access, &id, 40), Err(Refusal::TokenRevoked(_))));
    let mut expired = ident("alice", &[], "j5", 1);
    expired.expires_at = 5;
    assert_eq!(SessionCheck::new(0, None, 0, 0).check(&access, &expired, 6), Err(Refusal::TokenExpired));
    SessionCheck::new(0, None, 30, 0).check(&access, &expired, 35).unwrap();
    assert_eq!(SessionCheck::new(0, None, 30, 0).check(&access, &expired, 36), Err(Refusal::TokenExpired));
    let g = SessionGrant { id: "g".into(), role: "app_rw".into(), expires_at: 50 };
    let mut c = SessionCheck::new(access.generation(), Some(g), 30, 0);
    let other = ident("alice", &[], "j9", 10);
    c.check(&access, &other, 49).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(c.check(&access, &other, 50), Err(Refusal::GrantExpired { .. })));
}

/// A wall clock stepped backwards (NTP, an operator, a restored VM) does not make a session's
/// expired token or grant valid again: the time the session has run counts.
#[test]
fn a_clock_stepped_back_does_not_revive_an_expired_token_or_grant() {
    let access = Access::new(State::default());
    let ran = Duration::from_secs(5);
    let started = std::time::Instant::now().checked_sub(ran).expect("a monotonic clock over 5 s");
    // Logged in at wall time 1050, 5 s ago; the token ended at 1052, the grant at 1053. The
    // wall clock now says 1051 (stepped back).
    let mut id = ident("alice", &[], "j1", 1000);
    id.expires_at = 1052;
    let mut c = SessionCheck::started_at(access.generation(), None, 0, 1050, started);
    assert_eq!(c.check(&access, &id, 1051), Err(Refusal::TokenExpired));
    let g = SessionGrant { id: "g".into(), role: "app_rw".into(), expires_at: 1053 };
    let mut c = SessionCheck::started_at(access.generation(), Some(g), 0, 1050, started);
    assert!(matches!(c.check(&access, &ident("alice", &[], "j2", 1000), 1051), Err(Refusal::GrantExpired { .. })));
    // Logged in just now: the wall clock is what counts.
    let mut c = SessionCheck::new(access.generation(), None, 0, 1050);
    c.check(&access, &id, 1051).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn store_appends_and_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::in_dir(tmp.path().to_owned(), rules());
    let req = store.request("alice", "app_rw", Duration::from_secs(60), "incident 42").unwrap();
    assert!(req.id.starts_with("jit-"));
    assert!(matches!(store.request("alice", "postgres", Duration::from_secs(60), "x"), Err(AccessError::Refused(_))));
    assert!(matches!(store.request("alice", "app_rw", Duration::from_secs(60), " "), Err(AccessError::Invalid(_))));
    let bob = ident("bob", &["dba"], "jb", now_unix());
    assert!(matches!(store.approve(&req.id, &ident("alice", &["dba"], "ja", 0)), Err(AccessError::Refused(_))));
    let done = store.approve(&req.id, &bob).unwrap();
    assert!(done.expires_at.is_some());
    assert_eq!(store.load().unwrap().active_grant("alice", now_unix()).map(|r| r.id.clone()), Some(req.id.clone()));
    store.revoke(None, Some("bob"), Some("left")).unwrap();
    let req2 = store.request("alice", "app_rw", Duration::from_secs(60), "again").unwrap();
    let e = store.approve(&req2.id, &bob).unwrap_err().to_string();
    assert!(e.contains("revoked"), "{e}");
    assert!(store.revoke(Some("x"), Some("y"), None).is_err());
    // A torn line does not break later appends or reads.
    let path = tmp.path().join(ACCESS_FILE);
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"event\":\"req").unwrap();
    let req3 = store.request("carol", "app_rw", Duration::from_secs(60), "torn").unwrap();
    assert_eq!(store.load().unwrap().request(&req3.id).unwrap().user, "carol");
}

#[test]
fn staleness_refuses_logins_not_sessions() {
    let f = std::sync::Arc::new(Freshness::new(Duration::from_secs(3600), None));
    let mut s = State::default();
    s.set_freshness(f.clone());
    let id = ident("alice", &[], "j1", 10);
    let why = s.token_revoked(&id).expect("nothing read yet: logins wait");
    assert!(why.contains("not been read"), "{why}");
    assert!(s.revoked_in_state(&id).is_none(), "sessions run on the last state");
    f.synced();
    assert!(s.token_revoked(&id).is_none());
    f.failed("etcd down");
    assert!(s.token_revoked(&id).is_none(), "within max_staleness the last state holds");
    let short = std::sync::Arc::new(Freshness::new(Duration::from_millis(1), None));
    short.synced();
    std::thread::sleep(Duration::from_millis(20));
    let mut s = State::default();
    s.set_freshness(short);
    assert!(s.token_revoked(&id).is_some_and(|w| w.contains("stale")));
}
