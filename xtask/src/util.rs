//! Small helpers shared by the tasks.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives in `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask is one level below the workspace root")
        .to_path_buf()
}

/// The cargo that runs this xtask (the root toolchain's), for workspace builds.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Run `cmd` to completion with inherited stdio; fail unless it exits 0. Prints the duration.
pub fn run_timed(what: &str, cmd: &mut Command) -> Result<()> {
    step(&format!("{what}: {}", display(cmd)));
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{what} failed ({status}) after {secs:.1}s");
    }
    step(&format!("{what}: ok in {secs:.1}s"));
    Ok(())
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
