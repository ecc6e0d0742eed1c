//! The appliance without Vagrant: `pgward install` → a session → `pgward uninstall` in an
//! isolated root, the provisioning script (vagrant/provision.sh) in one, the Vagrantfile's syntax.
//!
//! An isolated root is a temp dir laid out like a small Debian system (/etc with its own
//! passwd/group/shadow, /var, /run, /usr/local, /home, /root) holding a real PostgreSQL 15 cluster
//! made by initdb. `pgward install --root` works on it from outside; to *run* what was installed,
//! the test starts a mount + network namespace ([`Ns`]) in which that tree's /etc, /var, /run,
//! /home, /root and /usr/local are bind-mounted over the host's (private mounts: the host sees
//! nothing) and which has its own loopback, so Postgres listens on 127.0.0.1:5432 and pgward on
//! 127.0.0.1:6432 exactly as installed. pgward runs as the unit would run it: user pgward with
//! groups pgward + postgres, only CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON (ambient, bounded),
//! no_new_privs, in a cgroup owned by pgward (what systemd's Delegate=yes does). The eBPF
//! programs attach to the test's own child cgroup ([`TestCg`]), never the host's root.
//!
//! Nothing touches the host's /etc, /var, /run or systemd. Processes are ours, ended by pid;
//! temp dirs, namespaces and cgroups go on Drop (also on panic). Needs root (like the
//! interception tests) and PostgreSQL 15 server binaries.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sha2::Digest;

use common::gateway::pgward_bin;
use common::{CmdOut, run_cmd, scrub_pg_env};

const DATA_DIR: &str = "/var/lib/postgresql/15/main";
const DEBIAN_CONF_DIR: &str = "/etc/postgresql/15/main";
const CONFIG: &str = "/etc/pgward/pgward.toml";
const PGWARD: &str = "/usr/local/bin/pgward";
static SEQ: AtomicU32 = AtomicU32::new(0);

fn pg_bin(prog: &str) -> PathBuf {
    PathBuf::from(std::env::var("PGWARD_E2E_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())).join(prog)
}

#[track_caller]
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the appliance tests need root (useradd --prefix, chown, namespaces, cgroups)"
    );
    assert!(pg_bin("initdb").exists(), "PostgreSQL 15 server binaries not found in {}", pg_bin("").display());
}

