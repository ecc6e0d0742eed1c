//! Embeds the eBPF object when `cargo xtask build-ebpf` has produced it.
//!
//! `target/bpf/gateway-ebpf.o` (or `$PGWARD_EBPF_OBJECT`) present → `--cfg pgward_ebpf_object`
//! and `PGWARD_EBPF_OBJECT=<absolute path>` for `include_bytes_aligned!` in src/ebpf.rs.
//! Absent (a fresh clone before build-ebpf) → the build still succeeds; `pgward serve` with
//! interception on then says how to get the object.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(pgward_ebpf_object)");
    println!("cargo::rerun-if-env-changed=PGWARD_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let object = match std::env::var_os("PGWARD_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => manifest.join("../target/bpf/gateway-ebpf.o"),
    };
    if object.is_file() {
        let object = object.canonicalize().unwrap_or(object);
        println!("cargo::rerun-if-changed={}", object.display());
        println!("cargo::rustc-cfg=pgward_ebpf_object");
        println!("cargo::rustc-env=PGWARD_EBPF_OBJECT={}", object.display());
    } else {
        // Rerun once the object appears: watch its (empty) directory, created here so that
        // cargo has something to scan (a missing path would rerun this script every build).
        let dir = object.parent().map(PathBuf::from).unwrap_or(manifest);
        let _ = std::fs::create_dir_all(&dir);
        println!("cargo::rerun-if-changed={}", dir.display());
    }
}
