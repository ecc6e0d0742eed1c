//! Install's changes, in order, each recorded in the journal as it is made (so a failed
//! install can be undone), and the report of what was installed.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, anyhow, bail};

use crate::config::Config;
use crate::host::files::set_append_only;
use super::account::ensure_user;
use super::cmd::{run_cmd, run_systemctl, sh_quote};
use super::files::{chown_tree, set_attrs, sha256_hex, write_file};
use super::manifest::{Change, Fallback, FileEdit, Journal};
use super::pg_conf::{edit_pg_conf, edit_user_clusters};
use super::plan::Plan;
use super::tree::{ACCESS_DIR, AUDIT_DIR, BACKUP_DIR, CONFIG_DIR, CONFIG_FILE, MANIFEST, STATE_DIR, STATE_FILE, TMPFILES_FILE, UNIT_FILE, UNIT_NAME};
use super::unit::{UnitParams, unit_text};

/// Make the changes, recording each in the journal.
pub(super) fn apply(plan: &Plan, j: &mut Journal, notes: &mut Vec<String>) -> anyhow::Result<()> {
    state_dir(plan, j)?;
    let (uid, gid) = ensure_user(plan, j)?;
    set_attrs(&plan.root.p(STATE_DIR), 0o750, 0, gid)?;
    install_binary(plan, j)?;
    config_dir(plan, j, uid, gid, notes)?;
    data_dirs(plan, j, uid, gid, notes)?;
    let public = socket_dirs(plan, j, gid)?;
    // Postgres: loopback only, socket moved; Debian's client wrapper told about it.
    edit_pg_conf(plan, j, notes)?;
    edit_user_clusters(plan, j, notes)?;
    write_unit(plan, j, &public, notes)?;
    if plan.systemctl {
        start_services(plan, j)?;
    }
    Ok(())
}

/// The state directory first: the manifest and the backups live there. From here on the
/// journal is written to disk.
fn state_dir(plan: &Plan, j: &mut Journal) -> anyhow::Result<()> {
    let root = &plan.root;
    let existing = std::fs::metadata(root.p(STATE_DIR)).ok();
    if existing.as_ref().is_some_and(|m| !m.is_dir()) {
        bail!("{} is not a directory", root.p(STATE_DIR).display());
    }
    j.mkdirs(Path::new(STATE_DIR), 0o750, 0, 0, false)?;
    j.live = true;
    if let Some(m) = existing {
        j.m.changes.push(Change::Attrs { path: STATE_DIR.into(), mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() });
    }
    j.persist()?;
    let backup = root.p(BACKUP_DIR);
    std::fs::create_dir_all(&backup).with_context(|| format!("creating {}", backup.display()))?;
    set_attrs(&backup, 0o700, 0, 0)?;
    Ok(())
}