fn set_attrs(p: &Path, mode: u32, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}
fn mkdir(p: &Path, mode: u32, uid: u32, gid: u32) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    set_attrs(p, mode, uid, gid);
}
fn write(p: &Path, text: &str, mode: u32, uid: u32, gid: u32) {
    std::fs::write(p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    set_attrs(p, mode, uid, gid);
}

// ---- the isolated root -----------------------------------------------------------------------

/// The OS user the tests' PostgreSQL runs as (postgres refuses root).
#[derive(Debug, Clone)]
struct PgUser {
    name: String,
    uid: u32,
    gid: u32,
    passwd_line: String,
    group_line: String,
}

fn pg_user() -> PgUser {
    let candidates: Vec<String> = match std::env::var("PGWARD_TEST_PG_USER") {
        Ok(u) => vec![u],
        Err(_) => vec!["postgres".into(), "pgtest".into()],
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let group = std::fs::read_to_string("/etc/group").unwrap();
    for name in candidates {
        let Some(line) = passwd.lines().find(|l| l.split(':').next() == Some(name.as_str())) else { continue };
        let f: Vec<&str> = line.split(':').collect();
        let (uid, gid) = (f[2].parse().unwrap(), f[3].parse::<u32>().unwrap());
        let g = group
            .lines()
            .find(|l| l.split(':').nth(2) == Some(gid.to_string().as_str()))
            .unwrap_or_else(|| panic!("no group {gid} for {name}"));
        let gname = g.split(':').next().unwrap();
        return PgUser {
            name: name.clone(),
            uid,
            gid,
            passwd_line: line.to_string(),
            group_line: format!("{gname}:x:{gid}:"),
        };
    }
    panic!("no postgres (or pgtest) user on this host to run PostgreSQL as (.ci/run creates one)");
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// postgresql.conf in the data directory (initdb's layout).
    InData,
    /// Debian's: /etc/postgresql/15/main with conf.d, data in /var/lib/postgresql/15/main.
    Debian,
}

/// `<tmp>/root` (the tree) and `<tmp>/work` (logs, files the test keeps outside the tree).
struct Tree {
    top: PathBuf,
    root: PathBuf,
    work: PathBuf,
    pg: PgUser,
    layout: Layout,
}

impl Tree {
    fn new(layout: Layout) -> Tree {
        let pg = pg_user();
        let top = tempfile::Builder::new().prefix("pgward-appliance-").tempdir().unwrap().keep();
        set_attrs(&top, 0o755, 0, 0);
        let (root, work) = (top.join("root"), top.join("work"));
        mkdir(&root, 0o755, 0, 0);
        mkdir(&work, 0o755, 0, 0);
        let t = Tree { top, root, work, pg, layout };
        t.skeleton();
        t.initdb();
        t
    }

    /// Where system path `sys` is on the host.
    fn p(&self, sys: &str) -> PathBuf {
        self.root.join(sys.trim_start_matches('/'))
    }

    fn skeleton(&self) {
        let (pg, p) = (&self.pg, |s: &str| self.p(s));
        for d in [
            "/etc",
            "/etc/systemd",
            "/etc/systemd/system",
            "/etc/tmpfiles.d",
            "/var",
            "/var/lib",
            "/var/log",
            "/run",
            "/usr",
            "/usr/local",
            "/usr/local/bin",
            "/usr/local/sbin",
            "/home",
        ] {
            mkdir(&p(d), 0o755, 0, 0);
        }
        mkdir(&p("/root"), 0o700, 0, 0);
        std::os::unix::fs::symlink("/run", p("/var/run")).unwrap();
        let users = format!(
            "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n{}\n",
            pg.passwd_line
        );
        let groups = format!("root:x:0:\ndaemon:x:1:\nshadow:x:42:\nnogroup:x:65534:\n{}\n", pg.group_line);
        let names = |text: &str| text.lines().map(|l| l.split(':').next().unwrap().to_string()).collect::<Vec<_>>();
        let shadow: String = names(&users).iter().map(|n| format!("{n}:*:19000:0:99999:7:::\n")).collect();
        let gshadow: String = names(&groups).iter().map(|n| format!("{n}:*::\n")).collect();
        write(&p("/etc/passwd"), &users, 0o644, 0, 0);
        write(&p("/etc/group"), &groups, 0o644, 0, 0);
        write(&p("/etc/shadow"), &shadow, 0o640, 0, 42);
        write(&p("/etc/gshadow"), &gshadow, 0o640, 0, 42);
        if let Ok(defs) = std::fs::read_to_string("/etc/login.defs") {
            write(&p("/etc/login.defs"), &defs, 0o644, 0, 0);
        }
        write(&p("/etc/hosts"), "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644, 0, 0);
        write(&p("/etc/nsswitch.conf"), "passwd: files\ngroup: files\nshadow: files\nhosts: files\n", 0o644, 0, 0);
        // Debian's alternatives (awk, pager, …): the same symlinks as the host.
        mkdir(&p("/etc/alternatives"), 0o755, 0, 0);
        for e in std::fs::read_dir("/etc/alternatives").into_iter().flatten().flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let _ = std::os::unix::fs::symlink(target, p("/etc/alternatives").join(e.file_name()));
            }
        }
        mkdir(&p("/var/lib/postgresql"), 0o755, pg.uid, pg.gid);
        mkdir(&p("/var/lib/postgresql/15"), 0o755, pg.uid, pg.gid);
        // What postgresql-common's tmpfiles.d entry makes.
        mkdir(&p("/run/postgresql"), 0o2775, pg.uid, pg.gid);
    }

    fn initdb(&self) {
        let pg = &self.pg;
        let data = self.p(DATA_DIR);
        let mut cmd = Command::new("setpriv");
        cmd.args([format!("--reuid={}", pg.uid), format!("--regid={}", pg.gid), "--clear-groups".into(), "--".into()])
            .arg(pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                &pg.name,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
            ])
            .current_dir(&self.top);
        scrub_pg_env(&mut cmd);
        run_cmd(&mut cmd, None, Duration::from_secs(180)).expect_ok();
        // How the admin had it before pgward: Postgres on every address, the default socket.
        let site = "\n# site settings\nlisten_addresses = '*'\nport = 5432\nunix_socket_directories = '/var/run/postgresql'\nfsync = off\n";
        match self.layout {
            Layout::InData => {
                let conf = data.join("postgresql.conf");
                let text = std::fs::read_to_string(&conf).unwrap() + site;
                std::fs::write(&conf, text).unwrap();
            }
            Layout::Debian => {
                // What pg_createcluster does: the config files move to /etc/postgresql/15/main.
                let etc = self.p(DEBIAN_CONF_DIR);
                for d in ["/etc/postgresql", "/etc/postgresql/15", DEBIAN_CONF_DIR, "/etc/postgresql/15/main/conf.d"] {
                    mkdir(&self.p(d), 0o755, pg.uid, pg.gid);
                }
                for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
                    std::fs::rename(data.join(f), etc.join(f)).unwrap();
                }
                let conf = etc.join("postgresql.conf");
                let text = std::fs::read_to_string(&conf).unwrap()
                    + &format!(
                        "\n# Debian\ndata_directory = '{DATA_DIR}'\nhba_file = '{DEBIAN_CONF_DIR}/pg_hba.conf'\n\
                         ident_file = '{DEBIAN_CONF_DIR}/pg_ident.conf'\nexternal_pid_file = '/var/run/postgresql/15-main.pid'\n\
                         {site}include_dir = 'conf.d'\n"
                    );
                std::fs::write(&conf, text).unwrap();
                write(&etc.join("start.conf"), "auto\n", 0o644, pg.uid, pg.gid);
                // postgresql-common's client wrapper map (stock: comments only).
                mkdir(&self.p("/etc/postgresql-common"), 0o755, 0, 0);
                write(
                    &self.p("/etc/postgresql-common/user_clusters"),
                    "# This file maps users against the database clusters to which they\n# will connect by default.\n#\n# USER\tGROUP\tVERSION\tCLUSTER\tDATABASE\n",
                    0o644,
                    0,
                    0,
                );
            }
        }
    }

    /// `postgres` arguments for this layout (as pg_ctlcluster would start it).
    fn postgres_args(&self) -> Vec<String> {
        match self.layout {
            Layout::InData => vec!["-D".into(), DATA_DIR.into()],
            Layout::Debian => vec!["-D".into(), DEBIAN_CONF_DIR.into()],
        }
    }

    fn pg_conf_sys(&self) -> String {
        match self.layout {
            Layout::InData => format!("{DATA_DIR}/postgresql.conf"),
            Layout::Debian => format!("{DEBIAN_CONF_DIR}/postgresql.conf"),
        }
    }

    /// (uid, gid) of a user in the tree's /etc/passwd.
    fn user(&self, name: &str) -> Option<(u32, u32)> {
        std::fs::read_to_string(self.p("/etc/passwd")).unwrap().lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if std::env::var_os("PGWARD_E2E_KEEP").is_some() {
            eprintln!("PGWARD_E2E_KEEP: isolated root kept at {}", self.top.display());
            return;
        }
        // The audit directory is append-only: clear that first.
        pgward::host::files::clear_append_only_tree(&self.top);
        let _ = std::fs::remove_dir_all(&self.top);
    }
}

/// Every entry under the tree: type, mode, owner, append-only flag, and content hash or link
/// target. Postgres's data directory counts only with its config files (the server itself
/// rewrites the rest while it runs).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
        let m = std::fs::symlink_metadata(p).unwrap();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        let t = m.file_type();
        let attr = if (t.is_dir() || t.is_file()) && pgward::host::files::is_append_only(p).unwrap_or(false) {
            " +a"
        } else {
            ""
        };
        let what = if t.is_symlink() {
            format!("link -> {}", std::fs::read_link(p).unwrap().display())
        } else if t.is_file() {
            format!("file {}", hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap())))
        } else if t.is_dir() {
            "dir".into()
        } else {
            format!("special {:?}", t)
        };
        out.insert(rel.clone(), format!("{what} {:04o} {}:{}{attr}", m.mode() & 0o7777, m.uid(), m.gid()));
        if t.is_dir() {
            let in_data = rel == DATA_DIR;
            for e in std::fs::read_dir(p).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if in_data && !(name.ends_with(".conf") && e.file_type().unwrap().is_file()) {
                    continue;
                }
                walk(root, &e.path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn snapshot_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => d.push(format!("- {k}: {v}")),
            Some(w) if w != v => d.push(format!("~ {k}: {v}  =>  {w}")),
            _ => {}
        }
    }
    for (k, w) in after {
        if !before.contains_key(k) {
            d.push(format!("+ {k}: {w}"));
        }
    }
    d
}

// ---- namespaces, processes, cgroups ----------------------------------------------------------

