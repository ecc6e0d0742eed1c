//! The socket lockdown: only root, Postgres's owner and pgward may reach the real Postgres
//! unix socket, and the path clients use is pgward's.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::Ctx;
use super::proc_net::unix_socket_pids;
use super::report::{Check, Outcome, check};
use crate::host::{process, reach};

const START: &str = "start Postgres and pgward (systemctl start postgresql pgward)";
const PATHS: &str = "set intercept.upstream_socket_dirs to Postgres's unix_socket_directories and \
                     server.unix_socket_dir to the directory clients use (pgward install does both)";

pub(super) fn socket_lockdown(cx: &Ctx) -> Check {
    let cfg = &cx.cfg;
    let dirs: Vec<PathBuf> = match &cfg.intercept.upstream_socket_dirs {
        Some(d) => d.iter().map(|p| cfg.resolve(p)).collect(),
        None if cfg.upstream.host.starts_with('/') => vec![PathBuf::from(&cfg.upstream.host)],
        None => Vec::new(),
    };
    let mut f = Findings::default();
    for dir in &dirs {
        upstream_socket(cx, dir, &mut f);
    }
    if dirs.is_empty() {
        f.warn.push((
            "the real Postgres socket directory is not configured (intercept.upstream_socket_dirs)".into(),
            PATHS,
        ));
    }
    clients_path(cx, &dirs, &mut f);
    f.verdict()
}

/// What the lockdown checks found, worst first when reported.
#[derive(Default)]
struct Findings {
    /// (what, fix)
    problems: Vec<(String, String)>,
    good: Vec<String>,
    /// (what, fix)
    warn: Vec<(String, &'static str)>,
}

impl Findings {
    /// FAIL with the first problem's fix, WARN with every distinct fix, or PASS.
    fn verdict(self) -> Check {
        let name = "socket lockdown";
        let Findings { problems, good, warn } = self;
        if let Some((what, fix)) = problems.first() {
            let mut detail = what.clone();
            for (w, _) in problems.iter().skip(1) {
                let _ = write!(detail, "; {w}");
            }
            return check(name, Outcome::Fail, detail, Some(fix.clone()));
        }
        let mut detail = good.join("; ");
        if !warn.is_empty() {
            if !detail.is_empty() {
                detail.push_str("; ");
            }
            detail.push_str(&warn.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join("; "));
            let mut fixes: Vec<&str> = Vec::new();
            for (_, f) in &warn {
                if !fixes.contains(f) {
                    fixes.push(f);
                }
            }
            return check(name, Outcome::Warn, detail, Some(fixes.join("; ")));
        }
        check(name, Outcome::Pass, format!("reachable {detail}"), None)
    }
}

/// Who can reach the real Postgres socket in `dir` (or `dir` itself when there is no socket):
/// only root, its owner and pgward's users may.
fn upstream_socket(cx: &Ctx, dir: &Path, f: &mut Findings) {
    let sock = dir.join(format!(".s.PGSQL.{}", cx.cfg.upstream.port.first()));
    let (target, is_sock) = match std::fs::symlink_metadata(&sock) {
        Ok(_) => (sock.clone(), true),
        Err(_) => (dir.to_path_buf(), false),
    };
    let owner = std::fs::symlink_metadata(&target).map(|m| m.uid()).ok();
    let Some(owner) = owner else {
        f.warn.push((format!("{} does not exist", dir.display()), START));
        return;
    };
    let mut allowed = vec![0, owner];
    allowed.extend(&cx.service_uids);
    match reach::reachable_by_others(&target, is_sock, &allowed, &cx.accounts) {
        Some(who) => f.problems.push((
            format!("{} can be reached by {who}", target.display()),
            format!(
                "chmod 0750 {d} && chown {pg}:{grp} {d} (and unix_socket_directories = '{d}' in postgresql.conf)",
                d = dir.display(),
                pg = cx.accounts.user_name(owner).unwrap_or_else(|| owner.to_string()),
                grp = cx.service.as_ref().map(|s| s.1.clone()).unwrap_or_else(|| "pgward".into())
            ),
        )),
        None if is_sock => f.good.push(format!("{} only by root, {}", sock.display(), allowed_names(&allowed, cx))),
        None => {
            f.good.push(format!("{} only by root, {}", dir.display(), allowed_names(&allowed, cx)));
            f.warn.push((format!("no Postgres socket in {} (Postgres not running?)", dir.display()), START));
        }
    }
}

/// The path clients use must be pgward's: not the real Postgres socket, and held by the
/// running `pgward serve`.
fn clients_path(cx: &Ctx, dirs: &[PathBuf], f: &mut Findings) {
    let cfg = &cx.cfg;
    let Some(d) = &cfg.server.unix_socket_dir else {
        f.warn.push((
            "server.unix_socket_dir is not set: clients using the default socket path do not reach pgward".into(),
            PATHS,
        ));
        return;
    };
    let dir = cfg.resolve(d);
    let port = cfg.server.unix_socket_port.unwrap_or(cfg.listen_addr().port());
    let path = dir.join(format!(".s.PGSQL.{port}"));
    if dirs.contains(&dir) && port == cfg.upstream.port.first() {
        f.problems.push((
            format!("clients' socket path {} is the real Postgres socket", path.display()),
            "move Postgres's socket (unix_socket_directories) to a private directory".into(),
        ));
    }
    let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    let holders = if is_socket { unix_socket_pids(&path) } else { Vec::new() };
    match (cx.serve_pid, is_socket) {
        (Some(pid), true) if holders.contains(&pid) => f.good.push(format!("clients' path {} is pgward's", path.display())),
        (Some(_), false) => f.problems.push((
            format!("pgward serve runs, but {} does not exist", path.display()),
            "restart pgward; check that it may create sockets in that directory".into(),
        )),
        (_, true) if !holders.is_empty() => f.problems.push((
            format!("clients' path {} belongs to {} (not pgward)", path.display(), describe_pids(&holders)),
            "restart Postgres so it uses its new unix_socket_directories, then start pgward".into(),
        )),
        (None, _) => f.warn.push((format!("clients' path {} is not served (pgward not running)", path.display()), START)),
        (Some(_), true) => f.warn.push((format!("cannot tell who holds {}", path.display()), "run pgward doctor as root")),
    }
}

fn allowed_names(uids: &[u32], cx: &Ctx) -> String {
    let set: BTreeSet<u32> = uids.iter().copied().filter(|u| *u != 0).collect();
    set.into_iter().map(|u| cx.accounts.user_name(u).unwrap_or_else(|| u.to_string())).collect::<Vec<_>>().join(", ")
}

fn describe_pids(pids: &[u32]) -> String {
    pids.iter()
        .map(|p| {
            format!("{} (pid {p})", process::comm(*p).unwrap_or_default())
        })
        .collect::<Vec<_>>()
        .join(", ")
}
