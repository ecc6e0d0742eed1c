//! `cargo xtask package`: build-ebpf, a release build of pgward (embedding the object), then the
//! Debian package (see `xtask::deb`) in target/debian/.

use std::path::PathBuf;

use anyhow::Result;

use crate::{ebpf, util};
use xtask::deb;

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Package this binary instead of building one (it must embed the eBPF object).
    #[arg(long, value_name = "FILE")]
    binary: Option<PathBuf>,
    /// Skip build-ebpf (use the target/bpf/gateway-ebpf.o already there).
    #[arg(long)]
    no_ebpf: bool,
    /// Directory for the .deb (default: target/debian).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub fn run(args: &PackageArgs) -> Result<()> {
    let root = util::workspace_root();
    let object = if args.no_ebpf { root.join(ebpf::OBJECT_PATH) } else { ebpf::build(&ebpf::BuildEbpfArgs::default())? };
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => {
            let mut build = util::cargo();
            build.current_dir(&root).args(["build", "--release", "-p", "gateway-user"]);
            util::run_timed("cargo build --release -p gateway-user", &mut build)?;
            target_dir(&root).join("release/pgward")
        }
    };
    let out = args.out.clone().unwrap_or_else(|| target_dir(&root).join("debian"));
    std::fs::create_dir_all(&out)?;
    let inputs = deb::Inputs {
        workspace: root,
        binary,
        object,
        version: env!("CARGO_PKG_VERSION").to_string(),
        arch: deb::host_arch()?,
    };
    let path = deb::build(&inputs, &out)?;
    util::step(&format!("package: wrote {}", path.display()));
    Ok(())
}

/// Cargo's target directory (CARGO_TARGET_DIR, else target/ of the workspace).
fn target_dir(root: &std::path::Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}