/// A mount + network namespace in which the tree is the system: its /etc, /var, /run, /home,
/// /root and /usr/local are bind-mounted over the host's (private to the namespace), loopback up,
/// and a bpffs of its own at /sys/fs/bpf (pgward's pins go there, and with the namespace).
/// Kept alive by a holder process (ours, SIGKILLed on Drop, and by the kernel if we die).
struct Ns {
    holder: Child,
}

impl Ns {
    fn new(tree: &Tree) -> Ns {
        let script = r#"set -e
ip link set lo up
for d in etc var run home root usr/local; do mount --bind "$1/$d" "/$d"; done
mount -t bpf bpf /sys/fs/bpf
echo ready
exec sleep 100000"#;
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--net",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            script,
            "pgward-appliance-ns",
        ])
        .arg(&tree.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        pdeathsig(&mut cmd);
        let mut holder = cmd.spawn().expect("spawn unshare");
        let out = holder.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "ready" => Ns { holder },
            other => {
                let _ = holder.kill();
                let o = holder.wait_with_output().unwrap();
                panic!("namespace setup failed ({other:?}): {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
    /// A command run inside the namespace (as root).
    fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder.id().to_string(), "-m", "-n", "--"]).arg(prog);
        scrub_pg_env(&mut c);
        c
    }
    /// A command run inside the namespace as uid:gid (supplementary groups `groups`).
    fn cmd_as(&self, uid: u32, gid: u32, groups: &[u32], prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.cmd("setpriv");
        c.args([format!("--reuid={uid}"), format!("--regid={gid}")]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.arg(format!("--groups={}", groups.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(",")));
        }
        c.args(["--pdeathsig=KILL", "--"]).arg(prog);
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = self.holder.kill(); // our own child, by pid
        let _ = self.holder.wait();
    }
}

