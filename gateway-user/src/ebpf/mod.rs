//! Transparent interception (`[intercept]`): loads gateway-ebpf's programs, fills their maps,
//! attaches them and pins them in bpffs ([`pins`]), so that interception outlives `serve`.
//!
//! - cgroup/connect4 + connect6 (attached to `intercept.cgroup`, default the cgroup2 root)
//!   rewrite connects to `intercept.protected` to pgward's listener and refuse (EPERM) connects
//!   to `intercept.guard` (default: the real upstream, on every port it says it listens on).
//!   pgward is exempt by its cgroup v2 id: `serve` moves itself into `intercept.gateway_cgroup`
//!   first (and optionally by uid). Only sockets of pgward's network namespace are touched
//!   (netns cookie).
//! - cgroup/getpeername4 + 6: redirected clients still see the address they dialled.
//! - cgroup/bind4 + bind6 (the bind guard, same cgroup): a bind to pgward's ports (its
//!   listener and redirect targets, `PGW_BINDS`) by anyone but pgward fails with EPERM, so no
//!   other local process can listen where the redirect steers clients, while pgward is stopped
//!   or (SO_REUSEPORT) while it runs. pgward binds its listener from its gateway cgroup
//!   ([`Intercept::enter`] runs first), which a restarted pgward re-points the exemption at.
//!   A port the kernel picks itself (bind to port 0) is chosen after the guard ran: `serve`
//!   adds its ports to `net.ipv4.ip_local_reserved_ports` before attaching ([`reserve`]).
//! - sock_ops: records who connected (pid, uid, gid, cgroup, original destination) by 4-tuple;
//!   [`lookup_peer`] hands that to the session for the login record.
//! - sk_lookup (in `intercept.netns`): connections from other hosts to a protected port land on
//!   pgward's listening socket even while Postgres listens there; loopback traffic is left to
//!   connect4/6 (so pgward's own upstream connection is never steered).
//! - Unix sockets: aya cannot attach cgroup/connect_unix. pgward listens on the well-known path
//!   (`server.unix_socket_dir`, e.g. /var/run/postgresql) and the real Postgres socket must live
//!   in a directory only pgward's user (and Postgres's, and root) can enter;
//!   [`check_unix_sockets`] enforces that at start for every directory the upstream says it
//!   uses ([`discover`]) and every configured one (`intercept.unix_socket_check`).
//!
//! Fail closed: links and maps are pinned under [`pins::pin_dir`]. When `serve` exits (SIGTERM,
//! SIGKILL, crash, restart) the programs stay attached: protected connects go to pgward's
//! address where nothing listens (ECONNREFUSED) and the guard keeps refusing (EPERM). A
//! restarted `serve` adopts the pins and re-points the maps at itself ([`attach`]).
//! `pgward intercept detach` (audited) removes the pins.
//!
//! Kernel log lines (aya-log) reach tracing with target `gateway_ebpf` (e.g.
//! `PGWARD_LOG=info,gateway_ebpf=debug`). `serve` writes `intercept.state_file`, which
//! `pgward status` reads together with the pins ([`status`]).
//!
//! Files: `attach` (the [`Intercept`] lifecycle), `programs` (names, load, attach, adoption
//! checks), `maps` (opening and syncing the maps), `plan` (what to steer where, pure), `peer`
//! ([`lookup_peer`]), `cgroups`, `kernel` (capabilities, memlock, kernel log), `net` (host
//! network facts), `reserve` (pgward's ports out of ephemeral allocation), `addr` (kernel address layout), `state` (the state file), `status`,
//! `unix_sockets`, `discover`, `pins`.

mod addr;
mod attach;
mod cgroups;
pub mod discover;
mod kernel;
mod maps;
mod net;
mod peer;
pub mod pins;
mod plan;
mod programs;
mod reserve;
mod state;
mod status;
mod unix_sockets;

pub use attach::{Entered, Intercept};
pub use reserve::ephemeral_ports;
pub use peer::{PeerMeta, lookup_peer};
pub use state::{ProgramState, State};
pub use status::{CounterStatus, ProgramStatus, Status, status};
pub use unix_sockets::check_unix_sockets;

/// The kernel object, embedded at build time when `cargo xtask build-ebpf` has produced it.
#[cfg(pgward_ebpf_object)]
pub(super) fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(env!("PGWARD_EBPF_OBJECT")))
}
#[cfg(not(pgward_ebpf_object))]
pub(super) fn object() -> Option<&'static [u8]> {
    None
}

/// Whether this binary carries the eBPF object.
pub fn object_embedded() -> bool {
    object().is_some()
}
