//! `cargo xtask build-ebpf`: build the kernel programs in gateway-ebpf.
//!
//! gateway-ebpf is not a member of the root workspace: it is built from its own directory, with
//! its own pinned nightly (gateway-ebpf/rust-toolchain.toml), for `bpfel-unknown-none` with
//! `build-std` (gateway-ebpf/.cargo/config.toml), linked by `bpf-linker`. The environment that
//! the outer `cargo xtask` leaks (toolchain choice, rustc, flags, target dir, profile overrides)
//! is removed first so the inner build sees only its own configuration.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::util;

/// Where the object lands, relative to the workspace root.
pub const OBJECT_PATH: &str = "target/bpf/gateway-ebpf.o";
const CRATE_DIR: &str = "gateway-ebpf";
const BIN_NAME: &str = "gateway-ebpf";
const BPF_TARGET: &str = "bpfel-unknown-none";
const SETUP_HINT: &str = "run `.ci/run --install-only` as root to install the pinned toolchains, \
     llvm-22-dev and bpf-linker (see shared/TOOLCHAIN.md)";

#[derive(clap::Args, Default)]
pub struct BuildEbpfArgs {
    /// Build in release mode. This is the default and the only mode: BPF objects are always
    /// built optimized (the verifier rejects unoptimized code); accepted for familiarity.
    #[arg(long)]
    pub release: bool,
}

/// Builds gateway-ebpf and returns the path of the copied object (`target/bpf/gateway-ebpf.o`).
pub fn build(_args: &BuildEbpfArgs) -> Result<PathBuf> {
    let root = util::workspace_root();
    let crate_dir = root.join(CRATE_DIR);
    let toolchain = pinned_toolchain(&crate_dir)?;
    preflight(&toolchain)?;

    let target_dir = crate_dir.join("target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&crate_dir)
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--release",
            "--target-dir",
        ])
        .arg(&target_dir);
    scrub_env(&mut cmd);
    util::run_timed(&format!("build-ebpf ({toolchain})"), &mut cmd)?;

    let built = target_dir.join(BPF_TARGET).join("release").join(BIN_NAME);
    check_bpf_elf(&built)?;
    let dest = root.join(OBJECT_PATH);
    let dest_dir = dest.parent().expect("OBJECT_PATH has a parent");
    fs::create_dir_all(dest_dir).with_context(|| format!("creating {}", dest_dir.display()))?;
    let tmp = dest.with_extension("o.tmp");
    fs::copy(&built, &tmp)
        .with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    util::step(&format!("build-ebpf: wrote {}", dest.display()));
    Ok(dest)
}

/// The `channel` from gateway-ebpf/rust-toolchain.toml (single source of truth).
fn pinned_toolchain(crate_dir: &Path) -> Result<String> {
    let file = crate_dir.join("rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .find(|v| !v.is_empty())
        .with_context(|| format!("no `channel = \"...\"` in {}", file.display()))
}

/// Fails with a clear message when the pinned nightly, its rust-src or bpf-linker is missing.
fn preflight(toolchain: &str) -> Result<()> {
    let start = Instant::now();
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))
        .with_context(|| format!("rustup is needed to build gateway-ebpf; {SETUP_HINT}"))?;
    if !installed.lines().any(|l| l.starts_with(toolchain)) {
        bail!(
            "toolchain {toolchain} is not installed (RUSTUP_AUTO_INSTALL may be off); \
             {SETUP_HINT}, or: rustup toolchain install {toolchain} --profile minimal \
             --component rust-src"
        );
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    if !components.lines().any(|l| l.trim().starts_with("rust-src")) {
        bail!(
            "toolchain {toolchain} lacks rust-src (needed for build-std); {SETUP_HINT}, or: \
             rustup component add rust-src --toolchain {toolchain}"
        );
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).with_context(|| {
        format!("bpf-linker was not found on PATH or does not run; {SETUP_HINT}")
    })?;
    util::step(&format!(
        "build-ebpf: {toolchain} (rust-src), {} ({:.1}s)",
        linker.trim(),
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes what the outer `cargo xtask` (and rustup's proxy) put in the environment, and any
/// user build overrides meant for the host workspace, keeping only settings that are about
/// cargo itself (home, network, registries, terminal, job count).
fn scrub_env(cmd: &mut Command) {
    const REMOVE: &[&str] = &[
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO",
        // The host build's dynamic library path (cargo run adds its target dirs to it).
        "LD_LIBRARY_PATH",
    ];
    const KEEP_CARGO_PREFIXES: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRY_",
        "CARGO_REGISTRIES_",
        "CARGO_TERM_",
        "CARGO_BUILD_JOBS",
    ];
    for name in REMOVE {
        cmd.env_remove(name);
    }
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let drop =
            key.starts_with("CARGO_") && !KEEP_CARGO_PREFIXES.iter().any(|p| key.starts_with(p));
        // e.g. CARGO_TARGET_DIR, CARGO_BUILD_TARGET, CARGO_ENCODED_RUSTFLAGS, CARGO_PROFILE_*,
        // CARGO_TARGET_<triple>_LINKER, CARGO_MANIFEST_DIR, CARGO_PKG_*, CARGO_INCREMENTAL.
        if drop || key.starts_with("RUSTUP_TOOLCHAIN") {
            cmd.env_remove(OsStr::new(key));
        }
    }
}

/// Sanity check: a little-endian 64-bit ELF for EM_BPF (247).
fn check_bpf_elf(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    const EM_BPF: u16 = 247;
    let ok = bytes.len() >= 20
        && bytes[..4] == *b"\x7fELF"
        && bytes[4] == 2 // ELFCLASS64
        && bytes[5] == 1 // ELFDATA2LSB
        && u16::from_le_bytes([bytes[18], bytes[19]]) == EM_BPF;
    if !ok {
        bail!("{} is not a little-endian BPF ELF object", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_toolchain_reads_gateway_ebpf_file() {
        let dir = util::workspace_root().join(CRATE_DIR);
        let channel = pinned_toolchain(&dir).unwrap();
        assert!(channel.starts_with("nightly-"), "{channel}");
    }

    #[test]
    fn bpf_elf_check_rejects_other_files() {
        let tmp = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        fs::write(&tmp, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x01\0\x3e\0").unwrap();
        assert!(check_bpf_elf(&tmp).is_err(), "x86-64 ELF must be rejected");
        fs::write(&tmp, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x01\0\xf7\0").unwrap();
        assert!(check_bpf_elf(&tmp).is_ok());
        fs::remove_file(&tmp).unwrap();
    }
}