fn pdeathsig(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A long-running child (Postgres, pgward serve) with its log file.
struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::from(f.try_clone().unwrap())).stderr(Stdio::from(f));
        pdeathsig(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { name, child: Some(child), log }
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Wait until `ready()` or panic (with the log) if the process exits or time runs out.
    #[track_caller]
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready(&self.log_text()) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited ({st}) before {what}:\n{}", self.name, self.log_text());
            }
            if Instant::now() > deadline {
                panic!("{} not {what} within 60 s:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Send `sig`, wait (bounded), SIGKILL if it does not go.
    fn stop(&mut self, sig: libc::c_int) -> Option<ExitStatus> {
        let child = self.child.take()?;
        common::stop_child(child, sig, Duration::from_secs(30))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The tree's Postgres, started inside the namespace as its OS user; ready when it says so.
fn start_postgres(ns: &Ns, tree: &Tree) -> Proc {
    let log = tree.work.join("postgres.log");
    let offset = std::fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
    let mut cmd = ns.cmd_as(tree.pg.uid, tree.pg.gid, &[], pg_bin("postgres"));
    cmd.args(tree.postgres_args());
    let mut p = Proc::spawn("postgres", cmd, log);
    p.wait_ready("ready", |l| l.get(offset..).unwrap_or("").contains("database system is ready to accept connections"));
    p
}

/// The last start's log lines of Postgres.
fn postgres_log_since_last_start(p: &Proc) -> String {
    let l = p.log_text();
    let i = l.rfind("starting PostgreSQL").unwrap_or(0);
    l[i..].to_string()
}

/// A child cgroup of the cgroup2 root for this test: the eBPF programs attach here; `svc` in it
/// plays the unit's cgroup, delegated to user pgward as systemd's Delegate=yes would.
struct TestCg {
    path: PathBuf,
    root: PathBuf,
}

impl TestCg {
    fn new(name: &str) -> TestCg {
        let root = pgward::host::cgroup::cgroup2_mount().ok().flatten().expect("a cgroup2 (unified) hierarchy must be mounted");
        let path = root.join(format!("pgwt-{name}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCg { path, root }
    }
    fn svc(&self) -> PathBuf {
        self.path.join("svc")
    }
    /// Create `svc` owned by uid:gid (the directory and the files a delegate may write).
    fn delegate(&self, uid: u32, gid: u32) {
        let svc = self.svc();
        if !svc.exists() {
            std::fs::create_dir(&svc).unwrap();
        }
        for f in ["", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"] {
            let p = if f.is_empty() { svc.clone() } else { svc.join(f) };
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        }
    }
    fn remove_tree(&self, dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                self.remove_tree(&e.path());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
            // Only our own (exiting) processes can be in there.
            for pid in std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestCg {
    fn drop(&mut self) {
        let p = self.path.clone();
        self.remove_tree(&p);
    }
}

/// `pgward serve` from the installed config, run the way the unit runs it: user pgward, groups
/// pgward and postgres (SupplementaryGroups=), only the unit's capabilities, no_new_privs, in the
/// delegated cgroup. Creates /run/pgward first (the unit's RuntimeDirectory=).
fn start_pgward(ns: &Ns, tree: &Tree, cg: &TestCg) -> Proc {
    let (uid, gid) = tree.user("pgward").expect("user pgward");
    mkdir(&tree.p("/run/pgward"), 0o750, uid, gid);
    cg.delegate(uid, gid);
    // The unit's ExecStartPre=+ (privileged): bpffs and pgward's pin directory.
    let unit = std::fs::read_to_string(tree.p("/etc/systemd/system/pgward.service")).expect("the unit");
    let pre = unit.lines().find_map(|l| l.strip_prefix("ExecStartPre=+")).expect("ExecStartPre=+ in the unit");
    let out = ns_run(ns, "/bin/sh", &["-c", pre]);
    assert!(out.success(), "ExecStartPre: {}", out.describe());
    let script = r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#;
    let mut cmd = ns.cmd("/bin/sh");
    cmd.args(["-c", script, "sh"])
        .arg(cg.svc())
        .args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &format!("--groups={gid},{}", tree.pg.gid),
        ])
        .args(["--inh-caps=+bpf,+net_admin,+perfmon", "--ambient-caps=+bpf,+net_admin,+perfmon"])
        .args(["--bounding-set=-all,+bpf,+net_admin,+perfmon", "--no-new-privs", "--pdeathsig=KILL", "--"])
        .args([PGWARD, "serve", "--config", CONFIG])
        .env("PGWARD_LOG", std::env::var("PGWARD_E2E_LOG").unwrap_or_else(|_| "info".into()));
    let mut p = Proc::spawn("pgward serve", cmd, tree.work.join("pgward.log"));
    let (state, sock) = (tree.p("/run/pgward/intercept.state.json"), tree.p("/run/postgresql/.s.PGSQL.5432"));
    p.wait_ready("attached and listening", |_| state.exists() && sock.exists());
    p
}

/// Stop pgward (SIGTERM: it leaves its cgroup; the programs stay pinned) and remove /run/pgward, as systemd
/// would after the unit stops.
fn stop_pgward(p: &mut Proc, tree: &Tree) {
    let st = p.stop(libc::SIGTERM).expect("pgward was running");
    assert!(st.success(), "pgward serve exited with {st}:\n{}", p.log_text());
    // RuntimeDirectory= is removed with what is in it (the state file).
    let _ = std::fs::remove_dir_all(tree.p("/run/pgward"));
}

/// Who runs a client.
#[derive(Clone, Copy)]
enum As {
    Root,
    User(u32, u32),
}

/// psql inside the namespace (optionally from inside `cgroup`, joined before any socket exists).
fn psql(ns: &Ns, who: As, cgroup: Option<&Path>, conninfo: &str, password: Option<&str>, sql: &str) -> CmdOut {
    let psql_args = ["-X", "-At", "-w", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-d", conninfo, "-c", sql];
    let mut cmd = ns.cmd("/bin/sh");
    cmd.args(["-c", r#"if [ -n "$1" ]; then echo $$ > "$1/cgroup.procs" || exit 97; fi; shift; exec "$@""#, "sh"]);
    cmd.arg(cgroup.map(|c| c.display().to_string()).unwrap_or_default());
    if let As::User(uid, gid) = who {
        cmd.args(["setpriv", &format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", "--"]);
        cmd.env("HOME", "/nonexistent"); // not root's: libpq looks for ~/.postgresql/*
    }
    cmd.arg("/usr/bin/psql").args(psql_args).current_dir("/");
    cmd.env("PGPASSFILE", "/dev/null/none").env("LC_ALL", "C.UTF-8");
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    let mut out = run_cmd(&mut cmd, None, Duration::from_secs(60));
    if let Some(p) = password {
        out.what = out.what.replace(p, "<password>");
    }
    out
}

fn ns_run(ns: &Ns, prog: &str, args: &[&str]) -> CmdOut {
    let mut cmd = ns.cmd(prog);
    cmd.args(args).env("PGWARD_LOG", "warn").current_dir("/");
    run_cmd(&mut cmd, None, Duration::from_secs(120))
}

/// `pgward doctor --json` in the namespace: exit code and check → (result, detail).
fn doctor(ns: &Ns) -> (Option<i32>, BTreeMap<String, (String, String)>, String) {
    let out = ns_run(ns, PGWARD, &["doctor", "--config", CONFIG, "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("doctor --json: {e}: {}", out.describe()));
    let checks = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_string(),
                (c["result"].as_str().unwrap().to_string(), c["detail"].as_str().unwrap().to_string()),
            )
        })
        .collect();
    let table = ns_run(ns, PGWARD, &["doctor", "--config", CONFIG]).stdout;
    (out.code, checks, table)
}

#[track_caller]
fn assert_check(checks: &BTreeMap<String, (String, String)>, name: &str, result: &str, table: &str) {
    let (r, _) = checks.get(name).unwrap_or_else(|| panic!("doctor has no check {name:?}:\n{table}"));
    assert_eq!(r, result, "doctor check {name:?}:\n{table}");
}

/// `pgward install` run on the host with `--root`.
fn install_cli(args: &[&str]) -> CmdOut {
    let mut cmd = Command::new(pgward_bin());
    cmd.args(args).env("PGWARD_LOG", "warn");
    run_cmd(&mut cmd, None, Duration::from_secs(120))
}

fn lsattr_has_a(p: &Path) -> bool {
    pgward::host::files::is_append_only(p).unwrap_or(false)
}

fn mode_owner(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

// ---- the tests -------------------------------------------------------------------------------

/// install --root → the installed Postgres and pgward run in the tree; sessions through TCP :5432
/// (intercepted) and the default socket path; the real socket refuses others; doctor passes;
/// uninstall --purge leaves every file, mode and owner as it was.
#[test]
fn install_session_uninstall_leaves_no_trace() {
    require_root();
    let tree = Tree::new(Layout::InData);
    let cg = TestCg::new("appliance");
    let pg = tree.pg.clone();

    let (svc_password, pwfile) = prepare_postgres(&tree);
    let before = snapshot(&tree.root);

    // ---- install ------------------------------------------------------------------------
    let root = tree.root.to_str().unwrap();
    install(&tree, &pwfile, &cg);
    check_installed_files(&tree);

    // Install twice: refused, nothing changes.
    let again =
        install_cli(&["install", "--root", root, "--pg-data", DATA_DIR, "--pg-user", &pg.name, "--no-systemctl"]);
    assert!(!again.success() && again.stderr.contains("already installed"), "{}", again.describe());

    let ns = Ns::new(&tree);
    check_unit_with_systemd(&ns);

    // ---- run what was installed ---------------------------------------------------------
    let mut postgres = start_postgres(&ns, &tree);
    let boot = postgres_log_since_last_start(&postgres);
    assert!(
        boot.contains("listening on IPv4 address \"127.0.0.1\", port 5432"),
        "Postgres is bound to loopback:\n{boot}"
    );
    assert!(!boot.contains("0.0.0.0"), "{boot}");
    assert!(boot.contains("listening on Unix socket \"/run/postgresql-real/.s.PGSQL.5432\""), "{boot}");

    check_doctor_without_gateway(&ns);
    let mut gw = start_pgward(&ns, &tree, &cg);
    check_doctor_with_gateway(&ns);
    check_doctor_checkpoint_key_mode(&ns, &tree);
    let marker = check_sessions(&ns, &cg, &svc_password);
    check_audit_log(&ns, &tree, &marker);

    // ---- stop (what systemctl stop does), uninstall ------------------------------------
    stop_pgward(&mut gw, &tree);
    assert!(!cg.svc().join("gateway").exists(), "pgward left its cgroup behind");
    assert!(postgres.stop(libc::SIGINT).unwrap().success(), "{}", postgres.log_text());
    drop(ns);

    let out = install_cli(&["uninstall", "--root", root, "--purge", "--no-systemctl"]);
    assert!(out.expect_ok().contains("pgward uninstalled"), "{}", out.describe());
    let after = snapshot(&tree.root);
    let diff = snapshot_diff(&before, &after);
    assert!(diff.is_empty(), "uninstall left traces:\n{}", diff.join("\n"));

    // And Postgres is as it was: every address, the default socket.
    let ns = Ns::new(&tree);
    let mut postgres = start_postgres(&ns, &tree);
    let boot = postgres_log_since_last_start(&postgres);
    assert!(
        boot.contains("listening on IPv4 address \"0.0.0.0\", port 5432")
            && boot.contains("\"/var/run/postgresql/.s.PGSQL.5432\""),
        "{boot}"
    );
    assert!(postgres.stop(libc::SIGINT).unwrap().success());
}

/// The admin's starting point: Postgres with pgward's service role and a database. Returns the
/// service password and the file holding it.
fn prepare_postgres(tree: &Tree) -> (String, PathBuf) {
    let pg = tree.pg.clone();
    let svc_password = common::rand_hex(24);
    let pwfile = tree.work.join("svc.password");
    write(&pwfile, &format!("{svc_password}\n"), 0o600, 0, 0);
    {
        let ns = Ns::new(tree);
        let mut postgres = start_postgres(&ns, tree);
        let boot = postgres_log_since_last_start(&postgres);
        assert!(boot.contains("listening on IPv4 address \"0.0.0.0\", port 5432"), "{boot}");
        let su = |sql: &str| {
            psql(&ns, As::User(pg.uid, pg.gid), None, "host=/var/run/postgresql port=5432 dbname=postgres", None, sql)
        };
        su(&format!("CREATE ROLE pgward_svc LOGIN PASSWORD '{svc_password}'")).expect_ok();
        su("GRANT pg_signal_backend, pg_read_all_settings TO pgward_svc").expect_ok();
        su("CREATE DATABASE app OWNER pgward_svc").expect_ok();
        assert!(postgres.stop(libc::SIGINT).unwrap().success());
    }
    (svc_password, pwfile)
}

/// `pgward install --root` into the tree, intercepting `cg`.
fn install(tree: &Tree, pwfile: &Path, cg: &TestCg) {
    let pg = &tree.pg;
    let root = tree.root.to_str().unwrap();
    let out = install_cli(&[
        "install",
        "--root",
        root,
        "--pg-data",
        DATA_DIR,
        "--pg-user",
        &pg.name,
        "--upstream-password-file",
        pwfile.to_str().unwrap(),
        "--database",
        "app",
        "--no-systemctl",
        "--intercept-cgroup",
        cg.path.to_str().unwrap(),
        "--gateway-cgroup",
        cg.svc().join("gateway").to_str().unwrap(),
    ]);
    let report = out.expect_ok();
    assert!(report.contains("pgward installed into") && report.contains("Next: restart Postgres"), "{report}");

}

/// What install did, as files: users, modes and owners, Postgres's settings, the config, the unit.
fn check_installed_files(tree: &Tree) {
    let pg = &tree.pg;
    let (uid, gid) = tree.user("pgward").expect("install created user pgward");
    let group = std::fs::read_to_string(tree.p("/etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with(&format!("pgward:x:{gid}:"))), "{group}");
    assert!(std::fs::read_to_string(tree.p("/etc/shadow")).unwrap().contains("pgward:"));
    assert_eq!(mode_owner(&tree.p("/etc/pgward")), (0o750, 0, gid));
    assert_eq!(mode_owner(&tree.p("/etc/pgward/keys/signing-key.pem")), (0o640, 0, gid));
    // The checkpoint key is the service user's alone.
    assert_eq!(mode_owner(&tree.p("/etc/pgward/keys/checkpoint-key.pem")), (0o400, uid, gid));
    assert_eq!(mode_owner(&tree.p("/etc/pgward/upstream.password")), (0o640, 0, gid));
    assert_eq!(mode_owner(&tree.p("/var/lib/pgward/audit")), (0o750, uid, gid));
    assert!(lsattr_has_a(&tree.p("/var/lib/pgward/audit")), "the audit directory is append-only");
    assert_eq!(mode_owner(&tree.p("/run/postgresql-real")), (0o750, pg.uid, gid));
    assert_eq!(mode_owner(&tree.p(PGWARD)), (0o755, 0, 0));
    assert_eq!(std::fs::read(tree.p(PGWARD)).unwrap(), std::fs::read(pgward_bin()).unwrap());
    let tmpfiles = std::fs::read_to_string(tree.p("/etc/tmpfiles.d/pgward.conf")).unwrap();
    assert!(tmpfiles.contains(&format!("d /run/postgresql-real 0750 {} pgward - -", pg.name)), "{tmpfiles}");
    let conf = std::fs::read_to_string(tree.p(&tree.pg_conf_sys())).unwrap();
    assert!(
        conf.contains("# BEGIN pgward")
            && conf.contains("listen_addresses = '127.0.0.1'")
            && conf.contains("unix_socket_directories = '/run/postgresql-real'"),
        "{conf}"
    );
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(tree.p(CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["audit"]["dir"].as_str(), Some("/var/lib/pgward/audit"));
    assert_eq!(cfg["server"]["unix_socket_dir"].as_str(), Some("/run/postgresql"));
    assert_eq!(cfg["intercept"]["enabled"].as_bool(), Some(true));
    assert_eq!(cfg["intercept"]["exempt_uid"].as_integer(), Some(uid as i64));
    assert_eq!(cfg["upstream"]["host"].as_str(), Some("127.0.0.1"));
    assert!(tree.p("/var/lib/pgward/install-manifest.json").exists());
    let unit = std::fs::read_to_string(tree.p("/etc/systemd/system/pgward.service")).unwrap();
    for needle in [
        "User=pgward",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/pgward/audit",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
    ] {
        assert!(unit.contains(needle), "unit lacks {needle}:\n{unit}");
    }

}

/// The unit file, checked by systemd itself where it is /etc/systemd/system/pgward.service
/// and its ExecStart= exists.
fn check_unit_with_systemd(ns: &Ns) {
    if Path::new("/usr/bin/systemd-analyze").exists() {
        // (With a scratch /run: systemd-analyze leaves a marker file there.)
        let analyze = |args: &[&str]| {
            let mut a = vec![
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs none /run && exec systemd-analyze \"$@\"",
                "sh",
            ];
            a.extend_from_slice(args);
            ns_run(ns, "unshare", &a)
        };
        let v = analyze(&["verify", "/etc/systemd/system/pgward.service"]);
        assert!(v.success() && v.stderr.trim().is_empty(), "systemd-analyze verify: {}", v.describe());
        let s = analyze(&["security", "--offline=true", "/etc/systemd/system/pgward.service"]);
        let level: f64 = s
            .all_output()
            .lines()
            .find_map(|l| l.split("Overall exposure level for pgward.service:").nth(1))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level: {}", s.describe()));
        assert!(level <= 3.0, "systemd-analyze security rates the unit {level} (want <= 3.0):\n{}", s.all_output());
    }

}

/// doctor without a running gateway: says so, with the fix.
fn check_doctor_without_gateway(ns: &Ns) {
    let (code, checks, table) = doctor(ns);
    assert_eq!(code, Some(1), "{table}");
    assert_check(&checks, "programs attached", "fail", &table);
    assert!(table.contains("systemctl start pgward"), "{table}");
    assert_check(&checks, "config", "pass", &table);
    assert_check(&checks, "kernel", "pass", &table);
    assert_check(&checks, "capabilities", "pass", &table); // from the unit file
    assert!(checks["capabilities"].1.contains("pgward.service"), "{table}");
    assert_check(&checks, "postgres loopback", "pass", &table);
    assert_check(&checks, "audit directory", "pass", &table);
    assert_check(&checks, "token keys", "pass", &table);
    assert_check(&checks, "checkpoint key", "pass", &table);
    assert_check(&checks, "socket lockdown", "warn", &table); // the clients' path is not served yet

}

/// doctor with the gateway running: every check passes.
fn check_doctor_with_gateway(ns: &Ns) {
    let (code, checks, table) = doctor(ns);
    for c in [
        "config",
        "kernel",
        "bpf features",
        "capabilities",
        "cgroup v2",
        "programs attached",
        "socket lockdown",
        "postgres loopback",
        "audit directory",
        "token keys",
        "checkpoint key",
        "tls certificate",
    ] {
        assert_check(&checks, c, "pass", &table);
    }
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains("pgward serve: running"), "{table}");
    assert!(checks["capabilities"].1.contains("CAP_BPF CAP_NET_ADMIN CAP_PERFMON"), "{table}");
    assert!(!checks["capabilities"].1.contains("CAP_SYS_ADMIN"), "{table}");

}

/// doctor fails a checkpoint key others can read, naming the fix; passes again once fixed.
fn check_doctor_checkpoint_key_mode(ns: &Ns, tree: &Tree) {
    use std::os::unix::fs::PermissionsExt;
    let key = tree.p("/etc/pgward/keys/checkpoint-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
    let (code, checks, table) = doctor(ns);
    assert_eq!(code, Some(1), "{table}");
    assert_check(&checks, "checkpoint key", "fail", &table);
    assert!(table.contains("chmod 0400"), "{table}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let (_, checks, table) = doctor(ns);
    assert_check(&checks, "checkpoint key", "pass", &table);
}

/// Sessions through pgward by TCP to :5432 from the intercepted cgroup and by the default
/// socket path; the real socket and the service password get nobody in. Returns the marker
/// alice's statement carries.
fn check_sessions(ns: &Ns, cg: &TestCg, svc_password: &str) -> String {
    let status = ns_run(ns, PGWARD, &["status", "--config", CONFIG]);
    assert!(status.success() && status.stdout.contains("interception: on"), "{}", status.describe());

    let token = ns_run(
        ns,
        PGWARD,
        &["token", "issue", "--config", CONFIG, "--user", "alice", "--groups", "analysts", "--ttl", "10m"],
    )
    .expect_ok();
    let marker = format!("appliance-{}", common::rand_hex(10));

    // 1. TCP to the Postgres port from the intercepted cgroup: lands in pgward.
    let tcp = "host=127.0.0.1 port=5432 user=alice dbname=app sslmode=require";
    let out = psql(
        ns,
        As::Root,
        Some(&cg.path),
        tcp,
        Some(&token),
        &format!(
            "create table notes(id int primary key, body text); insert into notes values (1, '{marker}'); \
             select current_user || '|' || current_setting('application_name') || '|' || body from notes"
        ),
    );
    let rows = out.expect_ok();
    assert!(
        rows.ends_with(&format!("pgward_svc|pgward:alice|{marker}"))
            || rows.contains(&format!("pgward_svc|pgward:alice:psql|{marker}")),
        "{rows}"
    );

    // 2. The default socket path, as an unprivileged user: pgward's socket.
    let out = psql(
        ns,
        As::User(65534, 65534),
        None,
        "host=/var/run/postgresql port=5432 user=alice dbname=app",
        Some(&token),
        "select current_user || ':' || count(*) from notes",
    );
    assert_eq!(out.expect_ok(), "pgward_svc:1");

    // 3. Bypasses: the real socket is closed to others; the service password is not a token.
    let out = psql(
        ns,
        As::User(65534, 65534),
        None,
        "host=/run/postgresql-real port=5432 user=pgward_svc dbname=app",
        Some(svc_password),
        "select 1",
    );
    assert!(!out.success() && out.stderr.contains("Permission denied"), "{}", out.describe());
    let out = psql(
        ns,
        As::User(65534, 65534),
        Some(&cg.path),
        "host=127.0.0.1 port=5432 user=pgward_svc dbname=app sslmode=require",
        Some(svc_password),
        "select 1",
    );
    assert!(
        !out.success() && out.stderr.contains("pgward: token authentication failed"),
        "the service password through :5432 lands in pgward and is refused: {}",
        out.describe()
    );

    marker
}

/// The audit log has alice's statement (with what the kernel saw), verifies, and its
/// directory is append-only even for root.
fn check_audit_log(ns: &Ns, tree: &Tree, marker: &str) {
    let verify = ns_run(ns, PGWARD, &["audit", "verify", "--config", CONFIG]);
    assert!(verify.success(), "{}", verify.describe());
    let tail = ns_run(ns, PGWARD, &["audit", "tail", "--config", CONFIG, "--json"]).expect_ok();
    assert!(tail.contains(marker), "{tail}");
    assert!(tail.contains("\"via\":\"connect4\""), "the login record names the intercepted client: {tail}");
    let segment = std::fs::read_dir(tree.p("/var/lib/pgward/audit"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("an audit segment");
    let rm = std::fs::remove_file(&segment).unwrap_err();
    assert_eq!(rm.raw_os_error(), Some(libc::EPERM), "removing {} must fail: {rm}", segment.display());

}

/// vagrant/provision.sh in an isolated root with Debian's cluster layout (apt and systemctl
/// skipped): the demo user's plain `psql` lands in pgward; provisioning again is harmless;
/// `pgward uninstall` keeps a verifiable audit log.
#[test]
fn provision_script_in_isolated_root() {
    require_root();
    let tree = Tree::new(Layout::Debian);
    let cg = TestCg::new("provision");
    let ns = Ns::new(&tree);
    let mut postgres = start_postgres(&ns, &tree);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant/provision.sh");
    let provision = || {
        let mut cmd = ns.cmd("/bin/bash");
        cmd.arg(&script)
            .current_dir("/")
            .env("PGWARD_PROVISION_SKIP_APT", "1")
            .env("PGWARD_PROVISION_NO_SYSTEMD", "1")
            .env("PGWARD_BIN", pgward_bin())
            .env("PGWARD_PG_USER", &tree.pg.name)
            .env(
                "PGWARD_INSTALL_ARGS",
                format!(
                    "--intercept-cgroup {} --gateway-cgroup {}",
                    cg.path.display(),
                    cg.svc().join("gateway").display()
                ),
            )
            .env("HOME", "/root")
            .env("PGWARD_LOG", "warn");
        run_cmd(&mut cmd, None, Duration::from_secs(300))
    };
    let out = provision();
    assert!(out.success(), "provision.sh failed: {}", out.describe());
    assert!(
        out.stdout.contains("apt: skipped")
            && out.stdout.contains("pgward installed")
            && out.stdout.contains("==> provision: done"),
        "{}",
        out.describe()
    );

    // Debian layout: a conf.d drop-in, postgresql.conf itself untouched.
    let dropin = std::fs::read_to_string(tree.p("/etc/postgresql/15/main/conf.d/zz-pgward.conf")).unwrap();
    assert!(dropin.contains("unix_socket_directories = '/run/postgresql-real'"), "{dropin}");
    assert!(!std::fs::read_to_string(tree.p("/etc/postgresql/15/main/postgresql.conf")).unwrap().contains("pgward"));
    let (demo_uid, demo_gid) = tree.user("demo").expect("provision created the demo user");
    assert_eq!(mode_owner(&tree.p("/home/demo/.pgpass")), (0o600, demo_uid, demo_gid));
    assert_eq!(mode_owner(&tree.p("/root/pgward-svc.password")).0, 0o600);

    // What `systemctl restart postgresql; systemctl start pgward` would do.
    assert!(postgres.stop(libc::SIGINT).unwrap().success());
    let mut postgres = start_postgres(&ns, &tree);
    let mut gw = start_pgward(&ns, &tree, &cg);

    // The demo user's login shell: plain psql, token from ~/.pgpass, default socket → pgward.
    let mut cmd = ns.cmd("setpriv");
    cmd.args([&format!("--reuid={demo_uid}"), &format!("--regid={demo_gid}"), "--clear-groups", "--"])
        .args(["/bin/bash", "-lc", "psql -X -At -c 'select current_user, name from customers order by id limit 1'"])
        .current_dir("/")
        .env("HOME", "/home/demo")
        .env("USER", "demo")
        .env_remove("PGPASSFILE");
    let out = run_cmd(&mut cmd, None, Duration::from_secs(60));
    assert_eq!(out.expect_ok(), "pgward_svc|Ada Lovelace", "{}", out.describe());
    let tail = ns_run(&ns, PGWARD, &["audit", "tail", "--config", CONFIG, "--json"]).expect_ok();
    assert!(tail.contains("\"user\":\"demo\"") && tail.contains("from customers"), "{tail}");

    // Provisioning again keeps the installation (and renews the token).
    let out = provision();
    assert!(out.success() && out.stdout.contains("already installed"), "second provision: {}", out.describe());
    let (code, _, table) = doctor(&ns);
    assert_eq!(code, Some(0), "{table}");

    stop_pgward(&mut gw, &tree);
    assert!(postgres.stop(libc::SIGINT).unwrap().success());

    // Uninstall without --purge (inside the namespace: the tree is /, the default root).
    let out = ns_run(&ns, PGWARD, &["uninstall", "--no-systemctl"]);
    let report = out.expect_ok();
    assert!(report.contains("Kept: the audit log"), "{report}");
    // The pinned interception (it outlived pgward's stop) is detached by uninstall, audited.
    assert!(report.contains("detached 8 interception programs"), "{report}");
    for gone in [
        "/etc/pgward",
        "/etc/systemd/system/pgward.service",
        "/etc/tmpfiles.d/pgward.conf",
        "/etc/postgresql/15/main/conf.d/zz-pgward.conf",
        "/run/postgresql-real",
        "/var/lib/pgward/install-manifest.json",
        PGWARD,
    ] {
        assert!(!tree.p(gone).exists(), "{gone} is still there after uninstall");
    }
    assert!(tree.user("pgward").is_none(), "user pgward is still there");
    assert!(tree.user("demo").is_some(), "the demo user is provision's, not install's");
    assert_eq!(mode_owner(&tree.p("/var/lib/pgward/audit")), (0o750, 0, 0));
    // The kept log still verifies, with the config uninstall left for that.
    let verify = ns_run(&ns, pgward_bin(), &["audit", "verify", "--config", "/var/lib/pgward/retired/pgward.toml"]);
    assert!(verify.success(), "{}", verify.describe());
    let again = ns_run(&ns, pgward_bin(), &["uninstall", "--no-systemctl"]);
    assert!(!again.success() && again.stderr.contains("not installed"), "{}", again.describe());
}

// ---- the Debian package ----------------------------------------------------------------------

/// The .deb, built by `cargo xtask package`'s code from this pgward and the eBPF object.
fn build_deb(out: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let object = workspace.join("target/bpf/gateway-ebpf.o");
    assert!(object.is_file(), "no eBPF object at {} (cargo xtask build-ebpf)", object.display());
    let inputs = xtask::deb::Inputs {
        workspace,
        binary: pgward_bin().into(),
        object,
        version: "0.0.0~test".into(),
        arch: xtask::deb::host_arch().expect("dpkg --print-architecture"),
    };
    xtask::deb::build(&inputs, out).unwrap_or_else(|e| panic!("building the .deb: {e:#}"))
}

/// `dpkg --root=TREE ARGS…`, maintainer scripts run outside a chroot with `$DPKG_ROOT` = the
/// tree (the tree has no shell of its own), dependencies not checked (the tree's dpkg database
/// knows no libc6), dpkg's log outside the tree.
fn dpkg(tree: &Tree, args: &[&str]) -> CmdOut {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", tree.root.display()))
        .arg(format!("--log={}", tree.work.join("dpkg.log").display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args)
        .env("PGWARD_LOG", "warn");
    run_cmd(&mut cmd, None, Duration::from_secs(300))
}

/// The Debian package in an isolated root: dpkg installs the binary, the eBPF object, the unit
/// template and the default config (modes, owners, bytes) and starts nothing (no unit, nothing
/// under /etc); `pgward install` run from the package's binary uses it in place (the unit runs
/// /usr/bin/pgward, nothing copied to /usr/local/bin); `dpkg -r` runs the prerm, which undoes
/// the install: every file, mode and owner as before, but the audit log `uninstall` keeps and
/// dpkg's own database.
#[test]
fn deb_installs_files_only_and_removing_it_undoes_pgward_install() {
    require_root();
    let tree = Tree::new(Layout::Debian);
    for d in ["/var/lib/dpkg", "/var/lib/dpkg/info", "/var/lib/dpkg/updates", "/var/lib/dpkg/triggers"] {
        mkdir(&tree.p(d), 0o755, 0, 0);
    }
    write(&tree.p("/var/lib/dpkg/status"), "", 0o644, 0, 0);
    let deb = build_deb(&tree.work);
    let before = snapshot(&tree.root);

    let out = dpkg(&tree, &["-i", deb.to_str().unwrap()]);
    assert!(out.success(), "dpkg -i: {}", out.describe());
    let object = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/gateway-ebpf.o");
    // The package ships the binary without its debug information, as Debian packages do.
    let stripped = deb.with_extension("pgward-stripped");
    let strip = std::process::Command::new("strip").arg("--strip-debug").arg("-o").arg(&stripped).arg(pgward_bin()).status();
    assert!(strip.is_ok_and(|s| s.success()), "strip --strip-debug {}", pgward_bin());
    assert!(std::fs::metadata(&stripped).unwrap().len() < std::fs::metadata(pgward_bin()).unwrap().len());
    for (path, mode, same_as) in [
        ("/usr/bin/pgward", 0o755, Some(stripped.clone())),
        ("/usr/lib/pgward/gateway-ebpf.o", 0o644, Some(object)),
        ("/usr/share/pgward/pgward.service", 0o644, None),
        ("/usr/share/pgward/pgward.toml", 0o644, None),
        ("/usr/share/doc/pgward/copyright", 0o644, None),
    ] {
        assert_eq!(mode_owner(&tree.p(path)), (mode, 0, 0), "{path}");
        if let Some(src) = same_as {
            assert!(std::fs::read(tree.p(path)).unwrap() == std::fs::read(&src).unwrap(), "{path} is not {}", src.display());
        }
    }
    let verify = dpkg(&tree, &["--verify", "pgward"]);
    assert!(verify.success() && verify.stdout.trim().is_empty(), "dpkg --verify: {}", verify.describe());
    let template = std::fs::read_to_string(tree.p("/usr/share/pgward/pgward.service")).unwrap();
    assert!(template.contains("ExecStart=/usr/bin/pgward serve --config /etc/pgward/pgward.toml"), "{template}");
    let added: Vec<String> = snapshot_diff(&before, &snapshot(&tree.root))
        .into_iter()
        .filter(|d| !d.contains(" /var/lib/dpkg"))
        .filter(|d| !(d.starts_with("+ /usr/bin") || d.starts_with("+ /usr/lib") || d.starts_with("+ /usr/share")))
        .collect();
    assert!(added.is_empty(), "the package touched more than /usr: {added:?}");

    // pgward install, from the package's binary.
    let pwfile = tree.work.join("svc.password");
    write(&pwfile, "package-test-password\n", 0o600, 0, 0);
    let mut cmd = Command::new(tree.p("/usr/bin/pgward"));
    cmd.args(["install", "--root", tree.root.to_str().unwrap(), "--pg-user", &tree.pg.name])
        .args(["--upstream-password-file", pwfile.to_str().unwrap(), "--database", "app"])
        .env("PGWARD_LOG", "warn");
    let out = run_cmd(&mut cmd, None, Duration::from_secs(120));
    assert!(out.success() && out.stdout.contains("pgward installed into"), "{}", out.describe());
    let unit = std::fs::read_to_string(tree.p("/etc/systemd/system/pgward.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/pgward serve"), "the unit runs the package's binary:\n{unit}");
    assert!(!tree.p("/usr/local/bin/pgward").exists(), "install copied the package's binary");
    assert!(tree.user("pgward").is_some());

    // Removing the package undoes the install (prerm: pgward uninstall).
    let out = dpkg(&tree, &["-r", "pgward"]);
    assert!(out.success() && out.stdout.contains("pgward uninstalled"), "dpkg -r: {}", out.describe());
    let left: Vec<String> = snapshot_diff(&before, &snapshot(&tree.root))
        .into_iter()
        .filter(|d| !d.contains(" /var/lib/dpkg"))
        .filter(|d| !d.starts_with("+ /var/lib/pgward"))
        .collect();
    assert!(left.is_empty(), "removing the package left traces:\n{}", left.join("\n"));
    assert!(tree.p("/var/lib/pgward/audit").is_dir(), "the audit log is kept");
    assert!(tree.user("pgward").is_none());
}

/// A failed install (postgresql.auto.conf would override the socket directory) changes nothing.
#[test]
fn failed_install_leaves_no_trace() {
    require_root();
    let tree = Tree::new(Layout::InData);
    let auto = tree.p(&format!("{DATA_DIR}/postgresql.auto.conf"));
    let text = std::fs::read_to_string(&auto).unwrap() + "unix_socket_directories = '/tmp'\n";
    std::fs::write(&auto, text).unwrap();
    let before = snapshot(&tree.root);
    let out = install_cli(&[
        "install",
        "--root",
        tree.root.to_str().unwrap(),
        "--pg-data",
        DATA_DIR,
        "--pg-user",
        &tree.pg.name,
        "--no-systemctl",
    ]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("postgresql.auto.conf") && out.stderr.contains("everything it changed was undone"),
        "{}",
        out.describe()
    );
    let diff = snapshot_diff(&before, &snapshot(&tree.root));
    assert!(diff.is_empty(), "a failed install left traces:\n{}", diff.join("\n"));
}

/// The Vagrantfile is valid Ruby for a Debian 12 box provisioned by provision.sh; the script is
/// valid bash.
#[test]
fn vagrantfile_is_valid_ruby() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant");
    let vagrantfile = dir.join("Vagrantfile");
    let text = std::fs::read_to_string(&vagrantfile).unwrap();
    assert!(text.contains("config.vm.box = \"debian/bookworm64\""), "{text}");
    assert!(text.contains("path: \"provision.sh\""), "{text}");
    let bash = run_cmd(Command::new("bash").arg("-n").arg(dir.join("provision.sh")), None, Duration::from_secs(30));
    assert!(bash.success(), "{}", bash.describe());
    let ruby = run_cmd(Command::new("sh").args(["-c", "command -v ruby"]), None, Duration::from_secs(10));
    assert!(ruby.success(), "ruby is needed to check vagrant/Vagrantfile (apt-get install ruby; .ci/run installs it)");
    let out = run_cmd(Command::new("ruby").arg("-c").arg(&vagrantfile), None, Duration::from_secs(60));
    assert!(out.success() && out.stdout.contains("Syntax OK"), "{}", out.describe());
}
