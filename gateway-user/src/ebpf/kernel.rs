//! Preconditions and plumbing for loading eBPF programs: capabilities, RLIMIT_MEMLOCK, and
//! bridging the programs' log lines (aya-log) to tracing.

use anyhow::bail;

use crate::host::caps;

pub(super) fn check_capabilities() -> anyhow::Result<()> {
    let Some(have) = caps::effective("self") else { return Ok(()) };
    let missing = caps::missing_for_ebpf(have);
    if !missing.is_empty() {
        bail!(
            "intercept: pgward lacks {} (needed to load and attach the eBPF programs); run it as \
             root, or grant them (systemd: AmbientCapabilities=CAP_BPF CAP_NET_ADMIN; or \
             setcap cap_bpf,cap_net_admin+ep), or set [intercept] enabled = false",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones use memcg accounting.
pub(super) fn raise_memlock() {
    let rl = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        let e = std::io::Error::last_os_error();
        if aya::util::KernelVersion::current().is_ok_and(|v| v < aya::util::KernelVersion::new(5, 11, 0)) {
            tracing::warn!(error = %e, "intercept: cannot raise RLIMIT_MEMLOCK; loading may fail on this kernel");
        } else {
            tracing::debug!(error = %e, "intercept: cannot raise RLIMIT_MEMLOCK (harmless: memcg accounting)");
        }
    }
}

/// The most verbose level tracing wants from target `gateway_ebpf` (aya-log's numbering).
pub(super) fn kernel_log_level() -> u8 {
    use tracing::Level;
    if tracing::enabled!(target: "gateway_ebpf", Level::TRACE) {
        5
    } else if tracing::enabled!(target: "gateway_ebpf", Level::DEBUG) {
        4
    } else if tracing::enabled!(target: "gateway_ebpf", Level::INFO) {
        3
    } else if tracing::enabled!(target: "gateway_ebpf", Level::WARN) {
        2
    } else {
        1
    }
}

/// Drain aya-log's ring buffer into `log` (bridged to tracing) continuously; `flush` is
/// `EbpfLogger::flush` (passed in: the logger's type names the `log` crate's trait).
pub(super) fn start_kernel_log<L, E>(logger: Result<L, E>, flush: fn(&mut L)) -> Option<tokio::task::JoinHandle<()>>
where
    L: std::os::fd::AsRawFd + Send + 'static,
    E: std::fmt::Display,
{
    let logger = match logger {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "intercept: kernel log lines will not be shown");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd; flushing neither closes nor replaces it.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "intercept: kernel log lines will not be shown");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            flush(guard.get_inner_mut());
            guard.clear_ready();
        }
    }))
}
