//! `pgward install` / `pgward uninstall`: turn a Debian-like host running PostgreSQL into a
//! pgward appliance, and back.
//!
//! `install` (as root; `--root DIR` applies everything to the tree under DIR instead of `/`):
//!
//! | what | where |
//! |---|---|
//! | system user + group `pgward` (`useradd --system`) | /etc/passwd, group, shadow, gshadow |
//! | the binary (`--bin-dir`; run from the Debian package's /usr/bin/pgward, that one is used in place) | /usr/local/bin/pgward |
//! | configuration (`pgward init` + the appliance settings), `0750/0640 root:pgward` | /etc/pgward/ |
//! | audit log, `pgward:pgward 0750`, append-only (`chattr +a`) where the file system allows | /var/lib/pgward/audit |
//! | access state (revocations, JIT grants), `pgward:pgward 0700` | /var/lib/pgward/state |
//! | the real Postgres socket, in a directory only postgres and group pgward can enter (`0750 postgres:pgward`); tmpfiles.d entry recreates it at boot | /run/postgresql-real, /etc/tmpfiles.d/pgward.conf |
//! | Postgres bound to loopback, socket moved (a `conf.d` drop-in, or a marked block appended to postgresql.conf) | listen_addresses, unix_socket_directories |
//! | sandboxed systemd unit | /etc/systemd/system/pgward.service |
//! | what was changed, with the original files | /var/lib/pgward/install-manifest.json, install-backup/ |
//!
//! pgward then listens on the path clients use by default (`/run/postgresql/.s.PGSQL.5432`) and on
//! 127.0.0.1:6432, and its eBPF programs steer TCP connects to port 5432 into it. On `/` (and
//! without `--no-systemctl`) it also runs `systemctl daemon-reload`, restarts Postgres and
//! `systemctl enable --now pgward`.
//!
//! `uninstall` undoes the manifest's changes in reverse order: files it replaced or edited come
//! back byte for byte (content, mode, owner, mtime) unless they were changed since, created files
//! and directories go, the user goes. The audit log is kept (owned by root, with a copy of the
//! config and JWKS to verify it: /var/lib/pgward/retired/) unless `--purge`. A step that fails
//! stays in the manifest, so `uninstall` can be run again.

mod account;
mod apply;
mod cmd;
mod files;
mod manifest;
#[cfg(test)]
mod packaging;
mod pg_conf;
mod pg_settings;
mod plan;
mod tree;
mod undo;
mod unit;

use std::process::ExitCode;

use crate::host::clock::now_rfc3339;
use apply::{apply, install_report};
use manifest::{Journal, MANIFEST_FORMAT, Manifest};
use plan::plan;
use tree::{Root, require_root};
use undo::{undo_all, uninstall};

pub use pg_settings::{PgSetting, parse_pg_conf, pg_settings};
pub use plan::InstallArgs;
pub use tree::{ACCESS_DIR, AUDIT_DIR, CONFIG_DIR, CONFIG_FILE, MANIFEST, RETIRED_DIR, RUNTIME_DIR, STATE_DIR, STATE_FILE, TMPFILES_FILE, UNIT_FILE, UNIT_NAME};
pub use undo::UninstallArgs;
pub use unit::{UnitParams, unit_text};

pub fn run_install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let report = install(&args)?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let root = Root::new(&args.root)?;
    require_root()?;
    let (report, ok) = uninstall(&root, args.purge, root.host() && !args.no_systemctl)?;
    print!("{report}");
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn install(args: &InstallArgs) -> anyhow::Result<String> {
    let plan = plan(args)?;
    let root = &plan.root;
    let mut j = Journal {
        root,
        m: Manifest {
            format: MANIFEST_FORMAT,
            pgward_version: env!("CARGO_PKG_VERSION").into(),
            installed_at: now_rfc3339(),
            user: plan.user.clone(),
            pg_service: plan.pg_service.clone(),
            systemctl: plan.systemctl,
            changes: Vec::new(),
        },
        live: false,
        backups: 0,
    };
    let mut notes = Vec::new();
    match apply(&plan, &mut j, &mut notes) {
        Ok(()) => {
            j.persist()?;
            Ok(install_report(&plan, &notes))
        }
        Err(e) => {
            // Undo what was done (nothing is worth keeping from a failed install).
            let m = j.m.clone();
            let undone = if j.live || !m.changes.is_empty() {
                match undo_all(root, &m, true, plan.systemctl) {
                    Ok((_, true)) => "everything it changed was undone".to_string(),
                    Ok((report, false)) => format!("undoing it was incomplete:\n{report}"),
                    Err(u) => format!("undoing it failed: {u:#}"),
                }
            } else {
                "nothing had been changed".to_string()
            };
            Err(e.context(format!("pgward install failed; {undone}")))
        }
    }
}

