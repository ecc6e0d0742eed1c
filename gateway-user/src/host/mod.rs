//! Facts about the host pgward runs on, as the kernel and the system's databases tell them:
//! users and groups ([`accounts`]), cgroup v2 ([`cgroup`]), who can reach a path ([`reach`]),
//! file and file-system attributes ([`files`]), capabilities ([`caps`]), other processes
//! ([`process`]) and the clock ([`clock`]).
//!
//! One implementation of each, shared by install, doctor, interception (`ebpf`), sessions and
//! the access state. This module reads the host; it imports nothing else of pgward.

pub mod accounts;
pub mod caps;
pub mod cgroup;
pub mod clock;
pub mod files;
mod nss;
pub mod process;
pub mod reach;
