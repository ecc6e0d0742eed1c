//! Users and groups: from a tree's /etc/passwd and /etc/group (install works on a tree that
//! may not be the running system; doctor reads the host's), or as the system's name service
//! sees them ([`Accounts::load_nss`], for the unix-socket check at start).

use std::path::Path;

/// Users and groups, with the lookups install, doctor and the unix-socket check make.
#[derive(Debug, Default)]
pub struct Accounts {
    /// (name, uid, primary gid)
    pub users: Vec<(String, u32, u32)>,
    /// (name, gid, member names)
    pub groups: Vec<(String, u32, Vec<String>)>,
}

impl Accounts {
    /// The users and groups listed in these passwd and group files (a missing or unreadable
    /// file lists none; malformed lines are skipped).
    pub fn load_from(passwd: &Path, group: &Path) -> Accounts {
        let fields = |p: &Path| -> Vec<Vec<String>> {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').map(String::from).collect())
                .collect()
        };
        let users = fields(passwd)
            .into_iter()
            .filter_map(|f| Some((f.first()?.clone(), f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
            .collect();
        let groups = fields(group)
            .into_iter()
            .filter_map(|f| {
                let members = f
                    .get(3)
                    .map(|m| m.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
                    .unwrap_or_default();
                Some((f.first()?.clone(), f.get(2)?.parse().ok()?, members))
            })
            .collect();
        Accounts { users, groups }
    }

    /// (uid, primary gid) of user `name`.
    pub fn user(&self, name: &str) -> Option<(u32, u32)> {
        self.users.iter().find(|u| u.0 == name).map(|u| (u.1, u.2))
    }

    pub fn user_name(&self, uid: u32) -> Option<String> {
        self.users.iter().find(|u| u.1 == uid).map(|u| u.0.clone())
    }

    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups.iter().find(|g| g.0 == name).map(|g| g.1)
    }

    pub fn group_name(&self, gid: u32) -> Option<String> {
        self.groups.iter().find(|g| g.1 == gid).map(|g| g.0.clone())
    }

    /// Whether user `name` (primary group `primary`) is in group `gid`.
    pub fn in_group(&self, name: &str, primary: u32, gid: u32) -> bool {
        primary == gid || self.groups.iter().any(|g| g.1 == gid && g.2.iter().any(|m| m == name))
    }
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
