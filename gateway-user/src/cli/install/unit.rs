//! The systemd unit install writes: pgward as its own user, with the eBPF capabilities only,
//! in a sandbox.

use std::path::PathBuf;

use super::tree::{ACCESS_DIR, AUDIT_DIR, CONFIG_FILE};

pub struct UnitParams {
    pub exec: PathBuf,
    pub user: String,
    /// Group that may create sockets in the clients' socket directory.
    pub supplementary_group: Option<String>,
    pub socket_dir: PathBuf,
    pub pg_service: String,
}

/// The systemd unit: pgward as its own user, with the eBPF capabilities only, a read-only
/// system except the audit log (and the socket directory it listens in), no new privileges.
pub fn unit_text(p: &UnitParams) -> String {
    let supp = match &p.supplementary_group {
        Some(g) => format!(
            "# May create its socket in {} (that directory's group).\nSupplementaryGroups={g}\n",
            p.socket_dir.display()
        ),
        None => String::new(),
    };
    format!(
        r#"# pgward: token-authenticated, audited PostgreSQL gateway. Written by `pgward install`;
# `pgward uninstall` removes it. Check the host with: pgward doctor --config {CONFIG_FILE}
[Unit]
Description=pgward PostgreSQL gateway (token login, policies, write-ahead audit log)
After=network.target {pg}
Wants=network.target

[Service]
Type=exec
ExecStart={exec} serve --config {CONFIG_FILE}
Restart=on-failure
RestartSec=2s
User={user}
Group={user}
{supp}UMask=0027

# eBPF interception: load and attach the programs (CAP_BPF, CAP_NET_ADMIN; CAP_PERFMON for the
# verifier's pointer rules). Nothing else.
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON
AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON
NoNewPrivileges=yes
# The programs are pinned in bpffs so that interception outlives pgward (closed while it is
# stopped or restarting); the pin directory is pgward's. '+': run with full privileges, before
# the sandbox below applies.
ExecStartPre=+/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; install -d -m 0700 -o {user} -g {user} /sys/fs/bpf/pgward'
# pgward moves itself into a child cgroup ("gateway") whose connects the programs exempt.
Delegate=yes
# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
LimitMEMLOCK=infinity
LimitNOFILE=65536

# File system: everything read-only but the audit log, the access state, pgward's socket
# directory and its runtime directory (/run/pgward: the interception state file).
ProtectSystem=strict
ReadWritePaths={AUDIT_DIR} {ACCESS_DIR} {sock} -/sys/fs/bpf/pgward
RuntimeDirectory=pgward
RuntimeDirectoryMode=0750
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
# Not ProtectProc=invisible: the audit log names intercepted clients from /proc/<pid>.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# bpf(2) is in @privileged; it is what the capabilities above are for.
SystemCallFilter=bpf
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"#,
        pg = p.pg_service,
        exec = p.exec.display(),
        user = p.user,
        sock = p.socket_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_has_the_sandbox() {
        let u = unit_text(&UnitParams {
            exec: "/usr/local/bin/pgward".into(),
            user: "pgward".into(),
            supplementary_group: Some("postgres".into()),
            socket_dir: "/run/postgresql".into(),
            pg_service: "postgresql.service".into(),
        });
        for needle in [
            "ExecStart=/usr/local/bin/pgward serve --config /etc/pgward/pgward.toml",
            "User=pgward",
            "SupplementaryGroups=postgres",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/pgward/audit /var/lib/pgward/state /run/postgresql",
            "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
            "PrivateTmp=yes",
            "SystemCallFilter=@system-service",
            "SystemCallFilter=bpf",
        ] {
            assert!(u.contains(needle), "unit lacks {needle:?}:\n{u}");
        }
        // The bpf allowance comes after the @privileged deny (later lines win).
        assert!(u.find("SystemCallFilter=bpf").unwrap() > u.find("~@privileged").unwrap());
    }
}