/// The binary, unless the target already is this file.
fn install_binary(plan: &Plan, j: &mut Journal) -> anyhow::Result<()> {
    let root = &plan.root;
    let dest_host = root.p(&plan.bin_dest);
    let same = plan.binary.canonicalize().ok().zip(dest_host.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    if !same {
        if let Some(dir) = plan.bin_dest.parent() {
            j.mkdirs(dir, 0o755, 0, 0, false)?;
        }
        let before = j.save(&plan.bin_dest)?;
        let bytes = std::fs::read(&plan.binary).with_context(|| format!("reading {}", plan.binary.display()))?;
        if before.existed {
            j.record(Change::Edit(FileEdit {
                path: plan.bin_dest.clone(),
                before,
                after: Some(sha256_hex(&bytes)),
                fallback: Fallback::Leave,
            }))?;
        } else {
            j.record(Change::File { path: plan.bin_dest.clone() })?;
        }
        write_file(&dest_host, &bytes, 0o755, 0, 0)?;
    }
    Ok(())
}

/// The configuration directory (recorded as a tree: uninstall removes all of it).
fn config_dir(plan: &Plan, j: &mut Journal, uid: u32, gid: u32, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    let config_dir = root.p(CONFIG_DIR);
    if let Some(parent) = Path::new(CONFIG_DIR).parent() {
        j.mkdirs(parent, 0o755, 0, 0, false)?;
    }
    j.record(Change::Tree { path: CONFIG_DIR.into() })?;
    write_config(plan, &config_dir, uid, gid, notes)
}

/// The audit log (append-only where the file system allows) and the access state.
fn data_dirs(plan: &Plan, j: &mut Journal, uid: u32, gid: u32, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    j.mkdirs(Path::new(AUDIT_DIR), 0o750, uid, gid, true)?;
    if plan.append_only {
        match set_append_only(&root.p(AUDIT_DIR), true) {
            Ok(()) => j.record(Change::AppendOnly { path: AUDIT_DIR.into() })?,
            Err(e) => notes
                .push(format!("{} is not append-only: the file system does not support `chattr +a` ({e})", AUDIT_DIR)),
        }
    }
    j.mkdirs(Path::new(ACCESS_DIR), 0o700, uid, gid, true)?;
    Ok(())
}

/// The real Postgres socket's directory (only Postgres and group pgward may enter), the
/// clients' socket directory when it is missing, and the tmpfiles.d entry that recreates them
/// at boot. Returns where the clients' directory is in the tree.
fn socket_dirs(plan: &Plan, j: &mut Journal, gid: u32) -> anyhow::Result<PathBuf> {
    let root = &plan.root;
    let mut tmpfiles = format!(
        "# pgward (written by `pgward install`): the real PostgreSQL socket lives where only\n\
         # {pg} and group {user} (pgward) can enter; clients' socket path is pgward's.\n\
         d {real} 0750 {pg} {user} - -\n",
        pg = plan.pg_user,
        user = plan.user,
        real = plan.real_socket_dir.display(),
    );
    let real = root.p(&plan.real_socket_dir);
    if real.exists() {
        let m = std::fs::metadata(&real).with_context(|| format!("stat {}", real.display()))?;
        if !m.is_dir() {
            bail!("{} exists and is not a directory", real.display());
        }
        j.record(Change::Attrs {
            path: plan.real_socket_dir.clone(),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })?;
        set_attrs(&real, 0o750, plan.pg_uid, gid)?;
    } else {
        j.mkdirs(&plan.real_socket_dir, 0o750, plan.pg_uid, gid, false)?;
    }
    let public = root.p(&plan.socket_dir);
    if !public.exists() {
        j.mkdirs(&plan.socket_dir, 0o2775, plan.pg_uid, plan.pg_gid, false)?;
        let _ = writeln!(
            tmpfiles,
            "d {} 2775 {} {} - -",
            plan.socket_dir.display(),
            plan.pg_user,
            root.accounts().group_name(plan.pg_gid).unwrap_or_else(|| plan.pg_gid.to_string())
        );
    }
    j.mkdirs(Path::new("/etc/tmpfiles.d"), 0o755, 0, 0, false)?;
    j.record(Change::File { path: TMPFILES_FILE.into() })?;
    write_file(&root.p(TMPFILES_FILE), tmpfiles.as_bytes(), 0o644, 0, 0)?;

    Ok(public)
}

/// The systemd unit, with the clients' socket directory's group as a supplementary group when
/// pgward needs it to create its socket there.
fn write_unit(plan: &Plan, j: &mut Journal, public: &Path, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    let socket_group = {
        let m = std::fs::metadata(public).with_context(|| format!("stat {}", public.display()))?;
        let accounts = root.accounts();
        if m.mode() & 0o020 != 0 && m.gid() != 0 {
            accounts.group_name(m.gid())
        } else {
            notes.push(format!(
                "{} is not group-writable: pgward (user {}) cannot create its socket there; make it \
                 writable by a group and add that group to SupplementaryGroups= in {}",
                plan.socket_dir.display(),
                plan.user,
                UNIT_FILE
            ));
            None
        }
    };
    j.mkdirs(Path::new("/etc/systemd/system"), 0o755, 0, 0, false)?;
    j.record(Change::File { path: UNIT_FILE.into() })?;
    let unit = unit_text(&UnitParams {
        exec: plan.bin_dest.clone(),
        user: plan.user.clone(),
        supplementary_group: socket_group,
        socket_dir: plan.socket_dir.clone(),
        pg_service: plan.pg_service.clone(),
    });
    write_file(&root.p(UNIT_FILE), unit.as_bytes(), 0o644, 0, 0)?;
    Ok(())
}

/// systemd picks up the unit, Postgres restarts with its new socket directory and address,
/// pgward is enabled and started.
fn start_services(plan: &Plan, j: &mut Journal) -> anyhow::Result<()> {
    run_systemctl(&["daemon-reload"])?;
    run_systemctl(&["restart", &plan.pg_service])?;
    j.record(Change::Enabled { unit: UNIT_NAME.into() })?;
    run_systemctl(&["enable", "--now", UNIT_NAME])?;
    Ok(())
}

/// `pgward init` (this binary, as a child process) into DIR, then the appliance settings.
/// The checkpoint key is then the service user's (`uid`) alone, mode 0400: root and the
/// writer read it, the group pgward and `pgward token issue` do not need it.
pub(super) fn write_config(plan: &Plan, dir: &Path, uid: u32, gid: u32, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let mut cmd = Command::new(&plan.binary);
    cmd.arg("init")
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &plan.listen.to_string(), "--upstream", &plan.upstream_url])
        .env("PGWARD_LOG", "warn");
    if let Some(pw) = &plan.password_file {
        cmd.arg("--upstream-password-file").arg(pw);
    }
    run_cmd(&mut cmd).context("pgward init")?;

    let path = dir.join("pgward.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut t: toml::Table = toml::from_str(&text).with_context(|| format!("{} (written by init)", path.display()))?;
    appliance_settings(plan, &mut t, &path, dir, gid, notes)?;
    write_checked(&path, &t, gid)?;
    // init made an audit directory next to the config; the installed one is AUDIT_DIR.
    let _ = std::fs::remove_dir(dir.join("audit"));
    // Everything readable by group pgward only; nothing writable by it.
    chown_tree(dir, 0, gid, 0o750, 0o640)?;
    let cfg = crate::config::Config::load(&path).with_context(|| format!("{} (written by install)", path.display()))?;
    if let Some(key) = &cfg.audit.checkpoint_key {
        set_attrs(&cfg.resolve(key), crate::cli::init::CHECKPOINT_KEY_MODE, uid, gid)?;
    }
    Ok(())
}

