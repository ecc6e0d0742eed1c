//! Install's edits to postgresql.conf (listen on loopback, socket moved) and to
//! postgresql-common's user_clusters: a conf.d drop-in or a marked block, which uninstall can
//! take out again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::bail;

use super::files::{replace_file_contents, sha256_hex, write_file};
use super::manifest::{Change, Fallback, FileEdit, Journal};
use super::pg_settings::{PgSetting, parse_pg_conf, pg_settings_in, resolve_pg_path};
use super::plan::Plan;

/// The drop-in install writes into postgresql.conf's include_dir.
pub(super) const DROPIN_NAME: &str = "zz-pgward.conf";
pub(super) const USER_CLUSTERS: &str = "/etc/postgresql-common/user_clusters";
pub(super) const BLOCK_BEGIN: &str = "# BEGIN pgward";
pub(super) const BLOCK_END: &str = "# END pgward";

/// Set listen_addresses and unix_socket_directories: a drop-in in the config's include_dir when
/// it has one (and it wins), else a marked block appended to postgresql.conf. Verified by
/// computing the settings Postgres will use.
pub(super) fn edit_pg_conf(plan: &Plan, j: &mut Journal, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    let settings_text = format!(
        "listen_addresses = '{}'\nunix_socket_directories = '{}'\n",
        plan.pg_listen.replace('\'', "''"),
        plan.real_socket_dir.display().to_string().replace('\'', "''")
    );
    let wins = |s: &BTreeMap<String, PgSetting>| -> Result<(), String> {
        for (k, want) in [
            ("listen_addresses", plan.pg_listen.clone()),
            ("unix_socket_directories", plan.real_socket_dir.display().to_string()),
        ] {
            match s.get(k) {
                Some(v) if v.value == want => {}
                Some(v) => return Err(format!("{k} = '{}' in {} takes precedence", v.value, v.file.display())),
                None => return Err(format!("{k} is not set (bug)")),
            }
        }
        Ok(())
    };

    // A drop-in, when postgresql.conf includes a directory (Debian: include_dir = 'conf.d').
    let main_text = std::fs::read_to_string(root.p(&plan.pg_conf))?;
    let include_dir = parse_pg_conf(&main_text)
        .into_iter()
        .filter(|(k, _)| k == "include_dir")
        .map(|(_, v)| resolve_pg_path(&plan.pg_conf, &v))
        .find(|d| root.p(d).is_dir());
    if let Some(dir) = include_dir {
        let dropin = dir.join(DROPIN_NAME);
        if root.p(&dropin).exists() {
            bail!("{} already exists", root.p(&dropin).display());
        }
        let text = format!(
            "# pgward (written by `pgward install`, removed by `pgward uninstall`): Postgres listens on\n\
             # loopback only and keeps its socket where only pgward can reach it.\n{settings_text}"
        );
        j.record(Change::File { path: dropin.clone() })?;
        let m = std::fs::metadata(root.p(&dir))?;
        write_file(&root.p(&dropin), text.as_bytes(), 0o644, m.uid(), m.gid())?;
        match wins(&pg_settings_in(root, &plan.pg_conf, plan.pg_data.as_deref())?) {
            Ok(()) => return Ok(()),
            Err(why) => {
                notes.push(format!(
                    "a drop-in in {} would not take effect ({why}); appended to {} instead",
                    dir.display(),
                    plan.pg_conf.display()
                ));
                std::fs::remove_file(root.p(&dropin))?;
                j.m.changes.pop();
                j.persist()?;
            }
        }
    }

    // A marked block at the end of postgresql.conf (later settings win).
    let before = j.save(&plan.pg_conf)?;
    let mut text = main_text.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(
        text,
        "\n{BLOCK_BEGIN} (written by `pgward install`, removed by `pgward uninstall`)\n{settings_text}{BLOCK_END}\n"
    );
    j.record(Change::Edit(FileEdit {
        path: plan.pg_conf.clone(),
        before: before.clone(),
        after: Some(sha256_hex(text.as_bytes())),
        fallback: Fallback::StripBlock,
    }))?;
    replace_file_contents(&root.p(&plan.pg_conf), text.as_bytes())?;
    if let Err(why) = wins(&pg_settings_in(root, &plan.pg_conf, plan.pg_data.as_deref())?) {
        bail!("cannot make Postgres listen on loopback with its socket in {}: {why}", plan.real_socket_dir.display());
    }
    Ok(())
}

