//! [`Accounts`] as the system's name service sees them (NSS: files, LDAP, SSSD, …).
//!
//! Enumeration (getpwent/getgrent) lists what NSS is willing to list; directory services often
//! do not enumerate, so groups that matter (e.g. those on a socket's path) can also be looked
//! up by id ([`Accounts::add_group`]: getgrgid_r), and their members by name (getpwnam_r).

use std::ffi::{CStr, CString};
use std::sync::Mutex;

use super::accounts::Accounts;

/// getpwent/getgrent keep a process-wide cursor.
static ENUM_LOCK: Mutex<()> = Mutex::new(());
/// Buffer for the reentrant lookups; grown on ERANGE up to the maximum.
const NSS_BUF: usize = 16 * 1024;
const NSS_BUF_MAX: usize = 1 << 20;

impl Accounts {
    /// Everything NSS enumerates (a group id listed twice keeps its first entry).
    pub fn load_nss() -> Accounts {
        let mut u = Accounts::default();
        let _g = ENUM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the enumeration functions are used under ENUM_LOCK; every returned entry is
        // copied out before the next call.
        unsafe {
            libc::setpwent();
            loop {
                let pw = libc::getpwent();
                if pw.is_null() {
                    break;
                }
                u.add_user(cstr((*pw).pw_name), (*pw).pw_uid, (*pw).pw_gid);
            }
            libc::endpwent();
            libc::setgrent();
            loop {
                let gr = libc::getgrent();
                if gr.is_null() {
                    break;
                }
                let gid = (*gr).gr_gid;
                if !u.groups.iter().any(|g| g.1 == gid) {
                    u.groups.push((cstr((*gr).gr_name), gid, members((*gr).gr_mem)));
                }
            }
            libc::endgrent();
        }
        u
    }

    fn add_user(&mut self, name: String, uid: u32, gid: u32) {
        if !self.users.iter().any(|(n, _, _)| *n == name) {
            self.users.push((name, uid, gid));
        }
    }

    /// Make sure group `gid` and its members are known (looked up by id and name, which
    /// directory services answer even when they do not enumerate).
    pub fn add_group(&mut self, gid: u32) {
        let Some((group_name, names)) = group_by_id(gid) else { return };
        for n in &names {
            if let Some((uid, primary)) = user_by_name(n) {
                self.add_user(n.clone(), uid, primary);
            }
        }
        let i = match self.groups.iter().position(|g| g.1 == gid) {
            Some(i) => i,
            None => {
                self.groups.push((group_name, gid, Vec::new()));
                self.groups.len() - 1
            }
        };
        let known = &mut self.groups[i].2;
        for n in names {
            if !known.contains(&n) {
                known.push(n);
            }
        }
    }
}

/// # Safety
/// `p` is null or a valid C string.
unsafe fn cstr(p: *const libc::c_char) -> String {
    if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() }
}

/// # Safety
/// `mem` is null or a null-terminated array of valid C strings.
unsafe fn members(mem: *mut *mut libc::c_char) -> Vec<String> {
    let mut out = Vec::new();
    if mem.is_null() {
        return out;
    }
    let mut i = 0;
    loop {
        let p = unsafe { *mem.add(i) };
        if p.is_null() {
            return out;
        }
        out.push(unsafe { cstr(p) });
        i += 1;
    }
}

/// Name and member names of group `gid`.
fn group_by_id(gid: u32) -> Option<(String, Vec<String>)> {
    let mut size = NSS_BUF;
    while size <= NSS_BUF_MAX {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: zeroed out-struct; buffer and length describe `buf`.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut res) };
        if rc == libc::ERANGE {
            size *= 2;
            continue;
        }
        if rc != 0 || res.is_null() {
            return None;
        }
        // SAFETY: gr_name and gr_mem point into `buf`, alive here.
        return Some(unsafe { (cstr(gr.gr_name), members(gr.gr_mem)) });
    }
    None
}

/// (uid, primary gid) of user `name`.
fn user_by_name(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut size = NSS_BUF;
    while size <= NSS_BUF_MAX {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: zeroed out-struct; buffer and length describe `buf`.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut res) };
        if rc == libc::ERANGE {
            size *= 2;
            continue;
        }
        if rc != 0 || res.is_null() {
            return None;
        }
        return Some((pw.pw_uid, pw.pw_gid));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_enumerated_and_its_group_resolved_by_id() {
        let mut u = Accounts::load_nss();
        assert!(u.users.iter().any(|(n, uid, _)| n == "root" && *uid == 0), "root via NSS");
        u.groups.clear();
        u.add_group(0);
        assert!(u.groups.iter().any(|g| g.1 == 0), "group 0 looked up by id");
        assert!(u.in_group("root", 0, 0));
    }
}
