//! Who can reach a path: search permission on every directory on the way, and for a unix
//! socket write permission on the socket itself — from mode bits, owners and group membership
//! as [`Accounts`] knows it (not ACLs). Used to check that only pgward (and root, and the
//! socket's owner) can connect to the real Postgres socket.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::accounts::Accounts;

/// Who other than the users in `allowed` can reach `target` (a socket when `is_sock`, else a
/// directory): "every local user", "user NAME (uid N)", or None. None also when a step of the
/// path cannot be read.
pub fn reachable_by_others(target: &Path, is_sock: bool, allowed: &[u32], accounts: &Accounts) -> Option<String> {
    // (uid, gid, mode, bit: 0 = x, 1 = w)
    let mut steps = Vec::new();
    let mut p = PathBuf::new();
    let dirs = if is_sock { target.parent()? } else { target };
    for c in dirs.components() {
        p.push(c);
        let m = std::fs::metadata(&p).ok()?;
        steps.push((m.uid(), m.gid(), m.mode(), 0u32));
    }
    if is_sock {
        let m = std::fs::symlink_metadata(target).ok()?;
        steps.push((m.uid(), m.gid(), m.mode(), 1));
    }
    let passes = |uid: u32, name: &str, primary: u32| {
        steps.iter().all(|&(ou, og, mode, bit)| {
            let class = if uid == ou {
                6
            } else if accounts.in_group(name, primary, og) {
                3
            } else {
                0
            };
            mode & (1 << (class + bit)) != 0
        })
    };
    if passes(u32::MAX - 1, "", u32::MAX - 1) {
        return Some("every local user".into());
    }
    accounts
        .users
        .iter()
        .filter(|(_, uid, _)| !allowed.contains(uid))
        .find(|(name, uid, gid)| passes(*uid, name, *gid))
        .map(|(name, uid, _)| format!("user {name} (uid {uid})"))
}

/// Group ids of `path` and every directory above it: the groups whose members
/// [`reachable_by_others`] must know.
pub fn path_groups(path: &Path) -> Vec<u32> {
    path.ancestors().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.gid()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn socket_reachability_from_mode_bits() {
        use std::os::unix::net::UnixListener;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pg");
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join(".s.PGSQL.5432");
        let _l = UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let users = Accounts::default();
        let me = crate::host::accounts::effective_uid();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let everyone_can_traverse = sock.ancestors().skip(2).all(|a| std::fs::metadata(a).unwrap().mode() & 0o001 != 0);
        if everyone_can_traverse {
            assert_eq!(reachable_by_others(&sock, true, &[0, me], &users).as_deref(), Some("every local user"));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(reachable_by_others(&sock, true, &[0, me], &users), None);
        // A stranger owning nothing, in no group, is not let in by 0750 either.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        let strangers = Accounts { users: vec![("eve".into(), 4242, 4242)], groups: vec![] };
        assert_eq!(reachable_by_others(&sock, true, &[0, me], &strangers), None);
        // ...unless she is in the directory's group.
        let gid = std::fs::metadata(&dir).unwrap().gid();
        let members = Accounts { users: vec![("eve".into(), 4242, gid)], groups: vec![] };
        if everyone_can_traverse {
            assert_eq!(reachable_by_others(&sock, true, &[0, me], &members).as_deref(), Some("user eve (uid 4242)"));
        }
    }
}