/// The appliance's settings in init's config `t` (read from `path`): pgward's socket where
/// clients look, the service password (generated into DIR unless given), the audit directory,
/// and interception of the Postgres port with the real socket checked.
fn appliance_settings(
    plan: &Plan,
    t: &mut toml::Table,
    path: &Path,
    dir: &Path,
    gid: u32,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let table = |t: &mut toml::Table, k: &str| -> anyhow::Result<toml::Table> {
        Ok(match t.remove(k) {
            Some(toml::Value::Table(x)) => x,
            None => toml::Table::new(),
            Some(_) => bail!("{k} is not a table in {}", path.display()),
        })
    };
    let s = |p: &Path| toml::Value::String(p.display().to_string());

    let mut server = table(&mut *t, "server")?;
    server.insert("unix_socket_dir".into(), s(&plan.socket_dir));
    server.insert("unix_socket_port".into(), toml::Value::Integer(plan.pg_port.into()));
    t.insert("server".into(), server.into());

    let mut upstream = table(&mut *t, "upstream")?;
    if plan.password_file.is_none() {
        let mut pw = [0u8; 18];
        getrandom::fill(&mut pw).map_err(|e| anyhow!("no randomness: {e}"))?;
        write_file(&dir.join("upstream.password"), format!("{}\n", hex::encode(pw)).as_bytes(), 0o640, 0, gid)?;
        upstream.insert("password_file".into(), "upstream.password".into());
        notes.push(format!(
            "a service password was generated into {CONFIG_DIR}/upstream.password; create the role with it:\n    \
             printf \"CREATE ROLE %s LOGIN PASSWORD '%s';\\nGRANT pg_signal_backend, pg_read_all_settings TO %s;\\n\" \\\n      \
             {role} \"$(head -n1 {CONFIG_DIR}/upstream.password)\" {role} \\\n      \
             | runuser -u {pg} -- psql -h {real} -p {port}",
            role = sh_quote(&plan.service_role),
            pg = plan.pg_user,
            real = plan.real_socket_dir.display(),
            port = plan.pg_port,
        ));
    }
    t.insert("upstream".into(), upstream.into());

    let mut audit = table(&mut *t, "audit")?;
    audit.insert("dir".into(), AUDIT_DIR.into());
    t.insert("audit".into(), audit.into());

    let mut ic = toml::Table::new();
    ic.insert("enabled".into(), plan.intercept.into());
    if let Some(c) = &plan.intercept_cgroup {
        ic.insert("cgroup".into(), s(c));
    }
    ic.insert("gateway_cgroup".into(), s(&plan.gateway_cgroup));
    let accounts = plan.root.accounts();
    if let Some((pgward_uid, _)) = accounts.user(&plan.user) {
        ic.insert("exempt_uid".into(), toml::Value::Integer(pgward_uid.into()));
    }
    ic.insert(
        "protected".into(),
        toml::Value::Array(vec![format!("0.0.0.0:{}", plan.pg_port).into(), format!("[::]:{}", plan.pg_port).into()]),
    );
    ic.insert("unix_socket_check".into(), "refuse".into());
    ic.insert("upstream_socket_dirs".into(), toml::Value::Array(vec![s(&plan.real_socket_dir)]));
    ic.insert("state_file".into(), STATE_FILE.into());
    t.insert("intercept".into(), ic.into());

    Ok(())
}

