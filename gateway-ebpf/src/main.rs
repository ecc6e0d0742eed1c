//! pgward kernel-side programs.
//!
//! `pgward_connect4` (cgroup/connect4) will steer clients' connections to Postgres towards the
//! gateway; for now it allows every connect unchanged.
#![no_std]
#![no_main]

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::trace;

/// Verdict for cgroup_sock_addr programs: 1 lets the syscall proceed, 0 rejects it (EPERM).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn pgward_connect4(ctx: SockAddrContext) -> i32 {
    trace!(&ctx, "pgward_connect4: allow");
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible license, so the kernel lets the programs call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