/// Debian's pg_wrapper (psql, pg_dump, …) connects local users to the socket directory it reads
/// from the cluster's config — after install the real one, which only Postgres and pgward may
/// enter. /etc/postgresql-common/user_clusters says otherwise: Postgres's own user keeps going
/// to the cluster directly, everyone else to the clients' socket path (pgward). Only for a
/// Debian cluster (/etc/postgresql/VERSION/CLUSTER/postgresql.conf) with postgresql-common.
pub(super) fn edit_user_clusters(plan: &Plan, j: &mut Journal, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let root = &plan.root;
    let parts: Vec<String> = plan.pg_conf.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let (version, cluster) = match parts.as_slice() {
        [r, etc, pg, v, c, f] if r == "/" && etc == "etc" && pg == "postgresql" && f == "postgresql.conf" => {
            (v.clone(), c.clone())
        }
        _ => return Ok(()),
    };
    if !root.p("/etc/postgresql-common").is_dir() {
        return Ok(());
    }
    let sys = PathBuf::from(USER_CLUSTERS);
    let host = root.p(&sys);
    let old = std::fs::read_to_string(&host).unwrap_or_default();
    if old.lines().any(|l| {
        let f: Vec<&str> = l.split('#').next().unwrap_or("").split_whitespace().collect();
        f.len() >= 2 && f[0] == "*" && f[1] == "*"
    }) {
        notes.push(format!(
            "{USER_CLUSTERS} already has a line for every user; psql (pg_wrapper) follows it, not pgward's socket path"
        ));
    }
    let mut text = old.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(
        text,
        "\n{BLOCK_BEGIN} (written by `pgward install`, removed by `pgward uninstall`): {pg} reaches the\n\
         # cluster directly; everyone else's psql goes to the default socket path, i.e. pgward.\n\
         {pg}\t*\t{version}\t{cluster}\t*\n\
         *\t*\t{version}\t{sock}:{port}\t*\n{BLOCK_END}\n",
        pg = plan.pg_user,
        sock = plan.socket_dir.display(),
        port = plan.pg_port,
    );
    let before = j.save(&sys)?;
    j.record(Change::Edit(FileEdit {
        path: sys,
        before: before.clone(),
        after: Some(sha256_hex(text.as_bytes())),
        fallback: Fallback::StripBlock,
    }))?;
    if before.existed {
        replace_file_contents(&host, text.as_bytes())?;
    } else {
        write_file(&host, text.as_bytes(), 0o644, 0, 0)?;
    }
    Ok(())
}

pub(super) fn strip_block(text: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let Some(start) = lines.iter().position(|l| l.starts_with(BLOCK_BEGIN)) else {
        return text.to_string();
    };
    let Some(end) = lines[start..].iter().position(|l| l.trim_end() == BLOCK_END).map(|i| start + i) else {
        return text.to_string();
    };
    // The empty line install put before the block goes too.
    let from = if start > 0 && lines[start - 1] == "\n" { start - 1 } else { start };
    let mut out: String = lines[..from].concat();
    out.push_str(&lines[end + 1..].concat());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_strip_keeps_the_rest() {
        let orig = "a = 1\nb = 2\n";
        let with = format!("{orig}\n{BLOCK_BEGIN} (x)\nlisten_addresses = '127.0.0.1'\n{BLOCK_END}\nc = 3\n");
        assert_eq!(strip_block(&with), "a = 1\nb = 2\nc = 3\n");
        assert_eq!(strip_block(orig), orig);
    }
}