/// Write the config with `[access]` pointing at the state directory, and check that it loads;
/// a build whose config has no `[access]` gets the config without it.
fn write_checked(path: &Path, t: &toml::Table, gid: u32) -> anyhow::Result<()> {
    // `[access]` (revocations, JIT grants) exists in builds that have it: its state must be
    // writable by the service, so it lives under /var/lib/pgward, not /etc.
    let mut with_access = t.clone();
    let mut access = match with_access.remove("access") {
        Some(toml::Value::Table(x)) => x,
        _ => toml::Table::new(),
    };
    access.insert("state_dir".into(), ACCESS_DIR.into());
    with_access.insert("access".into(), access.into());

    let header = "# pgward configuration, written by `pgward install` (see `pgward uninstall`).\n\
                  # Relative paths are resolved against the directory holding this file.\n\n";
    let body = format!("{header}{}", toml::to_string_pretty(&with_access)?);
    write_file(path, body.as_bytes(), 0o640, 0, gid)?;
    if let Err(e) = Config::load(path) {
        let msg = format!("{e}");
        if !msg.contains("access") {
            return Err(e).context("the installed config does not load (bug)");
        }
        let body = format!("{header}{}", toml::to_string_pretty(t)?);
        write_file(path, body.as_bytes(), 0o640, 0, gid)?;
        Config::load(path).context("the installed config does not load (bug)")?;
    }
    Ok(())
}

pub(super) fn install_report(plan: &Plan, notes: &[String]) -> String {
    let mut o = String::new();
    let r = &plan.root;
    let where_ = if r.host() { String::new() } else { format!(" into {}", r.dir.display()) };
    let _ = writeln!(o, "pgward installed{where_}:");
    let line = |o: &mut String, a: &str, b: &str| {
        let _ = writeln!(o, "  {a:<38} {b}");
    };
    line(&mut o, &format!("user {}", plan.user), "system user and group");
    line(&mut o, &plan.bin_dest.display().to_string(), "the binary");
    line(&mut o, CONFIG_FILE, "configuration (0640 root:pgward; keys, TLS, policy next to it)");
    line(&mut o, AUDIT_DIR, "audit log (pgward 0750, append-only where supported)");
    line(&mut o, ACCESS_DIR, "revocations and JIT grants");
    line(
        &mut o,
        &plan.real_socket_dir.display().to_string(),
        &format!("the real Postgres socket (0750 {}:{})", plan.pg_user, plan.user),
    );
    line(
        &mut o,
        &plan.pg_conf.display().to_string(),
        &format!(
            "Postgres: listen_addresses = '{}', unix_socket_directories = '{}'",
            plan.pg_listen,
            plan.real_socket_dir.display()
        ),
    );
    line(&mut o, UNIT_FILE, "sandboxed systemd unit");
    line(&mut o, MANIFEST, "what changed (for `pgward uninstall`)");
    let _ = writeln!(
        o,
        "\nClients: `psql -h {} -p {}` (the default socket) or TCP port {} — both land in pgward (token as password).",
        plan.socket_dir.display(),
        plan.pg_port,
        plan.pg_port
    );
    if !plan.intercept {
        let _ =
            writeln!(o, "Interception is off ([intercept] enabled = false): TCP clients must dial {}.", plan.listen);
    }
    for n in notes {
        let _ = writeln!(o, "Note: {n}");
    }
    if plan.systemctl {
        let _ = writeln!(
            o,
            "\nPostgres was restarted; pgward is enabled and running. Check: pgward doctor --config {CONFIG_FILE}"
        );
    } else {
        let _ = writeln!(
            o,
            "\nNext: restart Postgres (its socket moves to {}), then start pgward \
             (systemctl enable --now {UNIT_NAME}), then: pgward doctor --config {CONFIG_FILE}",
            plan.real_socket_dir.display()
        );
    }
    o
}
