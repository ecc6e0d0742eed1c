//! pgward: a token-authenticated, policy-checked, audited Postgres gateway.
//!
//! Rooms (see docs/architecture.md): `config`, `cli`, `auth` (tokens), `tls`, `wire` (frames,
//! decoders, the protocol tracker), `session` (per-connection state machine), `upstream`
//! (connect + auth to the real Postgres, cancel map; `upstream_hosts`: several hosts and which
//! to use, `upstream_state`: what a server is), `pool` (upstream session pooling), `server`
//! (listeners), `policy`, `access` (token revocation, JIT grants), `audit` (records, writer,
//! reader, verify), `sqlstate` (the error codes pgward uses), `ebpf`, `host` (facts about the
//! machine: accounts, cgroups, file attributes, capabilities, the clock).

pub mod access;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod etcd;
pub mod metrics;
pub mod param_watch;
pub mod ebpf;
pub mod evict;
pub mod host;
pub mod mask;
pub mod policy;
pub mod pool;
pub mod server;
pub mod session;
pub mod sqlstate;
pub mod tls;
pub mod upstream;
pub mod upstream_admin;
pub mod upstream_hosts;
pub mod upstream_state;
pub mod wire;

/// Lock a mutex, taking the data even if a thread panicked while holding it: every mutex here
/// guards state that is consistent between operations, and a gateway must keep serving.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
